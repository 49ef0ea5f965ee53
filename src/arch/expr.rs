//! The small expression language of the architecture descriptions (`formats/arch/*.json`):
//! config values, shapes and metadata values are written as Python-like expressions over the
//! model's hyperparameters, e.g. `"num_attention_heads * head_dim"`,
//! `"first(max_position_embeddings, n_ctx, n_positions)"` or `"head_dim ?? hidden_size //
//! num_attention_heads"`.
//!
//! Written by hand: the descriptions need Python's arithmetic (`//` floors, `/` is true
//! division, `int()` truncates) and the converter's `find_hparam` rule (the first key that is
//! *present*, even when its value is null), which no general-purpose expression crate has.
//!
//! Grammar (loosest first): `a ?? b` (a unless null) · `or` · `and` · `not` · comparisons
//! (`== != < <= > >=`) · `+ -` · `* / // %` · unary `-` · atoms: numbers, `'strings'`,
//! `true false null`, names (`rope_parameters.factor` reads a nested key), calls
//! `int(x) float(x) bool(x) lower(s) len(x) min(a, b) max(a, b) present(name) first(name, ...)`, parentheses.
//! Arithmetic with null gives null, so an optional value whose inputs are missing is skipped.

use serde_json::{Number, Value};

/// A parsed expression.
#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    Lit(Value),
    Name(String),
    Unary(UnOp, Box<Expr>),
    Binary(BinOp, Box<Expr>, Box<Expr>),
    Call(String, Vec<Expr>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnOp {
    Neg,
    Not,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    Coalesce,
    Or,
    And,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Add,
    Sub,
    Mul,
    Div,
    FloorDiv,
    Rem,
}

/// Where names are looked up: `None` when the key is absent, `Some(Value::Null)` when it is
/// present with a null value.
pub trait Scope {
    fn lookup(&self, name: &str) -> Option<Value>;
}

impl<F: Fn(&str) -> Option<Value>> Scope for F {
    fn lookup(&self, name: &str) -> Option<Value> {
        self(name)
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Num(Value),
    Str(String),
    Ident(String),
    Op(&'static str),
    LParen,
    RParen,
    Comma,
}

fn tokenize(s: &str) -> Result<Vec<Tok>, String> {
    let b = s.as_bytes();
    let mut i = 0;
    let mut out = vec![];
    const OPS: [&str; 16] = [
        "??", "//", "==", "!=", "<=", ">=", "<", ">", "+", "-", "*", "/", "%", "(", ")", ",",
    ];
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        if c.is_ascii_digit() || (c == b'.' && i + 1 < b.len() && b[i + 1].is_ascii_digit()) {
            let start = i;
            let mut float = false;
            while i < b.len()
                && (b[i].is_ascii_digit()
                    || b[i] == b'.'
                    || b[i] == b'_'
                    || b[i] == b'e'
                    || b[i] == b'E'
                    || ((b[i] == b'-' || b[i] == b'+') && (b[i - 1] == b'e' || b[i - 1] == b'E')))
            {
                if matches!(b[i], b'.' | b'e' | b'E') {
                    float = true;
                }
                i += 1;
            }
            let text: String = s[start..i].chars().filter(|&c| c != '_').collect();
            let v = if float {
                let f: f64 = text.parse().map_err(|_| format!("bad number {text:?}"))?;
                Value::Number(Number::from_f64(f).ok_or("non-finite number")?)
            } else {
                let n: i64 = text.parse().map_err(|_| format!("bad number {text:?}"))?;
                Value::from(n)
            };
            out.push(Tok::Num(v));
            continue;
        }
        if c == b'\'' || c == b'"' {
            let q = c;
            let start = i + 1;
            i += 1;
            while i < b.len() && b[i] != q {
                i += 1;
            }
            if i >= b.len() {
                return Err("unterminated string".into());
            }
            out.push(Tok::Str(s[start..i].to_string()));
            i += 1;
            continue;
        }
        if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'.') {
                i += 1;
            }
            out.push(Tok::Ident(s[start..i].to_string()));
            continue;
        }
        let rest = &s[i..];
        let Some(op) = OPS.iter().find(|o| rest.starts_with(**o)) else {
            return Err(format!("unexpected character {:?}", c as char));
        };
        i += op.len();
        out.push(match *op {
            "(" => Tok::LParen,
            ")" => Tok::RParen,
            "," => Tok::Comma,
            o => Tok::Op(o),
        });
    }
    Ok(out)
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn eat_op(&mut self, ops: &[&str]) -> Option<&'static str> {
        if let Some(Tok::Op(o)) = self.peek()
            && ops.contains(o)
        {
            let o = *o;
            self.pos += 1;
            return Some(o);
        }
        None
    }

    fn eat_word(&mut self, w: &str) -> bool {
        if matches!(self.peek(), Some(Tok::Ident(i)) if i == w) {
            self.pos += 1;
            return true;
        }
        false
    }

    fn expr(&mut self) -> Result<Expr, String> {
        let mut l = self.or()?;
        while self.eat_op(&["??"]).is_some() {
            let r = self.or()?;
            l = Expr::Binary(BinOp::Coalesce, Box::new(l), Box::new(r));
        }
        Ok(l)
    }

    fn or(&mut self) -> Result<Expr, String> {
        let mut l = self.and()?;
        while self.eat_word("or") {
            let r = self.and()?;
            l = Expr::Binary(BinOp::Or, Box::new(l), Box::new(r));
        }
        Ok(l)
    }

    fn and(&mut self) -> Result<Expr, String> {
        let mut l = self.not()?;
        while self.eat_word("and") {
            let r = self.not()?;
            l = Expr::Binary(BinOp::And, Box::new(l), Box::new(r));
        }
        Ok(l)
    }

    fn not(&mut self) -> Result<Expr, String> {
        if self.eat_word("not") {
            return Ok(Expr::Unary(UnOp::Not, Box::new(self.not()?)));
        }
        self.cmp()
    }

    fn cmp(&mut self) -> Result<Expr, String> {
        let l = self.sum()?;
        if let Some(o) = self.eat_op(&["==", "!=", "<=", ">=", "<", ">"]) {
            let r = self.sum()?;
            let op = match o {
                "==" => BinOp::Eq,
                "!=" => BinOp::Ne,
                "<=" => BinOp::Le,
                ">=" => BinOp::Ge,
                "<" => BinOp::Lt,
                _ => BinOp::Gt,
            };
            return Ok(Expr::Binary(op, Box::new(l), Box::new(r)));
        }
        Ok(l)
    }

    fn sum(&mut self) -> Result<Expr, String> {
        let mut l = self.product()?;
        while let Some(o) = self.eat_op(&["+", "-"]) {
            let r = self.product()?;
            let op = if o == "+" { BinOp::Add } else { BinOp::Sub };
            l = Expr::Binary(op, Box::new(l), Box::new(r));
        }
        Ok(l)
    }

    fn product(&mut self) -> Result<Expr, String> {
        let mut l = self.unary()?;
        while let Some(o) = self.eat_op(&["*", "//", "/", "%"]) {
            let r = self.unary()?;
            let op = match o {
                "*" => BinOp::Mul,
                "//" => BinOp::FloorDiv,
                "/" => BinOp::Div,
                _ => BinOp::Rem,
            };
            l = Expr::Binary(op, Box::new(l), Box::new(r));
        }
        Ok(l)
    }

    fn unary(&mut self) -> Result<Expr, String> {
        if self.eat_op(&["-"]).is_some() {
            return Ok(Expr::Unary(UnOp::Neg, Box::new(self.unary()?)));
        }
        self.atom()
    }

    fn atom(&mut self) -> Result<Expr, String> {
        match self.next() {
            Some(Tok::Num(v)) => Ok(Expr::Lit(v)),
            Some(Tok::Str(s)) => Ok(Expr::Lit(Value::String(s))),
            Some(Tok::LParen) => {
                let e = self.expr()?;
                match self.next() {
                    Some(Tok::RParen) => Ok(e),
                    _ => Err("expected ')'".into()),
                }
            }
            Some(Tok::Ident(id)) => match id.as_str() {
                "true" | "True" => Ok(Expr::Lit(Value::Bool(true))),
                "false" | "False" => Ok(Expr::Lit(Value::Bool(false))),
                "null" | "None" => Ok(Expr::Lit(Value::Null)),
                _ if matches!(self.peek(), Some(Tok::LParen)) => {
                    self.pos += 1;
                    let mut args = vec![];
                    if !matches!(self.peek(), Some(Tok::RParen)) {
                        loop {
                            args.push(self.expr()?);
                            match self.next() {
                                Some(Tok::Comma) => continue,
                                Some(Tok::RParen) => break,
                                _ => return Err(format!("expected ',' or ')' in {id}(...)")),
                            }
                        }
                    } else {
                        self.pos += 1;
                    }
                    check_call(&id, &args)?;
                    Ok(Expr::Call(id, args))
                }
                _ => Ok(Expr::Name(id)),
            },
            Some(t) => Err(format!("unexpected {t:?}")),
            None => Err("unexpected end".into()),
        }
    }
}

fn check_call(name: &str, args: &[Expr]) -> Result<(), String> {
    let ok = match name {
        "int" | "float" | "len" | "bool" | "lower" => args.len() == 1,
        "min" | "max" => args.len() == 2,
        "present" => args.len() == 1 && matches!(args[0], Expr::Name(_)),
        "first" => !args.is_empty() && args.iter().all(|a| matches!(a, Expr::Name(_))),
        _ => return Err(format!("unknown function {name}()")),
    };
    if ok {
        Ok(())
    } else {
        Err(format!("wrong arguments to {name}()"))
    }
}

impl Expr {
    pub fn parse(s: &str) -> Result<Expr, String> {
        let toks = tokenize(s).map_err(|e| format!("{s:?}: {e}"))?;
        let mut p = Parser { toks, pos: 0 };
        let e = p.expr().map_err(|e| format!("{s:?}: {e}"))?;
        if p.pos != p.toks.len() {
            return Err(format!("{s:?}: trailing input"));
        }
        Ok(e)
    }

    /// Every name the expression reads (for the "needs key X" errors).
    pub fn names(&self, out: &mut Vec<String>) {
        match self {
            Expr::Lit(_) => {}
            Expr::Name(n) => out.push(n.clone()),
            Expr::Unary(_, e) => e.names(out),
            Expr::Binary(_, a, b) => {
                a.names(out);
                b.names(out);
            }
            Expr::Call(_, args) => args.iter().for_each(|a| a.names(out)),
        }
    }

    /// Evaluate; names that are absent are recorded in `missing` (first one first).
    pub fn eval(&self, scope: &dyn Scope, missing: &mut Vec<String>) -> Value {
        match self {
            Expr::Lit(v) => v.clone(),
            Expr::Name(n) => match scope.lookup(n) {
                Some(v) => v,
                None => {
                    missing.push(n.clone());
                    Value::Null
                }
            },
            Expr::Unary(UnOp::Neg, e) => match num(&e.eval(scope, missing)) {
                Some(N::I(i)) => Value::from(-i),
                Some(N::F(f)) => float(-f),
                None => Value::Null,
            },
            Expr::Unary(UnOp::Not, e) => Value::Bool(!truthy(&e.eval(scope, missing))),
            Expr::Binary(op, a, b) => binary(*op, a, b, scope, missing),
            Expr::Call(f, args) => call(f, args, scope, missing),
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum N {
    I(i64),
    F(f64),
}

fn num(v: &Value) -> Option<N> {
    match v {
        Value::Number(n) => n
            .as_i64()
            .map(N::I)
            .or_else(|| n.as_u64().map(|u| N::I(u as i64)))
            .or_else(|| n.as_f64().map(N::F)),
        Value::Bool(b) => Some(N::I(*b as i64)),
        _ => None,
    }
}

fn float(f: f64) -> Value {
    Number::from_f64(f)
        .map(Value::Number)
        .unwrap_or(Value::Null)
}

fn as_f(n: N) -> f64 {
    match n {
        N::I(i) => i as f64,
        N::F(f) => f,
    }
}

/// Python truthiness.
pub fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

fn equal(a: &Value, b: &Value) -> bool {
    match (num(a), num(b)) {
        (Some(x), Some(y)) if !a.is_boolean() && !b.is_boolean() => as_f(x) == as_f(y),
        _ => a == b,
    }
}

fn binary(op: BinOp, a: &Expr, b: &Expr, scope: &dyn Scope, missing: &mut Vec<String>) -> Value {
    match op {
        BinOp::Coalesce => {
            let mut m = vec![];
            let l = a.eval(scope, &mut m);
            if !l.is_null() {
                return l;
            }
            let r = b.eval(scope, missing);
            if r.is_null() {
                // both sides missing: report the left side's names first
                let tail = std::mem::take(missing);
                missing.extend(m);
                missing.extend(tail);
            }
            r
        }
        BinOp::Or => {
            let l = a.eval(scope, missing);
            if truthy(&l) {
                l
            } else {
                b.eval(scope, missing)
            }
        }
        BinOp::And => {
            let l = a.eval(scope, missing);
            if !truthy(&l) {
                l
            } else {
                b.eval(scope, missing)
            }
        }
        BinOp::Eq => Value::Bool(equal(&a.eval(scope, missing), &b.eval(scope, missing))),
        BinOp::Ne => Value::Bool(!equal(&a.eval(scope, missing), &b.eval(scope, missing))),
        BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge => {
            let (l, r) = (a.eval(scope, missing), b.eval(scope, missing));
            let ord = match (num(&l), num(&r), &l, &r) {
                (Some(x), Some(y), _, _) => as_f(x).partial_cmp(&as_f(y)),
                (_, _, Value::String(x), Value::String(y)) => Some(x.cmp(y)),
                _ => None,
            };
            let Some(ord) = ord else {
                return Value::Bool(false);
            };
            Value::Bool(match op {
                BinOp::Lt => ord.is_lt(),
                BinOp::Le => ord.is_le(),
                BinOp::Gt => ord.is_gt(),
                _ => ord.is_ge(),
            })
        }
        _ => {
            let (l, r) = (a.eval(scope, missing), b.eval(scope, missing));
            if op == BinOp::Add
                && let (Value::String(x), Value::String(y)) = (&l, &r)
            {
                return Value::String(format!("{x}{y}"));
            }
            let (Some(x), Some(y)) = (num(&l), num(&r)) else {
                return Value::Null;
            };
            arith(op, x, y)
        }
    }
}

fn arith(op: BinOp, x: N, y: N) -> Value {
    if let (N::I(a), N::I(b)) = (x, y) {
        return match op {
            BinOp::Add => Value::from(a.wrapping_add(b)),
            BinOp::Sub => Value::from(a.wrapping_sub(b)),
            BinOp::Mul => Value::from(a.wrapping_mul(b)),
            BinOp::Div if b != 0 => float(a as f64 / b as f64),
            BinOp::FloorDiv if b != 0 => Value::from(floor_div(a, b)),
            BinOp::Rem if b != 0 => Value::from(a.wrapping_sub(b.wrapping_mul(floor_div(a, b)))),
            _ => Value::Null,
        };
    }
    let (a, b) = (as_f(x), as_f(y));
    match op {
        BinOp::Add => float(a + b),
        BinOp::Sub => float(a - b),
        BinOp::Mul => float(a * b),
        BinOp::Div if b != 0.0 => float(a / b),
        BinOp::FloorDiv if b != 0.0 => float((a / b).floor()),
        BinOp::Rem if b != 0.0 => float(a - b * (a / b).floor()),
        _ => Value::Null,
    }
}

/// Python's `//` on integers (rounds toward negative infinity).
fn floor_div(a: i64, b: i64) -> i64 {
    let q = a.wrapping_div(b);
    if a.wrapping_rem(b) != 0 && ((a < 0) != (b < 0)) {
        q - 1
    } else {
        q
    }
}

fn call(f: &str, args: &[Expr], scope: &dyn Scope, missing: &mut Vec<String>) -> Value {
    match f {
        "first" => {
            // the converter's find_hparam: the first key present, even when null
            for a in args {
                if let Expr::Name(n) = a
                    && let Some(v) = scope.lookup(n)
                {
                    return v;
                }
            }
            if let Some(Expr::Name(n)) = args.first() {
                missing.push(n.clone());
            }
            Value::Null
        }
        "present" => match &args[0] {
            Expr::Name(n) => Value::Bool(scope.lookup(n).is_some_and(|v| !v.is_null())),
            _ => Value::Bool(false),
        },
        _ => {
            let v: Vec<Value> = args.iter().map(|a| a.eval(scope, missing)).collect();
            match f {
                "int" => match num(&v[0]) {
                    Some(N::I(i)) => Value::from(i),
                    Some(N::F(x)) if x.is_finite() => Value::from(x.trunc() as i64),
                    _ => Value::Null,
                },
                "float" => num(&v[0]).map(|n| float(as_f(n))).unwrap_or(Value::Null),
                "bool" => Value::Bool(truthy(&v[0])),
                "lower" => match &v[0] {
                    Value::String(s) => Value::String(s.to_lowercase()),
                    _ => Value::Null,
                },
                "len" => match &v[0] {
                    Value::Array(a) => Value::from(a.len() as i64),
                    Value::String(s) => Value::from(s.chars().count() as i64),
                    Value::Object(o) => Value::from(o.len() as i64),
                    _ => Value::Null,
                },
                "min" | "max" => match (num(&v[0]), num(&v[1])) {
                    (Some(x), Some(y)) => {
                        let pick_x = if f == "min" {
                            as_f(x) <= as_f(y)
                        } else {
                            as_f(x) >= as_f(y)
                        };
                        if pick_x { v[0].clone() } else { v[1].clone() }
                    }
                    _ => Value::Null,
                },
                _ => Value::Null,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(s: &str, scope: &serde_json::Map<String, Value>) -> Value {
        let e = Expr::parse(s).unwrap();
        let f = |n: &str| -> Option<Value> {
            let mut cur = Value::Object(scope.clone());
            for p in n.split('.') {
                cur = cur.get(p)?.clone();
            }
            Some(cur)
        };
        e.eval(&f, &mut vec![])
    }

    #[test]
    fn python_arithmetic() {
        let s = json!({"h": 2048, "n": 32, "f": 0.5, "z": null, "r": {"factor": 8.0}})
            .as_object()
            .unwrap()
            .clone();
        assert_eq!(ev("h // n", &s), json!(64));
        assert_eq!(ev("h / n", &s), json!(64.0));
        assert_eq!(ev("-7 // 2", &s), json!(-4));
        assert_eq!(ev("-7 % 2", &s), json!(1));
        assert_eq!(ev("int(f * h) // n", &s), json!(32));
        assert_eq!(ev("int(-2.5)", &s), json!(-2));
        assert_eq!(ev("z ?? h", &s), json!(2048));
        assert_eq!(ev("missing ?? n", &s), json!(32));
        assert_eq!(ev("first(z, h)", &s), Value::Null, "present-but-null wins");
        assert_eq!(ev("first(nope, h)", &s), json!(2048));
        assert_eq!(ev("r.factor * 2", &s), json!(16.0));
        assert_eq!(ev("z + 1", &s), Value::Null);
        assert_eq!(ev("present(z) or present(h)", &s), json!(true));
        assert_eq!(ev("h == 2048 and not (n > 40)", &s), json!(true));
        assert_eq!(ev("'a' + 'b' == 'ab'", &s), json!(true));
        assert_eq!(ev("max(n, 40)", &s), json!(40));
        assert_eq!(ev("1e-6", &s), json!(1e-6));
    }

    #[test]
    fn missing_names_are_reported() {
        let e = Expr::parse("intermediate_size * 2").unwrap();
        let f = |_: &str| -> Option<Value> { None };
        let mut m = vec![];
        assert_eq!(e.eval(&f, &mut m), Value::Null);
        assert_eq!(m, vec!["intermediate_size".to_string()]);
    }

    #[test]
    fn parse_errors() {
        assert!(Expr::parse("a +").is_err());
        assert!(Expr::parse("foo(a)").is_err());
        assert!(Expr::parse("(a").is_err());
        assert!(Expr::parse("a b").is_err());
        assert!(Expr::parse("first(1)").is_err());
    }
}
