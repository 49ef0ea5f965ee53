#!/usr/bin/env bash
# ftconv merge against PEFT (PeftModel.from_pretrained + merge_and_unload + save_pretrained) on this machine:
# wall seconds and peak RSS (/usr/bin/time -v), and a tensor-by-tensor comparison of the two outputs.
#
#   scripts/bench_merge.sh [MODEL_DIR] [--threads N]
#
# The adapter is made by PEFT: rank 16, alpha 32, all linear layers (weights perturbed). Without MODEL_DIR the
# interop environment's ~1.1B synthetic bf16 llama is used (scripts/interop/setup.sh --bench1b).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MODEL= THREADS=
while [[ $# -gt 0 ]]; do
  case $1 in
    --threads) THREADS=$2; shift 2 ;;
    -*) echo "bench_merge.sh: unknown argument $1" >&2; exit 2 ;;
    *) MODEL=$1; shift ;;
  esac
done
if [[ -z $MODEL ]]; then
  source "$ROOT/scripts/interop/setup.sh" --bench1b
  MODEL=${BENCH1B_HF:?setup.sh did not export BENCH1B_HF}
else
  PY=${PY:-${FTCONV_INTEROP_CACHE:-$HOME/.cache/ftconv-interop}/venv/bin/python}
  export HF_HUB_OFFLINE=1
fi
FTCONV=$ROOT/target/release/ftconv
[[ -x $FTCONV ]] || cargo build --release --manifest-path "$ROOT/Cargo.toml" >/dev/null
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
HELPER=$ROOT/scripts/interop/merge_peft.py

measure() { # NAME CMD...: prints "seconds peak_kb"
  local name=$1; shift
  /usr/bin/time -v -o "$WORK/$name.time" "$@" >"$WORK/$name.log" 2>&1 || { echo "FAILED: $name" >&2; tail -20 "$WORK/$name.log" >&2; exit 1; }
  local wall rss
  wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {n=split($2,a,":"); s=0; for(i=1;i<=n;i++) s=s*60+a[i]; print s}' "$WORK/$name.time")
  rss=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$WORK/$name.time")
  echo "$wall $rss"
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

"$PY" "$HELPER" make-adapter bench "$MODEL" "$WORK/adapter" >"$WORK/make-adapter.log" 2>&1
sync
read -r p_s p_kb < <(measure peft "$PY" "$HELPER" peft-merge "$MODEL" "$WORK/peft" "$WORK/adapter")
read -r f_s f_kb < <(measure ftconv "$FTCONV" merge "$MODEL" "$WORK/adapter" -o "$WORK/ftconv" -q ${THREADS:+--threads "$THREADS"})
"$PY" "$HELPER" compare "$WORK/peft" "$WORK/ftconv" 2>/dev/null | grep -v -i warn >"$WORK/cmp.txt" || true
echo "== merge $(basename "$MODEL") + rank-16 all-linear LoRA ($(nproc) cores)"
echo "  PEFT merge_and_unload + save_pretrained: ${p_s}s, peak RSS $((p_kb / 1024)) MB"
echo "  ftconv merge:                            ${f_s}s, peak RSS $((f_kb / 1024)) MB   speed-up $(ratio "$p_s" "$f_s")×, memory $(ratio "$f_kb" "$p_kb")×"
sed 's/^/  /' "$WORK/cmp.txt"
