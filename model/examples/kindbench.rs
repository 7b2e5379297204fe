//! Times one decode matrix product per GGUF format (a development aid).
use std::time::Instant;
use tandem_model::linear::Linear;
use tandem_model::quant::{QKind, QMat};
use tandem_model::*;

fn main() {
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build_global();
    for (rows, cols) in [(3072, 576), (576, 1536), (49152, 576)] {
        for kind in QKind::ALL {
            if cols % kind.block_elems() != 0 {
                continue;
            }
            let n = rows * cols / kind.block_elems() * kind.block_bytes();
            let mut data: Vec<u8> = (0..n).map(|i| (i * 7919 % 251) as u8).collect();
            for b in data.chunks_exact_mut(kind.block_bytes()) {
                for at in [0usize, 2, b.len() - 2, b.len() - 4] {
                    b[at..at + 2].copy_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
                }
            }
            let qm = QMat {
                kind,
                rows,
                cols,
                data,
            };
            let rm = tandem_model::qrows::RowMat::new(&qm);
            let qm2 = qm.clone();
            let l = Linear::new(RawTensor::Quant(qm), None, Formats::DECODE).unwrap();
            for t in [1usize, 32] {
                let x: Vec<f32> = (0..t * cols).map(|i| (i as f32 * 0.01).sin()).collect();
                l.forward(&x, t, Format::Quant).unwrap();
                let reps = if t == 1 { 400 } else { 40 };
                let s = Instant::now();
                for _ in 0..reps {
                    l.forward(&x, t, Format::Quant).unwrap();
                }
                let us = s.elapsed().as_secs_f64() * 1e6 / reps as f64;
                let mut out = vec![0f32; t * rows];
                let s = Instant::now();
                for _ in 0..reps {
                    rm.matmul(&x, t, &mut out);
                }
                let us_rows = s.elapsed().as_secs_f64() * 1e6 / reps as f64;
                let lanes = tandem_model::qlanes::LaneMat::pack(&qm2).map(|lm| {
                    lm.matmul(&x, t, &mut out);
                    let s = Instant::now();
                    for _ in 0..reps {
                        lm.matmul(&x, t, &mut out);
                    }
                    s.elapsed().as_secs_f64() * 1e6 / reps as f64
                });
                println!("{rows}x{cols} {kind:5} t={t:<3} {us:9.1} us  {:6.2} GMAC/s   row kernel {us_rows:9.1} us   lanes {}", (rows * cols * t) as f64 / us / 1e3, lanes.map_or(String::new(), |l| format!("{l:9.1} us {:6.2} GMAC/s", (rows * cols * t) as f64 / l / 1e3)));
            }
        }
    }
}
