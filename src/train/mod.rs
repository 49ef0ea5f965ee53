//! `ftconv finetune`: QLoRA (NF4 base + LoRA) training in candle.
//!
//! - `data`: JSONL rows (messages, prompt/completion, text, ShareGPT, Alpaca) → token ids + labels
//!   (-100 where no loss), rendered with the model's chat template. No candle.
//! - `model`: the llama-family forward pass from differentiable candle ops, frozen base weights
//!   (NF4 double-quantized, dequantized tile by tile, or bf16/f32), LoRA layers.
//! - `optim`: AdamW with savable state, learning-rate schedules, gradient clipping.
//! - `run`: the training loop, checkpoints, resume, the JSONL log, the PEFT adapter output.

pub mod data;
#[cfg(feature = "train")]
pub mod model;
#[cfg(feature = "train")]
pub mod optim;
#[cfg(feature = "train")]
pub mod run;
