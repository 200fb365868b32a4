//! Terminals and the business API over real sockets: auth, single-chat delivery to every
//! terminal of both users, order, device replacement, presence, kick, broadcast.
mod support;

use std::time::Duration;

use ether_proto::api::{Broadcast, Kick, TokenRequest};
use ether_proto::frame::ServerFrame;
use ether_sdk::terminal::ConnectOptions;
use ether_sdk::{SdkError, TerminalClient};
use support::*;

#[test]
fn bad_tokens_get_401_before_the_upgrade() {
    let node = TestNode::start();
    let url = node.ws_url();
    let other = ether_engine::auth::TokenKeys::new("some-other-secret-0123456789abcdef");
    let (foreign, _) = other.mint("alice", Duration::from_secs(60), None).unwrap();
    for token in ["garbage", foreign.as_str(), ""] {
        let err = TerminalClient::connect(&url, token, "d", "web").unwrap_err();
        assert_eq!(err.status(), Some(401), "{token:?}: {err}");
    }
    let mut opts = ConnectOptions::new("x", "d", "web");
    opts.token = None;
    assert_eq!(TerminalClient::connect_with(&url, &opts).unwrap_err().status(), Some(401));
    // A well-signed token that has expired.
    let claims = ether_engine::auth::Claims { sub: "alice".into(), exp: 1, iat: 0, iat_ms: None, device: None };
    let expired = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(node.jwt_secret.as_bytes()),
    )
    .unwrap();
    assert_eq!(TerminalClient::connect(&url, &expired, "d", "web").unwrap_err().status(), Some(401));
    // The token in the Authorization header works like the query.
    let (_, w) = TerminalClient::connect_with_header_token(&url, &node.token("alice"), "d", "web").unwrap();
    assert_eq!(w.user, "alice");
}

#[test]
fn single_chat_reaches_every_terminal_of_both_users() {
    let node = TestNode::start();
    let mut bob_phone = node.terminal("bob", "phone");
    let mut bob_web = node.terminal("bob", "web");
    let mut alice_desk = node.terminal("alice", "desktop");
    let sent = node.gateway().send_message(&text("alice", "bob", "hi bob")).unwrap();
    for t in [&mut bob_phone, &mut bob_web] {
        let m = next_msg(t);
        assert_eq!((m.chat.as_str(), m.from.as_str(), m.seq), ("u:alice", "alice", 1));
        assert_eq!(m.id, sent.id);
        assert_eq!(m.body["text"], "hi bob");
        assert_eq!(m.ts, sent.ts);
    }
    let m = next_msg(&mut alice_desk);
    assert_eq!((m.chat.as_str(), m.from.as_str(), m.seq), ("u:bob", "alice", 1));
    assert_eq!(m.id, sent.id);
}

#[test]
fn three_hundred_messages_arrive_in_order_without_gaps() {
    let node = TestNode::start();
    let mut carol = node.terminal("carol", "phone");
    let gw = node.gateway();
    for i in 0..300 {
        gw.send_message(&text(&format!("sender{}", i % 7), "carol", &format!("m{i}"))).unwrap();
    }
    for i in 0..300u64 {
        let m = next_msg(&mut carol);
        assert_eq!(m.seq, i + 1, "seq without gaps");
        assert_eq!(m.body["text"], format!("m{i}"), "in send order");
        if i % 50 == 0 || i == 299 {
            carol.ack(m.seq).unwrap();
        }
    }
    assert_silent(&mut carol, Duration::from_millis(200));
}

#[test]
fn batch_keeps_order_and_reports_bad_items() {
    let node = TestNode::start();
    let mut dan = node.terminal("dan", "phone");
    let mut msgs: Vec<_> = (0..20).map(|i| text("eve", "dan", &format!("b{i}"))).collect();
    msgs[5].body = serde_json::json!({"txt": "typo"});
    let results = node.gateway().send_batch(&msgs).unwrap().results;
    assert_eq!(results.len(), 20);
    match &results[5] {
        ether_proto::api::BatchResult::Failed { error } => {
            assert_eq!(error.code, ether_proto::ErrorCode::InvalidBody);
            assert!(error.message.starts_with("messages[5].body"), "{}", error.message);
        }
        other => panic!("item 5 should fail, got {other:?}"),
    }
    let mut expected = (0..20).filter(|i| *i != 5);
    for seq in 1..=19 {
        let m = next_msg(&mut dan);
        assert_eq!(m.seq, seq);
        assert_eq!(m.body["text"], format!("b{}", expected.next().unwrap()));
    }
}

#[test]
fn same_device_replaces_the_old_connection() {
    let node = TestNode::start();
    let mut old = node.terminal("fay", "phone");
    let mut new = node.terminal("fay", "phone");
    match old.recv(WAIT).unwrap() {
        Some(ServerFrame::Kicked { reason }) => assert_eq!(reason, "replaced"),
        other => panic!("expected kicked, got {other:?}"),
    }
    match old.recv(WAIT) {
        Err(SdkError::Closed { code, .. }) => assert_eq!(code, Some(4001)),
        other => panic!("expected close 4001, got {other:?}"),
    }
    node.gateway().send_message(&text("gus", "fay", "to the new one")).unwrap();
    assert_eq!(next_msg(&mut new).body["text"], "to the new one");
    let p = node.gateway().presence("fay").unwrap();
    assert_eq!(p.terminals.len(), 1);
}

#[test]
fn terminal_cap_per_user_is_enforced() {
    let node = TestNode::start(); // test_min: 3 terminals per user
    let _a = node.terminal("hal", "a");
    let _b = node.terminal("hal", "b");
    let _c = node.terminal("hal", "c");
    let err = TerminalClient::connect(&node.ws_url(), &node.token("hal"), "d", "web").unwrap_err();
    assert_eq!(err.status(), Some(403));
    // Replacing an existing device is still allowed.
    let _c2 = node.terminal("hal", "c");
}

#[test]
fn presence_and_kick() {
    let node = TestNode::start();
    let gw = node.gateway();
    assert!(!gw.presence("ivy").unwrap().online);
    let mut phone = node.terminal("ivy", "phone");
    let mut web = node.terminal("ivy", "web");
    let p = gw.presence("ivy").unwrap();
    assert!(p.online);
    let mut devices: Vec<_> = p.terminals.iter().map(|t| t.device.clone()).collect();
    devices.sort();
    assert_eq!(devices, ["phone", "web"]);
    assert_eq!(p.terminals[0].platform, "web");
    let k =
        gw.kick("ivy", Kick { device: Some("phone".into()), reason: Some("security".into()), revoke: false }).unwrap();
    assert_eq!(k.kicked, 1);
    match phone.recv(WAIT).unwrap() {
        Some(ServerFrame::Kicked { reason }) => assert_eq!(reason, "security"),
        other => panic!("expected kicked, got {other:?}"),
    }
    assert!(matches!(phone.recv(WAIT), Err(SdkError::Closed { code: Some(4001), .. })));
    assert_silent(&mut web, Duration::from_millis(100));
    let k = gw.kick("ivy", Kick::default()).unwrap();
    assert_eq!(k.kicked, 1);
    assert!(matches!(web.recv(WAIT).unwrap(), Some(ServerFrame::Kicked { .. })));
    std::thread::sleep(Duration::from_millis(100));
    assert!(!gw.presence("ivy").unwrap().online);
}

#[test]
fn broadcast_reaches_every_online_terminal() {
    let node = TestNode::start();
    let mut terminals: Vec<_> = (0..6).map(|i| node.terminal(&format!("user{i}"), "d")).collect();
    let r = node
        .gateway()
        .broadcast(&Broadcast { kind: ether_proto::Kind::Text, body: serde_json::json!({"text": "maintenance at 5"}) })
        .unwrap();
    assert_eq!(r.terminals, 6);
    for t in &mut terminals {
        let m = next_msg(t);
        assert_eq!(m.body["text"], "maintenance at 5");
        assert_eq!(m.chat, "broadcast");
        assert_eq!((m.id.as_str(), m.seq), (r.id.as_str(), 0));
    }
    // Terminals dedupe by id: a second broadcast must not look like the first.
    let again = node
        .gateway()
        .broadcast(&Broadcast { kind: ether_proto::Kind::Text, body: serde_json::json!({"text": "moved to 6"}) })
        .unwrap();
    assert_ne!(again.id, r.id, "every broadcast has an id of its own");
    assert!(again.id.parse::<u64>().unwrap() > r.id.parse::<u64>().unwrap(), "time-ordered");
    for t in &mut terminals {
        assert_eq!(next_msg(t).id, again.id);
    }
}

#[test]
fn tokens_from_the_api_open_terminals() {
    let node = TestNode::start();
    let gw = node.gateway();
    let t = gw.token(TokenRequest { user: "jay".into(), ttl_s: Some(60), device: Some("tab".into()) }).unwrap();
    let (_, w) = TerminalClient::connect(&node.ws_url(), &t.token, "tab", "ios").unwrap();
    assert_eq!((w.user.as_str(), w.device.as_str()), ("jay", "tab"));
    // A device-bound token does not open another device.
    assert_eq!(TerminalClient::connect(&node.ws_url(), &t.token, "other", "ios").unwrap_err().status(), Some(401));
    let err = gw.token(TokenRequest { user: "bad user".into(), ttl_s: None, device: None }).unwrap_err();
    assert_eq!(err.status(), Some(400));
}

#[test]
fn terminals_ping_and_send() {
    let node = TestNode::start();
    let mut kim = node.terminal("kim", "phone");
    let mut lee = node.terminal("lee", "phone");
    kim.ping().unwrap();
    assert_eq!(kim.recv(WAIT).unwrap(), Some(ServerFrame::Pong));
    kim.send_frame(&ether_proto::ClientFrame::Send {
        cid: "c-1".into(),
        to: Some("lee".into()),
        group: None,
        kind: ether_proto::Kind::Text,
        body: serde_json::json!({"text": "yo"}),
    })
    .unwrap();
    let m = next_msg(&mut lee);
    assert_eq!((m.from.as_str(), m.chat.as_str(), m.cid.as_deref()), ("kim", "u:kim", Some("c-1")));
    // Kim gets her own copy (multi-device sync) and the `sent` answer, in either order.
    let mut got_sent = false;
    let mut got_copy = false;
    for _ in 0..2 {
        match kim.recv(WAIT).unwrap() {
            Some(ServerFrame::Sent { cid, id, seq, .. }) => {
                assert_eq!((cid.as_str(), id.as_str(), seq), ("c-1", m.id.as_str(), 1));
                got_sent = true;
            }
            Some(ServerFrame::Msg(copy)) => {
                assert_eq!((copy.chat.as_str(), copy.id.as_str()), ("u:lee", m.id.as_str()));
                got_copy = true;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(got_sent && got_copy);
}

#[test]
fn idle_terminals_are_closed() {
    let node = TestNode::with(|c| {
        c.limits.idle_timeout = Duration::from_millis(1500);
        c.limits.heartbeat_s = 1;
    });
    let mut quiet = node.terminal("moe", "phone");
    let mut chatty = node.terminal("ned", "phone");
    let started = std::time::Instant::now();
    loop {
        chatty.ping().unwrap();
        assert_eq!(chatty.recv(WAIT).unwrap(), Some(ServerFrame::Pong));
        match quiet.recv(Duration::from_millis(300)) {
            Ok(None) => {}
            Err(SdkError::Closed { code, .. }) => {
                assert_eq!(code, Some(4003));
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(10), "idle terminal never closed");
    }
    // The chatty one is still served.
    chatty.ping().unwrap();
    assert_eq!(chatty.recv(WAIT).unwrap(), Some(ServerFrame::Pong));
}

/// A terminal whose only traffic is WebSocket ping control frames (API.md: they count as
/// heartbeats) outlives the idle timeout, gets its pongs, and still receives messages.
#[test]
fn websocket_pings_are_heartbeats_too() {
    let node = TestNode::with(|c| {
        c.limits.idle_timeout = Duration::from_millis(1500);
        c.limits.heartbeat_s = 1;
    });
    let mut pinger = node.terminal("pia", "phone");
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(4) {
        pinger.ws_ping(b"hb").unwrap();
        // Pongs are skipped by recv; a close would be an error here.
        assert_eq!(pinger.recv(Duration::from_millis(300)).unwrap(), None, "nothing else arrives");
    }
    let sent = node.gateway().send_message(&text("max", "pia", "still here")).unwrap();
    assert_eq!(next_msg(&mut pinger).id, sent.id, "served past the idle timeout");
}

/// With `terminal.send_enabled = false` only the business API sends: a terminal's `send` is
/// refused `forbidden` (referring to its cid), nothing is stored or delivered, and the
/// connection stays.
#[test]
fn terminal_sends_can_be_turned_off() {
    let node = TestNode::with(|c| c.terminal_send_enabled = false);
    let mut sender = node.terminal("sid", "phone");
    let mut peer = node.terminal("pam", "phone");
    sender.send("c-1", "pam", ether_proto::Kind::Text, serde_json::json!({"text": "may I?"})).unwrap();
    match sender.recv(WAIT).unwrap() {
        Some(ServerFrame::Error { code, reference, .. }) => {
            assert_eq!((code, reference.as_deref()), (ether_proto::ErrorCode::Forbidden, Some("c-1")))
        }
        other => panic!("expected a forbidden error, got {other:?}"),
    }
    assert_eq!(peer.recv(Duration::from_millis(300)).unwrap(), None, "nothing delivered");
    let page = node.gateway().request("GET", "/v1/users/pam/messages", None).unwrap();
    assert_eq!(page.status, 200, "{}", page.text());
    assert!(!page.text().contains("may I?"), "nothing stored: {}", page.text());
    // Refused sends are answers, not protocol violations: many more than
    // limits.protocol_violations_max leave the terminal connected.
    let max = node.config.limits.protocol_violations_max;
    for i in 0..max + 5 {
        let cid = format!("again-{i}");
        sender.send(&cid, "pam", ether_proto::Kind::Text, serde_json::json!({"text": "please"})).unwrap();
        match sender.recv(WAIT).unwrap() {
            Some(ServerFrame::Error { code, reference, .. }) => {
                assert_eq!((code, reference.as_deref()), (ether_proto::ErrorCode::Forbidden, Some(cid.as_str())))
            }
            other => panic!("expected a forbidden error, got {other:?}"),
        }
    }
    // Still connected and served.
    sender.ping().unwrap();
    assert_eq!(sender.recv(WAIT).unwrap(), Some(ServerFrame::Pong));
}

#[test]
fn unacked_messages_are_resent_until_acked() {
    let node = TestNode::with(|c| c.limits.resend_timeout = Duration::from_millis(250));
    let mut ann = node.terminal("ann", "phone");
    let mut other = node.terminal("ann", "web");
    let sent = node.gateway().send_message(&text("bo", "ann", "are you there")).unwrap();
    // The web terminal acks at once.
    let m = next_msg(&mut other);
    other.ack(m.seq).unwrap();
    let first = next_msg(&mut ann);
    assert_eq!(first.id, sent.id);
    // The phone does not ack: the same message comes again (same id and seq).
    let again = next_msg(&mut ann);
    assert_eq!((again.id.as_str(), again.seq), (first.id.as_str(), first.seq));
    ann.ack(again.seq).unwrap();
    // The web terminal, which acked, is never resent anything.
    assert_silent(&mut other, Duration::from_millis(800));
    // After the ack the phone hears nothing more.
    assert_silent(&mut ann, Duration::from_millis(800));
}

#[test]
fn resends_stop_after_the_attempt_limit() {
    let node = TestNode::with(|c| {
        c.limits.resend_timeout = Duration::from_millis(250);
        c.limits.resend_attempts_max = 2;
        c.limits.idle_timeout = Duration::from_secs(30);
    });
    let mut t = node.terminal("cy", "phone");
    node.gateway().send_message(&text("di", "cy", "x")).unwrap();
    let first = next_msg(&mut t);
    let mut copies = 1;
    while let Some(f) = t.recv(Duration::from_millis(2500)).unwrap() {
        match f {
            ServerFrame::Msg(m) => {
                assert_eq!(m.id, first.id);
                copies += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(copies, 3, "the push and two resends, then left to sync");
}

#[test]
fn a_terminal_that_acks_late_but_steadily_is_not_sent_its_messages_twice() {
    // Every ack comes 600 ms after its message, past the 250 ms resend timeout: a slow link,
    // or a node behind under load. Before any ack the node knows nothing of the terminal, so
    // what comes due then is resent by the configured timeout (how many times depends on how
    // late the first ack lands: on a loaded CI machine it came 250 ms later than planned).
    // Once acks arrive, the terminal's own ack times (and acks that keep moving) hold resends
    // back: everything pushed from 1 s on (400 ms after the first ack) comes exactly once.
    let node = TestNode::with(|c| {
        c.limits.resend_timeout = Duration::from_millis(250);
        c.limits.resend_attempts_max = 3;
        c.limits.idle_timeout = Duration::from_secs(30);
    });
    let mut t = node.terminal("eve", "phone");
    let gw = node.gateway();
    const COUNT: usize = 20;
    const ACK_AFTER: Duration = Duration::from_millis(600);
    let mut pending: std::collections::VecDeque<(u64, std::time::Instant)> = Default::default();
    let mut seen = std::collections::BTreeMap::<u64, usize>::new();
    let mut sent = 0;
    let mut next_send = std::time::Instant::now();
    let started = std::time::Instant::now();
    loop {
        let now = std::time::Instant::now();
        if sent < COUNT && now >= next_send {
            gw.send_message(&text("fay", "eve", &format!("m{sent}"))).unwrap();
            sent += 1;
            next_send = now + Duration::from_millis(100);
        }
        while pending.front().is_some_and(|(_, at)| *at <= now) {
            let (seq, _) = pending.pop_front().unwrap();
            t.ack(seq).unwrap();
        }
        let all_in = seen.len() == COUNT && pending.is_empty();
        if all_in && now.duration_since(started) > Duration::from_secs(5) {
            break;
        }
        assert!(now.duration_since(started) < Duration::from_secs(30), "messages missing: {seen:?}");
        if let Some(f) = t.recv(Duration::from_millis(20)).unwrap() {
            match f {
                ServerFrame::Msg(m) => {
                    let copies = seen.entry(m.seq).or_insert(0);
                    *copies += 1;
                    if *copies == 1 {
                        pending.push_back((m.seq, std::time::Instant::now() + ACK_AFTER));
                    }
                }
                other => panic!("{other:?}"),
            }
        }
    }
    // Before its first ack (600 ms in) nothing tells the node the terminal is reading: what
    // came due by then is resent by the configured timeout and its backoff, within the attempt
    // limit. From then on its acks move and take ~600 ms, so the second half (pushed from 1 s
    // on) comes exactly once. Without ack-aware resends every message here came twice or more
    // (acked 600 ms after its push, due after 250–500 ms).
    assert_eq!(seen.len(), COUNT);
    assert!(seen.values().all(|&c| c <= 4), "more than the push and 3 resends: {seen:?}");
    let second_half: Vec<_> = seen.iter().skip(COUNT / 2).filter(|(_, &c)| c > 1).collect();
    assert!(second_half.is_empty(), "resent while the terminal's acks kept moving: {second_half:?}");
}

/// A `sync` page of big messages larger than the terminal's outbound queue bound is written at
/// the pace the terminal reads, not queued at once: the terminal gets the whole page and is
/// not closed as a slow consumer (which, on every reconnect, would never let it catch up).
#[test]
fn a_sync_page_bigger_than_the_outbound_queue_arrives_whole() {
    let node = TestNode::with(|c| {
        c.limits.outbound_queue_bytes_max = 64 * 1024;
        c.limits.sync_page_max = 500;
    });
    let gw = node.gateway();
    let big = "y".repeat(4000);
    let sent: Vec<String> =
        (0..120).map(|i| gw.send_message(&text("zed", "una", &format!("{i}:{big}"))).unwrap().id).collect();
    // 120 × ~4 KB ≈ 480 KB: one page, seven times the queue bound.
    let mut una = node.terminal("una", "phone");
    let (got, head) = sync_all(&mut una, 0);
    assert_eq!(head, 120);
    assert_eq!(got.iter().map(|m| m.id.clone()).collect::<Vec<_>>(), sent, "every message, in order");
    una.ping().unwrap();
    assert_eq!(una.recv(WAIT).unwrap(), Some(ServerFrame::Pong), "still connected");
}

/// A terminal token carrying only `iat` in seconds (as a business's own identity service
/// mints them), or no `iat` at all.
fn token_with_iat(node: &TestNode, user: &str, iat: Option<u64>) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let mut claims = serde_json::json!({"sub": user, "exp": now + 600});
    if let Some(iat) = iat {
        claims["iat"] = iat.into();
    }
    let key = jsonwebtoken::EncodingKey::from_secret(node.jwt_secret.as_bytes());
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).unwrap()
}

/// Logout, a lost phone, a banned account: a kick with `revoke` refuses the tokens already
/// issued (on that device only, when one is named), before the upgrade and after a restart;
/// tokens issued later are accepted. A token with `iat` in seconds only counts from the start
/// of its second; one without `iat` is refused once its user has a revocation.
#[test]
fn revoked_tokens_are_refused_until_new_ones_are_issued() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::in_dir(dir.path(), |_| {});
    let gw = node.gateway();
    let held = node.token("kim");
    let (mut phone, _) = TerminalClient::connect(&node.ws_url(), &held, "phone", "ios").unwrap();
    let (mut web, _) = TerminalClient::connect(&node.ws_url(), &held, "web", "web").unwrap();

    let lost = Kick { device: Some("phone".into()), reason: Some("lost phone".into()), revoke: true };
    let k = gw.kick("kim", lost).unwrap();
    assert_eq!(k.kicked, 1);
    let phone_before = k.revoked_before_ms.expect("the revocation's time");
    assert!(matches!(phone.recv(WAIT).unwrap(), Some(ServerFrame::Kicked { .. })));
    assert!(node.refuses_as_revoked(&held, "phone"), "the phone came back with the token it held");
    assert!(!node.refuses_as_revoked(&held, "tablet"), "only the phone's tokens were revoked");
    std::thread::sleep(Duration::from_millis(5));
    let (mut phone2, _) = TerminalClient::connect(&node.ws_url(), &node.token("kim"), "phone", "ios")
        .expect("a token issued after the revocation");
    assert_silent(&mut web, Duration::from_millis(50));

    // Every device: the web terminal and the new phone go; neither comes back.
    let k = gw.kick("kim", Kick { revoke: true, ..Kick::default() }).unwrap();
    assert_eq!(k.kicked, 2);
    let before = k.revoked_before_ms.expect("the revocation's time");
    assert!(before >= phone_before);
    for t in [&mut web, &mut phone2] {
        assert!(matches!(t.recv(WAIT).unwrap(), Some(ServerFrame::Kicked { .. })));
    }
    assert!(node.refuses_as_revoked(&held, "web"));
    // Seconds only: the revocation's own second is refused, the next one is not.
    let second = (before - 1) / 1000;
    assert!(node.refuses_as_revoked(&token_with_iat(&node, "kim", Some(second)), "web"));
    assert!(!node.refuses_as_revoked(&token_with_iat(&node, "kim", Some(second + 1)), "web"));
    assert!(node.refuses_as_revoked(&token_with_iat(&node, "kim", None), "web"), "no iat: no proof it is newer");
    assert!(!node.refuses_as_revoked(&token_with_iat(&node, "lee", None), "web"), "other users untouched");
    // Bad input is refused and revokes nothing.
    let r = gw.request("POST", "/v1/users/kim/kick", Some(br#"{"revoke":"yes"}"#)).unwrap();
    assert_eq!(r.status, 400, "{}", r.text());

    // The revocation outlives the node.
    node.stop();
    let node = TestNode::in_dir(dir.path(), |_| {});
    assert!(node.refuses_as_revoked(&held, "web"));
    std::thread::sleep(Duration::from_millis(5));
    assert!(!node.refuses_as_revoked(&node.token("kim"), "web"));
}

/// A `sync` page pushed after live messages (older seqs after newer ones) is forgotten by the
/// acks that cover it, whatever their order: an ack of the live message first, then one of the
/// page (below the terminal's position by then), leaves nothing to push again. The page used
/// to stay tracked behind the live message (acks forget a prefix of what was pushed) and an
/// ack at or below the position was ignored, so the whole page came again up to the attempt
/// limit, and no `message.delivered` was made for it.
#[test]
fn acks_forget_a_sync_page_pushed_after_a_live_message() {
    let node = TestNode::with(|c| c.limits.resend_timeout = Duration::from_millis(250));
    for i in 0..5 {
        node.gateway().send_message(&text("bo", "cy", &format!("stored {i}"))).unwrap();
    }
    let mut cy = node.terminal("cy", "phone");
    assert_eq!(cy.welcome().unwrap().inbox_seq, 5);
    node.gateway().send_message(&text("bo", "cy", "live")).unwrap();
    let live = next_msg(&mut cy);
    assert_eq!(live.seq, 6);
    // The position moves to 6 (everything up to 6: the terminal says so), then it syncs from 0.
    cy.ack(6).unwrap();
    cy.send_frame(&ether_proto::ClientFrame::Sync { inbox_seq: 0, groups: Default::default(), limit: None }).unwrap();
    let mut page = Vec::new();
    loop {
        match cy.recv(WAIT).unwrap() {
            Some(ServerFrame::Msg(m)) => page.push(m.seq),
            Some(ServerFrame::Synced { more: false, .. }) => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(page, [1, 2, 3, 4, 5, 6]);
    cy.ack(6).unwrap();
    // Nothing comes again: every message pushed was acked.
    assert_silent(&mut cy, Duration::from_millis(1500));
}

/// What a terminal was pushed is tracked in seq order: after a live message (seq 4) and a
/// `sync` page (1..=4) pushed behind it, an ack of 3 forgets 1..=3, and only 4 comes again.
#[test]
fn an_ack_forgets_the_sync_page_below_it_not_only_what_was_pushed_first() {
    let node = TestNode::with(|c| c.limits.resend_timeout = Duration::from_millis(250));
    for i in 0..3 {
        node.gateway().send_message(&text("bo", "dee", &format!("stored {i}"))).unwrap();
    }
    let mut dee = node.terminal("dee", "phone");
    node.gateway().send_message(&text("bo", "dee", "live")).unwrap();
    assert_eq!(next_msg(&mut dee).seq, 4);
    dee.sync(0, Default::default(), None).unwrap();
    let mut page = Vec::new();
    loop {
        match dee.recv(WAIT).unwrap() {
            Some(ServerFrame::Msg(m)) => page.push(m.seq),
            Some(ServerFrame::Synced { more: false, .. }) => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(page, [1, 2, 3, 4]);
    dee.ack(3).unwrap();
    let again = next_msg(&mut dee);
    assert_eq!(again.seq, 4, "only what the ack did not cover comes again");
    dee.ack(4).unwrap();
    assert_silent(&mut dee, Duration::from_millis(1500));
}

/// Resends wait while what was pushed is still queued unwritten: a terminal that stopped
/// reading for a moment (its kernel buffers full) is not closed as a slow consumer by the
/// node's own resends piling up copies of its backlog. It used to be: every resend round
/// queued every unacked frame again, however much of the first push was still queued.
#[test]
fn resends_do_not_overrun_the_queue_of_a_terminal_that_has_not_read_yet() {
    let node = TestNode::with(|c| {
        c.limits.resend_timeout = Duration::from_millis(250);
        c.limits.outbound_queue_bytes_max = 16 * 1024;
        c.limits.socket_send_buffer_bytes = 4096;
    });
    let s = stalled_terminal(&node, "eve");
    // About 12 KiB pushed, never read: within the 16 KiB queue bound, but twice that is not.
    let text = "x".repeat(1000);
    for _ in 0..12 {
        node.gateway().send_message(&support::text("bo", "eve", &text)).unwrap();
    }
    // Several resend rounds (250 ms, then 500 ms, 1 s).
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(slow_consumer_closes(&node), 0.0, "closed as a slow consumer by its own resends");
    drop(s);
}

/// A message bigger than a terminal's whole outbound queue bound (16 KiB in tests; a custom
/// body may hold 32 KiB) still reaches it: an empty queue takes any one frame. It used to close
/// the terminal as a slow consumer at every push and every `sync`, so its inbox never got past
/// that message.
#[test]
fn a_message_bigger_than_the_queue_bound_goes_out_alone() {
    let node = TestNode::start();
    assert_eq!(node.config.limits.outbound_queue_bytes_max, 16 * 1024);
    let mut fay = node.terminal("fay", "phone");
    let data = "y".repeat(20_000);
    let big = ether_proto::api::SendMessage {
        from: "bo".into(),
        to: "fay".into(),
        kind: ether_proto::Kind::Custom,
        body: serde_json::json!({ "data": data }),
        cid: None,
    };
    node.gateway().send_message(&big).unwrap();
    let m = next_msg(&mut fay);
    assert_eq!(m.body["data"].as_str().map(str::len), Some(20_000));
    fay.ack(m.seq).unwrap();
    node.gateway().send_message(&text("bo", "fay", "after")).unwrap();
    assert_eq!(next_msg(&mut fay).body["text"], "after");
}
