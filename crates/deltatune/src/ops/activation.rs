//! Activations and gates: exact GELU (fused), tanh GELU, the SwiGLU gate (fused).

use super::cpu::{
    erf_f32, err, exp_f32, fused_ok, grad_for, map_into, sigmoid, slice, unary, with_data, zip_map_into, Fwd, Grads2,
    UnaryKernel, CHUNK,
};
use super::profile::timer;
use crate::error::Result;
use candle_core::{CpuStorage, CustomOp2, Layout, Tensor};
use rayon::prelude::*;

/// Exact (erf) GELU: `x * Φ(x)`.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if fused_ok(x) {
        return unary(x, Gelu);
    }
    gelu_composed(x)
}

/// Reference implementation of [`gelu`] (candle's erf GELU).
pub fn gelu_composed(x: &Tensor) -> Result<Tensor> {
    Ok(x.gelu_erf()?)
}

/// tanh-approximated GELU (HF `gelu_new`).
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    Ok(x.gelu()?)
}

/// The SwiGLU gate `silu(gate) ⊙ up` (Llama feed-forward). Fused on CPU.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if fused_ok(gate) {
        return Ok(gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)?);
    }
    swiglu_composed(gate, up)
}

/// Reference implementation of [`swiglu`] from candle ops.
pub fn swiglu_composed(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok((gate.silu()? * up)?)
}

// ------------------------------------------------------------------------------------------------
// Exact GELU.

struct Gelu;

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

impl UnaryKernel for Gelu {
    const NAME: &'static str = "gelu-erf";

    fn forward(&self, y: &mut [f32], x: &[f32]) {
        gelu_into(y, x);
    }

    fn backward(&self, dx: &mut [f32], x: &[f32], g: &[f32]) {
        gelu_grad_into(dx, x, g);
    }
}

/// `y = gelu(x)`, elementwise, in parallel chunks.
pub(crate) fn gelu_into(y: &mut [f32], x: &[f32]) {
    map_into(y, x, |x| 0.5 * x * (1.0 + erf_f32(x * FRAC_1_SQRT_2)));
}

/// `dx = g * gelu'(x)`, elementwise, in parallel chunks.
pub(crate) fn gelu_grad_into(dx: &mut [f32], x: &[f32], g: &[f32]) {
    zip_map_into(dx, x, g, |x, g| {
        let cdf = 0.5 * (1.0 + erf_f32(x * FRAC_1_SQRT_2));
        let pdf = FRAC_1_SQRT_2PI * exp_f32(-0.5 * x * x);
        g * (cdf + x * pdf)
    });
}

// ------------------------------------------------------------------------------------------------
// SwiGLU gate: silu(g) ⊙ u, with gradients for both.

/// `y = silu(g) ⊙ u`, elementwise, in parallel chunks.
pub(crate) fn swiglu_into(y: &mut [f32], g: &[f32], u: &[f32]) {
    zip_map_into(y, g, u, |g, u| g * sigmoid(g) * u);
}

/// `dg` and `du` of `silu(g) ⊙ u` from the output gradient `dy`, elementwise, in parallel chunks.
pub(crate) fn swiglu_grad_into(dg: &mut [f32], du: &mut [f32], gs: &[f32], us: &[f32], dy: &[f32]) {
    dg.par_chunks_mut(CHUNK)
        .zip(du.par_chunks_mut(CHUNK))
        .zip(gs.par_chunks(CHUNK).zip(us.par_chunks(CHUNK)).zip(dy.par_chunks(CHUNK)))
        .for_each(|((dgc, duc), ((gc, uc), dyc))| {
            for i in 0..gc.len() {
                let s = sigmoid(gc[i]);
                duc[i] = dyc[i] * gc[i] * s;
                dgc[i] = dyc[i] * uc[i] * s * (1.0 + gc[i] * (1.0 - s));
            }
        });
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Fwd {
        let _prof = timer("swiglu", "fwd");
        let (g, u) = (slice(s1, l1)?, slice(s2, l2)?);
        if g.len() != u.len() {
            return Err(err("swiglu: gate and up shapes differ"));
        }
        let mut y = vec![0f32; g.len()];
        swiglu_into(&mut y, g, u);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(&self, g: &Tensor, u: &Tensor, _res: &Tensor, grad: &Tensor) -> Grads2 {
        let _prof = timer("swiglu", "bwd");
        let grad = grad.contiguous()?;
        let n = g.elem_count();
        let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
        with_data([g, u, &grad], |[gs, us, dy]| {
            swiglu_grad_into(&mut dg, &mut du, gs, us, dy);
            Ok(())
        })?;
        Ok((grad_for(g, dg)?, grad_for(u, du)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::cpu::testing::{grad_diff, grads, max_diff, rand, var};

    #[test]
    fn gelu_matches_composition() {
        let x = var(&[6, 50], 9, 4.0);
        let up = rand(&[6, 50], 10);
        let y1 = unary(x.as_tensor(), Gelu).unwrap();
        let y2 = gelu_composed(x.as_tensor()).unwrap();
        assert!(max_diff(&y1, &y2) < 1e-6);
        assert!(grad_diff(&grads(&y1, &up), &grads(&y2, &up), &x) < 1e-5);
    }

    #[test]
    fn swiglu_matches_composition() {
        let g = var(&[2, 5, 16], 46, 4.0);
        let u = var(&[2, 5, 16], 47, 1.0);
        let y1 = g.as_tensor().apply_op2(u.as_tensor(), SwiGlu).unwrap();
        let y2 = swiglu_composed(g.as_tensor(), u.as_tensor()).unwrap();
        assert!(max_diff(&y1, &y2) < 1e-5, "swiglu fwd {}", max_diff(&y1, &y2));
        let up = rand(&[2, 5, 16], 48);
        let (g1, g2) = (grads(&y1, &up), grads(&y2, &up));
        for v in [&g, &u] {
            assert!(grad_diff(&g1, &g2, v) < 1e-5, "swiglu grad");
        }
    }
}
