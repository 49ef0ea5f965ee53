//! The training loop: data → batches → forward/backward → AdamW, with gradient accumulation
//! normalised over every trained token of the step (as transformers' `num_items_in_batch`),
//! clipping, schedules, eval, checkpoints that resume bit-exactly, Ctrl-C, a JSONL log, and the
//! PEFT adapter output.
//!
//! Exact resume: the data order of an epoch and every dropout mask are functions of
//! (seed, epoch / step, micro-batch, module) only, never of history, so a run resumed from
//! `checkpoint-N` (adapter weights + AdamW state + step) computes what the uninterrupted run did.

use super::data::{self, DataOptions, IGNORE, Sample, TextEncoder};
use super::model::{
    ALL_TARGETS, BaseDtype, DropoutSource, LoraInit, LoraSpec, Model, causal_lm_loss, module_path,
};
use super::optim::{self, AdamW, AdamWConfig};
use crate::checkpoint::HfCheckpoint;
use crate::checkpoint::safetensors::StFile;
use crate::cli::finetune::{self as cli, Args};
use crate::cli::usage;
use crate::lora::adapter::{AdapterConfig, PeftType};
use crate::output::AtomicFile;
use anyhow::{Context, Result, anyhow, bail};
use candle_core::{Device, Tensor};
use serde_json::{Value, json};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

const ADAPTER_FILE: &str = "adapter_model.safetensors";
const CONFIG_FILE: &str = "adapter_config.json";
const OPTIM_FILE: &str = "optimizer.safetensors";
const STATE_FILE: &str = "trainer_state.json";

/// Every op of a training step allocates and frees tensors of a few MB. glibc returns such
/// blocks to the kernel at once (mmap/munmap), so each step paid for zeroing fresh pages again:
/// keeping freed memory in the heap made a step ~40% faster with the same peak RSS (SmolLM2,
/// 2 threads).
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Peak resident memory of this process in MB (Linux `VmHWM`), if known.
pub fn peak_rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// A padded micro-batch.
struct Batch {
    ids: Tensor,
    labels: Vec<Vec<i64>>,
    mask: Vec<Vec<i64>>,
    /// Non-pad tokens.
    tokens: usize,
}

fn collate(rows: &[&Sample], pad: u32, dev: &Device) -> Result<Batch> {
    let t = rows
        .iter()
        .map(|s| s.input_ids.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let mut ids = Vec::with_capacity(rows.len() * t);
    let mut labels = Vec::new();
    let mut mask = Vec::new();
    let mut tokens = 0;
    for s in rows {
        let n = s.input_ids.len();
        tokens += n;
        ids.extend_from_slice(&s.input_ids);
        ids.extend(std::iter::repeat_n(pad, t - n));
        let mut l = s.labels.clone();
        l.resize(t, IGNORE);
        labels.push(l);
        let mut m = vec![1i64; n];
        m.resize(t, 0);
        mask.push(m);
    }
    Ok(Batch {
        ids: Tensor::from_vec(ids, (rows.len(), t), dev)?,
        labels,
        mask,
        tokens,
    })
}

/// Dropout masks of one micro-batch of one optimizer step.
struct StepDropout {
    p: f64,
    seed: u64,
    step: u64,
    micro: u64,
}

impl DropoutSource for StepDropout {
    fn mask(&self, module: usize, len: usize) -> Option<Vec<f32>> {
        if self.p <= 0.0 {
            return None;
        }
        Some(optim::dropout_mask(
            len,
            self.p,
            self.seed,
            &[self.step, self.micro, module as u64],
        ))
    }
}

/// LoRA settings of an existing PEFT adapter folder (parsed as `ftconv merge` parses it).
fn adapter_spec(dir: &Path, dropout: f64) -> Result<LoraSpec> {
    let p = dir.join(CONFIG_FILE);
    let v = crate::checkpoint::read_json_opt(&p)?
        .ok_or_else(|| anyhow!("{}: missing (not a PEFT adapter folder?)", p.display()))?;
    let c = AdapterConfig::from_json(&p, &v)?;
    if c.peft_type != PeftType::Lora || c.use_dora {
        bail!(
            "{}: only plain LoRA adapters can be trained (not DoRA or IA³)",
            p.display()
        );
    }
    if !c.rank_pattern.is_empty()
        || !c.alpha_pattern.is_empty()
        || c.layers_to_transform.is_some()
        || !c.modules_to_save.is_empty()
        || c.fan_in_fan_out
    {
        bail!(
            "{}: rank_pattern, alpha_pattern, layers_to_transform, modules_to_save and fan_in_fan_out are not supported for training",
            p.display()
        );
    }
    let targets: Vec<String> = ALL_TARGETS
        .iter()
        .filter(|s| c.targets(&module_path(0, s)))
        .map(|s| s.to_string())
        .collect();
    if targets.is_empty() {
        bail!(
            "{}: target_modules names none of {}",
            p.display(),
            ALL_TARGETS.join(", ")
        );
    }
    Ok(LoraSpec {
        rank: c.r,
        alpha: c.lora_alpha,
        rslora: c.use_rslora,
        dropout,
        targets,
    })
}

/// Read `(A, B)` of a module from an adapter folder.
fn adapter_weights(
    st: &StFile,
    path: &str,
    out: usize,
    inp: usize,
    r: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let read = |suffix: &str, shape: [usize; 2]| -> Result<Vec<f32>> {
        let key = format!("base_model.model.{path}.{suffix}.weight");
        let t = st
            .get(&key)
            .ok_or_else(|| anyhow!("{}: tensor {key:?} is missing", st.path.display()))?;
        if t.shape != shape {
            bail!(
                "{}: tensor {key:?} has shape {:?}, expected {:?}",
                st.path.display(),
                t.shape,
                shape
            );
        }
        let mut v = vec![0f32; t.n_elements()];
        t.read_f32(0, &mut v)?;
        Ok(v)
    };
    Ok((read("lora_A", [r, inp])?, read("lora_B", [out, r])?))
}

fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

/// Write `name → (shape, f32 data)` tensors as safetensors (metadata format=pt) atomically.
fn write_f32_safetensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    extra: &[(String, Vec<usize>, Vec<i64>)],
) -> Result<()> {
    use safetensors::{Dtype, tensor::TensorView};
    let f32_bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| bytemuck::cast_slice(v).to_vec())
        .collect();
    let i64_bytes: Vec<Vec<u8>> = extra
        .iter()
        .map(|(_, _, v)| bytemuck::cast_slice(v).to_vec())
        .collect();
    let mut views = Vec::new();
    for ((n, s, _), b) in tensors.iter().zip(&f32_bytes) {
        views.push((n.clone(), TensorView::new(Dtype::F32, s.clone(), b)?));
    }
    for ((n, s, _), b) in extra.iter().zip(&i64_bytes) {
        views.push((n.clone(), TensorView::new(Dtype::I64, s.clone(), b)?));
    }
    let md: std::collections::HashMap<String, String> =
        [("format".to_string(), "pt".to_string())].into();
    let bytes = safetensors::serialize(views, Some(md))?;
    let mut f = AtomicFile::create(path)?;
    f.write_all(&bytes)
        .with_context(|| format!("{}: write failed", path.display()))?;
    f.commit()
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let mut f = AtomicFile::create(path)?;
    let mut s = serde_json::to_string_pretty(&crate::lora::output::sorted(v.clone()))?;
    s.push('\n');
    f.write_all(s.as_bytes())?;
    f.commit()
}

/// adapter_config.json as PEFT writes it for a LoRA on a causal LM.
pub fn adapter_config(spec: &LoraSpec, base_name: &str) -> Value {
    json!({
        "alpha_pattern": {},
        "auto_mapping": null,
        "base_model_name_or_path": base_name,
        "bias": "none",
        "corda_config": null,
        "eva_config": null,
        "exclude_modules": null,
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layer_replication": null,
        "layers_pattern": null,
        "layers_to_transform": null,
        "loftq_config": {},
        "lora_alpha": spec.alpha,
        "lora_bias": false,
        "lora_dropout": spec.dropout,
        "megatron_config": null,
        "megatron_core": "megatron.core",
        "modules_to_save": null,
        "peft_type": "LORA",
        "peft_version": "0.21.2",
        "r": spec.rank,
        "rank_pattern": {},
        "revision": null,
        "target_modules": spec.targets,
        "task_type": "CAUSAL_LM",
        "trainable_token_indices": null,
        "use_dora": false,
        "use_rslora": spec.rslora,
    })
}

/// Write the PEFT adapter (config + F32 weights) into `dir`.
pub fn save_adapter(dir: &Path, model: &Model, spec: &LoraSpec, base_name: &str) -> Result<()> {
    let mut ts = Vec::new();
    for (k, v) in model.trainable() {
        ts.push((k, v.as_tensor().dims().to_vec(), to_vec(v.as_tensor())?));
    }
    write_f32_safetensors(&dir.join(ADAPTER_FILE), &ts, &[])?;
    write_json(&dir.join(CONFIG_FILE), &adapter_config(spec, base_name))
}

/// What a checkpoint records besides weights and optimizer state; a resume must match it.
fn run_identity(a: &Args, data_sha: &str, rows: usize, total: usize, spec: &LoraSpec) -> Value {
    json!({
        "data_sha256": data_sha,
        "rows": rows,
        "total_steps": total,
        "seed": a.seed,
        "batch_size": a.batch_size,
        "grad_accum": a.grad_accum,
        "lr": a.lr,
        "lr_schedule": format!("{:?}", a.lr_schedule).to_lowercase(),
        "warmup_steps": a.warmup_steps,
        "weight_decay": a.weight_decay,
        "max_grad_norm": a.max_grad_norm,
        "max_seq_len": a.max_seq_len,
        "train_on_prompt": a.train_on_prompt,
        "base_dtype": format!("{:?}", a.base_dtype).to_lowercase(),
        "rank": spec.rank,
        "alpha": spec.alpha,
        "rslora": spec.rslora,
        "dropout": spec.dropout,
        "targets": spec.targets,
    })
}

struct Log {
    f: Option<std::fs::File>,
}

impl Log {
    fn open(path: &Path, append: bool) -> Result<Log> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(path)
            .with_context(|| format!("{}: cannot open the training log", path.display()))?;
        Ok(Log { f: Some(f) })
    }
    fn line(&mut self, v: Value) -> Result<()> {
        if let Some(f) = &mut self.f {
            writeln!(f, "{v}").context("training log: write failed")?;
        }
        Ok(())
    }
}

/// Loss (token mean) over a data set, batches of `bs`, no dropout.
fn evaluate(model: &Model, rows: &[Sample], bs: usize, pad: u32) -> Result<(f64, usize)> {
    let mut sum = 0f64;
    let mut n = 0usize;
    for chunk in rows.chunks(bs.max(1)) {
        let refs: Vec<&Sample> = chunk.iter().collect();
        let b = collate(&refs, pad, &model.device)?;
        let logits = model.forward(&b.ids, None)?;
        let s = causal_lm_loss(&logits, &b.labels, 1)?.to_scalar::<f32>()?;
        sum += s as f64;
        n += chunk.iter().map(Sample::trained_tokens).sum::<usize>();
    }
    Ok((if n > 0 { sum / n as f64 } else { f64::NAN }, n))
}

/// One optimizer step's forward/backward over its micro-batches: (loss, summed grads, tokens).
fn accumulate(
    model: &Model,
    params: &[(String, candle_core::Var)],
    micro: &[Vec<&Sample>],
    pad: u32,
    dropout: Option<(f64, u64, u64)>,
) -> Result<(f64, Vec<Tensor>, usize)> {
    let n_items: usize = micro.iter().flatten().map(|s| s.trained_tokens()).sum();
    let mut grads: Vec<Option<Tensor>> = vec![None; params.len()];
    let mut loss_sum = 0f64;
    let mut tokens = 0;
    for (mi, rows) in micro.iter().enumerate() {
        let b = collate(rows, pad, &model.device)?;
        tokens += b.tokens;
        let drop = dropout.map(|(p, seed, step)| StepDropout {
            p,
            seed,
            step,
            micro: mi as u64,
        });
        let logits = model.forward(&b.ids, drop.as_ref().map(|d| d as &dyn DropoutSource))?;
        let loss = causal_lm_loss(&logits, &b.labels, n_items)?;
        loss_sum += loss.to_scalar::<f32>()? as f64;
        let gs = loss.backward()?;
        for (i, (k, v)) in params.iter().enumerate() {
            let g = gs
                .get(v.as_tensor())
                .ok_or_else(|| anyhow!("internal: no gradient reached {k}"))?;
            grads[i] = Some(match grads[i].take() {
                None => g.clone(),
                Some(a) => (a + g)?,
            });
        }
    }
    let grads = grads
        .into_iter()
        .map(|g| g.ok_or_else(|| anyhow!("internal: empty step")))
        .collect::<Result<Vec<_>>>()?;
    Ok((loss_sum, grads, tokens))
}

/// `--probe`: one forward+backward on the first rows, everything written for the parity checks.
fn probe(model: &Model, rows: &[Sample], bs: usize, pad: u32, out: &Path) -> Result<()> {
    let params = model.trainable();
    let first: Vec<&Sample> = rows.iter().take(bs).collect();
    let b = collate(&first, pad, &model.device)?;
    let n_items: usize = first.iter().map(|s| s.trained_tokens()).sum();
    let logits = model.forward(&b.ids, None)?;
    let loss = causal_lm_loss(&logits, &b.labels, n_items)?;
    let gs = loss.backward()?;
    let mut ts = vec![
        (
            "logits".to_string(),
            logits.dims().to_vec(),
            to_vec(&logits)?,
        ),
        ("loss".to_string(), vec![1], vec![loss.to_scalar::<f32>()?]),
    ];
    for (k, v) in &params {
        let g = gs
            .get(v.as_tensor())
            .ok_or_else(|| anyhow!("internal: no gradient reached {k}"))?;
        ts.push((format!("grad.{k}"), g.dims().to_vec(), to_vec(g)?));
    }
    let (bsz, t) = b.ids.dims2()?;
    let ids: Vec<i64> = b
        .ids
        .flatten_all()?
        .to_vec1::<u32>()?
        .into_iter()
        .map(i64::from)
        .collect();
    let extra = vec![
        ("input_ids".to_string(), vec![bsz, t], ids),
        ("labels".to_string(), vec![bsz, t], b.labels.concat()),
        ("attention_mask".to_string(), vec![bsz, t], b.mask.concat()),
    ];
    write_f32_safetensors(out, &ts, &extra)
}

fn device_for(choice: crate::gpu::DeviceChoice, quiet: bool) -> Result<Device> {
    use crate::gpu::DeviceChoice;
    #[cfg(feature = "candle-cuda")]
    if choice != DeviceChoice::Cpu {
        match Device::new_cuda(0) {
            Ok(d) => {
                if !quiet {
                    eprintln!("ftconv: using CUDA for training (candle)");
                }
                return Ok(d);
            }
            Err(e) if choice == DeviceChoice::Cuda => bail!("--device cuda: {e}"),
            Err(e) => {
                if !quiet {
                    eprintln!("ftconv: CUDA unavailable for training ({e}); using the CPU");
                }
                return Ok(Device::Cpu);
            }
        }
    }
    #[cfg(not(feature = "candle-cuda"))]
    {
        if choice == DeviceChoice::Cuda {
            return Err(usage(
                "--device cuda: this ftconv was built without the candle-cuda feature (cargo build --release --features candle-cuda)",
            ));
        }
        if choice == DeviceChoice::Auto && !quiet {
            eprintln!(
                "ftconv: CUDA unavailable for training (built without the candle-cuda feature); using the CPU"
            );
        }
    }
    Ok(Device::Cpu)
}

pub fn run(a: &Args, quiet: bool) -> Result<()> {
    for (flag, v) in [
        ("--batch-size", a.batch_size),
        ("--grad-accum", a.grad_accum),
        ("--rank", a.rank),
        ("--max-seq-len", a.max_seq_len),
    ] {
        if v == 0 {
            return Err(usage(format!("{flag} must be at least 1")));
        }
    }
    if !(0.0..1.0).contains(&a.dropout) {
        return Err(usage("--dropout must be in [0, 1)"));
    }
    if a.max_steps.is_none() && a.epochs == 0 {
        return Err(usage("--epochs must be at least 1 (or give --max-steps)"));
    }
    if a.max_steps == Some(0) {
        return Err(usage("--max-steps must be at least 1"));
    }
    if a.resume.is_some() && a.init_adapter.is_some() {
        return Err(usage("--resume and --init-adapter cannot be combined"));
    }
    if let Some(n) = a.threads {
        if n == 0 {
            return Err(usage("--threads must be at least 1"));
        }
        // candle sizes both its element-wise pool and gemm's rayon pool from RAYON_NUM_THREADS
        // when they start; building rayon's global pool ourselves instead made the two pools
        // fight over the cores (3× slower measured on 2 cores).
        // SAFETY: no other thread has been started yet in this process.
        unsafe {
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        }
    }
    let device = device_for(a.device, quiet)?;
    keep_freed_memory();

    let ck = HfCheckpoint::open(&a.base)?;
    let enc = TextEncoder::from_dir(&a.base)?;
    if !quiet {
        for w in enc.warnings() {
            eprintln!("ftconv: warning: {w}");
        }
    }
    let dopts = DataOptions {
        max_seq_len: a.max_seq_len,
        train_on_prompt: a.train_on_prompt,
    };
    let load = |p: &Path| -> Result<Vec<Sample>> {
        let rows = data::load_jsonl(p, &enc, &dopts)?;
        let n = rows.len();
        let (kept, _) = data::drop_untrained(rows);
        if kept.is_empty() {
            bail!(
                "{}: no row has a token to train on (after truncation to --max-seq-len {})",
                p.display(),
                a.max_seq_len
            );
        }
        if kept.len() < n && !quiet {
            eprintln!(
                "ftconv: {}: {} of {n} rows have no token to train on (after truncation) and are skipped",
                p.display(),
                n - kept.len()
            );
        }
        Ok(kept)
    };
    let train = load(&a.data)?;
    let eval = match &a.eval {
        Some(p) => Some(load(p)?),
        None => None,
    };
    let pad = enc.pad_id();

    // LoRA settings and initial weights: a checkpoint, an adapter, or PEFT's initialization.
    let from_dir = a.resume.as_ref().or(a.init_adapter.as_ref());
    let spec = match from_dir {
        Some(d) => adapter_spec(d, a.dropout)?,
        None => LoraSpec {
            rank: a.rank,
            alpha: a.alpha,
            rslora: a.rslora,
            dropout: a.dropout,
            targets: match &a.targets {
                Some(t) => t
                    .iter()
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect(),
                None => ALL_TARGETS.iter().map(|s| s.to_string()).collect(),
            },
        },
    };
    let base_dtype = match a.base_dtype {
        cli::BaseDtype::Nf4 => BaseDtype::Nf4,
        cli::BaseDtype::Bf16 => BaseDtype::Bf16,
        cli::BaseDtype::F32 => BaseDtype::F32,
    };

    let per_step = a.batch_size * a.grad_accum;
    let steps_per_epoch = train.len().div_ceil(per_step);
    let total = a.max_steps.unwrap_or(steps_per_epoch * a.epochs);
    let data_sha = crate::cli::package::sha256_file(&a.data)?;
    let identity = run_identity(a, &data_sha, train.len(), total, &spec);

    if a.dry_run {
        let tokens: usize = train.iter().map(|s| s.input_ids.len()).sum();
        let trained: usize = train.iter().map(Sample::trained_tokens).sum();
        println!("finetune plan for {}", a.base.display());
        println!(
            "  model: {} layers, hidden {}, vocab {}; base weights {}",
            ck.config()?.num_hidden_layers,
            ck.config()?.hidden_size,
            ck.config()?.vocab_size,
            format!("{:?}", a.base_dtype).to_lowercase()
        );
        println!(
            "  LoRA: r {} alpha {} ({}) dropout {} on {}",
            spec.rank,
            spec.alpha,
            if spec.rslora { "rsLoRA" } else { "alpha/r" },
            spec.dropout,
            spec.targets.join(",")
        );
        println!(
            "  data: {} rows, {tokens} tokens, {trained} trained; {} steps ({} per epoch) of {} rows",
            train.len(),
            total,
            steps_per_epoch,
            per_step
        );
        if let Some(e) = &eval {
            println!("  eval: {} rows", e.len());
        }
        println!("  output: {}", a.output.display());
        return Ok(());
    }

    let seed = a.seed;
    let a_init = move |module: usize, r: usize, inp: usize| {
        optim::kaiming_uniform_a(r, inp, seed, &[module as u64])
    };
    let st = match from_dir {
        Some(d) => Some(StFile::open(&d.join(ADAPTER_FILE))?),
        None => None,
    };
    let given = |path: &str, out: usize, inp: usize| -> Result<(Vec<f32>, Vec<f32>)> {
        adapter_weights(st.as_ref().expect("adapter"), path, out, inp, spec.rank)
    };
    let init = match st {
        Some(_) => LoraInit::Given(&given),
        None => LoraInit::Peft(&a_init),
    };
    let t_load = Instant::now();
    let model = Model::load(&ck, base_dtype, &spec, init, &device)?;
    drop(ck);
    let params = model.trainable();
    if !quiet {
        let n: usize = params.iter().map(|(_, v)| v.as_tensor().elem_count()).sum();
        eprintln!(
            "ftconv: {} LoRA modules, {n} trainable parameters; base weights {} in memory (loaded in {:.1} s, peak RSS {:.0} MB)",
            params.len() / 2,
            crate::cli::human_bytes(model.base_bytes() as u64),
            t_load.elapsed().as_secs_f64(),
            peak_rss_mb().unwrap_or(0.0)
        );
    }

    if let Some(p) = &a.probe {
        return probe(&model, &train, a.batch_size, pad, p);
    }

    // Output folder (the adapter files are written atomically at the end; checkpoints inside).
    if a.output.exists() && !a.output.is_dir() {
        bail!("{}: exists and is not a folder", a.output.display());
    }
    std::fs::create_dir_all(&a.output)
        .with_context(|| format!("{}: cannot create", a.output.display()))?;
    let base_name = a.base.to_string_lossy().to_string();

    let names: Vec<String> = params.iter().map(|(k, _)| k.clone()).collect();
    let shapes: Vec<Vec<usize>> = params
        .iter()
        .map(|(_, v)| v.as_tensor().dims().to_vec())
        .collect();
    let cfg = AdamWConfig {
        lr: a.lr,
        weight_decay: a.weight_decay,
        ..AdamWConfig::default()
    };
    let (mut opt, start) = match &a.resume {
        Some(dir) => {
            let sp = dir.join(STATE_FILE);
            let text = std::fs::read_to_string(&sp)
                .with_context(|| format!("{}: cannot read", sp.display()))?;
            let state: Value = serde_json::from_str(&text)
                .map_err(|e| anyhow!("{}: not valid JSON: {e}", sp.display()))?;
            let saved = state.get("run").cloned().unwrap_or(Value::Null);
            if let (Value::Object(s), Value::Object(now)) = (&saved, &identity) {
                for (k, v) in now {
                    if s.get(k) != Some(v) {
                        bail!(
                            "{}: the checkpoint was made with {k} = {}, this run has {v}; resume with the same data and settings",
                            sp.display(),
                            s.get(k).map(Value::to_string).unwrap_or("nothing".into())
                        );
                    }
                }
            } else {
                bail!("{}: key \"run\" is missing", sp.display());
            }
            let step = state
                .get("step")
                .and_then(Value::as_u64)
                .ok_or_else(|| anyhow!("{}: key \"step\" is missing", sp.display()))?
                as usize;
            (
                AdamW::load(&dir.join(OPTIM_FILE), &names, &shapes, cfg)?,
                step,
            )
        }
        None => (AdamW::new(&names, &shapes, cfg)?, 0),
    };

    let log_path = a
        .log
        .clone()
        .unwrap_or_else(|| a.output.join("train_log.jsonl"));
    let mut log = Log::open(&log_path, a.resume.is_some())?;
    let interrupted = optim::install_interrupt_flag()?;
    let pb = crate::cli::progress_bar(total as u64, quiet);
    pb.set_position(start as u64);

    let save_ckpt = |step: usize, opt: &AdamW| -> Result<PathBuf> {
        let dir = a.output.join(format!("checkpoint-{step}"));
        let tmp = crate::output::AtomicDir::create(&dir)?;
        save_adapter(&tmp.path(""), &model, &spec, &base_name)?;
        opt.save(&tmp.path(OPTIM_FILE))?;
        write_json(
            &tmp.path(STATE_FILE),
            &json!({"step": step, "epoch": step as f64 / steps_per_epoch as f64, "run": identity}),
        )?;
        tmp.commit()?;
        Ok(dir)
    };

    if let Some(e) = &eval
        && start == 0
    {
        let (l, n) = evaluate(&model, e, a.batch_size, pad)?;
        log.line(json!({"type": "eval", "step": 0, "eval_loss": l, "eval_tokens": n}))?;
        pb.println(format!("step 0: eval loss {l:.4}"));
    }

    let t0 = Instant::now();
    let mut tokens_total = 0usize;
    let mut order: Option<(usize, Vec<usize>)> = None;
    let mut step = start;
    while step < total {
        let epoch = step / steps_per_epoch;
        if order.as_ref().map(|o| o.0) != Some(epoch) {
            order = Some((
                epoch,
                optim::shuffle_indices(train.len(), seed, epoch as u64),
            ));
        }
        let idx = &order.as_ref().expect("order").1;
        let first = (step % steps_per_epoch) * per_step;
        let rows: Vec<&Sample> = idx[first..(first + per_step).min(idx.len())]
            .iter()
            .map(|&i| &train[i])
            .collect();
        let micro: Vec<Vec<&Sample>> = rows.chunks(a.batch_size).map(|c| c.to_vec()).collect();
        let (loss, mut grads, tokens) = accumulate(
            &model,
            &params,
            &micro,
            pad,
            Some((spec.dropout, seed, step as u64)),
        )?;
        let gnorm = optim::clip_grad_norm(&mut grads, a.max_grad_norm)?;
        let lr = optim::lr_at(a.lr_schedule, a.lr, a.warmup_steps, total, step);
        opt.step(&params, &grads, lr)?;
        step += 1;
        tokens_total += tokens;
        let el = t0.elapsed().as_secs_f64();
        let tps = tokens_total as f64 / el.max(1e-9);
        log.line(json!({
            "type": "train", "step": step, "epoch": step as f64 / steps_per_epoch as f64,
            "loss": loss, "lr": lr, "grad_norm": gnorm, "tokens": tokens, "tokens_per_s": tps, "elapsed_s": el,
        }))?;
        pb.set_message(format!("loss {loss:.4} lr {lr:.2e} {tps:.0} tok/s"));
        pb.set_position(step as u64);
        if let Some(e) = &eval
            && a.eval_every > 0
            && step % a.eval_every == 0
            && step < total
        {
            let (l, n) = evaluate(&model, e, a.batch_size, pad)?;
            log.line(json!({"type": "eval", "step": step, "eval_loss": l, "eval_tokens": n}))?;
            pb.println(format!("step {step}: eval loss {l:.4}"));
        }
        if a.save_every > 0 && step % a.save_every == 0 && step < total {
            save_ckpt(step, &opt)?;
        }
        if interrupted.load(Ordering::SeqCst) && step < total {
            let dir = save_ckpt(step, &opt)?;
            pb.finish_and_clear();
            bail!(
                "interrupted at step {step} of {total}; checkpoint saved in {} (continue with --resume {})",
                dir.display(),
                dir.display()
            );
        }
    }
    pb.finish_and_clear();
    if let Some(e) = &eval {
        let (l, n) = evaluate(&model, e, a.batch_size, pad)?;
        log.line(json!({"type": "eval", "step": step, "eval_loss": l, "eval_tokens": n}))?;
        if !quiet {
            eprintln!("step {step}: eval loss {l:.4}");
        }
    }
    save_adapter(&a.output, &model, &spec, &base_name)?;
    let el = t0.elapsed().as_secs_f64();
    let rss = peak_rss_mb();
    log.line(json!({
        "type": "done", "steps": step, "train_tokens": tokens_total,
        "tokens_per_s": tokens_total as f64 / el.max(1e-9), "elapsed_s": el, "peak_rss_mb": rss,
    }))?;
    if !quiet {
        eprintln!(
            "ftconv: {} steps, {tokens_total} tokens in {el:.1} s ({:.1} tokens/s), peak RSS {}; adapter in {}",
            step - start,
            tokens_total as f64 / el.max(1e-9),
            rss.map(|m| format!("{m:.0} MB")).unwrap_or("?".into()),
            a.output.display()
        );
    }
    Ok(())
}
