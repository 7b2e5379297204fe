//! The emulator backend: the project's CUDA kernels compiled by the host's
//! C++ compiler against `emu/emu.h` and run on the CPU, a fiber per CUDA
//! thread (`emu/emu.cpp`), with cuBLAS's GEMM computed by the CPU's GEMM.
//! Slow, and meant only for tests: it lets every kernel and the whole GPU
//! forward pass be checked against the CPU path on machines without a GPU.
//!
//! It is stricter than a GPU where that finds bugs: every allocation ends
//! at a guard page (an overrun faults at once), every copy and GEMM operand
//! must lie inside one allocation, every pointer argument must point into
//! one, and a barrier some threads never reach is reported as a deadlock.

use std::collections::BTreeMap;
use std::ffi::{c_char, c_void, CString};
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use super::gpu::{
    err, parse_signatures, Arg, Backend, DType, Event, Gemm, GraphOps, StreamOps, KERNELS,
};
use crate::error::Result;
use crate::gemm::{sgemm, Strides};

const EMU_H: &str = include_str!("emu/emu.h");
const EMU_CPP: &str = include_str!("emu/emu.cpp");

type RunFn = unsafe extern "C" fn(
    u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    *const c_void,
    *mut *mut c_void,
    *mut c_char,
    i32,
) -> i32;
type LookupFn = unsafe extern "C" fn(*const c_char) -> *const c_void;

struct Lib {
    _lib: libloading::Library,
    run: RunFn,
    kernels: std::collections::HashMap<String, usize>,
}

/// The C++ that calls each kernel with its arguments unpacked.
fn wrappers() -> Result<String> {
    let mut s = String::from("#include \"kernels.cu\"\n#include <cstring>\n");
    let sigs = parse_signatures(KERNELS)?;
    for sig in &sigs {
        let args: Vec<String> = sig
            .params
            .iter()
            .enumerate()
            .map(|(i, (ty, _, _))| format!("*({ty}*)a[{i}]"))
            .collect();
        s.push_str(&format!(
            "static void w_{n}(void** a) {{ {n}({}); }}\n",
            args.join(", "),
            n = sig.name
        ));
    }
    s.push_str("extern \"C\" const void* tandem_emu_kernel(const char* n) {\n");
    for sig in &sigs {
        s.push_str(&format!(
            "    if (!std::strcmp(n, \"{n}\")) return (const void*)&w_{n};\n",
            n = sig.name
        ));
    }
    s.push_str("    return nullptr;\n}\n");
    Ok(s)
}

fn build() -> Result<Lib> {
    use std::hash::{Hash, Hasher};
    let wrap = wrappers()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (EMU_H, EMU_CPP, KERNELS, &wrap).hash(&mut h);
    let dir = std::env::temp_dir().join(format!("tandem-emu-{:016x}", h.finish()));
    let lib_path = dir.join("libtandem_emu.so");
    if !lib_path.exists() {
        std::fs::create_dir_all(&dir).map_err(|e| err(format!("{}: {e}", dir.display())))?;
        let write = |name: &str, text: &str| -> Result<PathBuf> {
            let p = dir.join(name);
            std::fs::write(&p, text).map_err(|e| err(format!("{}: {e}", p.display())))?;
            Ok(p)
        };
        write("emu.h", EMU_H)?;
        write("kernels.cu", KERNELS)?;
        let cpp = write("emu.cpp", EMU_CPP)?;
        let wrap_path = write("wrappers.cpp", &wrap)?;
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        // A private name, renamed into place: concurrent test processes
        // never load a half-written library.
        let tmp = dir.join(format!("lib.{}.so", std::process::id()));
        let out = std::process::Command::new(&cxx)
            .args([
                "-std=c++17",
                "-O2",
                "-g",
                "-shared",
                "-fPIC",
                "-w",
                "-fno-strict-aliasing",
            ])
            .arg("-include")
            .arg(dir.join("emu.h"))
            .arg("-I")
            .arg(&dir)
            .arg(&wrap_path)
            .arg(&cpp)
            .arg("-o")
            .arg(&tmp)
            .output()
            .map_err(|e| {
                err(format!(
                    "the CUDA emulator needs a C++ compiler ({cxx}): {e}"
                ))
            })?;
        if !out.status.success() {
            return Err(err(format!(
                "the CUDA emulator did not compile:\n{}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        std::fs::rename(&tmp, &lib_path)
            .map_err(|e| err(format!("{}: {e}", lib_path.display())))?;
    }
    // SAFETY: the library is ours, built above from the project's sources;
    // its initialisers do nothing but set up statics.
    let lib = unsafe { libloading::Library::new(&lib_path) }
        .map_err(|e| err(format!("{}: {e}", lib_path.display())))?;
    // SAFETY: the symbols are defined with these signatures in emu.cpp and
    // the generated wrappers.
    let (run, lookup) = unsafe {
        let run: libloading::Symbol<RunFn> = lib
            .get(b"tandem_emu_run\0")
            .map_err(|e| err(format!("tandem_emu_run: {e}")))?;
        let lookup: libloading::Symbol<LookupFn> = lib
            .get(b"tandem_emu_kernel\0")
            .map_err(|e| err(format!("tandem_emu_kernel: {e}")))?;
        (*run, *lookup)
    };
    let mut kernels = std::collections::HashMap::new();
    for sig in parse_signatures(KERNELS)? {
        let name = CString::new(sig.name.clone()).expect("kernel names have no NUL");
        // SAFETY: `lookup` only compares the name against its table.
        let f = unsafe { lookup(name.as_ptr()) };
        if f.is_null() {
            return Err(err(format!("the emulator has no kernel {}", sig.name)));
        }
        kernels.insert(sig.name, f as usize);
    }
    Ok(Lib {
        _lib: lib,
        run,
        kernels,
    })
}

fn lib() -> Result<&'static Lib> {
    static LIB: OnceLock<std::result::Result<Lib, String>> = OnceLock::new();
    LIB.get_or_init(|| build().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| err(e.clone()))
}

fn page() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

/// Live allocations: address → (bytes, mapping base, mapping length).
static ALLOCS: Mutex<BTreeMap<u64, (usize, usize, usize)>> = Mutex::new(BTreeMap::new());

/// Whether `[ptr, ptr + bytes)` lies inside one live allocation.
fn inside(ptr: u64, bytes: usize) -> bool {
    let a = ALLOCS
        .lock()
        .expect("the allocation table is never poisoned");
    match a.range(..=ptr).next_back() {
        Some((base, (len, _, _))) => ptr + bytes as u64 <= base + *len as u64,
        None => false,
    }
}

fn check(ptr: u64, bytes: usize, what: &str) -> Result<()> {
    if inside(ptr, bytes) {
        Ok(())
    } else {
        Err(err(format!(
            "emulator: {what} of {bytes} bytes at {ptr:#x} is not inside one allocation"
        )))
    }
}

pub struct EmuGpu;

impl EmuGpu {
    pub fn new() -> Result<EmuGpu> {
        lib()?;
        Ok(EmuGpu)
    }
}

impl Backend for EmuGpu {
    fn describe(&self) -> String {
        "the CUDA emulator (kernels on the CPU)".into()
    }

    fn alloc(&self, bytes: usize) -> Result<u64> {
        let pg = page();
        let body = bytes.div_ceil(16) * 16;
        let len = body.div_ceil(pg) * pg + pg;
        // SAFETY: a fresh anonymous mapping; the last page becomes a guard.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(err(format!("emulator: cannot map {bytes} bytes")));
        }
        let guard = base as usize + len - pg;
        // SAFETY: the guard page is inside the mapping made above.
        unsafe { libc::mprotect(guard as *mut c_void, pg, libc::PROT_NONE) };
        let ptr = (guard - body) as u64;
        // Fresh device memory is not zero on a GPU: a pattern shows reads
        // of what nobody wrote.
        // SAFETY: `body` bytes before the guard are mapped and writable.
        unsafe { std::ptr::write_bytes(ptr as *mut u8, 0x7f, body) };
        ALLOCS
            .lock()
            .expect("the allocation table is never poisoned")
            .insert(ptr, (bytes, base as usize, len));
        Ok(ptr)
    }

    fn free(&self, ptr: u64) {
        let e = ALLOCS
            .lock()
            .expect("the allocation table is never poisoned")
            .remove(&ptr);
        if let Some((_, base, len)) = e {
            // SAFETY: the mapping was made by `alloc` and is unmapped once.
            unsafe { libc::munmap(base as *mut c_void, len) };
        }
    }

    fn mem_info(&self) -> Result<(usize, usize)> {
        Ok((8 << 30, 8 << 30))
    }

    fn stream(&self) -> Result<Box<dyn StreamOps>> {
        Ok(Box::new(EmuStream {
            lib: lib()?,
            capture: Mutex::new(None),
        }))
    }

    fn is_emulated(&self) -> bool {
        true
    }
}

#[derive(Clone)]
enum Op {
    Launch {
        kernel: String,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        args: Vec<Arg>,
    },
    Gemm(Gemm),
    Dtod(u64, u64, usize),
    Zero(u64, usize),
}

struct EmuStream {
    lib: &'static Lib,
    capture: Mutex<Option<Vec<Op>>>,
}

impl EmuStream {
    /// Records `op` when capturing, else runs it.
    fn submit(&self, op: Op) -> Result<()> {
        let mut cap = self
            .capture
            .lock()
            .map_err(|_| err("emulator stream poisoned"))?;
        if let Some(ops) = cap.as_mut() {
            ops.push(op);
            return Ok(());
        }
        drop(cap);
        run(self.lib, &op)
    }
}

fn run(lib: &Lib, op: &Op) -> Result<()> {
    match op {
        Op::Launch {
            kernel,
            grid,
            block,
            smem,
            args,
        } => {
            for a in args {
                if let Arg::Ptr(p) = a {
                    if *p != 0 && !inside(*p, 0) {
                        return Err(err(format!(
                            "emulator: {kernel} is given a pointer {p:#x} into no allocation"
                        )));
                    }
                }
            }
            let f = *lib
                .kernels
                .get(kernel)
                .ok_or_else(|| err(format!("no kernel named {kernel}")))?;
            let mut slots: Vec<u64> = args.iter().map(Arg::bits).collect();
            let mut params: Vec<*mut c_void> = slots
                .iter_mut()
                .map(|s| s as *mut u64 as *mut c_void)
                .collect();
            let mut msg = vec![0 as c_char; 512];
            // SAFETY: `f` is the wrapper of `kernel`, whose arguments were
            // checked against its signature; the slots outlive the call.
            let rc = unsafe {
                (lib.run)(
                    grid.0,
                    grid.1,
                    grid.2,
                    block.0,
                    block.1,
                    block.2,
                    *smem,
                    f as *const c_void,
                    params.as_mut_ptr(),
                    msg.as_mut_ptr(),
                    msg.len() as i32,
                )
            };
            if rc != 0 {
                let text: Vec<u8> = msg
                    .iter()
                    .take_while(|c| **c != 0)
                    .map(|c| *c as u8)
                    .collect();
                return Err(err(format!(
                    "emulator: {kernel}: {}",
                    String::from_utf8_lossy(&text)
                )));
            }
            Ok(())
        }
        Op::Gemm(g) => gemm(g),
        Op::Dtod(dst, src, n) => {
            check(*dst, *n, "copy destination")?;
            check(*src, *n, "copy source")?;
            // SAFETY: both ranges are inside live allocations (checked).
            unsafe { std::ptr::copy(*src as *const u8, *dst as *mut u8, *n) };
            Ok(())
        }
        Op::Zero(dst, n) => {
            check(*dst, *n, "memset")?;
            // SAFETY: inside a live allocation (checked).
            unsafe { std::ptr::write_bytes(*dst as *mut u8, 0, *n) };
            Ok(())
        }
    }
}

/// A GEMM operand as f32 with the strides that make element `(i, l)` of
/// `op(X)` (`rows × cols`) `data[i * row + l * col]`: f32 memory is used
/// in place, bf16 is widened first.
fn operand(
    ptr: u64,
    ty: DType,
    ld: usize,
    rows: usize,
    cols: usize,
    trans: bool,
) -> Result<(std::borrow::Cow<'static, [f32]>, Strides)> {
    // The stored matrix is `sr × sc` column-major with leading dimension ld.
    let (sr, sc) = if trans { (cols, rows) } else { (rows, cols) };
    if ld < sr {
        return Err(err(format!("emulator: leading dimension {ld} < {sr} rows")));
    }
    let span = (sc - 1) * ld + sr;
    check(ptr, span * ty.bytes(), "GEMM operand")?;
    let strides = if trans {
        Strides { row: ld, col: 1 }
    } else {
        Strides { row: 1, col: ld }
    };
    let data = match ty {
        // SAFETY: `span` f32 lie inside a live allocation (checked), which
        // nothing frees or writes while this stream's GEMM runs.
        DType::F32 => std::borrow::Cow::Borrowed(unsafe {
            std::slice::from_raw_parts(ptr as *const f32, span)
        }),
        DType::Bf16 => {
            // SAFETY: as above, `span` bf16 values.
            let raw = unsafe { std::slice::from_raw_parts(ptr as *const u16, span) };
            std::borrow::Cow::Owned(
                raw.iter()
                    .map(|b| half::bf16::from_bits(*b).to_f32())
                    .collect(),
            )
        }
    };
    Ok((data, strides))
}

/// cublasGemmEx's arithmetic: f32 products and sums, result stored as `c_type`.
fn gemm(g: &Gemm) -> Result<()> {
    let (a, sa) = operand(g.a, g.a_type, g.lda, g.m, g.k, g.trans_a)?;
    let (b, sb) = operand(g.b, g.b_type, g.ldb, g.k, g.n, g.trans_b)?;
    let mut c = vec![0f32; g.m * g.n];
    sgemm(g.m, g.n, g.k, &a, sa, &b, sb, &mut c, true);
    if g.ldc < g.m {
        return Err(err("emulator: ldc < m"));
    }
    check(
        g.c,
        ((g.n - 1) * g.ldc + g.m) * g.c_type.bytes(),
        "GEMM output",
    )?;
    for i in 0..g.m {
        for j in 0..g.n {
            let idx = i + j * g.ldc;
            // SAFETY: idx < (n - 1) * ldc + m, inside the output (checked).
            unsafe {
                match g.c_type {
                    DType::F32 => {
                        let p = (g.c as *mut f32).add(idx);
                        let old = if g.beta != 0.0 { g.beta * *p } else { 0.0 };
                        *p = g.alpha * c[i * g.n + j] + old;
                    }
                    DType::Bf16 => {
                        let p = (g.c as *mut u16).add(idx);
                        let old = if g.beta != 0.0 {
                            g.beta * half::bf16::from_bits(*p).to_f32()
                        } else {
                            0.0
                        };
                        *p = half::bf16::from_f32(g.alpha * c[i * g.n + j] + old).to_bits();
                    }
                }
            }
        }
    }
    Ok(())
}

impl StreamOps for EmuStream {
    fn htod(&self, dst: u64, src: &[u8]) -> Result<()> {
        if self.capture.lock().map_err(|_| err("poisoned"))?.is_some() {
            return Err(err("emulator: a host copy inside a graph capture"));
        }
        check(dst, src.len(), "host-to-device destination")?;
        // SAFETY: the destination is inside a live allocation (checked).
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
        Ok(())
    }

    fn dtoh(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        if self.capture.lock().map_err(|_| err("poisoned"))?.is_some() {
            return Err(err("emulator: a host copy inside a graph capture"));
        }
        check(src, dst.len(), "device-to-host source")?;
        // SAFETY: the source is inside a live allocation (checked).
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    fn dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        self.submit(Op::Dtod(dst, src, bytes))
    }

    fn memset_zero(&self, dst: u64, bytes: usize) -> Result<()> {
        self.submit(Op::Zero(dst, bytes))
    }

    fn launch(
        &self,
        kernel: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        args: &[Arg],
    ) -> Result<()> {
        self.submit(Op::Launch {
            kernel: kernel.to_string(),
            grid,
            block,
            smem,
            args: args.to_vec(),
        })
    }

    fn gemm(&self, g: &Gemm) -> Result<()> {
        self.submit(Op::Gemm(*g))
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn record(&self) -> Result<Event> {
        Ok(Event::Done)
    }

    fn wait(&self, _e: &Event) -> Result<()> {
        Ok(())
    }

    fn begin_capture(&self) -> Result<()> {
        let mut c = self.capture.lock().map_err(|_| err("poisoned"))?;
        if c.is_some() {
            return Err(err("emulator: capture already under way"));
        }
        *c = Some(Vec::new());
        Ok(())
    }

    fn end_capture(&self) -> Result<Box<dyn GraphOps>> {
        let ops = self
            .capture
            .lock()
            .map_err(|_| err("poisoned"))?
            .take()
            .ok_or_else(|| err("emulator: end of a capture that never began"))?;
        Ok(Box::new(EmuGraph { lib: self.lib, ops }))
    }

    fn raw_stream(&self) -> Option<(usize, usize)> {
        None
    }
}

struct EmuGraph {
    lib: &'static Lib,
    ops: Vec<Op>,
}

impl GraphOps for EmuGraph {
    fn launch(&self) -> Result<()> {
        for op in &self.ops {
            run(self.lib, op)?;
        }
        Ok(())
    }
}
