//! The block engine: a whole BERT-family encoder layer — its six frozen linear maps with any
//! LoRA on them, the attention, GELU and both residual layer norms — as one op with a hand-written
//! forward and backward, so that candle's autograd sees one node per layer instead of a dozen.
//!
//! What that removes from a training step: candle's gradient store zero-fills a buffer for every
//! input of every node and adds each gradient into it; here every gradient is written once by the
//! kernel that computes it (`gemm` accumulating into the residual stream's gradient where two
//! paths meet). The three projections of q, k and v are one product with the stacked weights
//! (3h × h) forward and one (K = 3h) backward, attention reads q, k, v in place as column blocks of
//! that product and writes its gradient into one buffer of the same layout. The activations kept
//! for backward are exactly those it reads: the stacked q/k/v, the two sublayer outputs before
//! their residual sums (the sums are recomputed), the first norm's output, GELU's input, the
//! attention context and GELU's output only when a LoRA on the next map needs them, and each
//! LoRA's `x Aᵀ`.
//!
//! The trained LoRA matrices enter as one packed vector (their flattened A and B, in the order of
//! the six maps), so the op has two arguments and candle routes each part of the packed gradient
//! back to its variable; a layer without LoRA is a one-argument op. The composition of the
//! per-op kernels ([`encoder_block_composed`], what a layer runs without the engine) is the
//! reference the engine is tested against. `DELTATUNE_ENGINE=0` turns the engine off.

use super::activation::{gelu, gelu_grad_into, gelu_into};
use super::attention::{attention, Attention};
use super::cpu::{err, fused_ok, gemm, slice, tensor_from, with_data, Fwd, Gemm, Grads2, Mat, Out, SyncPtr};
use super::linear::{dense_into, input_grad_into, linear, linear_gelu, lora_linear};
use super::norm::{residual_layer_norm, ResidualLayerNorm};
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

/// A LoRA on one of the six maps: `a` (r, in) and `bm` (out, r), the scale folded into `bm`.
pub type LowRank = (Tensor, Tensor);

/// The encoder layer `x` (b, t, h) → (b, t, h) with the key mask `key_bias` (b, t) and LoRA on
/// any of its linear maps (`lora[j]` for map j of [`BLOCK_LINEARS`]), as one op (see the module
/// docs). Falls back to [`encoder_block_composed`] off the CPU, with the engine switched off, or
/// when a weight or norm trains.
pub fn encoder_block(x: &Tensor, key_bias: &Tensor, block: &EncoderBlock, lora: &[Option<LowRank>; 6]) -> Result<Tensor> {
    match block_op(x, key_bias, block, lora)? {
        Some(y) => Ok(y),
        None => encoder_block_composed(x, key_bias, block, lora),
    }
}

/// The engine's op, or `None` where it does not apply.
fn block_op(x: &Tensor, key_bias: &Tensor, block: &EncoderBlock, lora: &[Option<LowRank>; 6]) -> Result<Option<Tensor>> {
    let frozen = block.linears.iter().all(|(w, b)| !w.track_op() && b.as_ref().is_none_or(|b| !b.track_op()))
        && [&block.ln1.0, &block.ln1.1, &block.ln2.0, &block.ln2.1].iter().all(|t| !t.track_op());
    if !(fused_ok(x) && engine_enabled() && frozen && x.rank() == 3) {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let (b, t, h) = x.dims3()?;
    let elems = b * t * h;
    let dims = block.linears.iter().map(|(w, _)| w.dims2()).collect::<candle_core::Result<Vec<_>>>()?;
    let (slots, packed) = pack_lora("encoder block", &BLOCK_LINEARS, &dims, lora)?;
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
    let probs = d_attn.map(|(p, key)| (p, key.for_rows(b * block.heads * t * t)));
    let op = BlockOp {
        qkv: (wqkv, bqkv),
        o: dense(o)?,
        inter: dense(i)?,
        out: dense(out)?,
        ln1: ResidualLayerNorm::new(block.ln1.2, d_o, elems, block.ln1.0.contiguous()?, block.ln1.1.contiguous()?),
        ln2: ResidualLayerNorm::new(block.ln2.2, d_out, elems, block.ln2.0.contiguous()?, block.ln2.1.contiguous()?),
        attn: Attention::bidirectional(block.heads, probs, key_bias.to_dtype(candle_core::DType::F32)?.contiguous()?),
        slots,
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

/// A block's LoRA matrices as one packed vector (each map's flattened A then B, in the order of
/// the maps) and where each map's sit in it; `dims[j]` is map j's weight (out, in). `None` for
/// the vector when no map has a LoRA.
pub(super) fn pack_lora(what: &str, names: &[&str], dims: &[(usize, usize)], lora: &[Option<LowRank>]) -> Result<(Vec<Option<Slot>>, Option<Tensor>)> {
    let mut parts = Vec::new();
    let mut slots = vec![None; lora.len()];
    let mut off = 0;
    for (j, l) in lora.iter().enumerate() {
        let Some((a, bm)) = l else { continue };
        let (r, in_dim) = a.dims2()?;
        let (out_dim, r2) = bm.dims2()?;
        let (w_out, w_in) = dims[j];
        if r2 != r || in_dim != w_in || out_dim != w_out {
            return Err(err(format!("{what}: LoRA on {} is A {:?}, B {:?} for a weight ({w_out}, {w_in})", names[j], a.shape(), bm.shape())).into());
        }
        slots[j] = Some(Slot { r, in_dim, out_dim, a_at: off, b_at: off + r * in_dim });
        off += r * (in_dim + out_dim);
        parts.push(a.flatten_all()?);
        parts.push(bm.flatten_all()?);
    }
    let packed = if parts.is_empty() { None } else { Some(Tensor::cat(&parts, 0)?) };
    Ok((slots, packed))
}

/// Reference implementation of [`encoder_block`]: the layer from the per-op kernels (the path a
/// layer takes without the engine).
pub fn encoder_block_composed(x: &Tensor, key_bias: &Tensor, block: &EncoderBlock, lora: &[Option<LowRank>; 6]) -> Result<Tensor> {
    let map = |j: usize, x: &Tensor| -> Result<Tensor> {
        let (w, b) = &block.linears[j];
        match &lora[j] {
            Some((a, bm)) => lora_linear(x, w, b.as_ref(), a, bm),
            None => linear(x, w, b.as_ref()),
        }
    };
    let (q, k, v) = (map(0, x)?, map(1, x)?, map(2, x)?);
    let c = attention(&q, &k, &v, key_bias, block.heads, block.dropout[0])?;
    let h1 = map(3, &c)?;
    let a = residual_layer_norm(&h1, x, &block.ln1.0, &block.ln1.1, block.ln1.2, block.dropout[1])?;
    let g = match &lora[4] {
        Some(_) => gelu(&map(4, &a)?)?,
        None => linear_gelu(&a, &block.linears[4].0, block.linears[4].1.as_ref())?,
    };
    let h2 = map(5, &g)?;
    residual_layer_norm(&h2, &a, &block.ln2.0, &block.ln2.1, block.ln2.2, block.dropout[2])
}

/// Where one map's LoRA sits in the packed vector.
#[derive(Clone, Copy)]
pub(super) struct Slot {
    r: usize,
    in_dim: usize,
    out_dim: usize,
    a_at: usize,
    b_at: usize,
}

impl Slot {
    fn a<'a>(&self, p: &'a [f32]) -> &'a [f32] {
        &p[self.a_at..self.a_at + self.r * self.in_dim]
    }
    fn b<'a>(&self, p: &'a [f32]) -> &'a [f32] {
        &p[self.b_at..self.b_at + self.out_dim * self.r]
    }

    /// Forward: `u = x Aᵀ` (rows × r, returned), then `u Bᵀ` added to the columns `col..col + out`
    /// of `y` (rows `ys` apart) — the update computed into a buffer of its own and added once, as
    /// the LoRA op does.
    pub(super) fn forward(&self, x: &[f32], p: &[f32], y: &mut [f32], ys: usize, col: usize) -> Vec<f32> {
        let _prof = timer("block-lora", "fwd");
        let Slot { r, in_dim, out_dim, .. } = *self;
        let rows = x.len() / in_dim.max(1);
        let mut u = vec![0f32; rows * r];
        gemm(Out::rm(&mut u, r), [rows, r, in_dim], Mat::rm(x, in_dim), Mat::rm_t(self.a(p), in_dim), Gemm::PARALLEL);
        let mut d = vec![0f32; rows * out_dim];
        gemm(Out::rm(&mut d, out_dim), [rows, out_dim, r], Mat::rm(&u, r), Mat::rm_t(self.b(p), r), Gemm::PARALLEL);
        y.par_chunks_mut(ys).zip(d.par_chunks(out_dim)).for_each(|(yr, dr)| {
            yr[col..col + out_dim].iter_mut().zip(dr).for_each(|(y, d)| *y += d);
        });
        u
    }

    /// Backward from `dy` (rows `ds` apart, from its first element): `dA = (dy B)ᵀ x` and
    /// `dB = dyᵀ u` into the packed gradient `dp`, and `dx += (dy B) A` when asked.
    pub(super) fn backward(&self, dy: &[f32], ds: usize, x: &[f32], u: &[f32], p: &[f32], dp: &mut [f32], dx: Option<&mut [f32]>) {
        let _prof = timer("block-lora", "bwd");
        let Slot { r, in_dim, out_dim, .. } = *self;
        let rows = x.len() / in_dim.max(1);
        let mut gu = vec![0f32; rows * r];
        gemm(Out::rm(&mut gu, r), [rows, r, out_dim], Mat::rm(dy, ds), Mat::rm(self.b(p), r), Gemm::PARALLEL);
        if let Some(dx) = dx {
            gemm(Out::rm(dx, in_dim), [rows, in_dim, r], Mat::rm(&gu, r), Mat::rm(self.a(p), in_dim), Gemm::PARALLEL.accumulate(true));
        }
        let da = &mut dp[self.a_at..self.a_at + r * in_dim];
        gemm(Out::rm(da, in_dim), [r, in_dim, rows], Mat::rm_t(&gu, r), Mat::rm(x, in_dim), Gemm::PARALLEL);
        let db = &mut dp[self.b_at..self.b_at + out_dim * r];
        gemm(Out::rm(db, r), [out_dim, r, rows], Mat::rm_t(dy, ds), Mat::rm(u, r), Gemm::PARALLEL);
    }
}

/// What the forward keeps for the backward.
struct Kept {
    /// q, k, v side by side (rows × 3h).
    qkv: Vec<f32>,
    /// The attention context (rows × h), when a LoRA on the attention output needs it.
    ctx: Option<Vec<f32>>,
    /// The attention output projection before dropout and the residual sum (rows × h).
    h1: Vec<f32>,
    /// The first norm's output: the feed-forward's input and second residual (rows × h).
    a: Vec<f32>,
    /// GELU's input (rows × i).
    pre: Vec<f32>,
    /// GELU's output (rows × i), when a LoRA on the output map needs it.
    g: Option<Vec<f32>>,
    /// The output map before dropout and the residual sum (rows × h).
    h2: Vec<f32>,
    /// Each LoRA's `x Aᵀ`.
    u: [Option<Vec<f32>>; 6],
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
    slots: Vec<Option<Slot>>,
    kept: Mutex<Option<Kept>>,
}

/// `y = x Wᵀ + b` for a frozen map into a fresh buffer.
pub(super) fn dense(x: &[f32], in_dim: usize, (w, b): &Dense) -> candle_core::Result<Vec<f32>> {
    let out_dim = w.dim(0)?;
    let rows = x.len() / in_dim.max(1);
    let mut y = vec![0f32; rows * out_dim];
    match b {
        Some(b) => with_data([w, b], |[ws, bs]| dense_into(&mut y, x, in_dim, ws, out_dim, Some(bs)))?,
        None => with_data([w], |[ws]| dense_into(&mut y, x, in_dim, ws, out_dim, None))?,
    }
    Ok(y)
}

impl BlockOp {
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
        let s = &self.slots;
        let mut u: [Option<Vec<f32>>; 6] = Default::default();
        // q, k, v side by side: each map's product into its column block (three products, not
        // one with the stacked weights, so that every number is the per-op path's — a longer
        // output row may change `gemm`'s blocking and so its rounding), then any LoRA onto it.
        let mut qkv = vec![0f32; b * t * 3 * h];
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
            if let Some(sl) = &s[j] {
                u[j] = Some(sl.forward(x, p, &mut qkv, 3 * h, j * h));
            }
        }
        let dm = self.attn.strided_dims(shape, shape, 3 * h, 3 * h)?;
        let mut c = vec![0f32; b * t * h];
        {
            let _prof = timer("attention", "fwd");
            self.attn.forward_into(&dm, &qkv, &qkv[h..], &qkv[2 * h..], &mut c)?;
        }
        let mut h1 = {
            let _prof = timer("frozen-linear", "fwd");
            dense(&c, h, &self.o)?
        };
        if let Some(sl) = &s[3] {
            u[3] = Some(sl.forward(&c, p, &mut h1, h, 0));
        }
        let mut a = vec![0f32; h1.len()];
        {
            let _prof = timer("residual-layer-norm", "fwd");
            self.ln1.forward_into(&mut a, &h1, x, h)?;
        }
        let mut pre = {
            let _prof = timer("frozen-linear", "fwd");
            dense(&a, h, &self.inter)?
        };
        let inter = self.inter.0.dim(0)?;
        if let Some(sl) = &s[4] {
            u[4] = Some(sl.forward(&a, p, &mut pre, inter, 0));
        }
        let mut g = vec![0f32; pre.len()];
        {
            let _prof = timer("gelu-erf", "fwd");
            gelu_into(&mut g, &pre);
        }
        let mut h2 = {
            let _prof = timer("frozen-linear", "fwd");
            dense(&g, inter, &self.out)?
        };
        if let Some(sl) = &s[5] {
            u[5] = Some(sl.forward(&g, p, &mut h2, h, 0));
        }
        let mut y = vec![0f32; h2.len()];
        {
            let _prof = timer("residual-layer-norm", "fwd");
            self.ln2.forward_into(&mut y, &h2, &a, h)?;
        }
        let kept = Kept { qkv, ctx: s[3].is_some().then_some(c), h1, a, pre, g: s[5].is_some().then_some(g), h2, u };
        *self.kept.lock().map_err(|_| err("encoder block: poisoned lock"))? = Some(kept);
        Ok((CpuStorage::F32(y), shape.clone()))
    }

    /// The input gradient (when `x` takes part in the graph) from the output gradient `grad`,
    /// the packed LoRA gradient into `dp` from the packed values `p`.
    fn bwd(&self, x: &Tensor, p: &[f32], dp: &mut [f32], grad: &Tensor) -> candle_core::Result<Option<Vec<f32>>> {
        let (b, t, h, inter) = self.shapes(x.shape())?;
        let rows = b * t;
        let kept = self.kept.lock().map_err(|_| err("encoder block: poisoned lock"))?;
        let k = kept.as_ref().ok_or_else(|| err("encoder block: backward without forward"))?;
        let s = &self.slots;
        let need_dx = x.track_op();
        let dx = with_data([x, grad], |[xs, dy]| {
            // Second residual norm: dh2 through its dropout, da from the residual.
            let (mut dh2, mut da) = (vec![0f32; rows * h], vec![0f32; rows * h]);
            {
                let _prof = timer("residual-layer-norm", "bwd");
                self.ln2.backward_into(&mut dh2, &mut da, &k.h2, &k.a, dy)?;
            }
            // Output map: dg = dh2 W_out (+ its LoRA).
            let mut dg = vec![0f32; rows * inter];
            {
                let _prof = timer("frozen-linear", "bwd");
                input_grad_into(&mut dg, &dh2, &self.out.0, false)?;
            }
            if let (Some(sl), Some(u), Some(g)) = (&s[5], &k.u[5], &k.g) {
                sl.backward(&dh2, h, g, u, p, dp, Some(&mut dg));
            }
            drop(dh2);
            // GELU, then the intermediate map: da += dpre W_i (+ its LoRA).
            let mut dpre = vec![0f32; rows * inter];
            {
                let _prof = timer("gelu-erf", "bwd");
                gelu_grad_into(&mut dpre, &k.pre, &dg);
            }
            drop(dg);
            if let (Some(sl), Some(u)) = (&s[4], &k.u[4]) {
                sl.backward(&dpre, inter, &k.a, u, p, dp, Some(&mut da));
            }
            {
                let _prof = timer("frozen-linear", "bwd");
                input_grad_into(&mut da, &dpre, &self.inter.0, true)?;
            }
            drop(dpre);
            // First residual norm: dh1 through its dropout, dx from the residual.
            let (mut dh1, mut dx) = (vec![0f32; rows * h], vec![0f32; rows * h]);
            {
                let _prof = timer("residual-layer-norm", "bwd");
                self.ln1.backward_into(&mut dh1, &mut dx, &k.h1, xs, &da)?;
            }
            drop(da);
            // Attention output map: dc = dh1 W_o (+ its LoRA).
            let mut dc = vec![0f32; rows * h];
            {
                let _prof = timer("frozen-linear", "bwd");
                input_grad_into(&mut dc, &dh1, &self.o.0, false)?;
            }
            if let (Some(sl), Some(u), Some(c)) = (&s[3], &k.u[3], &k.ctx) {
                sl.backward(&dh1, h, c, u, p, dp, Some(&mut dc));
            }
            drop(dh1);
            // Attention: dq, dk, dv side by side, as q, k, v were.
            let dm = self.attn.strided_dims(x.shape(), x.shape(), 3 * h, 3 * h)?;
            let mut dqkv = vec![0f32; rows * 3 * h];
            {
                let _prof = timer("attention", "bwd");
                let ptr = SyncPtr::of(&mut dqkv);
                self.attn.backward_into(&dm, &k.qkv, &k.qkv[h..], &k.qkv[2 * h..], &dc, [(ptr, 0), (ptr, h), (ptr, 2 * h)])?;
            }
            // The LoRAs on q, k, v, then dx += dqkv W_qkv (one product over 3h).
            for j in 0..3 {
                if let (Some(sl), Some(u)) = (&s[j], &k.u[j]) {
                    sl.backward(&dqkv[j * h..], 3 * h, xs, u, p, dp, need_dx.then_some(&mut dx[..]));
                }
            }
            if need_dx {
                let _prof = timer("qkv-linear", "bwd");
                input_grad_into(&mut dx, &dqkv, &self.qkv.0, true)?;
            }
            Ok(dx)
        })?;
        Ok(need_dx.then_some(dx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::cpu::testing::{check_layer, layer_lora, rand, var};
    use candle_core::Device;

    /// The engine against the per-op composition: output and every gradient (x and each LoRA
    /// matrix) within 1e-4 relative, with dropout, padding, LoRA on a subset of the maps and
    /// biases on all of them.
    fn check(lora_on: &[usize], dropout: bool, x_grad: bool) {
        let (b, t, h, heads, inter, r) = (2, 7, 16, 4, 24, 3);
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
        let mut mask = vec![1f32; b * t];
        mask[2 * t - 2..].fill(0.0);
        let bias = crate::ops::mask_to_bias(&Tensor::from_vec(mask, (b, t), &Device::Cpu).unwrap()).unwrap();
        let y1 = block_op(&x, &bias, &block, &lora).unwrap().expect("the engine applies");
        let y2 = encoder_block_composed(&x, &bias, &block, &lora).unwrap();
        // The forward is the per-op path's, to the bit.
        check_layer(&y1, &y2, &rand(&[b, t, h], 12), &xv, x_grad, &vars, &BLOCK_LINEARS);
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
        // The lowest LoRA layer: no gradient for x, only for the LoRA.
        check(&[1, 4], true, false);
        // A frozen layer above the lowest LoRA: only dx.
        check(&[], true, true);
    }
}
