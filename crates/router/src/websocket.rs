//! Upgraded connections (WebSocket and other protocols) relayed byte for byte, closed cleanly on drain.
//!
//! For WebSocket the relay follows frame boundaries in both directions, so that when the
//! drain deadline passes it can finish the frame in progress and then send each side a
//! close frame (1001, going away) instead of cutting a frame in half.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// Close frame with status 1001 (going away), as a server sends it: unmasked.
const CLOSE_TO_CLIENT: [u8; 4] = [0x88, 0x02, 0x03, 0xE9];

/// The same close frame as a client must send it: masked with a random key.
fn close_to_upstream() -> [u8; 8] {
    let mask = fastrand::u32(..).to_be_bytes();
    [
        0x88,
        0x82,
        mask[0],
        mask[1],
        mask[2],
        mask[3],
        0x03 ^ mask[0],
        0xE9 ^ mask[1],
    ]
}

/// Follows a WebSocket byte stream and knows where each frame ends.
#[derive(Debug, Default, Clone)]
pub struct FrameTracker {
    header: Vec<u8>,
    payload_left: u64,
}

impl FrameTracker {
    /// True between frames: cutting here leaves the peer a well-formed stream.
    pub fn at_boundary(&self) -> bool {
        self.header.is_empty() && self.payload_left == 0
    }

    /// Consumes bytes up to and including the end of the frame in progress (or of the next one
    /// when at a boundary); returns how many it consumed. Call again for the rest.
    pub fn consume_one_frame(&mut self, data: &[u8]) -> usize {
        let mut used = 0;
        while used < data.len() {
            if self.payload_left > 0 {
                let take =
                    (data.len() - used).min(self.payload_left.min(usize::MAX as u64) as usize);
                self.payload_left -= take as u64;
                used += take;
                if self.payload_left == 0 {
                    return used;
                }
                continue;
            }
            self.header.push(data[used]);
            used += 1;
            if let Some(payload) = self.complete_header() {
                self.header.clear();
                self.payload_left = payload;
                if payload == 0 {
                    return used;
                }
            }
        }
        used
    }

    /// Consumes all of `data`.
    pub fn consume(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let used = self.consume_one_frame(data);
            data = &data[used..];
        }
    }

    /// The payload length once the header is complete.
    fn complete_header(&self) -> Option<u64> {
        let h = &self.header;
        if h.len() < 2 {
            return None;
        }
        let masked = h[1] & 0x80 != 0;
        let (len_bytes, short) = match h[1] & 0x7F {
            126 => (2, None),
            127 => (8, None),
            n => (0, Some(u64::from(n))),
        };
        let needed = 2 + len_bytes + if masked { 4 } else { 0 };
        if h.len() < needed {
            return None;
        }
        Some(short.unwrap_or_else(|| {
            h[2..2 + len_bytes]
                .iter()
                .fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
        }))
    }
}

/// Relays between client and upstream until both sides close, or until `drain` is cancelled;
/// then each direction finishes its frame (within `grace`), sends a close frame if it is a
/// WebSocket, and shuts down. Returns bytes sent upstream and bytes sent to the client.
pub async fn tunnel<C, U>(
    client: C,
    upstream: U,
    websocket: bool,
    drain: &CancellationToken,
    grace: Duration,
) -> io::Result<(u64, u64)>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (client_read, client_write) = tokio::io::split(client);
    let (upstream_read, upstream_write) = tokio::io::split(upstream);
    let to_upstream = pump(
        client_read,
        upstream_write,
        websocket.then(|| close_to_upstream().to_vec()),
        drain,
        grace,
    );
    let to_client = pump(
        upstream_read,
        client_write,
        websocket.then(|| CLOSE_TO_CLIENT.to_vec()),
        drain,
        grace,
    );
    let (sent, received) = tokio::join!(to_upstream, to_client);
    Ok((sent?, received?))
}

async fn pump<R, W>(
    mut from: R,
    mut to: W,
    close_frame: Option<Vec<u8>>,
    drain: &CancellationToken,
    grace: Duration,
) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buffer = vec![0u8; 16 * 1024];
    let mut frames = FrameTracker::default();
    let mut total = 0u64;
    loop {
        let read = tokio::select! {
            biased;
            _ = drain.cancelled() => break,
            read = from.read(&mut buffer) => read?,
        };
        if read == 0 {
            to.shutdown().await?;
            return Ok(total);
        }
        to.write_all(&buffer[..read]).await?;
        total += read as u64;
        if close_frame.is_some() {
            frames.consume(&buffer[..read]);
        }
    }

    // Drain deadline: finish the frame in progress, then say goodbye.
    let Some(close_frame) = close_frame else {
        let _ = to.shutdown().await;
        return Ok(total);
    };
    let finish = async {
        while !frames.at_boundary() {
            let read = from.read(&mut buffer).await?;
            if read == 0 {
                return Ok::<bool, io::Error>(false);
            }
            let used = frames.consume_one_frame(&buffer[..read]);
            to.write_all(&buffer[..used]).await?;
            total += used as u64;
        }
        Ok(true)
    };
    let at_boundary = matches!(tokio::time::timeout(grace, finish).await, Ok(Ok(true)));
    if at_boundary {
        to.write_all(&close_frame).await?;
    }
    let _ = to.flush().await;
    let _ = to.shutdown().await;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(payload_len: usize, masked: bool) -> Vec<u8> {
        let mut f = vec![0x82];
        let mask_bit = if masked { 0x80 } else { 0 };
        match payload_len {
            n if n < 126 => f.push(mask_bit | n as u8),
            n if n <= 0xFFFF => {
                f.push(mask_bit | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(mask_bit | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if masked {
            f.extend_from_slice(&[1, 2, 3, 4]);
        }
        f.extend(std::iter::repeat_n(7u8, payload_len));
        f
    }

    #[test]
    fn boundaries_are_found_across_split_reads() {
        for (len, masked) in [
            (0, false),
            (5, true),
            (125, false),
            (300, true),
            (70_000, false),
        ] {
            let bytes = frame(len, masked);
            for split in [1, 2, 3, bytes.len() / 2, bytes.len() - 1] {
                if split == 0 || split >= bytes.len() {
                    continue;
                }
                let mut t = FrameTracker::default();
                t.consume(&bytes[..split]);
                assert!(!t.at_boundary(), "len {len} split {split}");
                t.consume(&bytes[split..]);
                assert!(t.at_boundary(), "len {len} split {split}");
            }
        }
    }

    #[test]
    fn consume_one_frame_stops_at_the_end_of_the_first() {
        let mut stream = frame(10, false);
        let first = stream.len();
        stream.extend(frame(20, false));
        let mut t = FrameTracker::default();
        assert_eq!(t.consume_one_frame(&stream), first);
        assert!(t.at_boundary());
    }

    #[tokio::test]
    async fn drain_finishes_the_frame_then_sends_close_1001() {
        let (client_side, mut client_peer) = tokio::io::duplex(1 << 16);
        let (upstream_side, mut upstream_peer) = tokio::io::duplex(1 << 16);
        let drain = CancellationToken::new();
        let relay = {
            let drain = drain.clone();
            tokio::spawn(async move {
                tunnel(
                    client_side,
                    upstream_side,
                    true,
                    &drain,
                    Duration::from_secs(5),
                )
                .await
            })
        };
        // The upstream has sent half of a frame when the deadline passes.
        let whole = frame(100, false);
        upstream_peer.write_all(&whole[..50]).await.unwrap();
        let mut got = vec![0u8; 50];
        client_peer.read_exact(&mut got).await.unwrap();
        drain.cancel();
        upstream_peer.write_all(&whole[50..]).await.unwrap();
        let mut rest = Vec::new();
        client_peer.read_to_end(&mut rest).await.unwrap();
        assert_eq!(&rest[..whole.len() - 50], &whole[50..]);
        assert_eq!(&rest[whole.len() - 50..], &CLOSE_TO_CLIENT);
        let mut to_upstream = Vec::new();
        upstream_peer.read_to_end(&mut to_upstream).await.unwrap();
        assert_eq!(to_upstream.len(), 8);
        assert_eq!(to_upstream[0], 0x88);
        assert_eq!(to_upstream[1], 0x82);
        assert_eq!(to_upstream[6] ^ to_upstream[2], 0x03);
        assert_eq!(to_upstream[7] ^ to_upstream[3], 0xE9);
        relay.await.unwrap().unwrap();
    }
}
