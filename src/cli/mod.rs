//! Command-line interface: one file per subcommand (its arguments and orchestration only).

pub mod adapter;
pub mod finetune;
pub mod inspect;
pub mod merge;
pub mod ollama;
pub mod package;
pub mod quantize;

use clap::{Parser, Subcommand};

/// A usage error (exit status 2).
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UsageError(msg.into()))
}

#[derive(Parser, Debug)]
#[command(
    name = "ftconv",
    version,
    about = "Fine-tuned LLM checkpoints to what people deploy: inspect, merge LoRA, quantize to GGUF or NF4, Ollama Modelfiles, QLoRA",
    propagate_version = true
)]
pub struct Cli {
    /// Print nothing on stderr but errors.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Show what is in an HF checkpoint, a safetensors file, a PEFT adapter or a GGUF.
    Inspect(inspect::Args),
    /// HF checkpoint / GGUF / safetensors → GGUF in any llama-quantize type, or NF4/FP4.
    Quantize(quantize::Args),
    /// PEFT LoRA adapter → GGUF LoRA adapter (llama.cpp --lora, Ollama ADAPTER).
    Adapter(adapter::Args),
    /// Ollama Modelfile whose TEMPLATE is proved to render like the model's chat template.
    Ollama(ollama::Args),
    /// Merge PEFT LoRA/DoRA/IA³ adapters into a base model as PEFT does → HF folder or GGUF.
    Merge(merge::Args),
    /// CI pipeline: adapters merged + quantized GGUF, proved Modelfile, manifest.json.
    Package(package::Args),
    /// QLoRA fine-tuning (NF4 base + LoRA) on JSONL data → a PEFT LoRA adapter.
    Finetune(finetune::Args),
}

/// Configure the global thread pool.
pub fn set_threads(n: Option<usize>) -> anyhow::Result<()> {
    if let Some(n) = n {
        if n == 0 {
            return Err(usage("--threads must be at least 1"));
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .map_err(|e| anyhow::anyhow!("cannot start {n} threads: {e}"))?;
    }
    Ok(())
}

/// A progress bar on stderr (drawn only on a terminal).
pub fn progress_bar(total: u64, quiet: bool) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::with_draw_target(
        Some(total),
        indicatif::ProgressDrawTarget::stderr(),
    );
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {percent:>3}% {msg} (eta {eta})",
        )
        .unwrap(),
    );
    pb
}

/// Human-readable byte count.
pub fn human_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{b} B")
    }
}
