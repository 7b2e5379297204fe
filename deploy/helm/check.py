#!/usr/bin/env python3
"""Renders the Helm chart under several sets of values and checks the
manifests: every built-in kind against the Kubernetes schemas
(kubernetes-validate, strict), the CRDs (cert-manager, Prometheus Operator)
for the fields they need, what every pod must carry (probes, security
context, a disruption budget), and that the rendered cluster file is one
`tandem check-config` accepts. Then checks that the kustomize base is the
chart rendered with its defaults (`--update` rewrites it).

    check.py RENDER TANDEM [--update]
"""
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import yaml

HERE = Path(__file__).resolve().parent
CHART = HERE / "tandem"
BASE = HERE.parent / "k8s" / "base"
KUBE = "1.31.0"

SCENARIOS = {
    "defaults": [],
    "gpu, cert-manager, monitoring, keys, traces, an existing claim": [
        "gpu.enabled=true",
        "certs.certManager.enabled=true",
        "metrics.podMonitor.enabled=true",
        "apiKeys.existingSecret=tandem-api-keys",
        "otlp.endpoint=http://otel-collector:4318",
        "model.volume.existingClaim=models",
        "model.volume.readOnly=true",
        "model.path=/var/lib/tandem/models/SmolLM2-135M-Instruct.Q8_0.gguf",
    ],
    "two pipelines of three stages, two decode groups of TP 1, no PVC": [
        "prefill.pipelines=2",
        "prefill.stages=3",
        "decode.groups=2",
        "decode.tp=1",
        "model.volume.persistence.enabled=false",
        "podDisruptionBudget.enabled=false",
    ],
    "a host directory": ["model.volume.hostPath=/srv/models"],
}


def fail(msg):
    print(f"helm check: {msg}", file=sys.stderr)
    sys.exit(1)


def render(renderer, sets):
    args = [renderer, "--name", "tandem", "--namespace", "tandem"]
    for s in sets:
        args += ["--set", s]
    out = subprocess.run(args + [str(CHART)], capture_output=True, text=True)
    if out.returncode != 0:
        fail(f"render {sets}: {out.stderr}")
    return out.stdout


def pods(doc):
    """The pod spec of a workload, else None."""
    if doc["kind"] in ("Deployment", "StatefulSet"):
        return doc["spec"]["template"]["spec"]
    return None


def check(name, text, sets, tandem):
    docs = [d for d in yaml.safe_load_all(text) if d]
    seen = set()
    for d in docs:
        key = (d["kind"], d["metadata"]["name"])
        if key in seen:
            fail(f"{name}: {key} twice")
        seen.add(key)
        if d["apiVersion"] == "cert-manager.io/v1":
            spec = d["spec"]
            for f in ("secretName", "commonName", "uris", "issuerRef", "privateKey"):
                if f not in spec:
                    fail(f"{name}: Certificate {key[1]} lacks {f}")
            node = spec["commonName"]
            if not spec["uris"][0].endswith(":" + node) or spec["privateKey"]["encoding"] != "PKCS8":
                fail(f"{name}: Certificate {key[1]} does not name its node or is not PKCS#8")
            continue
        if d["apiVersion"] == "monitoring.coreos.com/v1":
            eps = d["spec"]["podMetricsEndpoints"]
            if {e["port"] for e in eps} != {"http", "health"} or any(e["path"] != "/metrics" for e in eps):
                fail(f"{name}: the PodMonitor does not scrape every pod's /metrics")
            continue
        try:
            kubernetes_validate.validate(d, KUBE, strict=True)
        except kubernetes_validate.ValidationError as e:
            fail(f"{name}: {key}: {e.message} at {list(e.path)}")
        spec = pods(d)
        if spec is None:
            continue
        if not spec["securityContext"].get("runAsNonRoot"):
            fail(f"{name}: {key} may run as root")
        for c in spec["containers"]:
            for p in ("startupProbe", "readinessProbe", "livenessProbe"):
                if p not in c:
                    fail(f"{name}: {key} container {c['name']} has no {p}")
            sc = c["securityContext"]
            if sc.get("allowPrivilegeEscalation") is not False or not sc.get("readOnlyRootFilesystem"):
                fail(f"{name}: {key} container {c['name']} is not locked down")
        volumes = {v["name"]: v for v in spec["volumes"]}
        model = volumes["model"]
        if "persistentVolumeClaim" not in model and "hostPath" not in model:
            if "model.volume.persistence.enabled=false" not in sets:
                fail(f"{name}: {key} caches the model in an emptyDir")
        if "gpu.enabled=true" in sets and d["kind"] == "StatefulSet":
            lim = spec["containers"][0]["resources"].get("limits", {})
            if "nvidia.com/gpu" not in lim:
                fail(f"{name}: {key} asks for no GPU")
    kinds = [k for k, _ in seen]
    workloads = kinds.count("Deployment") + kinds.count("StatefulSet")
    if "podDisruptionBudget.enabled=false" not in sets and kinds.count("PodDisruptionBudget") != workloads:
        fail(f"{name}: {workloads} workloads but {kinds.count('PodDisruptionBudget')} disruption budgets")
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    toml = HERE.parent.parent / "target" / "helm-check-cluster.toml"
    toml.parent.mkdir(exist_ok=True)
    toml.write_text(cm["data"]["cluster.toml"])
    if not any(s.startswith("model.path=") for s in sets):
        out = subprocess.run([tandem, "check-config", "--config", str(toml)], capture_output=True, text=True)
        if out.returncode != 0:
            fail(f"{name}: tandem rejects the rendered cluster file: {out.stderr}{out.stdout}")
    print(f"ok: {name}: {len(docs)} objects")


def main():
    if len(sys.argv) < 3:
        fail(__doc__)
    renderer, tandem = sys.argv[1], sys.argv[2]
    update = "--update" in sys.argv[3:]
    for name, sets in SCENARIOS.items():
        check(name, render(renderer, sets), sets, tandem)
    # The kustomize base is the chart with its defaults.
    text = render(renderer, [])
    header = "# Rendered from deploy/helm/tandem with its default values by\n# deploy/helm/check.sh --update: edit the chart, not this file.\n"
    docs = [d for d in yaml.safe_load_all(text) if d]
    cluster = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["cluster.toml"]
    want = {BASE / "tandem.yaml": header + text, BASE / "cluster.toml": cluster}
    for path, body in want.items():
        if update:
            path.write_text(body)
        elif not path.exists() or path.read_text() != body:
            fail(f"{path} is not the chart's rendering: run deploy/helm/check.sh --update")
    print("ok: the kustomize base is the chart's rendering")


if __name__ == "__main__":
    main()
