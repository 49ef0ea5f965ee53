"""Reference tokenization of fine-tuning rows (what `ftconv finetune` must produce), from the transformers
tokenizer and its chat template, following TRL's SFTTrainer rules (nf4-peft.md 5.6) and decisions.md
"Fine-tuning":

* messages (and ShareGPT `conversations`, from human/gpt/system -> user/assistant/system, value -> content;
  and Alpaca rows, one user turn = instruction [+ blank line + input when non-empty] and one assistant turn =
  output): input_ids = the rendered conversation; loss on every assistant turn, content and end-of-turn
  marker. Turn i's span is the characters [len(render(msgs[:i], add_generation_prompt=True)),
  len(render(msgs[:i+1]))) of the rendering; a token is trained when its characters overlap a span
  (transformers' return_assistant_tokens_mask rule, as src/train/data.rs). Where that differs from taking
  the same span in token counts of the separately tokenized prefixes, a warning says so (never for ChatML).
* prompt/completion strings: ids = tokenize(prompt + completion) + EOS; the loss starts at the common prefix
  of tokenize(prompt) and tokenize(prompt + completion).
* conversational prompt/completion: ids = render(prompt + completion); the loss starts at the common prefix of
  render(prompt, add_generation_prompt=True) and the whole.
* text: tokenize(text) (+ EOS when it does not end with it); loss on every token.
* --train-on-prompt: loss on every token. Truncation keeps the first max_seq_len tokens.

Labels are unshifted (transformers' `labels`), -100 where no loss.
"""
import json

IGNORE = -100


def row_format(row):
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row:
        return "alpaca-input" if row.get("input") else "alpaca"
    if "prompt" in row:
        return "prompt-completion" if isinstance(row["prompt"], str) else "conv-prompt-completion"
    if "text" in row:
        return "text"
    raise ValueError(f"unknown row format: keys {sorted(row)}")


SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def to_messages(row):
    fmt = row_format(row)
    if fmt == "messages":
        return [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    if fmt == "sharegpt":
        return [{"role": SHAREGPT_ROLES.get(m["from"], m["from"]), "content": m["value"]}
                for m in row["conversations"]]
    if fmt.startswith("alpaca"):
        user = row["instruction"]
        if row.get("input"):
            user = user + "\n\n" + row["input"]
        return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
    return None


class Encoder:
    def __init__(self, tok):
        self.tok = tok
        self.eos = tok.eos_token_id
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def render(self, msgs, gen):
        return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    def chat_ids(self, msgs, gen):
        # apply_chat_template(tokenize=True) tokenizes the rendered text without adding special tokens
        return list(self.tok(self.render(msgs, gen), add_special_tokens=False)["input_ids"])

    def text_ids(self, text):
        return list(self.tok(text)["input_ids"])

    def encode(self, row, train_on_prompt=False, max_seq_len=None):
        """-> (input_ids, labels, warnings)"""
        fmt = row_format(row)
        warn = []
        msgs = to_messages(row)
        if msgs is not None:
            full = self.render(msgs, False)
            enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
            labels = [IGNORE] * len(ids)
            by_count = [IGNORE] * len(ids)
            for i, m in enumerate(msgs):
                if m["role"] != "assistant":
                    continue
                pre, upto = self.render(msgs[:i], True), self.render(msgs[: i + 1], False)
                if not (full.startswith(pre) and full.startswith(upto)):
                    warn.append(f"turn {i}: the template is not prefix-stable")
                # a token is trained when its characters overlap the span (return_assistant_tokens_mask)
                a, b = len(pre), len(upto)
                for k, (s, e) in enumerate(offsets):
                    if s < b and e > a:
                        labels[k] = ids[k]
                # the same by token counts of the separately tokenized prefixes
                s, e = len(self.chat_ids(msgs[:i], True)), len(self.chat_ids(msgs[: i + 1], False))
                by_count[s:e] = ids[s:e]
            if by_count != labels:
                warn.append("character-overlap and token-count assistant spans differ (character overlap used)")
        elif fmt == "prompt-completion":
            p = self.text_ids(row["prompt"])
            ids = self.text_ids(row["prompt"] + row["completion"])
            k = common_prefix(p, ids)
            if k != len(p):
                warn.append("prompt tokens are not a prefix of prompt+completion tokens")
            if not ids or ids[-1] != self.eos:
                ids = ids + [self.eos]
            labels = [IGNORE] * k + ids[k:]
        elif fmt == "conv-prompt-completion":
            p = self.chat_ids(row["prompt"], True)
            ids = self.chat_ids(row["prompt"] + row["completion"], False)
            k = common_prefix(p, ids)
            if k != len(p):
                warn.append("prompt tokens are not a prefix of prompt+completion tokens")
            labels = [IGNORE] * k + ids[k:]
        else:  # text
            ids = self.text_ids(row["text"])
            if not ids or ids[-1] != self.eos:
                ids = ids + [self.eos]
            labels = list(ids)
        if train_on_prompt:
            labels = list(ids)
        if max_seq_len is not None:
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
        return ids, labels, warn


def common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def load_rows(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    return rows


def collate(samples, pad_id):
    """Right-padded batch tensors (torch): input_ids, labels, attention_mask."""
    import torch

    t = max(len(ids) for ids, _ in samples)
    ids = torch.full((len(samples), t), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), t), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(samples), t), dtype=torch.long)
    for i, (a, b) in enumerate(samples):
        ids[i, : len(a)] = torch.tensor(a)
        labels[i, : len(b)] = torch.tensor(b)
        mask[i, : len(a)] = 1
    return ids, labels, mask
