# shellcheck shell=bash
# Interop section "adapter" (sourced by scripts/interop.sh): `ftconv adapter` against llama.cpp's
# convert_lora_to_gguf.py on a LoRA adapter PEFT made on SmolLM2 (all linear layers, and with the
# embeddings), byte for byte (naming KVs aside) for --outtype f32, f16 and q8_0; then llama-completion
# runs SmolLM2 with ftconv's adapter (--lora) and gives the same greedy text as with the script's.
section_adapter() {
  echo "== adapter"
  if [[ ! -x $FTCONV ]]; then fail "adapter: ftconv is not built"; return 0; fi
  local kind ad ref ours t log
  for kind in linear embed; do
    ad=$WORK/lora-$kind
    local flags=(); [[ $kind == embed ]] && flags=(--embed)
    if ! "$PY" "$INTEROP/make_lora.py" "$SMOLLM2_HF" "$ad" "${flags[@]}" >"$WORK/make-lora-$kind.log" 2>&1; then
      fail "adapter $kind: PEFT could not make the adapter"; tail -n 10 "$WORK/make-lora-$kind.log" | indent; continue
    fi
    for t in f32 f16 q8_0; do
      ref=$WORK/lora-$kind-ref-$t.gguf ours=$WORK/lora-$kind-ftconv-$t.gguf log=$WORK/lora-$kind-$t.log
      if ! PYTHONPATH="$LLAMA_GGUF_PY${PYTHONPATH:+:$PYTHONPATH}" "$PY" "$CONVERT_LORA" "$ad" --base "$SMOLLM2_HF" \
          --outtype "$t" --outfile "$ref" >"$log.ref" 2>&1; then
        fail "adapter $kind $t: convert_lora_to_gguf.py failed"; tail -n 10 "$log.ref" | indent; continue
      fi
      if ! "$FTCONV" adapter "$ad" --base "$SMOLLM2_HF" --to "$t" -o "$ours" >"$log" 2>&1; then
        fail "adapter $kind $t: ftconv adapter failed"; tail -n 10 "$log" | indent; continue
      fi
      if compare_gguf "$ref" "$ours" --ignore-naming --max-diffs 10 >"$WORK/cmp-lora-$kind-$t.txt" 2>&1; then
        pass "adapter $kind $t: identical to convert_lora_to_gguf.py"
      else
        fail "adapter $kind $t: differs from convert_lora_to_gguf.py"; indent <"$WORK/cmp-lora-$kind-$t.txt"
      fi
    done
  done
  # the adapter at work: llama-completion --lora on the SmolLM2 Q8_0 reference
  local base_gguf=$REFS/smollm2/smollm2-Q8_0.gguf a b
  ref=$WORK/lora-linear-ref-f32.gguf ours=$WORK/lora-linear-ftconv-f32.gguf
  if [[ ! -f $base_gguf || ! -f $ref || ! -f $ours ]]; then
    fail "adapter completion: missing inputs"; return 0
  fi
  run_lora() {
    "$LLAMA_COMPLETION" -m "$base_gguf" --lora "$1" -p "The three primary colors are" -n 24 \
      --temp 0 --top-k 1 --repeat-penalty 1.0 -s 42 -t 2 -c 512 \
      -no-cnv --no-display-prompt --no-warmup --simple-io </dev/null 2>"$WORK/lora-run.err"
  }
  if ! a=$(run_lora "$ref"); then fail "adapter completion: llama-completion --lora failed on the script's adapter"; indent <"$WORK/lora-run.err"; return 0; fi
  if ! b=$(run_lora "$ours"); then fail "adapter completion: llama-completion --lora failed on ftconv's adapter"; indent <"$WORK/lora-run.err"; return 0; fi
  local plain; plain=$(completion "$base_gguf" "The three primary colors are" 24 2>/dev/null || true)
  if [[ $a == "$b" ]]; then
    pass "adapter completion: llama-completion --lora gives the same text with ftconv's adapter: $(printf '%q' "${b:0:60}")$([[ $b != "${plain% }" ]] && echo ' (differs from the base model: the adapter acts)')"
  else
    fail "adapter completion: greedy text differs"; printf 'script: %q\nftconv: %q\n' "$a" "$b" | indent
  fi
}
