//! Execute a plan: tensors in order, each in row batches quantized in parallel (rayon),
//! written as soon as a batch is done. Memory stays bounded by a batch, never a tensor
//! or the model; the output appears only when complete.

use crate::gguf::{GgufWriter, TensorHeader};
use crate::gpu::Backend;
use crate::output::AtomicFile;
use crate::plan::{Plan, PlannedTensor};
use crate::quant::{self, GgmlType};
use anyhow::{Context, Result, anyhow, bail};
use rayon::prelude::*;
use std::path::Path;
use std::time::Instant;

/// Quantization error of one tensor against its source values.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct TensorError {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: String,
    /// Root mean square of (dequantized − source).
    pub rmse: f64,
    /// ‖dequantized − source‖ / ‖source‖.
    pub rel_error: f64,
}

/// What an execution did.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub tensors: usize,
    pub elements: u64,
    pub bytes_out: u64,
    pub seconds: f64,
    pub errors: Vec<TensorError>,
}

/// Progress callback: (tensor index, tensor name, elements done so far overall).
pub type Progress<'a> = &'a (dyn Fn(usize, &str, u64) + Sync);

/// Target bytes of f32 input per batch (per tensor, across threads).
const BATCH_ELEMS: usize = 4 << 20;
/// Elements per batch handed to the GPU (larger: fewer synchronisations; 128 MiB of f32,
/// two such buffers while the next batch is read).
const GPU_BATCH_ELEMS: usize = 32 << 20;
/// Rows per parallel work item at least this many elements.
const CHUNK_ELEMS: usize = 32 * 512;

#[derive(Default)]
struct ErrAcc {
    se: f64,
    ss: f64,
}

/// Read rows `[row0, row0 + buf.len() / cols)` of `t` into `buf`, refusing non-finite values.
fn read_checked(t: &PlannedTensor, row0: usize, buf: &mut [f32]) -> Result<()> {
    let cols = t.source.cols();
    t.source.read_rows(row0, buf)?;
    if let Some(i) = buf.iter().position(|v| !v.is_finite()) {
        let r = row0 + i / cols;
        bail!(
            "tensor {:?} has invalid data: {} at row {r}, column {}",
            t.name,
            buf[i],
            i % cols
        );
    }
    Ok(())
}

/// Validate the quantized rows in `out` (made from `buf`, starting at `row0`) and return
/// their error sums.
fn check_rows(
    t: &PlannedTensor,
    row0: usize,
    buf: &[f32],
    out: &[u8],
    measure: bool,
) -> Result<ErrAcc> {
    let cols = t.source.cols();
    if t.target.is_quantized()
        && let Some(b) = quant::first_invalid_block(t.target, out)
    {
        let per_row = cols / t.target.block_size();
        bail!(
            "tensor {:?}: quantized data validation failed at row {} (a {} scale overflows f16; values too large for this type)",
            t.name,
            row0 + b / per_row,
            t.target
        );
    }
    let mut acc = ErrAcc::default();
    if measure && t.target != GgmlType::F32 {
        let mut deq = vec![0f32; buf.len()];
        quant::dequantize(t.target, out, &mut deq);
        for (a, b) in buf.iter().zip(&deq) {
            let d = (*b as f64) - (*a as f64);
            acc.se += d * d;
            acc.ss += (*a as f64) * (*a as f64);
        }
    }
    Ok(acc)
}

/// Quantize rows `[row0, row0 + n)` of `t` into `out`, returning error sums.
fn quantize_rows(
    t: &PlannedTensor,
    row0: usize,
    n: usize,
    out: &mut [u8],
    measure: bool,
) -> Result<ErrAcc> {
    let cols = t.source.cols();
    let mut buf = vec![0f32; n * cols];
    read_checked(t, row0, &mut buf)?;
    quant::quantize(t.target, &buf, out);
    check_rows(t, row0, &buf, out, measure)
}

/// Produce one tensor's bytes batch by batch, handing each batch to `sink`.
pub fn run_tensor(
    t: &PlannedTensor,
    measure: bool,
    sink: impl FnMut(&[u8]) -> Result<()>,
    on_rows: impl FnMut(usize),
) -> Result<Option<TensorError>> {
    run_tensor_on(t, measure, &Backend::Cpu, sink, on_rows)
}

/// [`run_tensor`] on `backend`: with a GPU, each batch of rows is read (in parallel) while
/// the GPU quantizes the previous one.
pub fn run_tensor_on(
    t: &PlannedTensor,
    measure: bool,
    backend: &Backend,
    mut sink: impl FnMut(&[u8]) -> Result<()>,
    mut on_rows: impl FnMut(usize),
) -> Result<Option<TensorError>> {
    let rows = t.source.rows();
    let cols = t.source.cols();
    if rows as u64 * cols as u64 != t.n_elements() {
        bail!(
            "internal: tensor {} source has {rows}x{cols} values for shape {:?}",
            t.name,
            t.shape()
        );
    }
    let row_bytes = cols / t.target.block_size() * t.target.type_size();
    let rows_per_chunk = CHUNK_ELEMS.div_ceil(cols).max(1);
    let rows_per_batch = (BATCH_ELEMS / cols.max(1))
        .max(rows_per_chunk)
        .div_ceil(rows_per_chunk)
        * rows_per_chunk;
    let mut total = ErrAcc::default();
    if backend.runs_on_gpu(t.target) || t.source.prefers_batches() {
        gpu_batches(t, measure, backend, &mut total, &mut sink, &mut on_rows)?;
        return Ok(finish_tensor(t, measure, &total));
    }
    let mut out = vec![0u8; rows_per_batch.min(rows) * row_bytes];
    let mut r = 0;
    while r < rows {
        let n = rows_per_batch.min(rows - r);
        let batch = &mut out[..n * row_bytes];
        let accs: Vec<Result<ErrAcc>> = batch
            .par_chunks_mut(rows_per_chunk * row_bytes)
            .enumerate()
            .map(|(k, chunk)| {
                let r0 = r + k * rows_per_chunk;
                quantize_rows(t, r0, chunk.len() / row_bytes, chunk, measure)
            })
            .collect();
        for a in accs {
            let a = a?;
            total.se += a.se;
            total.ss += a.ss;
        }
        sink(batch)?;
        on_rows(n);
        r += n;
    }
    Ok(finish_tensor(t, measure, &total))
}

/// The GPU loop of [`run_tensor_on`]: read batch k+1 on the CPU threads while the GPU
/// quantizes batch k, then validate/measure and hand batch k to `sink`. Also the loop for
/// sources that work on whole batches themselves (an adapter merge on the GPU), whatever
/// `backend` quantizes.
fn gpu_batches(
    t: &PlannedTensor,
    measure: bool,
    backend: &Backend,
    total: &mut ErrAcc,
    sink: &mut impl FnMut(&[u8]) -> Result<()>,
    on_rows: &mut impl FnMut(usize),
) -> Result<()> {
    let rows = t.source.rows();
    let cols = t.source.cols();
    let row_bytes = cols / t.target.block_size() * t.target.type_size();
    let rows_per_chunk = CHUNK_ELEMS.div_ceil(cols).max(1);
    let rows_per_batch = (GPU_BATCH_ELEMS / cols.max(1))
        .max(rows_per_chunk)
        .div_ceil(rows_per_chunk)
        * rows_per_chunk;
    let mut out = vec![0u8; rows_per_batch.min(rows) * row_bytes];
    let whole = t.source.prefers_batches();
    let read = |row0: usize, buf: &mut [f32]| -> Result<()> {
        if whole {
            return read_checked(t, row0, buf);
        }
        buf.par_chunks_mut(rows_per_chunk * cols)
            .enumerate()
            .try_for_each(|(k, c)| read_checked(t, row0 + k * rows_per_chunk, c))
    };
    let cap = rows_per_batch.min(rows) * cols;
    let mut cur = vec![0f32; cap];
    let mut next = vec![0f32; cap];
    let n0 = rows_per_batch.min(rows);
    read(0, &mut cur[..n0 * cols])?;
    let mut r = 0;
    while r < rows {
        let n = rows_per_batch.min(rows - r);
        let r_next = r + n;
        let n_next = rows_per_batch.min(rows - r_next);
        let batch = &mut out[..n * row_bytes];
        let (done, ahead) = rayon::join(
            || backend.quantize(t.target, &cur[..n * cols], batch),
            || {
                if n_next > 0 {
                    read(r_next, &mut next[..n_next * cols])
                } else {
                    Ok(())
                }
            },
        );
        done.with_context(|| format!("tensor {:?}", t.name))?;
        ahead?;
        let batch = &out[..n * row_bytes];
        let accs: Vec<Result<ErrAcc>> = batch
            .par_chunks(rows_per_chunk * row_bytes)
            .zip(cur[..n * cols].par_chunks(rows_per_chunk * cols))
            .enumerate()
            .map(|(k, (o, x))| check_rows(t, r + k * rows_per_chunk, x, o, measure))
            .collect();
        for a in accs {
            let a = a?;
            total.se += a.se;
            total.ss += a.ss;
        }
        sink(batch)?;
        on_rows(n);
        std::mem::swap(&mut cur, &mut next);
        r = r_next;
    }
    Ok(())
}

/// Release the tensor's source and report its error.
fn finish_tensor(t: &PlannedTensor, measure: bool, total: &ErrAcc) -> Option<TensorError> {
    t.source.release();
    if measure && t.target != GgmlType::F32 {
        let n = t.n_elements() as f64;
        Some(TensorError {
            name: t.name.clone(),
            ty: t.target.name().to_string(),
            rmse: (total.se / n.max(1.0)).sqrt(),
            rel_error: if total.ss > 0.0 {
                (total.se / total.ss).sqrt()
            } else {
                0.0
            },
        })
    } else {
        None
    }
}

/// Write a plan as a GGUF file at `dest`.
pub fn write_gguf(plan: &Plan, dest: &Path, measure: bool, progress: Progress) -> Result<Summary> {
    write_gguf_on(plan, dest, measure, progress, &Backend::Cpu)
}

/// [`write_gguf`], quantizing on `backend`.
pub fn write_gguf_on(
    plan: &Plan,
    dest: &Path,
    measure: bool,
    progress: Progress,
    backend: &Backend,
) -> Result<Summary> {
    plan.check()?;
    let start = Instant::now();
    let headers: Vec<TensorHeader> = plan
        .tensors
        .iter()
        .map(|t| TensorHeader {
            name: t.name.clone(),
            ne: t.ne.clone(),
            type_id: t.target.id(),
            size: t.out_bytes(),
        })
        .collect();
    let mut file = AtomicFile::create(dest)?;
    let mut w = GgufWriter::new(file.writer(), &plan.metadata, &headers)
        .map_err(|e| anyhow!("{}: {e}", dest.display()))?;
    let mut summary = Summary::default();
    let mut done: u64 = 0;
    for (i, t) in plan.tensors.iter().enumerate() {
        progress(i, &t.name, done);
        let cols = t.source.cols() as u64;
        let err = run_tensor_on(
            t,
            measure,
            backend,
            |bytes| {
                w.write_data(bytes)
                    .map_err(|e| anyhow!("{}: write failed: {e}", dest.display()))
            },
            |n| {
                done += n as u64 * cols;
                progress(i, &t.name, done);
            },
        )?;
        if let Some(e) = err {
            summary.errors.push(e);
        }
        summary.elements += t.n_elements();
    }
    let (_, total) = w.finish()?;
    file.commit()?;
    summary.tensors = plan.tensors.len();
    summary.bytes_out = total;
    summary.seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}
