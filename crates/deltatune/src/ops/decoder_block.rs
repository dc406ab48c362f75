//! The block engine for decoders: a whole Llama-family layer — the input RMS norm, the q, k, v
//! projections with the rotary embedding, causal grouped-query attention, the output projection
//! and its residual sum, the second RMS norm, the SwiGLU feed-forward and its residual sum, with
//! the deltas on them (a LoRA or an (IA)³ scale on any of the seven linear maps, trained biases
//! and norm weights, an adapter after each block, prefix keys and values:
//! [`super::engine_hooks`]) — as one op with a hand-written forward and backward.
//!
//! What it removes from a training step, as the encoder's engine ([`super::block`]) does: candle's
//! gradient store zero-fills a buffer for every input of every node and adds each gradient into it
//! (a layer was about twenty nodes: the norms, seven maps, two reshapes and rotations, the
//! attention, the gate, two residual sums); here every gradient is written once by the kernel
//! that computes it, the residual stream's gradient accumulating in one buffer. q, k and v are
//! products into column blocks of one buffer, rotated in place, read in place by the attention
//! (grouped-query: each key/value head serves its group of query heads without being copied) and
//! their gradient comes back in the same layout, un-rotated in place and taken through the three
//! weights into one input gradient. A quantized weight (GGUF) is dequantized into a transient f32
//! matrix just before its product, forward and backward, as the per-op path does.
//!
//! Kept for the backward: q, k (rotated) and v side by side, the residual stream after attention,
//! the gate's and up's outputs, and only where a LoRA needs its input: the first norm's output
//! (q, k, v), the attention context (o), the second norm's output (gate, up), the gated product
//! (down); and each LoRA's `x Aᵀ`. The input and the first norm's statistics are recomputed from
//! the op's argument.
//!
//! The forward gives the per-op path's numbers to the bit ([`decoder_block_composed`], what a layer
//! runs without the engine); gradients sum in another order (within 1e-4 relative, tested).

use super::activation::{swiglu, swiglu_grad_into, swiglu_into};
use super::attention::{causal_attention, Attention};
use super::block::{composed_map, engine_enabled, run_layer, LayerOp};
use super::engine_hooks::{Adapter, AdapterHook, AdapterKept, MapDelta, MapHooks, Pack, Prefix, Scale};
use super::cpu::{err, fused_ok, with_data, Fwd, SyncPtr};
use super::linear::{linear, lora_linear, lora_qlinear, qlinear, FrozenWeight};
use super::norm::{rms_norm, rms_norm_grad_add, rms_norm_into, rms_norm_weight_grad_add};
use super::pool;
use super::profile::timer;
use super::rope::{rope, rope_in_place, rope_tables};
use crate::error::Result;
use candle_core::{CpuStorage, DType, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// The seven linear maps of a Llama-family layer, in the engine's order.
pub const DECODER_LINEARS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// A decoder layer's frozen tensors and settings.
pub struct DecoderBlock {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// q, k, v, o, gate, up, down: (out, in) weights, f32 or quantized, and optional biases.
    pub linears: [(FrozenWeight, Option<Tensor>); 7],
    /// The input norm's weight and epsilon.
    pub norm1: (Tensor, f64),
    /// The norm before the feed-forward.
    pub norm2: (Tensor, f64),
    /// Rotary tables (cos, sin) for the block's positions, (t, 1, head_dim) each.
    pub rope: (Tensor, Tensor),
}

/// The decoder layer `x` (b, t, h) → (b, t, h) over the key mask `key_bias` (b, t) (attention is
/// causal on top of it), with the deltas `deltas[j]` on map j of [`DECODER_LINEARS`] (a LoRA or
/// an (IA)³ scale), trained biases, norm weights or f32 weights where those tensors take part in
/// a graph (BitFit, LayerNorm tuning, full fine-tuning), as one op (see the module docs). Falls
/// back to [`decoder_block_composed`] off the CPU, with the engine switched off, or with an input
/// scale on a map that shares its input (q, k, v, gate, up) or whose weight trains.
///
/// `adapters`: a bottleneck adapter after the attention block (its output projection) and after
/// the feed-forward block, before their residual sums (a parallel one reads the block's normed
/// input). `prefix`: keys and values (b, n, kv_heads · d) every query sees before the sequence's
/// (prefix tuning; not rotated, as a cache's are not rotated again); `key_bias` then covers the
/// n + t keys.
pub fn decoder_block(
    x: &Tensor,
    key_bias: &Tensor,
    block: &DecoderBlock,
    deltas: &[MapDelta; 7],
    adapters: &[Option<Adapter>; 2],
    prefix: Option<&(Tensor, Tensor)>,
) -> Result<Tensor> {
    match block_op(x, key_bias, block, deltas, adapters, prefix)? {
        Some(y) => Ok(y),
        None => decoder_block_composed(x, key_bias, block, deltas, adapters, prefix),
    }
}

/// The engine's op, or `None` where it does not apply.
fn block_op(
    x: &Tensor,
    key_bias: &Tensor,
    block: &DecoderBlock,
    deltas: &[MapDelta; 7],
    adapters: &[Option<Adapter>; 2],
    prefix: Option<&(Tensor, Tensor)>,
) -> Result<Option<Tensor>> {
    let shared_input_scaled = [0, 1, 2, 4, 5].iter().any(|&j| matches!(deltas[j].scale, Some(Scale::In(_))));
    // A trained weight (full fine-tuning) under an input scale: its gradient would read the
    // scaled input, which the engine does not keep.
    let trained_scaled = block.linears.iter().zip(deltas).any(|((w, _), d)| w.trains() && matches!(d.scale, Some(Scale::In(_))));
    if !(fused_ok(x) && engine_enabled() && !shared_input_scaled && !trained_scaled && x.rank() == 3) {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let (b, t, h) = x.dims3()?;
    let mut pack = Pack::default();
    let mut hooks = Vec::with_capacity(7);
    for (j, ((w, bias), d)) in block.linears.iter().zip(deltas).enumerate() {
        let mut mh = MapHooks::new("decoder block", DECODER_LINEARS[j], w.dims2()?, d, bias.as_ref(), &mut pack)?;
        if let FrozenWeight::Dense(wt) = w {
            mh.train_weight("decoder block", DECODER_LINEARS[j], wt, &mut pack)?;
        }
        mh.place_dropout(b * t);
        hooks.push(mh);
    }
    let norm_at = [pack.trained(&block.norm1.0)?, pack.trained(&block.norm2.0)?];
    let [ad1, ad2] = [0, 1].map(|i| adapters[i].as_ref().map(|a| AdapterHook::new("decoder block", a, h, &mut pack)));
    let adapters = [ad1.transpose()?, ad2.transpose()?];
    let prefix = match prefix {
        Some((pk, pv)) => {
            let (n, kw) = (pk.dim(1)?, block.kv_heads * block.head_dim);
            if pk.dims() != [b, n, kw] || pv.dims() != pk.dims() || key_bias.dims() != [b, n + t] {
                return Err(crate::error::Error::Delta(format!(
                    "decoder block: prefix keys {:?} and values {:?} for an input {:?} and a key mask {:?}",
                    pk.shape(),
                    pv.shape(),
                    x.shape(),
                    key_bias.shape()
                )));
            }
            Some(Prefix::new(pk, pv, &mut pack)?)
        }
        None => None,
    };
    let packed = pack.finish()?;
    let rope = rope_tables(&block.rope.0, &block.rope.1, t, block.head_dim)?;
    let vec = |v: &Tensor| -> Result<Vec<f32>> { Ok(v.flatten_all()?.to_vec1::<f32>()?) };
    let mut maps = Vec::with_capacity(7);
    for (w, b) in &block.linears {
        maps.push((w.clone(), b.as_ref().map(|b| b.contiguous()).transpose()?));
    }
    let Ok(maps) = <[_; 7]>::try_from(maps) else { return Ok(None) };
    let op = BlockOp {
        heads: block.heads,
        kv_heads: block.kv_heads,
        d: block.head_dim,
        maps,
        norm1: (vec(&block.norm1.0)?, block.norm1.1),
        norm2: (vec(&block.norm2.0)?, block.norm2.1),
        rope,
        attn: Attention::causal(block.heads, key_bias.to_dtype(DType::F32)?.contiguous()?),
        hooks,
        norm_at,
        adapters,
        prefix,
        kept: Mutex::new(None),
    };
    op.shapes(x.shape())?;
    Ok(Some(run_layer(&x, packed, op)?))
}

/// Reference implementation of [`decoder_block`]: the layer from the per-op kernels, as a layer
/// runs without the engine.
pub fn decoder_block_composed(
    x: &Tensor,
    key_bias: &Tensor,
    block: &DecoderBlock,
    deltas: &[MapDelta; 7],
    adapters: &[Option<Adapter>; 2],
    prefix: Option<&(Tensor, Tensor)>,
) -> Result<Tensor> {
    let (b, t, _) = x.dims3()?;
    let (nh, nkv, d) = (block.heads, block.kv_heads, block.head_dim);
    // Map j's frozen product `x Wᵀ + b`.
    let frozen = |j: usize, x: &Tensor| -> Result<Tensor> {
        let (w, bias) = &block.linears[j];
        match w {
            FrozenWeight::Quant(q) => {
                let y = qlinear(x, q, true)?;
                Ok(match bias {
                    Some(bias) => y.broadcast_add(bias)?,
                    None => y,
                })
            }
            FrozenWeight::Dense(w) => linear(x, w, bias.as_ref()),
        }
    };
    let product = |j: usize, x: &Tensor| -> Result<Tensor> {
        let (w, bias) = &block.linears[j];
        match (w, &deltas[j].lora, deltas[j].input_dropout) {
            (_, Some(l), Some(d)) => Ok(frozen(j, x)?.add(&super::block::dropped_low_rank(x, l, d)?)?),
            (FrozenWeight::Quant(q), Some((a, bm)), None) => lora_qlinear(x, q, bias.as_ref(), a, bm),
            (FrozenWeight::Dense(w), Some((a, bm)), None) => lora_linear(x, w, bias.as_ref(), a, bm),
            (_, None, _) => frozen(j, x),
        }
    };
    let map = |j: usize, x: &Tensor| -> Result<Tensor> { composed_map(x, deltas, j, |x| product(j, x)) };
    let rotated = |y: Tensor, n: usize| -> Result<Tensor> {
        Ok(rope(&y.reshape((b, t, n, d))?, &block.rope.0, &block.rope.1)?.reshape((b, t, n * d))?)
    };
    let n1 = rms_norm(x, &block.norm1.0, block.norm1.1)?;
    let q = rotated(map(0, &n1)?, nh)?;
    let mut k = rotated(map(1, &n1)?, nkv)?;
    let mut v = map(2, &n1)?;
    if let Some((pk, pv)) = prefix {
        k = Tensor::cat(&[pk, &k], 1)?;
        v = Tensor::cat(&[pv, &v], 1)?;
    }
    let c = causal_attention(&q, &k, &v, key_bias, nh)?;
    let adapted = |y: Tensor, input: &Tensor, i: usize| -> Result<Tensor> {
        match &adapters[i] {
            Some(ad) => ad.composed(&y, input),
            None => Ok(y),
        }
    };
    let h = (x + adapted(map(3, &c)?, &n1, 0)?)?;
    let n2 = rms_norm(&h, &block.norm2.0, block.norm2.1)?;
    let act = swiglu(&map(4, &n2)?, &map(5, &n2)?)?;
    Ok((h + adapted(map(6, &act)?, &n2, 1)?)?)
}

/// What the forward keeps for the backward.
struct Kept {
    /// q, k (rotated) and v side by side (rows × (q + 2 kv) columns).
    qkv: Vec<f32>,
    /// With a prefix: its keys and values and the sequence's, side by side (b · (n + t) × 2 kv).
    kv: Option<Vec<f32>>,
    /// The first norm's output, when a LoRA on q, k or v needs it.
    n1: Option<Vec<f32>>,
    /// The attention context, when a delta on o reads it.
    ctx: Option<Vec<f32>>,
    /// The residual stream after attention (the second norm's input).
    h1: Vec<f32>,
    /// The second norm's output, when a LoRA on gate or up needs it.
    n2: Option<Vec<f32>>,
    /// The gate's and up's outputs (rows × intermediate each).
    gate: Vec<f32>,
    up: Vec<f32>,
    /// The gated product, when a delta on down reads it.
    act: Option<Vec<f32>>,
    /// Each LoRA's `x Aᵀ`.
    u: [Option<Vec<f32>>; 7],
    /// Each trained output scale's unscaled output.
    y0: [Option<Vec<f32>>; 7],
    /// What the adapters after the attention and the feed-forward keep.
    ad: [Option<AdapterKept>; 2],
}

/// The buffers go back to the pool when the step's graph lets go of the op.
impl Drop for Kept {
    fn drop(&mut self) {
        for v in [&mut self.qkv, &mut self.h1, &mut self.gate, &mut self.up] {
            pool::give(std::mem::take(v));
        }
        let opts = [&mut self.kv, &mut self.n1, &mut self.ctx, &mut self.n2, &mut self.act];
        for v in opts.into_iter().chain(self.u.iter_mut()).chain(self.y0.iter_mut()) {
            pool::give_opt(v.take());
        }
    }
}

struct BlockOp {
    heads: usize,
    kv_heads: usize,
    d: usize,
    maps: [(FrozenWeight, Option<Tensor>); 7],
    /// Norm weights (flat) and epsilons.
    norm1: (Vec<f32>, f64),
    norm2: (Vec<f32>, f64),
    /// Rotary tables, t × d each.
    rope: (Vec<f32>, Vec<f32>),
    attn: Attention,
    /// The deltas on the seven maps.
    hooks: Vec<MapHooks>,
    /// Where the two norms' weight gradients go, when they train.
    norm_at: [Option<usize>; 2],
    /// The adapters after the attention and the feed-forward blocks.
    adapters: [Option<AdapterHook>; 2],
    /// Prefix keys and values before the sequence's.
    prefix: Option<Prefix>,
    kept: Mutex<Option<Kept>>,
}

/// Sizes of one call.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    h: usize,
    /// Query columns (heads · d) and key/value columns (kv_heads · d).
    qw: usize,
    kw: usize,
    /// The q, k, v buffer's row: qw + 2 kw.
    w: usize,
    inter: usize,
}

/// `y = x Wᵀ (+ b)` for a frozen map into a fresh buffer (a quantized weight decoded a block at
/// a time, [`FrozenWeight::forward_into`]).
fn dense(x: &[f32], in_dim: usize, (w, b): &(FrozenWeight, Option<Tensor>)) -> candle_core::Result<Vec<f32>> {
    let _prof = timer("decoder-linear", "fwd");
    let (out_dim, w_in) = w.dims2()?;
    if w_in != in_dim {
        return Err(err("decoder block: an input does not match its map's weight"));
    }
    let mut y = pool::take(x.len() / in_dim.max(1) * out_dim);
    if let Some(b) = b {
        fill_rows(&mut y, out_dim, 0, b)?;
    }
    w.forward_into(SyncPtr::of(&mut y), 0, out_dim, x, b.is_some())?;
    Ok(y)
}

/// Columns `col..col + len(b)` of every row of `y` (rows `ys` apart) set to the bias `b`.
fn fill_rows(y: &mut [f32], ys: usize, col: usize, b: &Tensor) -> candle_core::Result<()> {
    with_data([b], |[bs]| {
        if col + bs.len() > ys {
            return Err(err("decoder block: a bias does not match its map"));
        }
        y.par_chunks_mut(ys.max(1)).for_each(|row| row[col..col + bs.len()].copy_from_slice(bs));
        Ok(())
    })
}

/// `dx [+]= dy W` through a frozen map (a quantized weight decoded a block at a time,
/// [`FrozenWeight::input_grad_into`]).
fn input_grad(dx: &mut [f32], dy: &[f32], (w, _): &(FrozenWeight, Option<Tensor>), accumulate: bool) -> candle_core::Result<()> {
    let _prof = timer("decoder-linear", "bwd");
    w.input_grad_into(dx, dy, w.dims2()?.0, accumulate)
}

impl BlockOp {
    /// Adapter `i` onto a block's output `y` (in place), reading `y` itself or, when parallel,
    /// the block's normed input `input`; what it keeps.
    fn adapt(&self, i: usize, y: &mut [f32], input: &[f32]) -> Option<AdapterKept> {
        let ad = self.adapters[i].as_ref()?;
        Some(if ad.parallel {
            ad.forward(y, input)
        } else {
            let src = y.to_vec();
            let mut k = ad.forward(y, &src);
            k.src = Some(src);
            k
        })
    }

    /// The backward of [`Self::adapt`] from the gradient `dy` of the adapted output: the
    /// gradient of the block's output (`dy` itself without an adapter) and, for a parallel
    /// adapter, the gradient it adds to the block's normed input (`input`, kept then).
    fn adapt_grad<'a>(&self, i: usize, dy: &'a [f32], input: Option<&[f32]>, k: &Kept, dp: &mut [f32]) -> candle_core::Result<(std::borrow::Cow<'a, [f32]>, Option<Vec<f32>>)> {
        let Some(ad) = &self.adapters[i] else { return Ok((std::borrow::Cow::Borrowed(dy), None)) };
        let missing = || err("decoder block: an adapter's activations were not kept");
        let kept = k.ad[i].as_ref().ok_or_else(missing)?;
        if ad.parallel {
            let dsrc = ad.backward(dy, input.ok_or_else(missing)?, kept, dp);
            return Ok((std::borrow::Cow::Borrowed(dy), Some(dsrc)));
        }
        let mut dsrc = ad.backward(dy, kept.src.as_deref().ok_or_else(missing)?, kept, dp);
        dsrc.par_iter_mut().zip(dy.par_iter()).for_each(|(a, b)| *a += b);
        Ok((std::borrow::Cow::Owned(dsrc), None))
    }

    fn shapes(&self, x: &Shape) -> candle_core::Result<Dims> {
        let (b, t, h) = x.dims3()?;
        let (qw, kw) = (self.heads * self.d, self.kv_heads * self.d);
        let inter = self.maps[4].0.dims2()?.0;
        let want = [(qw, h), (kw, h), (kw, h), (h, qw), (inter, h), (inter, h), (h, inter)];
        let ok = self.maps.iter().zip(want).all(|((w, _), dims)| w.dims2().ok() == Some(dims))
            && self.norm1.0.len() == h
            && self.norm2.0.len() == h
            && self.rope.0.len() == t * self.d
            && self.kv_heads > 0
            && self.heads.is_multiple_of(self.kv_heads);
        if !ok {
            return Err(err(format!("decoder block: input {x:?} does not match the layer's weights, norms or rotary tables")));
        }
        Ok(Dims { b, t, h, qw, kw, w: qw + 2 * kw, inter })
    }

    /// Where map j (of q, k, v) writes in the q, k, v buffer: first column and width.
    fn qkv_cols(dm: &Dims, j: usize) -> (usize, usize) {
        match j {
            0 => (0, dm.qw),
            1 => (dm.qw, dm.kw),
            _ => (dm.qw + dm.kw, dm.kw),
        }
    }

    /// The attention's sizes: q, k, v read in place from the q, k, v buffer, or, with a prefix,
    /// k and v from the prefixed buffer (rows of 2 kv).
    fn attn_dims(&self, dm: &Dims) -> candle_core::Result<super::attention::AttnDims> {
        let q = Shape::from((dm.b, dm.t, dm.qw));
        match &self.prefix {
            None => self.attn.strided_dims(&q, &Shape::from((dm.b, dm.t, dm.kw)), dm.w, dm.w),
            Some(pf) => self.attn.strided_dims(&q, &Shape::from((dm.b, pf.n + dm.t, dm.kw)), dm.w, 2 * dm.kw),
        }
    }

}

impl LayerOp for BlockOp {
    const NAME: &'static str = "decoder-block";

    fn fwd(&self, x: &[f32], shape: &Shape, p: &[f32]) -> Fwd {
        let dm = self.shapes(shape)?;
        let Dims { b, t, h, qw, kw, w, inter } = dm;
        let rows = b * t;
        let s = &self.hooks;
        let mut u: [Option<Vec<f32>>; 7] = Default::default();
        let mut y0: [Option<Vec<f32>>; 7] = Default::default();
        let mut n1 = pool::take(rows * h);
        {
            let _prof = timer("rms-norm", "fwd");
            rms_norm_into(&mut n1, x, &self.norm1.0, self.norm1.1);
        }
        // q, k, v: each map's product into its column block (the bias first, where there is one),
        // then any LoRA onto it, or its output scale.
        let mut qkv = pool::take(rows * w);
        for j in 0..3 {
            let (col, width) = Self::qkv_cols(&dm, j);
            let (wt, bias) = &self.maps[j];
            let _prof = timer("decoder-linear", "fwd");
            if wt.dims2()?.0 != width {
                return Err(err("decoder block: a q, k or v weight does not match the heads"));
            }
            if let Some(bs) = bias {
                fill_rows(&mut qkv, w, col, bs)?;
            }
            wt.forward_into(SyncPtr::of(&mut qkv), col, w, &n1, bias.is_some())?;
        }
        for j in 0..3 {
            let (col, _) = Self::qkv_cols(&dm, j);
            if let Some(sl) = &s[j].lora {
                u[j] = Some(sl.forward(&n1, p, &mut qkv, w, col));
            }
            y0[j] = s[j].scale_output(&mut qkv, w, col);
        }
        {
            let _prof = timer("rope", "fwd");
            let tables = (&self.rope.0[..], &self.rope.1[..]);
            rope_in_place(&mut qkv, w, 0, self.heads, self.d, tables, 1.0);
            rope_in_place(&mut qkv, w, qw, self.kv_heads, self.d, tables, 1.0);
        }
        let mut c = pool::take(rows * qw);
        let kv = self.prefix.as_ref().map(|pf| pf.keys_values(&qkv, w, qw, b, t));
        {
            let _prof = timer("attention", "fwd");
            let adm = self.attn_dims(&dm)?;
            match &kv {
                None => self.attn.forward_into(&adm, &qkv, &qkv[qw..], &qkv[qw + kw..], &mut c)?,
                Some(kv) => self.attn.forward_into(&adm, &qkv, kv, &kv[kw..], &mut c)?,
            }
        }
        // Map j on its input `x` (of width `iw`): the input scale, the product, the LoRA, the
        // output scale.
        let mut map = |j: usize, x: &[f32], iw: usize| -> candle_core::Result<Vec<f32>> {
            let mut y = dense(s[j].scaled_input(x).as_deref().unwrap_or(x), iw, &self.maps[j])?;
            let out = self.maps[j].0.dims2()?.0;
            if let Some(sl) = &s[j].lora {
                u[j] = Some(sl.forward(x, p, &mut y, out, 0));
            }
            y0[j] = s[j].scale_output(&mut y, out, 0);
            Ok(y)
        };
        // h1 = x + o(c) (+ its adapter).
        let mut ad: [Option<AdapterKept>; 2] = Default::default();
        let mut h1 = map(3, &c, qw)?;
        ad[0] = self.adapt(0, &mut h1, &n1);
        h1.par_iter_mut().zip(x.par_iter()).for_each(|(a, &xi)| *a += xi);
        let mut n2 = pool::take(rows * h);
        {
            let _prof = timer("rms-norm", "fwd");
            rms_norm_into(&mut n2, &h1, &self.norm2.0, self.norm2.1);
        }
        let gate = map(4, &n2, h)?;
        let up = map(5, &n2, h)?;
        let mut act = pool::take(rows * inter);
        {
            let _prof = timer("swiglu", "fwd");
            swiglu_into(&mut act, &gate, &up);
        }
        // y = h1 + down(act) (+ its adapter).
        let mut y = map(6, &act, inter)?;
        ad[1] = self.adapt(1, &mut y, &n2);
        y.par_iter_mut().zip(h1.par_iter()).for_each(|(m, &hi)| *m += hi);
        // The normed inputs, for a LoRA's or a trained weight's gradient.
        let lora = |js: &[usize]| js.iter().any(|&j| s[j].lora.is_some() || s[j].weight_at.is_some());
        let parallel = |i: usize| self.adapters[i].as_ref().is_some_and(|a| a.parallel);
        let keep = |v: Vec<f32>, kept: bool| if kept { Some(v) } else { pool::give(v); None };
        let kept = Kept {
            qkv,
            kv,
            n1: keep(n1, lora(&[0, 1, 2]) || parallel(0)),
            ctx: keep(c, s[3].needs_input()),
            h1,
            n2: keep(n2, lora(&[4, 5]) || parallel(1)),
            gate,
            up,
            act: keep(act, s[6].needs_input()),
            u,
            y0,
            ad,
        };
        *self.kept.lock().map_err(|_| err("decoder block: poisoned lock"))? = Some(kept);
        Ok((CpuStorage::F32(y), shape.clone()))
    }

    /// The input gradient (when `x` takes part in the graph) from the output gradient `grad`,
    /// the packed gradient (LoRAs, scales, biases, norm weights) into `dp` from the packed values
    /// `p`.
    fn bwd(&self, x: &Tensor, p: &[f32], dp: &mut [f32], grad: &Tensor) -> candle_core::Result<Option<Vec<f32>>> {
        let dm = self.shapes(x.shape())?;
        let Dims { b, t, h, qw, kw, w, inter } = dm;
        let rows = b * t;
        let kept = self.kept.lock().map_err(|_| err("decoder block: poisoned lock"))?;
        let k = kept.as_ref().ok_or_else(|| err("decoder block: backward without forward"))?;
        let s = &self.hooks;
        let need_dx = x.track_op();
        // The first norm's output gradient: for dx or the norm's weight.
        let need_dn1 = need_dx || self.norm_at[0].is_some();
        // Below the attention output: for dn1 or a delta on q, k, v; below the feed-forward: for
        // those, a delta on o or the second norm's weight.
        let below_o = need_dn1 || (0..3).any(|j| s[j].trains()) || self.prefix.as_ref().is_some_and(Prefix::trains);
        let below_ffn = below_o || s[3].trains() || self.norm_at[1].is_some() || self.adapters[0].as_ref().is_some_and(|a| a.trains());
        let missing = || err("decoder block: an activation the backward needs was not kept");
        let dx = with_data([x, grad], |[xs, dy]| {
            // The feed-forward's adapter, then down: its scale and bias, dact = dy Wd (+ its LoRA).
            let (dy6, dsrc2) = self.adapt_grad(1, dy, k.n2.as_deref(), k, dp)?;
            let dyd = s[6].output_grads_of(&dy6, h, k.y0[6].as_deref(), dp)?;
            s[6].weight_grad(&dyd, h, 0, k.act.as_deref(), dp)?;
            let mut dact = pool::take(rows * inter);
            s[6].input_grad(&mut dact, false, k.act.as_deref(), dp, |buf, acc| input_grad(buf, &dyd, &self.maps[6], acc))?;
            if let Some(sl) = &s[6].lora {
                let (u, act) = (k.u[6].as_ref().ok_or_else(missing)?, k.act.as_ref().ok_or_else(missing)?);
                sl.backward(&dyd, h, act, u, p, dp, Some(&mut dact));
            }
            drop(dyd);
            drop(dy6);
            // The gate, then the scales and biases of gate and up.
            let (mut dg, mut du) = (pool::take(rows * inter), pool::take(rows * inter));
            {
                let _prof = timer("swiglu", "bwd");
                swiglu_grad_into(&mut dg, &mut du, &k.gate, &k.up, &dact);
            }
            pool::give(dact);
            s[4].output_grads(&mut dg, inter, 0, inter, k.y0[4].as_deref(), dp)?;
            s[5].output_grads(&mut du, inter, 0, inter, k.y0[5].as_deref(), dp)?;
            s[4].weight_grad(&dg, inter, 0, k.n2.as_deref(), dp)?;
            s[5].weight_grad(&du, inter, 0, k.n2.as_deref(), dp)?;
            // Gate and up: dn2 = dg Wg + du Wu (+ their LoRAs).
            let mut dn2 = Vec::new();
            if below_ffn {
                dn2 = pool::take(rows * h);
                input_grad(&mut dn2, &dg, &self.maps[4], false)?;
                input_grad(&mut dn2, &du, &self.maps[5], true)?;
            }
            for (j, dz) in [(4, &dg), (5, &du)] {
                if let Some(sl) = &s[j].lora {
                    let (u, n2) = (k.u[j].as_ref().ok_or_else(missing)?, k.n2.as_ref().ok_or_else(missing)?);
                    sl.backward(dz, inter, n2, u, p, dp, below_ffn.then_some(&mut dn2[..]));
                }
            }
            if let (Some(d), true) = (&dsrc2, below_ffn) {
                dn2.par_iter_mut().zip(d.par_iter()).for_each(|(a, b)| *a += b);
            }
            pool::give(dg);
            pool::give(du);
            if !below_ffn {
                return Ok(Vec::new());
            }
            // The residual stream's gradient: dy, plus the second norm's; its weight's.
            let mut dh = dy.to_vec();
            {
                let _prof = timer("rms-norm", "bwd");
                rms_norm_grad_add(&mut dh, &k.h1, &self.norm2.0, &dn2, self.norm2.1);
                if let Some(at) = self.norm_at[1] {
                    rms_norm_weight_grad_add(&mut dp[at..at + h], &k.h1, &dn2, self.norm2.1);
                }
            }
            pool::give(dn2);
            // The attention's adapter, then its output map: its scale and bias, dc = dh Wo (+ its
            // LoRA).
            let (dh3, dsrc1) = self.adapt_grad(0, &dh, k.n1.as_deref(), k, dp)?;
            let dho = s[3].output_grads_of(&dh3, h, k.y0[3].as_deref(), dp)?;
            s[3].weight_grad(&dho, h, 0, k.ctx.as_deref(), dp)?;
            let mut dc = Vec::new();
            if below_o {
                dc = pool::take(rows * qw);
                s[3].input_grad(&mut dc, false, k.ctx.as_deref(), dp, |buf, acc| input_grad(buf, &dho, &self.maps[3], acc))?;
            }
            if let Some(sl) = &s[3].lora {
                let (u, c) = (k.u[3].as_ref().ok_or_else(missing)?, k.ctx.as_ref().ok_or_else(missing)?);
                sl.backward(&dho, h, c, u, p, dp, below_o.then_some(&mut dc[..]));
            }
            drop(dho);
            drop(dh3);
            if !below_o {
                return Ok(Vec::new());
            }
            // Attention: dq, dk, dv side by side, as q, k, v were; then un-rotated in place and
            // through the scales and biases of q, k, v.
            let mut dqkv = pool::take(rows * w);
            {
                let _prof = timer("attention", "bwd");
                let ptr = SyncPtr::of(&mut dqkv);
                let adm = self.attn_dims(&dm)?;
                match (&self.prefix, &k.kv) {
                    (None, _) => self.attn.backward_into(&adm, &k.qkv, &k.qkv[qw..], &k.qkv[qw + kw..], &dc, [(ptr, 0), (ptr, qw), (ptr, qw + kw)])?,
                    (Some(pf), Some(kv)) => {
                        // dk, dv in the prefixed buffer's layout: the prefix's part is its
                        // gradient, the rest goes into place (before the un-rotation below).
                        let mut dkv = pool::take(kv.len());
                        let pkv = SyncPtr::of(&mut dkv);
                        self.attn.backward_into(&adm, &k.qkv, kv, &kv[kw..], &dc, [(ptr, 0), (pkv, 0), (pkv, kw)])?;
                        pf.split_grads(&dkv, &mut dqkv, w, qw, dp, b, t);
                        pool::give(dkv);
                    }
                    (Some(_), None) => return Err(err("decoder block: the prefixed keys were not kept")),
                }
            }
            pool::give(dc);
            {
                let _prof = timer("rope", "bwd");
                let tables = (&self.rope.0[..], &self.rope.1[..]);
                rope_in_place(&mut dqkv, w, 0, self.heads, self.d, tables, -1.0);
                rope_in_place(&mut dqkv, w, qw, self.kv_heads, self.d, tables, -1.0);
            }
            for j in 0..3 {
                let (col, width) = Self::qkv_cols(&dm, j);
                s[j].output_grads(&mut dqkv, w, col, width, k.y0[j].as_deref(), dp)?;
                s[j].weight_grad(&dqkv, w, col, k.n1.as_deref(), dp)?;
            }
            // dn1 = dq Wq + dk Wk + dv Wv (+ their LoRAs), then dx = dh + the first norm's.
            let mut dn1 = if need_dn1 { pool::take(rows * h) } else { Vec::new() };
            if need_dn1 {
                for j in 0..3 {
                    let (col, width) = Self::qkv_cols(&dm, j);
                    let _prof = timer("decoder-linear", "bwd");
                    if self.maps[j].0.dims2()? != (width, h) {
                        return Err(err("decoder block: a q, k or v weight does not match the heads"));
                    }
                    self.maps[j].0.input_grad_into(&mut dn1, &dqkv[col..], w, j > 0)?;
                }
            }
            for j in 0..3 {
                if let Some(sl) = &s[j].lora {
                    let (col, _) = Self::qkv_cols(&dm, j);
                    let (u, n1) = (k.u[j].as_ref().ok_or_else(missing)?, k.n1.as_ref().ok_or_else(missing)?);
                    sl.backward(&dqkv[col..], w, n1, u, p, dp, need_dn1.then_some(&mut dn1[..]));
                }
            }
            if let (Some(d), true) = (&dsrc1, need_dn1) {
                dn1.par_iter_mut().zip(d.par_iter()).for_each(|(a, b)| *a += b);
            }
            let _prof = timer("rms-norm", "bwd");
            if let Some(at) = self.norm_at[0] {
                rms_norm_weight_grad_add(&mut dp[at..at + h], xs, &dn1, self.norm1.1);
            }
            if need_dx {
                rms_norm_grad_add(&mut dh, xs, &self.norm1.0, &dn1, self.norm1.1);
            }
            pool::give(dn1);
            pool::give(dqkv);
            Ok(dh)
        })?;
        Ok(need_dx.then_some(dx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::cpu::testing::{around, check_layer, check_layer_close, layer_lora, padded_key_bias, rand, var, MapLora};
    use crate::ops::{Act, DropoutKey};
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Var};
    use std::sync::Arc;

    /// The engine against the composition on the tests' input (b, t, h) with padded keys and no
    /// adapter or prefix: [`check_layer`] (the output to the bit, every gradient within 1e-4).
    /// Returns the input and key mask.
    fn engine_matches(block: &DecoderBlock, deltas: &[MapDelta; 7], (b, t, h): (usize, usize, usize), x_grad: bool, vars: &[MapLora], trained: &[(String, Var)]) -> (Tensor, Tensor) {
        let xv = var(&[b, t, h], 11, 1.0);
        let x = if x_grad { xv.as_tensor().clone() } else { xv.as_tensor().detach() };
        let key_bias = padded_key_bias(b, t, 3);
        let y1 = block_op(&x, &key_bias, block, deltas, &Default::default(), None).unwrap().expect("the engine applies");
        let y2 = decoder_block_composed(&x, &key_bias, block, deltas, &Default::default(), None).unwrap();
        check_layer(&y1, &y2, &rand(&[b, t, h], 12), &xv, x_grad, vars, &DECODER_LINEARS, trained);
        (x, key_bias)
    }

    /// Rotary tables for positions 0..t of heads of d (the decoder's layout: (t, 1, d)).
    fn tables(t: usize, d: usize) -> (Tensor, Tensor) {
        let half = d / 2;
        let ang: Vec<f32> = (0..t).flat_map(|p| (0..d).map(move |i| p as f32 * 0.5f32.powi((i % half) as i32))).collect();
        let make = |f: fn(f32) -> f32| Tensor::from_vec(ang.iter().map(|&a| f(a)).collect::<Vec<_>>(), (t, 1, d), &Device::Cpu).unwrap();
        (make(f32::cos), make(f32::sin))
    }

    /// A frozen (out, in) weight of seeded values, f32 or quantized (Q8_0, Q4_1 or Q5_0 by seed).
    fn weight(out: usize, inp: usize, seed: u64, quantized: bool) -> FrozenWeight {
        let w = (rand(&[out, inp], seed) * 0.3).unwrap();
        if quantized {
            // Q8_0 (dequantized whole) and the formats the engine decodes itself a block at a
            // time (Q4_1, the default decoder's, and Q5_0).
            let dt = [GgmlDType::Q8_0, GgmlDType::Q4_1, GgmlDType::Q5_0][seed as usize % 3];
            FrozenWeight::Quant(Arc::new(QTensor::quantize(&w, dt).unwrap()))
        } else {
            FrozenWeight::Dense(w)
        }
    }

    /// The engine against the per-op composition: the output to the bit, every gradient (x and
    /// each LoRA matrix) within 1e-4 relative; grouped-query attention (4 query heads on 2
    /// key/value heads), the second sequence's last keys padded, more rows than one causal block.
    fn check(lora_on: &[usize], x_grad: bool, quantized: bool, bias: bool) {
        check_batch(lora_on, x_grad, quantized, bias, 2);
    }

    /// The tests' layer: hidden 64, 4 query heads of 16 over 2 key/value heads, intermediate 96,
    /// seeded f32 or Q8_0 maps (with seeded biases when `bias`), norms near 1, rotary tables for
    /// `t` positions.
    fn test_block(t: usize, quantized: bool, bias: bool) -> DecoderBlock {
        let (h, heads, kv, d, inter) = (64, 4, 2, 16, 96);
        let lin = |out: usize, inp: usize, seed: u64| (weight(out, inp, seed, quantized), bias.then(|| (rand(&[out], seed + 100) * 0.1).unwrap()));
        let (qw, kw) = (heads * d, kv * d);
        DecoderBlock {
            heads,
            kv_heads: kv,
            head_dim: d,
            linears: [lin(qw, h, 1), lin(kw, h, 2), lin(kw, h, 3), lin(h, qw, 4), lin(inter, h, 5), lin(inter, h, 6), lin(h, inter, 7)],
            norm1: (((rand(&[h], 8) * 0.2).unwrap() + 1.0).unwrap(), 1e-5),
            norm2: (((rand(&[h], 9) * 0.2).unwrap() + 1.0).unwrap(), 1e-6),
            rope: tables(t, d),
        }
    }

    /// [`check`] over `b` sequences.
    fn check_batch(lora_on: &[usize], x_grad: bool, quantized: bool, bias: bool, b: usize) {
        let (t, h, r) = (70, 64, 3);
        let block = test_block(t, quantized, bias);
        let (vars, lora) = layer_lora::<7>(lora_on, |j| block.linears[j].0.dims2().unwrap(), r);
        let xv = var(&[b, t, h], 11, 1.0);
        let x = if x_grad { xv.as_tensor().clone() } else { xv.as_tensor().detach() };
        let key_bias = padded_key_bias(b, t, 3);
        let y1 = block_op(&x, &key_bias, &block, &lora, &Default::default(), None).unwrap().expect("the engine applies");
        let y2 = decoder_block_composed(&x, &key_bias, &block, &lora, &Default::default(), None).unwrap();
        check_layer(&y1, &y2, &rand(&[b, t, h], 12), &xv, x_grad, &vars, &DECODER_LINEARS, &[]);
    }

    /// Every delta the engine computes besides LoRA, against the composition: (IA)³ scales on the
    /// outputs of k, v and gate (k's before its rotation) and on the inputs of o and down, LoRA on
    /// q and up, trained biases on all seven maps (BitFit adds them to a Llama layer) and trained
    /// weights on both norms (LayerNorm tuning); f32 and quantized maps, with and without the
    /// input's gradient.
    fn check_deltas(x_grad: bool, quantized: bool) {
        let (b, t, h, heads, kv, d, inter, r) = (2, 70, 64, 4, 2, 16, 96, 3);
        let mut trained = Vec::new();
        let mut lin = |out: usize, inp: usize, seed: u64| -> (FrozenWeight, Option<Tensor>) {
            let w = weight(out, inp, seed, quantized);
            let zero = Tensor::zeros(out, DType::F32, &Device::Cpu).unwrap();
            (w, Some(around(&zero, seed + 200, 0.1, &format!("bias of {}", DECODER_LINEARS[seed as usize - 1]), &mut trained)))
        };
        let (qw, kw) = (heads * d, kv * d);
        let linears = [lin(qw, h, 1), lin(kw, h, 2), lin(kw, h, 3), lin(h, qw, 4), lin(inter, h, 5), lin(inter, h, 6), lin(h, inter, 7)];
        let mut norm = |seed: u64, eps: f64| {
            let w = ((rand(&[h], seed) * 0.2).unwrap() + 1.0).unwrap();
            (around(&w, seed + 300, 0.1, &format!("norm {seed}"), &mut trained), eps)
        };
        let (norm1, norm2) = (norm(8, 1e-5), norm(9, 1e-6));
        let block = DecoderBlock { heads, kv_heads: kv, head_dim: d, linears, norm1, norm2, rope: tables(t, d) };
        let (vars, mut deltas) = layer_lora::<7>(&[0, 5], |j| block.linears[j].0.dims2().unwrap(), r);
        // The LoRA on up reads its input dropped (LoRA's own dropout).
        deltas[5].input_dropout = Some((0.1, DropoutKey(21)));
        let ones = |n: usize| Tensor::ones(n, DType::F32, &Device::Cpu).unwrap();
        let mut scale = |j: usize, n: usize, input: bool| {
            let l = around(&ones(n), 60 + j as u64, 0.3, &format!("scale on {}", DECODER_LINEARS[j]), &mut trained);
            deltas[j].scale = Some(if input { Scale::In(l) } else { Scale::Out(l) });
        };
        scale(1, kw, false);
        scale(2, kw, false);
        scale(3, qw, true);
        scale(4, inter, false);
        scale(6, inter, true);
        engine_matches(&block, &deltas, (b, t, h), x_grad, &vars, &trained);
    }

    /// Bottleneck adapters after both blocks against the composition (outputs within 1e-5: the
    /// adapter's products run in `gemm`, the composition's in candle), with LoRA on q and down
    /// and trained norm weights; sequential and parallel, each activation, with and without the
    /// input's gradient.
    fn check_adapters(acts: [Act; 2], parallel: [bool; 2], x_grad: bool) {
        let (b, t, h, heads, kv, d, inter, m) = (2, 70, 64, 4, 2, 16, 96, 6);
        let mut trained = Vec::new();
        let lin = |out: usize, inp: usize, seed: u64| -> (FrozenWeight, Option<Tensor>) { (FrozenWeight::Dense((rand(&[out, inp], seed) * 0.3).unwrap()), None) };
        let (qw, kw) = (heads * d, kv * d);
        let linears = [lin(qw, h, 1), lin(kw, h, 2), lin(kw, h, 3), lin(h, qw, 4), lin(inter, h, 5), lin(inter, h, 6), lin(h, inter, 7)];
        let mut norm = |seed: u64| {
            let w = ((rand(&[h], seed) * 0.2).unwrap() + 1.0).unwrap();
            (around(&w, seed + 300, 0.1, &format!("norm {seed}"), &mut trained), 1e-5)
        };
        let (norm1, norm2) = (norm(8), norm(9));
        let block = DecoderBlock { heads, kv_heads: kv, head_dim: d, linears, norm1, norm2, rope: tables(t, d) };
        let (vars, deltas) = layer_lora::<7>(&[0, 6], |j| block.linears[j].0.dims2().unwrap(), 3);
        let mut adapter = |i: usize| {
            let mut v = |dims: &[usize], k: u64, what: &str| {
                let z = Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap();
                around(&z, 70 + 10 * i as u64 + k, 0.3, &format!("adapter {i} {what}"), &mut trained)
            };
            Some(Adapter { down: (v(&[m, h], 0, "down"), v(&[m], 1, "down bias")), up: (v(&[h, m], 2, "up"), v(&[h], 3, "up bias")), act: acts[i], parallel: parallel[i] })
        };
        let adapters = [adapter(0), adapter(1)];
        let xv = var(&[b, t, h], 11, 1.0);
        let x = if x_grad { xv.as_tensor().clone() } else { xv.as_tensor().detach() };
        let key_bias = padded_key_bias(b, t, 3);
        let y1 = block_op(&x, &key_bias, &block, &deltas, &adapters, None).unwrap().expect("the engine applies");
        let y2 = decoder_block_composed(&x, &key_bias, &block, &deltas, &adapters, None).unwrap();
        check_layer_close(&y1, &y2, &rand(&[b, t, h], 12), &xv, x_grad, &vars, &DECODER_LINEARS, &trained);
    }

    /// Prefix keys and values (trained, grouped-query width) before the sequence's, against the
    /// composition (the forward to the bit), with LoRA on q and v; with and without the input's
    /// gradient; the key mask covers the prefix and pads the second row's last keys.
    fn check_prefix(x_grad: bool, quantized: bool) {
        let (b, t, h, heads, kv, d, inter, n) = (2, 70, 64, 4, 2, 16, 96, 5);
        let mut trained = Vec::new();
        let lin = |out: usize, inp: usize, seed: u64| (weight(out, inp, seed, quantized), None);
        let (qw, kw) = (heads * d, kv * d);
        let norm = |seed: u64| (((rand(&[h], seed) * 0.2).unwrap() + 1.0).unwrap(), 1e-5);
        let linears = [lin(qw, h, 1), lin(kw, h, 2), lin(kw, h, 3), lin(h, qw, 4), lin(inter, h, 5), lin(inter, h, 6), lin(h, inter, 7)];
        let block = DecoderBlock { heads, kv_heads: kv, head_dim: d, linears, norm1: norm(8), norm2: norm(9), rope: tables(t, d) };
        let (vars, deltas) = layer_lora::<7>(&[0, 2], |j| block.linears[j].0.dims2().unwrap(), 3);
        let zeros = Tensor::zeros((b, n, kw), DType::F32, &Device::Cpu).unwrap();
        let prefix = (around(&zeros, 80, 1.0, "prefix keys", &mut trained), around(&zeros, 81, 1.0, "prefix values", &mut trained));
        let xv = var(&[b, t, h], 11, 1.0);
        let x = if x_grad { xv.as_tensor().clone() } else { xv.as_tensor().detach() };
        let key_bias = padded_key_bias(b, n + t, 3);
        let y1 = block_op(&x, &key_bias, &block, &deltas, &Default::default(), Some(&prefix)).unwrap().expect("the engine applies");
        let y2 = decoder_block_composed(&x, &key_bias, &block, &deltas, &Default::default(), Some(&prefix)).unwrap();
        check_layer(&y1, &y2, &rand(&[b, t, h], 12), &xv, x_grad, &vars, &DECODER_LINEARS, &trained);
    }

    /// Dense weight updates ΔW (LoHa, LoKr) on v, o and down (v's and down's reading their input
    /// dropped, as DoRA's with dropout) with DoRA on q, against the composition (outputs within
    /// 1e-5), f32 and quantized maps, with and without the input's gradient.
    fn check_dense(x_grad: bool, quantized: bool) {
        let (b, t, h, r, qw) = (2, 70, 64, 3, 64);
        let block = test_block(t, quantized, false);
        let (vars, mut deltas) = layer_lora::<7>(&[0], |j| block.linears[j].0.dims2().unwrap(), r);
        let mut trained = Vec::new();
        // DoRA on q (no bias: the magnitude scales the whole output).
        let ones = Tensor::ones(qw, DType::F32, &Device::Cpu).unwrap();
        deltas[0].scale = Some(Scale::Mag(around(&ones, 69, 0.3, "magnitude on q", &mut trained), None));
        for j in [2, 3, 6] {
            let (out, inp) = block.linears[j].0.dims2().unwrap();
            let zero = Tensor::zeros((out, inp), DType::F32, &Device::Cpu).unwrap();
            deltas[j].dense = Some(around(&zero, 70 + j as u64, 0.05, &format!("weight update on {}", DECODER_LINEARS[j]), &mut trained));
        }
        // The updates on v and down read their input dropped (DoRA with dropout, in its
        // weight-update form).
        deltas[2].input_dropout = Some((0.2, DropoutKey(8)));
        deltas[6].input_dropout = Some((0.1, DropoutKey(9)));
        let xv = var(&[b, t, h], 11, 1.0);
        let x = if x_grad { xv.as_tensor().clone() } else { xv.as_tensor().detach() };
        let key_bias = padded_key_bias(b, t, 3);
        let y1 = block_op(&x, &key_bias, &block, &deltas, &Default::default(), None).unwrap().expect("the engine applies");
        let y2 = decoder_block_composed(&x, &key_bias, &block, &deltas, &Default::default(), None).unwrap();
        check_layer_close(&y1, &y2, &rand(&[b, t, h], 12), &xv, x_grad, &vars, &DECODER_LINEARS, &trained);
    }

    /// Trained f32 weights (full fine-tuning) on the maps in `on`, the other maps frozen (Q8_0 when
    /// `quantized`), a LoRA on q and an output scale on up besides: output to the bit, every
    /// gradient (the weights' `dyᵀ x` included) within 1e-4; under an input scale a trained weight
    /// falls back to the composition.
    fn check_trained_weights(on: &[usize], x_grad: bool, quantized: bool) {
        let (b, t, h, r, inter) = (2, 70, 64, 3, 96);
        let mut block = test_block(t, quantized, true);
        let mut trained = Vec::new();
        for &j in on {
            let (out, inp) = block.linears[j].0.dims2().unwrap();
            let w = (rand(&[out, inp], 40 + j as u64) * 0.3).unwrap();
            block.linears[j].0 = FrozenWeight::Dense(around(&w, 50 + j as u64, 0.05, &format!("weight of {}", DECODER_LINEARS[j]), &mut trained));
        }
        let (vars, mut deltas) = layer_lora::<7>(&[0], |j| block.linears[j].0.dims2().unwrap(), r);
        let ones = Tensor::ones(inter, DType::F32, &Device::Cpu).unwrap();
        deltas[5].scale = Some(Scale::Out(around(&ones, 77, 0.3, "scale on up", &mut trained)));
        let (x, key_bias) = engine_matches(&block, &deltas, (b, t, h), x_grad, &vars, &trained);
        if let Some(&j) = on.iter().find(|&&j| j == 3 || j == 6) {
            let n = block.linears[j].0.dims2().unwrap().1;
            deltas[j].scale = Some(Scale::In(Tensor::ones(n, DType::F32, &Device::Cpu).unwrap()));
            assert!(block_op(&x, &key_bias, &block, &deltas, &Default::default(), None).unwrap().is_none());
        }
    }

    #[test]
    fn decoder_block_matches_composition_with_trained_weights() {
        check_trained_weights(&[0, 1, 2, 3, 4, 5, 6], true, false);
        check_trained_weights(&[0, 1, 2, 3, 4, 5, 6], false, false);
        // Only the top maps train, the rest quantized: the backward stops below them.
        check_trained_weights(&[4, 5, 6], false, true);
        check_trained_weights(&[1, 3], true, true);
    }

    #[test]
    fn decoder_block_matches_composition_with_weight_updates() {
        check_dense(true, false);
        check_dense(false, true);
    }

    /// As the encoder's: with the pool stocked with NaN buffers of every size the layer takes,
    /// the engine still matches the composition (nothing is read before it is written).
    #[test]
    fn decoder_block_reads_no_stale_pool_buffer() {
        let (rows, h, w, inter) = (4 * 70, 64, 128, 96);
        for n in [rows * h, rows * w, rows * inter] {
            pool::poison(n, 6);
        }
        check_batch(&[0, 1, 2, 3, 4, 5, 6], true, false, true, 4);
        for n in [rows * h, rows * w, rows * inter] {
            pool::poison(n, 6);
        }
        check_batch(&[2, 6], false, true, false, 4);
    }

    #[test]
    fn decoder_block_matches_composition_with_a_prefix() {
        check_prefix(true, false);
        check_prefix(false, true);
    }

    #[test]
    fn decoder_block_matches_composition_with_adapters() {
        check_adapters([Act::Silu, Act::Relu], [false, true], true);
        check_adapters([Act::Tanh, Act::Gelu], [true, false], false);
        check_adapters([Act::GeluTanh, Act::Identity], [true, true], true);
    }

    #[test]
    fn decoder_block_matches_composition_with_scales_biases_and_norms() {
        check_deltas(true, false);
        check_deltas(false, true);
    }

    #[test]
    fn decoder_block_matches_composition_with_lora_on_q_and_v() {
        check(&[0, 2], true, true, false);
        check(&[0, 2], true, false, false);
    }

    #[test]
    fn decoder_block_matches_composition_with_lora_everywhere_and_biases() {
        check(&[0, 1, 2, 3, 4, 5, 6], true, true, true);
        check(&[3, 6], true, false, true);
    }

    #[test]
    fn decoder_block_without_input_gradient_or_lora() {
        // The lowest LoRA layer: no gradient for x, only for the LoRA (on the feed-forward only:
        // nothing below it runs backward).
        check(&[1, 5], false, true, false);
        check(&[4], false, false, false);
        // A frozen layer above the lowest LoRA: only dx.
        check(&[], true, true, false);
    }

    /// Shapes that do not fit the weights are refused with the block named.
    #[test]
    fn decoder_block_refuses_mismatched_input() {
        let (t, d) = (5, 8);
        let lin = |out: usize, inp: usize| (FrozenWeight::Dense(rand(&[out, inp], 3)), None);
        let block = DecoderBlock {
            heads: 2,
            kv_heads: 1,
            head_dim: d,
            linears: [lin(16, 16), lin(8, 16), lin(8, 16), lin(16, 16), lin(24, 16), lin(24, 16), lin(16, 24)],
            norm1: (rand(&[16], 4), 1e-5),
            norm2: (rand(&[16], 5), 1e-5),
            rope: tables(t, d),
        };
        let x = var(&[1, t, 12], 6, 1.0);
        let bias = Tensor::zeros((1, t), DType::F32, &Device::Cpu).unwrap();
        let e = block_op(x.as_tensor(), &bias, &block, &Default::default(), &Default::default(), None).unwrap_err().to_string();
        assert!(e.contains("decoder block"), "{e}");
    }
}
