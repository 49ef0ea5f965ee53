//! The llama-family forward pass with LoRA (contract stub).
