//! A linear layer that can hold its weight in two formats: dense f32 for
//! prefill (compute-bound, one GEMM per chunk) and quantized blocks for decode
//! (memory-bound, matrix-vector). Which one runs is the caller's choice, made
//! per phase so that every layout computes a phase the same way.

use rayon::prelude::*;

use crate::error::Result;
use crate::gemm::{sgemm, Strides};
use crate::qlanes::LaneMat;
use crate::qmatmul::PackedMat;
use crate::qrows::{Activations, RowMat};
use crate::quant::{QKind, QMat};
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
    quant: Option<QWeight>,
    bias: Option<Vec<f32>>,
}

/// A quantized weight for decode: row ranges, each in its own format and kernel.
#[derive(Debug)]
struct QWeight {
    parts: Vec<QPart>,
}

#[derive(Debug)]
enum QPart {
    /// Q4_1 and Q8_0 (and Q4_0 rewritten as Q4_1) with f32 activations:
    /// repacked scales.
    Packed(PackedMat),
    /// The same formats with 8-bit activations: one block per vector lane.
    Lanes(LaneMat),
    /// Every other format, blocks as stored.
    Rows(RowMat),
}

/// Whether decode multiplies a weight of format `kind` with 8-bit
/// activations ([`crate::qrows::activations`]), on a CPU with VNNI.
///
/// `exact`: every layout computes this weight's input bit for bit as the
/// whole model does (the layers of a dense model, whose tensor-parallel
/// sums are [`ColumnPieces`]; the LM head, whose logits feed only
/// sampling). Q4_0, Q4_1 and Q8_0 quantize activations only with
/// [`Activations::Int8`] and only there: a mixture of experts all-reduces
/// its expert sums, so a last-bit difference between layouts could step an
/// 8-bit activation and the steps compound.
/// Whether a model's layer weights get exact inputs in every layout: a
/// dense model's do (column pieces); a mixture of experts all-reduces.
pub fn exact_layers(cfg: &crate::config::ModelConfig) -> bool {
    cfg.moe.is_none()
}

pub fn int8_decode(kind: QKind, exact: bool) -> bool {
    match kind {
        QKind::Q4_0 | QKind::Q4_1 | QKind::Q8_0 => {
            exact && crate::qrows::activations() == Activations::Int8
        }
        _ => crate::qrows::int8_activations(),
    }
}

impl QPart {
    fn new(q: &QMat, exact: bool) -> QPart {
        if int8_decode(q.kind, exact) && crate::qlanes::available() {
            if let Some(l) = LaneMat::pack(q) {
                return QPart::Lanes(l);
            }
        }
        match q.kind {
            QKind::Q4_1 | QKind::Q8_0 => QPart::Packed(PackedMat::pack(q)),
            QKind::Q4_0 => match q.q4_0_as_q4_1() {
                Some(q41) => QPart::Packed(PackedMat::pack(&q41)),
                None => QPart::Rows(RowMat::new(q)),
            },
            _ => QPart::Rows(RowMat::new(q)),
        }
    }

    fn rows(&self) -> usize {
        match self {
            QPart::Packed(p) => p.rows,
            QPart::Lanes(l) => l.rows,
            QPart::Rows(r) => r.rows,
        }
    }

    /// The format its kernel runs (Q4_1 for Q4_0 rewritten as Q4_1).
    fn kind(&self) -> QKind {
        match self {
            QPart::Packed(p) => p.kind,
            QPart::Lanes(l) => l.kind,
            QPart::Rows(r) => r.kind,
        }
    }

    fn matmul(&self, x: &[f32], t: usize, out: &mut [f32]) {
        match self {
            QPart::Packed(p) => p.matmul(x, t, out),
            QPart::Lanes(l) => l.matmul(x, t, out),
            QPart::Rows(r) => r.matmul(x, t, out),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            QPart::Packed(p) => p.bytes(),
            QPart::Lanes(l) => l.bytes(),
            QPart::Rows(r) => r.bytes(),
        }
    }
}

impl QWeight {
    fn new(parts: &[QMat], exact: bool) -> QWeight {
        QWeight {
            parts: parts.iter().map(|q| QPart::new(q, exact)).collect(),
        }
    }

    /// `x` is `[t, cols]`, `out` is `[t, rows]`.
    fn matmul(&self, x: &[f32], t: usize, out: &mut [f32]) {
        if let [one] = &self.parts[..] {
            return one.matmul(x, t, out);
        }
        let rows = out.len() / t;
        let mut r0 = 0;
        for p in &self.parts {
            let n = p.rows();
            let mut part = vec![0f32; t * n];
            p.matmul(x, t, &mut part);
            for (o, s) in out.chunks_exact_mut(rows).zip(part.chunks_exact(n)) {
                o[r0..r0 + n].copy_from_slice(s);
            }
            r0 += n;
        }
    }

    fn bytes(&self) -> usize {
        self.parts.iter().map(QPart::bytes).sum()
    }
}

impl Linear {
    /// A weight whose input may differ between layouts by rounding.
    pub fn new(raw: RawTensor, bias: Option<Vec<f32>>, formats: Formats) -> Result<Linear> {
        Self::build(raw, bias, formats, false)
    }

    /// The LM head: quantized in every phase (dense only when the file has
    /// no quantized form); its logits feed only sampling.
    pub fn head(raw: RawTensor) -> Result<Linear> {
        Self::build(raw, None, Formats::DECODE, true)
    }

    /// `exact`: every layout computes this weight's input bit for bit as the
    /// whole model does, so decode may quantize it in any format
    /// ([`int8_decode`]).
    pub fn build(
        raw: RawTensor,
        bias: Option<Vec<f32>>,
        formats: Formats,
        exact: bool,
    ) -> Result<Linear> {
        let shape = raw.shape();
        let (rows, cols) = (shape[0], shape[1]);
        let (dense_data, quant) = match raw {
            RawTensor::F32 { data, .. } => (Some(data), None),
            RawTensor::Quant(q) => (
                formats.dense.then(|| q.to_f32()),
                formats
                    .quant
                    .then(|| QWeight::new(std::slice::from_ref(&q), exact)),
            ),
            RawTensor::QuantRows(qs) => (
                formats
                    .dense
                    .then(|| qs.iter().flat_map(QMat::to_f32).collect()),
                formats.quant.then(|| QWeight::new(&qs, exact)),
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

    /// The formats decode's kernels run this weight in, one per row part;
    /// `None` when it has no quantized form (decode then runs dense f32).
    pub fn quant_kinds(&self) -> Option<Vec<QKind>> {
        self.quant
            .as_ref()
            .map(|q| q.parts.iter().map(QPart::kind).collect())
    }

    pub fn weight_bytes(&self) -> usize {
        self.dense.as_ref().map_or(0, |d| d.len() * 4)
            + self.quant.as_ref().map_or(0, QWeight::bytes)
    }
}

/// A weight whose input columns tensor parallelism splits (the attention
/// output and the MLP's down projection), held as equal column pieces: the
/// model's finest tensor-parallel shards. Each piece's product is computed
/// on its own and every piece of the group is summed in one fixed order
/// ([`crate::comm::sum_pieces`]), so a rank computes its pieces bit for bit
/// as the whole model does and the group's sum is the whole model's: every
/// tensor-parallel layout gives the same bits, not just the same values to
/// rounding. That exactness is also what lets 8-bit activations run in
/// every layout, as a rounding difference can no longer move one by a step.
#[derive(Debug)]
pub struct ColumnPieces {
    pub pieces: Vec<Linear>,
}

impl ColumnPieces {
    /// `raw`'s columns in `n` pieces, or in one where `n` pieces would cut
    /// its quantized blocks (which would dequantize them). `exact` as for
    /// [`Linear::build`].
    pub fn new(raw: RawTensor, n: usize, formats: Formats, exact: bool) -> Result<ColumnPieces> {
        let linear = |raw| Linear::build(raw, None, formats, exact);
        let cols = raw.shape()[1];
        let aligned = |w: usize| match &raw {
            RawTensor::F32 { .. } => true,
            RawTensor::Quant(q) => w.is_multiple_of(q.kind.block_elems()),
            RawTensor::QuantRows(qs) => qs.iter().all(|q| w.is_multiple_of(q.kind.block_elems())),
        };
        if n <= 1 || !cols.is_multiple_of(n) || !aligned(cols / n) {
            return Ok(ColumnPieces {
                pieces: vec![linear(raw)?],
            });
        }
        let w = cols / n;
        let pieces = (0..n)
            .map(|p| linear(raw.slice_cols(p * w, (p + 1) * w)))
            .collect::<Result<_>>()?;
        Ok(ColumnPieces { pieces })
    }

    /// Each piece's product, `[pieces][t, rows]`, for `x` of `[t, cols]`.
    pub fn forward(&self, x: &[f32], t: usize, fmt: Format) -> Result<Vec<Vec<f32>>> {
        if let [one] = &self.pieces[..] {
            return Ok(vec![one.forward(x, t, fmt)?]);
        }
        let w = self.pieces[0].cols;
        let cols = w * self.pieces.len();
        self.pieces
            .iter()
            .enumerate()
            .map(|(p, l)| {
                let mut xp = Vec::with_capacity(t * w);
                for row in x.chunks_exact(cols) {
                    xp.extend_from_slice(&row[p * w..(p + 1) * w]);
                }
                l.forward(&xp, t, fmt)
            })
            .collect()
    }
}

/// `down(silu(gate(x)) * up(x))` for `t` rows of `x`, as `down`'s column
/// pieces; `width` is the FFN's (shard's) intermediate size.
pub(crate) fn swiglu_pieces(
    gate_up: &Linear,
    down: &ColumnPieces,
    x: &[f32],
    t: usize,
    width: usize,
    fmt: Format,
) -> Result<Vec<Vec<f32>>> {
    let act = swiglu_act(gate_up, x, t, width, fmt)?;
    down.forward(&act, t, fmt)
}

/// `silu(gate(x)) * up(x)`.
fn swiglu_act(
    gate_up: &Linear,
    x: &[f32],
    t: usize,
    width: usize,
    fmt: Format,
) -> Result<Vec<f32>> {
    let gu = gate_up.forward(x, t, fmt)?;
    let mut act = vec![0f32; t * width];
    act.par_chunks_mut(width)
        .zip(gu.par_chunks(2 * width))
        .for_each(|(a, gu)| {
            let (g, u) = gu.split_at(width);
            crate::vmath::silu_mul(a, g, u);
        });
    Ok(act)
}

/// `down(silu(gate(x)) * up(x))` for `t` rows of `x`; `width` is the
/// FFN's (shard's) intermediate size.
pub(crate) fn swiglu(
    gate_up: &Linear,
    down: &Linear,
    x: &[f32],
    t: usize,
    width: usize,
    fmt: Format,
) -> Result<Vec<f32>> {
    let act = swiglu_act(gate_up, x, t, width, fmt)?;
    down.forward(&act, t, fmt)
}
