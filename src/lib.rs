//! ftconv: fine-tuned LLM checkpoints to what people deploy.
//!
//! One flow for every command: read headers → plan (each output tensor: its sources,
//! transforms, target type) → execute in parallel with bounded memory → write.

pub mod arch;
pub mod chat_template;
pub mod checkpoint;
pub mod cli;
pub mod convert;
pub mod exec;
pub mod gguf;
pub mod gpu;
pub mod lora;
pub mod ollama;
pub mod output;
pub mod plan;
pub mod quant;
pub mod train;
