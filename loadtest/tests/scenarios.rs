//! Runs the scenarios at tiny scale so the tool cannot rot: against the in-tool wire-limit
//! server (no engine needed), through worker processes, against an "existing node" given by
//! address, and every scenario (idle, unicast, batch, group hot and sparse, chat, reconnect,
//! and a `--wire-limit` twin run) for a couple of seconds against `ether serve` spawned from
//! the same build (`target/<profile>/ether`, next to this crate's binary; built with
//! `cargo build -p ether-engine --bin ether` first when it is missing). No timing
//! assertions: counts only (everyone connected, nothing lost, no duplicates).
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_ether-loadtest");

fn run(args: &[&str], results: &Path) -> Value {
    let out = Command::new(BIN)
        .args(args)
        .args(["--plain", "--results-dir"])
        .arg(results)
        .output()
        .expect("run ether-loadtest");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ether-loadtest {args:?} failed ({}):\n{stderr}\n{stdout}", out.status);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("bad summary {last:?}: {e}\n{stderr}"))
}

fn assert_all_connected(v: &Value, n: u64) {
    assert_eq!(v["passed"], true, "{v}");
    for r in v["runs"].as_array().unwrap() {
        assert_eq!(r["connected"], n, "{r}");
        assert_eq!(r["failed"], 0, "{r}");
        assert_eq!(r["dropped"], 0, "{r}");
    }
}

/// What a paced run sends: its plan (rate × duration), less what a slow or busy machine left
/// behind schedule when the duration ran out (the tool says so in `saturation`). At least half
/// the plan, so a tool that stopped sending still fails.
fn assert_sent_about(m: &Value, planned: u64, r: &Value) -> u64 {
    let sent = m["sent"].as_u64().unwrap_or(0);
    assert!(sent <= planned && sent >= planned / 2, "sent {sent} of {planned} planned: {r}");
    sent
}

fn assert_no_loss(v: &Value, planned: u64) {
    for r in v["runs"].as_array().unwrap() {
        let m = &r["messages"];
        let sent = assert_sent_about(m, planned, r);
        assert_eq!(m["acked"], sent, "{r}");
        assert_eq!(m["received"], sent, "{r}");
        assert_eq!(m["lost"], 0, "{r}");
        assert_eq!(m["misrouted"], 0, "{r}");
        assert_eq!(m["failed"], 0, "{r}");
    }
}

fn assert_recorded(v: &Value, results: &Path, scenario: &str) {
    let dir = Path::new(v["result_dir"].as_str().expect("result_dir"));
    for f in ["result.json", "summary.md", "latency.svg", "throughput.svg"] {
        assert!(dir.join(f).is_file(), "{} missing", f);
    }
    let r: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("result.json")).unwrap()).unwrap();
    assert_eq!(r["scenario"], scenario);
    assert!(r["command"].as_array().is_some_and(|c| !c.is_empty()));
    assert!(r["machine"]["cores"].as_u64().unwrap() >= 1);
    let svg = std::fs::read_to_string(dir.join("throughput.svg")).unwrap();
    assert!(svg.starts_with("<svg"));
    let readme = std::fs::read_to_string(results.join("README.md")).unwrap();
    assert!(readme.contains(&format!("| {scenario} |")), "no {scenario} row in\n{readme}");
}

#[test]
fn idle_against_wire_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let v = run(&["idle", "--wire-only", "--connections", "200", "--rate", "2000", "--hold", "1s"], tmp.path());
    assert_all_connected(&v, 200);
    assert_recorded(&v, tmp.path(), "idle");
}

#[test]
fn idle_through_worker_processes_and_source_addresses() {
    let tmp = tempfile::tempdir().unwrap();
    // 3 worker processes (and 3 wire-limit processes on the same port), 3 source addresses.
    let v = run(
        &[
            "idle",
            "--wire-only",
            "--connections",
            "90",
            "--per-process-max",
            "30",
            "--source-ips",
            "3",
            "--threads",
            "2",
            "--hold",
            "1s",
        ],
        tmp.path(),
    );
    assert_all_connected(&v, 90);
}

#[test]
fn unicast_and_batch_against_wire_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let v = run(&["unicast", "--wire-only", "--connections", "100", "--rate", "1000", "--duration", "2s"], tmp.path());
    assert_all_connected(&v, 100);
    assert_no_loss(&v, 2000);
    assert_recorded(&v, tmp.path(), "unicast");
    let v = run(
        &["batch", "--wire-only", "--connections", "100", "--rate", "1000", "--duration", "2s", "--batch-size", "25"],
        tmp.path(),
    );
    assert_all_connected(&v, 100);
    assert_no_loss(&v, 2000);
    assert_recorded(&v, tmp.path(), "batch");
}

/// `--repeat 3`: three runs, the record shows the median by the scenario's figure (here the
/// delivery rate, more is better) and lists all three; every run is checked for losses.
#[test]
fn repeats_record_the_median_run_and_list_them_all() {
    let tmp = tempfile::tempdir().unwrap();
    let v = run(
        &["chat", "--wire-only", "--connections", "40", "--rate", "400", "--duration", "1s", "--repeat", "3"],
        tmp.path(),
    );
    assert_all_connected(&v, 40);
    let repeats = v["repeats"].as_array().unwrap();
    assert_eq!(repeats.len(), 3, "{v}");
    assert_eq!(repeats.iter().filter(|r| r["chosen"] == true).count(), 1, "{v}");
    assert!(repeats.iter().all(|r| r["metric"] == "delivered_per_s" && r["passed"] == true), "{v}");
    let mut values: Vec<f64> = repeats.iter().map(|r| r["engine"].as_f64().unwrap()).collect();
    let chosen = repeats.iter().find(|r| r["chosen"] == true).unwrap()["engine"].as_f64().unwrap();
    values.sort_by(f64::total_cmp);
    assert_eq!(chosen, values[1], "the median: {v}");
    // The runs shown are the chosen repeat's.
    let shown = v["runs"].as_array().unwrap().last().unwrap()["messages"]["delivered_per_s"].as_f64().unwrap();
    assert_eq!(shown, chosen, "{v}");
    assert_recorded(&v, tmp.path(), "chat");
    let dir = Path::new(v["result_dir"].as_str().unwrap());
    let r: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("result.json")).unwrap()).unwrap();
    assert_eq!(r["repeats"].as_array().unwrap().len(), 3);
    let summary = std::fs::read_to_string(dir.join("summary.md")).unwrap();
    assert!(summary.contains("the median by `delivered_per_s`"), "{summary}");
    let readme = std::fs::read_to_string(tmp.path().join("README.md")).unwrap();
    assert!(readme.contains("(median of 3 runs)"), "{readme}");
}

/// A wire-limit server started by hand plays an "existing node": exercises --client/--api,
/// the --wire-limit twin run and its ratios, and unicast through worker processes.
/// Starts the tool's wire-limit server (`heartbeat_s` asked of its terminals): the process,
/// killed on drop, and the addresses it printed.
fn wire_server(heartbeat_s: u32) -> (Server, Value) {
    let mut child = Command::new(BIN)
        .args(["wire-server", "--heartbeat-s", &heartbeat_s.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let server = Server(child);
    (server, serde_json::from_str(&line).unwrap())
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn unicast_against_an_existing_node_with_workers_and_wire_limit() {
    let (server, addrs) = wire_server(1);
    let pid = server.0.id().to_string();
    let tmp = tempfile::tempdir().unwrap();
    let v = run(
        &[
            "unicast",
            "--client",
            addrs["client"].as_str().unwrap(),
            "--api",
            addrs["api"].as_str().unwrap(),
            "--jwt-secret",
            "anything",
            "--api-key",
            "anything",
            "--server-pid",
            &pid,
            "--wire-limit",
            "--connections",
            "60",
            "--per-process-max",
            "60",
            "--rate",
            "600",
            "--duration",
            "1s",
        ],
        tmp.path(),
    );
    assert_all_connected(&v, 60);
    assert_no_loss(&v, 600);
    // Heartbeats (every second, as the welcome asked) went out beside the messages.
    assert!(v["runs"][1]["heartbeats_sent"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["runs"][1]["dropped"], 0);
    assert_eq!(v["runs"].as_array().unwrap().len(), 2);
    assert!(v["ratios"]["delivered_per_s"].as_f64().unwrap() > 0.0);
    // Workers: the existing node may take more terminals than the wire-limit server's
    // one-process limit, so only that part runs without --wire-limit.
    let v = run(
        &[
            "unicast",
            "--client",
            addrs["client"].as_str().unwrap(),
            "--api",
            addrs["api"].as_str().unwrap(),
            "--jwt-secret",
            "anything",
            "--connections",
            "60",
            "--per-process-max",
            "25",
            "--rate",
            "600",
            "--duration",
            "1s",
        ],
        tmp.path(),
    );
    assert_all_connected(&v, 60);
    assert_no_loss(&v, 600);
}

/// The `worker` processes among the children of `pid`.
fn worker_children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        for c in children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()) {
            let cmd = std::fs::read(format!("/proc/{c}/cmdline")).unwrap_or_default();
            if cmd.split(|&b| b == 0).any(|a| a == b"worker") && !out.contains(&c) {
                out.push(c);
            }
        }
    }
    out
}

/// A worker process that dies mid-run takes its terminals' accounts with it: the run must fail
/// and say so, not pass on the counters its last progress line carried.
#[test]
fn a_lost_worker_fails_the_run() {
    let (_server, addrs) = wire_server(30);
    let tmp = tempfile::tempdir().unwrap();
    let tool = Command::new(BIN)
        .args(["idle", "--client", addrs["client"].as_str().unwrap(), "--jwt-secret", "anything"])
        .args(["--connections", "60", "--per-process-max", "30", "--hold", "4s", "--plain", "--results-dir"])
        .arg(tmp.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until both workers run and their terminals are connected, then kill one.
    let t0 = std::time::Instant::now();
    let mut workers = Vec::new();
    while workers.len() < 2 && t0.elapsed() < std::time::Duration::from_secs(5) {
        std::thread::sleep(std::time::Duration::from_millis(50));
        workers = worker_children(tool.id());
    }
    assert_eq!(workers.len(), 2, "workers of {}", tool.id());
    std::thread::sleep(std::time::Duration::from_millis(1500));
    // SAFETY: a plain kill(2) of a process this test started (through the tool).
    assert_eq!(unsafe { libc::kill(workers[0] as i32, libc::SIGKILL) }, 0);
    let out = tool.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a run that lost a worker passed:\n{stderr}\n{stdout}");
    let v: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap();
    assert_eq!(v["passed"], false, "{v}");
    assert!(v["problems"].to_string().contains("worker lost"), "{v}");
    assert_eq!(v["runs"][0]["dropped"], 30, "the lost worker's terminals: {v}");
}

#[test]
fn failed_connections_fail_loudly() {
    // Nothing listens on this port: every terminal fails, the run exits non-zero and says why.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    drop(l);
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args([
            "idle",
            "--client",
            &addr,
            "--jwt-secret",
            "s",
            "--connections",
            "20",
            "--hold",
            "0s",
            "--plain",
            "--connect-timeout",
            "2s",
            "--results-dir",
        ])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("20 of 20 terminals failed to connect") && stderr.contains("refused"), "{stderr}");
}

/// `ether` from the same build as this test: `target/<profile>/ether` beside
/// `ether-loadtest`. Built once (`cargo build -p ether-engine --bin ether`, same target dir
/// and profile) when missing: test binaries may run before the engine's binary is built.
fn ether_bin() -> &'static PathBuf {
    static BIN_PATH: OnceLock<PathBuf> = OnceLock::new();
    BIN_PATH.get_or_init(|| {
        let me = Path::new(BIN);
        let profile_dir = me.parent().expect("binary directory");
        let ether = profile_dir.join(format!("ether{}", std::env::consts::EXE_SUFFIX));
        if ether.is_file() {
            return ether;
        }
        let target_dir = profile_dir.parent().expect("target directory");
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(workspace)
            .args(["build", "-p", "ether-engine", "--bin", "ether", "--target-dir"])
            .arg(target_dir);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        eprintln!("{} is missing: building it ({cmd:?})", ether.display());
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "cargo build -p ether-engine --bin ether failed");
        assert!(ether.is_file(), "{} still missing after the build", ether.display());
        ether
    })
}

/// Runs a scenario against a freshly spawned `ether serve --shards 2`.
fn run_engine(args: &[&str], results: &Path) -> Value {
    let bin = ether_bin().to_str().expect("utf-8 path").to_owned();
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--spawn", "--shards", "2", "--ether-bin", &bin]);
    run(&all, results)
}

fn assert_no_duplicates(v: &Value) {
    for r in v["runs"].as_array().unwrap() {
        let m = &r["messages"];
        assert_eq!(m["duplicates"], 0, "{r}");
        assert_eq!(m["reordered"], 0, "{r}");
    }
}

#[test]
fn idle_unicast_and_batch_against_the_engine() {
    let tmp = tempfile::tempdir().unwrap();
    let v = run_engine(&["idle", "--connections", "200", "--hold", "1s"], tmp.path());
    assert_all_connected(&v, 200);
    assert_eq!(v["runs"][0]["target"], "engine");
    // The idle targets are checked (met or not is the machine's business, not this test's),
    // and the per-connection memory at the end of the hold is recorded.
    let checked: Vec<&str> = v["targets"].as_array().unwrap().iter().filter_map(|t| t["what"].as_str()).collect();
    assert_eq!(checked, ["handshakes/s", "server RSS per idle connection (end of hold)"], "{v}");
    let dir = Path::new(v["result_dir"].as_str().expect("result_dir"));
    let r: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("result.json")).unwrap()).unwrap();
    assert!(r["runs"][0]["memory"]["server_rss_idle_per_conn"].is_number(), "{}", r["runs"][0]["memory"]);
    let v = run_engine(&["unicast", "--connections", "100", "--rate", "500", "--duration", "2s"], tmp.path());
    assert_all_connected(&v, 100);
    assert_no_loss(&v, 1000);
    assert_no_duplicates(&v);
    // The spawned node's own counters were read: every delivery went out in some write.
    let fpw = v["runs"][0]["frames_per_write"].as_f64().expect("frames per write of the spawned node");
    assert!(fpw >= 1.0, "{fpw}");
    let v = run_engine(
        &["batch", "--connections", "100", "--rate", "500", "--duration", "2s", "--batch-size", "20"],
        tmp.path(),
    );
    assert_all_connected(&v, 100);
    assert_no_loss(&v, 1000);
    assert_no_duplicates(&v);
}

/// Every member got every accepted message once, in group seq order.
fn assert_group_complete(v: &Value, members: u64) {
    for r in v["runs"].as_array().unwrap() {
        let m = &r["messages"];
        let acked = m["acked"].as_u64().unwrap();
        assert!(acked > 0, "{r}");
        assert_eq!(m["sent"], acked, "{r}");
        assert_eq!(m["failed"], 0, "{r}");
        assert_eq!(m["received"].as_u64().unwrap(), acked * members, "{r}");
        assert_eq!(m["lost"], 0, "{r}");
        assert_eq!(m["misrouted"], 0, "{r}");
        assert_eq!(m["group"]["expected_deliveries"].as_u64().unwrap(), acked * members, "{r}");
        assert_eq!(m["group"]["messages_incomplete"], 0, "{r}");
        assert_eq!(m["group"]["last_member"]["count"].as_u64().unwrap(), acked, "{r}");
    }
    assert_no_duplicates(v);
}

#[test]
fn group_sparse_against_the_engine_and_the_wire_limit() {
    let tmp = tempfile::tempdir().unwrap();
    // Two groups of 40 spread over both shards, 10 messages a second each, and the same
    // pattern against the wire-limit server first (the ratios).
    let v = run_engine(
        &[
            "group",
            "--groups",
            "2",
            "--members",
            "40",
            "--mode",
            "sparse",
            "--interval",
            "100ms",
            "--duration",
            "2s",
            "--wire-limit",
        ],
        tmp.path(),
    );
    assert_all_connected(&v, 80);
    assert_eq!(v["runs"].as_array().unwrap().len(), 2);
    assert_eq!(v["runs"][0]["target"], "wire-limit");
    assert_eq!(v["runs"][1]["target"], "engine");
    assert_group_complete(&v, 40);
    assert!(v["ratios"]["delivered_per_s"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["targets"].as_array().is_some_and(|t| !t.is_empty()), "{v}");
    assert_recorded(&v, tmp.path(), "group");
}

#[test]
fn group_hot_against_the_engine() {
    let tmp = tempfile::tempdir().unwrap();
    let v = run_engine(&["group", "--members", "50", "--mode", "hot", "--window", "8", "--duration", "2s"], tmp.path());
    assert_all_connected(&v, 50);
    assert_group_complete(&v, 50);
}

#[test]
fn chat_against_the_engine_and_the_wire_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let v = run_engine(
        &["chat", "--connections", "60", "--rate", "600", "--window", "2", "--duration", "2s", "--wire-limit"],
        tmp.path(),
    );
    assert_all_connected(&v, 60);
    assert_eq!(v["runs"].as_array().unwrap().len(), 2);
    for r in v["runs"].as_array().unwrap() {
        let m = &r["messages"];
        let sent = m["sent"].as_u64().unwrap();
        assert!(sent > 0, "{r}");
        // Every send answered by `sent`, every accepted message received once by its peer.
        assert_eq!(m["acked"], sent, "{r}");
        assert_eq!(m["failed"], 0, "{r}");
        assert_eq!(m["received"], sent, "{r}");
        assert_eq!(m["lost"], 0, "{r}");
        assert_eq!(m["misrouted"], 0, "{r}");
        assert_eq!(m["chat"]["unanswered"], 0, "{r}");
        // The sender's own copy comes back on its inbox; reads bring receipts to the peer.
        assert_eq!(m["chat"]["echoes"], sent, "{r}");
        assert!(m["chat"]["reads_sent"].as_u64().unwrap() > 0, "{r}");
        // What a delivery cost the server and the tool: main-phase CPU over deliveries.
        let cpu = &r["cpu"];
        let per = cpu["server_us_per_delivery"].as_f64().unwrap();
        let want = cpu["server_cpu_s"].as_f64().unwrap() * 1e6 / sent as f64;
        assert!((per - want).abs() <= want * 1e-9 + 1e-9, "{r}");
        assert!(cpu["tool_us_per_delivery"].as_f64().unwrap() > 0.0, "{r}");
    }
    assert!(v["ratios"]["server_us_per_delivery"].as_f64().unwrap() > 0.0, "{v}");
    assert_no_duplicates(&v);
    assert_recorded(&v, tmp.path(), "chat");
}

/// A small reconnect run: 100 terminals, about half dropped after 1 s and away for 1 s.
const RECONNECT_SMALL: [&str; 17] = [
    "reconnect",
    "--connections",
    "100",
    "--rate",
    "400",
    "--api-conns",
    "16",
    "--pipeline",
    "4",
    "--duration",
    "3s",
    "--drop",
    "0.5",
    "--drop-after",
    "1s",
    "--away",
    "1s",
];

#[test]
fn reconnect_against_the_engine() {
    let tmp = tempfile::tempdir().unwrap();
    let v = run_engine(&RECONNECT_SMALL, tmp.path());
    assert_all_connected(&v, 100);
    let m = &v["runs"][0]["messages"];
    let sent = assert_sent_about(m, 1200, &v);
    assert_eq!(m["acked"], sent, "{v}");
    assert_eq!(m["lost"], 0, "{v}");
    let x = &m["reconnect"];
    let to_drop = x["to_drop"].as_u64().unwrap();
    assert!(to_drop > 30 && to_drop < 70, "{x}");
    assert_eq!(x["dropped"], to_drop, "{x}");
    assert_eq!(x["reconnected"], to_drop, "{x}");
    assert_eq!(x["synced"], to_drop, "{x}");
    assert_eq!(x["reconnect_failed"], 0, "{x}");
    // Every id the API accepted arrived (duplicates are allowed: delivery is at least once,
    // terminals dedupe by id), and nothing else did.
    assert_eq!(x["ids_accepted"], sent, "{x}");
    assert_eq!(x["ids_received"], sent, "{x}");
    assert_eq!(x["ids_missing"], 0, "{x}");
    assert_eq!(x["ids_unexpected"], 0, "{x}");
    assert_recorded(&v, tmp.path(), "reconnect");
}

#[test]
fn reconnect_refuses_the_wire_limit_server() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["reconnect", "--wire-only", "--connections", "10", "--plain", "--results-dir"])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("stores nothing"));
}

/// `--spawn --cluster 2`: a private redis-server and two nodes; terminals and API connections
/// go round both, and every message reaches its terminal once, whichever node took it.
#[test]
fn unicast_against_a_two_node_cluster() {
    if std::process::Command::new("redis-server").arg("--version").output().is_err() {
        println!("skipped: redis-server not installed");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let bin = ether_bin().to_str().expect("utf-8 path").to_owned();
    let args = [
        "unicast",
        "--connections",
        "100",
        "--rate",
        "300",
        "--duration",
        "2s",
        "--api-conns",
        "4",
        "--spawn",
        "--cluster",
        "2",
        "--shards",
        "1",
        "--ether-bin",
        &bin,
    ];
    // Plain, then with the terminals over TLS (each node with its own TLS listener).
    for tls in [false, true] {
        let args: Vec<&str> = if tls { [&args[..], &["--tls"]].concat() } else { args.to_vec() };
        let v = run(&args, tmp.path());
        assert_all_connected(&v, 100);
        let m = &v["runs"][0]["messages"];
        let sent = m["sent"].as_u64().unwrap();
        assert!(sent > 0, "{v}");
        assert_eq!(m["acked"], sent, "{v}");
        assert_eq!(m["received"], sent, "{v}");
        assert_eq!(m["lost"], 0, "{v}");
        assert_eq!(m["misrouted"], 0, "{v}");
        assert_no_duplicates(&v);
    }
}

/// `--tls`: the spawned node gets a TLS listener and the terminals connect over `wss://`;
/// connecting, pushes, acks and abrupt reconnects behave as over `ws://`, and the wire-limit
/// twin is refused.
#[test]
fn idle_and_unicast_over_tls() {
    let tmp = tempfile::tempdir().unwrap();
    let v = run_engine(&["idle", "--tls", "--connections", "100", "--hold", "1s"], tmp.path());
    assert_all_connected(&v, 100);
    let v = run_engine(&["unicast", "--tls", "--connections", "100", "--rate", "500", "--duration", "2s"], tmp.path());
    assert_all_connected(&v, 100);
    assert_no_loss(&v, 1000);
    assert_no_duplicates(&v);
    // Terminals dropped abruptly (RST through the TLS relay) come back over TLS and catch up.
    let v = run_engine(&[&RECONNECT_SMALL[..], &["--tls"]].concat(), tmp.path());
    let x = &v["runs"][0]["messages"]["reconnect"];
    let to_drop = x["to_drop"].as_u64().unwrap();
    assert!(to_drop > 0, "{x}");
    assert_eq!((x["reconnected"].as_u64(), x["synced"].as_u64()), (Some(to_drop), Some(to_drop)), "{x}");
    assert_eq!(x["ids_missing"], 0, "{x}");
    assert_eq!(x["ids_received"], x["ids_accepted"], "{x}");
    let out = Command::new(BIN)
        .args(["idle", "--tls", "--spawn", "--wire-limit", "--connections", "10", "--plain", "--results-dir"])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("speaks no TLS"), "{}", String::from_utf8_lossy(&out.stderr));
}
