# shellcheck shell=bash
# Interop section "ollama" (sourced by scripts/interop.sh, which defines pass/fail/skip, $PY, $FTCONV, $WORK,
# $INTEROP, $SMOLLM2_HF, $LLAMA_TEMPLATES).
#
# For the real SmolLM2 and for folders carrying the Llama 3.1, Qwen2.5, Phi-3.5, Gemma 2 and Mistral Nemo chat
# templates (from llama.cpp's models/templates): `ftconv ollama` writes a Modelfile, and its TEMPLATE, executed
# as Ollama executes a Messages-mode template, must equal transformers' apply_chat_template(...,
# add_generation_prompt=True) on canned conversations (ollama_check.py). The Ollama side is Go's own
# text/template (ollama_render.go, built with Debian's golang-go when `go` is installed; ftconv's embedded
# renderer must then agree with it byte for byte), else ftconv's embedded renderer.
# FTCONV_INTEROP_NO_GO=1 uses the embedded renderer even when Go is installed.
# Build ollama_render.go once per run; prints its path (nothing when Go is missing or disabled).
ollama_go_render() {
  local dir=$WORK/ollama-go
  if [[ -x $dir/ollama_render ]]; then echo "$dir/ollama_render"; return 0; fi
  [[ ${FTCONV_INTEROP_NO_GO:-0} != 1 ]] && command -v go >/dev/null 2>&1 || return 0
  mkdir -p "$dir/gosrc"
  cp "$INTEROP/ollama_render.go" "$dir/gosrc/main.go"
  if (cd "$dir/gosrc" && export GOCACHE=$dir/gocache GOPATH=$dir/gopath GO111MODULE=off GOFLAGS= &&
    go build -o "$dir/ollama_render" main.go) >"$dir/go-build.log" 2>&1; then
    echo "$dir/ollama_render"
  else
    fail "ollama: cannot build ollama_render.go with $(command -v go)" >&2
    indent <"$dir/go-build.log" >&2
  fi
}

section_ollama() {
  echo "== ollama"
  if [[ ! -x $FTCONV ]]; then
    fail "ollama: ftconv is not built"
    return 0
  fi
  local dir=$WORK/ollama go_render log
  mkdir -p "$dir"
  go_render=$(ollama_go_render)
  if [[ -n $go_render ]]; then
    echo "Ollama side: Go text/template ($(go version | awk '{print $3}')), ftconv's embedded renderer checked against it"
  else
    echo "Ollama side: ftconv's embedded renderer (no Go: install Debian's golang-go to render with Go's text/template)"
  fi
  # name|model folder|template file|bos|eos  (an empty template file: the folder's own template)
  local specs=(
    "smollm2|$SMOLLM2_HF|||"
    "llama3.1|$dir/llama3.1|meta-llama-Llama-3.1-8B-Instruct.jinja|<|begin_of_text|>|<|eot_id|>"
    "qwen2.5|$dir/qwen2.5|Qwen-Qwen2.5-7B-Instruct.jinja||<|im_end|>"
    "phi3.5|$dir/phi3.5|microsoft-Phi-3.5-mini-instruct.jinja|<s>|<|endoftext|>"
    "gemma2|$dir/gemma2|google-gemma-2-2b-it.jinja|<bos>|<eos>"
    "mistral-nemo|$dir/mistral-nemo|mistralai-Mistral-Nemo-Instruct-2407.jinja|<s>|</s>"
  )
  local spec name model tfile bos eos mf
  for spec in "${specs[@]}"; do
    IFS='|' read -r name model tfile bos eos <<<"$spec"
    if [[ -n $tfile ]]; then
      if [[ ! -f $LLAMA_TEMPLATES/$tfile ]]; then
        fail "ollama $name: no $LLAMA_TEMPLATES/$tfile"
        continue
      fi
      "$PY" "$INTEROP/ollama_check.py" make "$model" "$LLAMA_TEMPLATES/$tfile" "$bos" "$eos"
    elif [[ ! -d $model ]]; then
      fail "ollama $name: no model folder $model"
      continue
    fi
    mf=$dir/$name.Modelfile log=$dir/$name.log
    if ! "$FTCONV" ollama "$model" -o "$mf" >"$log" 2>&1; then
      fail "ollama $name: ftconv ollama exited non-zero"
      indent <"$log"
      continue
    fi
    if "$PY" "$INTEROP/ollama_check.py" check --model "$model" --modelfile "$mf" --ftconv "$FTCONV" \
      ${go_render:+--go "$go_render"} >"$dir/$name.check" 2>&1; then
      pass "ollama $name: TEMPLATE renders as apply_chat_template ($(grep -c '^ok ' "$dir/$name.check") conversations, $(grep -c '^skip ' "$dir/$name.check") refused by the chat template)"
    else
      fail "ollama $name: TEMPLATE differs from apply_chat_template"
      indent <"$dir/$name.check"
      echo "    Modelfile:"
      indent <"$mf" | indent
    fi
  done
}
