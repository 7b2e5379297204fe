//! Mixture-of-experts FFNs: the router, the experts a slice holds, and how
//! tokens reach them. Every rank holds every expert cut to its share of the
//! width (EP 1, one all-reduce), or whole experts, its share of them (EP =
//! TP), with tokens sent to their experts' ranks and back by
//! [`AllToAll`](crate::comm::AllToAll).

use std::ops::Range;

use crate::comm::Collectives;
use crate::config::{ModelConfig, MoeConfig};
use crate::error::{ModelError, Result};
use crate::linear::{swiglu, Format, Formats, Linear};
use crate::slice::SliceSpec;
use crate::source::RawTensor;
use crate::weights::ExpertTensors;

/// A mixture-of-experts FFN: the router, and the experts this shard holds.
pub(crate) struct Moe {
    cfg: MoeConfig,
    hidden: usize,
    /// `[experts, hidden]`, dense f32 in every phase.
    router: Linear,
    /// Global index of `experts[0]`.
    first: usize,
    experts: Vec<Expert>,
    /// Width of each held expert (its share of it, at EP 1).
    width: usize,
    /// The group's ranks split the experts (EP = TP > 1): tokens travel to
    /// the rank holding their expert and back.
    split: bool,
}

/// One expert's SwiGLU FFN.
struct Expert {
    gate_up: Linear,
    down: Linear,
}

impl Moe {
    /// The router and the experts `spec` holds, from expert `first` on.
    pub(crate) fn load(
        router: Vec<f32>,
        first: usize,
        experts: Vec<ExpertTensors>,
        cfg: &ModelConfig,
        spec: &SliceSpec,
        formats: Formats,
    ) -> Result<Moe> {
        let moe = cfg.moe.ok_or_else(|| {
            ModelError::Invalid("a mixture-of-experts layer in a dense model".into())
        })?;
        Ok(Moe {
            cfg: moe,
            hidden: cfg.hidden,
            router: Linear::new(
                RawTensor::F32 {
                    shape: vec![router.len() / cfg.hidden, cfg.hidden],
                    data: router,
                },
                None,
                Formats::PREFILL,
            )?,
            first,
            experts: experts
                .into_iter()
                .map(|e| -> Result<Expert> {
                    Ok(Expert {
                        gate_up: Linear::new(e.gate_up, None, formats)?,
                        down: Linear::new(e.down, None, formats)?,
                    })
                })
                .collect::<Result<_>>()?,
            width: spec.expert_width(cfg).len(),
            split: spec.ep > 1,
        })
    }

    /// The experts' matrices (the router, f32 in every phase, left out).
    pub(crate) fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.experts.iter().flat_map(|e| [&e.gate_up, &e.down])
    }

    pub(crate) fn router_bytes(&self) -> usize {
        self.router.weight_bytes()
    }

    /// A mixture-of-experts FFN over `xn`, `[t, hidden]` (identical on every
    /// rank); returns the sum over ranks, identical on every rank too.
    ///
    /// EP 1: every rank routes every token and runs its share of each
    /// chosen expert's width; an all-reduce sums the shares. Split experts:
    /// each rank routes its share of the tokens, sends each (token, expert)
    /// pair to the rank holding the expert and gets the expert's output
    /// back (two all-to-alls), weights them, and an all-gather gives every
    /// rank every token's result. Either way a token's chosen experts are
    /// summed in the order the router ranked them.
    pub(crate) fn forward(
        &self,
        xn: &[f32],
        t: usize,
        comm: &dyn Collectives,
        fmt: Format,
    ) -> Result<Vec<f32>> {
        let (h, cfg, m) = (self.hidden, self.cfg, self);
        let (world, rank) = (comm.world(), comm.rank());
        // At EP 1 every rank routes every token and must choose the same
        // experts: the router's input is the same bits on every rank (an
        // all-reduce's result) and its product sums in a fixed order.
        let mine = if m.split {
            token_share(t, world, rank)
        } else {
            0..t
        };
        let xs = &xn[mine.start * h..mine.end * h];
        let n = mine.len();
        let logits = if n == 0 {
            Vec::new()
        } else {
            m.router.forward(xs, n, Format::Dense)?
        };
        let choices = route(&logits, cfg.experts, cfg.used, cfg.norm_topk);
        let k = cfg.used;
        if !m.split {
            let rows: Vec<(usize, &[f32])> = choices
                .iter()
                .enumerate()
                .map(|(i, &(e, _))| (e, &xs[(i / k) * h..(i / k + 1) * h]))
                .collect();
            let ys = self.run_experts(&rows, fmt)?;
            let mut out = combine(&choices, k, h, |i| &ys[i * h..(i + 1) * h]);
            comm.all_reduce_sum(&mut out)?;
            return Ok(out);
        }
        // Dispatch: each row is the expert's index, then the token's state.
        let per = cfg.experts / world;
        let mut send: Vec<Vec<f32>> = vec![Vec::new(); world];
        let mut at = Vec::with_capacity(choices.len());
        for (i, &(e, _)) in choices.iter().enumerate() {
            let d = e / per;
            at.push((d, send[d].len() / (h + 1)));
            send[d].push(e as f32);
            send[d].extend_from_slice(&xs[(i / k) * h..(i / k + 1) * h]);
        }
        let recv = comm.all_to_all(send)?;
        let rows: Vec<(usize, &[f32])> = recv
            .iter()
            .flat_map(|b| b.chunks_exact(h + 1).map(|r| (r[0] as usize, &r[1..])))
            .collect();
        // Only this rank may fail here while the others go on to the next
        // all-to-all: leave the group so that they fail too, not wait.
        let ys = self.run_experts(&rows, fmt).inspect_err(|_| comm.abort())?;
        // Each source gets its rows' outputs back, in the order it sent them.
        let mut back = Vec::with_capacity(world);
        let mut off = 0;
        for b in &recv {
            let c = b.len() / (h + 1);
            back.push(ys[off * h..(off + c) * h].to_vec());
            off += c;
        }
        let got = comm.all_to_all(back)?;
        let own = combine(&choices, k, h, |i| {
            let (d, j) = at[i];
            &got[d][j * h..(j + 1) * h]
        });
        let parts = comm.all_to_all(vec![own; world])?;
        let out: Vec<f32> = parts.concat();
        if out.len() != t * h {
            return Err(ModelError::Worker(format!(
                "expert all-gather returned {} values for {t} tokens",
                out.len()
            )));
        }
        Ok(out)
    }

    /// Runs each `(expert, state)` row through its expert, all rows of one
    /// expert as one batch; outputs `[rows, hidden]` in the rows' order.
    fn run_experts(&self, rows: &[(usize, &[f32])], fmt: Format) -> Result<Vec<f32>> {
        let (h, m) = (self.hidden, self);
        if let Some(&(e, _)) = rows
            .iter()
            .find(|(e, _)| !(m.first..m.first + m.experts.len()).contains(e))
        {
            return Err(ModelError::Worker(format!(
                "expert {e} was sent to a rank that does not hold it"
            )));
        }
        let mut out = vec![0f32; rows.len() * h];
        for (li, ex) in m.experts.iter().enumerate() {
            let e = m.first + li;
            let idx: Vec<usize> = (0..rows.len()).filter(|&i| rows[i].0 == e).collect();
            if idx.is_empty() {
                continue;
            }
            let mut x = Vec::with_capacity(idx.len() * h);
            for &i in &idx {
                x.extend_from_slice(rows[i].1);
            }
            let y = swiglu(&ex.gate_up, &ex.down, &x, idx.len(), m.width, fmt)?;
            for (j, &i) in idx.iter().enumerate() {
                out[i * h..(i + 1) * h].copy_from_slice(&y[j * h..(j + 1) * h]);
            }
        }
        Ok(out)
    }
}

/// Rank `rank`'s contiguous share of `t` tokens (the first `t % world`
/// ranks take one more).
fn token_share(t: usize, world: usize, rank: usize) -> Range<usize> {
    let (base, extra) = (t / world, t % world);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

/// Each token's chosen experts and their weights, `k` per token in the
/// router's order: softmax over all experts, the `k` most probable (the
/// lower index first at a tie), rescaled to sum to 1 when `norm`.
fn route(logits: &[f32], experts: usize, k: usize, norm: bool) -> Vec<(usize, f32)> {
    let mut out = Vec::with_capacity(logits.len() / experts.max(1) * k);
    for row in logits.chunks_exact(experts) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exps: Vec<f32> = row.iter().map(|v| (v - max).exp()).collect();
        let sum: f32 = exps.iter().sum();
        let mut order: Vec<usize> = (0..experts).collect();
        order.sort_by(|&a, &b| exps[b].total_cmp(&exps[a]).then(a.cmp(&b)));
        let chosen = &order[..k];
        let total: f32 = chosen.iter().map(|&e| exps[e] / sum).sum();
        for &e in chosen {
            let p = exps[e] / sum;
            out.push((e, if norm { p / total } else { p }));
        }
    }
    out
}

/// Per token, the weighted sum of its `k` experts' outputs (`y(i)` for
/// the `i`-th choice), in the router's order.
fn combine<'a>(
    choices: &[(usize, f32)],
    k: usize,
    h: usize,
    y: impl Fn(usize) -> &'a [f32],
) -> Vec<f32> {
    let mut out = vec![0f32; choices.len() / k.max(1) * h];
    for (i, &(_, w)) in choices.iter().enumerate() {
        let row = &mut out[(i / k) * h..(i / k + 1) * h];
        for (o, v) in row.iter_mut().zip(y(i)) {
            *o += w * v;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn routing_takes_the_most_probable_experts_and_renormalises() {
        // Probabilities ∝ e^[0, 2, 1, 2]: experts 1 and 3 tie; the lower wins.
        let logits = [0.0, 2.0, 1.0, 2.0];
        let r = route(&logits, 4, 2, true);
        assert_eq!((r[0].0, r[1].0), (1, 3));
        assert!((r[0].1 - 0.5).abs() < 1e-6 && (r[1].1 - 0.5).abs() < 1e-6);
        let r = route(&logits, 4, 3, false);
        assert_eq!(r.iter().map(|c| c.0).collect::<Vec<_>>(), [1, 3, 2]);
        let z = 1.0 + 2.0 * 2f32.exp() + 1f32.exp();
        assert!((r[2].1 - 1f32.exp() / z).abs() < 1e-6);
    }

    proptest! {
        #[test]
        fn shares_cover_every_token_once(t in 0usize..100, world in 1usize..8) {
            let mut next = 0;
            for r in 0..world {
                let s = token_share(t, world, r);
                prop_assert_eq!(s.start, next);
                prop_assert!(s.len() <= t / world + 1);
                next = s.end;
            }
            prop_assert_eq!(next, t);
        }

        #[test]
        fn routed_weights_sum_to_one_and_descend(
            logits in proptest::collection::vec(-8f32..8.0, 8..=8),
            k in 1usize..=8,
        ) {
            let r = route(&logits, 8, k, true);
            prop_assert_eq!(r.len(), k);
            let sum: f32 = r.iter().map(|c| c.1).sum();
            prop_assert!((sum - 1.0).abs() < 1e-5);
            for w in r.windows(2) {
                prop_assert!(w[0].1 >= w[1].1);
                prop_assert!(logits[w[0].0] >= logits[w[1].0]);
            }
            // Nothing left out beats anything chosen.
            let worst = r.iter().map(|c| logits[c.0]).fold(f32::INFINITY, f32::min);
            for (e, &l) in logits.iter().enumerate() {
                if !r.iter().any(|c| c.0 == e) {
                    prop_assert!(l <= worst);
                }
            }
        }
    }
}
