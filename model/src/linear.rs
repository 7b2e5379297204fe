//! A linear layer that can hold its weight in two formats: dense f32 for
//! prefill (compute-bound, one GEMM per chunk) and quantized blocks for decode
//! (memory-bound, matrix-vector). Which one runs is the caller's choice, made
//! per phase so that every layout computes a phase the same way.

use crate::error::Result;
use crate::gemm::{sgemm, Strides};
use crate::qmatmul::PackedMat;
use crate::quant::QMat;
use crate::source::RawTensor;

/// Which weight representation a forward pass uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Dense,
    Quant,
}

/// Which representations a loaded slice keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Formats {
    pub dense: bool,
    pub quant: bool,
}

impl Formats {
    /// What a prefill node needs.
    pub const PREFILL: Formats = Formats {
        dense: true,
        quant: false,
    };
    /// What a decode node needs.
    pub const DECODE: Formats = Formats {
        dense: false,
        quant: true,
    };
    /// Both: the single-process reference path runs both phases.
    pub const BOTH: Formats = Formats {
        dense: true,
        quant: true,
    };
}

#[derive(Debug)]
pub struct Linear {
    pub rows: usize,
    pub cols: usize,
    /// Row-major `[rows, cols]` f32 weight.
    dense: Option<Vec<f32>>,
    quant: Option<PackedMat>,
    bias: Option<Vec<f32>>,
}

impl Linear {
    pub fn new(raw: RawTensor, bias: Option<Vec<f32>>, formats: Formats) -> Result<Linear> {
        let shape = raw.shape();
        let (rows, cols) = (shape[0], shape[1]);
        let (dense_data, quant) = match raw {
            RawTensor::F32 { data, .. } => (Some(data), None),
            RawTensor::Quant {
                kind,
                rows,
                cols,
                data,
            } => {
                let q = QMat {
                    kind,
                    rows,
                    cols,
                    data,
                };
                let dense = formats.dense.then(|| q.to_f32());
                (dense, formats.quant.then(|| PackedMat::pack(&q)))
            }
        };
        // A weight with no quantized form keeps its dense form whatever was asked.
        let keep_dense = formats.dense || quant.is_none();
        let dense = dense_data.filter(|_| keep_dense);
        Ok(Linear {
            rows,
            cols,
            dense,
            quant,
            bias,
        })
    }

    /// `x` is `[t, cols]`; returns `[t, rows]`.
    pub fn forward(&self, x: &[f32], t: usize, format: Format) -> Result<Vec<f32>> {
        let mut out = match (format, &self.dense, &self.quant) {
            (Format::Quant, _, Some(q)) | (Format::Dense, None, Some(q)) => {
                let mut out = vec![0f32; t * self.rows];
                q.matmul(x, t, &mut out);
                out
            }
            (_, Some(w), _) => {
                let mut out = vec![0f32; t * self.rows];
                // x[t, cols] · wᵀ: element (c, r) of wᵀ is w[r * cols + c].
                sgemm(
                    t,
                    self.rows,
                    self.cols,
                    x,
                    Strides::row_major(self.cols),
                    w,
                    Strides::col_major(self.cols),
                    &mut out,
                    true,
                );
                out
            }
            (_, None, None) => unreachable!("a Linear always holds at least one weight format"),
        };
        if let Some(b) = &self.bias {
            for row in out.chunks_mut(self.rows) {
                for (o, b) in row.iter_mut().zip(b) {
                    *o += b;
                }
            }
        }
        Ok(out)
    }

    pub fn weight_bytes(&self) -> usize {
        self.dense.as_ref().map_or(0, |d| d.len() * 4)
            + self.quant.as_ref().map_or(0, PackedMat::bytes)
    }
}

/// Row and column slicing of raw tensors, for tensor-parallel shards.
impl RawTensor {
    pub fn slice_rows(&self, r0: usize, r1: usize) -> RawTensor {
        match self {
            RawTensor::F32 { shape, data } => {
                let cols: usize = shape[1..].iter().product();
                let mut s = shape.clone();
                s[0] = r1 - r0;
                RawTensor::F32 {
                    shape: s,
                    data: data[r0 * cols..r1 * cols].to_vec(),
                }
            }
            RawTensor::Quant {
                kind,
                rows,
                cols,
                data,
            } => {
                let q = QMat {
                    kind: *kind,
                    rows: *rows,
                    cols: *cols,
                    data: data.clone(),
                }
                .slice_rows(r0, r1);
                RawTensor::Quant {
                    kind: q.kind,
                    rows: q.rows,
                    cols: q.cols,
                    data: q.data,
                }
            }
        }
    }

    /// Columns `[c0, c1)` of a 2-D tensor. Quantized data stays quantized when
    /// the range falls on block boundaries, else it is dequantized.
    pub fn slice_cols(&self, c0: usize, c1: usize) -> RawTensor {
        match self {
            RawTensor::F32 { shape, data } => {
                let (rows, cols) = (shape[0], shape[1]);
                let mut out = Vec::with_capacity(rows * (c1 - c0));
                for r in 0..rows {
                    out.extend_from_slice(&data[r * cols + c0..r * cols + c1]);
                }
                RawTensor::F32 {
                    shape: vec![rows, c1 - c0],
                    data: out,
                }
            }
            RawTensor::Quant {
                kind,
                rows,
                cols,
                data,
            } => {
                let q = QMat {
                    kind: *kind,
                    rows: *rows,
                    cols: *cols,
                    data: data.clone(),
                };
                match q.slice_cols(c0, c1) {
                    Some(q) => RawTensor::Quant {
                        kind: q.kind,
                        rows: q.rows,
                        cols: q.cols,
                        data: q.data,
                    },
                    None => RawTensor::F32 {
                        shape: vec![*rows, *cols],
                        data: q.to_f32(),
                    }
                    .slice_cols(c0, c1),
                }
            }
        }
    }

    pub fn into_f32(self) -> RawTensor {
        match self {
            RawTensor::Quant {
                kind,
                rows,
                cols,
                data,
            } => {
                let q = QMat {
                    kind,
                    rows,
                    cols,
                    data,
                };
                RawTensor::F32 {
                    shape: vec![rows, cols],
                    data: q.to_f32(),
                }
            }
            f => f,
        }
    }

    /// Stacks 2-D tensors with equal column counts, keeping quantized blocks
    /// when every part shares one format.
    pub fn concat_rows(parts: Vec<RawTensor>) -> RawTensor {
        let same_quant = match &parts[0] {
            RawTensor::Quant { kind, .. } => parts
                .iter()
                .all(|p| matches!(p, RawTensor::Quant { kind: k, .. } if k == kind)),
            RawTensor::F32 { .. } => false,
        };
        if same_quant {
            let qs: Vec<QMat> = parts
                .into_iter()
                .map(|p| match p {
                    RawTensor::Quant {
                        kind,
                        rows,
                        cols,
                        data,
                    } => QMat {
                        kind,
                        rows,
                        cols,
                        data,
                    },
                    RawTensor::F32 { .. } => unreachable!("checked above: every part is quantized"),
                })
                .collect();
            let q = QMat::concat_rows(&qs);
            return RawTensor::Quant {
                kind: q.kind,
                rows: q.rows,
                cols: q.cols,
                data: q.data,
            };
        }
        let cols = parts[0].shape()[1];
        let mut rows = 0;
        let mut data = Vec::new();
        for p in parts {
            if let RawTensor::F32 { shape, data: d } = p.into_f32() {
                rows += shape[0];
                data.extend(d);
            }
        }
        RawTensor::F32 {
            shape: vec![rows, cols],
            data,
        }
    }

    pub fn f32_data(self) -> Vec<f32> {
        match self.into_f32() {
            RawTensor::F32 { data, .. } => data,
            RawTensor::Quant { .. } => unreachable!("into_f32 returns F32"),
        }
    }
}
