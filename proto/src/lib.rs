//! The Ether-IM wire contract, shared by the engine, the SDK and the load tester.
//!
//! Layout:
//! - [`ids`]: user, device and group identifiers and chat names (`u:<user>`, `g:<group>`).
//! - [`body`]: message kinds and the validation of their bodies (errors carry the field path).
//! - [`frame`]: WebSocket frames, server to terminal ([`ServerFrame`]) and terminal to server
//!   ([`ClientFrame`]).
//! - [`pb`]: the `ether.v1.proto` subprotocol (Protocol Buffers frames generated from
//!   `proto/ether.v1.proto`) and its conversions to and from the JSON frames.
//! - [`api`]: request and response bodies of the business REST API.
//! - [`error`]: the public error codes and their HTTP statuses.
//!
//! This crate owns shapes and validation only: no I/O, no engine state.
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod api;
pub mod body;
pub mod error;
pub mod frame;
pub mod ids;
pub mod pb;

pub use body::{BodyError, Kind};
pub use error::{ApiError, ErrorCode};
pub use frame::{ClientFrame, ServerFrame};
