//! Fuzzes terminal frame parsing: never panics; whatever parses encodes and parses back to
//! the same frame; errors always map to a public code; the engine's borrowed parser
//! (`ClientFrameRef`) accepts and refuses exactly the same frames, with the same errors.
#![no_main]

use ether_proto::frame::ClientFrameRef;
use ether_proto::ClientFrame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let owned = ClientFrame::parse(data);
    match &owned {
        Ok(frame) => assert_eq!(ClientFrame::parse(frame.to_json().as_bytes()).ok().as_ref(), Some(frame)),
        Err(e) => {
            let _ = e.code().as_str();
        }
    }
    match (ClientFrameRef::parse(data), owned) {
        (Ok(_), Ok(_)) => {}
        (Err(a), Err(b)) => assert_eq!(a, b),
        (a, b) => panic!("borrowed and owned parsers disagree: {a:?} vs {b:?}"),
    }
});
