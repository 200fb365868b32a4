//! Draining: every terminal gets `reconnect` with a jittered delay and is closed with 1012
//! within the drain window; readiness turns 503 and new terminals are turned away.
mod support;

use std::time::{Duration, Instant};

use ether_proto::frame::ServerFrame;
use ether_sdk::{SdkError, TerminalClient};
use support::*;

#[test]
fn drain_tells_every_terminal_to_reconnect_and_closes_them() {
    let node = TestNode::start();
    let mut terminals: Vec<_> = (0..8).map(|i| node.terminal(&format!("d{i}"), "phone")).collect();
    let admin = node.admin();
    assert_eq!(admin.request("GET", "/readyz", None).unwrap().status, 200);
    node.shared().start_drain();
    let mut delays = Vec::new();
    for t in &mut terminals {
        match t.recv(WAIT).unwrap() {
            Some(ServerFrame::Reconnect { after_ms }) => delays.push(after_ms),
            other => panic!("expected reconnect, got {other:?}"),
        }
    }
    assert!(delays.iter().all(|d| *d < 5000));
    assert_eq!(admin.request("GET", "/readyz", None).unwrap().status, 503);
    let refused = TerminalClient::connect(&node.ws_url(), &node.token("late"), "phone", "web").unwrap_err();
    assert_eq!(refused.status(), Some(503));
    let started = Instant::now();
    for t in &mut terminals {
        match t.recv(Duration::from_secs(8)) {
            Err(SdkError::Closed { code, .. }) => assert_eq!(code, Some(1012)),
            other => panic!("expected close 1012, got {other:?}"),
        }
    }
    assert!(started.elapsed() < Duration::from_secs(8));
    let deadline = Instant::now() + WAIT;
    while node.shared().connections() > 0 {
        assert!(Instant::now() < deadline, "connections left after drain");
        std::thread::sleep(Duration::from_millis(20));
    }
}
