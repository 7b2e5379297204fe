# Shared by the per-role launch scripts; not run on its own.
#
# Environment (all optional):
#   TANDEM_BIN      the tandem binary (default: `tandem` on PATH, else this
#                   checkout's target/release/tandem)
#   TANDEM_CONFIG   the cluster file (default: /etc/tandem/cluster.toml)
#   TANDEM_NODE     this node's name in the cluster file (default: the
#                   script's first argument, else the host name, which is
#                   what a Kubernetes StatefulSet pod is called)
#   TANDEM_THREADS  compute threads (default: every core)
#   TANDEM_HOME     where the default model is cached (default: ~/.cache/tandem)
#   TANDEM_LOG      log filter, e.g. info or tandem_decode=debug (default: info)
#   TANDEM_HEALTH_ADDR  prefill and decode nodes: serve probes and metrics
#                   here, e.g. 0.0.0.0:9100 (GET /health: 200 once linked to
#                   the gateway; GET /live: 200 while running; GET /metrics);
#                   unset: the node's `health` in the cluster file, else none
#   OTEL_EXPORTER_OTLP_ENDPOINT  export traces to this OTLP/HTTP collector
#   TANDEM_PYTHON   python used to fetch the default model (default: python3)
#   UCX_TLS, UCX_NET_DEVICES pass through untouched.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -z "${TANDEM_BIN:-}" ]]; then
    if command -v tandem >/dev/null 2>&1; then
        TANDEM_BIN="$(command -v tandem)"
    else
        TANDEM_BIN="$here/../../target/release/tandem"
    fi
fi
if [[ ! -x "$TANDEM_BIN" ]]; then
    echo "tandem binary not found (looked for $TANDEM_BIN); set TANDEM_BIN" >&2
    exit 1
fi
TANDEM_CONFIG="${TANDEM_CONFIG:-/etc/tandem/cluster.toml}"
if [[ ! -r "$TANDEM_CONFIG" ]]; then
    echo "cluster file $TANDEM_CONFIG is not readable; set TANDEM_CONFIG" >&2
    exit 1
fi
TANDEM_NODE="${TANDEM_NODE:-${1:-$(hostname)}}"
export TANDEM_LOG="${TANDEM_LOG:-info}"

# Replaces this shell, so SIGTERM from systemd or Kubernetes reaches tandem,
# which stops cleanly.
run_role() {
    local role="$1"
    exec "$TANDEM_BIN" ${TANDEM_THREADS:+--threads "$TANDEM_THREADS"} \
        "$role" --config "$TANDEM_CONFIG" --node "$TANDEM_NODE"
}
