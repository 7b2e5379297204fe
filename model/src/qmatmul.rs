//! The decode kernels: quantized weights times f32 activations.
//!
//! Decode is memory-bound: each step reads every weight once for a handful of
//! tokens. A [`PackedMat`] keeps GGUF's Q4_1 or Q8_0 values as they are, with
//! the per-block f16 scales (and Q4_1 minimums) moved into arrays of their
//! own, so the kernel converts sixteen of them with one instruction instead
//! of one scalar conversion per block. Weights are unpacked into registers
//! and multiplied in f32: the result is a continuous function of the input,
//! so tensor-parallel shards (which sum partial products in another order)
//! agree with the whole to rounding error, where 8-bit activations would turn
//! those differences into whole quantization steps.
//!
//! Each block is unpacked once into its weights times its scale (exact in
//! f32), then multiplied into every token of the tile with two FMAs per 32
//! weights. Four rows share each activation load at batch 1; in batched
//! decode two rows share each activation load and a block is unpacked once
//! for up to eight tokens. Every (row, token) pair sees the same operations
//! in the same order whatever the tile, so a token's result does not depend
//! on its batch. AVX-512 where the CPU has it, a portable scalar path
//! otherwise.

use half::f16;
use rayon::prelude::*;

use crate::quant::{QKind, QMat};

/// Rows computed together against one token.
const ROW_GROUP: usize = 4;
/// Tokens computed together against one row.
const TOKEN_TILE: usize = 8;
/// Rows computed together against a chunk of tokens.
const BATCH_ROWS: usize = 2;
const ROWS_PER_TASK: usize = 64;

#[derive(Debug, Clone)]
pub struct PackedMat {
    pub kind: QKind,
    pub rows: usize,
    pub cols: usize,
    nb: usize,
    d: Vec<f16>,
    m: Vec<f16>,
    qs: Vec<u8>,
}

impl PackedMat {
    /// Repacks Q4_1 or Q8_0 blocks (other formats run on [`crate::qrows`]).
    pub fn pack(q: &QMat) -> PackedMat {
        let nb = q.cols / 32;
        let (qb, off) = match q.kind {
            QKind::Q4_1 => (16, 4),
            QKind::Q8_0 => (32, 2),
            other => panic!("PackedMat holds Q4_1 or Q8_0 blocks, not {other}"),
        };
        let mut p = PackedMat {
            kind: q.kind,
            rows: q.rows,
            cols: q.cols,
            nb,
            d: Vec::with_capacity(q.rows * nb),
            m: Vec::new(),
            qs: huge_page_vec(q.rows * nb * qb),
        };
        for blk in q.data.chunks_exact(q.kind.block_bytes()) {
            p.d.push(f16::from_le_bytes([blk[0], blk[1]]));
            if q.kind == QKind::Q4_1 {
                p.m.push(f16::from_le_bytes([blk[2], blk[3]]));
            }
            p.qs.extend_from_slice(&blk[off..off + qb]);
        }
        p
    }

    pub fn bytes(&self) -> usize {
        self.qs.len() + 2 * (self.d.len() + self.m.len())
    }

    fn qb(&self) -> usize {
        if self.kind == QKind::Q4_1 {
            16
        } else {
            32
        }
    }

    /// `out[t, r] = sum_c self[r, c] * x[t, c]` for `t` tokens.
    pub fn matmul(&self, x: &[f32], t: usize, out: &mut [f32]) {
        assert_eq!(x.len(), t * self.cols, "activations are [t, cols]");
        assert_eq!(out.len(), t * self.rows, "output is [t, rows]");
        // Per-block sums of each token's activations (the Q4_1 minimum term).
        let xsum: Vec<f32> = x.chunks_exact(32).map(|c| c.iter().sum()).collect();
        let (cols, nb) = (self.cols, self.nb);
        by_row_tasks(self.rows, t, ROWS_PER_TASK, out, |r0, o| {
            let n_rows = o.len() / t;
            if t == 1 {
                // Four rows share each activation load.
                let mut j = 0;
                while j + ROW_GROUP <= n_rows {
                    self.tile_into::<ROW_GROUP, 1>(r0, j, 0, x, &xsum, o, t);
                    j += ROW_GROUP;
                }
                for j in j..n_rows {
                    self.tile_into::<1, 1>(r0, j, 0, x, &xsum, o, t);
                }
                return;
            }
            // Tokens in chunks whose activations stay in L1 while every row
            // of the task passes over them; within a chunk, two rows share
            // each activation load and every token of the chunk each
            // unpacked block (16 accumulators stay in registers).
            for c0 in (0..t).step_by(TOKEN_TILE) {
                let n = (c0 + TOKEN_TILE).min(t) - c0;
                let (xs, ss) = (&x[c0 * cols..], &xsum[c0 * nb..]);
                let mut j = 0;
                while j < n_rows {
                    let pair = j + BATCH_ROWS <= n_rows;
                    macro_rules! tiles {
                        ($($n:literal)*) => {
                            match (pair, n) {
                                $((true, $n) => self.tile_into::<BATCH_ROWS, $n>(r0, j, c0, xs, ss, o, t),
                                  (false, $n) => self.tile_into::<1, $n>(r0, j, c0, xs, ss, o, t),)*
                                _ => unreachable!("a chunk holds 1 to {TOKEN_TILE} tokens"),
                            }
                        };
                    }
                    tiles!(1 2 3 4 5 6 7 8);
                    j += if pair { BATCH_ROWS } else { 1 };
                }
            }
        });
    }

    /// [`tile`](Self::tile) for rows `r0 + j..` and tokens `t0..`, written into
    /// `o`, the task's `[rows, t]` results.
    #[allow(clippy::too_many_arguments)]
    fn tile_into<const R: usize, const N: usize>(
        &self,
        r0: usize,
        j: usize,
        t0: usize,
        x: &[f32],
        xsum: &[f32],
        o: &mut [f32],
        t: usize,
    ) {
        let mut res = [[0f32; N]; R];
        self.tile::<R, N>(r0 + j, x, xsum, &mut res);
        for (k, row) in res.iter().enumerate() {
            let at = (j + k) * t + t0;
            o[at..at + N].copy_from_slice(row);
        }
    }

    /// Rows `r0..r0 + R` against the first `N` tokens of `x` (rows of `cols`).
    fn tile<const R: usize, const N: usize>(
        &self,
        r0: usize,
        x: &[f32],
        xsum: &[f32],
        out: &mut [[f32; N]; R],
    ) {
        assert!(r0 + R <= self.rows && x.len() >= N * self.cols && xsum.len() >= N * self.nb);
        match kernel() {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: kernel() saw the CPU features at run time; the assert
            // above bounds every row, token and block the kernel touches.
            Kernel::Avx512 => unsafe { avx512::tile::<R, N>(self, r0, x, xsum, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above, for AVX2/FMA/F16C.
            Kernel::Avx2 => unsafe { avx2::tile::<R, N>(self, r0, x, xsum, out) },
            Kernel::Scalar => self.tile_scalar(r0, x, xsum, out),
        }
    }

    fn tile_scalar<const R: usize, const N: usize>(
        &self,
        r0: usize,
        x: &[f32],
        xsum: &[f32],
        out: &mut [[f32; N]; R],
    ) {
        for r in 0..R {
            for n in 0..N {
                out[r][n] = self.dot_scalar(
                    r0 + r,
                    &x[n * self.cols..(n + 1) * self.cols],
                    &xsum[n * self.nb..(n + 1) * self.nb],
                );
            }
        }
    }

    /// One row against one token, without SIMD (the reference the kernels are tested against).
    pub fn dot_scalar(&self, r: usize, x: &[f32], xsum: &[f32]) -> f32 {
        let qb = self.qb();
        let mut acc = 0f32;
        for b in 0..self.nb {
            let i = r * self.nb + b;
            let q = &self.qs[i * qb..(i + 1) * qb];
            let xb = &x[b * 32..(b + 1) * 32];
            let mut s = 0f32;
            match self.kind {
                QKind::Q4_1 => {
                    for j in 0..16 {
                        s += (q[j] & 0x0F) as f32 * xb[j] + (q[j] >> 4) as f32 * xb[j + 16];
                    }
                    acc += self.d[i].to_f32() * s + self.m[i].to_f32() * xsum[b];
                }
                _ => {
                    for j in 0..32 {
                        s += (q[j] as i8) as f32 * xb[j];
                    }
                    acc += self.d[i].to_f32() * s;
                }
            }
        }
        acc
    }
}

/// Runs `f(r0, o)` in parallel over tasks of up to `per_task` rows from
/// `r0`, `o` being those rows' results as `[rows, t]` (the kernels work row
/// by row), and leaves them in `out` as `[t, rows]`.
pub(crate) fn by_row_tasks(
    rows: usize,
    t: usize,
    per_task: usize,
    out: &mut [f32],
    f: impl Fn(usize, &mut [f32]) + Sync + Send,
) {
    if t == 1 {
        // One token: [rows, 1] is already [1, rows].
        out.par_chunks_mut(per_task)
            .enumerate()
            .for_each(|(ci, o)| f(ci * per_task, o));
        return;
    }
    let mut tmp = vec![0f32; t * rows];
    tmp.par_chunks_mut(per_task * t)
        .enumerate()
        .for_each(|(ci, o)| f(ci * per_task, o));
    transpose_into(&tmp, rows, t, out);
}

/// `out[t, rows]` from `tmp[rows, t]` (the batched kernels work row by row),
/// in parallel over tokens and in blocks of rows so reads stay in cache lines.
fn transpose_into(tmp: &[f32], rows: usize, t: usize, out: &mut [f32]) {
    const BLOCK: usize = 64;
    out.par_chunks_mut(rows * 4).enumerate().for_each(|(c, o)| {
        let t0 = c * 4;
        let n = o.len() / rows;
        for r0 in (0..rows).step_by(BLOCK) {
            for r in r0..(r0 + BLOCK).min(rows) {
                for k in 0..n {
                    o[k * rows + r] = tmp[r * t + t0 + k];
                }
            }
        }
    });
}

/// An empty vector with room for `n` bytes, asking the kernel to back it
/// with huge pages: decode streams every weight each step, and 2 MiB pages
/// spare it most TLB misses.
pub(crate) fn huge_page_vec(n: usize) -> Vec<u8> {
    let v: Vec<u8> = Vec::with_capacity(n);
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = v.as_ptr() as usize;
        let (lo, hi) = (start.next_multiple_of(HUGE), (start + n) / HUGE * HUGE);
        if hi > lo {
            // SAFETY: [lo, hi) lies inside the allocation just made; MADV_HUGEPAGE
            // is advice about backing pages and never changes the contents.
            unsafe {
                libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_HUGEPAGE);
            }
        }
    }
    v
}

/// The decode kernels this CPU can run, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Avx512,
    Avx2,
    Scalar,
}

/// Chosen once, from the CPU's features at run time.
pub fn kernel() -> Kernel {
    static CHOICE: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
    *CHOICE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let has = |f: &str| match f {
                "avx512f" => std::arch::is_x86_feature_detected!("avx512f"),
                "avx512bw" => std::arch::is_x86_feature_detected!("avx512bw"),
                "avx512vl" => std::arch::is_x86_feature_detected!("avx512vl"),
                "avx2" => std::arch::is_x86_feature_detected!("avx2"),
                "fma" => std::arch::is_x86_feature_detected!("fma"),
                "f16c" => std::arch::is_x86_feature_detected!("f16c"),
                _ => false,
            };
            if ["avx512f", "avx512bw", "avx512vl", "f16c"]
                .iter()
                .all(|f| has(f))
            {
                return Kernel::Avx512;
            }
            if ["avx2", "fma", "f16c"].iter().all(|f| has(f)) {
                return Kernel::Avx2;
            }
        }
        Kernel::Scalar
    })
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::PackedMat;
    use crate::quant::QKind;
    use std::arch::x86_64::*;

    /// # Safety
    /// Needs AVX2, FMA and F16C; rows `r0..r0 + R` exist; `x` holds `N` rows
    /// of `p.cols` values and `xsum` their `N * p.nb` block sums.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn tile<const R: usize, const N: usize>(
        p: &PackedMat,
        r0: usize,
        x: &[f32],
        xsum: &[f32],
        out: &mut [[f32; N]; R],
    ) {
        let (nb, cols, qb) = (p.nb, p.cols, p.qb());
        let q4 = p.kind == QKind::Q4_1;
        let mask = _mm_set1_epi8(0x0F);
        let mut acc = [[_mm256_setzero_ps(); N]; R];
        let mut accm = [[0f32; N]; R];
        let (qp, xp) = (p.qs.as_ptr(), x.as_ptr());
        for b in 0..nb {
            for r in 0..R {
                let i = (r0 + r) * nb + b;
                // SAFETY: i < rows * nb, so block i's values lie inside `qs`.
                let q = qp.add(i * qb);
                // The block's 32 weights as four vectors of eight.
                let w: [__m256; 4] = if q4 {
                    let v = _mm_loadu_si128(q as *const __m128i);
                    let lo = _mm_and_si128(v, mask);
                    let hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
                    [
                        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)),
                        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))),
                        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)),
                        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))),
                    ]
                } else {
                    let lo = _mm_loadu_si128(q as *const __m128i);
                    let hi = _mm_loadu_si128(q.add(16) as *const __m128i);
                    [
                        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)),
                        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))),
                        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)),
                        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))),
                    ]
                };
                let d = _mm256_set1_ps(p.d[i].to_f32());
                let m = if q4 { p.m[i].to_f32() } else { 0.0 };
                for n in 0..N {
                    // SAFETY: token n's block b spans x[n * cols + b * 32 .. + 32].
                    let xb = xp.add(n * cols + b * 32);
                    let mut s = _mm256_mul_ps(w[0], _mm256_loadu_ps(xb));
                    s = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xb.add(8)), s);
                    s = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xb.add(16)), s);
                    s = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xb.add(24)), s);
                    acc[r][n] = _mm256_fmadd_ps(s, d, acc[r][n]);
                    if q4 {
                        accm[r][n] += m * xsum[n * nb + b];
                    }
                }
            }
        }
        for r in 0..R {
            for n in 0..N {
                let v = acc[r][n];
                let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
                let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
                let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
                out[r][n] = _mm_cvtss_f32(s1) + accm[r][n];
            }
        }
    }

    /// The AVX2 kernel on its own, for tests on machines that would pick AVX-512.
    #[cfg(test)]
    pub fn tile_for_test(p: &PackedMat, r: usize, x: &[f32], xsum: &[f32]) -> Option<f32> {
        if !(std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c"))
        {
            return None;
        }
        assert!(r < p.rows && x.len() >= p.cols && xsum.len() >= p.nb);
        let mut out = [[0f32; 1]; 1];
        // SAFETY: features checked just above; bounds asserted.
        unsafe { tile::<1, 1>(p, r, x, xsum, &mut out) };
        Some(out[0][0])
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::PackedMat;
    use crate::quant::QKind;
    use std::arch::x86_64::*;

    /// Sixteen f16 values at `p` (the first `mask` bits' worth) as f32.
    #[inline(always)]
    unsafe fn load_f16x16(p: *const half::f16, mask: __mmask16) -> __m512 {
        _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p as *const i16))
    }

    /// # Safety
    /// Needs AVX-512F/BW/VL and F16C; rows `r0..r0 + R` exist; `x` holds `N`
    /// rows of `p.cols` values and `xsum` their `N * p.nb` block sums.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    pub unsafe fn tile<const R: usize, const N: usize>(
        p: &PackedMat,
        r0: usize,
        x: &[f32],
        xsum: &[f32],
        out: &mut [[f32; N]; R],
    ) {
        let (nb, cols, qb) = (p.nb, p.cols, p.qb());
        let q4 = p.kind == QKind::Q4_1;
        let table = _mm512_setr_ps(
            0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.,
        );
        // One accumulator per row and token. Every (row, token) pair sees the
        // same sequence of operations whatever R and N are, so a token's
        // result does not depend on the batch it decodes in.
        let mut acc = [[_mm512_setzero_ps(); N]; R];
        let (dp, mp, qp, xp, sp) = (
            p.d.as_ptr(),
            p.m.as_ptr(),
            p.qs.as_ptr(),
            x.as_ptr(),
            xsum.as_ptr(),
        );
        let mut c = 0;
        while c < nb {
            let len = (nb - c).min(16);
            let mask: __mmask16 = if len == 16 { 0xFFFF } else { (1u16 << len) - 1 };
            // SAFETY (pointer arithmetic below): c + len <= nb, r < R with
            // r0 + R <= rows, n < N: every index stays inside its array.
            let mut ds = [[0f32; 16]; R];
            for r in 0..R {
                let row_blk = (r0 + r) * nb + c;
                _mm512_storeu_ps(ds[r].as_mut_ptr(), load_f16x16(dp.add(row_blk), mask));
                if q4 {
                    // The minimums of 16 blocks against their activation sums,
                    // one block per lane (the final sum adds every lane).
                    let mv = load_f16x16(mp.add(row_blk), mask);
                    for n in 0..N {
                        acc[r][n] = _mm512_fmadd_ps(
                            mv,
                            _mm512_maskz_loadu_ps(mask, sp.add(n * nb + c)),
                            acc[r][n],
                        );
                    }
                }
            }
            for b in c..c + len {
                for r in 0..R {
                    let q = qp.add(((r0 + r) * nb + b) * qb);
                    let d = _mm512_set1_ps(ds[r][b - c]);
                    // The block's weights times its scale, exactly (an f16
                    // scale times a 4- or 8-bit value fits f32's mantissa),
                    // once for every token of the tile.
                    let (lo, hi) = if q4 {
                        // Each 32-bit lane holds one byte; the permute reads a
                        // lane's low four bits as its index: nibble -> d * nibble.
                        let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(q as *const __m128i));
                        let td = _mm512_mul_ps(table, d);
                        (
                            _mm512_permutexvar_ps(v, td),
                            _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), td),
                        )
                    } else {
                        (
                            _mm512_mul_ps(
                                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                                    q as *const __m128i,
                                ))),
                                d,
                            ),
                            _mm512_mul_ps(
                                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                                    q.add(16) as *const __m128i,
                                ))),
                                d,
                            ),
                        )
                    };
                    for n in 0..N {
                        let xb = xp.add(n * cols + b * 32);
                        acc[r][n] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xb), acc[r][n]);
                        acc[r][n] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb.add(16)), acc[r][n]);
                    }
                }
            }
            c += len;
        }
        for r in 0..R {
            for n in 0..N {
                out[r][n] = _mm512_reduce_add_ps(acc[r][n]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn random_blocks(kind: QKind, rows: usize, cols: usize, seed: u64) -> QMat {
        let mut s = seed;
        let mut next = move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as u32
        };
        let mut data = Vec::new();
        for _ in 0..rows * cols / 32 {
            data.extend_from_slice(&f16::from_f32((next() % 1000) as f32 / 50_000.0).to_le_bytes());
            if kind == QKind::Q4_1 {
                data.extend_from_slice(
                    &f16::from_f32(-((next() % 1000) as f32) / 10_000.0).to_le_bytes(),
                );
                data.extend((0..16).map(|_| next() as u8));
            } else {
                data.extend((0..32).map(|_| next() as u8));
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
        fn matmul_equals_dequantized_product(seed in 0u64..1000, t in 1usize..20, blocks in 1usize..40, rows in 1usize..80, q8 in any::<bool>()) {
            let kind = if q8 { QKind::Q8_0 } else { QKind::Q4_1 };
            let cols = blocks * 32;
            let q = random_blocks(kind, rows, cols, seed);
            let w = PackedMat::pack(&q);
            let wf = q.to_f32();
            let x: Vec<f32> = (0..t * cols).map(|i| ((i as f32 * 1.3 + seed as f32) * 0.11).cos()).collect();
            let mut out = vec![0f32; t * rows];
            w.matmul(&x, t, &mut out);
            let xsum: Vec<f32> = x.chunks_exact(32).map(|c| c.iter().sum()).collect();
            for ti in 0..t {
                // A token alone gives the same bits as in the batch.
                let mut alone = vec![0f32; rows];
                w.matmul(&x[ti * cols..(ti + 1) * cols], 1, &mut alone);
                prop_assert!(alone.iter().zip(&out[ti * rows..(ti + 1) * rows]).all(|(a, b)| a.to_bits() == b.to_bits()), "token {} alone differs from its batch of {}", ti, t);
                for r in 0..rows {
                    let exact: f32 = (0..cols).map(|c| wf[r * cols + c] * x[ti * cols + c]).sum();
                    let scale: f32 = (0..cols).map(|c| (wf[r * cols + c] * x[ti * cols + c]).abs()).sum();
                    let got = out[ti * rows + r];
                    prop_assert!((got - exact).abs() <= 1e-5 * (1.0 + scale), "{} vs {}", got, exact);
                    #[cfg(target_arch = "x86_64")]
                    if let Some(v) = avx2::tile_for_test(&w, r, &x[ti * cols..(ti + 1) * cols], &xsum[ti * blocks..(ti + 1) * blocks]) {
                        prop_assert!((got - v).abs() <= 1e-5 * (1.0 + scale), "AVX2 kernel: {} vs {}", v, got);
                    }
                    let scalar = w.dot_scalar(r, &x[ti * cols..(ti + 1) * cols], &xsum[ti * blocks..(ti + 1) * blocks]);
                    prop_assert!((got - scalar).abs() <= 1e-5 * (1.0 + scale));
                }
            }
        }
    }

    #[test]
    fn column_shards_sum_to_the_whole() {
        let q = random_blocks(QKind::Q4_1, 40, 128, 3);
        let x: Vec<f32> = (0..128).map(|i| (i as f32 * 0.7).sin()).collect();
        let mut full = vec![0f32; 40];
        PackedMat::pack(&q).matmul(&x, 1, &mut full);
        let mut sum = vec![0f32; 40];
        for (c0, c1) in [(0, 64), (64, 128)] {
            let mut part = vec![0f32; 40];
            PackedMat::pack(&q.slice_cols(c0, c1).expect("aligned")).matmul(
                &x[c0..c1],
                1,
                &mut part,
            );
            for (s, p) in sum.iter_mut().zip(&part) {
                *s += p;
            }
        }
        for (a, b) in full.iter().zip(&sum) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + a.abs()), "{a} vs {b}");
        }
    }
}
