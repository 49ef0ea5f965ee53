# shellcheck shell=bash
# The interop suite's nf4 section, sourced by scripts/interop.sh (uses its PY, FTCONV, WORK, INTEROP,
# SMOLLM2_HF and pass/fail/skip/indent/now/since helpers).
#
# SmolLM2 quantized by transformers + bitsandbytes on the CPU (BitsAndBytesConfig(load_in_4bit=True,
# bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True/False, bnb_4bit_compute_dtype=bfloat16),
# device_map="cpu", save_pretrained) against `ftconv quantize --to nf4 [--no-double-quant]`:
#   - same keys, dtypes, shapes and bytes in every tensor (a nested_offset that differs in its last bit across
#     machines is reported with the absmax bytes it moves, decisions.md "NF4");
#   - the same quantization_config in config.json;
#   - transformers loads ftconv's folder on the CPU and greedy-generates the same text as from its own;
#   - time and peak RSS of both jobs (/usr/bin/time -v).
# Plus FP4 (double quant) compared the same way: bitsandbytes' CPU path is the reference (no golden data).

NF4_PROMPT=${FTCONV_NF4_PROMPT:-"The capital of France is"}

# "SECONDS PEAK_MB" from a /usr/bin/time -v report
_nf4_time_of() {
  awk -F': ' '
    /Elapsed \(wall clock\)/ { n = split($2, p, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + p[i] }
    /Maximum resident set size/ { rss = $2 / 1024 }
    END { printf "%.1f %.0f", s, rss }' "$1"
}

# _nf4_timed REPORT LOG CMD...: run CMD, its /usr/bin/time -v report in REPORT (or a wall-clock-only one)
_nf4_timed() {
  local report=$1 log=$2
  shift 2
  if [[ -x /usr/bin/time ]]; then
    /usr/bin/time -v -o "$report" "$@" >"$log" 2>&1
  else
    local t0 rc=0
    t0=$(now)
    "$@" >"$log" 2>&1 || rc=$?
    printf 'Elapsed (wall clock) time (h:mm:ss or m:ss): 0:%s\nMaximum resident set size (kbytes): 0\n' \
      "$(since "$t0")" >"$report"
    return $rc
  fi
}

section_nf4() {
  echo "== nf4"
  if [[ ! -x $FTCONV ]]; then
    fail "nf4: ftconv is not built"
    return 0
  fi
  if [[ ! -f ${SMOLLM2_HF:-}/config.json ]]; then
    skip "nf4: no SmolLM2 HF folder at ${SMOLLM2_HF:-(unset)}"
    return 0
  fi
  local ref_py=$INTEROP/nf4_ref.py
  local qt dq tag ref ours flags tb tf a b tb_s tb_m tf_s tf_m spec
  for spec in nf4:1 nf4:0 fp4:1; do
    qt=${spec%:*} dq=${spec#*:} tag=$qt-dq$dq
    ref=$WORK/$tag-bnb ours=$WORK/$tag-ftconv
    flags=()
    [[ $dq == 0 ]] && flags+=(--no-double-quant)
    if ! _nf4_timed "$WORK/$tag-bnb.time" "$WORK/$tag-bnb.log" \
      "$PY" "$ref_py" quantize "$SMOLLM2_HF" "$ref" --quant-type "$qt" --double-quant "$dq"; then
      fail "nf4 $tag: transformers + bitsandbytes failed"
      tail -n 15 "$WORK/$tag-bnb.log" | indent
      continue
    fi
    if ! _nf4_timed "$WORK/$tag-ftconv.time" "$WORK/$tag-ftconv.log" \
      "$FTCONV" quantize "$SMOLLM2_HF" --to "$qt" "${flags[@]}" -o "$ours" -q; then
      fail "nf4 $tag: ftconv exited non-zero"
      tail -n 10 "$WORK/$tag-ftconv.log" | indent
      continue
    fi
    read -r tb_s tb_m <<<"$(_nf4_time_of "$WORK/$tag-bnb.time")"
    read -r tf_s tf_m <<<"$(_nf4_time_of "$WORK/$tag-ftconv.time")"
    tb="bitsandbytes+transformers ${tb_s}s ${tb_m} MB peak RSS"
    tf="ftconv ${tf_s}s ${tf_m} MB"
    local speed
    speed=$(awk -v a="$tb_s" -v b="$tf_s" 'BEGIN { if (b > 0) printf "%.0fx", a / b; else print "n/a" }')
    if "$PY" "$ref_py" compare "$ref" "$ours" >"$WORK/$tag-cmp.txt" 2>&1; then
      if cmp -s "$ref/model.safetensors" "$ours/model.safetensors"; then
        pass "nf4 $tag: model.safetensors byte-identical to save_pretrained's ($tb; $tf; ${speed} faster)"
      else
        pass "nf4 $tag: same keys, dtypes, shapes and bytes ($tb; $tf; ${speed} faster)"
      fi
      { grep -v '^[0-9]* common tensors, 0 nested' "$WORK/$tag-cmp.txt" || true; } | indent
    else
      fail "nf4 $tag: tensors differ from bitsandbytes' ($tb; $tf)"
      head -n 40 "$WORK/$tag-cmp.txt" | indent
    fi
    if "$PY" - "$ref/config.json" "$ours/config.json" <<'PYEOF'; then
import json, sys
a, b = (json.load(open(p))["quantization_config"] for p in sys.argv[1:])
sys.exit(0 if a == b else (print(f"bitsandbytes: {a}\nftconv:       {b}") or 1))
PYEOF
      pass "nf4 $tag: config.json quantization_config identical"
    else
      fail "nf4 $tag: config.json quantization_config differs"
    fi
    [[ $qt == nf4 ]] || continue
    if ! a=$("$PY" "$ref_py" generate "$ref" --tokenizer "$SMOLLM2_HF" --prompt "$NF4_PROMPT" 2>"$WORK/$tag-gen-ref.err"); then
      fail "nf4 $tag: transformers cannot generate from its own 4-bit folder"
      tail -n 10 "$WORK/$tag-gen-ref.err" | indent
      continue
    fi
    if ! b=$("$PY" "$ref_py" generate "$ours" --prompt "$NF4_PROMPT" 2>"$WORK/$tag-gen-ours.err"); then
      fail "nf4 $tag: transformers cannot load/generate from ftconv's folder"
      tail -n 10 "$WORK/$tag-gen-ours.err" | indent
      continue
    fi
    if [[ $a == "$b" ]]; then
      pass "nf4 $tag: transformers loads ftconv's folder on the CPU, same greedy text: $(printf '%q' "${a:0:80}")"
    else
      fail "nf4 $tag: greedy text differs"
      printf 'bitsandbytes: %q\nftconv:       %q\n' "$a" "$b" | indent
    fi
  done
}
