//! Chat-template families: detection from the Jinja source, the Go template variants Ollama
//! runs for each, and the family's stop markers. The knowledge lives in `formats/ollama/`.

use anyhow::{Result, anyhow};
use serde::Deserialize;

const FAMILIES_JSON: &str = include_str!("../../formats/ollama/families.json");

/// The Go template files, by name.
const TEMPLATES: &[(&str, &str)] = &[
    (
        "smollm3.gotmpl",
        include_str!("../../formats/ollama/smollm3.gotmpl"),
    ),
    (
        "granite3.gotmpl",
        include_str!("../../formats/ollama/granite3.gotmpl"),
    ),
    (
        "chatml.gotmpl",
        include_str!("../../formats/ollama/chatml.gotmpl"),
    ),
    (
        "chatml-tools.gotmpl",
        include_str!("../../formats/ollama/chatml-tools.gotmpl"),
    ),
    (
        "llama3.gotmpl",
        include_str!("../../formats/ollama/llama3.gotmpl"),
    ),
    (
        "llama3.1.gotmpl",
        include_str!("../../formats/ollama/llama3.1.gotmpl"),
    ),
    (
        "llama3.1-tools.gotmpl",
        include_str!("../../formats/ollama/llama3.1-tools.gotmpl"),
    ),
    (
        "llama2.gotmpl",
        include_str!("../../formats/ollama/llama2.gotmpl"),
    ),
    (
        "mistral-v1.gotmpl",
        include_str!("../../formats/ollama/mistral-v1.gotmpl"),
    ),
    (
        "mistral-v3.gotmpl",
        include_str!("../../formats/ollama/mistral-v3.gotmpl"),
    ),
    (
        "mistral-v3-tools.gotmpl",
        include_str!("../../formats/ollama/mistral-v3-tools.gotmpl"),
    ),
    (
        "mistral-nemo.gotmpl",
        include_str!("../../formats/ollama/mistral-nemo.gotmpl"),
    ),
    (
        "mistral-nemo-tools.gotmpl",
        include_str!("../../formats/ollama/mistral-nemo-tools.gotmpl"),
    ),
    (
        "gemma.gotmpl",
        include_str!("../../formats/ollama/gemma.gotmpl"),
    ),
    (
        "phi3.gotmpl",
        include_str!("../../formats/ollama/phi3.gotmpl"),
    ),
    (
        "zephyr.gotmpl",
        include_str!("../../formats/ollama/zephyr.gotmpl"),
    ),
    (
        "alpaca.gotmpl",
        include_str!("../../formats/ollama/alpaca.gotmpl"),
    ),
    (
        "vicuna.gotmpl",
        include_str!("../../formats/ollama/vicuna.gotmpl"),
    ),
];

#[derive(Debug, Clone, Deserialize)]
pub struct Variant {
    pub name: String,
    pub file: String,
    pub tools: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Family {
    pub name: String,
    pub title: String,
    pub detect: Vec<Vec<String>>,
    pub stops: Vec<String>,
    pub variants: Vec<Variant>,
}

#[derive(Deserialize)]
struct FamiliesFile {
    families: Vec<Family>,
}

/// All families, in detection order.
pub fn families() -> Vec<Family> {
    let f: FamiliesFile =
        serde_json::from_str(FAMILIES_JSON).expect("formats/ollama/families.json is valid");
    f.families
}

/// A family by name.
pub fn family(name: &str) -> Option<Family> {
    families().into_iter().find(|f| f.name == name)
}

/// The family whose markers the Jinja source contains (first match in file order).
pub fn detect(jinja: &str) -> Option<Family> {
    families().into_iter().find(|f| {
        f.detect
            .iter()
            .any(|all| all.iter().all(|m| jinja.contains(m.as_str())))
    })
}

/// Whether the Jinja source handles tools at all.
pub fn source_has_tools(jinja: &str) -> bool {
    jinja.contains("tools")
}

/// How the generated template writes the date the source template writes.
#[derive(Debug, Clone, PartialEq)]
pub enum DateSource {
    /// `strftime_now`: Ollama's `{{ currentDate }}` (YYYY-MM-DD).
    Current,
    /// A literal the template defaults to (e.g. "26 Jul 2024").
    Literal(String),
    None,
}

pub fn date_source(jinja: &str) -> DateSource {
    if jinja.contains("strftime_now") {
        return DateSource::Current;
    }
    let re = regex::Regex::new(r#"date_string\s*=\s*["']([^"']*)["']"#).unwrap();
    match re.captures(jinja) {
        Some(c) => DateSource::Literal(c[1].to_string()),
        None => DateSource::None,
    }
}

/// The Go template text of a variant, with the placeholders filled in: FTCONV_DATE (the date
/// the source writes) and FTCONV_EOS (the tokenizer's EOS token, which templates such as Llama 2's
/// write after each assistant turn).
pub fn variant_text(v: &Variant, date: &DateSource, eos: Option<&str>) -> Result<String> {
    let raw = TEMPLATES
        .iter()
        .find(|(n, _)| *n == v.file)
        .map(|(_, t)| *t)
        .ok_or_else(|| anyhow!("formats/ollama/{}: not embedded", v.file))?;
    let text = raw.strip_suffix('\n').unwrap_or(raw);
    let text = if text.contains("FTCONV_EOS") {
        match eos {
            Some(e) if !e.is_empty() && !e.contains("{{") && !e.contains("}}") => {
                text.replace("FTCONV_EOS", e)
            }
            _ => {
                return Err(anyhow!(
                    "variant {} needs the tokenizer's EOS token and none is known",
                    v.name
                ));
            }
        }
    } else {
        text.to_string()
    };
    if text.contains("FTCONV_DATE") {
        let d = match date {
            DateSource::Current => "{{ currentDate }}".to_string(),
            DateSource::Literal(s) => s.clone(),
            DateSource::None => {
                return Err(anyhow!(
                    "variant {} needs a date and the template defines none",
                    v.name
                ));
            }
        };
        return Ok(text.replace("FTCONV_DATE", &d));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_is_embedded_and_parses() {
        for f in families() {
            assert!(!f.stops.is_empty(), "{}", f.name);
            for v in &f.variants {
                let t = variant_text(v, &DateSource::Literal("1 Jan 2025".into()), Some("</s>"))
                    .unwrap();
                crate::ollama::gotemplate::GoTemplate::parse(&t)
                    .unwrap_or_else(|e| panic!("{}: {e}", v.file));
                assert!(!t.contains("<s>[INST]") || v.name == "llama2");
            }
        }
    }

    #[test]
    fn dates() {
        assert_eq!(
            date_source(r#"{%- set date_string = "26 Jul 2024" %}"#),
            DateSource::Literal("26 Jul 2024".into())
        );
        assert_eq!(
            date_source("{{ strftime_now('%d %b %Y') }}"),
            DateSource::Current
        );
    }
}
