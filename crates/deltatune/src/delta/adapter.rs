//! Sequential bottleneck adapter, addition family (Houlsby et al., 2019; Pfeiffer et al., 2020):
//! `y + s·f(y)` inserted after a sublayer's projection, before its residual and layer norm.
//! Placement `houlsby` = after attention output and feed-forward output; `pfeiffer` =
//! feed-forward only. Defaults follow the adapters library's `SeqBnConfig` (reduction 16, relu,
//! "bert" init N(0, 0.02)): near-identity at start. Aliases: `pfeiffer`/`seq_bn`, and
//! `houlsby`/`double_seq_bn` (both positions, swish).

use super::bottleneck::{block_targets, bottleneck_size, dense, dims_at, Activation, Adapter, AdapterInit, Bottleneck, ADAPTER_KINDS};
use super::method::{BuildCtx, Family, Method};
use super::targets::Targets;
use crate::core::{BackboneInfo, Delta, Site, SiteKind};
use crate::error::Result;
use serde::{Deserialize, Serialize};

/// Where a sequential adapter goes when no targets are given.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// After the attention output and the feed-forward output of every layer.
    Houlsby,
    /// After the feed-forward output only.
    Pfeiffer,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdapterConfig {
    pub placement: Placement,
    /// Bottleneck width; `None`: hidden size / reduction_factor.
    pub bottleneck_size: Option<usize>,
    pub reduction_factor: f64,
    pub non_linearity: Activation,
    pub init_weights: AdapterInit,
    pub scaling: f64,
}

impl Default for AdapterConfig {
    fn default() -> Self {
        AdapterConfig {
            placement: Placement::Pfeiffer,
            bottleneck_size: None,
            reduction_factor: 16.0,
            non_linearity: Activation::Relu,
            init_weights: AdapterInit::Bert,
            scaling: 1.0,
        }
    }
}

impl AdapterConfig {
    /// Houlsby's adapter: both sublayers, swish (adapters' `DoubleSeqBnConfig`).
    pub fn houlsby() -> Self {
        AdapterConfig { placement: Placement::Houlsby, non_linearity: Activation::Swish, ..Default::default() }
    }
}

impl Method for AdapterConfig {
    const FAMILY: Family = Family::Addition;
    const ALIASES: &'static [&'static str] = &["pfeiffer", "seq_bn", "houlsby", "double_seq_bn"];
    const KEY_ALIASES: &'static [(&'static str, &'static str)] = &[("bottleneck", "bottleneck_size"), ("m", "bottleneck_size"), ("act", "non_linearity"), ("activation", "non_linearity")];

    fn for_alias(alias: &str) -> Self {
        match alias {
            "houlsby" | "double_seq_bn" => Self::houlsby(),
            _ => Self::default(),
        }
    }

    fn kinds(&self) -> &'static [SiteKind] {
        ADAPTER_KINDS
    }

    fn default_targets(&self, model_type: &str) -> Targets {
        match self.placement {
            Placement::Pfeiffer => block_targets(model_type, false),
            Placement::Houlsby => block_targets(model_type, true),
        }
    }

    fn validate(&self, info: &BackboneInfo) -> Result<()> {
        bottleneck_size(self.bottleneck_size, self.reduction_factor, info.hidden_size).map(|_| ())
    }

    fn param_estimate(&self, inp: usize, out: usize, info: &BackboneInfo) -> Option<u128> {
        let m = self.bottleneck_size.unwrap_or(info.hidden_size) as u128;
        Some(m * (inp.max(info.hidden_size) as u128 + out.max(info.hidden_size) as u128 + 1) + out.max(info.hidden_size) as u128)
    }

    fn build(&self, site: &Site, ctx: &mut BuildCtx) -> Result<Box<dyn Delta>> {
        let (_, d) = dims_at(site, ctx)?;
        let m = bottleneck_size(self.bottleneck_size, self.reduction_factor, d)?;
        let p = site.path();
        Ok(Box::new(Adapter {
            method: "adapter",
            parallel: false,
            net: Bottleneck {
                down: dense(ctx, p, "adapter_down", d, m, self.init_weights, false)?,
                up: dense(ctx, p, "adapter_up", m, d, self.init_weights, true)?,
                act: self.non_linearity,
                scaling: self.scaling,
                shared: Vec::new(),
            },
        }))
    }
}

