//! Causal language models: a Llama-family decoder with its tokenizer, and generation.

pub mod generate;
pub mod tokenizer;
pub mod train;

pub use generate::{generate, GenerateOptions, Generation};
pub use tokenizer::LmTokenizer;

use crate::backbone::llama::LlamaModel;
use crate::error::Result;
use crate::io::gguf::GgufFile;
use candle_core::Device;
use std::path::{Path, PathBuf};

/// A decoder and its tokenizer, loaded from a GGUF file or an HF directory.
#[derive(Debug)]
pub struct CausalLm {
    pub model: LlamaModel,
    pub tokenizer: LmTokenizer,
}

impl CausalLm {
    /// Loads `path`: a `.gguf` file, a directory with one `.gguf` file, or an HF directory
    /// (config.json, model.safetensors, tokenizer.json). A tokenizer.json beside a GGUF file wins
    /// over the GGUF's own vocabulary.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let model = LlamaModel::load(path, device)?;
        let tokenizer = match &model.source {
            crate::backbone::llama::LlamaSource::Gguf { path: gguf, .. } => {
                let dir: PathBuf = gguf.parent().map(Path::to_path_buf).unwrap_or_default();
                if dir.join("tokenizer.json").is_file() {
                    LmTokenizer::from_dir(&dir)?
                } else {
                    LmTokenizer::from_gguf(&GgufFile::open(gguf)?)?
                }
            }
            crate::backbone::llama::LlamaSource::Safetensors { dir } => LmTokenizer::from_dir(dir)?,
        };
        Ok(CausalLm { model, tokenizer })
    }
}
