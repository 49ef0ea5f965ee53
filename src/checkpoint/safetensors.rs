//! Memory-mapped safetensors files, parsed and validated with the `safetensors` crate,
//! with tensor handles that read rows as f32 (F32/F16/BF16, any byte alignment).

use crate::quant::fp;
use anyhow::{Context, Result, anyhow, bail};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensorError, SafeTensors};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A memory-mapped safetensors file.
pub struct StFile {
    pub path: PathBuf,
    map: Arc<Mmap>,
    /// Tensors in file (offset) order.
    pub tensors: Vec<TensorRef>,
    /// The `__metadata__` map, if any.
    pub metadata: Option<HashMap<String, String>>,
}

/// A tensor inside a memory-mapped file: cheap to clone, sendable across threads.
#[derive(Clone)]
pub struct TensorRef {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub start: usize,
    pub len: usize,
    pub file: Arc<PathBuf>,
    map: Arc<Mmap>,
    /// A bitsandbytes 4-bit weight seen as its dequantized self (see `checkpoint::bnb`):
    /// `read_f32` dequantizes, `bytes`/`start`/`len` are the packed codes.
    bnb4: Option<Arc<crate::checkpoint::bnb::Bnb4Weight>>,
}

impl std::fmt::Debug for TensorRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {:?} {:?} ({})",
            self.name,
            self.dtype,
            self.shape,
            self.file.display()
        )
    }
}

/// Name of a safetensors dtype as it appears in headers (`BF16`, `F32`…).
pub fn dtype_name(d: Dtype) -> String {
    format!("{d:?}")
}

impl TensorRef {
    pub fn n_elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// Rows of the 2-D view (all dims but the last); 1 for a 1-D tensor.
    pub fn rows(&self) -> usize {
        if self.shape.len() <= 1 {
            1
        } else {
            self.shape[..self.shape.len() - 1].iter().product()
        }
    }

    /// Columns of the 2-D view (the last dim).
    pub fn cols(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map[self.start..self.start + self.len]
    }

    pub fn is_float(&self) -> bool {
        matches!(self.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16)
    }

    /// The 4-bit weight behind a logical tensor of an NF4/FP4 checkpoint.
    pub fn bnb4(&self) -> Option<&crate::checkpoint::bnb::Bnb4Weight> {
        self.bnb4.as_deref()
    }

    /// A logical tensor (name, stored dtype, shape) for a 4-bit weight whose packed codes are
    /// `self`.
    pub fn with_bnb4(
        &self,
        name: String,
        dtype: Dtype,
        shape: Vec<usize>,
        w: Arc<crate::checkpoint::bnb::Bnb4Weight>,
    ) -> TensorRef {
        TensorRef {
            name,
            dtype,
            shape,
            bnb4: Some(w),
            ..self.clone()
        }
    }

    /// Read `out.len()` elements starting at element `first`, widened to f32 (exactly; a 4-bit
    /// weight is dequantized to its stored dtype first).
    pub fn read_f32(&self, first: usize, out: &mut [f32]) -> Result<()> {
        if let Some(q) = &self.bnb4 {
            return q.read_f32(first, out);
        }
        let b = self.bytes();
        match self.dtype {
            Dtype::F32 => {
                let src = &b[first * 4..(first + out.len()) * 4];
                for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            Dtype::BF16 => {
                let src = &b[first * 2..(first + out.len()) * 2];
                for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                    *o = fp::bf16_bits_to_f32(u16::from_le_bytes([c[0], c[1]]));
                }
            }
            Dtype::F16 => {
                let src = &b[first * 2..(first + out.len()) * 2];
                for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                    *o = fp::f16_bits_to_f32(u16::from_le_bytes([c[0], c[1]]));
                }
            }
            other => bail!(
                "{}: tensor {:?} has dtype {other:?}; only F32, F16 and BF16 weights can be converted",
                self.file.display(),
                self.name
            ),
        }
        Ok(())
    }

    /// Read rows `[row0, row0 + n)` of the 2-D view.
    pub fn read_rows(&self, row0: usize, out: &mut [f32]) -> Result<()> {
        self.read_f32(row0 * self.cols(), out)
    }

    /// Tell the kernel the pages of this tensor are no longer needed (keeps RSS bounded).
    pub fn release(&self) {
        if let Some(q) = &self.bnb4 {
            q.release();
        }
        release_range(&self.map, self.start, self.len);
    }
}

/// madvise(DONTNEED) over the whole pages inside `[start, start+len)` of a map.
pub fn release_range(map: &Mmap, start: usize, len: usize) {
    #[cfg(unix)]
    {
        const PAGE: usize = 4096;
        let a = start.div_ceil(PAGE) * PAGE;
        let e = (start + len) / PAGE * PAGE;
        if e > a {
            // SAFETY: read-only file-backed mapping; DONTNEED only drops clean page-cache
            // references, later reads fault the pages back in from the file.
            unsafe {
                let _ = map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, a, e - a);
            }
        }
    }
}

fn describe(e: &SafeTensorError) -> String {
    match e {
        SafeTensorError::HeaderTooSmall => "file too small to hold a safetensors header".into(),
        SafeTensorError::InvalidHeaderLength => {
            "header length runs past the end of the file".into()
        }
        SafeTensorError::HeaderTooLarge => "header length is larger than 100 MB".into(),
        SafeTensorError::InvalidHeader(_) => "header is not valid UTF-8".into(),
        SafeTensorError::InvalidHeaderDeserialization(err) => {
            format!("header is not valid safetensors JSON: {err}")
        }
        SafeTensorError::InvalidOffset(n) => {
            format!("tensor {n:?}: data offsets are outside the file or not contiguous")
        }
        SafeTensorError::MetadataIncompleteBuffer => {
            "data offsets do not cover the data section exactly (truncated or padded file)".into()
        }
        SafeTensorError::ValidationOverflow => "a tensor's shape or byte size overflows".into(),
        SafeTensorError::TensorInvalidInfo => {
            "a tensor's shape and dtype do not match its data size".into()
        }
        other => other.to_string(),
    }
}

/// Find which tensor is inconsistent, for a more precise message than the crate gives.
fn diagnose(bytes: &[u8]) -> Option<String> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let header = std::str::from_utf8(bytes.get(8..8usize.checked_add(n)?)?).ok()?;
    let v: serde_json::Value = serde_json::from_str(header).ok()?;
    for (name, info) in v.as_object()? {
        if name == "__metadata__" {
            continue;
        }
        let dtype = info.get("dtype").and_then(|d| d.as_str()).unwrap_or("?");
        let size: Option<u64> = match dtype {
            "F64" | "I64" | "U64" | "C64" => Some(8),
            "F32" | "I32" | "U32" => Some(4),
            "F16" | "BF16" | "I16" | "U16" => Some(2),
            "U8" | "I8" | "BOOL" | "F8_E4M3" | "F8_E5M2" | "F8_E8M0" | "F8_E4M3FNUZ"
            | "F8_E5M2FNUZ" => Some(1),
            _ => None,
        };
        let Some(size) = size else {
            return Some(format!("tensor {name:?}: unknown dtype {dtype:?}"));
        };
        let shape: Vec<u64> = info
            .get("shape")?
            .as_array()?
            .iter()
            .filter_map(|d| d.as_u64())
            .collect();
        let Some(count) = shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d)) else {
            return Some(format!("tensor {name:?}: shape {shape:?} overflows"));
        };
        let Some(bytes_needed) = count.checked_mul(size) else {
            return Some(format!(
                "tensor {name:?}: byte size of shape {shape:?} overflows"
            ));
        };
        let offs: Vec<u64> = info
            .get("data_offsets")?
            .as_array()?
            .iter()
            .filter_map(|d| d.as_u64())
            .collect();
        if offs.len() == 2 && offs[1] >= offs[0] && offs[1] - offs[0] != bytes_needed {
            return Some(format!(
                "tensor {name:?}: shape {shape:?} × {dtype} needs {bytes_needed} bytes but its offsets span {}",
                offs[1] - offs[0]
            ));
        }
        if offs.len() == 2 && (8 + n as u64).saturating_add(offs[1]) > bytes.len() as u64 {
            return Some(format!(
                "tensor {name:?}: data ends past the end of the file (truncated?)"
            ));
        }
    }
    None
}

impl StFile {
    pub fn open(path: &Path) -> Result<StFile> {
        let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        let meta = file
            .metadata()
            .with_context(|| format!("{}: cannot stat", path.display()))?;
        if meta.len() == 0 {
            bail!("{}: empty file (not a safetensors file)", path.display());
        }
        // SAFETY: read-only map of an input file that ftconv never writes.
        let map = unsafe { Mmap::map(&file) }
            .with_context(|| format!("{}: cannot memory-map", path.display()))?;
        let map = Arc::new(map);
        let (n, md) = match SafeTensors::read_metadata(&map[..]) {
            Ok(x) => x,
            Err(e) => {
                let why = diagnose(&map[..]).unwrap_or_else(|| describe(&e));
                bail!("{}: invalid safetensors file: {why}", path.display());
            }
        };
        // full validation of every tensor view
        if let Err(e) = SafeTensors::deserialize(&map[..]) {
            let why = diagnose(&map[..]).unwrap_or_else(|| describe(&e));
            bail!("{}: invalid safetensors file: {why}", path.display());
        }
        let data_start = 8 + n;
        let file_arc = Arc::new(path.to_path_buf());
        let mut tensors = Vec::new();
        for name in md.offset_keys() {
            let info = md
                .info(&name)
                .ok_or_else(|| anyhow!("{}: missing info for {name:?}", path.display()))?;
            let (a, b) = info.data_offsets;
            tensors.push(TensorRef {
                name: name.clone(),
                dtype: info.dtype,
                shape: info.shape.clone(),
                start: data_start + a,
                len: b - a,
                file: file_arc.clone(),
                map: map.clone(),
                bnb4: None,
            });
        }
        Ok(StFile {
            path: path.to_path_buf(),
            map,
            tensors,
            metadata: md.metadata().clone(),
        })
    }

    pub fn get(&self, name: &str) -> Option<&TensorRef> {
        self.tensors.iter().find(|t| t.name == name)
    }

    pub fn len_bytes(&self) -> usize {
        self.map.len()
    }
}
