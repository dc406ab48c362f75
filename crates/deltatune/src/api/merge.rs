//! The merge job: fold mergeable deltas into the base weights, write a plain model directory,
//! reload it without deltatune's deltas and check that it answers like the unmerged model.

use super::common::{encoder_with_deltas, DeltaSource};
use crate::artifacts::load::load_delta;
use crate::artifacts::merged::{write_merged, write_merged_decoder, write_merged_gguf, GgufWeights};
use crate::attach::AttachOptions;
use crate::backbone::bert::BertModel;
use crate::backbone::llama::{is_decoder_path, DecoderPath, LlamaSource};
use crate::control::Control;
use crate::core::{Backbone, ForwardCtx, Pooling};
use crate::data::tokenize::{Padding, TextEncoder};
use crate::error::{Error, Result};
use crate::io::atomic::check_output;
use crate::lm::causal::CausalLm;
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use std::path::PathBuf;

const PROBE: &[(&str, Option<&str>)] =
    &[("The merged model must answer exactly like the unmerged one.", None), ("Short.", None), ("A pair of texts", Some("with a second segment"))];

/// A weight type by name: `f32`, `f16` or `bf16`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        other => Err(Error::arg("--dtype", format!("`{other}` (expected f32, f16 or bf16)"))),
    }
}

/// `deltatune merge`.
#[derive(Clone, Debug)]
pub struct MergeSpec {
    /// The backbone (encoder directory, or a decoder GGUF/HF directory); `None`: the default encoder.
    pub model: Option<PathBuf>,
    pub deltas: Vec<DeltaSource>,
    /// Seed of new (untrained) deltas.
    pub seed: u64,
    pub out: PathBuf,
    /// Replace an existing non-empty `out`.
    pub overwrite: bool,
    /// Weight type of a merged decoder (f32, f16 or bf16); encoders are written in f32.
    pub dtype: DType,
    /// Write a GGUF model file (llama.cpp's format) with matrices in these types instead of an
    /// HF directory; the model must be a GGUF decoder.
    pub gguf: Option<GgufWeights>,
}

#[derive(Clone, Debug, Serialize)]
pub struct MergeResult {
    pub out: PathBuf,
    pub deltas: Vec<String>,
    pub merged_sites: usize,
    /// Largest difference between the merged and the unmerged model on probe inputs (pooled
    /// embeddings for encoders, logits for decoders).
    pub max_abs_diff: f32,
    pub decoder: bool,
    /// The merged GGUF's weight types, when one was written.
    pub gguf: Option<GgufWeights>,
}

pub fn merge(spec: &MergeSpec, ctl: &Control) -> Result<MergeResult> {
    if spec.deltas.is_empty() {
        return Err(Error::arg("--delta", "give at least one delta to merge"));
    }
    let model_dir = match &spec.model {
        Some(p) => p.clone(),
        None => super::common::encoder_dir(None, ctl)?,
    };
    let (_, dirs) = DeltaSource::split(&spec.deltas);
    let inputs: Vec<(&str, &std::path::Path)> = std::iter::once(("--model", model_dir.as_path())).chain(dirs.iter().map(|d| ("--delta", d.as_path()))).collect();
    check_output(&spec.out, "--out", spec.overwrite, &inputs)?;
    if let Some(p) = spec.model.as_deref().filter(|p| is_decoder_path(p)) {
        return merge_decoder(spec, p.to_path_buf(), ctl);
    }
    if spec.gguf.is_some() {
        return Err(Error::arg("--format", "gguf needs a GGUF decoder as --model (encoders merge into an HF directory)"));
    }
    let (mut model, specs) = encoder_with_deltas(spec.model.as_deref(), &spec.deltas, spec.seed, ctl)?;
    let enc = TextEncoder::from_file(&model.files.tokenizer, 64)?;
    let batch = enc.batch(PROBE, Padding::Longest, &Device::Cpu)?;
    let before = model.forward(&batch, &ForwardCtx::eval())?.pool(Pooling::Mean)?;
    let files = model.files.clone();
    let merged = write_merged(&mut model, &files, &spec.out)?;
    // Check the written model: an ordinary load, no deltas, same outputs.
    let reloaded = BertModel::load(&spec.out, &Device::Cpu)?;
    let after = reloaded.forward(&batch, &ForwardCtx::eval())?.pool(Pooling::Mean)?;
    Ok(MergeResult {
        out: spec.out.clone(),
        deltas: specs.iter().map(|s| s.name.clone()).collect(),
        merged_sites: merged,
        max_abs_diff: max_abs_diff(&before, &after)?,
        decoder: false,
        gguf: None,
    })
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b.to_dtype(DType::F32)?)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// Decoders: deltas folded into dequantized f32 weights, written as an HF Llama directory in
/// `dtype` (or a GGUF file), then reloaded and compared on a probe text.
fn merge_decoder(spec: &MergeSpec, path: PathBuf, ctl: &Control) -> Result<MergeResult> {
    if spec.gguf.is_some() && !matches!(DecoderPath::resolve(&path)?, DecoderPath::Gguf(_)) {
        return Err(Error::arg("--format", format!("gguf needs a GGUF base model; {} is an HF directory", path.display())));
    }
    if !matches!(spec.dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(Error::arg("--dtype", format!("{:?} (expected f32, f16 or bf16)", spec.dtype)));
    }
    let (specs, dirs) = DeltaSource::split(&spec.deltas);
    if !specs.is_empty() {
        return Err(Error::arg("--delta", "merging needs trained deltas (directories), not new specs"));
    }
    let mut lm = CausalLm::load(&path, &Device::Cpu)?;
    lm.model.set_exact(true);
    let mut names = Vec::new();
    for d in &dirs {
        let loaded = load_delta(d, &mut lm.model, AttachOptions::default())?;
        for w in &loaded.warnings {
            ctl.warn(w.clone());
        }
        names.extend(loaded.specs.into_iter().map(|s| s.name));
    }
    let probe = "The merged model must answer exactly like the unmerged one.";
    let ids = lm.tokenizer.encode(probe)?;
    let t = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let ctx = ForwardCtx::eval();
    let before = lm.model.logits(&lm.model.forward(&t, None, None, &ctx)?, &ctx)?;
    let merged = match spec.gguf {
        Some(w) => {
            let LlamaSource::Gguf { path: base, .. } = lm.model.source.clone() else {
                return Err(Error::arg("--format", "gguf needs a GGUF base model"));
            };
            write_merged_gguf(&mut lm.model, &base, &spec.out, w)?
        }
        None => write_merged_decoder(&mut lm.model, &spec.out, spec.dtype, Some(&lm.tokenizer))?,
    };
    let mut back = CausalLm::load(&spec.out, &Device::Cpu)?;
    back.model.set_exact(true);
    let after = back.model.logits(&back.model.forward(&t, None, None, &ctx)?, &ctx)?;
    Ok(MergeResult {
        out: spec.out.clone(),
        deltas: names,
        merged_sites: merged,
        max_abs_diff: max_abs_diff(&before, &after)?,
        decoder: true,
        gguf: spec.gguf,
    })
}
