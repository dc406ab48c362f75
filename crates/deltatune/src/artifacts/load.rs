//! Loading a saved delta whatever its format: deltatune's own directory, a PEFT adapter folder or
//! a llama.cpp LoRA adapter GGUF.

use super::delta_dir::{self, Loaded};
use super::peft;
use crate::attach::AttachOptions;
use crate::core::Backbone;
use crate::error::{Error, Result};
use std::path::Path;

/// Attaches a saved delta — deltatune's format or a PEFT adapter folder — to `model`.
pub fn load_delta(dir: &Path, model: &mut dyn Backbone, opts: AttachOptions) -> Result<Loaded> {
    if delta_dir::is_delta_dir(dir) {
        delta_dir::load(dir, model, opts)
    } else if peft::is_peft_dir(dir) {
        peft::load(dir, model, None)
    } else if super::gguf_lora::is_adapter_file(dir) {
        super::gguf_lora::load(dir, model)
    } else if !dir.exists() {
        Err(Error::NotFound { path: dir.to_path_buf(), what: "delta directory".into() })
    } else {
        Err(Error::Delta(format!(
            "{}: neither a deltatune delta ({}) nor a PEFT adapter ({})",
            dir.display(),
            delta_dir::CONFIG_FILE,
            peft::CONFIG_FILE
        )))
    }
}


/// Like [`load_delta`], with the delta's groups renamed after `name` (see
/// [`delta_dir::load_as`]; a PEFT adapter becomes one group `name`).
pub fn load_delta_as(dir: &Path, model: &mut dyn Backbone, opts: AttachOptions, name: &str) -> Result<Loaded> {
    if delta_dir::is_delta_dir(dir) {
        delta_dir::load_as(dir, model, opts, name)
    } else if peft::is_peft_dir(dir) {
        peft::load(dir, model, Some(name))
    } else {
        load_delta(dir, model, opts)
    }
}
