//! Reading tensors out of a model file: GGUF (quantized or not) and the
//! Hugging Face layout (safetensors). Everything above this module sees a
//! [`RawTensor`], either f32 or one of the quantized formats Tandem has
//! kernels for; other GGUF types are dequantized to f32 on load.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::{DType, Device};

use crate::error::{ModelError, Result};
use crate::quant::QKind;

/// One tensor as read from disk, 2-D tensors as `[rows, cols]` row-major.
#[derive(Debug, Clone)]
pub enum RawTensor {
    F32 {
        shape: Vec<usize>,
        data: Vec<f32>,
    },
    Quant {
        kind: QKind,
        rows: usize,
        cols: usize,
        data: Vec<u8>,
    },
}

impl RawTensor {
    pub fn shape(&self) -> Vec<usize> {
        match self {
            RawTensor::F32 { shape, .. } => shape.clone(),
            RawTensor::Quant { rows, cols, .. } => vec![*rows, *cols],
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

    pub fn has(&self, name: &str) -> bool {
        match self {
            TensorSource::Gguf { content, .. } => content.tensor_infos.contains_key(name),
            TensorSource::Safetensors { tensors, .. } => tensors.get(name).is_ok(),
        }
    }

    /// Loads a tensor, keeping Q4_1 and Q8_0 data as it is stored when
    /// `keep_quant` is set; everything else becomes f32.
    pub fn load(&self, name: &str, keep_quant: bool) -> Result<RawTensor> {
        match self {
            TensorSource::Gguf { path, content } => {
                let info = content.tensor_infos.get(name).ok_or_else(|| {
                    ModelError::malformed(path, format!("tensor {name} is missing"))
                })?;
                let dims = info.shape.dims().to_vec();
                let kind = match info.ggml_dtype {
                    GgmlDType::Q4_1 => Some(QKind::Q4_1),
                    GgmlDType::Q8_0 => Some(QKind::Q8_0),
                    _ => None,
                };
                if let (true, Some(kind), 2) = (keep_quant, kind, dims.len()) {
                    let (rows, cols) = (dims[0], dims[1]);
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
                    return Ok(RawTensor::Quant {
                        kind,
                        rows,
                        cols,
                        data,
                    });
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
