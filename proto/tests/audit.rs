//! Audit regressions at the crate's public entry points: what a terminal frame or a REST body
//! with an edge-case shape gets, end to end through parsing and validation.
use ether_proto::api::SendMessageRef;
use ether_proto::body::validate_raw;
use ether_proto::frame::{ClientFrame, ClientFrameRef};
use ether_proto::ErrorCode;

/// A body field given twice is `invalid_body` on both entries that keep the body as raw
/// text (the REST send and the terminal `send`): otherwise the check sees the last value and
/// the terminals get both (`{"text":5,"text":"hi"}` passes as "hi").
#[test]
fn duplicate_body_fields_are_invalid_bodies() {
    let rest = br#"{"from":"ann","to":"bob","kind":"text","body":{"text":5,"text":"hi"}}"#;
    let e = SendMessageRef::parse(rest).and_then(|m| m.validate("")).unwrap_err();
    assert_eq!((e.code, e.message.as_str()), (ErrorCode::InvalidBody, "body.text: duplicate field"));

    let batch = br#"{"from":"ann","to":"bob","kind":"text","body":{"text":"","text":"hi"}}"#;
    let raw = serde_json::value::RawValue::from_string(String::from_utf8(batch.to_vec()).unwrap()).unwrap();
    let e = SendMessageRef::parse_batch_entry(4, &raw).and_then(|m| m.validate("messages[4].")).unwrap_err();
    assert_eq!(e.message, "messages[4].body.text: duplicate field");

    let frame = br#"{"type":"send","cid":"c1","to":"bob","kind":"text","body":{"text":{},"text":"hi"}}"#;
    match ClientFrameRef::parse(frame).unwrap() {
        ClientFrameRef::Send { kind, body, .. } => {
            let e = validate_raw("body", kind, &body).unwrap_err();
            assert_eq!(e.to_string(), "body.text: duplicate field");
        }
        other => panic!("{other:?}"),
    }
    // The same message without the repeat is fine.
    let ok = br#"{"from":"ann","to":"bob","kind":"text","body":{"text":"hi"}}"#;
    SendMessageRef::parse(ok).and_then(|m| m.validate("")).unwrap();
}

/// `ping` has no fields: anything else in it is `invalid_frame`, as for every other type.
#[test]
fn ping_with_extra_fields_is_invalid_frame() {
    let e = ClientFrameRef::parse(br#"{"type":"ping","seq":1}"#).unwrap_err();
    assert_eq!((e.code(), e.is_violation()), (ErrorCode::InvalidFrame, true));
    assert_eq!(ClientFrame::parse(br#"{"type":"ping"}"#), Ok(ClientFrame::Ping));
}
