//! Linear layers with frozen weights: `x W^T + b`, fused with GELU, and with quantized `W`.
//!
//! candle's `matmul` backward also computes the (discarded) gradient of a frozen weight; the fused
//! op computes only the input gradient `dy W`, calling `gemm` on the row-major data directly.

use super::activation::{gelu, gelu_composed, gelu_grad_into, gelu_into};
use super::cpu::{add_into, column_sums, err, fused_ok, gemm, rows_cols, slice, tensor_from, with_data, Fwd, Gemm, Grads2, Grads3, Mat, Out, SyncPtr};
use super::profile::timer;
use crate::error::Result;
use super::qmatmul;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Device, Layout, Shape, Tensor, D};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// `x W^T + b` for `x` of shape (..., in), `w` (out, in), `b` (out).
///
/// When `w` and `b` are frozen (not derived from a `Var`), the fused kernel computes only the input
/// gradient in backward; candle's matmul would also compute the (discarded) weight gradient. When
/// either trains (full fine-tuning, BitFit, a delta's own matrices), the trained-linear op computes
/// in backward exactly the gradients whose tensors take part in the graph: `dx` only when `x`
/// does, `dW` (one `gemm`, written straight into its buffer) only when `w` does, `db` (the column
/// sums of `dy`) only when `b` does.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    if fused_ok(x) {
        return if frozen(w, b) { frozen_linear(x, w, b, false) } else { trained_linear(x, w, b, false) };
    }
    linear_composed(x, w, b)
}

/// `gelu(x W^T + b)` (exact GELU). With frozen `w`, `b` this is one fused op whose backward
/// applies the GELU gradient on the way into the input-gradient matmul.
pub fn linear_gelu(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    if fused_ok(x) {
        return if frozen(w, b) { frozen_linear(x, w, b, true) } else { trained_linear(x, w, b, true) };
    }
    gelu(&linear(x, w, b)?)
}

/// `x W^T` with a frozen quantized `W` (out, in). Gradients flow to `x` only.
///
/// With `exact`, or for more than a few rows, `W` is dequantized into a transient f32 matrix and
/// multiplied in f32 (the same numbers an f32 reference multiplies); for a few rows (token-by-token
/// generation) the quantized dot-product kernels run directly on the blocks, which also quantize
/// the activations to 8 bits. The backward pass always dequantizes.
pub fn qlinear(x: &Tensor, w: &Arc<QTensor>, exact: bool) -> Result<Tensor> {
    let (_, in_dim) = w.shape().dims2()?;
    let features = x.dim(D::Minus1)?;
    if features != in_dim {
        return Err(crate::error::Error::Delta(format!(
            "quantized linear: input has {features} features, weight expects {in_dim}"
        )));
    }
    // Without gradients (generation, serving, evaluation) short inputs stay on the quantized
    // kernels; with them, as before, only a few rows do.
    let quant_rows = if x.track_op() { QUANT_DOT_ROWS } else { QUANT_DOT_ROWS_INFERENCE };
    Ok(x.contiguous()?.apply_op1(QLinear { w: w.clone(), exact, quant_rows })?)
}

/// At most this many rows take [`low_rank_rows`]' row-by-row path.
pub const LOW_RANK_ROWS: usize = 64;

/// `(x A^T) B^T` without gradients, for `x` (..., in), `a` (r, in), `b` (out, r): each row on its
/// own with a fixed summation order, so that a row's result does not depend on the other rows of
/// the batch (a request decoded in a mixed batch gets the numbers it gets alone; a blocked `gemm`
/// may sum in an order that depends on the number of rows). For at most [`LOW_RANK_ROWS`] rows;
/// more go through two products.
pub fn low_rank_rows(x: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (r, k) = a.dims2()?;
    let (n, r2) = b.dims2()?;
    let rows = x.elem_count() / k.max(1);
    if dims.last() != Some(&k) || r2 != r {
        return Err(crate::error::Error::Delta(format!("low_rank_rows: x {dims:?}, a ({r}, {k}), b ({n}, {r2})")));
    }
    if rows > LOW_RANK_ROWS || !fused_ok(x) {
        return linear(&linear(&x.detach(), &a.detach(), None)?, &b.detach(), None);
    }
    let xs = x.detach().flatten_all()?.to_vec1::<f32>()?;
    let av = a.detach().flatten_all()?.to_vec1::<f32>()?;
    let bv = b.detach().flatten_all()?.to_vec1::<f32>()?;
    let mut out = vec![0f32; rows * n];
    let mut t = vec![0f32; r];
    for (o, xr) in out.chunks_exact_mut(n).zip(xs.chunks_exact(k)) {
        for (i, ti) in t.iter_mut().enumerate() {
            *ti = dot8(xr, &av[i * k..(i + 1) * k]);
        }
        for (j, oj) in o.iter_mut().enumerate() {
            *oj = dot8(&t, &bv[j * r..(j + 1) * r]);
        }
    }
    let mut out_dims = dims;
    if let Some(last) = out_dims.last_mut() {
        *last = n;
    }
    Ok(tensor_from(out, out_dims)?)
}

/// A dot product in eight fixed lanes (vectorisable, same order every time).
fn dot8(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
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

/// Reference implementation of [`linear_gelu`] from candle ops.
pub fn linear_gelu_composed(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    gelu_composed(&linear_composed(x, w, b)?)
}

/// Whether neither the weight nor the bias takes part in the graph.
fn frozen(w: &Tensor, b: Option<&Tensor>) -> bool {
    !w.track_op() && b.is_none_or(|b| !b.track_op())
}

// ------------------------------------------------------------------------------------------------
// The fused op: y = x W^T + b with W, b constants; backward only dx = dy W.

struct FrozenLinear {
    w: Tensor,
    b: Option<Tensor>,
    /// Exact GELU applied to the output (`gelu(x W^T + b)` in one op). The pre-activation is kept
    /// here for the backward pass, so the graph holds one node, not two, and the GELU gradient is
    /// applied on the way into the input-gradient matmul.
    gelu: bool,
    pre: Mutex<Option<Vec<f32>>>,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        if self.gelu {
            "frozen-linear-gelu"
        } else {
            "frozen-linear"
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Fwd {
        let _prof = timer("frozen-linear", "fwd");
        let x = slice(s, l)?;
        match &self.b {
            Some(b) => with_data([&self.w, b], |[ws, bs]| dense_fwd(x, l.shape(), ws, self.w.dims2()?, Some(bs), self.gelu, &self.pre)),
            None => with_data([&self.w], |[ws]| dense_fwd(x, l.shape(), ws, self.w.dims2()?, None, self.gelu, &self.pre)),
        }
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = pre_activation_grad(grad, self.gelu, &self.pre)?;
        let _prof = timer("frozen-linear", "bwd");
        Ok(Some(input_grad(&grad, &self.w, arg.shape())?))
    }
}

/// `y = [gelu](x W^T + b)` for `x` of `shape` (..., in) and `w` (out, in): the bias copied into
/// each row, then one `gemm` adding `x W^T`. With GELU the pre-activation is kept in `pre` for
/// the backward pass.
fn dense_fwd(x: &[f32], shape: &Shape, ws: &[f32], (out_dim, w_in): (usize, usize), bs: Option<&[f32]>, gelu: bool, pre: &Mutex<Option<Vec<f32>>>) -> Fwd {
    let (rows, in_dim) = rows_cols(shape);
    if w_in != in_dim {
        return Err(err(format!("linear: input has {in_dim} features, weight expects {w_in}")));
    }
    let mut y = vec![0f32; rows * out_dim];
    dense_into(&mut y, x, in_dim, ws, out_dim, bs)?;
    let mut dims = shape.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = out_dim;
    }
    if gelu {
        let _prof = timer("gelu-erf", "fwd");
        let mut a = vec![0f32; y.len()];
        gelu_into(&mut a, &y);
        *pre.lock().map_err(|_| err("linear-gelu: poisoned lock"))? = Some(y);
        return Ok((CpuStorage::F32(a), Shape::from(dims)));
    }
    Ok((CpuStorage::F32(y), Shape::from(dims)))
}

/// `y = x Wᵀ + b` into `y` (rows × out) for `x` (rows × in) and `ws` (out × in): the bias copied
/// into each row, then one `gemm` adding `x Wᵀ`.
pub(super) fn dense_into(y: &mut [f32], x: &[f32], in_dim: usize, ws: &[f32], out_dim: usize, bs: Option<&[f32]>) -> candle_core::Result<()> {
    let rows = if in_dim == 0 { 0 } else { x.len() / in_dim };
    if y.len() != rows * out_dim || ws.len() != out_dim * in_dim {
        return Err(err("linear: buffer sizes do not match the weight"));
    }
    if let Some(bs) = bs {
        if bs.len() != out_dim {
            return Err(err("linear: bias length differs from weight rows"));
        }
        y.par_chunks_mut(out_dim.max(1)).for_each(|row| row.copy_from_slice(bs));
    }
    let how = Gemm::PARALLEL.accumulate(bs.is_some());
    gemm(Out::rm(y, out_dim), [rows, out_dim, in_dim], Mat::rm(x, in_dim), Mat::rm_t(ws, in_dim), how);
    Ok(())
}

/// The gradient at the linear map's output: `grad` itself, or through GELU from the kept
/// pre-activation.
fn pre_activation_grad(grad: &Tensor, gelu: bool, pre: &Mutex<Option<Vec<f32>>>) -> candle_core::Result<Tensor> {
    let grad = grad.contiguous()?;
    if !gelu {
        return Ok(grad);
    }
    let _prof = timer("gelu-erf", "bwd");
    let pre = pre.lock().map_err(|_| err("linear-gelu: poisoned lock"))?;
    let h = pre.as_ref().ok_or_else(|| err("linear-gelu: backward without forward"))?;
    let mut dh = vec![0f32; h.len()];
    with_data([&grad], |[gs]| {
        gelu_grad_into(&mut dh, h, gs);
        Ok(())
    })?;
    tensor_from(dh, grad.shape())
}

/// `dW = dyᵀ x` (out × in) for `dy` (rows × out) and `x` (rows × in). The long inner dimension
/// (rows) and a short output make `gemm`'s own threading lose about a tenth against one thread
/// (2-core Zen 4, 2026-12-04: 154–165 against 83–92 GFLOP/s at 4096 rows); here each thread runs
/// a single-threaded product over its own block of columns, summing over the rows in the same
/// order for every column.
fn weight_grad_into(dw: &mut [f32], gs: &[f32], xs: &[f32], out_dim: usize, in_dim: usize, rows: usize) {
    let threads = rayon::current_num_threads().max(1);
    let blocks = threads.min(in_dim / 64).max(1);
    let width = in_dim.div_ceil(blocks).div_ceil(16) * 16;
    let ptr = SyncPtr::of(dw);
    (0..blocks).into_par_iter().for_each(|bi| {
        let c0 = bi * width;
        let c1 = in_dim.min(c0 + width);
        if c0 < c1 {
            gemm(ptr.out(c0, in_dim), [out_dim, c1 - c0, rows], Mat::rm_t(gs, out_dim), Mat::rm(&xs[c0..], in_dim), Gemm::SERIAL);
        }
    });
}

/// `dx = dy W` for `dy` (..., out) and `w` (out, in), shaped as `x`.
fn input_grad(grad: &Tensor, w: &Tensor, x_shape: &Shape) -> candle_core::Result<Tensor> {
    let in_dim = w.dim(1)?;
    let (rows, _) = rows_cols(grad.shape());
    let mut dx = vec![0f32; rows * in_dim];
    with_data([grad], |[gs]| input_grad_into(&mut dx, gs, w, false))?;
    tensor_from(dx, x_shape.clone())
}

/// `dx [+]= dy W` into `dx` (rows × in) for `dy` (rows × out) and a frozen `w` (out × in).
pub(super) fn input_grad_into(dx: &mut [f32], dy: &[f32], w: &Tensor, accumulate: bool) -> candle_core::Result<()> {
    let (out_dim, in_dim) = w.dims2()?;
    let rows = dy.len() / out_dim.max(1);
    with_data([w], |[ws]| {
        gemm(Out::rm(dx, in_dim), [rows, in_dim, out_dim], Mat::rm(dy, out_dim), Mat::rm(ws, in_dim), Gemm::PARALLEL.accumulate(accumulate));
        Ok(())
    })
}

/// `[gelu](x W^T + b)` with frozen `w`, `b` as one op.
fn frozen_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>, gelu: bool) -> Result<Tensor> {
    let op = FrozenLinear { w: w.contiguous()?, b: b.map(|b| b.contiguous()).transpose()?, gelu, pre: Mutex::new(None) };
    Ok(x.contiguous()?.apply_op1(op)?)
}

// ------------------------------------------------------------------------------------------------
// The trained linear: y = [gelu](x W^T + b) where W or b trains; backward computes dx, dW and db
// only for the arguments in the graph.

struct TrainedLinear {
    gelu: bool,
    pre: Mutex<Option<Vec<f32>>>,
}

impl TrainedLinear {
    fn name(&self) -> &'static str {
        if self.gelu {
            "trained-linear-gelu"
        } else {
            "trained-linear"
        }
    }

    fn fwd(&self, x: (&CpuStorage, &Layout), w: (&CpuStorage, &Layout), b: Option<(&CpuStorage, &Layout)>) -> Fwd {
        let _prof = timer("trained-linear", "fwd");
        let dims = w.1.shape().dims2()?;
        let bs = b.map(|(s, l)| slice(s, l)).transpose()?;
        dense_fwd(slice(x.0, x.1)?, x.1.shape(), slice(w.0, w.1)?, dims, bs, self.gelu, &self.pre)
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, grad: &Tensor) -> Grads3 {
        let grad = pre_activation_grad(grad, self.gelu, &self.pre)?;
        let _prof = timer("trained-linear", "bwd");
        let dx = if x.track_op() { Some(input_grad(&grad, w, x.shape())?) } else { None };
        let (out_dim, in_dim) = w.dims2()?;
        let (rows, _) = rows_cols(grad.shape());
        let dw = if w.track_op() {
            // dW (out × in) = dyᵀ (out × rows) · x (rows × in) into a fresh buffer: one
            // single-threaded product per block of columns, the blocks in parallel.
            let mut dw = vec![0f32; out_dim * in_dim];
            with_data([&grad, x], |[gs, xs]| {
                weight_grad_into(&mut dw, gs, xs, out_dim, in_dim, rows);
                Ok(())
            })?;
            Some(tensor_from(dw, w.shape())?)
        } else {
            None
        };
        let db = match b {
            Some(b) if b.track_op() => {
                // Column sums of dy (fixed blocks, combined in order: the same sum every run).
                let db = with_data([&grad], |[gs]| {
                    Ok(column_sums(gs, gs, out_dim.max(1), out_dim, |_, g, acc| acc.iter_mut().zip(g).for_each(|(a, g)| *a += g)))
                })?;
                Some(tensor_from(db, b.shape())?)
            }
            _ => None,
        };
        Ok((dx, dw, db))
    }
}

/// [`TrainedLinear`] without a bias: arguments (x, W).
struct TrainedLinear2(TrainedLinear);
/// [`TrainedLinear`] with a bias: arguments (x, W, b).
struct TrainedLinear3(TrainedLinear);

impl CustomOp2 for TrainedLinear2 {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Fwd {
        self.0.fwd((s1, l1), (s2, l2), None)
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Grads2 {
        let (dx, dw, _) = self.0.bwd(x, w, None, grad)?;
        Ok((dx, dw))
    }
}

impl CustomOp3 for TrainedLinear3 {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Fwd {
        self.0.fwd((s1, l1), (s2, l2), Some((s3, l3)))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, b: &Tensor, _res: &Tensor, grad: &Tensor) -> Grads3 {
        self.0.bwd(x, w, Some(b), grad)
    }
}

/// `[gelu](x W^T + b)` where `w` or `b` trains, as one op (see [`linear`]).
/// Shapes are checked by [`dense_fwd`], as for the frozen op.
fn trained_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>, gelu: bool) -> Result<Tensor> {
    let op = TrainedLinear { gelu, pre: Mutex::new(None) };
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    Ok(match b {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, TrainedLinear3(op))?,
        None => x.apply_op2(&w, TrainedLinear2(op))?,
    })
}

// ------------------------------------------------------------------------------------------------
// Frozen linear with a low-rank update (LoRA): y = x W^T + b + (x A^T) B^T with W, b constants
// and A, B trained, as one op.

/// `x W^T + b + (x A^T) B^T` for `x` (..., in), frozen `w` (out, in) and `b` (out), and the
/// low-rank pair `a` (r, in), `bm` (out, r) — LoRA with its scale folded into `bm`.
///
/// One op instead of five nodes (the base product, two low-rank products, the sum, and candle's
/// gradient sums for each): the forward adds the update onto the base product; the backward
/// computes `dx = dy W + (dy B) A` (only when `x` needs it), `dA = (dy B)ᵀ x` and `dB = dyᵀ (x
/// Aᵀ)` (only for those in the graph), keeping `x Aᵀ` (rows × r) from the forward. Every number
/// is the composition's, to the bit. With a trained `w` or `b`, or off the CPU, the composition.
pub fn lora_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>, a: &Tensor, bm: &Tensor) -> Result<Tensor> {
    if fused_ok(x) && frozen(w, b) {
        let op = LoraLinear { w: FrozenWeight::Dense(w.contiguous()?), b: b.map(|b| b.contiguous()).transpose()?, u: Mutex::new(None) };
        return Ok(x.contiguous()?.apply_op3(&a.contiguous()?, &bm.contiguous()?, op)?);
    }
    lora_linear_composed(x, w, b, a, bm)
}

/// [`lora_linear`] with a frozen quantized weight (training on a GGUF decoder): the weight is
/// dequantized into a transient f32 matrix in forward and again in backward, as
/// [`qlinear`]`(.., exact)` does, so the numbers are those of the dequantized base.
pub fn lora_qlinear(x: &Tensor, w: &Arc<QTensor>, b: Option<&Tensor>, a: &Tensor, bm: &Tensor) -> Result<Tensor> {
    if fused_ok(x) && b.is_none_or(|b| !b.track_op()) {
        let op = LoraLinear { w: FrozenWeight::Quant(w.clone()), b: b.map(|b| b.contiguous()).transpose()?, u: Mutex::new(None) };
        return Ok(x.contiguous()?.apply_op3(&a.contiguous()?, &bm.contiguous()?, op)?);
    }
    let y = qlinear(x, w, true)?;
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    Ok(y.add(&linear(&linear(x, a, None)?, bm, None)?)?)
}

/// A frozen weight as held: f32, or quantized blocks dequantized when used.
#[derive(Clone)]
pub enum FrozenWeight {
    Dense(Tensor),
    Quant(Arc<QTensor>),
}

impl FrozenWeight {
    /// The weight in f32 (a transient dequantized copy for quantized blocks).
    pub(super) fn dense(&self) -> candle_core::Result<Tensor> {
        match self {
            FrozenWeight::Dense(w) => w.contiguous(),
            FrozenWeight::Quant(q) => {
                let _prof = timer("dequantize", "any");
                q.dequantize(&Device::Cpu)
            }
        }
    }

    /// (out, in).
    pub fn dims2(&self) -> candle_core::Result<(usize, usize)> {
        match self {
            FrozenWeight::Dense(w) => w.dims2(),
            FrozenWeight::Quant(q) => q.shape().dims2(),
        }
    }

    /// Whether the weight takes part in a graph (a dense weight being trained).
    pub fn trains(&self) -> bool {
        matches!(self, FrozenWeight::Dense(w) if w.track_op())
    }

    /// A quantized weight in a format decoded here ([`qmatmul::decode_block`]) with its raw blocks.
    /// `DELTATUNE_BLOCK_DECODE=0` sends every format through candle's whole dequantization.
    fn own_blocks(&self) -> Option<(qmatmul::QKind, &Arc<QTensor>)> {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if !*ON.get_or_init(|| std::env::var("DELTATUNE_BLOCK_DECODE").map(|v| v != "0").unwrap_or(true)) {
            return None;
        }
        match self {
            FrozenWeight::Quant(q) => match q.dtype() {
                GgmlDType::Q4_1 => Some((qmatmul::QKind::Q4_1, q)),
                GgmlDType::Q5_0 => Some((qmatmul::QKind::Q5_0, q)),
                _ => None,
            },
            FrozenWeight::Dense(_) => None,
        }
    }

    /// `y (+)= x Wᵀ` into columns `col..col + out` of `dst` (rows `ys` apart), `x` rows of `in`.
    /// A quantized weight in a format decoded here is decoded a block of whole rows at a time
    /// (at most [`DECODE_FLOATS`] values, on the pool, in parallel) and each block's product
    /// written into its columns: no f32 copy of the whole weight, and a weight that fits one
    /// block gives exactly the unblocked product. Other formats are dequantized whole.
    pub(super) fn forward_into(&self, dst: SyncPtr, col: usize, ys: usize, x: &[f32], accumulate: bool) -> candle_core::Result<()> {
        self.forward_blocked(dst, col, ys, x, accumulate, DECODE_FLOATS)
    }

    fn forward_blocked(&self, dst: SyncPtr, col: usize, ys: usize, x: &[f32], accumulate: bool, budget: usize) -> candle_core::Result<()> {
        let (out_dim, in_dim) = self.dims2()?;
        let rows = x.len() / in_dim.max(1);
        let how = Gemm::PARALLEL.accumulate(accumulate);
        let Some((kind, q)) = self.own_blocks() else {
            let w = self.dense()?;
            return with_data([&w], |[ws]| {
                gemm(dst.out(col, ys), [rows, out_dim, in_dim], Mat::rm(x, in_dim), Mat::rm_t(ws, in_dim), how);
                Ok(())
            });
        };
        let bytes = q.data()?;
        let step = (budget / in_dim.max(1)).clamp(1, out_dim.max(1));
        let mut buf = decode_buffer(step.min(out_dim) * in_dim);
        for r0 in (0..out_dim).step_by(step) {
            let r1 = (r0 + step).min(out_dim);
            let blk = &mut buf[..(r1 - r0) * in_dim];
            {
                let _prof = timer("dequantize", "any");
                qmatmul::decode_block(kind, &bytes, in_dim, (r0, r1), (0, in_dim), blk);
            }
            gemm(dst.out(col + r0, ys), [rows, r1 - r0, in_dim], Mat::rm(x, in_dim), Mat::rm_t(blk, in_dim), how);
        }
        give_decode_buffer(buf);
        Ok(())
    }

    /// `dx (+)= dy W`, `dy` the map's output gradient from its first element in rows `ds` apart,
    /// `dx` rows of `in`. A quantized weight in a format decoded here is decoded a block of
    /// columns at a time (multiples of 32 wide, at most [`DECODE_FLOATS`] values) and each block's
    /// product written into its columns of `dx` (every product over the whole inner dimension:
    /// nothing is added twice); a weight that fits one block gives exactly the unblocked product.
    pub(super) fn input_grad_into(&self, dx: &mut [f32], dy: &[f32], ds: usize, accumulate: bool) -> candle_core::Result<()> {
        self.input_grad_blocked(dx, dy, ds, accumulate, DECODE_FLOATS)
    }

    fn input_grad_blocked(&self, dx: &mut [f32], dy: &[f32], ds: usize, accumulate: bool, budget: usize) -> candle_core::Result<()> {
        let (out_dim, in_dim) = self.dims2()?;
        let rows = dx.len() / in_dim.max(1);
        let how = Gemm::PARALLEL.accumulate(accumulate);
        let Some((kind, q)) = self.own_blocks() else {
            let w = self.dense()?;
            return with_data([&w], |[ws]| {
                gemm(Out::rm(dx, in_dim), [rows, in_dim, out_dim], Mat::rm(dy, ds), Mat::rm(ws, in_dim), how);
                Ok(())
            });
        };
        let bytes = q.data()?;
        let step = if out_dim * in_dim <= budget { in_dim } else { ((budget / out_dim.max(1)) / 32 * 32).clamp(32, in_dim.max(32)) };
        let mut buf = decode_buffer(out_dim * step.min(in_dim));
        let dst = SyncPtr::of(dx);
        for c0 in (0..in_dim).step_by(step.max(1)) {
            let c1 = (c0 + step).min(in_dim);
            let blk = &mut buf[..out_dim * (c1 - c0)];
            {
                let _prof = timer("dequantize", "any");
                qmatmul::decode_block(kind, &bytes, in_dim, (0, out_dim), (c0, c1), blk);
            }
            gemm(dst.out(c0, in_dim), [rows, c1 - c0, out_dim], Mat::rm(dy, ds), Mat::rm(blk, c1 - c0), how);
        }
        give_decode_buffer(buf);
        Ok(())
    }
}

/// The one buffer blocks are decoded into, kept between calls (at most [`DECODE_FLOATS`]
/// values): the engines' pool would lend an activation's buffer for it, and a fresh allocation
/// would fault its pages in on every call.
static DECODE_BUF: Mutex<Vec<f32>> = Mutex::new(Vec::new());

/// A buffer of `n` values with unspecified contents for [`qmatmul::decode_block`] to fill: the
/// kept one, or a fresh one while another call holds it.
fn decode_buffer(n: usize) -> Vec<f32> {
    let mut v = DECODE_BUF.lock().map(|mut b| std::mem::take(&mut *b)).unwrap_or_default();
    v.resize(n, 0.0);
    v
}

/// Keeps `v` for the next [`decode_buffer`] when it is the largest yet.
fn give_decode_buffer(v: Vec<f32>) {
    if let Ok(mut b) = DECODE_BUF.lock() {
        if v.capacity() > b.capacity() {
            *b = v;
        }
    }
}

/// The most values of a quantized weight the engines decode to f32 at once (8 MB): a larger
/// map is multiplied a block at a time ([`FrozenWeight::forward_into`],
/// [`FrozenWeight::input_grad_into`]).
pub(super) const DECODE_FLOATS: usize = 1 << 21;

/// Reference implementation of [`lora_linear`] from candle ops.
pub fn lora_linear_composed(x: &Tensor, w: &Tensor, b: Option<&Tensor>, a: &Tensor, bm: &Tensor) -> Result<Tensor> {
    Ok(linear(x, w, b)?.add(&linear(&linear(x, a, None)?, bm, None)?)?)
}

struct LoraLinear {
    w: FrozenWeight,
    b: Option<Tensor>,
    /// `x Aᵀ` (rows × r) from the forward, for `dB`.
    u: Mutex<Option<Vec<f32>>>,
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Fwd {
        let _prof = timer("lora-linear", "fwd");
        let (x, a, bm) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let (rows, in_dim) = rows_cols(l1.shape());
        let w = self.w.dense()?;
        let (out_dim, _) = w.dims2()?;
        let (r, a_in) = l2.shape().dims2()?;
        if a_in != in_dim || l3.shape().dims2()? != (out_dim, r) {
            return Err(err(format!(
                "lora linear: input {:?}, weight {:?}, A {:?}, B {:?} do not match",
                l1.shape(),
                w.shape(),
                l2.shape(),
                l3.shape()
            )));
        }
        // y = x Wᵀ + b as the frozen op computes it; u = x Aᵀ (rows × r); y += u Bᵀ, the update
        // computed into a buffer of its own and added once, so every number is the one the
        // composition gives (its sum node adds the same two terms): a fused run trains exactly
        // like the composed one, alone or data-parallel. (Accumulating the short product onto
        // the long one in `gemm` instead was also slower: `gemm` adds onto a destination at
        // full speed only for a long inner dimension.)
        let unused = Mutex::new(None);
        let (storage, shape) = match &self.b {
            Some(b) => with_data([&w, b], |[ws, bs]| dense_fwd(x, l1.shape(), ws, (out_dim, in_dim), Some(bs), false, &unused)),
            None => with_data([&w], |[ws]| dense_fwd(x, l1.shape(), ws, (out_dim, in_dim), None, false, &unused)),
        }?;
        let CpuStorage::F32(mut y) = storage else { return Err(err("lora linear: expected f32")) };
        let mut u = vec![0f32; rows * r];
        gemm(Out::rm(&mut u, r), [rows, r, in_dim], Mat::rm(x, in_dim), Mat::rm_t(a, in_dim), Gemm::PARALLEL);
        let mut d = vec![0f32; rows * out_dim];
        gemm(Out::rm(&mut d, out_dim), [rows, out_dim, r], Mat::rm(&u, r), Mat::rm_t(bm, r), Gemm::PARALLEL);
        add_into(&mut y, &d);
        *self.u.lock().map_err(|_| err("lora linear: poisoned lock"))? = Some(u);
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(&self, x: &Tensor, a: &Tensor, bm: &Tensor, _res: &Tensor, grad: &Tensor) -> Grads3 {
        let _prof = timer("lora-linear", "bwd");
        let grad = grad.contiguous()?;
        let (r, in_dim) = a.dims2()?;
        let out_dim = grad.dim(D::Minus1)?;
        let (rows, _) = rows_cols(grad.shape());
        // gu = dy B (rows × r): the gradient at x Aᵀ.
        let mut gu = vec![0f32; rows * r];
        with_data([&grad, bm], |[gs, bs]| {
            gemm(Out::rm(&mut gu, r), [rows, r, out_dim], Mat::rm(gs, out_dim), Mat::rm(bs, r), Gemm::PARALLEL);
            Ok(())
        })?;
        let dx = if x.track_op() {
            let w = self.w.dense()?;
            let mut dx = vec![0f32; rows * in_dim];
            // dx = dy W + gu A, each product into its own buffer and added once (the numbers of
            // the composition, whose gradient store adds the same two terms).
            let mut low = vec![0f32; rows * in_dim];
            with_data([&grad, &w, a], |[gs, ws, az]| {
                gemm(Out::rm(&mut dx, in_dim), [rows, in_dim, out_dim], Mat::rm(gs, out_dim), Mat::rm(ws, in_dim), Gemm::PARALLEL);
                gemm(Out::rm(&mut low, in_dim), [rows, in_dim, r], Mat::rm(&gu, r), Mat::rm(az, in_dim), Gemm::PARALLEL);
                Ok(())
            })?;
            add_into(&mut dx, &low);
            Some(tensor_from(dx, x.shape().clone())?)
        } else {
            None
        };
        let da = if a.track_op() {
            // dA (r × in) = guᵀ (r × rows) · x (rows × in)
            let mut da = vec![0f32; r * in_dim];
            with_data([x], |[xs]| {
                gemm(Out::rm(&mut da, in_dim), [r, in_dim, rows], Mat::rm_t(&gu, r), Mat::rm(xs, in_dim), Gemm::PARALLEL);
                Ok(())
            })?;
            Some(tensor_from(da, a.shape().clone())?)
        } else {
            None
        };
        let db = if bm.track_op() {
            // dB (out × r) = dyᵀ (out × rows) · u (rows × r)
            let kept = self.u.lock().map_err(|_| err("lora linear: poisoned lock"))?;
            let u = kept.as_ref().ok_or_else(|| err("lora linear: backward without forward"))?;
            let mut db = vec![0f32; out_dim * r];
            with_data([&grad], |[gs]| {
                gemm(Out::rm(&mut db, r), [out_dim, r, rows], Mat::rm_t(gs, out_dim), Mat::rm(u, r), Gemm::PARALLEL);
                Ok(())
            })?;
            Some(tensor_from(db, bm.shape().clone())?)
        } else {
            None
        };
        Ok((dx, da, db))
    }
}

// ------------------------------------------------------------------------------------------------
// Frozen quantized linear: y = x W^T with W in GGUF blocks; backward dx = dy W (dequantized).

/// At most this many rows use the quantized dot-product kernels (unless exact) when the input
/// takes part in a backward pass, and when it does not (prompts, batched decoding steps).
const QUANT_DOT_ROWS: usize = 8;
const QUANT_DOT_ROWS_INFERENCE: usize = 64;

struct QLinear {
    w: Arc<QTensor>,
    exact: bool,
    quant_rows: usize,
}

impl QLinear {
    /// The weight as a transient f32 frozen linear.
    fn dense(&self) -> candle_core::Result<FrozenLinear> {
        Ok(FrozenLinear { w: self.w.dequantize(&Device::Cpu)?, b: None, gelu: false, pre: Default::default() })
    }
}

impl CustomOp1 for QLinear {
    fn name(&self) -> &'static str {
        "quantized-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Fwd {
        let _prof = timer("quantized-linear", "fwd");
        let (rows, k) = rows_cols(l.shape());
        if !self.exact && rows <= self.quant_rows {
            let kind = match self.w.dtype() {
                GgmlDType::Q4_1 => Some(qmatmul::QKind::Q4_1),
                GgmlDType::Q5_0 => Some(qmatmul::QKind::Q5_0),
                _ => None,
            };
            if let Some(kind) = kind {
                // Our kernels (candle's Q4_1 and Q5_0 dot products are scalar). Q8_0 stays with
                // candle's: ours measured slower for one row (Gemma's output matrix), and one
                // kernel for every row count keeps a row's logits the same alone and batched.
                let n = self.w.shape().dims2()?.0;
                let y = qmatmul::matmul_q(kind, slice(s, l)?, rows, k, &self.w.data()?, n);
                let mut dims = l.shape().dims().to_vec();
                if let Some(last) = dims.last_mut() {
                    *last = n;
                }
                return Ok((CpuStorage::F32(y), Shape::from(dims)));
            }
            return CustomOp1::cpu_fwd(self.w.as_ref(), s, l);
        }
        self.dense()?.cpu_fwd(s, l)
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let _prof = timer("quantized-linear", "bwd");
        self.dense()?.bwd(arg, res, grad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::cpu::testing::{grad_diff, grads, max_diff, rand, var};

    /// The engines' products through a quantized weight decoded a block at a time, against the
    /// product with candle's dequantization of the whole weight: Q4_1 and Q5_0 (decoded here) and
    /// Q8_0 (dequantized whole), one block (the same numbers to the bit) and many (rows or
    /// columns in blocks, a last block shorter; within 1e-5), into a column range of a wider
    /// output, written and accumulated.
    #[test]
    fn blocked_quantized_products_match_the_dequantized_weight() {
        let (rows, out_dim, in_dim, ys, col) = (19, 70, 160, 90, 13);
        let w = (rand(&[out_dim, in_dim], 3) * 0.5).unwrap();
        let x: Vec<f32> = rand(&[rows, in_dim], 4).flatten_all().unwrap().to_vec1().unwrap();
        let dy: Vec<f32> = rand(&[rows, ys], 5).flatten_all().unwrap().to_vec1().unwrap();
        let start: Vec<f32> = rand(&[rows, ys.max(in_dim)], 6).flatten_all().unwrap().to_vec1().unwrap();
        for dt in [GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q8_0] {
            let fw = FrozenWeight::Quant(Arc::new(QTensor::quantize(&w, dt).unwrap()));
            let wd: Vec<f32> = fw.dense().unwrap().flatten_all().unwrap().to_vec1().unwrap();
            for accumulate in [false, true] {
                // y[:, col..col + out] (+)= x Wᵀ.
                let mut want = start[..rows * ys].to_vec();
                gemm(SyncPtr::of(&mut want).out(col, ys), [rows, out_dim, in_dim], Mat::rm(&x, in_dim), Mat::rm_t(&wd, in_dim), Gemm::PARALLEL.accumulate(accumulate));
                for (budget, exact) in [(DECODE_FLOATS, true), (17 * in_dim, false), (1, false)] {
                    let mut got = start[..rows * ys].to_vec();
                    fw.forward_blocked(SyncPtr::of(&mut got), col, ys, &x, accumulate, budget).unwrap();
                    close(&got, &want, exact, &format!("{dt:?} forward, budget {budget}, accumulate {accumulate}"));
                }
                // dx (+)= dy[:, col..col + out] W.
                let mut want = start[..rows * in_dim].to_vec();
                gemm(Out::rm(&mut want, in_dim), [rows, in_dim, out_dim], Mat::rm(&dy[col..], ys), Mat::rm(&wd, in_dim), Gemm::PARALLEL.accumulate(accumulate));
                for (budget, exact) in [(DECODE_FLOATS, true), (out_dim * 64, false), (1, false)] {
                    let mut got = start[..rows * in_dim].to_vec();
                    fw.input_grad_blocked(&mut got, &dy[col..], ys, accumulate, budget).unwrap();
                    close(&got, &want, exact, &format!("{dt:?} input gradient, budget {budget}, accumulate {accumulate}"));
                }
            }
        }
    }

    fn close(got: &[f32], want: &[f32], exact: bool, what: &str) {
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            if exact {
                assert_eq!(g.to_bits(), w.to_bits(), "{what}: element {i}: {g} vs {w}");
            } else {
                assert!((g - w).abs() <= 1e-5 * scale, "{what}: element {i}: {g} vs {w}");
            }
        }
    }

    /// Row-by-row low-rank product: equal to the two products, and a row's result is the same
    /// bits alone and inside a batch.
    #[test]
    fn low_rank_rows_matches_products_and_is_row_independent() {
        let x = rand(&[5, 3, 40], 21);
        let a = rand(&[6, 40], 22);
        let b = rand(&[24, 6], 23);
        let y = low_rank_rows(&x, &a, &b).unwrap();
        let want = linear_composed(&linear_composed(&x, &a, None).unwrap(), &b, None).unwrap();
        assert!(max_diff(&y, &want) < 1e-5);
        let all: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        for i in 0..5 {
            let one: Vec<f32> = low_rank_rows(&x.narrow(0, i, 1).unwrap(), &a, &b).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(one, all[i * 72..(i + 1) * 72]);
        }
    }

    /// The trained linear against candle's composition, for every mix of trained arguments
    /// (full fine-tuning, BitFit's frozen weight with a trained bias, a bias-free delta matrix,
    /// a frozen input), with and without GELU: outputs and every gradient that exists.
    #[test]
    fn trained_linear_matches_composition() {
        for gelu in [false, true] {
            for (x_trains, w_trains, bias) in [(true, true, Some(true)), (true, false, Some(true)), (true, true, None), (false, true, Some(false)), (false, false, Some(true))] {
                let case = format!("gelu {gelu}, x {x_trains}, w {w_trains}, bias {bias:?}");
                let x = var(&[3, 5, 16], 31, 1.5);
                let w = var(&[24, 16], 32, 0.5);
                let b = var(&[24], 33, 0.5);
                let xt = if x_trains { x.as_tensor().clone() } else { x.as_tensor().detach() };
                let wt = if w_trains { w.as_tensor().clone() } else { w.as_tensor().detach() };
                let bt = bias.map(|trains| if trains { b.as_tensor().clone() } else { b.as_tensor().detach() });
                let y1 = if gelu { linear_gelu(&xt, &wt, bt.as_ref()) } else { linear(&xt, &wt, bt.as_ref()) }.unwrap();
                let y2 = if gelu { linear_gelu_composed(&xt, &wt, bt.as_ref()) } else { linear_composed(&xt, &wt, bt.as_ref()) }.unwrap();
                assert!(max_diff(&y1, &y2) < 1e-5, "{case}: forward differs by {}", max_diff(&y1, &y2));
                let up = rand(&[3, 5, 24], 34);
                let (g1, g2) = (grads(&y1, &up), grads(&y2, &up));
                for (v, trains, name) in [(&x, x_trains, "x"), (&w, w_trains, "w"), (&b, bias == Some(true), "b")] {
                    if trains {
                        let d = grad_diff(&g1, &g2, v);
                        assert!(d < 1e-4, "{case}: gradient of {name} differs by {d}");
                    } else {
                        assert!(g1.get(v).is_none(), "{case}: {name} is frozen but got a gradient");
                    }
                }
            }
        }
    }

    /// The LoRA linear against its composition: output and the gradients of x, A and B, with
    /// and without a bias, with a frozen input (no gradient computed for it), and twice through
    /// the same graph (the kept x Aᵀ survives the first backward). The numbers are the
    /// composition's to the bit (training runs, alone or data-parallel, do not change).
    #[test]
    fn lora_linear_matches_composition() {
        for (bias, x_trains) in [(true, true), (false, true), (true, false)] {
            let case = format!("bias {bias}, x trains {x_trains}");
            let x = var(&[3, 5, 16], 41, 1.5);
            let w = rand(&[24, 16], 42);
            let b = rand(&[24], 43);
            let a = var(&[4, 16], 44, 0.5);
            let bm = var(&[24, 4], 45, 0.5);
            let xt = if x_trains { x.as_tensor().clone() } else { x.as_tensor().detach() };
            let bias = bias.then_some(&b);
            let y1 = lora_linear(&xt, &w, bias, a.as_tensor(), bm.as_tensor()).unwrap();
            let y2 = lora_linear_composed(&xt, &w, bias, a.as_tensor(), bm.as_tensor()).unwrap();
            assert_eq!(max_diff(&y1, &y2), 0.0, "{case}: forward differs");
            // The update is not zero here: the op must include it.
            let base = linear_composed(&xt, &w, bias).unwrap();
            assert!(max_diff(&y1, &base) > 1e-2, "{case}: the low-rank update is missing");
            let up = rand(&[3, 5, 24], 46);
            for _ in 0..2 {
                let (g1, g2) = (grads(&y1, &up), grads(&y2, &up));
                for (v, name) in [(&a, "A"), (&bm, "B")] {
                    assert_eq!(grad_diff(&g1, &g2, v), 0.0, "{case}: gradient of {name} differs");
                }
                if x_trains {
                    assert_eq!(grad_diff(&g1, &g2, &x), 0.0, "{case}: gradient of x differs");
                } else {
                    assert!(g1.get(&x).is_none(), "{case}: x is frozen but got a gradient");
                }
            }
        }
    }

    /// With a quantized base weight: the same as the f32 op on the dequantized weight.
    #[test]
    fn lora_qlinear_matches_dequantized() {
        let x = var(&[2, 5, 64], 51, 1.0);
        let w = rand(&[32, 64], 52);
        let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q4_1).unwrap());
        let wd = q.dequantize(&Device::Cpu).unwrap();
        let a = var(&[4, 64], 53, 0.5);
        let bm = var(&[32, 4], 54, 0.5);
        let y1 = lora_qlinear(x.as_tensor(), &q, None, a.as_tensor(), bm.as_tensor()).unwrap();
        let y2 = lora_linear_composed(x.as_tensor(), &wd, None, a.as_tensor(), bm.as_tensor()).unwrap();
        assert!(max_diff(&y1, &y2) < 1e-4, "forward differs by {}", max_diff(&y1, &y2));
        let up = rand(&[2, 5, 32], 55);
        let (g1, g2) = (grads(&y1, &up), grads(&y2, &up));
        for (v, name) in [(&x, "x"), (&a, "A"), (&bm, "B")] {
            let d = grad_diff(&g1, &g2, v);
            assert!(d < 1e-4, "gradient of {name} differs by {d}");
        }
    }

    #[test]
    fn frozen_linear_matches_composition() {
        let x = var(&[3, 5, 16], 1, 1.0);
        let w = rand(&[8, 16], 2);
        let b = rand(&[8], 3);
        let y1 = frozen_linear(x.as_tensor(), &w, Some(&b), false).unwrap();
        let y2 = linear_composed(x.as_tensor(), &w, Some(&b)).unwrap();
        assert!(max_diff(&y1, &y2) < 1e-5);
        let g = rand(&[3, 5, 8], 4);
        assert!(grad_diff(&grads(&y1, &g), &grads(&y2, &g), &x) < 1e-5);
    }

    #[test]
    fn frozen_linear_gelu_matches_composition() {
        let x = var(&[3, 5, 16], 11, 2.0);
        let w = rand(&[40, 16], 12);
        let b = rand(&[40], 13);
        let y1 = frozen_linear(x.as_tensor(), &w, Some(&b), true).unwrap();
        let y2 = linear_gelu_composed(x.as_tensor(), &w, Some(&b)).unwrap();
        assert!(max_diff(&y1, &y2) < 1e-5, "forward differs by {}", max_diff(&y1, &y2));
        let g = rand(&[3, 5, 40], 14);
        // Backward twice through the same graph: the kept pre-activation must survive the first.
        for _ in 0..2 {
            let d = grad_diff(&grads(&y1, &g), &grads(&y2, &g), &x);
            assert!(d < 1e-5, "input gradient differs by {d}");
        }
    }
}
