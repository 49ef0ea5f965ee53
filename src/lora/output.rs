//! The merged model as an HF folder like `save_pretrained` writes it: safetensors shards
//! (split as huggingface_hub splits them) + `model.safetensors.index.json`, config.json with
//! the dtype key, tokenizer files, chat template and generation config copied.
//!
//! The shard writer here is a small streaming one behind [`write_shards`]; it is meant to be
//! replaced by the shared `checkpoint::writer` once that lands.

use super::merge::{BaseModel, FloatType, MergePlan, TensorJob};
use crate::checkpoint::TensorRef;
use crate::exec;
use crate::output::AtomicDir;
use crate::plan::{PlannedTensor, RowSource};
use crate::quant::GgmlType;
use anyhow::{Context, Result, anyhow, bail};
use safetensors::Dtype;
use safetensors::tensor::{Metadata, TensorInfo};
use serde_json::Value;
use std::collections::HashMap;
use std::io::{BufWriter, Write};
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

/// `--max-shard-size`: an integer (bytes) or a number with KB/MB/GB (powers of 10) or
/// KiB/MiB/GiB (powers of 2), as transformers' `convert_file_size_to_int` reads it.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let up = t.to_ascii_uppercase();
    let units: &[(&str, f64)] = &[
        ("GIB", (1u64 << 30) as f64),
        ("MIB", (1u64 << 20) as f64),
        ("KIB", (1u64 << 10) as f64),
        ("GB", 1e9),
        ("MB", 1e6),
        ("KB", 1e3),
        ("B", 1.0),
    ];
    for (u, m) in units {
        if let Some(n) = up.strip_suffix(u) {
            let n: f64 = n
                .trim()
                .parse()
                .map_err(|_| format!("invalid size {s:?} (e.g. 5GB, 500MB, 2GiB)"))?;
            if n <= 0.0 || !n.is_finite() {
                return Err(format!("size {s:?} must be positive"));
            }
            return Ok((n * m) as u64);
        }
    }
    t.parse::<u64>()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("invalid size {s:?} (e.g. 5GB, 500MB, 2GiB)"))
}

/// huggingface_hub's `split_state_dict_into_shards`: in order, a tensor larger than the limit
/// gets a shard of its own; otherwise a new shard starts when the tensor would overflow the
/// current one. Returns the index ranges of each shard's tensors.
pub fn split_shards(sizes: &[u64], max: u64) -> Vec<Vec<usize>> {
    let mut shards = vec![];
    let mut cur = vec![];
    let mut cur_size = 0u64;
    for (i, &s) in sizes.iter().enumerate() {
        if s > max {
            shards.push(vec![i]);
            continue;
        }
        if cur_size + s > max && !cur.is_empty() {
            shards.push(std::mem::take(&mut cur));
            cur_size = 0;
        }
        cur.push(i);
        cur_size += s;
    }
    if !cur.is_empty() {
        shards.push(cur);
    }
    shards
}

/// Shard file names: `model.safetensors` alone, else `model-0000i-of-0000n.safetensors`.
pub fn shard_file_names(n: usize) -> Vec<String> {
    if n == 1 {
        vec!["model.safetensors".into()]
    } else {
        (1..=n)
            .map(|i| format!("model-{i:05}-of-{n:05}.safetensors"))
            .collect()
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

/// Write one safetensors file: header as the safetensors crate lays it out (tensors sorted
/// by dtype, largest first, then name; metadata `{"format": "pt"}`), data streamed.
fn write_one(
    path: &Path,
    mut tensors: Vec<OutTensor>,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    tensors.sort_by(|a, b| b.dtype.cmp(&a.dtype).then(a.name.cmp(&b.name)));
    let mut infos = Vec::with_capacity(tensors.len());
    let mut off = 0usize;
    for t in &tensors {
        let n = t.n_bytes() as usize;
        infos.push((
            t.name.clone(),
            TensorInfo {
                dtype: t.dtype,
                shape: t.shape.clone(),
                data_offsets: (off, off + n),
            },
        ));
        off += n;
    }
    let md: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let meta = Metadata::new(Some(md), infos)
        .map_err(|e| anyhow!("{}: cannot build header: {e}", path.display()))?;
    let mut header = serde_json::to_string(&meta)?.into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    let f = std::fs::File::create(path)
        .with_context(|| format!("{}: cannot create", path.display()))?;
    let mut w = BufWriter::with_capacity(1 << 22, f);
    let werr = |e: std::io::Error| anyhow!("{}: write failed: {e}", path.display());
    w.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(werr)?;
    w.write_all(&header).map_err(werr)?;
    for t in tensors {
        match t.data {
            TensorData::Raw(r) => {
                for c in r.bytes().chunks(1 << 24) {
                    w.write_all(c).map_err(werr)?;
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
                        w.write_all(bytes).map_err(werr)?;
                        progress(bytes.len() as u64);
                        Ok(())
                    },
                    |_| {},
                )?;
            }
        }
    }
    let f = w
        .into_inner()
        .map_err(|e| anyhow!("{}: write failed: {}", path.display(), e.error()))?;
    f.sync_all().ok();
    Ok(())
}

/// Write `tensors` (in state-dict order) as shards into folder `dir`, plus the index when
/// there is more than one shard. Returns the file names written.
pub fn write_shards(
    dir: &Path,
    tensors: Vec<OutTensor>,
    max_shard_size: u64,
    progress: &mut dyn FnMut(u64),
) -> Result<Vec<String>> {
    let sizes: Vec<u64> = tensors.iter().map(OutTensor::n_bytes).collect();
    let total: u64 = sizes.iter().sum();
    let groups = split_shards(&sizes, max_shard_size);
    let names = shard_file_names(groups.len());
    let mut slots: Vec<Option<OutTensor>> = tensors.into_iter().map(Some).collect();
    let mut weight_map = serde_json::Map::new();
    for (g, file) in groups.iter().zip(&names) {
        let ts: Vec<OutTensor> = g.iter().map(|&i| slots[i].take().unwrap()).collect();
        for t in &ts {
            weight_map.insert(t.name.clone(), Value::String(file.clone()));
        }
        write_one(&dir.join(file), ts, progress)?;
    }
    let mut files = names.clone();
    if names.len() > 1 {
        let idx = serde_json::json!({
            "metadata": {"total_size": total},
            "weight_map": sorted(Value::Object(weight_map)),
        });
        let p = dir.join("model.safetensors.index.json");
        std::fs::write(&p, serde_json::to_string_pretty(&idx)? + "\n")
            .with_context(|| format!("{}: cannot write", p.display()))?;
        files.push("model.safetensors.index.json".into());
    }
    Ok(files)
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
pub fn merged_config(base: &BaseModel, ty: FloatType) -> Value {
    let mut c = base.config.clone();
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
    base: &BaseModel,
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
    let mut files = write_shards(&dir.path(""), out_tensors(plan), max_shard_size, progress)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_split_like_huggingface_hub() {
        // limit 10: [4, 4] | 12 alone (appended while [4] is still open) | [4, 5, 1]
        assert_eq!(
            split_shards(&[4, 4, 4, 12, 5, 1], 10),
            vec![vec![0, 1], vec![3], vec![2, 4, 5]]
        );
        assert_eq!(split_shards(&[1, 2, 3], 100), vec![vec![0, 1, 2]]);
        assert_eq!(shard_file_names(1), ["model.safetensors"]);
        assert_eq!(
            shard_file_names(2)[1],
            "model-00002-of-00002.safetensors".to_string()
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("5GB"), Ok(5_000_000_000));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("1024"), Ok(1024));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("0").is_err());
    }
}
