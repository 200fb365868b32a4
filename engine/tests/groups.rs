//! Groups over real sockets: lifecycle and membership, enforcement, delivery to every online
//! member on both shards, membership changes while members are online, group sync after a
//! reconnect, history and read counts.
mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use ether_proto::frame::ServerFrame;
use ether_proto::ClientFrame;
use serde_json::{json, Value};
use support::*;

fn call(node: &TestNode, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let bytes = body.map(|b| b.to_string().into_bytes());
    let r = node.gateway().request(method, path, bytes.as_deref()).unwrap();
    let v = if r.body.is_empty() { Value::Null } else { serde_json::from_slice(&r.body).unwrap() };
    (r.status, v)
}

fn group_text(from: &str, text: &str) -> Value {
    json!({"from": from, "kind": "text", "body": {"text": text}})
}

#[test]
fn lifecycle_and_membership() {
    let node = TestNode::start();
    let (status, v) = call(
        &node,
        "POST",
        "/v1/groups",
        Some(json!({"id": "team", "name": "Team", "owner": "ada", "members": ["bea", "cy"]})),
    );
    assert_eq!((status, v["id"].as_str()), (201, Some("team")));
    let (status, _) = call(&node, "POST", "/v1/groups", Some(json!({"id": "team", "name": "Again", "owner": "ada"})));
    assert_eq!(status, 409, "ids are unique");
    let (_, g) = call(&node, "GET", "/v1/groups/team", None);
    assert_eq!(
        (g["name"].as_str(), g["owner"].as_str(), g["member_count"].as_u64()),
        (Some("Team"), Some("ada"), Some(3))
    );
    let (status, v) = call(&node, "POST", "/v1/groups/team/members", Some(json!({"members": ["dee", "eve", "bea"]})));
    assert_eq!((status, v["added"].as_u64()), (200, Some(2)));
    // Paged member list with a cursor.
    let mut all = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/groups/team/members?limit=2&cursor={c}"),
            None => "/v1/groups/team/members?limit=2".to_owned(),
        };
        let (_, page) = call(&node, "GET", &path, None);
        all.extend(page["members"].as_array().unwrap().iter().map(|m| m.as_str().unwrap().to_owned()));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    all.sort();
    assert_eq!(all, ["ada", "bea", "cy", "dee", "eve"]);
    let (_, mine) = call(&node, "GET", "/v1/users/dee/groups", None);
    assert_eq!(mine["groups"], json!(["team"]));
    let (status, v) = call(&node, "DELETE", "/v1/groups/team/members/dee", None);
    assert_eq!((status, v["removed"].as_u64()), (200, Some(1)));
    let (_, mine) = call(&node, "GET", "/v1/users/dee/groups", None);
    assert_eq!(mine["groups"], json!([]));
    // A generated id when none is chosen.
    let (status, v) = call(&node, "POST", "/v1/groups", Some(json!({"name": "Auto", "owner": "ada"})));
    assert_eq!(status, 201);
    assert!(!v["id"].as_str().unwrap().is_empty());
    let (status, _) = call(&node, "DELETE", "/v1/groups/team", None);
    assert_eq!(status, 200);
    let (status, v) = call(&node, "GET", "/v1/groups/team", None);
    assert_eq!((status, v["error"]["code"].as_str()), (404, Some("not_found")));
}

#[test]
fn membership_and_limits_are_enforced() {
    let node = TestNode::start(); // test_min: 8 members per group
    call(&node, "POST", "/v1/groups", Some(json!({"id": "club", "name": "Club", "owner": "fay"})));
    let (status, v) = call(&node, "POST", "/v1/groups/club/messages", Some(group_text("stranger", "let me in")));
    assert_eq!((status, v["error"]["code"].as_str()), (403, Some("forbidden")));
    let many: Vec<String> = (0..9).map(|i| format!("m{i}")).collect();
    let (status, v) = call(&node, "POST", "/v1/groups/club/members", Some(json!({"members": many})));
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("group_members_max"));
    let seven: Vec<String> = (0..7).map(|i| format!("m{i}")).collect();
    assert_eq!(call(&node, "POST", "/v1/groups/club/members", Some(json!({"members": seven}))).0, 200);
    let (status, _) = call(&node, "POST", "/v1/groups/club/members", Some(json!({"members": ["one-too-many"]})));
    assert_eq!(status, 400, "the store enforces the limit across calls");
    let (status, _) = call(&node, "POST", "/v1/groups/nope/messages", Some(group_text("fay", "x")));
    assert_eq!(status, 404);
    let (status, _) =
        call(&node, "POST", "/v1/groups/club/messages", Some(json!({"from": "fay", "kind": "text", "body": {}})));
    assert_eq!(status, 400);
}

/// The owner is always a member (docs/openapi.json): removing them is refused, so the group
/// never names as owner someone who can no longer send to it. Duplicates in a member list
/// are ignored, so they do not count against `limits.group_members_max`.
#[test]
fn the_owner_stays_a_member_and_duplicates_do_not_count() {
    let node = TestNode::start(); // test_min: 8 members per group
    call(&node, "POST", "/v1/groups", Some(json!({"id": "crew", "name": "Crew", "owner": "cap", "members": ["mate"]})));
    let (status, v) = call(&node, "DELETE", "/v1/groups/crew/members/cap", None);
    assert_eq!((status, v["error"]["code"].as_str()), (403, Some("forbidden")), "{v}");
    let (_, g) = call(&node, "GET", "/v1/groups/crew", None);
    assert_eq!((g["owner"].as_str(), g["member_count"].as_u64()), (Some("cap"), Some(2)));
    let (status, v) = call(&node, "POST", "/v1/groups/crew/messages", Some(group_text("cap", "still here")));
    assert_eq!(status, 200, "{v}");
    let (status, v) = call(&node, "DELETE", "/v1/groups/crew/members/mate", None);
    assert_eq!((status, v["removed"].as_u64()), (200, Some(1)), "others go as before");

    // Nine entries, two users: within the bound of 8.
    let twice: Vec<&str> = ["ann", "ben"].iter().cycle().take(9).copied().collect();
    let (status, v) =
        call(&node, "POST", "/v1/groups", Some(json!({"id": "dup", "name": "D", "owner": "cap", "members": twice})));
    assert_eq!(status, 201, "{v}");
    let (status, v) = call(&node, "POST", "/v1/groups/dup/members", Some(json!({"members": twice})));
    assert_eq!((status, v["added"].as_u64()), (200, Some(0)), "{v}");
    let (_, g) = call(&node, "GET", "/v1/groups/dup", None);
    assert_eq!(g["member_count"].as_u64(), Some(3));
}

#[test]
fn every_online_member_on_both_shards_gets_each_message() {
    let node = TestNode::start();
    let members: Vec<String> = (0..6).map(|i| format!("mem{i}")).collect();
    call(&node, "POST", "/v1/groups", Some(json!({"id": "all", "name": "All", "owner": "mem0", "members": members})));
    let mut terminals: Vec<_> = members.iter().map(|m| node.terminal(m, "phone")).collect();
    let mut second = node.terminal("mem1", "web"); // several terminals of one member
    let shards: std::collections::BTreeSet<u64> = {
        let conns: Value =
            serde_json::from_slice(&node.admin().request("GET", "/admin/v1/connections", None).unwrap().body).unwrap();
        conns["connections"].as_array().unwrap().iter().map(|c| c["shard"].as_u64().unwrap()).collect()
    };
    assert_eq!(shards.len(), 2, "members live on both shards");
    for t in terminals.iter_mut().chain(std::iter::once(&mut second)) {
        assert_eq!(t.welcome().unwrap().groups.get("all"), Some(&0));
    }
    let mut ids = Vec::new();
    for i in 0..3 {
        let (status, v) =
            call(&node, "POST", "/v1/groups/all/messages", Some(group_text("mem2", &format!("hello {i}"))));
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["seq"].as_u64(), Some(i + 1));
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    for t in terminals.iter_mut().chain(std::iter::once(&mut second)) {
        for (i, id) in ids.iter().enumerate() {
            let m = next_msg(t);
            assert_eq!((m.chat.as_str(), m.from.as_str(), m.seq, &m.id), ("g:all", "mem2", i as u64 + 1, id));
        }
    }
    // A member's terminal sends into the group: `sent` carries the group seq.
    terminals[3]
        .send_frame(&ClientFrame::Send {
            cid: "g1".into(),
            to: None,
            group: Some("all".into()),
            kind: ether_proto::Kind::Text,
            body: json!({"text": "from a terminal"}),
        })
        .unwrap();
    let mut got_sent = false;
    for _ in 0..2 {
        match terminals[3].recv(WAIT).unwrap() {
            Some(ServerFrame::Sent { cid, seq, .. }) => {
                assert_eq!((cid.as_str(), seq), ("g1", 4));
                got_sent = true;
            }
            Some(ServerFrame::Msg(m)) => assert_eq!(m.seq, 4),
            other => panic!("{other:?}"),
        }
    }
    assert!(got_sent);
    assert_eq!(next_msg(&mut terminals[0]).body["text"], "from a terminal");
}

#[test]
fn membership_changes_apply_to_online_members() {
    let node = TestNode::start();
    call(&node, "POST", "/v1/groups", Some(json!({"id": "live", "name": "Live", "owner": "gus", "members": ["hal"]})));
    let mut gus = node.terminal("gus", "phone");
    let mut hal = node.terminal("hal", "phone");
    let mut ida = node.terminal("ida", "phone");
    call(&node, "POST", "/v1/groups/live/messages", Some(group_text("gus", "before")));
    assert_eq!(next_msg(&mut gus).body["text"], "before");
    assert_eq!(next_msg(&mut hal).body["text"], "before");
    assert_silent(&mut ida, Duration::from_millis(200));
    // Ida joins without reconnecting; Hal leaves.
    call(&node, "POST", "/v1/groups/live/members", Some(json!({"members": ["ida"]})));
    call(&node, "DELETE", "/v1/groups/live/members/hal", None);
    call(&node, "POST", "/v1/groups/live/messages", Some(group_text("gus", "after")));
    assert_eq!(next_msg(&mut ida).body["text"], "after");
    assert_eq!(next_msg(&mut gus).body["text"], "after");
    assert_silent(&mut hal, Duration::from_millis(300));
    // Dissolved: nobody gets anything more.
    call(&node, "DELETE", "/v1/groups/live", None);
    let (status, _) = call(&node, "POST", "/v1/groups/live/messages", Some(group_text("gus", "gone")));
    assert_eq!(status, 404);
    assert_silent(&mut ida, Duration::from_millis(200));
}

#[test]
fn group_sync_after_reconnect_history_and_reads() {
    let node = TestNode::start();
    call(
        &node,
        "POST",
        "/v1/groups",
        Some(json!({"id": "book", "name": "Book", "owner": "jo", "members": ["kai", "lin"]})),
    );
    let mut ids = Vec::new();
    for i in 0..12 {
        let (_, v) = call(&node, "POST", "/v1/groups/book/messages", Some(group_text("jo", &format!("ch{i}"))));
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    let mut kai = node.terminal("kai", "phone");
    assert_eq!(kai.welcome().unwrap().groups.get("book"), Some(&12));
    let mut got = Vec::new();
    let mut after = 0;
    loop {
        kai.send_frame(&ClientFrame::Sync {
            inbox_seq: 0,
            groups: BTreeMap::from([("book".to_owned(), after)]),
            limit: None,
        })
        .unwrap();
        let more = loop {
            match kai.recv(WAIT).unwrap() {
                Some(ServerFrame::Msg(m)) => {
                    assert_eq!(m.chat, "g:book");
                    after = m.seq;
                    got.push(m.id);
                }
                Some(ServerFrame::Synced { groups, more, .. }) => {
                    assert_eq!(groups.get("book"), Some(&12));
                    break more;
                }
                other => panic!("{other:?}"),
            }
        };
        if !more {
            break;
        }
    }
    assert_eq!(got, ids, "every group message once, in order");
    let (_, page) = call(&node, "GET", "/v1/groups/book/messages?limit=5", None);
    assert_eq!(page["messages"].as_array().unwrap().len(), 5);
    assert_eq!(page["more"], true);
    // Reads: kai and lin read up to seq 6 and 3.
    kai.send_frame(&ClientFrame::Read { chat: "g:book".into(), seq: 6 }).unwrap();
    let mut lin = node.terminal("lin", "phone");
    lin.send_frame(&ClientFrame::Read { chat: "g:book".into(), seq: 3 }).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let (_, r) = call(&node, "GET", &format!("/v1/groups/book/messages/{}/reads", ids[2]), None);
    // `members` counts who could read it: every member but its sender (jo).
    assert_eq!((r["read"].as_u64(), r["members"].as_u64()), (Some(2), Some(2)));
    let (_, r) = call(&node, "GET", &format!("/v1/groups/book/messages/{}/reads", ids[5]), None);
    assert_eq!(r["read"].as_u64(), Some(1));
}

/// Group acks are held and saved once per tick (the highest of them), and on close: the next
/// connection of the device gets the acked position in `welcome.delivered`.
#[test]
fn group_ack_positions_come_back_in_welcome() {
    let node = TestNode::start();
    call(&node, "POST", "/v1/groups", Some(json!({"id": "crew", "name": "Crew", "owner": "mo", "members": ["nia"]})));
    for i in 0..5 {
        call(&node, "POST", "/v1/groups/crew/messages", Some(group_text("mo", &format!("m{i}"))));
    }
    let mut nia = node.terminal("nia", "tablet");
    assert_eq!(nia.welcome().unwrap().groups.get("crew"), Some(&5));
    // Acks out of order: the highest counts.
    for seq in [2, 4, 3] {
        nia.send_frame(&ClientFrame::Ack { seq, group: Some("crew".into()) }).unwrap();
    }
    // Positions are per device: another device of nia has none.
    std::thread::sleep(Duration::from_millis(700));
    let other = node.terminal("nia", "watch");
    assert_eq!(other.welcome().unwrap().delivered.as_ref().and_then(|d| d.groups.get("crew").copied()), None);
    drop(other);
    // The newest is saved when the tablet closes.
    nia.send_frame(&ClientFrame::Ack { seq: 5, group: Some("crew".into()) }).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    drop(nia);
    std::thread::sleep(Duration::from_millis(300));
    let again = node.terminal("nia", "tablet");
    let delivered = again.welcome().unwrap().delivered.clone().expect("the tablet's positions");
    assert_eq!(delivered.groups.get("crew"), Some(&5));
}

#[test]
fn a_slow_member_is_cut_off_while_the_others_get_everything() {
    let node = TestNode::start(); // test_min: 16 KiB outbound queue per terminal
    call(
        &node,
        "POST",
        "/v1/groups",
        Some(json!({"id": "busy", "name": "Busy", "owner": "pub", "members": ["r1", "r2", "slow"]})),
    );
    let mut stalled = stalled_terminal(&node, "slow");
    // Once it is closed as a slow consumer, the stalled terminal reads what reached it: its
    // backlog was dropped, so the close (4002, saying why) comes right after.
    let admin = node.admin();
    let goodbye = std::thread::spawn(move || {
        use std::io::Read;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let metrics = admin.request("GET", "/metrics", None).unwrap().text();
            let closed = metrics
                .lines()
                .filter(|l| l.starts_with("ether_connections_closed_total") && l.contains("slow_consumer"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>();
            if closed > 0.0 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "never closed as a slow consumer");
            std::thread::sleep(Duration::from_millis(10));
        }
        stalled.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut all = Vec::new();
        let _ = stalled.read_to_end(&mut all);
        all
    });
    let readers: Vec<_> = ["r1", "r2"]
        .iter()
        .map(|u| {
            let mut t = node.terminal(u, "phone");
            std::thread::spawn(move || {
                let mut seqs = Vec::new();
                while seqs.len() < 600 {
                    let m = next_msg(&mut t);
                    seqs.push(m.seq);
                    if seqs.len() % 100 == 0 {
                        t.ack_group("busy", m.seq).unwrap();
                    }
                }
                seqs
            })
        })
        .collect();
    let pad = "x".repeat(400);
    for i in 0..600 {
        let (status, v) =
            call(&node, "POST", "/v1/groups/busy/messages", Some(group_text("pub", &format!("{i} {pad}"))));
        assert_eq!(status, 200, "{v}");
    }
    for r in readers {
        assert_eq!(r.join().unwrap(), (1..=600).collect::<Vec<u64>>(), "every message, in order, to the readers");
    }
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(slow_consumer_closes(&node), 1.0, "the stalled member was closed as a slow consumer");
    let got = goodbye.join().unwrap();
    // A close frame: FIN + opcode 8, unmasked, payload = code 4002 (0x0FA2) + reason.
    let close = got.windows(4).rposition(|w| w[0] == 0x88 && w[1] < 126 && w[2] == 0x0F && w[3] == 0xA2);
    assert!(close.is_some(), "no 4002 close frame in the last {} bytes", got.len().min(64));
    let closes: Value =
        serde_json::from_slice(&node.admin().request("GET", "/admin/v1/connections", None).unwrap().body).unwrap();
    assert!(closes["recent_closes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["user"] == "slow" && c["reason"] == "slow_consumer"));
}

#[test]
fn the_business_sends_as_the_system_and_groups_per_user_are_limited() {
    let node = TestNode::start(); // test_min: 4 groups per user
    call(&node, "POST", "/v1/groups", Some(json!({"id": "news", "name": "News", "owner": "ned", "members": ["ola"]})));
    let mut ola = node.terminal("ola", "phone");
    let (status, v) = call(
        &node,
        "POST",
        "/v1/groups/news/messages",
        Some(json!({"kind": "text", "body": {"text": "from the system"}})),
    );
    assert_eq!(status, 200, "{v}");
    let m = next_msg(&mut ola);
    assert_eq!(
        (m.from.as_str(), m.chat.as_str(), m.body["text"].as_str()),
        ("system", "g:news", Some("from the system"))
    );
    // Nobody else speaks as the system: no terminal token is minted for it.
    let (status, v) = call(&node, "POST", "/v1/tokens", Some(json!({"user": "system"})));
    assert_eq!((status, v["error"]["code"].as_str()), (400, Some("invalid_body")), "{v}");
    assert!(v["error"]["message"].as_str().unwrap_or("").contains("reserved"), "{v}");
    // ola is in 1 group; 3 more are fine, the 5th is refused with a clear error.
    for i in 0..3 {
        let (status, _) =
            call(&node, "POST", "/v1/groups", Some(json!({"id": format!("g{i}"), "name": "x", "owner": "ola"})));
        assert_eq!(status, 201);
    }
    let (status, v) =
        call(&node, "POST", "/v1/groups", Some(json!({"id": "g9", "name": "x", "owner": "pam", "members": ["ola"]})));
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("ola"), "{v}");
    let (status, _) = call(&node, "POST", "/v1/groups", Some(json!({"id": "g8", "name": "x", "owner": "pam"})));
    assert_eq!(status, 201);
    let (status, _) = call(&node, "POST", "/v1/groups/g8/members", Some(json!({"members": ["ola"]})));
    assert_eq!(status, 400);
    let (_, mine) = call(&node, "GET", "/v1/users/ola/groups", None);
    assert_eq!(mine["groups"].as_array().unwrap().len(), 4);
}

/// A terminal that connects while its group is busy gets every message after its `welcome`
/// heads: a message committed after its heads were read, but before it joined the group's
/// fan-out, is within the heads (so the terminal syncs it), never silently skipped. Checked
/// on many connects racing a steady stream of group messages.
#[test]
fn a_terminal_connecting_while_its_group_is_busy_misses_nothing() {
    let node = std::sync::Arc::new(TestNode::start());
    call(
        &node,
        "POST",
        "/v1/groups",
        Some(json!({"id": "busy2", "name": "Busy", "owner": "pub", "members": ["joiner"]})),
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = {
        let (node, stop) = (node.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (status, v) =
                    call(&node, "POST", "/v1/groups/busy2/messages", Some(group_text("pub", &n.to_string())));
                assert_eq!(status, 200, "{v}");
                n += 1;
            }
            n
        })
    };
    for i in 0..150 {
        let (mut t, welcome) =
            ether_sdk::TerminalClient::connect(&node.ws_url(), &node.token("joiner"), &format!("d{i}"), "web").unwrap();
        let head = welcome.groups.get("busy2").copied().unwrap_or(0);
        // The first live message of the group must be the one right after the head.
        let m = next_msg(&mut t);
        assert_eq!(m.chat, "g:busy2");
        assert!(m.seq <= head + 1, "connect {i}: welcome head {head}, first live message {}: a gap", m.seq);
        drop(t);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(publisher.join().unwrap() > 150);
}

/// A membership change racing a terminal's connect: the terminal's fan-out follows the
/// membership as it stands once the terminal is connected. A member added after the store
/// read the terminal's heads, but told to its home shard before the terminal joined its
/// groups' fan-out, used to be left out of that group's pushes for the whole connection (and
/// a member removed then kept getting the group's messages). Many connects, each with a
/// member added to one group and removed from another at a different moment of the connect;
/// then a message to each, and one to a third group as a marker: the marker must come after
/// the added group's message, with nothing of the group it left.
#[test]
fn a_membership_change_racing_a_connect_applies_to_the_new_terminal() {
    let node = std::sync::Arc::new(TestNode::start());
    for i in 0..300 {
        let user = format!("racer{i}");
        let (added, left, marker) = (format!("add{i}"), format!("left{i}"), format!("mark{i}"));
        let owner = format!("owner{i}");
        let create = |id: &str, members: &[&str]| {
            let body = json!({"id": id, "name": id, "owner": owner, "members": members});
            let (status, v) = call(&node, "POST", "/v1/groups", Some(body));
            assert_eq!(status, 201, "{v}");
        };
        create(&added, &[]);
        create(&left, &[&user]);
        create(&marker, &[&user]);
        let start = std::sync::Arc::new(std::sync::Barrier::new(2));
        let changer = {
            let (node, start, user, added, left) =
                (node.clone(), start.clone(), user.clone(), added.clone(), left.clone());
            std::thread::spawn(move || {
                start.wait();
                std::thread::sleep(Duration::from_micros(150 * (i % 24)));
                let (status, v) =
                    call(&node, "POST", &format!("/v1/groups/{added}/members"), Some(json!({"members": [user]})));
                assert_eq!(status, 200, "{v}");
                let (status, v) = call(&node, "DELETE", &format!("/v1/groups/{left}/members/{user}"), None);
                assert_eq!(status, 200, "{v}");
            })
        };
        start.wait();
        let mut t = node.terminal(&user, "phone");
        changer.join().unwrap();
        for (group, text) in [(&added, "to the new member"), (&left, "after it left"), (&marker, "marker")] {
            let (status, v) =
                call(&node, "POST", &format!("/v1/groups/{group}/messages"), Some(group_text(&owner, text)));
            assert_eq!(status, 200, "{v}");
        }
        let mut got = Vec::new();
        loop {
            let m = next_msg(&mut t);
            assert_ne!(m.chat, format!("g:{left}"), "connect {i}: a message of the group it left: {got:?}");
            got.push(m.chat.clone());
            if m.chat == format!("g:{marker}") {
                break;
            }
        }
        assert_eq!(got, [format!("g:{added}"), format!("g:{marker}")], "connect {i}: the added group's message");
    }
}

/// A group dissolved while a member's terminal connects: the terminal, whose heads may have
/// been read before the dissolution, does not stay in the gone group's fan-out; and every
/// shard forgets the group before anything committed after the dissolution (what is posted
/// after its answer). So a group created right
/// after under the same id, without that member, sends it nothing. (Before, a terminal whose
/// heads were read before the dissolution joined the gone group's fan-out for good, and a
/// message posted right after the answer could still find the old fan-out on another shard.)
#[test]
fn a_dissolution_racing_a_connect_leaves_no_stale_membership() {
    let node = std::sync::Arc::new(TestNode::start());
    for i in 0..300 {
        let (user, owner) = (format!("dracer{i}"), format!("downer{i}"));
        let (gone, marker) = (format!("gone{i}"), format!("dmark{i}"));
        for (id, members) in [(&gone, vec![user.as_str()]), (&marker, vec![user.as_str()])] {
            let body = json!({"id": id, "name": id, "owner": owner, "members": members});
            let (status, v) = call(&node, "POST", "/v1/groups", Some(body));
            assert_eq!(status, 201, "{v}");
        }
        let start = std::sync::Arc::new(std::sync::Barrier::new(2));
        let dissolver = {
            let (node, start, gone) = (node.clone(), start.clone(), gone.clone());
            std::thread::spawn(move || {
                start.wait();
                std::thread::sleep(Duration::from_micros(150 * (i % 24)));
                let (status, v) = call(&node, "DELETE", &format!("/v1/groups/{gone}"), None);
                assert_eq!(status, 200, "{v}");
            })
        };
        start.wait();
        let mut t = node.terminal(&user, "phone");
        dissolver.join().unwrap();
        // The id again, for others only.
        let body = json!({"id": gone, "name": "new", "owner": owner, "members": []});
        let (status, v) = call(&node, "POST", "/v1/groups", Some(body));
        assert_eq!(status, 201, "{v}");
        for (group, text) in [(&gone, "not for the old members"), (&marker, "marker")] {
            let (status, v) =
                call(&node, "POST", &format!("/v1/groups/{group}/messages"), Some(group_text(&owner, text)));
            assert_eq!(status, 200, "{v}");
        }
        let m = next_msg(&mut t);
        assert_eq!(
            (m.chat.as_str(), m.body["text"].as_str()),
            (format!("g:{marker}").as_str(), Some("marker")),
            "connect {i}"
        );
    }
}

/// Group messages are acknowledged and pushed again like inbox ones: a member that does not
/// ack gets what it was pushed live again after `limits.resend_timeout_ms` (1 s in tests),
/// then after twice as long, at most `limits.resend_attempts_max` (2) times, and nothing more
/// once it acks; a member that acks gets each message once; a member added while online is
/// pushed again only what came after it joined. Before, group messages were never pushed
/// again within a connection (only `sync` after a reconnect recovered them).
#[test]
fn group_messages_not_acked_are_pushed_again() {
    use ether_engine::shard::home_shard;
    let node = TestNode::start();
    let shards = node.config.node.shards;
    // The new member alone on its shard, so that shard fans out nothing of the group before
    // it joins (its first push is where its live pushes begin).
    let on = |shard: usize, stem: &str| {
        (0..).map(|i| format!("{stem}{i}")).find(|u| home_shard(u, shards) == shard).unwrap()
    };
    let (slow, quick, late) = (on(0, "slow"), on(0, "quick"), on(1, "late"));
    let (slow, quick, late) = (slow.as_str(), quick.as_str(), late.as_str());
    let body = json!({"id": "rs", "name": "Rs", "owner": quick, "members": [slow, quick]});
    let (status, v) = call(&node, "POST", "/v1/groups", Some(body));
    assert_eq!(status, 201, "{v}");
    let mut slow_t = node.terminal(slow, "phone");
    let mut quick_t = node.terminal(quick, "phone");
    let mut late_t = node.terminal(late, "phone");
    let post = |text: &str| {
        let (status, v) = call(&node, "POST", "/v1/groups/rs/messages", Some(group_text(quick, text)));
        assert_eq!(status, 200, "{v}");
        v["id"].as_str().unwrap().to_owned()
    };
    let first = post("one");
    assert_eq!(next_msg(&mut slow_t).id, first);
    let q = next_msg(&mut quick_t);
    quick_t.ack_group("rs", q.seq).unwrap();
    let (status, v) = call(&node, "POST", "/v1/groups/rs/members", Some(json!({"members": [late]})));
    assert_eq!(status, 200, "{v}");
    let second = post("two");
    assert_eq!(next_msg(&mut slow_t).id, second);
    assert_eq!(next_msg(&mut late_t).id, second, "the new member gets what came after it joined");
    let q = next_msg(&mut quick_t);
    quick_t.ack_group("rs", q.seq).unwrap();
    // Neither `slow` nor `late` acks: both are pushed again what they were pushed live.
    let again: Vec<String> = (0..2).map(|_| next_msg(&mut slow_t).id).collect();
    assert_eq!(again, [first.clone(), second.clone()], "slow: both again, in order");
    assert_eq!(next_msg(&mut late_t).id, second, "late: only what came after it joined");
    // The second resend, twice the timeout later; then no more (2 attempts).
    let again: Vec<String> = (0..2).map(|_| next_msg(&mut slow_t).id).collect();
    assert_eq!(again, [first, second.clone()]);
    // `late` acks: nothing more for it; `slow` has had its two resends.
    let m = next_msg(&mut late_t);
    assert_eq!(m.id, second);
    late_t.ack_group("rs", m.seq).unwrap();
    assert_silent(&mut slow_t, Duration::from_millis(4500));
    assert_silent(&mut late_t, Duration::from_millis(500));
    assert_silent(&mut quick_t, Duration::from_millis(100));
}

/// Each shard's `group_fanouts`: group messages it was handed to fan out.
fn group_fanouts(node: &TestNode) -> Vec<u64> {
    let r = node.admin().request("GET", "/admin/v1/stats", None).unwrap();
    let stats: Value = serde_json::from_slice(&r.body).unwrap();
    stats["shards"].as_array().unwrap().iter().map(|s| s["group_fanouts"].as_u64().unwrap()).collect()
}

/// The shard each connected terminal of `user` lives on.
fn shard_of(node: &TestNode, user: &str) -> u64 {
    let r = node.admin().request("GET", "/admin/v1/connections", None).unwrap();
    let conns: Value = serde_json::from_slice(&r.body).unwrap();
    let c = conns["connections"].as_array().unwrap().iter().find(|c| c["user"] == user).expect("connected");
    c["shard"].as_u64().unwrap()
}

/// A group message is handed only to the shards with a member of the group online: a shard
/// with none (only other users' terminals) is not handed the group's messages at all, while
/// the member's shard fans out every one. Then a member comes online on the other shard: from
/// then on both are handed them, and it gets everything after its welcome.
#[test]
fn group_messages_go_only_to_shards_with_members_online() {
    let node = TestNode::start();
    // Terminals on both shards; the group's one online member is on one of them.
    let mut terminals: Vec<(String, _)> =
        (0..8).map(|i| format!("fan{i}")).map(|u| (u.clone(), node.terminal(&u, "phone"))).collect();
    let member = terminals[0].0.clone();
    let member_shard = shard_of(&node, &member);
    let other =
        terminals.iter().position(|(u, _)| shard_of(&node, u) != member_shard).expect("a user on the other shard");
    let (status, v) = call(
        &node,
        "POST",
        "/v1/groups",
        Some(json!({"id": "fan", "name": "Fan", "owner": "owner", "members": [member.clone(), "away"]})),
    );
    assert_eq!(status, 201, "{v}");
    // The terminals were taken on a while ago (a shard taking one on is handed every group's
    // messages until its next tick).
    std::thread::sleep(Duration::from_millis(700));
    let before = group_fanouts(&node);
    for i in 0..20 {
        let (status, v) = call(&node, "POST", "/v1/groups/fan/messages", Some(group_text("owner", &i.to_string())));
        assert_eq!(status, 200, "{v}");
    }
    for i in 0..20u64 {
        let m = next_msg(&mut terminals[0].1);
        assert_eq!((m.chat.as_str(), m.seq), ("g:fan", i + 1));
    }
    let after = group_fanouts(&node);
    let handed = |shard: u64| after[shard as usize] - before[shard as usize];
    assert_eq!(handed(member_shard), 20, "the member's shard fans out every message");
    assert_eq!(handed(1 - member_shard), 0, "the shard with no member online is handed none");

    // The user on the other shard joins: its shard is handed the group's messages from now on.
    let joiner = terminals[other].0.clone();
    let (status, v) = call(&node, "POST", "/v1/groups/fan/members", Some(json!({"members": [joiner]})));
    assert_eq!(status, 200, "{v}");
    let before = group_fanouts(&node);
    let (status, v) = call(&node, "POST", "/v1/groups/fan/messages", Some(group_text("owner", "both")));
    assert_eq!(status, 200, "{v}");
    for t in [0, other] {
        let m = next_msg(&mut terminals[t].1);
        assert_eq!((m.chat.as_str(), m.seq, m.body["text"].as_str()), ("g:fan", 21, Some("both")));
    }
    let after = group_fanouts(&node);
    assert_eq!(after[0] - before[0], 1);
    assert_eq!(after[1] - before[1], 1);
}

/// Cluster mode: a terminal that joins a shard where other members of a group are online must
/// not make the shard skip what those members have not been pushed yet. Its `welcome` head
/// comes from the shared store, which can be ahead of what the bus has brought this node (a
/// message in flight, or one the bus lost): the shard goes on from what it pushed, so the
/// members already here get those messages (here: with the group's next one, which shows the
/// gap), and the new terminal at worst gets again what its head counts (terminals dedupe by id).
#[test]
fn cluster_a_member_connecting_does_not_make_the_others_skip_what_the_bus_has_not_brought() {
    use ether_proto::Kind;
    let Some(redis) = ether_store::redis::TestRedis::start_or_skip() else { return };
    let node = |id: &str| {
        let (url, id) = (redis.url(), id.to_owned());
        TestNode::with(move |c| {
            c.cluster.redis_url = Some(url);
            c.node.id = id;
        })
    };
    let (a, b) = (node("node-a"), node("node-b"));
    let mut phone = b.terminal("hal", "phone");
    a.gateway().create_group(Some("crew"), "Crew", "carol", &["hal"]).unwrap();
    std::thread::sleep(Duration::from_millis(200)); // membership crosses the bus
    let post = |text: &str| {
        a.gateway().send_group_message("crew", "carol", Kind::Text, &json!({ "text": text }), None).unwrap();
    };
    post("announced");
    let m = next_msg(&mut phone);
    assert_eq!((m.body["text"].as_str(), m.seq), (Some("announced"), 1));
    phone.ack_msg(&m).unwrap();
    // Stored, but not (yet) on the bus: as if in flight.
    store_group_text_behind_the_bus(&redis.url(), "crew", "carol", "in flight");
    // hal's second terminal, on the same shard (same user): its welcome counts seq 2.
    let (mut web, welcome) = ether_sdk::TerminalClient::connect(&b.ws_url(), &b.token("hal"), "web", "web").unwrap();
    assert_eq!(welcome.groups.get("crew"), Some(&2));
    post("next");
    let mut got: Vec<(u64, String)> = Vec::new();
    while let Some(f) = phone.recv(Duration::from_secs(1)).unwrap() {
        if let ServerFrame::Msg(m) = f {
            phone.ack_msg(&m).unwrap();
            got.push((m.seq, m.body["text"].as_str().unwrap_or("").to_owned()));
        }
    }
    assert_eq!(got, [(2, "in flight".to_owned()), (3, "next".to_owned())], "the phone misses nothing");
    let last = web.recv_until(|f| matches!(f, ServerFrame::Msg(m) if m.seq == 3), WAIT).unwrap();
    assert!(matches!(last, ServerFrame::Msg(m) if m.body["text"] == "next"));
}

/// An add and a removal of the same user, sent at once on two connections (served by whichever
/// shards took them), many times over: after both answered, the user's online terminal is in
/// the group's fan-out exactly when the store lists it as a member: the next message of the
/// group reaches it then, and only then. Before, the serving shards announced each change to
/// the user's home shard after the store answered, each through its own queue, so the two
/// could reach it in the other order than the store committed them: the terminal stayed in
/// the fan-out of a group it had left (getting its messages), or out of one it was in.
#[test]
fn racing_membership_changes_leave_the_fan_out_as_the_store_has_it() {
    let node = std::sync::Arc::new(TestNode::start());
    let (user, owner) = ("flipper", "flipowner");
    for (id, members) in [("flip", vec![]), ("flipmark", vec![user])] {
        let body = json!({"id": id, "name": id, "owner": owner, "members": members});
        let (status, v) = call(&node, "POST", "/v1/groups", Some(body));
        assert_eq!(status, 201, "{v}");
    }
    let mut t = node.terminal(user, "phone");
    let mut mismatches = Vec::new();
    for i in 0..400 {
        let start = std::sync::Arc::new(std::sync::Barrier::new(2));
        let remover = {
            let (node, start) = (node.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                let (status, v) = call(&node, "DELETE", &format!("/v1/groups/flip/members/{user}"), None);
                assert_eq!(status, 200, "{v}");
            })
        };
        start.wait();
        let (status, v) = call(&node, "POST", "/v1/groups/flip/members", Some(json!({"members": [user]})));
        assert_eq!(status, 200, "{v}");
        remover.join().unwrap();
        let (status, v) = call(&node, "GET", "/v1/groups/flip/members?limit=10", None);
        assert_eq!(status, 200, "{v}");
        let member = v["members"].as_array().unwrap().iter().any(|m| m == user);
        let (text, mark) = (format!("flip {i}"), format!("mark {i}"));
        for (group, text) in [("flip", &text), ("flipmark", &mark)] {
            let (status, v) =
                call(&node, "POST", &format!("/v1/groups/{group}/messages"), Some(group_text(owner, text)));
            assert_eq!(status, 200, "{v}");
        }
        // Up to the marker (resends of earlier messages, not acknowledged, may come too).
        let mut got = false;
        loop {
            let m = next_msg(&mut t);
            match m.body["text"].as_str() {
                Some(s) if s == mark => break,
                Some(s) if s == text => got = true,
                _ => {}
            }
        }
        if got != member {
            mismatches.push((i, member));
        }
    }
    assert!(
        mismatches.is_empty(),
        "(round, member in the store) where the terminal's fan-out disagreed: {mismatches:?}"
    );
}
