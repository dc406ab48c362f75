//! Bottleneck adapters, addition family: a down projection, a non-linearity and an up projection.
//!
//! * [`AdapterConfig`] — sequential (Houlsby et al., 2019; Pfeiffer et al., 2020): `y + s·f(y)`
//!   inserted after a sublayer's projection, before its residual and layer norm. Placement
//!   `houlsby` = after attention output and feed-forward output; `pfeiffer` = feed-forward only.
//!   Defaults follow the adapters library's `SeqBnConfig` (reduction 16, relu, "bert" init
//!   N(0, 0.02)): near-identity at start.
//! * [`ParallelAdapterConfig`] — parallel (He et al., 2022; adapters' `ParBnConfig`): `y + s·f(x)`
//!   with `x` the sublayer input; reduction 2, relu, scaling 4, up projection zero ("mam_adapter").
//! * [`LowRankAdapterConfig`] — OpenDelta's low-rank adapter (each projection a rank-r product,
//!   reduction 32, gelu_new, glorot-uniform gain √2); sequential like the first.
//!
//! The shared machinery ([`Proj`], [`Bottleneck`]) also serves Compacter's PHM projections.

use super::{BuildCtx, Delta, HookCtx, Method, Targets};
use crate::backbone::{Site, SiteKind};
use crate::error::{Error, Result};
use crate::ops;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

/// Non-linearity of a bottleneck.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    Relu,
    /// Exact erf GELU.
    Gelu,
    /// tanh-approximated GELU (HF/OpenDelta `gelu_new`).
    GeluNew,
    #[serde(alias = "silu")]
    Swish,
    Tanh,
    Identity,
}

impl Activation {
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::Relu => x.relu()?,
            Activation::Gelu => ops::gelu(x)?,
            Activation::GeluNew => ops::gelu_tanh(x)?,
            Activation::Swish => x.silu()?,
            Activation::Tanh => x.tanh()?,
            Activation::Identity => x.clone(),
        })
    }
}

/// Initialisation of a dense bottleneck.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdapterInit {
    /// Weights N(0, 0.02), biases 0 (adapters' "bert").
    Bert,
    /// Weights truncated N(0, 0.01) in ±0.02, biases 0 (adapters' "houlsby").
    Houlsby,
    /// Down kaiming-uniform, up weight and bias 0 — an exact no-op at start (adapters' "mam_adapter").
    MamAdapter,
    /// Weights N(0, 0.01), biases 0 (OpenDelta's adapters).
    Opendelta,
}

/// Where a sequential adapter goes when no targets are given.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// After the attention output and the feed-forward output of every layer.
    Houlsby,
    /// After the feed-forward output only.
    Pfeiffer,
}

const FFN_OUTPUT: &str = r"re:encoder\.layer\.\d+\.output";
const ATTN_OUTPUT: &str = r"re:encoder\.layer\.\d+\.attention\.output";

/// Default adapter positions: after each layer's feed-forward block, and with `attention` after
/// its attention block too (BERT: the output sub-blocks before their residual and layer norm;
/// decoders: the `mlp` and `self_attn` blocks before their residual).
pub(crate) fn block_targets(model_type: &str, attention: bool) -> Targets {
    match (super::is_decoder(model_type), attention) {
        (true, true) => super::targets(&[r"re:model\.layers\.\d+\.self_attn", r"re:model\.layers\.\d+\.mlp"]),
        (true, false) => super::targets(&[r"re:model\.layers\.\d+\.mlp"]),
        (false, true) => super::targets(&[ATTN_OUTPUT, FFN_OUTPUT]),
        (false, false) => super::targets(&[FFN_OUTPUT]),
    }
}

/// Kinds a bottleneck adapter can sit on: projections and blocks whose output has the hidden size.
const ADAPTER_KINDS: &[SiteKind] =
    &[SiteKind::Linear, SiteKind::AttentionOutput, SiteKind::Output, SiteKind::Attention, SiteKind::SelfAttention, SiteKind::Layer, SiteKind::Mlp];

fn bottleneck_size(explicit: Option<usize>, reduction: f64, hidden: usize) -> Result<usize> {
    let m = match explicit {
        Some(m) => m,
        None => {
            if !(reduction > 0.0) {
                return Err(Error::Delta(format!("reduction_factor {reduction} must be positive")));
            }
            ((hidden as f64 / reduction).floor() as usize).max(1)
        }
    };
    if m == 0 {
        return Err(Error::Delta("bottleneck_size must be at least 1".into()));
    }
    Ok(m)
}

/// One projection of a bottleneck: `x W^T + b` in one of three parameterizations.
#[derive(Debug)]
pub(crate) enum Proj {
    /// w: (out, in), b: (out).
    Dense { w: Var, b: Var },
    /// `x L R + b`, L: (in, r), R: (r, out) — OpenDelta's LowRankLinear.
    LowRank { left: Var, right: Var, b: Var },
    /// Parameterized hypercomplex multiplication (Compacter): `x H + b` with
    /// `H = Σ_i A_i ⊗ (L_i R_i)`; A (shared rules): (n, n, n), L: (n, in/n, r), R: (n, r, out/n).
    Phm { rule: Var, rule_shared: bool, left: Var, right: Var, b: Var },
}

impl Proj {
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Proj::Dense { w, b } => ops::linear(x, w.as_tensor(), Some(b.as_tensor())),
            Proj::LowRank { left, right, b } => {
                let y = matmul_last(&matmul_last(x, left.as_tensor())?, right.as_tensor())?;
                Ok(y.broadcast_add(b.as_tensor())?)
            }
            Proj::Phm { rule, left, right, b, .. } => {
                let h = phm_matrix(rule.as_tensor(), left.as_tensor(), right.as_tensor())?;
                Ok(matmul_last(x, &h)?.broadcast_add(b.as_tensor())?)
            }
        }
    }

    /// Site-local parameters under `prefix` (shared rules are reported separately).
    pub(crate) fn params(&self, prefix: &str) -> Vec<(String, Var)> {
        let p = |n: &str, v: &Var| (format!("{prefix}.{n}"), v.clone());
        match self {
            Proj::Dense { w, b } => vec![p("weight", w), p("bias", b)],
            Proj::LowRank { left, right, b } => vec![p("W_left", left), p("W_right", right), p("bias", b)],
            Proj::Phm { rule, rule_shared, left, right, b } => {
                let mut v = vec![p("W_left", left), p("W_right", right), p("bias", b)];
                if !rule_shared {
                    v.push(p("phm_rule", rule));
                }
                v
            }
        }
    }
}

/// `x @ m` over the last dimension of x (..., k) with m (k, n).
fn matmul_last(x: &Tensor, m: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let k = *dims.last().ok_or_else(|| Error::Delta("empty input".into()))?;
    let rows = x.elem_count() / k.max(1);
    let y = x.reshape((rows, k))?.matmul(m)?;
    let mut out = dims;
    if let Some(l) = out.last_mut() {
        *l = m.dim(1)?;
    }
    Ok(y.reshape(out)?)
}

/// `Σ_i kron(rule_i, left_i right_i)` → (in, out).
pub(crate) fn phm_matrix(rule: &Tensor, left: &Tensor, right: &Tensor) -> Result<Tensor> {
    let (n, k, _) = left.dims3()?;
    let p = right.dim(2)?;
    let w = left.matmul(right)?; // (n, k, p)
    // kron(A, B)[a*k + i, c*p + j] = A[a, c] B[i, j]: broadcast (n, n, 1, n, 1) * (n, 1, k, 1, p).
    let a = rule.reshape((n, n, 1, n, 1))?;
    let b = w.reshape((n, 1, k, 1, p))?;
    let prod = a.broadcast_mul(&b)?.sum(0)?; // (n, k, n, p)
    Ok(prod.reshape((n * k, n * p))?)
}

/// down → activation → up, with a scaling factor.
#[derive(Debug)]
pub(crate) struct Bottleneck {
    pub(crate) down: Proj,
    pub(crate) up: Proj,
    pub(crate) act: Activation,
    pub(crate) scaling: f64,
    pub(crate) shared: Vec<(String, Var)>,
}

impl Bottleneck {
    fn apply(&self, x: &Tensor, h: &HookCtx) -> Result<Tensor> {
        let z = self.up.forward(&self.act.apply(&self.down.forward(x)?)?)?;
        let z = if self.scaling != 1.0 { (z * self.scaling)? } else { z };
        h.gated(z)
    }

    fn params(&self) -> Vec<(String, Var)> {
        let mut v = self.down.params("adapter_down");
        v.extend(self.up.params("adapter_up"));
        v
    }
}

/// Dense projection weights (out, in) and bias under `init`.
fn dense(ctx: &BuildCtx, site: &str, tag: &str, inp: usize, out: usize, init: AdapterInit, is_up: bool) -> Result<Proj> {
    let s = ctx.stream(site, tag);
    let dev = &ctx.device;
    let w = match (init, is_up) {
        (AdapterInit::Bert, _) => s.normal(&[out, inp], 0.0, 0.02, dev)?,
        (AdapterInit::Houlsby, _) => s.trunc_normal(&[out, inp], 0.01, dev)?,
        (AdapterInit::MamAdapter, false) => s.kaiming_uniform(&[out, inp], inp, dev)?,
        (AdapterInit::MamAdapter, true) => super::init::zeros(&[out, inp], dev)?,
        (AdapterInit::Opendelta, _) => s.normal(&[out, inp], 0.0, 0.01, dev)?,
    };
    Ok(Proj::Dense { w: Var::from_tensor(&w)?, b: Var::from_tensor(&super::init::zeros(&[out], dev)?)? })
}

/// Input/output sizes a bottleneck sees at a site: sequential adapters read the output, parallel
/// ones read the input.
fn dims_at(site: &Site, ctx: &BuildCtx) -> Result<(usize, usize)> {
    super::site_dims(site, &ctx.info)
}

// ---------------------------------------------------------------------------------------------
// Sequential adapter.

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
    fn kinds(&self) -> &'static [SiteKind] {
        ADAPTER_KINDS
    }

    fn default_targets(&self, model_type: &str) -> Targets {
        match self.placement {
            Placement::Pfeiffer => block_targets(model_type, false),
            Placement::Houlsby => block_targets(model_type, true),
        }
    }

    fn validate(&self, info: &super::BackboneInfo) -> Result<()> {
        bottleneck_size(self.bottleneck_size, self.reduction_factor, info.hidden_size).map(|_| ())
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

// ---------------------------------------------------------------------------------------------
// Parallel adapter.

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
    fn kinds(&self) -> &'static [SiteKind] {
        ADAPTER_KINDS
    }

    fn default_targets(&self, model_type: &str) -> Targets {
        block_targets(model_type, false)
    }

    fn validate(&self, info: &super::BackboneInfo) -> Result<()> {
        bottleneck_size(self.bottleneck_size, self.reduction_factor, info.hidden_size).map(|_| ())
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

// ---------------------------------------------------------------------------------------------
// Low-rank adapter.

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
    fn kinds(&self) -> &'static [SiteKind] {
        ADAPTER_KINDS
    }

    fn default_targets(&self, model_type: &str) -> Targets {
        block_targets(model_type, true)
    }

    fn validate(&self, info: &super::BackboneInfo) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::Delta("low_rank_adapter: rank must be at least 1".into()));
        }
        bottleneck_size(self.bottleneck_size, self.reduction_factor, info.hidden_size).map(|_| ())
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
                b: Var::from_tensor(&super::init::zeros(&[out], &dev)?)?,
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

// ---------------------------------------------------------------------------------------------
// The attached delta, shared by all bottleneck methods (Compacter included).

#[derive(Debug)]
pub(crate) struct Adapter {
    pub(crate) method: &'static str,
    /// Parallel: reads the site input; sequential: reads the site output.
    pub(crate) parallel: bool,
    pub(crate) net: Bottleneck,
}

impl Delta for Adapter {
    fn method(&self) -> &'static str {
        self.method
    }

    fn params(&self) -> Vec<(String, Var)> {
        self.net.params()
    }

    fn shared_params(&self) -> Vec<(String, Var)> {
        self.net.shared.clone()
    }

    fn post(&self, x: &Tensor, y: &Tensor, h: &HookCtx) -> Result<Option<Tensor>> {
        let src = if self.parallel { x } else { y };
        Ok(Some(y.add(&self.net.apply(src, h)?)?))
    }
}
