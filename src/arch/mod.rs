//! Model families as the reference tools see them. Each family is one description in
//! `formats/arch/` (desc.rs: HF classes and config defaults, canonical hyperparameters, the
//! tensor map with shapes and transforms, GGUF metadata in the converter's order, tokenizer
//! path and quirks, state-dict module order); this module applies a description the way
//! convert_hf_to_gguf.py does: which tensors it writes and how (`converted_tensors`), and the
//! metadata (`model_metadata`, vocab.rs for the tokenizer keys).

pub mod config;
pub mod desc;
pub mod expr;
pub mod vocab;

pub use config::{ConfigError, ModelConfig, Rope};
pub use desc::{Architecture, TensorDesc, Transform};

use crate::checkpoint::{HfCheckpoint, TensorRef};
use crate::gguf::{Array, Metadata, Value};
use crate::quant::GgmlType;
use anyhow::{Result, anyhow, bail};
use serde_json::Value as J;
use std::collections::HashMap;

/// A tensor name matched against a tensor-map pattern: the entry and its `{N}`/`{E}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapped {
    /// Index of the entry in `Architecture::tensors`.
    pub entry: usize,
    /// GGUF name with suffix (`blk.3.attn_q.weight`).
    pub gguf: String,
    pub block: Option<usize>,
    pub expert: Option<usize>,
    /// `weight`, `bias`, or None for a bare parameter.
    pub suffix: Option<String>,
}

/// Match `name` against a pattern with `{N}`/`{E}` placeholders (each a run of digits).
fn match_pattern(pattern: &str, name: &str) -> Option<(Option<usize>, Option<usize>)> {
    let mut rest = name;
    let mut pat = pattern;
    let (mut n, mut e) = (None, None);
    loop {
        let next = [pat.find("{N}"), pat.find("{E}")]
            .into_iter()
            .flatten()
            .min();
        let Some(i) = next else {
            return (rest == pat).then_some((n, e));
        };
        let lit = &pat[..i];
        rest = rest.strip_prefix(lit)?;
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || (digits > 1 && rest.starts_with('0')) {
            return None;
        }
        let v: usize = rest[..digits].parse().ok()?;
        if &pat[i..i + 3] == "{N}" {
            n = Some(v);
        } else {
            e = Some(v);
        }
        rest = &rest[digits..];
        pat = &pat[i + 3..];
    }
}

impl Architecture {
    /// The GGUF name of an HF tensor (`.weight`/`.bias` kept), or None when the tensor map has
    /// no entry for it (or its block index is not below `n_layer`).
    pub fn map_tensor_name(&self, hf: &str, n_layer: usize) -> Option<Mapped> {
        let (base, suffix) = match hf.rsplit_once('.') {
            Some((b, s)) if s == "weight" || s == "bias" => (b, Some(s.to_string())),
            _ => (hf, None),
        };
        for (i, t) in self.tensors.iter().enumerate() {
            if let Some((n, e)) = match_pattern(&t.hf, base) {
                if n.is_some_and(|n| n >= n_layer) {
                    return None;
                }
                let mut g = t.gguf.clone();
                if let Some(n) = n {
                    g = g.replace("{N}", &n.to_string());
                }
                if let Some(s) = &suffix {
                    g = format!("{g}.{s}");
                }
                return Some(Mapped {
                    entry: i,
                    gguf: g,
                    block: n,
                    expert: e,
                    suffix,
                });
            }
        }
        None
    }

    /// The HF name (without `{E}` expansion) a GGUF name comes from: the inverse of
    /// `map_tensor_name` for the tensors the map covers.
    pub fn unmap_tensor_name(&self, gguf: &str) -> Option<String> {
        let (base, suffix) = match gguf.rsplit_once('.') {
            Some((b, s)) if s == "weight" || s == "bias" => (b, Some(s)),
            _ => (gguf, None),
        };
        for t in &self.tensors {
            if let Some((n, _)) = match_pattern(&t.gguf, base) {
                let mut h = t.hf.clone();
                if let Some(n) = n {
                    h = h.replace("{N}", &n.to_string());
                }
                return Some(match suffix {
                    Some(s) => format!("{h}.{s}"),
                    None => h,
                });
            }
        }
        None
    }

    /// Whether the converter drops this tensor.
    pub fn skips(&self, name: &str) -> bool {
        name.ends_with(".attention.masked_bias")
            || name.ends_with(".attention.bias")
            || name.ends_with(".rotary_emb.inv_freq")
            || self.skip.iter().any(|s| name.contains(s.as_str()))
    }
}

/// Source row for output row `r` of the llama Q/K permutation with `heads` heads over `rows`
/// rows: within each head the two rotate-half halves are interleaved into pairs.
#[inline]
pub fn permuted_source_row(r: usize, rows: usize, heads: usize) -> usize {
    let hd = rows / heads;
    let h = r / hd;
    let w = r % hd;
    h * hd + (w % 2) * (hd / 2) + w / 2
}

/// A transform with its parameters evaluated for one tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum Applied {
    /// Q/K permutation with this many heads.
    Permute(usize),
    /// Add a constant in the source dtype.
    Add(f64),
    /// Keep the first rows.
    TruncateRows(usize),
}

/// How one converted tensor is produced from the checkpoint.
#[derive(Clone, Debug)]
pub struct ConvertedTensor {
    /// GGUF name.
    pub name: String,
    /// PyTorch-order shape (after transforms and stacking).
    pub shape: Vec<usize>,
    pub source: ConvertedSource,
    pub transforms: Vec<Applied>,
    /// The type convert_hf_to_gguf.py stores it as (F32 for 1-D/norms/biases, else the outtype).
    pub stored: GgmlType,
}

impl ConvertedTensor {
    /// Heads of the Q/K permutation, if any.
    pub fn permute_heads(&self) -> Option<usize> {
        self.transforms.iter().find_map(|t| match t {
            Applied::Permute(h) => Some(*h),
            _ => None,
        })
    }
}

#[derive(Clone, Debug)]
pub enum ConvertedSource {
    Tensor(TensorRef),
    /// Experts stacked along a new first axis, in expert order.
    Stacked(Vec<TensorRef>),
    /// Values generated by the converter (llama3 rope_freqs).
    Generated(Vec<f32>),
}

/// The GGUF outtype convert_hf_to_gguf.py picks with `--outtype auto`: BF16 if the first
/// tensor of ≥ 2 dims is bf16, F16 if it is f16, F16 otherwise.
pub fn auto_outtype(ck: &HfCheckpoint) -> GgmlType {
    for t in ck.converter_order() {
        if t.shape.len() < 2 {
            continue;
        }
        return match t.dtype {
            safetensors::Dtype::BF16 => GgmlType::BF16,
            _ => GgmlType::F16,
        };
    }
    GgmlType::F16
}

fn eval_usize(cfg: &ModelConfig, e: &expr::Expr, what: &str) -> Result<usize> {
    let mut missing = vec![];
    let v = cfg.eval(e, &[], &mut missing);
    v.as_u64()
        .map(|x| x as usize)
        .ok_or_else(|| match missing.first() {
            Some(k) => anyhow!(
                "{}: key {k:?} is missing (needed by {} for {what})",
                cfg.path.display(),
                cfg.class.name
            ),
            None => anyhow!(
                "{}: {what} evaluates to {v}, not a size ({})",
                cfg.path.display(),
                cfg.class.name
            ),
        })
}

/// The expected shape of a mapped tensor (None when the description gives none).
pub fn expected_shape(cfg: &ModelConfig, m: &Mapped) -> Result<Option<Vec<usize>>> {
    let t = &cfg.arch.tensors[m.entry];
    let Some(shape) = &t.shape else {
        return Ok(None);
    };
    let mut s = shape
        .iter()
        .map(|d| eval_usize(cfg, d, &format!("the shape of {}", t.hf)))
        .collect::<Result<Vec<_>>>()?;
    if m.suffix.as_deref() == Some("bias") {
        s.truncate(1);
    }
    Ok(Some(s))
}

/// The transforms of a mapped tensor with their parameters.
pub fn applied_transforms(cfg: &ModelConfig, m: &Mapped) -> Result<Vec<Applied>> {
    let t = &cfg.arch.tensors[m.entry];
    t.transforms
        .iter()
        .map(|tr| {
            Ok(match tr {
                Transform::Permute(e) => Applied::Permute(eval_usize(cfg, e, "a Q/K permutation")?),
                Transform::Add(c) => Applied::Add(*c),
                Transform::TruncateRows(e) => {
                    Applied::TruncateRows(eval_usize(cfg, e, "a row count")?)
                }
            })
        })
        .collect()
}

fn check_shape(cfg: &ModelConfig, m: &Mapped, t: &TensorRef) -> Result<()> {
    if let Some(e) = expected_shape(cfg, m)?
        && t.shape != e
    {
        bail!(
            "{}: tensor {:?} has shape {:?} but config.json implies {:?}",
            t.file.display(),
            t.name,
            t.shape,
            e
        );
    }
    Ok(())
}

fn stored_type(name: &str, n_dims: usize, outtype: GgmlType) -> GgmlType {
    if n_dims <= 1 || name.ends_with("_norm.weight") || !name.ends_with(".weight") {
        GgmlType::F32
    } else {
        outtype
    }
}

/// Experts of one stacked tensor: (tensor-map entry, block, suffix).
type ExpertSlot = (usize, Option<usize>, Option<String>);

/// Every tensor the converter writes, in the converter's order.
pub fn converted_tensors(ck: &HfCheckpoint, outtype: GgmlType) -> Result<Vec<ConvertedTensor>> {
    let cfg = ck.config()?;
    let arch = cfg.arch;
    let mut out = Vec::new();
    for x in &arch.extra_tensors {
        if let Some(w) = &x.when
            && !expr::truthy(&cfg.eval(w, &[], &mut vec![]))
        {
            continue;
        }
        let v = generate(cfg, &x.generator)?;
        out.push(ConvertedTensor {
            name: x.name.clone(),
            shape: vec![v.len()],
            source: ConvertedSource::Generated(v),
            transforms: vec![],
            stored: GgmlType::F32,
        });
    }
    // experts waiting for the rest of their layer: (entry, block, suffix) → experts
    let mut pending: HashMap<ExpertSlot, Vec<Option<TensorRef>>> = Default::default();
    for t in ck.converter_order() {
        if arch.skips(&t.name) {
            continue;
        }
        let Some(m) = arch.map_tensor_name(&ck.text_name(&t.name), cfg.num_hidden_layers) else {
            if ck.outside_text_model(&t.name) {
                continue;
            }
            bail!(
                "{}: cannot map tensor {:?} to a GGUF name for {}",
                t.file.display(),
                t.name,
                cfg.class.name
            );
        };
        if !t.is_float() {
            bail!(
                "{}: tensor {:?} has dtype {:?}; only F32, F16 and BF16 checkpoints can be converted",
                t.file.display(),
                t.name,
                t.dtype
            );
        }
        check_shape(cfg, &m, t)?;
        let transforms = applied_transforms(cfg, &m)?;
        for tr in &transforms {
            if let Applied::Permute(h) = tr {
                let rows = t.shape[0];
                if rows % (2 * h) != 0 {
                    bail!(
                        "{}: tensor {:?} has {rows} rows, not divisible into {h} heads of pairs",
                        t.file.display(),
                        t.name
                    );
                }
            }
        }
        let mut shape = t.shape.clone();
        for tr in &transforms {
            if let Applied::TruncateRows(n) = tr {
                shape[0] = (*n).min(shape[0]);
            }
        }
        let desc = &arch.tensors[m.entry];
        if let (Some(stack), Some(e)) = (&desc.stack, m.expert) {
            let n_expert = eval_usize(cfg, stack, "the expert count")?;
            if e >= n_expert {
                bail!(
                    "{}: tensor {:?} is expert {e}, but the config has {n_expert} experts",
                    t.file.display(),
                    t.name
                );
            }
            let slot = pending
                .entry((m.entry, m.block, m.suffix.clone()))
                .or_insert_with(|| vec![None; n_expert]);
            slot[e] = Some(t.clone());
            if slot.iter().all(Option::is_some) {
                let parts: Vec<TensorRef> = pending
                    .remove(&(m.entry, m.block, m.suffix.clone()))
                    .unwrap()
                    .into_iter()
                    .flatten()
                    .collect();
                let mut shape = vec![n_expert];
                shape.extend_from_slice(&t.shape);
                out.push(ConvertedTensor {
                    stored: stored_type(&m.gguf, shape.len(), outtype),
                    name: m.gguf,
                    shape,
                    source: ConvertedSource::Stacked(parts),
                    transforms,
                });
            }
            continue;
        }
        out.push(ConvertedTensor {
            stored: stored_type(&m.gguf, t.shape.len(), outtype),
            name: m.gguf,
            shape,
            source: ConvertedSource::Tensor(t.clone()),
            transforms,
        });
    }
    if let Some(((entry, block, _), v)) = pending.into_iter().next() {
        let missing = v.iter().position(Option::is_none).unwrap_or(0);
        bail!(
            "{}: expert {missing} of {} (block {}) is missing",
            ck.dir.display(),
            arch.tensors[entry].hf,
            block.map(|b| b.to_string()).unwrap_or_default()
        );
    }
    Ok(out)
}

/// A generated tensor by the description's generator name.
fn generate(cfg: &ModelConfig, generator: &str) -> Result<Vec<f32>> {
    match generator {
        "llama3_rope_freqs" => Ok(llama3_rope_freqs(cfg)),
        other => bail!(
            "internal: formats/arch/{}.json names an unknown generator {other:?}",
            cfg.arch.family
        ),
    }
}

/// llama3 RoPE frequency factors (LlamaModel.generate_extra_tensors), computed in f32 like
/// the converter's torch code.
pub fn llama3_rope_freqs(cfg: &ModelConfig) -> Vec<f32> {
    let base = cfg.rope.theta.unwrap_or(10000.0) as f32;
    let dim = cfg.head_dim;
    let factor = cfg.rope.get_f64("factor").unwrap_or(8.0);
    let low = cfg.rope.get_f64("low_freq_factor").unwrap_or(1.0);
    let high = cfg.rope.get_f64("high_freq_factor").unwrap_or(4.0);
    let old_ctx = cfg
        .rope
        .get_f64("original_max_position_embeddings")
        .unwrap_or(8192.0);
    let low_wavelen = old_ctx / low;
    let high_wavelen = old_ctx / high;
    let mut out = Vec::with_capacity(dim / 2);
    for k in (0..dim).step_by(2) {
        let e = k as f32 / dim as f32;
        let freq = 1.0f32 / (base.powf(e));
        let wavelen = (2.0 * std::f64::consts::PI) as f32 / freq;
        let w = wavelen as f64;
        let v = if w < high_wavelen {
            1.0f32
        } else if w > low_wavelen {
            factor as f32
        } else {
            let smooth = ((old_ctx as f32 / wavelen) - low as f32) / (high as f32 - low as f32);
            1.0f32 / ((1.0f32 - smooth) / factor as f32 + smooth)
        };
        out.push(v);
    }
    out
}

/// A description's metadata value as a GGUF value of its declared type.
fn meta_value(v: &J, ty: desc::MetaType) -> Option<Value> {
    use desc::MetaType as M;
    let arr = || v.as_array();
    Some(match ty {
        M::U32 => Value::U32(u32::try_from(v.as_u64()?).ok()?),
        M::I32 => Value::I32(i32::try_from(v.as_i64()?).ok()?),
        M::U64 => Value::U64(v.as_u64()?),
        M::F32 => Value::F32(v.as_f64()? as f32),
        M::F64 => Value::F64(v.as_f64()?),
        M::Bool => Value::Bool(v.as_bool()?),
        M::Str => Value::Str(v.as_str()?.to_string()),
        M::U32Array => Value::Array(Array::U32(
            arr()?
                .iter()
                .map(|x| x.as_u64().and_then(|u| u32::try_from(u).ok()))
                .collect::<Option<_>>()?,
        )),
        M::I32Array => Value::Array(Array::I32(
            arr()?
                .iter()
                .map(|x| x.as_i64().and_then(|u| i32::try_from(u).ok()))
                .collect::<Option<_>>()?,
        )),
        M::F32Array => Value::Array(Array::F32(
            arr()?
                .iter()
                .map(|x| x.as_f64().map(|f| f as f32))
                .collect::<Option<_>>()?,
        )),
        M::BoolArray => Value::Array(Array::Bool(
            arr()?.iter().map(J::as_bool).collect::<Option<_>>()?,
        )),
        M::StrArray => Value::Array(Array::Str(
            arr()?
                .iter()
                .map(|x| x.as_str().map(str::to_string))
                .collect::<Option<_>>()?,
        )),
    })
}

/// The description's metadata steps for `cfg` (the converter's `set_gguf_parameters`).
pub fn architecture_metadata(
    cfg: &ModelConfig,
    outtype: GgmlType,
    md: &mut Metadata,
) -> Result<()> {
    let arch = cfg.arch.gguf_arch.as_str();
    let extra = [("file_type", J::from(ftype_of_outtype(outtype)))];
    for step in &cfg.arch.metadata {
        let desc::MetaStep::Key {
            key,
            ty,
            value,
            when,
            optional,
        } = step;
        if let Some(w) = when
            && !expr::truthy(&cfg.eval(w, &extra, &mut vec![]))
        {
            continue;
        }
        let mut missing = vec![];
        let v = cfg.eval(value, &extra, &mut missing);
        let full = if key.starts_with("general.") || key.starts_with("tokenizer.") {
            key.clone()
        } else {
            format!("{arch}.{key}")
        };
        if v.is_null() {
            if *optional {
                continue;
            }
            match missing.first() {
                Some(k) => bail!(
                    "{}: key {k:?} is missing (needed by {} for the GGUF key {full})",
                    cfg.path.display(),
                    cfg.class.name
                ),
                None => bail!(
                    "{}: the GGUF key {full} has no value for this config ({})",
                    cfg.path.display(),
                    cfg.class.name
                ),
            }
        }
        let gv = meta_value(&v, *ty).ok_or_else(|| {
            anyhow!(
                "{}: the GGUF key {full} must be a {ty:?}, but the config gives {v}",
                cfg.path.display()
            )
        })?;
        md.set(&full, gv);
    }
    Ok(())
}

/// The model keys convert_hf_to_gguf.py writes (through general.quantization_version),
/// then the tokenizer keys. `file_type` is the converter's outtype ftype.
pub fn model_metadata(ck: &HfCheckpoint, outtype: GgmlType, n_params: u64) -> Result<Metadata> {
    let cfg = ck.config()?;
    let mut md = Metadata::new();
    md.set(
        "general.architecture",
        Value::Str(cfg.arch.gguf_arch.clone()),
    );
    md.set("general.type", Value::Str("model".into()));
    if let Some(gc) = ck.read_json("generation_config.json")? {
        sampling_metadata(&gc, &mut md);
    }
    md.set("general.name", Value::Str(ck.name()));
    md.set("general.size_label", Value::Str(size_label(n_params)));
    architecture_metadata(cfg, outtype, &mut md)?;
    md.set("general.quantization_version", Value::U32(2));
    vocab::add_tokenizer_metadata(ck, &mut md)?;
    Ok(md)
}

fn ftype_of_outtype(t: GgmlType) -> u32 {
    match t {
        GgmlType::F32 => 0,
        GgmlType::BF16 => 32,
        _ => 1,
    }
}

fn sampling_metadata(gc: &J, md: &mut Metadata) {
    let f = |k: &str| gc.get(k).and_then(J::as_f64);
    let i = |k: &str| gc.get(k).and_then(J::as_i64);
    if let Some(s) = gc.get("sequence").and_then(J::as_str)
        && !s.is_empty()
    {
        md.set("general.sampling.sequence", Value::Str(s.into()));
    }
    if let Some(v) = i("top_k") {
        md.set("general.sampling.top_k", Value::I32(v as i32));
    }
    if let Some(v) = f("top_p") {
        md.set("general.sampling.top_p", Value::F32(v as f32));
    }
    if let Some(v) = f("min_p") {
        md.set("general.sampling.min_p", Value::F32(v as f32));
    }
    if let Some(v) = f("xtc_probability") {
        md.set("general.sampling.xtc_probability", Value::F32(v as f32));
    }
    if let Some(v) = f("xtc_threshold") {
        md.set("general.sampling.xtc_threshold", Value::F32(v as f32));
    }
    if let Some(v) = f("temperature") {
        md.set("general.sampling.temp", Value::F32(v as f32));
    }
    if let Some(v) = i("penalty_last_n") {
        md.set("general.sampling.penalty_last_n", Value::I32(v as i32));
    }
    if let Some(v) = f("penalty_repeat").or_else(|| f("repetition_penalty")) {
        md.set("general.sampling.penalty_repeat", Value::F32(v as f32));
    }
    if let Some(v) = i("mirostat") {
        md.set("general.sampling.mirostat", Value::I32(v as i32));
    }
    if let Some(v) = f("mirostat_tau") {
        md.set("general.sampling.mirostat_tau", Value::F32(v as f32));
    }
    if let Some(v) = f("mirostat_eta") {
        md.set("general.sampling.mirostat_eta", Value::F32(v as f32));
    }
}

/// gguf-py's `size_label` (`model_weight_count_rounded_notation`, 2 significant digits).
pub fn size_label(n: u64) -> String {
    let n = n as f64;
    let (scaled, suffix) = if n > 1e12 {
        (n * 1e-12, "T")
    } else if n > 1e9 {
        (n * 1e-9, "B")
    } else if n > 1e6 {
        (n * 1e-6, "M")
    } else {
        (n * 1e-3, "K")
    };
    let rounded = scaled.round() as u64;
    let digits = rounded.to_string().trim_start_matches('0').len();
    let fix = 2usize.saturating_sub(digits);
    format!("{scaled:.fix$}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama() -> &'static Architecture {
        desc::for_class("LlamaForCausalLM").unwrap().0
    }

    fn name(hf: &str, n_layer: usize) -> Option<String> {
        llama().map_tensor_name(hf, n_layer).map(|m| m.gguf)
    }

    #[test]
    fn names() {
        assert_eq!(
            name("model.embed_tokens.weight", 2).as_deref(),
            Some("token_embd.weight")
        );
        assert_eq!(
            name("model.layers.1.self_attn.q_proj.bias", 2).as_deref(),
            Some("blk.1.attn_q.bias")
        );
        assert_eq!(
            name("model.layers.10.mlp.down_proj.weight", 11).as_deref(),
            Some("blk.10.ffn_down.weight")
        );
        assert_eq!(name("model.layers.2.mlp.down_proj.weight", 2), None);
        assert_eq!(name("model.layers.x.mlp.down_proj.weight", 2), None);
        assert_eq!(name("model.layers.01.mlp.down_proj.weight", 2), None);
        assert_eq!(name("vision.foo.weight", 2), None);
    }

    #[test]
    fn every_description_loads() {
        let n = desc::check_all().unwrap();
        assert!(n >= 2);
        assert!(desc::supported_classes().contains(&"LlamaForCausalLM"));
    }

    #[test]
    fn every_tensor_name_maps_and_maps_back() {
        for a in desc::all() {
            for t in &a.tensors {
                for suffix in ["weight", "bias"] {
                    let hf = format!("{}.{suffix}", t.hf.replace("{N}", "3").replace("{E}", "1"));
                    let m = a
                        .map_tensor_name(&hf, 4)
                        .unwrap_or_else(|| panic!("{}: {hf} does not map", a.family));
                    assert_eq!(
                        &a.tensors[m.entry].hf, &t.hf,
                        "{}: {hf} maps to another entry",
                        a.family
                    );
                    let back = a.unmap_tensor_name(&m.gguf).unwrap();
                    assert_eq!(
                        back,
                        format!("{}.{suffix}", t.hf.replace("{N}", "3")),
                        "{}: {} maps back elsewhere",
                        a.family,
                        m.gguf
                    );
                }
            }
            // GGUF names are unique per entry
            let mut seen = std::collections::HashSet::new();
            for t in &a.tensors {
                assert!(seen.insert(&t.gguf), "{}: {} used twice", a.family, t.gguf);
            }
        }
    }

    #[test]
    fn patterns_with_experts() {
        assert_eq!(
            match_pattern(
                "model.layers.{N}.mlp.experts.{E}.w1",
                "model.layers.3.mlp.experts.12.w1"
            ),
            Some((Some(3), Some(12)))
        );
        assert_eq!(
            match_pattern(
                "model.layers.{N}.mlp.experts.{E}.w1",
                "model.layers.3.mlp.experts.w1"
            ),
            None
        );
        assert_eq!(match_pattern("lm_head", "lm_head"), Some((None, None)));
    }

    #[test]
    fn permutation_interleaves_halves() {
        // one head of 8 rows: out rows take in rows 0,4,1,5,2,6,3,7
        let src: Vec<usize> = (0..8).map(|r| permuted_source_row(r, 8, 1)).collect();
        assert_eq!(src, vec![0, 4, 1, 5, 2, 6, 3, 7]);
        let src: Vec<usize> = (0..8).map(|r| permuted_source_row(r, 8, 2)).collect();
        assert_eq!(src, vec![0, 2, 1, 3, 4, 6, 5, 7]);
    }

    #[test]
    fn size_labels() {
        assert_eq!(size_label(134_515_008), "135M");
        assert_eq!(size_label(1_170_000_000), "1.2B");
        assert_eq!(size_label(62_000_000), "62M");
        assert_eq!(size_label(7_240_000_000), "7.2B");
    }
}
