//! Prompt tuning (Lester et al., 2021), addition family: `num_virtual_tokens` soft tokens prepended
//! to the input embeddings (the attention mask is extended with ones; encoder outputs keep the
//! virtual positions first, as PEFT does; a decoder drops them from its outputs, and in
//! generation they occupy the first cache positions). Parameter `prompt_embeddings` (P, h) as in PEFT's
//! `PromptEmbedding`. Not mergeable.

use super::method::{BuildCtx, Family, Method};
use super::peft_fields::PeftIn;
use super::targets::{is_decoder, targets, Targets};
use crate::core::{BackboneInfo, Delta, HookCtx, Site, SiteKind};
use crate::error::{Error, Result};
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

/// How the soft tokens start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptInit {
    /// Embeddings of tokens drawn uniformly from the vocabulary (PEFT's SAMPLE_VOCAB).
    SampleVocab,
    /// N(0, 1) (PEFT's RANDOM).
    Random,
    /// U(±init_range) (OpenDelta without token_init, adapters' random_uniform).
    RandomUniform,
    /// Embeddings of `init_text`'s tokens (special tokens included), repeated or cut to length
    /// (PEFT's TEXT).
    Text,
    /// The first P vocabulary rows (OpenDelta's token_init).
    FirstVocab,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PromptConfig {
    pub num_virtual_tokens: usize,
    pub prompt_tuning_init: PromptInit,
    pub prompt_tuning_init_text: Option<String>,
    pub init_range: f32,
}

impl Default for PromptConfig {
    fn default() -> Self {
        PromptConfig { num_virtual_tokens: 10, prompt_tuning_init: PromptInit::SampleVocab, prompt_tuning_init_text: None, init_range: 0.5 }
    }
}

impl Method for PromptConfig {
    const FAMILY: Family = Family::Addition;
    const ALIASES: &'static [&'static str] = &["prompt_tuning", "soft_prompt"];
    const KEY_ALIASES: &'static [(&'static str, &'static str)] = &[("tokens", "num_virtual_tokens"), ("n", "num_virtual_tokens")];
    const PEFT_TYPE: Option<&'static str> = Some("PROMPT_TUNING");

    fn kinds(&self) -> &'static [SiteKind] {
        // BERT's embeddings block or a token-embedding table (a decoder's `model.embed_tokens`,
        // BERT's `embeddings.word_embeddings`): either way the tokens go before the word embeddings.
        &[SiteKind::Embeddings, SiteKind::Embedding]
    }

    fn default_targets(&self, model_type: &str) -> Targets {
        // BERT's embeddings block; a decoder's token embeddings (its whole embedding stage).
        targets(&[if is_decoder(model_type) { "model.embed_tokens" } else { "embeddings" }])
    }

    fn validate(&self, _info: &BackboneInfo) -> Result<()> {
        if self.num_virtual_tokens == 0 {
            return Err(Error::Delta("prompt: num_virtual_tokens must be at least 1".into()));
        }
        if self.prompt_tuning_init == PromptInit::Text && self.prompt_tuning_init_text.as_deref().is_none_or(str::is_empty) {
            return Err(Error::Delta("prompt: prompt_tuning_init=text needs prompt_tuning_init_text".into()));
        }
        Ok(())
    }

    fn gateable(&self) -> bool {
        false
    }

    fn from_peft(p: &PeftIn) -> Result<(Self, Targets)> {
        p.check_dims(p.info.hidden_size)?;
        let cfg = PromptConfig { num_virtual_tokens: p.usize("num_virtual_tokens")?, prompt_tuning_init: PromptInit::Random, ..Default::default() };
        Ok((cfg, Targets::default()))
    }

    /// PEFT stores the table without a module path.
    fn peft_key(&self, _site: &str, param: &str) -> String {
        param.to_string()
    }

    fn param_estimate(&self, _inp: usize, _out: usize, info: &BackboneInfo) -> Option<u128> {
        Some(self.num_virtual_tokens as u128 * info.hidden_size as u128)
    }

    fn build(&self, site: &Site, ctx: &mut BuildCtx) -> Result<Box<dyn Delta>> {
        let (p, h, dev) = (self.num_virtual_tokens, ctx.info.hidden_size, ctx.device.clone());
        let s = ctx.stream(site.path(), "prompt_embeddings");
        let vocab = || ctx.word_embeddings.clone().ok_or_else(|| Error::Delta("prompt: vocabulary init needs the word embeddings".into()));
        let rows = |ids: Vec<u32>| -> Result<Tensor> {
            let w = vocab()?;
            Ok(w.index_select(&Tensor::new(ids.as_slice(), w.device())?, 0)?.to_device(&dev)?.copy()?)
        };
        let t = match self.prompt_tuning_init {
            PromptInit::Random => s.normal(&[p, h], 0.0, 1.0, &dev)?,
            PromptInit::RandomUniform => s.uniform(&[p, h], -self.init_range, self.init_range, &dev)?,
            PromptInit::SampleVocab => {
                let n = ctx.info.vocab_size as f32;
                let u = s.uniform(&[p], 0.0, 1.0, &candle_core::Device::Cpu)?.to_vec1::<f32>()?;
                rows(u.iter().map(|x| ((x * n) as u32).min(ctx.info.vocab_size as u32 - 1)).collect())?
            }
            PromptInit::FirstVocab => rows((0..p as u32).collect())?,
            PromptInit::Text => {
                let tok = ctx.tokenizer.ok_or_else(|| Error::Delta("prompt: text init needs the tokenizer".into()))?;
                let text = self.prompt_tuning_init_text.as_deref().unwrap_or_default();
                let ids = tok.encode(text, None)?.input_ids;
                rows(ids.iter().copied().cycle().take(p).collect())?
            }
        };
        Ok(Box::new(Prompt { emb: Var::from_tensor(&t)? }))
    }
}

#[derive(Debug)]
pub struct Prompt {
    emb: Var, // (P, h)
}

impl Delta for Prompt {
    fn method(&self) -> &'static str {
        "prompt"
    }

    fn params(&self) -> Vec<(String, Var)> {
        vec![("prompt_embeddings".into(), self.emb.clone())]
    }

    fn num_virtual_tokens(&self) -> usize {
        self.emb.dim(0).unwrap_or(0)
    }

    fn prompt(&self, batch: usize, _h: &HookCtx) -> Result<Option<Tensor>> {
        let (p, h) = self.emb.as_tensor().dims2()?;
        Ok(Some(self.emb.as_tensor().unsqueeze(0)?.broadcast_as((batch, p, h))?))
    }
}
