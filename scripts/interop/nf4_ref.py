#!/usr/bin/env python3
"""bitsandbytes/transformers side of the interop suite's nf4 section (scripts/interop/nf4.sh).

  nf4_ref.py quantize SRC OUT --quant-type nf4|fp4 --double-quant 0|1
      transformers + bitsandbytes on the CPU: from_pretrained(SRC, quantization_config=BitsAndBytesConfig(
      load_in_4bit=True, bnb_4bit_quant_type=..., bnb_4bit_use_double_quant=..., bnb_4bit_compute_dtype=bfloat16),
      device_map="cpu"), then save_pretrained(OUT) (the job ftconv replaces).
  nf4_ref.py compare REF OURS
      every tensor of the two folders: same keys, dtypes, shapes and bytes. A quant-state blob whose only
      difference is nested_offset (torch's float32 mean, machine-dependent in its last bit) is reported with the
      absmax bytes it moves, not failed. Exit 1 on any other difference.
  nf4_ref.py generate DIR --prompt TEXT --tokens N [--tokenizer SRC]
      load DIR (a pre-quantized 4-bit folder) on the CPU and print the greedy continuation.
"""
import argparse
import json
import struct
import sys
from pathlib import Path


def load_folder(d: Path):
    """name -> (dtype, shape, bytes) over every safetensors file of a folder."""
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        b = f.read_bytes()
        n = struct.unpack("<Q", b[:8])[0]
        h = json.loads(b[8:8 + n])
        for k, v in h.items():
            if k == "__metadata__":
                continue
            s, e = v["data_offsets"]
            out[k] = (v["dtype"], v["shape"], b[8 + n + s:8 + n + e])
    return out


def f32_hex(x: float) -> str:
    return struct.pack(">f", x).hex()


def cmd_quantize(a):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=a.quant_type,
        bnb_4bit_use_double_quant=bool(a.double_quant),
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(a.src, quantization_config=cfg, device_map="cpu")
    model.save_pretrained(a.out)
    return 0


def cmd_compare(a):
    ref, ours = load_folder(Path(a.ref)), load_folder(Path(a.ours))
    bad = 0
    only_ref, only_ours = sorted(set(ref) - set(ours)), sorted(set(ours) - set(ref))
    for k in only_ref[:10]:
        print(f"missing in ftconv's output: {k}")
    for k in only_ours[:10]:
        print(f"not in the reference: {k}")
    bad += len(only_ref) + len(only_ours)
    offset_notes = []
    moved = {}
    for k in sorted(set(ref) & set(ours)):
        (rd, rs, rb), (od, os_, ob) = ref[k], ours[k]
        if (rd, rs) != (od, os_):
            print(f"{k}: reference {rd} {rs}, ftconv {od} {os_}")
            bad += 1
            continue
        if rb == ob:
            continue
        if ".quant_state.bitsandbytes__" in k:
            rj, oj = json.loads(rb), json.loads(ob)
            ro, oo = rj.pop("nested_offset", None), oj.pop("nested_offset", None)
            if rj == oj and ro is not None and oo is not None:
                offset_notes.append((k, ro, oo))
                continue
            print(f"{k}: quant state differs:\n    reference {rb.decode()}\n    ftconv    {ob.decode()}")
            bad += 1
            continue
        base = k.rsplit(".weight", 1)[0] + ".weight"
        ndiff = sum(x != y for x, y in zip(rb, ob))
        moved.setdefault(base, []).append((k, ndiff, len(rb)))
    # absmax / nested_absmax differences are acceptable only where the offset differs
    noted = {k.split(".quant_state.")[0] for k, _, _ in offset_notes}
    for base, diffs in sorted(moved.items()):
        for k, ndiff, n in diffs:
            ok = base in noted and (k.endswith(".absmax") or k.endswith(".nested_absmax"))
            tag = "moved by the offset" if ok else "DIFFERS"
            print(f"{k}: {ndiff} of {n} bytes differ ({tag})")
            if not ok:
                bad += 1
    for k, ro, oo in offset_notes:
        print(f"{k}: nested_offset {ro!r} (f32 {f32_hex(ro)}) vs ftconv {oo!r} (f32 {f32_hex(oo)})")
    same = len(set(ref) & set(ours))
    print(f"{same} common tensors, {len(offset_notes)} nested offsets differ, {bad} other differences")
    return 1 if bad else 0


def cmd_generate(a):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(a.dir, device_map="cpu")
    try:
        tok = AutoTokenizer.from_pretrained(a.tokenizer or a.dir)
    except Exception as e:  # a folder whose tokenizer transformers cannot load: compare token ids
        print(f"(no tokenizer: {type(e).__name__}; comparing token ids)", file=sys.stderr)
        tok = None
    if tok is not None:
        ids = tok(a.prompt, return_tensors="pt")
    else:
        ids = {"input_ids": torch.tensor([[1, 17, 42, 99, 7, 250]])}
        ids["attention_mask"] = torch.ones_like(ids["input_ids"])
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=a.tokens, do_sample=False)
    new = out[0][ids["input_ids"].shape[1]:]
    sys.stdout.write(tok.decode(new, skip_special_tokens=True) if tok is not None else str(new.tolist()))
    return 0


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quantize")
    q.add_argument("src")
    q.add_argument("out")
    q.add_argument("--quant-type", default="nf4")
    q.add_argument("--double-quant", type=int, default=1)
    c = sub.add_parser("compare")
    c.add_argument("ref")
    c.add_argument("ours")
    g = sub.add_parser("generate")
    g.add_argument("dir")
    g.add_argument("--prompt", default="The capital of France is")
    g.add_argument("--tokens", type=int, default=24)
    g.add_argument("--tokenizer", help="folder to take the tokenizer from (default: DIR)")
    a = p.parse_args()
    return {"quantize": cmd_quantize, "compare": cmd_compare, "generate": cmd_generate}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
