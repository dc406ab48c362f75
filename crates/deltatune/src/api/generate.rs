//! The generation job: a decoder (with an optional trained delta) continues a prompt or answers
//! a chat turn, streaming text as it grows.

use super::common::decoder_path;
use crate::artifacts::load::load_delta;
use crate::attach::AttachOptions;
use crate::control::Control;
use crate::error::{Error, Result};
use crate::lm::causal::CausalLm;
use crate::lm::generate::{generate as run_generate, GenerateOptions, Generation};
use candle_core::Device;
use std::path::PathBuf;

/// What to continue.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    /// Raw text, tokenized as is.
    Text(String),
    /// One user turn (with an optional system message) in the model's chat format.
    Chat { system: Option<String>, user: String },
}

/// `deltatune generate`.
#[derive(Clone, Debug)]
pub struct GenerateSpec {
    pub model: Option<PathBuf>,
    pub delta: Option<PathBuf>,
    pub prompt: Prompt,
    pub options: GenerateOptions,
    /// Dequantize the frozen weights for every matmul (slower, bit-for-bit with f32 references).
    pub exact: bool,
}

/// Checks sampling settings (shared by every front end).
pub fn check_options(o: &GenerateOptions) -> Result<()> {
    if !(o.top_p > 0.0 && o.top_p <= 1.0) {
        return Err(Error::arg("--top-p", format!("{} (expected a value in (0, 1])", o.top_p)));
    }
    if !(o.temperature >= 0.0 && o.temperature.is_finite()) {
        return Err(Error::arg("--temperature", format!("{} (expected 0 for greedy or a positive number)", o.temperature)));
    }
    crate::error::check::at_least("--max-new-tokens", o.max_new_tokens, 1)?;
    if o.stop_strings.iter().any(String::is_empty) {
        return Err(Error::arg("--stop", "an empty stop string would stop before the first token"));
    }
    Ok(())
}

/// The prompt text for `lm` (chat turns rendered in the model's format).
pub fn prompt_text(lm: &CausalLm, prompt: &Prompt) -> Result<String> {
    match prompt {
        Prompt::Text(t) => Ok(t.clone()),
        Prompt::Chat { system, user } => {
            let mut msgs: Vec<(&str, &str)> = Vec::new();
            if let Some(s) = system {
                msgs.push(("system", s));
            }
            msgs.push(("user", user));
            lm.tokenizer.chat_prompt(&msgs)
        }
    }
}

/// Loads the decoder (and delta) and generates; text pieces go to `on_text` as they settle.
pub fn generate(spec: &GenerateSpec, ctl: &Control, on_text: &mut dyn FnMut(&str)) -> Result<Generation> {
    check_options(&spec.options)?;
    let path = decoder_path(spec.model.as_deref(), ctl)?;
    let mut lm = CausalLm::load(&path, &Device::Cpu)?;
    lm.model.set_exact(spec.exact);
    if let Some(d) = &spec.delta {
        let loaded = load_delta(d, &mut lm.model, AttachOptions::default())?;
        for w in &loaded.warnings {
            ctl.warn(w.clone());
        }
    }
    let ids = lm.tokenizer.encode_start(&prompt_text(&lm, &spec.prompt)?)?;
    run_generate(&lm, &ids, &spec.options, on_text)
}
