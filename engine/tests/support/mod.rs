//! `TestNode`: a real node on ephemeral loopback ports, in this process, torn down on drop;
//! plus helpers that speak to it like terminals and a business system do.
#![allow(dead_code)]

use std::time::Duration;

use ether_engine::auth::TokenKeys;
use ether_engine::config::Config;
use ether_engine::node::{self, BoundPorts, NodeHandle};
use ether_proto::frame::{Msg, ServerFrame};
use ether_sdk::{GatewayClient, TerminalClient};

pub mod example;
pub mod js;
pub mod webhook;

pub const WAIT: Duration = Duration::from_secs(5);

pub struct TestNode {
    pub ports: BoundPorts,
    pub api_key: String,
    pub jwt_secret: String,
    pub config: Config,
    handle: Option<NodeHandle>,
    _dir: Option<tempfile::TempDir>,
}

impl TestNode {
    /// A node with `Config::test_min` (2 shards, tiny limits).
    pub fn start() -> TestNode {
        TestNode::with(|_| {})
    }

    /// A node with `Config::test_min` changed by `edit`.
    pub fn with(edit: impl FnOnce(&mut Config)) -> TestNode {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut node = TestNode::in_dir(dir.path(), edit);
        node._dir = Some(dir);
        node
    }

    /// A node whose data (store, secrets) lives in `dir`, which outlives it: a later node in
    /// the same dir finds everything stored.
    pub fn in_dir(dir: &std::path::Path, edit: impl FnOnce(&mut Config)) -> TestNode {
        let mut config = Config::test_min(dir.to_path_buf());
        edit(&mut config);
        let api_key = config.auth.api_key.expose().to_owned();
        let jwt_secret = config.auth.jwt_secret.expose().to_owned();
        let handle = node::start(config.clone()).expect("node starts");
        TestNode { ports: handle.ports, api_key, jwt_secret, config, handle: Some(handle), _dir: None }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}", self.ports.client)
    }

    pub fn gateway(&self) -> GatewayClient {
        GatewayClient::new(format!("http://{}", self.ports.api), self.api_key.clone())
    }

    pub fn token(&self, user: &str) -> String {
        TokenKeys::new(&self.jwt_secret).mint(user, Duration::from_secs(600), None).expect("mint").0
    }

    /// A terminal of `user` on `device`, past its `welcome`.
    pub fn terminal(&self, user: &str, device: &str) -> TerminalClient {
        let (t, w) =
            TerminalClient::connect(&self.ws_url(), &self.token(user), device, "web").expect("terminal connects");
        assert_eq!(w.user, user);
        assert_eq!(w.device, device);
        t
    }

    /// Whether the node refuses `token` on `device` as revoked (401 saying so); `false` when
    /// it takes the terminal; any other refusal fails the test.
    pub fn refuses_as_revoked(&self, token: &str, device: &str) -> bool {
        match TerminalClient::connect(&self.ws_url(), token, device, "ios") {
            Ok(_) => false,
            Err(ether_sdk::SdkError::Rejected { status: 401, message }) if message.contains("revoked") => true,
            Err(e) => panic!("refused, but not as revoked: {e}"),
        }
    }

    /// What the node's shards share (flags, counters).
    pub fn shared(&self) -> &ether_engine::stats::NodeShared {
        &self.handle.as_ref().expect("running").shared
    }

    pub fn admin(&self) -> GatewayClient {
        GatewayClient::new(format!("http://{}", self.ports.admin), self.config.auth.admin_token.expose().to_owned())
    }

    pub fn stop(mut self) {
        if let Some(h) = self.handle.take() {
            h.stop();
        }
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.stop();
        }
    }
}

/// The next `msg` frame (skipping nothing: any other frame fails the test).
pub fn next_msg(t: &mut TerminalClient) -> Msg {
    match t.recv(WAIT).expect("recv") {
        Some(ServerFrame::Msg(m)) => m,
        other => panic!("expected a msg frame, got {other:?}"),
    }
}

/// Asserts nothing arrives within `quiet`.
pub fn assert_silent(t: &mut TerminalClient, quiet: Duration) {
    if let Some(f) = t.recv(quiet).expect("recv") {
        panic!("expected silence, got {f:?}");
    }
}

/// Sends `sync` from `after` and collects every page: the messages (in arrival order) and the
/// final `synced` frame's inbox head.
pub fn sync_all(t: &mut TerminalClient, mut after: u64) -> (Vec<Msg>, u64) {
    let mut got = Vec::new();
    loop {
        t.send_frame(&ether_proto::ClientFrame::Sync { inbox_seq: after, groups: Default::default(), limit: None })
            .expect("sync");
        loop {
            match t.recv(WAIT).expect("recv") {
                Some(ServerFrame::Msg(m)) => {
                    after = after.max(m.seq);
                    got.push(m);
                }
                Some(ServerFrame::Synced { inbox_seq, more, .. }) => {
                    if !more {
                        return (got, inbox_seq);
                    }
                    break;
                }
                other => panic!("unexpected during sync: {other:?}"),
            }
        }
    }
}

pub fn text(from: &str, to: &str, text: &str) -> ether_proto::api::SendMessage {
    ether_proto::api::SendMessage {
        from: from.into(),
        to: to.into(),
        kind: ether_proto::Kind::Text,
        body: serde_json::json!({ "text": text }),
        cid: None,
    }
}

/// A terminal that stops reading: a socket with a tiny receive window that never reads
/// after the handshake.
pub fn stalled_terminal(node: &TestNode, user: &str) -> std::net::TcpStream {
    use std::io::{Read, Write};
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&node.ports.client.into()).unwrap();
    let mut s: std::net::TcpStream = socket.into();
    let req = format!(
        "GET /ws?token={}&device=stalled HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        node.token(user)
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 101"), "upgrade refused");
    s
}

/// Connections the node closed as slow consumers (4002), from its metrics.
pub fn slow_consumer_closes(node: &TestNode) -> f64 {
    let metrics = node.admin().request("GET", "/metrics", None).unwrap().text();
    metrics
        .lines()
        .filter(|l| l.starts_with("ether_connections_closed_total") && l.contains("slow_consumer"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Cluster mode: stores a text message from `from` in `group` straight into the nodes' shared
/// Redis store, as a node would, without telling the bus: a message in flight, or lost on the
/// way, as the other nodes see it.
pub fn store_group_text_behind_the_bus(redis_url: &str, group: &str, from: &str, text: &str) {
    let options = ether_store::RedisOptions { prefix: "ether:store:".into(), events_stream: None, outbox: false };
    let mut store = ether_store::RedisBackend::open(redis_url, options).expect("the shared store");
    let msg = ether_store::NewGroupMessage {
        id: 1 << 50,
        ts: 1,
        from: from.into(),
        system: false,
        group: group.into(),
        kind: ether_proto::Kind::Text,
        body: serde_json::json!({ "text": text }).to_string(),
        cid: None,
    };
    ether_store::StoreBackend::apply(&mut store, ether_store::Op::AppendGroup(msg)).expect("appended");
}
