//! `ftconv ollama`: a Messages-mode Go TEMPLATE for the model's chat-template family, proved
//! before writing by rendering the model's own Jinja template (as transformers does) and the
//! Go template (as Ollama executes it) on canned conversations and requiring the same text.

pub mod families;
pub mod gotemplate;
pub mod modelfile;
pub mod source;

use crate::chat_template::ChatTemplate;
use anyhow::{Result, anyhow, bail};
use families::{Family, Variant};
use gotemplate::{Env, GoTemplate};
use serde_json::{Value as J, json};

/// The model's chat template and the special tokens its Jinja context gets.
#[derive(Debug, Clone)]
pub struct ChatSource {
    pub template: String,
    /// `bos_token`, `eos_token`, … as transformers passes them (strings).
    pub special: serde_json::Map<String, J>,
    /// Where the template came from (for messages).
    pub origin: String,
}

impl ChatSource {
    pub fn bos(&self) -> Option<&str> {
        self.special
            .get("bos_token")
            .and_then(J::as_str)
            .filter(|s| !s.is_empty())
    }
}

/// A canned conversation (HF message format).
#[derive(Debug, Clone)]
pub struct Conversation {
    pub name: &'static str,
    pub messages: J,
    pub tools: Option<J>,
}

/// The tool every tools conversation offers (HF / OpenAI format).
pub fn canned_tool() -> J {
    json!({
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a given city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "The city, e.g. Paris"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}
                },
                "required": ["city"]
            }
        }
    })
}

/// user; system+user; user/assistant/user; system+user/assistant/user; and with tools.
pub fn canned_conversations() -> Vec<Conversation> {
    let sys = json!({"role": "system", "content": "You are a pirate. Answer in one sentence."});
    let u1 = json!({"role": "user", "content": "What is the capital of France?"});
    let a1 = json!({"role": "assistant", "content": "Arr, it be Paris, matey."});
    let u2 =
        json!({"role": "user", "content": "And of \"Germany\"? Say it in <b>bold</b> & {braces}."});
    let tools = Some(json!([canned_tool()]));
    let tu = json!({"role": "user", "content": "What's the weather like in Paris today?"});
    vec![
        Conversation {
            name: "user",
            messages: json!([u1]),
            tools: None,
        },
        Conversation {
            name: "system+user",
            messages: json!([sys, u1]),
            tools: None,
        },
        Conversation {
            name: "user/assistant/user",
            messages: json!([u1, a1, u2]),
            tools: None,
        },
        Conversation {
            name: "system+user/assistant/user",
            messages: json!([sys, u1, a1, u2]),
            tools: None,
        },
        Conversation {
            name: "tools: user",
            messages: json!([tu]),
            tools: tools.clone(),
        },
        Conversation {
            name: "tools: system+user",
            messages: json!([sys, tu]),
            tools,
        },
    ]
}

/// The fixed date proofs use: Jinja's strftime_now and Go's currentDate agree on it.
pub const PROOF_DATE_JINJA: &str = "22 Nov 2026";
pub const PROOF_DATE_ISO: &str = "2026-11-22";

/// The proof date as the Jinja source writes it: each `strftime_now(FORMAT)` format it uses.
pub fn proof_dates_in(jinja: &str) -> Vec<String> {
    let re = regex::Regex::new(r#"strftime_now\(\s*["']([^"']*)["']\s*\)"#).unwrap();
    let mut v: Vec<String> = re
        .captures_iter(jinja)
        .map(|c| crate::chat_template::strftime_fixed(&c[1], PROOF_DATE_JINJA))
        .collect();
    v.push(PROOF_DATE_JINJA.to_string());
    v.dedup();
    v
}

/// Render the Jinja template the way `apply_chat_template(..., add_generation_prompt=True)`
/// does.
pub fn render_jinja(src: &ChatSource, tpl: &ChatTemplate, conv: &Conversation) -> Result<String> {
    let mut extra = src.special.clone();
    if let Some(t) = &conv.tools {
        extra.insert("tools".into(), t.clone());
    }
    tpl.render(&conv.messages, true, &J::Object(extra))
}

fn go_tool(t: &J) -> J {
    // HF / OpenAI tool → Ollama api.Tool (Go field names)
    let f = t.get("function").unwrap_or(t);
    let p = f.get("parameters").cloned().unwrap_or(json!({}));
    let mut props = serde_json::Map::new();
    if let Some(J::Object(m)) = p.get("properties") {
        for (k, v) in m {
            let mut prop = serde_json::Map::new();
            if let Some(x) = v.get("type") {
                prop.insert("Type".into(), x.clone());
            }
            if let Some(x) = v.get("items") {
                prop.insert("Items".into(), x.clone());
            }
            if let Some(x) = v.get("description") {
                prop.insert("Description".into(), x.clone());
            }
            if let Some(x) = v.get("enum") {
                prop.insert("Enum".into(), x.clone());
            }
            props.insert(k.clone(), J::Object(prop));
        }
    }
    json!({
        "Type": t.get("type").cloned().unwrap_or(json!("function")),
        "Function": {
            "Name": f.get("name").cloned().unwrap_or(json!("")),
            "Description": f.get("description").cloned().unwrap_or(json!("")),
            "Parameters": {
                "Type": p.get("type").cloned().unwrap_or(json!("object")),
                "Required": p.get("required").cloned().unwrap_or(json!([])),
                "Properties": J::Object(props),
            }
        }
    })
}

fn go_message(m: &J) -> J {
    let mut calls = Vec::new();
    if let Some(J::Array(tc)) = m.get("tool_calls") {
        for (i, c) in tc.iter().enumerate() {
            let f = c.get("function").unwrap_or(c);
            calls.push(json!({"Function": {
                "Index": i,
                "Name": f.get("name").cloned().unwrap_or(json!("")),
                "Arguments": f.get("arguments").cloned().unwrap_or(json!({})),
            }}));
        }
    }
    json!({
        "Role": m.get("role").cloned().unwrap_or(json!("")),
        "Content": m.get("content").cloned().unwrap_or(json!("")),
        "Thinking": "",
        "ToolCalls": calls,
        "ToolName": m.get("name").cloned().unwrap_or(json!("")),
    })
}

/// What Ollama's chat endpoint renders for `messages` with a Messages-mode template: the
/// Modelfile's SYSTEM prepended when the conversation does not start with a system message,
/// consecutive same-role messages merged (tool messages aside), all system messages joined
/// into `.System`.
pub fn render_ollama(
    tpl: &GoTemplate,
    messages: &J,
    tools: Option<&J>,
    default_system: Option<&str>,
    env: &Env,
) -> Result<String> {
    if !tpl.uses("Messages") {
        bail!("the template does not use .Messages (not a Messages-mode template)");
    }
    let mut msgs: Vec<J> = messages
        .as_array()
        .ok_or_else(|| anyhow!("messages must be a list"))?
        .clone();
    if let Some(s) = default_system.filter(|s| !s.is_empty())
        && !msgs.is_empty()
        && msgs[0].get("role").and_then(J::as_str) != Some("system")
    {
        msgs.insert(0, json!({"role": "system", "content": s}));
    }
    let mut system = Vec::new();
    let mut collated: Vec<J> = Vec::new();
    for m in &msgs {
        let role = m.get("role").and_then(J::as_str).unwrap_or("");
        let content = m.get("content").and_then(J::as_str).unwrap_or("");
        if role == "system" {
            system.push(content.to_string());
        }
        if let Some(last) = collated.last_mut()
            && last["Role"] == role
            && role != "tool"
        {
            let c = format!("{}\n\n{}", last["Content"].as_str().unwrap_or(""), content);
            last["Content"] = J::from(c);
            continue;
        }
        collated.push(go_message(m));
    }
    let tools: Vec<J> = tools
        .and_then(J::as_array)
        .map(|a| a.iter().map(go_tool).collect())
        .unwrap_or_default();
    let data = json!({
        "System": system.join("\n\n"),
        "Messages": collated,
        "Tools": tools,
        "Response": "",
        "Think": false,
        "ThinkLevel": "",
        "IsThinkSet": false,
    });
    tpl.execute(&data, env)
}

/// Replace every JSON object or array embedded in `s` by its canonical form (sorted keys,
/// compact), so tool lists compare by content whatever the serializer's layout.
pub fn canonical_json_text(s: &str) -> String {
    fn canon(v: &J, out: &mut String) {
        match v {
            J::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                out.push('{');
                for (i, k) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&serde_json::to_string(k).unwrap());
                    out.push(':');
                    canon(&m[k], out);
                }
                out.push('}');
            }
            J::Array(a) => {
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    canon(x, out);
                }
                out.push(']');
            }
            other => out.push_str(&serde_json::to_string(other).unwrap()),
        }
    }
    let mut out = String::new();
    let mut i = 0;
    while i < s.len() {
        let c = s[i..].chars().next().unwrap();
        if c == '{' || c == '[' {
            let mut it = serde_json::Deserializer::from_str(&s[i..]).into_iter::<J>();
            if let Some(Ok(v)) = it.next()
                && (v.is_object() || v.as_array().is_some_and(|a| !a.is_empty()))
            {
                canon(&v, &mut out);
                i += it.byte_offset();
                continue;
            }
        }
        out.push(c);
        i += c.len_utf8();
    }
    out
}

/// The first difference between two texts, for messages.
pub fn first_difference(expected: &str, got: &str) -> String {
    let n = expected
        .char_indices()
        .zip(got.chars())
        .find(|((_, a), b)| a != b)
        .map(|((i, _), _)| i)
        .unwrap_or_else(|| expected.len().min(got.len()));
    let n = (0..=n)
        .rev()
        .find(|&k| expected.is_char_boundary(k) && got.is_char_boundary(k))
        .unwrap_or(0);
    let ctx = |s: &str| -> String {
        let start = (0..=n.saturating_sub(20))
            .rev()
            .find(|&k| s.is_char_boundary(k))
            .unwrap_or(0);
        let end = (n + 40).min(s.len());
        let end = (end..=s.len())
            .find(|&k| s.is_char_boundary(k))
            .unwrap_or(s.len());
        format!("{:?}", &s[start..end])
    };
    format!(
        "at byte {n}: the chat template gives …{}…, the Ollama template gives …{}…",
        ctx(expected),
        ctx(got)
    )
}

/// Marker used to find where a template puts the system prompt.
const SYSTEM_PROBE: &str = "\u{2603}FTCONV-SYSTEM\u{2603}";

/// The system prompt the template writes when the conversation has none (e.g. Qwen2.5's
/// "You are Qwen, created by Alibaba Cloud…", SmolLM2's "You are a helpful AI assistant named
/// SmolLM…"): what stands, in the render without a system message, where the render with one
/// has the system text.
pub fn default_system(src: &ChatSource, tpl: &ChatTemplate) -> Option<String> {
    let user = json!({"role": "user", "content": "Hello."});
    let conv = |messages: J| Conversation {
        name: "probe",
        messages,
        tools: None,
    };
    let with = render_jinja(
        src,
        tpl,
        &conv(json!([{"role": "system", "content": SYSTEM_PROBE}, user])),
    )
    .ok()?;
    let without = render_jinja(src, tpl, &conv(json!([user]))).ok()?;
    let at = with.find(SYSTEM_PROBE)?;
    let p = with
        .bytes()
        .zip(without.bytes())
        .take_while(|(a, b)| a == b)
        .count();
    if p < at {
        return None;
    }
    let after = &with[at + SYSTEM_PROBE.len()..];
    let rest = &without[at..];
    let s = after
        .bytes()
        .rev()
        .zip(rest.bytes().rev())
        .take_while(|(a, b)| a == b)
        .count();
    let d = &rest[..rest.len() - s];
    // a default that writes today's date (Granite's "Today's Date: …") stays in the TEMPLATE,
    // where Ollama's currentDate fills it in; a SYSTEM line would freeze the proof date
    if proof_dates_in(&src.template)
        .iter()
        .any(|date| src.template.contains("strftime_now") && d.contains(date.as_str()))
    {
        return None;
    }
    (!d.is_empty() && without.is_char_boundary(at + d.len())).then(|| d.to_string())
}

/// How a variant fared against the source template.
#[derive(Debug, Clone)]
pub struct Proof {
    pub matched: Vec<&'static str>,
    /// Conversations the chat template refuses (e.g. Gemma with a system message).
    pub skipped: Vec<(&'static str, String)>,
    /// The first mismatch: conversation name and description.
    pub mismatch: Option<(&'static str, String)>,
}

impl Proof {
    pub fn passed(&self) -> bool {
        self.mismatch.is_none() && self.matched.iter().any(|n| !n.starts_with("tools"))
    }
}

/// Render every canned conversation both ways and compare (tools conversations only when
/// `with_tools`; their JSON compared by content).
pub fn prove(
    src: &ChatSource,
    tpl: &ChatTemplate,
    go_text: &str,
    system: Option<&str>,
    with_tools: bool,
) -> Result<Proof> {
    let go = GoTemplate::parse(go_text).map_err(|e| anyhow!("Go template: {e}"))?;
    let env = Env {
        current_date: PROOF_DATE_ISO.into(),
        yesterday_date: "2026-11-21".into(),
    };
    let mut proof = Proof {
        matched: Vec::new(),
        skipped: Vec::new(),
        mismatch: None,
    };
    for conv in canned_conversations() {
        if conv.tools.is_some() && !with_tools {
            continue;
        }
        let mut expected = match render_jinja(src, tpl, &conv) {
            Ok(s) => s,
            Err(e) => {
                proof.skipped.push((conv.name, format!("{e:#}")));
                continue;
            }
        };
        if let Some(b) = src.bos()
            && src.template.contains("bos_token")
            && let Some(rest) = expected.strip_prefix(b)
        {
            expected = rest.to_string();
        }
        if go.uses("currentDate") {
            for d in proof_dates_in(&src.template) {
                expected = expected.replace(&d, PROOF_DATE_ISO);
            }
        }
        let got = match render_ollama(&go, &conv.messages, conv.tools.as_ref(), system, &env) {
            Ok(s) => s,
            Err(e) => {
                proof.mismatch = Some((conv.name, format!("the Ollama template fails: {e:#}")));
                return Ok(proof);
            }
        };
        let same = if conv.tools.is_some() {
            canonical_json_text(&expected) == canonical_json_text(&got)
                && got.contains("get_current_weather")
        } else {
            expected == got
        };
        if same {
            proof.matched.push(conv.name);
        } else {
            let d = if conv.tools.is_some() {
                first_difference(&canonical_json_text(&expected), &canonical_json_text(&got))
            } else {
                first_difference(&expected, &got)
            };
            proof.mismatch = Some((conv.name, d));
            return Ok(proof);
        }
    }
    Ok(proof)
}

/// The Modelfile TEMPLATE and SYSTEM derived from a chat template.
#[derive(Debug, Clone)]
pub struct Derived {
    pub family: Family,
    pub variant: Variant,
    pub template: String,
    /// Default system prompt the chat template hard-codes.
    pub system: Option<String>,
    pub proof: Proof,
    /// Things the user should know (date format, tools not reproduced, forced output).
    pub notes: Vec<String>,
    /// Set when the proof failed and `force` wrote it anyway.
    pub unverified: Option<String>,
}

/// Detect the family, pick the first variant that renders like the chat template, and return
/// it. A template no variant reproduces is an error naming the family and the first differing
/// conversation, unless `force` (then the family's first variant, marked unverified).
pub fn derive(src: &ChatSource, force: bool) -> Result<Derived> {
    let tpl = ChatTemplate::new(&src.template)
        .map_err(|e| anyhow!("{}: chat template: {e:#}", src.origin))?;
    let has_tools = families::source_has_tools(&src.template);
    let date = families::date_source(&src.template);
    let system = default_system(src, &tpl);
    let detected = families::detect(&src.template);
    let candidates: Vec<Family> = match &detected {
        Some(f) => vec![f.clone()],
        None => families::families(),
    };
    let mut first_failure: Option<(Family, Variant, String, Proof)> = None;
    for fam in &candidates {
        let mut variants: Vec<&Variant> = fam.variants.iter().filter(|v| v.tools).collect();
        if !has_tools {
            variants.clear();
        }
        variants.extend(fam.variants.iter().filter(|v| !v.tools));
        for v in variants {
            let eos = src.special.get("eos_token").and_then(J::as_str);
            let text = match families::variant_text(v, &date, eos) {
                Ok(t) => t,
                Err(_) => continue,
            };
            let proof = prove(src, &tpl, &text, system.as_deref(), v.tools)?;
            if proof.passed() {
                let mut notes = Vec::new();
                if has_tools && !v.tools {
                    notes.push(format!(
                        "the chat template handles tools but no {} tool section reproduces it: the Modelfile has none, so Ollama will refuse tool calls",
                        fam.title
                    ));
                }
                if text.contains("currentDate") {
                    notes.push(format!(
                        "the chat template writes today's date as {:?}; Ollama's currentDate writes it as {PROOF_DATE_ISO:?} (the only difference allowed)",
                        proof_dates_in(&src.template)[0]
                    ));
                }
                if detected.is_none() {
                    notes.push(format!(
                        "no family markers found; {} matched by rendering",
                        fam.title
                    ));
                }
                return Ok(Derived {
                    family: fam.clone(),
                    variant: v.clone(),
                    template: text,
                    system,
                    proof,
                    notes,
                    unverified: None,
                });
            }
            if first_failure.is_none() && detected.is_some() {
                first_failure = Some((fam.clone(), v.clone(), text, proof));
            }
        }
    }
    let Some((fam, v, text, proof)) = first_failure else {
        bail!(
            "{}: the chat template matches no known family (ChatML, Llama 2/3, Mistral, Gemma, Phi-3, Zephyr, Alpaca, Vicuna); ftconv writes no unverified {{{{ .Prompt }}}} template",
            src.origin
        );
    };
    let why = match &proof.mismatch {
        Some((conv, d)) => format!("first difference in conversation '{conv}' {d}"),
        None => format!(
            "the chat template refuses every canned conversation ({})",
            proof.skipped.first().map(|(_, e)| e.as_str()).unwrap_or("")
        ),
    };
    let msg = format!(
        "{}: detected template family {} (variant {}) does not reproduce the chat template: {why}",
        src.origin, fam.title, v.name
    );
    if !force {
        bail!("{msg} (--force writes it anyway)");
    }
    Ok(Derived {
        family: fam,
        variant: v,
        template: text,
        system,
        proof,
        notes: Vec::new(),
        unverified: Some(msg),
    })
}

/// What the Modelfile says besides the template.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// FROM, relative to the Modelfile's folder.
    pub from: String,
    pub adapter: Option<String>,
    /// `--system`: replaces the default system prompt of the chat template.
    pub system: Option<String>,
    /// `--param NAME=VALUE` (checked): replace derived values of that name; `stop` adds.
    pub params: Vec<(String, String)>,
    pub license: Option<String>,
    /// Describes the model in the header comment.
    pub source_label: String,
    pub force: bool,
}

/// A Modelfile and what went into it.
#[derive(Debug, Clone)]
pub struct Built {
    pub modelfile: modelfile::Modelfile,
    pub derived: Derived,
    pub notes: Vec<String>,
}

/// Derive the template and assemble the Modelfile: TEMPLATE (proved), SYSTEM (the chat
/// template's default or `--system`), stops = the family's turn markers ∪ the tokenizer's EOS
/// tokens, sampling parameters from generation_config.json, `--param`s, LICENSE.
pub fn build(info: &source::ModelInfo, opts: &Options) -> Result<Built> {
    let chat = info
        .chat
        .as_ref()
        .ok_or_else(|| anyhow!("{}: no chat template", opts.source_label))?;
    let derived = derive(chat, opts.force)?;
    let mut notes = derived.notes.clone();
    for (n, v) in &opts.params {
        modelfile::check_parameter(n, v)?;
    }
    let mut stops: Vec<String> = Vec::new();
    for s in derived.family.stops.iter().chain(&info.eos) {
        if !s.is_empty() && !stops.contains(s) {
            stops.push(s.clone());
        }
    }
    if info.add_bos == Some(false)
        && let Some(b) = chat.bos()
        && chat.template.contains("bos_token")
    {
        notes.push(format!(
            "the chat template writes BOS ({b}) but the tokenizer does not add it (add_bos_token false), and Modelfile templates carry no BOS: the model will run without it"
        ));
    }
    for id in &info.unnamed_eos_ids {
        notes.push(format!(
            "eos token id {id} has no token string in the tokenizer files: not in the stop list"
        ));
    }
    let mut params: Vec<(String, String)> = Vec::new();
    let user_stops: Vec<&String> = opts
        .params
        .iter()
        .filter(|(n, _)| n == "stop")
        .map(|(_, v)| v)
        .collect();
    for s in stops.iter().chain(user_stops) {
        if !params.iter().any(|(n, v)| n == "stop" && v == s) {
            params.push(("stop".into(), s.clone()));
        }
    }
    if let Some(gc) = &info.generation_config {
        let (sp, n) = source::sampling_parameters(gc);
        notes.extend(n);
        params.extend(sp);
    }
    for (n, v) in opts.params.iter().filter(|(n, _)| n != "stop") {
        params.retain(|(m, _)| m != n);
        params.push((n.clone(), v.clone()));
    }
    let mut comments = vec![
        format!("Modelfile written by ftconv {}", env!("CARGO_PKG_VERSION")),
        format!("source: {}", opts.source_label.replace(['\n', '\r'], " ")),
    ];
    match &derived.unverified {
        None => comments.push(format!(
            "template: {} (variant {}), render-verified against {} on {} conversations",
            derived.family.title,
            derived.variant.name,
            chat.origin.replace(['\n', '\r'], " "),
            derived.proof.matched.len()
        )),
        Some(_) => comments.push(format!(
            "template: {} (variant {}), NOT verified: written with --force, it does not render like the chat template",
            derived.family.title, derived.variant.name
        )),
    }
    for s in &derived.proof.skipped {
        comments.push(format!(
            "not compared: conversation '{}' (the chat template refuses it)",
            s.0
        ));
    }
    for n in &notes {
        comments.push(format!("note: {}", n.replace(['\n', '\r'], " ")));
    }
    let system = opts.system.clone().or(derived.system.clone());
    let modelfile = modelfile::Modelfile {
        comments,
        from: opts.from.clone(),
        adapter: opts.adapter.clone(),
        template: Some(derived.template.clone()),
        system,
        parameters: params,
        license: opts
            .license
            .iter()
            .map(|l| l.replace("\r\n", "\n"))
            .collect(),
    };
    Ok(Built {
        modelfile,
        derived,
        notes,
    })
}
