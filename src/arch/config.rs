//! `config.json` resolved as the reference tools see it: the converter reads
//! `AutoConfig.from_pretrained(dir).to_dict()` — every field the config class defines, with
//! transformers' defaults and the values its `__init__` computes — with `text_config` moved
//! to the top level and RoPE settings mirrored into `rope_parameters`. The class defaults come
//! from the architecture description; the canonical hyperparameters (`n_layer`, `n_embd`, …)
//! are the description's expressions over this view.

use super::desc::{self, Architecture, ClassDesc};
use super::expr::Expr;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Why a config.json cannot be used for a family-aware command.
#[derive(Clone, Debug, Error, PartialEq)]
pub enum ConfigError {
    #[error("{path}: config.json is missing (not a Hugging Face model folder?)")]
    Missing { path: PathBuf },
    #[error("{path}: cannot read: {why}")]
    Unreadable { path: PathBuf, why: String },
    #[error("{path}: not valid JSON: {why}")]
    NotJson { path: PathBuf, why: String },
    #[error("{path}: expected a JSON object")]
    NotObject { path: PathBuf },
    #[error("{path}: key \"architectures\" is missing or empty")]
    NoArchitecture { path: PathBuf },
    #[error("{path}: architecture {class:?} is not supported (supported: {supported})")]
    Unsupported {
        path: PathBuf,
        class: String,
        supported: String,
    },
    #[error("{path}: key {key:?} is missing (needed by {class})")]
    MissingKey {
        path: PathBuf,
        key: String,
        class: String,
    },
    #[error("{path}: key {key:?} {why}")]
    BadValue {
        path: PathBuf,
        key: String,
        why: String,
    },
    #[error("{path}: {why}")]
    Inconsistent { path: PathBuf, why: String },
}

/// RoPE settings of the full-attention layers in the transformers-5 `rope_parameters` form.
#[derive(Clone, Debug, Default)]
pub struct Rope {
    pub theta: Option<f64>,
    pub rope_type: Option<String>,
    pub params: Map<String, Value>,
}

impl Rope {
    pub fn get_f64(&self, k: &str) -> Option<f64> {
        self.params.get(k).and_then(Value::as_f64)
    }
}

/// A parsed config.json of a described family.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub path: PathBuf,
    /// The resolved hyperparameters (see the module doc).
    pub raw: Map<String, Value>,
    pub arch: &'static Architecture,
    pub class: &'static ClassDesc,
    /// The canonical hyperparameters, by name.
    pub canonical: Map<String, Value>,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub intermediate_size: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: Option<u64>,
    pub vocab_size: usize,
    /// `tie_word_embeddings` as the config says (see `HfCheckpoint::tied` for the rule
    /// every command applies).
    pub tie_word_embeddings: Option<bool>,
    /// Experts per MoE layer (0 for a dense model).
    pub n_expert: usize,
    pub rope: Rope,
}

/// The class name config.json declares (`architectures[0]`).
pub fn class_of(path: &Path, raw: &Map<String, Value>) -> Result<String, ConfigError> {
    raw.get("architectures")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| ConfigError::NoArchitecture {
            path: path.to_path_buf(),
        })
}

/// Read config.json as a JSON object.
pub fn read_config_json(dir: &Path) -> Result<Map<String, Value>, ConfigError> {
    let path = dir.join("config.json");
    if !path.is_file() {
        return Err(ConfigError::Missing {
            path: dir.to_path_buf(),
        });
    }
    let text = std::fs::read_to_string(&path).map_err(|e| ConfigError::Unreadable {
        path: path.clone(),
        why: e.to_string(),
    })?;
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(_) => Err(ConfigError::NotObject { path }),
        Err(e) => Err(ConfigError::NotJson {
            path,
            why: e.to_string(),
        }),
    }
}

/// Nested lookup `a.b.c` in a JSON object.
pub fn lookup_path(map: &Map<String, Value>, name: &str) -> Option<Value> {
    let mut parts = name.split('.');
    let mut cur = map.get(parts.next()?)?;
    for p in parts {
        cur = cur.as_object()?.get(p)?;
    }
    Some(cur.clone())
}

/// The converter's view of config.json for `class` (module doc).
pub fn resolve_hparams(raw: &Map<String, Value>, class: &ClassDesc) -> Map<String, Value> {
    let mut h = raw.clone();
    if let Some(Value::Object(tc)) = raw.get("text_config") {
        for (k, v) in tc {
            h.insert(k.clone(), v.clone());
        }
    }
    for (k, v) in &class.defaults {
        if !h.contains_key(k) {
            h.insert(k.clone(), v.clone());
        }
    }
    for (k, e) in &class.derived {
        if h.get(k).is_none_or(Value::is_null) {
            let v = {
                let scope = |n: &str| lookup_path(&h, n);
                e.eval(&scope, &mut vec![])
            };
            if !v.is_null() {
                h.insert(k.clone(), v);
            }
        }
    }
    for k in &class.drop {
        h.remove(k);
    }
    normalize_rope(&mut h);
    h
}

fn first(h: &Map<String, Value>, keys: &[&str]) -> Option<Value> {
    keys.iter().find_map(|k| h.get(*k).cloned())
}

/// `TextModel.__init__`: `rope_parameters` (or `rope_scaling`) with the global RoPE settings
/// mirrored into it.
fn normalize_rope(h: &mut Map<String, Value>) {
    let mut rp = match h.get("rope_parameters").or_else(|| h.get("rope_scaling")) {
        Some(Value::Object(o)) if !o.is_empty() => o.clone(),
        _ => Map::new(),
    };
    let theta = first(
        h,
        &[
            "global_rope_theta",
            "rope_global_theta",
            "rope_theta_global",
            "rope_theta",
            "rotary_emb_base",
        ],
    );
    let local = first(
        h,
        &[
            "local_rope_theta",
            "rope_local_theta",
            "rope_theta_local",
            "swa_rope_theta",
            "rope_local_base_freq",
        ],
    );
    let partial = first(h, &["partial_rotary_factor", "rope_pct", "rope_percent"]);
    let orig = first(h, &["original_max_position_embeddings"]);
    if !rp.contains_key("full_attention") && !rp.contains_key("sliding_attention") {
        if let Some(l) = local.filter(|v| !v.is_null()) {
            let mut s = Map::new();
            s.insert("rope_theta".into(), l);
            rp.insert("sliding_attention".into(), Value::Object(s));
        }
        let put = |rp: &mut Map<String, Value>, k: &str, v: Option<Value>| {
            if !rp.contains_key(k)
                && let Some(v) = v.filter(|v| !v.is_null())
            {
                rp.insert(k.into(), v);
            }
        };
        put(&mut rp, "rope_theta", theta);
        let ty = rp.get("type").cloned();
        put(&mut rp, "rope_type", ty);
        put(&mut rp, "partial_rotary_factor", partial);
        put(&mut rp, "original_max_position_embeddings", orig);
    }
    h.insert("rope_parameters".into(), Value::Object(rp));
}

/// The RoPE settings the full-attention layers use (`rope_parameters.full_attention`, else
/// `rope_parameters` itself).
pub fn full_attention_rope(h: &Map<String, Value>) -> Map<String, Value> {
    let rp = h.get("rope_parameters").and_then(Value::as_object);
    rp.and_then(|r| r.get("full_attention"))
        .and_then(Value::as_object)
        .or(rp)
        .cloned()
        .unwrap_or_default()
}

/// Name lookup for description expressions: `model.X` (canonical values), `rope.X` (the
/// full-attention RoPE settings), then the hyperparameters (nested with dots), then `extra`.
pub struct ConfigScope<'a> {
    pub hparams: &'a Map<String, Value>,
    pub canonical: &'a Map<String, Value>,
    pub rope: &'a Map<String, Value>,
    pub extra: &'a [(&'a str, Value)],
}

impl super::expr::Scope for ConfigScope<'_> {
    fn lookup(&self, name: &str) -> Option<Value> {
        if let Some((_, v)) = self.extra.iter().find(|(n, _)| *n == name) {
            return Some(v.clone());
        }
        if let Some(c) = name.strip_prefix("model.") {
            return self.canonical.get(c).cloned();
        }
        if let Some(r) = name.strip_prefix("rope.") {
            return lookup_path(self.rope, r);
        }
        lookup_path(self.hparams, name)
    }
}

impl ModelConfig {
    /// Read `dir/config.json` for a described class.
    pub fn load(dir: &Path) -> Result<ModelConfig, ConfigError> {
        let raw = read_config_json(dir)?;
        Self::from_json(&dir.join("config.json"), raw)
    }

    pub fn from_json(path: &Path, raw: Map<String, Value>) -> Result<ModelConfig, ConfigError> {
        let class_name = class_of(path, &raw)?;
        let (arch, class) =
            desc::for_class(&class_name).ok_or_else(|| ConfigError::Unsupported {
                path: path.to_path_buf(),
                class: class_name.clone(),
                supported: desc::supported_classes().join(", "),
            })?;
        let hparams = resolve_hparams(&raw, class);
        let rope_view = full_attention_rope(&hparams);
        let mut canonical = Map::new();
        let mut missing_of = std::collections::HashMap::new();
        for (k, e) in &arch.config {
            let mut missing = vec![];
            let v = {
                let scope = ConfigScope {
                    hparams: &hparams,
                    canonical: &canonical,
                    rope: &rope_view,
                    extra: &[],
                };
                e.eval(&scope, &mut missing)
            };
            if v.is_null() {
                // a key present but null names itself too
                e.names(&mut missing);
                missing_of.insert(k.clone(), missing);
            } else {
                canonical.insert(k.clone(), v);
            }
        }
        let bad = |key: &str, why: String| ConfigError::BadValue {
            path: path.to_path_buf(),
            key: key.to_string(),
            why,
        };
        let need = |k: &str| -> Result<&Value, ConfigError> {
            canonical.get(k).ok_or_else(|| ConfigError::MissingKey {
                path: path.to_path_buf(),
                key: missing_of
                    .get(k)
                    .and_then(|m| m.iter().find(|n| !n.starts_with("model.")).cloned())
                    .unwrap_or_else(|| k.to_string()),
                class: class_name.clone(),
            })
        };
        let need_usize = |k: &str| -> Result<usize, ConfigError> {
            let v = need(k)?;
            v.as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| bad(k, format!("must be a non-negative integer, got {v}")))
        };
        let hidden_size = need_usize("n_embd")?;
        let num_hidden_layers = need_usize("n_layer")?;
        let num_attention_heads = need_usize("n_head")?;
        if num_attention_heads == 0 {
            return Err(ConfigError::Inconsistent {
                path: path.to_path_buf(),
                why: "num_attention_heads is 0".into(),
            });
        }
        let num_key_value_heads = need_usize("n_head_kv")?;
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(ConfigError::Inconsistent {
                path: path.to_path_buf(),
                why: format!(
                    "num_key_value_heads {num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"
                ),
            });
        }
        let explicit_head_dim = raw
            .get("head_dim")
            .or_else(|| raw.get("text_config").and_then(|t| t.get("head_dim")))
            .is_some_and(|v| !v.is_null());
        if !explicit_head_dim && hidden_size % num_attention_heads != 0 {
            return Err(ConfigError::Inconsistent {
                path: path.to_path_buf(),
                why: format!(
                    "num_attention_heads {num_attention_heads} does not divide hidden_size {hidden_size}"
                ),
            });
        }
        let head_dim = need_usize("head_dim")?;
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(ConfigError::Inconsistent {
                path: path.to_path_buf(),
                why: format!("head dimension {head_dim} must be even and non-zero"),
            });
        }
        let intermediate_size = need_usize("n_ff")?;
        let vocab_size = need_usize("n_vocab")?;
        let rms_norm_eps = need("rms_eps")?
            .as_f64()
            .ok_or_else(|| bad("rms_norm_eps", "must be a number".into()))?;
        let max_position_embeddings = canonical.get("n_ctx").and_then(Value::as_u64);
        let tie_word_embeddings = canonical
            .get("tie_word_embeddings")
            .and_then(Value::as_bool);
        let n_expert = canonical
            .get("n_expert")
            .and_then(Value::as_u64)
            .unwrap_or(0) as usize;
        if n_expert > 1 && !arch.tensors.iter().any(|t| t.stack.is_some()) {
            return Err(ConfigError::Inconsistent {
                path: path.to_path_buf(),
                why: format!(
                    "mixture-of-experts models ({n_expert} experts) are not supported for {class_name}"
                ),
            });
        }
        let rope = Rope {
            theta: rope_view.get("rope_theta").and_then(Value::as_f64),
            rope_type: rope_view
                .get("rope_type")
                .and_then(Value::as_str)
                .map(str::to_string),
            params: rope_view.clone(),
        };
        if let Some(t) = &rope.rope_type {
            let known = [
                "default", "linear", "yarn", "llama3", "longrope", "su", "dynamic",
            ];
            if !known.contains(&t.to_ascii_lowercase().as_str()) {
                return Err(bad(
                    "rope_parameters",
                    format!(
                        "has RoPE type {t:?}, which is not supported (supported: {})",
                        known.join(", ")
                    ),
                ));
            }
        }
        Ok(ModelConfig {
            path: path.to_path_buf(),
            raw: hparams,
            arch,
            class,
            canonical,
            hidden_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            intermediate_size,
            head_dim,
            rms_norm_eps,
            max_position_embeddings,
            vocab_size,
            tie_word_embeddings,
            n_expert,
            rope,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.raw.get(key)
    }

    /// `tie_word_embeddings` from config.json, else the class default (for commands that read
    /// only the config; with the checkpoint at hand use `HfCheckpoint::tied`).
    pub fn tied_by_config(&self) -> bool {
        self.tie_word_embeddings
            .or_else(|| {
                self.class
                    .defaults
                    .get("tie_word_embeddings")
                    .and_then(Value::as_bool)
            })
            .unwrap_or(false)
    }

    /// Evaluate a description expression over this config (with `extra` names).
    pub fn eval(&self, e: &Expr, extra: &[(&str, Value)], missing: &mut Vec<String>) -> Value {
        let rope = &self.rope.params;
        let scope = ConfigScope {
            hparams: &self.raw,
            canonical: &self.canonical,
            rope,
            extra,
        };
        e.eval(&scope, missing)
    }
}
