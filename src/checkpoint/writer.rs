//! Streaming sharded safetensors writer, laid out as transformers' `save_pretrained` writes a
//! model (used by the NF4 output and the LoRA merge).
//!
//! 1. Plan every tensor up front ([`PlannedTensor`]: name, dtype, shape), in the order the model's
//!    `state_dict()` would list them. [`ShardedWriter::plan`] splits them into shards exactly as
//!    huggingface_hub's `split_state_dict_into_shards_factory` does: walk the tensors in order, a
//!    tensor larger than the limit gets a shard of its own, otherwise a new shard starts when the
//!    next tensor would push the current one over the limit.
//! 2. [`ShardedWriter::write`] writes each shard into an [`AtomicDir`], asking a callback for one
//!    tensor's bytes at a time (never the whole model in memory), in the order the `safetensors`
//!    library stores them (descending dtype, then name), with the header that library writes
//!    (`__metadata__` {"format": "pt"} by default, 8-byte aligned with spaces). One shard is
//!    `model.safetensors`; several are `model-00001-of-0000N.safetensors` plus
//!    `model.safetensors.index.json` (`metadata.total_size`, optional `metadata.total_parameters`,
//!    `weight_map`; 2-space indent, sorted keys, trailing newline, as transformers writes it).
//!
//! ```no_run
//! use ftconv::checkpoint::writer::{PlannedTensor, ShardedWriter, WriterOptions};
//! use ftconv::output::AtomicDir;
//! use safetensors::Dtype;
//! # fn main() -> anyhow::Result<()> {
//! let plan = vec![PlannedTensor::new("model.norm.weight", Dtype::F32, vec![4])];
//! let w = ShardedWriter::plan(plan, &WriterOptions::default())?;
//! let dir = AtomicDir::create(std::path::Path::new("out"))?;
//! w.write(&dir, |t, out| {
//!     out.write_all(&vec![0u8; t.byte_len() as usize])?;
//!     Ok(())
//! })?;
//! dir.commit()?;
//! # Ok(()) }
//! ```

use crate::output::AtomicDir;
use anyhow::{Context, Result, bail};
use safetensors::Dtype;
use safetensors::tensor::{Metadata, TensorInfo};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufWriter, Write};

/// transformers' default `max_shard_size` ("50GB", decimal).
pub const DEFAULT_MAX_SHARD_SIZE: u64 = 50_000_000_000;

/// One tensor of the output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl PlannedTensor {
    pub fn new(name: impl Into<String>, dtype: Dtype, shape: Vec<usize>) -> PlannedTensor {
        PlannedTensor {
            name: name.into(),
            dtype,
            shape,
        }
    }

    pub fn n_elements(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }

    /// Bytes of its data.
    pub fn byte_len(&self) -> u64 {
        self.n_elements() * dtype_size(self.dtype) as u64
    }
}

/// Bytes per element of a whole-byte safetensors dtype (sub-byte types are refused by
/// [`ShardedWriter::plan`]).
pub fn dtype_size(d: Dtype) -> usize {
    d.bitsize().div_ceil(8)
}

/// How to split and label the output.
#[derive(Clone, Debug)]
pub struct WriterOptions {
    /// Largest shard in bytes of tensor data (transformers' `max_shard_size`).
    pub max_shard_size: u64,
    /// The safetensors `__metadata__` map of every shard.
    pub metadata: BTreeMap<String, String>,
    /// `metadata.total_parameters` of the index (transformers 5 writes `num_parameters()`).
    pub total_parameters: Option<u64>,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            max_shard_size: DEFAULT_MAX_SHARD_SIZE,
            metadata: BTreeMap::from([("format".to_string(), "pt".to_string())]),
            total_parameters: None,
        }
    }
}

/// One output file and the tensors in it (indices into the plan, in file order).
#[derive(Clone, Debug)]
pub struct Shard {
    pub file: String,
    pub tensors: Vec<usize>,
    pub data_bytes: u64,
}

/// A planned sharded output.
pub struct ShardedWriter {
    tensors: Vec<PlannedTensor>,
    shards: Vec<Shard>,
    total_size: u64,
    opts: WriterOptions,
}

impl ShardedWriter {
    /// Validate the plan (unique names) and split it into shards.
    pub fn plan(tensors: Vec<PlannedTensor>, opts: &WriterOptions) -> Result<ShardedWriter> {
        let mut seen = HashSet::new();
        for t in &tensors {
            if t.dtype.bitsize() % 8 != 0 {
                bail!(
                    "internal: tensor {:?} has sub-byte dtype {:?}",
                    t.name,
                    t.dtype
                );
            }
            if !seen.insert(t.name.as_str()) {
                bail!("internal: tensor {:?} planned twice", t.name);
            }
        }
        let mut groups: Vec<Vec<usize>> = vec![];
        let mut current: Vec<usize> = vec![];
        let mut current_size = 0u64;
        let mut total_size = 0u64;
        for (i, t) in tensors.iter().enumerate() {
            let size = t.byte_len();
            total_size += size;
            if size > opts.max_shard_size {
                groups.push(vec![i]);
                continue;
            }
            if current_size + size > opts.max_shard_size {
                groups.push(std::mem::take(&mut current));
                current_size = 0;
            }
            current.push(i);
            current_size += size;
        }
        if !current.is_empty() || groups.is_empty() {
            groups.push(current);
        }
        let n = groups.len();
        let shards = groups
            .into_iter()
            .enumerate()
            .map(|(k, mut idx)| {
                // the safetensors library's order: descending dtype, then name
                idx.sort_by(|&a, &b| {
                    tensors[b]
                        .dtype
                        .cmp(&tensors[a].dtype)
                        .then(tensors[a].name.cmp(&tensors[b].name))
                });
                Shard {
                    file: if n == 1 {
                        "model.safetensors".to_string()
                    } else {
                        format!("model-{:05}-of-{n:05}.safetensors", k + 1)
                    },
                    data_bytes: idx.iter().map(|&i| tensors[i].byte_len()).sum(),
                    tensors: idx,
                }
            })
            .collect();
        Ok(ShardedWriter {
            tensors,
            shards,
            total_size,
            opts: opts.clone(),
        })
    }

    pub fn tensors(&self) -> &[PlannedTensor] {
        &self.tensors
    }

    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// Sum of all tensor data bytes (the index's `total_size`).
    pub fn total_size(&self) -> u64 {
        self.total_size
    }

    /// The safetensors header of a shard (length prefix not included), as the library writes it.
    pub fn header(&self, shard: &Shard) -> Result<Vec<u8>> {
        let mut offset = 0usize;
        let mut infos = Vec::with_capacity(shard.tensors.len());
        for &i in &shard.tensors {
            let t = &self.tensors[i];
            let n = t.byte_len() as usize;
            infos.push((
                t.name.clone(),
                TensorInfo {
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    data_offsets: (offset, offset + n),
                },
            ));
            offset += n;
        }
        let md: HashMap<String, String> = self.opts.metadata.clone().into_iter().collect();
        let md = if md.is_empty() { None } else { Some(md) };
        let metadata = Metadata::new(md, infos)
            .map_err(|e| anyhow::anyhow!("internal: bad safetensors plan: {e}"))?;
        let mut buf = serde_json::to_string(&metadata)?.into_bytes();
        buf.resize(buf.len().next_multiple_of(8), b' ');
        Ok(buf)
    }

    /// The index JSON (only meaningful with several shards).
    pub fn index_json(&self) -> String {
        let mut md = serde_json::Map::new();
        if let Some(p) = self.opts.total_parameters {
            md.insert("total_parameters".into(), p.into());
        }
        md.insert("total_size".into(), self.total_size.into());
        let wm: BTreeMap<&str, &str> = self
            .shards
            .iter()
            .flat_map(|s| {
                s.tensors
                    .iter()
                    .map(move |&i| (self.tensors[i].name.as_str(), s.file.as_str()))
            })
            .collect();
        let v = serde_json::json!({ "metadata": md, "weight_map": wm });
        serde_json::to_string_pretty(&v).unwrap() + "\n"
    }

    /// Write every shard (and the index when sharded) into `dir`. `fill(tensor, out)` must write
    /// exactly `tensor.byte_len()` bytes; it is called once per tensor, in file order. Returns the
    /// file names written.
    pub fn write<F>(&self, dir: &AtomicDir, mut fill: F) -> Result<Vec<String>>
    where
        F: FnMut(&PlannedTensor, &mut dyn Write) -> Result<()>,
    {
        let mut files = vec![];
        for shard in &self.shards {
            let path = dir.path(&shard.file);
            let f = std::fs::File::create(&path)
                .with_context(|| format!("{}: cannot create", path.display()))?;
            let mut w = Counting {
                inner: BufWriter::with_capacity(1 << 22, f),
                n: 0,
            };
            let header = self.header(shard)?;
            w.write_all(&(header.len() as u64).to_le_bytes())
                .and_then(|_| w.write_all(&header))
                .with_context(|| format!("{}: write failed", path.display()))?;
            for &i in &shard.tensors {
                let t = &self.tensors[i];
                let before = w.n;
                fill(t, &mut w).with_context(|| format!("tensor {:?}", t.name))?;
                let wrote = w.n - before;
                if wrote != t.byte_len() {
                    bail!(
                        "internal: tensor {:?} produced {wrote} bytes, {} planned",
                        t.name,
                        t.byte_len()
                    );
                }
            }
            w.inner
                .flush()
                .with_context(|| format!("{}: write failed", path.display()))?;
            files.push(shard.file.clone());
        }
        if self.shards.len() > 1 {
            let name = "model.safetensors.index.json";
            let path = dir.path(name);
            std::fs::write(&path, self.index_json())
                .with_context(|| format!("{}: cannot write", path.display()))?;
            files.push(name.to_string());
        }
        Ok(files)
    }
}

/// A writer that counts the bytes through it.
struct Counting<W: Write> {
    inner: W,
    n: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let k = self.inner.write(buf)?;
        self.n += k as u64;
        Ok(k)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, dtype: Dtype, n: usize) -> PlannedTensor {
        PlannedTensor::new(name, dtype, vec![n])
    }

    #[test]
    fn splits_like_huggingface_hub() {
        // the docstring's example: [6, 6, 2, 6, 2, 2] with a limit of 10 → [6], [6+2], [6+2+2]
        let plan: Vec<PlannedTensor> = [6, 6, 2, 6, 2, 2]
            .iter()
            .enumerate()
            .map(|(i, &s)| t(&format!("t{i}"), Dtype::U8, s))
            .collect();
        let opts = WriterOptions {
            max_shard_size: 10,
            ..Default::default()
        };
        let w = ShardedWriter::plan(plan, &opts).unwrap();
        let sizes: Vec<u64> = w.shards().iter().map(|s| s.data_bytes).collect();
        assert_eq!(sizes, vec![6, 8, 10]);
        assert_eq!(w.shards()[2].file, "model-00003-of-00003.safetensors");
        // a tensor over the limit gets its own shard, appended before the current one
        let plan = vec![
            t("a", Dtype::U8, 3),
            t("big", Dtype::U8, 20),
            t("b", Dtype::U8, 3),
        ];
        let w = ShardedWriter::plan(plan, &opts).unwrap();
        let names: Vec<Vec<&str>> = w
            .shards()
            .iter()
            .map(|s| {
                s.tensors
                    .iter()
                    .map(|&i| w.tensors()[i].name.as_str())
                    .collect()
            })
            .collect();
        assert_eq!(names, vec![vec!["big"], vec!["a", "b"]]);
    }

    #[test]
    fn file_order_and_index() {
        let plan = vec![
            t("z.weight", Dtype::U8, 4),
            t("b.weight", Dtype::BF16, 2),
            t("a.absmax", Dtype::F32, 1),
            t("a.weight", Dtype::U8, 4),
        ];
        let opts = WriterOptions {
            total_parameters: Some(7),
            ..Default::default()
        };
        let w = ShardedWriter::plan(plan, &opts).unwrap();
        let order: Vec<&str> = w.shards()[0]
            .tensors
            .iter()
            .map(|&i| w.tensors()[i].name.as_str())
            .collect();
        assert_eq!(order, vec!["a.absmax", "b.weight", "a.weight", "z.weight"]);
        assert_eq!(w.total_size(), 16);
        assert_eq!(
            w.index_json(),
            "{\n  \"metadata\": {\n    \"total_parameters\": 7,\n    \"total_size\": 16\n  },\n  \"weight_map\": {\n    \"a.absmax\": \"model.safetensors\",\n    \"a.weight\": \"model.safetensors\",\n    \"b.weight\": \"model.safetensors\",\n    \"z.weight\": \"model.safetensors\"\n  }\n}\n"
        );
    }
}
