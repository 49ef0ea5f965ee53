//! What a Modelfile is derived from: the chat template and special tokens of an HF folder or a
//! GGUF, the tokenizer's EOS tokens, generation_config.json, a LICENSE file.

use super::ChatSource;
use crate::checkpoint::read_json_opt;
use crate::gguf::reader::GgufFile;
use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value as J;
use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

/// What ftconv reads from a model for its Modelfile.
#[derive(Debug, Default)]
pub struct ModelInfo {
    pub chat: Option<ChatSource>,
    /// EOS / end-of-turn token strings (tokenizer EOS, generation_config eos ids).
    pub eos: Vec<String>,
    /// eos ids that no vocabulary names.
    pub unnamed_eos_ids: Vec<u64>,
    pub generation_config: Option<J>,
    /// Whether the tokenizer adds BOS (tokenizer.ggml.add_bos_token / add_bos_token).
    pub add_bos: Option<bool>,
}

fn token_string(v: &J) -> Option<String> {
    match v {
        J::String(s) => Some(s.clone()),
        J::Object(m) => m.get("content").and_then(J::as_str).map(str::to_string),
        _ => None,
    }
}

fn push_unique(v: &mut Vec<String>, s: String) {
    if !s.is_empty() && !v.contains(&s) {
        v.push(s);
    }
}

/// id → token string from tokenizer_config.json's added_tokens_decoder and tokenizer.json
/// (added tokens, then the model vocabulary).
fn hf_id_to_token(dir: &Path, tc: Option<&J>) -> Result<HashMap<u64, String>> {
    let mut m = HashMap::new();
    if let Some(J::Object(atd)) = tc.and_then(|t| t.get("added_tokens_decoder")) {
        for (k, v) in atd {
            if let (Ok(id), Some(s)) = (k.parse::<u64>(), token_string(v)) {
                m.insert(id, s);
            }
        }
    }
    if let Some(tj) = read_json_opt(&dir.join("tokenizer.json"))? {
        if let Some(J::Array(added)) = tj.get("added_tokens") {
            for t in added {
                if let (Some(id), Some(s)) = (
                    t.get("id").and_then(J::as_u64),
                    t.get("content").and_then(J::as_str),
                ) {
                    m.entry(id).or_insert_with(|| s.to_string());
                }
            }
        }
        if let Some(J::Object(vocab)) = tj.get("model").and_then(|x| x.get("vocab")) {
            for (s, id) in vocab {
                if let Some(id) = id.as_u64() {
                    m.entry(id).or_insert_with(|| s.clone());
                }
            }
        }
    }
    Ok(m)
}

fn eos_ids(gc: &J) -> Vec<u64> {
    match gc.get("eos_token_id") {
        Some(J::Number(n)) => n.as_u64().into_iter().collect(),
        Some(J::Array(a)) => a.iter().filter_map(J::as_u64).collect(),
        _ => Vec::new(),
    }
}

/// The chat template, special tokens, EOS strings and generation config of an HF folder.
pub fn from_hf_dir(dir: &Path) -> Result<ModelInfo> {
    let tc_path = dir.join("tokenizer_config.json");
    let tc = read_json_opt(&tc_path)?;
    let stm = read_json_opt(&dir.join("special_tokens_map.json"))?;
    let mut info = ModelInfo::default();

    let jinja_path = dir.join("chat_template.jinja");
    let template = if jinja_path.is_file() {
        let t = std::fs::read_to_string(&jinja_path)
            .with_context(|| format!("{}: cannot read as UTF-8 text", jinja_path.display()))?;
        Some((t, jinja_path.display().to_string()))
    } else {
        match tc.as_ref().and_then(|t| t.get("chat_template")) {
            Some(J::String(s)) => Some((s.clone(), format!("{} chat_template", tc_path.display()))),
            Some(J::Array(list)) => {
                let def = list
                    .iter()
                    .find(|e| e.get("name").and_then(J::as_str) == Some("default"))
                    .and_then(|e| e.get("template"))
                    .and_then(J::as_str)
                    .ok_or_else(|| {
                        anyhow!(
                            "{}: chat_template is a list without a \"default\" entry",
                            tc_path.display()
                        )
                    })?;
                Some((
                    def.to_string(),
                    format!("{} chat_template (default)", tc_path.display()),
                ))
            }
            Some(J::Null) | None => None,
            Some(_) => bail!(
                "{}: chat_template is neither a string nor a list",
                tc_path.display()
            ),
        }
    };

    let mut special = serde_json::Map::new();
    for key in [
        "bos_token",
        "eos_token",
        "unk_token",
        "pad_token",
        "sep_token",
        "cls_token",
        "mask_token",
    ] {
        let v = tc
            .as_ref()
            .and_then(|t| t.get(key))
            .and_then(token_string)
            .or_else(|| stm.as_ref().and_then(|s| s.get(key)).and_then(token_string));
        if let Some(s) = v {
            special.insert(key.into(), J::from(s));
        }
    }
    if let Some(e) = special.get("eos_token").and_then(J::as_str) {
        push_unique(&mut info.eos, e.to_string());
    }
    info.add_bos = tc
        .as_ref()
        .and_then(|t| t.get("add_bos_token"))
        .and_then(J::as_bool);
    info.generation_config = read_json_opt(&dir.join("generation_config.json"))?;
    if let Some(gc) = &info.generation_config {
        let ids = eos_ids(gc);
        if !ids.is_empty() {
            let names = hf_id_to_token(dir, tc.as_ref())?;
            for id in ids {
                match names.get(&id) {
                    Some(s) => push_unique(&mut info.eos, s.clone()),
                    None => info.unnamed_eos_ids.push(id),
                }
            }
        }
    }
    info.chat = template.map(|(template, origin)| ChatSource {
        template,
        special,
        origin,
    });
    Ok(info)
}

/// The chat template (`tokenizer.chat_template`) and EOS / EOT tokens of a GGUF.
pub fn from_gguf(path: &Path) -> Result<ModelInfo> {
    let g = GgufFile::open(path)?;
    let md = &g.metadata;
    let tokens = md.get("tokenizer.ggml.tokens").and_then(|v| v.as_array());
    let token = |key: &str| -> Option<String> {
        let id = md.get_u64(key)?;
        tokens?.get(id as usize)?.as_str().map(str::to_string)
    };
    let mut info = ModelInfo::default();
    let mut special = serde_json::Map::new();
    for (k, key) in [
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("unk_token", "tokenizer.ggml.unknown_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
    ] {
        if let Some(s) = token(key) {
            special.insert(k.into(), J::from(s));
        }
    }
    for key in [
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ] {
        if let Some(s) = token(key) {
            push_unique(&mut info.eos, s);
        } else if let Some(id) = md.get_u64(key) {
            info.unnamed_eos_ids.push(id);
        }
    }
    info.add_bos = md
        .get("tokenizer.ggml.add_bos_token")
        .and_then(|v| v.as_bool());
    info.chat = md.get_str("tokenizer.chat_template").map(|t| ChatSource {
        template: t.to_string(),
        special,
        origin: format!("{} tokenizer.chat_template", path.display()),
    });
    Ok(info)
}

/// Whether a GGUF is a LoRA adapter (`general.type` = `adapter`).
pub fn check_adapter_gguf(path: &Path) -> Result<()> {
    let g = GgufFile::open(path)?;
    match g.metadata.get_str("general.type") {
        Some("adapter") => Ok(()),
        Some(t) => bail!(
            "{}: not a LoRA adapter GGUF (general.type is {t:?}, expected \"adapter\")",
            path.display()
        ),
        None => bail!(
            "{}: not a LoRA adapter GGUF (no general.type key)",
            path.display()
        ),
    }
}

/// Sampling PARAMETERs from generation_config.json (only fields Ollama has; none when
/// do_sample is false, since transformers then decodes greedily and ignores them).
pub fn sampling_parameters(gc: &J) -> (Vec<(String, String)>, Vec<String>) {
    let mut out = Vec::new();
    let mut notes = Vec::new();
    let sampling = gc.get("do_sample").and_then(J::as_bool) != Some(false);
    for (hf, ol, int) in [
        ("temperature", "temperature", false),
        ("top_k", "top_k", true),
        ("top_p", "top_p", false),
        ("min_p", "min_p", false),
        ("typical_p", "typical_p", false),
        ("repetition_penalty", "repeat_penalty", false),
    ] {
        let Some(v) = gc.get(hf).filter(|v| !v.is_null()) else {
            continue;
        };
        if !sampling && hf != "repetition_penalty" {
            notes.push(format!(
                "generation_config.json: do_sample is false, {hf} not copied"
            ));
            continue;
        }
        let text = match v.as_f64() {
            Some(f) if int && f.fract() == 0.0 => format!("{}", f as i64),
            Some(_) if int => {
                notes.push(format!(
                    "generation_config.json: {hf} {v} is not an integer, not copied"
                ));
                continue;
            }
            Some(f) => format!("{f}"),
            None => {
                notes.push(format!(
                    "generation_config.json: {hf} {v} is not a number, not copied"
                ));
                continue;
            }
        };
        out.push((ol.to_string(), text));
    }
    (out, notes)
}

/// The LICENSE file next to a model (in the folder, or beside the GGUF).
pub fn find_license(model: &Path) -> Option<PathBuf> {
    let dir = if model.is_dir() {
        model.to_path_buf()
    } else {
        model.parent().map(Path::to_path_buf).unwrap_or_default()
    };
    let dir = if dir.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        dir
    };
    [
        "LICENSE",
        "LICENSE.txt",
        "LICENSE.md",
        "LICENCE",
        "LICENCE.txt",
        "LICENCE.md",
        "license",
        "license.txt",
        "license.md",
    ]
    .iter()
    .map(|n| dir.join(n))
    .find(|p| p.is_file())
}

/// `target` relative to `from_dir` (both resolved), written as Ollama resolves FROM / ADAPTER
/// paths: `./x` or `../x`, joined to the Modelfile's folder.
pub fn relative_path(from_dir: &Path, target: &Path) -> Result<String> {
    let a = std::fs::canonicalize(from_dir)
        .with_context(|| format!("{}: cannot resolve", from_dir.display()))?;
    let b = std::fs::canonicalize(target)
        .with_context(|| format!("{}: cannot resolve", target.display()))?;
    let ac: Vec<Component> = a.components().collect();
    let bc: Vec<Component> = b.components().collect();
    let common = ac.iter().zip(&bc).take_while(|(x, y)| x == y).count();
    let mut parts: Vec<String> = Vec::new();
    for _ in common..ac.len() {
        parts.push("..".into());
    }
    for c in &bc[common..] {
        parts.push(
            c.as_os_str()
                .to_str()
                .ok_or_else(|| anyhow!("{}: path is not UTF-8", target.display()))?
                .to_string(),
        );
    }
    if parts.is_empty() {
        return Ok(".".into());
    }
    let rel = parts.join("/");
    let rel = if rel.starts_with("..") {
        rel
    } else {
        format!("./{rel}")
    };
    if !a.join(&rel).exists() {
        bail!("{}: not found from {}", rel, a.display());
    }
    Ok(rel)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sampling() {
        let (p, _) = sampling_parameters(
            &json!({"temperature": 0.7, "top_k": 40, "top_p": 0.9, "repetition_penalty": 1.1, "max_length": 20}),
        );
        assert_eq!(
            p,
            vec![
                ("temperature".to_string(), "0.7".to_string()),
                ("top_k".into(), "40".into()),
                ("top_p".into(), "0.9".into()),
                ("repeat_penalty".into(), "1.1".into())
            ]
        );
        let (p, n) = sampling_parameters(&json!({"do_sample": false, "temperature": 0.6}));
        assert!(p.is_empty() && n.len() == 1);
    }

    #[test]
    fn relative() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a/b")).unwrap();
        std::fs::create_dir_all(d.path().join("m")).unwrap();
        std::fs::write(d.path().join("m/x.gguf"), b"").unwrap();
        assert_eq!(
            relative_path(&d.path().join("m"), &d.path().join("m/x.gguf")).unwrap(),
            "./x.gguf"
        );
        assert_eq!(
            relative_path(&d.path().join("a/b"), &d.path().join("m/x.gguf")).unwrap(),
            "../../m/x.gguf"
        );
    }
}
