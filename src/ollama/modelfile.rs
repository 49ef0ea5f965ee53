//! Modelfiles: a writer that follows Ollama's quoting rules, and a parser that implements the
//! grammar the way Ollama's `parser/parser.go` does (state machine, no escapes, `"…"` and
//! `"""…"""` values ending at a newline where the text is balanced, keywords case-insensitive,
//! PARAMETER names exact), used to check what the writer emits.

use anyhow::{Result, anyhow, bail};

const PARAMETERS_TSV: &str = include_str!("../../formats/ollama/parameters.tsv");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamType {
    Int,
    Float,
    Bool,
    Str,
    Deprecated,
}

/// The PARAMETER table (formats/ollama/parameters.tsv).
pub fn parameter_type(name: &str) -> Option<ParamType> {
    PARAMETERS_TSV
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split_once('\t'))
        .find(|(n, _)| *n == name)
        .map(|(_, t)| match t.trim() {
            "int" => ParamType::Int,
            "float" => ParamType::Float,
            "bool" => ParamType::Bool,
            "string" => ParamType::Str,
            _ => ParamType::Deprecated,
        })
}

fn go_parse_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Check a PARAMETER the way Ollama's `api.FormatParams` does: known name (exact case),
/// value of the field's type.
pub fn check_parameter(name: &str, value: &str) -> Result<()> {
    let Some(t) = parameter_type(name) else {
        bail!("unknown parameter '{name}'");
    };
    let ok = match t {
        ParamType::Int => value.parse::<i64>().is_ok(),
        ParamType::Float => value.parse::<f64>().is_ok(),
        ParamType::Bool => go_parse_bool(value).is_some(),
        ParamType::Str => !value.is_empty(),
        ParamType::Deprecated => bail!("parameter '{name}' is deprecated (Ollama ignores it)"),
    };
    if !ok {
        let what = match t {
            ParamType::Int => "an integer",
            ParamType::Float => "a number",
            ParamType::Bool => "true or false",
            _ => "a non-empty string",
        };
        bail!("parameter '{name}' must be {what}, got '{value}'");
    }
    Ok(())
}

/// Whether Ollama's parser keeps this character in a value (Go's `strconv.IsPrint`, plus tab
/// and newline which the value state machine keeps itself). Approximation: control characters,
/// whitespace other than space/tab/newline, and format characters are dropped.
pub fn kept_by_parser(c: char) -> bool {
    if c == '\t' || c == '\n' || c == ' ' {
        return true;
    }
    if c.is_control() || c.is_whitespace() {
        return false;
    }
    !matches!(c as u32,
        0xAD | 0x600..=0x605 | 0x61C | 0x6DD | 0x70F | 0x180E | 0x200B..=0x200F | 0x202A..=0x202E
        | 0x2060..=0x2064 | 0x2066..=0x206F | 0xFEFF | 0xFFF9..=0xFFFB | 0xE0001 | 0xE0020..=0xE007F
        | 0xD800..=0xDFFF | 0xE000..=0xF8FF | 0xF0000..=0x10FFFF)
}

/// A Modelfile as ftconv writes it.
#[derive(Debug, Clone, Default)]
pub struct Modelfile {
    pub comments: Vec<String>,
    pub from: String,
    pub adapter: Option<String>,
    pub template: Option<String>,
    pub system: Option<String>,
    /// (name, value) in order; `stop` repeats.
    pub parameters: Vec<(String, String)>,
    pub license: Vec<String>,
}

fn check_text(what: &str, s: &str) -> Result<()> {
    if let Some(c) = s.chars().find(|&c| !kept_by_parser(c)) {
        bail!(
            "{what} contains the character U+{:04X}, which Ollama's Modelfile parser drops",
            c as u32
        );
    }
    Ok(())
}

/// A multi-line body: `"""…"""` (there are no escapes, so a body containing `"""` cannot be
/// written).
pub fn quote_block(what: &str, body: &str) -> Result<String> {
    if body.contains("\"\"\"") {
        bail!("{what} contains \"\"\", which a Modelfile cannot express");
    }
    check_text(what, body)?;
    Ok(format!("\"\"\"{body}\"\"\""))
}

/// A short string value (stop): `"…"`, or `"""…"""` when it contains a quote.
pub fn quote_string(what: &str, v: &str) -> Result<String> {
    if v.is_empty() {
        bail!("{what} is empty");
    }
    if v.contains('"') {
        return quote_block(what, v);
    }
    check_text(what, v)?;
    Ok(format!("\"{v}\""))
}

/// A bare value (paths, numbers): one line, no surrounding whitespace, not starting with `"`.
pub fn bare(what: &str, v: &str) -> Result<String> {
    if v.is_empty() || v.trim() != v || v.contains('\n') || v.starts_with('"') {
        bail!("{what} {v:?} cannot be written as a bare Modelfile value");
    }
    check_text(what, v)?;
    Ok(v.to_string())
}

impl Modelfile {
    /// The file's text: LF line endings, UTF-8, no BOM.
    pub fn to_text(&self) -> Result<String> {
        let mut out = String::new();
        for c in &self.comments {
            if c.contains('\n') || c.contains('\r') {
                bail!("Modelfile comment spans lines: {c:?}");
            }
            out.push_str(&format!("# {c}\n"));
        }
        out.push_str(&format!("FROM {}\n", bare("FROM path", &self.from)?));
        if let Some(a) = &self.adapter {
            out.push_str(&format!("ADAPTER {}\n", bare("ADAPTER path", a)?));
        }
        if let Some(t) = &self.template {
            out.push_str(&format!("TEMPLATE {}\n", quote_block("TEMPLATE", t)?));
        }
        if let Some(s) = &self.system {
            out.push_str(&format!("SYSTEM {}\n", quote_block("SYSTEM", s)?));
        }
        for (name, value) in &self.parameters {
            check_parameter(name, value)?;
            let v = if parameter_type(name) == Some(ParamType::Str) {
                quote_string(&format!("PARAMETER {name}"), value)?
            } else {
                bare(&format!("PARAMETER {name}"), value)?
            };
            out.push_str(&format!("PARAMETER {name} {v}\n"));
        }
        for l in &self.license {
            out.push_str(&format!("LICENSE {}\n", quote_block("LICENSE", l)?));
        }
        Ok(out)
    }
}

// ------------------------------------------------------------------ parser

/// One parsed instruction: `name` is the lower-cased keyword (`model` for FROM), or the
/// parameter's name for PARAMETER; `args` the unquoted value (`role: text` for MESSAGE).
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub name: String,
    pub args: String,
    /// Whether it came from a PARAMETER line.
    pub parameter: bool,
}

const COMMANDS: &[&str] = &[
    "from",
    "license",
    "template",
    "system",
    "adapter",
    "draft",
    "renderer",
    "parser",
    "parameter",
    "message",
    "requires",
];

#[derive(Clone, Copy, PartialEq, Debug)]
enum St {
    Nil,
    Name,
    Value,
    Parameter,
    Message,
    Comment,
}

fn is_sp(c: char) -> bool {
    c == ' ' || c == '\t'
}
fn is_nl(c: char) -> bool {
    c == '\r' || c == '\n'
}

fn unquote(s: &str) -> Option<String> {
    if s.starts_with("\"\"\"") {
        if s.len() >= 6 && s.ends_with("\"\"\"") {
            return Some(s[3..s.len() - 3].to_string());
        }
        return None;
    }
    if s.starts_with('"') {
        if s.len() >= 2 && s.ends_with('"') {
            return Some(s[1..s.len() - 1].to_string());
        }
        return None;
    }
    Some(s.to_string())
}

/// Parse a Modelfile as Ollama's parser does (then checks: a FROM line, known PARAMETER names
/// and value types, MESSAGE roles).
pub fn parse(text: &str) -> Result<Vec<Command>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut cmds = Vec::new();
    let mut st = St::Nil;
    let mut buf = String::new();
    let mut name = String::new();
    let mut is_param = false;
    let mut role = String::new();
    let invalid = || {
        anyhow!(
            "command must be one of \"from\", \"license\", \"template\", \"system\", \"adapter\", \"draft\", \"renderer\", \"parser\", \"parameter\", \"message\", or \"requires\""
        )
    };
    for (line_no, c) in text.chars().scan(1usize, |l, c| {
        let cur = *l;
        if c == '\n' {
            *l += 1;
        }
        Some((cur, c))
    }) {
        // (next state, the rune to keep: None where Ollama's parser returns 0)
        let (next, emit) = match st {
            St::Nil => {
                if c == '#' {
                    (St::Comment, None)
                } else if is_sp(c) || is_nl(c) {
                    (St::Nil, None)
                } else {
                    (St::Name, Some(c))
                }
            }
            St::Name => {
                if c.is_ascii_alphabetic() {
                    (St::Name, Some(c))
                } else if is_sp(c) {
                    (St::Value, None)
                } else {
                    return Err(invalid().context(format!("line {line_no}")));
                }
            }
            St::Value => {
                if is_nl(c) || is_sp(c) {
                    (St::Nil, Some(c))
                } else {
                    (St::Value, Some(c))
                }
            }
            St::Parameter => {
                if c.is_ascii_alphanumeric() || c == '_' {
                    (St::Parameter, Some(c))
                } else if is_sp(c) {
                    (St::Value, None)
                } else {
                    bail!("line {line_no}: unexpected end of parameter name");
                }
            }
            St::Message => {
                if c.is_ascii_alphabetic() {
                    (St::Message, Some(c))
                } else if is_sp(c) {
                    (St::Value, None)
                } else {
                    bail!("line {line_no}: unexpected end of message role");
                }
            }
            St::Comment => {
                if is_nl(c) {
                    (St::Nil, None)
                } else {
                    (St::Comment, None)
                }
            }
        };
        let mut next = next;
        if next != st {
            match st {
                St::Name => {
                    let kw = buf.to_lowercase();
                    if !COMMANDS.contains(&kw.as_str()) {
                        return Err(invalid().context(format!("line {line_no}: {buf:?}")));
                    }
                    is_param = false;
                    match kw.as_str() {
                        "from" => name = "model".into(),
                        "parameter" => {
                            next = St::Parameter;
                            is_param = true;
                        }
                        "message" => {
                            next = St::Message;
                            name = kw;
                        }
                        _ => name = kw,
                    }
                }
                St::Parameter => name = buf.clone(),
                St::Message => {
                    if !matches!(buf.as_str(), "system" | "user" | "assistant") {
                        bail!(
                            "line {line_no}: message role must be one of \"system\", \"user\", or \"assistant\""
                        );
                    }
                    role = buf.clone();
                }
                St::Comment | St::Nil => {}
                St::Value => {
                    let s = unquote(buf.trim_matches(|c: char| c.is_whitespace()));
                    match s {
                        Some(s) if !is_sp(c) => {
                            let s = if role.is_empty() {
                                s
                            } else {
                                format!("{}: {s}", std::mem::take(&mut role))
                            };
                            cmds.push(Command {
                                name: name.clone(),
                                args: s,
                                parameter: is_param,
                            });
                        }
                        _ => {
                            buf.push(c);
                            continue;
                        }
                    }
                }
            }
            buf.clear();
            st = next;
        }
        // Go's strconv.IsPrint: printable characters and the ASCII space
        if let Some(r) = emit
            && kept_by_parser(r)
            && r != '\n'
            && r != '\t'
        {
            buf.push(r);
        }
    }
    match st {
        St::Comment | St::Nil => {}
        St::Value => {
            let s = unquote(buf.trim_matches(|c: char| c.is_whitespace()))
                .ok_or_else(|| anyhow!("unexpected end of file: {buf}"))?;
            let s = if role.is_empty() {
                s
            } else {
                format!("{role}: {s}")
            };
            cmds.push(Command {
                name,
                args: s,
                parameter: is_param,
            });
        }
        _ => bail!("unexpected end of file"),
    }
    if !cmds.iter().any(|c| c.name == "model" && !c.parameter) {
        bail!("no FROM line");
    }
    for c in cmds.iter().filter(|c| c.parameter) {
        check_parameter(&c.name, &c.args)?;
    }
    Ok(cmds)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str, name: &str) -> Vec<String> {
        parse(text)
            .unwrap()
            .into_iter()
            .filter(|c| c.name == name)
            .map(|c| c.args)
            .collect()
    }

    #[test]
    fn grammar_as_ollama_parses_it() {
        let t = "# c\nfrom ./m.gguf\n\n  # indented comment\nTemplate \"\"\"{{ .Prompt }}\n  x \"\"\"\nPARAMETER stop \"<|im_end|>\"\nPARAMETER stop \" a \"\nPARAMETER temperature 0.7\nSYSTEM say # not a comment\nMESSAGE user hi there\n";
        let cmds = parse(t).unwrap();
        assert_eq!(cmds[0].name, "model");
        assert_eq!(cmds[0].args, "./m.gguf");
        assert_eq!(one(t, "template"), vec!["{{ .Prompt }}\n  x "]);
        assert_eq!(one(t, "stop"), vec!["<|im_end|>", " a "]);
        assert_eq!(one(t, "temperature"), vec!["0.7"]);
        assert_eq!(one(t, "system"), vec!["say # not a comment"]);
        assert_eq!(one(t, "message"), vec!["user: hi there"]);
    }

    #[test]
    fn errors_as_ollama_gives_them() {
        assert!(
            parse("SYSTEM hi\n")
                .unwrap_err()
                .to_string()
                .contains("no FROM")
        );
        assert!(parse("FROM x\nPARAMETER Temperature 1\n").is_err());
        assert!(parse("FROM x\nPARAMETER top_k 1.5\n").is_err());
        assert!(parse("FROM x\nPARAMETER use_mmap yes\n").is_err());
        assert!(parse("FROM x\nBOGUS y\n").is_err());
        assert!(parse("FROM x\nMESSAGE tool hi\n").is_err());
        assert!(parse("FROM x\nTEMPLATE \"\"\"open\n").is_err());
        assert!(parse("FROM x\n1FROM y\n").is_err());
    }

    #[test]
    fn writer_round_trips() {
        let m = Modelfile {
            comments: vec!["made by a test".into()],
            from: "./dir with space/model.gguf".into(),
            adapter: Some("../a.gguf".into()),
            template: Some("{{- range .Messages }}\"{{ .Content }}\"\n\t{{ end }}\"".into()),
            system: Some("\"Quoted\" start\nand # hash\n".into()),
            parameters: vec![
                ("stop".into(), "<|im_end|>".into()),
                ("stop".into(), "USER: ".into()),
                ("stop".into(), "say \"x\"".into()),
                ("stop".into(), "\n\n".into()),
                ("temperature".into(), "0.7".into()),
                ("top_k".into(), "40".into()),
            ],
            license: vec!["MIT\n\nCopyright".into()],
        };
        let text = m.to_text().unwrap();
        assert!(!text.contains('\r') && !text.starts_with('\u{feff}'));
        let cmds = parse(&text).unwrap();
        let get = |n: &str| -> Vec<String> {
            cmds.iter()
                .filter(|c| c.name == n)
                .map(|c| c.args.clone())
                .collect()
        };
        assert_eq!(get("model"), vec![m.from.clone()]);
        assert_eq!(get("adapter"), vec!["../a.gguf"]);
        assert_eq!(get("template"), vec![m.template.clone().unwrap()]);
        assert_eq!(get("system"), vec![m.system.clone().unwrap()]);
        assert_eq!(
            get("stop"),
            vec!["<|im_end|>", "USER: ", "say \"x\"", "\n\n"]
        );
        assert_eq!(get("temperature"), vec!["0.7"]);
        assert_eq!(get("license"), vec!["MIT\n\nCopyright"]);
    }

    #[test]
    fn writer_refuses_what_cannot_be_written() {
        let mut m = Modelfile {
            from: "./m.gguf".into(),
            template: Some("a \"\"\" b".into()),
            ..Default::default()
        };
        assert!(m.to_text().is_err());
        m.template = Some("nbsp\u{a0}".into());
        assert!(m.to_text().is_err());
        m.template = None;
        m.parameters = vec![("Temperature".into(), "1".into())];
        assert!(m.to_text().is_err());
        m.parameters = vec![("penalize_newline".into(), "false".into())];
        assert!(m.to_text().is_err());
        m.parameters = vec![("stop".into(), String::new())];
        assert!(m.to_text().is_err());
    }
}
