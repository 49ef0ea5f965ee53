//! Q8_0 blocks: 32 elements in 34 bytes, `d: f16` then 32 `i8` codes. Value = `q * d`.
//! Bit-exact with llama.cpp's `quantize_row_q8_0_ref` / `dequantize_row_q8_0`
//! (gguf-and-k-quants.md §2.1, §3.6).

use super::fp::{read_f16, write_f16};
use super::legacy::{QK, blocks, blocks_deq, cvtt_i32, inv_or_zero};

/// Bytes per block.
pub const BLOCK_BYTES: usize = 34;

pub fn quantize(x: &[f32], y: &mut [u8]) {
    for (xb, yb) in blocks::<BLOCK_BYTES>(x, y) {
        quantize_block(xb, yb);
    }
}

#[inline(always)]
fn quantize_block(x: &[f32; QK], y: &mut [u8; BLOCK_BYTES]) {
    let mut amax = 0.0f32;
    for &v in x {
        let a = v.abs();
        amax = if amax > a { amax } else { a }; // MAX(amax, fabsf(v))
    }
    let d = amax / 127.0;
    let id = inv_or_zero(d);
    write_f16(&mut y[0..2], d);
    for j in 0..QK {
        // roundf (half away from zero), then (int8_t)
        y[2 + j] = cvtt_i32((x[j] * id).round()) as u8;
    }
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
