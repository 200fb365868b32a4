//! One lean WebSocket terminal on glommio.
//!
//! Raw TCP (bound to a 127.0.0.x source address with `IP_BIND_ADDRESS_NO_PORT` when asked),
//! the upgrade written by hand, frames parsed from a per-thread 64 KiB scratch buffer: bytes
//! are copied into the terminal's own `Vec` only while a frame is incomplete or unprocessed,
//! and that `Vec` is freed when empty, so an idle terminal holds no read buffer. Client
//! frames are masked; pings are answered; messages are acked cumulatively by inbox `seq`.
//!
//! A terminal's task waits for either bytes from the server or frames queued for it by others
//! (the thread's heartbeat ticker, the chat driver, its own `sync` after a reconnect), so
//! every write to its socket is made by the terminal itself, whole frames only. What a
//! terminal does besides counting its inbox depends on the fleet's [`Role`]:
//! - `group`: counts the group stream of its group by group `seq` (loss, duplicates,
//!   reorders), keeps per message the latest arrival (publish to last member), and acks the
//!   group cumulatively at most every `group_ack_ms`, each terminal on its own phase of that
//!   period (a fleet acking in step would be a thundering herd no real fleet makes);
//! - `chat`: sends `send` frames to random peers when the chat driver says so (a window of
//!   unanswered sends per terminal), matches `sent` answers, tells a peer's messages from its
//!   own coming back (multi-device echo), counts a peer's message once by its sender and
//!   `cid` (the same message again under another inbox `seq` is a copy), and sends `read`
//!   every `read_every` messages;
//! - with `track_ids` (`reconnect`): keeps the id of every message received, and when told
//!   to, closes abruptly, comes back on the coordinator's order and `sync`s from its last
//!   acked seq, page by page, until `synced` says there is no more.
use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::io::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use futures_lite::{AsyncRead, AsyncWriteExt};
use glommio::net::TcpStream;
use glommio::sync::{Semaphore, StaticPermit};
use serde::{Deserialize, Serialize};

use crate::api::Stamp;
use crate::fleet::FleetSpec;
use crate::stats::{BitSet, Counters, Hist, Seen, SeqTracker};
use crate::tls::Conn;
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
    futures_lite::future::poll_fn(move |cx| poll_read_into(s, rx, cx))
}

fn poll_read_into<S: AsyncRead + Unpin>(
    s: &mut S,
    rx: &mut Vec<u8>,
    cx: &mut std::task::Context<'_>,
) -> Poll<io::Result<usize>> {
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

/// Makes the next close of `fd` a reset (SO_LINGER 0): the abrupt end of a terminal that
/// lost its network, no close frame, no FIN.
fn set_linger_zero(fd: std::os::fd::RawFd) {
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: valid fd, option value points to a linger of the given size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
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

/// What the terminals of a fleet do besides counting their inbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Count the inbox (`idle`, `unicast`, `batch`, `reconnect`).
    #[default]
    Inbox,
    /// Count the stream of the terminal's group.
    Group,
    /// Send to random peers, count what peers send.
    Chat,
}

/// The group stream of a `group` terminal.
#[derive(Debug, Default)]
pub struct GroupTrack {
    pub seq: SeqTracker,
    pub acked: u64,
    /// When this terminal may ack next (set at its first chance, at a phase of
    /// `group_ack_ms` of its own).
    pub next_ack: Option<Instant>,
}

/// A `send` waiting for its `sent`.
#[derive(Debug, Clone, Copy)]
pub struct PendingSend {
    pub n: u32,
    pub to: u64,
    pub t_ns: u64,
}

/// The sending side of a `chat` terminal.
#[derive(Debug, Default)]
pub struct ChatTrack {
    /// Next cid number.
    pub next: u32,
    pub pending: Vec<PendingSend>,
    /// Peer messages since the last `read`.
    pub since_read: u32,
    /// Peer messages received, as `sender << 32 | cid`: a message that comes again under
    /// another inbox `seq` (stored twice) is a copy; counted as one more received it would
    /// hide a lost message to this terminal (`lost` is accepted minus received).
    pub seen: HashSet<u64>,
}

/// What one terminal knows.
#[derive(Debug, Default)]
pub struct UserTrack {
    pub seq: SeqTracker,
    /// Distinct messages of this run received (the scenario's stream: inbox or group; for
    /// `chat`, the peers' messages).
    pub received: u32,
    /// The API's messages to this terminal (or its group) seen, by their number among those
    /// (`k / total`, `k / groups`): a message that comes again under another `seq` (stored
    /// twice) is a copy, not one more message received; counted as one it would hide a lost
    /// message of the same terminal (`lost` is accepted minus received).
    pub msgs: BitSet,
    /// Highest inbox seq acked.
    pub acked: u64,
    /// Heartbeat period the server asked for in its welcome (0 = none).
    pub heartbeat_s: u64,
    /// Welcomed and not closed.
    pub connected: bool,
    /// Frames queued for the terminal's task to write (heartbeats, sends, syncs).
    pub out: Vec<u8>,
    pub waker: Option<Waker>,
    /// Close abruptly at the next wake-up (the coordinator's `drop`).
    pub drop_req: bool,
    pub group: Option<Box<GroupTrack>>,
    pub chat: Option<Box<ChatTrack>>,
    /// Ids of the messages received, duplicates kept (`track_ids`).
    pub ids: Vec<u64>,
    /// A `sync` after a reconnect is under way.
    pub syncing: bool,
}

impl UserTrack {
    /// Queues a masked text frame for the terminal's task and wakes it.
    pub fn queue(&mut self, payload: &[u8]) {
        wsframe::encode(&mut self.out, wsframe::OP_TEXT, payload, Some(rand::random()));
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
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
    /// `chat`: send to sent.
    pub send_hist: Hist,
    pub send_errors: BTreeMap<String, u64>,
    /// `chat`: accepted sends per addressee (global terminal number).
    pub acked_to: Vec<u32>,
    /// `chat`: sending is on; with `chat_refill` every answer sends again (no rate).
    pub chat_active: bool,
    pub chat_refill: bool,
    pub chat_window: u32,
    /// `group`: per message `k`: members that got it, latest arrival (µs after publish).
    pub per_msg: HashMap<u64, (u32, u64)>,
    /// `reconnect`: Unix nanos of the reconnect order; reconnect to `synced`, per terminal.
    pub reconnect_ns: u64,
    pub sync_hist: Hist,
    /// The fleet is stopping: every terminal closes and its task ends (an executor that ends
    /// with tasks still pending leaks them, and their sockets with them).
    pub stopping: bool,
    /// Terminal tasks still running.
    pub tasks: u64,
    /// Orders of the fleet's log (`fleet::Control`) this thread has carried out: published
    /// with the counters, so the coordinator knows which orders they reflect.
    pub orders_applied: u64,
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
    pub spec: Arc<FleetSpec>,
    pub state: Rc<RefCell<ExecState>>,
    pub minter: Minter,
    pub host: String,
    /// Handshakes in flight (first connects and reconnects).
    pub connects: Rc<Semaphore>,
    /// The TLS connector and server name, with `--tls` (checked before the fleet starts).
    pub tls: Option<(futures_rustls::TlsConnector, rustls::pki_types::ServerName<'static>)>,
    /// Permits handed out by the reconnect order to the terminals that were dropped.
    pub rejoin: Rc<Semaphore>,
    /// Distinct messages received so far, for the publisher's window (`group` hot).
    pub live: Arc<AtomicU64>,
    /// This thread's index and the fleet's threads: slot `s` is terminal
    /// `spec.first + thread + s * threads`.
    pub thread: usize,
    pub threads: usize,
}

impl TermCtx {
    pub fn user(&self, global: u64) -> String {
        format!("{}{}", self.spec.user_prefix, global)
    }

    pub fn global(&self, slot: usize) -> u64 {
        self.spec.first + (self.thread + slot * self.threads) as u64
    }

    /// The group of terminal `global` (`group` role).
    pub fn group_of(&self, global: u64) -> u64 {
        global / self.spec.members.max(1)
    }
}

#[derive(Deserialize)]
struct InFrame<'a> {
    #[serde(rename = "type", borrow)]
    ty: Cow<'a, str>,
    #[serde(default)]
    inbox_seq: Option<u64>,
    #[serde(default)]
    heartbeat_s: Option<u64>,
    #[serde(default)]
    more: Option<bool>,
    #[serde(default, borrow)]
    cid: Option<Cow<'a, str>>,
    #[serde(default, borrow, rename = "ref")]
    reference: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    reason: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    code: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    groups: Option<BTreeMap<Cow<'a, str>, u64>>,
}

/// The fields of a `msg` frame a terminal counts by, found without a full JSON parse (group
/// fan-out brings hundreds of thousands a second). Ids and user names have no escapes; a
/// body text with escapes is cut short, fails the stamp check, and counts as foreign.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsgView<'a> {
    pub id: u64,
    /// The sender's `cid` (terminal sends), between `id` and `chat` when there is one.
    pub cid: Option<&'a str>,
    pub chat: &'a str,
    pub from: &'a str,
    pub seq: u64,
    pub text: Option<&'a str>,
}

fn str_field<'a>(d: &'a [u8], key: &[u8]) -> Option<&'a str> {
    let at = memchr::memmem::find(d, key)? + key.len();
    let end = at + memchr::memchr(b'"', &d[at..])?;
    std::str::from_utf8(&d[at..end]).ok()
}

fn num_field(d: &[u8], key: &[u8]) -> Option<u64> {
    let at = memchr::memmem::find(d, key)? + key.len();
    let digits = d[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&d[at..at + digits]).ok()?.parse().ok()
}

/// Scans a `msg` frame (the payload starts with `{"type":"msg"`).
pub fn scan_msg(d: &[u8]) -> Option<MsgView<'_>> {
    // Keys are searched in the frame's own order (id, cid, chat, from, seq before the body),
    // so a key inside a custom body never shadows the real one.
    let chat_at = memchr::memmem::find(d, b"\"chat\":\"")?;
    Some(MsgView {
        id: str_field(d, b"\"id\":\"")?.parse().ok()?,
        cid: str_field(&d[..chat_at], b"\"cid\":\""),
        chat: str_field(d, b"\"chat\":\"")?,
        from: str_field(d, b"\"from\":\"")?,
        seq: num_field(d, b"\"seq\":")?,
        text: str_field(d, b"\"text\":\""),
    })
}

/// Why a terminal's connection ended.
enum Ended {
    /// Closed by the server or broken: counted as a drop.
    Lost(String),
    /// The coordinator said to drop it.
    Told,
    /// The fleet is stopping.
    Stopped,
}

/// Counts a terminal task while it lives.
struct TaskGuard(Rc<RefCell<ExecState>>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if let Ok(mut st) = self.0.try_borrow_mut() {
            st.tasks -= 1;
        }
    }
}

/// Tells every terminal of the thread to close and end its task.
pub fn stop_all(ctx: &TermCtx) {
    let mut st = ctx.state.borrow_mut();
    st.stopping = true;
    for u in &mut st.users {
        if let Some(w) = u.waker.take() {
            w.wake();
        }
    }
    drop(st);
    ctx.connects.close();
    ctx.rejoin.close();
}

/// Runs terminal `global` (slot `slot` of this thread) until its connection ends or the
/// fleet stops. `permit` bounds the connects in flight and is released at the welcome. A
/// terminal dropped on order waits for the reconnect order, connects again and syncs.
pub async fn run(ctx: Rc<TermCtx>, slot: usize, global: u64, permit: StaticPermit) {
    ctx.state.borrow_mut().tasks += 1;
    let _guard = TaskGuard(ctx.state.clone());
    let mut permit = Some(permit);
    let mut again = false;
    loop {
        let t0 = Instant::now();
        if !again {
            let mut st = ctx.state.borrow_mut();
            st.counters.attempted += 1;
            if st.counters.first_attempt_ns == 0 {
                st.counters.first_attempt_ns = crate::unix_nanos();
            }
        }
        if ctx.state.borrow().stopping {
            return;
        }
        let timeout = Duration::from_millis(ctx.spec.connect_timeout_ms.max(1));
        let stage = std::cell::Cell::new("connect");
        let hs = glommio::timer::timeout(timeout, async { Ok(handshake(&ctx, global, &stage).await) }).await;
        let connected = match hs {
            Ok(Ok((stream, mut rx))) => take_welcome(&mut rx).map(|w| (stream, rx, w)),
            Ok(Err(reason)) => Err(reason),
            Err(_) => Err(format!("timeout waiting for {}", stage.get())),
        };
        let (mut stream, mut rx, welcome) = match connected {
            Ok(v) => v,
            Err(reason) => {
                let mut st = ctx.state.borrow_mut();
                if again {
                    st.counters.reconnect_failed += 1;
                    *st.failures.entry(format!("reconnect: {reason}")).or_default() += 1;
                } else {
                    st.fail(reason);
                }
                return;
            }
        };
        {
            let mut st = ctx.state.borrow_mut();
            let st = &mut *st;
            let now = crate::unix_nanos();
            if again {
                st.counters.reconnected += 1;
            } else {
                st.counters.welcomed += 1;
                st.settled += 1;
                st.counters.last_welcome_ns = now;
                st.connect_hist.record_us(t0.elapsed().as_micros() as u64);
            }
            let u = &mut st.users[slot];
            if !again {
                u.seq = SeqTracker::starting_at(welcome.inbox_seq);
                u.acked = welcome.inbox_seq;
                if ctx.spec.role == Role::Group {
                    let head = welcome.group_head.unwrap_or(0);
                    u.group =
                        Some(Box::new(GroupTrack { seq: SeqTracker::starting_at(head), acked: head, next_ack: None }));
                }
            }
            u.heartbeat_s = welcome.heartbeat_s;
            u.connected = true;
            u.drop_req = false;
            if again {
                // Everything after the last position this terminal acked.
                let frame = format!("{{\"type\":\"sync\",\"inbox_seq\":{}}}", u.acked);
                u.queue(frame.as_bytes());
                u.syncing = true;
                st.counters.syncs_sent += 1;
            } else if st.chat_active && st.chat_refill {
                // Chat already running (a slow connect): fill this terminal's window too.
                for _ in 0..st.chat_window {
                    queue_send(st, &ctx, slot, global);
                }
            }
        }
        drop(permit.take());
        let ended = serve(&ctx, slot, global, &mut stream, &mut rx).await;
        {
            let mut st = ctx.state.borrow_mut();
            let u = &mut st.users[slot];
            u.connected = false;
            u.waker = None;
            u.out = Vec::new();
            u.syncing = false;
            if let Some(c) = u.chat.as_mut() {
                c.pending.clear();
            }
        }
        match ended {
            Ended::Lost(reason) => {
                ctx.state.borrow_mut().drop_conn(reason);
                return;
            }
            Ended::Stopped => return,
            Ended::Told => {
                set_linger_zero(stream.as_raw_fd());
                drop(stream);
                drop(rx);
                ctx.state.borrow_mut().counters.dropped_on_purpose += 1;
                if ctx.rejoin.acquire(1).await.is_err() {
                    return;
                }
                match ctx.connects.acquire_static_permit(1).await {
                    Ok(p) => permit = Some(p),
                    Err(_) => return,
                }
                again = true;
            }
        }
    }
}

/// Connects, upgrades, and reads until the first complete frame is in the returned buffer.
async fn handshake(
    ctx: &TermCtx,
    global: u64,
    stage: &std::cell::Cell<&'static str>,
) -> Result<(Conn, Vec<u8>), String> {
    let spec = &ctx.spec;
    let tcp = connect(spec.client_for(global), source_ip(global, spec.source_ips))
        .map_err(|e| format!("connect: {}", err_kind(&e)))?;
    let mut stream = match &ctx.tls {
        None => Conn::Plain(tcp),
        Some((connector, name)) => {
            stage.set("the TLS handshake");
            let tls = connector.connect(name.clone(), tcp).await.map_err(|e| format!("tls: {e}"))?;
            stage.set("connect");
            Conn::Tls(Box::new(tls))
        }
    };
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

/// What a welcome says.
struct Welcome {
    inbox_seq: u64,
    heartbeat_s: u64,
    /// The head of the first group listed (a `group` terminal is in one group).
    group_head: Option<u64>,
}

/// Removes the welcome frame from the start of `rx`.
fn take_welcome(rx: &mut Vec<u8>) -> Result<Welcome, String> {
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
    let w = match serde_json::from_slice::<InFrame>(&rx[p.payload.clone()]) {
        Ok(f) if f.ty == "welcome" => Welcome {
            inbox_seq: f.inbox_seq.unwrap_or(0),
            heartbeat_s: f.heartbeat_s.unwrap_or(0),
            group_head: f.groups.as_ref().and_then(|g| g.values().next().copied()),
        },
        Ok(f) => return Err(format!("first frame is {:?}, not welcome", f.ty)),
        Err(_) => return Err("welcome: not JSON".into()),
    };
    rx.drain(..p.len);
    Ok(w)
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

/// Once a second on every thread: queues a heartbeat `{"type":"ping"}` for every connected
/// terminal whose turn it is (terminal `slot` pings at ticks where
/// `(slot + tick) % heartbeat_s == 0`, so a thread spreads its pings over the period without
/// a timer per terminal), and the group acks that came due (the last messages of a group
/// are acked this way when no more arrive).
pub fn heartbeat_tick(ctx: &TermCtx, tick: u64) {
    let mut st = ctx.state.borrow_mut();
    let st = &mut *st;
    let mut sent = 0;
    let mut acks = 0;
    for slot in 0..st.users.len() {
        let u = &mut st.users[slot];
        if !u.connected {
            continue;
        }
        // Terminal `slot` pings when `(slot + tick) % heartbeat_s` comes round to 0.
        let turn = if u.heartbeat_s > 0 { (slot as u64 + tick) % u.heartbeat_s } else { 1 };
        if turn == 0 {
            u.queue(br#"{"type":"ping"}"#);
            sent += 1;
        }
        if group_ack(ctx, ctx.global(slot), u) {
            acks += 1;
        }
    }
    st.counters.heartbeats_sent += sent;
    st.counters.group_acks_sent += acks;
}

/// Queues a cumulative group ack when the group advanced and the terminal's ack is due;
/// returns whether one was queued. A terminal's first ack is due at its own phase of the
/// period (`global` spread over it), then every `group_ack_ms`: the group's members ack at
/// different instants instead of all on the same message or tick.
fn group_ack(ctx: &TermCtx, global: u64, u: &mut UserTrack) -> bool {
    let Some(g) = u.group.as_mut() else {
        return false;
    };
    let upto = g.seq.contiguous();
    if upto <= g.acked {
        return false;
    }
    let every = Duration::from_millis(ctx.spec.group_ack_ms);
    let now = Instant::now();
    let due = *g.next_ack.get_or_insert_with(|| now + every.mul_f64(ack_phase(global)));
    if now < due {
        return false;
    }
    g.acked = upto;
    g.next_ack = Some(now + every);
    let frame =
        format!("{{\"type\":\"ack\",\"group\":\"{}{}\",\"seq\":{upto}}}", ctx.spec.group_prefix, ctx.group_of(global));
    u.queue(frame.as_bytes());
    true
}

/// Terminal `global`'s phase in [0, 1): consecutive terminals land far apart (Fibonacci
/// hashing), so any share of a fleet is spread evenly over the period.
fn ack_phase(global: u64) -> f64 {
    (global.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64 / (1u64 << 53) as f64
}

/// Queues a `send` to a random other terminal of the run on terminal `slot`; false when the
/// run has no other terminal.
pub fn queue_send(st: &mut ExecState, ctx: &TermCtx, slot: usize, global: u64) -> bool {
    let total = ctx.spec.total;
    if total < 2 {
        return false;
    }
    let mut peer = rand::random::<u64>() % (total - 1);
    if peer >= global {
        peer += 1;
    }
    let t_ns = crate::unix_nanos();
    let u = &mut st.users[slot];
    let chat = u.chat.get_or_insert_with(Box::default);
    let n = chat.next;
    chat.next = chat.next.wrapping_add(1);
    chat.pending.push(PendingSend { n, to: peer, t_ns });
    let mut payload = Vec::with_capacity(160);
    let _ = write!(
        payload,
        "{{\"type\":\"send\",\"cid\":\"{n}\",\"to\":\"{}{peer}\",\"kind\":\"text\",\"body\":{{\"text\":\"",
        ctx.spec.user_prefix
    );
    Stamp { t_ns, k: peer, run: &ctx.spec.run_id }.write(&mut payload);
    payload.extend_from_slice(b"\"}}");
    u.queue(&payload);
    st.counters.sends += 1;
    true
}

/// What woke a waiting terminal.
enum Wake {
    Read,
    Write,
    Drop,
    Stop,
    Closed,
    Error(io::Error),
}

/// The connected life of a terminal; returns why it ended.
async fn serve(ctx: &TermCtx, slot: usize, global: u64, stream: &mut Conn, rx: &mut Vec<u8>) -> Ended {
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
        // One cumulative ack for everything this read brought, and what others queued.
        {
            let mut st = ctx.state.borrow_mut();
            let st = &mut *st;
            let u = &mut st.users[slot];
            let upto = u.seq.contiguous();
            if upto > u.acked {
                u.acked = upto;
                let ack = format!("{{\"type\":\"ack\",\"seq\":{upto}}}");
                wsframe::encode(&mut out, wsframe::OP_TEXT, ack.as_bytes(), Some(rand::random()));
                st.counters.acks_sent += 1;
            }
            if group_ack(ctx, global, u) {
                st.counters.group_acks_sent += 1;
            }
            if !u.out.is_empty() {
                if out.is_empty() {
                    std::mem::swap(&mut out, &mut u.out);
                } else {
                    out.append(&mut u.out);
                }
            }
            ctx.live.store(st.counters.received, Ordering::Relaxed);
        }
        if !out.is_empty() {
            if let Err(e) = stream.write_all(&out).await {
                return Ended::Lost(format!("write: {}", err_kind(&e)));
            }
            // Idle terminals hold no write buffer either.
            out = Vec::new();
        }
        if let Some(r) = ended {
            return Ended::Lost(r);
        }
        let woke = futures_lite::future::poll_fn(|cx| {
            {
                let st = ctx.state.borrow();
                if st.stopping {
                    return Poll::Ready(Wake::Stop);
                }
                if st.users[slot].drop_req {
                    return Poll::Ready(Wake::Drop);
                }
            }
            match poll_read_into(stream, rx, cx) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Wake::Closed),
                Poll::Ready(Ok(_)) => return Poll::Ready(Wake::Read),
                Poll::Ready(Err(e)) => return Poll::Ready(Wake::Error(e)),
                Poll::Pending => {}
            }
            let mut st = ctx.state.borrow_mut();
            let u = &mut st.users[slot];
            if !u.out.is_empty() {
                return Poll::Ready(Wake::Write);
            }
            if !u.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                u.waker = Some(cx.waker().clone());
            }
            Poll::Pending
        })
        .await;
        match woke {
            Wake::Read | Wake::Write => {}
            Wake::Drop => return Ended::Told,
            Wake::Stop => return Ended::Stopped,
            Wake::Closed => return Ended::Lost("closed by server".into()),
            Wake::Error(e) => return Ended::Lost(format!("read: {}", err_kind(&e))),
        }
    }
}

/// Handles one text frame; `Some(reason)` ends the connection.
fn on_text(ctx: &TermCtx, slot: usize, global: u64, data: &[u8]) -> Option<String> {
    if data.starts_with(br#"{"type":"msg""#) {
        on_msg(ctx, slot, global, data);
        return None;
    }
    let mut st = ctx.state.borrow_mut();
    let st = &mut *st;
    let f = match serde_json::from_slice::<InFrame>(data) {
        Ok(f) => f,
        Err(_) => {
            st.counters.bad_frames += 1;
            return None;
        }
    };
    match f.ty.as_ref() {
        "sent" => {
            let now = crate::unix_nanos();
            let n = f.cid.as_deref().and_then(|c| c.parse::<u32>().ok());
            let done = n.and_then(|n| take_pending(&mut st.users[slot], n));
            match done {
                Some(p) => {
                    st.counters.sends_answered += 1;
                    if let Some(a) = st.acked_to.get_mut(p.to as usize) {
                        *a += 1;
                    }
                    st.send_hist.record_nanos(now.saturating_sub(p.t_ns));
                    refill(st, ctx, slot, global);
                }
                None => st.counters.foreign += 1,
            }
        }
        "error" => {
            let n = f.reference.as_deref().and_then(|c| c.parse::<u32>().ok());
            let code = f.code.as_deref().unwrap_or("?").to_owned();
            match n.and_then(|n| take_pending(&mut st.users[slot], n)) {
                Some(_) => {
                    st.counters.send_errors += 1;
                    *st.send_errors.entry(code).or_default() += 1;
                    refill(st, ctx, slot, global);
                }
                None => {
                    st.counters.server_errors += 1;
                    *st.send_errors.entry(format!("frame error {code}")).or_default() += 1;
                }
            }
        }
        "synced" => {
            let u = &mut st.users[slot];
            if u.syncing {
                if f.more == Some(true) {
                    let frame = format!("{{\"type\":\"sync\",\"inbox_seq\":{}}}", u.seq.contiguous());
                    u.queue(frame.as_bytes());
                    st.counters.syncs_sent += 1;
                } else {
                    u.syncing = false;
                    let now = crate::unix_nanos();
                    st.counters.synced += 1;
                    st.counters.last_synced_ns = st.counters.last_synced_ns.max(now);
                    if st.reconnect_ns > 0 {
                        st.sync_hist.record_nanos(now.saturating_sub(st.reconnect_ns));
                    }
                }
            }
        }
        "receipt" => st.counters.receipts += 1,
        "read_sync" => st.counters.read_syncs += 1,
        "kicked" => return Some(format!("kicked: {}", f.reason.as_deref().unwrap_or("?"))),
        "reconnect" => return Some("told to reconnect".into()),
        _ => {}
    }
    None
}

fn take_pending(u: &mut UserTrack, n: u32) -> Option<PendingSend> {
    let c = u.chat.as_mut()?;
    let i = c.pending.iter().position(|p| p.n == n)?;
    Some(c.pending.swap_remove(i))
}

/// Without a rate, a terminal sends again as soon as a send is answered.
fn refill(st: &mut ExecState, ctx: &TermCtx, slot: usize, global: u64) {
    if st.chat_active && st.chat_refill {
        let pending = st.users[slot].chat.as_ref().map_or(0, |c| c.pending.len());
        if pending < st.chat_window as usize {
            queue_send(st, ctx, slot, global);
        }
    }
}

/// Counts one `msg` frame.
fn on_msg(ctx: &TermCtx, slot: usize, global: u64, data: &[u8]) {
    let now = crate::unix_nanos();
    let mut st = ctx.state.borrow_mut();
    let st = &mut *st;
    let Some(m) = scan_msg(data) else {
        st.counters.bad_frames += 1;
        return;
    };
    let stamp = m.text.and_then(Stamp::parse).filter(|s| s.run == ctx.spec.run_id);
    if let Some(chat) = m.chat.strip_prefix("g:") {
        let u = &mut st.users[slot];
        let (Some(g), Some(stamp)) = (u.group.as_mut(), stamp) else {
            st.counters.foreign += 1;
            return;
        };
        let my_group = ctx.group_of(global);
        let ours = chat.strip_prefix(ctx.spec.group_prefix.as_str()).and_then(|n| n.parse::<u64>().ok());
        if ours != Some(my_group) {
            st.counters.misrouted += 1;
            return;
        }
        match g.seq.observe(m.seq) {
            Seen::Duplicate => st.counters.duplicates += 1,
            seen => {
                let groups = ctx.spec.groups;
                if groups > 0 && stamp.k % groups == my_group && !u.msgs.insert(stamp.k / groups) {
                    // The same message again under a new group seq: a copy.
                    st.counters.duplicates += 1;
                    return;
                }
                if seen == Seen::Reordered {
                    st.counters.reordered += 1;
                }
                u.received += 1;
                st.counters.received += 1;
                st.counters.note_recv(now);
                if ctx.spec.groups > 0 && stamp.k % ctx.spec.groups != my_group {
                    st.counters.misrouted += 1;
                }
                let lat = now.saturating_sub(stamp.t_ns);
                st.msg_hist.record_nanos(lat);
                st.interval_hist.record_nanos(lat);
                let e = st.per_msg.entry(stamp.k).or_default();
                e.0 += 1;
                e.1 = e.1.max(lat / 1000);
            }
        }
        return;
    }
    let u = &mut st.users[slot];
    let seen = u.seq.observe(m.seq);
    if ctx.spec.track_ids {
        u.ids.push(m.id);
    }
    let Some(stamp) = stamp else {
        st.counters.foreign += 1;
        return;
    };
    if ctx.spec.role == Role::Chat {
        let own = m.from.strip_prefix(ctx.spec.user_prefix.as_str()).and_then(|n| n.parse::<u64>().ok());
        if own == Some(global) {
            // One's own message on one's own inbox: the multi-device copy.
            if seen != Seen::Duplicate {
                st.counters.echoes += 1;
            }
            return;
        }
        let key = own.zip(m.cid.and_then(|c| c.parse::<u32>().ok())).map(|(from, n)| from << 32 | u64::from(n));
        if let (Some(key), true) = (key, seen != Seen::Duplicate) {
            if !u.chat.get_or_insert_with(Box::default).seen.insert(key) {
                // The same send again under a new inbox seq: a copy.
                st.counters.duplicates += 1;
                return;
            }
        }
    }
    match seen {
        Seen::Duplicate => st.counters.duplicates += 1,
        Seen::New | Seen::Reordered => {
            let total = ctx.spec.total;
            let to_me = if ctx.spec.role == Role::Chat { stamp.k == global } else { stamp.k % total.max(1) == global };
            if ctx.spec.role != Role::Chat && total > 0 && to_me && !u.msgs.insert(stamp.k / total) {
                // The same API message again under a new inbox seq: a copy.
                st.counters.duplicates += 1;
                return;
            }
            if seen == Seen::Reordered {
                st.counters.reordered += 1;
            }
            st.counters.received += 1;
            st.counters.note_recv(now);
            u.received += 1;
            if total > 0 && !to_me {
                st.counters.misrouted += 1;
            }
            let lat = now.saturating_sub(stamp.t_ns);
            st.msg_hist.record_nanos(lat);
            st.interval_hist.record_nanos(lat);
            if ctx.spec.role == Role::Chat && ctx.spec.read_every > 0 {
                let c = u.chat.get_or_insert_with(Box::default);
                c.since_read += 1;
                if c.since_read >= ctx.spec.read_every {
                    c.since_read = 0;
                    let frame = format!("{{\"type\":\"read\",\"chat\":\"{}\",\"seq\":{}}}", m.chat, m.seq);
                    u.queue(frame.as_bytes());
                    st.counters.reads_sent += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msg_frames_scan_like_json() {
        let f = br#"{"type":"msg","id":"123","cid":"c9","chat":"g:lt1g0","from":"lt1u4","seq":17,"kind":"text","body":{"text":"t=5;k=2;r=ab"},"ts":9}"#;
        let m = scan_msg(f).unwrap();
        assert_eq!(
            m,
            MsgView { id: 123, cid: Some("c9"), chat: "g:lt1g0", from: "lt1u4", seq: 17, text: Some("t=5;k=2;r=ab") }
        );
        // A custom body with keys of the same names does not shadow the frame's own.
        let f = br#"{"type":"msg","id":"1","chat":"u:a","from":"a","seq":2,"kind":"custom","body":{"data":{"seq":99,"id":"7"}},"ts":9}"#;
        let m = scan_msg(f).unwrap();
        assert_eq!((m.id, m.cid, m.seq, m.text), (1, None, 2, None));
        assert!(scan_msg(br#"{"type":"msg","chat":"u:a"}"#).is_none());
    }

    fn ctx(role: Role, total: u64, members: u64, groups: u64) -> TermCtx {
        let spec = FleetSpec {
            user_prefix: "lt1u".into(),
            run_id: "r1".into(),
            max_inflight: 1,
            role,
            group_prefix: "lt1g".into(),
            members,
            groups,
            group_ack_ms: 1000,
            ..FleetSpec::for_tests(total)
        };
        let mut users: Vec<UserTrack> = (0..total).map(|_| UserTrack::default()).collect();
        if role == Role::Group {
            for u in &mut users {
                u.group = Some(Box::default());
            }
        }
        TermCtx {
            minter: Minter::new("s", 60),
            host: "h".into(),
            spec: Arc::new(spec),
            state: Rc::new(RefCell::new(ExecState { users, ..Default::default() })),
            connects: Rc::new(Semaphore::new(1)),
            tls: None,
            rejoin: Rc::new(Semaphore::new(0)),
            live: Arc::default(),
            thread: 0,
            threads: 1,
        }
    }

    fn msg(chat: &str, seq: u64, k: u64) -> Vec<u8> {
        format!(
            r#"{{"type":"msg","id":"{seq}","chat":"{chat}","from":"src","seq":{seq},"kind":"text","body":{{"text":"t=1;k={k};r=r1"}},"ts":1}}"#
        )
        .into_bytes()
    }

    /// Two messages accepted for terminal 1 (k = 1 and 3 of 2 terminals); the node delivers
    /// the first twice under two seqs and never the second: one received, one copy, so the
    /// lost one shows (accepted 2, received 1) instead of the copy making up for it.
    #[test]
    fn a_message_again_under_a_new_seq_is_a_copy_not_a_second_receipt() {
        let c = ctx(Role::Inbox, 2, 0, 0);
        on_msg(&c, 1, 1, &msg("u:lt1u1", 1, 1));
        on_msg(&c, 1, 1, &msg("u:lt1u1", 2, 1));
        on_msg(&c, 1, 1, &msg("u:lt1u1", 2, 1));
        let st = c.state.borrow();
        assert_eq!(st.users[1].received, 1);
        assert_eq!((st.counters.received, st.counters.duplicates, st.counters.misrouted), (1, 2, 0));
        assert_eq!(st.users[1].seq.contiguous(), 2, "both seqs are acked");
        drop(st);
        // A group member: message k = 0 of group 0 twice under two group seqs.
        let c = ctx(Role::Group, 2, 2, 1);
        on_msg(&c, 0, 0, &msg("g:lt1g0", 1, 0));
        on_msg(&c, 0, 0, &msg("g:lt1g0", 2, 0));
        on_msg(&c, 0, 0, &msg("g:lt1g0", 3, 1));
        let st = c.state.borrow();
        assert_eq!(st.users[0].received, 2);
        assert_eq!((st.counters.received, st.counters.duplicates), (2, 1));
        assert_eq!(st.per_msg.get(&0).map(|e| e.0), Some(1), "the copy is no second member");
    }

    /// Chat: terminal 0 sends cid 5 to terminal 1 (accepted once); the node delivers it twice
    /// under two inbox seqs and loses terminal 2's message to terminal 1 (cid 8): one peer
    /// message received, one copy, so the lost one shows instead of the copy making up for it.
    #[test]
    fn a_chat_message_again_under_a_new_seq_is_a_copy_not_a_second_receipt() {
        let c = ctx(Role::Chat, 3, 0, 0);
        let chat = |from: u64, cid: u32, seq: u64| {
            format!(
                r#"{{"type":"msg","id":"{seq}","cid":"{cid}","chat":"u:lt1u{from}","from":"lt1u{from}","seq":{seq},"kind":"text","body":{{"text":"t=1;k=1;r=r1"}},"ts":1}}"#
            )
            .into_bytes()
        };
        on_msg(&c, 1, 1, &chat(0, 5, 1));
        on_msg(&c, 1, 1, &chat(0, 5, 2));
        // The same cid from another sender is another message.
        on_msg(&c, 1, 1, &chat(2, 5, 3));
        let st = c.state.borrow();
        assert_eq!(st.users[1].received, 2);
        assert_eq!((st.counters.received, st.counters.duplicates, st.counters.misrouted), (2, 1, 0));
        assert_eq!(st.users[1].seq.contiguous(), 3, "every seq is acked");
    }

    #[test]
    fn source_ips_spread_over_loopback() {
        assert_eq!(source_ip(0, 0), None);
        assert_eq!(source_ip(0, 3), Some(Ipv4Addr::new(127, 0, 0, 1)));
        assert_eq!(source_ip(5, 3), Some(Ipv4Addr::new(127, 0, 0, 3)));
    }

    #[test]
    fn ack_phases_spread_any_run_of_terminals_over_the_period() {
        // 1,000 consecutive terminals (any offset) into 10 slices of the period: each slice
        // holds close to a tenth, none is empty or crowded.
        for first in [0u64, 1, 12_345] {
            let mut slices = [0u32; 10];
            for g in first..first + 1000 {
                let p = ack_phase(g);
                assert!((0.0..1.0).contains(&p), "{p}");
                slices[(p * 10.0) as usize] += 1;
            }
            assert!(slices.iter().all(|&n| (80..=120).contains(&n)), "{slices:?}");
        }
    }
}
