//! Decode kernels for the GGUF formats kept as stored (Q5_0, Q5_1 and the
//! K-quants Q2_K to Q6_K).
//!
//! A [`RowMat`] keeps the file's blocks byte for byte. Each weight row is
//! unpacked once per step into buffers that stay in L1 (a few KiB), then
//! multiplied with every token of the batch: a batch of 32 reads the
//! quantized weights once, not 32 times. The unpacking is one plain-Rust
//! function per format ([`crate::quant::unpack_row_inline`]: weight `i` is
//! `s * q[i] + m` with `q` a small unsigned integer and `s`, `m` per 16
//! weights) compiled into each kernel for that kernel's vector unit, so the
//! code the tests check against candle is the code the kernels run.
//!
//! Where the CPU has AVX-512 VNNI, the integer kernel quantizes each token's
//! activations to 8 bits per block of 32 (one f32 scale each, as llama.cpp's
//! Q8 activations) and multiplies them with `q` four at a time in one
//! instruction (`vpdpbusd`): 64 products per instruction instead of 16 f32
//! multiply-adds. The activation blocks are local to 32 columns, so a
//! tensor-parallel shard cut on block boundaries quantizes its columns
//! exactly as the whole does (given the same activations; across layers a
//! TP layout still drifts, see [`int8_activations`]). Elsewhere the f32
//! kernels unpack to f32 and keep activations exact.

use crate::qmatmul::{by_row_tasks, huge_page_vec, kernel, Kernel};
use crate::quant::{dequantize_row_inline, unpack_row_inline, QKind, QMat};

/// Which activations decode multiplies quantized weights with, where the
/// CPU has AVX-512 VNNI (elsewhere always f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activations {
    /// 8-bit for every format but Q4_0, Q4_1 and Q8_0 (the default model's),
    /// which keep f32 (`TANDEM_DECODE_ACTIVATIONS` unset).
    Auto,
    /// f32 for every format (`TANDEM_DECODE_ACTIVATIONS=f32`).
    F32,
    /// 8-bit for every format (`TANDEM_DECODE_ACTIVATIONS=int8`).
    Int8,
}

/// 0: not yet decided (read `TANDEM_DECODE_ACTIVATIONS`), then 1 + the mode.
static ACTIVATIONS: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// This process's choice.
///
/// 8-bit activations are the fast path (as llama.cpp's), and every
/// tensor-parallel layout still computes the whole model's bits with them
/// ([`crate::linear::ColumnPieces`]). What they give up is continuity: a
/// last-bit difference in an activation (a prompt prefilled in other
/// chunks, or through the dense prefill weights rather than decode's) can
/// round it to another 8-bit step, and steps compound over the layers, so
/// two paths to the same tokens part by a few percent of the logits instead
/// of by rounding, and greedy text can part where it nearly ties. A stream
/// resumed on another decode group re-prefills what it had generated, so
/// `Auto` keeps the default model's formats on f32 activations, where a
/// resumed stream continues as the interrupted one would have.
pub fn activations() -> Activations {
    use std::sync::atomic::Ordering;
    match ACTIVATIONS.load(Ordering::Relaxed) {
        1 => Activations::Auto,
        2 => Activations::F32,
        3 => Activations::Int8,
        _ => {
            let a = match std::env::var("TANDEM_DECODE_ACTIVATIONS").as_deref() {
                Ok("f32") => Activations::F32,
                Ok("int8") => Activations::Int8,
                _ => Activations::Auto,
            };
            set_activations(a);
            a
        }
    }
}

/// Chooses this process's activations from now on (weights loaded before
/// keep the kernel they were packed for).
pub fn set_activations(a: Activations) {
    let v = match a {
        Activations::Auto => 1,
        Activations::F32 => 2,
        Activations::Int8 => 3,
    };
    ACTIVATIONS.store(v, std::sync::atomic::Ordering::Relaxed);
}

/// Whether the integer kernels run for the formats [`Activations::Auto`]
/// quantizes (Q5_0, Q5_1 and the K-quants).
pub fn int8_activations() -> bool {
    activations() != Activations::F32
}

/// `Auto` (`true`) or `F32` (`false`) from now on.
pub fn set_int8_activations(on: bool) {
    set_activations(if on {
        Activations::Auto
    } else {
        Activations::F32
    });
}

/// Rows one task computes (its unpacked rows are reused for every token).
const ROWS_PER_TASK: usize = 16;
/// Tokens that share one pass over an unpacked row.
const TOKEN_TILE: usize = 4;

/// `(t0, n)`: `t` tokens in tiles of `TOKEN_TILE`, then 2, then 1.
fn token_tiles(t: usize) -> impl Iterator<Item = (usize, usize)> {
    let mut t0 = 0;
    std::iter::from_fn(move || {
        let n = match t - t0 {
            0 => return None,
            n if n >= TOKEN_TILE => TOKEN_TILE,
            n if n >= 2 => 2,
            _ => 1,
        };
        t0 += n;
        Some((t0 - n, n))
    })
}

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
        #[cfg(target_arch = "x86_64")]
        if vnni::available() && int8_activations() {
            return self.matmul_int(&vnni::QActs::new(x, t, self.cols), out);
        }
        by_row_tasks(self.rows, t, ROWS_PER_TASK, out, |r0, o| {
            self.rows_into(r0, x, t, o)
        });
    }

    /// The integer kernel against activations quantized once for every row.
    #[cfg(target_arch = "x86_64")]
    fn matmul_int(&self, a: &vnni::QActs, out: &mut [f32]) {
        by_row_tasks(self.rows, a.t, ROWS_PER_TASK, out, |r0, o| {
            // SAFETY: vnni::available() saw the features; `rows` and
            // `rows32` assert the sizes.
            unsafe {
                if self.kind.block_elems() == 32 && a.t < vnni::ROW_BUFFER_FROM {
                    vnni::rows32(self, r0, a, o)
                } else {
                    vnni::rows(self, r0, a, o, &mut vnni::RowBufs::new(self.cols))
                }
            }
        });
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
        use super::{token_tiles, RowMat, TOKEN_TILE};
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
                for (t0, n) in token_tiles(t) {
                    let (xs, o) = (&x[t0 * cols..], &mut o[t0..t0 + n]);
                    match n {
                        TOKEN_TILE => dot::<TOKEN_TILE>(buf, xs, o),
                        2 => dot::<2>(buf, xs, o),
                        _ => dot::<1>(buf, xs, o),
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

/// The integer kernel: 8-bit activations, `vpdpbusd` (AVX-512 VNNI).
#[cfg(target_arch = "x86_64")]
pub(crate) mod vnni {
    use super::{token_tiles, unpack_row_inline, RowMat, TOKEN_TILE};
    use std::arch::x86_64::*;

    /// From this many tokens, a row is unpacked once into L1 and reused by
    /// all of them; below it, 32-weight blocks are unpacked into a register
    /// per token tile.
    pub const ROW_BUFFER_FROM: usize = 8;

    pub fn available() -> bool {
        static YES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        // Every feature `rows` and `rows32` enable.
        *YES.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512vnni")
                && std::arch::is_x86_feature_detected!("f16c")
                && std::arch::is_x86_feature_detected!("fma")
        })
    }

    /// Columns padded to whole 64-byte vectors (the padding is zeros).
    fn padded(cols: usize) -> usize {
        cols.next_multiple_of(64)
    }

    /// Each token's activations as 8-bit values, one scale per 32.
    pub struct QActs {
        pub t: usize,
        /// Padded row length.
        stride: usize,
        /// `[t, stride]` values.
        q: Vec<i8>,
        /// `[t, stride / 4]`: the scale of each group of four values (one
        /// `vpdpbusd` lane), so a lane's integer sum scales with one multiply.
        lane_scale: Vec<f32>,
        /// `[t, stride / 16]`: per 16 values, the sum of the quantized
        /// activations (times the minimum of a weight group).
        sums: Vec<f32>,
    }

    impl QActs {
        pub fn new(x: &[f32], t: usize, cols: usize) -> QActs {
            let stride = padded(cols);
            let mut a = QActs {
                t,
                stride,
                q: vec![0; t * stride],
                lane_scale: vec![0.0; t * stride / 4],
                sums: vec![0.0; t * stride / 16],
            };
            for ti in 0..t {
                let xs = &x[ti * cols..(ti + 1) * cols];
                for (b, xb) in xs.chunks_exact(32).enumerate() {
                    let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let d = amax / 127.0;
                    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
                    let at = ti * stride + b * 32;
                    for (q, v) in a.q[at..at + 32].iter_mut().zip(xb) {
                        *q = (v * id).round() as i8;
                    }
                    a.lane_scale[at / 4..at / 4 + 8].fill(d);
                    for g in 0..2 {
                        let qs = &a.q[at + g * 16..at + g * 16 + 16];
                        a.sums[at / 16 + g] = d * qs.iter().map(|&q| q as i32).sum::<i32>() as f32;
                    }
                }
            }
            a
        }

        /// Token `ti`'s activations as the kernel sees them (for tests).
        #[cfg(test)]
        pub fn dequantized(&self, ti: usize, cols: usize) -> Vec<f32> {
            (0..cols)
                .map(|c| {
                    let i = ti * self.stride + c;
                    self.q[i] as f32 * self.lane_scale[i / 4]
                })
                .collect()
        }
    }

    /// One row unpacked: values, scales and minimums (padded with zeros).
    pub struct RowBufs {
        q: Vec<u8>,
        s: Vec<f32>,
        m: Vec<f32>,
    }

    impl RowBufs {
        pub fn new(cols: usize) -> RowBufs {
            let p = padded(cols);
            RowBufs {
                q: vec![0; p],
                s: vec![0.0; p / 16],
                m: vec![0.0; p / 16],
            }
        }
    }

    /// One 32-weight block's values in a register, with its scale and minimum.
    #[inline(always)]
    unsafe fn block32<const K: u8>(b: *const u8) -> (__m256i, f32, f32) {
        // One F16C conversion (this function's caller enables F16C).
        let f16 = |at: usize| {
            let h = u16::from_le_bytes([*b.add(at), *b.add(at + 1)]);
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
        };
        let nibbles = |at: usize| {
            let v = _mm_loadu_si128(b.add(at) as *const __m128i);
            let m = _mm_set1_epi8(0x0F);
            _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m))
        };
        // Bit j of the 32-bit word at `at` becomes bit 4 of byte j.
        let fifth = |at: usize| {
            let qh = (b.add(at) as *const u32).read_unaligned().to_le();
            _mm256_maskz_set1_epi8(qh, 0x10)
        };
        let d = f16(0);
        match K {
            Q4_0 => (nibbles(2), d, -8.0 * d),
            Q4_1 => (nibbles(4), d, f16(2)),
            Q5_0 => (_mm256_or_si256(nibbles(6), fifth(2)), d, -16.0 * d),
            Q5_1 => (_mm256_or_si256(nibbles(8), fifth(4)), d, f16(2)),
            _ => (
                _mm256_xor_si256(
                    _mm256_loadu_si256(b.add(2) as *const __m256i),
                    _mm256_set1_epi8(-128),
                ),
                d,
                -128.0 * d,
            ),
        }
    }

    const Q4_0: u8 = 0;
    const Q4_1: u8 = 1;
    const Q5_0: u8 = 2;
    const Q5_1: u8 = 3;
    const Q8_0: u8 = 4;

    /// # Safety
    /// Needs AVX-512F/BW/VL and VNNI. `m` is a 32-weight format; `out` is
    /// `[rows, a.t]` from row `r0`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")]
    pub unsafe fn rows32(m: &RowMat, r0: usize, a: &QActs, out: &mut [f32]) {
        use crate::quant::QKind;
        match m.kind {
            QKind::Q4_0 => rows32_k::<Q4_0>(m, r0, a, out),
            QKind::Q4_1 => rows32_k::<Q4_1>(m, r0, a, out),
            QKind::Q5_0 => rows32_k::<Q5_0>(m, r0, a, out),
            QKind::Q5_1 => rows32_k::<Q5_1>(m, r0, a, out),
            QKind::Q8_0 => rows32_k::<Q8_0>(m, r0, a, out),
            other => panic!("{other} has 256-weight blocks"),
        }
    }

    #[inline(always)]
    unsafe fn rows32_k<const K: u8>(m: &RowMat, r0: usize, a: &QActs, out: &mut [f32]) {
        let t = a.t;
        let bb = m.kind.block_bytes();
        assert!(a.stride == padded(m.cols) && r0 + out.len() / t <= m.rows);
        for (j, o) in out.chunks_exact_mut(t).enumerate() {
            let row = m.row(r0 + j);
            for (t0, n) in token_tiles(t) {
                let o = &mut o[t0..];
                match n {
                    TOKEN_TILE => dot32::<K, TOKEN_TILE>(row, bb, a, t0, o),
                    2 => dot32::<K, 2>(row, bb, a, t0, o),
                    _ => dot32::<K, 1>(row, bb, a, t0, o),
                }
            }
        }
    }

    /// One row of 32-weight blocks against tokens `t0..t0 + N`.
    #[inline(always)]
    unsafe fn dot32<const K: u8, const N: usize>(
        row: &[u8],
        bb: usize,
        a: &QActs,
        t0: usize,
        out: &mut [f32],
    ) {
        let nb = row.len() / bb;
        assert!(nb * 32 <= a.stride && (t0 + N) * a.stride <= a.q.len() && out.len() >= N);
        let mut acc = [_mm256_setzero_ps(); N];
        let mut macc = [0f32; N];
        // SAFETY (every access): block b < nb lies in `row`; token t0 + n's
        // values b * 32..b * 32 + 32 lie in its padded row of `a`.
        for b in 0..nb {
            let (q, d, mn) = block32::<K>(row.as_ptr().add(b * bb));
            for n in 0..N {
                let base = (t0 + n) * a.stride + b * 32;
                let xv = _mm256_loadu_si256(a.q.as_ptr().add(base) as *const __m256i);
                let dp = _mm256_dpbusd_epi32(_mm256_setzero_si256(), q, xv);
                let dx = *a.lane_scale.get_unchecked(base / 4);
                acc[n] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dp), _mm256_set1_ps(d * dx), acc[n]);
                let sum = *a.sums.get_unchecked(base / 16) + *a.sums.get_unchecked(base / 16 + 1);
                macc[n] += mn * sum;
            }
        }
        for n in 0..N {
            let v = acc[n];
            let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
            out[n] = _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1))) + macc[n];
        }
    }

    /// # Safety
    /// Needs AVX-512F/BW and VNNI. `out` is `[rows, a.t]` from row `r0`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c,fma")]
    pub unsafe fn rows(m: &RowMat, r0: usize, a: &QActs, out: &mut [f32], b: &mut RowBufs) {
        let (cols, t) = (m.cols, a.t);
        let groups = cols / 16;
        assert!(a.stride == padded(cols) && b.q.len() == a.stride && r0 + out.len() / t <= m.rows);
        for (j, o) in out.chunks_exact_mut(t).enumerate() {
            unpack_row_inline(
                m.kind,
                m.row(r0 + j),
                &mut b.q[..cols],
                &mut b.s[..groups],
                &mut b.m[..groups],
            );
            for (t0, n) in token_tiles(t) {
                let o = &mut o[t0..];
                match n {
                    TOKEN_TILE => dot::<TOKEN_TILE>(b, a, t0, o),
                    2 => dot::<2>(b, a, t0, o),
                    _ => dot::<1>(b, a, t0, o),
                }
            }
        }
    }

    /// The unpacked row against tokens `t0..t0 + N`.
    #[inline(always)]
    unsafe fn dot<const N: usize>(b: &RowBufs, a: &QActs, t0: usize, out: &mut [f32]) {
        let stride = a.stride;
        assert!((t0 + N) * stride <= a.q.len() && out.len() >= N);
        // Lane l of a 64-value chunk sums values 4l..4l+4, in group l / 4.
        let spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
        let (qp, sp) = (b.q.as_ptr(), b.s.as_ptr());
        let mut acc = [_mm512_setzero_ps(); N];
        // SAFETY (every load): chunk c covers values 64c..64c + 64 < stride,
        // groups 4c..4c + 4 <= stride / 16, lanes 16c..16c + 16 <= stride / 4,
        // and token t0 + n < a.t: all inside the padded buffers.
        for c in 0..stride / 64 {
            let qv = _mm512_loadu_si512(qp.add(64 * c) as *const _);
            let sv =
                _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_loadu_ps(sp.add(4 * c))));
            for n in 0..N {
                let row = (t0 + n) * stride;
                let xv = _mm512_loadu_si512(a.q.as_ptr().add(row + 64 * c) as *const _);
                let iv = _mm512_dpbusd_epi32(_mm512_setzero_si512(), qv, xv);
                let dv = _mm512_loadu_ps(a.lane_scale.as_ptr().add(row / 4 + 16 * c));
                acc[n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iv), _mm512_mul_ps(sv, dv), acc[n]);
            }
        }
        // The minimums: sum over groups of m * (sum of the group's activations).
        let mp = b.m.as_ptr();
        for n in 0..N {
            let sums = a.sums.as_ptr().add((t0 + n) * stride / 16);
            let mut macc = _mm512_setzero_ps();
            for g in (0..stride / 16).step_by(16) {
                let k = (stride / 16 - g).min(16);
                let mask: __mmask16 = if k == 16 { 0xFFFF } else { (1 << k) - 1 };
                macc = _mm512_fmadd_ps(
                    _mm512_maskz_loadu_ps(mask, mp.add(g)),
                    _mm512_maskz_loadu_ps(mask, sums.add(g)),
                    macc,
                );
            }
            out[n] = _mm512_reduce_add_ps(acc[n]) + _mm512_reduce_add_ps(macc);
        }
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

    /// `matmul` runs the integer kernel when 8-bit activations are chosen
    /// (and the CPU has VNNI), the f32 kernels when f32 ones are.
    #[test]
    fn the_activation_switch_chooses_the_kernel() {
        let (rows, cols, t) = (20, 512, 3);
        let q = random_qmat(QKind::Q4_K, rows, cols, 5);
        let m = RowMat::new(&q);
        let x: Vec<f32> = (0..t * cols).map(|i| (i as f32 * 0.13).cos()).collect();
        let transpose = |o: &[f32]| -> Vec<f32> {
            (0..t * rows)
                .map(|i| o[(i % rows) * t + i / rows])
                .collect()
        };
        let mut f32_rows = vec![0f32; t * rows];
        m.rows_into(0, &x, t, &mut f32_rows);
        let mut got = vec![0f32; t * rows];
        set_int8_activations(false);
        m.matmul(&x, t, &mut got);
        assert_eq!(got, transpose(&f32_rows), "f32 activations");
        set_int8_activations(true);
        m.matmul(&x, t, &mut got);
        #[cfg(target_arch = "x86_64")]
        if vnni::available() {
            let mut int = vec![0f32; t * rows];
            m.matmul_int(&vnni::QActs::new(&x, t, cols), &mut int);
            assert_eq!(got, int, "8-bit activations");
            assert_ne!(got, transpose(&f32_rows), "the two kernels differ");
        }
    }

    /// Column shards cut on block boundaries quantize their activations as
    /// the whole does: their partial products sum to the whole's to rounding.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn integer_column_shards_sum_to_the_whole() {
        if !vnni::available() {
            return;
        }
        for kind in QKind::ALL {
            let cols = 3 * 2 * kind.block_elems();
            let q = random_qmat(kind, 24, cols, 11);
            let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.7).sin()).collect();
            let mut whole = vec![0f32; 24];
            RowMat::new(&q).matmul_int(&vnni::QActs::new(&x, 1, cols), &mut whole);
            let mut sum = vec![0f32; 24];
            for k in 0..3 {
                let (c0, c1) = (k * cols / 3, (k + 1) * cols / 3);
                let mut part = vec![0f32; 24];
                RowMat::new(&q.slice_cols(c0, c1).expect("aligned"))
                    .matmul_int(&vnni::QActs::new(&x[c0..c1], 1, c1 - c0), &mut part);
                for (s, p) in sum.iter_mut().zip(&part) {
                    *s += p;
                }
            }
            let wf = q.to_f32();
            for (r, (a, b)) in whole.iter().zip(&sum).enumerate() {
                let scale: f32 = (0..cols).map(|c| (wf[r * cols + c] * x[c]).abs()).sum();
                assert!((a - b).abs() <= 1e-5 * (1.0 + scale), "{kind}: {a} vs {b}");
            }
        }
    }

    proptest! {
        /// The integer kernel gives the dequantized weights times the 8-bit
        /// activations exactly (to f32 rounding), and those activations are
        /// within half a step of the true ones.
        #[cfg(target_arch = "x86_64")]
        #[test]
        fn integer_kernel_equals_the_product_with_8_bit_activations(k in 0usize..10, seed in any::<u64>(), t in 1usize..11, blocks in 1usize..4, rows in 1usize..40) {
            if !vnni::available() {
                return Ok(());
            }
            let kind = QKind::ALL[k];
            let cols = blocks * kind.block_elems();
            let q = random_qmat(kind, rows, cols, seed);
            let m = RowMat::new(&q);
            let wf = q.to_f32();
            let x: Vec<f32> = (0..t * cols).map(|i| ((i as f32 * 0.37 + seed as f32) * 0.29).sin() * (1.0 + (i % 7) as f32)).collect();
            let a = vnni::QActs::new(&x, t, cols);
            let mut out = vec![0f32; t * rows];
            m.matmul_int(&a, &mut out);
            for ti in 0..t {
                let xq = a.dequantized(ti, cols);
                let xt = &x[ti * cols..(ti + 1) * cols];
                for (c, (&v, &w)) in xq.iter().zip(xt).enumerate() {
                    let amax = xt[c / 32 * 32..c / 32 * 32 + 32].iter().fold(0f32, |m, v| m.max(v.abs()));
                    prop_assert!((v - w).abs() <= amax / 127.0 * 0.5 * (1.0 + 1e-5), "activation {} quantized to {} from {}", c, v, w);
                }
                for r in 0..rows {
                    let terms = (0..cols).map(|c| wf[r * cols + c] * xq[c]);
                    let exact: f64 = terms.clone().map(f64::from).sum();
                    let scale: f32 = terms.map(f32::abs).sum();
                    let got = out[ti * rows + r];
                    prop_assert!((got as f64 - exact).abs() <= 1e-5 * (1.0 + scale as f64), "{}: {} vs {}", kind, got, exact);
                }
            }
        }

        #[test]
        fn matmul_equals_the_dequantized_product(k in 0usize..7, seed in any::<u64>(), t in 1usize..11, blocks in 1usize..4, rows in 1usize..40) {
            let kind = KINDS[k];
            let cols = blocks * kind.block_elems();
            let q = random_qmat(kind, rows, cols, seed);
            let m = RowMat::new(&q);
            let wf = q.to_f32();
            let x: Vec<f32> = (0..t * cols).map(|i| ((i as f32 * 0.37 + seed as f32) * 0.29).sin()).collect();
            // The f32 kernels (matmul takes the integer one where it can).
            let mut out = vec![0f32; t * rows];
            m.rows_into(0, &x, t, &mut out);
            let out: Vec<f32> = (0..t * rows).map(|i| out[(i % rows) * t + i / rows]).collect();
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
