//! Fuzz target: the WebSocket `FrameTracker` fed a byte stream in arbitrary splits agrees with a plain parser.
#![no_main]

use bluegreen_router::websocket::FrameTracker;
use libfuzzer_sys::fuzz_target;

/// Where each complete frame of `data` ends, read the simple way (RFC 6455 section 5.2), and
/// whether the stream stops exactly at a frame boundary.
fn frame_ends(data: &[u8]) -> (Vec<usize>, bool) {
    let mut ends = Vec::new();
    let mut at = 0usize;
    loop {
        if at == data.len() {
            return (ends, true);
        }
        let Some(&second) = data.get(at + 1) else {
            return (ends, false);
        };
        let extended = match second & 0x7F {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let header = 2 + extended + if second & 0x80 != 0 { 4 } else { 0 };
        if data.len() - at < header {
            return (ends, false);
        }
        let payload: u128 = if extended == 0 {
            u128::from(second & 0x7F)
        } else {
            data[at + 2..at + 2 + extended]
                .iter()
                .fold(0u128, |acc, b| (acc << 8) | u128::from(*b))
        };
        let end = (at + header) as u128 + payload;
        if end > data.len() as u128 {
            return (ends, false);
        }
        at = end as usize;
        ends.push(at);
    }
}

fuzz_target!(|input: &[u8]| {
    // First byte: how many chunk sizes follow; then the sizes (1 to 256 bytes, reused in turn);
    // then the stream.
    let Some((&count, rest)) = input.split_first() else {
        return;
    };
    let count = usize::from(count % 16).min(rest.len());
    let (sizes, data) = rest.split_at(count);
    let chunk_size = |i: usize| {
        if sizes.is_empty() {
            data.len().max(1)
        } else {
            usize::from(sizes[i % sizes.len()]) + 1
        }
    };
    let (expected_ends, expected_boundary) = frame_ends(data);

    // `consume`, chunk by chunk: ends where the plain parser ends.
    let mut whole = FrameTracker::default();
    let mut offset = 0;
    let mut i = 0;
    while offset < data.len() {
        let end = (offset + chunk_size(i)).min(data.len());
        whole.consume(&data[offset..end]);
        offset = end;
        i += 1;
    }
    assert_eq!(whole.at_boundary(), expected_boundary);

    // `consume_one_frame`, chunk by chunk: stops at every frame end and only there.
    let mut tracker = FrameTracker::default();
    let mut seen_ends = Vec::new();
    let mut offset = 0;
    let mut i = 0;
    while offset < data.len() {
        let end = (offset + chunk_size(i)).min(data.len());
        let mut chunk = &data[offset..end];
        while !chunk.is_empty() {
            let used = tracker.consume_one_frame(chunk);
            assert!(
                used >= 1 && used <= chunk.len(),
                "used {used} of {}",
                chunk.len()
            );
            offset += used;
            chunk = &chunk[used..];
            if tracker.at_boundary() {
                seen_ends.push(offset);
            } else {
                assert!(chunk.is_empty(), "stopped mid-frame with bytes left");
            }
        }
        i += 1;
    }
    assert_eq!(seen_ends, expected_ends);
    assert_eq!(tracker.at_boundary(), expected_boundary);
});
