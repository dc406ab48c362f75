//! OpenDelta's low-rank adapter, addition family: a sequential bottleneck adapter whose two
//! projections are rank-r products (reduction 32, gelu_new, glorot-uniform gain √2).

use super::bottleneck::{block_targets, bottleneck_size, dims_at, Activation, Adapter, Bottleneck, Proj, ADAPTER_KINDS};
use super::method::{BuildCtx, Family, Method};
use super::targets::Targets;
use crate::core::init::zeros;
use crate::core::{BackboneInfo, Delta, Site, SiteKind};
use crate::error::{Error, Result};
use candle_core::Var;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LowRankAdapterConfig {
    pub bottleneck_size: Option<usize>,
    pub reduction_factor: f64,
    pub rank: usize,
    pub non_linearity: Activation,
}

impl Default for LowRankAdapterConfig {
    fn default() -> Self {
        LowRankAdapterConfig { bottleneck_size: None, reduction_factor: 32.0, rank: 1, non_linearity: Activation::GeluNew }
    }
}

impl Method for LowRankAdapterConfig {
    const FAMILY: Family = Family::Addition;
    const ALIASES: &'static [&'static str] = &["lowrank_adapter", "lra"];
    const KEY_ALIASES: &'static [(&'static str, &'static str)] = &[("bottleneck", "bottleneck_size"), ("m", "bottleneck_size"), ("act", "non_linearity"), ("activation", "non_linearity")];

    fn kinds(&self) -> &'static [SiteKind] {
        ADAPTER_KINDS
    }

    fn default_targets(&self, model_type: &str) -> Targets {
        block_targets(model_type, true)
    }

    fn validate(&self, info: &BackboneInfo) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::Delta("low_rank_adapter: rank must be at least 1".into()));
        }
        bottleneck_size(self.bottleneck_size, self.reduction_factor, info.hidden_size).map(|_| ())
    }

    fn param_estimate(&self, inp: usize, out: usize, info: &BackboneInfo) -> Option<u128> {
        let m = self.bottleneck_size.unwrap_or(info.hidden_size) as u128;
        Some(m * (inp.max(info.hidden_size) as u128 + out.max(info.hidden_size) as u128 + 1) + out.max(info.hidden_size) as u128)
    }

    fn build(&self, site: &Site, ctx: &mut BuildCtx) -> Result<Box<dyn Delta>> {
        let (_, d) = dims_at(site, ctx)?;
        let m = bottleneck_size(self.bottleneck_size, self.reduction_factor, d)?;
        let (p, r, dev) = (site.path(), self.rank, ctx.device.clone());
        // OpenDelta's glorot-uniform with gain √2; torch's fan_in = size(1), fan_out = size(0).
        let gain = std::f32::consts::SQRT_2;
        let lowrank = |tag: &str, inp: usize, out: usize| -> Result<Proj> {
            let left = ctx.stream(p, &format!("{tag}.W_left")).xavier_uniform(&[inp, r], r, inp, gain, &dev)?;
            let right = ctx.stream(p, &format!("{tag}.W_right")).xavier_uniform(&[r, out], out, r, gain, &dev)?;
            Ok(Proj::LowRank {
                left: Var::from_tensor(&left)?,
                right: Var::from_tensor(&right)?,
                b: Var::from_tensor(&zeros(&[out], &dev)?)?,
            })
        };
        Ok(Box::new(Adapter {
            method: "low_rank_adapter",
            parallel: false,
            net: Bottleneck {
                down: lowrank("adapter_down", d, m)?,
                up: lowrank("adapter_up", m, d)?,
                act: self.non_linearity,
                scaling: 1.0,
                shared: Vec::new(),
            },
        }))
    }
}

