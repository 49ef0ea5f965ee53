//! Sharded safetensors writer (filled in with the merge and NF4 outputs).
