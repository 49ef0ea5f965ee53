//! The CUDA backend (cargo feature `cuda`): probing per ../shared/specs/rust-crates.md §2.5,
//! NVRTC compilation cached per process, and the launches.
//!
//! cudarc loads libcuda/libnvrtc lazily and panics when they are missing, so the probe checks
//! `is_culib_present` first and wraps everything else in `catch_unwind` (with the panic hook
//! silenced, so nothing but our one line reaches stderr).

use super::{
    DoubleQuantRounding, Dtype, ENTRY_POINTS, FourBitTable, GpuUnavailable, MODULES, MergeStep,
    kernel_for, nvrtc_options,
};
use crate::quant::GgmlType;
use anyhow::{Context, Result, anyhow, bail};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, LaunchConfig,
    PinnedHostSlice, PushKernelArg,
};
use cudarc::nvrtc::Ptx;
use std::ffi::{CStr, CString};
use std::sync::{Arc, Mutex, OnceLock};

// SAFETY: #[repr(C)] plain old data matching `struct FtNf4Table` in nf4.cu.
unsafe impl DeviceRepr for FourBitTable {}

/// Elements per host→device chunk (f32: 64 MiB). Device memory in use is two lanes of this
/// plus their outputs, whatever the tensor or model size.
const CHUNK_ELEMS: usize = 16 << 20;
/// Threads per CUDA block for the one-thread-per-block quantizers.
const THREADS: u32 = 128;

/// A usable GPU: device 0's primary context, its kernels, staging buffers.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    name: String,
    cc: (i32, i32),
    driver: (i32, i32),
    nvrtc: (i32, i32),
    modules: [OnceLock<std::result::Result<Arc<CudaModule>, String>>; MODULES.len()],
    lanes: Mutex<Vec<Lane>>,
    /// Merges run one at a time (they are called from the reading threads), on their own
    /// stream so they overlap the quantization lanes.
    merge_lock: Mutex<()>,
    merge_stream: Arc<CudaStream>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// One stream with its pinned host and device buffers (double buffering uses two).
struct Lane {
    stream: Arc<CudaStream>,
    cap: usize,
    hx: PinnedHostSlice<f32>,
    hy: PinnedHostSlice<u8>,
    dx: CudaSlice<f32>,
    dy: CudaSlice<u8>,
    /// (offset in the caller's output, bytes) of the chunk in flight.
    pending: Option<(usize, usize)>,
}

/// Most output bytes per input element over the types (F16/BF16: 2).
const MAX_OUT_PER_ELEM: usize = 2;

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
    .lines()
    .next()
    .unwrap_or("")
    .to_string()
}

/// Run `f`, turning a panic into an error, without printing the panic.
fn quietly<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(hook);
    r.map_err(panic_message)
}

fn driver_version() -> std::result::Result<(i32, i32), String> {
    let mut v: std::ffi::c_int = 0;
    // SAFETY: plain out-parameter call into the loaded driver.
    let r = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
    if r != cudarc::driver::sys::cudaError_enum::CUDA_SUCCESS {
        return Err(format!("cuDriverGetVersion: {r:?}"));
    }
    Ok((v / 1000, (v % 1000) / 10))
}

fn nvrtc_version() -> std::result::Result<(i32, i32), String> {
    let (mut major, mut minor): (std::ffi::c_int, std::ffi::c_int) = (0, 0);
    // SAFETY: plain out-parameter call into the loaded NVRTC.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if r != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(format!("nvrtcVersion: {r:?}"));
    }
    Ok((major, minor))
}

/// Compile `src` with NVRTC for `arch` (`sm_XY` → CUBIN, `compute_XY` → PTX, NUL-terminated)
/// with the bit-exactness options of [`nvrtc_options`]. The error carries NVRTC's log.
pub fn compile_cubin(src: &str, arch: &str) -> std::result::Result<Vec<u8>, String> {
    use cudarc::nvrtc::sys;
    if !unsafe { sys::is_culib_present() } {
        return Err("libnvrtc not found".into());
    }
    let csrc = CString::new(src).map_err(|e| e.to_string())?;
    let name = CString::new("ftconv.cu").unwrap();
    let opts: Vec<CString> = nvrtc_options(arch)
        .into_iter()
        .map(|o| CString::new(o).unwrap())
        .collect();
    let ptrs: Vec<*const std::ffi::c_char> = opts.iter().map(|o| o.as_ptr()).collect();
    let ok = sys::nvrtcResult::NVRTC_SUCCESS;
    let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: NVRTC's C API used as documented; all strings outlive the program.
    unsafe {
        let r = sys::nvrtcCreateProgram(
            &mut prog,
            csrc.as_ptr(),
            name.as_ptr(),
            0,
            std::ptr::null(),
            std::ptr::null(),
        );
        if r != ok {
            return Err(format!("nvrtcCreateProgram: {r:?}"));
        }
        let r = sys::nvrtcCompileProgram(prog, ptrs.len() as i32, ptrs.as_ptr());
        let result = if r != ok {
            let mut n = 0usize;
            let mut log = String::new();
            if sys::nvrtcGetProgramLogSize(prog, &mut n) == ok && n > 0 {
                let mut buf = vec![0 as std::ffi::c_char; n];
                if sys::nvrtcGetProgramLog(prog, buf.as_mut_ptr()) == ok {
                    log = CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned();
                }
            }
            Err(format!("{r:?}: {}", log.trim()))
        } else if arch.starts_with("sm_") {
            let mut n = 0usize;
            let r = sys::nvrtcGetCUBINSize(prog, &mut n);
            if r != ok {
                Err(format!("nvrtcGetCUBINSize: {r:?}"))
            } else {
                let mut buf = vec![0u8; n];
                let r = sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut std::ffi::c_char);
                if r != ok {
                    Err(format!("nvrtcGetCUBIN: {r:?}"))
                } else {
                    Ok(buf)
                }
            }
        } else {
            let mut n = 0usize;
            let r = sys::nvrtcGetPTXSize(prog, &mut n);
            if r != ok {
                Err(format!("nvrtcGetPTXSize: {r:?}"))
            } else {
                let mut buf = vec![0u8; n];
                let r = sys::nvrtcGetPTX(prog, buf.as_mut_ptr() as *mut std::ffi::c_char);
                if r != ok {
                    Err(format!("nvrtcGetPTX: {r:?}"))
                } else {
                    Ok(buf)
                }
            }
        };
        let _ = sys::nvrtcDestroyProgram(&mut prog);
        result
    }
}

fn cfg_for(n: u64, threads: u32) -> LaunchConfig {
    let blocks = n.div_ceil(threads as u64).max(1);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn derr(e: cudarc::driver::DriverError) -> anyhow::Error {
    anyhow!("CUDA: {e}")
}

impl Gpu {
    pub(crate) fn probe() -> std::result::Result<Gpu, GpuUnavailable> {
        // SAFETY: these only try to dlopen the candidate library names.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(GpuUnavailable::NoDriverLib);
        }
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(GpuUnavailable::NoNvrtcLib);
        }
        let r = quietly(|| -> std::result::Result<Gpu, GpuUnavailable> {
            let ctx = CudaContext::new(0).map_err(|e| GpuUnavailable::Driver(e.to_string()))?;
            let cc = ctx
                .compute_capability()
                .map_err(|e| GpuUnavailable::Driver(e.to_string()))?;
            let name = ctx.name().unwrap_or_else(|_| "GPU 0".into());
            let driver = driver_version().map_err(GpuUnavailable::Driver)?;
            let nvrtc = nvrtc_version().map_err(GpuUnavailable::Compile)?;
            if nvrtc > driver {
                return Err(GpuUnavailable::NvrtcTooNew { nvrtc, driver });
            }
            let merge_stream = ctx
                .new_stream()
                .map_err(|e| GpuUnavailable::Driver(e.to_string()))?;
            let gpu = Gpu {
                ctx,
                name,
                cc,
                driver,
                nvrtc,
                modules: Default::default(),
                lanes: Mutex::new(Vec::new()),
                merge_lock: Mutex::new(()),
                merge_stream,
            };
            // smoke test: compile and load the smallest module, so a driver that rejects
            // NVRTC's output is found now (auto falls back) rather than mid-run
            gpu.module("convert").map_err(GpuUnavailable::Compile)?;
            Ok(gpu)
        });
        match r {
            Ok(x) => x,
            Err(msg) => Err(GpuUnavailable::Panicked(msg)),
        }
    }

    /// "NVIDIA H200 (sm_90), driver CUDA 13.0, NVRTC 13.0"
    pub fn describe(&self) -> String {
        format!(
            "{} (sm_{}{}), driver CUDA {}.{}, NVRTC {}.{}",
            self.name,
            self.cc.0,
            self.cc.1,
            self.driver.0,
            self.driver.1,
            self.nvrtc.0,
            self.nvrtc.1
        )
    }

    /// The compiled module `name`, compiled for this device on first use.
    fn module(&self, name: &str) -> std::result::Result<Arc<CudaModule>, String> {
        let i = MODULES
            .iter()
            .position(|(n, _)| *n == name)
            .ok_or_else(|| format!("no kernel module {name}"))?;
        self.modules[i]
            .get_or_init(|| {
                let arch = format!("sm_{}{}", self.cc.0, self.cc.1);
                let image = compile_cubin(MODULES[i].1, &arch)
                    .map_err(|e| format!("{name}.cu for {arch}: {e}"))?;
                self.ctx
                    .load_module(Ptx::from_binary(image))
                    .map_err(|e| format!("loading {name}.cu: {e}"))
            })
            .clone()
    }

    fn function(&self, module: &str, kernel: &str) -> Result<CudaFunction> {
        debug_assert!(
            ENTRY_POINTS
                .iter()
                .any(|(m, ks)| *m == module && ks.contains(&kernel))
        );
        let m = self.module(module).map_err(|e| anyhow!("CUDA: {e}"))?;
        m.load_function(kernel)
            .map_err(|e| anyhow!("CUDA: kernel {kernel}: {e}"))
    }

    fn new_lane(&self, cap: usize) -> Result<Lane> {
        let stream = self.ctx.new_stream().map_err(derr)?;
        // SAFETY: the buffers are written before they are read (inputs) or read only after
        // the device wrote them (outputs).
        unsafe {
            Ok(Lane {
                hx: self.ctx.alloc_pinned::<f32>(cap).map_err(derr)?,
                // not write-combined: the host reads this one
                hy: self
                    .ctx
                    .alloc_pinned_with_flags::<u8>(cap * MAX_OUT_PER_ELEM, 0)
                    .map_err(derr)?,
                dx: stream.alloc::<f32>(cap).map_err(derr)?,
                dy: stream.alloc::<u8>(cap * MAX_OUT_PER_ELEM).map_err(derr)?,
                stream,
                cap,
                pending: None,
            })
        }
    }

    /// Quantize whole blocks of `ty` (not F32) from `x` into `y`, as [`crate::quant::quantize`]
    /// does on the CPU. Chunks of at most [`CHUNK_ELEMS`] alternate between two streams, so
    /// copies in, kernels and copies out overlap; device memory stays bounded.
    pub fn quantize(&self, ty: GgmlType, x: &[f32], y: &mut [u8]) -> Result<()> {
        let (module, kernel) =
            kernel_for(ty).ok_or_else(|| anyhow!("no GPU kernel for {ty} (a plain copy)"))?;
        let bs = ty.block_size();
        let ts = ty.type_size();
        if !x.len().is_multiple_of(bs) || y.len() != x.len() / bs * ts {
            bail!(
                "internal: GPU quantize {ty}: {} values into {} bytes",
                x.len(),
                y.len()
            );
        }
        if x.is_empty() {
            return Ok(());
        }
        let f = self.function(module, kernel)?;
        // chunk: a multiple of 256 (so of every block size), at most what is needed
        let chunk = CHUNK_ELEMS.min(x.len().div_ceil(256) * 256);
        let mut lanes = self
            .lanes
            .lock()
            .map_err(|_| anyhow!("GPU state poisoned"))?;
        if lanes.len() < 2 || lanes.iter().any(|l| l.cap < chunk) {
            lanes.clear();
            for _ in 0..2 {
                lanes.push(self.new_lane(chunk)?);
            }
        }
        let result = (|| -> Result<()> {
            for (k, xs) in x.chunks(chunk).enumerate() {
                let lane = &mut lanes[k % 2];
                Self::drain(lane, y)?;
                let n = xs.len();
                let nblocks = n / bs;
                let out_len = nblocks * ts;
                let out_off = k * (chunk / bs) * ts;
                // SAFETY: the lane's stream is idle (drained), so nothing uses hx/hy; the
                // slices live as long as the lane and are used only on its stream.
                let (hx, hy) = unsafe {
                    let px = lane.hx.as_mut_ptr().map_err(derr)?;
                    let py = lane.hy.as_mut_ptr().map_err(derr)?;
                    (
                        std::slice::from_raw_parts_mut(px, n),
                        std::slice::from_raw_parts_mut(py, out_len),
                    )
                };
                // into pinned memory on all threads (one thread copies ~10 GB/s at best)
                {
                    use rayon::prelude::*;
                    hx.par_chunks_mut(1 << 18)
                        .zip(xs.par_chunks(1 << 18))
                        .for_each(|(d, s)| d.copy_from_slice(s));
                }
                let s = lane.stream.clone();
                s.memcpy_htod(&*hx, &mut lane.dx.slice_mut(..n))
                    .map_err(derr)?;
                let nb = nblocks as u64;
                let dt: i32 = if ty == GgmlType::F16 {
                    Dtype::F16 as i32
                } else {
                    Dtype::BF16 as i32
                };
                let mut b = s.launch_builder(&f);
                match ty {
                    GgmlType::F16 | GgmlType::BF16 => {
                        b.arg(&lane.dx).arg(&nb).arg(&dt).arg(&mut lane.dy);
                    }
                    _ => {
                        b.arg(&lane.dx).arg(&mut lane.dy).arg(&nb);
                    }
                }
                // SAFETY: argument list matches the kernel's signature; buffers hold at
                // least nblocks blocks in and out.
                unsafe { b.launch(cfg_for(nb, THREADS)) }.map_err(derr)?;
                s.memcpy_dtoh(&lane.dy.slice(..out_len), hy).map_err(derr)?;
                lane.pending = Some((out_off, out_len));
            }
            for lane in lanes.iter_mut() {
                Self::drain(lane, y)?;
            }
            Ok(())
        })();
        if result.is_err() {
            // leave no lane half-used
            lanes.clear();
        }
        result.with_context(|| format!("GPU quantization to {ty}"))
    }

    /// Wait for the lane's chunk in flight and copy its output into `y`.
    fn drain(lane: &mut Lane, y: &mut [u8]) -> Result<()> {
        lane.stream.synchronize().map_err(derr)?;
        if let Some((off, len)) = lane.pending.take() {
            let hy = lane.hy.as_slice().map_err(derr)?;
            y[off..off + len].copy_from_slice(&hy[..len]);
        }
        Ok(())
    }

    /// bitsandbytes blockwise 4-bit quantization of the flattened `x`: (packed bytes,
    /// absmax per block), as the CPU module computes them with the same `table`.
    pub fn quantize_4bit(
        &self,
        x: &[f32],
        blocksize: usize,
        table: &FourBitTable,
    ) -> Result<(Vec<u8>, Vec<f32>)> {
        if blocksize == 0 || !blocksize.is_multiple_of(2) {
            bail!("4-bit blocksize must be even, got {blocksize}");
        }
        let f = self.function("nf4", "ft_quantize_4bit")?;
        let s = self.ctx.default_stream();
        let n = x.len();
        let mut packed = vec![0u8; n.div_ceil(2)];
        let mut absmax = vec![0f32; n.div_ceil(blocksize)];
        let chunk = (CHUNK_ELEMS / blocksize).max(1) * blocksize;
        let bsz = blocksize as u32;
        for (k, xs) in x.chunks(chunk).enumerate() {
            let start = k * chunk;
            let len = xs.len() as u64;
            let nblocks = xs.len().div_ceil(blocksize);
            let dx = s.clone_htod(xs).map_err(derr)?;
            let mut dp = s.alloc_zeros::<u8>(xs.len().div_ceil(2)).map_err(derr)?;
            let mut da = s.alloc_zeros::<f32>(nblocks).map_err(derr)?;
            let mut b = s.launch_builder(&f);
            b.arg(&dx)
                .arg(&len)
                .arg(&bsz)
                .arg(table)
                .arg(&mut dp)
                .arg(&mut da);
            // SAFETY: matches ft_quantize_4bit's signature; buffers sized for `len` values.
            unsafe { b.launch(cfg_for(nblocks as u64, THREADS)) }.map_err(derr)?;
            s.memcpy_dtoh(
                &dp,
                &mut packed[start / 2..start / 2 + xs.len().div_ceil(2)],
            )
            .map_err(derr)?;
            let a0 = start / blocksize;
            s.memcpy_dtoh(&da, &mut absmax[a0..a0 + nblocks])
                .map_err(derr)?;
        }
        s.synchronize().map_err(derr)?;
        Ok((packed, absmax))
    }

    /// Double quantization of `absmax - offset` in groups of 256 with the 8-bit dynamic map
    /// `code`: (codes, nested absmax per group).
    pub fn double_quant(
        &self,
        absmax: &[f32],
        offset: f32,
        code: &[f32; 256],
        rounding: DoubleQuantRounding,
    ) -> Result<(Vec<u8>, Vec<f32>)> {
        let f = self.function("nf4", "ft_double_quant")?;
        let s = self.ctx.default_stream();
        if absmax.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let nb = absmax.len() as u64;
        let groups = absmax.len().div_ceil(256);
        let da = s.clone_htod(absmax).map_err(derr)?;
        let dc = s.clone_htod(&code[..]).map_err(derr)?;
        let mut dq = s.alloc_zeros::<u8>(absmax.len()).map_err(derr)?;
        let mut dn = s.alloc_zeros::<f32>(groups).map_err(derr)?;
        let mode = rounding as i32;
        let mut b = s.launch_builder(&f);
        b.arg(&da)
            .arg(&nb)
            .arg(&offset)
            .arg(&dc)
            .arg(&mode)
            .arg(&mut dq)
            .arg(&mut dn);
        // SAFETY: matches ft_double_quant's signature.
        unsafe { b.launch(cfg_for(groups as u64, 64)) }.map_err(derr)?;
        let q = s.clone_dtoh(&dq).map_err(derr)?;
        let nested = s.clone_dtoh(&dn).map_err(derr)?;
        Ok((q, nested))
    }

    /// Widen little-endian f16/bf16/f32 elements to f32.
    pub fn widen(&self, src: &[u8], dtype: Dtype) -> Result<Vec<f32>> {
        let f = self.function("convert", "ft_widen")?;
        let s = self.ctx.default_stream();
        let es = dtype.size();
        if !src.len().is_multiple_of(es) {
            bail!(
                "internal: {} bytes is not a whole number of elements",
                src.len()
            );
        }
        let n = src.len() / es;
        let mut out = vec![0f32; n];
        let chunk = CHUNK_ELEMS;
        let dt = dtype as i32;
        for (k, bytes) in src.chunks(chunk * es).enumerate() {
            let m = bytes.len() / es;
            let ds = s.clone_htod(bytes).map_err(derr)?;
            let mut dd = s.alloc_zeros::<f32>(m).map_err(derr)?;
            let mm = m as u64;
            let mut b = s.launch_builder(&f);
            b.arg(&ds).arg(&dt).arg(&mm).arg(&mut dd);
            // SAFETY: matches ft_widen's signature.
            unsafe { b.launch(cfg_for(mm, 256)) }.map_err(derr)?;
            s.memcpy_dtoh(&dd, &mut out[k * chunk..k * chunk + m])
                .map_err(derr)?;
        }
        s.synchronize().map_err(derr)?;
        Ok(out)
    }

    /// Apply an adapter merge's `steps` in place to `x`: whole rows of `cols` values, already
    /// rounded to `dtype` (see merge.cu). Per-row vectors in `steps` cover the rows of `x`.
    /// Runs in chunks of at most [`CHUNK_ELEMS`] values, so device memory stays bounded.
    pub fn merge_rows(
        &self,
        x: &mut [f32],
        cols: usize,
        dtype: Dtype,
        steps: &[MergeStep],
    ) -> Result<()> {
        if cols == 0 || !x.len().is_multiple_of(cols) {
            bail!(
                "internal: GPU merge of {} values in rows of {cols}",
                x.len()
            );
        }
        let rows = x.len() / cols;
        let rows_per = (CHUNK_ELEMS / cols).max(1);
        let _one_at_a_time = self
            .merge_lock
            .lock()
            .map_err(|_| anyhow!("GPU state poisoned"))?;
        for (k, xs) in x.chunks_mut(rows_per * cols).enumerate() {
            let (r0, n) = (k * rows_per, xs.len() / cols);
            self.merge_chunk(xs, cols, dtype, steps, r0, n, rows)
                .context("GPU adapter merge")?;
        }
        Ok(())
    }

    /// [`Gpu::merge_rows`] on rows `r0..r0 + n` of the `rows` the steps describe.
    #[allow(clippy::too_many_arguments)]
    fn merge_chunk(
        &self,
        x: &mut [f32],
        cols: usize,
        dtype: Dtype,
        steps: &[MergeStep],
        r0: usize,
        n: usize,
        rows: usize,
    ) -> Result<()> {
        let s = &self.merge_stream;
        let mut dx = s.clone_htod(&*x).map_err(derr)?;
        let (r64, c64) = (n as u64, cols as u64);
        let elems = r64 * c64;
        let dt = dtype as i32;
        let per_row = |v: &[f32], what: &str| -> Result<std::ops::Range<usize>> {
            if v.len() != rows {
                bail!("internal: {what} has {} values for {rows} rows", v.len());
            }
            Ok(r0..r0 + n)
        };
        let per_col = |v: &[f32], what: &str| -> Result<()> {
            if v.len() != cols {
                bail!("internal: {what} has {} values for {cols} columns", v.len());
            }
            Ok(())
        };
        for step in steps {
            match *step {
                MergeStep::Lora {
                    coef,
                    mat,
                    r,
                    post_scale,
                    mode,
                } => {
                    if r == 0 || coef.len() != rows * r || mat.len() != r * cols {
                        bail!("internal: LoRA step shapes do not match {rows}x{cols}, r={r}");
                    }
                    let f = self.function("merge", "ft_lora_rows")?;
                    let dc = s.clone_htod(&coef[r0 * r..(r0 + n) * r]).map_err(derr)?;
                    let dm = s.clone_htod(mat).map_err(derr)?;
                    let (rk, md) = (r as u32, mode as i32);
                    let mut b = s.launch_builder(&f);
                    b.arg(&mut dx)
                        .arg(&r64)
                        .arg(&c64)
                        .arg(&dc)
                        .arg(&dm)
                        .arg(&rk)
                        .arg(&post_scale)
                        .arg(&md)
                        .arg(&dt);
                    // SAFETY: matches ft_lora_rows' signature; shapes checked above.
                    unsafe { b.launch(cfg_for(elems, 256)) }.map_err(derr)?;
                }
                MergeStep::DoraRows { magnitude } => {
                    let range = per_row(magnitude, "DoRA magnitude")?;
                    let f = self.function("merge", "ft_dora_rows")?;
                    let dm = s.clone_htod(&magnitude[range]).map_err(derr)?;
                    let mut b = s.launch_builder(&f);
                    b.arg(&mut dx).arg(&r64).arg(&c64).arg(&dm).arg(&dt);
                    // SAFETY: matches ft_dora_rows' signature; one magnitude per row.
                    unsafe { b.launch(cfg_for(r64, 128)) }.map_err(derr)?;
                }
                MergeStep::DoraCols { magnitude, norms } => {
                    per_col(magnitude, "DoRA magnitude")?;
                    per_col(norms, "DoRA norms")?;
                    let f = self.function("merge", "ft_dora_cols")?;
                    let dm = s.clone_htod(magnitude).map_err(derr)?;
                    let dn = s.clone_htod(norms).map_err(derr)?;
                    let mut b = s.launch_builder(&f);
                    b.arg(&mut dx)
                        .arg(&r64)
                        .arg(&c64)
                        .arg(&dm)
                        .arg(&dn)
                        .arg(&dt);
                    // SAFETY: matches ft_dora_cols' signature; one magnitude/norm per column.
                    unsafe { b.launch(cfg_for(elems, 256)) }.map_err(derr)?;
                }
                MergeStep::AddVec(v) | MergeStep::ScaleRows(v) | MergeStep::ScaleCols(v) => {
                    let (mode, vs): (i32, &[f32]) = match *step {
                        MergeStep::AddVec(_) => (0, v),
                        MergeStep::ScaleRows(_) => (1, &v[per_row(v, "IA3 scale")?]),
                        _ => (2, v),
                    };
                    if vs.is_empty() {
                        // only the rounding, which rows already in the dtype don't change
                        continue;
                    }
                    let f = self.function("merge", "ft_vec_op")?;
                    let dv = s.clone_htod(vs).map_err(derr)?;
                    let vlen = vs.len() as u64;
                    let mut b = s.launch_builder(&f);
                    b.arg(&mut dx)
                        .arg(&r64)
                        .arg(&c64)
                        .arg(&dv)
                        .arg(&vlen)
                        .arg(&mode)
                        .arg(&dt);
                    // SAFETY: matches ft_vec_op's signature; the kernel bounds j by vlen.
                    unsafe { b.launch(cfg_for(elems, 256)) }.map_err(derr)?;
                }
            }
        }
        s.memcpy_dtoh(&dx, x).map_err(derr)?;
        s.synchronize().map_err(derr)?;
        Ok(())
    }
}
