//! [`CausalLm`]: a decoder and its tokenizer, loaded together from a GGUF file or an HF directory.

use super::tokenizer::LmTokenizer;
use crate::backbone::llama::{DecoderPath, LlamaModel};
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
        let (model, tokenizer) = match DecoderPath::resolve(path)? {
            DecoderPath::Gguf(file) => {
                // One parse of the GGUF header serves the tokenizer and the model.
                let g = GgufFile::open(&file)?;
                let dir: PathBuf = file.parent().map(Path::to_path_buf).unwrap_or_default();
                let tokenizer = if dir.join("tokenizer.json").is_file() { LmTokenizer::from_dir(&dir)? } else { LmTokenizer::from_gguf(&g)? };
                (LlamaModel::from_gguf(g, &file, device)?, tokenizer)
            }
            DecoderPath::Hf(dir) => (LlamaModel::load_hf(&dir, device)?, LmTokenizer::from_dir(&dir)?),
        };
        Ok(CausalLm { model, tokenizer })
    }
}
