//! The runnable example terminal (`sdk/examples/terminal.rs`) against a real node, run as the
//! README runs it: a device that comes back after messages were stored for it must print
//! every one of them once (it `sync`s them page by page, live messages arriving meanwhile),
//! and the node must end up with the device's delivered position at the heads. (The example
//! once acked the first live message over a backlog it never fetched: lost for that device.)
//!
//! The example binary is built by this test (`cargo build -p ether-sdk --example terminal`):
//! Cargo gives tests the path of the workspace's binaries only.
mod support;

use std::time::{Duration, Instant};

use ether_proto::frame::Positions;
use ether_sdk::TerminalClient;
use support::example::ExampleTerminal;
use support::*;

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

    let mut want: Vec<String> = (4..=19).map(|i| format!("[u:dan #{i}] dan: m{i}")).collect();
    want.extend((3..=13).map(|i| format!("[g:club #{i}] max: c{i}")));
    let mut example = ExampleTerminal::start(&node, "laptop");
    let on_line = |line: &str| {
        if line.starts_with("welcome ") {
            // Connected (and catching up): one live message on each stream now.
            inbox(19);
            club(13);
        }
    };
    example.read_until(Duration::from_secs(30), on_line, |p| want.iter().all(|w| p.contains(w)));
    // End of input: the example closes the connection and says bye.
    let (status, printed, stderr) = example.finish();
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
