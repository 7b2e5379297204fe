#!/usr/bin/env bash
# The GPU check: every GPU test and benchmark of the engine in one script,
# for a Linux x86-64 machine with an NVIDIA driver, from a `tandem` binary
# built elsewhere (no Rust, no network needed there).
#
#   bench/gpu-check.sh [kernels|model|all]     (default: all)
#
#   kernels  `tandem gpu-check --kernels-only`: sampling, paged attention and
#            all-reduce kernels against references (no model needed)
#   model    `tandem gpu-check` with bf16 and f32 weights: hidden states and
#            logits against the CPU, greedy continuations, chunked prefill,
#            PP/TP layouts, CUDA graphs; then `tandem bench engine --device
#            cuda` and the PyTorch reference on the same weights
#
# Environment:
#   TANDEM   the binary (default: gpu/tandem, else target/release/tandem)
#   MODEL    the GGUF file (default: gpu/model.gguf, assembled from
#            gpu/model.part-* when present, else the default model's cache)
#   OUT      where logs and JSON go (default: gpu-out)
#   STATIC=1 also time PyTorch with a static cache and torch.compile
#   DEVICE   the device (default cuda:0; `emu` runs the kernels on the CPU)
#
# CUDA libraries are found through LD_LIBRARY_PATH: this script adds the
# CUDA toolkit's lib64 and every lib directory of the `nvidia-*` wheels in
# python3's site-packages, and a libnccl.so link to the wheel's libnccl.so.2.
set -uo pipefail
cd "$(dirname "$0")/.."

what=${1:-all}
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
TANDEM=${TANDEM:-}
if [ -z "$TANDEM" ]; then
    if [ -x gpu/tandem ]; then TANDEM=gpu/tandem; else TANDEM=target/release/tandem; fi
fi
[ -x "$TANDEM" ] || { echo "FAIL setup: no tandem binary at $TANDEM"; exit 1; }

libdirs=()
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -d "$d" ] && libdirs+=("$d")
done
while IFS= read -r d; do libdirs+=("$d"); done < <(
    python3 - <<'PY' 2>/dev/null
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()] + sys.path
seen = set()
for r in roots:
    for d in glob.glob(os.path.join(r, "nvidia", "**", "lib"), recursive=True):
        d = os.path.realpath(d)
        if d not in seen and os.path.isdir(d):
            seen.add(d)
            print(d)
PY
)
shim=$(mktemp -d)
for d in "${libdirs[@]}"; do
    if [ -e "$d/libnccl.so.2" ] && [ ! -e "$shim/libnccl.so" ]; then
        ln -s "$d/libnccl.so.2" "$shim/libnccl.so"
    fi
done
LD_LIBRARY_PATH="$(IFS=:; echo "${libdirs[*]}"):$shim${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" > "$OUT/env.log"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | sed 's/^/gpu: /'

failed=0
# step NAME TIMEOUT CMD...: runs CMD with a time limit, its output shown and
# kept in $OUT/NAME.log, and one PASS/FAIL line for the step.
step() {
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 0 ]; then
        echo "PASS step $name ($((SECONDS - t0)) s)"
    else
        echo "FAIL step $name: exit $rc ($((SECONDS - t0)) s)"
        failed=$((failed + 1))
    fi
}

if [ "$what" = kernels ] || [ "$what" = all ]; then
    step kernels 120 "$TANDEM" gpu-check --device "${DEVICE:-cuda:0}" --kernels-only
fi

if [ "$what" = model ] || [ "$what" = all ]; then
    MODEL=${MODEL:-}
    if [ -z "$MODEL" ]; then
        if ls gpu/model.part-* >/dev/null 2>&1; then
            cat gpu/model.part-* > gpu/model.gguf
            if [ -f gpu/model.sha256 ] && ! (cd gpu && sha256sum -c --status model.sha256); then
                echo "FAIL setup: gpu/model.gguf does not match gpu/model.sha256 (a part is missing?)"
                exit 1
            fi
        fi
        [ -f gpu/model.gguf ] && MODEL=gpu/model.gguf
    fi
    model_args=()
    [ -n "$MODEL" ] && model_args=(--model "$MODEL")
    step check 330 "$TANDEM" gpu-check --device "${DEVICE:-cuda:0}" "${model_args[@]}"
    step bench 200 "$TANDEM" bench engine --device "${DEVICE:-cuda:0}" "${model_args[@]}" \
        --prompt-tokens 512,2048 --batches 8,32,64,128 --decode-steps 128 --json "$OUT/bench.json"
    hf=$(mktemp -d)
    static=()
    [ "${STATIC:-0}" = 1 ] && static=(--static)
    step export 60 "$TANDEM" export-hf "${model_args[@]}" --out "$hf"
    step torch 240 python3 bench/torch_reference.py --model "$hf" --prompt-tokens 512,2048 \
        --batches 1,8,32,64,128 --decode-steps 128 --json "$OUT/torch.json" "${static[@]}"
fi

echo "gpu-check.sh: $failed step(s) failed"
[ "$failed" -eq 0 ]
