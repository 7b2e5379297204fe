//! Quantized weights as GGUF stores them: block formats, slicing for
//! tensor-parallel shards, dequantization. [`crate::qmatmul`] repacks them
//! for the decode kernels.

use half::f16;
use rayon::prelude::*;

/// GGUF block formats Tandem runs decode on without dequantizing.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantizes one row (whole blocks) into `out`.
pub fn dequantize_row(kind: QKind, row: &[u8], out: &mut [f32]) {
    dequantize_row_inline(kind, row, out)
}

/// The same, inlined into its caller so that a caller compiled for wider
/// vector units gets a vectorized copy (the decode kernels do).
#[inline(always)]
pub(crate) fn dequantize_row_inline(kind: QKind, row: &[u8], out: &mut [f32]) {
    // One loop per format, so that each is compiled (and vectorized) on its own.
    fn each<const BB: usize, const BE: usize>(
        row: &[u8],
        out: &mut [f32],
        f: impl Fn(&[u8; BB], &mut [f32; BE]),
    ) {
        for (blk, o) in row.chunks_exact(BB).zip(out.chunks_exact_mut(BE)) {
            f(
                blk.try_into().expect("whole blocks"),
                o.try_into().expect("whole blocks"),
            );
        }
    }
    match kind {
        QKind::Q4_0 => each::<18, 32>(row, out, |b, o| {
            let d = f16_at(b, 0);
            q4(b, 2, d, -8.0 * d, o)
        }),
        QKind::Q4_1 => each::<20, 32>(row, out, |b, o| q4(b, 4, f16_at(b, 0), f16_at(b, 2), o)),
        QKind::Q5_0 => each::<22, 32>(row, out, |b, o| {
            let d = f16_at(b, 0);
            q5(b, 2, d, -16.0 * d, o)
        }),
        QKind::Q5_1 => each::<24, 32>(row, out, |b, o| q5(b, 4, f16_at(b, 0), f16_at(b, 2), o)),
        QKind::Q8_0 => each::<34, 32>(row, out, |b, o| {
            let d = f16_at(b, 0);
            for j in 0..32 {
                o[j] = d * (b[2 + j] as i8) as f32;
            }
        }),
        QKind::Q2_K => each::<84, 256>(row, out, q2k),
        QKind::Q3_K => each::<110, 256>(row, out, q3k),
        QKind::Q4_K => each::<144, 256>(row, out, |b, o| q45k(b, false, o)),
        QKind::Q5_K => each::<176, 256>(row, out, |b, o| q45k(b, true, o)),
        QKind::Q6_K => each::<210, 256>(row, out, q6k),
    }
}

/// 32 four-bit values from byte `at`: low nibbles first, then high.
#[inline(always)]
fn q4(blk: &[u8], at: usize, d: f32, m: f32, o: &mut [f32; 32]) {
    let qs: &[u8; 16] = blk[at..at + 16].try_into().expect("block size");
    for j in 0..16 {
        o[j] = d * (qs[j] & 0x0F) as f32 + m;
        o[j + 16] = d * (qs[j] >> 4) as f32 + m;
    }
}

/// 32 five-bit values: a 32-bit word of fifth bits at `at`, nibbles after it.
#[inline(always)]
fn q5(blk: &[u8], at: usize, d: f32, m: f32, o: &mut [f32; 32]) {
    let qh = u32::from_le_bytes(blk[at..at + 4].try_into().expect("block size"));
    let qs: &[u8; 16] = blk[at + 4..at + 20].try_into().expect("block size");
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        o[j] = d * ((qs[j] & 0x0F) as u32 | h0) as f32 + m;
        o[j + 16] = d * ((qs[j] >> 4) as u32 | h1) as f32 + m;
    }
}

/// Layout: scales[16] (low nibble scale, high nibble minimum), qs[64], d, dmin.
#[inline(always)]
fn q2k(blk: &[u8; 84], o: &mut [f32; 256]) {
    let (d, dmin) = (f16_at(blk, 80), f16_at(blk, 82));
    for half in 0..2 {
        let qs = &blk[16 + 32 * half..16 + 32 * half + 32];
        for j in 0..4 {
            for g in 0..2 {
                let sc = blk[half * 8 + j * 2 + g];
                let (dl, ml) = (d * (sc & 0x0F) as f32, dmin * (sc >> 4) as f32);
                let o = &mut o[half * 128 + j * 32 + g * 16..][..16];
                for l in 0..16 {
                    o[l] = dl * ((qs[g * 16 + l] >> (2 * j)) & 3) as f32 - ml;
                }
            }
        }
    }
}

/// Layout: hmask[32], qs[64], scales[12] (sixteen 6-bit scales), d.
#[inline(always)]
fn q3k(blk: &[u8; 110], o: &mut [f32; 256]) {
    let d = f16_at(blk, 108);
    let s = &blk[96..108];
    let mut scales = [0i32; 16];
    for (i, sc) in scales.iter_mut().enumerate() {
        let low = if i < 8 { s[i] & 0x0F } else { s[i - 8] >> 4 };
        let high = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
        *sc = (low | (high << 4)) as i32 - 32;
    }
    let hmask = &blk[0..32];
    for half in 0..2 {
        let qs = &blk[32 + 32 * half..32 + 32 * half + 32];
        for j in 0..4 {
            let bit = 1u8 << (half * 4 + j);
            for g in 0..2 {
                let dl = d * scales[half * 8 + j * 2 + g] as f32;
                let o = &mut o[half * 128 + j * 32 + g * 16..][..16];
                for l in 0..16 {
                    let q = ((qs[g * 16 + l] >> (2 * j)) & 3) as i32;
                    let hi = if hmask[g * 16 + l] & bit != 0 { 0 } else { 4 };
                    o[l] = dl * (q - hi) as f32;
                }
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
fn q45k(blk: &[u8], five: bool, o: &mut [f32; 256]) {
    let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
    let s = &blk[4..16];
    let (qh, qs) = if five {
        (&blk[16..48], &blk[48..176])
    } else {
        (&blk[0..0], &blk[16..144])
    };
    for pair in 0..4 {
        let q: &[u8; 32] = qs[pair * 32..pair * 32 + 32]
            .try_into()
            .expect("block size");
        for (g, shift) in [(0, 0), (1, 4)] {
            let (sc, m) = scale_min_k4(pair * 2 + g, s);
            let (dl, ml) = (d * sc as f32, dmin * m as f32);
            let o = &mut o[pair * 64 + g * 32..][..32];
            let bit = 1u8 << (pair * 2 + g);
            for l in 0..32 {
                let mut v = (q[l] >> shift) & 0x0F;
                if five && qh[l] & bit != 0 {
                    v += 16;
                }
                o[l] = dl * v as f32 - ml;
            }
        }
    }
}

/// Layout: ql[128], qh[64], scales[16] (signed), d.
#[inline(always)]
fn q6k(blk: &[u8; 210], o: &mut [f32; 256]) {
    let d = f16_at(blk, 208);
    for half in 0..2 {
        let ql = &blk[half * 64..half * 64 + 64];
        let qh = &blk[128 + half * 32..128 + half * 32 + 32];
        let sc = &blk[192 + half * 8..192 + half * 8 + 8];
        let o = &mut o[half * 128..half * 128 + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            o[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            o[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            o[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            o[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
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
