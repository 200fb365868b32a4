//! `ether admin ...` through `ether_admin::cli::run` against the admin routes served over a
//! fake view by a real (std) HTTP server: tables, `--json`, the actions reaching the view, and
//! the errors an operator sees for a wrong token or a dead address.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::Ordering;

use common::{serve, FakeView, TOKEN};
use ether_admin::cli::{run, AdminCommand, CliError};
use ether_admin::{ConnQuery, StatsReport};

#[test]
fn stats_table_and_json() {
    let addr = serve(FakeView::new()).to_string();
    let out = run(&addr, TOKEN, AdminCommand::Stats, false).unwrap();
    assert!(out.starts_with("node node-test-1  version 0.1.0  up 1h02m"), "{out}");
    let header = out.lines().find(|l| l.starts_with("SHARD  CONNS")).expect("shard table");
    assert!(header.contains("ACCEPTED") && header.contains("OUT_QUEUED"), "{header}");
    for (shard, conns) in common::SHARD_CONNS.iter().enumerate() {
        let row = out
            .lines()
            .find(|l| l.starts_with(&format!("{shard} ")))
            .unwrap_or_else(|| panic!("row for shard {shard}: {out}"));
        assert!(row.contains(&format!(" {conns} ")), "{row}");
    }
    let total = out.lines().find(|l| l.starts_with("total ")).expect("total row");
    assert!(total.contains(" 1234 "), "{total}");
    assert!(out.contains("ACK_P99") && out.contains("ms"), "latency table: {out}");
    assert!(out.contains("slow_consumer"), "closes by reason: {out}");
    assert!(out.contains("BATCHES"), "storage: {out}");
    assert!(out.contains("POST /v1/messages"), "api: {out}");
    println!("{out}");

    let json = run(&addr, TOKEN, AdminCommand::Stats, true).unwrap();
    let report: StatsReport = serde_json::from_str(&json).expect("--json is the raw JSON");
    assert_eq!(report.totals.connections, 1234);
    assert_eq!(report.stats.shards.len(), 4);
}

#[test]
fn connections_user_kick_drain() {
    let view = FakeView::new();
    let addr = serve(view.clone()).to_string();

    let q = ConnQuery::parse("sort=user&limit=3&closed=2").unwrap();
    let out = run(&addr, TOKEN, AdminCommand::Connections(q), false).unwrap();
    assert!(out.starts_with("live connections 1-3 of 40 (sort user asc)\n"), "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[1].starts_with("SESSION  USER"), "{out}");
    assert!(lines[2].contains("alice") && lines[4].contains("bob"), "{out}");
    assert!(out.contains("recent closes (newest first)"));
    assert!(out.contains("carol") && out.contains("idle"), "{out}");
    println!("{out}");
    let q = view.shared.queries.lock().unwrap().last().cloned().unwrap();
    assert_eq!((q.limit, q.closed), (3, 2), "flags reached the node");

    let json = run(&addr, TOKEN, AdminCommand::Connections(ConnQuery::default()), true).unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["total"], 40);

    let out = run(&addr, TOKEN, AdminCommand::User { uid: "alice".into() }, false).unwrap();
    assert!(out.starts_with("user alice: 2 live connection(s)\n"), "{out}");
    assert!(out.contains("phone") && out.contains("laptop") && out.contains("10.1.0."));
    let out = run(&addr, TOKEN, AdminCommand::User { uid: "ghost".into() }, false).unwrap();
    assert_eq!(out, "user ghost is offline (no live connections)\n");

    let kick = AdminCommand::Kick { uid: "alice".into(), device: Some("phone".into()), reason: None, revoke: false };
    let out = run(&addr, TOKEN, kick, false).unwrap();
    assert_eq!(out, "kicked 1 terminal(s) of user alice, device phone\n");
    assert_eq!(view.shared.kicks.lock().unwrap().last().unwrap().1.as_deref(), Some("phone"));

    let out = run(&addr, TOKEN, AdminCommand::Drain, false).unwrap();
    assert!(out.starts_with("drain started: 1234 terminal(s) told to reconnect"), "{out}");
    let out = run(&addr, TOKEN, AdminCommand::Drain, true).unwrap();
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap()["started"], false);
    assert_eq!(view.shared.drains.load(Ordering::SeqCst), 2);
}

#[test]
fn wrong_or_missing_token() {
    let addr = serve(FakeView::new()).to_string();
    let err = run(&addr, "wrong", AdminCommand::Stats, false).unwrap_err();
    assert!(matches!(err, CliError::Unauthorized { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("401") && msg.contains("--token"), "{msg}");
    assert!(msg.contains("ETHER_AUTH_ADMIN_TOKEN"), "{msg}");

    let err = run(&addr, "", AdminCommand::Drain, true).unwrap_err();
    assert!(err.to_string().contains("no token was given"), "{err}");
}

#[test]
fn unreachable_address() {
    // A port that was just free: nothing listens there.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let err = run(&addr, TOKEN, AdminCommand::Stats, false).unwrap_err();
    assert!(matches!(err, CliError::Unreachable { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("cannot reach the admin port at 127.0.0.1:"), "{msg}");
    assert!(msg.contains("ETHER_ADMIN_ADDR"), "{msg}");

    let err = run("ftp://127.0.0.1:1", TOKEN, AdminCommand::Stats, false).unwrap_err();
    assert!(matches!(err, CliError::Usage(_)), "{err:?}");
}

#[test]
fn not_an_admin_port() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n\r\n");
        }
    });
    let err = run(&addr, TOKEN, AdminCommand::Stats, false).unwrap_err();
    assert!(matches!(err, CliError::Transport { .. }), "{err:?}");
    assert!(err.to_string().contains("is it the admin port?"), "{err}");
}
