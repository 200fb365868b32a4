//! Request and response bodies of the business REST API (API.md section 3).
//!
//! Requests are parsed with [`parse_request`], which tells apart malformed JSON
//! (`invalid_json`) from a well-formed body of the wrong shape (`invalid_body`, with the path).
use std::borrow::Cow;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::body::{self, Kind};
use crate::error::{ApiError, ErrorCode};
use crate::ids::check_id;

/// Most messages in one batch request.
pub const BATCH_MESSAGES_MAX: usize = 1000;

/// Parses a JSON request body into `T`, mapping errors to the public codes.
pub fn parse_request<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::new(ErrorCode::InvalidJson, format!("request body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::new(ErrorCode::InvalidBody, "request body must be a JSON object"));
    }
    serde_path_to_error::deserialize(&value).map_err(|e| {
        let path = e.path().to_string();
        ApiError::new(ErrorCode::InvalidBody, format!("{path}: {}", e.into_inner()))
    })
}

/// `POST /v1/messages` and one entry of a batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendMessage {
    pub from: String,
    pub to: String,
    pub kind: Kind,
    pub body: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cid: Option<String>,
}

/// Longest `cid`, in bytes.
pub const CID_LEN_MAX: usize = 128;

impl SendMessage {
    /// Checks ids and body; `prefix` is where this message sits in its request (`""` or
    /// `messages[3].`).
    pub fn validate(&self, prefix: &str) -> Result<(), ApiError> {
        check_addressing(prefix, &self.from, &self.to, self.cid.as_deref())?;
        body::validate(&format!("{prefix}body"), self.kind, &self.body)
            .map_err(|e| ApiError::new(ErrorCode::InvalidBody, e.to_string()))
    }
}

/// The ids and `cid` of a message to send (`prefix` as in [`SendMessage::validate`]).
fn check_addressing(prefix: &str, from: &str, to: &str, cid: Option<&str>) -> Result<(), ApiError> {
    check_id(&format!("{prefix}from"), from)?;
    check_id(&format!("{prefix}to"), to)?;
    if let Some(cid) = cid {
        if cid.is_empty() || cid.len() > CID_LEN_MAX {
            return Err(ApiError::new(ErrorCode::InvalidBody, format!("{prefix}cid: must be 1-{CID_LEN_MAX} bytes")));
        }
    }
    Ok(())
}

/// Answer to an accepted message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SentMessage {
    pub id: String,
    pub ts: u64,
}

/// `POST /v1/messages/batch`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendBatch {
    pub messages: Vec<Value>,
}

/// One result of a batch: the message's id and ts, or its error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BatchResult {
    Sent(SentMessage),
    Failed { error: crate::error::ErrorDetail },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchResults {
    pub results: Vec<BatchResult>,
}

/// `POST /v1/broadcast`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Broadcast {
    pub kind: Kind,
    pub body: Value,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BroadcastResult {
    /// The `id` the terminals got in the `msg` frame (unique per broadcast, time-ordered like
    /// message ids; decimal string).
    #[serde(default)]
    pub id: String,
    pub terminals: u64,
}

/// One online terminal in a presence answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminalInfo {
    pub device: String,
    pub platform: String,
    pub node: String,
    /// Unix milliseconds.
    pub since: u64,
}

/// `GET /v1/users/{uid}/presence`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    pub online: bool,
    pub terminals: Vec<TerminalInfo>,
}

/// `POST /v1/users/{uid}/kick`
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kick {
    #[serde(default)]
    pub device: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
    /// Also refuse, from now on, every terminal token of the user (of `device` only, when
    /// given) issued up to now, so the kicked terminals cannot come back with the token they
    /// hold (logout, a stolen phone, a banned account). New tokens are accepted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub revoke: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kicked {
    pub kicked: u64,
    /// With `revoke`: tokens issued before this time (Unix ms) are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_before_ms: Option<u64>,
}

/// `POST /v1/tokens`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    pub user: String,
    #[serde(default)]
    pub ttl_s: Option<u64>,
    #[serde(default)]
    pub device: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenResponse {
    pub token: String,
    /// Unix seconds.
    pub expires_at: u64,
}

/// A [`SendMessage`] borrowed from the request bytes, its body kept as the JSON text it came
/// as: the engine's path for `POST /v1/messages` and batch entries. The usual requests
/// (unescaped ids, any body) are read without building a `Value`; anything else goes through
/// the `SendMessage` path, so a request is accepted or refused, with the same error, exactly
/// as [`parse_request`] + [`SendMessage::validate`] would.
#[derive(Debug, Clone)]
pub struct SendMessageRef<'a> {
    pub from: Cow<'a, str>,
    pub to: Cow<'a, str>,
    pub kind: Kind,
    pub body: Cow<'a, RawValue>,
    pub cid: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendMessageBorrowed<'a> {
    from: &'a str,
    to: &'a str,
    kind: Kind,
    #[serde(borrow)]
    body: &'a RawValue,
    #[serde(default)]
    cid: Option<&'a str>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendBatchBorrowed<'a> {
    #[serde(borrow)]
    messages: Vec<&'a RawValue>,
}

impl<'a> SendMessageRef<'a> {
    fn borrowed(bytes: &'a [u8]) -> Option<SendMessageRef<'a>> {
        // An object only: the derived `Deserialize` would also read the fields from an array.
        if !body::is_object_text(bytes) {
            return None;
        }
        let m: SendMessageBorrowed<'a> = serde_json::from_slice(bytes).ok()?;
        Some(SendMessageRef {
            from: Cow::Borrowed(m.from),
            to: Cow::Borrowed(m.to),
            kind: m.kind,
            body: Cow::Borrowed(m.body),
            cid: m.cid.map(Cow::Borrowed),
        })
    }

    fn owned(m: SendMessage) -> Result<SendMessageRef<'static>, ApiError> {
        let body = serde_json::value::to_raw_value(&m.body)
            .map_err(|e| ApiError::new(ErrorCode::InvalidBody, format!("body: {e}")))?;
        Ok(SendMessageRef {
            from: Cow::Owned(m.from),
            to: Cow::Owned(m.to),
            kind: m.kind,
            body: Cow::Owned(body),
            cid: m.cid.map(Cow::Owned),
        })
    }

    /// Parses a `POST /v1/messages` body (errors as [`parse_request`]'s).
    pub fn parse(bytes: &'a [u8]) -> Result<SendMessageRef<'a>, ApiError> {
        match Self::borrowed(bytes) {
            Some(m) => Ok(m),
            None => Self::owned(parse_request::<SendMessage>(bytes)?),
        }
    }

    /// Parses entry `i` of a batch (errors as `SendMessage::deserialize` on the entry's value,
    /// prefixed `messages[i]: `).
    pub fn parse_batch_entry(i: usize, raw: &'a RawValue) -> Result<SendMessageRef<'a>, ApiError> {
        if let Some(m) = Self::borrowed(raw.get().as_bytes()) {
            return Ok(m);
        }
        let invalid = |e: serde_json::Error| ApiError::new(ErrorCode::InvalidBody, format!("messages[{i}]: {e}"));
        let value: Value = serde_json::from_str(raw.get()).map_err(invalid)?;
        Self::owned(send_message_entry(&value).map_err(invalid)?)
    }

    /// [`SendMessage::validate`], on the raw body.
    pub fn validate(&self, prefix: &str) -> Result<(), ApiError> {
        check_addressing(prefix, &self.from, &self.to, self.cid.as_deref())?;
        body::validate_raw(&format!("{prefix}body"), self.kind, &self.body)
            .map_err(|e| ApiError::new(ErrorCode::InvalidBody, e.to_string()))
    }
}

/// A batch entry's [`SendMessage`]: an object, like a request (`SendMessage::deserialize` alone
/// would also read its fields from an array); anything else is refused as serde refuses a
/// string or a number there (`invalid type: sequence, expected struct SendMessage`).
fn send_message_entry(value: &Value) -> Result<SendMessage, serde_json::Error> {
    if value.is_array() {
        return Err(serde::de::Error::invalid_type(serde::de::Unexpected::Seq, &"struct SendMessage"));
    }
    SendMessage::deserialize(value)
}

/// Parses a `POST /v1/messages/batch` body into its raw entries (errors as [`parse_request`]'s
/// for a [`SendBatch`]); each entry is then read with [`SendMessageRef::parse_batch_entry`].
pub fn parse_batch(bytes: &[u8]) -> Result<Vec<Cow<'_, RawValue>>, ApiError> {
    if body::is_object_text(bytes) {
        if let Ok(b) = serde_json::from_slice::<SendBatchBorrowed>(bytes) {
            return Ok(b.messages.into_iter().map(Cow::Borrowed).collect());
        }
    }
    let batch: SendBatch = parse_request(bytes)?;
    batch
        .messages
        .iter()
        .map(|v| {
            serde_json::value::to_raw_value(v)
                .map(Cow::Owned)
                .map_err(|e| ApiError::new(ErrorCode::InvalidBody, format!("messages: {e}")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parse_errors_are_classified() {
        let e = parse_request::<SendMessage>(b"{").unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidJson);
        let e = parse_request::<SendMessage>(b"[]").unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidBody);
        let e = parse_request::<SendMessage>(br#"{"from":"a","to":"b","kind":"gif","body":{}}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidBody);
        assert!(e.message.starts_with("kind"), "{}", e.message);
        let e = parse_request::<SendMessage>(br#"{"from":"a","kind":"text","body":{}}"#).unwrap_err();
        assert!(e.message.contains("to"), "{}", e.message);
    }

    #[test]
    fn send_message_validation() {
        let m: SendMessage = parse_request(br#"{"from":"a","to":"b","kind":"text","body":{"text":"hi"}}"#).unwrap();
        m.validate("").unwrap();
        let bad = SendMessage { from: "a b".into(), ..m.clone() };
        assert!(bad.validate("").unwrap_err().message.starts_with("from"));
        let bad = SendMessage { body: json!({"text": 1}), ..m.clone() };
        assert!(bad.validate("messages[1].").unwrap_err().message.starts_with("messages[1].body.text"));
        let bad = SendMessage { cid: Some(String::new()), ..m };
        assert!(bad.validate("").unwrap_err().message.starts_with("cid"));
    }

    #[test]
    fn batch_result_shapes() {
        let ok = BatchResult::Sent(SentMessage { id: "9".into(), ts: 1 });
        assert_eq!(serde_json::to_value(&ok).unwrap(), json!({"id":"9","ts":1}));
        let err = BatchResult::Failed {
            error: crate::error::ErrorDetail { code: ErrorCode::InvalidBody, message: "m".into() },
        };
        assert_eq!(serde_json::to_value(&err).unwrap(), json!({"error":{"code":"invalid_body","message":"m"}}));
    }

    type Checked = Result<(String, String, Kind, Value, Option<String>), ApiError>;

    fn fast(bytes: &[u8]) -> Checked {
        let m = SendMessageRef::parse(bytes)?;
        m.validate("")?;
        let body = serde_json::from_str(m.body.get()).unwrap();
        Ok((m.from.into_owned(), m.to.into_owned(), m.kind, body, m.cid.map(Cow::into_owned)))
    }

    fn slow(bytes: &[u8]) -> Checked {
        let m: SendMessage = parse_request(bytes)?;
        m.validate("")?;
        Ok((m.from, m.to, m.kind, m.body, m.cid))
    }

    fn requestish() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let value = prop_oneof![
            Just(Value::Null),
            Just(json!(1)),
            Just(json!("a")),
            Just(json!("b c")),
            Just(json!("text")),
            Just(json!("a\\u0062")),
            Just(json!({"text": "hi"})),
            Just(json!({"text": ""})),
            Just(json!({"url": "u"})),
            Just(json!([])),
            Just(json!(["hi"])),
            Just(json!([["hi"]])),
            Just(json!(["u", 1, 2, 3])),
        ];
        let key = prop_oneof![Just("from"), Just("to"), Just("kind"), Just("body"), Just("cid"), Just("x")];
        let full = json!({"from": "a", "to": "b", "kind": "text", "body": {"text": "hi"}});
        // 0: the object; 1: its fields' values in `SendMessage` order, as an array (what a
        // derived `Deserialize` would take for the struct); 2: that array in an array.
        let shape = prop_oneof![6 => Just(0u8), 2 => Just(1u8), 1 => Just(2u8)];
        (proptest::collection::btree_map(key, value, 0..5), any::<bool>(), shape).prop_map(
            move |(fields, base, shape)| {
                let mut m = if base { full.as_object().cloned().unwrap() } else { serde_json::Map::new() };
                for (k, v) in fields {
                    m.insert(k.to_owned(), v);
                }
                let in_order = || {
                    let order = ["from", "to", "kind", "body", "cid", "x"];
                    Value::Array(order.iter().map_while(|k| m.get(*k).cloned()).collect())
                };
                match shape {
                    0 => Value::Object(m.clone()),
                    1 => in_order(),
                    _ => Value::Array(vec![in_order()]),
                }
            },
        )
    }

    proptest::proptest! {
        /// The borrowed path accepts and refuses exactly what `parse_request` + `validate` do.
        #[test]
        fn borrowed_send_agrees(v in requestish()) {
            let bytes = serde_json::to_vec(&v).unwrap();
            proptest::prop_assert_eq!(fast(&bytes), slow(&bytes));
        }

        #[test]
        fn borrowed_batch_entries_agree(v in requestish()) {
            let batch = serde_json::to_vec(&json!({"messages": [v.clone()]})).unwrap();
            let raw = parse_batch(&batch).unwrap();
            let fast = SendMessageRef::parse_batch_entry(0, &raw[0]).and_then(|m| m.validate("messages[0].").map(|()| m));
            // An entry is refused unless it is an object, as any other non-object is.
            let slow = if v.is_array() {
                Err(ApiError::new(ErrorCode::InvalidBody, "messages[0]: invalid type: sequence, expected struct SendMessage"))
            } else {
                SendMessage::deserialize(&v).map_err(|e| ApiError::new(ErrorCode::InvalidBody, format!("messages[0]: {e}")))
            }
                .and_then(|m| m.validate("messages[0].").map(|()| m));
            proptest::prop_assert_eq!(fast.map(|m| (m.from.into_owned(), m.kind)), slow.map(|m| (m.from, m.kind)));
        }
    }

    proptest::proptest! {
        /// A batch body is read exactly as `parse_request::<SendBatch>` reads it, arrays
        /// included (`[[…]]` holds a `SendBatch`'s fields in order).
        #[test]
        fn borrowed_batch_bodies_agree(v in requestish(), shape in 0u8..4) {
            let body = match shape {
                0 => json!({"messages": [v]}),
                1 => json!([[v]]),
                2 => json!([v]),
                _ => json!({"messages": v}),
            };
            let bytes = serde_json::to_vec(&body).unwrap();
            let fast = parse_batch(&bytes).map(|raw| raw.iter().map(|r| r.get().to_owned()).collect::<Vec<_>>());
            let slow = parse_request::<SendBatch>(&bytes).map(|b| b.messages.iter().map(Value::to_string).collect());
            proptest::prop_assert_eq!(fast, slow);
        }
    }

    /// Requests and entries are objects on the fast path too: a derived `Deserialize` would
    /// read the fields from an array in order.
    #[test]
    fn arrays_are_not_requests() {
        for bytes in [&br#"["a","b","text",{"text":"hi"}]"#[..], br#" ["a","b","text",{"text":"hi"},"c"]"#] {
            let e = SendMessageRef::parse(bytes).unwrap_err();
            assert_eq!(e, ApiError::new(ErrorCode::InvalidBody, "request body must be a JSON object"));
            assert_eq!(Err(e), slow(bytes));
        }
        let e = fast(br#"{"from":"a","to":"b","kind":"text","body":["hi"]}"#).unwrap_err();
        assert_eq!(e, ApiError::new(ErrorCode::InvalidBody, "body: must be an object"));
        let batch = br#"[[{"from":"a","to":"b","kind":"text","body":{"text":"hi"}}]]"#;
        assert_eq!(parse_batch(batch).unwrap_err(), parse_request::<SendBatch>(batch).unwrap_err());
        let raw = RawValue::from_string(r#"["a","b","text",{"text":"hi"}]"#.into()).unwrap();
        let e = SendMessageRef::parse_batch_entry(3, &raw).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidBody);
        assert_eq!(e.message, "messages[3]: invalid type: sequence, expected struct SendMessage");
    }

    #[test]
    fn batch_bodies_parse_like_send_batch() {
        assert_eq!(parse_batch(b"{").unwrap_err(), parse_request::<SendBatch>(b"{").unwrap_err());
        let bad = br#"{"messages": 3}"#;
        assert_eq!(parse_batch(bad).unwrap_err(), parse_request::<SendBatch>(bad).unwrap_err());
        let two = parse_batch(br#"{"messages": [{"a": 1}, 2]}"#).unwrap();
        assert_eq!(two.iter().map(|r| r.get()).collect::<Vec<_>>(), [r#"{"a": 1}"#, "2"]);
    }
}
