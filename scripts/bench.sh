#!/usr/bin/env bash
# Speed and memory of ftconv against the reference tools on this machine, printed as ratios.
#
#   scripts/bench.sh [--threads N] [--types "Q4_K_M Q8_0"] [--skip-convert]
#
# Uses the interop environment (scripts/interop/setup.sh; the ~1.1B synthetic bf16 llama is
# generated on first use with --bench1b). For each type: convert_hf_to_gguf.py + llama-quantize
# versus `ftconv quantize DIR` (end to end), and llama-quantize versus `ftconv quantize BF16.gguf`
# (from the same BF16 GGUF); wall seconds and peak RSS from /usr/bin/time -v, and a byte
# comparison of the outputs.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
THREADS=2
TYPES="Q4_K_M"
SKIP_CONVERT=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --threads) THREADS=$2; shift 2 ;;
    --types) TYPES=$2; shift 2 ;;
    --skip-convert) SKIP_CONVERT=1; shift ;;
    *) echo "bench.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

source "$ROOT/scripts/interop/setup.sh" --bench1b
cargo build --release --manifest-path "$ROOT/Cargo.toml" >/dev/null
FTCONV=$ROOT/target/release/ftconv
MODEL=${BENCH1B_HF:?setup.sh did not export BENCH1B_HF}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# run NAME CMD...: prints "seconds peak_kb" and keeps the command's output in $WORK/NAME.log
measure() {
  local name=$1; shift
  /usr/bin/time -v -o "$WORK/$name.time" "$@" >"$WORK/$name.log" 2>&1 || { echo "FAILED: $name" >&2; tail -20 "$WORK/$name.log" >&2; exit 1; }
  local wall rss
  wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {n=split($2,a,":"); s=0; for(i=1;i<=n;i++) s=s*60+a[i]; print s}' "$WORK/$name.time")
  rss=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$WORK/$name.time")
  echo "$wall $rss"
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

BF16=$WORK/bench1b-BF16.gguf
if [[ $SKIP_CONVERT == 0 ]]; then
  read -r conv_s conv_kb < <(measure convert "$PY" "$CONVERT_HF" "$MODEL" --outfile "$BF16")
  echo "convert_hf_to_gguf.py: ${conv_s}s, peak RSS $((conv_kb / 1024)) MB"
else
  "$PY" "$CONVERT_HF" "$MODEL" --outfile "$BF16" >/dev/null 2>&1
  conv_s=0
fi
for T in $TYPES; do
  read -r q_s q_kb < <(measure "llq-$T" "$LLAMA_QUANTIZE" "$BF16" "$WORK/ref-$T.gguf" "$T" "$THREADS")
  read -r f_s f_kb < <(measure "ft-hf-$T" "$FTCONV" quantize "$MODEL" --to "$T" --threads "$THREADS" -o "$WORK/ft-hf-$T.gguf" -q)
  read -r g_s g_kb < <(measure "ft-gguf-$T" "$FTCONV" quantize "$BF16" --to "$T" --threads "$THREADS" -o "$WORK/ft-gguf-$T.gguf" -q)
  "$PY" "$ROOT/scripts/interop/compare_gguf.py" "$WORK/ref-$T.gguf" "$WORK/ft-hf-$T.gguf" --ignore-naming >"$WORK/cmp-hf-$T.txt" 2>&1 && same_hf=identical || same_hf=DIFFERENT
  cmp -s "$WORK/ref-$T.gguf" "$WORK/ft-gguf-$T.gguf" && same_gguf=identical || same_gguf=DIFFERENT
  echo "== $T, $THREADS threads"
  echo "  llama-quantize (BF16 GGUF → $T):   ${q_s}s, peak RSS $((q_kb / 1024)) MB"
  echo "  ftconv (BF16 GGUF → $T):           ${g_s}s, peak RSS $((g_kb / 1024)) MB   speed-up $(ratio "$q_s" "$g_s")×, bytes $same_gguf"
  if [[ $SKIP_CONVERT == 0 ]]; then
    ref_total=$(awk -v a="$conv_s" -v b="$q_s" 'BEGIN { print a + b }')
    echo "  convert + llama-quantize (HF → $T): ${ref_total}s, peak RSS $((conv_kb > q_kb ? conv_kb / 1024 : q_kb / 1024)) MB"
  fi
  echo "  ftconv (HF → $T):                  ${f_s}s, peak RSS $((f_kb / 1024)) MB${ref_total:+   speed-up $(ratio "$ref_total" "$f_s")×}, tensors+metadata $same_hf"
done
