//! The one error type of the SDK, for both the REST client and the terminal client.
use ether_proto::ApiError;

/// Everything that can go wrong talking to an Ether-IM node.
///
/// The variants that tests usually match on are [`SdkError::Api`] (a REST call answered with
/// the public error envelope), [`SdkError::Rejected`] (a WebSocket upgrade refused with an HTTP
/// status, e.g. 401 for a bad token) and [`SdkError::Closed`] (the server closed the
/// WebSocket, with its close code).
#[derive(Debug, thiserror::Error)]
pub enum SdkError {
    /// The api port answered with a non-2xx status and the `{"error":{code,message}}` envelope.
    #[error("api error (HTTP {status}): {error}")]
    Api { status: u16, error: ApiError },
    /// The api port answered with a non-2xx status and a body that is not the error envelope
    /// (the body is kept as text, lossily decoded).
    #[error("HTTP {0}: {1}")]
    Http(u16, String),
    /// A socket error: connect refused, reset, timed out.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// A 2xx answer or a server frame that does not decode into the expected shape.
    #[error("decode error: {0}")]
    Decode(String),
    /// The peer broke HTTP or WebSocket framing (malformed status line, bad chunk size, ...).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A base URL or WebSocket URL that this client cannot use (e.g. `https://`).
    #[error("invalid url: {0}")]
    InvalidUrl(String),
    /// The WebSocket upgrade was refused with this HTTP status (401 for a bad, expired or
    /// revoked token) and the node's `error.message` (empty when the answer carried none).
    #[error("websocket upgrade rejected with HTTP {status}: {message}")]
    Rejected { status: u16, message: String },
    /// The WebSocket is closed: `code` is the server's close code when it sent a close frame
    /// (4001 after `kicked`, 1012 after `reconnect`), `None` when the connection just ended.
    #[error("websocket closed (code {code:?}): {reason}")]
    Closed { code: Option<u16>, reason: String },
    /// Nothing matching arrived in time (see [`crate::TerminalClient::recv_until`]).
    #[error("timed out: {0}")]
    Timeout(String),
    /// TLS settings this client cannot use (a bad root certificate, an unusable server name).
    /// A failed TLS handshake (e.g. an untrusted certificate) is an [`SdkError::Io`].
    #[error("tls: {0}")]
    Tls(String),
    /// Any other WebSocket error from tungstenite.
    #[error("websocket error: {0}")]
    Ws(Box<tungstenite::Error>),
}

impl SdkError {
    /// The HTTP status of an [`SdkError::Api`], [`SdkError::Http`] or [`SdkError::Rejected`].
    pub fn status(&self) -> Option<u16> {
        match self {
            SdkError::Api { status, .. } | SdkError::Rejected { status, .. } => Some(*status),
            SdkError::Http(status, _) => Some(*status),
            _ => None,
        }
    }

    /// The public error code of an [`SdkError::Api`].
    pub fn code(&self) -> Option<ether_proto::ErrorCode> {
        match self {
            SdkError::Api { error, .. } => Some(error.code),
            _ => None,
        }
    }
}

impl From<tungstenite::Error> for SdkError {
    fn from(e: tungstenite::Error) -> Self {
        match e {
            tungstenite::Error::Io(io) => SdkError::Io(io),
            tungstenite::Error::Http(resp) => {
                // The node answers refusals with `{"error":{"code","message"}}`.
                let message = resp
                    .body()
                    .as_deref()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok())
                    .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
                    .unwrap_or_default();
                SdkError::Rejected { status: resp.status().as_u16(), message }
            }
            other => SdkError::Ws(Box::new(other)),
        }
    }
}
