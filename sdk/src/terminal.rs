//! [`TerminalClient`]: a blocking terminal of the WebSocket protocol (API.md section 2).
//!
//! One `TerminalClient` is one WebSocket over a [`std::net::TcpStream`], driven by tungstenite
//! with its default limits. Nothing runs in the background: frames are read when
//! [`TerminalClient::recv`] (or a `recv_*` helper) is called, and WebSocket pings that arrive
//! meanwhile are answered from inside those calls. A terminal that must stay alive without
//! reading (heartbeat) should call `recv` with a short timeout in its loop, or send
//! [`TerminalClient::ping`].
//!
//! Timeouts are per call: `recv(timeout)` returns `Ok(None)` when nothing arrived in time and
//! the connection stays usable (a partially received frame is kept by tungstenite and completed
//! on the next call).
use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ether_proto::frame::Msg;
use ether_proto::pb::SUBPROTOCOL_PROTO;
use ether_proto::{ClientFrame, Kind, ServerFrame};
use serde_json::{json, Value};
use tungstenite::handshake::HandshakeError;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::{ClientRequestBuilder, Message, WebSocket};

use crate::error::SdkError;
use crate::gateway::percent_encode;

/// The client port's default WebSocket base URL.
pub const DEFAULT_WS_URL: &str = "ws://127.0.0.1:9000";

/// Default time allowed for connect + upgrade + `welcome`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time allowed for one socket write.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// The content of the `welcome` frame: who the server thinks this terminal is, and the head of
/// the user's inbox and of each of their groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    pub user: String,
    pub device: String,
    pub session: String,
    pub heartbeat_s: u64,
    pub inbox_seq: u64,
    pub groups: BTreeMap<String, u64>,
    /// What this device last acknowledged, when the node says (resume `sync` from there).
    pub delivered: Option<ether_proto::frame::Positions>,
}

impl TryFrom<ServerFrame> for Welcome {
    type Error = ServerFrame;

    /// The welcome's fields, or the frame back when it is not a `welcome`.
    fn try_from(frame: ServerFrame) -> Result<Self, ServerFrame> {
        match frame {
            ServerFrame::Welcome { user, device, session, heartbeat_s, inbox_seq, groups, delivered } => {
                Ok(Welcome { user, device, session, heartbeat_s, inbox_seq, groups, delivered })
            }
            other => Err(other),
        }
    }
}

/// How to connect; see [`TerminalClient::connect_with`].
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// The JWT; `None` sends no token at all (to test the 401 path).
    pub token: Option<String>,
    /// `device` query parameter (left out when `None`).
    pub device: Option<String>,
    /// `platform` query parameter (left out when `None`).
    pub platform: Option<String>,
    /// Send the token as `Authorization: Bearer` instead of `?token=`.
    pub token_in_header: bool,
    /// `Sec-WebSocket-Protocol` to ask for (e.g. `ether.v1.json`); none by default, which the
    /// server answers with the JSON protocol.
    pub subprotocol: Option<String>,
    /// Extra headers of the upgrade request.
    pub headers: Vec<(String, String)>,
    /// Time allowed for TCP connect, TLS handshake, upgrade and (for
    /// [`TerminalClient::connect_with`]) the `welcome` frame.
    pub timeout: Duration,
    /// TLS settings for `wss://` URLs; `None` trusts the Mozilla root certificates
    /// (`webpki-roots`). See [`crate::tls_config_with_roots`] for a private CA or a
    /// self-signed node.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl ConnectOptions {
    /// Token in the query, the given device and platform, no subprotocol, 10 s timeout.
    pub fn new(token: &str, device: &str, platform: &str) -> Self {
        ConnectOptions {
            token: Some(token.to_owned()),
            device: Some(device.to_owned()),
            platform: Some(platform.to_owned()),
            token_in_header: false,
            subprotocol: None,
            headers: Vec::new(),
            timeout: DEFAULT_CONNECT_TIMEOUT,
            tls: None,
        }
    }

    pub fn token_in_header(mut self) -> Self {
        self.token_in_header = true;
        self
    }

    /// Asks for a subprotocol: `ether.v1.json` (the default) or `ether.v1.proto` (binary
    /// frames, which this client then speaks), or several, comma-separated, in the order of
    /// preference.
    pub fn subprotocol(mut self, protocol: &str) -> Self {
        self.subprotocol = Some(protocol.to_owned());
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// TLS settings for `wss://` (see [`ConnectOptions::tls`]).
    pub fn tls(mut self, config: Arc<rustls::ClientConfig>) -> Self {
        self.tls = Some(config);
        self
    }
}

/// Where to connect: the full `ws[s]://host:port/ws?...` URL, the `host:port` to connect to,
/// and for `wss://` the host name the certificate must be for.
struct Target {
    url: String,
    connect: String,
    tls_name: Option<String>,
}

/// Builds the [`Target`] of `base` (`ws://` or `wss://`; no scheme means `ws://`).
fn build_url(base: &str, opts: &ConnectOptions) -> Result<Target, SdkError> {
    let base = base.trim();
    let (tls, rest) = match base.find("://") {
        Some(i) if base[..i].eq_ignore_ascii_case("ws") => (false, &base[i + 3..]),
        Some(i) if base[..i].eq_ignore_ascii_case("wss") => (true, &base[i + 3..]),
        Some(_) => return Err(SdkError::InvalidUrl(format!("{base:?}: only ws:// and wss:// are supported"))),
        None => (false, base),
    };
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if authority.is_empty() {
        return Err(SdkError::InvalidUrl(format!("{base:?}: no host")));
    }
    let has_port = authority.rfind(':').is_some_and(|i| !authority[i..].contains(']'));
    let default_port = if tls { 443 } else { 80 };
    let connect = if has_port { authority.to_owned() } else { format!("{authority}:{default_port}") };
    let host = if has_port { &authority[..authority.rfind(':').unwrap_or(authority.len())] } else { authority };
    let tls_name = tls.then(|| host.trim_start_matches('[').trim_end_matches(']').to_owned());
    let (path, query) = match path.split_once('?') {
        Some((p, q)) => (p, q),
        None => (path, ""),
    };
    let path = if path.is_empty() || path == "/" { "/ws" } else { path };
    let mut params: Vec<String> = Vec::new();
    if !query.is_empty() {
        params.push(query.to_owned());
    }
    if let (Some(token), false) = (&opts.token, opts.token_in_header) {
        params.push(format!("token={}", percent_encode(token)));
    }
    if let Some(device) = &opts.device {
        params.push(format!("device={}", percent_encode(device)));
    }
    if let Some(platform) = &opts.platform {
        params.push(format!("platform={}", percent_encode(platform)));
    }
    let scheme = if tls { "wss" } else { "ws" };
    let mut url = format!("{scheme}://{authority}{path}");
    if !params.is_empty() {
        url.push('?');
        url.push_str(&params.join("&"));
    }
    Ok(Target { url, connect, tls_name })
}

fn tcp_connect(addr: &str, timeout: Duration) -> Result<TcpStream, SdkError> {
    let mut last = None;
    for a in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(SdkError::Io(last.unwrap_or_else(|| std::io::Error::new(ErrorKind::NotFound, format!("{addr}: no address")))))
}

/// The frame types of the protocol this SDK knows (the `type` of each [`ServerFrame`]).
const KNOWN_TYPES: [&str; 10] =
    ["welcome", "msg", "sent", "synced", "receipt", "read_sync", "pong", "error", "kicked", "reconnect"];

/// What [`TerminalClient::recv`] made of one data message.
enum Decoded {
    Frame(ServerFrame),
    /// A frame of a later version: a JSON object whose `type` is not one of [`KNOWN_TYPES`], or
    /// on `ether.v1.proto` a `ServerFrame` holding none of the oneof fields this version knows.
    Unknown,
}

/// Whether `text` is a JSON object with a string `type` this SDK does not know.
fn is_unknown_type(text: &str) -> bool {
    #[derive(serde::Deserialize)]
    struct Typed<'a> {
        #[serde(rename = "type", borrow)]
        kind: std::borrow::Cow<'a, str>,
    }
    serde_json::from_str::<Typed<'_>>(text).is_ok_and(|t| !KNOWN_TYPES.contains(&t.kind.as_ref()))
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

fn is_disconnect(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe
            | ErrorKind::UnexpectedEof
            | ErrorKind::NotConnected
    )
}

/// The socket under a [`TerminalClient`]: a [`TcpStream`] whose reads honour the deadline of
/// the current `recv` call, so a frame that trickles in byte by byte cannot stretch a timeout
/// (each read syscall waits only for what is left; past the deadline a read is `WouldBlock`,
/// and tungstenite keeps the partial frame for the next call).
#[derive(Debug)]
pub struct Stream {
    tcp: TcpStream,
    deadline: Option<Instant>,
    /// The TLS session of a `wss://` connection.
    tls: Option<Box<rustls::ClientConnection>>,
}

impl Stream {
    /// The TCP stream.
    pub fn get_ref(&self) -> &TcpStream {
        &self.tcp
    }

    /// The TCP stream, to write raw bytes (on a `wss://` connection these bypass TLS: only
    /// for tests of what a broken peer does).
    pub fn get_mut(&mut self) -> &mut TcpStream {
        &mut self.tcp
    }

    /// Whether this connection runs over TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Some(deadline) = self.deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ErrorKind::WouldBlock.into());
            }
            self.tcp.set_read_timeout(Some(left))?;
        }
        // A signal (e.g. Ctrl-C caught by a handler) interrupts the syscall: just go on.
        loop {
            let read = match self.tls.as_deref_mut() {
                Some(tls) => rustls::Stream::new(tls, &mut self.tcp).read(buf),
                None => self.tcp.read(buf),
            };
            match read {
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        loop {
            let written = match self.tls.as_deref_mut() {
                Some(tls) => rustls::Stream::new(tls, &mut self.tcp).write(buf),
                None => self.tcp.write(buf),
            };
            match written {
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self.tls.as_deref_mut() {
            Some(tls) => rustls::Stream::new(tls, &mut self.tcp).flush(),
            None => self.tcp.flush(),
        }
    }
}

/// A connected terminal.
#[derive(Debug)]
pub struct TerminalClient {
    ws: WebSocket<Stream>,
    welcome: Option<Welcome>,
    subprotocol: Option<String>,
    /// Set once the connection is known closed: the close code and reason.
    closed: Option<(Option<u16>, String)>,
}

impl TerminalClient {
    /// Connects to `url` (`ws://127.0.0.1:9000`; the path defaults to `/ws`) as
    /// `/ws?token=..&device=..&platform=..` and waits for the `welcome` frame.
    ///
    /// A refused upgrade (bad or expired token: 401) is [`SdkError::Rejected`] with the status.
    pub fn connect(
        url: &str,
        token: &str,
        device: &str,
        platform: &str,
    ) -> Result<(TerminalClient, Welcome), SdkError> {
        Self::connect_with(url, &ConnectOptions::new(token, device, platform))
    }

    /// Like [`TerminalClient::connect`], the token sent as `Authorization: Bearer` instead of
    /// in the query.
    pub fn connect_with_header_token(
        url: &str,
        token: &str,
        device: &str,
        platform: &str,
    ) -> Result<(TerminalClient, Welcome), SdkError> {
        Self::connect_with(url, &ConnectOptions::new(token, device, platform).token_in_header())
    }

    /// Connects with `opts` and waits for the `welcome` frame, which must come first.
    pub fn connect_with(url: &str, opts: &ConnectOptions) -> Result<(TerminalClient, Welcome), SdkError> {
        let started = Instant::now();
        let mut client = Self::connect_raw(url, opts)?;
        let left = opts.timeout.saturating_sub(started.elapsed());
        match client.recv(left)? {
            Some(frame) => match Welcome::try_from(frame) {
                Ok(w) => {
                    client.welcome = Some(w.clone());
                    Ok((client, w))
                }
                Err(other) => {
                    Err(SdkError::Protocol(format!("expected `welcome` as the first frame, got {}", other.to_json())))
                }
            },
            None => Err(SdkError::Timeout(format!("no `welcome` frame within {:?}", opts.timeout))),
        }
    }

    /// Connects and upgrades, without waiting for `welcome` (for tests of the upgrade itself).
    pub fn connect_raw(url: &str, opts: &ConnectOptions) -> Result<TerminalClient, SdkError> {
        let Target { url, connect: addr, tls_name } = build_url(url, opts)?;
        let uri: tungstenite::http::Uri = url.parse().map_err(|e| SdkError::InvalidUrl(format!("{url:?}: {e}")))?;
        let mut req = ClientRequestBuilder::new(uri);
        if let (Some(token), true) = (&opts.token, opts.token_in_header) {
            req = req.with_header("Authorization", format!("Bearer {token}"));
        }
        for (k, v) in &opts.headers {
            req = req.with_header(k.clone(), v.clone());
        }
        if let Some(list) = &opts.subprotocol {
            for p in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                req = req.with_sub_protocol(p);
            }
        }
        let tcp = tcp_connect(&addr, opts.timeout)?;
        tcp.set_nodelay(true)?;
        tcp.set_write_timeout(Some(DEFAULT_WRITE_TIMEOUT))?;
        let tls = match tls_name {
            None => None,
            Some(name) => {
                let config = opts.tls.clone().unwrap_or_else(crate::tls::default_tls_config);
                Some(Box::new(crate::tls::client_session(config, &name)?))
            }
        };
        let stream = Stream { tcp, deadline: Some(Instant::now() + opts.timeout), tls };
        let (ws, resp) = match tungstenite::client::client_with_config(req, stream, None) {
            Ok(ok) => ok,
            Err(HandshakeError::Failure(e)) => return Err(e.into()),
            Err(HandshakeError::Interrupted(_)) => {
                return Err(SdkError::Timeout(format!("websocket upgrade not answered within {:?}", opts.timeout)))
            }
        };
        let subprotocol = resp.headers().get("sec-websocket-protocol").and_then(|v| v.to_str().ok()).map(str::to_owned);
        Ok(TerminalClient { ws, welcome: None, subprotocol, closed: None })
    }

    /// The `welcome` received on connect (`None` after [`TerminalClient::connect_raw`]).
    pub fn welcome(&self) -> Option<&Welcome> {
        self.welcome.as_ref()
    }

    /// The subprotocol the server chose, if any.
    pub fn subprotocol(&self) -> Option<&str> {
        self.subprotocol.as_deref()
    }

    /// This end's socket address.
    pub fn local_addr(&self) -> Result<SocketAddr, SdkError> {
        Ok(self.ws.get_ref().tcp.local_addr()?)
    }

    /// The tungstenite socket, for what this client does not wrap.
    pub fn socket_mut(&mut self) -> &mut WebSocket<Stream> {
        &mut self.ws
    }

    /// Whether the connection is known to be closed.
    pub fn is_closed(&self) -> bool {
        self.closed.is_some()
    }

    fn closed_error(&self) -> Option<SdkError> {
        self.closed.as_ref().map(|(code, reason)| SdkError::Closed { code: *code, reason: reason.clone() })
    }

    fn mark_closed(&mut self, code: Option<u16>, reason: String) -> SdkError {
        if self.closed.is_none() {
            self.closed = Some((code, reason));
        }
        self.closed_error().unwrap_or_else(|| SdkError::Protocol("closed".into()))
    }

    /// Maps a tungstenite error, recording the end of the connection.
    fn fail(&mut self, e: tungstenite::Error) -> SdkError {
        use tungstenite::error::ProtocolError;
        match e {
            tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
                self.mark_closed(None, "connection closed".into())
            }
            tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
                self.mark_closed(None, "connection reset without closing handshake".into())
            }
            tungstenite::Error::Io(io) if is_disconnect(&io) => {
                self.mark_closed(None, format!("connection lost: {io}"))
            }
            other => other.into(),
        }
    }

    // ---- receiving -------------------------------------------------------------------------

    /// The next data message (text or binary) within `timeout`, `Ok(None)` if none came.
    /// Pings are answered and pongs skipped on the way. A close from the server is
    /// [`SdkError::Closed`] with its code and reason, now and on every later call.
    pub fn recv_message(&mut self, timeout: Duration) -> Result<Option<Message>, SdkError> {
        if let Some(e) = self.closed_error() {
            return Err(e);
        }
        // A zero timeout still gets one look at what already arrived.
        let deadline = Instant::now() + timeout.max(Duration::from_millis(1));
        self.ws.get_mut().deadline = Some(deadline);
        loop {
            match self.ws.read() {
                Ok(m @ (Message::Text(_) | Message::Binary(_))) => return Ok(Some(m)),
                Ok(Message::Ping(_)) => {
                    // tungstenite queued the pong; send it now rather than on the next call.
                    match self.ws.flush() {
                        Ok(()) => {}
                        Err(tungstenite::Error::Io(e)) if is_timeout(&e) => {}
                        Err(e) => return Err(self.fail(e)),
                    }
                }
                Ok(Message::Pong(_) | Message::Frame(_)) => {}
                Ok(Message::Close(frame)) => {
                    // tungstenite queued the close reply; send it, then report.
                    let _ = self.ws.flush();
                    let (code, reason) = match frame {
                        Some(f) => (Some(u16::from(f.code)), f.reason.to_string()),
                        None => (None, String::new()),
                    };
                    return Err(self.mark_closed(code, reason));
                }
                Err(tungstenite::Error::Io(e)) if is_timeout(&e) => {
                    if Instant::now() >= deadline {
                        return Ok(None);
                    }
                }
                Err(e) => return Err(self.fail(e)),
            }
        }
    }

    /// Whether the server chose the binary subprotocol (`ether.v1.proto`): frames both ways
    /// are then Protocol Buffers in binary frames.
    pub fn is_proto(&self) -> bool {
        self.subprotocol.as_deref() == Some(SUBPROTOCOL_PROTO)
    }

    /// The next server frame within `timeout`, `Ok(None)` if none came: a JSON text frame, or
    /// on `ether.v1.proto` a binary one. A frame of a type this version does not know (a node
    /// of a later version may send new frame types) is skipped: in JSON an unknown `type` (see
    /// [`TerminalClient::recv_value`] to see those), in binary a `ServerFrame` whose `frame`
    /// oneof holds a field number this version does not know. A frame of a known type that
    /// does not decode, or one that is no frame at all, is [`SdkError::Decode`].
    pub fn recv(&mut self, timeout: Duration) -> Result<Option<ServerFrame>, SdkError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv_one(left)? {
                Some(Decoded::Frame(f)) => return Ok(Some(f)),
                Some(Decoded::Unknown) if Instant::now() < deadline => {}
                Some(Decoded::Unknown) | None => return Ok(None),
            }
        }
    }

    /// One data message as a [`ServerFrame`], or [`Decoded::Unknown`] for a frame (JSON or
    /// binary) of a type this version does not know.
    fn recv_one(&mut self, timeout: Duration) -> Result<Option<Decoded>, SdkError> {
        match self.recv_message(timeout)? {
            None => Ok(None),
            Some(Message::Text(t)) => match serde_json::from_str(t.as_str()) {
                Ok(f) => Ok(Some(Decoded::Frame(f))),
                Err(_) if is_unknown_type(t.as_str()) => Ok(Some(Decoded::Unknown)),
                Err(e) => Err(SdkError::Decode(format!("{e} in server frame {}", t.as_str()))),
            },
            Some(Message::Binary(b)) if self.is_proto() => match ether_proto::pb::decode_server(&b) {
                Ok(f) => Ok(Some(Decoded::Frame(f))),
                Err(_) if ether_proto::pb::is_unknown_server_frame(&b) => Ok(Some(Decoded::Unknown)),
                Err(e) => Err(SdkError::Decode(format!("{e} in a binary server frame of {} bytes", b.len()))),
            },
            Some(other) => Err(SdkError::Decode(format!(
                "a binary frame of {} bytes on a JSON connection (ask for `ether.v1.proto` to get those)",
                other.len()
            ))),
        }
    }

    /// The next frame as JSON, without asking for a known shape (on `ether.v1.proto`, the
    /// binary frame decoded, as its JSON twin; a binary frame of a type this version does not
    /// know has no JSON twin: [`SdkError::Decode`], and the connection stays usable).
    pub fn recv_value(&mut self, timeout: Duration) -> Result<Option<Value>, SdkError> {
        match self.recv_message(timeout)? {
            None => Ok(None),
            Some(Message::Text(t)) => serde_json::from_str(t.as_str())
                .map(Some)
                .map_err(|e| SdkError::Decode(format!("{e} in server frame {}", t.as_str()))),
            Some(Message::Binary(b)) if self.is_proto() => match ether_proto::pb::decode_server(&b) {
                Ok(f) => Ok(serde_json::to_value(f).ok()),
                Err(_) if ether_proto::pb::is_unknown_server_frame(&b) => Err(SdkError::Decode(format!(
                    "a binary server frame of {} bytes of a type this version does not know",
                    b.len()
                ))),
                Err(e) => Err(SdkError::Decode(format!("{e} in a binary server frame of {} bytes", b.len()))),
            },
            Some(other) => {
                Err(SdkError::Decode(format!("a binary frame of {} bytes where JSON was expected", other.len())))
            }
        }
    }

    /// Receives until a frame satisfies `pred` and returns it; frames that do not are
    /// dropped. [`SdkError::Timeout`] (naming the dropped frame types) if none does within
    /// `timeout` overall.
    pub fn recv_until(
        &mut self,
        mut pred: impl FnMut(&ServerFrame) -> bool,
        timeout: Duration,
    ) -> Result<ServerFrame, SdkError> {
        let deadline = Instant::now() + timeout;
        let mut skipped: Vec<String> = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left)? {
                Some(f) if pred(&f) => return Ok(f),
                Some(f) => {
                    if skipped.len() < 20 {
                        skipped.push(f.to_json());
                    }
                }
                None => {
                    return Err(SdkError::Timeout(format!(
                        "no matching frame within {timeout:?}; skipped: [{}]",
                        skipped.join(", ")
                    )))
                }
            }
        }
    }

    /// The next `msg` frame within `timeout` (other frames are dropped).
    pub fn recv_msg(&mut self, timeout: Duration) -> Result<Msg, SdkError> {
        match self.recv_until(|f| matches!(f, ServerFrame::Msg(_)), timeout)? {
            ServerFrame::Msg(m) => Ok(m),
            other => Err(SdkError::Protocol(format!("unexpected frame {}", other.to_json()))),
        }
    }

    /// Every frame that arrives until none has for `quiet` (e.g. to assert nothing more
    /// comes, or to flush resends).
    pub fn drain(&mut self, quiet: Duration) -> Result<Vec<ServerFrame>, SdkError> {
        let mut out = Vec::new();
        while let Some(f) = self.recv(quiet)? {
            out.push(f);
        }
        Ok(out)
    }

    // ---- sending ---------------------------------------------------------------------------

    /// Sends any message as is, e.g. malformed JSON or a binary frame, for tests of bad input.
    pub fn raw_send(&mut self, msg: Message) -> Result<(), SdkError> {
        if let Some(e) = self.closed_error() {
            return Err(e);
        }
        match self.ws.send(msg) {
            Ok(()) => Ok(()),
            // The peer is gone, but its close frame (with the code the caller wants to see)
            // may still wait in the receive buffer: report the loss without recording it, so
            // that the next `recv` reads that close frame.
            Err(tungstenite::Error::Io(io)) if is_disconnect(&io) => {
                Err(SdkError::Closed { code: None, reason: format!("connection lost while sending: {io}") })
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Sends one terminal frame: a JSON text frame, or on `ether.v1.proto` a binary one.
    pub fn send_frame(&mut self, frame: &ClientFrame) -> Result<(), SdkError> {
        if self.is_proto() {
            self.raw_send(Message::binary(ether_proto::pb::encode_client(frame)))
        } else {
            self.raw_send(Message::text(frame.to_json()))
        }
    }

    /// Cumulative delivery ack of the inbox up to `seq`.
    pub fn ack(&mut self, seq: u64) -> Result<(), SdkError> {
        self.send_frame(&ClientFrame::Ack { seq, group: None })
    }

    /// Cumulative delivery ack of group `gid` up to `seq`.
    pub fn ack_group(&mut self, gid: &str, seq: u64) -> Result<(), SdkError> {
        self.send_frame(&ClientFrame::Ack { seq, group: Some(gid.to_owned()) })
    }

    /// Acks `msg` on its own stream: the group for a `g:` chat, the inbox otherwise.
    pub fn ack_msg(&mut self, msg: &Msg) -> Result<(), SdkError> {
        match msg.chat.strip_prefix("g:") {
            Some(gid) => self.ack_group(gid, msg.seq),
            None => self.ack(msg.seq),
        }
    }

    /// The protocol's `ping` frame (answered by `pong`).
    pub fn ping(&mut self) -> Result<(), SdkError> {
        self.send_frame(&ClientFrame::Ping)
    }

    /// A WebSocket ping control frame (answered by a pong control frame, which `recv` skips).
    pub fn ws_ping(&mut self, payload: &[u8]) -> Result<(), SdkError> {
        self.raw_send(Message::Ping(payload.to_vec().into()))
    }

    /// `send` of a message of any kind to user `to`.
    pub fn send(&mut self, cid: &str, to: &str, kind: Kind, body: Value) -> Result<(), SdkError> {
        self.send_frame(&ClientFrame::Send { cid: cid.to_owned(), to: Some(to.to_owned()), group: None, kind, body })
    }

    /// `send` of a text message to user `to`.
    pub fn send_text(&mut self, cid: &str, to: &str, text: &str) -> Result<(), SdkError> {
        self.send(cid, to, Kind::Text, json!({ "text": text }))
    }

    /// `send` of a text message to group `gid`.
    pub fn send_group_text(&mut self, cid: &str, gid: &str, text: &str) -> Result<(), SdkError> {
        self.send_frame(&ClientFrame::Send {
            cid: cid.to_owned(),
            to: None,
            group: Some(gid.to_owned()),
            kind: Kind::Text,
            body: json!({ "text": text }),
        })
    }

    /// `sync`: ask for everything after these positions.
    pub fn sync(&mut self, inbox_seq: u64, groups: BTreeMap<String, u64>, limit: Option<u32>) -> Result<(), SdkError> {
        self.send_frame(&ClientFrame::Sync { inbox_seq, groups, limit })
    }

    /// `read`: this user read `chat` up to `seq`.
    pub fn read(&mut self, chat: &str, seq: u64) -> Result<(), SdkError> {
        self.send_frame(&ClientFrame::Read { chat: chat.to_owned(), seq })
    }

    // ---- closing ---------------------------------------------------------------------------

    /// Closes with 1000 (normal) and waits up to 2 s for the server's close reply.
    pub fn close(&mut self) -> Result<(), SdkError> {
        self.close_with(1000, "")
    }

    /// Closes with `code` and `reason` and waits up to 2 s for the server's close reply.
    /// Closing an already closed connection is fine.
    pub fn close_with(&mut self, code: u16, reason: &str) -> Result<(), SdkError> {
        if self.closed.is_some() {
            return Ok(());
        }
        let frame = CloseFrame { code: CloseCode::from(code), reason: reason.to_owned().into() };
        match self.ws.close(Some(frame)) {
            Ok(()) => {}
            Err(e) => {
                return match self.fail(e) {
                    SdkError::Closed { .. } => Ok(()),
                    other => Err(other),
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.mark_closed(Some(code), reason.to_owned());
                return Ok(());
            }
            match self.recv_message(left) {
                Ok(_) => {}
                Err(SdkError::Closed { .. }) => return Ok(()),
                Err(e) => {
                    self.mark_closed(Some(code), reason.to_owned());
                    return Err(e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_types_are_the_server_frames() {
        let m = Msg {
            id: "1".into(),
            cid: None,
            chat: "u:a".into(),
            from: "a".into(),
            seq: 1,
            kind: Kind::Text,
            body: json!({"text": "x"}),
            ts: 0,
        };
        let s = String::new;
        let frames = [
            ServerFrame::Welcome {
                user: s(),
                device: s(),
                session: s(),
                heartbeat_s: 1,
                inbox_seq: 0,
                groups: BTreeMap::new(),
                delivered: None,
            },
            ServerFrame::Msg(m),
            ServerFrame::Sent { cid: s(), id: s(), seq: 1, ts: 0 },
            ServerFrame::Synced { inbox_seq: 0, groups: BTreeMap::new(), more: false },
            ServerFrame::Receipt { chat: s(), by: s(), up_to: s() },
            ServerFrame::ReadSync { chat: s(), seq: 1 },
            ServerFrame::Pong,
            ServerFrame::Error { code: ether_proto::ErrorCode::NotFound, message: s(), reference: None, of: None },
            ServerFrame::Kicked { reason: s() },
            ServerFrame::Reconnect { after_ms: 1 },
        ];
        let types: Vec<String> =
            frames.iter().map(|f| serde_json::to_value(f).unwrap()["type"].as_str().unwrap().to_owned()).collect();
        assert_eq!(types, KNOWN_TYPES);
        for t in KNOWN_TYPES {
            assert!(!is_unknown_type(&format!(r#"{{"type":"{t}"}}"#)), "{t}");
        }
        assert!(is_unknown_type(r#"{"type":"typing","chat":"u:a"}"#));
        assert!(!is_unknown_type(r#"{"kind":"typing"}"#), "no type: broken, not new");
        assert!(!is_unknown_type("not json"));
    }

    #[test]
    fn urls() {
        let o = ConnectOptions::new("a.b.c", "laptop", "desktop");
        let t = build_url("ws://127.0.0.1:9000", &o).unwrap();
        assert_eq!(t.url, "ws://127.0.0.1:9000/ws?token=a.b.c&device=laptop&platform=desktop");
        assert_eq!((t.connect.as_str(), t.tls_name), ("127.0.0.1:9000", None));
        let t = build_url("127.0.0.1:9000/", &o.clone().token_in_header()).unwrap();
        assert_eq!(t.url, "ws://127.0.0.1:9000/ws?device=laptop&platform=desktop");
        let t = build_url("ws://h/custom?x=1", &o).unwrap();
        assert_eq!(t.url, "ws://h/custom?x=1&token=a.b.c&device=laptop&platform=desktop");
        assert_eq!(t.connect, "h:80");
        let none = ConnectOptions { token: None, device: None, platform: Some("we b".into()), ..o };
        let t = build_url("ws://[::1]:9", &none).unwrap();
        assert_eq!(t.url, "ws://[::1]:9/ws?platform=we%20b");
        // wss://: port 443 unless given, and the host name the certificate must match.
        let t = build_url("wss://chat.example.com", &none).unwrap();
        assert_eq!(t.url, "wss://chat.example.com/ws?platform=we%20b");
        assert_eq!((t.connect.as_str(), t.tls_name.as_deref()), ("chat.example.com:443", Some("chat.example.com")));
        let t = build_url("WSS://[::1]:9443/ws", &none).unwrap();
        assert_eq!((t.connect.as_str(), t.tls_name.as_deref()), ("[::1]:9443", Some("::1")));
        assert!(matches!(build_url("https://h:1", &none), Err(SdkError::InvalidUrl(_))));
    }
}
