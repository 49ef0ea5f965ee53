//! Training data: JSONL rows → token ids and labels. (contract stub; see the helper brief)

use anyhow::Result;
use std::path::Path;

/// Label value for positions that carry no loss (as transformers' `ignore_index`).
pub const IGNORE: i64 = -100;

/// One tokenized training example. `labels[i]` is `input_ids[i]` where the token is trained and
/// `IGNORE` elsewhere (unshifted, as transformers' `labels`; the loss shifts them).
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
}

#[derive(Clone, Debug)]
pub struct DataOptions {
    /// Keep at most this many tokens (the start).
    pub max_seq_len: usize,
    /// Train on every token, not only the assistant/completion tokens.
    pub train_on_prompt: bool,
}

/// The model's tokenizer, chat template and special tokens, loaded from an HF (or NF4) folder.
pub struct TextEncoder {
    _private: (),
}

impl TextEncoder {
    pub fn from_dir(_dir: &Path) -> Result<TextEncoder> {
        anyhow::bail!("not implemented")
    }
    /// Token id used for padding (the tokenizer's pad token, else EOS).
    pub fn pad_id(&self) -> u32 {
        0
    }
}

/// Read a JSONL file; every non-blank line is one row. A bad row is an error naming the file and
/// the line number.
pub fn load_jsonl(_path: &Path, _enc: &TextEncoder, _opts: &DataOptions) -> Result<Vec<Sample>> {
    anyhow::bail!("not implemented")
}
