//! Parallel bottleneck adapter, addition family (He et al., 2022; the adapters library's
//! `ParBnConfig`): `y + s·f(x)` with `x` the sublayer input; reduction 2, relu, scaling 4, up
//! projection zero ("mam_adapter" init), so a fresh adapter is an exact no-op.

use super::bottleneck::{block_targets, bottleneck_size, dense, dims_at, Activation, Adapter, AdapterInit, Bottleneck, ADAPTER_KINDS};
use super::method::{BuildCtx, Family, Method};
use super::targets::Targets;
use crate::core::{BackboneInfo, Delta, Site, SiteKind};
use crate::error::Result;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ParallelAdapterConfig {
    pub bottleneck_size: Option<usize>,
    pub reduction_factor: f64,
    pub non_linearity: Activation,
    pub init_weights: AdapterInit,
    pub scaling: f64,
}

impl Default for ParallelAdapterConfig {
    fn default() -> Self {
        ParallelAdapterConfig {
            bottleneck_size: None,
            reduction_factor: 2.0,
            non_linearity: Activation::Relu,
            init_weights: AdapterInit::MamAdapter,
            scaling: 4.0,
        }
    }
}

impl Method for ParallelAdapterConfig {
    const FAMILY: Family = Family::Addition;
    const ALIASES: &'static [&'static str] = &["parallel", "par_bn"];
    const KEY_ALIASES: &'static [(&'static str, &'static str)] = &[("bottleneck", "bottleneck_size"), ("m", "bottleneck_size"), ("act", "non_linearity"), ("activation", "non_linearity")];

    fn kinds(&self) -> &'static [SiteKind] {
        ADAPTER_KINDS
    }

    fn default_targets(&self, model_type: &str) -> Targets {
        block_targets(model_type, false)
    }

    fn validate(&self, info: &BackboneInfo) -> Result<()> {
        bottleneck_size(self.bottleneck_size, self.reduction_factor, info.hidden_size).map(|_| ())
    }

    fn param_estimate(&self, inp: usize, out: usize, info: &BackboneInfo) -> Option<u128> {
        let m = self.bottleneck_size.unwrap_or(info.hidden_size) as u128;
        Some(m * (inp.max(info.hidden_size) as u128 + out.max(info.hidden_size) as u128 + 1) + out.max(info.hidden_size) as u128)
    }

    fn build(&self, site: &Site, ctx: &mut BuildCtx) -> Result<Box<dyn Delta>> {
        // Parallel to a whole block: reads the block input (hidden size) and adds to its output.
        let (inp, out) = match site.kind() {
            SiteKind::Linear => dims_at(site, ctx)?,
            _ => (ctx.info.hidden_size, ctx.info.hidden_size),
        };
        let m = bottleneck_size(self.bottleneck_size, self.reduction_factor, inp)?;
        let p = site.path();
        Ok(Box::new(Adapter {
            method: "parallel_adapter",
            parallel: true,
            net: Bottleneck {
                down: dense(ctx, p, "adapter_down", inp, m, self.init_weights, false)?,
                up: dense(ctx, p, "adapter_up", m, out, self.init_weights, true)?,
                act: self.non_linearity,
                scaling: self.scaling,
                shared: Vec::new(),
            },
        }))
    }
}

