//! Quantized weights as GGUF stores them: block formats, slicing for
//! tensor-parallel shards, dequantization. [`crate::qmatmul`] repacks them
//! for the decode kernels.

use half::f16;
use rayon::prelude::*;

/// GGUF block formats Tandem runs decode on without dequantizing.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QKind {
    /// 32 weights: f16 scale `d`, 16 bytes of 4-bit values; w = d*(q - 8).
    Q4_0,
    /// 32 weights: f16 scale `d`, f16 minimum `m`, 16 bytes of 4-bit values; w = d*q + m.
    Q4_1,
    /// 32 weights: f16 `d`, 32 high bits, 16 bytes of low nibbles; w = d*(q - 16).
    Q5_0,
    /// 32 weights: f16 `d` and `m`, 32 high bits, 16 bytes of low nibbles; w = d*q + m.
    Q5_1,
    /// 32 weights: f16 scale `d`, 32 signed bytes; w = d*q.
    Q8_0,
    /// 256 weights in 16 groups of 16, each with a 4-bit scale and minimum; 2-bit values.
    Q2_K,
    /// 256 weights in 16 groups of 16 with 6-bit scales; 3-bit values.
    Q3_K,
    /// 256 weights in 8 groups of 32 with 6-bit scales and minimums; 4-bit values.
    Q4_K,
    /// As Q4_K with a fifth bit per value.
    Q5_K,
    /// 256 weights in 16 groups of 16 with 8-bit scales; 6-bit values.
    Q6_K,
}

impl QKind {
    pub const ALL: [QKind; 10] = [
        QKind::Q4_0,
        QKind::Q4_1,
        QKind::Q5_0,
        QKind::Q5_1,
        QKind::Q8_0,
        QKind::Q2_K,
        QKind::Q3_K,
        QKind::Q4_K,
        QKind::Q5_K,
        QKind::Q6_K,
    ];

    pub const fn block_elems(self) -> usize {
        match self {
            QKind::Q4_0 | QKind::Q4_1 | QKind::Q5_0 | QKind::Q5_1 | QKind::Q8_0 => 32,
            _ => 256,
        }
    }

    pub const fn block_bytes(self) -> usize {
        match self {
            QKind::Q4_0 => 18,
            QKind::Q4_1 => 20,
            QKind::Q5_0 => 22,
            QKind::Q5_1 => 24,
            QKind::Q8_0 => 34,
            QKind::Q2_K => 84,
            QKind::Q3_K => 110,
            QKind::Q4_K => 144,
            QKind::Q5_K => 176,
            QKind::Q6_K => 210,
        }
    }

    /// Bits per weight, scales included.
    pub fn bits_per_weight(self) -> f64 {
        (self.block_bytes() * 8) as f64 / self.block_elems() as f64
    }

    pub const fn name(self) -> &'static str {
        match self {
            QKind::Q4_0 => "Q4_0",
            QKind::Q4_1 => "Q4_1",
            QKind::Q5_0 => "Q5_0",
            QKind::Q5_1 => "Q5_1",
            QKind::Q8_0 => "Q8_0",
            QKind::Q2_K => "Q2_K",
            QKind::Q3_K => "Q3_K",
            QKind::Q4_K => "Q4_K",
            QKind::Q5_K => "Q5_K",
            QKind::Q6_K => "Q6_K",
        }
    }
}

impl std::fmt::Display for QKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
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
        if !c0.is_multiple_of(be) || !c1.is_multiple_of(be) {
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

    /// Q4_0 rewritten as Q4_1 (m = -8d, exact in f16), so that it runs on the
    /// Q4_1 kernel; `None` for other formats or a scale too large to scale by 8.
    pub fn q4_0_as_q4_1(&self) -> Option<QMat> {
        if self.kind != QKind::Q4_0 {
            return None;
        }
        let mut data = Vec::with_capacity(self.data.len() / 18 * 20);
        for blk in self.data.chunks_exact(18) {
            let m = f16::from_f32(-8.0 * f16_at(blk, 0));
            if !m.is_finite() {
                return None;
            }
            data.extend_from_slice(&blk[0..2]);
            data.extend_from_slice(&m.to_le_bytes());
            data.extend_from_slice(&blk[2..18]);
        }
        Some(QMat {
            kind: QKind::Q4_1,
            rows: self.rows,
            cols: self.cols,
            data,
        })
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
}

/// The f16 at byte `i`, converted with integer operations that inline into
/// the kernels (`half`'s conversion is a call behind a feature check).
#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16_bits_to_f32(u16::from_le_bytes([b[i], b[i + 1]]))
}

/// An f16 given by its bits as f32 (see [`f16_at`]).
#[inline(always)]
fn f16_bits_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let em = h & 0x7FFF;
    let v = if em >= 0x7C00 {
        // Infinity or NaN: all-ones exponent, mantissa kept.
        f32::from_bits(((em & 0x03FF) << 13) | 0x7F80_0000)
    } else {
        // Rebias the exponent by multiplying with 2^112; exact for normal
        // and subnormal halves alike.
        f32::from_bits(em << 13) * f32::from_bits(0x7780_0000)
    };
    f32::from_bits(v.to_bits() | sign)
}

/// Dequantizes one row (whole blocks) into `out`.
pub fn dequantize_row(kind: QKind, row: &[u8], out: &mut [f32]) {
    dequantize_row_inline(kind, row, out)
}

/// The same, inlined into its caller so that a caller compiled for wider
/// vector units gets a vectorized copy (the decode kernels do).
#[inline(always)]
pub(crate) fn dequantize_row_inline(kind: QKind, row: &[u8], out: &mut [f32]) {
    let mut q = [0u8; 256];
    let (mut s, mut m) = ([0f32; 16], [0f32; 16]);
    let (bb, be) = (kind.block_bytes(), kind.block_elems());
    for (blk, o) in row.chunks_exact(bb).zip(out.chunks_exact_mut(be)) {
        unpack_row_inline(
            kind,
            blk,
            &mut q[..be],
            &mut s[..be / 16],
            &mut m[..be / 16],
        );
        for (g, o) in o.chunks_exact_mut(16).enumerate() {
            for (o, &q) in o.iter_mut().zip(&q[g * 16..g * 16 + 16]) {
                *o = s[g] * q as f32 + m[g];
            }
        }
    }
}

/// Every format as one form: weight `i` of a row is `s[i / 16] * q[i] + m[i / 16]`,
/// with `q` a small unsigned integer (at most 255) and `s`, `m` per group of 16.
/// The integer kernels multiply `q` by 8-bit activations; the rest is scales.
/// `row` is whole blocks; `q` has a value per weight, `s` and `m` one per 16.
#[inline(always)]
pub(crate) fn unpack_row_inline(
    kind: QKind,
    row: &[u8],
    q: &mut [u8],
    s: &mut [f32],
    m: &mut [f32],
) {
    // One loop per format, so that each is compiled (and vectorized) on its
    // own. A macro, not a function taking the block decoder: a decoder
    // passed as a value is called through a shim that is not inlined into
    // the kernels' target-feature functions, and would run unvectorized.
    macro_rules! each {
        ($bb:literal, $be:literal, $g:literal, $f:ident) => {{
            let blocks = row
                .chunks_exact($bb)
                .zip(q.chunks_exact_mut($be))
                .zip(s.chunks_exact_mut($g).zip(m.chunks_exact_mut($g)));
            for ((blk, q), (s, m)) in blocks {
                $f(
                    blk.try_into().expect("whole blocks"),
                    q.try_into().expect("whole blocks"),
                    s.try_into().expect("whole blocks"),
                    m.try_into().expect("whole blocks"),
                );
            }
        }};
    }
    match kind {
        QKind::Q4_0 => each!(18, 32, 2, q4_0),
        QKind::Q4_1 => each!(20, 32, 2, q4_1),
        QKind::Q5_0 => each!(22, 32, 2, q5_0),
        QKind::Q5_1 => each!(24, 32, 2, q5_1),
        QKind::Q8_0 => each!(34, 32, 2, q8_0),
        QKind::Q2_K => each!(84, 256, 16, q2k),
        QKind::Q3_K => each!(110, 256, 16, q3k),
        QKind::Q4_K => each!(144, 256, 16, q4k),
        QKind::Q5_K => each!(176, 256, 16, q5k),
        QKind::Q6_K => each!(210, 256, 16, q6k),
    }
}

#[inline(always)]
fn q4_0(b: &[u8; 18], q: &mut [u8; 32], s: &mut [f32; 2], m: &mut [f32; 2]) {
    let d = f16_at(b, 0);
    q4(b, 2, q);
    *s = [d; 2];
    *m = [-8.0 * d; 2];
}

#[inline(always)]
fn q4_1(b: &[u8; 20], q: &mut [u8; 32], s: &mut [f32; 2], m: &mut [f32; 2]) {
    q4(b, 4, q);
    *s = [f16_at(b, 0); 2];
    *m = [f16_at(b, 2); 2];
}

#[inline(always)]
fn q5_0(b: &[u8; 22], q: &mut [u8; 32], s: &mut [f32; 2], m: &mut [f32; 2]) {
    let d = f16_at(b, 0);
    q5(b, 2, q);
    *s = [d; 2];
    *m = [-16.0 * d; 2];
}

#[inline(always)]
fn q5_1(b: &[u8; 24], q: &mut [u8; 32], s: &mut [f32; 2], m: &mut [f32; 2]) {
    q5(b, 4, q);
    *s = [f16_at(b, 0); 2];
    *m = [f16_at(b, 2); 2];
}

#[inline(always)]
fn q8_0(b: &[u8; 34], q: &mut [u8; 32], s: &mut [f32; 2], m: &mut [f32; 2]) {
    let d = f16_at(b, 0);
    for j in 0..32 {
        q[j] = b[2 + j] ^ 0x80; // i8 + 128
    }
    *s = [d; 2];
    *m = [-128.0 * d; 2];
}

#[inline(always)]
fn q4k(b: &[u8; 144], q: &mut [u8; 256], s: &mut [f32; 16], m: &mut [f32; 16]) {
    q45k(b, false, q, s, m)
}

#[inline(always)]
fn q5k(b: &[u8; 176], q: &mut [u8; 256], s: &mut [f32; 16], m: &mut [f32; 16]) {
    q45k(b, true, q, s, m)
}

/// 32 four-bit values from byte `at`: low nibbles first, then high.
#[inline(always)]
fn q4(blk: &[u8], at: usize, q: &mut [u8; 32]) {
    let qs: &[u8; 16] = blk[at..at + 16].try_into().expect("block size");
    for j in 0..16 {
        q[j] = qs[j] & 0x0F;
    }
    for j in 0..16 {
        q[j + 16] = qs[j] >> 4;
    }
}

/// `FIFTH_BIT[b]`: byte `i` is bit `i` of `b` moved to bit 4 (a fifth bit
/// for eight values at once; a shift by the value's index would not vectorize).
const FIFTH_BIT: [u64; 256] = {
    let mut t = [0u64; 256];
    let mut b = 0;
    while b < 256 {
        let mut i = 0;
        while i < 8 {
            t[b] |= (((b >> i) & 1) as u64) << (8 * i + 4);
            i += 1;
        }
        b += 1;
    }
    t
};

/// 32 five-bit values: a 32-bit word of fifth bits at `at`, nibbles after it.
#[inline(always)]
fn q5(blk: &[u8], at: usize, q: &mut [u8; 32]) {
    let mut hi = [0u8; 32];
    for k in 0..4 {
        hi[8 * k..8 * k + 8].copy_from_slice(&FIFTH_BIT[blk[at + k] as usize].to_le_bytes());
    }
    q4(blk, at + 4, q);
    for j in 0..32 {
        q[j] |= hi[j];
    }
}

/// Layout: scales[16] (low nibble scale, high nibble minimum), qs[64], d, dmin.
#[inline(always)]
fn q2k(blk: &[u8; 84], q: &mut [u8; 256], s: &mut [f32; 16], m: &mut [f32; 16]) {
    let (d, dmin) = (f16_at(blk, 80), f16_at(blk, 82));
    for (g, sc) in blk[..16].iter().enumerate() {
        s[g] = d * (sc & 0x0F) as f32;
        m[g] = -dmin * (sc >> 4) as f32;
    }
    for half in 0..2 {
        let qs = &blk[16 + 32 * half..16 + 32 * half + 32];
        for j in 0..4 {
            let q = &mut q[half * 128 + j * 32..][..32];
            for l in 0..32 {
                q[l] = (qs[l] >> (2 * j)) & 3;
            }
        }
    }
}

/// Layout: hmask[32], qs[64], scales[12] (sixteen 6-bit scales), d.
#[inline(always)]
fn q3k(blk: &[u8; 110], q: &mut [u8; 256], s: &mut [f32; 16], m: &mut [f32; 16]) {
    let d = f16_at(blk, 108);
    let sc = &blk[96..108];
    for g in 0..16 {
        let low = if g < 8 { sc[g] & 0x0F } else { sc[g - 8] >> 4 };
        let high = (sc[8 + g % 4] >> (2 * (g / 4))) & 3;
        s[g] = d * ((low | (high << 4)) as i32 - 32) as f32;
        // Values are 0..7 standing for -4..3.
        m[g] = -4.0 * s[g];
    }
    let hmask = &blk[0..32];
    for half in 0..2 {
        let qs = &blk[32 + 32 * half..32 + 32 * half + 32];
        for j in 0..4 {
            let bit = half * 4 + j;
            let q = &mut q[half * 128 + j * 32..][..32];
            for l in 0..32 {
                q[l] = ((qs[l] >> (2 * j)) & 3) | (((hmask[l] >> bit) & 1) << 2);
            }
        }
    }
}

/// Scale and minimum `j` (of eight) from Q4_K/Q5_K's 12 packed bytes.
#[inline(always)]
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Q4_K: d, dmin, scales[12], qs[128]. Q5_K adds qh[32] before qs.
#[inline(always)]
fn q45k(blk: &[u8], five: bool, q: &mut [u8; 256], s: &mut [f32; 16], m: &mut [f32; 16]) {
    let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
    let sc = &blk[4..16];
    for j in 0..8 {
        let (a, b) = scale_min_k4(j, sc);
        s[2 * j] = d * a as f32;
        s[2 * j + 1] = s[2 * j];
        m[2 * j] = -dmin * b as f32;
        m[2 * j + 1] = m[2 * j];
    }
    let qs = if five { &blk[48..176] } else { &blk[16..144] };
    for pair in 0..4 {
        let src: &[u8; 32] = qs[pair * 32..pair * 32 + 32]
            .try_into()
            .expect("block size");
        let q = &mut q[pair * 64..pair * 64 + 64];
        for l in 0..32 {
            q[l] = src[l] & 0x0F;
        }
        for l in 0..32 {
            q[l + 32] = src[l] >> 4;
        }
        if five {
            let qh = &blk[16..48];
            for l in 0..32 {
                q[l] |= ((qh[l] >> (2 * pair)) & 1) << 4;
            }
            for l in 0..32 {
                q[l + 32] |= ((qh[l] >> (2 * pair + 1)) & 1) << 4;
            }
        }
    }
}

/// Layout: ql[128], qh[64], scales[16] (signed), d. Values 0..63 stand for -32..31.
#[inline(always)]
fn q6k(blk: &[u8; 210], q: &mut [u8; 256], s: &mut [f32; 16], m: &mut [f32; 16]) {
    let d = f16_at(blk, 208);
    for g in 0..16 {
        s[g] = d * (blk[192 + g] as i8) as f32;
        m[g] = -32.0 * s[g];
    }
    for half in 0..2 {
        let ql = &blk[half * 64..half * 64 + 64];
        let qh = &blk[128 + half * 32..128 + half * 32 + 32];
        let q = &mut q[half * 128..half * 128 + 128];
        for l in 0..32 {
            q[l] = (ql[l] & 0x0F) | ((qh[l] & 3) << 4);
            q[l + 32] = (ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4);
            q[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
            q[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Random blocks of `kind` whose f16 scales are finite and modest.
    pub(crate) fn random_qmat(kind: QKind, rows: usize, cols: usize, seed: u64) -> QMat {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let scales: &[usize] = match kind {
            QKind::Q4_0 | QKind::Q5_0 | QKind::Q8_0 => &[0],
            QKind::Q4_1 | QKind::Q5_1 | QKind::Q4_K | QKind::Q5_K => &[0, 2],
            QKind::Q2_K => &[80, 82],
            QKind::Q3_K => &[108],
            QKind::Q6_K => &[208],
        };
        let blocks = rows * cols / kind.block_elems();
        let mut data: Vec<u8> = (0..blocks * kind.block_bytes())
            .map(|_| next() as u8)
            .collect();
        for blk in data.chunks_exact_mut(kind.block_bytes()) {
            for (k, &at) in scales.iter().enumerate() {
                let v = (next() % 2000) as f32 / 100_000.0;
                let v = if k == 1 && matches!(kind, QKind::Q4_1 | QKind::Q5_1) {
                    -v
                } else {
                    v
                };
                blk[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
            }
        }
        QMat {
            kind,
            rows,
            cols,
            data,
        }
    }

    fn candle_type(kind: QKind) -> candle_core::quantized::GgmlDType {
        use candle_core::quantized::GgmlDType as G;
        match kind {
            QKind::Q4_0 => G::Q4_0,
            QKind::Q4_1 => G::Q4_1,
            QKind::Q5_0 => G::Q5_0,
            QKind::Q5_1 => G::Q5_1,
            QKind::Q8_0 => G::Q8_0,
            QKind::Q2_K => G::Q2K,
            QKind::Q3_K => G::Q3K,
            QKind::Q4_K => G::Q4K,
            QKind::Q5_K => G::Q5K,
            QKind::Q6_K => G::Q6K,
        }
    }

    #[test]
    fn half_conversion_is_exact_for_every_value() {
        for h in 0..=u16::MAX {
            let want = f16::from_bits(h).to_f32();
            let got = f16_at(&h.to_le_bytes(), 0);
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{h:#06x}: {got} vs {want}"
            );
        }
    }

    proptest! {
        /// Every format dequantizes as candle's independent implementation does.
        #[test]
        fn dequantization_matches_candle(k in 0usize..10, blocks in 1usize..6, seed in any::<u64>()) {
            let kind = QKind::ALL[k];
            let q = random_qmat(kind, 1, blocks * kind.block_elems(), seed);
            let ours = q.to_f32();
            let theirs = candle_core::quantized::ggml_file::qtensor_from_ggml(
                candle_type(kind),
                &q.data,
                vec![q.cols],
                &candle_core::Device::Cpu,
            )
            .and_then(|t| t.dequantize(&candle_core::Device::Cpu))
            .and_then(|t| t.to_vec1::<f32>())
            .expect("candle reads the blocks");
            prop_assert_eq!(ours.len(), theirs.len());
            for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                prop_assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{} element {}: {} vs {}", kind, i, a, b);
            }
        }

        #[test]
        fn q4_0_runs_as_q4_1_unchanged(seed in any::<u64>(), blocks in 1usize..8) {
            let q = random_qmat(QKind::Q4_0, 3, blocks * 32, seed);
            let as41 = q.q4_0_as_q4_1().expect("finite scales");
            prop_assert_eq!(as41.kind, QKind::Q4_1);
            prop_assert_eq!(q.to_f32(), as41.to_f32());
        }
    }

    #[test]
    fn column_slices_keep_whole_blocks() {
        let mut data = Vec::new();
        for b in 0..4u8 {
            data.extend_from_slice(&f16::from_f32(0.5).to_le_bytes());
            data.extend_from_slice(&f16::from_f32(-1.0).to_le_bytes());
            data.extend(std::iter::repeat_n(b * 17, 16));
        }
        let w = QMat {
            kind: QKind::Q4_1,
            rows: 1,
            cols: 128,
            data,
        };
        let mut full = vec![0f32; 128];
        w.dequantize_row(0, &mut full);
        let part = w.slice_cols(32, 96).expect("block aligned");
        let mut p = vec![0f32; 64];
        part.dequantize_row(0, &mut p);
        assert_eq!(&full[32..96], &p[..]);
        assert!(
            w.slice_cols(16, 96).is_none(),
            "unaligned column ranges are refused"
        );
    }
}
