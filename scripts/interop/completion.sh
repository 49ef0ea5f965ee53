#!/usr/bin/env bash
# Greedy, deterministic llama-completion run; prints only the generated text (no prompt, no logs).
#
#   completion.sh MODEL.gguf [PROMPT] [N_PREDICT]
#
# Needs LLAMA_COMPLETION (exported by setup.sh). Greedy = --temp 0 (the temperature sampler keeps only the
# arg-max token) with --top-k 1 and --repeat-penalty 1.0 set explicitly, because llama.cpp otherwise takes
# sampling defaults from the model's general.sampling.* KVs; fixed seed, 2 threads, no conversation mode
# (SmolLM2 has a chat template, which would turn it on), prompt not echoed, no warm-up run.
set -euo pipefail

if [[ $# -lt 1 || $# -gt 3 ]]; then
  echo "usage: $0 MODEL.gguf [PROMPT] [N_PREDICT]" >&2
  exit 2
fi
model=$1
prompt=${2:-"The three primary colors are"}
n=${3:-32}
: "${LLAMA_COMPLETION:?run or source scripts/interop/setup.sh first}"

err=$(mktemp)
trap 'rm -f "$err"' EXIT
if ! out=$("$LLAMA_COMPLETION" -m "$model" -p "$prompt" -n "$n" \
      --temp 0 --top-k 1 --repeat-penalty 1.0 -s 42 -t 2 -c 512 \
      -no-cnv --no-display-prompt --no-warmup --simple-io </dev/null 2>"$err"); then
  echo "completion.sh: llama-completion failed on $model:" >&2
  tail -n 20 "$err" >&2
  exit 1
fi
# $(...) dropped the trailing newlines; llama-completion also appends " [end of text]" when the model stops.
out=${out% \[end of text\]}
printf '%s\n' "$out"
