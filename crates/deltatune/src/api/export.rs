//! The export job: a saved delta written in PEFT's adapter format, or a LoRA on a decoder as a
//! llama.cpp adapter GGUF.

use super::common::{decoder_path, encoder_dir};
use crate::artifacts::load::load_delta;
use crate::artifacts::peft;
use crate::attach::AttachOptions;
use crate::backbone::bert::BertModel;
use crate::backbone::llama::{is_decoder_path, LlamaModel};
use crate::core::Backbone;
use crate::control::Control;
use crate::error::{Error, Result};
use crate::io::atomic::check_output;
use candle_core::Device;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Formats a delta can be exported to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExportFormat {
    /// PEFT's adapter folder (adapter_config.json + adapter_model.safetensors).
    Peft,
    /// A llama.cpp LoRA adapter file (`--lora` in llama.cpp, `lora_path` in llama-cpp-python).
    Gguf,
}

impl std::str::FromStr for ExportFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "peft" => Ok(ExportFormat::Peft),
            "gguf" => Ok(ExportFormat::Gguf),
            other => Err(Error::arg("--format", format!("`{other}` (supported: peft, gguf)"))),
        }
    }
}

/// `deltatune export`.
#[derive(Clone, Debug)]
pub struct ExportSpec {
    pub model: Option<PathBuf>,
    /// A saved delta directory.
    pub delta: PathBuf,
    /// Which delta group to export when the directory holds several.
    pub name: Option<String>,
    pub format: ExportFormat,
    pub out: PathBuf,
    /// Replace an existing non-empty `out`.
    pub overwrite: bool,
    /// `base_model_name_or_path` in the PEFT config.
    pub base_model_name: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct ExportResult {
    pub name: String,
    pub method: String,
    pub out: PathBuf,
}

pub fn export(spec: &ExportSpec, ctl: &Control) -> Result<ExportResult> {
    let decoder = spec.format == ExportFormat::Gguf || spec.model.as_deref().is_some_and(is_decoder_path);
    let model_dir = if decoder { decoder_path(spec.model.as_deref(), ctl)? } else { encoder_dir(spec.model.as_deref(), ctl)? };
    check_output(&spec.out, "--out", spec.overwrite, &[("--delta", &spec.delta), ("--model", &model_dir)])?;
    let mut model: Box<dyn Backbone> =
        if decoder { Box::new(LlamaModel::load(&model_dir, &Device::Cpu)?) } else { Box::new(BertModel::load(&model_dir, &Device::Cpu)?) };
    let model = model.as_mut();
    let loaded = load_delta(&spec.delta, model, AttachOptions::default())?;
    let delta = match &spec.name {
        Some(n) => loaded.specs.iter().find(|s| &s.name == n).ok_or_else(|| {
            let names: Vec<&str> = loaded.specs.iter().map(|s| s.name.as_str()).collect();
            Error::arg("--name", format!("no delta `{n}` in {} (has: {})", spec.delta.display(), names.join(", ")))
        })?,
        None => match loaded.specs.as_slice() {
            [one] => one,
            many => return Err(Error::arg("--name", format!("{} holds {} deltas; choose one with --name", spec.delta.display(), many.len()))),
        },
    };
    // A task head saved with the delta goes along as PEFT's `classifier` module.
    let head: BTreeMap<_, _> =
        loaded.extra_tensors.iter().filter_map(|(k, t)| k.strip_prefix("head.").map(|r| (format!("classifier.{r}"), t.clone()))).collect();
    match spec.format {
        ExportFormat::Peft => peft::export(&spec.out, model, delta, &spec.base_model_name, &head)?,
        ExportFormat::Gguf => crate::artifacts::gguf_lora::export(&spec.out, model, delta)?,
    }
    Ok(ExportResult { name: delta.name.clone(), method: delta.config.method().to_string(), out: spec.out.clone() })
}
