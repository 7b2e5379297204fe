//! Run-time compilation of the kernels with NVRTC.
//!
//! NVRTC needs no GPU, only `libnvrtc` (from a CUDA toolkit or the PyPI
//! `nvidia-cuda-nvrtc` wheel, found through `LD_LIBRARY_PATH`). For a GPU
//! the kernels are compiled straight to machine code for its compute
//! capability (a cubin), which any driver of the same major CUDA version
//! loads; PTX from an NVRTC newer than the driver would be refused. The CI
//! check compiles PTX for a fixed architecture, so a kernel that does not
//! compile fails the build without a GPU.

use std::ffi::{c_char, CString};

use cudarc::nvrtc::{result, sys};

use super::gpu::err;
use crate::error::Result;

/// What to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// PTX for `compute_XY`.
    Ptx,
    /// Machine code for `sm_XY`.
    Cubin,
}

/// Fails with a clear message when libnvrtc cannot be loaded (cudarc would
/// panic at its first call).
pub fn probe() -> Result<()> {
    // SAFETY: only tries to dlopen the candidate names.
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        Err(err(
            "NVRTC (libnvrtc.so) was not found: install the CUDA toolkit or \
             `pip install nvidia-cuda-nvrtc` and put its lib directory on LD_LIBRARY_PATH",
        ))
    }
}

/// NVRTC's version, (major, minor).
pub fn version() -> Result<(i32, i32)> {
    probe()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two out-parameters.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| err(format!("nvrtcVersion: {e:?}")))?;
    Ok((major, minor))
}

fn text(v: &[c_char]) -> String {
    let bytes: Vec<u8> = v
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Compiles `src` for compute capability `cc` (major, minor).
pub fn compile(src: &str, cc: (i32, i32), out: Output) -> Result<Vec<u8>> {
    probe()?;
    let csrc = CString::new(src).map_err(|_| err("kernel source holds a NUL byte"))?;
    let name = CString::new("tandem_kernels.cu").expect("no NUL in a literal");
    let prog = result::create_program(&csrc, Some(&name))
        .map_err(|e| err(format!("nvrtcCreateProgram: {e:?}")))?;
    let arch = match out {
        Output::Ptx => format!("--gpu-architecture=compute_{}{}", cc.0, cc.1),
        Output::Cubin => format!("--gpu-architecture=sm_{}{}", cc.0, cc.1),
    };
    let opts = [
        arch,
        "--std=c++17".to_string(),
        "-default-device".to_string(),
    ];
    // SAFETY: `prog` was just created and is destroyed below, once.
    let compiled = unsafe { result::compile_program(prog, &opts) };
    // SAFETY: as above.
    let log = unsafe { result::get_program_log(prog) }
        .map(|l| text(&l))
        .unwrap_or_default();
    let code = compiled
        .map_err(|e| err(format!("the kernels do not compile ({e:?}):\n{log}")))
        .and_then(|()| match out {
            // SAFETY: as above; the program compiled.
            Output::Ptx => unsafe { result::get_ptx(prog) }
                .map(|p| text(&p).into_bytes())
                .map_err(|e| err(format!("nvrtcGetPTX: {e:?}"))),
            Output::Cubin => {
                let mut size = 0usize;
                // SAFETY: as above; `buf` has the size NVRTC reported.
                unsafe {
                    sys::nvrtcGetCUBINSize(prog, &mut size)
                        .result()
                        .map_err(|e| err(format!("nvrtcGetCUBINSize: {e:?}")))?;
                    let mut buf = vec![0u8; size];
                    sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut c_char)
                        .result()
                        .map_err(|e| err(format!("nvrtcGetCUBIN: {e:?}")))?;
                    Ok(buf)
                }
            }
        });
    // SAFETY: created above and not destroyed before.
    let _ = unsafe { result::destroy_program(prog) };
    code
}

/// The `.entry` names of a PTX module.
pub fn ptx_entries(ptx: &str) -> Vec<String> {
    ptx.lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let rest = l
                .strip_prefix(".visible .entry ")
                .or_else(|| l.strip_prefix(".entry "))?;
            Some(rest.split('(').next()?.trim().to_string())
        })
        .collect()
}
