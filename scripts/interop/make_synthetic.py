#!/usr/bin/env python3
"""Deterministic synthetic Llama checkpoint (bf16 safetensors, transformers-5 config) for the interop suite.

Weights are ~N(0, 0.02) (norm weights 1 + N(0, 0.05)), drawn with numpy's PCG64 seeded per tensor from
(--seed, crc32(name)), rounded to bfloat16 (round-to-nearest-even) by torch. Tokenizer files are copied from
a SmolLM2 checkpoint (vocab 49152), so the converter recognises the pre-tokenizer (`smollm`).

Shards are named and indexed the way `save_pretrained` does it (`model-00001-of-00003.safetensors` plus
`model.safetensors.index.json`; one shard -> `model.safetensors`, no index). Tensors go to shards in module
order (embed_tokens, layers 0.., norm, lm_head), split so every shard holds about total/N bytes.

Presets:
  small   = 4 layers, hidden 512, heads 8, kv-heads 2, ffn 1536, untied, 3 shards, sampling fields in
            generation_config.json (exercises general.sampling.*)
  bench1b = 22 layers, hidden 2048, heads 32, kv-heads 4, ffn 5632, untied, shards of <= 2 GB (~1.1B params)
"""
import argparse
import json
import math
import shutil
import sys
import zlib
from pathlib import Path

import numpy as np

PRESETS = {
    "small": dict(layers=4, hidden=512, heads=8, kv_heads=2, ffn=1536, vocab=49152, tied=False, shards=3,
                  max_shard_bytes=None, sampling=True),
    "bench1b": dict(layers=22, hidden=2048, heads=32, kv_heads=4, ffn=5632, vocab=49152, tied=False, shards=None,
                    max_shard_bytes=2_000_000_000, sampling=False),
}

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"]
TRANSFORMERS_VERSION = "5.23.0"


def tensor_specs(a):
    """(name, shape, kind) in the order transformers' state_dict lists them."""
    h, hd = a.hidden, a.hidden // a.heads
    q, kv = a.heads * hd, a.kv_heads * hd
    specs = [("model.embed_tokens.weight", (a.vocab, h), "w")]
    for i in range(a.layers):
        p = f"model.layers.{i}."
        specs += [
            (p + "self_attn.q_proj.weight", (q, h), "w"),
            (p + "self_attn.k_proj.weight", (kv, h), "w"),
            (p + "self_attn.v_proj.weight", (kv, h), "w"),
            (p + "self_attn.o_proj.weight", (h, q), "w"),
            (p + "mlp.gate_proj.weight", (a.ffn, h), "w"),
            (p + "mlp.up_proj.weight", (a.ffn, h), "w"),
            (p + "mlp.down_proj.weight", (h, a.ffn), "w"),
            (p + "input_layernorm.weight", (h,), "norm"),
            (p + "post_attention_layernorm.weight", (h,), "norm"),
        ]
    specs.append(("model.norm.weight", (h,), "norm"))
    if not a.tied:
        specs.append(("lm_head.weight", (a.vocab, h), "w"))
    return specs


def make_tensor(name, shape, kind, seed):
    import torch

    rng = np.random.Generator(np.random.PCG64([seed, zlib.crc32(name.encode())]))
    x = rng.standard_normal(size=shape, dtype=np.float32)
    if kind == "norm":
        x = 1.0 + 0.05 * x
    else:
        x *= np.float32(0.02)
    return torch.from_numpy(x).to(torch.bfloat16)


def plan_shards(specs, n_shards, max_bytes):
    sizes = [2 * math.prod(s) for _, s, _ in specs]
    total = sum(sizes)
    if max_bytes is None:
        max_bytes = math.ceil(total / n_shards)
    shards, cur, cur_bytes = [], [], 0
    for spec, size in zip(specs, sizes):
        if cur and cur_bytes + size > max_bytes and (n_shards is None or len(shards) < n_shards - 1):
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(spec)
        cur_bytes += size
    shards.append(cur)
    return shards, total


def config_json(a):
    hd = a.hidden // a.heads
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "dtype": "bfloat16",
        "eos_token_id": 2,
        "head_dim": hd,
        "hidden_act": "silu",
        "hidden_size": a.hidden,
        "initializer_range": 0.02,
        "intermediate_size": a.ffn,
        "max_position_embeddings": 8192,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": a.heads,
        "num_hidden_layers": a.layers,
        "num_key_value_heads": a.kv_heads,
        "pad_token_id": 2,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
        "tie_word_embeddings": a.tied,
        "transformers_version": TRANSFORMERS_VERSION,
        "use_cache": True,
        "vocab_size": a.vocab,
    }


def generation_config_json(a):
    g = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    if a.sampling:
        g.update({"do_sample": True, "repetition_penalty": 1.1, "temperature": 0.6, "top_k": 40, "top_p": 0.9})
    g["transformers_version"] = TRANSFORMERS_VERSION
    return g


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS))
    ap.add_argument("--layers", type=int)
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--kv-heads", type=int)
    ap.add_argument("--ffn", type=int)
    ap.add_argument("--vocab", type=int)
    ap.add_argument("--shards", type=int, help="number of shards (default 1)")
    ap.add_argument("--max-shard-bytes", type=int, help="instead of --shards: shard size limit")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--tied", dest="tied", action="store_true", default=None)
    g.add_argument("--untied", dest="tied", action="store_false")
    ap.add_argument("--sampling", action=argparse.BooleanOptionalAction, default=None,
                    help="write sampling fields into generation_config.json")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--tokenizer-from", type=Path, required=True,
                    help="checkpoint folder to copy tokenizer files from (SmolLM2)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()

    base = dict(PRESETS[a.preset]) if a.preset else dict(layers=4, hidden=512, heads=8, kv_heads=2, ffn=1536,
                                                          vocab=49152, tied=False, shards=1,
                                                          max_shard_bytes=None, sampling=False)
    for k in ["layers", "hidden", "heads", "kv_heads", "ffn", "vocab", "tied", "shards", "max_shard_bytes",
              "sampling"]:
        v = getattr(a, k)
        if v is not None:
            base[k] = v
    if a.shards is not None:
        base["max_shard_bytes"] = None
    elif a.max_shard_bytes is not None:
        base["shards"] = None
    for k, v in base.items():
        setattr(a, k, v)
    if a.hidden % a.heads or a.heads % a.kv_heads:
        ap.error("hidden must be divisible by heads, heads by kv-heads")

    import torch
    from safetensors.torch import save_file

    specs = tensor_specs(a)
    shards, total = plan_shards(specs, a.shards, a.max_shard_bytes)
    n = len(shards)
    if a.shards is not None and n != a.shards:
        print(f"make_synthetic: asked for {a.shards} shards, got {n}", file=sys.stderr)
        return 1

    if a.out.exists():
        shutil.rmtree(a.out)
    a.out.mkdir(parents=True)
    weight_map = {}
    n_params = 0
    for i, shard in enumerate(shards, 1):
        fname = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for name, shape, kind in shard:
            tensors[name] = make_tensor(name, shape, kind, a.seed)
            weight_map[name] = fname
            n_params += math.prod(shape)
        save_file(tensors, str(a.out / fname), metadata={"format": "pt"})
        del tensors
    if n > 1:
        index = {"metadata": {"total_parameters": n_params, "total_size": total},
                 "weight_map": dict(sorted(weight_map.items()))}
        (a.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (a.out / "config.json").write_text(json.dumps(config_json(a), indent=2, sort_keys=True) + "\n")
    (a.out / "generation_config.json").write_text(json.dumps(generation_config_json(a), indent=2) + "\n")
    copied = []
    for f in TOKENIZER_FILES:
        src = a.tokenizer_from / f
        if src.exists():
            shutil.copyfile(src, a.out / f)
            copied.append(f)
    if "tokenizer.json" not in copied:
        print(f"make_synthetic: no tokenizer.json in {a.tokenizer_from}", file=sys.stderr)
        return 1
    print(f"make_synthetic: {a.out}: {n_params / 1e6:.1f}M params, {total / 1e6:.1f} MB bf16, {n} shard(s), "
          f"{'tied' if a.tied else 'untied'}, tokenizer files: {', '.join(copied)}")
    del torch
    return 0


if __name__ == "__main__":
    sys.exit(main())
