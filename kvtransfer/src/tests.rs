use proptest::prelude::*;
use tandem_model::{BlockId, KvDtype, KvPool, SliceSpec};

use super::*;

fn fill(pool: &mut KvPool, desc: &PoolDesc, blocks: usize, seed: u64) {
    // Value of (global layer, kv, global head, slot, dim) in block b: the
    // same number whichever pool holds it.
    let l = desc.layout;
    for b in 0..blocks {
        for layer in desc.layers.clone() {
            for kv in 0..2 {
                for head in desc.heads.clone() {
                    for slot in 0..l.block_size {
                        let v: Vec<f32> = (0..l.head_dim)
                            .map(|d| {
                                ((seed as usize
                                    + b * 7919
                                    + layer * 104_729
                                    + kv * 31
                                    + head * 1_299_709
                                    + slot * 15_485_863
                                    + d)
                                    % 100_003) as f32
                                    * 0.001
                            })
                            .collect();
                        pool.write(
                            BlockId(b as u32),
                            layer - desc.layers.start,
                            kv,
                            head - desc.heads.start,
                            slot,
                            &v,
                        )
                        .expect("in range");
                    }
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    /// Stages holding layer ranges × all heads, ranks holding all layers ×
    /// a head shard: after every stage sends every block to every rank, each
    /// rank holds exactly what one process holding everything has for its heads.
    #[test]
    fn what_lands_on_each_rank_is_what_one_process_has(
        layers in 1usize..9,
        kv_heads in 1usize..7,
        pp_seed in 0usize..100,
        tp_pick in 0usize..6,
        block_size in 1usize..6,
        head_dim in 1usize..5,
        blocks in 1usize..4,
        half in any::<bool>(),
        seed in 0u64..1000,
    ) {
        let dtype = if half { KvDtype::F16 } else { KvDtype::F32 };
        let tps: Vec<usize> = (1..=kv_heads).filter(|t| kv_heads % t == 0).collect();
        let tp = tps[tp_pick % tps.len()];
        let pp = 1 + pp_seed % layers;
        let split = SliceSpec::even_split(layers, pp).expect("pp <= layers");
        let whole = PoolDesc::new(0..layers, 0..kv_heads, block_size, head_dim, dtype);
        let mut reference = KvPool::new(whole.layout, blocks);
        fill(&mut reference, &whole, blocks, seed);

        let per = kv_heads / tp;
        let rank_descs: Vec<PoolDesc> = (0..tp).map(|r| PoolDesc::new(0..layers, r * per..(r + 1) * per, block_size, head_dim, dtype)).collect();
        let mut ranks: Vec<KvPool> = rank_descs.iter().map(|d| KvPool::new(d.layout, blocks)).collect();
        for layers_of_stage in split {
            let sd = PoolDesc::new(layers_of_stage, 0..kv_heads, block_size, head_dim, dtype);
            let mut stage = KvPool::new(sd.layout, blocks);
            fill(&mut stage, &sd, blocks, seed);
            for (rd, rank) in rank_descs.iter().zip(ranks.iter_mut()) {
                let plan = reshard_plan(&sd, rd).expect("compatible");
                for b in 0..blocks {
                    let bytes = gather(&stage, BlockId(b as u32), &plan).expect("gather");
                    scatter(rank, BlockId(b as u32), &plan, &bytes).expect("scatter");
                }
            }
        }
        for (rd, rank) in rank_descs.iter().zip(&ranks) {
            let pairs: Vec<(BlockId, BlockId)> = (0..blocks).map(|b| (BlockId(b as u32), BlockId(b as u32))).collect();
            same_heads(rank, rd, &reference, &pairs)?;
        }
    }
}

/// Checks, element by element against the layouts (not through a plan),
/// that each `(dst, src)` block pair holds on `rank` what `reference` (every
/// layer, every head) holds for the rank's heads.
pub(crate) fn same_heads(
    rank: &KvPool,
    rd: &PoolDesc,
    reference: &KvPool,
    pairs: &[(BlockId, BlockId)],
) -> std::result::Result<(), TestCaseError> {
    let l = reference.layout;
    let eb = l.dtype.bytes();
    let n = l.block_size * l.head_dim * eb;
    for &(dst, src) in pairs {
        let got = rank.block_bytes(dst).expect("block");
        let want = reference.block_bytes(src).expect("block");
        for layer in 0..l.layers {
            for kv in 0..2 {
                for head in rd.heads.clone() {
                    let g = rd.layout.offset(layer, kv, head - rd.heads.start, 0) * eb;
                    let w = l.offset(layer, kv, head, 0) * eb;
                    prop_assert_eq!(
                        &got[g..g + n],
                        &want[w..w + n],
                        "rank {:?} block {:?} layer {} kv {} head {}",
                        rd.heads,
                        dst,
                        layer,
                        kv,
                        head
                    );
                }
            }
        }
    }
    Ok(())
}

#[test]
fn whole_blocks_move_as_one_run_and_mismatched_layouts_are_refused() {
    let a = PoolDesc::new(0..4, 0..3, 16, 64, KvDtype::F32);
    let plan = reshard_plan(&a, &a).expect("same layout");
    assert_eq!(
        plan,
        vec![CopyRun {
            src: 0,
            dst: 0,
            len: a.layout.block_elems()
        }]
    );
    let rank = PoolDesc::new(0..30, 1..2, 16, 64, KvDtype::F32);
    let stage = PoolDesc::new(10..20, 0..3, 16, 64, KvDtype::F32);
    let plan = reshard_plan(&stage, &rank).expect("compatible");
    assert_eq!(plan.len(), 20, "10 layers x K and V, one head each");
    assert!(plan.iter().all(|r| r.len == 16 * 64));
    let other = PoolDesc::new(0..30, 0..3, 32, 64, KvDtype::F32);
    assert!(reshard_plan(&stage, &other).is_err());
}

#[test]
fn the_checksum_notices_corruption_loss_and_reordering() {
    let blocks: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i; 64]).collect();
    let sum = |order: &[usize], corrupt: bool| {
        let mut c = Checksum::default();
        for &i in order {
            let mut b = blocks[i].clone();
            if corrupt && i == 2 {
                b[10] ^= 1;
            }
            c.add(BlockId(i as u32), &b);
        }
        c.value()
    };
    let good = sum(&[0, 1, 2, 3], false);
    assert_eq!(good, sum(&[0, 1, 2, 3], false));
    assert_ne!(good, sum(&[0, 1, 2, 3], true), "a flipped bit");
    assert_ne!(good, sum(&[0, 1, 3], false), "a lost block");
    assert_ne!(good, sum(&[0, 2, 1, 3], false), "blocks out of order");
}

mod transfer {
    use std::sync::mpsc;

    use proptest::prelude::*;
    use tandem_model::{BlockId, KvDtype, KvPool, SliceSpec};
    use tandem_wire::messages::{Lease, Message, RankTarget, RequestId};

    use super::fill;
    use crate::transfer::rank_desc;
    use crate::*;

    /// What can go wrong on the way.
    #[derive(Debug, Clone, Copy)]
    enum Fault {
        None,
        FlipByte,
        DropChunk,
    }

    /// Sends every stage's blocks through the in-process transport and
    /// applies what arrives to the ranks' pools the way a decode group does.
    #[allow(clippy::too_many_arguments)]
    fn run(
        layers: usize,
        kv_heads: usize,
        pp: usize,
        tp: usize,
        block_size: usize,
        head_dim: usize,
        blocks: usize,
        dtype: KvDtype,
        seed: u64,
        fault: Fault,
    ) -> (Vec<KvPool>, Vec<PoolDesc>, Option<Verdict>, KvPool) {
        let whole = PoolDesc::new(0..layers, 0..kv_heads, block_size, head_dim, dtype);
        let mut reference = KvPool::new(whole.layout, blocks);
        fill(&mut reference, &whole, blocks, seed);
        let per = kv_heads / tp;
        // Decode blocks are not the stage's: rank blocks are offset and reversed.
        let dst_blocks: Vec<BlockId> = (0..blocks).rev().map(|b| BlockId((b + 3) as u32)).collect();
        let targets: Vec<RankTarget> = (0..tp)
            .map(|r| RankTarget {
                rank: r as u32,
                heads: ((r * per) as u32, ((r + 1) * per) as u32),
                blocks: dst_blocks.clone(),
            })
            .collect();
        let rank_descs: Vec<PoolDesc> = targets
            .iter()
            .map(|t| rank_desc(layers, t, &whole))
            .collect();
        let mut ranks: Vec<KvPool> = rank_descs
            .iter()
            .map(|d| KvPool::new(d.layout, blocks + 3))
            .collect();
        let split = SliceSpec::even_split(layers, pp).expect("pp <= layers");
        let (tx, rx) = mpsc::channel();
        let transport = InProcess { tx };
        let (id, lease) = (RequestId(1), Lease(7));
        let local: Vec<BlockId> = (0..blocks).map(|b| BlockId(b as u32)).collect();
        for (s, stage_layers) in split.iter().enumerate() {
            let sd = PoolDesc::new(
                stage_layers.clone(),
                0..kv_heads,
                block_size,
                head_dim,
                dtype,
            );
            let mut pool = KvPool::new(sd.layout, blocks);
            fill(&mut pool, &sd, blocks, seed);
            let mut out = Outgoing::new(id, lease, s as u32, &sd, layers, &targets).expect("plan");
            // Two "chunks": the first block, then the rest, as after two prefill chunks.
            let mut sent = 0;
            for upto in [1.min(blocks), blocks] {
                for c in out.gather(&pool, &local, sent..upto, 64).expect("gather") {
                    transport.put(c).expect("put");
                }
                sent = upto;
            }
            for d in out.finish() {
                transport.done(d).expect("done");
            }
        }
        drop(transport);
        let allowed = vec![dst_blocks.clone(); tp];
        let mut incoming = Incoming::new(lease, pp as u32, allowed);
        let mut verdict = None;
        let mut n = 0;
        for m in rx {
            match m {
                Message::Kv(mut c) => {
                    n += 1;
                    match fault {
                        Fault::DropChunk if n == 1 => continue,
                        Fault::FlipByte if n == 1 => c.blocks[0].1[0] ^= 0x40,
                        _ => {}
                    }
                    incoming.accept(&c).expect("in bounds");
                    let sd = PoolDesc::new(
                        split[c.stage as usize].clone(),
                        0..kv_heads,
                        block_size,
                        head_dim,
                        dtype,
                    );
                    let plan = reshard_plan(&sd, &rank_descs[c.rank as usize]).expect("plan");
                    for (b, bytes) in &c.blocks {
                        scatter(&mut ranks[c.rank as usize], *b, &plan, bytes).expect("scatter");
                    }
                }
                Message::KvDone(d) => {
                    if let Some(v) = incoming.done(d) {
                        verdict = Some(v);
                    }
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        (ranks, rank_descs, verdict, reference)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// Through the transport, with the receiver's checks: each rank ends
        /// with exactly what one process has for its heads, and the verdict
        /// is Verified; a flipped byte or a lost chunk is never Verified.
        #[test]
        fn transfers_land_bit_identical_and_faults_are_caught(
            layers in 1usize..7,
            kv_heads in 1usize..5,
            pp_seed in 0usize..100,
            tp_pick in 0usize..4,
            block_size in 1usize..5,
            head_dim in 1usize..4,
            blocks in 1usize..4,
            half in any::<bool>(),
            seed in 0u64..1000,
        ) {
            let dtype = if half { KvDtype::Bf16 } else { KvDtype::F32 };
            let tps: Vec<usize> = (1..=kv_heads).filter(|t| kv_heads % t == 0).collect();
            let tp = tps[tp_pick % tps.len()];
            let pp = 1 + pp_seed % layers;
            let (ranks, descs, verdict, reference) = run(layers, kv_heads, pp, tp, block_size, head_dim, blocks, dtype, seed, Fault::None);
            prop_assert_eq!(verdict, Some(Verdict::Verified));
            let pairs: Vec<(BlockId, BlockId)> = (0..blocks)
                .map(|b| (BlockId((blocks - 1 - b + 3) as u32), BlockId(b as u32)))
                .collect();
            for (rd, rank) in descs.iter().zip(&ranks) {
                super::same_heads(rank, rd, &reference, &pairs)?;
            }
            for fault in [Fault::FlipByte, Fault::DropChunk] {
                let (_, _, verdict, _) = run(layers, kv_heads, pp, tp, block_size, head_dim, blocks, dtype, seed, fault);
                prop_assert!(matches!(verdict, Some(Verdict::Mismatch(_))), "{:?}: {:?}", fault, verdict);
            }
        }
    }

    #[test]
    fn blocks_outside_the_request_and_late_chunks_are_refused() {
        let lease = Lease(1);
        let mut inc = Incoming::new(lease, 1, vec![vec![BlockId(4)]]);
        let chunk = |b: u32| tandem_wire::messages::KvChunk {
            id: RequestId(1),
            lease,
            stage: 0,
            rank: 0,
            blocks: vec![(
                BlockId(b),
                tandem_wire::messages::ByteBuf::from(vec![1, 2, 3]),
            )],
        };
        assert!(inc.accept(&chunk(5)).is_err(), "not the request's block");
        let mut bad_rank = chunk(4);
        bad_rank.rank = 1;
        assert!(inc.accept(&bad_rank).is_err(), "no such rank");
        inc.accept(&chunk(4)).expect("its block");
        let mut sum = Checksum::default();
        sum.add(BlockId(4), &[1, 2, 3]);
        let done = tandem_wire::messages::KvDone {
            id: RequestId(1),
            lease,
            stage: 0,
            rank: 0,
            blocks: 1,
            checksum: sum.value(),
        };
        assert_eq!(inc.done(done), Some(Verdict::Verified));
        assert!(inc.accept(&chunk(4)).is_err(), "after the notice");
    }
}
