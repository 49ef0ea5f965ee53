//! Q4_0 blocks: 32 elements in 18 bytes, `d: f16` then 16 bytes of nibbles (element `j` in the
//! low nibble of `qs[j]`, element `j + 16` in the high nibble). Value = `(q - 8) * d`.
//! Bit-exact with llama.cpp's `quantize_row_q4_0_ref` / `dequantize_row_q4_0`
//! (gguf-and-k-quants.md §2.1, §3.6).

use super::fp::{read_f16, write_f16};
use super::legacy::{QK, blocks_deq, cvtt_block, first_absmax, inv_or_zero};

/// Bytes per block.
pub const BLOCK_BYTES: usize = 18;

super::legacy::quantize_fn!(quantize_block);

#[inline(always)]
fn quantize_block(x: &[f32; QK], y: &mut [u8; BLOCK_BYTES]) {
    let max = first_absmax(x);
    let d = max / -8.0;
    let id = inv_or_zero(d);
    write_f16(&mut y[0..2], d);
    // MIN(15, (int8_t)(x*id + 8.5f)) stored in a uint8_t
    let c = cvtt_block(&std::array::from_fn(|j| x[j] * id + 8.5));
    let q: [u8; QK] = std::array::from_fn(|j| (c[j] as i8).min(15) as u8);
    for j in 0..QK / 2 {
        y[2 + j] = q[j] | (q[j + QK / 2] << 4);
    }
}

pub fn dequantize(x: &[u8], y: &mut [f32]) {
    for (xb, yb) in blocks_deq::<BLOCK_BYTES>(x, y) {
        let d = read_f16(&xb[0..2]);
        for j in 0..QK / 2 {
            let q = xb[2 + j];
            yb[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
            yb[j + QK / 2] = ((q >> 4) as i32 - 8) as f32 * d;
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
        // max stays +0.0, so d = 0.0 / -8 = -0.0 (fp16 0x8000), id = 0 and every code is
        // (int8)(0 + 8.5) = 8: not zero bytes
        assert_eq!(&y[..2], &[0x00, 0x80]);
        assert!(y[2..].iter().all(|&b| b == 0x88));
    }

    #[test]
    fn round_trip_error_within_half_step() {
        let mut rng = Rng(0x1234_5678);
        for _ in 0..200 {
            let x = rng.vec(QK, 1.0);
            let mut q = [0u8; BLOCK_BYTES];
            quantize(&x, &mut q);
            let mut back = [0f32; QK];
            dequantize(&q, &mut back);
            let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
            // step |d| = amax/8; truncating x*id + 8.5 rounds to nearest, except that the
            // code 16 (an element of the opposite sign to the absmax one) is clamped to 15:
            // so one step at most (plus the fp16 rounding of d)
            assert!(max_err(&x, &back) <= amax / 8.0 * 1.01, "{:?}", x);
        }
    }

    #[test]
    fn max_element_hits_code_zero() {
        let mut x = [0.25f32; QK];
        x[5] = -3.0;
        let mut q = [0u8; BLOCK_BYTES];
        quantize(&x, &mut q);
        // d = -3 / -8 = 0.375: the (negative) absmax element maps to code 0, exactly -8·d
        assert_eq!(q[2 + 5] & 0x0F, 0);
        let mut back = [0f32; QK];
        dequantize(&q, &mut back);
        assert_eq!(back[5], -3.0);
    }
}
