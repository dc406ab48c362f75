//! Sites: the named modules of a backbone. A site's dotted path is its checkpoint key prefix
//! (`encoder.layer.3.attention.self.query`); it owns the module's frozen base tensors and the deltas
//! attached to it, and runs their hooks during the forward pass. Backbone tensors are plain
//! `Tensor`s (never variables), so no gradient is computed for them unless a delta replaces them
//! with trainable copies.

use super::delta::{Attached, EngineHook, HookCtx};
use super::forward::ForwardCtx;
use crate::error::{Error, Result};
use crate::ops::{hash_str, DropoutKey};
use candle_core::quantized::QTensor;
use candle_core::{DType, Device, IndexOp, Tensor};
use std::sync::Arc;

/// What a module is; decides which deltas may attach and which hooks run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SiteKind {
    /// The whole backbone (root, empty path).
    Model,
    /// Word + position + token-type embeddings with their layer norm.
    Embeddings,
    /// One embedding table.
    Embedding,
    LayerNorm,
    /// Root-mean-square normalisation (decoders): weight only.
    RmsNorm,
    Linear,
    /// The stack of layers.
    Encoder,
    /// A numbered list of modules (`encoder.layer`).
    ModuleList,
    /// One transformer layer.
    Layer,
    /// Self-attention plus its output projection and layer norm.
    Attention,
    /// The query/key/value projections and the attention itself.
    SelfAttention,
    /// Attention output projection + dropout + residual + layer norm.
    AttentionOutput,
    /// Feed-forward input projection and activation.
    Intermediate,
    /// Feed-forward output projection + dropout + residual + layer norm.
    Output,
    Pooler,
    /// A decoder's gated feed-forward block (`gate_proj`, `up_proj`, `down_proj`).
    Mlp,
}

impl SiteKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SiteKind::Model => "model",
            SiteKind::Embeddings => "embeddings",
            SiteKind::Embedding => "embedding",
            SiteKind::LayerNorm => "layer_norm",
            SiteKind::RmsNorm => "rms_norm",
            SiteKind::Linear => "linear",
            SiteKind::Encoder => "encoder",
            SiteKind::ModuleList => "module_list",
            SiteKind::Layer => "layer",
            SiteKind::Attention => "attention",
            SiteKind::SelfAttention => "self_attention",
            SiteKind::AttentionOutput => "attention_output",
            SiteKind::Intermediate => "intermediate",
            SiteKind::Output => "output",
            SiteKind::Pooler => "pooler",
            SiteKind::Mlp => "mlp",
        }
    }
}

/// One module of a backbone: its path, kind, frozen tensors and attached deltas.
#[derive(Debug)]
pub struct Site {
    path: String,
    kind: SiteKind,
    /// Transformer layer index for sites inside `encoder.layer.N`.
    layer: Option<usize>,
    hash: u64,
    /// Base tensors by their HF name relative to the path (`weight`, `bias`).
    params: Vec<(String, Tensor)>,
    /// Base tensors kept quantized (GGUF blocks), by name; never trained, dequantized on use.
    quantized: Vec<(String, Arc<QTensor>)>,
    /// Originals of `params` while merged deltas are folded in.
    unmerged: Option<Vec<(String, Tensor)>>,
    pub deltas: Vec<Attached>,
}

impl Site {
    pub fn new(path: impl Into<String>, kind: SiteKind, layer: Option<usize>) -> Self {
        let path = path.into();
        Site {
            hash: hash_str(&path),
            path,
            kind,
            layer,
            params: Vec::new(),
            quantized: Vec::new(),
            unmerged: None,
            deltas: Vec::new(),
        }
    }

    pub fn with_param(mut self, name: &str, t: Tensor) -> Self {
        self.params.push((name.to_string(), t));
        self
    }

    /// Adds a base tensor that stays quantized in memory.
    pub fn with_quantized(mut self, name: &str, t: Arc<QTensor>) -> Self {
        self.quantized.push((name.to_string(), t));
        self
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// The quantized base tensor `name`, if this site keeps one.
    pub fn quantized(&self, name: &str) -> Option<&Arc<QTensor>> {
        self.quantized.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// The quantized base tensors of this site.
    pub fn quantized_params(&self) -> &[(String, Arc<QTensor>)] {
        &self.quantized
    }

    /// The shape of base tensor `name`, whether it is held in f32 or quantized.
    pub fn param_dims(&self, name: &str) -> Option<Vec<usize>> {
        self.param(name).map(|t| t.dims().to_vec()).or_else(|| self.quantized(name).map(|q| q.shape().dims().to_vec()))
    }

    pub fn kind(&self) -> SiteKind {
        self.kind
    }

    pub fn layer(&self) -> Option<usize> {
        self.layer
    }

    /// The site's own base tensors (not its children's).
    pub fn params(&self) -> &[(String, Tensor)] {
        &self.params
    }

    pub fn param(&self, name: &str) -> Option<&Tensor> {
        self.params.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// Number of base scalars held by this site itself.
    pub fn num_params(&self) -> usize {
        self.params.iter().map(|(_, t)| t.elem_count()).sum::<usize>()
            + self.quantized.iter().map(|(_, q)| q.shape().elem_count()).sum::<usize>()
    }

    /// Replaces the base tensor `name` (same shape required).
    pub fn set_param(&mut self, name: &str, value: Tensor) -> Result<()> {
        let path = self.path.clone();
        let slot = self
            .params
            .iter_mut()
            .find(|(n, _)| n == name)
            .ok_or_else(|| Error::Delta(format!("{path} has no parameter `{name}`")))?;
        if slot.1.dims() != value.dims() {
            return Err(Error::ShapeMismatch {
                file: path.into(),
                key: name.into(),
                expected: slot.1.dims().to_vec(),
                got: value.dims().to_vec(),
            });
        }
        slot.1 = value;
        Ok(())
    }

    /// Replaces every quantized base tensor by its f32 dequantization (before merging deltas into
    /// it or writing it out). Returns how many were converted.
    pub fn dequantize(&mut self) -> Result<usize> {
        let q = std::mem::take(&mut self.quantized);
        let n = q.len();
        for (name, t) in q {
            let dev = self.params.first().map(|(_, p)| p.device().clone()).unwrap_or(Device::Cpu);
            self.params.push((name, t.dequantize(&dev)?));
        }
        Ok(n)
    }

    /// Whether any merged delta is folded into the base tensors.
    pub fn is_merged(&self) -> bool {
        self.unmerged.is_some()
    }

    /// Folds every active, mergeable delta into the base tensors. Returns how many were merged.
    /// Non-finite merged values are an error and leave the site unchanged.
    pub fn merge(&mut self) -> Result<usize> {
        let original = self.params.clone();
        let mut current = self.params.clone();
        let mut merged_idx = Vec::new();
        for (i, a) in self.deltas.iter().enumerate() {
            if !a.active() {
                continue;
            }
            if let Some(new) = a.delta.merged(&current)? {
                for (name, t) in new {
                    let finite = t.flatten_all()?.abs()?.max(0)?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
                    if !finite.is_finite() {
                        return Err(Error::NonFinite(format!("merging {} into {}.{name}", a.name, self.path)));
                    }
                    match current.iter_mut().find(|(n, _)| *n == name) {
                        Some(slot) => slot.1 = t,
                        None => current.push((name, t)),
                    }
                }
                merged_idx.push(i);
            }
        }
        if merged_idx.is_empty() {
            return Ok(0);
        }
        if self.unmerged.is_none() {
            self.unmerged = Some(original);
        }
        self.params = current;
        for i in &merged_idx {
            self.deltas[*i].merged = true;
        }
        Ok(merged_idx.len())
    }

    /// Restores the base tensors saved by [`Site::merge`] exactly and re-activates the deltas.
    pub fn unmerge(&mut self) {
        if let Some(orig) = self.unmerged.take() {
            self.params = orig;
        }
        for a in &mut self.deltas {
            a.merged = false;
        }
    }

    /// Forgets the unmerged originals: merged deltas become part of the base (for export).
    pub fn bake(&mut self) {
        self.unmerged = None;
        self.deltas.retain(|a| !a.merged);
    }

    fn hook_ctx(&self, i: usize, a: &Attached, ctx: &ForwardCtx) -> Result<HookCtx> {
        let gate = match (a.gate, ctx.gates) {
            (Some(g), Some(gates)) => Some(gates.i(g)?),
            _ => None,
        };
        Ok(HookCtx { train: ctx.train, gate, key: ctx.key.derive_n(self.hash).derive_n(i as u64 + 1), inference: ctx.inference && !ctx.train })
    }

    fn active(&self) -> impl Iterator<Item = (usize, &Attached)> {
        self.deltas.iter().enumerate().filter(|(_, a)| a.active())
    }

    /// The low-rank update `(A, B)` of this site's only active delta when its output hook is
    /// exactly `y + (x Aᵀ) Bᵀ` on every row of this forward ([`super::delta::Delta::low_rank`]); the
    /// linear layer then runs base and update as one op instead of calling [`Self::post`].
    pub fn sole_low_rank(&self, ctx: &ForwardCtx) -> Result<Option<(Tensor, Tensor)>> {
        let mut active = self.active();
        let (Some((i, a)), None) = (active.next(), active.next()) else { return Ok(None) };
        if self.rows(a, ctx) != Rows::All {
            return Ok(None);
        }
        a.delta.low_rank(&self.hook_ctx(i, a, ctx)?)
    }

    /// What a block engine runs at this site besides its (resolved) parameters: `None` when a
    /// delta here is one no engine computes, or runs on some rows only; else the site's low-rank
    /// update, (IA)³ scale or adapter — at most one of them — with any number of deltas that only change
    /// the parameters ([`EngineHook::Reparam`]: BitFit, LayerNorm tuning), which
    /// [`Self::resolve`] applies.
    pub fn engine_delta(&self, ctx: &ForwardCtx) -> Result<Option<crate::ops::MapDelta>> {
        let mut out = crate::ops::MapDelta::default();
        for (i, a) in self.active() {
            if self.rows(a, ctx) != Rows::All {
                return Ok(None);
            }
            let hook = a.delta.engine_hook(&self.hook_ctx(i, a, ctx)?)?;
            let taken = out.is_some();
            match hook {
                Some(EngineHook::Bottleneck(ad)) if !taken => out.adapter = Some(ad),
                Some(EngineHook::Reparam) => {}
                Some(EngineHook::LowRank(a, b, drop)) if !taken => {
                    out.lora = Some((a, b));
                    out.input_dropout = drop.filter(|(p, _)| *p > 0.0);
                }
                Some(EngineHook::Dense(dw, drop)) if !taken => {
                    out.dense = Some(dw);
                    out.input_dropout = drop.filter(|(p, _)| *p > 0.0);
                }
                Some(EngineHook::Weight(w)) if !taken => out.weight = Some(w),
                Some(EngineHook::Dora { a, b, mag, base_bias }) if !taken => {
                    out.lora = Some((a, b));
                    out.scale = Some(crate::ops::Scale::Mag(mag, base_bias));
                }
                Some(EngineHook::ScaleIn(l)) if !taken => out.scale = Some(crate::ops::Scale::In(l)),
                Some(EngineHook::ScaleOut(l)) if !taken => out.scale = Some(crate::ops::Scale::Out(l)),
                _ => return Ok(None),
            }
        }
        Ok(Some(out))
    }

    /// Whether any delta would run at this site.
    pub fn has_active(&self) -> bool {
        self.active().next().is_some()
    }

    /// The rows `a` runs on in this forward (see [`crate::core::RowRoute`]).
    fn rows(&self, a: &Attached, ctx: &ForwardCtx) -> Rows {
        match ctx.route {
            None => Rows::All,
            Some(r) => match r.rows_of(&a.name) {
                None => Rows::Skip,
                Some((0, l)) if l == r.batch => Rows::All,
                Some((s, l)) => Rows::Range(s, l),
            },
        }
    }

    fn not_row_local(&self, a: &Attached, what: &str) -> Error {
        Error::Delta(format!(
            "delta `{}` changes {what} at {} for the whole batch; it cannot share a batch with rows of other deltas",
            a.name, self.path
        ))
    }

    /// Runs the `pre` hooks.
    pub fn pre(&self, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let mut x = x.clone();
        for (i, a) in self.active() {
            let h = self.hook_ctx(i, a, ctx)?;
            match self.rows(a, ctx) {
                Rows::Skip => {}
                Rows::All => {
                    if let Some(nx) = a.delta.pre(&x, &h)? {
                        x = nx;
                    }
                }
                Rows::Range(s, l) => {
                    if let Some(part) = a.delta.pre(&x.narrow(0, s, l)?, &h)? {
                        x = splice_rows(&x, s, l, &part)?;
                    }
                }
            }
        }
        Ok(x)
    }

    /// Runs the `post` hooks on output `y` of input `x`.
    pub fn post(&self, x: &Tensor, y: Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let mut y = y;
        for (i, a) in self.active() {
            let h = self.hook_ctx(i, a, ctx)?;
            match self.rows(a, ctx) {
                Rows::Skip => {}
                Rows::All => {
                    if let Some(ny) = a.delta.post(x, &y, &h)? {
                        y = ny;
                    }
                }
                Rows::Range(s, l) => {
                    if let Some(part) = a.delta.post(&x.narrow(0, s, l)?, &y.narrow(0, s, l)?, &h)? {
                        y = splice_rows(&y, s, l, &part)?;
                    }
                }
            }
        }
        Ok(y)
    }

    /// The effective value of parameter `name`: the base tensor with `reparam` hooks applied.
    pub fn resolve(&self, name: &str, ctx: &ForwardCtx) -> Result<Option<Tensor>> {
        let mut value = self.param(name).cloned();
        for (i, a) in self.active() {
            let rows = self.rows(a, ctx);
            if rows == Rows::Skip {
                continue;
            }
            if let Some(v) = a.delta.reparam(name, value.as_ref(), &self.hook_ctx(i, a, ctx)?)? {
                if rows != Rows::All {
                    return Err(self.not_row_local(a, &format!("parameter `{name}`")));
                }
                value = Some(v);
            }
        }
        Ok(value)
    }

    /// Like [`Site::resolve`] for a parameter the site must have.
    pub fn require(&self, name: &str, ctx: &ForwardCtx) -> Result<Tensor> {
        self.resolve(name, ctx)?
            .ok_or_else(|| Error::Delta(format!("{}: parameter `{name}` is missing", self.path)))
    }

    /// Soft prompt tokens from this site's deltas, concatenated, (b, n, h).
    pub fn prompts(&self, batch: usize, ctx: &ForwardCtx) -> Result<Option<Tensor>> {
        let mut parts = Vec::new();
        for (i, a) in self.active() {
            let rows = self.rows(a, ctx);
            if rows == Rows::Skip {
                continue;
            }
            if let Some(p) = a.delta.prompt(batch, &self.hook_ctx(i, a, ctx)?)? {
                if rows != Rows::All {
                    return Err(self.not_row_local(a, "the soft prompt"));
                }
                parts.push(p);
            }
        }
        Ok(if parts.is_empty() { None } else { Some(Tensor::cat(&parts, 1)?) })
    }

    /// Prefix keys/values for `layer` from this site's deltas, concatenated along time.
    pub fn prefixes(&self, layer: usize, batch: usize, ctx: &ForwardCtx) -> Result<Option<(Tensor, Tensor)>> {
        let (mut ks, mut vs) = (Vec::new(), Vec::new());
        for (i, a) in self.active() {
            let rows = self.rows(a, ctx);
            if rows == Rows::Skip {
                continue;
            }
            if let Some((k, v)) = a.delta.prefix(layer, batch, &self.hook_ctx(i, a, ctx)?)? {
                if rows != Rows::All {
                    return Err(self.not_row_local(a, "the attention prefix"));
                }
                ks.push(k);
                vs.push(v);
            }
        }
        Ok(if ks.is_empty() { None } else { Some((Tensor::cat(&ks, 1)?, Tensor::cat(&vs, 1)?)) })
    }

    /// Virtual tokens added by the active deltas of this site.
    pub fn num_virtual_tokens(&self) -> usize {
        self.active().map(|(_, a)| a.delta.num_virtual_tokens()).sum()
    }

    /// Virtual tokens added by the deltas that run in the forward of `ctx` (all active ones
    /// without a route, the routed groups with one).
    pub fn num_virtual_tokens_in(&self, ctx: &ForwardCtx) -> usize {
        self.active().filter(|(_, a)| self.rows(a, ctx) != Rows::Skip).map(|(_, a)| a.delta.num_virtual_tokens()).sum()
    }

    /// Whether group `name` replaces a base parameter of this site (`reparam`: BitFit, LayerNorm
    /// tuning, fine-tuning), which no row of a batch can opt out of.
    pub fn replaces_params(&self, name: &str) -> Result<bool> {
        let ctx = ForwardCtx::eval();
        for (i, a) in self.active().filter(|(_, a)| a.name == name) {
            let h = self.hook_ctx(i, a, &ctx)?;
            for (p, _) in &self.params {
                if a.delta.reparam(p, self.param(p), &h)?.is_some() {
                    return Ok(true);
                }
            }
            for (p, _) in &self.quantized {
                if a.delta.reparam(p, None, &h)?.is_some() {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Virtual tokens (soft prompts, prefixes) group `name` adds at this site.
    pub fn virtual_tokens_of(&self, name: &str) -> usize {
        self.active().filter(|(_, a)| a.name == name).map(|(_, a)| a.delta.num_virtual_tokens()).sum()
    }

    /// Dropout key for a dropout inside this site's own computation.
    pub fn dropout_key(&self, ctx: &ForwardCtx, tag: u64) -> DropoutKey {
        ctx.key.derive_n(self.hash).derive_n(tag.wrapping_add(0x1000))
    }
}


/// Where a delta runs in one forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rows {
    All,
    Range(usize, usize),
    Skip,
}

/// `x` with rows `start..start + len` (dimension 0) replaced by `part`.
fn splice_rows(x: &Tensor, start: usize, len: usize, part: &Tensor) -> Result<Tensor> {
    let b = x.dim(0)?;
    let mut pieces = Vec::with_capacity(3);
    if start > 0 {
        pieces.push(x.narrow(0, 0, start)?);
    }
    pieces.push(part.clone());
    if start + len < b {
        pieces.push(x.narrow(0, start + len, b - start - len)?);
    }
    Ok(if pieces.len() == 1 { part.clone() } else { Tensor::cat(&pieces, 0)? })
}
