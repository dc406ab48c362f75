//! What several jobs share: where the model comes from, deltas given as specs or saved
//! directories, and loading a backbone with its deltas.

use crate::artifacts::delta_dir;
use crate::artifacts::load::load_delta;
use crate::assets;
use crate::attach::{self, AttachOptions};
use crate::backbone::bert::BertModel;
use crate::control::Control;
use crate::delta::DeltaSpec;
use crate::error::{Error, Result};
use candle_core::Device;
use std::path::{Path, PathBuf};

/// A delta to put on a model: a new one from a spec, or a saved one (deltatune's format or a
/// PEFT adapter folder).
#[derive(Clone, Debug, PartialEq)]
pub enum DeltaSource {
    Spec(DeltaSpec),
    Saved(PathBuf),
}

impl DeltaSource {
    /// A directory that exists (or a llama.cpp adapter `.gguf` file) is a saved delta; anything else is a spec
    /// (`lora:r=8,target=query+value`). A path-looking value that is not a directory is an error
    /// naming it, so that a typo in a path is not read as a method name.
    pub fn parse(s: &str) -> Result<Self> {
        let p = Path::new(s);
        if p.is_dir() || (p.is_file() && p.extension().is_some_and(|x| x == "gguf")) {
            Ok(DeltaSource::Saved(p.to_path_buf()))
        } else if (s.contains('/') || s.contains(std::path::MAIN_SEPARATOR)) && !s.contains(':') {
            Err(Error::arg("--delta", format!("{s}: no such delta directory")))
        } else {
            Ok(DeltaSource::Spec(DeltaSpec::parse_cli(s)?))
        }
    }

    /// Splits a list into new specs and saved directories.
    pub fn split(list: &[DeltaSource]) -> (Vec<DeltaSpec>, Vec<PathBuf>) {
        let mut specs = Vec::new();
        let mut dirs = Vec::new();
        for d in list {
            match d {
                DeltaSource::Spec(s) => specs.push(s.clone()),
                DeltaSource::Saved(p) => dirs.push(p.clone()),
            }
        }
        (specs, dirs)
    }
}

/// The encoder directory: `model`, or the default model (fetched into the asset cache on first
/// use, with progress messages).
pub fn encoder_dir(model: Option<&Path>, ctl: &Control) -> Result<PathBuf> {
    match model {
        Some(p) => Ok(p.to_path_buf()),
        None => assets::default_model(&mut ctl.messages()),
    }
}

/// The decoder file or directory: `model`, or the default decoder (fetched on first use).
pub fn decoder_path(model: Option<&Path>, ctl: &Control) -> Result<PathBuf> {
    match model {
        Some(p) => Ok(p.to_path_buf()),
        None => assets::default_decoder(&mut ctl.messages()),
    }
}

/// Loads the encoder and attaches `deltas` in order (saved ones with their values, new ones
/// initialised with `seed`). Returns the model and the specs of every attached group; warnings
/// about saved configs go to `ctl`.
pub fn encoder_with_deltas(model: Option<&Path>, deltas: &[DeltaSource], seed: u64, ctl: &Control) -> Result<(BertModel, Vec<DeltaSpec>)> {
    let dir = encoder_dir(model, ctl)?;
    let mut backbone = BertModel::load(&dir, &Device::Cpu)?;
    let (specs, dirs) = DeltaSource::split(deltas);
    let mut all = Vec::new();
    for p in dirs {
        let loaded = load_delta(&p, &mut backbone, AttachOptions::default())?;
        for w in &loaded.warnings {
            ctl.warn(w.clone());
        }
        all.extend(loaded.specs);
    }
    attach::attach(&mut backbone, &specs, AttachOptions { seed, tokenizer: None })?;
    all.extend(specs);
    Ok((backbone, all))
}

/// A trained delta directory: `dir` itself, or `dir/best` when `dir` is a training run.
pub fn trained_delta_dir(dir: &Path) -> PathBuf {
    if dir.join("best").join(delta_dir::CONFIG_FILE).is_file() {
        dir.join("best")
    } else {
        dir.to_path_buf()
    }
}
