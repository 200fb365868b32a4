//! Terminal connections on the client port: the accept loop, the WebSocket upgrade with token
//! checks, the hand-over of the socket to the user's home shard, and the connection task that
//! reads frames and writes the session's queue. Owns sockets; session state lives in
//! `session`, routing and delivery in `shard`.
use std::future::poll_fn;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use ether_http::request::{HttpError, Limits};
use ether_http::response::Response;
use ether_http::server::{ServeError, Stop};
use ether_proto::frame::SUBPROTOCOL_JSON;
use ether_proto::pb::SUBPROTOCOL_PROTO;
use ether_proto::{ApiError, ErrorCode};
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use glommio::sync::{Semaphore, StaticPermit};
use tracing::{debug, warn};

use crate::mesh::{Handoff, ShardMsg};
use crate::message::{unix_now_ms, Wire};
use crate::parking::Parking;
use crate::session::{CloseReason, ParkState, Platform, Session};
use crate::shard::{home_shard, AdoptError, FrameWeight, Shard};
use crate::stats::ShardCounters;
use crate::ws::{self, FrameReader, WsError, WsEvent};

/// The WebSocket path on the client port.
pub const WS_PATH: &str = "/ws";
/// Device id used when a terminal names none.
pub const DEFAULT_DEVICE: &str = "default";
/// How long a closing connection may take to flush its last frames.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(1);
/// How long to wait for the peer's EOF after our close, so the close frame is not lost to a
/// reset.
const CLOSE_LINGER: Duration = Duration::from_millis(300);
/// How many times a terminal being taken on reads its heads again because its user's group
/// membership changed during the read (a user whose groups change without pause gets the
/// last read's).
const HEADS_REREADS_MAX: usize = 8;
/// Accept-error back-off bounds (EMFILE and friends must not spin).
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Accepts terminals until the node stops; each is upgraded in its own task.
/// At most `limits.handshakes_per_shard_max` handshakes are in progress on a shard: each
/// holds a slot from accept until it is refused or handed to its home shard.
pub async fn accept_loop(shard: Rc<Shard>, listener: TcpListener, stop: Stop) {
    let slots = Rc::new(Semaphore::new(shard.config.limits.handshakes_per_shard_max as u64));
    accept_connections(shard, listener, stop, "client", terminals_full, Some(slots), |shard, stream, slot| {
        let handshake = upgrade(shard.clone(), stream);
        shard.spawn_terminal_task(async move {
            let _slot = slot;
            handshake.await;
        })
    })
    .await;
}

/// Whether the shard holds `limits.connections_per_shard_max` terminals already.
pub(crate) fn terminals_full(shard: &Shard) -> bool {
    shard.live_sessions() >= shard.config.limits.connections_per_shard_max
}

/// The accept loop of a listener (`what` names it in logs): refuses while `full` says so,
/// backs off on accept errors (EMFILE and friends must not spin), hands each connection to
/// `serve`. With `slots`, a connection is accepted only once a slot is free and `serve` gets
/// it (held until dropped): while none is, new connections wait in the kernel's listen
/// backlog instead of being refused, and the client only sees a slower connect.
pub(crate) async fn accept_connections(
    shard: Rc<Shard>,
    listener: TcpListener,
    stop: Stop,
    what: &'static str,
    full: impl Fn(&Shard) -> bool,
    slots: Option<Rc<Semaphore>>,
    serve: impl Fn(&Rc<Shard>, TcpStream, Option<StaticPermit>),
) {
    let mut backoff = ACCEPT_BACKOFF_MIN;
    while !stop.is_stopped() {
        let accepted = futures_lite::future::or(
            async {
                let slot = match &slots {
                    // The semaphore is never closed while the loop runs.
                    Some(slots) => slots.acquire_static_permit(1).await.ok(),
                    None => None,
                };
                Some((listener.accept().await, slot))
            },
            async {
                stop.stopped().await;
                None
            },
        )
        .await;
        let Some((accepted, slot)) = accepted else { break };
        match accepted {
            Ok(stream) => {
                backoff = ACCEPT_BACKOFF_MIN;
                if full(&shard) {
                    debug!(shard = shard.id, listener = what, "connection cap reached, refusing a connection");
                    ShardCounters::add(&shard.counters().handshake_failures, 1);
                    continue;
                }
                serve(&shard, stream, slot);
            }
            Err(e) => {
                warn!(shard = shard.id, listener = what, error = %e, backoff_ms = backoff.as_millis() as u64, "accept failed; backing off");
                glommio::timer::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }
}

/// A refused upgrade: the HTTP answer to send before closing.
struct Refusal {
    status: u16,
    error: ApiError,
    extra: Option<(&'static str, &'static str)>,
}

impl Refusal {
    fn new(status: u16, code: ErrorCode, message: impl Into<String>) -> Refusal {
        Refusal { status, error: ApiError::new(code, message), extra: None }
    }

    fn from_http(e: &HttpError) -> Refusal {
        let code = match e.status() {
            413 => ErrorCode::PayloadTooLarge,
            _ => ErrorCode::InvalidBody,
        };
        Refusal::new(e.status(), code, e.to_string())
    }

    fn bytes(&self) -> Vec<u8> {
        let mut r = Response::json(self.status, self.error.to_json());
        if let Some((k, v)) = self.extra {
            r = r.with_header(k, v);
        }
        let mut out = Vec::new();
        r.encode_into(false, &mut out);
        out
    }
}

/// Reads the upgrade request (bounded in bytes and time), checks it, and hands the socket to
/// the user's home shard.
async fn upgrade(shard: Rc<Shard>, stream: TcpStream) {
    let remote = stream.peer_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    upgrade_from(shard, stream, remote).await;
}

/// [`upgrade`] of a connection whose peer is `remote` (the TLS relay's plaintext end is a
/// local socket: `remote` is the terminal's TCP address).
pub(crate) async fn upgrade_from(shard: Rc<Shard>, mut stream: TcpStream, remote: SocketAddr) {
    let limits =
        Limits { header_bytes_max: shard.config.limits.http_header_bytes_max, headers_max: 64, body_bytes_max: 0 };
    let mut buf = Vec::new();
    let read =
        ether_http::server::read_request(&mut stream, &mut buf, &limits, shard.config.limits.handshake_timeout).await;
    let request = match read {
        Ok(Some(r)) => r,
        Ok(None) | Err(ServeError::Io(_)) | Err(ServeError::Http(HttpError::RequestTimeout)) => {
            // Gone, broken, silent or too slow: nothing worth answering.
            debug!(shard = shard.id, %remote, "handshake abandoned");
            ShardCounters::add(&shard.counters().handshake_failures, 1);
            return;
        }
        Err(ServeError::Http(e)) => return refuse(&shard, stream, Refusal::from_http(&e)).await,
    };
    // Usually empty: then keep no buffer at all (an idle terminal holds none).
    let leftover = if buf.is_empty() { Vec::new() } else { buf };
    if shard.node.draining() {
        let refusal = Refusal::new(503, ErrorCode::Unavailable, "node is draining: connect to another node");
        return refuse(&shard, stream, refusal).await;
    }
    let checked = match check_upgrade(&shard, &request) {
        Ok(c) => c,
        Err(refusal) => {
            if refusal.status == 401 {
                ShardCounters::add(&shard.counters().auth_failures, 1);
            }
            return refuse(&shard, stream, refusal).await;
        }
    };
    // SAFETY: dup of a socket we own; the copy is owned by the OwnedFd.
    let fd = unsafe { libc::dup(stream.as_raw_fd()) };
    if fd < 0 {
        warn!(shard = shard.id, error = %std::io::Error::last_os_error(), "dup failed during hand-over");
        return;
    }
    drop(stream);
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let home = home_shard(&checked.user, shard.shards);
    let handoff = Handoff {
        fd,
        user: checked.user,
        device: checked.device,
        platform: checked.platform,
        remote,
        ws_key: checked.key,
        subprotocol: checked.subprotocol,
        leftover,
    };
    if let Err(e) = shard.route(home, ShardMsg::Adopt(Box::new(handoff))).await {
        warn!(shard = shard.id, home, error = %e, "hand-over failed");
    }
}

struct Checked {
    user: Arc<str>,
    device: Box<str>,
    platform: Platform,
    key: Box<str>,
    subprotocol: Option<Wire>,
}

fn check_upgrade(shard: &Shard, req: &ether_http::request::Request) -> Result<Checked, Refusal> {
    if req.path != WS_PATH {
        return Err(Refusal::new(
            404,
            ErrorCode::NotFound,
            format!("no route {}; terminals connect to {WS_PATH}", req.path),
        ));
    }
    if req.method != ether_http::request::Method::Get {
        return Err(Refusal::new(405, ErrorCode::MethodNotAllowed, "the WebSocket upgrade is a GET"));
    }
    if !req.is_websocket_upgrade() {
        let mut r =
            Refusal::new(426, ErrorCode::InvalidBody, "this path speaks WebSocket: send an Upgrade: websocket request");
        r.extra = Some(("Upgrade", "websocket"));
        return Err(r);
    }
    if req.header("sec-websocket-version") != Some("13") {
        let mut r = Refusal::new(426, ErrorCode::InvalidBody, "unsupported Sec-WebSocket-Version (13 is)");
        r.extra = Some(("Sec-WebSocket-Version", "13"));
        return Err(r);
    }
    let Some(key) = req.header("sec-websocket-key").filter(|k| !k.is_empty() && k.len() <= 64) else {
        return Err(Refusal::new(400, ErrorCode::InvalidBody, "missing Sec-WebSocket-Key"));
    };
    // The first offered subprotocol this node speaks; none offered means JSON, unnamed.
    let subprotocol = match req.header("sec-websocket-protocol") {
        None => None,
        Some(list) => match list.split(',').find_map(|p| Wire::of_subprotocol(p.trim())) {
            Some(wire) => Some(wire),
            None => {
                return Err(Refusal::new(
                    400,
                    ErrorCode::InvalidBody,
                    format!("no supported subprotocol in {list:?}; this node speaks {SUBPROTOCOL_JSON} and {SUBPROTOCOL_PROTO}"),
                ));
            }
        },
    };
    let token = req.query_param("token").or_else(|| req.bearer_token().map(str::to_owned));
    let Some(token) = token else {
        return Err(Refusal::new(401, ErrorCode::Unauthorized, crate::auth::AuthError::Missing.to_string()));
    };
    let claims = shard.keys.verify(&token).map_err(|e| Refusal::new(401, ErrorCode::Unauthorized, e.to_string()))?;
    let device = match req.query_param("device") {
        Some(d) => d,
        None => claims.device.clone().unwrap_or_else(|| DEFAULT_DEVICE.to_owned()),
    };
    if !ether_proto::ids::is_valid_id(&device) {
        return Err(Refusal::new(400, ErrorCode::InvalidBody, "device: must be 1-128 characters of [A-Za-z0-9_.@:-]"));
    }
    if claims.device.as_deref().is_some_and(|d| d != device) {
        return Err(Refusal::new(401, ErrorCode::Unauthorized, "token is for another device"));
    }
    if shard.node.revocations.refuses(&claims.sub, &device, claims.issued_ms()) {
        return Err(Refusal::new(401, ErrorCode::Unauthorized, "token revoked: ask the business for a new one"));
    }
    let platform = match req.query_param("platform") {
        None => Platform::Other,
        Some(p) => Platform::parse(&p).ok_or_else(|| {
            Refusal::new(400, ErrorCode::InvalidBody, "platform: one of web, ios, android, desktop, other")
        })?,
    };
    Ok(Checked { user: Arc::from(claims.sub), device: device.into(), platform, key: key.into(), subprotocol })
}

async fn refuse(shard: &Shard, mut stream: TcpStream, refusal: Refusal) {
    ShardCounters::add(&shard.counters().handshake_failures, 1);
    debug!(shard = shard.id, status = refusal.status, error = ?refusal.error, "upgrade refused");
    let bytes = refusal.bytes();
    let _ = glommio::timer::timeout(CLOSE_FLUSH_TIMEOUT, async {
        stream.write_all(&bytes).await.map_err(glommio::GlommioError::IoError)?;
        let _ = stream.close().await;
        Ok(())
    })
    .await;
}

/// Takes over a terminal on its home shard: registers the session and starts its task.
pub fn adopt(shard: &Rc<Shard>, h: Handoff) {
    let Handoff { fd, user, device, platform, remote, ws_key, subprotocol, leftover } = h;
    let sndbuf = shard.config.limits.socket_send_buffer_bytes;
    if sndbuf > 0 {
        if let Err(e) = socket2::SockRef::from(&fd).set_send_buffer_size(sndbuf) {
            debug!(shard = shard.id, error = %e, "could not size the send buffer");
        }
    }
    let task_shard = shard.clone();
    let shard = shard.clone();
    task_shard.spawn_terminal_task(async move {
        // The heads first (the store, once per user), so `welcome` is exact; deliveries that
        // commit meanwhile still move the user's head (the entry is pending).
        shard.pend_user(&user);
        // Cluster mode: present (other nodes route the user's traffic here) before the heads
        // are read, so whatever is not within them reaches this node (see `cluster`); marked
        // connecting: not online for the other nodes until it is taken on (below).
        let since = unix_now_ms();
        // The user's devices on other nodes, as Redis had them just after this entry was
        // written: with this node's, they count against `limits.terminals_per_user_max`. A
        // failed write leaves them unknown (none counted: the terminal is not refused for
        // Redis's trouble).
        let mut elsewhere = Vec::new();
        if let Some(cluster) = shard.node.cluster() {
            elsewhere = cluster.connecting(&user, &device, platform.as_str(), since).await.unwrap_or_default();
        }
        let delivered_op = ether_store::op::Op::GetDelivered { user: user.to_string(), device: device.to_string() };
        let mut changes = shard.membership_changes(&user);
        let (mut heads, delivered) =
            futures_lite::future::zip(shard.heads(&user), shard.store.call(delivered_op)).await;
        // A membership change mirrored on this shard while the heads were read reached no
        // session of this terminal, and the heads may predate it: read them again, so the
        // groups the terminal joins (and its `welcome`) are the membership as it stands.
        for _ in 0..HEADS_REREADS_MAX {
            let now = shard.membership_changes(&user);
            if now == changes || heads.is_err() {
                break;
            }
            changes = now;
            heads = shard.heads(&user).await;
        }
        // The device's last acknowledged positions (best effort: a store hiccup only omits them).
        let delivered = delivered
            .and_then(ether_store::Reply::delivered)
            .ok()
            .map(|d| ether_proto::frame::Positions { inbox_seq: d.inbox_seq, groups: d.groups });
        // Positions of groups the user is not in (any more) are not this terminal's business.
        let delivered = match (delivered, &heads) {
            (Some(mut d), Ok(h)) => {
                d.groups.retain(|g, _| h.groups.contains_key(g));
                Some(d)
            }
            (d, _) => d,
        };
        let added = heads.map_err(|e| AdoptError::Store(e.to_api().message)).and_then(|mut heads| {
            let wire = subprotocol.unwrap_or_default();
            // Group messages committed since the heads were read reached no fan-out of this
            // terminal: its welcome names them, so it syncs them (joined below, no await).
            shard.heads_seen_while_adopting(&mut heads.groups);
            let elsewhere: Vec<&str> = elsewhere.iter().map(|t| t.device.as_str()).collect();
            shard.add_session(&user, &device, platform, wire, remote, &elsewhere).map(|session| (session, heads))
        });
        shard.unpend_user(&user);
        // Cluster mode: the entry written again, now online (awaited below, before the
        // terminal gets its welcome).
        let mut online = None;
        if let Some(cluster) = shard.node.cluster() {
            if added.is_ok() {
                // Online from now on for the other nodes; also written again in case a
                // connection of the same device that closed while this one was being taken on
                // removed the entry written above.
                online = Some(cluster.online(&user, &device, platform.as_str(), since));
                // A connection of this device on another node is replaced, as one here is
                // (`add_session`): routed only to nodes holding the user's terminals, and
                // only connections older than this one go.
                cluster.publish(crate::cluster::BusEvent::Kick {
                    user: user.to_string(),
                    device: Some(device.to_string()),
                    reason: "replaced".into(),
                    before_ms: Some(since),
                });
            } else if let Some(s) = shard.sessions_of(&user).iter().find(|s| *s.device == *device) {
                // Refused while the device is connected here already: that connection's entry
                // is written back (this one marked it connecting). Its removal, if it is
                // closing, comes later and takes the entry away.
                drop(cluster.online(&user, &device, s.platform.as_str(), s.since_ms));
            } else {
                // Refused: its presence goes.
                cluster.offline(&user, &device);
            }
        }
        match added {
            Ok((session, heads)) => {
                let behind = behind(&heads, delivered.as_ref());
                session
                    .push_final(bytes::Bytes::from(ws::upgrade_response(&ws_key, subprotocol.map(Wire::subprotocol))));
                shard.join_groups(&session, heads.groups.iter());
                session.push_final(shard.welcome_frame(&session, heads.groups, delivered));
                // Parked as soon as the welcome is written and nothing came in: connect storms
                // then leave no task per connection behind (see `parking`). Not a terminal that
                // has messages to catch up: it is about to `sync`.
                if shard.parking.is_some() && !behind {
                    session.request_park();
                }
                ShardCounters::add(&shard.counters().handshakes, 1);
                // Cluster mode: the terminal reads its welcome only once every node counts it
                // as online (a message committed elsewhere from then on makes no
                // `message.unreached`); a failed write is not waited for longer (logged).
                if let Some(online) = online {
                    let _ = online.await;
                }
                if let Err(fd) = park_fresh(&shard, &session, fd, leftover.is_empty()) {
                    // SAFETY: the connected TCP socket handed over by `upgrade`; the stream owns it.
                    let stream = unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) };
                    let reader = FrameReader::default();
                    shard.spawn_terminal_task(run_session(shard.clone(), session, stream, reader, leftover));
                }
            }
            Err(e) => {
                let refusal = match e {
                    AdoptError::TooManyTerminals(max) => Refusal::new(
                        403,
                        ErrorCode::Forbidden,
                        format!("user {user} already has {max} terminals connected (limits.terminals_per_user_max)"),
                    ),
                    AdoptError::ShuttingDown => Refusal::new(503, ErrorCode::Unavailable, "node is shutting down"),
                    AdoptError::Draining => {
                        Refusal::new(503, ErrorCode::Unavailable, "node is draining: connect to another node")
                    }
                    AdoptError::Store(why) => Refusal::new(503, ErrorCode::Unavailable, why),
                };
                // SAFETY: as above.
                let stream = unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) };
                refuse(&shard, stream, refusal).await;
            }
        }
    });
}

/// Whether a device's acknowledged positions are behind its user's heads: messages came while
/// it was away (or it never acknowledged any), so it will `sync` right after `welcome`.
fn behind(heads: &ether_store::op::Heads, delivered: Option<&ether_proto::frame::Positions>) -> bool {
    let Some(d) = delivered else { return heads.inbox_seq > 0 || heads.groups.values().any(|&s| s > 0) };
    heads.inbox_seq > d.inbox_seq || heads.groups.iter().any(|(g, &seq)| seq > d.groups.get(g).copied().unwrap_or(0))
}

/// What woke the connection task.
enum Wake {
    /// `n` bytes were read into the shard's scratch buffer.
    Read(usize),
    Close(CloseReason),
    /// Parking was asked for and nothing is in flight (see `parking`).
    Park,
}

/// Polls the socket for the session: writes what is queued (gathered, non-blocking), then
/// reads. Pending only when the queue is empty or the socket full, and nothing is readable;
/// then, if the shard asked to park the session and `between_frames` (no frame half read),
/// ready to park instead.
fn poll_io(
    shard: &Shard,
    session: &Session,
    stream: &mut TcpStream,
    between_frames: bool,
    cx: &mut std::task::Context<'_>,
) -> Poll<Wake> {
    if let Some(reason) = session.close_reason() {
        return Poll::Ready(Wake::Close(reason));
    }
    let fd = stream.as_raw_fd();
    let mut writes = 0;
    while session.has_queued() {
        match session.write_queued(fd) {
            Ok(_) => {
                writes += 1;
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Full: let glommio wait for writability (it writes the front when it can).
                let polled = session.with_front(|front| Pin::new(&mut *stream).poll_write(cx, front));
                match polled {
                    Some(Poll::Ready(Ok(n))) => {
                        writes += 1;
                        session.advance(n);
                    }
                    Some(Poll::Ready(Err(_))) => return Poll::Ready(Wake::Close(CloseReason::IoError)),
                    Some(Poll::Pending) | None => break,
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return Poll::Ready(Wake::Close(CloseReason::IoError)),
        }
    }
    if writes > 0 {
        ShardCounters::add(&shard.counters().socket_writes, writes);
        session.note_write(shard.now_tick());
    }
    let mut scratch = shard.scratch.borrow_mut();
    if session.park_state() == ParkState::Requested {
        if between_frames && session.quiet() {
            // A plain non-blocking read: glommio's would arm a poll (and allocate its source)
            // only for it to be dropped when the session parks.
            // SAFETY: reads into the scratch buffer, borrowed mutably for the call, from the
            // session's socket.
            let r = unsafe { libc::recv(fd, scratch.as_mut_ptr().cast(), scratch.len(), libc::MSG_DONTWAIT) };
            match r {
                0 => return Poll::Ready(Wake::Close(CloseReason::PeerClosed)),
                n if n > 0 => {
                    session.decline_park();
                    return Poll::Ready(Wake::Read(n as usize));
                }
                _ => match std::io::Error::last_os_error().kind() {
                    std::io::ErrorKind::WouldBlock => return Poll::Ready(Wake::Park),
                    std::io::ErrorKind::Interrupted => {}
                    _ => return Poll::Ready(Wake::Close(CloseReason::IoError)),
                },
            }
        }
        session.decline_park();
    }
    match Pin::new(&mut *stream).poll_read(cx, &mut scratch[..]) {
        Poll::Ready(Ok(0)) => Poll::Ready(Wake::Close(CloseReason::PeerClosed)),
        Poll::Ready(Ok(n)) => Poll::Ready(Wake::Read(n)),
        Poll::Ready(Err(_)) => Poll::Ready(Wake::Close(CloseReason::IoError)),
        Poll::Pending => {
            session.set_waker(cx.waker());
            Poll::Pending
        }
    }
}

/// Feeds read bytes through the frame reader and handles each frame. Whole frames (data or
/// control, a heartbeat too) keep the session from its idle timeout; bytes of a frame not
/// complete yet do not, so a terminal dribbling a frame it never finishes is closed (4003).
/// When they held only heartbeats, the session may park again as soon as the pong is
/// written (a heartbeat is not activity that keeps a task).
fn on_bytes(shard: &Rc<Shard>, session: &Rc<Session>, reader: &mut FrameReader, bytes: &mut [u8]) -> FrameWeight {
    let max = shard.config.limits.frame_bytes_max;
    let mut weight = FrameWeight::Heartbeat;
    let result = reader.feed(bytes, max, |event| {
        match event {
            WsEvent::Text(t) => weight = weight.max(shard.on_client_frame(session, t, false)),
            WsEvent::Binary(t) => weight = weight.max(shard.on_client_frame(session, t, true)),
            WsEvent::Ping(p) => {
                shard.push(session, ws::pong_frame(p));
            }
            WsEvent::Pong => {}
            WsEvent::Close(_) => {
                weight = FrameWeight::Busy;
                session.request_close(CloseReason::PeerClosed);
            }
        }
        session.close_reason().is_none()
    });
    if matches!(result, Ok(frames) if frames > 0) {
        session.touch(shard.now_tick());
    }
    if weight == FrameWeight::Heartbeat && shard.parking.is_some() && session.park_state() == ParkState::Active {
        session.request_park();
    }
    if let Err(e) = result {
        debug!(user = %session.user, device = %session.device, shard = shard.id, error = %e, "bad WebSocket input");
        session.request_close(match e {
            WsError::TooBig { .. } => CloseReason::FrameTooBig,
            WsError::Protocol(_) => CloseReason::ProtocolError,
            WsError::NotUtf8(_) => CloseReason::InvalidPayload,
        });
        return FrameWeight::Busy;
    }
    weight
}

/// The connection task of one session: runs until the session closes (then says goodbye) or
/// is parked.
async fn run_session(
    shard: Rc<Shard>,
    session: Rc<Session>,
    mut stream: TcpStream,
    mut reader: FrameReader,
    mut leftover: Vec<u8>,
) {
    if !leftover.is_empty() {
        on_bytes(&shard, &session, &mut reader, &mut leftover);
    }
    drop(leftover);
    let reason = loop {
        let between_frames = reader.is_between_frames();
        match poll_fn(|cx| poll_io(&shard, &session, &mut stream, between_frames, cx)).await {
            Wake::Close(reason) => break reason,
            Wake::Read(n) => {
                // The scratch buffer is only borrowed here, with no await until it is released.
                let mut scratch = shard.scratch.borrow_mut();
                on_bytes(&shard, &session, &mut reader, &mut scratch[..n]);
            }
            Wake::Park => match park(&shard, &session, &stream) {
                Ok(()) => return, // the stream's fd closes; the session holds a duplicate
                Err(e) => {
                    debug!(user = %session.user, device = %session.device, shard = shard.id, error = %e, "cannot park; the task keeps serving");
                    session.decline_park();
                }
            },
        }
    };
    shard.remove_session(&session, reason);
    // The goodbye runs as its own short task, so its state (timers, a drain buffer) is not
    // part of every idle connection's long-lived future.
    shard.spawn_terminal_task(async move { say_goodbye(&session, stream, reason).await });
}

/// Writes a new session's `101` and `welcome` and parks it right away, without a connection
/// task or a glommio stream ever made for it, when it can: everything written, nothing read
/// yet (not even buffered in the hand-over), nothing readable. Otherwise gives the socket back
/// for a connection task. Saves a task, a stream (two `fcntl`) and the `dup` of `park` per
/// connection in a connect storm.
fn park_fresh(shard: &Shard, session: &Session, fd: OwnedFd, nothing_read: bool) -> Result<(), OwnedFd> {
    let Some(parking) = shard.parking.as_ref() else { return Err(fd) };
    if !nothing_read || session.park_state() != ParkState::Requested {
        return Err(fd);
    }
    let raw = fd.as_raw_fd();
    write_without_task(shard, session, raw);
    if !session.quiet() {
        return Err(fd);
    }
    let mut probe = [0u8; 1];
    // SAFETY: peeks at most one byte into a local buffer from the session's socket.
    let r = unsafe { libc::recv(raw, probe.as_mut_ptr().cast(), 1, libc::MSG_DONTWAIT | libc::MSG_PEEK) };
    if r >= 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::WouldBlock {
        return Err(fd); // input, EOF or an error: the task reads it
    }
    if parking.park(session.key, &fd).is_err() {
        return Err(fd);
    }
    session.park_with(fd);
    count_parked(shard);
    Ok(())
}

/// Counts a session parked (`parks`, and the `parked` gauge).
fn count_parked(shard: &Shard) {
    let c = shard.counters();
    ShardCounters::add(&c.parks, 1);
    c.parked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Writes a session's queue straight to `fd` (non-blocking, gathered) until it is empty, the
/// socket is full or broken: for sessions that have no connection task.
fn write_without_task(shard: &Shard, session: &Session, fd: RawFd) {
    let mut writes = 0;
    while session.has_queued() {
        match session.write_queued(fd) {
            Ok(_) => writes += 1,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break, // full or broken: a connection task deals with it
        }
    }
    if writes > 0 {
        ShardCounters::add(&shard.counters().socket_writes, writes);
        session.note_write(shard.now_tick());
    }
}

/// Hands an idle session's socket to the shard's epoll set (a duplicate fd, registered before
/// the task's stream is dropped, so readiness in between is not missed).
fn park(shard: &Shard, session: &Session, stream: &TcpStream) -> std::io::Result<()> {
    let parking = shard.parking.as_ref().ok_or_else(|| std::io::Error::other("parking is off"))?;
    // SAFETY: the stream's fd is open for the whole call; only duplicated here.
    let fd = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) }.try_clone_to_owned()?;
    parking.park(session.key, &fd)?;
    session.park_with(fd);
    count_parked(shard);
    Ok(())
}

/// Gives parked sessions their task back when their socket turns readable or something is
/// pushed to them (see `parking`). Runs as long as the shard.
pub async fn unpark_loop(shard: Rc<Shard>) {
    let Some(parking) = shard.parking.as_ref() else { return };
    let mut keys = Vec::new();
    loop {
        parking.next_batch(&mut keys).await;
        for (key, readable) in keys.drain(..) {
            // Stale keys (closed sessions, reused slots, sessions already back) find nothing.
            let Some(session) = shard.session(key) else { continue };
            if !matches!(session.park_state(), ParkState::Parked | ParkState::Waking) {
                continue;
            }
            let reader = match serve_parked(&shard, parking, &session, readable) {
                Ok(()) => continue,
                Err(reader) => reader,
            };
            let Some(fd) = session.unpark() else { continue };
            parking.unpark(&fd);
            shard.counters().parked.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            shard.schedule_park_check(key);
            // SAFETY: the session's connected TCP socket, owned by the stream from here on.
            let stream = unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) };
            shard.spawn_terminal_task(run_session(shard.clone(), session, stream, reader, Vec::new()));
        }
    }
}

/// Serves a parked session without a task when that is enough: writes what was pushed to it
/// straight to its socket, and when the socket turned readable reads it and handles what came
/// if that is only heartbeats and acks (then arms the readiness again). Anything else (a close,
/// a full socket, EOF, other frames, a frame cut short, acks again within the park delay)
/// needs a task: the frame reader, with what was read and handled so far, goes to it.
fn serve_parked(
    shard: &Rc<Shard>,
    parking: &Parking,
    session: &Rc<Session>,
    readable: bool,
) -> Result<(), FrameReader> {
    let mut reader = FrameReader::default();
    if session.close_reason().is_some() {
        return Err(reader);
    }
    let Some(fd) = session.parked_raw_fd() else { return Err(reader) };
    if readable {
        let mut scratch = shard.scratch.borrow_mut();
        // SAFETY: reads into the scratch buffer, borrowed mutably for the call, from the
        // session's parked socket (open: the session owns it).
        let r = unsafe { libc::recv(fd, scratch.as_mut_ptr().cast(), scratch.len(), libc::MSG_DONTWAIT) };
        if r > 0 {
            let n = r as usize;
            let previous_read = session.last_active();
            let weight = on_bytes(shard, session, &mut reader, &mut scratch[..n]);
            if weight == FrameWeight::Busy || !reader.is_between_frames() || n == scratch.len() {
                return Err(reader); // handled; the task reads on
            }
            // Acks again within the park delay: a terminal busy receiving. Its own task serves
            // it for less than a watcher-thread hop and an epoll re-arm per ack (measured), and
            // parks it again once it goes quiet. A heartbeat never counts as busy.
            if weight == FrameWeight::Ack
                && shard.now_tick().saturating_sub(previous_read) < crate::shard::park_ticks(&shard.config)
            {
                return Err(reader);
            }
        } else if r == 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::WouldBlock {
            return Err(reader); // EOF or an error: the task sees it again and closes
        }
    }
    write_without_task(shard, session, fd);
    if session.has_queued() || session.close_reason().is_some() {
        return Err(reader); // full or broken socket, or closing: a task deals with it
    }
    if readable && parking.rearm(session.key, fd).is_err() {
        return Err(reader);
    }
    session.stay_parked();
    Ok(())
}

/// Sends the close frame (after what is queued) and closes the socket, bounded in time. A
/// slow consumer's backlog is dropped first, so its close (4002) goes next: the terminal
/// learns why, and resumes with `sync` (nothing stored is lost).
async fn say_goodbye(session: &Session, mut stream: TcpStream, reason: CloseReason) {
    if reason == CloseReason::IoError {
        return; // nothing more can usefully be written
    }
    if reason == CloseReason::SlowConsumer {
        session.drop_unstarted();
    }
    if let Some(code) = reason.close_code() {
        session.push_final(ws::close_frame(code, reason.as_str()));
    }
    let flushed = glommio::timer::timeout(CLOSE_FLUSH_TIMEOUT, async {
        while let Some(front) = session.with_front(<[u8]>::to_vec) {
            let n = stream.write(&front).await?;
            session.advance(n);
        }
        Ok(())
    })
    .await;
    if flushed.is_err() {
        return;
    }
    // Half-close, then give the peer a moment to read our close and hang up: closing with
    // unread input would reset the connection and could lose the close frame.
    // SAFETY: shutdown on a socket we own.
    unsafe { libc::shutdown(stream.as_raw_fd(), libc::SHUT_WR) };
    let _ = glommio::timer::timeout(CLOSE_LINGER, async {
        let mut sink = [0u8; 256];
        while stream.read(&mut sink).await? > 0 {}
        Ok(())
    })
    .await;
}
