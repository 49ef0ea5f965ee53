//! Streaming GGUF v3 writer: the header (metadata + tensor infos with offsets computed from
//! the declared sizes) is written first, then tensor data is appended in declaration order,
//! each tensor followed by zero padding to the alignment. Nothing is buffered beyond what
//! the caller passes in.

use super::{Array, DEFAULT_ALIGNMENT, MAGIC, Metadata, Value};
use anyhow::{Result, bail};
use std::io::Write;

/// What the header needs to know about a tensor before its data exists.
#[derive(Clone, Debug)]
pub struct TensorHeader {
    pub name: String,
    /// GGUF dims, innermost first.
    pub ne: Vec<u64>,
    pub type_id: u32,
    /// Exact byte size of the data.
    pub size: u64,
}

pub struct GgufWriter<W: Write> {
    w: W,
    alignment: u64,
    sizes: Vec<u64>,
    names: Vec<String>,
    current: usize,
    written: u64,
    total: u64,
}

fn put_str<W: Write>(w: &mut W, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn put_value<W: Write>(w: &mut W, v: &Value) -> std::io::Result<()> {
    match v {
        Value::U8(x) => w.write_all(&[*x]),
        Value::I8(x) => w.write_all(&[*x as u8]),
        Value::U16(x) => w.write_all(&x.to_le_bytes()),
        Value::I16(x) => w.write_all(&x.to_le_bytes()),
        Value::U32(x) => w.write_all(&x.to_le_bytes()),
        Value::I32(x) => w.write_all(&x.to_le_bytes()),
        Value::F32(x) => w.write_all(&x.to_le_bytes()),
        Value::Bool(x) => w.write_all(&[*x as u8]),
        Value::Str(s) => put_str(w, s),
        Value::U64(x) => w.write_all(&x.to_le_bytes()),
        Value::I64(x) => w.write_all(&x.to_le_bytes()),
        Value::F64(x) => w.write_all(&x.to_le_bytes()),
        Value::Array(a) => {
            w.write_all(&(a.elem_type() as u32).to_le_bytes())?;
            w.write_all(&(a.len() as u64).to_le_bytes())?;
            macro_rules! each {
                ($v:expr) => {{
                    for x in $v {
                        w.write_all(&x.to_le_bytes())?;
                    }
                }};
            }
            match a {
                Array::U8(v) => w.write_all(v)?,
                Array::I8(v) => each!(v),
                Array::U16(v) => each!(v),
                Array::I16(v) => each!(v),
                Array::U32(v) => each!(v),
                Array::I32(v) => each!(v),
                Array::F32(v) => each!(v),
                Array::U64(v) => each!(v),
                Array::I64(v) => each!(v),
                Array::F64(v) => each!(v),
                Array::Bool(v) => {
                    for x in v {
                        w.write_all(&[*x as u8])?;
                    }
                }
                Array::Str(v) => {
                    for s in v {
                        put_str(w, s)?;
                    }
                }
            }
            Ok(())
        }
    }
}

/// Serialize the whole header (up to and including the padding before the data section).
pub fn header_bytes(metadata: &Metadata, tensors: &[TensorHeader], alignment: u64) -> Vec<u8> {
    let mut h: Vec<u8> = Vec::new();
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&3u32.to_le_bytes());
    h.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    h.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata.iter() {
        put_str(&mut h, k).unwrap();
        h.extend_from_slice(&(v.value_type() as u32).to_le_bytes());
        put_value(&mut h, v).unwrap();
    }
    let mut offset = 0u64;
    for t in tensors {
        put_str(&mut h, &t.name).unwrap();
        h.extend_from_slice(&(t.ne.len() as u32).to_le_bytes());
        for d in &t.ne {
            h.extend_from_slice(&d.to_le_bytes());
        }
        h.extend_from_slice(&t.type_id.to_le_bytes());
        h.extend_from_slice(&offset.to_le_bytes());
        offset += t.size.div_ceil(alignment) * alignment;
    }
    let pad = (h.len() as u64).div_ceil(alignment) * alignment - h.len() as u64;
    h.resize(h.len() + pad as usize, 0);
    h
}

/// Total file size a header + these tensors will occupy.
pub fn file_size(metadata: &Metadata, tensors: &[TensorHeader]) -> u64 {
    let alignment = alignment_of(metadata);
    header_bytes(metadata, tensors, alignment).len() as u64
        + tensors
            .iter()
            .map(|t| t.size.div_ceil(alignment) * alignment)
            .sum::<u64>()
}

fn alignment_of(metadata: &Metadata) -> u64 {
    match metadata.get("general.alignment") {
        Some(Value::U32(a)) if *a > 0 && a.is_power_of_two() => *a as u64,
        _ => DEFAULT_ALIGNMENT,
    }
}

impl<W: Write> GgufWriter<W> {
    /// Write the header for `tensors` (in file order); then call `write_data` with each
    /// tensor's bytes in that order (in as many pieces as convenient).
    pub fn new(mut w: W, metadata: &Metadata, tensors: &[TensorHeader]) -> Result<Self> {
        let alignment = alignment_of(metadata);
        for t in tensors {
            if t.name.len() >= super::MAX_NAME {
                bail!(
                    "tensor name {:?} is too long for GGUF ({} bytes, at most 63)",
                    t.name,
                    t.name.len()
                );
            }
        }
        let h = header_bytes(metadata, tensors, alignment);
        w.write_all(&h)?;
        Ok(GgufWriter {
            w,
            alignment,
            sizes: tensors.iter().map(|t| t.size).collect(),
            names: tensors.iter().map(|t| t.name.clone()).collect(),
            current: 0,
            written: 0,
            total: h.len() as u64,
        })
    }

    fn close_finished(&mut self) -> Result<()> {
        while self.current < self.sizes.len() && self.written == self.sizes[self.current] {
            let size = self.sizes[self.current];
            let pad = (size.div_ceil(self.alignment) * self.alignment - size) as usize;
            if pad > 0 {
                self.w.write_all(&vec![0u8; pad])?;
            }
            self.total += size + pad as u64;
            self.current += 1;
            self.written = 0;
        }
        Ok(())
    }

    /// Append bytes of the current tensor (a piece may not span two tensors).
    pub fn write_data(&mut self, data: &[u8]) -> Result<()> {
        self.close_finished()?;
        if self.current >= self.sizes.len() {
            bail!("internal: more tensor data than declared");
        }
        let left = self.sizes[self.current] - self.written;
        if data.len() as u64 > left {
            bail!(
                "internal: {} bytes written to tensor {:?} which has only {left} left",
                data.len(),
                self.names[self.current]
            );
        }
        self.w.write_all(data)?;
        self.written += data.len() as u64;
        self.close_finished()
    }

    /// Index of the tensor the next bytes belong to.
    pub fn current_tensor(&self) -> usize {
        self.current
    }

    /// Check that every tensor was written completely; return the sink and bytes written.
    pub fn finish(mut self) -> Result<(W, u64)> {
        self.close_finished()?;
        if self.current != self.sizes.len() {
            bail!(
                "internal: tensor {:?} incomplete ({} of {} bytes)",
                self.names[self.current],
                self.written,
                self.sizes[self.current]
            );
        }
        self.w.flush()?;
        Ok((self.w, self.total))
    }
}
