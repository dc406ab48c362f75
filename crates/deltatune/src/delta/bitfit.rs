//! BitFit (Ben Zaken et al., 2022), specification family: `b' = b + Δb` on linear and layer-norm
//! biases. OpenDelta's BitFit unfreezes the same biases; training `Δb` from 0 is the same
//! optimisation problem. Modules without a bias get one (`Δb` alone), as OpenDelta does.

use super::additive::Additive;
use super::method::{site_dims, BuildCtx, Family, Method};
use super::targets::{is_decoder, targets, Targets};
use crate::core::init;
use crate::core::{Delta, Site, SiteKind};
use crate::error::Result;
use candle_core::Var;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BitFitConfig {}

impl Method for BitFitConfig {
    const FAMILY: Family = Family::Specification;

    fn kinds(&self) -> &'static [SiteKind] {
        &[SiteKind::Linear, SiteKind::LayerNorm]
    }

    fn expands(&self) -> bool {
        true
    }

    fn default_targets(&self, model_type: &str) -> Targets {
        // OpenDelta's default for BERT: attention, feed-forward and layer norms of every layer.
        if is_decoder(model_type) {
            targets(&[r"re:model\.layers\.\d+"])
        } else {
            targets(&[r"re:encoder\.layer\.\d+"])
        }
    }

    fn build(&self, site: &Site, ctx: &mut BuildCtx) -> Result<Box<dyn Delta>> {
        let (_, out) = match site.kind() {
            SiteKind::LayerNorm => (0, ctx.info.hidden_size),
            _ => site_dims(site, &ctx.info)?,
        };
        let n = site.param("bias").map(|b| b.elem_count()).unwrap_or(out);
        Ok(Box::new(Additive {
            method: "bitfit",
            weight: None,
            bias: Some(Var::from_tensor(&init::zeros(&[n], &ctx.device)?)?),
        }))
    }
}

