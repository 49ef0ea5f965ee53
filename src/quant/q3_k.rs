//! Q3_K blocks (110 bytes per 256 values): bit-exact port of llama.cpp's
//! `quantize_row_q3_K_ref` / `dequantize_row_q3_K` and `make_q3_quants`
//! (gguf-and-k-quants.md §2.5, §3.7).

use super::QK_K;
use super::fp::{nearest_int, read_f16, write_f16};

/// Bytes per block.
pub const BLOCK_BYTES: usize = 110;

/// Values below this magnitude count as an all-zero group (ggml's `GROUP_MAX_EPS`).
const GROUP_MAX_EPS: f32 = 1e-15;

/// Symmetric fit with RMSE refinement (`make_q3_quants` with `do_rmse = true`): returns the
/// scale and writes levels `L + nmax ∈ [0, 2·nmax − 1]` into `l`.
pub fn make_q3_quants(nmax: i32, x: &[f32], l: &mut [i8]) -> f32 {
    let n = x.len();
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
    let iscale = -nmaxf / max;
    let mut sumlx = 0.0f32;
    let mut suml2 = 0.0f32;
    for i in 0..n {
        let q = nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1);
        l[i] = q as i8;
        let w = x[i] * x[i];
        let qf = q as f32;
        sumlx += w * x[i] * qf;
        suml2 += w * qf * qf;
    }
    for _ in 0..5 {
        let mut n_changed = 0;
        for i in 0..n {
            let w = x[i] * x[i];
            let li = l[i] as f32;
            let mut slx = sumlx - w * x[i] * li;
            if slx > 0.0 {
                let mut sl2 = suml2 - w * li * li;
                let new_l = nearest_int(x[i] * sl2 / slx).clamp(-nmax, nmax - 1);
                if new_l != l[i] as i32 {
                    let nf = new_l as f32;
                    slx += w * x[i] * nf;
                    sl2 += w * nf * nf;
                    if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                        l[i] = new_l as i8;
                        sumlx = slx;
                        suml2 = sl2;
                        n_changed += 1;
                    }
                }
            }
        }
        if n_changed == 0 {
            break;
        }
    }
    for v in l.iter_mut() {
        *v += nmax as i8;
    }
    if suml2 > 0.0 { sumlx / suml2 } else { 0.0 }
}

/// Quantize whole 256-value blocks of `x` into `y` (`x.len() / 256 * 110` bytes).
pub fn quantize(x: &[f32], y: &mut [u8]) {
    assert_eq!(x.len() % QK_K, 0);
    assert_eq!(y.len(), x.len() / QK_K * BLOCK_BYTES);
    for (xb, yb) in x.chunks_exact(QK_K).zip(y.chunks_exact_mut(BLOCK_BYTES)) {
        quantize_block(xb.try_into().unwrap(), yb.try_into().unwrap());
    }
}

/// Decode the signed 6-bit scale of sub-block `j` (0..16) from the 12 packed bytes.
#[inline(always)]
fn scale6(sc: &[u8], j: usize) -> i8 {
    let lo = if j < 8 { sc[j] & 0xF } else { sc[j - 8] >> 4 };
    let hi = (sc[8 + j % 4] >> (2 * (j / 4))) & 3;
    (lo | (hi << 4)) as i8 - 32
}

fn quantize_block(x: &[f32; QK_K], y: &mut [u8; BLOCK_BYTES]) {
    let mut l = [0i8; QK_K];
    let mut scales = [0f32; 16];
    let mut max_scale = 0.0f32;
    let mut amax = 0.0f32;
    for j in 0..16 {
        scales[j] = make_q3_quants(4, &x[16 * j..16 * j + 16], &mut l[16 * j..16 * j + 16]);
        let s = scales[j].abs();
        if s > amax {
            amax = s;
            max_scale = scales[j];
        }
    }
    let (hmask, rest) = y.split_at_mut(32);
    let (qs, rest) = rest.split_at_mut(64);
    let (sc, dbytes) = rest.split_at_mut(12);
    sc.fill(0);
    if max_scale != 0.0 {
        let iscale = -32.0 / max_scale;
        for j in 0..16 {
            // int → int8_t wraps, then clamp to [-32, 31] and offset
            let v = ((nearest_int(iscale * scales[j]) as i8).clamp(-32, 31) + 32) as u8;
            if j < 8 {
                sc[j] = v & 0xF;
            } else {
                sc[j - 8] |= (v & 0xF) << 4;
            }
            sc[j % 4 + 8] |= (v >> 4) << (2 * (j / 4));
        }
        write_f16(dbytes, 1.0 / iscale);
    } else {
        write_f16(dbytes, 0.0);
    }
    let d = read_f16(dbytes);
    for j in 0..16 {
        let dj = d * scale6(sc, j) as f32;
        if dj == 0.0 {
            continue;
        }
        for i in 0..16 {
            l[16 * j + i] = (nearest_int(x[16 * j + i] / dj).clamp(-4, 3) + 4) as i8;
        }
    }
    hmask.fill(0);
    for (e, v) in l.iter_mut().enumerate() {
        if *v > 3 {
            hmask[e % 32] |= 1 << (e / 32);
            *v -= 4;
        }
    }
    for h in 0..2 {
        let b = 128 * h;
        for i in 0..32 {
            let q = |k: usize| l[b + i + 32 * k] as u8;
            qs[32 * h + i] = q(0) | (q(1) << 2) | (q(2) << 4) | (q(3) << 6);
        }
    }
}

/// Dequantize whole blocks of `x` into `y` (256 values per 110 bytes).
pub fn dequantize(x: &[u8], y: &mut [f32]) {
    assert_eq!(x.len() % BLOCK_BYTES, 0);
    assert_eq!(y.len(), x.len() / BLOCK_BYTES * QK_K);
    for (b, out) in x.chunks_exact(BLOCK_BYTES).zip(y.chunks_exact_mut(QK_K)) {
        let hmask = &b[0..32];
        let qs = &b[32..96];
        let sc = &b[96..108];
        let d_all = read_f16(&b[108..110]);
        for (e, o) in out.iter_mut().enumerate() {
            let (h, k, i) = (e / 128, (e % 128) / 32, e % 32);
            let low = ((qs[32 * h + i] >> (2 * k)) & 3) as i32;
            let hbit = hmask[i] & (1 << (e / 32)) != 0;
            let q = low - if hbit { 0 } else { 4 };
            let dl = d_all * scale6(sc, e / 16) as f32;
            *o = dl * q as f32;
        }
    }
}
