//! Everything that writes or reads a saved artifact: deltatune's delta directories
//! ([`delta_dir`]), PEFT adapter folders ([`peft`]), llama.cpp LoRA adapter files ([`gguf_lora`]), loading either ([`load`]), merged models
//! ([`merged`]), and the task model (backbone + deltas + head) that training saves
//! ([`task_model`]). The `io` module below holds only file formats and file safety.

pub mod delta_dir;
pub mod gguf_lora;
pub mod load;
pub mod merged;
pub mod peft;
pub mod task_model;

pub use delta_dir::Loaded;
pub use load::load_delta;
pub use merged::{write_merged, write_merged_decoder, write_merged_gguf, GgufWeights};
pub use task_model::TaskModel;
