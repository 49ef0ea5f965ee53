#!/usr/bin/env python3
"""Regenerate fixtures/tiny-llama: a small LlamaForCausalLM checkpoint (bf16, 2 shards + index,
as transformers' save_pretrained lays them out) with a real SentencePiece tokenizer trained by
the `sentencepiece` package (the same library llama.cpp's converter reads it with).

Weights are deterministic (Python's random with a fixed seed, N(0, 0.02) rounded to bf16), so
the committed files can be rebuilt bit for bit:  python3 scripts/make_fixture.py fixtures/tiny-llama
Requires: pip install sentencepiece==0.2.3
"""
import json, os, random, struct, sys, tempfile

out = sys.argv[1] if len(sys.argv) > 1 else "fixtures/tiny-llama"
os.makedirs(out, exist_ok=True)

HIDDEN, LAYERS, HEADS, KV, FFN, VOCAB = 256, 2, 4, 2, 512, 512

CORPUS = """The quick brown fox jumps over the lazy dog.
A fine-tuned model is converted, quantized and packaged for deployment.
Hello! How can I help you today? I would like a cup of tea, please.
The capital of France is Paris. The capital of Italy is Rome.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14 2.71.
Large language models predict the next token from the previous tokens.
Quantization stores weights with fewer bits: four, five, six or eight.
Please answer briefly and politely. Thank you very much for your question.
""" * 40

def train_tokenizer():
    import sentencepiece as spm
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as d:
        # relative paths: the trainer records its input path inside the model
        os.chdir(d)
        txt = "corpus.txt"
        with open(txt, "w", encoding="utf-8") as f:
            f.write(CORPUS)
        prefix = "tok"
        spm.SentencePieceTrainer.train(
            input=txt, model_prefix=prefix, vocab_size=VOCAB, model_type="bpe",
            byte_fallback=True, character_coverage=1.0, num_threads=1,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            user_defined_symbols=["<|im_start|>", "<|im_end|>"],
            split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
            minloglevel=2)
        with open(prefix + ".model", "rb") as f:
            data = f.read()
        os.chdir(here)
    with open(os.path.join(out, "tokenizer.model"), "wb") as f:
        f.write(data)

def bf16_bytes(values):
    b = bytearray()
    for v in values:
        bits = struct.unpack("<I", struct.pack("<f", v))[0]
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        b += struct.pack("<H", bits)
    return bytes(b)

def tensors():
    rng = random.Random(20261122)
    def normal(n, std=0.02):
        return [rng.gauss(0.0, std) for _ in range(n)]
    def norm(n):
        return [1.0 + rng.gauss(0.0, 0.05) for _ in range(n)]
    t = {}
    t["model.embed_tokens.weight"] = ([VOCAB, HIDDEN], normal(VOCAB * HIDDEN))
    hd = HIDDEN // HEADS
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = ([HIDDEN], norm(HIDDEN))
        t[p + "self_attn.q_proj.weight"] = ([HEADS * hd, HIDDEN], normal(HEADS * hd * HIDDEN))
        t[p + "self_attn.k_proj.weight"] = ([KV * hd, HIDDEN], normal(KV * hd * HIDDEN))
        t[p + "self_attn.v_proj.weight"] = ([KV * hd, HIDDEN], normal(KV * hd * HIDDEN))
        t[p + "self_attn.o_proj.weight"] = ([HIDDEN, HEADS * hd], normal(HIDDEN * HEADS * hd))
        t[p + "post_attention_layernorm.weight"] = ([HIDDEN], norm(HIDDEN))
        t[p + "mlp.gate_proj.weight"] = ([FFN, HIDDEN], normal(FFN * HIDDEN))
        t[p + "mlp.up_proj.weight"] = ([FFN, HIDDEN], normal(FFN * HIDDEN))
        t[p + "mlp.down_proj.weight"] = ([HIDDEN, FFN], normal(HIDDEN * FFN))
    t["model.norm.weight"] = ([HIDDEN], norm(HIDDEN))
    t["lm_head.weight"] = ([VOCAB, HIDDEN], normal(VOCAB * HIDDEN))
    return t

def write_safetensors(path, items):
    # safetensors' own layout: header JSON (tensors sorted by name for equal dtypes), padded
    # with spaces to a multiple of 8, then the data in header order
    names = sorted(items)
    header = {"__metadata__": {"format": "pt"}}
    blobs, off = [], 0
    for n in names:
        shape, vals = items[n]
        data = bf16_bytes(vals)
        header[n] = {"dtype": "BF16", "shape": shape, "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    return off

train_tokenizer()
t = tensors()
names = list(t)
half = names.index("model.layers.1.input_layernorm.weight")
shards = [dict((n, t[n]) for n in names[:half]), dict((n, t[n]) for n in names[half:])]
weight_map, total = {}, 0
for k, s in enumerate(shards):
    fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
    total += write_safetensors(os.path.join(out, fname), s)
    for n in s:
        weight_map[n] = fname
with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    f.write("\n")

config = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS, "num_key_value_heads": KV, "head_dim": HIDDEN // HEADS,
    "vocab_size": VOCAB, "max_position_embeddings": 2048, "rms_norm_eps": 1e-05,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    "dtype": "bfloat16", "transformers_version": "5.23.0",
}
with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
    f.write("\n")
with open(os.path.join(out, "generation_config.json"), "w") as f:
    json.dump({"bos_token_id": 1, "eos_token_id": [2, 4], "do_sample": True, "temperature": 0.7,
               "top_p": 0.9, "top_k": 40, "repetition_penalty": 1.1,
               "transformers_version": "5.23.0"}, f, indent=2)
    f.write("\n")
chat_template = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
tok_config = {
    "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "<|im_end|>",
    "unk_token": "<unk>", "pad_token": None, "clean_up_tokenization_spaces": False,
    "legacy": False, "model_max_length": 2048, "tokenizer_class": "LlamaTokenizer",
    "added_tokens_decoder": {
        "0": {"content": "<unk>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True},
        "1": {"content": "<s>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True},
        "2": {"content": "</s>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True},
        "3": {"content": "<|im_start|>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True},
        "4": {"content": "<|im_end|>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True},
    },
    "chat_template": chat_template,
}
with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
    json.dump(tok_config, f, indent=2)
    f.write("\n")
with open(os.path.join(out, "special_tokens_map.json"), "w") as f:
    json.dump({"bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<unk>"}, f, indent=2)
    f.write("\n")
print("wrote", out)
