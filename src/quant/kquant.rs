//! Shared pieces of the K-quant reference quantizers (gguf-and-k-quants.md §3.1, §2.2):
//! `make_qkx2_quants` (asymmetric scale/min fit used by Q2_K, Q4_K, Q5_K) and the 6-bit
//! "k4" packing of the Q4_K/Q5_K sub-block scales and mins.
//!
//! Everything is f32 in llama.cpp's source order, without fused multiply-adds.
//!
//! Speed: [`make_qkx2_quants`] is the scalar reference. The fast paths run it lane-parallel
//! *across independent sub-blocks* (a lane per sub-block, never splitting a sum the reference
//! orders): [`make_qkx2_quants_lanes`] in portable array code and [`avx2::make_qkx2_quants_x8`]
//! with AVX2 intrinsics (picked at run time by the type modules). Unit tests check both against
//! the scalar reference on random and edge-case blocks, and the reference against llama.cpp's
//! golden bytes.

use super::QK_K;
use super::fp::nearest_int;

/// Asymmetric fit `x ≈ scale·L + min`, `L ∈ [0, nmax]`, as llama.cpp's `make_qkx2_quants`.
///
/// `x`, `w`, `l`, `laux` have the same length `n ≥ 1`. Writes the chosen levels into `l`
/// (`laux` is scratch) and returns `(scale, the_min)` where `the_min = -min` (≥ 0 or −0).
#[allow(clippy::too_many_arguments)]
pub fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    w: &[f32],
    l: &mut [u8],
    laux: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    let n = x.len();
    debug_assert!(n >= 1 && w.len() == n && l.len() == n && laux.len() == n);
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = w[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.fill(0);
        return (0.0, -min);
    }
    let nmaxf = nmax as f32;
    let mut iscale = nmaxf / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        let diff = scale * q as f32 + min - x[i];
        let diff = if use_mad { diff.abs() } else { diff * diff };
        best_error += w[i] * diff;
    }
    if nstep < 1 {
        return (scale, -min);
    }
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmaxf) / (max - min);
        let mut sum_l = 0.0f32;
        let mut sum_l2 = 0.0f32;
        let mut sum_xl = 0.0f32;
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = q as u8;
            let lf = q as f32;
            sum_l += w[i] * lf;
            sum_l2 += w[i] * lf * lf;
            sum_xl += w[i] * lf * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                let diff = if use_mad { diff.abs() } else { diff * diff };
                cur_error += w[i] * diff;
            }
            if cur_error < best_error {
                l.copy_from_slice(laux);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Decode 6-bit scale and min of sub-block `j` (0..8) from the 12 packed bytes
/// (llama.cpp's `get_scale_min_k4`).
#[inline(always)]
pub fn get_scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Pack eight 6-bit scales `ls` and mins `lm` (each ≤ 63) into 12 bytes (inverse of
/// [`get_scale_min_k4`]).
pub fn set_scale_min_k4(ls: &[u8; 8], lm: &[u8; 8], q: &mut [u8]) {
    debug_assert!(q.len() >= 12);
    for j in 0..8 {
        if j < 4 {
            q[j] = ls[j];
            q[j + 4] = lm[j];
        } else {
            q[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4);
            q[j - 4] |= (ls[j] >> 4) << 6;
            q[j] |= (lm[j] >> 4) << 6;
        }
    }
}

/// The Q4_K/Q5_K super-block scale step shared by both types: from the eight sub-block
/// `scales`/`mins` found by `make_qkx2_quants`, compute the 6-bit codes, pack them into
/// `packed[0..12]`, and return the f32 values `max_scale / 63`, `max_min / 63` (to be stored
/// as fp16 `d`, `dmin`).
pub fn pack_k4_scales(scales: &[f32; 8], mins: &[f32; 8], packed: &mut [u8]) -> (f32, f32) {
    let mut max_scale = 0.0f32;
    let mut max_min = 0.0f32;
    for j in 0..8 {
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    for j in 0..8 {
        // int → uint8_t wraps, then MIN(63, ·)
        ls[j] = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        lm[j] = (nearest_int(inv_min * mins[j]) as u8).min(63);
    }
    set_scale_min_k4(&ls, &lm, packed);
    (max_scale / 63.0, max_min / 63.0)
}

/// Lane-parallel `make_qkx2_quants`: lane `k` fits its own independent group, whose `N`
/// values are `x[0][k], x[1][k], …, x[N-1][k]` (weights likewise). Every lane performs exactly
/// the scalar reference's f32 operations in the reference order (sums over `i = 0..N` in
/// order, one candidate after the other, the running `min` replaced on acceptance); branches
/// become per-lane selects. Fills `l[i][k]` and returns per-lane `(scale, the_min)`.
///
/// Instead of copying the candidate levels on every acceptance, the accepted candidate's
/// `iscale` and the `min` it was computed with are kept, and the levels are recomputed from
/// them once at the end (same operations on the same operands, hence the same bits).
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
#[inline(always)]
pub fn make_qkx2_quants_lanes<const N: usize, const K: usize>(
    nmax: i32,
    x: &[[f32; K]; N],
    w: &[[f32; K]; N],
    l: &mut [[u8; K]; N],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> ([f32; K], [f32; K]) {
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = w[0];
    let mut sum_x = [0f32; K];
    for k in 0..K {
        sum_x[k] = sum_w[k] * x[0][k];
    }
    for i in 1..N {
        for k in 0..K {
            let v = x[i][k];
            min[k] = if v < min[k] { v } else { min[k] };
            max[k] = if v > max[k] { v } else { max[k] };
            sum_w[k] += w[i][k];
            sum_x[k] += w[i][k] * v;
        }
    }
    let mut active = [false; K];
    for k in 0..K {
        min[k] = if min[k] > 0.0 { 0.0 } else { min[k] };
        active[k] = max[k] != min[k];
    }
    let nmaxf = nmax as f32;
    let mut iscale = [0f32; K];
    let mut scale = [0f32; K];
    for k in 0..K {
        iscale[k] = nmaxf / (max[k] - min[k]);
        scale[k] = 1.0 / iscale[k];
    }
    let mut best = [0f32; K];
    for i in 0..N {
        for k in 0..K {
            let q = nearest_int(iscale[k] * (x[i][k] - min[k])).clamp(0, nmax) as f32;
            let diff = scale[k] * q + min[k] - x[i][k];
            let diff = if use_mad { diff.abs() } else { diff * diff };
            best[k] += w[i][k] * diff;
        }
    }
    let mut acc_iscale = iscale;
    let mut acc_min = min;
    if nstep >= 1 {
        let mut lf = [[0f32; K]; N];
        for is in 0..=nstep {
            let num = rmin + rdelta * is as f32 + nmaxf;
            for k in 0..K {
                iscale[k] = num / (max[k] - min[k]);
            }
            let mut sum_l = [0f32; K];
            let mut sum_l2 = [0f32; K];
            let mut sum_xl = [0f32; K];
            for i in 0..N {
                for k in 0..K {
                    let q = nearest_int(iscale[k] * (x[i][k] - min[k])).clamp(0, nmax) as f32;
                    lf[i][k] = q;
                    let wl = w[i][k] * q;
                    sum_l[k] += wl;
                    sum_l2[k] += wl * q;
                    sum_xl[k] += wl * x[i][k];
                }
            }
            let mut ok = [false; K];
            let mut this_scale = [0f32; K];
            let mut this_min = [0f32; K];
            for k in 0..K {
                let d = sum_w[k] * sum_l2[k] - sum_l[k] * sum_l[k];
                ok[k] = d > 0.0 && active[k];
                let s = (sum_w[k] * sum_xl[k] - sum_x[k] * sum_l[k]) / d;
                let m = (sum_l2[k] * sum_x[k] - sum_l[k] * sum_xl[k]) / d;
                let pos = m > 0.0;
                this_min[k] = if pos { 0.0 } else { m };
                this_scale[k] = if pos { sum_xl[k] / sum_l2[k] } else { s };
            }
            let mut cur = [0f32; K];
            for i in 0..N {
                for k in 0..K {
                    let diff = this_scale[k] * lf[i][k] + this_min[k] - x[i][k];
                    let diff = if use_mad { diff.abs() } else { diff * diff };
                    cur[k] += w[i][k] * diff;
                }
            }
            for k in 0..K {
                let acc = ok[k] && cur[k] < best[k];
                best[k] = if acc { cur[k] } else { best[k] };
                scale[k] = if acc { this_scale[k] } else { scale[k] };
                acc_iscale[k] = if acc { iscale[k] } else { acc_iscale[k] };
                acc_min[k] = if acc { min[k] } else { acc_min[k] };
                min[k] = if acc { this_min[k] } else { min[k] };
            }
        }
    }
    for i in 0..N {
        for k in 0..K {
            let q = nearest_int(acc_iscale[k] * (x[i][k] - acc_min[k])).clamp(0, nmax) as u8;
            l[i][k] = if active[k] { q } else { 0 };
        }
    }
    let mut the_min = [0f32; K];
    for k in 0..K {
        // inactive lanes never accept a candidate, so their `min` is the initial one
        the_min[k] = -min[k];
        scale[k] = if active[k] { scale[k] } else { 0.0 };
    }
    (scale, the_min)
}

/// Transpose a Q4_K/Q5_K super-block into 8 lanes (lane `j` = sub-block `j` of 32 values) and
/// compute the reference weights `sqrt(mean(x²)) + |x|` of each sub-block (sum in order).
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn prep_32x8(x: &[f32; 256]) -> ([[f32; 8]; 32], [[f32; 8]; 32]) {
    let mut xt = [[0f32; 8]; 32];
    for j in 0..8 {
        for i in 0..32 {
            xt[i][j] = x[32 * j + i];
        }
    }
    let mut sum_x2 = [0f32; 8];
    for i in 0..32 {
        for j in 0..8 {
            sum_x2[j] += xt[i][j] * xt[i][j];
        }
    }
    let mut av = [0f32; 8];
    for j in 0..8 {
        av[j] = (sum_x2[j] / 32.0).sqrt();
    }
    let mut w = [[0f32; 8]; 32];
    for i in 0..32 {
        for j in 0..8 {
            w[i][j] = av[j] + xt[i][j].abs();
        }
    }
    (xt, w)
}

#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn unpack_32x8(lt: &[[u8; 8]; 32], l: &mut [u8; 256]) {
    for j in 0..8 {
        for i in 0..32 {
            l[32 * j + i] = lt[i][j];
        }
    }
}

/// Q4_K/Q5_K sub-block fits of one super-block, lane-parallel (lane `j` = sub-block `j` of 32
/// values): weights `sqrt(mean(x²)) + |x|` per sub-block, then [`make_qkx2_quants_lanes`].
/// Writes the levels into `l` (natural element order) and returns `(scales, mins)`.
#[inline(always)]
pub fn fit_32x8(
    x: &[f32; 256],
    nmax: i32,
    rmin: f32,
    nstep: i32,
    l: &mut [u8; 256],
) -> ([f32; 8], [f32; 8]) {
    let (xt, w) = prep_32x8(x);
    let mut lt = [[0u8; 8]; 32];
    let r = make_qkx2_quants_lanes::<32, 8>(nmax, &xt, &w, &mut lt, rmin, 0.1, nstep, false);
    unpack_32x8(&lt, l);
    r
}

/// [`fit_32x8`] for `V` super-blocks at once with the AVX2 kernel
/// [`avx2::make_qkx2_quants_x8`] (lane `j` of vector `v` = sub-block `j` of block `v`).
///
/// # Safety
///
/// Callable only where the CPU supports AVX2 (outside AVX2-enabled code it is `unsafe`).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx2")]
pub fn fit_32x8_avx2<const V: usize>(
    x: [&[f32; 256]; V],
    nmax: i32,
    rmin: f32,
    nstep: i32,
    l: &mut [[u8; 256]; V],
) -> ([[f32; 8]; V], [[f32; 8]; V]) {
    let mut xt = [[[0f32; 8]; V]; 32];
    let mut w = [[[0f32; 8]; V]; 32];
    for v in 0..V {
        avx2::prep_32x8(x[v], &mut xt, &mut w, v);
    }
    let mut lt = [[[0u8; 8]; V]; 32];
    let r = avx2::make_qkx2_quants_x8::<32, V>(nmax, &xt, &w, &mut lt, rmin, 0.1, nstep, false);
    for v in 0..V {
        for j in 0..8 {
            for i in 0..32 {
                l[v][32 * j + i] = lt[i][v][j];
            }
        }
    }
    r
}

/// AVX2 version of [`make_qkx2_quants_lanes`] for 8 lanes: the same per-lane operation
/// sequence written with intrinsics (`mul`/`add`/`sub`/`div` are IEEE-exact per lane; no FMA,
/// no reciprocal approximations; compares are ordered like C's `<`, `>`, `==`).
#[cfg(target_arch = "x86_64")]
pub mod avx2 {
    use std::arch::x86_64::*;

    #[inline(always)]
    fn load(a: &[f32; 8]) -> __m256 {
        // SAFETY: `a` is 8 readable f32s; unaligned load.
        unsafe { _mm256_loadu_ps(a.as_ptr()) }
    }

    #[inline(always)]
    fn store(a: &mut [f32; 8], v: __m256) {
        // SAFETY: `a` is 8 writable f32s; unaligned store.
        unsafe { _mm256_storeu_ps(a.as_mut_ptr(), v) }
    }

    /// `clamp(nearest_int(iscale * (x - min)), 0, nmax)` per lane (the bit trick of
    /// `nearest_int`: add 1.5·2^23, keep 23 mantissa bits, subtract 2^22).
    #[target_feature(enable = "avx2")]
    #[inline]
    fn level(iscale: __m256, x: __m256, min: __m256, nmax: __m256i) -> __m256i {
        let magic = _mm256_set1_ps(12_582_912.0);
        let t = _mm256_add_ps(_mm256_mul_ps(iscale, _mm256_sub_ps(x, min)), magic);
        let i = _mm256_and_si256(_mm256_castps_si256(t), _mm256_set1_epi32(0x007F_FFFF));
        let i = _mm256_sub_epi32(i, _mm256_set1_epi32(0x0040_0000));
        _mm256_max_epi32(_mm256_min_epi32(i, nmax), _mm256_setzero_si256())
    }

    /// `use_mad ? |d| : d * d`
    #[target_feature(enable = "avx2")]
    #[inline]
    fn err(d: __m256, use_mad: bool) -> __m256 {
        if use_mad {
            _mm256_and_ps(d, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF)))
        } else {
            _mm256_mul_ps(d, d)
        }
    }

    /// Transpose the 8×8 tile `r[j][c]` → `out[c][j]` (data movement only).
    #[target_feature(enable = "avx2")]
    #[inline]
    fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ]
    }

    /// AVX2 version of `prep_32x8` for block `v` of a `V`-block batch: transposes so that
    /// lane `j` = sub-block `j`, sums `x²` in element order per lane, weights
    /// `sqrt(sum / 32) + |x|`.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2")]
    pub(super) fn prep_32x8<const V: usize>(
        x: &[f32; 256],
        xt: &mut [[[f32; 8]; V]; 32],
        w: &mut [[[f32; 8]; V]; 32],
        v: usize,
    ) {
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
        let mut xs = [_mm256_setzero_ps(); 32];
        for t in 0..4 {
            let mut r = [_mm256_setzero_ps(); 8];
            for j in 0..8 {
                let row: &[f32; 8] = x[32 * j + 8 * t..32 * j + 8 * t + 8].try_into().unwrap();
                r[j] = load(row);
            }
            let c = transpose8(r);
            xs[8 * t..8 * t + 8].copy_from_slice(&c);
        }
        let mut sum_x2 = _mm256_setzero_ps();
        for i in 0..32 {
            sum_x2 = _mm256_add_ps(sum_x2, _mm256_mul_ps(xs[i], xs[i]));
            store(&mut xt[i][v], xs[i]);
        }
        let av = _mm256_sqrt_ps(_mm256_div_ps(sum_x2, _mm256_set1_ps(32.0)));
        for i in 0..32 {
            store(
                &mut w[i][v],
                _mm256_add_ps(av, _mm256_and_ps(xs[i], abs_mask)),
            );
        }
    }

    /// Lane-parallel `make_qkx2_quants` over `8·V` groups of `N` values: group `(v, k)` is
    /// `x[0][v][k], …, x[N-1][v][k]` (see [`super::make_qkx2_quants_lanes`], of which this is
    /// an exact transcription). The `V` vectors are independent; processing them together
    /// only interleaves their dependency chains.
    ///
    /// # Safety
    ///
    /// Callable only where the CPU supports AVX2 (outside AVX2-enabled code it is `unsafe`).
    #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
    #[target_feature(enable = "avx2")]
    pub fn make_qkx2_quants_x8<const N: usize, const V: usize>(
        nmax: i32,
        x: &[[[f32; 8]; V]; N],
        w: &[[[f32; 8]; V]; N],
        l: &mut [[[u8; 8]; V]; N],
        rmin: f32,
        rdelta: f32,
        nstep: i32,
        use_mad: bool,
    ) -> ([[f32; 8]; V], [[f32; 8]; V]) {
        let zero = _mm256_setzero_ps();
        let nmax_i = _mm256_set1_epi32(nmax);
        let mut min = [zero; V];
        let mut max = [zero; V];
        let mut sum_w = [zero; V];
        let mut sum_x = [zero; V];
        for v in 0..V {
            let x0 = load(&x[0][v]);
            min[v] = x0;
            max[v] = x0;
            sum_w[v] = load(&w[0][v]);
            sum_x[v] = _mm256_mul_ps(sum_w[v], x0);
        }
        for i in 1..N {
            for v in 0..V {
                let xi = load(&x[i][v]);
                let wi = load(&w[i][v]);
                min[v] = _mm256_blendv_ps(min[v], xi, _mm256_cmp_ps::<_CMP_LT_OQ>(xi, min[v]));
                max[v] = _mm256_blendv_ps(max[v], xi, _mm256_cmp_ps::<_CMP_GT_OQ>(xi, max[v]));
                sum_w[v] = _mm256_add_ps(sum_w[v], wi);
                sum_x[v] = _mm256_add_ps(sum_x[v], _mm256_mul_ps(wi, xi));
            }
        }
        let mut active = [zero; V];
        let nmaxf = nmax as f32;
        let mut iscale = [zero; V];
        let mut scale = [zero; V];
        for v in 0..V {
            min[v] = _mm256_blendv_ps(min[v], zero, _mm256_cmp_ps::<_CMP_GT_OQ>(min[v], zero));
            // active = !(max == min)
            active[v] = _mm256_cmp_ps::<_CMP_NEQ_UQ>(max[v], min[v]);
            iscale[v] = _mm256_div_ps(_mm256_set1_ps(nmaxf), _mm256_sub_ps(max[v], min[v]));
            scale[v] = _mm256_div_ps(_mm256_set1_ps(1.0), iscale[v]);
        }
        let mut best = [zero; V];
        for i in 0..N {
            for v in 0..V {
                let xi = load(&x[i][v]);
                let q = _mm256_cvtepi32_ps(level(iscale[v], xi, min[v], nmax_i));
                let d = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(scale[v], q), min[v]), xi);
                best[v] = _mm256_add_ps(best[v], _mm256_mul_ps(load(&w[i][v]), err(d, use_mad)));
            }
        }
        let mut acc_iscale = iscale;
        let mut acc_min = min;
        if nstep >= 1 {
            let mut lf = [[[0f32; 8]; V]; N];
            for is in 0..=nstep {
                let num = _mm256_set1_ps(rmin + rdelta * is as f32 + nmaxf);
                let mut sum_l = [zero; V];
                let mut sum_l2 = [zero; V];
                let mut sum_xl = [zero; V];
                for v in 0..V {
                    iscale[v] = _mm256_div_ps(num, _mm256_sub_ps(max[v], min[v]));
                }
                for i in 0..N {
                    for v in 0..V {
                        let xi = load(&x[i][v]);
                        let q = _mm256_cvtepi32_ps(level(iscale[v], xi, min[v], nmax_i));
                        store(&mut lf[i][v], q);
                        let wl = _mm256_mul_ps(load(&w[i][v]), q);
                        sum_l[v] = _mm256_add_ps(sum_l[v], wl);
                        sum_l2[v] = _mm256_add_ps(sum_l2[v], _mm256_mul_ps(wl, q));
                        sum_xl[v] = _mm256_add_ps(sum_xl[v], _mm256_mul_ps(wl, xi));
                    }
                }
                let mut ok = [zero; V];
                let mut any = 0;
                let mut this_min = [zero; V];
                let mut this_scale = [zero; V];
                for v in 0..V {
                    let d = _mm256_sub_ps(
                        _mm256_mul_ps(sum_w[v], sum_l2[v]),
                        _mm256_mul_ps(sum_l[v], sum_l[v]),
                    );
                    ok[v] = _mm256_and_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(d, zero), active[v]);
                    any |= _mm256_movemask_ps(ok[v]);
                    let s = _mm256_div_ps(
                        _mm256_sub_ps(
                            _mm256_mul_ps(sum_w[v], sum_xl[v]),
                            _mm256_mul_ps(sum_x[v], sum_l[v]),
                        ),
                        d,
                    );
                    let m = _mm256_div_ps(
                        _mm256_sub_ps(
                            _mm256_mul_ps(sum_l2[v], sum_x[v]),
                            _mm256_mul_ps(sum_l[v], sum_xl[v]),
                        ),
                        d,
                    );
                    let pos = _mm256_cmp_ps::<_CMP_GT_OQ>(m, zero);
                    this_min[v] = _mm256_blendv_ps(m, zero, pos);
                    this_scale[v] = _mm256_blendv_ps(s, _mm256_div_ps(sum_xl[v], sum_l2[v]), pos);
                }
                if any == 0 {
                    continue;
                }
                let mut cur = [zero; V];
                for i in 0..N {
                    for v in 0..V {
                        let q = load(&lf[i][v]);
                        let xi = load(&x[i][v]);
                        let dd = _mm256_sub_ps(
                            _mm256_add_ps(_mm256_mul_ps(this_scale[v], q), this_min[v]),
                            xi,
                        );
                        cur[v] =
                            _mm256_add_ps(cur[v], _mm256_mul_ps(load(&w[i][v]), err(dd, use_mad)));
                    }
                }
                for v in 0..V {
                    let acc = _mm256_and_ps(ok[v], _mm256_cmp_ps::<_CMP_LT_OQ>(cur[v], best[v]));
                    best[v] = _mm256_blendv_ps(best[v], cur[v], acc);
                    scale[v] = _mm256_blendv_ps(scale[v], this_scale[v], acc);
                    acc_iscale[v] = _mm256_blendv_ps(acc_iscale[v], iscale[v], acc);
                    acc_min[v] = _mm256_blendv_ps(acc_min[v], min[v], acc);
                    min[v] = _mm256_blendv_ps(min[v], this_min[v], acc);
                }
            }
        }
        let mut out_scale = [[0f32; 8]; V];
        let mut out_min = [[0f32; 8]; V];
        for v in 0..V {
            let active_i = _mm256_castps_si256(active[v]);
            for i in 0..N {
                let q = level(acc_iscale[v], load(&x[i][v]), acc_min[v], nmax_i);
                let q = _mm256_and_si256(q, active_i);
                let mut t = [0i32; 8];
                // SAFETY: `t` is 8 writable i32s; unaligned store.
                unsafe { _mm256_storeu_si256(t.as_mut_ptr().cast(), q) };
                for k in 0..8 {
                    l[i][v][k] = t[k] as u8;
                }
            }
            store(&mut out_scale[v], _mm256_and_ps(scale[v], active[v]));
            // C's `-min`: flip the sign bit (so +0 becomes -0, unlike 0 - min); inactive lanes
            // never accept a candidate, so their `min` is the initial one
            store(&mut out_min[v], _mm256_xor_ps(min[v], _mm256_set1_ps(-0.0)));
        }
        (out_scale, out_min)
    }
}

/// A K-quant whose 8 sub-blocks of 32 are fit by [`make_qkx2_quants`] with `av_x + |x|`
/// weights (Q4_K, Q5_K): its fit parameters and what it does after the fit.
pub(crate) trait SubBlockFit {
    /// Bytes per 256-value block.
    const BYTES: usize;
    const NMAX: i32;
    const RMIN: f32;
    const NSTEP: i32;
    /// Scale codes, fp16 `d`/`dmin`, requantisation with the rounded scales, packing.
    fn finish(
        x: &[f32; QK_K],
        scales: &[f32; 8],
        mins: &[f32; 8],
        l: &mut [u8; QK_K],
        y: &mut [u8],
    );
}

/// Quantize whole blocks, lane-parallel over sub-blocks (AVX2 when the CPU has it); byte for
/// byte equal to [`quantize_fit_ref`].
pub(crate) fn quantize_fit<T: SubBlockFit>(x: &[f32], y: &mut [u8]) {
    assert_eq!(x.len() % QK_K, 0);
    assert_eq!(y.len(), x.len() / QK_K * T::BYTES);
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            unsafe { quantize_fit_avx2::<T>(x, y) };
            return;
        }
    }
    quantize_fit_portable::<T>(x, y);
}

/// Super-blocks per AVX2 kernel call: `8·GROUP` lanes in `GROUP` interleaved vectors, which
/// hides the latency of the reference's strictly sequential sums.
#[cfg(target_arch = "x86_64")]
const GROUP: usize = 2;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn quantize_fit_avx2<T: SubBlockFit>(x: &[f32], y: &mut [u8]) {
    let mut xs = x.chunks_exact(GROUP * QK_K);
    let mut ys = y.chunks_exact_mut(GROUP * T::BYTES);
    for (xg, yg) in (&mut xs).zip(&mut ys) {
        quantize_group_avx2::<T, GROUP>(xg, yg);
    }
    let (xr, yr) = (xs.remainder(), ys.into_remainder());
    for (xb, yb) in xr.chunks_exact(QK_K).zip(yr.chunks_exact_mut(T::BYTES)) {
        quantize_group_avx2::<T, 1>(xb, yb);
    }
}

/// `V` consecutive super-blocks `x` (`V·256` values) into `y` (`V·T::BYTES` bytes).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn quantize_group_avx2<T: SubBlockFit, const V: usize>(x: &[f32], y: &mut [u8]) {
    let xb: [&[f32; QK_K]; V] =
        std::array::from_fn(|v| x[v * QK_K..(v + 1) * QK_K].try_into().unwrap());
    let mut l = [[0u8; QK_K]; V];
    let (scales, mins) = fit_32x8_avx2::<V>(xb, T::NMAX, T::RMIN, T::NSTEP, &mut l);
    for (v, yb) in y.chunks_exact_mut(T::BYTES).enumerate() {
        T::finish(xb[v], &scales[v], &mins[v], &mut l[v], yb);
    }
}

/// The portable (non-AVX2) lane version.
pub(crate) fn quantize_fit_portable<T: SubBlockFit>(x: &[f32], y: &mut [u8]) {
    for (xb, yb) in x.chunks_exact(QK_K).zip(y.chunks_exact_mut(T::BYTES)) {
        let xb: &[f32; QK_K] = xb.try_into().unwrap();
        let mut l = [0u8; QK_K];
        let (scales, mins) = fit_32x8(xb, T::NMAX, T::RMIN, T::NSTEP, &mut l);
        T::finish(xb, &scales, &mins, &mut l, yb);
    }
}

/// The scalar reference: a direct transcription of `quantize_row_q4_K_ref` /
/// `quantize_row_q5_K_ref` (one sub-block after the other).
pub(crate) fn quantize_fit_ref<T: SubBlockFit>(x: &[f32], y: &mut [u8]) {
    assert_eq!(x.len() % QK_K, 0);
    assert_eq!(y.len(), x.len() / QK_K * T::BYTES);
    for (xb, yb) in x.chunks_exact(QK_K).zip(y.chunks_exact_mut(T::BYTES)) {
        let xb: &[f32; QK_K] = xb.try_into().unwrap();
        let mut l = [0u8; QK_K];
        let mut laux = [0u8; 32];
        let mut w = [0f32; 32];
        let mut scales = [0f32; 8];
        let mut mins = [0f32; 8];
        for j in 0..8 {
            let xs = &xb[32 * j..32 * j + 32];
            let mut sum_x2 = 0.0f32;
            for &v in xs {
                sum_x2 += v * v;
            }
            let av_x = (sum_x2 / 32.0).sqrt();
            for (wi, &v) in w.iter_mut().zip(xs) {
                *wi = av_x + v.abs();
            }
            let (s, m) = make_qkx2_quants(
                T::NMAX,
                xs,
                &w,
                &mut l[32 * j..32 * j + 32],
                &mut laux,
                T::RMIN,
                0.1,
                T::NSTEP,
                false,
            );
            scales[j] = s;
            mins[j] = m;
        }
        T::finish(xb, &scales, &mins, &mut l, yb);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{GgmlType, q2_k, q4_k, q5_k};

    /// Deterministic xorshift generator (no extra dependency).
    struct Rng(u64);
    impl Rng {
        fn next_u32(&mut self) -> u32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 32) as u32
        }
        fn uniform(&mut self) -> f32 {
            (self.next_u32() >> 8) as f32 / (1u32 << 24) as f32
        }
        fn gauss(&mut self) -> f32 {
            let u1 = self.uniform().max(1e-7);
            let u2 = self.uniform();
            (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
        }
    }

    /// Blocks of many shapes, including the edge cases of the reference: all zeros, constants,
    /// tiny (fp16-underflowing) values, outliers, one-signed rows, huge values, sparse rows.
    fn test_blocks(nblocks: usize, seed: u64) -> Vec<f32> {
        let mut r = Rng(seed);
        let mut x = Vec::with_capacity(nblocks * 256);
        for b in 0..nblocks {
            let kind = b % 12;
            let scale = [1.0f32, 0.02, 1e-7, 3e4, 1e-3][b % 5];
            for i in 0..256 {
                let g = r.gauss();
                let v = match kind {
                    0 => 0.0,
                    1 => 0.37,
                    2 => -1.25,
                    3 => g * 1e-7,
                    4 => {
                        if i == 77 {
                            300.0
                        } else {
                            g * 0.01
                        }
                    }
                    5 => g.abs() * scale,
                    6 => -g.abs() * scale,
                    7 => {
                        if r.uniform() < 0.9 {
                            0.0
                        } else {
                            g
                        }
                    }
                    8 => (r.uniform() - 0.5) * scale,
                    9 => {
                        // bf16-representable values with constant runs
                        let v = if (i / 16) % 2 == 0 { g } else { 0.5 };
                        f32::from_bits(v.to_bits() & 0xFFFF_0000)
                    }
                    10 => g * g * g * scale,
                    _ => g * scale,
                };
                x.push(v);
            }
        }
        x
    }

    fn fast_equals_ref(
        fast: fn(&[f32], &mut [u8]),
        reference: fn(&[f32], &mut [u8]),
        bytes: usize,
        name: &str,
    ) {
        for seed in 1..=4u64 {
            let x = test_blocks(601, seed * 0x9E37_79B9_7F4A_7C15); // odd: pairs + a single
            let mut a = vec![0u8; x.len() / 256 * bytes];
            let mut b = a.clone();
            fast(&x, &mut a);
            reference(&x, &mut b);
            for (i, (p, q)) in a.chunks(bytes).zip(b.chunks(bytes)).enumerate() {
                assert_eq!(p, q, "{name}: block {i} (seed {seed}) differs");
            }
        }
    }

    #[test]
    fn q4_k_fast_equals_ref() {
        fast_equals_ref(q4_k::quantize, q4_k::quantize_ref, 144, "Q4_K");
    }

    #[test]
    fn q5_k_fast_equals_ref() {
        fast_equals_ref(q5_k::quantize, q5_k::quantize_ref, 176, "Q5_K");
    }

    #[test]
    fn q2_k_fast_equals_ref() {
        fast_equals_ref(q2_k::quantize, q2_k::quantize_ref, 84, "Q2_K");
    }

    #[test]
    fn portable_paths_equal_ref() {
        fast_equals_ref(
            q4_k::quantize_portable,
            q4_k::quantize_ref,
            144,
            "Q4_K portable",
        );
        fast_equals_ref(
            q5_k::quantize_portable,
            q5_k::quantize_ref,
            176,
            "Q5_K portable",
        );
        fast_equals_ref(
            q2_k::quantize_portable,
            q2_k::quantize_ref,
            84,
            "Q2_K portable",
        );
    }

    #[test]
    fn lanes_portable_equals_scalar_make_qkx2() {
        // The lane kernel compiled without AVX2 (whatever the test binary's baseline is).
        let x = test_blocks(64, 99);
        for blk in x.chunks_exact(256) {
            let blk: &[f32; 256] = blk.try_into().unwrap();
            let mut l_fast = [0u8; 256];
            let (s_fast, m_fast) = fit_32x8(blk, 15, -1.0, 20, &mut l_fast);
            for j in 0..8 {
                let xs = &blk[32 * j..32 * j + 32];
                let mut s2 = 0.0f32;
                for &v in xs {
                    s2 += v * v;
                }
                let av = (s2 / 32.0).sqrt();
                let w: Vec<f32> = xs.iter().map(|v| av + v.abs()).collect();
                let mut l = [0u8; 32];
                let mut la = [0u8; 32];
                let (s, m) = make_qkx2_quants(15, xs, &w, &mut l, &mut la, -1.0, 0.1, 20, false);
                assert_eq!(s.to_bits(), s_fast[j].to_bits());
                assert_eq!(m.to_bits(), m_fast[j].to_bits());
                assert_eq!(&l[..], &l_fast[32 * j..32 * j + 32]);
            }
        }
    }

    /// The scalar reference paths (not only the fast ones) against llama.cpp's golden bytes.
    #[test]
    fn ref_paths_match_golden() {
        type Quantizer = fn(&[f32], &mut [u8]);
        let cases: [(&str, Quantizer, usize); 3] = [
            ("q2_k", q2_k::quantize_ref, 84),
            ("q4_k", q4_k::quantize_ref, 144),
            ("q5_k", q5_k::quantize_ref, 176),
        ];
        for case in ["gauss", "heavy", "uniform", "wide", "edge"] {
            let path = format!(
                "{}/fixtures/golden/quant/{case}.safetensors",
                env!("CARGO_MANIFEST_DIR")
            );
            let bytes = std::fs::read(&path).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let input = st.tensor("input").unwrap();
            let x: Vec<f32> = input
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            for (key, f, bs) in cases {
                let want = st.tensor(key).unwrap();
                let mut got = vec![0u8; x.len() / 256 * bs];
                f(&x, &mut got);
                assert!(
                    got == want.data(),
                    "{case} {key}: ref path differs from llama.cpp"
                );
            }
        }
    }

    /// llama.cpp's own round-trip criterion (tests/test-quantize-fns.cpp): data
    /// `0.1 + 2 cos(i + offset)`, error `sqrt(Σ diff²) / n` in f64.
    #[test]
    fn roundtrip_error_bounds() {
        let n = 4096;
        let x: Vec<f32> = (0..n)
            .map(|i| 0.1 + 2.0 * ((i as f32) + 0.0).cos())
            .collect();
        for (ty, bound) in [
            (GgmlType::Q2_K, 0.0075),
            (GgmlType::Q3_K, 0.0040),
            (GgmlType::Q4_K, 0.002),
            (GgmlType::Q5_K, 0.002),
        ] {
            let mut q = vec![0u8; n / 256 * ty.type_size()];
            crate::quant::quantize(ty, &x, &mut q);
            let mut y = vec![0f32; n];
            crate::quant::dequantize(ty, &q, &mut y);
            let err: f64 = x
                .iter()
                .zip(&y)
                .map(|(a, b)| {
                    let d = *a as f64 - *b as f64;
                    d * d
                })
                .sum::<f64>()
                .sqrt()
                / n as f64;
            assert!(err < bound, "{ty}: round-trip error {err} >= {bound}");
        }
    }

    #[test]
    fn zero_blocks_quantize_to_zero_bytes_and_back() {
        let x = vec![0f32; 512];
        for ty in [
            GgmlType::Q2_K,
            GgmlType::Q3_K,
            GgmlType::Q4_K,
            GgmlType::Q5_K,
        ] {
            let mut q = vec![0xAAu8; 2 * ty.type_size()];
            crate::quant::quantize(ty, &x, &mut q);
            // (Q3_K: an all-zero group keeps level 0 unshifted, so its bytes are zero too)
            assert!(q.iter().all(|&v| v == 0), "{ty}: {q:?}");
            let mut y = vec![1f32; 512];
            crate::quant::dequantize(ty, &q, &mut y);
            assert!(y.iter().all(|&v| v == 0.0), "{ty}");
        }
    }

    #[test]
    fn q3_q2_fp16_d_matches_dequant_scale() {
        // Dequantising a block with a single large value gives it back to fp16-level precision.
        let mut x = vec![0f32; 256];
        x[5] = 1.0;
        for ty in [
            GgmlType::Q2_K,
            GgmlType::Q3_K,
            GgmlType::Q4_K,
            GgmlType::Q5_K,
        ] {
            let mut q = vec![0u8; ty.type_size()];
            crate::quant::quantize(ty, &x, &mut q);
            let mut y = vec![0f32; 256];
            crate::quant::dequantize(ty, &q, &mut y);
            assert!((y[5] - 1.0).abs() < 0.01, "{ty}: {}", y[5]);
            assert!(
                y.iter().enumerate().all(|(i, v)| i == 5 || v.abs() < 0.01),
                "{ty}"
            );
        }
    }

    #[test]
    fn k4_pack_roundtrip() {
        let mut seed = 7u32;
        for _ in 0..1000 {
            let mut ls = [0u8; 8];
            let mut lm = [0u8; 8];
            for j in 0..8 {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                ls[j] = ((seed >> 8) & 63) as u8;
                lm[j] = ((seed >> 20) & 63) as u8;
            }
            let mut q = [0u8; 12];
            set_scale_min_k4(&ls, &lm, &mut q);
            for j in 0..8 {
                assert_eq!(get_scale_min_k4(j, &q), (ls[j], lm[j]));
            }
        }
    }

    #[test]
    fn k4_layout_matches_spec() {
        // j = 5: sc = 0b110101 (53), m = 0b101010 (42)
        let mut ls = [0u8; 8];
        let mut lm = [0u8; 8];
        ls[5] = 53;
        lm[5] = 42;
        let mut q = [0u8; 12];
        set_scale_min_k4(&ls, &lm, &mut q);
        assert_eq!(q[9], (53 & 15) | ((42 & 15) << 4));
        assert_eq!(q[1] >> 6, 53 >> 4);
        assert_eq!(q[5] >> 6, 42 >> 4);
    }

    #[test]
    fn qkx2_constant_block() {
        let x = [0.25f32; 32];
        let w = [1.0f32; 32];
        let mut l = [9u8; 32];
        let mut la = [0u8; 32];
        let (s, m) = make_qkx2_quants(15, &x, &w, &mut l, &mut la, -1.0, 0.1, 20, false);
        // min clamps to 0 so max != min; a constant positive block is fit exactly by scale·15
        assert!(s > 0.0);
        assert_eq!(m, 0.0);
        assert!(l.iter().all(|&v| v == 15));
        let z = [0.0f32; 32];
        let (s, m) = make_qkx2_quants(15, &z, &w, &mut l, &mut la, -1.0, 0.1, 20, false);
        assert_eq!((s, m.to_bits()), (0.0, 0x8000_0000));
        assert!(l.iter().all(|&v| v == 0));
    }
}
