#!/usr/bin/env python3
"""Test checkpoints of the model families beyond the llama family, made with transformers' own config and model
classes (random weights from the class's own initialisation, seeded; every norm weight perturbed so that a norm
shift or a missed norm shows), saved in bf16 with `save_pretrained` (sharded where the family says so), with a
real tokenizer and the family's real chat template from llama.cpp's models/templates.

    make_family.py FAMILY OUT_DIR --llama-tree DIR [--smollm2 DIR]
    make_family.py --list                      # the families, one per line
    make_family.py --info FAMILY               # the family's interop facts as JSON (lora targets, ...)

Tokenizers: `gguf:NAME` rebuilds a real tokenizer from llama.cpp's models/ggml-vocab-NAME.gguf with
transformers' GGUF tokenizer loader; `smollm2` copies SmolLM2's (BPE, 49152 tokens).
Dimensions are chosen so that llama-quantize's fallbacks trigger (a feed-forward size that is not a multiple of
256) and, where the family allows, head_dim != hidden_size / num_attention_heads.
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

TRANSFORMERS_VERSION = "5.23.0"

# One entry per family. "config": kwargs for the transformers config class (on top of its defaults);
# "shard": max_shard_size for save_pretrained (None: one file); "lora_targets": PEFT target_modules for the
# merge/adapter checks; "template": file under models/templates ("" keeps the tokenizer's own).
FAMILIES = {
    "qwen3": dict(
        config_class="Qwen3Config",
        model_class="Qwen3ForCausalLM",
        config=dict(hidden_size=256, intermediate_size=608, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=96, max_position_embeddings=4096, rms_norm_eps=1e-6,
                    tie_word_embeddings=True, rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"}),
        tokenizer="gguf:qwen2",
        template="Qwen-Qwen3-0.6B.jinja",
        shard="40MB",
        lora_targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),
    "smollm3": dict(
        config_class="SmolLM3Config",
        model_class="SmolLM3ForCausalLM",
        config=dict(hidden_size=256, intermediate_size=608, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
                    tie_word_embeddings=True, no_rope_layer_interval=2,
                    rope_parameters={"rope_theta": 2000000.0, "rope_type": "default"}),
        tokenizer="gguf:llama-bpe",
        template="HuggingFaceTB-SmolLM3-3B.jinja",
        shard=None,
        lora_targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),
    "olmo2": dict(
        config_class="Olmo2Config",
        model_class="Olmo2ForCausalLM",
        config=dict(hidden_size=256, intermediate_size=608, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
                    tie_word_embeddings=False, rope_parameters={"rope_theta": 500000.0, "rope_type": "default"}),
        tokenizer="smollm2",
        template="",
        shard=None,
        lora_targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),
    "granite": dict(
        config_class="GraniteConfig",
        model_class="GraniteForCausalLM",
        config=dict(hidden_size=256, intermediate_size=608, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5,
                    tie_word_embeddings=True, attention_multiplier=0.015625, embedding_multiplier=12.0,
                    residual_multiplier=0.22, logits_scaling=8.0,
                    rope_parameters={"rope_theta": 10000000.0, "rope_type": "default"}),
        tokenizer="smollm2",
        template="ibm-granite-granite-3.3-2B-Instruct.jinja",
        shard="4MB",
        lora_targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),
}


def build_tokenizer(spec, llama_tree: Path, smollm2: Path | None):
    from transformers import AutoTokenizer

    if spec.startswith("gguf:"):
        name = f"ggml-vocab-{spec[5:]}.gguf"
        return AutoTokenizer.from_pretrained(str(llama_tree / "models"), gguf_file=name)
    if spec == "smollm2":
        if smollm2 is None:
            raise SystemExit("make_family: --smollm2 is needed for this family's tokenizer")
        return AutoTokenizer.from_pretrained(str(smollm2))
    raise SystemExit(f"make_family: unknown tokenizer spec {spec!r}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("family", nargs="?")
    ap.add_argument("out", nargs="?", type=Path)
    ap.add_argument("--llama-tree", type=Path)
    ap.add_argument("--smollm2", type=Path)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--info")
    a = ap.parse_args()
    if a.list:
        print("\n".join(FAMILIES))
        return 0
    if a.info:
        f = FAMILIES[a.info]
        print(json.dumps({k: f[k] for k in ("lora_targets",)}))
        return 0
    if a.family not in FAMILIES or a.out is None or a.llama_tree is None:
        ap.error(f"FAMILY (one of {', '.join(FAMILIES)}), OUT_DIR and --llama-tree are required")
    fam = FAMILIES[a.family]

    import torch
    import transformers
    from transformers import GenerationConfig

    tok = build_tokenizer(fam["tokenizer"], a.llama_tree, a.smollm2)
    cfg_cls = getattr(transformers, fam["config_class"])
    kw = dict(fam["config"])
    kw.setdefault("vocab_size", len(tok))
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        tid = getattr(tok, k, None)
        if tid is not None:
            kw.setdefault(k, tid)
    config = cfg_cls(**kw)
    config.architectures = [fam["model_class"]]
    torch.manual_seed(a.seed)
    model = getattr(transformers, fam["model_class"])(config)
    g = torch.Generator().manual_seed(a.seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
            elif p.dim() >= 2:
                # the class's init can leave some weights zero or constant: draw them all
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        do_sample=True, temperature=0.7, top_p=0.8, top_k=20)

    if a.out.exists():
        shutil.rmtree(a.out)
    a.out.mkdir(parents=True)
    kwargs = {"max_shard_size": fam["shard"]} if fam.get("shard") else {}
    model.save_pretrained(a.out, **kwargs)
    if fam.get("template"):
        tok.chat_template = (a.llama_tree / "models" / "templates" / fam["template"]).read_text()
    tok.save_pretrained(a.out)
    n = sum(p.numel() for p in model.parameters())
    shards = sorted(p.name for p in a.out.glob("model*.safetensors"))
    print(f"make_family: {a.family}: {a.out}: {n / 1e6:.1f}M params, {len(shards)} shard(s), "
          f"vocab {config.vocab_size}, transformers {transformers.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
