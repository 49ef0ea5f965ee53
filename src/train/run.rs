//! The training loop (contract stub).
