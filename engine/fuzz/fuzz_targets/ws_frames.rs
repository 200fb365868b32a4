//! Fuzzes the WebSocket frame reader: arbitrary bytes, split at an arbitrary point, must never
//! panic, never hand out a frame larger than the limit, and hold no bytes once it fails.
#![no_main]

use ether_engine::ws::{FrameReader, WsEvent};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else { return };
    let split = usize::from(split).min(rest.len());
    let max = 256;
    let mut reader = FrameReader::default();
    for chunk in [&rest[..split], &rest[split..]] {
        let mut bytes = chunk.to_vec();
        let result = reader.feed(&mut bytes, max, |event| {
            if let WsEvent::Text(p) | WsEvent::Binary(p) = event {
                assert!(p.len() <= max);
            }
            true
        });
        if result.is_err() {
            return;
        }
    }
});
