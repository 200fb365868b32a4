//! The scenarios. Each run: set up the target (groups for `group`), sample it, connect the
//! terminals at the requested rate, then the main phase:
//! - `idle`: hold them;
//! - `unicast`, `batch`: push messages through the API to the users in turn;
//! - `group`: publish to the groups through the API, at a steady `--interval` (`sparse`) or
//!   as fast as the terminals take them (`hot`: a window of undelivered messages);
//! - `chat`: the terminals send to random peers themselves (`send`), ack, and `read`;
//! - `reconnect`: push to the users through the API, drop a share of the terminals abruptly,
//!   keep pushing, order them back and let them `sync`, then check every accepted id arrived;
//!
//! then sample again, stop, and turn the fleets' and the driver's accounts into figures,
//! losses, saturation notes, problems, and the issue's targets met or missed. With
//! `--wire-limit` the same run is made first against the in-tool wire-limit server and the
//! engine's figures are given as ratios.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::api::{ApiReport, ApiRun, ApiSpec, Gate, GroupTarget};
use crate::fleet::{should_drop, FleetCmd, FleetSpec};
use crate::live::{self, Live};
use crate::procstat::{self, CpuMeter, SockStat, ThreadCpuMeter};
use crate::spawn::{SpawnOptions, Target};
use crate::stats::{FleetReport, Hist, LatencySummary, MsgSeen};
use crate::terminal::Role;
use crate::workers::Fleet;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scenario {
    Idle,
    Unicast,
    Batch,
    Group,
    Chat,
    Reconnect,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Idle => "idle",
            Scenario::Unicast => "unicast",
            Scenario::Batch => "batch",
            Scenario::Group => "group",
            Scenario::Chat => "chat",
            Scenario::Reconnect => "reconnect",
        }
    }

    /// The main phase carries messages.
    pub fn pushes(self) -> bool {
        !matches!(self, Scenario::Idle)
    }

    /// Messages go through the business API (a driver thread of the tool).
    fn uses_api(self) -> bool {
        !matches!(self, Scenario::Idle | Scenario::Chat)
    }
}

/// How `group` publishes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupMode {
    /// As fast as the members take them: at most `--window` messages per group published and
    /// not yet delivered everywhere.
    Hot,
    /// One message per group every `--interval`.
    #[default]
    Sparse,
}

impl GroupMode {
    pub fn name(self) -> &'static str {
        match self {
            GroupMode::Hot => "hot",
            GroupMode::Sparse => "sparse",
        }
    }
}

/// Which node to drive.
#[derive(Debug, Clone)]
pub enum TargetSpec {
    /// `ether serve` from the same build.
    Spawn(SpawnOptions),
    /// An existing node.
    External {
        client: SocketAddr,
        api: Option<SocketAddr>,
        jwt_secret: String,
        api_key: String,
        server_pid: Option<u32>,
        /// `client` is a `wss://` listener.
        tls: Option<crate::tls::TlsSpec>,
    },
    /// An existing node's data dir (ports.json, secrets.toml); with `tls`, its `client_tls`.
    DataDir { dir: PathBuf, server_pid: Option<u32>, tls: Option<crate::tls::TlsSpec> },
    /// Only the in-tool wire-limit server.
    Wire,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub scenario: Scenario,
    pub target: TargetSpec,
    pub connections: u64,
    /// Connects per second (0 = as fast as allowed).
    pub connect_rate: f64,
    pub hold: Duration,
    /// Messages per second through the API (0 = as fast as the window allows).
    pub msg_rate: f64,
    pub duration: Duration,
    pub api_conns: usize,
    pub pipeline: usize,
    pub batch_size: usize,
    pub threads: usize,
    pub per_process_max: u64,
    /// Loopback source addresses to spread over (None: one per 10,000 connections when
    /// there are more than 10,000: past about half of the ephemeral range, the kernel's
    /// port search slows connects down by an order of magnitude).
    pub source_ips: Option<u32>,
    pub max_inflight: usize,
    pub connect_timeout: Duration,
    pub drain_timeout: Duration,
    pub wire_limit: bool,
    pub results_dir: Option<PathBuf>,
    pub record: bool,
    pub live: live::Mode,
    /// The command line, for the record.
    pub command: Vec<String>,
    /// Names the record (`<date>-<scenario>-<label>`) and its row in the README table.
    pub label: Option<String>,
    /// `group`: groups, members per group (terminals = groups x members), how to publish,
    /// the steady interval (`sparse`), the undelivered window per group (`hot`), how often
    /// members ack their group.
    pub groups: u64,
    pub members: u64,
    pub group_mode: GroupMode,
    pub interval: Duration,
    pub window: u64,
    pub group_ack: Duration,
    /// `chat`: unanswered sends per terminal, a `read` every this many peer messages.
    pub chat_window: u32,
    pub read_every: u32,
    /// `reconnect`: the share dropped, when (after the sending starts), for how long, and how
    /// long the dropped terminals may take to be back and synced.
    pub drop_share: f64,
    pub drop_after: Duration,
    pub away: Duration,
    pub reconnect_timeout: Duration,
    /// Runs of the pattern (each a wire-limit twin run, if asked, then the target's); the
    /// record shows the median one by [`rank`] and lists them all.
    pub repeat: u32,
}

impl Options {
    /// Whether the terminals connect over TLS (`--tls`).
    pub fn tls(&self) -> bool {
        match &self.target {
            TargetSpec::Spawn(o) => o.tls,
            TargetSpec::External { tls, .. } | TargetSpec::DataDir { tls, .. } => tls.is_some(),
            TargetSpec::Wire => false,
        }
    }

    /// Defaults for a scenario; callers override what they need.
    pub fn new(scenario: Scenario, target: TargetSpec) -> Options {
        Options {
            scenario,
            target,
            connections: 1000,
            connect_rate: 10_000.0,
            hold: Duration::from_secs(5),
            msg_rate: 10_000.0,
            duration: Duration::from_secs(5),
            api_conns: 4,
            pipeline: 16,
            batch_size: if scenario == Scenario::Batch { 100 } else { 0 },
            threads: 1,
            per_process_max: 18_000,
            source_ips: None,
            max_inflight: 256,
            connect_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(10),
            wire_limit: false,
            results_dir: None,
            record: true,
            live: live::Mode::Auto,
            command: Vec::new(),
            label: None,
            groups: 1,
            members: 1000,
            group_mode: GroupMode::Sparse,
            interval: Duration::from_millis(200),
            window: 64,
            group_ack: Duration::from_secs(1),
            chat_window: 4,
            read_every: 10,
            repeat: 1,
            drop_share: 0.5,
            drop_after: Duration::from_secs(2),
            away: Duration::from_secs(2),
            reconnect_timeout: Duration::from_secs(30),
        }
    }

    /// The record's name: the scenario and its label.
    pub fn record_name(&self) -> String {
        match &self.label {
            Some(l) if !l.is_empty() => format!("{}-{l}", self.scenario.name()),
            _ => self.scenario.name().to_owned(),
        }
    }

    /// Sets the `group` shape: terminals = groups x members; `sparse` publishes one message
    /// per group every `interval`.
    pub fn set_groups(&mut self, groups: u64, members: u64, mode: GroupMode, interval: Duration) {
        self.groups = groups.max(1);
        self.members = members.max(1);
        self.connections = self.groups * self.members;
        self.group_mode = mode;
        self.interval = interval;
        self.msg_rate = match mode {
            GroupMode::Hot => 0.0,
            GroupMode::Sparse => self.groups as f64 / interval.as_secs_f64().max(1e-6),
        };
    }

    /// Messages the API driver may send: rate x duration, or unbounded (ended by the
    /// duration) when the rate is 0.
    fn messages(&self) -> u64 {
        if self.msg_rate > 0.0 {
            (self.msg_rate * self.duration.as_secs_f64()).round().max(1.0) as u64
        } else {
            1 << 40
        }
    }
}

/// One point per second of a run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SeriesPoint {
    pub t_s: f64,
    pub phase: &'static str,
    pub open: u64,
    pub failed: u64,
    pub sent_per_s: f64,
    pub acked_per_s: f64,
    pub recv_per_s: f64,
    pub p99_ms: Option<f64>,
    pub server_cpu_pct: f64,
    pub tool_cpu_pct: f64,
    pub server_rss: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ConnFigures {
    pub requested: u64,
    pub connected: u64,
    pub failed: u64,
    pub failures: std::collections::BTreeMap<String, u64>,
    pub dropped: u64,
    pub drops: std::collections::BTreeMap<String, u64>,
    pub target_rate: f64,
    /// Welcomes per second, first connect attempt to last welcome.
    pub handshakes_per_s: f64,
    pub connect_phase_s: f64,
    pub connect_latency: LatencySummary,
    /// Heartbeat pings the terminals sent (at the welcome's `heartbeat_s`).
    pub heartbeats_sent: u64,
    /// WebSocket pings from the server that the terminals answered.
    pub pings_answered: u64,
    pub worker_processes: usize,
    pub threads_per_process: usize,
    pub source_ips: u32,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct MemFigures {
    pub server_rss_before: u64,
    pub server_rss_connected: u64,
    pub server_rss_end: u64,
    /// (connected - before) / connected terminals, 300 ms after the last connected.
    pub server_rss_per_conn: f64,
    /// (end of the main phase - before) / connected terminals: what a connection holds once
    /// it has been idle (for `idle`, after `--hold`; the engine parks idle connections).
    pub server_rss_idle_per_conn: f64,
    pub sockstat_before: SockStat,
    pub sockstat_connected: SockStat,
    /// Kernel TCP buffer memory per connection (both ends of a loopback pair).
    pub kernel_tcp_mem_per_conn: f64,
    /// Kernel slab growth per connection (both ends; system-wide, so approximate).
    pub kernel_slab_per_conn: f64,
    pub tool_rss_connected: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CpuFigures {
    /// Percent of one core.
    pub server_connect_pct: f64,
    pub tool_connect_pct: f64,
    /// During the hold (idle) or the send phase (unicast, batch).
    pub server_main_pct: f64,
    pub tool_main_pct: f64,
    pub server_cpu_s: f64,
    pub tool_cpu_s: f64,
    /// The whole machine's busy time (percent of one core, up to cores x 100).
    pub machine_connect_pct: f64,
    pub machine_main_pct: f64,
    /// Machine minus server minus tool: other processes' share.
    pub others_connect_pct: f64,
    pub others_main_pct: f64,
    pub cores: usize,
    pub tool_threads: usize,
    /// The tool's busiest thread in each phase, percent of one core, and its name: one
    /// pegged thread (a terminal thread, the API driver) limits the run even while the tool's
    /// total stays below what all its threads could use.
    pub tool_busiest_thread_connect_pct: f64,
    pub tool_busiest_thread_main_pct: f64,
    pub tool_busiest_thread_connect: String,
    pub tool_busiest_thread_main: String,
    /// Main-phase CPU seconds per message received, in microseconds (scenarios that push):
    /// what one delivery costs the server (all its processes) and the tool, a figure that
    /// holds whether or not the machine was saturated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_us_per_delivery: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_us_per_delivery: Option<f64>,
}

impl CpuFigures {
    /// Sets the per-delivery figures from the main phase's CPU seconds and its deliveries.
    fn per_delivery(&mut self, received: u64) {
        let per = |cpu_s: f64| (received > 0 && cpu_s > 0.0).then(|| cpu_s * 1e6 / received as f64);
        self.server_us_per_delivery = per(self.server_cpu_s);
        self.tool_us_per_delivery = per(self.tool_cpu_s);
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct MsgFigures {
    pub target_rate: f64,
    pub batch_size: usize,
    pub sent: u64,
    pub acked: u64,
    pub failed: u64,
    pub api_errors: std::collections::BTreeMap<String, u64>,
    pub received: u64,
    /// Acknowledged by the API but never received by the addressee.
    pub lost: u64,
    /// Received but not acknowledged by the API (e.g. answer lost).
    pub unacked_received: u64,
    pub duplicates: u64,
    pub reordered: u64,
    pub seq_holes: u64,
    pub misrouted: u64,
    pub foreign: u64,
    pub send_phase_s: f64,
    /// The main phase's start to the end of the drain as the coordinator saw it (every
    /// accepted message delivered, or the drain timeout): seen only at the fleets' next
    /// counter publish, so up to a publish period late.
    pub drain_end_s: f64,
    pub sent_per_s: f64,
    /// Messages received per second: the first API request (`chat`: the order to send) to
    /// the last delivery, both as they happened (not as the coordinator later saw them).
    pub delivered_per_s: f64,
    pub latency: LatencySummary,
    /// API request to answer (for `chat`: `send` to `sent`).
    pub api_latency: LatencySummary,
    pub send_lag: LatencySummary,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupFigures>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chat: Option<ChatFigures>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reconnect: Option<ReconnectFigures>,
}

/// `group`: deliveries are counted per member (expected: every message its group's API call
/// accepted), per-message latency is publish to the last member.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GroupFigures {
    pub mode: GroupMode,
    pub groups: u64,
    pub members: u64,
    pub interval_ms: f64,
    pub window: u64,
    pub published_per_s: f64,
    pub expected_deliveries: u64,
    /// Per message: publish to the last member's receipt (messages every member got).
    pub last_member: LatencySummary,
    /// The same per message, `[k, ms]` in publish order (`k` from the payload), at most
    /// [`PER_MESSAGE_MAX`]: where a tail comes from (one warm-up message, a period of some
    /// other work) shows here, not in the percentiles.
    pub last_member_by_message: Vec<(u64, f64)>,
    /// Accepted messages that some member never got.
    pub messages_incomplete: u64,
}

/// Most messages listed in [`GroupFigures::last_member_by_message`] (a hot run publishes
/// thousands; the first ones are kept).
pub const PER_MESSAGE_MAX: usize = 10_000;

/// `[k, ms]` of each message every member got, in publish order, at most `max`.
fn last_member_by_message(per_msg: &[MsgSeen], members: u64, max: usize) -> Vec<(u64, f64)> {
    let mut v: Vec<(u64, f64)> = per_msg
        .iter()
        .filter(|m| m.count as u64 >= members)
        .map(|m| (m.k, (m.last_us as f64 / 100.0).round() / 10.0))
        .collect();
    v.sort_by_key(|&(k, _)| k);
    v.truncate(max);
    v
}

/// `chat`: the terminals' own sending.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatFigures {
    pub window: u32,
    pub read_every: u32,
    /// Own messages coming back on the sender's inbox (multi-device copy).
    pub echoes: u64,
    pub reads_sent: u64,
    pub receipts: u64,
    /// Sends never answered (neither `sent` nor `error`).
    pub unanswered: u64,
}

/// `reconnect`: the drop, the way back, and the id check.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReconnectFigures {
    pub share: f64,
    pub to_drop: u64,
    pub dropped: u64,
    pub reconnected: u64,
    pub reconnect_failed: u64,
    pub synced: u64,
    pub syncs_sent: u64,
    pub away_s: f64,
    /// Reconnect order to the last terminal caught up (`synced`, no more pages).
    pub back_and_synced_s: f64,
    /// Reconnect order to `synced`, per terminal.
    pub per_terminal: LatencySummary,
    /// Ids the API accepted, and how many of them arrived (after dedupe by id).
    pub ids_accepted: u64,
    pub ids_received: u64,
    /// Accepted ids that never reached a terminal that was connected at the end: lost.
    pub ids_missing: u64,
    /// Accepted ids for terminals that were not connected at the end (failed to connect or
    /// to come back): unreachable, reported with the connection failures.
    pub ids_unreachable: u64,
    /// The same id received more than once (resends, sync overlapping live pushes).
    pub id_duplicates: u64,
    /// Ids received that the API never answered for.
    pub ids_unexpected: u64,
}

/// One of the issue's targets, met or not.
#[derive(Debug, Clone, Serialize)]
pub struct TargetCheck {
    pub what: String,
    pub target: String,
    pub measured: String,
    pub met: bool,
    /// By how much it was missed (or beaten), in words.
    pub margin: String,
}

/// Everything one run against one target measured.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub target: &'static str,
    pub client_addr: String,
    pub run_id: String,
    pub started_unix_s: u64,
    pub wall_s: f64,
    pub connections: ConnFigures,
    pub memory: MemFigures,
    pub cpu: CpuFigures,
    pub messages: Option<MsgFigures>,
    /// The node's frames per socket write over the main phase, from its own counters (known
    /// only when the tool has the node's admin token: `--spawn` or `--node-data`).
    pub frames_per_write: Option<f64>,
    /// Bytes the tool's terminal sockets held unread in the kernel, per socket, averaged over
    /// the main phase's seconds: a tool that reads behind shows here even when its CPU does not.
    pub tool_unread_per_socket: Option<f64>,
    /// The longest a terminal thread's 200 ms timer ran late, ms.
    #[serde(default)]
    pub tool_timer_late_ms_max: u64,
    /// Why the tool may have been the limit, or the machine.
    pub saturation: Vec<String>,
    /// What makes this run fail: lost or failed connections, lost messages, API errors.
    pub problems: Vec<String>,
    pub series: Vec<SeriesPoint>,
    #[serde(skip)]
    pub connect_hist: Hist,
    #[serde(skip)]
    pub msg_hist: Hist,
}

/// The whole invocation: the engine's run and, with `--wire-limit`, the wire-limit run (with
/// `--repeat`, the median repeat's).
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub scenario: Scenario,
    pub runs: Vec<RunResult>,
    /// Engine figure / wire-limit figure, when both ran.
    pub ratios: Option<serde_json::Value>,
    /// The issue's targets for this scenario, met or missed (not a pass/fail criterion).
    pub targets: Vec<TargetCheck>,
    /// Every repeat's ranking figure, in the order they ran (one entry without `--repeat`).
    pub repeats: Vec<Repeat>,
    /// What the other repeats' runs failed on: a loss in any repeat fails the invocation.
    pub other_problems: Vec<String>,
    pub result_dir: Option<PathBuf>,
}

impl Outcome {
    pub fn problems(&self) -> Vec<String> {
        let mut out: Vec<String> =
            self.runs.iter().flat_map(|r| r.problems.iter().map(move |p| format!("{}: {p}", r.target))).collect();
        out.extend(self.other_problems.iter().cloned());
        out
    }
}

/// One repeat of the pattern: the figure repeats are ranked by ([`rank`]), of the target's
/// run and of its wire-limit twin.
#[derive(Debug, Clone, Serialize)]
pub struct Repeat {
    pub metric: &'static str,
    pub higher_is_better: bool,
    pub engine: f64,
    pub wire_limit: Option<f64>,
    pub passed: bool,
    /// The repeat the record shows (the median).
    pub chosen: bool,
}

/// The figure a run is ranked by among repeats, and whether more is better: the latency a
/// paced or sparse pattern is about (p99; publish to last member for `group --mode sparse`),
/// the time back and synced for `reconnect`, the rate otherwise (handshakes/s for `idle`).
pub fn rank(r: &RunResult) -> (&'static str, f64, bool) {
    match &r.messages {
        Some(m) => match (&m.group, &m.reconnect) {
            (Some(g), _) if g.mode == GroupMode::Sparse => ("last_member_p99_ms", g.last_member.p99_ms, false),
            (_, Some(x)) => ("back_and_synced_s", x.back_and_synced_s, false),
            (None, None) if m.chat.is_none() && m.target_rate > 0.0 => ("latency_p99_ms", m.latency.p99_ms, false),
            _ => ("delivered_per_s", m.delivered_per_s, true),
        },
        None => ("handshakes_per_s", r.connections.handshakes_per_s, true),
    }
}

/// Which of `runs` the record shows: the median by [`rank`] (of an even number, the worse of
/// the two middle ones).
pub fn median_index(runs: &[&RunResult]) -> usize {
    let mut order: Vec<usize> = (0..runs.len()).collect();
    // Worst first.
    order.sort_by(|&a, &b| {
        let (_, va, higher) = rank(runs[a]);
        let (_, vb, _) = rank(runs[b]);
        let o = va.partial_cmp(&vb).unwrap_or(std::cmp::Ordering::Equal);
        if higher {
            o
        } else {
            o.reverse()
        }
    });
    order[(order.len().saturating_sub(1)) / 2]
}

fn make_target(spec: &TargetSpec, wire_processes: usize) -> Result<Target, String> {
    match spec {
        TargetSpec::Spawn(o) => Target::spawn_engine(o),
        TargetSpec::External { client, api, jwt_secret, api_key, server_pid, tls } => {
            let mut t = Target::external(*client, *api, jwt_secret.clone(), api_key.clone(), *server_pid);
            t.tls = tls.clone();
            Ok(t)
        }
        TargetSpec::DataDir { dir, server_pid, tls } => Target::from_data_dir(dir, *server_pid, tls.clone()),
        TargetSpec::Wire => Target::wire_limit(wire_processes, None),
    }
}

/// Runs the scenario (and its wire-limit twin), writes the record, returns the outcome.
pub fn run(opts: &Options) -> Result<Outcome, String> {
    procstat::raise_nofile_limit();
    let wire_processes = opts.connections.div_ceil(opts.per_process_max.max(1)).max(1) as usize;
    let wire_involved = opts.wire_limit || matches!(opts.target, TargetSpec::Wire);
    if opts.scenario.pushes() && wire_processes > 1 && wire_involved {
        return Err(format!(
            "the wire-limit server routes messages within one process: at most {} connections for {}",
            opts.per_process_max,
            opts.scenario.name()
        ));
    }
    if opts.tls() && opts.wire_limit {
        return Err("--tls: the wire-limit server speaks no TLS; run without --wire-limit".into());
    }
    if opts.scenario == Scenario::Reconnect && wire_involved {
        return Err("reconnect needs a node that stores messages (sync); the wire-limit server stores nothing".into());
    }
    let repeat = opts.repeat.max(1);
    let mut pairs: Vec<(Option<RunResult>, RunResult)> = Vec::new();
    for k in 0..repeat {
        if repeat > 1 && opts.live != live::Mode::Quiet {
            eprintln!("repeat {} of {repeat}", k + 1);
        }
        let twin = if opts.wire_limit && !matches!(opts.target, TargetSpec::Wire) {
            let t = Target::wire_limit(wire_processes, None)?;
            Some(run_one(opts, &t)?)
        } else {
            None
        };
        let t = make_target(&opts.target, wire_processes)?;
        pairs.push((twin, run_one(opts, &t)?));
    }
    let chosen = median_index(&pairs.iter().map(|(_, e)| e).collect::<Vec<_>>());
    let repeats: Vec<Repeat> = pairs
        .iter()
        .enumerate()
        .map(|(k, (twin, engine))| {
            let (metric, value, higher_is_better) = rank(engine);
            Repeat {
                metric,
                higher_is_better,
                engine: value,
                wire_limit: twin.as_ref().map(|t| rank(t).1),
                passed: engine.problems.is_empty() && twin.as_ref().is_none_or(|t| t.problems.is_empty()),
                chosen: k == chosen,
            }
        })
        .collect();
    let mut other_problems = Vec::new();
    let mut runs = Vec::new();
    for (k, (twin, engine)) in pairs.into_iter().enumerate() {
        let pair: Vec<RunResult> = twin.into_iter().chain(Some(engine)).collect();
        if k == chosen {
            runs = pair;
        } else {
            for r in &pair {
                other_problems.extend(r.problems.iter().map(|p| format!("repeat {}: {}: {p}", k + 1, r.target)));
            }
        }
    }
    let ratios = (runs.len() == 2).then(|| ratios(&runs[1], &runs[0]));
    let targets = targets(opts, runs.last(), ratios.as_ref());
    let mut out = Outcome { scenario: opts.scenario, runs, ratios, targets, repeats, other_problems, result_dir: None };
    if opts.record {
        out.result_dir = Some(crate::report::record(opts, &out)?);
    }
    Ok(out)
}

fn ratio(a: f64, b: f64) -> serde_json::Value {
    if b > 0.0 && a > 0.0 && a.is_finite() {
        serde_json::json!((a / b * 1000.0).round() / 1000.0)
    } else {
        serde_json::Value::Null
    }
}

fn ratios(engine: &RunResult, wire: &RunResult) -> serde_json::Value {
    let mut v = serde_json::json!({
        "handshakes_per_s": ratio(engine.connections.handshakes_per_s, wire.connections.handshakes_per_s),
        "connect_p99": ratio(engine.connections.connect_latency.p99_ms, wire.connections.connect_latency.p99_ms),
        "server_rss_per_conn": ratio(engine.memory.server_rss_per_conn, wire.memory.server_rss_per_conn),
        "server_rss_idle_per_conn": ratio(engine.memory.server_rss_idle_per_conn, wire.memory.server_rss_idle_per_conn),
    });
    if let (Some(e), Some(w)) = (&engine.messages, &wire.messages) {
        v["delivered_per_s"] = ratio(e.delivered_per_s, w.delivered_per_s);
        if let (Some(e), Some(w)) = (engine.cpu.server_us_per_delivery, wire.cpu.server_us_per_delivery) {
            v["server_us_per_delivery"] = ratio(e, w);
        }
        v["latency_p50"] = ratio(e.latency.p50_ms, w.latency.p50_ms);
        v["latency_p99"] = ratio(e.latency.p99_ms, w.latency.p99_ms);
        if let (Some(eg), Some(wg)) = (&e.group, &w.group) {
            v["last_member_p50"] = ratio(eg.last_member.p50_ms, wg.last_member.p50_ms);
            v["last_member_p99"] = ratio(eg.last_member.p99_ms, wg.last_member.p99_ms);
        }
    }
    v
}

fn fmt_rate(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else {
        format!("{v:.0}")
    }
}

/// The issue's targets for the scenario, against the engine's run.
fn targets(opts: &Options, run: Option<&RunResult>, ratios: Option<&serde_json::Value>) -> Vec<TargetCheck> {
    // The issue's targets are for one node and terminals over ws://; a TLS or a cluster run
    // (several nodes and Redis on the same cores) is measured, not judged.
    let cluster = matches!(&opts.target, TargetSpec::Spawn(o) if o.cluster >= 2);
    if opts.tls() || cluster {
        return Vec::new();
    }
    let mut out = Vec::new();
    let Some(r) = run else {
        return out;
    };
    let at_least = |what: &str, target: f64, measured: f64, unit: &str| {
        let met = measured >= target;
        let pct = if target > 0.0 { (measured / target - 1.0) * 100.0 } else { 0.0 };
        TargetCheck {
            what: what.to_owned(),
            target: format!(">= {}{unit}", fmt_rate(target)),
            measured: format!("{}{unit}", fmt_rate(measured)),
            met,
            margin: if met {
                format!("met, {pct:.0}% above")
            } else {
                format!("missed by {:.0}{unit} ({:.0}% short)", target - measured, -pct)
            },
        }
    };
    let at_most = |what: &str, target: f64, measured: f64, unit: &str| {
        let met = measured <= target;
        let pct = if target > 0.0 { (measured / target - 1.0) * 100.0 } else { 0.0 };
        TargetCheck {
            what: what.to_owned(),
            target: format!("<= {target}{unit}"),
            measured: format!("{measured:.2}{unit}"),
            met,
            margin: if met {
                format!("met, {:.0}% under", -pct)
            } else {
                format!("missed by {:.2}{unit} ({pct:.0}% over)", measured - target)
            },
        }
    };
    let wire_ratio = |out: &mut Vec<TargetCheck>| {
        if let Some(x) = ratios.and_then(|v| v["delivered_per_s"].as_f64()) {
            let mut t = at_least("deliveries/s vs the wire-limit server", 0.8, x, "");
            t.target = ">= 0.8".into();
            t.measured = format!("{x:.3}");
            if !t.met {
                t.margin = format!("missed by {:.3} ({:.0}% short)", 0.8 - x, (1.0 - x / 0.8) * 100.0);
            }
            out.push(t);
        }
    };
    if opts.scenario == Scenario::Idle {
        out.push(at_least("handshakes/s", 30_000.0, r.connections.handshakes_per_s, "/s"));
        out.push(at_most(
            "server RSS per idle connection (end of hold)",
            1024.0,
            r.memory.server_rss_idle_per_conn,
            " B",
        ));
    }
    let Some(m) = &r.messages else {
        return out;
    };
    match opts.scenario {
        Scenario::Group => match opts.group_mode {
            GroupMode::Hot => {
                out.push(at_least("deliveries/s (hot)", 500_000.0, m.delivered_per_s, "/s"));
                wire_ratio(&mut out);
            }
            GroupMode::Sparse => {
                if let Some(g) = &m.group {
                    out.push(at_most("publish to last member p99 (sparse)", 25.0, g.last_member.p99_ms, " ms"));
                }
                // The steady-rate target needs a run that offers that many deliveries.
                let offered = opts.msg_rate * opts.members as f64;
                if offered >= 150_000.0 {
                    out.push(at_least("deliveries/s (sparse, steady)", 150_000.0, m.delivered_per_s, "/s"));
                }
                wire_ratio(&mut out);
            }
        },
        Scenario::Chat => out.push(at_least("messages/s end to end", 80_000.0, m.delivered_per_s, "/s")),
        // Throughput targets need an unpaced run (`--rate 0`), the latency one a run paced at
        // about 20,000 msgs/s.
        Scenario::Unicast if opts.msg_rate <= 0.0 => {
            out.push(at_least("deliveries/s through single API requests", 50_000.0, m.delivered_per_s, "/s"));
        }
        Scenario::Unicast if (opts.msg_rate - 20_000.0).abs() <= 2_000.0 => {
            out.push(at_most("publish to receipt p99 at 20,000 msgs/s", 1.0, m.latency.p99_ms, " ms"));
        }
        Scenario::Batch if opts.msg_rate <= 0.0 => {
            out.push(at_least("deliveries/s through the batch endpoint", 150_000.0, m.delivered_per_s, "/s"));
        }
        Scenario::Reconnect => {
            if let Some(x) = &m.reconnect {
                let mut t = at_most(
                    &format!("{} terminals back and synced (target: 10,000 in < 5 s)", x.to_drop),
                    5.0,
                    x.back_and_synced_s,
                    " s",
                );
                if x.to_drop < 10_000 {
                    t.margin.push_str(&format!(" at {} of the 10,000 terminals", x.to_drop));
                }
                out.push(t);
            }
        }
        _ => {}
    }
    out
}

/// Samples processes and the fleets once per tick, keeps the per-second series.
struct Monitor<'a> {
    start: Instant,
    live: &'a Live,
    total: u64,
    server_pids: Vec<u32>,
    server_cpu: CpuMeter,
    tool_cpu: CpuMeter,
    machine_cpu: CpuMeter,
    series: Vec<SeriesPoint>,
    interval: Hist,
    last_point: Instant,
    last_counts: (u64, u64, u64),
    last_server_cpu: f64,
    last_tool_cpu: f64,
    last_rss: u64,
    api_last: (u64, u64),
    /// `chat`: sent and acked come from the terminals' own sends.
    chat: bool,
    /// The node's client port: the tool's terminal sockets are those connected to it.
    client_port: u16,
    /// Every `UNREAD_SAMPLE_EVERY` seconds of the main phase: bytes the tool's terminal sockets
    /// held unread, per socket.
    unread_per_socket: Vec<f64>,
    /// Seconds ticked, for sampling the receive queues every `UNREAD_SAMPLE_EVERY`.
    unread_clock: u32,
    /// Each fleet's publish count at the last point (see `FleetProgress::published`).
    published_at_point: Vec<u64>,
    /// The latest the terminal threads' publish timers ran, over the fleets, milliseconds.
    timer_late_ms_max: u64,
}

#[derive(Default, Clone)]
struct Snapshot {
    counters: crate::stats::Counters,
    connect_done: bool,
    sent: u64,
    acked: u64,
    api_failed: u64,
    /// Per fleet: the orders its counters reflect (`FleetProgress::orders_applied`).
    orders_applied: Vec<u64>,
}

impl<'a> Monitor<'a> {
    fn tick(&mut self, fleets: &[Fleet], api: Option<&ApiRun>, phase: &'static str) -> Snapshot {
        let mut s = Snapshot { connect_done: true, ..Default::default() };
        let mut published = Vec::with_capacity(fleets.len());
        for f in fleets {
            let p = f.progress();
            s.counters.add(&p.counters);
            s.connect_done &= p.connect_done;
            published.push(p.published);
            s.orders_applied.push(p.orders_applied);
            self.timer_late_ms_max = self.timer_late_ms_max.max(p.timer_late_ms_max);
            self.interval.add_data(&p.interval_latency);
        }
        // Behind if some fleet has not published anew since the last point.
        let stale = self.published_at_point.len() == published.len()
            && published.iter().zip(&self.published_at_point).any(|(now, then)| now <= then);
        if let Some(a) = api {
            use std::sync::atomic::Ordering::SeqCst;
            s.sent = a.shared.sent.load(SeqCst);
            s.acked = a.shared.acked.load(SeqCst);
            s.api_failed = a.shared.errors.load(SeqCst);
            self.api_last = (s.sent, s.acked);
        } else if self.chat {
            (s.sent, s.acked) = (s.counters.sends, s.counters.sends_answered);
        } else {
            (s.sent, s.acked) = self.api_last;
        }
        let dt = self.last_point.elapsed();
        // A point only from counters every fleet has published since the last one (or after
        // STALE_POINT_MAX at the latest), so a late publish shows as a longer interval, not
        // as a zero followed by a double.
        if dt >= Duration::from_secs(1) && (!stale || dt >= STALE_POINT_MAX) {
            self.published_at_point = published;
            let secs = dt.as_secs_f64();
            self.last_server_cpu = self.server_cpu.sample();
            self.last_tool_cpu = self.tool_cpu.sample();
            self.last_rss = procstat::rss_sum(&self.server_pids);
            self.unread_clock += 1;
            if phase != "connect" && self.unread_clock.is_multiple_of(UNREAD_SAMPLE_EVERY) {
                let (bytes, sockets) = procstat::tcp_unread_to(self.client_port);
                if sockets > 0 {
                    self.unread_per_socket.push(bytes as f64 / sockets as f64);
                }
            }
            let (ls, la, lr) = self.last_counts;
            let p = SeriesPoint {
                t_s: self.start.elapsed().as_secs_f64(),
                phase,
                open: s.counters.open(),
                failed: s.counters.failed,
                sent_per_s: s.sent.saturating_sub(ls) as f64 / secs,
                acked_per_s: s.acked.saturating_sub(la) as f64 / secs,
                recv_per_s: s.counters.received.saturating_sub(lr) as f64 / secs,
                p99_ms: (self.interval.count() > 0).then(|| self.interval.q_ms(0.99)),
                server_cpu_pct: self.last_server_cpu,
                tool_cpu_pct: self.last_tool_cpu,
                server_rss: self.last_rss,
            };
            self.live.update(&live::Line {
                elapsed: self.start.elapsed(),
                phase,
                open: p.open,
                total: self.total,
                failed: p.failed,
                recv_per_s: p.recv_per_s,
                sent_per_s: p.sent_per_s,
                p99_ms: p.p99_ms,
                server_cpu: p.server_cpu_pct,
                tool_cpu: p.tool_cpu_pct,
                server_rss: p.server_rss,
            });
            self.series.push(p);
            self.interval.reset();
            self.last_counts = (s.sent, s.acked, s.counters.received);
            self.last_point = Instant::now();
        }
        s
    }
}

fn loopback(a: &SocketAddr) -> bool {
    a.ip().is_loopback()
}

fn run_one(opts: &Options, target: &Target) -> Result<RunResult, String> {
    let run_id = format!("{:08x}", rand::random::<u32>());
    let started_unix_s = crate::unix_nanos() / 1_000_000_000;
    let t_start = Instant::now();
    let n = opts.connections;
    let source_ips = opts.source_ips.unwrap_or_else(|| {
        if n > 10_000 && loopback(&target.client) {
            n.div_ceil(10_000) as u32
        } else {
            0
        }
    });
    let spec = FleetSpec {
        client: target.client,
        more_clients: target.more_clients.clone(),
        path: "/ws".into(),
        jwt_secret: target.jwt_secret.clone(),
        token_ttl_s: 24 * 3600,
        user_prefix: format!("lt{run_id}u"),
        device: "d0".into(),
        platform: "other".into(),
        first: 0,
        count: n,
        total: n,
        connect_rate: opts.connect_rate,
        threads: opts.threads.max(1),
        source_ips,
        run_id: run_id.clone(),
        connect_timeout_ms: opts.connect_timeout.as_millis() as u64,
        max_inflight: opts.max_inflight,
        pin: None,
        role: match opts.scenario {
            Scenario::Group => Role::Group,
            Scenario::Chat => Role::Chat,
            _ => Role::Inbox,
        },
        group_prefix: format!("lt{run_id}g"),
        members: opts.members,
        groups: if opts.scenario == Scenario::Group { opts.groups } else { 0 },
        group_ack_ms: opts.group_ack.as_millis() as u64,
        read_every: opts.read_every,
        track_ids: opts.scenario == Scenario::Reconnect,
        tls: target.tls.clone(),
    };
    if let Some(tls) = &spec.tls {
        tls.connector()?;
    }
    let label = format!("{} {}", opts.scenario.name(), target.kind);
    let live = Live::new(opts.live, &label, n);
    live.say(&format!(
        "{label}: {n} terminals -> {}://{}/ws at {}/s (run {run_id})",
        if target.tls.is_some() { "wss" } else { "ws" },
        target.client,
        if opts.connect_rate > 0.0 { format!("{:.0}", opts.connect_rate) } else { "max".into() }
    ));
    if opts.scenario == Scenario::Group {
        setup_groups(opts, target, &spec, &live)?;
    }
    let server_pids = target.server_pids.clone();
    // A node just started may still be touching its startup memory: per-connection figures
    // count from a settled baseline.
    let rss_before = procstat::settled_rss(&server_pids, RSS_SETTLE_MAX);
    let sock_before = procstat::sockstat();
    let mut server_cpu = CpuMeter::new(server_pids.clone());
    let fleets = Fleet::start_all(&spec, opts.per_process_max).map_err(|e| format!("cannot start terminals: {e}"))?;
    let worker_pids: Vec<u32> = fleets.iter().filter_map(|f| f.pid()).collect();
    let mut tool_pids = vec![std::process::id()];
    tool_pids.extend(&worker_pids);
    let tool_cpu = CpuMeter::new(tool_pids.clone());
    let mut tool_thread_cpu = ThreadCpuMeter::new(tool_pids.clone());
    server_cpu.mark();
    let mut mon = Monitor {
        start: t_start,
        live: &live,
        total: n,
        server_pids: server_pids.clone(),
        server_cpu,
        tool_cpu,
        machine_cpu: CpuMeter::machine(),
        series: Vec::new(),
        interval: Hist::new(),
        last_point: Instant::now(),
        last_counts: (0, 0, 0),
        last_server_cpu: 0.0,
        last_tool_cpu: 0.0,
        last_rss: rss_before,
        api_last: (0, 0),
        chat: opts.scenario == Scenario::Chat,
        client_port: target.client.port(),
        unread_per_socket: Vec::new(),
        unread_clock: 0,
        published_at_point: Vec::new(),
        timer_late_ms_max: 0,
    };

    // Connect phase.
    let expected =
        if opts.connect_rate > 0.0 { Duration::from_secs_f64(n as f64 / opts.connect_rate) } else { Duration::ZERO };
    let deadline = Instant::now() + expected + opts.connect_timeout + Duration::from_secs(10);
    let mut snap;
    loop {
        snap = mon.tick(&fleets, None, "connect");
        if snap.connect_done || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let connect_s = t_start.elapsed().as_secs_f64();
    let server_connect_pct = mon.server_cpu.average();
    let tool_connect_pct = mon.tool_cpu.average();
    let tool_busiest_connect = tool_thread_cpu.busiest().unwrap_or_default();
    let machine_connect_pct = mon.machine_cpu.average();
    // Let the server settle its allocations before measuring memory.
    std::thread::sleep(Duration::from_millis(300));
    let rss_connected = procstat::rss_sum(&server_pids);
    let sock_connected = procstat::sockstat();
    let tool_rss_connected = procstat::rss_sum(&tool_pids);
    live.say(&format!(
        "{label}: {} connected, {} failed in {connect_s:.1}s",
        snap.counters.welcomed, snap.counters.failed
    ));

    // Main phase.
    let writes_before = target.write_counters();
    mon.server_cpu.mark();
    mon.tool_cpu.mark();
    tool_thread_cpu.mark();
    mon.machine_cpu.mark();
    let main = match opts.scenario {
        Scenario::Idle => {
            let main_start = Instant::now();
            while main_start.elapsed() < opts.hold {
                mon.tick(&fleets, None, "hold");
                std::thread::sleep(Duration::from_millis(100));
            }
            MainOut::default()
        }
        Scenario::Chat => chat_phase(opts, &spec, &fleets, &mut mon),
        _ => api_phase(opts, target, &spec, &fleets, &mut mon)?,
    };
    let server_main_pct = mon.server_cpu.average();
    let tool_main_pct = mon.tool_cpu.average();
    let tool_busiest_main = tool_thread_cpu.busiest().unwrap_or_default();
    let machine_main_pct = mon.machine_cpu.average();
    let server_cpu_s = mon.server_cpu.seconds_since_mark();
    let tool_cpu_s = mon.tool_cpu.seconds_since_mark();
    let rss_end = procstat::rss_sum(&server_pids);
    let frames_per_write = writes_before.zip(target.write_counters()).and_then(|(a, b)| a.frames_per_write_until(b));
    let series = std::mem::take(&mut mon.series);
    let tool_unread_per_socket = (!mon.unread_per_socket.is_empty())
        .then(|| mon.unread_per_socket.iter().sum::<f64>() / mon.unread_per_socket.len() as f64);
    let tool_timer_late_ms_max = mon.timer_late_ms_max;
    drop(mon);
    let fr = FleetReport::merge(fleets.into_iter().map(Fleet::stop).collect());
    live.finish();

    let c = &fr.counters;
    let hs_window = c.last_welcome_ns.saturating_sub(c.first_attempt_ns) as f64 / 1e9;
    let connect_hist = fr.connect_latency.to_hist();
    let msg_hist = fr.msg_latency.to_hist();
    let processes = fleets_count(n, opts.per_process_max);
    let conns = ConnFigures {
        requested: n,
        connected: c.welcomed,
        failed: c.failed + n.saturating_sub(c.welcomed + c.failed),
        failures: {
            let mut f = fr.failures.clone();
            let missing = n.saturating_sub(c.welcomed + c.failed);
            if missing > 0 {
                f.insert("never settled (connect phase timed out)".into(), missing);
            }
            f
        },
        dropped: c.dropped,
        drops: fr.drops.clone(),
        target_rate: opts.connect_rate,
        handshakes_per_s: if hs_window > 0.0 { c.welcomed as f64 / hs_window } else { 0.0 },
        connect_phase_s: connect_s,
        connect_latency: connect_hist.summary(),
        heartbeats_sent: c.heartbeats_sent,
        pings_answered: c.pings_answered,
        worker_processes: if processes > 1 { processes } else { 0 },
        threads_per_process: spec.threads,
        source_ips,
    };
    let mem = MemFigures {
        server_rss_before: rss_before,
        server_rss_connected: rss_connected,
        server_rss_end: rss_end,
        server_rss_per_conn: per(rss_connected.saturating_sub(rss_before), c.welcomed),
        server_rss_idle_per_conn: per(rss_end.saturating_sub(rss_before), c.welcomed),
        sockstat_before: sock_before,
        sockstat_connected: sock_connected,
        kernel_tcp_mem_per_conn: per(
            sock_connected.tcp_mem_bytes.saturating_sub(sock_before.tcp_mem_bytes),
            c.welcomed,
        ),
        kernel_slab_per_conn: per(sock_connected.slab_bytes.saturating_sub(sock_before.slab_bytes), c.welcomed),
        tool_rss_connected,
    };
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let tool_threads = spec.threads * processes + usize::from(opts.scenario.uses_api());
    let cpu = CpuFigures {
        server_connect_pct,
        tool_connect_pct,
        server_main_pct,
        tool_main_pct,
        server_cpu_s,
        tool_cpu_s,
        machine_connect_pct,
        machine_main_pct,
        others_connect_pct: (machine_connect_pct - server_connect_pct - tool_connect_pct).max(0.0),
        others_main_pct: (machine_main_pct - server_main_pct - tool_main_pct).max(0.0),
        cores,
        tool_threads,
        tool_busiest_thread_connect_pct: tool_busiest_connect.1,
        tool_busiest_thread_main_pct: tool_busiest_main.1,
        tool_busiest_thread_connect: tool_busiest_connect.0,
        tool_busiest_thread_main: tool_busiest_main.0,
        server_us_per_delivery: None,
        tool_us_per_delivery: None,
    };
    let messages = opts.scenario.pushes().then(|| msg_figures(opts, &main, &fr, msg_hist.summary()));
    let mut cpu = cpu;
    if let Some(m) = &messages {
        cpu.per_delivery(m.received);
    }
    let mut result = RunResult {
        target: target.kind,
        client_addr: target.client.to_string(),
        run_id,
        started_unix_s,
        wall_s: t_start.elapsed().as_secs_f64(),
        connections: conns,
        memory: mem,
        cpu,
        messages,
        frames_per_write,
        tool_unread_per_socket,
        tool_timer_late_ms_max,
        saturation: Vec::new(),
        problems: Vec::new(),
        series,
        connect_hist,
        msg_hist,
    };
    result.saturation = saturation(opts, &result);
    result.problems = problems(&result);
    for p in &result.problems {
        live.say(&format!("{label}: PROBLEM: {p}"));
    }
    for s in &result.saturation {
        live.say(&format!("{label}: saturation: {s}"));
    }
    Ok(result)
}

fn fleets_count(n: u64, per_process_max: u64) -> usize {
    if n <= per_process_max {
        1
    } else {
        n.div_ceil(per_process_max.max(1)) as usize
    }
}

fn per(bytes: u64, n: u64) -> f64 {
    if n == 0 {
        0.0
    } else {
        bytes as f64 / n as f64
    }
}

/// What the main phase of a message scenario leaves for the figures.
#[derive(Default)]
struct MainOut {
    api: Option<ApiReport>,
    /// Unix nanos the sending started (chat: the order to the fleets).
    start_ns: u64,
    send_phase_s: f64,
    deliver_phase_s: f64,
    /// `reconnect`: terminals picked to drop, when the order to come back went out, how long
    /// they were away, and whether all came back in time.
    to_drop: u64,
    reconnect_ns: u64,
    away_s: f64,
}

/// Creates the run's groups (before the terminals connect, as members would already be in
/// their groups): `<prefix><g>` owned by its first member, members added 5,000 per call.
fn setup_groups(opts: &Options, target: &Target, spec: &FleetSpec, live: &Live) -> Result<(), String> {
    let api = target.api.ok_or("group needs the node's API address (--api)")?;
    let t0 = Instant::now();
    const CHUNK: u64 = 5000;
    for g in 0..opts.groups {
        let first = g * opts.members;
        let member = |i: u64| format!("\"{}{}\"", spec.user_prefix, i);
        let gid = format!("{}{g}", spec.group_prefix);
        let upto = (first + CHUNK).min(first + opts.members);
        let members: Vec<String> = (first + 1..upto).map(member).collect();
        let body = format!(
            "{{\"id\":\"{gid}\",\"name\":\"load test {g}\",\"owner\":\"{}{first}\",\"members\":[{}]}}",
            spec.user_prefix,
            members.join(",")
        );
        let (status, answer) = crate::api::call(api, &target.api_key, "POST", "/v1/groups", &body)?;
        if status != 201 && status != 200 {
            return Err(format!("creating group {gid}: HTTP {status}: {answer}"));
        }
        let mut at = upto;
        while at < first + opts.members {
            let end = (at + CHUNK).min(first + opts.members);
            let members: Vec<String> = (at..end).map(member).collect();
            let body = format!("{{\"members\":[{}]}}", members.join(","));
            let path = format!("/v1/groups/{gid}/members");
            let (status, answer) = crate::api::call(api, &target.api_key, "POST", &path, &body)?;
            if status != 200 {
                return Err(format!("adding members to {gid}: HTTP {status}: {answer}"));
            }
            at = end;
        }
    }
    live.say(&format!(
        "{} groups of {} members created in {:.1}s",
        opts.groups,
        opts.members,
        t0.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// The main phase of the API-driven scenarios: `unicast`, `batch`, `group`, `reconnect`.
fn api_phase(
    opts: &Options,
    target: &Target,
    spec: &FleetSpec,
    fleets: &[Fleet],
    mon: &mut Monitor,
) -> Result<MainOut, String> {
    let n = opts.connections;
    let api_addr = target.api.ok_or("this scenario needs the node's API address (--api)")?;
    let group = opts.scenario == Scenario::Group;
    let gate = (group && opts.group_mode == GroupMode::Hot).then(|| Gate {
        delivered: fleets.iter().flat_map(|f| f.live()).collect(),
        per_msg: opts.members,
        window: opts.window.max(1) * opts.groups,
    });
    let main_start = Instant::now();
    let start_ns = crate::unix_nanos();
    let api = ApiRun::start(ApiSpec {
        addr: api_addr,
        more_addrs: target.more_apis.clone(),
        api_key: target.api_key.clone(),
        conns: opts.api_conns.max(1),
        pipeline: opts.pipeline.max(1),
        rate: opts.msg_rate,
        messages: opts.messages(),
        duration: opts.duration,
        batch_size: opts.batch_size,
        users: if group { opts.groups } else { n },
        user_prefix: spec.user_prefix.clone(),
        from: format!("lt{}src", spec.run_id),
        run_id: spec.run_id.clone(),
        drain_timeout: opts.drain_timeout,
        pin: None,
        group: group.then(|| GroupTarget { prefix: spec.group_prefix.clone(), members: opts.members }),
        record_ids: opts.scenario == Scenario::Reconnect,
        gate,
    })
    .map_err(|e| format!("cannot start the API driver: {e}"))?;
    let mut out = MainOut { start_ns, ..Default::default() };
    if opts.scenario == Scenario::Reconnect {
        reconnect_orders(opts, fleets, mon, &api, &mut out);
    } else {
        loop {
            mon.tick(fleets, Some(&api), "send");
            if api.finished() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    out.send_phase_s = main_start.elapsed().as_secs_f64();
    let report = api.join();
    // Drain: wait until every accepted message has arrived everywhere, or the drain timeout.
    let expected = if group { report.messages_acked * opts.members } else { report.messages_acked };
    let drain_deadline = Instant::now() + opts.drain_timeout;
    loop {
        let snap = mon.tick(fleets, None, "drain");
        if snap.counters.received >= expected || Instant::now() > drain_deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    out.deliver_phase_s = main_start.elapsed().as_secs_f64();
    out.api = Some(report);
    Ok(out)
}

/// `reconnect`: while the API driver sends, drops the share, waits, orders the dropped
/// terminals back, and waits until every one of them is synced (or the reconnect timeout).
fn reconnect_orders(opts: &Options, fleets: &[Fleet], mon: &mut Monitor, api: &ApiRun, out: &mut MainOut) {
    let t0 = Instant::now();
    out.to_drop = (0..opts.connections).filter(|&g| should_drop(g, opts.drop_share)).count() as u64;
    let mut phase = "send";
    let mut dropped_at = None;
    let mut back_by = None;
    loop {
        let snap = mon.tick(fleets, Some(api), phase);
        let c = &snap.counters;
        match phase {
            "send" if t0.elapsed() >= opts.drop_after => {
                for f in fleets {
                    f.command(&FleetCmd::Drop { share: opts.drop_share });
                }
                dropped_at = Some(Instant::now());
                mon.live.say(&format!("reconnect: dropping {} terminals abruptly", out.to_drop));
                phase = "away";
            }
            "away" if dropped_at.is_some_and(|d| d.elapsed() >= opts.away) => {
                out.reconnect_ns = crate::unix_nanos();
                out.away_s = dropped_at.map_or(0.0, |d| d.elapsed().as_secs_f64());
                for f in fleets {
                    f.command(&FleetCmd::Reconnect { at_ns: out.reconnect_ns });
                }
                back_by = Some(Instant::now() + opts.reconnect_timeout);
                mon.live.say(&format!(
                    "reconnect: {} dropped, {:.1}s away; ordering them back",
                    c.dropped_on_purpose, out.away_s
                ));
                phase = "resync";
            }
            "resync" if c.synced + c.reconnect_failed >= out.to_drop || back_by.is_some_and(|b| Instant::now() > b) => {
                mon.live.say(&format!(
                    "reconnect: {} back, {} synced, {} failed",
                    c.reconnected, c.synced, c.reconnect_failed
                ));
                if api.finished() {
                    return;
                }
                // Keep sending until the driver is done.
                loop {
                    mon.tick(fleets, Some(api), "send");
                    if api.finished() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `chat`: orders the fleets to send (each its share of the rate), stops them after the
/// duration, and waits until every send is answered and every accepted message delivered.
fn chat_phase(opts: &Options, spec: &FleetSpec, fleets: &[Fleet], mon: &mut Monitor) -> MainOut {
    let counts: Vec<u64> = if fleets.len() > 1 {
        crate::workers::split(spec, fleets.len()).iter().map(|s| s.count).collect()
    } else {
        vec![spec.count]
    };
    let main_start = Instant::now();
    let start_ns = crate::unix_nanos();
    for (f, c) in fleets.iter().zip(&counts) {
        let rate = if opts.msg_rate > 0.0 { opts.msg_rate * *c as f64 / spec.count.max(1) as f64 } else { 0.0 };
        f.command(&FleetCmd::Chat { rate, window: opts.chat_window });
    }
    while main_start.elapsed() < opts.duration {
        mon.tick(fleets, None, "send");
        std::thread::sleep(Duration::from_millis(50));
    }
    let stop: Vec<u64> = fleets.iter().map(|f| f.command(&FleetCmd::StopSending)).collect();
    let send_phase_s = main_start.elapsed().as_secs_f64();
    let deadline = Instant::now() + opts.drain_timeout;
    loop {
        let snap = mon.tick(fleets, None, "drain");
        if chat_drained(&stop, &snap.orders_applied, &snap.counters) || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    MainOut { start_ns, send_phase_s, deliver_phase_s: main_start.elapsed().as_secs_f64(), ..Default::default() }
}

/// Whether the `chat` drain is over, from one reading of the fleets' counters: every send
/// answered (`sent` or `error`) and every accepted message received.
///
/// The stop order reaches each thread (and each worker process) asynchronously, and the
/// threads publish their counters every 200 ms: a reading may hold counters taken before a
/// thread stopped sending, which can show everything answered while that thread still sends
/// (answers refill the window, the rate driver goes on), and the sends after it would then
/// be counted unanswered or lost. So only a reading in which every fleet's counters were
/// published by threads that had all carried out the stop order (fleet `i`'s order number
/// `stop[i]`, against its `orders_applied[i]`) can end the drain; two equal readings do not
/// prove it, as both may predate the stop. From the stop on a thread's `sends` no longer
/// grows and its other counters only grow, so one such reading that shows everything
/// answered and received is final.
fn chat_drained(stop: &[u64], orders_applied: &[u64], c: &crate::stats::Counters) -> bool {
    let after_stop = stop.len() == orders_applied.len() && orders_applied.iter().zip(stop).all(|(a, s)| a >= s);
    let answered = c.sends_answered + c.send_errors >= c.sends;
    after_stop && answered && c.received >= c.sends_answered
}

/// Messages per second between two Unix-nano instants.
fn per_s(count: u64, from_ns: u64, to_ns: u64) -> f64 {
    if to_ns > from_ns {
        count as f64 / ((to_ns - from_ns) as f64 / 1e9)
    } else {
        0.0
    }
}

fn msg_figures(opts: &Options, main: &MainOut, fr: &FleetReport, latency: LatencySummary) -> MsgFigures {
    let c = &fr.counters;
    let empty = ApiReport::default();
    let a = main.api.as_ref().unwrap_or(&empty);
    let mut f = MsgFigures {
        target_rate: opts.msg_rate,
        batch_size: opts.batch_size,
        sent: a.messages_sent,
        acked: a.messages_acked,
        failed: a.messages_failed,
        api_errors: a.errors.clone(),
        received: c.received,
        duplicates: c.duplicates,
        reordered: c.reordered,
        seq_holes: fr.seq_holes,
        misrouted: c.misrouted,
        foreign: c.foreign,
        send_phase_s: main.send_phase_s,
        drain_end_s: main.deliver_phase_s,
        sent_per_s: per_s(a.messages_sent, a.first_send_ns, a.last_send_ns),
        // Not over `deliver_phase_s`: that one starts before the API driver does and ends
        // when the coordinator notices the last delivery, up to a counter publish later.
        delivered_per_s: per_s(c.received, a.first_send_ns, c.last_recv_ns),
        latency,
        api_latency: a.api_latency.to_hist().summary(),
        send_lag: a.send_lag.to_hist().summary(),
        ..Default::default()
    };
    // Accepted per addressee against received per terminal.
    let per_terminal_acked: Box<dyn Fn(usize) -> u32> = match opts.scenario {
        Scenario::Group => Box::new(|u| a.per_user_acked.get(u / opts.members.max(1) as usize).copied().unwrap_or(0)),
        Scenario::Chat => Box::new(|u| fr.acked_to.get(u).copied().unwrap_or(0)),
        _ => Box::new(|u| a.per_user_acked.get(u).copied().unwrap_or(0)),
    };
    // A terminal that was down at the end (reconnect) cannot have lost anything: it is a
    // connection failure, reported as such.
    let down = |u: usize| !fr.up.get(u).copied().unwrap_or(true);
    for u in 0..opts.connections as usize {
        if down(u) {
            continue;
        }
        let acked = per_terminal_acked(u);
        let got = fr.per_user_received.get(u).copied().unwrap_or(0);
        f.lost += acked.saturating_sub(got) as u64;
        f.unacked_received += got.saturating_sub(acked) as u64;
    }
    match opts.scenario {
        Scenario::Group => {
            // Deliveries per second: first publish to last delivery.
            f.delivered_per_s = per_s(c.received, a.first_send_ns, c.last_recv_ns);
            let mut last = Hist::new();
            let mut complete = 0u64;
            for m in &fr.per_msg {
                if m.count as u64 >= opts.members {
                    complete += 1;
                    last.record_us(m.last_us);
                }
            }
            f.group = Some(GroupFigures {
                mode: opts.group_mode,
                groups: opts.groups,
                members: opts.members,
                interval_ms: if opts.group_mode == GroupMode::Sparse {
                    opts.interval.as_secs_f64() * 1000.0
                } else {
                    0.0
                },
                window: if opts.group_mode == GroupMode::Hot { opts.window } else { 0 },
                published_per_s: f.sent_per_s,
                expected_deliveries: a.messages_acked * opts.members,
                last_member: last.summary(),
                last_member_by_message: last_member_by_message(&fr.per_msg, opts.members, PER_MESSAGE_MAX),
                messages_incomplete: a.messages_acked.saturating_sub(complete),
            });
        }
        Scenario::Chat => {
            f.sent = c.sends;
            f.acked = c.sends_answered;
            f.failed = c.send_errors;
            f.api_errors = fr.send_errors.clone();
            f.sent_per_s = if main.send_phase_s > 0.0 { c.sends as f64 / main.send_phase_s } else { 0.0 };
            // Messages end to end per second: the order to send to the last delivery.
            f.delivered_per_s = per_s(c.received, main.start_ns, c.last_recv_ns);
            f.api_latency = fr.send_latency.to_hist().summary();
            f.chat = Some(ChatFigures {
                window: opts.chat_window,
                read_every: opts.read_every,
                echoes: c.echoes,
                reads_sent: c.reads_sent,
                receipts: c.receipts,
                unanswered: c.sends.saturating_sub(c.sends_answered + c.send_errors),
            });
        }
        Scenario::Reconnect => {
            let mut x = ReconnectFigures {
                share: opts.drop_share,
                to_drop: main.to_drop,
                dropped: c.dropped_on_purpose,
                reconnected: c.reconnected,
                reconnect_failed: c.reconnect_failed,
                synced: c.synced,
                syncs_sent: c.syncs_sent,
                away_s: main.away_s,
                back_and_synced_s: if c.last_synced_ns > main.reconnect_ns && main.reconnect_ns > 0 {
                    (c.last_synced_ns - main.reconnect_ns) as f64 / 1e9
                } else {
                    0.0
                },
                per_terminal: fr.sync_latency.to_hist().summary(),
                ..Default::default()
            };
            for (u, accepted) in a.per_user_ids.iter().enumerate() {
                let got = fr.ids.get(u).map(Vec::as_slice).unwrap_or(&[]);
                let (missing, unexpected, dups) = compare_ids(accepted, got);
                x.ids_accepted += accepted.len() as u64;
                x.ids_received += accepted.len() as u64 - missing;
                if fr.up.get(u).copied().unwrap_or(true) {
                    x.ids_missing += missing;
                } else {
                    x.ids_unreachable += missing;
                }
                x.ids_unexpected += unexpected;
                x.id_duplicates += dups;
            }
            f.lost = x.ids_missing;
            f.reconnect = Some(x);
        }
        _ => {}
    }
    f
}

/// Accepted ids (any order) against received ids (sorted, duplicates kept): (missing,
/// received but never accepted, duplicate receipts).
pub fn compare_ids(accepted: &[u64], received_sorted: &[u64]) -> (u64, u64, u64) {
    let mut got = received_sorted.to_vec();
    got.dedup();
    let dups = (received_sorted.len() - got.len()) as u64;
    let mut acc = accepted.to_vec();
    acc.sort_unstable();
    acc.dedup();
    let missing = acc.iter().filter(|id| got.binary_search(id).is_err()).count() as u64;
    let unexpected = got.iter().filter(|id| acc.binary_search(id).is_err()).count() as u64;
    (missing, unexpected, dups)
}

/// Unread bytes per terminal socket (main-phase average) from which the tool counts as reading
/// behind: a few frames' worth waiting is normal, kilobytes mean its reads lag the node's writes.
const TOOL_UNREAD_BEHIND_B: f64 = 4096.0;
/// Seconds between samples of the terminals' receive queues. Reading `/proc/net/tcp` makes the
/// kernel format a line per socket: with 20,000 sockets that was about 6% of the tool's CPU
/// when read every second (`perf`: `established_get_first`, `vsnprintf`).
const UNREAD_SAMPLE_EVERY: u32 = 3;
/// One of the tool's threads this busy (percent of a core) is reported as a possible limit.
const TOOL_THREAD_BUSY_PCT: f64 = 85.0;
/// A terminal thread's timer this late (ms) is reported with the run's saturation notes.
const TOOL_TIMER_LATE_MS: u64 = 1000;
/// Longest wait for every fleet's fresh counters before a point is made anyway.
const STALE_POINT_MAX: Duration = Duration::from_secs(5);

/// Longest wait for the server's RSS to settle before the baseline of per-connection memory.
const RSS_SETTLE_MAX: Duration = Duration::from_secs(3);

fn saturation(opts: &Options, r: &RunResult) -> Vec<String> {
    let mut out = Vec::new();
    let cpu = &r.cpu;
    let tool_cap = (cpu.tool_threads.min(cpu.cores) * 100) as f64;
    for (phase, tool, server, others, (busiest, busiest_pct)) in [
        (
            "connect",
            cpu.tool_connect_pct,
            cpu.server_connect_pct,
            cpu.others_connect_pct,
            (&cpu.tool_busiest_thread_connect, cpu.tool_busiest_thread_connect_pct),
        ),
        (
            if opts.scenario.pushes() { "send" } else { "hold" },
            cpu.tool_main_pct,
            cpu.server_main_pct,
            cpu.others_main_pct,
            (&cpu.tool_busiest_thread_main, cpu.tool_busiest_thread_main_pct),
        ),
    ] {
        if others >= 30.0 {
            out.push(format!(
                "{phase}: other processes on this machine used {others:.0}% CPU: the figures are disturbed"
            ));
        }
        if tool >= 0.85 * tool_cap {
            out.push(format!(
                "{phase}: the tool used {tool:.0}% CPU of its {} thread(s): its own limit may be the figure",
                cpu.tool_threads
            ));
        } else if busiest_pct >= TOOL_THREAD_BUSY_PCT {
            out.push(format!(
                "{phase}: the tool's thread {busiest} used {busiest_pct:.0}% of a core (the tool {tool:.0}% over its {} thread(s)): that thread's limit may be the figure",
                cpu.tool_threads
            ));
        }
        if tool + server + others >= 0.9 * (cpu.cores * 100) as f64 {
            out.push(format!(
                "{phase}: the machine's CPUs were saturated (server {server:.0}% + tool {tool:.0}% + others {others:.0}% of {} cores)",
                cpu.cores
            ));
        }
    }
    if let Some(unread) = r.tool_unread_per_socket.filter(|u| *u >= TOOL_UNREAD_BEHIND_B) {
        out.push(format!(
            "the tool's terminals read behind: {unread:.0} B per socket waited unread on average (kernel receive queues): the tool may be the limit (try more --threads)"
        ));
    }
    if r.tool_timer_late_ms_max >= TOOL_TIMER_LATE_MS {
        out.push(format!(
            "the tool's terminal threads ran their timers up to {} ms late: throughput points are sparser, and heartbeats and orders to the terminals came late (the receive queues above say whether reads fell behind too)",
            r.tool_timer_late_ms_max
        ));
    }
    let c = &r.connections;
    if c.target_rate > 0.0 && c.requested >= 1000 && c.handshakes_per_s < 0.9 * c.target_rate {
        out.push(format!("connect rate {:.0}/s is below the target {:.0}/s", c.handshakes_per_s, c.target_rate));
    }
    if let Some(m) = &r.messages {
        if m.target_rate > 0.0 && m.sent >= 1000 && m.sent_per_s < 0.95 * m.target_rate {
            if opts.scenario == Scenario::Chat {
                out.push(format!(
                    "the terminals sent {:.0} msgs/s of the target {:.0}/s (their --window {} of unanswered sends stayed full: answers too slow, or the tool is the limit)",
                    m.sent_per_s, m.target_rate, opts.chat_window
                ));
            } else {
                out.push(format!(
                    "the sender reached {:.0} msgs/s of the target {:.0}/s (API answers too slow for --pipeline {} x --api-conns {}, or the tool is the limit)",
                    m.sent_per_s, m.target_rate, opts.pipeline, opts.api_conns
                ));
            }
        }
        if m.latency.p50_ms > 1000.0 && opts.scenario != Scenario::Group {
            out.push(format!(
                "deliveries fell behind: latency p50 {:.0} ms (accepted faster than delivered)",
                m.latency.p50_ms
            ));
        }
        if m.send_lag.p99_ms > 100.0 {
            out.push(format!("requests left {:.0} ms behind schedule at p99", m.send_lag.p99_ms));
        }
    }
    out
}

fn problems(r: &RunResult) -> Vec<String> {
    let mut out = Vec::new();
    let c = &r.connections;
    if c.failed > 0 || c.connected < c.requested {
        out.push(format!(
            "{} of {} terminals failed to connect: {}",
            c.requested - c.connected,
            c.requested,
            tally(&c.failures)
        ));
    }
    if c.dropped > 0 {
        out.push(format!("{} connected terminals were closed during the run: {}", c.dropped, tally(&c.drops)));
    }
    if let Some(m) = &r.messages {
        if m.failed > 0 {
            out.push(format!(
                "{} of {} messages were not accepted by the API: {}",
                m.failed,
                m.sent,
                tally(&m.api_errors)
            ));
        }
        if m.lost > 0 {
            out.push(format!("{} messages acknowledged by the API never reached their terminal", m.lost));
        }
        if m.misrouted > 0 {
            out.push(format!("{} messages reached the wrong terminal", m.misrouted));
        }
        if let Some(c) = &m.chat {
            if c.unanswered > 0 {
                out.push(format!("{} sends were never answered (no sent, no error)", c.unanswered));
            }
        }
        if let Some(x) = &m.reconnect {
            if x.dropped < x.to_drop {
                out.push(format!("only {} of the {} terminals to drop were dropped", x.dropped, x.to_drop));
            }
            if x.reconnect_failed > 0 || x.reconnected < x.dropped {
                out.push(format!(
                    "{} of {} dropped terminals did not come back ({} failed to connect)",
                    x.dropped.saturating_sub(x.reconnected),
                    x.dropped,
                    x.reconnect_failed
                ));
            }
            if x.synced < x.reconnected {
                out.push(format!(
                    "{} of {} reconnected terminals never finished their sync",
                    x.reconnected - x.synced,
                    x.reconnected
                ));
            }
            if x.ids_missing > 0 {
                out.push(format!(
                    "{} of {} accepted message ids never arrived (after dedupe by id)",
                    x.ids_missing, x.ids_accepted
                ));
            }
        }
    }
    out
}

pub fn tally(m: &std::collections::BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "(no reason recorded)".into();
    }
    m.iter().map(|(k, v)| format!("{v} {k}")).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_member_by_message_lists_complete_messages_in_publish_order() {
        let seen = |k, count, last_us| MsgSeen { k, count, last_us };
        let per_msg = [seen(2, 3, 12_340), seen(0, 3, 5_000), seen(1, 2, 9_000), seen(3, 3, 1_050)];
        // Message 1 reached only 2 of 3 members: not listed; ms to 0.1.
        assert_eq!(last_member_by_message(&per_msg, 3, 10), vec![(0, 5.0), (2, 12.3), (3, 1.1)]);
        assert_eq!(last_member_by_message(&per_msg, 3, 2), vec![(0, 5.0), (2, 12.3)], "the first ones kept");
    }

    /// The chat drain over a series of readings (fleets' `orders_applied`, counters): the
    /// index of the reading that ends it, if any.
    fn drain_ends_at(stop: &[u64], readings: &[(Vec<u64>, crate::stats::Counters)]) -> Option<usize> {
        readings.iter().position(|(applied, c)| chat_drained(stop, applied, c))
    }

    #[test]
    fn chat_drain_waits_for_counters_published_after_the_stop() {
        use crate::stats::Counters;
        let chat =
            |sends, answered, received| Counters { sends, sends_answered: answered, received, ..Default::default() };
        // Two fleets; the stop order is order 2 of each (after `chat`).
        let stop = [2, 2];
        // Before the stop landed, a low rate left a moment with nothing in flight, and the
        // threads' 200 ms publishes made two readings 100 ms apart equal: both predate the
        // stop (fleet 1 has only carried out order 1), so neither may end the drain. Then
        // fleet 1's threads stop and publish: 3 more sends went out meanwhile, in flight.
        let readings = vec![
            (vec![2, 1], chat(10, 10, 10)),
            (vec![2, 1], chat(10, 10, 10)),
            (vec![2, 2], chat(13, 11, 10)),
            (vec![2, 2], chat(13, 13, 12)),
            (vec![2, 2], chat(13, 13, 13)),
        ];
        assert_eq!(
            drain_ends_at(&stop, &readings),
            Some(4),
            "ends only on post-stop counters, all answered and received"
        );
        // A send answered by an error counts as answered; nothing to receive for it.
        let c = Counters { sends: 5, sends_answered: 4, send_errors: 1, received: 4, ..Default::default() };
        assert!(chat_drained(&stop, &[3, 2], &c));
        // A fleet missing from the reading (or not reporting yet) is not past the stop.
        assert!(!chat_drained(&stop, &[2], &c));
        assert!(!chat_drained(&stop, &[0, 2], &c));
    }

    fn run(delivered_per_s: f64, p99_ms: f64) -> RunResult {
        RunResult {
            target: "engine",
            client_addr: String::new(),
            run_id: String::new(),
            started_unix_s: 0,
            wall_s: 1.0,
            connections: ConnFigures::default(),
            memory: MemFigures::default(),
            cpu: CpuFigures::default(),
            messages: Some(MsgFigures {
                delivered_per_s,
                latency: LatencySummary { p99_ms, ..LatencySummary::default() },
                ..MsgFigures::default()
            }),
            frames_per_write: None,
            tool_unread_per_socket: None,
            tool_timer_late_ms_max: 0,
            saturation: vec![],
            problems: vec![],
            series: vec![],
            connect_hist: Hist::new(),
            msg_hist: Hist::new(),
        }
    }

    /// A paced unicast run on 2 cores: the tool (one terminal thread, the API driver) used
    /// 120% of its two threads' 200%, below the 85% the tool's total is judged by, but its
    /// terminal thread used 98% of a core: that is the tool's limit, and the run says so.
    #[test]
    fn a_pegged_tool_thread_is_reported_though_the_tool_total_has_room() {
        let mut r = run(19_000.0, 5.0);
        r.cpu = CpuFigures {
            tool_main_pct: 120.0,
            server_main_pct: 40.0,
            machine_main_pct: 160.0,
            cores: 2,
            tool_threads: 2,
            tool_busiest_thread_main_pct: 98.0,
            tool_busiest_thread_main: "lt-term-0".into(),
            ..CpuFigures::default()
        };
        let opts = Options::new(Scenario::Unicast, TargetSpec::Wire);
        let notes = saturation(&opts, &r);
        assert!(
            notes.iter().any(|n| n.starts_with("send: ") && n.contains("lt-term-0") && n.contains("98%")),
            "{notes:?}"
        );
        // A thread with room left says nothing.
        r.cpu.tool_busiest_thread_main_pct = 60.0;
        assert!(saturation(&opts, &r).is_empty(), "{:?}", saturation(&opts, &r));
    }

    /// A unicast run: 100,000 messages, the first request at 1 s, the last delivery at 11 s
    /// (10,000/s); the coordinator saw the drain end only at 12 s after the main phase
    /// started (its start came before the API driver's, the counters' publish after the last
    /// delivery). The rate is over the 10 s the deliveries took.
    #[test]
    fn delivered_per_s_spans_first_request_to_last_delivery() {
        let mut opts = Options::new(Scenario::Unicast, TargetSpec::Wire);
        opts.connections = 2;
        let api = ApiReport {
            messages_sent: 100_000,
            messages_acked: 100_000,
            per_user_acked: vec![50_000, 50_000],
            first_send_ns: 1_000_000_000,
            last_send_ns: 10_900_000_000,
            ..ApiReport::default()
        };
        let main = MainOut { api: Some(api), send_phase_s: 11.0, deliver_phase_s: 12.0, ..MainOut::default() };
        let fr = FleetReport {
            counters: crate::stats::Counters {
                received: 100_000,
                first_recv_ns: 1_000_500_000,
                last_recv_ns: 11_000_000_000,
                ..Default::default()
            },
            per_user_received: vec![50_000, 50_000],
            ..FleetReport::default()
        };
        let m = msg_figures(&opts, &main, &fr, LatencySummary::default());
        assert!((m.delivered_per_s - 10_000.0).abs() < 1e-6, "{}", m.delivered_per_s);
        assert_eq!((m.lost, m.drain_end_s), (0, 12.0));
    }

    fn checks(scenario: Scenario, rate: f64, r: &RunResult) -> Vec<(String, bool)> {
        let mut opts = Options::new(scenario, TargetSpec::Wire);
        opts.msg_rate = rate;
        targets(&opts, Some(r), None).into_iter().map(|t| (t.what, t.met)).collect()
    }

    #[test]
    fn unicast_and_batch_runs_are_checked_against_the_issue_targets() {
        let unpaced = checks(Scenario::Unicast, 0.0, &run(51_000.0, 80.0));
        assert_eq!(unpaced, [("deliveries/s through single API requests".to_owned(), true)]);
        assert!(!checks(Scenario::Unicast, 0.0, &run(49_000.0, 80.0))[0].1);
        let paced = checks(Scenario::Unicast, 20_000.0, &run(19_990.0, 1.5));
        assert_eq!(paced, [("publish to receipt p99 at 20,000 msgs/s".to_owned(), false)]);
        assert!(checks(Scenario::Unicast, 20_000.0, &run(19_990.0, 0.9))[0].1);
        // Another paced rate checks nothing (no target is set for it).
        assert!(checks(Scenario::Unicast, 5_000.0, &run(5_000.0, 0.5)).is_empty());
        let batch = checks(Scenario::Batch, 0.0, &run(160_000.0, 80.0));
        assert_eq!(batch, [("deliveries/s through the batch endpoint".to_owned(), true)]);
        // Over TLS nothing is judged: the targets are for ws://.
        let mut opts = Options::new(
            Scenario::Unicast,
            TargetSpec::DataDir {
                dir: "d".into(),
                server_pid: None,
                tls: Some(crate::tls::TlsSpec { ca_pem: String::new(), server_name: "localhost".into() }),
            },
        );
        opts.msg_rate = 0.0;
        assert!(targets(&opts, Some(&run(51_000.0, 80.0)), None).is_empty());
        // Nor is a cluster run: the targets are for one node.
        let spawn = SpawnOptions {
            ether_bin: None,
            shards: None,
            extra_args: vec![],
            keep_data: false,
            start_timeout: Duration::from_secs(1),
            cluster: 2,
            tls: false,
        };
        let mut opts = Options::new(Scenario::Unicast, TargetSpec::Spawn(spawn));
        opts.msg_rate = 0.0;
        assert!(targets(&opts, Some(&run(51_000.0, 80.0)), None).is_empty());
    }
}
