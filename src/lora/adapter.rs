//! A PEFT adapter folder: `adapter_config.json` + `adapter_model.safetensors`
//! (nf4-peft.md §1). Parses every config field that changes the merge math and sorts the
//! tensors into per-module LoRA / IA³ parts and full replacement copies.

use crate::checkpoint::{StFile, TensorRef};
use anyhow::{Context, Result, anyhow, bail};
use regex::Regex;
use safetensors::Dtype;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Every adapter key starts with this (PEFT wraps the transformers model twice).
pub const PREFIX: &str = "base_model.model.";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeftType {
    Lora,
    Ia3,
}

/// `target_modules` / `exclude_modules` / `feedforward_modules`.
#[derive(Clone, Debug)]
pub enum ModuleSet {
    /// null / absent.
    Unset,
    /// `"all-linear"`: every Linear / Conv1D except the output layer.
    AllLinear,
    /// A string: a regex that must match the whole module path.
    Regex(Regex),
    /// A list: the path equals an entry or ends with `"." + entry`.
    List(Vec<String>),
}

impl ModuleSet {
    fn parse(v: Option<&Value>, key: &str, file: &Path) -> Result<ModuleSet> {
        match v {
            None | Some(Value::Null) => Ok(ModuleSet::Unset),
            Some(Value::String(s)) if s == "all-linear" => Ok(ModuleSet::AllLinear),
            Some(Value::String(s)) => Ok(ModuleSet::Regex(full_regex(s, key, file)?)),
            Some(Value::Array(a)) => {
                let mut out = Vec::with_capacity(a.len());
                for e in a {
                    let s = e.as_str().ok_or_else(|| {
                        anyhow!(
                            "{}: {key} must be a list of strings, found {e}",
                            file.display()
                        )
                    })?;
                    out.push(s.to_string());
                }
                if out.len() == 1 && out[0] == "all-linear" {
                    return Ok(ModuleSet::AllLinear);
                }
                Ok(ModuleSet::List(out))
            }
            Some(other) => bail!(
                "{}: {key} must be null, a string or a list of strings, found {other}",
                file.display()
            ),
        }
    }

    /// Does the set name this module path? `None` when the set is unset.
    pub fn matches(&self, module: &str) -> Option<bool> {
        match self {
            ModuleSet::Unset => None,
            ModuleSet::AllLinear => Some(!is_output_layer(module)),
            ModuleSet::Regex(r) => Some(r.is_match(module)),
            ModuleSet::List(l) => Some(l.iter().any(|t| {
                module == t
                    || (module.len() > t.len()
                        && module.ends_with(t.as_str())
                        && module.as_bytes()[module.len() - t.len() - 1] == b'.')
            })),
        }
    }
}

/// The model's output layer, which `all-linear` leaves out.
fn is_output_layer(module: &str) -> bool {
    let last = module.rsplit('.').next().unwrap_or(module);
    matches!(last, "lm_head" | "embed_out" | "output_layer")
}

/// Python `re.fullmatch(s, …)` as a Rust regex.
fn full_regex(s: &str, key: &str, file: &Path) -> Result<Regex> {
    Regex::new(&format!("^(?:{s})$")).map_err(|e| {
        anyhow!(
            "{}: {key} {s:?} is not a regular expression ftconv can use: {e}",
            file.display()
        )
    })
}

/// One `rank_pattern` / `alpha_pattern` entry: PEFT's `get_pattern_key` matches
/// `(.*\.)?(KEY)$` from the start of the module path; first match in file order wins.
#[derive(Clone, Debug)]
pub struct PatternEntry<T> {
    pub key: String,
    pub re: Regex,
    pub value: T,
}

fn pattern_lookup<'a, T>(p: &'a [PatternEntry<T>], module: &str) -> Option<&'a T> {
    p.iter()
        .find(|e| e.re.is_match(module))
        .or_else(|| p.iter().find(|e| e.key == module))
        .map(|e| &e.value)
}

/// What the merge needs from `adapter_config.json`.
#[derive(Clone, Debug)]
pub struct AdapterConfig {
    pub path: PathBuf,
    pub peft_type: PeftType,
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub rank_pattern: Vec<PatternEntry<usize>>,
    pub alpha_pattern: Vec<PatternEntry<f64>>,
    pub target_modules: ModuleSet,
    pub exclude_modules: ModuleSet,
    pub layers_to_transform: Option<Vec<u64>>,
    pub layers_pattern: Vec<String>,
    pub fan_in_fan_out: bool,
    /// `"none"`, `"all"` or `"lora_only"`.
    pub bias: String,
    pub lora_bias: bool,
    pub use_dora: bool,
    pub modules_to_save: Vec<String>,
    /// IA³ only.
    pub feedforward_modules: ModuleSet,
    pub base_model_name_or_path: Option<String>,
}

const PROMPT_METHODS: &[&str] = &[
    "PROMPT_TUNING",
    "P_TUNING",
    "PREFIX_TUNING",
    "MULTITASK_PROMPT_TUNING",
    "ADAPTION_PROMPT",
    "CPT",
];

fn get_bool(o: &Map<String, Value>, k: &str, default: bool, file: &Path) -> Result<bool> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => bail!("{}: {k} must be true or false, found {v}", file.display()),
    }
}

fn get_num(o: &Map<String, Value>, k: &str, file: &Path) -> Result<f64> {
    match o.get(k) {
        None | Some(Value::Null) => bail!(
            "{}: required field {k:?} is missing (not an adapter saved by PEFT?)",
            file.display()
        ),
        Some(v) => v
            .as_f64()
            .ok_or_else(|| anyhow!("{}: {k} must be a number, found {v}", file.display())),
    }
}

fn get_str_list(o: &Map<String, Value>, k: &str, file: &Path) -> Result<Vec<String>> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(a)) => a
            .iter()
            .map(|e| {
                e.as_str().map(str::to_string).ok_or_else(|| {
                    anyhow!(
                        "{}: {k} must be a list of strings, found {e}",
                        file.display()
                    )
                })
            })
            .collect(),
        Some(v) => bail!(
            "{}: {k} must be a string or a list of strings, found {v}",
            file.display()
        ),
    }
}

fn pattern_regex(key: &str, field: &str, file: &Path) -> Result<Regex> {
    Regex::new(&format!(r"^(?:.*\.)?(?:{key})$")).map_err(|e| {
        anyhow!(
            "{}: {field} key {key:?} is not a regular expression ftconv can use: {e}",
            file.display()
        )
    })
}

impl AdapterConfig {
    pub fn from_json(path: &Path, v: &Value) -> Result<AdapterConfig> {
        let o = v
            .as_object()
            .ok_or_else(|| anyhow!("{}: expected a JSON object", path.display()))?;
        let pt = o
            .get("peft_type")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                anyhow!(
                    "{}: required field \"peft_type\" is missing (not a PEFT adapter?)",
                    path.display()
                )
            })?
            .to_ascii_uppercase();
        let peft_type = match pt.as_str() {
            "LORA" => PeftType::Lora,
            "IA3" => PeftType::Ia3,
            p if PROMPT_METHODS.contains(&p) => bail!(
                "{}: peft_type {p} is a prompt-learning method: its virtual tokens live outside the model's weights and cannot be merged into them",
                path.display()
            ),
            p => bail!(
                "{}: peft_type {p} cannot be merged by ftconv (supported: LORA, IA3)",
                path.display()
            ),
        };
        // LoRA variants whose merge is not the plain one
        if peft_type == PeftType::Lora {
            for k in [
                "velora_config",
                "arrow_config",
                "kasa_config",
                "monteclora_config",
                "alora_invocation_tokens",
                "target_parameters",
                "layer_replication",
            ] {
                if o.get(k).is_some_and(|v| !v.is_null()) {
                    bail!(
                        "{}: {k} is set: this LoRA variant cannot be merged by ftconv",
                        path.display()
                    );
                }
            }
            for k in ["use_bdlora", "use_qalora"] {
                if get_bool(o, k, false, path)? {
                    bail!(
                        "{}: {k} is true: this LoRA variant cannot be merged by ftconv",
                        path.display()
                    );
                }
            }
            if let Some(Value::String(init)) = o.get("init_lora_weights") {
                let l = init.to_ascii_lowercase();
                if ["pissa", "olora", "corda", "lora_ga"]
                    .iter()
                    .any(|p| l.starts_with(p))
                {
                    bail!(
                        "{}: init_lora_weights is {init:?}: this adapter was saved without conversion and expects a modified base model; re-save it with PEFT's path_initial_model_for_weight_conversion",
                        path.display()
                    );
                }
                if l == "mica" {
                    bail!(
                        "{}: init_lora_weights \"mica\" selects a LoRA variant ftconv cannot merge",
                        path.display()
                    );
                }
            }
            if o.get("trainable_token_indices")
                .is_some_and(|v| !v.is_null())
            {
                bail!(
                    "{}: trainable_token_indices is set: merging trainable tokens is not supported",
                    path.display()
                );
            }
        }
        let (r, lora_alpha) = match peft_type {
            PeftType::Lora => {
                let r = get_num(o, "r", path)?;
                if r < 1.0 || r.fract() != 0.0 {
                    bail!(
                        "{}: r must be a positive integer, found {r}",
                        path.display()
                    );
                }
                (r as usize, get_num(o, "lora_alpha", path)?)
            }
            PeftType::Ia3 => (0, 0.0),
        };
        if !o.contains_key("target_modules") {
            bail!(
                "{}: required field \"target_modules\" is missing",
                path.display()
            );
        }
        let mut rank_pattern = vec![];
        if let Some(Value::Object(m)) = o.get("rank_pattern") {
            for (k, v) in m {
                let n = v.as_u64().filter(|&n| n > 0).ok_or_else(|| {
                    anyhow!(
                        "{}: rank_pattern[{k:?}] must be a positive integer, found {v}",
                        path.display()
                    )
                })?;
                rank_pattern.push(PatternEntry {
                    key: k.clone(),
                    re: pattern_regex(k, "rank_pattern", path)?,
                    value: n as usize,
                });
            }
        }
        let mut alpha_pattern = vec![];
        if let Some(Value::Object(m)) = o.get("alpha_pattern") {
            for (k, v) in m {
                let a = v.as_f64().ok_or_else(|| {
                    anyhow!(
                        "{}: alpha_pattern[{k:?}] must be a number, found {v}",
                        path.display()
                    )
                })?;
                alpha_pattern.push(PatternEntry {
                    key: k.clone(),
                    re: pattern_regex(k, "alpha_pattern", path)?,
                    value: a,
                });
            }
        }
        let layers_to_transform = match o.get("layers_to_transform") {
            None | Some(Value::Null) => None,
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|e| {
                        e.as_u64().ok_or_else(|| {
                            anyhow!(
                                "{}: layers_to_transform must hold layer indices, found {e}",
                                path.display()
                            )
                        })
                    })
                    .collect::<Result<Vec<u64>>>()?,
            ),
            Some(v) => Some(vec![v.as_u64().ok_or_else(|| {
                anyhow!(
                    "{}: layers_to_transform must be an integer or a list, found {v}",
                    path.display()
                )
            })?]),
        };
        let bias = match o.get("bias") {
            None | Some(Value::Null) => "none".to_string(),
            Some(Value::String(s)) if ["none", "all", "lora_only"].contains(&s.as_str()) => {
                s.clone()
            }
            Some(v) => bail!(
                "{}: bias must be \"none\", \"all\" or \"lora_only\", found {v}",
                path.display()
            ),
        };
        Ok(AdapterConfig {
            path: path.to_path_buf(),
            peft_type,
            r,
            lora_alpha,
            use_rslora: get_bool(o, "use_rslora", false, path)?,
            rank_pattern,
            alpha_pattern,
            target_modules: ModuleSet::parse(o.get("target_modules"), "target_modules", path)?,
            exclude_modules: ModuleSet::parse(o.get("exclude_modules"), "exclude_modules", path)?,
            layers_to_transform,
            layers_pattern: get_str_list(o, "layers_pattern", path)?,
            fan_in_fan_out: get_bool(o, "fan_in_fan_out", false, path)?,
            bias,
            lora_bias: get_bool(o, "lora_bias", false, path)?,
            use_dora: get_bool(o, "use_dora", false, path)?,
            modules_to_save: get_str_list(o, "modules_to_save", path)?,
            feedforward_modules: ModuleSet::parse(
                o.get("feedforward_modules"),
                "feedforward_modules",
                path,
            )?,
            base_model_name_or_path: o
                .get("base_model_name_or_path")
                .and_then(Value::as_str)
                .map(str::to_string),
        })
    }

    /// Rank of a module from `rank_pattern`, else `r`.
    pub fn rank_for(&self, module: &str) -> usize {
        *pattern_lookup(&self.rank_pattern, module).unwrap_or(&self.r)
    }

    /// Alpha of a module from `alpha_pattern`, else `lora_alpha`.
    pub fn alpha_for(&self, module: &str) -> f64 {
        *pattern_lookup(&self.alpha_pattern, module).unwrap_or(&self.lora_alpha)
    }

    /// LoRA scaling of a module (nf4-peft.md §2.1): computed in f64, used as f32.
    pub fn scaling_for(&self, module: &str, rank: usize) -> f64 {
        let alpha = self.alpha_for(module);
        if self.use_rslora {
            alpha / (rank as f64).sqrt()
        } else {
            alpha / rank as f64
        }
    }

    /// Whether PEFT would have put an adapter layer on this module (`check_target_module_exists`:
    /// `exclude_modules`, `target_modules`, then `layers_to_transform` / `layers_pattern`).
    /// An unset `target_modules` accepts every module (the tensors decide).
    pub fn targets(&self, module: &str) -> bool {
        if self.exclude_modules.matches(module) == Some(true) {
            return false;
        }
        if self.target_modules.matches(module) == Some(false) {
            return false;
        }
        if self
            .modules_to_save
            .iter()
            .any(|m| module == m || module.ends_with(&format!(".{m}")))
        {
            return false;
        }
        match &self.layers_to_transform {
            None => true,
            Some(layers) => match layer_index(module, &self.layers_pattern) {
                None => false,
                Some(i) => layers.contains(&i),
            },
        }
    }

    /// IA³: does the module scale its input columns (`feedforward_modules`)?
    pub fn is_feedforward(&self, module: &str) -> bool {
        self.feedforward_modules.matches(module) == Some(true)
    }
}

/// The layer index PEFT reads from a module path: `.*\.[^.]*\.(\d+)\.` (or
/// `.*\.PATTERN\.(\d+)\.` for each `layers_pattern`), matched from the start.
pub fn layer_index(module: &str, layers_pattern: &[String]) -> Option<u64> {
    let caps = |re: &str| -> Option<u64> {
        Regex::new(re)
            .ok()?
            .captures(module)?
            .get(1)?
            .as_str()
            .parse()
            .ok()
    };
    if layers_pattern.is_empty() {
        caps(r"^.*\.[^.]*\.(\d+)\.")
    } else {
        layers_pattern
            .iter()
            .find_map(|p| caps(&format!(r"^.*\.(?:{p})\.(\d+)\.")))
    }
}

/// The tensors of one adapted module.
#[derive(Clone, Debug, Default)]
pub struct ModuleTensors {
    pub lora_a: Option<TensorRef>,
    pub lora_b: Option<TensorRef>,
    pub lora_b_bias: Option<TensorRef>,
    pub embedding_a: Option<TensorRef>,
    pub embedding_b: Option<TensorRef>,
    pub magnitude: Option<TensorRef>,
    pub ia3_l: Option<TensorRef>,
}

/// Where a key suffix goes in [`ModuleTensors`].
type Slot = fn(&mut ModuleTensors) -> &mut Option<TensorRef>;

/// A parsed adapter folder with its tensors memory-mapped.
pub struct Adapter {
    pub dir: PathBuf,
    pub config: AdapterConfig,
    pub file: StFile,
    /// LoRA / IA³ parts by module path (without `base_model.model.`).
    pub modules: BTreeMap<String, ModuleTensors>,
    /// Full copies (modules_to_save, saved embedding base layers, trained biases): the base
    /// tensor name they replace (`.base_layer.` removed) and the tensor.
    pub replacements: Vec<(String, TensorRef)>,
    /// Combination weight (`ADAPTER@WEIGHT`, default 1).
    pub weight: f64,
}

/// `PATH[@WEIGHT]`: the weight is taken only when the text after the last `@` is a number.
pub fn parse_spec(s: &str) -> (PathBuf, f64) {
    if let Some((p, w)) = s.rsplit_once('@')
        && let Ok(w) = w.parse::<f64>()
        && w.is_finite()
        && !p.is_empty()
    {
        return (PathBuf::from(p), w);
    }
    (PathBuf::from(s), 1.0)
}

impl Adapter {
    pub fn open(dir: &Path, weight: f64) -> Result<Adapter> {
        if !dir.is_dir() {
            if dir.exists() {
                bail!(
                    "{}: not a folder (a PEFT adapter is a folder with adapter_config.json)",
                    dir.display()
                );
            }
            bail!("{}: no such folder", dir.display());
        }
        let cfg_path = dir.join("adapter_config.json");
        if !cfg_path.is_file() {
            bail!(
                "{}: adapter_config.json is missing (not a PEFT adapter folder?)",
                dir.display()
            );
        }
        let text = std::fs::read_to_string(&cfg_path)
            .with_context(|| format!("{}: cannot read", cfg_path.display()))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| anyhow!("{}: not valid JSON: {e}", cfg_path.display()))?;
        let config = AdapterConfig::from_json(&cfg_path, &v)?;
        let st = dir.join("adapter_model.safetensors");
        if !st.is_file() {
            if dir.join("adapter_model.bin").is_file() {
                bail!(
                    "{}: only adapter_model.bin (a PyTorch pickle) found; re-save the adapter as safetensors (model.save_pretrained(dir, safe_serialization=True))",
                    dir.display()
                );
            }
            bail!("{}: adapter_model.safetensors is missing", dir.display());
        }
        let file = StFile::open(&st)?;
        let mut modules: BTreeMap<String, ModuleTensors> = BTreeMap::new();
        let mut replacements = vec![];
        for t in &file.tensors {
            let Some(rest) = t.name.strip_prefix(PREFIX) else {
                bail!(
                    "{}: tensor {:?} does not start with {PREFIX:?} (not saved by PEFT?)",
                    st.display(),
                    t.name
                );
            };
            if !matches!(t.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
                bail!(
                    "{}: tensor {:?} has dtype {:?}; adapters must be F32, F16 or BF16",
                    st.display(),
                    t.name,
                    t.dtype
                );
            }
            let parts: &[(&str, Slot)] = &[
                (".lora_A.weight", |m| &mut m.lora_a),
                (".lora_B.weight", |m| &mut m.lora_b),
                (".lora_B.bias", |m| &mut m.lora_b_bias),
                (".lora_embedding_A", |m| &mut m.embedding_a),
                (".lora_embedding_B", |m| &mut m.embedding_b),
                (".lora_magnitude_vector.weight", |m| &mut m.magnitude),
                (".lora_magnitude_vector", |m| &mut m.magnitude),
                (".ia3_l", |m| &mut m.ia3_l),
            ];
            let mut found = false;
            for (suffix, slot) in parts {
                if let Some(m) = rest.strip_suffix(suffix) {
                    *slot(modules.entry(m.to_string()).or_default()) = Some(t.clone());
                    found = true;
                    break;
                }
            }
            if found {
                continue;
            }
            if rest.contains(".lora_") || rest.contains(".ia3_") {
                bail!(
                    "{}: tensor {:?} is not a LoRA/IA³ tensor ftconv knows (saved with an adapter name in the key?)",
                    st.display(),
                    t.name
                );
            }
            let target = rest.replace(".base_layer.", ".");
            replacements.push((target, t.clone()));
        }
        if modules.is_empty() && replacements.is_empty() {
            bail!("{}: the adapter holds no tensors", st.display());
        }
        let a = Adapter {
            dir: dir.to_path_buf(),
            config,
            file,
            modules,
            replacements,
            weight,
        };
        a.check_parts()?;
        Ok(a)
    }

    fn st_path(&self) -> String {
        self.file.path.display().to_string()
    }

    /// Every module has a complete, consistent set of tensors for the adapter type.
    fn check_parts(&self) -> Result<()> {
        let f = self.st_path();
        for (m, p) in &self.modules {
            match self.config.peft_type {
                PeftType::Ia3 => {
                    if p.ia3_l.is_none() {
                        bail!("{f}: module {m:?} has LoRA tensors but the adapter is IA3");
                    }
                    continue;
                }
                PeftType::Lora => {
                    if p.ia3_l.is_some() {
                        bail!("{f}: module {m:?} has an ia3_l tensor but the adapter is LORA");
                    }
                }
            }
            let linear = p.lora_a.is_some() || p.lora_b.is_some();
            let emb = p.embedding_a.is_some() || p.embedding_b.is_some();
            if linear && emb {
                bail!("{f}: module {m:?} has both lora_A/B and lora_embedding_A/B tensors");
            }
            let (a, b, an, bn) = if emb {
                (
                    &p.embedding_a,
                    &p.embedding_b,
                    "lora_embedding_A",
                    "lora_embedding_B",
                )
            } else {
                (&p.lora_a, &p.lora_b, "lora_A.weight", "lora_B.weight")
            };
            let a = a.as_ref().ok_or_else(|| {
                anyhow!("{f}: module {m:?}: {PREFIX}{m}.{an} is missing (found only {bn})")
            })?;
            let b = b.as_ref().ok_or_else(|| {
                anyhow!("{f}: module {m:?}: {PREFIX}{m}.{bn} is missing (found only {an})")
            })?;
            if a.shape.len() != 2 || b.shape.len() != 2 {
                bail!(
                    "{f}: module {m:?}: {an} {:?} and {bn} {:?} must both be 2-D",
                    a.shape,
                    b.shape
                );
            }
            if a.shape[0] != b.shape[1] {
                bail!(
                    "{f}: module {m:?}: rank mismatch: {an} has {} rows but {bn} has {} columns",
                    a.shape[0],
                    b.shape[1]
                );
            }
            let r = a.shape[0];
            let want = self.config.rank_for(m);
            if r != want {
                bail!(
                    "{f}: module {m:?}: {an} has rank {r} but the config says r={want} (r / rank_pattern)",
                );
            }
            if let Some(bb) = &p.lora_b_bias
                && bb.shape != [b.shape[0]]
            {
                bail!(
                    "{f}: module {m:?}: lora_B.bias has shape {:?}, expected [{}]",
                    bb.shape,
                    b.shape[0]
                );
            }
            if p.magnitude.is_some() && !self.config.use_dora {
                bail!("{f}: module {m:?} has lora_magnitude_vector but use_dora is false");
            }
            if p.magnitude.is_none() && self.config.use_dora {
                bail!(
                    "{f}: module {m:?}: use_dora is true (a DoRA adapter) but lora_magnitude_vector is missing"
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg(v: Value) -> Result<AdapterConfig> {
        AdapterConfig::from_json(Path::new("adapter_config.json"), &v)
    }

    #[test]
    fn patterns_first_match_and_suffix_semantics() {
        let c = cfg(json!({
            "peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "down_proj"],
            "rank_pattern": {"down_proj": 4, "layers.1.self_attn.q_proj": 2},
            "alpha_pattern": {"q_proj": 3, "^model.layers.1.self_attn.q_proj": 5}
        }))
        .unwrap();
        assert_eq!(c.rank_for("model.layers.3.mlp.down_proj"), 4);
        assert_eq!(c.rank_for("model.layers.1.self_attn.q_proj"), 2);
        assert_eq!(c.rank_for("model.layers.11.self_attn.q_proj"), 8);
        // first key in file order wins
        assert_eq!(c.alpha_for("model.layers.1.self_attn.q_proj"), 3.0);
        // "down_proj" must match at a dot boundary
        assert_eq!(c.rank_for("model.layers.3.mlp.xdown_proj"), 8);
        assert_eq!(c.scaling_for("model.layers.0.mlp.down_proj", 4), 4.0);
    }

    #[test]
    fn rslora_scaling() {
        let c = cfg(
            json!({"peft_type": "LORA", "r": 16, "lora_alpha": 8, "use_rslora": true,
            "target_modules": null}),
        )
        .unwrap();
        assert_eq!(c.scaling_for("x", 16), 2.0);
    }

    #[test]
    fn target_matching() {
        let c = cfg(json!({"peft_type": "LORA", "r": 8, "lora_alpha": 8,
            "target_modules": ["q_proj", "embed_tokens"], "layers_to_transform": [1]}))
        .unwrap();
        assert!(c.targets("model.layers.1.self_attn.q_proj"));
        assert!(!c.targets("model.layers.0.self_attn.q_proj"));
        // no layer index: not targeted when layers_to_transform is set
        assert!(!c.targets("model.embed_tokens"));
        let c = cfg(json!({"peft_type": "LORA", "r": 8, "lora_alpha": 8,
            "target_modules": ".*\\.(q|v)_proj", "exclude_modules": ["model.layers.0.self_attn.v_proj"]}))
        .unwrap();
        assert!(c.targets("model.layers.0.self_attn.q_proj"));
        assert!(!c.targets("model.layers.0.self_attn.v_proj"));
        assert!(c.targets("model.layers.1.self_attn.v_proj"));
        assert!(!c.targets("model.layers.1.self_attn.k_proj"));
        let c = cfg(json!({"peft_type": "LORA", "r": 8, "lora_alpha": 8,
            "target_modules": "all-linear", "layers_pattern": "h", "layers_to_transform": 2}))
        .unwrap();
        assert!(c.targets("transformer.h.2.attn.c_attn"));
        assert!(!c.targets("transformer.h.1.attn.c_attn"));
        assert!(!c.targets("lm_head"));
        assert_eq!(layer_index("model.layers.12.mlp.up_proj", &[]), Some(12));
    }

    #[test]
    fn refusals() {
        let e = cfg(json!({"peft_type": "PREFIX_TUNING"})).unwrap_err();
        assert!(e.to_string().contains("cannot be merged"), "{e}");
        let e = cfg(json!({"peft_type": "LORA", "r": 8, "target_modules": null})).unwrap_err();
        assert!(e.to_string().contains("lora_alpha"), "{e}");
        let e = cfg(json!({"r": 8})).unwrap_err();
        assert!(e.to_string().contains("peft_type"), "{e}");
        let e = cfg(
            json!({"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": null,
            "use_qalora": true}),
        )
        .unwrap_err();
        assert!(e.to_string().contains("use_qalora"), "{e}");
        let e = cfg(json!({"peft_type": "LOHA"})).unwrap_err();
        assert!(e.to_string().contains("LOHA"), "{e}");
    }

    #[test]
    fn weight_spec() {
        assert_eq!(parse_spec("a/b@0.5"), (PathBuf::from("a/b"), 0.5));
        assert_eq!(parse_spec("a/b"), (PathBuf::from("a/b"), 1.0));
        assert_eq!(parse_spec("me@host/x"), (PathBuf::from("me@host/x"), 1.0));
        assert_eq!(parse_spec("x@-1"), (PathBuf::from("x"), -1.0));
    }
}
