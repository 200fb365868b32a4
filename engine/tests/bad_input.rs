//! Bad input on every port gets a clear answer and loses nothing: malformed HTTP, oversized
//! headers and bodies, plain HTTP on the WebSocket path, invalid frames, abuse, oversize
//! frames, silent clients.
mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use ether_proto::frame::ServerFrame;
use ether_proto::ErrorCode;
use ether_sdk::SdkError;
use support::*;
use tungstenite::Message;

/// Writes raw bytes, reads until the server closes (or 5 s), returns what came back.
fn raw_exchange(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(response: &str) -> u16 {
    response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status in {response:?}"))
}

#[test]
fn api_port_rejects_malformed_http_and_oversize() {
    let node = TestNode::start();
    let api = node.ports.api;
    let r = raw_exchange(api, b"GET / HTTP/1.1\r\nno colon in this header\r\n\r\n");
    assert_eq!(status_of(&r), 400, "{r}");
    let big_header = format!("GET /v1/users/a/presence HTTP/1.1\r\nX-Big: {}\r\n\r\n", "x".repeat(4096));
    assert_eq!(status_of(&raw_exchange(api, big_header.as_bytes())), 431);
    let big_body = format!(
        "POST /v1/messages HTTP/1.1\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\n\r\n",
        node.api_key,
        10 * 1024 * 1024
    );
    assert_eq!(status_of(&raw_exchange(api, big_body.as_bytes())), 413);
}

/// A request without the right API key is refused from its head: 401 and the connection
/// closed without waiting for its body (nor holding it), and no `100 Continue` invites it;
/// with the key, the body is awaited and the request answered as usual.
#[test]
fn api_requests_without_the_key_are_refused_before_their_body() {
    let node = TestNode::start();
    let api = node.ports.api;
    let head = |key: &str| {
        format!("POST /v1/messages HTTP/1.1\r\nHost: x\r\n{key}Content-Length: 1000\r\nExpect: 100-continue\r\n\r\n")
    };
    for key in ["", "Authorization: Bearer wrong\r\n"] {
        let r = raw_exchange(api, head(key).as_bytes());
        assert_eq!(status_of(&r), 401, "{r}");
        assert!(!r.contains("100 Continue") && r.contains("unauthorized"), "{r}");
    }
    let mut s = TcpStream::connect(api).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(head(&format!("Authorization: Bearer {}\r\n", node.api_key)).as_bytes()).unwrap();
    let mut got = [0u8; 25];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"HTTP/1.1 100 Continue\r\n\r\n");
    let mut body = serde_json::to_vec(&text("amy", "ben", "after the 100")).unwrap();
    body.resize(1000, b' ');
    s.write_all(&body).unwrap();
    let mut answer = [0u8; 12];
    s.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"HTTP/1.1 200");
}

#[test]
fn api_errors_have_the_contract_shape() {
    let node = TestNode::start();
    let gw = node.gateway();
    let r = gw.request("POST", "/v1/messages", Some(b"{not json")).unwrap();
    assert_eq!(r.status, 400);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["error"]["code"], "invalid_json");
    let r = gw
        .request("POST", "/v1/messages", Some(br#"{"from":"a","to":"b","kind":"voice","body":{"url":"u"}}"#))
        .unwrap();
    assert_eq!(r.status, 400);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["error"]["code"], "invalid_body");
    assert!(v["error"]["message"].as_str().unwrap().contains("duration_ms"), "{v}");
    let r = gw.request("GET", "/v1/nope", None).unwrap();
    assert_eq!(r.status, 404);
    let r = gw.request("GET", "/v1/messages", None).unwrap();
    assert_eq!(r.status, 405);
    let unauth = ether_sdk::GatewayClient::new(format!("http://{}", node.ports.api), "wrong-key");
    let err = unauth.send_message(&text("a", "b", "x")).unwrap_err();
    assert_eq!((err.status(), err.code()), (Some(401), Some(ErrorCode::Unauthorized)));
    // Every kind is validated with its path.
    for (kind, body, path) in [
        ("image", r#"{"url":""}"#, "body.url"),
        ("file", r#"{"url":"u"}"#, "body"),
        ("custom", r#"{}"#, "body"),
        ("text", r#"{"text":""}"#, "body.text"),
    ] {
        let req = format!(r#"{{"from":"a","to":"b","kind":"{kind}","body":{body}}}"#);
        let r = gw.request("POST", "/v1/messages", Some(req.as_bytes())).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(r.status, 400, "{kind}");
        assert!(v["error"]["message"].as_str().unwrap().starts_with(path), "{kind}: {v}");
    }
}

#[test]
fn plain_http_on_the_websocket_path_gets_426() {
    let node = TestNode::start();
    let r = raw_exchange(node.ports.client, b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status_of(&r), 426, "{r}");
    assert!(r.to_ascii_lowercase().contains("upgrade: websocket"));
    let r = raw_exchange(node.ports.client, b"GET /elsewhere HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status_of(&r), 404);
    let r = raw_exchange(node.ports.client, b"\x16\x03\x01 definitely not http\r\n\r\n");
    assert_eq!(status_of(&r), 400);
}

#[test]
fn silent_clients_are_dropped_after_the_handshake_timeout() {
    let node = TestNode::start(); // test_min: 1 s handshake timeout
    let mut s = TcpStream::connect(node.ports.client).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\n").unwrap(); // and then nothing
    let started = std::time::Instant::now();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the server closes without an answer");
    assert!(started.elapsed() < Duration::from_secs(4));
}

#[test]
fn invalid_frames_get_errors_then_abuse_closes_with_1008() {
    let node = TestNode::start(); // test_min: 3 violations allowed
    let mut t = node.terminal("olga", "phone");
    t.raw_send(Message::text("{not json")).unwrap();
    match t.recv(WAIT).unwrap() {
        Some(ServerFrame::Error { code, .. }) => assert_eq!(code, ErrorCode::InvalidJson),
        other => panic!("{other:?}"),
    }
    t.raw_send(Message::text(r#"{"type":"dance"}"#)).unwrap();
    match t.recv(WAIT).unwrap() {
        Some(ServerFrame::Error { code, message, .. }) => {
            assert_eq!(code, ErrorCode::InvalidFrame);
            assert!(message.contains("dance"));
        }
        other => panic!("{other:?}"),
    }
    // An ack for a group that cannot exist.
    t.raw_send(Message::text(r#"{"type":"ack","seq":1,"group":"no such group!"}"#)).unwrap();
    match t.recv(WAIT).unwrap() {
        Some(ServerFrame::Error { code, message, .. }) => {
            assert_eq!(code, ErrorCode::InvalidBody);
            assert!(message.starts_with("group:"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // Still served between errors.
    t.ping().unwrap();
    assert_eq!(t.recv(WAIT).unwrap(), Some(ServerFrame::Pong));
    for _ in 0..3 {
        let _ = t.raw_send(Message::text("nope"));
    }
    let closed = loop {
        match t.recv(WAIT) {
            Ok(Some(ServerFrame::Error { .. })) => continue,
            Err(SdkError::Closed { code, .. }) => break code,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(closed, Some(1008));
}

#[test]
fn oversize_frames_close_with_1009() {
    let node = TestNode::start(); // test_min: 4 KiB frames
    let mut t = node.terminal("pia", "phone");
    t.raw_send(Message::text(format!(r#"{{"type":"ping","pad":"{}"}}"#, "x".repeat(8192)))).unwrap();
    match t.recv(WAIT) {
        Err(SdkError::Closed { code, .. }) => assert_eq!(code, Some(1009)),
        other => panic!("expected close 1009, got {other:?}"),
    }
    // The node is fine.
    let mut u = node.terminal("pia", "web");
    u.ping().unwrap();
    assert_eq!(u.recv(WAIT).unwrap(), Some(ServerFrame::Pong));
}

#[test]
fn bad_send_frames_name_the_problem() {
    let node = TestNode::start();
    let mut t = node.terminal("quin", "phone");
    t.raw_send(Message::text(r#"{"type":"send","cid":"c9","to":"rob","kind":"text","body":{"text":5}}"#)).unwrap();
    match t.recv(WAIT).unwrap() {
        Some(ServerFrame::Error { code, message, reference, .. }) => {
            assert_eq!(code, ErrorCode::InvalidBody);
            assert!(message.starts_with("body.text"), "{message}");
            assert_eq!(reference.as_deref(), Some("c9"));
        }
        other => panic!("{other:?}"),
    }
}

/// A text frame as a client sends it (masked; the zero key leaves the payload as is).
fn client_text_frame(payload: &str) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mut f = vec![0x81, 0x80 | payload.len() as u8, 0, 0, 0, 0];
    f.extend_from_slice(payload.as_bytes());
    f
}

/// One `sync` at a time per terminal: each holds a page until the terminal has read it, so a
/// second one sent before the first's `synced` is refused (`rate_limited`) instead of piling
/// up pages in memory; the first is answered whole, and a sync after it works again.
#[test]
fn a_second_sync_before_the_first_is_answered_is_refused() {
    // Small socket buffers on both sides and a terminal that does not read: the first sync's
    // page (5 × 4 KB) cannot all be written, so it is still being answered when the second
    // sync comes.
    let node = TestNode::with(|c| {
        c.limits.socket_send_buffer_bytes = 4096;
        // No resend of the page while this raw terminal reads it (it acks at the end).
        c.limits.resend_timeout = Duration::from_secs(30);
    });
    let gw = node.gateway();
    let big = "z".repeat(4000);
    for i in 0..5 {
        gw.send_message(&text("pia", "quill", &format!("m{i} {big}"))).unwrap();
    }
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&node.ports.client.into()).unwrap();
    let mut s: TcpStream = socket.into();
    s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let upgrade = format!(
        "GET /ws?token={}&device=raw HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        node.token("quill")
    );
    s.write_all(upgrade.as_bytes()).unwrap();
    let read_all = |s: &mut TcpStream| {
        let mut out = Vec::new();
        let mut buf = [0u8; 65536];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    assert!(read_all(&mut s).contains("\"type\":\"welcome\""));
    let sync = r#"{"type":"sync","inbox_seq":0,"groups":{}}"#;
    s.write_all(&client_text_frame(sync)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    s.write_all(&client_text_frame(sync)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let got = read_all(&mut s);
    assert_eq!(got.matches("\"type\":\"synced\"").count(), 1, "{got}");
    assert_eq!(got.matches("\"type\":\"msg\"").count(), 5, "{got}");
    assert!(got.contains("rate_limited") && got.contains("a sync is being answered"), "{got}");
    // Answered: the next one is served.
    // Acked (else the node pushes the page again after the resend timeout), synced again.
    s.write_all(&client_text_frame(r#"{"type":"ack","seq":5}"#)).unwrap();
    s.write_all(&client_text_frame(sync)).unwrap();
    let again = read_all(&mut s);
    assert_eq!(again.matches("\"type\":\"synced\"").count(), 1, "{again}");
}

/// A terminal acks only groups it is in: an ack of another group is refused (`forbidden`)
/// and stores nothing, so neither floods the store with positions nor learns the group's
/// head from its next `welcome`.
#[test]
fn acks_of_groups_the_terminal_is_not_in_are_refused() {
    let node = TestNode::start();
    let gw = node.gateway();
    gw.create_group(Some("secret"), "Secret", "boss", &["aide"]).unwrap();
    for _ in 0..3 {
        gw.send_group_message("secret", "boss", ether_proto::Kind::Text, &serde_json::json!({"text": "hush"}), None)
            .unwrap();
    }
    let mut nosy = node.terminal("nosy", "phone");
    nosy.send_frame(&ether_proto::ClientFrame::Ack { seq: u64::MAX >> 12, group: Some("secret".into()) }).unwrap();
    match nosy.recv(WAIT).unwrap() {
        Some(ServerFrame::Error { code, message, .. }) => {
            assert_eq!(code, ErrorCode::Forbidden);
            assert!(message.contains("secret"), "{message}");
        }
        other => panic!("expected forbidden, got {other:?}"),
    }
    nosy.close().unwrap();
    std::thread::sleep(Duration::from_millis(600)); // a position would be saved by now
    let (_, welcome) = ether_sdk::TerminalClient::connect(&node.ws_url(), &node.token("nosy"), "phone", "web").unwrap();
    let delivered = welcome.delivered.unwrap_or_default();
    assert!(!delivered.groups.contains_key("secret"), "no position, no head: {delivered:?}");
    assert!(!welcome.groups.contains_key("secret"));
}

/// Connections to `port` the node has accepted (it holds a descriptor for each): the kernel's
/// table lists them with a socket inode, while those still in the listen backlog have inode 0.
/// Other tests' sockets (other ports) do not count.
fn accepted_on(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = f.get(1).and_then(|a| a.rsplit(':').next()).and_then(|p| u16::from_str_radix(p, 16).ok());
            let (state, inode) = (f.get(3).copied(), f.get(9).copied());
            local_port == Some(port) && state != Some("0A") && inode.is_some_and(|i| i != "0")
        })
        .count()
}

/// Clients that connect and say nothing hold at most `limits.handshakes_per_shard_max`
/// descriptors of the node per shard: the rest wait in the kernel's listen backlog, holding
/// none, so they cannot take every descriptor; once they go, terminals connect as usual.
#[test]
fn silent_connections_beyond_the_handshake_bound_hold_no_descriptor() {
    let node = TestNode::with(|c| c.limits.handshakes_per_shard_max = 2); // 2 shards: 4 at most
    let port = node.ports.client.port();
    let silent: Vec<TcpStream> = (0..40).map(|_| TcpStream::connect(node.ports.client).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(300)); // the node accepts what it will
    let held_by_node = accepted_on(port);
    assert!(held_by_node <= 4, "the node holds {held_by_node} descriptors for 40 silent connections");
    drop(silent);
    let mut t = node.terminal("after", "phone");
    t.ping().unwrap();
    assert_eq!(t.recv(WAIT).unwrap(), Some(ServerFrame::Pong));
}

/// Positions past any stored seq (up to u64::MAX) in history and `sync` read nothing: the
/// storage thread used to panic on them (`after_seq=18446744073709551615`), and every later
/// request of the node was refused 503.
#[test]
fn positions_as_big_as_u64_read_nothing_and_the_node_goes_on() {
    let node = TestNode::start();
    let api = node.gateway();
    let send = |to: &str| {
        let body = format!(r#"{{"from":"far","to":"{to}","kind":"text","body":{{"text":"hi"}}}}"#);
        let r = api.request("POST", "/v1/messages", Some(body.as_bytes())).unwrap();
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    };
    send("near");
    let r = api
        .request("POST", "/v1/groups", Some(br#"{"id":"big","name":"Big","owner":"far","members":["near"]}"#))
        .unwrap();
    assert_eq!(r.status, 201);
    let max = u64::MAX;
    for path in [
        format!("/v1/users/near/messages?after_seq={max}"),
        format!("/v1/users/near/messages?before_seq={max}&after_seq={max}"),
        format!("/v1/users/near/messages?chat=u:far&after_seq={max}"),
        format!("/v1/groups/big/messages?after_seq={max}"),
        format!("/v1/groups/big/messages?before_seq={max}"),
    ] {
        let r = api.request("GET", &path, None).unwrap();
        assert_eq!(r.status, 200, "{path}: {}", String::from_utf8_lossy(&r.body));
    }
    let mut t = node.terminal("near", "phone");
    t.welcome().unwrap();
    t.send_frame(&ether_proto::ClientFrame::Sync {
        inbox_seq: max,
        groups: std::collections::BTreeMap::from([("big".to_string(), max)]),
        limit: None,
    })
    .unwrap();
    match t.recv(WAIT).unwrap() {
        Some(ServerFrame::Synced { .. }) => {}
        Some(ServerFrame::Msg(m)) => panic!("nothing is past u64::MAX: {m:?}"),
        other => panic!("{other:?}"),
    }
    // The store still works: a message sent now arrives.
    send("near");
    assert_eq!(next_msg(&mut t).seq, 2);
}
