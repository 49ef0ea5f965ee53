//! GGUF reader over a memory map, validating everything llama.cpp's `gguf_init_from_reader`
//! validates (and refusing absurd sizes before allocating).

use super::{Array, DEFAULT_ALIGNMENT, MAGIC, MAX_NAME, Metadata, Value, ValueType, type_traits};
use crate::quant::GgmlType;
use anyhow::{Context, Result, anyhow, bail};
use memmap2::Mmap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One tensor-info record.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF dims, innermost first (`ne[0]` = row length).
    pub ne: Vec<u64>,
    pub type_id: u32,
    /// Offset relative to the data section.
    pub offset: u64,
    /// Bytes of data.
    pub size: u64,
}

impl TensorInfo {
    pub fn ggml_type(&self) -> Option<GgmlType> {
        GgmlType::from_id(self.type_id)
    }

    pub fn type_name(&self) -> String {
        type_traits(self.type_id)
            .map(|t| t.0.to_string())
            .unwrap_or_else(|| format!("type{}", self.type_id))
    }

    pub fn n_elements(&self) -> u64 {
        self.ne.iter().product()
    }

    /// Shape in PyTorch order (outermost first).
    pub fn torch_shape(&self) -> Vec<u64> {
        self.ne.iter().rev().copied().collect()
    }
}

/// A parsed GGUF file (memory-mapped).
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: Metadata,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    pub data_offset: u64,
    map: Arc<Mmap>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        // SAFETY: the map is read-only; ftconv never writes to its inputs.
        let map = unsafe { Mmap::map(&file) }
            .with_context(|| format!("{}: cannot memory-map", path.display()))?;
        Self::parse(path, Arc::new(map))
    }

    pub fn parse(path: &Path, map: Arc<Mmap>) -> Result<GgufFile> {
        let parsed = parse_bytes(&map).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            version: parsed.version,
            metadata: parsed.metadata,
            tensors: parsed.tensors,
            alignment: parsed.alignment,
            data_offset: parsed.data_offset,
            map,
        })
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor.
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        let start = (self.data_offset + t.offset) as usize;
        &self.map[start..start + t.size as usize]
    }

    pub fn mmap(&self) -> &Arc<Mmap> {
        &self.map
    }

    pub fn architecture(&self) -> Option<&str> {
        self.metadata.get_str("general.architecture")
    }
}

struct Parsed {
    version: u32,
    metadata: Metadata,
    tensors: Vec<TensorInfo>,
    alignment: u64,
    data_offset: u64,
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.b.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            bail!(
                "truncated: {what} at byte {} needs {n} bytes, {} left",
                self.pos,
                self.remaining()
            );
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2, what)?.try_into().unwrap()))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.u64(what)?;
        if n > self.remaining() as u64 {
            bail!(
                "truncated or corrupt: {what} claims {n} bytes, {} left in the file",
                self.remaining()
            );
        }
        let s = self.take(n as usize, what)?;
        String::from_utf8(s.to_vec()).map_err(|_| anyhow!("{what} is not valid UTF-8"))
    }

    fn count(&mut self, what: &str, min_each: usize) -> Result<usize> {
        let n = self.u64(what)?;
        if n > i64::MAX as u64 {
            bail!("{what} is negative ({})", n as i64);
        }
        let need = (n as u128) * (min_each as u128);
        if need > self.remaining() as u128 {
            bail!(
                "truncated or corrupt: {what} is {n} but the file has only {} bytes left",
                self.remaining()
            );
        }
        Ok(n as usize)
    }
}

fn scalar_size(t: ValueType) -> usize {
    match t {
        ValueType::U8 | ValueType::I8 | ValueType::Bool => 1,
        ValueType::U16 | ValueType::I16 => 2,
        ValueType::U32 | ValueType::I32 | ValueType::F32 => 4,
        ValueType::U64 | ValueType::I64 | ValueType::F64 | ValueType::Str => 8,
        ValueType::Array => 12,
    }
}

fn read_array(c: &mut Cursor, key: &str) -> Result<Array> {
    let et = c.u32(key)?;
    let et = ValueType::from_id(et)
        .ok_or_else(|| anyhow!("key {key:?}: unknown array element type {et}"))?;
    if et == ValueType::Array {
        bail!("key {key:?}: arrays of arrays are not allowed");
    }
    let n = c.count(&format!("element count of key {key:?}"), scalar_size(et))?;
    macro_rules! prim {
        ($variant:ident, $t:ty, $sz:expr) => {{
            let raw = c.take(n * $sz, key)?;
            Array::$variant(
                raw.chunks_exact($sz)
                    .map(|b| <$t>::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
            )
        }};
    }
    Ok(match et {
        ValueType::U8 => Array::U8(c.take(n, key)?.to_vec()),
        ValueType::I8 => Array::I8(c.take(n, key)?.iter().map(|&b| b as i8).collect()),
        ValueType::U16 => prim!(U16, u16, 2),
        ValueType::I16 => prim!(I16, i16, 2),
        ValueType::U32 => prim!(U32, u32, 4),
        ValueType::I32 => prim!(I32, i32, 4),
        ValueType::F32 => prim!(F32, f32, 4),
        ValueType::U64 => prim!(U64, u64, 8),
        ValueType::I64 => prim!(I64, i64, 8),
        ValueType::F64 => prim!(F64, f64, 8),
        ValueType::Bool => {
            let raw = c.take(n, key)?;
            let mut v = Vec::with_capacity(n);
            for &b in raw {
                if b > 1 {
                    bail!("key {key:?}: bool array element is {b}, not 0 or 1");
                }
                v.push(b == 1);
            }
            Array::Bool(v)
        }
        ValueType::Str => {
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push(c.string(key)?);
            }
            Array::Str(v)
        }
        ValueType::Array => unreachable!(),
    })
}

fn read_value(c: &mut Cursor, t: ValueType, key: &str) -> Result<Value> {
    Ok(match t {
        ValueType::U8 => Value::U8(c.u8(key)?),
        ValueType::I8 => Value::I8(c.u8(key)? as i8),
        ValueType::U16 => Value::U16(c.u16(key)?),
        ValueType::I16 => Value::I16(c.u16(key)? as i16),
        ValueType::U32 => Value::U32(c.u32(key)?),
        ValueType::I32 => Value::I32(c.u32(key)? as i32),
        ValueType::F32 => Value::F32(f32::from_bits(c.u32(key)?)),
        ValueType::Bool => {
            let b = c.u8(key)?;
            if b > 1 {
                bail!("key {key:?}: bool value is {b}, not 0 or 1");
            }
            Value::Bool(b == 1)
        }
        ValueType::Str => Value::Str(c.string(key)?),
        ValueType::Array => Value::Array(read_array(c, key)?),
        ValueType::U64 => Value::U64(c.u64(key)?),
        ValueType::I64 => Value::I64(c.u64(key)? as i64),
        ValueType::F64 => Value::F64(f64::from_bits(c.u64(key)?)),
    })
}

fn parse_bytes(b: &[u8]) -> Result<Parsed> {
    if b.is_empty() {
        bail!("empty file (not a GGUF)");
    }
    let mut c = Cursor { b, pos: 0 };
    let magic = c.take(4.min(b.len()), "magic")?;
    if magic != MAGIC {
        bail!(
            "not a GGUF file (bad magic {:02x?}, expected \"GGUF\")",
            magic
        );
    }
    let version = c.u32("version")?;
    match version {
        2 | 3 => {}
        1 => bail!("GGUF version 1 is not supported (llama.cpp rejects it too)"),
        v => bail!("unsupported GGUF version {v} (expected 2 or 3)"),
    }
    // each tensor info needs at least 8 (name len) + 4 (n_dims) + 4 (type) + 8 (offset) bytes
    let n_tensors = c.u64("tensor count")?;
    let n_kv = c.u64("key/value count")?;
    for (what, n, min) in [
        ("tensor count", n_tensors, 24u128),
        ("key/value count", n_kv, 13u128),
    ] {
        if n > i64::MAX as u64 {
            bail!("{what} is negative ({})", n as i64);
        }
        if n as u128 * min > c.remaining() as u128 {
            bail!(
                "absurd {what} {n}: the file has only {} bytes after the header",
                c.remaining()
            );
        }
    }

    let mut metadata = Metadata::new();
    for _ in 0..n_kv {
        let key = c.string("key")?;
        if key.is_empty() {
            bail!("empty metadata key");
        }
        if metadata.contains(&key) {
            bail!("duplicate metadata key {key:?}");
        }
        let t = c.u32(&key)?;
        let t =
            ValueType::from_id(t).ok_or_else(|| anyhow!("key {key:?}: unknown value type {t}"))?;
        let v = read_value(&mut c, t, &key)?;
        metadata.set(&key, v);
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(Value::U32(a)) if *a > 0 && a.is_power_of_two() => *a as u64,
        Some(v) => bail!(
            "general.alignment must be a power-of-two u32, got {}",
            v.summary(4)
        ),
    };

    let mut tensors: Vec<TensorInfo> = Vec::with_capacity(n_tensors as usize);
    let mut names = std::collections::HashSet::new();
    for i in 0..n_tensors {
        let name = c.string("tensor name")?;
        if name.len() >= MAX_NAME {
            bail!(
                "tensor name {name:?} is {} bytes; GGUF readers allow at most {}",
                name.len(),
                MAX_NAME - 1
            );
        }
        if !names.insert(name.clone()) {
            bail!("duplicate tensor name {name:?}");
        }
        let n_dims = c.u32(&name)?;
        if n_dims == 0 || n_dims > 4 {
            bail!("tensor {name:?}: {n_dims} dimensions (must be 1 to 4)");
        }
        let mut ne = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            let d = c.u64(&name)?;
            if d > i64::MAX as u64 {
                bail!("tensor {name:?}: negative dimension");
            }
            ne.push(d);
        }
        let type_id = c.u32(&name)?;
        let (tname, bs, ts) = type_traits(type_id)
            .ok_or_else(|| anyhow!("tensor {name:?}: unknown ggml type id {type_id}"))?;
        let offset = c.u64(&name)?;
        let n = ne
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| anyhow!("tensor {name:?}: element count overflows"))?;
        if ne[0] % bs != 0 {
            bail!(
                "tensor {name:?}: row length {} is not a multiple of the {tname} block size {bs}",
                ne[0]
            );
        }
        let size = (n / bs)
            .checked_mul(ts)
            .ok_or_else(|| anyhow!("tensor {name:?}: byte size overflows"))?;
        if offset % alignment != 0 {
            bail!(
                "tensor {name:?}: data offset {offset} is not a multiple of the alignment {alignment}"
            );
        }
        let _ = i;
        tensors.push(TensorInfo {
            name,
            ne,
            type_id,
            offset,
            size,
        });
    }

    let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;
    let mut expected = 0u64;
    for t in &tensors {
        if t.offset != expected {
            bail!(
                "tensor {:?}: data offset {} is not where the previous tensors end ({expected})",
                t.name,
                t.offset
            );
        }
        expected = expected
            .checked_add(t.size.div_ceil(alignment) * alignment)
            .ok_or_else(|| anyhow!("data section size overflows"))?;
        let end = data_offset
            .checked_add(t.offset)
            .and_then(|o| o.checked_add(t.size))
            .ok_or_else(|| anyhow!("tensor {:?}: end offset overflows", t.name))?;
        if end > b.len() as u64 {
            bail!(
                "truncated: tensor {:?} ends at byte {end} but the file has {} bytes",
                t.name,
                b.len()
            );
        }
    }
    Ok(Parsed {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
    })
}
