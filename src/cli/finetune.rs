//! `ftconv finetune BASE --data train.jsonl -o ADAPTER`: QLoRA fine-tuning → a PEFT LoRA adapter.

use clap::ValueEnum;
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BaseDtype {
    /// Frozen base linears in NF4 with double quantization (QLoRA); the rest f32.
    Nf4,
    /// Frozen base weights rounded to bf16, computed in f32 (plain LoRA).
    Bf16,
    /// Frozen base weights in f32 (plain LoRA; the parity checks use this).
    F32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Schedule {
    /// Constant learning rate (after the linear warm-up when --warmup-steps is given).
    Constant,
    /// Linear warm-up, then linear decay to 0 at the last step (transformers' default).
    Linear,
    /// Linear warm-up, then cosine decay to 0.
    Cosine,
}

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Base model: an HF folder (safetensors) or an NF4 folder written by `ftconv quantize --to nf4`.
    pub base: PathBuf,
    /// Training data, JSONL: messages | prompt/completion | text | conversations (ShareGPT) | instruction/input/output (Alpaca).
    #[arg(long)]
    pub data: PathBuf,
    /// Output adapter folder (PEFT layout: adapter_config.json + adapter_model.safetensors).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Held-out JSONL (same formats) for the eval loss.
    #[arg(long)]
    pub eval: Option<PathBuf>,
    /// Eval every N optimizer steps (and before the first and after the last step); 0 = only those two.
    #[arg(long, default_value_t = 0)]
    pub eval_every: usize,
    /// How the frozen base weights are held.
    #[arg(long, value_enum, default_value_t = BaseDtype::Nf4)]
    pub base_dtype: BaseDtype,
    /// LoRA target modules (short names), comma-separated; default all linear projections.
    #[arg(long, value_delimiter = ',')]
    pub targets: Option<Vec<String>>,
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    #[arg(long, default_value_t = 32.0)]
    pub alpha: f64,
    /// Dropout on the LoRA input only.
    #[arg(long, default_value_t = 0.05)]
    pub dropout: f64,
    /// rsLoRA scaling alpha/sqrt(r).
    #[arg(long)]
    pub rslora: bool,
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    #[arg(long, value_enum, default_value_t = Schedule::Linear)]
    pub lr_schedule: Schedule,
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: usize,
    /// AdamW decoupled weight decay.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Clip the global gradient norm to this (0 = no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Stop after this many optimizer steps (overrides --epochs).
    #[arg(long)]
    pub max_steps: Option<usize>,
    #[arg(long, default_value_t = 1024)]
    pub max_seq_len: usize,
    /// Loss on every token, not only the assistant / completion tokens.
    #[arg(long)]
    pub train_on_prompt: bool,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Save a checkpoint (adapter + optimizer state + data position) every N steps in OUTPUT/checkpoint-N.
    #[arg(long, default_value_t = 0)]
    pub save_every: usize,
    /// Continue from a checkpoint folder (OUTPUT/checkpoint-N) exactly as if never interrupted.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Start the LoRA weights from this PEFT adapter instead of PEFT's initialization.
    #[arg(long)]
    pub init_adapter: Option<PathBuf>,
    /// Training log, one JSON object per line (default OUTPUT/train_log.jsonl).
    #[arg(long)]
    pub log: Option<PathBuf>,
    #[arg(long)]
    pub threads: Option<usize>,
    #[arg(long, value_enum, default_value_t = crate::gpu::DeviceChoice::Auto)]
    pub device: crate::gpu::DeviceChoice,
    /// Print the plan (modules, trainable parameters, rows, tokens) and exit.
    #[arg(long)]
    pub dry_run: bool,
    /// Parity probe: one forward+backward on the first --batch-size rows (file order, no dropout),
    /// written to this safetensors file (input_ids, labels, logits, loss, grad.<PEFT key>); no training.
    #[arg(long, hide = true)]
    pub probe: Option<PathBuf>,
}

pub fn run(a: Args, quiet: bool) -> anyhow::Result<()> {
    #[cfg(feature = "train")]
    {
        crate::train::run::run(&a, quiet)
    }
    #[cfg(not(feature = "train"))]
    {
        let _ = (a, quiet);
        Err(super::usage(
            "finetune: this ftconv was built without the train feature (cargo build --release)",
        ))
    }
}
