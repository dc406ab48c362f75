//! Specification-family methods that tune a slice of the backbone through additive,
//! zero-initialised deltas (so a fresh delta is an exact no-op, can be gated by the structure search,
//! and merges exactly):
//!
//! * BitFit (Ben Zaken et al., 2022): `b' = b + Δb` on linear and layer-norm biases. OpenDelta's
//!   BitFit unfreezes the same biases; training `Δb` from 0 is the same optimisation problem.
//!   Modules without a bias get one (`Δb` alone), as OpenDelta does.
//! * LayerNorm tuning: `γ' = γ + Δγ`, `β' = β + Δβ` (set `bias=false` for the weight-only "LN-fit"
//!   of the structure-search paper).

use super::{BuildCtx, Delta, HookCtx, Method, Targets};
use crate::backbone::{Site, SiteKind};
use crate::error::{Error, Result};
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BitFitConfig {}

impl Method for BitFitConfig {
    fn kinds(&self) -> &'static [SiteKind] {
        &[SiteKind::Linear, SiteKind::LayerNorm]
    }

    fn expands(&self) -> bool {
        true
    }

    fn default_targets(&self, model_type: &str) -> Targets {
        // OpenDelta's default for BERT: attention, feed-forward and layer norms of every layer.
        if super::is_decoder(model_type) {
            super::targets(&[r"re:model\.layers\.\d+"])
        } else {
            super::targets(&[r"re:encoder\.layer\.\d+"])
        }
    }

    fn build(&self, site: &Site, ctx: &mut BuildCtx) -> Result<Box<dyn Delta>> {
        let (_, out) = match site.kind() {
            SiteKind::LayerNorm => (0, ctx.info.hidden_size),
            _ => super::site_dims(site, &ctx.info)?,
        };
        let n = site.param("bias").map(|b| b.elem_count()).unwrap_or(out);
        Ok(Box::new(Additive {
            method: "bitfit",
            weight: None,
            bias: Some(Var::from_tensor(&super::init::zeros(&[n], &ctx.device)?)?),
        }))
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LnTuningConfig {
    /// Tune the scale γ.
    pub weight: bool,
    /// Tune the shift β.
    pub bias: bool,
}

impl Default for LnTuningConfig {
    fn default() -> Self {
        LnTuningConfig { weight: true, bias: true }
    }
}

impl Method for LnTuningConfig {
    fn kinds(&self) -> &'static [SiteKind] {
        &[SiteKind::LayerNorm, SiteKind::RmsNorm]
    }

    fn expands(&self) -> bool {
        true
    }

    fn default_targets(&self, model_type: &str) -> Targets {
        if super::is_decoder(model_type) {
            super::targets(&["input_layernorm", "post_attention_layernorm", "model.norm"])
        } else {
            super::targets(&["LayerNorm"])
        }
    }

    fn validate(&self, _info: &super::BackboneInfo) -> Result<()> {
        if !self.weight && !self.bias {
            return Err(Error::Delta("ln_tuning: at least one of weight, bias must be true".into()));
        }
        Ok(())
    }

    fn build(&self, site: &Site, ctx: &mut BuildCtx) -> Result<Box<dyn Delta>> {
        let n = site.param("weight").map(|w| w.elem_count()).unwrap_or(ctx.info.hidden_size);
        let zero = || -> Result<Var> { Ok(Var::from_tensor(&super::init::zeros(&[n], &ctx.device)?)?) };
        Ok(Box::new(Additive {
            method: "ln_tuning",
            weight: if self.weight { Some(zero()?) } else { None },
            // RMSNorm has no bias to tune.
            bias: if self.bias && site.kind() == SiteKind::LayerNorm { Some(zero()?) } else { None },
        }))
    }
}

/// `param' = param + z·Δ` for the site's weight and/or bias.
#[derive(Debug)]
pub struct Additive {
    method: &'static str,
    weight: Option<Var>,
    bias: Option<Var>,
}

impl Additive {
    fn delta(&self, name: &str) -> Option<&Var> {
        match name {
            "weight" => self.weight.as_ref(),
            "bias" => self.bias.as_ref(),
            _ => None,
        }
    }
}

impl Delta for Additive {
    fn method(&self) -> &'static str {
        self.method
    }

    fn params(&self) -> Vec<(String, Var)> {
        let mut v = Vec::new();
        if let Some(w) = &self.weight {
            v.push(("delta_weight".into(), w.clone()));
        }
        if let Some(b) = &self.bias {
            v.push(("delta_bias".into(), b.clone()));
        }
        v
    }

    fn reparam(&self, name: &str, base: Option<&Tensor>, h: &HookCtx) -> Result<Option<Tensor>> {
        let Some(d) = self.delta(name) else { return Ok(None) };
        let d = h.gated(d.as_tensor().clone())?;
        Ok(Some(match base {
            Some(b) => crate::ops::add_frozen(&d, b)?,
            None => d,
        }))
    }

    fn merged(&self, base: &[(String, Tensor)]) -> Result<Option<Vec<(String, Tensor)>>> {
        let mut out = Vec::new();
        for name in ["weight", "bias"] {
            let Some(d) = self.delta(name) else { continue };
            let merged = match base.iter().find(|(n, _)| n == name) {
                Some((_, t)) => t.add(d.as_tensor())?,
                None => d.as_tensor().copy()?,
            };
            out.push((name.to_string(), merged));
        }
        Ok(Some(out))
    }
}
