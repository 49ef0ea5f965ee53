//! Block formats (one file each: `quantize` and `dequantize` over whole blocks), the
//! llama-quantize file types and their per-tensor type policy, and the NF4/FP4 codecs.
//!
//! Every quantizer reproduces llama.cpp's reference (`*_ref`, non-imatrix) bytes exactly:
//! see `formats/gguf-k-quants.md` and ../shared/specs/gguf-and-k-quants.md §2–3.

pub mod fp;
pub mod kquant;
pub mod legacy;
pub mod nf4;
pub mod policy;
pub mod q2_k;
pub mod q3_k;
pub mod q4_0;
pub mod q4_1;
pub mod q4_k;
pub mod q5_0;
pub mod q5_1;
pub mod q5_k;
pub mod q6_k;
pub mod q8_0;
pub mod stats;

use std::fmt;

/// Elements per K-quant super-block.
pub const QK_K: usize = 256;

/// The ggml tensor types ftconv reads and writes (ids as in ggml.h).
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    BF16,
}

impl GgmlType {
    pub const ALL: [GgmlType; 13] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::BF16,
    ];

    /// The ggml type id stored in GGUF tensor infos.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q2_K => 10,
            GgmlType::Q3_K => 11,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
            GgmlType::BF16 => 30,
        }
    }

    pub fn from_id(id: u32) -> Option<GgmlType> {
        GgmlType::ALL.into_iter().find(|t| t.id() == id)
    }

    /// Name as ggml prints it (`Q4_K`, `F16`, `BF16`).
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q2_K => "Q2_K",
            GgmlType::Q3_K => "Q3_K",
            GgmlType::Q4_K => "Q4_K",
            GgmlType::Q5_K => "Q5_K",
            GgmlType::Q6_K => "Q6_K",
            GgmlType::BF16 => "BF16",
        }
    }

    /// Elements per block.
    pub fn block_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
                32
            }
            GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => {
                QK_K
            }
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q2_K => 84,
            GgmlType::Q3_K => 110,
            GgmlType::Q4_K => 144,
            GgmlType::Q5_K => 176,
            GgmlType::Q6_K => 210,
        }
    }

    pub fn is_quantized(self) -> bool {
        !matches!(self, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
    }

    /// Bytes of `n` elements, or None when `n` is not a whole number of blocks or overflows.
    pub fn bytes_for(self, n: u64) -> Option<u64> {
        let bs = self.block_size() as u64;
        if !n.is_multiple_of(bs) {
            return None;
        }
        (n / bs).checked_mul(self.type_size() as u64)
    }

    /// Bits per weight.
    pub fn bits_per_weight(self) -> f64 {
        self.type_size() as f64 * 8.0 / self.block_size() as f64
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Quantize `x` (a whole number of blocks of `ty`) into `y` (exactly the matching byte count).
/// Rows are independent runs of blocks, so several rows may be passed at once.
pub fn quantize(ty: GgmlType, x: &[f32], y: &mut [u8]) {
    debug_assert_eq!(x.len() % ty.block_size(), 0);
    debug_assert_eq!(y.len(), x.len() / ty.block_size() * ty.type_size());
    match ty {
        GgmlType::F32 => {
            for (o, v) in y.chunks_exact_mut(4).zip(x) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for (o, v) in y.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&fp::f32_to_f16_bits(*v).to_le_bytes());
            }
        }
        GgmlType::BF16 => {
            for (o, v) in y.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&fp::f32_to_bf16_bits(*v).to_le_bytes());
            }
        }
        GgmlType::Q4_0 => q4_0::quantize(x, y),
        GgmlType::Q4_1 => q4_1::quantize(x, y),
        GgmlType::Q5_0 => q5_0::quantize(x, y),
        GgmlType::Q5_1 => q5_1::quantize(x, y),
        GgmlType::Q8_0 => q8_0::quantize(x, y),
        GgmlType::Q2_K => q2_k::quantize(x, y),
        GgmlType::Q3_K => q3_k::quantize(x, y),
        GgmlType::Q4_K => q4_k::quantize(x, y),
        GgmlType::Q5_K => q5_k::quantize(x, y),
        GgmlType::Q6_K => q6_k::quantize(x, y),
    }
}

/// Dequantize whole blocks of `ty` from `x` into `y` (llama.cpp's `to_float`, bit for bit).
pub fn dequantize(ty: GgmlType, x: &[u8], y: &mut [f32]) {
    debug_assert_eq!(x.len() % ty.type_size(), 0);
    debug_assert_eq!(y.len(), x.len() / ty.type_size() * ty.block_size());
    match ty {
        GgmlType::F32 => {
            for (v, i) in y.iter_mut().zip(x.chunks_exact(4)) {
                *v = f32::from_le_bytes([i[0], i[1], i[2], i[3]]);
            }
        }
        GgmlType::F16 => {
            for (v, i) in y.iter_mut().zip(x.chunks_exact(2)) {
                *v = fp::f16_bits_to_f32(u16::from_le_bytes([i[0], i[1]]));
            }
        }
        GgmlType::BF16 => {
            for (v, i) in y.iter_mut().zip(x.chunks_exact(2)) {
                *v = fp::bf16_bits_to_f32(u16::from_le_bytes([i[0], i[1]]));
            }
        }
        GgmlType::Q4_0 => q4_0::dequantize(x, y),
        GgmlType::Q4_1 => q4_1::dequantize(x, y),
        GgmlType::Q5_0 => q5_0::dequantize(x, y),
        GgmlType::Q5_1 => q5_1::dequantize(x, y),
        GgmlType::Q8_0 => q8_0::dequantize(x, y),
        GgmlType::Q2_K => q2_k::dequantize(x, y),
        GgmlType::Q3_K => q3_k::dequantize(x, y),
        GgmlType::Q4_K => q4_k::dequantize(x, y),
        GgmlType::Q5_K => q5_k::dequantize(x, y),
        GgmlType::Q6_K => q6_k::dequantize(x, y),
    }
}

/// First non-finite stored scale (`d`, `dmin`, `m`) in quantized data, as llama.cpp's
/// `ggml_validate_row_data` rejects it. Returns the block index.
pub fn first_invalid_block(ty: GgmlType, data: &[u8]) -> Option<usize> {
    // byte offsets of the f16 scale fields inside a block
    let fields: &[usize] = match ty {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => &[],
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 => &[0, 2],
        GgmlType::Q2_K => &[80, 82],
        GgmlType::Q3_K => &[108],
        GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q6_K => &[208],
    };
    if fields.is_empty() {
        return None;
    }
    data.chunks_exact(ty.type_size()).position(|b| {
        fields.iter().any(|&o| {
            let h = u16::from_le_bytes([b[o], b[o + 1]]);
            (h & 0x7C00) == 0x7C00
        })
    })
}

/// The llama-quantize file types (`llama_ftype`) ftconv writes.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ftype {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2_K,
    Q3_K_S,
    Q3_K_M,
    Q3_K_L,
    Q4_K_S,
    Q4_K_M,
    Q5_K_S,
    Q5_K_M,
    Q6_K,
}

impl Ftype {
    pub const ALL: [Ftype; 17] = [
        Ftype::F32,
        Ftype::F16,
        Ftype::BF16,
        Ftype::Q4_0,
        Ftype::Q4_1,
        Ftype::Q5_0,
        Ftype::Q5_1,
        Ftype::Q8_0,
        Ftype::Q2_K,
        Ftype::Q3_K_S,
        Ftype::Q3_K_M,
        Ftype::Q3_K_L,
        Ftype::Q4_K_S,
        Ftype::Q4_K_M,
        Ftype::Q5_K_S,
        Ftype::Q5_K_M,
        Ftype::Q6_K,
    ];

    /// `general.file_type` value.
    pub fn id(self) -> u32 {
        match self {
            Ftype::F32 => 0,
            Ftype::F16 => 1,
            Ftype::Q4_0 => 2,
            Ftype::Q4_1 => 3,
            Ftype::Q8_0 => 7,
            Ftype::Q5_0 => 8,
            Ftype::Q5_1 => 9,
            Ftype::Q2_K => 10,
            Ftype::Q3_K_S => 11,
            Ftype::Q3_K_M => 12,
            Ftype::Q3_K_L => 13,
            Ftype::Q4_K_S => 14,
            Ftype::Q4_K_M => 15,
            Ftype::Q5_K_S => 16,
            Ftype::Q5_K_M => 17,
            Ftype::Q6_K => 18,
            Ftype::BF16 => 32,
        }
    }

    pub fn from_id(id: u32) -> Option<Ftype> {
        Ftype::ALL.into_iter().find(|t| t.id() == id)
    }

    /// Name as llama-quantize prints it.
    pub fn name(self) -> &'static str {
        match self {
            Ftype::F32 => "F32",
            Ftype::F16 => "F16",
            Ftype::BF16 => "BF16",
            Ftype::Q4_0 => "Q4_0",
            Ftype::Q4_1 => "Q4_1",
            Ftype::Q5_0 => "Q5_0",
            Ftype::Q5_1 => "Q5_1",
            Ftype::Q8_0 => "Q8_0",
            Ftype::Q2_K => "Q2_K",
            Ftype::Q3_K_S => "Q3_K_S",
            Ftype::Q3_K_M => "Q3_K_M",
            Ftype::Q3_K_L => "Q3_K_L",
            Ftype::Q4_K_S => "Q4_K_S",
            Ftype::Q4_K_M => "Q4_K_M",
            Ftype::Q5_K_S => "Q5_K_S",
            Ftype::Q5_K_M => "Q5_K_M",
            Ftype::Q6_K => "Q6_K",
        }
    }

    /// Parse a type name as llama-quantize accepts it (case-insensitive; `Q4_K` = Q4_K_M,
    /// `Q5_K` = Q5_K_M, `Q3_K` = Q3_K_M).
    pub fn parse(s: &str) -> Option<Ftype> {
        let u = s.trim().to_ascii_uppercase();
        let alias = match u.as_str() {
            "Q4_K" => "Q4_K_M",
            "Q5_K" => "Q5_K_M",
            "Q3_K" => "Q3_K_M",
            other => other,
        };
        Ftype::ALL.into_iter().find(|f| f.name() == alias)
    }

    /// The type most tensors get (llama-quantize's `default_type`).
    pub fn default_type(self) -> GgmlType {
        match self {
            Ftype::F32 => GgmlType::F32,
            Ftype::F16 => GgmlType::F16,
            Ftype::BF16 => GgmlType::BF16,
            Ftype::Q4_0 => GgmlType::Q4_0,
            Ftype::Q4_1 => GgmlType::Q4_1,
            Ftype::Q5_0 => GgmlType::Q5_0,
            Ftype::Q5_1 => GgmlType::Q5_1,
            Ftype::Q8_0 => GgmlType::Q8_0,
            Ftype::Q2_K => GgmlType::Q2_K,
            Ftype::Q3_K_S | Ftype::Q3_K_M | Ftype::Q3_K_L => GgmlType::Q3_K,
            Ftype::Q4_K_S | Ftype::Q4_K_M => GgmlType::Q4_K,
            Ftype::Q5_K_S | Ftype::Q5_K_M => GgmlType::Q5_K,
            Ftype::Q6_K => GgmlType::Q6_K,
        }
    }

    pub fn names() -> Vec<&'static str> {
        Ftype::ALL.iter().map(|f| f.name()).collect()
    }
}

impl fmt::Display for Ftype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
