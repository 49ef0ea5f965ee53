//! Plans for GGUF outputs: an HF checkpoint (convert_hf_to_gguf.py then llama-quantize),
//! an F32/F16/BF16 GGUF (llama-quantize), or a bare safetensors file (each tensor as-is).

use crate::arch::{self, Applied, ConvertedSource};
use crate::checkpoint::{HfCheckpoint, StFile};
use crate::gguf::{GgufFile, Metadata, Value};
use crate::plan::{
    GgufRows, Plan, PlannedTensor, Rounding, RowSource, SafetensorsRows, VecRows, ne_of_shape,
};
use crate::quant::policy::{self, ModelInfo, TensorDesc};
use crate::quant::{Ftype, GgmlType};
use anyhow::{Result, anyhow, bail};
use std::path::Path;
use std::sync::Arc;

/// Options shared by every GGUF plan.
#[derive(Clone, Debug)]
pub struct QuantOptions {
    pub ftype: Ftype,
    pub pure: bool,
}

/// A tensor before its target type is chosen.
pub struct Pending {
    pub name: String,
    pub ne: Vec<u64>,
    pub stored: GgmlType,
    pub source: Box<dyn RowSource>,
    pub origin: String,
    pub source_dtype: String,
    pub transforms: Vec<String>,
}

/// Sort into llama-quantize's order, choose types, and build the plan.
pub fn finish_plan(
    mut pending: Vec<Pending>,
    mut md: Metadata,
    info: &ModelInfo,
    opts: &QuantOptions,
    input_bytes: u64,
) -> Plan {
    policy::sort_names(&mut pending, |p| p.name.as_str());
    let types = {
        let descs: Vec<TensorDesc> = pending
            .iter()
            .map(|p| TensorDesc {
                name: &p.name,
                ne: &p.ne,
                stored: p.stored,
            })
            .collect();
        policy::choose_types(&descs, opts.ftype, opts.pure, info)
    };
    // llama-quantize re-sets these two keys, which moves them to the end.
    md.set_last("general.quantization_version", Value::U32(2));
    md.set_last("general.file_type", Value::U32(opts.ftype.id()));
    for k in ["split.no", "split.count", "split.tensors.count"] {
        md.remove(k);
    }
    let tensors = pending
        .into_iter()
        .zip(types)
        .map(|(p, target)| PlannedTensor {
            name: p.name,
            ne: p.ne,
            target,
            source: p.source,
            origin: p.origin,
            source_dtype: p.source_dtype,
            transforms: p.transforms,
        })
        .collect();
    Plan {
        metadata: md,
        tensors,
        type_name: opts.ftype.name().to_string(),
        input_bytes,
    }
}

/// Per-tensor hooks that can replace a tensor's rows (used by the LoRA merge).
pub type RowHook<'a> = &'a dyn Fn(&str, Box<dyn RowSource>) -> Result<Box<dyn RowSource>>;

/// The tensors convert_hf_to_gguf.py would write for `ck`, with the values llama-quantize
/// would read back (rounded through the converter's storage type).
pub fn hf_pending(ck: &HfCheckpoint, hook: Option<RowHook>) -> Result<(Vec<Pending>, GgmlType)> {
    let outtype = arch::auto_outtype(ck);
    let converted = arch::converted_tensors(ck, outtype)?;
    let mut pending = Vec::with_capacity(converted.len());
    for c in converted {
        let mut transforms = vec![];
        let heads = c.permute_heads();
        let (source, origin, dtype): (Box<dyn RowSource>, String, String) = match c.source {
            ConvertedSource::Tensor(t) => {
                let rounding = Rounding::for_stored(c.stored);
                let src_dtype = crate::checkpoint::safetensors::dtype_name(t.dtype);
                let exact = matches!(
                    (rounding, src_dtype.as_str()),
                    (Rounding::BF16, "BF16") | (Rounding::F16, "F16")
                );
                let origin = format!(
                    "{}:{}",
                    t.file
                        .file_name()
                        .map(|n| n.to_string_lossy().to_string())
                        .unwrap_or_default(),
                    t.name
                );
                let hf_name = t.name.clone();
                let src_rounding = Rounding::for_dtype(t.dtype);
                // a hook (LoRA merge) sees the checkpoint's rows in their own order; the
                // transforms then apply to its result
                let mut src: Box<dyn RowSource> = Box::new(SafetensorsRows {
                    tensor: t,
                    permute_heads: if hook.is_some() { None } else { heads },
                    rounding: Rounding::None,
                });
                if let Some(hook) = hook {
                    src = hook(&hf_name, src)?;
                    if let Some(heads) = heads {
                        src = Box::new(Permuted { inner: src, heads });
                    }
                }
                if let Some(h) = heads {
                    transforms.push(format!("permute rows ({h} heads)"));
                }
                for tr in &c.transforms {
                    match *tr {
                        Applied::Permute(_) => {}
                        Applied::Add(v) => {
                            transforms.push(format!("+ {v} (in {src_dtype})"));
                            src = Box::new(Shifted {
                                inner: src,
                                add: v as f32,
                                rounding: src_rounding,
                            });
                        }
                        Applied::TruncateRows(n) => {
                            transforms.push(format!("first {n} rows"));
                            src = Box::new(Truncated {
                                inner: src,
                                rows: n,
                            });
                        }
                    }
                }
                if rounding != Rounding::None && !exact {
                    transforms.push(format!("round to {} (converter storage)", c.stored));
                }
                // rounding through the storage type happens after any merge
                let plain = hook.is_none()
                    && c.transforms
                        .iter()
                        .all(|t| matches!(t, Applied::Permute(_)));
                let src: Box<dyn RowSource> = if rounding == Rounding::None || exact && plain {
                    src
                } else {
                    Box::new(Rounded {
                        inner: src,
                        rounding,
                    })
                };
                (src, origin, src_dtype)
            }
            ConvertedSource::Stacked(parts) => {
                let src_dtype = crate::checkpoint::safetensors::dtype_name(parts[0].dtype);
                let origin = format!("{} experts: {} …", parts.len(), parts[0].name);
                transforms.push(format!("stack {} experts", parts.len()));
                let rounding = Rounding::for_stored(c.stored);
                let mut src: Box<dyn RowSource> = Box::new(StackedRows::new(parts, hook)?);
                if let Some(h) = heads {
                    src = Box::new(Permuted {
                        inner: src,
                        heads: h,
                    });
                }
                if rounding != Rounding::None {
                    src = Box::new(Rounded {
                        inner: src,
                        rounding,
                    });
                }
                (src, origin, src_dtype)
            }
            ConvertedSource::Generated(v) => {
                let n = v.len();
                (
                    Box::new(VecRows { data: v, cols: n }),
                    "generated (llama3 rope scaling)".into(),
                    "F32".into(),
                )
            }
        };
        pending.push(Pending {
            name: c.name,
            ne: ne_of_shape(&c.shape),
            stored: c.stored,
            source,
            origin,
            source_dtype: dtype,
            transforms,
        });
    }
    Ok((pending, outtype))
}

/// Experts' tensors read as one tensor stacked along a new first axis.
pub struct StackedRows {
    parts: Vec<Box<dyn RowSource>>,
    rows_each: usize,
    cols: usize,
}

impl StackedRows {
    pub fn new(
        parts: Vec<crate::checkpoint::TensorRef>,
        hook: Option<RowHook>,
    ) -> Result<StackedRows> {
        let rows_each = parts[0].rows();
        let cols = parts[0].cols();
        let parts = parts
            .into_iter()
            .map(|t| {
                let name = t.name.clone();
                let src: Box<dyn RowSource> = Box::new(SafetensorsRows {
                    tensor: t,
                    permute_heads: None,
                    rounding: Rounding::None,
                });
                match hook {
                    Some(h) => h(&name, src),
                    None => Ok(src),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(StackedRows {
            parts,
            rows_each,
            cols,
        })
    }
}

impl RowSource for StackedRows {
    fn rows(&self) -> usize {
        self.rows_each * self.parts.len()
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn read_rows(&self, row0: usize, out: &mut [f32]) -> Result<()> {
        let mut r = row0;
        let mut done = 0;
        let n = out.len() / self.cols;
        while done < n {
            let (p, i) = (r / self.rows_each, r % self.rows_each);
            let k = (self.rows_each - i).min(n - done);
            self.parts[p].read_rows(i, &mut out[done * self.cols..(done + k) * self.cols])?;
            done += k;
            r += k;
        }
        Ok(())
    }
    fn release(&self) {
        self.parts.iter().for_each(|p| p.release())
    }
}

/// Another source's values plus a constant, computed in the source's own dtype (torch's
/// `data_torch + 1` on a bf16 tensor gives bf16).
pub struct Shifted {
    pub inner: Box<dyn RowSource>,
    pub add: f32,
    pub rounding: Rounding,
}

impl RowSource for Shifted {
    fn rows(&self) -> usize {
        self.inner.rows()
    }
    fn cols(&self) -> usize {
        self.inner.cols()
    }
    fn read_rows(&self, row0: usize, out: &mut [f32]) -> Result<()> {
        self.inner.read_rows(row0, out)?;
        for x in out.iter_mut() {
            *x += self.add;
        }
        self.rounding.apply(out);
        Ok(())
    }
    fn release(&self) {
        self.inner.release()
    }
    fn prefers_batches(&self) -> bool {
        self.inner.prefers_batches()
    }
}

/// The first `rows` rows of another source.
pub struct Truncated {
    pub inner: Box<dyn RowSource>,
    pub rows: usize,
}

impl RowSource for Truncated {
    fn rows(&self) -> usize {
        self.rows.min(self.inner.rows())
    }
    fn cols(&self) -> usize {
        self.inner.cols()
    }
    fn read_rows(&self, row0: usize, out: &mut [f32]) -> Result<()> {
        self.inner.read_rows(row0, out)
    }
    fn release(&self) {
        self.inner.release()
    }
    fn prefers_batches(&self) -> bool {
        self.inner.prefers_batches()
    }
}

/// Another source's rows in llama's Q/K order (as `SafetensorsRows::permute_heads`).
pub struct Permuted {
    pub inner: Box<dyn RowSource>,
    pub heads: usize,
}

impl RowSource for Permuted {
    fn rows(&self) -> usize {
        self.inner.rows()
    }
    fn cols(&self) -> usize {
        self.inner.cols()
    }
    fn read_rows(&self, row0: usize, out: &mut [f32]) -> Result<()> {
        let (rows, cols) = (self.inner.rows(), self.inner.cols());
        if rows == 1 {
            // a bias: permute single elements
            let mut all = vec![0f32; cols];
            self.inner.read_rows(0, &mut all)?;
            for (i, o) in out.iter_mut().enumerate() {
                *o = all[arch::permuted_source_row(i, cols, self.heads)];
            }
        } else if self.inner.prefers_batches() {
            // one read of the source rows these rows come from (a permutation stays within a
            // head, so they are a compact range), then the rows in their new order
            let n = out.len() / cols;
            let src: Vec<usize> = (0..n)
                .map(|k| arch::permuted_source_row(row0 + k, rows, self.heads))
                .collect();
            let (lo, hi) = (
                src.iter().copied().min().unwrap_or(0),
                src.iter().copied().max().unwrap_or(0),
            );
            let mut buf = vec![0f32; (hi + 1 - lo) * cols];
            self.inner.read_rows(lo, &mut buf)?;
            for (chunk, s) in out.chunks_exact_mut(cols).zip(src) {
                chunk.copy_from_slice(&buf[(s - lo) * cols..(s - lo + 1) * cols]);
            }
        } else {
            for (k, chunk) in out.chunks_exact_mut(cols).enumerate() {
                let src = arch::permuted_source_row(row0 + k, rows, self.heads);
                self.inner.read_rows(src, chunk)?;
            }
        }
        Ok(())
    }
    fn release(&self) {
        self.inner.release()
    }
    fn prefers_batches(&self) -> bool {
        self.inner.prefers_batches()
    }
}

/// Rounds another source's rows through F16/BF16.
pub struct Rounded {
    pub inner: Box<dyn RowSource>,
    pub rounding: Rounding,
}

impl RowSource for Rounded {
    fn rows(&self) -> usize {
        self.inner.rows()
    }
    fn cols(&self) -> usize {
        self.inner.cols()
    }
    fn read_rows(&self, row0: usize, out: &mut [f32]) -> Result<()> {
        self.inner.read_rows(row0, out)?;
        self.rounding.apply(out);
        Ok(())
    }
    fn release(&self) {
        self.inner.release()
    }
    fn prefers_batches(&self) -> bool {
        self.inner.prefers_batches()
    }
}

pub fn model_info(ck: &HfCheckpoint) -> Result<ModelInfo> {
    let c = ck.config()?;
    Ok(ModelInfo {
        arch: c.arch.gguf_arch.clone(),
        n_layer: c.num_hidden_layers,
        n_head: c.num_attention_heads,
        n_head_kv: c.num_key_value_heads,
        n_expert: c.n_expert,
    })
}

/// HF checkpoint → GGUF plan.
pub fn plan_hf(ck: &HfCheckpoint, opts: &QuantOptions, hook: Option<RowHook>) -> Result<Plan> {
    let (pending, outtype) = hf_pending(ck, hook)?;
    let n_params: u64 = pending.iter().map(|p| p.ne.iter().product::<u64>()).sum();
    let md = arch::model_metadata(ck, outtype, n_params)?;
    Ok(finish_plan(
        pending,
        md,
        &model_info(ck)?,
        opts,
        ck.data_bytes(),
    ))
}

/// F32/F16/BF16 GGUF → re-quantized GGUF plan (metadata kept, as llama-quantize does).
pub fn plan_gguf(path: &Path, opts: &QuantOptions) -> Result<Plan> {
    let g = Arc::new(GgufFile::open(path)?);
    let arch_name = g
        .architecture()
        .ok_or_else(|| anyhow!("{}: key general.architecture is missing", path.display()))?
        .to_string();
    let md_u = |k: &str| g.metadata.get_u64(&format!("{arch_name}.{k}")).unwrap_or(0) as usize;
    let info = ModelInfo {
        n_layer: md_u("block_count"),
        n_head: md_u("attention.head_count"),
        n_head_kv: match md_u("attention.head_count_kv") {
            0 => md_u("attention.head_count"),
            n => n,
        },
        n_expert: md_u("expert_count"),
        arch: arch_name,
    };
    let mut pending = Vec::new();
    for t in &g.tensors {
        let ty = t.ggml_type().filter(|ty| !ty.is_quantized()).ok_or_else(|| {
            anyhow!(
                "{}: tensor {:?} is already quantized ({}); ftconv re-quantizes only F32, F16 and BF16 GGUF files",
                path.display(),
                t.name,
                t.type_name()
            )
        })?;
        let mut ne = t.ne.clone();
        while ne.len() > 1 && *ne.last().unwrap() == 1 {
            ne.pop();
        }
        pending.push(Pending {
            name: t.name.clone(),
            ne,
            stored: ty,
            source: Box::new(GgufRows {
                file: g.clone(),
                info: t.clone(),
                ty,
            }),
            origin: path
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default(),
            source_dtype: ty.name().to_string(),
            transforms: vec![],
        });
    }
    let md = g.metadata.clone();
    let bytes = g.tensors.iter().map(|t| t.size).sum();
    Ok(finish_plan(pending, md, &info, opts, bytes))
}

/// A bare safetensors file: every tensor under its own name, 2-D tensors at the file type's
/// base type (with the row-length fallbacks), others F32; no model metadata.
pub fn plan_safetensors(path: &Path, opts: &QuantOptions) -> Result<Plan> {
    let f = StFile::open(path)?;
    let mut pending = Vec::new();
    for t in &f.tensors {
        if !t.is_float() {
            bail!(
                "{}: tensor {:?} has dtype {:?}; only F32, F16 and BF16 tensors can be quantized",
                path.display(),
                t.name,
                t.dtype
            );
        }
        let ne = ne_of_shape(&t.shape);
        pending.push(Pending {
            name: t.name.clone(),
            stored: GgmlType::F32,
            ne,
            source: Box::new(SafetensorsRows {
                tensor: t.clone(),
                permute_heads: None,
                rounding: Rounding::None,
            }),
            origin: format!(
                "{}:{}",
                path.file_name()
                    .map(|n| n.to_string_lossy().to_string())
                    .unwrap_or_default(),
                t.name
            ),
            source_dtype: crate::checkpoint::safetensors::dtype_name(t.dtype),
            transforms: vec![],
        });
    }
    let mut md = Metadata::new();
    md.set("general.type", Value::Str("tensors".into()));
    let info = ModelInfo {
        arch: String::new(),
        n_layer: 0,
        n_head: 0,
        n_head_kv: 0,
        n_expert: 0,
    };
    let opts = QuantOptions {
        pure: true,
        ..opts.clone()
    };
    Ok(finish_plan(pending, md, &info, &opts, f.len_bytes() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows that ask to be read in whole batches (as a merge on the GPU does).
    struct Batched(VecRows);

    impl RowSource for Batched {
        fn rows(&self) -> usize {
            self.0.rows()
        }
        fn cols(&self) -> usize {
            self.0.cols()
        }
        fn read_rows(&self, row0: usize, out: &mut [f32]) -> Result<()> {
            self.0.read_rows(row0, out)
        }
        fn prefers_batches(&self) -> bool {
            true
        }
    }

    #[test]
    fn permuted_batch_reads_equal_row_reads() {
        let (rows, cols, heads) = (48usize, 5usize, 4usize);
        let data: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
        let by_row = Permuted {
            inner: Box::new(VecRows {
                data: data.clone(),
                cols,
            }),
            heads,
        };
        let batched = Permuted {
            inner: Box::new(Batched(VecRows { data, cols })),
            heads,
        };
        assert!(batched.prefers_batches() && !by_row.prefers_batches());
        for (row0, n) in [(0, rows), (3, 17), (12, 12), (47, 1)] {
            let mut a = vec![0f32; n * cols];
            let mut b = vec![0f32; n * cols];
            by_row.read_rows(row0, &mut a).unwrap();
            batched.read_rows(row0, &mut b).unwrap();
            assert_eq!(a, b, "rows {row0}..{}", row0 + n);
        }
    }
}
