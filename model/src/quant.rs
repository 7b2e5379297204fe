//! Quantized weights and the matrix-vector kernels decode runs on.
//!
//! Decode is memory-bound: each step reads every weight once for a handful of
//! tokens. Tandem keeps GGUF's Q4_1 and Q8_0 blocks as they are stored,
//! unpacks one block at a time into registers and multiplies it with f32
//! activations (AVX-512 where the CPU has it, a portable scalar path
//! otherwise). A block is unpacked once for a tile of up to eight tokens, so
//! batched decode reads and unpacks each weight once per step.

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
    ///
    /// Activations stay f32: weights are unpacked block by block and
    /// multiplied in f32, so the result is a continuous function of the
    /// input (tensor-parallel shards, which sum partial products in another
    /// order, agree with the whole to rounding error, which 8-bit activations
    /// would turn into whole quantization steps).
    pub fn matmul(&self, x: &[f32], t: usize, out: &mut [f32]) {
        debug_assert_eq!(x.len(), t * self.cols);
        debug_assert_eq!(out.len(), t * self.rows);
        let nb = self.cols / 32;
        // Per-block sums of each token's activations (the Q4_1 minimum term).
        let xsum: Vec<f32> = x.chunks_exact(32).map(|c| c.iter().sum()).collect();
        const ROWS_PER_TASK: usize = 16;
        let mut tmp = vec![0f32; t * self.rows];
        tmp.par_chunks_mut(ROWS_PER_TASK * t)
            .enumerate()
            .for_each(|(ci, o)| {
                for (j, o) in o.chunks_mut(t).enumerate() {
                    let row = self.row(ci * ROWS_PER_TASK + j);
                    let mut t0 = 0;
                    while t0 < t {
                        let n = (t - t0).min(TILE);
                        dot_tile(
                            self.kind,
                            row,
                            &x[t0 * self.cols..(t0 + n) * self.cols],
                            &xsum[t0 * nb..(t0 + n) * nb],
                            self.cols,
                            &mut o[t0..t0 + n],
                        );
                        t0 += n;
                    }
                }
            });
        if t == 1 {
            out.copy_from_slice(&tmp);
            return;
        }
        for r in 0..self.rows {
            for ti in 0..t {
                out[ti * self.rows + r] = tmp[r * t + ti];
            }
        }
    }
}

/// Tokens multiplied against one unpacked weight block at a time.
const TILE: usize = 8;

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

/// `out[i] = row · x[i]` for up to [`TILE`] tokens `x` (each `cols` long),
/// with `xsum` their per-block sums.
fn dot_tile(kind: QKind, row: &[u8], x: &[f32], xsum: &[f32], cols: usize, out: &mut [f32]) {
    assert!(
        out.len() <= TILE
            && x.len() == out.len() * cols
            && row.len() == cols / 32 * kind.block_bytes()
    );
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    {
        // SAFETY: the cfg guarantees AVX-512F; the assert above sizes every slice as the kernel reads it.
        unsafe { avx512::dot_tile(kind, row, x, xsum, cols, out) }
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx512f")))]
    {
        dot_tile_scalar(kind, row, x, xsum, cols, out)
    }
}

pub fn dot_tile_scalar(
    kind: QKind,
    row: &[u8],
    x: &[f32],
    xsum: &[f32],
    cols: usize,
    out: &mut [f32],
) {
    let nb = cols / 32;
    let bb = kind.block_bytes();
    for (i, o) in out.iter_mut().enumerate() {
        let x = &x[i * cols..(i + 1) * cols];
        let mut acc = 0f32;
        for b in 0..nb {
            let blk = &row[b * bb..(b + 1) * bb];
            let xb = &x[b * 32..(b + 1) * 32];
            let d = f16_at(blk, 0);
            let mut s = 0f32;
            match kind {
                QKind::Q4_1 => {
                    for j in 0..16 {
                        let q = blk[4 + j];
                        s += (q & 0x0F) as f32 * xb[j] + (q >> 4) as f32 * xb[j + 16];
                    }
                    acc += d * s + f16_at(blk, 2) * xsum[i * nb + b];
                }
                QKind::Q8_0 => {
                    for j in 0..32 {
                        s += (blk[2 + j] as i8) as f32 * xb[j];
                    }
                    acc += d * s;
                }
            }
        }
        *o = acc;
    }
}

#[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
mod avx512 {
    use super::{f16_at, QKind, TILE};
    use std::arch::x86_64::*;

    /// # Safety
    /// Needs AVX-512F. `row` holds `cols / 32` blocks of `kind`; `x` holds
    /// `out.len() <= TILE` rows of `cols` values; `xsum` their block sums.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_tile(
        kind: QKind,
        row: &[u8],
        x: &[f32],
        xsum: &[f32],
        cols: usize,
        out: &mut [f32],
    ) {
        let n = out.len();
        let nb = cols / 32;
        let bb = kind.block_bytes();
        let mut acc = [_mm512_setzero_ps(); TILE];
        let mut accm = [0f32; TILE];
        let mask = _mm_set1_epi8(0x0F);
        let xp = x.as_ptr();
        for b in 0..nb {
            let blk = &row[b * bb..(b + 1) * bb];
            let d = _mm512_set1_ps(f16_at(blk, 0));
            let (lo, hi) = match kind {
                QKind::Q4_1 => {
                    // SAFETY: a Q4_1 block is 20 bytes; bytes 4..20 are its 16 packed nibble pairs.
                    let q = _mm_loadu_si128(blk.as_ptr().add(4) as *const __m128i);
                    let lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(q, mask)));
                    let hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(
                        _mm_srli_epi16(q, 4),
                        mask,
                    )));
                    let m = f16_at(blk, 2);
                    for (i, a) in accm.iter_mut().enumerate().take(n) {
                        *a += m * xsum[i * nb + b];
                    }
                    (lo, hi)
                }
                QKind::Q8_0 => {
                    // SAFETY: a Q8_0 block is 34 bytes; bytes 2..34 are its 32 signed weights.
                    let p = blk.as_ptr().add(2);
                    let lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                        p as *const __m128i,
                    )));
                    let hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                        p.add(16) as *const __m128i
                    )));
                    (lo, hi)
                }
            };
            for (i, a) in acc.iter_mut().enumerate().take(n) {
                // SAFETY: token i's block b spans x[i * cols + b * 32 .. + 32], inside `x`.
                let xb = xp.add(i * cols + b * 32);
                let s = _mm512_fmadd_ps(
                    lo,
                    _mm512_loadu_ps(xb),
                    _mm512_mul_ps(hi, _mm512_loadu_ps(xb.add(16))),
                );
                *a = _mm512_fmadd_ps(s, d, *a);
            }
        }
        for i in 0..n {
            out[i] = _mm512_reduce_add_ps(acc[i]) + accm[i];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn random_blocks(kind: QKind, rows: usize, cols: usize, seed: u64) -> QMat {
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
            data.extend_from_slice(&d.to_le_bytes());
            if kind == QKind::Q4_1 {
                let m = f16::from_f32(-((next() % 1000) as f32) / 10_000.0);
                data.extend_from_slice(&m.to_le_bytes());
            }
            for _ in 0..kind.block_bytes() - data.len() % kind.block_bytes() {
                data.push(next() as u8);
            }
        }
        QMat {
            kind,
            rows,
            cols,
            data,
        }
    }

    proptest! {
        #[test]
        fn matmul_equals_dequantized_product(seed in 0u64..1000, t in 1usize..12, blocks in 1usize..6, q8 in any::<bool>()) {
            let kind = if q8 { QKind::Q8_0 } else { QKind::Q4_1 };
            let cols = blocks * 32;
            let w = random_blocks(kind, 37, cols, seed);
            let wf = w.to_f32();
            let x: Vec<f32> = (0..t * cols).map(|i| ((i as f32 * 1.3 + seed as f32) * 0.11).cos()).collect();
            let mut out = vec![0f32; t * 37];
            w.matmul(&x, t, &mut out);
            let xsum: Vec<f32> = x.chunks_exact(32).map(|c| c.iter().sum()).collect();
            for ti in 0..t {
                let mut scalar = [0f32; 1];
                for r in 0..37 {
                    let exact: f32 = (0..cols).map(|c| wf[r * cols + c] * x[ti * cols + c]).sum();
                    let scale: f32 = (0..cols).map(|c| (wf[r * cols + c] * x[ti * cols + c]).abs()).sum();
                    prop_assert!((out[ti * 37 + r] - exact).abs() <= 1e-5 * (1.0 + scale), "{} vs {}", out[ti * 37 + r], exact);
                    dot_tile_scalar(kind, w.row(r), &x[ti * cols..(ti + 1) * cols], &xsum[ti * blocks..(ti + 1) * blocks], cols, &mut scalar);
                    prop_assert!((out[ti * 37 + r] - scalar[0]).abs() <= 1e-5 * (1.0 + scale));
                }
            }
        }
    }

    #[test]
    fn column_shards_sum_to_the_whole() {
        let w = random_blocks(QKind::Q4_1, 40, 128, 3);
        let x: Vec<f32> = (0..128).map(|i| (i as f32 * 0.7).sin()).collect();
        let mut full = vec![0f32; 40];
        w.matmul(&x, 1, &mut full);
        let mut sum = vec![0f32; 40];
        for (c0, c1) in [(0, 64), (64, 128)] {
            let mut part = vec![0f32; 40];
            w.slice_cols(c0, c1)
                .expect("aligned")
                .matmul(&x[c0..c1], 1, &mut part);
            for (s, p) in sum.iter_mut().zip(&part) {
                *s += p;
            }
        }
        for (a, b) in full.iter().zip(&sum) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + a.abs()), "{a} vs {b}");
        }
        assert!(
            w.slice_cols(16, 96).is_none(),
            "unaligned column ranges are refused"
        );
    }
}
