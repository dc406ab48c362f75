//! Register-blocked products for one attention head: the seven (T × T × d) and (T × d × T)
//! products of a small head (d = 32 on MiniLM, 64 on SmolLM2) are too small for `gemm`'s cache
//! blocking and packing (its per-call overhead is most of their time). This kernel reads its
//! operands in place: a tile of [`MR`] output rows × 32 columns stays in 24 vector registers while
//! the inner dimension runs, each step loading one row of the right operand (two vectors) and
//! broadcasting one element of each left row.
//!
//! The right operand must be row-major with a column count that is a multiple of [`W`] (16); the
//! left one may be any strided view (a transpose included). Written in lanes of 16 that the
//! compiler maps to AVX-512 registers (two AVX2 registers elsewhere); `f32::mul_add` is one fused
//! multiply-add with the target's `fma` feature, which [`available`] requires.

use super::cpu::{Gemm, Mat, Out};

/// Lanes of a vector (f32 in one AVX-512 register).
pub(super) const W: usize = 16;
/// Output rows of the main tile (12 rows × 2 vectors = 24 accumulator registers).
const MR: usize = 12;

/// Whether this build has the fused multiply-add the kernel needs to be fast (otherwise callers
/// use `gemm`).
pub(super) fn available() -> bool {
    cfg!(any(target_feature = "fma", not(any(target_arch = "x86", target_arch = "x86_64"))))
}

/// Whether attention runs its head products on this kernel: [`available`] and
/// `DELTATUNE_HEAD_GEMM` unset or not `0` (read once; `0` runs them on `gemm`, for A/B timing).
pub(super) fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| available() && std::env::var("DELTATUNE_HEAD_GEMM").map(|v| v != "0").unwrap_or(true))
}

/// Whether `dst (m×n) = lhs (m×k) · rhs (k×n)` fits the kernel: `rhs` row-major, `n` a multiple of
/// [`W`].
pub(super) fn fits(n: usize, rhs: &Mat) -> bool {
    available() && n.is_multiple_of(W) && rhs.cs == 1
}

/// `dst (m×n) = [dst +] lhs (m×k) · rhs (k×n) · scale` on this thread, like `gemm` with
/// [`Gemm::SERIAL`]; requires [`fits`]. Every output element sums its k products in order
/// (deterministic; not the same rounding as `gemm`).
pub(super) fn head_gemm(dst: Out, [m, n, k]: [usize; 3], lhs: Mat, rhs: Mat, how: Gemm) {
    assert!(n.is_multiple_of(W) && rhs.cs == 1, "head_gemm: the right operand must be row-major, n a multiple of {W}");
    if m == 0 || n == 0 {
        return;
    }
    lhs.check(m, k);
    rhs.check(k, n);
    assert!((m - 1) * dst.rs + n <= dst.len, "head_gemm destination out of bounds");
    let (scale, add) = (how.scale, how.accumulate);
    if k == 0 {
        if !add {
            for i in 0..m {
                // SAFETY: row i's n elements are inside the destination (checked above).
                unsafe { std::slice::from_raw_parts_mut(dst.ptr.add(i * dst.rs), n) }.fill(0.0);
            }
        }
        return;
    }
    let (a, b) = (lhs.data.as_ptr(), rhs.data.as_ptr());
    let t = Tiles { c: dst.ptr, ldc: dst.rs, a, ars: lhs.rs, acs: lhs.cs, b, ldb: rhs.rs, k, scale, add };
    let mut i = 0;
    // SAFETY: every tile reads lhs rows i..i+rows (< m) and columns < k, rhs rows < k and
    // columns < n, and writes dst rows < m, columns < n: all inside the extents checked above.
    unsafe {
        while i + MR <= m {
            t.row_block::<MR>(i, n);
            i += MR;
        }
        while i + 4 <= m {
            t.row_block::<4>(i, n);
            i += 4;
        }
        while i < m {
            t.row_block::<1>(i, n);
            i += 1;
        }
    }
}

/// One product's operands as raw pointers and strides (bounds checked by the caller).
struct Tiles {
    c: *mut f32,
    ldc: usize,
    a: *const f32,
    ars: usize,
    acs: usize,
    b: *const f32,
    ldb: usize,
    k: usize,
    scale: f32,
    add: bool,
}

impl Tiles {
    /// Rows i..i+R across all n columns: 32-wide tiles, then a 16-wide one if n is an odd number
    /// of vectors.
    #[inline(always)]
    unsafe fn row_block<const R: usize>(&self, i: usize, n: usize) {
        let mut j = 0;
        while j + 2 * W <= n {
            self.tile::<R, 2>(i, j);
            j += 2 * W;
        }
        if j < n {
            self.tile::<R, 1>(i, j);
        }
    }

    /// The R × (V·16) tile at (i, j): accumulators in registers over the whole inner dimension.
    #[inline(always)]
    unsafe fn tile<const R: usize, const V: usize>(&self, i: usize, j: usize) {
        let mut acc = [[[0f32; W]; V]; R];
        let a = self.a.add(i * self.ars);
        let b = self.b.add(j);
        for kk in 0..self.k {
            let br = b.add(kk * self.ldb);
            let mut bv = [[0f32; W]; V];
            for (v, bvv) in bv.iter_mut().enumerate() {
                *bvv = std::ptr::read_unaligned(br.add(v * W) as *const [f32; W]);
            }
            let ak = a.add(kk * self.acs);
            for (r, accr) in acc.iter_mut().enumerate() {
                let x = *ak.add(r * self.ars);
                for (accv, bvv) in accr.iter_mut().zip(&bv) {
                    for l in 0..W {
                        accv[l] = x.mul_add(bvv[l], accv[l]);
                    }
                }
            }
        }
        for (r, accr) in acc.iter().enumerate() {
            let c = self.c.add((i + r) * self.ldc + j);
            for (v, accv) in accr.iter().enumerate() {
                let cv = c.add(v * W) as *mut [f32; W];
                let mut out = std::ptr::read_unaligned(cv);
                for l in 0..W {
                    let x = accv[l] * self.scale;
                    out[l] = if self.add { out[l] + x } else { x };
                }
                std::ptr::write_unaligned(cv, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::cpu::gemm;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| (((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) % 2001) as f32 / 1000.0 - 1.0).collect()
    }

    /// Against `gemm` for every row remainder, both column widths, transposed and strided left
    /// operands, accumulation and scaling.
    #[test]
    fn head_gemm_matches_gemm() {
        for &(m, n, k) in &[(1, 16, 1), (13, 32, 7), (128, 128, 32), (37, 48, 130), (5, 64, 0), (29, 80, 64)] {
            for transposed in [false, true] {
                for (scale, add) in [(1.0, false), (0.25, true)] {
                    // lhs: m × k read either from a row-major (m × k+3) buffer or as the
                    // transpose of a (k × m+5) one; rhs: k × n in rows of n+16.
                    let (lhs_buf, lhs) = if transposed { (data(k.max(1) * (m + 5), 1), None) } else { (data(m * (k + 3), 2), Some(())) };
                    let lm = if lhs.is_some() { Mat::rm(&lhs_buf, k + 3) } else { Mat::rm_t(&lhs_buf, m + 5) };
                    let rhs_buf = data(k.max(1) * (n + 16), 3);
                    let rm = Mat::rm(&rhs_buf, n + 16);
                    let mut want = data(m * (n + 4), 4);
                    let mut got = want.clone();
                    let how = Gemm::SERIAL.scaled(scale).accumulate(add);
                    gemm(Out::rm(&mut want, n + 4), [m, n, k], lm, rm, how);
                    head_gemm(Out::rm(&mut got, n + 4), [m, n, k], lm, rm, how);
                    let worst = want.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                    assert!(worst < 1e-4, "m {m} n {n} k {k} transposed {transposed} add {add}: {worst}");
                    // Columns past n (the padding of each row) are left alone.
                    for i in 0..m {
                        assert_eq!(want[i * (n + 4) + n..i * (n + 4) + n + 4], got[i * (n + 4) + n..i * (n + 4) + n + 4]);
                    }
                }
            }
        }
    }
}
