//! Multi-head scaled dot-product attention, bidirectional (encoders, with dropout on the
//! probabilities) and causal (decoders, with cached keys): one composition, one fused op.

use super::cpu::{
    dot_lanes, err, exp_sum_lanes, fused_ok, gemm, grad_for, max_lanes, slice, with_data, Fwd, Gemm, Grads3, Mat, Out,
    SyncPtr,
};
use super::dropout::{dropout_composed, masked};
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
}

impl Attention {
    /// Softmax probabilities for one (batch, head) into `p` (tq × tk).
    fn probs(&self, dm: &AttnDims, q: &[f32], k: &[f32], bias: &[f32], bi: usize, hi: usize, p: &mut [f32]) {
        let AttnDims { tk, qs, kvs, d, .. } = *dm;
        let scale = 1.0 / (d as f32).sqrt();
        let (qo, ko) = (dm.q_at(bi, hi), dm.kv_at(bi, hi));
        // Causal: each block of query rows against the keys its last row sees (the rest of its
        // rows is filled with 0 below).
        for (r0, r1, kmax) in self.query_blocks(dm) {
            let o = Out::rm(&mut p[r0 * tk..], tk);
            gemm(o, [r1 - r0, kmax, d], Mat::rm(&q[qo + r0 * qs..], qs), Mat::rm_t(&k[ko..], kvs), Gemm::SERIAL.scaled(scale));
        }
        let brow = &bias[bi * tk..(bi + 1) * tk];
        for (qi, row) in p.chunks_mut(tk).enumerate() {
            // Causal rows stop at their own position; later keys get probability 0.
            let (row, later) = row.split_at_mut(self.seen(dm, qi));
            later.fill(0.0);
            for (v, &bb) in row.iter_mut().zip(brow) {
                *v += bb;
            }
            let max = max_lanes(row);
            let inv = 1.0 / exp_sum_lanes(row, max);
            for v in row.iter_mut() {
                *v *= inv;
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
        let step = if self.mode.causal { CAUSAL_BLOCK } else { dm.tq.max(1) };
        (0..dm.tq).step_by(step).map(move |r0| {
            let r1 = (r0 + step).min(dm.tq);
            (r0, r1, self.seen(dm, r1 - 1))
        })
    }

    /// Blocks of keys (c0, c1, first query row that sees any of them): the products whose output
    /// rows are keys (dK, dV) over the query rows that see the block only.
    fn key_blocks(&self, dm: &AttnDims) -> impl Iterator<Item = (usize, usize, usize)> {
        let causal = self.mode.causal;
        let step = if causal { CAUSAL_BLOCK } else { dm.tk.max(1) };
        let (tq, tk, past) = (dm.tq, dm.tk, dm.past());
        (0..tk).step_by(step).map(move |c0| {
            // Query row qi sees key c0 from past + qi >= c0 on.
            let qmin = if causal { c0.saturating_sub(past).min(tq.saturating_sub(1)) } else { 0 };
            (c0, (c0 + step).min(tk), qmin)
        })
    }

    /// Dropout on one (batch, head)'s probabilities (or their gradient), if any.
    fn mask_probs(&self, dm: &AttnDims, bi: usize, hi: usize, p: &mut [f32]) {
        if let Some((rate, key)) = self.mode.dropout {
            let base = ((bi * self.mode.heads + hi) * dm.tq * dm.tk) as u64;
            for (i, v) in p.iter_mut().enumerate() {
                *v = masked(key, rate, base + i as u64, *v);
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
        Ok(AttnDims { b, tq, tk, h, hk, d, rep: h / hk, qs: h, kvs: hk })
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
        let AttnDims { tq, tk, h, kvs, d, .. } = *dm;
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
                || vec![0f32; tq * tk],
                |p, bi, hi| {
                    self.probs(dm, q, k, bias, bi, hi, p);
                    self.mask_probs(dm, bi, hi, p);
                    // Each (batch, head) writes its own d columns of its own rows: disjoint.
                    for (r0, r1, kmax) in self.query_blocks(dm) {
                        let o = out_ptr.out(dm.out_at(bi, hi) + r0 * h, h);
                        gemm(o, [r1 - r0, d, kmax], Mat::rm(&p[r0 * tk..], tk), Mat::rm(&v[dm.kv_at(bi, hi)..], kvs), Gemm::SERIAL);
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
        let AttnDims { tq, tk, h, d, rep, qs: qrs, kvs, .. } = *dm;
        let scale = 1.0 / (d as f32).sqrt();
        with_data([&self.key_bias], |[bias]| {
            if bias.len() != dm.b * tk {
                return Err(err("attention: key bias shape does not match keys"));
            }
            let scratch = || (vec![0f32; tq * tk], vec![0f32; tq * tk], vec![0f32; tq * tk]);
            // One task per (batch, key/value head): the query heads of its group add their parts
            // of dK and dV one after the other (the first overwrites), so no two tasks write the
            // same element and nothing is zero-filled twice.
            self.per_kv_head(dm, scratch, |(p, dp, pd), bi, g| {
                for r in 0..rep {
                    let hi = g * rep + r;
                    let (qo, ko, oo) = (dm.q_at(bi, hi), dm.kv_at(bi, hi), dm.out_at(bi, hi));
                    let first = Gemm::SERIAL.accumulate(r > 0);
                    self.probs(dm, qs, ks, bias, bi, hi, p);
                    // dP' = dO V^T  (tq × tk; causal: the keys each query block sees)
                    for (r0, r1, kmax) in self.query_blocks(dm) {
                        let o = Out::rm(&mut dp[r0 * tk..], tk);
                        gemm(o, [r1 - r0, kmax, d], Mat::rm(&gs[oo + r0 * h..], h), Mat::rm_t(&vs[ko..], kvs), Gemm::SERIAL);
                    }
                    // dV += P'^T dO  (tk × d), P' = dropped probabilities; causal: each block of
                    // keys from the queries that see it.
                    let probs_used: &[f32] = if self.mode.dropout.is_some() {
                        pd.copy_from_slice(p);
                        self.mask_probs(dm, bi, hi, pd);
                        pd
                    } else {
                        p
                    };
                    for (c0, c1, qmin) in self.key_blocks(dm) {
                        let (o, rows) = (pv.out(v0 + ko + c0 * kvs, kvs), tq - qmin);
                        gemm(o, [c1 - c0, d, rows], Mat::rm_t(&probs_used[qmin * tk + c0..], tk), Mat::rm(&gs[oo + qmin * h..], h), first);
                    }
                    // dP = mask(dP'); dS = P ⊙ (dP − rowsum(dP ⊙ P)), 0 where P is (a causal
                    // row's later keys, whose dP' was not computed).
                    self.mask_probs(dm, bi, hi, dp);
                    for (qi, (dpr, pr)) in dp.chunks_mut(tk).zip(p.chunks(tk)).enumerate() {
                        let seen = self.seen(dm, qi);
                        let (dpr, later) = dpr.split_at_mut(seen);
                        later.fill(0.0);
                        let pr = &pr[..seen];
                        let dot = dot_lanes(dpr, pr);
                        for (a, &b) in dpr.iter_mut().zip(pr) {
                            *a = b * (*a - dot);
                        }
                    }
                    // dQ = dS K * scale (tq × d); dK += dS^T Q * scale (tk × d).
                    for (r0, r1, kmax) in self.query_blocks(dm) {
                        let o = pq.out(q0 + qo + r0 * qrs, qrs);
                        gemm(o, [r1 - r0, d, kmax], Mat::rm(&dp[r0 * tk..], tk), Mat::rm(&ks[ko..], kvs), Gemm::SERIAL.scaled(scale));
                    }
                    for (c0, c1, qmin) in self.key_blocks(dm) {
                        let (o, rows) = (pk.out(k0 + ko + c0 * kvs, kvs), tq - qmin);
                        let (a, b) = (Mat::rm_t(&dp[qmin * tk + c0..], tk), Mat::rm(&qs[qo + qmin * qrs..], qrs));
                        gemm(o, [c1 - c0, d, rows], a, b, first.scaled(scale));
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

    /// [`check`] with keys and values of `kv_heads` heads (grouped-query attention when fewer
    /// than the query heads): the composition expands them, the fused op reads them in place.
    fn check_grouped(mode: Mode, kv_heads: usize, (b, tq, tk): (usize, usize, usize), seed: u64, masked_keys: &[usize]) -> Tensor {
        let (heads, d) = (mode.heads, 4);
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

    #[test]
    fn attention_matches_composition() {
        for (dropout, tk) in [(None, 9), (Some((0.2f32, DropoutKey(5))), 12)] {
            check(Mode { heads: 3, dropout, causal: false }, (2, 9, tk), 11, &[tk - 1, tk - 2]);
        }
    }
}

