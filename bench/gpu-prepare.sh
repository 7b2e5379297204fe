#!/usr/bin/env bash
# Prepares what a GPU machine without Rust or network needs for
# bench/gpu-check.sh, in the git-ignored folder gpu/: the stripped release
# binary and the default model in two parts (a device call carries at most
# 64 MiB, so the model travels in two calls to the same machine: the first
# carries gpu/tandem and gpu/model.part-a, the second gpu/model.part-b).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release
mkdir -p gpu
strip -o gpu/tandem target/release/tandem
model=$(target/release/tandem fetch-model)
rm -f gpu/model.part-*
split -n 2 -a 1 "$model" gpu/model.part-
(cd "$(dirname "$model")" && sha256sum "$(basename "$model")") | awk '{print $1 "  model.gguf"}' > gpu/model.sha256
ls -la gpu
