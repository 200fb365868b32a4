//! Request and response bodies of the business REST API (API.md section 3).
//!
//! Requests are parsed with [`parse_request`], which tells apart malformed JSON
//! (`invalid_json`) from a well-formed body of the wrong shape (`invalid_body`, with the path).
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
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
        check_id(&format!("{prefix}from"), &self.from)?;
        check_id(&format!("{prefix}to"), &self.to)?;
        if let Some(cid) = &self.cid {
            if cid.is_empty() || cid.len() > CID_LEN_MAX {
                return Err(ApiError::new(
                    ErrorCode::InvalidBody,
                    format!("{prefix}cid: must be 1-{CID_LEN_MAX} bytes"),
                ));
            }
        }
        body::validate(&format!("{prefix}body"), self.kind, &self.body)
            .map_err(|e| ApiError::new(ErrorCode::InvalidBody, e.to_string()))
    }
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
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kicked {
    pub kicked: u64,
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
}
