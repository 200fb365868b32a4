//! Terminals over TLS (`wss://`, `listen.client_tls`) on a real node: the SDK connects with the
//! node's certificate as its root, gets `welcome`, messages and acks exactly as over `ws://`;
//! the admin port sees the terminal's own address; a client that does not speak TLS, or does
//! not trust the certificate, is refused without harming the node; the plain port still works.
mod support;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use ether_engine::config::Tls;
use ether_proto::ClientFrame;
use ether_sdk::{tls_config_with_roots, ConnectOptions, SdkError, TerminalClient};
use support::*;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// A shard counter of `node`, summed over its shards.
fn shards_sum(
    node: &TestNode,
    counter: impl Fn(&ether_engine::stats::ShardCounters) -> &std::sync::atomic::AtomicU64,
) -> u64 {
    node.shared().shards.iter().map(|s| counter(s).load(std::sync::atomic::Ordering::Relaxed)).sum()
}

/// The bundled localhost certificate and key, never reloaded.
fn bundled_tls() -> Tls {
    Tls { cert_path: fixture("tls-cert.pem"), key_path: fixture("tls-key.pem"), reload_check: Duration::ZERO }
}

fn tls_node() -> TestNode {
    TestNode::with(|c| {
        c.listen.client_tls = Some("127.0.0.1:0".parse().unwrap());
        c.tls = Some(bundled_tls());
    })
}

fn wss_url(node: &TestNode) -> String {
    format!("wss://localhost:{}", node.ports.client_tls.expect("a TLS listener").port())
}

fn trusting(node: &TestNode, user: &str, device: &str) -> ConnectOptions {
    trusting_cert(node, user, device, "tls-cert.pem")
}

fn trusting_cert(node: &TestNode, user: &str, device: &str, cert: &str) -> ConnectOptions {
    let pem = std::fs::read(fixture(cert)).unwrap();
    ConnectOptions::new(&node.token(user), device, "ios").tls(tls_config_with_roots(&pem).unwrap())
}

#[test]
fn a_terminal_over_tls_gets_its_messages_like_any_other() {
    let node = tls_node();
    let (mut phone, welcome) = TerminalClient::connect_with(&wss_url(&node), &trusting(&node, "tia", "phone")).unwrap();
    assert_eq!((welcome.user.as_str(), welcome.device.as_str()), ("tia", "phone"));
    assert!(phone.socket_mut().get_ref().is_tls());
    // The same user on the plain port too: both get every message, in order.
    let mut web = node.terminal("tia", "web");
    let gw = node.gateway();
    let sent: Vec<String> =
        (0..20).map(|i| gw.send_message(&text("ops", "tia", &format!("m{i}"))).unwrap().id).collect();
    for t in [&mut phone, &mut web] {
        let got: Vec<String> = (0..20)
            .map(|_| {
                let m = next_msg(t);
                t.ack(m.seq).unwrap();
                m.id
            })
            .collect();
        assert_eq!(got, sent);
    }
    // Frames bigger than a TLS record and than the relay's buffer cross intact.
    let big = "x".repeat(3000);
    gw.send_message(&text("ops", "tia", &big)).unwrap();
    let m = next_msg(&mut phone);
    assert_eq!(m.body["text"], big.as_str());
    // The terminal's own address, not the relay's, is what the admin port shows.
    let r = node.admin().request("GET", "/admin/v1/users/tia", None).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let remotes: Vec<&str> =
        v["connections"].as_array().unwrap().iter().map(|c| c["remote"].as_str().unwrap()).collect();
    assert_eq!(remotes.len(), 2, "{v}");
    assert!(remotes.iter().all(|r| r.starts_with("127.0.0.1:")), "{remotes:?}");
    // Terminal requests work over TLS too, and a close ends the session on the node.
    phone.send_frame(&ClientFrame::Ping).unwrap();
    phone.close().unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while node.shared().shards.iter().map(|s| s.connections.load(std::sync::atomic::Ordering::Relaxed)).sum::<u64>() > 1
    {
        assert!(std::time::Instant::now() < deadline, "the TLS terminal's session never closed");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn clients_that_do_not_speak_or_trust_tls_are_refused_and_the_node_stays_up() {
    let node = tls_node();
    let port = node.ports.client_tls.unwrap().port();
    // Plain HTTP to the TLS port: the TLS handshake fails, the connection is closed.
    let mut plain = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    plain.set_read_timeout(Some(WAIT)).unwrap();
    plain.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    let _ = plain.read_to_end(&mut buf);
    assert!(!String::from_utf8_lossy(&buf).contains("HTTP/1.1 101"), "no upgrade without TLS");
    // A client that connects and says nothing is dropped after limits.handshake_timeout_ms.
    let mut silent = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    silent.set_read_timeout(Some(WAIT)).unwrap();
    let t0 = std::time::Instant::now();
    let n = silent.read(&mut [0u8; 16]).unwrap_or(0);
    assert_eq!(n, 0, "closed without a byte");
    let waited = t0.elapsed();
    assert!(waited >= node.config.limits.handshake_timeout / 2 && waited < WAIT, "{waited:?}");
    // The default roots do not include the node's self-signed certificate.
    let untrusting = ConnectOptions::new(&node.token("uma"), "phone", "ios");
    match TerminalClient::connect_with(&wss_url(&node), &untrusting) {
        Err(SdkError::Io(e)) => assert!(e.to_string().to_lowercase().contains("certificate"), "{e}"),
        other => panic!("expected a certificate error, got {other:?}"),
    }
    // A bad token over TLS gets the same 401 as over ws://.
    let bad = ConnectOptions { token: Some("not.a.jwt".into()), ..trusting(&node, "uma", "phone") };
    match TerminalClient::connect_with(&wss_url(&node), &bad) {
        Err(e) => assert_eq!(e.status(), Some(401), "{e}"),
        Ok(_) => panic!("a bad token was let in over TLS"),
    }
    // Both ports still serve.
    TerminalClient::connect_with(&wss_url(&node), &trusting(&node, "uma", "phone")).unwrap();
    node.terminal("uma", "web");
    let count = |f: fn(&ether_engine::stats::ShardCounters) -> &std::sync::atomic::AtomicU64| -> u64 {
        node.shared().shards.iter().map(|s| f(s).load(std::sync::atomic::Ordering::Relaxed)).sum()
    };
    let failures = count(|s| &s.handshake_failures);
    assert!(failures >= 3, "failed TLS handshakes are counted: {failures}");
    // The TLS counters apart: plain HTTP, the untrusted certificate and the silent client
    // failed at TLS; the bad token passed TLS and failed at the upgrade.
    assert_eq!(count(|s| &s.tls_handshake_failures), 3);
    assert_eq!(count(|s| &s.tls_handshakes), 2);
    let metrics = node.admin().request("GET", "/metrics", None).unwrap().text();
    assert!(metrics.contains("ether_tls_handshakes_total{"), "{metrics}");
}

#[test]
fn a_node_refuses_to_start_with_an_unusable_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ether_engine::config::Config::test_min(dir.path().to_path_buf());
    config.listen.client_tls = Some("127.0.0.1:0".parse().unwrap());
    config.tls =
        Some(Tls { cert_path: fixture("tls-key.pem"), key_path: fixture("tls-key.pem"), reload_check: Duration::ZERO });
    let err = ether_engine::node::start(config).map(|_| ()).unwrap_err().to_string();
    assert!(err.contains("tls.cert_path") && err.contains("no CERTIFICATE block"), "{err}");
}

#[test]
fn a_renewed_certificate_is_served_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::copy(fixture("tls-cert.pem"), &cert).unwrap();
    std::fs::copy(fixture("tls-key.pem"), &key).unwrap();
    let (c2, k2) = (cert.clone(), key.clone());
    let node = TestNode::with(move |c| {
        c.listen.client_tls = Some("127.0.0.1:0".parse().unwrap());
        c.tls = Some(Tls { cert_path: c2, key_path: k2, reload_check: Duration::from_secs(1) });
    });
    let (mut before, _) = TerminalClient::connect_with(&wss_url(&node), &trusting(&node, "val", "phone")).unwrap();
    // The renewal lands: key first, then the certificate (a moment where they do not match
    // must not break anything: the previous pair stays until both fit).
    std::fs::copy(fixture("tls-key-2.pem"), &key).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    TerminalClient::connect_with(&wss_url(&node), &trusting(&node, "val", "web")).expect("old pair still served");
    std::fs::copy(fixture("tls-cert-2.pem"), &cert).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match TerminalClient::connect_with(&wss_url(&node), &trusting_cert(&node, "val", "tablet", "tls-cert-2.pem")) {
            Ok(_) => break,
            Err(e) => assert!(std::time::Instant::now() < deadline, "the renewed certificate was never served: {e}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // New connections get the new certificate only; the connection made before goes on.
    assert!(TerminalClient::connect_with(&wss_url(&node), &trusting(&node, "val", "watch")).is_err());
    node.gateway().send_message(&text("ops", "val", "still here")).unwrap();
    let m = before.recv_msg(WAIT).unwrap();
    assert_eq!(m.body["text"], "still here");
}

#[test]
fn handshakes_past_the_limit_wait_for_a_slot_instead_of_being_reset() {
    let node = TestNode::with(|c| {
        c.node.shards = 1;
        c.limits.tls_handshakes_per_shard_max = 1;
        c.limits.handshake_timeout = Duration::from_secs(1);
        c.listen.client_tls = Some("127.0.0.1:0".parse().unwrap());
        c.tls = Some(bundled_tls());
    });
    let port = node.ports.client_tls.unwrap().port();
    // One client starts a handshake and stalls: it holds the only slot until the timeout.
    let mut stalled = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let waiting = {
        let (url, options, done) = (wss_url(&node), trusting(&node, "wes", "phone"), done.clone());
        std::thread::spawn(move || {
            let r = TerminalClient::connect_with(&url, &options).map(|_| ());
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            r
        })
    };
    // While the slot is held the second client waits (before: it was reset at once).
    std::thread::sleep(Duration::from_millis(300));
    assert!(!done.load(std::sync::atomic::Ordering::SeqCst), "the second handshake waits for the slot");
    // The stalled one is closed at its timeout; then the waiting one goes through.
    stalled.set_read_timeout(Some(WAIT)).unwrap();
    assert_eq!(stalled.read(&mut [0u8; 16]).unwrap_or(0), 0, "the stalled handshake is closed");
    waiting.join().unwrap().expect("the waiting client connects once the slot is free");
    assert_eq!(shards_sum(&node, |s| &s.tls_handshake_failures), 1, "only the stalled handshake failed");
}

#[test]
fn the_business_api_over_tls_works_like_the_plain_one() {
    let node = TestNode::with(|c| {
        c.listen.api_tls = Some("127.0.0.1:0".parse().unwrap());
        c.tls = Some(bundled_tls());
    });
    assert_eq!(node.ports.client_tls, None, "only the API listener asked for");
    let base = format!("https://localhost:{}", node.ports.api_tls.expect("an https listener").port());
    let roots = tls_config_with_roots(&std::fs::read(fixture("tls-cert.pem")).unwrap()).unwrap();
    let gw = ether_sdk::GatewayClient::new(&base, node.api_key.clone()).with_tls(roots.clone());
    let mut t = node.terminal("xia", "phone");
    // Several requests on one keep-alive TLS connection.
    for i in 0..5 {
        gw.send_message(&text("ops", "xia", &format!("over https {i}"))).unwrap();
    }
    for i in 0..5 {
        assert_eq!(next_msg(&mut t).body["text"], format!("over https {i}"));
    }
    assert_eq!(gw.connections_opened(), 1);
    // The same errors as over http://.
    let wrong = ether_sdk::GatewayClient::new(&base, "wrong-key").with_tls(roots);
    assert_eq!(wrong.send_message(&text("ops", "xia", "x")).unwrap_err().status(), Some(401));
    // A client that does not trust the certificate gets no answer.
    let untrusting = ether_sdk::GatewayClient::new(&base, node.api_key.clone());
    let err = untrusting.send_message(&text("ops", "xia", "x")).unwrap_err();
    assert!(err.to_string().to_lowercase().contains("certificate"), "{err}");
}

#[test]
fn a_client_coming_back_resumes_its_tls_session_however_many_came_between() {
    use std::sync::Arc;
    let node = tls_node();
    let port = node.ports.client_tls.unwrap().port();
    let config = tls_config_with_roots(&std::fs::read(fixture("tls-cert.pem")).unwrap()).unwrap();
    // A plain rustls client (the SDK's hides its session): handshake, a byte each way, close.
    let handshake = |config: &Arc<ether_sdk::rustls::ClientConfig>| {
        let name = "localhost".try_into().unwrap();
        let mut conn = ether_sdk::rustls::ClientConnection::new(config.clone(), name).unwrap();
        let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        tcp.set_read_timeout(Some(WAIT)).unwrap();
        let mut tls = ether_sdk::rustls::Stream::new(&mut conn, &mut tcp);
        // Any request: it is refused (not an upgrade), which is all this needs.
        tls.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut answer = [0u8; 10];
        tls.read_exact(&mut answer).unwrap();
        assert_eq!(&answer, b"HTTP/1.1 4");
        conn.handshake_kind()
    };
    use ether_sdk::rustls::HandshakeKind;
    assert_eq!(handshake(&config), Some(HandshakeKind::Full));
    // Many other clients in between (more than a server-side session cache of 256 holds):
    // resumption must not depend on the node remembering each session (stateless tickets).
    let pem = std::fs::read(fixture("tls-cert.pem")).unwrap();
    for _ in 0..300 {
        assert_eq!(handshake(&tls_config_with_roots(&pem).unwrap()), Some(HandshakeKind::Full));
    }
    assert_eq!(handshake(&config), Some(HandshakeKind::Resumed), "the first client resumes with its ticket");
    assert_eq!(shards_sum(&node, |s| &s.tls_resumptions), 1, "counted");
}

#[test]
fn the_admin_port_over_tls_serves_the_same_routes_and_the_cli_speaks_it() {
    let node = TestNode::with(|c| {
        c.listen.admin_tls = Some("127.0.0.1:0".parse().unwrap());
        c.tls = Some(bundled_tls());
    });
    assert_eq!((node.ports.client_tls, node.ports.api_tls), (None, None), "only the admin listener asked for");
    let base = format!("https://localhost:{}", node.ports.admin_tls.expect("an https admin listener").port());
    let roots = tls_config_with_roots(&std::fs::read(fixture("tls-cert.pem")).unwrap()).unwrap();
    let token = node.config.auth.admin_token.expose().to_owned();
    let admin = ether_sdk::GatewayClient::new(&base, token.clone()).with_tls(roots.clone());
    let stats = admin.request("GET", "/admin/v1/stats", None).unwrap();
    assert_eq!(stats.status, 200, "{}", stats.text());
    let v: serde_json::Value = serde_json::from_slice(&stats.body).unwrap();
    assert_eq!(v["node"]["id"], node.config.node.id.as_str());
    assert_eq!(admin.request("GET", "/metrics", None).unwrap().status, 200);
    // The same refusals as over http://.
    let wrong = ether_sdk::GatewayClient::new(&base, "wrong").with_tls(roots.clone());
    assert_eq!(wrong.request("GET", "/admin/v1/stats", None).unwrap().status, 401);
    // `ether admin` with the CA: readable stats; without it the certificate is not trusted.
    let cmd = || ether_admin::cli::AdminCommand::Stats;
    let out = ether_admin::cli::run_with_tls(&base, &token, cmd(), false, Some(roots)).unwrap();
    assert!(out.starts_with(&format!("node {}", node.config.node.id)), "{out}");
    let err = ether_admin::cli::run_with_tls(&base, &token, cmd(), false, None).unwrap_err();
    assert!(err.to_string().to_lowercase().contains("certificate"), "{err}");
}
