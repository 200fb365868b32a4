//! The admin port under audit: what a filtered list of recent closes finds, and what a drain
//! reports.
mod support;

use std::time::Duration;

use ether_proto::frame::ServerFrame;
use serde_json::Value;
use support::*;

fn get_json(c: &ether_sdk::GatewayClient, path: &str) -> Value {
    let r = c.request("GET", path, None).unwrap();
    assert_eq!(r.status, 200, "{path}: {}", r.text());
    serde_json::from_slice(&r.body).unwrap()
}

fn closed(user: &str, shard: usize, closed_ms: u64) -> ether_engine::stats::ClosedConn {
    ether_engine::stats::ClosedConn {
        conn: ether_engine::stats::ConnSnapshot {
            session: closed_ms,
            user: user.into(),
            device: "phone".into(),
            platform: "web",
            shard,
            remote: "127.0.0.1:1".parse().unwrap(),
            since_ms: 1,
            last_activity_ms: 1,
            unacked: 0,
            queued_bytes: 0,
        },
        closed_ms,
        reason: ether_engine::session::CloseReason::Idle,
    }
}

/// A filtered list of recent closes looks through every close the node still keeps: with 4
/// shards the ring holds 1,024, and a user's close older than the newest 1,000 was dropped.
#[test]
fn a_filtered_list_of_recent_closes_finds_every_close_still_kept() {
    let node = TestNode::with(|c| c.node.shards = 4);
    let shared = node.shared();
    let start = 1_700_000_000_000;
    shared.record_close(0, closed("bea", 0, start));
    let mut ms = start;
    for shard in 0..4 {
        let n = if shard == 0 {
            ether_engine::stats::RECENT_CLOSES_MAX - 1
        } else {
            ether_engine::stats::RECENT_CLOSES_MAX
        };
        for _ in 0..n {
            ms += 1;
            shared.record_close(shard, closed("someone", shard, ms));
        }
    }
    assert_eq!(shared.recent_closes(usize::MAX).len(), 4 * ether_engine::stats::RECENT_CLOSES_MAX);
    assert!(shared.recent_closes(usize::MAX).iter().any(|c| c.conn.user == "bea"), "still kept");
    let page = get_json(&node.admin(), "/admin/v1/connections?user=bea&closed=5");
    let closes = page["recent_closes"].as_array().unwrap();
    assert_eq!(closes.len(), 1, "bea's close is in the ring: {closes:?}");
    assert_eq!(closes[0]["user"], "bea");
    let page = get_json(&node.admin(), "/admin/v1/connections?shard=0&closed=1000");
    assert_eq!(page["recent_closes"].as_array().unwrap().len(), ether_engine::stats::RECENT_CLOSES_MAX);
}

/// `DrainReport.connections` is the terminals told to `reconnect` by this call: the first
/// drain tells every live terminal; a second one, while the first still runs, tells none.
#[test]
fn a_second_drain_reports_no_terminal_told_to_reconnect() {
    let node = TestNode::with(|c| c.limits.drain_window = Duration::from_secs(20));
    let admin = node.admin();
    // A drain closes about one terminal per shard and tick (250 ms) here: 12 stay a while.
    let mut terminals: Vec<_> = (0..12).map(|i| node.terminal(&format!("dr{i}"), "phone")).collect();
    let first: Value = admin.request("POST", "/admin/v1/drain", None).unwrap().json().unwrap();
    assert_eq!(first["started"], true, "{first}");
    assert_eq!(first["connections"], 12, "{first}");
    for t in &mut terminals[..2] {
        assert!(matches!(t.recv(WAIT).unwrap(), Some(ServerFrame::Reconnect { .. })));
    }
    let second: Value = admin.request("POST", "/admin/v1/drain", None).unwrap().json().unwrap();
    assert!(node.shared().connections() > 0, "terminals still connected, each told once already");
    assert_eq!(second["started"], false, "{second}");
    assert_eq!(second["connections"], 0, "nobody was told to reconnect by the second call: {second}");
}
