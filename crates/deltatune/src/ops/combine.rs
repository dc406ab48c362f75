//! How a delta's output joins frozen activations: `base + delta` with no gradient for the frozen
//! base, and (IA)³'s scaling of the last dimension by a learned vector.

use super::cpu::{err, fused_ok, row_op, slice, with_data, Fwd, RowKernel};
use super::profile::timer;
use crate::error::Result;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Tensor};

/// `base + delta` where only `delta` may receive a gradient: candle's `add` would also compute a
/// (discarded) gradient for the frozen `base`. Shapes must be equal.
pub fn add_frozen(delta: &Tensor, base: &Tensor) -> Result<Tensor> {
    if base.track_op() {
        return Ok(delta.add(base)?);
    }
    if fused_ok(delta) {
        return add_frozen_fused(delta, base);
    }
    add_frozen_composed(delta, base)
}

/// Reference implementation of [`add_frozen`]: candle's add with the base detached.
pub fn add_frozen_composed(delta: &Tensor, base: &Tensor) -> Result<Tensor> {
    Ok(delta.add(&base.detach())?)
}

/// `x ⊙ l`, the vector `l` broadcast over every row of `x`'s last dimension ((IA)³ scaling).
pub fn scale_last(x: &Tensor, l: &Tensor) -> Result<Tensor> {
    if fused_ok(x) && l.dtype() == DType::F32 {
        return scale_last_fused(x, l);
    }
    scale_last_composed(x, l)
}

/// Reference implementation of [`scale_last`]: candle's broadcast multiply.
pub fn scale_last_composed(x: &Tensor, l: &Tensor) -> Result<Tensor> {
    let h = l.elem_count();
    Ok(x.broadcast_mul(&l.reshape(h)?)?)
}

// ------------------------------------------------------------------------------------------------
// Adding a frozen constant: the gradient passes to the tracked argument only.

fn add_frozen_fused(delta: &Tensor, base: &Tensor) -> Result<Tensor> {
    if delta.dims() != base.dims() {
        return Err(crate::error::Error::Delta(format!("add_frozen: shapes {:?} and {:?} differ", delta.dims(), base.dims())));
    }
    Ok(delta.contiguous()?.apply_op1(AddFrozen { base: base.contiguous()? })?)
}

struct AddFrozen {
    base: Tensor,
}

impl CustomOp1 for AddFrozen {
    fn name(&self) -> &'static str {
        "add-frozen"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Fwd {
        let _prof = timer("add-frozen", "fwd");
        let x = slice(s, l)?;
        let y = with_data([&self.base], |[b]| {
            if b.len() != x.len() {
                return Err(err("add_frozen: shapes differ"));
            }
            Ok(x.iter().zip(b).map(|(a, b)| a + b).collect::<Vec<f32>>())
        })?;
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let _prof = timer("add-frozen", "bwd");
        Ok(Some(grad.clone()))
    }
}

// ------------------------------------------------------------------------------------------------
// Scaling of the last dimension by a vector, `x ⊙ l` ((IA)³), with gradients for both.

fn scale_last_fused(x: &Tensor, l: &Tensor) -> Result<Tensor> {
    let h = l.elem_count();
    if x.dims().last() != Some(&h) {
        return Err(crate::error::Error::Delta(format!("scale_last: x {:?} and vector of {h}", x.dims())));
    }
    row_op(x, l, ScaleLast)
}

struct ScaleLast;

impl RowKernel for ScaleLast {
    const NAME: &'static str = "scale-last";

    fn forward(&self, y: &mut [f32], x: &[f32], l: &[f32]) {
        for i in 0..y.len() {
            y[i] = x[i] * l[i];
        }
    }

    fn backward_x(&self, dx: &mut [f32], _x: &[f32], l: &[f32], g: &[f32]) {
        for i in 0..dx.len() {
            dx[i] = g[i] * l[i];
        }
    }

    fn backward_w(&self, dl: &mut [f32], x: &[f32], g: &[f32]) {
        for i in 0..dl.len() {
            dl[i] += x[i] * g[i];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::cpu::testing::{grad_diff, grads, max_diff, rand, var};
    use candle_core::Var;

    #[test]
    fn add_frozen_matches_composition() {
        let d = var(&[4, 6, 8], 51, 1.0);
        let base = rand(&[4, 6, 8], 52);
        let y1 = add_frozen_fused(d.as_tensor(), &base).unwrap();
        let y2 = add_frozen_composed(d.as_tensor(), &base).unwrap();
        assert_eq!(max_diff(&y1, &y2), 0.0);
        let up = rand(&[4, 6, 8], 53);
        assert_eq!(grad_diff(&grads(&y1, &up), &grads(&y2, &up), &d), 0.0);
        assert!(add_frozen_fused(d.as_tensor(), &rand(&[4, 6, 7], 54)).is_err());
    }

    #[test]
    fn scale_last_matches_broadcast_mul() {
        // 200 rows: more than one 64-row block of the deterministic dl reduction.
        let x = var(&[4, 50, 24], 21, 1.0);
        let l = Var::from_tensor(&(rand(&[24], 22) + 1.0).unwrap()).unwrap();
        let y1 = scale_last_fused(x.as_tensor(), l.as_tensor()).unwrap();
        let y2 = scale_last_composed(x.as_tensor(), l.as_tensor()).unwrap();
        assert_eq!(max_diff(&y1, &y2), 0.0);
        let up = rand(&[4, 50, 24], 23);
        let (g1, g2) = (grads(&y1, &up), grads(&y2, &up));
        assert!(grad_diff(&g1, &g2, &x) < 1e-6);
        let d = grad_diff(&g1, &g2, &l);
        assert!(d < 1e-4, "dl diff {d}");
        assert!(scale_last_fused(x.as_tensor(), &rand(&[23], 1)).is_err());
    }
}
