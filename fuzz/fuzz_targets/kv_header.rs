//! The decode side's UCX handler against whatever header and length a peer
//! sends: it never panics, drops anything not under the open attempt's key,
//! and names only runs inside the rank's pool that add up to the length.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use tandem_kvtransfer::over_ucx::{KvHeader, Landing, RankMemory};
use tandem_kvtransfer::ucx::Placement;
use tandem_kvtransfer::CopyRun;
use tandem_model::BlockId;
use tandem_wire::codec;
use tandem_wire::messages::{Lease, RequestId};

const BLOCK: usize = 256;
const BLOCKS: usize = 8;
const BASE: usize = 1 << 20;
const KEY: Lease = Lease(0x1234_5678_9abc_def0_0fed_cba9_8765_4321);

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        return;
    }
    // No memory is touched here: the pool is an address range only.
    let landing = Landing::detached(
        vec![RankMemory { base: BASE, n_blocks: BLOCKS, block_bytes: BLOCK, elem_bytes: 4 }],
        |_| {},
    );
    let plan = vec![CopyRun { src: 0, dst: 8, len: 24 }, CopyRun { src: 24, dst: 0, len: 8 }];
    landing.open(RequestId(3), KEY, vec![(0..6).map(BlockId).collect()], HashMap::from([((0, 0), plan)]));
    let len = u64::from_le_bytes(data[..8].try_into().expect("8 bytes")) as usize;
    let mut rest = &data[8..];
    // Half the time a well-formed header (under the key or not), else raw bytes.
    let header = if rest[0] & 1 == 0 {
        rest = &rest[1..];
        codec::decode::<KvHeader>(rest).ok().map(|mut h| {
            if rest.first().is_some_and(|b| b & 2 == 0) {
                h.lease = KEY;
                h.id = RequestId(3);
            }
            codec::encode(&h).expect("encode")
        })
    } else {
        None
    }
    .unwrap_or_else(|| rest.to_vec());
    let parsed = codec::decode::<KvHeader>(&header).ok();
    match landing.place(&header, len) {
        Placement::Drop => {}
        Placement::Into { runs, done } => {
            let h = parsed.expect("only a well-formed header is placed");
            assert_eq!(h.lease, KEY, "placed under a wrong key");
            let total = runs.iter().try_fold(0usize, |a, r| a.checked_add(r.1));
            assert_eq!(total, Some(len), "runs do not add up to the length");
            for &(a, l) in &runs {
                assert!(a >= BASE && a + l <= BASE + BLOCK * BLOCKS, "a run outside the pool");
            }
            done(Ok(()));
        }
    }
});
