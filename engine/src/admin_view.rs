//! The engine's side of the admin port: implements `ether_admin::NodeView` over the shard that
//! serves the admin port. Counters are read from `NodeShared` (any thread may); live
//! connections are gathered from every shard by message. Changes nothing except through the
//! shard's own operations (kick, drain).
use std::collections::BTreeMap;
use std::rc::Rc;

use std::sync::atomic::Ordering;

use ether_admin::{
    ApiRouteLatency, ApiRouteStats, ClosedConn, ClusterStats, ConnInfo, ConnPage, ConnQuery, DrainReport, EventStats,
    HistogramSnapshot, NodeInfo, NodeStats, ShardStats, StorageStats,
};
use ether_proto::ApiError;

use crate::session::CloseReason;

/// `/readyz` answers 503 for this long after the store failed a command as unavailable (a full
/// disk, an I/O error, Redis away): while writes fail, traffic should go to another node.
const STORE_FAILURE_NOT_READY: std::time::Duration = std::time::Duration::from_secs(5);
use crate::shard::Shard;
use crate::stats::{self, ConnSnapshot, ShardCounters};

/// A view of the node for the admin crate, served from the shard that owns the admin port.
pub struct AdminView {
    shard: Rc<Shard>,
}

impl AdminView {
    pub fn new(shard: Rc<Shard>) -> Self {
        AdminView { shard }
    }
}

fn conn_info(c: &ConnSnapshot) -> ConnInfo {
    ConnInfo {
        session: format!("{:x}", c.session),
        user: c.user.clone(),
        device: c.device.clone(),
        platform: c.platform.to_owned(),
        shard: c.shard as u32,
        remote: c.remote.to_string(),
        since_ms: c.since_ms,
        last_activity_ms: c.last_activity_ms,
        unacked: c.unacked,
        queued_bytes: c.queued_bytes,
    }
}

fn histogram(r: ether_store::HistogramReading) -> HistogramSnapshot {
    let mut snap = HistogramSnapshot {
        bounds: r.bounds,
        counts: r.cumulative,
        sum: r.sum,
        count: r.count,
        max: r.max,
        ..Default::default()
    };
    snap.update_percentiles();
    snap
}

impl AdminView {
    fn storage_stats(&self) -> StorageStats {
        let st = self.shard.store.stats();
        StorageStats {
            batches: st.batches.load(Ordering::Relaxed),
            ops: st.ops.load(Ordering::Relaxed),
            batch_size: histogram(st.batch_size.read()),
            commit_latency: histogram(st.commit_latency.read()),
            queue_depth: self.shard.store.queued() as u64,
            queue_bytes: self.shard.store.queued_bytes() as u64,
            outbox_events: st.outbox_events.load(Ordering::Relaxed),
            outbox_dropped: st.outbox_dropped.load(Ordering::Relaxed),
        }
    }
}

fn event_stats(url: &str, st: &crate::events::DispatchStats) -> EventStats {
    let n = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    EventStats {
        webhook_url: url.to_owned(),
        dispatching: st.dispatching.load(Ordering::Relaxed),
        batches_sent: n(&st.batches_sent),
        events_sent: n(&st.events_sent),
        failures: n(&st.failures),
        consecutive_failures: n(&st.consecutive_failures),
        acked_through: n(&st.acked_through),
        last_error: st.last_error(),
    }
}

fn cluster_stats(c: &crate::cluster::Cluster) -> ClusterStats {
    let n = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let k = &c.counters;
    let (out_ok_age_ms, in_ok_age_ms) = c.redis_ages_ms();
    ClusterStats {
        node_id: c.node_id.clone(),
        shared_entries_read: n(&k.shared_entries_read),
        own_entries_read: n(&k.own_entries_read),
        published_shared: n(&k.published_shared),
        published_routed: n(&k.published_routed),
        routed_appends: n(&k.routed_appends),
        presence_writes: n(&k.presence_writes),
        dropped: n(&k.dropped),
        redis_errors: n(&k.redis_errors),
        resyncs: n(&k.resyncs),
        idgen_slots_lost: n(&k.idgen_slots_lost),
        queue_depth: c.queued() as u64,
        out_ok_age_ms,
        in_ok_age_ms,
    }
}

fn closed_conn(c: &stats::ClosedConn) -> ClosedConn {
    ClosedConn { conn: conn_info(&c.conn), closed_ms: c.closed_ms, reason: c.reason.as_str().to_owned() }
}

impl ether_admin::NodeView for AdminView {
    fn admin_token(&self) -> &str {
        &self.shard.config.auth.admin_token
    }

    fn readiness(&self) -> Result<(), String> {
        if self.shard.node.stopping() {
            return Err("node is stopping".into());
        }
        if self.shard.node.draining() {
            return Err("node is draining".into());
        }
        if !self.shard.store.is_open() {
            return Err("store is not running".into());
        }
        if let Some(why) = self.shard.store.unavailable_within(STORE_FAILURE_NOT_READY) {
            return Err(format!("store failed a command within {} s: {why}", STORE_FAILURE_NOT_READY.as_secs()));
        }
        if let Some(why) = self.shard.node.cluster().and_then(|c| c.not_ready()) {
            return Err(why);
        }
        Ok(())
    }

    async fn stats(&self) -> Result<NodeStats, ApiError> {
        let node = &self.shard.node;
        let now = crate::message::unix_now_ms();
        let mut api: BTreeMap<(&'static str, u16), u64> = BTreeMap::new();
        let mut api_latency: BTreeMap<&'static str, HistogramSnapshot> = BTreeMap::new();
        let shards = node
            .shards
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let published = node.published(i);
                for (route, status, n) in &published.api {
                    *api.entry((route, *status)).or_insert(0) += n;
                }
                for (route, h) in &published.api_latency {
                    // Every shard's histograms share their bounds (`Histogram::latency`).
                    api_latency.entry(route).and_modify(|t| drop(t.merge(h))).or_insert_with(|| h.clone());
                }
                let g = ShardCounters::get;
                ShardStats {
                    shard: i as u32,
                    connections: g(&c.connections),
                    handshakes: g(&c.handshakes),
                    handshake_failures: g(&c.handshake_failures),
                    auth_failures: g(&c.auth_failures),
                    frames_in: g(&c.frames_in),
                    frames_out: g(&c.frames_out),
                    socket_writes: g(&c.socket_writes),
                    messages_accepted: g(&c.messages_accepted),
                    deliveries: g(&c.deliveries),
                    acks: g(&c.acks),
                    resends: g(&c.resends),
                    mesh_queue_depth: g(&node.mesh_depth[i]),
                    outbound_bytes_queued: g(&c.queued_bytes),
                    parked_connections: g(&c.parked),
                    parks: g(&c.parks),
                    rate_limited: g(&c.rate_limited),
                    tls_handshakes: g(&c.tls_handshakes),
                    tls_handshake_failures: g(&c.tls_handshake_failures),
                    tls_resumptions: g(&c.tls_resumptions),
                    events_retried: g(&c.events_retried),
                    events_dropped: g(&c.events_dropped),
                    group_unreached_events: g(&c.group_unreached_events),
                    group_fanouts: g(&c.group_fanouts),
                    closes: CloseReason::ALL.iter().map(|r| (r.as_str().to_owned(), g(&c.closes[r.index()]))).collect(),
                    ack_latency: published.ack_latency,
                    push_latency: published.push_latency,
                }
            })
            .collect();
        Ok(NodeStats {
            node: NodeInfo {
                id: node.node_id.clone(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                started_ms: node.started_ms,
                uptime_s: now.saturating_sub(node.started_ms) / 1000,
                draining: node.draining(),
            },
            shards,
            storage: Some(self.storage_stats()),
            events: node.events.as_ref().map(|(url, st)| event_stats(url, st)),
            cluster: self.shard.node.cluster().map(|c| cluster_stats(c)),
            api: api
                .into_iter()
                .map(|((route, status), count)| ApiRouteStats { route: route.to_owned(), status, count })
                .collect(),
            api_latency: api_latency
                .into_iter()
                .map(|(route, latency)| ApiRouteLatency { route: route.to_owned(), latency })
                .collect(),
        })
    }

    async fn connections(&self, query: &ConnQuery) -> Result<ConnPage, ApiError> {
        let user = query.user.as_deref();
        let all = self.shard.connections(user).await.map_err(|e| e.to_api())?;
        Ok(query.page(None, all.iter().map(conn_info).collect()))
    }

    async fn recent_closes(&self, limit: usize) -> Result<Vec<ClosedConn>, ApiError> {
        Ok(self.shard.node.recent_closes(limit).iter().map(closed_conn).collect())
    }

    async fn recent_closes_matching(&self, query: &ConnQuery, limit: usize) -> Result<Vec<ClosedConn>, ApiError> {
        // The whole ring (256 per shard: more than any one page on a node of 4 shards or more).
        let all = self.shard.node.recent_closes(usize::MAX);
        Ok(all.iter().map(closed_conn).filter(|c| query.matches(&c.conn)).take(limit).collect())
    }

    async fn user(&self, uid: &str) -> Result<Vec<ConnInfo>, ApiError> {
        ether_proto::ids::check_id("uid", uid)?;
        let conns = self.shard.connections(Some(uid)).await.map_err(|e| e.to_api())?;
        Ok(conns.iter().map(conn_info).collect())
    }

    async fn kick(&self, uid: &str, device: Option<&str>, reason: &str) -> Result<u64, ApiError> {
        ether_proto::ids::check_id("uid", uid)?;
        self.shard.kick(uid, device, reason).await.map_err(|e| e.to_api())
    }

    async fn revoke_tokens(&self, uid: &str, device: Option<&str>) -> Result<u64, ApiError> {
        ether_proto::ids::check_id("uid", uid)?;
        self.shard.revoke_tokens(uid, device).await.map_err(|e| e.to_api())
    }

    async fn drain(&self) -> Result<DrainReport, ApiError> {
        let node = &self.shard.node;
        // One atomic step: a drain started meanwhile (SIGTERM) is not claimed by this call.
        let started = node.start_drain();
        // Terminals told to `reconnect` by this call: none when the node was already draining
        // (the first drain told them all, and none was taken on since).
        let connections = if started { node.connections() } else { 0 };
        Ok(DrainReport { started, connections })
    }

    fn config_redacted(&self) -> Result<serde_json::Value, ApiError> {
        Ok(self.shard.config.redacted_json())
    }
}
