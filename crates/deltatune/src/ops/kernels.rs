//! Fused CPU kernels (f32) with hand-written backward passes, wrapped as candle custom ops.
//!
//! Each kernel has a reference composition in [`super`] and a test comparing forward and gradients
//! with it. The kernels read their inputs as contiguous f32 slices, run row-parallel with rayon and
//! call `gemm` directly with explicit strides, so no transposed copies are made.
//!
//! Set `DELTATUNE_FUSED=0` to run the compositions instead (for benchmarking the kernels one by one).

use super::rng::DropoutKey;
use crate::error::Result;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;
use std::sync::OnceLock;

/// Whether fused kernels are enabled (`DELTATUNE_FUSED` unset or not `0`). Read once.
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("DELTATUNE_FUSED").map(|v| v != "0").unwrap_or(true))
}

fn err(msg: impl Into<String>) -> candle_core::Error {
    candle_core::Error::Msg(msg.into())
}

/// The contiguous f32 data of a custom-op argument.
fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => Err(err("fused kernel: non-contiguous input")),
    }
}

/// Runs `f` on the contiguous f32 data of a CPU tensor held by an op.
fn with_data<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> candle_core::Result<R>) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(s) => f(slice(s, layout)?),
        _ => Err(err("fused kernel: tensor is not on the CPU")),
    }
}

fn tensor_from(data: Vec<f32>, shape: impl Into<Shape>) -> candle_core::Result<Tensor> {
    Tensor::from_vec(data, shape, &candle_core::Device::Cpu)
}

/// A raw pointer that may be shared across rayon tasks writing disjoint regions.
#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    /// The pointer `off` elements further (a method, so closures capture the whole `Sync` wrapper).
    fn at(&self, off: usize) -> *mut f32 {
        // SAFETY: callers pass offsets inside the allocation; `gemm` checks the extent it writes.
        unsafe { self.0.add(off) }
    }
}

/// A row-major or strided matrix view for [`gemm`]: `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

impl<'a> Mat<'a> {
    fn rm(data: &'a [f32], cols: usize) -> Self {
        Mat { data, rs: cols, cs: 1 }
    }
    /// The transpose of a row-major matrix with `cols` columns.
    fn rm_t(data: &'a [f32], cols: usize) -> Self {
        Mat { data, rs: 1, cs: cols }
    }
    fn check(&self, rows: usize, cols: usize) {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * self.rs + (cols - 1) * self.cs;
            assert!(last < self.data.len(), "gemm operand out of bounds: {last} >= {}", self.data.len());
        }
    }
}

/// `dst (m×n) = [dst +] lhs (m×k) · rhs (k×n) * scale`, dst row-major with row stride `dst_rs`.
#[allow(clippy::too_many_arguments)]
fn gemm(
    dst: *mut f32,
    dst_len: usize,
    dst_rs: usize,
    m: usize,
    n: usize,
    k: usize,
    lhs: Mat,
    rhs: Mat,
    accumulate: bool,
    scale: f32,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    lhs.check(m, k);
    rhs.check(k, n);
    assert!((m - 1) * dst_rs + n <= dst_len, "gemm destination out of bounds");
    let par = if parallel && m * n * k > 64 * 64 * 64 {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: bounds of all three operands were checked above; `dst` does not alias the inputs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            par,
        )
    }
}

fn rows_cols(shape: &Shape) -> (usize, usize) {
    let dims = shape.dims();
    let cols = dims.last().copied().unwrap_or(1);
    let rows = if cols == 0 { 0 } else { shape.elem_count() / cols };
    (rows, cols)
}

// ------------------------------------------------------------------------------------------------
// Fast vectorisable exp / erf.

/// exp(x) for f32, Cephes-style range reduction and a degree-6 polynomial (about 1 ulp); written
/// without branches so that loops over it vectorise.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    let x = x.clamp(-87.336_54, 88.376_26);
    let fx = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - fx * 0.693_359_4 - fx * -2.121_944_4e-4;
    let z = r * r;
    let y = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 5e-1;
    let y = y * z + r + 1.0;
    let bits = ((fx as i32 + 127) as u32) << 23;
    y * f32::from_bits(bits)
}

const LANES: usize = 16;

/// Sum of a slice in 16 independent lanes (vectorises; fixed order, so results are reproducible).
#[inline(always)]
pub fn sum_lanes(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut it = x.chunks_exact(LANES);
    for c in &mut it {
        for j in 0..LANES {
            acc[j] += c[j];
        }
    }
    let mut s: f32 = it.remainder().iter().sum();
    for a in acc {
        s += a;
    }
    s
}

/// Maximum of a slice in 16 lanes (NaN-agnostic compare, so it vectorises).
#[inline(always)]
pub fn max_lanes(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut it = x.chunks_exact(LANES);
    for c in &mut it {
        for j in 0..LANES {
            acc[j] = if c[j] > acc[j] { c[j] } else { acc[j] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in it.remainder().iter().chain(acc.iter()) {
        m = if v > m { v } else { m };
    }
    m
}

/// Dot product in 16 lanes.
#[inline(always)]
pub fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let mut ia = a.chunks_exact(LANES);
    let mut ib = b.chunks_exact(LANES);
    for (ca, cb) in (&mut ia).zip(&mut ib) {
        for j in 0..LANES {
            acc[j] += ca[j] * cb[j];
        }
    }
    let mut s: f32 = ia.remainder().iter().zip(ib.remainder()).map(|(x, y)| x * y).sum();
    for v in acc {
        s += v;
    }
    s
}

/// erf(x) as a rational function of x (odd degree-13 numerator over even degree-8 denominator,
/// the approximation Eigen vectorises), clamped to [-4, 4]; absolute error below 4e-7, no exp.
#[inline(always)]
pub fn erf_f32(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
    p = x2 * p - 2.101_024e-6;
    p = x2 * p - 5.692_506_4e-5;
    p = x2 * p - 7.349_906_3e-4;
    p = x2 * p - 2.954_600_1e-3;
    p = x2 * p - 1.609_603_3e-2;
    p *= x;
    let mut q = x2 * -1.456_607_2e-5 - 2.133_740_6e-4;
    q = x2 * q - 1.682_827e-3;
    q = x2 * q - 7.373_329e-3;
    q = x2 * q - 1.426_473_9e-2;
    p / q
}

// ------------------------------------------------------------------------------------------------
// Frozen linear: y = x W^T + b with W, b constants; backward only dx = dy W.

struct FrozenLinear {
    w: Tensor,
    b: Option<Tensor>,
    /// Exact GELU applied to the output (`gelu(x W^T + b)` in one op). The pre-activation is kept
    /// here for the backward pass, so the graph holds one node, not two, and the GELU gradient is
    /// applied on the way into the input-gradient matmul.
    gelu: bool,
    pre: std::sync::Mutex<Option<Vec<f32>>>,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        if self.gelu {
            "frozen-linear-gelu"
        } else {
            "frozen-linear"
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let _prof = super::profile::timer("frozen-linear", "fwd");
        let x = slice(s, l)?;
        let (rows, in_dim) = rows_cols(l.shape());
        let (out_dim, w_in) = self.w.dims2()?;
        if w_in != in_dim {
            return Err(err(format!("linear: input has {in_dim} features, weight expects {w_in}")));
        }
        let mut y = vec![0f32; rows * out_dim];
        if let Some(b) = &self.b {
            with_data(b, |bs| {
                if bs.len() != out_dim {
                    return Err(err("linear: bias length differs from weight rows"));
                }
                y.par_chunks_mut(out_dim.max(1)).for_each(|row| row.copy_from_slice(bs));
                Ok(())
            })?;
        }
        with_data(&self.w, |ws| {
            let len = y.len();
            gemm(
                y.as_mut_ptr(),
                len,
                out_dim,
                rows,
                out_dim,
                in_dim,
                Mat::rm(x, in_dim),
                Mat::rm_t(ws, in_dim),
                self.b.is_some(),
                1.0,
                true,
            );
            Ok(())
        })?;
        let mut dims = l.shape().dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = out_dim;
        }
        if self.gelu {
            let _prof = super::profile::timer("gelu-erf", "fwd");
            let mut a = vec![0f32; y.len()];
            gelu_into(&mut a, &y);
            *self.pre.lock().map_err(|_| err("linear-gelu: poisoned lock"))? = Some(y);
            return Ok((CpuStorage::F32(a), Shape::from(dims)));
        }
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let grad = if self.gelu {
            let _prof = super::profile::timer("gelu-erf", "bwd");
            let pre = self.pre.lock().map_err(|_| err("linear-gelu: poisoned lock"))?;
            let h = pre.as_ref().ok_or_else(|| err("linear-gelu: backward without forward"))?;
            let mut dh = vec![0f32; h.len()];
            with_data(&grad, |gs| {
                gelu_grad_into(&mut dh, h, gs);
                Ok(())
            })?;
            tensor_from(dh, grad.shape())?
        } else {
            grad
        };
        let _prof = super::profile::timer("frozen-linear", "bwd");
        let (out_dim, in_dim) = self.w.dims2()?;
        let (rows, _) = rows_cols(grad.shape());
        let mut dx = vec![0f32; rows * in_dim];
        with_data(&grad, |gs| {
            with_data(&self.w, |ws| {
                let len = dx.len();
                gemm(
                    dx.as_mut_ptr(),
                    len,
                    in_dim,
                    rows,
                    in_dim,
                    out_dim,
                    Mat::rm(gs, out_dim),
                    Mat::rm(ws, in_dim),
                    false,
                    1.0,
                    true,
                );
                Ok(())
            })
        })?;
        Ok(Some(tensor_from(dx, arg.shape())?))
    }
}

pub(crate) fn frozen_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    frozen_linear_act(x, w, b, false)
}

/// `gelu(x W^T + b)` with frozen `w`, `b` as one op.
pub(crate) fn frozen_linear_gelu(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    frozen_linear_act(x, w, b, true)
}

fn frozen_linear_act(x: &Tensor, w: &Tensor, b: Option<&Tensor>, gelu: bool) -> Result<Tensor> {
    let op = FrozenLinear {
        w: w.contiguous()?,
        b: b.map(|b| b.contiguous()).transpose()?,
        gelu,
        pre: std::sync::Mutex::new(None),
    };
    Ok(x.contiguous()?.apply_op1(op)?)
}

// ------------------------------------------------------------------------------------------------
// Frozen quantized linear: y = x W^T with W in GGUF blocks; backward dx = dy W (dequantized).

/// At most this many rows use the quantized dot-product kernels (unless exact).
const QUANT_DOT_ROWS: usize = 8;

struct QLinear {
    w: std::sync::Arc<candle_core::quantized::QTensor>,
    exact: bool,
}

impl QLinear {
    /// The weight as a transient f32 frozen linear.
    fn dense(&self) -> candle_core::Result<FrozenLinear> {
        Ok(FrozenLinear { w: self.w.dequantize(&candle_core::Device::Cpu)?, b: None, gelu: false, pre: Default::default() })
    }
}

impl CustomOp1 for QLinear {
    fn name(&self) -> &'static str {
        "quantized-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let _prof = super::profile::timer("quantized-linear", "fwd");
        let (rows, _) = rows_cols(l.shape());
        if !self.exact && rows <= QUANT_DOT_ROWS {
            return CustomOp1::cpu_fwd(self.w.as_ref(), s, l);
        }
        self.dense()?.cpu_fwd(s, l)
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let _prof = super::profile::timer("quantized-linear", "bwd");
        self.dense()?.bwd(arg, res, grad)
    }
}

pub(crate) fn qlinear(x: &Tensor, w: &std::sync::Arc<candle_core::quantized::QTensor>, exact: bool) -> Result<Tensor> {
    let (_, in_dim) = w.shape().dims2()?;
    if x.dim(candle_core::D::Minus1)? != in_dim {
        return Err(crate::error::Error::Delta(format!(
            "quantized linear: input has {} features, weight expects {in_dim}",
            x.dim(candle_core::D::Minus1)?
        )));
    }
    Ok(x.contiguous()?.apply_op1(QLinear { w: w.clone(), exact })?)
}

// ------------------------------------------------------------------------------------------------
// Adding a frozen constant: the gradient passes to the tracked argument only.

struct AddFrozen {
    base: Tensor,
}

impl CustomOp1 for AddFrozen {
    fn name(&self) -> &'static str {
        "add-frozen"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let _prof = super::profile::timer("add-frozen", "fwd");
        let x = slice(s, l)?;
        let y = with_data(&self.base, |b| {
            if b.len() != x.len() {
                return Err(err("add_frozen: shapes differ"));
            }
            Ok(x.iter().zip(b).map(|(a, b)| a + b).collect::<Vec<f32>>())
        })?;
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let _prof = super::profile::timer("add-frozen", "bwd");
        Ok(Some(grad.clone()))
    }
}

pub(crate) fn add_frozen(delta: &Tensor, base: &Tensor) -> Result<Tensor> {
    if delta.dims() != base.dims() {
        return Err(crate::error::Error::Delta(format!("add_frozen: shapes {:?} and {:?} differ", delta.dims(), base.dims())));
    }
    Ok(delta.contiguous()?.apply_op1(AddFrozen { base: base.contiguous()? })?)
}

// ------------------------------------------------------------------------------------------------
// Scaling of the last dimension by a vector, `x ⊙ l` ((IA)³), with gradients for both.

struct ScaleLast;

impl CustomOp2 for ScaleLast {
    fn name(&self) -> &'static str {
        "scale-last"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let _prof = super::profile::timer("scale-last", "fwd");
        let (x, l) = (slice(s1, l1)?, slice(s2, l2)?);
        let h = l.len();
        if h == 0 || x.len() % h != 0 {
            return Err(err(format!("scale_last: {} elements do not split into rows of {h}", x.len())));
        }
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(h).zip(x.par_chunks(h)).for_each(|(yr, xr)| {
            for i in 0..h {
                yr[i] = xr[i] * l[i];
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, l: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let _prof = super::profile::timer("scale-last", "bwd");
        let grad = grad.contiguous()?;
        let h = l.elem_count();
        let dx = if x.track_op() {
            let mut dx = vec![0f32; x.elem_count()];
            with_data(&grad, |dys| {
                with_data(l, |ls| {
                    dx.par_chunks_mut(h).zip(dys.par_chunks(h)).for_each(|(dr, gr)| {
                        for i in 0..h {
                            dr[i] = gr[i] * ls[i];
                        }
                    });
                    Ok(())
                })
            })?;
            Some(tensor_from(dx, x.shape())?)
        } else {
            None
        };
        let dl = if l.track_op() {
            let dl = with_data(x, |xs| {
                with_data(&grad, |dys| {
                    Ok(column_sums(xs, dys, h, |xr, gr, p| {
                        for i in 0..h {
                            p[i] += xr[i] * gr[i];
                        }
                    }))
                })
            })?;
            Some(tensor_from(dl, l.shape())?)
        } else {
            None
        };
        Ok((dx, dl))
    }
}

/// A parameter gradient summed over rows: `row(x_row, g_row, acc)` adds one row's contribution
/// (h values) to `acc`. Fixed blocks of 64 rows are summed in parallel and combined in order, so
/// the result does not depend on rayon's schedule (bit-reproducible runs).
fn column_sums(xs: &[f32], gs: &[f32], h: usize, row: impl Fn(&[f32], &[f32], &mut [f32]) + Sync) -> Vec<f32> {
    let partials: Vec<Vec<f32>> = xs
        .par_chunks(h * 64)
        .zip(gs.par_chunks(h * 64))
        .map(|(xb, gb)| {
            let mut p = vec![0f32; h];
            for (xr, gr) in xb.chunks(h).zip(gb.chunks(h)) {
                row(xr, gr, &mut p);
            }
            p
        })
        .collect();
    let mut out = vec![0f32; h];
    for p in partials {
        out.iter_mut().zip(&p).for_each(|(a, b)| *a += b);
    }
    out
}

/// `x ⊙ l` with `l` broadcast over the rows of `x` (its last dimension has `l.elem_count()` entries).
pub(crate) fn scale_last(x: &Tensor, l: &Tensor) -> Result<Tensor> {
    let h = l.elem_count();
    if x.dims().last() != Some(&h) {
        return Err(crate::error::Error::Delta(format!("scale_last: x {:?} and vector of {h}", x.dims())));
    }
    Ok(x.contiguous()?.apply_op2(&l.flatten_all()?.contiguous()?, ScaleLast)?)
}

// ------------------------------------------------------------------------------------------------
// Layer norm over the last dimension, with gradients for x, gamma and beta.

struct LayerNorm {
    eps: f32,
}

/// Mean and 1/std of one row (two-pass, in f32 like PyTorch's CPU kernel with f32 accumulation
/// widened to f64 for the sums to keep the result stable for large rows).
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

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _prof = super::profile::timer("layer-norm", "fwd");
        let (x, g, b) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let (_, h) = rows_cols(l1.shape());
        if g.len() != h || b.len() != h {
            return Err(err(format!("layer norm: gamma/beta have {} / {} elements, rows have {h}", g.len(), b.len())));
        }
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(h.max(1)).zip(x.par_chunks(h.max(1))).for_each(|(yr, xr)| {
            let (mean, rstd) = row_stats(xr, self.eps);
            for i in 0..h {
                yr[i] = (xr[i] - mean) * rstd * g[i] + b[i];
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _prof = super::profile::timer("layer-norm", "bwd");
        let grad = grad.contiguous()?;
        let h = gamma.elem_count();
        let need_x = x.track_op();
        let need_gb = gamma.track_op() || beta.track_op();
        let n = x.elem_count();
        let mut dx = if need_x { vec![0f32; n] } else { Vec::new() };
        let (mut dg, mut db) = (vec![0f32; h], vec![0f32; h]);
        with_data(x, |xs| {
            with_data(gamma, |gs| {
                with_data(&grad, |dys| {
                    if need_x {
                        dx.par_chunks_mut(h).zip(xs.par_chunks(h)).zip(dys.par_chunks(h)).for_each(
                            |((dxr, xr), dyr)| {
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
                            },
                        );
                    }
                    if need_gb {
                        // Partial sums per fixed block of rows, combined in order: the result does
                        // not depend on how rayon schedules the blocks (bit-reproducible runs).
                        let partials: Vec<(Vec<f32>, Vec<f32>)> = xs
                            .par_chunks(h * 64)
                            .zip(dys.par_chunks(h * 64))
                            .map(|(xb, dyb)| {
                                let (mut pg, mut pb) = (vec![0f32; h], vec![0f32; h]);
                                for (xr, dyr) in xb.chunks(h).zip(dyb.chunks(h)) {
                                    let (mean, rstd) = row_stats(xr, self.eps);
                                    for i in 0..h {
                                        pg[i] += dyr[i] * (xr[i] - mean) * rstd;
                                        pb[i] += dyr[i];
                                    }
                                }
                                (pg, pb)
                            })
                            .collect();
                        for (pg, pb) in partials {
                            dg.iter_mut().zip(&pg).for_each(|(a, c)| *a += c);
                            db.iter_mut().zip(&pb).for_each(|(b, d)| *b += d);
                        }
                    }
                    Ok(())
                })
            })
        })?;
        let dx = if need_x { Some(tensor_from(dx, x.shape())?) } else { None };
        let dg = if gamma.track_op() { Some(tensor_from(dg, gamma.shape())?) } else { None };
        let db = if beta.track_op() { Some(tensor_from(db, beta.shape())?) } else { None };
        Ok((dx, dg, db))
    }
}

pub(crate) fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let op = LayerNorm { eps: eps as f32 };
    Ok(x.contiguous()?.apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)?)
}

// ------------------------------------------------------------------------------------------------
// Exact GELU.

struct Gelu;

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let _prof = super::profile::timer("gelu-erf", "fwd");
        let x = slice(s, l)?;
        let mut y = vec![0f32; x.len()];
        gelu_into(&mut y, x);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let _prof = super::profile::timer("gelu-erf", "bwd");
        let grad = grad.contiguous()?;
        let mut dx = vec![0f32; arg.elem_count()];
        with_data(arg, |xs| {
            with_data(&grad, |gs| {
                gelu_grad_into(&mut dx, xs, gs);
                Ok(())
            })
        })?;
        Ok(Some(tensor_from(dx, arg.shape())?))
    }
}

/// `y = gelu(x)`, elementwise, in parallel chunks.
fn gelu_into(y: &mut [f32], x: &[f32]) {
    y.par_chunks_mut(4096).zip(x.par_chunks(4096)).for_each(|(yc, xc)| {
        for (y, &x) in yc.iter_mut().zip(xc) {
            *y = 0.5 * x * (1.0 + erf_f32(x * FRAC_1_SQRT_2));
        }
    });
}

/// `dx = g * gelu'(x)`, elementwise, in parallel chunks.
fn gelu_grad_into(dx: &mut [f32], x: &[f32], g: &[f32]) {
    dx.par_chunks_mut(4096).zip(x.par_chunks(4096)).zip(g.par_chunks(4096)).for_each(|((dc, xc), gc)| {
        for ((d, &x), &g) in dc.iter_mut().zip(xc).zip(gc) {
            let cdf = 0.5 * (1.0 + erf_f32(x * FRAC_1_SQRT_2));
            let pdf = FRAC_1_SQRT_2PI * exp_f32(-0.5 * x * x);
            *d = g * (cdf + x * pdf);
        }
    });
}

pub(crate) fn gelu(x: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(Gelu)?)
}

// ------------------------------------------------------------------------------------------------
// Dropout with a regenerated mask.

struct Dropout {
    p: f32,
    key: DropoutKey,
}

fn apply_mask(dst: &mut [f32], src: &[f32], p: f32, key: DropoutKey) {
    let scale = 1.0 / (1.0 - p);
    dst.par_chunks_mut(4096).zip(src.par_chunks(4096)).enumerate().for_each(|(c, (dc, sc))| {
        let base = (c * 4096) as u64;
        for (i, (d, &s)) in dc.iter_mut().zip(sc).enumerate() {
            *d = if key.keep(base + i as u64, p) { s * scale } else { 0.0 };
        }
    });
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let _prof = super::profile::timer("dropout", "fwd");
        let x = slice(s, l)?;
        let mut y = vec![0f32; x.len()];
        apply_mask(&mut y, x, self.p, self.key);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let _prof = super::profile::timer("dropout", "bwd");
        let grad = grad.contiguous()?;
        let mut dx = vec![0f32; arg.elem_count()];
        with_data(&grad, |gs| {
            apply_mask(&mut dx, gs, self.p, self.key);
            Ok(())
        })?;
        Ok(Some(tensor_from(dx, arg.shape())?))
    }
}

pub(crate) fn dropout(x: &Tensor, p: f32, key: DropoutKey) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(Dropout { p, key })?)
}

// ------------------------------------------------------------------------------------------------
// Multi-head attention core: softmax(q k^T / sqrt(d) + bias) v, heads interleaved along h.
// The probabilities are recomputed in backward instead of stored (memory over a few % of FLOPs).

struct Attention {
    heads: usize,
    key_bias: Tensor, // (b, tk)
    dropout: Option<(f32, DropoutKey)>,
    /// Causal: query i sees keys 0..=past + i only (decoders; `past` = tk − tq cached keys).
    causal: bool,
}

struct AttnDims {
    b: usize,
    tq: usize,
    tk: usize,
    h: usize,
    d: usize,
}

impl Attention {
    /// Softmax probabilities for one (batch, head) into `p` (tq × tk); returns nothing, fills `p`.
    fn probs(&self, dm: &AttnDims, q: &[f32], k: &[f32], bias: &[f32], bi: usize, hi: usize, p: &mut [f32]) {
        let AttnDims { tq, tk, h, d, .. } = *dm;
        let scale = 1.0 / (d as f32).sqrt();
        let qo = bi * tq * h + hi * d;
        let ko = bi * tk * h + hi * d;
        gemm(
            p.as_mut_ptr(),
            p.len(),
            tk,
            tq,
            tk,
            d,
            Mat { data: &q[qo..], rs: h, cs: 1 },
            Mat { data: &k[ko..], rs: 1, cs: h },
            false,
            scale,
            false,
        );
        let brow = &bias[bi * tk..(bi + 1) * tk];
        let past = tk.saturating_sub(tq);
        for (qi, row) in p.chunks_mut(tk).enumerate() {
            // Causal rows stop at their own position; later keys get probability 0.
            let row = if self.causal {
                let (seen, later) = row.split_at_mut((past + qi + 1).min(tk));
                later.fill(0.0);
                seen
            } else {
                row
            };
            for (v, &bb) in row.iter_mut().zip(brow) {
                *v += bb;
            }
            let max = max_lanes(row);
            for v in row.iter_mut() {
                *v = exp_f32(*v - max);
            }
            let inv = 1.0 / sum_lanes(row);
            for v in row.iter_mut() {
                *v *= inv;
            }
        }
    }

    fn mask_probs(&self, dm: &AttnDims, bi: usize, hi: usize, p: &mut [f32]) {
        if let Some((rate, key)) = self.dropout {
            let base = ((bi * self.heads + hi) * dm.tq * dm.tk) as u64;
            let scale = 1.0 / (1.0 - rate);
            for (i, v) in p.iter_mut().enumerate() {
                *v = if key.keep(base + i as u64, rate) { *v * scale } else { 0.0 };
            }
        }
    }

    fn dims(&self, q: &Shape, k: &Shape) -> candle_core::Result<AttnDims> {
        let (b, tq, h) = q.dims3()?;
        let (bk, tk, hk) = k.dims3()?;
        if bk != b || hk != h || h % self.heads != 0 {
            return Err(err(format!("attention: q {q:?} and k {k:?} do not match ({} heads)", self.heads)));
        }
        Ok(AttnDims { b, tq, tk, h, d: h / self.heads })
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _prof = super::profile::timer("attention", "fwd");
        let (q, k, v) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let dm = self.dims(l1.shape(), l2.shape())?;
        if l3.shape() != l2.shape() {
            return Err(err("attention: k and v shapes differ"));
        }
        let mut out = vec![0f32; dm.b * dm.tq * dm.h];
        let out_ptr = SyncPtr(out.as_mut_ptr());
        let out_len = out.len();
        with_data(&self.key_bias, |bias| {
            if bias.len() != dm.b * dm.tk {
                return Err(err("attention: key bias shape does not match keys"));
            }
            (0..dm.b * self.heads).into_par_iter().for_each_init(
                || vec![0f32; dm.tq * dm.tk],
                |p, bh| {
                    let (bi, hi) = (bh / self.heads, bh % self.heads);
                    self.probs(&dm, q, k, bias, bi, hi, p);
                    self.mask_probs(&dm, bi, hi, p);
                    let off = bi * dm.tq * dm.h + hi * dm.d;
                    let vo = bi * dm.tk * dm.h + hi * dm.d;
                    let o = out_ptr;
                    // Each (batch, head) writes its own d columns of its own rows: disjoint.
                    gemm(
                        o.at(off),
                        out_len - off,
                        dm.h,
                        dm.tq,
                        dm.d,
                        dm.tk,
                        Mat::rm(p, dm.tk),
                        Mat { data: &v[vo..], rs: dm.h, cs: 1 },
                        false,
                        1.0,
                        false,
                    );
                },
            );
            Ok(())
        })?;
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _prof = super::profile::timer("attention", "bwd");
        let grad = grad.contiguous()?;
        let dm = self.dims(q.shape(), k.shape())?;
        let scale = 1.0 / (dm.d as f32).sqrt();
        let mut dq = vec![0f32; dm.b * dm.tq * dm.h];
        let mut dk = vec![0f32; dm.b * dm.tk * dm.h];
        let mut dv = vec![0f32; dm.b * dm.tk * dm.h];
        let (pq, pk, pv) = (SyncPtr(dq.as_mut_ptr()), SyncPtr(dk.as_mut_ptr()), SyncPtr(dv.as_mut_ptr()));
        let (lq, lk) = (dq.len(), dk.len());
        with_data(q, |qs| {
            with_data(k, |ks| {
                with_data(v, |vs| {
                    with_data(&grad, |gs| {
                        with_data(&self.key_bias, |bias| {
                            (0..dm.b * self.heads).into_par_iter().for_each_init(
                                || (vec![0f32; dm.tq * dm.tk], vec![0f32; dm.tq * dm.tk]),
                                |(p, dp), bh| {
                                    let (bi, hi) = (bh / self.heads, bh % self.heads);
                                    let qo = bi * dm.tq * dm.h + hi * dm.d;
                                    let ko = bi * dm.tk * dm.h + hi * dm.d;
                                    self.probs(&dm, qs, ks, bias, bi, hi, p);
                                    // dP' = dO V^T  (tq × tk)
                                    gemm(
                                        dp.as_mut_ptr(),
                                        dp.len(),
                                        dm.tk,
                                        dm.tq,
                                        dm.tk,
                                        dm.d,
                                        Mat { data: &gs[qo..], rs: dm.h, cs: 1 },
                                        Mat { data: &vs[ko..], rs: 1, cs: dm.h },
                                        false,
                                        1.0,
                                        false,
                                    );
                                    // dV = P'^T dO  (tk × d), P' = dropped probabilities.
                                    let mut pd = p.clone();
                                    self.mask_probs(&dm, bi, hi, &mut pd);
                                    gemm(
                                        pv.at(ko),
                                        lk - ko,
                                        dm.h,
                                        dm.tk,
                                        dm.d,
                                        dm.tq,
                                        Mat::rm_t(&pd, dm.tk),
                                        Mat { data: &gs[qo..], rs: dm.h, cs: 1 },
                                        false,
                                        1.0,
                                        false,
                                    );
                                    // dP = mask(dP'); dS = P ⊙ (dP − rowsum(dP ⊙ P)).
                                    self.mask_probs(&dm, bi, hi, dp);
                                    for (dpr, pr) in dp.chunks_mut(dm.tk).zip(p.chunks(dm.tk)) {
                                        let dot = dot_lanes(dpr, pr);
                                        for (a, &b) in dpr.iter_mut().zip(pr) {
                                            *a = b * (*a - dot);
                                        }
                                    }
                                    // dQ = dS K * scale (tq × d); dK = dS^T Q * scale (tk × d).
                                    gemm(
                                        pq.at(qo),
                                        lq - qo,
                                        dm.h,
                                        dm.tq,
                                        dm.d,
                                        dm.tk,
                                        Mat::rm(dp, dm.tk),
                                        Mat { data: &ks[ko..], rs: dm.h, cs: 1 },
                                        false,
                                        scale,
                                        false,
                                    );
                                    gemm(
                                        pk.at(ko),
                                        lk - ko,
                                        dm.h,
                                        dm.tk,
                                        dm.d,
                                        dm.tq,
                                        Mat::rm_t(dp, dm.tk),
                                        Mat { data: &qs[qo..], rs: dm.h, cs: 1 },
                                        false,
                                        scale,
                                        false,
                                    );
                                },
                            );
                            Ok(())
                        })
                    })
                })
            })
        })?;
        let wrap = |data: Vec<f32>, t: &Tensor| -> candle_core::Result<Option<Tensor>> {
            if t.track_op() {
                Ok(Some(tensor_from(data, t.shape())?))
            } else {
                Ok(None)
            }
        };
        Ok((wrap(dq, q)?, wrap(dk, k)?, wrap(dv, v)?))
    }
}

pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_bias: &Tensor,
    heads: usize,
    dropout: Option<(f32, DropoutKey)>,
) -> Result<Tensor> {
    attention_op(q, k, v, key_bias, heads, dropout, false)
}

/// Causal attention (decoders): the queries are the last tq of the tk positions.
pub(crate) fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, key_bias: &Tensor, heads: usize) -> Result<Tensor> {
    attention_op(q, k, v, key_bias, heads, None, true)
}

fn attention_op(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_bias: &Tensor,
    heads: usize,
    dropout: Option<(f32, DropoutKey)>,
    causal: bool,
) -> Result<Tensor> {
    let op = Attention {
        heads,
        key_bias: key_bias.to_dtype(candle_core::DType::F32)?.contiguous()?,
        dropout: dropout.filter(|(p, _)| *p > 0.0),
        causal,
    };
    Ok(q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

// ------------------------------------------------------------------------------------------------
// Decoder ops: RMS norm (gradients for x and the weight), rotary embedding, SwiGLU gate.

struct RmsNorm {
    eps: f32,
}

/// 1 / sqrt(mean(x²) + eps) of one row.
#[inline]
fn rms_scale(row: &[f32], eps: f32) -> f32 {
    let ss: f32 = row.chunks(LANES * 4).map(|c| dot_lanes(c, c)).sum();
    1.0 / (ss / row.len() as f32 + eps).sqrt()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let _prof = super::profile::timer("rms-norm", "fwd");
        let (x, w) = (slice(s1, l1)?, slice(s2, l2)?);
        let (_, h) = rows_cols(l1.shape());
        if w.len() != h {
            return Err(err(format!("rms norm: weight has {} elements, rows have {h}", w.len())));
        }
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(h.max(1)).zip(x.par_chunks(h.max(1))).for_each(|(yr, xr)| {
            let r = rms_scale(xr, self.eps);
            for i in 0..h {
                yr[i] = xr[i] * r * w[i];
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    /// dx_j = r (g_j w_j − x_j r² mean_i(g_i w_i x_i)); dw_i = Σ_rows g_i x_i r.
    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let _prof = super::profile::timer("rms-norm", "bwd");
        let grad = grad.contiguous()?;
        let h = w.elem_count();
        let dx = if x.track_op() {
            let mut dx = vec![0f32; x.elem_count()];
            with_data(x, |xs| {
                with_data(w, |ws| {
                    with_data(&grad, |gs| {
                        dx.par_chunks_mut(h).zip(xs.par_chunks(h)).zip(gs.par_chunks(h)).for_each(|((dr, xr), gr)| {
                            let r = rms_scale(xr, self.eps);
                            let mut dot = 0f32;
                            for i in 0..h {
                                dot += gr[i] * ws[i] * xr[i];
                            }
                            let c = r * r * dot / h as f32;
                            for i in 0..h {
                                dr[i] = r * (gr[i] * ws[i] - xr[i] * c);
                            }
                        });
                        Ok(())
                    })
                })
            })?;
            Some(tensor_from(dx, x.shape())?)
        } else {
            None
        };
        let dw = if w.track_op() {
            let dw = with_data(x, |xs| {
                with_data(&grad, |gs| {
                    Ok(column_sums(xs, gs, h, |xr, gr, p| {
                        let r = rms_scale(xr, self.eps);
                        for i in 0..h {
                            p[i] += gr[i] * xr[i] * r;
                        }
                    }))
                })
            })?;
            Some(tensor_from(dw, w.shape())?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op2(&w.flatten_all()?.contiguous()?, RmsNorm { eps: eps as f32 })?)
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
        y.par_chunks_mut(d).zip(x.par_chunks(d)).enumerate().for_each(|(row, (yr, xr))| {
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

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let _prof = super::profile::timer("rope", "fwd");
        let x = slice(s, l)?;
        let mut y = vec![0f32; x.len()];
        self.apply(&mut y, x, 1.0);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let _prof = super::profile::timer("rope", "bwd");
        let grad = grad.contiguous()?;
        let mut dx = vec![0f32; arg.elem_count()];
        with_data(&grad, |gs| {
            self.apply(&mut dx, gs, -1.0);
            Ok(())
        })?;
        Ok(Some(tensor_from(dx, arg.shape())?))
    }
}

pub(crate) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_, t, n, d) = x.dims4()?;
    let table = |c: &Tensor| -> Result<Vec<f32>> { Ok(c.flatten_all()?.to_vec1::<f32>()?) };
    let (cos, sin) = (table(cos)?, table(sin)?);
    if cos.len() != t * d || sin.len() != t * d || d % 2 != 0 {
        return Err(crate::error::Error::Delta(format!("rope: tables of {} for {t} positions of {d}", cos.len())));
    }
    Ok(x.contiguous()?.apply_op1(Rope { cos, sin, t, n, d })?)
}

/// SwiGLU gate: silu(g) ⊙ u.
struct SwiGlu;

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-x))
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let _prof = super::profile::timer("swiglu", "fwd");
        let (g, u) = (slice(s1, l1)?, slice(s2, l2)?);
        if g.len() != u.len() {
            return Err(err("swiglu: gate and up shapes differ"));
        }
        let mut y = vec![0f32; g.len()];
        y.par_chunks_mut(4096).zip(g.par_chunks(4096)).zip(u.par_chunks(4096)).for_each(|((yc, gc), uc)| {
            for ((y, &g), &u) in yc.iter_mut().zip(gc).zip(uc) {
                *y = g * sigmoid(g) * u;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(&self, g: &Tensor, u: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let _prof = super::profile::timer("swiglu", "bwd");
        let grad = grad.contiguous()?;
        let n = g.elem_count();
        let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
        with_data(g, |gs| {
            with_data(u, |us| {
                with_data(&grad, |dy| {
                    dg.par_chunks_mut(4096)
                        .zip(du.par_chunks_mut(4096))
                        .zip(gs.par_chunks(4096).zip(us.par_chunks(4096)).zip(dy.par_chunks(4096)))
                        .for_each(|((dgc, duc), ((gc, uc), dyc))| {
                            for i in 0..gc.len() {
                                let s = sigmoid(gc[i]);
                                duc[i] = dyc[i] * gc[i] * s;
                                dgc[i] = dyc[i] * uc[i] * s * (1.0 + gc[i] * (1.0 - s));
                            }
                        });
                    Ok(())
                })
            })
        })?;
        let dg = if g.track_op() { Some(tensor_from(dg, g.shape())?) } else { None };
        let du = if u.track_op() { Some(tensor_from(du, u.shape())?) } else { None };
        Ok((dg, du))
    }
}

pub(crate) fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    Ok(g.contiguous()?.apply_op2(&u.contiguous()?, SwiGlu)?)
}

// ------------------------------------------------------------------------------------------------
// Log-probability of one target per row: log_softmax(logits)[i, t_i], without materialising the
// log-softmax (language-model heads: rows × a vocabulary of tens of thousands).

struct PickedLogProb {
    targets: Vec<u32>,
}

impl CustomOp1 for PickedLogProb {
    fn name(&self) -> &'static str {
        "picked-log-prob"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let _prof = super::profile::timer("picked-log-prob", "fwd");
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
        let _prof = super::profile::timer("picked-log-prob", "bwd");
        let (n, v) = arg.dims2()?;
        let mut dx = vec![0f32; n * v];
        let (res, grad) = (res.to_vec1::<f32>()?, grad.to_vec1::<f32>()?);
        with_data(&arg.contiguous()?, |x| {
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

pub(crate) fn picked_log_prob(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    Ok(logits.contiguous()?.apply_op1(PickedLogProb { targets: targets.to_vec() })?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops;
    use candle_core::{Device, Var};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        let key = DropoutKey(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n as u64).map(|i| key.uniform(i) * 2.0 - 1.0).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn exp_and_erf_are_accurate() {
        let mut worst_exp = 0f64;
        let mut worst_erf = 0f64;
        for i in -20000..20000 {
            let x = i as f32 * 0.0025;
            let e = exp_f32(x) as f64;
            let r = (x as f64).exp();
            worst_exp = worst_exp.max(((e - r) / r).abs());
            let erf_ref = libm_erf(x as f64);
            worst_erf = worst_erf.max((erf_f32(x) as f64 - erf_ref).abs());
        }
        assert!(worst_exp < 3e-7, "exp rel error {worst_exp}");
        assert!(worst_erf < 4e-7, "erf abs error {worst_erf}");
    }

    /// erf in f64 by its Taylor series / continued fraction (reference only).
    fn libm_erf(x: f64) -> f64 {
        // High-precision series for |x| < 3, asymptotic complement beyond.
        let a = x.abs();
        let r = if a < 3.0 {
            let mut sum = a;
            let mut term = a;
            let mut n = 0.0;
            while term.abs() > 1e-17 {
                n += 1.0;
                term *= -a * a / n;
                sum += term / (2.0 * n + 1.0);
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            // erfc continued fraction (Lentz), accurate for a >= 3.
            let mut f = a;
            for k in (1..60).rev() {
                f = a + (k as f64 / 2.0) / f;
            }
            1.0 - (-a * a).exp() / (f * std::f64::consts::PI.sqrt())
        };
        r.copysign(x)
    }

    #[test]
    fn frozen_linear_matches_composition() {
        let x = Var::from_tensor(&rand(&[3, 5, 16], 1)).unwrap();
        let w = rand(&[8, 16], 2);
        let b = rand(&[8], 3);
        let y1 = frozen_linear(x.as_tensor(), &w, Some(&b)).unwrap();
        let y2 = ops::linear_composed(x.as_tensor(), &w, Some(&b)).unwrap();
        assert!(max_diff(&y1, &y2) < 1e-5);
        let g = rand(&[3, 5, 8], 4);
        let g1 = (&y1 * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&y2 * &g).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(g1.get(&x).unwrap(), g2.get(&x).unwrap()) < 1e-5);
    }

    #[test]
    fn frozen_linear_gelu_matches_composition() {
        let x = Var::from_tensor(&(rand(&[3, 5, 16], 11) * 2.0).unwrap()).unwrap();
        let w = rand(&[40, 16], 12);
        let b = rand(&[40], 13);
        let y1 = frozen_linear_gelu(x.as_tensor(), &w, Some(&b)).unwrap();
        let y2 = ops::linear_composed(x.as_tensor(), &w, Some(&b)).unwrap().gelu_erf().unwrap();
        assert!(max_diff(&y1, &y2) < 1e-5, "forward differs by {}", max_diff(&y1, &y2));
        let g = rand(&[3, 5, 40], 14);
        // Backward twice through the same graph: the kept pre-activation must survive the first.
        for _ in 0..2 {
            let g1 = (&y1 * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&y2 * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let d = max_diff(g1.get(&x).unwrap(), g2.get(&x).unwrap());
            assert!(d < 1e-5, "input gradient differs by {d}");
        }
    }

    #[test]
    fn layer_norm_matches_composition() {
        let x = Var::from_tensor(&(rand(&[4, 7, 32], 5) * 3.0).unwrap()).unwrap();
        let g = Var::from_tensor(&rand(&[32], 6)).unwrap();
        let b = Var::from_tensor(&rand(&[32], 7)).unwrap();
        let y1 = layer_norm(x.as_tensor(), g.as_tensor(), b.as_tensor(), 1e-12).unwrap();
        let y2 = ops::layer_norm_composed(x.as_tensor(), g.as_tensor(), b.as_tensor(), 1e-12).unwrap();
        assert!(max_diff(&y1, &y2) < 1e-5);
        let up = rand(&[4, 7, 32], 8);
        let g1 = (&y1 * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&y2 * &up).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &g, &b] {
            let d = max_diff(g1.get(v).unwrap(), g2.get(v).unwrap());
            assert!(d < 1e-4, "grad diff {d}");
        }
    }

    #[test]
    fn scale_last_matches_broadcast_mul() {
        // 200 rows: more than one 64-row block of the deterministic dl reduction.
        let x = Var::from_tensor(&rand(&[4, 50, 24], 21)).unwrap();
        let l = Var::from_tensor(&(rand(&[24], 22) + 1.0).unwrap()).unwrap();
        let y1 = scale_last(x.as_tensor(), l.as_tensor()).unwrap();
        let y2 = x.as_tensor().broadcast_mul(l.as_tensor()).unwrap();
        assert_eq!(max_diff(&y1, &y2), 0.0);
        let up = rand(&[4, 50, 24], 23);
        let g1 = (&y1 * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&y2 * &up).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(g1.get(&x).unwrap(), g2.get(&x).unwrap()) < 1e-6);
        let d = max_diff(g1.get(&l).unwrap(), g2.get(&l).unwrap());
        assert!(d < 1e-4, "dl diff {d}");
        assert!(scale_last(x.as_tensor(), &rand(&[23], 1)).is_err());
    }

    #[test]
    fn gelu_and_dropout_match_composition() {
        let x = Var::from_tensor(&(rand(&[6, 50], 9) * 4.0).unwrap()).unwrap();
        let up = rand(&[6, 50], 10);
        let y1 = gelu(x.as_tensor()).unwrap();
        let y2 = x.as_tensor().gelu_erf().unwrap();
        assert!(max_diff(&y1, &y2) < 1e-6);
        let g1 = (&y1 * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&y2 * &up).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(g1.get(&x).unwrap(), g2.get(&x).unwrap()) < 1e-5);

        let key = DropoutKey(77);
        let d1 = dropout(x.as_tensor(), 0.3, key).unwrap();
        let d2 = ops::dropout_composed(x.as_tensor(), 0.3, key).unwrap();
        assert_eq!(max_diff(&d1, &d2), 0.0);
        let g1 = (&d1 * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&d2 * &up).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(g1.get(&x).unwrap(), g2.get(&x).unwrap()) < 1e-6);
    }

    #[test]
    fn decoder_ops_match_composition() {
        let (b, t, n, d) = (2, 5, 3, 8);
        let x = Var::from_tensor(&(rand(&[b, t, n * d], 41) * 3.0).unwrap()).unwrap();
        let w = Var::from_tensor(&rand(&[n * d], 42)).unwrap();
        let y1 = rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
        let y2 = ops::rms_norm_composed(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
        assert!(max_diff(&y1, &y2) < 1e-5, "rms fwd {}", max_diff(&y1, &y2));
        let up = rand(&[b, t, n * d], 43);
        let g1 = (&y1 * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&y2 * &up).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &w] {
            assert!(max_diff(g1.get(v).unwrap(), g2.get(v).unwrap()) < 1e-4, "rms grad");
        }
        // Rotary on (b, t, heads, d) with (t, 1, d) tables.
        let x4 = Var::from_tensor(&rand(&[b, t, n, d], 44)).unwrap();
        let ang: Vec<f32> = (0..t * d).map(|i| (i as f32 * 0.37).sin() * 2.0).collect();
        let cos = Tensor::from_vec(ang.iter().map(|a| a.cos()).collect::<Vec<_>>(), (t, 1, d), &Device::Cpu).unwrap();
        let sin = Tensor::from_vec(ang.iter().map(|a| a.sin()).collect::<Vec<_>>(), (t, 1, d), &Device::Cpu).unwrap();
        let y1 = rope(x4.as_tensor(), &cos, &sin).unwrap();
        let y2 = ops::rope_composed(x4.as_tensor(), &cos, &sin).unwrap();
        assert!(max_diff(&y1, &y2) < 1e-6, "rope fwd {}", max_diff(&y1, &y2));
        let up = rand(&[b, t, n, d], 45);
        let g1 = (&y1 * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&y2 * &up).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(g1.get(&x4).unwrap(), g2.get(&x4).unwrap()) < 1e-5, "rope grad");
        // SwiGLU.
        let g = Var::from_tensor(&(rand(&[b, t, 16], 46) * 4.0).unwrap()).unwrap();
        let u = Var::from_tensor(&rand(&[b, t, 16], 47)).unwrap();
        let y1 = swiglu(g.as_tensor(), u.as_tensor()).unwrap();
        let y2 = (g.as_tensor().silu().unwrap() * u.as_tensor()).unwrap();
        assert!(max_diff(&y1, &y2) < 1e-5, "swiglu fwd {}", max_diff(&y1, &y2));
        let up = rand(&[b, t, 16], 48);
        let g1 = (&y1 * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&y2 * &up).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&g, &u] {
            assert!(max_diff(g1.get(v).unwrap(), g2.get(v).unwrap()) < 1e-5, "swiglu grad");
        }
    }

    #[test]
    fn picked_log_prob_matches_composition() {
        let x = Var::from_tensor(&(rand(&[5, 37], 31) * 6.0).unwrap()).unwrap();
        let t = [3u32, 0, 36, 17, 3];
        let y1 = picked_log_prob(x.as_tensor(), &t).unwrap();
        let idx = Tensor::new(&t, &Device::Cpu).unwrap().unsqueeze(1).unwrap();
        let y2 = ops::log_softmax(x.as_tensor()).unwrap().gather(&idx, 1).unwrap().squeeze(1).unwrap();
        assert!(max_diff(&y1, &y2) < 1e-5, "fwd {}", max_diff(&y1, &y2));
        let up = rand(&[5], 32);
        let g1 = (&y1 * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&y2 * &up).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(g1.get(&x).unwrap(), g2.get(&x).unwrap()) < 1e-5);
        assert!(picked_log_prob(x.as_tensor(), &[40]).is_err());
    }

    #[test]
    fn causal_attention_matches_composition() {
        // tq < tk: the queries follow 3 cached positions.
        let (b, tq, tk, heads, d) = (2, 6, 9, 3, 4);
        let q = Var::from_tensor(&rand(&[b, tq, heads * d], 21)).unwrap();
        let k = Var::from_tensor(&rand(&[b, tk, heads * d], 22)).unwrap();
        let v = Var::from_tensor(&rand(&[b, tk, heads * d], 23)).unwrap();
        let mut mask = vec![1f32; b * tk];
        mask[tk + 1] = 0.0;
        let bias = ops::mask_to_bias(&Tensor::from_vec(mask, (b, tk), &Device::Cpu).unwrap()).unwrap();
        let y1 = causal_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &bias, heads).unwrap();
        let y2 = ops::causal_attention_composed(q.as_tensor(), k.as_tensor(), v.as_tensor(), &bias, heads).unwrap();
        assert!(max_diff(&y1, &y2) < 1e-5, "fwd {}", max_diff(&y1, &y2));
        // Not the non-causal result.
        let y3 = attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &bias, heads, None).unwrap();
        assert!(max_diff(&y1, &y3) > 1e-2);
        let up = rand(&[b, tq, heads * d], 24);
        let g1 = (&y1 * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&y2 * &up).unwrap().sum_all().unwrap().backward().unwrap();
        for t in [&q, &k, &v] {
            let diff = max_diff(g1.get(t).unwrap(), g2.get(t).unwrap());
            assert!(diff < 1e-5, "grad diff {diff}");
        }
    }

    #[test]
    fn attention_matches_composition() {
        for (dropout, tk) in [(None, 9), (Some((0.2f32, DropoutKey(5))), 12)] {
            let (b, tq, heads, d) = (2, 9, 3, 4);
            let q = Var::from_tensor(&rand(&[b, tq, heads * d], 11)).unwrap();
            let k = Var::from_tensor(&rand(&[b, tk, heads * d], 12)).unwrap();
            let v = Var::from_tensor(&rand(&[b, tk, heads * d], 13)).unwrap();
            let mut mask = vec![1f32; b * tk];
            mask[tk - 1] = 0.0;
            mask[tk - 2] = 0.0;
            let mask = Tensor::from_vec(mask, (b, tk), &Device::Cpu).unwrap();
            let bias = ops::mask_to_bias(&mask).unwrap();
            let y1 = attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &bias, heads, dropout).unwrap();
            let y2 =
                ops::attention_composed(q.as_tensor(), k.as_tensor(), v.as_tensor(), &bias, heads, dropout)
                    .unwrap();
            assert!(max_diff(&y1, &y2) < 1e-5, "fwd {}", max_diff(&y1, &y2));
            let up = rand(&[b, tq, heads * d], 14);
            let g1 = (&y1 * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&y2 * &up).unwrap().sum_all().unwrap().backward().unwrap();
            for t in [&q, &k, &v] {
                let diff = max_diff(g1.get(t).unwrap(), g2.get(t).unwrap());
                assert!(diff < 1e-5, "grad diff {diff}");
            }
        }
    }
}
