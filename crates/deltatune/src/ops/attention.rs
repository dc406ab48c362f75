//! Multi-head scaled dot-product attention, bidirectional (encoders, with dropout on the
//! probabilities) and causal (decoders, with cached keys): one composition, one fused op.

use super::cpu::{
    add_max_lanes, dot_lanes, err, exp_sum_lanes, fused_ok, gemm, grad_for, slice, with_data, Fwd, Gemm, Grads3, Mat, Out,
    SyncPtr,
};
use super::dropout::{dropout_composed, masked};
use super::head_gemm::{self, W};
use super::profile::timer;
use super::rng::DropoutKey;
use crate::error::Result;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

/// Multi-head scaled dot-product attention.
///
/// # Shapes
/// `q`: (b, tq, h); `k`, `v`: (b, tk, h) with heads laid out contiguously along `h`
/// (`h = heads * d`); `key_bias`: (b, tk) additive mask (0 for keys to attend, a large negative
/// number for padding). Returns (b, tq, h).
/// `probs_dropout` applies dropout to the attention probabilities (training only).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_bias: &Tensor,
    heads: usize,
    probs_dropout: Option<(f32, DropoutKey)>,
) -> Result<Tensor> {
    Mode { heads, dropout: probs_for_rows(probs_dropout, q, k, heads)?, causal: false }.run(q, k, v, key_bias)
}

/// The probabilities' dropout key for the rows of a shard (see [`super::rng::in_batch_rows`]):
/// the probabilities are (b, heads, tq, tk), batch-major.
fn probs_for_rows(d: Option<(f32, DropoutKey)>, q: &Tensor, k: &Tensor, heads: usize) -> Result<Option<(f32, DropoutKey)>> {
    Ok(match d {
        Some((p, key)) => {
            let (b, tq, _) = q.dims3()?;
            let tk = k.dim(1)?;
            Some((p, key.for_rows(b * heads * tq * tk)))
        }
        None => None,
    })
}

/// Causal multi-head attention (decoders): like [`attention`], with query i (of the last tq
/// positions of tk) attending keys 0..=tk − tq + i only.
///
/// Grouped-query attention: `k` and `v` may have fewer heads than `q` (`kv_heads · d` columns, `d`
/// = h / heads); each key/value head then serves `heads / kv_heads` consecutive query heads, read
/// in place (nothing is expanded or copied), and its gradient sums theirs.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, key_bias: &Tensor, heads: usize) -> Result<Tensor> {
    Mode { heads, dropout: None, causal: true }.run(q, k, v, key_bias)
}

/// Reference implementation of [`attention`] from candle ops.
pub fn attention_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_bias: &Tensor,
    heads: usize,
    probs_dropout: Option<(f32, DropoutKey)>,
) -> Result<Tensor> {
    Mode { heads, dropout: probs_for_rows(probs_dropout, q, k, heads)?, causal: false }.composed(q, k, v, key_bias)
}

/// Reference implementation of [`causal_attention`] from candle ops.
pub fn causal_attention_composed(q: &Tensor, k: &Tensor, v: &Tensor, key_bias: &Tensor, heads: usize) -> Result<Tensor> {
    Mode { heads, dropout: None, causal: true }.composed(q, k, v, key_bias)
}

/// Keys or values (b, t, kv_heads · d) repeated to (b, t, h): each key/value head once per query
/// head of its group (the composition's grouped-query attention; the fused op reads them in place).
fn expand_kv(x: &Tensor, h: usize, d: usize) -> Result<Tensor> {
    let (b, t, hk) = x.dims3()?;
    if hk == h || d == 0 || hk % d != 0 || h % hk != 0 {
        return Ok(x.clone()); // equal, or a shape error the attention reports
    }
    let (nkv, rep) = (hk / d, h / hk);
    Ok(x.reshape((b, t, nkv, 1, d))?.expand((b, t, nkv, rep, d))?.reshape((b, t, h))?)
}

/// Softmax over the last dimension from differentiable ops (max-subtracted for stability).
pub fn softmax_composed(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// Additive attention bias from a 0/1 mask: 0 where `mask` is 1, `f32::MIN` where it is 0
/// (what transformers uses, so fully-masked rows behave the same).
pub fn mask_to_bias(mask: &Tensor) -> Result<Tensor> {
    let m = mask.to_dtype(DType::F32)?;
    Ok(((m - 1.0)? * -(f32::MIN as f64))?)
}

/// What distinguishes the attention variants.
#[derive(Clone, Copy)]
struct Mode {
    heads: usize,
    /// Dropout on the probabilities (rate, key); none or a rate of 0 for none.
    dropout: Option<(f32, DropoutKey)>,
    /// Query i sees keys 0..=past + i only (`past` = tk − tq cached keys).
    causal: bool,
}

impl Mode {
    fn run(self, q: &Tensor, k: &Tensor, v: &Tensor, key_bias: &Tensor) -> Result<Tensor> {
        if fused_ok(q) {
            return self.fused(q, k, v, key_bias);
        }
        self.composed(q, k, v, key_bias)
    }

    /// `softmax(q k^T / sqrt(d) + bias [+ causal mask]) v` per head, from candle ops.
    fn composed(self, q: &Tensor, k: &Tensor, v: &Tensor, key_bias: &Tensor) -> Result<Tensor> {
        let (b, tq, h) = q.dims3()?;
        let tk = k.dim(1)?;
        let heads = self.heads;
        let d = h / heads;
        let (k, v) = (&expand_kv(k, h, d)?, &expand_kv(v, h, d)?);
        let split = |t: &Tensor, len: usize| -> Result<Tensor> {
            Ok(t.reshape((b, len, heads, d))?.transpose(1, 2)?.contiguous()?) // (b, heads, t, d)
        };
        let (qh, kh, vh) = (split(q, tq)?, split(k, tk)?, split(v, tk)?);
        let scale = 1.0 / (d as f64).sqrt();
        let scores = (qh.matmul(&kh.t()?)? * scale)?; // (b, heads, tq, tk)
        let mut scores = scores.broadcast_add(&key_bias.reshape((b, 1, 1, tk))?)?;
        if self.causal {
            let past = tk - tq;
            let causal: Vec<f32> =
                (0..tq).flat_map(|i| (0..tk).map(move |j| if j <= past + i { 0.0 } else { f32::NEG_INFINITY })).collect();
            scores = scores.broadcast_add(&Tensor::from_vec(causal, (1, 1, tq, tk), q.device())?)?;
        }
        let probs = softmax_composed(&scores)?;
        let probs = match self.dropout {
            Some((p, key)) if p > 0.0 => dropout_composed(&probs, p, key)?,
            _ => probs,
        };
        let ctx = probs.matmul(&vh)?; // (b, heads, tq, d)
        Ok(ctx.transpose(1, 2)?.reshape((b, tq, h))?)
    }

    fn fused(self, q: &Tensor, k: &Tensor, v: &Tensor, key_bias: &Tensor) -> Result<Tensor> {
        let op = Attention {
            mode: Mode { dropout: self.dropout.filter(|(p, _)| *p > 0.0), ..self },
            key_bias: key_bias.to_dtype(DType::F32)?.contiguous()?,
        };
        Ok(q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
    }
}

// ------------------------------------------------------------------------------------------------
// The fused op: softmax(q k^T / sqrt(d) + bias) v, heads interleaved along h. The probabilities
// are recomputed in backward instead of stored (memory over a few % of FLOPs).

/// Query rows (and keys) per block of a causal attention's products: small enough that little of
/// the upper triangle is computed, large enough for full-width matrix kernels.
const CAUSAL_BLOCK: usize = 64;
/// Rows per block of a head's products on the head kernel: two of its 12-row tiles.
const HEAD_BLOCK: usize = 24;

pub(super) struct Attention {
    mode: Mode,
    key_bias: Tensor, // (b, tk)
}

/// Sizes of one call; a query head's block of q starts at `q_at` with row stride h, the block of k
/// and v it reads at `kv_at` with row stride hk (= h, or kv_heads · d for grouped-query attention,
/// query head hi reading key/value head hi / rep).
///
/// q, k and v may be column blocks of wider rows (a block's fused QKV projection): `qs` and `kvs`
/// are their row strides (`h` and `hk` for tensors of their own). The output and its gradient
/// always have row stride `h`.
///
/// `fast`: the head's products run on the register-blocked kernel ([`head_gemm`]; d a multiple
/// of 16), which reads a head's keys and values transposed into scratch rows of `pw` (tk rounded
/// up to 16, zero past tk). The probabilities and their gradient have rows of `pw` elements
/// (= tk without the kernel).
pub(super) struct AttnDims {
    b: usize,
    tq: usize,
    tk: usize,
    h: usize,
    hk: usize,
    d: usize,
    rep: usize,
    qs: usize,
    kvs: usize,
    pw: usize,
    fast: bool,
}

impl AttnDims {
    fn q_at(&self, bi: usize, hi: usize) -> usize {
        bi * self.tq * self.qs + hi * self.d
    }
    fn kv_at(&self, bi: usize, hi: usize) -> usize {
        bi * self.tk * self.kvs + (hi / self.rep) * self.d
    }
    /// Cached keys before the first query (a causal query i sees keys 0..=past + i).
    fn past(&self) -> usize {
        self.tk.saturating_sub(self.tq)
    }
    /// Where head `hi` of batch row `bi` starts in the output (and its gradient).
    fn out_at(&self, bi: usize, hi: usize) -> usize {
        bi * self.tq * self.h + hi * self.d
    }
    /// Rows per block of a head's products over `n` rows: with the kernel, [`HEAD_BLOCK`] (each
    /// block's probabilities are finished while in the nearest cache; causally, less of the
    /// upper triangle is computed); on `gemm`, [`CAUSAL_BLOCK`] causally, else all rows at once.
    fn block(&self, causal: bool, n: usize) -> usize {
        match (self.fast, causal) {
            (true, _) => HEAD_BLOCK,
            (false, true) => CAUSAL_BLOCK,
            (false, false) => n.max(1),
        }
    }
    /// Columns a product over keys computes for rows that see `kmax` keys: those keys, rounded up
    /// to whole vectors for the head kernel (at most `pw`).
    fn cols(&self, kmax: usize) -> usize {
        if self.fast {
            kmax.next_multiple_of(W)
        } else {
            kmax
        }
    }
    /// A task's scratch: probabilities, their gradient, the dropped probabilities (tq × pw
    /// each); one head's q, k, v and output gradient copied out of their wide rows (t × d each),
    /// and its keys and values transposed (d × pw each, with the kernel only).
    fn scratch(&self) -> Scratch {
        let (p, t) = (self.tq * self.pw, if self.fast { self.d * self.pw } else { 0 });
        let (q, k) = (self.tq * self.d, self.tk * self.d);
        let v = vec![0.0; p];
        Scratch { p: v.clone(), dp: v.clone(), pd: v, kt: vec![0.0; t], vt: vec![0.0; t], qh: vec![0.0; q], gh: vec![0.0; q], kh: vec![0.0; k], vh: vec![0.0; k] }
    }
    /// Copies the (rows × d) block of a head starting at `at` of `src` (rows `stride` apart) into
    /// `dst` (contiguous rows of d): the products then read rows next to each other rather than
    /// rows a whole projection apart (whose power-of-two strides map onto a few cache sets).
    fn pack_head(&self, src: &[f32], at: usize, stride: usize, dst: &mut [f32]) {
        let d = self.d;
        for (i, row) in dst.chunks_mut(d).enumerate() {
            let src = &src[at + i * stride..at + i * stride + d];
            if d.is_multiple_of(W) {
                // Vector by vector (fixed-size copies inline; a `memmove` call per row of 32
                // floats cost more than the copy).
                for (o, x) in row.chunks_exact_mut(W).zip(src.chunks_exact(W)) {
                    if let (Ok(o), Ok(x)) = (<&mut [f32; W]>::try_from(o), <&[f32; W]>::try_from(x)) {
                        *o = *x;
                    }
                }
            } else {
                row.copy_from_slice(src);
            }
        }
    }
    /// A packed (tk × d) head transposed into `dst` (d rows of pw, zero past tk).
    fn transpose_head(&self, src: &[f32], dst: &mut [f32]) {
        let (tk, pw, d) = (self.tk, self.pw, self.d);
        for (c, row) in dst.chunks_mut(pw).enumerate() {
            for (j, v) in row[..tk].iter_mut().enumerate() {
                *v = src[j * d + c];
            }
            row[tk..].fill(0.0);
        }
    }
    /// `dst = [dst +] lhs (m × k) · rhs (k × n)ᵀ-source · scale` for the products over keys
    /// (scores, dP'): `rhs` a packed head (tk × d) read transposed by `gemm`, or its transposed
    /// copy `rhs_t` (d × pw) on the kernel, which computes whole vectors of columns.
    fn prod_keys(&self, dst: Out, [m, kmax]: [usize; 2], lhs: Mat, rhs: &[f32], rhs_t: &[f32], how: Gemm) {
        if self.fast {
            head_gemm::head_gemm(dst, [m, self.cols(kmax), self.d], lhs, Mat::rm(rhs_t, self.pw), how)
        } else {
            gemm(dst, [m, kmax, self.d], lhs, Mat::rm_t(rhs, self.d), how)
        }
    }
    /// `dst = [dst +] lhs · rhs · scale` on the head kernel when it runs and fits, else `gemm`.
    fn prod(&self, dst: Out, mnk: [usize; 3], lhs: Mat, rhs: Mat, how: Gemm) {
        if self.fast && head_gemm::fits(mnk[1], &rhs) {
            head_gemm::head_gemm(dst, mnk, lhs, rhs, how)
        } else {
            gemm(dst, mnk, lhs, rhs, how)
        }
    }
}

struct Scratch {
    p: Vec<f32>,
    dp: Vec<f32>,
    pd: Vec<f32>,
    kt: Vec<f32>,
    vt: Vec<f32>,
    qh: Vec<f32>,
    gh: Vec<f32>,
    kh: Vec<f32>,
    vh: Vec<f32>,
}

impl Attention {
    /// Softmax probabilities for one (batch, head) into `p` (tq rows of pw) from the head's
    /// packed q (tq × d) and k (tk × d) and, with the kernel, transposed keys `kt`.
    #[allow(clippy::too_many_arguments)]
    fn probs(&self, dm: &AttnDims, qh: &[f32], kh: &[f32], kt: &[f32], bias: &[f32], bi: usize, p: &mut [f32]) {
        let AttnDims { tk, d, pw, .. } = *dm;
        let scale = 1.0 / (d as f32).sqrt();
        let brow = &bias[bi * tk..(bi + 1) * tk];
        // Causal: each block of query rows against the keys its last row sees (the rest of its
        // rows is filled with 0 below). Each block's rows are normalised right after their
        // product, while they are in the nearest cache.
        for (r0, r1, kmax) in self.query_blocks(dm) {
            let o = Out::rm(&mut p[r0 * pw..], pw);
            dm.prod_keys(o, [r1 - r0, kmax], Mat::rm(&qh[r0 * d..], d), kh, kt, Gemm::SERIAL.scaled(scale));
            for (qi, row) in (r0..r1).zip(p[r0 * pw..r1 * pw].chunks_mut(pw)) {
                // Causal rows stop at their own position; later keys get probability 0.
                let (row, later) = row.split_at_mut(self.seen(dm, qi));
                later.fill(0.0);
                let max = add_max_lanes(row, brow);
                let inv = 1.0 / exp_sum_lanes(row, max);
                for v in row.iter_mut() {
                    *v *= inv;
                }
            }
        }
    }

    /// How many keys query row `qi` sees: all of them, or (causal) those up to its own position.
    fn seen(&self, dm: &AttnDims, qi: usize) -> usize {
        if self.mode.causal {
            (dm.past() + qi + 1).min(dm.tk)
        } else {
            dm.tk
        }
    }

    /// Blocks of query rows (r0, r1, keys the block's rows see at most): one block of all rows
    /// bidirectionally; causally, blocks of [`CAUSAL_BLOCK`] rows, each taking the products over
    /// the keys its last row sees only, so that the upper triangle (about half of each product)
    /// is not computed.
    fn query_blocks<'a>(&'a self, dm: &'a AttnDims) -> impl Iterator<Item = (usize, usize, usize)> + 'a {
        let step = dm.block(self.mode.causal, dm.tq);
        (0..dm.tq).step_by(step).map(move |r0| {
            let r1 = (r0 + step).min(dm.tq);
            (r0, r1, self.seen(dm, r1 - 1))
        })
    }

    /// Blocks of keys (c0, c1, first query row that sees any of them): the products whose output
    /// rows are keys (dK, dV) over the query rows that see the block only.
    fn key_blocks(&self, dm: &AttnDims) -> impl Iterator<Item = (usize, usize, usize)> {
        let causal = self.mode.causal;
        let step = dm.block(causal, dm.tk);
        let (tq, tk, past) = (dm.tq, dm.tk, dm.past());
        (0..tk).step_by(step).map(move |c0| {
            // Query row qi sees key c0 from past + qi >= c0 on.
            let qmin = if causal { c0.saturating_sub(past).min(tq.saturating_sub(1)) } else { 0 };
            (c0, (c0 + step).min(tk), qmin)
        })
    }

    /// Dropout on rows r0..r1 of one (batch, head)'s probabilities `p` (rows of pw; element
    /// (i, j) is mask element i · tk + j of the head), if any; with `dp`, the same mask on it in
    /// the same pass (its gradient).
    #[allow(clippy::too_many_arguments)]
    fn mask_probs(&self, dm: &AttnDims, bi: usize, hi: usize, (r0, r1): (usize, usize), p: &mut [f32], mut dp: Option<&mut [f32]>) {
        let Some((rate, key)) = self.mode.dropout else { return };
        let (tq, tk, pw) = (dm.tq, dm.tk, dm.pw);
        let base = ((bi * self.mode.heads + hi) * tq * tk) as u64;
        let keep = 1.0 / (1.0 - rate);
        for qi in r0..r1 {
            let at = (base + (qi * tk) as u64, qi * pw);
            let row = &mut p[at.1..at.1 + tk];
            match dp.as_deref_mut() {
                Some(dp) => {
                    for (j, (v, g)) in row.iter_mut().zip(&mut dp[at.1..at.1 + tk]).enumerate() {
                        let m = if key.keep(at.0 + j as u64, rate) { keep } else { 0.0 };
                        *v *= m;
                        *g *= m;
                    }
                }
                None => {
                    for (j, v) in row.iter_mut().enumerate() {
                        *v = masked(key, rate, at.0 + j as u64, *v);
                    }
                }
            }
        }
    }

    pub(super) fn dims(&self, q: &Shape, k: &Shape) -> candle_core::Result<AttnDims> {
        let (b, tq, h) = q.dims3()?;
        let (bk, tk, hk) = k.dims3()?;
        let heads = self.mode.heads;
        let d = if heads > 0 && h % heads == 0 { h / heads } else { 0 };
        // hk = kv_heads · d with kv_heads dividing heads (hk = h without grouping).
        if bk != b || d == 0 || hk == 0 || hk % d != 0 || h % hk != 0 {
            return Err(err(format!("attention: q {q:?} and k {k:?} do not match ({heads} heads)")));
        }
        let fast = head_gemm::enabled() && d.is_multiple_of(W);
        // Rows of probabilities a multiple of 64 floats apart would put a column's elements (read
        // by the transposed products) in a few cache sets: one vector more then.
        let pw = match tk.next_multiple_of(W) {
            _ if !fast => tk,
            w if w % 64 == 0 => w + W,
            w => w,
        };
        Ok(AttnDims { b, tq, tk, h, hk, d, rep: h / hk, qs: h, kvs: hk, pw, fast })
    }

    /// Runs `f(batch, head)` for every (batch, head) in parallel, each with its own scratch.
    fn per_head<S: Send>(
        &self,
        dm: &AttnDims,
        scratch: impl Fn() -> S + Sync + Send,
        f: impl Fn(&mut S, usize, usize) + Sync + Send,
    ) {
        let heads = self.mode.heads;
        (0..dm.b * heads).into_par_iter().for_each_init(scratch, |s, bh| f(s, bh / heads, bh % heads));
    }

    /// Runs `f(batch, key/value head)` for every (batch, key/value head) in parallel: the tasks
    /// that own a key/value head's gradient (the query heads of its group run inside one task).
    fn per_kv_head<S: Send>(
        &self,
        dm: &AttnDims,
        scratch: impl Fn() -> S + Sync + Send,
        f: impl Fn(&mut S, usize, usize) + Sync + Send,
    ) {
        let kv_heads = self.mode.heads / dm.rep;
        (0..dm.b * kv_heads).into_par_iter().for_each_init(scratch, |s, bg| f(s, bg / kv_heads, bg % kv_heads));
    }
}

impl Attention {
    /// An encoder block's attention (see [`attention`]) for the block engine.
    pub(super) fn bidirectional(heads: usize, dropout: Option<(f32, DropoutKey)>, key_bias: Tensor) -> Self {
        Attention { mode: Mode { heads, dropout: dropout.filter(|(p, _)| *p > 0.0), causal: false }, key_bias }
    }

    /// A decoder block's causal attention (see [`causal_attention`]) for the block engine.
    pub(super) fn causal(heads: usize, key_bias: Tensor) -> Self {
        Attention { mode: Mode { heads, dropout: None, causal: true }, key_bias }
    }

    /// [`Self::dims`] for q, k and v read as column blocks of rows `qs` and `kvs` wide.
    pub(super) fn strided_dims(&self, q: &Shape, k: &Shape, qs: usize, kvs: usize) -> candle_core::Result<AttnDims> {
        let dm = self.dims(q, k)?;
        if qs < dm.h || kvs < dm.hk {
            return Err(err("attention: row stride narrower than the rows"));
        }
        Ok(AttnDims { qs, kvs, ..dm })
    }

    /// The output (b · tq rows of h) from q, k, v (slices starting at their first element, rows
    /// `dm.qs` / `dm.kvs` apart).
    pub(super) fn forward_into(&self, dm: &AttnDims, q: &[f32], k: &[f32], v: &[f32], out: &mut [f32]) -> candle_core::Result<()> {
        let AttnDims { tq, tk, h, kvs, d, pw, .. } = *dm;
        if out.len() != dm.b * tq * h {
            return Err(err("attention: output buffer does not match q"));
        }
        let out_ptr = SyncPtr::of(out);
        with_data([&self.key_bias], |[bias]| {
            if bias.len() != dm.b * tk {
                return Err(err("attention: key bias shape does not match keys"));
            }
            self.per_head(
                dm,
                || dm.scratch(),
                |s, bi, hi| {
                    dm.pack_head(q, dm.q_at(bi, hi), dm.qs, &mut s.qh);
                    dm.pack_head(k, dm.kv_at(bi, hi), kvs, &mut s.kh);
                    dm.pack_head(v, dm.kv_at(bi, hi), kvs, &mut s.vh);
                    if dm.fast {
                        dm.transpose_head(&s.kh, &mut s.kt);
                    }
                    let p = &mut s.p;
                    self.probs(dm, &s.qh, &s.kh, &s.kt, bias, bi, p);
                    self.mask_probs(dm, bi, hi, (0, tq), p, None);
                    // Each (batch, head) writes its own d columns of its own rows: disjoint.
                    for (r0, r1, kmax) in self.query_blocks(dm) {
                        let o = out_ptr.out(dm.out_at(bi, hi) + r0 * h, h);
                        dm.prod(o, [r1 - r0, d, kmax], Mat::rm(&p[r0 * pw..], pw), Mat::rm(&s.vh, d), Gemm::SERIAL);
                    }
                },
            );
            Ok(())
        })
    }

    /// dq, dk, dv from the output gradient `gs` (rows of h): each written (overwritten) at its
    /// (pointer, first element), with the row strides of q and k/v (`dm.qs`, `dm.kvs`).
    pub(super) fn backward_into(
        &self,
        dm: &AttnDims,
        qs: &[f32],
        ks: &[f32],
        vs: &[f32],
        gs: &[f32],
        [(pq, q0), (pk, k0), (pv, v0)]: [(SyncPtr, usize); 3],
    ) -> candle_core::Result<()> {
        let AttnDims { tq, tk, h, d, rep, qs: qrs, kvs, pw, .. } = *dm;
        let scale = 1.0 / (d as f32).sqrt();
        with_data([&self.key_bias], |[bias]| {
            if bias.len() != dm.b * tk {
                return Err(err("attention: key bias shape does not match keys"));
            }
            // One task per (batch, key/value head): the query heads of its group add their parts
            // of dK and dV one after the other (the first overwrites), so no two tasks write the
            // same element and nothing is zero-filled twice.
            self.per_kv_head(dm, || dm.scratch(), |s, bi, g| {
                let Scratch { p, dp, pd, kt, vt, qh, gh, kh, vh } = s;
                // The group's keys and values, packed (and transposed) once for its query heads.
                let ko = dm.kv_at(bi, g * rep);
                dm.pack_head(ks, ko, kvs, kh);
                dm.pack_head(vs, ko, kvs, vh);
                if dm.fast {
                    dm.transpose_head(kh, kt);
                    dm.transpose_head(vh, vt);
                }
                for r in 0..rep {
                    let hi = g * rep + r;
                    let (qo, oo) = (dm.q_at(bi, hi), dm.out_at(bi, hi));
                    dm.pack_head(qs, qo, qrs, qh);
                    dm.pack_head(gs, oo, h, gh);
                    let first = Gemm::SERIAL.accumulate(r > 0);
                    self.probs(dm, qh, kh, kt, bias, bi, p);
                    // Per block of query rows: dP' = dO V^T (tq × tk; causal: the keys the block
                    // sees); P' = the dropped probabilities and dP = the same mask on dP' (one
                    // pass); dS = P ⊙ (dP − rowsum(dP ⊙ P)), 0 where P is (a causal row's later
                    // keys, whose dP' was not computed).
                    let dropout = self.mode.dropout.is_some();
                    for (r0, r1, kmax) in self.query_blocks(dm) {
                        let o = Out::rm(&mut dp[r0 * pw..], pw);
                        dm.prod_keys(o, [r1 - r0, kmax], Mat::rm(&gh[r0 * d..], d), vh, vt, Gemm::SERIAL);
                        if dropout {
                            pd[r0 * pw..r1 * pw].copy_from_slice(&p[r0 * pw..r1 * pw]);
                            self.mask_probs(dm, bi, hi, (r0, r1), pd, Some(dp));
                        }
                        for qi in r0..r1 {
                            let seen = self.seen(dm, qi);
                            let (dpr, later) = dp[qi * pw..(qi + 1) * pw].split_at_mut(seen);
                            later.fill(0.0);
                            let pr = &p[qi * pw..qi * pw + seen];
                            let dot = dot_lanes(dpr, pr);
                            for (a, &b) in dpr.iter_mut().zip(pr) {
                                *a = b * (*a - dot);
                            }
                        }
                    }
                    // dV += P'^T dO  (tk × d); causal: each block of keys from the queries that
                    // see it.
                    let probs_used: &[f32] = if dropout { pd } else { p };
                    for (c0, c1, qmin) in self.key_blocks(dm) {
                        let (o, rows) = (pv.out(v0 + ko + c0 * kvs, kvs), tq - qmin);
                        dm.prod(o, [c1 - c0, d, rows], Mat::rm_t(&probs_used[qmin * pw + c0..], pw), Mat::rm(&gh[qmin * d..], d), first);
                    }
                    // dQ = dS K * scale (tq × d); dK += dS^T Q * scale (tk × d).
                    for (r0, r1, kmax) in self.query_blocks(dm) {
                        let o = pq.out(q0 + qo + r0 * qrs, qrs);
                        dm.prod(o, [r1 - r0, d, kmax], Mat::rm(&dp[r0 * pw..], pw), Mat::rm(kh, d), Gemm::SERIAL.scaled(scale));
                    }
                    for (c0, c1, qmin) in self.key_blocks(dm) {
                        let (o, rows) = (pk.out(k0 + ko + c0 * kvs, kvs), tq - qmin);
                        let (a, b) = (Mat::rm_t(&dp[qmin * pw + c0..], pw), Mat::rm(&qh[qmin * d..], d));
                        dm.prod(o, [c1 - c0, d, rows], a, b, first.scaled(scale));
                    }
                }
            });
            Ok(())
        })
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Fwd {
        let _prof = timer("attention", "fwd");
        let (q, k, v) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let dm = self.dims(l1.shape(), l2.shape())?;
        if l3.shape() != l2.shape() {
            return Err(err("attention: k and v shapes differ"));
        }
        let mut out = vec![0f32; dm.b * dm.tq * dm.h];
        self.forward_into(&dm, q, k, v, &mut out)?;
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, _res: &Tensor, grad: &Tensor) -> Grads3 {
        let _prof = timer("attention", "bwd");
        let grad = grad.contiguous()?;
        let dm = self.dims(q.shape(), k.shape())?;
        let mut dq = vec![0f32; dm.b * dm.tq * dm.h];
        let mut dk = vec![0f32; dm.b * dm.tk * dm.hk];
        let mut dv = vec![0f32; dm.b * dm.tk * dm.hk];
        let outs = [(SyncPtr::of(&mut dq), 0), (SyncPtr::of(&mut dk), 0), (SyncPtr::of(&mut dv), 0)];
        with_data([q, k, v, &grad], |[qs, ks, vs, gs]| self.backward_into(&dm, qs, ks, vs, gs, outs))?;
        Ok((grad_for(q, dq)?, grad_for(k, dk)?, grad_for(v, dv)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::cpu::testing::{grad_diff, grads, max_diff, rand, var};
    use candle_core::Device;

    /// Attention through the fused op and through the composition agree, forward and backward,
    /// for queries (b, tq), keys (b, tk) and a padding mask; returns the fused output.
    fn check(mode: Mode, (b, tq, tk): (usize, usize, usize), seed: u64, masked_keys: &[usize]) -> Tensor {
        check_grouped(mode, mode.heads, (b, tq, tk), seed, masked_keys)
    }

    /// [`check_grouped`] with heads of 4.
    fn check_grouped(mode: Mode, kv_heads: usize, dims: (usize, usize, usize), seed: u64, masked_keys: &[usize]) -> Tensor {
        check_heads(mode, kv_heads, 4, dims, seed, masked_keys)
    }

    /// [`check`] with keys and values of `kv_heads` heads (grouped-query attention when fewer
    /// than the query heads; the composition expands them, the fused op reads them in place) and
    /// heads of `d` (a multiple of 16 runs the head kernel).
    fn check_heads(mode: Mode, kv_heads: usize, d: usize, (b, tq, tk): (usize, usize, usize), seed: u64, masked_keys: &[usize]) -> Tensor {
        let heads = mode.heads;
        let q = var(&[b, tq, heads * d], seed, 1.0);
        let k = var(&[b, tk, kv_heads * d], seed + 1, 1.0);
        let v = var(&[b, tk, kv_heads * d], seed + 2, 1.0);
        let mut mask = vec![1f32; b * tk];
        for &i in masked_keys {
            mask[i] = 0.0;
        }
        let bias = mask_to_bias(&Tensor::from_vec(mask, (b, tk), &Device::Cpu).unwrap()).unwrap();
        let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
        let y1 = mode.fused(qt, kt, vt, &bias).unwrap();
        let y2 = mode.composed(qt, kt, vt, &bias).unwrap();
        assert!(max_diff(&y1, &y2) < 1e-5, "fwd {}", max_diff(&y1, &y2));
        let up = rand(&[b, tq, heads * d], seed + 3);
        let (g1, g2) = (grads(&y1, &up), grads(&y2, &up));
        for t in [&q, &k, &v] {
            let diff = grad_diff(&g1, &g2, t);
            assert!(diff < 1e-5, "grad diff {diff}");
        }
        y1
    }

    #[test]
    fn causal_attention_matches_composition() {
        // tq < tk: the queries follow 3 cached positions.
        let (b, tq, tk) = (2, 6, 9);
        let causal = Mode { heads: 3, dropout: None, causal: true };
        let y1 = check(causal, (b, tq, tk), 21, &[tk + 1]);
        // Not the non-causal result.
        let y3 = check(Mode { causal: false, ..causal }, (b, tq, tk), 21, &[tk + 1]);
        assert!(max_diff(&y1, &y3) > 1e-2);
    }

    /// Causal attention over several blocks of rows (the products skip each block's upper
    /// triangle): equal to the composition forward and backward, without and with cached keys,
    /// with lengths that do and do not divide into blocks, grouped-query and not.
    #[test]
    fn causal_blocks_match_composition() {
        let causal = Mode { heads: 4, dropout: None, causal: true };
        for (kv, (b, tq, tk)) in [(4, (2, 2 * CAUSAL_BLOCK, 2 * CAUSAL_BLOCK)), (2, (1, 2 * CAUSAL_BLOCK + 7, 2 * CAUSAL_BLOCK + 7)), (1, (2, CAUSAL_BLOCK + 5, CAUSAL_BLOCK + 30))] {
            check_grouped(causal, kv, (b, tq, tk), 61 + tq as u64, &[tk - 1]);
        }
    }

    /// A shard of the batch, computed inside `in_batch_rows`, gets the probabilities' dropout
    /// masks its rows get in the whole batch (data-parallel training).
    #[test]
    fn shard_rows_get_the_whole_batch_masks() {
        use crate::ops::cpu::testing::rand;
        let (b, t, h) = (4, 5, 6);
        let (q, k, v) = (rand(&[b, t, h], 1), rand(&[b, t, h], 2), rand(&[b, t, h], 3));
        let bias = Tensor::zeros((b, t), DType::F32, &candle_core::Device::Cpu).unwrap();
        let d = Some((0.3f32, DropoutKey(9)));
        let whole = attention(&q, &k, &v, &bias, 2, d).unwrap();
        let part = |x: &Tensor| x.narrow(0, 2, 2).unwrap();
        let shard = crate::ops::in_batch_rows(2, 2, || attention(&part(&q), &part(&k), &part(&v), &part(&bias), 2, d)).unwrap();
        assert_eq!(max_diff(&part(&whole), &shard), 0.0);
        let plain = attention(&part(&q), &part(&k), &part(&v), &part(&bias), 2, d).unwrap();
        assert!(max_diff(&part(&whole), &plain) > 1e-3, "outside a shard the masks differ");
    }

    /// Grouped-query attention (6 query heads over 2 and over 3 key/value heads, and one
    /// key/value head for all) agrees with the expanded composition, forward and backward (the
    /// key/value gradients summed over each group), causal with cached keys and bidirectional
    /// with dropout; and it is not the same as reading only the first heads.
    #[test]
    fn grouped_query_attention_matches_expansion() {
        for kv in [1, 2, 3] {
            let causal = Mode { heads: 6, dropout: None, causal: true };
            check_grouped(causal, kv, (2, 5, 8), 31 + kv as u64, &[9]);
            let drop = Mode { heads: 6, dropout: Some((0.25, DropoutKey(3))), causal: false };
            check_grouped(drop, kv, (2, 7, 7), 41 + kv as u64, &[6]);
        }
        // Shapes that do not divide are refused with an error, not a panic.
        let q = rand(&[1, 3, 6 * 4], 1);
        let k = rand(&[1, 3, 4 * 4], 2);
        let bias = Tensor::zeros((1, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(causal_attention(&q, &k, &k, &bias, 6).is_err());
    }

    /// Heads of 16, 32 and 64 (the register-blocked kernel, keys and values transposed into
    /// padded rows): bidirectional with dropout and padding, key counts that are and are not
    /// whole vectors (128: rows padded past a multiple of 64 floats), more queries than one
    /// block; causal with cached keys and grouped-query attention.
    #[test]
    fn head_kernel_matches_composition() {
        assert!(!head_gemm::enabled() || head_gemm::available());
        for d in [16, 32, 64] {
            let drop = Mode { heads: 2, dropout: Some((0.2, DropoutKey(7))), causal: false };
            for (tq, tk) in [(29, 37), (HEAD_BLOCK * 2 + 5, 128), (3, 16)] {
                check_heads(drop, 2, d, (2, tq, tk), 71 + (d + tk) as u64, &[tk + 2, tk - 1]);
            }
            let causal = Mode { heads: 4, dropout: None, causal: true };
            check_heads(causal, 2, d, (2, 50, 70), 81 + d as u64, &[69]);
            check_heads(causal, 4, d, (1, 3 * HEAD_BLOCK + 1, 3 * HEAD_BLOCK + 1), 91 + d as u64, &[]);
        }
    }

    #[test]
    fn attention_matches_composition() {
        for (dropout, tk) in [(None, 9), (Some((0.2f32, DropoutKey(5))), 12)] {
            check(Mode { heads: 3, dropout, causal: false }, (2, 9, tk), 11, &[tk - 1, tk - 2]);
        }
    }
}
