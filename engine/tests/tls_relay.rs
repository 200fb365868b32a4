//! The TLS relay around a terminal's end: what the engine wrote before it closed a session
//! (the last messages, the close frame) reaches the terminal even while the terminal keeps
//! talking, and a terminal that stops reading does not keep its relay (two descriptors, TLS
//! state, buffers) once its session has ended.
mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ether_engine::config::Tls;
use ether_proto::ClientFrame;
use ether_sdk::{tls_config_with_roots, ConnectOptions, SdkError, TerminalClient};
use support::*;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn tls_node() -> TestNode {
    TestNode::with(|c| {
        c.listen.client_tls = Some("127.0.0.1:0".parse().unwrap());
        c.tls = Some(Tls {
            cert_path: fixture("tls-cert.pem"),
            key_path: fixture("tls-key.pem"),
            reload_check: Duration::ZERO,
        });
    })
}

fn wss(node: &TestNode, user: &str, device: &str) -> TerminalClient {
    let pem = std::fs::read(fixture("tls-cert.pem")).unwrap();
    let options = ConnectOptions::new(&node.token(user), device, "ios").tls(tls_config_with_roots(&pem).unwrap());
    let url = format!("wss://localhost:{}", node.ports.client_tls.unwrap().port());
    TerminalClient::connect_with(&url, &options).unwrap().0
}

/// A terminal with messages still in flight is kicked; it goes on reading (acking each
/// message as it comes, i.e. sending while the node closes) and must get every message and
/// then the close frame, over `ws://` (the control) and over `wss://` alike.
fn last_messages_then_close(node: &TestNode, mut t: TerminalClient, user: &str) {
    socket2::SockRef::from(t.socket_mut().get_ref().get_ref()).set_recv_buffer_size(4096).unwrap();
    let gw = node.gateway();
    let filler = "x".repeat(1000);
    let n = 12;
    for i in 0..n {
        gw.send_message(&text("ops", user, &format!("{i} {filler}"))).unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    let kick = ether_proto::api::Kick { reason: Some("bye".into()), ..Default::default() };
    assert_eq!(gw.kick(user, kick).unwrap().kicked, 1);
    let mut got = 0;
    let close = loop {
        match t.recv(WAIT) {
            Ok(Some(ether_proto::frame::ServerFrame::Msg(m))) => {
                got += 1;
                // An ack in flight while the node closes; a send that fails is fine (the
                // node may be gone), what matters is what is read.
                let _ = t.send_frame(&ClientFrame::Ack { seq: m.seq, group: None });
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(Some(_)) => {}
            Ok(None) => panic!("{user}: nothing more within {WAIT:?} after {got} messages"),
            Err(e) => break e,
        }
    };
    assert_eq!(got, n, "{user}: every message sent before the kick ({close})");
    match close {
        SdkError::Closed { code: Some(_), .. } => {}
        other => panic!("{user}: the close frame after {got} messages, got {other}"),
    }
}

#[test]
fn the_last_messages_and_the_close_reach_a_terminal_that_keeps_talking_over_tls_too() {
    let node = tls_node();
    for round in 0..3 {
        let plain = format!("pat{round}");
        last_messages_then_close(&node, node.terminal(&plain, "phone"), &plain);
        let secure = format!("tom{round}");
        last_messages_then_close(&node, wss(&node, &secure, "phone"), &secure);
    }
}

/// Whether this process still holds the node's side of the TCP connection from `client`'s
/// port to `server`'s: a socket this process closed is an orphan (inode 0) or gone.
fn node_holds(server: u16, client: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let port = |a: &str| u16::from_str_radix(a.rsplit(':').next().unwrap(), 16).unwrap();
        port(f[1]) == server && port(f[2]) == client && f[9] != "0"
    })
}

#[test]
fn a_tls_terminal_that_stops_reading_does_not_keep_its_relay_after_its_session_ended() {
    let node = tls_node();
    let server = node.ports.client_tls.unwrap().port();
    let mut t = wss(&node, "sid", "phone");
    let tcp = t.socket_mut().get_ref().get_ref();
    socket2::SockRef::from(tcp).set_recv_buffer_size(4096).unwrap();
    let client = tcp.local_addr().unwrap().port();
    assert!(node_holds(server, client));
    // It never reads again: the node closes it as a slow consumer once everything between
    // (its queue, the relay, the socket buffers) is full.
    let gw = node.gateway();
    let filler = "y".repeat(8000);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut i = 0;
    while slow_consumer_closes(&node) < 1.0 {
        assert!(Instant::now() < deadline, "never closed as a slow consumer ({i} messages)");
        gw.send_message(&text("ops", "sid", &format!("{i} {filler}"))).unwrap();
        i += 1;
    }
    let released = Instant::now() + Duration::from_secs(15);
    while node_holds(server, client) {
        assert!(Instant::now() < released, "the node still holds the connection of a terminal whose session ended");
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(t);
}
