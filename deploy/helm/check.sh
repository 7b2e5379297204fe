#!/usr/bin/env bash
# Renders and validates the Helm chart without helm (see check.py): builds
# the renderer in render/ from Debian's Go packages, offline.
#   deploy/helm/check.sh [--update]      (apt: golang-go golang-github-masterminds-sprig-dev
#                                         golang-k8s-sigs-yaml-dev; pip: kubernetes-validate,
#                                         in TANDEM_HELM_PYTHON's environment)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$here/../.."
out="$root/target/helm-render"
mkdir -p "$out"
(cd "$here/render" && GO111MODULE=off GOPATH=/usr/share/gocode GOCACHE="$out/cache" \
    GOFLAGS=-buildvcs=false go build -o "$out/render" .)
"${TANDEM_HELM_PYTHON:-python3}" "$here/check.py" "$out/render" "${TANDEM_BIN:-$root/target/release/tandem}" "$@"
