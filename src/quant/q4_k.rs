//! Q4_K blocks (144 bytes per 256 values): bit-exact port of llama.cpp's
//! `quantize_row_q4_K_ref` / `dequantize_row_q4_K` (gguf-and-k-quants.md §2.2, §3.2).

use super::QK_K;
use super::fp::{nearest_int, read_f16, write_f16};
#[cfg(test)]
use super::kquant::quantize_fit_portable;
use super::kquant::{
    SubBlockFit, get_scale_min_k4, pack_k4_scales, quantize_fit, quantize_fit_ref,
};

/// Bytes per block.
pub const BLOCK_BYTES: usize = 144;

/// Q4_K's sub-block fit: `make_qkx2_quants(15, …, -1.0, 0.1, 20)` (`quantize_row_q4_K_ref`).
pub(crate) struct Q4K;

impl SubBlockFit for Q4K {
    const BYTES: usize = BLOCK_BYTES;
    const NMAX: i32 = 15;
    const RMIN: f32 = -1.0;
    const NSTEP: i32 = 20;
    #[inline(always)]
    fn finish(
        x: &[f32; QK_K],
        scales: &[f32; 8],
        mins: &[f32; 8],
        l: &mut [u8; QK_K],
        y: &mut [u8],
    ) {
        finish_block(x, scales, mins, l, y.try_into().unwrap());
    }
}

/// Quantize whole 256-value blocks of `x` into `y` (`x.len() / 256 * 144` bytes).
///
/// Lane-parallel over the 8 sub-blocks of each super-block (AVX2 when the CPU has it), byte
/// for byte equal to [`quantize_ref`].
pub fn quantize(x: &[f32], y: &mut [u8]) {
    quantize_fit::<Q4K>(x, y);
}

/// The portable (non-AVX2) lane version.
#[cfg(test)]
pub(crate) fn quantize_portable(x: &[f32], y: &mut [u8]) {
    quantize_fit_portable::<Q4K>(x, y);
}

/// The scalar reference: a direct transcription of `quantize_row_q4_K_ref`.
pub fn quantize_ref(x: &[f32], y: &mut [u8]) {
    quantize_fit_ref::<Q4K>(x, y);
}

/// Everything after the sub-block fits: 6-bit scale codes, fp16 `d`/`dmin`, requantisation
/// with the rounded scales, nibble packing.
#[inline(always)]
pub(crate) fn finish_block(
    x: &[f32; QK_K],
    scales: &[f32; 8],
    mins: &[f32; 8],
    l: &mut [u8; QK_K],
    y: &mut [u8; BLOCK_BYTES],
) {
    y[4..16].fill(0);
    let (d, dmin) = pack_k4_scales(scales, mins, &mut y[4..16]);
    write_f16(&mut y[0..2], d);
    write_f16(&mut y[2..4], dmin);
    let d = read_f16(&y[0..2]);
    let dmin = read_f16(&y[2..4]);
    for j in 0..8 {
        let (sc, m) = get_scale_min_k4(j, &y[4..16]);
        let dj = d * sc as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin * m as f32;
        for i in 0..32 {
            l[32 * j + i] = nearest_int((x[32 * j + i] + dm) / dj).clamp(0, 15) as u8;
        }
    }
    let qs = &mut y[16..];
    for c in 0..4 {
        for i in 0..32 {
            qs[32 * c + i] = l[64 * c + i] | (l[64 * c + 32 + i] << 4);
        }
    }
}

/// Dequantize whole blocks of `x` into `y` (256 values per 144 bytes).
pub fn dequantize(x: &[u8], y: &mut [f32]) {
    assert_eq!(x.len() % BLOCK_BYTES, 0);
    assert_eq!(y.len(), x.len() / BLOCK_BYTES * QK_K);
    for (b, out) in x.chunks_exact(BLOCK_BYTES).zip(y.chunks_exact_mut(QK_K)) {
        let d = read_f16(&b[0..2]);
        let min = read_f16(&b[2..4]);
        let sc = &b[4..16];
        let qs = &b[16..];
        for c in 0..4 {
            let (s1, m1) = get_scale_min_k4(2 * c, sc);
            let (s2, m2) = get_scale_min_k4(2 * c + 1, sc);
            let (d1, m1) = (d * s1 as f32, min * m1 as f32);
            let (d2, m2) = (d * s2 as f32, min * m2 as f32);
            let q = &qs[32 * c..32 * c + 32];
            let o = &mut out[64 * c..64 * c + 64];
            for i in 0..32 {
                o[i] = d1 * (q[i] & 0xF) as f32 - m1;
                o[32 + i] = d2 * (q[i] >> 4) as f32 - m2;
            }
        }
    }
}
