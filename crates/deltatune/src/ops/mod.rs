//! Differentiable building blocks of the backbones and deltas.
//!
//! candle's fused `layer_norm` and `softmax_last_dim` have no backward, and its generic `matmul`
//! backward also computes gradients for frozen weights. Each function here picks the fastest
//! implementation that keeps gradients flowing to everything that is trainable:
//! a fused CPU kernel with a hand-written backward where we have one ([`kernels`]), otherwise a
//! composition of differentiable candle ops (which also serves as the reference the kernels are
//! tested against, and as the path for non-CPU devices).

pub mod kernels;
pub mod profile;
pub(crate) mod rng;

pub use rng::{hash_str, DropoutKey};

use crate::error::Result;
use candle_core::{DType, Device, Tensor, D};

/// Whether the fused kernels may be used for a tensor (CPU, f32).
fn fused_ok(t: &Tensor) -> bool {
    matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32 && kernels::enabled()
}

/// `x W^T + b` for `x` of shape (..., in), `w` (out, in), `b` (out).
///
/// When `w` and `b` are frozen (not derived from a `Var`), the fused kernel computes only the input
/// gradient in backward; candle's matmul would also compute the (discarded) weight gradient.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let frozen = !w.track_op() && b.is_none_or(|b| !b.track_op());
    if frozen && fused_ok(x) {
        return kernels::frozen_linear(x, w, b);
    }
    linear_composed(x, w, b)
}

/// `gelu(x W^T + b)` (exact GELU). With frozen `w`, `b` this is one fused op whose backward
/// applies the GELU gradient on the way into the input-gradient matmul.
pub fn linear_gelu(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let frozen = !w.track_op() && b.is_none_or(|b| !b.track_op());
    if frozen && fused_ok(x) {
        return kernels::frozen_linear_gelu(x, w, b);
    }
    gelu(&linear(x, w, b)?)
}

/// `x W^T` with a frozen quantized `W` (out, in). Gradients flow to `x` only.
///
/// With `exact`, or for more than a few rows, `W` is dequantized into a transient f32 matrix and
/// multiplied in f32 (the same numbers an f32 reference multiplies); for a few rows (token-by-token
/// generation) the quantized dot-product kernels run directly on the blocks, which also quantize
/// the activations to 8 bits. The backward pass always dequantizes.
pub fn qlinear(x: &Tensor, w: &std::sync::Arc<candle_core::quantized::QTensor>, exact: bool) -> Result<Tensor> {
    kernels::qlinear(x, w, exact)
}

/// RMS normalisation over the last dimension: `x / sqrt(mean(x^2) + eps) * weight`. Fused on
/// CPU (gradients for `x` and a trainable weight).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if fused_ok(x) {
        return kernels::rms_norm(x, weight, eps);
    }
    rms_norm_composed(x, weight, eps)
}

/// Reference implementation of [`rms_norm`] from differentiable ops.
pub fn rms_norm_composed(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let y = x.broadcast_div(&(ms + eps)?.sqrt()?)?;
    Ok(y.broadcast_mul(weight)?)
}

/// Rotary position embedding, HF layout (`rotate_half`): `x cos + rotate_half(x) sin` for `x`
/// (..., d) and tables that broadcast to it (the decoder: x (b, t, heads, d), tables (t, 1, d)).
/// Differentiable; fused on CPU for x (b, t, heads, d) with tables (t, 1, d).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if fused_ok(x) && x.rank() == 4 && cos.rank() == 3 && cos.dim(1)? == 1 {
        return kernels::rope(x, cos, sin);
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

/// Reference implementation of [`linear`] from candle ops.
pub fn linear_composed(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (in_dim, rows) = match dims.split_last() {
        Some((last, lead)) => (*last, lead.iter().product::<usize>()),
        None => return Err(candle_core::Error::Msg("linear: scalar input".into()).into()),
    };
    let out_dim = w.dim(0)?;
    let y = x.reshape((rows, in_dim))?.matmul(&w.t()?)?;
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out_dims = dims;
    if let Some(last) = out_dims.last_mut() {
        *last = out_dim;
    }
    Ok(y.reshape(out_dims)?)
}

/// `base + delta` where only `delta` may receive a gradient: candle's `add` would also compute a
/// (discarded) gradient for the frozen `base`. Shapes must be equal.
pub fn add_frozen(delta: &Tensor, base: &Tensor) -> Result<Tensor> {
    if base.track_op() {
        return Ok(delta.add(base)?);
    }
    if fused_ok(delta) {
        return kernels::add_frozen(delta, base);
    }
    Ok(delta.add(&base.detach())?)
}

/// `x ⊙ l`, the vector `l` broadcast over every row of `x`'s last dimension ((IA)³ scaling).
pub fn scale_last(x: &Tensor, l: &Tensor) -> Result<Tensor> {
    if fused_ok(x) && l.dtype() == DType::F32 {
        return kernels::scale_last(x, l);
    }
    let h = l.elem_count();
    Ok(x.broadcast_mul(&l.reshape(h)?)?)
}

/// Layer normalisation over the last dimension: `(x - mean) / sqrt(var + eps) * gamma + beta`.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    if fused_ok(x) {
        return kernels::layer_norm(x, gamma, beta, eps);
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

/// Exact (erf) GELU: `x * Φ(x)`.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if fused_ok(x) {
        return kernels::gelu(x);
    }
    Ok(x.gelu_erf()?)
}

/// tanh-approximated GELU (HF `gelu_new`).
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    Ok(x.gelu()?)
}

/// Inverted dropout with a counter-based mask: the same key always drops the same elements, so
/// training is reproducible and resumable, and the backward regenerates the mask instead of
/// storing it.
pub fn dropout(x: &Tensor, p: f32, key: DropoutKey) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    if fused_ok(x) {
        return kernels::dropout(x, p, key);
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

/// The SwiGLU gate `silu(gate) ⊙ up` (Llama feed-forward). Fused on CPU.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if fused_ok(gate) {
        return kernels::swiglu(gate, up);
    }
    Ok((gate.silu()? * up)?)
}

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
    if fused_ok(q) {
        return kernels::attention(q, k, v, key_bias, heads, probs_dropout);
    }
    attention_composed(q, k, v, key_bias, heads, probs_dropout)
}

/// Causal multi-head attention (decoders): like [`attention`], with query i (of the last tq
/// positions of tk) attending keys 0..=tk − tq + i only.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, key_bias: &Tensor, heads: usize) -> Result<Tensor> {
    if fused_ok(q) {
        return kernels::causal_attention(q, k, v, key_bias, heads);
    }
    causal_attention_composed(q, k, v, key_bias, heads)
}

/// Reference implementation of [`causal_attention`] from candle ops.
pub fn causal_attention_composed(q: &Tensor, k: &Tensor, v: &Tensor, key_bias: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, tq, h) = q.dims3()?;
    let tk = k.dim(1)?;
    let d = h / heads;
    let split = |t: &Tensor, len: usize| -> Result<Tensor> { Ok(t.reshape((b, len, heads, d))?.transpose(1, 2)?.contiguous()?) };
    let (qh, kh, vh) = (split(q, tq)?, split(k, tk)?, split(v, tk)?);
    let past = tk - tq;
    let causal: Vec<f32> = (0..tq).flat_map(|i| (0..tk).map(move |j| if j <= past + i { 0.0 } else { f32::NEG_INFINITY })).collect();
    let causal = Tensor::from_vec(causal, (1, 1, tq, tk), q.device())?;
    let scores = (qh.matmul(&kh.t()?)? * (1.0 / (d as f64).sqrt()))?;
    let scores = scores.broadcast_add(&key_bias.reshape((b, 1, 1, tk))?)?.broadcast_add(&causal)?;
    let ctx = softmax_composed(&scores)?.matmul(&vh)?;
    Ok(ctx.transpose(1, 2)?.reshape((b, tq, h))?)
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
    let (b, tq, h) = q.dims3()?;
    let tk = k.dim(1)?;
    let d = h / heads;
    let split = |t: &Tensor, len: usize| -> Result<Tensor> {
        Ok(t.reshape((b, len, heads, d))?.transpose(1, 2)?.contiguous()?) // (b, heads, t, d)
    };
    let (qh, kh, vh) = (split(q, tq)?, split(k, tk)?, split(v, tk)?);
    let scale = 1.0 / (d as f64).sqrt();
    let scores = (qh.matmul(&kh.t()?)? * scale)?; // (b, heads, tq, tk)
    let scores = scores.broadcast_add(&key_bias.reshape((b, 1, 1, tk))?)?;
    let probs = softmax_composed(&scores)?;
    let probs = match probs_dropout {
        Some((p, key)) if p > 0.0 => dropout_composed(&probs, p, key)?,
        _ => probs,
    };
    let ctx = probs.matmul(&vh)?; // (b, heads, tq, d)
    Ok(ctx.transpose(1, 2)?.reshape((b, tq, h))?)
}

/// Softmax over the last dimension from differentiable ops (max-subtracted for stability).
pub fn softmax_composed(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// `log_softmax(logits)[i, targets[i]]` for logits (n, v): (n,). Fused on CPU (no (n, v)
/// intermediate besides the gradient).
pub fn picked_log_prob(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if fused_ok(logits) && logits.rank() == 2 {
        return kernels::picked_log_prob(logits, &targets.to_vec1::<u32>()?);
    }
    Ok(log_softmax(logits)?.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?)
}

/// Log-softmax over the last dimension from differentiable ops.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// Additive attention bias from a 0/1 mask: 0 where `mask` is 1, `f32::MIN` where it is 0
/// (what transformers uses, so fully-masked rows behave the same).
pub fn mask_to_bias(mask: &Tensor) -> Result<Tensor> {
    let m = mask.to_dtype(DType::F32)?;
    Ok(((m - 1.0)? * -(f32::MIN as f64))?)
}

/// Sizes the global thread pool used by the fused kernels (call once, before any tensor work).
pub fn set_threads(n: usize) -> Result<()> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| crate::error::Error::arg("--threads", e.to_string()))
}
