//! Architecture descriptions: one JSON file per model family in `formats/arch/` (embedded at
//! build time by build.rs), parsed once into [`Architecture`]s. A description says, as data,
//! what convert_hf_to_gguf.py, gguf-py, llama-quantize and transformers know about a family:
//! its HF classes and their config defaults, the canonical hyperparameters in the family's
//! spellings, the tensor map with shapes and transforms, the GGUF metadata keys in the
//! converter's order, the tokenizer path and quirks, and the module order of its state dict.
//! Files whose name starts with `_` are fragments other descriptions include (`_text_model`:
//! the converter's generic `TextModel.set_gguf_parameters`). `formats/arch/README.md` documents
//! the format.

use super::expr::Expr;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::sync::OnceLock;

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/arch_descriptions.rs"));
}

/// One HF architecture class of a family.
#[derive(Clone, Debug)]
pub struct ClassDesc {
    pub name: String,
    /// Values transformers' config class fills in for keys absent from config.json.
    pub defaults: Map<String, Value>,
    /// Values the config class computes when a key is absent or null (expressions).
    pub derived: Vec<(String, Expr)>,
    /// Keys the converter removes from the hyperparameters before reading them (Granite's
    /// `head_dim`).
    pub drop: Vec<String>,
    /// Prefix of the text model's tensors (`model.language_model.` for a multimodal class);
    /// tensors outside it are not part of the text model.
    pub text_prefix: Option<String>,
}

/// A transform convert_hf_to_gguf.py applies to a tensor's values.
#[derive(Clone, Debug)]
pub enum Transform {
    /// llama's Q/K row permutation (`LlamaModel.permute`) with this many heads.
    Permute(Expr),
    /// A constant added in the source dtype (Gemma's norm `+ 1`).
    Add(f64),
    /// Keep rows `[0, n)` (Gemma 3's embedding cut to the tokenizer's vocabulary).
    TruncateRows(Expr),
}

/// One entry of the tensor map.
#[derive(Clone, Debug)]
pub struct TensorDesc {
    /// HF name without `.weight`/`.bias`; `{N}` is the block index, `{E}` an expert index.
    pub hf: String,
    /// GGUF name without suffix; `{N}` as in `hf`.
    pub gguf: String,
    /// Expected PyTorch shape of `.weight` (a bias has `[shape[0]]`).
    pub shape: Option<Vec<Expr>>,
    pub transforms: Vec<Transform>,
    /// Experts `{E}` = 0..n stacked into one 3-D tensor (as the converter stacks them).
    pub stack: Option<Expr>,
}

/// A GGUF value type for metadata entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetaType {
    U32,
    I32,
    U64,
    F32,
    F64,
    Bool,
    Str,
    U32Array,
    I32Array,
    F32Array,
    BoolArray,
    StrArray,
}

impl MetaType {
    const ALL: [(&'static str, MetaType); 12] = [
        ("u32", MetaType::U32),
        ("i32", MetaType::I32),
        ("u64", MetaType::U64),
        ("f32", MetaType::F32),
        ("f64", MetaType::F64),
        ("bool", MetaType::Bool),
        ("str", MetaType::Str),
        ("u32[]", MetaType::U32Array),
        ("i32[]", MetaType::I32Array),
        ("f32[]", MetaType::F32Array),
        ("bool[]", MetaType::BoolArray),
        ("str[]", MetaType::StrArray),
    ];
}

/// One step of the metadata list.
#[derive(Clone, Debug)]
pub enum MetaStep {
    /// A GGUF key (`{arch}.` is prefixed unless it starts with `general.`/`tokenizer.`).
    Key {
        key: String,
        ty: MetaType,
        value: Expr,
        when: Option<Expr>,
        optional: bool,
    },
}

/// How the vocabulary is written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VocabDesc {
    /// Vocabulary paths tried in order: `sentencepiece` (tokenizer.model), `llama_hf`
    /// (a SentencePiece-style BPE tokenizer.json), `gpt2` (tokenizer.json BPE).
    pub methods: Vec<String>,
    /// `tokenizer.ggml.add_space_prefix` from tokenizer_config.json's `add_prefix_space`
    /// (LlamaModel.set_vocab).
    #[serde(default)]
    pub add_prefix_space_from_config: bool,
    /// `tokenizer.ggml.add_space_prefix` written with this value after a SentencePiece vocab.
    #[serde(default)]
    pub sentencepiece_add_space_prefix: Option<bool>,
    /// `tokenizer.ggml.add_bos_token = false` when vocab_size is one of these.
    #[serde(default)]
    pub no_bos_for_vocab_sizes: Vec<u64>,
}

/// A generated tensor (written before the checkpoint's tensors).
#[derive(Clone, Debug)]
pub struct ExtraTensor {
    pub name: String,
    /// What computes it (`llama3_rope_freqs`).
    pub generator: String,
    pub when: Option<Expr>,
}

/// A parsed architecture description.
#[derive(Clone, Debug)]
pub struct Architecture {
    /// The description's file name (`llama`, `qwen3`).
    pub family: String,
    pub gguf_arch: String,
    pub classes: Vec<ClassDesc>,
    /// Canonical hyperparameters (`n_layer`, `n_embd`, …) in the family's spellings.
    pub config: Vec<(String, Expr)>,
    pub tensors: Vec<TensorDesc>,
    /// Name substrings the converter drops.
    pub skip: Vec<String>,
    pub extra_tensors: Vec<ExtraTensor>,
    pub metadata: Vec<MetaStep>,
    pub vocab: VocabDesc,
    /// Module names in definition order (the order of `state_dict()`).
    pub module_order: Vec<String>,
    /// What fine-tuning needs (the block shape); absent when finetune does not support it.
    pub train: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDesc {
    #[serde(default, rename = "_comment")]
    _comment: Option<Value>,
    gguf_arch: String,
    classes: Map<String, Value>,
    config: Map<String, Value>,
    tensors: Vec<RawTensor>,
    #[serde(default)]
    skip: Vec<String>,
    #[serde(default)]
    extra_tensors: Vec<RawExtra>,
    metadata: Vec<Value>,
    vocab: VocabDesc,
    #[serde(default)]
    module_order: Vec<String>,
    #[serde(default)]
    train: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTensor {
    hf: String,
    gguf: String,
    #[serde(default)]
    shape: Option<Vec<String>>,
    #[serde(default)]
    transforms: Vec<String>,
    #[serde(default)]
    stack: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExtra {
    name: String,
    generator: String,
    #[serde(default)]
    when: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClass {
    #[serde(default)]
    defaults: Map<String, Value>,
    #[serde(default)]
    derived: Map<String, Value>,
    #[serde(default)]
    text_prefix: Option<String>,
    #[serde(default)]
    drop: Vec<String>,
}

fn expr(s: &str, ctx: &str) -> Result<Expr, String> {
    Expr::parse(s).map_err(|e| format!("{ctx}: {e}"))
}

fn parse_transform(s: &str, ctx: &str) -> Result<Transform, String> {
    let (name, arg) = s
        .strip_suffix(')')
        .and_then(|s| s.split_once('('))
        .ok_or_else(|| format!("{ctx}: transform {s:?} is not NAME(ARG)"))?;
    Ok(match name {
        "permute" => Transform::Permute(expr(arg, ctx)?),
        "add" => Transform::Add(
            arg.trim()
                .parse()
                .map_err(|_| format!("{ctx}: add({arg}) needs a number"))?,
        ),
        "truncate_rows" => Transform::TruncateRows(expr(arg, ctx)?),
        _ => return Err(format!("{ctx}: unknown transform {name:?}")),
    })
}

fn parse_meta(
    v: &Value,
    fragments: &[(&str, &str)],
    out: &mut Vec<MetaStep>,
    ctx: &str,
) -> Result<(), String> {
    if let Some(s) = v.as_str() {
        let Some(name) = s.strip_prefix('@') else {
            return Err(format!(
                "{ctx}: metadata step {s:?} (a string must be @fragment)"
            ));
        };
        let (_, text) = fragments
            .iter()
            .find(|(n, _)| n.strip_prefix('_') == Some(name))
            .ok_or_else(|| format!("{ctx}: no fragment formats/arch/_{name}.json"))?;
        let steps: Vec<Value> = serde_json::from_str::<Map<String, Value>>(text)
            .map_err(|e| format!("_{name}.json: {e}"))?
            .get("metadata")
            .and_then(Value::as_array)
            .cloned()
            .ok_or_else(|| format!("_{name}.json: no metadata list"))?;
        for st in &steps {
            parse_meta(st, fragments, out, &format!("_{name}.json"))?;
        }
        return Ok(());
    }
    let o = v
        .as_object()
        .ok_or_else(|| format!("{ctx}: a metadata step is an object or \"@fragment\""))?;
    let key = o
        .get("key")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{ctx}: metadata step without \"key\""))?
        .to_string();
    let mut typed = None;
    for (k, val) in o {
        match k.as_str() {
            "key" | "when" | "optional" | "_comment" => {}
            _ => {
                let ty = MetaType::ALL
                    .iter()
                    .find(|(n, _)| n == k)
                    .map(|(_, t)| *t)
                    .ok_or_else(|| format!("{ctx}: key {key}: unknown field {k:?}"))?;
                let s = val.as_str().ok_or_else(|| {
                    format!("{ctx}: key {key}: the value is an expression string")
                })?;
                if typed.is_some() {
                    return Err(format!("{ctx}: key {key}: more than one type"));
                }
                typed = Some((ty, expr(s, &format!("{ctx}: key {key}"))?));
            }
        }
    }
    let (ty, value) =
        typed.ok_or_else(|| format!("{ctx}: key {key}: no typed value (u32, f32, str, …)"))?;
    let when = match o.get("when").and_then(Value::as_str) {
        Some(w) => Some(expr(w, &format!("{ctx}: key {key}"))?),
        None => None,
    };
    out.push(MetaStep::Key {
        key,
        ty,
        value,
        when,
        optional: o.get("optional").and_then(Value::as_bool).unwrap_or(false),
    });
    Ok(())
}

impl Architecture {
    fn parse(family: &str, text: &str, fragments: &[(&str, &str)]) -> Result<Architecture, String> {
        let ctx = format!("formats/arch/{family}.json");
        let raw: RawDesc = serde_json::from_str(text).map_err(|e| format!("{ctx}: {e}"))?;
        let mut classes = vec![];
        for (name, c) in raw.classes {
            let rc: RawClass =
                serde_json::from_value(c).map_err(|e| format!("{ctx}: class {name}: {e}"))?;
            let mut derived = vec![];
            for (k, v) in rc.derived {
                let s = v.as_str().ok_or_else(|| {
                    format!("{ctx}: class {name}: derived {k} is not an expression")
                })?;
                derived.push((k.clone(), expr(s, &format!("{ctx}: class {name}: {k}"))?));
            }
            classes.push(ClassDesc {
                name,
                defaults: rc.defaults,
                derived,
                text_prefix: rc.text_prefix,
                drop: rc.drop,
            });
        }
        let mut config = vec![];
        for (k, v) in raw.config {
            if k.starts_with('_') {
                continue;
            }
            let s = v
                .as_str()
                .ok_or_else(|| format!("{ctx}: config.{k} is not an expression"))?;
            config.push((k.clone(), expr(s, &format!("{ctx}: config.{k}"))?));
        }
        let mut tensors = vec![];
        for t in raw.tensors {
            let tctx = format!("{ctx}: tensor {}", t.hf);
            let shape = match &t.shape {
                Some(s) => Some(
                    s.iter()
                        .map(|d| expr(d, &tctx))
                        .collect::<Result<Vec<_>, _>>()?,
                ),
                None => None,
            };
            let transforms = t
                .transforms
                .iter()
                .map(|s| parse_transform(s, &tctx))
                .collect::<Result<Vec<_>, _>>()?;
            let stack = match &t.stack {
                Some(s) => Some(expr(s, &tctx)?),
                None => None,
            };
            if t.hf.contains("{E}") != stack.is_some() {
                return Err(format!("{tctx}: {{E}} and \"stack\" go together"));
            }
            tensors.push(TensorDesc {
                hf: t.hf,
                gguf: t.gguf,
                shape,
                transforms,
                stack,
            });
        }
        let extra_tensors = raw
            .extra_tensors
            .into_iter()
            .map(|e| {
                Ok(ExtraTensor {
                    when: match &e.when {
                        Some(w) => Some(expr(w, &ctx)?),
                        None => None,
                    },
                    name: e.name,
                    generator: e.generator,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let mut metadata = vec![];
        for m in &raw.metadata {
            parse_meta(m, fragments, &mut metadata, &ctx)?;
        }
        for m in &raw.vocab.methods {
            if !["sentencepiece", "llama_hf", "gpt2"].contains(&m.as_str()) {
                return Err(format!("{ctx}: unknown vocab method {m:?}"));
            }
        }
        Ok(Architecture {
            family: family.to_string(),
            gguf_arch: raw.gguf_arch,
            classes,
            config,
            tensors,
            skip: raw.skip,
            extra_tensors,
            metadata,
            vocab: raw.vocab,
            module_order: raw.module_order,
            train: raw.train,
        })
    }

    pub fn class(&self, name: &str) -> Option<&ClassDesc> {
        self.classes.iter().find(|c| c.name == name)
    }
}

/// Every description, parsed once.
pub fn all() -> &'static [Architecture] {
    static T: OnceLock<Vec<Architecture>> = OnceLock::new();
    T.get_or_init(|| {
        let (fragments, families): (Vec<_>, Vec<_>) = embedded::DESCRIPTIONS
            .iter()
            .copied()
            .partition(|(n, _)| n.starts_with('_'));
        families
            .iter()
            .map(|(n, text)| {
                // a broken description is a bug in the build, caught by the unit tests
                Architecture::parse(n, text, &fragments).unwrap_or_else(|e| panic!("{e}"))
            })
            .collect()
    })
}

/// The description of an HF architecture class.
pub fn for_class(class: &str) -> Option<(&'static Architecture, &'static ClassDesc)> {
    all().iter().find_map(|a| a.class(class).map(|c| (a, c)))
}

/// Every supported HF class, in description order.
pub fn supported_classes() -> Vec<&'static str> {
    all()
        .iter()
        .flat_map(|a| a.classes.iter().map(|c| c.name.as_str()))
        .collect()
}

/// Parse every description, returning the first error (for the unit tests).
pub fn check_all() -> Result<usize, String> {
    let (fragments, families): (Vec<_>, Vec<_>) = embedded::DESCRIPTIONS
        .iter()
        .copied()
        .partition(|(n, _)| n.starts_with('_'));
    let mut seen = std::collections::HashSet::new();
    for (n, text) in &families {
        let a = Architecture::parse(n, text, &fragments)?;
        for c in &a.classes {
            if !seen.insert(c.name.clone()) {
                return Err(format!("class {} is described twice", c.name));
            }
        }
    }
    Ok(families.len())
}
