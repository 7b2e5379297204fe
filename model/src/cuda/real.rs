//! The CUDA backend of the device layer, through cudarc with dynamic
//! loading: the driver, NVRTC and cuBLAS are opened at run time. cudarc
//! panics when a library cannot be loaded, so every entry probes first and
//! returns a clear error naming what is missing.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublas::{self, CudaBlas};
use cudarc::driver::{result, sys, CudaContext, CudaFunction, CudaGraph, CudaStream};

use super::gpu::{err, Arg, Backend, DType, Event, Gemm, GraphOps, StreamOps, KERNELS};
use super::nvrtc;
use crate::error::Result;

/// Bytes of cuBLAS workspace per stream (set explicitly, so that GEMMs
/// captured in a graph allocate nothing).
const BLAS_WORKSPACE: usize = 32 << 20;

fn derr(what: &str) -> impl Fn(cudarc::driver::DriverError) -> crate::ModelError + '_ {
    move |e| err(format!("{what}: {e}"))
}

/// Fails with a clear message when the driver library is missing.
pub fn probe_driver() -> Result<()> {
    // SAFETY: only tries to dlopen the candidate names.
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        Err(err(
            "no NVIDIA driver: libcuda.so.1 was not found (is this a machine with an NVIDIA GPU \
             and its driver installed? use --device cpu otherwise)",
        ))
    }
}

fn probe_cublas() -> Result<()> {
    // SAFETY: only tries to dlopen the candidate names.
    if unsafe { cublas::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(err(
            "cuBLAS (libcublas.so) was not found: install the CUDA toolkit or \
             `pip install nvidia-cublas` and put its lib directory on LD_LIBRARY_PATH",
        ))
    }
}

/// How many GPUs the driver sees.
pub fn device_count() -> Result<usize> {
    probe_driver()?;
    let n = CudaContext::device_count().map_err(derr("cannot initialise the CUDA driver"))?;
    if n <= 0 {
        return Err(err("the CUDA driver sees no GPU"));
    }
    Ok(n as usize)
}

/// The largest dynamic shared memory a prefill attention kernel asks for:
/// a query tile and two padded key/value tiles of f32 (kernels.cu).
pub fn prefill_smem_bytes(hd: usize) -> usize {
    (64 * hd + 2 * 32 * (hd + 1)) * 4
}

pub struct RealGpu {
    ctx: Arc<CudaContext>,
    funcs: Arc<HashMap<String, CudaFunction>>,
    name: String,
}

impl RealGpu {
    pub fn new(ordinal: usize) -> Result<RealGpu> {
        probe_driver()?;
        nvrtc::probe()?;
        probe_cublas()?;
        let ctx = CudaContext::new(ordinal).map_err(derr("cannot open the GPU"))?;
        // Streams are ordered by hand (events where ranks share a GPU);
        // cudarc's automatic cross-stream events would break graph capture.
        // SAFETY: no allocation was made through this context yet.
        unsafe { ctx.disable_event_tracking() };
        let cc = ctx
            .compute_capability()
            .map_err(derr("cannot read the GPU's compute capability"))?;
        let gpu_name = ctx.name().unwrap_or_else(|_| "an NVIDIA GPU".into());
        let cubin = nvrtc::compile(KERNELS, cc, nvrtc::Output::Cubin)?;
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(cubin))
            .map_err(derr("cannot load the compiled kernels"))?;
        let mut funcs = HashMap::new();
        for sig in super::gpu::parse_signatures(KERNELS)? {
            let f = module
                .load_function(&sig.name)
                .map_err(|e| err(format!("kernel {}: {e}", sig.name)))?;
            funcs.insert(sig.name, f);
        }
        ctx.bind_to_thread().map_err(derr("cannot bind the GPU"))?;
        for (name, hpl) in [
            ("attn_prefill_2", 2),
            ("attn_prefill_4", 4),
            ("attn_prefill_8", 8),
        ] {
            let bytes = prefill_smem_bytes(32 * hpl) as i32;
            funcs[name]
                .set_attribute(
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes,
                )
                .map_err(derr("cannot raise a kernel's shared memory"))?;
        }
        let (free, total) = result::mem_get_info().map_err(derr("cuMemGetInfo"))?;
        tracing::info!(
            "GPU {ordinal}: {gpu_name}, compute capability {}.{}, {} of {} MiB free",
            cc.0,
            cc.1,
            free >> 20,
            total >> 20
        );
        Ok(RealGpu {
            ctx,
            funcs: Arc::new(funcs),
            name: format!("GPU {ordinal} ({gpu_name}, sm_{}{})", cc.0, cc.1),
        })
    }
}

impl Backend for RealGpu {
    fn describe(&self) -> String {
        self.name.clone()
    }

    fn alloc(&self, bytes: usize) -> Result<u64> {
        self.ctx.bind_to_thread().map_err(derr("bind"))?;
        // SAFETY: a plain allocation; freed by `free`.
        unsafe { result::malloc_sync(bytes) }.map_err(|e| {
            let free = result::mem_get_info().map(|m| m.0 >> 20).unwrap_or(0);
            err(format!(
                "cannot allocate {} MiB on the GPU ({free} MiB free): {e}",
                bytes >> 20
            ))
        })
    }

    fn free(&self, ptr: u64) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: `ptr` came from `alloc` and is freed once (DevBuf's drop).
            if let Err(e) = unsafe { result::free_sync(ptr) } {
                tracing::warn!("cuMemFree: {e}");
            }
        }
    }

    fn mem_info(&self) -> Result<(usize, usize)> {
        self.ctx.bind_to_thread().map_err(derr("bind"))?;
        result::mem_get_info().map_err(derr("cuMemGetInfo"))
    }

    fn stream(&self) -> Result<Box<dyn StreamOps>> {
        let stream = self
            .ctx
            .new_stream()
            .map_err(derr("cannot create a stream"))?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| err(format!("cuBLAS: {e}")))?;
        let workspace = self.alloc(BLAS_WORKSPACE)?;
        // SAFETY: the handle is live; the workspace outlives it (freed in
        // RealStream's drop after the handle).
        unsafe {
            cublas::sys::cublasSetWorkspace_v2(
                *blas.handle(),
                workspace as *mut c_void,
                BLAS_WORKSPACE,
            )
            .result()
            .map_err(|e| err(format!("cublasSetWorkspace: {e}")))?;
            // Full f32 arithmetic for f32 operands (no TF32): the f32 path
            // is the one held to the CPU's results.
            cublas::sys::cublasSetMathMode(
                *blas.handle(),
                cublas::sys::cublasMath_t::CUBLAS_DEFAULT_MATH,
            )
            .result()
            .map_err(|e| err(format!("cublasSetMathMode: {e}")))?;
        }
        Ok(Box::new(RealStream {
            ctx: self.ctx.clone(),
            stream,
            blas: Some(blas),
            workspace,
            funcs: self.funcs.clone(),
        }))
    }

    fn is_emulated(&self) -> bool {
        false
    }
}

struct RealStream {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: Option<CudaBlas>,
    workspace: u64,
    funcs: Arc<HashMap<String, CudaFunction>>,
}

impl Drop for RealStream {
    fn drop(&mut self) {
        let _ = self.stream.synchronize();
        self.blas.take();
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: allocated in `RealGpu::stream` for this stream alone;
            // its cuBLAS handle is gone.
            let _ = unsafe { result::free_sync(self.workspace) };
        }
    }
}

fn cuda_type(d: DType) -> cublas::sys::cudaDataType {
    match d {
        DType::F32 => cublas::sys::cudaDataType::CUDA_R_32F,
        DType::Bf16 => cublas::sys::cudaDataType::CUDA_R_16BF,
    }
}

impl RealStream {
    fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(derr("bind"))
    }
}

impl StreamOps for RealStream {
    fn htod(&self, dst: u64, src: &[u8]) -> Result<()> {
        self.bind()?;
        // SAFETY: the caller gives an address inside one of its allocations
        // with room for `src`; from pageable memory the call returns once
        // `src` has been read.
        unsafe { result::memcpy_htod_async(dst, src, self.stream.cu_stream()) }
            .map_err(derr("host-to-device copy"))
    }

    fn dtoh(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        self.bind()?;
        // SAFETY: as above; the stream is synchronised before `dst` is used.
        unsafe { result::memcpy_dtoh_async(dst, src, self.stream.cu_stream()) }
            .map_err(derr("device-to-host copy"))?;
        self.stream.synchronize().map_err(derr("synchronize"))
    }

    fn dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        self.bind()?;
        // SAFETY: both ranges lie in the caller's allocations.
        unsafe { result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) }
            .map_err(derr("device-to-device copy"))
    }

    fn memset_zero(&self, dst: u64, bytes: usize) -> Result<()> {
        self.bind()?;
        // SAFETY: the range lies in the caller's allocation.
        unsafe { result::memset_d8_async(dst, 0, bytes, self.stream.cu_stream()) }
            .map_err(derr("memset"))
    }

    fn launch(
        &self,
        kernel: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        args: &[Arg],
    ) -> Result<()> {
        self.bind()?;
        let f = self
            .funcs
            .get(kernel)
            .ok_or_else(|| err(format!("no kernel named {kernel}")))?;
        let mut slots: Vec<u64> = args.iter().map(Arg::bits).collect();
        let mut params: Vec<*mut c_void> = slots
            .iter_mut()
            .map(|s| s as *mut u64 as *mut c_void)
            .collect();
        // SAFETY: the arguments were checked against the kernel's
        // signature (Stream::launch); each parameter reads its value from
        // the low bytes of its slot, which live until the call returns.
        unsafe {
            result::launch_kernel(
                f.cu_function(),
                grid,
                block,
                smem,
                self.stream.cu_stream(),
                &mut params,
            )
        }
        .map_err(|e| err(format!("launching {kernel}: {e}")))
    }

    fn gemm(&self, g: &Gemm) -> Result<()> {
        self.bind()?;
        let blas = self.blas.as_ref().expect("the handle lives until drop");
        let op = |t: bool| {
            if t {
                cublas::sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                cublas::sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let (alpha, beta) = (g.alpha, g.beta);
        // SAFETY: the operands lie in the caller's allocations with the
        // shapes and leading dimensions given; alpha and beta are f32 as
        // CUBLAS_COMPUTE_32F wants.
        unsafe {
            cublas::result::gemm_ex(
                *blas.handle(),
                op(g.trans_a),
                op(g.trans_b),
                g.m as i32,
                g.n as i32,
                g.k as i32,
                &alpha as *const f32 as *const c_void,
                g.a as *const c_void,
                cuda_type(g.a_type),
                g.lda as i32,
                g.b as *const c_void,
                cuda_type(g.b_type),
                g.ldb as i32,
                &beta as *const f32 as *const c_void,
                g.c as *mut c_void,
                cuda_type(g.c_type),
                g.ldc as i32,
                cublas::sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublas::sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| err(format!("cublasGemmEx {}x{}x{}: {e}", g.m, g.n, g.k)))
    }

    fn sync(&self) -> Result<()> {
        self.stream.synchronize().map_err(derr("synchronize"))
    }

    fn record(&self) -> Result<Event> {
        self.stream
            .record_event(None)
            .map(Event::Real)
            .map_err(derr("record an event"))
    }

    fn wait(&self, e: &Event) -> Result<()> {
        match e {
            Event::Real(e) => self.stream.wait(e).map_err(derr("wait on an event")),
            Event::Done => Ok(()),
        }
    }

    fn begin_capture(&self) -> Result<()> {
        self.bind()?;
        self.stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(derr("begin graph capture"))
    }

    fn end_capture(&self) -> Result<Box<dyn GraphOps>> {
        let g = self
            .stream
            .end_capture(sys::CUgraphInstantiate_flags(0))
            .map_err(derr("end graph capture"))?
            .ok_or_else(|| err("graph capture recorded nothing"))?;
        Ok(Box::new(RealGraph(g)))
    }

    fn raw_stream(&self) -> Option<(usize, usize)> {
        Some((self.stream.cu_stream() as usize, self.ctx.ordinal()))
    }
}

struct RealGraph(CudaGraph);

impl GraphOps for RealGraph {
    fn launch(&self) -> Result<()> {
        self.0.launch().map_err(derr("graph launch"))
    }
}
