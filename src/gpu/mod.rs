//! GPU execution: ftconv's own CUDA kernels (src/gpu/kernels/*.cu), compiled at run time by
//! NVRTC and launched through cudarc, producing the same bytes as the CPU quantizers.
//!
//! `--device auto|cpu|cuda` picks the backend ([`select`]). `auto` uses the GPU when libcuda
//! and libnvrtc load, a context can be created on device 0 and NVRTC is not newer than the
//! driver (newer NVRTC emits code the driver rejects), and says so in one line; otherwise one
//! line says why not and the CPU runs. `cuda` turns an unusable GPU into an error. Without the
//! `cuda` cargo feature everything compiles and `auto` reports "built without CUDA support".
//!
//! Kernels run one thread per independent block (or super-block) and do the reference's f32
//! operations in its order inside the block; NVRTC compiles them with `--fmad=false`, IEEE
//! division and square root, no flush-to-zero and no fast math, so the results are the CPU's.
//! The same sources compile as host C++ (tests/gpu_host), which is how the arithmetic is
//! checked against llama.cpp's and bitsandbytes' outputs on machines without a GPU.

#[cfg(not(feature = "cuda"))]
mod disabled;
#[cfg(feature = "cuda")]
mod enabled;

#[cfg(not(feature = "cuda"))]
pub use disabled::Gpu;
#[cfg(feature = "cuda")]
pub use enabled::{Gpu, compile_cubin};

use crate::quant::{self, GgmlType};
use anyhow::Result;
use std::fmt;
use std::sync::Arc;

/// The `--device` flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DeviceChoice {
    /// The GPU when one is usable, else the CPU.
    #[default]
    Auto,
    /// Always the CPU.
    Cpu,
    /// The GPU, or fail.
    Cuda,
}

/// Why the GPU can't be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GpuUnavailable {
    /// Built without the `cuda` cargo feature.
    NotCompiled,
    /// libcuda (the driver) could not be loaded.
    NoDriverLib,
    /// libnvrtc could not be loaded.
    NoNvrtcLib,
    /// The driver refused (no device, insufficient driver, ...).
    Driver(String),
    /// NVRTC is newer than the driver: its output would be rejected.
    NvrtcTooNew {
        nvrtc: (i32, i32),
        driver: (i32, i32),
    },
    /// A kernel failed to compile or load.
    Compile(String),
    /// cudarc panicked (e.g. a symbol missing from an old driver).
    Panicked(String),
}

impl fmt::Display for GpuUnavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GpuUnavailable::NotCompiled => f.write_str("built without CUDA support"),
            GpuUnavailable::NoDriverLib => {
                f.write_str("libcuda.so.1 not found: no NVIDIA driver installed")
            }
            GpuUnavailable::NoNvrtcLib => f.write_str(
                "libnvrtc.so.13 (or .12) not found: install the CUDA runtime compiler, e.g. `pip install nvidia-cuda-nvrtc==13.0.*` and put its nvidia/cu13/lib on LD_LIBRARY_PATH",
            ),
            GpuUnavailable::Driver(e) => write!(f, "CUDA driver error: {e}"),
            GpuUnavailable::NvrtcTooNew { nvrtc, driver } => write!(
                f,
                "NVRTC {}.{} is newer than the driver's CUDA {}.{}: install an NVRTC no newer than the driver",
                nvrtc.0, nvrtc.1, driver.0, driver.1
            ),
            GpuUnavailable::Compile(e) => write!(f, "kernel compilation failed: {e}"),
            GpuUnavailable::Panicked(e) => write!(f, "CUDA library failure: {e}"),
        }
    }
}

impl std::error::Error for GpuUnavailable {}

/// Where quantization runs.
#[derive(Clone)]
pub enum Backend {
    Cpu,
    Cuda(Arc<Gpu>),
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Backend::Cpu => f.write_str("Cpu"),
            Backend::Cuda(g) => write!(f, "Cuda({})", g.describe()),
        }
    }
}

impl Backend {
    pub fn is_gpu(&self) -> bool {
        matches!(self, Backend::Cuda(_))
    }

    /// Whether this backend runs `ty` on the GPU (F32 copies stay on the CPU).
    pub fn runs_on_gpu(&self, ty: GgmlType) -> bool {
        self.is_gpu() && ty != GgmlType::F32
    }

    /// Quantize whole blocks of `ty` from `x` into `y` (as [`quant::quantize`]; on the CPU in
    /// parallel over runs of blocks). GPU output is spot-checked against the CPU.
    pub fn quantize(&self, ty: GgmlType, x: &[f32], y: &mut [u8]) -> Result<()> {
        match self {
            Backend::Cuda(g) if ty != GgmlType::F32 => {
                g.quantize(ty, x, y)?;
                spot_check_quantize(ty, x, y)
            }
            _ => {
                use rayon::prelude::*;
                let per = (1 << 16) / ty.block_size();
                x.par_chunks(per * ty.block_size())
                    .zip(y.par_chunks_mut(per * ty.type_size()))
                    .for_each(|(x, y)| quant::quantize(ty, x, y));
                Ok(())
            }
        }
    }

    /// bitsandbytes 4-bit quantization of a whole flattened tensor: (packed, absmax), as
    /// [`quant::nf4::quantize_4bit`].
    pub fn quantize_4bit(
        &self,
        qt: quant::nf4::QuantType,
        x: &[f32],
    ) -> Result<(Vec<u8>, Vec<f32>)> {
        match self {
            Backend::Cuda(g) => {
                let (packed, absmax) =
                    g.quantize_4bit(x, quant::nf4::BLOCKSIZE, &FourBitTable::for_type(qt))?;
                spot_check_4bit(qt, x, &packed, &absmax)?;
                Ok((packed, absmax))
            }
            Backend::Cpu => Ok(quant::nf4::quantize_4bit(qt, x)),
        }
    }

    /// Double quantization of `absmax - offset`, as [`quant::nf4::double_quant_with_offset`].
    pub fn double_quant(&self, absmax: &[f32], offset: f32) -> Result<quant::nf4::Nested> {
        match self {
            Backend::Cuda(g) => {
                let (codes, nested_absmax) = g.double_quant(
                    absmax,
                    offset,
                    quant::nf4::dynamic_map(),
                    DoubleQuantRounding::CpuLut,
                )?;
                let n = quant::nf4::Nested {
                    codes,
                    nested_absmax,
                    offset,
                };
                spot_check_double_quant(absmax, &n)?;
                Ok(n)
            }
            Backend::Cpu => Ok(quant::nf4::double_quant_with_offset(absmax, offset)),
        }
    }
}

/// Blocks compared with the CPU at each end of every GPU result.
const SPOT_BLOCKS: usize = 16;

fn mismatch(what: &str, at: usize) -> anyhow::Error {
    anyhow::anyhow!(
        "the GPU's {what} differs from the CPU's at block {at} (a GPU kernel or driver problem; rerun with --device cpu)"
    )
}

/// The first and last [`SPOT_BLOCKS`] of `n` blocks.
fn spot_ranges(n: usize) -> [std::ops::Range<usize>; 2] {
    let k = SPOT_BLOCKS.min(n);
    [0..k, n - k..n]
}

/// Recompute the first and last blocks of a GPU quantization on the CPU: the GPU path must
/// never write bytes the CPU would not.
fn spot_check_quantize(ty: GgmlType, x: &[f32], y: &[u8]) -> Result<()> {
    let (bs, ts) = (ty.block_size(), ty.type_size());
    for r in spot_ranges(x.len() / bs) {
        let mut want = vec![0u8; r.len() * ts];
        quant::quantize(ty, &x[r.start * bs..r.end * bs], &mut want);
        let got = &y[r.start * ts..r.end * ts];
        if let Some(b) = got
            .chunks(ts)
            .zip(want.chunks(ts))
            .position(|(a, b)| a != b)
        {
            return Err(mismatch(&format!("{ty} quantization"), r.start + b));
        }
    }
    Ok(())
}

fn spot_check_4bit(
    qt: quant::nf4::QuantType,
    x: &[f32],
    packed: &[u8],
    absmax: &[f32],
) -> Result<()> {
    let bs = quant::nf4::BLOCKSIZE;
    for r in spot_ranges(absmax.len()) {
        let xs = &x[r.start * bs..(r.end * bs).min(x.len())];
        let mut p = vec![0u8; xs.len().div_ceil(2)];
        let mut a = vec![0f32; r.len()];
        quant::nf4::quantize_run(qt, xs, &mut p, &mut a);
        let got_p = &packed[r.start * bs / 2..r.start * bs / 2 + p.len()];
        for k in 0..r.len() {
            let pk = k * bs / 2..((k + 1) * bs / 2).min(p.len());
            if a[k].to_bits() != absmax[r.start + k].to_bits() || p[pk.clone()] != got_p[pk] {
                return Err(mismatch(
                    &format!("{} quantization", qt.name()),
                    r.start + k,
                ));
            }
        }
    }
    Ok(())
}

fn spot_check_double_quant(absmax: &[f32], n: &quant::nf4::Nested) -> Result<()> {
    const G: usize = 256;
    for r in spot_ranges(n.nested_absmax.len()) {
        let a = &absmax[r.start * G..(r.end * G).min(absmax.len())];
        let want = quant::nf4::double_quant_with_offset(a, n.offset);
        let got_codes = &n.codes[r.start * G..r.start * G + a.len()];
        for k in 0..r.len() {
            let ck = k * G..((k + 1) * G).min(a.len());
            if want.nested_absmax[k].to_bits() != n.nested_absmax[r.start + k].to_bits()
                || want.codes[ck.clone()] != got_codes[ck]
            {
                return Err(mismatch("double quantization", r.start + k));
            }
        }
    }
    Ok(())
}

/// The GPU chosen by the last [`select`] of this process (None: the CPU). Work that runs
/// inside a plan's row sources (adapter merges) uses it; results are the same either way.
pub fn active() -> Option<Arc<Gpu>> {
    ACTIVE.read().ok().and_then(|g| g.clone())
}

static ACTIVE: std::sync::RwLock<Option<Arc<Gpu>>> = std::sync::RwLock::new(None);

fn set_active(b: &Backend) {
    if let Ok(mut g) = ACTIVE.write() {
        *g = match b {
            Backend::Cuda(gpu) => Some(gpu.clone()),
            Backend::Cpu => None,
        };
    }
}

/// The backend `--device` asks for, and the one line to print about it (None for `cpu`).
/// `cuda` without a usable GPU is an error naming the reason.
pub fn select(choice: DeviceChoice) -> Result<(Backend, Option<String>)> {
    let r = select_inner(choice);
    set_active(r.as_ref().map(|r| &r.0).unwrap_or(&Backend::Cpu));
    r
}

fn select_inner(choice: DeviceChoice) -> Result<(Backend, Option<String>)> {
    if choice == DeviceChoice::Cpu {
        return Ok((Backend::Cpu, None));
    }
    match probe() {
        Ok(g) => {
            let line = format!("ftconv: using CUDA: {}", g.describe());
            Ok((Backend::Cuda(g), Some(line)))
        }
        Err(why) => {
            if choice == DeviceChoice::Cuda {
                anyhow::bail!("--device cuda: no usable GPU ({why})");
            }
            let line = format!(
                "ftconv: CUDA unavailable ({why}); using CPU ({} threads)",
                rayon::current_num_threads()
            );
            Ok((Backend::Cpu, Some(line)))
        }
    }
}

/// Probe the GPU once per process (later calls return the first result).
pub fn probe() -> std::result::Result<Arc<Gpu>, GpuUnavailable> {
    use std::sync::OnceLock;
    static GPU: OnceLock<std::result::Result<Arc<Gpu>, GpuUnavailable>> = OnceLock::new();
    GPU.get_or_init(|| Gpu::probe().map(Arc::new)).clone()
}

/// The kernel modules: name and full CUDA source (the shared header prepended).
pub const MODULES: [(&str, &str); 5] = [
    (
        "legacy",
        concat!(
            include_str!("kernels/common.cuh"),
            include_str!("kernels/legacy.cu")
        ),
    ),
    (
        "kquants",
        concat!(
            include_str!("kernels/common.cuh"),
            include_str!("kernels/kquants.cu")
        ),
    ),
    (
        "nf4",
        concat!(
            include_str!("kernels/common.cuh"),
            include_str!("kernels/nf4.cu")
        ),
    ),
    (
        "convert",
        concat!(
            include_str!("kernels/common.cuh"),
            include_str!("kernels/convert.cu")
        ),
    ),
    (
        "merge",
        concat!(
            include_str!("kernels/common.cuh"),
            include_str!("kernels/merge.cu")
        ),
    ),
];

/// The kernel entry points each module must define.
pub const ENTRY_POINTS: [(&str, &[&str]); 5] = [
    (
        "legacy",
        &[
            "ft_quantize_q4_0",
            "ft_quantize_q4_1",
            "ft_quantize_q5_0",
            "ft_quantize_q5_1",
            "ft_quantize_q8_0",
        ],
    ),
    (
        "kquants",
        &[
            "ft_quantize_q2_k",
            "ft_quantize_q3_k",
            "ft_quantize_q4_k",
            "ft_quantize_q5_k",
            "ft_quantize_q6_k",
        ],
    ),
    ("nf4", &["ft_quantize_4bit", "ft_double_quant"]),
    ("convert", &["ft_widen", "ft_narrow"]),
    (
        "merge",
        &["ft_lora_rows", "ft_dora_rows", "ft_dora_cols", "ft_vec_op"],
    ),
];

/// NVRTC options that make the kernels bit-exact: no contraction into FMA, IEEE division and
/// square root, denormals kept, no fast math. `arch` is `compute_XY` (PTX) or `sm_XY` (CUBIN).
pub fn nvrtc_options(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "--fmad=false".into(),
        "--prec-div=true".into(),
        "--prec-sqrt=true".into(),
        "--ftz=false".into(),
    ]
}

/// Which module and kernel quantize `ty` (None for F32, which is a copy).
pub fn kernel_for(ty: GgmlType) -> Option<(&'static str, &'static str)> {
    Some(match ty {
        GgmlType::F32 => return None,
        GgmlType::F16 | GgmlType::BF16 => ("convert", "ft_narrow"),
        GgmlType::Q4_0 => ("legacy", "ft_quantize_q4_0"),
        GgmlType::Q4_1 => ("legacy", "ft_quantize_q4_1"),
        GgmlType::Q5_0 => ("legacy", "ft_quantize_q5_0"),
        GgmlType::Q5_1 => ("legacy", "ft_quantize_q5_1"),
        GgmlType::Q8_0 => ("legacy", "ft_quantize_q8_0"),
        GgmlType::Q2_K => ("kquants", "ft_quantize_q2_k"),
        GgmlType::Q3_K => ("kquants", "ft_quantize_q3_k"),
        GgmlType::Q4_K => ("kquants", "ft_quantize_q4_k"),
        GgmlType::Q5_K => ("kquants", "ft_quantize_q5_k"),
        GgmlType::Q6_K => ("kquants", "ft_quantize_q6_k"),
    })
}

/// Element dtype codes shared with the kernels (convert.cu).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32 = 0,
    F16 = 1,
    BF16 = 2,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
        }
    }
}

/// Blockwise 4-bit parameters: the 15 ascending decision bounds and the map from bucket to
/// code (identity for NF4), exactly as the CPU module defines them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FourBitTable {
    pub bounds: [f32; 16],
    pub order: [u32; 16],
}

impl FourBitTable {
    /// The decision table of a 4-bit code table (`values[code]`), as bitsandbytes' CPU path
    /// builds it: sort the values (equal values keep index order, like torch.argsort on 16
    /// CPU values), bounds = f32 `(a + b) / 2` of neighbours, order = sorted position → code.
    pub fn from_values(values: &[f32; 16]) -> FourBitTable {
        let mut idx: Vec<u32> = (0..16).collect();
        idx.sort_by(|&a, &b| {
            values[a as usize]
                .partial_cmp(&values[b as usize])
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(a.cmp(&b))
        });
        let mut bounds = [0f32; 16];
        for k in 0..15 {
            bounds[k] = (values[idx[k] as usize] + values[idx[k + 1] as usize]) / 2.0;
        }
        FourBitTable {
            bounds,
            order: idx.try_into().unwrap(),
        }
    }

    /// NF4's or FP4's table (quant::nf4).
    pub fn for_type(qt: quant::nf4::QuantType) -> FourBitTable {
        FourBitTable::from_values(&qt.table())
    }
}

/// How the 8-bit double quantization rounds to a code (see nf4.cu).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DoubleQuantRounding {
    /// bitsandbytes' native CPU kernel: snap to a 65536-step grid, then look the code up.
    CpuLut = 0,
    /// torch's bucketize on the f32 midpoints: true nearest, ties to the lower code.
    Nearest = 1,
}

/// How a LoRA step combines the delta with the rows (see merge.cu).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraMode {
    /// `round(x + d)` (Linear and Conv1D layers).
    Add = 0,
    /// `round(x + round(d))` (embeddings: the delta is cast to the weight's dtype first).
    AddRounded = 1,
    /// DoRA's `V = x + d`, unrounded (a DoRA scale step follows).
    DoraV = 2,
}

/// One step of an adapter merge on a batch of rows (the CPU's `lora::merge::Op`s in the
/// kernels' form; see merge.cu). Per-row vectors hold the batch's rows only.
#[derive(Clone, Copy, Debug)]
pub enum MergeStep<'a> {
    /// Row i of the delta is `post_scale · Σ_k coef[i, k] · mat[k, :]` (fused multiply-adds
    /// in k order); `coef` [batch rows, r], `mat` [r, cols].
    Lora {
        coef: &'a [f32],
        mat: &'a [f32],
        r: usize,
        post_scale: f32,
        mode: LoraMode,
    },
    /// DoRA, one norm per row: `round(x · m_i / ‖row_i‖)`.
    DoraRows { magnitude: &'a [f32] },
    /// DoRA, one norm per column (norms over the whole tensor): `round(x · m_j / n_j)`.
    DoraCols {
        magnitude: &'a [f32],
        norms: &'a [f32],
    },
    /// `round(x + v[j])` (lora_bias).
    AddVec(&'a [f32]),
    /// `round(x · v[i])` (IA³ on rows).
    ScaleRows(&'a [f32]),
    /// `round(x · v[j])` (IA³ on columns).
    ScaleCols(&'a [f32]),
}
