//! AdamW with savable state, learning-rate schedules, global-norm gradient clipping, a stateless
//! keyed RNG (shuffles, dropout masks, LoRA init) and the optimizer-state checkpoint file.
//!
//! Everything here is host math in f32 (LoRA parameters are small). The update follows
//! `torch.optim.AdamW` (single-tensor path, `amsgrad=False`, `maximize=False`) operation by
//! operation; the schedules follow transformers' `get_scheduler` lambdas; clipping follows
//! `torch.nn.utils.clip_grad_norm_`.
//!
//! Precision choices, mirroring torch on f32 parameters:
//! * the state (`exp_avg`, `exp_avg_sq`) and all element-wise arithmetic are f32;
//! * scalar factors are computed in f64 (torch computes them as Python floats) and rounded to
//!   f32 where torch hands them to an f32 kernel: `1 − lr·wd`, `1 − β1`, `β2`, `1 − β2`,
//!   `√(1 − β2^t)`, `ε`, `−lr/(1 − β1^t)`;
//! * the bias corrections `1 − β^t` are f64 (`β ** step` in Python), `t` being an exact integer;
//! * torch's CPU kernels are built with FMA contraction: `lerp_` is one FMA
//!   (`m + w·(g − m)` rounded once) and `addcmul_` rounds `(1−β2)·g` then fuses `·g + v·β2`;
//!   we do the same with `f32::mul_add`;
//! * `√(1 − β2^t)` is `bias2 ** 0.5` (C `pow`), as in torch.
//!
//! Checked against torch 2.15 on CPU (see the `adamw_matches_torch` test): `exp_avg` and
//! `exp_avg_sq` are bit-identical; the parameters differ by at most 1 ulp, only because torch's
//! CPU `sqrt` (MKL VML) is not correctly rounded (1 ulp off on ~20% of inputs) where ours is.
//! Fed torch's own `sqrt`, the update is bit-identical.

use anyhow::{Context, Result, bail};
use candle_core::{DType, Tensor, Var};
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

pub use crate::cli::finetune::Schedule;

// ---------------------------------------------------------------------------------------------
// AdamW
// ---------------------------------------------------------------------------------------------

/// AdamW hyper-parameters (transformers `TrainingArguments` defaults; `lr` is the base rate,
/// the per-step rate is passed to [`AdamW::step`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 5e-5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// One parameter's optimizer state.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamState {
    pub name: String,
    pub shape: Vec<usize>,
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
}

/// AdamW (decoupled weight decay) over a fixed, ordered list of named parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamW {
    pub cfg: AdamWConfig,
    /// Optimizer steps taken (torch's `state["step"]`, shared by all parameters here).
    pub t: u64,
    pub state: Vec<ParamState>,
}

/// Metadata key of the step count in the state file.
pub const STEP_KEY: &str = "step";
const FORMAT_VALUE: &str = "ftconv-adamw";

fn check_unique(names: &[String]) -> Result<()> {
    let mut seen = HashSet::new();
    for n in names {
        if !seen.insert(n.as_str()) {
            bail!("AdamW: parameter {n} listed twice");
        }
    }
    Ok(())
}

impl AdamW {
    /// Zero state for `names[i]` with shape `shapes[i]`.
    pub fn new(names: &[String], shapes: &[Vec<usize>], cfg: AdamWConfig) -> Result<AdamW> {
        if names.len() != shapes.len() {
            bail!(
                "AdamW: {} parameter names but {} shapes",
                names.len(),
                shapes.len()
            );
        }
        check_unique(names)?;
        let state = names
            .iter()
            .zip(shapes)
            .map(|(n, s)| {
                let len = s.iter().product();
                ParamState {
                    name: n.clone(),
                    shape: s.clone(),
                    exp_avg: vec![0.0; len],
                    exp_avg_sq: vec![0.0; len],
                }
            })
            .collect();
        Ok(AdamW { cfg, t: 0, state })
    }

    /// Zero state for these variables (names and shapes taken from them).
    pub fn for_vars(params: &[(String, Var)], cfg: AdamWConfig) -> Result<AdamW> {
        let names: Vec<String> = params.iter().map(|(n, _)| n.clone()).collect();
        let shapes: Vec<Vec<usize>> = params.iter().map(|(_, v)| v.dims().to_vec()).collect();
        AdamW::new(&names, &shapes, cfg)
    }

    pub fn names(&self) -> Vec<String> {
        self.state.iter().map(|s| s.name.clone()).collect()
    }

    /// One AdamW update at learning rate `lr` (the scheduled rate for this step).
    /// `params` must be in the order given to [`AdamW::new`]; `grads[i]` is the gradient of
    /// `params[i]` (already accumulated, scaled and clipped). Parameters are written back with
    /// `Var::set`, in their own dtype and device.
    pub fn step(&mut self, params: &[(String, Var)], grads: &[Tensor], lr: f64) -> Result<()> {
        if params.len() != self.state.len() || grads.len() != self.state.len() {
            bail!(
                "AdamW::step: optimizer holds {} parameters, got {} parameters and {} gradients",
                self.state.len(),
                params.len(),
                grads.len()
            );
        }
        // Validate everything and fetch all values before changing any state, so an error
        // leaves the optimizer and parameters untouched.
        let mut host = Vec::with_capacity(params.len());
        for ((st, (name, var)), g) in self.state.iter().zip(params).zip(grads) {
            if &st.name != name {
                bail!(
                    "AdamW::step: parameter {} given where {} was expected",
                    name,
                    st.name
                );
            }
            if var.dims() != st.shape.as_slice() || g.dims() != st.shape.as_slice() {
                bail!(
                    "AdamW::step: {}: parameter shape {:?} / gradient shape {:?}, optimizer state {:?}",
                    name,
                    var.dims(),
                    g.dims(),
                    st.shape
                );
            }
            let p = to_host(var.as_tensor()).with_context(|| format!("{name}: reading value"))?;
            let g = to_host(g).with_context(|| format!("{name}: reading gradient"))?;
            host.push((p, g));
        }

        self.t += 1;
        let c = &self.cfg;
        let t = self.t as f64;
        let decay = (1.0 - lr * c.weight_decay) as f32;
        let w1 = (1.0 - c.beta1) as f32;
        let b2 = c.beta2 as f32;
        let one_minus_b2 = (1.0 - c.beta2) as f32;
        let bias1 = 1.0 - c.beta1.powf(t);
        let bias2 = 1.0 - c.beta2.powf(t);
        let neg_step_size = (-(lr / bias1)) as f32;
        let bias2_sqrt = bias2.powf(0.5) as f32;
        let eps = c.eps as f32;

        for (st, ((_, var), (mut p, g))) in self.state.iter_mut().zip(params.iter().zip(host)) {
            adamw_update(
                &mut p,
                &g,
                &mut st.exp_avg,
                &mut st.exp_avg_sq,
                AdamScalars {
                    decay: (c.weight_decay != 0.0).then_some(decay),
                    w1,
                    b2,
                    one_minus_b2,
                    neg_step_size,
                    bias2_sqrt,
                    eps,
                },
            );
            let new = Tensor::from_vec(p, var.shape(), var.device())?.to_dtype(var.dtype())?;
            var.set(&new)
                .with_context(|| format!("{}: writing the updated value", st.name))?;
        }
        Ok(())
    }

    /// Write the state to a safetensors file: `<name>.exp_avg`, `<name>.exp_avg_sq` (F32, the
    /// parameter's shape) and metadata `step` (plus the hyper-parameters, informational).
    /// The file appears whole or not at all.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut views = Vec::with_capacity(2 * self.state.len());
        for st in &self.state {
            for (suffix, v) in [("exp_avg", &st.exp_avg), ("exp_avg_sq", &st.exp_avg_sq)] {
                let view = TensorView::new(Dtype::F32, st.shape.clone(), bytemuck::cast_slice(v))
                    .with_context(|| format!("{}: {}.{suffix}", path.display(), st.name))?;
                views.push((format!("{}.{suffix}", st.name), view));
            }
        }
        let c = &self.cfg;
        let md: HashMap<String, String> = [
            ("format", FORMAT_VALUE.to_string()),
            (STEP_KEY, self.t.to_string()),
            ("beta1", format!("{:?}", c.beta1)),
            ("beta2", format!("{:?}", c.beta2)),
            ("eps", format!("{:?}", c.eps)),
            ("weight_decay", format!("{:?}", c.weight_decay)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let bytes = safetensors::serialize(views, Some(md))
            .with_context(|| format!("{}: serializing optimizer state", path.display()))?;
        let mut f = crate::output::AtomicFile::create(path)?;
        std::io::Write::write_all(&mut f, &bytes)
            .with_context(|| format!("{}: write failed", path.display()))?;
        f.commit()
    }

    /// Read a state file written by [`AdamW::save`] for exactly these parameters (names and
    /// shapes); `cfg` is the run's configuration (the file's hyper-parameters are not used).
    pub fn load(
        path: &Path,
        names: &[String],
        shapes: &[Vec<usize>],
        cfg: AdamWConfig,
    ) -> Result<AdamW> {
        let mut opt = AdamW::new(names, shapes, cfg)?;
        let p = path.display();
        let bytes = std::fs::read(path).with_context(|| format!("{p}: cannot read"))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .with_context(|| format!("{p}: not a safetensors file"))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .with_context(|| format!("{p}: not a safetensors file"))?;
        let md = meta.metadata().clone().unwrap_or_default();
        let step = md.get(STEP_KEY).with_context(|| {
            format!("{p}: no \"{STEP_KEY}\" in the metadata (not an optimizer state file)")
        })?;
        opt.t = step.parse().with_context(|| {
            format!("{p}: metadata \"{STEP_KEY}\" = {step:?} is not a step count")
        })?;

        let mut expected = HashSet::new();
        for ps in &mut opt.state {
            for (suffix, dst) in [
                ("exp_avg", &mut ps.exp_avg),
                ("exp_avg_sq", &mut ps.exp_avg_sq),
            ] {
                let key = format!("{}.{suffix}", ps.name);
                let v = st.tensor(&key).map_err(|_| {
                    anyhow::anyhow!("{p}: no tensor {key} (the state file does not match the trained parameters)")
                })?;
                if v.dtype() != Dtype::F32 {
                    bail!("{p}: {key} is {:?}, expected F32", v.dtype());
                }
                if v.shape() != ps.shape.as_slice() {
                    bail!(
                        "{p}: {key} has shape {:?}, the parameter has shape {:?}",
                        v.shape(),
                        ps.shape
                    );
                }
                for (d, b) in dst.iter_mut().zip(v.data().chunks_exact(4)) {
                    *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
                expected.insert(key);
            }
        }
        let mut extra: Vec<&str> = st
            .names()
            .into_iter()
            .filter(|n| !expected.contains(*n))
            .collect();
        if !extra.is_empty() {
            extra.sort();
            bail!(
                "{p}: state for parameters not being trained: {} (the state file does not match the trained parameters)",
                extra.join(", ")
            );
        }
        Ok(opt)
    }
}

/// The per-step scalars, each already rounded to f32 as torch hands it to its f32 kernels.
#[derive(Clone, Copy, Debug)]
struct AdamScalars {
    /// `1 − lr·wd`; `None` when wd = 0 (torch skips the multiply).
    decay: Option<f32>,
    /// `1 − β1`, the lerp weight.
    w1: f32,
    b2: f32,
    one_minus_b2: f32,
    /// `−lr / (1 − β1^t)`.
    neg_step_size: f32,
    /// `√(1 − β2^t)`.
    bias2_sqrt: f32,
    eps: f32,
}

/// torch `_single_tensor_adam` with `decoupled_weight_decay=True`, element by element
/// (chunks in parallel; each element's arithmetic is independent of the chunking):
/// `p.mul_(1−lr·wd); m.lerp_(g, 1−β1); v.mul_(β2).addcmul_(g, g, 1−β2);`
/// `denom = (v.sqrt() / √bias2).add_(ε); p.addcdiv_(m, denom, −lr/bias1)`.
fn adamw_update(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: AdamScalars) {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 14;
    p.par_chunks_mut(CHUNK)
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK))
        .for_each(|(((p, m), v), g)| adamw_update_chunk(p, g, m, v, s));
}

fn adamw_update_chunk(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: AdamScalars) {
    // at::lerp_vec: w < 0.5 ? fma(w, end − self, self) : fma(w − 1, end − self, end)
    let small = s.w1.abs() < 0.5;
    let (coeff, from_self) = if small {
        (s.w1, true)
    } else {
        (s.w1 - 1.0, false)
    };
    for i in 0..p.len() {
        let gi = g[i];
        let mut pi = p[i];
        if let Some(d) = s.decay {
            pi *= d;
        }
        let base = if from_self { m[i] } else { gi };
        let mi = coeff.mul_add(gi - m[i], base);
        // mul_(β2).addcmul_(g, g, 1−β2): fma((1−β2)·g, g, v·β2)
        let vi = (s.one_minus_b2 * gi).mul_add(gi, v[i] * s.b2);
        let denom = vi.sqrt() / s.bias2_sqrt + s.eps;
        // addcdiv: self + (value·t1) / t2
        pi += s.neg_step_size * mi / denom;
        m[i] = mi;
        v[i] = vi;
        p[i] = pi;
    }
}

fn to_host(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

// ---------------------------------------------------------------------------------------------
// Gradient clipping
// ---------------------------------------------------------------------------------------------

/// `torch.nn.utils.clip_grad_norm_(norm_type=2)`: returns the global L2 norm over all gradients
/// (before clipping); when `max_norm > 0` every gradient is multiplied by
/// `min(1, max_norm / (norm + 1e-6))` (skipped when that is 1, which torch multiplies by).
/// The norm is accumulated in f64 and returned unrounded; the factor is computed in f32 as
/// torch does from its f32 norm: `(norm + 1e-6).reciprocal() * max_norm` (Python's
/// `float / tensor` is `reciprocal() * float`), then applied in f32.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let mut sum = 0f64;
    for g in grads.iter() {
        for x in to_host(g)? {
            sum += (x as f64) * (x as f64);
        }
    }
    let norm = sum.sqrt();
    if max_norm > 0.0 {
        let coef = (1.0f32 / (norm as f32 + 1e-6f32)) * max_norm as f32;
        if coef < 1.0 {
            for g in grads.iter_mut() {
                *g = g.affine(coef as f64, 0.0)?;
            }
        }
    }
    Ok(norm)
}

// ---------------------------------------------------------------------------------------------
// Learning-rate schedules
// ---------------------------------------------------------------------------------------------

/// Learning rate of 0-based optimizer step `step` (transformers' `LambdaLR` lambdas; the first
/// update uses `step = 0`, so with warm-up the first step has rate 0).
/// * warm-up (`step < warmup`): `base · step / max(1, warmup)`;
/// * `Linear`: `base · max(0, (total − step) / max(1, total − warmup))`;
/// * `Cosine` (`num_cycles = 0.5`): `base · max(0, ½(1 + cos(π · progress)))`,
///   `progress = (step − warmup) / max(1, total − warmup)`;
/// * `Constant`: `base` after the warm-up. Our choice: this is transformers'
///   `constant_with_warmup`; transformers' plain `constant` ignores warm-up entirely, which is
///   the same as ours with `--warmup-steps 0`.
pub fn lr_at(
    schedule: Schedule,
    base_lr: f64,
    warmup: usize,
    total_steps: usize,
    step: usize,
) -> f64 {
    if step < warmup {
        return base_lr * step as f64 / warmup.max(1) as f64;
    }
    let after = (total_steps as f64 - warmup as f64).max(1.0);
    let factor = match schedule {
        Schedule::Constant => 1.0,
        Schedule::Linear => ((total_steps as f64 - step as f64) / after).max(0.0),
        Schedule::Cosine => {
            let progress = (step - warmup) as f64 / after;
            (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
        }
    };
    base_lr * factor
}

// ---------------------------------------------------------------------------------------------
// Stateless keyed RNG
// ---------------------------------------------------------------------------------------------

/// What a random stream is for (the first word of its key after the seed).
pub mod purpose {
    pub const SHUFFLE: u64 = 1;
    pub const DROPOUT: u64 = 2;
    pub const LORA_INIT: u64 = 3;
}

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// SplitMix64's output function (Stafford variant 13).
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A 64-bit value that depends only on `(seed, stream)`: no global state, no history.
/// Keys of different lengths never alias (`[a]` ≠ `[a, 0]`).
pub fn rng_u64(seed: u64, stream: &[u64]) -> u64 {
    let mut h = mix64(seed.wrapping_add(GOLDEN));
    for (i, &s) in stream.iter().enumerate() {
        h = mix64(h ^ mix64(s.wrapping_add(GOLDEN.wrapping_mul(i as u64 + 2))));
    }
    mix64(h ^ (stream.len() as u64).wrapping_mul(GOLDEN))
}

/// SplitMix64 generator. Build one per purpose with [`SplitMix64::keyed`], so what it yields
/// depends only on its key (which makes resume exact).
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64 { state: seed }
    }

    /// A generator for the stream `(seed, key…)`, e.g. `(seed, [purpose::DROPOUT, step, micro, module])`.
    pub fn keyed(seed: u64, key: &[u64]) -> SplitMix64 {
        SplitMix64::new(rng_u64(seed, key))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN);
        mix64(self.state)
    }

    /// Uniform in [0, 1) with 24 random bits.
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `0..n` without bias (Lemire's multiply-and-reject). `n` must be > 0.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "SplitMix64::below(0)");
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = (self.next_u64() as u128) * (n as u128);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }
}

/// A permutation of `0..n` (Fisher–Yates) depending only on `(seed, epoch)`.
pub fn shuffle_indices(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut rng = SplitMix64::keyed(seed, &[purpose::SHUFFLE, epoch]);
    let mut idx: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        idx.swap(i, j);
    }
    idx
}

/// Inverted-dropout mask of `len` values, each 0 (probability `p`) or `1/(1−p)`, depending only
/// on `(seed, key)`; `key` is the caller's `[step, micro_batch, module, …]` (the dropout purpose
/// is prefixed here). `p = 0` gives all ones, `p ≥ 1` all zeros (as torch).
pub fn dropout_mask(len: usize, p: f64, seed: u64, key: &[u64]) -> Vec<f32> {
    if p <= 0.0 {
        return vec![1.0; len];
    }
    if p >= 1.0 {
        return vec![0.0; len];
    }
    let mut full = Vec::with_capacity(key.len() + 1);
    full.push(purpose::DROPOUT);
    full.extend_from_slice(key);
    use rayon::prelude::*;
    let start = SplitMix64::keyed(seed, &full).state;
    let keep = (1.0 / (1.0 - p)) as f32;
    // value i is the stream's (i + 1)-th draw: SplitMix64's state advances by a constant, so
    // the draws are computed in parallel from their index, the same values as in sequence
    let mut out = vec![0f32; len];
    const CH: usize = 1 << 14;
    out.par_chunks_mut(CH).enumerate().for_each(|(c, o)| {
        let mut rng = SplitMix64 {
            state: start.wrapping_add(GOLDEN.wrapping_mul((c * CH) as u64)),
        };
        for v in o.iter_mut() {
            *v = if rng.next_f64() < p { 0.0 } else { keep };
        }
    });
    out
}

/// PEFT's LoRA A init (`kaiming_uniform_(a=√5)` on `[rows, cols]`, fan_in = `cols`):
/// row-major values uniform in `[−1/√cols, +1/√cols)`, depending only on `(seed, key)`
/// (`key` e.g. `[module index]`; the init purpose is prefixed here).
pub fn kaiming_uniform_a(rows: usize, cols: usize, seed: u64, key: &[u64]) -> Vec<f32> {
    let mut full = Vec::with_capacity(key.len() + 1);
    full.push(purpose::LORA_INIT);
    full.extend_from_slice(key);
    let mut rng = SplitMix64::keyed(seed, &full);
    let bound = 1.0 / (cols.max(1) as f64).sqrt();
    (0..rows * cols)
        .map(|_| ((2.0 * rng.next_f64() - 1.0) * bound) as f32)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Ctrl-C
// ---------------------------------------------------------------------------------------------

/// Exit status after a second Ctrl-C (128 + SIGINT, as a shell reports it).
pub const INTERRUPT_EXIT_STATUS: i32 = 130;

/// Install the process's Ctrl-C (SIGINT) handler and return its flag: the first Ctrl-C sets the
/// flag (the training loop checks it, saves a checkpoint and stops); a second one exits at
/// once with status 130. Calling it again returns the same flag (the handler is installed
/// once per process).
pub fn install_interrupt_flag() -> Result<Arc<AtomicBool>> {
    static INSTALLED: Mutex<Option<Arc<AtomicBool>>> = Mutex::new(None);
    let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(flag) = installed.as_ref() {
        return Ok(flag.clone());
    }
    let flag = Arc::new(AtomicBool::new(false));
    let handler_flag = flag.clone();
    ctrlc::set_handler(move || {
        if handler_flag.swap(true, Ordering::SeqCst) {
            eprintln!("\nftconv: interrupted again, exiting now (no checkpoint)");
            std::process::exit(INTERRUPT_EXIT_STATUS);
        }
        eprintln!(
            "\nftconv: interrupted, stopping after the current step and saving a checkpoint \
             (Ctrl-C again to exit at once)"
        );
    })
    .context("cannot install the Ctrl-C handler")?;
    *installed = Some(flag.clone());
    Ok(flag)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn var(v: &[f32]) -> Var {
        Var::from_tensor(&Tensor::from_slice(v, v.len(), &Device::Cpu).unwrap()).unwrap()
    }

    fn vals(v: &Var) -> Vec<f32> {
        v.as_tensor().to_vec1::<f32>().unwrap()
    }

    fn t(v: &[f32]) -> Tensor {
        Tensor::from_slice(v, v.len(), &Device::Cpu).unwrap()
    }

    /// Textbook AdamW in f64 (Loshchilov & Hutter with torch's ε placement), written
    /// independently of the f32 code: p ← p(1 − lr·wd); m ← β1m + (1−β1)g; v ← β2v + (1−β2)g²;
    /// p ← p − lr·m̂ / (√v̂ + ε).
    fn reference(p0: &[f64], grads: &[Vec<f64>], lrs: &[f64], c: AdamWConfig) -> Vec<f64> {
        let mut p = p0.to_vec();
        let mut m = vec![0.0; p.len()];
        let mut v = vec![0.0; p.len()];
        for (k, (g, &lr)) in grads.iter().zip(lrs).enumerate() {
            let t = (k + 1) as i32;
            for i in 0..p.len() {
                p[i] *= 1.0 - lr * c.weight_decay;
                m[i] = c.beta1 * m[i] + (1.0 - c.beta1) * g[i];
                v[i] = c.beta2 * v[i] + (1.0 - c.beta2) * g[i] * g[i];
                let mhat = m[i] / (1.0 - c.beta1.powi(t));
                let vhat = v[i] / (1.0 - c.beta2.powi(t));
                p[i] -= lr * mhat / (vhat.sqrt() + c.eps);
            }
        }
        p
    }

    const P0: [f32; 5] = [0.5, -1.0, 2.0, 0.0, 1e-3];

    fn grads3() -> Vec<Vec<f32>> {
        vec![
            vec![0.1, -0.2, 0.3, 1e-4, -2.0],
            vec![-0.05, -0.1, 0.6, 0.0, 1.5],
            vec![0.2, 0.3, -0.1, -1e-3, 0.25],
        ]
    }

    fn run(cfg: AdamWConfig, lrs: &[f64]) -> Vec<f32> {
        let params = vec![("w".to_string(), var(&P0))];
        let mut opt = AdamW::for_vars(&params, cfg).unwrap();
        for (g, &lr) in grads3().iter().zip(lrs) {
            opt.step(&params, &[t(g)], lr).unwrap();
        }
        assert_eq!(opt.t, lrs.len() as u64);
        vals(&params[0].1)
    }

    fn check_against_reference(cfg: AdamWConfig, lrs: &[f64]) {
        let got = run(cfg, lrs);
        let p0: Vec<f64> = P0.iter().map(|&x| x as f64).collect();
        let g: Vec<Vec<f64>> = grads3()
            .iter()
            .map(|g| g.iter().map(|&x| x as f64).collect())
            .collect();
        let want = reference(&p0, &g, lrs, cfg);
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                (*a as f64 - b).abs() <= 2e-6 * b.abs().max(1e-2),
                "element {i}: f32 {a} vs f64 reference {b}"
            );
        }
    }

    #[test]
    fn adamw_matches_f64_reference_without_weight_decay() {
        check_against_reference(cfg_nowd(), &[1e-2, 8e-3, 5e-3]);
    }

    #[test]
    fn adamw_matches_f64_reference_with_weight_decay() {
        check_against_reference(cfg_wd(), &[5e-2, 5e-2, 2e-2]);
    }

    #[test]
    fn adamw_large_parameter_matches_reference() {
        // More elements than one parallel chunk (1 << 14), with a ragged last chunk.
        let n = 40_003;
        let p0: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 256.0)
            .collect();
        let gs: Vec<Vec<f32>> = (0..2)
            .map(|k| {
                (0..n)
                    .map(|i| (((i * 31 + k * 17) % 101) as f32 - 50.0) / 512.0)
                    .collect()
            })
            .collect();
        let cfg = cfg_wd();
        let lrs = [1e-2, 5e-3];
        let params = vec![("w".to_string(), var(&p0))];
        let mut opt = AdamW::for_vars(&params, cfg).unwrap();
        for (g, &lr) in gs.iter().zip(&lrs) {
            opt.step(&params, &[t(g)], lr).unwrap();
        }
        let p64: Vec<f64> = p0.iter().map(|&x| x as f64).collect();
        let g64: Vec<Vec<f64>> = gs
            .iter()
            .map(|g| g.iter().map(|&x| x as f64).collect())
            .collect();
        let want = reference(&p64, &g64, &lrs, cfg);
        for (i, (a, b)) in vals(&params[0].1).iter().zip(&want).enumerate() {
            assert!(
                (*a as f64 - b).abs() <= 2e-6 * b.abs().max(1e-2),
                "element {i}: {a} vs {b}"
            );
        }
    }

    #[test]
    fn adamw_first_step_by_hand() {
        // Step 1 from zero state: m̂ = g, v̂ = g², so p1 = p0(1 − lr·wd) − lr·g/(|g| + ε).
        let cfg = AdamWConfig {
            weight_decay: 0.5,
            ..Default::default()
        };
        let params = vec![("a".to_string(), var(&[1.0, -2.0, 3.0]))];
        let mut opt = AdamW::for_vars(&params, cfg).unwrap();
        opt.step(&params, &[t(&[0.25, -4.0, 0.0])], 0.1).unwrap();
        let got = vals(&params[0].1);
        // 1·0.95 − 0.1·0.25/(0.25+1e-8); −2·0.95 + 0.1; 3·0.95 − 0 (g = 0 ⇒ no Adam term)
        let want = [
            0.95 - 0.1 * 0.25 / (0.25 + 1e-8),
            -1.9 + 0.1 * 4.0 / (4.0 + 1e-8),
            2.85,
        ];
        for (a, b) in got.iter().zip(want) {
            assert!((*a as f64 - b).abs() < 1e-6, "{a} vs {b}");
        }
        // State after one step: m = 0.1·g, v = 0.001·g².
        assert_eq!(opt.state[0].exp_avg, vec![0.025f32, -0.4, 0.0]);
        let v = &opt.state[0].exp_avg_sq;
        assert!((v[0] - 6.25e-5).abs() < 1e-11 && (v[1] - 0.016).abs() < 1e-9 && v[2] == 0.0);
    }

    #[test]
    fn adamw_zero_lr_and_zero_grad_keep_params() {
        let params = vec![("a".to_string(), var(&[1.0, -2.0]))];
        let mut opt = AdamW::for_vars(&params, AdamWConfig::default()).unwrap();
        opt.step(&params, &[t(&[0.3, -0.7])], 0.0).unwrap();
        assert_eq!(vals(&params[0].1), vec![1.0, -2.0]);
        // The moments still advance (torch does the same with lr = 0, e.g. the first warm-up step).
        assert_eq!(opt.t, 1);
        assert!(opt.state[0].exp_avg[0] != 0.0);
    }

    // torch 2.15.0 (CPU, AVX2 kernels) `torch.optim.AdamW(foreach=False)` on f32 tensors, as
    // f32 bit patterns after 3 steps, produced by this script (foreach=True gives the same bits):
    //   P0 = [0.5, -1.0, 2.0, 0.0, 1e-3]; G = grads3();   (the 5-element case)
    //   P40[i] = ((i*37 % 23) - 11)/8; G40[k][i] = ((i*13 + k*7) % 17 - 8)/64   (i < 40, k < 3)
    //   nowd: betas (0.9, 0.999), eps 1e-8, wd 0,   lrs [1e-2, 8e-3, 5e-3]
    //   wd:   betas (0.8, 0.99),  eps 1e-6, wd 0.1, lrs [5e-2, 5e-2, 2e-2]
    //   p = nn.Parameter(tensor(P0, float32)); opt = AdamW([p], lr, betas, eps, weight_decay)
    //   per step: group["lr"] = lr; p.grad = tensor(g, float32); opt.step()
    //   p, state["exp_avg"], state["exp_avg_sq"] .view(int32) printed as hex.
    // Elements 0..32 of a 40-element tensor go through torch's vectorized kernels, the rest and
    // the 5-element case through its scalar loops (compiled with FMA contraction too).
    const TORCH_5_NOWD_P: [u32; 5] = [0x3ef81ab5, 0xbf7ba2c6, 0x3ffd51d8, 0xbc4bc88a, 0x3c405953];
    const TORCH_5_NOWD_M: [u32; 5] = [0x3cc154ca, 0x3b9d4953, 0x3d8be0df, 0xb8c0ba70, 0xbb031259];
    const TORCH_5_NOWD_V: [u32; 5] = [0x385c1b4d, 0x3912b4d1, 0x39f0e3b1, 0x308acf85, 0x3bce8324];
    const TORCH_5_WD_P: [u32; 5] = [0x3ed709e7, 0xbf656efa, 0x3feec6a4, 0xbd89459a, 0x3d51e56f];
    const TORCH_5_WD_M: [u32; 5] = [0x3d378035, 0x3c96bb99, 0x3dea4a8d, 0xb9444b1f, 0x3d0b4395];
    const TORCH_5_WD_V: [u32; 5] = [0x3a0909d5, 0x3ab65390, 0x3b94f75f, 0x322d7b86, 0x3d7e60c4];
    const TORCH_40_NOWD_P: [u32; 40] = [
        0xbfade370, 0x3ebac01a, 0xbf44d591, 0x3f8155b2, 0xbde16bcb, 0xbfa1a6b2, 0x3efe77c5,
        0xbf1e1c15, 0x3f91aac4, 0xbc788d9f, 0xbf90a451, 0x3f213747, 0xbef7b9c8, 0x3f9dd41f,
        0x3df09f0f, 0xbf80f071, 0x3f4375b8, 0xbeb78dc0, 0x3faeb007, 0x3e6ca9ba, 0xbf5d549c,
        0x3f63d287, 0xbe869ac5, 0xbfb0620f, 0x3ec3c7d7, 0xbf3caa79, 0x3f7c1dc9, 0xbe052285,
        0xbf9f645c, 0x3f04231b, 0xbf2457c3, 0x3f8f09f1, 0xbbf07120, 0xbf8e4525, 0x3f243920,
        0xbf029ff3, 0x3f9d9537, 0x3e0aad91, 0xbf7c2d79, 0x3f3cb29d,
    ];
    const TORCH_40_NOWD_M: [u32; 40] = [
        0xbb0d4fdd, 0x3b1eb851, 0x3c19db23, 0xbbf74bc7, 0x3b083129, 0x3bda1cad, 0xbc2872b0,
        0xbb591689, 0x3bced915, 0x3c326e97, 0xbbc624dd, 0x3a71a9f1, 0xbc833333, 0x3c77ceda,
        0xbaed9169, 0x3ba8f5c2, 0xbc410625, 0xbb0d4fdd, 0x3b1eb851, 0x3c19db23, 0xbbf74bc7,
        0x3b083129, 0x3bda1cad, 0xbc2872b0, 0xbb591689, 0x3bced915, 0x3c326e97, 0xbbc624dd,
        0x3a71a9f1, 0xbc833333, 0x3c77ceda, 0xbaed9169, 0x3ba8f5c2, 0xbc410625, 0xbb0d4fdd,
        0x3b1eb851, 0x3c19db23, 0xbbf74bc7, 0x3b083129, 0x3bda1cad,
    ];
    const TORCH_40_NOWD_V: [u32; 40] = [
        0x37ce957e, 0x375ce07e, 0x378d2d46, 0x3779b77e, 0x37c880df, 0x37797ee6, 0x378d2a21,
        0x375d0c82, 0x37ceb2d6, 0x3797553e, 0x376d4b2a, 0x3758eeb0, 0x37be5a7d, 0x37be319d,
        0x3758cf3e, 0x376d5e08, 0x379777d3, 0x37ce957e, 0x375ce07e, 0x378d2d46, 0x3779b77e,
        0x37c880df, 0x37797ee6, 0x378d2a21, 0x375d0c82, 0x37ceb2d6, 0x3797553e, 0x376d4b2a,
        0x3758eeb0, 0x37be5a7d, 0x37be319d, 0x3758cf3e, 0x376d5e08, 0x379777d3, 0x37ce957e,
        0x375ce07e, 0x378d2d46, 0x3779b77e, 0x37c880df, 0x37797ee6,
    ];
    const TORCH_40_WD_P: [u32; 40] = [
        0xbfa2f01c, 0x3ea5eeed, 0xbf578c1b, 0x3f8450e3, 0xbd3c867d, 0xbfa5d934, 0x3ef86b98,
        0xbf1693a4, 0x3f96e167, 0xbd95bcfb, 0xbf90baa1, 0x3f22285a, 0xbed4d465, 0x3f937088,
        0x3dbb5ccb, 0xbf841866, 0x3f4dd5c1, 0xbe91df6c, 0x3fa7f3fd, 0x3e1591a7, 0xbf51a132,
        0x3f71281c, 0xbe9d83ca, 0xbfaf0696, 0x3eccb9c1, 0xbf2c8029, 0x3f6a38e5, 0xbe1212f7,
        0xbf9c0d4d, 0x3f128651, 0xbf3361e9, 0x3f8a2e0e, 0xbd340478, 0xbf86369b, 0x3f3400ce,
        0xbf0a5afc, 0x3f912a76, 0x3e2d3d4b, 0xbf691adc, 0x3f2e2e9f,
    ];
    const TORCH_40_WD_M: [u32; 40] = [
        0x39831272, 0x3b75c28f, 0x3c810625, 0xbc71a9fd, 0x3c010625, 0x3c3a5e36, 0xbc9cac08,
        0xbbe978d4, 0x3c7df3b7, 0x3c9ba5e3, 0xbc3c6a7e, 0x3a031262, 0xbcf5c28f, 0x3cda1cac,
        0xbb7df3b9, 0x3c051eb7, 0xbcb74bc7, 0x39831272, 0x3b75c28f, 0x3c810625, 0xbc71a9fd,
        0x3c010625, 0x3c3a5e36, 0xbc9cac08, 0xbbe978d4, 0x3c7df3b7, 0x3c9ba5e3, 0xbc3c6a7e,
        0x3a031262, 0xbcf5c28f, 0x3cda1cac, 0xbb7df3b9, 0x3c051eb7, 0xbcb74bc7, 0x39831272,
        0x3b75c28f, 0x3c810625, 0xbc71a9fd, 0x3c010625, 0x3c3a5e36,
    ];
    const TORCH_40_WD_V: [u32; 40] = [
        0x397f4624, 0x3908538f, 0x392ef35e, 0x391b4aba, 0x3978623d, 0x3919ea9a, 0x392ecc3e,
        0x3909656e, 0x398059a7, 0x393ab69e, 0x3912c461, 0x3906b51c, 0x396cb439, 0x396ab79a,
        0x3905f17c, 0x391339c1, 0x393c64fe, 0x397f4624, 0x3908538f, 0x392ef35e, 0x391b4aba,
        0x3978623d, 0x3919ea9a, 0x392ecc3e, 0x3909656e, 0x398059a7, 0x393ab69e, 0x3912c461,
        0x3906b51c, 0x396cb439, 0x396ab79a, 0x3905f17c, 0x391339c1, 0x393c64fe, 0x397f4624,
        0x3908538f, 0x392ef35e, 0x391b4aba, 0x3978623d, 0x3919ea9a,
    ];

    fn cfg_nowd() -> AdamWConfig {
        AdamWConfig {
            lr: 1e-2,
            ..Default::default()
        }
    }

    fn cfg_wd() -> AdamWConfig {
        AdamWConfig {
            lr: 5e-2,
            beta1: 0.8,
            beta2: 0.99,
            eps: 1e-6,
            weight_decay: 0.1,
        }
    }

    fn ulps(a: f32, b: u32) -> u32 {
        let key = |x: u32| -> i64 {
            if x & 0x8000_0000 != 0 {
                -((x & 0x7fff_ffff) as i64)
            } else {
                x as i64
            }
        };
        (key(a.to_bits()) - key(b)).unsigned_abs() as u32
    }

    /// Largest ulp distance of p, m, v after 3 steps from torch's bits.
    fn torch_distance(
        p0: &[f32],
        grads: &[Vec<f32>],
        cfg: AdamWConfig,
        lrs: &[f64],
        want: [&[u32]; 3],
    ) -> [u32; 3] {
        let params = vec![("w".to_string(), var(p0))];
        let mut opt = AdamW::for_vars(&params, cfg).unwrap();
        for (g, &lr) in grads.iter().zip(lrs) {
            opt.step(&params, &[t(g)], lr).unwrap();
        }
        let got = [
            vals(&params[0].1),
            opt.state[0].exp_avg.clone(),
            opt.state[0].exp_avg_sq.clone(),
        ];
        let mut d = [0u32; 3];
        for k in 0..3 {
            assert_eq!(got[k].len(), want[k].len());
            d[k] = got[k]
                .iter()
                .zip(want[k])
                .map(|(&a, &b)| ulps(a, b))
                .max()
                .unwrap();
        }
        d
    }

    /// name, p0, grads, config, lrs, torch's p / exp_avg / exp_avg_sq bits.
    type TorchCase<'a> = (
        &'a str,
        &'a [f32],
        Vec<Vec<f32>>,
        AdamWConfig,
        [f64; 3],
        [&'a [u32]; 3],
    );

    #[test]
    fn adamw_matches_torch() {
        let p40: Vec<f32> = (0..40).map(|i| ((i * 37 % 23) - 11) as f32 / 8.0).collect();
        let g40: Vec<Vec<f32>> = (0..3)
            .map(|k| {
                (0..40)
                    .map(|i| ((i * 13 + k * 7) % 17 - 8) as f32 / 64.0)
                    .collect()
            })
            .collect();
        let cases: [TorchCase; 4] = [
            (
                "5 nowd",
                &P0,
                grads3(),
                cfg_nowd(),
                [1e-2, 8e-3, 5e-3],
                [&TORCH_5_NOWD_P, &TORCH_5_NOWD_M, &TORCH_5_NOWD_V],
            ),
            (
                "5 wd",
                &P0,
                grads3(),
                cfg_wd(),
                [5e-2, 5e-2, 2e-2],
                [&TORCH_5_WD_P, &TORCH_5_WD_M, &TORCH_5_WD_V],
            ),
            (
                "40 nowd",
                &p40,
                g40.clone(),
                cfg_nowd(),
                [1e-2, 8e-3, 5e-3],
                [&TORCH_40_NOWD_P, &TORCH_40_NOWD_M, &TORCH_40_NOWD_V],
            ),
            (
                "40 wd",
                &p40,
                g40.clone(),
                cfg_wd(),
                [5e-2, 5e-2, 2e-2],
                [&TORCH_40_WD_P, &TORCH_40_WD_M, &TORCH_40_WD_V],
            ),
        ];
        for (name, p0, g, cfg, lrs, want) in cases {
            let d = torch_distance(p0, &g, cfg, &lrs, want);
            eprintln!("{name}: max ulp distance p/m/v = {d:?}");
            // Moments bit-identical; parameters within 1 ulp (torch's MKL sqrt, see the module doc).
            assert!(d[0] <= 1 && d[1] == 0 && d[2] == 0, "{name}: {d:?}");
        }
    }

    fn two_params() -> Vec<(String, Var)> {
        vec![
            (
                "layers.0.q_proj.lora_A".to_string(),
                var(&[0.1, -0.2, 0.3, 0.4]),
            ),
            ("layers.0.q_proj.lora_B".to_string(), var(&[0.0, 0.0])),
        ]
    }

    fn grads_for(step: usize) -> Vec<Tensor> {
        let s = step as f32 + 1.0;
        vec![
            t(&[0.01 * s, -0.02, 0.5 / s, -0.3 * s]),
            t(&[1.0 / s, -0.25 * s]),
        ]
    }

    #[test]
    fn save_load_resume_is_bit_exact() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = AdamWConfig {
            weight_decay: 0.01,
            ..Default::default()
        };
        let lrs = [1e-3, 2e-3, 1.5e-3];

        let straight = two_params();
        let mut a = AdamW::for_vars(&straight, cfg).unwrap();
        for (k, &lr) in lrs.iter().enumerate() {
            a.step(&straight, &grads_for(k), lr).unwrap();
        }

        let resumed = two_params();
        let mut b = AdamW::for_vars(&resumed, cfg).unwrap();
        b.step(&resumed, &grads_for(0), lrs[0]).unwrap();
        let path = dir.path().join("optimizer.safetensors");
        b.save(&path).unwrap();
        // Parameters come back from the adapter checkpoint; here: copy the values over.
        let fresh = two_params();
        for ((_, dst), (_, src)) in fresh.iter().zip(&resumed) {
            dst.set(&src.as_tensor().copy().unwrap()).unwrap();
        }
        drop(b);
        let names: Vec<String> = fresh.iter().map(|(n, _)| n.clone()).collect();
        let shapes = vec![vec![4], vec![2]];
        let mut c = AdamW::load(&path, &names, &shapes, cfg).unwrap();
        assert_eq!(c.t, 1);
        for (k, &lr) in lrs.iter().enumerate().skip(1) {
            c.step(&fresh, &grads_for(k), lr).unwrap();
        }
        assert_eq!(c, a);
        for ((_, x), (_, y)) in straight.iter().zip(&fresh) {
            let (x, y) = (vals(x), vals(y));
            assert_eq!(
                x.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                y.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn saved_file_layout() {
        let dir = tempfile::tempdir().unwrap();
        let params = two_params();
        let mut opt = AdamW::for_vars(&params, AdamWConfig::default()).unwrap();
        opt.step(&params, &grads_for(0), 1e-3).unwrap();
        opt.step(&params, &grads_for(1), 1e-3).unwrap();
        let path = dir.path().join("o.safetensors");
        opt.save(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()["step"], "2");
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut names = st.names();
        names.sort();
        assert_eq!(
            names,
            [
                "layers.0.q_proj.lora_A.exp_avg",
                "layers.0.q_proj.lora_A.exp_avg_sq",
                "layers.0.q_proj.lora_B.exp_avg",
                "layers.0.q_proj.lora_B.exp_avg_sq"
            ]
        );
        let v = st.tensor("layers.0.q_proj.lora_B.exp_avg_sq").unwrap();
        assert_eq!((v.dtype(), v.shape()), (Dtype::F32, &[2usize][..]));
        // No temporary file left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn load_rejects_mismatches_with_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let params = two_params();
        let opt = AdamW::for_vars(&params, AdamWConfig::default()).unwrap();
        let path = dir.path().join("o.safetensors");
        opt.save(&path).unwrap();
        let cfg = AdamWConfig::default();
        let a = "layers.0.q_proj.lora_A".to_string();
        let b = "layers.0.q_proj.lora_B".to_string();
        let err = |names: &[String], shapes: &[Vec<usize>]| {
            format!("{:#}", AdamW::load(&path, names, shapes, cfg).unwrap_err())
        };
        let fname = path.display().to_string();

        let e = err(&[a.clone(), "x.lora_A".into()], &[vec![4], vec![2]]);
        assert!(
            e.contains(&fname) && e.contains("no tensor x.lora_A.exp_avg"),
            "{e}"
        );
        let e = err(&[a.clone(), b.clone()], &[vec![2, 2], vec![2]]);
        assert!(
            e.contains(&fname) && e.contains("lora_A.exp_avg has shape [4]"),
            "{e}"
        );
        let e = err(std::slice::from_ref(&a), &[vec![4]]);
        assert!(
            e.contains(&fname) && e.contains("not being trained") && e.contains(&b),
            "{e}"
        );
        let e = err(&[a.clone(), a.clone()], &[vec![4], vec![4]]);
        assert!(e.contains("listed twice"), "{e}");

        // A safetensors file without the step (e.g. an adapter given by mistake).
        let other = dir.path().join("adapter.safetensors");
        let data = [0u8; 16];
        let view = TensorView::new(Dtype::F32, vec![4], &data).unwrap();
        safetensors::serialize_to_file([("w", view)], None, &other).unwrap();
        let e = format!(
            "{:#}",
            AdamW::load(&other, std::slice::from_ref(&a), &[vec![4]], cfg).unwrap_err()
        );
        assert!(
            e.contains("adapter.safetensors") && e.contains("\"step\""),
            "{e}"
        );
        let e = format!(
            "{:#}",
            AdamW::load(&dir.path().join("missing"), &[a], &[vec![4]], cfg).unwrap_err()
        );
        assert!(e.contains("missing: cannot read"), "{e}");
    }

    #[test]
    fn step_rejects_wrong_inputs_without_changing_anything() {
        let params = two_params();
        let mut opt = AdamW::for_vars(&params, AdamWConfig::default()).unwrap();
        let before = opt.clone();
        let swapped = vec![params[1].clone(), params[0].clone()];
        let g = grads_for(0);
        let e = opt
            .step(&swapped, &[g[1].clone(), g[0].clone()], 1e-3)
            .unwrap_err();
        assert!(e.to_string().contains("lora_B given where"), "{e}");
        let e = opt.step(&params, &g[..1], 1e-3).unwrap_err();
        assert!(e.to_string().contains("1 gradients"), "{e}");
        let e = opt
            .step(&params, &[g[0].clone(), t(&[1.0, 2.0, 3.0])], 1e-3)
            .unwrap_err();
        assert!(e.to_string().contains("gradient shape [3]"), "{e}");
        assert_eq!(opt, before);
        assert_eq!(vals(&params[0].1), vec![0.1, -0.2, 0.3, 0.4]);
    }

    #[test]
    fn clip_grad_norm_scales_like_torch() {
        let mut g = vec![t(&[3.0, 4.0]), t(&[12.0])];
        let n = clip_grad_norm(&mut g, 6.5).unwrap();
        assert_eq!(n, 13.0);
        let c = (1.0f32 / (13.0 + 1e-6f32)) * 6.5;
        assert_eq!(g[0].to_vec1::<f32>().unwrap(), vec![3.0 * c, 4.0 * c]);
        assert_eq!(g[1].to_vec1::<f32>().unwrap(), vec![12.0 * c]);
        // The clipped norm is max_norm (up to the 1e-6 and f32 rounding).
        let n2 = clip_grad_norm(&mut g, 0.0).unwrap();
        assert!((n2 - 6.5).abs() < 1e-5, "{n2}");
    }

    #[test]
    fn clip_grad_norm_matches_torch() {
        // torch 2.15 CPU: grads [3, 4], [12], [0.1, -0.7, 1e-3] (f32) on three parameters,
        // `torch.nn.utils.clip_grad_norm_(params, max_norm)`; the norm was 13.019216537475586
        // (0x41504eb6) and the clipped gradients, as f32 bits, were:
        let cases: [(f64, [u32; 6]); 2] = [
            (
                6.5,
                [
                    0x3fbfb773, 0x3fff9f44, 0x40bfb773, 0x3d4c7f6a, 0xbeb2ef7c, 0x3a02e0e8,
                ],
            ),
            (
                0.3,
                [
                    0x3d8d934a, 0x3dbcc462, 0x3e8d934a, 0x3b170382, 0xbc842311, 0x37c14c2c,
                ],
            ),
        ];
        for (max_norm, want) in cases {
            let mut g = vec![t(&[3.0, 4.0]), t(&[12.0]), t(&[0.1, -0.7, 1e-3])];
            let n = clip_grad_norm(&mut g, max_norm).unwrap();
            assert_eq!((n as f32).to_bits(), 0x41504eb6);
            let got: Vec<u32> = g
                .iter()
                .flat_map(|x| x.to_vec1::<f32>().unwrap())
                .map(f32::to_bits)
                .collect();
            assert_eq!(got, want, "max_norm {max_norm}");
        }
    }

    #[test]
    fn clip_grad_norm_no_op_below_max_or_disabled() {
        for max in [13.0 + 1e-3, 100.0, 0.0] {
            let mut g = vec![t(&[3.0, 4.0]), t(&[12.0])];
            assert_eq!(clip_grad_norm(&mut g, max).unwrap(), 13.0);
            assert_eq!(g[0].to_vec1::<f32>().unwrap(), vec![3.0, 4.0]);
            assert_eq!(g[1].to_vec1::<f32>().unwrap(), vec![12.0]);
        }
        let mut none: Vec<Tensor> = vec![];
        assert_eq!(clip_grad_norm(&mut none, 1.0).unwrap(), 0.0);
        let mut zeros = vec![t(&[0.0, 0.0])];
        assert_eq!(clip_grad_norm(&mut zeros, 1.0).unwrap(), 0.0);
        assert_eq!(zeros[0].to_vec1::<f32>().unwrap(), vec![0.0, 0.0]);
    }

    #[test]
    fn schedules_at_boundaries() {
        use Schedule::*;
        let b = 2e-4;
        // No warm-up: the first step runs at the base rate; decays reach 0 at step = total.
        for s in [Constant, Linear, Cosine] {
            assert_eq!(lr_at(s, b, 0, 100, 0), b);
        }
        assert_eq!(lr_at(Constant, b, 0, 100, 99), b);
        assert_eq!(lr_at(Linear, b, 0, 100, 99), b * 0.01);
        assert_eq!(lr_at(Linear, b, 0, 100, 50), b * 0.5);
        assert_eq!(lr_at(Linear, b, 0, 100, 100), 0.0);
        assert_eq!(lr_at(Linear, b, 0, 100, 150), 0.0);
        assert!((lr_at(Cosine, b, 0, 100, 50) - b * 0.5).abs() < 1e-18);
        let last = lr_at(Cosine, b, 0, 100, 99);
        let want = b * 0.5 * (1.0 + (std::f64::consts::PI * 0.99).cos());
        assert_eq!(last, want);
        assert!(last > 0.0 && last < b * 1e-3);
        assert!(lr_at(Cosine, b, 0, 100, 100).abs() < 1e-20);
        assert!(lr_at(Cosine, b, 0, 100, 250) >= 0.0);

        // Warm-up 10 of 110: step 0 has rate 0, step 5 half, step 10 the full rate.
        for s in [Constant, Linear, Cosine] {
            assert_eq!(lr_at(s, b, 10, 110, 0), 0.0);
            assert_eq!(lr_at(s, b, 10, 110, 5), b * 5.0 / 10.0);
            assert_eq!(lr_at(s, b, 10, 110, 9), b * 9.0 / 10.0);
            assert_eq!(lr_at(s, b, 10, 110, 10), b);
        }
        assert_eq!(lr_at(Constant, b, 10, 110, 109), b);
        assert_eq!(lr_at(Linear, b, 10, 110, 60), b * 0.5);
        assert_eq!(lr_at(Linear, b, 10, 110, 109), b * 0.01);
        assert!((lr_at(Cosine, b, 10, 110, 60) - b * 0.5).abs() < 1e-18);

        // Degenerate: warm-up ≥ total (transformers' max(1, …) guards).
        assert_eq!(lr_at(Linear, b, 5, 5, 5), 0.0);
        assert_eq!(lr_at(Linear, b, 5, 3, 4), b * 4.0 / 5.0);
        assert_eq!(lr_at(Constant, b, 1, 1, 0), 0.0);
        assert_eq!(lr_at(Linear, b, 0, 1, 0), b);
    }

    #[test]
    fn rng_is_deterministic_and_keyed() {
        assert_eq!(rng_u64(42, &[1, 2, 3]), rng_u64(42, &[1, 2, 3]));
        let keys: Vec<(u64, Vec<u64>)> = vec![
            (42, vec![]),
            (42, vec![0]),
            (42, vec![0, 0]),
            (42, vec![1, 2, 3]),
            (42, vec![1, 3, 2]),
            (42, vec![2, 2, 3]),
            (43, vec![1, 2, 3]),
            (0, vec![]),
            (0, vec![0]),
        ];
        let vals: HashSet<u64> = keys.iter().map(|(s, k)| rng_u64(*s, k)).collect();
        assert_eq!(vals.len(), keys.len());

        let mut a = SplitMix64::keyed(7, &[purpose::DROPOUT, 5]);
        let mut b = SplitMix64::keyed(7, &[purpose::DROPOUT, 5]);
        let xs: Vec<u64> = (0..100).map(|_| a.next_u64()).collect();
        assert_eq!(xs, (0..100).map(|_| b.next_u64()).collect::<Vec<_>>());
        assert_eq!(xs.iter().collect::<HashSet<_>>().len(), 100);
        // SplitMix64's published first output for seed 0.
        assert_eq!(SplitMix64::new(0).next_u64(), 0xe220_a839_7b1d_cdaf);

        let mut r = SplitMix64::new(1);
        for _ in 0..1000 {
            let f = r.next_f32();
            assert!((0.0..1.0).contains(&f));
            let d = r.next_f64();
            assert!((0.0..1.0).contains(&d));
            assert!(r.below(3) < 3);
            assert_eq!(r.below(1), 0);
        }
        // below() is roughly uniform.
        let mut counts = [0usize; 6];
        for _ in 0..60_000 {
            counts[r.below(6) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (9_400..10_600).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn shuffle_is_a_keyed_permutation() {
        for n in [0usize, 1, 2, 7, 1000] {
            let mut p = shuffle_indices(n, 42, 0);
            p.sort();
            assert_eq!(p, (0..n).collect::<Vec<_>>());
        }
        let a = shuffle_indices(1000, 42, 0);
        assert_eq!(a, shuffle_indices(1000, 42, 0));
        assert_ne!(a, shuffle_indices(1000, 42, 1));
        assert_ne!(a, shuffle_indices(1000, 43, 0));
        assert_ne!(a, (0..1000).collect::<Vec<_>>());
        // Each position of a 3-element shuffle takes each value about 1/3 of the time.
        let mut first = [0usize; 3];
        for epoch in 0..3000 {
            first[shuffle_indices(3, 9, epoch)[0]] += 1;
        }
        assert!(first.iter().all(|&c| (850..1150).contains(&c)), "{first:?}");
    }

    #[test]
    fn dropout_mask_is_the_sequential_stream() {
        let (seed, key, p) = (11u64, [3u64, 1, 7], 0.3);
        let n = 40_000; // several parallel chunks and a partial one
        let m = dropout_mask(n, p, seed, &key);
        let mut rng = SplitMix64::keyed(seed, &[purpose::DROPOUT, 3, 1, 7]);
        let keep = (1.0 / (1.0 - p)) as f32;
        for (i, v) in m.iter().enumerate() {
            let want = if rng.next_f64() < p { 0.0 } else { keep };
            assert_eq!(v.to_bits(), want.to_bits(), "value {i}");
        }
    }

    #[test]
    fn dropout_mask_values_and_mean() {
        let p = 0.1;
        let m = dropout_mask(100_000, p, 42, &[3, 0, 17]);
        let keep = (1.0 / (1.0 - p)) as f32;
        assert!(m.iter().all(|&x| x == 0.0 || x == keep));
        let mean = m.iter().map(|&x| x as f64).sum::<f64>() / m.len() as f64;
        assert!((mean - 1.0).abs() < 0.01, "{mean}");
        let dropped = m.iter().filter(|&&x| x == 0.0).count() as f64 / m.len() as f64;
        assert!((dropped - p).abs() < 0.005, "{dropped}");
        assert_eq!(m, dropout_mask(100_000, p, 42, &[3, 0, 17]));
        assert_ne!(m, dropout_mask(100_000, p, 42, &[3, 0, 18]));
        assert_ne!(m, dropout_mask(100_000, p, 42, &[3, 1, 17]));
        assert_ne!(m, dropout_mask(100_000, p, 43, &[3, 0, 17]));
        assert_eq!(dropout_mask(5, 0.0, 1, &[]), vec![1.0; 5]);
        assert_eq!(dropout_mask(5, 1.0, 1, &[]), vec![0.0; 5]);
        // A prefix of a longer mask with the same key is the shorter mask.
        assert_eq!(
            dropout_mask(10, 0.5, 1, &[2])[..],
            dropout_mask(20, 0.5, 1, &[2])[..10]
        );
    }

    #[test]
    fn kaiming_uniform_bounds_and_spread() {
        let (rows, cols) = (16, 4096);
        let a = kaiming_uniform_a(rows, cols, 42, &[0]);
        assert_eq!(a.len(), rows * cols);
        let bound = (1.0 / (cols as f64).sqrt()) as f32;
        assert!(a.iter().all(|&x| x.abs() <= bound));
        let max = a.iter().fold(0f32, |m, &x| m.max(x.abs()));
        assert!(max > bound * 0.999);
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / a.len() as f64;
        assert!(mean.abs() < bound as f64 * 0.01, "{mean}");
        // Variance of U(−b, b) is b²/3.
        let var = a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / a.len() as f64;
        let want = (bound as f64).powi(2) / 3.0;
        assert!((var - want).abs() < want * 0.02, "{var} vs {want}");
        assert_eq!(a, kaiming_uniform_a(rows, cols, 42, &[0]));
        assert_ne!(a, kaiming_uniform_a(rows, cols, 42, &[1]));
        // Different purposes do not share streams: init ≠ dropout for the same key.
        let d = dropout_mask(8, 0.5, 42, &[0]);
        let k = kaiming_uniform_a(1, 8, 42, &[0]);
        assert!(d.iter().zip(&k).all(|(x, y)| x != y));
    }

    #[test]
    fn interrupt_flag_is_set_by_sigint() {
        let a = install_interrupt_flag().unwrap();
        let b = install_interrupt_flag().unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!a.load(Ordering::SeqCst));
        // One SIGINT to this test process: the handler sets the flag (a second would exit).
        let st = std::process::Command::new("kill")
            .args(["-INT", &std::process::id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        let t0 = std::time::Instant::now();
        while !a.load(Ordering::SeqCst) {
            assert!(t0.elapsed().as_secs() < 10, "SIGINT did not set the flag");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}
