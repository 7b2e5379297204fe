//! The kernels against CPU references, run by the emulator (and on a GPU
//! by `tandem gpu-check`).

use super::gpu::{Arg, Gpu};
use crate::device::Device;

fn emu() -> Gpu {
    Gpu::open(&Device::Emu, 0).expect("the emulator builds with the host's C++ compiler")
}

fn rand_vec(seed: u64, n: usize) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

#[test]
fn rms_norm_matches_the_cpu() {
    let g = emu();
    let s = g.stream().expect("stream");
    let (rows, cols) = (3, 100);
    let x = rand_vec(1, rows * cols);
    let r = rand_vec(2, rows * cols);
    let w = rand_vec(3, cols);
    let xb = s.upload(&x).expect("upload");
    let rb = s.upload(&r).expect("upload");
    let wb = s.upload(&w).expect("upload");
    let out = g.alloc(rows * cols * 4).expect("alloc");
    s.launch(
        "rms_norm",
        (rows as u32, 1, 1),
        (64, 1, 1),
        0,
        &[
            out.arg(),
            Arg::I32(0),
            xb.arg(),
            rb.arg(),
            wb.arg(),
            Arg::Ptr(0),
            Arg::I32(rows as i32),
            Arg::I32(cols as i32),
            Arg::F32(1e-5),
        ],
    )
    .expect("launch");
    let got: Vec<f32> = s.read(out.ptr, rows * cols).expect("read");
    let xs: Vec<f32> = s.read(xb.ptr, rows * cols).expect("read");
    for row in 0..rows {
        let v: Vec<f32> = (0..cols)
            .map(|c| x[row * cols + c] + r[row * cols + c])
            .collect();
        let ms = v.iter().map(|a| a * a).sum::<f32>() / cols as f32;
        let sc = 1.0 / (ms + 1e-5).sqrt();
        for c in 0..cols {
            assert!(
                (xs[row * cols + c] - v[c]).abs() < 1e-6,
                "residual written back"
            );
            let want = v[c] * sc * w[c];
            assert!(
                (got[row * cols + c] - want).abs() < 1e-5,
                "row {row} col {c}: {} vs {want}",
                got[row * cols + c]
            );
        }
    }
}

#[test]
fn a_launch_with_wrong_arguments_is_refused() {
    let g = emu();
    let s = g.stream().expect("stream");
    let e = s.launch("rms_norm", (1, 1, 1), (32, 1, 1), 0, &[Arg::I32(0)]);
    assert!(e.unwrap_err().to_string().contains("takes 9 arguments"));
    let buf = g.alloc(16).expect("alloc");
    let e = s.launch(
        "add_inplace",
        (1, 1, 1),
        (32, 1, 1),
        0,
        &[buf.arg(), buf.arg(), Arg::I32(4)],
    );
    assert!(e.unwrap_err().to_string().contains("parameter n"));
}
