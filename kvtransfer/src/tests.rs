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
        // Checked element by element against the layouts, not through a plan.
        let l = whole.layout;
        for (rd, rank) in rank_descs.iter().zip(&ranks) {
            for b in 0..blocks {
                let got = rank.block_bytes(BlockId(b as u32)).expect("block");
                let want = reference.block_bytes(BlockId(b as u32)).expect("block");
                let eb = dtype.bytes();
                for layer in 0..layers {
                    for kv in 0..2 {
                        for head in rd.heads.clone() {
                            let n = l.block_size * l.head_dim * eb;
                            let g = rd.layout.offset(layer, kv, head - rd.heads.start, 0) * eb;
                            let w = l.offset(layer, kv, head, 0) * eb;
                            prop_assert_eq!(&got[g..g + n], &want[w..w + n], "rank {:?} block {} layer {} kv {} head {}", rd.heads, b, layer, kv, head);
                        }
                    }
                }
            }
        }
    }
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
