//! The data the engine hands to the admin port: serializable snapshots (stats, connections,
//! closes, reports) and the connection query with its parsing, filtering and paging.
//! Data only: no engine types, no I/O, no clock. The CLI decodes the same types from JSON.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use ether_http::request::Request;
use ether_proto::{ApiError, ErrorCode};
use serde::{Deserialize, Serialize};

use crate::histogram::HistogramSnapshot;

/// `GET /admin/v1/stats` as returned by the engine: the node, one entry per shard, storage,
/// and the API request counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeStats {
    pub node: NodeInfo,
    pub shards: Vec<ShardStats>,
    /// `None` when the node has no local store to report on.
    #[serde(default)]
    pub storage: Option<StorageStats>,
    /// Requests answered by the api port, by route and status.
    #[serde(default)]
    pub api: Vec<ApiRouteStats>,
    /// How long the api port took to answer, by route (every shard's requests merged).
    #[serde(default)]
    pub api_latency: Vec<ApiRouteLatency>,
    /// The webhook dispatcher; `None` when no webhook is configured.
    #[serde(default)]
    pub events: Option<EventStats>,
    /// The link to the other nodes; `None` on a standalone node.
    #[serde(default)]
    pub cluster: Option<ClusterStats>,
}

impl NodeStats {
    /// The node-wide sum of every shard: counters and gauges added, histograms merged,
    /// `shard` set to the number of shards. Histograms with other bounds than the first
    /// shard's are left out (they cannot be added).
    pub fn totals(&self) -> ShardStats {
        let mut t = ShardStats { shard: self.shards.len() as u32, ..ShardStats::default() };
        for s in &self.shards {
            t.connections += s.connections;
            t.handshakes += s.handshakes;
            t.handshake_failures += s.handshake_failures;
            t.auth_failures += s.auth_failures;
            t.frames_in += s.frames_in;
            t.frames_out += s.frames_out;
            t.socket_writes += s.socket_writes;
            t.messages_accepted += s.messages_accepted;
            t.deliveries += s.deliveries;
            t.acks += s.acks;
            t.resends += s.resends;
            t.mesh_queue_depth += s.mesh_queue_depth;
            t.outbound_bytes_queued += s.outbound_bytes_queued;
            t.parked_connections += s.parked_connections;
            t.parks += s.parks;
            t.rate_limited += s.rate_limited;
            t.tls_handshakes += s.tls_handshakes;
            t.tls_handshake_failures += s.tls_handshake_failures;
            t.tls_resumptions += s.tls_resumptions;
            t.events_retried += s.events_retried;
            t.events_dropped += s.events_dropped;
            t.group_unreached_events += s.group_unreached_events;
            t.group_fanouts += s.group_fanouts;
            for (reason, n) in &s.closes {
                *t.closes.entry(reason.clone()).or_default() += n;
            }
            let _ = t.ack_latency.merge(&s.ack_latency);
            let _ = t.push_latency.merge(&s.push_latency);
        }
        t
    }
}

/// The body of `GET /admin/v1/stats`: [`NodeStats`] plus the node-wide `totals`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatsReport {
    #[serde(flatten)]
    pub stats: NodeStats,
    /// [`NodeStats::totals`] (its `shard` is the shard count).
    pub totals: ShardStats,
}

impl From<NodeStats> for StatsReport {
    fn from(stats: NodeStats) -> StatsReport {
        let totals = stats.totals();
        StatsReport { stats, totals }
    }
}

/// Who the node is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: String,
    pub version: String,
    /// When the node started, Unix milliseconds.
    pub started_ms: u64,
    pub uptime_s: u64,
    /// Draining: no new connections, terminals told to reconnect elsewhere.
    pub draining: bool,
}

/// One shard's counters (monotonic since start), gauges (current) and latency histograms.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShardStats {
    pub shard: u32,
    /// Gauge: live terminal connections.
    pub connections: u64,
    /// WebSocket handshakes completed.
    pub handshakes: u64,
    /// Handshakes refused for any reason (bad request, bad token, cap reached, ...).
    pub handshake_failures: u64,
    /// Handshakes refused for a missing, bad or expired token (a subset of the failures).
    pub auth_failures: u64,
    pub frames_in: u64,
    pub frames_out: u64,
    /// Writes (`sendmsg` calls) to terminal sockets: `frames_out / socket_writes` frames per
    /// write on average.
    #[serde(default)]
    pub socket_writes: u64,
    /// Messages accepted (made durable) by this shard, from the API or terminals.
    pub messages_accepted: u64,
    /// `msg` frames pushed to terminals (first sends, not resends).
    pub deliveries: u64,
    pub acks: u64,
    pub resends: u64,
    /// Gauge: items waiting in this shard's cross-shard (mesh) queues.
    pub mesh_queue_depth: u64,
    /// Gauge: bytes queued for terminals and not yet written.
    pub outbound_bytes_queued: u64,
    /// Gauge: idle connections parked out of their tasks (a subset of `connections`).
    #[serde(default)]
    pub parked_connections: u64,
    /// Times a connection was parked.
    #[serde(default)]
    pub parks: u64,
    /// Terminal frames refused for going over a rate limit (`rate_limited`).
    #[serde(default)]
    pub rate_limited: u64,
    /// TLS handshakes completed on the `wss://` listener.
    #[serde(default)]
    pub tls_handshakes: u64,
    /// TLS handshakes that failed, timed out or were refused at the limit.
    #[serde(default)]
    pub tls_handshake_failures: u64,
    /// TLS handshakes that resumed an earlier session (a subset of `tls_handshakes`).
    #[serde(default)]
    pub tls_resumptions: u64,
    /// Events written to the outbox again after a failed write (the store refused or failed).
    #[serde(default)]
    pub events_retried: u64,
    /// Events dropped past `limits.events_pending_max` while the store could not take them.
    #[serde(default)]
    pub events_dropped: u64,
    /// `group.unreached` events made (one per group message that found members offline).
    #[serde(default)]
    pub group_unreached_events: u64,
    /// Group messages handed to this shard to fan out to its online members: only shards with
    /// a member of the group online (or taking on a terminal) are handed a group's messages.
    #[serde(default)]
    pub group_fanouts: u64,
    /// Connections closed, by close reason (`idle`, `kicked`, `slow_consumer`, ...).
    #[serde(default)]
    pub closes: BTreeMap<String, u64>,
    /// Seconds from a `msg` push to its ack.
    #[serde(default)]
    pub ack_latency: HistogramSnapshot,
    /// Seconds from a message's acceptance to its push to a terminal.
    #[serde(default)]
    pub push_latency: HistogramSnapshot,
}

/// The store's write path.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StorageStats {
    /// Write batches committed.
    pub batches: u64,
    /// Operations committed (over all batches).
    pub ops: u64,
    /// Operations per committed batch.
    pub batch_size: HistogramSnapshot,
    /// Seconds per commit.
    pub commit_latency: HistogramSnapshot,
    /// Gauge: operations waiting for the writer.
    pub queue_depth: u64,
    /// Gauge: payload bytes (bodies, ids, events) of the operations queued or being applied,
    /// against `queue_bytes_max` (256 MiB), past which sends are `unavailable`.
    #[serde(default)]
    pub queue_bytes: u64,
    /// Gauge: events in the durable outbox (in cluster mode the shared one), waiting for the
    /// webhook to take them.
    #[serde(default)]
    pub outbox_events: u64,
    /// Events `events.outbox_max` dropped from the outbox, oldest first, since the store was
    /// created.
    #[serde(default)]
    pub outbox_dropped: u64,
}

/// The event dispatcher (business webhook, API.md section 4).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventStats {
    /// The webhook URL, user info redacted.
    pub webhook_url: String,
    /// This node holds the turn to deliver (always on a standalone node; one node of a
    /// cluster at a time).
    pub dispatching: bool,
    /// Batches answered 2xx.
    pub batches_sent: u64,
    /// Events in those batches.
    pub events_sent: u64,
    /// Failed attempts (non-2xx, timeouts, connection and store errors).
    pub failures: u64,
    /// Gauge: failures since the last success.
    pub consecutive_failures: u64,
    /// The highest outbox seq this node acked.
    pub acked_through: u64,
    /// The most recent failure.
    pub last_error: Option<String>,
}

/// The node's link to the cluster (cluster mode): its bus traffic and Redis health.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStats {
    pub node_id: String,
    /// Bus entries read from the stream every node reads (group traffic, broadcasts).
    pub shared_entries_read: u64,
    /// Bus entries read from this node's own stream (traffic of users with terminals here).
    pub own_entries_read: u64,
    /// Events this node published to the shared stream.
    pub published_shared: u64,
    /// Events this node published for one user (routed by presence).
    pub published_routed: u64,
    /// Appends those made to other nodes' streams (none for a user with no terminal elsewhere).
    pub routed_appends: u64,
    /// Presence entries written (terminals taken on).
    pub presence_writes: u64,
    /// Items dropped because the queue to Redis was full (the store still has every message).
    pub dropped: u64,
    /// Failed Redis round trips (each followed by a reconnect).
    pub redis_errors: u64,
    /// Checks of every local inbox and group against the store, after bus entries were lost.
    #[serde(default)]
    pub resyncs: u64,
    /// Message-id generator slots found held by another node (this node's lease had lapsed):
    /// the shard moved to a free one.
    #[serde(default)]
    pub idgen_slots_lost: u64,
    /// Gauge: items waiting to be written to Redis.
    pub queue_depth: u64,
    /// Gauge: milliseconds since Redis last answered the writing thread.
    pub out_ok_age_ms: u64,
    /// Gauge: milliseconds since Redis last answered the bus reader.
    pub in_ok_age_ms: u64,
}

/// Requests the api port answered for one route template and status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiRouteStats {
    /// The route template, e.g. `POST /v1/messages` or `GET /v1/users/{uid}/unread`.
    pub route: String,
    pub status: u16,
    pub count: u64,
}

/// Seconds from a request reaching its route's handler to its answer, for one route
/// template (a message is answered once it is durable, so this includes the store's commit).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ApiRouteLatency {
    pub route: String,
    pub latency: HistogramSnapshot,
}

/// One live terminal connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnInfo {
    pub session: String,
    pub user: String,
    pub device: String,
    pub platform: String,
    pub shard: u32,
    /// The peer's socket address.
    pub remote: String,
    /// Connected since, Unix milliseconds.
    pub since_ms: u64,
    /// Last frame received, Unix milliseconds.
    pub last_activity_ms: u64,
    /// Messages pushed and not yet acked.
    pub unacked: u64,
    /// Bytes queued for this terminal and not yet written.
    pub queued_bytes: u64,
}

/// A closed connection, as kept in the ring of recent closes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClosedConn {
    #[serde(flatten)]
    pub conn: ConnInfo,
    /// When it closed, Unix milliseconds.
    pub closed_ms: u64,
    /// The close reason (`idle`, `kicked`, `slow_consumer`, `protocol_violation`, `drain`, ...).
    pub reason: String,
}

/// One page of live connections: how many matched, and the page.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnPage {
    pub total: u64,
    pub items: Vec<ConnInfo>,
}

/// The body of `GET /admin/v1/connections`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionsReport {
    /// Live connections matching the filters.
    pub total: u64,
    pub offset: usize,
    pub limit: usize,
    pub sort: ConnSort,
    pub order: SortOrder,
    pub connections: Vec<ConnInfo>,
    /// Recently closed connections matching the filters, newest first.
    pub recent_closes: Vec<ClosedConn>,
}

/// The body of `GET /admin/v1/users/{uid}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserReport {
    pub user: String,
    pub online: bool,
    pub connections: Vec<ConnInfo>,
}

/// The body of `POST /admin/v1/users/{uid}/kick`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KickReport {
    /// Terminals disconnected.
    pub kicked: u64,
    /// With `revoke`: tokens issued before this time (Unix ms) are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_before_ms: Option<u64>,
}

/// The body of `POST /admin/v1/drain`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainReport {
    /// `false` when the node was already draining (the call is idempotent).
    pub started: bool,
    /// Terminals told to `reconnect` by this call.
    pub connections: u64,
}

/// Sort key of the connection list.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnSort {
    /// Connected since (default).
    #[default]
    Since,
    LastActivity,
    QueuedBytes,
    Unacked,
    User,
}

impl ConnSort {
    pub const ALL: [ConnSort; 5] =
        [ConnSort::Since, ConnSort::LastActivity, ConnSort::QueuedBytes, ConnSort::Unacked, ConnSort::User];

    pub fn as_str(self) -> &'static str {
        match self {
            ConnSort::Since => "since",
            ConnSort::LastActivity => "last_activity",
            ConnSort::QueuedBytes => "queued_bytes",
            ConnSort::Unacked => "unacked",
            ConnSort::User => "user",
        }
    }

    pub fn parse(s: &str) -> Option<ConnSort> {
        ConnSort::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The order used when none is given: the biggest first for `queued_bytes` and
    /// `unacked` (who is in trouble), ascending otherwise (oldest, least recently active,
    /// alphabetical first).
    pub fn default_order(self) -> SortOrder {
        match self {
            ConnSort::QueuedBytes | ConnSort::Unacked => SortOrder::Desc,
            ConnSort::Since | ConnSort::LastActivity | ConnSort::User => SortOrder::Asc,
        }
    }

    fn compare(self, a: &ConnInfo, b: &ConnInfo) -> Ordering {
        match self {
            ConnSort::Since => a.since_ms.cmp(&b.since_ms),
            ConnSort::LastActivity => a.last_activity_ms.cmp(&b.last_activity_ms),
            ConnSort::QueuedBytes => a.queued_bytes.cmp(&b.queued_bytes),
            ConnSort::Unacked => a.unacked.cmp(&b.unacked),
            ConnSort::User => a.user.cmp(&b.user).then_with(|| a.device.cmp(&b.device)),
        }
    }
}

/// Sort direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SortOrder {
    #[default]
    Asc,
    Desc,
}

impl SortOrder {
    pub fn as_str(self) -> &'static str {
        match self {
            SortOrder::Asc => "asc",
            SortOrder::Desc => "desc",
        }
    }
}

/// The query of `GET /admin/v1/connections`:
/// `?sort=since|last_activity|queued_bytes|unacked|user&order=asc|desc&limit=&offset=`
/// `&user=&shard=&platform=&closed=`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnQuery {
    pub sort: ConnSort,
    pub order: SortOrder,
    /// Page size, 1..=[`ConnQuery::LIMIT_MAX`], default [`ConnQuery::LIMIT_DEFAULT`].
    pub limit: usize,
    pub offset: usize,
    /// Only this user.
    pub user: Option<String>,
    /// Only this shard.
    pub shard: Option<u32>,
    /// Only this platform (`web`, `ios`, `android`, `desktop`, `other`).
    pub platform: Option<String>,
    /// How many recent closes to include, 0..=[`ConnQuery::LIMIT_MAX`], default
    /// [`ConnQuery::CLOSED_DEFAULT`].
    pub closed: usize,
}

impl Default for ConnQuery {
    fn default() -> ConnQuery {
        ConnQuery {
            sort: ConnSort::default(),
            order: ConnSort::default().default_order(),
            limit: ConnQuery::LIMIT_DEFAULT,
            offset: 0,
            user: None,
            shard: None,
            platform: None,
            closed: ConnQuery::CLOSED_DEFAULT,
        }
    }
}

/// Platforms a terminal may announce (API.md section 2).
pub const PLATFORMS: [&str; 5] = ["web", "ios", "android", "desktop", "other"];

/// Largest `offset` accepted: far beyond any node's connection count, small enough that
/// `offset + limit` never overflows.
const OFFSET_MAX: usize = 100_000_000;

fn bad_query(param: &str, message: impl std::fmt::Display) -> ApiError {
    ApiError::new(ErrorCode::InvalidBody, format!("query.{param}: {message}"))
}

impl ConnQuery {
    pub const LIMIT_DEFAULT: usize = 100;
    pub const LIMIT_MAX: usize = 1000;
    pub const CLOSED_DEFAULT: usize = 20;

    /// Parses the query of `req`. Unknown parameters, parameters given twice and bad values
    /// are refused with `invalid_body` naming the parameter (`query.limit: ...`), so a typo never silently
    /// returns everything.
    pub fn from_request(req: &Request) -> Result<ConnQuery, ApiError> {
        ConnQuery::parse(&req.query)
    }

    /// Parses a raw (undecoded) query string, as in [`ConnQuery::from_request`].
    pub fn parse(raw: &str) -> Result<ConnQuery, ApiError> {
        let req = Request::new(ether_http::Method::Get, &format!("/?{raw}")).map_err(|e| bad_query("", e))?;
        let mut q = ConnQuery::default();
        let mut order = None;
        // Names are decoded like values (`%73ort` is `sort`); a name given twice is refused,
        // never resolved by taking one of them.
        let known = ["sort", "order", "limit", "offset", "user", "shard", "platform", "closed"];
        let mut given: [Option<String>; 8] = Default::default();
        for (key, value) in req.query_pairs() {
            let Some(i) = known.iter().position(|k| *k == key) else {
                return Err(bad_query(&key, format!("unknown parameter; expected one of {}", known.join(", "))));
            };
            if given[i].is_some() {
                return Err(bad_query(&key, "given more than once"));
            }
            given[i] = Some(value.into_owned());
        }
        let param = |name: &str| known.iter().position(|k| *k == name).and_then(|i| given[i].clone());
        if let Some(v) = param("sort") {
            q.sort = ConnSort::parse(&v).ok_or_else(|| {
                let all: Vec<&str> = ConnSort::ALL.iter().map(|s| s.as_str()).collect();
                bad_query("sort", format!("{v:?} is not one of {}", all.join(", ")))
            })?;
        }
        if let Some(v) = param("order") {
            order = Some(match v.as_str() {
                "asc" => SortOrder::Asc,
                "desc" => SortOrder::Desc,
                _ => return Err(bad_query("order", format!("{v:?} is not asc or desc"))),
            });
        }
        q.order = order.unwrap_or_else(|| q.sort.default_order());
        if let Some(v) = param("limit") {
            q.limit = parse_count("limit", &v, 1, ConnQuery::LIMIT_MAX)?;
        }
        if let Some(v) = param("offset") {
            q.offset = parse_count("offset", &v, 0, OFFSET_MAX)?;
        }
        if let Some(v) = param("closed") {
            q.closed = parse_count("closed", &v, 0, ConnQuery::LIMIT_MAX)?;
        }
        if let Some(v) = param("shard") {
            let shard = parse_count("shard", &v, 0, u32::MAX as usize)?;
            q.shard = Some(shard as u32);
        }
        if let Some(v) = param("user") {
            if !ether_proto::ids::is_valid_id(&v) {
                return Err(bad_query("user", "must be 1-128 characters of [A-Za-z0-9_.@:-]"));
            }
            q.user = Some(v);
        }
        if let Some(v) = param("platform") {
            if !PLATFORMS.contains(&v.as_str()) {
                return Err(bad_query("platform", format!("{v:?} is not one of {}", PLATFORMS.join(", "))));
            }
            q.platform = Some(v);
        }
        Ok(q)
    }

    /// The query string that [`ConnQuery::parse`] reads back as this query (defaults left
    /// out; empty or starting with `?`).
    pub fn to_query_string(&self) -> String {
        let d = ConnQuery::default();
        let mut parts: Vec<String> = Vec::new();
        if self.sort != d.sort {
            parts.push(format!("sort={}", self.sort.as_str()));
        }
        if self.order != self.sort.default_order() {
            parts.push(format!("order={}", self.order.as_str()));
        }
        if self.limit != d.limit {
            parts.push(format!("limit={}", self.limit));
        }
        if self.offset != 0 {
            parts.push(format!("offset={}", self.offset));
        }
        if let Some(u) = &self.user {
            // Valid ids need no escaping.
            parts.push(format!("user={u}"));
        }
        if let Some(s) = self.shard {
            parts.push(format!("shard={s}"));
        }
        if let Some(p) = &self.platform {
            parts.push(format!("platform={p}"));
        }
        if self.closed != d.closed {
            parts.push(format!("closed={}", self.closed));
        }
        if parts.is_empty() {
            String::new()
        } else {
            format!("?{}", parts.join("&"))
        }
    }

    /// Whether `c` passes the filters (user, shard, platform).
    pub fn matches(&self, c: &ConnInfo) -> bool {
        self.user.as_deref().is_none_or(|u| c.user == u)
            && self.shard.is_none_or(|s| c.shard == s)
            && self.platform.as_deref().is_none_or(|p| c.platform == p)
    }

    /// `offset + limit`: the most items one shard needs to contribute to a page. A shard may
    /// sort its own matches with [`ConnQuery::sort_items`] and send only this many (with its
    /// match count); [`ConnQuery::page`] over the union is then exact.
    pub fn window(&self) -> usize {
        self.offset.saturating_add(self.limit)
    }

    /// Sorts by the query's key and order; ties broken by session id, so pages are stable.
    pub fn sort_items(&self, items: &mut [ConnInfo]) {
        items.sort_by(|a, b| {
            let by_key = self.sort.compare(a, b);
            let by_key = match self.order {
                SortOrder::Asc => by_key,
                SortOrder::Desc => by_key.reverse(),
            };
            by_key.then_with(|| a.session.cmp(&b.session))
        });
    }

    /// The page: drops non-matching items, sorts, skips `offset`, keeps `limit`. `total` is
    /// the number of matches over the whole node; pass `None` when `items` holds every
    /// match (it is then counted here).
    pub fn page(&self, total: Option<u64>, mut items: Vec<ConnInfo>) -> ConnPage {
        items.retain(|c| self.matches(c));
        let total = total.unwrap_or(items.len() as u64);
        self.sort_items(&mut items);
        let items = items.into_iter().skip(self.offset).take(self.limit).collect();
        ConnPage { total, items }
    }
}

fn parse_count(param: &str, v: &str, min: usize, max: usize) -> Result<usize, ApiError> {
    let n: usize = v.parse().map_err(|_| bad_query(param, format!("{v:?} is not a whole number")))?;
    if n < min || n > max {
        return Err(bad_query(param, format!("{n} is out of range {min}..={max}")));
    }
    Ok(n)
}

/// The text that replaces every secret in `GET /admin/v1/config`.
pub const REDACTED: &str = "<redacted>";

/// Whether a config key names a secret: `*secret*`, `*token*`, `*password*`, `*api_key`,
/// `*_key`, `key`, `credentials` (case-insensitive).
pub fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.contains("secret")
        || k.contains("token")
        || k.contains("password")
        || k.contains("passwd")
        || k.contains("credential")
        || k == "key"
        || k.ends_with("_key")
        || k.ends_with("-key")
}

/// Redacts secrets in a config document, in place: the value of every key that
/// [`is_secret_key`] (whatever its type) becomes [`REDACTED`], and the password of any
/// `scheme://user:password@host` URL string (e.g. `cluster.redis_url`) becomes `REDACTED`
/// too. Applied by the route on top of whatever the engine already redacted.
pub fn redact_secrets(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                if is_secret_key(k) && !v.is_null() {
                    *v = Value::String(REDACTED.to_owned());
                } else {
                    redact_secrets(v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact_secrets),
        Value::String(s) => {
            if let Some(clean) = redact_url_password(s) {
                *s = clean;
            }
        }
        _ => {}
    }
}

/// `scheme://user:pass@host/...` → `scheme://user:<redacted>@host/...`; `None` when `s` has
/// no password in it.
fn redact_url_password(s: &str) -> Option<String> {
    let start = s.find("://")? + 3;
    let rest = &s[start..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let at = authority.rfind('@')?;
    let userinfo = &authority[..at];
    let colon = userinfo.find(':')?;
    Some(format!("{}{}:{}{}", &s[..start], &userinfo[..colon], REDACTED, &s[start + at..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(session: &str, user: &str, shard: u32, since: u64, queued: u64) -> ConnInfo {
        ConnInfo {
            session: session.into(),
            user: user.into(),
            device: "d".into(),
            platform: ["web", "ios"][shard as usize % 2].into(),
            shard,
            remote: "127.0.0.1:1".into(),
            since_ms: since,
            last_activity_ms: since + 10,
            unacked: queued / 10,
            queued_bytes: queued,
        }
    }

    #[test]
    fn query_defaults() {
        let q = ConnQuery::parse("").unwrap();
        assert_eq!(q, ConnQuery::default());
        assert_eq!(q.limit, 100);
        assert_eq!((q.sort, q.order), (ConnSort::Since, SortOrder::Asc));
        assert_eq!(q.to_query_string(), "");
    }

    #[test]
    fn query_parses_every_parameter() {
        let q =
            ConnQuery::parse("sort=queued_bytes&limit=5&offset=10&user=bob%40x&shard=3&platform=ios&closed=0").unwrap();
        assert_eq!(q.sort, ConnSort::QueuedBytes);
        assert_eq!(q.order, SortOrder::Desc, "queued_bytes defaults to desc");
        assert_eq!((q.limit, q.offset, q.closed), (5, 10, 0));
        assert_eq!(q.user.as_deref(), Some("bob@x"));
        assert_eq!(q.shard, Some(3));
        assert_eq!(q.platform.as_deref(), Some("ios"));
        assert_eq!(ConnQuery::parse(&q.to_query_string()[1..]).unwrap(), q);

        let q = ConnQuery::parse("sort=user&order=desc&limit=1000").unwrap();
        assert_eq!((q.sort, q.order, q.limit), (ConnSort::User, SortOrder::Desc, 1000));
        assert_eq!(ConnQuery::parse(&q.to_query_string()[1..]).unwrap(), q);
        assert_eq!(ConnQuery::parse("sort=last_activity").unwrap().sort, ConnSort::LastActivity);
        // A name is decoded like a value.
        assert_eq!(ConnQuery::parse("%73ort=user&li%6Dit=7").unwrap(), ConnQuery::parse("sort=user&limit=7").unwrap());
    }

    #[test]
    fn query_refuses_bad_values_with_the_parameter_name() {
        let cases = [
            ("limit=0", "query.limit"),
            ("limit=1001", "query.limit"),
            ("limit=-1", "query.limit"),
            ("limit=ten", "query.limit"),
            ("offset=1e3", "query.offset"),
            ("closed=5000", "query.closed"),
            ("sort=age", "query.sort"),
            ("order=up", "query.order"),
            ("shard=x", "query.shard"),
            ("shard=99999999999", "query.shard"),
            ("platform=amiga", "query.platform"),
            ("user=a%20b", "query.user"),
            ("user=", "query.user"),
            ("limt=5", "query.limt"),
            ("limit=5&limit=500", "query.limit: given more than once"),
            ("user=ann&sort=user&user=bob", "query.user: given more than once"),
            ("%6Cimit=0", "query.limit"),
        ];
        for (raw, param) in cases {
            let err = ConnQuery::parse(raw).expect_err(raw);
            assert_eq!(err.code, ErrorCode::InvalidBody, "{raw}");
            assert!(err.message.starts_with(param), "{raw}: {}", err.message);
        }
        let err = ConnQuery::parse("limit=0").unwrap_err();
        assert!(err.message.contains("1..=1000"), "{}", err.message);
    }

    #[test]
    fn page_filters_sorts_and_slices() {
        let items = vec![
            conn("s1", "carol", 0, 300, 50),
            conn("s2", "alice", 1, 100, 500),
            conn("s3", "bob", 0, 200, 0),
            conn("s4", "alice", 2, 400, 500),
        ];
        let q = ConnQuery::default();
        let p = q.page(None, items.clone());
        assert_eq!(p.total, 4);
        let sessions: Vec<&str> = p.items.iter().map(|c| c.session.as_str()).collect();
        assert_eq!(sessions, ["s2", "s3", "s1", "s4"], "oldest first");

        let q = ConnQuery::parse("sort=queued_bytes&limit=2").unwrap();
        let p = q.page(None, items.clone());
        let sessions: Vec<&str> = p.items.iter().map(|c| c.session.as_str()).collect();
        assert_eq!(sessions, ["s2", "s4"], "biggest first, ties by session");
        assert_eq!(p.total, 4);

        let q = ConnQuery::parse("sort=user&offset=1&limit=2").unwrap();
        let p = q.page(None, items.clone());
        let users: Vec<&str> = p.items.iter().map(|c| c.user.as_str()).collect();
        assert_eq!(users, ["alice", "bob"]);

        let q = ConnQuery::parse("user=alice").unwrap();
        assert_eq!(q.page(None, items.clone()).total, 2);
        let q = ConnQuery::parse("shard=0&platform=web").unwrap();
        assert_eq!(q.page(None, items.clone()).total, 2);
        let q = ConnQuery::parse("platform=android").unwrap();
        assert_eq!(q.page(None, items.clone()), ConnPage::default());

        let q = ConnQuery::parse("offset=10").unwrap();
        let p = q.page(Some(4), items);
        assert_eq!((p.total, p.items.len()), (4, 0), "past the end: empty page");
    }

    #[test]
    fn per_shard_windows_give_the_same_page() {
        let mut all = Vec::new();
        for i in 0..40u64 {
            all.push(conn(&format!("s{i:02}"), "u", (i % 4) as u32, (i * 37) % 101, i));
        }
        let q = ConnQuery::parse("sort=since&offset=5&limit=7").unwrap();
        let whole = q.page(None, all.clone());
        let mut union = Vec::new();
        for shard in 0..4 {
            let mut mine: Vec<ConnInfo> = all.iter().filter(|c| c.shard == shard).cloned().collect();
            q.sort_items(&mut mine);
            mine.truncate(q.window());
            union.extend(mine);
        }
        assert_eq!(q.page(Some(40), union), whole);
    }

    #[test]
    fn totals_add_shards() {
        let mut a = ShardStats { shard: 0, connections: 3, acks: 10, ..ShardStats::default() };
        a.closes.insert("idle".into(), 2);
        let mut h = crate::Histogram::latency();
        h.record(0.01);
        a.ack_latency = h.snapshot();
        let mut b = a.clone();
        b.shard = 1;
        b.closes.insert("kicked".into(), 1);
        let stats = NodeStats { shards: vec![a, b], ..NodeStats::default() };
        let t = stats.totals();
        assert_eq!((t.shard, t.connections, t.acks), (2, 6, 20));
        assert_eq!(t.closes["idle"], 4);
        assert_eq!(t.closes["kicked"], 1);
        assert_eq!(t.ack_latency.count, 2);
        assert_eq!(NodeStats::default().totals().connections, 0);
    }

    #[test]
    fn stats_report_json_is_flat_and_round_trips() {
        let stats = NodeStats {
            node: NodeInfo { id: "n1".into(), ..NodeInfo::default() },
            shards: vec![ShardStats::default()],
            storage: Some(StorageStats::default()),
            api: vec![],
            api_latency: vec![],
            events: None,
            cluster: None,
        };
        let report = StatsReport::from(stats);
        let v = serde_json::to_value(&report).unwrap();
        assert_eq!(v["node"]["id"], "n1");
        assert!(v["shards"].is_array());
        assert!(v["storage"].is_object());
        assert_eq!(v["totals"]["shard"], 1);
        let back: StatsReport = serde_json::from_value(v).unwrap();
        assert_eq!(back, report);

        let closed = ClosedConn { conn: conn("s1", "bob", 0, 1, 2), closed_ms: 9, reason: "idle".into() };
        let v = serde_json::to_value(&closed).unwrap();
        assert_eq!(v["user"], "bob");
        assert_eq!(v["reason"], "idle");
        assert_eq!(serde_json::from_value::<ClosedConn>(v).unwrap(), closed);
    }

    #[test]
    fn secrets_are_redacted() {
        let mut cfg = serde_json::json!({
            "listen": {"client": "0.0.0.0:9000", "admin": "127.0.0.1:9002"},
            "auth": {"jwt_secret": "s3cret", "api_key": "k3y", "admin_token": "t0k"},
            "events": {"webhook_url": "http://hook.example/x", "webhook_secret": "w"},
            "cluster": {"redis_url": "redis://user:hunter2@redis:6379/0", "node_id": "n1"},
            "extra": [{"password": 5}, "redis://:pw@h"],
            "keys": {"key": "k", "keyspace": "kept"},
            "unset": {"token": null}
        });
        redact_secrets(&mut cfg);
        let text = cfg.to_string();
        for secret in ["s3cret", "k3y", "t0k", "hunter2", ":pw@", "\"w\"", "\"k\""] {
            assert!(!text.contains(secret), "{secret} leaked in {text}");
        }
        assert_eq!(cfg["auth"]["jwt_secret"], REDACTED);
        assert_eq!(cfg["cluster"]["redis_url"], "redis://user:<redacted>@redis:6379/0");
        assert_eq!(cfg["extra"][1], "redis://:<redacted>@h");
        assert_eq!(cfg["listen"]["client"], "0.0.0.0:9000");
        assert_eq!(cfg["events"]["webhook_url"], "http://hook.example/x");
        assert_eq!(cfg["keys"]["keyspace"], "kept");
        assert_eq!(cfg["cluster"]["node_id"], "n1");
        assert!(cfg["unset"]["token"].is_null(), "an unset secret stays null");
    }
}
