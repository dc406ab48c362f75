//! `x W^T` for GGUF Q4_1 weights (the default decoder's format) and Q5_0 weights (most matrices of
//! Gemma 3's Q4_K_M file). candle ships only scalar dot products for these two and walks the
//! weights once per activation row, so token-by-token decoding
//! and batched decoding of many sequences ran far below the machine's speed. Here, as in ggml, the
//! activations are quantized to 8 bits per 32-value block (Q8_1-like: a scale and the scaled sum,
//! kept in f32), each weight row is read once for all activation rows, and the block dot products
//! use AVX2 integer multiply-adds where the CPU has them.
//!
//! Every output element is computed the same way whatever the number of rows, so a sequence
//! decoded alone and the same sequence decoded in a batch get bit-identical logits.

use rayon::prelude::*;

/// Values per block (Q4_1 and the activation blocks alike).
const QK: usize = 32;
/// Bytes of one Q4_1 block: f16 scale d, f16 minimum m, 16 bytes of nibbles.
const Q4_1_BYTES: usize = 20;
/// Bytes of one Q5_0 block: f16 scale d, 32 high bits (bit j of element j), 16 bytes of low
/// nibbles; element j is `((low | high << 4) − 16) · d`.
const Q5_0_BYTES: usize = 22;

/// The weight formats with a kernel here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum QKind {
    Q4_1,
    Q5_0,
}

impl QKind {
    fn block_bytes(self) -> usize {
        match self {
            QKind::Q4_1 => Q4_1_BYTES,
            QKind::Q5_0 => Q5_0_BYTES,
        }
    }
}
/// Activation rows handled together against one weight row.
const ROW_TILE: usize = 8;

/// Activations of one row, quantized: per block the scale, the scale times the sum of the
/// quantized values, and the 32 int8 values.
struct Q8Rows {
    d: Vec<f32>,
    s: Vec<f32>,
    q: Vec<i8>,
    blocks: usize,
}

fn quantize_rows(x: &[f32], m: usize, k: usize) -> Q8Rows {
    let blocks = k / QK;
    let mut out = Q8Rows { d: vec![0.0; m * blocks], s: vec![0.0; m * blocks], q: vec![0; m * k], blocks };
    for (b, xs) in x.chunks_exact(QK).enumerate() {
        let amax = xs.iter().fold(0f32, |a, &v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (j, &v) in xs.iter().enumerate() {
            let q = (v * id).round() as i32;
            out.q[b * QK + j] = q as i8;
            sum += q;
        }
        out.d[b] = d;
        out.s[b] = d * sum as f32;
    }
    out
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([bytes[at], bytes[at + 1]])).to_f32()
}

/// `y (m, n) = x (m, k) · W^T` with `w` the raw Q4_1 blocks of W (n, k). `k` must be a multiple
/// of 32 (GGUF guarantees it for Q4_1 tensors).
#[cfg(test)]
pub(crate) fn matmul_q4_1(x: &[f32], m: usize, k: usize, w: &[u8], n: usize) -> Vec<f32> {
    matmul_q(QKind::Q4_1, x, m, k, w, n)
}

/// `y (m, n) = x (m, k) · W^T` with `w` the raw blocks of W (n, k) in format `kind`. `k` must be
/// a multiple of 32 (GGUF guarantees it for these formats).
pub(crate) fn matmul_q(kind: QKind, x: &[f32], m: usize, k: usize, w: &[u8], n: usize) -> Vec<f32> {
    let row_bytes = (k / QK) * kind.block_bytes();
    assert!(k.is_multiple_of(QK) && x.len() == m * k && w.len() == n * row_bytes, "matmul_q: bad shapes");
    let a = quantize_rows(x, m, k);
    let cols_per_task = 16;
    let simd = simd_available();
    if m == 1 {
        // One row (a decoding step): each task writes its stretch of the output directly.
        let mut y = vec![0f32; n];
        y.par_chunks_mut(cols_per_task).enumerate().for_each(|(t, out)| {
            for (jj, o) in out.iter_mut().enumerate() {
                let j = t * cols_per_task + jj;
                dot_rows(kind, simd, &w[j * row_bytes..(j + 1) * row_bytes], &a, 0, 1, std::slice::from_mut(o));
            }
        });
        return y;
    }
    let parts: Vec<Vec<f32>> = (0..n.div_ceil(cols_per_task))
        .into_par_iter()
        .map(|t| {
            let (j0, j1) = (t * cols_per_task, ((t + 1) * cols_per_task).min(n));
            // (columns, rows) of this task, column-major so that a weight row's results sit together.
            let mut part = vec![0f32; (j1 - j0) * m];
            for j in j0..j1 {
                let wrow = &w[j * row_bytes..(j + 1) * row_bytes];
                let dst = &mut part[(j - j0) * m..(j - j0 + 1) * m];
                let mut r = 0;
                while r < m {
                    let rows = ROW_TILE.min(m - r);
                    dot_rows(kind, simd, wrow, &a, r, rows, &mut dst[r..r + rows]);
                    r += rows;
                }
            }
            part
        })
        .collect();
    let mut y = vec![0f32; m * n];
    for (t, part) in parts.iter().enumerate() {
        let j0 = t * cols_per_task;
        for (jj, col) in part.chunks_exact(m).enumerate() {
            for (r, &v) in col.iter().enumerate() {
                y[r * n + j0 + jj] = v;
            }
        }
    }
    y
}

/// Rows `r0..r1`, columns `c0..c1` (multiples of 32, or `c1` = k) of the weight W (n, k) whose raw
/// blocks in format `kind` are `w`, in f32 into `out` ((r1 − r0) × (c1 − c0), row-major), rows in
/// parallel. Every value is the one candle's dequantization gives (the same operations in the
/// same order).
pub(crate) fn decode_block(kind: QKind, w: &[u8], k: usize, (r0, r1): (usize, usize), (c0, c1): (usize, usize), out: &mut [f32]) {
    let row_bytes = (k / QK) * kind.block_bytes();
    let width = c1 - c0;
    assert!(
        k.is_multiple_of(QK) && c0.is_multiple_of(QK) && c0 <= c1 && c1 <= k && (c1.is_multiple_of(QK) || c1 == k) && out.len() == (r1 - r0) * width && w.len() >= r1 * row_bytes,
        "decode_block: bad shapes"
    );
    let bb = kind.block_bytes();
    out.par_chunks_mut(width.max(1)).enumerate().for_each(|(i, dst)| {
        let row = &w[(r0 + i) * row_bytes..(r0 + i + 1) * row_bytes];
        for (b, vals) in dst.chunks_exact_mut(QK).enumerate() {
            let blk = &row[(c0 / QK + b) * bb..(c0 / QK + b + 1) * bb];
            match kind {
                QKind::Q4_1 => {
                    let (d, m) = (f16_at(blk, 0), f16_at(blk, 2));
                    for j in 0..QK / 2 {
                        vals[j] = (blk[4 + j] & 0x0F) as f32 * d + m;
                        vals[j + QK / 2] = (blk[4 + j] >> 4) as f32 * d + m;
                    }
                }
                QKind::Q5_0 => {
                    let d = f16_at(blk, 0);
                    let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
                    for j in 0..QK / 2 {
                        let lo = ((blk[6 + j] & 0x0F) as u32 | (((qh >> j) & 1) << 4)) as i32 - 16;
                        let hi = ((blk[6 + j] >> 4) as u32 | (((qh >> (j + QK / 2)) & 1) << 4)) as i32 - 16;
                        vals[j] = lo as f32 * d;
                        vals[j + QK / 2] = hi as f32 * d;
                    }
                }
            }
        }
    });
}

/// Whether the AVX2 kernel can run here.
fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Dot products of one weight row with activation rows `r0..r0 + rows` (at most [`ROW_TILE`]).
#[inline]
fn dot_rows(kind: QKind, simd: bool, wrow: &[u8], a: &Q8Rows, r0: usize, rows: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if simd {
            // SAFETY: the CPU has AVX2, FMA and F16C (`simd_available`).
            unsafe {
                match kind {
                    QKind::Q4_1 => avx2::dot_rows(wrow, a, r0, rows, out),
                    QKind::Q5_0 => avx2::dot_rows_q5_0(wrow, a, r0, rows, out),
                }
            };
            return;
        }
    }
    let _ = simd;
    match kind {
        QKind::Q4_1 => dot_rows_scalar(wrow, a, r0, rows, out),
        QKind::Q5_0 => dot_rows_scalar_q5_0(wrow, a, r0, rows, out),
    }
}

fn dot_rows_scalar_q5_0(wrow: &[u8], a: &Q8Rows, r0: usize, rows: usize, out: &mut [f32]) {
    for (i, o) in out.iter_mut().enumerate().take(rows) {
        let r = r0 + i;
        let mut acc = 0f32;
        for b in 0..a.blocks {
            let blk = &wrow[b * Q5_0_BYTES..(b + 1) * Q5_0_BYTES];
            let dw = f16_at(blk, 0);
            let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
            let q = &a.q[(r * a.blocks + b) * QK..(r * a.blocks + b + 1) * QK];
            let mut isum = 0i32;
            for j in 0..QK / 2 {
                let lo = (blk[6 + j] & 0x0F) as i32 | (((qh >> j) & 1) << 4) as i32;
                let hi = (blk[6 + j] >> 4) as i32 | (((qh >> (j + QK / 2)) & 1) << 4) as i32;
                isum += lo * q[j] as i32 + hi * q[j + QK / 2] as i32;
            }
            let ab = r * a.blocks + b;
            // Σ (q5 − 16)·q8·dw·da = dw·da·Σ q5·q8 − 16·dw·(da·Σ q8).
            acc += dw * a.d[ab] * isum as f32 - 16.0 * dw * a.s[ab];
        }
        *o = acc;
    }
}

fn dot_rows_scalar(wrow: &[u8], a: &Q8Rows, r0: usize, rows: usize, out: &mut [f32]) {
    for (i, o) in out.iter_mut().enumerate().take(rows) {
        let r = r0 + i;
        let mut acc = 0f32;
        for b in 0..a.blocks {
            let blk = &wrow[b * Q4_1_BYTES..(b + 1) * Q4_1_BYTES];
            let (dw, mw) = (f16_at(blk, 0), f16_at(blk, 2));
            let q = &a.q[(r * a.blocks + b) * QK..(r * a.blocks + b + 1) * QK];
            let mut isum = 0i32;
            for j in 0..QK / 2 {
                isum += (blk[4 + j] & 0x0F) as i32 * q[j] as i32 + (blk[4 + j] >> 4) as i32 * q[j + QK / 2] as i32;
            }
            let ab = r * a.blocks + b;
            acc += dw * a.d[ab] * isum as f32 + mw * a.s[ab];
        }
        *o = acc;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Q8Rows, Q4_1_BYTES, Q5_0_BYTES, QK, ROW_TILE};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_rows(wrow: &[u8], a: &Q8Rows, r0: usize, rows: usize, out: &mut [f32]) {
        let mut acc = [_mm256_setzero_ps(); ROW_TILE];
        let mut mins = [0f32; ROW_TILE];
        let low = _mm_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        debug_assert!(wrow.len() >= a.blocks * Q4_1_BYTES);
        for b in 0..a.blocks {
            let blk = wrow.as_ptr().add(b * Q4_1_BYTES);
            // The block's two f16 (scale, minimum) converted in one instruction.
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128((blk as *const i32).read_unaligned()));
            let dw = _mm_cvtss_f32(dm);
            let mw = _mm_cvtss_f32(_mm_shuffle_ps(dm, dm, 1));
            let qs = _mm_loadu_si128(blk.add(4) as *const __m128i);
            // Elements 0..16 are the low nibbles, 16..32 the high ones.
            let lo = _mm_and_si128(qs, low);
            let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), low);
            let q4 = _mm256_set_m128i(hi, lo);
            for i in 0..rows {
                let ab = (r0 + i) * a.blocks + b;
                let q8 = _mm256_loadu_si256(a.q.as_ptr().add(ab * QK) as *const __m256i);
                // u8 × i8 pairs summed to i16 (at most 2·15·127, no saturation), then to i32.
                let p = _mm256_madd_epi16(_mm256_maddubs_epi16(q4, q8), ones);
                acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dw * a.d[ab]), acc[i]);
                mins[i] += mw * a.s[ab];
            }
        }
        for i in 0..rows {
            out[i] = hsum(acc[i]) + mins[i];
        }
    }

    /// As [`dot_rows`] for Q5_0 blocks: the 32 high bits spread to bit 4 of each byte.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_rows_q5_0(wrow: &[u8], a: &Q8Rows, r0: usize, rows: usize, out: &mut [f32]) {
        let mut acc = [_mm256_setzero_ps(); ROW_TILE];
        let mut offs = [0f32; ROW_TILE];
        let low = _mm_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        // Byte j of a 32-byte vector takes byte j / 8 of the high bits and tests bit j % 8.
        let spread = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
        let bit = _mm256_set1_epi64x(0x8040201008040201u64 as i64);
        let sixteen = _mm256_set1_epi8(0x10);
        debug_assert!(wrow.len() >= a.blocks * Q5_0_BYTES);
        for b in 0..a.blocks {
            let blk = wrow.as_ptr().add(b * Q5_0_BYTES);
            let dw = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128((blk as *const u16).read_unaligned() as i32)));
            let qh = (blk.add(2) as *const u32).read_unaligned();
            let qs = _mm_loadu_si128(blk.add(6) as *const __m128i);
            let lo = _mm_and_si128(qs, low);
            let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), low);
            let q4 = _mm256_set_m128i(hi, lo);
            let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(qh as i32), spread);
            let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
            let q5 = _mm256_or_si256(q4, _mm256_and_si256(set, sixteen));
            for i in 0..rows {
                let ab = (r0 + i) * a.blocks + b;
                let q8 = _mm256_loadu_si256(a.q.as_ptr().add(ab * QK) as *const __m256i);
                // u8 (≤ 31) × i8 pairs summed to i16 (at most 2·31·127, no saturation), then to i32.
                let p = _mm256_madd_epi16(_mm256_maddubs_epi16(q5, q8), ones);
                acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dw * a.d[ab]), acc[i]);
                offs[i] -= 16.0 * dw * a.s[ab];
            }
        }
        for i in 0..rows {
            out[i] = hsum(acc[i]) + offs[i];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q4_1_blocks(w: &[f32], k: usize) -> (Vec<u8>, Vec<f32>) {
        // Quantize W to Q4_1 the simple way; return the bytes and the values they stand for.
        let mut bytes = Vec::new();
        let mut deq = Vec::new();
        for row in w.chunks_exact(k) {
            for xs in row.chunks_exact(QK) {
                let (lo, hi) = xs.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
                let d = half::f16::from_f32((hi - lo) / 15.0);
                let mn = half::f16::from_f32(lo);
                let (df, mf) = (d.to_f32(), mn.to_f32());
                let id = if df > 0.0 { 1.0 / df } else { 0.0 };
                let q: Vec<u8> = xs.iter().map(|&v| (((v - mf) * id).round().clamp(0.0, 15.0)) as u8).collect();
                bytes.extend(d.to_bits().to_le_bytes());
                bytes.extend(mn.to_bits().to_le_bytes());
                for j in 0..QK / 2 {
                    bytes.push(q[j] | (q[j + QK / 2] << 4));
                }
                deq.extend(q.iter().map(|&q| q as f32 * df + mf));
            }
        }
        (bytes, deq)
    }

    fn q5_0_blocks(w: &[f32], k: usize) -> (Vec<u8>, Vec<f32>) {
        let mut bytes = Vec::new();
        let mut deq = Vec::new();
        for row in w.chunks_exact(k) {
            for xs in row.chunks_exact(QK) {
                let amax = xs.iter().fold(0f32, |a, &v| a.max(v.abs()));
                let d = half::f16::from_f32(amax / 15.0);
                let df = d.to_f32();
                let id = if df > 0.0 { 1.0 / df } else { 0.0 };
                let q: Vec<u32> = xs.iter().map(|&v| ((v * id).round() + 16.0).clamp(0.0, 31.0) as u32).collect();
                bytes.extend(d.to_bits().to_le_bytes());
                let qh = q.iter().enumerate().fold(0u32, |h, (j, &v)| h | ((v >> 4) << j));
                bytes.extend(qh.to_le_bytes());
                for j in 0..QK / 2 {
                    bytes.push((q[j] & 0x0F) as u8 | (((q[j + QK / 2] & 0x0F) as u8) << 4));
                }
                deq.extend(q.iter().map(|&q| (q as f32 - 16.0) * df));
            }
        }
        (bytes, deq)
    }

    /// Checks kernel `kind` on W (n, k) given as `w` (its blocks) and `deq` (the values they stand
    /// for): close to the f32 product of the dequantized weights (the activations lose 8-bit
    /// precision); the SIMD path equal to the scalar one; a row's result independent of the
    /// other rows (one row alone takes the one-row path).
    fn check_kernel(kind: QKind, x: &[f32], (m, k, n): (usize, usize, usize), w: &[u8], deq: &[f32]) {
        let y = matmul_q(kind, x, m, k, w, n);
        let mut worst = 0f32;
        for r in 0..m {
            for j in 0..n {
                let exact: f32 = (0..k).map(|i| x[r * k + i] * deq[j * k + i]).sum();
                let scale: f32 = (0..k).map(|i| (x[r * k + i] * deq[j * k + i]).abs()).sum();
                worst = worst.max((y[r * n + j] - exact).abs() / scale.max(1e-6));
            }
        }
        assert!(worst < 0.01, "{kind:?}: relative error {worst}");
        let a = quantize_rows(x, m, k);
        let row_bytes = (k / QK) * kind.block_bytes();
        for j in 0..n {
            let wrow = &w[j * row_bytes..(j + 1) * row_bytes];
            let mut s = vec![0f32; m];
            for r in 0..m {
                dot_rows(kind, false, wrow, &a, r, 1, &mut s[r..r + 1]);
                assert!((s[r] - y[r * n + j]).abs() <= 1e-4 * s[r].abs().max(1.0), "{kind:?}: simd vs scalar at ({r}, {j})");
            }
        }
        for r in 0..m {
            let alone = matmul_q(kind, &x[r * k..(r + 1) * k], 1, k, w, n);
            assert_eq!(alone, y[r * n..(r + 1) * n], "{kind:?}: row {r} alone differs");
        }
    }

    /// Blocks of rows and columns decoded here equal candle's dequantization of the whole
    /// weight, bit for bit (Q4_1 and Q5_0, quantized by candle).
    #[test]
    fn decoded_blocks_equal_candles_dequantization() {
        use candle_core::quantized::{GgmlDType, QTensor};
        use candle_core::{Device, Tensor};
        let (n, k) = (37, 160);
        let w = Tensor::from_vec(data(n * k, 9), (n, k), &Device::Cpu).unwrap();
        for (dt, kind) in [(GgmlDType::Q4_1, QKind::Q4_1), (GgmlDType::Q5_0, QKind::Q5_0)] {
            let q = QTensor::quantize(&w, dt).unwrap();
            let full: Vec<f32> = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let bytes = q.data().unwrap();
            for (rows, cols) in [((0, n), (0, k)), ((3, 20), (32, 96)), ((36, 37), (128, 160)), ((5, 5), (0, 32))] {
                let mut out = vec![f32::NAN; (rows.1 - rows.0) * (cols.1 - cols.0)];
                decode_block(kind, &bytes, k, rows, cols, &mut out);
                for (i, r) in (rows.0..rows.1).enumerate() {
                    for (j, c) in (cols.0..cols.1).enumerate() {
                        assert_eq!(out[i * (cols.1 - cols.0) + j].to_bits(), full[r * k + c].to_bits(), "{kind:?} at ({r}, {c})");
                    }
                }
            }
        }
    }

    #[test]
    fn q5_0_matmul_matches_dequantized_product_and_is_row_independent() {
        let (m, k, n) = (9, 128, 21);
        let (w, deq) = q5_0_blocks(&data(n * k, 4), k);
        check_kernel(QKind::Q5_0, &data(m * k, 3), (m, k, n), &w, &deq);
    }

    fn data(len: usize, seed: u64) -> Vec<f32> {
        (0..len).map(|i| (((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 500.0 - 1.0) * 1.3).collect()
    }

    #[test]
    fn q4_1_matmul_matches_dequantized_product_and_is_row_independent() {
        let (m, k, n) = (7, 96, 37);
        let (w, deq) = q4_1_blocks(&data(n * k, 2), k);
        let x = data(m * k, 1);
        check_kernel(QKind::Q4_1, &x, (m, k, n), &w, &deq);
        assert_eq!(matmul_q4_1(&x, m, k, &w, n), matmul_q(QKind::Q4_1, &x, m, k, &w, n));
    }
}
