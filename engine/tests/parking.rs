//! Parked connections on a real node (the test configuration parks after one 250 ms tick
//! without I/O): idle terminals are parked; a parked terminal gets everything pushed to it, in
//! order, an occasional ack and pings are served, and resends still come, all without a task;
//! acks again within the park delay and other frames give it a task back; kicks and idle
//! timeouts still reach parked terminals.
mod support;

use std::time::{Duration, Instant};

use ether_proto::frame::ServerFrame;
use serde_json::Value;
use support::*;

fn totals(node: &TestNode) -> Value {
    let r = node.admin().request("GET", "/admin/v1/stats", None).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    serde_json::from_slice::<Value>(&r.body).unwrap()["totals"].clone()
}

/// Waits until the node's totals satisfy `cond` (counters and gauges are exact: no publish
/// delay), and returns them.
fn wait_until(node: &TestNode, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let t = totals(node);
        if cond(&t) {
            return t;
        }
        assert!(Instant::now() < deadline, "never {what}: {t}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until `parked_connections` is `n`.
fn wait_parked(node: &TestNode, n: u64) -> Value {
    wait_until(node, &format!("{n} parked"), |t| t["parked_connections"] == n)
}

#[test]
fn idle_terminals_park_and_get_everything_back() {
    let node = TestNode::start();
    let mut phone = node.terminal("pia", "phone");
    let mut web = node.terminal("pia", "web");
    let t = wait_parked(&node, 2);
    assert_eq!(t["connections"], 2, "parked terminals stay connected: {t}");
    let parks_before = t["parks"].as_u64().unwrap();

    // A push to parked terminals reaches both and their acks are taken, without either
    // getting a task back (the test configuration's park delay is one 250 ms tick: wait past
    // it, so the ack is not "again within the park delay" of the connect).
    std::thread::sleep(Duration::from_millis(600));
    let gw = node.gateway();
    gw.send_message(&text("max", "pia", "first")).unwrap();
    let mut last = [0u64; 2];
    for (t, last) in [&mut phone, &mut web].into_iter().zip(&mut last) {
        let m = next_msg(t);
        assert_eq!(m.body["text"], "first");
        *last = m.seq;
        t.ack(m.seq).unwrap();
    }
    let t = wait_until(&node, "both acks handled", |t| t["acks"] == 2);
    assert_eq!(t["parked_connections"], 2, "{t}");
    assert_eq!(t["parks"].as_u64().unwrap(), parks_before, "served parked, never given a task: {t}");

    // Busy receivers (acks again within the park delay) get their task back, lose nothing,
    // keep the order, and park again once quiet.
    for i in 0..20 {
        gw.send_message(&text("max", "pia", &format!("m{i}"))).unwrap();
    }
    for (t, last) in [&mut phone, &mut web].into_iter().zip(&mut last) {
        for i in 0..20 {
            let m = next_msg(t);
            assert!(m.seq > *last, "in order");
            *last = m.seq;
            assert_eq!(m.body["text"], format!("m{i}"));
            t.ack(m.seq).unwrap();
            // Acks apart (well within the park delay), so the node sees them as separate
            // wake-ups, as from a busy terminal: all at once it could serve them in one go
            // while parked, and this test would not see the task given back.
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    wait_until(&node, "all 42 acks handled", |t| t["acks"] == 42);
    let t = wait_parked(&node, 2);
    let parks_before = t["parks"].as_u64().unwrap();
    assert!(parks_before > t["connections"].as_u64().unwrap(), "given a task and parked again: {t}");

    // A parked terminal's ping is answered, still parked.
    phone.ping().unwrap();
    assert_eq!(phone.recv(WAIT).unwrap(), Some(ServerFrame::Pong));
    assert_eq!(wait_parked(&node, 2)["parks"].as_u64().unwrap(), parks_before);

    // An unacknowledged message is resent to a parked terminal (test config: after 1 s).
    gw.send_message(&text("max", "pia", "unacked")).unwrap();
    let kept = next_msg(&mut phone);
    let m = next_msg(&mut web);
    web.ack(m.seq).unwrap();
    let again = next_msg(&mut phone);
    assert_eq!(again.seq, kept.seq, "resent");
    phone.ack(kept.seq).unwrap();
    let t = wait_parked(&node, 2);
    assert!(t["resends"].as_u64().unwrap() >= 1, "{t}");

    // Any other frame gives the terminal its task back; idle again, it parks again.
    let (replayed, head) = sync_all(&mut phone, kept.seq);
    assert!(replayed.is_empty());
    assert_eq!(head, kept.seq);
    let t = wait_parked(&node, 2);
    assert!(t["parks"].as_u64().unwrap() > parks_before, "{t}");

    // A kick reaches parked terminals.
    let r = node.admin().request("POST", "/admin/v1/users/pia/kick", Some(br#"{}"#)).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    for t in [&mut phone, &mut web] {
        // A resend still on its way may come first.
        let kicked = t.recv_until(|f| matches!(f, ServerFrame::Kicked { .. }), WAIT);
        assert!(matches!(kicked, Ok(ServerFrame::Kicked { .. })), "{kicked:?}");
    }
    let t = wait_until(&node, "kicked terminals gone", |t| t["connections"] == 0);
    assert_eq!(t["parked_connections"], 0);
}

#[test]
fn parked_terminals_are_closed_when_idle_too_long() {
    let node = TestNode::with(|c| c.limits.idle_timeout = Duration::from_secs(3));
    let mut t = node.terminal("quo", "phone");
    wait_parked(&node, 1);
    let started = Instant::now();
    let got = t.drain(Duration::from_secs(6));
    assert!(got.is_err() && t.is_closed(), "closed for idleness, got {got:?}");
    assert!(started.elapsed() >= Duration::from_secs(1));
    let t = wait_until(&node, "the idle terminal gone", |t| t["connections"] == 0);
    assert_eq!(t["parked_connections"], 0);
}

#[test]
fn parking_off_keeps_every_task() {
    let node = TestNode::with(|c| c.limits.park_idle_after = Duration::ZERO);
    let mut t = node.terminal("rex", "phone");
    std::thread::sleep(Duration::from_millis(800));
    let s = totals(&node);
    assert_eq!((s["connections"].as_u64(), s["parked_connections"].as_u64()), (Some(1), Some(0)));
    t.ping().unwrap();
    assert_eq!(t.recv(WAIT).unwrap(), Some(ServerFrame::Pong));
}

#[test]
fn new_terminals_and_heartbeats_park_at_once_other_frames_keep_the_task() {
    // Parking after a minute of silence: what parks sooner is the welcome and the heartbeat.
    let node = TestNode::with(|c| c.limits.park_idle_after = Duration::from_secs(60));
    let mut t = node.terminal("sol", "phone");
    let parks = wait_parked(&node, 1)["parks"].as_u64().unwrap();
    // A sync is activity: the terminal gets a task and keeps it for the configured minute.
    let (_, head) = sync_all(&mut t, 0);
    assert_eq!(head, 0);
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(totals(&node)["parked_connections"], 0);
    // A heartbeat on an active terminal parks it once the pong is written.
    t.ping().unwrap();
    assert_eq!(t.recv(WAIT).unwrap(), Some(ServerFrame::Pong));
    assert_eq!(wait_parked(&node, 1)["parks"].as_u64().unwrap(), parks + 1);
}

/// Terminals that park and wake all the time (messages arrive in bursts with gaps longer than
/// the park delay, and some terminals ping in between) still get every message once, in
/// order, with nothing lost.
#[test]
fn churning_between_parked_and_active_loses_nothing() {
    const USERS: usize = 12;
    const MESSAGES: usize = 240;
    let node = TestNode::start();
    let mut readers = Vec::new();
    for u in 0..USERS {
        let mut t = node.terminal(&format!("churn{u}"), "phone");
        readers.push(std::thread::spawn(move || {
            let mut texts = Vec::new();
            let mut last_seq = 0;
            let deadline = Instant::now() + Duration::from_secs(60);
            while texts.len() < MESSAGES / USERS && Instant::now() < deadline {
                match t.recv(Duration::from_millis(300)).expect("recv") {
                    Some(ServerFrame::Msg(m)) => {
                        // A resend of an unacked message may come again: dedupe by seq.
                        if m.seq > last_seq {
                            last_seq = m.seq;
                            texts.push(m.body["text"].as_str().unwrap_or_default().to_owned());
                        }
                        t.ack(m.seq).unwrap();
                    }
                    Some(ServerFrame::Pong) | None => {
                        // Quiet: sometimes a heartbeat, which parks the terminal again.
                        if u % 3 == 0 {
                            t.ping().unwrap();
                        }
                    }
                    Some(other) => panic!("unexpected {other:?}"),
                }
            }
            texts
        }));
    }
    let gw = node.gateway();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    for i in 0..MESSAGES {
        let to = format!("churn{}", i % USERS);
        gw.send_message(&text("boss", &to, &format!("{i}"))).unwrap();
        // xorshift: every so often a pause longer than the park delay (250 ms + a tick).
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        if rng.is_multiple_of(16) {
            std::thread::sleep(Duration::from_millis(300 + rng % 300));
        }
    }
    for (u, r) in readers.into_iter().enumerate() {
        let got = r.join().unwrap();
        let want: Vec<String> = (0..MESSAGES).filter(|i| i % USERS == u).map(|i| i.to_string()).collect();
        assert_eq!(got, want, "user churn{u}: every message once, in order");
    }
    assert!(totals(&node)["parks"].as_u64().unwrap() >= USERS as u64, "terminals parked along the way");
}

#[test]
fn a_terminal_with_messages_to_catch_up_keeps_its_task_for_the_sync() {
    let node = TestNode::with(|c| c.limits.park_idle_after = Duration::from_secs(60));
    node.gateway().send_message(&text("max", "uma", "while away")).unwrap();
    let mut behind = node.terminal("uma", "phone");
    let _fresh = node.terminal("vic", "phone");
    // Only the terminal with nothing to catch up is parked at once.
    wait_parked(&node, 1);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(totals(&node)["parked_connections"], 1);
    let (got, head) = sync_all(&mut behind, 0);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body["text"], "while away");
    assert_eq!(head, got[0].seq);
}
