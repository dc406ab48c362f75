//! The block engine: a whole BERT-family encoder layer — its six frozen linear maps, the
//! attention, GELU and both residual layer norms, with the deltas on them (a LoRA or an (IA)³
//! scale on a map, trained biases and norm parameters, an adapter after each sublayer, prefix
//! keys and values: [`super::engine_hooks`]) — as one op with a hand-written forward and
//! backward, so that candle's autograd sees one node per layer instead of a dozen.
//!
//! What that removes from a training step: candle's gradient store zero-fills a buffer for every
//! input of every node and adds each gradient into it; here every gradient is written once by the
//! kernel that computes it (`gemm` accumulating into the residual stream's gradient where two
//! paths meet). The three projections of q, k and v are one product with the stacked weights
//! (3h × h) forward and one (K = 3h) backward, attention reads q, k, v in place as column blocks of
//! that product and writes its gradient into one buffer of the same layout. The activations kept
//! for backward are exactly those it reads: the stacked q/k/v, the two sublayer outputs before
//! their residual sums (the sums are recomputed), the first norm's output, GELU's input, the
//! attention context and GELU's output only when a delta on the next map reads them, each LoRA's
//! `x Aᵀ`, and what the deltas' own backward reads. Nothing runs below the lowest thing that needs
//! a gradient.
//!
//! The trained tensors (LoRA matrices, scales, biases, norm parameters, adapters, prefix) enter as
//! one packed vector, so the op has two arguments and candle routes each part of the packed
//! gradient back to its variable; a layer where nothing trains is a one-argument op. The composition of the
//! per-op kernels ([`encoder_block_composed`], what a layer runs without the engine) is the
//! reference the engine is tested against. `DELTATUNE_ENGINE=0` turns the engine off.

use super::activation::{gelu, gelu_grad_into, gelu_into};
use super::attention::{attention, Attention};
use super::combine::scale_last;
use super::cpu::{err, fused_ok, gemm, slice, tensor_from, with_data, Fwd, Gemm, Grads2, Mat, SyncPtr};
use super::engine_hooks::{dropped, Adapter, AdapterHook, AdapterKept, MapDelta, MapHooks, Pack, Prefix, Scale};
pub use super::engine_hooks::LowRank;
use super::linear::{dense_into, input_grad_into, linear, linear_gelu, lora_linear};
use super::norm::{residual_layer_norm, ResidualLayerNorm};
use super::pool;
use super::profile::timer;
use super::rng::DropoutKey;
use crate::error::Result;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::{Mutex, OnceLock};

/// Whether the block engine may run (`DELTATUNE_ENGINE` unset or not `0`, and the fused kernels
/// on). Read once.
pub fn engine_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("DELTATUNE_ENGINE").map(|v| v != "0").unwrap_or(true)) && super::cpu::enabled()
}

/// The six linear maps of an encoder layer, in the engine's order.
pub const BLOCK_LINEARS: [&str; 6] = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"];

/// A frozen linear map: weight (out, in) and optional bias (out).
pub type Dense = (Tensor, Option<Tensor>);

/// An encoder layer's frozen tensors and settings.
pub struct EncoderBlock {
    pub heads: usize,
    /// query, key, value, attention output, intermediate, output — (out, in) weights.
    pub linears: [Dense; 6],
    /// The attention output's layer norm: gamma, beta, eps.
    pub ln1: (Tensor, Tensor, f64),
    /// The layer output's layer norm.
    pub ln2: (Tensor, Tensor, f64),
    /// Dropout on the attention probabilities, the attention output and the layer output (rate,
    /// key), training only.
    pub dropout: [Option<(f32, DropoutKey)>; 3],
}

/// The encoder layer `x` (b, t, h) → (b, t, h) with the key mask `key_bias` (b, t) and the
/// deltas `deltas[j]` on map j of [`BLOCK_LINEARS`] (a LoRA or an (IA)³ scale), trained biases
/// or norm parameters where those tensors take part in a graph (BitFit, LayerNorm tuning), as one
/// op (see the module docs). Falls back to [`encoder_block_composed`] off the CPU, with the engine
/// switched off, when a weight trains, or with an input scale on q, k or v (the three share their
/// input).
///
/// `adapters`: a bottleneck adapter after the attention output and after the feed-forward output
/// (before dropout's residual sum and the norm, as the block sites' hooks run). `prefix`: keys
/// and values (b, n, h) before the sequence's in the attention (prefix tuning); `key_bias` then
/// covers the n + t keys.
pub fn encoder_block(
    x: &Tensor,
    key_bias: &Tensor,
    block: &EncoderBlock,
    deltas: &[MapDelta; 6],
    adapters: &[Option<Adapter>; 2],
    prefix: Option<&(Tensor, Tensor)>,
) -> Result<Tensor> {
    match block_op(x, key_bias, block, deltas, adapters, prefix)? {
        Some(y) => Ok(y),
        None => encoder_block_composed(x, key_bias, block, deltas, adapters, prefix),
    }
}

/// The engine's op, or `None` where it does not apply.
fn block_op(
    x: &Tensor,
    key_bias: &Tensor,
    block: &EncoderBlock,
    deltas: &[MapDelta; 6],
    adapters: &[Option<Adapter>; 2],
    prefix: Option<&(Tensor, Tensor)>,
) -> Result<Option<Tensor>> {
    let shared_input_scaled = deltas[..3].iter().any(|d| matches!(d.scale, Some(Scale::In(_))));
    // A trained weight (full fine-tuning) under an input scale: its gradient would read the
    // scaled input, which the engine does not keep.
    let trained_scaled = block.linears.iter().zip(deltas).any(|((w, _), d)| w.track_op() && matches!(d.scale, Some(Scale::In(_))));
    if !(fused_ok(x) && engine_enabled() && !shared_input_scaled && !trained_scaled && x.rank() == 3) {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let (b, t, h) = x.dims3()?;
    let elems = b * t * h;
    let mut pack = Pack::default();
    let mut hooks = Vec::with_capacity(6);
    for (j, ((w, bias), d)) in block.linears.iter().zip(deltas).enumerate() {
        let mut mh = MapHooks::new("encoder block", BLOCK_LINEARS[j], w.dims2()?, d, bias.as_ref(), &mut pack)?;
        mh.train_weight("encoder block", BLOCK_LINEARS[j], w, &mut pack)?;
        mh.place_dropout(b * t);
        hooks.push(mh);
    }
    let ln_at = [(pack.trained(&block.ln1.0)?, pack.trained(&block.ln1.1)?), (pack.trained(&block.ln2.0)?, pack.trained(&block.ln2.1)?)];
    let adapters = [0, 1].map(|i| adapters[i].as_ref().map(|a| AdapterHook::new("encoder block", a, h, &mut pack)));
    let [ad1, ad2] = adapters;
    let adapters = [ad1.transpose()?, ad2.transpose()?];
    let prefix = match prefix {
        Some((pk, pv)) => {
            let n = pk.dim(1)?;
            if pk.dims() != [b, n, h] || pv.dims() != pk.dims() || key_bias.dims() != [b, n + t] {
                return Err(err(format!("encoder block: prefix keys {:?} and values {:?} for an input {:?} and a key mask {:?}", pk.shape(), pv.shape(), x.shape(), key_bias.shape())).into());
            }
            Some(Prefix::new(pk, pv, &mut pack)?)
        }
        None => None,
    };
    let tk = t + prefix.as_ref().map_or(0, |p| p.n);
    let packed = pack.finish()?;
    let [q, k, v, o, i, out] = &block.linears;
    let wqkv = Tensor::cat(&[&q.0, &k.0, &v.0], 0)?.contiguous()?;
    // A bias on some of q, k, v but not all: zeros for the others.
    let bqkv = if [q, k, v].iter().any(|d| d.1.is_some()) {
        let parts = [q, k, v]
            .iter()
            .map(|(w, b)| match b {
                Some(b) => Ok(b.clone()),
                None => Tensor::zeros(w.dim(0)?, w.dtype(), w.device()),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Some(Tensor::cat(&parts, 0)?.contiguous()?)
    } else {
        None
    };
    let dense = |d: &Dense| -> Result<Dense> { Ok((d.0.contiguous()?, d.1.as_ref().map(|b| b.contiguous()).transpose()?)) };
    let [d_attn, d_o, d_out] = block.dropout;
    // With an adapter after a sublayer, the sublayer's dropout runs before the adapter, not in
    // the norm's op.
    let sub_drop = [d_o, d_out].map(|d| d.map(|(p, key): (f32, DropoutKey)| (p, key.for_rows(elems))));
    let norm_drop = |i: usize, d| if adapters[i].is_some() { None } else { d };
    let probs = d_attn.map(|(p, key)| (p, key.for_rows(b * block.heads * t * tk)));
    let op = BlockOp {
        qkv: (wqkv, bqkv),
        o: dense(o)?,
        inter: dense(i)?,
        out: dense(out)?,
        ln1: ResidualLayerNorm::new(block.ln1.2, norm_drop(0, d_o), elems, block.ln1.0.contiguous()?, block.ln1.1.contiguous()?),
        ln2: ResidualLayerNorm::new(block.ln2.2, norm_drop(1, d_out), elems, block.ln2.0.contiguous()?, block.ln2.1.contiguous()?),
        attn: Attention::bidirectional(block.heads, probs, key_bias.to_dtype(candle_core::DType::F32)?.contiguous()?),
        hooks,
        ln_at,
        adapters,
        sub_drop,
        prefix,
        kept: Mutex::new(None),
    };
    Ok(Some(run_layer(&x, packed, op)?))
}

/// A layer of the block engine: its forward from the input and the packed LoRA vector (empty
/// without LoRA), its backward to both; [`run_layer`] runs it as a candle op of one argument (no
/// LoRA) or two.
pub(super) trait LayerOp: Send + Sync + 'static {
    const NAME: &'static str;
    fn fwd(&self, x: &[f32], shape: &Shape, p: &[f32]) -> Fwd;
    /// The input gradient when `x` takes part in a graph (else `None`) from the output gradient
    /// `grad` (contiguous); the packed gradient into `dp` (zeros, the length of `p`).
    fn bwd(&self, x: &Tensor, p: &[f32], dp: &mut [f32], grad: &Tensor) -> candle_core::Result<Option<Vec<f32>>>;
}

/// `op` on the contiguous input `x` and the packed LoRA vector, if any.
pub(super) fn run_layer<K: LayerOp>(x: &Tensor, packed: Option<Tensor>, op: K) -> Result<Tensor> {
    Ok(match packed {
        Some(packed) => x.apply_op2(&packed, Layer(op))?,
        None => x.apply_op1(Layer(op))?,
    })
}

/// The candle op of a [`LayerOp`].
struct Layer<K>(K);

impl<K: LayerOp> Layer<K> {
    fn grads(&self, x: &Tensor, packed: Option<&Tensor>, grad: &Tensor) -> Grads2 {
        let p = match packed {
            Some(p) => p.flatten_all()?.to_vec1::<f32>()?,
            None => Vec::new(),
        };
        let mut dp = vec![0f32; p.len()];
        let dx = self.0.bwd(x, &p, &mut dp, &grad.contiguous()?)?;
        let dx = match dx {
            Some(dx) if x.track_op() => Some(tensor_from(dx, x.shape().clone())?),
            _ => None,
        };
        let dp = match packed {
            Some(pk) if pk.track_op() => Some(tensor_from(dp, pk.shape().clone())?),
            _ => None,
        };
        Ok((dx, dp))
    }
}

impl<K: LayerOp> CustomOp1 for Layer<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Fwd {
        self.0.fwd(slice(s, l)?, l.shape(), &[])
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(self.grads(arg, None, grad)?.0)
    }
}

impl<K: LayerOp> CustomOp2 for Layer<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Fwd {
        self.0.fwd(slice(s1, l1)?, l1.shape(), slice(s2, l2)?)
    }

    fn bwd(&self, x: &Tensor, packed: &Tensor, _res: &Tensor, grad: &Tensor) -> Grads2 {
        self.grads(x, Some(packed), grad)
    }
}

/// Reference implementation of [`encoder_block`]: the layer from the per-op kernels (the path a
/// layer takes without the engine).
pub fn encoder_block_composed(
    x: &Tensor,
    key_bias: &Tensor,
    block: &EncoderBlock,
    deltas: &[MapDelta; 6],
    adapters: &[Option<Adapter>; 2],
    prefix: Option<&(Tensor, Tensor)>,
) -> Result<Tensor> {
    let map = |j: usize, x: &Tensor| -> Result<Tensor> {
        let (w, b) = &block.linears[j];
        composed_map(x, deltas, j, |x| match (&deltas[j].lora, deltas[j].input_dropout) {
            (Some(l), Some(d)) => Ok(linear(x, w, b.as_ref())?.add(&dropped_low_rank(x, l, d)?)?),
            (Some((a, bm)), None) => lora_linear(x, w, b.as_ref(), a, bm),
            (None, _) => linear(x, w, b.as_ref()),
        })
    };
    let (q, mut k, mut v) = (map(0, x)?, map(1, x)?, map(2, x)?);
    if let Some((pk, pv)) = prefix {
        k = Tensor::cat(&[pk, &k], 1)?;
        v = Tensor::cat(&[pv, &v], 1)?;
    }
    let c = attention(&q, &k, &v, key_bias, block.heads, block.dropout[0])?;
    // A sublayer's output, its residual input, its norm: dropout, the adapter, the sum and the
    // norm as the block sites run them.
    let sublayer = |hid: Tensor, input: &Tensor, i: usize, ln: &(Tensor, Tensor, f64)| -> Result<Tensor> {
        match &adapters[i] {
            None => residual_layer_norm(&hid, input, &ln.0, &ln.1, ln.2, block.dropout[i + 1]),
            Some(ad) => {
                let hid = match block.dropout[i + 1] {
                    Some((p, key)) => super::dropout::dropout(&hid, p, key)?,
                    None => hid,
                };
                residual_layer_norm(&ad.composed(&hid, input)?, input, &ln.0, &ln.1, ln.2, None)
            }
        }
    };
    let a = sublayer(map(3, &c)?, x, 0, &block.ln1)?;
    let g = match deltas[4].is_some() {
        true => gelu(&map(4, &a)?)?,
        false => linear_gelu(&a, &block.linears[4].0, block.linears[4].1.as_ref())?,
    };
    sublayer(map(5, &g)?, &a, 1, &block.ln2)
}

/// A LoRA's update `(x' Aᵀ) Bᵀ` on its input `x` under the dropout `(p, key)` (the composed
/// reference).
pub(super) fn dropped_low_rank(x: &Tensor, (a, bm): &super::engine_hooks::LowRank, (p, key): (f32, DropoutKey)) -> Result<Tensor> {
    let xd = super::dropout::dropout(x, p, key)?;
    Ok(linear(&linear(&xd, a, None)?, bm, None)?)
}

/// Map j's output from its input in the composed path, `product` being the map (with any LoRA):
/// its (IA)³ scale applied to the input or the output as the hooks do.
pub(super) fn composed_map(x: &Tensor, deltas: &[MapDelta], j: usize, product: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let y = match &deltas[j].scale {
        Some(Scale::In(l)) => product(&scale_last(x, l)?)?,
        Some(Scale::Out(l)) => scale_last(&product(x)?, l)?,
        Some(Scale::Mag(l, b0)) => match b0 {
            Some(b0) => scale_last(&product(x)?.broadcast_sub(b0)?, l)?.broadcast_add(b0)?,
            None => scale_last(&product(x)?, l)?,
        },
        None => product(x)?,
    };
    match &deltas[j].dense {
        Some(dw) => {
            let xd = match deltas[j].input_dropout {
                Some((p, key)) => super::dropout::dropout(x, p, key)?,
                None => x.clone(),
            };
            Ok(y.add(&linear(&xd, dw, None)?)?)
        }
        None => Ok(y),
    }
}

/// What the forward keeps for the backward.
struct Kept {
    /// q, k, v side by side (rows × 3h).
    qkv: Vec<f32>,
    /// With a prefix: its keys and values and the sequence's, side by side (b · (n + t) × 2h).
    kv: Option<Vec<f32>>,
    /// The attention context (rows × h), when a delta on the attention output reads it.
    ctx: Option<Vec<f32>>,
    /// The attention output projection before dropout and the residual sum (rows × h).
    h1: Vec<f32>,
    /// The first norm's output: the feed-forward's input and second residual (rows × h).
    a: Vec<f32>,
    /// GELU's input (rows × i).
    pre: Vec<f32>,
    /// GELU's output (rows × i), when a delta on the output map reads it.
    g: Option<Vec<f32>>,
    /// The output map before dropout and the residual sum (rows × h).
    h2: Vec<f32>,
    /// Each LoRA's `x Aᵀ`.
    u: [Option<Vec<f32>>; 6],
    /// Each trained output scale's unscaled output.
    y0: [Option<Vec<f32>>; 6],
    /// What the adapters after the two sublayers keep.
    ad: [Option<AdapterKept>; 2],
}

/// The buffers go back to the pool when the step's graph lets go of the op.
impl Drop for Kept {
    fn drop(&mut self) {
        for v in [&mut self.qkv, &mut self.h1, &mut self.a, &mut self.pre, &mut self.h2] {
            pool::give(std::mem::take(v));
        }
        for v in [&mut self.kv, &mut self.ctx, &mut self.g].into_iter().chain(self.u.iter_mut()).chain(self.y0.iter_mut()) {
            pool::give_opt(v.take());
        }
    }
}

struct BlockOp {
    /// The stacked q, k, v weights (3h × h) and biases (3h).
    qkv: Dense,
    o: Dense,
    inter: Dense,
    out: Dense,
    ln1: ResidualLayerNorm,
    ln2: ResidualLayerNorm,
    attn: Attention,
    /// The deltas on the six maps.
    hooks: Vec<MapHooks>,
    /// Where the two norms' γ and β gradients go, when they train.
    ln_at: [(Option<usize>, Option<usize>); 2],
    /// The adapters after the attention output and the feed-forward output.
    adapters: [Option<AdapterHook>; 2],
    /// The two sublayers' dropout, run here instead of in the norm where an adapter follows the
    /// sublayer.
    sub_drop: [Option<(f32, DropoutKey)>; 2],
    /// Prefix keys and values before the sequence's.
    prefix: Option<Prefix>,
    kept: Mutex<Option<Kept>>,
}

/// `y = x Wᵀ + b` for a frozen map into a fresh buffer.
pub(super) fn dense(x: &[f32], in_dim: usize, (w, b): &Dense) -> candle_core::Result<Vec<f32>> {
    let out_dim = w.dim(0)?;
    let rows = x.len() / in_dim.max(1);
    let mut y = pool::take(rows * out_dim);
    match b {
        Some(b) => with_data([w, b], |[ws, bs]| dense_into(&mut y, x, in_dim, ws, out_dim, Some(bs)))?,
        None => with_data([w], |[ws]| dense_into(&mut y, x, in_dim, ws, out_dim, None))?,
    }
    Ok(y)
}

impl BlockOp {
    /// Sublayer `i`'s output `hid` (before its dropout), with an adapter after it: the dropout
    /// and the adapter (reading `input`, the sublayer's input, when parallel) — what the norm's
    /// op then sums with `input`; without one, `hid` as it is (the norm's op drops it).
    fn adapt(&self, i: usize, hid: Vec<f32>, input: &[f32], kept: &mut [Option<AdapterKept>; 2]) -> Vec<f32> {
        let Some(ad) = &self.adapters[i] else { return hid };
        let d = dropped(&hid, self.sub_drop[i]);
        let mut e = d.clone();
        kept[i] = Some(if ad.parallel {
            ad.forward(&mut e, input)
        } else {
            let mut k = ad.forward(&mut e, &d);
            k.src = Some(d);
            k
        });
        e
    }

    /// The backward of [`Self::adapt`]: `dhid` holds the gradient of what the norm summed; it
    /// becomes the gradient of the sublayer's output (through the adapter and the dropout), and
    /// a parallel adapter's input gradient is added onto `dinput`.
    fn adapt_grad(&self, i: usize, dhid: &mut Vec<f32>, dinput: &mut [f32], input: &[f32], kept: &[Option<AdapterKept>; 2], dp: &mut [f32]) -> candle_core::Result<()> {
        let Some(ad) = &self.adapters[i] else { return Ok(()) };
        let k = kept[i].as_ref().ok_or_else(|| err("encoder block: an adapter's backward without its forward"))?;
        let src = if ad.parallel { input } else { k.src.as_deref().ok_or_else(|| err("encoder block: an adapter's input was not kept"))? };
        let dsrc = ad.backward(dhid, src, k, dp);
        let target: &mut [f32] = if ad.parallel { dinput } else { dhid };
        target.par_iter_mut().zip(dsrc.par_iter()).for_each(|(t, d)| *t += d);
        *dhid = dropped(dhid, self.sub_drop[i]);
        Ok(())
    }

    fn shapes(&self, x: &Shape) -> candle_core::Result<(usize, usize, usize, usize)> {
        let (b, t, h) = x.dims3()?;
        let inter = self.inter.0.dim(0)?;
        let ok = self.qkv.0.dims2()? == (3 * h, h)
            && self.o.0.dims2()? == (h, h)
            && self.inter.0.dims2()? == (inter, h)
            && self.out.0.dims2()? == (h, inter);
        if !ok {
            return Err(err(format!("encoder block: input {x:?} does not match the layer's weights")));
        }
        Ok((b, t, h, inter))
    }
}

impl LayerOp for BlockOp {
    const NAME: &'static str = "encoder-block";

    fn fwd(&self, x: &[f32], shape: &Shape, p: &[f32]) -> Fwd {
        let (b, t, h, _) = self.shapes(shape)?;
        let s = &self.hooks;
        let mut u: [Option<Vec<f32>>; 6] = Default::default();
        let mut y0: [Option<Vec<f32>>; 6] = Default::default();
        // q, k, v side by side: each map's product into its column block (three products, not
        // one with the stacked weights, so that every number is the per-op path's — a longer
        // output row may change `gemm`'s blocking and so its rounding), then any LoRA onto it.
        let mut qkv = pool::take(b * t * 3 * h);
        {
            let _prof = timer("qkv-linear", "fwd");
            let bias = self.qkv.1.is_some();
            let mut fill = |ws: &[f32], bs: Option<&[f32]>| {
                if let Some(bs) = bs {
                    qkv.par_chunks_mut(3 * h).for_each(|row| row.copy_from_slice(bs));
                }
                let dst = SyncPtr::of(&mut qkv);
                for j in 0..3 {
                    let w = &ws[j * h * h..(j + 1) * h * h];
                    gemm(dst.out(j * h, 3 * h), [b * t, h, h], Mat::rm(x, h), Mat::rm_t(w, h), Gemm::PARALLEL.accumulate(bias));
                }
                Ok(())
            };
            match &self.qkv.1 {
                Some(bq) => with_data([&self.qkv.0, bq], |[ws, bs]| fill(ws, Some(bs)))?,
                None => with_data([&self.qkv.0], |[ws]| fill(ws, None))?,
            }
        }
        for j in 0..3 {
            if let Some(sl) = &s[j].lora {
                u[j] = Some(sl.forward(x, p, &mut qkv, 3 * h, j * h));
            }
            y0[j] = s[j].scale_output(&mut qkv, 3 * h, j * h);
        }
        let mut c = pool::take(b * t * h);
        let kv = self.prefix.as_ref().map(|pf| pf.keys_values(&qkv, 3 * h, h, b, t));
        {
            let _prof = timer("attention", "fwd");
            match &kv {
                None => self.attn.forward_into(&self.attn.strided_dims(shape, shape, 3 * h, 3 * h)?, &qkv, &qkv[h..], &qkv[2 * h..], &mut c)?,
                Some(kv) => {
                    let n = kv.len() / (2 * h * b) - t;
                    let dm = self.attn.strided_dims(shape, &Shape::from((b, n + t, h)), 3 * h, 2 * h)?;
                    self.attn.forward_into(&dm, &qkv, kv, &kv[h..], &mut c)?
                }
            }
        }
        // Map j on its input `x` (of width `w`): the input scale, the product, the LoRA, the
        // output scale.
        let mut map = |j: usize, x: &[f32], w: usize, d: &Dense| -> candle_core::Result<Vec<f32>> {
            let mut y = {
                let _prof = timer("frozen-linear", "fwd");
                dense(s[j].scaled_input(x).as_deref().unwrap_or(x), w, d)?
            };
            let out = d.0.dim(0)?;
            if let Some(sl) = &s[j].lora {
                u[j] = Some(sl.forward(x, p, &mut y, out, 0));
            }
            y0[j] = s[j].scale_output(&mut y, out, 0);
            Ok(y)
        };
        let mut ad: [Option<AdapterKept>; 2] = Default::default();
        let h1 = self.adapt(0, map(3, &c, h, &self.o)?, x, &mut ad);
        let mut a = pool::take(h1.len());
        {
            let _prof = timer("residual-layer-norm", "fwd");
            self.ln1.forward_into(&mut a, &h1, x, h)?;
        }
        let pre = map(4, &a, h, &self.inter)?;
        let inter = self.inter.0.dim(0)?;
        let mut g = pool::take(pre.len());
        {
            let _prof = timer("gelu-erf", "fwd");
            gelu_into(&mut g, &pre);
        }
        let h2 = self.adapt(1, map(5, &g, inter, &self.out)?, &a, &mut ad);
        let mut y = vec![0f32; h2.len()];
        {
            let _prof = timer("residual-layer-norm", "fwd");
            self.ln2.forward_into(&mut y, &h2, &a, h)?;
        }
        let ctx = if s[3].needs_input() { Some(c) } else { pool::give(c); None };
        let g = if s[5].needs_input() { Some(g) } else { pool::give(g); None };
        let kept = Kept { qkv, kv, ctx, h1, a, pre, g, h2, u, y0, ad };
        *self.kept.lock().map_err(|_| err("encoder block: poisoned lock"))? = Some(kept);
        Ok((CpuStorage::F32(y), shape.clone()))
    }

    /// The input gradient (when `x` takes part in the graph) from the output gradient `grad`,
    /// the packed gradient (LoRAs, scales, biases, norms) into `dp` from the packed values `p`.
    fn bwd(&self, x: &Tensor, p: &[f32], dp: &mut [f32], grad: &Tensor) -> candle_core::Result<Option<Vec<f32>>> {
        let (b, t, h, inter) = self.shapes(x.shape())?;
        let rows = b * t;
        let kept = self.kept.lock().map_err(|_| err("encoder block: poisoned lock"))?;
        let k = kept.as_ref().ok_or_else(|| err("encoder block: backward without forward"))?;
        let s = &self.hooks;
        let need_dx = x.track_op();
        // Nothing runs below the lowest thing that needs a gradient: dq, dk, dv for dx or a delta
        // on q, k, v; the first norm's backward for those or a delta on the attention output, its
        // adapter or the norm itself; the intermediate map's output gradient for those or a delta
        // on that map.
        let trains = |j: usize| s[j].trains();
        let adapter_trains = |i: usize| self.adapters[i].as_ref().is_some_and(AdapterHook::trains);
        let need_qkv = need_dx || (0..3).any(trains);
        let prefix_trains = self.prefix.as_ref().is_some_and(Prefix::trains);
        let need_attn = need_qkv || prefix_trains;
        let need_da = need_attn || trains(3) || adapter_trains(0) || self.ln_at[0].0.is_some() || self.ln_at[0].1.is_some();
        let need_dpre = need_da || trains(4);
        // An input scale's gradient reads the map's input gradient.
        let scale_in = |j: usize| s[j].input_scale().is_some_and(|v| v.at.is_some());
        let dx = with_data([x, grad], |[xs, dy]| {
            // Second residual norm: dh2 through its dropout, da from the residual; γ, β.
            let (mut dh2, mut da) = (pool::take(rows * h), pool::take(rows * h));
            {
                let _prof = timer("residual-layer-norm", "bwd");
                self.ln2.backward_into(&mut dh2, &mut da, &k.h2, &k.a, dy)?;
                self.ln2.param_grads_into(dp, self.ln_at[1], &k.h2, &k.a, dy)?;
            }
            self.adapt_grad(1, &mut dh2, &mut da, &k.a, &k.ad, dp)?;
            // Output map: its scale and bias, dg = dh2 W_out (+ its LoRA).
            s[5].output_grads(&mut dh2, h, 0, h, k.y0[5].as_deref(), dp)?;
            s[5].weight_grad(&dh2, h, 0, k.g.as_deref(), dp)?;
            let mut dg = pool::take(rows * inter);
            if need_dpre || scale_in(5) {
                let _prof = timer("frozen-linear", "bwd");
                s[5].input_grad(&mut dg, false, k.g.as_deref(), dp, |buf, acc| input_grad_into(buf, &dh2, &self.out.0, acc))?;
            }
            if let (Some(sl), Some(u), Some(g)) = (&s[5].lora, &k.u[5], &k.g) {
                sl.backward(&dh2, h, g, u, p, dp, need_dpre.then_some(&mut dg[..]));
            }
            pool::give(dh2);
            if !need_dpre {
                pool::give(dg);
                pool::give(da);
                return Ok(Vec::new());
            }
            // GELU, then the intermediate map: da += dpre W_i (+ its LoRA).
            let mut dpre = pool::take(rows * inter);
            {
                let _prof = timer("gelu-erf", "bwd");
                gelu_grad_into(&mut dpre, &k.pre, &dg);
            }
            pool::give(dg);
            s[4].output_grads(&mut dpre, inter, 0, inter, k.y0[4].as_deref(), dp)?;
            s[4].weight_grad(&dpre, inter, 0, Some(&k.a), dp)?;
            if let (Some(sl), Some(u)) = (&s[4].lora, &k.u[4]) {
                sl.backward(&dpre, inter, &k.a, u, p, dp, need_da.then_some(&mut da[..]));
            }
            if need_da || scale_in(4) {
                let _prof = timer("frozen-linear", "bwd");
                s[4].input_grad(&mut da, true, Some(&k.a), dp, |buf, acc| input_grad_into(buf, &dpre, &self.inter.0, acc))?;
            }
            pool::give(dpre);
            if !need_da {
                pool::give(da);
                return Ok(Vec::new());
            }
            // First residual norm: dh1 through its dropout, dx from the residual; γ, β.
            let (mut dh1, mut dx) = (pool::take(rows * h), vec![0f32; rows * h]);
            {
                let _prof = timer("residual-layer-norm", "bwd");
                self.ln1.backward_into(&mut dh1, &mut dx, &k.h1, xs, &da)?;
                self.ln1.param_grads_into(dp, self.ln_at[0], &k.h1, xs, &da)?;
            }
            self.adapt_grad(0, &mut dh1, &mut dx, xs, &k.ad, dp)?;
            pool::give(da);
            // Attention output map: its scale and bias, dc = dh1 W_o (+ its LoRA).
            s[3].output_grads(&mut dh1, h, 0, h, k.y0[3].as_deref(), dp)?;
            s[3].weight_grad(&dh1, h, 0, k.ctx.as_deref(), dp)?;
            let mut dc = pool::take(rows * h);
            if need_attn || scale_in(3) {
                let _prof = timer("frozen-linear", "bwd");
                s[3].input_grad(&mut dc, false, k.ctx.as_deref(), dp, |buf, acc| input_grad_into(buf, &dh1, &self.o.0, acc))?;
            }
            if let (Some(sl), Some(u), Some(c)) = (&s[3].lora, &k.u[3], &k.ctx) {
                sl.backward(&dh1, h, c, u, p, dp, need_attn.then_some(&mut dc[..]));
            }
            pool::give(dh1);
            if !need_attn {
                pool::give(dc);
                return Ok(Vec::new());
            }
            // Attention: dq, dk, dv side by side, as q, k, v were (with a prefix, dk and dv come
            // in the prefixed buffer's layout: the prefix's part is its gradient, the rest goes
            // into place).
            let mut dqkv = pool::take(rows * 3 * h);
            {
                let _prof = timer("attention", "bwd");
                let ptr = SyncPtr::of(&mut dqkv);
                match (&self.prefix, &k.kv) {
                    (None, _) => {
                        let dm = self.attn.strided_dims(x.shape(), x.shape(), 3 * h, 3 * h)?;
                        self.attn.backward_into(&dm, &k.qkv, &k.qkv[h..], &k.qkv[2 * h..], &dc, [(ptr, 0), (ptr, h), (ptr, 2 * h)])?;
                    }
                    (Some(pf), Some(kv)) => {
                        let dm = self.attn.strided_dims(x.shape(), &Shape::from((b, pf.n + t, h)), 3 * h, 2 * h)?;
                        let mut dkv = pool::take(kv.len());
                        let pkv = SyncPtr::of(&mut dkv);
                        self.attn.backward_into(&dm, &k.qkv, kv, &kv[h..], &dc, [(ptr, 0), (pkv, 0), (pkv, h)])?;
                        pf.split_grads(&dkv, &mut dqkv, 3 * h, h, dp, b, t);
                        pool::give(dkv);
                    }
                    (Some(_), None) => return Err(err("encoder block: the prefixed keys were not kept")),
                }
            }
            pool::give(dc);
            if !need_qkv {
                pool::give(dqkv);
                return Ok(Vec::new());
            }
            // The scales, biases and LoRAs on q, k, v, then dx += dqkv W_qkv (one product over 3h).
            for j in 0..3 {
                s[j].output_grads(&mut dqkv, 3 * h, j * h, h, k.y0[j].as_deref(), dp)?;
                s[j].weight_grad(&dqkv, 3 * h, j * h, Some(xs), dp)?;
                if let (Some(sl), Some(u)) = (&s[j].lora, &k.u[j]) {
                    sl.backward(&dqkv[j * h..], 3 * h, xs, u, p, dp, need_dx.then_some(&mut dx[..]));
                }
            }
            if need_dx {
                let _prof = timer("qkv-linear", "bwd");
                input_grad_into(&mut dx, &dqkv, &self.qkv.0, true)?;
            }
            pool::give(dqkv);
            Ok(dx)
        })?;
        Ok(need_dx.then_some(dx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::Act;
    use crate::ops::cpu::testing::{around, check_layer, check_layer_close, layer_lora, padded_key_bias, rand, var, MapLora};
    use candle_core::{Device, Var};

    /// The engine against the composition on the tests' input (b, t, h) with padded keys and no
    /// adapter or prefix: [`check_layer`] (the output to the bit, every gradient within 1e-4).
    /// Returns the input and key mask.
    fn engine_matches(block: &EncoderBlock, deltas: &[MapDelta; 6], (b, t, h): (usize, usize, usize), x_grad: bool, vars: &[MapLora], trained: &[(String, Var)]) -> (Tensor, Tensor) {
        let xv = var(&[b, t, h], 11, 1.0);
        let x = if x_grad { xv.as_tensor().clone() } else { xv.as_tensor().detach() };
        let bias = padded_key_bias(b, t, 2);
        let y1 = block_op(&x, &bias, block, deltas, &Default::default(), None).unwrap().expect("the engine applies");
        let y2 = encoder_block_composed(&x, &bias, block, deltas, &Default::default(), None).unwrap();
        check_layer(&y1, &y2, &rand(&[b, t, h], 12), &xv, x_grad, vars, &BLOCK_LINEARS, trained);
        (x, bias)
    }

    /// The engine against the per-op composition: output and every gradient (x and each LoRA
    /// matrix) within 1e-4 relative, with dropout, padding, LoRA on a subset of the maps and
    /// biases on all of them.
    fn check(lora_on: &[usize], dropout: bool, x_grad: bool) {
        check_sized(lora_on, dropout, x_grad, (2, 7, 16, 4, 24, 3));
    }

    /// [`check`] for (batch, length, hidden, heads, intermediate, LoRA rank).
    fn check_sized(lora_on: &[usize], dropout: bool, x_grad: bool, (b, t, h, heads, inter, r): (usize, usize, usize, usize, usize, usize)) {
        let lin = |out: usize, inp: usize, seed: u64| -> Dense {
            ((rand(&[out, inp], seed) * 0.3).unwrap(), Some((rand(&[out], seed + 100) * 0.1).unwrap()))
        };
        let block = EncoderBlock {
            heads,
            linears: [lin(h, h, 1), lin(h, h, 2), lin(h, h, 3), lin(h, h, 4), lin(inter, h, 5), lin(h, inter, 6)],
            ln1: (((rand(&[h], 7) * 0.2).unwrap() + 1.0).unwrap(), (rand(&[h], 8) * 0.1).unwrap(), 1e-12),
            ln2: (((rand(&[h], 9) * 0.2).unwrap() + 1.0).unwrap(), (rand(&[h], 10) * 0.1).unwrap(), 1e-12),
            dropout: if dropout {
                let k = DropoutKey(42);
                [Some((0.1, k.derive("p"))), Some((0.1, k.derive("o"))), Some((0.1, k.derive("out")))]
            } else {
                [None, None, None]
            },
        };
        let (vars, lora) = layer_lora::<6>(lora_on, |j| block.linears[j].0.dims2().unwrap(), r);
        let xv = var(&[b, t, h], 11, 1.0);
        let x = if x_grad { xv.as_tensor().clone() } else { xv.as_tensor().detach() };
        // The second sequence has its last two keys padded.
        let bias = padded_key_bias(b, t, 2);
        let y1 = block_op(&x, &bias, &block, &lora, &Default::default(), None).unwrap().expect("the engine applies");
        let y2 = encoder_block_composed(&x, &bias, &block, &lora, &Default::default(), None).unwrap();
        // The forward is the per-op path's, to the bit.
        check_layer(&y1, &y2, &rand(&[b, t, h], 12), &xv, x_grad, &vars, &BLOCK_LINEARS, &[]);
    }

    /// The engine's buffers come from the pool with whatever their last user left: with the pool
    /// stocked with NaN buffers of every size a layer takes (rows of h, 3h, the intermediate
    /// size, the rank), the engine still matches the composition — nothing is read before it
    /// is written. Heads of 16 (the head kernel) and sizes above the pool's minimum.
    #[test]
    fn block_reads_no_stale_pool_buffer() {
        let (b, t, h, heads, inter, r) = (4, 64, 64, 4, 128, 8);
        let rows = b * t;
        for n in [rows * h, rows * 3 * h, rows * inter, rows * r * 8] {
            pool::poison(n, 4);
        }
        check_sized(&[0, 2, 5], true, true, (b, t, h, heads, inter, r));
        pool::poison(rows * h, 4);
        pool::poison(rows * inter, 4);
        check_sized(&[4], false, false, (b, t, h, heads, inter, r));
    }

    #[test]
    fn block_matches_composition_with_lora_on_q_and_v() {
        check(&[0, 2], true, true);
    }

    #[test]
    fn block_matches_composition_with_lora_everywhere() {
        check(&[0, 1, 2, 3, 4, 5], true, true);
        check(&[3, 5], false, true);
    }

    #[test]
    fn block_without_input_gradient_or_lora() {
        // The lowest LoRA layer: no gradient for x, only for the LoRA; with LoRA above the
        // attention only, the backward stops below it (at the output map, the intermediate map,
        // the attention output).
        check(&[1, 4], true, false);
        check(&[5], true, false);
        check(&[4], false, false);
        check(&[3], true, false);
        // A frozen layer above the lowest LoRA: only dx.
        check(&[], true, true);
    }

    /// Every delta the engine computes besides LoRA, against the composition: (IA)³ scales on the
    /// outputs of k, v and the intermediate map and on the inputs of the attention output and the
    /// output map, a LoRA on q, trained biases on all six maps (BitFit) and trained γ and β on
    /// both norms (LayerNorm tuning); with and without dropout and the input's gradient.
    fn check_deltas(dropout: bool, x_grad: bool) {
        let (b, t, h, heads, inter, r) = (2, 7, 16, 4, 24, 3);
        let mut trained = Vec::new();
        let mut lin = |out: usize, inp: usize, seed: u64| -> Dense {
            let bias = (rand(&[out], seed + 100) * 0.1).unwrap();
            ((rand(&[out, inp], seed) * 0.3).unwrap(), Some(around(&bias, seed + 200, 0.1, &format!("bias of map {seed}"), &mut trained)))
        };
        let linears = [lin(h, h, 1), lin(h, h, 2), lin(h, h, 3), lin(h, h, 4), lin(inter, h, 5), lin(h, inter, 6)];
        let mut norm = |seed: u64| {
            let g = ((rand(&[h], seed) * 0.2).unwrap() + 1.0).unwrap();
            let beta = (rand(&[h], seed + 1) * 0.1).unwrap();
            (around(&g, seed + 300, 0.1, &format!("gamma {seed}"), &mut trained), around(&beta, seed + 301, 0.1, &format!("beta {seed}"), &mut trained), 1e-12)
        };
        let (ln1, ln2) = (norm(7), norm(9));
        let block = EncoderBlock {
            heads,
            linears,
            ln1,
            ln2,
            dropout: if dropout {
                let k = DropoutKey(42);
                [Some((0.1, k.derive("p"))), Some((0.1, k.derive("o"))), Some((0.1, k.derive("out")))]
            } else {
                [None, None, None]
            },
        };
        let (vars, mut deltas) = layer_lora::<6>(&[0], |j| block.linears[j].0.dims2().unwrap(), r);
        // With dropout, the LoRA on q reads its input dropped (LoRA's own dropout).
        if dropout {
            deltas[0].input_dropout = Some((0.1, DropoutKey(21)));
        }
        let ones = |n: usize| Tensor::ones(n, candle_core::DType::F32, &Device::Cpu).unwrap();
        let mut scale = |j: usize, n: usize, input: bool| {
            let l = around(&ones(n), 60 + j as u64, 0.3, &format!("scale on {}", BLOCK_LINEARS[j]), &mut trained);
            deltas[j].scale = Some(if input { Scale::In(l) } else { Scale::Out(l) });
        };
        scale(1, h, false);
        scale(2, h, false);
        scale(3, h, true);
        scale(4, inter, false);
        scale(5, inter, true);
        engine_matches(&block, &deltas, (b, t, h), x_grad, &vars, &trained);
    }

    /// Dense weight updates ΔW (LoHa, LoKr) on k, the attention output and the output map, with
    /// DoRA on q (a LoRA inside a magnitude scale that leaves the bias out), against the composition (`y + x ΔWᵀ`; outputs within 1e-5: the update is
    /// accumulated by its product), with and without dropout and the input's gradient; a weight
    /// update and a LoRA on one map are refused.
    fn check_dense(dropout: bool, x_grad: bool) {
        let (b, t, h, heads, inter, r) = (2, 7, 16, 4, 24, 3);
        let lin = |out: usize, inp: usize, seed: u64| -> Dense { ((rand(&[out, inp], seed) * 0.3).unwrap(), Some((rand(&[out], seed + 100) * 0.1).unwrap())) };
        let block = EncoderBlock {
            heads,
            linears: [lin(h, h, 1), lin(h, h, 2), lin(h, h, 3), lin(h, h, 4), lin(inter, h, 5), lin(h, inter, 6)],
            ln1: (((rand(&[h], 7) * 0.2).unwrap() + 1.0).unwrap(), (rand(&[h], 8) * 0.1).unwrap(), 1e-12),
            ln2: (((rand(&[h], 9) * 0.2).unwrap() + 1.0).unwrap(), (rand(&[h], 10) * 0.1).unwrap(), 1e-12),
            dropout: if dropout { [Some((0.1, DropoutKey(4).derive("p"))), Some((0.1, DropoutKey(4).derive("o"))), None] } else { [None, None, None] },
        };
        let (vars, mut deltas) = layer_lora::<6>(&[0], |j| block.linears[j].0.dims2().unwrap(), r);
        let mut trained = Vec::new();
        // DoRA on q: its LoRA inside a magnitude that leaves q's frozen bias out.
        let ones = Tensor::ones(h, candle_core::DType::F32, &Device::Cpu).unwrap();
        deltas[0].scale = Some(Scale::Mag(around(&ones, 69, 0.3, "magnitude on q", &mut trained), block.linears[0].1.clone()));
        for j in [1, 3, 5] {
            let (out, inp) = block.linears[j].0.dims2().unwrap();
            let zero = Tensor::zeros((out, inp), candle_core::DType::F32, &Device::Cpu).unwrap();
            deltas[j].dense = Some(around(&zero, 70 + j as u64, 0.05, &format!("weight update on {}", BLOCK_LINEARS[j]), &mut trained));
        }
        // With dropout, the updates on k and the output map read their input dropped (DoRA with
        // dropout, in its weight-update form).
        if dropout {
            deltas[1].input_dropout = Some((0.2, DropoutKey(8)));
            deltas[5].input_dropout = Some((0.1, DropoutKey(9)));
        }
        let xv = var(&[b, t, h], 11, 1.0);
        let x = if x_grad { xv.as_tensor().clone() } else { xv.as_tensor().detach() };
        let bias = padded_key_bias(b, t, 2);
        let y1 = block_op(&x, &bias, &block, &deltas, &Default::default(), None).unwrap().expect("the engine applies");
        let y2 = encoder_block_composed(&x, &bias, &block, &deltas, &Default::default(), None).unwrap();
        check_layer_close(&y1, &y2, &rand(&[b, t, h], 12), &xv, x_grad, &vars, &BLOCK_LINEARS, &trained);
        deltas[1].lora = deltas[0].lora.clone();
        assert!(block_op(&x, &bias, &block, &deltas, &Default::default(), None).is_err());
    }

    /// Trained weights (full fine-tuning) on the maps in `on`, trained biases on the same maps,
    /// with a LoRA on q and an output scale on the intermediate map besides: the engine's output
    /// equals the composition's and every gradient (weights `dyᵀ x` included) is within 1e-4; a
    /// trained weight under an input scale falls back to the composition.
    fn check_trained_weights(on: &[usize], dropout: bool, x_grad: bool) {
        let (b, t, h, heads, inter, r) = (2, 7, 16, 4, 24, 3);
        let mut trained = Vec::new();
        let mut lin = |j: usize, out: usize, inp: usize| -> Dense {
            let (w, bias) = ((rand(&[out, inp], j as u64 + 1) * 0.3).unwrap(), (rand(&[out], j as u64 + 101) * 0.1).unwrap());
            if on.contains(&j) {
                let w = around(&w, j as u64 + 201, 0.05, &format!("weight of {}", BLOCK_LINEARS[j]), &mut trained);
                (w, Some(around(&bias, j as u64 + 301, 0.05, &format!("bias of {}", BLOCK_LINEARS[j]), &mut trained)))
            } else {
                (w, Some(bias))
            }
        };
        let linears = [lin(0, h, h), lin(1, h, h), lin(2, h, h), lin(3, h, h), lin(4, inter, h), lin(5, h, inter)];
        let block = EncoderBlock {
            heads,
            linears,
            ln1: (((rand(&[h], 7) * 0.2).unwrap() + 1.0).unwrap(), (rand(&[h], 8) * 0.1).unwrap(), 1e-12),
            ln2: (((rand(&[h], 9) * 0.2).unwrap() + 1.0).unwrap(), (rand(&[h], 10) * 0.1).unwrap(), 1e-12),
            dropout: if dropout { [Some((0.1, DropoutKey(5).derive("p"))), Some((0.1, DropoutKey(5).derive("o"))), Some((0.1, DropoutKey(5).derive("out")))] } else { [None, None, None] },
        };
        let (vars, mut deltas) = layer_lora::<6>(&[0], |j| block.linears[j].0.dims2().unwrap(), r);
        let ones = Tensor::ones(inter, candle_core::DType::F32, &Device::Cpu).unwrap();
        deltas[4].scale = Some(Scale::Out(around(&ones, 77, 0.3, "scale on the intermediate map", &mut trained)));
        let (x, bias) = engine_matches(&block, &deltas, (b, t, h), x_grad, &vars, &trained);
        if let Some(&j) = on.iter().find(|&&j| j >= 3) {
            let n = block.linears[j].0.dim(1).unwrap();
            deltas[j].scale = Some(Scale::In(Tensor::ones(n, candle_core::DType::F32, &Device::Cpu).unwrap()));
            assert!(block_op(&x, &bias, &block, &deltas, &Default::default(), None).unwrap().is_none());
        }
    }

    #[test]
    fn block_matches_composition_with_trained_weights() {
        check_trained_weights(&[0, 1, 2, 3, 4, 5], true, true);
        check_trained_weights(&[0, 1, 2, 3, 4, 5], false, false);
        // Only the top maps train: the backward stops below them.
        check_trained_weights(&[4, 5], false, false);
        check_trained_weights(&[2, 3], true, false);
    }

    #[test]
    fn block_matches_composition_with_weight_updates() {
        check_dense(true, true);
        check_dense(false, false);
    }

    #[test]
    fn block_matches_composition_with_scales_biases_and_norms() {
        check_deltas(true, true);
        check_deltas(false, false);
    }

    /// An input scale on q, k or v (their input is shared), a LoRA with a scale on one map and a
    /// magnitude without a LoRA are not the engine's: the first falls back to the composition,
    /// the others are refused.
    #[test]
    fn block_leaves_what_it_does_not_compute() {
        let (h, inter) = (8, 12);
        let lin = |out: usize, inp: usize| -> Dense { (rand(&[out, inp], out as u64), None) };
        let block = EncoderBlock {
            heads: 2,
            linears: [lin(h, h), lin(h, h), lin(h, h), lin(h, h), lin(inter, h), lin(h, inter)],
            ln1: (Tensor::ones(h, candle_core::DType::F32, &Device::Cpu).unwrap(), rand(&[h], 3), 1e-12),
            ln2: (Tensor::ones(h, candle_core::DType::F32, &Device::Cpu).unwrap(), rand(&[h], 4), 1e-12),
            dropout: [None, None, None],
        };
        let x = var(&[1, 3, h], 5, 1.0);
        let bias = Tensor::zeros((1, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        let mut deltas: [MapDelta; 6] = Default::default();
        deltas[1].scale = Some(Scale::In(var(&[h], 6, 1.0).as_tensor().clone()));
        assert!(block_op(x.as_tensor(), &bias, &block, &deltas, &Default::default(), None).unwrap().is_none());
        let (_, mut both) = layer_lora::<6>(&[2], |j| block.linears[j].0.dims2().unwrap(), 2);
        both[2].scale = Some(Scale::Out(var(&[h], 7, 1.0).as_tensor().clone()));
        let e = block_op(x.as_tensor(), &bias, &block, &both, &Default::default(), None).unwrap_err().to_string();
        assert!(e.contains("value") && e.contains("more than one"), "{e}");
        // A magnitude (DoRA's) needs the LoRA it scales.
        let mut mag: [MapDelta; 6] = Default::default();
        mag[4].scale = Some(Scale::Mag(var(&[inter], 8, 1.0).as_tensor().clone(), None));
        let e = block_op(x.as_tensor(), &bias, &block, &mag, &Default::default(), None).unwrap_err().to_string();
        assert!(e.contains("intermediate") && e.contains("without its LoRA"), "{e}");
    }

    /// Bottleneck adapters after both sublayers against the composition (outputs within 1e-5:
    /// the adapter's products run in `gemm`, the composition's in candle), with LoRA on q and
    /// trained norms: sequential after the attention output, parallel after the feed-forward
    /// output, and the other way round, over each activation; with dropout (which runs before
    /// the adapter) and without the input's gradient.
    fn check_adapters(acts: [Act; 2], parallel: [bool; 2], dropout: bool, x_grad: bool) {
        let (b, t, h, heads, inter, m) = (2, 7, 16, 4, 24, 5);
        let mut trained = Vec::new();
        let lin = |out: usize, inp: usize, seed: u64| -> Dense { ((rand(&[out, inp], seed) * 0.3).unwrap(), Some((rand(&[out], seed + 100) * 0.1).unwrap())) };
        let mut norm = |seed: u64| {
            let g = ((rand(&[h], seed) * 0.2).unwrap() + 1.0).unwrap();
            (around(&g, seed + 300, 0.1, &format!("gamma {seed}"), &mut trained), (rand(&[h], seed + 1) * 0.1).unwrap(), 1e-12)
        };
        let (ln1, ln2) = (norm(7), norm(9));
        let block = EncoderBlock {
            heads,
            linears: [lin(h, h, 1), lin(h, h, 2), lin(h, h, 3), lin(h, h, 4), lin(inter, h, 5), lin(h, inter, 6)],
            ln1,
            ln2,
            dropout: if dropout {
                let k = DropoutKey(42);
                [Some((0.1, k.derive("p"))), Some((0.1, k.derive("o"))), Some((0.1, k.derive("out")))]
            } else {
                [None, None, None]
            },
        };
        let (vars, deltas) = layer_lora::<6>(&[0], |j| block.linears[j].0.dims2().unwrap(), 3);
        let mut adapter = |i: usize| {
            let mut v = |dims: &[usize], k: u64, what: &str| {
                let z = Tensor::zeros(dims, candle_core::DType::F32, &Device::Cpu).unwrap();
                around(&z, 70 + 10 * i as u64 + k, 0.4, &format!("adapter {i} {what}"), &mut trained)
            };
            Some(Adapter { down: (v(&[m, h], 0, "down"), v(&[m], 1, "down bias")), up: (v(&[h, m], 2, "up"), v(&[h], 3, "up bias")), act: acts[i], parallel: parallel[i] })
        };
        let adapters = [adapter(0), adapter(1)];
        let xv = var(&[b, t, h], 11, 1.0);
        let x = if x_grad { xv.as_tensor().clone() } else { xv.as_tensor().detach() };
        let bias = padded_key_bias(b, t, 2);
        let y1 = block_op(&x, &bias, &block, &deltas, &adapters, None).unwrap().expect("the engine applies");
        let y2 = encoder_block_composed(&x, &bias, &block, &deltas, &adapters, None).unwrap();
        check_layer_close(&y1, &y2, &rand(&[b, t, h], 12), &xv, x_grad, &vars, &BLOCK_LINEARS, &trained);
    }

    /// Prefix keys and values (trained) before the sequence's, against the composition (the
    /// forward to the bit), with LoRA on v and an adapter after the feed-forward; with and without
    /// dropout and the input's gradient; the key mask covers the prefix.
    fn check_prefix(dropout: bool, x_grad: bool) {
        let (b, t, h, heads, inter, n) = (2, 7, 16, 4, 24, 3);
        let mut trained = Vec::new();
        let lin = |out: usize, inp: usize, seed: u64| -> Dense { ((rand(&[out, inp], seed) * 0.3).unwrap(), Some((rand(&[out], seed + 100) * 0.1).unwrap())) };
        let norm = |seed: u64| (((rand(&[h], seed) * 0.2).unwrap() + 1.0).unwrap(), (rand(&[h], seed + 1) * 0.1).unwrap(), 1e-12);
        let block = EncoderBlock {
            heads,
            linears: [lin(h, h, 1), lin(h, h, 2), lin(h, h, 3), lin(h, h, 4), lin(inter, h, 5), lin(h, inter, 6)],
            ln1: norm(7),
            ln2: norm(9),
            dropout: if dropout {
                let k = DropoutKey(42);
                [Some((0.1, k.derive("p"))), Some((0.1, k.derive("o"))), Some((0.1, k.derive("out")))]
            } else {
                [None, None, None]
            },
        };
        let (vars, deltas) = layer_lora::<6>(&[2], |j| block.linears[j].0.dims2().unwrap(), 2);
        let zeros = |dims: &[usize]| Tensor::zeros(dims, candle_core::DType::F32, &Device::Cpu).unwrap();
        let pk = around(&zeros(&[b, n, h]), 80, 1.0, "prefix keys", &mut trained);
        let pv = around(&zeros(&[b, n, h]), 81, 1.0, "prefix values", &mut trained);
        let mut ad = |dims: &[usize], k: u64| around(&zeros(dims), 90 + k, 0.3, &format!("adapter {k}"), &mut trained);
        let adapters = [None, Some(Adapter { down: (ad(&[4, h], 0), ad(&[4], 1)), up: (ad(&[h, 4], 2), ad(&[h], 3)), act: Act::Relu, parallel: false })];
        let xv = var(&[b, t, h], 11, 1.0);
        let x = if x_grad { xv.as_tensor().clone() } else { xv.as_tensor().detach() };
        let bias = padded_key_bias(b, n + t, 2);
        let prefix = (pk, pv);
        let y1 = block_op(&x, &bias, &block, &deltas, &[None, None], Some(&prefix)).unwrap().expect("the engine applies");
        let y2 = encoder_block_composed(&x, &bias, &block, &deltas, &[None, None], Some(&prefix)).unwrap();
        check_layer(&y1, &y2, &rand(&[b, t, h], 12), &xv, x_grad, &vars, &BLOCK_LINEARS, &trained[..2]);
        let y1 = block_op(&x, &bias, &block, &deltas, &adapters, Some(&prefix)).unwrap().expect("the engine applies");
        let y2 = encoder_block_composed(&x, &bias, &block, &deltas, &adapters, Some(&prefix)).unwrap();
        check_layer_close(&y1, &y2, &rand(&[b, t, h], 12), &xv, x_grad, &vars, &BLOCK_LINEARS, &trained);
    }

    #[test]
    fn block_matches_composition_with_a_prefix() {
        check_prefix(true, true);
        check_prefix(false, false);
    }

    #[test]
    fn block_matches_composition_with_adapters() {
        check_adapters([Act::Relu, Act::Silu], [false, true], true, true);
        check_adapters([Act::Gelu, Act::Tanh], [true, false], false, true);
        check_adapters([Act::Identity, Act::GeluTanh], [false, false], true, false);
    }
}
