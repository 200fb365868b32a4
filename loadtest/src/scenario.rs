//! The scenarios. Each run: set up the target, sample it, connect the terminals at the
//! requested rate, then hold them (`idle`) or push messages through the API (`unicast`,
//! `batch`), sample again, stop, and turn the fleets' and the driver's accounts into figures,
//! losses, saturation notes and problems. With `--wire-limit` the same run is made first
//! against the in-tool wire-limit server and the engine's figures are given as ratios.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::api::{ApiReport, ApiRun, ApiSpec};
use crate::fleet::FleetSpec;
use crate::live::{self, Live};
use crate::procstat::{self, CpuMeter, SockStat};
use crate::spawn::{SpawnOptions, Target};
use crate::stats::{FleetReport, Hist, LatencySummary};
use crate::workers::Fleet;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scenario {
    Idle,
    Unicast,
    Batch,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Idle => "idle",
            Scenario::Unicast => "unicast",
            Scenario::Batch => "batch",
        }
    }

    fn pushes(self) -> bool {
        !matches!(self, Scenario::Idle)
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
    },
    /// An existing node's data dir (ports.json, secrets.toml).
    DataDir { dir: PathBuf, server_pid: Option<u32> },
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
}

impl Options {
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
        }
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
    /// (connected - before) / connected terminals.
    pub server_rss_per_conn: f64,
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
    pub sent_per_s: f64,
    /// Messages received per second of the send phase plus its drain.
    pub delivered_per_s: f64,
    pub latency: LatencySummary,
    pub api_latency: LatencySummary,
    pub send_lag: LatencySummary,
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

/// The whole invocation: the engine's run and, with `--wire-limit`, the wire-limit run.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub scenario: Scenario,
    pub runs: Vec<RunResult>,
    /// Engine figure / wire-limit figure, when both ran.
    pub ratios: Option<serde_json::Value>,
    pub result_dir: Option<PathBuf>,
}

impl Outcome {
    pub fn problems(&self) -> Vec<String> {
        self.runs.iter().flat_map(|r| r.problems.iter().map(move |p| format!("{}: {p}", r.target))).collect()
    }
}

fn make_target(spec: &TargetSpec, wire_processes: usize) -> Result<Target, String> {
    match spec {
        TargetSpec::Spawn(o) => Target::spawn_engine(o),
        TargetSpec::External { client, api, jwt_secret, api_key, server_pid } => {
            Ok(Target::external(*client, *api, jwt_secret.clone(), api_key.clone(), *server_pid))
        }
        TargetSpec::DataDir { dir, server_pid } => Target::from_data_dir(dir, *server_pid),
        TargetSpec::Wire => Target::wire_limit(wire_processes, None),
    }
}

/// Runs the scenario (and its wire-limit twin), writes the record, returns the outcome.
pub fn run(opts: &Options) -> Result<Outcome, String> {
    procstat::raise_nofile_limit();
    let wire_processes = opts.connections.div_ceil(opts.per_process_max.max(1)).max(1) as usize;
    if opts.scenario.pushes() && wire_processes > 1 {
        let wire_involved = opts.wire_limit || matches!(opts.target, TargetSpec::Wire);
        if wire_involved {
            return Err(format!(
                "the wire-limit server routes messages within one process: at most {} connections for {}",
                opts.per_process_max,
                opts.scenario.name()
            ));
        }
    }
    let mut runs = Vec::new();
    if opts.wire_limit && !matches!(opts.target, TargetSpec::Wire) {
        let t = Target::wire_limit(wire_processes, None)?;
        runs.push(run_one(opts, &t)?);
    }
    let t = make_target(&opts.target, wire_processes)?;
    runs.push(run_one(opts, &t)?);
    let ratios = (runs.len() == 2).then(|| ratios(&runs[1], &runs[0]));
    let mut out = Outcome { scenario: opts.scenario, runs, ratios, result_dir: None };
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
    });
    if let (Some(e), Some(w)) = (&engine.messages, &wire.messages) {
        v["delivered_per_s"] = ratio(e.delivered_per_s, w.delivered_per_s);
        v["latency_p50"] = ratio(e.latency.p50_ms, w.latency.p50_ms);
        v["latency_p99"] = ratio(e.latency.p99_ms, w.latency.p99_ms);
    }
    v
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
}

#[derive(Default, Clone)]
struct Snapshot {
    counters: crate::stats::Counters,
    connect_done: bool,
    sent: u64,
    acked: u64,
    api_failed: u64,
}

impl<'a> Monitor<'a> {
    fn tick(&mut self, fleets: &[Fleet], api: Option<&ApiRun>, phase: &'static str) -> Snapshot {
        let mut s = Snapshot { connect_done: true, ..Default::default() };
        for f in fleets {
            let p = f.progress();
            s.counters.add(&p.counters);
            s.connect_done &= p.connect_done;
            self.interval.add_data(&p.interval_latency);
        }
        if let Some(a) = api {
            use std::sync::atomic::Ordering::SeqCst;
            s.sent = a.shared.sent.load(SeqCst);
            s.acked = a.shared.acked.load(SeqCst);
            s.api_failed = a.shared.errors.load(SeqCst);
            self.api_last = (s.sent, s.acked);
        } else {
            (s.sent, s.acked) = self.api_last;
        }
        let dt = self.last_point.elapsed();
        if dt >= Duration::from_secs(1) {
            let secs = dt.as_secs_f64();
            self.last_server_cpu = self.server_cpu.sample();
            self.last_tool_cpu = self.tool_cpu.sample();
            self.last_rss = procstat::rss_sum(&self.server_pids);
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
    };
    let label = format!("{} {}", opts.scenario.name(), target.kind);
    let live = Live::new(opts.live, &label, n);
    live.say(&format!(
        "{label}: {n} terminals -> ws://{}/ws at {}/s (run {run_id})",
        target.client,
        if opts.connect_rate > 0.0 { format!("{:.0}", opts.connect_rate) } else { "max".into() }
    ));
    let server_pids = target.server_pids.clone();
    let rss_before = procstat::rss_sum(&server_pids);
    let sock_before = procstat::sockstat();
    let mut server_cpu = CpuMeter::new(server_pids.clone());
    let fleets = Fleet::start_all(&spec, opts.per_process_max).map_err(|e| format!("cannot start terminals: {e}"))?;
    let worker_pids: Vec<u32> = fleets.iter().filter_map(|f| f.pid()).collect();
    let mut tool_pids = vec![std::process::id()];
    tool_pids.extend(&worker_pids);
    let tool_cpu = CpuMeter::new(tool_pids.clone());
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
    mon.server_cpu.mark();
    mon.tool_cpu.mark();
    mon.machine_cpu.mark();
    let main_start = Instant::now();
    let mut api_report: Option<ApiReport> = None;
    let mut send_phase_s = 0.0;
    let mut deliver_phase_s = 0.0;
    if !opts.scenario.pushes() {
        while main_start.elapsed() < opts.hold {
            mon.tick(&fleets, None, "hold");
            std::thread::sleep(Duration::from_millis(100));
        }
    } else {
        let api_addr = target.api.ok_or("this scenario needs the node's API address (--api)")?;
        let api = ApiRun::start(ApiSpec {
            addr: api_addr,
            api_key: target.api_key.clone(),
            conns: opts.api_conns.max(1),
            pipeline: opts.pipeline.max(1),
            rate: opts.msg_rate,
            messages: opts.messages(),
            duration: opts.duration,
            batch_size: opts.batch_size,
            users: n,
            user_prefix: spec.user_prefix.clone(),
            from: format!("lt{run_id}src"),
            run_id: run_id.clone(),
            drain_timeout: opts.drain_timeout,
            pin: None,
        })
        .map_err(|e| format!("cannot start the API driver: {e}"))?;
        loop {
            mon.tick(&fleets, Some(&api), "send");
            if api.finished() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        send_phase_s = main_start.elapsed().as_secs_f64();
        let report = api.join();
        // Drain: wait until every acknowledged message has arrived, or the drain timeout.
        let drain_deadline = Instant::now() + opts.drain_timeout;
        loop {
            snap = mon.tick(&fleets, None, "drain");
            if snap.counters.received >= report.messages_acked || Instant::now() > drain_deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        deliver_phase_s = main_start.elapsed().as_secs_f64();
        api_report = Some(report);
    }
    let server_main_pct = mon.server_cpu.average();
    let tool_main_pct = mon.tool_cpu.average();
    let machine_main_pct = mon.machine_cpu.average();
    let server_cpu_s = mon.server_cpu.seconds_since_mark();
    let tool_cpu_s = mon.tool_cpu.seconds_since_mark();
    let rss_end = procstat::rss_sum(&server_pids);
    let series = std::mem::take(&mut mon.series);
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
    let tool_threads = spec.threads * processes + usize::from(opts.scenario.pushes());
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
    };
    let messages = api_report.map(|a| msg_figures(opts, &a, &fr, send_phase_s, deliver_phase_s, msg_hist.summary()));
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

fn msg_figures(
    opts: &Options,
    a: &ApiReport,
    fr: &FleetReport,
    send_s: f64,
    deliver_s: f64,
    latency: LatencySummary,
) -> MsgFigures {
    let mut lost = 0u64;
    let mut unacked = 0u64;
    for (u, &acked) in a.per_user_acked.iter().enumerate() {
        let got = fr.per_user_received.get(u).copied().unwrap_or(0);
        lost += acked.saturating_sub(got) as u64;
        unacked += got.saturating_sub(acked) as u64;
    }
    let c = &fr.counters;
    MsgFigures {
        target_rate: opts.msg_rate,
        batch_size: opts.batch_size,
        sent: a.messages_sent,
        acked: a.messages_acked,
        failed: a.messages_failed,
        api_errors: a.errors.clone(),
        received: c.received,
        lost,
        unacked_received: unacked,
        duplicates: c.duplicates,
        reordered: c.reordered,
        seq_holes: fr.seq_holes,
        misrouted: c.misrouted,
        foreign: c.foreign,
        send_phase_s: send_s,
        sent_per_s: if a.last_send_ns > a.first_send_ns {
            a.messages_sent as f64 / ((a.last_send_ns - a.first_send_ns) as f64 / 1e9)
        } else {
            0.0
        },
        delivered_per_s: if deliver_s > 0.0 { c.received as f64 / deliver_s } else { 0.0 },
        latency,
        api_latency: a.api_latency.to_hist().summary(),
        send_lag: a.send_lag.to_hist().summary(),
    }
}

fn saturation(opts: &Options, r: &RunResult) -> Vec<String> {
    let mut out = Vec::new();
    let cpu = &r.cpu;
    let tool_cap = (cpu.tool_threads.min(cpu.cores) * 100) as f64;
    for (phase, tool, server, others) in [
        ("connect", cpu.tool_connect_pct, cpu.server_connect_pct, cpu.others_connect_pct),
        (
            if opts.scenario.pushes() { "send" } else { "hold" },
            cpu.tool_main_pct,
            cpu.server_main_pct,
            cpu.others_main_pct,
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
        }
        if tool + server + others >= 0.9 * (cpu.cores * 100) as f64 {
            out.push(format!(
                "{phase}: the machine's CPUs were saturated (server {server:.0}% + tool {tool:.0}% + others {others:.0}% of {} cores)",
                cpu.cores
            ));
        }
    }
    let c = &r.connections;
    if c.target_rate > 0.0 && c.requested >= 1000 && c.handshakes_per_s < 0.9 * c.target_rate {
        out.push(format!("connect rate {:.0}/s is below the target {:.0}/s", c.handshakes_per_s, c.target_rate));
    }
    if let Some(m) = &r.messages {
        if m.target_rate > 0.0 && m.sent >= 1000 && m.sent_per_s < 0.95 * m.target_rate {
            out.push(format!(
                "the sender reached {:.0} msgs/s of the target {:.0}/s (API answers too slow for --pipeline {} x --api-conns {}, or the tool is the limit)",
                m.sent_per_s, m.target_rate, opts.pipeline, opts.api_conns
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
    }
    out
}

pub fn tally(m: &std::collections::BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "(no reason recorded)".into();
    }
    m.iter().map(|(k, v)| format!("{v} {k}")).collect::<Vec<_>>().join(", ")
}
