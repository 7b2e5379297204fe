#!/usr/bin/env bash
# Reproduces the disaggregated vs colocated vs llama.cpp-server goodput
# comparison (README, "Does disaggregation pay here?") with one command:
#
#   bash bench/goodput.sh [extra `tandem bench goodput` flags]
#
# Builds Tandem, builds llama.cpp's server once (bench/llamacpp.sh, ~11 min
# the first time), then runs every system on the same two cores, one after
# the other, and writes tables, CSV, JSON and SVG plots to ./goodput/.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release
bash bench/llamacpp.sh build
LLAMA_SERVER=$(bash bench/llamacpp.sh server-path)
exec ./target/release/tandem bench goodput --llama-server "$LLAMA_SERVER" --out goodput "$@"
