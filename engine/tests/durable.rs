//! Durable messaging over real sockets: offline messages synced in bounded pages, idempotent
//! `cid`, history and unread counts, read receipts across terminals, and messages that survive
//! a restart of the node.
mod support;

use std::time::Duration;

use ether_proto::frame::ServerFrame;
use ether_proto::ClientFrame;
use serde_json::Value;
use support::*;

#[test]
fn offline_messages_are_synced_in_pages_on_reconnect() {
    let node = TestNode::start(); // test_min: sync pages of 8
    let gw = node.gateway();
    for i in 0..30 {
        gw.send_message(&text("sam", "tia", &format!("offline {i}"))).unwrap();
    }
    let mut t = node.terminal("tia", "phone");
    assert_eq!(t.welcome().unwrap().inbox_seq, 30, "welcome carries the inbox head");
    let (msgs, head) = sync_all(&mut t, 0);
    assert_eq!(head, 30);
    assert_eq!(msgs.iter().map(|m| m.seq).collect::<Vec<_>>(), (1..=30).collect::<Vec<_>>());
    for (i, m) in msgs.iter().enumerate() {
        assert_eq!(m.body["text"], format!("offline {i}"));
        assert_eq!(m.chat, "u:sam");
    }
    // From a position in the middle: only what comes after it.
    let (rest, _) = sync_all(&mut t, 25);
    assert_eq!(rest.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![26, 27, 28, 29, 30]);
    // The sender's own inbox has the copies, chat named from its side.
    let mut sam = node.terminal("sam", "web");
    let (copies, _) = sync_all(&mut sam, 28);
    assert_eq!(copies.len(), 2);
    assert!(copies.iter().all(|m| m.chat == "u:tia" && m.from == "sam"));
}

#[test]
fn a_repeated_cid_stores_nothing_new() {
    let node = TestNode::start();
    let mut t = node.terminal("uma", "phone");
    let gw = node.gateway();
    let mut m = text("val", "uma", "once");
    m.cid = Some("order-42".into());
    let first = gw.send_message(&m).unwrap();
    let again = gw.send_message(&m).unwrap();
    assert_eq!(first, again, "the first result comes back");
    let got = next_msg(&mut t);
    assert_eq!(got.id, first.id);
    assert_eq!(got.cid.as_deref(), Some("order-42"));
    t.ack(got.seq).unwrap();
    assert_silent(&mut t, Duration::from_millis(300));
    let (all, head) = sync_all(&mut t, 0);
    assert_eq!((all.len(), head), (1, 1));
    // Another sender may use the same cid.
    let mut other = text("wes", "uma", "different sender");
    other.cid = Some("order-42".into());
    assert_ne!(gw.send_message(&other).unwrap().id, first.id);
}

#[test]
fn history_and_unread() {
    let node = TestNode::start();
    let gw = node.gateway();
    for i in 0..5 {
        gw.send_message(&text("xia", "yan", &format!("x{i}"))).unwrap();
    }
    for i in 0..3 {
        gw.send_message(&text("zed", "yan", &format!("z{i}"))).unwrap();
    }
    let get = |path: &str| -> Value {
        let r = gw.request("GET", path, None).unwrap();
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        serde_json::from_slice(&r.body).unwrap()
    };
    let all = get("/v1/users/yan/messages?limit=100");
    assert_eq!(all["messages"].as_array().unwrap().len(), 8);
    let from_zed = get("/v1/users/yan/messages?chat=u:zed");
    let texts: Vec<&str> =
        from_zed["messages"].as_array().unwrap().iter().map(|m| m["body"]["text"].as_str().unwrap()).collect();
    assert_eq!(texts.len(), 3);
    assert!(texts.iter().all(|t| t.starts_with('z')));
    let page = get("/v1/users/yan/messages?limit=2");
    assert_eq!(page["messages"].as_array().unwrap().len(), 2);
    assert_eq!(page["more"], true);
    let unread = get("/v1/users/yan/unread");
    assert_eq!(unread["chats"]["u:xia"], 5);
    assert_eq!(unread["chats"]["u:zed"], 3);
    let bad = gw.request("GET", "/v1/users/yan/messages?limit=abc", None).unwrap();
    assert_eq!(bad.status, 400);
    let bad = gw.request("GET", "/v1/users/yan/messages?chat=nope", None).unwrap();
    assert_eq!(bad.status, 400);
}

#[test]
fn reads_send_receipts_and_sync_other_terminals() {
    let node = TestNode::start();
    let mut ana = node.terminal("ana", "phone");
    let mut ben_phone = node.terminal("ben", "phone");
    let mut ben_web = node.terminal("ben", "web");
    let gw = node.gateway();
    let first = gw.send_message(&text("ana", "ben", "one")).unwrap();
    let second = gw.send_message(&text("ana", "ben", "two")).unwrap();
    for t in [&mut ben_phone, &mut ben_web, &mut ana] {
        for _ in 0..2 {
            let m = next_msg(t);
            t.ack(m.seq).unwrap();
        }
    }
    ben_phone.send_frame(&ClientFrame::Read { chat: "u:ana".into(), seq: 2 }).unwrap();
    match ana.recv(WAIT).unwrap() {
        Some(ServerFrame::Receipt { chat, by, up_to }) => {
            assert_eq!((chat.as_str(), by.as_str()), ("u:ben", "ben"));
            assert_eq!(up_to, second.id);
        }
        other => panic!("expected receipt, got {other:?}"),
    }
    match ben_web.recv(WAIT).unwrap() {
        Some(ServerFrame::ReadSync { chat, seq }) => assert_eq!((chat.as_str(), seq), ("u:ana", 2)),
        other => panic!("expected read_sync, got {other:?}"),
    }
    assert_silent(&mut ben_phone, Duration::from_millis(200));
    let unread: Value = serde_json::from_slice(&gw.request("GET", "/v1/users/ben/unread", None).unwrap().body).unwrap();
    assert_eq!(unread["chats"].get("u:ana").and_then(Value::as_u64).unwrap_or(0), 0);
    // Reading backwards moves nothing and sends nothing.
    ben_phone.send_frame(&ClientFrame::Read { chat: "u:ana".into(), seq: 1 }).unwrap();
    assert_silent(&mut ana, Duration::from_millis(300));
    let _ = first;
    // A malformed chat is an error frame.
    ben_phone.send_frame(&ClientFrame::Read { chat: "ana".into(), seq: 1 }).unwrap();
    assert!(matches!(ben_phone.recv(WAIT).unwrap(), Some(ServerFrame::Error { .. })));
}

#[test]
fn messages_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let sent: Vec<String> = {
        let node = TestNode::in_dir(dir.path(), |_| {});
        let gw = node.gateway();
        let ids = (0..20).map(|i| gw.send_message(&text("cal", "dee", &format!("kept {i}"))).unwrap().id).collect();
        node.stop();
        ids
    };
    let node = TestNode::in_dir(dir.path(), |_| {});
    let mut t = node.terminal("dee", "phone");
    assert_eq!(t.welcome().unwrap().inbox_seq, 20);
    let (msgs, _) = sync_all(&mut t, 0);
    assert_eq!(msgs.iter().map(|m| m.id.clone()).collect::<Vec<_>>(), sent);
    // New messages continue the same sequence.
    node.gateway().send_message(&text("cal", "dee", "after restart")).unwrap();
    assert_eq!(next_msg(&mut t).seq, 21);
}

#[test]
fn a_reconnecting_device_learns_where_it_stopped() {
    let node = TestNode::start();
    let gw = node.gateway();
    let mut t = node.terminal("eli", "phone");
    for i in 0..6 {
        gw.send_message(&text("fox", "eli", &format!("m{i}"))).unwrap();
    }
    let mut last = 0;
    for _ in 0..4 {
        last = next_msg(&mut t).seq;
    }
    t.ack(last).unwrap();
    std::thread::sleep(Duration::from_millis(200)); // the position is saved asynchronously
    drop(t);
    let mut again = node.terminal("eli", "phone");
    let w = again.welcome().unwrap().clone();
    assert_eq!(w.inbox_seq, 6);
    assert_eq!(w.delivered.as_ref().map(|d| d.inbox_seq), Some(4), "the phone acked up to 4");
    let (rest, _) = sync_all(&mut again, w.delivered.unwrap().inbox_seq);
    assert_eq!(rest.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![5, 6]);
    // Another device of the same user has its own position.
    let web = node.terminal("eli", "web");
    assert_eq!(web.welcome().unwrap().delivered.as_ref().map(|d| d.inbox_seq), Some(0));
}

/// `store.queue_bytes_max` reaches the storage thread: with the store held (an open write
/// transaction on its database), sends queue up until their bodies pass the configured bytes,
/// and the ones past it are refused at once with 503 `unavailable` instead of waiting; each
/// one answered 200 is stored. With the default (256 MiB) none of these would be refused.
#[test]
fn the_store_queue_is_bounded_by_its_configured_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::in_dir(dir.path(), |c| {
        c.node.shards = 1;
        c.store_queue_bytes_max = 128 * 1024;
    });
    let db = rusqlite::Connection::open(dir.path().join("ether.db")).unwrap();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    let body = "q".repeat(16 * 1024);
    let sends: Vec<_> = (0..16)
        .map(|i| {
            let (gw, body) = (node.gateway(), body.clone());
            std::thread::spawn(move || gw.send_message(&text("ann", &format!("r{i}"), &body)))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(800));
    db.execute_batch("ROLLBACK").unwrap();
    let (mut stored, mut refused) = (Vec::new(), 0);
    for (i, s) in sends.into_iter().enumerate() {
        match s.join().unwrap() {
            Ok(sent) => stored.push((i, sent.id)),
            Err(ether_sdk::SdkError::Api { status, error }) => {
                assert_eq!((status, error.code), (503, ether_proto::ErrorCode::Unavailable), "{}", error.message);
                refused += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(refused >= 1, "16 bodies of 16 KiB fit a 128 KiB queue: the limit did not reach the store");
    assert!(stored.len() >= 4, "the queue took a few: {} stored", stored.len());
    for (i, id) in stored {
        let h = node.gateway().history(&format!("r{i}"), &Default::default()).unwrap();
        let ids: Vec<&str> = h["messages"].as_array().unwrap().iter().filter_map(|m| m["id"].as_str()).collect();
        assert_eq!(ids, [id.as_str()]);
    }
}
