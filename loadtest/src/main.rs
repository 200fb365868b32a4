//! `ether-loadtest`: the command line. Everything else is in the library (see its docs).
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use ether_loadtest::live;
use ether_loadtest::parse_duration;
use ether_loadtest::scenario::{self, GroupMode, Options, Scenario, TargetSpec};
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
    /// Group fan-out: --groups groups of --members online members each (terminals = groups x
    /// members; --connections is ignored), messages published through
    /// `POST /v1/groups/{gid}/messages`, counted at every member by group seq. `--mode hot`
    /// publishes as fast as the members take them (--window undelivered messages per group),
    /// `--mode sparse` one message per group every --interval (publish-to-last-member latency
    /// per message).
    Group {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 1)]
        groups: u64,
        /// Online members per group.
        #[arg(long, default_value_t = 1000)]
        members: u64,
        #[arg(long, value_enum, default_value_t = ModeArg::Sparse)]
        mode: ModeArg,
        /// `sparse`: one message per group this often.
        #[arg(long, default_value = "200ms", value_parser = parse_duration)]
        interval: Duration,
        /// `hot`: messages per group published but not yet delivered to every member.
        #[arg(long, default_value_t = 64)]
        window: u64,
        /// Members ack their group cumulatively at most this often.
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        group_ack: Duration,
        /// How long to publish.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        duration: Duration,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Terminals chat with each other: each sends `send` frames to random peers (at most
    /// --window unanswered), acks what it receives and `read`s every --read-every messages;
    /// counts messages end to end (answered by `sent`, received by the peer).
    Chat {
        #[command(flatten)]
        common: Common,
        /// Messages per second over all terminals (0 = every terminal keeps its window full).
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        /// Unanswered sends per terminal.
        #[arg(long, default_value_t = 4)]
        window: u32,
        /// A `read` after this many messages from peers (0 = never).
        #[arg(long, default_value_t = 10)]
        read_every: u32,
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        duration: Duration,
        #[arg(long, default_value_t = 10_000.0)]
        connect_rate: f64,
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        drain_timeout: Duration,
    },
    /// API pushes to every terminal while a share (--drop) is dropped abruptly, kept away
    /// (--away) and ordered back; they `sync` from their last acked seq. Measures the time
    /// until all are back and synced and checks every accepted message id arrived.
    Reconnect {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        push: Push,
        /// Share of the terminals dropped.
        #[arg(long = "drop", default_value_t = 0.5)]
        drop_share: f64,
        /// When to drop, after the sending starts.
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        drop_after: Duration,
        /// How long the dropped terminals stay away (messages keep coming for them).
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        away: Duration,
        /// Longest wait for the dropped terminals to be back and synced.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        reconnect_timeout: Duration,
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
    /// With --spawn: a cluster of this many nodes joined through a private redis-server
    /// (terminals and API connections go round the nodes).
    #[arg(long, default_value_t = 0, requires = "spawn")]
    cluster: usize,
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
    /// Terminals connect over TLS: with --spawn the node gets a TLS listener (a bundled
    /// self-signed certificate for localhost); with --node-data, its `client_tls` listener;
    /// with --client, that address is a `wss://` listener. Not with --wire-limit.
    #[arg(long)]
    tls: bool,
    /// With --tls and an existing node: PEM certificate(s) to trust (its own or its CA).
    #[arg(long, requires = "tls")]
    tls_ca: Option<PathBuf>,
    /// With --tls: the name the node's certificate is for.
    #[arg(long, default_value = "localhost", requires = "tls")]
    tls_name: String,
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
    /// Names the record `<date>-<scenario>-<label>` (and its own row in the README table).
    #[arg(long)]
    label: Option<String>,
    /// Run the pattern this many times (each time the wire-limit twin first, if asked, then
    /// the target: interleaved pairs): the record shows the median run by the scenario's
    /// figure (rate, or the p99 a paced or sparse run is about) and lists every repeat. A
    /// loss in any repeat fails the run.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    repeat: u32,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ModeArg {
    Hot,
    Sparse,
}

/// The API driver of `group`.
#[derive(Args)]
struct ApiArgs {
    #[arg(long, default_value_t = 10_000.0)]
    connect_rate: f64,
    /// Keep-alive API connections.
    #[arg(long, default_value_t = 4)]
    api_conns: usize,
    /// Unanswered requests allowed per API connection.
    #[arg(long, default_value_t = 16)]
    pipeline: usize,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    drain_timeout: Duration,
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
    let tls = match (c.tls, &c.tls_ca) {
        (false, _) => None,
        (true, _) if c.spawn => None,
        (true, Some(ca)) => {
            let ca_pem = std::fs::read_to_string(ca).map_err(|e| format!("--tls-ca {}: {e}", ca.display()))?;
            Some(ether_loadtest::tls::TlsSpec { ca_pem, server_name: c.tls_name.clone() })
        }
        (true, None) => return Err("--tls against an existing node needs --tls-ca FILE (the PEM to trust)".into()),
    };
    let target = if c.wire_only {
        TargetSpec::Wire
    } else if c.spawn {
        TargetSpec::Spawn(SpawnOptions {
            ether_bin: c.ether_bin,
            shards: c.shards,
            extra_args: c.serve_args,
            keep_data: c.keep_data,
            start_timeout: Duration::from_secs(30),
            cluster: c.cluster,
            tls: c.tls,
        })
    } else if let Some(dir) = c.node_data {
        TargetSpec::DataDir { dir, server_pid: c.server_pid, tls }
    } else if let Some(client) = c.client {
        TargetSpec::External {
            client,
            api: c.api,
            jwt_secret: c.jwt_secret.ok_or("--client needs --jwt-secret (or ETHER_AUTH_JWT_SECRET)")?,
            api_key: c.api_key.unwrap_or_default(),
            server_pid: c.server_pid,
            tls,
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
    o.label = c.label;
    o.repeat = c.repeat;
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
        Cmd::Group { common, groups, members, mode, interval, window, group_ack, duration, api } => {
            options(Scenario::Group, common).map(|mut o| {
                let mode = match mode {
                    ModeArg::Hot => GroupMode::Hot,
                    ModeArg::Sparse => GroupMode::Sparse,
                };
                o.set_groups(groups, members, mode, interval);
                o.window = window.max(1);
                o.group_ack = group_ack;
                o.duration = duration;
                o.connect_rate = api.connect_rate;
                o.api_conns = api.api_conns;
                o.pipeline = api.pipeline;
                o.drain_timeout = api.drain_timeout;
                o
            })
        }
        Cmd::Chat { common, rate, window, read_every, duration, connect_rate, drain_timeout } => {
            options(Scenario::Chat, common).map(|mut o| {
                o.msg_rate = rate.max(0.0);
                o.chat_window = window.max(1);
                o.read_every = read_every;
                o.duration = duration;
                o.connect_rate = connect_rate;
                o.drain_timeout = drain_timeout;
                o
            })
        }
        Cmd::Reconnect { common, push, drop_share, drop_after, away, reconnect_timeout } => {
            options(Scenario::Reconnect, common).and_then(|mut o| {
                if !(0.0..=1.0).contains(&drop_share) {
                    return Err(format!("--drop {drop_share}: a share between 0 and 1"));
                }
                push_options(&mut o, push);
                o.drop_share = drop_share;
                o.drop_after = drop_after;
                o.away = away;
                o.reconnect_timeout = reconnect_timeout;
                Ok(o)
            })
        }
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
                        "cpu": r.cpu,
                        "frames_per_write": r.frames_per_write,
                        "tool_unread_per_socket": r.tool_unread_per_socket,
                        "tool_timer_late_ms_max": r.tool_timer_late_ms_max,
                        "saturation": r.saturation,
                    })).collect::<Vec<_>>(),
                    "ratios": out.ratios,
                    "targets": out.targets,
                    "repeats": out.repeats,
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
