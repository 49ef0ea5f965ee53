//! Q5_0 blocks: 32 elements in 22 bytes, `d: f16`, `qh: u32 LE` (bit 4 of element `j` in bit
//! `j`), 16 bytes of low nibbles (order as Q4_0). Value = `(q - 16) * d`. Bit-exact with
//! llama.cpp's `quantize_row_q5_0_ref` / `dequantize_row_q5_0` (gguf-and-k-quants.md §2.1, §3.6).

use super::fp::{read_f16, write_f16};
use super::legacy::{QK, blocks_deq, cvtt_block, first_absmax, high_bits, inv_or_zero};

/// Bytes per block.
pub const BLOCK_BYTES: usize = 22;

super::legacy::quantize_fn!(quantize_block);

#[inline(always)]
fn quantize_block(x: &[f32; QK], y: &mut [u8; BLOCK_BYTES]) {
    let max = first_absmax(x);
    let d = max / -16.0;
    let id = inv_or_zero(d);
    write_f16(&mut y[0..2], d);
    // MIN(31, (int8_t)(x*id + 16.5f)) stored in a uint8_t
    let c = cvtt_block(&std::array::from_fn(|j| x[j] * id + 16.5));
    let q: [u8; QK] = std::array::from_fn(|j| (c[j] as i8).min(31) as u8);
    for j in 0..QK / 2 {
        y[6 + j] = (q[j] & 0x0F) | ((q[j + QK / 2] & 0x0F) << 4);
    }
    let qh = high_bits(&q);
    y[2..6].copy_from_slice(&qh.to_le_bytes());
}

pub fn dequantize(x: &[u8], y: &mut [f32]) {
    for (xb, yb) in blocks_deq::<BLOCK_BYTES>(x, y) {
        let d = read_f16(&xb[0..2]);
        let qh = u32::from_le_bytes([xb[2], xb[3], xb[4], xb[5]]);
        for j in 0..QK / 2 {
            let q = xb[6 + j];
            let h0 = ((qh >> j) << 4) & 0x10;
            let h1 = (qh >> (j + 12)) & 0x10;
            yb[j] = (((q & 0x0F) as u32 | h0) as i32 - 16) as f32 * d;
            yb[j + QK / 2] = (((q >> 4) as u32 | h1) as i32 - 16) as f32 * d;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::legacy::testutil::{Rng, max_err};

    #[test]
    fn zero_block() {
        let mut y = [0xAAu8; BLOCK_BYTES];
        quantize(&[0.0; QK], &mut y);
        // d = 0.0 / -16 = -0.0 (fp16 0x8000), every code (int8)(0 + 16.5) = 16: low nibbles 0,
        // all high bits set
        assert_eq!(&y[..2], &[0x00, 0x80]);
        assert_eq!(&y[2..6], &[0xFF; 4]);
        assert!(y[6..].iter().all(|&b| b == 0));
        let mut back = [1f32; QK];
        dequantize(&y, &mut back);
        assert!(back.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn round_trip_error_within_one_step() {
        let mut rng = Rng(0x5EED_0005);
        for _ in 0..200 {
            let x = rng.vec(QK, 3.0);
            let mut q = [0u8; BLOCK_BYTES];
            quantize(&x, &mut q);
            let mut back = [0f32; QK];
            dequantize(&q, &mut back);
            let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
            // half a step except for the clamped code 32 (one step), plus fp16 d
            assert!(max_err(&x, &back) <= amax / 16.0 * 1.01, "{:?}", x);
        }
    }
}
