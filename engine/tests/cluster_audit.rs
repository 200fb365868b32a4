//! Cluster mode, audited edge cases on real nodes (a private `redis-server` each, skipped when
//! none is installed): gaps in a group stream bigger than one store page, a bus reader that
//! falls behind the stream's trimming without its connection failing, group messages the
//! bus brings out of order right after a member was added on another node, and a resync racing
//! a gap fill of the same group. Each test was seen failing before its fix.
mod support;

use std::time::Duration;

use ether_proto::frame::Msg;
use ether_proto::Kind;
use ether_store::redis::TestRedis;
use support::*;

/// A node of the cluster at `redis` with the test configuration (`sync_page_max` 8).
fn cluster_node(redis: &TestRedis, id: &str) -> TestNode {
    let url = redis.url();
    let id = id.to_owned();
    TestNode::with(move |c| {
        c.cluster.redis_url = Some(url);
        c.node.id = id;
    })
}

/// A private redis-server and two nodes joined through it, `node-a` and `node-b` (none when
/// no redis-server is installed: the test is skipped). Bind them in this order, so the nodes
/// stop before their Redis.
fn two_nodes() -> Option<(TestRedis, TestNode, TestNode)> {
    let redis = TestRedis::start_or_skip()?;
    let a = cluster_node(&redis, "node-a");
    let b = cluster_node(&redis, "node-b");
    Some((redis, a, b))
}

/// The next `n` group messages of `t` (other frames skipped), each acked in its group as it
/// comes.
fn take_group(t: &mut ether_sdk::TerminalClient, group: &str, n: usize) -> Vec<Msg> {
    let mut got = Vec::new();
    while got.len() < n {
        let m = t.recv_msg(WAIT).unwrap_or_else(|e| panic!("after {} of {n}: {e}", got.len()));
        t.ack_group(group, m.seq).unwrap();
        got.push(m);
    }
    got
}

fn texts(ms: &[Msg]) -> Vec<String> {
    ms.iter().map(|m| m.body["text"].as_str().unwrap_or("").to_owned()).collect()
}

/// Stores `texts` from `from` in `group` straight into the shared Redis store, as a node
/// would, without telling the bus (messages lost on the way, as the other nodes see it).
/// Returns their seqs. Their ids are `(1 << 50) + first + i`.
fn store_group_texts_behind_the_bus(redis: &TestRedis, group: &str, from: &str, texts: &[String]) -> Vec<u64> {
    store_group_texts_from(redis, group, from, texts, 0)
}

fn store_group_texts_from(redis: &TestRedis, group: &str, from: &str, texts: &[String], first: u64) -> Vec<u64> {
    let options = ether_store::RedisOptions { prefix: "ether:store:".into(), events_stream: None, outbox: false };
    let mut store = ether_store::RedisBackend::open(&redis.url(), options).expect("the shared store");
    let mut seqs = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        let msg = ether_store::NewGroupMessage {
            id: (1 << 50) + first + i as u64,
            ts: 1,
            from: from.into(),
            system: false,
            group: group.into(),
            kind: Kind::Text,
            body: serde_json::json!({ "text": text }).to_string(),
            cid: None,
        };
        match ether_store::StoreBackend::apply(&mut store, ether_store::Op::AppendGroup(msg)).expect("appended") {
            ether_store::Reply::GroupAppended(a) => seqs.push(a.seq),
            other => panic!("{other:?}"),
        }
    }
    seqs
}

/// `hal` on node B, a member of `crew` (made on A, owner carol), with the group's first
/// message ("announced", seq 1) pushed and acked.
fn member_on_b(a: &TestNode, b: &TestNode) -> ether_sdk::TerminalClient {
    let mut hal = b.terminal("hal", "phone");
    a.gateway().create_group(Some("crew"), "Crew", "carol", &["hal"]).unwrap();
    std::thread::sleep(Duration::from_millis(300)); // membership crosses the bus
    post(a, "announced");
    let got = take_group(&mut hal, "crew", 1);
    assert_eq!((texts(&got)[0].as_str(), got[0].seq), ("announced", 1));
    hal
}

fn post(node: &TestNode, text: &str) {
    node.gateway().send_group_message("crew", "carol", Kind::Text, &serde_json::json!({ "text": text }), None).unwrap();
}

/// A message posted on A after what came before reaches the member next, in order, and alone.
fn post_goes_on(a: &TestNode, hal: &mut ether_sdk::TerminalClient, text: &str, seq: u64) {
    post(a, text);
    expect_only(hal, text, seq);
}

/// The member gets exactly one group message next, `text` at `seq`, and then nothing more.
fn expect_only(hal: &mut ether_sdk::TerminalClient, text: &str, seq: u64) {
    let got = take_group(hal, "crew", 1);
    assert_eq!((texts(&got)[0].as_str(), got[0].seq), (text, seq));
    assert_silent(hal, Duration::from_millis(300));
}

/// A group message from node A arrives on B after a gap of more messages than one store page
/// (`limits.sync_page_max`, 8 here) that B never heard of (lost on the bus): B fills the whole
/// gap from the store, in order, before the new one. Before, it read one page of the gap and
/// pushed the new message after it, so the member's group stream skipped the rest (a gap the
/// protocol says never happens, and the terminal's cumulative ack then covered it for good).
#[test]
fn a_group_gap_longer_than_a_page_is_filled_whole() {
    let Some((redis, a, b)) = two_nodes() else { return };
    let mut hal = member_on_b(&a, &b);
    let missed: Vec<String> = (0..20).map(|i| format!("missed {i}")).collect();
    let seqs = store_group_texts_behind_the_bus(&redis, "crew", "carol", &missed);
    assert_eq!(seqs, (2..22).collect::<Vec<u64>>());
    post(&a, "live");
    let got = take_group(&mut hal, "crew", 21);
    assert_eq!(got.iter().map(|m| m.seq).collect::<Vec<_>>(), (2..23).collect::<Vec<u64>>(), "{:?}", texts(&got));
    let mut expected = missed.clone();
    expected.push("live".into());
    assert_eq!(texts(&got), expected);
    assert_silent(&mut hal, Duration::from_millis(500));
}

/// Runs on the Redis server: appends `ARGV[1]` to the shared bus, then `ARGV[3]` copies of
/// `ARGV[2]`, then trims the bus to `ARGV[3]` entries, all at once: the bus moved on and was
/// trimmed past an entry while a node's reader was blocked waiting, its connection fine.
const APPEND_AND_TRIM: &str = r"
redis.call('XADD', 'ether:bus', '*', 'e', ARGV[1])
for i = 1, tonumber(ARGV[3]) do
  redis.call('XADD', 'ether:bus', '*', 'e', ARGV[2])
end
return redis.call('XTRIM', 'ether:bus', 'MAXLEN', ARGV[3])
";

/// A node whose bus reader fell so far behind that the stream was trimmed past what it had
/// read (a node stalled for a few seconds under load; its Redis connection never failed)
/// notices and checks its users against the store: the group message whose bus entry was
/// trimmed away unread reaches the member. Before, only a reconnect made the reader look, so
/// the entry was skipped without a word and the member never got the message live.
#[test]
fn a_bus_trimmed_past_a_reader_that_kept_its_connection_still_resyncs() {
    let Some((redis, a, b)) = two_nodes() else { return };
    let mut hal = member_on_b(&a, &b);
    // Stored as node A would, and announced on the bus, where B's reader is blocked waiting.
    let seqs = store_group_texts_behind_the_bus(&redis, "crew", "carol", &["trimmed away".to_owned()]);
    assert_eq!(seqs, [2]);
    let entry = serde_json::json!({
        "node": "node-a",
        "event": { "group": { "group": "crew", "seq": 2, "msg": {
            "id": 1u64 << 50,
            "ts": 1, "from": "carol", "kind": "text", "body": { "text": "trimmed away" }
        } } }
    })
    .to_string();
    // Then more than one read's worth of entries (B's own: it ignores them), and the trim.
    let filler = r#"{"node":"node-b","event":"resync"}"#;
    let mut con = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    let trimmed: u64 =
        redis::cmd("EVAL").arg(APPEND_AND_TRIM).arg(0).arg(&entry).arg(filler).arg(600).query(&mut con).unwrap();
    assert!(trimmed >= 1, "the group message's entry was trimmed");
    let got = take_group(&mut hal, "crew", 1);
    assert_eq!((texts(&got)[0].as_str(), got[0].seq), ("trimmed away", 2));
    // And the group goes on in order.
    post_goes_on(&a, &mut hal, "after", 3);
}

/// A member added on node A, online on node B, where no other member of the group is online,
/// gets the message A posted right after the add, when both reach B's bus reader together (the
/// business adds a member and at once posts "welcome", and the two publishes travel in one
/// read). Before, the reader queued the membership change to the member's shard and the
/// message at once to the shards then wanting the group: none, since that shard had not
/// handled the change yet, so the new member never got the message live.
#[test]
fn a_message_posted_right_after_an_add_reaches_the_new_member_on_another_node() {
    let Some((redis, a, b)) = two_nodes() else { return };
    let mut hal = b.terminal("hal", "phone");
    a.gateway().create_group(Some("crew"), "Crew", "carol", &[] as &[&str]).unwrap();
    std::thread::sleep(Duration::from_millis(300)); // nothing of the group on B yet
                                                    // What node A writes to the store for the add and the post, then publishes together.
    let options = ether_store::RedisOptions { prefix: "ether:store:".into(), events_stream: None, outbox: false };
    let mut store = ether_store::RedisBackend::open(&redis.url(), options).expect("the shared store");
    let add = ether_store::Op::AddMembers {
        group: "crew".into(),
        users: vec!["hal".into()],
        members_max: 100,
        groups_per_user_max: 100,
    };
    ether_store::StoreBackend::apply(&mut store, add).expect("added");
    let seqs = store_group_texts_behind_the_bus(&redis, "crew", "carol", &["welcome aboard".to_owned()]);
    assert_eq!(seqs, [1]);
    let membership = serde_json::json!({
        "node": "node-a",
        "event": { "membership": { "group": "crew", "users": ["hal"], "joined": true } }
    });
    let post = serde_json::json!({
        "node": "node-a",
        "event": { "group": { "group": "crew", "seq": 1, "msg": {
            "id": 1u64 << 50, "ts": 1, "from": "carol", "kind": "text", "body": { "text": "welcome aboard" }
        } } }
    });
    let mut con = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    redis::pipe()
        .atomic()
        .cmd("XADD")
        .arg("ether:bus")
        .arg("*")
        .arg("e")
        .arg(membership.to_string())
        .ignore()
        .cmd("XADD")
        .arg("ether:bus")
        .arg("*")
        .arg("e")
        .arg(post.to_string())
        .ignore()
        .query::<()>(&mut con)
        .unwrap();
    expect_only(&mut hal, "welcome aboard", 1);
}

/// The shared store's `AddMembers`, as the node that adds members runs it.
fn add_to_store(redis: &TestRedis, group: &str, users: &[&str]) {
    let options = ether_store::RedisOptions { prefix: "ether:store:".into(), events_stream: None, outbox: false };
    let mut store = ether_store::RedisBackend::open(&redis.url(), options).expect("the shared store");
    let add = ether_store::Op::AddMembers {
        group: group.into(),
        users: users.iter().map(|u| u.to_string()).collect(),
        members_max: 100,
        groups_per_user_max: 100,
    };
    ether_store::StoreBackend::apply(&mut store, add).expect("added");
}

/// A bus entry from node A: `crew`'s message `seq` (id `(1 << 50) + first`) saying `text`.
fn group_entry(seq: u64, first: u64, text: &str) -> String {
    serde_json::json!({
        "node": "node-a",
        "event": { "group": { "group": "crew", "seq": seq, "msg": {
            "id": (1u64 << 50) + first, "ts": 1, "from": "carol", "kind": "text", "body": { "text": text }
        } } }
    })
    .to_string()
}

fn xadd(con: &mut redis::Connection, entries: &[String]) {
    let mut pipe = redis::pipe();
    pipe.atomic();
    for e in entries {
        pipe.cmd("XADD").arg("ether:bus").arg("*").arg("e").arg(e).ignore();
    }
    pipe.query::<()>(con).unwrap();
}

/// A member added on node A, online on node B where the group had no member online, gets
/// what was posted after the add in group seq order when the bus brings it out of order:
/// two messages posted right after the add by two nodes, the later one's entry first (each
/// node appends its own commits to the bus when its out thread gets to it). B fills the
/// earlier one from the store before the later one, and the message from before the add is
/// not pushed. Before, B's shard had no position in the group until its first message came,
/// so it pushed seq 3 first and then dropped seq 2 as already pushed: the member's group
/// stream skipped it (its ack of 3 covered 2 for good).
#[test]
fn messages_posted_right_after_a_cross_node_add_reach_the_new_member_in_seq_order() {
    let Some((redis, a, b)) = two_nodes() else { return };
    let mut hal = b.terminal("hal", "phone");
    a.gateway().create_group(Some("crew"), "Crew", "carol", &[] as &[&str]).unwrap();
    std::thread::sleep(Duration::from_millis(300)); // nothing of the group on B yet
    let before = store_group_texts_from(&redis, "crew", "carol", &["before the add".to_owned()], 0);
    assert_eq!(before, [1]);
    add_to_store(&redis, "crew", &["hal"]);
    let after = ["first after".to_owned(), "second after".to_owned()];
    assert_eq!(store_group_texts_from(&redis, "crew", "carol", &after, 1), [2, 3]);
    let membership = serde_json::json!({
        "node": "node-a",
        "event": { "membership": { "group": "crew", "users": ["hal"], "joined": true } }
    })
    .to_string();
    // The late entry of the message from before the add, then the add, then seq 3: seq 2's
    // entry is still on its way.
    let mut con = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    xadd(&mut con, &[group_entry(1, 0, "before the add"), membership, group_entry(3, 2, "second after")]);
    let got = take_group(&mut hal, "crew", 2);
    assert_eq!(got.iter().map(|m| m.seq).collect::<Vec<_>>(), [2, 3], "{:?}", texts(&got));
    assert_eq!(texts(&got), after);
    // Seq 2's entry arrives at last: already pushed, not again.
    xadd(&mut con, &[group_entry(2, 1, "first after")]);
    assert_silent(&mut hal, Duration::from_millis(500));
    // And the group goes on in order.
    post_goes_on(&a, &mut hal, "later", 4);
}

/// A bus that lost entries: a `resync` and a group message after a gap longer than one store
/// page come in one read. The member's shard reads the gap from the store for the message
/// while its resync reads the same range for the group: each message is pushed once, in seq
/// order. Before, both pushed from the head the shard had before either read, one after the
/// other: the member got the gap twice (and the shard's head could be set back by the slower).
#[test]
fn a_resync_racing_a_gap_fill_pushes_each_group_message_once_in_order() {
    let Some((redis, a, b)) = two_nodes() else { return };
    let mut hal = member_on_b(&a, &b);
    let missed: Vec<String> = (0..20).map(|i| format!("missed {i}")).collect();
    assert_eq!(store_group_texts_behind_the_bus(&redis, "crew", "carol", &missed), (2..22).collect::<Vec<u64>>());
    assert_eq!(store_group_texts_from(&redis, "crew", "carol", &["live".to_owned()], 20), [22]);
    let resync = r#"{"node":"node-a","event":"resync"}"#.to_owned();
    let mut con = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    xadd(&mut con, &[resync, group_entry(22, 20, "live")]);
    let got = take_group(&mut hal, "crew", 21);
    assert_eq!(got.iter().map(|m| m.seq).collect::<Vec<_>>(), (2..23).collect::<Vec<u64>>(), "{:?}", texts(&got));
    let mut expected = missed.clone();
    expected.push("live".into());
    assert_eq!(texts(&got), expected);
    assert_silent(&mut hal, Duration::from_millis(500));
    // And the group goes on in order.
    post_goes_on(&a, &mut hal, "later", 23);
}
