//! Quantized weights as GGUF stores them: block formats, slicing for
//! tensor-parallel shards, dequantization. [`crate::qmatmul`] repacks them
//! for the decode kernels.

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

#[cfg(test)]
mod tests {
    use super::*;

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
