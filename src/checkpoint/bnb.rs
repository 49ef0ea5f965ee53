//! bitsandbytes 4-bit checkpoints in the layout transformers' `save_pretrained` writes for a
//! model loaded with `BitsAndBytesConfig(load_in_4bit=True, ...)` (shared/specs/nf4-peft.md §4):
//!
//! * writing: [`plan`] + [`write`] quantize an HF checkpoint module by module into that layout;
//! * reading: [`fold_quantized`] turns the per-module key groups of such a folder back into one
//!   logical tensor per weight (stored dtype, original shape) whose reads dequantize as
//!   `dequantize_4bit` does, so every reader of [`HfCheckpoint`] sees a plain checkpoint.

use super::safetensors::TensorRef;
use super::writer::{PlannedTensor, ShardedWriter, WriterOptions};
use super::{HfCheckpoint, read_json_opt};
use crate::output::AtomicDir;
use crate::quant::nf4::{self, Nested, QuantStateInfo, QuantType, StoredDtype};
use anyhow::{Context, Result, anyhow, bail};
use rayon::prelude::*;
use safetensors::Dtype;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// Files copied unchanged next to the weights (tokenizer, chat template, generation config).
pub const SIDE_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
];

/// What `ftconv quantize --to nf4|fp4` writes.
#[derive(Clone, Debug)]
pub struct Bnb4Options {
    pub quant_type: QuantType,
    pub double_quant: bool,
    /// Extra module patterns left unquantized (`llm_int8_skip_modules` semantics).
    pub skip: Vec<String>,
    /// `bnb_4bit_compute_dtype` (bfloat16 by default, the QLoRA recipe).
    pub compute_dtype: StoredDtype,
    pub max_shard_size: u64,
}

impl Default for Bnb4Options {
    fn default() -> Self {
        Bnb4Options {
            quant_type: QuantType::Nf4,
            double_quant: true,
            skip: vec![],
            compute_dtype: StoredDtype::BF16,
            max_shard_size: super::writer::DEFAULT_MAX_SHARD_SIZE,
        }
    }
}

/// transformers' `should_convert_module`: a pattern skips a module when it matches (as a
/// regex, anchored at the start) up to a `.` boundary or the end, or when the path ends with it.
pub fn matches_skip(module: &str, pattern: &str) -> Result<bool> {
    if module.ends_with(pattern) {
        return Ok(true);
    }
    let re = regex::Regex::new(&format!("^(?:{pattern})$"))
        .map_err(|e| anyhow!("--skip {pattern:?} is not a valid regular expression: {e}"))?;
    let b = module.as_bytes();
    for end in 0..=b.len() {
        let boundary = end == b.len() || b[end] == b'.' || (end > 0 && b[end - 1] == b'.');
        if boundary && module.is_char_boundary(end) && re.is_match(&module[..end]) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Whether a checkpoint tensor is the weight of an `nn.Linear` (what `replace_with_bnb_linear`
/// converts) in the architectures ftconv knows (Llama, Mistral, Qwen2): a 2-D `.weight` that
/// is not an embedding.
pub fn is_linear_weight(t: &TensorRef) -> bool {
    t.shape.len() == 2
        && t.name.ends_with(".weight")
        && !t.name.trim_end_matches(".weight").ends_with("embed_tokens")
        && !t.name.contains("embed")
}

/// Module order for families without a description: the llama family's definition order,
/// which most decoder-only models share.
const GENERIC_MODULE_ORDER: &[&str] = &[
    "model",
    "embed_tokens",
    "layers",
    "self_attn",
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "mlp",
    "gate_proj",
    "up_proj",
    "down_proj",
    "input_layernorm",
    "post_attention_layernorm",
    "norm",
    "lm_head",
];

/// Order key of a tensor in the model's `state_dict()` (module definition order, from the
/// family's description), used only to split shards as transformers would.
fn state_dict_key(name: &str, order: &[&str]) -> Vec<(u32, u64, String)> {
    name.split('.')
        .map(|p| {
            if let Ok(n) = p.parse::<u64>() {
                (0, n, String::new())
            } else if let Some(r) = order.iter().position(|x| *x == p) {
                (1, r as u64, String::new())
            } else if p == "weight" || p == "bias" {
                (
                    1,
                    (order.len() + usize::from(p == "bias")) as u64,
                    String::new(),
                )
            } else {
                (2, 0, p.to_string())
            }
        })
        .collect()
}

#[derive(Clone, Debug)]
enum Part {
    Copy(TensorRef),
    Packed(usize),
    Absmax(usize),
    QuantMap,
    NestedAbsmax(usize),
    NestedQuantMap,
    QuantState(usize),
}

/// A planned 4-bit output.
pub struct Bnb4Plan {
    pub writer: ShardedWriter,
    parts: HashMap<String, Part>,
    /// The quantized weights, by module index.
    pub quantized: Vec<TensorRef>,
    /// The modules left unquantized by a skip rule (lm_head…), for the report.
    pub skipped: Vec<String>,
    pub opts: Bnb4Options,
    /// dtype of the unquantized tensors (config.json `dtype`).
    pub dtype: StoredDtype,
    /// `llm_int8_skip_modules` to write (None = transformers' defaults apply).
    pub skip_modules: Option<Vec<String>>,
    /// The index's `total_parameters` (`num_parameters()` of the 4-bit model).
    pub total_parameters: u64,
}

/// Plan the 4-bit checkpoint of `ck`.
pub fn plan(ck: &HfCheckpoint, opts: &Bnb4Options) -> Result<Bnb4Plan> {
    // transformers' default skips: tied modules, the last module (lm_head), the output embedding
    let mut defaults = vec!["lm_head".to_string()];
    if ck.tied() {
        defaults.push("model.embed_tokens".to_string());
    }
    let patterns: Vec<String> = defaults.iter().chain(&opts.skip).cloned().collect();
    let skip_modules = if opts.skip.is_empty() {
        None
    } else {
        let mut v = vec!["lm_head".to_string()];
        for s in &opts.skip {
            if !v.contains(s) {
                v.push(s.clone());
            }
        }
        Some(v)
    };
    let mut order: Vec<&TensorRef> = ck.tensors.iter().collect();
    let module_order: Vec<&str> = match ck.config() {
        Ok(c) if !c.arch.module_order.is_empty() => {
            c.arch.module_order.iter().map(String::as_str).collect()
        }
        _ => GENERIC_MODULE_ORDER.to_vec(),
    };
    order.sort_by_cached_key(|t| state_dict_key(&t.name, &module_order));
    let mut planned = vec![];
    let mut parts = HashMap::new();
    let mut quantized = vec![];
    let mut skipped = vec![];
    let mut dtype = None;
    let qt = opts.quant_type;
    for t in order {
        // a tied lm_head is not saved by transformers (remove_tied_weights_from_state_dict)
        if ck.tied() && t.name == "lm_head.weight" && ck.get("model.embed_tokens.weight").is_some()
        {
            continue;
        }
        if !t.is_float() {
            bail!(
                "{}: tensor {:?} has dtype {:?}; only F32, F16 and BF16 checkpoints can be quantized",
                t.file.display(),
                t.name,
                t.dtype
            );
        }
        if t.shape.len() >= 2 && dtype.is_none() {
            dtype = StoredDtype::from_safetensors(t.dtype);
        }
        let module = t.name.trim_end_matches(".weight");
        let mut quantize = is_linear_weight(t);
        if quantize {
            for p in &patterns {
                if matches_skip(module, p)? {
                    quantize = false;
                    skipped.push(module.to_string());
                    break;
                }
            }
        }
        if !quantize {
            planned.push(PlannedTensor::new(&t.name, t.dtype, t.shape.clone()));
            parts.insert(t.name.clone(), Part::Copy(t.clone()));
            continue;
        }
        let m = quantized.len();
        quantized.push(t.clone());
        let n = t.n_elements();
        let nb = nf4::n_blocks(n);
        let base = &t.name;
        // the blob's final length depends on the offset's digits; write() fixes it
        let info = quant_state_info(t, qt, opts.double_quant.then_some(0.0))?;
        let blob_len = info.to_json().len();
        let mut add = |suffix: &str, dt: Dtype, shape: Vec<usize>, part: Part| {
            let name = format!("{base}{suffix}");
            planned.push(PlannedTensor::new(&name, dt, shape));
            parts.insert(name, part);
        };
        add("", Dtype::U8, vec![nf4::packed_len(n), 1], Part::Packed(m));
        if opts.double_quant {
            add(".absmax", Dtype::U8, vec![nb], Part::Absmax(m));
        } else {
            add(".absmax", Dtype::F32, vec![nb], Part::Absmax(m));
        }
        add(".quant_map", Dtype::F32, vec![16], Part::QuantMap);
        if opts.double_quant {
            add(
                ".nested_absmax",
                Dtype::F32,
                vec![nf4::n_nested_blocks(n)],
                Part::NestedAbsmax(m),
            );
            add(
                ".nested_quant_map",
                Dtype::F32,
                vec![256],
                Part::NestedQuantMap,
            );
        }
        add(
            &format!(".{}", info.key_suffix()),
            Dtype::U8,
            vec![blob_len],
            Part::QuantState(m),
        );
    }
    if quantized.is_empty() {
        bail!(
            "{}: no Linear weight left to quantize (all skipped?)",
            ck.dir.display()
        );
    }
    // num_parameters() of the 4-bit model: packed weights count two values a byte
    let total_parameters: u64 = planned_sources(&parts)
        .map(|t| t.n_elements() as u64)
        .chain(
            quantized
                .iter()
                .map(|q| (q.n_elements() as u64).div_ceil(2) * 2),
        )
        .sum();
    let wopts = WriterOptions {
        max_shard_size: opts.max_shard_size,
        total_parameters: Some(total_parameters),
        ..Default::default()
    };
    Ok(Bnb4Plan {
        writer: ShardedWriter::plan(planned, &wopts)?,
        parts,
        quantized,
        skipped,
        opts: opts.clone(),
        dtype: dtype.unwrap_or(StoredDtype::BF16),
        skip_modules,
        total_parameters,
    })
}

/// The source tensors behind a plan (each once).
fn planned_sources(parts: &HashMap<String, Part>) -> impl Iterator<Item = &TensorRef> {
    parts.values().filter_map(|p| match p {
        Part::Copy(t) => Some(t),
        _ => None,
    })
}

fn quant_state_info(
    t: &TensorRef,
    qt: QuantType,
    nested_offset: Option<f32>,
) -> Result<QuantStateInfo> {
    Ok(QuantStateInfo {
        quant_type: qt,
        blocksize: nf4::BLOCKSIZE,
        dtype: StoredDtype::from_safetensors(t.dtype)
            .ok_or_else(|| anyhow!("tensor {:?}: unsupported dtype {:?}", t.name, t.dtype))?,
        shape: t.shape.clone(),
        nested_offset,
    })
}

/// Statistics of the module being written (one at a time, the writer's file order keeps the
/// keys of one module together within each dtype group).
struct Cache {
    module: usize,
    absmax: Vec<f32>,
    nested: Option<Nested>,
    packed: Option<Vec<u8>>,
}

/// Make `cache` hold module `m`'s statistics (and packed codes when `need_packed`).
#[allow(clippy::too_many_arguments)]
fn ensure_stats<'a>(
    cache: &'a mut Option<Cache>,
    w: &TensorRef,
    m: usize,
    need_packed: bool,
    qt: QuantType,
    offset: Option<f32>,
    over: &Overrides,
    backend: &crate::gpu::Backend,
) -> Result<&'a Cache> {
    let fresh = match cache.as_ref() {
        Some(c) => c.module != m || (need_packed && c.packed.is_none()),
        None => true,
    };
    if fresh {
        let x = read_values(w, over)?;
        let (absmax, packed) = if need_packed {
            let (p, a) = backend
                .quantize_4bit(qt, &x)
                .with_context(|| format!("tensor {:?}", w.name))?;
            (a, Some(p))
        } else {
            (absmax_of(&x), None)
        };
        drop(x);
        w.release();
        let nested = match offset {
            Some(off) => Some(
                backend
                    .double_quant(&absmax, off)
                    .with_context(|| format!("tensor {:?}", w.name))?,
            ),
            None => None,
        };
        *cache = Some(Cache {
            module: m,
            absmax,
            nested,
            packed,
        });
    }
    Ok(cache.as_ref().unwrap())
}

/// A tensor's bytes in its own dtype; a 4-bit weight (read from an NF4 folder) is written
/// dequantized to its stored dtype.
pub fn write_tensor_bytes(t: &TensorRef, out: &mut dyn std::io::Write) -> Result<()> {
    if t.bnb4().is_none() {
        out.write_all(t.bytes())?;
        return Ok(());
    }
    let x = read_all(t)?;
    out.write_all(&dtype_bytes(&x, t.dtype))?;
    Ok(())
}

fn read_all(t: &TensorRef) -> Result<Vec<f32>> {
    let mut x = vec![0f32; t.n_elements()];
    const CH: usize = 1 << 20;
    x.par_chunks_mut(CH)
        .enumerate()
        .try_for_each(|(i, c)| t.read_f32(i * CH, c))?;
    Ok(x)
}

/// Values that replace source tensors on the way (adapters merged in the same pass): tensor name
/// → its merged rows, already rounded to the tensor's dtype.
pub type Overrides = HashMap<String, Box<dyn crate::plan::RowSource>>;

/// A tensor's values, from `over` when it is there.
fn read_values(t: &TensorRef, over: &Overrides) -> Result<Vec<f32>> {
    let Some(r) = over.get(&t.name) else {
        return read_all(t);
    };
    let cols = r.cols().max(1);
    let mut x = vec![0f32; t.n_elements()];
    if r.rows() * cols != x.len() {
        bail!(
            "internal: merged rows of {:?} do not match its shape {:?}",
            t.name,
            t.shape
        );
    }
    let rows_per = if r.prefers_batches() {
        r.rows().max(1)
    } else {
        ((1usize << 20) / cols).max(1)
    };
    x.par_chunks_mut(rows_per * cols)
        .enumerate()
        .try_for_each(|(i, c)| r.read_rows(i * rows_per, c))?;
    r.release();
    t.release();
    Ok(x)
}

/// f32 values (representable in `d`) as the bytes of dtype `d`.
fn dtype_bytes(x: &[f32], d: Dtype) -> Vec<u8> {
    match d {
        Dtype::BF16 => x
            .iter()
            .flat_map(|v| crate::quant::fp::f32_to_bf16_bits(*v).to_le_bytes())
            .collect(),
        Dtype::F16 => x
            .iter()
            .flat_map(|v| crate::quant::fp::f32_to_f16_bits(*v).to_le_bytes())
            .collect(),
        _ => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// Per-block absmax only (what `quantize_4bit` stores), without computing codes.
fn absmax_of(x: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; nf4::n_blocks(x.len())];
    out.par_iter_mut().enumerate().for_each(|(b, o)| {
        let blk = &x[b * nf4::BLOCKSIZE..((b + 1) * nf4::BLOCKSIZE).min(x.len())];
        let am = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
        *o = if blk.len() < nf4::BLOCKSIZE {
            am.max(1e-38)
        } else {
            am
        };
    });
    out
}

/// Summary of a written 4-bit checkpoint.
pub struct Bnb4Summary {
    pub files: Vec<String>,
    pub bytes_out: u64,
    pub quantized: usize,
    pub copied: usize,
}

/// Quantize and write everything into `dir` (weights, config.json, side files). `progress`
/// is called after each tensor with (tensors done, total).
pub fn write(
    ck: &HfCheckpoint,
    plan: &mut Bnb4Plan,
    dir: &AtomicDir,
    progress: &dyn Fn(usize, usize, &str),
) -> Result<Bnb4Summary> {
    write_merged(
        ck,
        plan,
        dir,
        progress,
        &Overrides::new(),
        &crate::gpu::Backend::Cpu,
    )
}

/// [`write`], with some source tensors' values replaced by `over` (adapters merged in the
/// same pass: the result equals merging to a folder, then quantizing that), the 4-bit and
/// double quantization on `backend`.
pub fn write_merged(
    ck: &HfCheckpoint,
    plan: &mut Bnb4Plan,
    dir: &AtomicDir,
    progress: &dyn Fn(usize, usize, &str),
    over: &Overrides,
    backend: &crate::gpu::Backend,
) -> Result<Bnb4Summary> {
    // The JSON blob length depends on the offset's digits: compute every module's offset first
    // (absmax only, cheap), fix the plan, then write.
    let mut offsets = vec![None; plan.quantized.len()];
    if plan.opts.double_quant {
        for (m, t) in plan.quantized.iter().enumerate() {
            let x = read_values(t, over)?;
            offsets[m] = Some(nf4::mean_f32(&absmax_of(&x)));
            t.release();
        }
    }
    let infos: Vec<QuantStateInfo> = plan
        .quantized
        .iter()
        .zip(&offsets)
        .map(|(t, off)| quant_state_info(t, plan.opts.quant_type, *off))
        .collect::<Result<_>>()?;
    let mut tensors = plan.writer.tensors().to_vec();
    for t in tensors.iter_mut() {
        if let Some(Part::QuantState(m)) = plan.parts.get(&t.name) {
            t.shape = vec![infos[*m].to_json().len()];
        }
    }
    let wopts = WriterOptions {
        max_shard_size: plan.opts.max_shard_size,
        total_parameters: Some(plan.total_parameters),
        ..Default::default()
    };
    plan.writer = ShardedWriter::plan(tensors, &wopts)?;
    let qt = plan.opts.quant_type;
    let total = plan.writer.tensors().len();
    let mut done = 0usize;
    let mut cache: Option<Cache> = None;
    let parts = &plan.parts;
    let quantized = &plan.quantized;
    let files = plan.writer.write(dir, |t, out| {
        let part = parts
            .get(&t.name)
            .ok_or_else(|| anyhow!("internal: no source for {:?}", t.name))?;
        let f32_bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        match part {
            Part::Copy(src) if over.contains_key(&src.name) => {
                let x = read_values(src, over)?;
                out.write_all(&dtype_bytes(&x, src.dtype))?;
            }
            Part::Copy(src) => {
                write_tensor_bytes(src, out)?;
                src.release();
            }
            Part::QuantMap => out.write_all(&f32_bytes(&qt.table()))?,
            Part::NestedQuantMap => out.write_all(&f32_bytes(nf4::dynamic_map()))?,
            Part::Packed(m) => {
                let c = ensure_stats(
                    &mut cache,
                    &quantized[*m],
                    *m,
                    true,
                    qt,
                    offsets[*m],
                    over,
                    backend,
                )?;
                out.write_all(c.packed.as_ref().unwrap())?;
            }
            Part::Absmax(m) => {
                let c = ensure_stats(
                    &mut cache,
                    &quantized[*m],
                    *m,
                    false,
                    qt,
                    offsets[*m],
                    over,
                    backend,
                )?;
                match &c.nested {
                    Some(n) => out.write_all(&n.codes)?,
                    None => out.write_all(&f32_bytes(&c.absmax))?,
                }
            }
            Part::NestedAbsmax(m) => {
                let c = ensure_stats(
                    &mut cache,
                    &quantized[*m],
                    *m,
                    false,
                    qt,
                    offsets[*m],
                    over,
                    backend,
                )?;
                out.write_all(&f32_bytes(&c.nested.as_ref().unwrap().nested_absmax))?;
            }
            Part::QuantState(m) => out.write_all(infos[*m].to_json().as_bytes())?,
        }
        done += 1;
        progress(done, total, &t.name);
        Ok(())
    })?;
    let mut files = files;
    write_config(ck, plan, dir)?;
    files.push("config.json".into());
    for f in SIDE_FILES {
        if let Some(p) = ck.file(f) {
            std::fs::copy(&p, dir.path(f))
                .with_context(|| format!("{}: cannot copy", p.display()))?;
            files.push(f.to_string());
        }
    }
    let bytes_out = plan.writer.total_size();
    Ok(Bnb4Summary {
        files,
        bytes_out,
        quantized: plan.quantized.len(),
        copied: plan
            .parts
            .values()
            .filter(|p| matches!(p, Part::Copy(_)))
            .count(),
    })
}

/// `quantization_config` as transformers writes it (keys sorted).
pub fn quantization_config(plan: &Bnb4Plan) -> Value {
    let mut q = Map::new();
    q.insert("_load_in_4bit".into(), true.into());
    q.insert("_load_in_8bit".into(), false.into());
    q.insert(
        "bnb_4bit_compute_dtype".into(),
        plan.opts.compute_dtype.torch_name().into(),
    );
    q.insert("bnb_4bit_quant_storage".into(), "uint8".into());
    q.insert(
        "bnb_4bit_quant_type".into(),
        plan.opts.quant_type.name().into(),
    );
    q.insert(
        "bnb_4bit_use_double_quant".into(),
        plan.opts.double_quant.into(),
    );
    q.insert("llm_int8_enable_fp32_cpu_offload".into(), false.into());
    q.insert("llm_int8_has_fp16_weight".into(), false.into());
    q.insert(
        "llm_int8_skip_modules".into(),
        match &plan.skip_modules {
            None => Value::Null,
            Some(v) => v.clone().into(),
        },
    );
    q.insert(
        "llm_int8_threshold".into(),
        serde_json::Number::from_f64(6.0).unwrap().into(),
    );
    q.insert("load_in_4bit".into(), true.into());
    q.insert("load_in_8bit".into(), false.into());
    q.insert("quant_method".into(), "bitsandbytes".into());
    Value::Object(q)
}

fn write_config(ck: &HfCheckpoint, plan: &Bnb4Plan, dir: &AtomicDir) -> Result<()> {
    let mut cfg = ck.json.clone();
    cfg.remove("torch_dtype");
    cfg.insert("dtype".into(), plan.dtype.torch_name().into());
    cfg.insert("quantization_config".into(), quantization_config(plan));
    let text = python_json_dumps(&Value::Object(cfg), 2) + "\n";
    let p = dir.path("config.json");
    std::fs::write(&p, text).with_context(|| format!("{}: cannot write", p.display()))
}

/// `json.dumps(v, indent=indent, sort_keys=True)` as Python writes it (floats as `repr`,
/// non-ASCII escaped).
pub fn python_json_dumps(v: &Value, indent: usize) -> String {
    let mut s = String::new();
    dump(v, indent, 0, &mut s);
    s
}

fn dump(v: &Value, indent: usize, level: usize, s: &mut String) {
    let pad = |s: &mut String, l: usize| {
        s.push('\n');
        s.push_str(&" ".repeat(indent * l));
    };
    match v {
        Value::Null => s.push_str("null"),
        Value::Bool(b) => s.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if n.is_f64() {
                s.push_str(&nf4::python_float_repr(n.as_f64().unwrap()));
            } else {
                s.push_str(&n.to_string());
            }
        }
        Value::String(x) => dump_str(x, s),
        Value::Array(a) => {
            if a.is_empty() {
                s.push_str("[]");
                return;
            }
            s.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    s.push(',');
                }
                pad(s, level + 1);
                dump(x, indent, level + 1, s);
            }
            pad(s, level);
            s.push(']');
        }
        Value::Object(o) => {
            if o.is_empty() {
                s.push_str("{}");
                return;
            }
            let mut keys: Vec<&String> = o.keys().collect();
            keys.sort();
            s.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    s.push(',');
                }
                pad(s, level + 1);
                dump_str(k, s);
                s.push_str(": ");
                dump(&o[*k], indent, level + 1, s);
            }
            pad(s, level);
            s.push('}');
        }
    }
}

fn dump_str(x: &str, s: &mut String) {
    s.push('"');
    for c in x.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            '\r' => s.push_str("\\r"),
            '\t' => s.push_str("\\t"),
            '\u{08}' => s.push_str("\\b"),
            '\u{0c}' => s.push_str("\\f"),
            c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for u in c.encode_utf16(&mut buf) {
                    s.push_str(&format!("\\u{:04x}", u));
                }
            }
            c => s.push(c),
        }
    }
    s.push('"');
}

// ---------------------------------------------------------------------------------------------
// Reading

/// A 4-bit weight as stored: packed codes, absmax (plain or double-quantized), quant state.
#[derive(Debug)]
pub struct Bnb4Weight {
    pub info: QuantStateInfo,
    pub packed: TensorRef,
    absmax: AbsmaxSource,
    pub n: usize,
}

#[derive(Debug)]
enum AbsmaxSource {
    Plain(TensorRef),
    Nested {
        codes: TensorRef,
        nested_absmax: Vec<f32>,
        map: Vec<f32>,
        offset: f32,
    },
}

fn f32_vec(t: &TensorRef) -> Vec<f32> {
    t.bytes()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

impl Bnb4Weight {
    /// Dequantized values of elements `[first, first + out.len())`, rounded to the stored dtype
    /// (`dequantize_4bit` semantics), widened back to f32.
    pub fn read_f32(&self, first: usize, out: &mut [f32]) -> Result<()> {
        let bs = self.info.blocksize;
        let b0 = first / bs;
        let b1 = (first + out.len()).div_ceil(bs);
        let absmax: Vec<f32> = match &self.absmax {
            AbsmaxSource::Plain(t) => t.bytes()[b0 * 4..b1 * 4]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            AbsmaxSource::Nested {
                codes,
                nested_absmax,
                map,
                offset,
            } => {
                let q = &codes.bytes()[b0..b1];
                q.iter()
                    .enumerate()
                    .map(|(k, &c)| {
                        let v = map[c as usize] * nested_absmax[(b0 + k) / nf4::NESTED_BLOCKSIZE];
                        v + offset
                    })
                    .collect()
            }
        };
        let table = self.info.quant_type.table();
        let packed = self.packed.bytes();
        for (k, o) in out.iter_mut().enumerate() {
            let i = first + k;
            let byte = packed[i / 2];
            let code = if i & 1 == 0 { byte >> 4 } else { byte & 15 };
            *o = table[code as usize] * absmax[i / bs - b0];
        }
        self.info.dtype.round(out);
        Ok(())
    }

    pub fn release(&self) {
        self.packed.release();
    }
}

const QS_PREFIX: &str = ".quant_state.bitsandbytes__";

/// Replace each quantized weight's key group in `tensors` by one logical tensor (named after the
/// weight, with the stored dtype and shape) that dequantizes on read. `config` is config.json.
pub fn fold_quantized(dir: &Path, tensors: &mut Vec<TensorRef>) -> Result<usize> {
    let cfg = read_json_opt(&dir.join("config.json"))?.unwrap_or(Value::Null);
    let qc = cfg.get("quantization_config");
    if qc
        .and_then(|q| q.get("load_in_8bit"))
        .and_then(Value::as_bool)
        == Some(true)
    {
        bail!(
            "{}: an 8-bit bitsandbytes checkpoint (load_in_8bit); ftconv reads only 4-bit (NF4/FP4) ones",
            dir.display()
        );
    }
    let by_name: HashMap<String, TensorRef> = tensors
        .iter()
        .map(|t| (t.name.clone(), t.clone()))
        .collect();
    let mut remove = std::collections::HashSet::new();
    let mut folded: HashMap<String, TensorRef> = HashMap::new();
    for t in tensors.iter() {
        let Some(pos) = t.name.find(QS_PREFIX) else {
            continue;
        };
        let base = &t.name[..pos];
        let here = |what: &str| format!("{}: tensor {:?}: {what}", t.file.display(), t.name);
        let info = QuantStateInfo::parse(t.bytes()).map_err(|e| anyhow!(here(&e.to_string())))?;
        let get = |suffix: &str| -> Result<TensorRef> {
            let k = format!("{base}{suffix}");
            by_name.get(&k).cloned().ok_or_else(|| {
                anyhow!(
                    "{}: tensor {k:?} is missing (needed by {:?})",
                    dir.display(),
                    t.name
                )
            })
        };
        let n: usize = info.shape.iter().product();
        let bs = info.blocksize;
        let nb = n.div_ceil(bs);
        let packed = get("")?;
        let check = |r: &TensorRef, dt: Dtype, len: usize| -> Result<()> {
            let elems: usize = r.shape.iter().product();
            if r.dtype != dt || elems != len {
                bail!(
                    "{}: tensor {:?} is {:?} {:?}; the quant state {:?} (shape {:?}) implies {dt:?} with {len} elements",
                    r.file.display(),
                    r.name,
                    r.dtype,
                    r.shape,
                    t.name,
                    info.shape
                );
            }
            Ok(())
        };
        check(&packed, Dtype::U8, n.div_ceil(2))?;
        let qmap = get(".quant_map")?;
        check(&qmap, Dtype::F32, 16)?;
        let mut parts = vec![packed.name.clone(), qmap.name.clone(), t.name.clone()];
        let absmax_t = get(".absmax")?;
        parts.push(absmax_t.name.clone());
        let absmax = match info.nested_offset {
            None => {
                check(&absmax_t, Dtype::F32, nb)?;
                AbsmaxSource::Plain(absmax_t)
            }
            Some(offset) => {
                check(&absmax_t, Dtype::U8, nb)?;
                let na = get(".nested_absmax")?;
                check(&na, Dtype::F32, nb.div_ceil(nf4::NESTED_BLOCKSIZE))?;
                let nm = get(".nested_quant_map")?;
                check(&nm, Dtype::F32, 256)?;
                parts.push(na.name.clone());
                parts.push(nm.name.clone());
                AbsmaxSource::Nested {
                    codes: absmax_t,
                    nested_absmax: f32_vec(&na),
                    map: f32_vec(&nm),
                    offset,
                }
            }
        };
        let w = Bnb4Weight {
            info: info.clone(),
            packed: packed.clone(),
            absmax,
            n,
        };
        let logical = packed.with_bnb4(
            base.to_string(),
            info.dtype.safetensors(),
            info.shape.clone(),
            Arc::new(w),
        );
        folded.insert(packed.name.clone(), logical);
        remove.extend(parts);
    }
    let count = folded.len();
    let old = std::mem::take(tensors);
    for t in old {
        if let Some(l) = folded.remove(&t.name) {
            tensors.push(l);
        } else if !remove.contains(&t.name) {
            tensors.push(t);
        }
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skip_patterns_like_transformers() {
        assert!(matches_skip("lm_head", "lm_head").unwrap());
        assert!(matches_skip("model.layers.1.mlp.down_proj", "down_proj").unwrap());
        assert!(!matches_skip("model.layers.1.mlp.gate_proj", "mlp.gate").unwrap());
        assert!(matches_skip("model.layers.1.mlp.gate_proj", "model.layers.1").unwrap());
        assert!(!matches_skip("model.layers.11.mlp.gate_proj", "model.layers.1").unwrap());
        assert!(matches_skip("model.layers.11.mlp.gate_proj", r"model.layers.\d+.mlp").unwrap());
    }

    #[test]
    fn json_like_python() {
        let v: Value = serde_json::from_str(
            r#"{"b": 1e-05, "a": [1, 2.0], "c": {"z": null, "y": "é"}, "d": []}"#,
        )
        .unwrap();
        assert_eq!(
            python_json_dumps(&v, 2),
            "{\n  \"a\": [\n    1,\n    2.0\n  ],\n  \"b\": 1e-05,\n  \"c\": {\n    \"y\": \"\\u00e9\",\n    \"z\": null\n  },\n  \"d\": []\n}"
        );
    }
}
