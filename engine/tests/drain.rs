//! Draining: every terminal gets `reconnect` with a jittered delay and is closed with 1012 at
//! about that delay, within the drain window; readiness turns 503 and new terminals are turned
//! away.
mod support;

use std::time::{Duration, Instant};

use ether_proto::frame::ServerFrame;
use ether_sdk::{GatewayClient, SdkError, TerminalClient};
use support::*;

#[test]
fn drain_tells_every_terminal_to_reconnect_and_closes_them() {
    let node = TestNode::start();
    let mut terminals: Vec<_> = (0..8).map(|i| node.terminal(&format!("d{i}"), "phone")).collect();
    let admin = node.admin();
    assert_eq!(admin.request("GET", "/readyz", None).unwrap().status, 200);
    node.shared().start_drain();
    let mut delays = Vec::new();
    for t in &mut terminals {
        match t.recv(WAIT).unwrap() {
            Some(ServerFrame::Reconnect { after_ms }) => delays.push(after_ms),
            other => panic!("expected reconnect, got {other:?}"),
        }
    }
    assert!(delays.iter().all(|d| *d < 5000));
    assert_eq!(admin.request("GET", "/readyz", None).unwrap().status, 503);
    let refused = TerminalClient::connect(&node.ws_url(), &node.token("late"), "phone", "web").unwrap_err();
    assert_eq!(refused.status(), Some(503));
    let started = Instant::now();
    for t in &mut terminals {
        match t.recv(Duration::from_secs(8)) {
            Err(SdkError::Closed { code, .. }) => assert_eq!(code, Some(1012)),
            other => panic!("expected close 1012, got {other:?}"),
        }
    }
    assert!(started.elapsed() < Duration::from_secs(8));
    let deadline = Instant::now() + WAIT;
    while node.shared().connections() > 0 {
        assert!(Instant::now() < deadline, "connections left after drain");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Many terminals that do not leave when told to reconnect are all closed by the end of the
/// drain window (plus a second for ticks running late), not left for the stop to close at
/// once: each is closed once its own `after_ms` (below the window) has passed.
#[test]
fn a_drain_closes_many_terminals_by_the_end_of_its_window() {
    let node = TestNode::with(|c| {
        c.node.shards = 1;
        c.limits.drain_window = Duration::from_secs(2);
    });
    let terminals: Vec<_> = (0..60).map(|i| node.terminal(&format!("m{i}"), "phone")).collect();
    assert_eq!(node.shared().connections(), 60);
    node.shared().start_drain();
    std::thread::sleep(Duration::from_millis(3000));
    assert_eq!(node.shared().connections(), 0, "terminals still open a second after the drain window");
    drop(terminals);
}

/// Each terminal is closed (1012) at about the `after_ms` its `reconnect` named, never long
/// before: the closes follow the jitter, so terminals come back to the other nodes spread as
/// they were told. Two terminals told `after_ms` at least `APART_MS` apart (four shard ticks)
/// are closed in that order; closer ones may be closed on the same tick, in any order.
#[test]
fn a_drain_closes_terminals_in_the_order_of_their_reconnect_delays() {
    const WINDOW_MS: u64 = 4000;
    const APART_MS: u64 = 1000;
    let node = TestNode::with(|c| {
        c.node.shards = 1;
        c.limits.drain_window = Duration::from_millis(WINDOW_MS);
    });
    let terminals: Vec<_> = (0..16).map(|i| node.terminal(&format!("o{i}"), "phone")).collect();
    node.shared().start_drain();
    let readers: Vec<_> = terminals
        .into_iter()
        .map(|mut t| {
            std::thread::spawn(move || {
                let after_ms = match t.recv(WAIT).unwrap() {
                    Some(ServerFrame::Reconnect { after_ms }) => after_ms,
                    other => panic!("expected reconnect, got {other:?}"),
                };
                match t.recv(Duration::from_millis(WINDOW_MS) + WAIT) {
                    Err(SdkError::Closed { code, .. }) => assert_eq!(code, Some(1012)),
                    other => panic!("expected close 1012, got {other:?}"),
                }
                (after_ms, Instant::now())
            })
        })
        .collect();
    let mut seen: Vec<(u64, Instant)> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    seen.sort_by_key(|(_, closed)| *closed);
    let told_in_close_order: Vec<u64> = seen.iter().map(|(after_ms, _)| *after_ms).collect();
    let mut compared = 0;
    for (after_a, closed_a) in &seen {
        for (after_b, closed_b) in &seen {
            if after_a + APART_MS <= *after_b {
                compared += 1;
                assert!(
                    closed_a < closed_b,
                    "told {after_a} ms, closed after the one told {after_b} ms; after_ms in close order: {told_in_close_order:?}"
                );
            }
        }
    }
    assert!(compared > 0, "no two delays {APART_MS} ms apart: {told_in_close_order:?}");
}

/// A terminal whose upgrade request was read and checked before a drain began, and is taken
/// on (its heads read from the store) only after it began, is refused as PROTOCOL.md says of
/// a draining node: HTTP 503 `unavailable` before the upgrade, never a `welcome` it would then
/// hold without the `reconnect` the drain told the others. The store is held by an open write
/// transaction (another SQLite connection) behind which the terminal's heads wait.
#[test]
fn a_terminal_checked_before_a_drain_and_taken_on_after_it_is_refused_503() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::in_dir(dir.path(), |_| {});
    let db = rusqlite::Connection::open(dir.path().join("ether.db")).unwrap();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    // A message write waits for the lock on the storage thread; commands after it queue.
    let gw = node.gateway();
    let blocked = std::thread::spawn(move || gw.send_message(&text("ann", "bob", "held")));
    std::thread::sleep(Duration::from_millis(200));
    let mut s = std::net::TcpStream::connect(node.ports.client).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let req = format!(
        "GET /ws?token={}&device=phone HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        node.token("late")
    );
    s.write_all(req.as_bytes()).unwrap();
    // The request is read and checked (no drain yet); its heads wait behind the held write
    // (the storage thread waits up to 5 s for the lock).
    std::thread::sleep(Duration::from_millis(800));
    let drained = node.admin().request("POST", "/admin/v1/drain", None).unwrap();
    assert_eq!(drained.status, 200, "{}", drained.text());
    db.execute_batch("ROLLBACK").unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "expected 503 before the upgrade, got: {answer}");
    assert!(answer.contains(r#""code":"unavailable""#), "{answer}");
    assert!(answer.contains("node is draining"), "the refusal says why: {answer}");
    assert!(blocked.join().unwrap().is_ok(), "the held message was stored once the lock went");
    assert_eq!(node.shared().connections(), 0, "the refused terminal was not taken on");
}

/// `ether serve` as a child process on `data` (2 shards, ephemeral loopback ports, the given
/// drain window), killed and reaped on drop.
struct Serve {
    child: std::process::Child,
    log: std::path::PathBuf,
    ports: serde_json::Value,
}

impl Serve {
    fn start(data: &std::path::Path, drain_window_ms: u64) -> Serve {
        let ports_file = data.join("ports.json");
        let _ = std::fs::remove_file(&ports_file);
        let log = data.with_extension("log");
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_ether"))
            .args(["serve", "--shards", "2", "--listen-client", "127.0.0.1:0", "--listen-api", "127.0.0.1:0"])
            .args(["--listen-admin", "127.0.0.1:0", "--data"])
            .arg(data)
            .env_remove("ETHER_CONFIG")
            .env("ETHER_LIMITS_DRAIN_WINDOW_MS", drain_window_ms.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let mut node = Serve { child, log, ports: serde_json::Value::Null };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            // Written atomically (temp file + rename): once it exists it is complete.
            if let Ok(text) = std::fs::read_to_string(&ports_file) {
                node.ports = serde_json::from_str(&text).unwrap();
                return node;
            }
            if let Some(status) = node.child.try_wait().unwrap() {
                panic!("ether exited ({status}) before writing ports.json:\n{}", node.log_text());
            }
            assert!(Instant::now() < deadline, "no ports.json:\n{}", node.log_text());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn addr(&self, listener: &str) -> String {
        self.ports[listener].as_str().unwrap().to_owned()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The secret named `key` in `<data>/secrets.toml` (generated by the first start).
fn secret(data: &std::path::Path, key: &str) -> String {
    let secrets: toml::Table = std::fs::read_to_string(data.join("secrets.toml")).unwrap().parse().unwrap();
    secrets[key].as_str().unwrap().to_owned()
}

/// SIGTERM to `ether serve`: every terminal gets `reconnect` then 1012, the process exits 0
/// within `node::drain_timeout` (drain window + `DRAIN_GRACE`) even with a terminal that reads
/// nothing (its socket full), and every message answered 200 before the signal is there for
/// `sync` on a node restarted on the same data dir, in order.
#[test]
fn sigterm_drains_terminals_and_exits_0_in_bounded_time_losing_nothing() {
    const WINDOW_MS: u64 = 1500;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let node = Serve::start(&data, WINDOW_MS);
    let jwt = ether_engine::auth::TokenKeys::new(&secret(&data, "jwt_secret"));
    let token = |user: &str| jwt.mint(user, Duration::from_secs(600), None).unwrap().0;
    let ws = format!("ws://{}", node.addr("client"));
    let users = ["t0", "t1", "t2", "t3"];
    let mut terminals: Vec<TerminalClient> =
        users.iter().map(|u| TerminalClient::connect(&ws, &token(u), "phone", "web").unwrap().0).collect();
    // A terminal that never reads, its socket filled by messages it is sent.
    let stalled = {
        use std::io::{Read, Write};
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let addr: std::net::SocketAddr = node.addr("client").parse().unwrap();
        socket.connect(&addr.into()).unwrap();
        let mut s: std::net::TcpStream = socket.into();
        let req = format!(
            "GET /ws?token={}&device=stalled HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            token("sam")
        );
        s.write_all(req.as_bytes()).unwrap();
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 101"), "upgrade refused");
        s
    };
    let gw = GatewayClient::new(format!("http://{}", node.addr("api")), secret(&data, "api_key"));
    let mut sent: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
    let filler = "x".repeat(1000);
    for i in 0..12 {
        for to in users.iter().chain(["away", "sam"].iter()) {
            let body = if *to == "sam" { format!("{i} {filler}") } else { format!("{i}") };
            let id = gw.send_message(&text("ann", to, &body)).unwrap().id;
            sent.entry(to).or_default().push(id);
        }
    }
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(node.child.id() as i32, libc::SIGTERM) }, 0);
    let signalled = Instant::now();
    let bound = Duration::from_millis(WINDOW_MS) + ether_engine::node::DRAIN_GRACE;
    for t in &mut terminals {
        let after_ms = loop {
            match t.recv(bound) {
                Ok(Some(ServerFrame::Msg(_))) => continue,
                Ok(Some(ServerFrame::Reconnect { after_ms })) => break after_ms,
                other => panic!("expected reconnect, got {other:?}"),
            }
        };
        assert!(after_ms < WINDOW_MS, "reconnect within the drain window: {after_ms}");
        match t.recv(bound) {
            Err(SdkError::Closed { code, .. }) => assert_eq!(code, Some(1012)),
            other => panic!("expected close 1012, got {other:?}"),
        }
    }
    let mut node = node;
    let status = loop {
        if let Some(status) = node.child.try_wait().unwrap() {
            break status;
        }
        assert!(signalled.elapsed() < bound, "still running {bound:?} after SIGTERM:\n{}", node.log_text());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "{status:?}:\n{}", node.log_text());
    drop(stalled);
    drop(node);

    // Restarted on the same data dir: everything answered 200 is there, in order.
    let node = Serve::start(&data, WINDOW_MS);
    let ws = format!("ws://{}", node.addr("client"));
    for (user, ids) in &sent {
        let (mut t, _) = TerminalClient::connect(&ws, &token(user), "tablet", "web").unwrap();
        let (got, head) = sync_all(&mut t, 0);
        let got: Vec<String> = got.into_iter().map(|m| m.id).collect();
        assert_eq!(&got, ids, "{user}'s inbox after the restart");
        assert_eq!(head, ids.len() as u64);
    }
}
