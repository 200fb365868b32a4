//! Runs the scenarios at tiny scale so the tool cannot rot: against the in-tool wire-limit
//! server (no engine needed), through worker processes, and against an "existing node" given
//! by address. No timing assertions: counts only (everyone connected, nothing lost).
//!
//! With `ETHER_LOADTEST_ENGINE=1` the same scenarios also run with `--spawn` against
//! `ether serve` from the same build.
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

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

fn assert_no_loss(v: &Value, msgs: u64) {
    for r in v["runs"].as_array().unwrap() {
        let m = &r["messages"];
        assert_eq!(m["sent"], msgs, "{r}");
        assert_eq!(m["acked"], msgs, "{r}");
        assert_eq!(m["received"], msgs, "{r}");
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

/// A wire-limit server started by hand plays an "existing node": exercises --client/--api,
/// the --wire-limit twin run and its ratios, and unicast through worker processes.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn unicast_against_an_existing_node_with_workers_and_wire_limit() {
    let mut child = Command::new(BIN)
        .args(["wire-server", "--heartbeat-s", "1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let pid = child.id().to_string();
    let _server = Server(child);
    let addrs: Value = serde_json::from_str(&line).unwrap();
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

#[test]
fn against_spawned_engine() {
    if std::env::var("ETHER_LOADTEST_ENGINE").ok().as_deref() != Some("1") {
        eprintln!("skipped: set ETHER_LOADTEST_ENGINE=1 to run the scenarios against `ether serve`");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let v = run(&["idle", "--spawn", "--shards", "2", "--connections", "200", "--hold", "1s"], tmp.path());
    assert_all_connected(&v, 200);
    let v = run(
        &["unicast", "--spawn", "--shards", "2", "--connections", "100", "--rate", "1000", "--duration", "2s"],
        tmp.path(),
    );
    assert_all_connected(&v, 100);
    assert_no_loss(&v, 2000);
}
