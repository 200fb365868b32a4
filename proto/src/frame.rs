//! Terminal protocol frames (API.md section 2): one JSON object per WebSocket frame, with a `type`.
//!
//! [`ServerFrame`] goes from the engine to a terminal, [`ClientFrame`] the other way. The engine
//! encodes a frame once and writes the same bytes to every terminal that should get it.
use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::body::Kind;
use crate::error::ErrorCode;

/// The default subprotocol: JSON text frames.
pub const SUBPROTOCOL_JSON: &str = "ether.v1.json";

/// The type of a terminal frame, as its `type` names it: what an `error` frame's `of` says it
/// refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FrameType {
    Ack,
    Sync,
    Send,
    Read,
    Ping,
}

impl FrameType {
    pub const ALL: [FrameType; 5] =
        [FrameType::Ack, FrameType::Sync, FrameType::Send, FrameType::Read, FrameType::Ping];

    pub fn as_str(self) -> &'static str {
        match self {
            FrameType::Ack => "ack",
            FrameType::Sync => "sync",
            FrameType::Send => "send",
            FrameType::Read => "read",
            FrameType::Ping => "ping",
        }
    }

    /// The type a `type` value names, if any.
    pub fn parse(name: &str) -> Option<FrameType> {
        FrameType::ALL.into_iter().find(|t| t.as_str() == name)
    }
}

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
    /// A terminal frame refused: `reference` is the `cid` of the `send` it answers, `of` the
    /// type of the frame it answers (absent when that could not be read, e.g. bad JSON).
    Error {
        code: ErrorCode,
        message: String,
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        of: Option<FrameType>,
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

/// Why a terminal frame could not be understood. `of` is the frame's type when it could be
/// read (see [`FrameError::of`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("invalid JSON: {message}")]
    Json { of: Option<FrameType>, message: String },
    #[error("unknown frame type {0:?}")]
    UnknownType(String),
    #[error("{message}")]
    Shape { of: Option<FrameType>, message: String },
    /// A well-formed `send` but for its `kind`, which is none of the kinds: not a malformed
    /// frame but a send refused for what it asks, like one with a bad body (`invalid_body`,
    /// answered with its `cid`, not a protocol violation; the REST API's answer to an unknown
    /// kind too).
    #[error("{message}")]
    UnknownKind { cid: String, message: String },
}

impl FrameError {
    /// A frame without a string `type`, or not of the shape its type asks for.
    pub fn shape(of: Option<FrameType>, message: impl Into<String>) -> FrameError {
        FrameError::Shape { of, message: message.into() }
    }

    /// Text that is not JSON (the frame, or a JSON field of a binary frame).
    pub fn json(of: Option<FrameType>, message: impl Into<String>) -> FrameError {
        FrameError::Json { of, message: message.into() }
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::Json { .. } => ErrorCode::InvalidJson,
            FrameError::UnknownType(_) | FrameError::Shape { .. } => ErrorCode::InvalidFrame,
            FrameError::UnknownKind { .. } => ErrorCode::InvalidBody,
        }
    }

    /// The type of the refused frame, if it could be read (the `of` of the `error` frame that
    /// answers it): none for text that is not JSON, a frame without a string `type` or with a
    /// type there is not, a binary frame that does not decode.
    pub fn of(&self) -> Option<FrameType> {
        match self {
            FrameError::Json { of, .. } | FrameError::Shape { of, .. } => *of,
            FrameError::UnknownType(_) => None,
            FrameError::UnknownKind { .. } => Some(FrameType::Send),
        }
    }

    /// Whether the frame was not valid protocol (counted towards
    /// `limits.protocol_violations_max`), rather than a well-formed request refused.
    pub fn is_violation(&self) -> bool {
        !matches!(self, FrameError::UnknownKind { .. })
    }
}

impl ClientFrame {
    /// Parses one terminal frame, telling apart bad JSON, an unknown `type` and a bad shape.
    pub fn parse(bytes: &[u8]) -> Result<ClientFrame, FrameError> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| FrameError::json(None, e.to_string()))?;
        let ty = match value.get("type") {
            Some(Value::String(t)) => t.clone(),
            Some(_) => return Err(FrameError::shape(None, "type: must be a string")),
            None => return Err(FrameError::shape(None, "type: missing")),
        };
        let Some(of) = FrameType::parse(&ty) else {
            return Err(FrameError::UnknownType(ty));
        };
        let frame = serde_path_to_error::deserialize(&value).map_err(|e| {
            if let Some(unknown) = Self::unknown_kind(&value) {
                return unknown;
            }
            let path = e.path().to_string();
            FrameError::shape(Some(of), format!("{ty} frame: {path}: {}", e.into_inner()))
        })?;
        // serde's `deny_unknown_fields` does not reach the unit variant of an internally tagged
        // enum: `{"type":"ping","x":1}` would pass. A `ping` has no field but its `type`.
        if frame == ClientFrame::Ping {
            if let Some(extra) = value.as_object().and_then(|o| o.keys().find(|k| *k != "type")) {
                return Err(FrameError::shape(
                    Some(FrameType::Ping),
                    format!("ping frame: unknown field `{extra}`, there are no fields"),
                ));
            }
        }
        Ok(frame)
    }

    pub fn frame_type(&self) -> FrameType {
        match self {
            ClientFrame::Ack { .. } => FrameType::Ack,
            ClientFrame::Sync { .. } => FrameType::Sync,
            ClientFrame::Send { .. } => FrameType::Send,
            ClientFrame::Read { .. } => FrameType::Read,
            ClientFrame::Ping => FrameType::Ping,
        }
    }

    /// For a frame that did not parse: [`FrameError::UnknownKind`] if it is a `send` whose
    /// `kind` is a string naming no kind and which would parse with a known one.
    fn unknown_kind(value: &Value) -> Option<FrameError> {
        if value.get("type")?.as_str()? != "send" {
            return None;
        }
        let kind = value.get("kind")?;
        kind.as_str()?;
        let message = format!("kind: {}", Kind::deserialize(kind).err()?);
        let mut known = value.clone();
        known["kind"] = Value::from(Kind::Text.as_str());
        match ClientFrame::deserialize(&known) {
            Ok(ClientFrame::Send { cid, .. }) => Some(FrameError::UnknownKind { cid, message }),
            _ => None,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// A terminal frame borrowed from the bytes it was read from: what the engine handles. The
/// usual frames (unescaped ids, any body) are read without building a `Value` and the body
/// stays the raw JSON text it arrived as; anything else goes through [`ClientFrame::parse`],
/// so a frame is accepted or refused, with the same error, exactly as `ClientFrame` would be.
#[derive(Debug, Clone)]
pub enum ClientFrameRef<'a> {
    Ack {
        seq: u64,
        group: Option<Cow<'a, str>>,
    },
    Sync {
        inbox_seq: u64,
        groups: BTreeMap<String, u64>,
        limit: Option<u32>,
    },
    Send {
        cid: Cow<'a, str>,
        to: Option<Cow<'a, str>>,
        group: Option<Cow<'a, str>>,
        kind: Kind,
        body: Cow<'a, RawValue>,
    },
    Read {
        chat: Cow<'a, str>,
        seq: u64,
    },
    Ping,
}

/// Every field any terminal frame may carry; which are allowed is checked per `type`. Each is
/// absent (`None`), `null` (`Some(None)`) or a value. Strings are borrowed (an escaped one fails
/// here and takes the `ClientFrame` path).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope<'a> {
    #[serde(rename = "type")]
    ty: &'a str,
    #[serde(default, deserialize_with = "present")]
    seq: Field<u64>,
    #[serde(default, borrow, deserialize_with = "present")]
    group: Field<&'a str>,
    #[serde(default, deserialize_with = "present")]
    inbox_seq: Field<u64>,
    #[serde(default, deserialize_with = "present")]
    groups: Field<BTreeMap<String, u64>>,
    #[serde(default, deserialize_with = "present")]
    limit: Field<u32>,
    #[serde(default, borrow, deserialize_with = "present")]
    cid: Field<&'a str>,
    #[serde(default, borrow, deserialize_with = "present")]
    to: Field<&'a str>,
    #[serde(default, deserialize_with = "present")]
    kind: Field<Kind>,
    #[serde(default, borrow, deserialize_with = "present")]
    body: Field<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    chat: Field<&'a str>,
}

/// A field of [`Envelope`]: absent, `null`, or a value.
type Field<T> = Option<Option<T>>;

fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Field<T>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

impl<'a> ClientFrameRef<'a> {
    /// Parses one terminal frame; errors are [`ClientFrame::parse`]'s.
    pub fn parse(bytes: &'a [u8]) -> Result<ClientFrameRef<'a>, FrameError> {
        if let Some(frame) = Self::parse_borrowed(bytes) {
            return Ok(frame);
        }
        Ok(match ClientFrame::parse(bytes)? {
            ClientFrame::Ack { seq, group } => ClientFrameRef::Ack { seq, group: group.map(Cow::Owned) },
            ClientFrame::Sync { inbox_seq, groups, limit } => ClientFrameRef::Sync { inbox_seq, groups, limit },
            ClientFrame::Send { cid, to, group, kind, body } => ClientFrameRef::Send {
                cid: Cow::Owned(cid),
                to: to.map(Cow::Owned),
                group: group.map(Cow::Owned),
                kind,
                body: Cow::Owned(
                    serde_json::value::to_raw_value(&body)
                        .map_err(|e| FrameError::shape(Some(FrameType::Send), format!("send frame: body: {e}")))?,
                ),
            },
            ClientFrame::Read { chat, seq } => ClientFrameRef::Read { chat: Cow::Owned(chat), seq },
            ClientFrame::Ping => ClientFrameRef::Ping,
        })
    }

    pub fn frame_type(&self) -> FrameType {
        match self {
            ClientFrameRef::Ack { .. } => FrameType::Ack,
            ClientFrameRef::Sync { .. } => FrameType::Sync,
            ClientFrameRef::Send { .. } => FrameType::Send,
            ClientFrameRef::Read { .. } => FrameType::Read,
            ClientFrameRef::Ping => FrameType::Ping,
        }
    }

    /// The frame if it is one of the usual valid shapes; `None` means "ask `ClientFrame`".
    fn parse_borrowed(bytes: &'a [u8]) -> Option<ClientFrameRef<'a>> {
        // An object only: the derived `Deserialize` would also read the fields from an array.
        if !crate::body::is_object_text(bytes) {
            return None;
        }
        let e: Envelope<'a> = serde_json::from_slice(bytes).ok()?;
        let Envelope { ty, seq, group, inbox_seq, groups, limit, cid, to, kind, body, chat } = e;
        // Which fields are there at all (`null` counts: `deny_unknown_fields` sees the key).
        let has = [
            seq.is_some(),
            group.is_some(),
            inbox_seq.is_some(),
            groups.is_some(),
            limit.is_some(),
            cid.is_some(),
            to.is_some(),
            kind.is_some(),
            body.is_some(),
            chat.is_some(),
        ];
        // The fields each type may carry, in the order of `has`.
        let allowed: [bool; 10] = match ty {
            "ack" => [true, true, false, false, false, false, false, false, false, false],
            "sync" => [false, false, true, true, true, false, false, false, false, false],
            "send" => [false, true, false, false, false, true, true, true, true, false],
            "read" => [true, false, false, false, false, false, false, false, false, true],
            "ping" => [false; 10],
            _ => return None,
        };
        if has.iter().zip(allowed).any(|(has, allowed)| *has && !allowed) {
            return None;
        }
        // Required and default-but-not-null fields need a value; optional ones may be null.
        Some(match ty {
            "ack" => ClientFrameRef::Ack { seq: seq??, group: group.flatten().map(Cow::Borrowed) },
            "sync" => ClientFrameRef::Sync {
                inbox_seq: match inbox_seq {
                    None => 0,
                    Some(v) => v?,
                },
                groups: match groups {
                    None => BTreeMap::new(),
                    Some(v) => v?,
                },
                limit: limit.flatten(),
            },
            "send" => ClientFrameRef::Send {
                cid: Cow::Borrowed(cid??),
                to: to.flatten().map(Cow::Borrowed),
                group: group.flatten().map(Cow::Borrowed),
                kind: kind??,
                body: Cow::Borrowed(body??),
            },
            "read" => ClientFrameRef::Read { chat: Cow::Borrowed(chat??), seq: seq?? },
            _ => ClientFrameRef::Ping,
        })
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
        let e = ServerFrame::Error {
            code: ErrorCode::InvalidBody,
            message: "m".into(),
            reference: Some("c1".into()),
            of: Some(FrameType::Send),
        };
        let v: Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(v, json!({"type":"error","code":"invalid_body","message":"m","ref":"c1","of":"send"}));
        let e = ServerFrame::Error { code: ErrorCode::InvalidJson, message: "m".into(), reference: None, of: None };
        let v: Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(v, json!({"type":"error","code":"invalid_json","message":"m"}), "no `of` when none is known");
        let r = ServerFrame::ReadSync { chat: "u:b".into(), seq: 3 };
        assert_eq!(serde_json::from_str::<Value>(&r.to_json()).unwrap()["type"], "read_sync");
        assert_eq!(ServerFrame::Pong.to_json(), r#"{"type":"pong"}"#);
    }

    #[test]
    fn client_frames_parse() {
        assert_eq!(ClientFrame::parse(br#"{"type":"ping"}"#).unwrap(), ClientFrame::Ping);
        assert_eq!(ClientFrame::parse(br#"{"type":"ack","seq":7}"#).unwrap(), ClientFrame::Ack { seq: 7, group: None });
        assert!(matches!(ClientFrame::parse(b"{nope"), Err(FrameError::Json { .. })));
        assert!(matches!(ClientFrame::parse(br#"{"type":"dance"}"#), Err(FrameError::UnknownType(_))));
        assert!(matches!(ClientFrame::parse(br#"{"type":"ack"}"#), Err(FrameError::Shape { .. })));
        assert!(matches!(ClientFrame::parse(br#"[1]"#), Err(FrameError::Shape { .. })));
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

    /// The owned frame a borrowed one stands for (the body parsed back into a `Value`).
    fn owned(f: ClientFrameRef<'_>) -> ClientFrame {
        match f {
            ClientFrameRef::Ack { seq, group } => ClientFrame::Ack { seq, group: group.map(Cow::into_owned) },
            ClientFrameRef::Sync { inbox_seq, groups, limit } => ClientFrame::Sync { inbox_seq, groups, limit },
            ClientFrameRef::Send { cid, to, group, kind, body } => ClientFrame::Send {
                cid: cid.into_owned(),
                to: to.map(Cow::into_owned),
                group: group.map(Cow::into_owned),
                kind,
                body: serde_json::from_str(body.get()).unwrap(),
            },
            ClientFrameRef::Read { chat, seq } => ClientFrame::Read { chat: chat.into_owned(), seq },
            ClientFrameRef::Ping => ClientFrame::Ping,
        }
    }

    /// Objects made of frame fields with assorted values, valid or not.
    fn frameish_json() -> impl Strategy<Value = Value> {
        let value = prop_oneof![
            Just(Value::Null),
            any::<u32>().prop_map(Value::from),
            Just(Value::from(-1)),
            prop_oneof![
                Just("ack"),
                Just("sync"),
                Just("send"),
                Just("read"),
                Just("ping"),
                Just("text"),
                Just("video"),
                Just("a\\b")
            ]
            .prop_map(Value::from),
            Just(json!({"text": "hi"})),
            Just(json!({"g1": 3})),
            Just(json!([1])),
            Just(json!(["hi"])),
        ];
        let key = prop_oneof![
            Just("seq"),
            Just("group"),
            Just("inbox_seq"),
            Just("groups"),
            Just("limit"),
            Just("cid"),
            Just("to"),
            Just("kind"),
            Just("body"),
            Just("chat"),
            Just("extra"),
        ];
        let ty = prop_oneof![Just("ack"), Just("sync"), Just("send"), Just("read"), Just("ping"), Just("nope")];
        let object =
            (proptest::option::of(ty), proptest::collection::btree_map(key, value, 0..6)).prop_map(|(ty, fields)| {
                let mut m: serde_json::Map<String, Value> =
                    fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
                if let Some(ty) = ty {
                    m.insert("type".into(), Value::from(ty));
                }
                Value::Object(m)
            });
        // Arrays: a frame's fields in the order of `Envelope` (what its derived `Deserialize`
        // would take for the struct), valid frames' included, and arrays of those.
        let in_order = prop_oneof![object.clone(), arb_client_frame().prop_map(|f| serde_json::to_value(f).unwrap())]
            .prop_map(|v| {
                let order =
                    ["type", "seq", "group", "inbox_seq", "groups", "limit", "cid", "to", "kind", "body", "chat"];
                let last = order.iter().rposition(|k| v.get(*k).is_some()).map_or(0, |i| i + 1);
                Value::Array(order[..last].iter().map(|k| v.get(*k).cloned().unwrap_or(Value::Null)).collect())
            });
        prop_oneof![
            6 => object,
            2 => in_order.clone(),
            1 => in_order.prop_map(|a| Value::Array(vec![a])),
        ]
    }

    proptest! {
        /// The borrowed parser accepts and refuses exactly what `ClientFrame::parse` does.
        #[test]
        fn borrowed_parse_agrees(v in frameish_json()) {
            let bytes = serde_json::to_vec(&v).unwrap();
            let fast = ClientFrameRef::parse(&bytes).map(owned);
            prop_assert_eq!(fast, ClientFrame::parse(&bytes));
        }

        #[test]
        fn borrowed_parse_reads_every_valid_frame(f in arb_client_frame()) {
            prop_assert_eq!(ClientFrameRef::parse(f.to_json().as_bytes()).map(owned).unwrap(), f);
        }

        #[test]
        fn borrowed_parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = ClientFrameRef::parse(&bytes);
        }
    }

    /// A frame is an object: an array of a frame's fields in order is refused on the borrowed
    /// path as on the `ClientFrame` one (the derived `Deserialize` of `Envelope` would read it).
    #[test]
    fn arrays_are_not_frames() {
        for bytes in [
            &br#"["ping"]"#[..],
            br#" ["ack", 3]"#,
            br#"["send",null,null,null,null,null,"c1","bob","text",{"text":"hi"}]"#,
            br#"[["ping"]]"#,
        ] {
            let e = ClientFrameRef::parse(bytes).unwrap_err();
            assert_eq!(e.code(), ErrorCode::InvalidFrame, "{e}");
            assert_eq!(Err(e), ClientFrame::parse(bytes));
        }
    }

    /// A well-formed `send` of a kind there is not is refused for what it asks (`invalid_body`,
    /// with its `cid`, as the REST API answers), not as a malformed frame; a malformed one
    /// stays malformed whatever its kind.
    #[test]
    fn unknown_kinds_in_well_formed_sends_are_invalid_bodies() {
        let unknown = |cid: &str, kind: &str| FrameError::UnknownKind {
            cid: cid.into(),
            message: format!(
                "kind: unknown variant `{kind}`, expected one of `text`, `image`, `file`, `voice`, `custom`"
            ),
        };
        for (bytes, expected) in [
            (&br#"{"type":"send","cid":"c1","to":"bob","kind":"video","body":{}}"#[..], unknown("c1", "video")),
            (br#"{"type":"send","cid":"c\u0032","group":"g","kind":"Text","body":5}"#, unknown("c2", "Text")),
            (br#"{"kind":"gif","body":null,"type":"send","cid":"","to":null}"#, unknown("", "gif")),
        ] {
            let e = ClientFrameRef::parse(bytes).unwrap_err();
            assert_eq!((e.code(), e.is_violation()), (ErrorCode::InvalidBody, false));
            assert_eq!(e, expected);
            assert_eq!(ClientFrame::parse(bytes).unwrap_err(), expected);
        }
        for bytes in [
            &br#"{"type":"send","to":"bob","kind":"video","body":{}}"#[..],
            br#"{"type":"send","cid":"c1","to":"bob","kind":"video"}"#,
            br#"{"type":"send","cid":"c1","to":"bob","kind":"video","body":{},"x":1}"#,
            br#"{"type":"send","cid":7,"to":"bob","kind":"video","body":{}}"#,
            br#"{"type":"send","cid":"c1","to":"bob","kind":7,"body":{}}"#,
            br#"{"type":"ack","seq":1,"kind":"video"}"#,
        ] {
            let e = ClientFrameRef::parse(bytes).unwrap_err();
            assert_eq!((e.code(), e.is_violation()), (ErrorCode::InvalidFrame, true), "{e}");
        }
    }

    /// "Missing or extra fields" are `invalid_frame` for every type, `ping` included (serde's
    /// `deny_unknown_fields` misses the unit variant of an internally tagged enum).
    #[test]
    fn ping_with_extra_fields_is_refused() {
        for bytes in [
            &br#"{"type":"ping","x":1}"#[..],
            br#"{"type":"ping","seq":3}"#,
            br#"{"seq":null,"type":"ping"}"#,
            br#"{"type":"ping","t":"caf\u00e9"}"#,
        ] {
            let e = ClientFrame::parse(bytes).unwrap_err();
            assert_eq!((e.code(), e.is_violation()), (ErrorCode::InvalidFrame, true), "{e}");
            assert!(e.to_string().starts_with("ping frame: unknown field"), "{e}");
            assert_eq!(ClientFrameRef::parse(bytes).map(owned), Err(e));
        }
        assert_eq!(ClientFrameRef::parse(br#" {"type":"ping"} "#).map(owned), Ok(ClientFrame::Ping));
        assert_eq!(ClientFrame::parse(br#"{"type":"ping","type":"ping"}"#), Ok(ClientFrame::Ping));
    }

    /// An error names the type of the frame it refuses whenever that type could be read, on
    /// both parsers; the names are the frames' `type`s.
    #[test]
    fn errors_name_the_refused_frame_type() {
        for t in FrameType::ALL {
            assert_eq!(serde_json::to_value(t).unwrap(), json!(t.as_str()));
            assert_eq!(FrameType::parse(t.as_str()), Some(t));
        }
        for f in [
            ClientFrame::Ack { seq: 1, group: None },
            ClientFrame::Sync { inbox_seq: 0, groups: BTreeMap::new(), limit: None },
            ClientFrame::Send { cid: "c".into(), to: Some("b".into()), group: None, kind: Kind::Text, body: json!({}) },
            ClientFrame::Read { chat: "u:b".into(), seq: 1 },
            ClientFrame::Ping,
        ] {
            let v: Value = serde_json::from_str(&f.to_json()).unwrap();
            assert_eq!(v["type"], f.frame_type().as_str());
            assert_eq!(ClientFrameRef::parse(f.to_json().as_bytes()).unwrap().frame_type(), f.frame_type());
        }
        for (bytes, of) in [
            (&b"{nope"[..], None),
            (br#"[{"type":"ack","seq":1}]"#, None),
            (br#"{"seq":1}"#, None),
            (br#"{"type":7}"#, None),
            (br#"{"type":"dance"}"#, None),
            (br#"{"type":"ack"}"#, Some(FrameType::Ack)),
            (br#"{"type":"ack","seq":-1}"#, Some(FrameType::Ack)),
            (br#"{"type":"sync","inbox_seq":"x"}"#, Some(FrameType::Sync)),
            (br#"{"type":"sync","extra":1}"#, Some(FrameType::Sync)),
            (br#"{"type":"read","chat":"u:b"}"#, Some(FrameType::Read)),
            (br#"{"type":"send","cid":"c","to":"b","kind":"text"}"#, Some(FrameType::Send)),
            (br#"{"type":"send","cid":"c","to":"b","kind":"gif","body":{}}"#, Some(FrameType::Send)),
            (br#"{"type":"ping","x":1}"#, Some(FrameType::Ping)),
        ] {
            let e = ClientFrameRef::parse(bytes).unwrap_err();
            assert_eq!(e.of(), of, "{}: {e}", String::from_utf8_lossy(bytes));
            assert_eq!(ClientFrame::parse(bytes).unwrap_err().of(), of);
        }
    }

    #[test]
    fn usual_frames_are_borrowed() {
        let bytes = br#"{"type":"send","cid":"c1","to":"bob","kind":"text","body":{"text":"hi"}}"#;
        match ClientFrameRef::parse(bytes).unwrap() {
            ClientFrameRef::Send {
                cid: Cow::Borrowed("c1"),
                to: Some(Cow::Borrowed("bob")),
                body: Cow::Borrowed(b),
                ..
            } => {
                assert_eq!(b.get(), r#"{"text":"hi"}"#)
            }
            other => panic!("not borrowed: {other:?}"),
        }
        // An escaped id is still read (through the owned path).
        let bytes = br#"{"type":"read","chat":"u:b\u006fb","seq":2}"#;
        assert_eq!(owned(ClientFrameRef::parse(bytes).unwrap()), ClientFrame::Read { chat: "u:bob".into(), seq: 2 });
    }
}
