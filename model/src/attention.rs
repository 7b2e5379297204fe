//! Attention over the paged KV cache, with grouped-query heads, batched over
//! sequences of different lengths. The same function serves a decode step
//! (one new token per sequence) and a prefill chunk (many new tokens of one
//! sequence attending to its cached prefix and causally to each other).
//!
//! Long spans (prefill chunks) gather each KV head's keys and values into
//! contiguous matrices and run tiles of queries through two GEMMs, skipping
//! the keys a tile's causal mask hides. Short spans (decode) walk the blocks
//! directly, reading each key and value once for every query head of its
//! group.

use rayon::prelude::*;

use crate::gemm::{sgemm, Strides};
use crate::kv::{BlockId, KvElem, KvLayout, KvPool, KvStorage};

/// One sequence's part of a batch: `n` new tokens at positions `pos..pos + n`,
/// whose KV (with every earlier position's) lives in `blocks`.
#[derive(Debug, Clone, Copy)]
pub struct SeqSpan<'a> {
    pub pos: usize,
    pub n: usize,
    pub blocks: &'a [BlockId],
}

impl SeqSpan<'_> {
    /// Block and slot of absolute position `p`.
    pub fn locate(&self, p: usize, block_size: usize) -> (BlockId, usize) {
        (self.blocks[p / block_size], p % block_size)
    }
}

/// Spans with at least this many new tokens take the GEMM path.
const GEMM_MIN_TOKENS: usize = 16;
/// Query tokens per GEMM tile.
const QUERY_TILE: usize = 32;
/// Below this many (query head × key) products a decode batch runs on one thread.
const PARALLEL_MIN_WORK: usize = 1536;

/// `q` is `[tokens, n_q * head_dim]` for the batch's new tokens in span
/// order; `out` has the same shape. Query head `h` reads KV head `h / group`
/// of `layer` (indices local to the pool's slice). Every new token's K and V
/// must already be in the pool.
pub fn paged_attention(
    pool: &KvPool,
    layer: usize,
    seqs: &[SeqSpan],
    q: &[f32],
    n_q: usize,
    group: usize,
    out: &mut [f32],
) {
    match &pool.storage {
        KvStorage::F32(d) => attention_impl(d, &pool.layout, layer, seqs, q, n_q, group, out),
        KvStorage::F16(d) => attention_impl(d, &pool.layout, layer, seqs, q, n_q, group, out),
        KvStorage::Bf16(d) => attention_impl(d, &pool.layout, layer, seqs, q, n_q, group, out),
        // The CPU slice refuses device pools before it gets here.
        KvStorage::Device(_) => {}
    }
}

struct Ctx<'a, T> {
    data: &'a [T],
    layout: &'a KvLayout,
    layer: usize,
    n_q: usize,
    group: usize,
    scale: f32,
}

#[allow(clippy::too_many_arguments)]
fn attention_impl<T: KvElem>(
    data: &[T],
    layout: &KvLayout,
    layer: usize,
    seqs: &[SeqSpan],
    q: &[f32],
    n_q: usize,
    group: usize,
    out: &mut [f32],
) {
    let hd = layout.head_dim;
    let cx = Ctx {
        data,
        layout,
        layer,
        n_q,
        group,
        scale: 1.0 / (hd as f32).sqrt(),
    };
    let row = n_q * hd;
    let mut first = 0;
    // Short spans are gathered into one decode batch; long ones go one by one.
    let mut short: Vec<(usize, SeqSpan)> = Vec::new();
    for s in seqs {
        if s.n >= GEMM_MIN_TOKENS {
            prefill_span(
                &cx,
                s,
                &q[first * row..(first + s.n) * row],
                &mut out[first * row..(first + s.n) * row],
            );
        } else {
            short.push((first, *s));
        }
        first += s.n;
    }
    if !short.is_empty() {
        decode_spans(&cx, &short, q, out);
    }
}

/// Each (token, KV head) of short spans: walk the blocks once for the group's query heads.
fn decode_spans<T: KvElem>(cx: &Ctx<T>, spans: &[(usize, SeqSpan)], q: &[f32], out: &mut [f32]) {
    let hd = cx.layout.head_dim;
    let n_kv = cx.n_q / cx.group;
    // (token index, context length, KV head, the token's block table)
    let tasks: Vec<(usize, usize, usize, &[BlockId])> = spans
        .iter()
        .flat_map(|(first, s)| {
            (0..s.n)
                .flat_map(move |i| (0..n_kv).map(move |g| (first + i, s.pos + i + 1, g, s.blocks)))
        })
        .collect();
    let work: usize = tasks.iter().map(|(_, ctx, _, _)| ctx * cx.group).sum();
    let run = |&(tok, ctx, g, blocks): &(usize, usize, usize, &[BlockId]),
               scores: &mut Vec<f32>|
     -> Vec<f32> {
        let qo = tok * cx.n_q * hd + g * cx.group * hd;
        let mut o = vec![0f32; cx.group * hd];
        attend_group(
            cx,
            blocks,
            g,
            ctx,
            &q[qo..qo + cx.group * hd],
            scores,
            &mut o,
        );
        o
    };
    let results: Vec<Vec<f32>> = if work >= PARALLEL_MIN_WORK {
        tasks
            .par_iter()
            .map_init(Vec::new, |s, t| run(t, s))
            .collect()
    } else {
        let mut s = Vec::new();
        tasks.iter().map(|t| run(t, &mut s)).collect()
    };
    for ((tok, _, g, _), o) in tasks.iter().zip(results) {
        let off = tok * cx.n_q * hd + g * cx.group * hd;
        out[off..off + o.len()].copy_from_slice(&o);
    }
}

/// Attention of `group` query heads (`q`, `[group, hd]`) sharing KV head `g`
/// over positions `0..ctx`.
fn attend_group<T: KvElem>(
    cx: &Ctx<T>,
    blocks: &[BlockId],
    g: usize,
    ctx: usize,
    q: &[f32],
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let (bs, hd, be) = (
        cx.layout.block_size,
        cx.layout.head_dim,
        cx.layout.block_elems(),
    );
    let gs = cx.group;
    let k_off = cx.layout.offset(cx.layer, 0, g, 0);
    let v_off = cx.layout.offset(cx.layer, 1, g, 0);
    scores.clear();
    scores.resize(gs * ctx, 0.0);
    let n_blocks = ctx.div_ceil(bs);
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    if let Some(d) = T::as_f32(cx.data) {
        let rows = regs::Rows {
            data: d,
            blocks: &blocks[..n_blocks.min(blocks.len())],
            block_elems: be,
            k_off,
            v_off,
            bs,
            hd,
            ctx,
            scale: cx.scale,
        };
        if regs::attend(&rows, gs, q, scores, out) {
            return;
        }
    }
    let simd = T::as_f32(cx.data).filter(|_| hd % 16 == 0);
    for (bi, b) in blocks.iter().enumerate().take(n_blocks) {
        let base = b.0 as usize * be + k_off;
        for slot in 0..(ctx - bi * bs).min(bs) {
            let k = &cx.data[base + slot * hd..base + (slot + 1) * hd];
            for j in 0..gs {
                let qj = &q[j * hd..(j + 1) * hd];
                let s = match simd {
                    Some(d) => simd::dot(qj, &d[base + slot * hd..base + (slot + 1) * hd]),
                    None => dot(qj, k),
                };
                scores[j * ctx + bi * bs + slot] = s * cx.scale;
            }
        }
    }
    for j in 0..gs {
        crate::vmath::softmax(&mut scores[j * ctx..(j + 1) * ctx]);
    }
    out.fill(0.0);
    for (bi, b) in blocks.iter().enumerate().take(n_blocks) {
        let base = b.0 as usize * be + v_off;
        for slot in 0..(ctx - bi * bs).min(bs) {
            let v = &cx.data[base + slot * hd..base + (slot + 1) * hd];
            for j in 0..gs {
                let w = scores[j * ctx + bi * bs + slot];
                let oj = &mut out[j * hd..(j + 1) * hd];
                match simd {
                    Some(d) => simd::axpy(w, &d[base + slot * hd..base + (slot + 1) * hd], oj),
                    None => {
                        for (o, v) in oj.iter_mut().zip(v) {
                            *o += w * v.to_f32();
                        }
                    }
                }
            }
        }
    }
}

/// Decode attention over f32 KV with the group's query heads and outputs
/// held in registers: each key and value row is loaded once for every head
/// of the group, and the outputs are stored once at the end instead of after
/// every position. Head dimension 64 with up to four heads per group, or 128
/// with up to two; `attend` returns false for other shapes.
#[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
mod regs {
    use crate::kv::BlockId;
    use std::arch::x86_64::*;

    /// Where one KV head's rows of one sequence lie in the pool.
    pub struct Rows<'a> {
        pub data: &'a [f32],
        pub blocks: &'a [BlockId],
        pub block_elems: usize,
        pub k_off: usize,
        pub v_off: usize,
        pub bs: usize,
        pub hd: usize,
        pub ctx: usize,
        pub scale: f32,
    }

    /// Attention of `gs` query heads over `r`; false for shapes it leaves to
    /// the general path.
    pub fn attend(r: &Rows, gs: usize, q: &[f32], scores: &mut [f32], out: &mut [f32]) -> bool {
        let inside = r.blocks.iter().all(|b| {
            b.0 as usize * r.block_elems + r.k_off.max(r.v_off) + r.bs * r.hd <= r.data.len()
        });
        if r.blocks.len() * r.bs < r.ctx || !inside {
            return false;
        }
        // Up to sixteen registers of queries and as many of outputs.
        match (gs, r.hd) {
            (1, 64) => run::<1, 4>(r, q, scores, out),
            (2, 64) => run::<2, 4>(r, q, scores, out),
            (3, 64) => run::<3, 4>(r, q, scores, out),
            (4, 64) => run::<4, 4>(r, q, scores, out),
            (1, 128) => run::<1, 8>(r, q, scores, out),
            (2, 128) => run::<2, 8>(r, q, scores, out),
            _ => return false,
        }
        true
    }

    /// Lane `p` of the result is the sum of `a[p]`'s lanes: four rounds of
    /// pairwise shuffles and adds (45 operations where sixteen horizontal
    /// sums take about 130).
    #[inline(always)]
    unsafe fn sum16(a: &[__m512; 16]) -> __m512 {
        // Pairs: within each 128-bit lane, elements 0 and 2 hold a[2i]'s
        // partial sums, 1 and 3 a[2i + 1]'s.
        let mut p = [_mm512_setzero_ps(); 8];
        for (i, v) in p.iter_mut().enumerate() {
            let (x, y) = (a[2 * i], a[2 * i + 1]);
            *v = _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y));
        }
        // Quads: each 128-bit lane holds positions 4i..4i + 4 in order.
        let mut q = [_mm512_setzero_ps(); 4];
        for (i, v) in q.iter_mut().enumerate() {
            let (x, y) = (p[2 * i], p[2 * i + 1]);
            *v = _mm512_add_ps(
                _mm512_shuffle_ps::<0x44>(x, y),
                _mm512_shuffle_ps::<0xEE>(x, y),
            );
        }
        // Eights: 128-bit lanes 0-1 hold positions 8i..8i + 4, lanes 2-3
        // positions 8i + 4..8i + 8.
        let mut e = [_mm512_setzero_ps(); 2];
        for (i, v) in e.iter_mut().enumerate() {
            let (x, y) = (q[2 * i], q[2 * i + 1]);
            *v = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x88>(x, y),
                _mm512_shuffle_f32x4::<0xDD>(x, y),
            );
        }
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x88>(e[0], e[1]),
            _mm512_shuffle_f32x4::<0xDD>(e[0], e[1]),
        )
    }

    /// `G` query heads of `V * 16` dimensions.
    fn run<const G: usize, const V: usize>(
        r: &Rows,
        q: &[f32],
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let Rows {
            data,
            blocks,
            block_elems,
            k_off,
            v_off,
            bs,
            ctx,
            scale,
            ..
        } = *r;
        let hd = V * 16;
        assert!(q.len() >= G * hd && out.len() >= G * hd && scores.len() >= G * ctx);
        // SAFETY: AVX-512F is enabled at compile time. Every row read below
        // is block b's slot s < bs at b * block_elems + k_off (or v_off) +
        // s * hd, inside `data` (`attend` checked), for positions < ctx
        // (which the blocks hold); q, out and scores as asserted.
        unsafe {
            let mut qv = [[_mm512_setzero_ps(); V]; G];
            for (j, qj) in qv.iter_mut().enumerate() {
                for (c, v) in qj.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(q.as_ptr().add(j * hd + c * 16));
                }
            }
            let dp = data.as_ptr();
            let sp = scores.as_mut_ptr();
            for (bi, b) in blocks.iter().enumerate() {
                let base = b.0 as usize * block_elems + k_off;
                let n = (ctx - bi * bs).min(bs);
                if bs == 16 {
                    // Sixteen positions' dot products summed together
                    // (one transposing reduction instead of sixteen).
                    for (j, qj) in qv.iter().enumerate() {
                        let mut acc = [_mm512_setzero_ps(); 16];
                        for (slot, a) in acc.iter_mut().enumerate().take(n) {
                            let k = dp.add(base + slot * hd);
                            for (c, qc) in qj.iter().enumerate() {
                                *a = _mm512_fmadd_ps(*qc, _mm512_loadu_ps(k.add(c * 16)), *a);
                            }
                        }
                        let mask: __mmask16 = if n == 16 { 0xFFFF } else { (1u16 << n) - 1 };
                        _mm512_mask_storeu_ps(
                            sp.add(j * ctx + bi * bs),
                            mask,
                            _mm512_mul_ps(sum16(&acc), _mm512_set1_ps(scale)),
                        );
                    }
                    continue;
                }
                for slot in 0..n {
                    let k = dp.add(base + slot * hd);
                    let mut acc = [_mm512_setzero_ps(); G];
                    for c in 0..V {
                        let kv = _mm512_loadu_ps(k.add(c * 16));
                        for j in 0..G {
                            acc[j] = _mm512_fmadd_ps(qv[j][c], kv, acc[j]);
                        }
                    }
                    for j in 0..G {
                        *sp.add(j * ctx + bi * bs + slot) = _mm512_reduce_add_ps(acc[j]) * scale;
                    }
                }
            }
            for j in 0..G {
                crate::vmath::softmax(&mut scores[j * ctx..(j + 1) * ctx]);
            }
            let sp = scores.as_ptr();
            let mut o = [[_mm512_setzero_ps(); V]; G];
            for (bi, b) in blocks.iter().enumerate() {
                let base = b.0 as usize * block_elems + v_off;
                for slot in 0..(ctx - bi * bs).min(bs) {
                    let v = dp.add(base + slot * hd);
                    let at = bi * bs + slot;
                    let mut w = [_mm512_setzero_ps(); G];
                    for (j, w) in w.iter_mut().enumerate() {
                        *w = _mm512_set1_ps(*sp.add(j * ctx + at));
                    }
                    for c in 0..V {
                        let vv = _mm512_loadu_ps(v.add(c * 16));
                        for j in 0..G {
                            o[j][c] = _mm512_fmadd_ps(w[j], vv, o[j][c]);
                        }
                    }
                }
            }
            for (j, oj) in o.iter().enumerate() {
                for (c, v) in oj.iter().enumerate() {
                    _mm512_storeu_ps(out.as_mut_ptr().add(j * hd + c * 16), *v);
                }
            }
        }
    }
}

/// Vector kernels for f32 KV with head dimensions that are multiples of 16.
mod simd {
    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
        assert!(a.len() == b.len() && a.len().is_multiple_of(16));
        #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
        {
            use std::arch::x86_64::*;
            // SAFETY: AVX-512F is enabled at compile time; every 16-wide load is inside both slices (checked above).
            unsafe {
                let mut acc = _mm512_setzero_ps();
                for c in (0..a.len()).step_by(16) {
                    acc = _mm512_fmadd_ps(
                        _mm512_loadu_ps(a.as_ptr().add(c)),
                        _mm512_loadu_ps(b.as_ptr().add(c)),
                        acc,
                    );
                }
                _mm512_reduce_add_ps(acc)
            }
        }
        #[cfg(not(all(target_arch = "x86_64", target_feature = "avx512f")))]
        {
            super::dot(a, b)
        }
    }

    /// `out += w * v`
    pub fn axpy(w: f32, v: &[f32], out: &mut [f32]) {
        assert!(v.len() == out.len() && v.len().is_multiple_of(16));
        #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
        {
            use std::arch::x86_64::*;
            // SAFETY: AVX-512F is enabled at compile time; every 16-wide access is inside both slices (checked above).
            unsafe {
                let wv = _mm512_set1_ps(w);
                for c in (0..v.len()).step_by(16) {
                    let o = out.as_mut_ptr().add(c);
                    _mm512_storeu_ps(
                        o,
                        _mm512_fmadd_ps(wv, _mm512_loadu_ps(v.as_ptr().add(c)), _mm512_loadu_ps(o)),
                    );
                }
            }
        }
        #[cfg(not(all(target_arch = "x86_64", target_feature = "avx512f")))]
        {
            for (o, v) in out.iter_mut().zip(v) {
                *o += w * v;
            }
        }
    }
}

/// A long span: per KV head, gather K and V, then tiles of queries through GEMMs.
fn prefill_span<T: KvElem>(cx: &Ctx<T>, s: &SeqSpan, q: &[f32], out: &mut [f32]) {
    let (hd, gs) = (cx.layout.head_dim, cx.group);
    let n_kv = cx.n_q / gs;
    let ctx = s.pos + s.n;
    let kv: Vec<(Vec<f32>, Vec<f32>)> = (0..n_kv)
        .into_par_iter()
        .map(|g| {
            (
                gather(cx, s.blocks, g, 0, ctx),
                gather(cx, s.blocks, g, 1, ctx),
            )
        })
        .collect();
    let tiles: Vec<(usize, usize)> = (0..n_kv)
        .flat_map(|g| (0..s.n).step_by(QUERY_TILE).map(move |t0| (g, t0)))
        .collect();
    let results: Vec<Vec<f32>> = tiles
        .par_iter()
        .map(|&(g, t0)| {
            let t1 = (t0 + QUERY_TILE).min(s.n);
            let rows = (t1 - t0) * gs;
            let mut qt = vec![0f32; rows * hd];
            for t in t0..t1 {
                let src = t * cx.n_q * hd + g * gs * hd;
                qt[(t - t0) * gs * hd..(t - t0 + 1) * gs * hd]
                    .copy_from_slice(&q[src..src + gs * hd]);
            }
            let keys = s.pos + t1;
            let (k, v) = &kv[g];
            let mut sc = vec![0f32; rows * keys];
            sgemm(
                rows,
                keys,
                hd,
                &qt,
                Strides::row_major(hd),
                k,
                Strides::col_major(hd),
                &mut sc,
                false,
            );
            for (r, srow) in sc.chunks_mut(keys).enumerate() {
                let visible = s.pos + t0 + r / gs + 1;
                for x in srow[..visible].iter_mut() {
                    *x *= cx.scale;
                }
                crate::vmath::softmax(&mut srow[..visible]);
                srow[visible..].fill(0.0);
            }
            let mut o = vec![0f32; rows * hd];
            sgemm(
                rows,
                hd,
                keys,
                &sc,
                Strides::row_major(keys),
                v,
                Strides::row_major(hd),
                &mut o,
                false,
            );
            o
        })
        .collect();
    for (&(g, t0), o) in tiles.iter().zip(results) {
        for (r, orow) in o.chunks(gs * hd).enumerate() {
            let dst = (t0 + r) * cx.n_q * hd + g * gs * hd;
            out[dst..dst + gs * hd].copy_from_slice(orow);
        }
    }
}

/// K (`kv = 0`) or V (`kv = 1`) of head `g` for positions `0..ctx`, as `[ctx, hd]`.
fn gather<T: KvElem>(cx: &Ctx<T>, blocks: &[BlockId], g: usize, kv: usize, ctx: usize) -> Vec<f32> {
    let (bs, hd, be) = (
        cx.layout.block_size,
        cx.layout.head_dim,
        cx.layout.block_elems(),
    );
    let off = cx.layout.offset(cx.layer, kv, g, 0);
    let mut m = Vec::with_capacity(ctx * hd);
    for (bi, b) in blocks.iter().enumerate().take(ctx.div_ceil(bs)) {
        let base = b.0 as usize * be + off;
        let n = (ctx - bi * bs).min(bs) * hd;
        m.extend(cx.data[base..base + n].iter().map(|v| v.to_f32()));
    }
    m
}

#[inline]
fn dot<T: KvElem>(a: &[f32], b: &[T]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = a.len() / 16;
    for c in 0..chunks {
        for j in 0..16 {
            acc[j] += a[c * 16 + j] * b[c * 16 + j].to_f32();
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 16..a.len() {
        s += a[i] * b[i].to_f32();
    }
    s
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::KvDtype;
    use proptest::prelude::*;

    /// Plain attention over contiguous K/V, the reference the paged path must equal.
    fn dense_attention(k: &[Vec<f32>], v: &[Vec<f32>], q: &[f32], hd: usize) -> Vec<f32> {
        let scale = 1.0 / (hd as f32).sqrt();
        let s: Vec<f32> = k
            .iter()
            .map(|k| k.iter().zip(q).map(|(a, b)| a * b).sum::<f32>() * scale)
            .collect();
        let m = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f32 = e.iter().sum();
        (0..hd)
            .map(|d| e.iter().zip(v).map(|(w, v)| w * v[d]).sum::<f32>() / z)
            .collect()
    }

    fn val(seed: u64, a: usize, b: usize, c: usize, d: usize) -> f32 {
        let x = seed
            .wrapping_mul(31)
            .wrapping_add((a * 7919 + b * 104729 + c * 1299709 + d * 15485863) as u64);
        ((x as f64 * 0.000_123_7).sin() * 2.0) as f32
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn paged_equals_dense(
            seed in 0u64..10_000,
            kv_heads in 1usize..4,
            group in 1usize..5,
            // Small head dimensions, and 64 and 128 (the register path).
            hd in prop_oneof![(1usize..9).prop_map(|h| h * 2), Just(64usize), Just(128usize)],
            // Small blocks, and the engine's 16 (the register path's tiles).
            block_size in prop_oneof![1usize..7, Just(16usize)],
            layers in 1usize..3,
            lens in prop::collection::vec((0usize..30, prop_oneof![1usize..6, 16usize..70]), 1..4),
        ) {
            let n_q = kv_heads * group;
            let layout = KvLayout { layers, kv_heads, block_size, head_dim: hd, dtype: KvDtype::F32 };
            let total_blocks: usize = lens.iter().map(|(c, n)| layout.blocks_for(c + n)).sum();
            let mut pool = KvPool::new(layout, total_blocks + 3);
            // Hand out blocks in a scrambled order so tables are not contiguous.
            let mut ids: Vec<BlockId> = (0..(total_blocks + 3) as u32).map(BlockId).collect();
            ids.reverse();
            ids.swap(0, total_blocks / 2);
            let mut next = 0;
            let mut tables = Vec::new();
            for (s, (cached, n)) in lens.iter().enumerate() {
                let nb = layout.blocks_for(cached + n);
                let table: Vec<BlockId> = ids[next..next + nb].to_vec();
                next += nb;
                for layer in 0..layers {
                    for h in 0..kv_heads {
                        for p in 0..cached + n {
                            let (b, slot) = (table[p / block_size], p % block_size);
                            let k: Vec<f32> = (0..hd).map(|d| val(seed, s, layer * 10 + h, p, d)).collect();
                            let v: Vec<f32> = (0..hd).map(|d| val(seed + 1, s, layer * 10 + h, p, d)).collect();
                            pool.write(b, layer, 0, h, slot, &k).unwrap();
                            pool.write(b, layer, 1, h, slot, &v).unwrap();
                        }
                    }
                }
                tables.push(table);
            }
            let spans: Vec<SeqSpan> = lens.iter().zip(&tables).map(|((c, n), t)| SeqSpan { pos: *c, n: *n, blocks: t }).collect();
            let tokens: usize = lens.iter().map(|(_, n)| n).sum();
            let q: Vec<f32> = (0..tokens * n_q * hd).map(|i| val(seed + 2, i, 0, 0, 0)).collect();
            for layer in 0..layers {
                let mut out = vec![0f32; q.len()];
                paged_attention(&pool, layer, &spans, &q, n_q, group, &mut out);
                let mut t = 0;
                for (s, (cached, n)) in lens.iter().enumerate() {
                    for i in 0..*n {
                        let p = cached + i;
                        for h in 0..n_q {
                            let kvh = h / group;
                            let k: Vec<Vec<f32>> = (0..=p).map(|pp| (0..hd).map(|d| val(seed, s, layer * 10 + kvh, pp, d)).collect()).collect();
                            let v: Vec<Vec<f32>> = (0..=p).map(|pp| (0..hd).map(|d| val(seed + 1, s, layer * 10 + kvh, pp, d)).collect()).collect();
                            let qo = (t * n_q + h) * hd;
                            let want = dense_attention(&k, &v, &q[qo..qo + hd], hd);
                            for d in 0..hd {
                                prop_assert!((out[qo + d] - want[d]).abs() < 1e-4, "seq {} pos {} head {} dim {}: {} vs {}", s, p, h, d, out[qo + d], want[d]);
                            }
                        }
                        t += 1;
                    }
                }
            }
        }
    }
}
