//! `ftconv adapter ADAPTER_DIR --base BASE -o adapter.gguf`: a PEFT LoRA adapter as the GGUF LoRA
//! file llama.cpp's convert_lora_to_gguf.py writes (for `llama-completion --lora`, Ollama's ADAPTER).

use super::quantize::{print_plan, report, write};
use super::usage;
use crate::checkpoint::ModelConfig;
use crate::lora::{Adapter, export};
use crate::quant::GgmlType;
use anyhow::Result;
use std::path::PathBuf;

fn parse_outtype(s: &str) -> Result<GgmlType, String> {
    match s.to_ascii_lowercase().as_str() {
        "f32" => Ok(GgmlType::F32),
        "f16" => Ok(GgmlType::F16),
        "bf16" => Ok(GgmlType::BF16),
        "q8_0" => Ok(GgmlType::Q8_0),
        _ => Err(format!(
            "unknown adapter type {s:?}; expected f32, f16, bf16 or q8_0"
        )),
    }
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors), optionally
    /// `DIR@WEIGHT` to scale it.
    pub adapter: String,
    /// The base model's HF folder (only its config.json is read).
    #[arg(long)]
    pub base: PathBuf,
    /// Output GGUF file (default: <adapter-name>-<TYPE>.gguf in the current folder).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Storage type of the LoRA matrices, as convert_lora_to_gguf.py's --outtype.
    #[arg(long = "to", value_parser = parse_outtype, default_value = "f32")]
    pub to: GgmlType,
    /// Print the per-tensor plan and write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the result (or the plan) as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args, quiet: bool) -> Result<()> {
    let (dir, weight) = crate::lora::adapter::parse_spec(&a.adapter);
    let adapter = Adapter::open(&dir, weight)?;
    let base = ModelConfig::load(&a.base)?;
    let plan = export::plan_adapter(&adapter, &base, a.to)?;
    let out = a.output.clone().unwrap_or_else(|| {
        PathBuf::from(format!(
            "{}-{}.gguf",
            crate::checkpoint::model_dir_name(&dir),
            a.to.name()
        ))
    });
    if a.dry_run {
        print_plan(&plan, &out, a.json);
        return Ok(());
    }
    crate::output::check_output_dir(&out)?;
    if out.is_dir() {
        return Err(usage(format!("{}: is a folder", out.display())));
    }
    let summary = write(&plan, &out, quiet)?;
    report(&plan, &out, &summary, a.json, quiet);
    Ok(())
}
