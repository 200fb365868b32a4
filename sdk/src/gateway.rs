//! [`GatewayClient`]: a blocking client of the business REST API (API.md section 3).
//!
//! # Why a hand-written HTTP/1.1 client
//!
//! The api port speaks plain HTTP/1.1 with JSON bodies and `Content-Length` framing, and the
//! callers (engine integration tests, the load tester's control paths) want three things a
//! general client makes awkward: one TCP connection reused across calls and *observable* as such
//! (tests count accepts), the exact bytes of arbitrary requests ([`GatewayClient::request`] sends
//! malformed JSON on purpose), and no TLS or async stack pulled into the dependency tree. A
//! small client over [`std::net::TcpStream`] does exactly that in a few hundred lines:
//! requests are written in one buffer, answers are read with `Content-Length` (chunked and
//! read-to-close bodies are understood too, for robustness), and headers are parsed by
//! `httparse`, the parser the engine's own HTTP layer uses.
//!
//! # Connection reuse
//!
//! The client holds at most one idle keep-alive connection behind a mutex, so a
//! `GatewayClient` is `Send + Sync` and calls from several threads are serialized on that one
//! connection (use one client per thread for parallel load). When a *reused* connection turns
//! out to be closed by the server (the write fails, or the read sees end-of-stream or a reset
//! before the first byte of an answer), the request is sent once more on a fresh connection:
//! this is the usual idle keep-alive race, and the api port's `cid` idempotency makes a
//! repeated send safe anyway. A fresh connection that fails is reported as is.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};

use crate::tls::Conn;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use ether_proto::api::{
    BatchResults, Broadcast, BroadcastResult, Kick, Kicked, Presence, SendBatch, SendMessage, SentMessage,
    TokenRequest, TokenResponse,
};
use ether_proto::error::ErrorEnvelope;
use ether_proto::{ApiError, Kind};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

use crate::error::SdkError;

/// The api port's default address.
pub const DEFAULT_API_ADDR: &str = "127.0.0.1:9001";

/// Default time allowed to connect.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time allowed for one read or write on the socket.
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest response head accepted, in bytes.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Default bound of an answer's body: a node's largest answer (a history page of 1,000
/// messages of 64 KiB) fits; a server sending more is refused, not buffered.
pub const DEFAULT_MAX_BODY_BYTES: usize = 80 * 1024 * 1024;
/// Longest chunk-size or trailer line of a chunked body.
const MAX_CHUNK_LINE_BYTES: usize = 4096;
/// Most response headers accepted.
const MAX_HEADERS: usize = 64;

/// An HTTP answer as received: status, headers, raw body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawResponse {
    pub status: u16,
    /// Header names as sent by the server (compare with [`RawResponse::header`], which ignores
    /// case).
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The first header named `name` (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The body as text (lossy UTF-8).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body decoded as JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, SdkError> {
        decode_body(&self.body)
    }

    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body decoded as `T` when the status is 2xx, else the API error: the
    /// `{"error":{code,message}}` envelope as [`SdkError::Api`], any other body as
    /// [`SdkError::Http`].
    pub fn into_result<T: DeserializeOwned>(self) -> Result<T, SdkError> {
        if self.is_success() {
            return self.json();
        }
        Err(self.into_error())
    }

    /// The error this (non-2xx) answer stands for.
    pub fn into_error(self) -> SdkError {
        match serde_json::from_slice::<ErrorEnvelope>(&self.body) {
            Ok(env) => SdkError::Api { status: self.status, error: ApiError::new(env.error.code, env.error.message) },
            Err(_) => SdkError::Http(self.status, self.text()),
        }
    }
}

fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, SdkError> {
    // An empty 2xx body (e.g. a `DELETE` answered `204`) decodes as JSON `null`, so callers
    // asking for a `serde_json::Value` get `Value::Null`.
    let bytes: &[u8] = if body.iter().all(u8::is_ascii_whitespace) { b"null" } else { body };
    serde_json::from_slice(bytes).map_err(|e| {
        let text = String::from_utf8_lossy(body);
        let snippet: String = text.chars().take(200).collect();
        SdkError::Decode(format!("{e} in response body {snippet:?}"))
    })
}

/// Query of `GET /v1/users/{uid}/messages` and `GET /v1/groups/{gid}/messages`; unset fields
/// are left out of the query string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistoryQuery {
    /// Only this chat (`u:<user>` or `g:<group>`); user history only.
    pub chat: Option<String>,
    pub before_seq: Option<u64>,
    pub after_seq: Option<u64>,
    pub limit: Option<u32>,
}

impl HistoryQuery {
    pub fn chat(mut self, chat: impl Into<String>) -> Self {
        self.chat = Some(chat.into());
        self
    }

    pub fn before_seq(mut self, seq: u64) -> Self {
        self.before_seq = Some(seq);
        self
    }

    pub fn after_seq(mut self, seq: u64) -> Self {
        self.after_seq = Some(seq);
        self
    }

    pub fn limit(mut self, limit: u32) -> Self {
        self.limit = Some(limit);
        self
    }

    /// `?chat=..&before_seq=..` (empty when nothing is set).
    pub fn to_query_string(&self) -> String {
        let mut q = Query::default();
        q.opt("chat", self.chat.as_deref());
        q.opt("before_seq", self.before_seq);
        q.opt("after_seq", self.after_seq);
        q.opt("limit", self.limit);
        q.finish()
    }
}

/// Builds a query string, percent-encoding each value.
#[derive(Default)]
struct Query(String);

impl Query {
    fn opt(&mut self, key: &str, value: Option<impl ToString>) {
        if let Some(v) = value {
            self.0.push(if self.0.is_empty() { '?' } else { '&' });
            self.0.push_str(key);
            self.0.push('=');
            self.0.push_str(&percent_encode(&v.to_string()));
        }
    }

    fn finish(self) -> String {
        self.0
    }
}

/// Percent-encodes `s` for a path segment or a query value: ASCII letters, digits and
/// `-._~:@` stay as they are (so ids and chat names like `u:bob` read naturally), every other
/// byte becomes `%XX`.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b':' | b'@') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Where requests go.
#[derive(Debug, Clone)]
struct Target {
    /// `host:port` to connect to.
    connect: String,
    /// The `Host` header: the authority as given.
    host: String,
    /// Path prefix from the base URL (`""` or `/prefix`, no trailing slash).
    prefix: String,
    /// `https://`: the name the server's certificate must be for.
    tls_name: Option<String>,
}

fn parse_base(base: &str) -> Result<Target, String> {
    let base = base.trim();
    let (tls, rest) = if let Some(i) = base.find("://") {
        let scheme = &base[..i];
        let tls = if scheme.eq_ignore_ascii_case("http") {
            false
        } else if scheme.eq_ignore_ascii_case("https") {
            true
        } else {
            return Err(format!("{base:?}: only http:// and https:// are supported"));
        };
        (tls, &base[i + 3..])
    } else {
        (false, base)
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if authority.is_empty() {
        return Err(format!("{base:?}: no host"));
    }
    // A port is present unless the authority ends in a bare host (`host`, `[::1]`).
    let has_port = match authority.rfind(':') {
        Some(i) => !authority[i..].contains(']'),
        None => false,
    };
    let connect = if has_port { authority.to_owned() } else { format!("{authority}:{}", if tls { 443 } else { 80 }) };
    let host_only = if has_port { &authority[..authority.rfind(':').unwrap_or(authority.len())] } else { authority };
    let tls_name = tls.then(|| host_only.trim_start_matches('[').trim_end_matches(']').to_owned());
    Ok(Target { connect, host: authority.to_owned(), prefix: path.trim_end_matches('/').to_owned(), tls_name })
}

/// A blocking client of the api port (business REST API).
///
/// Every call sends `Authorization: Bearer <api_key>` (none when the key is empty, to test
/// the 401 path). Calls that have a type in `ether_proto::api` decode into it; the group calls
/// and the history/unread calls return the answer as [`serde_json::Value`]. A non-2xx answer
/// becomes [`SdkError::Api`] (with the status and the decoded error code) when it carries the
/// public error envelope, [`SdkError::Http`] otherwise.
#[derive(Debug)]
pub struct GatewayClient {
    target: Result<Target, String>,
    api_key: String,
    connect_timeout: Duration,
    io_timeout: Duration,
    conn: Mutex<Option<BufReader<TimedConn>>>,
    connects: std::sync::atomic::AtomicU64,
    /// TLS settings for an `https://` base (`None`: the Mozilla roots).
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// The most one call may take, connecting, writing, reading and its retry on a stale
    /// connection included (`None`: only the per-step timeouts bound it).
    call_timeout: Option<Duration>,
    /// Largest answer body read; a bigger one fails the call (`SdkError::Protocol`), or is
    /// dropped unread with `discard_oversized_body`.
    max_body_bytes: usize,
    /// An answer whose body is over `max_body_bytes` still counts by its status: the call
    /// returns the status and headers with an empty body, and the connection (with the rest
    /// of the body unread) is closed.
    discard_oversized_body: bool,
}

/// A connection whose reads and writes stop at a call's deadline: each one's socket timeout is
/// the per-step timeout or what is left of the call, whichever is less.
#[derive(Debug)]
struct TimedConn {
    conn: Conn,
    deadline: Option<Instant>,
    io_timeout: Duration,
}

/// The addresses of `host:port`: a literal address at once, a name through `lookup` on a
/// thread of its own, given up after `timeout` (the system resolver has no timeout of its own
/// to pass; a lookup given up on ends on its thread, its answer dropped).
fn resolve<F>(connect: &str, timeout: Duration, lookup: F) -> std::io::Result<Vec<SocketAddr>>
where
    F: FnOnce(String) -> std::io::Result<Vec<SocketAddr>> + Send + 'static,
{
    if let Ok(addr) = connect.parse::<SocketAddr>() {
        return Ok(vec![addr]);
    }
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let name = connect.to_owned();
    std::thread::Builder::new().name("ether-sdk-lookup".into()).spawn(move || {
        let _ = tx.send(lookup(name));
    })?;
    match rx.recv_timeout(timeout) {
        Ok(found) => found,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("looking up {connect} took longer than {} ms", timeout.as_millis()),
        )),
    }
}

fn deadline_passed() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "the call took longer than its timeout (with_call_timeout)")
}

impl TimedConn {
    /// Sets the socket's timeout for the next step with `set`; an error once the deadline passed.
    fn arm(&self, set: fn(&TcpStream, Option<Duration>) -> std::io::Result<()>) -> std::io::Result<()> {
        let Some(deadline) = self.deadline else { return Ok(()) };
        match deadline.checked_duration_since(Instant::now()).filter(|left| !left.is_zero()) {
            Some(left) => set(self.conn.tcp(), Some(left.min(self.io_timeout))),
            None => Err(deadline_passed()),
        }
    }
}

impl Read for TimedConn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.arm(TcpStream::set_read_timeout)?;
        self.conn.read(buf)
    }
}

impl Write for TimedConn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.arm(TcpStream::set_write_timeout)?;
        self.conn.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.conn.flush()
    }
}

/// How much of an answer's body is read, and what happens to a bigger one.
#[derive(Debug, Clone, Copy)]
struct BodyLimit {
    max: usize,
    /// Return the answer with an empty body (and close the connection) instead of failing.
    discard_over: bool,
}

/// How one exchange on a connection failed.
enum Failure {
    /// Nothing of an answer arrived: the connection was likely closed while idle; safe to
    /// retry on a fresh connection if this one was reused.
    Stale(SdkError),
    /// Anything else.
    Fatal(SdkError),
}

impl GatewayClient {
    /// A client of the api port at `base` (`127.0.0.1:9001`, `http://127.0.0.1:9001`, a URL
    /// with a path prefix `http://gw.local:8080/ether`, or `https://…` behind a TLS proxy),
    /// authenticating with `api_key`.
    ///
    /// Nothing is connected yet; the first call connects. An unusable `base` (e.g. `ftp://`)
    /// makes every call fail with [`SdkError::InvalidUrl`].
    pub fn new(base: impl ToString, api_key: impl Into<String>) -> GatewayClient {
        GatewayClient {
            target: parse_base(&base.to_string()),
            api_key: api_key.into(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            io_timeout: DEFAULT_IO_TIMEOUT,
            conn: Mutex::new(None),
            connects: std::sync::atomic::AtomicU64::new(0),
            tls: None,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            discard_oversized_body: false,
            call_timeout: None,
        }
    }

    /// Sets the largest answer body this client reads (default [`DEFAULT_MAX_BODY_BYTES`]); a
    /// server announcing or sending more fails the call instead of exhausting memory.
    pub fn with_max_body_bytes(mut self, max: usize) -> Self {
        self.max_body_bytes = max;
        self
    }

    /// Answers whose body is over the limit (see [`GatewayClient::with_max_body_bytes`]) are
    /// returned with their status and headers and an empty body instead of failing the call:
    /// for callers that only need the status (a webhook sender, whose receiver may echo the
    /// request or answer with a page). The connection is closed after such an answer.
    pub fn with_oversized_body_discarded(mut self) -> Self {
        self.discard_oversized_body = true;
        self
    }

    /// TLS settings for an `https://` base (default: the Mozilla roots; see
    /// [`crate::tls_config_with_roots`] for a private CA).
    pub fn with_tls(mut self, config: std::sync::Arc<rustls::ClientConfig>) -> Self {
        self.tls = Some(config);
        self
    }

    /// Sets the connect timeout (default 10 s). It bounds the host name lookup too, which the
    /// system resolver otherwise lets run for as long as its own retries take.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Bounds a whole call (default: none): looking the host name up, connecting, writing the
    /// request, reading the answer and the one retry on a stale pooled connection, however
    /// slowly the server trickles its bytes (the per-read timeout restarts with each byte).
    /// Past it the call fails with a timed-out I/O error.
    pub fn with_call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = Some(timeout);
        self
    }

    /// Sets the per-read/per-write socket timeout (default 30 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.io_timeout = timeout;
        self
    }

    /// How many TCP connections this client has opened so far (1 after any number of calls
    /// when keep-alive works).
    pub fn connections_opened(&self) -> u64 {
        self.connects.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Drops the idle connection, if any; the next call connects anew.
    pub fn disconnect(&self) {
        *self.conn.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    // ---- generic -------------------------------------------------------------------------

    /// Sends `method path` with `body` (as is, labelled `application/json`) and returns the
    /// answer whatever its status: the way to test malformed input and error statuses.
    /// `path` may carry a query string.
    pub fn request(&self, method: &str, path: &str, body: Option<&[u8]>) -> Result<RawResponse, SdkError> {
        self.request_with_headers(method, path, &[], body)
    }

    /// Like [`GatewayClient::request`], with extra request headers. A `Content-Type` or
    /// `Authorization` given here replaces the default one.
    pub fn request_with_headers(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<RawResponse, SdkError> {
        let target = self.target.as_ref().map_err(|e| SdkError::InvalidUrl(e.clone()))?;
        let req = self.encode(target, method, path, headers, body);
        let head_only = method.eq_ignore_ascii_case("HEAD");
        let mut slot = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        let deadline = self.call_timeout.map(|t| Instant::now() + t);
        loop {
            let (mut conn, reused) = match slot.take() {
                Some(mut c) => {
                    c.get_mut().deadline = deadline;
                    (c, true)
                }
                None => (self.connect(target, deadline)?, false),
            };
            let limit = BodyLimit { max: self.max_body_bytes, discard_over: self.discard_oversized_body };
            match exchange(&mut conn, &req, head_only, limit) {
                Ok((resp, keep_alive)) => {
                    if keep_alive {
                        *slot = Some(conn);
                    }
                    return Ok(resp);
                }
                // The idle connection had been closed by the server: try once more, fresh.
                Err(Failure::Stale(_)) if reused => continue,
                Err(Failure::Stale(e)) | Err(Failure::Fatal(e)) => return Err(e),
            }
        }
    }

    /// `GET path`, answer decoded as `T` (see [`RawResponse::into_result`]).
    pub fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, SdkError> {
        self.request("GET", path, None)?.into_result()
    }

    /// `POST path` with `body` as JSON, answer decoded as `T`.
    pub fn post_json<T: DeserializeOwned>(&self, path: &str, body: &impl Serialize) -> Result<T, SdkError> {
        let bytes = to_json(body)?;
        self.request("POST", path, Some(&bytes))?.into_result()
    }

    /// `DELETE path`, answer decoded as `T` (an empty answer is JSON `null`).
    pub fn delete_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, SdkError> {
        self.request("DELETE", path, None)?.into_result()
    }

    // ---- messages ------------------------------------------------------------------------

    /// `POST /v1/messages`: `{id, ts}` once the message is durable.
    pub fn send_message(&self, msg: &SendMessage) -> Result<SentMessage, SdkError> {
        self.post_json("/v1/messages", msg)
    }

    /// `POST /v1/messages/batch`: one result per message, in order.
    pub fn send_batch(&self, messages: &[SendMessage]) -> Result<BatchResults, SdkError> {
        let messages = messages
            .iter()
            .map(serde_json::to_value)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| SdkError::Decode(e.to_string()))?;
        self.post_json("/v1/messages/batch", &SendBatch { messages })
    }

    /// `POST /v1/broadcast`: how many terminals it was pushed to.
    pub fn broadcast(&self, b: &Broadcast) -> Result<BroadcastResult, SdkError> {
        self.post_json("/v1/broadcast", b)
    }

    /// `GET /v1/users/{uid}/messages`: `{messages:[…]}`.
    pub fn history(&self, uid: &str, query: &HistoryQuery) -> Result<Value, SdkError> {
        let path = format!("/v1/users/{}/messages{}", percent_encode(uid), query.to_query_string());
        self.get_json(&path)
    }

    /// `GET /v1/users/{uid}/unread`: `{chats:{chat:count}}`.
    pub fn unread(&self, uid: &str) -> Result<Value, SdkError> {
        self.get_json(&format!("/v1/users/{}/unread", percent_encode(uid)))
    }

    // ---- users -----------------------------------------------------------------------------

    /// `GET /v1/users/{uid}/presence`.
    pub fn presence(&self, uid: &str) -> Result<Presence, SdkError> {
        self.get_json(&format!("/v1/users/{}/presence", percent_encode(uid)))
    }

    /// `POST /v1/users/{uid}/kick`: how many terminals were kicked.
    pub fn kick(&self, uid: &str, kick: Kick) -> Result<Kicked, SdkError> {
        self.post_json(&format!("/v1/users/{}/kick", percent_encode(uid)), &kick)
    }

    /// `POST /v1/tokens`: a terminal JWT minted by the node.
    pub fn token(&self, req: TokenRequest) -> Result<TokenResponse, SdkError> {
        self.post_json("/v1/tokens", &req)
    }

    // ---- groups ----------------------------------------------------------------------------

    /// `POST /v1/groups` `{id?, name, owner, members}`: 201 `{id}`.
    pub fn create_group<S: AsRef<str>>(
        &self,
        id: Option<&str>,
        name: &str,
        owner: &str,
        members: &[S],
    ) -> Result<Value, SdkError> {
        let members: Vec<&str> = members.iter().map(AsRef::as_ref).collect();
        let mut body = json!({"name": name, "owner": owner, "members": members});
        if let Some(id) = id {
            body["id"] = json!(id);
        }
        self.post_json("/v1/groups", &body)
    }

    /// `GET /v1/groups/{gid}`: `{id, name, owner, member_count, seq}`.
    pub fn get_group(&self, gid: &str) -> Result<Value, SdkError> {
        self.get_json(&format!("/v1/groups/{}", percent_encode(gid)))
    }

    /// `DELETE /v1/groups/{gid}`: dissolves the group.
    pub fn dissolve_group(&self, gid: &str) -> Result<Value, SdkError> {
        self.delete_json(&format!("/v1/groups/{}", percent_encode(gid)))
    }

    /// `POST /v1/groups/{gid}/members` `{members}`: `{added}`.
    pub fn add_members<S: AsRef<str>>(&self, gid: &str, members: &[S]) -> Result<Value, SdkError> {
        let members: Vec<&str> = members.iter().map(AsRef::as_ref).collect();
        self.post_json(&format!("/v1/groups/{}/members", percent_encode(gid)), &json!({ "members": members }))
    }

    /// `DELETE /v1/groups/{gid}/members/{uid}`.
    pub fn remove_member(&self, gid: &str, uid: &str) -> Result<Value, SdkError> {
        self.delete_json(&format!("/v1/groups/{}/members/{}", percent_encode(gid), percent_encode(uid)))
    }

    /// `GET /v1/groups/{gid}/members?cursor=&limit=`: `{members, next_cursor}`.
    pub fn list_members(&self, gid: &str, cursor: Option<&str>, limit: Option<u32>) -> Result<Value, SdkError> {
        let mut q = Query::default();
        q.opt("cursor", cursor);
        q.opt("limit", limit);
        self.get_json(&format!("/v1/groups/{}/members{}", percent_encode(gid), q.finish()))
    }

    /// `POST /v1/groups/{gid}/messages` `{from, kind, body, cid?}`: `{id, seq, ts}`.
    pub fn send_group_message(
        &self,
        gid: &str,
        from: &str,
        kind: Kind,
        body: &Value,
        cid: Option<&str>,
    ) -> Result<Value, SdkError> {
        let mut req = json!({"from": from, "kind": kind, "body": body});
        if let Some(cid) = cid {
            req["cid"] = json!(cid);
        }
        self.post_json(&format!("/v1/groups/{}/messages", percent_encode(gid)), &req)
    }

    /// `GET /v1/groups/{gid}/messages?before_seq=&after_seq=&limit=`: `{messages}`.
    pub fn group_history(&self, gid: &str, query: &HistoryQuery) -> Result<Value, SdkError> {
        self.get_json(&format!("/v1/groups/{}/messages{}", percent_encode(gid), query.to_query_string()))
    }

    /// `GET /v1/groups/{gid}/messages/{id}/reads`: `{read, members}`.
    pub fn group_reads(&self, gid: &str, msg_id: &str) -> Result<Value, SdkError> {
        self.get_json(&format!("/v1/groups/{}/messages/{}/reads", percent_encode(gid), percent_encode(msg_id)))
    }

    // ---- plumbing --------------------------------------------------------------------------

    fn connect(&self, target: &Target, deadline: Option<Instant>) -> Result<BufReader<TimedConn>, SdkError> {
        let mut last = None;
        let lookup_timeout = match deadline {
            Some(d) => match d.checked_duration_since(Instant::now()).filter(|left| !left.is_zero()) {
                Some(left) => left.min(self.connect_timeout),
                None => return Err(SdkError::Io(deadline_passed())),
            },
            None => self.connect_timeout,
        };
        let addrs = resolve(&target.connect, lookup_timeout, |name| Ok(name.to_socket_addrs()?.collect()))?;
        for addr in addrs {
            let connect_timeout = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()).filter(|left| !left.is_zero()) {
                    Some(left) => left.min(self.connect_timeout),
                    None => return Err(SdkError::Io(deadline_passed())),
                },
                None => self.connect_timeout,
            };
            match TcpStream::connect_timeout(&addr, connect_timeout) {
                Ok(stream) => {
                    stream.set_nodelay(true)?;
                    stream.set_read_timeout(Some(self.io_timeout))?;
                    stream.set_write_timeout(Some(self.io_timeout))?;
                    self.connects.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let conn = match &target.tls_name {
                        None => Conn::Plain(stream),
                        Some(name) => {
                            let config = self.tls.clone().unwrap_or_else(crate::tls::default_tls_config);
                            let session = crate::tls::client_session(config, name)?;
                            Conn::Tls(Box::new(rustls::StreamOwned::new(session, stream)))
                        }
                    };
                    return Ok(BufReader::new(TimedConn { conn, deadline, io_timeout: self.io_timeout }));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(SdkError::Io(last.unwrap_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, format!("{}: no address", target.connect))
        })))
    }

    fn encode(
        &self,
        target: &Target,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Vec<u8> {
        let has = |name: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(name));
        let slash = if path.starts_with('/') { "" } else { "/" };
        let mut head = format!(
            "{method} {}{slash}{path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: ether-sdk/{}\r\nAccept: application/json\r\n",
            target.prefix,
            target.host,
            env!("CARGO_PKG_VERSION"),
        );
        if !self.api_key.is_empty() && !has("authorization") {
            head.push_str(&format!("Authorization: Bearer {}\r\n", self.api_key));
        }
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        let bodiless = method.eq_ignore_ascii_case("GET") || method.eq_ignore_ascii_case("HEAD");
        match body {
            Some(b) => {
                if !has("content-type") {
                    head.push_str("Content-Type: application/json\r\n");
                }
                if !has("content-length") {
                    head.push_str(&format!("Content-Length: {}\r\n", b.len()));
                }
            }
            None if !bodiless && !has("content-length") => head.push_str("Content-Length: 0\r\n"),
            None => {}
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(body.unwrap_or_default());
        out
    }
}

fn to_json(body: &impl Serialize) -> Result<Vec<u8>, SdkError> {
    serde_json::to_vec(body).map_err(|e| SdkError::Decode(format!("encoding request: {e}")))
}

fn is_disconnect(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof | NotConnected)
}

/// Writes `req` and reads one answer. Returns the answer and whether the connection may be
/// reused.
fn exchange(
    conn: &mut BufReader<TimedConn>,
    req: &[u8],
    head_only: bool,
    limit: BodyLimit,
) -> Result<(RawResponse, bool), Failure> {
    let written = {
        let stream = conn.get_mut();
        stream.write_all(req).and_then(|()| stream.flush())
    };
    if let Err(e) = written {
        return Err(if is_disconnect(&e) { Failure::Stale(e.into()) } else { Failure::Fatal(e.into()) });
    }
    read_response(conn, head_only, limit)
}

/// Reads one response head into `buf`; `Ok(false)` when the connection ended before any byte.
fn read_head(conn: &mut impl BufRead, buf: &mut Vec<u8>) -> Result<bool, Failure> {
    buf.clear();
    loop {
        let before = buf.len();
        // Bounded even within a line: a peer sending no newline cannot grow it past the limit.
        let room = (MAX_HEAD_BYTES + 1).saturating_sub(before) as u64;
        let n = match std::io::Read::take(&mut *conn, room).read_until(b'\n', buf) {
            Ok(n) => n,
            Err(e) if before == 0 && is_disconnect(&e) => return Err(Failure::Stale(e.into())),
            Err(e) => return Err(Failure::Fatal(e.into())),
        };
        if n == 0 {
            return if before == 0 {
                Ok(false)
            } else {
                Err(Failure::Fatal(SdkError::Protocol("connection closed inside a response head".into())))
            };
        }
        if buf == b"\r\n" || buf == b"\n" {
            // A stray empty line before a status line is skipped.
            buf.clear();
            continue;
        }
        if buf.ends_with(b"\r\n\r\n") || buf.ends_with(b"\n\n") {
            return Ok(true);
        }
        if buf.len() > MAX_HEAD_BYTES {
            return Err(Failure::Fatal(SdkError::Protocol(format!(
                "response head longer than {MAX_HEAD_BYTES} bytes"
            ))));
        }
    }
}

fn protocol(msg: impl Into<String>) -> Failure {
    Failure::Fatal(SdkError::Protocol(msg.into()))
}

fn read_response(
    conn: &mut BufReader<TimedConn>,
    head_only: bool,
    limit: BodyLimit,
) -> Result<(RawResponse, bool), Failure> {
    let max_body = limit.max;
    let mut head = Vec::with_capacity(512);
    loop {
        if !read_head(conn, &mut head)? {
            return Err(Failure::Stale(SdkError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed before an answer",
            ))));
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut headers);
        match parsed.parse(&head) {
            Ok(httparse::Status::Complete(_)) => {}
            Ok(httparse::Status::Partial) => return Err(protocol("incomplete response head")),
            Err(e) => return Err(protocol(format!("bad response head: {e}"))),
        }
        let status = parsed.code.unwrap_or(0);
        let version = parsed.version.unwrap_or(1);
        let headers: Vec<(String, String)> = parsed
            .headers
            .iter()
            .map(|h| (h.name.to_owned(), String::from_utf8_lossy(h.value).trim().to_owned()))
            .collect();
        // Interim answers (100 Continue, 103 Early Hints): the real one follows.
        if (100..200).contains(&status) && status != 101 {
            continue;
        }
        let mut resp = RawResponse { status, headers, body: Vec::new() };
        let connection = resp.header("connection").unwrap_or("").to_ascii_lowercase();
        let mut keep_alive =
            if version == 0 { connection.contains("keep-alive") } else { !connection.contains("close") };
        let chunked = resp.header("transfer-encoding").is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
        // A body over the limit: the call fails, or the answer counts by its status alone
        // (the connection, its body unread, is not reused).
        let over = |mut resp: RawResponse| {
            if limit.discard_over {
                resp.body = Vec::new();
                Ok((resp, false))
            } else {
                Err(too_big(max_body))
            }
        };
        if head_only || status == 204 || status == 304 {
            // No body.
        } else if chunked {
            match read_chunked(conn, max_body)? {
                Some(body) => resp.body = body,
                None => return over(resp),
            }
        } else if let Some(len) = resp.header("content-length") {
            let len: usize = len.parse().map_err(|_| protocol(format!("bad Content-Length {len:?}")))?;
            if len > max_body {
                return over(resp);
            }
            resp.body = vec![0; len];
            conn.read_exact(&mut resp.body).map_err(|e| Failure::Fatal(e.into()))?;
        } else {
            std::io::Read::take(&mut *conn, max_body as u64 + 1)
                .read_to_end(&mut resp.body)
                .map_err(|e| Failure::Fatal(e.into()))?;
            if resp.body.len() > max_body {
                return over(resp);
            }
            keep_alive = false;
        }
        return Ok((resp, keep_alive));
    }
}

fn too_big(max: usize) -> Failure {
    protocol(format!("answer body larger than {max} bytes (GatewayClient::with_max_body_bytes)"))
}

fn read_line(conn: &mut impl BufRead) -> Result<String, Failure> {
    let mut line = Vec::new();
    let n = std::io::Read::take(&mut *conn, MAX_CHUNK_LINE_BYTES as u64)
        .read_until(b'\n', &mut line)
        .map_err(|e| Failure::Fatal(e.into()))?;
    if n == 0 {
        return Err(protocol("connection closed inside a chunked body"));
    }
    if !line.ends_with(b"\n") {
        return Err(protocol(format!("chunked body line longer than {MAX_CHUNK_LINE_BYTES} bytes")));
    }
    Ok(String::from_utf8_lossy(&line).trim().to_owned())
}

/// Reads a chunked body; `None` as soon as it grows past `max_body` (the rest unread).
fn read_chunked(conn: &mut impl BufRead, max_body: usize) -> Result<Option<Vec<u8>>, Failure> {
    let mut body = Vec::new();
    loop {
        let line = read_line(conn)?;
        let size = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size, 16).map_err(|_| protocol(format!("bad chunk size {line:?}")))?;
        if size == 0 {
            // Trailers, up to the empty line.
            while !read_line(conn)?.is_empty() {}
            return Ok(Some(body));
        }
        let start = body.len();
        if size > max_body.saturating_sub(start) {
            return Ok(None);
        }
        body.resize(start + size, 0);
        conn.read_exact(&mut body[start..]).map_err(|e| Failure::Fatal(e.into()))?;
        if !read_line(conn)?.is_empty() {
            return Err(protocol("chunk not followed by CRLF"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lookup that hangs (a resolver that does not answer) fails the connect after the
    /// timeout with a timed-out error, instead of holding the caller for the resolver's own
    /// retries; a literal address is never looked up; a quick lookup's answer is used.
    #[test]
    fn a_host_name_lookup_is_bounded() {
        let started = Instant::now();
        let slow = |_: String| -> std::io::Result<Vec<SocketAddr>> {
            std::thread::sleep(Duration::from_secs(30));
            Ok(Vec::new())
        };
        let e = resolve("hook.example:80", Duration::from_millis(100), slow).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
        assert!(e.to_string().contains("hook.example:80"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(20), "the lookup was waited for: {:?}", started.elapsed());

        let never = |_: String| -> std::io::Result<Vec<SocketAddr>> { panic!("a literal address is not looked up") };
        assert_eq!(resolve("127.0.0.1:9", Duration::from_millis(1), never).unwrap(), ["127.0.0.1:9".parse().unwrap()]);
        assert_eq!(resolve("[::1]:9", Duration::from_millis(1), never).unwrap(), ["[::1]:9".parse().unwrap()]);

        let quick = |name: String| -> std::io::Result<Vec<SocketAddr>> {
            assert_eq!(name, "gw.local:81");
            Ok(vec!["10.0.0.1:81".parse().unwrap()])
        };
        assert_eq!(resolve("gw.local:81", Duration::from_secs(10), quick).unwrap(), ["10.0.0.1:81".parse().unwrap()]);
        let failing = |_: String| -> std::io::Result<Vec<SocketAddr>> { Err(std::io::Error::other("no such host")) };
        assert_eq!(resolve("nx.local:1", Duration::from_secs(10), failing).unwrap_err().to_string(), "no such host");
    }

    #[test]
    fn base_urls() {
        let t = parse_base("127.0.0.1:9001").unwrap();
        assert_eq!((t.connect.as_str(), t.host.as_str(), t.prefix.as_str()), ("127.0.0.1:9001", "127.0.0.1:9001", ""));
        let t = parse_base("http://localhost:9001/").unwrap();
        assert_eq!((t.connect.as_str(), t.prefix.as_str()), ("localhost:9001", ""));
        let t = parse_base("HTTP://gw.local/ether/").unwrap();
        assert_eq!((t.connect.as_str(), t.host.as_str(), t.prefix.as_str()), ("gw.local:80", "gw.local", "/ether"));
        let t = parse_base("http://[::1]:9001").unwrap();
        assert_eq!(t.connect, "[::1]:9001");
        let t = parse_base("[::1]").unwrap();
        assert_eq!(t.connect, "[::1]:80");
        let t = parse_base("https://hooks.example.com/ether").unwrap();
        assert_eq!((t.connect.as_str(), t.tls_name.as_deref()), ("hooks.example.com:443", Some("hooks.example.com")));
        assert_eq!(t.prefix, "/ether");
        let t = parse_base("HTTPS://[::1]:8443").unwrap();
        assert_eq!((t.connect.as_str(), t.tls_name.as_deref()), ("[::1]:8443", Some("::1")));
        assert_eq!(parse_base("http://x:1").unwrap().tls_name, None);
        assert!(parse_base("ftp://x:1").is_err());
        assert!(parse_base("http:///x").is_err());
    }

    #[test]
    fn encoding() {
        assert_eq!(percent_encode("u:bob@x.y_z-~"), "u:bob@x.y_z-~");
        assert_eq!(percent_encode("a b/c?d&e=é"), "a%20b%2Fc%3Fd%26e%3D%C3%A9");
        assert_eq!(HistoryQuery::default().to_query_string(), "");
        assert_eq!(
            HistoryQuery::default().chat("u:bob").after_seq(3).limit(10).to_query_string(),
            "?chat=u:bob&after_seq=3&limit=10"
        );
    }

    #[test]
    fn chunked_bodies() {
        let mut r: &[u8] = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\nX-T: 1\r\n\r\nrest";
        assert_eq!(read_chunked(&mut r, 1024).ok().flatten().unwrap(), b"Wikipedia");
        assert_eq!(r, b"rest");
        let mut bad: &[u8] = b"zz\r\n";
        assert!(read_chunked(&mut bad, 1024).is_err());
        let mut over: &[u8] = b"4\r\nWiki\r\n5\r\npedia\r\n0\r\n\r\n";
        assert!(matches!(read_chunked(&mut over, 8), Ok(None)), "9 bytes over a bound of 8");
    }

    #[test]
    fn error_envelopes() {
        let resp = RawResponse {
            status: 404,
            headers: vec![],
            body: br#"{"error":{"code":"not_found","message":"no such group"}}"#.to_vec(),
        };
        match resp.into_result::<Value>() {
            Err(SdkError::Api { status, error }) => {
                assert_eq!(status, 404);
                assert_eq!(error.code, ether_proto::ErrorCode::NotFound);
                assert_eq!(error.message, "no such group");
            }
            other => panic!("{other:?}"),
        }
        let resp = RawResponse { status: 502, headers: vec![], body: b"bad gateway".to_vec() };
        assert!(matches!(
            resp.into_result::<Value>(),
            Err(SdkError::Http(502, ref b)) if b == "bad gateway"
        ));
        let ok = RawResponse { status: 204, headers: vec![], body: vec![] };
        assert_eq!(ok.into_result::<Value>().unwrap(), Value::Null);
    }
}
