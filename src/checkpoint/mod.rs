//! Hugging Face model folders: config.json, safetensors shards (+ index), tokenizer files,
//! chat template and generation config; and the sharded safetensors writer.

pub mod bnb;
pub mod safetensors;
pub mod writer;

pub use crate::arch::{ConfigError, ModelConfig};
pub use safetensors::{StFile, TensorRef};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Map, Value};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// An HF model folder with its tensors memory-mapped: the one loader every command uses.
/// The folder opens whatever its architecture; the family description (and so the typed
/// [`ModelConfig`]) is needed only by commands that must know the family (GGUF conversion,
/// adapter export, fine-tuning), which ask `config()`.
pub struct HfCheckpoint {
    pub dir: PathBuf,
    /// config.json as written.
    pub json: Map<String, Value>,
    /// The architecture class config.json declares.
    pub class: String,
    model: std::result::Result<ModelConfig, ConfigError>,
    pub shards: Vec<StFile>,
    /// Every tensor, shards in file-name order, tensors in file (offset) order.
    pub tensors: Vec<TensorRef>,
    index: HashMap<String, usize>,
    /// A bitsandbytes 4-bit (NF4/FP4) folder, read dequantized.
    pub quantized: bool,
}

/// Shard file names of a folder: the index's `weight_map` values, else `model*.safetensors`.
/// Shard file names, and the tensor → shard map of the index when there is one.
pub type ShardList = (Vec<String>, Option<HashMap<String, String>>);

pub fn shard_names(dir: &Path) -> Result<ShardList> {
    let index_path = dir.join("model.safetensors.index.json");
    if index_path.is_file() {
        let text = std::fs::read_to_string(&index_path)
            .with_context(|| format!("{}: cannot read", index_path.display()))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| anyhow!("{}: not valid JSON: {e}", index_path.display()))?;
        let wm = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| {
                anyhow!(
                    "{}: key \"weight_map\" is missing or not an object",
                    index_path.display()
                )
            })?;
        let mut map = HashMap::new();
        let mut files = BTreeSet::new();
        for (k, f) in wm {
            let f = f.as_str().ok_or_else(|| {
                anyhow!(
                    "{}: weight_map[{k:?}] is not a file name",
                    index_path.display()
                )
            })?;
            if f.contains('/') || f.contains("..") {
                bail!(
                    "{}: weight_map[{k:?}] = {f:?} is not a plain file name",
                    index_path.display()
                );
            }
            files.insert(f.to_string());
            map.insert(k.clone(), f.to_string());
        }
        return Ok((files.into_iter().collect(), Some(map)));
    }
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot list folder", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("model") && n.ends_with(".safetensors"))
        .collect();
    names.sort();
    Ok((names, None))
}

impl HfCheckpoint {
    pub fn open(dir: &Path) -> Result<HfCheckpoint> {
        if !dir.is_dir() {
            bail!("{}: not a model folder", dir.display());
        }
        let json = crate::arch::config::read_config_json(dir)?;
        let class = crate::arch::config::class_of(&dir.join("config.json"), &json)?;
        let model = ModelConfig::from_json(&dir.join("config.json"), json.clone());
        let (names, weight_map) = shard_names(dir)?;
        if names.is_empty() {
            if dir.join("pytorch_model.bin").exists()
                || dir.join("pytorch_model.bin.index.json").exists()
            {
                bail!(
                    "{}: only PyTorch .bin weights found; ftconv reads safetensors (re-save with save_pretrained(safe_serialization=True))",
                    dir.display()
                );
            }
            bail!("{}: no model*.safetensors files", dir.display());
        }
        let mut shards = Vec::new();
        for n in &names {
            let p = dir.join(n);
            if !p.is_file() {
                bail!(
                    "{}: shard listed in model.safetensors.index.json is missing",
                    p.display()
                );
            }
            shards.push(StFile::open(&p)?);
        }
        let mut tensors = Vec::new();
        let mut index = HashMap::new();
        for s in &shards {
            for t in &s.tensors {
                if index.insert(t.name.clone(), tensors.len()).is_some() {
                    bail!(
                        "{}: tensor {:?} appears in more than one shard",
                        s.path.display(),
                        t.name
                    );
                }
                tensors.push(t.clone());
            }
        }
        if let Some(wm) = weight_map {
            for (k, f) in &wm {
                match index.get(k) {
                    None => bail!(
                        "{}: tensor {k:?} listed in model.safetensors.index.json is missing from {f}",
                        dir.display()
                    ),
                    Some(&i) => {
                        let actual = tensors[i]
                            .file
                            .file_name()
                            .map(|n| n.to_string_lossy().to_string());
                        if actual.as_deref() != Some(f.as_str()) {
                            bail!(
                                "{}: tensor {k:?} is in {} but the index says {f}",
                                dir.display(),
                                actual.unwrap_or_default()
                            );
                        }
                    }
                }
            }
            for t in &tensors {
                if !wm.contains_key(&t.name) {
                    bail!(
                        "{}: tensor {:?} is not listed in model.safetensors.index.json",
                        t.file.display(),
                        t.name
                    );
                }
            }
        }
        // a bitsandbytes 4-bit folder: each weight's key group read as its dequantized self
        // (decisions.md: dequantize to the stored dtype)
        let quantized = is_bnb_folder(dir)?;
        if quantized {
            bnb::fold_quantized(dir, &mut tensors)?;
            index = tensors
                .iter()
                .enumerate()
                .map(|(i, t)| (t.name.clone(), i))
                .collect();
        }
        Ok(HfCheckpoint {
            dir: dir.to_path_buf(),
            json,
            class,
            model,
            shards,
            tensors,
            index,
            quantized,
        })
    }

    /// The family-aware config (an error naming the class and the supported ones when the
    /// family is not described, or naming the key a described family misses).
    pub fn config(&self) -> std::result::Result<&ModelConfig, ConfigError> {
        self.model.as_ref().map_err(Clone::clone)
    }

    pub fn get(&self, name: &str) -> Option<&TensorRef> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// Tensors in convert_hf_to_gguf.py's iteration order: shards by file name, tensors by
    /// name within a shard.
    pub fn converter_order(&self) -> Vec<&TensorRef> {
        let mut v: Vec<&TensorRef> = self.tensors.iter().collect();
        v.sort_by(|a, b| a.file.cmp(&b.file).then_with(|| a.name.cmp(&b.name)));
        v
    }

    /// A tensor's name as the tensor map spells it: a multimodal class's text-model prefix
    /// (`model.language_model.`) read as `model.`.
    pub fn text_name(&self, name: &str) -> String {
        if let Ok(c) = self.config()
            && let Some(p) = &c.class.text_prefix
            && let Some(rest) = name.strip_prefix(p.as_str())
        {
            return format!("model.{rest}");
        }
        name.to_string()
    }

    /// Whether a tensor lies outside the text model of a multimodal class (a vision tower
    /// or projector, which the text conversion leaves out).
    pub fn outside_text_model(&self, name: &str) -> bool {
        match self
            .config()
            .ok()
            .and_then(|c| c.class.text_prefix.as_ref())
        {
            Some(p) => !name.starts_with(p.as_str()) && name != "lm_head.weight",
            None => false,
        }
    }

    /// A config.json value (top level, else `text_config`).
    pub fn config_value(&self, k: &str) -> Option<&Value> {
        self.json.get(k).filter(|v| !v.is_null()).or_else(|| {
            self.json
                .get("text_config")
                .and_then(|t| t.get(k))
                .filter(|v| !v.is_null())
        })
    }

    /// Whether the output head shares the input embedding: the checkpoint has no
    /// `lm_head.weight`, or config.json's `tie_word_embeddings` (transformers' class default
    /// when absent) says so — transformers then ties the head to the embedding at load time.
    /// Every command (conversion, merge, NF4, adapter export, fine-tuning) uses this rule.
    pub fn tied(&self) -> bool {
        let flag = match self
            .config_value("tie_word_embeddings")
            .and_then(Value::as_bool)
        {
            Some(b) => b,
            None => self
                .config()
                .ok()
                .and_then(|c| c.class.defaults.get("tie_word_embeddings"))
                .and_then(Value::as_bool)
                .unwrap_or(false),
        };
        flag || self.get("lm_head.weight").is_none()
    }

    /// Name of the model: the folder's name.
    pub fn name(&self) -> String {
        model_dir_name(&self.dir)
    }

    pub fn file(&self, name: &str) -> Option<PathBuf> {
        let p = self.dir.join(name);
        p.is_file().then_some(p)
    }

    pub fn read_json(&self, name: &str) -> Result<Option<Value>> {
        read_json_opt(&self.dir.join(name))
    }

    /// Total bytes of the tensor data.
    pub fn data_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.len as u64).sum()
    }
}

/// The folder's own name (resolving `.` and trailing slashes).
pub fn model_dir_name(dir: &Path) -> String {
    let abs = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    abs.file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "model".into())
}

/// Read a JSON file if it exists; a file that exists but is not JSON is an error.
pub fn read_json_opt(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let v = serde_json::from_str(&text)
        .map_err(|e| anyhow!("{}: not valid JSON: {e}", path.display()))?;
    Ok(Some(v))
}

/// Whether config.json says `quant_method: bitsandbytes` (a pre-quantized 4-bit folder).
pub fn is_bnb_folder(dir: &Path) -> Result<bool> {
    let cfg = read_json_opt(&dir.join("config.json"))?;
    Ok(cfg
        .as_ref()
        .and_then(|c| c.get("quantization_config"))
        .and_then(|q| q.get("quant_method"))
        .and_then(Value::as_str)
        == Some("bitsandbytes"))
}

/// What kind of input a path is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputKind {
    HfFolder,
    Nf4Folder,
    PeftAdapter,
    SafetensorsFile,
    Gguf,
}

/// Detect the input kind of a path (by content, not by extension alone).
pub fn detect(path: &Path) -> Result<InputKind> {
    if !path.exists() {
        bail!("{}: no such file or folder", path.display());
    }
    if path.is_dir() {
        if path.join("adapter_config.json").is_file() {
            return Ok(InputKind::PeftAdapter);
        }
        if path.join("config.json").is_file() {
            let cfg = read_json_opt(&path.join("config.json"))?;
            let qm = cfg
                .as_ref()
                .and_then(|c| c.get("quantization_config"))
                .and_then(|q| q.get("quant_method"))
                .and_then(Value::as_str);
            if qm == Some("bitsandbytes") {
                return Ok(InputKind::Nf4Folder);
            }
            return Ok(InputKind::HfFolder);
        }
        bail!(
            "{}: neither a model folder (config.json) nor a PEFT adapter (adapter_config.json)",
            path.display()
        );
    }
    let mut magic = [0u8; 4];
    use std::io::Read;
    let mut f =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let n = f.read(&mut magic).unwrap_or(0);
    if n == 4 && &magic == b"GGUF" {
        return Ok(InputKind::Gguf);
    }
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if ext == "gguf" {
        // let the GGUF reader explain what is wrong
        return Ok(InputKind::Gguf);
    }
    Ok(InputKind::SafetensorsFile)
}
