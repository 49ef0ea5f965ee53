//! Q8_0 blocks: 32 elements in 34 bytes, `d: f16` then 32 `i8` codes. Value = `q * d`.
//! Bit-exact with llama.cpp's `quantize_row_q8_0_ref` / `dequantize_row_q8_0`
//! (gguf-and-k-quants.md §2.1, §3.6).

use super::fp::{read_f16, write_f16};
use super::legacy::{QK, blocks_deq, cvtt_block, inv_or_zero};

/// Bytes per block.
pub const BLOCK_BYTES: usize = 34;

super::legacy::quantize_fn!(quantize_block);

#[inline(always)]
fn quantize_block(x: &[f32; QK], y: &mut [u8; BLOCK_BYTES]) {
    let amax = absmax(x);
    let d = amax / 127.0;
    let id = inv_or_zero(d);
    write_f16(&mut y[0..2], d);
    // roundf (half away from zero), then (int8_t)
    let c = cvtt_block(&std::array::from_fn(|j| (x[j] * id).round()));
    for j in 0..QK {
        y[2 + j] = c[j] as u8;
    }
}

/// `amax = MAX(amax, fabsf(v))` over the block from 0. Without NaN that is the largest |v|
/// in any order (vectorized); a NaN makes the result depend on the order (`MAX(NaN, a)` is `a`,
/// `MAX(a, NaN)` is NaN), so such blocks take the literal scan.
#[inline(always)]
fn absmax(x: &[f32; QK]) -> f32 {
    if x.iter().any(|v| v.is_nan()) {
        return absmax_scalar(x);
    }
    let mut m = [0f32; 8];
    for c in x.chunks_exact(8) {
        for k in 0..8 {
            let a = c[k].abs();
            m[k] = if m[k] > a { m[k] } else { a };
        }
    }
    m.iter().fold(0f32, |a, &b| if a > b { a } else { b })
}

#[inline(never)]
fn absmax_scalar(x: &[f32; QK]) -> f32 {
    let mut amax = 0.0f32;
    for &v in x {
        let a = v.abs();
        amax = if amax > a { amax } else { a }; // MAX(amax, fabsf(v))
    }
    amax
}

pub fn dequantize(x: &[u8], y: &mut [f32]) {
    for (xb, yb) in blocks_deq::<BLOCK_BYTES>(x, y) {
        let d = read_f16(&xb[0..2]);
        for j in 0..QK {
            yb[j] = xb[2 + j] as i8 as f32 * d;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::legacy::testutil::{Rng, max_err};

    #[test]
    fn zero_block_is_zero_bytes() {
        let mut y = [0xAAu8; BLOCK_BYTES];
        quantize(&[0.0; QK], &mut y);
        assert!(y.iter().all(|&b| b == 0));
    }

    #[test]
    fn vector_absmax_matches_scan() {
        let mut rng = Rng(99);
        let specials = [0.0f32, -0.0, f32::NAN, f32::INFINITY, -f32::MAX, 1e-40];
        for _ in 0..20_000 {
            let mut x = [0f32; QK];
            for v in x.iter_mut() {
                let r = rng.next_u64();
                *v = if r.is_multiple_of(10) {
                    specials[(r >> 8) as usize % specials.len()]
                } else {
                    rng.gauss(1.0)
                };
            }
            assert_eq!(absmax(&x).to_bits(), absmax_scalar(&x).to_bits(), "{x:?}");
        }
    }

    #[test]
    fn rounds_half_away_from_zero() {
        // amax 127 gives d = 1, id = 1: codes are roundf(x)
        let mut x = [0.0f32; QK];
        x[0] = 127.0;
        x[1] = 2.5;
        x[2] = -2.5;
        x[3] = -127.0;
        let mut y = [0u8; BLOCK_BYTES];
        quantize(&x, &mut y);
        assert_eq!(&y[2..6], &[127, 3, (-3i8) as u8, (-127i8) as u8]);
    }

    #[test]
    fn round_trip_error_within_half_step() {
        let mut rng = Rng(0x5EED_0008);
        for _ in 0..200 {
            let x = rng.vec(QK, 2.0);
            let mut q = [0u8; BLOCK_BYTES];
            quantize(&x, &mut q);
            let mut back = [0f32; QK];
            dequantize(&q, &mut back);
            let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
            // half a step plus the fp16 rounding of d (relative 2^-11, times up to 127 steps)
            let step = amax / 127.0;
            assert!(
                max_err(&x, &back) <= step * 0.5 * 1.01 + amax / 1024.0,
                "{:?}",
                x
            );
        }
    }
}
