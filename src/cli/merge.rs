//! `ftconv merge BASE ADAPTER[@WEIGHT]... -o OUT`: PEFT adapters merged into the base as
//! `merge_and_unload` does, written as an HF folder, or straight to GGUF with `--to TYPE`.

use super::quantize::{Target, parse_target};
use super::{human_bytes, progress_bar, set_threads, usage};
use crate::checkpoint::HfCheckpoint;
use crate::convert::{self, QuantOptions};
use crate::lora::adapter::{Adapter, parse_spec};
use crate::lora::merge::{FloatType, MergePlan};
use crate::lora::output;
use anyhow::Result;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The base model: an HF folder (config.json + safetensors).
    pub base: PathBuf,
    /// PEFT adapter folders, each optionally with a weight: ADAPTER@0.5 (default 1).
    /// Several adapters are combined as W + Σ wᵢ·sᵢ·BᵢAᵢ (PEFT's `cat`).
    #[arg(required = true, value_name = "ADAPTER[@WEIGHT]")]
    pub adapters: Vec<String>,
    /// Output: an HF folder, or a GGUF file with --to.
    #[arg(short, long)]
    pub output: PathBuf,
    /// dtype of the merged weights: auto (the base's), bf16, f16 or f32.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// Largest safetensors shard, in bytes or with a unit (save_pretrained's max_shard_size:
    /// 5GB, 500MB, 2GiB; its default is 50GB).
    #[arg(long, value_name = "SIZE", default_value = "50GB")]
    pub max_shard_size: String,
    /// Write a GGUF of this type directly (q4_k_m, q8_0, bf16…), byte-identical to merging
    /// then quantizing.
    #[arg(long = "to", value_parser = parse_target)]
    pub to: Option<Target>,
    /// With --to: every 2-D tensor at the type's base type (as llama-quantize --pure).
    #[arg(long)]
    pub pure: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print what the merge does to each tensor and write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the result (or the plan) as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Where to merge (and, with --to, quantize): auto (the GPU when one is usable), cpu, or
    /// cuda (the GPU, or fail). The bytes are the same on either.
    #[arg(long, value_enum, default_value_t = crate::gpu::DeviceChoice::Auto)]
    pub device: crate::gpu::DeviceChoice,
}

/// Open the adapters named `ADAPTER[@WEIGHT]`.
pub fn open_adapters(specs: &[String]) -> Result<Vec<Adapter>> {
    specs
        .iter()
        .map(|s| {
            let (p, w) = parse_spec(s);
            Adapter::open(&p, w)
        })
        .collect()
}

fn canon(p: &Path) -> Option<PathBuf> {
    std::fs::canonicalize(p).ok()
}

/// Refuse an output that would overwrite an input.
fn check_not_input(out: &Path, inputs: &[&Path]) -> Result<()> {
    let Some(o) = canon(out) else { return Ok(()) };
    for i in inputs {
        if let Some(c) = canon(i)
            && (c == o || c.starts_with(&o))
        {
            return Err(usage(format!(
                "output {} would overwrite input {}",
                out.display(),
                i.display()
            )));
        }
    }
    Ok(())
}

pub fn run(a: Args, quiet: bool) -> Result<()> {
    set_threads(a.threads)?;
    let dtype = match a.dtype.to_ascii_lowercase().as_str() {
        "auto" => None,
        d => Some(
            FloatType::parse(d)
                .ok_or_else(|| usage(format!("--dtype {d:?}: expected auto, bf16, f16 or f32")))?,
        ),
    };
    if a.to.is_some() && dtype.is_some() {
        return Err(usage(
            "--dtype applies to the HF folder output; with --to the GGUF follows the base's dtype as convert_hf_to_gguf.py does",
        ));
    }
    let max_shard_size = super::quantize::parse_size(&a.max_shard_size)
        .filter(|&n| n > 0)
        .ok_or_else(|| {
            usage(format!(
                "--max-shard-size {:?}: expected bytes or a size such as 5GB, 500MB, 2GiB",
                a.max_shard_size
            ))
        })?;
    let base = HfCheckpoint::open(&a.base)?;
    let adapters = open_adapters(&a.adapters)?;
    let plan = MergePlan::build(&base, &adapters, dtype)?;
    if !quiet {
        for w in &plan.warnings {
            eprintln!("ftconv: note: {w}");
        }
    }
    let mut inputs: Vec<&Path> = vec![&a.base];
    inputs.extend(adapters.iter().map(|x| x.dir.as_path()));
    match a.to {
        Some(t) => run_gguf(&a, t, &plan, &inputs, quiet),
        None => run_hf(&a, &base, &plan, &inputs, max_shard_size, quiet),
    }
}

/// `--to TYPE` (also `quantize --adapter`): the GGUF plan of the base with merged rows.
pub fn gguf_plan(
    base_dir: &Path,
    plan: &MergePlan,
    opts: &QuantOptions,
) -> Result<(crate::plan::Plan, String)> {
    let ck = HfCheckpoint::open(base_dir)?;
    let hook = |name: &str, src| plan.hook_rows(name, src);
    let p = convert::plan_hf(&ck, opts, Some(&hook))?;
    Ok((p, ck.name()))
}

fn run_gguf(a: &Args, t: Target, plan: &MergePlan, inputs: &[&Path], quiet: bool) -> Result<()> {
    let ftype = match t {
        Target::Gguf(f) => f,
        other => {
            return Err(usage(format!(
                "merge --to {} is not available in this build yet",
                other.name()
            )));
        }
    };
    let opts = QuantOptions {
        ftype,
        pure: a.pure,
    };
    let (gplan, _) = gguf_plan(&a.base, plan, &opts)?;
    if a.dry_run {
        super::quantize::print_plan(&gplan, &a.output, a.json);
        return Ok(());
    }
    crate::output::check_output_dir(&a.output)?;
    check_not_input(&a.output, inputs)?;
    let (backend, line) = crate::gpu::select(a.device)?;
    let summary = super::quantize::write_on(&gplan, &a.output, quiet, &backend)?;
    if let (Some(line), false) = (line, quiet) {
        eprintln!("{line}");
    }
    super::quantize::report(&gplan, &a.output, &summary, a.json, quiet);
    Ok(())
}

fn run_hf(
    a: &Args,
    base: &HfCheckpoint,
    plan: &MergePlan,
    inputs: &[&Path],
    max_shard_size: u64,
    quiet: bool,
) -> Result<()> {
    if a.dry_run {
        print_plan(plan, &a.output, a.json);
        return Ok(());
    }
    crate::output::check_output_dir(&a.output)?;
    check_not_input(&a.output, inputs)?;
    // the merged rows run on the GPU chosen here (gpu::active)
    let (_, device_line) = crate::gpu::select(a.device)?;
    let start = Instant::now();
    let total = plan.total_bytes();
    let pb = progress_bar(total, quiet);
    let mut done = 0u64;
    let written = output::write_hf_folder(&a.output, base, plan, max_shard_size, &mut |n| {
        done += n;
        pb.set_position(done);
    })?;
    pb.finish_and_clear();
    if let (Some(line), false) = (device_line, quiet) {
        eprintln!("{line}");
    }
    let secs = start.elapsed().as_secs_f64();
    let merged = plan.tensors.iter().filter(|t| !t.is_plain_copy()).count();
    if a.json {
        let v = serde_json::json!({
            "output": a.output,
            "files": written.files,
            "tensors": plan.tensors.len(),
            "tensors_merged": merged,
            "modules": plan.n_modules,
            "dtype": plan.model_type.torch_name(),
            "bytes": written.bytes,
            "seconds": secs,
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap());
    }
    if !quiet {
        eprintln!(
            "wrote {}: {} tensors ({merged} changed by {} adapted modules), {} as {} in {secs:.1} s",
            a.output.display(),
            plan.tensors.len(),
            plan.n_modules,
            human_bytes(written.bytes),
            plan.model_type.torch_name(),
        );
    }
    Ok(())
}

fn print_plan(plan: &MergePlan, out: &Path, json: bool) {
    if json {
        let tensors: Vec<serde_json::Value> = plan
            .tensors
            .iter()
            .map(|t| {
                serde_json::json!({
                    "name": t.name,
                    "shape": t.shape,
                    "dtype": format!("{:?}", t.dtype()),
                    "source": t.input.tensor().name,
                    "merge": t.describe(),
                })
            })
            .collect();
        let v = serde_json::json!({
            "output": out,
            "dtype": plan.model_type.torch_name(),
            "modules": plan.n_modules,
            "tensors": tensors,
            "dropped": plan.dropped,
            "bytes": plan.total_bytes(),
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap());
        return;
    }
    println!(
        "plan: merge → {} ({}, {} adapted modules, {})",
        out.display(),
        plan.model_type.torch_name(),
        plan.n_modules,
        human_bytes(plan.total_bytes())
    );
    for t in &plan.tensors {
        let shape = t
            .shape
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("x");
        let d = t.describe();
        let what = if d.is_empty() {
            "copy".to_string()
        } else {
            d.join(", ")
        };
        println!(
            "{:<48} {:>14} {:>5}  {what}",
            t.name,
            shape,
            format!("{:?}", t.dtype())
        );
    }
    for d in &plan.dropped {
        println!("{d:<48} (not written: tied to the input embedding)");
    }
}
