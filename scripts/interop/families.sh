# shellcheck shell=bash
# Interop section "families" (sourced by scripts/interop.sh): every model family of make_family.py through every
# command, against the real tools. Per family (checkpoint made with transformers' own classes, real tokenizer and
# chat template; references made once by setup.sh):
#   quantize  Q4_K_M Q6_K Q8_0 Q4_0 from the HF folder == convert_hf_to_gguf.py + llama-quantize (naming KVs
#             aside), and Q4_K_M from the converter's BF16 GGUF == llama-quantize of it
#   complete  llama-completion greedy-decodes the same text from ours and theirs (Q8_0)
#   nf4       quantize --to nf4 == transformers + bitsandbytes save_pretrained (tensors, quantization_config)
#   merge     merge == PEFT merge_and_unload + save_pretrained (LoRA on the family's linear modules)
#   adapter   adapter == convert_lora_to_gguf.py (f32)
#   ollama    the Modelfile's TEMPLATE renders like apply_chat_template on the canned conversations
# FTCONV_INTEROP_FAMILIES narrows the families (setup.sh), FTCONV_INTEROP_FAMILY_CHECKS the checks.
section_families() {
  echo "== families"
  if [[ ! -x $FTCONV ]]; then fail "families: ftconv is not built"; return 0; fi
  local checks=${FTCONV_INTEROP_FAMILY_CHECKS:-"quantize complete nf4 merge adapter ollama"}
  local f dir refs out t
  for f in $INTEROP_FAMILIES; do
    dir=$MODELS/fam-$f refs=$REFS/fam-$f out=$WORK/fam-$f
    mkdir -p "$out"
    if [[ ! -f $dir/config.json ]]; then fail "family $f: no checkpoint (setup.sh)"; continue; fi
    local targets
    targets=$("$PY" "$INTEROP/make_family.py" --info "$f" | "$PY" -c 'import json,sys; print(",".join(json.load(sys.stdin)["lora_targets"]))')
    if [[ " $checks " == *" quantize "* ]]; then
      for t in $FAMILY_QUANT_TYPES; do
        if ! "$FTCONV" quantize "$dir" --to "${t,,}" -o "$out/$t.gguf" -q >"$out/$t.log" 2>&1; then
          fail "family $f quantize $t: ftconv exited non-zero"; tail -n 5 "$out/$t.log" | indent; continue
        fi
        if compare_gguf "$refs/fam-$f-$t.gguf" "$out/$t.gguf" --ignore-naming --max-diffs 10 >"$out/cmp-$t.txt" 2>&1; then
          pass "family $f quantize $t: identical to convert_hf_to_gguf.py + llama-quantize"
        else
          fail "family $f quantize $t: differs from llama.cpp"; indent <"$out/cmp-$t.txt"
        fi
      done
      if "$FTCONV" quantize "$refs/fam-$f-BF16.gguf" --to q4_k_m -o "$out/from-bf16-Q4_K_M.gguf" -q >"$out/bf16.log" 2>&1 &&
        compare_gguf "$refs/fam-$f-Q4_K_M.gguf" "$out/from-bf16-Q4_K_M.gguf" --max-diffs 10 >"$out/cmp-bf16.txt" 2>&1; then
        pass "family $f quantize BF16 GGUF -> Q4_K_M: identical to llama-quantize"
      else
        fail "family $f quantize BF16 GGUF -> Q4_K_M"; tail -n 10 "$out/bf16.log" "$out/cmp-bf16.txt" 2>/dev/null | indent
      fi
    fi
    if [[ " $checks " == *" complete "* ]]; then
      local a b
      if [[ ! -f $out/Q8_0.gguf ]]; then
        fail "family $f complete: no ftconv Q8_0 to run"
      elif ! a=$(completion "$refs/fam-$f-Q8_0.gguf" 2>"$out/compl-ref.err"); then
        fail "family $f complete: llama-completion failed on the reference"; tail -n 5 "$out/compl-ref.err" | indent
      elif ! b=$(completion "$out/Q8_0.gguf" 2>"$out/compl-ours.err"); then
        fail "family $f complete: llama-completion failed on ftconv's file"; tail -n 5 "$out/compl-ours.err" | indent
      elif [[ $a == "$b" ]]; then
        pass "family $f complete: llama-completion gives the same greedy text: $(printf '%q' "${a:0:60}")"
      else
        fail "family $f complete: greedy text differs"; printf 'reference: %q\nftconv:    %q\n' "$a" "$b" | indent
      fi
    fi
    if [[ " $checks " == *" nf4 "* ]]; then
      if ! "$PY" "$INTEROP/nf4_ref.py" quantize "$dir" "$out/nf4-bnb" --quant-type nf4 --double-quant 1 >"$out/nf4-bnb.log" 2>&1; then
        fail "family $f nf4: transformers + bitsandbytes failed"; tail -n 8 "$out/nf4-bnb.log" | indent
      elif ! "$FTCONV" quantize "$dir" --to nf4 -o "$out/nf4-ours" -q >"$out/nf4.log" 2>&1; then
        fail "family $f nf4: ftconv exited non-zero"; tail -n 5 "$out/nf4.log" | indent
      elif "$PY" "$INTEROP/nf4_ref.py" compare "$out/nf4-bnb" "$out/nf4-ours" >"$out/nf4-cmp.txt" 2>&1 &&
        "$PY" -c 'import json,sys; a,b=(json.load(open(p))["quantization_config"] for p in sys.argv[1:]); sys.exit(a!=b)' \
          "$out/nf4-bnb/config.json" "$out/nf4-ours/config.json"; then
        pass "family $f nf4: same tensors and quantization_config as bitsandbytes"
      else
        fail "family $f nf4: differs from bitsandbytes"; head -n 20 "$out/nf4-cmp.txt" | indent
      fi
    fi
    local ad=$out/lora
    if [[ " $checks " == *" merge "* || " $checks " == *" adapter "* ]]; then
      if ! "$PY" "$INTEROP/make_lora.py" "$dir" "$ad" --targets "$targets" >"$out/lora.log" 2>&1; then
        fail "family $f: PEFT could not make a LoRA adapter"; tail -n 8 "$out/lora.log" | indent
        ad=
      fi
    fi
    if [[ -n $ad && " $checks " == *" merge "* ]]; then
      if ! "$PY" "$INTEROP/merge_peft.py" peft-merge "$dir" "$out/merged-peft" "$ad" >"$out/peft-merge.log" 2>&1; then
        fail "family $f merge: PEFT merge_and_unload failed"; tail -n 8 "$out/peft-merge.log" | indent
      elif ! "$FTCONV" merge "$dir" "$ad" -o "$out/merged-ours" -q >"$out/merge.log" 2>&1; then
        fail "family $f merge: ftconv exited non-zero"; tail -n 5 "$out/merge.log" | indent
      elif "$PY" "$INTEROP/merge_peft.py" compare "$out/merged-peft" "$out/merged-ours" >"$out/merge-cmp.txt" 2>&1; then
        pass "family $f merge: equals PEFT merge_and_unload ($(head -n 1 "$out/merge-cmp.txt"))"
      else
        fail "family $f merge: differs from PEFT"; indent <"$out/merge-cmp.txt"
      fi
    fi
    if [[ -n $ad && " $checks " == *" adapter "* ]]; then
      if ! PYTHONPATH="$LLAMA_GGUF_PY${PYTHONPATH:+:$PYTHONPATH}" "$PY" "$CONVERT_LORA" "$ad" --base "$dir" \
          --outtype f32 --outfile "$out/lora-ref.gguf" >"$out/lora-ref.log" 2>&1; then
        fail "family $f adapter: convert_lora_to_gguf.py failed"; tail -n 8 "$out/lora-ref.log" | indent
      elif ! "$FTCONV" adapter "$ad" --base "$dir" --to f32 -o "$out/lora-ours.gguf" >"$out/adapter.log" 2>&1; then
        fail "family $f adapter: ftconv adapter failed"; tail -n 5 "$out/adapter.log" | indent
      elif compare_gguf "$out/lora-ref.gguf" "$out/lora-ours.gguf" --ignore-naming --max-diffs 10 >"$out/cmp-lora.txt" 2>&1; then
        pass "family $f adapter: identical to convert_lora_to_gguf.py"
      else
        fail "family $f adapter: differs from convert_lora_to_gguf.py"; indent <"$out/cmp-lora.txt"
      fi
    fi
    if [[ " $checks " == *" ollama "* ]]; then
      if ! "$FTCONV" ollama "$dir" -o "$out/Modelfile" >"$out/ollama.log" 2>&1; then
        fail "family $f ollama: ftconv ollama exited non-zero"; indent <"$out/ollama.log"
      elif go_render=$(ollama_go_render) && "$PY" "$INTEROP/ollama_check.py" check --model "$dir" \
          --modelfile "$out/Modelfile" --ftconv "$FTCONV" ${go_render:+--go "$go_render"} >"$out/ollama.check" 2>&1; then
        pass "family $f ollama: TEMPLATE renders as apply_chat_template ($(grep -c '^ok ' "$out/ollama.check") conversations, $([[ -n $go_render ]] && echo "Go text/template" || echo "embedded renderer"))"
      else
        fail "family $f ollama: TEMPLATE differs from apply_chat_template"; tail -n 20 "$out/ollama.check" | indent
      fi
    fi
  done
}
