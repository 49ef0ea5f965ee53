//! Q2_K blocks (84 bytes per 256 values): bit-exact port of llama.cpp's
//! `quantize_row_q2_K_ref` / `dequantize_row_q2_K` (gguf-and-k-quants.md §2.5, §3.7).

use super::QK_K;
use super::fp::{nearest_int, read_f16, write_f16};
use super::kquant::{make_qkx2_quants, make_qkx2_quants_lanes};

/// Bytes per block.
pub const BLOCK_BYTES: usize = 84;

/// Scale of the 4-bit sub-block scale/min codes.
const Q4SCALE: f32 = 15.0;

/// Quantize whole 256-value blocks of `x` into `y` (`x.len() / 256 * 84` bytes).
///
/// Lane-parallel over the 16 sub-blocks of each super-block (AVX2 when the CPU has it), byte
/// for byte equal to [`quantize_ref`].
pub fn quantize(x: &[f32], y: &mut [u8]) {
    assert_eq!(x.len() % QK_K, 0);
    assert_eq!(y.len(), x.len() / QK_K * BLOCK_BYTES);
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            unsafe { quantize_avx2(x, y) };
            return;
        }
    }
    quantize_portable(x, y);
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx2")]
fn quantize_avx2(x: &[f32], y: &mut [u8]) {
    use super::kquant::avx2::make_qkx2_quants_x8;
    for (xb, yb) in x.chunks_exact(QK_K).zip(y.chunks_exact_mut(BLOCK_BYTES)) {
        let xb: &[f32; QK_K] = xb.try_into().unwrap();
        // 16 lanes in two vectors: vector v, lane j = sub-block 8v + j
        let mut xt = [[[0f32; 8]; 2]; 16];
        let mut wt = [[[0f32; 8]; 2]; 16];
        for v in 0..2 {
            for j in 0..8 {
                for i in 0..16 {
                    let e = xb[128 * v + 16 * j + i];
                    xt[i][v][j] = e;
                    wt[i][v][j] = e.abs();
                }
            }
        }
        let mut lt = [[[0u8; 8]; 2]; 16];
        let (s, m) = make_qkx2_quants_x8::<16, 2>(3, &xt, &wt, &mut lt, -0.5, 0.1, 15, true);
        let mut scales = [0f32; 16];
        let mut mins = [0f32; 16];
        let mut l = [0u8; QK_K];
        for v in 0..2 {
            scales[8 * v..8 * v + 8].copy_from_slice(&s[v]);
            mins[8 * v..8 * v + 8].copy_from_slice(&m[v]);
            for j in 0..8 {
                for i in 0..16 {
                    l[128 * v + 16 * j + i] = lt[i][v][j];
                }
            }
        }
        finish_block(xb, &scales, &mins, &mut l, yb.try_into().unwrap());
    }
}

#[allow(clippy::needless_range_loop)]
#[inline(always)]
pub(crate) fn quantize_portable(x: &[f32], y: &mut [u8]) {
    for (xb, yb) in x.chunks_exact(QK_K).zip(y.chunks_exact_mut(BLOCK_BYTES)) {
        let xb: &[f32; QK_K] = xb.try_into().unwrap();
        let mut xt = [[0f32; 16]; 16];
        let mut wt = [[0f32; 16]; 16];
        for j in 0..16 {
            for i in 0..16 {
                xt[i][j] = xb[16 * j + i];
                wt[i][j] = xb[16 * j + i].abs();
            }
        }
        let mut lt = [[0u8; 16]; 16];
        let (scales, mins) =
            make_qkx2_quants_lanes::<16, 16>(3, &xt, &wt, &mut lt, -0.5, 0.1, 15, true);
        let mut l = [0u8; QK_K];
        for j in 0..16 {
            for i in 0..16 {
                l[16 * j + i] = lt[i][j];
            }
        }
        finish_block(xb, &scales, &mins, &mut l, yb.try_into().unwrap());
    }
}

/// The scalar reference: a direct transcription of `quantize_row_q2_K_ref`.
pub fn quantize_ref(x: &[f32], y: &mut [u8]) {
    assert_eq!(x.len() % QK_K, 0);
    assert_eq!(y.len(), x.len() / QK_K * BLOCK_BYTES);
    for (xb, yb) in x.chunks_exact(QK_K).zip(y.chunks_exact_mut(BLOCK_BYTES)) {
        quantize_block(xb.try_into().unwrap(), yb.try_into().unwrap());
    }
}

fn quantize_block(x: &[f32; QK_K], y: &mut [u8; BLOCK_BYTES]) {
    let mut l = [0u8; QK_K];
    let mut laux = [0u8; 16];
    let mut w = [0f32; 16];
    let mut scales = [0f32; 16];
    let mut mins = [0f32; 16];
    for j in 0..16 {
        let xs = &x[16 * j..16 * j + 16];
        for (wi, &v) in w.iter_mut().zip(xs) {
            *wi = v.abs();
        }
        let (s, m) = make_qkx2_quants(
            3,
            xs,
            &w,
            &mut l[16 * j..16 * j + 16],
            &mut laux,
            -0.5,
            0.1,
            15,
            true,
        );
        scales[j] = s;
        mins[j] = m;
    }
    finish_block(x, &scales, &mins, &mut l, y);
}

/// 4-bit scale/min codes, fp16 `d`/`dmin`, requantisation with the rounded scales, packing.
#[inline(always)]
pub(crate) fn finish_block(
    x: &[f32; QK_K],
    scales: &[f32; 16],
    mins: &[f32; 16],
    l: &mut [u8; QK_K],
    y: &mut [u8; BLOCK_BYTES],
) {
    let mut max_scale = 0.0f32;
    let mut max_min = 0.0f32;
    for j in 0..16 {
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }
    let (sc, rest) = y.split_at_mut(16);
    if max_scale > 0.0 {
        let iscale = Q4SCALE / max_scale;
        for j in 0..16 {
            // int stored into uint8_t: keep the low 8 bits, no clamp
            sc[j] = nearest_int(iscale * scales[j]) as u8;
        }
        write_f16(&mut rest[64..66], max_scale / Q4SCALE);
    } else {
        sc.fill(0);
        write_f16(&mut rest[64..66], 0.0);
    }
    if max_min > 0.0 {
        let iscale = Q4SCALE / max_min;
        for j in 0..16 {
            sc[j] |= (nearest_int(iscale * mins[j]) << 4) as u8;
        }
        write_f16(&mut rest[66..68], max_min / Q4SCALE);
    } else {
        write_f16(&mut rest[66..68], 0.0);
    }
    let d = read_f16(&rest[64..66]);
    let dmin = read_f16(&rest[66..68]);
    for j in 0..16 {
        let dj = d * (sc[j] & 0xF) as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin * (sc[j] >> 4) as f32;
        for i in 0..16 {
            l[16 * j + i] = nearest_int((x[16 * j + i] + dm) / dj).clamp(0, 3) as u8;
        }
    }
    let qs = &mut rest[..64];
    for h in 0..2 {
        let b = 128 * h;
        for i in 0..32 {
            qs[32 * h + i] =
                l[b + i] | (l[b + i + 32] << 2) | (l[b + i + 64] << 4) | (l[b + i + 96] << 6);
        }
    }
}

/// Dequantize whole blocks of `x` into `y` (256 values per 84 bytes).
pub fn dequantize(x: &[u8], y: &mut [f32]) {
    assert_eq!(x.len() % BLOCK_BYTES, 0);
    assert_eq!(y.len(), x.len() / BLOCK_BYTES * QK_K);
    for (b, out) in x.chunks_exact(BLOCK_BYTES).zip(y.chunks_exact_mut(QK_K)) {
        let sc = &b[0..16];
        let qs = &b[16..80];
        let d = read_f16(&b[80..82]);
        let min = read_f16(&b[82..84]);
        for (e, o) in out.iter_mut().enumerate() {
            let (h, k, i) = (e / 128, (e % 128) / 32, e % 32);
            let q = (qs[32 * h + i] >> (2 * k)) & 3;
            let s = sc[e / 16];
            let dl = d * (s & 0xF) as f32;
            let ml = min * (s >> 4) as f32;
            *o = dl * q as f32 - ml;
        }
    }
}
