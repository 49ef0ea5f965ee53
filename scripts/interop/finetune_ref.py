"""PEFT / transformers side of the interop section "finetune" (scripts/interop/finetune.sh).

    finetune_ref.py make-adapter BASE OUT [--zero-b] [--seed S]
        PEFT LoRA r 16 / alpha 32 on all linear projections, lora_dropout 0, PEFT's own seeded init; B drawn
        from N(0, 0.02) unless --zero-b (then the adapter is PEFT's no-op init).
    finetune_ref.py parity BASE PROBE --adapter DIR [--plain] [--name NAME]
        ftconv's probe (input_ids, labels, attention_mask, logits, loss, grad.<key>) against transformers +
        PeftModel.from_pretrained on the f32 base: logits at attention_mask=1 positions, the loss, every LoRA
        gradient, each within ||ours - ref|| / ||ref|| <= 1e-4. --plain: the logits reference is the base model
        without PEFT (for a B = 0 adapter). When gradients fail, the same batch is run in float64 too and both
        ours and PEFT's f32 gradients are compared with it (ours vs the tolerance, or the tolerance itself).
    finetune_ref.py data BASE DATA PROBE [--train-on-prompt] [--max-seq-len N] [--name NAME]
        the probe's input_ids / labels / attention_mask equal the reference tokenization (ft_data.py), row by row.
    finetune_ref.py log LOG [--min-drop 5]
        the training log is well formed and the final eval loss <= step-0 eval loss / min-drop.
    finetune_ref.py generate BASE ADAPTER QUESTION --expect TEXT
        greedy generation (chat template, f32 base + PEFT adapter) contains TEXT.
    finetune_ref.py chat-prompt BASE QUESTION
        prints the chat-formatted prompt (add_generation_prompt=True) for llama-completion.

Prints `RESULT NAME PASS|FAIL message` and `DETAIL NAME text` lines (read by finetune.sh); exit status 0.
"""
import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ft_data  # noqa: E402

TOL = 1e-4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def result(name, ok, msg):
    print(f"RESULT {name} {'PASS' if ok else 'FAIL'} {msg}", flush=True)


def detail(name, msg):
    print(f"DETAIL {name} {msg}", flush=True)


def torch_setup():
    import torch

    torch.set_num_threads(int(os.environ.get("FT_THREADS", "2")))
    return torch


def load_base(path, dtype="f32"):
    torch = torch_setup()
    from transformers import AutoModelForCausalLM

    dt = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype]
    m = AutoModelForCausalLM.from_pretrained(path, dtype=dt, attn_implementation="eager")
    m.eval()
    return m


def peft_key(name):
    # named_parameters: base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight
    return name.replace(".default.", ".")


def rel(ours, ref):
    ref_n = ref.double().norm().item()
    d = (ours.double() - ref.double()).norm().item()
    return d / ref_n if ref_n > 0 else (0.0 if d == 0 else math.inf), d, ref_n


# ------------------------------------------------------------------------------------------------ make-adapter
def cmd_make_adapter(a):
    torch = torch_setup()
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(a.seed)
    model = load_base(a.base)
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM", lora_dropout=0.0)
    pm = get_peft_model(model, cfg)
    if not a.zero_b:
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.02)
    pm.save_pretrained(a.out)
    n = len([n for n, _ in pm.named_parameters() if "lora_" in n])
    print(f"make-adapter: {a.out} ({n} LoRA tensors, B {'= 0' if a.zero_b else '~ N(0, 0.02)'})")


# ------------------------------------------------------------------------------------------------ parity
def causal_lm_loss_f64(logits, labels):
    """transformers' ForCausalLMLoss (shift by one, ignore -100, mean over the targets) in float64."""
    import torch

    lab = labels[:, 1:]
    x = logits[:, :-1].double()
    lsm = torch.log_softmax(x, -1).gather(-1, lab.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    keep = lab != -100
    return -(lsm * keep).sum() / keep.sum()


def cmd_parity(a):
    torch = torch_setup()
    from peft import PeftModel
    from safetensors.torch import load_file

    name = a.name
    P = load_file(a.probe)
    need = ["input_ids", "labels", "attention_mask", "logits", "loss"]
    miss = [k for k in need if k not in P]
    if miss:
        result(name, False, f"probe lacks {miss} (has {sorted(k for k in P if not k.startswith('grad.'))})")
        return
    ids, labels, mask = P["input_ids"].long(), P["labels"].long(), P["attention_mask"].long()
    logits = P["logits"].float()
    b, t = ids.shape
    if labels.shape != ids.shape or mask.shape != ids.shape or tuple(logits.shape[:2]) != (b, t):
        result(name, False, f"probe shapes disagree: input_ids {tuple(ids.shape)} labels {tuple(labels.shape)} "
               f"attention_mask {tuple(mask.shape)} logits {tuple(logits.shape)}")
        return
    detail(name, f"batch {b} x {t}, {int(mask.sum())} tokens, {int((labels[:, 1:] != -100).sum())} loss targets")

    base = load_base(a.base)
    if a.plain:
        with torch.no_grad():
            ref_plain = base(input_ids=ids, attention_mask=mask).logits.float()
    pm = PeftModel.from_pretrained(base, a.adapter, is_trainable=True)
    pm.eval()  # no dropout (the adapter's lora_dropout is 0 anyway); gradients still flow
    # transformers' built-in loss (ForCausalLMLoss) runs torch's float32 cross-entropy, whose
    # log-sum-exp over the 49k vocabulary is off by ~1e-5 (measured: the built-in loss of the
    # float64 model differs from a float64 cross-entropy of its own logits by 1.5e-5), and the
    # softmax − one-hot cancellation of confident tokens magnifies that into ~1e-4 gradient
    # differences. The reference is therefore PEFT's model and autograd with the same causal-LM
    # loss taken in float64 from its logits; the built-in loss is reported alongside.
    out = pm(input_ids=ids, attention_mask=mask)
    out.loss = causal_lm_loss_f64(out.logits, labels)
    out.loss.backward()
    with torch.no_grad():
        builtin = pm(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    detail(name, f"transformers' built-in float32 loss {builtin:.7f}, float64 cross-entropy of the same logits "
           f"{out.loss.item():.7f}")
    ref_logits = ref_plain if a.plain else out.logits.detach().float()

    sel = mask.bool()
    r, d, n = rel(logits[sel], ref_logits[sel])
    result(f"{name}-logits", r <= TOL,
           f"logits at attention_mask=1 vs {'the plain base model' if a.plain else 'PEFT'}: "
           f"rel {r:.3g} (tol {TOL:g}), max abs diff {(logits[sel] - ref_logits[sel]).abs().max().item():.3g}")

    ours_loss = P["loss"].float().reshape(-1)
    if ours_loss.numel() != 1:
        result(f"{name}-loss", False, f"loss has {ours_loss.numel()} elements")
    else:
        ol, rl = ours_loss.item(), out.loss.item()
        rr = abs(ol - rl) / abs(rl)
        result(f"{name}-loss", rr <= TOL, f"loss {ol:.7f} vs PEFT {rl:.7f}: rel {rr:.3g}")

    grads = {peft_key(k): p.grad for k, p in pm.named_parameters() if "lora_" in k}
    missing = sorted(k for k in grads if f"grad.{k}" not in P)
    extra = sorted(k[5:] for k in P if k.startswith("grad.") and k[5:] not in grads)
    total_ref = math.sqrt(sum(float(g.double().norm() ** 2) for g in grads.values() if g is not None))
    worst, worst_k, bad, worse, zero_ok = 0.0, None, [], [], 0
    for k, g in sorted(grads.items()):
        if f"grad.{k}" not in P:
            continue
        ours = P[f"grad.{k}"].float()
        if g is None:
            g = torch.zeros_like(ours)
        if tuple(ours.shape) != tuple(g.shape):
            bad.append(f"{k}: shape {tuple(ours.shape)} vs {tuple(g.shape)}")
            continue
        rr, dd, nn = rel(ours, g)
        if nn == 0:  # e.g. lora_A with B = 0: the gradient is exactly zero; ours must be ~0
            ok = dd <= 1e-6 * max(total_ref, 1e-30)
            zero_ok += ok
            if not ok:
                bad.append(f"{k}: reference gradient is 0, ours has norm {dd:.3g}")
            continue
        if rr > worst:
            worst, worst_k = rr, k
        if rr > TOL:
            worse.append((rr, f"{k}: rel {rr:.3g}"))
    bad += [m for _, m in sorted(worse, reverse=True)]  # worst first
    msg = (f"{len(grads) - len(missing)} LoRA gradients vs PEFT loss.backward(): worst rel {worst:.3g} ({worst_k})"
           + (f", {zero_ok} exactly-zero references matched" if zero_ok else ""))
    if missing:
        bad.insert(0, f"probe lacks {len(missing)} gradients, e.g. grad.{missing[0]}")
    if extra:
        bad.insert(0, f"probe has {len(extra)} gradients PEFT does not, e.g. grad.{extra[0]}")
    result(f"{name}-grads", not bad, msg + (f"; {len(bad)} problems" if bad else ""))
    for x in bad[:10]:
        detail(f"{name}-grads", x)
    if worse:  # is it ours or the tolerance? the same in float64 says how far PEFT's own f32 result is
        f64_check(a, P, ids, labels, mask, {k: g for k, g in grads.items()})


def f64_check(a, P, ids, labels, mask, g32):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(a.base, dtype=torch.float64, attn_implementation="eager")
    pm = PeftModel.from_pretrained(m, a.adapter, is_trainable=True)
    pm.eval()
    out = pm(input_ids=ids, attention_mask=mask)
    out.loss = causal_lm_loss_f64(out.logits, labels)
    out.loss.backward()
    g64 = {peft_key(k): p.grad for k, p in pm.named_parameters() if "lora_" in k}
    ours = [rel(P[f"grad.{k}"], g)[0] for k, g in g64.items() if f"grad.{k}" in P and g.norm() > 0]
    ref = [rel(g32[k], g)[0] for k, g in g64.items() if g32.get(k) is not None and g.norm() > 0]
    l64 = out.loss.item()
    detail(f"{a.name}-grads", f"vs a float64 PEFT run: ours worst rel {max(ours):.3g} (median {sorted(ours)[len(ours) // 2]:.3g}), "
           f"PEFT f32 worst {max(ref):.3g} (median {sorted(ref)[len(ref) // 2]:.3g}); loss: ours rel "
           f"{abs(P['loss'].double().item() - l64) / l64:.3g}")


# ------------------------------------------------------------------------------------------------ data
def cmd_data(a):
    torch_setup()
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.base)
    enc = ft_data.Encoder(tok)
    rows = ft_data.load_rows(a.data)
    P = load_file(a.probe)
    ids, labels, mask = P["input_ids"].long(), P["labels"].long(), P["attention_mask"].long()
    if ids.shape[0] != len(rows):
        result(a.name, False, f"probe has {ids.shape[0]} rows, {a.data} has {len(rows)} (use --batch-size {len(rows)})")
        return
    for i, row in enumerate(rows):
        fmt = ft_data.row_format(row)
        rname = f"{a.name}-row{i}-{fmt}"
        ref_ids, ref_labels, warn = enc.encode(row, a.train_on_prompt, a.max_seq_len)
        for w in warn:
            detail(rname, f"reference warning: {w}")
        n = int(mask[i].sum())
        problems = []
        if mask[i].tolist() != [1] * n + [0] * (mask.shape[1] - n):
            problems.append("attention_mask is not right-padded (zeros before ones)")
        got_ids = ids[i, :n].tolist()
        got_labels = labels[i, :n].tolist()
        if n != len(ref_ids):
            problems.append(f"{n} tokens, reference {len(ref_ids)}")
        if got_ids != ref_ids:
            k = ft_data.common_prefix(got_ids, ref_ids)
            problems.append(f"input_ids differ from position {k}: ours {tok.decode(got_ids[k:k + 8])!r} "
                            f"ref {tok.decode(ref_ids[k:k + 8])!r}")
        elif got_labels != ref_labels:
            k = next(j for j, (x, y) in enumerate(zip(got_labels, ref_labels)) if x != y)
            problems.append(f"labels differ from position {k} ({tok.decode(ref_ids[k:k + 6])!r}): "
                            f"ours {got_labels[k:k + 6]} ref {ref_labels[k:k + 6]}")
        if (labels[i, n:] != -100).any():
            problems.append("labels on padding positions are not -100")
        trained = sum(1 for x in ref_labels if x != -100)
        if problems:
            result(rname, False, "; ".join(problems))
            detail(rname, f"reference trained text: {tok.decode([x for x in ref_labels if x != -100])!r}")
        else:
            result(rname, True, f"{n} tokens, {trained} trained, identical input_ids and labels")


# ------------------------------------------------------------------------------------------------ log
def cmd_log(a):
    name = a.name
    recs = []
    with open(a.log) as f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError as e:
                result(name, False, f"line {ln} is not JSON: {e}")
                return
    train = [r for r in recs if r.get("type") == "train"]
    evals = [r for r in recs if r.get("type") == "eval"]
    done = [r for r in recs if r.get("type") == "done"]
    problems = []
    if not train:
        problems.append("no train records")
    for r in train:
        missing = [k for k in ("step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s")
                   if k not in r]
        if missing:
            problems.append(f"train record lacks {missing}")
            break
    if not done or recs[-1].get("type") != "done":
        problems.append("the last record is not type done")
    if len(evals) < 2 or evals[0].get("step") != 0:
        problems.append(f"expected an eval at step 0 and one at the end, got steps {[e.get('step') for e in evals]}")
    if problems:
        result(name, False, "; ".join(problems))
        return
    e0, e1 = evals[0]["eval_loss"], evals[-1]["eval_loss"]
    d = done[-1]
    detail(name, "eval loss by step: " + ", ".join(f"{e['step']}:{e['eval_loss']:.3f}" for e in evals))
    detail(name, "train loss by step: " + ", ".join(f"{r['step']}:{r['loss']:.3f}" for r in train))
    detail(name, f"done: {json.dumps(d)}")
    ok = e1 <= e0 / a.min_drop and all(math.isfinite(r["loss"]) for r in train)
    result(name, ok, f"eval loss {e0:.4f} -> {e1:.4f} (x{e0 / max(e1, 1e-12):.1f}, need >= x{a.min_drop:g}) "
           f"in {d.get('steps')} steps; {d.get('tokens_per_s', float('nan')):.1f} train tokens/s, "
           f"peak RSS {float(d.get('peak_rss_mb', float('nan'))):.0f} MB")


# ------------------------------------------------------------------------------------------------ generate
def cmd_generate(a):
    torch = torch_setup()
    from peft import PeftModel
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.base)
    base = load_base(a.base, a.dtype)
    pm = PeftModel.from_pretrained(base, a.adapter)
    pm.eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": a.question}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = pm.generate(**ids, max_new_tokens=a.max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    result(a.name, a.expect in text, f"PEFT ({a.dtype} base) greedy answer to {a.question!r}: {text.strip()!r} "
           f"(expect {a.expect!r})")


def cmd_chat_prompt(a):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.base)
    sys.stdout.write(tok.apply_chat_template([{"role": "user", "content": a.question}], tokenize=False,
                                             add_generation_prompt=True))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sp = ap.add_subparsers(dest="cmd", required=True)
    p = sp.add_parser("make-adapter")
    p.add_argument("base")
    p.add_argument("out")
    p.add_argument("--zero-b", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p = sp.add_parser("parity")
    p.add_argument("base")
    p.add_argument("probe")
    p.add_argument("--adapter", required=True)
    p.add_argument("--plain", action="store_true")
    p.add_argument("--name", default="parity")
    p = sp.add_parser("data")
    p.add_argument("base")
    p.add_argument("data")
    p.add_argument("probe")
    p.add_argument("--train-on-prompt", action="store_true")
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--name", default="data")
    p = sp.add_parser("log")
    p.add_argument("log")
    p.add_argument("--min-drop", type=float, default=5.0)
    p.add_argument("--name", default="learning")
    p = sp.add_parser("generate")
    p.add_argument("base")
    p.add_argument("adapter")
    p.add_argument("question")
    p.add_argument("--expect", required=True)
    p.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--name", default="generate")
    p = sp.add_parser("chat-prompt")
    p.add_argument("base")
    p.add_argument("question")
    a = ap.parse_args()
    {"make-adapter": cmd_make_adapter, "parity": cmd_parity, "data": cmd_data, "log": cmd_log,
     "generate": cmd_generate, "chat-prompt": cmd_chat_prompt}[a.cmd.replace("_", "-")](a)


if __name__ == "__main__":
    main()
