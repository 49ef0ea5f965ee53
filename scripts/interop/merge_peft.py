#!/usr/bin/env python3
"""PEFT side of the interop suite's merge section (scripts/interop/merge.sh).

    merge_peft.py make-model KIND OUT            # tied-llama | gpt2 (random init, saved by transformers)
    merge_peft.py make-adapter CASE BASE OUT     # an adapter made by PEFT itself, weights randomized
    merge_peft.py peft-merge BASE OUT ADAPTER[@W]...   # merge_and_unload (+ add_weighted_adapter "cat")
    merge_peft.py compare REF OURS               # every tensor, dtype, shape; elements within 1 ulp
    merge_peft.py load OURS REF                  # transformers loads OURS; logits agree with REF's

Adapters are created with `get_peft_model`, their trainable parameters perturbed with seeded noise (so LoRA B,
DoRA magnitudes, IA3 vectors and modules_to_save copies are all non-trivial) and saved with `save_pretrained`.
"""
import os
import sys

import torch

SEED = 1234


def make_model(kind, out):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    torch.manual_seed(SEED)
    if kind == "tied-llama":
        cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                          max_position_embeddings=256)
        dtype = torch.bfloat16
    elif kind == "gpt2":
        cfg = GPT2Config(vocab_size=512, n_embd=128, n_layer=2, n_head=4, n_positions=256)
        dtype = torch.float32
    else:
        sys.exit(f"unknown model kind {kind}")
    m = AutoModelForCausalLM.from_config(cfg).to(dtype)
    m.save_pretrained(out)
    print(f"make-model {kind}: {sum(p.numel() for p in m.parameters())} parameters, {dtype} -> {out}")


def lora_config(case):
    from peft import IA3Config, LoraConfig

    if case == "rslora":
        return LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear",
                          rank_pattern={"down_proj": 4, "q_proj": 12}, alpha_pattern={"v_proj": 32})
    if case == "dora":
        return LoraConfig(r=8, lora_alpha=16, use_dora=True,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    if case == "embed-mts":
        return LoraConfig(r=8, lora_alpha=8, target_modules=["embed_tokens", "q_proj", "v_proj"],
                          modules_to_save=["lm_head"])
    if case == "layers":
        return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                          layers_to_transform=[1], layers_pattern="layers", modules_to_save=["lm_head"])
    if case == "tied-embed":
        return LoraConfig(r=8, lora_alpha=16, target_modules=["embed_tokens", "q_proj", "o_proj"])
    if case == "gpt2":
        return LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    if case == "gpt2-dora":
        return LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, use_dora=True)
    if case in ("two-a", "two-b"):
        r = 4 if case == "two-a" else 8
        return LoraConfig(r=r, lora_alpha=2 * r if case == "two-a" else 4, target_modules=["q_proj", "v_proj", "down_proj"])
    if case == "ia3":
        return IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    sys.exit(f"unknown adapter case {case}")


def make_adapter(case, base, out):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    pm = get_peft_model(model, lora_config(case))
    g = torch.Generator().manual_seed(SEED + sum(map(ord, case)))
    n = 0
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=g).to(p.dtype)
            if "lora_magnitude_vector" in name or "ia3_l" in name:
                p.mul_(1 + 0.05 * noise)
            elif "lora_B" in name or "lora_embedding_A" in name:
                p.copy_(0.02 * noise)
            elif "lora_" in name:
                p.add_(0.02 * noise)
            else:  # modules_to_save copies
                p.add_(0.01 * noise)
            n += 1
    pm.save_pretrained(out)
    print(f"make-adapter {case}: {n} trainable tensors perturbed -> {out}")


def peft_merge(base, out, specs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    paths, weights = [], []
    for s in specs:
        p, _, w = s.rpartition("@")
        if p and _ and w.replace(".", "", 1).lstrip("-").isdigit():
            paths.append(p)
            weights.append(float(w))
        else:
            paths.append(s)
            weights.append(1.0)
    pm = PeftModel.from_pretrained(model, paths[0], adapter_name="a0")
    if len(paths) > 1 or weights[0] != 1.0:
        for i, p in enumerate(paths[1:], 1):
            pm.load_adapter(p, adapter_name=f"a{i}")
        names = [f"a{i}" for i in range(len(paths))]
        pm.add_weighted_adapter(names, weights, "combined", combination_type="cat")
        pm.set_adapter("combined")
        for n in names:
            pm.delete_adapter(n)
    merged = pm.merge_and_unload()
    merged.save_pretrained(out)
    print(f"peft-merge: {len(paths)} adapter(s) weights {weights} -> {out}")


def load_dir(d):
    from safetensors import safe_open

    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(d, f), "pt") as st:
                for k in st.keys():
                    out[k] = st.get_tensor(k)
    return out


def int_view(t):
    return {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[t.dtype]


def compare(ref_dir, ours_dir):
    ref, ours = load_dir(ref_dir), load_dir(ours_dir)
    bad = []
    missing = sorted(set(ref) - set(ours))
    extra = sorted(set(ours) - set(ref))
    if missing:
        bad.append(f"{len(missing)} tensors missing from ftconv's output, e.g. {missing[:3]}")
    if extra:
        bad.append(f"{len(extra)} tensors only in ftconv's output, e.g. {extra[:3]}")
    total = differ = 0
    worst = 0
    for k in sorted(set(ref) & set(ours)):
        a, b = ref[k], ours[k]
        if a.dtype != b.dtype or a.shape != b.shape:
            bad.append(f"{k}: {b.dtype} {tuple(b.shape)}, PEFT has {a.dtype} {tuple(a.shape)}")
            continue
        total += a.numel()
        if a.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            if not torch.equal(a, b):
                bad.append(f"{k}: differs")
            continue
        ia = a.view(int_view(a)).to(torch.int64)
        ib = b.view(int_view(b)).to(torch.int64)
        d = (ia - ib).abs()
        n = int((d != 0).sum())
        differ += n
        if n:
            m = int(d.max())
            worst = max(worst, m)
            if m > 1:
                bad.append(f"{k}: {n} elements differ, up to {m} ulp")
    print(f"tensors: {len(ref)} in PEFT's merge, {len(ours)} in ftconv's; elements: {total}, "
          f"not bit-identical: {differ} ({differ / max(total, 1) * 1e6:.2f} per million), max {worst} ulp")
    for b in bad[:10]:
        print("  " + b)
    sys.exit(1 if bad else 0)


def load(ours, ref):
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 5, 42, 100, 7, 300, 11, 2]])
    outs = []
    for d in (ours, ref):
        m = AutoModelForCausalLM.from_pretrained(d, dtype="auto")
        with torch.no_grad():
            outs.append(m(ids).logits.float())
    diff = float((outs[0] - outs[1]).abs().max())
    scale = float(outs[1].abs().max())
    print(f"transformers loaded ftconv's folder; logits max |diff| vs PEFT's merge {diff:.3g} (max |logit| {scale:.3g})")
    sys.exit(0 if diff <= 1e-2 * max(scale, 1.0) else 1)


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "make-model":
        make_model(*args)
    elif cmd == "make-adapter":
        make_adapter(*args)
    elif cmd == "peft-merge":
        peft_merge(args[0], args[1], args[2:])
    elif cmd == "compare":
        compare(*args)
    elif cmd == "load":
        load(*args)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
