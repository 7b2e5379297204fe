#!/usr/bin/env bash
# Reference measurements with llama.cpp.
#
# Builds `llama-bench` and `llama-server` (and, on its own, a portable
# `llama-quantize`) from the llama.cpp sources vendored
# in the PyPI sdist of llama-cpp-python (vendor/llama.cpp), CPU only, and runs
# llama-bench as a reference point for Tandem's own numbers.
#
# Usage:
#   bench/llamacpp.sh build                 build once into $LLAMACPP_DIR/bin
#   bench/llamacpp.sh bench MODEL [THREADS] pp512 / tg128 tok/s (3 reps)
#   bench/llamacpp.sh server-path           print the llama-server path
#   bench/llamacpp.sh build-quantize        build only llama-quantize, for any x86-64
#   bench/llamacpp.sh quantize IN OUT TYPE [--pure]
#                                           requantize a GGUF (Q4_K_M, Q6_K, ...)
#
# Environment:
#   LLAMACPP_DIR   install dir (default ${TANDEM_HOME:-$HOME/.cache/tandem}/llamacpp)
#   LLAMACPP_JSON  if set, `bench` also saves llama-bench's raw JSON there
#   LLAMACPP_JOBS  parallel compile jobs (default 2)
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.36
# Bump when the build recipe changes, so `build` redoes an older build.
RECIPE="llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION recipe=3"
LLAMACPP_DIR=${LLAMACPP_DIR:-${TANDEM_HOME:-$HOME/.cache/tandem}/llamacpp}
BIN_DIR=$LLAMACPP_DIR/bin
JOBS=${LLAMACPP_JOBS:-2}

# CMake options both builds share: static, no network code, tools only.
COMMON_FLAGS=(
    -DLLAMA_CURL=OFF
    -DLLAMA_OPENSSL=OFF
    -DBUILD_SHARED_LIBS=OFF
    -DLLAMA_BUILD_COMMON=ON
    -DLLAMA_BUILD_TOOLS=ON
    -DLLAMA_BUILD_EXAMPLES=OFF
    -DLLAMA_BUILD_TESTS=OFF
    -DLLAMA_BUILD_APP=OFF
    -DLLAMA_BUILD_UI=OFF
)

log() { echo "[llamacpp] $*" >&2; }
die() { echo "[llamacpp] error: $*" >&2; exit 1; }

ensure_tools() {
    local missing=()
    command -v cmake >/dev/null 2>&1 || missing+=(cmake)
    command -v make >/dev/null 2>&1 || missing+=(make)
    command -v g++ >/dev/null 2>&1 || missing+=(g++)
    if ((${#missing[@]})); then
        command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get"
        local sudo=()
        [[ $(id -u) -eq 0 ]] || sudo=(sudo)
        log "installing ${missing[*]} with apt-get"
        "${sudo[@]}" apt-get update
        DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y "${missing[@]}"
    fi
    command -v python3 >/dev/null 2>&1 || die "python3 is required"
}

# Downloads and unpacks the pinned llama.cpp sources into $1; prints their path.
fetch_source() {
    local tmp=$1
    # Only the target package is forced to its sdist. `--no-binary :all:` would
    # also force pip's metadata step to build its build backend's dependencies
    # (cmake, ninja) from source, which takes far longer than llama.cpp itself.
    log "downloading llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION sdist"
    python3 -m pip download --no-deps --no-binary llama-cpp-python \
        "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$tmp/dl" >&2
    local sdist
    sdist=$(ls "$tmp"/dl/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION".tar.gz 2>/dev/null) \
        || die "sdist not found in $tmp/dl"
    tar -xzf "$sdist" -C "$tmp"
    local src=$tmp/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp
    [[ -f $src/CMakeLists.txt ]] || die "no vendor/llama.cpp in the sdist"
    echo "$src"
}

cmd_build() {
    if [[ -x $BIN_DIR/llama-bench && -x $BIN_DIR/llama-server &&
          $(cat "$LLAMACPP_DIR/VERSION" 2>/dev/null) == "$RECIPE" ]]; then
        log "already built"
        echo "llama-bench:  $BIN_DIR/llama-bench"
        echo "llama-server: $BIN_DIR/llama-server"
        return 0
    fi
    ensure_tools

    local tmp
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/tandem-llamacpp.XXXXXX")
    # shellcheck disable=SC2064
    trap "rm -rf '$tmp'" EXIT

    local src
    src=$(fetch_source "$tmp")

    # LLAMA_CURL is deprecated/ignored in this llama.cpp but harmless to pass.
    # The web UI is neither built (npm) nor downloaded: llama-server then runs
    # without an embedded UI, which the API does not need.
    # GCC 12's amxtileintrin.h declares that _tile_loadconfig reads only 8
    # bytes, so the optimizer drops the stores that fill ggml's AMX tile
    # config; with -march=native on an AMX CPU, ldtilecfg then faults
    # (SIGSEGV in ggml_backend_amx_mul_mat). Turn AMX off for GCC < 13; the
    # AVX512/VNNI kernels are used instead.
    local extra_flags=""
    if g++ --version 2>/dev/null | head -1 | grep -qiE 'g\+\+|gcc' &&
       (($(g++ -dumpversion | cut -d. -f1) < 13)); then
        extra_flags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
        log "GCC < 13: building without AMX ($extra_flags)"
    fi

    log "configuring $src"
    cmake -S "$src" -B "$tmp/build" \
        -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=ON \
        -DGGML_CCACHE=OFF \
        -DCMAKE_C_FLAGS="$extra_flags" \
        -DCMAKE_CXX_FLAGS="$extra_flags" \
        "${COMMON_FLAGS[@]}" \
        -DLLAMA_BUILD_SERVER=ON \
        -DLLAMA_USE_PREBUILT_UI=OFF >&2

    log "building llama-bench and llama-server with -j$JOBS"
    local t0=$SECONDS
    cmake --build "$tmp/build" --config Release -j "$JOBS" \
        --target llama-bench llama-server >&2
    log "compiled in $((SECONDS - t0)) s"

    mkdir -p "$BIN_DIR"
    local b
    for b in llama-bench llama-server; do
        [[ -x $tmp/build/bin/$b ]] || die "$b was not produced"
        install -m 0755 "$tmp/build/bin/$b" "$BIN_DIR/$b.new"
        mv -f "$BIN_DIR/$b.new" "$BIN_DIR/$b"
    done
    echo "$RECIPE" >"$LLAMACPP_DIR/VERSION"
    echo "llama-bench:  $BIN_DIR/llama-bench"
    echo "llama-server: $BIN_DIR/llama-server"
}

# llama-quantize alone, built without -march=native: the same file comes out
# on any x86-64 machine, so tests can compare Tandem with llama.cpp answers
# recorded on it (tests check the file's digest). A few minutes on 2 cores.
QUANT_DIR=$LLAMACPP_DIR/portable
QUANT_RECIPE="llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION quantize=1"
cmd_build_quantize() {
    if [[ -x $QUANT_DIR/bin/llama-quantize &&
          $(cat "$QUANT_DIR/VERSION" 2>/dev/null) == "$QUANT_RECIPE" ]]; then
        echo "$QUANT_DIR/bin/llama-quantize"
        return 0
    fi
    ensure_tools
    local tmp src
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/tandem-llamaquant.XXXXXX")
    # shellcheck disable=SC2064
    trap "rm -rf '$tmp'" EXIT
    src=$(fetch_source "$tmp")
    cmake -S "$src" -B "$tmp/build" \
        -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=OFF \
        -DGGML_CCACHE=OFF \
        -DGGML_OPENMP=OFF \
        "${COMMON_FLAGS[@]}" \
        -DLLAMA_BUILD_SERVER=OFF >&2
    local t0=$SECONDS
    cmake --build "$tmp/build" --config Release -j "$JOBS" --target llama-quantize >&2
    log "llama-quantize compiled in $((SECONDS - t0)) s"
    mkdir -p "$QUANT_DIR/bin"
    install -m 0755 "$tmp/build/bin/llama-quantize" "$QUANT_DIR/bin/llama-quantize"
    echo "$QUANT_RECIPE" >"$QUANT_DIR/VERSION"
    echo "$QUANT_DIR/bin/llama-quantize"
}

# Requantizes IN to TYPE (any name llama-quantize takes). The default model is
# itself quantized (Q4_1), hence --allow-requantize; the output is
# deterministic for a given input, type and llama.cpp version.
cmd_quantize() {
    local in=${1:-} out=${2:-} type=${3:-} pure=()
    [[ -n $in && -n $out && -n $type ]] || die "usage: $0 quantize IN OUT TYPE [--pure]"
    [[ ${4:-} == --pure ]] && pure=(--pure)
    [[ -f $in ]] || die "model not found: $in"
    [[ -x $QUANT_DIR/bin/llama-quantize ]] || die "llama-quantize not built; run: $0 build-quantize"
    "$QUANT_DIR/bin/llama-quantize" --allow-requantize "${pure[@]}" "$in" "$out.tmp" "$type" 2 >&2
    mv -f "$out.tmp" "$out"
}

cmd_bench() {
    local model=${1:-}
    local threads=${2:-2}
    [[ -n $model ]] || die "usage: $0 bench MODEL [THREADS]"
    [[ -f $model ]] || die "model not found: $model"
    [[ -x $BIN_DIR/llama-bench ]] || die "llama-bench not built; run: $0 build"

    local out
    out=$(mktemp "${TMPDIR:-/tmp}/llama-bench.XXXXXX.json")
    # shellcheck disable=SC2064
    trap "rm -f '$out'" EXIT
    log "llama-bench -m $model -t $threads -p 512 -n 128 -r 3"
    "$BIN_DIR/llama-bench" -m "$model" -t "$threads" -p 512 -n 128 -r 3 -o json >"$out"
    if [[ -n ${LLAMACPP_JSON:-} ]]; then
        cp "$out" "$LLAMACPP_JSON"
        log "raw JSON saved to $LLAMACPP_JSON"
    fi
    python3 - "$out" "$model" "$threads" <<'EOF'
import json, os, sys
path, model, threads = sys.argv[1], sys.argv[2], sys.argv[3]
with open(path) as f:
    rows = json.load(f)
print(f"model:   {os.path.basename(model)}")
print(f"threads: {threads}")
for r in rows:
    if r.get("n_prompt", 0) and not r.get("n_gen", 0):
        name = f"pp{r['n_prompt']}"
    elif r.get("n_gen", 0) and not r.get("n_prompt", 0):
        name = f"tg{r['n_gen']}"
    else:
        name = f"pp{r.get('n_prompt', 0)}+tg{r.get('n_gen', 0)}"
    print(f"{name:>8}: {r['avg_ts']:10.2f} tok/s  (+/- {r.get('stddev_ts', 0.0):.2f})")
EOF
}

cmd_server_path() {
    [[ -x $BIN_DIR/llama-server ]] || die "llama-server not built; run: $0 build"
    echo "$BIN_DIR/llama-server"
}

case ${1:-} in
    build) shift; cmd_build "$@" ;;
    bench) shift; cmd_bench "$@" ;;
    server-path) shift; cmd_server_path "$@" ;;
    build-quantize) shift; cmd_build_quantize "$@" ;;
    quantize) shift; cmd_quantize "$@" ;;
    *) echo "usage: $0 {build|build-quantize|bench MODEL [THREADS]|server-path|quantize IN OUT TYPE [--pure]}" >&2; exit 2 ;;
esac
