//! A forward pass's metadata on the device: where each piece lives in the
//! meta buffer (i32 elements) and the host side that fills it.

use crate::attention::SeqSpan;
use crate::sampling::Draw;

/// Where each piece of a pass's metadata lives in the meta buffer (i32
/// elements), and the pass's counts.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub t: usize,
    pub s: usize,
    /// Single-token spans (split-KV decode attention) and longer ones.
    pub sd: usize,
    pub sp: usize,
    pub max_parts: usize,
    pub max_n: usize,
    pub tokens_in: bool,
    pub out: Out,
    pub off: Offsets,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Out {
    Hidden,
    Logits,
    Sample,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Offsets {
    pub(crate) ids: usize,
    pub(crate) tok_pos: usize,
    pub(crate) tok_block: usize,
    pub(crate) dec_tok: usize,
    pub(crate) dec_ctx: usize,
    pub(crate) dec_toff: usize,
    pub(crate) pre_tok: usize,
    pub(crate) pre_pos: usize,
    pub(crate) pre_n: usize,
    pub(crate) pre_toff: usize,
    pub(crate) last_row: usize,
    pub(crate) temperature: usize,
    pub(crate) top_k: usize,
    pub(crate) top_p: usize,
    pub(crate) u: usize,
    pub(crate) tables: usize,
    pub len: usize,
}

impl Offsets {
    pub(crate) fn new(t: usize, s: usize, sd: usize, sp: usize, tables: usize) -> Offsets {
        let mut at = 0;
        let mut take = |n: usize| {
            let o = at;
            at += n;
            o
        };
        let mut o = Offsets {
            ids: take(t),
            tok_pos: take(t),
            tok_block: take(t),
            dec_tok: take(sd),
            dec_ctx: take(sd),
            dec_toff: take(sd),
            pre_tok: take(sp),
            pre_pos: take(sp),
            pre_n: take(sp),
            pre_toff: take(sp),
            last_row: take(s),
            temperature: take(s),
            top_k: take(s),
            top_p: take(s),
            u: take(s),
            tables: take(tables),
            len: 0,
        };
        o.len = at;
        o
    }
}

/// The host side of a pass's metadata, laid out as [`Offsets`] says.
pub(crate) fn build_meta(
    plan: &Plan,
    ids: Option<&[u32]>,
    seqs: &[SeqSpan],
    block_size: usize,
    draws: Option<&[Draw]>,
    vocab: usize,
    table_width: Option<(usize, u32)>,
) -> Vec<i32> {
    let o = &plan.off;
    let mut m = vec![0i32; o.len];
    if let Some(ids) = ids {
        for (i, id) in ids.iter().enumerate() {
            m[o.ids + i] = *id as i32;
        }
    }
    let (mut ti, mut di, mut pi, mut toff) = (0usize, 0usize, 0usize, 0usize);
    for (si, s) in seqs.iter().enumerate() {
        let nb = (s.pos + s.n).div_ceil(block_size);
        let width = table_width.map_or(nb, |(w, _)| w);
        for (j, b) in s.blocks.iter().take(nb).enumerate() {
            m[o.tables + toff + j] = b.0 as i32;
        }
        if let Some((w, spare)) = table_width {
            for j in nb..w {
                m[o.tables + toff + j] = spare as i32;
            }
        }
        for i in 0..s.n {
            let p = s.pos + i;
            m[o.tok_pos + ti + i] = p as i32;
            m[o.tok_block + ti + i] = s.blocks[p / block_size].0 as i32;
        }
        if s.n == 1 {
            m[o.dec_tok + di] = ti as i32;
            m[o.dec_ctx + di] = (s.pos + 1) as i32;
            m[o.dec_toff + di] = toff as i32;
            di += 1;
        } else {
            m[o.pre_tok + pi] = ti as i32;
            m[o.pre_pos + pi] = s.pos as i32;
            m[o.pre_n + pi] = s.n as i32;
            m[o.pre_toff + pi] = toff as i32;
            pi += 1;
        }
        m[o.last_row + si] = (ti + s.n - 1) as i32;
        let d = draws
            .and_then(|d| d.get(si))
            .cloned()
            .unwrap_or(Draw::GREEDY);
        m[o.temperature + si] = d.temperature.to_bits() as i32;
        m[o.top_k + si] = d.top_k.min(vocab) as i32;
        m[o.top_p + si] = d.top_p.to_bits() as i32;
        m[o.u + si] = d.u.to_bits() as i32;
        ti += s.n;
        toff += width;
    }
    m
}
