//! Terminal protocol frames (API.md section 2): one JSON object per WebSocket frame, with a `type`.
//!
//! [`ServerFrame`] goes from the engine to a terminal, [`ClientFrame`] the other way. The engine
//! encodes a frame once and writes the same bytes to every terminal that should get it.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::body::Kind;
use crate::error::ErrorCode;

/// The default subprotocol: JSON text frames.
pub const SUBPROTOCOL_JSON: &str = "ether.v1.json";

/// A message as a terminal receives it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Msg {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cid: Option<String>,
    pub chat: String,
    pub from: String,
    pub seq: u64,
    pub kind: Kind,
    pub body: Value,
    pub ts: u64,
}

/// Positions in a user's streams: the inbox and each group.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Positions {
    pub inbox_seq: u64,
    #[serde(default)]
    pub groups: BTreeMap<String, u64>,
}

/// Server to terminal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    Welcome {
        user: String,
        device: String,
        session: String,
        heartbeat_s: u64,
        inbox_seq: u64,
        groups: BTreeMap<String, u64>,
        /// Extension: what this device last acknowledged (inbox and groups), so a reconnect
        /// resumes with `sync` from there.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        delivered: Option<Positions>,
    },
    Msg(Msg),
    Sent {
        cid: String,
        id: String,
        seq: u64,
        ts: u64,
    },
    Synced {
        inbox_seq: u64,
        groups: BTreeMap<String, u64>,
        more: bool,
    },
    Receipt {
        chat: String,
        by: String,
        up_to: String,
    },
    ReadSync {
        chat: String,
        seq: u64,
    },
    Pong,
    Error {
        code: ErrorCode,
        message: String,
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
    },
    Kicked {
        reason: String,
    },
    Reconnect {
        after_ms: u64,
    },
}

impl ServerFrame {
    /// The frame as JSON text.
    pub fn to_json(&self) -> String {
        // Serializing these shapes cannot fail: every key is a string, every value plain data.
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{\"type\":\"error\"}"))
    }
}

/// Terminal to server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    /// Cumulative delivery ack of the inbox, or of a group when `group` is set.
    Ack {
        seq: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        group: Option<String>,
    },
    /// Resend everything after those positions.
    Sync {
        #[serde(default)]
        inbox_seq: u64,
        #[serde(default)]
        groups: BTreeMap<String, u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    /// Send a message as this user.
    Send {
        cid: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        group: Option<String>,
        kind: Kind,
        body: Value,
    },
    /// Read up to `seq` of `chat`.
    Read {
        chat: String,
        seq: u64,
    },
    Ping,
}

/// Why a terminal frame could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("invalid JSON: {0}")]
    Json(String),
    #[error("unknown frame type {0:?}")]
    UnknownType(String),
    #[error("{0}")]
    Shape(String),
}

impl FrameError {
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::Json(_) => ErrorCode::InvalidJson,
            FrameError::UnknownType(_) | FrameError::Shape(_) => ErrorCode::InvalidFrame,
        }
    }
}

const CLIENT_TYPES: [&str; 5] = ["ack", "sync", "send", "read", "ping"];

impl ClientFrame {
    /// Parses one terminal frame, telling apart bad JSON, an unknown `type` and a bad shape.
    pub fn parse(bytes: &[u8]) -> Result<ClientFrame, FrameError> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| FrameError::Json(e.to_string()))?;
        let ty = match value.get("type") {
            Some(Value::String(t)) => t.clone(),
            Some(_) => return Err(FrameError::Shape("type: must be a string".into())),
            None => return Err(FrameError::Shape("type: missing".into())),
        };
        if !CLIENT_TYPES.contains(&ty.as_str()) {
            return Err(FrameError::UnknownType(ty));
        }
        serde_path_to_error::deserialize(&value).map_err(|e| {
            let path = e.path().to_string();
            FrameError::Shape(format!("{ty} frame: {path}: {}", e.into_inner()))
        })
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn server_frames_have_the_contract_shape() {
        let w = ServerFrame::Welcome {
            user: "u".into(),
            device: "d".into(),
            session: "s".into(),
            heartbeat_s: 30,
            inbox_seq: 4,
            groups: BTreeMap::new(),
            delivered: None,
        };
        let v: Value = serde_json::from_str(&w.to_json()).unwrap();
        assert_eq!(v["type"], "welcome");
        assert_eq!(v["inbox_seq"], 4);
        let e = ServerFrame::Error { code: ErrorCode::InvalidJson, message: "m".into(), reference: Some("c1".into()) };
        let v: Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(v, json!({"type":"error","code":"invalid_json","message":"m","ref":"c1"}));
        let r = ServerFrame::ReadSync { chat: "u:b".into(), seq: 3 };
        assert_eq!(serde_json::from_str::<Value>(&r.to_json()).unwrap()["type"], "read_sync");
        assert_eq!(ServerFrame::Pong.to_json(), r#"{"type":"pong"}"#);
    }

    #[test]
    fn client_frames_parse() {
        assert_eq!(ClientFrame::parse(br#"{"type":"ping"}"#).unwrap(), ClientFrame::Ping);
        assert_eq!(ClientFrame::parse(br#"{"type":"ack","seq":7}"#).unwrap(), ClientFrame::Ack { seq: 7, group: None });
        assert!(matches!(ClientFrame::parse(b"{nope"), Err(FrameError::Json(_))));
        assert!(matches!(ClientFrame::parse(br#"{"type":"dance"}"#), Err(FrameError::UnknownType(_))));
        assert!(matches!(ClientFrame::parse(br#"{"type":"ack"}"#), Err(FrameError::Shape(_))));
        assert!(matches!(ClientFrame::parse(br#"[1]"#), Err(FrameError::Shape(_))));
    }

    fn arb_client_frame() -> impl Strategy<Value = ClientFrame> {
        prop_oneof![
            Just(ClientFrame::Ping),
            (any::<u64>(), proptest::option::of("[a-z]{1,8}")).prop_map(|(seq, group)| ClientFrame::Ack { seq, group }),
            ("[a-z:]{1,12}", any::<u64>()).prop_map(|(chat, seq)| ClientFrame::Read { chat, seq }),
            (
                any::<u64>(),
                proptest::collection::btree_map("[a-z]{1,8}", any::<u64>(), 0..4),
                proptest::option::of(any::<u32>())
            )
                .prop_map(|(inbox_seq, groups, limit)| ClientFrame::Sync { inbox_seq, groups, limit }),
            ("[a-z0-9]{1,16}", "[a-z]{1,8}", ".{0,40}").prop_map(|(cid, to, text)| {
                ClientFrame::Send { cid, to: Some(to), group: None, kind: Kind::Text, body: json!({"text": text}) }
            }),
        ]
    }

    proptest! {
        #[test]
        fn client_frame_roundtrip(f in arb_client_frame()) {
            prop_assert_eq!(ClientFrame::parse(f.to_json().as_bytes()).unwrap(), f);
        }

        #[test]
        fn client_parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = ClientFrame::parse(&bytes);
        }

        #[test]
        fn msg_roundtrip(seq in any::<u64>(), ts in any::<u64>(), text in ".{0,64}") {
            let m = ServerFrame::Msg(Msg { id: "1".into(), cid: None, chat: "u:a".into(), from: "a".into(), seq, kind: Kind::Text, body: json!({"text": text}), ts });
            prop_assert_eq!(serde_json::from_str::<ServerFrame>(&m.to_json()).unwrap(), m);
        }
    }
}
