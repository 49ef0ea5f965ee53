//! NF4/FP4 (bitsandbytes) codecs, as bitsandbytes 0.50's CPU path computes them
//! (shared/specs/nf4-peft.md §3):
//!
//! * 4-bit blockwise quantization (blocksize 64): per block `absmax = max|x|`, values scaled by the
//!   f32 reciprocal of absmax (a trailing partial block divides instead and stores its absmax
//!   clamped to 1e-38), clamped to [-1, 1], then bucketed on the f32 midpoints of the 16-value table
//!   (a value exactly on a midpoint takes the lower code). Two codes a byte, the first element in the
//!   high nibble; an odd count pads with code 7 (NF4) / the zero code.
//! * Double quantization: `offset = mean(absmax)`, `absmax - offset` quantized 8-bit in blocks of
//!   256 with the signed dynamic map, rounded through the CPU kernel's 65536-entry lookup table.
//! * Dequantization: `table[code] * absmax` in f32 (absmax rebuilt as `map[q] * nested_absmax +
//!   offset`, two f32 operations), then rounded (RNE) to the stored dtype.
//! * The `quant_state.bitsandbytes__nf4` JSON blob as `QuantState.as_dict(packed=True)` writes it.

use anyhow::{Result, anyhow, bail};
use rayon::prelude::*;
use serde_json::Value;
use std::sync::OnceLock;

/// 4-bit block size (transformers always uses 64).
pub const BLOCKSIZE: usize = 64;
/// Block size of the nested (double-quant) statistics.
pub const NESTED_BLOCKSIZE: usize = 256;

/// The 16 NF4 values (`get_4bit_type("nf4")`), f32 bits, index = code.
const NF4_BITS: [u32; 16] = [
    0xBF800000, 0xBF3239B1, 0xBF066B30, 0xBECA32A0, 0xBE91A24D, 0xBE3D353F, 0xBDBA7871, 0x00000000,
    0x3DA2FAFF, 0x3E24CAE3, 0x3E7C04DD, 0x3EAD033A, 0x3EE1A4B8, 0x3F1007AB, 0x3F3913B3, 0x3F800000,
];

/// `get_4bit_type("fp4")` before normalisation (divided by its largest magnitude, 12, in f32).
/// Python's `-0` is the integer 0, so code 8 is +0.0.
const FP4_RAW: [f32; 16] = [
    0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0,
];

const DYNAMIC_MAP: &str = include_str!("../../formats/bnb_dynamic_map.txt");

/// The 4-bit data type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantType {
    Nf4,
    Fp4,
}

/// A 4-bit code table with its decision boundaries (the CPU kernel's `bucketize` over the sorted
/// table, mapped back through the sort permutation).
pub struct Codebook {
    /// Value of each code.
    pub table: [f32; 16],
    /// f32 midpoints of consecutive sorted values.
    mids: [f32; 15],
    /// Sorted position → code.
    order: [u8; 16],
}

impl Codebook {
    fn new(table: [f32; 16]) -> Codebook {
        let mut order: Vec<u8> = (0..16).collect();
        // torch.argsort of 16 CPU values keeps equal values in index order (FP4's two zeros)
        order.sort_by(|&a, &b| {
            table[a as usize]
                .partial_cmp(&table[b as usize])
                .unwrap()
                .then(a.cmp(&b))
        });
        let mut mids = [0f32; 15];
        for k in 0..15 {
            mids[k] = (table[order[k] as usize] + table[order[k + 1] as usize]) / 2.0;
        }
        Codebook {
            table,
            mids,
            order: order.try_into().unwrap(),
        }
    }

    /// Code of a scaled value in [-1, 1]: the number of midpoints strictly below it, as a
    /// sorted position, mapped to the code.
    #[inline(always)]
    pub fn code(&self, y: f32) -> u8 {
        let mut pos = 0u8;
        for &m in &self.mids {
            pos += (m < y) as u8;
        }
        self.order[pos as usize]
    }

    /// The code that stands for 0.0 (padding nibble of an odd element count).
    pub fn zero_code(&self) -> u8 {
        self.code(0.0)
    }
}

impl QuantType {
    pub fn name(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
        }
    }

    pub fn parse(s: &str) -> Option<QuantType> {
        match s {
            "nf4" => Some(QuantType::Nf4),
            "fp4" => Some(QuantType::Fp4),
            _ => None,
        }
    }

    pub fn codebook(self) -> &'static Codebook {
        static NF4: OnceLock<Codebook> = OnceLock::new();
        static FP4: OnceLock<Codebook> = OnceLock::new();
        match self {
            QuantType::Nf4 => NF4.get_or_init(|| Codebook::new(NF4_BITS.map(f32::from_bits))),
            QuantType::Fp4 => FP4.get_or_init(|| {
                let max = FP4_RAW.iter().fold(0f32, |m, v| m.max(v.abs()));
                Codebook::new(FP4_RAW.map(|v| v / max))
            }),
        }
    }

    /// The 16 values, index = code (`weight.quant_map`).
    pub fn table(self) -> [f32; 16] {
        self.codebook().table
    }
}

/// The signed 8-bit dynamic map (`nested_quant_map`), index order.
pub fn dynamic_map() -> &'static [f32; 256] {
    static MAP: OnceLock<[f32; 256]> = OnceLock::new();
    MAP.get_or_init(|| {
        let v: Vec<f32> = DYNAMIC_MAP
            .lines()
            .filter(|l| !l.starts_with('#'))
            .flat_map(|l| l.split_whitespace())
            .map(|h| f32::from_bits(u32::from_str_radix(h, 16).expect("hex in bnb_dynamic_map")))
            .collect();
        v.try_into().expect("256 entries in bnb_dynamic_map")
    })
}

/// The 65536-entry rounding table of bitsandbytes' CPU blockwise quantizer
/// (`csrc/cpu_ops.cpp`): entry i = number of midpoints below `-1 + 2i/65535`.
fn dynamic_lut() -> &'static [u8] {
    static LUT: OnceLock<Vec<u8>> = OnceLock::new();
    LUT.get_or_init(|| {
        let code = dynamic_map();
        let mids: Vec<f32> = (0..255).map(|k| 0.5f32 * (code[k] + code[k + 1])).collect();
        let mut lut = vec![0u8; 65536];
        let mut k = 0usize;
        for (i, e) in lut.iter_mut().enumerate() {
            let v = -1.0f32 + (2.0f32 * i as f32) / 65535.0f32;
            while k < mids.len() && mids[k] < v {
                k += 1;
            }
            *e = k as u8;
        }
        lut
    })
}

/// Number of 4-bit blocks of `n` elements.
pub fn n_blocks(n: usize) -> usize {
    n.div_ceil(BLOCKSIZE)
}

/// Packed byte count of `n` elements.
pub fn packed_len(n: usize) -> usize {
    n.div_ceil(2)
}

/// Number of nested blocks for `n` elements.
pub fn n_nested_blocks(n: usize) -> usize {
    n_blocks(n).div_ceil(NESTED_BLOCKSIZE)
}

const TINY: f32 = 1e-38;

/// Quantize one block (≤ 64 values; `partial` for a trailing short block) into codes.
fn quantize_block(cb: &Codebook, blk: &[f32], partial: bool, codes: &mut [u8]) -> f32 {
    let am = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
    if partial {
        let am = am.max(TINY);
        for (c, &v) in codes.iter_mut().zip(blk) {
            *c = cb.code((v / am).clamp(-1.0, 1.0));
        }
        am
    } else {
        let s = 1.0f32 / am.max(TINY);
        for (c, &v) in codes.iter_mut().zip(blk) {
            *c = cb.code((v * s).clamp(-1.0, 1.0));
        }
        am
    }
}

/// Quantize a run of whole blocks (and, at the very end of a tensor, one partial block) into
/// packed bytes and absmax. `x.len()` must be a multiple of 64 unless `x` ends the tensor.
pub fn quantize_run(qt: QuantType, x: &[f32], packed: &mut [u8], absmax: &mut [f32]) {
    let cb = qt.codebook();
    let pad = cb.zero_code();
    let mut codes = [0u8; BLOCKSIZE];
    for (b, blk) in x.chunks(BLOCKSIZE).enumerate() {
        let partial = blk.len() < BLOCKSIZE;
        absmax[b] = quantize_block(cb, blk, partial, &mut codes[..blk.len()]);
        let out = &mut packed[b * BLOCKSIZE / 2..];
        for (j, pair) in codes[..blk.len()].chunks(2).enumerate() {
            let lo = if pair.len() == 2 { pair[1] } else { pad };
            out[j] = (pair[0] << 4) | lo;
        }
    }
}

/// Quantize a whole tensor (flattened row-major f32 values): packed bytes `[ceil(n/2)]` and
/// absmax `[ceil(n/64)]`. Runs in parallel over groups of blocks.
pub fn quantize_4bit(qt: QuantType, x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let n = x.len();
    let mut packed = vec![0u8; packed_len(n)];
    let mut absmax = vec![0f32; n_blocks(n)];
    const CH: usize = BLOCKSIZE * 1024;
    x.par_chunks(CH)
        .zip(packed.par_chunks_mut(CH / 2))
        .zip(absmax.par_chunks_mut(CH / BLOCKSIZE))
        .for_each(|((x, p), a)| quantize_run(qt, x, p, a));
    (packed, absmax)
}

/// torch's float32 mean of the absmax vector, as closely as we can without its SIMD cascade:
/// the sum in f64 rounded to f32, divided by n in f32. May differ from torch in the last bit
/// (shared/specs/decisions.md: never compared bit-exactly).
pub fn mean_f32(v: &[f32]) -> f32 {
    if v.is_empty() {
        return 0.0;
    }
    let s: f64 = v.iter().map(|&x| x as f64).sum();
    (s as f32) / (v.len() as f32)
}

/// Double-quantized absmax.
#[derive(Clone, Debug, PartialEq)]
pub struct Nested {
    /// 8-bit codes of `absmax - offset` (stored as `weight.absmax`, U8).
    pub codes: Vec<u8>,
    /// Per-256-block max |absmax - offset| (`weight.nested_absmax`).
    pub nested_absmax: Vec<f32>,
    /// mean(absmax) (the JSON's `nested_offset`).
    pub offset: f32,
}

/// Double quantization with the offset computed here ([`mean_f32`]).
pub fn double_quant(absmax: &[f32]) -> Nested {
    double_quant_with_offset(absmax, mean_f32(absmax))
}

/// Double quantization with a given offset: `absmax - offset` through [`quantize_dynamic`].
pub fn double_quant_with_offset(absmax: &[f32], offset: f32) -> Nested {
    let c: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let (codes, nested_absmax) = quantize_dynamic(&c);
    Nested {
        codes,
        nested_absmax,
        offset,
    }
}

/// bitsandbytes' CPU `quantize_blockwise` with the dynamic map: blocks of 256, `am = max|c|`,
/// `y = clamp(c * f32(1/am), -1, 1)`, code = LUT[(u16)((y + 1) * 0.5 * 65535 + 0.5)];
/// an all-zero block stores 0 and codes 0. Returns (codes, per-block am).
pub fn quantize_dynamic(c: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let lut = dynamic_lut();
    let mut codes = vec![0u8; c.len()];
    let mut nested_absmax = Vec::with_capacity(c.len().div_ceil(NESTED_BLOCKSIZE));
    for (blk, out) in c
        .chunks(NESTED_BLOCKSIZE)
        .zip(codes.chunks_mut(NESTED_BLOCKSIZE))
    {
        let am = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
        nested_absmax.push(am);
        if am == 0.0 {
            continue;
        }
        let s = 1.0f32 / am;
        for (o, &v) in out.iter_mut().zip(blk) {
            let y = (v * s).clamp(-1.0, 1.0);
            let idx = (y + 1.0f32) * 0.5f32 * 65535.0f32 + 0.5f32;
            *o = lut[idx as u16 as usize];
        }
    }
    (codes, nested_absmax)
}

/// Rebuild absmax from double-quantized statistics: `f32(f32(map[q] * nested_absmax) + offset)`.
pub fn dequantize_absmax(codes: &[u8], nested_absmax: &[f32], offset: f32) -> Vec<f32> {
    let map = dynamic_map();
    codes
        .iter()
        .enumerate()
        .map(|(i, &q)| {
            let v = map[q as usize] * nested_absmax[i / NESTED_BLOCKSIZE];
            v + offset
        })
        .collect()
}

/// Dequantize elements `[first, first + out.len())` of a 4-bit tensor to f32
/// (`table[code] * absmax[i / 64]`, one f32 multiply). `first` may be any element.
pub fn dequantize_4bit(
    qt: QuantType,
    packed: &[u8],
    absmax: &[f32],
    first: usize,
    out: &mut [f32],
) {
    let table = &qt.codebook().table;
    let one = |i: usize| {
        let byte = packed[i / 2];
        let code = if i & 1 == 0 { byte >> 4 } else { byte & 0x0F };
        table[code as usize] * absmax[i / BLOCKSIZE]
    };
    // up to the first block boundary, value by value
    let head = ((BLOCKSIZE - first % BLOCKSIZE) % BLOCKSIZE).min(out.len());
    for (k, o) in out[..head].iter_mut().enumerate() {
        *o = one(first + k);
    }
    // whole blocks: the 16 products `table[c] * absmax` once per block (the same f32 products),
    // then two look-ups per byte
    let b0 = (first + head) / BLOCKSIZE;
    for (b, o) in (b0..).zip(out[head..].chunks_exact_mut(BLOCKSIZE)) {
        let am = absmax[b];
        let scaled: [f32; 16] = std::array::from_fn(|c| table[c] * am);
        let bytes = &packed[b * BLOCKSIZE / 2..(b + 1) * BLOCKSIZE / 2];
        for (pair, &byte) in o.chunks_exact_mut(2).zip(bytes) {
            pair[0] = scaled[(byte >> 4) as usize];
            pair[1] = scaled[(byte & 0x0F) as usize];
        }
    }
    // the rest, value by value
    let n = out.len();
    let done = n - (n - head) % BLOCKSIZE;
    for (k, o) in out.iter_mut().enumerate().skip(done) {
        *o = one(first + k);
    }
}

/// The weight dtype recorded in the quant state (what `dequantize_4bit` returns).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoredDtype {
    F32,
    F16,
    BF16,
}

impl StoredDtype {
    pub fn torch_name(self) -> &'static str {
        match self {
            StoredDtype::F32 => "float32",
            StoredDtype::F16 => "float16",
            StoredDtype::BF16 => "bfloat16",
        }
    }

    pub fn from_torch_name(s: &str) -> Option<StoredDtype> {
        match s {
            "float32" => Some(StoredDtype::F32),
            "float16" => Some(StoredDtype::F16),
            "bfloat16" => Some(StoredDtype::BF16),
            _ => None,
        }
    }

    pub fn from_safetensors(d: safetensors::Dtype) -> Option<StoredDtype> {
        match d {
            safetensors::Dtype::F32 => Some(StoredDtype::F32),
            safetensors::Dtype::F16 => Some(StoredDtype::F16),
            safetensors::Dtype::BF16 => Some(StoredDtype::BF16),
            _ => None,
        }
    }

    pub fn safetensors(self) -> safetensors::Dtype {
        match self {
            StoredDtype::F32 => safetensors::Dtype::F32,
            StoredDtype::F16 => safetensors::Dtype::F16,
            StoredDtype::BF16 => safetensors::Dtype::BF16,
        }
    }

    /// Round f32 values (RNE) to this dtype, in place (values stay f32).
    pub fn round(self, x: &mut [f32]) {
        match self {
            StoredDtype::F32 => {}
            StoredDtype::F16 => super::fp::round_through_f16(x),
            StoredDtype::BF16 => super::fp::round_through_bf16(x),
        }
    }
}

/// `QuantState.as_dict(packed=True)`'s non-tensor part, serialized into
/// `weight.quant_state.bitsandbytes__<type>`.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantStateInfo {
    pub quant_type: QuantType,
    pub blocksize: usize,
    pub dtype: StoredDtype,
    pub shape: Vec<usize>,
    /// `nested_offset` when double-quantized.
    pub nested_offset: Option<f32>,
}

impl QuantStateInfo {
    /// The key suffix: `quant_state.bitsandbytes__nf4`.
    pub fn key_suffix(&self) -> String {
        format!("quant_state.bitsandbytes__{}", self.quant_type.name())
    }

    /// The JSON blob exactly as Python's `json.dumps` writes it.
    pub fn to_json(&self) -> String {
        let shape = self
            .shape
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let mut s = format!(
            "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{shape}]",
            self.quant_type.name(),
            self.blocksize,
            self.dtype.torch_name()
        );
        if let Some(off) = self.nested_offset {
            s.push_str(&format!(
                ", \"nested_blocksize\": {NESTED_BLOCKSIZE}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
                python_float_repr(off as f64)
            ));
        }
        s.push('}');
        s
    }

    /// Parse a quant-state blob (any valid JSON with the keys bitsandbytes writes).
    pub fn parse(bytes: &[u8]) -> Result<QuantStateInfo> {
        let v: Value =
            serde_json::from_slice(bytes).map_err(|e| anyhow!("quant state is not JSON: {e}"))?;
        let o = v
            .as_object()
            .ok_or_else(|| anyhow!("quant state is not a JSON object"))?;
        let s = |k: &str| {
            o.get(k)
                .and_then(Value::as_str)
                .ok_or_else(|| anyhow!("quant state key {k:?} is missing or not a string"))
        };
        let u = |k: &str| {
            o.get(k)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .ok_or_else(|| anyhow!("quant state key {k:?} is missing or not an integer"))
        };
        let qt = s("quant_type")?;
        let quant_type = QuantType::parse(qt)
            .ok_or_else(|| anyhow!("quant state: unknown quant_type {qt:?}"))?;
        let blocksize = u("blocksize")?;
        if !(blocksize.is_power_of_two() && (32..=4096).contains(&blocksize)) {
            bail!("quant state: blocksize {blocksize} is not a power of two in 32..4096");
        }
        let dt = s("dtype")?;
        let dtype = StoredDtype::from_torch_name(dt).ok_or_else(|| {
            anyhow!("quant state: dtype {dt:?} is not float32, float16 or bfloat16")
        })?;
        let shape = o
            .get("shape")
            .and_then(Value::as_array)
            .and_then(|a| {
                a.iter()
                    .map(|d| d.as_u64().map(|x| x as usize))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| {
                anyhow!("quant state key \"shape\" is missing or not a list of integers")
            })?;
        let nested_offset = match o.get("nested_offset") {
            None => None,
            Some(x) => Some(
                x.as_f64()
                    .ok_or_else(|| anyhow!("quant state key \"nested_offset\" is not a number"))?
                    as f32,
            ),
        };
        if nested_offset.is_some() {
            let nb = u("nested_blocksize")?;
            if nb != NESTED_BLOCKSIZE {
                bail!("quant state: nested_blocksize {nb} (only 256 is supported)");
            }
            if s("nested_dtype")? != "float32" {
                bail!("quant state: nested_dtype must be \"float32\"");
            }
        }
        Ok(QuantStateInfo {
            quant_type,
            blocksize,
            dtype,
            shape,
            nested_offset,
        })
    }
}

/// Python's `repr(float)`: shortest round-trip digits; scientific form (`1.5e-05`, `1e+16`)
/// when the decimal exponent is < -4 or ≥ 16; integral values keep `.0`.
pub fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    // `{:e}` gives the shortest round-trip digits: "d.ddde-N"
    let e = format!("{x:e}");
    let (mant, exp) = e.split_once('e').unwrap();
    let exp: i32 = exp.parse().unwrap();
    let (sign, mant) = match mant.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mant),
    };
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let n = digits.len() as i32;
        if exp < 0 {
            format!("{sign}0.{}{digits}", "0".repeat((-exp - 1) as usize))
        } else if exp + 1 >= n {
            format!("{sign}{digits}{}.0", "0".repeat((exp + 1 - n) as usize))
        } else {
            let (a, b) = digits.split_at((exp + 1) as usize);
            format!("{sign}{a}.{b}")
        }
    } else {
        let m = if digits.len() == 1 {
            digits.clone()
        } else {
            format!("{}.{}", &digits[..1], &digits[1..])
        };
        let es = if exp < 0 { "-" } else { "+" };
        format!("{sign}{m}e{es}{:02}", exp.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dequantize_any_range_is_the_per_value_formula() {
        let n = 1000;
        let x: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let (packed, absmax) = quantize_4bit(QuantType::Nf4, &x);
        let table = QuantType::Nf4.codebook().table;
        let value = |i: usize| {
            let b = packed[i / 2];
            table[(if i.is_multiple_of(2) { b >> 4 } else { b & 15 }) as usize]
                * absmax[i / BLOCKSIZE]
        };
        for (first, len) in [
            (0, n),
            (0, 64),
            (1, 0),
            (3, 5),
            (63, 2),
            (64, 128),
            (65, 900),
            (999, 1),
        ] {
            let mut out = vec![0f32; len];
            dequantize_4bit(QuantType::Nf4, &packed, &absmax, first, &mut out);
            for (k, v) in out.iter().enumerate() {
                assert_eq!(v.to_bits(), value(first + k).to_bits(), "{first}+{k}");
            }
        }
    }

    #[test]
    fn python_repr() {
        // expected strings: CPython 3 repr()
        for (x, s) in [
            (0.05186249688267708, "0.05186249688267708"),
            (1.5e-05, "1.5e-05"),
            (1e-05, "1e-05"),
            (0.0001, "0.0001"),
            (123.0, "123.0"),
            (1e16, "1e+16"),
            (1.2345678e22, "1.2345678e+22"),
            (9999999999999998.0, "9999999999999998.0"),
            (-2.5, "-2.5"),
            (0.0, "0.0"),
            (0.1, "0.1"),
        ] {
            assert_eq!(python_float_repr(x), s);
        }
    }

    #[test]
    fn nf4_thresholds_match_spec() {
        // shared/specs/nf4-peft.md §3.2 threshold bits
        let want: [u32; 15] = [
            0xBF591CD8, 0xBF1C5270, 0xBEEB8480, 0xBEADEA76, 0xBE703CEC, 0xBE0D38BC, 0xBD3A7871,
            0x3D22FAFF, 0x3DF64862, 0x3E5067E0, 0x3E9582D4, 0x3EC753F9, 0x3F006D04, 0x3F248DAF,
            0x3F5C89DA,
        ];
        let cb = QuantType::Nf4.codebook();
        for (m, w) in cb.mids.iter().zip(want) {
            assert_eq!(m.to_bits(), w);
        }
        // exactly on a threshold: the lower code
        assert_eq!(cb.code(f32::from_bits(0x3D22FAFF)), 7);
        assert_eq!(cb.code(f32::from_bits(0x3D22FB00)), 8);
    }
}
