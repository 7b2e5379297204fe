#!/usr/bin/env bash
# Validates `tandem bench serve` against NVIDIA's AIPerf: both tools measure
# the same server with the same workload shape (synthetic prompts of a fixed
# token count in one user message, a fixed answer length with ignore_eos, a
# fixed concurrency), alternating, and the TTFT and TPOT medians are printed
# side by side.
#
#   bash bench/aiperf.sh                          # starts `tandem serve` itself
#   URL=http://127.0.0.1:8080 MODEL=name bash bench/aiperf.sh   # any server
#   FAKE=1 bash bench/aiperf.sh                   # a scripted server (bench/fake_openai.py):
#                                                 # TTFT 300 ms, 20 ms per token, nothing to compute
#
# Knobs (environment): ISL (200), OSL (64), CONC (1), N (20 requests per run),
# ROUNDS (2: each tool runs this many times, alternating), OUT (a work dir).
# AIPerf 0.13.0 is installed into ~/.cache/tandem/aiperf-venv on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
TANDEM=${TANDEM:-./target/release/tandem}
ISL=${ISL:-200}
OSL=${OSL:-64}
CONC=${CONC:-1}
N=${N:-20}
ROUNDS=${ROUNDS:-2}
OUT=${OUT:-$(mktemp -d /tmp/tandem-aiperf.XXXXXX)}
VENV=${AIPERF_VENV:-$HOME/.cache/tandem/aiperf-venv}
mkdir -p "$OUT"

if [ ! -x "$VENV/bin/aiperf" ]; then
  echo "installing aiperf 0.13.0 into $VENV (about 2 minutes, 1.2 GB)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q aiperf==0.13.0
fi
[ -x "$TANDEM" ] || cargo build --release
# AIPerf needs a Hugging Face tokenizer directory: the model's own, exported.
"$TANDEM" export-tokenizer --out "$OUT/tokenizer" >/dev/null

SERVE_PID=
cleanup() { [ -n "$SERVE_PID" ] && kill "$SERVE_PID" 2>/dev/null && wait "$SERVE_PID" 2>/dev/null; true; }
trap cleanup EXIT
if [ -n "${FAKE:-}" ]; then
  PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  python3 bench/fake_openai.py --port "$PORT" --ttft-ms 300 --itl-ms 20 &
  SERVE_PID=$!
  sleep 1
  URL=http://127.0.0.1:$PORT
elif [ -z "${URL:-}" ]; then
  PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  "$TANDEM" serve --port "$PORT" >"$OUT/serve.log" 2>&1 &
  SERVE_PID=$!
  for _ in $(seq 600); do grep -q "Tandem is serving" "$OUT/serve.log" && break; sleep 0.5; done
  grep -q "Tandem is serving" "$OUT/serve.log" || { cat "$OUT/serve.log"; exit 1; }
  URL=http://127.0.0.1:$PORT
fi
MODEL=${MODEL:-$(curl -s "$URL/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')}
echo "server $URL, model $MODEL: $ISL prompt tokens, $OSL answer tokens, concurrency $CONC, $N requests per run"

for round in $(seq "$ROUNDS"); do
  # A fresh seed per run: servers cache prefixes, and a repeated prompt
  # would be a cache hit.
  "$TANDEM" bench serve --url "$URL" --served-model "$MODEL" --input-len "$ISL" --output-len "$OSL" \
    --concurrency "$CONC" --requests "$N" --warmup 2 --seed $((1000 + round)) --no-progress \
    --json "$OUT/tandem-$round.json" >"$OUT/tandem-$round.txt"
  # Unset (not "0"): AIPerf treats any value as offline and then refuses a
  # tokenizer path. A request rate next to the concurrency keeps its
  # scheduler from spinning a core; new connections per request avoid its
  # pooled-socket errors against servers that close after a response.
  env -u HF_HUB_OFFLINE -u TRANSFORMERS_OFFLINE TMPDIR="$OUT" "$VENV/bin/aiperf" profile \
    --model "$MODEL" --url "$URL" --endpoint-type chat --streaming \
    --tokenizer "$OUT/tokenizer" --isl "$ISL" --isl-stddev 0 --osl "$OSL" --osl-stddev 0 \
    --extra-inputs ignore_eos:true --concurrency "$CONC" --request-rate 50 --arrival-pattern constant \
    --request-count "$N" --warmup-request-count 2 --num-dataset-entries $((N + 2)) \
    --connection-reuse-strategy never --use-server-token-count --workers-max 1 --ui-type none \
    --random-seed $((2000 + round)) --no-server-metrics --no-gpu-telemetry \
    --artifact-dir "$OUT/aiperf-$round" >"$OUT/aiperf-$round.log" 2>&1
done

python3 - "$OUT" "$ROUNDS" <<'EOF'
import json, sys, statistics
out, rounds = sys.argv[1], int(sys.argv[2])
rows = []
for r in range(1, rounds + 1):
    t = json.load(open(f"{out}/tandem-{r}.json"))["runs"][0]["summary"]
    a = json.load(open(f"{out}/aiperf-{r}/profile_export_aiperf.json"))
    rows.append((t["ttft"]["median"] * 1e3, a["time_to_first_token"]["p50"],
                 t["tpot"]["median"] * 1e3, a["inter_token_latency"]["p50"],
                 t["completed"], int(a["request_count"]["avg"])))
print(f"{'round':>5} {'TTFT tandem':>12} {'TTFT aiperf':>12} {'ratio':>6} {'TPOT tandem':>12} {'TPOT aiperf':>12} {'ratio':>6}  ok (tandem/aiperf)")
for i, (tt, at, tp, ap, tn, an) in enumerate(rows, 1):
    print(f"{i:>5} {tt:>10.1f}ms {at:>10.1f}ms {tt/at:>6.3f} {tp:>10.2f}ms {ap:>10.2f}ms {tp/ap:>6.3f}  {tn}/{an}")
tt = statistics.median(r[0] for r in rows); at = statistics.median(r[1] for r in rows)
tp = statistics.median(r[2] for r in rows); ap = statistics.median(r[3] for r in rows)
print(f"{'all':>5} {tt:>10.1f}ms {at:>10.1f}ms {tt/at:>6.3f} {tp:>10.2f}ms {ap:>10.2f}ms {tp/ap:>6.3f}")
for r in range(1, rounds + 1):
    cpu = json.load(open(f"{out}/tandem-{r}.json"))["runs"][0]["harness_cpu_share"]
    print(f"harness CPU, round {r}: {cpu*100:.2f}% of one core")
EOF
echo "details in $OUT"
