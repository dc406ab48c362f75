//! What the fused CPU kernels share: when they may run, reading and writing tensor data, a strided
//! `gemm`, vectorisable maths (exp, erf, lane-wise sums), row- and chunk-parallel loops, and
//! generic candle ops for the two common kernel shapes (`Unary`, `RowOp`).
//!
//! The kernels read their inputs as contiguous f32 slices, run in parallel with rayon and call
//! `gemm` directly with explicit strides, so no transposed copies are made.
//!
//! Set `DELTATUNE_FUSED=0` to run the compositions instead (for benchmarking the kernels one by one).

use super::profile::timer;
use crate::error::Result;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;
use std::marker::PhantomData;
use std::sync::OnceLock;

/// Whether fused kernels are enabled (`DELTATUNE_FUSED` unset or not `0`). Read once.
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("DELTATUNE_FUSED").map(|v| v != "0").unwrap_or(true))
}

/// Whether the fused kernels may be used for a tensor (CPU, f32).
pub(crate) fn fused_ok(t: &Tensor) -> bool {
    matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32 && enabled()
}

/// Sizes the global thread pool used by the fused kernels (call once, before any tensor work).
pub fn set_threads(n: usize) -> Result<()> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| crate::error::Error::arg("--threads", e.to_string()))
}

/// Runs `f` on a thread of the global pool. The kernels' parallel loops called from a thread
/// outside the pool hand their work to the pool and put the caller to sleep until it is done —
/// two context switches per kernel call, and with as many pool threads as cores the caller also
/// competes with the pool's spinning workers; called from inside, the caller takes part in the
/// work. For jobs that run many small kernels in a row (decoding runs hundreds per token). Not
/// for a thread that blocks waiting for other threads' kernel work (a server's listener): it
/// would hold a pool thread idle.
pub fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

// ------------------------------------------------------------------------------------------------
// Tensor data in and out.

/// What a custom op's forward returns: the output data and shape.
pub(crate) type Fwd = candle_core::Result<(CpuStorage, Shape)>;
/// What a two-argument custom op's backward returns: a gradient per argument that needs one.
pub(crate) type Grads2 = candle_core::Result<(Option<Tensor>, Option<Tensor>)>;
/// What a three-argument custom op's backward returns.
pub(crate) type Grads3 = candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)>;

pub(crate) fn err(msg: impl Into<String>) -> candle_core::Error {
    candle_core::Error::Msg(msg.into())
}

/// The contiguous f32 data of a custom-op argument.
pub(crate) fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => Err(err("fused kernel: non-contiguous input")),
    }
}

/// Runs `f` on the contiguous f32 data of CPU tensors held by an op (the storages stay locked for
/// reading while `f` runs).
pub(crate) fn with_data<const N: usize, R>(
    ts: [&Tensor; N],
    f: impl FnOnce([&[f32]; N]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let held = ts.map(|t| t.storage_and_layout());
    let mut data: [&[f32]; N] = [&[]; N];
    for (d, (storage, layout)) in data.iter_mut().zip(&held) {
        *d = match &**storage {
            Storage::Cpu(s) => slice(s, layout)?,
            _ => return Err(err("fused kernel: tensor is not on the CPU")),
        };
    }
    f(data)
}

pub(crate) fn tensor_from(data: Vec<f32>, shape: impl Into<Shape>) -> candle_core::Result<Tensor> {
    Tensor::from_vec(data, shape, &Device::Cpu)
}

/// The gradient `data` for `t` when `t` takes part in the graph, otherwise none.
pub(crate) fn grad_for(t: &Tensor, data: Vec<f32>) -> candle_core::Result<Option<Tensor>> {
    if t.track_op() {
        Ok(Some(tensor_from(data, t.shape())?))
    } else {
        Ok(None)
    }
}

/// (rows, last dimension) of a shape.
pub(crate) fn rows_cols(shape: &Shape) -> (usize, usize) {
    let dims = shape.dims();
    let cols = dims.last().copied().unwrap_or(1);
    let rows = if cols == 0 { 0 } else { shape.elem_count() / cols };
    (rows, cols)
}

// ------------------------------------------------------------------------------------------------
// Strided matrix products.

/// A raw pointer to a buffer of `len` f32 that may be shared across rayon tasks writing disjoint
/// regions of it.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr {
    ptr: *mut f32,
    len: usize,
}
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    pub(crate) fn of(buf: &mut [f32]) -> Self {
        SyncPtr { ptr: buf.as_mut_ptr(), len: buf.len() }
    }

    /// A `gemm` destination from element `off` on, with row stride `rs` (a method, so closures
    /// capture the whole `Sync` wrapper). Tasks must write disjoint elements.
    pub(crate) fn out<'a>(&self, off: usize, rs: usize) -> Out<'a> {
        assert!(off <= self.len, "gemm destination offset out of bounds");
        // SAFETY: `off` is inside the allocation (checked); `gemm` checks the extent it writes.
        Out { ptr: unsafe { self.ptr.add(off) }, len: self.len - off, rs, buf: PhantomData }
    }
}

/// Where [`gemm`] writes: `len` elements from `ptr`, rows `rs` apart (borrowing the buffer, so an
/// operand cannot alias it).
pub(crate) struct Out<'a> {
    pub(super) ptr: *mut f32,
    pub(super) len: usize,
    pub(super) rs: usize,
    buf: PhantomData<&'a mut [f32]>,
}

impl<'a> Out<'a> {
    /// A whole row-major buffer with row stride `rs`.
    pub(crate) fn rm(buf: &'a mut [f32], rs: usize) -> Self {
        Out { ptr: buf.as_mut_ptr(), len: buf.len(), rs, buf: PhantomData }
    }
}

/// A strided matrix view for [`gemm`]: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub(super) data: &'a [f32],
    pub(super) rs: usize,
    pub(super) cs: usize,
}

impl<'a> Mat<'a> {
    /// A row-major matrix with row stride `rs` (its column count, or more for a column block).
    pub(crate) fn rm(data: &'a [f32], rs: usize) -> Self {
        Mat { data, rs, cs: 1 }
    }
    /// The transpose of a row-major matrix with row stride `rs`.
    pub(crate) fn rm_t(data: &'a [f32], rs: usize) -> Self {
        Mat { data, rs: 1, cs: rs }
    }
    pub(super) fn check(&self, rows: usize, cols: usize) {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * self.rs + (cols - 1) * self.cs;
            assert!(last < self.data.len(), "gemm operand out of bounds: {last} >= {}", self.data.len());
        }
    }
}

/// How [`gemm`] runs: `dst = [dst +] lhs · rhs * scale`, on the rayon pool or on this thread.
#[derive(Clone, Copy)]
pub(crate) struct Gemm {
    pub(super) scale: f32,
    pub(super) accumulate: bool,
    parallel: bool,
}

impl Gemm {
    /// On the rayon pool (for large products, outside parallel loops).
    pub(crate) const PARALLEL: Gemm = Gemm { scale: 1.0, accumulate: false, parallel: true };
    /// On the calling thread (inside a parallel loop).
    pub(crate) const SERIAL: Gemm = Gemm { scale: 1.0, accumulate: false, parallel: false };

    pub(crate) fn scaled(self, scale: f32) -> Self {
        Gemm { scale, ..self }
    }
    /// Add to what `dst` holds instead of overwriting it.
    pub(crate) fn accumulate(self, accumulate: bool) -> Self {
        Gemm { accumulate, ..self }
    }
}

/// `dst (m×n) = [dst +] lhs (m×k) · rhs (k×n) * scale`.
pub(crate) fn gemm(dst: Out, [m, n, k]: [usize; 3], lhs: Mat, rhs: Mat, how: Gemm) {
    if m == 0 || n == 0 {
        return;
    }
    lhs.check(m, k);
    rhs.check(k, n);
    assert!((m - 1) * dst.rs + n <= dst.len, "gemm destination out of bounds");
    let par = if how.parallel && m * n * k > 64 * 64 * 64 {
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
            dst.ptr,
            1,
            dst.rs as isize,
            how.accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            how.scale,
            false,
            false,
            false,
            par,
        )
    }
}

// ------------------------------------------------------------------------------------------------
// Fast vectorisable maths.

/// exp(x) for f32, Cephes-style range reduction and a degree-6 polynomial (about 1 ulp); written
/// without branches so that loops over it vectorise.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    let x = x.clamp(-87.336_54, 88.376_26);
    let fx = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - fx * 0.693_359_4 - fx * -2.121_944_4e-4;
    let z = r * r;
    let y = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1) * r + 5e-1;
    let y = y * z + r + 1.0;
    // 2^fx from fx's bits after adding 1.5 · 2^23 (fx is a whole number in [-126, 128], so the sum
    // is exact and its low bits are fx): the same integer as `fx as i32`, whose saturating
    // conversion keeps the loops around this function from vectorising (3–4× slower).
    let n = ((fx + 12_582_912.0).to_bits() as i32).wrapping_sub(0x4B40_0000);
    let bits = (n.wrapping_add(127) as u32) << 23;
    y * f32::from_bits(bits)
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

/// The logistic function with [`exp_f32`].
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-x))
}

/// Lanes of the lane-wise reductions (16 f32: one AVX-512 register).
pub(crate) const LANES: usize = 16;

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

/// `x[i] = exp(x[i] − shift)` for every element, returning their sum in the lanes and order of
/// [`sum_lanes`] (the same number it would return afterwards) in the same pass.
#[inline(always)]
pub fn exp_sum_lanes(x: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut it = x.chunks_exact_mut(LANES);
    for c in &mut it {
        for j in 0..LANES {
            c[j] = exp_f32(c[j] - shift);
            acc[j] += c[j];
        }
    }
    let rest = it.into_remainder();
    for v in rest.iter_mut() {
        *v = exp_f32(*v - shift);
    }
    let mut s: f32 = rest.iter().sum();
    for a in acc {
        s += a;
    }
    s
}

/// Sum of f32 values in f64 (long rows: a vocabulary), in 8 lanes (vectorises; fixed order).
pub(crate) fn sum_f64_lanes(x: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for j in 0..8 {
            acc[j] += c[j] as f64;
        }
    }
    it.remainder().iter().map(|&v| v as f64).sum::<f64>() + acc.iter().sum::<f64>()
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

/// `x[i] += b[i]` (over x's length) and the maximum of the sums, in one pass in 16 lanes
/// (NaN-agnostic compare, as [`max_lanes`]).
#[inline(always)]
pub fn add_max_lanes(x: &mut [f32], b: &[f32]) -> f32 {
    let b = &b[..x.len()];
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut ix = x.chunks_exact_mut(LANES);
    let mut ib = b.chunks_exact(LANES);
    for (c, cb) in (&mut ix).zip(&mut ib) {
        for j in 0..LANES {
            c[j] += cb[j];
            acc[j] = if c[j] > acc[j] { c[j] } else { acc[j] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for (v, &bb) in ix.into_remainder().iter_mut().zip(ib.remainder()) {
        *v += bb;
        m = if *v > m { *v } else { m };
    }
    for v in acc {
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

// ------------------------------------------------------------------------------------------------
// Parallel loops.

/// Elements per task of the elementwise loops.
pub(crate) const CHUNK: usize = 4096;

/// `y[i] = f(i, x[i])` in parallel chunks (`i` counts from the start of `x`).
pub(crate) fn map_indexed_into(y: &mut [f32], x: &[f32], f: impl Fn(u64, f32) -> f32 + Sync) {
    y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).enumerate().for_each(|(c, (yc, xc))| {
        let base = (c * CHUNK) as u64;
        for (i, (y, &x)) in yc.iter_mut().zip(xc).enumerate() {
            *y = f(base + i as u64, x);
        }
    });
}

/// `y[i] = f(x[i])` in parallel chunks.
pub(crate) fn map_into(y: &mut [f32], x: &[f32], f: impl Fn(f32) -> f32 + Sync) {
    y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(yc, xc)| {
        for (y, &x) in yc.iter_mut().zip(xc) {
            *y = f(x);
        }
    });
}

/// `y[i] = f(a[i], b[i])` in parallel chunks.
pub(crate) fn zip_map_into(y: &mut [f32], a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) {
    y.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK)).zip(b.par_chunks(CHUNK)).for_each(|((yc, ac), bc)| {
        for ((y, &a), &b) in yc.iter_mut().zip(ac).zip(bc) {
            *y = f(a, b);
        }
    });
}

/// `y[i] += x[i]` in parallel chunks.
pub(crate) fn add_into(y: &mut [f32], x: &[f32]) {
    y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(yc, xc)| {
        for (y, &x) in yc.iter_mut().zip(xc) {
            *y += x;
        }
    });
}

/// `f(row index, y row, x row)` for every row of `h` values, in parallel.
pub(crate) fn rows_into(y: &mut [f32], x: &[f32], h: usize, f: impl Fn(usize, &mut [f32], &[f32]) + Sync) {
    let h = h.max(1);
    y.par_chunks_mut(h).zip(x.par_chunks(h)).enumerate().for_each(|(i, (yr, xr))| f(i, yr, xr));
}

/// `f(dx row, x row, g row)` for every row of `h` values, in parallel (a row-wise backward).
pub(crate) fn rows2_into(dx: &mut [f32], x: &[f32], g: &[f32], h: usize, f: impl Fn(&mut [f32], &[f32], &[f32]) + Sync) {
    let h = h.max(1);
    dx.par_chunks_mut(h).zip(x.par_chunks(h)).zip(g.par_chunks(h)).for_each(|((dr, xr), gr)| f(dr, xr, gr));
}

/// Parameter gradients summed over rows: `row(x_row, g_row, acc)` adds one row's contribution to
/// `acc` (`width` values). Fixed blocks of 64 rows are summed in parallel and combined in order, so
/// the result does not depend on rayon's schedule (bit-reproducible runs).
pub(crate) fn column_sums(
    xs: &[f32],
    gs: &[f32],
    h: usize,
    width: usize,
    row: impl Fn(&[f32], &[f32], &mut [f32]) + Sync,
) -> Vec<f32> {
    let partials: Vec<Vec<f32>> = xs
        .par_chunks(h * 64)
        .zip(gs.par_chunks(h * 64))
        .map(|(xb, gb)| {
            let mut p = vec![0f32; width];
            for (xr, gr) in xb.chunks(h).zip(gb.chunks(h)) {
                row(xr, gr, &mut p);
            }
            p
        })
        .collect();
    let mut out = vec![0f32; width];
    for p in partials {
        out.iter_mut().zip(&p).for_each(|(a, b)| *a += b);
    }
    out
}

// ------------------------------------------------------------------------------------------------
// Generic ops for the common kernel shapes.

/// A one-input kernel whose output has the input's shape; [`Unary`] makes it a candle op.
pub(crate) trait UnaryKernel: Send + Sync {
    /// The op's name, also its row in the profile.
    const NAME: &'static str;
    /// `y` from `x` (same length).
    fn forward(&self, y: &mut [f32], x: &[f32]);
    /// The input gradient `dx` from the input `x` and the output gradient `g`.
    fn backward(&self, dx: &mut [f32], x: &[f32], g: &[f32]);
}

/// The candle op of a [`UnaryKernel`].
pub(crate) struct Unary<K>(pub K);

impl<K: UnaryKernel> CustomOp1 for Unary<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Fwd {
        let _prof = timer(K::NAME, "fwd");
        let x = slice(s, l)?;
        let mut y = vec![0f32; x.len()];
        self.0.forward(&mut y, x);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let _prof = timer(K::NAME, "bwd");
        let grad = grad.contiguous()?;
        let mut dx = vec![0f32; arg.elem_count()];
        with_data([arg, &grad], |[xs, gs]| {
            self.0.backward(&mut dx, xs, gs);
            Ok(())
        })?;
        Ok(Some(tensor_from(dx, arg.shape())?))
    }
}

/// Applies a [`UnaryKernel`] to `x`.
pub(crate) fn unary(x: &Tensor, kernel: impl UnaryKernel + 'static) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(Unary(kernel))?)
}

/// A row-wise kernel with one vector `w` of per-column values (as long as a row), e.g. a norm's
/// weight; [`RowOp`] makes it a candle op with gradients for the rows and for `w`.
pub(crate) trait RowKernel: Send + Sync {
    const NAME: &'static str;
    /// One output row from its input row.
    fn forward(&self, y: &mut [f32], x: &[f32], w: &[f32]);
    /// One row's input gradient from its input row and output gradient row.
    fn backward_x(&self, dx: &mut [f32], x: &[f32], w: &[f32], g: &[f32]);
    /// Adds one row's contribution to the gradient of `w`.
    fn backward_w(&self, dw: &mut [f32], x: &[f32], g: &[f32]);
}

/// The candle op of a [`RowKernel`]: arguments (x (..., h), w (h)).
pub(crate) struct RowOp<K>(pub K);

impl<K: RowKernel> CustomOp2 for RowOp<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Fwd {
        let _prof = timer(K::NAME, "fwd");
        let (x, w) = (slice(s1, l1)?, slice(s2, l2)?);
        let (_, h) = rows_cols(l1.shape());
        if w.len() != h {
            return Err(err(format!("{}: vector of {} for rows of {h}", K::NAME, w.len())));
        }
        let mut y = vec![0f32; x.len()];
        rows_into(&mut y, x, h, |_, yr, xr| self.0.forward(yr, xr, w));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Grads2 {
        let _prof = timer(K::NAME, "bwd");
        let grad = grad.contiguous()?;
        let h = w.elem_count();
        with_data([x, w, &grad], |[xs, ws, gs]| {
            let dx = if x.track_op() {
                let mut dx = vec![0f32; xs.len()];
                rows2_into(&mut dx, xs, gs, h, |dr, xr, gr| self.0.backward_x(dr, xr, ws, gr));
                Some(tensor_from(dx, x.shape())?)
            } else {
                None
            };
            let dw = if w.track_op() {
                Some(tensor_from(column_sums(xs, gs, h, h, |xr, gr, p| self.0.backward_w(p, xr, gr)), w.shape())?)
            } else {
                None
            };
            Ok((dx, dw))
        })
    }
}

/// Applies a [`RowKernel`] to the rows of `x` with the vector `w`.
pub(crate) fn row_op(x: &Tensor, w: &Tensor, kernel: impl RowKernel + 'static) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op2(&w.flatten_all()?.contiguous()?, RowOp(kernel))?)
}

#[cfg(test)]
pub(crate) mod testing {
    //! What the family tests share: seeded inputs and comparisons of results and gradients.

    use crate::ops::rng::DropoutKey;
    use candle_core::backprop::GradStore;
    use candle_core::{Device, Tensor, Var};

    /// Uniform values in [-1, 1) from a seed.
    pub fn rand(shape: &[usize], seed: u64) -> Tensor {
        let key = DropoutKey(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n as u64).map(|i| key.uniform(i) * 2.0 - 1.0).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// A variable of [`rand`] values times `scale`.
    pub fn var(shape: &[usize], seed: u64, scale: f64) -> Var {
        Var::from_tensor(&(rand(shape, seed) * scale).unwrap()).unwrap()
    }

    pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// The gradients of `sum(y ⊙ up)`.
    pub fn grads(y: &Tensor, up: &Tensor) -> GradStore {
        (y * up).unwrap().sum_all().unwrap().backward().unwrap()
    }

    /// The additive key mask (b, tk) of a batch whose second row's last `pad` keys are padding.
    pub fn padded_key_bias(b: usize, tk: usize, pad: usize) -> Tensor {
        let mut mask = vec![1f32; b * tk];
        mask[2 * tk - pad..2 * tk].fill(0.0);
        crate::ops::mask_to_bias(&Tensor::from_vec(mask, (b, tk), &Device::Cpu).unwrap()).unwrap()
    }

    /// A map's index and its LoRA's A and B as variables.
    pub type MapLora = (usize, Var, Var);

    /// A LoRA (A (r × in), B (out × r), seeded by the map's index) on each map in `on`, whose
    /// weight is `dims(j)` = (out, in); and the layer's LoRA slots (B scaled by 2, as a LoRA's
    /// scale folds into it).
    pub fn layer_lora<const N: usize>(on: &[usize], dims: impl Fn(usize) -> (usize, usize), r: usize) -> (Vec<MapLora>, [crate::ops::MapDelta; N]) {
        let vars: Vec<MapLora> = on
            .iter()
            .map(|&j| {
                let (out, inp) = dims(j);
                (j, var(&[r, inp], 20 + j as u64, 0.3), var(&[out, r], 40 + j as u64, 0.3))
            })
            .collect();
        let mut lora: [crate::ops::MapDelta; N] = std::array::from_fn(|_| Default::default());
        for (j, a, bm) in &vars {
            lora[*j].lora = Some((a.as_tensor().clone(), (bm.as_tensor() * 2.0).unwrap()));
        }
        (vars, lora)
    }

    /// A trained vector `base + Δ` around `base` (Δ a variable of [`rand`] values times `scale`),
    /// named for the failure message; the tensor the layer reads and the variable.
    pub fn around(base: &Tensor, seed: u64, scale: f64, name: &str, trained: &mut Vec<(String, Var)>) -> Tensor {
        let v = var(base.dims(), seed, scale);
        let t = (base + v.as_tensor()).unwrap();
        trained.push((name.to_string(), v));
        t
    }

    /// A block engine's layer `y1` against its composition `y2`: the output to the bit, the
    /// input's gradient (when `x_grad`; none otherwise), each LoRA matrix's and each other trained
    /// tensor's (`trained`) within 1e-4 relative, for the upstream gradient `up`.
    pub fn check_layer(y1: &Tensor, y2: &Tensor, up: &Tensor, xv: &Var, x_grad: bool, vars: &[MapLora], names: &[&str], trained: &[(String, Var)]) {
        assert_eq!(max_diff(y1, y2), 0.0, "output differs");
        check_grads(y1, y2, up, xv, x_grad, vars, names, trained);
    }

    /// [`check_layer`] with the outputs within 1e-5 relative instead of equal (a layer whose
    /// products run in another order than the composition's).
    pub fn check_layer_close(y1: &Tensor, y2: &Tensor, up: &Tensor, xv: &Var, x_grad: bool, vars: &[MapLora], names: &[&str], trained: &[(String, Var)]) {
        let d = max_diff(y1, y2);
        assert!(rel(d, y2) <= 1e-5, "output differs by {d:e}");
        check_grads(y1, y2, up, xv, x_grad, vars, names, trained);
    }

    fn check_grads(y1: &Tensor, y2: &Tensor, up: &Tensor, xv: &Var, x_grad: bool, vars: &[MapLora], names: &[&str], trained: &[(String, Var)]) {
        let (g1, g2) = (grads(y1, up), grads(y2, up));
        if x_grad {
            let d = grad_diff(&g1, &g2, xv);
            assert!(rel(d, g2.get(xv.as_tensor()).unwrap()) <= 1e-4, "dx differs by {d:e}");
        } else {
            assert!(g1.get(xv.as_tensor()).is_none());
        }
        for (j, a, bm) in vars {
            for v in [a, bm] {
                let d = grad_diff(&g1, &g2, v);
                let reference = g2.get(v.as_tensor()).unwrap();
                assert!(rel(d, reference) <= 1e-4, "LoRA on {}: gradient differs by {d:e}", names[*j]);
            }
        }
        for (name, v) in trained {
            let reference = g2.get(v.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient in the composition"));
            let got = g1.get(v.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient from the engine"));
            let d = max_diff(got, reference);
            assert!(rel(d, reference) <= 1e-4, "{name}: gradient differs by {d:e}");
        }
    }

    /// A difference `d` relative to the largest magnitude in `t`.
    pub fn rel(d: f32, t: &Tensor) -> f32 {
        let scale = t.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        d / scale.max(1e-12)
    }

    /// The largest difference between `v`'s gradients in two stores.
    pub fn grad_diff(g1: &GradStore, g2: &GradStore, v: &Var) -> f32 {
        max_diff(g1.get(v).unwrap(), g2.get(v).unwrap())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// The exponent read from the bits equals the saturating integer conversion it replaces, so
    /// exp_f32 returns the same numbers as before that change: every input from the lower clamp
    /// to the upper one in steps of 1/64, both ends, beyond them, and a NaN stays a NaN.
    #[test]
    fn exp_exponent_from_bits_is_the_integer_conversion() {
        let before = |x: f32| -> f32 {
            let x = x.clamp(-87.336_54, 88.376_26);
            let fx = (x * std::f32::consts::LOG2_E + 0.5).floor();
            let r = x - fx * 0.693_359_4 - fx * -2.121_944_4e-4;
            let z = r * r;
            let y = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
                + 1.666_666_5e-1)
                * r
                + 5e-1;
            let y = y * z + r + 1.0;
            y * f32::from_bits(((fx as i32 + 127) as u32) << 23)
        };
        let mut xs: Vec<f32> = (-90 * 64..=90 * 64).map(|i| i as f32 / 64.0).collect();
        xs.extend([-87.336_54, 88.376_26, -1e30, 1e30, f32::MIN, f32::MAX, -0.0, 1e-30]);
        for x in xs {
            assert_eq!(exp_f32(x).to_bits(), before(x).to_bits(), "exp_f32({x})");
        }
        assert!(exp_f32(f32::NAN).is_nan());
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
}
