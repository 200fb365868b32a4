//! The wire-limit server: the least a server can do for a scenario, as a ceiling for this
//! machine. It runs as its own process (`ether-loadtest wire-server`, so its sockets, RSS and
//! CPU are counted like the engine's), accepts WebSocket upgrades (routing by the token's
//! `sub`, unverified), writes a welcome, and serves `POST /v1/messages` and
//! `/v1/messages/batch` by writing one pre-encoded frame per message to the addressee's
//! socket: no storage, no auth, no acks kept. Groups: `POST /v1/groups` (members kept in
//! memory), `POST /v1/groups/{gid}/members`, and `POST /v1/groups/{gid}/messages`, which
//! encodes the frame once and appends the same bytes to every connected member's queue.
//! Terminals may `send` (answered by `sent`, delivered to the peer and echoed to the sender,
//! like the engine's multi-device copy) and `read` (a `receipt` to the peer). No `sync`:
//! nothing is stored. One executor thread; idle runs beyond one process's descriptors use
//! several processes on the same ports (`SO_REUSEPORT`).
use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::{self, BufRead, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::rc::Rc;
use std::task::{Poll, Waker};

use futures_lite::AsyncWriteExt;
use glommio::net::{TcpListener, TcpStream};
use glommio::{LocalExecutorBuilder, Placement};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::terminal::read_some;
use crate::wsframe;

/// The bound addresses, printed by the server process as one JSON line.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct WireAddrs {
    pub client: SocketAddr,
    pub api: SocketAddr,
}

/// The secret the wire-limit server's tokens are (not) checked with.
pub const WIRE_SECRET: &str = "wire-limit";

#[derive(Default)]
struct Hub {
    users: RefCell<HashMap<String, Rc<Conn>>>,
    groups: RefCell<HashMap<String, WireGroup>>,
    next_id: Cell<u64>,
    sessions: Cell<u64>,
    heartbeat_s: u64,
    /// Heartbeat `ping` frames received from terminals (answered with `pong`).
    pings: Cell<u64>,
}

#[derive(Default)]
struct WireGroup {
    members: Vec<String>,
    seq: u64,
}

#[derive(Default)]
struct Conn {
    out: RefCell<Vec<u8>>,
    waker: RefCell<Option<Waker>>,
    seq: Cell<u64>,
    closed: Cell<bool>,
}

impl Conn {
    fn push(&self, f: impl FnOnce(&mut Vec<u8>)) {
        f(&mut self.out.borrow_mut());
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    fn close(&self) {
        self.closed.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }
}

/// Entry of `ether-loadtest wire-server`: binds, prints the addresses, serves until stdin
/// closes (so it never outlives the tool).
pub fn server_main(client: SocketAddr, api: SocketAddr, pin: Option<usize>, heartbeat_s: u64) -> io::Result<()> {
    crate::procstat::raise_nofile_limit();
    let (tx, rx) = std::sync::mpsc::channel::<io::Result<WireAddrs>>();
    let placement = match pin {
        Some(p) => Placement::Fixed(p),
        None => Placement::Unbound,
    };
    let _handle = LocalExecutorBuilder::new(placement)
        .name("wire-limit")
        .io_memory(256 << 10)
        .ring_depth(crate::RING_DEPTH)
        .spawn(move || async move {
            let bound = (|| {
                let c = TcpListener::bind(client)?;
                let a = TcpListener::bind(api)?;
                Ok::<_, glommio::GlommioError<()>>((c, a))
            })();
            let (cl, al) = match bound {
                Ok(v) => v,
                Err(e) => {
                    let _ = tx.send(Err(io::Error::other(e.to_string())));
                    return;
                }
            };
            let addrs = match (cl.local_addr(), al.local_addr()) {
                (Ok(client), Ok(api)) => WireAddrs { client, api },
                _ => {
                    let _ = tx.send(Err(io::Error::other("no local address")));
                    return;
                }
            };
            let _ = tx.send(Ok(addrs));
            serve(cl, al, heartbeat_s).await;
        })
        .map_err(|e| io::Error::other(e.to_string()))?;
    let addrs = rx.recv().map_err(|_| io::Error::other("wire-limit executor died"))??;
    let mut out = io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string(&addrs).unwrap_or_default())?;
    out.flush()?;
    drop(out);
    // Serve until the parent closes our stdin.
    let mut sink = String::new();
    let stdin = io::stdin();
    while stdin.lock().read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
        sink.clear();
    }
    std::process::exit(0);
}

async fn serve(clients: TcpListener, api: TcpListener, heartbeat_s: u64) {
    let hub = Rc::new(Hub { heartbeat_s, ..Default::default() });
    let h2 = hub.clone();
    glommio::spawn_local(async move {
        loop {
            match api.accept().await {
                Ok(s) => {
                    glommio::spawn_local(api_conn(h2.clone(), s)).detach();
                }
                Err(_) => glommio::timer::sleep(std::time::Duration::from_millis(10)).await,
            }
        }
    })
    .detach();
    loop {
        match clients.accept().await {
            Ok(s) => {
                glommio::spawn_local(ws_conn(hub.clone(), s)).detach();
            }
            // Out of descriptors and the like: back off, the client will see its timeout.
            Err(_) => glommio::timer::sleep(std::time::Duration::from_millis(10)).await,
        }
    }
}

async fn ws_conn(hub: Rc<Hub>, mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut rx = Vec::new();
    let up = loop {
        match read_some(&mut stream, &mut rx).await {
            Ok(n) if n > 0 => {}
            _ => return,
        }
        match wsframe::parse_request(&rx) {
            Ok(Some(up)) => break up,
            Ok(None) if rx.len() < 16 * 1024 => continue,
            _ => {
                let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n").await;
                return;
            }
        }
    };
    rx.drain(..up.len);
    let user = wsframe::query_param(&up.path, "token").and_then(crate::token::unverified_sub);
    let Some(user) = user else {
        let _ = stream.write_all(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n").await;
        return;
    };
    let device = wsframe::query_param(&up.path, "device").unwrap_or("d");
    let session = hub.sessions.get() + 1;
    hub.sessions.set(session);
    let mut hello = wsframe::server_response(&up.key);
    let welcome = format!(
        "{{\"type\":\"welcome\",\"user\":\"{user}\",\"device\":\"{device}\",\"session\":\"w{session}\",\"heartbeat_s\":{},\"inbox_seq\":0,\"groups\":{{}}}}",
        hub.heartbeat_s
    );
    wsframe::encode(&mut hello, wsframe::OP_TEXT, welcome.as_bytes(), None);
    if stream.write_all(&hello).await.is_err() {
        return;
    }
    drop(hello);
    let conn = Rc::new(Conn::default());
    hub.users.borrow_mut().insert(user.clone(), conn.clone());
    let fd = stream.as_raw_fd();
    let (mut rd, wr) = futures_lite::io::split(stream);
    glommio::spawn_local(writer(conn.clone(), fd, wr)).detach();
    'read: loop {
        let mut off = 0;
        loop {
            match wsframe::parse(&mut rx[off..]) {
                Ok(Some(p)) => {
                    let payload = off + p.payload.start..off + p.payload.end;
                    off += p.len;
                    let text = &rx[payload.clone()];
                    match p.opcode {
                        wsframe::OP_PING => {
                            let data = rx[payload].to_vec();
                            conn.push(|o| wsframe::encode(o, wsframe::OP_PONG, &data, None));
                        }
                        wsframe::OP_CLOSE => break 'read,
                        wsframe::OP_TEXT if text.starts_with(br#"{"type":"ping""#) => {
                            hub.pings.set(hub.pings.get() + 1);
                            conn.push(|o| wsframe::encode(o, wsframe::OP_TEXT, br#"{"type":"pong"}"#, None));
                        }
                        wsframe::OP_TEXT if text.starts_with(br#"{"type":"send""#) => {
                            terminal_send(&hub, &user, &conn, text);
                        }
                        wsframe::OP_TEXT if text.starts_with(br#"{"type":"read""#) => {
                            terminal_read(&hub, &user, text);
                        }
                        // Acks and other frames: nothing kept.
                        _ => {}
                    }
                }
                Ok(None) => break,
                Err(_) => break 'read,
            }
        }
        rx.drain(..off);
        if rx.is_empty() {
            rx = Vec::new();
        }
        match read_some(&mut rd, &mut rx).await {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
    conn.close();
    let mut users = hub.users.borrow_mut();
    if users.get(&user).is_some_and(|c| Rc::ptr_eq(c, &conn)) {
        users.remove(&user);
    }
}

/// Writes what is queued for the connection, as the engine does: a plain non-blocking `send`
/// first (one syscall, no ring round trip or extra wake per write), and glommio's write only
/// for what the socket did not take. Two buffers swap so a small write allocates nothing; one
/// grown past [`WRITE_BUF_KEEP`] by a burst is given back once written (idle connections hold
/// no burst's memory).
async fn writer<W: futures_lite::AsyncWrite + Unpin>(conn: Rc<Conn>, fd: RawFd, mut wr: W) {
    let mut buf = Vec::new();
    loop {
        let more = futures_lite::future::poll_fn(|cx| {
            let mut out = conn.out.borrow_mut();
            if !out.is_empty() {
                std::mem::swap(&mut *out, &mut buf);
                return Poll::Ready(true);
            }
            if conn.closed.get() {
                return Poll::Ready(false);
            }
            *conn.waker.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        })
        .await;
        if !more {
            let _ = wr.close().await;
            return;
        }
        let sent = send_now(fd, &buf);
        if sent < buf.len() && wr.write_all(&buf[sent..]).await.is_err() {
            conn.close();
            return;
        }
        buf.clear();
        if buf.capacity() > WRITE_BUF_KEEP {
            buf = Vec::new();
        }
    }
}

/// Capacity of a connection's spare write buffer kept between writes.
const WRITE_BUF_KEEP: usize = 4096;

/// How much of `bytes` the socket took at once without blocking (0 when full or on an error,
/// which the awaited write that follows then reports).
fn send_now(fd: RawFd, bytes: &[u8]) -> usize {
    let mut off = 0;
    while off < bytes.len() {
        let rest = &bytes[off..];
        // SAFETY: `fd` is the connection's open socket (its stream outlives the writer task);
        // the buffer is borrowed for the call.
        let r = unsafe { libc::send(fd, rest.as_ptr().cast(), rest.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        if r > 0 {
            off += r as usize;
        } else if r < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        } else {
            break;
        }
    }
    off
}

#[derive(Deserialize)]
struct WireSend<'a> {
    #[serde(borrow)]
    from: Cow<'a, str>,
    #[serde(borrow)]
    to: Cow<'a, str>,
    #[serde(borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    body: &'a RawValue,
}

#[derive(Deserialize)]
struct WireBatch<'a> {
    #[serde(borrow)]
    messages: Vec<WireSend<'a>>,
}

/// Writes the message to its addressee's socket, and a copy to the sender's if connected
/// (chat `u:<to>`, the engine's multi-device copy), with the sender's `cid` as the engine
/// writes it (terminal sends): `Some((id, ts, sender seq))`, or `None` when the addressee is
/// not connected here.
fn deliver(hub: &Hub, m: &WireSend, cid: Option<&str>) -> Option<(u64, u64, u64)> {
    let users = hub.users.borrow();
    let conn = users.get(m.to.as_ref())?;
    let id = hub.next_id.get() + 1;
    hub.next_id.set(id);
    let ts = crate::unix_nanos() / 1_000_000;
    let cid = cid.map(|c| format!(",\"cid\":\"{c}\"")).unwrap_or_default();
    let frame = |chat: &str, seq: u64| {
        format!(
            "{{\"type\":\"msg\",\"id\":\"{id}\"{cid},\"chat\":\"u:{chat}\",\"from\":\"{}\",\"seq\":{seq},\"kind\":\"{}\",\"body\":{},\"ts\":{ts}}}",
            m.from,
            m.kind,
            m.body.get()
        )
    };
    let seq = conn.seq.get() + 1;
    conn.seq.set(seq);
    let f = frame(&m.from, seq);
    conn.push(|o| wsframe::encode(o, wsframe::OP_TEXT, f.as_bytes(), None));
    let mut own = seq;
    if let Some(me) = users.get(m.from.as_ref()).filter(|c| !Rc::ptr_eq(c, conn)) {
        own = me.seq.get() + 1;
        me.seq.set(own);
        let f = frame(&m.to, own);
        me.push(|o| wsframe::encode(o, wsframe::OP_TEXT, f.as_bytes(), None));
    }
    Some((id, ts, own))
}

#[derive(Deserialize)]
struct TerminalSend<'a> {
    #[serde(borrow)]
    cid: Cow<'a, str>,
    #[serde(borrow)]
    to: Cow<'a, str>,
    #[serde(borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    body: &'a RawValue,
}

/// A terminal's `send`: delivered like an API message, answered with `sent` (or an `error`
/// when the peer is not connected here).
fn terminal_send(hub: &Hub, user: &str, conn: &Conn, payload: &[u8]) {
    let Ok(s) = serde_json::from_slice::<TerminalSend>(payload) else {
        conn.push(|o| {
            wsframe::encode(
                o,
                wsframe::OP_TEXT,
                br#"{"type":"error","code":"invalid_frame","message":"bad send"}"#,
                None,
            )
        });
        return;
    };
    let m = WireSend { from: Cow::Borrowed(user), to: s.to, kind: s.kind, body: s.body };
    let answer = match deliver(hub, &m, Some(&s.cid)) {
        Some((id, ts, seq)) => {
            format!("{{\"type\":\"sent\",\"cid\":\"{}\",\"id\":\"{id}\",\"seq\":{seq},\"ts\":{ts}}}", s.cid)
        }
        None => format!(
            "{{\"type\":\"error\",\"code\":\"not_found\",\"message\":\"peer not connected\",\"ref\":\"{}\"}}",
            s.cid
        ),
    };
    conn.push(|o| wsframe::encode(o, wsframe::OP_TEXT, answer.as_bytes(), None));
}

#[derive(Deserialize)]
struct TerminalRead<'a> {
    #[serde(borrow)]
    chat: Cow<'a, str>,
}

/// A terminal's `read` of `u:<peer>`: a `receipt` to the peer (nothing is stored, so
/// `up_to` is not a real id).
fn terminal_read(hub: &Hub, user: &str, payload: &[u8]) {
    let Ok(r) = serde_json::from_slice::<TerminalRead>(payload) else {
        return;
    };
    let Some(peer) = r.chat.strip_prefix("u:") else {
        return;
    };
    if let Some(c) = hub.users.borrow().get(peer) {
        let f = format!("{{\"type\":\"receipt\",\"chat\":\"u:{user}\",\"by\":\"{user}\",\"up_to\":\"0\"}}");
        c.push(|o| wsframe::encode(o, wsframe::OP_TEXT, f.as_bytes(), None));
    }
}

#[derive(Deserialize)]
struct WireCreate {
    #[serde(default)]
    id: Option<String>,
    owner: String,
    #[serde(default)]
    members: Vec<String>,
}

#[derive(Deserialize)]
struct WireMembers {
    members: Vec<String>,
}

#[derive(Deserialize)]
struct WireGroupSend<'a> {
    #[serde(borrow)]
    from: Cow<'a, str>,
    #[serde(borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    body: &'a RawValue,
}

/// The group routes: create, add members, publish (the frame encoded once, its bytes
/// appended to every connected member's queue).
fn group_api(hub: &Hub, path: &str, body: &[u8], out: &mut Vec<u8>) {
    let bad = |out: &mut Vec<u8>, what: &str| {
        respond(out, "400 Bad Request", &format!("{{\"error\":{{\"code\":\"invalid_body\",\"message\":\"{what}\"}}}}"))
    };
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match parts.as_slice() {
        ["v1", "groups"] => {
            let Ok(c) = serde_json::from_slice::<WireCreate>(body) else {
                return bad(out, "bad group");
            };
            let mut groups = hub.groups.borrow_mut();
            let id = c.id.unwrap_or_else(|| format!("wg{}", groups.len() + 1));
            let mut members = c.members;
            members.push(c.owner);
            members.sort();
            members.dedup();
            groups.insert(id.clone(), WireGroup { members, seq: 0 });
            respond(out, "201 Created", &format!("{{\"id\":\"{id}\"}}"));
        }
        ["v1", "groups", gid, "members"] => {
            let Ok(m) = serde_json::from_slice::<WireMembers>(body) else {
                return bad(out, "bad members");
            };
            let mut groups = hub.groups.borrow_mut();
            let Some(g) = groups.get_mut(*gid) else {
                return respond(
                    out,
                    "404 Not Found",
                    "{\"error\":{\"code\":\"not_found\",\"message\":\"no such group\"}}",
                );
            };
            let before = g.members.len();
            g.members.extend(m.members);
            g.members.sort();
            g.members.dedup();
            respond(out, "200 OK", &format!("{{\"added\":{}}}", g.members.len() - before));
        }
        ["v1", "groups", gid, "messages"] => {
            let Ok(m) = serde_json::from_slice::<WireGroupSend>(body) else {
                return bad(out, "bad group message");
            };
            let mut groups = hub.groups.borrow_mut();
            let Some(g) = groups.get_mut(*gid) else {
                return respond(
                    out,
                    "404 Not Found",
                    "{\"error\":{\"code\":\"not_found\",\"message\":\"no such group\"}}",
                );
            };
            g.seq += 1;
            let id = hub.next_id.get() + 1;
            hub.next_id.set(id);
            let ts = crate::unix_nanos() / 1_000_000;
            let json = format!(
                "{{\"type\":\"msg\",\"id\":\"{id}\",\"chat\":\"g:{gid}\",\"from\":\"{}\",\"seq\":{},\"kind\":\"{}\",\"body\":{},\"ts\":{ts}}}",
                m.from,
                g.seq,
                m.kind,
                m.body.get()
            );
            let mut frame = Vec::with_capacity(json.len() + 10);
            wsframe::encode(&mut frame, wsframe::OP_TEXT, json.as_bytes(), None);
            let users = hub.users.borrow();
            for member in &g.members {
                if let Some(c) = users.get(member) {
                    c.push(|o| o.extend_from_slice(&frame));
                }
            }
            respond(out, "200 OK", &format!("{{\"id\":\"{id}\",\"seq\":{},\"ts\":{ts}}}", g.seq));
        }
        _ => respond(out, "404 Not Found", "{\"error\":{\"code\":\"not_found\",\"message\":\"no such route\"}}"),
    }
}

const NOT_CONNECTED: &str =
    "{\"error\":{\"code\":\"not_found\",\"message\":\"user not connected to the wire-limit server\"}}";

fn respond(out: &mut Vec<u8>, status: &str, body: &str) {
    let _ = write!(
        out,
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
}

fn handle_api(hub: &Hub, method: &str, path: &str, body: &[u8], out: &mut Vec<u8>) {
    match (method, path) {
        ("POST", "/v1/messages") => match serde_json::from_slice::<WireSend>(body) {
            Ok(m) => match deliver(hub, &m, None) {
                Some((id, ts, _)) => respond(out, "200 OK", &format!("{{\"id\":\"{id}\",\"ts\":{ts}}}")),
                None => respond(out, "404 Not Found", NOT_CONNECTED),
            },
            Err(_) => {
                respond(out, "400 Bad Request", "{\"error\":{\"code\":\"invalid_body\",\"message\":\"bad message\"}}")
            }
        },
        ("POST", "/v1/messages/batch") => match serde_json::from_slice::<WireBatch>(body) {
            Ok(b) => {
                let mut s = String::from("{\"results\":[");
                for (i, m) in b.messages.iter().enumerate() {
                    if i > 0 {
                        s.push(',');
                    }
                    match deliver(hub, m, None) {
                        Some((id, ts, _)) => s.push_str(&format!("{{\"id\":\"{id}\",\"ts\":{ts}}}")),
                        None => s.push_str(NOT_CONNECTED),
                    }
                }
                s.push_str("]}");
                respond(out, "200 OK", &s);
            }
            Err(_) => {
                respond(out, "400 Bad Request", "{\"error\":{\"code\":\"invalid_body\",\"message\":\"bad batch\"}}")
            }
        },
        ("POST", p) if p.starts_with("/v1/groups") => group_api(hub, p, body, out),
        _ => respond(out, "404 Not Found", "{\"error\":{\"code\":\"not_found\",\"message\":\"no such route\"}}"),
    }
}

async fn api_conn(hub: Rc<Hub>, mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut rx = Vec::new();
    let mut out = Vec::new();
    loop {
        match read_some(&mut stream, &mut rx).await {
            Ok(n) if n > 0 => {}
            _ => return,
        }
        let mut off = 0;
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            let head = match req.parse(&rx[off..]) {
                Ok(httparse::Status::Complete(n)) => n,
                Ok(httparse::Status::Partial) => break,
                Err(_) => return,
            };
            let len: usize = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
                .unwrap_or(0);
            if rx.len() - off < head + len {
                break;
            }
            let body = &rx[off + head..off + head + len];
            handle_api(&hub, req.method.unwrap_or(""), req.path.unwrap_or(""), body, &mut out);
            off += head + len;
        }
        rx.drain(..off);
        if !out.is_empty() {
            if stream.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
    }
}

/// Wire-limit server processes started by the tool; killed on drop.
pub struct WireServer {
    pub addrs: WireAddrs,
    children: Vec<(Child, Option<ChildStdin>)>,
}

impl WireServer {
    /// Starts `processes` server processes sharing the same ports.
    pub fn spawn(processes: usize, pin: Option<usize>) -> io::Result<WireServer> {
        let exe = std::env::current_exe()?;
        let mut children = Vec::new();
        let mut addrs: Option<WireAddrs> = None;
        for _ in 0..processes.max(1) {
            let (client, api) = match addrs {
                Some(a) => (a.client.to_string(), a.api.to_string()),
                None => ("127.0.0.1:0".to_owned(), "127.0.0.1:0".to_owned()),
            };
            let mut cmd = Command::new(&exe);
            cmd.args(["wire-server", "--listen-client", &client, "--listen-api", &api]);
            if let Some(p) = pin {
                cmd.args(["--pin", &p.to_string()]);
            }
            let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn()?;
            let stdout = child.stdout.take().ok_or(io::Error::other("no stdout"))?;
            let mut line = String::new();
            io::BufReader::new(stdout).read_line(&mut line)?;
            let got: WireAddrs = serde_json::from_str(line.trim())
                .map_err(|e| io::Error::other(format!("wire-limit server did not start: {e}: {line:?}")))?;
            addrs.get_or_insert(got);
            let stdin = child.stdin.take();
            children.push((child, stdin));
        }
        Ok(WireServer { addrs: addrs.ok_or(io::Error::other("no wire-limit process"))?, children })
    }

    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(|(c, _)| c.id()).collect()
    }
}

impl Drop for WireServer {
    fn drop(&mut self) {
        for (child, stdin) in &mut self.children {
            drop(stdin.take());
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
