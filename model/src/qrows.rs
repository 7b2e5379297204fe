//! Decode kernels for the GGUF formats kept as stored (Q5_0, Q5_1 and the
//! K-quants Q2_K to Q6_K).
//!
//! A [`RowMat`] keeps the file's blocks byte for byte. Each weight row is
//! unpacked once per step into an f32 buffer that stays in L1 (a few KiB),
//! then multiplied with every token of the batch: a batch of 32 reads the
//! quantized weights once, not 32 times. The unpacking is one plain-Rust
//! function per format ([`crate::quant::dequantize_row`]) compiled into each
//! kernel below for that kernel's vector unit, so the code the tests check
//! against candle is the code the kernels run. Activations stay f32, as in
//! [`crate::qmatmul`], so tensor-parallel shards agree with the whole to
//! rounding error.

use rayon::prelude::*;

use crate::qmatmul::{huge_page_vec, kernel, Kernel};
use crate::quant::{dequantize_row_inline, QKind, QMat};

/// Rows one task computes (its unpacked rows are reused for every token).
const ROWS_PER_TASK: usize = 16;
/// Tokens that share one pass over an unpacked row.
const TOKEN_TILE: usize = 4;

#[derive(Debug, Clone)]
pub struct RowMat {
    pub kind: QKind,
    pub rows: usize,
    pub cols: usize,
    row_bytes: usize,
    data: Vec<u8>,
}

impl RowMat {
    pub fn new(q: &QMat) -> RowMat {
        let mut data = huge_page_vec(q.data.len());
        data.extend_from_slice(&q.data);
        RowMat {
            kind: q.kind,
            rows: q.rows,
            cols: q.cols,
            row_bytes: q.row_bytes(),
            data,
        }
    }

    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// `out[t, r] = sum_c self[r, c] * x[t, c]` for `t` tokens.
    pub fn matmul(&self, x: &[f32], t: usize, out: &mut [f32]) {
        assert_eq!(x.len(), t * self.cols, "activations are [t, cols]");
        assert_eq!(out.len(), t * self.rows, "output is [t, rows]");
        if t == 1 {
            out.par_chunks_mut(ROWS_PER_TASK)
                .enumerate()
                .for_each(|(ci, o)| self.rows_into(ci * ROWS_PER_TASK, x, 1, o));
            return;
        }
        // Row-major [rows, t] per task, transposed at the end.
        let mut tmp = vec![0f32; t * self.rows];
        tmp.par_chunks_mut(ROWS_PER_TASK * t)
            .enumerate()
            .for_each(|(ci, o)| self.rows_into(ci * ROWS_PER_TASK, x, t, o));
        for r in 0..self.rows {
            for ti in 0..t {
                out[ti * self.rows + r] = tmp[r * t + ti];
            }
        }
    }

    /// Rows `r0..r0 + out.len() / t` against `t` tokens; `out` is `[rows, t]`.
    fn rows_into(&self, r0: usize, x: &[f32], t: usize, out: &mut [f32]) {
        let n = out.len() / t;
        assert!(r0 + n <= self.rows && x.len() == t * self.cols);
        let mut buf = vec![0f32; self.cols];
        match kernel() {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: kernel() saw these CPU features at run time.
            Kernel::Avx512 => unsafe { avx512::rows(self, r0, x, t, out, &mut buf) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above, for AVX2/FMA/F16C.
            Kernel::Avx2 => unsafe { avx2::rows(self, r0, x, t, out, &mut buf) },
            Kernel::Scalar => self.rows_scalar(r0, x, t, out, &mut buf),
        }
    }

    fn row(&self, r: usize) -> &[u8] {
        &self.data[r * self.row_bytes..(r + 1) * self.row_bytes]
    }

    /// The portable kernel, and the reference the vector ones are tested against.
    fn rows_scalar(&self, r0: usize, x: &[f32], t: usize, out: &mut [f32], buf: &mut [f32]) {
        for (j, o) in out.chunks_exact_mut(t).enumerate() {
            dequantize_row_inline(self.kind, self.row(r0 + j), buf);
            for (ti, o) in o.iter_mut().enumerate() {
                let xt = &x[ti * self.cols..(ti + 1) * self.cols];
                *o = buf.iter().zip(xt).map(|(w, x)| w * x).sum();
            }
        }
    }
}

/// One kernel body per instruction set: the same loops, compiled for it.
macro_rules! simd_rows {
    ($features:literal, $lanes:literal, $vec:ty, $zero:ident, $load:ident, $fmadd:ident, $reduce:path) => {
        use super::{RowMat, TOKEN_TILE};
        use crate::quant::dequantize_row_inline;
        use std::arch::x86_64::*;

        /// # Safety
        /// Needs the CPU features named; `out` is `[rows, t]` from row `r0`,
        /// `x` is `[t, cols]`, `buf` holds `cols` values.
        #[target_feature(enable = $features)]
        pub unsafe fn rows(
            m: &RowMat,
            r0: usize,
            x: &[f32],
            t: usize,
            out: &mut [f32],
            buf: &mut [f32],
        ) {
            let cols = m.cols;
            assert!(buf.len() == cols && x.len() == t * cols && cols % (2 * $lanes) == 0);
            for (j, o) in out.chunks_exact_mut(t).enumerate() {
                dequantize_row_inline(m.kind, m.row(r0 + j), buf);
                let mut t0 = 0;
                while t0 < t {
                    let xs = &x[t0 * cols..];
                    match t - t0 {
                        n if n >= TOKEN_TILE => {
                            dot::<TOKEN_TILE>(buf, xs, &mut o[t0..t0 + TOKEN_TILE]);
                            t0 += TOKEN_TILE;
                        }
                        n if n >= 2 => {
                            dot::<2>(buf, xs, &mut o[t0..t0 + 2]);
                            t0 += 2;
                        }
                        _ => {
                            dot::<1>(buf, xs, &mut o[t0..t0 + 1]);
                            t0 += 1;
                        }
                    }
                }
            }
        }

        /// `out[n] = w · x[n]` for `N` consecutive rows of `x`, each `w.len()` long.
        #[inline(always)]
        unsafe fn dot<const N: usize>(w: &[f32], x: &[f32], out: &mut [f32]) {
            let cols = w.len();
            // SAFETY (every load): i + 2 * lanes <= cols and token n's row
            // spans x[n * cols..(n + 1) * cols], which the caller sized.
            assert!(x.len() >= N * cols && out.len() >= N);
            let (wp, xp) = (w.as_ptr(), x.as_ptr());
            // Two accumulators per token hide the FMA latency at N = 1.
            let mut a = [[$zero(); 2]; N];
            let mut i = 0;
            while i < cols {
                let w0 = $load(wp.add(i));
                let w1 = $load(wp.add(i + $lanes));
                for n in 0..N {
                    let xn = xp.add(n * cols + i);
                    a[n][0] = $fmadd(w0, $load(xn), a[n][0]);
                    a[n][1] = $fmadd(w1, $load(xn.add($lanes)), a[n][1]);
                }
                i += 2 * $lanes;
            }
            for n in 0..N {
                out[n] = $reduce(a[n][0], a[n][1]);
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    #[inline(always)]
    unsafe fn sum(a: __m512, b: __m512) -> f32 {
        _mm512_reduce_add_ps(_mm512_add_ps(a, b))
    }
    simd_rows!(
        "avx512f,avx512bw,avx512vl,f16c,fma",
        16,
        __m512,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        _mm512_fmadd_ps,
        sum
    );
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    #[inline(always)]
    unsafe fn sum(a: __m256, b: __m256) -> f32 {
        let v = _mm256_add_ps(a, b);
        let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)))
    }
    simd_rows!(
        "avx2,fma,f16c",
        8,
        __m256,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_fmadd_ps,
        sum
    );

    /// The AVX2 kernel on its own, for tests on machines that would pick AVX-512.
    #[cfg(test)]
    pub fn rows_for_test(m: &RowMat, x: &[f32], t: usize) -> Option<Vec<f32>> {
        if !(std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c"))
        {
            return None;
        }
        let mut out = vec![0f32; m.rows * t];
        let mut buf = vec![0f32; m.cols];
        // SAFETY: features checked just above; `rows` asserts the sizes.
        unsafe { rows(m, 0, x, t, &mut out, &mut buf) };
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::tests::random_qmat;
    use proptest::prelude::*;

    /// The formats this module runs (Q4_0, Q4_1 and Q8_0 run on the packed kernels).
    const KINDS: [QKind; 7] = [
        QKind::Q5_0,
        QKind::Q5_1,
        QKind::Q2_K,
        QKind::Q3_K,
        QKind::Q4_K,
        QKind::Q5_K,
        QKind::Q6_K,
    ];

    proptest! {
        #[test]
        fn matmul_equals_the_dequantized_product(k in 0usize..7, seed in any::<u64>(), t in 1usize..11, blocks in 1usize..4, rows in 1usize..40) {
            let kind = KINDS[k];
            let cols = blocks * kind.block_elems();
            let q = random_qmat(kind, rows, cols, seed);
            let m = RowMat::new(&q);
            let wf = q.to_f32();
            let x: Vec<f32> = (0..t * cols).map(|i| ((i as f32 * 0.37 + seed as f32) * 0.29).sin()).collect();
            let mut out = vec![0f32; t * rows];
            m.matmul(&x, t, &mut out);
            let mut scalar = vec![0f32; rows * t];
            m.rows_scalar(0, &x, t, &mut scalar, &mut vec![0f32; cols]);
            #[cfg(target_arch = "x86_64")]
            let avx2 = avx2::rows_for_test(&m, &x, t);
            for ti in 0..t {
                for r in 0..rows {
                    let terms = (0..cols).map(|c| wf[r * cols + c] * x[ti * cols + c]);
                    let exact: f64 = terms.clone().map(f64::from).sum();
                    let scale: f32 = terms.map(f32::abs).sum();
                    let tol = 1e-5 * (1.0 + scale);
                    let got = out[ti * rows + r];
                    prop_assert!((got as f64 - exact).abs() <= tol as f64, "{}: {} vs {}", kind, got, exact);
                    prop_assert!((scalar[r * t + ti] - got).abs() <= tol, "{} scalar kernel", kind);
                    #[cfg(target_arch = "x86_64")]
                    if let Some(v) = &avx2 {
                        prop_assert!((v[r * t + ti] - got).abs() <= tol, "{} AVX2 kernel", kind);
                    }
                }
            }
        }
    }
}
