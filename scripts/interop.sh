#!/usr/bin/env bash
# Conformance suite: ftconv against the real tools (llama.cpp's converter + llama-quantize, transformers, PEFT,
# bitsandbytes). The environment is installed and cached by scripts/interop/setup.sh (outside the repo).
#
#   scripts/interop.sh [SECTION...]     sections: quantize merge nf4 ollama adapter finetune families (default: all)
#
# Env: FTCONV_INTEROP_CACHE (cache dir, default $HOME/.cache/ftconv-interop), FTCONV_INTEROP_KEEP=1 keeps the
# temporary work dir, FTCONV_INTEROP_MODELS / FTCONV_INTEROP_TYPES narrow the quantize matrix,
# FTCONV_SKIP_BUILD=1 uses an existing target/release/ftconv.
# Prints PASS/FAIL/SKIP lines and a closing "interop: N passed, N failed, N skipped"; exits 1 on any FAIL.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
INTEROP=$ROOT/scripts/interop
# shellcheck source=interop/setup.sh
_interop_args=("$@"); set --   # setup.sh reads its own arguments
source "$INTEROP/setup.sh"
set -- "${_interop_args[@]}"

echo "== interop: versions (pinned)"
printf '%s\n' "$INTEROP_VERSIONS"
echo "cache: $CACHE"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/ftconv-interop.XXXXXX")
if [[ ${FTCONV_INTEROP_KEEP:-0} == 1 ]]; then
  echo "work dir (kept): $WORK"
else
  trap 'rm -rf "$WORK"' EXIT
fi

N_PASS=0 N_FAIL=0 N_SKIP=0
pass() { echo "PASS $*"; N_PASS=$((N_PASS + 1)); }
fail() { echo "FAIL $*"; N_FAIL=$((N_FAIL + 1)); }
skip() { echo "SKIP $*"; N_SKIP=$((N_SKIP + 1)); }
indent() { sed 's/^/    /'; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
compare_gguf() { "$PY" "$INTEROP/compare_gguf.py" "$@"; }
completion() { "$INTEROP/completion.sh" "$@"; }

# ---------------------------------------------------------------- build ftconv
FTCONV=$ROOT/target/release/ftconv
build_ftconv() {
  echo "== build: cargo build --release"
  if [[ ${FTCONV_SKIP_BUILD:-0} == 1 ]]; then
    echo "(FTCONV_SKIP_BUILD=1: using $FTCONV as it is)"
  elif ! (cd "$ROOT" && cargo build --release) >"$WORK/cargo-build.log" 2>&1; then
    fail "build: cargo build --release"
    tail -n 30 "$WORK/cargo-build.log" | indent
    return 0
  fi
  if [[ -x $FTCONV ]]; then
    pass "build: $FTCONV"
  else
    fail "build: no binary at $FTCONV"
  fi
}

# ---------------------------------------------------------------- quantize
# For each model M and type T: `ftconv quantize M --to T` must equal `convert_hf_to_gguf.py M` (default
# --outtype) + `llama-quantize M-BF16.gguf T` byte for byte, naming-heuristic KVs aside; for Q8_0 and Q4_K_M
# greedy llama-completion output must be the same text on both files.
section_quantize() {
  echo "== quantize"
  local models=${FTCONV_INTEROP_MODELS:-$INTEROP_MODELS} types=${FTCONV_INTEROP_TYPES:-$INTEROP_QUANT_TYPES}
  local m t ref out log t0
  for m in $models; do
    for t in $types; do
      ref=$REFS/$m/$m-$t.gguf out=$WORK/ftconv-$m-$t.gguf log=$WORK/ftconv-$m-$t.log
      if [[ ! -x $FTCONV ]]; then
        fail "quantize $m $t: ftconv is not built"
        continue
      fi
      t0=$(now)
      if ! "$FTCONV" quantize "$MODELS/$m" --to "${t,,}" -o "$out" >"$log" 2>&1; then
        fail "quantize $m $t: ftconv exited non-zero ($(since "$t0")s)"
        tail -n 10 "$log" | indent
        continue
      fi
      local secs; secs=$(since "$t0")
      if compare_gguf "$ref" "$out" --ignore-naming --max-diffs 10 >"$WORK/cmp-$m-$t.txt" 2>&1; then
        pass "quantize $m $t: identical to llama-quantize (ftconv ${secs}s)"
        grep -v '^note:' "$WORK/cmp-$m-$t.txt" | indent
      else
        fail "quantize $m $t: differs from llama-quantize (ftconv ${secs}s)"
        indent <"$WORK/cmp-$m-$t.txt"
      fi
    done
  done
  for m in $models; do
    for t in Q8_0 Q4_K_M; do
      [[ " $types " == *" $t "* ]] || continue
      ref=$REFS/$m/$m-$t.gguf out=$WORK/ftconv-$m-$t.gguf
      if [[ ! -f $out ]]; then
        fail "completion $m $t: no ftconv output to run"
        continue
      fi
      local a b
      if ! a=$(completion "$ref" 2>"$WORK/compl-ref.err"); then
        fail "completion $m $t: llama-completion failed on the reference"
        indent <"$WORK/compl-ref.err"
        continue
      fi
      if ! b=$(completion "$out" 2>"$WORK/compl-ftconv.err"); then
        fail "completion $m $t: llama-completion failed on ftconv's file"
        indent <"$WORK/compl-ftconv.err"
        continue
      fi
      if [[ $a == "$b" ]]; then
        pass "completion $m $t: same greedy text: $(printf '%q' "${a:0:80}")"
      else
        fail "completion $m $t: greedy text differs"
        printf 'reference: %q\nftconv:    %q\n' "$a" "$b" | indent
      fi
    done
  done
}

# ---------------------------------------------------------------- the other sections
# shellcheck source=interop/merge.sh
source "$INTEROP/merge.sh"
# shellcheck source=interop/nf4.sh
source "$INTEROP/nf4.sh"
# shellcheck source=interop/ollama.sh
source "$INTEROP/ollama.sh"
# shellcheck source=interop/adapter.sh
source "$INTEROP/adapter.sh"
# shellcheck source=interop/finetune.sh
source "$INTEROP/finetune.sh"
# shellcheck source=interop/families.sh
source "$INTEROP/families.sh"

ALL_SECTIONS="quantize merge nf4 ollama adapter finetune families"
sections=${*:-$ALL_SECTIONS}
for s in $sections; do
  [[ " $ALL_SECTIONS " == *" $s "* ]] || { echo "interop.sh: unknown section '$s' (have: $ALL_SECTIONS)" >&2; exit 2; }
done

t_start=$(now)
build_ftconv
for s in $sections; do
  "section_$s"
done
echo "== summary ($(since "$t_start")s)"
echo "interop: $N_PASS passed, $N_FAIL failed, $N_SKIP skipped"
[[ $N_FAIL -eq 0 ]]
