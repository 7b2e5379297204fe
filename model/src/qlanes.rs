//! The integer decode kernel for 32-weight block formats (Q4_0, Q4_1,
//! Q8_0): weights repacked so that one 32-bit lane of a vector belongs to
//! one block, and sixteen blocks are multiplied at once with `vpdpbusd`.
//!
//! A row's blocks are taken sixteen at a time (a *group*; the last may be
//! shorter). In a group, 32-bit word `j` of every block goes into vector
//! `j`, lane = block: four vectors of nibbles for Q4 (the low nibble of byte
//! `i` is weight `i`, the high nibble weight `i + 16`, as GGUF stores them)
//! or eight vectors of bytes for Q8_0 (stored plus 128, so unsigned). The
//! activations are quantized to 8 bits per block of 32 (one f32 scale each,
//! as llama.cpp's Q8 activations) and laid out the same way, once per
//! product for every row. Each lane's integer sum is then scaled by its
//! block's weight and activation scales in one multiply per sixteen blocks:
//! no horizontal work until the row's end, and no shuffles at all.
//!
//! Why lanes and not one block per vector: unpacking is two logical
//! operations per 64 weights and the scales of sixteen blocks convert with
//! one instruction, so a 512-weight group costs about 26 instructions at
//! batch 1 where the f32 kernel ([`crate::qmatmul`]) needs over 100.
//!
//! Per block `b` of a row: `sum_i w_i x_i = d dx sum_i q_i xq_i + m xs`,
//! with `w_i = d q_i + m` (Q4_0: `m = -8d`; Q8_0 stores `q + 128`, so
//! `m = -128d`), `x_i = dx xq_i` and `xs = dx sum_i xq_i`.

use half::f16;

use crate::qmatmul::by_row_tasks;
use crate::quant::{QKind, QMat};

/// Blocks per group: the lanes of a 512-bit vector.
const LANES: usize = 16;
/// Rows one task computes.
const ROWS_PER_TASK: usize = 32;
/// Tokens that share one unpacked group.
const TOKEN_TILE: usize = 4;

/// Whether this CPU runs the kernel (AVX-512 with VNNI).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::qrows::vnni::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[derive(Debug, Clone)]
pub struct LaneMat {
    /// Q4_1 (also for Q4_0) or Q8_0.
    pub kind: QKind,
    pub rows: usize,
    pub cols: usize,
    /// Whole groups of sixteen blocks per row.
    full: usize,
    /// Blocks left over per row (`cols / 32 % 16`).
    tail: usize,
    /// Rows whose tails share one group: the tails of `bundle` consecutive
    /// rows fill `bundle * tail <= 16` lanes, so a 576-wide row (one group
    /// and two blocks) costs about one group and an eighth, not two.
    bundle: usize,
    /// Per row, its whole groups one after another (`bpb` bytes per block).
    qs: Vec<u8>,
    /// Per row, the whole groups' scales.
    d: Vec<f16>,
    /// Q4_1's minimums; Q8_0's are `-128 d`, computed in the kernel.
    m: Vec<f16>,
    /// Per bundle of rows, their tails: a group of sixteen lanes (zeros past
    /// `bundle * tail`), lane `k * tail + l` holding row `k`'s tail block `l`.
    tq: Vec<u8>,
    td: Vec<f16>,
    tm: Vec<f16>,
}

impl LaneMat {
    /// Repacks Q4_0, Q4_1 or Q8_0 blocks; `None` for other formats (or a
    /// Q4_0 scale too large to rewrite as Q4_1).
    pub fn pack(q: &QMat) -> Option<LaneMat> {
        let q41;
        let q = match q.kind {
            QKind::Q4_1 | QKind::Q8_0 => q,
            QKind::Q4_0 => {
                q41 = q.q4_0_as_q4_1()?;
                &q41
            }
            _ => return None,
        };
        let q4 = q.kind == QKind::Q4_1;
        let (nb, bb) = (q.cols / 32, q.kind.block_bytes());
        let (full, tail) = (nb / LANES, nb % LANES);
        let bundle = LANES.checked_div(tail).unwrap_or(1);
        let bundles = q.rows.div_ceil(bundle);
        let bpb = if q4 { 16 } else { 32 };
        let off = if q4 { 4 } else { 2 };
        let mut p = LaneMat {
            kind: q.kind,
            rows: q.rows,
            cols: q.cols,
            full,
            tail,
            bundle,
            qs: crate::qmatmul::huge_page_vec(q.rows * full * LANES * bpb),
            d: Vec::with_capacity(q.rows * full * LANES),
            m: Vec::new(),
            tq: Vec::new(),
            td: Vec::new(),
            tm: Vec::new(),
        };
        let block = |r: usize, b: usize| &q.row(r)[b * bb..(b + 1) * bb];
        let f16_at = |blk: &[u8], at: usize| f16::from_le_bytes([blk[at], blk[at + 1]]);
        // Word `j` of a block, as the kernel multiplies it.
        let word = |blk: &[u8], j: usize| -> [u8; 4] {
            let w = &blk[off + 4 * j..off + 4 * j + 4];
            if q4 {
                [w[0], w[1], w[2], w[3]]
            } else {
                [w[0] ^ 0x80, w[1] ^ 0x80, w[2] ^ 0x80, w[3] ^ 0x80]
            }
        };
        for r in 0..q.rows {
            for b in 0..full * LANES {
                p.d.push(f16_at(block(r, b), 0));
                if q4 {
                    p.m.push(f16_at(block(r, b), 2));
                }
            }
            for g in 0..full {
                for j in 0..bpb / 4 {
                    for l in 0..LANES {
                        p.qs.extend(word(block(r, g * LANES + l), j));
                    }
                }
            }
        }
        if tail > 0 {
            // Lane `k * tail + l` of bundle `u`: row `u * bundle + k`, block
            // `full * 16 + l`; lanes past the rows are zero.
            let lane_block = |u: usize, lane: usize| {
                let (k, l) = (lane / tail, lane % tail);
                let r = u * bundle + k;
                (k < bundle && r < q.rows).then(|| block(r, full * LANES + l))
            };
            for u in 0..bundles {
                for lane in 0..LANES {
                    let blk = lane_block(u, lane);
                    p.td.push(blk.map_or(f16::ZERO, |b| f16_at(b, 0)));
                    p.tm.push(blk.filter(|_| q4).map_or(f16::ZERO, |b| f16_at(b, 2)));
                }
                for j in 0..bpb / 4 {
                    for lane in 0..LANES {
                        p.tq.extend(lane_block(u, lane).map_or([0; 4], |b| word(b, j)));
                    }
                }
            }
        }
        Some(p)
    }

    pub fn bytes(&self) -> usize {
        self.qs.len()
            + self.tq.len()
            + 2 * (self.d.len() + self.m.len() + self.td.len() + self.tm.len())
    }

    fn q4(&self) -> bool {
        self.kind == QKind::Q4_1
    }

    /// Bytes per block.
    fn bpb(&self) -> usize {
        if self.q4() {
            16
        } else {
            32
        }
    }

    /// `out[t, r] = sum_c self[r, c] * x[t, c]` for `t` tokens, with `x`
    /// quantized to 8 bits per block of 32.
    pub fn matmul(&self, x: &[f32], t: usize, out: &mut [f32]) {
        assert_eq!(x.len(), t * self.cols, "activations are [t, cols]");
        assert_eq!(out.len(), t * self.rows, "output is [t, rows]");
        let a = LaneActs::new(x, t, self.cols, self.bundle);
        // Tasks start on a bundle.
        let per_task = ROWS_PER_TASK.next_multiple_of(self.bundle);
        by_row_tasks(self.rows, t, per_task, out, |r0, o| {
            #[cfg(target_arch = "x86_64")]
            if available() {
                // SAFETY: available() saw AVX-512F/BW/VL, VNNI and F16C;
                // `rows` asserts the sizes.
                return unsafe { avx512::rows(self, r0, &a, o) };
            }
            self.rows_scalar(r0, &a, o)
        });
    }

    /// The same arithmetic without SIMD, lane by lane (the reference the
    /// kernel is tested against, and the path on CPUs without VNNI).
    fn rows_scalar(&self, r0: usize, a: &LaneActs, out: &mut [f32]) {
        let t = a.t;
        for (j, o) in out.chunks_exact_mut(t).enumerate() {
            for (n, o) in o.iter_mut().enumerate() {
                *o = self.dot_scalar(r0 + j, a, n);
            }
        }
    }

    /// One lane's contribution: `w` its weight words, `act` its group.
    fn lane_scalar(
        &self,
        w: impl Fn(usize) -> [u8; 4],
        act: &ActGroup,
        lane: usize,
        d: f32,
        m: f32,
    ) -> (f32, f32) {
        let mut isum = 0i32;
        for j in 0..self.bpb() / 4 {
            let w = w(j);
            for i in 0..4 {
                let at = |k: usize| act.q[k * 64 + 4 * lane + i] as i32;
                if self.q4() {
                    isum += (w[i] & 0x0F) as i32 * at(j) + (w[i] >> 4) as i32 * at(j + 4);
                } else {
                    isum += w[i] as i32 * at(j);
                }
            }
        }
        let m = if self.q4() { m } else { -128.0 * d };
        (isum as f32 * (d * act.dx[lane]), m * act.xs[lane])
    }

    fn dot_scalar(&self, r: usize, a: &LaneActs, n: usize) -> f32 {
        let bpb = self.bpb();
        let mut sum = 0f32;
        let row = &self.qs[r * self.full * LANES * bpb..];
        for g in 0..self.full {
            let gq = &row[g * LANES * bpb..];
            let act = a.group(n, g);
            for l in 0..LANES {
                let at = r * self.full * LANES + g * LANES + l;
                let m = self.m.get(at).map_or(0.0, |v| v.to_f32());
                let (p, q) = self.lane_scalar(
                    |j| {
                        gq[(j * LANES + l) * 4..(j * LANES + l) * 4 + 4]
                            .try_into()
                            .expect("a word")
                    },
                    &act,
                    l,
                    self.d[at].to_f32(),
                    m,
                );
                sum += p + q;
            }
        }
        if self.tail > 0 {
            let (u, k) = (r / self.bundle, r % self.bundle);
            let gq = &self.tq[u * LANES * bpb..];
            let act = a.group(n, self.full);
            for l in 0..self.tail {
                let lane = k * self.tail + l;
                let (p, q) = self.lane_scalar(
                    |j| {
                        gq[(j * LANES + lane) * 4..(j * LANES + lane) * 4 + 4]
                            .try_into()
                            .expect("a word")
                    },
                    &act,
                    lane,
                    self.td[u * LANES + lane].to_f32(),
                    self.tm[u * LANES + lane].to_f32(),
                );
                sum += p + q;
            }
        }
        sum
    }
}

/// Each token's activations as 8-bit values in the kernel's lane layout.
pub struct LaneActs {
    t: usize,
    /// Groups per token: the whole groups, then the tail group (its blocks
    /// repeated for each row of a bundle) when the rows have a tail.
    groups: usize,
    /// `[t, groups, 8, 64]`: word `k` of sixteen blocks' values per vector.
    q: Vec<i8>,
    /// `[t, groups, 16]`: each block's scale.
    dx: Vec<f32>,
    /// `[t, groups, 16]`: each block's sum of its values times its scale.
    xs: Vec<f32>,
}

/// One token's group of sixteen lanes.
struct ActGroup<'a> {
    q: &'a [i8],
    dx: &'a [f32],
    xs: &'a [f32],
}

impl LaneActs {
    /// `bundle`: rows sharing the tail group ([`LaneMat`]).
    pub fn new(x: &[f32], t: usize, cols: usize, bundle: usize) -> LaneActs {
        let nb = cols / 32;
        let (full, tail) = (nb / LANES, nb % LANES);
        let groups = full + usize::from(tail > 0);
        let mut a = LaneActs {
            t,
            groups,
            q: vec![0; t * groups * 512],
            dx: vec![0.0; t * groups * LANES],
            xs: vec![0.0; t * groups * LANES],
        };
        for n in 0..t {
            for (b, xb) in x[n * cols..(n + 1) * cols].chunks_exact(32).enumerate() {
                let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d > 0.0 { 1.0 / d } else { 0.0 };
                let mut q = [0i8; 32];
                let mut sum = 0i32;
                for (q, v) in q.iter_mut().zip(xb) {
                    *q = (v * id).round() as i8;
                    sum += *q as i32;
                }
                // The lanes this block fills: one in a whole group, one per
                // bundled row in the tail group.
                let (g, lanes) = if b < full * LANES {
                    (b / LANES, b % LANES..b % LANES + 1)
                } else {
                    (full, 0..bundle)
                };
                let base = (n * groups + g) * 512;
                for k in lanes {
                    let l = if b < full * LANES {
                        k
                    } else {
                        k * tail + b % LANES
                    };
                    for (i, &q) in q.iter().enumerate() {
                        a.q[base + (i / 4) * 64 + 4 * l + i % 4] = q;
                    }
                    let s = (n * groups + g) * LANES + l;
                    a.dx[s] = d;
                    a.xs[s] = d * sum as f32;
                }
            }
        }
        a
    }

    fn group(&self, n: usize, g: usize) -> ActGroup<'_> {
        let i = n * self.groups + g;
        ActGroup {
            q: &self.q[i * 512..(i + 1) * 512],
            dx: &self.dx[i * LANES..(i + 1) * LANES],
            xs: &self.xs[i * LANES..(i + 1) * LANES],
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{LaneActs, LaneMat, LANES, TOKEN_TILE};
    use half::f16;
    use std::arch::x86_64::*;

    /// # Safety
    /// Needs AVX-512F/BW/VL, VNNI and F16C. `out` is `[rows, a.t]` from row
    /// `r0`, which starts a bundle.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    pub unsafe fn rows(m: &LaneMat, r0: usize, a: &LaneActs, out: &mut [f32]) {
        let t = a.t;
        let n_rows = out.len() / t;
        assert!(
            r0 + n_rows <= m.rows
                && r0.is_multiple_of(m.bundle)
                && a.groups == m.full + usize::from(m.tail > 0),
            "rows or activations out of range"
        );
        let tiles = || {
            (0..t)
                .step_by(TOKEN_TILE)
                .map(move |t0| (t0, (t - t0).min(TOKEN_TILE)))
        };
        // Each row's whole groups, then each bundle's tails, in token tiles.
        macro_rules! tiled {
            ($f:ident, $r:expr, $t0:expr, $n:expr, $o:expr) => {
                match (m.q4(), $n) {
                    (true, 4) => $f::<true, 4>(m, $r, a, $t0, $o),
                    (true, 3) => $f::<true, 3>(m, $r, a, $t0, $o),
                    (true, 2) => $f::<true, 2>(m, $r, a, $t0, $o),
                    (true, _) => $f::<true, 1>(m, $r, a, $t0, $o),
                    (false, 4) => $f::<false, 4>(m, $r, a, $t0, $o),
                    (false, 3) => $f::<false, 3>(m, $r, a, $t0, $o),
                    (false, 2) => $f::<false, 2>(m, $r, a, $t0, $o),
                    (false, _) => $f::<false, 1>(m, $r, a, $t0, $o),
                }
            };
        }
        for (j, o) in out.chunks_exact_mut(t).enumerate() {
            for (t0, n) in tiles() {
                tiled!(row, r0 + j, t0, n, &mut o[t0..t0 + n]);
            }
        }
        if m.tail == 0 {
            return;
        }
        for k0 in (0..n_rows).step_by(m.bundle) {
            let o = &mut out[k0 * t..(k0 + m.bundle).min(n_rows) * t];
            for (t0, n) in tiles() {
                tiled!(tail, r0 + k0, t0, n, o);
            }
        }
    }

    /// One group of sixteen lanes (`q`: its weight words, `d`/`mn`: its
    /// scales and minimums) against tokens `t0..t0 + N`'s group `g`, added
    /// to `acc`.
    #[inline(always)]
    unsafe fn group<const Q4: bool, const N: usize>(
        q: *const u8,
        d: *const f16,
        mn: *const f16,
        a: &LaneActs,
        g: usize,
        t0: usize,
        acc: &mut [__m512; N],
    ) {
        let low = _mm512_set1_epi8(0x0F);
        // Q4 word j's low nibbles pair with activation word j, its high
        // nibbles with word j + 4; Q8_0 has eight words.
        let mut w = [_mm512_setzero_si512(); 8];
        if Q4 {
            for j in 0..4 {
                let v = _mm512_loadu_si512(q.add(j * 64) as *const _);
                w[j] = _mm512_and_si512(v, low);
                w[j + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            }
        } else {
            for (j, w) in w.iter_mut().enumerate() {
                *w = _mm512_loadu_si512(q.add(j * 64) as *const _);
            }
        }
        let dv = _mm512_cvtph_ps(_mm256_loadu_si256(d as *const __m256i));
        let mv = if Q4 {
            _mm512_cvtph_ps(_mm256_loadu_si256(mn as *const __m256i))
        } else {
            _mm512_mul_ps(dv, _mm512_set1_ps(-128.0))
        };
        for n in 0..N {
            let i = (t0 + n) * a.groups + g;
            let xq = a.q.as_ptr().add(i * 512);
            let mut isum = _mm512_setzero_si512();
            for (k, wk) in w.iter().enumerate() {
                let xv = _mm512_loadu_si512(xq.add(k * 64) as *const _);
                isum = _mm512_dpbusd_epi32(isum, *wk, xv);
            }
            let dx = _mm512_loadu_ps(a.dx.as_ptr().add(i * LANES));
            let xs = _mm512_loadu_ps(a.xs.as_ptr().add(i * LANES));
            acc[n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(dv, dx), acc[n]);
            acc[n] = _mm512_fmadd_ps(mv, xs, acc[n]);
        }
    }

    /// Row `r`'s whole groups against tokens `t0..t0 + N`, into `out`.
    #[inline(always)]
    unsafe fn row<const Q4: bool, const N: usize>(
        m: &LaneMat,
        r: usize,
        a: &LaneActs,
        t0: usize,
        out: &mut [f32],
    ) {
        let bpb = m.bpb();
        let mut acc = [_mm512_setzero_ps(); N];
        // SAFETY (every access): row r's whole groups and their scales lie
        // in `qs`, `d` and `m`; token t0 + n < a.t has `groups` groups.
        for g in 0..m.full {
            let at = (r * m.full + g) * LANES;
            let mn = if Q4 {
                m.m.as_ptr().add(at)
            } else {
                m.d.as_ptr()
            };
            group::<Q4, N>(
                m.qs.as_ptr().add(at * bpb),
                m.d.as_ptr().add(at),
                mn,
                a,
                g,
                t0,
                &mut acc,
            );
        }
        for n in 0..N {
            out[n] = _mm512_reduce_add_ps(acc[n]);
        }
    }

    /// The tails of the bundle starting at row `r` against tokens
    /// `t0..t0 + N`, added to `out` (`[bundle rows, a.t]`).
    #[inline(always)]
    unsafe fn tail<const Q4: bool, const N: usize>(
        m: &LaneMat,
        r: usize,
        a: &LaneActs,
        t0: usize,
        out: &mut [f32],
    ) {
        let (bpb, u, t) = (m.bpb(), r / m.bundle, a.t);
        let mut acc = [_mm512_setzero_ps(); N];
        // SAFETY: bundle u's group and scales lie in `tq`, `td` and `tm`;
        // the tail group is the tokens' last.
        let at = u * LANES;
        group::<Q4, N>(
            m.tq.as_ptr().add(at * bpb),
            m.td.as_ptr().add(at),
            m.tm.as_ptr().add(at),
            a,
            m.full,
            t0,
            &mut acc,
        );
        let lanes: __mmask16 = (1 << m.tail) - 1;
        for (k, o) in out.chunks_exact_mut(t).enumerate() {
            let mask = lanes << (k * m.tail);
            for n in 0..N {
                o[t0 + n] += _mm512_mask_reduce_add_ps(mask, acc[n]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::tests::random_qmat;
    use proptest::prelude::*;

    /// Token `n`'s activations as the kernel sees them (the tail as the
    /// bundle's first row does).
    fn dequantized(a: &LaneActs, n: usize, cols: usize) -> Vec<f32> {
        (0..cols)
            .map(|c| {
                let (b, i) = (c / 32, c % 32);
                let g = a.group(n, b / LANES);
                let l = b % LANES;
                g.q[(i / 4) * 64 + 4 * l + i % 4] as f32 * g.dx[l]
            })
            .collect()
    }

    proptest! {
        /// The kernel (and its scalar twin) equals the dequantized weights
        /// times the 8-bit activations, for every group length.
        #[test]
        fn kernel_equals_the_product_with_8_bit_activations(k in 0usize..3, seed in any::<u64>(), t in 1usize..11, blocks in 1usize..40, rows in 1usize..40) {
            let kind = [QKind::Q4_0, QKind::Q4_1, QKind::Q8_0][k];
            let cols = blocks * 32;
            let q = random_qmat(kind, rows, cols, seed);
            let w = LaneMat::pack(&q).expect("a lane format");
            let wf = q.to_f32();
            let x: Vec<f32> = (0..t * cols).map(|i| ((i as f32 * 1.3 + (seed % 97) as f32) * 0.11).cos()).collect();
            let a = LaneActs::new(&x, t, cols, w.bundle);
            let mut out = vec![0f32; t * rows];
            w.matmul(&x, t, &mut out);
            for n in 0..t {
                let xd = dequantized(&a, n, cols);
                for r in 0..rows {
                    let exact: f64 = (0..cols).map(|c| wf[r * cols + c] as f64 * xd[c] as f64).sum();
                    let scale: f64 = (0..cols).map(|c| (wf[r * cols + c] as f64 * xd[c] as f64).abs()).sum();
                    let got = out[n * rows + r] as f64;
                    prop_assert!((got - exact).abs() <= 1e-5 * (1.0 + scale), "{kind} {got} vs {exact}");
                    let scalar = w.dot_scalar(r, &a, n) as f64;
                    prop_assert!((got - scalar).abs() <= 1e-5 * (1.0 + scale), "scalar {scalar} vs {got}");
                }
            }
        }
    }

    /// 8-bit activations stay within a step of the f32 product.
    #[test]
    fn activations_quantize_within_a_step() {
        let x: Vec<f32> = (0..96).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let a = LaneActs::new(&x, 1, 96, 5);
        for (c, (v, q)) in x.iter().zip(dequantized(&a, 0, 96)).enumerate() {
            let amax = x[c / 32 * 32..c / 32 * 32 + 32]
                .iter()
                .fold(0f32, |m, v| m.max(v.abs()));
            assert!(
                (v - q).abs() <= amax / 127.0 * 0.5 + 1e-6,
                "{c}: {v} vs {q}"
            );
        }
    }
}
