//! The core against a scripted world, in memory: a gateway, two pipelines
//! whose stages are fake processes (they take prefill requests, write
//! decode's blocks — directly, for the UCX pipeline — until they finish or
//! stop, and send KV, notices and the first token), this group's UCX
//! receives, and the clock. The world can do everything a peer or the
//! network can: delay an abort while writing on, drop a link mid-chunk and
//! bring it back, kill a stage process and start another under its name,
//! corrupt or replay messages, deliver notices out of order across stages,
//! never answer, let deadlines pass. After every event it checks that
//! - no block that a peer (or a receive in flight) may still write is ever
//!   handed to another attempt, computed into, or sent to a pipeline;
//! - every request gets at most one terminal event, and no token after it;
//!
//! and, once the faults stop and the world settles, that every request got
//! exactly one terminal event, every quarantine was released and no block
//! is held.

use proptest::prelude::*;
use tandem_model::BlockId;
use tandem_wire::messages::{ErrorClass, GenerateEvent, Lease, RequestId};

use super::*;

mod world;

use world::{World, STAGES};

#[derive(Debug, Clone)]
enum Move {
    Submit {
        len: usize,
        session: bool,
        pinned: bool,
        short: bool,
    },
    Cancel(usize),
    StageReads(usize),
    StageWorks(usize),
    Deliver(usize),
    Unlink(usize),
    Link(usize),
    Restart(usize),
    Corrupt,
    Replay(usize),
    Drain(usize),
    Step {
        fail: bool,
    },
    Tick(u64),
    GatewayBlip,
    Forge {
        pick: usize,
        who: usize,
    },
}

fn moves() -> impl Strategy<Value = Move> {
    prop_oneof![
        3 => (1usize..30, any::<bool>(), any::<bool>(), prop::bool::weighted(0.1))
            .prop_map(|(len, session, pinned, short)| Move::Submit { len, session, pinned, short }),
        1 => any::<usize>().prop_map(Move::Cancel),
        4 => (0usize..3).prop_map(Move::StageReads),
        3 => (0usize..3).prop_map(Move::StageWorks),
        6 => (0usize..3).prop_map(Move::Deliver),
        1 => (0usize..3).prop_map(Move::Unlink),
        2 => (0usize..3).prop_map(Move::Link),
        1 => (0usize..3).prop_map(Move::Restart),
        2 => Just(Move::Corrupt),
        1 => any::<usize>().prop_map(Move::Replay),
        2 => any::<usize>().prop_map(Move::Drain),
        4 => prop::bool::weighted(0.05).prop_map(|fail| Move::Step { fail }),
        2 => prop_oneof![Just(5u64), Just(200), Just(1_500)].prop_map(Move::Tick),
        1 => Just(Move::GatewayBlip),
        1 => (any::<usize>(), 0usize..3).prop_map(|(pick, who)| Move::Forge { pick, who }),
    ]
}

/// Plays one move; with `WORLD_TRACE` set, each move, what the stages read
/// and deliver and the core's actions are printed (to follow a shrunk
/// failing case).
fn play(w: &mut World, m: Move) {
    if std::env::var_os("WORLD_TRACE").is_some() {
        eprintln!("MOVE {m:?}");
    }
    match m {
        Move::Submit {
            len,
            session,
            pinned,
            short,
        } => w.submit(len, session, pinned, short),
        Move::Cancel(i) => w.cancel(i),
        Move::StageReads(i) => w.stage_reads(STAGES[i]),
        Move::StageWorks(i) => w.stage_works(STAGES[i]),
        Move::Deliver(i) => w.deliver(STAGES[i]),
        Move::Unlink(i) => w.unlink(STAGES[i]),
        Move::Link(i) => w.link(STAGES[i]),
        Move::Restart(i) => w.restart(STAGES[i]),
        Move::Corrupt => w.corrupt_next = true,
        Move::Replay(i) => {
            if !w.sent_log.is_empty() {
                let (from, msg) = w.sent_log[i % w.sent_log.len()].clone();
                w.decode_gets(from, msg);
            }
        }
        Move::Drain(i) => w.drain_one(i),
        Move::Forge { pick, who } => w.forge(pick, who),
        Move::Step { fail } => w.step(fail),
        Move::Tick(ms) => w.tick(ms),
        Move::GatewayBlip => {
            w.unlink_gateway();
            // Every request of a lost gateway ends (the gateway fails them).
            for id in w.submitted.clone() {
                w.ended.entry(id).or_insert(1);
            }
            w.link_gateway();
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Random event orders with every fault, over each way KV can land.
    #[test]
    fn no_block_a_peer_may_write_is_reused_and_every_request_ends_once(
        ucx in prop_oneof![Just(UcxLanding::None), Just(UcxLanding::Messages), Just(UcxLanding::Puts)],
        local in prop_oneof![Just(0usize), Just(6)],
        script in prop::collection::vec(moves(), 1..200),
    ) {
        let mut w = World::new(ucx, local);
        for m in script {
            play(&mut w, m);
        }
        w.settle();
    }
}

/// A world with one request whose pipeline p0 writes directly, and the
/// request's current attempt.
fn one_request_on_p0() -> (World, RequestId, Lease, Vec<BlockId>) {
    let mut w = World::new(UcxLanding::Puts, 0);
    w.submit(9, false, true, false);
    let id = w.submitted[0];
    w.stage_reads("p0-s0");
    w.stage_reads("p0-s1");
    let (&(rid, lease), blocks) = w.attempt_blocks.iter().next().expect("an attempt");
    assert_eq!(rid, id);
    let blocks = blocks.clone();
    (w, id, lease, blocks)
}

/// A stage that goes on writing after decode gave the attempt up (here:
/// the request was cancelled) keeps the blocks out of use until it says it
/// stopped, however long that takes; the next request must use others.
#[test]
fn late_writes_after_an_abort_keep_the_blocks_out_of_use_until_the_stage_confirms() {
    let (mut w, id, lease, blocks) = one_request_on_p0();
    w.cancel(0);
    assert_eq!(w.core.admission.quarantined_blocks(), blocks.len());
    // A day passes: nothing frees the blocks but the stages.
    w.tick(24 * 3_600_000);
    assert_eq!(w.core.admission.quarantined_blocks(), blocks.len());
    // New requests fill the pool: none of them gets a quarantined block
    // (the world's check fails the test if one did).
    for _ in 0..4 {
        w.submit(9, false, true, false);
    }
    // Stage 0 stops and says so; stage 1 still writes.
    w.stage_reads("p0-s0");
    w.deliver("p0-s0");
    assert!(w.core.fenced_attempts() >= 1);
    assert!(w.core.admission.quarantined(id, lease));
    w.settle();
}

/// A link that drops mid-chunk proves nothing: the stage process, still
/// mapping the pool, may go on writing. The blocks wait until it links
/// back and confirms.
#[test]
fn a_link_lost_mid_chunk_frees_nothing_until_the_stage_is_back_and_confirms() {
    let (mut w, id, lease, blocks) = one_request_on_p0();
    w.unlink("p0-s1");
    // The attempt is retried on the other pipeline; its blocks stay out.
    assert!(w.core.admission.quarantined(id, lease));
    assert_eq!(w.core.admission.quarantined_blocks(), blocks.len());
    w.tick(24 * 3_600_000);
    assert!(
        w.core.admission.quarantined(id, lease),
        "time frees nothing"
    );
    // Stage 0 confirms; stage 1 is still away.
    w.stage_reads("p0-s0");
    w.deliver("p0-s0");
    assert!(w.core.admission.quarantined(id, lease));
    // Back, it hears of the abort again and confirms.
    w.link("p0-s1");
    w.stage_reads("p0-s1");
    w.deliver("p0-s1");
    assert!(!w.core.admission.quarantined(id, lease));
    w.settle();
}

/// A stage process that died writes nothing: its blocks come back once the
/// host says so. A new process under the same name cannot vouch for the
/// old one.
#[test]
fn a_dead_writer_is_known_by_its_process_not_by_its_name() {
    let (mut w, id, lease, _) = one_request_on_p0();
    w.unlink("p0-s0");
    w.unlink("p0-s1");
    // p0-s1 restarts: the new process answers the reminder, but the old
    // one is what may write.
    w.restart("p0-s1");
    w.stage_reads("p0-s1");
    w.deliver("p0-s1");
    assert!(w.core.admission.quarantined(id, lease));
    // p0-s0's process is alive and away: still waiting for it.
    w.tick(50);
    assert!(w.core.admission.quarantined(id, lease));
    w.restart("p0-s0");
    w.tick(50);
    assert!(
        !w.core.admission.quarantined(id, lease),
        "both writers' processes are gone"
    );
    w.settle();
}

/// A receive still in flight on this side after the fence closed keeps the
/// blocks too: they come back when it completes.
#[test]
fn blocks_wait_for_this_sides_receives_in_flight() {
    let mut w = World::new(UcxLanding::Messages, 0);
    let mut found = None;
    for _ in 0..60 {
        w.submit(9, false, true, false);
        let id = *w.submitted.last().expect("submitted");
        w.stage_reads("p0-s0");
        w.stage_reads("p0-s1");
        w.cancel(w.submitted.len() - 1);
        if let Some(k) = w.receiving.iter().find(|k| k.0 == id) {
            found = Some(*k);
            break;
        }
    }
    let (id, lease) = found.expect("some attempt closed with a receive in flight");
    assert!(w.core.admission.quarantined(id, lease));
    w.tick(24 * 3_600_000);
    assert!(w.core.admission.quarantined(id, lease));
    w.receiving.remove(&(id, lease));
    let a = w.core.landing_drained(id, lease, w.now);
    w.apply(a);
    assert!(!w.core.admission.quarantined(id, lease));
    w.settle();
}

/// Notices out of order across stages and ranks, the first token before
/// any KV: the request starts once all are in, exactly once.
#[test]
fn completions_out_of_order_start_the_request_once() {
    let (mut w, id, _, _) = one_request_on_p0();
    w.stage_works("p0-s1");
    w.stage_works("p0-s0");
    // The last stage's messages (its KV, notices, first token) first.
    while !w.stages["p0-s1"].outbox.is_empty() {
        w.deliver("p0-s1");
    }
    assert!(!w.streams.contains_key(&id), "not before stage 0's KV");
    while !w.stages["p0-s0"].outbox.is_empty() {
        w.deliver("p0-s0");
    }
    assert!(w.streams.contains_key(&id) || w.ended.contains_key(&id));
    w.settle();
}

/// A corrupted transfer is retried, and counts: the pipeline's attempts
/// in flight (derived from the requests) never go below zero or drift.
#[test]
fn a_checksum_mismatch_retries_once_and_counts_stay_exact() {
    let (mut w, id, lease, _) = one_request_on_p0();
    assert_eq!(w.core.inflight("p0"), 1);
    w.corrupt_next = true;
    w.stage_works("p0-s0");
    w.stage_works("p0-s1");
    for s in ["p0-s0", "p0-s1"] {
        while !w.stages[s].outbox.is_empty() {
            w.deliver(s);
        }
    }
    assert_eq!(w.core.admission.counters.checksum_failures, 1);
    assert!(!w.core.is_current(id, lease), "a new attempt");
    assert_eq!(w.core.inflight("p0") + w.core.inflight("p1"), 1);
    w.settle();
}

/// A stage that never answers: the attempt times out and is retried
/// elsewhere; its quarantined blocks stay out of use, never expire.
#[test]
fn a_stage_that_never_answers_is_retried_around_and_its_blocks_never_expire() {
    let (mut w, id, lease, blocks) = one_request_on_p0();
    w.tick(1_500);
    assert!(!w.core.is_current(id, lease));
    assert!(w.core.admission.quarantined(id, lease));
    assert!(w.core.admission.quarantined_blocks() >= blocks.len());
    w.tick(7 * 24 * 3_600_000);
    assert!(
        w.core.admission.quarantined(id, lease),
        "a week frees nothing"
    );
    w.settle();
}

/// A deadline is a deadline: not retried, and reported as such.
#[test]
fn a_prefill_deadline_fails_the_request_with_a_deadline_and_no_retry() {
    let (mut w, id, lease, _) = one_request_on_p0();
    let a = w.core.prefill_failed(
        "p0-s0",
        id,
        lease,
        ErrorClass::DeadlineExceeded,
        "the request's deadline passed during prefill".into(),
        w.now,
    );
    let failed = a.iter().any(|a| {
        matches!(
            a,
            Action::End {
                event: GenerateEvent::Failed {
                    class: ErrorClass::DeadlineExceeded,
                    ..
                },
                ..
            }
        )
    });
    assert!(failed, "{a:?}");
    w.apply(a);
    assert_eq!(w.core.admission.counters.retries, 0);
    // Its own deadline passing while queued ends it the same way.
    w.submit(5, false, true, true);
    let id2 = *w.submitted.last().expect("submitted");
    let mut saw = false;
    w.now += 1_000;
    for a in w.core.tick(w.now) {
        if let Action::End {
            id,
            event: GenerateEvent::Failed { class, .. },
            ..
        } = &a
        {
            saw |= *id == id2 && *class == ErrorClass::DeadlineExceeded;
        }
        w.apply(vec![a]);
    }
    assert!(saw);
    w.settle();
}

/// Only the gateway that sent a request can cancel it, and only that
/// pipeline's stages can write, confirm or fail its attempt.
#[test]
fn peers_act_only_on_what_they_were_given() {
    let (mut w, id, lease, _) = one_request_on_p0();
    let a = w.core.cancel("p1-s0", id, w.now);
    assert!(a.is_empty());
    let a = w
        .core
        .prefill_failed("p1-s0", id, lease, ErrorClass::Internal, "no".into(), w.now);
    assert!(a.is_empty());
    assert!(w.core.is_current(id, lease));
    let a = w.core.first_token(
        "p0-s0",
        id,
        lease,
        tandem_model::Sampled::new(3, -1.0),
        (0, 0, 0),
        w.now,
    );
    assert!(a.is_empty(), "only the last stage sends the first token");
    w.settle();
}

/// A request continued from an earlier attempt's tokens: the pipeline is
/// told where the answer starts, so penalties count those tokens as answer
/// (and so does decode for the tokens after).
#[test]
fn a_continued_request_tells_the_pipeline_where_its_answer_starts() {
    let mut w = World::new(UcxLanding::Puts, 0);
    let g = tandem_wire::messages::Generate {
        id: RequestId(77),
        prompt: (0..9).collect(),
        generated: vec![40, 41, 40],
        params: SamplingParams {
            frequency_penalty: 0.5,
            ..SamplingParams::greedy(8)
        },
        deadline_ms: w.now + 600_000,
        session: None,
        pipeline: Some("p0".into()),
        trace: Default::default(),
    };
    let a = w.core.submit(world::GW, g, w.now);
    let sent = a.iter().find_map(|a| match a {
        Action::Send {
            msg: Message::Prefill(p),
            ..
        } => Some(p.clone()),
        _ => None,
    });
    let p = sent.unwrap_or_else(|| panic!("no prefill request in {a:?}"));
    assert_eq!(p.tokens.len(), 12);
    assert_eq!(p.output_from, 9);
    assert_eq!(p.params.frequency_penalty, 0.5);
    w.apply(a);
    w.settle();
}
