//! `ether-http`: the HTTP/1.1 server side of Ether-IM. The engine uses it for the api port
//! (business REST/JSON), the admin port (health, metrics, admin JSON, dashboard), and to read
//! the WebSocket upgrade request on the client port.
//!
//! # Layout
//!
//! - [`request`]: sans-IO, no sockets, no clock. [`Limits`] bound every request;
//!   [`check`] says without allocating how far a buffer is from one whole request;
//!   [`parse`] returns the owned [`Request`] and the bytes it used, or `Ok(None)` while
//!   incomplete; [`HttpError`] is the one error enum of this layer, each variant mapped to
//!   one status and one API error code.
//! - [`response`]: [`Response`] (what a handler returns), its encoding into a caller-owned
//!   `Vec<u8>`, and [`error_response`] (the only place an [`HttpError`] becomes bytes).
//! - [`server`]: glommio I/O. [`serve_connection`] owns one connection: a read buffer that
//!   grows only as bytes arrive (bounded by the limits), the keep-alive loop, and one
//!   `write_all` per batch of pipelined responses. [`accept_loop`] owns a listener: spawns a
//!   local task per connection, caps live connections, backs off on accept errors, and stops
//!   on a [`Stop`] signal. [`read_request`] reads a single request for callers that keep the
//!   socket (WebSocket upgrade).
//!
//! # Data flow
//!
//! socket → read buffer → [`parse`] (repeat while whole requests remain: pipelining) →
//! handler `Fn(Request) -> impl Future<Output = Response>` (in request order, one at a time)
//! → [`Response`] encoded into the batch buffer → one write → next read, or close when a
//! request asked for it, the peer left, the idle timeout passed, or [`Stop`] fired. A
//! refused request is answered from [`error_response`] with `Connection: close`.
//!
//! Bodies are framed by `Content-Length` only; `Transfer-Encoding` is answered 411 (see
//! [`request`]). Everything here runs on one glommio executor: types are `!Send` on purpose.
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod request;
pub mod response;
pub mod server;

pub use request::{check, parse, parse_head, HttpError, Limits, Method, Progress, Request};
pub use response::{error_response, reason_phrase, Response};
pub use server::{accept_loop, read_request, serve_connection, CloseReason, HeadGate, ServeError, Stop, Stopped};
