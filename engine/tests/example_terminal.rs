//! The runnable example terminal (`sdk/examples/terminal.rs`) against a real node, run as the
//! README runs it: a device that comes back after messages were stored for it must print
//! every one of them once (it `sync`s them page by page, live messages arriving meanwhile),
//! and the node must end up with the device's delivered position at the heads. (The example
//! once acked the first live message over a backlog it never fetched: lost for that device.)
//!
//! The example binary is built by this test (`cargo build -p ether-sdk --example terminal`):
//! Cargo gives tests the path of the workspace's binaries only.
mod support;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ether_proto::frame::Positions;
use ether_sdk::TerminalClient;
use support::*;

/// Builds the example (a no-op when it is up to date) and returns the path of its binary.
fn build_example() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let out = Command::new(env!("CARGO"))
        .args(["build", "-q", "-p", "ether-sdk", "--example", "terminal", "--message-format=json"])
        .arg("--manifest-path")
        .arg(&manifest)
        .stderr(Stdio::inherit())
        .output()
        .expect("cargo runs");
    assert!(out.status.success(), "cargo build of the example failed: {:?}", out.status);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == "terminal")
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .expect("the example's executable in cargo's output")
}

/// What the node says `device` of bob acknowledged (a new terminal's `welcome.delivered`),
/// once it is `want` (positions are saved once per tick); fails after 5 s.
fn wait_delivered(node: &TestNode, device: &str, want: &Positions) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (mut t, w) =
            TerminalClient::connect(&node.ws_url(), &node.token("bob"), device, "desktop").expect("connects");
        let _ = t.close();
        if w.delivered.as_ref() == Some(want) {
            return;
        }
        assert!(Instant::now() < deadline, "delivered positions {:?}, want {want:?}", w.delivered);
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn positions(inbox_seq: u64, club: u64) -> Positions {
    Positions { inbox_seq, groups: [("club".to_owned(), club)].into_iter().collect() }
}

#[test]
fn the_example_terminal_catches_up_on_what_came_while_away_and_acks_only_what_it_has() {
    let exe = build_example();
    // `Config::test_min`: sync pages of 8 messages, so the backlog takes several pages.
    let node = TestNode::start();
    let gw = node.gateway();
    gw.create_group(Some("club"), "Club", "max", &["bob"]).expect("create the group");
    let inbox = |i: u64| {
        gw.send_message(&text("dan", "bob", &format!("m{i}"))).expect("API send");
    };
    let club = |i: u64| {
        let body = serde_json::json!({ "text": format!("c{i}") });
        gw.send_group_message("club", "max", ether_proto::Kind::Text, &body, None).expect("group send");
    };

    // Bob's laptop has (acked) inbox #1..#3 and club #1..#2; then it is away while 15 inbox and
    // 10 club messages are stored.
    (1..=3).for_each(inbox);
    (1..=2).for_each(club);
    {
        let (mut t, _) = TerminalClient::connect(&node.ws_url(), &node.token("bob"), "laptop", "desktop").unwrap();
        t.ack(3).expect("ack");
        t.ack_group("club", 2).expect("ack");
        t.close().expect("close");
    }
    wait_delivered(&node, "laptop", &positions(3, 2));
    (4..=18).for_each(inbox);
    (3..=12).for_each(club);

    let mut child = Command::new(&exe)
        .args(["--url", &node.ws_url(), "--device", "laptop"])
        .env("ETHER_TOKEN", node.token("bob"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the example runs");
    let mut stdin = child.stdin.take().expect("stdin");
    let stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });

    let mut want: Vec<String> = (4..=19).map(|i| format!("[u:dan #{i}] dan: m{i}")).collect();
    want.extend((3..=13).map(|i| format!("[g:club #{i}] max: c{i}")));
    let mut printed = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && !want.iter().all(|w| printed.contains(w)) {
        let Ok(line) = lines.recv_timeout(Duration::from_millis(100)) else { continue };
        if line.starts_with("welcome ") {
            // Connected (and catching up): one live message on each stream now.
            inbox(19);
            club(13);
        }
        printed.push(line);
    }
    // End of input: the example closes the connection and says bye.
    writeln!(stdin).expect("write to the example");
    drop(stdin);
    let exit_by = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break Some(s);
        }
        if Instant::now() > exit_by {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    printed.extend(lines.try_iter());
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
    }
    let all = printed.join("\n");
    println!("{all}");
    assert!(status.is_some_and(|s| s.success()), "{status:?}; output:\n{all}\nstderr:\n{stderr}");
    assert_eq!(printed.last().map(String::as_str), Some("bye"), "output:\n{all}");

    // Every message stored while it was away, and each live one, printed exactly once; none
    // of what it had acked before.
    for w in &want {
        let n = printed.iter().filter(|l| *l == w).count();
        assert_eq!(n, 1, "{w:?} printed {n} times; output:\n{all}\nstderr:\n{stderr}");
    }
    let messages = printed.iter().filter(|l| l.starts_with("[u:") || l.starts_with("[g:")).count();
    assert_eq!(messages, want.len(), "output:\n{all}");
    assert!(!printed.iter().any(|l| l.starts_with("! error")), "output:\n{all}");

    // What the node keeps as delivered to the laptop: everything, up to the heads.
    wait_delivered(&node, "laptop", &positions(19, 13));
}
