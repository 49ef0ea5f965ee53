//! `ftconv quantize SRC --to TYPE`: HF checkpoint, F32/F16/BF16 GGUF or safetensors file →
//! GGUF byte-identical to convert_hf_to_gguf.py + llama-quantize (or NF4/FP4 folders).

use super::{human_bytes, progress_bar, set_threads, usage};
use crate::checkpoint::bnb::{self, Bnb4Options};
use crate::checkpoint::{self, HfCheckpoint, InputKind};
use crate::convert::{self, QuantOptions};
use crate::exec::{self, Summary};
use crate::gpu::{Backend, DeviceChoice};
use crate::plan::Plan;
use crate::quant::Ftype;
use crate::quant::nf4::{QuantType, StoredDtype};
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
    /// Output file (default: <model-name>-<TYPE>.gguf in the current folder); for nf4/fp4 an
    /// output folder (default: <model-name>-NF4).
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
    /// NF4/FP4: store absmax without double quantization (bnb_4bit_use_double_quant=False).
    #[arg(long)]
    pub no_double_quant: bool,
    /// NF4/FP4: leave this module unquantized (transformers' llm_int8_skip_modules matching:
    /// a path prefix up to a dot, a regex, or a suffix such as `down_proj`). Repeatable.
    #[arg(long = "skip", value_name = "MODULE")]
    pub skip: Vec<String>,
    /// NF4/FP4: bnb_4bit_compute_dtype written to config.json.
    #[arg(long, value_name = "DTYPE", default_value = "bfloat16")]
    pub compute_dtype: String,
    /// NF4/FP4: largest shard, in bytes or with a unit (transformers' max_shard_size: 5GB, 500MB).
    #[arg(long, value_name = "SIZE", default_value = "50GB")]
    pub max_shard_size: String,
    /// Where to quantize: auto (the GPU when one is usable), cpu, or cuda (the GPU, or fail).
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    /// Merge this PEFT adapter first (as `ftconv merge … --to`); repeatable, ADAPTER@WEIGHT.
    #[arg(long = "adapter", value_name = "ADAPTER[@WEIGHT]")]
    pub adapters: Vec<String>,
}

pub fn run(a: Args, quiet: bool) -> Result<()> {
    set_threads(a.threads)?;
    let ftype = match a.to {
        Target::Gguf(f) => f,
        Target::Nf4 | Target::Fp4 => return run_bnb4(a, quiet),
    };
    if a.no_double_quant || !a.skip.is_empty() {
        return Err(usage(
            "--no-double-quant and --skip apply only to --to nf4 / fp4",
        ));
    }
    let opts = QuantOptions {
        ftype,
        pure: a.pure,
    };
    let kind = checkpoint::detect(&a.src)?;
    let (plan, name) = match kind {
        InputKind::HfFolder if !a.adapters.is_empty() => {
            let base = HfCheckpoint::open(&a.src)?;
            let ads = super::merge::open_adapters(&a.adapters)?;
            let mplan = crate::lora::merge::MergePlan::build(&base, &ads, None)?;
            if !quiet {
                for w in &mplan.warnings {
                    eprintln!("ftconv: note: {w}");
                }
            }
            super::merge::gguf_plan(&a.src, &mplan, &opts)?
        }
        // an NF4/FP4 folder reads as its dequantized self (bitsandbytes' dequantize_4bit)
        InputKind::HfFolder | InputKind::Nf4Folder => {
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
    let (backend, line) = crate::gpu::select(a.device)?;
    let summary = write_on(&plan, &out, quiet, &backend)?;
    // the device line comes with the summary, so a failure stays one line on stderr
    if let (Some(line), false) = (line, quiet) {
        eprintln!("{line}");
    }
    report(&plan, &out, &summary, a.json, quiet);
    Ok(())
}

/// Parse transformers' size strings ("5GB" = 5·10⁹, "2GiB" = 2·2³⁰, or plain bytes).
pub fn parse_size(s: &str) -> Option<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let x: f64 = num.parse().ok()?;
    let mul: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "KIB" => 1024.0,
        "MIB" => 1024f64.powi(2),
        "GIB" => 1024f64.powi(3),
        "TIB" => 1024f64.powi(4),
        _ => return None,
    };
    (x >= 0.0).then_some((x * mul) as u64)
}

/// `--to nf4|fp4`: a pre-quantized bitsandbytes checkpoint folder.
fn run_bnb4(a: Args, quiet: bool) -> Result<()> {
    let quant_type = if a.to == Target::Nf4 {
        QuantType::Nf4
    } else {
        QuantType::Fp4
    };
    let compute_dtype = StoredDtype::from_torch_name(&a.compute_dtype).ok_or_else(|| {
        usage(format!(
            "--compute-dtype {:?}: expected bfloat16, float16 or float32",
            a.compute_dtype
        ))
    })?;
    let max_shard_size = parse_size(&a.max_shard_size)
        .filter(|&n| n > 0)
        .ok_or_else(|| {
            usage(format!(
                "--max-shard-size {:?}: not a size",
                a.max_shard_size
            ))
        })?;
    if a.pure {
        return Err(usage("--pure applies only to GGUF types"));
    }
    match checkpoint::detect(&a.src)? {
        InputKind::HfFolder | InputKind::Nf4Folder => {}
        InputKind::PeftAdapter => {
            return Err(usage(format!(
                "{}: is a PEFT adapter; quantize its base model",
                a.src.display()
            )));
        }
        _ => {
            return Err(usage(format!(
                "{}: --to {} needs an HF model folder",
                a.src.display(),
                a.to.name()
            )));
        }
    }
    let ck = HfCheckpoint::open(&a.src)?;
    // adapters merged in the same pass (the values `ftconv merge` would write), then quantized
    let mut over = bnb::Overrides::new();
    if !a.adapters.is_empty() {
        let ads = super::merge::open_adapters(&a.adapters)?;
        let mplan = crate::lora::merge::MergePlan::build(&ck, &ads, None)?;
        if !quiet {
            for w in &mplan.warnings {
                eprintln!("ftconv: note: {w}");
            }
        }
        for t in &ck.tensors {
            if mplan.changes(&t.name).is_some() {
                let src = Box::new(crate::plan::SafetensorsRows {
                    tensor: t.clone(),
                    permute_heads: None,
                    rounding: crate::plan::Rounding::None,
                });
                over.insert(t.name.clone(), mplan.hook_rows(&t.name, src)?);
            }
        }
    }
    let opts = Bnb4Options {
        quant_type,
        double_quant: !a.no_double_quant,
        skip: a.skip.clone(),
        compute_dtype,
        max_shard_size,
    };
    let mut plan = bnb::plan(&ck, &opts)?;
    let out = a
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{}-{}", ck.name(), a.to.name())));
    if a.dry_run {
        print_bnb4_plan(&plan, &out, a.json);
        return Ok(());
    }
    if same_file(&a.src, &out) {
        return Err(usage("input and output paths must differ"));
    }
    let (backend, device_line) = crate::gpu::select(a.device)?;
    let t0 = std::time::Instant::now();
    let dir = crate::output::AtomicDir::create(&out)?;
    let total = plan.writer.tensors().len() as u64;
    let pb = progress_bar(total, quiet);
    let progress = |done: usize, _total: usize, name: &str| {
        pb.set_position(done as u64);
        pb.set_message(name.to_string());
    };
    let summary = bnb::write_merged(&ck, &mut plan, &dir, &progress, &over, &backend)?;
    pb.finish_and_clear();
    if let (Some(line), false) = (device_line, quiet) {
        eprintln!("{line}");
    }
    dir.commit()?;
    let secs = t0.elapsed().as_secs_f64();
    if a.json {
        let v = serde_json::json!({
            "output": out,
            "type": a.to.name(),
            "double_quant": opts.double_quant,
            "files": summary.files,
            "quantized_modules": summary.quantized,
            "unquantized_tensors": summary.copied,
            "skipped_modules": plan.skipped,
            "bytes_in": ck.data_bytes(),
            "bytes_out": summary.bytes_out,
            "seconds": secs,
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap());
    }
    if !quiet {
        eprintln!(
            "wrote {}: {} Linear weights as {}{}, {} tensors kept, {} → {} in {secs:.1} s",
            out.display(),
            summary.quantized,
            a.to.name(),
            if opts.double_quant {
                " (double quant)"
            } else {
                ""
            },
            summary.copied,
            human_bytes(ck.data_bytes()),
            human_bytes(summary.bytes_out),
        );
    }
    Ok(())
}

fn print_bnb4_plan(plan: &bnb::Bnb4Plan, out: &Path, json: bool) {
    let w = &plan.writer;
    if json {
        let tensors: Vec<serde_json::Value> = w
            .tensors()
            .iter()
            .map(|t| {
                serde_json::json!({
                    "name": t.name,
                    "dtype": format!("{:?}", t.dtype),
                    "shape": t.shape,
                    "bytes": t.byte_len(),
                })
            })
            .collect();
        let files: Vec<&str> = w.shards().iter().map(|s| s.file.as_str()).collect();
        let v = serde_json::json!({
            "output": out,
            "type": plan.opts.quant_type.name(),
            "double_quant": plan.opts.double_quant,
            "files": files,
            "tensors": tensors,
            "skipped_modules": plan.skipped,
            "quantization_config": bnb::quantization_config(plan),
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap());
        return;
    }
    println!(
        "plan: {} ({}) → {}",
        plan.opts.quant_type.name(),
        if plan.opts.double_quant {
            "double quant"
        } else {
            "no double quant"
        },
        out.display()
    );
    for s in w.shards() {
        println!("{} ({}):", s.file, human_bytes(s.data_bytes));
        for &i in &s.tensors {
            let t = &w.tensors()[i];
            let shape = t
                .shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join("x");
            println!(
                "  {:<64} {:>5} {:>14}",
                t.name,
                format!("{:?}", t.dtype),
                shape
            );
        }
    }
    if !plan.skipped.is_empty() {
        println!("left unquantized: {}", plan.skipped.join(", "));
    }
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
    write_on(plan, out, quiet, &Backend::Cpu)
}

/// [`write`], quantizing on `backend`.
pub fn write_on(plan: &Plan, out: &Path, quiet: bool, backend: &Backend) -> Result<Summary> {
    let pb = progress_bar(plan.n_elements(), quiet);
    let n = plan.tensors.len();
    let progress = |i: usize, name: &str, done: u64| {
        pb.set_position(done);
        pb.set_message(format!("[{}/{n}] {name}", i + 1));
    };
    let s = exec::write_gguf_on(plan, out, true, &progress, backend);
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
