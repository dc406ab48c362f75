//! File formats and file safety: atomic writes, safetensors with validating reads, GGUF, JSON helpers.
//! Knows nothing about models or deltas beyond tensor names.

pub mod atomic;
pub mod gguf;
pub mod gguf_check;
pub mod tensors;

pub use atomic::{write_atomic, write_json_atomic};
pub use tensors::{read_json, save_tensors, TensorFile};
