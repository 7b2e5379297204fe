#!/usr/bin/env python3
"""Quantized variants of the default model, and llama.cpp's answers on them.

    bench/quants.py files            make the files (llama-quantize, portable build)
    bench/quants.py record           make them, then record llama.cpp's greedy
                                     continuations on each into
                                     model/tests/data/quants-llamacpp.json
    bench/quants.py bench [TANDEM]   `tandem bench engine --llama-bench` on each
                                     file; one table of decode and prefill tok/s

The files are requantized from the default model (Q4_1) with the pinned
llama.cpp's llama-quantize built without -march=native, so the same bytes come
out on any x86-64 machine; the recorded JSON keeps each file's SHA-256 and
model/tests/quants.rs checks it before comparing. `record` needs llama-server
(`bench/llamacpp.sh build`); the prompts are those of
shared/reference/smollm2-llamacpp.json. llama-server's answers on the default
model part from that reference's (llama-cpp-python, another build) at
near-ties, so each file's answers are recorded from the same server.

Environment: TANDEM_QUANT_DIR (default ${TANDEM_HOME:-~/.cache/tandem}/quants),
TANDEM_TEST_MODEL (the default model's path, if not in the cache).
"""

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLAMACPP = ROOT / "bench" / "llamacpp.sh"
RECORD = ROOT / "model" / "tests" / "data" / "quants-llamacpp.json"
REFERENCE = ROOT.parent / "shared" / "reference" / "smollm2-llamacpp.json"

# (name, llama-quantize type, extra flags). Q4_K_M and friends mix formats;
# this model's 576-wide rows are not whole 256-weight super-blocks, so
# llama-quantize gives those tensors a 32-block fallback (Q4_0, Q5_0, Q5_1,
# Q8_0) and only ffn_down (1536 wide) takes a K-quant. Q2_K appears in no
# mix here, nor Q3_K in Q3_K_M, hence the --pure files.
VARIANTS = [
    ("Q4_1", None, []),  # the default model itself
    ("Q4_0", "Q4_0", []),
    ("Q5_0", "Q5_0", []),
    ("Q5_1", "Q5_1", []),
    ("Q8_0", "Q8_0", []),
    ("Q2_K-pure", "Q2_K", ["--pure"]),
    ("Q3_K-pure", "Q3_K", ["--pure"]),
    ("Q3_K_M", "Q3_K_M", []),
    ("Q4_K_M", "Q4_K_M", []),
    ("Q5_K_M", "Q5_K_M", []),
    ("Q6_K", "Q6_K", []),
]


def home() -> Path:
    return Path(os.environ.get("TANDEM_HOME", Path.home() / ".cache" / "tandem"))


def quant_dir() -> Path:
    return Path(os.environ.get("TANDEM_QUANT_DIR", home() / "quants"))


def base_model() -> Path:
    p = os.environ.get("TANDEM_TEST_MODEL")
    return Path(p) if p else home() / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def make_files() -> dict:
    base = base_model()
    if not base.is_file():
        sys.exit(f"default model missing at {base}: run `tandem fetch-model`")
    subprocess.run([str(LLAMACPP), "build-quantize"], check=True, stdout=subprocess.DEVNULL)
    out = quant_dir()
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, qtype, flags in VARIANTS:
        path = out / f"smol-{name}.gguf"
        if qtype is None:
            if path.is_symlink() or path.exists():
                path.unlink()
            path.symlink_to(base.resolve())
        elif not path.is_file():
            print(f"[quants] {name}: llama-quantize {qtype} {' '.join(flags)}", file=sys.stderr)
            subprocess.run(
                [str(LLAMACPP), "quantize", str(base), str(path), qtype, *flags],
                check=True,
                stderr=subprocess.DEVNULL,
            )
        files[name] = path
    return files


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, path: str, body: dict) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)


def greedy_on(
    server: str, model: Path, cases: list, n_predict: int = 48, n_probs: int = 0
) -> list:
    """llama-server's greedy answers on `model` for each case's prompt ids;
    with `n_probs`, also the top tokens and log-probabilities at each
    position (`top`). The server's log goes beside the model."""
    port = free_port()
    log = open(model.with_suffix(".server.log"), "w")
    proc = subprocess.Popen(
        [server, "-m", str(model), "--port", str(port), "-t", "2", "-c", "2048", "-np", "1"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        for _ in range(600):
            if proc.poll() is not None:
                sys.exit(f"llama-server exited on {model}; see {log.name}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        else:
            sys.exit(f"llama-server did not come up on {model}")
        out = []
        for c in cases:
            body = {
                "prompt": c["prompt_ids"],
                "n_predict": n_predict,
                "temperature": 0.0,
                "cache_prompt": False,
                "return_tokens": True,
            }
            if n_probs:
                body["n_probs"] = n_probs
            r = post(port, "/completion", body)
            assert r["tokens_evaluated"] == len(c["prompt_ids"]), "the server added tokens"
            entry = {"prompt_ids": c["prompt_ids"], "greedy_ids": r["tokens"]}
            if n_probs:
                top = [
                    [{"id": t["id"], "logprob": t["logprob"]} for t in p["top_logprobs"]]
                    for p in r["completion_probabilities"]
                ]
                assert [p[0]["id"] for p in top] == r["tokens"], "greedy is not the top token"
                entry["top"] = top
            out.append(entry)
        return out
    finally:
        proc.terminate()
        proc.wait()
        log.close()


def server_and_prompts() -> tuple:
    """The pinned llama-server's path, and the shared reference's prompts."""
    server = subprocess.run(
        [str(LLAMACPP), "server-path"], check=True, capture_output=True, text=True
    ).stdout.strip()
    return server, json.loads(REFERENCE.read_text())["greedy"]


def record(files: dict) -> None:
    server, cases = server_and_prompts()
    result = {
        "source": "llama.cpp from llama-cpp-python 0.3.36: portable llama-quantize "
        "--allow-requantize from the default model (Q4_1); llama-server -t 2, "
        "/completion with temperature 0",
        "files": {},
    }
    for name, qtype, flags in VARIANTS:
        path = files[name]
        print(f"[quants] {name}: recording llama-server's greedy answers", file=sys.stderr)
        result["files"][name] = {
            "type": qtype,
            "flags": flags,
            "sha256": sha256(path),
            "greedy": greedy_on(server, path, cases),
        }
    RECORD.parent.mkdir(parents=True, exist_ok=True)
    RECORD.write_text(json.dumps(result, indent=1) + "\n")
    print(f"[quants] wrote {RECORD}", file=sys.stderr)


def bench(files: dict, tandem: str) -> None:
    llama_bench = Path(
        subprocess.run(
            [str(LLAMACPP), "server-path"], check=True, capture_output=True, text=True
        ).stdout.strip()
    ).with_name("llama-bench")
    rows = []
    for name, path in files.items():
        out = quant_dir() / f"bench-{name}.json"
        print(f"[quants] {name}: tandem bench engine", file=sys.stderr)
        subprocess.run(
            [tandem, "bench", "engine", "--model", str(path), "--threads", "2",
             "--batches", "32", "--repeats", "2", "--llama-bench", str(llama_bench),
             "--json", str(out)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        doc = json.loads(out.read_text())
        t, l = doc["tandem"], doc["llama_cpp"]
        b32 = dict((b, v) for b, v in t["decode_batched"]).get(32, float("nan"))
        rows.append((name, os.path.getsize(path) / 1e6, t["decode_tokens_per_s_batch1"],
                     l["decode_tokens_per_s"], b32, t["prefill_tokens_per_s"],
                     l["prefill_tokens_per_s"]))
    print(f"{'file':<10} {'MB':>6} {'decode b1':>10} {'llama tg128':>12} {'ratio':>6} "
          f"{'decode b32':>11} {'pp512':>8} {'llama pp512':>12} {'ratio':>6}")
    for n, mb, b1, tg, b32, pp, lpp in rows:
        print(f"{n:<10} {mb:6.1f} {b1:10.1f} {tg:12.1f} {b1 / tg:5.2f}x "
              f"{b32:11.1f} {pp:8.1f} {lpp:12.1f} {pp / lpp:5.2f}x")


def main() -> None:
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "files":
        for name, path in make_files().items():
            print(f"{name}\t{path}")
    elif cmd == "record":
        record(make_files())
    elif cmd == "bench":
        tandem = sys.argv[2] if len(sys.argv) > 2 else str(ROOT / "target" / "release" / "tandem")
        bench(make_files(), tandem)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
