//! The bottleneck building block shared by the adapter methods (sequential, parallel, low-rank)
//! and Compacter: a down projection, a non-linearity and an up projection ([`Bottleneck`]), its
//! projection parametrisations ([`Proj`]: dense, low-rank, PHM), their initialisations, the default
//! block positions, and the attached delta ([`Adapter`]). Not a method itself.

use super::method::{site_dims, BuildCtx};
use super::targets::{is_decoder, targets, Targets};
use crate::core::init::zeros;
use crate::core::{Delta, EngineHook, HookCtx, Site, SiteKind};
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

const FFN_OUTPUT: &str = r"re:encoder\.layer\.\d+\.output";
const ATTN_OUTPUT: &str = r"re:encoder\.layer\.\d+\.attention\.output";

/// Default adapter positions: after each layer's feed-forward block, and with `attention` after
/// its attention block too (BERT: the output sub-blocks before their residual and layer norm;
/// decoders: the `mlp` and `self_attn` blocks before their residual).
pub fn block_targets(model_type: &str, attention: bool) -> Targets {
    match (is_decoder(model_type), attention) {
        (true, true) => targets(&[r"re:model\.layers\.\d+\.self_attn", r"re:model\.layers\.\d+\.mlp"]),
        (true, false) => targets(&[r"re:model\.layers\.\d+\.mlp"]),
        (false, true) => targets(&[ATTN_OUTPUT, FFN_OUTPUT]),
        (false, false) => targets(&[FFN_OUTPUT]),
    }
}

/// Kinds a bottleneck adapter can sit on: projections and blocks whose output has the hidden size.
pub const ADAPTER_KINDS: &[SiteKind] =
    &[SiteKind::Linear, SiteKind::AttentionOutput, SiteKind::Output, SiteKind::Attention, SiteKind::SelfAttention, SiteKind::Layer, SiteKind::Mlp];

pub fn bottleneck_size(explicit: Option<usize>, reduction: f64, hidden: usize) -> Result<usize> {
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
pub enum Proj {
    /// w: (out, in), b: (out).
    Dense { w: Var, b: Var },
    /// `x L R + b`, L: (in, r), R: (r, out) — OpenDelta's LowRankLinear.
    LowRank { left: Var, right: Var, b: Var },
    /// Parameterized hypercomplex multiplication (Compacter): `x H + b` with
    /// `H = Σ_i A_i ⊗ (L_i R_i)`; A (shared rules): (n, n, n), L: (n, in/n, r), R: (n, r, out/n).
    Phm { rule: Var, rule_shared: bool, left: Var, right: Var, b: Var },
}

impl Proj {
    /// The projection as a dense (out, in) weight and its bias (tensors that carry the gradient
    /// back to the parameters).
    pub fn dense(&self) -> Result<(Tensor, Tensor)> {
        Ok(match self {
            Proj::Dense { w, b } => (w.as_tensor().clone(), b.as_tensor().clone()),
            Proj::LowRank { left, right, b } => (left.as_tensor().matmul(right.as_tensor())?.t()?.contiguous()?, b.as_tensor().clone()),
            Proj::Phm { rule, left, right, b, .. } => (phm_matrix(rule.as_tensor(), left.as_tensor(), right.as_tensor())?.t()?.contiguous()?, b.as_tensor().clone()),
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
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
    pub fn params(&self, prefix: &str) -> Vec<(String, Var)> {
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
pub fn matmul_last(x: &Tensor, m: &Tensor) -> Result<Tensor> {
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
pub fn phm_matrix(rule: &Tensor, left: &Tensor, right: &Tensor) -> Result<Tensor> {
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
pub struct Bottleneck {
    pub down: Proj,
    pub up: Proj,
    pub act: Activation,
    pub scaling: f64,
    pub shared: Vec<(String, Var)>,
}

impl Bottleneck {
    pub fn apply(&self, x: &Tensor, h: &HookCtx) -> Result<Tensor> {
        let z = self.up.forward(&self.act.apply(&self.down.forward(x)?)?)?;
        let z = if self.scaling != 1.0 { (z * self.scaling)? } else { z };
        h.gated(z)
    }

    pub fn params(&self) -> Vec<(String, Var)> {
        let mut v = self.down.params("adapter_down");
        v.extend(self.up.params("adapter_up"));
        v
    }
}

/// Dense projection weights (out, in) and bias under `init`.
pub fn dense(ctx: &BuildCtx, site: &str, tag: &str, inp: usize, out: usize, init: AdapterInit, is_up: bool) -> Result<Proj> {
    let s = ctx.stream(site, tag);
    let dev = &ctx.device;
    let w = match (init, is_up) {
        (AdapterInit::Bert, _) => s.normal(&[out, inp], 0.0, 0.02, dev)?,
        (AdapterInit::Houlsby, _) => s.trunc_normal(&[out, inp], 0.01, dev)?,
        (AdapterInit::MamAdapter, false) => s.kaiming_uniform(&[out, inp], inp, dev)?,
        (AdapterInit::MamAdapter, true) => zeros(&[out, inp], dev)?,
        (AdapterInit::Opendelta, _) => s.normal(&[out, inp], 0.0, 0.01, dev)?,
    };
    Ok(Proj::Dense { w: Var::from_tensor(&w)?, b: Var::from_tensor(&zeros(&[out], dev)?)? })
}

/// Input/output sizes a bottleneck sees at a site: sequential adapters read the output, parallel
/// ones read the input.
pub fn dims_at(site: &Site, ctx: &BuildCtx) -> Result<(usize, usize)> {
    site_dims(site, &ctx.info)
}

#[derive(Debug)]
pub struct Adapter {
    pub method: &'static str,
    /// Parallel: reads the site input; sequential: reads the site output.
    pub parallel: bool,
    pub net: Bottleneck,
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

    /// The bottleneck with dense (out, in) matrices — a low-rank or PHM projection as the matrix
    /// it multiplies by — and the scaling and gate folded into the up projection.
    fn engine_hook(&self, h: &HookCtx) -> Result<Option<EngineHook>> {
        let act = match self.net.act {
            Activation::Relu => ops::Act::Relu,
            Activation::Gelu => ops::Act::Gelu,
            Activation::Swish => ops::Act::Silu,
            Activation::Tanh => ops::Act::Tanh,
            Activation::Identity => ops::Act::Identity,
            Activation::GeluNew => ops::Act::GeluTanh,
        };
        let fold = |t: Tensor| -> Result<Tensor> {
            let t = if self.net.scaling != 1.0 { (t * self.net.scaling)? } else { t };
            h.gated(t)
        };
        let (down, (wu, bu)) = (self.net.down.dense()?, self.net.up.dense()?);
        Ok(Some(EngineHook::Bottleneck(ops::Adapter { down, up: (fold(wu)?, fold(bu)?), act, parallel: self.parallel })))
    }
}
