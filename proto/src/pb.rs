//! The `ether.v1.proto` subprotocol: binary frames generated from `ether.v1.proto` (module
//! [`v1`]) and their conversion to and from the JSON frames' types, so that both subprotocols
//! carry the same frames with the same meaning. Bodies travel as their JSON text on both.
//! Shapes only: no I/O, no engine state.
use std::borrow::Cow;

use prost::Message as _;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::body::Kind;
use crate::error::ErrorCode;
use crate::frame::{ClientFrame, ClientFrameRef, FrameError, FrameType, Msg, Positions, ServerFrame};

/// The binary subprotocol: one Protocol Buffers `ServerFrame`/`ClientFrame` per binary frame.
pub const SUBPROTOCOL_PROTO: &str = "ether.v1.proto";

/// Types generated from `proto/ether.v1.proto` (package `ether.v1`).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/ether.v1.rs"));
}

use v1::client_frame::Frame as ClientOneof;
use v1::server_frame::Frame as ServerOneof;

impl From<Kind> for v1::Kind {
    fn from(k: Kind) -> v1::Kind {
        match k {
            Kind::Text => v1::Kind::Text,
            Kind::Image => v1::Kind::Image,
            Kind::File => v1::Kind::File,
            Kind::Voice => v1::Kind::Voice,
            Kind::Custom => v1::Kind::Custom,
        }
    }
}

/// The kind numbered `raw` in a `frame` frame (`of`: a terminal's, or none for the node's).
fn kind_of(raw: i32, frame: &str, of: Option<FrameType>) -> Result<Kind, FrameError> {
    match v1::Kind::try_from(raw) {
        Ok(v1::Kind::Text) => Ok(Kind::Text),
        Ok(v1::Kind::Image) => Ok(Kind::Image),
        Ok(v1::Kind::File) => Ok(Kind::File),
        Ok(v1::Kind::Voice) => Ok(Kind::Voice),
        Ok(v1::Kind::Custom) => Ok(Kind::Custom),
        Ok(v1::Kind::Unspecified) | Err(_) => Err(FrameError::shape(
            of,
            format!("{frame} frame: kind: {raw} is not one of text, image, file, voice, custom"),
        )),
    }
}

fn positions(p: &Positions) -> v1::Positions {
    v1::Positions { inbox_seq: p.inbox_seq, groups: p.groups.clone() }
}

/// A `msg` frame from its parts, the body given as JSON text (the engine's delivery path: no
/// JSON value is built).
#[allow(clippy::too_many_arguments)]
pub fn encode_msg(
    id: u64,
    cid: Option<&str>,
    chat: &str,
    from: &str,
    seq: u64,
    kind: Kind,
    body_json: &str,
    ts: u64,
) -> Vec<u8> {
    let frame = v1::ServerFrame {
        frame: Some(ServerOneof::Msg(v1::Msg {
            id: id.to_string(),
            cid: cid.map(str::to_owned),
            chat: chat.to_owned(),
            from: from.to_owned(),
            seq,
            kind: v1::Kind::from(kind).into(),
            body_json: body_json.to_owned(),
            ts,
        })),
    };
    frame.encode_to_vec()
}

/// A server frame as Protocol Buffers bytes.
pub fn encode_server(frame: &ServerFrame) -> Vec<u8> {
    let oneof = match frame {
        ServerFrame::Welcome { user, device, session, heartbeat_s, inbox_seq, groups, delivered } => {
            ServerOneof::Welcome(v1::Welcome {
                user: user.clone(),
                device: device.clone(),
                session: session.clone(),
                heartbeat_s: *heartbeat_s,
                inbox_seq: *inbox_seq,
                groups: groups.clone(),
                delivered: delivered.as_ref().map(positions),
            })
        }
        ServerFrame::Msg(m) => ServerOneof::Msg(v1::Msg {
            id: m.id.clone(),
            cid: m.cid.clone(),
            chat: m.chat.clone(),
            from: m.from.clone(),
            seq: m.seq,
            kind: v1::Kind::from(m.kind).into(),
            body_json: m.body.to_string(),
            ts: m.ts,
        }),
        ServerFrame::Sent { cid, id, seq, ts } => {
            ServerOneof::Sent(v1::Sent { cid: cid.clone(), id: id.clone(), seq: *seq, ts: *ts })
        }
        ServerFrame::Synced { inbox_seq, groups, more } => {
            ServerOneof::Synced(v1::Synced { inbox_seq: *inbox_seq, groups: groups.clone(), more: *more })
        }
        ServerFrame::Receipt { chat, by, up_to } => {
            ServerOneof::Receipt(v1::Receipt { chat: chat.clone(), by: by.clone(), up_to: up_to.clone() })
        }
        ServerFrame::ReadSync { chat, seq } => ServerOneof::ReadSync(v1::ReadSync { chat: chat.clone(), seq: *seq }),
        ServerFrame::Pong => ServerOneof::Pong(v1::Pong {}),
        ServerFrame::Error { code, message, reference, of } => ServerOneof::Error(v1::Error {
            code: code.as_str().to_owned(),
            message: message.clone(),
            r#ref: reference.clone(),
            of: of.map(|t| t.as_str().to_owned()),
        }),
        ServerFrame::Kicked { reason } => ServerOneof::Kicked(v1::Kicked { reason: reason.clone() }),
        ServerFrame::Reconnect { after_ms } => ServerOneof::Reconnect(v1::Reconnect { after_ms: *after_ms }),
    };
    v1::ServerFrame { frame: Some(oneof) }.encode_to_vec()
}

/// Whether `bytes` is a well-formed `ServerFrame` that holds no frame this version knows: a
/// frame type a later version added to the `frame` oneof under a new field number (prost
/// skips fields it does not know, so the oneof stays empty and [`decode_server`] refuses it).
/// Terminals skip such frames, as JSON terminals skip an unknown `type`. Empty bytes hold no
/// frame at all: broken, not new (`false`).
pub fn is_unknown_server_frame(bytes: &[u8]) -> bool {
    !bytes.is_empty() && v1::ServerFrame::decode(bytes).is_ok_and(|f| f.frame.is_none())
}

/// A server frame from Protocol Buffers bytes (terminals: the SDK, the load tester).
pub fn decode_server(bytes: &[u8]) -> Result<ServerFrame, FrameError> {
    let frame = v1::ServerFrame::decode(bytes).map_err(|e| FrameError::shape(None, format!("protobuf: {e}")))?;
    let Some(oneof) = frame.frame else { return Err(FrameError::shape(None, "frame: empty ServerFrame")) };
    Ok(match oneof {
        ServerOneof::Welcome(w) => ServerFrame::Welcome {
            user: w.user,
            device: w.device,
            session: w.session,
            heartbeat_s: w.heartbeat_s,
            inbox_seq: w.inbox_seq,
            groups: w.groups,
            delivered: w.delivered.map(|p| Positions { inbox_seq: p.inbox_seq, groups: p.groups }),
        },
        ServerOneof::Msg(m) => ServerFrame::Msg(Msg {
            kind: kind_of(m.kind, "msg", None)?,
            body: serde_json::from_str::<Value>(&m.body_json)
                .map_err(|e| FrameError::json(None, format!("msg frame: body_json: {e}")))?,
            id: m.id,
            cid: m.cid,
            chat: m.chat,
            from: m.from,
            seq: m.seq,
            ts: m.ts,
        }),
        ServerOneof::Sent(s) => ServerFrame::Sent { cid: s.cid, id: s.id, seq: s.seq, ts: s.ts },
        ServerOneof::Synced(s) => ServerFrame::Synced { inbox_seq: s.inbox_seq, groups: s.groups, more: s.more },
        ServerOneof::Receipt(r) => ServerFrame::Receipt { chat: r.chat, by: r.by, up_to: r.up_to },
        ServerOneof::ReadSync(r) => ServerFrame::ReadSync { chat: r.chat, seq: r.seq },
        ServerOneof::Pong(_) => ServerFrame::Pong,
        ServerOneof::Error(e) => ServerFrame::Error {
            code: serde_json::from_value::<ErrorCode>(Value::String(e.code.clone()))
                .map_err(|_| FrameError::shape(None, format!("error frame: code: unknown {:?}", e.code)))?,
            of: match e.of {
                None => None,
                Some(of) => Some(
                    FrameType::parse(&of)
                        .ok_or_else(|| FrameError::shape(None, format!("error frame: of: unknown {of:?}")))?,
                ),
            },
            message: e.message,
            reference: e.r#ref,
        },
        ServerOneof::Kicked(k) => ServerFrame::Kicked { reason: k.reason },
        ServerOneof::Reconnect(r) => ServerFrame::Reconnect { after_ms: r.after_ms },
    })
}

/// A terminal frame as Protocol Buffers bytes (terminals: the SDK, the load tester).
pub fn encode_client(frame: &ClientFrame) -> Vec<u8> {
    let oneof = match frame {
        ClientFrame::Ack { seq, group } => ClientOneof::Ack(v1::Ack { seq: *seq, group: group.clone() }),
        ClientFrame::Sync { inbox_seq, groups, limit } => {
            ClientOneof::Sync(v1::Sync { inbox_seq: *inbox_seq, groups: groups.clone(), limit: *limit })
        }
        ClientFrame::Send { cid, to, group, kind, body } => ClientOneof::Send(v1::Send {
            cid: cid.clone(),
            to: to.clone(),
            group: group.clone(),
            kind: v1::Kind::from(*kind).into(),
            body_json: body.to_string(),
        }),
        ClientFrame::Read { chat, seq } => ClientOneof::Read(v1::Read { chat: chat.clone(), seq: *seq }),
        ClientFrame::Ping => ClientOneof::Ping(v1::Ping {}),
    };
    v1::ClientFrame { frame: Some(oneof) }.encode_to_vec()
}

/// A terminal's binary frame, as the engine handles it. Errors are those of the JSON frames:
/// a broken message or a missing frame is `invalid_frame`, a body that is not JSON text
/// `invalid_json`.
pub fn decode_client(bytes: &[u8]) -> Result<ClientFrameRef<'static>, FrameError> {
    let frame = v1::ClientFrame::decode(bytes).map_err(|e| FrameError::shape(None, format!("protobuf: {e}")))?;
    let Some(oneof) = frame.frame else { return Err(FrameError::shape(None, "frame: empty ClientFrame")) };
    Ok(match oneof {
        ClientOneof::Ack(a) => ClientFrameRef::Ack { seq: a.seq, group: a.group.map(Cow::Owned) },
        ClientOneof::Sync(s) => ClientFrameRef::Sync { inbox_seq: s.inbox_seq, groups: s.groups, limit: s.limit },
        ClientOneof::Send(s) => {
            let kind = match kind_of(s.kind, "send", Some(FrameType::Send)) {
                Ok(kind) => Some(kind),
                // A number naming no kind, like an unknown `kind` string in JSON: once the rest
                // of the frame is read, a send refused for what it asks (`invalid_body`).
                Err(_) if v1::Kind::try_from(s.kind).is_err() => None,
                Err(e) => return Err(e),
            };
            let body = RawValue::from_string(s.body_json)
                .map_err(|e| FrameError::json(Some(FrameType::Send), format!("send frame: body_json: {e}")))?;
            let Some(kind) = kind else {
                return Err(FrameError::UnknownKind {
                    cid: s.cid,
                    message: format!("kind: {} is not one of text, image, file, voice, custom", s.kind),
                });
            };
            ClientFrameRef::Send {
                kind,
                body: Cow::Owned(body),
                cid: Cow::Owned(s.cid),
                to: s.to.map(Cow::Owned),
                group: s.group.map(Cow::Owned),
            }
        }
        ClientOneof::Read(r) => ClientFrameRef::Read { chat: Cow::Owned(r.chat), seq: r.seq },
        ClientOneof::Ping(_) => ClientFrameRef::Ping,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    fn kinds() -> impl Strategy<Value = Kind> {
        prop_oneof![Just(Kind::Text), Just(Kind::Image), Just(Kind::File), Just(Kind::Voice), Just(Kind::Custom)]
    }

    fn groups() -> impl Strategy<Value = BTreeMap<String, u64>> {
        proptest::collection::btree_map("[a-z0-9_]{1,12}", any::<u64>(), 0..4)
    }

    fn server_frames() -> impl Strategy<Value = ServerFrame> {
        let text = "[ -~]{0,24}";
        prop_oneof![
            (text, text, any::<u64>(), groups(), proptest::option::of((any::<u64>(), groups()))).prop_map(
                |(user, device, inbox_seq, groups, delivered)| ServerFrame::Welcome {
                    user,
                    device,
                    session: "s1".into(),
                    heartbeat_s: 30,
                    inbox_seq,
                    groups,
                    delivered: delivered.map(|(inbox_seq, groups)| Positions { inbox_seq, groups }),
                }
            ),
            (text, proptest::option::of(text), any::<u64>(), kinds(), text, any::<u64>()).prop_map(
                |(chat, cid, seq, kind, t, ts)| ServerFrame::Msg(Msg {
                    id: "42".into(),
                    cid,
                    chat,
                    from: "ann".into(),
                    seq,
                    kind,
                    body: serde_json::json!({ "text": t }),
                    ts,
                })
            ),
            (text, any::<u64>(), any::<u64>()).prop_map(|(cid, seq, ts)| ServerFrame::Sent {
                cid,
                id: "7".into(),
                seq,
                ts
            }),
            (any::<u64>(), groups(), any::<bool>()).prop_map(|(inbox_seq, groups, more)| ServerFrame::Synced {
                inbox_seq,
                groups,
                more
            }),
            (text, text).prop_map(|(chat, by)| ServerFrame::Receipt { chat, by, up_to: "9".into() }),
            (text, any::<u64>()).prop_map(|(chat, seq)| ServerFrame::ReadSync { chat, seq }),
            Just(ServerFrame::Pong),
            (text, proptest::option::of(text), proptest::option::of(proptest::sample::select(FrameType::ALL.to_vec())))
                .prop_map(|(message, reference, of)| ServerFrame::Error {
                    code: ErrorCode::RateLimited,
                    message,
                    reference,
                    of
                }),
            text.prop_map(|reason| ServerFrame::Kicked { reason }),
            any::<u64>().prop_map(|after_ms| ServerFrame::Reconnect { after_ms }),
        ]
    }

    fn client_frames() -> impl Strategy<Value = ClientFrame> {
        let text = "[ -~]{1,24}";
        prop_oneof![
            (any::<u64>(), proptest::option::of(text)).prop_map(|(seq, group)| ClientFrame::Ack { seq, group }),
            (any::<u64>(), groups(), proptest::option::of(any::<u32>()))
                .prop_map(|(inbox_seq, groups, limit)| ClientFrame::Sync { inbox_seq, groups, limit }),
            (text, proptest::option::of(text), kinds(), text).prop_map(|(cid, to, kind, t)| ClientFrame::Send {
                cid,
                to,
                group: None,
                kind,
                body: serde_json::json!({ "text": t }),
            }),
            (text, any::<u64>()).prop_map(|(chat, seq)| ClientFrame::Read { chat, seq }),
            Just(ClientFrame::Ping),
        ]
    }

    /// The JSON view of a client frame as the engine handles it (borrowed or owned alike).
    fn json_of(frame: &ClientFrameRef<'_>) -> Value {
        match frame {
            ClientFrameRef::Ack { seq, group } => serde_json::json!({"type": "ack", "seq": seq, "group": group}),
            ClientFrameRef::Sync { inbox_seq, groups, limit } => {
                serde_json::json!({"type": "sync", "inbox_seq": inbox_seq, "groups": groups, "limit": limit})
            }
            ClientFrameRef::Send { cid, to, group, kind, body } => serde_json::json!({
                "type": "send", "cid": cid, "to": to, "group": group, "kind": kind.as_str(),
                "body": serde_json::from_str::<Value>(body.get()).unwrap(),
            }),
            ClientFrameRef::Read { chat, seq } => serde_json::json!({"type": "read", "chat": chat, "seq": seq}),
            ClientFrameRef::Ping => serde_json::json!({"type": "ping"}),
        }
    }

    proptest! {
        #[test]
        fn server_frames_round_trip(frame in server_frames()) {
            prop_assert_eq!(decode_server(&encode_server(&frame)).unwrap(), frame);
        }

        /// A client frame means the same in both subprotocols.
        #[test]
        fn client_frames_mean_what_their_json_means(frame in client_frames()) {
            let json = frame.to_json();
            let from_json = ClientFrameRef::parse(json.as_bytes()).unwrap();
            let from_proto = decode_client(&encode_client(&frame)).unwrap();
            prop_assert_eq!(json_of(&from_proto), json_of(&from_json));
        }

        /// Garbage never panics: it is a frame or an error.
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_client(&bytes);
            let _ = decode_server(&bytes);
        }
    }

    /// A frame type of a later version (a new field number in the `frame` oneof) is told apart
    /// from a broken frame, so terminals can skip it.
    #[test]
    fn unknown_server_frame_types_are_told_from_broken_frames() {
        // field 15 (a later `typing`, say): length-delimited, holding field 1 = 1
        let typing = [0x7a, 0x02, 0x08, 0x01];
        // field 1000, a varint
        let far = [0xc0, 0x3e, 0x05];
        for bytes in [&typing[..], &far[..]] {
            assert!(is_unknown_server_frame(bytes), "{bytes:?}");
            assert!(decode_server(bytes).is_err(), "this version cannot decode it");
        }
        assert!(!is_unknown_server_frame(&[]), "no frame at all: broken, not new");
        assert!(!is_unknown_server_frame(&[0xff, 0xff]), "not protobuf");
        assert!(!is_unknown_server_frame(&[0x7a, 0x05, 0x08]), "truncated");
        assert!(!is_unknown_server_frame(&encode_server(&ServerFrame::Pong)));
        let bad_kind = v1::ServerFrame {
            frame: Some(ServerOneof::Msg(v1::Msg { kind: 99, body_json: "{}".into(), ..Default::default() })),
        }
        .encode_to_vec();
        assert!(decode_server(&bad_kind).is_err());
        assert!(!is_unknown_server_frame(&bad_kind), "a known type that does not decode is broken");
    }

    #[test]
    fn encode_msg_is_the_msg_frame() {
        let bytes = encode_msg(42, Some("c1"), "u:ann", "ann", 3, Kind::Text, r#"{"text":"hi"}"#, 1000);
        let expected = ServerFrame::Msg(Msg {
            id: "42".into(),
            cid: Some("c1".into()),
            chat: "u:ann".into(),
            from: "ann".into(),
            seq: 3,
            kind: Kind::Text,
            body: serde_json::json!({"text": "hi"}),
            ts: 1000,
        });
        assert_eq!(decode_server(&bytes).unwrap(), expected);
    }

    #[test]
    fn bad_client_frames_get_the_json_frames_errors() {
        assert_eq!(decode_client(&[0xff, 0xff]).unwrap_err().code(), ErrorCode::InvalidFrame);
        let empty = v1::ClientFrame { frame: None }.encode_to_vec();
        assert!(
            matches!(decode_client(&empty), Err(FrameError::Shape { of: None, message }) if message.contains("empty"))
        );
        assert_eq!(decode_client(&[0xff, 0xff]).unwrap_err().of(), None);
        let send = |kind: v1::Kind, body: &str| {
            v1::ClientFrame {
                frame: Some(ClientOneof::Send(v1::Send {
                    cid: "c".into(),
                    to: Some("bob".into()),
                    group: None,
                    kind: kind.into(),
                    body_json: body.into(),
                })),
            }
            .encode_to_vec()
        };
        let e = decode_client(&send(v1::Kind::Text, "{not json")).unwrap_err();
        assert_eq!((e.code(), e.of()), (ErrorCode::InvalidJson, Some(FrameType::Send)));
        assert!(e.to_string().contains("body_json"), "{e}");
        let e = decode_client(&send(v1::Kind::Unspecified, "{}")).unwrap_err();
        assert_eq!((e.code(), e.of()), (ErrorCode::InvalidFrame, Some(FrameType::Send)));
        assert!(e.to_string().contains("kind"), "{e}");
    }

    /// An `error` frame names the frame it refuses (`of`) as its JSON does: the frame's type.
    #[test]
    fn error_frames_name_the_refused_frame() {
        let frame = ServerFrame::Error {
            code: ErrorCode::RateLimited,
            message: "slow down".into(),
            reference: None,
            of: Some(FrameType::Sync),
        };
        let raw = v1::ServerFrame::decode(&encode_server(&frame)[..]).unwrap();
        assert!(matches!(raw.frame, Some(ServerOneof::Error(v1::Error { of: Some(ref of), .. })) if of == "sync"));
        assert_eq!(decode_server(&encode_server(&frame)).unwrap(), frame);
        let unknown = v1::ServerFrame {
            frame: Some(ServerOneof::Error(v1::Error {
                code: "rate_limited".into(),
                message: String::new(),
                r#ref: None,
                of: Some("dance".into()),
            })),
        };
        assert!(decode_server(&unknown.encode_to_vec()).is_err());
    }

    /// A kind number naming no kind is what an unknown `kind` string is in JSON: a send refused
    /// for what it asks (`invalid_body` with its `cid`, not a violation).
    #[test]
    fn unknown_kind_numbers_are_invalid_bodies() {
        let send = |kind: i32, body: &str| {
            v1::ClientFrame {
                frame: Some(ClientOneof::Send(v1::Send {
                    cid: "c7".into(),
                    to: Some("bob".into()),
                    group: None,
                    kind,
                    body_json: body.into(),
                })),
            }
            .encode_to_vec()
        };
        let e = decode_client(&send(99, "{}")).unwrap_err();
        assert_eq!((e.code(), e.is_violation()), (ErrorCode::InvalidBody, false));
        assert!(
            matches!(&e, FrameError::UnknownKind { cid, message } if cid == "c7" && message.starts_with("kind: 99"))
        );
        // The rest of the frame is read first.
        assert_eq!(decode_client(&send(99, "{not json")).unwrap_err().code(), ErrorCode::InvalidJson);
    }
}
