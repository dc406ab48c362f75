//! Rotary position embedding (HF `rotate_half` layout).

use super::cpu::{fused_ok, rows_into, unary, UnaryKernel};
use crate::error::Result;
use candle_core::{Tensor, D};

/// Rotary position embedding, HF layout (`rotate_half`): `x cos + rotate_half(x) sin` for `x`
/// (..., d) and tables that broadcast to it (the decoder: x (b, t, heads, d), tables (t, 1, d)).
/// Differentiable; fused on CPU for x (b, t, heads, d) with tables (t, 1, d).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if fused_ok(x) && x.rank() == 4 && cos.rank() == 3 && cos.dim(1)? == 1 {
        return rope_fused(x, cos, sin);
    }
    rope_composed(x, cos, sin)
}

/// Reference implementation of [`rope`] from differentiable ops.
pub fn rope_composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let half = d / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?)
}

/// The fused op for x (b, t, n, d) and tables (t, 1, d).
fn rope_fused(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_, t, n, d) = x.dims4()?;
    let table = |c: &Tensor| -> Result<Vec<f32>> { Ok(c.flatten_all()?.to_vec1::<f32>()?) };
    let (cos, sin) = (table(cos)?, table(sin)?);
    if cos.len() != t * d || sin.len() != t * d || d % 2 != 0 {
        return Err(crate::error::Error::Delta(format!("rope: tables of {} for {t} positions of {d}", cos.len())));
    }
    unary(x, Rope { cos, sin, t, n, d })
}

/// Rotary embedding of x (b, t, n, d) with tables (t, d): for i < d/2,
/// y_i = x_i c_i − x_{i+d/2} s_i and y_{i+d/2} = x_{i+d/2} c_{i+d/2} + x_i s_{i+d/2}.
struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    t: usize,
    n: usize,
    d: usize,
}

impl Rope {
    /// Applies the rotation (`sign` 1) or its transpose (`sign` −1, the backward) to `x` into `y`.
    fn apply(&self, y: &mut [f32], x: &[f32], sign: f32) {
        let (d, half) = (self.d, self.d / 2);
        rows_into(y, x, d, |row, yr, xr| {
            let p = (row / self.n) % self.t;
            let (c, s) = (&self.cos[p * d..(p + 1) * d], &self.sin[p * d..(p + 1) * d]);
            for i in 0..half {
                // Forward reads the partner's sine at the output index; the transpose at the
                // partner's index.
                let (si, sh) = if sign > 0.0 { (s[i], s[i + half]) } else { (s[i + half], s[i]) };
                yr[i] = xr[i] * c[i] - sign * xr[i + half] * si;
                yr[i + half] = xr[i + half] * c[i + half] + sign * xr[i] * sh;
            }
        });
    }
}

impl UnaryKernel for Rope {
    const NAME: &'static str = "rope";

    fn forward(&self, y: &mut [f32], x: &[f32]) {
        self.apply(y, x, 1.0);
    }

    fn backward(&self, dx: &mut [f32], _x: &[f32], g: &[f32]) {
        self.apply(dx, g, -1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::cpu::testing::{grad_diff, grads, max_diff, rand, var};
    use candle_core::Device;

    #[test]
    fn rope_matches_composition() {
        // Rotary on (b, t, heads, d) with (t, 1, d) tables.
        let (b, t, n, d) = (2, 5, 3, 8);
        let x4 = var(&[b, t, n, d], 44, 1.0);
        let ang: Vec<f32> = (0..t * d).map(|i| (i as f32 * 0.37).sin() * 2.0).collect();
        let cos = Tensor::from_vec(ang.iter().map(|a| a.cos()).collect::<Vec<_>>(), (t, 1, d), &Device::Cpu).unwrap();
        let sin = Tensor::from_vec(ang.iter().map(|a| a.sin()).collect::<Vec<_>>(), (t, 1, d), &Device::Cpu).unwrap();
        let y1 = rope_fused(x4.as_tensor(), &cos, &sin).unwrap();
        let y2 = rope_composed(x4.as_tensor(), &cos, &sin).unwrap();
        assert!(max_diff(&y1, &y2) < 1e-6, "rope fwd {}", max_diff(&y1, &y2));
        let up = rand(&[b, t, n, d], 45);
        assert!(grad_diff(&grads(&y1, &up), &grads(&y2, &up), &x4) < 1e-5, "rope grad");
    }
}
