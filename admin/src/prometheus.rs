//! [`NodeStats`] as Prometheus text exposition format 0.0.4 ([`render`]). Owns naming,
//! labels, escaping and histogram layout; reads only the view data, keeps no state.
//!
//! Every family is named `ether_*`, has `# HELP` and `# TYPE`, and appears once with all its
//! samples together. Per-shard families carry `shard="N"`; closes add `reason="..."`; API
//! requests carry `route="..."` and `status="..."`. Counters end in `_total`; latencies are in
//! seconds (`_seconds`). Histograms write `_bucket{le=...}` (cumulative, ending in `+Inf`),
//! `_sum` and `_count`.

use std::fmt::Write;

use crate::histogram::HistogramSnapshot;
use crate::view::{NodeStats, ShardStats};

/// The `Content-Type` of `/metrics`.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A per-shard counter or gauge: name, help, type, and how to read it from a shard.
type ShardMetric = (&'static str, &'static str, Kind, fn(&ShardStats) -> u64);
/// A per-shard histogram: name, help, and how to read it from a shard.
type ShardHistogram = (&'static str, &'static str, fn(&ShardStats) -> &HistogramSnapshot);

const SHARD_METRICS: [ShardMetric; 23] = [
    ("ether_connections", "Live terminal connections.", Kind::Gauge, |s| s.connections),
    ("ether_handshakes_total", "WebSocket handshakes completed.", Kind::Counter, |s| s.handshakes),
    ("ether_handshake_failures_total", "WebSocket handshakes refused, for any reason.", Kind::Counter, |s| {
        s.handshake_failures
    }),
    ("ether_auth_failures_total", "Handshakes refused for a missing, bad or expired token.", Kind::Counter, |s| {
        s.auth_failures
    }),
    ("ether_frames_in_total", "Frames received from terminals.", Kind::Counter, |s| s.frames_in),
    ("ether_frames_out_total", "Frames sent to terminals.", Kind::Counter, |s| s.frames_out),
    (
        "ether_socket_writes_total",
        "Writes (sendmsg calls) to terminal sockets; frames out per write is the write coalescing.",
        Kind::Counter,
        |s| s.socket_writes,
    ),
    ("ether_messages_accepted_total", "Messages accepted and made durable.", Kind::Counter, |s| s.messages_accepted),
    ("ether_deliveries_total", "Messages pushed to terminals (first sends).", Kind::Counter, |s| s.deliveries),
    ("ether_acks_total", "Delivery acks received from terminals.", Kind::Counter, |s| s.acks),
    ("ether_resends_total", "Unacked messages sent again after a timeout.", Kind::Counter, |s| s.resends),
    ("ether_mesh_queue_depth", "Items waiting in the shard's cross-shard queues.", Kind::Gauge, |s| s.mesh_queue_depth),
    ("ether_outbound_bytes_queued", "Bytes queued for terminals and not yet written.", Kind::Gauge, |s| {
        s.outbound_bytes_queued
    }),
    (
        "ether_parked_connections",
        "Idle connections parked out of their tasks (a subset of ether_connections).",
        Kind::Gauge,
        |s| s.parked_connections,
    ),
    ("ether_parks_total", "Times an idle connection was parked.", Kind::Counter, |s| s.parks),
    (
        "ether_terminal_rate_limited_total",
        "Terminal frames refused for going over a rate limit (limits.terminal_*_per_s).",
        Kind::Counter,
        |s| s.rate_limited,
    ),
    ("ether_tls_handshakes_total", "TLS handshakes completed on the wss:// listener.", Kind::Counter, |s| {
        s.tls_handshakes
    }),
    (
        "ether_tls_handshake_failures_total",
        "TLS handshakes failed, timed out or refused at limits.tls_handshakes_per_shard_max.",
        Kind::Counter,
        |s| s.tls_handshake_failures,
    ),
    (
        "ether_tls_resumptions_total",
        "TLS handshakes that resumed an earlier session with a ticket (a subset of ether_tls_handshakes_total).",
        Kind::Counter,
        |s| s.tls_resumptions,
    ),
    (
        "ether_events_retried_total",
        "Events written to the outbox again after a failed write (the store's queue was full or it failed).",
        Kind::Counter,
        |s| s.events_retried,
    ),
    (
        "ether_events_dropped_total",
        "Events dropped past limits.events_pending_max while the store could not take them (lost to the webhook).",
        Kind::Counter,
        |s| s.events_dropped,
    ),
    (
        "ether_group_unreached_events_total",
        "group.unreached events made: group messages that found members with no terminal online.",
        Kind::Counter,
        |s| s.group_unreached_events,
    ),
    (
        "ether_group_fanouts_total",
        "Group messages handed to the shard to fan out (only shards with a member of the group online get them).",
        Kind::Counter,
        |s| s.group_fanouts,
    ),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// Renders `stats` as Prometheus text exposition 0.0.4.
pub fn render(stats: &NodeStats) -> String {
    let mut out = Out(String::with_capacity(4096 + stats.shards.len() * 4096));
    let node = &stats.node;

    out.family("ether_node_info", "Node identity; always 1.", Kind::Gauge);
    out.sample("ether_node_info", &[("node", &node.id), ("version", &node.version)], 1.0);
    out.family("ether_node_start_time_seconds", "When the node started, Unix seconds.", Kind::Gauge);
    out.sample("ether_node_start_time_seconds", &[], node.started_ms as f64 / 1000.0);
    out.family("ether_node_uptime_seconds", "Seconds since the node started.", Kind::Gauge);
    out.sample("ether_node_uptime_seconds", &[], node.uptime_s as f64);
    out.family("ether_node_draining", "1 while the node drains (no new connections), else 0.", Kind::Gauge);
    out.sample("ether_node_draining", &[], if node.draining { 1.0 } else { 0.0 });
    out.family("ether_shards", "Shard threads of the node.", Kind::Gauge);
    out.sample("ether_shards", &[], stats.shards.len() as f64);

    let shard_labels: Vec<String> = stats.shards.iter().map(|s| s.shard.to_string()).collect();
    for (name, help, kind, read) in SHARD_METRICS {
        out.family(name, help, kind);
        for (s, label) in stats.shards.iter().zip(&shard_labels) {
            out.sample(name, &[("shard", label)], read(s) as f64);
        }
    }

    let name = "ether_connections_closed_total";
    out.family(name, "Terminal connections closed, by close reason.", Kind::Counter);
    for (s, label) in stats.shards.iter().zip(&shard_labels) {
        for (reason, n) in &s.closes {
            out.sample(name, &[("shard", label), ("reason", reason)], *n as f64);
        }
    }

    let histograms: [ShardHistogram; 2] = [
        ("ether_ack_latency_seconds", "Seconds from pushing a message to its ack.", |s| &s.ack_latency),
        (
            "ether_push_latency_seconds",
            "Seconds from accepting a message to pushing it to a terminal (end to end).",
            |s| &s.push_latency,
        ),
    ];
    for (name, help, read) in histograms {
        out.family(name, help, Kind::Histogram);
        for (s, label) in stats.shards.iter().zip(&shard_labels) {
            out.histogram(name, &[("shard", label)], read(s));
        }
    }

    if let Some(st) = &stats.storage {
        out.family("ether_storage_batches_total", "Store write batches committed.", Kind::Counter);
        out.sample("ether_storage_batches_total", &[], st.batches as f64);
        out.family("ether_storage_ops_total", "Store operations committed.", Kind::Counter);
        out.sample("ether_storage_ops_total", &[], st.ops as f64);
        out.family("ether_storage_queue_depth", "Store operations waiting for the writer.", Kind::Gauge);
        out.sample("ether_storage_queue_depth", &[], st.queue_depth as f64);
        out.family(
            "ether_storage_queue_bytes",
            "Payload bytes of the store operations queued or being applied (unavailable past 256 MiB).",
            Kind::Gauge,
        );
        out.sample("ether_storage_queue_bytes", &[], st.queue_bytes as f64);
        out.family("ether_storage_batch_size", "Operations per committed store batch.", Kind::Histogram);
        out.histogram("ether_storage_batch_size", &[], &st.batch_size);
        out.family("ether_storage_commit_latency_seconds", "Seconds per store commit.", Kind::Histogram);
        out.histogram("ether_storage_commit_latency_seconds", &[], &st.commit_latency);
        out.family("ether_outbox_events", "Events in the durable outbox, waiting for the webhook.", Kind::Gauge);
        out.sample("ether_outbox_events", &[], st.outbox_events as f64);
        out.family(
            "ether_outbox_dropped_total",
            "Oldest outbox events dropped because the outbox was at events.outbox_max.",
            Kind::Counter,
        );
        out.sample("ether_outbox_dropped_total", &[], st.outbox_dropped as f64);
    }

    if let Some(ev) = &stats.events {
        let families: [(&str, &str, Kind, u64); 5] = [
            (
                "ether_events_dispatching",
                "1 while this node delivers the event outbox to the webhook.",
                Kind::Gauge,
                u64::from(ev.dispatching),
            ),
            ("ether_events_batches_total", "Event batches the webhook answered 2xx.", Kind::Counter, ev.batches_sent),
            ("ether_events_sent_total", "Events delivered to the webhook.", Kind::Counter, ev.events_sent),
            (
                "ether_events_failures_total",
                "Failed webhook attempts (non-2xx, timeouts, errors).",
                Kind::Counter,
                ev.failures,
            ),
            (
                "ether_events_consecutive_failures",
                "Failed webhook attempts since the last success.",
                Kind::Gauge,
                ev.consecutive_failures,
            ),
        ];
        for (name, help, kind, value) in families {
            out.family(name, help, kind);
            out.sample(name, &[], value as f64);
        }
    }

    if let Some(cl) = &stats.cluster {
        let name = "ether_cluster_bus_entries_read_total";
        out.family(name, "Bus entries read, from the stream every node reads and from this node's own.", Kind::Counter);
        out.sample(name, &[("stream", "shared")], cl.shared_entries_read as f64);
        out.sample(name, &[("stream", "own")], cl.own_entries_read as f64);
        let name = "ether_cluster_published_total";
        out.family(
            name,
            "Events published to the other nodes: shared, or routed by presence to one user's nodes.",
            Kind::Counter,
        );
        out.sample(name, &[("bus", "shared")], cl.published_shared as f64);
        out.sample(name, &[("bus", "routed")], cl.published_routed as f64);
        let families: [(&str, &str, Kind, u64); 7] = [
            (
                "ether_cluster_routed_appends_total",
                "Appends routed events made to other nodes' streams.",
                Kind::Counter,
                cl.routed_appends,
            ),
            ("ether_cluster_presence_writes_total", "Presence entries written.", Kind::Counter, cl.presence_writes),
            (
                "ether_cluster_dropped_total",
                "Items dropped on the way to Redis (queue full or failed write).",
                Kind::Counter,
                cl.dropped,
            ),
            ("ether_cluster_redis_errors_total", "Failed Redis round trips.", Kind::Counter, cl.redis_errors),
            (
                "ether_cluster_resyncs_total",
                "Checks of every local inbox and group against the store after bus entries were lost.",
                Kind::Counter,
                cl.resyncs,
            ),
            (
                "ether_cluster_idgen_slots_lost_total",
                "Message-id generator slots found held by another node after this node's lease lapsed.",
                Kind::Counter,
                cl.idgen_slots_lost,
            ),
            ("ether_cluster_queue_depth", "Items waiting to be written to Redis.", Kind::Gauge, cl.queue_depth),
        ];
        for (name, help, kind, value) in families {
            out.family(name, help, kind);
            out.sample(name, &[], value as f64);
        }
        let name = "ether_cluster_redis_age_seconds";
        out.family(name, "Seconds since Redis last answered each cluster thread.", Kind::Gauge);
        out.sample(name, &[("thread", "out")], cl.out_ok_age_ms as f64 / 1000.0);
        out.sample(name, &[("thread", "in")], cl.in_ok_age_ms as f64 / 1000.0);
    }

    let name = "ether_api_requests_total";
    out.family(name, "Requests answered by the api port, by route and status.", Kind::Counter);
    for r in &stats.api {
        let status = r.status.to_string();
        out.sample(name, &[("route", &r.route), ("status", &status)], r.count as f64);
    }

    let name = "ether_api_latency_seconds";
    out.family(
        name,
        "Seconds the api port took to answer, by route (handler start to answer; a message is answered once durable).",
        Kind::Histogram,
    );
    for r in &stats.api_latency {
        out.histogram(name, &[("route", &r.route)], &r.latency);
    }
    out.0
}

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, help: &str, kind: Kind) {
        let _ = writeln!(self.0, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.0, "# TYPE {name} {}", kind.as_str());
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.0.push_str(name);
        self.labels(labels, None);
        self.0.push(' ');
        self.0.push_str(&format_value(value));
        self.0.push('\n');
    }

    fn labels(&mut self, labels: &[(&str, &str)], le: Option<&str>) {
        if labels.is_empty() && le.is_none() {
            return;
        }
        self.0.push('{');
        let extra = le.map(|le| ("le", le));
        for (i, (k, v)) in labels.iter().copied().chain(extra).enumerate() {
            if i > 0 {
                self.0.push(',');
            }
            let _ = write!(self.0, "{k}=\"{}\"", escape_label(v));
        }
        self.0.push('}');
    }

    fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &HistogramSnapshot) {
        let bucket = format!("{name}_bucket");
        let mut last = 0u64;
        for (bound, count) in h.bounds.iter().zip(&h.counts) {
            // Cumulative by construction; never let a bad snapshot go backwards or past count.
            last = (*count).max(last).min(h.count);
            self.0.push_str(&bucket);
            self.labels(labels, Some(&format_value(*bound)));
            let _ = writeln!(self.0, " {last}");
        }
        self.0.push_str(&bucket);
        self.labels(labels, Some("+Inf"));
        let _ = writeln!(self.0, " {}", h.count);
        self.sample(&format!("{name}_sum"), labels, h.sum);
        self.sample(&format!("{name}_count"), labels, h.count as f64);
    }
}

/// A sample value or `le` bound: integers without a fraction, `+Inf`, `-Inf`, `NaN`.
fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else if v == f64::INFINITY {
        "+Inf".to_owned()
    } else if v == f64::NEG_INFINITY {
        "-Inf".to_owned()
    } else {
        // Rust's shortest round-trip form: `1`, `0.005`, `1e-7`.
        format!("{v}")
    }
}

/// HELP text: `\` and newline escaped.
fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Label values: `\`, `"` and newline escaped.
fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap, HashSet};

    use super::*;
    use crate::histogram::Histogram;
    use crate::view::{ApiRouteLatency, ApiRouteStats, ClusterStats, EventStats, NodeInfo, StorageStats};

    /// One parsed sample.
    #[derive(Debug, Clone, PartialEq)]
    struct Sample {
        name: String,
        labels: BTreeMap<String, String>,
        value: f64,
    }

    /// A strict parser of the text format: every line is a `# HELP`, a `# TYPE` or a sample;
    /// names are valid; label values are quoted with only `\\`, `\"`, `\n` escapes; values
    /// parse; each family is declared (HELP, then TYPE) once, before its samples, and its
    /// samples are contiguous; no series repeats.
    fn parse(text: &str) -> (HashMap<String, String>, Vec<Sample>) {
        assert!(text.ends_with('\n'), "exposition ends with a newline");
        let mut types: HashMap<String, String> = HashMap::new();
        let mut helps: HashSet<String> = HashSet::new();
        let mut samples = Vec::new();
        let mut current: Option<String> = None;
        let mut finished: HashSet<String> = HashSet::new();
        let mut series: HashSet<String> = HashSet::new();
        for (n, line) in text.lines().enumerate() {
            let at = format!("line {}: {line:?}", n + 1);
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').expect(&at);
                assert!(valid_name(name), "{at}");
                assert!(!help.is_empty(), "{at}: empty help");
                assert!(helps.insert(name.to_owned()), "{at}: second HELP");
                if let Some(prev) = current.replace(name.to_owned()) {
                    finished.insert(prev);
                }
                assert!(!finished.contains(name), "{at}: family split");
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect(&at);
                assert_eq!(current.as_deref(), Some(name), "{at}: TYPE right after HELP");
                assert!(["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind), "{at}");
                assert!(types.insert(name.to_owned(), kind.to_owned()).is_none(), "{at}: second TYPE");
                continue;
            }
            assert!(!line.starts_with('#'), "{at}: unknown comment");
            let sample = parse_sample(line, &at);
            let family = current.clone().expect("a sample before any family");
            let kind = types.get(&family).expect("TYPE before samples");
            let ok = match kind.as_str() {
                "histogram" => [format!("{family}_bucket"), format!("{family}_sum"), format!("{family}_count")]
                    .contains(&sample.name),
                _ => sample.name == family,
            };
            assert!(ok, "{at}: sample outside its family {family}");
            let key = format!("{}{:?}", sample.name, sample.labels);
            assert!(series.insert(key), "{at}: duplicate series");
            samples.push(sample);
        }
        for name in types.keys() {
            assert!(helps.contains(name), "{name} has TYPE but no HELP");
        }
        (types, samples)
    }

    fn valid_name(name: &str) -> bool {
        let mut chars = name.chars();
        chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }

    fn parse_sample(line: &str, at: &str) -> Sample {
        let name_end = line.find(['{', ' ']).expect(at);
        let name = &line[..name_end];
        assert!(valid_name(name), "{at}: bad name");
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(body) = rest.strip_prefix('{') {
            let mut chars = body.char_indices().peekable();
            loop {
                // label name
                let start = chars.peek().expect(at).0;
                let mut end = start;
                while let Some(&(i, c)) = chars.peek() {
                    if c == '=' {
                        break;
                    }
                    end = i + c.len_utf8();
                    chars.next();
                }
                let lname = &body[start..end];
                assert!(valid_name(lname) && !lname.starts_with("__"), "{at}: label");
                assert_eq!(chars.next().map(|c| c.1), Some('='), "{at}");
                assert_eq!(chars.next().map(|c| c.1), Some('"'), "{at}: unquoted");
                let mut value = String::new();
                loop {
                    match chars.next().expect(at).1 {
                        '"' => break,
                        '\\' => match chars.next().expect(at).1 {
                            '\\' => value.push('\\'),
                            '"' => value.push('"'),
                            'n' => value.push('\n'),
                            c => panic!("{at}: bad escape \\{c}"),
                        },
                        '\n' => panic!("{at}: raw newline"),
                        c => value.push(c),
                    }
                }
                assert!(labels.insert(lname.to_owned(), value).is_none(), "{at}");
                match chars.next().expect(at) {
                    (_, ',') => continue,
                    (i, '}') => {
                        rest = &body[i + 1..];
                        break;
                    }
                    (_, c) => panic!("{at}: unexpected {c:?}"),
                }
            }
        }
        let value = rest.strip_prefix(' ').expect(at);
        assert!(!value.contains(' '), "{at}: timestamps are not used");
        Sample { name: name.to_owned(), labels, value: parse_value(value).expect(at) }
    }

    fn parse_value(v: &str) -> Option<f64> {
        match v {
            "+Inf" => Some(f64::INFINITY),
            "-Inf" => Some(f64::NEG_INFINITY),
            "NaN" => Some(f64::NAN),
            _ => v.parse().ok(),
        }
    }

    fn shard(n: u32) -> ShardStats {
        let mut ack = Histogram::latency();
        let mut push = Histogram::latency();
        for i in 0..100u32 {
            ack.record(f64::from(i) * 0.001);
            push.record(f64::from(i) * 0.0005 + f64::from(n));
        }
        let mut closes = BTreeMap::new();
        closes.insert("idle".to_owned(), 3 + u64::from(n));
        closes.insert("slow_consumer".to_owned(), 1);
        ShardStats {
            shard: n,
            connections: 10 + u64::from(n),
            handshakes: 100,
            handshake_failures: 4,
            auth_failures: 2,
            frames_in: 1000,
            frames_out: 2000,
            socket_writes: 400,
            messages_accepted: 500,
            deliveries: 490,
            acks: 480,
            resends: 7,
            mesh_queue_depth: 3,
            outbound_bytes_queued: 65536,
            parked_connections: 4,
            parks: 9,
            rate_limited: 2,
            tls_handshakes: 30 + u64::from(n),
            tls_handshake_failures: 1,
            tls_resumptions: 5,
            events_retried: 6,
            events_dropped: 0,
            group_unreached_events: 3,
            group_fanouts: 11,
            closes,
            ack_latency: ack.snapshot(),
            push_latency: push.snapshot(),
        }
    }

    fn stats() -> NodeStats {
        let mut batch = Histogram::sizes();
        let mut commit = Histogram::latency();
        for i in 1..50u32 {
            batch.record(f64::from(i));
            commit.record(f64::from(i) * 0.0002);
        }
        NodeStats {
            node: NodeInfo {
                id: "node \"a\"\\b\nc".into(),
                version: "0.1.0".into(),
                started_ms: 1_700_000_000_123,
                uptime_s: 42,
                draining: false,
            },
            shards: vec![shard(0), shard(1), shard(2)],
            storage: Some(StorageStats {
                batches: 49,
                ops: 1225,
                batch_size: batch.snapshot(),
                commit_latency: commit.snapshot(),
                queue_depth: 2,
                queue_bytes: 70_000,
                outbox_events: 1_000_000,
                outbox_dropped: 4_096,
            }),
            events: Some(EventStats {
                webhook_url: "http://hooks.example/ether".into(),
                dispatching: true,
                batches_sent: 7,
                events_sent: 20,
                failures: 3,
                consecutive_failures: 1,
                acked_through: 20,
                last_error: Some("HTTP 503".into()),
            }),
            cluster: Some(ClusterStats {
                node_id: "node-a".into(),
                shared_entries_read: 5,
                own_entries_read: 40,
                published_shared: 2,
                published_routed: 30,
                routed_appends: 12,
                presence_writes: 9,
                dropped: 1,
                redis_errors: 0,
                resyncs: 2,
                idgen_slots_lost: 1,
                queue_depth: 3,
                out_ok_age_ms: 1500,
                in_ok_age_ms: 250,
            }),
            api: vec![
                ApiRouteStats { route: "POST /v1/messages".into(), status: 200, count: 900 },
                ApiRouteStats { route: "GET /v1/users/{uid}/unread".into(), status: 401, count: 3 },
            ],
            api_latency: vec![ApiRouteLatency { route: "POST /v1/messages".into(), latency: commit.snapshot() }],
        }
    }

    fn get<'a>(samples: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> &'a Sample {
        samples
            .iter()
            .find(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
            .unwrap_or_else(|| panic!("no {name} {labels:?}"))
    }

    #[test]
    fn output_parses_and_every_family_is_declared() {
        let text = render(&stats());
        let (types, samples) = parse(&text);
        for (name, kind) in &types {
            assert!(name.starts_with("ether_"), "{name}");
            if kind == "counter" {
                assert!(name.ends_with("_total"), "{name}");
            }
        }
        for s in &samples {
            assert!(s.name.starts_with("ether_"), "{}", s.name);
        }
        // The families the issue asks for.
        for name in [
            "ether_connections",
            "ether_handshakes_total",
            "ether_auth_failures_total",
            "ether_frames_in_total",
            "ether_frames_out_total",
            "ether_socket_writes_total",
            "ether_messages_accepted_total",
            "ether_deliveries_total",
            "ether_acks_total",
            "ether_resends_total",
            "ether_ack_latency_seconds",
            "ether_push_latency_seconds",
            "ether_storage_batch_size",
            "ether_storage_commit_latency_seconds",
            "ether_outbox_events",
            "ether_outbox_dropped_total",
            "ether_storage_queue_bytes",
            "ether_mesh_queue_depth",
            "ether_outbound_bytes_queued",
            "ether_parked_connections",
            "ether_parks_total",
            "ether_connections_closed_total",
            "ether_api_requests_total",
            "ether_api_latency_seconds",
        ] {
            assert!(types.contains_key(name), "missing {name}");
        }
        assert_eq!(types["ether_ack_latency_seconds"], "histogram");
        assert_eq!(types["ether_connections"], "gauge");
        assert_eq!(types["ether_outbox_events"], "gauge");
        assert_eq!(types["ether_outbox_dropped_total"], "counter");
    }

    #[test]
    fn values_and_labels() {
        let text = render(&stats());
        let (_, samples) = parse(&text);
        assert_eq!(get(&samples, "ether_connections", &[("shard", "2")]).value, 12.0);
        assert_eq!(get(&samples, "ether_connections_closed_total", &[("shard", "1"), ("reason", "idle")]).value, 4.0);
        assert_eq!(
            get(&samples, "ether_api_requests_total", &[("route", "GET /v1/users/{uid}/unread"), ("status", "401")])
                .value,
            3.0
        );
        assert_eq!(get(&samples, "ether_api_latency_seconds_count", &[("route", "POST /v1/messages")]).value, 49.0);
        // Escaped label values read back as the original.
        let info = get(&samples, "ether_node_info", &[]);
        assert_eq!(info.labels["node"], "node \"a\"\\b\nc");
        assert_eq!(get(&samples, "ether_node_start_time_seconds", &[]).value, 1_700_000_000.123);
        assert_eq!(get(&samples, "ether_shards", &[]).value, 3.0);
        assert_eq!(get(&samples, "ether_tls_handshakes_total", &[("shard", "2")]).value, 32.0);
        assert_eq!(get(&samples, "ether_events_dispatching", &[]).value, 1.0);
        assert_eq!(get(&samples, "ether_events_sent_total", &[]).value, 20.0);
        assert_eq!(get(&samples, "ether_events_failures_total", &[]).value, 3.0);
        assert_eq!(get(&samples, "ether_outbox_events", &[]).value, 1_000_000.0);
        assert_eq!(get(&samples, "ether_outbox_dropped_total", &[]).value, 4096.0);
        assert_eq!(get(&samples, "ether_storage_queue_bytes", &[]).value, 70_000.0);
        assert_eq!(get(&samples, "ether_cluster_bus_entries_read_total", &[("stream", "own")]).value, 40.0);
        assert_eq!(get(&samples, "ether_cluster_published_total", &[("bus", "routed")]).value, 30.0);
        assert_eq!(get(&samples, "ether_cluster_routed_appends_total", &[]).value, 12.0);
        assert_eq!(get(&samples, "ether_cluster_dropped_total", &[]).value, 1.0);
        assert_eq!(get(&samples, "ether_cluster_resyncs_total", &[]).value, 2.0);
        assert_eq!(get(&samples, "ether_cluster_idgen_slots_lost_total", &[]).value, 1.0);
        assert_eq!(get(&samples, "ether_cluster_redis_age_seconds", &[("thread", "out")]).value, 1.5);
        assert!(text.contains("ether_outbound_bytes_queued{shard=\"0\"} 65536\n"));
    }

    #[test]
    fn histograms_are_cumulative_and_end_in_inf() {
        let text = render(&stats());
        let (types, samples) = parse(&text);
        let mut checked = 0;
        for (family, _) in types.iter().filter(|(_, k)| *k == "histogram") {
            // Group bucket samples by their labels without `le`.
            let mut groups: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
            for s in samples.iter().filter(|s| s.name == format!("{family}_bucket")) {
                let mut key = s.labels.clone();
                let le = key.remove("le").expect("bucket without le");
                let le = parse_value(&le).expect("le parses");
                groups.entry(format!("{key:?}")).or_default().push((le, s.value));
            }
            assert!(!groups.is_empty(), "{family} has no buckets");
            for (key, buckets) in groups {
                assert!(buckets.windows(2).all(|w| w[0].0 < w[1].0), "{family}{key}: le order");
                assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "{family}{key}: cumulative");
                let (last_le, last) = *buckets.last().unwrap();
                assert_eq!(last_le, f64::INFINITY, "{family}{key}: ends in +Inf");
                let count = samples
                    .iter()
                    .find(|s| s.name == format!("{family}_count") && format!("{:?}", s.labels) == key)
                    .expect("_count");
                assert_eq!(count.value, last, "{family}{key}: +Inf == _count");
                assert!(samples.iter().any(|s| s.name == format!("{family}_sum") && format!("{:?}", s.labels) == key));
                checked += 1;
            }
        }
        // 2 per-shard histograms x 3 shards + 2 storage histograms + 1 API route.
        assert_eq!(checked, 9);
    }

    #[test]
    fn empty_node_still_parses() {
        let text = render(&NodeStats::default());
        let (types, samples) = parse(&text);
        assert!(types.contains_key("ether_connections"));
        assert!(!types.contains_key("ether_storage_ops_total"), "no store, no storage families");
        assert!(!types.contains_key("ether_events_sent_total"), "no webhook, no events families");
        assert!(!types.contains_key("ether_cluster_published_total"), "standalone, no cluster families");
        assert_eq!(get(&samples, "ether_shards", &[]).value, 0.0);
        // A shard whose histograms were never set (no bounds) still has +Inf/_sum/_count.
        let stats = NodeStats { shards: vec![ShardStats::default()], ..NodeStats::default() };
        let (_, samples) = parse(&render(&stats));
        let inf = get(&samples, "ether_ack_latency_seconds_bucket", &[("shard", "0"), ("le", "+Inf")]);
        assert_eq!(inf.value, 0.0);
    }

    #[test]
    fn value_formatting_and_escaping() {
        assert_eq!(format_value(1.0), "1");
        assert_eq!(format_value(0.005), "0.005");
        assert_eq!(format_value(f64::INFINITY), "+Inf");
        assert_eq!(format_value(f64::NEG_INFINITY), "-Inf");
        assert_eq!(format_value(f64::NAN), "NaN");
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(escape_help("a\\b\nc \"q\""), "a\\\\b\\nc \"q\"");
    }
}
