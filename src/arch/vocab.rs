//! Tokenizer metadata exactly as convert_hf_to_gguf.py writes it for the llama family:
//! the BPE ("gpt2") path with llama.cpp's pre-tokenizer hash, the SentencePiece ("llama")
//! path from tokenizer.model, and gguf-py's SpecialVocab rules (special ids, add_* flags,
//! chat template, normalizer flags).

use crate::checkpoint::HfCheckpoint;
use crate::gguf::{Array, Metadata, Value};
use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Map, Value as J};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;

const PRE_HASHES: &str = include_str!("../../formats/pre_tokenizer_hashes.tsv");
const PROBE: &str = include_str!("../../formats/pre_tokenizer_probe.txt");

// gguf TokenType
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

/// `tokenizer.ggml.pre` for a hash, from llama.cpp's table.
pub fn pre_name_for_hash(hash: &str) -> Option<&'static str> {
    PRE_HASHES
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('\t'))
        .find(|(h, _)| *h == hash)
        .map(|(_, n)| n)
}

/// SHA-256 hex of `str(tokenizer.encode(chktxt))` (Python list repr of the ids).
pub fn probe_hash(tok: &tokenizers::Tokenizer) -> Result<String> {
    let enc = tok
        .encode(PROBE, true)
        .map_err(|e| anyhow!("tokenizer failed on the probe text: {e}"))?;
    let ids: Vec<String> = enc.get_ids().iter().map(|i| i.to_string()).collect();
    let repr = format!("[{}]", ids.join(", "));
    Ok(hex(&Sha256::digest(repr.as_bytes())))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Python's `does_token_look_special`.
fn looks_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<｜") && t.ends_with("｜>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

/// Write the tokenizer keys for an HF checkpoint into `md` (after the model keys), along the
/// description's vocabulary paths (`vocab.methods`, tried in order) and quirks.
pub fn add_tokenizer_metadata(ck: &HfCheckpoint, md: &mut Metadata) -> Result<()> {
    let dir = &ck.dir;
    let cfg = ck.config()?;
    let v = &cfg.arch.vocab;
    let tc = ck.read_json("tokenizer_config.json")?;
    if v.add_prefix_space_from_config
        && let Some(b) = tc
            .as_ref()
            .and_then(|t| t.get("add_prefix_space"))
            .and_then(J::as_bool)
    {
        md.set("tokenizer.ggml.add_space_prefix", Value::Bool(b));
    }
    let tj_path = dir.join("tokenizer.json");
    let has = |m: &str| v.methods.iter().any(|x| x == m);
    let mut done = false;
    for m in &v.methods {
        match m.as_str() {
            "sentencepiece" if dir.join("tokenizer.model").is_file() => {
                sentencepiece_vocab(ck, md)?;
                if let Some(b) = v.sentencepiece_add_space_prefix {
                    md.set("tokenizer.ggml.add_space_prefix", Value::Bool(b));
                }
            }
            "llama_hf" if tj_path.is_file() && is_llama_hf_bpe(&tj_path)? => bail!(
                "{}: SentencePiece-style BPE tokenizer.json (byte_fallback) without tokenizer.model is not supported yet; add the model's tokenizer.model",
                tj_path.display()
            ),
            "gpt2" if tj_path.is_file() => gpt2_vocab(ck, md)?,
            _ => continue,
        }
        done = true;
        break;
    }
    if !done {
        let wanted = if has("gpt2") {
            "tokenizer.json or tokenizer.model"
        } else {
            "tokenizer.model"
        };
        bail!(
            "{}: no {wanted}; cannot write the vocabulary for {}",
            dir.display(),
            cfg.class.name
        );
    }
    if v.no_bos_for_vocab_sizes.contains(&(cfg.vocab_size as u64)) {
        // LlamaModel.set_vocab: granite/SmolLM-size vocabularies never add BOS
        md.set("tokenizer.ggml.add_bos_token", Value::Bool(false));
    }
    Ok(())
}

fn is_llama_hf_bpe(path: &Path) -> Result<bool> {
    let v = crate::checkpoint::read_json_opt(path)?.unwrap_or(J::Null);
    let model = &v["model"];
    let ty = model["type"].as_str().unwrap_or("");
    let is_llama3 = ty == "BPE"
        && model
            .get("ignore_merges")
            .and_then(J::as_bool)
            .unwrap_or(false)
        && !model
            .get("byte_fallback")
            .and_then(J::as_bool)
            .unwrap_or(true);
    if is_llama3 {
        return Ok(false);
    }
    Ok(ty == "BPE"
        && model
            .get("byte_fallback")
            .and_then(J::as_bool)
            .unwrap_or(false)
        && v["decoder"]["type"].as_str() == Some("Sequence"))
}

fn load_tokenizer(path: &Path) -> Result<tokenizers::Tokenizer> {
    tokenizers::Tokenizer::from_file(path)
        .map_err(|e| anyhow!("{}: cannot load tokenizer: {e}", path.display()))
}

/// transformers' `clean_up_tokenization`.
fn clean_up_tokenization(s: &str) -> String {
    s.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}

fn gpt2_vocab(ck: &HfCheckpoint, md: &mut Metadata) -> Result<()> {
    let tj_path = ck.dir.join("tokenizer.json");
    let tok = load_tokenizer(&tj_path)?;
    let vocab = tok.get_vocab(true);
    let vocab_size = ck.config()?.vocab_size;
    if let Some(max) = vocab.values().max()
        && *max as usize >= vocab_size
    {
        bail!(
            "{}: token id {max} is not below config.json vocab_size {vocab_size}",
            tj_path.display()
        );
    }
    let hash = probe_hash(&tok)?;
    let pre = pre_name_for_hash(&hash).ok_or_else(|| {
        anyhow!(
            "{}: BPE pre-tokenizer not recognized (probe hash {hash}); llama.cpp's converter refuses it too",
            tj_path.display()
        )
    })?;
    let tc = ck.read_json("tokenizer_config.json")?;
    let cleanup = tc
        .as_ref()
        .and_then(|t| t.get("clean_up_tokenization_spaces"))
        .and_then(J::as_bool)
        .unwrap_or(false);
    let decoder = tok.get_added_tokens_decoder();
    let added: HashMap<String, u32> = decoder
        .iter()
        .map(|(id, t)| (t.content.clone(), *id))
        .collect();
    let mut reverse: HashMap<u32, String> = HashMap::with_capacity(vocab.len());
    for (t, id) in &vocab {
        reverse.insert(*id, t.clone());
    }
    let mut tokens = Vec::with_capacity(vocab_size);
    let mut types = Vec::with_capacity(vocab_size);
    for i in 0..vocab_size as u32 {
        match reverse.get(&i) {
            None => {
                tokens.push(format!("[PAD{i}]"));
                types.push(UNUSED);
            }
            Some(t) => {
                let mut token = t.clone();
                if added.contains_key(&token) {
                    let info = decoder.get(&i);
                    if let Some(info) = info
                        && !info.normalized
                    {
                        let enc = tok.encode(token.as_str(), false).map_err(|e| {
                            anyhow!("{}: cannot encode {token:?}: {e}", tj_path.display())
                        })?;
                        let mut dec = tok.decode(enc.get_ids(), false).map_err(|e| {
                            anyhow!("{}: cannot decode {token:?}: {e}", tj_path.display())
                        })?;
                        if cleanup {
                            dec = clean_up_tokenization(&dec);
                        }
                        token = dec;
                    }
                    let special = info.map(|x| x.special).unwrap_or(false);
                    if special || looks_special(&token) {
                        types.push(CONTROL);
                    } else {
                        token = token.replace('\u{2581}', " ");
                        types.push(USER_DEFINED);
                    }
                } else {
                    types.push(NORMAL);
                }
                tokens.push(token);
            }
        }
    }
    md.set("tokenizer.ggml.model", Value::Str("gpt2".into()));
    md.set("tokenizer.ggml.pre", Value::Str(pre.into()));
    md.set("tokenizer.ggml.tokens", Value::Array(Array::Str(tokens)));
    md.set("tokenizer.ggml.token_type", Value::Array(Array::I32(types)));
    let sv = SpecialVocab::load(&ck.dir, true, None)?;
    sv.add_to(md);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// SentencePiece: a minimal reader of the ModelProto in tokenizer.model (field 1 = pieces,
// each with 1 = piece, 2 = score, 3 = type).

struct Piece {
    text: String,
    score: f32,
    kind: i32,
}

fn read_varint(b: &[u8], pos: &mut usize) -> Result<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*pos).ok_or_else(|| anyhow!("truncated varint"))?;
        *pos += 1;
        v |= ((byte & 0x7F) as u64) << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    bail!("varint too long")
}

fn skip_field(b: &[u8], pos: &mut usize, wire: u64) -> Result<()> {
    match wire {
        0 => {
            read_varint(b, pos)?;
        }
        1 => *pos += 8,
        2 => {
            let n = read_varint(b, pos)? as usize;
            *pos = pos
                .checked_add(n)
                .ok_or_else(|| anyhow!("length overflow"))?;
        }
        5 => *pos += 4,
        w => bail!("unsupported protobuf wire type {w}"),
    }
    if *pos > b.len() {
        bail!("truncated field");
    }
    Ok(())
}

fn parse_sentencepiece(b: &[u8]) -> Result<Vec<Piece>> {
    let mut pieces = Vec::new();
    let mut pos = 0;
    while pos < b.len() {
        let key = read_varint(b, &mut pos)?;
        let (field, wire) = (key >> 3, key & 7);
        if field == 1 && wire == 2 {
            let n = read_varint(b, &mut pos)? as usize;
            let end = pos
                .checked_add(n)
                .filter(|&e| e <= b.len())
                .ok_or_else(|| anyhow!("truncated piece"))?;
            let sub = &b[pos..end];
            let mut p = Piece {
                text: String::new(),
                score: 0.0,
                kind: 1,
            };
            let mut q = 0;
            while q < sub.len() {
                let k = read_varint(sub, &mut q)?;
                match (k >> 3, k & 7) {
                    (1, 2) => {
                        let n = read_varint(sub, &mut q)? as usize;
                        let e = q
                            .checked_add(n)
                            .filter(|&e| e <= sub.len())
                            .ok_or_else(|| anyhow!("truncated piece text"))?;
                        p.text = String::from_utf8(sub[q..e].to_vec())
                            .map_err(|_| anyhow!("piece is not UTF-8"))?;
                        q = e;
                    }
                    (2, 5) => {
                        let e = q + 4;
                        if e > sub.len() {
                            bail!("truncated score");
                        }
                        p.score = f32::from_le_bytes(sub[q..e].try_into().unwrap());
                        q = e;
                    }
                    (3, 0) => p.kind = read_varint(sub, &mut q)? as i32,
                    (_, w) => skip_field(sub, &mut q, w)?,
                }
            }
            pieces.push(p);
            pos = end;
        } else {
            skip_field(b, &mut pos, wire)?;
        }
    }
    if pieces.is_empty() {
        bail!("no pieces");
    }
    Ok(pieces)
}

fn sentencepiece_vocab(ck: &HfCheckpoint, md: &mut Metadata) -> Result<()> {
    let path = ck.dir.join("tokenizer.model");
    let bytes = std::fs::read(&path).with_context(|| format!("{}: cannot read", path.display()))?;
    let pieces = parse_sentencepiece(&bytes)
        .map_err(|e| anyhow!("{}: not a SentencePiece model: {e}", path.display()))?;
    let vocab_size = ck
        .config()?
        .raw
        .get("vocab_size")
        .and_then(J::as_u64)
        .map(|v| v as usize)
        .unwrap_or(pieces.len());
    let mut tokens: Vec<String> = (0..vocab_size).map(|i| format!("[PAD{i}]")).collect();
    let mut scores = vec![-10000.0f32; vocab_size];
    let mut types = vec![UNUSED; vocab_size];
    for (id, p) in pieces.iter().enumerate() {
        if id >= vocab_size {
            break;
        }
        // sentencepiece types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
        types[id] = match p.kind {
            2 => UNKNOWN,
            3 => CONTROL,
            5 => UNUSED,
            6 => BYTE,
            _ => NORMAL,
        };
        tokens[id] = p.text.clone();
        scores[id] = p.score;
    }
    if let Some(J::Object(added)) =
        crate::checkpoint::read_json_opt(&ck.dir.join("added_tokens.json"))?
    {
        for (k, v) in added {
            let Some(id) = v.as_u64().map(|x| x as usize) else {
                continue;
            };
            if id >= vocab_size {
                continue;
            }
            tokens[id] = k.clone();
            scores[id] = -1000.0;
            types[id] = USER_DEFINED;
        }
    }
    if let Some(tc) = ck.read_json("tokenizer_config.json")?
        && let Some(J::Object(atd)) = tc.get("added_tokens_decoder")
    {
        for (k, data) in atd {
            let Ok(id) = k.parse::<usize>() else { continue };
            if id >= vocab_size {
                continue;
            }
            let Some(content) = data.get("content").and_then(J::as_str) else {
                continue;
            };
            let special = data.get("special").and_then(J::as_bool).unwrap_or(false);
            let mut token = content.to_string();
            if special || looks_special(&token) {
                types[id] = CONTROL;
            } else {
                token = token.replace('\u{2581}', " ");
                types[id] = USER_DEFINED;
            }
            scores[id] = -1000.0;
            tokens[id] = token;
        }
    }
    let n = tokens.len();
    md.set("tokenizer.ggml.model", Value::Str("llama".into()));
    md.set("tokenizer.ggml.pre", Value::Str("default".into()));
    md.set("tokenizer.ggml.tokens", Value::Array(Array::Str(tokens)));
    md.set("tokenizer.ggml.scores", Value::Array(Array::F32(scores)));
    md.set("tokenizer.ggml.token_type", Value::Array(Array::I32(types)));
    let sv = SpecialVocab::load(&ck.dir, false, Some(n))?;
    sv.add_to(md);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// gguf-py SpecialVocab

struct SpecialVocab {
    merges: Vec<String>,
    ids: Vec<(String, u32)>,
    add: Vec<(String, bool)>,
    chat_template: Option<J>,
    lowercase: Option<bool>,
    strip_accents: Option<bool>,
    types: Vec<String>,
    n_vocab: Option<usize>,
}

impl SpecialVocab {
    fn load(dir: &Path, load_merges: bool, n_vocab: Option<usize>) -> Result<SpecialVocab> {
        let mut sv = SpecialVocab {
            merges: vec![],
            ids: vec![],
            add: vec![],
            chat_template: None,
            lowercase: None,
            strip_accents: None,
            types: ["bos", "eos", "unk", "sep", "pad", "cls", "mask"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            n_vocab,
        };
        sv.load_tokenizer_json(dir, load_merges)?;
        sv.load_config_json(dir)?;
        if load_merges && sv.merges.is_empty() {
            sv.merges_txt(dir)?;
        }
        Ok(sv)
    }

    fn set_add(&mut self, typ: &str, v: bool, only_default: bool) {
        if let Some(e) = self.add.iter_mut().find(|(k, _)| k == typ) {
            if !only_default {
                e.1 = v;
            }
        } else {
            self.add.push((typ.to_string(), v));
        }
    }

    fn set_special(&mut self, typ: &str, id: Option<&J>) -> Result<()> {
        let Some(id) = id.and_then(J::as_i64) else {
            return Ok(());
        };
        if id < 0 {
            bail!("invalid value for special token type {typ}: {id}");
        }
        if self.n_vocab.is_none_or(|n| (id as usize) < n) && !self.ids.iter().any(|(k, _)| k == typ)
        {
            self.ids.push((typ.to_string(), id as u32));
        }
        Ok(())
    }

    fn parse_normalizer(&mut self, n: &J) {
        match n.get("type").and_then(J::as_str) {
            Some("Lowercase") => self.lowercase = Some(true),
            Some("StripAccents") => self.strip_accents = Some(true),
            Some("BertNormalizer") => {
                if let Some(b) = n.get("lowercase").and_then(J::as_bool) {
                    self.lowercase = Some(b);
                }
                if let Some(b) = n.get("strip_accents").and_then(J::as_bool) {
                    self.strip_accents = Some(b);
                }
            }
            Some("Sequence") => {
                if let Some(J::Array(ns)) = n.get("normalizers") {
                    for x in ns {
                        self.parse_normalizer(x);
                    }
                }
            }
            _ => {}
        }
    }

    fn load_tokenizer_json(&mut self, dir: &Path, load_merges: bool) -> Result<()> {
        let tokenizer = crate::checkpoint::read_json_opt(&dir.join("tokenizer.json"))?;
        let mut added_tokens: Vec<J> = vec![];
        if let Some(t) = &tokenizer {
            if load_merges
                && let Some(J::Array(m)) = t.get("model").and_then(|m| m.get("merges"))
                && let Some(first) = m.first()
            {
                if first.is_string() {
                    self.merges = m
                        .iter()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect();
                } else if first
                    .as_array()
                    .is_some_and(|p| p.len() == 2 && p[0].is_string())
                {
                    let enc = |s: &str| {
                        s.chars()
                            .map(|c| if c == ' ' { '\u{0120}' } else { c })
                            .collect::<String>()
                    };
                    self.merges = m
                        .iter()
                        .filter_map(|p| {
                            let p = p.as_array()?;
                            Some(format!(
                                "{} {}",
                                enc(p.first()?.as_str()?),
                                enc(p.get(1)?.as_str()?)
                            ))
                        })
                        .collect();
                } else {
                    bail!(
                        "{}: unknown tokenizer merges format",
                        dir.join("tokenizer.json").display()
                    );
                }
            }
            if let Some(n) = t.get("normalizer").filter(|n| !n.is_null()) {
                self.parse_normalizer(n);
            }
            if let Some(J::Array(a)) = t.get("added_tokens") {
                added_tokens = a.clone();
            }
        }
        let mut tc: Option<Map<String, J>> =
            match crate::checkpoint::read_json_opt(&dir.join("tokenizer_config.json"))? {
                Some(J::Object(m)) => Some(m),
                _ => None,
            };
        if let Some(t) = &tokenizer {
            let getv = |tc: &Option<Map<String, J>>, k: &str| -> J {
                tc.as_ref()
                    .and_then(|m| m.get(k))
                    .cloned()
                    .unwrap_or(J::Null)
            };
            let truthy = |v: &J| match v {
                J::Null => false,
                J::Bool(b) => *b,
                J::String(s) => !s.is_empty(),
                J::Object(o) => !o.is_empty(),
                J::Array(a) => !a.is_empty(),
                J::Number(n) => n.as_f64() != Some(0.0),
            };
            let tc_truthy =
                |tc: &Option<Map<String, J>>| tc.as_ref().is_some_and(|m| !m.is_empty());
            let mut special_bos = getv(&tc, "bos_token");
            let mut special_cls = getv(&tc, "cls_token");
            let mut special_eos = getv(&tc, "eos_token");
            let mut special_sep = getv(&tc, "sep_token");
            if !truthy(&special_bos) && truthy(&special_cls) && tc_truthy(&tc) {
                special_bos = special_cls.clone();
                tc.as_mut()
                    .unwrap()
                    .insert("bos_token".into(), special_bos.clone());
            }
            if !truthy(&special_eos) && truthy(&special_sep) && tc_truthy(&tc) {
                special_eos = special_sep.clone();
                tc.as_mut()
                    .unwrap()
                    .insert("eos_token".into(), special_eos.clone());
            }
            if let Some(pp) = t.get("post_processor").filter(|p| truthy(p)) {
                let procs: Vec<J> = match pp.get("processors") {
                    Some(J::Array(a)) => a.clone(),
                    _ => vec![pp.clone()],
                };
                for p in procs {
                    match p.get("type").and_then(J::as_str) {
                        Some("ByteLevel") => {
                            self.set_add("bos", false, true);
                            self.set_add("eos", false, true);
                        }
                        Some("RobertaProcessing") => {
                            self.set_add("bos", true, false);
                            self.set_add("eos", true, false);
                            self.set_add("sep", true, false);
                            if !truthy(&special_cls) && tc_truthy(&tc) {
                                special_cls = p
                                    .get("cls")
                                    .and_then(|c| c.get(0))
                                    .cloned()
                                    .unwrap_or(special_bos.clone());
                                tc.as_mut()
                                    .unwrap()
                                    .insert("cls_token".into(), special_cls.clone());
                            }
                            if !truthy(&special_sep) && tc_truthy(&tc) {
                                special_sep = p
                                    .get("sep")
                                    .and_then(|c| c.get(0))
                                    .cloned()
                                    .unwrap_or(special_eos.clone());
                                tc.as_mut()
                                    .unwrap()
                                    .insert("sep_token".into(), special_sep.clone());
                            }
                        }
                        Some("TemplateProcessing") => {
                            let single = p
                                .get("single")
                                .and_then(J::as_array)
                                .cloned()
                                .unwrap_or_default();
                            let pair = p
                                .get("pair")
                                .and_then(J::as_array)
                                .cloned()
                                .unwrap_or_default();
                            let sp_id = |x: &J| -> J {
                                x.get("SpecialToken")
                                    .and_then(|s| s.get("id"))
                                    .cloned()
                                    .unwrap_or(J::Null)
                            };
                            let mut special_first = J::Null;
                            let mut special_last = J::Null;
                            if single.len() > 1 {
                                special_first = sp_id(&single[0]);
                                if truthy(&special_first) {
                                    if !tc_truthy(&tc) {
                                        special_bos = special_first.clone();
                                    } else if special_first != special_bos
                                        && special_first != special_cls
                                    {
                                        if !truthy(&special_bos) {
                                            special_bos = special_first.clone();
                                            tc.as_mut()
                                                .unwrap()
                                                .insert("bos_token".into(), special_bos.clone());
                                        }
                                        if !truthy(&special_cls) {
                                            special_cls = special_first.clone();
                                            tc.as_mut()
                                                .unwrap()
                                                .insert("cls_token".into(), special_cls.clone());
                                        }
                                    }
                                    let v = special_first == special_bos
                                        || special_first == special_cls;
                                    self.set_add("bos", v, false);
                                }
                                special_last = sp_id(&single[single.len() - 1]);
                                if truthy(&special_last) {
                                    if !tc_truthy(&tc) {
                                        special_eos = special_last.clone();
                                    } else if special_last != special_eos {
                                        let m = tc.as_mut().unwrap();
                                        if !self.types.iter().any(|t| t == "eot") {
                                            self.types.push("eot".into());
                                            m.insert("eot_token".into(), special_eos.clone());
                                        } else if !self.types.iter().any(|t| t == "eom") {
                                            self.types.push("eom".into());
                                            m.insert("eom_token".into(), special_eos.clone());
                                        }
                                        special_eos = special_last.clone();
                                        m.insert("eos_token".into(), special_eos.clone());
                                    }
                                    let v = special_last == special_eos;
                                    self.set_add("eos", v, false);
                                }
                            }
                            if !pair.is_empty() {
                                let seq_start =
                                    if truthy(&special_first) && sp_id(&pair[0]) == special_first {
                                        1
                                    } else {
                                        0
                                    };
                                let seq_stop_trim = truthy(&special_last)
                                    && sp_id(&pair[pair.len() - 1]) == special_last;
                                let end = if seq_stop_trim {
                                    pair.len().saturating_sub(1)
                                } else {
                                    pair.len()
                                };
                                let tp: Vec<J> = if seq_start < end {
                                    pair[seq_start..end].to_vec()
                                } else {
                                    vec![]
                                };
                                if !tp.is_empty() {
                                    let seq_id = |x: &J| {
                                        x.get("Sequence")
                                            .and_then(|s| s.get("id"))
                                            .and_then(J::as_str)
                                            .map(str::to_string)
                                    };
                                    let a = seq_id(&tp[0]);
                                    let b = seq_id(&tp[tp.len() - 1]);
                                    if a.as_deref() == Some("A")
                                        && b.as_deref() == Some("B")
                                        && tp.len() > 2
                                    {
                                        let mid = &tp[1..tp.len() - 1];
                                        let mut add_sep = false;
                                        let e0 = sp_id(&mid[0]);
                                        if truthy(&e0)
                                            && (e0 == special_sep || e0 == special_eos)
                                            && !truthy(&special_last)
                                        {
                                            add_sep = true;
                                        }
                                        if mid.len() == 2 {
                                            let e1 = sp_id(&mid[1]);
                                            if truthy(&e1)
                                                && (e1 == special_sep || e1 == special_eos)
                                            {
                                                add_sep = true;
                                            }
                                        }
                                        self.set_add("sep", add_sep, false);
                                        if add_sep && !truthy(&special_sep) && tc_truthy(&tc) {
                                            tc.as_mut()
                                                .unwrap()
                                                .insert("sep_token".into(), special_eos.clone());
                                        }
                                    }
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        let Some(tc) = tc.filter(|m| !m.is_empty()) else {
            return Ok(());
        };
        // chat template: tokenizer_config's, else chat_template.jinja (+ additional), else chat_template.json
        let mut alt: Option<J> = None;
        let jinja = dir.join("chat_template.jinja");
        let json = dir.join("chat_template.json");
        if jinja.is_file() {
            let text = std::fs::read_to_string(&jinja)
                .with_context(|| format!("{}: cannot read", jinja.display()))?;
            let extra_dir = dir.join("additional_chat_templates");
            let mut extras: Vec<(String, String)> = vec![];
            if extra_dir.is_dir() {
                for e in std::fs::read_dir(&extra_dir)?.flatten() {
                    let p = e.path();
                    if p.extension().and_then(|x| x.to_str()) == Some("jinja") {
                        let stem = p.file_stem().unwrap().to_string_lossy().to_string();
                        extras.push((stem, std::fs::read_to_string(&p)?));
                    }
                }
            }
            if extras.is_empty() {
                alt = Some(J::String(text));
            } else {
                let mut list = vec![serde_json::json!({"name": "default", "template": text})];
                for (n, t) in extras {
                    list.push(serde_json::json!({"name": n, "template": t}));
                }
                alt = Some(J::Array(list));
            }
        } else if json.is_file() {
            alt = crate::checkpoint::read_json_opt(&json)?
                .and_then(|v| v.get("chat_template").cloned());
        }
        let ct = tc.get("chat_template").cloned().or(alt);
        self.chat_template = match ct {
            Some(v @ (J::String(_) | J::Array(_))) => Some(v),
            _ => None,
        };
        let types = self.types.clone();
        for typ in &types {
            if let Some(J::Bool(b)) = tc.get(&format!("add_{typ}_token"))
                && !self.add.iter().any(|(k, _)| k == typ)
            {
                self.add.push((typ.clone(), *b));
            }
            let content = match tc.get(&format!("{typ}_token")) {
                Some(J::String(s)) => s.clone(),
                Some(J::Object(o)) => match o.get("content") {
                    Some(J::String(s)) => s.clone(),
                    _ => continue,
                },
                _ => continue,
            };
            let id = added_tokens
                .iter()
                .find(|a| a.get("content").and_then(J::as_str) == Some(content.as_str()))
                .and_then(|a| a.get("id"))
                .cloned();
            self.set_special(typ, id.as_ref())?;
        }
        Ok(())
    }

    fn load_config_json(&mut self, dir: &Path) -> Result<()> {
        let Some(cfg) = crate::checkpoint::read_json_opt(&dir.join("config.json"))? else {
            return Ok(());
        };
        let types = self.types.clone();
        for typ in &types {
            let key = format!("{typ}_token_id");
            let mut id = cfg.get(&key).cloned();
            if id.as_ref().is_none_or(J::is_null)
                && let Some(t) = cfg.get("text_config")
            {
                id = t.get(&key).cloned();
            }
            self.set_special(typ, id.as_ref())?;
        }
        Ok(())
    }

    fn merges_txt(&mut self, dir: &Path) -> Result<()> {
        let p = dir.join("merges.txt");
        if !p.is_file() {
            return Ok(());
        }
        let text = std::fs::read_to_string(&p)?;
        let mut lines = text.lines().peekable();
        if lines.peek().is_some_and(|l| l.trim().starts_with('#')) {
            lines.next();
        }
        let mut merges = vec![];
        for line in lines {
            let parts: Vec<&str> = line.split_whitespace().collect();
            if parts.len() == 2 {
                merges.push(format!("{} {}", parts[0], parts[1]));
            }
        }
        self.merges = merges;
        Ok(())
    }

    fn add_to(&self, md: &mut Metadata) {
        if !self.merges.is_empty() {
            md.set(
                "tokenizer.ggml.merges",
                Value::Array(Array::Str(self.merges.clone())),
            );
        }
        for (typ, id) in &self.ids {
            let key = match typ.as_str() {
                "bos" => "tokenizer.ggml.bos_token_id",
                "eos" => "tokenizer.ggml.eos_token_id",
                "unk" => "tokenizer.ggml.unknown_token_id",
                "sep" => "tokenizer.ggml.seperator_token_id",
                "pad" => "tokenizer.ggml.padding_token_id",
                "mask" => "tokenizer.ggml.mask_token_id",
                _ => continue, // gguf-py has no handler (cls, eot, eom)
            };
            md.set(key, Value::U32(*id));
        }
        for (typ, v) in &self.add {
            let key = match typ.as_str() {
                "bos" => "tokenizer.ggml.add_bos_token",
                "eos" => "tokenizer.ggml.add_eos_token",
                "sep" => "tokenizer.ggml.add_sep_token",
                _ => continue,
            };
            md.set(key, Value::Bool(*v));
        }
        match &self.chat_template {
            Some(J::String(s)) if !s.is_empty() => {
                md.set("tokenizer.chat_template", Value::Str(s.clone()))
            }
            Some(J::Array(list)) => {
                let mut default = None;
                let mut names: Vec<String> = vec![];
                for c in list {
                    let name: String = c
                        .get("name")
                        .and_then(J::as_str)
                        .unwrap_or("")
                        .chars()
                        .map(|ch| if ch.is_ascii_alphanumeric() { ch } else { '_' })
                        .collect();
                    let Some(t) = c.get("template").and_then(J::as_str) else {
                        continue;
                    };
                    if name.is_empty() {
                        continue;
                    }
                    if name == "default" {
                        default = Some(t.to_string());
                    } else {
                        if !names.contains(&name) {
                            names.push(name.clone());
                        }
                        if !t.is_empty() {
                            md.set(
                                &format!("tokenizer.chat_template.{name}"),
                                Value::Str(t.to_string()),
                            );
                        }
                    }
                }
                if !names.is_empty() {
                    md.set("tokenizer.chat_templates", Value::Array(Array::Str(names)));
                }
                if let Some(d) = default.filter(|d| !d.is_empty()) {
                    md.set("tokenizer.chat_template", Value::Str(d));
                }
            }
            _ => {}
        }
        if let Some(b) = self.lowercase {
            md.set("tokenizer.ggml.normalizer.lowercase", Value::Bool(b));
        }
        if let Some(b) = self.strip_accents {
            md.set("tokenizer.ggml.normalizer.strip_accents", Value::Bool(b));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_and_table() {
        assert_eq!(PROBE.chars().count(), 350);
        assert_eq!(
            pre_name_for_hash("855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249"),
            Some("smollm")
        );
        assert!(pre_name_for_hash("00").is_none());
    }

    #[test]
    fn sentencepiece_minimal() {
        // piece { piece: "a" score: -1.5 type: 1 }, piece { piece: "<unk>" type: 2 }
        let mut b = vec![];
        let p1 = [0x0A, 0x01, b'a', 0x15, 0x00, 0x00, 0xC0, 0xBF, 0x18, 0x01];
        b.push(0x0A);
        b.push(p1.len() as u8);
        b.extend_from_slice(&p1);
        let p2 = [0x0A, 0x05, b'<', b'u', b'n', b'k', b'>', 0x18, 0x02];
        b.push(0x0A);
        b.push(p2.len() as u8);
        b.extend_from_slice(&p2);
        let ps = parse_sentencepiece(&b).unwrap();
        assert_eq!(ps.len(), 2);
        assert_eq!(ps[0].text, "a");
        assert_eq!(ps[0].score, -1.5);
        assert_eq!(ps[1].kind, 2);
        assert!(parse_sentencepiece(&[0x0A, 0x09, 0x0A]).is_err());
    }
}
