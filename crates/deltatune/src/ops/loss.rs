//! Losses over a vocabulary or label set: log-softmax and the log-probability of one target per
//! row (fused: no (rows, vocabulary) intermediate besides the gradient).

use super::cpu::{err, exp_f32, fused_ok, max_lanes, slice, tensor_from, with_data, Fwd};
use super::profile::timer;
use crate::error::Result;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, D};
use rayon::prelude::*;

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
}
