//! The embedding job: pooled (optionally L2-normalised) sentence vectors from the backbone with
//! any deltas attached.

use super::common::{encoder_with_deltas, DeltaSource};
use crate::backbone::bert::BertModel;
use crate::control::Control;
use crate::core::{l2_normalize, Backbone, ForwardCtx, Pooling};
use crate::data::tokenize::{Padding, TextEncoder};
use crate::error::{Error, Result};
use std::path::PathBuf;

/// `deltatune embed`.
#[derive(Clone, Debug)]
pub struct EmbedSpec {
    pub model: Option<PathBuf>,
    pub deltas: Vec<DeltaSource>,
    /// Seed of new (untrained) deltas.
    pub seed: u64,
    pub texts: Vec<String>,
    pub pooling: Pooling,
    pub normalize: bool,
    pub max_length: usize,
    pub batch_size: usize,
}

/// Embeds `texts` with a loaded model, handing each batch's rows to `sink` in input order.
pub fn embed_with(model: &BertModel, enc: &TextEncoder, texts: &[String], pooling: Pooling, normalize: bool, batch_size: usize, sink: &mut dyn FnMut(Vec<Vec<f32>>) -> Result<()>) -> Result<()> {
    if batch_size == 0 {
        return Err(Error::arg("--batch-size", "must be at least 1"));
    }
    let ctx = ForwardCtx::eval();
    for chunk in texts.chunks(batch_size) {
        let items: Vec<(&str, Option<&str>)> = chunk.iter().map(|s| (s.as_str(), None)).collect();
        let batch = enc.batch(&items, Padding::Longest, model.device())?;
        let out = model.forward(&batch, &ctx)?;
        let mut e = out.pool(pooling)?;
        if normalize {
            e = l2_normalize(&e)?;
        }
        sink(e.to_vec2::<f32>()?)?;
    }
    Ok(())
}

/// Loads the model and deltas, then embeds every text; rows go to `sink` batch by batch.
pub fn embed(spec: &EmbedSpec, ctl: &Control, sink: &mut dyn FnMut(Vec<Vec<f32>>) -> Result<()>) -> Result<()> {
    if spec.batch_size == 0 {
        return Err(Error::arg("--batch-size", "must be at least 1"));
    }
    crate::error::check::at_least("--max-length", spec.max_length, 2)?;
    let (model, _) = encoder_with_deltas(spec.model.as_deref(), &spec.deltas, spec.seed, ctl)?;
    let enc = TextEncoder::from_file(&model.files.tokenizer, spec.max_length)?;
    embed_with(&model, &enc, &spec.texts, spec.pooling, spec.normalize, spec.batch_size, sink)
}
