//! Rotary position embedding (HF `rotate_half` layout).

use super::cpu::{fused_ok, rows_into, unary, UnaryKernel};
use crate::error::Result;
use candle_core::{Tensor, D};
use rayon::prelude::*;

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
    let (cos, sin) = rope_tables(cos, sin, t, d)?;
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
        let d = self.d;
        rows_into(y, x, d, |row, yr, xr| {
            let p = (row / self.n) % self.t;
            rotate(yr, xr, &self.cos[p * d..(p + 1) * d], &self.sin[p * d..(p + 1) * d], sign);
        });
    }
}

/// One head's rotation (`sign` 1) or its transpose (`sign` −1) of `x` into `y`, with the tables'
/// row `c`, `s` of its position.
#[inline]
fn rotate(y: &mut [f32], x: &[f32], c: &[f32], s: &[f32], sign: f32) {
    let half = x.len() / 2;
    for i in 0..half {
        // Forward reads the partner's sine at the output index; the transpose at the partner's
        // index.
        let (si, sh) = if sign > 0.0 { (s[i], s[i + half]) } else { (s[i + half], s[i]) };
        y[i] = x[i] * c[i] - sign * x[i + half] * si;
        y[i + half] = x[i + half] * c[i + half] + sign * x[i] * sh;
    }
}

/// Rotary tables (t × d each) as flat vectors, checked against the head size.
pub(super) fn rope_tables(cos: &Tensor, sin: &Tensor, t: usize, d: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    let table = |c: &Tensor| -> Result<Vec<f32>> { Ok(c.flatten_all()?.to_vec1::<f32>()?) };
    let (cos, sin) = (table(cos)?, table(sin)?);
    if cos.len() != t * d || sin.len() != t * d || !d.is_multiple_of(2) {
        return Err(crate::error::Error::Delta(format!("rope: tables of {} for {t} positions of {d}", cos.len())));
    }
    Ok((cos, sin))
}

/// The rotation (`sign` 1) or its transpose (`sign` −1) in place on `heads` heads of `d` columns
/// starting at column `col` of rows `stride` apart, row r at position r mod t of the tables (t × d):
/// the fused op's numbers on a column block of wider rows (a block's q, k, v side by side).
pub(super) fn rope_in_place(buf: &mut [f32], stride: usize, col: usize, heads: usize, d: usize, (cos, sin): (&[f32], &[f32]), sign: f32) {
    let t = cos.len() / d.max(1);
    buf.par_chunks_mut(stride.max(1)).enumerate().for_each_init(
        || vec![0f32; d],
        |x, (row, r)| {
            let p = row % t.max(1);
            let (c, s) = (&cos[p * d..(p + 1) * d], &sin[p * d..(p + 1) * d]);
            for hd in r[col..col + heads * d].chunks_exact_mut(d) {
                x.copy_from_slice(hd);
                rotate(hd, x, c, s, sign);
            }
        },
    );
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
