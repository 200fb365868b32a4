//! `ether-sdk`: the Rust client of an Ether-IM node.
//!
//! Layout:
//! - [`gateway`]: [`GatewayClient`], a blocking client of the business REST API on the api port
//!   (`127.0.0.1:9001` by default, `Authorization: Bearer <api_key>`), one keep-alive TCP
//!   connection reused across calls. Typed calls for the shapes of [`ether_proto::api`], JSON
//!   [`serde_json::Value`] for the group calls, and [`GatewayClient::request`] for arbitrary
//!   bytes.
//! - [`terminal`]: [`TerminalClient`], a blocking WebSocket terminal (tungstenite over a
//!   `std::net::TcpStream`) speaking the JSON frames of [`ether_proto::frame`]: connect and wait
//!   for `welcome`, `recv` with a timeout (pings answered on the way), `ack`, `send_text`, ...
//! - [`error`]: [`SdkError`], the one error type: API errors keep their HTTP status and public
//!   code, a refused upgrade its status and the node's reason ([`SdkError::Rejected`]), a server close its code
//!   ([`SdkError::Closed`]).
//!
//! The SDK holds no secret of the node: terminal tokens come from `POST /v1/tokens`
//! ([`GatewayClient::token`]) or from `ether token`.
//!
//! The wire types are re-exported as [`proto`] (the `ether-proto` crate) and tungstenite as
//! [`tungstenite`], so users need no direct dependency on either.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use ether_sdk::proto::api::{SendMessage, TokenRequest};
//! use ether_sdk::proto::{Kind, ServerFrame};
//! use ether_sdk::{GatewayClient, TerminalClient};
//!
//! # fn main() -> Result<(), ether_sdk::SdkError> {
//! let api = GatewayClient::new("127.0.0.1:9001", "my-api-key");
//!
//! // A terminal for bob, with a token minted by the node.
//! let token = api.token(TokenRequest { user: "bob".into(), ttl_s: Some(3600), device: None })?;
//! let (mut bob, welcome) =
//!     TerminalClient::connect("ws://127.0.0.1:9000", &token.token, "laptop", "desktop")?;
//! println!("bob's inbox is at seq {}", welcome.inbox_seq);
//!
//! // The business system sends alice -> bob.
//! let sent = api.send_message(&SendMessage {
//!     from: "alice".into(),
//!     to: "bob".into(),
//!     kind: Kind::Text,
//!     body: serde_json::json!({"text": "hello"}),
//!     cid: Some("order-42".into()),
//! })?;
//!
//! // Bob's terminal gets it, and acks it.
//! let msg = bob.recv_msg(Duration::from_secs(5))?;
//! assert_eq!(msg.id, sent.id);
//! bob.ack(msg.seq)?;
//!
//! // Bob answers from the terminal.
//! bob.send_text("c-1", "alice", "hi alice")?;
//! bob.recv_until(|f| matches!(f, ServerFrame::Sent { .. }), Duration::from_secs(5))?;
//! bob.close()?;
//! # Ok(())
//! # }
//! ```
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod error;
pub mod gateway;
pub mod terminal;
pub mod tls;

pub use ether_proto as proto;
pub use tungstenite;

pub use error::SdkError;
pub use gateway::{GatewayClient, HistoryQuery, RawResponse};
/// rustls, for [`ConnectOptions::tls`] settings beyond [`tls_config_with_roots`].
pub use rustls;
pub use terminal::{ConnectOptions, TerminalClient, Welcome};
pub use tls::tls_config_with_roots;
