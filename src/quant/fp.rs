//! Scalar helpers whose exact rounding the reference quantizers depend on
//! (gguf-and-k-quants.md §3.0): fp16/bf16 conversions and `nearest_int`.

/// llama.cpp's `nearest_int`: add 1.5·2^23, keep the low 23 mantissa bits, subtract 2^22.
/// Round-half-to-even for |f| < 2^22 − 0.5, wraps silently outside (as the reference does).
#[inline(always)]
pub fn nearest_int(f: f32) -> i32 {
    let val = f + 12_582_912.0f32;
    let bits = val.to_bits();
    (bits & 0x007F_FFFF) as i32 - 0x0040_0000
}

/// f32 → IEEE binary16 bits, round-to-nearest-even (GGML_FP32_TO_FP16 semantics;
/// NaN → canonical 0x7E00 | sign).
#[inline(always)]
pub fn f32_to_f16_bits(x: f32) -> u16 {
    if x.is_nan() {
        let sign = ((x.to_bits() >> 16) & 0x8000) as u16;
        return 0x7E00 | sign;
    }
    half::f16::from_f32(x).to_bits()
}

/// IEEE binary16 bits → f32 (exact).
#[inline(always)]
pub fn f16_bits_to_f32(h: u16) -> f32 {
    half::f16::from_bits(h).to_f32()
}

/// f32 → bf16 bits exactly as ggml/gguf-py do it: RNE, NaN quietened with 0x0040.
#[inline(always)]
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x0040) as u16;
    }
    ((bits.wrapping_add(0x7FFF).wrapping_add((bits >> 16) & 1)) >> 16) as u16
}

/// bf16 bits → f32 (exact).
#[inline(always)]
pub fn bf16_bits_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// Read a little-endian f16 at `b[0..2]`.
#[inline(always)]
pub fn read_f16(b: &[u8]) -> f32 {
    f16_bits_to_f32(u16::from_le_bytes([b[0], b[1]]))
}

/// Write `x` as a little-endian f16 into `b[0..2]`.
#[inline(always)]
pub fn write_f16(b: &mut [u8], x: f32) {
    b[..2].copy_from_slice(&f32_to_f16_bits(x).to_le_bytes());
}

/// Round each value through f16 (RNE) and back: what a detour through an F16 file does.
pub fn round_through_f16(x: &mut [f32]) {
    for v in x {
        *v = f16_bits_to_f32(f32_to_f16_bits(*v));
    }
}

/// Round each value through bf16 (RNE) and back.
pub fn round_through_bf16(x: &mut [f32]) {
    for v in x {
        *v = bf16_bits_to_f32(f32_to_bf16_bits(*v));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_int_ties_to_even_and_wraps() {
        assert_eq!(nearest_int(2.5), 2);
        assert_eq!(nearest_int(3.5), 4);
        assert_eq!(nearest_int(-0.5), 0);
        assert_eq!(nearest_int(-1.5), -2);
        assert_eq!(nearest_int(1e7), -1_291_456);
        assert_eq!(nearest_int(f32::INFINITY), -4_194_304);
        assert_eq!(nearest_int(f32::NAN), 0);
    }

    #[test]
    fn bf16_rne() {
        // 1 + 2^-8 is exactly halfway between two bf16 values: ties to even (down).
        assert_eq!(f32_to_bf16_bits(1.0 + 1.0 / 256.0), 0x3F80);
        assert_eq!(f32_to_bf16_bits(1.0 + 3.0 / 256.0), 0x3F82);
        assert_eq!(f32_to_bf16_bits(f32::NAN) & 0x7FC0, 0x7FC0);
    }

    #[test]
    fn f16_overflow_and_subnormal() {
        assert_eq!(f32_to_f16_bits(65520.0), 0x7C00);
        assert_eq!(f32_to_f16_bits(65519.0), 0x7BFF);
        assert_eq!(f32_to_f16_bits(5.960_464_5e-8), 0x0001);
        assert_eq!(f32_to_f16_bits(f32::NAN), 0x7E00);
    }
}
