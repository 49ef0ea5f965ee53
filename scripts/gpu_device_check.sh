#!/usr/bin/env bash
# The on-device checks, for a machine with an NVIDIA GPU (driver + libnvrtc.so.13 or .12).
# Build here first (no GPU needed) and carry target/release/ftconv and the gpu_kernels test
# binary:
#   cargo build --release --no-default-features --features cuda
#   cargo test --release --no-default-features --features cuda --test gpu_kernels --no-run
# then on the GPU machine:
#   scripts/gpu_device_check.sh            # [NVRTC_LIB_DIR=... if libnvrtc is not on the path]
# It runs: GPU bytes == CPU bytes for every type (golden and random tensors, >1 chunk), NF4/FP4
# and double quant, widening and merge kernels, and the CLI (merge, merge --to, NF4/FP4 with and
# without adapters, quantize --adapter) with --device cuda vs cpu; the throughput report (one 7B-shaped layer, GPU vs all
# CPU threads); and `ftconv quantize --device cuda` vs `--device cpu` on the tiny fixture.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${NVRTC_LIB_DIR:-}" ]; then
    export LD_LIBRARY_PATH="$NVRTC_LIB_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
BIN="${GPU_TEST_BIN:-$(ls -t target/release/deps/gpu_kernels-* 2>/dev/null | grep -v '\.d$' | head -1)}"
FTCONV="${FTCONV:-target/release/ftconv}"
# the test binary finds the CLI and the fixtures here, not at the paths it was built with
export FTCONV_BIN="$(realpath "$FTCONV")" FTCONV_REPO="$(pwd)"
[ -x "$BIN" ] || { echo "gpu_device_check: no gpu_kernels test binary (build it first)" >&2; exit 1; }
command -v nvidia-smi >/dev/null && nvidia-smi -L || true

echo "== equality on the GPU"
"$BIN" --test-threads=1 --nocapture gpu_ 2>&1 | tee /tmp/gpu_eq.log
if grep -q "skipped: no usable GPU" /tmp/gpu_eq.log; then
    echo "gpu_device_check: the GPU was not usable (see the skip line above)" >&2
    exit 1
fi

echo "== throughput"
"$BIN" --ignored --nocapture gpu_throughput_report

echo "== ftconv quantize --device cuda vs cpu"
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
for T in q4_k_m q8_0 q6_k f16; do
    "$FTCONV" quantize fixtures/tiny-llama --to "$T" -o "$W/cuda-$T.gguf" --device cuda
    "$FTCONV" quantize fixtures/tiny-llama --to "$T" -o "$W/cpu-$T.gguf" --device cpu -q
    cmp "$W/cuda-$T.gguf" "$W/cpu-$T.gguf" && echo "$T: identical"
done
