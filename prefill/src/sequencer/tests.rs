//! The sequencer alone: no links, no model.

use std::time::Instant;

use tandem_kvtransfer::PoolDesc;
use tandem_model::{BlockId, KvDtype, SamplingParams};
use tandem_wire::messages::{ErrorClass, Lease, Message, PrefillRequest, RankTarget, RequestId};

use super::*;

fn seq(index: usize, next: Option<&str>, blocks: usize) -> Sequencer {
    Sequencer::new(
        SeqConfig {
            index,
            prev: (index > 0).then(|| "p0-s0".to_string()),
            next: next.map(str::to_string),
            decode_groups: vec!["d0".into(), "d1".into()],
            chunk: 4,
            block_size: 4,
            n_kv_heads: 2,
            n_layers: 2,
            desc: PoolDesc::new(index..index + 1, 0..2, 4, 8, KvDtype::F32),
        },
        blocks,
    )
}

fn req(id: u64, lease: u128, tokens: usize, warm: bool) -> PrefillRequest {
    let need = tokens.div_ceil(4) as u32;
    PrefillRequest {
        id: RequestId(id),
        lease: Lease(lease),
        decode: "d0".into(),
        tokens: (0..tokens as u32).map(|t| t + 100 * id as u32).collect(),
        cached: 0,
        reuse_from: 0,
        reuse: true,
        targets: vec![RankTarget {
            rank: 0,
            heads: (0, 2),
            blocks: (0..need).map(BlockId).collect(),
        }],
        params: SamplingParams::greedy(1),
        output_from: tokens as u32,
        deadline_ms: u64::MAX,
        warm,
        trace: Default::default(),
    }
}

fn stopped(sends: &[Send]) -> bool {
    sends
        .iter()
        .any(|s| s.to == "d0" && matches!(s.msg, Message::KvStopped { .. }))
}

/// Decode's abort overtook the request from the stage before: the stage
/// says it stopped, so it must refuse the request when it comes; the abort
/// the stage before passes on after the request clears the tombstone.
#[test]
fn a_request_aborted_before_it_arrives_is_refused_when_it_does() {
    let now = Instant::now();
    let mut s = seq(1, None, 16);
    let out = s.abort("d0", RequestId(1), Lease(1), "d0".into(), now);
    assert!(stopped(&out));
    assert!(s.prefill("p0-s0", req(1, 1, 8, false), now).is_empty());
    assert!(
        s.reqs.is_empty() && !s.has_work(),
        "refused: it would write after saying it stopped"
    );
    // The stage before's abort: nothing more can come; the key is free.
    s.abort("p0-s0", RequestId(1), Lease(1), "d0".into(), now);
    s.prefill("p0-s0", req(1, 1, 8, false), now);
    assert_eq!(s.reqs.len(), 1);
    // Another attempt of the same request is not refused.
    let mut s = seq(1, None, 16);
    s.abort("d0", RequestId(2), Lease(1), "d0".into(), now);
    s.prefill("p0-s0", req(2, 2, 8, false), now);
    assert_eq!(s.reqs.len(), 1);
}

/// Stage 0 stops, says so, and passes decode's abort on to the next stage.
#[test]
fn stage_0_confirms_an_abort_and_passes_it_on() {
    let now = Instant::now();
    let mut s = seq(0, Some("p0-s1"), 16);
    s.link_up("p0-s1", now);
    let out = s.prefill("d0", req(1, 1, 10, false), now);
    assert!(matches!(&out[0], Send { to, msg: Message::Prefill(_) } if to == "p0-s1"));
    assert!(s.has_work());
    let out = s.abort("d0", RequestId(1), Lease(1), "d0".into(), now);
    assert!(stopped(&out));
    assert!(out
        .iter()
        .any(|s| s.to == "p0-s1" && matches!(s.msg, Message::PrefillAbort { .. })));
    assert!(!s.has_work() && s.reqs.is_empty());
    assert_eq!(s.cache.used_count(), 0, "its blocks are free");
}

/// Until the next stage is linked, prompts wait; then they start.
#[test]
fn prompts_wait_for_the_next_stage() {
    let now = Instant::now();
    let mut s = seq(0, Some("p0-s1"), 16);
    assert!(s.prefill("d0", req(1, 1, 8, false), now).is_empty());
    assert_eq!(s.waiting.len(), 1);
    let out = s.link_up("p0-s1", now);
    assert_eq!(out.len(), 1);
    assert_eq!(s.reqs.len(), 1);
}

/// A lost decode group's requests go; a lost next stage fails every
/// request to its decode group.
#[test]
fn lost_peers_end_the_work_that_needed_them() {
    let now = Instant::now();
    let mut s = seq(0, Some("p0-s1"), 16);
    s.link_up("p0-s1", now);
    s.prefill("d0", req(1, 1, 8, false), now);
    let mut other = req(2, 2, 8, false);
    other.decode = "d1".into();
    s.prefill("d1", other, now);
    assert!(s.link_down("d0", now).is_empty());
    assert_eq!(s.reqs.len(), 1);
    let out = s.link_down("p0-s1", now);
    assert!(out.iter().any(|x| x.to == "d1"
        && matches!(
            x.msg,
            Message::PrefillFailed {
                class: ErrorClass::NodeLost,
                ..
            }
        )));
    assert!(s.reqs.is_empty());
    assert_eq!(s.cache.used_count(), 0);
}

/// Cache warming runs only when nothing else waits.
#[test]
fn warming_work_goes_after_real_work() {
    let now = Instant::now();
    let mut s = seq(0, None, 32);
    s.prefill("d0", req(1, 1, 8, true), now);
    s.prefill("d0", req(2, 2, 8, false), now);
    let w = s.next_work().expect("work");
    assert_eq!(w.key.0, RequestId(2));
    assert!(!w.warm);
}

/// A prompt waits for blocks; a request finishing frees them (its full
/// blocks kept cached for prompts that share them).
#[test]
fn a_full_pool_holds_prompts_until_blocks_come_back() {
    let now = Instant::now();
    let mut s = seq(0, None, 3);
    s.prefill("d0", req(1, 1, 12, false), now);
    s.prefill("d0", req(2, 2, 12, false), now);
    assert_eq!((s.reqs.len(), s.waiting.len()), (1, 1));
    s.finished((RequestId(1), Lease(1)), now);
    assert_eq!((s.reqs.len(), s.waiting.len()), (1, 0));
    // A malformed request fails at once.
    let mut bad = req(3, 3, 8, false);
    bad.cached = 3;
    let out = s.prefill("d0", bad, now);
    assert!(matches!(
        out[0].msg,
        Message::PrefillFailed {
            class: ErrorClass::BadRequest,
            ..
        }
    ));
}

/// Only the decode group a request is for sends it to stage 0 or aborts
/// it; later stages take requests and activations only from the stage
/// before. Anything else is ignored, changing nothing.
#[test]
fn only_the_right_peers_start_stop_or_feed_an_attempt() {
    let now = Instant::now();
    let mut s = seq(0, None, 16);
    // A stage, a stranger, or another decode group naming d0.
    assert!(s.prefill("p0-s1", req(1, 1, 8, false), now).is_empty());
    assert!(s.prefill("stranger", req(1, 1, 8, false), now).is_empty());
    assert!(s.prefill("d1", req(1, 1, 8, false), now).is_empty());
    assert!(s.reqs.is_empty() && s.waiting.is_empty());
    // A request for a group that is not in the cluster.
    let mut r = req(2, 2, 8, false);
    r.decode = "stranger".into();
    assert!(s.prefill("stranger", r, now).is_empty());
    assert!(s.reqs.is_empty());
    // d0's own request runs; d1 cannot abort it, d0 can.
    s.prefill("d0", req(3, 3, 8, false), now);
    assert_eq!(s.reqs.len(), 1);
    assert!(s
        .abort("d1", RequestId(3), Lease(3), "d1".into(), now)
        .is_empty());
    assert!(s
        .abort("d1", RequestId(3), Lease(3), "d0".into(), now)
        .is_empty());
    assert!(s
        .abort("p0-s1", RequestId(3), Lease(3), "d0".into(), now)
        .is_empty());
    assert_eq!(s.reqs.len(), 1, "still running");
    assert!(stopped(&s.abort(
        "d0",
        RequestId(3),
        Lease(3),
        "d0".into(),
        now
    )));
    assert!(s.reqs.is_empty());
    // Stage 1 takes activations only from stage 0.
    let mut s = seq(1, None, 16);
    s.prefill("p0-s0", req(4, 4, 8, false), now);
    while s.next_work().is_some() {}
    let a = Activations {
        id: RequestId(4),
        lease: Lease(4),
        pos: 0,
        n: 4,
        hidden: vec![0.0; 8],
        warm: false,
    };
    s.activations("d0", a.clone());
    assert!(!s.has_work(), "activations from decode were taken");
    s.activations("p0-s0", a);
    assert!(s.has_work());
}
