//! `ftconv package BASE [--adapter A[@W]]... [--to TYPE] [-o OUT_DIR] [--name NAME]`: the one-shot
//! CI step. Adapters merged and the result quantized in one pass → `<NAME>-<TYPE>.gguf`, a proved
//! `Modelfile`, and `manifest.json` (inputs and outputs with sha256, settings, per-tensor types and
//! quantization error). The same inputs give the same bytes whatever `--threads` is.

use super::quantize::{report, write_on};
use super::{set_threads, usage};
use crate::checkpoint::{self, HfCheckpoint, InputKind};
use crate::convert::{self, QuantOptions};
use crate::exec::Summary;
use crate::ollama::{self, modelfile, source};
use crate::output::AtomicFile;
use crate::plan::Plan;
use crate::quant::Ftype;
use anyhow::{Context, Result, anyhow};
use rayon::prelude::*;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The base model: an HF folder (or an NF4 folder, read dequantized).
    pub base: PathBuf,
    /// PEFT adapter to merge first; repeatable, ADAPTER@WEIGHT (W + Σ wᵢ·ΔWᵢ).
    #[arg(long = "adapter", value_name = "ADAPTER[@WEIGHT]")]
    pub adapters: Vec<String>,
    /// GGUF type as llama-quantize spells it.
    #[arg(long = "to", default_value = "Q4_K_M", value_parser = parse_ftype)]
    pub to: Ftype,
    /// Output folder (created if missing).
    #[arg(short, long, default_value = ".")]
    pub output: PathBuf,
    /// Name of the outputs (default: the base folder's name, or the first adapter's).
    #[arg(long)]
    pub name: Option<String>,
    /// Every 2-D tensor at the type's base type (llama-quantize --pure).
    #[arg(long)]
    pub pure: bool,
    /// SYSTEM prompt for the Modelfile (default: the chat template's own, if any).
    #[arg(long, value_name = "TEXT")]
    pub system: Option<String>,
    /// Extra Modelfile PARAMETER NAME=VALUE; repeatable.
    #[arg(long = "param", value_name = "NAME=VALUE")]
    pub params: Vec<String>,
    /// Write the Modelfile even when its TEMPLATE cannot be proved equal to the chat template.
    #[arg(long)]
    pub force: bool,
    /// Worker threads (default: all cores). Outputs do not depend on it.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print the result as JSON on stdout (the manifest).
    #[arg(long)]
    pub json: bool,
    /// Quantize on auto (the GPU when one is usable), cpu, or cuda (the GPU, or fail). The
    /// bytes are the same either way.
    #[arg(long, value_enum, default_value_t = crate::gpu::DeviceChoice::Auto)]
    pub device: crate::gpu::DeviceChoice,
}

fn parse_ftype(s: &str) -> Result<Ftype, String> {
    Ftype::parse(s).ok_or_else(|| {
        format!(
            "unknown type {s:?}; expected one of: {}",
            Ftype::names().join(", ")
        )
    })
}

/// sha256 of a file, streamed.
pub fn sha256_file(p: &Path) -> Result<String> {
    let mut f = std::fs::File::open(p).with_context(|| format!("{}: cannot open", p.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("{}: read failed", p.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Regular files of a folder (symlinks followed), sorted by name, not recursing.
fn folder_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v = vec![];
    for e in std::fs::read_dir(dir).with_context(|| format!("{}: cannot list", dir.display()))? {
        let p = e?.path();
        if p.is_file() {
            v.push(p);
        }
    }
    v.sort();
    Ok(v)
}

fn file_entries(files: &[(String, PathBuf)]) -> Result<Vec<Value>> {
    files
        .par_iter()
        .map(|(label, p)| {
            let size = std::fs::metadata(p)?.len();
            Ok(json!({"path": label, "bytes": size, "sha256": sha256_file(p)?}))
        })
        .collect()
}

pub fn run(a: Args, quiet: bool) -> Result<()> {
    set_threads(a.threads)?;
    let kind = checkpoint::detect(&a.base)?;
    if !matches!(kind, InputKind::HfFolder | InputKind::Nf4Folder) {
        return Err(usage(format!(
            "{}: package needs an HF model folder as BASE",
            a.base.display()
        )));
    }
    let opts = QuantOptions {
        ftype: a.to,
        pure: a.pure,
    };
    // plan: merge (if any) + quantize in one pass
    let (plan, base_name, warnings): (Plan, String, Vec<String>) = if a.adapters.is_empty() {
        let ck = HfCheckpoint::open(&a.base)?;
        (convert::plan_hf(&ck, &opts, None)?, ck.name(), vec![])
    } else {
        let base = HfCheckpoint::open(&a.base)?;
        let ads = super::merge::open_adapters(&a.adapters)?;
        let mplan = crate::lora::merge::MergePlan::build(&base, &ads, None)?;
        let (p, n) = super::merge::gguf_plan(&a.base, &mplan, &opts)?;
        (p, n, mplan.warnings.clone())
    };
    let name = match &a.name {
        Some(n) => {
            if n.is_empty() || n.contains('/') || n.contains('\\') || n.starts_with('.') {
                return Err(usage(format!("--name {n:?}: not a plain file name")));
            }
            n.clone()
        }
        None => match a.adapters.first() {
            Some(s) => checkpoint::model_dir_name(&crate::lora::adapter::parse_spec(s).0),
            None => base_name,
        },
    };
    let gguf_name = format!("{name}-{}.gguf", a.to.name());
    std::fs::create_dir_all(&a.output)
        .with_context(|| format!("{}: cannot create the output folder", a.output.display()))?;
    let gguf_path = a.output.join(&gguf_name);
    let modelfile_path = a.output.join("Modelfile");
    let manifest_path = a.output.join("manifest.json");

    // the Modelfile is derived (and its template proved) before anything is written
    let info = source::from_hf_dir(&a.base)?;
    let params = a
        .params
        .iter()
        .map(|p| super::ollama::parse_param(p))
        .collect::<Result<Vec<_>>>()?;
    let license = source::find_license(&a.base)
        .map(|p| {
            std::fs::read_to_string(&p).with_context(|| format!("{}: cannot read", p.display()))
        })
        .transpose()?;
    let mopts = ollama::Options {
        from: format!("./{gguf_name}"),
        adapter: None,
        system: a.system.clone(),
        params,
        license,
        source_label: a.base.display().to_string(),
        force: a.force,
    };
    let built = ollama::build(&info, &mopts)?;
    let modelfile_text = built
        .modelfile
        .to_text()
        .map_err(|e| anyhow!("{}: {e:#}", modelfile_path.display()))?;
    modelfile::parse(&modelfile_text)
        .map_err(|e| anyhow!("internal: emitted Modelfile does not parse: {e:#}"))?;

    if !quiet {
        for w in &warnings {
            eprintln!("ftconv: note: {w}");
        }
    }
    let (backend, device_line) = crate::gpu::select(a.device)?;
    let summary = write_on(&plan, &gguf_path, quiet, &backend)?;
    if let (Some(line), false) = (device_line, quiet) {
        eprintln!("{line}");
    }
    let mut f = AtomicFile::create(&modelfile_path)?;
    f.writer().write_all(modelfile_text.as_bytes())?;
    f.commit()?;

    let manifest = manifest(&a, &plan, &summary, &gguf_path, &modelfile_path, &built)?;
    let text = serde_json::to_string_pretty(&manifest)? + "\n";
    let mut f = AtomicFile::create(&manifest_path)?;
    f.writer().write_all(text.as_bytes())?;
    f.commit()?;
    if a.json {
        print!("{text}");
    }
    report(&plan, &gguf_path, &summary, false, quiet);
    if !quiet {
        eprintln!(
            "wrote {} and {}; next: ollama create {name} -f {}",
            modelfile_path.display(),
            manifest_path.display(),
            modelfile_path.display()
        );
    }
    Ok(())
}

fn manifest(
    a: &Args,
    plan: &Plan,
    summary: &Summary,
    gguf: &Path,
    modelfile: &Path,
    built: &ollama::Built,
) -> Result<Value> {
    let label = |root: &Path, p: &Path| -> String {
        let r = root
            .file_name()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        let f = p
            .file_name()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        format!("{r}/{f}")
    };
    let mut inputs = vec![];
    let base_files: Vec<(String, PathBuf)> = folder_files(&a.base)?
        .into_iter()
        .map(|p| (label(&a.base, &p), p))
        .collect();
    inputs.push(json!({"role": "base", "files": file_entries(&base_files)?}));
    for s in &a.adapters {
        let (dir, w) = crate::lora::adapter::parse_spec(s);
        let files: Vec<(String, PathBuf)> = folder_files(&dir)?
            .into_iter()
            .map(|p| (label(&dir, &p), p))
            .collect();
        inputs.push(json!({"role": "adapter", "weight": w, "files": file_entries(&files)?}));
    }
    let outputs = file_entries(&[
        (
            gguf.file_name()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_default(),
            gguf.to_path_buf(),
        ),
        ("Modelfile".to_string(), modelfile.to_path_buf()),
    ])?;
    let errs: std::collections::HashMap<&str, &crate::exec::TensorError> = summary
        .errors
        .iter()
        .map(|e| (e.name.as_str(), e))
        .collect();
    let tensors: Vec<Value> = plan
        .tensors
        .iter()
        .map(|t| {
            let mut v = json!({"name": t.name, "shape": t.shape(), "type": t.target.name()});
            if let Some(e) = errs.get(t.name.as_str()) {
                v["rmse"] = json!(e.rmse);
                v["rel_error"] = json!(e.rel_error);
            }
            v
        })
        .collect();
    let mut worst: Vec<&crate::exec::TensorError> = summary.errors.iter().collect();
    worst.sort_by(|x, y| {
        y.rel_error
            .partial_cmp(&x.rel_error)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(x.name.cmp(&y.name))
    });
    let n_el: u64 = summary.elements.max(1);
    let mean_rel = if summary.errors.is_empty() {
        0.0
    } else {
        summary.errors.iter().map(|e| e.rel_error).sum::<f64>() / summary.errors.len() as f64
    };
    let d = &built.derived;
    Ok(json!({
        "tool": {"name": "ftconv", "version": env!("CARGO_PKG_VERSION")},
        "inputs": inputs,
        "settings": {
            "type": a.to.name(),
            "pure": a.pure,
            "adapters": a.adapters.iter().map(|s| {
                let (p, w) = crate::lora::adapter::parse_spec(s);
                json!({"adapter": checkpoint::model_dir_name(&p), "weight": w})
            }).collect::<Vec<_>>(),
            "system": a.system,
            "params": a.params,
        },
        "outputs": outputs,
        "gguf": {
            "type": plan.type_name,
            "tensors": plan.tensors.len(),
            "bytes": summary.bytes_out,
            "bits_per_weight": summary.bytes_out as f64 * 8.0 / n_el as f64,
            "metadata_keys": plan.metadata.len(),
        },
        "modelfile": {
            "family": d.family.title,
            "variant": d.variant.name,
            "verified_conversations": d.proof.matched.len(),
            "unverified": d.unverified,
        },
        "quantization_error": {
            "mean_rel_error": mean_rel,
            "worst": worst.iter().take(5).map(|e| json!({"name": e.name, "type": e.ty, "rmse": e.rmse, "rel_error": e.rel_error})).collect::<Vec<_>>(),
        },
        "tensors": tensors,
    }))
}
