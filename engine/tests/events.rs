//! Events to the business webhook from a real node: `user.online`, `message.unreached`,
//! `message.delivered`, `message.read`, `user.offline`, in signed batches, retried when the
//! receiver fails at first, never lost.
mod support;

use std::time::Duration;

use ether_proto::ClientFrame;
use support::webhook::*;
use support::*;

#[test]
fn events_reach_the_webhook_signed_and_retried() {
    let hook = receiver(2);
    let node = TestNode::with(|c| c.events.webhook = Some(webhook(&hook)));
    let gw = node.gateway();
    // Offline receiver: unreached.
    let unreached = gw.send_message(&text("oli", "pat", "you are away")).unwrap();
    let mut pat = node.terminal("pat", "phone");
    let m = gw.send_message(&text("oli", "pat", "now you are here")).unwrap();
    let got = next_msg(&mut pat);
    assert_eq!(got.id, m.id);
    pat.ack(got.seq).unwrap();
    pat.send_frame(&ClientFrame::Read { chat: "u:oli".into(), seq: got.seq }).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    pat.close().unwrap();
    let all = hook.wait_for(|e| {
        has(e, "user.online", "pat")
            && has(e, "message.unreached", "pat")
            && has(e, "message.delivered", "pat")
            && has(e, "message.read", "pat")
            && has(e, "user.offline", "pat")
    });
    let unreached_ev = all.iter().find(|e| e["type"] == "message.unreached").unwrap();
    assert_eq!(unreached_ev["id"], unreached.id);
    let delivered = all.iter().find(|e| e["type"] == "message.delivered").unwrap();
    assert_eq!((delivered["id"].as_str(), delivered["device"].as_str()), (Some(m.id.as_str()), Some("phone")));
    // API.md: message.read {chat, user, up_to}: the chat from the reader's side, up to the
    // newest message read (the one acked here).
    let read = all.iter().find(|e| e["type"] == "message.read").unwrap();
    assert_eq!(
        (read["chat"].as_str(), read["user"].as_str(), read["up_to"].as_str()),
        (Some("u:oli"), Some("pat"), Some(m.id.as_str())),
        "{read}"
    );
    assert!(all.iter().all(|e| e["ts"].as_u64().is_some() && e["event_id"].as_str().is_some()));
    assert!(*hook.posts.lock().unwrap() >= 3, "the first two posts failed and were retried");
    assert_eq!(*hook.bad_signatures.lock().unwrap(), 0, "every batch is signed with the webhook secret");
}

/// Events wait in their shard's batch (`events.batch_wait_ms`), here for long enough that a
/// read would overtake the delivery before it if the batch were not written first: the outbox
/// keeps the order in which the terminal's actions happened.
#[test]
fn batched_events_keep_the_order_of_what_happened() {
    let hook = receiver(0);
    let node = TestNode::with(|c| {
        c.events.webhook = Some(webhook(&hook));
        c.events.batch_wait = Duration::from_millis(1500);
    });
    let gw = node.gateway();
    let mut pat = node.terminal("pat", "phone");
    let mut sent = Vec::new();
    for i in 0..3 {
        sent.push(gw.send_message(&text("oli", "pat", &format!("m{i}"))).unwrap().id);
    }
    let mut last = 0;
    for id in &sent {
        let got = next_msg(&mut pat);
        assert_eq!(&got.id, id);
        pat.ack(got.seq).unwrap();
        last = got.seq;
    }
    pat.send_frame(&ClientFrame::Read { chat: "u:oli".into(), seq: last }).unwrap();
    pat.close().unwrap();
    let all = hook.wait_for(|e| has(e, "message.read", "pat") && has(e, "user.offline", "pat"));
    let seq_of = |e: &serde_json::Value| e["event_id"].as_str().and_then(|s| s.parse::<u64>().ok()).unwrap();
    let mut order: Vec<(u64, String)> = all
        .iter()
        .filter(|e| e["user"] == "pat")
        .map(|e| {
            let what = match e["type"].as_str().unwrap() {
                "message.delivered" => format!("delivered {}", e["id"].as_str().unwrap()),
                other => other.to_owned(),
            };
            (seq_of(e), what)
        })
        .collect();
    order.sort();
    let order: Vec<String> = order.into_iter().map(|(_, w)| w).collect();
    let mut want = vec!["user.online".to_owned()];
    want.extend(sent.iter().map(|id| format!("delivered {id}")));
    want.extend(["message.read".to_owned(), "user.offline".to_owned()]);
    assert_eq!(order, want, "outbox order (by event_id)");
}

/// A message to a group names, in one `group.unreached` event, the members no terminal of
/// was online (the hook for mobile push to a group): not the sender, not members online on
/// either shard. A group larger than `events.group_unreached_members_max` makes none.
#[test]
fn a_group_message_names_the_members_it_reached_no_terminal_of() {
    let hook = receiver(0);
    let node = TestNode::with(|c| {
        c.events.webhook = Some(webhook(&hook));
        c.events.group_unreached_members_max = 4;
    });
    let gw = node.gateway();
    gw.create_group(Some("crew"), "crew", "ann", &["bo", "cy", "di", "ed"]).unwrap();
    gw.create_group(Some("big"), "big", "ann", &["b1", "b2", "b3", "b4", "b5"]).unwrap();
    let _bo = node.terminal("bo", "phone");
    let _cy = node.terminal("cy", "phone");
    let text = serde_json::json!({"text": "hi"});
    let big = gw.send_group_message("big", "ann", ether_proto::Kind::Text, &text, None).unwrap();
    let first = gw.send_group_message("crew", "ann", ether_proto::Kind::Text, &text, None).unwrap();
    let unreached = |e: &[serde_json::Value], id: &serde_json::Value| {
        e.iter().find(|e| e["type"] == "group.unreached" && e["id"] == *id).cloned()
    };
    let all = hook.wait_for(|e| unreached(e, &first["id"]).is_some());
    let ev = unreached(&all, &first["id"]).unwrap();
    assert_eq!(
        (ev["group"].as_str(), ev["seq"].as_u64(), ev["messages"].as_u64()),
        (Some("crew"), Some(1), Some(1)),
        "{ev}"
    );
    assert_eq!(ev["users"], serde_json::json!(["di", "ed"]), "{ev}");
    // Di comes online: the next message names only ed.
    let _di = node.terminal("di", "web");
    let second = gw.send_group_message("crew", "ann", ether_proto::Kind::Text, &text, None).unwrap();
    let all = hook.wait_for(|e| unreached(e, &second["id"]).is_some());
    assert_eq!(unreached(&all, &second["id"]).unwrap()["users"], serde_json::json!(["ed"]));
    std::thread::sleep(Duration::from_millis(300));
    assert!(unreached(&hook.wait_for(|_| true), &big["id"]).is_none(), "six members: past the bound");
    let metrics = node.admin().request("GET", "/metrics", None).unwrap().text();
    let made: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("ether_group_unreached_events_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(made, 2, "{metrics}");
}

/// Messages posted (through both shards) to a group faster than its `group.unreached` is
/// computed are covered together: the events' `messages` add up to every message once, the
/// last one names the latest seq, each names the offline members.
#[test]
fn group_unreached_covers_every_message_of_a_burst_once() {
    let hook = receiver(0);
    let node = TestNode::with(|c| c.events.webhook = Some(webhook(&hook)));
    let gw = node.gateway();
    gw.create_group(Some("burst"), "burst", "ann", &["away1", "away2"]).unwrap();
    let text = serde_json::json!({"text": "x"});
    const N: u64 = 40;
    let posts: Vec<std::thread::JoinHandle<()>> = (0..4)
        .map(|_| {
            let gw = node.gateway();
            let text = text.clone();
            std::thread::spawn(move || {
                for _ in 0..N / 4 {
                    gw.send_group_message("burst", "ann", ether_proto::Kind::Text, &text, None).unwrap();
                }
            })
        })
        .collect();
    for p in posts {
        p.join().unwrap();
    }
    let covered = |e: &[serde_json::Value]| {
        e.iter()
            .filter(|e| e["type"] == "group.unreached" && e["group"] == "burst")
            .map(|e| (e["messages"].as_u64().unwrap(), e["seq"].as_u64().unwrap(), e["users"].clone()))
            .collect::<Vec<_>>()
    };
    hook.wait_for(|e| covered(e).iter().map(|r| r.0).sum::<u64>() >= N);
    std::thread::sleep(Duration::from_millis(200));
    let runs = covered(&hook.wait_for(|_| true));
    assert_eq!(runs.iter().map(|r| r.0).sum::<u64>(), N, "every message covered once: {runs:?}");
    assert!(runs.iter().all(|r| r.0 >= 1 && r.2 == serde_json::json!(["away1", "away2"])), "{runs:?}");
    assert_eq!(runs.iter().map(|r| r.1).max(), Some(N), "{runs:?}");
}

/// Terminals connected when the node stops go offline with it: `user.offline` is written to
/// the outbox for each (here kept there: the webhook refuses everything), parked ones too.
#[test]
fn terminals_connected_at_a_stop_go_offline_in_the_outbox() {
    let hook = receiver(usize::MAX);
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::in_dir(dir.path(), |c| c.events.webhook = Some(webhook(&hook)));
    let mut active = node.terminal("ida", "phone");
    let _parked = node.terminal("jon", "phone");
    // jon's connection parks (test config: after one tick); ida's keeps talking.
    for _ in 0..8 {
        active.ping().unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    node.stop();
    let offline = offline_in_outbox(dir.path());
    for user in ["ida", "jon"] {
        assert!(offline.iter().any(|d| d["user"] == user), "no user.offline for {user}: {offline:?}");
    }
}

/// The `user.offline` events (their data) in the outbox of a stopped node's data dir.
fn offline_in_outbox(dir: &std::path::Path) -> Vec<serde_json::Value> {
    let mut store =
        ether_store::SqliteBackend::open_dir(dir, ether_store::SqliteOptions::default()).expect("store opens");
    let events = match ether_store::StoreBackend::apply(
        &mut store,
        ether_store::op::Op::OutboxFetch { after: 0, limit: 1000 },
    ) {
        Ok(ether_store::Reply::Events(events)) => events,
        other => panic!("{other:?}"),
    };
    events.iter().filter(|e| e.kind == "user.offline").map(|e| serde_json::from_str(&e.data).unwrap()).collect()
}

/// A terminal that does not answer its close (it reads nothing: its socket is full and its
/// queue holds unacknowledged messages) still goes offline in the outbox when the node stops,
/// as does one whose idle connection is parked and one kicked just before the stop, its
/// goodbye still being written when the stop comes: each leaves the shard's indexes, and
/// makes its `user.offline`, as soon as its close is asked for, not after its goodbye. The
/// events wait in the shard's batch longer than the test runs, so only the shard's last
/// outbox write at the stop can have written them.
#[test]
fn terminals_that_do_not_answer_their_close_at_a_stop_go_offline_in_the_outbox() {
    let hook = receiver(usize::MAX);
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::in_dir(dir.path(), |c| {
        c.events.webhook = Some(webhook(&hook));
        c.events.batch_wait = Duration::from_secs(30);
    });
    let full = stalled_terminal(&node, "sam");
    let idle = stalled_terminal(&node, "pia");
    let kicked = stalled_terminal(&node, "kim");
    let gw = node.gateway();
    let filler = "x".repeat(1000);
    for i in 0..14 {
        gw.send_message(&text("ann", "sam", &format!("{i} {filler}"))).unwrap();
        gw.send_message(&text("ann", "kim", &format!("{i} {filler}"))).unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(node.shared().connections(), 3);
    let kick = ether_proto::api::Kick { reason: Some("bye".into()), ..Default::default() };
    assert_eq!(gw.kick("kim", kick).unwrap().kicked, 1);
    node.stop();
    let offline = offline_in_outbox(dir.path());
    for (user, reason) in [("sam", "shutdown"), ("pia", "shutdown"), ("kim", "kicked")] {
        let got: Vec<_> = offline.iter().filter(|d| d["user"] == user).collect();
        assert_eq!(got.len(), 1, "one user.offline for {user}: {offline:?}");
        assert_eq!(got[0]["reason"], reason, "{offline:?}");
    }
    drop((full, idle, kicked));
}

/// A node whose store is held: an open write transaction on its database (another SQLite
/// connection) makes the storage thread wait for the lock on the next write, and every command
/// queued behind it (a terminal's heads) waits too. One shard: all events in one order.
fn node_with_held_store(hook: &Receiver) -> (TestNode, rusqlite::Connection, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::in_dir(dir.path(), |c| {
        c.node.shards = 1;
        c.events.webhook = Some(webhook(hook));
    });
    let db = rusqlite::Connection::open(dir.path().join("ether.db")).unwrap();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    (node, db, dir)
}

/// The `message.unreached` events for message `id`.
fn unreached_for(events: &[serde_json::Value], id: &str) -> usize {
    events.iter().filter(|e| e["type"] == "message.unreached" && e["id"] == id).count()
}

type Connecting = std::thread::JoinHandle<Result<(ether_sdk::TerminalClient, ether_sdk::Welcome), ether_sdk::SdkError>>;

/// With the store held: a message to `cat` is sent (its write waits for the lock), then
/// `cat`'s only terminal connects (its upgrade is read and handed to the home shard; its heads
/// wait behind the write). Returns the send and the connect, both still waiting.
fn send_then_connect(
    node: &TestNode,
) -> (std::thread::JoinHandle<Result<ether_proto::api::SentMessage, ether_sdk::SdkError>>, Connecting) {
    let gw = node.gateway();
    let sent = std::thread::spawn(move || gw.send_message(&text("ann", "cat", "while you connect")));
    std::thread::sleep(Duration::from_millis(200));
    let (url, token) = (node.ws_url(), node.token("cat"));
    let connect = std::thread::spawn(move || ether_sdk::TerminalClient::connect(&url, &token, "phone", "web"));
    std::thread::sleep(Duration::from_millis(800));
    (sent, connect)
}

/// A message stored while its user's only terminal is still being taken on (its upgrade read,
/// its heads waiting behind the message's write) reached no terminal, and here none ever gets
/// it: the node begins to drain meanwhile and refuses the terminal (503). The business hears
/// it, once, by `message.unreached`.
#[test]
fn a_message_stored_while_the_only_terminal_connects_and_then_fails_is_unreached() {
    let hook = receiver(0);
    let (node, db, _dir) = node_with_held_store(&hook);
    let (sent, connect) = send_then_connect(&node);
    assert_eq!(node.admin().request("POST", "/admin/v1/drain", None).unwrap().status, 200);
    db.execute_batch("ROLLBACK").unwrap();
    let id = sent.join().unwrap().expect("stored once the lock went").id;
    match connect.join().unwrap() {
        Err(ether_sdk::SdkError::Rejected { status, .. }) => assert_eq!(status, 503),
        Err(e) => panic!("expected 503, got {e}"),
        Ok(_) => panic!("a terminal taken on while the node drains"),
    }
    let all = hook.wait_for(|e| unreached_for(e, &id) > 0);
    assert_eq!(unreached_for(&all, &id), 1, "{all:?}");
    assert!(!has(&all, "user.online", "cat"), "the terminal was never online: {all:?}");
}

/// The rule (PROTOCOL.md): `message.unreached` is made when the message is stored and no
/// terminal of the user is online, a terminal still being taken on included. One welcomed a
/// moment later gets the message by `sync` all the same (one push too many, never one too
/// few), and the event is made once, not again when the terminal is welcomed.
#[test]
fn a_message_stored_while_the_only_terminal_connects_is_unreached_once_and_synced() {
    let hook = receiver(0);
    let (node, db, _dir) = node_with_held_store(&hook);
    let (sent, connect) = send_then_connect(&node);
    db.execute_batch("ROLLBACK").unwrap();
    let id = sent.join().unwrap().expect("stored once the lock went").id;
    let (mut cat, welcome) = connect.join().unwrap().expect("taken on once its heads are read");
    assert_eq!(welcome.inbox_seq, 1, "the welcome names the message");
    let (got, _) = sync_all(&mut cat, 0);
    assert_eq!(got.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(), [id.as_str()]);
    // A later event of the same shard: whatever it made for the message came before it.
    let later = node.gateway().send_message(&text("ann", "zed", "away")).unwrap().id;
    let all = hook.wait_for(|e| unreached_for(e, &later) > 0);
    assert_eq!(unreached_for(&all, &id), 1, "{all:?}");
    assert!(has(&all, "user.online", "cat"), "{all:?}");
}
