//! Normalisations over the last dimension: layer norm (gradients for x, gamma and beta) and RMS
//! norm (gradients for x and the weight).

use super::cpu::{
    column_sums, dot_lanes, err, fused_ok, grad_for, row_op, rows2_into, rows_cols, rows_into, slice, sum_lanes, with_data, Fwd,
    Grads2, Grads3, RowKernel, LANES,
};
use super::dropout::{dropout, masked};
use super::profile::timer;
use super::rng::DropoutKey;
use crate::error::Result;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Tensor, D};
use rayon::prelude::*;

/// Layer normalisation over the last dimension: `(x - mean) / sqrt(var + eps) * gamma + beta`.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    if fused_ok(x) {
        return layer_norm_fused(x, gamma, beta, eps);
    }
    layer_norm_composed(x, gamma, beta, eps)
}

/// Reference implementation of [`layer_norm`] from differentiable candle ops.
pub fn layer_norm_composed(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xhat = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(xhat.broadcast_mul(gamma)?.broadcast_add(beta)?)
}

/// `layer_norm(dropout(h) + input)`: a residual sublayer's output (dropout on the sublayer,
/// the residual sum, layer normalisation) as one op with frozen `gamma`, `beta` — the same
/// numbers as the three ops it replaces, without their intermediate tensors or gradient sums.
/// The sum is recomputed in backward. Trained `gamma` / `beta` (LN tuning) take the composition.
pub fn residual_layer_norm(
    h: &Tensor,
    input: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    dropout_p: Option<(f32, DropoutKey)>,
) -> Result<Tensor> {
    let drop = dropout_p.filter(|(p, _)| *p > 0.0);
    if fused_ok(h) && !gamma.track_op() && !beta.track_op() && h.shape() == input.shape() {
        let op = ResidualLayerNorm::new(eps, drop, h.elem_count(), gamma.contiguous()?, beta.contiguous()?);
        return Ok(h.contiguous()?.apply_op2(&input.contiguous()?, op)?);
    }
    residual_layer_norm_composed(h, input, gamma, beta, eps, drop)
}

/// Reference implementation of [`residual_layer_norm`]: dropout, sum and layer norm as three ops.
pub fn residual_layer_norm_composed(
    h: &Tensor,
    input: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    dropout_p: Option<(f32, DropoutKey)>,
) -> Result<Tensor> {
    let h = match dropout_p {
        Some((p, key)) => dropout(h, p, key)?,
        None => h.clone(),
    };
    layer_norm(&(h + input)?, gamma, beta, eps)
}

/// RMS normalisation over the last dimension: `x / sqrt(mean(x^2) + eps) * weight`. Fused on
/// CPU (gradients for `x` and a trainable weight).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if fused_ok(x) {
        return row_op(x, weight, RmsNorm { eps: eps as f32 });
    }
    rms_norm_composed(x, weight, eps)
}

/// Reference implementation of [`rms_norm`] from differentiable ops.
pub fn rms_norm_composed(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let y = x.broadcast_div(&(ms + eps)?.sqrt()?)?;
    Ok(y.broadcast_mul(weight)?)
}

// ------------------------------------------------------------------------------------------------
// Layer norm.

fn layer_norm_fused(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let op = LayerNorm { eps: eps as f32 };
    Ok(x.contiguous()?.apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)?)
}

struct LayerNorm {
    eps: f32,
}

/// Mean and 1/std of one row (two-pass, in f32 with lane-wise sums).
#[inline]
fn row_stats(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = sum_lanes(row) / n;
    let mut acc = [0f32; LANES];
    let mut it = row.chunks_exact(LANES);
    for c in &mut it {
        for j in 0..LANES {
            acc[j] += (c[j] - mean) * (c[j] - mean);
        }
    }
    let var = (it.remainder().iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() + acc.iter().sum::<f32>()) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

impl LayerNorm {
    /// One row's input gradient: `rstd (dy γ − mean(dy γ) − x̂ mean(dy γ x̂))`.
    fn backward_row(&self, dxr: &mut [f32], xr: &[f32], gs: &[f32], dyr: &[f32]) {
        let h = xr.len();
        let (mean, rstd) = row_stats(xr, self.eps);
        let (mut a1, mut a2) = ([0f32; LANES], [0f32; LANES]);
        let (mut s1, mut s2) = (0f32, 0f32);
        let body = h - h % LANES;
        for c in (0..body).step_by(LANES) {
            for j in 0..LANES {
                let i = c + j;
                let gg = dyr[i] * gs[i];
                a1[j] += gg;
                a2[j] += gg * (xr[i] - mean) * rstd;
            }
        }
        for i in body..h {
            let gg = dyr[i] * gs[i];
            s1 += gg;
            s2 += gg * (xr[i] - mean) * rstd;
        }
        s1 += a1.iter().sum::<f32>();
        s2 += a2.iter().sum::<f32>();
        let (s1, s2) = (s1 / h as f32, s2 / h as f32);
        for i in 0..h {
            let xhat = (xr[i] - mean) * rstd;
            dxr[i] = rstd * (dyr[i] * gs[i] - s1 - xhat * s2);
        }
    }
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Fwd {
        let _prof = timer("layer-norm", "fwd");
        let (x, g, b) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let (_, h) = rows_cols(l1.shape());
        if g.len() != h || b.len() != h {
            return Err(err(format!("layer norm: gamma/beta have {} / {} elements, rows have {h}", g.len(), b.len())));
        }
        let mut y = vec![0f32; x.len()];
        rows_into(&mut y, x, h, |_, yr, xr| {
            let (mean, rstd) = row_stats(xr, self.eps);
            for i in 0..h {
                yr[i] = (xr[i] - mean) * rstd * g[i] + b[i];
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, gamma: &Tensor, beta: &Tensor, _res: &Tensor, grad: &Tensor) -> Grads3 {
        let _prof = timer("layer-norm", "bwd");
        let grad = grad.contiguous()?;
        let h = gamma.elem_count();
        let mut dx = if x.track_op() { vec![0f32; x.elem_count()] } else { Vec::new() };
        let mut dgb = Vec::new();
        with_data([x, gamma, &grad], |[xs, gs, dys]| {
            if x.track_op() {
                rows2_into(&mut dx, xs, dys, h, |dxr, xr, dyr| self.backward_row(dxr, xr, gs, dyr));
            }
            if gamma.track_op() || beta.track_op() {
                // dγ in the first h sums, dβ in the next h.
                dgb = column_sums(xs, dys, h, 2 * h, |xr, dyr, p| {
                    let (mean, rstd) = row_stats(xr, self.eps);
                    let (pg, pb) = p.split_at_mut(h);
                    for i in 0..h {
                        pg[i] += dyr[i] * (xr[i] - mean) * rstd;
                        pb[i] += dyr[i];
                    }
                });
            }
            Ok(())
        })?;
        dgb.resize(2 * h, 0.0);
        let db = dgb.split_off(h);
        Ok((grad_for(x, dx)?, grad_for(gamma, dgb)?, grad_for(beta, db)?))
    }
}

// ------------------------------------------------------------------------------------------------
// Dropout, residual sum and layer norm.

pub(super) struct ResidualLayerNorm {
    eps: f32,
    /// Dropout on `h` (rate, key for this tensor's rows), as [`dropout`] applies it.
    drop: Option<(f32, DropoutKey)>,
    gamma: Tensor,
    beta: Tensor,
}

impl ResidualLayerNorm {
    /// One row of `dropout(h) + input` (row `r` of width `hr.len()`) into `s`.
    #[inline]
    fn sum_row(&self, r: usize, s: &mut [f32], hr: &[f32], ir: &[f32]) {
        match self.drop {
            Some((p, key)) => {
                let base = (r * hr.len()) as u64;
                for (i, (sv, (&hv, &iv))) in s.iter_mut().zip(hr.iter().zip(ir)).enumerate() {
                    *sv = masked(key, p, base + i as u64, hv) + iv;
                }
            }
            None => {
                for (sv, (&hv, &iv)) in s.iter_mut().zip(hr.iter().zip(ir)) {
                    *sv = hv + iv;
                }
            }
        }
    }
}

impl CustomOp2 for ResidualLayerNorm {
    fn name(&self) -> &'static str {
        "residual-layer-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Fwd {
        let _prof = timer("residual-layer-norm", "fwd");
        let (hs, is) = (slice(s1, l1)?, slice(s2, l2)?);
        let (_, h) = rows_cols(l1.shape());
        if hs.len() != is.len() {
            return Err(err(format!("residual layer norm: {:?} and {:?} differ", l1.shape(), l2.shape())));
        }
        let mut y = vec![0f32; hs.len()];
        self.forward_into(&mut y, hs, is, h)?;
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    /// d(input) = the layer norm's input gradient at the recomputed sum; dh = its dropout.
    fn bwd(&self, hid: &Tensor, input: &Tensor, _res: &Tensor, grad: &Tensor) -> Grads2 {
        let _prof = timer("residual-layer-norm", "bwd");
        let grad = grad.contiguous()?;
        let n = hid.elem_count();
        let (mut dh, mut di) = (vec![0f32; n], vec![0f32; n]);
        with_data([hid, input, &grad], |[hs, is, dys]| self.backward_into(&mut dh, &mut di, hs, is, dys))?;
        Ok((grad_for(hid, dh)?, grad_for(input, di)?))
    }
}

impl ResidualLayerNorm {
    /// The op for the block engine: `drop` keyed for the rows of this call's tensors.
    pub(super) fn new(eps: f64, drop: Option<(f32, DropoutKey)>, elems: usize, gamma: Tensor, beta: Tensor) -> Self {
        let drop = drop.filter(|(p, _)| *p > 0.0);
        ResidualLayerNorm { eps: eps as f32, drop: drop.map(|(p, key)| (p, key.for_rows(elems))), gamma, beta }
    }

    /// `y = layer_norm(dropout(hs) + is)` over rows of `h`.
    pub(super) fn forward_into(&self, y: &mut [f32], hs: &[f32], is: &[f32], h: usize) -> candle_core::Result<()> {
        if hs.len() != is.len() || y.len() != hs.len() {
            return Err(err("residual layer norm: buffers differ in length"));
        }
        with_data([&self.gamma, &self.beta], |[g, b]| {
            if g.len() != h || b.len() != h {
                return Err(err(format!("layer norm: gamma/beta have {} / {} elements, rows have {h}", g.len(), b.len())));
            }
            rows_into(y, hs, h, |r, yr, hr| {
                self.sum_row(r, yr, hr, &is[r * h..(r + 1) * h]);
                let (mean, rstd) = row_stats(yr, self.eps);
                for i in 0..h {
                    yr[i] = (yr[i] - mean) * rstd * g[i] + b[i];
                }
            });
            Ok(())
        })
    }

    /// `dh` (through the dropout) and `di` (the residual's) from the output gradient `dys`; the
    /// sum is recomputed from `hs` and `is`.
    pub(super) fn backward_into(&self, dh: &mut [f32], di: &mut [f32], hs: &[f32], is: &[f32], dys: &[f32]) -> candle_core::Result<()> {
        let h = self.gamma.elem_count().max(1);
        let n = hs.len();
        if is.len() != n || dys.len() != n || dh.len() != n || di.len() != n {
            return Err(err("residual layer norm: buffers differ in length"));
        }
        // The sum goes into dh's buffer as scratch, then dh is overwritten row by row.
        let ln = LayerNorm { eps: self.eps };
        with_data([&self.gamma], |[gs]| {
            dh.par_chunks_mut(h).zip(di.par_chunks_mut(h)).enumerate().for_each(|(r, (dhr, dir))| {
                let rows = r * h..(r + 1) * h;
                self.sum_row(r, dhr, &hs[rows.clone()], &is[rows.clone()]);
                ln.backward_row(dir, dhr, gs, &dys[rows]);
                match self.drop {
                    Some((p, key)) => {
                        let base = (r * h) as u64;
                        for (i, (d, &g)) in dhr.iter_mut().zip(dir.iter()).enumerate() {
                            *d = masked(key, p, base + i as u64, g);
                        }
                    }
                    None => dhr.copy_from_slice(dir),
                }
            });
            Ok(())
        })
    }
}

impl ResidualLayerNorm {
    /// The gradients of γ and β from the output gradient `dys`, added into the packed gradient
    /// `dp` at `at` (γ's offset, β's; `None` for one that does not train); the sum is recomputed
    /// from `hs` and `is`. Partial sums over blocks of rows, added in order.
    pub(super) fn param_grads_into(&self, dp: &mut [f32], at: (Option<usize>, Option<usize>), hs: &[f32], is: &[f32], dys: &[f32]) -> candle_core::Result<()> {
        if at.0.is_none() && at.1.is_none() {
            return Ok(());
        }
        let h = self.gamma.elem_count().max(1);
        let n = hs.len();
        if is.len() != n || dys.len() != n {
            return Err(err("residual layer norm: buffers differ in length"));
        }
        const BLOCK: usize = 64;
        let rows = n / h;
        let partials: Vec<Vec<f32>> = (0..rows.div_ceil(BLOCK))
            .into_par_iter()
            .map(|blk| {
                let (mut p, mut sum) = (vec![0f32; 2 * h], vec![0f32; h]);
                for r in blk * BLOCK..((blk + 1) * BLOCK).min(rows) {
                    let span = r * h..(r + 1) * h;
                    self.sum_row(r, &mut sum, &hs[span.clone()], &is[span.clone()]);
                    let (mean, rstd) = row_stats(&sum, self.eps);
                    let (pg, pb) = p.split_at_mut(h);
                    for (i, &d) in dys[span].iter().enumerate() {
                        pg[i] += d * (sum[i] - mean) * rstd;
                        pb[i] += d;
                    }
                }
                p
            })
            .collect();
        let mut total = vec![0f32; 2 * h];
        for p in partials {
            total.iter_mut().zip(&p).for_each(|(t, v)| *t += v);
        }
        for (at, part) in [at.0, at.1].into_iter().zip(total.chunks(h)) {
            if let Some(at) = at {
                dp[at..at + h].iter_mut().zip(part).for_each(|(d, v)| *d += v);
            }
        }
        Ok(())
    }
}

// ------------------------------------------------------------------------------------------------
// RMS norm.

struct RmsNorm {
    eps: f32,
}

/// 1 / sqrt(mean(x²) + eps) of one row.
#[inline]
fn rms_scale(row: &[f32], eps: f32) -> f32 {
    let ss: f32 = row.chunks(LANES * 4).map(|c| dot_lanes(c, c)).sum();
    1.0 / (ss / row.len() as f32 + eps).sqrt()
}

impl RowKernel for RmsNorm {
    const NAME: &'static str = "rms-norm";

    fn forward(&self, y: &mut [f32], x: &[f32], w: &[f32]) {
        let r = rms_scale(x, self.eps);
        for i in 0..y.len() {
            y[i] = x[i] * r * w[i];
        }
    }

    /// dx_j = r (g_j w_j − x_j r² mean_i(g_i w_i x_i)).
    fn backward_x(&self, dx: &mut [f32], x: &[f32], w: &[f32], g: &[f32]) {
        let h = dx.len();
        let r = rms_scale(x, self.eps);
        let mut dot = 0f32;
        for i in 0..h {
            dot += g[i] * w[i] * x[i];
        }
        let c = r * r * dot / h as f32;
        for i in 0..h {
            dx[i] = r * (g[i] * w[i] - x[i] * c);
        }
    }

    /// dw_i = Σ_rows g_i x_i r.
    fn backward_w(&self, dw: &mut [f32], x: &[f32], g: &[f32]) {
        let r = rms_scale(x, self.eps);
        for i in 0..dw.len() {
            dw[i] += g[i] * x[i] * r;
        }
    }
}

/// `y = x / rms(x) ⊙ w` row by row (rows of `w.len()`): the fused op's forward into a buffer.
pub(super) fn rms_norm_into(y: &mut [f32], x: &[f32], w: &[f32], eps: f64) {
    let k = RmsNorm { eps: eps as f32 };
    rows_into(y, x, w.len().max(1), |_, yr, xr| k.forward(yr, xr, w));
}

/// `dx += ∂(x / rms(x) ⊙ w)/∂x · g` row by row: the fused op's input gradient added onto `dx`
/// (where a residual's gradient already is).
pub(super) fn rms_norm_grad_add(dx: &mut [f32], x: &[f32], w: &[f32], g: &[f32], eps: f64) {
    let k = RmsNorm { eps: eps as f32 };
    let h = w.len().max(1);
    dx.par_chunks_mut(h).zip(x.par_chunks(h).zip(g.par_chunks(h))).for_each_init(
        || vec![0f32; h],
        |row, (dr, (xr, gr))| {
            k.backward_x(row, xr, w, gr);
            for (d, &r) in dr.iter_mut().zip(row.iter()) {
                *d += r;
            }
        },
    );
}

/// `dw += Σ_rows ∂(x / rms(x) ⊙ w)/∂w · g`: the gradient of a trained RMS norm weight (rows of
/// `dw.len()`).
pub(super) fn rms_norm_weight_grad_add(dw: &mut [f32], x: &[f32], g: &[f32], eps: f64) {
    let k = RmsNorm { eps: eps as f32 };
    let h = dw.len().max(1);
    let sums = column_sums(x, g, h, h, |xr, gr, p| k.backward_w(p, xr, gr));
    dw.iter_mut().zip(&sums).for_each(|(d, s)| *d += s);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::cpu::testing::{grad_diff, grads, max_diff, rand, var};

    #[test]
    fn layer_norm_matches_composition() {
        let x = var(&[4, 7, 32], 5, 3.0);
        let g = var(&[32], 6, 1.0);
        let b = var(&[32], 7, 1.0);
        let y1 = layer_norm_fused(x.as_tensor(), g.as_tensor(), b.as_tensor(), 1e-12).unwrap();
        let y2 = layer_norm_composed(x.as_tensor(), g.as_tensor(), b.as_tensor(), 1e-12).unwrap();
        assert!(max_diff(&y1, &y2) < 1e-5);
        let up = rand(&[4, 7, 32], 8);
        let (g1, g2) = (grads(&y1, &up), grads(&y2, &up));
        for v in [&x, &g, &b] {
            let d = grad_diff(&g1, &g2, v);
            assert!(d < 1e-4, "grad diff {d}");
        }
    }

    /// Dropout, residual sum and layer norm as one op give the composition's numbers to the bit,
    /// forward and both input gradients, with dropout and without; inside a shard of the batch
    /// they use the whole batch's masks; LN tuning (trained gamma) takes the composition.
    #[test]
    fn residual_layer_norm_is_the_composition() {
        use crate::ops::cpu::testing::grads;
        let (b, t, h) = (3, 5, 40);
        let x = var(&[b, t, h], 51, 2.0);
        let inp = var(&[b, t, h], 52, 1.0);
        let g = rand(&[h], 53);
        let be = rand(&[h], 54);
        for drop in [None, Some((0.25f32, DropoutKey(11)))] {
            let y1 = residual_layer_norm(x.as_tensor(), inp.as_tensor(), &g, &be, 1e-12, drop).unwrap();
            let y2 = residual_layer_norm_composed(x.as_tensor(), inp.as_tensor(), &g, &be, 1e-12, drop).unwrap();
            assert_eq!(max_diff(&y1, &y2), 0.0);
            let up = rand(&[b, t, h], 55);
            let (g1, g2) = (grads(&y1, &up), grads(&y2, &up));
            for v in [&x, &inp] {
                assert_eq!(grad_diff(&g1, &g2, v), 0.0);
            }
        }
        let drop = Some((0.3f32, DropoutKey(4)));
        let part = |t: &Tensor| t.narrow(0, 1, 2).unwrap();
        let whole = residual_layer_norm(x.as_tensor(), inp.as_tensor(), &g, &be, 1e-12, drop).unwrap();
        let shard = crate::ops::in_batch_rows(1, 2, || {
            residual_layer_norm(&part(x.as_tensor()), &part(inp.as_tensor()), &g, &be, 1e-12, drop)
        })
        .unwrap();
        assert_eq!(max_diff(&part(&whole), &shard), 0.0);
        // A trained gamma gets its gradient (through the composition).
        let gv = var(&[h], 56, 1.0);
        let y = residual_layer_norm(x.as_tensor(), inp.as_tensor(), gv.as_tensor(), &be, 1e-12, drop).unwrap();
        let gs = grads(&y, &rand(&[b, t, h], 57));
        assert!(gs.get(gv.as_tensor()).is_some());
    }

    #[test]
    fn rms_norm_matches_composition() {
        let (b, t, n, d) = (2, 5, 3, 8);
        let x = var(&[b, t, n * d], 41, 3.0);
        let w = var(&[n * d], 42, 1.0);
        let y1 = row_op(x.as_tensor(), w.as_tensor(), RmsNorm { eps: 1e-5 }).unwrap();
        let y2 = rms_norm_composed(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
        assert!(max_diff(&y1, &y2) < 1e-5, "rms fwd {}", max_diff(&y1, &y2));
        let up = rand(&[b, t, n * d], 43);
        let (g1, g2) = (grads(&y1, &up), grads(&y2, &up));
        for v in [&x, &w] {
            assert!(grad_diff(&g1, &g2, v) < 1e-4, "rms grad");
        }
    }
}
