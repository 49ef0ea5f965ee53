//! Training data: JSONL rows → token ids and labels, as TRL's `SFTTrainer` builds them
//! (nf4-peft.md §5.6, decisions.md "Fine-tuning"). No candle here: this module builds without the
//! `train` feature.
//!
//! # Row formats (one JSON object per non-blank line)
//!
//! A row's format is chosen by its keys, in this order (other keys in a row are ignored, so ids
//! and metadata may ride along; e.g. tatsu-lab/alpaca's rows, which also carry `text`, are Alpaca):
//!
//! | keys | format | trained tokens |
//! | --- | --- | --- |
//! | `messages` | conversation | every assistant turn: its content and the template's end-of-turn marker |
//! | `conversations` | ShareGPT (`from` human/gpt/system → user/assistant/system, `value` → content) | as `messages` |
//! | `prompt` + `completion`, strings | prompt-completion | completion + EOS |
//! | `prompt` + `completion`, message lists | conversational prompt-completion | the completion's rendering |
//! | `instruction` + `output` (+ `input`) | Alpaca | as one user + one assistant turn; without a chat template: the Stanford-Alpaca prompt as prompt, `output` as completion |
//! | `text` | language modeling | all tokens (EOS appended when missing) |
//!
//! With [`DataOptions::train_on_prompt`] every token is trained. A row may carry `tools` (a list),
//! passed to the chat template as transformers' `apply_chat_template(tools=...)` does.
//!
//! # Tokenization
//!
//! * Plain text (`text`, string prompt/completion, Alpaca without a template) is tokenized with
//!   the tokenizer's special tokens: what the tokenizer.json post-processor adds (BOS for Llama,
//!   Mistral, Gemma; nothing for SmolLM2, Qwen). As in transformers 5 (`from_pretrained` drops
//!   tokenizer_config.json's `add_bos_token` / `add_eos_token` when tokenizer.json exists), those
//!   two flags do not change the ids; where they disagree with the post-processor,
//!   [`TextEncoder::warnings`] says so (transformers 4's Llama-family classes obeyed the flags).
//! * Conversations are rendered with the chat template (`add_generation_prompt=false`) and
//!   tokenized WITHOUT special tokens (the template writes BOS etc.), as
//!   `apply_chat_template(tokenize=True)`.
//! * Prompt-completion (TRL): tokenize `prompt` and `prompt + completion`; the trained tokens start
//!   at the length of the two id lists' common prefix; the EOS id is appended when the ids do not
//!   already end with it. The conversational variant renders the prompt with
//!   `add_generation_prompt=true` and the whole with `false` (no EOS appended: the template ends
//!   the turn).
//!
//! # Locating assistant turns in a conversation
//!
//! For each assistant message `i`, `P` = rendering of `messages[..i]` with
//! `add_generation_prompt=true` and `T` = rendering of `messages[..=i]` with
//! `add_generation_prompt=false`; both must be prefixes of the whole rendering `F` (else the
//! template is not prefix-stable, e.g. one that rewrites earlier assistant turns, and the row is an
//! error; `train_on_prompt` does not need this). The assistant span is the bytes
//! `P.len()..T.len()` of `F`. A token is trained when its bytes (tokenizer offsets) overlap a
//! span, as transformers' `return_assistant_tokens_mask` marks the tokens from the one holding a
//! generation span's first character to the one holding its last: a token straddling either end
//! of the span is trained (e.g. `" Paris"` after a prompt that ends with `"Response:"` and an
//! answer `"Paris"` preceded by the template's space).
//!
//! Whatever the template writes after the end-of-turn marker inside the assistant message (ChatML's
//! `"\n"` after `<|im_end|>`) is part of `T` and therefore trained: with the SmolLM2/ChatML
//! template the trained text of `{"role":"assistant","content":"Paris"}` is `"Paris<|im_end|>\n"`.
//! Text a template writes at the start of the next turn (before that turn's header) is not.
//!
//! # Truncation and empty rows
//!
//! Samples keep their first [`DataOptions::max_seq_len`] tokens. A row left with no trained
//! token (a conversation without an assistant turn, or a prompt longer than `max_seq_len`) is still
//! returned, so that indices follow the file; the caller drops such samples
//! ([`Sample::trained_tokens`] is 0, see [`drop_untrained`]) and should say how many it dropped.

use crate::chat_template::ChatTemplate;
use crate::checkpoint::read_json_opt;
use anyhow::{Context, Result, anyhow, bail};
use rayon::prelude::*;
use serde_json::{Map, Value as J, json};
use std::ops::Range;
use std::path::Path;
use tokenizers::Tokenizer;

/// Each token's byte range in the tokenized text.
pub type ByteOffsets = Vec<(usize, usize)>;

/// Label value for positions that carry no loss (as transformers' `ignore_index`).
pub const IGNORE: i64 = -100;

/// One tokenized training example. `labels[i]` is `input_ids[i]` where the token is trained and
/// `IGNORE` elsewhere (unshifted, as transformers' `labels`; the loss shifts them).
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
}

impl Sample {
    /// Number of labels the causal-LM loss uses: those not [`IGNORE`], after the first
    /// position (the loss shifts the labels by one, so nothing predicts position 0).
    pub fn trained_tokens(&self) -> usize {
        self.labels.iter().skip(1).filter(|&&l| l != IGNORE).count()
    }

    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Keep the first `n` tokens.
    pub fn truncate(&mut self, n: usize) {
        self.input_ids.truncate(n);
        self.labels.truncate(n);
    }

    fn new(input_ids: Vec<u32>, trained: impl Fn(usize) -> bool) -> Sample {
        let labels = input_ids
            .iter()
            .enumerate()
            .map(|(k, &id)| if trained(k) { id as i64 } else { IGNORE })
            .collect();
        Sample { input_ids, labels }
    }
}

/// Remove the samples with no trained token; returns them and how many were removed.
pub fn drop_untrained(samples: Vec<Sample>) -> (Vec<Sample>, usize) {
    let n = samples.len();
    let kept: Vec<Sample> = samples
        .into_iter()
        .filter(|s| s.trained_tokens() > 0)
        .collect();
    let dropped = n - kept.len();
    (kept, dropped)
}

#[derive(Clone, Debug)]
pub struct DataOptions {
    /// Keep at most this many tokens (the start).
    pub max_seq_len: usize,
    /// Train on every token, not only the assistant/completion tokens.
    pub train_on_prompt: bool,
}

impl Default for DataOptions {
    /// TRL's defaults: `max_length` 1024, completion/assistant-only loss.
    fn default() -> Self {
        DataOptions {
            max_seq_len: 1024,
            train_on_prompt: false,
        }
    }
}

/// The Stanford-Alpaca prompt text (`ALPACA_PROMPT_DICT` in qlora.py) for an instruction and an
/// optional input, used for Alpaca rows when the model has no chat template.
pub fn alpaca_prompt(instruction: &str, input: &str) -> String {
    if input.is_empty() {
        format!(
            "Below is an instruction that describes a task. Write a response that appropriately \
             completes the request.\n\n### Instruction:\n{instruction}\n\n### Response: "
        )
    } else {
        format!(
            "Below is an instruction that describes a task, paired with an input that provides \
             further context. Write a response that appropriately completes the request.\n\n\
             ### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response: "
        )
    }
}

/// Message roles a `messages` row may use (the chat template decides what it accepts).
const ROLES: [&str; 7] = [
    "system",
    "user",
    "assistant",
    "tool",
    "ipython",
    "developer",
    "function",
];

/// The model's tokenizer, chat template and special tokens, loaded from an HF (or NF4) folder.
pub struct TextEncoder {
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    /// Where the template came from (for messages).
    template_origin: Option<String>,
    /// `bos_token`, `eos_token`, … (strings) as the template's context gets them.
    special: Map<String, J>,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    pad_id: Option<u32>,
    /// What the caller should tell the user (config flags the tokenizer does not follow).
    warnings: Vec<String>,
    /// Whether tokenizer.json's post-processor adds BOS / EOS.
    post_adds_bos: bool,
    post_adds_eos: bool,
    dir_name: String,
}

fn token_string(v: &J) -> Option<String> {
    match v {
        J::String(s) => Some(s.clone()),
        J::Object(m) => m.get("content").and_then(J::as_str).map(str::to_string),
        _ => None,
    }
}

fn read_config(path: &Path) -> Result<Map<String, J>> {
    match read_json_opt(path)? {
        None => Ok(Map::new()),
        Some(J::Object(m)) => Ok(m),
        Some(_) => bail!("{}: not a JSON object", path.display()),
    }
}

/// The chat template as transformers finds it: chat_template.jinja, else tokenizer_config.json's
/// `chat_template` (a string, or a list of named templates: "default"), else chat_template.json.
fn find_template(dir: &Path, tc: &Map<String, J>) -> Result<Option<(String, String)>> {
    let tc_path = dir.join("tokenizer_config.json");
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        let t = std::fs::read_to_string(&jinja)
            .with_context(|| format!("{}: cannot read as UTF-8 text", jinja.display()))?;
        return Ok(Some((t, jinja.display().to_string())));
    }
    let from_value = |v: &J, origin: String| -> Result<Option<(String, String)>> {
        match v {
            J::String(s) => Ok(Some((s.clone(), origin))),
            J::Array(list) => {
                let def = list
                    .iter()
                    .find(|e| e.get("name").and_then(J::as_str) == Some("default"))
                    .and_then(|e| e.get("template"))
                    .and_then(J::as_str)
                    .ok_or_else(|| {
                        anyhow!("{origin}: chat_template is a list without a \"default\" entry")
                    })?;
                Ok(Some((def.to_string(), format!("{origin} (default)"))))
            }
            J::Null => Ok(None),
            _ => bail!("{origin}: chat_template is neither a string nor a list"),
        }
    };
    if let Some(v) = tc.get("chat_template") {
        return from_value(v, format!("{} chat_template", tc_path.display()));
    }
    let cj = dir.join("chat_template.json");
    if let Some(v) = read_json_opt(&cj)?
        && let Some(t) = v.get("chat_template")
    {
        return from_value(t, format!("{} chat_template", cj.display()));
    }
    Ok(None)
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl TextEncoder {
    /// Load `tokenizer.json` (required), `tokenizer_config.json` and `special_tokens_map.json`
    /// (special tokens; `add_bos_token` / `add_eos_token` only for [`TextEncoder::warnings`]) and
    /// the chat template (optional) from `dir`. Errors name the file.
    pub fn from_dir(dir: &Path) -> Result<TextEncoder> {
        let tj = dir.join("tokenizer.json");
        if !tj.is_file() {
            bail!(
                "{}: not found (training needs the model's fast tokenizer file)",
                tj.display()
            );
        }
        let mut tokenizer = Tokenizer::from_file(&tj)
            .map_err(|e| anyhow!("{}: cannot load tokenizer: {e}", tj.display()))?;
        // transformers ignores the file's own truncation / padding unless asked for them
        tokenizer
            .with_truncation(None)
            .map_err(|e| anyhow!("{}: {e}", tj.display()))?;
        tokenizer.with_padding(None);

        let tc_path = dir.join("tokenizer_config.json");
        let tc = read_config(&tc_path)?;
        let stm_path = dir.join("special_tokens_map.json");
        let stm = read_config(&stm_path)?;

        let mut special = Map::new();
        for key in [
            "bos_token",
            "eos_token",
            "unk_token",
            "pad_token",
            "sep_token",
            "cls_token",
            "mask_token",
        ] {
            let mut found = None;
            for (m, path) in [(&tc, &tc_path), (&stm, &stm_path)] {
                match m.get(key) {
                    None | Some(J::Null) => continue,
                    Some(v) => {
                        let s = token_string(v).ok_or_else(|| {
                            anyhow!(
                                "{}: {key} is neither a string nor an object with a \"content\" string",
                                path.display()
                            )
                        })?;
                        found = Some((s, path));
                        break;
                    }
                }
            }
            if let Some((s, path)) = found {
                if matches!(key, "bos_token" | "eos_token" | "pad_token")
                    && tokenizer.token_to_id(&s).is_none()
                {
                    bail!(
                        "{}: {key} {s:?} is not a token of {}",
                        path.display(),
                        tj.display()
                    );
                }
                special.insert(key.into(), J::String(s));
            }
        }
        let id_of = |key: &str| {
            special
                .get(key)
                .and_then(J::as_str)
                .and_then(|s| tokenizer.token_to_id(s))
        };
        let bos_id = id_of("bos_token");
        let eos_id = id_of("eos_token");
        let pad_id = id_of("pad_token");

        let flag = |key: &str| -> Result<Option<bool>> {
            match tc.get(key) {
                None | Some(J::Null) => Ok(None),
                Some(J::Bool(b)) => Ok(Some(*b)),
                Some(_) => bail!("{}: {key} is not true or false", tc_path.display()),
            }
        };
        let cfg_add_bos = flag("add_bos_token")?;
        let cfg_add_eos = flag("add_eos_token")?;

        // what the post-processor adds around a text
        let probe = |special: bool| -> Result<Vec<u32>> {
            Ok(tokenizer
                .encode("a", special)
                .map_err(|e| anyhow!("{}: cannot encode: {e}", tj.display()))?
                .get_ids()
                .to_vec())
        };
        let (with, without) = (probe(true)?, probe(false)?);
        let post_adds_bos = bos_id.is_some_and(|b| {
            with.len() > without.len() && with.first() == Some(&b) && without.first() != Some(&b)
        });
        let post_adds_eos = eos_id.is_some_and(|e| {
            with.len() > without.len() && with.last() == Some(&e) && without.last() != Some(&e)
        });

        let mut warnings = Vec::new();
        for (key, flag, post, tok) in [
            ("add_bos_token", cfg_add_bos, post_adds_bos, "BOS"),
            ("add_eos_token", cfg_add_eos, post_adds_eos, "EOS"),
        ] {
            if let Some(f) = flag
                && f != post
            {
                warnings.push(format!(
                    "{}: {key} is {f}, but {}'s post-processor {} {tok}; following tokenizer.json \
                     (as transformers 5 does)",
                    tc_path.display(),
                    tj.display(),
                    if post { "adds" } else { "does not add" }
                ));
            }
        }

        let (template, template_origin) = match find_template(dir, &tc)? {
            Some((src, origin)) => {
                let t = ChatTemplate::new(&src).map_err(|e| anyhow!("{origin}: {e}"))?;
                (Some(t), Some(origin))
            }
            None => (None, None),
        };

        Ok(TextEncoder {
            tokenizer,
            template,
            template_origin,
            special,
            bos_id,
            eos_id,
            pad_id,
            warnings,
            post_adds_bos,
            post_adds_eos,
            dir_name: dir.display().to_string(),
        })
    }

    /// Token id used for padding (the tokenizer's pad token, else EOS, else 0).
    pub fn pad_id(&self) -> u32 {
        self.pad_id.or(self.eos_id).unwrap_or(0)
    }

    /// The tokenizer's EOS token id (tokenizer_config.json / special_tokens_map.json `eos_token`).
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// The tokenizer's BOS token id.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// Whether plain text gets BOS / EOS when tokenized with special tokens (the tokenizer.json
    /// post-processor adds them).
    pub fn adds_bos(&self) -> bool {
        self.post_adds_bos
    }
    pub fn adds_eos(&self) -> bool {
        self.post_adds_eos
    }

    /// Notes for the user about the tokenizer files (e.g. `add_bos_token` disagreeing with the
    /// tokenizer.json post-processor, which wins). Print them once.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    pub fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }

    /// Where the chat template came from (file, key), if there is one.
    pub fn chat_template_origin(&self) -> Option<&str> {
        self.template_origin.as_deref()
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Token ids → text, special tokens kept.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| anyhow!("cannot decode: {e}"))
    }

    /// Tokenize `text` without special tokens (as text rendered by a chat template): ids and byte
    /// offsets into `text`.
    pub fn encode_plain(&self, text: &str) -> Result<(Vec<u32>, ByteOffsets)> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| anyhow!("cannot tokenize: {e}"))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// Tokenize `text` with the tokenizer's special tokens (what the tokenizer.json
    /// post-processor adds: BOS for Llama-family tokenizers), as `tokenizer(text).input_ids`.
    pub fn encode_with_special(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode(text, true)
            .map_err(|e| anyhow!("cannot tokenize: {e}"))?
            .get_ids()
            .to_vec())
    }

    fn template(&self) -> Result<&ChatTemplate> {
        self.template.as_ref().ok_or_else(|| {
            anyhow!(
                "the model has no chat template (no chat_template.jinja and no chat_template in {}'s \
                 tokenizer_config.json); conversations need one: use text or prompt/completion rows",
                self.dir_name
            )
        })
    }

    /// Render `messages` (a JSON list) with the chat template, as `apply_chat_template(tokenize=False)`.
    pub fn render(&self, messages: &J, add_generation_prompt: bool) -> Result<String> {
        self.render_with(messages, add_generation_prompt, None)
    }

    fn render_with(
        &self,
        messages: &J,
        add_generation_prompt: bool,
        tools: Option<&J>,
    ) -> Result<String> {
        let tpl = self.template()?;
        let mut extra = self.special.clone();
        if let Some(t) = tools {
            extra.insert("tools".into(), t.clone());
        }
        tpl.render(messages, add_generation_prompt, &J::Object(extra))
    }

    /// Tokenize one row with the default options (assistant/completion tokens trained), without
    /// truncation. Errors say what is wrong with the row (no file/line: [`load_jsonl`] adds them).
    pub fn encode_row(&self, row: &J) -> Result<Sample> {
        self.encode_row_untruncated(row, false)
    }

    /// Tokenize one row with `opts` (masking and truncation).
    pub fn encode_row_with(&self, row: &J, opts: &DataOptions) -> Result<Sample> {
        if opts.max_seq_len == 0 {
            bail!("max_seq_len must be at least 1");
        }
        let mut s = self.encode_row_untruncated(row, opts.train_on_prompt)?;
        s.truncate(opts.max_seq_len);
        Ok(s)
    }

    fn encode_row_untruncated(&self, row: &J, all: bool) -> Result<Sample> {
        let J::Object(obj) = row else {
            bail!("not a JSON object");
        };
        let tools = match obj.get("tools") {
            None | Some(J::Null) => None,
            Some(t @ J::Array(_)) => Some(t),
            Some(_) => bail!("\"tools\" must be a list"),
        };
        if let Some(m) = obj.get("messages") {
            let msgs = check_messages(m, "messages")?;
            return self.encode_conversation(&msgs, tools, all);
        }
        if let Some(c) = obj.get("conversations") {
            let msgs = sharegpt_messages(c)?;
            return self.encode_conversation(&msgs, tools, all);
        }
        if obj.contains_key("prompt") || obj.contains_key("completion") {
            let (Some(p), Some(c)) = (obj.get("prompt"), obj.get("completion")) else {
                let missing = if obj.contains_key("prompt") {
                    "completion"
                } else {
                    "prompt"
                };
                bail!("a prompt/completion row without \"{missing}\"");
            };
            return match (p, c) {
                (J::String(p), J::String(c)) => self.encode_prompt_completion(p, c, all),
                (J::Array(_), J::Array(_)) => {
                    let p = check_messages(p, "prompt")?;
                    let c = check_messages(c, "completion")?;
                    self.encode_conversational_pc(&p, &c, tools, all)
                }
                _ => bail!(
                    "\"prompt\" and \"completion\" must both be strings or both be lists of messages"
                ),
            };
        }
        if obj.contains_key("instruction") || obj.contains_key("output") {
            let get = |k: &str, required: bool| -> Result<String> {
                match obj.get(k) {
                    Some(J::String(s)) => Ok(s.clone()),
                    None | Some(J::Null) if !required => Ok(String::new()),
                    None => bail!("an Alpaca row (instruction/input/output) without \"{k}\""),
                    Some(_) => bail!("\"{k}\" must be a string"),
                }
            };
            let instruction = get("instruction", true)?;
            let input = get("input", false)?;
            let output = get("output", true)?;
            if self.template.is_some() {
                let mut user = instruction;
                if !input.is_empty() {
                    user.push_str("\n\n");
                    user.push_str(&input);
                }
                let msgs = vec![
                    json!({"role": "user", "content": user}),
                    json!({"role": "assistant", "content": output}),
                ];
                return self.encode_conversation(&msgs, tools, all);
            }
            return self.encode_prompt_completion(
                &alpaca_prompt(&instruction, &input),
                &output,
                all,
            );
        }
        if let Some(t) = obj.get("text") {
            let J::String(t) = t else {
                bail!("\"text\" must be a string");
            };
            let mut ids = self.encode_with_special(t)?;
            self.push_eos(&mut ids);
            return Ok(Sample::new(ids, |_| true));
        }
        let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        bail!(
            "unknown row format (keys: {}); expected \"messages\", \"conversations\" (ShareGPT), \
             \"prompt\" + \"completion\", \"instruction\" + \"output\" (Alpaca) or \"text\"",
            if keys.is_empty() {
                "none".to_string()
            } else {
                keys.join(", ")
            }
        )
    }

    fn push_eos(&self, ids: &mut Vec<u32>) {
        if let Some(e) = self.eos_id
            && ids.last() != Some(&e)
        {
            ids.push(e);
        }
    }

    /// TRL prompt-completion: labels from the common prefix of tok(prompt) and
    /// tok(prompt + completion), EOS appended.
    fn encode_prompt_completion(
        &self,
        prompt: &str,
        completion: &str,
        all: bool,
    ) -> Result<Sample> {
        let p = self.encode_with_special(prompt)?;
        let mut ids = self.encode_with_special(&format!("{prompt}{completion}"))?;
        self.push_eos(&mut ids);
        let start = common_prefix(&p, &ids);
        Ok(Sample::new(ids, |k| all || k >= start))
    }

    fn encode_conversational_pc(
        &self,
        prompt: &[J],
        completion: &[J],
        tools: Option<&J>,
        all: bool,
    ) -> Result<Sample> {
        let p_text = self.render_with(&J::Array(prompt.to_vec()), true, tools)?;
        let mut whole = prompt.to_vec();
        whole.extend_from_slice(completion);
        let text = self.render_with(&J::Array(whole), false, tools)?;
        let (p, _) = self.encode_plain(&p_text)?;
        let (ids, _) = self.encode_plain(&text)?;
        let start = common_prefix(&p, &ids);
        Ok(Sample::new(ids, |k| all || k >= start))
    }

    /// Byte ranges of the assistant turns within the rendering `full` of `msgs`.
    fn assistant_spans(
        &self,
        msgs: &[J],
        tools: Option<&J>,
        full: &str,
    ) -> Result<Vec<Range<usize>>> {
        let mut spans = Vec::new();
        for (i, m) in msgs.iter().enumerate() {
            if m.get("role").and_then(J::as_str) != Some("assistant") {
                continue;
            }
            let pre = self.render_with(&J::Array(msgs[..i].to_vec()), true, tools)?;
            let through = self.render_with(&J::Array(msgs[..=i].to_vec()), false, tools)?;
            let unstable = |what: &str| {
                anyhow!(
                    "the chat template is not prefix-stable: the rendering of {what} is not a prefix \
                     of the whole conversation's, so assistant message {} (messages[{i}]) cannot be \
                     located; train on the whole text (train_on_prompt) or use prompt/completion rows",
                    i + 1
                )
            };
            if !full.starts_with(&pre) {
                return Err(unstable(&format!(
                    "messages[..{i}] with add_generation_prompt=true"
                )));
            }
            if !full.starts_with(&through) || through.len() < pre.len() {
                return Err(unstable(&format!("messages[..={i}]")));
            }
            spans.push(pre.len()..through.len());
        }
        Ok(spans)
    }

    fn encode_conversation(&self, msgs: &[J], tools: Option<&J>, all: bool) -> Result<Sample> {
        if msgs.is_empty() {
            bail!("the conversation has no messages");
        }
        let full = self.render_with(&J::Array(msgs.to_vec()), false, tools)?;
        let spans = if all {
            Vec::new()
        } else {
            self.assistant_spans(msgs, tools, &full)?
        };
        let (ids, offsets) = self.encode_plain(&full)?;
        let overlaps = |(a, b): (usize, usize), s: &Range<usize>| {
            if a == b {
                s.contains(&a)
            } else {
                a < s.end && b > s.start
            }
        };
        Ok(Sample::new(ids, |k| {
            all || spans.iter().any(|s| overlaps(offsets[k], s))
        }))
    }
}

/// Validate a list of messages: objects with a known `role` and a string `content` (null or
/// absent allowed only beside `tool_calls`).
fn check_messages(v: &J, key: &str) -> Result<Vec<J>> {
    let J::Array(list) = v else {
        bail!("\"{key}\" must be a list of messages");
    };
    for (k, m) in list.iter().enumerate() {
        let J::Object(o) = m else {
            bail!("{key}[{k}] is not an object");
        };
        let role = match o.get("role") {
            Some(J::String(r)) => r.as_str(),
            None => bail!("{key}[{k}] has no \"role\""),
            Some(_) => bail!("{key}[{k}].role must be a string"),
        };
        if !ROLES.contains(&role) {
            bail!(
                "{key}[{k}]: unknown role {role:?} (expected {})",
                ROLES.join(", ")
            );
        }
        match o.get("content") {
            Some(J::String(_)) => {}
            None | Some(J::Null) if o.contains_key("tool_calls") => {}
            None => bail!("{key}[{k}] has no \"content\""),
            Some(_) => bail!("{key}[{k}].content must be a string"),
        }
    }
    Ok(list.clone())
}

/// ShareGPT `conversations` → messages (human→user, gpt→assistant, system→system).
fn sharegpt_messages(v: &J) -> Result<Vec<J>> {
    let J::Array(list) = v else {
        bail!("\"conversations\" must be a list of {{\"from\", \"value\"}} objects");
    };
    list.iter()
        .enumerate()
        .map(|(k, m)| {
            let J::Object(o) = m else {
                bail!("conversations[{k}] is not an object");
            };
            let role = match o.get("from") {
                Some(J::String(f)) => match f.as_str() {
                    "human" => "user",
                    "gpt" => "assistant",
                    "system" => "system",
                    other => bail!(
                        "conversations[{k}]: unknown ShareGPT role {other:?} (expected human, gpt or system)"
                    ),
                },
                None => bail!("conversations[{k}] has no \"from\""),
                Some(_) => bail!("conversations[{k}].from must be a string"),
            };
            let content = match o.get("value") {
                Some(J::String(s)) => s.clone(),
                None => bail!("conversations[{k}] has no \"value\""),
                Some(_) => bail!("conversations[{k}].value must be a string"),
            };
            Ok(json!({"role": role, "content": content}))
        })
        .collect()
}

/// Read a JSONL file; every non-blank line is one row. A bad row is an error naming the file and
/// the line number (the first bad line). Rows are tokenized in parallel; the samples keep the
/// file's order, one per row, including rows with no trained token (see the module docs).
pub fn load_jsonl(path: &Path, enc: &TextEncoder, opts: &DataOptions) -> Result<Vec<Sample>> {
    if opts.max_seq_len == 0 {
        bail!("max_seq_len must be at least 1");
    }
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let text =
        String::from_utf8(bytes).map_err(|e| anyhow!("{}: not UTF-8 text: {e}", path.display()))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let lines: Vec<(usize, &str)> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| (i + 1, l))
        .collect();
    if lines.is_empty() {
        bail!("{}: no rows (the file is empty)", path.display());
    }
    let results: Vec<Result<Sample>> = lines
        .par_iter()
        .map(|&(n, line)| {
            let row: J = serde_json::from_str(line)
                .map_err(|e| anyhow!("{}:{n}: not valid JSON: {e}", path.display()))?;
            enc.encode_row_with(&row, opts)
                .map_err(|e| anyhow!("{}:{n}: {e:#}", path.display()))
        })
        .collect();
    results.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpaca_prompts() {
        assert_eq!(
            alpaca_prompt("Add.", ""),
            "Below is an instruction that describes a task. Write a response that appropriately \
             completes the request.\n\n### Instruction:\nAdd.\n\n### Response: "
        );
        let p = alpaca_prompt("Add {input}.", "1 {instruction} 2");
        assert!(p.contains(
            "### Instruction:\nAdd {input}.\n\n### Input:\n1 {instruction} 2\n\n### Response: "
        ));
        assert!(
            p.starts_with("Below is an instruction that describes a task, paired with an input")
        );
    }

    #[test]
    fn prefix_and_masks() {
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4, 5]), 2);
        assert_eq!(common_prefix(&[], &[1]), 0);
        let s = Sample::new(vec![5, 6, 7], |k| k > 0);
        assert_eq!(s.labels, vec![IGNORE, 6, 7]);
        assert_eq!(s.trained_tokens(), 2);
        let (kept, dropped) = drop_untrained(vec![s.clone(), Sample::new(vec![1], |_| false)]);
        assert_eq!((kept, dropped), (vec![s], 1));
        // a label at position 0 alone is nothing the loss sees
        let first_only = Sample::new(vec![5, 6], |k| k == 0);
        assert_eq!(first_only.trained_tokens(), 0);
        assert_eq!(drop_untrained(vec![first_only]).1, 1);
    }

    #[test]
    fn sharegpt_mapping() {
        let m = sharegpt_messages(&json!([
            {"from": "system", "value": "S"},
            {"from": "human", "value": "U"},
            {"from": "gpt", "value": "A"}
        ]))
        .unwrap();
        assert_eq!(
            J::Array(m),
            json!([
                {"role": "system", "content": "S"},
                {"role": "user", "content": "U"},
                {"role": "assistant", "content": "A"}
            ])
        );
        let e = sharegpt_messages(&json!([{"from": "bot", "value": "x"}])).unwrap_err();
        assert!(
            e.to_string().contains("unknown ShareGPT role \"bot\""),
            "{e}"
        );
    }
}
