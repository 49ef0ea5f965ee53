//! An embedded renderer for the subset of Go's `text/template` that Ollama templates use, with
//! the functions Ollama adds (`json`, `currentDate`, `yesterdayDate`).
//!
//! Supported: text and actions with `{{-` / `-}}` trimming, comments, fields (`.A.B`, `$.A`,
//! `$x.A`, `(pipeline).A`), variables (`$x := …`, `$x = …`), pipelines with `|`, parentheses,
//! string / raw string / number / bool / nil literals, `if` / `else if` / `else`, `range`
//! (with `$i, $e :=`, over lists, maps and ints, with `else`), `with`, `break`, `continue`,
//! and the builtins `and or not eq ne lt le gt ge len index slice print`.
//! Data is a JSON value whose object keys are Go field names (`Role`, `Content`, …).
//! Semantics follow Go: truthiness of zero values, short-circuit `and`/`or` returning an
//! operand, `eq` against several values, variables scoped to their block, missing map keys
//! giving the zero value.

use anyhow::{Result, anyhow, bail};
use serde_json::Value as J;

#[derive(Debug, Clone)]
enum Node {
    Text(String),
    Action(Pipeline),
    If(Vec<(Pipeline, Vec<Node>)>, Vec<Node>),
    Range {
        pipe: Pipeline,
        body: Vec<Node>,
        else_: Vec<Node>,
    },
    With(Vec<(Pipeline, Vec<Node>)>, Vec<Node>),
    Break,
    Continue,
}

#[derive(Debug, Clone)]
struct Pipeline {
    decl: Vec<String>,
    assign: bool,
    cmds: Vec<Vec<Arg>>,
}

#[derive(Debug, Clone)]
enum Arg {
    Dot(Vec<String>),
    Var(String, Vec<String>),
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Nil,
    Ident(String),
    Sub(Box<Pipeline>, Vec<String>),
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    LParen,
    RParen,
    Pipe,
    Declare,
    Assign,
    Comma,
    Str(String),
    Num(String),
    Ident(String),
    Field(Vec<String>),
    /// fields right after `)`: `(index .M 0).Role`
    Chain(Vec<String>),
    Var(String, Vec<String>),
}

/// A parsed template.
#[derive(Debug, Clone)]
pub struct GoTemplate {
    nodes: Vec<Node>,
    uses: Vec<String>,
}

/// Functions whose results depend on the world: the date (fixed for proofs).
#[derive(Debug, Clone)]
pub struct Env {
    /// YYYY-MM-DD returned by `currentDate`.
    pub current_date: String,
    /// YYYY-MM-DD returned by `yesterdayDate`.
    pub yesterday_date: String,
}

impl Default for Env {
    fn default() -> Self {
        Env {
            current_date: "2026-11-22".into(),
            yesterday_date: "2026-11-21".into(),
        }
    }
}

fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\n')
}

// ------------------------------------------------------------------ lexing

enum Piece {
    Text(String),
    Action(Vec<Tok>, usize),
}

fn lex_action(src: &str, start: usize) -> Result<(Vec<Tok>, usize, bool)> {
    // returns tokens, index just past `}}`, and whether `-}}` trimmed
    let b = src.as_bytes();
    let mut i = start;
    let mut toks = Vec::new();
    let ident = |i: &mut usize| -> String {
        let s = *i;
        while *i < b.len() && (b[*i].is_ascii_alphanumeric() || b[*i] == b'_') {
            *i += 1;
        }
        src[s..*i].to_string()
    };
    let fields = |i: &mut usize| -> Vec<String> {
        let mut f = Vec::new();
        while *i + 1 < b.len()
            && b[*i] == b'.'
            && (b[*i + 1].is_ascii_alphabetic() || b[*i + 1] == b'_')
        {
            *i += 1;
            let s = *i;
            while *i < b.len() && (b[*i].is_ascii_alphanumeric() || b[*i] == b'_') {
                *i += 1;
            }
            f.push(src[s..*i].to_string());
        }
        f
    };
    loop {
        if i >= b.len() {
            bail!("unclosed action starting at byte {start}");
        }
        let c = b[i];
        if c == b' ' || c == b'\t' || c == b'\r' || c == b'\n' {
            if src[i..]
                .trim_start_matches([' ', '\t', '\r', '\n'])
                .starts_with("-}}")
            {
                let j = src.len() - src[i..].trim_start_matches([' ', '\t', '\r', '\n']).len();
                return Ok((toks, j + 3, true));
            }
            i += 1;
            continue;
        }
        if src[i..].starts_with("}}") {
            return Ok((toks, i + 2, false));
        }
        match c {
            b'(' => {
                toks.push(Tok::LParen);
                i += 1;
            }
            b')' => {
                toks.push(Tok::RParen);
                i += 1;
                let f = fields(&mut i);
                if !f.is_empty() {
                    toks.push(Tok::Chain(f));
                }
            }
            b'|' => {
                toks.push(Tok::Pipe);
                i += 1;
            }
            b',' => {
                toks.push(Tok::Comma);
                i += 1;
            }
            b':' if b.get(i + 1) == Some(&b'=') => {
                toks.push(Tok::Declare);
                i += 2;
            }
            b'=' => {
                toks.push(Tok::Assign);
                i += 1;
            }
            b'"' => {
                let mut s = String::new();
                i += 1;
                loop {
                    let Some(ch) = src[i..].chars().next() else {
                        bail!("unterminated string in action at byte {start}");
                    };
                    i += ch.len_utf8();
                    match ch {
                        '"' => break,
                        '\n' => bail!("newline in string in action at byte {start}"),
                        '\\' => {
                            let Some(e) = src[i..].chars().next() else {
                                bail!("unterminated string in action at byte {start}");
                            };
                            i += e.len_utf8();
                            match e {
                                'n' => s.push('\n'),
                                't' => s.push('\t'),
                                'r' => s.push('\r'),
                                'a' => s.push('\u{7}'),
                                'b' => s.push('\u{8}'),
                                'f' => s.push('\u{c}'),
                                'v' => s.push('\u{b}'),
                                '\\' => s.push('\\'),
                                '"' => s.push('"'),
                                '\'' => s.push('\''),
                                'x' | 'u' | 'U' => {
                                    let n = match e {
                                        'x' => 2,
                                        'u' => 4,
                                        _ => 8,
                                    };
                                    let h = src
                                        .get(i..i + n)
                                        .ok_or_else(|| anyhow!("bad escape in string"))?;
                                    let v = u32::from_str_radix(h, 16)
                                        .map_err(|_| anyhow!("bad escape \\{e}{h} in string"))?;
                                    s.push(
                                        char::from_u32(v)
                                            .ok_or_else(|| anyhow!("bad escape \\{e}{h}"))?,
                                    );
                                    i += n;
                                }
                                other => bail!("unsupported escape \\{other} in string"),
                            }
                        }
                        ch => s.push(ch),
                    }
                }
                toks.push(Tok::Str(s));
            }
            b'`' => {
                let rest = &src[i + 1..];
                let end = rest
                    .find('`')
                    .ok_or_else(|| anyhow!("unterminated raw string at byte {start}"))?;
                toks.push(Tok::Str(rest[..end].replace('\r', "")));
                i += end + 2;
            }
            b'$' => {
                i += 1;
                let name = format!("${}", ident(&mut i));
                let f = fields(&mut i);
                toks.push(Tok::Var(name, f));
            }
            b'.' => {
                let f = fields(&mut i);
                if f.is_empty() {
                    i += 1;
                }
                toks.push(Tok::Field(f));
            }
            c if c.is_ascii_digit() || c == b'-' || c == b'+' => {
                let s = i;
                i += 1;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.' || b[i] == b'_')
                {
                    i += 1;
                }
                toks.push(Tok::Num(src[s..i].to_string()));
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let s = ident(&mut i);
                toks.push(Tok::Ident(s));
            }
            _ => bail!(
                "unexpected character {:?} in action at byte {i}",
                src[i..].chars().next().unwrap_or(' ')
            ),
        }
    }
}

fn lex(src: &str) -> Result<Vec<Piece>> {
    let mut out = Vec::new();
    let mut pos = 0;
    let mut trim_next = false;
    while pos <= src.len() {
        let open = src[pos..].find("{{").map(|o| pos + o);
        let text_end = open.unwrap_or(src.len());
        let mut text = &src[pos..text_end];
        if trim_next {
            text = text.trim_start_matches(is_space);
        }
        let Some(open) = open else {
            if !text.is_empty() {
                out.push(Piece::Text(text.to_string()));
            }
            break;
        };
        let mut inner = open + 2;
        let trim_left =
            src[inner..].starts_with('-') && src[inner + 1..].starts_with(|c: char| is_space(c));
        if trim_left {
            text = text.trim_end_matches(is_space);
            inner += 1;
        }
        if !text.is_empty() {
            out.push(Piece::Text(text.to_string()));
        }
        // comment
        let after_ws = src[inner..].trim_start_matches(is_space);
        if after_ws.starts_with("/*") {
            let cstart = src.len() - after_ws.len();
            let cend = src[cstart..]
                .find("*/")
                .map(|e| cstart + e + 2)
                .ok_or_else(|| anyhow!("unclosed comment at byte {open}"))?;
            let rest = &src[cend..];
            let (end, trim) = if let Some(r) = rest.strip_prefix(" -}}") {
                (src.len() - r.len(), true)
            } else if let Some(r) = rest.strip_prefix("}}") {
                (src.len() - r.len(), false)
            } else {
                bail!("comment at byte {open} must end with */}}}}");
            };
            pos = end;
            trim_next = trim;
            continue;
        }
        let (toks, end, trim) = lex_action(src, inner)?;
        out.push(Piece::Action(toks, open));
        pos = end;
        trim_next = trim;
    }
    Ok(out)
}

// ------------------------------------------------------------------ parsing

struct Parser {
    pieces: Vec<Piece>,
    pos: usize,
}

enum Stop {
    End,
    Else(Vec<Tok>),
    Eof,
}

fn parse_args(toks: &[Tok], i: &mut usize, at: usize) -> Result<Vec<Arg>> {
    let mut args = Vec::new();
    while *i < toks.len() {
        let a = match &toks[*i] {
            Tok::Pipe | Tok::RParen => break,
            Tok::LParen => {
                *i += 1;
                let p = parse_pipeline_toks(toks, i, at, true)?;
                if toks.get(*i) != Some(&Tok::RParen) {
                    bail!("missing ) in action at byte {at}");
                }
                let fields = match toks.get(*i + 1) {
                    Some(Tok::Chain(f)) => {
                        *i += 1;
                        f.clone()
                    }
                    _ => Vec::new(),
                };
                Arg::Sub(Box::new(p), fields)
            }
            Tok::Str(s) => Arg::Str(s.clone()),
            Tok::Num(n) => {
                if let Ok(v) = n.parse::<i64>() {
                    Arg::Int(v)
                } else if let Ok(v) = n.parse::<f64>() {
                    Arg::Float(v)
                } else {
                    bail!("bad number {n} in action at byte {at}")
                }
            }
            Tok::Ident(s) => match s.as_str() {
                "true" => Arg::Bool(true),
                "false" => Arg::Bool(false),
                "nil" => Arg::Nil,
                _ => Arg::Ident(s.clone()),
            },
            Tok::Field(f) => Arg::Dot(f.clone()),
            Tok::Var(v, f) => Arg::Var(v.clone(), f.clone()),
            t => bail!("unexpected {t:?} in action at byte {at}"),
        };
        args.push(a);
        *i += 1;
    }
    Ok(args)
}

fn parse_pipeline_toks(toks: &[Tok], i: &mut usize, at: usize, nested: bool) -> Result<Pipeline> {
    let mut decl = Vec::new();
    let mut assign = false;
    // declarations: $x := / $x = / $i, $e :=
    let mut j = *i;
    let mut names = Vec::new();
    while let Some(Tok::Var(v, f)) = toks.get(j) {
        if !f.is_empty() {
            break;
        }
        names.push(v.clone());
        j += 1;
        if toks.get(j) == Some(&Tok::Comma) {
            j += 1;
            continue;
        }
        break;
    }
    if !names.is_empty() && !nested {
        match toks.get(j) {
            Some(Tok::Declare) => {
                decl = names;
                *i = j + 1;
            }
            Some(Tok::Assign) => {
                decl = names;
                assign = true;
                *i = j + 1;
            }
            _ => {}
        }
    }
    let mut cmds = Vec::new();
    loop {
        let args = parse_args(toks, i, at)?;
        if args.is_empty() {
            bail!("empty command in action at byte {at}");
        }
        cmds.push(args);
        if toks.get(*i) == Some(&Tok::Pipe) {
            *i += 1;
            continue;
        }
        break;
    }
    Ok(Pipeline { decl, assign, cmds })
}

fn parse_pipeline(toks: &[Tok], at: usize) -> Result<Pipeline> {
    let mut i = 0;
    let p = parse_pipeline_toks(toks, &mut i, at, false)?;
    if i != toks.len() {
        bail!("unexpected {:?} in action at byte {at}", toks[i]);
    }
    Ok(p)
}

impl Parser {
    fn list(&mut self) -> Result<(Vec<Node>, Stop)> {
        let mut nodes = Vec::new();
        while self.pos < self.pieces.len() {
            let i = self.pos;
            self.pos += 1;
            match &self.pieces[i] {
                Piece::Text(t) => nodes.push(Node::Text(t.clone())),
                Piece::Action(toks, at) => {
                    let at = *at;
                    let toks = toks.clone();
                    let kw = match toks.first() {
                        Some(Tok::Ident(k)) => k.as_str(),
                        _ => "",
                    };
                    match kw {
                        "end" => return Ok((nodes, Stop::End)),
                        "else" => return Ok((nodes, Stop::Else(toks[1..].to_vec()))),
                        "if" | "with" => {
                            let n = self.conditional(&toks[1..], at, kw == "with")?;
                            nodes.push(n);
                        }
                        "range" => {
                            let pipe = parse_pipeline(&toks[1..], at)?;
                            let (body, stop) = self.list()?;
                            let else_ = match stop {
                                Stop::End => Vec::new(),
                                Stop::Else(t) if t.is_empty() => {
                                    let (e, stop) = self.list()?;
                                    if !matches!(stop, Stop::End) {
                                        bail!("range at byte {at}: missing end");
                                    }
                                    e
                                }
                                _ => bail!("range at byte {at}: missing end"),
                            };
                            nodes.push(Node::Range { pipe, body, else_ });
                        }
                        "break" => nodes.push(Node::Break),
                        "continue" => nodes.push(Node::Continue),
                        "define" | "template" | "block" => {
                            bail!("{{{{{kw}}}}} at byte {at} is not supported")
                        }
                        _ => nodes.push(Node::Action(parse_pipeline(&toks, at)?)),
                    }
                }
            }
        }
        Ok((nodes, Stop::Eof))
    }

    fn conditional(&mut self, toks: &[Tok], at: usize, with: bool) -> Result<Node> {
        let mut branches = vec![(parse_pipeline(toks, at)?, Vec::new())];
        loop {
            let (body, stop) = self.list()?;
            branches.last_mut().unwrap().1 = body;
            match stop {
                Stop::End => break,
                Stop::Eof => bail!("action at byte {at}: missing end"),
                Stop::Else(t) if t.is_empty() => {
                    let (e, stop) = self.list()?;
                    if !matches!(stop, Stop::End) {
                        bail!("action at byte {at}: missing end");
                    }
                    return Ok(if with {
                        Node::With(branches, e)
                    } else {
                        Node::If(branches, e)
                    });
                }
                Stop::Else(t) => {
                    let kw = if with { "with" } else { "if" };
                    if t.first() != Some(&Tok::Ident(kw.into())) {
                        bail!("action at byte {at}: else must be followed by {kw}");
                    }
                    branches.push((parse_pipeline(&t[1..], at)?, Vec::new()));
                }
            }
        }
        Ok(if with {
            Node::With(branches, Vec::new())
        } else {
            Node::If(branches, Vec::new())
        })
    }
}

fn collect_uses(nodes: &[Node], out: &mut Vec<String>) {
    fn pipe(p: &Pipeline, out: &mut Vec<String>) {
        for c in &p.cmds {
            for a in c {
                match a {
                    Arg::Dot(f) | Arg::Var(_, f) => {
                        if let Some(x) = f.first() {
                            out.push(x.clone());
                        }
                    }
                    Arg::Ident(x) => out.push(x.clone()),
                    Arg::Sub(p, _) => pipe(p, out),
                    _ => {}
                }
            }
        }
    }
    for n in nodes {
        match n {
            Node::Action(p) => pipe(p, out),
            Node::If(b, e) | Node::With(b, e) => {
                for (p, body) in b {
                    pipe(p, out);
                    collect_uses(body, out);
                }
                collect_uses(e, out);
            }
            Node::Range {
                pipe: p,
                body,
                else_,
            } => {
                pipe(p, out);
                collect_uses(body, out);
                collect_uses(else_, out);
            }
            _ => {}
        }
    }
}

impl GoTemplate {
    pub fn parse(src: &str) -> Result<GoTemplate> {
        let pieces = lex(src)?;
        let mut p = Parser { pieces, pos: 0 };
        let (nodes, stop) = p.list()?;
        match stop {
            Stop::Eof => {}
            Stop::End => bail!("unexpected {{{{end}}}}"),
            Stop::Else(_) => bail!("unexpected {{{{else}}}}"),
        }
        let mut uses = Vec::new();
        collect_uses(&nodes, &mut uses);
        uses.sort();
        uses.dedup();
        Ok(GoTemplate { nodes, uses })
    }

    /// Whether the template refers to a field or function (`Messages`, `Tools`, `currentDate`).
    pub fn uses(&self, name: &str) -> bool {
        self.uses.iter().any(|u| u == name)
    }

    /// Execute with `data` as dot and `$`.
    pub fn execute(&self, data: &J, env: &Env) -> Result<String> {
        let mut ex = Exec {
            out: String::new(),
            vars: vec![("$".into(), data.clone())],
            env,
        };
        match ex.nodes(&self.nodes, data)? {
            Flow::Normal => Ok(ex.out),
            _ => bail!("break or continue outside range"),
        }
    }
}

// ------------------------------------------------------------------ execution

enum Flow {
    Normal,
    Break,
    Continue,
}

struct Exec<'e> {
    out: String,
    vars: Vec<(String, J)>,
    env: &'e Env,
}

pub fn truth(v: &J) -> bool {
    match v {
        J::Null => false,
        J::Bool(b) => *b,
        J::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        J::String(s) => !s.is_empty(),
        J::Array(a) => !a.is_empty(),
        J::Object(m) => !m.is_empty(),
    }
}

/// How Go's fmt prints a value in a template action.
fn print_value(v: &J) -> String {
    match v {
        J::Null => "<no value>".into(),
        J::String(s) => s.clone(),
        J::Bool(b) => b.to_string(),
        J::Number(n) => n.to_string(),
        J::Array(a) => format!(
            "[{}]",
            a.iter().map(print_value).collect::<Vec<_>>().join(" ")
        ),
        J::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            format!(
                "map[{}]",
                keys.iter()
                    .map(|k| format!("{k}:{}", print_value(&m[*k])))
                    .collect::<Vec<_>>()
                    .join(" ")
            )
        }
    }
}

fn field(v: &J, names: &[String]) -> Result<J> {
    let mut cur = v.clone();
    for n in names {
        cur = match &cur {
            J::Object(m) => m.get(n).cloned().unwrap_or(J::Null),
            J::Null => J::Null,
            other => bail!("can't evaluate field {n} in {}", type_name(other)),
        };
    }
    Ok(cur)
}

fn type_name(v: &J) -> &'static str {
    match v {
        J::Null => "nil",
        J::Bool(_) => "bool",
        J::Number(n) if n.is_f64() => "float64",
        J::Number(_) => "int",
        J::String(_) => "string",
        J::Array(_) => "slice",
        J::Object(_) => "map",
    }
}

fn values_equal(a: &J, b: &J) -> Result<bool> {
    Ok(match (a, b) {
        (J::Number(x), J::Number(y)) => {
            if x.is_f64() != y.is_f64() {
                bail!("incompatible types for comparison");
            }
            x.as_f64() == y.as_f64()
        }
        (J::String(x), J::String(y)) => x == y,
        (J::Bool(x), J::Bool(y)) => x == y,
        (J::Null, J::Null) => true,
        (J::Null, _) | (_, J::Null) => false,
        (x, y) if std::mem::discriminant(x) != std::mem::discriminant(y) => {
            bail!(
                "incompatible types for comparison: {} and {}",
                type_name(x),
                type_name(y)
            )
        }
        _ => bail!("non-comparable type {}", type_name(a)),
    })
}

fn compare(a: &J, b: &J) -> Result<std::cmp::Ordering> {
    match (a, b) {
        (J::Number(x), J::Number(y)) if x.is_f64() == y.is_f64() => x
            .as_f64()
            .partial_cmp(&y.as_f64())
            .ok_or_else(|| anyhow!("NaN in comparison")),
        (J::String(x), J::String(y)) => Ok(x.cmp(y)),
        _ => bail!(
            "incompatible types for comparison: {} and {}",
            type_name(a),
            type_name(b)
        ),
    }
}

fn as_int(v: &J, what: &str) -> Result<i64> {
    v.as_i64()
        .ok_or_else(|| anyhow!("{what}: expected an integer, got {}", type_name(v)))
}

/// Go struct field names of Ollama's API types → their JSON tags; `Properties` and `Arguments`
/// are maps whose keys stay as they are.
fn go_json(v: &J, out: &mut String, map_keys: bool) {
    match v {
        J::Object(m) => {
            out.push('{');
            let mut keys: Vec<&String> = m.keys().collect();
            if map_keys {
                keys.sort();
            }
            let mut first = true;
            for k in keys {
                let val = &m[k];
                let tag = if map_keys { k.clone() } else { json_tag(k) };
                // omitempty on everything but the required API fields
                if !map_keys && !truth(val) && !matches!(k.as_str(), "Role" | "Content" | "Name") {
                    continue;
                }
                if !first {
                    out.push(',');
                }
                first = false;
                go_json_str(&tag, out);
                out.push(':');
                if map_keys {
                    go_json(val, out, false);
                } else if k == "Arguments" {
                    go_json_raw(val, out, true);
                } else {
                    go_json(val, out, k == "Properties");
                }
            }
            out.push('}');
        }
        J::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                go_json(x, out, false);
            }
            out.push(']');
        }
        other => go_json_raw(other, out, false),
    }
}

/// Plain JSON (maps with sorted keys) the way Go's encoding/json writes it.
fn go_json_raw(v: &J, out: &mut String, sort: bool) {
    match v {
        J::Null => out.push_str("null"),
        J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        J::Number(n) => out.push_str(&n.to_string()),
        J::String(s) => go_json_str(s, out),
        J::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                go_json_raw(x, out, sort);
            }
            out.push(']');
        }
        J::Object(m) => {
            out.push('{');
            let mut keys: Vec<&String> = m.keys().collect();
            if sort {
                keys.sort();
            }
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                go_json_str(k, out);
                out.push(':');
                go_json_raw(&m[k], out, sort);
            }
            out.push('}');
        }
    }
}

fn go_json_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn json_tag(go: &str) -> String {
    match go {
        "ToolCalls" => "tool_calls".into(),
        "ToolName" => "tool_name".into(),
        "ToolCallID" => "tool_call_id".into(),
        _ => {
            let mut c = go.chars();
            match c.next() {
                Some(f) => f.to_lowercase().collect::<String>() + c.as_str(),
                None => String::new(),
            }
        }
    }
}

/// Go's `json` template function as Ollama defines it (encoding/json.Marshal of the API types).
pub fn ollama_json(v: &J) -> String {
    let mut s = String::new();
    go_json(v, &mut s, false);
    s
}

impl Exec<'_> {
    fn nodes(&mut self, nodes: &[Node], dot: &J) -> Result<Flow> {
        for n in nodes {
            match self.node(n, dot)? {
                Flow::Normal => {}
                f => return Ok(f),
            }
        }
        Ok(Flow::Normal)
    }

    fn scoped(&mut self, nodes: &[Node], dot: &J) -> Result<Flow> {
        let mark = self.vars.len();
        let r = self.nodes(nodes, dot);
        self.vars.truncate(mark);
        r
    }

    fn node(&mut self, n: &Node, dot: &J) -> Result<Flow> {
        match n {
            Node::Text(t) => self.out.push_str(t),
            Node::Action(p) => {
                let v = self.pipeline(p, dot)?;
                if p.decl.is_empty() {
                    self.out.push_str(&print_value(&v));
                }
            }
            Node::If(branches, else_) => {
                let mark = self.vars.len();
                for (p, body) in branches {
                    let v = self.pipeline(p, dot)?;
                    if truth(&v) {
                        let r = self.nodes(body, dot);
                        self.vars.truncate(mark);
                        return r;
                    }
                }
                let r = self.nodes(else_, dot);
                self.vars.truncate(mark);
                return r;
            }
            Node::With(branches, else_) => {
                let mark = self.vars.len();
                for (p, body) in branches {
                    let v = self.pipeline(p, dot)?;
                    if truth(&v) {
                        let r = self.nodes(body, &v);
                        self.vars.truncate(mark);
                        return r;
                    }
                }
                let r = self.nodes(else_, dot);
                self.vars.truncate(mark);
                return r;
            }
            Node::Range { pipe, body, else_ } => {
                let mark = self.vars.len();
                let decl = pipe.decl.clone();
                let inner = Pipeline {
                    decl: Vec::new(),
                    assign: false,
                    cmds: pipe.cmds.clone(),
                };
                let v = self.pipeline(&inner, dot)?;
                let items: Vec<(J, J)> = match &v {
                    J::Array(a) => a
                        .iter()
                        .enumerate()
                        .map(|(i, x)| (J::from(i as i64), x.clone()))
                        .collect(),
                    J::Object(m) => {
                        let mut keys: Vec<&String> = m.keys().collect();
                        keys.sort();
                        keys.into_iter()
                            .map(|k| (J::from(k.clone()), m[k].clone()))
                            .collect()
                    }
                    J::Number(n) if n.is_i64() => (0..n.as_i64().unwrap())
                        .map(|i| (J::from(i), J::from(i)))
                        .collect(),
                    J::Null => Vec::new(),
                    other => bail!("range can't iterate over {}", type_name(other)),
                };
                if items.is_empty() {
                    let r = self.nodes(else_, dot);
                    self.vars.truncate(mark);
                    return r;
                }
                for (k, x) in items {
                    let m2 = self.vars.len();
                    match decl.len() {
                        0 => {}
                        1 => self.vars.push((decl[0].clone(), x.clone())),
                        _ => {
                            self.vars.push((decl[0].clone(), k));
                            self.vars.push((decl[1].clone(), x.clone()));
                        }
                    }
                    let f = self.scoped(body, &x)?;
                    self.vars.truncate(m2);
                    if matches!(f, Flow::Break) {
                        break;
                    }
                }
                self.vars.truncate(mark);
            }
            Node::Break => return Ok(Flow::Break),
            Node::Continue => return Ok(Flow::Continue),
        }
        Ok(Flow::Normal)
    }

    fn var(&self, name: &str) -> Result<J> {
        self.vars
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .ok_or_else(|| anyhow!("undefined variable: {name}"))
    }

    fn pipeline(&mut self, p: &Pipeline, dot: &J) -> Result<J> {
        let mut prev: Option<J> = None;
        for cmd in &p.cmds {
            prev = Some(self.command(cmd, dot, prev)?);
        }
        let v = prev.unwrap_or(J::Null);
        if p.assign {
            let name = &p.decl[0];
            let slot = self
                .vars
                .iter_mut()
                .rev()
                .find(|(n, _)| n == name)
                .ok_or_else(|| anyhow!("undefined variable: {name}"))?;
            slot.1 = v.clone();
        } else if let Some(name) = p.decl.last() {
            self.vars.push((name.clone(), v.clone()));
        }
        Ok(v)
    }

    fn arg(&mut self, a: &Arg, dot: &J) -> Result<J> {
        Ok(match a {
            Arg::Dot(f) => field(dot, f)?,
            Arg::Var(v, f) => field(&self.var(v)?, f)?,
            Arg::Str(s) => J::from(s.clone()),
            Arg::Int(i) => J::from(*i),
            Arg::Float(f) => J::from(*f),
            Arg::Bool(b) => J::from(*b),
            Arg::Nil => J::Null,
            Arg::Sub(p, f) => {
                let v = self.pipeline(p, dot)?;
                field(&v, f)?
            }
            Arg::Ident(name) => self.call(name, &[], dot, None)?,
        })
    }

    fn command(&mut self, cmd: &[Arg], dot: &J, piped: Option<J>) -> Result<J> {
        match &cmd[0] {
            Arg::Ident(name) => self.call(name, &cmd[1..], dot, piped),
            a => {
                if cmd.len() > 1 || piped.is_some() {
                    bail!("can't give arguments to a non-function");
                }
                self.arg(a, dot)
            }
        }
    }

    fn call(&mut self, name: &str, args: &[Arg], dot: &J, piped: Option<J>) -> Result<J> {
        // and / or evaluate lazily
        if name == "and" || name == "or" {
            let n = args.len() + piped.is_some() as usize;
            if n == 0 {
                bail!("{name}: wrong number of args");
            }
            let mut last = J::Null;
            for a in args {
                last = self.arg(a, dot)?;
                if truth(&last) != (name == "and") {
                    return Ok(last);
                }
            }
            if let Some(p) = piped {
                last = p;
            }
            return Ok(last);
        }
        let mut vals = Vec::with_capacity(args.len() + 1);
        for a in args {
            vals.push(self.arg(a, dot)?);
        }
        if let Some(p) = piped {
            vals.push(p);
        }
        let want = |n: usize| -> Result<()> {
            if vals.len() != n {
                bail!("{name}: wants {n} args, got {}", vals.len());
            }
            Ok(())
        };
        Ok(match name {
            "not" => {
                want(1)?;
                J::Bool(!truth(&vals[0]))
            }
            "eq" => {
                if vals.len() < 2 {
                    bail!("eq: missing argument for comparison");
                }
                let mut r = false;
                for b in &vals[1..] {
                    if values_equal(&vals[0], b)? {
                        r = true;
                        break;
                    }
                }
                J::Bool(r)
            }
            "ne" => {
                want(2)?;
                J::Bool(!values_equal(&vals[0], &vals[1])?)
            }
            "lt" | "le" | "gt" | "ge" => {
                want(2)?;
                let o = compare(&vals[0], &vals[1])?;
                J::Bool(match name {
                    "lt" => o.is_lt(),
                    "le" => o.is_le(),
                    "gt" => o.is_gt(),
                    _ => o.is_ge(),
                })
            }
            "len" => {
                want(1)?;
                J::from(match &vals[0] {
                    J::String(s) => s.len(),
                    J::Array(a) => a.len(),
                    J::Object(m) => m.len(),
                    J::Null => 0,
                    other => bail!("len of {}", type_name(other)),
                } as i64)
            }
            "index" => {
                if vals.is_empty() {
                    bail!("index: missing argument");
                }
                let mut cur = vals[0].clone();
                for k in &vals[1..] {
                    cur = match (&cur, k) {
                        (J::Array(a), _) => {
                            let i = as_int(k, "index")?;
                            if i < 0 || i as usize >= a.len() {
                                bail!("index out of range: {i}");
                            }
                            a[i as usize].clone()
                        }
                        (J::Object(m), J::String(s)) => m.get(s).cloned().unwrap_or(J::Null),
                        (J::Null, _) => bail!("index of untyped nil"),
                        (c, _) => bail!("can't index item of type {}", type_name(c)),
                    };
                }
                cur
            }
            "slice" => {
                if vals.is_empty() || vals.len() > 3 {
                    bail!("slice: wrong number of args");
                }
                let idx: Vec<i64> = vals[1..]
                    .iter()
                    .map(|v| as_int(v, "slice"))
                    .collect::<Result<_>>()?;
                match &vals[0] {
                    J::Array(a) => {
                        let lo = *idx.first().unwrap_or(&0);
                        let hi = *idx.get(1).unwrap_or(&(a.len() as i64));
                        if lo < 0 || hi < lo || hi as usize > a.len() {
                            bail!("slice: index out of range");
                        }
                        J::Array(a[lo as usize..hi as usize].to_vec())
                    }
                    J::String(s) => {
                        let lo = *idx.first().unwrap_or(&0);
                        let hi = *idx.get(1).unwrap_or(&(s.len() as i64));
                        if lo < 0 || hi < lo || hi as usize > s.len() {
                            bail!("slice: index out of range");
                        }
                        J::from(
                            s.get(lo as usize..hi as usize)
                                .ok_or_else(|| anyhow!("slice: not at a character boundary"))?,
                        )
                    }
                    other => bail!("can't slice item of type {}", type_name(other)),
                }
            }
            "print" => {
                let mut s = String::new();
                for (i, v) in vals.iter().enumerate() {
                    if i > 0 && !v.is_string() && !vals[i - 1].is_string() {
                        s.push(' ');
                    }
                    s.push_str(&print_value(v));
                }
                J::from(s)
            }
            "json" => {
                want(1)?;
                J::from(ollama_json(&vals[0]))
            }
            "currentDate" => {
                want(0)?;
                J::from(self.env.current_date.clone())
            }
            "yesterdayDate" => {
                want(0)?;
                J::from(self.env.yesterday_date.clone())
            }
            other => bail!("function \"{other}\" not defined"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(t: &str, data: J) -> String {
        GoTemplate::parse(t)
            .unwrap()
            .execute(&data, &Env::default())
            .unwrap()
    }

    #[test]
    fn trimming_and_fields() {
        assert_eq!(run("a  {{- .X -}}  b", json!({"X": "x"})), "axb");
        assert_eq!(run("a {{.X}} b", json!({"X": 3})), "a 3 b");
        assert_eq!(run("{{ .Missing }}", json!({})), "<no value>");
        assert_eq!(run("a {{/* c */}} b", json!({})), "a  b");
        assert_eq!(run("a {{- /* c */ -}} b", json!({})), "ab");
    }

    #[test]
    fn control_flow() {
        let d = json!({"Messages": [{"Role": "user", "Content": "hi"}, {"Role": "assistant", "Content": "yo"}]});
        let t = "{{ range $i, $m := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}[{{ $i }}:{{ .Role }}={{ $m.Content }}{{ if $last }}!{{ end }}]{{ end }}";
        assert_eq!(run(t, d.clone()), "[0:user=hi][1:assistant=yo!]");
        let t = "{{ $n := 0 }}{{ range .Messages }}{{ if eq .Role \"user\" \"tool\" }}{{ $n = 1 }}{{ end }}{{ end }}{{ $n }}";
        assert_eq!(run(t, d.clone()), "1");
        let t = "{{ if not .Tools }}none{{ else if .X }}x{{ else }}y{{ end }}";
        assert_eq!(run(t, json!({"Tools": []})), "none");
        assert_eq!(run(t, json!({"Tools": [1], "X": ""})), "y");
        assert_eq!(run("{{ and 1 0 2 }}|{{ or 0 \"\" 3 }}", json!({})), "0|3");
        assert_eq!(
            run("{{ (index .Messages 1).Role }}", d.clone()),
            "assistant"
        );
        assert_eq!(run("{{ with .Messages }}{{ len . }}{{ end }}", d), "2");
        assert_eq!(
            run(
                "{{ range .L }}{{ if eq . 2 }}{{ break }}{{ end }}{{ . }}{{ end }}",
                json!({"L": [1, 2, 3]})
            ),
            "1"
        );
        assert_eq!(run("{{ \"a\\n\" }}{{ `b\\n` }}", json!({})), "a\nb\\n");
    }

    #[test]
    fn json_like_go() {
        let tool = json!({"Type": "function", "Function": {"Name": "f", "Description": "<x> & y", "Parameters": {"Type": "object", "Required": ["a"], "Properties": {"b": {"Type": "string"}, "a": {"Type": "integer", "Description": "A"}}}}});
        assert_eq!(
            ollama_json(&tool),
            r#"{"type":"function","function":{"name":"f","description":"\u003cx\u003e \u0026 y","parameters":{"type":"object","required":["a"],"properties":{"a":{"type":"integer","description":"A"},"b":{"type":"string"}}}}}"#
        );
    }

    #[test]
    fn errors() {
        assert!(GoTemplate::parse("{{ if .X }}").is_err());
        assert!(GoTemplate::parse("{{ end }}").is_err());
        assert!(GoTemplate::parse("{{ .X").is_err());
        let t = GoTemplate::parse("{{ nosuch 1 }}").unwrap();
        assert!(t.execute(&json!({}), &Env::default()).is_err());
    }
}
