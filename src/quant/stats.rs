//! Quantization error statistics.
