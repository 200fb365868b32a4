//! `ether-loadtest`: the command line. Everything else is in the library (see its docs).
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use ether_loadtest::live;
use ether_loadtest::parse_duration;
use ether_loadtest::scenario::{self, Options, Scenario, TargetSpec};
use ether_loadtest::spawn::SpawnOptions;

#[derive(Parser)]
#[command(
    name = "ether-loadtest",
    version,
    about = "Drives an Ether-IM node like thousands of terminals and business systems, and records what it saw in bench-results/"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Open N authenticated terminals at a given rate and hold them: connect rate, server RSS
    /// per connection, kernel socket memory.
    Idle {
        #[command(flatten)]
        common: Common,
        /// Connects per second (0 = as fast as allowed).
        #[arg(long, default_value_t = 10_000.0)]
        rate: f64,
        /// How long to hold the connections once all are open.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        hold: Duration,
    },
    /// API pushes to distinct users round-robin at a target rate; latency at the terminals.
    Unicast {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        push: Push,
    },
    /// Like unicast, through `POST /v1/messages/batch`.
    Batch {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        push: Push,
        /// Messages per batch request.
        #[arg(long, default_value_t = 100)]
        batch_size: usize,
    },
    /// (internal) Run one fleet of terminals for a coordinating ether-loadtest.
    #[command(hide = true)]
    Worker,
    /// (internal) The wire-limit server process.
    #[command(hide = true)]
    WireServer {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen_client: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:0")]
        listen_api: SocketAddr,
        #[arg(long)]
        pin: Option<usize>,
        /// `heartbeat_s` announced in the welcome.
        #[arg(long, default_value_t = 30)]
        heartbeat_s: u64,
    },
}

#[derive(Args)]
struct Common {
    /// Start `ether serve` from the same build on free ports (with a temporary data dir).
    #[arg(long)]
    spawn: bool,
    /// The `ether` binary for --spawn (default: next to this executable).
    #[arg(long)]
    ether_bin: Option<PathBuf>,
    /// --shards for the spawned node.
    #[arg(long)]
    shards: Option<usize>,
    /// Extra argument for `ether serve` (repeatable).
    #[arg(long = "serve-arg", allow_hyphen_values = true)]
    serve_args: Vec<String>,
    /// Keep the spawned node's data dir.
    #[arg(long)]
    keep_data: bool,
    /// Client (WebSocket) address of an existing node.
    #[arg(long)]
    client: Option<SocketAddr>,
    /// API address of an existing node.
    #[arg(long)]
    api: Option<SocketAddr>,
    /// The existing node's JWT secret.
    #[arg(long, env = "ETHER_AUTH_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// The existing node's API key.
    #[arg(long, env = "ETHER_AUTH_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// An existing node's data dir: addresses from ports.json, secrets from secrets.toml.
    #[arg(long)]
    node_data: Option<PathBuf>,
    /// The existing node's pid, to sample its RSS and CPU.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Drive only the in-tool wire-limit server (no engine needed).
    #[arg(long, conflicts_with_all = ["spawn", "client", "node_data"])]
    wire_only: bool,
    /// Run the same pattern against the in-tool wire-limit server first and report the
    /// engine's figures as ratios to it.
    #[arg(long)]
    wire_limit: bool,
    /// Terminals to open.
    #[arg(long, default_value_t = 1000)]
    connections: u64,
    /// Glommio executor threads per process for terminals.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Terminals per process; more are spread over worker processes.
    #[arg(long, default_value_t = 18_000)]
    per_process_max: u64,
    /// Loopback source addresses to spread over (default: one per 10,000 beyond 10,000).
    #[arg(long)]
    source_ips: Option<u32>,
    /// Handshakes in flight per thread.
    #[arg(long, default_value_t = 256)]
    max_inflight: usize,
    /// Give up on a terminal without a welcome after this long.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    connect_timeout: Duration,
    /// Where runs are recorded (default: the nearest bench-results/).
    #[arg(long)]
    results_dir: Option<PathBuf>,
    /// Do not write a record.
    #[arg(long)]
    no_record: bool,
    /// Plain lines instead of progress bars.
    #[arg(long)]
    plain: bool,
    /// No live output.
    #[arg(long, conflicts_with = "plain")]
    quiet: bool,
}

#[derive(Args)]
struct Push {
    /// Messages per second through the API (0 = as fast as the window allows).
    #[arg(long, default_value_t = 10_000.0)]
    rate: f64,
    /// How long to push.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Connects per second while opening the terminals.
    #[arg(long, default_value_t = 10_000.0)]
    connect_rate: f64,
    /// Keep-alive API connections.
    #[arg(long, default_value_t = 4)]
    api_conns: usize,
    /// Unanswered requests allowed per API connection.
    #[arg(long, default_value_t = 16)]
    pipeline: usize,
    /// How long to wait for outstanding answers and deliveries after the last send.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    drain_timeout: Duration,
}

fn options(scenario: Scenario, c: Common) -> Result<Options, String> {
    let target = if c.wire_only {
        TargetSpec::Wire
    } else if c.spawn {
        TargetSpec::Spawn(SpawnOptions {
            ether_bin: c.ether_bin,
            shards: c.shards,
            extra_args: c.serve_args,
            keep_data: c.keep_data,
            start_timeout: Duration::from_secs(30),
        })
    } else if let Some(dir) = c.node_data {
        TargetSpec::DataDir { dir, server_pid: c.server_pid }
    } else if let Some(client) = c.client {
        TargetSpec::External {
            client,
            api: c.api,
            jwt_secret: c.jwt_secret.ok_or("--client needs --jwt-secret (or ETHER_AUTH_JWT_SECRET)")?,
            api_key: c.api_key.unwrap_or_default(),
            server_pid: c.server_pid,
        }
    } else {
        return Err(
            "say which node to drive: --spawn, --client ADDR --jwt-secret S [--api ADDR --api-key K], --node-data DIR, or --wire-only".into(),
        );
    };
    let mut o = Options::new(scenario, target);
    o.connections = c.connections;
    o.threads = c.threads;
    o.per_process_max = c.per_process_max.max(1);
    o.source_ips = c.source_ips;
    o.max_inflight = c.max_inflight;
    o.connect_timeout = c.connect_timeout;
    o.wire_limit = c.wire_limit;
    o.results_dir = c.results_dir;
    o.record = !c.no_record;
    o.live = if c.quiet {
        live::Mode::Quiet
    } else if c.plain {
        live::Mode::Plain
    } else {
        live::Mode::Auto
    };
    o.command = std::env::args().collect();
    Ok(o)
}

fn push_options(o: &mut Options, p: Push) {
    o.msg_rate = p.rate;
    o.duration = p.duration;
    o.connect_rate = p.connect_rate;
    o.api_conns = p.api_conns;
    o.pipeline = p.pipeline;
    o.drain_timeout = p.drain_timeout;
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let opts = match cli.cmd {
        Cmd::Worker => {
            return match ether_loadtest::workers::worker_main() {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("worker: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::WireServer { listen_client, listen_api, pin, heartbeat_s } => {
            return match ether_loadtest::wire_limit::server_main(listen_client, listen_api, pin, heartbeat_s) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("wire-server: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Idle { common, rate, hold } => options(Scenario::Idle, common).map(|mut o| {
            o.connect_rate = rate;
            o.hold = hold;
            o
        }),
        Cmd::Unicast { common, push } => options(Scenario::Unicast, common).map(|mut o| {
            push_options(&mut o, push);
            o
        }),
        Cmd::Batch { common, push, batch_size } => options(Scenario::Batch, common).map(|mut o| {
            push_options(&mut o, push);
            o.batch_size = batch_size.max(1);
            o
        }),
    };
    let opts = match opts {
        Ok(o) => o,
        Err(e) => {
            eprintln!("ether-loadtest: {e}");
            return ExitCode::from(2);
        }
    };
    match scenario::run(&opts) {
        Ok(out) => {
            if let Some(d) = &out.result_dir {
                eprintln!("recorded in {}", d.display());
            }
            let problems = out.problems();
            println!(
                "{}",
                serde_json::to_string(&serde_json::json!({
                    "scenario": opts.scenario.name(),
                    "passed": problems.is_empty(),
                    "problems": problems,
                    "result_dir": out.result_dir,
                    "runs": out.runs.iter().map(|r| serde_json::json!({
                        "target": r.target,
                        "connected": r.connections.connected,
                        "failed": r.connections.failed,
                        "handshakes_per_s": r.connections.handshakes_per_s,
                        "dropped": r.connections.dropped,
                        "heartbeats_sent": r.connections.heartbeats_sent,
                        "messages": r.messages,
                        "saturation": r.saturation,
                    })).collect::<Vec<_>>(),
                    "ratios": out.ratios,
                }))
                .unwrap_or_default()
            );
            if problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                eprintln!("ether-loadtest: FAILED");
                for p in &problems {
                    eprintln!("  {p}");
                }
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("ether-loadtest: {e}");
            ExitCode::from(2)
        }
    }
}
