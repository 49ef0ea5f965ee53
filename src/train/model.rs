//! The llama-family causal LM (Llama, Mistral, Qwen2 with attention biases, SmolLM; GQA, RoPE
//! with `rope_theta` and llama3/linear scaling, RMSNorm, SwiGLU, tied embeddings) as a forward
//! pass built from differentiable candle ops only, with LoRA on chosen projections.
//!
//! Frozen base linears are held either in NF4 with double quantization (QLoRA: dequantized tile
//! by tile in the forward and again in the backward, which returns only ∂L/∂x), or as f32 tensors
//! (`--base-dtype f32`, or bf16-rounded values for `bf16`). On the CPU a LoRA projection is one
//! custom op (`LoraMatMul`: base, dropout, A, B and the scale, with its backward to x, A and B
//! written out) whose matmuls call the gemm crate on the slices directly. Embeddings, norms and the LM head stay
//! f32, as `peft.prepare_model_for_kbit_training` leaves them. Fused candle ops that drop gradients
//! (`softmax_last_dim`, `rms_norm`, `rope`) are never used (shared/specs/rust-crates.md §3.4).

use crate::checkpoint::HfCheckpoint;
use crate::checkpoint::ModelConfig;
use crate::quant::nf4;
use anyhow::{Context, Result, anyhow, bail};
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, Device, Layout, Shape, Tensor, Var,
};
use rayon::prelude::*;
use std::sync::Arc;

/// The seven projections of a llama decoder layer, in PEFT's module order.
pub const ALL_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BaseDtype {
    Nf4,
    Bf16,
    F32,
}

/// LoRA settings shared by every adapted module.
#[derive(Clone, Debug)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    pub rslora: bool,
    pub dropout: f64,
    /// Short module names (`q_proj`, …), a subset of [`ALL_TARGETS`].
    pub targets: Vec<String>,
}

impl LoraSpec {
    pub fn scaling(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }
}

// ------------------------------------------------------------------------------------------------
// NF4 frozen linear

/// A frozen `[out, in]` weight in NF4 with double-quantized absmax (blocks of 64, nested blocks
/// of 256), as bitsandbytes stores QLoRA base weights.
pub struct Nf4Weight {
    pub out: usize,
    pub inp: usize,
    packed: Vec<u8>,
    absmax_codes: Vec<u8>,
    nested_absmax: Vec<f32>,
    offset: f32,
}

/// Output rows dequantized at a time (bounds the temporary f32 tile to ~8 MB).
fn tile_rows(inp: usize) -> usize {
    ((2 << 20) / inp.max(1)).clamp(16, 4096)
}

impl Nf4Weight {
    pub fn quantize(out: usize, inp: usize, w: &[f32]) -> Nf4Weight {
        let (packed, absmax) = nf4::quantize_4bit(nf4::QuantType::Nf4, w);
        let nested = nf4::double_quant(&absmax);
        Nf4Weight {
            out,
            inp,
            packed,
            absmax_codes: nested.codes,
            nested_absmax: nested.nested_absmax,
            offset: nested.offset,
        }
    }

    /// Bytes held (codes + statistics).
    pub fn bytes(&self) -> usize {
        self.packed.len() + self.absmax_codes.len() + self.nested_absmax.len() * 4
    }

    /// Rows `[r0, r0 + n)` dequantized to f32 (in parallel over rows).
    fn dequantize_rows(&self, absmax: &[f32], r0: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0f32; n * self.inp];
        out.par_chunks_mut(self.inp)
            .enumerate()
            .for_each(|(i, row)| {
                nf4::dequantize_4bit(
                    nf4::QuantType::Nf4,
                    &self.packed,
                    absmax,
                    (r0 + i) * self.inp,
                    row,
                )
            });
        out
    }

    fn absmax(&self) -> Vec<f32> {
        nf4::dequantize_absmax(&self.absmax_codes, &self.nested_absmax, self.offset)
    }

    /// The whole weight in f32 (tests and parity checks).
    pub fn dequantize(&self) -> Vec<f32> {
        self.dequantize_rows(&self.absmax(), 0, self.out)
    }

    /// `y = x Wᵀ` for `x [n, in]`, one tile of W in f32 at a time.
    fn forward_tiles(&self, x: &[f32], n: usize, y: &mut [f32]) {
        let absmax = self.absmax();
        let tr = tile_rows(self.inp);
        let mut r0 = 0;
        while r0 < self.out {
            let nt = tr.min(self.out - r0);
            with_tile(self, &absmax, r0, nt, |w| {
                // y[:, r0..r0+nt] = x · w_tileᵀ
                sgemm(
                    dims(n, nt, self.inp),
                    mat(&mut y[r0..], self.out),
                    false,
                    view(x, self.inp, 1),
                    view(w, 1, self.inp),
                )
            });
            r0 += nt;
        }
    }

    /// `gx (+)= g W` for `g [n, out]`, summed over tiles of W (`accumulate`: add to `gx`).
    fn backward_tiles(&self, g: &[f32], n: usize, gx: &mut [f32], accumulate: bool) {
        let absmax = self.absmax();
        let tr = tile_rows(self.inp);
        let mut r0 = 0;
        while r0 < self.out {
            let nt = tr.min(self.out - r0);
            with_tile(self, &absmax, r0, nt, |w| {
                // gx (+)= g[:, r0..r0+nt] · w_tile
                sgemm(
                    dims(n, self.inp, nt),
                    mat(gx, self.inp),
                    accumulate || r0 > 0,
                    view(&g[r0..], self.out, 1),
                    view(w, self.inp, 1),
                )
            });
            r0 += nt;
        }
    }
}

/// Rows `[r0, r0 + nt)` of `w` dequantized into a buffer kept by the calling thread (no
/// allocation or zeroing per call), handed to `f`.
fn with_tile<R>(
    w: &Nf4Weight,
    absmax: &[f32],
    r0: usize,
    nt: usize,
    f: impl FnOnce(&[f32]) -> R,
) -> R {
    thread_local! {
        static TILE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    TILE.with(|cell| {
        let mut buf = cell.borrow_mut();
        let len = nt * w.inp;
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        buf[..len]
            .par_chunks_mut(w.inp)
            .enumerate()
            .for_each(|(i, row)| {
                nf4::dequantize_4bit(
                    nf4::QuantType::Nf4,
                    &w.packed,
                    absmax,
                    (r0 + i) * w.inp,
                    row,
                )
            });
        f(&buf[..len])
    })
}

/// gemm sizes: `m × k` times `k × n`.
struct Dims {
    m: usize,
    n: usize,
    k: usize,
}

/// A row-major f32 destination: element (i, j) at `data[i * rs + j]`.
struct Mat<'a> {
    data: &'a mut [f32],
    rs: usize,
}

/// An f32 operand: element (i, j) at `data[i * rs + j * cs]`.
struct View<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

fn dims(m: usize, n: usize, k: usize) -> Dims {
    Dims { m, n, k }
}

fn mat(data: &mut [f32], rs: usize) -> Mat<'_> {
    Mat { data, rs }
}

fn view(data: &[f32], rs: usize, cs: usize) -> View<'_> {
    View { data, rs, cs }
}

/// `dst (+)= lhs · rhs` with the gemm crate (candle's own CPU matmul kernel) on the rayon
/// threads, straight on the slices: no tensors, copies or zero-filled outputs.
fn sgemm(d: Dims, dst: Mat, accumulate: bool, lhs: View, rhs: View) {
    if d.m == 0 || d.n == 0 {
        return;
    }
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(
        last(d.m, d.n, dst.rs, 1) < dst.data.len(),
        "sgemm: destination too short"
    );
    if d.k > 0 {
        assert!(
            last(d.m, d.k, lhs.rs, lhs.cs) < lhs.data.len(),
            "sgemm: lhs too short"
        );
        assert!(
            last(d.k, d.n, rhs.rs, rhs.cs) < rhs.data.len(),
            "sgemm: rhs too short"
        );
    }
    let threads = rayon::current_num_threads();
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: every element the sizes and strides address lies inside its slice (asserted
    // above), and the destination is a unique borrow, so it overlaps no operand.
    unsafe {
        gemm::gemm(
            d.m,
            d.n,
            d.k,
            dst.data.as_mut_ptr(),
            1,
            dst.rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// The f32 values of a CPU tensor (made contiguous), handed to `f`.
fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (st, l) = t.storage_and_layout();
    let candle_core::Storage::Cpu(CpuStorage::F32(v)) = &*st else {
        candle_core::bail!("an f32 CPU tensor was expected");
    };
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("tensor not contiguous".into()))?;
    Ok(f(&v[a..b]))
}

/// The f32 slice of a tensor's storage (contiguous layout).
fn storage_slice<'a>(st: &'a candle_core::Storage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let candle_core::Storage::Cpu(s) = st else {
        candle_core::bail!("a CPU tensor was expected");
    };
    cpu_slice(s, l, "tensor")
}

/// The f32 slice of a contiguous op input.
fn cpu_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{what}: f32 expected");
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{what}: must be contiguous"),
    }
}

/// A frozen base weight.
#[derive(Clone)]
pub enum Frozen {
    /// `[out, in]` f32.
    Dense(Tensor),
    Nf4(Arc<Nf4Weight>),
}

impl Frozen {
    /// `y = x Wᵀ` for `x [n, inp]` (outside the autograd graph).
    fn apply(&self, x: &[f32], n: usize, inp: usize, y: &mut [f32]) -> candle_core::Result<()> {
        match self {
            Frozen::Dense(w) => {
                let out = w.dim(0)?;
                with_cpu_f32(w, |w| {
                    sgemm(
                        dims(n, out, inp),
                        mat(y, out),
                        false,
                        view(x, inp, 1),
                        view(w, 1, inp),
                    )
                })
            }
            Frozen::Nf4(w) => {
                w.forward_tiles(x, n, y);
                Ok(())
            }
        }
    }

    /// `gx (+)= g W` for `g [n, out]`: the gradient with respect to the input.
    fn apply_back(
        &self,
        g: &[f32],
        n: usize,
        out: usize,
        gx: &mut [f32],
        accumulate: bool,
    ) -> candle_core::Result<()> {
        match self {
            Frozen::Dense(w) => {
                let inp = w.dim(1)?;
                with_cpu_f32(w, |w| {
                    sgemm(
                        dims(n, inp, out),
                        mat(gx, inp),
                        accumulate,
                        view(g, out, 1),
                        view(w, inp, 1),
                    )
                })
            }
            Frozen::Nf4(w) => {
                w.backward_tiles(g, n, gx, accumulate);
                Ok(())
            }
        }
    }

    fn in_dim(&self) -> candle_core::Result<usize> {
        match self {
            Frozen::Dense(w) => w.dim(1),
            Frozen::Nf4(w) => Ok(w.inp),
        }
    }

    fn out_dim(&self) -> candle_core::Result<usize> {
        match self {
            Frozen::Dense(w) => w.dim(0),
            Frozen::Nf4(w) => Ok(w.out),
        }
    }

    /// `x [n, in] → x Wᵀ [n, out]` with a backward to `x` only. candle's own matmul backward
    /// would also form ∂L/∂W for the frozen weight (a second full matmul per layer, and a
    /// weight-sized gradient kept until the step ends), so a custom op carries it on the CPU.
    fn forward(&self, x2: &Tensor) -> candle_core::Result<Tensor> {
        if !x2.device().is_cpu() {
            let w = match self {
                Frozen::Dense(w) => w.clone(),
                Frozen::Nf4(w) => Tensor::from_vec(w.dequantize(), (w.out, w.inp), x2.device())?,
            };
            return x2.matmul(&w.t()?);
        }
        x2.contiguous()?.apply_op1(FrozenMatMul(self.clone()))
    }
}

/// The custom op `x ↦ x Wᵀ` for a frozen weight.
struct FrozenMatMul(Frozen);

impl CustomOp1 for FrozenMatMul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("frozen-matmul: input must be f32");
        };
        let (n, inp) = layout.shape().dims2()?;
        let x = match layout.contiguous_offsets() {
            Some((a, b)) => &data[a..b],
            None => candle_core::bail!("frozen-matmul: input must be contiguous"),
        };
        let out = self.0.out_dim()?;
        let mut y = vec![0f32; n * out];
        self.0.apply(x, n, inp, &mut y)?;
        Ok((CpuStorage::F32(y), Shape::from((n, out))))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (n, out) = grad.dims2()?;
        let inp = self.0.in_dim()?;
        let mut gx = vec![0f32; n * inp];
        with_cpu_f32(grad, |g| self.0.apply_back(g, n, out, &mut gx, false))??;
        Ok(Some(Tensor::from_vec(gx, (n, inp), grad.device())?))
    }
}

// ------------------------------------------------------------------------------------------------
// LoRA linear

/// One LoRA pair on a module.
pub struct Lora {
    /// `[r, in]`
    pub a: Var,
    /// `[out, r]`
    pub b: Var,
    pub scale: f64,
}

/// A projection: frozen base (+ bias) and an optional LoRA.
pub struct Proj {
    /// HF module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub path: String,
    pub base: Frozen,
    pub bias: Option<Tensor>,
    pub lora: Option<Lora>,
    pub out: usize,
    pub inp: usize,
}

/// Dropout on the LoRA input: a mask for `(module index, elements)` in a training step.
pub trait DropoutSource {
    /// A mask of `len` values, each 0 or 1/(1−p), or `None` for no dropout.
    fn mask(&self, module: usize, len: usize) -> Option<Vec<f32>>;
}

impl Proj {
    /// `x [n, in] → [n, out]`.
    fn forward(
        &self,
        x: &Tensor,
        module: usize,
        dropout: Option<&dyn DropoutSource>,
    ) -> candle_core::Result<Tensor> {
        let mask = || dropout.and_then(|d| d.mask(module, x.elem_count()));
        if let (Some(l), true) = (&self.lora, x.device().is_cpu()) {
            let op = LoraMatMul {
                base: self.base.clone(),
                mask: mask().map(Arc::new),
                scale: l.scale as f32,
            };
            let mut y = x
                .contiguous()?
                .apply_op3(l.a.as_tensor(), l.b.as_tensor(), op)?;
            if let Some(b) = &self.bias {
                y = y.broadcast_add(b)?;
            }
            return Ok(y);
        }
        let mut y = self.base.forward(x)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if let Some(l) = &self.lora {
            let xin = match mask() {
                Some(m) => (x * Tensor::from_vec(m, x.shape(), x.device())?)?,
                None => x.clone(),
            };
            let h = xin.matmul(&l.a.as_tensor().t()?)?;
            let d = h.matmul(&l.b.as_tensor().t()?)?;
            y = (y + d.affine(l.scale, 0.0)?)?;
        }
        Ok(y)
    }
}

/// A LoRA projection in one op: `y = x Wᵀ + ((x ⊙ m) Aᵀ) Bᵀ · s` (PEFT's order: the base
/// layer, then `lora_B(lora_A(dropout(x))) * scaling`), with the backward to x, A and B written
/// out, so a projection is one node of the graph instead of a dozen (dropout, two matmuls and
/// their transposes, the scale, the sum, each with its own gradient buffers).
struct LoraMatMul {
    base: Frozen,
    /// The dropout mask (0 or 1/(1−p) per element of x), if any.
    mask: Option<Arc<Vec<f32>>>,
    scale: f32,
}

impl LoraMatMul {
    /// `x ⊙ m` (or `x`).
    fn dropped<'a>(&self, x: &'a [f32]) -> std::borrow::Cow<'a, [f32]> {
        match &self.mask {
            None => std::borrow::Cow::Borrowed(x),
            Some(m) => {
                let mut v = vec![0f32; x.len()];
                v.par_chunks_mut(1 << 14)
                    .zip(x.par_chunks(1 << 14).zip(m.par_chunks(1 << 14)))
                    .for_each(|(o, (x, m))| {
                        for ((o, x), m) in o.iter_mut().zip(x).zip(m) {
                            *o = x * m;
                        }
                    });
                std::borrow::Cow::Owned(v)
            }
        }
    }
}

/// `t = xd Aᵀ` for `xd [n, inp]`, `A [r, inp]`.
fn lora_down(xd: &[f32], a: &[f32], n: usize, inp: usize, r: usize) -> Vec<f32> {
    let mut t = vec![0f32; n * r];
    sgemm(
        dims(n, r, inp),
        mat(&mut t, r),
        false,
        view(xd, inp, 1),
        view(a, 1, inp),
    );
    t
}

impl CustomOp3 for LoraMatMul {
    fn name(&self) -> &'static str {
        "lora-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, inp) = l1.shape().dims2()?;
        let (r, out) = (l2.shape().dims2()?.0, l3.shape().dims2()?.0);
        if l2.shape().dims2()? != (r, inp) || l3.shape().dims2()? != (out, r) {
            candle_core::bail!("lora-matmul: shapes do not match");
        }
        let x = cpu_slice(s1, l1, "lora-matmul input")?;
        let (a, b) = (cpu_slice(s2, l2, "lora_A")?, cpu_slice(s3, l3, "lora_B")?);
        let mut y = vec![0f32; n * out];
        self.base.apply(x, n, inp, &mut y)?;
        let t = lora_down(&self.dropped(x), a, n, inp, r);
        let mut u = vec![0f32; n * out];
        sgemm(
            dims(n, out, r),
            mat(&mut u, out),
            false,
            view(&t, r, 1),
            view(b, 1, r),
        );
        let s = self.scale;
        y.par_chunks_mut(1 << 14)
            .zip(u.par_chunks(1 << 14))
            .for_each(|(y, u)| {
                for (y, u) in y.iter_mut().zip(u) {
                    *y += u * s;
                }
            });
        Ok((CpuStorage::F32(y), Shape::from((n, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, inp) = x.dims2()?;
        let (r, out) = (a.dim(0)?, b.dim(0)?);
        let s = self.scale;
        let (xt, at, bt, gt) = (
            x.contiguous()?,
            a.contiguous()?,
            b.contiguous()?,
            grad.contiguous()?,
        );
        let (xg, xl) = xt.storage_and_layout();
        let (ag, al) = at.storage_and_layout();
        let (bg, bl) = bt.storage_and_layout();
        let (gg, gl) = gt.storage_and_layout();
        let x = storage_slice(&xg, xl)?;
        let a = storage_slice(&ag, al)?;
        let b = storage_slice(&bg, bl)?;
        let gy = storage_slice(&gg, gl)?;
        // forward intermediates again: xd = x ⊙ m, t = xd Aᵀ
        let xd = self.dropped(x);
        let t = lora_down(&xd, a, n, inp, r);
        // ∂u = ∂y · s (u = t Bᵀ)
        let gu: Vec<f32> = gy.par_iter().map(|g| g * s).collect();
        // ∂B = ∂uᵀ t [out, r]
        let mut gb = vec![0f32; out * r];
        sgemm(
            dims(out, r, n),
            mat(&mut gb, r),
            false,
            view(&gu, 1, out),
            view(&t, r, 1),
        );
        // ∂t = ∂u B [n, r]
        let mut g_t = vec![0f32; n * r];
        sgemm(
            dims(n, r, out),
            mat(&mut g_t, r),
            false,
            view(&gu, out, 1),
            view(b, r, 1),
        );
        // ∂A = ∂tᵀ xd [r, inp]
        let mut ga = vec![0f32; r * inp];
        sgemm(
            dims(r, inp, n),
            mat(&mut ga, inp),
            false,
            view(&g_t, 1, r),
            view(&xd, inp, 1),
        );
        // ∂x = (∂t A) ⊙ m + ∂y W
        let mut gx = vec![0f32; n * inp];
        sgemm(
            dims(n, inp, r),
            mat(&mut gx, inp),
            false,
            view(&g_t, r, 1),
            view(a, inp, 1),
        );
        if let Some(m) = &self.mask {
            gx.par_chunks_mut(1 << 14)
                .zip(m.par_chunks(1 << 14))
                .for_each(|(g, m)| {
                    for (g, m) in g.iter_mut().zip(m) {
                        *g *= m;
                    }
                });
        }
        self.base.apply_back(gy, n, out, &mut gx, true)?;
        let dev = xt.device();
        Ok((
            Some(Tensor::from_vec(gx, (n, inp), dev)?),
            Some(Tensor::from_vec(ga, (r, inp), dev)?),
            Some(Tensor::from_vec(gb, (out, r), dev)?),
        ))
    }
}

/// Causal self-attention in one op, from the projections to the output projection's input:
/// `q [b·t, h·d]`, `k`, `v [b·t, kv·d]` (grouped: query head `i` reads key/value head
/// `i / (h / kv)`); RoPE on q and k (`x·cos + rotate_half(x)·sin`, as the model's candle ops
/// compute it), then `softmax(q kᵀ · scale + causal mask) v` as `[b·t, h·d]`, with the backward
/// to q, k and v written out. The softmax is taken as torch and candle take it (subtract the row
/// maximum, exponentiate, divide by the sum). Replaces some forty small candle ops per layer
/// (reshapes and transposes, RoPE, the key/value repeat, two batched matmuls, scale, mask,
/// softmax) and their gradient buffers.
struct RopeAttention {
    scale: f32,
    /// Batch rows and positions (`b·t` rows in).
    b: usize,
    t: usize,
    h: usize,
    kv: usize,
    /// `[t, d]` tables.
    cos: Arc<Vec<f32>>,
    sin: Arc<Vec<f32>>,
}

/// `Σ a_i b_i` over equal-length slices, eight partial sums (vectorizes).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `out += c · x`.
fn axpy(c: f32, x: &[f32], out: &mut [f32]) {
    for (o, x) in out.iter_mut().zip(x) {
        *o += c * x;
    }
}

impl RopeAttention {
    fn d(&self, width: usize, heads: usize) -> candle_core::Result<usize> {
        if heads == 0 || !width.is_multiple_of(heads) {
            candle_core::bail!("rope-attention: {width} values do not split into {heads} heads");
        }
        Ok(width / heads)
    }

    /// Token-major `[b·t, heads·d]` → head-major `[b, heads, t, d]`, RoPE applied if `rope`.
    fn to_heads(&self, x: &[f32], heads: usize, d: usize, rope: bool) -> Vec<f32> {
        let (t, half) = (self.t, d / 2);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(t * d).enumerate().for_each(|(bh, o)| {
            let (bi, hh) = (bh / heads, bh % heads);
            for i in 0..t {
                let xs = &x[(bi * t + i) * heads * d + hh * d..][..d];
                let os = &mut o[i * d..(i + 1) * d];
                if !rope {
                    os.copy_from_slice(xs);
                    continue;
                }
                let (c, s) = (&self.cos[i * d..(i + 1) * d], &self.sin[i * d..(i + 1) * d]);
                for j in 0..d {
                    let rot = if j < half {
                        -xs[j + half]
                    } else {
                        xs[j - half]
                    };
                    os[j] = xs[j] * c[j] + rot * s[j];
                }
            }
        });
        out
    }

    /// Head-major gradients `[b, heads, t, d]` → token-major `[b·t, heads·d]`, through RoPE's
    /// backward if `rope` (`g·cos + rotate_halfᵀ(g·sin)`).
    fn heads_back(&self, g: &[f32], heads: usize, d: usize, rope: bool) -> Vec<f32> {
        let (t, half) = (self.t, d / 2);
        let mut out = vec![0f32; g.len()];
        out.par_chunks_mut(heads * d)
            .enumerate()
            .for_each(|(row, o)| {
                let (bi, i) = (row / t, row % t);
                for hh in 0..heads {
                    let gs = &g[((bi * heads + hh) * t + i) * d..][..d];
                    let os = &mut o[hh * d..(hh + 1) * d];
                    if !rope {
                        os.copy_from_slice(gs);
                        continue;
                    }
                    let (c, s) = (&self.cos[i * d..(i + 1) * d], &self.sin[i * d..(i + 1) * d]);
                    for j in 0..d {
                        let back = if j < half {
                            gs[j + half] * s[j + half]
                        } else {
                            -(gs[j - half] * s[j - half])
                        };
                        os[j] = gs[j] * c[j] + back;
                    }
                }
            });
        out
    }

    /// Row `i` of the attention probabilities of query head `qh` in batch row `bi` (length
    /// `i + 1`; later positions are masked to 0), from head-major q and k.
    fn probs(
        &self,
        q: &[f32],
        k: &[f32],
        d: usize,
        (bi, qh, i): (usize, usize, usize),
        p: &mut Vec<f32>,
    ) {
        let (t, h, kv) = (self.t, self.h, self.kv);
        let kh = qh / (h / kv);
        let qi = &q[((bi * h + qh) * t + i) * d..][..d];
        let kb = &k[(bi * kv + kh) * t * d..];
        p.clear();
        p.extend((0..=i).map(|j| dot(qi, &kb[j * d..(j + 1) * d]) * self.scale));
        let m = p.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let mut sum = 0f32;
        for x in p.iter_mut() {
            *x = (*x - m).exp();
            sum += *x;
        }
        for x in p.iter_mut() {
            *x /= sum;
        }
    }

    fn check(&self, n: usize, hw: usize, kw: usize, vw: usize) -> candle_core::Result<usize> {
        let d = self.d(hw, self.h)?;
        if n != self.b * self.t
            || self.kv == 0
            || !self.h.is_multiple_of(self.kv)
            || kw != self.kv * d
            || vw != kw
            || self.cos.len() != self.t * d
            || self.sin.len() != self.t * d
        {
            candle_core::bail!("rope-attention: shapes do not match");
        }
        Ok(d)
    }
}

impl CustomOp3 for RopeAttention {
    fn name(&self) -> &'static str {
        "rope-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, hw) = l1.shape().dims2()?;
        let (nk, kw) = l2.shape().dims2()?;
        let (nv, vw) = l3.shape().dims2()?;
        if nk != n || nv != n {
            candle_core::bail!("rope-attention: row counts differ");
        }
        let d = self.check(n, hw, kw, vw)?;
        let (h, kv, t) = (self.h, self.kv, self.t);
        let q = self.to_heads(cpu_slice(s1, l1, "attention q")?, h, d, true);
        let k = self.to_heads(cpu_slice(s2, l2, "attention k")?, kv, d, true);
        let v = self.to_heads(cpu_slice(s3, l3, "attention v")?, kv, d, false);
        let mut o = vec![0f32; n * h * d];
        // one work item per (batch row, position): writes row (bi, i) of o
        o.par_chunks_mut(h * d).enumerate().for_each(|(row, orow)| {
            let (bi, i) = (row / t, row % t);
            let mut p = Vec::with_capacity(t);
            for qh in 0..h {
                self.probs(&q, &k, d, (bi, qh, i), &mut p);
                let vb = &v[(bi * kv + qh / (h / kv)) * t * d..];
                let out = &mut orow[qh * d..(qh + 1) * d];
                for (j, &pj) in p.iter().enumerate() {
                    axpy(pj, &vb[j * d..(j + 1) * d], out);
                }
            }
        });
        Ok((CpuStorage::F32(o), Shape::from((n, h * d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, hw) = q.dims2()?;
        let d = self.check(n, hw, k.dim(1)?, v.dim(1)?)?;
        let (h, kv, t) = (self.h, self.kv, self.t);
        let (qt, kt, vt, gt) = (
            q.contiguous()?,
            k.contiguous()?,
            v.contiguous()?,
            grad.contiguous()?,
        );
        let (qg, ql) = qt.storage_and_layout();
        let (kg, kl) = kt.storage_and_layout();
        let (vg, vl) = vt.storage_and_layout();
        let (gg, gl) = gt.storage_and_layout();
        let qs = self.to_heads(storage_slice(&qg, ql)?, h, d, true);
        let ks = self.to_heads(storage_slice(&kg, kl)?, kv, d, true);
        let vs = self.to_heads(storage_slice(&vg, vl)?, kv, d, false);
        let go = storage_slice(&gg, gl)?;
        let rep = h / kv;
        let head = t * d;
        let mut gq = vec![0f32; qs.len()];
        let mut gk = vec![0f32; ks.len()];
        let mut gv = vec![0f32; vs.len()];
        // one work item per (batch row, key/value head): its query heads' ∂q, and ∂k, ∂v
        gq.par_chunks_mut(rep * head)
            .zip(gk.par_chunks_mut(head).zip(gv.par_chunks_mut(head)))
            .enumerate()
            .for_each(|(unit, (gq, (gk, gv)))| {
                let (bi, kh) = (unit / kv, unit % kv);
                let kb = &ks[unit * head..][..head];
                let vb = &vs[unit * head..][..head];
                let mut p = Vec::with_capacity(t);
                let mut dp = vec![0f32; t];
                for r in 0..rep {
                    let qh = kh * rep + r;
                    for i in 0..t {
                        self.probs(&qs, &ks, d, (bi, qh, i), &mut p);
                        let gorow = &go[(bi * t + i) * h * d + qh * d..][..d];
                        // ∂v_j += p_j ∂o_i; ∂p_j = ∂o_i · v_j
                        let mut pdp = 0f32;
                        for (j, &pj) in p.iter().enumerate() {
                            axpy(pj, gorow, &mut gv[j * d..(j + 1) * d]);
                            dp[j] = dot(gorow, &vb[j * d..(j + 1) * d]);
                            pdp += pj * dp[j];
                        }
                        // ∂s_j = p_j (∂p_j − Σ p ∂p); ∂q_i += scale Σ ∂s_j k_j; ∂k_j += scale ∂s_j q_i
                        let qi = &qs[((bi * h + qh) * t + i) * d..][..d];
                        let gqi = &mut gq[(r * t + i) * d..(r * t + i + 1) * d];
                        for (j, &pj) in p.iter().enumerate() {
                            let g = pj * (dp[j] - pdp) * self.scale;
                            axpy(g, &kb[j * d..(j + 1) * d], gqi);
                            axpy(g, qi, &mut gk[j * d..(j + 1) * d]);
                        }
                    }
                }
            });
        let dev = qt.device();
        Ok((
            Some(Tensor::from_vec(
                self.heads_back(&gq, h, d, true),
                (n, h * d),
                dev,
            )?),
            Some(Tensor::from_vec(
                self.heads_back(&gk, kv, d, true),
                (n, kv * d),
                dev,
            )?),
            Some(Tensor::from_vec(
                self.heads_back(&gv, kv, d, false),
                (n, kv * d),
                dev,
            )?),
        ))
    }
}

/// `silu(g) · u` in one op (`silu(x) = x / (1 + e^−x)`), with the backward as candle writes
/// it: `∂u = ∂y · silu(g)`, `∂g = (∂y · u) · (σ(g) (1 − silu(g)) + silu(g))`.
struct SwiGlu;

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("swiglu: shapes differ");
        }
        let g = cpu_slice(s1, l1, "swiglu gate")?;
        let u = cpu_slice(s2, l2, "swiglu up")?;
        let mut y = vec![0f32; g.len()];
        y.par_chunks_mut(1 << 14)
            .zip(g.par_chunks(1 << 14).zip(u.par_chunks(1 << 14)))
            .for_each(|(y, (g, u))| {
                for ((y, g), u) in y.iter_mut().zip(g).zip(u) {
                    *y = silu(*g) * u;
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (gt, ut, dt) = (g.contiguous()?, u.contiguous()?, grad.contiguous()?);
        let (gg, gl) = gt.storage_and_layout();
        let (ug, ul) = ut.storage_and_layout();
        let (dg, dl) = dt.storage_and_layout();
        let (gs, us, dy) = (
            storage_slice(&gg, gl)?,
            storage_slice(&ug, ul)?,
            storage_slice(&dg, dl)?,
        );
        let mut d_g = vec![0f32; gs.len()];
        let mut d_u = vec![0f32; gs.len()];
        const CH: usize = 1 << 14;
        d_g.par_chunks_mut(CH)
            .zip(d_u.par_chunks_mut(CH))
            .enumerate()
            .for_each(|(c, (d_g, d_u))| {
                let o = c * CH;
                for (k, (d_g, d_u)) in d_g.iter_mut().zip(d_u.iter_mut()).enumerate() {
                    let (x, y) = (gs[o + k], dy[o + k]);
                    let sx = silu(x);
                    let sig = ((-x).exp() + 1.0).recip();
                    *d_u = y * sx;
                    *d_g = (y * us[o + k]) * (sig * (1.0 - sx) + sx);
                }
            });
        let dev = gt.device();
        Ok((
            Some(Tensor::from_vec(d_g, gt.shape(), dev)?),
            Some(Tensor::from_vec(d_u, ut.shape(), dev)?),
        ))
    }
}

// ------------------------------------------------------------------------------------------------
// The model

/// HF module path of projection `short` in decoder layer `layer`.
pub fn module_path(layer: usize, short: &str) -> String {
    let part = if ["gate_proj", "up_proj", "down_proj"].contains(&short) {
        "mlp"
    } else {
        "self_attn"
    };
    format!("model.layers.{layer}.{part}.{short}")
}

pub struct Layer {
    pub input_norm: Tensor,
    pub post_norm: Tensor,
    /// q, k, v, o, gate, up, down
    pub proj: Vec<Proj>,
}

pub struct Model {
    pub hidden: usize,
    pub n_heads: usize,
    pub n_kv: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub eps: f64,
    /// `[head_dim / 2]`
    inv_freq: Vec<f32>,
    pub embed: Tensor,
    pub layers: Vec<Layer>,
    pub norm: Tensor,
    /// The output projection (the embedding itself when tied).
    pub lm_head: Frozen,
    pub lm_head_tied: bool,
    pub device: Device,
}

/// `(module path, out, in) → (A [r, in], B [out, r])`.
pub type GivenLora<'a> = dyn Fn(&str, usize, usize) -> Result<(Vec<f32>, Vec<f32>)> + 'a;

/// How LoRA weights start.
pub enum LoraInit<'a> {
    /// PEFT's default: A ~ kaiming-uniform(a=√5) = U(−1/√in, 1/√in), B = 0; `a_init(module
    /// index, rows, cols)` returns A's values.
    Peft(&'a dyn Fn(usize, usize, usize) -> Vec<f32>),
    /// From PEFT adapter tensors: `(path) → (A [r,in], B [out,r])`.
    Given(&'a GivenLora<'a>),
}

fn read_f32(ck: &HfCheckpoint, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
    let t = ck
        .get(name)
        .ok_or_else(|| anyhow!("{}: tensor {name:?} is missing", ck.dir.display()))?;
    let mut v = vec![0f32; t.n_elements()];
    t.read_f32(0, &mut v)?;
    Ok((v, t.shape.clone()))
}

fn round_bf16(v: &mut [f32]) {
    for x in v.iter_mut() {
        *x = half::bf16::from_f32(*x).to_f32();
    }
}

/// HF `rope_init_fn`: inverse frequencies (f32, as transformers computes them) with the
/// default, linear or llama3 rule.
fn inv_freq(cfg: &ModelConfig) -> Result<Vec<f32>> {
    let d = cfg.head_dim;
    let theta = cfg.rope.theta.unwrap_or(10000.0) as f32;
    let mut f: Vec<f32> = (0..d)
        .step_by(2)
        .map(|i| 1.0f32 / theta.powf(i as f32 / d as f32))
        .collect();
    match cfg
        .rope
        .rope_type
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None | Some("default") => {}
        Some("linear") => {
            let k = cfg.rope.get_f64("factor").unwrap_or(1.0) as f32;
            f.iter_mut().for_each(|x| *x /= k);
        }
        Some("llama3") => {
            let g = |k: &str| {
                cfg.rope
                    .get_f64(k)
                    .ok_or_else(|| anyhow!("{}: llama3 RoPE needs {k:?}", cfg.path.display()))
            };
            let factor = g("factor")?;
            let low = g("low_freq_factor")?;
            let high = g("high_freq_factor")?;
            let old = g("original_max_position_embeddings")?;
            let low_wl = old / low;
            let high_wl = old / high;
            for x in f.iter_mut() {
                let inv = *x as f64;
                let wl = 2.0 * std::f64::consts::PI / inv;
                let v = if wl > low_wl {
                    inv / factor
                } else if wl < high_wl {
                    inv
                } else {
                    let s = (old / wl - low) / (high - low);
                    (1.0 - s) * inv / factor + s * inv
                };
                *x = v as f32;
            }
        }
        Some(other) => bail!(
            "{}: RoPE type {other:?} is not supported for fine-tuning (default, linear, llama3)",
            cfg.path.display()
        ),
    }
    Ok(f)
}

impl Model {
    /// Load the base from an HF (or NF4) folder, put LoRA on `spec.targets`.
    pub fn load(
        ck: &HfCheckpoint,
        base: BaseDtype,
        spec: &LoraSpec,
        init: LoraInit,
        device: &Device,
    ) -> Result<Model> {
        let cfg = ck.config()?;
        let block = cfg
            .arch
            .train
            .as_ref()
            .and_then(|t| t.get("block"))
            .and_then(serde_json::Value::as_str);
        if block != Some("llama") {
            let supported: Vec<&str> = crate::arch::desc::all()
                .iter()
                .filter(|a| a.train.is_some())
                .flat_map(|a| a.classes.iter().map(|c| c.name.as_str()))
                .collect();
            bail!(
                "{}: fine-tuning does not support {} yet (supported: {})",
                cfg.path.display(),
                cfg.class.name,
                supported.join(", ")
            );
        }
        for t in &spec.targets {
            if !ALL_TARGETS.contains(&t.as_str()) {
                bail!(
                    "--targets: unknown module {t:?} (choose from {})",
                    ALL_TARGETS.join(", ")
                );
            }
        }
        let dense = |name: &str| -> Result<Tensor> {
            let (v, shape) = read_f32(ck, name)?;
            Ok(Tensor::from_vec(v, shape, device)?)
        };
        let embed = dense("model.embed_tokens.weight")?;
        let norm = dense("model.norm.weight")?;
        let lm_head_tied = ck.tied();
        let lm_head = Frozen::Dense(if lm_head_tied {
            embed.clone()
        } else {
            dense("lm_head.weight")?
        });
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        let mut module = 0usize;
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let mut proj = Vec::with_capacity(7);
            for short in ALL_TARGETS {
                let path = module_path(l, short);
                let (mut w, shape) = read_f32(ck, &format!("{path}.weight"))?;
                if shape.len() != 2 {
                    bail!("{}: tensor {path}.weight is not 2-D", ck.dir.display());
                }
                let (out, inp) = (shape[0], shape[1]);
                let base_w = match base {
                    BaseDtype::Nf4 => Frozen::Nf4(Arc::new(Nf4Weight::quantize(out, inp, &w))),
                    BaseDtype::Bf16 => {
                        round_bf16(&mut w);
                        Frozen::Dense(Tensor::from_vec(w, (out, inp), device)?)
                    }
                    BaseDtype::F32 => Frozen::Dense(Tensor::from_vec(w, (out, inp), device)?),
                };
                let bias = match ck.get(&format!("{path}.bias")) {
                    Some(_) => Some(dense(&format!("{path}.bias"))?),
                    None => None,
                };
                let lora = if spec.targets.iter().any(|t| t == short) {
                    let r = spec.rank;
                    let (a, b) = match &init {
                        LoraInit::Peft(f) => (f(module, r, inp), vec![0f32; out * r]),
                        LoraInit::Given(f) => f(&path, out, inp)?,
                    };
                    let a = Var::from_tensor(&Tensor::from_vec(a, (r, inp), device)?)?;
                    let b = Var::from_tensor(&Tensor::from_vec(b, (out, r), device)?)?;
                    Some(Lora {
                        a,
                        b,
                        scale: spec.scaling(),
                    })
                } else {
                    None
                };
                proj.push(Proj {
                    path,
                    base: base_w,
                    bias,
                    lora,
                    out,
                    inp,
                });
                module += 1;
            }
            layers.push(Layer {
                input_norm: dense(&format!("{p}.input_layernorm.weight"))?,
                post_norm: dense(&format!("{p}.post_attention_layernorm.weight"))?,
                proj,
            });
        }
        Ok(Model {
            hidden: cfg.hidden_size,
            n_heads: cfg.num_attention_heads,
            n_kv: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            vocab: cfg.vocab_size,
            eps: cfg.rms_norm_eps,
            inv_freq: inv_freq(cfg).with_context(|| "RoPE")?,
            embed,
            layers,
            norm,
            lm_head,
            lm_head_tied,
            device: device.clone(),
        })
    }

    /// Every LoRA module: (HF module path, lora).
    pub fn loras(&self) -> Vec<(&str, &Lora)> {
        self.layers
            .iter()
            .flat_map(|l| l.proj.iter())
            .filter_map(|p| p.lora.as_ref().map(|l| (p.path.as_str(), l)))
            .collect()
    }

    /// Trainable parameters in PEFT key order: `(PEFT key, var)`.
    pub fn trainable(&self) -> Vec<(String, Var)> {
        let mut v = Vec::new();
        for (path, l) in self.loras() {
            v.push((
                format!("base_model.model.{path}.lora_A.weight"),
                l.a.clone(),
            ));
            v.push((
                format!("base_model.model.{path}.lora_B.weight"),
                l.b.clone(),
            ));
        }
        v
    }

    /// Bytes held by frozen base weights.
    pub fn base_bytes(&self) -> usize {
        let t = |x: &Tensor| x.elem_count() * 4;
        let mut n = t(&self.embed)
            + t(&self.norm)
            + match (&self.lm_head, self.lm_head_tied) {
                (Frozen::Dense(w), false) => t(w),
                _ => 0,
            };
        for l in &self.layers {
            n += t(&l.input_norm) + t(&l.post_norm);
            for p in &l.proj {
                n += match &p.base {
                    Frozen::Dense(w) => t(w),
                    Frozen::Nf4(w) => w.bytes(),
                } + p.bias.as_ref().map_or(0, t);
            }
        }
        n
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
        if x.device().is_cpu() {
            let w = w.to_vec1::<f32>()?;
            return x.contiguous()?.apply_op1(RmsNorm { w, eps: self.eps });
        }
        let var = x.sqr()?.mean_keepdim(D::Minus1)?;
        let inv = (var + self.eps)?.sqrt()?.recip()?;
        x.broadcast_mul(&inv)?.broadcast_mul(w)
    }

    /// cos, sin `[t, head_dim]` for positions 0..t (HF: emb = cat(freqs, freqs)).
    /// RoPE's `[t, head_dim]` cos and sin tables.
    fn rope_vecs(&self, t: usize) -> (Vec<f32>, Vec<f32>) {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(t * half * 2);
        let mut sin = Vec::with_capacity(t * half * 2);
        for pos in 0..t {
            let freqs: Vec<f32> = self.inv_freq.iter().map(|f| pos as f32 * f).collect();
            for _ in 0..2 {
                cos.extend(freqs.iter().map(|x| x.cos()));
                sin.extend(freqs.iter().map(|x| x.sin()));
            }
        }
        (cos, sin)
    }

    /// `x [b, h, t, d]`: x·cos + rotate_half(x)·sin.
    fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
        let d = x.dim(D::Minus1)?;
        let x1 = x.narrow(D::Minus1, 0, d / 2)?;
        let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
        let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(cos)? + rot.broadcast_mul(sin)?
    }

    /// Logits `[b, t, vocab]` for token ids `[b, t]` (u32). Causal attention; right padding needs
    /// no extra mask (real tokens never attend to later pads).
    pub fn forward(
        &self,
        ids: &Tensor,
        dropout: Option<&dyn DropoutSource>,
    ) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let n = b * t;
        let (h, kv, hd) = (self.n_heads, self.n_kv, self.head_dim);
        let mut x = self.embed.index_select(&ids.flatten_all()?, 0)?; // [n, hidden]
        let (cos_v, sin_v) = self.rope_vecs(t);
        let (cos, sin) = (
            Tensor::from_slice(&cos_v, (t, cos_v.len() / t.max(1)), &self.device)?,
            Tensor::from_slice(&sin_v, (t, sin_v.len() / t.max(1)), &self.device)?,
        );
        let (cos_v, sin_v) = (Arc::new(cos_v), Arc::new(sin_v));
        let mask: Vec<f32> = (0..t * t)
            .map(|i| {
                if i % t > i / t {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), &self.device)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut module = 0usize;
        for layer in &self.layers {
            let p = &layer.proj;
            let xn = self.rms_norm(&x, &layer.input_norm)?;
            let q = p[0].forward(&xn, module, dropout)?;
            let k = p[1].forward(&xn, module + 1, dropout)?;
            let v = p[2].forward(&xn, module + 2, dropout)?;
            let o = if self.device.is_cpu() {
                let op = RopeAttention {
                    scale: scale as f32,
                    b,
                    t,
                    h,
                    kv,
                    cos: cos_v.clone(),
                    sin: sin_v.clone(),
                };
                q.contiguous()?
                    .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?
            } else {
                let q = q.reshape((b, t, h, hd))?.transpose(1, 2)?.contiguous()?;
                let k = k.reshape((b, t, kv, hd))?.transpose(1, 2)?.contiguous()?;
                let v = v.reshape((b, t, kv, hd))?.transpose(1, 2)?.contiguous()?;
                let q = Self::apply_rope(&q, &cos, &sin)?;
                let k = Self::apply_rope(&k, &cos, &sin)?;
                let (k, v) = if h != kv {
                    let rep = h / kv;
                    let e = |x: &Tensor| {
                        x.unsqueeze(2)?
                            .expand((b, kv, rep, t, hd))?
                            .reshape((b, h, t, hd))
                    };
                    (e(&k)?, e(&v)?)
                } else {
                    (k, v)
                };
                let att = (q.matmul(&k.t()?.contiguous()?)? * scale)?.broadcast_add(&mask)?;
                let att = candle_nn::ops::softmax(&att, D::Minus1)?;
                let o = att.matmul(&v)?; // [b, h, t, hd]
                o.transpose(1, 2)?.reshape((n, h * hd))?
            };
            let o = p[3].forward(&o, module + 3, dropout)?;
            x = (x + o)?;
            let xn = self.rms_norm(&x, &layer.post_norm)?;
            let g = p[4].forward(&xn, module + 4, dropout)?;
            let u = p[5].forward(&xn, module + 5, dropout)?;
            let act = if self.device.is_cpu() {
                g.contiguous()?.apply_op2(&u.contiguous()?, SwiGlu)?
            } else {
                (g.silu()? * u)?
            };
            let m = p[6].forward(&act, module + 6, dropout)?;
            x = (x + m)?;
            module += 7;
        }
        let x = self.rms_norm(&x, &self.norm)?;
        let logits = self.lm_head.forward(&x)?;
        logits.reshape((b, t, self.vocab))
    }
}

/// RMSNorm with a frozen weight, `w · x / sqrt(mean(x²) + eps)` per row, the mean of squares
/// accumulated in f64 (candle's running f32 sum over a row loses ~1e-6 relative, which 60 norms
/// compound into gradients visibly less exact than torch's), backward to `x` only.
struct RmsNorm {
    w: Vec<f32>,
    eps: f64,
}

impl RmsNorm {
    fn inv_rms(&self, row: &[f32]) -> f64 {
        let ss: f64 = row.iter().map(|&v| (v as f64) * (v as f64)).sum();
        1.0 / (ss / row.len() as f64 + self.eps).sqrt()
    }
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, d) = cpu_rows(storage, layout)?;
        if d != self.w.len() {
            candle_core::bail!("rms-norm: rows of {d}, weight of {}", self.w.len());
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .for_each(|(o, row)| {
                let r = self.inv_rms(row) as f32;
                for ((oj, &xj), &wj) in o.iter_mut().zip(row).zip(&self.w) {
                    *oj = wj * (xj * r);
                }
            });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let d = self.w.len();
        let x = arg.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let g = grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d).zip(g.par_chunks(d)))
            .for_each(|(o, (row, gr))| {
                let r = self.inv_rms(row);
                // y = w·x·r, r = (mean(x²)+eps)^-1/2:  dx = r·(g·w) − x·r³·mean((g·w)·x)
                let dot: f64 = gr
                    .iter()
                    .zip(&self.w)
                    .zip(row)
                    .map(|((&gj, &wj), &xj)| (gj as f64) * (wj as f64) * (xj as f64))
                    .sum();
                let c = r * r * r * dot / d as f64;
                for (((oj, &gj), &wj), &xj) in o.iter_mut().zip(gr).zip(&self.w).zip(row) {
                    *oj = (r * (gj as f64) * (wj as f64) - (xj as f64) * c) as f32;
                }
            });
        Ok(Some(Tensor::from_vec(out, arg.shape(), arg.device())?))
    }
}

/// Summed cross-entropy over the shifted labels (position i predicts label i+1; −100 ignored),
/// divided by `n_items` (the number of trained tokens of the whole optimizer step, as
/// transformers' `num_items_in_batch`). `labels` is `[b, t]` i64.
///
/// On the CPU the per-row negative log-likelihood is one custom op: the log-sum-exp over the
/// vocabulary accumulated in f64 (a plain f32 running sum over ~50k terms is off by ~1e-5
/// relative, which the softmax − one-hot cancellation of well-predicted tokens magnifies in the
/// gradients), and a backward `g·(softmax − onehot)` written directly, keeping no
/// vocabulary-sized intermediates in the graph.
pub fn causal_lm_loss(
    logits: &Tensor,
    labels: &[Vec<i64>],
    n_items: usize,
) -> candle_core::Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    let mut tgt: Vec<Option<u32>> = Vec::with_capacity(b * t);
    for row in labels {
        for i in 0..t {
            let l = if i + 1 < t { row[i + 1] } else { -100 };
            tgt.push((l >= 0).then_some(l as u32));
        }
    }
    if let Some(&bad) = tgt.iter().flatten().find(|&&x| x as usize >= v) {
        candle_core::bail!("label {bad} is outside the vocabulary of {v}");
    }
    let flat = logits.reshape((b * t, v))?;
    let nll = if logits.device().is_cpu() {
        flat.contiguous()?
            .apply_op1(CrossEntropy { targets: tgt })?
    } else {
        let dev = logits.device();
        let idx: Vec<u32> = tgt.iter().map(|x| x.unwrap_or(0)).collect();
        let msk: Vec<f32> = tgt
            .iter()
            .map(|x| if x.is_some() { 1.0 } else { 0.0 })
            .collect();
        let idx = Tensor::from_vec(idx, (b * t, 1), dev)?;
        let msk = Tensor::from_vec(msk, b * t, dev)?;
        let lsm = candle_nn::ops::log_softmax(&flat, D::Minus1)?;
        (lsm.gather(&idx, 1)?.squeeze(1)?.neg()? * msk)?
    };
    nll.sum_all()?.affine(1.0 / n_items.max(1) as f64, 0.0)
}

/// Per-row `logsumexp(x) − x[target]` (0 for rows without a target).
struct CrossEntropy {
    targets: Vec<Option<u32>>,
}

/// `(max, ln Σ exp(x − max))` of a row, the sum in f64.
fn row_lse(x: &[f32]) -> (f32, f64) {
    let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let s: f64 = x.iter().map(|&xi| (xi - m).exp() as f64).sum();
    (m, s.ln())
}

fn cpu_rows<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
) -> candle_core::Result<(&'a [f32], usize)> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("cross-entropy: logits must be f32");
    };
    let (_, v) = layout.shape().dims2()?;
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok((&data[a..b], v)),
        None => candle_core::bail!("cross-entropy: logits must be contiguous"),
    }
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, v) = cpu_rows(storage, layout)?;
        let out: Vec<f32> = x
            .par_chunks(v)
            .zip(self.targets.par_iter())
            .map(|(row, t)| match t {
                None => 0.0,
                Some(t) => {
                    let (m, lse) = row_lse(row);
                    (lse - (row[*t as usize] - m) as f64) as f32
                }
            })
            .collect();
        let n = out.len();
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (n, v) = arg.dims2()?;
        let x = arg.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let g = grad.contiguous()?.to_vec1::<f32>()?;
        let mut out = vec![0f32; n * v];
        out.par_chunks_mut(v)
            .zip(x.par_chunks(v))
            .zip(self.targets.par_iter().zip(g.par_iter()))
            .for_each(|((o, row), (t, &gi))| {
                let Some(t) = t else { return };
                let (m, lse) = row_lse(row);
                for (oj, &xj) in o.iter_mut().zip(row) {
                    *oj = gi * (((xj - m) as f64 - lse) as f32).exp();
                }
                o[*t as usize] -= gi;
            });
        Ok(Some(Tensor::from_vec(out, (n, v), arg.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    fn tiny() -> HfCheckpoint {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny-llama");
        HfCheckpoint::open(&dir).unwrap()
    }

    fn spec(targets: &[&str]) -> LoraSpec {
        LoraSpec {
            rank: 4,
            alpha: 8.0,
            rslora: false,
            dropout: 0.0,
            targets: targets.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// A and B both non-zero, so every LoRA tensor has a non-zero gradient.
    fn both_nonzero(path: &str, out: usize, inp: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let h = path.len() as f32;
        let a = (0..4 * inp)
            .map(|i| ((i as f32 * 0.37 + h).sin()) * 0.05)
            .collect();
        let b = (0..out * 4)
            .map(|i| ((i as f32 * 0.11 + h).cos()) * 0.05)
            .collect();
        Ok((a, b))
    }

    fn ids(b: usize, t: usize) -> Tensor {
        let v: Vec<u32> = (0..b * t).map(|i| ((i * 37 + 11) % 500) as u32).collect();
        Tensor::from_vec(v, (b, t), &Device::Cpu).unwrap()
    }

    #[test]
    fn every_lora_parameter_gets_a_gradient() {
        let ck = tiny();
        for base in [BaseDtype::Nf4, BaseDtype::F32] {
            let m = Model::load(
                &ck,
                base,
                &spec(&ALL_TARGETS),
                LoraInit::Given(&both_nonzero),
                &Device::Cpu,
            )
            .unwrap();
            let params = m.trainable();
            assert_eq!(params.len(), 2 * 7 * 2);
            let logits = m.forward(&ids(2, 9), None).unwrap();
            let labels: Vec<Vec<i64>> = (0..2)
                .map(|r| {
                    (0..9)
                        .map(|i| {
                            if i < 3 {
                                -100
                            } else {
                                ((r * 9 + i) * 5 % 500) as i64
                            }
                        })
                        .collect()
                })
                .collect();
            let loss = causal_lm_loss(&logits, &labels, 12).unwrap();
            let g = loss.backward().unwrap();
            for (k, v) in &params {
                let gr = g
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("{base:?}: no gradient for {k}"));
                let n = gr
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(n > 0.0 && n.is_finite(), "{base:?}: gradient of {k} is {n}");
            }
        }
    }

    #[test]
    fn masked_loss_matches_a_hand_computation() {
        // logits [1, 4, 3]; labels: position 0 unused (shift), 1 ignored, 2 → class 2, 3 → class 0
        let lg: Vec<f32> = vec![0.5, -1.0, 2.0, 1.0, 0.0, -0.5, 0.3, 0.3, 0.9, 3.0, 1.0, 0.0];
        let logits = Tensor::from_vec(lg.clone(), (1, 4, 3), &Device::Cpu).unwrap();
        let labels = vec![vec![7, -100, 2, 0]];
        // shifted: position 0 predicts labels[1] (ignored), position 1 predicts 2, position 2 predicts 0
        let lse = |r: &[f32]| r.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
        let nll1 = lse(&lg[3..6]) - lg[3 + 2] as f64;
        let nll2 = lse(&lg[6..9]) - lg[6] as f64;
        let want = (nll1 + nll2) / 2.0;
        let got = causal_lm_loss(&logits, &labels, 2)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        // normalised by the step's token count, not this batch's
        let got5 = causal_lm_loss(&logits, &labels, 5)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        assert!((got5 - want * 2.0 / 5.0).abs() < 1e-6);
    }

    #[test]
    fn nf4_linear_matches_its_dequantized_weight_forward_and_backward() {
        let (out, inp, n) = (70, 192, 5);
        let w: Vec<f32> = (0..out * inp)
            .map(|i| ((i as f32) * 0.731).sin() * 0.1)
            .collect();
        let q = Arc::new(Nf4Weight::quantize(out, inp, &w));
        let dq = Tensor::from_vec(q.dequantize(), (out, inp), &Device::Cpu).unwrap();
        let xv: Vec<f32> = (0..n * inp).map(|i| ((i as f32) * 0.17).cos()).collect();
        let x = Var::from_vec(xv, (n, inp), &Device::Cpu).unwrap();
        let y = Frozen::Nf4(q.clone()).forward(x.as_tensor()).unwrap();
        let y_ref = x.as_tensor().matmul(&dq.t().unwrap()).unwrap();
        let d = (&y - &y_ref)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-4, "forward differs by {d}");
        let g = y.sum_all().unwrap().backward().unwrap();
        let gx = g.get(x.as_tensor()).unwrap();
        let g_ref = Tensor::ones((n, out), DType::F32, &Device::Cpu)
            .unwrap()
            .matmul(&dq)
            .unwrap();
        let d = (gx - g_ref)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-4, "backward differs by {d}");
        // ~4.1 bits per weight (codes + double-quantized statistics)
        assert!(q.bytes() * 8 < out * inp * 5);
    }

    #[test]
    fn zero_b_leaves_the_base_model_unchanged() {
        let ck = tiny();
        let peft = |_: usize, r: usize, inp: usize| vec![0.01f32; r * inp];
        let with = Model::load(
            &ck,
            BaseDtype::F32,
            &spec(&ALL_TARGETS),
            LoraInit::Peft(&peft),
            &Device::Cpu,
        )
        .unwrap();
        let without = Model::load(
            &ck,
            BaseDtype::F32,
            &spec(&[]),
            LoraInit::Peft(&peft),
            &Device::Cpu,
        )
        .unwrap();
        let a = with.forward(&ids(1, 6), None).unwrap();
        let b = without.forward(&ids(1, 6), None).unwrap();
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0);
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Mask values for the fused-op test: 0 or 1/(1-p) with p = 0.25.
    struct EveryFifth;
    impl DropoutSource for EveryFifth {
        fn mask(&self, module: usize, len: usize) -> Option<Vec<f32>> {
            Some(
                (0..len)
                    .map(|i| {
                        if (i + module).is_multiple_of(5) {
                            0.0
                        } else {
                            4.0 / 3.0
                        }
                    })
                    .collect(),
            )
        }
    }

    #[test]
    fn fused_lora_projection_has_the_values_and_gradients_of_its_composition() {
        let (out, inp, n, r) = (70, 192, 7, 4);
        let dev = Device::Cpu;
        let w: Vec<f32> = (0..out * inp)
            .map(|i| ((i as f32) * 0.731).sin() * 0.1)
            .collect();
        let q = Arc::new(Nf4Weight::quantize(out, inp, &w));
        let dense = Tensor::from_vec(q.dequantize(), (out, inp), &dev).unwrap();
        for (base, dropout) in [
            (Frozen::Nf4(q.clone()), true),
            (Frozen::Dense(dense.clone()), false),
        ] {
            let seq = |k: usize, f: f32| -> Vec<f32> {
                (0..k).map(|i| ((i as f32) * f).sin() * 0.3).collect()
            };
            let x = Var::from_vec(seq(n * inp, 0.17), (n, inp), &dev).unwrap();
            let a = Var::from_vec(seq(r * inp, 0.29), (r, inp), &dev).unwrap();
            let b = Var::from_vec(seq(out * r, 0.41), (out, r), &dev).unwrap();
            let proj = Proj {
                path: "p".into(),
                base,
                bias: None,
                lora: Some(Lora {
                    a: a.clone(),
                    b: b.clone(),
                    scale: 2.5,
                }),
                out,
                inp,
            };
            let drop: Option<&dyn DropoutSource> = if dropout { Some(&EveryFifth) } else { None };
            let y = proj.forward(x.as_tensor(), 3, drop).unwrap();
            // the composition: x Wᵀ + ((x ⊙ m) Aᵀ) Bᵀ · s from plain candle ops
            let xin = match drop.and_then(|d| d.mask(3, n * inp)) {
                Some(m) => (x.as_tensor() * Tensor::from_vec(m, (n, inp), &dev).unwrap()).unwrap(),
                None => x.as_tensor().clone(),
            };
            let lora = xin
                .matmul(&a.as_tensor().t().unwrap())
                .unwrap()
                .matmul(&b.as_tensor().t().unwrap())
                .unwrap()
                .affine(2.5, 0.0)
                .unwrap();
            let y_ref = (x.as_tensor().matmul(&dense.t().unwrap()).unwrap() + lora).unwrap();
            assert!(max_diff(&y, &y_ref) < 1e-5, "forward");
            // a loss that weighs every output differently
            let wts = Tensor::from_vec(seq(n * out, 0.07), (n, out), &dev).unwrap();
            let g = (&y * &wts).unwrap().sum_all().unwrap().backward().unwrap();
            let g_ref = (&y_ref * &wts)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (name, v) in [("x", &x), ("A", &a), ("B", &b)] {
                let (got, want) = (
                    g.get(v.as_tensor()).unwrap(),
                    g_ref.get(v.as_tensor()).unwrap(),
                );
                let scale = want
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(
                    max_diff(got, want) <= 1e-5 * scale.max(1.0),
                    "gradient of {name}: {} (scale {scale})",
                    max_diff(got, want)
                );
            }
        }
    }

    #[test]
    fn fused_attention_has_the_values_and_gradients_of_its_composition() {
        let dev = Device::Cpu;
        for (b, h, kv, t, d) in [(2, 6, 2, 7, 12), (1, 3, 3, 9, 16)] {
            let n = b * t;
            let seq = |k: usize, f: f32| -> Vec<f32> {
                (0..k).map(|i| ((i as f32) * f).sin() * 0.8).collect()
            };
            // RoPE tables as the model makes them
            let half = d / 2;
            let (mut cos, mut sin) = (vec![], vec![]);
            for pos in 0..t {
                for _ in 0..2 {
                    for f in 0..half {
                        let a = pos as f32 * (1.0 / 10000f32.powf(2.0 * f as f32 / d as f32));
                        cos.push(a.cos());
                        sin.push(a.sin());
                    }
                }
            }
            let q = Var::from_vec(seq(n * h * d, 0.37), (n, h * d), &dev).unwrap();
            let k = Var::from_vec(seq(n * kv * d, 0.53), (n, kv * d), &dev).unwrap();
            let v = Var::from_vec(seq(n * kv * d, 0.71), (n, kv * d), &dev).unwrap();
            let scale = 1.0 / (d as f64).sqrt();
            let op = RopeAttention {
                scale: scale as f32,
                b,
                t,
                h,
                kv,
                cos: Arc::new(cos.clone()),
                sin: Arc::new(sin.clone()),
            };
            let o = q
                .as_tensor()
                .apply_op3(k.as_tensor(), v.as_tensor(), op)
                .unwrap();
            // the composition the model uses off the CPU
            let (ct, st) = (
                Tensor::from_vec(cos, (t, d), &dev).unwrap(),
                Tensor::from_vec(sin, (t, d), &dev).unwrap(),
            );
            let heads = |x: &Tensor, nh: usize| {
                x.reshape((b, t, nh, d))
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .contiguous()
                    .unwrap()
            };
            let qr = Model::apply_rope(&heads(q.as_tensor(), h), &ct, &st).unwrap();
            let kr = Model::apply_rope(&heads(k.as_tensor(), kv), &ct, &st).unwrap();
            let vh = heads(v.as_tensor(), kv);
            let rep = h / kv;
            let e = |x: &Tensor| {
                x.unsqueeze(2)
                    .unwrap()
                    .expand((b, kv, rep, t, d))
                    .unwrap()
                    .reshape((b, h, t, d))
                    .unwrap()
            };
            let mask: Vec<f32> = (0..t * t)
                .map(|i| {
                    if i % t > i / t {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
                .collect();
            let mask = Tensor::from_vec(mask, (t, t), &dev).unwrap();
            let att = (qr
                .matmul(&e(&kr).t().unwrap().contiguous().unwrap())
                .unwrap()
                * scale)
                .unwrap()
                .broadcast_add(&mask)
                .unwrap();
            let att = candle_nn::ops::softmax(&att, D::Minus1).unwrap();
            let o_ref = att
                .matmul(&e(&vh))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .reshape((n, h * d))
                .unwrap();
            assert!(
                max_diff(&o, &o_ref) < 1e-5,
                "forward {}",
                max_diff(&o, &o_ref)
            );
            let wts = Tensor::from_vec(seq(n * h * d, 0.13), (n, h * d), &dev).unwrap();
            let g = (&o * &wts).unwrap().sum_all().unwrap().backward().unwrap();
            let g_ref = (&o_ref * &wts)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                let (got, want) = (
                    g.get(x.as_tensor()).unwrap(),
                    g_ref.get(x.as_tensor()).unwrap(),
                );
                assert!(
                    max_diff(got, want) < 1e-5,
                    "gradient of {name}: {}",
                    max_diff(got, want)
                );
            }
        }
    }

    #[test]
    fn fused_swiglu_has_the_values_and_gradients_of_its_composition() {
        let dev = Device::Cpu;
        let n = 5 * 37;
        let seq = |f: f32| -> Vec<f32> { (0..n).map(|i| ((i as f32) * f).sin() * 6.0).collect() };
        let g = Var::from_vec(seq(0.37), (5, 37), &dev).unwrap();
        let u = Var::from_vec(seq(0.53), (5, 37), &dev).unwrap();
        let y = g.as_tensor().apply_op2(u.as_tensor(), SwiGlu).unwrap();
        let y_ref = (g.as_tensor().silu().unwrap() * u.as_tensor()).unwrap();
        assert_eq!(max_diff(&y, &y_ref), 0.0);
        let wts = Tensor::from_vec(seq(0.11), (5, 37), &dev).unwrap();
        let gr = (&y * &wts).unwrap().sum_all().unwrap().backward().unwrap();
        let gr_ref = (&y_ref * &wts)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, x) in [("gate", &g), ("up", &u)] {
            let d = max_diff(
                gr.get(x.as_tensor()).unwrap(),
                gr_ref.get(x.as_tensor()).unwrap(),
            );
            assert!(d < 1e-6, "gradient of {name}: {d}");
        }
    }

    #[test]
    fn custom_loss_and_norm_ops_have_the_gradients_of_their_compositions() {
        let dev = Device::Cpu;
        let (b, t, v) = (2, 5, 37);
        let lg: Vec<f32> = (0..b * t * v)
            .map(|i| ((i as f32) * 0.377).sin() * 3.0)
            .collect();
        let labels = vec![vec![1, 5, -100, 7, 36], vec![0, -100, 2, 3, -100]];
        // cross-entropy op vs log_softmax + gather
        let x = Var::from_vec(lg.clone(), (b, t, v), &dev).unwrap();
        let ours = causal_lm_loss(x.as_tensor(), &labels, 4).unwrap();
        let g_ours = ours.backward().unwrap().get(x.as_tensor()).unwrap().clone();
        let y = Var::from_vec(lg, (b, t, v), &dev).unwrap();
        let flat = y.as_tensor().reshape((b * t, v)).unwrap();
        let tgt: Vec<u32> = labels
            .iter()
            .flat_map(|r| {
                (0..t)
                    .map(|i| {
                        if i + 1 < t && r[i + 1] >= 0 {
                            r[i + 1] as u32
                        } else {
                            0
                        }
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        let msk: Vec<f32> = labels
            .iter()
            .flat_map(|r| {
                (0..t)
                    .map(|i| if i + 1 < t && r[i + 1] >= 0 { 1.0 } else { 0.0 })
                    .collect::<Vec<_>>()
            })
            .collect();
        let lsm = candle_nn::ops::log_softmax(&flat, D::Minus1).unwrap();
        let picked = lsm
            .gather(&Tensor::from_vec(tgt, (b * t, 1), &dev).unwrap(), 1)
            .unwrap()
            .squeeze(1)
            .unwrap();
        let want = (picked * Tensor::from_vec(msk, b * t, &dev).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .affine(-0.25, 0.0)
            .unwrap();
        let g_want = want.backward().unwrap().get(y.as_tensor()).unwrap().clone();
        assert!(max_diff(&ours, &want) < 1e-5);
        assert!(
            max_diff(&g_ours, &g_want) < 1e-6,
            "{}",
            max_diff(&g_ours, &g_want)
        );
        // RMSNorm op vs x·w/sqrt(mean(x²)+eps)
        let xs: Vec<f32> = (0..6 * 16)
            .map(|i| ((i as f32) * 0.91).cos() * 2.0)
            .collect();
        let w = Tensor::from_vec(
            (0..16).map(|i| 0.5 + i as f32 * 0.1).collect::<Vec<f32>>(),
            16,
            &dev,
        )
        .unwrap();
        let m = Model {
            hidden: 16,
            n_heads: 1,
            n_kv: 1,
            head_dim: 16,
            vocab: 1,
            eps: 1e-5,
            inv_freq: vec![],
            embed: w.clone(),
            layers: vec![],
            norm: w.clone(),
            lm_head: Frozen::Dense(w.clone()),
            lm_head_tied: true,
            device: dev.clone(),
        };
        let a = Var::from_vec(xs.clone(), (6, 16), &dev).unwrap();
        let ya = m.rms_norm(a.as_tensor(), &w).unwrap();
        let coef = Tensor::from_vec(
            (0..96)
                .map(|i| (i as f32 * 0.13).sin())
                .collect::<Vec<f32>>(),
            (6, 16),
            &dev,
        )
        .unwrap();
        let ga = (&ya * &coef)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
            .get(a.as_tensor())
            .unwrap()
            .clone();
        let c = Var::from_vec(xs, (6, 16), &dev).unwrap();
        let ct = c.as_tensor();
        let inv = (ct.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + 1e-5)
            .unwrap()
            .sqrt()
            .unwrap()
            .recip()
            .unwrap();
        let yc = ct.broadcast_mul(&inv).unwrap().broadcast_mul(&w).unwrap();
        let gc = (&yc * &coef)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
            .get(ct)
            .unwrap()
            .clone();
        assert!(max_diff(&ya, &yc) < 1e-5);
        assert!(max_diff(&ga, &gc) < 1e-5, "{}", max_diff(&ga, &gc));
    }
}
