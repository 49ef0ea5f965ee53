//! Rendering Hugging Face chat templates (Jinja) the way transformers' `apply_chat_template`
//! does: trim_blocks + lstrip_blocks, loop controls, Python string methods, `raise_exception`,
//! `strftime_now`, and a `tojson` that writes what Python's `json.dumps(ensure_ascii=False)`
//! writes. Shared by `ftconv ollama` (proof by rendering) and `ftconv finetune` (data).

use anyhow::{Result, anyhow};
use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind};
use serde_json::Value as J;

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
}

/// Python `json.dumps` formatting of a JSON value.
pub fn py_json_dumps(v: &J, indent: Option<usize>, sort_keys: bool) -> String {
    let mut out = String::new();
    write_py_json(v, indent, sort_keys, 0, &mut out);
    out
}

fn write_py_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn write_py_json(v: &J, indent: Option<usize>, sort_keys: bool, level: usize, out: &mut String) {
    let (item_sep, key_sep) = if indent.is_some() {
        (",", ": ")
    } else {
        (", ", ": ")
    };
    let nl = |lvl: usize, out: &mut String| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * lvl));
        }
    };
    match v {
        J::Null => out.push_str("null"),
        J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        J::Number(n) => {
            if let Some(f) = n.as_f64().filter(|_| n.is_f64()) {
                if f.is_finite() && f == f.trunc() && f.abs() < 1e16 {
                    out.push_str(&format!("{f:.1}"));
                } else {
                    out.push_str(&format!("{f:?}"));
                }
            } else {
                out.push_str(&n.to_string());
            }
        }
        J::String(s) => write_py_str(s, out),
        J::Array(a) => {
            if a.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                nl(level + 1, out);
                write_py_json(x, indent, sort_keys, level + 1, out);
            }
            nl(level, out);
            out.push(']');
        }
        J::Object(m) => {
            if m.is_empty() {
                out.push_str("{}");
                return;
            }
            out.push('{');
            let mut keys: Vec<&String> = m.keys().collect();
            if sort_keys {
                keys.sort();
            }
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                nl(level + 1, out);
                write_py_str(k, out);
                out.push_str(key_sep);
                write_py_json(&m[k], indent, sort_keys, level + 1, out);
            }
            nl(level, out);
            out.push('}');
        }
    }
}

fn tojson(v: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let j: J = serde_json::to_value(&v)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    Ok(Value::from_safe_string(py_json_dumps(
        &j,
        indent,
        sort_keys.unwrap_or(false),
    )))
}

impl ChatTemplate {
    pub fn new(source: &str) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| anyhow!("{e}"))?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("template raised: {msg}"),
            ))
        });
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| anyhow!("chat template does not compile: {e}"))?;
        Ok(ChatTemplate { env })
    }

    /// Render `messages` with the usual context variables (`bos_token`, `eos_token`, …) given
    /// in `extra` (a JSON object). `date` (e.g. "22 Nov 2026") fixes `strftime_now`.
    pub fn render(&self, messages: &J, add_generation_prompt: bool, extra: &J) -> Result<String> {
        let mut ctx = serde_json::Map::new();
        if let J::Object(m) = extra {
            for (k, v) in m {
                ctx.insert(k.clone(), v.clone());
            }
        }
        ctx.insert("messages".into(), messages.clone());
        ctx.insert(
            "add_generation_prompt".into(),
            J::Bool(add_generation_prompt),
        );
        let date = ctx
            .get("date_string")
            .and_then(J::as_str)
            .unwrap_or("22 Nov 2026")
            .to_string();
        let mut env = self.env.clone();
        env.add_function("strftime_now", move |fmt: String| -> Result<Value, Error> {
            Ok(Value::from(strftime_fixed(&fmt, &date)))
        });
        let t = env.get_template("chat").map_err(|e| anyhow!("{e}"))?;
        t.render(Value::from(minijinja::value::Serde(&ctx)))
            .map_err(|e| {
                let mut msg = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    msg.push_str(&format!(": {s}"));
                    src = s.source();
                }
                anyhow!("chat template failed: {msg}")
            })
    }
}

/// `strftime` for a fixed date given as "DD Mon YYYY" (enough for chat templates: %d %b %B
/// %Y %m %y %-d).
pub fn strftime_fixed(fmt: &str, date: &str) -> String {
    let parts: Vec<&str> = date.split_whitespace().collect();
    let (d, mon, y) = match parts.as_slice() {
        [d, m, y] => (*d, *m, *y),
        _ => ("22", "Nov", "2026"),
    };
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let mi = MONTHS.iter().position(|m| m.starts_with(mon)).unwrap_or(10);
    let dn: u32 = d.parse().unwrap_or(22);
    let mut out = String::new();
    let mut it = fmt.chars().peekable();
    while let Some(c) = it.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut spec = it.next().unwrap_or('%');
        let no_pad = spec == '-';
        if no_pad {
            spec = it.next().unwrap_or('d');
        }
        match spec {
            'd' if no_pad => out.push_str(&dn.to_string()),
            'd' => out.push_str(&format!("{dn:02}")),
            'b' => out.push_str(&MONTHS[mi][..3]),
            'B' => out.push_str(MONTHS[mi]),
            'm' => out.push_str(&format!("{:02}", mi + 1)),
            'Y' => out.push_str(y),
            'y' => out.push_str(&y[y.len().saturating_sub(2)..]),
            '%' => out.push('%'),
            other => {
                out.push('%');
                out.push(other);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn chatml_renders() {
        let t = ChatTemplate::new(
            "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'].strip() + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
        )
        .unwrap();
        let s = t
            .render(
                &json!([{"role": "user", "content": " Hi "}]),
                true,
                &json!({}),
            )
            .unwrap();
        assert_eq!(s, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn python_json() {
        let v = json!({"a": 1, "b": [true, null, 2.5, 3.0], "c": "é\n\"", "d": {}});
        assert_eq!(
            py_json_dumps(&v, None, false),
            r#"{"a": 1, "b": [true, null, 2.5, 3.0], "c": "é\n\"", "d": {}}"#
        );
        assert_eq!(
            py_json_dumps(&json!({"x": [1]}), Some(2), false),
            "{\n  \"x\": [\n    1\n  ]\n}"
        );
    }

    #[test]
    fn raise_and_date() {
        let t = ChatTemplate::new("{{ raise_exception('no system') }}").unwrap();
        assert!(
            t.render(&json!([]), false, &json!({}))
                .unwrap_err()
                .to_string()
                .contains("no system")
        );
        assert_eq!(strftime_fixed("%d %b %Y", "22 Nov 2026"), "22 Nov 2026");
        assert_eq!(strftime_fixed("%-d %B", "02 Jan 2025"), "2 January");
    }
}
