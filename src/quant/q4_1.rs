//! Q4_1 blocks: 32 elements in 20 bytes, `d: f16`, `m: f16`, 16 bytes of nibbles (order as
//! Q4_0). Value = `q * d + m`. Bit-exact with llama.cpp's `quantize_row_q4_1_ref` /
//! `dequantize_row_q4_1` (gguf-and-k-quants.md §2.1, §3.6).

use super::fp::{read_f16, write_f16};
use super::legacy::{QK, blocks_deq, cvtt_block, inv_or_zero, min_max};

/// Bytes per block.
pub const BLOCK_BYTES: usize = 20;

super::legacy::quantize_fn!(quantize_block);

#[inline(always)]
fn quantize_block(x: &[f32; QK], y: &mut [u8; BLOCK_BYTES]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = inv_or_zero(d);
    write_f16(&mut y[0..2], d);
    write_f16(&mut y[2..4], min);
    // MIN(15, (int8_t)((x - min)*id + 0.5f)) stored in a uint8_t
    let c = cvtt_block(&std::array::from_fn(|j| (x[j] - min) * id + 0.5));
    let q: [u8; QK] = std::array::from_fn(|j| (c[j] as i8).min(15) as u8);
    for j in 0..QK / 2 {
        y[4 + j] = q[j] | (q[j + QK / 2] << 4);
    }
}

pub fn dequantize(x: &[u8], y: &mut [f32]) {
    for (xb, yb) in blocks_deq::<BLOCK_BYTES>(x, y) {
        let d = read_f16(&xb[0..2]);
        let m = read_f16(&xb[2..4]);
        for j in 0..QK / 2 {
            let q = xb[4 + j];
            yb[j] = (q & 0x0F) as f32 * d + m;
            yb[j + QK / 2] = (q >> 4) as f32 * d + m;
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
    fn constant_block_round_trips_through_m() {
        let mut y = [0u8; BLOCK_BYTES];
        quantize(&[0.5; QK], &mut y);
        let mut back = [0f32; QK];
        dequantize(&y, &mut back);
        assert!(back.iter().all(|&v| v == 0.5));
    }

    #[test]
    fn round_trip_error_within_half_step() {
        let mut rng = Rng(0xDEAD_BEEF);
        for _ in 0..200 {
            let x = rng.vec(QK, 1.0);
            let mut q = [0u8; BLOCK_BYTES];
            quantize(&x, &mut q);
            let mut back = [0f32; QK];
            dequantize(&q, &mut back);
            let (mn, mx) = x
                .iter()
                .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
            // half a step, plus the fp16 rounding of m (and of d times up to 15)
            let bound = (mx - mn) / 15.0 * 0.5 * 1.01 + mn.abs() * 1e-3 + (mx - mn) * 8e-3;
            assert!(max_err(&x, &back) <= bound, "{:?}", x);
        }
    }
}
