//! Delta modules: the small trainable pieces attached to a frozen backbone's sites.
//!
//! This file owns the [`Delta`] trait — the hooks a backbone calls at each site — and the
//! [`Attached`] record a site keeps for each delta. The methods themselves live one per file.
//! A delta knows only candle and its site's kind; it never imports training or search code.

use crate::error::Result;
use crate::ops::DropoutKey;
use candle_core::{Tensor, Var};

/// What a hook call knows about the forward pass it is part of.
#[derive(Clone, Debug)]
pub struct HookCtx {
    /// Training mode (dropout active).
    pub train: bool,
    /// Scalar gate multiplying this delta's contribution (structure search); `None` means 1.
    pub gate: Option<Tensor>,
    /// Dropout stream unique to this (step, site, delta).
    pub key: DropoutKey,
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

    /// Trainable tensors, named relative to the site with PEFT's names (`lora_A.weight`, `ia3_l`).
    fn params(&self) -> Vec<(String, Var)>;

    /// Number of trainable scalars.
    fn num_params(&self) -> usize {
        self.params().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Transforms the site's input before the base computation (e.g. IA3 on a feed-forward input).
    fn pre(&self, _x: &Tensor, _h: &HookCtx) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Transforms the site's output; `x` is the (pre-hooked) input (LoRA, adapters, IA3).
    fn post(&self, _x: &Tensor, _y: &Tensor, _h: &HookCtx) -> Result<Option<Tensor>> {
        Ok(None)
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

    /// Keys and values to prepend in layer `layer`'s self-attention, each (b, n, h) (encoder site).
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
