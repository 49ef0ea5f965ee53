"""PEFT + torch CPU baseline for `ftconv finetune`: the same LoRA fine-tune, timed, on an f32 base.

    peft_train_bench.py BASE --data TRAIN.jsonl [--eval EVAL.jsonl] [--lr 2e-3 --max-steps 36 ...]
        [--ask QUESTION --expect TEXT] [--out ADAPTER_DIR] [--json RESULT.json]

Recipe (ftconv's defaults and decisions.md): LoRA r 16 / alpha 32 / dropout 0.05 on q,k,v,o,gate,up,down;
rows tokenized by ft_data.py (chat template, loss on assistant turns / completions only), shuffled once per
epoch (seeded), right-padded micro-batches of --batch-size; token-mean cross-entropy (transformers
ForCausalLMLoss); torch AdamW (0.9, 0.999, 1e-8, weight decay 0) on the LoRA weights; global-norm clipping;
linear decay to 0 at the last step (or constant / cosine), optional linear warm-up. No gradient
checkpointing, no autocast: plain f32 on CPU with --threads torch threads.

Reports per-step train loss, eval loss (token mean over the eval set) before the first and after the last
step, training throughput = non-pad tokens of the training micro-batches / seconds spent in forward +
backward + optimizer steps (evals excluded), and the process's peak RSS (ru_maxrss). With --ask, greedy-
generates the answer to QUESTION (chat template) and checks it contains --expect.
"""
import argparse
import json
import math
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ft_data  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base")
    ap.add_argument("--data", required=True)
    ap.add_argument("--eval")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--lr-schedule", choices=["constant", "linear", "cosine"], default="linear")
    ap.add_argument("--warmup-steps", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-steps", type=int)
    ap.add_argument("--eval-every", type=int, default=0, help="also eval every N steps (time not counted)")
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--base-dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--ask")
    ap.add_argument("--expect")
    ap.add_argument("--out")
    ap.add_argument("--json")
    ap.add_argument("--log", help="also write the log as ftconv's train_log.jsonl records")
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_load = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(a.base)
    enc = ft_data.Encoder(tok)
    dt = {"f32": torch.float32, "bf16": torch.bfloat16}[a.base_dtype]
    base = AutoModelForCausalLM.from_pretrained(a.base, dtype=dt, attn_implementation="sdpa")
    cfg = LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules=TARGETS,
                     task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    for n, p in model.named_parameters():  # LoRA weights in f32 whatever the base dtype
        if p.requires_grad:
            p.data = p.data.float()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    train = [enc.encode(r, False, a.max_seq_len)[:2] for r in ft_data.load_rows(a.data)]
    evals = [enc.encode(r, False, a.max_seq_len)[:2] for r in ft_data.load_rows(a.eval)] if a.eval else []
    steps_per_epoch = math.ceil(len(train) / a.batch_size)
    total = a.max_steps if a.max_steps else steps_per_epoch * a.epochs
    print(f"bench: {len(train)} train rows, {len(evals)} eval rows, {trainable} trainable parameters, "
          f"{total} steps of {a.batch_size}, lr {a.lr:g} {a.lr_schedule}, {a.threads} threads "
          f"(loaded in {time.perf_counter() - t_load:.1f}s, RSS {rss_mb():.0f} MB)", flush=True)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    def lr_at(step):  # transformers' schedules; step = 0-based index of the optimizer step about to be taken
        if step < a.warmup_steps:
            return a.lr * step / a.warmup_steps
        if a.lr_schedule == "constant":
            return a.lr
        frac = (step - a.warmup_steps) / max(1, total - a.warmup_steps)
        if a.lr_schedule == "linear":
            return a.lr * max(0.0, 1.0 - frac)
        return a.lr * 0.5 * (1.0 + math.cos(math.pi * frac))

    def eval_loss():
        if not evals:
            return None
        model.eval()
        tot, n = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(evals), a.batch_size):
                ids, labels, mask = ft_data.collate(evals[i:i + a.batch_size], enc.pad)
                logits = model(input_ids=ids, attention_mask=mask).logits.float()
                sl = labels[:, 1:]
                lo = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), sl.reshape(-1),
                                                       ignore_index=-100, reduction="sum")
                tot += lo.item()
                n += int((sl != -100).sum())
        model.train()
        return tot / n

    log = []
    e0 = eval_loss()
    print(f"eval step 0: {e0:.4f}" if e0 is not None else "no eval", flush=True)
    log.append({"type": "eval", "step": 0, "eval_loss": e0})
    gen = torch.Generator().manual_seed(a.seed)
    order, epoch = [], 0
    train_s, train_cpu_s, train_tokens = 0.0, 0.0, 0
    model.train()
    for step in range(total):
        if not order:  # a new epoch: reshuffle (the last batch of an epoch may be short)
            order = torch.randperm(len(train), generator=gen).tolist()
            epoch += 1
        batch_idx, order = order[:a.batch_size], order[a.batch_size:]
        ids, labels, mask = ft_data.collate([train[i] for i in batch_idx], enc.pad)
        t0, c0 = time.perf_counter(), time.process_time()
        lr = lr_at(step)
        for g in opt.param_groups:
            g["lr"] = lr
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, a.max_grad_norm if a.max_grad_norm > 0 else float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt_s = time.perf_counter() - t0
        train_cpu_s += time.process_time() - c0
        ntok = int(mask.sum())
        train_s += dt_s
        train_tokens += ntok
        rec = {"type": "train", "step": step + 1, "epoch": epoch, "loss": out.loss.item(), "lr": lr,
               "grad_norm": float(gn), "tokens": ntok, "tokens_per_s": ntok / dt_s, "elapsed_s": train_s + dt_s}
        log.append(rec)
        print(f"step {step + 1}/{total} epoch {epoch} loss {rec['loss']:.4f} lr {lr:.3g} gnorm {rec['grad_norm']:.3f} "
              f"{ntok} tok {ntok / dt_s:.1f} tok/s", flush=True)
        if a.eval_every and (step + 1) % a.eval_every == 0 and step + 1 < total:
            el = eval_loss()
            log.append({"type": "eval", "step": step + 1, "eval_loss": el})
            print(f"eval step {step + 1}: {el:.4f} (x{e0 / el:.2f} lower)", flush=True)
    e1 = eval_loss()
    log.append({"type": "eval", "step": total, "eval_loss": e1})
    res = {"steps": total, "train_tokens": train_tokens, "train_s": train_s, "tokens_per_s": train_tokens / train_s,
           "train_cpu_s": train_cpu_s, "tokens_per_cpu_s": train_tokens / train_cpu_s,
           "loadavg_end": os.getloadavg(),
           "peak_rss_mb": rss_mb(), "eval_loss_0": e0, "eval_loss_end": e1, "lr": a.lr, "threads": a.threads,
           "batch_size": a.batch_size, "rank": a.rank, "alpha": a.alpha, "dropout": a.dropout,
           "schedule": a.lr_schedule, "base_dtype": a.base_dtype,
           "torch": torch.__version__}
    if e1 is not None:
        res["eval_drop"] = e0 / e1
        print(f"eval end: {e1:.4f} (x{e0 / e1:.2f} lower)", flush=True)
    print(f"PEFT baseline: {train_tokens} train tokens in {train_s:.1f}s = {res['tokens_per_s']:.1f} tokens/s, "
          f"peak RSS {res['peak_rss_mb']:.0f} MB; {train_cpu_s:.1f} CPU-s = {res['tokens_per_cpu_s']:.1f} tokens per "
          f"CPU-second (x{a.threads} threads = {res['tokens_per_cpu_s'] * a.threads:.1f} tokens/s on {a.threads} idle "
          f"cores); load average now {os.getloadavg()[0]:.1f}", flush=True)
    log.append({"type": "done", "steps": total, "train_tokens": train_tokens, "tokens_per_s": res["tokens_per_s"],
                "peak_rss_mb": round(res["peak_rss_mb"])})
    if a.log:
        with open(a.log, "w") as f:
            for r in log:
                f.write(json.dumps(r) + "\n")
    if a.out:
        model.save_pretrained(a.out)
    if a.ask:
        model.eval()
        prompt = tok.apply_chat_template([{"role": "user", "content": a.ask}], tokenize=False,
                                         add_generation_prompt=True)
        x = tok(prompt, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            y = model.generate(**x, max_new_tokens=24, do_sample=False, pad_token_id=enc.pad,
                               eos_token_id=tok.eos_token_id)
        answer = tok.decode(y[0, x["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        res["answer"] = answer
        ok = a.expect is None or a.expect in answer
        res["answer_ok"] = ok
        print(f"answer to {a.ask!r}: {answer!r}" + (f" ({'contains' if ok else 'LACKS'} {a.expect!r})"
                                                    if a.expect else ""), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"result": res, "log": log}, f, indent=1)


if __name__ == "__main__":
    main()
