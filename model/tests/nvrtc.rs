//! Every CUDA kernel compiles with NVRTC, to PTX and to machine code, on a
//! machine without a GPU: a kernel that does not compile fails here, not
//! on the GPU. `.ci/run` installs NVRTC from PyPI and sets
//! TANDEM_REQUIRE_NVRTC, so CI cannot skip this; elsewhere it is skipped
//! (with a note) when libnvrtc is not on LD_LIBRARY_PATH.

use tandem_model::cuda::gpu::{parse_signatures, KERNELS};
use tandem_model::cuda::nvrtc::{compile, probe, ptx_entries, version, Output};

#[test]
fn every_kernel_compiles_with_nvrtc() {
    if let Err(e) = probe() {
        assert!(
            std::env::var_os("TANDEM_REQUIRE_NVRTC").is_none(),
            "TANDEM_REQUIRE_NVRTC is set but {e}"
        );
        eprintln!("skipped: {e}");
        return;
    }
    eprintln!("NVRTC {:?}", version().expect("version"));
    let mut want: Vec<String> = parse_signatures(KERNELS)
        .expect("signatures parse")
        .into_iter()
        .map(|s| s.name)
        .collect();
    want.sort();
    for cc in [(8, 0), (9, 0)] {
        let ptx = compile(KERNELS, cc, Output::Ptx)
            .unwrap_or_else(|e| panic!("compute_{}{}: {e}", cc.0, cc.1));
        let ptx = String::from_utf8(ptx).expect("PTX is text");
        let mut got = ptx_entries(&ptx);
        got.sort();
        assert_eq!(got, want, "every kernel is an entry point of the PTX");
    }
    let cubin = compile(KERNELS, (9, 0), Output::Cubin).expect("sm_90 machine code");
    assert_eq!(&cubin[..4], b"\x7fELF", "a cubin is an ELF image");
}

#[test]
fn a_kernel_that_does_not_compile_is_an_error_with_the_compiler_log() {
    if probe().is_err() {
        return;
    }
    let e = compile(
        "extern \"C\" __global__ void k(int* p) { p[0] = undefined_name; }",
        (9, 0),
        Output::Ptx,
    )
    .expect_err("does not compile");
    assert!(e.to_string().contains("undefined_name"), "{e}");
}
