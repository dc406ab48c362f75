//! Tokenization with the `tokenizers` crate from a model's `tokenizer.json`.
//!
//! The default model's `tokenizer.json` carries fixed padding (128) and truncation (128); like
//! transformers, we replace both with the caller's settings: truncation to `max_length` with the
//! longest-first strategy, no padding at encode time, and padding only when a batch is built.

use crate::error::{Error, Result};
use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

/// One encoded example: ids with special tokens, segment ids and a mask of ones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoding {
    pub input_ids: Vec<u32>,
    pub token_type_ids: Vec<u32>,
}

/// How to pad a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Padding {
    /// Pad to the longest sequence of the batch.
    Longest,
    /// Pad (and never exceed) a fixed length.
    Fixed(usize),
}

/// A padded batch, ready for a backbone.
///
/// # Shapes
/// `input_ids`, `token_type_ids`: (b, t) u32; `attention_mask`: (b, t) f32 of 0/1.
#[derive(Clone, Debug)]
pub struct EncodedBatch {
    pub input_ids: Tensor,
    pub token_type_ids: Tensor,
    pub attention_mask: Tensor,
    /// Real (unpadded) length of each row.
    pub lengths: Vec<usize>,
}

impl EncodedBatch {
    pub fn batch_size(&self) -> usize {
        self.lengths.len()
    }

    pub fn seq_len(&self) -> usize {
        self.input_ids.dim(1).unwrap_or(0)
    }

    /// Pads `encodings` into tensors on `device`.
    pub fn collate(encodings: &[Encoding], padding: Padding, pad_id: u32, device: &Device) -> Result<Self> {
        let longest = encodings.iter().map(|e| e.input_ids.len()).max().unwrap_or(0);
        let t = match padding {
            Padding::Longest => longest,
            Padding::Fixed(n) => n,
        };
        if longest > t {
            return Err(Error::arg("padding", format!("a sequence of {longest} tokens exceeds the fixed length {t}")));
        }
        let b = encodings.len();
        let mut ids = vec![pad_id; b * t];
        let mut types = vec![0u32; b * t];
        let mut mask = vec![0f32; b * t];
        for (i, e) in encodings.iter().enumerate() {
            let n = e.input_ids.len();
            ids[i * t..i * t + n].copy_from_slice(&e.input_ids);
            types[i * t..i * t + n].copy_from_slice(&e.token_type_ids);
            mask[i * t..i * t + n].iter_mut().for_each(|m| *m = 1.0);
        }
        Ok(EncodedBatch {
            input_ids: Tensor::from_vec(ids, (b, t), device)?,
            token_type_ids: Tensor::from_vec(types, (b, t), device)?,
            attention_mask: Tensor::from_vec(mask, (b, t), device)?,
            lengths: encodings.iter().map(|e| e.input_ids.len()).collect(),
        })
    }
}

/// A tokenizer configured for one maximum length.
pub struct TextEncoder {
    tokenizer: Tokenizer,
    path: PathBuf,
    max_length: usize,
    pad_id: u32,
}

impl std::fmt::Debug for TextEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextEncoder").field("path", &self.path).field("max_length", &self.max_length).finish()
    }
}

impl TextEncoder {
    /// Loads `tokenizer.json` and sets truncation to `max_length` (longest first), no padding.
    pub fn from_file(path: &Path, max_length: usize) -> Result<Self> {
        if !path.exists() {
            return Err(Error::NotFound { path: path.to_path_buf(), what: "tokenizer.json".into() });
        }
        let tok_err = |msg: String| Error::Tokenizer { file: path.to_path_buf(), msg };
        let mut tokenizer = Tokenizer::from_file(path).map_err(|e| tok_err(e.to_string()))?;
        if max_length < 2 {
            return Err(Error::arg("--max-length", format!("{max_length} is too small (need room for special tokens)")));
        }
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| tok_err(e.to_string()))?;
        let pad_id = ["[PAD]", "<pad>"].iter().find_map(|t| tokenizer.token_to_id(t)).unwrap_or(0);
        Ok(Self { tokenizer, path: path.to_path_buf(), max_length, pad_id })
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.tokenizer.id_to_token(id)
    }

    /// Encodes one text or text pair with special tokens, truncated to `max_length`.
    pub fn encode(&self, text: &str, pair: Option<&str>) -> Result<Encoding> {
        let enc = self.encode_raw(text, pair)?;
        Ok(Encoding { input_ids: enc.get_ids().to_vec(), token_type_ids: enc.get_type_ids().to_vec() })
    }

    /// The tokens (strings) of an encoding, for display.
    pub fn tokens(&self, text: &str, pair: Option<&str>) -> Result<Vec<String>> {
        Ok(self.encode_raw(text, pair)?.get_tokens().to_vec())
    }

    fn encode_raw(&self, text: &str, pair: Option<&str>) -> Result<tokenizers::Encoding> {
        let input = match pair {
            Some(p) => tokenizers::EncodeInput::Dual(text.into(), p.into()),
            None => tokenizers::EncodeInput::Single(text.into()),
        };
        self.tokenizer
            .encode(input, true)
            .map_err(|e| Error::Tokenizer { file: self.path.clone(), msg: e.to_string() })
    }

    /// Encodes and pads a batch of texts (with optional pairs).
    pub fn batch(&self, items: &[(&str, Option<&str>)], padding: Padding, device: &Device) -> Result<EncodedBatch> {
        let encs = items.iter().map(|(a, b)| self.encode(a, *b)).collect::<Result<Vec<_>>>()?;
        EncodedBatch::collate(&encs, padding, self.pad_id, device)
    }
}
