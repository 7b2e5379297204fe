#!/usr/bin/env bash
# Tandem and llama.cpp's server side by side under one `tandem bench serve`
# workload: Tandem's default `serve` (disaggregated), Tandem with
# `--pipelines 0` (every prefill on the decode group) and llama-server, one
# after the other on the same cores, each swept over the same concurrencies.
# Prints one table of output tok/s, TTFT and TPOT percentiles.
#
#   bash bench/serving.sh
#
# Environment (defaults in brackets):
#   CONCURRENCY  closed-loop concurrencies [1,4,16,64]
#   INPUT_LEN    prompt tokens [200]       OUTPUT_LEN  answer tokens [64]
#   REQUESTS     requests per concurrency level [max(24, 3 x concurrency)]
#   SYSTEMS      which systems, in order [tandem,tandem-colocated,llamacpp]
#   OUT          directory for the JSON of every run [./serving]
# Builds Tandem and (once, ~11 min) llama.cpp's server via bench/llamacpp.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

CONCURRENCY=${CONCURRENCY:-1,4,16,64}
INPUT_LEN=${INPUT_LEN:-200}
OUTPUT_LEN=${OUTPUT_LEN:-64}
SYSTEMS=${SYSTEMS:-tandem,tandem-colocated,llamacpp}
OUT=${OUT:-serving}
TANDEM=./target/release/tandem

cargo build --release >&2
bash bench/llamacpp.sh build >&2
LLAMA_SERVER=$(bash bench/llamacpp.sh server-path)
$TANDEM fetch-model >&2
MODEL=${TANDEM_HOME:-$HOME/.cache/tandem}/models/SmolLM2-135M-Instruct.Q4_1.gguf
[[ -f $MODEL ]] || { echo "model missing at $MODEL" >&2; exit 1; }
mkdir -p "$OUT"

max_c=$(tr ',' '\n' <<<"$CONCURRENCY" | sort -n | tail -1)
pid=
stop() {
    if [[ -n $pid ]]; then
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        pid=
    fi
}
trap stop EXIT

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_healthy() {
    local port=$1
    for _ in $(seq 1 300); do
        curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && return 0
        kill -0 "$pid" 2>/dev/null || { echo "the server exited; see $OUT/$2.log" >&2; exit 1; }
        sleep 0.5
    done
    echo "the server did not become healthy in 150 s; see $OUT/$2.log" >&2
    exit 1
}

for sys in ${SYSTEMS//,/ }; do
    port=$(free_port)
    case $sys in
        tandem)
            $TANDEM serve --model "$MODEL" --port "$port" --kv-blocks 4096 \
                --max-batch "$max_c" >"$OUT/$sys.log" 2>&1 &
            ;;
        tandem-colocated)
            $TANDEM serve --model "$MODEL" --port "$port" --kv-blocks 4096 \
                --max-batch "$max_c" --pipelines 0 >"$OUT/$sys.log" 2>&1 &
            ;;
        llamacpp)
            # One slot per client at the highest concurrency, each with room
            # for its prompt and answer (-c is shared by the slots).
            "$LLAMA_SERVER" -m "$MODEL" -t 2 -np "$max_c" \
                -c $((max_c * (INPUT_LEN + OUTPUT_LEN + 64))) \
                --host 127.0.0.1 --port "$port" >"$OUT/$sys.log" 2>&1 &
            ;;
        *) echo "unknown system $sys (tandem, tandem-colocated, llamacpp)" >&2; exit 2 ;;
    esac
    pid=$!
    wait_healthy "$port" "$sys"
    for c in ${CONCURRENCY//,/ }; do
        n=${REQUESTS:-$((3 * c > 24 ? 3 * c : 24))}
        echo "[serving] $sys concurrency $c: $n requests" >&2
        $TANDEM bench serve --url "http://127.0.0.1:$port" --concurrency "$c" \
            --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" --requests "$n" \
            --label "$sys" --no-progress --json "$OUT/$sys-c$c.json" >"$OUT/$sys-c$c.txt"
    done
    stop
done

python3 - "$OUT" "$SYSTEMS" "$CONCURRENCY" "$INPUT_LEN" "$OUTPUT_LEN" <<'EOF'
import json, os, sys
out, systems, conc, inp, outp = sys.argv[1:6]
systems, conc = systems.split(","), [int(c) for c in conc.split(",")]
print(f"{inp}-token prompts, {outp} output tokens; closed loop; same machine, one system at a time")
print(f"{'system':<17} {'conc':>4} {'ok':>7} {'out tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} "
      f"{'TPOT p50':>9} {'TPOT p99':>9}")
rows = {}
for c in conc:
    for s in systems:
        path = os.path.join(out, f"{s}-c{c}.json")
        if not os.path.exists(path):
            continue
        m = json.load(open(path))["runs"][0]["summary"]
        ms = lambda k, q: f"{m[k][q] * 1e3:8.1f}" if m[k] else "       -"
        rows[(s, c)] = m["output_token_throughput"]
        print(f"{s:<17} {c:>4} {m['completed']:>3}/{m['requests']:<3} {m['output_token_throughput']:9.1f} "
              f"{ms('ttft', 'median')} {ms('ttft', 'p99')} {ms('tpot', 'median')} {ms('tpot', 'p99')}")
if "llamacpp" in systems:
    print()
    for s in systems:
        if s == "llamacpp":
            continue
        ratios = [f"c={c}: {rows[(s, c)] / rows[('llamacpp', c)]:.2f}x"
                  for c in conc if (s, c) in rows and rows.get(("llamacpp", c))]
        print(f"{s} / llama.cpp output tok/s: " + ", ".join(ratios))
EOF
