//! Losses over a vocabulary or label set: log-softmax and the log-probability of one target per
//! row (fused: no (rows, vocabulary) intermediate besides the gradient).

use super::cpu::{err, exp_f32, fused_ok, gemm, max_lanes, slice, sum_f64_lanes, tensor_from, with_data, Fwd, Gemm, Mat, Out};
use super::linear::{linear_composed, qlinear};
use super::profile::timer;
use crate::error::Result;
use candle_core::quantized::QTensor;
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor, D};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// `log_softmax(logits)[i, targets[i]]` for logits (n, v): (n,). Fused on CPU (no (n, v)
/// intermediate besides the gradient).
pub fn picked_log_prob(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if fused_ok(logits) && logits.rank() == 2 {
        return picked_log_prob_fused(logits, &targets.to_vec1::<u32>()?);
    }
    picked_log_prob_composed(logits, targets)
}

/// Reference implementation of [`picked_log_prob`] from differentiable ops.
pub fn picked_log_prob_composed(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    Ok(log_softmax(logits)?.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?)
}

/// Log-softmax over the last dimension from differentiable ops.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

fn picked_log_prob_fused(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    Ok(logits.contiguous()?.apply_op1(PickedLogProb { targets: targets.to_vec() })?)
}

/// Log-probability of one target per row: log_softmax(logits)[i, t_i], without materialising the
/// log-softmax (language-model heads: rows × a vocabulary of tens of thousands).
struct PickedLogProb {
    targets: Vec<u32>,
}

impl CustomOp1 for PickedLogProb {
    fn name(&self) -> &'static str {
        "picked-log-prob"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Fwd {
        let _prof = timer("picked-log-prob", "fwd");
        let x = slice(s, l)?;
        let (n, v) = l.shape().dims2()?;
        if self.targets.len() != n || self.targets.iter().any(|&t| t as usize >= v) {
            return Err(err(format!("picked log-prob: {} targets for {n} rows of {v}", self.targets.len())));
        }
        let out: Vec<f32> = x
            .par_chunks(v)
            .zip(self.targets.par_iter())
            .map(|(row, &t)| {
                let max = max_lanes(row);
                let sum: f64 = row.iter().map(|&z| exp_f32(z - max) as f64).sum();
                row[t as usize] - max - sum.ln() as f32
            })
            .collect();
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    /// d/dlogits = g_i (onehot(t_i) − softmax_i), with log-sum-exp_i = logits[i, t_i] − out_i.
    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let _prof = timer("picked-log-prob", "bwd");
        let (n, v) = arg.dims2()?;
        let mut dx = vec![0f32; n * v];
        let (res, grad) = (res.to_vec1::<f32>()?, grad.to_vec1::<f32>()?);
        with_data([&arg.contiguous()?], |[x]| {
            dx.par_chunks_mut(v).zip(x.par_chunks(v)).enumerate().for_each(|(i, (d, row))| {
                let t = self.targets[i] as usize;
                let lse = row[t] - res[i];
                let g = grad[i];
                for (dj, &z) in d.iter_mut().zip(row) {
                    *dj = -g * exp_f32(z - lse);
                }
                d[t] += g;
            });
            Ok(())
        })?;
        Ok(Some(tensor_from(dx, (n, v))?))
    }
}

// ------------------------------------------------------------------------------------------------
// Head and loss as one op.

/// The frozen weight (vocabulary, hidden) of a language-model head: f32 or quantized.
#[derive(Clone)]
pub enum HeadWeight {
    Dense(Tensor),
    Quantized(Arc<QTensor>),
}

/// `picked_log_prob(hidden Wᵀ, targets)` for a frozen head weight `w` (vocabulary × hidden) and
/// hidden states (n, hidden), without the (n, vocabulary) logits or their gradient ever existing
/// whole: blocks of rows go through the head product, the log-softmax and — when `hidden` takes
/// part in a graph — the product of their unit gradient (onehot − softmax) with `w`, kept as
/// (n, hidden); the backward scales its rows by the upstream gradient. The same FLOPs as head
/// plus loss, and hundreds of MB less for a vocabulary of 50k. A quantized weight is dequantized
/// once per forward (as training's quantized linear does).
pub fn head_log_prob(hidden: &Tensor, w: &HeadWeight, targets: &Tensor) -> Result<Tensor> {
    if fused_ok(hidden) && hidden.rank() == 2 {
        let op = HeadLogProb { w: w.clone(), targets: targets.to_vec1::<u32>()?, grad: hidden.track_op(), unit: Mutex::new(Vec::new()) };
        return Ok(hidden.contiguous()?.apply_op1(op)?);
    }
    head_log_prob_composed(hidden, w, targets)
}

/// Reference implementation of [`head_log_prob`]: the head's logits, then [`picked_log_prob`].
pub fn head_log_prob_composed(hidden: &Tensor, w: &HeadWeight, targets: &Tensor) -> Result<Tensor> {
    let logits = match w {
        HeadWeight::Dense(w) => linear_composed(hidden, w, None)?,
        HeadWeight::Quantized(q) => qlinear(hidden, q, true)?,
    };
    picked_log_prob(&logits, targets)
}

/// Rows of logits per block (blocks × vocabulary floats of scratch).
const HEAD_BLOCK_ROWS: usize = 512;

struct HeadLogProb {
    w: HeadWeight,
    targets: Vec<u32>,
    /// Whether the hidden states need a gradient (then `unit` is filled in forward).
    grad: bool,
    /// (onehot − softmax) W per row: the gradient of each row's log-probability.
    unit: Mutex<Vec<f32>>,
}

impl CustomOp1 for HeadLogProb {
    fn name(&self) -> &'static str {
        "head-log-prob"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Fwd {
        let _prof = timer("head-log-prob", "fwd");
        let x = slice(s, l)?;
        let (n, h) = l.shape().dims2()?;
        let w = match &self.w {
            HeadWeight::Dense(w) => w.contiguous()?,
            HeadWeight::Quantized(q) => q.dequantize(&Device::Cpu)?,
        };
        let (v, wh) = w.dims2()?;
        if wh != h {
            return Err(err(format!("head log-prob: hidden states have {h} features, the head expects {wh}")));
        }
        if self.targets.len() != n || self.targets.iter().any(|&t| t as usize >= v) {
            return Err(err(format!("head log-prob: {} targets for {n} rows of {v}", self.targets.len())));
        }
        let mut out = vec![0f32; n];
        let mut unit = if self.grad { vec![0f32; n * h] } else { Vec::new() };
        let mut logits = vec![0f32; HEAD_BLOCK_ROWS.min(n) * v];
        with_data([&w], |[ws]| {
            for r0 in (0..n).step_by(HEAD_BLOCK_ROWS) {
                let m = HEAD_BLOCK_ROWS.min(n - r0);
                let z = &mut logits[..m * v];
                gemm(Out::rm(z, v), [m, v, h], Mat::rm(&x[r0 * h..], h), Mat::rm_t(ws, h), Gemm::PARALLEL);
                let (targets, out) = (&self.targets[r0..r0 + m], &mut out[r0..r0 + m]);
                z.par_chunks_mut(v).zip(targets.par_iter()).zip(out.par_iter_mut()).for_each(|((row, &t), o)| {
                    let t = t as usize;
                    let max = max_lanes(row);
                    let zt = row[t];
                    for e in row.iter_mut() {
                        *e = exp_f32(*e - max);
                    }
                    let sum = sum_f64_lanes(row);
                    *o = zt - max - sum.ln() as f32;
                    if self.grad {
                        // onehot − softmax
                        let inv = (1.0 / sum) as f32;
                        for e in row.iter_mut() {
                            *e *= -inv;
                        }
                        row[t] += 1.0;
                    }
                });
                if self.grad {
                    gemm(Out::rm(&mut unit[r0 * h..], h), [m, h, v], Mat::rm(z, v), Mat::rm(ws, h), Gemm::PARALLEL);
                }
            }
            Ok(())
        })?;
        *self.unit.lock().map_err(|_| err("head log-prob: poisoned"))? = unit;
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    /// d hidden_i = g_i · (onehot − softmax)_i W, from the rows kept in forward.
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let _prof = timer("head-log-prob", "bwd");
        let (n, h) = arg.dims2()?;
        let g = grad.to_vec1::<f32>()?;
        let unit = self.unit.lock().map_err(|_| err("head log-prob: poisoned"))?;
        if !self.grad || unit.len() != n * h || g.len() != n {
            return Err(err("head log-prob: backward without the forward's gradient rows"));
        }
        let mut dx = vec![0f32; n * h];
        dx.par_chunks_mut(h).zip(unit.par_chunks(h)).zip(g.par_iter()).for_each(|((d, u), &gi)| {
            for (dj, &uj) in d.iter_mut().zip(u) {
                *dj = gi * uj;
            }
        });
        Ok(Some(tensor_from(dx, (n, h))?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::cpu::testing::{grad_diff, grads, max_diff, rand, var};
    use candle_core::Device;

    #[test]
    fn picked_log_prob_matches_composition() {
        let x = var(&[5, 37], 31, 6.0);
        let t = [3u32, 0, 36, 17, 3];
        let y1 = picked_log_prob_fused(x.as_tensor(), &t).unwrap();
        let y2 = picked_log_prob_composed(x.as_tensor(), &Tensor::new(&t, &Device::Cpu).unwrap()).unwrap();
        assert!(max_diff(&y1, &y2) < 1e-5, "fwd {}", max_diff(&y1, &y2));
        let up = rand(&[5], 32);
        assert!(grad_diff(&grads(&y1, &up), &grads(&y2, &up), &x) < 1e-5);
        assert!(picked_log_prob_fused(x.as_tensor(), &[40]).is_err());
    }

    /// Head and loss in one op against the head's logits and the picked log-probability: values
    /// and the hidden states' gradient, for more rows than a block (two blocks, the second
    /// partial), a frozen input (no gradient kept), and a bad target refused.
    #[test]
    fn head_log_prob_matches_head_then_loss() {
        let (n, h, v) = (HEAD_BLOCK_ROWS + 37, 24, 301);
        let x = var(&[n, h], 61, 1.0);
        let w = HeadWeight::Dense(rand(&[v, h], 62));
        let t: Vec<u32> = (0..n as u32).map(|i| (i * 7919) % v as u32).collect();
        let tt = Tensor::new(t.as_slice(), &Device::Cpu).unwrap();
        let y1 = head_log_prob(x.as_tensor(), &w, &tt).unwrap();
        let y2 = head_log_prob_composed(x.as_tensor(), &w, &tt).unwrap();
        assert!(max_diff(&y1, &y2) < 1e-4, "fwd {}", max_diff(&y1, &y2));
        let up = rand(&[n], 63);
        let d = grad_diff(&grads(&y1, &up), &grads(&y2, &up), &x);
        assert!(d < 1e-5, "grad {d}");
        let frozen = head_log_prob(&x.as_tensor().detach(), &w, &tt).unwrap();
        assert!(max_diff(&frozen, &y2) < 1e-4);
        let bad = Tensor::new(&[v as u32], &Device::Cpu).unwrap();
        assert!(head_log_prob(&x.as_tensor().narrow(0, 0, 1).unwrap(), &w, &bad).is_err());
    }
}
