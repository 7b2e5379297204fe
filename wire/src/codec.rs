//! Frames on QUIC streams: a 4-byte little-endian length, then the postcard
//! encoding of one message. Lengths above the limit are refused before any
//! allocation, so a hostile peer cannot make a node reserve gigabytes.

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::{Result, WireError};

/// Largest frame a node accepts unless told otherwise (KV chunks included).
pub const MAX_FRAME: usize = 64 << 20;

/// The bytes of one frame's payload.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>> {
    postcard::to_stdvec(msg).map_err(|e| WireError::Decode(format!("cannot encode: {e}")))
}

/// A message from one frame's payload; trailing bytes are an error.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    let (msg, rest) =
        postcard::take_from_bytes(bytes).map_err(|e| WireError::Decode(e.to_string()))?;
    if !rest.is_empty() {
        return Err(WireError::Decode(format!(
            "{} trailing bytes after the message",
            rest.len()
        )));
    }
    Ok(msg)
}

pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(w: &mut W, msg: &T) -> Result<()> {
    let body = encode(msg)?;
    if body.len() > MAX_FRAME {
        return Err(WireError::FrameTooLarge {
            size: body.len(),
            limit: MAX_FRAME,
        });
    }
    let io = |e: std::io::Error| WireError::Connection(format!("write failed: {e}"));
    w.write_all(&(body.len() as u32).to_le_bytes())
        .await
        .map_err(io)?;
    w.write_all(&body).await.map_err(io)?;
    Ok(())
}

/// Reads one frame; `Ok(None)` when the stream ended cleanly before it.
pub async fn read_frame<R: AsyncRead + Unpin, T: DeserializeOwned>(
    r: &mut R,
    limit: usize,
) -> Result<Option<T>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(WireError::Connection(format!("read failed: {e}"))),
    }
    let size = u32::from_le_bytes(len) as usize;
    if size > limit {
        return Err(WireError::FrameTooLarge { size, limit });
    }
    let mut body = vec![0u8; size];
    r.read_exact(&mut body)
        .await
        .map_err(|e| WireError::Connection(format!("frame cut short: {e}")))?;
    decode(&body).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{Hello, Role, PROTOCOL_VERSION};

    #[tokio::test]
    async fn frames_round_trip_and_oversized_ones_are_refused() {
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            cluster: "c".into(),
            node: "d0".into(),
            role: Role::Decode { group: "d0".into() },
            process: Default::default(),
        };
        let mut buf = Vec::new();
        write_frame(&mut buf, &hello).await.expect("write");
        write_frame(&mut buf, &hello).await.expect("write");
        let mut r = &buf[..];
        assert_eq!(
            read_frame::<_, Hello>(&mut r, MAX_FRAME)
                .await
                .expect("read"),
            Some(hello.clone())
        );
        assert_eq!(
            read_frame::<_, Hello>(&mut r, MAX_FRAME)
                .await
                .expect("read"),
            Some(hello)
        );
        assert_eq!(
            read_frame::<_, Hello>(&mut r, MAX_FRAME)
                .await
                .expect("clean end"),
            None
        );
        let mut huge = (u32::MAX).to_le_bytes().to_vec();
        huge.extend([0; 8]);
        let err = read_frame::<_, Hello>(&mut &huge[..], MAX_FRAME)
            .await
            .expect_err("too large");
        assert!(matches!(err, WireError::FrameTooLarge { .. }));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bytes in [&b""[..], &b"\xff\xff\xff\xff\xff"[..], &[7u8; 100][..]] {
            assert!(decode::<Hello>(bytes).is_err());
        }
    }
}
