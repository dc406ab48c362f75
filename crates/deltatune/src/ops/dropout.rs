//! Inverted dropout with a counter-based mask (see [`super::rng`]): the backward regenerates the
//! mask instead of storing it.

use super::cpu::{fused_ok, map_indexed_into, unary, UnaryKernel};
use super::rng::DropoutKey;
use crate::error::Result;
use candle_core::{Device, Tensor};

/// Inverted dropout with a counter-based mask: the same key always drops the same elements, so
/// training is reproducible and resumable, and the backward regenerates the mask instead of
/// storing it. Inside [`super::rng::in_batch_rows`], `x` (batch-major) gets the masks its rows
/// have in the whole batch.
pub fn dropout(x: &Tensor, p: f32, key: DropoutKey) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let key = key.for_rows(x.elem_count());
    if fused_ok(x) {
        return unary(x, Dropout { p, key });
    }
    dropout_composed(x, p, key)
}

/// Reference implementation of [`dropout`]: materialises the mask and multiplies.
pub fn dropout_composed(x: &Tensor, p: f32, key: DropoutKey) -> Result<Tensor> {
    let n = x.elem_count();
    let scale = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..n as u64).map(|i| if key.keep(i, p) { scale } else { 0.0 }).collect();
    let mask = Tensor::from_vec(mask, x.shape(), &Device::Cpu)?.to_device(x.device())?.to_dtype(x.dtype())?;
    Ok(x.mul(&mask)?)
}

/// Element `i` of `x`, kept and scaled by 1 / (1 − p), or dropped, by the key.
#[inline(always)]
pub(crate) fn masked(key: DropoutKey, p: f32, i: u64, x: f32) -> f32 {
    if key.keep(i, p) {
        x * (1.0 / (1.0 - p))
    } else {
        0.0
    }
}

struct Dropout {
    p: f32,
    key: DropoutKey,
}

impl UnaryKernel for Dropout {
    const NAME: &'static str = "dropout";

    fn forward(&self, y: &mut [f32], x: &[f32]) {
        map_indexed_into(y, x, |i, x| masked(self.key, self.p, i, x));
    }

    /// The same mask on the gradient.
    fn backward(&self, dx: &mut [f32], _x: &[f32], g: &[f32]) {
        self.forward(dx, g);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::cpu::testing::{grad_diff, grads, max_diff, rand, var};

    #[test]
    fn dropout_matches_composition() {
        let x = var(&[6, 50], 9, 4.0);
        let up = rand(&[6, 50], 10);
        let key = DropoutKey(77);
        let d1 = unary(x.as_tensor(), Dropout { p: 0.3, key }).unwrap();
        let d2 = dropout_composed(x.as_tensor(), 0.3, key).unwrap();
        assert_eq!(max_diff(&d1, &d2), 0.0);
        assert!(grad_diff(&grads(&d1, &up), &grads(&d2, &up), &x) < 1e-6);
    }

    /// Rows 3..5 of a batch, dropped inside `in_batch_rows(3, 2)`, get the whole batch's masks —
    /// forward and backward.
    #[test]
    fn shard_rows_get_the_whole_batch_masks() {
        let x = var(&[6, 4, 5], 3, 1.0);
        let key = DropoutKey(11);
        let whole = dropout(x.as_tensor(), 0.4, key).unwrap().narrow(0, 3, 2).unwrap();
        let part = var(&[2, 4, 5], 0, 1.0);
        part.set(&x.as_tensor().narrow(0, 3, 2).unwrap()).unwrap();
        let shard = crate::ops::in_batch_rows(3, 2, || dropout(part.as_tensor(), 0.4, key)).unwrap();
        assert_eq!(max_diff(&whole, &shard), 0.0);
        let g = shard.sum_all().unwrap().backward().unwrap();
        let mask = g.get(part.as_tensor()).unwrap();
        let expected = (whole.ne(0f32).unwrap().to_dtype(candle_core::DType::F32).unwrap() / 0.6).unwrap();
        assert!(max_diff(mask, &expected) < 1e-6);
    }
}
