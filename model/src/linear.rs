//! A linear layer that can hold its weight in two formats: dense f32 for
//! prefill (compute-bound, one GEMM per chunk) and quantized blocks for decode
//! (memory-bound, matrix-vector). Which one runs is the caller's choice, made
//! per phase so that every layout computes a phase the same way.

use crate::error::Result;
use crate::gemm::{sgemm, Strides};
use crate::qmatmul::PackedMat;
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
            RawTensor::Quant(q) => (
                formats.dense.then(|| q.to_f32()),
                formats.quant.then(|| PackedMat::pack(&q)),
            ),
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
