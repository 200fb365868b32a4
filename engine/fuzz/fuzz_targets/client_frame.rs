//! Fuzzes terminal frame parsing: never panics; whatever parses encodes and parses back to
//! the same frame; errors always map to a public code.
#![no_main]

use ether_proto::ClientFrame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match ClientFrame::parse(data) {
        Ok(frame) => assert_eq!(ClientFrame::parse(frame.to_json().as_bytes()).ok(), Some(frame)),
        Err(e) => {
            let _ = e.code().as_str();
        }
    }
});
