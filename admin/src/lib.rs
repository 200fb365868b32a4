//! The operator side of an Ether-IM node (API.md section 5), sans-IO: requests in, responses
//! out, over a narrow, data-only view of the engine.
//!
//! # Layout
//!
//! - [`NodeView`] (this file): the interface the engine implements for this crate. It hands
//!   out *data* ([`view`] types) and performs the two admin actions (kick, drain); the admin
//!   side never reaches into engine internals, and the engine depends on this crate, not the
//!   other way round (nats-server's `monitor.go` split: data-only `Connz`/`Varz`, thin handlers).
//! - [`view`]: the snapshot types ([`NodeStats`], [`ShardStats`], [`StorageStats`],
//!   [`ConnInfo`], [`ClosedConn`], reports), the connection query [`ConnQuery`] (parsing with
//!   clear 400s, filtering, sorting, paging, and the per-shard window that makes a
//!   node-wide page exact), and config redaction. All `Serialize + Deserialize`: the node
//!   encodes them, the CLI decodes them.
//! - [`histogram`]: [`Histogram`], the fixed-bucket recorder a shard owns (allocation-free
//!   `record`, `merge`), and [`HistogramSnapshot`], its cumulative-bucket data form with
//!   p50/p90/p99.
//! - [`routes`]: [`handle`], the admin port. `/healthz`, `/readyz`, `/metrics` and the
//!   dashboard (`/`, `/assets/*`) are open; everything under `/admin/` needs
//!   `Authorization: Bearer <admin_token>` (constant-time compare, 401 before routing).
//!   Unknown paths 404, wrong methods 405 with `Allow`.
//! - [`prometheus`]: [`NodeStats`] rendered as Prometheus text exposition 0.0.4 (`ether_*`
//!   families, each with HELP and TYPE).
//! - [`dashboard`]: the live dashboard page, its script and stylesheet, embedded with
//!   `include_str!` (no CDN, works offline). Token login (kept in `sessionStorage`, or
//!   `/#token=...`), then it polls `/admin/v1/stats` and `/admin/v1/connections` every second
//!   and draws hand-written canvas charts.
//! - [`cli`]: `ether admin stats|connections|user U|kick U|drain` as a library call
//!   ([`cli::run`]): a blocking HTTP call to the admin port, aligned tables or raw JSON.
//!
//! # Data flow
//!
//! admin socket → `ether_http` server loop (engine) → [`handle`] → auth → route → one
//! [`NodeView`] call (the engine gathers from its shards) → view types → JSON / Prometheus
//! text / embedded asset → [`Response`](ether_http::Response). The crate keeps no state
//! between requests; counters, the ring of recent closes and histograms live in the engine.
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

#[doc(hidden)]
pub mod browser;
pub mod cli;
pub mod dashboard;
pub mod histogram;
pub mod prometheus;
pub mod routes;
pub mod view;

pub use histogram::{BoundsMismatch, Histogram, HistogramSnapshot};
pub use routes::handle;
pub use view::{
    ApiRouteLatency, ApiRouteStats, ClosedConn, ClusterStats, ConnInfo, ConnPage, ConnQuery, ConnSort,
    ConnectionsReport, DrainReport, EventStats, KickReport, NodeInfo, NodeStats, ShardStats, SortOrder, StatsReport,
    StorageStats, UserReport,
};

use ether_proto::{ApiError, ErrorCode};

/// What the admin port may ask of the engine. Used through `Rc<V>` on the one executor that
/// serves the admin port: nothing here needs `Send`.
///
/// The data methods are `async` so the engine can gather from every shard by message; they
/// return `Err(ApiError)` when it cannot (a shard gone during shutdown: `unavailable`), and
/// the route answers that error as is. The provided defaults answer `unavailable` ("not
/// provided by this node"), so a view can grow one method at a time.
#[allow(async_fn_in_trait)]
pub trait NodeView {
    /// The bearer token that guards `/admin/`.
    fn admin_token(&self) -> &str;

    /// `Ok` when the node takes traffic (store and cluster reachable, not draining);
    /// otherwise why not. `/readyz` answers 503 with the reason.
    fn readiness(&self) -> Result<(), String>;

    /// Node, per-shard and storage statistics (`/admin/v1/stats`, `/metrics`).
    async fn stats(&self) -> Result<NodeStats, ApiError> {
        Err(not_provided("stats"))
    }

    /// One page of live connections. The engine may collect every match
    /// ([`ConnQuery::matches`]) and call [`ConnQuery::page`], or have each shard send only
    /// its first [`ConnQuery::window`] sorted matches plus its match count.
    async fn connections(&self, query: &ConnQuery) -> Result<ConnPage, ApiError> {
        let _ = query;
        Err(not_provided("connections"))
    }

    /// Up to `limit` most recently closed connections, newest first, from the ring of
    /// recent closes.
    async fn recent_closes(&self, limit: usize) -> Result<Vec<ClosedConn>, ApiError> {
        let _ = limit;
        Err(not_provided("recent closes"))
    }

    /// Up to `limit` most recently closed connections that pass `query`'s filters (user,
    /// shard, platform), newest first, looked for through the whole ring of recent closes.
    ///
    /// The default keeps the matches among the newest [`ConnQuery::LIMIT_MAX`] closes that
    /// [`NodeView::recent_closes`] gives; a view whose ring can hold more (the engine keeps
    /// 256 per shard) overrides it, or a match older than those would be missed.
    async fn recent_closes_matching(&self, query: &ConnQuery, limit: usize) -> Result<Vec<ClosedConn>, ApiError> {
        let mut closes = self.recent_closes(ConnQuery::LIMIT_MAX).await?;
        closes.retain(|c| query.matches(&c.conn));
        closes.truncate(limit);
        Ok(closes)
    }

    /// The live connections of user `uid` (empty when offline).
    async fn user(&self, uid: &str) -> Result<Vec<ConnInfo>, ApiError> {
        let _ = uid;
        Err(not_provided("user lookup"))
    }

    /// Disconnects `uid`'s terminals (only `device`'s when given), sending `kicked
    /// {reason}`; returns how many were disconnected.
    async fn kick(&self, uid: &str, device: Option<&str>, reason: &str) -> Result<u64, ApiError> {
        let _ = (uid, device, reason);
        Err(not_provided("kick"))
    }

    /// Refuses from now on `uid`'s terminal tokens (only those used on `device`, when given)
    /// issued up to now; returns the time (Unix ms) before which they are refused.
    async fn revoke_tokens(&self, uid: &str, device: Option<&str>) -> Result<u64, ApiError> {
        let _ = (uid, device);
        Err(not_provided("token revocation"))
    }

    /// Starts draining: stop accepting, tell terminals to `reconnect` with jitter, close.
    /// Idempotent (`started: false` when already draining).
    async fn drain(&self) -> Result<DrainReport, ApiError> {
        Err(not_provided("drain"))
    }

    /// The effective configuration as JSON, secrets already redacted (the route runs
    /// [`view::redact_secrets`] over it again).
    fn config_redacted(&self) -> Result<serde_json::Value, ApiError> {
        Err(not_provided("config"))
    }
}

fn not_provided(what: &str) -> ApiError {
    ApiError::new(ErrorCode::Unavailable, format!("{what} is not provided by this node"))
}
