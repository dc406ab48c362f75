//! Fine-tuning of chosen modules (specification family) and full fine-tuning, the baseline every
//! method is compared with: the chosen sites' own tensors become trainable copies, saved under
//! their HF names (`encoder.layer.5.output.dense.weight`). `full` (alias) targets every module of
//! the embeddings and the encoder; the pooler stays frozen (it is unused by mean/CLS-state heads).

use super::method::{BuildCtx, Family, Method};
use super::targets::{is_decoder, targets, Targets};
use crate::core::{Delta, HookCtx, Site, SiteKind};
use crate::error::Result;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FinetuneConfig {}

impl Method for FinetuneConfig {
    const FAMILY: Family = Family::Specification;
    const ALIASES: &'static [&'static str] = &["full", "full_finetune"];

    fn kinds(&self) -> &'static [SiteKind] {
        &[SiteKind::Linear, SiteKind::LayerNorm, SiteKind::Embedding]
    }

    fn expands(&self) -> bool {
        true
    }

    fn default_targets(&self, model_type: &str) -> Targets {
        if is_decoder(model_type) {
            targets(&["model"])
        } else {
            targets(&["embeddings", "encoder"])
        }
    }

    fn gateable(&self) -> bool {
        false
    }

    fn build(&self, site: &Site, _ctx: &mut BuildCtx) -> Result<Box<dyn Delta>> {
        let vars = site
            .params()
            .iter()
            .map(|(n, t)| Ok((n.clone(), Var::from_tensor(&t.copy()?)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Box::new(Finetune { vars }))
    }
}

#[derive(Debug)]
pub struct Finetune {
    vars: Vec<(String, Var)>,
}

impl Delta for Finetune {
    fn method(&self) -> &'static str {
        "finetune"
    }

    fn params(&self) -> Vec<(String, Var)> {
        self.vars.clone()
    }

    fn replaces_base(&self) -> bool {
        true
    }

    fn reparam(&self, name: &str, _base: Option<&Tensor>, _h: &HookCtx) -> Result<Option<Tensor>> {
        Ok(self.vars.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_tensor().clone()))
    }

    /// The engines read the trained tensors through the site's parameters and compute their
    /// gradients themselves (a weight's `dyᵀ x`, a bias's or a norm's sums).
    fn engine_hook(&self, _h: &HookCtx) -> Result<Option<crate::core::EngineHook>> {
        Ok(Some(crate::core::EngineHook::Reparam))
    }

    fn merged(&self, _base: &[(String, Tensor)]) -> Result<Option<Vec<(String, Tensor)>>> {
        Ok(Some(self.vars.iter().map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?))).collect::<Result<Vec<_>>>()?))
    }
}
