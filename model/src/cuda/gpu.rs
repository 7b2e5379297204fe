//! The device layer: memory, copies, kernel launches, GEMMs, events and
//! graphs on one GPU, behind one interface with two backends: the CUDA
//! driver through cudarc ([`super::real`]) and the emulator that runs the
//! same kernels on the CPU ([`super::emu`]).
//!
//! Device memory is addressed by raw 64-bit pointers ([`DevBuf`] owns an
//! allocation and frees it on drop). Every kernel launch is checked against
//! the kernel's signature as parsed from `kernels.cu`, so a launch with the
//! wrong number or kind of arguments is an error on every backend, not
//! garbage on the GPU.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use crate::device::Device;
use crate::error::{ModelError, Result};

/// The kernels' CUDA C source, compiled at run time.
pub const KERNELS: &str = include_str!("kernels.cu");

pub fn err(what: impl std::fmt::Display) -> ModelError {
    ModelError::Device(what.to_string())
}

/// One kernel argument.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arg {
    /// A device address (0 for a null pointer).
    Ptr(u64),
    I32(i32),
    I64(i64),
    F32(f32),
}

impl Arg {
    pub fn kind(&self) -> ArgKind {
        match self {
            Arg::Ptr(_) => ArgKind::Ptr,
            Arg::I32(_) => ArgKind::I32,
            Arg::I64(_) => ArgKind::I64,
            Arg::F32(_) => ArgKind::F32,
        }
    }

    /// The argument's bytes in the low end of a 64-bit slot (little-endian),
    /// as `cuLaunchKernel` and the emulator read them.
    pub fn bits(&self) -> u64 {
        match *self {
            Arg::Ptr(p) => p,
            Arg::I32(v) => v as u32 as u64,
            Arg::I64(v) => v as u64,
            Arg::F32(v) => v.to_bits() as u64,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgKind {
    Ptr,
    I32,
    I64,
    F32,
}

/// A kernel's parameters, parsed from its `extern "C" __global__` line.
#[derive(Debug, Clone)]
pub struct Signature {
    pub name: String,
    /// (C type as written, kind, parameter name)
    pub params: Vec<(String, ArgKind, String)>,
}

/// Every kernel in `src`: the `extern "C" __global__ void name(...)`
/// definitions, in order.
pub fn parse_signatures(src: &str) -> Result<Vec<Signature>> {
    let marker = "extern \"C\" __global__ void ";
    let mut out = Vec::new();
    let mut rest = src;
    while let Some(i) = rest.find(marker) {
        rest = &rest[i + marker.len()..];
        if let Some(after) = rest.strip_prefix("__launch_bounds__(") {
            let close = after
                .find(')')
                .ok_or_else(|| err("unterminated __launch_bounds__"))?;
            rest = after[close + 1..].trim_start();
        }
        let open = rest
            .find('(')
            .ok_or_else(|| err("a kernel without a parameter list"))?;
        let name = rest[..open].trim().to_string();
        let close = rest[open..]
            .find(')')
            .ok_or_else(|| err(format!("kernel {name}: unterminated parameter list")))?;
        let list = &rest[open + 1..open + close];
        let mut params = Vec::new();
        for p in list.split(',') {
            let p = p.split_whitespace().collect::<Vec<_>>().join(" ");
            let (ty, pname) = p
                .rsplit_once([' ', '*'])
                .ok_or_else(|| err(format!("kernel {name}: cannot read parameter {p:?}")))?;
            let ty = if p[..ty.len() + 1].ends_with('*') {
                format!("{}*", ty.trim())
            } else {
                ty.trim().to_string()
            };
            let ty = ty
                .replace("__restrict__", "")
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            let kind = if ty.contains('*') {
                ArgKind::Ptr
            } else {
                match ty.as_str() {
                    "int" => ArgKind::I32,
                    "i64" | "long long" => ArgKind::I64,
                    "float" => ArgKind::F32,
                    other => {
                        return Err(err(format!(
                            "kernel {name}: parameter {pname} has a type ({other}) launches cannot pass"
                        )))
                    }
                }
            };
            params.push((ty, kind, pname.trim().to_string()));
        }
        out.push(Signature { name, params });
    }
    Ok(out)
}

/// Element type of a GEMM operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    Bf16,
}

impl DType {
    pub fn bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::Bf16 => 2,
        }
    }
}

/// `C = alpha · op(A) · op(B) + beta · C` in cuBLAS's column-major terms
/// (`cublasGemmEx` with f32 compute): `op(A)` is `m × k`, `op(B)` `k × n`,
/// `C` `m × n` with leading dimension `ldc`.
#[derive(Debug, Clone, Copy)]
pub struct Gemm {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: u64,
    pub a_type: DType,
    pub lda: usize,
    pub b: u64,
    pub b_type: DType,
    pub ldb: usize,
    pub c: u64,
    pub c_type: DType,
    pub ldc: usize,
    pub alpha: f32,
    pub beta: f32,
}

impl Gemm {
    /// Row-major `y[t, rows] = x[t, cols] · W[rows, cols]ᵀ`, the projection
    /// every linear layer does: column-major, `yᵀ = Wᵀᵀ · xᵀ`, i.e.
    /// `cublasGemmEx(T, N, m = rows, n = t, k = cols, W, lda = cols, x,
    /// ldb = cols, y, ldc = rows)`.
    pub fn linear(
        w: u64,
        w_type: DType,
        rows: usize,
        cols: usize,
        x: u64,
        x_type: DType,
        t: usize,
        y: u64,
    ) -> Gemm {
        Gemm {
            trans_a: true,
            trans_b: false,
            m: rows,
            n: t,
            k: cols,
            a: w,
            a_type: w_type,
            lda: cols,
            b: x,
            b_type: x_type,
            ldb: cols,
            c: y,
            c_type: DType::F32,
            ldc: rows,
            alpha: 1.0,
            beta: 0.0,
        }
    }
}

/// What a backend offers for one device.
pub(crate) trait Backend: Send + Sync {
    fn describe(&self) -> String;
    fn alloc(&self, bytes: usize) -> Result<u64>;
    fn free(&self, ptr: u64);
    /// (free, total) bytes.
    fn mem_info(&self) -> Result<(usize, usize)>;
    fn stream(&self) -> Result<Box<dyn StreamOps>>;
    /// Whether several streams may run kernels of this device at once
    /// (the emulator runs each launch to completion on the caller).
    fn is_emulated(&self) -> bool;
}

/// Work queued on one stream, in order.
pub(crate) trait StreamOps: Send + Sync {
    fn htod(&self, dst: u64, src: &[u8]) -> Result<()>;
    /// Returns when the bytes are on the host.
    fn dtoh(&self, src: u64, dst: &mut [u8]) -> Result<()>;
    fn dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<()>;
    fn memset_zero(&self, dst: u64, bytes: usize) -> Result<()>;
    fn launch(
        &self,
        kernel: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        args: &[Arg],
    ) -> Result<()>;
    fn gemm(&self, g: &Gemm) -> Result<()>;
    fn sync(&self) -> Result<()>;
    /// An event recorded now: later waits on it wait for the work so far.
    fn record(&self) -> Result<Event>;
    /// Work queued after this waits for `e`.
    fn wait(&self, e: &Event) -> Result<()>;
    fn begin_capture(&self) -> Result<()>;
    fn end_capture(&self) -> Result<Box<dyn GraphOps>>;
    /// Raw handles for NCCL: (CUstream, device ordinal); `None` when emulated.
    fn raw_stream(&self) -> Option<(usize, usize)>;
}

/// A captured sequence of work, replayed on the stream that captured it.
pub(crate) trait GraphOps {
    fn launch(&self) -> Result<()>;
}

/// An event to order work across streams of one device.
pub enum Event {
    Real(cudarc::driver::CudaEvent),
    /// The emulator runs everything in order: nothing to wait for.
    Done,
}

/// One GPU (or the emulator), shared by every rank that computes on it.
#[derive(Clone)]
pub struct Gpu {
    pub(crate) backend: Arc<dyn Backend>,
    signatures: Arc<HashMap<String, Signature>>,
    pub ordinal: usize,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.backend.describe())
    }
}

fn signatures() -> Result<Arc<HashMap<String, Signature>>> {
    static SIGS: OnceLock<std::result::Result<Arc<HashMap<String, Signature>>, String>> =
        OnceLock::new();
    SIGS.get_or_init(|| {
        parse_signatures(KERNELS)
            .map(|v| Arc::new(v.into_iter().map(|s| (s.name.clone(), s)).collect()))
            .map_err(|e| e.to_string())
    })
    .clone()
    .map_err(err)
}

impl Gpu {
    /// The GPU (or emulator) a device names for `rank`: one handle per
    /// device and process, so ranks sharing a GPU share its context and
    /// compiled kernels.
    pub fn open(device: &Device, rank: usize) -> Result<Gpu> {
        static OPEN: OnceLock<Mutex<HashMap<(bool, usize), Gpu>>> = OnceLock::new();
        let emulated = matches!(device, Device::Emu);
        let count = if emulated {
            1
        } else {
            super::real::device_count()?
        };
        let ordinal = device.ordinal(rank, count).ok_or_else(|| {
            err(format!(
                "device {device} names no GPU for tensor-parallel rank {rank}"
            ))
        })?;
        if ordinal >= count {
            return Err(err(format!(
                "GPU {ordinal} does not exist: this machine has {count} (device {device})"
            )));
        }
        let mut open = OPEN
            .get_or_init(|| Mutex::new(HashMap::new()))
            .lock()
            .map_err(|_| err("a thread panicked while opening a GPU"))?;
        if let Some(g) = open.get(&(emulated, ordinal)) {
            return Ok(g.clone());
        }
        let backend: Arc<dyn Backend> = if emulated {
            Arc::new(super::emu::EmuGpu::new()?)
        } else {
            Arc::new(super::real::RealGpu::new(ordinal)?)
        };
        let g = Gpu {
            backend,
            signatures: signatures()?,
            ordinal,
        };
        open.insert((emulated, ordinal), g.clone());
        Ok(g)
    }

    pub fn describe(&self) -> String {
        self.backend.describe()
    }

    pub fn is_emulated(&self) -> bool {
        self.backend.is_emulated()
    }

    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.backend.mem_info()
    }

    /// `bytes` of device memory (contents undefined).
    pub fn alloc(&self, bytes: usize) -> Result<DevBuf> {
        let ptr = self.backend.alloc(bytes.max(1))?;
        Ok(DevBuf {
            gpu: self.clone(),
            ptr,
            bytes,
        })
    }

    pub fn stream(&self) -> Result<Stream> {
        Ok(Stream {
            gpu: self.clone(),
            ops: self.backend.stream()?,
        })
    }

    fn check_launch(&self, kernel: &str, args: &[Arg]) -> Result<()> {
        let sig = self
            .signatures
            .get(kernel)
            .ok_or_else(|| err(format!("no kernel named {kernel}")))?;
        if sig.params.len() != args.len() {
            return Err(err(format!(
                "kernel {kernel} takes {} arguments, given {}",
                sig.params.len(),
                args.len()
            )));
        }
        for ((ty, kind, name), a) in sig.params.iter().zip(args) {
            if *kind != a.kind() {
                return Err(err(format!(
                    "kernel {kernel}: parameter {name} is {ty}, given {a:?}"
                )));
            }
        }
        Ok(())
    }
}

/// An allocation of device memory, freed on drop.
pub struct DevBuf {
    gpu: Gpu,
    pub ptr: u64,
    pub bytes: usize,
}

impl std::fmt::Debug for DevBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DevBuf({:#x}, {} bytes)", self.ptr, self.bytes)
    }
}

impl DevBuf {
    pub fn arg(&self) -> Arg {
        Arg::Ptr(self.ptr)
    }

    /// The address `offset` bytes in.
    pub fn at(&self, offset: usize) -> u64 {
        debug_assert!(offset <= self.bytes, "an offset inside the buffer");
        self.ptr + offset as u64
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        self.gpu.backend.free(self.ptr);
    }
}

/// Plain numbers that move between host and device as bytes.
pub trait Plain: Copy + Default + Send + Sync + 'static {}
impl Plain for f32 {}
impl Plain for i32 {}
impl Plain for u32 {}
impl Plain for u16 {}
impl Plain for u64 {}
impl Plain for u8 {}

pub(crate) fn as_bytes<T: Plain>(v: &[T]) -> &[u8] {
    // SAFETY: `Plain` types are integers and floats without padding; any
    // byte is a valid `u8`.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

fn as_bytes_mut<T: Plain>(v: &mut [T]) -> &mut [u8] {
    // SAFETY: as above, and every bit pattern is a valid `Plain` value.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, std::mem::size_of_val(v)) }
}

/// A stream of one rank: every operation of a forward pass goes through it.
pub struct Stream {
    pub gpu: Gpu,
    ops: Box<dyn StreamOps>,
}

impl Stream {
    pub fn htod<T: Plain>(&self, dst: u64, src: &[T]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        self.ops.htod(dst, as_bytes(src))
    }

    /// Copies `dst.len()` elements from the device; returns once they arrived.
    pub fn dtoh<T: Plain>(&self, src: u64, dst: &mut [T]) -> Result<()> {
        if dst.is_empty() {
            return Ok(());
        }
        self.ops.dtoh(src, as_bytes_mut(dst))
    }

    pub fn read<T: Plain>(&self, src: u64, n: usize) -> Result<Vec<T>> {
        let mut v = vec![T::default(); n];
        self.dtoh(src, &mut v)?;
        Ok(v)
    }

    /// A new allocation holding `src`.
    pub fn upload<T: Plain>(&self, src: &[T]) -> Result<DevBuf> {
        let b = self.gpu.alloc(std::mem::size_of_val(src))?;
        self.htod(b.ptr, src)?;
        Ok(b)
    }

    pub fn dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.ops.dtod(dst, src, bytes)
    }

    pub fn zero(&self, dst: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.ops.memset_zero(dst, bytes)
    }

    pub fn launch(
        &self,
        kernel: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        args: &[Arg],
    ) -> Result<()> {
        self.gpu.check_launch(kernel, args)?;
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        self.ops.launch(kernel, grid, block, smem, args)
    }

    pub fn gemm(&self, g: &Gemm) -> Result<()> {
        if g.m == 0 || g.n == 0 {
            return Ok(());
        }
        self.ops.gemm(g)
    }

    pub fn sync(&self) -> Result<()> {
        self.ops.sync()
    }

    pub fn record(&self) -> Result<Event> {
        self.ops.record()
    }

    pub fn wait(&self, e: &Event) -> Result<()> {
        self.ops.wait(e)
    }

    /// Captures everything queued until [`end_capture`](Self::end_capture)
    /// into a graph instead of running it.
    pub fn begin_capture(&self) -> Result<()> {
        self.ops.begin_capture()
    }

    pub fn end_capture(&self) -> Result<Graph> {
        Ok(Graph {
            ops: self.ops.end_capture()?,
        })
    }

    pub(crate) fn raw(&self) -> Option<(usize, usize)> {
        self.ops.raw_stream()
    }
}

/// A captured graph: replays its work on the stream that captured it.
pub struct Graph {
    ops: Box<dyn GraphOps>,
}

impl Graph {
    pub fn launch(&self) -> Result<()> {
        self.ops.launch()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_signature_parses() {
        let sigs = parse_signatures(KERNELS).expect("parses");
        let names: Vec<&str> = sigs.iter().map(|s| s.name.as_str()).collect();
        for k in [
            "embed_rows",
            "rms_norm",
            "qkv_rope_store",
            "attn_decode_part",
            "attn_prefill_2",
            "sample_rows",
        ] {
            assert!(names.contains(&k), "{k} missing from {names:?}");
        }
        let rms = sigs
            .iter()
            .find(|s| s.name == "rms_norm")
            .expect("rms_norm");
        let kinds: Vec<ArgKind> = rms.params.iter().map(|p| p.1).collect();
        use ArgKind::*;
        assert_eq!(kinds, [Ptr, I32, Ptr, Ptr, Ptr, Ptr, I32, I32, F32]);
        assert_eq!(rms.params[0].0, "void*");
        assert_eq!(rms.params[2].2, "x");
        let add = sigs.iter().find(|s| s.name == "add_inplace").expect("add");
        assert_eq!(add.params[2].1, I64);
    }
}
