//! Reading tensors out of a model file: GGUF (quantized or not) and the
//! Hugging Face layout (safetensors). Everything above this module sees a
//! [`RawTensor`], either f32 or one of the quantized formats Tandem has
//! kernels for ([`QKind`]); other GGUF types (IQ*, TQ*, BF16, F16) are
//! dequantized to f32 on load.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::{DType, Device};

use crate::error::{ModelError, Result};
use crate::quant::{QKind, QMat};

/// One tensor as read from disk, 2-D tensors as `[rows, cols]` row-major.
#[derive(Debug, Clone)]
pub enum RawTensor {
    F32 {
        shape: Vec<usize>,
        data: Vec<f32>,
    },
    Quant(QMat),
    /// Quantized matrices of different formats stacked row-wise (Q, K and V
    /// of a mixed file such as Q4_K_M), each kept in its own format.
    QuantRows(Vec<QMat>),
}

/// The quantized format Tandem keeps a GGUF type in, if any.
pub fn qkind(t: GgmlDType) -> Option<QKind> {
    Some(match t {
        GgmlDType::Q4_0 => QKind::Q4_0,
        GgmlDType::Q4_1 => QKind::Q4_1,
        GgmlDType::Q5_0 => QKind::Q5_0,
        GgmlDType::Q5_1 => QKind::Q5_1,
        GgmlDType::Q8_0 => QKind::Q8_0,
        GgmlDType::Q2K => QKind::Q2_K,
        GgmlDType::Q3K => QKind::Q3_K,
        GgmlDType::Q4K => QKind::Q4_K,
        GgmlDType::Q5K => QKind::Q5_K,
        GgmlDType::Q6K => QKind::Q6_K,
        _ => return None,
    })
}

impl RawTensor {
    pub fn shape(&self) -> Vec<usize> {
        match self {
            RawTensor::F32 { shape, .. } => shape.clone(),
            RawTensor::Quant(q) => vec![q.rows, q.cols],
            RawTensor::QuantRows(qs) => vec![qs.iter().map(|q| q.rows).sum(), qs[0].cols],
        }
    }
}

pub(crate) enum TensorSource {
    Gguf {
        path: PathBuf,
        content: gguf_file::Content,
    },
    Safetensors {
        path: PathBuf,
        tensors: candle_core::safetensors::MmapedSafetensors,
    },
}

impl TensorSource {
    pub fn open_gguf(path: &Path) -> Result<(Self, HashMap<String, gguf_file::Value>)> {
        let mut file = File::open(path).map_err(|err| ModelError::Io {
            path: path.to_path_buf(),
            err,
        })?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| ModelError::malformed(path, format!("not a readable GGUF file ({e})")))?;
        let metadata = content.metadata.clone();
        Ok((
            TensorSource::Gguf {
                path: path.to_path_buf(),
                content,
            },
            metadata,
        ))
    }

    pub fn open_safetensors(dir: &Path, files: &[PathBuf]) -> Result<Self> {
        // SAFETY: the files are memory-mapped read-only; Tandem never writes
        // them and documents that model files must not change while loaded.
        let tensors = unsafe { candle_core::safetensors::MmapedSafetensors::multi(files) }
            .map_err(|e| ModelError::malformed(dir, format!("cannot map safetensors ({e})")))?;
        Ok(TensorSource::Safetensors {
            path: dir.to_path_buf(),
            tensors,
        })
    }

    fn path(&self) -> &Path {
        match self {
            TensorSource::Gguf { path, .. } | TensorSource::Safetensors { path, .. } => path,
        }
    }

    /// Every tensor's name, stored type and shape, in file order for GGUF
    /// (sorted by name for safetensors).
    pub fn tensors(&self) -> Vec<(String, String, Vec<usize>, Option<QKind>)> {
        match self {
            TensorSource::Gguf { content, .. } => {
                let mut v: Vec<_> = content
                    .tensor_infos
                    .iter()
                    .map(|(name, info)| {
                        (
                            info.offset,
                            name.clone(),
                            format!("{:?}", info.ggml_dtype),
                            info.shape.dims().to_vec(),
                            qkind(info.ggml_dtype),
                        )
                    })
                    .collect();
                v.sort_by_key(|t| t.0);
                v.into_iter().map(|(_, n, t, s, k)| (n, t, s, k)).collect()
            }
            TensorSource::Safetensors { tensors, .. } => {
                let mut v: Vec<_> = tensors
                    .tensors()
                    .into_iter()
                    .map(|(name, view)| {
                        (
                            name,
                            format!("{:?}", view.dtype()),
                            view.shape().to_vec(),
                            None,
                        )
                    })
                    .collect();
                v.sort_by(|a, b| a.0.cmp(&b.0));
                v
            }
        }
    }

    pub fn has(&self, name: &str) -> bool {
        match self {
            TensorSource::Gguf { content, .. } => content.tensor_infos.contains_key(name),
            TensorSource::Safetensors { tensors, .. } => tensors.get(name).is_ok(),
        }
    }

    /// Loads a tensor, keeping data in a [`QKind`] format as it is stored
    /// when `keep_quant` is set; everything else becomes f32.
    pub fn load(&self, name: &str, keep_quant: bool) -> Result<RawTensor> {
        match self {
            TensorSource::Gguf { path, content } => {
                let info = content.tensor_infos.get(name).ok_or_else(|| {
                    ModelError::malformed(path, format!("tensor {name} is missing"))
                })?;
                let dims = info.shape.dims().to_vec();
                let kind = qkind(info.ggml_dtype);
                // A 3-D stack of expert matrices is kept as one matrix of
                // every expert's rows.
                if let (true, Some(kind), 2 | 3) = (keep_quant, kind, dims.len()) {
                    let (rows, cols) = (
                        dims[..dims.len() - 1].iter().product(),
                        dims[dims.len() - 1],
                    );
                    if cols % kind.block_elems() != 0 {
                        return Err(ModelError::malformed(
                            path,
                            format!(
                                "tensor {name}: {cols} columns is not a whole number of blocks"
                            ),
                        ));
                    }
                    let size = rows * cols / kind.block_elems() * kind.block_bytes();
                    let data = read_at(path, content.tensor_data_offset + info.offset, size)
                        .map_err(|reason| {
                            ModelError::malformed(path, format!("tensor {name}: {reason}"))
                        })?;
                    return Ok(RawTensor::Quant(QMat {
                        kind,
                        rows,
                        cols,
                        data,
                    }));
                }
                let mut file = File::open(path).map_err(|err| ModelError::Io {
                    path: path.clone(),
                    err,
                })?;
                let q = info
                    .read(&mut file, content.tensor_data_offset, &Device::Cpu)
                    .map_err(|e| ModelError::malformed(path, format!("tensor {name}: {e}")))?;
                let t = q
                    .dequantize(&Device::Cpu)
                    .and_then(|t| t.flatten_all())
                    .and_then(|t| t.to_vec1::<f32>())
                    .map_err(|e| ModelError::malformed(path, format!("tensor {name}: {e}")))?;
                Ok(RawTensor::F32 {
                    shape: dims,
                    data: t,
                })
            }
            TensorSource::Safetensors { path, tensors } => {
                let t = tensors
                    .load(name, &Device::Cpu)
                    .map_err(|e| ModelError::malformed(path, format!("tensor {name}: {e}")))?;
                let shape = t.dims().to_vec();
                let data = t
                    .to_dtype(DType::F32)
                    .and_then(|t| t.flatten_all())
                    .and_then(|t| t.to_vec1::<f32>())
                    .map_err(|e| ModelError::malformed(path, format!("tensor {name}: {e}")))?;
                Ok(RawTensor::F32 { shape, data })
            }
        }
    }

    /// The stored shape of a tensor, row-major (`None` if it is missing).
    fn dims(&self, name: &str) -> Option<Vec<usize>> {
        match self {
            TensorSource::Gguf { content, .. } => content
                .tensor_infos
                .get(name)
                .map(|i| i.shape.dims().to_vec()),
            TensorSource::Safetensors { tensors, .. } => {
                tensors.get(name).ok().map(|v| v.shape().to_vec())
            }
        }
    }

    /// Loads a 3-D stack of `[experts, rows, cols]` expert matrices as one
    /// `[experts * rows, cols]` matrix of every expert's rows, in expert
    /// order (kept quantized when `keep_quant`), after checking the stored
    /// shape.
    pub fn load_stack(&self, name: &str, stack: [usize; 3], keep_quant: bool) -> Result<RawTensor> {
        let dims = self.dims(name).ok_or_else(|| {
            ModelError::malformed(self.path(), format!("tensor {name} is missing"))
        })?;
        if dims != stack {
            return Err(ModelError::malformed(
                self.path(),
                format!("tensor {name} has shape {dims:?}, expected {stack:?}"),
            ));
        }
        let [experts, rows, cols] = stack;
        Ok(match self.load(name, keep_quant)? {
            RawTensor::F32 { data, .. } => RawTensor::F32 {
                shape: vec![experts * rows, cols],
                data,
            },
            other => other,
        })
    }

    /// Loads a tensor and checks its shape.
    pub fn load_shaped(&self, name: &str, shape: &[usize], keep_quant: bool) -> Result<RawTensor> {
        let t = self.load(name, keep_quant)?;
        if t.shape() != shape {
            return Err(ModelError::malformed(
                self.path(),
                format!(
                    "tensor {name} has shape {:?}, expected {:?}",
                    t.shape(),
                    shape
                ),
            ));
        }
        Ok(t)
    }
}

fn read_at(path: &Path, offset: u64, size: usize) -> std::result::Result<Vec<u8>, String> {
    let mut f = File::open(path).map_err(|e| e.to_string())?;
    let len = f.seek(SeekFrom::End(0)).map_err(|e| e.to_string())?;
    if offset.saturating_add(size as u64) > len {
        return Err(format!(
            "needs {size} bytes at offset {offset}, the file has {len}"
        ));
    }
    f.seek(SeekFrom::Start(offset)).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; size];
    f.read_exact(&mut buf).map_err(|e| e.to_string())?;
    Ok(buf)
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
            RawTensor::Quant(q) => RawTensor::Quant(q.slice_rows(r0, r1)),
            RawTensor::QuantRows(qs) => {
                let mut parts = Vec::new();
                let mut at = 0;
                for q in qs {
                    let (lo, hi) = (r0.max(at), r1.min(at + q.rows));
                    if lo < hi {
                        parts.push(RawTensor::Quant(q.slice_rows(lo - at, hi - at)));
                    }
                    at += q.rows;
                }
                RawTensor::concat_rows(parts)
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
            RawTensor::Quant(q) => match q.slice_cols(c0, c1) {
                Some(q) => RawTensor::Quant(q),
                None => RawTensor::F32 {
                    shape: vec![q.rows, q.cols],
                    data: q.to_f32(),
                }
                .slice_cols(c0, c1),
            },
            RawTensor::QuantRows(qs) => RawTensor::concat_rows(
                qs.iter()
                    .map(|q| RawTensor::Quant(q.clone()).slice_cols(c0, c1))
                    .collect(),
            ),
        }
    }

    /// Stacks 2-D tensors with equal column counts, keeping quantized blocks
    /// when every part is quantized (in one matrix when they share a format).
    pub fn concat_rows(parts: Vec<RawTensor>) -> RawTensor {
        let quant: Option<Vec<QMat>> = parts.iter().try_fold(Vec::new(), |mut acc, p| {
            match p {
                RawTensor::Quant(q) => acc.push(q.clone()),
                RawTensor::QuantRows(qs) => acc.extend(qs.iter().cloned()),
                RawTensor::F32 { .. } => return None,
            }
            Some(acc)
        });
        if let Some(qs) = quant {
            // Neighbours of one format merge; the rest stay separate parts.
            let mut merged: Vec<QMat> = Vec::new();
            for q in qs {
                match merged.last_mut() {
                    Some(last) if last.kind == q.kind && last.cols == q.cols => {
                        last.data.extend_from_slice(&q.data);
                        last.rows += q.rows;
                    }
                    _ => merged.push(q),
                }
            }
            return if merged.len() == 1 {
                RawTensor::Quant(merged.remove(0))
            } else {
                RawTensor::QuantRows(merged)
            };
        }
        let cols = parts[0].shape()[1];
        let mut rows = 0;
        let mut data = Vec::new();
        for p in parts {
            rows += p.shape()[0];
            data.extend(p.f32_data());
        }
        RawTensor::F32 {
            shape: vec![rows, cols],
            data,
        }
    }

    /// The values as f32, dequantizing if needed.
    pub fn f32_data(self) -> Vec<f32> {
        match self {
            RawTensor::F32 { data, .. } => data,
            RawTensor::Quant(q) => q.to_f32(),
            RawTensor::QuantRows(qs) => qs.iter().flat_map(QMat::to_f32).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::tests::random_qmat;

    /// Row blocks of different formats stay separate parts through
    /// concatenation and slicing, and mean the same numbers as the f32 rows.
    #[test]
    fn mixed_formats_stack_and_slice_like_their_rows() {
        let (a, b) = (
            random_qmat(QKind::Q5_0, 3, 256, 1),
            random_qmat(QKind::Q6_K, 4, 256, 2),
        );
        let dense: Vec<f32> = a.to_f32().into_iter().chain(b.to_f32()).collect();
        let stack = RawTensor::concat_rows(vec![RawTensor::Quant(a), RawTensor::Quant(b)]);
        assert!(matches!(&stack, RawTensor::QuantRows(p) if p.len() == 2));
        assert_eq!(stack.shape(), vec![7, 256]);
        let rows = stack.slice_rows(2, 5);
        assert!(matches!(&rows, RawTensor::QuantRows(p) if p.len() == 2));
        assert_eq!(rows.clone().f32_data(), dense[2 * 256..5 * 256].to_vec());
        let cols = stack.slice_cols(0, 256);
        assert!(matches!(&cols, RawTensor::QuantRows(_)));
        assert_eq!(cols.f32_data(), dense);
        // One format left after slicing: a single matrix again.
        assert!(matches!(stack.slice_rows(3, 7), RawTensor::Quant(q) if q.kind == QKind::Q6_K));
    }
}
