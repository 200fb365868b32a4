//! Fuzzes the `ether.v1.proto` subprotocol's decoders: never panics; a decoded `send` always
//! carries a body that is JSON text (as a JSON terminal's would); a server frame that decodes
//! encodes and decodes back to itself; errors always map to a public code.
#![no_main]

use ether_proto::frame::ClientFrameRef;
use ether_proto::pb;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match pb::decode_client(data) {
        Ok(ClientFrameRef::Send { body, .. }) => {
            assert!(serde_json::from_str::<serde_json::Value>(body.get()).is_ok(), "{}", body.get());
        }
        Ok(_) => {}
        Err(e) => {
            let _ = e.code().as_str();
        }
    }
    match pb::decode_server(data) {
        Ok(frame) => assert_eq!(pb::decode_server(&pb::encode_server(&frame)).ok().as_ref(), Some(&frame)),
        Err(e) => {
            let _ = e.code().as_str();
        }
    }
});
