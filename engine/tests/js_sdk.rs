//! The JavaScript terminal SDK (`sdk/js/ether-im.mjs`) against a real node, run by Node.js:
//! `sdk/js/test/scenario.mjs` connects two terminals, sends, reads, goes offline while the
//! business pushes (this test, through the REST API, when the script says so), comes back and
//! catches up, and checks errors and `cid` idempotency; `sync_race.mjs` has a live message
//! overtake a paged `sync`; `positions.mjs` plays a scripted node (purged seqs, live gaps).
//! Each script prints one JSON verdict.
//!
//! Needs `node` (20 with `--experimental-websocket`, or newer). Without it the test prints
//! "skipped: node not installed" and passes.
mod support;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::js::node_with_websocket;
use support::*;

#[test]
fn the_js_sdk_sends_receives_and_catches_up_after_being_away() {
    let Some(node_bin) = node_with_websocket() else {
        println!("skipped: node not installed (or without WebSocket)");
        return;
    };
    let node = TestNode::start();
    run_scenario(node_bin, &node, node.ws_url(), &[]);
}

/// The same scenario over `wss://` (the node's `listen.client_tls`), trusting the node's
/// self-signed certificate through `NODE_EXTRA_CA_CERTS` as a browser would trust a real one.
#[test]
fn the_js_sdk_works_over_tls() {
    let Some(node_bin) = node_with_websocket() else {
        println!("skipped: node not installed (or without WebSocket)");
        return;
    };
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let node = TestNode::with(|c| {
        c.listen.client_tls = Some("127.0.0.1:0".parse().unwrap());
        c.tls = Some(ether_engine::config::Tls {
            cert_path: fixtures.join("tls-cert.pem"),
            key_path: fixtures.join("tls-key.pem"),
            reload_check: Duration::ZERO,
        });
    });
    let url = format!("wss://localhost:{}", node.ports.client_tls.expect("TLS listener").port());
    let ca = fixtures.join("tls-cert.pem").to_string_lossy().into_owned();
    run_scenario(node_bin, &node, url, &[("NODE_EXTRA_CA_CERTS", ca)]);
}

/// A live message that arrives while a `sync` is being paged must neither move the sync past
/// the pages still to come nor be acknowledged before everything under it is there (the SDK
/// once synced on from the live seq, losing the rest of the backlog, and acked it).
/// `sdk/js/test/sync_race.mjs` holds bob's first `synced` back while the test pushes one live
/// message to his inbox and one to his group, then checks every stored message arrived once
/// and no ack covered a missing seq; here, the positions the node saved are the heads.
#[test]
fn the_js_sdk_syncs_every_page_when_a_live_message_overtakes_the_sync() {
    let Some(node_bin) = node_with_websocket() else {
        println!("skipped: node not installed (or without WebSocket)");
        return;
    };
    const INBOX_N: u64 = 12;
    const GROUP_N: u64 = 7;
    let node = TestNode::with(|c| c.limits.sync_page_max = 5);
    let gw = node.gateway();
    gw.create_group(Some("club"), "Club", "max", &["bob"]).expect("create the group");
    let group_post = |i: u64| {
        let body = serde_json::json!({ "text": format!("c{i}") });
        gw.send_group_message("club", "max", ether_proto::Kind::Text, &body, None).expect("group send");
    };
    for i in 0..INBOX_N {
        gw.send_message(&text("dan", "bob", &format!("m{i}"))).expect("API send");
    }
    for i in 0..GROUP_N {
        group_post(i);
    }

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk/js/test/sync_race.mjs");
    let mut child = Command::new(node_bin)
        .arg("--experimental-websocket")
        .arg("--no-warnings")
        .arg(&script)
        .env("ETHER_WS", node.ws_url())
        .env("TOKEN_BOB", node.token("bob"))
        .env("INBOX_N", INBOX_N.to_string())
        .env("GROUP_N", GROUP_N.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node runs");
    let mut stdin = child.stdin.take().expect("stdin");
    let stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut verdict = None;
    for line in stdout.lines() {
        let line = line.expect("read the script's output");
        if line == "PAGE" {
            // Bob has the first page of his backlog; its `synced` is held: live messages now.
            gw.send_message(&text("dan", "bob", "live")).expect("API send");
            group_post(GROUP_N);
            writeln!(stdin, "PUSHED").expect("tell the script");
        } else if line.starts_with('{') {
            verdict = Some(line);
        }
    }
    let (v, status, stderr) = script_verdict(&mut child, verdict);
    assert_eq!(v["ok"], true, "the JS SDK sync race failed: {v:#}\nstderr:\n{stderr}");
    assert!(status.is_some_and(|s| s.success()), "{status:?}");

    // What the node keeps as delivered to bob's device: everything, and not one seq more.
    let want = ether_proto::frame::Positions {
        inbox_seq: INBOX_N + 1,
        groups: [("club".to_owned(), GROUP_N + 1)].into_iter().collect(),
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (mut t, w) =
            ether_sdk::TerminalClient::connect(&node.ws_url(), &node.token("bob"), "web", "web").expect("connects");
        let _ = t.close();
        if w.delivered.as_ref() == Some(&want) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "delivered positions {:?}, want {want:?}", w.delivered);
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The JS SDK's positions against a scripted node (`sdk/js/test/positions.mjs`, a fake
/// WebSocket): sync pages that skip purged seqs move the positions past them, and a gap among
/// live messages is not acked over but fetched by a `sync`.
#[test]
fn the_js_sdk_skips_purged_seqs_and_fetches_gaps_without_acking_over_them() {
    support::js::assert_script_passes("positions.mjs", &[]);
}

/// Waits for a script (at most 40 s) and parses the JSON verdict line it printed: the verdict,
/// its exit status and what it wrote to stderr.
fn script_verdict(
    child: &mut std::process::Child,
    verdict: Option<String>,
) -> (serde_json::Value, Option<std::process::ExitStatus>, String) {
    let status = child.wait_timeout_or_kill(Duration::from_secs(40));
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
    }
    let verdict = verdict.unwrap_or_else(|| panic!("no verdict from the script ({status:?}); stderr:\n{stderr}"));
    (serde_json::from_str(&verdict).expect("JSON verdict"), status, stderr)
}

/// Runs `sdk/js/test/scenario.mjs` against `node` at `ws_url`, pushing through the API when
/// the script says so, and checks its verdict.
fn run_scenario(node_bin: &str, node: &TestNode, ws_url: String, env: &[(&str, String)]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk/js/test/scenario.mjs");
    let mut child = Command::new(node_bin)
        .arg("--experimental-websocket")
        .arg("--no-warnings")
        .arg(&script)
        .env("ETHER_WS", ws_url)
        .env("TOKEN_ANN", node.token("ann"))
        .env("TOKEN_BOB", node.token("bob"))
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node runs");
    let mut stdin = child.stdin.take().expect("stdin");
    let stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut verdict = None;
    for line in stdout.lines() {
        let line = line.expect("read the script's output");
        if line == "SUSPENDED" {
            // Bob is away: the business pushes ten messages to him.
            let gw = node.gateway();
            for i in 0..10 {
                gw.send_message(&text("max", "bob", &format!("api{i}"))).expect("API send");
            }
            writeln!(stdin, "PUSHED").expect("tell the script");
        } else if line == "GROUP" {
            // Bob is away: a group "club" (as if created again after an older one of that id)
            // with bob in it gets three messages.
            let gw = node.gateway();
            gw.create_group(Some("club"), "Club", "max", &["bob"]).expect("create the group");
            for i in 0..3 {
                let body = serde_json::json!({ "text": format!("c{i}") });
                gw.send_group_message("club", "max", ether_proto::Kind::Text, &body, None).expect("group send");
            }
            writeln!(stdin, "GROUPED").expect("tell the script");
        } else if line.starts_with('{') {
            verdict = Some(line);
        }
    }
    let (v, status, stderr) = script_verdict(&mut child, verdict);
    assert_eq!(v["ok"], true, "the JS SDK scenario failed: {v:#}\nstderr:\n{stderr}");
    assert_eq!(v["facts"]["bob_received"], 39, "20 + 15 after coming back + 1 idempotent send + 3 of the club: {v}");
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}

/// `Child::wait` with a deadline (the script has its own 30 s timeout; this is the backstop).
trait WaitTimeout {
    fn wait_timeout_or_kill(&mut self, limit: Duration) -> Option<std::process::ExitStatus>;
}

impl WaitTimeout for std::process::Child {
    fn wait_timeout_or_kill(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Ok(Some(s)) = self.try_wait() {
                return Some(s);
            }
            if std::time::Instant::now() > deadline {
                let _ = self.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
