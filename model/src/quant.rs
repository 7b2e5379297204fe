//! Quantized weights and the matrix-vector kernels decode runs on.
//!
//! Decode is memory-bound: each step reads every weight once for a handful of
//! tokens. Tandem keeps GGUF's Q4_1 and Q8_0 blocks as they are stored and
//! multiplies them with activations quantized to 8 bits per 32-element block
//! (the same scheme llama.cpp uses), with AVX2 integer dot products where the
//! CPU has them and a portable scalar path otherwise. Both paths compute the
//! same integer sums, so results do not depend on the path taken.

use half::f16;
use rayon::prelude::*;

/// Quantized block formats with a native kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QKind {
    /// 32 weights: f16 scale `d`, f16 minimum `m`, 16 bytes of 4-bit values; w = d*q + m.
    Q4_1,
    /// 32 weights: f16 scale `d`, 32 signed bytes; w = d*q.
    Q8_0,
}

impl QKind {
    pub const fn block_elems(self) -> usize {
        32
    }
    pub const fn block_bytes(self) -> usize {
        match self {
            QKind::Q4_1 => 20,
            QKind::Q8_0 => 34,
        }
    }
}

/// A row-major quantized matrix `[rows, cols]`; each row is `cols / 32` blocks.
#[derive(Debug, Clone)]
pub struct QMat {
    pub kind: QKind,
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<u8>,
}

impl QMat {
    pub fn row_bytes(&self) -> usize {
        self.cols / self.kind.block_elems() * self.kind.block_bytes()
    }

    pub fn row(&self, r: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
    }

    /// Rows `[r0, r1)` as a new matrix.
    pub fn slice_rows(&self, r0: usize, r1: usize) -> QMat {
        let rb = self.row_bytes();
        QMat {
            kind: self.kind,
            rows: r1 - r0,
            cols: self.cols,
            data: self.data[r0 * rb..r1 * rb].to_vec(),
        }
    }

    /// Columns `[c0, c1)`, which must fall on block boundaries.
    pub fn slice_cols(&self, c0: usize, c1: usize) -> Option<QMat> {
        let be = self.kind.block_elems();
        if c0 % be != 0 || c1 % be != 0 {
            return None;
        }
        let bb = self.kind.block_bytes();
        let (b0, b1) = (c0 / be * bb, c1 / be * bb);
        let mut data = Vec::with_capacity(self.rows * (b1 - b0));
        for r in 0..self.rows {
            data.extend_from_slice(&self.row(r)[b0..b1]);
        }
        Some(QMat {
            kind: self.kind,
            rows: self.rows,
            cols: c1 - c0,
            data,
        })
    }

    /// Stacks matrices with the same column count and format row-wise.
    pub fn concat_rows(parts: &[QMat]) -> QMat {
        let first = &parts[0];
        let mut data = Vec::new();
        for p in parts {
            assert!(
                p.kind == first.kind && p.cols == first.cols,
                "concatenated matrices share format and width"
            );
            data.extend_from_slice(&p.data);
        }
        QMat {
            kind: first.kind,
            rows: parts.iter().map(|p| p.rows).sum(),
            cols: first.cols,
            data,
        }
    }

    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        dequantize_row(self.kind, self.row(r), out)
    }

    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(self.cols)
            .enumerate()
            .for_each(|(r, o)| self.dequantize_row(r, o));
        out
    }

    /// `out[t, r] = sum_c self[r, c] * x[t, c]` for `t` tokens.
    pub fn matmul(&self, x: &[f32], t: usize, out: &mut [f32]) {
        debug_assert_eq!(x.len(), t * self.cols);
        debug_assert_eq!(out.len(), t * self.rows);
        let xq: Vec<Vec<BlockQ8>> = x.chunks(self.cols).map(quantize_q8).collect();
        const ROWS_PER_TASK: usize = 16;
        if t == 1 {
            out.par_chunks_mut(ROWS_PER_TASK)
                .enumerate()
                .for_each(|(ci, o)| {
                    for (j, o) in o.iter_mut().enumerate() {
                        *o = self.dot(ci * ROWS_PER_TASK + j, &xq[0]);
                    }
                });
            return;
        }
        let mut tmp = vec![0f32; t * self.rows];
        tmp.par_chunks_mut(ROWS_PER_TASK * t)
            .enumerate()
            .for_each(|(ci, o)| {
                for (j, o) in o.chunks_mut(t).enumerate() {
                    let r = ci * ROWS_PER_TASK + j;
                    for (ti, o) in o.iter_mut().enumerate() {
                        *o = self.dot(r, &xq[ti]);
                    }
                }
            });
        for r in 0..self.rows {
            for ti in 0..t {
                out[ti * self.rows + r] = tmp[r * t + ti];
            }
        }
    }

    fn dot(&self, r: usize, x: &[BlockQ8]) -> f32 {
        match self.kind {
            QKind::Q4_1 => dot_q4_1(self.row(r), x),
            QKind::Q8_0 => dot_q8_0(self.row(r), x),
        }
    }
}

/// An activation block: 32 signed bytes with scale `d` and `s = d * sum(qs)`.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(8))]
pub struct BlockQ8 {
    pub d: f32,
    pub s: f32,
    pub qs: [i8; 32],
}

pub fn quantize_q8(x: &[f32]) -> Vec<BlockQ8> {
    x.chunks_exact(32)
        .map(|c| {
            let amax = c.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut qs = [0i8; 32];
            let mut sum = 0i32;
            for (q, v) in qs.iter_mut().zip(c) {
                *q = (v * id).round() as i8;
                sum += *q as i32;
            }
            BlockQ8 {
                d,
                s: d * sum as f32,
                qs,
            }
        })
        .collect()
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

pub fn dequantize_row(kind: QKind, row: &[u8], out: &mut [f32]) {
    let bb = kind.block_bytes();
    for (blk, o) in row.chunks_exact(bb).zip(out.chunks_exact_mut(32)) {
        let d = f16_at(blk, 0);
        match kind {
            QKind::Q4_1 => {
                let m = f16_at(blk, 2);
                for j in 0..16 {
                    let q = blk[4 + j];
                    o[j] = d * (q & 0x0F) as f32 + m;
                    o[j + 16] = d * (q >> 4) as f32 + m;
                }
            }
            QKind::Q8_0 => {
                for j in 0..32 {
                    o[j] = d * (blk[2 + j] as i8) as f32;
                }
            }
        }
    }
}

/// Dot product of one Q4_1 row with quantized activations.
pub fn dot_q4_1(row: &[u8], x: &[BlockQ8]) -> f32 {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    {
        // SAFETY: the cfg guarantees AVX2 and FMA; the slices are sized as the kernel reads them.
        unsafe { avx2::dot_q4_1(row, x) }
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    )))]
    {
        dot_q4_1_scalar(row, x)
    }
}

/// Dot product of one Q8_0 row with quantized activations.
pub fn dot_q8_0(row: &[u8], x: &[BlockQ8]) -> f32 {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    {
        // SAFETY: the cfg guarantees AVX2 and FMA; the slices are sized as the kernel reads them.
        unsafe { avx2::dot_q8_0(row, x) }
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    )))]
    {
        dot_q8_0_scalar(row, x)
    }
}

pub fn dot_q4_1_scalar(row: &[u8], x: &[BlockQ8]) -> f32 {
    let mut acc = 0f32;
    for (blk, xb) in row.chunks_exact(20).zip(x) {
        let (d, m) = (f16_at(blk, 0), f16_at(blk, 2));
        let mut sumi = 0i32;
        for j in 0..16 {
            let q = blk[4 + j];
            sumi += (q & 0x0F) as i32 * xb.qs[j] as i32 + (q >> 4) as i32 * xb.qs[j + 16] as i32;
        }
        acc += d * xb.d * sumi as f32 + m * xb.s;
    }
    acc
}

pub fn dot_q8_0_scalar(row: &[u8], x: &[BlockQ8]) -> f32 {
    let mut acc = 0f32;
    for (blk, xb) in row.chunks_exact(34).zip(x) {
        let d = f16_at(blk, 0);
        let mut sumi = 0i32;
        for j in 0..32 {
            sumi += (blk[2 + j] as i8) as i32 * xb.qs[j] as i32;
        }
        acc += d * xb.d * sumi as f32;
    }
    acc
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
mod avx2 {
    use super::{f16_at, BlockQ8};
    use std::arch::x86_64::*;

    #[inline]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// # Safety
    /// Needs AVX2 and FMA; `row` holds `x.len()` Q4_1 blocks.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_q4_1(row: &[u8], x: &[BlockQ8]) -> f32 {
        let n = x.len().min(row.len() / 20);
        let mask = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = _mm256_setzero_ps();
        let mut accm = 0f32;
        let p = row.as_ptr();
        for (b, xb) in x.iter().enumerate().take(n) {
            let blk = p.add(b * 20);
            // SAFETY: block b lies within `row` (b < n ≤ row.len() / 20).
            let q16 = _mm_loadu_si128(blk.add(4) as *const __m128i);
            let q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q16, 4), q16), mask);
            let y = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
            let s = _mm256_madd_epi16(_mm256_maddubs_epi16(q, y), ones);
            let bs = std::slice::from_raw_parts(blk, 4);
            let d = f16_at(bs, 0) * xb.d;
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(d), acc);
            accm += f16_at(bs, 2) * xb.s;
        }
        hsum(acc) + accm
    }

    /// # Safety
    /// Needs AVX2 and FMA; `row` holds `x.len()` Q8_0 blocks.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_q8_0(row: &[u8], x: &[BlockQ8]) -> f32 {
        let n = x.len().min(row.len() / 34);
        let ones = _mm256_set1_epi16(1);
        let mut acc = _mm256_setzero_ps();
        let p = row.as_ptr();
        for (b, xb) in x.iter().enumerate().take(n) {
            let blk = p.add(b * 34);
            // SAFETY: block b lies within `row` (b < n ≤ row.len() / 34).
            let w = _mm256_loadu_si256(blk.add(2) as *const __m256i);
            let y = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
            let s = _mm256_madd_epi16(
                _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(y, w)),
                ones,
            );
            let d = f16_at(std::slice::from_raw_parts(blk, 2), 0) * xb.d;
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(d), acc);
        }
        hsum(acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn random_q4_1(rows: usize, cols: usize, seed: u64) -> QMat {
        let mut s = seed;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as u32
        };
        let mut data = Vec::new();
        for _ in 0..rows * cols / 32 {
            let d = f16::from_f32((next() % 1000) as f32 / 50_000.0);
            let m = f16::from_f32(-((next() % 1000) as f32) / 10_000.0);
            data.extend_from_slice(&d.to_le_bytes());
            data.extend_from_slice(&m.to_le_bytes());
            for _ in 0..16 {
                data.push(next() as u8);
            }
        }
        QMat {
            kind: QKind::Q4_1,
            rows,
            cols,
            data,
        }
    }

    proptest! {
        #[test]
        fn simd_q4_1_matches_scalar(seed in 0u64..1000, blocks in 1usize..20) {
            let w = random_q4_1(3, blocks * 32, seed);
            let x: Vec<f32> = (0..blocks * 32).map(|i| ((i as f32 + seed as f32) * 0.37).sin()).collect();
            let xq = quantize_q8(&x);
            for r in 0..3 {
                let a = dot_q4_1(w.row(r), &xq);
                let b = dot_q4_1_scalar(w.row(r), &xq);
                prop_assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{} vs {}", a, b);
            }
        }

        #[test]
        fn quantized_matmul_approximates_f32(seed in 0u64..1000, t in 1usize..5) {
            let w = random_q4_1(40, 64, seed);
            let wf = w.to_f32();
            let x: Vec<f32> = (0..t * 64).map(|i| ((i as f32 * 1.3 + seed as f32) * 0.11).cos()).collect();
            let mut out = vec![0f32; t * 40];
            w.matmul(&x, t, &mut out);
            for ti in 0..t {
                for r in 0..40 {
                    let exact: f32 = (0..64).map(|c| wf[r * 64 + c] * x[ti * 64 + c]).sum();
                    let scale: f32 = (0..64).map(|c| (wf[r * 64 + c] * x[ti * 64 + c]).abs()).sum();
                    prop_assert!((out[ti * 40 + r] - exact).abs() <= 0.02 * scale + 1e-5);
                }
            }
        }
    }

    #[test]
    fn q8_0_simd_matches_scalar() {
        let mut data = Vec::new();
        for b in 0..4 {
            data.extend_from_slice(&f16::from_f32(0.01 * (b + 1) as f32).to_le_bytes());
            for j in 0..32 {
                data.push(((b * 37 + j * 11) % 256) as u8);
            }
        }
        let x: Vec<f32> = (0..128).map(|i| (i as f32 * 0.21).sin()).collect();
        let xq = quantize_q8(&x);
        let a = dot_q8_0(&data, &xq);
        let b = dot_q8_0_scalar(&data, &xq);
        assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
        let w = QMat {
            kind: QKind::Q8_0,
            rows: 1,
            cols: 128,
            data,
        };
        let cols = w.slice_cols(32, 96).expect("block aligned");
        assert_eq!(cols.cols, 64);
        assert!(w.slice_cols(16, 96).is_none());
    }
}
