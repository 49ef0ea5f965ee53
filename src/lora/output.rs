//! The merged model as an HF folder like `save_pretrained` writes it: safetensors shards
//! (split as huggingface_hub splits them) + `model.safetensors.index.json`, config.json with
//! the dtype key, tokenizer files, chat template and generation config copied.
//!
//! Shards are written by the shared streaming writer (`checkpoint::writer`), one tensor at a
//! time, merged rows computed as they are written.

use super::merge::{FloatType, MergePlan, TensorJob};
use crate::checkpoint::HfCheckpoint;
use crate::checkpoint::TensorRef;
use crate::checkpoint::writer::{PlannedTensor as WPlanned, ShardedWriter, WriterOptions};
use crate::exec;
use crate::output::AtomicDir;
use crate::plan::{PlannedTensor, RowSource};
use crate::quant::GgmlType;
use anyhow::{Context, Result, anyhow, bail};
use safetensors::Dtype;
use serde_json::Value;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

/// Files copied from the base folder when present.
pub const COPIED_FILES: &[&str] = &[
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
];

/// Where a written tensor's bytes come from.
pub enum TensorData {
    /// Copied byte for byte.
    Raw(TensorRef),
    /// Rows of f32 values, stored as the tensor's dtype (F32/F16/BF16, RNE).
    Rows(Box<dyn RowSource>),
}

/// One tensor to write.
pub struct OutTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: TensorData,
}

impl OutTensor {
    pub fn n_bytes(&self) -> u64 {
        (self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8) as u64
    }
}

fn ggml_of(d: Dtype) -> Option<GgmlType> {
    match d {
        Dtype::F32 => Some(GgmlType::F32),
        Dtype::F16 => Some(GgmlType::F16),
        Dtype::BF16 => Some(GgmlType::BF16),
        _ => None,
    }
}

/// Write one tensor's bytes.
fn fill(t: OutTensor, w: &mut dyn Write, progress: &mut dyn FnMut(u64)) -> Result<()> {
    match t.data {
        TensorData::Raw(r) => {
            for c in r.bytes().chunks(1 << 24) {
                w.write_all(c)?;
                progress(c.len() as u64);
            }
            r.release();
        }
        TensorData::Rows(src) => {
            let ty = ggml_of(t.dtype)
                .ok_or_else(|| anyhow!("internal: {} rows as {:?}", t.name, t.dtype))?;
            let (rows, cols) = (src.rows(), src.cols());
            let pt = PlannedTensor {
                name: t.name.clone(),
                ne: vec![cols as u64, rows as u64],
                target: ty,
                source: src,
                origin: String::new(),
                source_dtype: String::new(),
                transforms: vec![],
            };
            exec::run_tensor(
                &pt,
                false,
                |bytes| {
                    w.write_all(bytes)?;
                    progress(bytes.len() as u64);
                    Ok(())
                },
                |_| {},
            )?;
        }
    }
    Ok(())
}

/// Write `tensors` (in state-dict order) as safetensors shards + index into `dir` with the
/// shared sharded writer. Returns the file names written.
pub fn write_shards(
    dir: &AtomicDir,
    tensors: Vec<OutTensor>,
    max_shard_size: u64,
    progress: &mut dyn FnMut(u64),
) -> Result<Vec<String>> {
    let planned: Vec<WPlanned> = tensors
        .iter()
        .map(|t| WPlanned::new(t.name.clone(), t.dtype, t.shape.clone()))
        .collect();
    let opts = WriterOptions {
        max_shard_size,
        total_parameters: Some(planned.iter().map(WPlanned::n_elements).sum()),
        ..Default::default()
    };
    let writer = ShardedWriter::plan(planned, &opts)?;
    let mut slots: HashMap<String, OutTensor> =
        tensors.into_iter().map(|t| (t.name.clone(), t)).collect();
    writer.write(dir, |p, w| {
        let t = slots
            .remove(&p.name)
            .ok_or_else(|| anyhow!("internal: tensor {:?} written twice", p.name))?;
        fill(t, w, progress)
    })
}

/// A JSON value with every object's keys sorted (Python's `json.dumps(sort_keys=True)`).
pub fn sorted(v: Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut e: Vec<(String, Value)> = m.into_iter().collect();
            e.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(e.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        Value::Array(a) => Value::Array(a.into_iter().map(sorted).collect()),
        other => other,
    }
}

/// config.json for the merged model: the base's, with the dtype transformers records
/// (`dtype` in transformers 5, `torch_dtype` in 4.x; whichever the base has, `dtype` if none).
pub fn merged_config(base: &HfCheckpoint, ty: FloatType) -> Value {
    let mut c = base.json.clone();
    // a 4-bit base is written dequantized
    c.remove("quantization_config");
    let name = Value::String(ty.torch_name().into());
    let mut set = false;
    for k in ["dtype", "torch_dtype"] {
        if c.contains_key(k) {
            c.insert(k.into(), name.clone());
            set = true;
        }
        if let Some(Value::Object(tc)) = c.get_mut("text_config")
            && tc.contains_key(k)
        {
            tc.insert(k.into(), name.clone());
        }
    }
    if !set {
        c.insert("dtype".into(), name);
    }
    sorted(Value::Object(c))
}

/// The tensors of a merge plan as writer input.
pub fn out_tensors(plan: &MergePlan) -> Vec<OutTensor> {
    plan.tensors
        .iter()
        .map(|j: &TensorJob| OutTensor {
            name: j.name.clone(),
            dtype: j.dtype(),
            shape: j.shape.clone(),
            data: if j.is_plain_copy() || j.ty.is_none() {
                TensorData::Raw(j.input.tensor().clone())
            } else {
                TensorData::Rows(Box::new(j.rows()))
            },
        })
        .collect()
}

/// What was written.
pub struct Written {
    pub files: Vec<String>,
    pub bytes: u64,
}

/// Write the merged HF folder at `out` (whole or not at all).
pub fn write_hf_folder(
    out: &Path,
    base: &HfCheckpoint,
    plan: &MergePlan,
    max_shard_size: u64,
    progress: &mut dyn FnMut(u64),
) -> Result<Written> {
    if out.is_dir() && std::fs::read_dir(out).map(|mut d| d.next().is_some())? {
        let ours = out.join("config.json").is_file()
            && (out.join("model.safetensors").is_file()
                || out.join("model.safetensors.index.json").is_file());
        if !ours {
            bail!(
                "{}: folder exists and is not empty (nor a model folder to replace)",
                out.display()
            );
        }
    }
    let dir = AtomicDir::create(out)?;
    let mut files = write_shards(&dir, out_tensors(plan), max_shard_size, progress)?;
    let cfg = merged_config(base, plan.model_type);
    let p = dir.path("config.json");
    std::fs::write(&p, serde_json::to_string_pretty(&cfg)? + "\n")
        .with_context(|| format!("{}: cannot write", p.display()))?;
    files.push("config.json".into());
    for f in COPIED_FILES {
        let src = base.dir.join(f);
        if src.is_file() {
            std::fs::copy(&src, dir.path(f))
                .with_context(|| format!("{}: cannot copy", src.display()))?;
            files.push(f.to_string());
        }
    }
    dir.commit()?;
    Ok(Written {
        files,
        bytes: plan.total_bytes(),
    })
}
