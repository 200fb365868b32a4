//! Test support shared by the integration tests: a fake [`NodeView`] with fixed, recognisable
//! data (1,234 connections over 4 shards, users alice/bob/carol, closes with reasons) whose
//! counters grow on every `stats` call, and a small std-thread HTTP server that serves
//! [`ether_admin::handle`] over it, one thread per connection (browsers open several).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ether_admin::{
    ClosedConn, ConnInfo, ConnPage, ConnQuery, DrainReport, Histogram, NodeInfo, NodeStats, NodeView, ShardStats,
    StorageStats,
};
use ether_http::{Limits, Method, Request, Response};
use ether_proto::ApiError;

pub const TOKEN: &str = "test-admin-token-0123456789";
/// Live connections per shard in the fake; they add up to 1,234.
pub const SHARD_CONNS: [u64; 4] = [300, 310, 320, 304];

/// Recorded calls and settable state, shared by every clone of the view.
#[derive(Default)]
pub struct Shared {
    pub not_ready: Mutex<Option<String>>,
    pub stats_calls: AtomicU64,
    pub kicks: Mutex<Vec<(String, Option<String>, String)>>,
    pub drains: AtomicU64,
    pub draining: AtomicBool,
    pub closes_limits: Mutex<Vec<usize>>,
    pub queries: Mutex<Vec<ConnQuery>>,
}

#[derive(Clone)]
pub struct FakeView {
    pub shared: Arc<Shared>,
    pub now_ms: u64,
    pub conns: Arc<Vec<ConnInfo>>,
    pub closes: Arc<Vec<ClosedConn>>,
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_millis() as u64
}

fn conn(i: u64, user: &str, device: &str, platform: &str, now: u64) -> ConnInfo {
    ConnInfo {
        session: format!("s{i:04}"),
        user: user.to_owned(),
        device: device.to_owned(),
        platform: platform.to_owned(),
        shard: (i % 4) as u32,
        remote: format!("10.1.0.{}:{}", 10 + i % 200, 40_000 + i),
        since_ms: now - 60_000 * (i + 1),
        last_activity_ms: now - 1_000 * (i % 30),
        unacked: i % 5,
        queued_bytes: (i * 977) % 20_000,
    }
}

impl FakeView {
    pub fn new() -> FakeView {
        let now = now_ms();
        let mut conns = vec![
            conn(0, "alice", "phone", "ios", now),
            conn(1, "alice", "laptop", "web", now),
            conn(2, "bob", "desk", "desktop", now),
        ];
        let platforms = ["web", "ios", "android", "desktop", "other"];
        for i in 3..40 {
            conns.push(conn(i, &format!("user{i:02}"), "dev", platforms[(i % 5) as usize], now));
        }
        let reasons = ["idle", "kicked", "slow_consumer", "protocol_violation", "drain"];
        let closes = (0..30u64)
            .map(|i| ClosedConn {
                conn: conn(100 + i, if i == 0 { "carol" } else { "user99" }, "tab", "android", now - 5_000),
                closed_ms: now - 2_000 * (i + 1),
                reason: reasons[(i % 5) as usize].to_owned(),
            })
            .collect();
        FakeView { shared: Arc::new(Shared::default()), now_ms: now, conns: Arc::new(conns), closes: Arc::new(closes) }
    }

    pub fn node_stats(&self) -> NodeStats {
        let calls = self.shared.stats_calls.fetch_add(1, Ordering::SeqCst);
        let shards = SHARD_CONNS
            .iter()
            .enumerate()
            .map(|(i, &connections)| {
                let n = i as u64;
                let mut ack = Histogram::latency();
                let mut push = Histogram::latency();
                for k in 0..200u32 {
                    ack.record(0.002 + f64::from(k) * 0.000_05 * (1.0 + i as f64));
                    push.record(0.004 + f64::from(k) * 0.000_1);
                }
                let mut closes = BTreeMap::new();
                closes.insert("idle".to_owned(), 40 + n);
                closes.insert("kicked".to_owned(), 3);
                closes.insert("slow_consumer".to_owned(), 1 + n);
                closes.insert("protocol_violation".to_owned(), n);
                closes.insert("drain".to_owned(), 0);
                ShardStats {
                    shard: i as u32,
                    connections,
                    handshakes: 1000 + 10 * calls,
                    handshake_failures: 12,
                    auth_failures: 5 + n,
                    frames_in: 50_000 + 400 * calls,
                    frames_out: 90_000 + 800 * calls,
                    socket_writes: 30_000 + 200 * calls,
                    messages_accepted: 10_000 + (150 + 20 * n) * calls,
                    deliveries: 9_800 + (140 + 20 * n) * calls,
                    acks: 9_700 + (130 + 20 * n) * calls,
                    resends: 40 + calls,
                    mesh_queue_depth: 2 + n,
                    outbound_bytes_queued: 16_384 * (n + 1),
                    parked_connections: connections / 2,
                    parks: 300 + calls,
                    rate_limited: n,
                    tls_handshakes: 0,
                    tls_handshake_failures: 0,
                    tls_resumptions: 0,
                    events_retried: 0,
                    events_dropped: 0,
                    group_unreached_events: 0,
                    group_fanouts: 0,
                    closes,
                    ack_latency: ack.snapshot(),
                    push_latency: push.snapshot(),
                }
            })
            .collect();
        let mut batch = Histogram::sizes();
        let mut commit = Histogram::latency();
        for k in 1..=64u32 {
            batch.record(f64::from(k));
            commit.record(0.000_5 + f64::from(k) * 0.000_02);
        }
        NodeStats {
            node: NodeInfo {
                id: "node-test-1".into(),
                version: "0.1.0".into(),
                started_ms: self.now_ms - 3_723_000,
                uptime_s: 3723,
                draining: self.shared.draining.load(Ordering::SeqCst),
            },
            shards,
            storage: Some(StorageStats {
                batches: 64 + calls,
                ops: 2080 + 30 * calls,
                batch_size: batch.snapshot(),
                commit_latency: commit.snapshot(),
                queue_depth: 3,
                queue_bytes: 3 * 1024,
                outbox_events: 0,
                outbox_dropped: 0,
            }),
            api: vec![ether_admin::ApiRouteStats { route: "POST /v1/messages".into(), status: 200, count: 4242 }],
            api_latency: vec![ether_admin::ApiRouteLatency {
                route: "POST /v1/messages".into(),
                latency: commit.snapshot(),
            }],
            events: None,
            cluster: Some(ether_admin::ClusterStats {
                node_id: "node-test-1".into(),
                own_entries_read: 5150,
                shared_entries_read: 12,
                published_routed: 4040,
                routed_appends: 2020,
                ..ether_admin::ClusterStats::default()
            }),
        }
    }
}

impl NodeView for FakeView {
    fn admin_token(&self) -> &str {
        TOKEN
    }

    fn readiness(&self) -> Result<(), String> {
        match self.shared.not_ready.lock().unwrap().clone() {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }

    async fn stats(&self) -> Result<NodeStats, ApiError> {
        Ok(self.node_stats())
    }

    async fn connections(&self, q: &ConnQuery) -> Result<ConnPage, ApiError> {
        self.shared.queries.lock().unwrap().push(q.clone());
        Ok(q.page(None, self.conns.to_vec()))
    }

    async fn recent_closes(&self, limit: usize) -> Result<Vec<ClosedConn>, ApiError> {
        self.shared.closes_limits.lock().unwrap().push(limit);
        Ok(self.closes.iter().take(limit).cloned().collect())
    }

    async fn user(&self, uid: &str) -> Result<Vec<ConnInfo>, ApiError> {
        Ok(self.conns.iter().filter(|c| c.user == uid).cloned().collect())
    }

    async fn kick(&self, uid: &str, device: Option<&str>, reason: &str) -> Result<u64, ApiError> {
        self.shared.kicks.lock().unwrap().push((uid.to_owned(), device.map(str::to_owned), reason.to_owned()));
        let n = self.conns.iter().filter(|c| c.user == uid && device.is_none_or(|d| c.device == d)).count();
        Ok(n as u64)
    }

    async fn drain(&self) -> Result<DrainReport, ApiError> {
        self.shared.drains.fetch_add(1, Ordering::SeqCst);
        let was = self.shared.draining.swap(true, Ordering::SeqCst);
        Ok(DrainReport { started: !was, connections: if was { 0 } else { SHARD_CONNS.iter().sum() } })
    }

    fn config_redacted(&self) -> Result<serde_json::Value, ApiError> {
        // Deliberately NOT redacted: the route must redact anyway.
        Ok(serde_json::json!({
            "listen": {"client": "0.0.0.0:9000", "api": "127.0.0.1:9001", "admin": "127.0.0.1:9002"},
            "node": {"shards": 4, "data_dir": "./ether-data"},
            "auth": {"jwt_secret": "jwt-SECRET-value", "api_key": "api-KEY-value", "admin_token": TOKEN},
            "cluster": {"redis_url": "redis://ether:redis-PASSWORD@redis:6379", "node_id": "node-test-1"},
            "events": {"webhook_url": "http://hooks.local/ether", "webhook_secret": "hook-SECRET"},
            "retention": {"days": 30}
        }))
    }
}

/// Runs the admin handler on one request, without sockets.
pub fn call(view: &FakeView, req: Request) -> Response {
    futures_lite::future::block_on(ether_admin::handle(Rc::new(view.clone()), req))
}

/// A request with the right bearer token.
pub fn authed(method: Method, target: &str) -> Request {
    Request::new(method, target).expect("valid target").with_header("authorization", &format!("Bearer {TOKEN}"))
}

/// Serves the admin routes over `view` on `127.0.0.1:0` from background threads; returns
/// the bound address. The threads live until the test process ends.
pub fn serve(view: FakeView) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let view = view.clone();
            std::thread::spawn(move || serve_connection(stream, view));
        }
    });
    addr
}

fn serve_connection(mut stream: TcpStream, view: FakeView) {
    let limits = Limits::default();
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let _ = stream.set_nodelay(true);
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match ether_http::parse(&buf, &limits) {
            Ok(Some((req, used))) => {
                buf.drain(..used);
                let keep_alive = req.keep_alive;
                let head_only = req.method == Method::Head;
                let resp = call(&view, req);
                let mut out = Vec::new();
                if head_only {
                    resp.encode_head_into(keep_alive, &mut out);
                } else {
                    resp.encode_into(keep_alive, &mut out);
                }
                if stream.write_all(&out).is_err() || !keep_alive {
                    return;
                }
                continue;
            }
            Ok(None) => {}
            Err(e) => {
                let mut out = Vec::new();
                ether_http::error_response(&e).encode_into(false, &mut out);
                let _ = stream.write_all(&out);
                return;
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}
