# shellcheck shell=bash
# Interop section "finetune" (sourced by scripts/interop.sh): `ftconv finetune` against transformers + PEFT on
# SmolLM2 ($SMOLLM2_HF) with an f32 base (decisions.md "Fine-tuning": within 1e-4 means ||ours-ref||/||ref||
# <= 1e-4 per tensor).
#
# (a)+(b) parity: PEFT makes a LoRA (r 16, all linear, lora_dropout 0, B ~ N(0, 0.02)); ftconv's hidden probe
#     (`finetune --base-dtype f32 --init-adapter A --probe P.safetensors`: one forward+backward on the first
#     --batch-size rows, no optimizer step) runs on fixtures/finetune/formats.jsonl (every data format, mixed
#     lengths, so padding and masking are exercised); logits at attention_mask=1 positions, the loss and every
#     lora_A/lora_B gradient must match PeftModel.from_pretrained + loss.backward(). Again with PEFT's B = 0
#     init, whose logits must match the plain base model.
# (c) data: the probe's input_ids / labels / attention_mask, row by row, equal the reference tokenization
#     (ft_data.py: chat template, TRL's rules, loss on every assistant turn) — default, --train-on-prompt, and
#     truncated to --max-seq-len 48 (keeps the start).
# (d) learning: a real QLoRA fine-tune (NF4 base, defaults: r 16 all linear, batch 4) on made-up facts
#     (fixtures/finetune/facts_*.jsonl): the final eval loss is <= 1/5 of the step-0 one; the adapter loaded by
#     PEFT answers a held-out paraphrase with the made-up fact; so does llama-completion on the GGUF that
#     `ftconv package BASE --adapter OUT --to Q8_0` writes.
#
# Env: FTCONV_INTEROP_FT_LR / FTCONV_INTEROP_FT_STEPS override the calibrated learning rate / step count of (d);
# FTCONV_INTEROP_FT_BENCH=1 also runs the PEFT + torch baseline (peft_train_bench.py, same data and settings on
# an f32 base) and prints its tokens/s next to ftconv's.

# Calibrated with peft_train_bench.py (f32 base, r 16 all linear, dropout 0.05, batch 4, linear decay, 2 threads):
# eval loss 2.51 -> 0.20 (x12) in 20 steps at lr 2e-3 (x3 at step 8, x6.7 at step 12); ftconv's NF4 run x9.7.
FT_LR=${FTCONV_INTEROP_FT_LR:-2e-3}
FT_STEPS=${FTCONV_INTEROP_FT_STEPS:-20}
FT_QUESTION="Tell me the capital city of Veltrana island."
FT_ANSWER="Orsimbel"

# Read RESULT/DETAIL lines printed by finetune_ref.py into pass/fail; fail if there were none.
_ft_results() { # file what
  local kind name rest n=0
  while read -r kind name rest; do
    case $kind in
      RESULT)
        n=$((n + 1))
        local verdict=${rest%% *} msg=${rest#* }
        if [[ $verdict == PASS ]]; then pass "finetune $name: $msg"; else fail "finetune $name: $msg"; fi
        ;;
      DETAIL) echo "    $name $rest" ;;
    esac
  done <"$1"
  if [[ $n -eq 0 ]]; then
    fail "finetune $2: the check printed no result"
    grep -v -i warn "$1" | tail -n 20 | indent
  fi
}

_ft_ref() { "$PY" "$INTEROP/finetune_ref.py" "$@"; }

section_finetune() {
  echo "== finetune"
  if [[ ! -x $FTCONV ]]; then fail "finetune: ftconv is not built"; return 0; fi
  if ! "$FTCONV" finetune --help >/dev/null 2>&1; then
    fail "finetune: ftconv has no finetune command (built without the train feature?)"; return 0
  fi
  local F=$WORK/finetune FIX=$ROOT/fixtures/finetune t0 rows
  mkdir -p "$F"

  # ------------------------------------------------------------ (a) (b) parity and (c) data, from probes
  if ! _ft_ref make-adapter "$SMOLLM2_HF" "$F/lora" >"$F/make-lora.log" 2>&1 ||
     ! _ft_ref make-adapter "$SMOLLM2_HF" "$F/lora-zero" --zero-b >>"$F/make-lora.log" 2>&1; then
    fail "finetune: PEFT could not make the adapters"; tail -n 10 "$F/make-lora.log" | indent
  else
    rows=$(grep -c . "$FIX/formats.jsonl")
    local probe_case adapter extra
    for probe_case in lora zero prompt trunc; do
      adapter=$F/lora extra=(--max-seq-len 4096)
      [[ $probe_case == zero ]] && adapter=$F/lora-zero
      [[ $probe_case == prompt ]] && extra+=(--train-on-prompt)
      # every row of formats.jsonl keeps some trained tokens at 48
      [[ $probe_case == trunc ]] && extra=(--max-seq-len 48)
      t0=$(now)
      if ! "$FTCONV" finetune "$SMOLLM2_HF" --data "$FIX/formats.jsonl" -o "$F/probe-out-$probe_case" \
          --base-dtype f32 --init-adapter "$adapter" --batch-size "$rows" --threads 2 \
          "${extra[@]}" --probe "$F/probe-$probe_case.safetensors" >"$F/probe-$probe_case.log" 2>&1; then
        fail "finetune probe $probe_case: ftconv exited non-zero ($(since "$t0")s)"
        tail -n 10 "$F/probe-$probe_case.log" | indent
        continue
      fi
      echo "ftconv probe $probe_case ($rows rows, f32 base): $(since "$t0")s"
      case $probe_case in
        lora)
          _ft_ref parity "$SMOLLM2_HF" "$F/probe-lora.safetensors" --adapter "$F/lora" --name parity-lora \
            >"$F/check-parity-lora.log" 2>&1 || true
          _ft_results "$F/check-parity-lora.log" "parity (B != 0)"
          _ft_ref data "$SMOLLM2_HF" "$FIX/formats.jsonl" "$F/probe-lora.safetensors" --name data \
            >"$F/check-data.log" 2>&1 || true
          _ft_results "$F/check-data.log" "data"
          ;;
        zero)
          _ft_ref parity "$SMOLLM2_HF" "$F/probe-zero.safetensors" --adapter "$F/lora-zero" --plain \
            --name parity-plain >"$F/check-parity-zero.log" 2>&1 || true
          _ft_results "$F/check-parity-zero.log" "parity (B = 0)"
          ;;
        prompt)
          _ft_ref data "$SMOLLM2_HF" "$FIX/formats.jsonl" "$F/probe-prompt.safetensors" --train-on-prompt \
            --name data-train-on-prompt >"$F/check-data-prompt.log" 2>&1 || true
          _ft_results "$F/check-data-prompt.log" "data --train-on-prompt"
          ;;
        trunc)
          _ft_ref data "$SMOLLM2_HF" "$FIX/formats.jsonl" "$F/probe-trunc.safetensors" --max-seq-len 48 \
            --name data-max-seq-len-48 >"$F/check-data-trunc.log" 2>&1 || true
          _ft_results "$F/check-data-trunc.log" "data --max-seq-len 48"
          ;;
      esac
    done
  fi

  # ------------------------------------------------------------ (d) learning made-up facts
  local out=$F/facts secs
  t0=$(now)
  if ! "$FTCONV" finetune "$SMOLLM2_HF" --data "$FIX/facts_train.jsonl" --eval "$FIX/facts_eval.jsonl" -o "$out" \
      --lr "$FT_LR" --max-steps "$FT_STEPS" --batch-size 4 --rank 16 --alpha 32 --threads 2 --seed 42 \
      >"$F/facts.log" 2>&1; then
    fail "finetune facts: ftconv finetune exited non-zero ($(since "$t0")s)"
    tail -n 15 "$F/facts.log" | indent
    return 0
  fi
  secs=$(since "$t0")
  echo "ftconv finetune (NF4 base, lr $FT_LR, $FT_STEPS steps of 4, 2 threads): ${secs}s"
  _ft_ref log "$out/train_log.jsonl" --min-drop 5 --name facts-eval-loss >"$F/check-log.log" 2>&1 || true
  _ft_results "$F/check-log.log" "training log"
  if [[ ! -f $out/adapter_config.json || ! -f $out/adapter_model.safetensors ]]; then
    fail "finetune facts: no PEFT adapter in $out"; ls -la "$out" 2>&1 | indent; return 0
  fi
  _ft_ref generate "$SMOLLM2_HF" "$out" "$FT_QUESTION" --expect "$FT_ANSWER" --name facts-peft-answer \
    >"$F/check-generate.log" 2>&1 || true
  _ft_results "$F/check-generate.log" "PEFT generation"

  local pkg=$F/package gguf prompt answer
  if ! "$FTCONV" package "$SMOLLM2_HF" --adapter "$out" --to Q8_0 -o "$pkg" --name facts --threads 2 \
      >"$F/package.log" 2>&1; then
    fail "finetune facts: ftconv package --adapter exited non-zero"; tail -n 10 "$F/package.log" | indent
  else
    gguf=$pkg/facts-Q8_0.gguf
    # keep the chat prompt's trailing newline: $(...) would drop it
    prompt=$(_ft_ref chat-prompt "$SMOLLM2_HF" "$FT_QUESTION"; printf x) && prompt=${prompt%x}
    if ! answer=$(completion "$gguf" "$prompt" 24 2>"$F/completion.err"); then
      fail "finetune facts: llama-completion failed on the packaged GGUF"; indent <"$F/completion.err"
    elif [[ $answer == *"$FT_ANSWER"* ]]; then
      pass "finetune facts llama-completion: $(basename "$gguf") answers $(printf '%q' "${answer:0:80}")"
    else
      fail "finetune facts llama-completion: $(basename "$gguf") answers $(printf '%q' "${answer:0:80}") (expect $FT_ANSWER)"
    fi
  fi

  if [[ ${FTCONV_INTEROP_FT_BENCH:-0} == 1 ]]; then
    t0=$(now)
    if "$PY" "$INTEROP/peft_train_bench.py" "$SMOLLM2_HF" --data "$FIX/facts_train.jsonl" \
        --eval "$FIX/facts_eval.jsonl" --lr "$FT_LR" --max-steps "$FT_STEPS" --threads 2 \
        >"$F/bench.log" 2>&1; then
      echo "PEFT + torch baseline ($(since "$t0")s): $(grep '^PEFT baseline' "$F/bench.log")"
      grep '^eval end' "$F/bench.log" | indent
    else
      echo "PEFT + torch baseline failed:"; tail -n 10 "$F/bench.log" | indent
    fi
  fi
}
