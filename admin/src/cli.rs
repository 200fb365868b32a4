//! `ether admin stats|connections|user U|kick U [--device D]|drain [--json]` as a library
//! call ([`run`]): one blocking HTTP request to the admin port (the SDK's
//! [`GatewayClient`], which sends `Authorization: Bearer <token>`), then either the answer's
//! JSON as is (`--json`, for scripts) or readable aligned tables. Owns output formatting and
//! error wording; argument parsing belongs to the binary's clap layer, which maps onto
//! [`AdminCommand`] and resolves the address and token with [`resolve_target`].

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ether_sdk::gateway::percent_encode;
use ether_sdk::{GatewayClient, RawResponse, SdkError};
use serde::de::DeserializeOwned;

use crate::histogram::HistogramSnapshot;
use crate::view::{ConnInfo, ConnQuery, ConnectionsReport, DrainReport, KickReport, StatsReport, UserReport};

/// Env var with the admin address (`HOST:PORT`).
pub const ENV_ADDR: &str = "ETHER_ADMIN_ADDR";
/// Env var with the admin token.
pub const ENV_TOKEN: &str = "ETHER_AUTH_ADMIN_TOKEN";
/// The admin port's default address.
pub const DEFAULT_ADDR: &str = "127.0.0.1:9002";
/// Time allowed to connect to the admin port.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed for each read or write (a drain answers once every shard has been told).
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// One admin call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminCommand {
    /// `GET /admin/v1/stats`: node, per-shard rows with totals, closes, storage, API.
    Stats,
    /// `GET /admin/v1/connections`: live connections (sorted, paged, filtered) and recent
    /// closes.
    Connections(ConnQuery),
    /// `GET /admin/v1/users/{uid}`: one user's live connections.
    User { uid: String },
    /// `POST /admin/v1/users/{uid}/kick`.
    Kick { uid: String, device: Option<String>, reason: Option<String>, revoke: bool },
    /// `POST /admin/v1/drain`.
    Drain,
}

/// Why an admin call failed; the messages say what to check.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Nothing answered at the address.
    #[error(
        "cannot reach the admin port at {addr}: {source} \
         (is the node running? set --addr or {ENV_ADDR})"
    )]
    Unreachable { addr: String, source: SdkError },
    /// Something answered, but not with HTTP the client understands.
    #[error("bad answer from {addr} (is it the admin port?): {source}")]
    Transport { addr: String, source: SdkError },
    /// 401: no token, or the wrong one.
    #[error(
        "the admin port at {addr} refused the token (HTTP 401): {hint}; \
         pass --token or set {ENV_TOKEN}"
    )]
    Unauthorized { addr: String, hint: String },
    /// Any other error answer, with the public error code.
    #[error("admin port answered HTTP {status} ({code}): {message}")]
    Api { status: u16, code: String, message: String },
    /// An error answer without the error envelope.
    #[error("admin port answered HTTP {status}: {body}")]
    Http { status: u16, body: String },
    /// A 2xx answer that does not have the expected shape (version mismatch?).
    #[error("unexpected answer from the admin port: {0}")]
    Decode(String),
    /// A bad address or argument.
    #[error("{0}")]
    Usage(String),
}

/// Picks the address and token: the flag, else the env var (`ETHER_ADMIN_ADDR`,
/// `ETHER_AUTH_ADMIN_TOKEN`, read through `env`), else the local node's values
/// (`fallback`, e.g. from `<data>/ports.json` and the secrets file), else
/// [`DEFAULT_ADDR`] and no token. Empty values count as unset.
pub fn resolve_target(
    addr_flag: Option<&str>,
    token_flag: Option<&str>,
    env: impl Fn(&str) -> Option<String>,
    fallback: impl FnOnce() -> (Option<String>, Option<String>),
) -> (String, String) {
    let set = |v: Option<String>| v.filter(|s| !s.trim().is_empty());
    let mut addr = set(addr_flag.map(str::to_owned)).or_else(|| set(env(ENV_ADDR)));
    let mut token = set(token_flag.map(str::to_owned)).or_else(|| set(env(ENV_TOKEN)));
    if addr.is_none() || token.is_none() {
        let (fb_addr, fb_token) = fallback();
        addr = addr.or_else(|| set(fb_addr));
        token = token.or_else(|| set(fb_token));
    }
    (addr.unwrap_or_else(|| DEFAULT_ADDR.to_owned()), token.unwrap_or_default())
}

/// Runs one admin call against `addr` with `token` and returns what to print: the answer's
/// JSON as received when `json`, else readable tables.
pub fn run(addr: &str, token: &str, cmd: AdminCommand, json: bool) -> Result<String, CliError> {
    run_with_tls(addr, token, cmd, json, None)
}

/// [`run`] with the TLS client configuration for an `https://` address (`tls`: e.g. the
/// roots of a private CA; `None`: the Mozilla roots).
pub fn run_with_tls(
    addr: &str,
    token: &str,
    cmd: AdminCommand,
    json: bool,
    tls: Option<std::sync::Arc<ether_sdk::rustls::ClientConfig>>,
) -> Result<String, CliError> {
    let mut client = GatewayClient::new(addr, token).with_connect_timeout(CONNECT_TIMEOUT).with_timeout(IO_TIMEOUT);
    if let Some(tls) = tls {
        client = client.with_tls(tls);
    }
    let (method, path, body) = request_of(&cmd)?;
    let resp = client.request(method, &path, body.as_deref()).map_err(|e| match e {
        SdkError::Io(_) => CliError::Unreachable { addr: addr.to_owned(), source: e },
        SdkError::InvalidUrl(m) => CliError::Usage(format!("--addr: {m}")),
        other => CliError::Transport { addr: addr.to_owned(), source: other },
    })?;
    if !resp.is_success() {
        return Err(error_of(addr, token, resp));
    }
    if json {
        let mut text = resp.text();
        if !text.ends_with('\n') {
            text.push('\n');
        }
        return Ok(text);
    }
    render(&cmd, &resp, now_ms())
}

/// The request for `cmd`: method, path with query, body.
fn request_of(cmd: &AdminCommand) -> Result<(&'static str, String, Option<Vec<u8>>), CliError> {
    Ok(match cmd {
        AdminCommand::Stats => ("GET", "/admin/v1/stats".to_owned(), None),
        AdminCommand::Connections(q) => ("GET", format!("/admin/v1/connections{}", q.to_query_string()), None),
        AdminCommand::User { uid } => {
            check_uid(uid)?;
            ("GET", format!("/admin/v1/users/{}", percent_encode(uid)), None)
        }
        AdminCommand::Kick { uid, device, reason, revoke } => {
            check_uid(uid)?;
            let body = ether_proto::api::Kick { device: device.clone(), reason: reason.clone(), revoke: *revoke };
            let body = serde_json::to_vec(&body).map_err(|e| CliError::Usage(e.to_string()))?;
            ("POST", format!("/admin/v1/users/{}/kick", percent_encode(uid)), Some(body))
        }
        AdminCommand::Drain => ("POST", "/admin/v1/drain".to_owned(), Some(Vec::new())),
    })
}

fn check_uid(uid: &str) -> Result<(), CliError> {
    if ether_proto::ids::is_valid_id(uid) {
        Ok(())
    } else {
        Err(CliError::Usage(format!("user id {uid:?}: must be 1-128 characters of [A-Za-z0-9_.@:-]")))
    }
}

fn error_of(addr: &str, token: &str, resp: RawResponse) -> CliError {
    let status = resp.status;
    match resp.into_error() {
        SdkError::Api { error, .. } if status == 401 => CliError::Unauthorized {
            addr: addr.to_owned(),
            hint: if token.is_empty() { "no token was given".to_owned() } else { error.message },
        },
        SdkError::Api { status, error } => {
            CliError::Api { status, code: error.code.to_string(), message: error.message }
        }
        SdkError::Http(401, _) => CliError::Unauthorized { addr: addr.to_owned(), hint: "unauthorized".to_owned() },
        SdkError::Http(status, body) => CliError::Http { status, body: body.chars().take(300).collect() },
        other => CliError::Decode(other.to_string()),
    }
}

fn decode<T: DeserializeOwned>(resp: &RawResponse) -> Result<T, CliError> {
    serde_json::from_slice(&resp.body).map_err(|e| CliError::Decode(e.to_string()))
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The human-readable output of `cmd`'s answer, with ages relative to `now_ms`.
fn render(cmd: &AdminCommand, resp: &RawResponse, now_ms: u64) -> Result<String, CliError> {
    Ok(match cmd {
        AdminCommand::Stats => render_stats(&decode(resp)?),
        AdminCommand::Connections(_) => render_connections(&decode(resp)?, now_ms),
        AdminCommand::User { .. } => render_user(&decode(resp)?, now_ms),
        AdminCommand::Kick { uid, device, .. } => {
            let r: KickReport = decode(resp)?;
            let which = match device {
                Some(d) => format!("user {uid}, device {d}"),
                None => format!("user {uid}"),
            };
            match r.revoked_before_ms {
                Some(t) => format!(
                    "kicked {} terminal(s) of {which}; tokens issued before {} refused\n",
                    r.kicked,
                    fmt_time(t)
                ),
                None => format!("kicked {} terminal(s) of {which}\n", r.kicked),
            }
        }
        AdminCommand::Drain => {
            let r: DrainReport = decode(resp)?;
            if r.started {
                format!(
                    "drain started: {} terminal(s) told to reconnect; the node accepts no new connections\n",
                    r.connections
                )
            } else {
                format!("the node was already draining; {} terminal(s) told to reconnect\n", r.connections)
            }
        }
    })
}

fn render_stats(r: &StatsReport) -> String {
    let n = &r.stats.node;
    let mut out = format!(
        "node {}  version {}  up {}  started {}  {}\n\n",
        n.id,
        n.version,
        fmt_age(n.uptime_s),
        fmt_time(n.started_ms),
        if n.draining { "DRAINING" } else { "serving" }
    );

    let mut traffic = Table::new(&[
        ("SHARD", false),
        ("CONNS", true),
        ("HANDSHAKES", true),
        ("HS_FAIL", true),
        ("AUTH_FAIL", true),
        ("FRAMES_IN", true),
        ("FRAMES_OUT", true),
        ("ACCEPTED", true),
        ("DELIVERED", true),
        ("ACKS", true),
        ("RESENDS", true),
        ("MESH_Q", true),
        ("OUT_QUEUED", true),
    ]);
    let mut latency = Table::new(&[
        ("SHARD", false),
        ("ACK_P50", true),
        ("ACK_P90", true),
        ("ACK_P99", true),
        ("PUSH_P50", true),
        ("PUSH_P90", true),
        ("PUSH_P99", true),
    ]);
    let rows = r.stats.shards.iter().map(|s| (s.shard.to_string(), s)).chain([("total".to_owned(), &r.totals)]);
    for (name, s) in rows {
        traffic.row(vec![
            name.clone(),
            s.connections.to_string(),
            s.handshakes.to_string(),
            s.handshake_failures.to_string(),
            s.auth_failures.to_string(),
            s.frames_in.to_string(),
            s.frames_out.to_string(),
            s.messages_accepted.to_string(),
            s.deliveries.to_string(),
            s.acks.to_string(),
            s.resends.to_string(),
            s.mesh_queue_depth.to_string(),
            fmt_bytes(s.outbound_bytes_queued),
        ]);
        let (a, p) = (&s.ack_latency, &s.push_latency);
        latency.row(vec![
            name,
            fmt_latency(a, a.p50),
            fmt_latency(a, a.p90),
            fmt_latency(a, a.p99),
            fmt_latency(p, p.p50),
            fmt_latency(p, p.p90),
            fmt_latency(p, p.p99),
        ]);
    }
    out.push_str(&traffic.render());
    out.push('\n');
    out.push_str(&latency.render());

    out.push_str("\nconnections closed, by reason\n");
    if r.totals.closes.is_empty() {
        out.push_str("  (none)\n");
    } else {
        let mut closes = Table::new(&[("REASON", false), ("COUNT", true)]);
        let mut by_count: Vec<(&String, &u64)> = r.totals.closes.iter().collect();
        by_count.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
        for (reason, count) in by_count {
            closes.row(vec![reason.clone(), count.to_string()]);
        }
        out.push_str(&closes.render());
    }

    out.push_str("\nstorage\n");
    match &r.stats.storage {
        Some(st) => {
            let mut t = Table::new(&[
                ("BATCHES", true),
                ("OPS", true),
                ("QUEUE", true),
                ("BATCH_P50", true),
                ("BATCH_P99", true),
                ("COMMIT_P50", true),
                ("COMMIT_P99", true),
            ]);
            let size = |h: &HistogramSnapshot, v: f64| {
                if h.count == 0 {
                    "-".to_owned()
                } else {
                    format!("{v:.0}")
                }
            };
            t.row(vec![
                st.batches.to_string(),
                st.ops.to_string(),
                st.queue_depth.to_string(),
                size(&st.batch_size, st.batch_size.p50),
                size(&st.batch_size, st.batch_size.p99),
                fmt_latency(&st.commit_latency, st.commit_latency.p50),
                fmt_latency(&st.commit_latency, st.commit_latency.p99),
            ]);
            out.push_str(&t.render());
        }
        None => out.push_str("  (no local store)\n"),
    }

    if let Some(ev) = &r.stats.events {
        let _ = writeln!(
            out,
            "\nevents  {}  {}",
            ev.webhook_url,
            if ev.dispatching { "delivering" } else { "standing by (another node delivers)" }
        );
        let mut t = Table::new(&[
            ("BATCHES", true),
            ("EVENTS", true),
            ("ACKED_THROUGH", true),
            ("FAILURES", true),
            ("FAILING_NOW", true),
            ("LAST_ERROR", false),
        ]);
        t.row(vec![
            ev.batches_sent.to_string(),
            ev.events_sent.to_string(),
            ev.acked_through.to_string(),
            ev.failures.to_string(),
            ev.consecutive_failures.to_string(),
            ev.last_error.clone().unwrap_or_else(|| "-".into()),
        ]);
        out.push_str(&t.render());
    }

    if let Some(cl) = &r.stats.cluster {
        let _ = writeln!(out, "\ncluster  node {}", cl.node_id);
        let mut t = Table::new(&[
            ("READ_SHARED", true),
            ("READ_OWN", true),
            ("PUB_SHARED", true),
            ("PUB_ROUTED", true),
            ("APPENDS", true),
            ("PRESENCE", true),
            ("QUEUED", true),
            ("DROPPED", true),
            ("REDIS_ERRORS", true),
            ("REDIS_AGE", true),
        ]);
        t.row(vec![
            cl.shared_entries_read.to_string(),
            cl.own_entries_read.to_string(),
            cl.published_shared.to_string(),
            cl.published_routed.to_string(),
            cl.routed_appends.to_string(),
            cl.presence_writes.to_string(),
            cl.queue_depth.to_string(),
            cl.dropped.to_string(),
            cl.redis_errors.to_string(),
            format!("{:.1}s", cl.out_ok_age_ms.max(cl.in_ok_age_ms) as f64 / 1000.0),
        ]);
        out.push_str(&t.render());
    }

    if !r.stats.api.is_empty() {
        out.push_str("\napi requests\n");
        let mut t = Table::new(&[("ROUTE", false), ("STATUS", true), ("COUNT", true)]);
        for a in &r.stats.api {
            t.row(vec![a.route.clone(), a.status.to_string(), a.count.to_string()]);
        }
        out.push_str(&t.render());
    }

    if !r.stats.api_latency.is_empty() {
        out.push_str("\napi answer time\n");
        let mut t = Table::new(&[("ROUTE", false), ("P50", true), ("P90", true), ("P99", true), ("COUNT", true)]);
        for a in &r.stats.api_latency {
            let h = &a.latency;
            t.row(vec![
                a.route.clone(),
                fmt_latency(h, h.p50),
                fmt_latency(h, h.p90),
                fmt_latency(h, h.p99),
                h.count.to_string(),
            ]);
        }
        out.push_str(&t.render());
    }
    out
}

fn conn_table(items: &[&ConnInfo], now_ms: u64, with_user: bool) -> Table {
    let mut cols = vec![("SESSION", false)];
    if with_user {
        cols.push(("USER", false));
    }
    cols.extend([
        ("DEVICE", false),
        ("PLATFORM", false),
        ("SHARD", true),
        ("REMOTE", false),
        ("CONNECTED", false),
        ("AGE", true),
        ("IDLE", true),
        ("UNACKED", true),
        ("QUEUED", true),
    ]);
    let mut t = Table::new(&cols);
    for c in items {
        let mut row = vec![c.session.clone()];
        if with_user {
            row.push(c.user.clone());
        }
        row.extend([
            c.device.clone(),
            c.platform.clone(),
            c.shard.to_string(),
            c.remote.clone(),
            fmt_time(c.since_ms),
            fmt_age(now_ms.saturating_sub(c.since_ms) / 1000),
            fmt_age(now_ms.saturating_sub(c.last_activity_ms) / 1000),
            c.unacked.to_string(),
            fmt_bytes(c.queued_bytes),
        ]);
        t.row(row);
    }
    t
}

fn render_connections(r: &ConnectionsReport, now_ms: u64) -> String {
    let shown = r.connections.len();
    let mut out = if shown == 0 {
        format!("no live connections on this page ({} in total)\n", r.total)
    } else {
        format!(
            "live connections {}-{} of {} (sort {} {})\n",
            r.offset + 1,
            r.offset + shown,
            r.total,
            r.sort.as_str(),
            r.order.as_str()
        )
    };
    if shown > 0 {
        let items: Vec<&ConnInfo> = r.connections.iter().collect();
        out.push_str(&conn_table(&items, now_ms, true).render());
    }
    out.push_str("\nrecent closes (newest first)\n");
    if r.recent_closes.is_empty() {
        out.push_str("  (none)\n");
        return out;
    }
    let mut t = Table::new(&[
        ("CLOSED", false),
        ("USER", false),
        ("DEVICE", false),
        ("PLATFORM", false),
        ("SHARD", true),
        ("REMOTE", false),
        ("LASTED", true),
        ("REASON", false),
    ]);
    for c in &r.recent_closes {
        t.row(vec![
            fmt_time(c.closed_ms),
            c.conn.user.clone(),
            c.conn.device.clone(),
            c.conn.platform.clone(),
            c.conn.shard.to_string(),
            c.conn.remote.clone(),
            fmt_age(c.closed_ms.saturating_sub(c.conn.since_ms) / 1000),
            c.reason.clone(),
        ]);
    }
    out.push_str(&t.render());
    out
}

fn render_user(r: &UserReport, now_ms: u64) -> String {
    if !r.online {
        return format!("user {} is offline (no live connections)\n", r.user);
    }
    let mut out = format!("user {}: {} live connection(s)\n", r.user, r.connections.len());
    let items: Vec<&ConnInfo> = r.connections.iter().collect();
    out.push_str(&conn_table(&items, now_ms, false).render());
    out
}

/// A table with aligned columns: a header row, two spaces between columns, numeric
/// columns right-aligned, no trailing spaces.
struct Table {
    cols: Vec<(&'static str, bool)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(cols: &[(&'static str, bool)]) -> Table {
        Table { cols: cols.to_vec(), rows: Vec::new() }
    }

    fn row(&mut self, row: Vec<String>) {
        debug_assert_eq!(row.len(), self.cols.len());
        self.rows.push(row);
    }

    fn render(&self) -> String {
        let mut widths: Vec<usize> = self.cols.iter().map(|(h, _)| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let header: Vec<String> = self.cols.iter().map(|(h, _)| (*h).to_owned()).collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                let (_, right) = self.cols[i];
                let pad = widths[i].saturating_sub(cell.chars().count());
                if i > 0 {
                    line.push_str("  ");
                }
                if right {
                    line.extend(std::iter::repeat_n(' ', pad));
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `42s`, `3m05s`, `1h02m`, `2d03h`.
fn fmt_age(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        3600..86400 => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d{:02}h", secs / 86400, secs % 86400 / 3600),
    }
}

/// A latency in seconds: `850µs`, `1.20ms`, `2.50s`; `-` when nothing was recorded.
fn fmt_latency(h: &HistogramSnapshot, secs: f64) -> String {
    if h.count == 0 {
        return "-".to_owned();
    }
    if secs < 0.001 {
        format!("{:.0}µs", secs * 1e6)
    } else if secs < 1.0 {
        format!("{:.2}ms", secs * 1e3)
    } else {
        format!("{secs:.2}s")
    }
}

/// `512 B`, `64.0 KiB`, `1.5 MiB`, `2.0 GiB`.
fn fmt_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// Unix milliseconds as `YYYY-MM-DD HH:MM:SSZ` (UTC); `-` for 0.
fn fmt_time(ms: u64) -> String {
    if ms == 0 {
        return "-".to_owned();
    }
    let secs = ms / 1000;
    let (days, rem) = (secs / 86400, secs % 86400);
    let (y, m, d) = civil_from_days(days as i64);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::histogram::Histogram;
    use crate::view::{
        ApiRouteLatency, ClosedConn, ClusterStats, EventStats, NodeInfo, NodeStats, ShardStats, StorageStats,
    };

    fn resp(value: &impl serde::Serialize) -> RawResponse {
        RawResponse { status: 200, headers: vec![], body: serde_json::to_vec(value).unwrap() }
    }

    fn conn(user: &str, device: &str, since_ms: u64) -> ConnInfo {
        ConnInfo {
            session: format!("s-{user}-{device}"),
            user: user.into(),
            device: device.into(),
            platform: "web".into(),
            shard: 1,
            remote: "10.0.0.7:51234".into(),
            since_ms,
            last_activity_ms: since_ms + 60_000,
            unacked: 2,
            queued_bytes: 1536,
        }
    }

    const NOW: u64 = 1_764_151_200_000; // 2025-11-26 10:00:00Z

    #[test]
    fn formats() {
        assert_eq!(fmt_time(NOW), "2025-11-26 10:00:00Z");
        assert_eq!(fmt_time(0), "-");
        assert_eq!(fmt_time(951_782_400_000), "2000-02-29 00:00:00Z");
        assert_eq!(fmt_age(5), "5s");
        assert_eq!(fmt_age(185), "3m05s");
        assert_eq!(fmt_age(3720), "1h02m");
        assert_eq!(fmt_age(183_600), "2d03h");
        assert_eq!(fmt_bytes(512), "512 B");
        assert_eq!(fmt_bytes(65_536), "64.0 KiB");
        assert_eq!(fmt_bytes(1_572_864), "1.5 MiB");
        let mut h = Histogram::latency();
        h.record(0.0012);
        let s = h.snapshot();
        assert_eq!(fmt_latency(&s, 0.000_85), "850µs");
        assert_eq!(fmt_latency(&s, 0.0012), "1.20ms");
        assert_eq!(fmt_latency(&s, 2.5), "2.50s");
        assert_eq!(fmt_latency(&HistogramSnapshot::default(), 0.0), "-");
    }

    #[test]
    fn tables_align() {
        let mut t = Table::new(&[("NAME", false), ("N", true)]);
        t.row(vec!["a".into(), "1".into()]);
        t.row(vec!["longer".into(), "1234".into()]);
        assert_eq!(t.render(), "NAME       N\na          1\nlonger  1234\n");
    }

    #[test]
    fn target_resolution_order() {
        let env = |k: &str| match k {
            ENV_ADDR => Some("env:1".to_owned()),
            ENV_TOKEN => Some("env-token".to_owned()),
            _ => None,
        };
        let no_env = |_: &str| None;
        let local = || (Some("local:2".to_owned()), Some("local-token".to_owned()));
        assert_eq!(
            resolve_target(Some("flag:3"), Some("flag-token"), env, local),
            ("flag:3".to_owned(), "flag-token".to_owned())
        );
        assert_eq!(
            resolve_target(None, None, env, || panic!("env suffices")),
            ("env:1".to_owned(), "env-token".to_owned())
        );
        assert_eq!(resolve_target(Some(""), None, no_env, local), ("local:2".to_owned(), "local-token".to_owned()));
        assert_eq!(resolve_target(None, None, no_env, || (None, None)), (DEFAULT_ADDR.to_owned(), String::new()));
    }

    #[test]
    fn requests() {
        let (m, p, b) = request_of(&AdminCommand::Stats).unwrap();
        assert_eq!((m, p.as_str(), b), ("GET", "/admin/v1/stats", None));
        let q = ConnQuery::parse("sort=queued_bytes&limit=5").unwrap();
        let (_, p, _) = request_of(&AdminCommand::Connections(q)).unwrap();
        assert_eq!(p, "/admin/v1/connections?sort=queued_bytes&limit=5");
        let (m, p, b) = request_of(&AdminCommand::Kick {
            uid: "bob@x".into(),
            device: Some("web-1".into()),
            reason: None,
            revoke: false,
        })
        .unwrap();
        assert_eq!((m, p.as_str()), ("POST", "/admin/v1/users/bob@x/kick"));
        let body: serde_json::Value = serde_json::from_slice(&b.unwrap()).unwrap();
        assert_eq!(body["device"], "web-1");
        assert_eq!(body.get("revoke"), None, "left out unless asked");
        let kick = AdminCommand::Kick { uid: "bob".into(), device: None, reason: None, revoke: true };
        let body: serde_json::Value = serde_json::from_slice(&request_of(&kick).unwrap().2.unwrap()).unwrap();
        assert_eq!(body["revoke"], true);
        assert!(matches!(request_of(&AdminCommand::User { uid: "a b".into() }), Err(CliError::Usage(_))));
    }

    #[test]
    fn stats_output() {
        let mut shard = ShardStats {
            shard: 0,
            connections: 1234,
            messages_accepted: 99,
            outbound_bytes_queued: 65_536,
            ..ShardStats::default()
        };
        let mut h = Histogram::latency();
        h.record(0.002);
        shard.ack_latency = h.snapshot();
        shard.closes = BTreeMap::from([("idle".into(), 5), ("kicked".into(), 9)]);
        let stats = NodeStats {
            node: NodeInfo {
                id: "node-a".into(),
                version: "0.1.0".into(),
                started_ms: NOW,
                uptime_s: 3720,
                draining: true,
            },
            shards: vec![shard.clone(), ShardStats { shard: 1, ..shard }],
            storage: Some(StorageStats::default()),
            api: vec![],
            api_latency: vec![ApiRouteLatency { route: "POST /v1/messages".into(), latency: h.snapshot() }],
            events: Some(EventStats {
                webhook_url: "http://hooks.example/e".into(),
                dispatching: false,
                events_sent: 31,
                last_error: Some("HTTP 502".into()),
                ..EventStats::default()
            }),
            cluster: Some(ClusterStats {
                node_id: "node-a".into(),
                own_entries_read: 4321,
                published_routed: 777,
                in_ok_age_ms: 2500,
                ..ClusterStats::default()
            }),
        };
        let out = render(&AdminCommand::Stats, &resp(&StatsReport::from(stats)), NOW).unwrap();
        assert!(out.starts_with("node node-a  version 0.1.0  up 1h02m"), "{out}");
        assert!(out.contains("DRAINING"));
        let total = out.lines().find(|l| l.starts_with("total") && l.contains("2468")).expect("totals row");
        assert!(total.contains("128.0 KiB"), "{total}");
        assert!(out.contains("ACK_P99"));
        let api = out.lines().find(|l| l.starts_with("POST /v1/messages")).expect("api answer time row");
        assert!(api.contains("2.00ms") && api.ends_with('1'), "{api}");
        // Reasons sorted by count, biggest first.
        let kicked = out.find("kicked").unwrap();
        let idle = out.find("idle ").unwrap();
        assert!(kicked < idle, "{out}");
        assert!(out.contains("storage\nBATCHES"));
        assert!(out.contains("events  http://hooks.example/e  standing by"), "{out}");
        assert!(out.lines().any(|l| l.contains("31") && l.ends_with("HTTP 502")), "{out}");
        assert!(out.contains("cluster  node node-a\nREAD_SHARED"), "{out}");
        let row = out.lines().find(|l| l.contains("4321")).expect("cluster row");
        assert!(row.contains("777") && row.ends_with("2.5s"), "{row}");
        for line in out.lines() {
            assert_eq!(line, line.trim_end(), "no trailing spaces");
        }
    }

    #[test]
    fn connections_and_user_output() {
        let report = ConnectionsReport {
            total: 57,
            offset: 20,
            limit: 2,
            sort: crate::ConnSort::Since,
            order: crate::SortOrder::Asc,
            connections: vec![conn("alice", "phone", NOW - 185_000), conn("bob", "laptop", NOW - 5_000)],
            recent_closes: vec![ClosedConn {
                conn: conn("carol", "tab", NOW - 3_600_000),
                closed_ms: NOW - 1000,
                reason: "slow_consumer".into(),
            }],
        };
        let cmd = AdminCommand::Connections(ConnQuery::default());
        let out = render(&cmd, &resp(&report), NOW).unwrap();
        assert!(out.starts_with("live connections 21-22 of 57 (sort since asc)\n"), "{out}");
        let alice = out.lines().find(|l| l.contains("alice")).unwrap();
        assert!(alice.contains("phone") && alice.contains("3m05s"), "{alice}");
        assert!(alice.contains("1.5 KiB"), "{alice}");
        assert!(out.contains("slow_consumer"));
        assert!(out.contains("59m59s"), "lasted: {out}");

        let user =
            UserReport { user: "alice".into(), online: true, connections: vec![conn("alice", "phone", NOW - 185_000)] };
        let out = render(&AdminCommand::User { uid: "alice".into() }, &resp(&user), NOW).unwrap();
        assert!(out.starts_with("user alice: 1 live connection(s)\n"));
        assert!(!out.contains("USER"), "the user column is implied");
        let offline = UserReport { user: "zed".into(), ..UserReport::default() };
        let out = render(&AdminCommand::User { uid: "zed".into() }, &resp(&offline), NOW).unwrap();
        assert_eq!(out, "user zed is offline (no live connections)\n");
    }

    #[test]
    fn kick_and_drain_output() {
        let cmd = AdminCommand::Kick { uid: "bob".into(), device: Some("web".into()), reason: None, revoke: false };
        let out = render(&cmd, &resp(&KickReport { kicked: 1, revoked_before_ms: None }), NOW).unwrap();
        assert_eq!(out, "kicked 1 terminal(s) of user bob, device web\n");
        let out = render(&AdminCommand::Drain, &resp(&DrainReport { started: true, connections: 7 }), NOW).unwrap();
        assert!(out.starts_with("drain started: 7 terminal(s)"));
        let bad = RawResponse { status: 200, headers: vec![], body: b"{\"nope\":1}".to_vec() };
        assert!(matches!(render(&AdminCommand::Drain, &bad, NOW), Err(CliError::Decode(_))));
    }
}
