//! Causal language models: a Llama-family decoder with its tokenizer ([`causal`]), its
//! tokenizer ([`tokenizer`]) and generation ([`generate`]). Training lives in `train::lm`.

pub mod causal;
pub mod chat;
pub mod generate;
pub mod spm;
pub mod tokenizer;

pub use causal::CausalLm;
pub use generate::{generate, GenerateOptions, Generation, TextStream};
pub use tokenizer::LmTokenizer;
