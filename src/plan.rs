//! Plans: every output tensor with its source rows, the transforms applied on the way
//! (Q/K permutation, rounding through the converter's storage type, LoRA merges…) and its
//! target type. `--dry-run` prints a plan; `exec` runs it.

use crate::checkpoint::TensorRef;
use crate::gguf::{GgufFile, Metadata, TensorInfo};
use crate::quant::{GgmlType, fp};
use anyhow::{Result, bail};
use std::sync::Arc;

/// Produces rows of f32 values for one output tensor.
pub trait RowSource: Send + Sync {
    /// Rows of the 2-D view (GGUF ne[1..] flattened).
    fn rows(&self) -> usize;
    /// Row length (GGUF ne[0]).
    fn cols(&self) -> usize;
    /// Fill `out` (a whole number of rows) with rows starting at `row0`.
    fn read_rows(&self, row0: usize, out: &mut [f32]) -> Result<()>;
    /// Done with this tensor: let the memory of its inputs go.
    fn release(&self) {}
    /// Whether whole batches should be read in one call (the source does its own parallel
    /// work, e.g. a merge on the GPU) rather than in many small calls from the CPU threads.
    fn prefers_batches(&self) -> bool {
        false
    }
}

/// Rounding applied after reading (what a detour through an F16/BF16 file does).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rounding {
    None,
    F16,
    BF16,
}

impl Rounding {
    pub fn for_stored(t: GgmlType) -> Rounding {
        match t {
            GgmlType::F16 => Rounding::F16,
            GgmlType::BF16 => Rounding::BF16,
            _ => Rounding::None,
        }
    }

    /// The rounding that keeps values in a safetensors dtype (F32 and others: none).
    pub fn for_dtype(d: safetensors::Dtype) -> Rounding {
        match d {
            safetensors::Dtype::F16 => Rounding::F16,
            safetensors::Dtype::BF16 => Rounding::BF16,
            _ => Rounding::None,
        }
    }

    pub fn apply(self, x: &mut [f32]) {
        match self {
            Rounding::None => {}
            Rounding::F16 => fp::round_through_f16(x),
            Rounding::BF16 => fp::round_through_bf16(x),
        }
    }
}

/// Rows of a safetensors tensor, optionally row-permuted (llama Q/K) and rounded.
pub struct SafetensorsRows {
    pub tensor: TensorRef,
    pub permute_heads: Option<usize>,
    pub rounding: Rounding,
}

impl RowSource for SafetensorsRows {
    fn rows(&self) -> usize {
        self.tensor.rows()
    }
    fn cols(&self) -> usize {
        self.tensor.cols()
    }
    fn read_rows(&self, row0: usize, out: &mut [f32]) -> Result<()> {
        let cols = self.cols();
        match self.permute_heads {
            None => self.tensor.read_rows(row0, out)?,
            Some(h) => {
                let rows = if self.tensor.shape.len() == 1 {
                    self.tensor.shape[0]
                } else {
                    self.rows()
                };
                if self.tensor.shape.len() == 1 {
                    // a bias: permute single elements
                    let mut all = vec![0f32; rows];
                    self.tensor.read_rows(0, &mut all)?;
                    for (i, o) in out.iter_mut().enumerate() {
                        *o = all[crate::arch::permuted_source_row(row0 * cols + i, rows, h)];
                    }
                } else {
                    for (k, chunk) in out.chunks_exact_mut(cols).enumerate() {
                        let src = crate::arch::permuted_source_row(row0 + k, rows, h);
                        self.tensor.read_rows(src, chunk)?;
                    }
                }
            }
        }
        self.rounding.apply(out);
        Ok(())
    }
    fn release(&self) {
        self.tensor.release();
    }
}

/// Rows of a GGUF tensor of any type ftconv can dequantize.
pub struct GgufRows {
    pub file: Arc<GgufFile>,
    pub info: TensorInfo,
    pub ty: GgmlType,
}

impl RowSource for GgufRows {
    fn rows(&self) -> usize {
        (self.info.n_elements() / self.info.ne[0]) as usize
    }
    fn cols(&self) -> usize {
        self.info.ne[0] as usize
    }
    fn read_rows(&self, row0: usize, out: &mut [f32]) -> Result<()> {
        let cols = self.cols();
        let row_bytes = cols / self.ty.block_size() * self.ty.type_size();
        let n = out.len() / cols;
        let data = self.file.tensor_data(&self.info);
        crate::quant::dequantize(
            self.ty,
            &data[row0 * row_bytes..(row0 + n) * row_bytes],
            out,
        );
        Ok(())
    }
    fn release(&self) {
        let start = (self.file.data_offset + self.info.offset) as usize;
        crate::checkpoint::safetensors::release_range(
            self.file.mmap(),
            start,
            self.info.size as usize,
        );
    }
}

/// Rows from values held in memory (generated tensors such as llama3 rope_freqs).
pub struct VecRows {
    pub data: Vec<f32>,
    pub cols: usize,
}

impl RowSource for VecRows {
    fn rows(&self) -> usize {
        self.data.len() / self.cols.max(1)
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn read_rows(&self, row0: usize, out: &mut [f32]) -> Result<()> {
        let s = row0 * self.cols;
        out.copy_from_slice(&self.data[s..s + out.len()]);
        Ok(())
    }
}

/// One output tensor.
pub struct PlannedTensor {
    pub name: String,
    /// GGUF dims, innermost first.
    pub ne: Vec<u64>,
    pub target: GgmlType,
    pub source: Box<dyn RowSource>,
    /// Where the values come from, for `--dry-run` (e.g. `model.safetensors:…q_proj.weight BF16`).
    pub origin: String,
    /// Source element type name.
    pub source_dtype: String,
    /// Transforms applied, for `--dry-run`.
    pub transforms: Vec<String>,
}

impl PlannedTensor {
    pub fn n_elements(&self) -> u64 {
        self.ne.iter().product()
    }

    pub fn out_bytes(&self) -> u64 {
        self.target.bytes_for(self.n_elements()).unwrap_or(0)
    }

    /// PyTorch-order shape.
    pub fn shape(&self) -> Vec<u64> {
        self.ne.iter().rev().copied().collect()
    }
}

/// GGUF dims of a PyTorch shape, trailing 1-dims dropped as ggml_n_dims does.
pub fn ne_of_shape(shape: &[usize]) -> Vec<u64> {
    let mut ne: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
    if ne.is_empty() {
        ne.push(1);
    }
    while ne.len() > 1 && *ne.last().unwrap() == 1 {
        ne.pop();
    }
    ne
}

/// A whole GGUF output.
pub struct Plan {
    pub metadata: Metadata,
    pub tensors: Vec<PlannedTensor>,
    /// What llama-quantize would print as the type (e.g. `Q4_K_M`).
    pub type_name: String,
    pub input_bytes: u64,
}

impl Plan {
    pub fn check(&self) -> Result<()> {
        for t in &self.tensors {
            if t.ne[0] % t.target.block_size() as u64 != 0 {
                bail!(
                    "internal: tensor {} row length {} does not fit {}",
                    t.name,
                    t.ne[0],
                    t.target
                );
            }
            if t.name.len() >= crate::gguf::MAX_NAME {
                bail!(
                    "tensor name {:?} is too long for GGUF (at most 63 bytes)",
                    t.name
                );
            }
        }
        Ok(())
    }

    pub fn output_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.out_bytes()).sum()
    }

    pub fn n_elements(&self) -> u64 {
        self.tensors.iter().map(|t| t.n_elements()).sum()
    }
}
