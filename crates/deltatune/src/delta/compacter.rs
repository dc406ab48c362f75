//! Compacter (Karimi Mahabadi et al., 2021), addition family: a bottleneck adapter whose two
//! projections are PHM layers, `H = Σ_i A_i ⊗ (L_i R_i)` with n = `phm_dim` "slow" rules A_i
//! (shared by every adapter of the group when `shared_phm_rule`) and rank-`phm_rank` "fast" factors
//! per adapter. Defaults follow OpenDelta's `CompacterModel` (reduction 16, n = 4, rank 1,
//! gelu_new, rules N(0, 0.01), factors glorot-uniform gain √2) with the rules shared across layers
//! as in the paper (OpenDelta does not support sharing). Placement as the sequential adapter.

use super::bottleneck::{block_targets, Activation, Adapter, Bottleneck, Proj};
use super::method::{site_dims, BuildCtx, Family, Method};
use super::targets::Targets;
use crate::core::init;
use crate::core::{BackboneInfo, Delta, Site, SiteKind};
use crate::error::{Error, Result};
use candle_core::Var;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CompacterConfig {
    pub bottleneck_size: Option<usize>,
    pub reduction_factor: f64,
    /// n: number of Kronecker summands; hidden and bottleneck sizes must be multiples of it.
    pub phm_dim: usize,
    /// Share the rules A_i across all adapters of the group (one set for down, one for up).
    pub shared_phm_rule: bool,
    /// Rank of each factorized W_i = L_i R_i.
    pub phm_rank: usize,
    /// Standard deviation of the rules' normal initialisation.
    pub phm_init_range: f32,
    pub non_linearity: Activation,
}

impl Default for CompacterConfig {
    fn default() -> Self {
        CompacterConfig {
            bottleneck_size: None,
            reduction_factor: 16.0,
            phm_dim: 4,
            shared_phm_rule: true,
            phm_rank: 1,
            phm_init_range: 0.01,
            non_linearity: Activation::GeluNew,
        }
    }
}

impl CompacterConfig {
    fn bottleneck(&self, d: usize) -> Result<usize> {
        let m = match self.bottleneck_size {
            Some(m) => m,
            None => ((d as f64 / self.reduction_factor).floor() as usize).max(1),
        };
        let n = self.phm_dim;
        if n == 0 || !d.is_multiple_of(n) || !m.is_multiple_of(n) {
            return Err(Error::Delta(format!(
                "compacter: hidden size {d} and bottleneck {m} must both be multiples of phm_dim {n}"
            )));
        }
        Ok(m)
    }
}

impl Method for CompacterConfig {
    const FAMILY: Family = Family::Addition;
    const KEY_ALIASES: &'static [(&'static str, &'static str)] = &[("bottleneck", "bottleneck_size"), ("m", "bottleneck_size"), ("act", "non_linearity"), ("activation", "non_linearity")];

    fn kinds(&self) -> &'static [SiteKind] {
        &[SiteKind::Linear, SiteKind::AttentionOutput, SiteKind::Output, SiteKind::Attention, SiteKind::Layer, SiteKind::SelfAttention, SiteKind::Mlp]
    }

    fn default_targets(&self, model_type: &str) -> Targets {
        block_targets(model_type, true)
    }

    fn validate(&self, info: &BackboneInfo) -> Result<()> {
        if self.phm_rank == 0 {
            return Err(Error::Delta("compacter: phm_rank must be at least 1".into()));
        }
        self.bottleneck(info.hidden_size).map(|_| ())
    }

    fn param_estimate(&self, inp: usize, out: usize, info: &BackboneInfo) -> Option<u128> {
        let m = self.bottleneck_size.unwrap_or(info.hidden_size) as u128;
        Some(m * (inp.max(info.hidden_size) as u128 + out.max(info.hidden_size) as u128 + 1) + out.max(info.hidden_size) as u128)
    }

    fn build(&self, site: &Site, ctx: &mut BuildCtx) -> Result<Box<dyn Delta>> {
        let (_, d) = site_dims(site, &ctx.info)?;
        let m = self.bottleneck(d)?;
        let (n, r, path, dev) = (self.phm_dim, self.phm_rank, site.path().to_string(), ctx.device.clone());
        let gain = std::f32::consts::SQRT_2;
        let std = self.phm_init_range;
        let mut shared = Vec::new();
        let mut phm = |ctx: &mut BuildCtx, tag: &str, inp: usize, out: usize| -> Result<Proj> {
            let rule = if self.shared_phm_rule {
                let name = format!("phm_rule.{tag}");
                let v = ctx.shared_var(&name, |c| c.stream("", &name).normal(&[n, n, n], 0.0, std, &dev))?;
                shared.push((name, v.clone()));
                v
            } else {
                Var::from_tensor(&ctx.stream(&path, &format!("{tag}.phm_rule")).normal(&[n, n, n], 0.0, std, &dev)?)?
            };
            let (k, p) = (inp / n, out / n);
            // torch fan_in = size(1), fan_out = size(0) of each 2-D slice W_left[i] (k, r).
            let left = ctx.stream(&path, &format!("{tag}.W_left")).xavier_uniform(&[n, k, r], r, k, gain, &dev)?;
            let right = ctx.stream(&path, &format!("{tag}.W_right")).xavier_uniform(&[n, r, p], p, r, gain, &dev)?;
            Ok(Proj::Phm {
                rule,
                rule_shared: self.shared_phm_rule,
                left: Var::from_tensor(&left)?,
                right: Var::from_tensor(&right)?,
                b: Var::from_tensor(&init::zeros(&[out], &dev)?)?,
            })
        };
        let down = phm(ctx, "adapter_down", d, m)?;
        let up = phm(ctx, "adapter_up", m, d)?;
        Ok(Box::new(Adapter {
            method: "compacter",
            parallel: false,
            net: Bottleneck { down, up, act: self.non_linearity, scaling: 1.0, shared },
        }))
    }
}
