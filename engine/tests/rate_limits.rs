//! Rate limits on a real node: a terminal's `send`s beyond `limits.terminal_sends_per_s` (after
//! its burst) are answered `rate_limited` with their `cid` and store nothing; its `sync`s and
//! `read`s beyond `limits.terminal_requests_per_s` likewise; the connection stays usable and
//! the limit refills. The API beyond `limits.api_requests_per_s` answers 429 with `Retry-After`.
mod support;

use std::time::Duration;

use ether_proto::frame::ServerFrame;
use ether_proto::{ClientFrame, ErrorCode};
use support::*;

/// Frames until `n` answers (`sent` or `error`) came; returns (sent cids, rate-limited refs).
fn answers(t: &mut ether_sdk::TerminalClient, n: usize) -> (Vec<String>, Vec<String>) {
    let (mut sent, mut limited) = (Vec::new(), Vec::new());
    while sent.len() + limited.len() < n {
        match t.recv(WAIT).unwrap() {
            Some(ServerFrame::Sent { cid, .. }) => sent.push(cid),
            Some(ServerFrame::Error { code: ErrorCode::RateLimited, reference, message, .. }) => {
                assert!(message.contains("limits.terminal_sends_per_s"), "{message}");
                limited.push(reference.expect("the cid of the refused send"));
            }
            Some(ServerFrame::Msg(_)) => {} // the sender's own copies
            other => panic!("unexpected {other:?}"),
        }
    }
    (sent, limited)
}

#[test]
fn terminal_sends_over_the_rate_are_refused_and_store_nothing() {
    let node = TestNode::with(|c| {
        c.limits.terminal_sends_per_s = 2;
        c.limits.terminal_sends_burst = 3;
    });
    let mut t = node.terminal("rae", "phone");
    for i in 0..10 {
        t.send_text(&format!("c{i}"), "sam", &format!("m{i}")).unwrap();
    }
    let (sent, limited) = answers(&mut t, 10);
    assert_eq!(sent, ["c0", "c1", "c2"], "the burst goes through, in order");
    assert_eq!(limited, (3..10).map(|i| format!("c{i}")).collect::<Vec<_>>());
    // Only what was answered `sent` is stored.
    let r = node.gateway().request("GET", "/v1/users/sam/messages?limit=100", None).unwrap();
    let stored = serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["messages"].as_array().unwrap().len();
    assert_eq!(stored, 3);
    // Not a violation: the connection goes on, and the rate refills (one every 500 ms).
    std::thread::sleep(Duration::from_millis(1100));
    t.send_text("again", "sam", "later").unwrap();
    let (sent, limited) = answers(&mut t, 1);
    assert_eq!((sent, limited), (vec!["again".to_owned()], vec![]));
    let stats = node.admin().request("GET", "/admin/v1/stats", None).unwrap();
    let totals = &serde_json::from_slice::<serde_json::Value>(&stats.body).unwrap()["totals"];
    assert_eq!(totals["rate_limited"], 7, "{totals}");
    let metrics = node.admin().request("GET", "/metrics", None).unwrap().text();
    assert!(metrics.contains("ether_terminal_rate_limited_total"), "exported to Prometheus");
}

#[test]
fn syncs_and_reads_over_the_rate_are_refused() {
    let node = TestNode::with(|c| {
        c.limits.terminal_requests_per_s = 1;
        c.limits.terminal_requests_burst = 2;
    });
    let mut t = node.terminal("ray", "phone");
    let sync = ClientFrame::Sync { inbox_seq: 0, groups: Default::default(), limit: None };
    // Two syncs in the burst (one at a time: a terminal waits for each `synced`).
    for _ in 0..2 {
        t.send_frame(&sync).unwrap();
        assert!(matches!(t.recv(WAIT).unwrap(), Some(ServerFrame::Synced { .. })));
    }
    // The third and a read are over the rate.
    t.send_frame(&sync).unwrap();
    t.read("u:sam", 1).unwrap();
    for _ in 0..2 {
        match t.recv(WAIT).unwrap() {
            Some(ServerFrame::Error { code: ErrorCode::RateLimited, reference: None, message, .. }) => {
                assert!(message.contains("limits.terminal_requests_per_s"), "{message}");
            }
            other => panic!("expected rate_limited, got {other:?}"),
        }
    }
    t.ping().unwrap();
    assert_eq!(t.recv(WAIT).unwrap(), Some(ServerFrame::Pong), "heartbeats are never limited");
}

#[test]
fn the_api_over_its_rate_answers_429_with_retry_after() {
    // Two shards, one keep-alive connection (on one of them): it gets the node's whole burst,
    // the limit being the node's, not a share per shard.
    let node = TestNode::with(|c| {
        c.limits.api_requests_per_s = 2;
        c.limits.api_requests_burst = 4;
    });
    let gw = node.gateway();
    let body = serde_json::to_vec(&text("biz", "sam", "hello")).unwrap();
    let mut ok = 0;
    let mut limited = None;
    for _ in 0..10 {
        let r = gw.request("POST", "/v1/messages", Some(&body)).unwrap();
        match r.status {
            200 => ok += 1,
            429 => limited = Some(r),
            s => panic!("unexpected {s}: {}", r.text()),
        }
    }
    // The burst, and one more only if the ten requests took over half a second (2/s).
    assert!((4..=5).contains(&ok), "the node's burst (4) on one connection: {ok}");
    let r = limited.expect("requests over the rate are refused");
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["error"]["code"], "rate_limited", "{v}");
    let retry: u64 = r.header("retry-after").expect("Retry-After").parse().unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
    // Reads count too: wait for the rate to give one back.
    std::thread::sleep(Duration::from_millis(1100));
    let stored = gw.request("GET", "/v1/users/sam/messages?limit=100", None).unwrap();
    assert_eq!(stored.status, 200, "{}", stored.text());
    let n = serde_json::from_slice::<serde_json::Value>(&stored.body).unwrap()["messages"].as_array().unwrap().len();
    assert!(n >= ok, "everything answered 200 is stored ({n} stored, {ok} accepted)");
    assert!(n <= 5, "nothing refused is stored ({n})");
}
