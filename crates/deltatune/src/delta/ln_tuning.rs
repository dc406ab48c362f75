//! LayerNorm tuning, specification family: `γ' = γ + Δγ`, `β' = β + Δβ` on every layer norm
//! (RMS norms: the weight only). `bias=false` gives the weight-only "LN-fit" of the
//! structure-search paper. Aliases `lnfit`, `layernorm`.

use super::additive::Additive;
use super::method::{BuildCtx, Family, Method};
use super::targets::{is_decoder, targets, Targets};
use crate::core::init;
use crate::core::{BackboneInfo, Delta, Site, SiteKind};
use crate::error::{Error, Result};
use candle_core::Var;
use serde::{Deserialize, Serialize};

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
    const FAMILY: Family = Family::Specification;
    const ALIASES: &'static [&'static str] = &["lnfit", "layernorm"];

    fn kinds(&self) -> &'static [SiteKind] {
        &[SiteKind::LayerNorm, SiteKind::RmsNorm]
    }

    fn expands(&self) -> bool {
        true
    }

    fn default_targets(&self, model_type: &str) -> Targets {
        if is_decoder(model_type) {
            targets(&["input_layernorm", "post_attention_layernorm", "model.norm"])
        } else {
            targets(&["LayerNorm"])
        }
    }

    fn validate(&self, _info: &BackboneInfo) -> Result<()> {
        if !self.weight && !self.bias {
            return Err(Error::Delta("ln_tuning: at least one of weight, bias must be true".into()));
        }
        Ok(())
    }

    fn build(&self, site: &Site, ctx: &mut BuildCtx) -> Result<Box<dyn Delta>> {
        let n = site.param("weight").map(|w| w.elem_count()).unwrap_or(ctx.info.hidden_size);
        let zero = || -> Result<Var> { Ok(Var::from_tensor(&init::zeros(&[n], &ctx.device)?)?) };
        Ok(Box::new(Additive {
            method: "ln_tuning",
            weight: if self.weight { Some(zero()?) } else { None },
            // RMSNorm has no bias to tune.
            bias: if self.bias && site.kind() == SiteKind::LayerNorm { Some(zero()?) } else { None },
        }))
    }
}

