//! Q5_1 blocks: 32 elements in 24 bytes, `d: f16`, `m: f16`, `qh: u32 LE`, 16 bytes of low
//! nibbles (order as Q5_0). Value = `q * d + m`. Bit-exact with llama.cpp's
//! `quantize_row_q5_1_ref` / `dequantize_row_q5_1` (gguf-and-k-quants.md §2.1, §3.6).

use super::fp::{read_f16, write_f16};
use super::legacy::{QK, blocks_deq, cvtt_block, high_bits, inv_or_zero, min_max};

/// Bytes per block.
pub const BLOCK_BYTES: usize = 24;

super::legacy::quantize_fn!(quantize_block);

#[inline(always)]
fn quantize_block(x: &[f32; QK], y: &mut [u8; BLOCK_BYTES]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = inv_or_zero(d);
    write_f16(&mut y[0..2], d);
    write_f16(&mut y[2..4], min);
    // (uint8_t)((x - min)*id + 0.5f): no clamp to 31 in the reference
    let c = cvtt_block(&std::array::from_fn(|j| (x[j] - min) * id + 0.5));
    let q: [u8; QK] = std::array::from_fn(|j| c[j] as u8);
    for j in 0..QK / 2 {
        y[8 + j] = (q[j] & 0x0F) | ((q[j + QK / 2] & 0x0F) << 4);
    }
    let qh = high_bits(&q);
    y[4..8].copy_from_slice(&qh.to_le_bytes());
}

pub fn dequantize(x: &[u8], y: &mut [f32]) {
    for (xb, yb) in blocks_deq::<BLOCK_BYTES>(x, y) {
        let d = read_f16(&xb[0..2]);
        let m = read_f16(&xb[2..4]);
        let qh = u32::from_le_bytes([xb[4], xb[5], xb[6], xb[7]]);
        for j in 0..QK / 2 {
            let q = xb[8 + j];
            let h0 = ((qh >> j) << 4) & 0x10;
            let h1 = (qh >> (j + 12)) & 0x10;
            yb[j] = ((q & 0x0F) as u32 | h0) as f32 * d + m;
            yb[j + QK / 2] = ((q >> 4) as u32 | h1) as f32 * d + m;
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
    fn round_trip_error_within_half_step() {
        let mut rng = Rng(0x5EED_0051);
        for _ in 0..200 {
            let x = rng.vec(QK, 0.1);
            let mut q = [0u8; BLOCK_BYTES];
            quantize(&x, &mut q);
            let mut back = [0f32; QK];
            dequantize(&q, &mut back);
            let (mn, mx) = x
                .iter()
                .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
            let bound = (mx - mn) / 31.0 * 0.5 * 1.01 + mn.abs() * 1e-3 + (mx - mn) * 8e-3;
            assert!(max_err(&x, &back) <= bound, "{:?}", x);
        }
    }
}
