//! The examples of `docs/PROTOCOL.md` are real frames: every block fenced as `json server`
//! parses as a [`ServerFrame`] (and says nothing more than the frame holds) and every
//! `json client` block as a [`ClientFrame`] (unknown fields are refused), and each survives
//! the binary subprotocol.
use ether_proto::frame::ClientFrameRef;
use ether_proto::{pb, ClientFrame, ServerFrame};

/// The fenced blocks of `doc` whose info string is `info`.
fn blocks<'a>(doc: &'a str, info: &str) -> Vec<&'a str> {
    let open = format!("```{info}\n");
    let mut out = Vec::new();
    let mut rest = doc;
    while let Some(start) = rest.find(&open) {
        let body = &rest[start + open.len()..];
        let end = body.find("\n```").expect("a closed block");
        out.push(body[..end].trim());
        rest = &body[end..];
    }
    out
}

#[test]
fn every_example_frame_in_the_protocol_doc_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/PROTOCOL.md");
    let doc = std::fs::read_to_string(path).expect("docs/PROTOCOL.md");
    let server = blocks(&doc, "json server");
    let client = blocks(&doc, "json client");
    assert!(
        server.len() >= 11 && client.len() >= 7,
        "examples found: {} server, {} client",
        server.len(),
        client.len()
    );
    for text in server {
        let frame: ServerFrame =
            serde_json::from_str(text).unwrap_or_else(|e| panic!("not a server frame: {e}\n{text}"));
        // Nothing in the example that the frame does not have (a misspelt field would pass
        // serde alone).
        let example: serde_json::Value = serde_json::from_str(text).expect("JSON");
        assert_eq!(serde_json::to_value(&frame).unwrap(), example, "fields of {text}");
        assert_eq!(pb::decode_server(&pb::encode_server(&frame)).unwrap(), frame, "{text}");
    }
    for text in client {
        let frame = ClientFrame::parse(text.as_bytes()).unwrap_or_else(|e| panic!("not a client frame: {e}\n{text}"));
        assert!(ClientFrameRef::parse(text.as_bytes()).is_ok(), "{text}");
        assert!(pb::decode_client(&pb::encode_client(&frame)).is_ok(), "{text}");
    }
}
