//! The contract between backbones and delta methods: the [`Delta`] trait (the hooks a site calls),
//! the [`HookCtx`] a hook receives, the [`Attached`] record a site keeps for each delta, and the
//! [`BackboneInfo`] sizes a method is built for. Methods implement [`Delta`]; backbones call it
//! through their sites; neither knows the other.

use crate::error::Result;
use crate::ops::DropoutKey;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

/// What a hook call knows about the forward pass it is part of.
#[derive(Clone, Debug)]
pub struct HookCtx {
    /// Training mode (dropout active).
    pub train: bool,
    /// Scalar gate multiplying this delta's contribution (structure search); `None` means 1.
    pub gate: Option<Tensor>,
    /// Dropout stream unique to this (step, site, delta).
    pub key: DropoutKey,
    /// No gradient will be taken (see `ForwardCtx::inference`).
    pub inference: bool,
}

impl HookCtx {
    /// `contribution * gate` (or the contribution itself when ungated).
    pub fn gated(&self, contribution: Tensor) -> Result<Tensor> {
        match &self.gate {
            Some(g) => Ok(contribution.broadcast_mul(g)?),
            None => Ok(contribution),
        }
    }
}

/// A trainable modification of one site. Hooks default to "no change"; a method overrides the
/// ones its maths needs. Output hooks return `None` when they leave the value unchanged.
///
/// Hook semantics follow PEFT's wrapper contract: a linear site computes
/// `post(x', base(x'; resolve(weight), resolve(bias)))` with `x' = pre(x)`; block sites
/// (attention output, feed-forward output) call `post(sublayer_input, sublayer_output)` before the
/// residual connection and layer norm.
pub trait Delta: std::fmt::Debug + Send + Sync {
    /// The method's name as used in configs (`lora`, `ia3`, …).
    fn method(&self) -> &'static str;

    /// Trainable tensors owned by this site, named relative to it with PEFT's names
    /// (`lora_A.weight`, `ia3_l`).
    fn params(&self) -> Vec<(String, Var)>;

    /// Trainable tensors shared by all sites of the delta group (e.g. Compacter's PHM rules),
    /// named relative to the group. Counted and saved once per group.
    fn shared_params(&self) -> Vec<(String, Var)> {
        Vec::new()
    }

    /// Tensors saved and loaded with this site's delta but never trained (state such as AdaLoRA's
    /// rank mask), named relative to the site.
    fn buffers(&self) -> Vec<(String, Var)> {
        Vec::new()
    }

    /// Frozen tensors shared by all sites of the group (VeRA's random projections), saved once.
    fn shared_buffers(&self) -> Vec<(String, Var)> {
        Vec::new()
    }

    /// Whether the trainable tensors replace the site's own (fine-tuning) rather than add to them;
    /// decides whether they count towards the model's total size.
    fn replaces_base(&self) -> bool {
        false
    }

    /// Transforms the site's input before the base computation (e.g. IA3 on a feed-forward input).
    fn pre(&self, _x: &Tensor, _h: &HookCtx) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Transforms the site's output; `x` is the (pre-hooked) input (LoRA, adapters, IA3).
    fn post(&self, _x: &Tensor, _y: &Tensor, _h: &HookCtx) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// When this delta's [`Self::post`] is exactly `y + (x Aᵀ) Bᵀ` for this forward (LoRA without
    /// dropout, outside inference): `(A, B)`, with any scale and gate folded into `B`. A linear
    /// layer whose only delta this is then runs base and update as one op
    /// ([`crate::ops::lora_linear`]) instead of calling `post`.
    fn low_rank(&self, _h: &HookCtx) -> Result<Option<(Tensor, Tensor)>> {
        Ok(None)
    }

    /// What this delta amounts to in this forward when a block engine can compute it itself
    /// (see [`EngineHook`]); `None` sends the layer module by module. The default: a plain
    /// low-rank update ([`Self::low_rank`]) or nothing an engine runs.
    fn engine_hook(&self, h: &HookCtx) -> Result<Option<EngineHook>> {
        Ok(self.low_rank(h)?.map(|(a, b)| EngineHook::LowRank(a, b, None)))
    }

    /// Replaces a base parameter of the site (`weight`, `bias`) for this forward: specification
    /// methods (BitFit, LayerNorm tuning, fine-tuning). `base` is the current value, if any.
    fn reparam(&self, _name: &str, _base: Option<&Tensor>, _h: &HookCtx) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Soft tokens to prepend to the input embeddings, shape (b, n, h) (embeddings site).
    fn prompt(&self, _batch: usize, _h: &HookCtx) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Keys and values to prepend in layer `layer`'s self-attention, each (b, n, w) with w the key
    /// width ([`BackboneInfo::kv_width`]) (layer-stack site).
    fn prefix(&self, _layer: usize, _batch: usize, _h: &HookCtx) -> Result<Option<(Tensor, Tensor)>> {
        Ok(None)
    }

    /// Virtual tokens this delta adds: prompt tokens (embeddings site) or prefix length (encoder
    /// site). Real tokens' position ids start after a prefix, as in PEFT.
    fn num_virtual_tokens(&self) -> usize {
        0
    }

    /// New values for the site's base parameters with this delta folded in, if the maths allows
    /// (`base` holds the site's current parameters by name). `None` when not mergeable.
    fn merged(&self, _base: &[(String, Tensor)]) -> Result<Option<Vec<(String, Tensor)>>> {
        Ok(None)
    }
}

/// A delta as a block engine runs it on a linear map or a norm (the engine computes its forward
/// and backward itself instead of calling the hooks).
#[derive(Clone, Debug)]
pub enum EngineHook {
    /// `post` is exactly `y + (x' Aᵀ) Bᵀ` (see [`Delta::low_rank`]), `x'` the input under this
    /// dropout (rate, key) if any (LoRA, VeRA, AdaLoRA with dropout in training), `x` otherwise.
    LowRank(Tensor, Tensor, Option<(f32, crate::ops::DropoutKey)>),
    /// `pre` is exactly `l ⊙ x` over the last dimension, `post` does nothing ((IA)³ on a
    /// feed-forward map); `l` flat, with any gate folded in.
    ScaleIn(Tensor),
    /// `post` is exactly `l ⊙ y` over the last dimension (bias included), `pre` does nothing.
    ScaleOut(Tensor),
    /// `post` is exactly `b₀ + mag ⊙ (y − b₀ + (x Aᵀ) Bᵀ)` (DoRA without dropout: `mag` the
    /// magnitude over the updated weight's row norms, `b₀` the frozen bias), `pre` does nothing.
    Dora { a: Tensor, b: Tensor, mag: Tensor, base_bias: Option<Tensor> },
    /// `post` is exactly `y + x' ΔWᵀ` with this ΔW (out, in) — any scale and gate folded in, an
    /// expression of the trained factors (LoHa, LoKr; DoRA with dropout or a gate:
    /// `diag(mag − 1) W + diag(mag) s B A`) — `x'` the input under this dropout (rate, key) if
    /// any, `x` otherwise; `pre` does nothing.
    Dense(Tensor, Option<(f32, crate::ops::DropoutKey)>),
    /// The map computes with this weight (out, in) instead of its own — an expression of the
    /// frozen weight and the trained tensors (OFT: `W Rᵀ`, its input rotation folded into the
    /// weight) — and neither `pre` nor `post` runs.
    Weight(Tensor),
    /// `post` is exactly `y + up(act(down(src)))` on a block site (a bottleneck adapter; `src` the
    /// block's output, or its input when parallel), `pre` does nothing.
    Bottleneck(crate::ops::Adapter),
    /// No hook: the delta only changes the site's parameters through [`Delta::reparam`], which
    /// the site resolves (BitFit, LayerNorm tuning).
    Reparam,
}

/// One delta as attached to a site.
#[derive(Debug)]
pub struct Attached {
    /// The user-facing name of the delta group this belongs to (e.g. `lora`, `adapter_ffn`).
    pub name: String,
    /// Switched off deltas are skipped by every hook.
    pub enabled: bool,
    /// Index into the forward's gate vector (structure search), if gated.
    pub gate: Option<usize>,
    /// Folded into the site's base parameters (its hooks are then skipped).
    pub merged: bool,
    pub delta: Box<dyn Delta>,
}

impl Attached {
    pub fn new(name: impl Into<String>, delta: Box<dyn Delta>) -> Self {
        Attached { name: name.into(), enabled: true, gate: None, merged: false, delta }
    }

    /// Whether the hooks of this delta run.
    pub fn active(&self) -> bool {
        self.enabled && !self.merged
    }
}

/// Sizes of the backbone a delta is built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackboneInfo {
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    /// Width of one layer's keys (and values) where it differs from `hidden_size`: grouped-query
    /// attention (`num_key_value_heads × head_dim`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_width: Option<usize>,
}

impl BackboneInfo {
    /// Width of one layer's attention keys (and values).
    pub fn kv_width(&self) -> usize {
        self.kv_width.unwrap_or(self.hidden_size)
    }
}

/// Training-time behaviour of a whole delta group that no single site has alone (AdaLoRA's rank
/// allocation and orthogonality penalty). Built by the method for a group's tensors; the trainer
/// adds [`GroupTrainer::regularizer`] to the loss and calls [`GroupTrainer::after_step`] after
/// every optimizer step.
pub trait GroupTrainer: Send {
    /// A term added to the training loss (already weighted), if any.
    fn regularizer(&self) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Called after optimizer step `step` (1-based) of `total`, with that step's gradients of the
    /// group's trainable tensors keyed like [`GroupTensors::trainable`].
    fn after_step(&mut self, _step: usize, _total: usize, _grads: &std::collections::BTreeMap<String, Tensor>) -> Result<()> {
        Ok(())
    }

    /// A line on what the trainer did (AdaLoRA: the kept ranks and trainable budget), reported
    /// when training ends.
    fn report(&self) -> Option<String> {
        None
    }
}

/// The tensors of one delta group, as a [`GroupTrainer`] receives them: (site path, parameter
/// name, variable), trainable ones keyed `<group>.<site path>.<param>` like the trainer's
/// gradient map.
#[derive(Clone, Debug, Default)]
pub struct GroupTensors {
    pub name: String,
    pub trainable: Vec<(String, String, Var)>,
    pub buffers: Vec<(String, String, Var)>,
}

impl GroupTensors {
    /// The gradient-map key of a site tensor.
    pub fn key(&self, site: &str, param: &str) -> String {
        if site.is_empty() {
            format!("{}.shared.{param}", self.name)
        } else {
            format!("{}.{site}.{param}", self.name)
        }
    }
}
