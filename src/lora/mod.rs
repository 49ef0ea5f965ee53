//! PEFT adapters: reading them (`adapter`), merging them into a base checkpoint exactly as
//! PEFT's `merge_and_unload` does (`merge`), and writing the merged HF folder (`output`).

pub mod adapter;
pub mod export;
pub mod merge;
pub mod output;

pub use adapter::{Adapter, AdapterConfig, PeftType};
