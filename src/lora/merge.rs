//! Merging PEFT adapters into base weights exactly as `merge_and_unload` does
//! (nf4-peft.md §2, decisions.md "Merge"):
//!
//! * Linear / Conv1D: `W' = dtype(f32(W) + (B @ A) * s)` — one rounding; Conv1D
//!   (`fan_in_fan_out`) adds the transposed delta.
//! * Embedding: `W' = dtype(f32(W) + f32(dtype((B @ A)^T * s)))` — the delta is rounded first.
//! * DoRA: `V = f32(W) + delta`, `W' = dtype((m / ‖V‖) * V)` with one norm per output feature
//!   (rows of a Linear weight, columns of a Conv1D / Embedding weight).
//! * IA³: `W' = dtype(W * l)` over output rows (or input columns for feedforward modules).
//! * Several adapters: PEFT's `cat` combination, `B_cat @ A_cat` with `A_i` scaled by
//!   `w_i` then `s_i` (decisions.md: W + Σ wᵢ·sᵢ·BᵢAᵢ).
//!
//! Full copies stored in an adapter replace base tensors before any delta is applied.
//! Everything is computed per tensor, row by row, from memory-mapped inputs.

use super::adapter::{Adapter, ModuleTensors, PREFIX, PeftType};
use crate::checkpoint::{HfCheckpoint, TensorRef};
use crate::gpu::{self, LoraMode, MergeStep};
use crate::plan::{RowSource, SafetensorsRows};
use crate::quant::fp;
use anyhow::{Result, anyhow, bail};
use safetensors::Dtype;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

// ------------------------------------------------------------------ numbers

/// The floating dtype a merged tensor is stored in (what PEFT rounds to).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FloatType {
    F32,
    F16,
    BF16,
}

impl FloatType {
    pub fn of(d: Dtype) -> Option<FloatType> {
        match d {
            Dtype::F32 => Some(FloatType::F32),
            Dtype::F16 => Some(FloatType::F16),
            Dtype::BF16 => Some(FloatType::BF16),
            _ => None,
        }
    }

    pub fn dtype(self) -> Dtype {
        match self {
            FloatType::F32 => Dtype::F32,
            FloatType::F16 => Dtype::F16,
            FloatType::BF16 => Dtype::BF16,
        }
    }

    /// The name transformers writes in config.json (`torch_dtype` / `dtype`).
    pub fn torch_name(self) -> &'static str {
        match self {
            FloatType::F32 => "float32",
            FloatType::F16 => "float16",
            FloatType::BF16 => "bfloat16",
        }
    }

    pub fn parse(s: &str) -> Option<FloatType> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "fp32" => Some(FloatType::F32),
            "f16" | "float16" | "fp16" | "half" => Some(FloatType::F16),
            "bf16" | "bfloat16" => Some(FloatType::BF16),
            _ => None,
        }
    }

    /// Round every value to this type (RNE) and back to f32.
    pub fn round(self, x: &mut [f32]) {
        match self {
            FloatType::F32 => {}
            FloatType::F16 => fp::round_through_f16(x),
            FloatType::BF16 => fp::round_through_bf16(x),
        }
    }

    /// The GPU kernels' dtype code.
    pub fn gpu_dtype(self) -> gpu::Dtype {
        match self {
            FloatType::F32 => gpu::Dtype::F32,
            FloatType::F16 => gpu::Dtype::F16,
            FloatType::BF16 => gpu::Dtype::BF16,
        }
    }

    pub fn round1(self, x: f32) -> f32 {
        let mut v = [x];
        self.round(&mut v);
        v[0]
    }
}

/// How the base weight is laid out relative to the LoRA matrices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `nn.Linear`: W is [out, in], delta = B @ A.
    Linear,
    /// GPT-2 `Conv1D` (`fan_in_fan_out`): W is [in, out], delta = (B @ A)^T.
    Conv1D,
    /// `nn.Embedding`: W is [vocab, dim], A is [r, vocab], B is [dim, r], delta = (B @ A)^T.
    Embedding,
}

impl Layout {
    /// The delta is added transposed (W's rows are the LoRA input side).
    pub fn transposed(self) -> bool {
        !matches!(self, Layout::Linear)
    }

    pub fn name(self) -> &'static str {
        match self {
            Layout::Linear => "linear",
            Layout::Conv1D => "conv1d",
            Layout::Embedding => "embedding",
        }
    }
}

/// One adapter's LoRA matrices for a module, upcast to f32.
#[derive(Clone, Debug)]
pub struct LoraTerm {
    /// [r, a_cols] row-major (`lora_A` / `lora_embedding_A`).
    pub a: Vec<f32>,
    /// [b_rows, r] row-major (`lora_B` / `lora_embedding_B`).
    pub b: Vec<f32>,
    pub r: usize,
    /// alpha / r or alpha / sqrt(r), as f32.
    pub scaling: f32,
    /// Combination weight.
    pub weight: f32,
}

impl LoraTerm {
    fn a_cols(&self) -> usize {
        self.a.len() / self.r
    }
    fn b_rows(&self) -> usize {
        self.b.len() / self.r
    }
}

/// A low-rank delta in the base weight's layout: row `i` of the delta is
/// `post_scale * Σ_k coef[i, k] * mat[k, :]` (sum over k in order, f32).
#[derive(Clone, Debug)]
pub struct LoraDelta {
    /// [rows, r]
    coef: Vec<f32>,
    /// [r, cols]
    mat: Vec<f32>,
    r: usize,
    pub rows: usize,
    pub cols: usize,
    post_scale: f32,
}

impl LoraDelta {
    /// The delta of one or several adapters on one module. One adapter of weight 1 is
    /// `(B @ A) * s` (Linear.get_delta_weight); anything else is PEFT's `cat` combination:
    /// `A_cat = [(A_1 * w_1) * s_1; …]`, `B_cat = [B_1 | …]`, delta = `B_cat @ A_cat` (scaling 1).
    pub fn new(layout: Layout, terms: &[LoraTerm]) -> LoraDelta {
        assert!(!terms.is_empty());
        let single = terms.len() == 1 && terms[0].weight == 1.0;
        let r: usize = terms.iter().map(|t| t.r).sum();
        let a_cols = terms[0].a_cols();
        let b_rows = terms[0].b_rows();
        // A_cat [r, a_cols], B_cat [b_rows, r]
        let mut a_cat = Vec::with_capacity(r * a_cols);
        let mut b_cat = vec![0f32; b_rows * r];
        let mut k0 = 0;
        for t in terms {
            if single {
                a_cat.extend_from_slice(&t.a);
            } else {
                a_cat.extend(t.a.iter().map(|&x| (x * t.weight) * t.scaling));
            }
            for o in 0..b_rows {
                b_cat[o * r + k0..o * r + k0 + t.r].copy_from_slice(&t.b[o * t.r..(o + 1) * t.r]);
            }
            k0 += t.r;
        }
        let post_scale = if single { terms[0].scaling } else { 1.0 };
        if layout.transposed() {
            // rows of W are A's columns: coef = A^T [a_cols, r], mat = B^T [r, b_rows]
            LoraDelta {
                coef: transpose(&a_cat, r, a_cols),
                mat: transpose(&b_cat, b_rows, r),
                r,
                rows: a_cols,
                cols: b_rows,
                post_scale,
            }
        } else {
            LoraDelta {
                coef: b_cat,
                mat: a_cat,
                r,
                rows: b_rows,
                cols: a_cols,
                post_scale,
            }
        }
    }

    /// The delta in the GPU kernels' form (rows `rows`; see `gpu::MergeStep::Lora`).
    pub fn gpu_step(&self, rows: std::ops::Range<usize>, mode: LoraMode) -> MergeStep<'_> {
        MergeStep::Lora {
            coef: &self.coef[rows.start * self.r..rows.end * self.r],
            mat: &self.mat,
            r: self.r,
            post_scale: self.post_scale,
            mode,
        }
    }

    /// Row `i` of the scaled delta (in the base weight's layout).
    pub fn row(&self, i: usize, out: &mut [f32]) {
        debug_assert_eq!(out.len(), self.cols);
        out.fill(0.0);
        let c = &self.coef[i * self.r..(i + 1) * self.r];
        for (k, &ck) in c.iter().enumerate() {
            axpy_fma(ck, &self.mat[k * self.cols..(k + 1) * self.cols], out);
        }
        if self.post_scale != 1.0 {
            for o in out.iter_mut() {
                *o *= self.post_scale;
            }
        }
    }
}

/// `out[j] = fma(c, m[j], out[j])`: the matmul's sum over the rank, one fused multiply-add
/// per step in k order — what torch's CPU sgemm (MKL) does for LoRA ranks (checked bit for
/// bit against `B @ A`); a plain multiply-then-add differs in the last f32 bit about half
/// the time. FMA is exactly rounded, so the vector and scalar paths give the same bits.
#[inline]
fn axpy_fma(c: f32, m: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("fma") && std::arch::is_x86_feature_detected!("avx2")
        {
            // SAFETY: the CPU supports the features the function is compiled for.
            unsafe { axpy_fma_avx2(c, m, out) };
            return;
        }
    }
    for (o, &mv) in out.iter_mut().zip(m) {
        *o = c.mul_add(mv, *o);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn axpy_fma_avx2(c: f32, m: &[f32], out: &mut [f32]) {
    for (o, &mv) in out.iter_mut().zip(m) {
        *o = c.mul_add(mv, *o);
    }
}

fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; x.len()];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = x[i * cols + j];
        }
    }
    t
}

/// One merge step on a tensor, ready to apply row by row.
#[derive(Clone, Debug)]
pub enum Op {
    /// Linear / Conv1D LoRA: `W + delta`, rounded once.
    Add(LoraDelta),
    /// Embedding LoRA: `W + dtype(delta)`.
    AddRounded(LoraDelta),
    /// DoRA: `(m / ‖W + delta‖) * (W + delta)`, the norm per row or per column.
    Dora {
        delta: LoraDelta,
        magnitude: Vec<f32>,
        per_column: bool,
    },
    /// A 1-D (or broadcast) addition: `lora_bias` (`bias + lora_B.bias * s`).
    AddVec(Vec<f32>),
    /// IA³: multiply rows (`per_row`) or columns by `l`.
    Scale { l: Vec<f32>, per_row: bool },
}

impl Op {
    fn needs_column_norms(&self) -> bool {
        matches!(
            self,
            Op::Dora {
                per_column: true,
                ..
            }
        )
    }

    /// `V = x + delta` for DoRA (no rounding).
    fn dora_v(delta: &LoraDelta, i: usize, x: &mut [f32], tmp: &mut [f32]) {
        delta.row(i, tmp);
        for (v, d) in x.iter_mut().zip(tmp.iter()) {
            *v += *d;
        }
    }

    /// Apply to row `i` (values already in the tensor's dtype); the result is rounded to `ty`.
    /// `norms` are the column norms of a per-column DoRA step.
    pub fn apply_row(
        &self,
        i: usize,
        x: &mut [f32],
        ty: FloatType,
        norms: Option<&[f32]>,
        tmp: &mut Vec<f32>,
    ) {
        tmp.resize(x.len(), 0.0);
        match self {
            Op::Add(d) => {
                d.row(i, tmp);
                for (v, dv) in x.iter_mut().zip(tmp.iter()) {
                    *v += *dv;
                }
            }
            Op::AddRounded(d) => {
                d.row(i, tmp);
                ty.round(tmp);
                for (v, dv) in x.iter_mut().zip(tmp.iter()) {
                    *v += *dv;
                }
            }
            Op::Dora {
                delta,
                magnitude,
                per_column,
            } => {
                Self::dora_v(delta, i, x, tmp);
                if *per_column {
                    let n = norms.expect("column norms");
                    for ((v, m), nj) in x.iter_mut().zip(magnitude).zip(n) {
                        *v *= *m / *nj;
                    }
                } else {
                    let f = magnitude[i] / l2_norm(x);
                    for v in x.iter_mut() {
                        *v *= f;
                    }
                }
            }
            Op::AddVec(add) => {
                for (v, a) in x.iter_mut().zip(add) {
                    *v += *a;
                }
            }
            Op::Scale { l, per_row } => {
                if *per_row {
                    let s = l[i];
                    for v in x.iter_mut() {
                        *v *= s;
                    }
                } else {
                    for (v, s) in x.iter_mut().zip(l) {
                        *v *= *s;
                    }
                }
            }
        }
        ty.round(x);
    }
}

impl Op {
    /// This step on rows `rows` of the tensor, as GPU merge steps (DoRA is two); `norms`
    /// are the column norms of a per-column DoRA step.
    pub fn gpu_steps<'a>(
        &'a self,
        rows: std::ops::Range<usize>,
        norms: Option<&'a [f32]>,
        out: &mut Vec<MergeStep<'a>>,
    ) -> Result<()> {
        match self {
            Op::Add(d) => out.push(d.gpu_step(rows, LoraMode::Add)),
            Op::AddRounded(d) => out.push(d.gpu_step(rows, LoraMode::AddRounded)),
            Op::Dora {
                delta,
                magnitude,
                per_column,
            } => {
                out.push(delta.gpu_step(rows.clone(), LoraMode::DoraV));
                out.push(if *per_column {
                    MergeStep::DoraCols {
                        magnitude,
                        norms: norms.ok_or_else(|| anyhow!("internal: no DoRA column norms"))?,
                    }
                } else {
                    MergeStep::DoraRows {
                        magnitude: &magnitude[rows],
                    }
                });
            }
            Op::AddVec(v) => out.push(MergeStep::AddVec(v)),
            Op::Scale { l, per_row: true } => out.push(MergeStep::ScaleRows(&l[rows])),
            Op::Scale { l, per_row: false } => out.push(MergeStep::ScaleCols(l)),
        }
        Ok(())
    }
}

/// ‖x‖₂ as torch.linalg.norm returns it for f32 (accumulated wider, rounded to f32).
pub fn l2_norm(x: &[f32]) -> f32 {
    x.iter()
        .map(|&v| (v as f64) * (v as f64))
        .sum::<f64>()
        .sqrt() as f32
}

/// Merge `ops` into a whole tensor held in memory ([rows, cols], already in dtype `ty`).
/// The row-streaming [`MergedRows`] gives the same values; this is for small tensors and tests.
pub fn merge_dense(w: &mut [f32], cols: usize, ty: FloatType, ops: &[Op]) {
    ty.round(w);
    let rows = w.len() / cols.max(1);
    let mut tmp = vec![];
    for op in ops {
        let norms = op
            .needs_column_norms()
            .then(|| column_norms_dense(w, rows, cols, op));
        for i in 0..rows {
            op.apply_row(
                i,
                &mut w[i * cols..(i + 1) * cols],
                ty,
                norms.as_deref(),
                &mut tmp,
            );
        }
    }
}

/// The column norms a per-column DoRA step `op` takes on the whole tensor `w`.
pub fn column_norms_dense(w: &[f32], rows: usize, cols: usize, op: &Op) -> Vec<f32> {
    let Op::Dora { delta, .. } = op else {
        unreachable!()
    };
    let mut acc = vec![0f64; cols];
    let mut row = vec![0f32; cols];
    let mut tmp = vec![0f32; cols];
    for i in 0..rows {
        row.copy_from_slice(&w[i * cols..(i + 1) * cols]);
        Op::dora_v(delta, i, &mut row, &mut tmp);
        for (a, &v) in acc.iter_mut().zip(&row) {
            *a += (v as f64) * (v as f64);
        }
    }
    acc.iter().map(|a| a.sqrt() as f32).collect()
}

// ------------------------------------------------------------------ the base model

/// Model types whose linear layers are GPT-2 `Conv1D` ([in, out] weights).
const CONV1D_MODEL_TYPES: &[&str] = &["gpt2", "openai-gpt", "imagegpt", "decision_transformer"];

/// `base_model_prefix` values: checkpoints saved from the bare backbone lack them.
const BASE_PREFIXES: &[&str] = &[
    "model",
    "transformer",
    "gpt_neox",
    "backbone",
    "language_model",
];

/// What the merge needs to know of its base folder beyond the tensors.
impl HfCheckpoint {
    pub fn model_type(&self) -> &str {
        self.config_value("model_type")
            .and_then(Value::as_str)
            .unwrap_or("")
    }

    pub fn is_conv1d_model(&self) -> bool {
        CONV1D_MODEL_TYPES.contains(&self.model_type())
    }

    /// The input embedding matrix.
    pub fn embedding_name(&self) -> Option<&str> {
        self.tensors.iter().map(|t| t.name.as_str()).find(|n| {
            n.ends_with("embed_tokens.weight")
                || n.ends_with(".wte.weight")
                || *n == "wte.weight"
                || n.ends_with("word_embeddings.weight")
                || n.ends_with("embed_in.weight")
        })
    }

    /// The stored dtype of the model (config `dtype` / `torch_dtype`, else the first 2-D
    /// float tensor's).
    pub fn float_type(&self) -> FloatType {
        for k in ["dtype", "torch_dtype"] {
            if let Some(t) = self
                .config_value(k)
                .and_then(Value::as_str)
                .and_then(FloatType::parse)
            {
                return t;
            }
        }
        self.tensors
            .iter()
            .filter(|t| t.shape.len() >= 2)
            .find_map(|t| FloatType::of(t.dtype))
            .unwrap_or(FloatType::F32)
    }

    /// Base tensor name for `name` as an adapter writes it (with or without the model's
    /// `base_model_prefix`), following tied embeddings.
    fn resolve(&self, name: &str) -> Option<String> {
        if self.tied() && is_lm_head(name) {
            return self.embedding_name().map(str::to_string);
        }
        if self.get(name).is_some() {
            return Some(name.to_string());
        }
        if let Some((first, rest)) = name.split_once('.')
            && BASE_PREFIXES.contains(&first)
            && self.get(rest).is_some()
        {
            return Some(rest.to_string());
        }
        for p in BASE_PREFIXES {
            let n = format!("{p}.{name}");
            if self.get(&n).is_some() {
                return Some(n);
            }
        }
        None
    }
}

fn is_lm_head(name: &str) -> bool {
    name == "lm_head.weight" || name.ends_with(".lm_head.weight")
}

// ------------------------------------------------------------------ the plan

/// Where a merged tensor's starting values come from.
#[derive(Clone, Debug)]
pub enum Input {
    Base(TensorRef),
    /// A full copy from an adapter (modules_to_save, saved embedding, trained bias).
    Adapter(TensorRef),
}

impl Input {
    pub fn tensor(&self) -> &TensorRef {
        match self {
            Input::Base(t) | Input::Adapter(t) => t,
        }
    }
}

/// A merge step before its tensors are loaded.
#[derive(Clone, Debug)]
pub enum StepSpec {
    Lora {
        layout: Layout,
        dora: Option<TensorRef>,
        /// (A, B, scaling, weight) per adapter.
        terms: Vec<(TensorRef, TensorRef, f64, f64)>,
        module: String,
    },
    LoraBias {
        terms: Vec<(TensorRef, f64, f64)>,
    },
    Ia3 {
        l: TensorRef,
        per_row: bool,
    },
}

impl StepSpec {
    pub fn describe(&self) -> String {
        match self {
            StepSpec::Lora {
                layout,
                dora,
                terms,
                ..
            } => {
                let kind = if dora.is_some() { "dora" } else { "lora" };
                let r: usize = terms.iter().map(|t| t.0.shape[0]).sum();
                let s: Vec<String> = terms
                    .iter()
                    .map(|t| {
                        if t.3 == 1.0 {
                            format!("s={}", t.2 as f32)
                        } else {
                            format!("s={} w={}", t.2 as f32, t.3)
                        }
                    })
                    .collect();
                format!("{kind} {} r={r} {}", layout.name(), s.join(" + "))
            }
            StepSpec::LoraBias { .. } => "lora_bias".into(),
            StepSpec::Ia3 { per_row, .. } => {
                format!("ia3 scale {}", if *per_row { "rows" } else { "columns" })
            }
        }
    }

    fn load(&self) -> Result<Op> {
        Ok(match self {
            StepSpec::Lora {
                layout,
                dora,
                terms,
                ..
            } => {
                let mut ts = vec![];
                for (a, b, s, w) in terms {
                    ts.push(LoraTerm {
                        a: read_all(a)?,
                        b: read_all(b)?,
                        r: a.shape[0],
                        scaling: *s as f32,
                        weight: *w as f32,
                    });
                }
                let delta = LoraDelta::new(*layout, &ts);
                match dora {
                    Some(m) => Op::Dora {
                        delta,
                        magnitude: read_all(m)?,
                        per_column: layout.transposed(),
                    },
                    None if *layout == Layout::Embedding => Op::AddRounded(delta),
                    None => Op::Add(delta),
                }
            }
            StepSpec::LoraBias { terms } => {
                let mut add: Option<Vec<f32>> = None;
                for (t, s, w) in terms {
                    let mut v = read_all(t)?;
                    for x in v.iter_mut() {
                        *x = if *w == 1.0 {
                            *x * *s as f32
                        } else {
                            (*x * *w as f32) * *s as f32
                        };
                    }
                    add = Some(match add {
                        None => v,
                        Some(mut a) => {
                            for (x, y) in a.iter_mut().zip(&v) {
                                *x += *y;
                            }
                            a
                        }
                    });
                }
                Op::AddVec(add.unwrap_or_default())
            }
            StepSpec::Ia3 { l, per_row } => Op::Scale {
                l: read_all(l)?,
                per_row: *per_row,
            },
        })
    }
}

fn read_all(t: &TensorRef) -> Result<Vec<f32>> {
    let mut v = vec![0f32; t.n_elements()];
    t.read_f32(0, &mut v)?;
    Ok(v)
}

/// One output tensor of the merged model.
#[derive(Clone, Debug)]
pub struct TensorJob {
    pub name: String,
    pub shape: Vec<usize>,
    pub input: Input,
    /// The dtype written (None: a non-float tensor, copied as it is).
    pub ty: Option<FloatType>,
    pub steps: Vec<StepSpec>,
}

impl TensorJob {
    /// Bytes as it is copied unchanged (no steps, same dtype, from the base).
    pub fn is_plain_copy(&self) -> bool {
        self.steps.is_empty()
            && matches!(self.input, Input::Base(_))
            && self.input.tensor().bnb4().is_none()
            && self
                .ty
                .is_none_or(|t| t.dtype() == self.input.tensor().dtype)
    }

    pub fn dtype(&self) -> Dtype {
        self.ty
            .map(FloatType::dtype)
            .unwrap_or(self.input.tensor().dtype)
    }

    pub fn n_bytes(&self) -> u64 {
        let n: usize = self.shape.iter().product();
        (n * self.dtype().bitsize() / 8) as u64
    }

    /// The merged rows, reading the input from `inner` (rows of the 2-D view).
    pub fn rows_from(&self, inner: Box<dyn RowSource>) -> MergedRows {
        MergedRows {
            inner,
            ty: self.ty.unwrap_or(FloatType::F32),
            steps: self.steps.clone(),
            prepared: Mutex::new(None),
        }
    }

    /// The merged rows, reading the input tensor directly.
    pub fn rows(&self) -> MergedRows {
        self.rows_from(Box::new(SafetensorsRows {
            tensor: self.input.tensor().clone(),
            permute_heads: None,
            rounding: crate::plan::Rounding::None,
        }))
    }

    pub fn describe(&self) -> Vec<String> {
        let mut v = vec![];
        if let Input::Adapter(t) = &self.input {
            v.push(format!("replaced by adapter tensor {}", t.name));
        }
        if let Some(ty) = self.ty
            && ty.dtype() != self.input.tensor().dtype
        {
            v.push(format!("as {}", ty.torch_name()));
        }
        v.extend(self.steps.iter().map(StepSpec::describe));
        v
    }
}

/// Everything a merge will do.
pub struct MergePlan {
    pub tensors: Vec<TensorJob>,
    by_name: HashMap<String, usize>,
    /// Notes for stderr (ignored tensors as PEFT ignores them, tied embeddings…).
    pub warnings: Vec<String>,
    /// The dtype of the model as written (config.json `dtype`).
    pub model_type: FloatType,
    /// Tied embeddings: `lm_head.weight` is not written.
    pub dropped: Vec<String>,
    /// Number of adapted modules.
    pub n_modules: usize,
}

impl MergePlan {
    pub fn get(&self, name: &str) -> Option<&TensorJob> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The merged version of base tensor `name`, if the merge changes it.
    pub fn changes(&self, name: &str) -> Option<&TensorJob> {
        self.get(name).filter(|j| !j.is_plain_copy())
    }

    /// For a GGUF plan's row hook: base tensor `name`'s rows as merged (`src` holds the
    /// base rows), or `src` itself when the merge leaves the tensor alone.
    pub fn hook_rows(&self, name: &str, src: Box<dyn RowSource>) -> Result<Box<dyn RowSource>> {
        if self.dropped.iter().any(|d| d == name) {
            bail!(
                "tensor {name:?} is tied to the input embedding and dropped by the merge; GGUF output of this combination is not supported"
            );
        }
        Ok(match self.changes(name) {
            None => src,
            Some(j) => match &j.input {
                Input::Base(_) => Box::new(j.rows_from(src)),
                Input::Adapter(_) => Box::new(j.rows()),
            },
        })
    }

    pub fn total_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.n_bytes()).sum()
    }

    /// Plan the merge of `adapters` into `base`, checking everything before any output.
    pub fn build(
        base: &HfCheckpoint,
        adapters: &[Adapter],
        dtype: Option<FloatType>,
    ) -> Result<MergePlan> {
        if adapters.is_empty() {
            bail!("no adapter given");
        }
        let model_type = dtype.unwrap_or_else(|| base.float_type());
        let mut warnings = vec![];
        if base.quantized {
            warnings.push(format!(
                "{}: a 4-bit bitsandbytes base: weights are dequantized (as bitsandbytes does) and the merge is written in 16 bits; the result differs from merging into the original full-precision base",
                base.dir.display()
            ));
        }
        let mut replaced: BTreeMap<String, (TensorRef, String)> = BTreeMap::new();
        let mut steps: BTreeMap<String, Vec<StepSpec>> = BTreeMap::new();
        // module -> (base tensor, layout, terms, dora, first adapter)
        // keyed (base tensor, lm_head last, module): PEFT merges in module order, and with tied
        // embeddings the input embedding comes before lm_head
        let mut lora: BTreeMap<(String, bool, String), StepSpec> = BTreeMap::new();
        let mut lora_bias: BTreeMap<String, Vec<(TensorRef, f64, f64)>> = BTreeMap::new();
        let mut n_modules = 0;
        let multi = adapters.len() > 1;
        let tied = base.tied();
        for ad in adapters {
            let src = ad.file.path.display().to_string();
            let cfg = &ad.config;
            if multi && cfg.peft_type == PeftType::Ia3 {
                bail!(
                    "{}: IA3 adapters cannot be combined with other adapters",
                    ad.dir.display()
                );
            }
            if multi && cfg.use_dora {
                bail!(
                    "{}: DoRA adapters cannot be combined with other adapters (PEFT's weighted combination does not support DoRA)",
                    ad.dir.display()
                );
            }
            if ad.weight != 1.0 && (cfg.use_dora || cfg.peft_type == PeftType::Ia3) {
                bail!(
                    "{}: a weight other than 1 is only supported for LoRA adapters (not DoRA or IA3)",
                    ad.dir.display()
                );
            }
            // full copies
            for (target, t) in &ad.replacements {
                if tied && is_lm_head(target) {
                    bail!(
                        "{src}: tensor {:?} replaces lm_head of a model with tied embeddings; ftconv cannot merge that",
                        t.name
                    );
                }
                let name = base.resolve(target).ok_or_else(|| {
                    anyhow!(
                        "{src}: tensor {:?} replaces {target:?}, which the base model does not have",
                        t.name
                    )
                })?;
                let bt = base.get(&name).unwrap();
                if bt.shape != t.shape {
                    bail!(
                        "{src}: tensor {:?} has shape {:?} but base tensor {name:?} has {:?}",
                        t.name,
                        t.shape,
                        bt.shape
                    );
                }
                if let Some((_, prev)) = replaced.get(&name) {
                    bail!(
                        "{src}: tensor {:?} replaces {name:?}, which {prev} already replaces",
                        t.name
                    );
                }
                replaced.insert(name, (t.clone(), src.clone()));
            }
            // adapted modules
            let mut unresolved = vec![];
            let mut resolved = 0usize;
            for (m, parts) in &ad.modules {
                if !cfg.targets(m) {
                    warnings.push(format!(
                        "{src}: module {m:?} is not in the config's targets; its tensors are ignored (as PEFT ignores them)"
                    ));
                    continue;
                }
                let Some(wname) = base.resolve(&format!("{m}.weight")) else {
                    unresolved.push(m.clone());
                    continue;
                };
                resolved += 1;
                n_modules += 1;
                let w = base.get(&wname).unwrap().clone();
                if w.shape.len() != 2 {
                    bail!(
                        "{src}: module {m:?}: base tensor {wname:?} has shape {:?}, not a 2-D weight",
                        w.shape
                    );
                }
                if FloatType::of(w.dtype).is_none() {
                    bail!(
                        "{src}: module {m:?}: base tensor {wname:?} has dtype {:?}; only F32/F16/BF16 bases can be merged",
                        w.dtype
                    );
                }
                match cfg.peft_type {
                    PeftType::Ia3 => {
                        plan_ia3(base, ad, m, parts, &wname, &w, &mut steps)?;
                    }
                    PeftType::Lora => {
                        let (layout, a, b) = lora_layout(base, ad, m, parts, &wname, &w)?;
                        let s = cfg.scaling_for(m, a.shape[0]);
                        let key = (wname.clone(), is_lm_head(&format!("{m}.weight")), m.clone());
                        if let Some(mag) = &parts.magnitude {
                            let out_features = if layout.transposed() {
                                w.shape[1]
                            } else {
                                w.shape[0]
                            };
                            if mag.n_elements() != out_features {
                                bail!(
                                    "{src}: module {m:?}: lora_magnitude_vector has {} values, expected {out_features}",
                                    mag.n_elements()
                                );
                            }
                        }
                        let entry = lora.entry(key).or_insert_with(|| StepSpec::Lora {
                            layout,
                            dora: parts.magnitude.clone(),
                            terms: vec![],
                            module: m.clone(),
                        });
                        if let StepSpec::Lora {
                            layout: l0, terms, ..
                        } = entry
                        {
                            if *l0 != layout {
                                bail!(
                                    "{src}: module {m:?} is adapted as {} here but as {} by another adapter",
                                    layout.name(),
                                    l0.name()
                                );
                            }
                            terms.push((a, b, s, ad.weight));
                        }
                        if let Some(bb) = &parts.lora_b_bias {
                            let bname = base.resolve(&format!("{m}.bias")).ok_or_else(|| {
                                anyhow!(
                                    "{src}: module {m:?} has lora_B.bias but the base has no {m}.bias"
                                )
                            })?;
                            let bt = base.get(&bname).unwrap();
                            if bt.n_elements() != bb.n_elements() {
                                bail!(
                                    "{src}: module {m:?}: lora_B.bias has {} values but {bname:?} has {}",
                                    bb.n_elements(),
                                    bt.n_elements()
                                );
                            }
                            lora_bias
                                .entry(bname)
                                .or_default()
                                .push((bb.clone(), s, ad.weight));
                        }
                    }
                }
            }
            if !unresolved.is_empty() {
                if resolved == 0 {
                    bail!(
                        "{}: none of the adapter's {} modules exist in base model {} (e.g. {:?}): the adapter was made for a different architecture{}",
                        ad.dir.display(),
                        unresolved.len(),
                        base.dir.display(),
                        unresolved[0],
                        ad.config
                            .base_model_name_or_path
                            .as_ref()
                            .map(|b| format!(" ({b})"))
                            .unwrap_or_default()
                    );
                }
                bail!(
                    "{}: target module {:?} does not exist in base model {} ({} of {} modules missing)",
                    ad.dir.display(),
                    unresolved[0],
                    base.dir.display(),
                    unresolved.len(),
                    unresolved.len() + resolved
                );
            }
        }
        for ((wname, _, _), spec) in lora {
            steps.entry(wname).or_default().push(spec);
        }
        for (bname, terms) in lora_bias {
            steps
                .entry(bname)
                .or_default()
                .push(StepSpec::LoraBias { terms });
        }
        // DoRA norms must see the tensor as the step finds it: allow it only as the first step
        for (name, s) in &steps {
            if s.len() > 1
                && s.iter()
                    .any(|x| matches!(x, StepSpec::Lora { dora: Some(_), .. }))
            {
                bail!("tensor {name:?} gets a DoRA merge and another merge; not supported");
            }
        }
        let mut dropped = vec![];
        let lm_head_tied = tied && base.get("lm_head.weight").is_some();
        if lm_head_tied {
            dropped.push("lm_head.weight".to_string());
            warnings.push(
                "tied embeddings: lm_head.weight is not written (transformers saves only the input embedding)".into(),
            );
        }
        let mut tensors = vec![];
        let mut by_name = HashMap::new();
        for t in &base.tensors {
            if dropped.contains(&t.name) {
                continue;
            }
            let ty = FloatType::of(t.dtype).map(|own| dtype.unwrap_or(own));
            let input = match replaced.remove(&t.name) {
                Some((r, _)) => Input::Adapter(r),
                None => Input::Base(t.clone()),
            };
            let steps = steps.remove(&t.name).unwrap_or_default();
            by_name.insert(t.name.clone(), tensors.len());
            tensors.push(TensorJob {
                name: t.name.clone(),
                shape: t.shape.clone(),
                input,
                ty,
                steps,
            });
        }
        Ok(MergePlan {
            tensors,
            by_name,
            warnings,
            model_type,
            dropped,
            n_modules,
        })
    }
}

/// Which way a LoRA module meets its base weight, with shape checks.
fn lora_layout(
    base: &HfCheckpoint,
    ad: &Adapter,
    m: &str,
    parts: &ModuleTensors,
    wname: &str,
    w: &TensorRef,
) -> Result<(Layout, TensorRef, TensorRef)> {
    let src = ad.file.path.display();
    if let (Some(a), Some(b)) = (&parts.embedding_a, &parts.embedding_b) {
        // A [r, vocab], B [dim, r], W [vocab, dim]
        if w.shape != [a.shape[1], b.shape[0]] {
            bail!(
                "{src}: module {m:?}: lora_embedding_A {:?} / lora_embedding_B {:?} do not fit base tensor {wname:?} {:?} (expected [{}, {}])",
                a.shape,
                b.shape,
                w.shape,
                a.shape[1],
                b.shape[0]
            );
        }
        return Ok((Layout::Embedding, a.clone(), b.clone()));
    }
    let a = parts.lora_a.as_ref().unwrap();
    let b = parts.lora_b.as_ref().unwrap();
    let linear = [b.shape[0], a.shape[1]];
    let conv = [a.shape[1], b.shape[0]];
    // PEFT forces fan_in_fan_out for Conv1D and clears it for nn.Linear, whatever the file says
    let layout = if base.is_conv1d_model() && !is_lm_head(&format!("{m}.weight")) {
        Layout::Conv1D
    } else {
        Layout::Linear
    };
    let want = if layout == Layout::Conv1D {
        conv
    } else {
        linear
    };
    if w.shape != want {
        bail!(
            "{src}: module {m:?}: lora_A {:?} / lora_B {:?} do not fit base tensor {wname:?} {:?} (expected {want:?}{})",
            a.shape,
            b.shape,
            w.shape,
            if layout == Layout::Conv1D {
                ", a Conv1D weight [in, out]"
            } else {
                ""
            }
        );
    }
    Ok((layout, a.clone(), b.clone()))
}

/// IA³: `ia3_l` is [out, 1] (scales output features, and the bias) or [1, in] for
/// feedforward modules (scales input features).
fn plan_ia3(
    base: &HfCheckpoint,
    ad: &Adapter,
    m: &str,
    parts: &ModuleTensors,
    wname: &str,
    w: &TensorRef,
    steps: &mut BTreeMap<String, Vec<StepSpec>>,
) -> Result<()> {
    let src = ad.file.path.display();
    let l = parts.ia3_l.as_ref().unwrap();
    let conv = base.is_conv1d_model() && !is_lm_head(&format!("{m}.weight"));
    let (out_f, in_f) = if conv {
        (w.shape[1], w.shape[0])
    } else {
        (w.shape[0], w.shape[1])
    };
    let ff = ad.config.is_feedforward(m);
    let want = if ff { vec![1, in_f] } else { vec![out_f, 1] };
    if l.shape != want {
        bail!(
            "{src}: module {m:?}: ia3_l has shape {:?}, expected {want:?} for base tensor {wname:?} {:?}{}",
            l.shape,
            w.shape,
            if ff { " (a feedforward module)" } else { "" }
        );
    }
    // Linear: output features are rows; Conv1D: columns
    let per_row = ff == conv;
    steps
        .entry(wname.to_string())
        .or_default()
        .push(StepSpec::Ia3 {
            l: l.clone(),
            per_row,
        });
    if !ff && let Some(bname) = base.resolve(&format!("{m}.bias")) {
        steps.entry(bname).or_default().push(StepSpec::Ia3 {
            l: l.clone(),
            per_row: false,
        });
    }
    Ok(())
}

// ------------------------------------------------------------------ streaming rows

struct Prepared {
    ops: Vec<Op>,
    /// Column norms for per-column DoRA steps.
    norms: Vec<Option<Vec<f32>>>,
}

/// A merged tensor's rows: the input rows (rounded to the output dtype), then each step.
pub struct MergedRows {
    inner: Box<dyn RowSource>,
    ty: FloatType,
    steps: Vec<StepSpec>,
    prepared: Mutex<Option<Arc<Prepared>>>,
}

impl MergedRows {
    fn prepared(&self) -> Result<Arc<Prepared>> {
        let mut g = self.prepared.lock().map_err(|_| anyhow!("poisoned lock"))?;
        if let Some(p) = g.as_ref() {
            return Ok(p.clone());
        }
        let mut ops = vec![];
        let mut norms = vec![];
        for s in &self.steps {
            let op = s.load()?;
            let n = if op.needs_column_norms() {
                Some(self.column_norms(&ops, &norms, &op)?)
            } else {
                None
            };
            ops.push(op);
            norms.push(n);
        }
        let p = Arc::new(Prepared { ops, norms });
        *g = Some(p.clone());
        Ok(p)
    }

    /// One pass over the whole tensor for a per-column DoRA norm.
    fn column_norms(&self, before: &[Op], norms: &[Option<Vec<f32>>], op: &Op) -> Result<Vec<f32>> {
        let Op::Dora { delta, .. } = op else {
            unreachable!()
        };
        let rows = self.inner.rows();
        let cols = self.inner.cols();
        let mut acc = vec![0f64; cols];
        let chunk = (1 << 16) / cols.max(1) + 1;
        let mut buf = vec![0f32; chunk * cols];
        let mut tmp = vec![0f32; cols];
        let mut r = 0;
        while r < rows {
            let n = chunk.min(rows - r);
            let b = &mut buf[..n * cols];
            self.compute(r, b, before, norms)?;
            for (k, row) in b.chunks_exact_mut(cols).enumerate() {
                Op::dora_v(delta, r + k, row, &mut tmp);
                for (a, &v) in acc.iter_mut().zip(row.iter()) {
                    *a += (v as f64) * (v as f64);
                }
            }
            r += n;
        }
        Ok(acc.iter().map(|a| a.sqrt() as f32).collect())
    }

    fn compute(
        &self,
        row0: usize,
        out: &mut [f32],
        ops: &[Op],
        norms: &[Option<Vec<f32>>],
    ) -> Result<()> {
        if out.len() >= GPU_MIN_ELEMS
            && let Some(g) = gpu::active()
        {
            let run = |x: &mut [f32], cols: usize, dt: gpu::Dtype, steps: &[MergeStep]| {
                g.merge_rows(x, cols, dt, steps)
            };
            return self.compute_batched(&run, row0, out, ops, norms);
        }
        self.inner.read_rows(row0, out)?;
        self.ty.round(out);
        let cols = self.inner.cols();
        let mut tmp = vec![];
        for (op, n) in ops.iter().zip(norms) {
            for (k, row) in out.chunks_exact_mut(cols).enumerate() {
                op.apply_row(row0 + k, row, self.ty, n.as_deref(), &mut tmp);
            }
        }
        Ok(())
    }
}

/// Runs merge steps on whole rows (`gpu::Gpu::merge_rows`).
pub(crate) type StepRunner<'a> =
    dyn Fn(&mut [f32], usize, gpu::Dtype, &[MergeStep]) -> Result<()> + Sync + 'a;

/// Batches at least this large are merged on the GPU when one is in use.
const GPU_MIN_ELEMS: usize = 1 << 16;

impl MergedRows {
    /// [`MergedRows::compute`] with the steps run by `run` (the GPU): the input rows are read
    /// on the CPU threads, and the first and last rows are recomputed on the CPU and compared
    /// bit for bit (the GPU path never returns values the CPU would not).
    pub(crate) fn compute_batched(
        &self,
        run: &StepRunner,
        row0: usize,
        out: &mut [f32],
        ops: &[Op],
        norms: &[Option<Vec<f32>>],
    ) -> Result<()> {
        use rayon::prelude::*;
        let cols = self.inner.cols().max(1);
        let n = out.len() / cols;
        let per = ((1usize << 16) / cols).max(1);
        out.par_chunks_mut(per * cols)
            .enumerate()
            .try_for_each(|(k, c)| {
                self.inner.read_rows(row0 + k * per, c)?;
                self.ty.round(c);
                Ok::<(), anyhow::Error>(())
            })?;
        let spot = [0, n - 1].map(|k| (k, out[k * cols..(k + 1) * cols].to_vec()));
        let mut steps = vec![];
        for (op, nm) in ops.iter().zip(norms) {
            op.gpu_steps(row0..row0 + n, nm.as_deref(), &mut steps)?;
        }
        run(out, cols, self.ty.gpu_dtype(), &steps)?;
        let mut tmp = vec![];
        for (k, mut row) in spot {
            for (op, nm) in ops.iter().zip(norms) {
                op.apply_row(row0 + k, &mut row, self.ty, nm.as_deref(), &mut tmp);
            }
            let got = &out[k * cols..(k + 1) * cols];
            if row.iter().zip(got).any(|(a, b)| a.to_bits() != b.to_bits()) {
                bail!(
                    "the GPU's adapter merge differs from the CPU's at row {} (a GPU kernel or driver problem; rerun with --device cpu)",
                    row0 + k
                );
            }
        }
        Ok(())
    }
}

impl RowSource for MergedRows {
    fn rows(&self) -> usize {
        self.inner.rows()
    }
    fn cols(&self) -> usize {
        self.inner.cols()
    }
    fn read_rows(&self, row0: usize, out: &mut [f32]) -> Result<()> {
        let p = self.prepared()?;
        self.compute(row0, out, &p.ops, &p.norms)
    }
    fn prefers_batches(&self) -> bool {
        gpu::active().is_some()
    }
    fn release(&self) {
        if let Ok(mut g) = self.prepared.lock() {
            *g = None;
        }
        self.inner.release();
    }
}

/// Keys of an adapter that name a module (for messages).
pub fn module_key(m: &str) -> String {
    format!("{PREFIX}{m}")
}

#[cfg(test)]
mod tests;
