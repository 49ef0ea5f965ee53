#!/usr/bin/env bash
# Compile every CUDA kernel in src/gpu/kernels with NVRTC for sm_80 and sm_90, on a machine with
# no GPU and no CUDA toolkit: NVRTC is a plain compiler library, shipped on PyPI as
# nvidia-cuda-nvrtc. A 13.0.x wheel is pinned because the GPU machines run driver 580 (CUDA 13.0)
# and a newer NVRTC emits PTX that driver rejects (../shared/specs/decisions.md).
#
# The wheel goes into a cache outside the repository and is reused between runs:
#   ${FTCONV_INTEROP_CACHE:-$HOME/.cache/ftconv-interop}/nvrtc/<version>
# Extra arguments are passed to `cargo test` (e.g. --no-default-features --features cuda).
set -euo pipefail
cd "$(dirname "$0")/.."

NVRTC_VERSION=13.0.88
CACHE="${FTCONV_INTEROP_CACHE:-$HOME/.cache/ftconv-interop}/nvrtc"
DIR="$CACHE/$NVRTC_VERSION"
PYTHON="${PYTHON:-python3}"

if [ ! -f "$DIR/.complete" ]; then
    echo "== installing nvidia-cuda-nvrtc==$NVRTC_VERSION into $DIR"
    mkdir -p "$CACHE"
    rm -rf "$DIR.partial"
    "$PYTHON" -m pip install --quiet --no-deps --no-compile --target "$DIR.partial" \
        "nvidia-cuda-nvrtc==$NVRTC_VERSION"
    rm -rf "$DIR"
    mv "$DIR.partial" "$DIR"
    touch "$DIR/.complete"
fi

LIB="$(find "$DIR" -name 'libnvrtc.so.13' -print -quit)"
if [ -z "$LIB" ]; then
    echo "nvrtc_check: libnvrtc.so.13 not found under $DIR (remove it to reinstall)" >&2
    exit 1
fi
LIBDIR="$(dirname "$LIB")"
echo "== nvidia-cuda-nvrtc $NVRTC_VERSION: $LIBDIR"

FTCONV_REQUIRE_NVRTC=1 LD_LIBRARY_PATH="$LIBDIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    cargo test --release "$@" --test gpu_kernels
