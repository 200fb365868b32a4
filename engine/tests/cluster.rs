//! Cluster mode on real nodes: a private `redis-server` (its own port and data dir, stopped at
//! the end) and two or three nodes joined through it. A message accepted on any node reaches
//! the user's terminals on every node, in seq order; a terminal that comes back on another node
//! catches up with `sync` (the store is shared); presence, kicks, groups, receipts and terminal
//! sends cross nodes. Skipped (with a line saying so) when `redis-server` is not installed.
mod support;

use std::time::Duration;

use ether_proto::frame::{Msg, ServerFrame};
use ether_proto::{ClientFrame, Kind};
use ether_store::redis::TestRedis;
use support::*;

fn cluster_node(redis: &TestRedis, id: &str) -> TestNode {
    cluster_node_with(redis, id, |_| {})
}

/// A node of the cluster at `redis` with `edit` applied to its test configuration.
fn cluster_node_with(redis: &TestRedis, id: &str, edit: impl FnOnce(&mut ether_engine::config::Config)) -> TestNode {
    let url = redis.url();
    let id = id.to_owned();
    TestNode::with(move |c| {
        c.cluster.redis_url = Some(url);
        c.node.id = id;
        edit(c);
    })
}

/// A node of the cluster at `redis` whose events go to `hook`.
fn webhook_node(redis: &TestRedis, hook: &support::webhook::Receiver, id: &str) -> TestNode {
    cluster_node_with(redis, id, |c| c.events.webhook = Some(support::webhook::webhook(hook)))
}

fn redis_or_skip() -> Option<TestRedis> {
    TestRedis::start_or_skip()
}

/// The next `n` messages of `t` (other frames skipped), acked as they come.
fn take(t: &mut ether_sdk::TerminalClient, n: usize) -> Vec<Msg> {
    let mut got = Vec::new();
    while got.len() < n {
        let m = t.recv_msg(WAIT).unwrap_or_else(|e| panic!("after {} of {n}: {e}", got.len()));
        t.ack(m.seq).unwrap();
        got.push(m);
    }
    got
}

fn texts(ms: &[Msg]) -> Vec<String> {
    ms.iter().map(|m| m.body["text"].as_str().unwrap_or("").to_owned()).collect()
}

#[test]
fn messages_reach_the_users_terminals_on_every_node_in_order() {
    let Some(redis) = redis_or_skip() else { return };
    let a = cluster_node(&redis, "node-a");
    let b = cluster_node(&redis, "node-b");
    let mut phone = b.terminal("bob", "phone");
    let mut web = a.terminal("bob", "web");
    // Accepted on A, then on B, then on both at once: one inbox written by two nodes.
    for i in 0..10 {
        a.gateway().send_message(&text("alice", "bob", &format!("a{i}"))).unwrap();
    }
    for i in 0..5 {
        b.gateway().send_message(&text("carol", "bob", &format!("b{i}"))).unwrap();
    }
    let (ga, gb) = (a.gateway(), b.gateway());
    let t = std::thread::spawn(move || {
        for i in 0..20 {
            ga.send_message(&text("alice", "bob", &format!("x{i}"))).unwrap();
        }
    });
    for i in 0..20 {
        gb.send_message(&text("carol", "bob", &format!("y{i}"))).unwrap();
    }
    t.join().unwrap();
    let on_b = take(&mut phone, 55);
    let on_a = take(&mut web, 55);
    assert_eq!(on_a, on_b, "both terminals, on two nodes, get the same messages in the same order");
    assert!(on_a.windows(2).all(|w| w[1].seq == w[0].seq + 1), "seqs without gaps or repeats");
    let texts = texts(&on_a);
    assert_eq!(
        &texts[..15],
        &["a0", "a1", "a2", "a3", "a4", "a5", "a6", "a7", "a8", "a9", "b0", "b1", "b2", "b3", "b4"]
    );
    for prefix in ["x", "y"] {
        let mine: Vec<&String> = texts.iter().filter(|t| t.starts_with(prefix)).collect();
        let expected: Vec<String> = (0..20).map(|i| format!("{prefix}{i}")).collect();
        assert_eq!(mine, expected.iter().collect::<Vec<_>>(), "each sender's order kept");
    }
    assert_silent(&mut phone, Duration::from_millis(300));
}

#[test]
fn a_terminal_comes_back_on_another_node_and_catches_up() {
    let Some(redis) = redis_or_skip() else { return };
    let a = cluster_node(&redis, "node-a");
    let b = cluster_node(&redis, "node-b");
    let mut t = a.terminal("dan", "phone");
    for i in 0..3 {
        a.gateway().send_message(&text("eve", "dan", &format!("m{i}"))).unwrap();
    }
    let first = take(&mut t, 3);
    drop(t);
    for i in 3..7 {
        b.gateway().send_message(&text("eve", "dan", &format!("m{i}"))).unwrap();
    }
    // Back on the other node: its welcome knows the head and what this device acknowledged.
    let (mut t, w) = ether_sdk::TerminalClient::connect(&b.ws_url(), &b.token("dan"), "phone", "web").unwrap();
    assert_eq!(w.inbox_seq, 7);
    let (replayed, head) = sync_all(&mut t, first[2].seq);
    assert_eq!(texts(&replayed), ["m3", "m4", "m5", "m6"]);
    assert_eq!(head, 7);
    // History on any node sees everything.
    let r = a.gateway().request("GET", "/v1/users/dan/messages?limit=50", None).unwrap();
    let n = serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["messages"].as_array().unwrap().len();
    assert_eq!(n, 7);
}

/// Waits until presence asked on `node` lists `user`'s `device` (presence writes are async).
fn wait_for_presence(node: &TestNode, user: &str, device: &str) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let p = node.gateway().request("GET", &format!("/v1/users/{user}/presence"), None).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&p.body).unwrap();
        if v["terminals"].as_array().is_some_and(|ts| ts.iter().any(|t| t["device"] == device)) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{user}/{device} never listed: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_replaced_connection_leaves_the_device_online_in_cluster_presence() {
    let Some(redis) = redis_or_skip() else { return };
    let a = cluster_node(&redis, "node-a");
    let b = cluster_node(&redis, "node-b");
    let mut old = b.terminal("ivy", "phone");
    let _new = b.terminal("ivy", "phone");
    assert!(matches!(
        old.recv_until(|f| matches!(f, ServerFrame::Kicked { .. }), WAIT),
        Ok(ServerFrame::Kicked { .. })
    ));
    std::thread::sleep(Duration::from_millis(300)); // the old connection's close reaches Redis
    let p = a.gateway().request("GET", "/v1/users/ivy/presence", None).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&p.body).unwrap();
    assert_eq!(v["online"], true, "the new connection is still online: {v}");
    assert_eq!(v["terminals"][0]["device"], "phone", "{v}");
}

/// API.md: a new connection with the same `(user, device)` replaces the old one, wherever it
/// is: a phone that reconnects through another node kicks its old connection there
/// (`kicked {reason:"replaced"}`, close 4001), the new one stays, and presence lists the
/// device once, on the new node.
#[test]
fn a_device_connecting_on_another_node_replaces_its_old_connection_there() {
    let Some(redis) = redis_or_skip() else { return };
    let a = cluster_node(&redis, "node-a");
    let b = cluster_node(&redis, "node-b");
    let mut old = a.terminal("rex", "phone");
    let _desk = a.terminal("rex", "desk");
    wait_for_presence(&b, "rex", "phone");
    std::thread::sleep(Duration::from_millis(20)); // a later connection, by the clock
    let mut new = b.terminal("rex", "phone");
    match old.recv_until(|f| matches!(f, ServerFrame::Kicked { .. }), WAIT) {
        Ok(ServerFrame::Kicked { reason }) => assert_eq!(reason, "replaced"),
        other => panic!("the old connection on node A was not replaced: {other:?}"),
    }
    match old.recv(WAIT) {
        Err(ether_sdk::SdkError::Closed { code, .. }) => assert_eq!(code, Some(4001)),
        other => panic!("expected close 4001, got {other:?}"),
    }
    new.ping().unwrap();
    assert_eq!(new.recv(WAIT).unwrap(), Some(ServerFrame::Pong), "the new connection stays");
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let p = b.gateway().request("GET", "/v1/users/rex/presence", None).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&p.body).unwrap();
        let phones: Vec<&serde_json::Value> =
            v["terminals"].as_array().unwrap().iter().filter(|t| t["device"] == "phone").collect();
        let desks = v["terminals"].as_array().unwrap().iter().filter(|t| t["device"] == "desk").count();
        if phones.len() == 1 && phones[0]["node"] == "node-b" {
            assert_eq!(desks, 1, "the other device on node A is untouched: {v}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the phone is listed {} times: {v}", phones.len());
        std::thread::sleep(Duration::from_millis(50));
    }
    // A message reaches the phone once, on its new connection.
    let sent = a.gateway().send_message(&text("max", "rex", "to the phone")).unwrap();
    assert_eq!(new.recv_msg(WAIT).unwrap().id, sent.id);
}

#[test]
fn presence_kicks_groups_sends_and_receipts_cross_nodes() {
    let Some(redis) = redis_or_skip() else { return };
    let a = cluster_node(&redis, "node-a");
    let b = cluster_node(&redis, "node-b");
    let mut bob = b.terminal("bob", "phone");
    let mut carol = a.terminal("carol", "web");

    // Presence asked on A lists bob's terminal on B.
    let p = a.gateway().request("GET", "/v1/users/bob/presence", None).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&p.body).unwrap();
    assert_eq!(v["online"], true, "{v}");
    assert_eq!(v["terminals"][0]["node"], "node-b", "{v}");

    // A group made on A; a message to it from A's API reaches members on both nodes.
    a.gateway().create_group(Some("crew"), "Crew", "carol", &["bob"]).unwrap();
    std::thread::sleep(Duration::from_millis(200)); // membership crosses the bus
    a.gateway().send_group_message("crew", "carol", Kind::Text, &serde_json::json!({"text": "hi crew"}), None).unwrap();
    for t in [&mut bob, &mut carol] {
        let m = t.recv_msg(WAIT).unwrap();
        assert_eq!((m.chat.as_str(), m.body["text"].as_str()), ("g:crew", Some("hi crew")));
    }

    // A terminal on B sends to a user on A; the reader's receipt comes back across.
    bob.send_text("c1", "carol", "from b").unwrap();
    let m = carol.recv_until(|f| matches!(f, ServerFrame::Msg(m) if m.chat == "u:bob"), WAIT).unwrap();
    let ServerFrame::Msg(m) = m else { unreachable!() };
    assert_eq!(m.body["text"], "from b");
    carol.send_frame(&ClientFrame::Read { chat: "u:bob".into(), seq: m.seq }).unwrap();
    match bob.recv_until(|f| matches!(f, ServerFrame::Receipt { .. }), WAIT).unwrap() {
        ServerFrame::Receipt { by, up_to, .. } => assert_eq!((by.as_str(), up_to.as_str()), ("carol", m.id.as_str())),
        other => panic!("{other:?}"),
    }

    // A kick asked on A reaches bob's terminals on both nodes, and counts them both.
    let mut bob_web = a.terminal("bob", "web");
    let r = a.gateway().request("POST", "/v1/users/bob/kick", Some(br#"{"reason":"bye"}"#)).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), r#"{"kicked":2}"#);
    for (t, on) in [(&mut bob, "B"), (&mut bob_web, "A")] {
        match t.recv_until(|f| matches!(f, ServerFrame::Kicked { .. }), WAIT) {
            Ok(ServerFrame::Kicked { reason }) => assert_eq!(reason, "bye"),
            other => panic!("no kick on node {on}: {other:?}"),
        }
    }
    // One device, on the other node: counted once; a device nobody uses: none.
    let _phone = b.terminal("bob", "phone");
    wait_for_presence(&a, "bob", "phone");
    let r = a.gateway().request("POST", "/v1/users/bob/kick", Some(br#"{"device":"phone"}"#)).unwrap();
    assert_eq!(r.text(), r#"{"kicked":1}"#);
    let r = a.gateway().request("POST", "/v1/users/bob/kick", Some(br#"{"device":"tablet"}"#)).unwrap();
    assert_eq!(r.text(), r#"{"kicked":0}"#);
}

#[test]
fn a_node_that_leaves_is_forgotten_and_readyz_reports_redis() {
    let Some(redis) = redis_or_skip() else { return };
    let a = cluster_node(&redis, "node-a");
    let b = cluster_node(&redis, "node-b");
    let _t = b.terminal("fay", "phone");
    let r = a.admin().request("GET", "/readyz", None).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    // Events go to the Redis stream `ether:events` (no webhook configured here).
    let mut con = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let entries: Vec<(String, Vec<(String, String)>)> =
            redis::cmd("XRANGE").arg("ether:events").arg("-").arg("+").query(&mut con).unwrap();
        let online = entries.iter().any(|(_, f)| {
            f.iter().any(|(k, v)| k == "type" && v == "user.online")
                && f.iter().any(|(k, v)| k == "data" && v.contains("\"fay\""))
        });
        if online {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no user.online for fay in ether:events: {entries:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    b.stop();
    // B's terminals no longer count as online anywhere (its registry key is gone).
    let p = a.gateway().request("GET", "/v1/users/fay/presence", None).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&p.body).unwrap();
    assert_eq!(v["online"], false, "{v}");
}

/// The error a node with id `id` (and `edit` applied) gets when it tries to join.
fn join_error(redis: &TestRedis, id: &str, edit: impl FnOnce(&mut ether_engine::config::Config)) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ether_engine::config::Config::test_min(dir.path().to_path_buf());
    config.cluster.redis_url = Some(redis.url());
    config.node.id = id.into();
    edit(&mut config);
    ether_engine::node::start(config).map(|_| ()).unwrap_err().to_string()
}

#[test]
fn two_live_nodes_cannot_share_a_node_id() {
    let Some(redis) = redis_or_skip() else { return };
    let _a = cluster_node(&redis, "twin");
    let err = join_error(&redis, "twin", |_| {});
    assert!(err.contains("already used by a live node"), "{err}");
}

#[test]
fn a_node_with_other_secrets_is_refused() {
    let Some(redis) = redis_or_skip() else { return };
    let _a = cluster_node(&redis, "node-a");
    let err = join_error(&redis, "node-odd", |c| {
        c.auth.api_key = ether_engine::secrets::Secret::new("another-api-key-0123456789abcdef");
    });
    assert!(err.contains("differ from the cluster"), "{err}");
}

/// `events.dispatching` of `node`'s admin stats.
fn dispatching(node: &TestNode) -> bool {
    let r = node.admin().request("GET", "/admin/v1/stats", None).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    v["events"]["dispatching"].as_bool().unwrap_or_else(|| panic!("no events in stats: {v}"))
}

#[test]
fn one_node_at_a_time_delivers_the_shared_outbox_to_the_webhook() {
    use support::webhook::{has, receiver};
    let Some(redis) = redis_or_skip() else { return };
    let hook = receiver(0);
    let node = |id: &str| webhook_node(&redis, &hook, id);
    let a = node("node-a");
    let b = node("node-b");
    // Each node announced its webhook as a digest (never the URL itself), so a node
    // configured differently can say so at start.
    let mut con = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    let announced: String = redis::cmd("GET").arg("ether:events:webhook").query(&mut con).unwrap();
    assert_eq!(announced.len(), 64, "{announced}");
    assert!(!announced.contains("127.0.0.1"));
    // Events on both nodes: terminals come and go, messages reach them or not.
    let users: Vec<String> = (0..6).map(|i| format!("u{i}")).collect();
    for (i, u) in users.iter().enumerate() {
        let on = if i % 2 == 0 { &a } else { &b };
        let mut t = on.terminal(u, "phone");
        let m = on.gateway().send_message(&text("zed", u, "hi")).unwrap();
        let got = take(&mut t, 1);
        assert_eq!(got[0].id, m.id);
        b.gateway().send_message(&text("zed", &format!("away{i}"), "unreached")).unwrap();
        t.close().unwrap();
    }
    hook.wait_for(|e| users.iter().all(|u| has(e, "user.offline", u) && has(e, "message.delivered", u)));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(hook.repeated(), vec![], "each event posted once, by one node");
    let (da, db) = (dispatching(&a), dispatching(&b));
    assert!(da != db, "exactly one node delivers: a {da}, b {db}");
    // The delivering node stops: the other takes over and delivers what comes next.
    let (stays, leaves) = if da { (b, a) } else { (a, b) };
    leaves.stop();
    let mut t = stays.terminal("late", "web");
    drop(t.close());
    hook.wait_for(|e| has(e, "user.offline", "late"));
    assert!(dispatching(&stays));
    assert_eq!(hook.repeated(), vec![], "no event posted twice across the hand-over");
}

#[test]
fn a_broadcast_reaches_and_counts_the_terminals_of_every_node() {
    let Some(redis) = redis_or_skip() else { return };
    // Terminals that stay (these do not ping; the test config drops silent ones after 3 s).
    let node = |id: &str| cluster_node_with(&redis, id, |c| c.limits.idle_timeout = Duration::from_secs(60));
    let a = node("node-a");
    let b = node("node-b");
    let _on_a: Vec<_> = (0..2).map(|i| a.terminal(&format!("ava{i}"), "phone")).collect();
    let mut on_b = b.terminal("bea", "phone");
    // Node B reports its terminals at its next heartbeat (every 3 s): until then A counts
    // fewer; the count settles at every terminal of the cluster.
    let body = br#"{"kind":"text","body":{"text":"maintenance at noon"}}"#;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = a.gateway().request("POST", "/v1/broadcast", Some(body)).unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        if v["terminals"] == 3 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the count never covered node B: {v}");
        std::thread::sleep(Duration::from_millis(250));
    }
    // And B's terminal got it.
    match on_b.recv_until(|f| matches!(f, ServerFrame::Msg(m) if m.body["text"] == "maintenance at noon"), WAIT) {
        Ok(_) => {}
        other => panic!("no broadcast on node B: {other:?}"),
    }
}

/// Entries in each of these bus streams (0 for one never written).
fn bus_lengths(redis: &TestRedis, streams: &[&str]) -> Vec<u64> {
    let mut con = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    streams.iter().map(|s| redis::cmd("XLEN").arg(format!("ether:{s}")).query(&mut con).unwrap()).collect()
}

#[test]
fn a_users_traffic_goes_only_to_the_nodes_holding_the_users_terminals() {
    let Some(redis) = redis_or_skip() else { return };
    let a = cluster_node(&redis, "node-a");
    let b = cluster_node(&redis, "node-b");
    let _c = cluster_node(&redis, "node-c");
    let streams = ["bus", "bus:node-a", "bus:node-b", "bus:node-c"];
    let mut fay = b.terminal("fay", "phone");
    wait_for_presence(&a, "fay", "phone");
    let before = bus_lengths(&redis, &streams);
    // Accepted on A for a user whose only terminal is on B: B's own stream carries it (the
    // sender, without terminals, gets no bus entry for its copy), nobody else's.
    for i in 0..5 {
        a.gateway().send_message(&text("gus", "fay", &format!("m{i}"))).unwrap();
    }
    assert_eq!(texts(&take(&mut fay, 5)), ["m0", "m1", "m2", "m3", "m4"]);
    let after = bus_lengths(&redis, &streams);
    let grew: Vec<u64> = after.iter().zip(&before).map(|(x, y)| x - y).collect();
    assert_eq!(grew, [0, 0, 5, 0], "only node B's stream, once per message ({streams:?})");
    // Accepted on B itself: delivered there, no bus entry at all.
    b.gateway().send_message(&text("gus", "fay", "local")).unwrap();
    assert_eq!(texts(&take(&mut fay, 1)), ["local"]);
    assert_eq!(bus_lengths(&redis, &streams), after);
    // The nodes count it: A published 10 routed events (fay's copies and gus's) that made 5
    // appends; B read 5 entries from its own stream and nothing from the shared one.
    let (on_a, on_b) = (cluster_stats(&a), cluster_stats(&b));
    assert_eq!((on_a["published_routed"].as_u64(), on_a["routed_appends"].as_u64()), (Some(10), Some(5)), "{on_a}");
    assert_eq!((on_b["own_entries_read"].as_u64(), on_b["shared_entries_read"].as_u64()), (Some(5), Some(0)), "{on_b}");
    assert_eq!(on_b["node_id"], "node-b");
}

/// `cluster` of `node`'s admin stats.
fn cluster_stats(node: &TestNode) -> serde_json::Value {
    let r = node.admin().request("GET", "/admin/v1/stats", None).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    v["cluster"].clone()
}

/// `user`'s phone on B, and a message to `user` accepted on A that B never hears of (A finds
/// no presence of the user's to route it to: the test removed it). Returns the phone.
fn missed_on_b(redis: &TestRedis, a: &TestNode, b: &TestNode, user: &str, body: &str) -> ether_sdk::TerminalClient {
    let mut phone = b.terminal(user, "phone");
    wait_for_presence(a, user, "phone");
    let mut con = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    redis::cmd("HDEL").arg(format!("ether:presence:{user}")).arg("node-b/phone").query::<()>(&mut con).unwrap();
    a.gateway().send_message(&text("sender", user, body)).unwrap();
    assert_silent(&mut phone, Duration::from_millis(300));
    phone
}

/// What node A puts on the shared bus once Redis takes writes again after it dropped a
/// publish: every node resyncs its terminals from the store.
fn ask_every_node_to_resync(redis: &TestRedis) {
    let mut con = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    redis::cmd("XADD")
        .arg("ether:bus")
        .arg("*")
        .arg("e")
        .arg(r#"{"node":"node-a","event":"resync"}"#)
        .query::<String>(&mut con)
        .unwrap();
}

#[test]
fn terminals_already_on_a_node_get_what_a_new_terminals_head_shows_they_missed() {
    let Some(redis) = redis_or_skip() else { return };
    let a = cluster_node(&redis, "node-a");
    let b = cluster_node(&redis, "node-b");
    // As if the bus had not brought it yet.
    let mut phone = missed_on_b(&redis, &a, &b, "hal", "while unseen");
    // Another terminal of hal's on B reads the head from the store: the phone, which would
    // otherwise skip the message when (if) the bus brought it, gets it from the store.
    let (mut web, welcome) = ether_sdk::TerminalClient::connect(&b.ws_url(), &b.token("hal"), "web", "web").unwrap();
    assert_eq!(texts(&take(&mut phone, 1)), ["while unseen"]);
    // Later messages reach both, in order, once each; the new terminal gets pushed exactly
    // what its welcome did not count.
    a.gateway().send_message(&text("ivy", "hal", "after")).unwrap();
    assert_eq!(texts(&take(&mut phone, 1)), ["after"]);
    let expected: &[&str] = if welcome.inbox_seq == 0 { &["while unseen", "after"] } else { &["after"] };
    assert_eq!(texts(&take(&mut web, expected.len())), expected, "welcome said {}", welcome.inbox_seq);
    assert_silent(&mut web, Duration::from_millis(300));
    assert_silent(&mut phone, Duration::from_millis(300));
}

#[test]
fn a_resync_asked_on_the_bus_pushes_what_the_terminals_missed() {
    let Some(redis) = redis_or_skip() else { return };
    let a = cluster_node(&redis, "node-a");
    let b = cluster_node(&redis, "node-b");
    // As if A had failed to publish it: the message is stored, B never hears of it.
    let mut phone = missed_on_b(&redis, &a, &b, "joy", "lost on the bus");
    ask_every_node_to_resync(&redis);
    assert_eq!(texts(&take(&mut phone, 1)), ["lost on the bus"]);
    assert_silent(&mut phone, Duration::from_millis(300));
    assert_eq!(cluster_stats(&b)["resyncs"], 1);
}

#[test]
fn a_resync_also_pushes_group_messages_no_node_announced() {
    let Some(redis) = redis_or_skip() else { return };
    let a = cluster_node(&redis, "node-a");
    let b = cluster_node(&redis, "node-b");
    let mut hal = b.terminal("hal", "phone");
    a.gateway().create_group(Some("crew"), "Crew", "carol", &["hal"]).unwrap();
    std::thread::sleep(Duration::from_millis(200)); // membership crosses the bus
    let post = |text: &str| {
        a.gateway()
            .send_group_message("crew", "carol", Kind::Text, &serde_json::json!({ "text": text }), None)
            .unwrap();
    };
    post("announced");
    assert_eq!(texts(&take(&mut hal, 1)), ["announced"]);
    // Written straight into the shared store: no node tells the bus.
    store_group_text_behind_the_bus(&redis.url(), "crew", "carol", "unannounced");
    assert_silent(&mut hal, Duration::from_millis(300));
    let mut con = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    let resync = r#"{"node":"node-a","event":"resync"}"#;
    redis::cmd("XADD").arg("ether:bus").arg("*").arg("e").arg(resync).query::<String>(&mut con).unwrap();
    let got = take(&mut hal, 1);
    assert_eq!((texts(&got)[0].as_str(), got[0].chat.as_str(), got[0].seq), ("unannounced", "g:crew", 2));
    // And the group goes on in order.
    post("after");
    assert_eq!(texts(&take(&mut hal, 1)), ["after"]);
    assert_silent(&mut hal, Duration::from_millis(300));
}

/// Sets the Redis user `nodeb` (node B's, in the ACL tests): everything of the engine's keys,
/// and presence keys as `presence` says (`%R~…` read only, `~…` read and write).
fn node_b_acl(con: &mut redis::Connection, presence: &str) {
    redis::cmd("ACL")
        .arg("SETUSER")
        .arg("nodeb")
        .arg("reset")
        .arg("on")
        .arg(">pw")
        .arg("+@all")
        .arg("~ether:store:*")
        .arg("~ether:bus*")
        .arg("~ether:node:*")
        .arg("~ether:idgen:*")
        .arg("~ether:secrets")
        .arg("~ether:events*")
        .arg(presence)
        .query::<()>(con)
        .unwrap();
}

/// Node B, logging in to `redis` as `nodeb` (see [`node_b_acl`]), its terminals silent-safe
/// for a minute.
fn node_b_as_acl_user(redis: &TestRedis) -> TestNode {
    let b_url = format!("redis://nodeb:pw@127.0.0.1:{}/", redis.port());
    TestNode::with(move |c| {
        c.cluster.redis_url = Some(b_url);
        c.node.id = "node-b".into();
        // The terminals stay silent for the seconds these tests take.
        c.limits.idle_timeout = Duration::from_secs(60);
    })
}

#[test]
fn a_terminal_whose_presence_writes_failed_becomes_reachable_once_redis_takes_them() {
    let Some(redis) = redis_or_skip() else { return };
    let mut con = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    // Node B's Redis user may read presence but not write it (an ACL mistake, say): every
    // write batch carrying a presence entry fails; the others go through.
    let mut acl = |presence: &str| node_b_acl(&mut con, presence);
    acl("%R~ether:presence:*");
    let a = cluster_node(&redis, "node-a");
    let b = node_b_as_acl_user(&redis);
    let mut phone = b.terminal("lea", "phone");
    std::thread::sleep(Duration::from_millis(500));
    let p = a.gateway().request("GET", "/v1/users/lea/presence", None).unwrap();
    assert!(p.text().contains("\"online\":false"), "not written yet: {}", p.text());
    // Writable again: B writes its terminals' presence again (after its next successful
    // write, within a heartbeat), so A routes lea's messages there.
    acl("~ether:presence:*");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let p = a.gateway().request("GET", "/v1/users/lea/presence", None).unwrap();
        if p.text().contains("\"online\":true") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "lea's presence never written again: {} (node B: {})",
            p.text(),
            cluster_stats(&b)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    a.gateway().send_message(&text("max", "lea", "reachable")).unwrap();
    assert_eq!(texts(&take(&mut phone, 1)), ["reachable"]);
}

#[test]
fn a_presence_removal_a_failed_write_lost_is_written_again_once_redis_takes_it() {
    let Some(redis) = redis_or_skip() else { return };
    let mut con = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    node_b_acl(&mut con, "~ether:presence:*");
    let a = cluster_node(&redis, "node-a");
    let b = node_b_as_acl_user(&redis);
    let mut phone = b.terminal("ivo", "phone");
    let _desk = b.terminal("ivo", "desk");
    wait_for_presence(&a, "ivo", "phone");
    wait_for_presence(&a, "ivo", "desk");
    let listed = |device: &str| {
        let p = a.gateway().request("GET", "/v1/users/ivo/presence", None).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&p.body).unwrap();
        v["terminals"].as_array().is_some_and(|ts| ts.iter().any(|t| t["device"] == device))
    };
    // B may no longer write presence: the phone's removal fails with its batch.
    node_b_acl(&mut con, "%R~ether:presence:*");
    phone.close().unwrap();
    let stats = || cluster_stats(&b);
    let deadline = std::time::Instant::now() + WAIT;
    while stats()["redis_errors"].as_u64() == Some(0) {
        assert!(std::time::Instant::now() < deadline, "the removal never failed: {}", stats());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(listed("phone"), "the phone's entry stays while B cannot remove it");
    // Writable again: the removal is written at B's next heartbeat; the desk, still here,
    // stays listed.
    node_b_acl(&mut con, "~ether:presence:*");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while listed("phone") {
        assert!(std::time::Instant::now() < deadline, "the phone's removal never written again: {}", stats());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(listed("desk"));
}

/// The `ether:events` entries of `kind` so far, as their `data` JSON.
fn stream_events(con: &mut redis::Connection, kind: &str) -> Vec<serde_json::Value> {
    let entries: Vec<(String, Vec<(String, String)>)> =
        redis::cmd("XRANGE").arg("ether:events").arg("-").arg("+").query(con).unwrap();
    entries
        .into_iter()
        .filter(|(_, fields)| fields.iter().any(|(k, v)| k == "type" && v == kind))
        .filter_map(|(_, fields)| fields.into_iter().find(|(k, _)| k == "data"))
        .map(|(_, data)| serde_json::from_str(&data).unwrap())
        .collect()
}

/// Events the store cannot take (here the node's Redis user may not write the events stream:
/// an ACL mistake, say; every outbox write fails) are kept on their shard and written again,
/// with a backoff, once it can: nothing is lost, and the node counts the retries.
#[test]
fn events_a_failed_write_could_not_store_are_written_once_redis_takes_them() {
    let Some(redis) = redis_or_skip() else { return };
    let mut con = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    let acl = |con: &mut redis::Connection, events: bool| {
        let mut cmd = redis::cmd("ACL");
        cmd.arg("SETUSER").arg("nodeb").arg("reset").arg("on").arg(">pw").arg("+@all");
        // The dispatcher lease (`ether:events:dispatcher`) stays writable, the stream not.
        let keys = ["~ether:store:*", "~ether:bus*", "~ether:node:*", "~ether:idgen:*", "~ether:secrets"];
        cmd.arg(&keys[..]).arg("~ether:presence:*").arg("~ether:events:*");
        if events {
            cmd.arg("~ether:events");
        }
        cmd.query::<()>(con).unwrap();
    };
    acl(&mut con, false);
    let b = node_b_as_acl_user(&redis);
    let mut phone = b.terminal("eva", "phone");
    let sent = b.gateway().send_message(&text("max", "eva", "reported")).unwrap();
    assert_eq!(texts(&take(&mut phone, 1)), ["reported"], "acked: its message.delivered is made");
    let retried = || {
        let r = b.admin().request("GET", "/admin/v1/stats", None).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        v["totals"]["events_retried"].as_u64().unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + WAIT;
    while retried() == 0 {
        assert!(std::time::Instant::now() < deadline, "no outbox write failed and was retried");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(stream_events(&mut con, "message.delivered").is_empty(), "nothing could be written yet");

    acl(&mut con, true);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let delivered = stream_events(&mut con, "message.delivered");
        let online = stream_events(&mut con, "user.online");
        if delivered.iter().any(|d| d["id"] == sent.id.as_str() && d["user"] == "eva" && d["device"] == "phone")
            && online.iter().any(|d| d["user"] == "eva")
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "events never written after Redis took writes again: delivered {delivered:?}, online {online:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Cluster mode: a shard whose last member of a group left stops following the group's seqs.
/// A user added to the group later, while online there, gets the messages from then on,
/// not the ones sent while nobody on that shard was a member pushed live as a "gap".
#[test]
fn a_member_added_while_online_gets_no_old_messages_pushed_live() {
    let Some(redis) = redis_or_skip() else { return };
    let a = cluster_node(&redis, "node-a");
    // One shard on B: both users' terminals share it.
    let b = cluster_node_with(&redis, "node-b", |c| c.node.shards = 1);
    let gw = a.gateway();
    gw.create_group(Some("stale"), "Stale", "owner", &["first"]).unwrap();
    let mut first = b.terminal("first", "phone");
    let mut later = b.terminal("later", "phone");
    std::thread::sleep(Duration::from_millis(200)); // membership crosses the bus
    let say = |text: &str| {
        gw.send_group_message("stale", "owner", Kind::Text, &serde_json::json!({ "text": text }), None).unwrap();
    };
    say("one");
    assert_eq!(texts(&take(&mut first, 1)), ["one"]);
    // The only member on B leaves; the group goes on without anyone there.
    first.close().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    for i in 0..5 {
        say(&format!("while nobody on B {i}"));
    }
    gw.add_members("stale", &["later"]).unwrap();
    std::thread::sleep(Duration::from_millis(300)); // membership crosses the bus
    say("welcome aboard");
    assert_eq!(texts(&take(&mut later, 1)), ["welcome aboard"], "the first message pushed is the new one");
    assert_eq!(later.recv(Duration::from_millis(300)).unwrap(), None, "and nothing else");
}

/// A revocation asked on one node refuses the old token on every node (the bus), including
/// a node that joins later (it reads the store's); a token issued later is good everywhere.
#[test]
fn a_token_revoked_on_one_node_is_refused_on_every_node() {
    let Some(redis) = redis_or_skip() else { return };
    let a = cluster_node(&redis, "rv-a");
    let b = cluster_node(&redis, "rv-b");
    let held = a.token("zed");
    assert!(!b.refuses_as_revoked(&held, "phone"));
    let r = a.gateway().request("POST", "/v1/users/zed/kick", Some(br#"{"revoke":true}"#)).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("revoked_before_ms"), "{}", r.text());
    assert!(a.refuses_as_revoked(&held, "phone"));
    let deadline = std::time::Instant::now() + WAIT;
    while !b.refuses_as_revoked(&held, "phone") {
        assert!(std::time::Instant::now() < deadline, "node B still takes the revoked token");
        std::thread::sleep(Duration::from_millis(20));
    }
    let c = cluster_node(&redis, "rv-c");
    assert!(c.refuses_as_revoked(&held, "phone"), "a node joining later reads the revocation from the store");
    std::thread::sleep(Duration::from_millis(5));
    let fresh = a.token("zed");
    for node in [&a, &b, &c] {
        assert!(!node.refuses_as_revoked(&fresh, "phone"));
    }
}

/// `group.unreached` from the node that accepted the message leaves out members whose
/// terminals are on another node (cluster presence), and names those offline everywhere.
#[test]
fn group_unreached_leaves_out_members_online_on_another_node() {
    let Some(redis) = redis_or_skip() else { return };
    let hook = support::webhook::receiver(0);
    let node = |id: &str| webhook_node(&redis, &hook, id);
    let a = node("gu-a");
    let b = node("gu-b");
    a.gateway().create_group(Some("pals"), "pals", "host", &["here", "there", "nowhere"]).unwrap();
    let _here = a.terminal("here", "phone");
    let _there = b.terminal("there", "phone");
    wait_for_presence(&a, "there", "phone");
    let sent =
        a.gateway().send_group_message("pals", "host", Kind::Text, &serde_json::json!({"text": "yo"}), None).unwrap();
    let all = hook.wait_for(|e| e.iter().any(|e| e["type"] == "group.unreached" && e["id"] == sent["id"]));
    let ev = all.iter().find(|e| e["type"] == "group.unreached").unwrap();
    assert_eq!(ev["users"], serde_json::json!(["nowhere"]), "{ev}");
}

/// `limits.terminals_per_user_max` counts the user's terminals on every node: with 3 (the
/// test configuration), two on node A and one on node B leave no room for a fourth device on
/// either node (403, saying why), a device already connected elsewhere may still move (its
/// old connection is replaced), and once a terminal leaves a new device gets in. Before, each
/// node counted only its own: a user could hold 3 terminals on every node.
#[test]
fn the_terminal_cap_per_user_counts_every_nodes_terminals() {
    let Some(redis) = redis_or_skip() else { return };
    let a = cluster_node(&redis, "node-a");
    let b = cluster_node(&redis, "node-b");
    assert_eq!(a.config.limits.terminals_per_user_max, 3);
    let phone = a.terminal("hal", "phone");
    let _web = a.terminal("hal", "web");
    let mut desk = b.terminal("hal", "desk");
    for device in ["phone", "web", "desk"] {
        wait_for_presence(&a, "hal", device);
        wait_for_presence(&b, "hal", device);
    }
    for node in [&a, &b] {
        match ether_sdk::TerminalClient::connect(&node.ws_url(), &node.token("hal"), "tablet", "ios") {
            Err(ether_sdk::SdkError::Rejected { status: 403, message }) => {
                assert!(message.contains("terminals_per_user_max"), "{message}")
            }
            Err(e) => panic!("refused, but not for the cap: {e}"),
            Ok(_) => panic!("a fourth device got in: 2 on node A, 1 on node B"),
        }
    }
    // The desk moves from node B to node A: not a fourth device.
    let _desk_on_a = a.terminal("hal", "desk");
    match desk.recv_until(|f| matches!(f, ServerFrame::Kicked { .. }), WAIT) {
        Ok(ServerFrame::Kicked { reason }) => assert_eq!(reason, "replaced"),
        other => panic!("the desk's old connection on node B was not replaced: {other:?}"),
    }
    // The phone leaves: room for the tablet, on node B.
    drop(phone);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        match ether_sdk::TerminalClient::connect(&b.ws_url(), &b.token("hal"), "tablet", "ios") {
            Ok(_) => break,
            Err(ether_sdk::SdkError::Rejected { status: 403, .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50)); // the phone's close reaches Redis
            }
            Err(e) => panic!("the tablet was refused after the phone left: {e}"),
        }
    }
}

/// What a node fills in from the store for its terminals (here after a resync: the bus lost
/// eight big messages) is pushed at the pace the terminal reads, as a `sync` page is: the
/// test node's outbound queue holds 16 KiB and the eight messages 25 KiB, which pushed at
/// once closed the phone as a slow consumer (again at every such fill) though it was reading.
#[test]
fn a_fill_of_big_missed_messages_is_paced_not_a_slow_consumer_close() {
    let Some(redis) = redis_or_skip() else { return };
    let a = cluster_node(&redis, "node-a");
    let b = cluster_node(&redis, "node-b");
    assert_eq!(b.config.limits.outbound_queue_bytes_max, 16 * 1024);
    let big = |n: usize| format!("{n}:{}", "x".repeat(3200));
    let mut phone = missed_on_b(&redis, &a, &b, "kim", &big(0));
    for n in 1..8 {
        a.gateway().send_message(&text("sender", "kim", &big(n))).unwrap();
    }
    ask_every_node_to_resync(&redis);
    let got = take(&mut phone, 8);
    assert_eq!(texts(&got), (0..8).map(big).collect::<Vec<_>>());
    assert_silent(&mut phone, Duration::from_millis(300));
}

/// A `sync` answered from the store does not stand for what the user's other terminals on the
/// node were pushed: here the bus lost a message for both of jo's terminals on B, the phone
/// got it by `sync`, and the web terminal still gets it (at the resync). The sync used to raise
/// the node's inbox position for the user to the store's head, so the web terminal never got
/// the message while connected (not pushed, not tracked, and no gap seen after it).
#[test]
fn a_sync_by_one_terminal_does_not_hide_a_missed_message_from_the_others() {
    let Some(redis) = redis_or_skip() else { return };
    let a = cluster_node(&redis, "node-a");
    let b = cluster_node(&redis, "node-b");
    let mut web = b.terminal("jo", "web");
    let mut phone = b.terminal("jo", "phone");
    wait_for_presence(&a, "jo", "web");
    wait_for_presence(&a, "jo", "phone");
    // As if the bus lost it: A does not know jo is on B.
    let mut con = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    redis::cmd("HDEL").arg("ether:presence:jo").arg("node-b/phone").arg("node-b/web").query::<()>(&mut con).unwrap();
    a.gateway().send_message(&text("sender", "jo", "while unseen")).unwrap();
    assert_silent(&mut web, Duration::from_millis(300));
    assert_silent(&mut phone, Duration::from_millis(10));
    phone.sync(0, Default::default(), None).unwrap();
    match phone.recv(WAIT).unwrap() {
        Some(ServerFrame::Msg(m)) => assert_eq!(m.body["text"], "while unseen"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(phone.recv(WAIT).unwrap(), Some(ServerFrame::Synced { more: false, .. })));
    ask_every_node_to_resync(&redis);
    assert_eq!(texts(&take(&mut web, 1)), ["while unseen"]);
}

/// A Redis that stops answering (paused here: connections open, nothing answered, as when
/// it hangs or a failover leaves the old address dropping packets) must not hold up what the
/// node answers from the out thread: presence is answered within the out thread's I/O
/// timeout, with the terminals this node has. Before, the out thread waited for Redis without
/// a bound, and with it every presence lookup (and kick, broadcast, new terminal).
#[test]
fn presence_is_answered_while_redis_hangs() {
    let Some(redis) = redis_or_skip() else { return };
    let a = cluster_node(&redis, "node-a");
    let b = cluster_node(&redis, "node-b");
    let _phone = b.terminal("kim", "phone");
    let _web = a.terminal("kim", "web");
    wait_for_presence(&a, "kim", "phone");
    let paused = redis.pause();
    let gateway = a.gateway().with_timeout(Duration::from_secs(120));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(gateway.request("GET", "/v1/users/kim/presence", None));
    });
    let answer = rx.recv_timeout(Duration::from_secs(20));
    drop(paused);
    let r = answer.expect("no presence answer while Redis hangs").unwrap();
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["online"], true, "{v}");
    assert!(v["terminals"].as_array().unwrap().iter().any(|t| t["device"] == "web"), "{v}");
}

/// A node whose registry entry lapsed (cut off from Redis for longer than its TTL while the
/// other nodes were not; here its key is deleted) was taken for dead: the others routed its
/// users' messages nowhere. Once its heartbeat finds the entry gone it checks its users
/// against the store, so its terminals get what they missed without waiting for another
/// message. Before, they got nothing until the next message or a `sync`.
#[test]
fn a_node_whose_registry_entry_lapsed_catches_its_terminals_up() {
    let Some(redis) = redis_or_skip() else { return };
    let a = cluster_node(&redis, "node-a");
    let b = cluster_node(&redis, "node-b");
    let mut phone = a.terminal("lou", "phone");
    wait_for_presence(&b, "lou", "phone");
    let mut con = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    redis::cmd("DEL").arg("ether:node:node-a").query::<()>(&mut con).unwrap();
    // Taken for dead, its terminals' presence goes when another node looks at it.
    let p = b.gateway().request("GET", "/v1/users/lou/presence", None).unwrap();
    assert!(String::from_utf8_lossy(&p.body).contains(r#""terminals":[]"#), "{}", String::from_utf8_lossy(&p.body));
    let left: Vec<String> = redis::cmd("HKEYS").arg("ether:presence:lou").query(&mut con).unwrap();
    assert!(left.is_empty(), "a dead node's entry is removed when looked at: {left:?}");
    b.gateway().send_message(&text("meg", "lou", "while you were away")).unwrap();
    let m = phone.recv_msg(Duration::from_secs(12)).expect("the message committed on B never reached A's terminal");
    assert_eq!(texts(&[m]), ["while you were away"]);
    // Back, A writes its terminals' presence again: B routes to it and lists the phone.
    wait_for_presence(&b, "lou", "phone");
    b.gateway().send_message(&text("meg", "lou", "and now")).unwrap();
    let m = phone.recv_msg(Duration::from_secs(12)).expect("routed to A again");
    assert_eq!(texts(&[m]), ["and now"]);
}

/// Presence entries of a node that died and never came back (killed; with node ids that
/// change at every start, as pods have, it never does) are removed once looked at. Before,
/// they piled up in the user's presence hash, each costing every later lookup a registry read.
#[test]
fn presence_entries_of_a_node_that_never_comes_back_are_removed() {
    let Some(redis) = redis_or_skip() else { return };
    let mut con = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    redis::cmd("HSET")
        .arg("ether:presence:zed")
        .arg("pod-7f9c/tablet")
        .arg(r#"{"platform":"ios","since":1000,"node_started":900}"#)
        .query::<()>(&mut con)
        .unwrap();
    let a = cluster_node(&redis, "node-a");
    let p = a.gateway().request("GET", "/v1/users/zed/presence", None).unwrap();
    assert!(String::from_utf8_lossy(&p.body).contains(r#""terminals":[]"#), "{}", String::from_utf8_lossy(&p.body));
    let left: Vec<String> = redis::cmd("HKEYS").arg("ether:presence:zed").query(&mut con).unwrap();
    assert!(left.is_empty(), "{left:?}");
}

/// A node killed with terminals connected leaves their presence entries in Redis; when it
/// comes back under the same id they are not its terminals: presence does not list them and
/// `limits.terminals_per_user_max` (3 here) does not count them. Before, three such entries
/// kept the user out of every node (403) and presence reported them online (so no
/// `message.unreached`, the mobile push hook, for them either).
#[test]
fn terminals_a_node_had_before_it_was_killed_do_not_count_after_it_restarts() {
    let Some(redis) = redis_or_skip() else { return };
    let mut con = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    // What node B's previous run left behind: entries of this version and of older ones.
    for (device, value) in [
        ("tablet", r#"{"platform":"ios","since":1000,"node_started":900}"#),
        ("desk", r#"{"platform":"desktop","since":1000}"#),
        ("tv", r#"{"platform":"other","since":1200,"node_started":900}"#),
    ] {
        redis::cmd("HSET")
            .arg("ether:presence:max")
            .arg(format!("node-b/{device}"))
            .arg(value)
            .query::<()>(&mut con)
            .unwrap();
    }
    let a = cluster_node(&redis, "node-a");
    let b = cluster_node(&redis, "node-b");
    let _phone = a.terminal("max", "phone");
    let _web = b.terminal("max", "web");
    wait_for_presence(&a, "max", "web");
    let p = a.gateway().request("GET", "/v1/users/max/presence", None).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&p.body).unwrap();
    let mut devices: Vec<&str> =
        v["terminals"].as_array().unwrap().iter().map(|t| t["device"].as_str().unwrap()).collect();
    devices.sort_unstable();
    assert_eq!(devices, ["phone", "web"], "{v}");
    // Entries of an earlier run that name it are removed once looked at.
    let left: Vec<String> = redis::cmd("HKEYS").arg("ether:presence:max").query(&mut con).unwrap();
    assert!(!left.iter().any(|f| f == "node-b/tablet" || f == "node-b/tv"), "{left:?}");
}

/// The slot (`IdGen`'s generator field) a message id was made with.
fn id_slot(id: &str) -> u64 {
    (id.parse::<u64>().unwrap() >> 14) & 63
}

fn idgen_holder(con: &mut redis::Connection, slot: u64) -> Option<String> {
    redis::cmd("GET").arg(format!("ether:idgen:{slot}")).query(con).unwrap()
}

/// Waits until `node`'s stats count `n` id-generator slots lost to other nodes.
fn wait_for_slots_lost(node: &TestNode, n: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let lost = cluster_stats(node)["idgen_slots_lost"].as_u64();
        if lost == Some(n) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "idgen_slots_lost is {lost:?}, never {n}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A node cut off from Redis longer than its TTL loses its id-generator leases; a node that
/// joins meanwhile claims those slots (here: A's keys deleted, then C starts and takes them).
/// A's next heartbeat finds them held by C: it leaves them to C and moves its shards to free
/// slots, so the ids both nodes make stay distinct. Before, A's heartbeat overwrote C's leases
/// and both made ids with the same slots (the second of two ids made in the same millisecond
/// refused as `conflict: message id exists`, or worse).
#[test]
fn a_node_whose_id_leases_lapsed_moves_to_free_slots_and_ids_stay_unique() {
    let Some(redis) = redis_or_skip() else { return };
    let mut con = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    let a = cluster_node(&redis, "node-a");
    assert_eq!(idgen_holder(&mut con, 0).as_deref(), Some("node-a"));
    assert_eq!(idgen_holder(&mut con, 1).as_deref(), Some("node-a"));
    for key in ["ether:node:node-a", "ether:idgen:0", "ether:idgen:1"] {
        redis::cmd("DEL").arg(key).query::<()>(&mut con).unwrap();
    }
    let c = cluster_node(&redis, "node-c");
    assert_eq!(idgen_holder(&mut con, 0).as_deref(), Some("node-c"), "C took the first free slots");
    // Until A's next heartbeat has either moved it or (before) overwritten C's leases.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let a_slots = loop {
        let a_slots: Vec<u64> = (2..64).filter(|s| idgen_holder(&mut con, *s).as_deref() == Some("node-a")).collect();
        let c_kept = (0..2).all(|s| idgen_holder(&mut con, s).as_deref() == Some("node-c"));
        if a_slots.len() == 2 || !c_kept {
            break a_slots;
        }
        assert!(std::time::Instant::now() < deadline, "A's heartbeat never looked at its leases");
        std::thread::sleep(Duration::from_millis(100));
    };
    // C keeps its leases; A holds two others.
    assert_eq!(idgen_holder(&mut con, 0).as_deref(), Some("node-c"), "A overwrote C's lease");
    assert_eq!(idgen_holder(&mut con, 1).as_deref(), Some("node-c"), "A overwrote C's lease");
    assert_eq!(a_slots.len(), 2, "{a_slots:?}");
    wait_for_slots_lost(&a, 2);
    // Both nodes accept messages at once: every id distinct, each node's from its own slots.
    let ga = a.gateway();
    let on_a = std::thread::spawn(move || {
        (0..100).map(|i| ga.send_message(&text("ann", "bo", &format!("a{i}"))).unwrap().id).collect::<Vec<_>>()
    });
    let on_c: Vec<String> =
        (0..100).map(|i| c.gateway().send_message(&text("cy", "bo", &format!("c{i}"))).unwrap().id).collect();
    let on_a = on_a.join().unwrap();
    assert!(on_a.iter().all(|id| a_slots.contains(&id_slot(id))), "A's ids from A's new slots: {on_a:?}");
    assert!(on_c.iter().all(|id| id_slot(id) < 2), "C's ids from C's slots: {on_c:?}");
    let mut all: Vec<&String> = on_a.iter().chain(&on_c).collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 200, "every id distinct");
}

/// A node whose id-generator slots were taken while no other slot is free makes no ids: its
/// appends are refused as `unavailable` (never ids another node makes too) until a slot
/// frees, then go on with the new slot.
#[test]
fn a_node_without_a_free_id_slot_refuses_messages_until_one_frees() {
    let Some(redis) = redis_or_skip() else { return };
    let mut con = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    let a = cluster_node(&redis, "node-a");
    // Every slot held by another node, A's own included (as after a lapse).
    for slot in 0..64 {
        redis::cmd("SET").arg(format!("ether:idgen:{slot}")).arg("node-x").query::<()>(&mut con).unwrap();
    }
    // From A's next heartbeat on, refused (before, A took the slots back and went on).
    let body = serde_json::to_vec(&text("ann", "bo", "refused")).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let r = loop {
        let r = a.gateway().request("POST", "/v1/messages", Some(&body)).unwrap();
        if r.status != 200 || std::time::Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(r.status, 503, "{}", r.text());
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["error"]["code"], "unavailable", "{v}");
    wait_for_slots_lost(&a, 2);
    assert_eq!(idgen_holder(&mut con, 0).as_deref(), Some("node-x"), "A left the slot to its holder");
    // Two slots free again: the next heartbeat takes them.
    redis::cmd("DEL").arg("ether:idgen:40").arg("ether:idgen:41").query::<()>(&mut con).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while [40, 41].iter().any(|s| idgen_holder(&mut con, *s).as_deref() != Some("node-a")) {
        assert!(std::time::Instant::now() < deadline, "A never took the freed slots");
        std::thread::sleep(Duration::from_millis(100));
    }
    for i in 0..10 {
        let sent = a.gateway().send_message(&text("ann", "bo", &format!("m{i}"))).unwrap();
        assert!([40, 41].contains(&id_slot(&sent.id)), "{}", sent.id);
    }
}

/// The `message.unreached` events made so far (in `ether:events`) for message `id`.
fn unreached_events(con: &mut redis::Connection, id: &str) -> usize {
    stream_events(con, "message.unreached").iter().filter(|e| e["id"] == id).count()
}

/// PROTOCOL.md: `message.unreached` counts a terminal on another node as online only once
/// that node took it on, not while it is still connecting there (its presence written so its
/// traffic is routed there, its heads not read yet): one that then fails hides nothing from
/// the business. Here node B's terminal fails while connecting (B's Redis user may no longer
/// read the store: its heads cannot be read, 503) and B cannot remove its presence entry
/// either (no HDEL), so the entry B wrote while it connected stays, as it is while any
/// terminal connects. A message to its user accepted on node A is unreached, and presence on
/// A does not list it. Before, A counted that entry as a terminal online and made no event.
/// A terminal B welcomed still counts: its user's message makes none.
#[test]
fn a_terminal_still_connecting_on_another_node_is_not_online_for_message_unreached() {
    let Some(redis) = redis_or_skip() else { return };
    let mut con = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    node_b_acl(&mut con, "~ether:presence:*");
    let a = cluster_node(&redis, "node-a");
    let b = node_b_as_acl_user(&redis);
    let mut dee = b.terminal("dee", "phone");
    // From here B's Redis user may neither read the store nor remove presence entries.
    let keys = ["~ether:bus*", "~ether:node:*", "~ether:idgen:*", "~ether:secrets", "~ether:events*"];
    let mut acl = redis::cmd("ACL");
    acl.arg("SETUSER").arg("nodeb").arg("reset").arg("on").arg(">pw").arg("+@all").arg("-hdel");
    acl.arg(&keys[..]).arg("~ether:presence:*").query::<()>(&mut con).unwrap();
    match ether_sdk::TerminalClient::connect(&b.ws_url(), &b.token("cy"), "phone", "web") {
        Err(ether_sdk::SdkError::Rejected { status, .. }) => assert_eq!(status, 503),
        Err(e) => panic!("refused, but not for the store: {e}"),
        Ok(_) => panic!("taken on without its heads"),
    }
    let entry: Option<String> =
        redis::cmd("HGET").arg("ether:presence:cy").arg("node-b/phone").query(&mut con).unwrap();
    assert!(entry.is_some(), "B's entry for the connection it was taking on stays");
    let to_dee = a.gateway().send_message(&text("zed", "dee", "to a welcomed terminal")).unwrap();
    let to_cy = a.gateway().send_message(&text("zed", "cy", "to a failed connection")).unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while unreached_events(&mut con, &to_cy.id) == 0 {
        assert!(std::time::Instant::now() < deadline, "no message.unreached for cy's message");
        std::thread::sleep(Duration::from_millis(50));
    }
    let p = a.gateway().request("GET", "/v1/users/cy/presence", None).unwrap();
    assert!(p.text().contains("\"online\":false"), "{}", p.text());
    assert_eq!(dee.recv_msg(WAIT).unwrap().id, to_dee.id);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(unreached_events(&mut con, &to_dee.id), 0, "dee's terminal on B was online");
    assert_eq!(unreached_events(&mut con, &to_cy.id), 1);
}

/// A second connection of a device already online on node B, refused while B takes it on
/// (here B's Redis user may no longer read the store: 503), leaves the device online for the
/// other nodes: its presence entry, marked connecting by the refused connection, is written
/// back as the welcomed one's. Node A lists it and a message to it makes no
/// `message.unreached`.
#[test]
fn a_refused_second_connection_leaves_the_device_online_for_the_other_nodes() {
    let Some(redis) = redis_or_skip() else { return };
    let mut con = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    node_b_acl(&mut con, "~ether:presence:*");
    let a = cluster_node(&redis, "node-a");
    let b = node_b_as_acl_user(&redis);
    let mut ada = b.terminal("ada", "phone");
    wait_for_presence(&a, "ada", "phone");
    // From here B's Redis user may no longer read the store.
    let keys = ["~ether:bus*", "~ether:node:*", "~ether:idgen:*", "~ether:secrets", "~ether:events*"];
    let mut acl = redis::cmd("ACL");
    acl.arg("SETUSER").arg("nodeb").arg("reset").arg("on").arg(">pw").arg("+@all");
    acl.arg(&keys[..]).arg("~ether:presence:*").query::<()>(&mut con).unwrap();
    match ether_sdk::TerminalClient::connect(&b.ws_url(), &b.token("ada"), "phone", "web") {
        Err(ether_sdk::SdkError::Rejected { status, .. }) => assert_eq!(status, 503),
        Err(e) => panic!("refused, but not for the store: {e}"),
        Ok(_) => panic!("taken on without its heads"),
    }
    wait_for_presence(&a, "ada", "phone");
    let sent = a.gateway().send_message(&text("zed", "ada", "still here")).unwrap();
    assert_eq!(ada.recv_msg(WAIT).unwrap().id, sent.id);
    let marker = a.gateway().send_message(&text("zed", "nobody", "away")).unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while unreached_events(&mut con, &marker.id) == 0 {
        assert!(std::time::Instant::now() < deadline, "no message.unreached for the marker");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(unreached_events(&mut con, &sent.id), 0, "ada's phone on B was online");
}
