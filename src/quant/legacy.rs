//! Pieces shared by the 32-element legacy block quantizers (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0).

/// Elements per legacy block.
pub const QK: usize = 32;

/// C's `(int8_t)f` / `(uint8_t)f` as llama.cpp's x86-64 build executes it: `cvttss2si` into a
/// 32-bit register (truncation toward zero; NaN and out-of-range give `i32::MIN`), of which the
/// caller keeps the low byte. In range this is Rust's `f as i32`; outside it (only reachable
/// through an infinite `1/d` for subnormal `d`) Rust would saturate instead.
#[inline(always)]
pub fn cvtt_i32(f: f32) -> i32 {
    if (-2_147_483_648.0..2_147_483_648.0).contains(&f) {
        f as i32
    } else {
        i32::MIN
    }
}

/// [`cvtt_i32`] of 32 values, vectorized: on x86-64 it is the instruction itself
/// (`cvttps2dq`, SSE2, always present), four lanes at a time.
#[inline(always)]
pub fn cvtt_block(v: &[f32; QK]) -> [i32; QK] {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_cvttps_epi32, _mm_loadu_ps, _mm_storeu_si128};
        let mut out = [0i32; QK];
        for c in 0..QK / 4 {
            // SAFETY: SSE2 is part of x86-64; both pointers address 4 in-bounds elements
            // (c < QK/4), and the loads/stores are unaligned ones.
            unsafe {
                let a = _mm_loadu_ps(v.as_ptr().add(4 * c));
                _mm_storeu_si128(
                    out.as_mut_ptr().add(4 * c) as *mut __m128i,
                    _mm_cvttps_epi32(a),
                );
            }
        }
        out
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        std::array::from_fn(|i| cvtt_i32(v[i]))
    }
}

/// Q5_0/Q5_1 `qh`: bit 4 of code `j` at bit `j`. On x86-64: shift each byte's bit 4 up to
/// bit 7 and collect those with `pmovmskb` (SSE2).
#[inline(always)]
pub fn high_bits(q: &[u8; QK]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_movemask_epi8, _mm_slli_epi16};
        // SAFETY: SSE2 is part of x86-64; the two unaligned loads read q[0..16] and q[16..32].
        unsafe {
            let lo = _mm_loadu_si128(q.as_ptr() as *const __m128i);
            let hi = _mm_loadu_si128(q.as_ptr().add(16) as *const __m128i);
            // a 16-bit shift by 3 moves bit 4 of each byte to bit 7 of the same byte
            let lo = _mm_movemask_epi8(_mm_slli_epi16(lo, 3)) as u32;
            let hi = _mm_movemask_epi8(_mm_slli_epi16(hi, 3)) as u32;
            lo | (hi << 16)
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        high_bits_scalar(q)
    }
}

#[cfg_attr(target_arch = "x86_64", allow(dead_code))]
#[inline(always)]
fn high_bits_scalar(q: &[u8; QK]) -> u32 {
    let mut qh = 0u32;
    for (j, &v) in q.iter().enumerate() {
        qh |= (((v & 0x10) >> 4) as u32) << j;
    }
    qh
}

/// `id = d ? 1/d : 0` (NaN counts as true, as in C).
#[inline(always)]
pub fn inv_or_zero(d: f32) -> f32 {
    if d != 0.0 { 1.0 / d } else { 0.0 }
}

/// Signed value of the first element with the largest magnitude (`amax < |v|` updates from 0):
/// the `max` of Q4_0/Q5_0. Computed as "largest |v|, then its first occurrence", which is the
/// same value (NaN never wins either way; all zeros give +0.0 as the reference's initial value)
/// but vectorizes.
#[inline(always)]
pub fn first_absmax(x: &[f32; QK]) -> f32 {
    let mut m = [0f32; 8];
    for c in x.chunks_exact(8) {
        for k in 0..8 {
            m[k] = m[k].max(c[k].abs());
        }
    }
    let amax = m.iter().fold(0f32, |a, &b| a.max(b));
    if amax == 0.0 {
        return 0.0;
    }
    *x.iter().find(|v| v.abs() == amax).unwrap()
}

/// `(min, max)` by strict compares from `(FLT_MAX, -FLT_MAX)` (Q4_1/Q5_1), vectorized: the
/// minimum and maximum of a set do not depend on the order, except for the sign of a zero
/// result, which the sequential scan takes from the first zero: fixed up here.
#[inline(always)]
pub fn min_max(x: &[f32; QK]) -> (f32, f32) {
    let mut mn = [f32::MAX; 8];
    let mut mx = [-f32::MAX; 8];
    for c in x.chunks_exact(8) {
        for k in 0..8 {
            mn[k] = if c[k] < mn[k] { c[k] } else { mn[k] };
            mx[k] = if c[k] > mx[k] { c[k] } else { mx[k] };
        }
    }
    let mut min = mn.iter().fold(f32::MAX, |a, &b| if b < a { b } else { a });
    let mut max = mx.iter().fold(-f32::MAX, |a, &b| if b > a { b } else { a });
    if min == 0.0 || max == 0.0 {
        let first_zero = *x.iter().find(|v| **v == 0.0).unwrap();
        if min == 0.0 {
            min = first_zero;
        }
        if max == 0.0 {
            max = first_zero;
        }
    }
    (min, max)
}

/// The scalar scans the two functions above replace (test oracles).
#[cfg(test)]
pub fn first_absmax_scalar(x: &[f32; QK]) -> f32 {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

#[cfg(test)]
pub fn min_max_scalar(x: &[f32; QK]) -> (f32, f32) {
    let mut min = f32::MAX;
    let mut max = -f32::MAX;
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

/// `pub fn quantize(x, y)` for a legacy type: every block through `$block` (an
/// `#[inline(always)]` `fn(&[f32; 32], &mut [u8; BLOCK_BYTES])`), compiled a second time with
/// AVX2 enabled and chosen at run time when the CPU has it. Only `avx2`, never `fma`, so no
/// multiply-add can be fused: each f32 operation is the same, only wider.
macro_rules! quantize_fn {
    ($block:ident) => {
        pub fn quantize(x: &[f32], y: &mut [u8]) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                fn quantize_avx2(x: &[f32], y: &mut [u8]) {
                    for (xb, yb) in $crate::quant::legacy::blocks::<BLOCK_BYTES>(x, y) {
                        $block(xb, yb);
                    }
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU supports AVX2 (checked just above).
                    unsafe { quantize_avx2(x, y) };
                    return;
                }
            }
            for (xb, yb) in $crate::quant::legacy::blocks::<BLOCK_BYTES>(x, y) {
                $block(xb, yb);
            }
        }
    };
}
pub(crate) use quantize_fn;

/// Split `x`/`y` into blocks of 32 floats / `bytes` bytes, checking the sizes.
#[inline]
pub fn blocks<'a, const B: usize>(
    x: &'a [f32],
    y: &'a mut [u8],
) -> impl Iterator<Item = (&'a [f32; QK], &'a mut [u8; B])> {
    assert!(
        x.len().is_multiple_of(QK),
        "input is not a whole number of blocks"
    );
    assert_eq!(
        y.len(),
        x.len() / QK * B,
        "output size does not match the input"
    );
    x.chunks_exact(QK)
        .zip(y.chunks_exact_mut(B))
        .map(|(a, b)| (a.try_into().unwrap(), b.try_into().unwrap()))
}

/// Split quantized `x`/`y` into blocks of `bytes` bytes / 32 floats, checking the sizes.
#[inline]
pub fn blocks_deq<'a, const B: usize>(
    x: &'a [u8],
    y: &'a mut [f32],
) -> impl Iterator<Item = (&'a [u8; B], &'a mut [f32; QK])> {
    assert!(
        x.len().is_multiple_of(B),
        "input is not a whole number of blocks"
    );
    assert_eq!(
        y.len(),
        x.len() / B * QK,
        "output size does not match the input"
    );
    x.chunks_exact(B)
        .zip(y.chunks_exact_mut(QK))
        .map(|(a, b)| (a.try_into().unwrap(), b.try_into().unwrap()))
}

#[cfg(test)]
pub(crate) mod testutil {
    /// Small deterministic generator (xorshift64*), so tests need no extra crate.
    pub struct Rng(pub u64);
    impl Rng {
        pub fn next_u64(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        /// Uniform in [-1, 1).
        pub fn uniform(&mut self) -> f32 {
            (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }
        /// Roughly Gaussian (sum of 4 uniforms), scaled.
        pub fn gauss(&mut self, s: f32) -> f32 {
            (self.uniform() + self.uniform() + self.uniform() + self.uniform()) * s
        }
        pub fn vec(&mut self, n: usize, s: f32) -> Vec<f32> {
            (0..n).map(|_| self.gauss(s)).collect()
        }
    }

    /// Largest |a - b|.
    pub fn max_err(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0, f32::max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cvtt_matches_x86_truncation() {
        assert_eq!(cvtt_i32(8.99), 8);
        assert_eq!(cvtt_i32(-0.7), 0);
        assert_eq!(cvtt_i32(-1.5), -1);
        assert_eq!(cvtt_i32(f32::INFINITY), i32::MIN);
        assert_eq!(cvtt_i32(f32::NEG_INFINITY), i32::MIN);
        assert_eq!(cvtt_i32(f32::NAN), i32::MIN);
        assert_eq!(cvtt_i32(2_147_483_648.0), i32::MIN);
        assert_eq!(cvtt_i32(-2_147_483_648.0), i32::MIN);
    }

    #[test]
    fn vector_scans_match_scalar() {
        let mut rng = testutil::Rng(77);
        let specials = [
            0.0f32,
            -0.0,
            1.0,
            -1.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            -f32::MAX,
        ];
        for n in 0..20_000 {
            let mut x = [0f32; QK];
            for v in x.iter_mut() {
                let r = rng.next_u64();
                *v = match (r % 8, n % 3) {
                    (0, _) => specials[(r >> 8) as usize % specials.len()],
                    (1 | 2, 0) => ((r >> 8) % 3) as f32 - 1.0, // ties and zeros
                    _ => rng.gauss(1.0),
                };
            }
            let a = first_absmax(&x);
            let b = first_absmax_scalar(&x);
            assert_eq!(a.to_bits(), b.to_bits(), "{x:?}");
            let (a0, a1) = min_max(&x);
            let (b0, b1) = min_max_scalar(&x);
            assert_eq!(
                (a0.to_bits(), a1.to_bits()),
                (b0.to_bits(), b1.to_bits()),
                "{x:?}"
            );
        }
    }

    #[test]
    fn cvtt_block_matches_scalar() {
        let mut rng = testutil::Rng(5);
        let specials = [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            2_147_483_648.0,
            -2_147_483_648.0,
            -2_147_483_904.0,
            2_147_483_520.0,
            -0.99,
            0.99,
        ];
        for _ in 0..2000 {
            let v: [f32; QK] = std::array::from_fn(|_| {
                let r = rng.next_u64();
                if r.is_multiple_of(4) {
                    specials[(r >> 8) as usize % specials.len()]
                } else {
                    f32::from_bits((r >> 16) as u32)
                }
            });
            let got = cvtt_block(&v);
            for (g, x) in got.iter().zip(&v) {
                assert_eq!(*g, cvtt_i32(*x), "{x:e}");
            }
        }
    }

    #[test]
    fn high_bits_matches_scalar() {
        let mut rng = testutil::Rng(11);
        for _ in 0..2000 {
            let q: [u8; QK] = std::array::from_fn(|_| rng.next_u64() as u8);
            assert_eq!(high_bits(&q), high_bits_scalar(&q));
        }
    }

    #[test]
    fn first_absmax_keeps_first_and_sign() {
        let mut x = [0.0f32; QK];
        x[3] = -2.0;
        x[7] = 2.0;
        assert_eq!(first_absmax(&x), -2.0);
        assert_eq!(first_absmax(&[0.0; QK]), 0.0);
    }
}

/// The fp16 conversions of fp.rs against an independent definition of IEEE binary16
/// round-to-nearest-even (what ggml's `GGML_FP32_TO_FP16` computes for non-NaN inputs).
#[cfg(test)]
mod fp16_conformance {
    use crate::quant::fp::{f16_bits_to_f32, f32_to_f16_bits};

    /// Value of a binary16 bit pattern from the definition, in f64.
    fn h_value(h: u16) -> f64 {
        let s = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
        let e = ((h >> 10) & 0x1F) as i32;
        let m = (h & 0x3FF) as f64;
        match e {
            0 => s * m * 2f64.powi(-24),
            31 if m == 0.0 => s * f64::INFINITY,
            31 => f64::NAN,
            _ => s * (1024.0 + m) * 2f64.powi(e - 25),
        }
    }

    /// RNE from the definition, in f64 (exact here): scale |x| to units of the binary16 ulp
    /// at its exponent (never below the subnormal ulp 2^-24), round half to even, rebuild.
    fn rne(x: f32) -> u16 {
        let sign = if x.is_sign_negative() { 0x8000u16 } else { 0 };
        let a = (x as f64).abs();
        if a.is_infinite() {
            return sign | 0x7C00;
        }
        if a == 0.0 {
            return sign;
        }
        let e = (a.log2().floor() as i32).max(-14);
        // log2 may be off by one next to powers of two: fix e so that 2^e <= a < 2^(e+1)
        let e = if e > -14 && 2f64.powi(e) > a {
            e - 1
        } else if 2f64.powi(e + 1) <= a {
            e + 1
        } else {
            e
        };
        let ulp = 2f64.powi(e - 10);
        let v = (a / ulp).round_ties_even() * ulp;
        if v >= 65536.0 {
            return sign | 0x7C00;
        }
        let bits = if v < 2f64.powi(-14) {
            (v / 2f64.powi(-24)) as u16
        } else {
            let e = v.log2().floor() as i32;
            let e = if 2f64.powi(e) > v {
                e - 1
            } else if 2f64.powi(e + 1) <= v {
                e + 1
            } else {
                e
            };
            (((e + 15) as u16) << 10) | ((v / 2f64.powi(e - 10)) as u16 - 1024)
        };
        sign | bits
    }

    #[test]
    fn rne_definition_sanity() {
        assert_eq!(rne(1.0), 0x3C00);
        assert_eq!(rne(65504.0), 0x7BFF);
        assert_eq!(rne(65519.99), 0x7BFF);
        assert_eq!(rne(65520.0), 0x7C00);
        assert_eq!(rne(2f32.powi(-24)), 0x0001);
        assert_eq!(rne(2f32.powi(-25)), 0x0000); // tie to even (zero)
        assert_eq!(rne(3.0 * 2f32.powi(-25)), 0x0002); // 1.5 ulp: tie to even (2)
        assert_eq!(rne(1.0 + 2f32.powi(-11)), 0x3C00); // tie to even (down)
        assert_eq!(rne(-(1.0 + 3.0 * 2f32.powi(-11))), 0xBC02); // tie to even (up)
        assert_eq!(rne(2f32.powi(-14) * (1.0 - 2f32.powi(-12))), 0x0400); // rounds up to the smallest normal
    }

    #[test]
    fn f16_decode_is_exact() {
        for h in 0..=u16::MAX {
            let v = h_value(h);
            let got = f16_bits_to_f32(h) as f64;
            if v.is_nan() {
                assert!(got.is_nan());
            } else {
                assert_eq!(got.to_bits(), v.to_bits(), "{h:#06x}");
            }
        }
    }

    fn check(bits: u32) {
        let x = f32::from_bits(bits);
        if x.is_nan() {
            assert_eq!(f32_to_f16_bits(x) & 0x7E00, 0x7E00);
        } else {
            assert_eq!(f32_to_f16_bits(x), rne(x), "{x:e} ({bits:#010x})");
        }
    }

    #[test]
    fn f16_encode_is_rne_sampled() {
        // a stride through every exponent, plus every pattern near the binary16 range edges
        let mut b = 0u32;
        while let Some(n) = b.checked_add(4099) {
            check(b);
            b = n;
        }
        for e in [
            0x3300_0000u32,
            0x3380_0000,
            0x3880_0000,
            0x4780_0000,
            0x477F_E000,
        ] {
            for d in 0..1u32 << 16 {
                check(e - (1 << 15) + d);
                check((e - (1 << 15) + d) | 0x8000_0000);
            }
        }
    }

    /// All 2^32 patterns (roughly a quarter of an hour of CPU: run with `--ignored` when fp.rs
    /// changes).
    #[test]
    #[ignore]
    fn f16_encode_is_rne_exhaustive() {
        for b in 0..=u32::MAX {
            check(b);
        }
    }
}
