//! Per-tensor type choice (llama-quantize policy).
