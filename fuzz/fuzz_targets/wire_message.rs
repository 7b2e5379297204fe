//! Whatever bytes a peer sends, decoding them as a message (or a handshake,
//! or a length-prefixed frame) returns a value or an error: no panic, no
//! allocation beyond the frame limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_wire::codec;
use tandem_wire::messages::{Hello, HelloReply, Message};

fuzz_target!(|data: &[u8]| {
    let _ = codec::decode::<Message>(data);
    let _ = codec::decode::<Hello>(data);
    let _ = codec::decode::<HelloReply>(data);
    // The framed reader, as a link reads a stream: a length prefix, then
    // that many bytes, refused past the limit.
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    rt.block_on(async {
        let mut r = data;
        while let Ok(Some(_)) = codec::read_frame::<_, Message>(&mut r, 1 << 20).await {}
    });
});
