//! ftconv: fine-tuned LLM checkpoints to what people deploy.
pub mod quant;
