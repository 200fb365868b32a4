//! Numbers about the node that any thread may read: per-shard counters and gauges, the ring
//! of recently closed connections, and the snapshots of live connections the admin port lists.
//! Written by shards (relaxed atomics, or a short lock on the close path only); owns no
//! shard state.
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ether_admin::HistogramSnapshot;

use crate::session::CloseReason;

/// Recently closed connections kept per shard for operators.
pub const RECENT_CLOSES_MAX: usize = 256;

/// Counters and gauges of one shard.
#[derive(Debug, Default)]
pub struct ShardCounters {
    /// Gauge: live terminal connections.
    pub connections: AtomicU64,
    pub handshakes: AtomicU64,
    pub handshake_failures: AtomicU64,
    pub auth_failures: AtomicU64,
    pub frames_in: AtomicU64,
    pub frames_out: AtomicU64,
    /// Writes (`sendmsg` calls) to terminal sockets; frames_out / socket_writes is how many
    /// frames a write carries on average.
    pub socket_writes: AtomicU64,
    pub messages_accepted: AtomicU64,
    pub deliveries: AtomicU64,
    pub acks: AtomicU64,
    pub resends: AtomicU64,
    /// Gauge: bytes queued for terminals, refreshed every tick.
    pub queued_bytes: AtomicU64,
    /// Gauge: connections parked out of their tasks (a subset of `connections`).
    pub parked: AtomicU64,
    /// Times a connection was parked.
    pub parks: AtomicU64,
    /// Terminal frames refused for going over a rate limit.
    pub rate_limited: AtomicU64,
    /// TLS handshakes completed on the `wss://` listener (then counted again as WebSocket
    /// handshakes once upgraded).
    pub tls_handshakes: AtomicU64,
    /// TLS handshakes that failed, timed out or were refused at the limit.
    pub tls_handshake_failures: AtomicU64,
    /// TLS handshakes that resumed an earlier session (a subset of `tls_handshakes`).
    pub tls_resumptions: AtomicU64,
    /// Events written to the outbox again after a failed write (refreshed every tick).
    pub events_retried: AtomicU64,
    /// Events dropped past `limits.events_pending_max` while the store could not take them
    /// (refreshed every tick).
    pub events_dropped: AtomicU64,
    /// `group.unreached` events made.
    pub group_unreached_events: AtomicU64,
    /// Group messages handed to this shard to fan out (see `group_shards`).
    pub group_fanouts: AtomicU64,
    pub closes: [AtomicU64; CloseReason::ALL.len()],
}

impl ShardCounters {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// What a shard publishes every tick for readers on other threads: its latency histograms
/// and its API request counts and answer times.
#[derive(Debug, Clone, Default)]
pub struct ShardPublished {
    pub ack_latency: HistogramSnapshot,
    pub push_latency: HistogramSnapshot,
    /// `(route, status, count)`
    pub api: Vec<(&'static str, u16, u64)>,
    /// Seconds to answer, by route.
    pub api_latency: Vec<(&'static str, HistogramSnapshot)>,
}

/// A live terminal as operators see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnSnapshot {
    pub session: u64,
    pub user: String,
    pub device: String,
    pub platform: &'static str,
    pub shard: usize,
    pub remote: SocketAddr,
    pub since_ms: u64,
    pub last_activity_ms: u64,
    /// Pushed messages not yet acknowledged.
    pub unacked: u64,
    pub queued_bytes: u64,
}

/// A closed terminal connection and why it closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClosedConn {
    pub conn: ConnSnapshot,
    pub closed_ms: u64,
    pub reason: CloseReason,
}

/// What the shards of one node share: identity, stop and drain flags, every shard's counters
/// and recent closes.
#[derive(Debug)]
pub struct NodeShared {
    pub node_id: String,
    /// Unix ms when the node started.
    pub started_ms: u64,
    pub stop: AtomicBool,
    pub draining: AtomicBool,
    pub shards: Vec<ShardCounters>,
    /// Gauge per shard: mesh messages sent to it and not yet handled.
    pub mesh_depth: Vec<AtomicU64>,
    recent_closes: Vec<Mutex<VecDeque<ClosedConn>>>,
    published: Vec<Mutex<ShardPublished>>,
    /// The cluster link (cluster mode only), set once before the shards start.
    pub cluster: std::sync::OnceLock<Arc<crate::cluster::Cluster>>,
    /// The webhook (URL redacted) and its dispatcher's counters, when one is configured.
    pub events: Option<(String, Arc<crate::events::DispatchStats>)>,
    /// Revoked terminal tokens (loaded from the store before the shards start).
    pub revocations: Arc<crate::revocations::TokenRevocations>,
    /// The node's API rate limit (`limits.api_requests_per_s`), taken from by every shard.
    pub api_gate: crate::ratelimit::SharedGate,
}

impl NodeShared {
    pub fn new(node_id: String, shards: usize) -> Self {
        NodeShared {
            node_id,
            started_ms: crate::message::unix_now_ms(),
            stop: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            shards: (0..shards).map(|_| ShardCounters::default()).collect(),
            mesh_depth: (0..shards).map(|_| AtomicU64::new(0)).collect(),
            recent_closes: (0..shards).map(|_| Mutex::new(VecDeque::new())).collect(),
            published: (0..shards).map(|_| Mutex::new(ShardPublished::default())).collect(),
            cluster: std::sync::OnceLock::new(),
            events: None,
            revocations: Arc::default(),
            api_gate: crate::ratelimit::SharedGate::default(),
        }
    }

    /// The cluster link, in cluster mode.
    pub fn cluster(&self) -> Option<&Arc<crate::cluster::Cluster>> {
        self.cluster.get()
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Asks every shard to drain: terminals get `reconnect`, then are closed gradually.
    /// Returns whether this call started the drain (`false`: it was already draining).
    pub fn start_drain(&self) -> bool {
        !self.draining.swap(true, Ordering::AcqRel)
    }

    /// Live terminals on the whole node.
    pub fn connections(&self) -> u64 {
        self.shards.iter().map(|c| ShardCounters::get(&c.connections)).sum()
    }

    /// Replaces what shard `shard` last published.
    pub fn publish(&self, shard: usize, p: ShardPublished) {
        if let Ok(mut slot) = self.published[shard].lock() {
            *slot = p;
        }
    }

    /// What shard `shard` last published.
    pub fn published(&self, shard: usize) -> ShardPublished {
        self.published[shard].lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// Remembers a close (the oldest is forgotten past `RECENT_CLOSES_MAX` per shard).
    pub fn record_close(&self, shard: usize, closed: ClosedConn) {
        let Ok(mut ring) = self.recent_closes[shard].lock() else {
            return;
        };
        if ring.len() == RECENT_CLOSES_MAX {
            ring.pop_front();
        }
        ring.push_back(closed);
    }

    /// The most recent closes of every shard, newest first.
    pub fn recent_closes(&self, limit: usize) -> Vec<ClosedConn> {
        let mut all: Vec<ClosedConn> = self
            .recent_closes
            .iter()
            .filter_map(|r| r.lock().ok().map(|r| r.iter().cloned().collect::<Vec<_>>()))
            .flatten()
            .collect();
        all.sort_by_key(|c| std::cmp::Reverse(c.closed_ms));
        all.truncate(limit);
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn closed(ms: u64) -> ClosedConn {
        ClosedConn {
            conn: ConnSnapshot {
                session: ms,
                user: "u".into(),
                device: "d".into(),
                platform: "web",
                shard: 0,
                remote: "127.0.0.1:1".parse().unwrap(),
                since_ms: 0,
                last_activity_ms: 0,
                unacked: 0,
                queued_bytes: 0,
            },
            closed_ms: ms,
            reason: CloseReason::Idle,
        }
    }

    #[test]
    fn only_the_first_start_drain_starts_it() {
        let n = NodeShared::new("n".into(), 1);
        assert!(n.start_drain());
        assert!(!n.start_drain(), "already draining");
        assert!(n.draining());
    }

    #[test]
    fn recent_closes_are_bounded_and_newest_first() {
        let n = NodeShared::new("n".into(), 2);
        for i in 0..(RECENT_CLOSES_MAX as u64 + 10) {
            n.record_close((i % 2) as usize, closed(i));
        }
        let r = n.recent_closes(5);
        assert_eq!(r.iter().map(|c| c.closed_ms).collect::<Vec<_>>(), vec![265, 264, 263, 262, 261]);
        assert_eq!(n.recent_closes(10_000).len(), RECENT_CLOSES_MAX + 10);
    }
}
