//! `config.json` with the transformers-4 and transformers-5 spellings and the defaults
//! transformers fills in for missing fields (formats/architectures.json).

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const ARCHITECTURES: &str = include_str!("../../formats/architectures.json");

/// What ftconv knows about one supported HF architecture class.
#[derive(Clone, Debug)]
pub struct ArchInfo {
    pub hf_class: String,
    pub gguf_arch: String,
    pub permute_qk: bool,
    pub writes_vocab_size: bool,
    /// transformers' config class defines `head_dim` (so AutoConfig.to_dict() always has it).
    pub head_dim_default: bool,
    pub defaults: Map<String, Value>,
}

fn arch_table() -> &'static Vec<ArchInfo> {
    static T: OnceLock<Vec<ArchInfo>> = OnceLock::new();
    T.get_or_init(|| {
        let v: Value = serde_json::from_str(ARCHITECTURES).expect("formats/architectures.json");
        v.as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| !k.starts_with('_'))
            .map(|(k, e)| ArchInfo {
                hf_class: k.clone(),
                gguf_arch: e["gguf_arch"].as_str().unwrap().to_string(),
                permute_qk: e["permute_qk"].as_bool().unwrap(),
                writes_vocab_size: e["writes_vocab_size"].as_bool().unwrap(),
                head_dim_default: e["head_dim_default"].as_bool().unwrap(),
                defaults: e["defaults"].as_object().unwrap().clone(),
            })
            .collect()
    })
}

pub fn supported_architectures() -> Vec<&'static str> {
    arch_table().iter().map(|a| a.hf_class.as_str()).collect()
}

/// RoPE settings in the transformers-5 `rope_parameters` form.
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

/// A parsed config.json.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub path: PathBuf,
    /// The JSON (with `text_config` merged over the top level).
    pub raw: Map<String, Value>,
    pub arch: ArchInfo,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub intermediate_size: usize,
    pub head_dim: usize,
    /// head_dim is present in config.json or filled in by transformers' config class.
    pub head_dim_known: bool,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: Option<u64>,
    pub vocab_size: usize,
    pub tie_word_embeddings: bool,
    pub rope: Rope,
}

fn as_usize(v: &Value, key: &str, path: &Path) -> Result<usize> {
    v.as_u64().map(|x| x as usize).ok_or_else(|| {
        anyhow!(
            "{}: key {key:?} must be a non-negative integer, got {v}",
            path.display()
        )
    })
}

impl ModelConfig {
    pub fn load(dir: &Path) -> Result<ModelConfig> {
        let path = dir.join("config.json");
        if !path.is_file() {
            bail!(
                "{}: config.json is missing (not a Hugging Face model folder?)",
                dir.display()
            );
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| anyhow!("{}: not valid JSON: {e}", path.display()))?;
        Self::from_json(&path, v)
    }

    pub fn from_json(path: &Path, v: Value) -> Result<ModelConfig> {
        let Value::Object(mut raw) = v else {
            bail!("{}: expected a JSON object", path.display());
        };
        if let Some(Value::Object(tc)) = raw.get("text_config").cloned() {
            for (k, v) in tc {
                raw.insert(k, v);
            }
        }
        let archs = raw.get("architectures").and_then(Value::as_array);
        let class = archs
            .and_then(|a| a.first())
            .and_then(Value::as_str)
            .ok_or_else(|| {
                anyhow!(
                    "{}: key \"architectures\" is missing or empty",
                    path.display()
                )
            })?
            .to_string();
        let arch = arch_table()
            .iter()
            .find(|a| a.hf_class == class)
            .cloned()
            .ok_or_else(|| {
                anyhow!(
                    "{}: architecture {class:?} is not supported (supported: {})",
                    path.display(),
                    supported_architectures().join(", ")
                )
            })?;
        let get = |k: &str| {
            raw.get(k)
                .filter(|v| !v.is_null())
                .or_else(|| arch.defaults.get(k))
        };
        let need = |k: &str| -> Result<usize> {
            let v = get(k).ok_or_else(|| anyhow!("{}: key {k:?} is missing", path.display()))?;
            as_usize(v, k, path)
        };
        let hidden_size = need("hidden_size")?;
        let num_hidden_layers = need("num_hidden_layers")?;
        let num_attention_heads = need("num_attention_heads")?;
        if num_attention_heads == 0 {
            bail!("{}: num_attention_heads is 0", path.display());
        }
        let num_key_value_heads = match get("num_key_value_heads") {
            Some(v) => as_usize(v, "num_key_value_heads", path)?,
            None => num_attention_heads,
        };
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            bail!(
                "{}: num_key_value_heads {num_key_value_heads} does not divide num_attention_heads {num_attention_heads}",
                path.display()
            );
        }
        let explicit_head_dim = raw.get("head_dim").filter(|v| !v.is_null());
        let head_dim = match explicit_head_dim {
            Some(v) => as_usize(v, "head_dim", path)?,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    bail!(
                        "{}: num_attention_heads {num_attention_heads} does not divide hidden_size {hidden_size}",
                        path.display()
                    );
                }
                hidden_size / num_attention_heads
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            bail!(
                "{}: head dimension {head_dim} must be even and non-zero",
                path.display()
            );
        }
        let intermediate_size = need("intermediate_size")?;
        let vocab_size = need("vocab_size")?;
        let rms_norm_eps = get("rms_norm_eps").and_then(Value::as_f64).ok_or_else(|| {
            anyhow!(
                "{}: key \"rms_norm_eps\" is missing or not a number",
                path.display()
            )
        })?;
        let max_position_embeddings = get("max_position_embeddings").and_then(Value::as_u64);
        let tie_word_embeddings = get("tie_word_embeddings")
            .and_then(Value::as_bool)
            .unwrap_or(false);

        // RoPE: transformers 5 `rope_parameters`, or transformers 4 `rope_theta` + `rope_scaling`.
        let mut params = raw
            .get("rope_parameters")
            .or_else(|| raw.get("rope_scaling"))
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        if !params.contains_key("rope_theta")
            && let Some(t) = raw
                .get("rope_theta")
                .filter(|v| !v.is_null())
                .or_else(|| arch.defaults.get("rope_theta"))
        {
            params.insert("rope_theta".into(), t.clone());
        }
        if !params.contains_key("rope_type")
            && let Some(t) = params.get("type").cloned()
        {
            params.insert("rope_type".into(), t);
        }
        if !params.contains_key("original_max_position_embeddings")
            && let Some(v) = raw.get("original_max_position_embeddings")
        {
            params.insert("original_max_position_embeddings".into(), v.clone());
        }
        let rope = Rope {
            theta: params.get("rope_theta").and_then(Value::as_f64),
            rope_type: params
                .get("rope_type")
                .and_then(Value::as_str)
                .map(str::to_string),
            params,
        };
        if let Some(t) = &rope.rope_type {
            match t.to_ascii_lowercase().as_str() {
                "default" | "linear" | "yarn" | "llama3" => {}
                other => bail!(
                    "{}: RoPE type {other:?} is not supported for {} (supported: default, linear, yarn, llama3)",
                    path.display(),
                    class
                ),
            }
        }
        for k in ["num_local_experts", "num_experts"] {
            if raw.get(k).and_then(Value::as_u64).unwrap_or(0) > 1 {
                bail!(
                    "{}: mixture-of-experts models ({k} > 1) are not supported",
                    path.display()
                );
            }
        }
        Ok(ModelConfig {
            path: path.to_path_buf(),
            head_dim_known: explicit_head_dim.is_some() || arch.head_dim_default,
            raw,
            arch,
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
            rope,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.raw.get(key)
    }
}
