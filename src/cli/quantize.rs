//! `ftconv quantize SRC --to TYPE`: HF checkpoint, F32/F16/BF16 GGUF or safetensors file →
//! GGUF byte-identical to convert_hf_to_gguf.py + llama-quantize (or NF4/FP4 folders).

use super::{human_bytes, progress_bar, set_threads, usage};
use crate::checkpoint::{self, HfCheckpoint, InputKind};
use crate::convert::{self, QuantOptions};
use crate::exec::{self, Summary};
use crate::plan::Plan;
use crate::quant::Ftype;
use anyhow::Result;
use std::path::{Path, PathBuf};

/// What `--to` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Gguf(Ftype),
    Nf4,
    Fp4,
}

impl Target {
    pub fn name(self) -> String {
        match self {
            Target::Gguf(f) => f.name().to_string(),
            Target::Nf4 => "NF4".into(),
            Target::Fp4 => "FP4".into(),
        }
    }
}

pub fn parse_target(s: &str) -> Result<Target, String> {
    match s.to_ascii_lowercase().as_str() {
        "nf4" => return Ok(Target::Nf4),
        "fp4" => return Ok(Target::Fp4),
        _ => {}
    }
    Ftype::parse(s).map(Target::Gguf).ok_or_else(|| {
        format!(
            "unknown type {s:?}; expected one of: {}, NF4, FP4",
            Ftype::names().join(", ")
        )
    })
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// An HF model folder, an F32/F16/BF16 GGUF file, or a safetensors file.
    pub src: PathBuf,
    /// Target type as llama-quantize spells it (q4_k_m, Q8_0, bf16…), or nf4 / fp4.
    #[arg(long = "to", value_parser = parse_target)]
    pub to: Target,
    /// Output file (default: <model-name>-<TYPE>.gguf in the current folder).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Every 2-D tensor at the type's base type (as llama-quantize --pure).
    #[arg(long)]
    pub pure: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print the per-tensor plan and write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the result (or the plan) as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Merge this PEFT adapter first (as `ftconv merge … --to`); repeatable, ADAPTER@WEIGHT.
    #[arg(long = "adapter", value_name = "ADAPTER[@WEIGHT]")]
    pub adapters: Vec<String>,
}

pub fn run(a: Args, quiet: bool) -> Result<()> {
    set_threads(a.threads)?;
    let ftype = match a.to {
        Target::Gguf(f) => f,
        Target::Nf4 | Target::Fp4 => {
            return Err(usage(format!(
                "--to {} is not available in this build yet",
                a.to.name()
            )));
        }
    };
    let opts = QuantOptions {
        ftype,
        pure: a.pure,
    };
    let kind = checkpoint::detect(&a.src)?;
    let (plan, name) = match kind {
        InputKind::HfFolder if !a.adapters.is_empty() => {
            let base = crate::lora::merge::BaseModel::open(&a.src)?;
            let ads = super::merge::open_adapters(&a.adapters)?;
            let mplan = crate::lora::merge::MergePlan::build(&base, &ads, None)?;
            if !quiet {
                for w in &mplan.warnings {
                    eprintln!("ftconv: note: {w}");
                }
            }
            super::merge::gguf_plan(&a.src, &mplan, &opts)?
        }
        InputKind::HfFolder => {
            let ck = HfCheckpoint::open(&a.src)?;
            (convert::plan_hf(&ck, &opts, None)?, ck.name())
        }
        _ if !a.adapters.is_empty() => {
            return Err(usage(format!(
                "{}: --adapter needs an HF model folder as the base",
                a.src.display()
            )));
        }
        InputKind::Gguf => {
            let stem = file_stem(&a.src);
            (convert::plan_gguf(&a.src, &opts)?, stem)
        }
        InputKind::SafetensorsFile => {
            (convert::plan_safetensors(&a.src, &opts)?, file_stem(&a.src))
        }
        InputKind::PeftAdapter => {
            return Err(usage(format!(
                "{}: is a PEFT adapter; quantize its base model with --adapter",
                a.src.display()
            )));
        }
        InputKind::Nf4Folder => {
            anyhow::bail!(
                "{}: reading NF4 checkpoints is not available in this build yet",
                a.src.display()
            )
        }
    };
    let out = a
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{name}-{}.gguf", ftype.name())));
    if a.dry_run {
        print_plan(&plan, &out, a.json);
        return Ok(());
    }
    crate::output::check_output_dir(&out)?;
    if same_file(&a.src, &out) {
        return Err(usage("input and output paths must differ"));
    }
    let summary = write(&plan, &out, quiet)?;
    report(&plan, &out, &summary, a.json, quiet);
    Ok(())
}

fn file_stem(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "model".into())
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// Write the plan with a progress bar.
pub fn write(plan: &Plan, out: &Path, quiet: bool) -> Result<Summary> {
    let pb = progress_bar(plan.n_elements(), quiet);
    let n = plan.tensors.len();
    let progress = |i: usize, name: &str, done: u64| {
        pb.set_position(done);
        pb.set_message(format!("[{}/{n}] {name}", i + 1));
    };
    let s = exec::write_gguf(plan, out, true, &progress);
    pb.finish_and_clear();
    s
}

pub fn print_plan(plan: &Plan, out: &Path, json: bool) {
    if json {
        let tensors: Vec<serde_json::Value> = plan
            .tensors
            .iter()
            .map(|t| {
                serde_json::json!({
                    "name": t.name,
                    "shape": t.shape(),
                    "source": t.origin,
                    "source_dtype": t.source_dtype,
                    "transforms": t.transforms,
                    "type": t.target.name(),
                    "bytes": t.out_bytes(),
                })
            })
            .collect();
        let v = serde_json::json!({
            "output": out,
            "type": plan.type_name,
            "tensors": tensors,
            "metadata_keys": plan.metadata.keys().collect::<Vec<_>>(),
            "bytes": plan.output_bytes(),
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap());
        return;
    }
    println!(
        "plan: {} → {} ({})",
        plan.type_name,
        out.display(),
        human_bytes(plan.output_bytes())
    );
    println!(
        "{:<36} {:>16} {:>6} {:>6} {:>12}  from",
        "tensor", "shape", "src", "type", "bytes"
    );
    for t in &plan.tensors {
        let shape = t
            .shape()
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("x");
        let mut from = t.origin.clone();
        if !t.transforms.is_empty() {
            from.push_str(&format!(" [{}]", t.transforms.join(", ")));
        }
        println!(
            "{:<36} {:>16} {:>6} {:>6} {:>12}  {from}",
            t.name,
            shape,
            t.source_dtype,
            t.target.name(),
            t.out_bytes()
        );
    }
    println!(
        "{} metadata keys, {} tensors",
        plan.metadata.len(),
        plan.tensors.len()
    );
}

pub fn report(plan: &Plan, out: &Path, s: &Summary, json: bool, quiet: bool) {
    let bpw = s.bytes_out as f64 * 8.0 / s.elements.max(1) as f64;
    let mut worst: Vec<&exec::TensorError> = s.errors.iter().collect();
    worst.sort_by(|a, b| {
        b.rel_error
            .partial_cmp(&a.rel_error)
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    if json {
        let v = serde_json::json!({
            "output": out,
            "type": plan.type_name,
            "tensors": s.tensors,
            "bytes_in": plan.input_bytes,
            "bytes_out": s.bytes_out,
            "bits_per_weight": bpw,
            "seconds": s.seconds,
            "worst_tensors": worst.iter().take(5).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap());
    }
    if !quiet {
        eprintln!(
            "wrote {}: {} tensors, {} → {} ({bpw:.2} bits/weight) in {:.1} s",
            out.display(),
            s.tensors,
            human_bytes(plan.input_bytes),
            human_bytes(s.bytes_out),
            s.seconds
        );
        if !worst.is_empty() {
            let w: Vec<String> = worst
                .iter()
                .take(3)
                .map(|e| format!("{} {} {:.2e}", e.name, e.ty, e.rel_error))
                .collect();
            eprintln!("largest relative quantization error: {}", w.join("; "));
        }
    }
}
