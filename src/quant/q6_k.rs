//! Q6_K super-blocks: 256 elements in 210 bytes (`ql[128]`, `qh[64]`, `scales: i8[16]`,
//! `d: f16`), 16 symmetric sub-blocks of 16 with 6-bit codes. Bit-exact with llama.cpp's
//! `quantize_row_q6_K_ref` (via `make_qx_quants`, rmse_type 1, no weights) and
//! `dequantize_row_q6_K` (gguf-and-k-quants.md §2.4, §3.3, §3.4).

use super::QK_K;
use super::fp::{f16_bits_to_f32, f32_to_f16_bits, nearest_int};

/// Bytes per super-block.
pub const BLOCK_BYTES: usize = 210;

/// `GROUP_MAX_EPS`: below this magnitude a group counts as all zero.
const GROUP_MAX_EPS: f32 = 1e-15;

/// llama.cpp's `make_qx_quants(n, nmax, x, L, rmse_type = 1, qw = NULL)`: symmetric fit
/// `x ≈ scale·(L − nmax)` with weights `x²`, trying `iscale = -(nmax + 0.1·is)/max` for
/// `is = -9..=9`. Writes `L[i] ∈ [0, 2·nmax − 1]` and returns the scale. Every f32 operation in
/// the reference's order (`w*x*l` is `(w*x)*l`).
pub fn make_qx_quants(nmax: i32, x: &[f32], l: &mut [i8]) -> f32 {
    debug_assert_eq!(x.len(), l.len());
    let mut max = 0.0f32;
    let mut amax = 0.0f32;
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l.fill(0);
        return 0.0;
    }
    let nmaxf = nmax as f32;
    let mut iscale = (-nmax) as f32 / max;
    let mut sumlx = 0.0f32;
    let mut suml2 = 0.0f32;
    for (&xi, li) in x.iter().zip(l.iter_mut()) {
        let q = nearest_int(iscale * xi).clamp(-nmax, nmax - 1);
        *li = (q + nmax) as i8;
        let w = xi * xi;
        let qf = q as f32;
        sumlx += w * xi * qf;
        suml2 += w * qf * qf;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9i32..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmaxf + 0.1f32 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for &xi in x {
            let q = nearest_int(iscale * xi).clamp(-nmax, nmax - 1);
            let w = xi * xi;
            let qf = q as f32;
            sumlx += w * xi * qf;
            suml2 += w * qf * qf;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (&xi, li) in x.iter().zip(l.iter_mut()) {
                *li = (nmax + nearest_int(iscale * xi).clamp(-nmax, nmax - 1)) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

pub fn quantize(x: &[f32], y: &mut [u8]) {
    assert!(
        x.len().is_multiple_of(QK_K),
        "input is not a whole number of blocks"
    );
    assert_eq!(
        y.len(),
        x.len() / QK_K * BLOCK_BYTES,
        "output size does not match the input"
    );
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        unsafe { quantize_avx2(x, y) };
        return;
    }
    quantize_blocks(x, y);
}

/// The same code compiled with AVX2 enabled (8-lane vectors: two per 16-lane operation). Only
/// `avx2`, never `fma`, so no multiply-add can be fused.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn quantize_avx2(x: &[f32], y: &mut [u8]) {
    quantize_blocks(x, y);
}

#[inline(always)]
fn quantize_blocks(x: &[f32], y: &mut [u8]) {
    for (xb, yb) in x.chunks_exact(QK_K).zip(y.chunks_exact_mut(BLOCK_BYTES)) {
        quantize_block_lanes(xb.try_into().unwrap(), yb.try_into().unwrap());
    }
}

/// Sub-blocks per super-block: the SIMD lanes of the fast path.
const NSUB: usize = QK_K / 16;
type Lanes<T> = [T; NSUB];

/// One candidate pass of `make_qx_quants(16, 32)` in all 16 sub-blocks at once (lane `k` =
/// sub-block `k`, row `i` = its element `i`): per lane, `sumlx`/`suml2` accumulated over `i` in
/// the reference order.
#[inline(always)]
fn qx_pass(
    iscale: &Lanes<f32>,
    xt: &[Lanes<f32>; 16],
    w: &[Lanes<f32>; 16],
    wx: &[Lanes<f32>; 16],
) -> (Lanes<f32>, Lanes<f32>) {
    let mut sumlx = [0f32; NSUB];
    let mut suml2 = [0f32; NSUB];
    for i in 0..16 {
        for k in 0..NSUB {
            let q = nearest_int(iscale[k] * xt[i][k]).clamp(-32, 31);
            let qf = q as f32;
            sumlx[k] += wx[i][k] * qf; // (w*x)*l
            suml2[k] += w[i][k] * qf * qf; // (w*l)*l
        }
    }
    (sumlx, suml2)
}

/// `mask ? a : b` for an all-ones / all-zeros `mask`, on the bits.
#[inline(always)]
fn blend(mask: u32, a: f32, b: f32) -> f32 {
    f32::from_bits((a.to_bits() & mask) | (b.to_bits() & !mask))
}

/// `quantize_row_q6_K_ref` on one super-block with each sub-block in its own SIMD lane: every
/// lane performs exactly the scalar sequence of f32 operations (branches become selects), so
/// the bytes are those of [`make_qx_quants`] and the scalar block code.
#[inline(always)]
fn quantize_block_lanes(x: &[f32; QK_K], y: &mut [u8; BLOCK_BYTES]) {
    let mut xt = [[0f32; NSUB]; 16];
    for k in 0..NSUB {
        for i in 0..16 {
            xt[i][k] = x[16 * k + i];
        }
    }
    // make_qx_quants(16, 32, rmse_type 1): first max-magnitude element per lane
    let mut amax = [0f32; NSUB];
    let mut max = [0f32; NSUB];
    let mut w = [[0f32; NSUB]; 16];
    let mut wx = [[0f32; NSUB]; 16];
    for i in 0..16 {
        for k in 0..NSUB {
            let v = xt[i][k];
            let ax = v.abs();
            let c = ((ax > amax[k]) as u32).wrapping_neg();
            amax[k] = blend(c, ax, amax[k]);
            max[k] = blend(c, v, max[k]);
            w[i][k] = v * v;
            wx[i][k] = w[i][k] * v;
        }
    }
    // The reference stores the levels of the initial pass and recomputes them whenever a
    // candidate is accepted, from that candidate's iscale: keeping the accepted iscale and
    // computing the levels once at the end gives the same levels.
    let mut best_iscale: Lanes<f32> = std::array::from_fn(|k| -32.0f32 / max[k]);
    let (sumlx, suml2) = qx_pass(&best_iscale, &xt, &w, &wx);
    let mut scale: Lanes<f32> = std::array::from_fn(|k| {
        if suml2[k] != 0.0 {
            sumlx[k] / suml2[k]
        } else {
            0.0
        }
    });
    let mut best: Lanes<f32> = std::array::from_fn(|k| scale[k] * sumlx[k]);
    for is in -9i32..=9 {
        if is == 0 {
            continue;
        }
        let step = 32.0f32 + 0.1f32 * is as f32;
        let iscale: Lanes<f32> = std::array::from_fn(|k| -step / max[k]);
        let (sumlx, suml2) = qx_pass(&iscale, &xt, &w, &wx);
        // per lane: `if (suml2 > 0 && sumlx*sumlx > best*suml2) { accept }`, as bit masks so
        // that it stays branch-free and vectorized
        let s: Lanes<f32> = std::array::from_fn(|k| sumlx[k] / suml2[k]);
        let acc: Lanes<u32> = std::array::from_fn(|k| {
            let a = (suml2[k] > 0.0) & (sumlx[k] * sumlx[k] > best[k] * suml2[k]);
            (a as u32).wrapping_neg()
        });
        for k in 0..NSUB {
            scale[k] = blend(acc[k], s[k], scale[k]);
            best[k] = blend(acc[k], s[k] * sumlx[k], best[k]);
            best_iscale[k] = blend(acc[k], iscale[k], best_iscale[k]);
        }
    }
    let mut lbest = [[0i32; NSUB]; 16];
    for i in 0..16 {
        for k in 0..NSUB {
            lbest[i][k] = nearest_int(best_iscale[k] * xt[i][k]).clamp(-32, 31);
        }
    }
    // all-zero sub-blocks: scale 0, every L = 0 (signed level -32)
    for k in 0..NSUB {
        if amax[k] < GROUP_MAX_EPS {
            scale[k] = 0.0;
            for row in lbest.iter_mut() {
                row[k] = -32;
            }
        }
    }

    let mut max_scale = 0.0f32;
    let mut max_abs_scale = 0.0f32;
    for &sc in &scale {
        if sc.abs() > max_abs_scale {
            max_abs_scale = sc.abs();
            max_scale = sc;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        y.fill(0);
        return;
    }
    let iscale = -128.0f32 / max_scale;
    let d_bits = f32_to_f16_bits(1.0 / iscale);
    let d = f16_bits_to_f32(d_bits);
    let mut dj = [0f32; NSUB];
    for k in 0..NSUB {
        let sc = nearest_int(iscale * scale[k]).min(127) as i8;
        y[192 + k] = sc as u8;
        dj[k] = d * sc as f32;
    }
    for i in 0..16 {
        for k in 0..NSUB {
            let q = nearest_int(xt[i][k] / dj[k]).clamp(-32, 31);
            lbest[i][k] = if dj[k] != 0.0 { q } else { lbest[i][k] };
        }
    }
    y[208..210].copy_from_slice(&d_bits.to_le_bytes());
    let mut l = [0u8; QK_K];
    for k in 0..NSUB {
        for i in 0..16 {
            l[16 * k + i] = (lbest[i][k] + 32) as u8;
        }
    }
    pack(&l, y);
}

/// ql/qh packing of the 6-bit levels `L` (§3.4).
#[inline(always)]
fn pack(l: &[u8; QK_K], y: &mut [u8; BLOCK_BYTES]) {
    for h in 0..2 {
        let b = 128 * h;
        for i in 0..32 {
            let q1 = l[b + i];
            let q2 = l[b + i + 32];
            let q3 = l[b + i + 64];
            let q4 = l[b + i + 96];
            y[64 * h + i] = (q1 & 0xF) | ((q3 & 0xF) << 4);
            y[64 * h + i + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4);
            y[128 + 32 * h + i] =
                (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
        }
    }
}

/// The reference algorithm written literally, block by block: the oracle the lane version is
/// tested against (this code itself passed tests/golden_quant.rs before the lane version
/// replaced it).
#[cfg(test)]
fn quantize_block_scalar(x: &[f32; QK_K], y: &mut [u8; BLOCK_BYTES]) {
    let mut l = [0i8; QK_K];
    let mut scales = [0f32; QK_K / 16];
    let mut max_scale = 0.0f32;
    let mut max_abs_scale = 0.0f32;
    for ib in 0..QK_K / 16 {
        let scale = make_qx_quants(32, &x[16 * ib..16 * ib + 16], &mut l[16 * ib..16 * ib + 16]);
        scales[ib] = scale;
        let abs_scale = scale.abs();
        if abs_scale > max_abs_scale {
            max_abs_scale = abs_scale;
            max_scale = scale;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        y.fill(0);
        return;
    }
    let iscale = -128.0f32 / max_scale;
    let d_bits = f32_to_f16_bits(1.0 / iscale);
    y[208..210].copy_from_slice(&d_bits.to_le_bytes());
    let d = f16_bits_to_f32(d_bits);
    let mut sc = [0i8; QK_K / 16];
    for ib in 0..QK_K / 16 {
        sc[ib] = nearest_int(iscale * scales[ib]).min(127) as i8;
    }
    for j in 0..QK_K / 16 {
        let dj = d * sc[j] as f32;
        if dj == 0.0 {
            continue;
        }
        for ii in 0..16 {
            let q = nearest_int(x[16 * j + ii] / dj).clamp(-32, 31);
            l[16 * j + ii] = (q + 32) as i8;
        }
    }
    for (ib, s) in sc.iter().enumerate() {
        y[192 + ib] = *s as u8;
    }
    let l: [u8; QK_K] = std::array::from_fn(|e| l[e] as u8);
    pack(&l, y);
}

pub fn dequantize(x: &[u8], y: &mut [f32]) {
    assert!(
        x.len().is_multiple_of(BLOCK_BYTES),
        "input is not a whole number of blocks"
    );
    assert_eq!(
        y.len(),
        x.len() / BLOCK_BYTES * QK_K,
        "output size does not match the input"
    );
    for (xb, yb) in x.chunks_exact(BLOCK_BYTES).zip(y.chunks_exact_mut(QK_K)) {
        let d = f16_bits_to_f32(u16::from_le_bytes([xb[208], xb[209]]));
        for h in 0..2 {
            let ql = &xb[64 * h..64 * h + 64];
            let qh = &xb[128 + 32 * h..128 + 32 * h + 32];
            let sc = &xb[192 + 8 * h..192 + 8 * h + 8];
            let out = &mut yb[128 * h..128 * h + 128];
            for i in 0..32 {
                let is = i / 16;
                let q1 = ((ql[i] & 0xF) | ((qh[i] & 3) << 4)) as i32 - 32;
                let q2 = ((ql[i + 32] & 0xF) | (((qh[i] >> 2) & 3) << 4)) as i32 - 32;
                let q3 = ((ql[i] >> 4) | (((qh[i] >> 4) & 3) << 4)) as i32 - 32;
                let q4 = ((ql[i + 32] >> 4) | (((qh[i] >> 6) & 3) << 4)) as i32 - 32;
                out[i] = d * sc[is] as i8 as f32 * q1 as f32;
                out[i + 32] = d * sc[is + 2] as i8 as f32 * q2 as f32;
                out[i + 64] = d * sc[is + 4] as i8 as f32 * q3 as f32;
                out[i + 96] = d * sc[is + 6] as i8 as f32 * q4 as f32;
            }
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
        quantize(&[0.0; QK_K], &mut y);
        assert!(y.iter().all(|&b| b == 0));
        let mut back = [1f32; QK_K];
        dequantize(&y, &mut back);
        assert!(back.iter().all(|&v| v == 0.0));
    }

    /// Rows that stress every branch: zeros, tiny values (fp16 `d` underflow), constant runs,
    /// single outliers, one-signed rows, huge values, ties.
    fn stress_rows() -> Vec<Vec<f32>> {
        let mut rng = Rng(0x0DD_BA11);
        let mut rows = vec![
            vec![0.0; QK_K],
            vec![-0.0; QK_K],
            vec![1.0; QK_K],
            vec![-3.5; QK_K],
        ];
        for s in [1e-12f32, 1e-9, 1e-7, 1e-3, 0.02, 1.0, 300.0, 3e4, 6e4] {
            rows.push(rng.vec(QK_K, s));
            rows.push(rng.vec(QK_K, s).iter().map(|v| v.abs()).collect());
            let mut r = rng.vec(QK_K, s);
            r[rng.next_u64() as usize % QK_K] = s * 40.0;
            rows.push(r);
            let mut r = rng.vec(QK_K, s);
            for (i, v) in r.iter_mut().enumerate() {
                if (i / 16) % 2 == 0 {
                    *v = 0.0;
                }
            }
            rows.push(r);
            rows.push(
                (0..QK_K)
                    .map(|_| (rng.next_u64() % 5) as f32 * s - 2.0 * s)
                    .collect(),
            );
            rows.push(
                rng.vec(QK_K, s)
                    .iter()
                    .map(|v| f32::from_bits(v.to_bits() & 0xFFFF_0000))
                    .collect(),
            );
        }
        for _ in 0..300 {
            rows.push(rng.vec(QK_K, 0.05));
        }
        rows
    }

    #[test]
    fn lanes_match_scalar_reference() {
        for (n, x) in stress_rows().iter().enumerate() {
            let mut want = [0u8; BLOCK_BYTES];
            quantize_block_scalar(x.as_slice().try_into().unwrap(), &mut want);
            let mut got = [0u8; BLOCK_BYTES];
            quantize(x, &mut got);
            assert_eq!(got, want, "row {n}");
            let mut generic = [0u8; BLOCK_BYTES];
            quantize_blocks(x, &mut generic);
            assert_eq!(generic, want, "row {n} (generic path)");
        }
    }

    #[test]
    fn make_qx_quants_exact_grid() {
        // values on the grid k·s, k ∈ [-32, 31], with the -32 end attained: exact fit
        let s = 0.125f32;
        let x: Vec<f32> = (0..16).map(|i| (i as f32 * 4.0 - 32.0) * s).collect();
        let mut l = [0i8; 16];
        let scale = make_qx_quants(32, &x, &mut l);
        for (xi, li) in x.iter().zip(&l) {
            assert_eq!(scale * (*li as i32 - 32) as f32, *xi);
        }
    }

    #[test]
    fn round_trip_error_small() {
        let mut rng = Rng(0x5EED_0006);
        for _ in 0..50 {
            let x = rng.vec(QK_K, 1.0);
            let mut q = [0u8; BLOCK_BYTES];
            quantize(&x, &mut q);
            let mut back = [0f32; QK_K];
            dequantize(&q, &mut back);
            for sb in 0..16 {
                let xs = &x[16 * sb..16 * sb + 16];
                let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
                // ~32 levels per side; a generous bound that still catches layout mistakes
                assert!(
                    max_err(xs, &back[16 * sb..16 * sb + 16]) <= amax / 20.0,
                    "sub-block {sb}"
                );
            }
        }
    }

    #[test]
    fn tiny_block_keeps_search_levels() {
        // d rounds to fp16 zero: the 16-element sub-blocks keep make_qx_quants' levels
        let x: Vec<f32> = (0..QK_K).map(|i| 1e-9 * ((i % 8) as f32 - 4.0)).collect();
        let mut q = [0u8; BLOCK_BYTES];
        quantize(&x, &mut q);
        // 1/iscale is a negative number below the fp16 range: d = -0.0
        assert_eq!(&q[208..], &[0x00, 0x80]);
        // scale codes are written even though d is zero
        assert!(q[192..208].iter().all(|&b| b != 0));
        // element 1 is -3e-9: level 8·(-3) + 32 = 8 (low nibble of ql[1])
        assert_eq!(q[1] & 0xF, 8);
    }
}
