//! One lean WebSocket terminal on glommio.
//!
//! Raw TCP (bound to a 127.0.0.x source address with `IP_BIND_ADDRESS_NO_PORT` when asked),
//! the upgrade written by hand, frames parsed from a per-thread 64 KiB scratch buffer: bytes
//! are copied into the terminal's own `Vec` only while a frame is incomplete or unprocessed,
//! and that `Vec` is freed when empty, so an idle terminal holds no read buffer. Client
//! frames are masked; pings are answered; messages are acked cumulatively by inbox `seq`.
use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_lite::{AsyncRead, AsyncWriteExt};
use glommio::net::TcpStream;
use glommio::sync::StaticPermit;
use serde::Deserialize;

use crate::api::Stamp;
use crate::fleet::FleetSpec;
use crate::stats::{Counters, Hist, Seen, SeqTracker};
use crate::token::Minter;
use crate::wsframe::{self, Upgrade};

const SCRATCH_LEN: usize = 64 * 1024;

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0u8; SCRATCH_LEN]);
}

/// Reads what is available into `rx` through the thread's scratch buffer. The stream holds no
/// buffer of its own while it waits.
pub fn read_some<'a, S: AsyncRead + Unpin>(
    s: &'a mut S,
    rx: &'a mut Vec<u8>,
) -> impl Future<Output = io::Result<usize>> + 'a {
    futures_lite::future::poll_fn(move |cx| {
        SCRATCH.with(|sc| {
            let mut sc = sc.borrow_mut();
            match Pin::new(&mut *s).poll_read(cx, &mut sc[..]) {
                Poll::Ready(Ok(n)) => {
                    rx.extend_from_slice(&sc[..n]);
                    Poll::Ready(Ok(n))
                }
                other => other,
            }
        })
    })
}

/// Starts a non-blocking connect to `dst`, from `src` when given (with
/// `IP_BIND_ADDRESS_NO_PORT`, so the port is picked at connect time and the 4-tuple, not the
/// source port, must be unique). The first write waits for the connect to finish.
pub fn connect(dst: SocketAddr, src: Option<Ipv4Addr>) -> io::Result<TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    let domain = if dst.is_ipv6() { Domain::IPV6 } else { Domain::IPV4 };
    let sock = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    sock.set_nonblocking(true)?;
    sock.set_nodelay(true)?;
    if let Some(ip) = src {
        set_bind_no_port(&sock)?;
        sock.bind(&SocketAddr::new(IpAddr::V4(ip), 0).into())?;
    }
    match sock.connect(&dst.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    // SAFETY: the fd is a freshly made TCP socket that we own and hand over.
    Ok(unsafe { TcpStream::from_raw_fd(sock.into_raw_fd()) })
}

fn set_bind_no_port(sock: &socket2::Socket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: valid fd, option value points to a c_int of the given size.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The source address of terminal `global` when spreading over `n` loopback addresses.
pub fn source_ip(global: u64, n: u32) -> Option<Ipv4Addr> {
    if n == 0 {
        return None;
    }
    let i = (global % n as u64) as u32 + 1;
    Some(Ipv4Addr::new(127, (i >> 16) as u8, (i >> 8) as u8, i as u8))
}

/// What one terminal knows about its inbox.
#[derive(Debug, Default)]
pub struct UserTrack {
    pub seq: SeqTracker,
    pub received: u32,
    pub acked: u64,
    /// The socket while connected (for heartbeats written by the thread's ticker).
    pub fd: Option<std::os::fd::RawFd>,
    /// Heartbeat period the server asked for in its welcome (0 = none).
    pub heartbeat_s: u64,
    /// A write of the terminal's own is under way (a heartbeat must not cut into it).
    pub writing: bool,
}

/// The state of one executor thread's terminals.
#[derive(Default)]
pub struct ExecState {
    pub counters: Counters,
    pub failures: BTreeMap<String, u64>,
    pub drops: BTreeMap<String, u64>,
    pub connect_hist: Hist,
    pub msg_hist: Hist,
    pub interval_hist: Hist,
    pub users: Vec<UserTrack>,
    /// Terminals that got their welcome or failed.
    pub settled: u64,
}

impl ExecState {
    fn fail(&mut self, reason: String) {
        self.counters.failed += 1;
        self.settled += 1;
        *self.failures.entry(reason).or_default() += 1;
    }

    fn drop_conn(&mut self, reason: String) {
        self.counters.dropped += 1;
        *self.drops.entry(reason).or_default() += 1;
    }
}

/// What terminals of one thread share.
pub struct TermCtx {
    pub spec: std::sync::Arc<FleetSpec>,
    pub state: Rc<RefCell<ExecState>>,
    pub minter: Minter,
    pub host: String,
}

impl TermCtx {
    pub fn user(&self, global: u64) -> String {
        format!("{}{}", self.spec.user_prefix, global)
    }
}

#[derive(Deserialize)]
struct InFrame<'a> {
    #[serde(rename = "type", borrow)]
    ty: Cow<'a, str>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    inbox_seq: Option<u64>,
    #[serde(default)]
    heartbeat_s: Option<u64>,
    #[serde(default, borrow)]
    chat: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    body: Option<InBody<'a>>,
    #[serde(default, borrow)]
    reason: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    code: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct InBody<'a> {
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
}

/// Runs terminal `global` (slot `slot` of this thread) until its connection ends or the
/// executor stops. `permit` bounds the connects in flight and is released at the welcome.
pub async fn run(ctx: Rc<TermCtx>, slot: usize, global: u64, permit: StaticPermit) {
    let t0 = Instant::now();
    {
        let mut st = ctx.state.borrow_mut();
        st.counters.attempted += 1;
        if st.counters.first_attempt_ns == 0 {
            st.counters.first_attempt_ns = crate::unix_nanos();
        }
    }
    let timeout = Duration::from_millis(ctx.spec.connect_timeout_ms.max(1));
    let stage = std::cell::Cell::new("connect");
    let hs = glommio::timer::timeout(timeout, async { Ok(handshake(&ctx, global, &stage).await) }).await;
    let (mut stream, mut rx) = match hs {
        Ok(Ok(v)) => v,
        Ok(Err(reason)) => {
            ctx.state.borrow_mut().fail(reason);
            return;
        }
        Err(_) => {
            ctx.state.borrow_mut().fail(format!("timeout waiting for {}", stage.get()));
            return;
        }
    };
    // rx starts with the welcome frame.
    let (inbox_seq, heartbeat_s) = match take_welcome(&mut rx) {
        Ok(s) => s,
        Err(reason) => {
            ctx.state.borrow_mut().fail(reason);
            return;
        }
    };
    {
        let mut st = ctx.state.borrow_mut();
        st.counters.welcomed += 1;
        st.settled += 1;
        st.counters.last_welcome_ns = crate::unix_nanos();
        st.connect_hist.record_us(t0.elapsed().as_micros() as u64);
        let u = &mut st.users[slot];
        u.seq = SeqTracker::starting_at(inbox_seq);
        u.acked = inbox_seq;
        u.heartbeat_s = heartbeat_s;
        u.fd = Some(std::os::fd::AsRawFd::as_raw_fd(&stream));
    }
    drop(permit);
    let reason = serve(&ctx, slot, global, &mut stream, &mut rx).await;
    let mut st = ctx.state.borrow_mut();
    // Forget the fd before the stream closes it.
    st.users[slot].fd = None;
    st.drop_conn(reason);
}

/// Connects, upgrades, and reads until the first complete frame is in the returned buffer.
async fn handshake(
    ctx: &TermCtx,
    global: u64,
    stage: &std::cell::Cell<&'static str>,
) -> Result<(TcpStream, Vec<u8>), String> {
    let spec = &ctx.spec;
    let mut stream =
        connect(spec.client, source_ip(global, spec.source_ips)).map_err(|e| format!("connect: {}", err_kind(&e)))?;
    let user = ctx.user(global);
    let token = ctx.minter.mint(&user);
    let path = format!("{}?token={}&device={}&platform={}", spec.path, token, spec.device, spec.platform);
    let key = wsframe::random_key();
    let req = wsframe::client_request(&ctx.host, &path, &key);
    stream.write_all(&req).await.map_err(|e| format!("connect: {}", err_kind(&e)))?;
    stage.set("the upgrade response");
    let mut rx = Vec::new();
    loop {
        let n = read_some(&mut stream, &mut rx).await.map_err(|e| format!("handshake: read {}", err_kind(&e)))?;
        if n == 0 {
            return Err("handshake: closed by server".into());
        }
        match wsframe::check_response(&rx, &key) {
            Upgrade::Partial if rx.len() > 16 * 1024 => return Err("handshake: response too long".into()),
            Upgrade::Partial => continue,
            Upgrade::Refused(r) => return Err(r),
            Upgrade::Accepted { len } => {
                rx.drain(..len);
                stage.set("the welcome");
                break;
            }
        }
    }
    loop {
        match wsframe::parse(&mut rx) {
            Ok(Some(_)) => return Ok((stream, rx)),
            Ok(None) => {}
            Err(e) => return Err(format!("welcome: {e}")),
        }
        let n = read_some(&mut stream, &mut rx).await.map_err(|e| format!("welcome: read {}", err_kind(&e)))?;
        if n == 0 {
            return Err("closed before welcome".into());
        }
    }
}

/// Removes the welcome frame from the start of `rx`; returns its `inbox_seq` and
/// `heartbeat_s`.
fn take_welcome(rx: &mut Vec<u8>) -> Result<(u64, u64), String> {
    let p = match wsframe::parse(rx) {
        Ok(Some(p)) => p,
        _ => return Err("welcome: incomplete".into()),
    };
    if p.opcode == wsframe::OP_CLOSE {
        return Err(format!("closed before welcome ({})", close_code(&rx[p.payload])));
    }
    if p.opcode != wsframe::OP_TEXT {
        return Err(format!("welcome: opcode {}", p.opcode));
    }
    let seq = match serde_json::from_slice::<InFrame>(&rx[p.payload.clone()]) {
        Ok(f) if f.ty == "welcome" => (f.inbox_seq.unwrap_or(0), f.heartbeat_s.unwrap_or(0)),
        Ok(f) => return Err(format!("first frame is {:?}, not welcome", f.ty)),
        Err(_) => return Err("welcome: not JSON".into()),
    };
    rx.drain(..p.len);
    Ok(seq)
}

fn close_code(payload: &[u8]) -> String {
    if payload.len() >= 2 {
        format!("close {}", u16::from_be_bytes([payload[0], payload[1]]))
    } else {
        "close".into()
    }
}

fn err_kind(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "refused".into(),
        Some(libc::ECONNRESET) => "reset".into(),
        Some(libc::EADDRNOTAVAIL) => "no free source port (EADDRNOTAVAIL)".into(),
        Some(libc::EMFILE) | Some(libc::ENFILE) => "out of file descriptors".into(),
        Some(libc::ETIMEDOUT) => "timed out".into(),
        Some(libc::EPIPE) => "broken pipe".into(),
        _ => format!("{:?}", e.kind()),
    }
}

/// Sends a heartbeat `{"type":"ping"}` on every connected terminal of this thread whose turn it
/// is: terminal `slot` pings at ticks where `(slot + tick) % heartbeat_s == 0`, so a thread
/// spreads its pings over the period without a timer per terminal. Written straight to the
/// socket (a 20-byte frame, `MSG_DONTWAIT`); a full socket skips its turn.
pub fn heartbeat_tick(state: &RefCell<ExecState>, tick: u64) {
    let mut st = state.borrow_mut();
    let mut sent = 0;
    let mut frame = Vec::with_capacity(32);
    for (slot, u) in st.users.iter().enumerate() {
        let (Some(fd), hb) = (u.fd, u.heartbeat_s) else {
            continue;
        };
        if hb == 0 || u.writing {
            continue;
        }
        let phase = (slot as u64 + tick) % hb;
        if phase != 0 {
            continue;
        }
        frame.clear();
        wsframe::encode(&mut frame, wsframe::OP_TEXT, br#"{"type":"ping"}"#, Some(rand::random()));
        // SAFETY: fd is an open socket owned by a live terminal of this thread (cleared
        // before the terminal's stream is dropped); the buffer is valid for its length.
        let n = unsafe {
            libc::send(fd, frame.as_ptr() as *const libc::c_void, frame.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        };
        if n == frame.len() as isize {
            sent += 1;
        }
    }
    st.counters.heartbeats_sent += sent;
}

/// The connected life of a terminal; returns why it ended.
async fn serve(ctx: &TermCtx, slot: usize, global: u64, stream: &mut TcpStream, rx: &mut Vec<u8>) -> String {
    let mut out: Vec<u8> = Vec::new();
    let mut frag: Option<(u8, Vec<u8>)> = None;
    loop {
        let mut off = 0;
        let mut ended = None;
        loop {
            let p = match wsframe::parse(&mut rx[off..]) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => {
                    ended = Some(format!("bad frame: {e}"));
                    break;
                }
            };
            let payload = off + p.payload.start..off + p.payload.end;
            off += p.len;
            let (opcode, data): (u8, Cow<[u8]>) = match (p.opcode, p.fin) {
                (wsframe::OP_CONT, fin) => {
                    let Some((op, mut buf)) = frag.take() else {
                        ended = Some("bad frame: stray continuation".into());
                        break;
                    };
                    buf.extend_from_slice(&rx[payload]);
                    if !fin {
                        frag = Some((op, buf));
                        continue;
                    }
                    (op, Cow::Owned(buf))
                }
                (op, false) => {
                    frag = Some((op, rx[payload].to_vec()));
                    continue;
                }
                (op, true) => (op, Cow::Borrowed(&rx[payload])),
            };
            match opcode {
                wsframe::OP_TEXT => {
                    if let Some(r) = on_text(ctx, slot, global, &data) {
                        ended = Some(r);
                        break;
                    }
                }
                wsframe::OP_PING => {
                    wsframe::encode(&mut out, wsframe::OP_PONG, &data, Some(rand::random()));
                    ctx.state.borrow_mut().counters.pings_answered += 1;
                }
                wsframe::OP_CLOSE => {
                    ended = Some(close_code(&data));
                    break;
                }
                _ => {}
            }
        }
        rx.drain(..off);
        if rx.is_empty() {
            *rx = Vec::new();
        }
        // One cumulative ack for everything this read brought.
        {
            let mut st = ctx.state.borrow_mut();
            let u = &mut st.users[slot];
            let upto = u.seq.contiguous();
            if upto > u.acked {
                u.acked = upto;
                let ack = format!("{{\"type\":\"ack\",\"seq\":{upto}}}");
                wsframe::encode(&mut out, wsframe::OP_TEXT, ack.as_bytes(), Some(rand::random()));
                st.counters.acks_sent += 1;
            }
        }
        if !out.is_empty() {
            ctx.state.borrow_mut().users[slot].writing = true;
            let r = stream.write_all(&out).await;
            ctx.state.borrow_mut().users[slot].writing = false;
            if let Err(e) = r {
                return format!("write: {}", err_kind(&e));
            }
            out = Vec::new();
        }
        if let Some(r) = ended {
            return r;
        }
        match read_some(stream, rx).await {
            Ok(0) => return "closed by server".into(),
            Ok(_) => {}
            Err(e) => return format!("read: {}", err_kind(&e)),
        }
    }
}

/// Handles one text frame; `Some(reason)` ends the connection.
fn on_text(ctx: &TermCtx, slot: usize, global: u64, data: &[u8]) -> Option<String> {
    let mut st = ctx.state.borrow_mut();
    let f = match serde_json::from_slice::<InFrame>(data) {
        Ok(f) => f,
        Err(_) => {
            st.counters.bad_frames += 1;
            return None;
        }
    };
    match f.ty.as_ref() {
        "msg" => {
            let now = crate::unix_nanos();
            let Some(seq) = f.seq else {
                st.counters.bad_frames += 1;
                return None;
            };
            if f.chat.as_deref().is_some_and(|c| c.starts_with("g:")) {
                // Group streams are tracked by the group scenarios.
                st.counters.foreign += 1;
                return None;
            }
            let stamp = f
                .body
                .as_ref()
                .and_then(|b| b.text.as_deref())
                .and_then(Stamp::parse)
                .filter(|s| s.run == ctx.spec.run_id);
            let seen = st.users[slot].seq.observe(seq);
            let Some(stamp) = stamp else {
                st.counters.foreign += 1;
                return None;
            };
            match seen {
                Seen::Duplicate => st.counters.duplicates += 1,
                Seen::New | Seen::Reordered => {
                    if seen == Seen::Reordered {
                        st.counters.reordered += 1;
                    }
                    st.counters.received += 1;
                    st.users[slot].received += 1;
                    if ctx.spec.total > 0 && stamp.k % ctx.spec.total != global {
                        st.counters.misrouted += 1;
                    }
                    let lat = now.saturating_sub(stamp.t_ns);
                    st.msg_hist.record_nanos(lat);
                    st.interval_hist.record_nanos(lat);
                }
            }
            None
        }
        "error" => {
            st.counters.server_errors += 1;
            None
        }
        "kicked" => Some(format!("kicked: {}", f.reason.as_deref().unwrap_or("?"))),
        "reconnect" => Some("told to reconnect".into()),
        _ => {
            let _ = f.code;
            None
        }
    }
}
