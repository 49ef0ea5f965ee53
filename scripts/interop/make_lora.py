"""Make a PEFT LoRA adapter on an HF model with PEFT itself (B drawn non-zero so it changes outputs).

    make_lora.py BASE_DIR OUT_DIR [--rslora] [--embed] [--targets a,b,c]
"""
import sys

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

base, out = sys.argv[1], sys.argv[2]
argv = sys.argv[3:]
targets = None
if "--targets" in argv:
    i = argv.index("--targets")
    targets = argv[i + 1].split(",")
    del argv[i:i + 2]
flags = set(argv)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
targets = targets or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
if "--embed" in flags:
    targets.append("embed_tokens")
cfg = LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM",
                 use_rslora="--rslora" in flags, lora_dropout=0.0)
pm = get_peft_model(model, cfg)
with torch.no_grad():
    for name, p in pm.named_parameters():
        if "lora_B" in name or "lora_embedding_B" in name:
            p.normal_(0.0, 0.02)
pm.save_pretrained(out)
print(f"make_lora: {out} ({len([n for n, _ in pm.named_parameters() if 'lora_' in n])} LoRA tensors)")
