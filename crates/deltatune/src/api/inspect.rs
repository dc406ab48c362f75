//! The inspect job: a backbone's module tree with deltas attached and parameter counts, a dry run
//! of delta patterns, and for decoders the weight memory held (quantized) against f32.

use super::common::{encoder_dir, encoder_with_deltas, DeltaSource};
use crate::attach::{self, AttachOptions, PatternReport};
use crate::backbone::bert::BertModel;
use crate::backbone::llama::{is_decoder_path, LlamaConfig, LlamaModel, LlamaSource};
use crate::control::Control;
use crate::core::{Backbone, ModuleTree};
use crate::error::{Error, Result};
use candle_core::Device;
use serde::Serialize;
use std::path::PathBuf;

/// `deltatune inspect`.
#[derive(Clone, Debug)]
pub struct InspectSpec {
    pub model: Option<PathBuf>,
    pub deltas: Vec<DeltaSource>,
    pub seed: u64,
    /// Report what each pattern of the delta specs matches instead of attaching them.
    pub dry_run: bool,
}

/// Weight memory of a decoder.
#[derive(Clone, Debug, Serialize)]
pub struct DecoderMemory {
    /// Bytes of base weights as held (quantized blocks stay quantized).
    pub weight_bytes: usize,
    /// The same weights as f32.
    pub weight_bytes_f32: usize,
    pub config: LlamaConfig,
    pub source: LlamaSource,
}

#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum Inspection {
    Tree {
        #[serde(flatten)]
        tree: ModuleTree,
        #[serde(flatten, skip_serializing_if = "Option::is_none")]
        decoder: Option<DecoderMemory>,
    },
    DryRun { patterns: Vec<PatternReport> },
}

pub fn inspect(spec: &InspectSpec, ctl: &Control) -> Result<Inspection> {
    if let Some(p) = spec.model.as_deref().filter(|p| is_decoder_path(p)) {
        let mut model = LlamaModel::load(p, &Device::Cpu)?;
        let (specs, dirs) = DeltaSource::split(&spec.deltas);
        if !dirs.is_empty() {
            return Err(Error::arg("--delta", "loading saved deltas onto a decoder is not supported by inspect yet"));
        }
        if spec.dry_run {
            return Ok(Inspection::DryRun { patterns: attach::dry_run(&model.tree(), &specs)?.report });
        }
        attach::attach(&mut model, &specs, AttachOptions { seed: spec.seed, tokenizer: None })?;
        let (held, f32_bytes) = model.weight_bytes();
        let decoder = DecoderMemory { weight_bytes: held, weight_bytes_f32: f32_bytes, config: model.config.clone(), source: model.source.clone() };
        return Ok(Inspection::Tree { tree: model.tree(), decoder: Some(decoder) });
    }
    if spec.dry_run {
        let (specs, dirs) = DeltaSource::split(&spec.deltas);
        if !dirs.is_empty() {
            return Err(Error::arg("--dry-run", "it checks delta specs; saved delta directories need no dry run"));
        }
        let model = BertModel::load(&encoder_dir(spec.model.as_deref(), ctl)?, &Device::Cpu)?;
        return Ok(Inspection::DryRun { patterns: attach::dry_run(&model.tree(), &specs)?.report });
    }
    let (model, _) = encoder_with_deltas(spec.model.as_deref(), &spec.deltas, spec.seed, ctl)?;
    Ok(Inspection::Tree { tree: model.tree(), decoder: None })
}
