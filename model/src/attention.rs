//! Attention over the paged KV cache, with grouped-query heads, batched over
//! sequences of different lengths. The same function serves a decode step
//! (one new token per sequence) and a prefill chunk (many new tokens of one
//! sequence attending to its cached prefix and causally to each other).

use rayon::prelude::*;

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

/// `q` is `[tokens, n_q * head_dim]` for the batch's new tokens in sequence
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
    }
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
    // (sequence, absolute position) of every new token.
    let tokens: Vec<(usize, usize)> = seqs
        .iter()
        .enumerate()
        .flat_map(|(s, span)| (0..span.n).map(move |i| (s, span.pos + i)))
        .collect();
    let scale = 1.0 / (hd as f32).sqrt();
    out.par_chunks_mut(hd)
        .enumerate()
        .for_each_init(Vec::new, |scores, (i, o)| {
            let (t, h) = (i / n_q, i % n_q);
            let (s, p) = tokens[t];
            let qv = &q[i * hd..(i + 1) * hd];
            attend_one(
                data,
                layout,
                layer,
                h / group,
                seqs[s].blocks,
                p + 1,
                qv,
                scale,
                scores,
                o,
            );
        });
}

#[allow(clippy::too_many_arguments)]
fn attend_one<T: KvElem>(
    data: &[T],
    layout: &KvLayout,
    layer: usize,
    kv_head: usize,
    blocks: &[BlockId],
    ctx: usize,
    q: &[f32],
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let (bs, hd, be) = (layout.block_size, layout.head_dim, layout.block_elems());
    let k_off = layout.offset(layer, 0, kv_head, 0);
    let v_off = layout.offset(layer, 1, kv_head, 0);
    scores.clear();
    let mut max = f32::NEG_INFINITY;
    for (bi, b) in blocks.iter().enumerate().take(ctx.div_ceil(bs)) {
        let base = b.0 as usize * be + k_off;
        let slots = (ctx - bi * bs).min(bs);
        for slot in 0..slots {
            let k = &data[base + slot * hd..base + (slot + 1) * hd];
            let s = dot(q, k) * scale;
            max = max.max(s);
            scores.push(s);
        }
    }
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    out.fill(0.0);
    for (bi, b) in blocks.iter().enumerate().take(ctx.div_ceil(bs)) {
        let base = b.0 as usize * be + v_off;
        let slots = (ctx - bi * bs).min(bs);
        for slot in 0..slots {
            let w = scores[bi * bs + slot];
            let v = &data[base + slot * hd..base + (slot + 1) * hd];
            for (o, v) in out.iter_mut().zip(v) {
                *o += w * v.to_f32();
            }
        }
    }
    let inv = 1.0 / sum;
    for o in out.iter_mut() {
        *o *= inv;
    }
}

#[inline]
fn dot<T: KvElem>(a: &[f32], b: &[T]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for j in 0..8 {
            acc[j] += a[c * 8 + j] * b[c * 8 + j].to_f32();
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..a.len() {
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
            group in 1usize..4,
            hd_half in 1usize..9,
            block_size in 1usize..7,
            layers in 1usize..3,
            lens in prop::collection::vec((1usize..30, 1usize..6), 1..4),
        ) {
            let hd = hd_half * 2;
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
