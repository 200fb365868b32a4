//! Bodies and requests are JSON objects at every entry, on the fast (borrowed) paths as on the
//! slow ones: an array where an object is required is refused (`invalid_body`), never stored
//! nor pushed. A well-formed terminal `send` of a kind there is not is refused for what it asks
//! (`invalid_body` with its `cid`), not taken for a malformed frame.
mod support;

use ether_proto::frame::ServerFrame;
use ether_proto::ErrorCode;
use serde_json::{json, Value};
use support::*;
use tungstenite::Message;

/// POSTs `body` to `path`: the status and the JSON answer.
fn post(node: &TestNode, path: &str, body: &str) -> (u16, Value) {
    let r = node.gateway().request("POST", path, Some(body.as_bytes())).unwrap();
    (r.status, serde_json::from_slice(&r.body).unwrap())
}

#[test]
fn rest_bodies_and_requests_must_be_objects() {
    let node = TestNode::start();
    let mut bob = node.terminal("bob", "phone");

    // A body that is an array (a `text` body's fields, in order).
    let (status, v) = post(&node, "/v1/messages", r#"{"from":"alice","to":"bob","kind":"text","body":["hi"]}"#);
    assert_eq!((status, v["error"]["code"].as_str()), (400, Some("invalid_body")), "{v}");
    assert_eq!(v["error"]["message"], "body: must be an object", "{v}");
    let (status, v) =
        post(&node, "/v1/messages", r#"{"from":"alice","to":"bob","kind":"image","body":["https://x/y.png",1,2,3]}"#);
    assert_eq!((status, v["error"]["code"].as_str()), (400, Some("invalid_body")), "{v}");

    // A request that is an array (the fields, in order), plain or with whitespace before it.
    for req in [r#"["alice","bob","text",{"text":"hi"}]"#, " \n [\"alice\",\"bob\",\"text\",{\"text\":\"hi\"},\"c1\"]"]
    {
        let (status, v) = post(&node, "/v1/messages", req);
        assert_eq!((status, v["error"]["code"].as_str()), (400, Some("invalid_body")), "{req}: {v}");
        assert_eq!(v["error"]["message"], "request body must be a JSON object", "{v}");
    }

    // A batch that is an array, and batch entries that are arrays or hold one.
    let (status, v) = post(&node, "/v1/messages/batch", r#"[[["alice","bob","text",{"text":"hi"}]]]"#);
    assert_eq!((status, v["error"]["code"].as_str()), (400, Some("invalid_body")), "{v}");
    assert_eq!(v["error"]["message"], "request body must be a JSON object", "{v}");
    let batch = json!({"messages": [
        {"from": "alice", "to": "bob", "kind": "text", "body": ["hi"]},
        ["alice", "bob", "text", {"text": "hi"}],
        {"from": "alice", "to": "bob", "kind": "text", "body": {"text": "the only one"}},
        2,
    ]});
    let (status, v) = post(&node, "/v1/messages/batch", &batch.to_string());
    assert_eq!(status, 200, "{v}");
    let results = v["results"].as_array().unwrap();
    assert_eq!(results[0]["error"]["code"], "invalid_body", "{v}");
    assert_eq!(results[0]["error"]["message"], "messages[0].body: must be an object", "{v}");
    assert_eq!(results[1]["error"]["code"], "invalid_body", "{v}");
    let m = results[1]["error"]["message"].as_str().unwrap();
    assert!(m.starts_with("messages[1]: invalid type: sequence"), "{v}");
    assert!(results[2]["id"].is_string(), "{v}");
    assert_eq!(results[3]["error"]["code"], "invalid_body", "{v}");

    // Only the valid message reached bob, and the history holds only it.
    let msg = next_msg(&mut bob);
    assert_eq!(msg.body, json!({"text": "the only one"}));
    assert_silent(&mut bob, std::time::Duration::from_millis(300));
    let r = node.gateway().request("GET", "/v1/users/bob/messages", None).unwrap();
    let history: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(history["messages"].as_array().map(Vec::len), Some(1), "{history}");
}

/// The next frame, which must be an `error`: its code, message and `ref`.
fn next_error(t: &mut ether_sdk::TerminalClient) -> (ErrorCode, String, Option<String>) {
    match t.recv(WAIT).unwrap() {
        Some(ServerFrame::Error { code, message, reference, .. }) => (code, message, reference),
        other => panic!("expected an error frame, got {other:?}"),
    }
}

#[test]
fn terminal_send_bodies_and_frames_must_be_objects() {
    let node = TestNode::start();
    let mut bob = node.terminal("bob", "phone");
    let mut t = node.terminal("carl", "phone");
    t.raw_send(Message::text(r#"{"type":"send","cid":"c1","to":"bob","kind":"text","body":["hi"]}"#)).unwrap();
    assert_eq!(
        next_error(&mut t),
        (ErrorCode::InvalidBody, "body: must be an object".to_owned(), Some("c1".to_owned()))
    );
    // A frame that is an array (a send's fields, in order) is no frame at all.
    t.raw_send(Message::text(r#"["send",null,null,null,null,null,"c2","bob","text",{"text":"hi"}]"#)).unwrap();
    let (code, _, reference) = next_error(&mut t);
    assert_eq!((code, reference), (ErrorCode::InvalidFrame, None));
    t.raw_send(Message::text(r#"["ping"]"#)).unwrap();
    assert_eq!(next_error(&mut t).0, ErrorCode::InvalidFrame);
    assert_silent(&mut bob, std::time::Duration::from_millis(300));
}

#[test]
fn unknown_kinds_are_invalid_bodies_not_violations() {
    let node = TestNode::start(); // test_min: 3 violations allowed
    let mut t = node.terminal("dora", "phone");
    for i in 0..11 {
        let frame = format!(r#"{{"type":"send","cid":"c{i}","to":"bob","kind":"video","body":{{}}}}"#);
        t.raw_send(Message::text(frame)).unwrap();
        let (code, message, reference) = next_error(&mut t);
        assert_eq!((code, reference.as_deref()), (ErrorCode::InvalidBody, Some(format!("c{i}").as_str())));
        assert!(message.starts_with("kind: unknown variant `video`"), "{message}");
    }
    // Still connected and served.
    t.ping().unwrap();
    assert_eq!(t.recv(WAIT).unwrap(), Some(ServerFrame::Pong));
    // A malformed send is still a malformed frame, whatever its kind.
    t.raw_send(Message::text(r#"{"type":"send","to":"bob","kind":"video","body":{}}"#)).unwrap();
    let (code, _, reference) = next_error(&mut t);
    assert_eq!((code, reference), (ErrorCode::InvalidFrame, None));
}

#[test]
fn unknown_kind_numbers_on_the_binary_subprotocol_are_invalid_bodies_too() {
    use ether_proto::pb::v1;
    use prost::Message as _;
    let node = TestNode::start(); // test_min: 3 violations allowed
    let opts = ether_sdk::ConnectOptions::new(&node.token("erin"), "phone", "ios")
        .subprotocol(ether_proto::pb::SUBPROTOCOL_PROTO);
    let (mut t, _) = ether_sdk::TerminalClient::connect_with(&node.ws_url(), &opts).unwrap();
    for i in 0..5 {
        let send =
            v1::Send { cid: format!("c{i}"), to: Some("bob".into()), group: None, kind: 42, body_json: "{}".into() };
        let frame = v1::ClientFrame { frame: Some(v1::client_frame::Frame::Send(send)) }.encode_to_vec();
        t.raw_send(Message::binary(frame)).unwrap();
        let (code, _, reference) = next_error(&mut t);
        assert_eq!((code, reference), (ErrorCode::InvalidBody, Some(format!("c{i}"))));
    }
    t.ping().unwrap();
    assert_eq!(t.recv(WAIT).unwrap(), Some(ServerFrame::Pong));
}

/// A body within its kind's limit (measured on its compact form) is stored and pushed even when
/// the JSON text that carried it is longer than the store takes: 8,000 emoji as `\uXXXX`
/// escapes are 96 KB of text for 32 KB of `custom` data. It was refused (400, "at most 65536
/// bytes") on single sends while the same body to a group was taken.
#[test]
fn a_body_escaped_past_the_store_bound_is_stored_compactly() {
    // The default request bound (4 MiB), not the tests' 64 KiB.
    let node = TestNode::with(|c| c.limits.http_body_bytes_max = 4 << 20);
    let mut gus = node.terminal("gus", "phone");
    let escaped: String = "\\ud83d\\ude00".repeat(8000);
    let request = format!(r#"{{"from":"bo","to":"gus","kind":"custom","body":{{"data":"{escaped}"}}}}"#);
    assert!(request.len() > 65_536);
    let r = node.gateway().request("POST", "/v1/messages", Some(request.as_bytes())).unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let m = next_msg(&mut gus);
    assert_eq!(m.body["data"].as_str().map(|d| d.chars().count()), Some(8000));
    assert!(m.body["data"].as_str().unwrap().chars().all(|c| c == '\u{1F600}'));
}
