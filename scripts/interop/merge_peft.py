#!/usr/bin/env python3
"""PEFT side of the interop suite's merge section (scripts/interop/merge.sh).

    merge_peft.py make-model KIND OUT            # tied-llama | gpt2 (random init, saved by transformers)
    merge_peft.py make-adapter CASE BASE OUT     # an adapter made by PEFT itself, weights randomized
    merge_peft.py peft-merge BASE OUT ADAPTER[@W]...   # merge_and_unload (+ add_weighted_adapter "cat")
    merge_peft.py compare REF OURS               # every tensor, dtype, shape; elements within 1 ulp
    merge_peft.py load OURS REF                  # transformers loads OURS; logits agree with REF's
    merge_peft.py prepare WORK SMOLLM2 SMALL     # all of the above for every case, in one process;
                                                 # writes WORK/cases.tsv (name, base, adapter specs)
    merge_peft.py check WORK                     # compare + load for every case: "RESULT name PASS|FAIL ..."

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
    if kind in ("tied-llama", "untied-llama"):
        cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=kind == "tied-llama",
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
    if case == "bench":  # the benchmark adapter: rank 16 on every linear layer
        return LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
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

    paths, weights = [], []
    for s in specs:
        p, _, w = s.rpartition("@")
        if p and _ and w.replace(".", "", 1).lstrip("-").isdigit():
            paths.append(p)
            weights.append(float(w))
        else:
            paths.append(s)
            weights.append(1.0)
    weighted = len(paths) > 1 or weights[0] != 1.0
    # add_weighted_adapter creates the combined adapter in the base layers' dtype, which on a bf16 model rounds
    # w*s*A, B and the delta to bf16 before the add. ftconv combines in f32 (decisions.md: W + sum w_i s_i B_i A_i),
    # so the reference merges into an exact f32 copy of the base and rounds the result to the stored dtype once.
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32 if weighted else "auto")
    stored = AutoModelForCausalLM.from_pretrained(base, dtype="auto").dtype if weighted else None
    pm = PeftModel.from_pretrained(model, paths[0], adapter_name="a0")
    if weighted:
        for i, p in enumerate(paths[1:], 1):
            pm.load_adapter(p, adapter_name=f"a{i}")
        names = [f"a{i}" for i in range(len(paths))]
        pm.add_weighted_adapter(names, weights, "combined", combination_type="cat")
        pm.set_adapter("combined")
        for n in names:
            pm.delete_adapter(n)
    merged = pm.merge_and_unload()
    if weighted:
        merged = merged.to(stored)
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


def bf16_ulps(a, b):
    """|a - b| in units of one bf16 ulp at max(|a|, |b|) (the tolerance for every dtype)."""
    a64, b64 = a.double(), b.double()
    m = torch.maximum(a64.abs(), b64.abs())
    e = torch.floor(torch.log2(torch.where(m > 0, m, torch.ones_like(m)))).clamp(min=-126)
    return (a64 - b64).abs() / torch.pow(2.0, e - 7)


def compare(ref_dir, ours_dir):
    ok, lines = compare_dirs(ref_dir, ours_dir)
    print("\n".join(lines))
    sys.exit(0 if ok else 1)


def compare_dirs(ref_dir, ours_dir):
    ref, ours = load_dir(ref_dir), load_dir(ours_dir)
    bad = []
    missing = sorted(set(ref) - set(ours))
    extra = sorted(set(ours) - set(ref))
    if missing:
        bad.append(f"{len(missing)} tensors missing from ftconv's output, e.g. {missing[:3]}")
    if extra:
        bad.append(f"{len(extra)} tensors only in ftconv's output, e.g. {extra[:3]}")
    total = differ = 0
    worst = 0.0
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
        ne = a != b
        n = int(ne.sum())
        differ += n
        if n:
            u = float(bf16_ulps(a[ne], b[ne]).max())
            worst = max(worst, u)
            if u > 1.0:
                bad.append(f"{k}: {n} elements differ, up to {u:.3g} bf16 ulp")
    lines = [f"{len(ref)} tensors (ftconv {len(ours)}), same dtypes/shapes; {total} elements, "
             f"{differ} not bit-identical ({differ / max(total, 1) * 1e6:.2f} per million), max {worst:.3g} bf16 ulp"]
    lines += ["  " + b for b in bad[:10]]
    return not bad, lines


def load(ours, ref):
    ok, line = load_check(ours, ref)
    print(line)
    sys.exit(0 if ok else 1)


def load_check(ours, ref):
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 5, 42, 100, 7, 300, 11, 2]])
    outs = []
    for d in (ours, ref):
        # float32 compute: the bf16 weights load exactly, and bf16 activation rounding (which turns
        # a 1-ulp weight difference into noise) stays out of the comparison
        m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
        with torch.no_grad():
            outs.append(m(ids).logits.float())
    diff = float((outs[0] - outs[1]).abs().max())
    scale = float(outs[1].abs().max())
    return diff <= 1e-2 * max(scale, 1.0), (
        f"transformers loads ftconv's folder; logits max |diff| vs PEFT's merge {diff:.3g} (max |logit| {scale:.3g})")


# name -> (base key, [(adapter case, weight)])
CASES = {
    "rslora-patterns-all-linear": ("smollm2", [("rslora", 1.0)]),
    "dora": ("smollm2", [("dora", 1.0)]),
    "embedding+modules_to_save": ("small", [("embed-mts", 1.0)]),
    "layers_to_transform+modules_to_save": ("small", [("layers", 1.0)]),
    "embedding-tied": ("smollm2", [("tied-embed", 1.0)]),
    "gpt2-conv1d-fan_in_fan_out": ("gpt2", [("gpt2", 1.0)]),
    "gpt2-conv1d-dora": ("gpt2", [("gpt2-dora", 1.0)]),
    "two-adapters-weighted": ("smollm2", [("two-a", 0.7), ("two-b", -0.4)]),
    "ia3": ("smollm2", [("ia3", 1.0)]),
}


def prepare(work, smol, small):
    os.makedirs(work, exist_ok=True)
    bases = {"smollm2": smol, "small": small, "gpt2": os.path.join(work, "model-gpt2")}
    if not os.path.isfile(os.path.join(smol, "config.json")):
        bases["smollm2"] = os.path.join(work, "model-tied-llama")
        make_model("tied-llama", bases["smollm2"])
        print(f"prepare: {smol} is missing; using a generated tied llama instead")
    if not os.path.isfile(os.path.join(small, "config.json")):
        bases["small"] = os.path.join(work, "model-untied-llama")
        make_model("untied-llama", bases["small"])
        print(f"prepare: {small} is missing; using a generated untied llama instead")
    make_model("gpt2", bases["gpt2"])
    rows = []
    for name, (base, ads) in CASES.items():
        specs = []
        for case, w in ads:
            d = os.path.join(work, f"adapter-{case}")
            if not os.path.isdir(d):
                make_adapter(case, bases[base], d)
            specs.append(d if w == 1.0 else f"{d}@{w}")
        ref = os.path.join(work, f"peft-{name}")
        peft_merge(bases[base], ref, specs)
        rows.append("\t".join([name, bases[base], ref, os.path.join(work, f"ftconv-{name}")] + specs))
    with open(os.path.join(work, "cases.tsv"), "w") as f:
        f.write("\n".join(rows) + "\n")


def check(work):
    for line in open(os.path.join(work, "cases.tsv")):
        name, _base, ref, ours = line.rstrip("\n").split("\t")[:4]
        if not os.path.isdir(ours):
            print(f"RESULT {name} FAIL no ftconv output")
            continue
        ok, lines = compare_dirs(ref, ours)
        print(f"RESULT {name} {'PASS' if ok else 'FAIL'} vs PEFT merge_and_unload: " + lines[0])
        for x in lines[1:]:
            print("DETAIL " + x)
        try:
            ok, msg = load_check(ours, ref)
        except Exception as e:  # noqa: BLE001
            ok, msg = False, f"transformers cannot load ftconv's folder: {e}"
        print(f"RESULT {name}-load {'PASS' if ok else 'FAIL'} {msg}")


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
    elif cmd == "prepare":
        prepare(*args)
    elif cmd == "check":
        check(*args)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
