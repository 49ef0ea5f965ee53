//! `ftconv inspect PATH`: what is in an HF checkpoint, a safetensors file, a PEFT adapter,
//! an NF4 folder or a GGUF file.

use super::human_bytes;
use crate::checkpoint::{self, InputKind, StFile, read_json_opt, safetensors::dtype_name};
use crate::gguf::GgufFile;
use anyhow::Result;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// HF model folder, PEFT adapter folder, NF4 folder, .safetensors or .gguf file.
    pub path: PathBuf,
    /// Print JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// List every tensor (default: the first 40 in the text output).
    #[arg(long)]
    pub all: bool,
}

struct Row {
    name: String,
    dtype: String,
    shape: Vec<u64>,
    bytes: u64,
}

pub fn run(a: Args, _quiet: bool) -> Result<()> {
    let kind = checkpoint::detect(&a.path)?;
    let mut info = serde_json::Map::new();
    let mut rows: Vec<Row> = vec![];
    let mut meta: Vec<(String, String, Value)> = vec![];
    let kind_name = match kind {
        InputKind::HfFolder => "hf-checkpoint",
        InputKind::Nf4Folder => "nf4-checkpoint",
        InputKind::PeftAdapter => "peft-adapter",
        InputKind::SafetensorsFile => "safetensors",
        InputKind::Gguf => "gguf",
    };
    info.insert("path".into(), json!(a.path));
    info.insert("kind".into(), json!(kind_name));
    match kind {
        InputKind::Gguf => {
            let g = GgufFile::open(&a.path)?;
            info.insert("gguf_version".into(), json!(g.version));
            info.insert("architecture".into(), json!(g.architecture()));
            info.insert("alignment".into(), json!(g.alignment));
            if let Some(ft) = g.metadata.get_u64("general.file_type") {
                let name = crate::quant::Ftype::from_id(ft as u32).map(|f| f.name().to_string());
                info.insert(
                    "file_type".into(),
                    json!(name.unwrap_or_else(|| ft.to_string())),
                );
            }
            for (k, v) in g.metadata.iter() {
                meta.push((
                    k.to_string(),
                    v.value_type().name().to_string(),
                    json!(v.summary(6)),
                ));
            }
            for t in &g.tensors {
                rows.push(Row {
                    name: t.name.clone(),
                    dtype: t.type_name(),
                    shape: t.torch_shape(),
                    bytes: t.size,
                });
            }
        }
        InputKind::SafetensorsFile => {
            let f = StFile::open(&a.path)?;
            st_rows(&f, &mut rows);
            if let Some(m) = &f.metadata {
                for (k, v) in m {
                    meta.push((k.clone(), "str".into(), json!(v)));
                }
            }
        }
        InputKind::HfFolder | InputKind::Nf4Folder | InputKind::PeftAdapter => {
            folder(&a.path, kind, &mut info, &mut rows)?;
        }
    }
    let params: u64 = rows
        .iter()
        .filter(|r| {
            !r.name.contains("absmax")
                && !r.name.contains("quant_map")
                && !r.name.contains("quant_state")
        })
        .map(|r| {
            let n: u64 = r.shape.iter().product();
            // packed 4-bit weights hold two values per byte
            if kind == InputKind::Nf4Folder && r.dtype == "U8" {
                n * 2
            } else {
                n
            }
        })
        .sum();
    info.insert("parameters".into(), json!(params));
    info.insert("tensor_count".into(), json!(rows.len()));
    info.insert(
        "tensor_bytes".into(),
        json!(rows.iter().map(|r| r.bytes).sum::<u64>()),
    );
    if a.json {
        info.insert(
            "metadata".into(),
            Value::Array(
                meta.iter()
                    .map(|(k, t, v)| json!({"key": k, "type": t, "value": v}))
                    .collect(),
            ),
        );
        info.insert(
            "tensors".into(),
            Value::Array(rows.iter().map(|r| json!({"name": r.name, "dtype": r.dtype, "shape": r.shape, "bytes": r.bytes})).collect()),
        );
        println!("{}", serde_json::to_string_pretty(&Value::Object(info))?);
        return Ok(());
    }
    println!("{}: {kind_name}", a.path.display());
    for (k, v) in &info {
        if k == "path" || k == "kind" || k == "parameters" {
            continue;
        }
        let s = match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        println!("  {k}: {s}");
    }
    println!(
        "  parameters: {} ({})",
        params,
        crate::arch::size_label(params)
    );
    if !meta.is_empty() {
        println!("metadata ({} keys):", meta.len());
        for (k, t, v) in &meta {
            let s = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            println!("  {k} [{t}] = {s}");
        }
    }
    println!(
        "tensors ({}, {}):",
        rows.len(),
        human_bytes(rows.iter().map(|r| r.bytes).sum())
    );
    let limit = if a.all { rows.len() } else { 40 };
    for r in rows.iter().take(limit) {
        let shape = r
            .shape
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("x");
        println!(
            "  {:<48} {:>6} {:>16} {:>12}",
            r.name, r.dtype, shape, r.bytes
        );
    }
    if rows.len() > limit {
        println!("  … {} more (use --all)", rows.len() - limit);
    }
    Ok(())
}

fn st_rows(f: &StFile, rows: &mut Vec<Row>) {
    for t in &f.tensors {
        rows.push(Row {
            name: t.name.clone(),
            dtype: dtype_name(t.dtype),
            shape: t.shape.iter().map(|&d| d as u64).collect(),
            bytes: t.len as u64,
        });
    }
}

fn folder(
    dir: &Path,
    kind: InputKind,
    info: &mut serde_json::Map<String, Value>,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let files: Vec<String> = if kind == InputKind::PeftAdapter {
        let cfg = read_json_opt(&dir.join("adapter_config.json"))?.unwrap_or(Value::Null);
        for k in [
            "peft_type",
            "task_type",
            "base_model_name_or_path",
            "r",
            "lora_alpha",
            "use_rslora",
            "use_dora",
            "target_modules",
            "modules_to_save",
        ] {
            if let Some(v) = cfg.get(k) {
                info.insert(k.into(), v.clone());
            }
        }
        let p = dir.join("adapter_model.safetensors");
        if p.is_file() {
            vec!["adapter_model.safetensors".into()]
        } else {
            vec![]
        }
    } else {
        let cfg = read_json_opt(&dir.join("config.json"))?.unwrap_or(Value::Null);
        if let Some(a) = cfg.get("architectures").and_then(|a| a.get(0)) {
            info.insert("architecture".into(), a.clone());
        }
        for k in [
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "vocab_size",
            "tie_word_embeddings",
            "torch_dtype",
            "dtype",
        ] {
            if let Some(v) = cfg.get(k) {
                info.insert(k.into(), v.clone());
            }
        }
        if let Some(q) = cfg.get("quantization_config") {
            info.insert("quantization_config".into(), q.clone());
        }
        if kind == InputKind::Nf4Folder {
            // open it as ftconv reads it: every 4-bit key group checked and folded
            let ck = checkpoint::HfCheckpoint::open(dir)?;
            let q: Vec<_> = ck.tensors.iter().filter_map(|t| t.bnb4()).collect();
            let mut types: Vec<&str> = q.iter().map(|w| w.info.quant_type.name()).collect();
            types.dedup();
            info.insert(
                "bnb_4bit".into(),
                json!({
                    "quantized_weights": q.len(),
                    "quant_type": types,
                    "double_quant": q.iter().any(|w| w.info.nested_offset.is_some()),
                    "stored_dtype": q.first().map(|w| w.info.dtype.torch_name()),
                    "blocksize": q.first().map(|w| w.info.blocksize),
                }),
            );
        }
        checkpoint::shard_names(dir)?.0
    };
    info.insert("files".into(), json!(files));
    let extras: Vec<&str> = [
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
    ]
    .into_iter()
    .filter(|f| dir.join(f).is_file())
    .collect();
    if !extras.is_empty() {
        info.insert("other_files".into(), json!(extras));
    }
    for f in files {
        st_rows(&StFile::open(&dir.join(f))?, rows);
    }
    Ok(())
}
