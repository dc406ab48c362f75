//! The deltas a block engine ([`super::block`], [`super::decoder_block`]) computes itself on a
//! linear map, besides the frozen product: a LoRA ([`Slot`]), an (IA)³ scale of the map's input or
//! output, and a trained bias (BitFit) — and, on a layer's norms, trained weights and shifts
//! (LayerNorm tuning, BitFit). Each contributes its own forward and backward here; every trained
//! tensor enters the engine's op as a part of one packed vector, so candle routes each part of the
//! packed gradient back to its variable.

use super::cpu::{err, gemm, Gemm, Mat, Out, SyncPtr};
use super::pool;
use super::profile::timer;
use super::rng::DropoutKey;
use crate::error::Result;
use candle_core::{DType, Tensor};
use rayon::prelude::*;

/// A LoRA on a map: `a` (r, in) and `bm` (out, r), the scale folded into `bm`.
pub type LowRank = (Tensor, Tensor);

/// Where one map's LoRA sits in the packed vector — or, `dense`, its whole weight update ΔW
/// (out, in) at `a_at` (LoHa, LoKr: an expression of their factors, which candle's backward then
/// reaches; `r` = 0).
#[derive(Clone, Copy)]
pub(super) struct Slot {
    pub(super) r: usize,
    pub(super) in_dim: usize,
    pub(super) out_dim: usize,
    pub(super) a_at: usize,
    pub(super) b_at: usize,
    pub(super) dense: bool,
    /// The update's input dropout.
    pub(super) drop: Option<(f32, DropoutKey)>,
}

impl Slot {
    fn a<'a>(&self, p: &'a [f32]) -> &'a [f32] {
        &p[self.a_at..self.a_at + self.r * self.in_dim]
    }
    fn b<'a>(&self, p: &'a [f32]) -> &'a [f32] {
        &p[self.b_at..self.b_at + self.out_dim * self.r]
    }

    /// Forward: `u = x Aᵀ` (rows × r, returned), then `u Bᵀ` added onto the columns
    /// `col..col + out` of `y` (rows `ys` apart) by the product itself (it accumulates into `y`:
    /// no buffer for the update, no pass to add it). Under an input dropout `u = x' Aᵀ`, and the
    /// dropped input `x'` is returned after it.
    /// A dense update adds `x ΔWᵀ` the same way and keeps nothing (its backward reads `x`) — or,
    /// under an input dropout, adds `x' ΔWᵀ` and returns the dropped input `x'`.
    pub(super) fn forward(&self, x: &[f32], p: &[f32], y: &mut [f32], ys: usize, col: usize) -> Vec<f32> {
        let Slot { r, in_dim, out_dim, .. } = *self;
        let rows = x.len() / in_dim.max(1);
        if self.dense {
            let _prof = timer("block-dense", "fwd");
            let dw = &p[self.a_at..self.a_at + out_dim * in_dim];
            let xd = self.drop.map(|d| {
                let mut v = pool::take(x.len());
                fill_dropped(&mut v, x, d);
                v
            });
            let dst = SyncPtr::of(y);
            gemm(dst.out(col, ys), [rows, out_dim, in_dim], Mat::rm(xd.as_deref().unwrap_or(x), in_dim), Mat::rm_t(dw, in_dim), Gemm::PARALLEL.accumulate(true));
            return xd.unwrap_or_default();
        }
        let _prof = timer("block-lora", "fwd");
        // Under an input dropout the dropped input `x'` is kept after `u` (its backward reads it).
        let mut u = pool::take(rows * r + if self.drop.is_some() { x.len() } else { 0 });
        let (uu, xd) = u.split_at_mut(rows * r);
        let input = match self.drop {
            Some(d) => {
                fill_dropped(xd, x, d);
                &*xd
            }
            None => x,
        };
        gemm(Out::rm(uu, r), [rows, r, in_dim], Mat::rm(input, in_dim), Mat::rm_t(self.a(p), in_dim), Gemm::PARALLEL);
        let dst = SyncPtr::of(y);
        gemm(dst.out(col, ys), [rows, out_dim, r], Mat::rm(uu, r), Mat::rm_t(self.b(p), r), Gemm::PARALLEL.accumulate(true));
        u
    }

    /// Backward from `dy` (rows `ds` apart, from its first element): `dA = (dy B)ᵀ x` and
    /// `dB = dyᵀ u` into the packed gradient `dp`, and `dx += (dy B) A` when asked; under an input
    /// dropout `dA = (dy B)ᵀ x'` and `(dy B) A` reaches `dx` through the same mask.
    /// A dense update: `dΔW = dyᵀ x`, and `dx += dy ΔW` when asked; under an input dropout
    /// (`u` the dropped input `x'`), `dΔW = dyᵀ x'` and `dx` gets `dy ΔW` through the same mask.
    pub(super) fn backward(&self, dy: &[f32], ds: usize, x: &[f32], u: &[f32], p: &[f32], dp: &mut [f32], dx: Option<&mut [f32]>) {
        let Slot { r, in_dim, out_dim, .. } = *self;
        let rows = x.len() / in_dim.max(1);
        if self.dense {
            let _prof = timer("block-dense", "bwd");
            let at = self.a_at..self.a_at + out_dim * in_dim;
            if let Some(dx) = dx {
                let dw = Mat::rm(&p[at.clone()], in_dim);
                match self.drop {
                    None => gemm(Out::rm(dx, in_dim), [rows, in_dim, out_dim], Mat::rm(dy, ds), dw, Gemm::PARALLEL.accumulate(true)),
                    Some(d) => {
                        let mut t = pool::take(dx.len());
                        gemm(Out::rm(&mut t, in_dim), [rows, in_dim, out_dim], Mat::rm(dy, ds), dw, Gemm::PARALLEL);
                        add_dropped(dx, &t, d);
                        pool::give(t);
                    }
                }
            }
            let input = if self.drop.is_some() { u } else { x };
            gemm(Out::rm(&mut dp[at], in_dim), [out_dim, in_dim, rows], Mat::rm_t(dy, ds), Mat::rm(input, in_dim), Gemm::PARALLEL);
            return;
        }
        let _prof = timer("block-lora", "bwd");
        // Under an input dropout, `u` holds the dropped input after `x Aᵀ`.
        let (u, xd) = u.split_at(rows * r);
        let input = if self.drop.is_some() { xd } else { x };
        let mut gu = pool::take(rows * r);
        gemm(Out::rm(&mut gu, r), [rows, r, out_dim], Mat::rm(dy, ds), Mat::rm(self.b(p), r), Gemm::PARALLEL);
        if let Some(dx) = dx {
            let a = Mat::rm(self.a(p), in_dim);
            match self.drop {
                None => gemm(Out::rm(dx, in_dim), [rows, in_dim, r], Mat::rm(&gu, r), a, Gemm::PARALLEL.accumulate(true)),
                Some(d) => {
                    let mut t = pool::take(dx.len());
                    gemm(Out::rm(&mut t, in_dim), [rows, in_dim, r], Mat::rm(&gu, r), a, Gemm::PARALLEL);
                    add_dropped(dx, &t, d);
                    pool::give(t);
                }
            }
        }
        let da = &mut dp[self.a_at..self.a_at + r * in_dim];
        gemm(Out::rm(da, in_dim), [r, in_dim, rows], Mat::rm_t(&gu, r), Mat::rm(input, in_dim), Gemm::PARALLEL);
        let db = &mut dp[self.b_at..self.b_at + out_dim * r];
        gemm(Out::rm(db, r), [out_dim, r, rows], Mat::rm_t(dy, ds), Mat::rm(u, r), Gemm::PARALLEL);
        pool::give(gu);
    }
}

/// An elementwise scale over the last dimension ((IA)³): of a map's input, before its product,
/// or of its output, bias included.
#[derive(Clone, Debug)]
pub enum Scale {
    In(Tensor),
    Out(Tensor),
    /// A scale of the map's output less `base_bias` (then added back): DoRA's magnitude over the
    /// updated weight's row norms, `b₀ + l ⊙ (y − b₀)` with the LoRA of the same map inside `y`.
    Mag(Tensor, Option<Tensor>),
}

/// What an engine runs on one linear map besides its product with the frozen weight and the
/// map's bias (which may train: it is read from the map): a LoRA or a scale, at most one.
/// On a block site (an attention output, a feed-forward output) the same record carries its
/// adapter instead.
#[derive(Clone, Debug, Default)]
pub struct MapDelta {
    pub lora: Option<LowRank>,
    /// A dense weight update ΔW (out, in): `y + x ΔWᵀ` (LoHa, LoKr).
    pub dense: Option<Tensor>,
    /// The LoRA or the dense update reads the map's input under this dropout (rate, key):
    /// `y + (x' Aᵀ) Bᵀ`, `y + x' ΔWᵀ` (LoRA, VeRA, AdaLoRA, DoRA with dropout in training).
    pub input_dropout: Option<(f32, DropoutKey)>,
    pub scale: Option<Scale>,
    pub adapter: Option<Adapter>,
    /// The map's weight for this forward in place of its own (OFT's `W Rᵀ`): the caller puts it
    /// into the block's maps, where, taking part in a graph, it trains as a fine-tuned weight does.
    pub weight: Option<Tensor>,
}

impl MapDelta {
    /// Whether the site carries a LoRA, a scale or an adapter.
    pub fn is_some(&self) -> bool {
        self.lora.is_some() || self.dense.is_some() || self.scale.is_some() || self.adapter.is_some() || self.weight.is_some()
    }
}

/// The trained tensors of one engine call, flattened side by side into one vector.
#[derive(Default)]
pub(super) struct Pack {
    parts: Vec<Tensor>,
    len: usize,
}

impl Pack {
    /// Appends `t` flattened; its offset.
    fn push(&mut self, t: &Tensor) -> candle_core::Result<usize> {
        let at = self.len;
        self.len += t.elem_count();
        self.parts.push(t.flatten_all()?);
        Ok(at)
    }

    /// Appends `t` when it takes part in a graph (it trains); its offset then.
    pub(super) fn trained(&mut self, t: &Tensor) -> candle_core::Result<Option<usize>> {
        if t.track_op() {
            self.push(t).map(Some)
        } else {
            Ok(None)
        }
    }

    /// A LoRA on a map whose weight is (out, in): A then B.
    pub(super) fn lora(&mut self, what: &str, map: &str, (w_out, w_in): (usize, usize), (a, bm): &LowRank, drop: Option<(f32, DropoutKey)>) -> Result<Slot> {
        let (r, in_dim) = a.dims2()?;
        let (out_dim, r2) = bm.dims2()?;
        if r2 != r || in_dim != w_in || out_dim != w_out {
            return Err(err(format!("{what}: LoRA on {map} is A {:?}, B {:?} for a weight ({w_out}, {w_in})", a.shape(), bm.shape())).into());
        }
        let a_at = self.push(a)?;
        let b_at = self.push(bm)?;
        Ok(Slot { r, in_dim, out_dim, a_at, b_at, dense: false, drop })
    }

    /// A dense update ΔW (out, in) on a map whose weight is (out, in).
    pub(super) fn dense(&mut self, what: &str, map: &str, (w_out, w_in): (usize, usize), dw: &Tensor, drop: Option<(f32, DropoutKey)>) -> Result<Slot> {
        if dw.dims2()? != (w_out, w_in) {
            return Err(err(format!("{what}: the weight update on {map} is {:?} for a weight ({w_out}, {w_in})", dw.shape())).into());
        }
        let a_at = self.push(dw)?;
        Ok(Slot { r: 0, in_dim: w_in, out_dim: w_out, a_at, b_at: a_at, dense: true, drop })
    }

    /// The packed vector; `None` when nothing trains.
    pub(super) fn finish(self) -> Result<Option<Tensor>> {
        Ok(if self.parts.is_empty() { None } else { Some(Tensor::cat(&self.parts, 0)?) })
    }
}

/// A per-column vector an engine reads — its values — and, when it trains, where its gradient
/// goes in the packed vector.
pub(super) struct Vector {
    pub v: Vec<f32>,
    pub at: Option<usize>,
}

impl Vector {
    pub(super) fn new(t: &Tensor, pack: &mut Pack) -> Result<Self> {
        Ok(Vector { v: t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?, at: pack.trained(t)? })
    }

    /// Its gradient's place in the packed gradient, when it trains.
    pub(super) fn grad<'a>(&self, dp: &'a mut [f32]) -> Option<&'a mut [f32]> {
        self.at.map(|a| &mut dp[a..a + self.v.len()])
    }
}

/// One linear map's deltas inside an engine op.
#[derive(Default)]
pub(super) struct MapHooks {
    pub lora: Option<Slot>,
    /// An input scale (`true`) or output scale.
    pub scale: Option<(bool, Vector)>,
    /// With a magnitude scale ([`Scale::Mag`]): the bias it leaves out (zeros without one).
    pub mag_bias: Option<Vec<f32>>,
    /// Where the bias's gradient goes, when the bias trains.
    pub bias_at: Option<usize>,
    /// When the map's own weight trains (full fine-tuning): where its gradient goes in the packed
    /// vector, and the weight's (out, in).
    pub weight_at: Option<(usize, (usize, usize))>,
}

impl MapHooks {
    /// `d` on a map whose weight is (out, in) and whose bias is `bias`, packed into `pack`.
    pub(super) fn new(what: &str, map: &str, dims: (usize, usize), d: &MapDelta, bias: Option<&Tensor>, pack: &mut Pack) -> Result<Self> {
        let mag = matches!(d.scale, Some(Scale::Mag(..)));
        if mag && d.lora.is_none() {
            return Err(err(format!("{what}: a magnitude scale on {map} without its LoRA")).into());
        }
        if [d.lora.is_some(), d.dense.is_some(), d.scale.is_some() && !mag].iter().filter(|&&b| b).count() > 1 {
            return Err(err(format!("{what}: {map} carries more than one of a LoRA, a weight update and a scale")).into());
        }
        if d.adapter.is_some() {
            return Err(err(format!("{what}: an adapter on the map {map} (the engine takes adapters after a block)")).into());
        }
        if d.weight.is_some() {
            return Err(err(format!("{what}: a replacement weight for {map} left among its deltas (it belongs in the block's maps)")).into());
        }
        let lora = match (&d.lora, &d.dense) {
            (Some(l), _) => Some(pack.lora(what, map, dims, l, d.input_dropout)?),
            (None, Some(dw)) => Some(pack.dense(what, map, dims, dw, d.input_dropout)?),
            (None, None) => None,
        };
        let mut mag_bias = None;
        let scale = match &d.scale {
            None => None,
            Some(Scale::Mag(l, b0)) => {
                if l.elem_count() != dims.0 || b0.as_ref().is_some_and(|b| b.elem_count() != dims.0) {
                    return Err(err(format!("{what}: the magnitude on {map} does not match its {} outputs", dims.0)).into());
                }
                mag_bias = Some(match b0 {
                    Some(b) => b.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?,
                    None => vec![0.0; dims.0],
                });
                Some((false, Vector::new(l, pack)?))
            }
            Some(Scale::In(l)) | Some(Scale::Out(l)) => {
                let input = matches!(d.scale, Some(Scale::In(_)));
                let want = if input { dims.1 } else { dims.0 };
                if l.elem_count() != want {
                    return Err(err(format!("{what}: the scale on {map} has {} elements, the map's {} has {want}", l.elem_count(), if input { "input" } else { "output" })).into());
                }
                Some((input, Vector::new(l, pack)?))
            }
        };
        let bias_at = match bias {
            Some(b) => pack.trained(b)?,
            None => None,
        };
        Ok(MapHooks { lora, scale, mag_bias, bias_at, weight_at: None })
    }

    /// Marks the map's weight `w` as trained when it takes part in a graph (full fine-tuning):
    /// its gradient `dyᵀ x` then goes into the packed vector ([`Self::weight_grad`]). Not with an
    /// input scale (the product would read the scaled input); the caller falls back.
    pub(super) fn train_weight(&mut self, what: &str, map: &str, w: &Tensor, pack: &mut Pack) -> Result<()> {
        if let Some(at) = pack.trained(w)? {
            if self.input_scale().is_some() {
                return Err(err(format!("{what}: {map} trains its weight under an input scale")).into());
            }
            self.weight_at = Some((at, w.dims2()?));
        }
        Ok(())
    }

    /// The trained weight's gradient `dW = dyᵀ x` into `dp`: `dy` the gradient of the map's
    /// product in columns `col..` of rows `ds` apart, `x` the map's input (rows of `in`).
    pub(super) fn weight_grad(&self, dy: &[f32], ds: usize, col: usize, x: Option<&[f32]>, dp: &mut [f32]) -> candle_core::Result<()> {
        let Some((at, (out_dim, in_dim))) = self.weight_at else { return Ok(()) };
        let x = x.ok_or_else(|| err("engine: a trained weight's gradient without the map's input"))?;
        let rows = x.len() / in_dim.max(1);
        let _prof = timer("trained-weight", "bwd");
        gemm(Out::rm(&mut dp[at..at + out_dim * in_dim], in_dim), [out_dim, in_dim, rows], Mat::rm_t(&dy[col..], ds), Mat::rm(x, in_dim), Gemm::PARALLEL);
        Ok(())
    }

    /// Places the update's input dropout key for the batch's rows (`rows` of the map's input):
    /// done where the op is built, inside a data-parallel rank's rows scope, which its backward
    /// runs outside of.
    pub(super) fn place_dropout(&mut self, rows: usize) {
        if let Some(sl) = &mut self.lora {
            sl.drop = sl.drop.map(|(p, k)| (p, k.for_rows(rows * sl.in_dim)));
        }
    }

    /// Whether anything on the map trains (so the backward must reach it).
    pub(super) fn trains(&self) -> bool {
        self.lora.is_some() || self.bias_at.is_some() || self.weight_at.is_some() || self.scale.as_ref().is_some_and(|(_, v)| v.at.is_some())
    }

    /// The input scale's values, if the map has one.
    pub(super) fn input_scale(&self) -> Option<&Vector> {
        self.scale.as_ref().filter(|(input, _)| *input).map(|(_, v)| v)
    }

    /// The output scale's values, if the map has one.
    pub(super) fn output_scale(&self) -> Option<&Vector> {
        self.scale.as_ref().filter(|(input, _)| !*input).map(|(_, v)| v)
    }

    /// Whether the backward reads the map's input (a LoRA's, a trained weight's or an input
    /// scale's gradient).
    pub(super) fn needs_input(&self) -> bool {
        self.lora.is_some() || self.weight_at.is_some() || self.input_scale().is_some_and(|v| v.at.is_some())
    }

    /// The map's input as its product reads it: `l ⊙ x` under an input scale, else `None` (`x`).
    pub(super) fn scaled_input(&self, x: &[f32]) -> Option<Vec<f32>> {
        let l = &self.input_scale()?.v;
        let mut xs = x.to_vec();
        scale_columns(&mut xs, l.len(), 0, l);
        Some(xs)
    }

    /// After the map's product (and LoRA) wrote columns `col..` of `y` (rows `ys` apart): the
    /// output scale applied in place; the unscaled columns (rows × width) returned when the scale
    /// trains (its gradient reads them).
    pub(super) fn scale_output(&self, y: &mut [f32], ys: usize, col: usize) -> Option<Vec<f32>> {
        let l = self.output_scale()?;
        let n = l.v.len();
        // A magnitude scale leaves its bias out: the columns less it first (added back below).
        if let Some(b0) = &self.mag_bias {
            y.par_chunks_mut(ys).for_each(|r| r[col..col + n].iter_mut().zip(b0).for_each(|(v, b)| *v -= b));
        }
        let kept = l.at.map(|_| {
            let mut y0 = pool::take(y.len() / ys * n);
            y0.par_chunks_mut(n.max(1)).zip(y.par_chunks(ys)).for_each(|(o, r)| o.copy_from_slice(&r[col..col + n]));
            y0
        });
        scale_columns(y, ys, col, &l.v);
        if let Some(b0) = &self.mag_bias {
            y.par_chunks_mut(ys).for_each(|r| r[col..col + n].iter_mut().zip(b0).for_each(|(v, b)| *v += b));
        }
        kept
    }

    /// Backward at the map's output: `dy` holds the gradient of the (scaled) output in columns
    /// `col..` (rows `ys` apart); the scale's gradient (`Σ dy ⊙ y0`) goes into `dp` and `dy` is
    /// scaled in place to the gradient of the product; then the bias's gradient (`Σ dy`).
    pub(super) fn output_grads(&self, dy: &mut [f32], ys: usize, col: usize, width: usize, y0: Option<&[f32]>, dp: &mut [f32]) -> candle_core::Result<()> {
        if let Some(l) = self.output_scale() {
            if let Some(g) = l.grad(dp) {
                let y0 = y0.ok_or_else(|| err("engine: an output scale's gradient without the unscaled output"))?;
                column_sums_into(g, dy, ys, col, Some((y0, width)));
            }
            scale_columns(dy, ys, col, &l.v);
        }
        if let Some(at) = self.bias_at {
            column_sums_into(&mut dp[at..at + width], dy, ys, col, None);
        }
        Ok(())
    }

    /// [`Self::output_grads`] on a map whose output gradient `dy` (rows of `width`) must stay as
    /// it is (a residual stream's): `dy` itself without an output scale, else a scaled copy.
    pub(super) fn output_grads_of<'a>(&self, dy: &'a [f32], width: usize, y0: Option<&[f32]>, dp: &mut [f32]) -> candle_core::Result<std::borrow::Cow<'a, [f32]>> {
        if self.output_scale().is_none() {
            if let Some(at) = self.bias_at {
                column_sums_into(&mut dp[at..at + width], dy, width, 0, None);
            }
            return Ok(std::borrow::Cow::Borrowed(dy));
        }
        let mut d = dy.to_vec();
        self.output_grads(&mut d, width, 0, width, y0, dp)?;
        Ok(std::borrow::Cow::Owned(d))
    }

    /// The input gradient through the map: `prod(buf, accumulate)` writes (or adds) `dy W` into
    /// `buf`. Without an input scale that is `dx` itself; with one, `t = dy W` goes into a buffer of
    /// its own, the scale's gradient `Σ t ⊙ x` into `dp` (`x` the map's unscaled input), and
    /// `t ⊙ l` into (or onto) `dx`.
    pub(super) fn input_grad(
        &self,
        dx: &mut [f32],
        accumulate: bool,
        x: Option<&[f32]>,
        dp: &mut [f32],
        prod: impl FnOnce(&mut [f32], bool) -> candle_core::Result<()>,
    ) -> candle_core::Result<()> {
        let Some(l) = self.input_scale() else { return prod(dx, accumulate) };
        let n = l.v.len();
        let mut t = vec![0f32; dx.len()];
        prod(&mut t, false)?;
        if let Some(g) = l.grad(dp) {
            let x = x.ok_or_else(|| err("engine: an input scale's gradient without the map's input"))?;
            column_sums_into(g, &t, n, 0, Some((x, n)));
        }
        dx.par_chunks_mut(n).zip(t.par_chunks(n)).for_each(|(d, t)| {
            for ((d, &t), &s) in d.iter_mut().zip(t).zip(&l.v) {
                if accumulate {
                    *d += t * s;
                } else {
                    *d = t * s;
                }
            }
        });
        Ok(())
    }
}

/// Columns `col..col + l.len()` of every row of `y` (rows `ys` apart) times `l`.
pub(super) fn scale_columns(y: &mut [f32], ys: usize, col: usize, l: &[f32]) {
    y.par_chunks_mut(ys.max(1)).for_each(|r| r[col..col + l.len()].iter_mut().zip(l).for_each(|(v, s)| *v *= s));
}

/// `out += Σ_rows a[r, col..col + n]` (⊙ `b[r, ..n]` when given, rows of `b` `bs` apart), `n` the
/// length of `out`, `a`'s rows `as_` apart. Partial sums over blocks of rows, added in order.
pub(super) fn column_sums_into(out: &mut [f32], a: &[f32], as_: usize, col: usize, b: Option<(&[f32], usize)>) {
    let n = out.len();
    let rows = a.len().div_ceil(as_.max(1));
    const BLOCK: usize = 64;
    let partials: Vec<Vec<f32>> = (0..rows.div_ceil(BLOCK))
        .into_par_iter()
        .map(|blk| {
            let mut p = vec![0f32; n];
            for r in blk * BLOCK..((blk + 1) * BLOCK).min(rows) {
                let ar = &a[r * as_ + col..r * as_ + col + n];
                match b {
                    Some((b, bs)) => p.iter_mut().zip(ar).zip(&b[r * bs..r * bs + n]).for_each(|((p, x), y)| *p += x * y),
                    None => p.iter_mut().zip(ar).for_each(|(p, x)| *p += x),
                }
            }
            p
        })
        .collect();
    for p in partials {
        out.iter_mut().zip(&p).for_each(|(o, v)| *o += v);
    }
}

/// √(2/π), the tanh approximation's constant.
const GELU_C: f32 = 0.797_884_6;

/// A bottleneck adapter's non-linearity, as the engines compute it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    Relu,
    /// Exact (erf) GELU.
    Gelu,
    /// tanh-approximated GELU (`gelu_new`).
    GeluTanh,
    Silu,
    Tanh,
    Identity,
}

impl Act {
    /// The activation of `p` into `z`.
    fn apply(self, z: &mut [f32], p: &[f32]) {
        match self {
            Act::Gelu => super::activation::gelu_into(z, p),
            _ => z.par_iter_mut().zip(p.par_iter()).for_each(|(z, &v)| {
                *z = match self {
                    Act::Relu => v.max(0.0),
                    Act::GeluTanh => 0.5 * v * (1.0 + (GELU_C * v * (1.0 + 0.044715 * v * v)).tanh()),
                    Act::Silu => v / (1.0 + (-v).exp()),
                    Act::Tanh => v.tanh(),
                    _ => v,
                }
            }),
        }
    }

    /// The gradient at the pre-activation `p` from the activation's gradient `g` into `d`; `z`
    /// is the activation (tanh's derivative reads it).
    fn grad(self, d: &mut [f32], p: &[f32], z: &[f32], g: &[f32]) {
        match self {
            Act::Gelu => super::activation::gelu_grad_into(d, p, g),
            _ => d.par_iter_mut().zip(p.par_iter().zip(z.par_iter()).zip(g.par_iter())).for_each(|(d, ((&v, &z), &g))| {
                *d = match self {
                    Act::Relu => {
                        if v > 0.0 {
                            g
                        } else {
                            0.0
                        }
                    }
                    Act::GeluTanh => {
                        let t = (GELU_C * v * (1.0 + 0.044715 * v * v)).tanh();
                        g * (0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * GELU_C * (1.0 + 3.0 * 0.044715 * v * v))
                    }
                    Act::Silu => {
                        let s = 1.0 / (1.0 + (-v).exp());
                        g * s * (1.0 + v * (1.0 - s))
                    }
                    Act::Tanh => g * (1.0 - z * z),
                    _ => g,
                }
            }),
        }
    }

    /// The same activation as candle ops (the composed reference).
    fn tensor(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Act::Relu => x.relu()?,
            Act::Gelu => super::activation::gelu(x)?,
            Act::GeluTanh => super::activation::gelu_tanh(x)?,
            Act::Silu => x.silu()?,
            Act::Tanh => x.tanh()?,
            Act::Identity => x.clone(),
        })
    }
}

/// A bottleneck adapter after a sublayer (a block's attention output or feed-forward output):
/// `y + up(act(down(src)))` before the residual sum, `src` the sublayer's output (sequential:
/// Houlsby, Pfeiffer) or its input (parallel). `down` (m, h) and `up` (h, m) with their biases;
/// a scaling and a search gate are folded into `up`. Low-rank and PHM projections (the low-rank
/// adapter, Compacter) enter as their dense matrices.
#[derive(Clone, Debug)]
pub struct Adapter {
    pub down: (Tensor, Tensor),
    pub up: (Tensor, Tensor),
    pub act: Act,
    pub parallel: bool,
}

impl Adapter {
    /// The composed reference: `y + up(act(down(src)))` from candle ops and the per-op kernels.
    pub fn composed(&self, y: &Tensor, input: &Tensor) -> Result<Tensor> {
        let src = if self.parallel { input } else { y };
        let z = self.act.tensor(&super::linear::linear(src, &self.down.0, Some(&self.down.1))?)?;
        Ok((y + super::linear::linear(&z, &self.up.0, Some(&self.up.1))?)?)
    }
}

/// An adapter inside an engine op: its matrices' values and where their gradients go.
pub(super) struct AdapterHook {
    m: usize,
    h: usize,
    act: Act,
    pub parallel: bool,
    wd: Vector,
    bd: Vector,
    wu: Vector,
    bu: Vector,
}

/// What an adapter's forward keeps: the bottleneck's pre-activation and activation, and the
/// sequential adapter's input (the parallel one reads the sublayer's input, which the engine
/// keeps anyway).
pub(super) struct AdapterKept {
    p1: Vec<f32>,
    z: Vec<f32>,
    pub src: Option<Vec<f32>>,
}

impl AdapterHook {
    pub(super) fn new(what: &str, a: &Adapter, h: usize, pack: &mut Pack) -> Result<Self> {
        let (m, hd) = a.down.0.dims2()?;
        let ok = hd == h && a.up.0.dims2()? == (h, m) && a.down.1.elem_count() == m && a.up.1.elem_count() == h;
        if !ok {
            return Err(err(format!("{what}: an adapter of down {:?}, up {:?} on a hidden size of {h}", a.down.0.shape(), a.up.0.shape())).into());
        }
        let mut v = |t: &Tensor| Vector::new(t, pack);
        Ok(AdapterHook { m, h, act: a.act, parallel: a.parallel, wd: v(&a.down.0)?, bd: v(&a.down.1)?, wu: v(&a.up.0)?, bu: v(&a.up.1)? })
    }

    /// Whether anything in it trains.
    pub(super) fn trains(&self) -> bool {
        [&self.wd, &self.bd, &self.wu, &self.bu].iter().any(|v| v.at.is_some())
    }

    /// `y += up(act(down(src)))` over rows of `h`; a sequential adapter's caller keeps `src` in
    /// the result's `src` for the backward.
    pub(super) fn forward(&self, y: &mut [f32], src: &[f32]) -> AdapterKept {
        let _prof = timer("block-adapter", "fwd");
        let (m, h) = (self.m, self.h);
        let rows = src.len() / h;
        let mut p1 = vec![0f32; rows * m];
        p1.par_chunks_mut(m).for_each(|r| r.copy_from_slice(&self.bd.v));
        gemm(Out::rm(&mut p1, m), [rows, m, h], Mat::rm(src, h), Mat::rm_t(&self.wd.v, h), Gemm::PARALLEL.accumulate(true));
        let mut z = vec![0f32; rows * m];
        self.act.apply(&mut z, &p1);
        let mut o = vec![0f32; rows * h];
        o.par_chunks_mut(h).for_each(|r| r.copy_from_slice(&self.bu.v));
        gemm(Out::rm(&mut o, h), [rows, h, m], Mat::rm(&z, m), Mat::rm_t(&self.wu.v, m), Gemm::PARALLEL.accumulate(true));
        y.par_iter_mut().zip(o.par_iter()).for_each(|(y, o)| *y += o);
        AdapterKept { p1, z, src: None }
    }

    /// From the gradient `dout` of the adapter's output: its matrices' gradients into `dp` and the
    /// gradient of its input `src`, returned.
    pub(super) fn backward(&self, dout: &[f32], src: &[f32], k: &AdapterKept, dp: &mut [f32]) -> Vec<f32> {
        let _prof = timer("block-adapter", "bwd");
        let (m, h) = (self.m, self.h);
        let rows = dout.len() / h;
        if let Some(g) = self.bu.grad(dp) {
            column_sums_into(g, dout, h, 0, None);
        }
        if let Some(g) = self.wu.grad(dp) {
            gemm(Out::rm(g, m), [h, m, rows], Mat::rm_t(dout, h), Mat::rm(&k.z, m), Gemm::PARALLEL);
        }
        let mut dz = vec![0f32; rows * m];
        gemm(Out::rm(&mut dz, m), [rows, m, h], Mat::rm(dout, h), Mat::rm(&self.wu.v, m), Gemm::PARALLEL);
        let mut dp1 = vec![0f32; rows * m];
        self.act.grad(&mut dp1, &k.p1, &k.z, &dz);
        drop(dz);
        if let Some(g) = self.bd.grad(dp) {
            column_sums_into(g, &dp1, m, 0, None);
        }
        if let Some(g) = self.wd.grad(dp) {
            gemm(Out::rm(g, h), [m, h, rows], Mat::rm_t(&dp1, m), Mat::rm(src, h), Gemm::PARALLEL);
        }
        let mut dsrc = vec![0f32; rows * h];
        gemm(Out::rm(&mut dsrc, h), [rows, h, m], Mat::rm(&dp1, m), Mat::rm(&self.wd.v, h), Gemm::PARALLEL);
        dsrc
    }
}

/// Inverted dropout of `x` by `key` (keyed for the rows of `x`, as [`super::dropout::dropout`]
/// keys it), into a fresh buffer; the same mask applied to a gradient is its backward.
/// `x` under the dropout `(p, key)` into `out` (of `x`'s length); `key` already placed for the
/// batch's rows ([`MapHooks::place_dropout`]).
fn fill_dropped(out: &mut [f32], x: &[f32], (p, key): (f32, DropoutKey)) {
    out.par_iter_mut().zip(x.par_iter()).enumerate().for_each(|(i, (o, &v))| *o = super::dropout::masked(key, p, i as u64, v));
}

/// `dx += t` through the dropout `(p, key)`'s mask (the backward of [`fill_dropped`]).
fn add_dropped(dx: &mut [f32], t: &[f32], (p, key): (f32, DropoutKey)) {
    dx.par_iter_mut().zip(t.par_iter()).enumerate().for_each(|(i, (o, &v))| *o += super::dropout::masked(key, p, i as u64, v));
}

/// `x` under the dropout `drop`, its key already placed for the batch's rows
/// ([`super::rng::DropoutKey::for_rows`] where the op is built: a data-parallel rank's backward
/// runs outside its rows' scope).
pub(super) fn dropped(x: &[f32], drop: Option<(f32, super::rng::DropoutKey)>) -> Vec<f32> {
    match drop.filter(|(p, _)| *p > 0.0) {
        None => x.to_vec(),
        Some(d) => {
            let mut out = vec![0f32; x.len()];
            fill_dropped(&mut out, x, d);
            out
        }
    }
}

/// Prefix keys and values (b, n, w) each (prefix tuning), which the attention reads before the
/// sequence's, and where their gradients go.
pub(super) struct Prefix {
    pub n: usize,
    w: usize,
    k: Vector,
    v: Vector,
}

impl Prefix {
    pub(super) fn new(pk: &Tensor, pv: &Tensor, pack: &mut Pack) -> Result<Self> {
        let (_, n, w) = pk.dims3()?;
        Ok(Prefix { n, w, k: Vector::new(pk, pack)?, v: Vector::new(pv, pack)? })
    }

    /// Whether its keys or values train.
    pub(super) fn trains(&self) -> bool {
        self.k.at.is_some() || self.v.at.is_some()
    }

    /// The attention's keys and values, k and v side by side (rows of 2w): per batch row, the
    /// prefix's n rows, then the sequence's t rows read from the q, k, v buffer (rows of `qs`,
    /// k at column `k_col`, v right after it).
    pub(super) fn keys_values(&self, qkv: &[f32], qs: usize, k_col: usize, b: usize, t: usize) -> Vec<f32> {
        let (n, w) = (self.n, self.w);
        let mut kv = pool::take(b * (n + t) * 2 * w);
        kv.par_chunks_mut((n + t) * 2 * w).enumerate().for_each(|(bi, rows)| {
            for (r, row) in rows.chunks_mut(2 * w).enumerate() {
                if r < n {
                    let at = (bi * n + r) * w;
                    row[..w].copy_from_slice(&self.k.v[at..at + w]);
                    row[w..].copy_from_slice(&self.v.v[at..at + w]);
                } else {
                    let at = (bi * t + r - n) * qs + k_col;
                    row.copy_from_slice(&qkv[at..at + 2 * w]);
                }
            }
        });
        kv
    }

    /// The gradient of [`Self::keys_values`]'s buffer split: the prefix's rows into the packed
    /// gradient (where they train), the sequence's into the k and v columns of `dqkv`.
    pub(super) fn split_grads(&self, dkv: &[f32], dqkv: &mut [f32], qs: usize, k_col: usize, dp: &mut [f32], b: usize, t: usize) {
        let (n, w) = (self.n, self.w);
        for (bi, rows) in dkv.chunks((n + t) * 2 * w).enumerate().take(b) {
            for (r, row) in rows.chunks(2 * w).enumerate() {
                if r < n {
                    let at = (bi * n + r) * w;
                    for (vec, part) in [(&self.k, &row[..w]), (&self.v, &row[w..])] {
                        if let Some(g) = vec.grad(dp) {
                            g[at..at + w].copy_from_slice(part);
                        }
                    }
                } else {
                    let at = (bi * t + r - n) * qs + k_col;
                    dqkv[at..at + 2 * w].copy_from_slice(row);
                }
            }
        }
    }
}
