# shellcheck shell=bash
# Interop section "merge" (sourced by scripts/interop.sh): ftconv merge against PEFT itself.
#
# Adapters are made by PEFT (get_peft_model + save_pretrained, weights perturbed with seeded noise) on the real
# SmolLM2 ($SMOLLM2_HF, tied embeddings), the synthetic llama ($SMALL_HF, untied) and a generated GPT-2 (Conv1D):
# rsLoRA with rank/alpha patterns on all linear layers, DoRA, embedding LoRA + modules_to_save, layers_to_transform,
# embedding LoRA on a tied model, Conv1D with fan_in_fan_out (LoRA and DoRA), two adapters with weights (PEFT's
# add_weighted_adapter "cat"), IA3. For each: `ftconv merge` vs merge_and_unload + save_pretrained — every tensor
# present, same dtype and shape, every element within 1 ulp (the count of non-bit-identical elements is printed)
# — and transformers loads ftconv's folder with the same logits. Then `merge --to Q4_K_M` must equal merging then
# quantizing byte for byte: ftconv quantize of ftconv's merged folder, and llama.cpp's convert_hf_to_gguf.py +
# llama-quantize of the same folder (naming KVs aside).

section_merge() {
  echo "== merge"
  if [[ ! -x $FTCONV ]]; then
    fail "merge: ftconv is not built"
    return 0
  fi
  local M=$WORK/merge t0 secs
  mkdir -p "$M"
  t0=$(now)
  if ! "$PY" "$INTEROP/merge_peft.py" prepare "$M" "$SMOLLM2_HF" "$SMALL_HF" >"$M/prepare.log" 2>&1; then
    fail "merge: making the adapters / PEFT merges failed ($(since "$t0")s)"
    grep -v -i warn "$M/prepare.log" | tail -n 20 | indent
    return 0
  fi
  echo "adapters and PEFT merges made in $(since "$t0")s"
  local name base ref ours specs
  while IFS=$'\t' read -r name base ref ours specs; do
    # shellcheck disable=SC2086
    t0=$(now)
    if "$FTCONV" merge "$base" $specs -o "$ours" -q >"$M/ftconv-$name.log" 2>&1; then
      echo "ftconv merge $name: $(since "$t0")s"
    else
      fail "merge $name: ftconv exited non-zero"
      tail -n 5 "$M/ftconv-$name.log" | indent
    fi
  done <"$M/cases.tsv"
  t0=$(now)
  "$PY" "$INTEROP/merge_peft.py" check "$M" >"$M/check.log" 2>&1 || true
  local kind rest n=0
  while read -r kind name rest; do
    case $kind in
      RESULT)
        n=$((n + 1))
        local verdict=${rest%% *} msg=${rest#* }
        if [[ $verdict == PASS ]]; then pass "merge $name: $msg"; else fail "merge $name: $msg"; fi
        ;;
      DETAIL) echo "    $name $rest" ;;
    esac
  done <"$M/check.log"
  if [[ $n -eq 0 ]]; then
    fail "merge: the comparison script printed no result"
    grep -v -i warn "$M/check.log" | tail -n 20 | indent
  fi

  # merge --to Q4_K_M == merge, then quantize (ftconv's and llama.cpp's)
  local case=rslora-patterns-all-linear
  IFS=$'\t' read -r name base ref ours specs < <(grep "^$case"$'\t' "$M/cases.tsv")
  if [[ ! -d $ours ]]; then
    fail "merge --to Q4_K_M: no merged folder for $case"
    return 0
  fi
  local direct=$M/direct-Q4_K_M.gguf two=$M/two-step-Q4_K_M.gguf
  t0=$(now)
  # shellcheck disable=SC2086
  if ! "$FTCONV" merge "$base" $specs --to q4_k_m -o "$direct" -q >"$M/direct.log" 2>&1; then
    fail "merge --to Q4_K_M: ftconv exited non-zero"
    tail -n 5 "$M/direct.log" | indent
    return 0
  fi
  secs=$(since "$t0")
  if ! "$FTCONV" quantize "$ours" --to q4_k_m -o "$two" -q >"$M/two.log" 2>&1; then
    fail "merge --to Q4_K_M: ftconv quantize of the merged folder exited non-zero"
    tail -n 5 "$M/two.log" | indent
  elif compare_gguf "$two" "$direct" --ignore-naming --max-diffs 10 >"$M/cmp-ftconv.txt" 2>&1; then
    pass "merge --to Q4_K_M ($case, ${secs}s): identical to ftconv merge + ftconv quantize"
  else
    fail "merge --to Q4_K_M ($case): differs from ftconv merge + ftconv quantize"
    indent <"$M/cmp-ftconv.txt"
  fi
  local ref_bf16=$M/llama-merged-BF16.gguf ref_q=$M/llama-merged-Q4_K_M.gguf
  if ! run_convert "$ours" "$ref_bf16" >"$M/convert.log" 2>&1; then
    fail "merge --to Q4_K_M: convert_hf_to_gguf.py cannot read ftconv's merged folder"
    tail -n 5 "$M/convert.log" | indent
  elif ! "$LLAMA_QUANTIZE" "$ref_bf16" "$ref_q" Q4_K_M 2 >"$M/llama-quantize.log" 2>&1; then
    fail "merge --to Q4_K_M: llama-quantize failed"
    tail -n 5 "$M/llama-quantize.log" | indent
  elif compare_gguf "$ref_q" "$direct" --ignore-naming --max-diffs 10 >"$M/cmp-llama.txt" 2>&1; then
    pass "merge --to Q4_K_M ($case): identical to ftconv merge + convert_hf_to_gguf.py + llama-quantize"
  else
    fail "merge --to Q4_K_M ($case): differs from ftconv merge + convert_hf_to_gguf.py + llama-quantize"
    indent <"$M/cmp-llama.txt"
  fi
}
