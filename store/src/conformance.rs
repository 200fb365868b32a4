//! The conformance suite: properties every [`StoreBackend`] must have, written against the
//! trait only. `make` must return a fresh, empty store each call. Panics (assert) on failure.
//!
//! Run everything with [`run_all`]; each property is also a pub fn so a backend's tests can
//! name them one by one. Thread-level properties ([`thread_completions_in_order`],
//! [`thread_concurrent_submitters`]) go through [`StoreThread`].
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ether_proto::Kind;

use crate::op::*;
use crate::thread::{StoreCmd, StoreOptions, StoreThread};
use crate::{StoreBackend, StoreError};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh, time-ordered message id (the engine's layout: `ms << 20 | counter`).
pub fn next_id() -> u64 {
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    (ms << 20) + (COUNTER.fetch_add(1, Ordering::Relaxed) & 0xF_FFFF)
}

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A text message op.
pub fn text(from: &str, to: &str, cid: Option<&str>, text: &str) -> Op {
    Op::Append(NewMessage {
        id: next_id(),
        ts: now_ms(),
        from: from.into(),
        to: to.into(),
        kind: Kind::Text,
        body: serde_json::json!({ "text": text }).to_string(),
        cid: cid.map(Into::into),
    })
}

/// A group text message op.
pub fn group_text(from: &str, group: &str, cid: Option<&str>, text: &str) -> Op {
    Op::AppendGroup(NewGroupMessage {
        id: next_id(),
        ts: now_ms(),
        from: from.into(),
        group: group.into(),
        kind: Kind::Text,
        body: serde_json::json!({ "text": text }).to_string(),
        cid: cid.map(Into::into),
        system: false,
    })
}

fn ok<B: StoreBackend>(b: &mut B, op: Op) -> Reply {
    match b.apply(op.clone()) {
        Ok(r) => r,
        Err(e) => panic!("{op:?} failed: {e}"),
    }
}

fn send<B: StoreBackend>(b: &mut B, from: &str, to: &str, t: &str) -> Appended {
    ok(b, text(from, to, None, t)).appended().expect("appended")
}

fn inbox<B: StoreBackend>(b: &mut B, user: &str) -> Vec<Entry> {
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let p = ok(b, Op::ReadInbox { user: user.into(), after_seq: after, limit: 7 }).page().expect("page");
        if let Some(last) = p.entries.last() {
            assert!(last.seq <= p.scanned_to);
        }
        assert!(p.scanned_to >= after || p.entries.is_empty());
        after = p.scanned_to;
        all.extend(p.entries);
        if !p.more {
            return all;
        }
    }
}

/// The op creating group `id` (titled "`id` title") of `owner` with `members`, within roomy
/// limits (100 members, 100 groups per user).
pub fn group_op(id: &str, owner: &str, members: &[&str]) -> Op {
    Op::CreateGroup {
        id: Some(id.into()),
        name: format!("{id} title"),
        owner: owner.into(),
        members: members.iter().map(|s| s.to_string()).collect(),
        created_ms: 1,
        members_max: 100,
        groups_per_user_max: 100,
    }
}

fn create_group<B: StoreBackend>(b: &mut B, id: &str, owner: &str, members: &[&str]) {
    ok(b, group_op(id, owner, members));
}

fn body_text(e: &Entry) -> String {
    let v: serde_json::Value = serde_json::from_str(&e.body).expect("json body");
    v["text"].as_str().unwrap_or_default().to_owned()
}

/// A user in `groups_per_user_max` groups cannot join another, by create or by add; nothing
/// of the refused op remains.
pub fn groups_per_user_limited<B: StoreBackend>(mut b: B) {
    let create = |id: &str, owner: &str, members: &[&str]| Op::CreateGroup {
        id: Some(id.into()),
        name: id.into(),
        owner: owner.into(),
        members: members.iter().map(|s| s.to_string()).collect(),
        created_ms: 1,
        members_max: 100,
        groups_per_user_max: 2,
    };
    ok(&mut b, create("g1", "o1", &["busy"]));
    ok(&mut b, create("g2", "o2", &["busy"]));
    assert!(matches!(b.apply(create("g3", "o3", &["busy", "free"])), Err(StoreError::LimitExceeded(_))));
    assert!(matches!(b.apply(Op::GetGroup { group: "g3".into() }), Err(StoreError::NotFound)), "no half-made group");
    ok(&mut b, create("g4", "o4", &[]));
    let add = |users: &[&str]| Op::AddMembers {
        group: "g4".into(),
        users: users.iter().map(|s| s.to_string()).collect(),
        members_max: 100,
        groups_per_user_max: 2,
    };
    assert!(matches!(b.apply(add(&["free", "busy"])), Err(StoreError::LimitExceeded(_))));
    assert_eq!(ok(&mut b, add(&["free"])), Reply::Count(1));
    let g = ok(&mut b, Op::GetGroup { group: "g4".into() }).group().expect("group");
    assert_eq!(g.member_count, 2, "owner and free only");
}

/// The business may send to a group as the system without being a member; members may not
/// be impersonated by it (a non-member `from` without `system` is still refused).
pub fn system_sends_to_a_group<B: StoreBackend>(mut b: B) {
    create_group(&mut b, "sys", "o", &["m"]);
    let mut op = group_text("system", "sys", None, "maintenance at 5");
    assert!(matches!(b.apply(op.clone()), Err(StoreError::Forbidden(_))));
    if let Op::AppendGroup(m) = &mut op {
        m.system = true;
    }
    let Reply::GroupAppended(a) = ok(&mut b, op) else { panic!("not appended") };
    assert_eq!(a.seq, 1);
    let page = ok(&mut b, Op::ReadGroup { group: "sys".into(), after_seq: 0, limit: 10 }).page().expect("page");
    assert_eq!(page.entries.len(), 1);
    assert_eq!(page.entries[0].from, "system");
}

/// Runs every backend-level property, each on a fresh store, with `maintain` runs between
/// steps where they matter.
pub fn run_all<B: StoreBackend>(make: impl Fn() -> B) {
    single_chat_both_inboxes(make());
    self_chat(make());
    idempotent_cid(make());
    cid_of_a_single_chat_is_not_a_group_post(make());
    system_posts_with_one_cid_reach_every_group(make());
    group_cid_retry_is_the_first_post(make());
    group_cid_retry_after_leaving_is_the_first_post(make());
    paging_concatenates(make());
    history_orders(make());
    filtered_history_moves_past_a_scan_budget(make());
    positions_past_any_seq(make());
    heads_and_sync(make());
    delivery_never_backwards(make());
    delivery_positions_in_one_batch(make());
    messages_in_one_batch(make());
    read_never_backwards(make());
    unread_counts(make());
    outbox_in_order(make());
    groups_lifecycle(make());
    group_membership_enforced(make());
    groups_per_user_limited(make());
    system_sends_to_a_group(make());
    group_reads(make());
    late_joiners(make());
    batch_isolation(make());
    invalid_input(make());
    retention_purge(make());
    token_revocations(make());
    random_interleavings(&make);
}

/// A single-chat message lands in both inboxes, with each inbox's own gap-free seq and the
/// chat named from the owner's side.
pub fn single_chat_both_inboxes<B: StoreBackend>(mut b: B) {
    let a1 = send(&mut b, "alice", "bob", "hi bob");
    assert_eq!((a1.receiver_seq, a1.sender_seq, a1.duplicate), (1, Some(1), false));
    let a2 = send(&mut b, "carol", "bob", "hi from carol");
    assert_eq!((a2.receiver_seq, a2.sender_seq), (2, Some(1)));
    let _ = b.maintain(u64::MAX);
    let a3 = send(&mut b, "bob", "alice", "hi alice");
    assert_eq!((a3.receiver_seq, a3.sender_seq), (2, Some(3)));
    let bob = inbox(&mut b, "bob");
    let seqs: Vec<u64> = bob.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [1, 2, 3]);
    assert_eq!(bob.iter().map(|e| e.chat.as_str()).collect::<Vec<_>>(), ["u:alice", "u:carol", "u:alice"]);
    assert_eq!(bob[0].from, "alice");
    assert_eq!(bob[2].from, "bob");
    assert_eq!(bob[0].id, a1.id);
    assert_eq!(body_text(&bob[1]), "hi from carol");
    let alice = inbox(&mut b, "alice");
    assert_eq!(alice.len(), 2);
    assert_eq!((alice[0].chat.as_str(), alice[0].seq), ("u:bob", 1));
    assert_eq!((alice[1].chat.as_str(), alice[1].from.as_str()), ("u:bob", "bob"));
    assert!(inbox(&mut b, "nobody").is_empty());
}

/// A message to oneself takes one position and has no sender seq.
pub fn self_chat<B: StoreBackend>(mut b: B) {
    let a = send(&mut b, "me", "me", "note");
    assert_eq!((a.receiver_seq, a.sender_seq), (1, None));
    let e = inbox(&mut b, "me");
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].chat, "u:me");
}

/// A repeated `(from, cid)` returns the first result and stores nothing new, in the same
/// batch or later, before and after background index work; another sender's cid is its own.
pub fn idempotent_cid<B: StoreBackend>(mut b: B) {
    let first = ok(&mut b, text("alice", "bob", Some("c1"), "once")).appended().expect("appended");
    assert!(!first.duplicate);
    let again = ok(&mut b, text("alice", "bob", Some("c1"), "twice")).appended().expect("appended");
    assert!(again.duplicate);
    assert_eq!(
        (again.id, again.ts, again.receiver_seq, again.sender_seq),
        (first.id, first.ts, first.receiver_seq, first.sender_seq)
    );
    while b.maintain(u64::MAX).unwrap_or(false) {}
    let r = b.apply_batch(&[
        text("alice", "bob", Some("c1"), "thrice"),
        text("alice", "bob", Some("c2"), "new"),
        text("alice", "bob", Some("c2"), "new again"),
        text("carol", "bob", Some("c1"), "carol's own c1"),
    ]);
    let r: Vec<Appended> = r.into_iter().map(|r| r.and_then(Reply::appended).expect("appended")).collect();
    assert!(r[0].duplicate && r[0].id == first.id);
    assert!(!r[1].duplicate && r[1].receiver_seq == 2);
    assert!(r[2].duplicate && r[2].id == r[1].id);
    assert!(!r[3].duplicate && r[3].receiver_seq == 3);
    let bob = inbox(&mut b, "bob");
    assert_eq!(bob.len(), 3);
    assert_eq!(body_text(&bob[0]), "once");
    assert_eq!(bob[0].cid.as_deref(), Some("c1"));
}

/// A system (business) post to a group: `from` names the system, no membership needed.
fn system_post(from: &str, group: &str, cid: Option<&str>, text: &str) -> Op {
    let mut op = group_text(from, group, cid, text);
    if let Op::AppendGroup(m) = &mut op {
        m.system = true;
    }
    op
}

fn group_log<B: StoreBackend>(b: &mut B, group: &str) -> Vec<Entry> {
    ok(b, Op::ReadGroup { group: group.into(), after_seq: 0, limit: 1000 }).page().expect("page").entries
}

/// A cid is scoped: a sender's single chats share one cid space, each group it posts to has
/// its own. The same cid from the same sender in a single chat and then in a group (or the
/// other way round) is two messages, each with its own stream's seq; before and after
/// background index work.
pub fn cid_of_a_single_chat_is_not_a_group_post<B: StoreBackend>(mut b: B) {
    create_group(&mut b, "crew", "ann", &["bob"]);
    for i in 0..3 {
        send(&mut b, "ann", "bob", &format!("warm-up {i}"));
    }
    for (round, cid) in ["k1", "k2"].into_iter().enumerate() {
        let single = ok(&mut b, text("ann", "bob", Some(cid), "single")).appended().expect("appended");
        assert!(!single.duplicate, "{cid}");
        if round == 1 {
            while b.maintain(u64::MAX).unwrap_or(false) {}
        }
        let post = ok(&mut b, group_text("ann", "crew", Some(cid), "group")).group_appended().expect("group");
        assert!(!post.duplicate, "{cid}: a group post is not the single message with the same cid");
        assert_ne!(post.id, single.id);
        assert_eq!(post.seq, round as u64 + 1, "{cid}: the group's own seq");
        let log = group_log(&mut b, "crew");
        assert_eq!(log.last().map(|e| (e.id, e.seq, body_text(e))), Some((post.id, post.seq, "group".into())));
    }
    // Group first, then a single chat with the same cid.
    let post = ok(&mut b, group_text("ann", "crew", Some("k3"), "group first")).group_appended().expect("group");
    let _ = b.maintain(u64::MAX);
    let single = ok(&mut b, text("ann", "bob", Some("k3"), "then single")).appended().expect("appended");
    assert!(!single.duplicate);
    assert_ne!(single.id, post.id);
    assert_eq!((single.receiver_seq, single.sender_seq), (6, Some(6)), "inbox seqs, not the group's");
    // Each is still its own scope's retry.
    let again = ok(&mut b, text("ann", "bob", Some("k3"), "retry")).appended().expect("appended");
    assert!(again.duplicate && again.id == single.id && again.receiver_seq == 6);
    let again = ok(&mut b, group_text("ann", "crew", Some("k3"), "retry")).group_appended().expect("group");
    assert!(again.duplicate && again.id == post.id && again.seq == post.seq);
    let bob = inbox(&mut b, "bob");
    assert_eq!(bob.len(), 6);
    assert_eq!(group_log(&mut b, "crew").len(), 3);
}

/// The business posting as the system to several groups with one cid (`notice-1` to each)
/// stores one message in each group, each with that group's seq; one by one or in one batch.
pub fn system_posts_with_one_cid_reach_every_group<B: StoreBackend>(mut b: B) {
    for g in ["g1", "g2", "g3", "g4"] {
        create_group(&mut b, g, "owner", &["member"]);
    }
    ok(&mut b, group_text("owner", "g2", None, "g2 is ahead by one"));
    let p1 = ok(&mut b, system_post("biz", "g1", Some("notice-1"), "hello g1")).group_appended().expect("group");
    let p2 = ok(&mut b, system_post("biz", "g2", Some("notice-1"), "hello g2")).group_appended().expect("group");
    assert!(!p1.duplicate && !p2.duplicate, "g2 gets its own notice");
    assert_ne!(p1.id, p2.id);
    assert_eq!((p1.seq, p2.seq), (1, 2));
    let g2 = group_log(&mut b, "g2");
    assert_eq!(g2.last().map(|e| (e.id, e.from.as_str(), body_text(e))), Some((p2.id, "biz", "hello g2".into())));
    let _ = b.maintain(u64::MAX);
    let r = b.apply_batch(&[
        system_post("biz", "g3", Some("notice-2"), "hello g3"),
        system_post("biz", "g4", Some("notice-2"), "hello g4"),
        system_post("biz", "g1", Some("notice-2"), "hello g1 again"),
    ]);
    let r: Vec<GroupAppended> = r.into_iter().map(|r| r.and_then(Reply::group_appended).expect("group")).collect();
    assert!(r.iter().all(|p| !p.duplicate), "{r:?}");
    assert_eq!(r.iter().map(|p| p.seq).collect::<Vec<_>>(), [1, 1, 2]);
    for (g, n) in [("g1", 2), ("g2", 2), ("g3", 1), ("g4", 1)] {
        assert_eq!(group_log(&mut b, g).len(), n, "{g}");
    }
}

/// A retry in the same group (same sender, same group, same cid) is the first post again:
/// its id, ts and seq, `duplicate`, nothing stored; in the same batch or later, before and
/// after background index work, a member's and the system's alike.
pub fn group_cid_retry_is_the_first_post<B: StoreBackend>(mut b: B) {
    create_group(&mut b, "den", "ann", &["bob"]);
    create_group(&mut b, "lab", "ann", &[]);
    let first = ok(&mut b, group_text("ann", "den", Some("r1"), "once")).group_appended().expect("group");
    let other = ok(&mut b, group_text("ann", "lab", Some("r1"), "elsewhere")).group_appended().expect("group");
    assert!(!first.duplicate && !other.duplicate);
    let r = b.apply_batch(&[
        group_text("ann", "den", Some("r1"), "twice"),
        group_text("bob", "den", Some("r1"), "bob's own r1"),
        system_post("biz", "den", Some("r1"), "the system's own r1"),
        system_post("biz", "den", Some("r1"), "the system's retry"),
    ]);
    let r: Vec<GroupAppended> = r.into_iter().map(|r| r.and_then(Reply::group_appended).expect("group")).collect();
    assert_eq!((r[0].id, r[0].ts, r[0].seq, r[0].duplicate), (first.id, first.ts, first.seq, true));
    assert_eq!((r[1].seq, r[1].duplicate), (2, false), "another sender's cid is its own");
    assert_eq!((r[2].seq, r[2].duplicate), (3, false));
    assert_eq!((r[3].id, r[3].seq, r[3].duplicate), (r[2].id, 3, true));
    while b.maintain(u64::MAX).unwrap_or(false) {}
    let later = ok(&mut b, group_text("ann", "den", Some("r1"), "thrice")).group_appended().expect("group");
    assert_eq!((later.id, later.ts, later.seq, later.duplicate), (first.id, first.ts, first.seq, true));
    let later = ok(&mut b, group_text("ann", "lab", Some("r1"), "again")).group_appended().expect("group");
    assert_eq!((later.id, later.seq, later.duplicate), (other.id, other.seq, true));
    let den = group_log(&mut b, "den");
    assert_eq!(den.iter().map(body_text).collect::<Vec<_>>(), ["once", "bob's own r1", "the system's own r1"]);
}

/// A retry after the sender left the group is still the first post (its id, ts and seq,
/// `duplicate`, nothing stored): the cid is looked up before membership. A new cid from the
/// former member is refused, and so is its cid in another group it never posted to; in a
/// group dissolved and created again under the same name an old cid makes a new message.
pub fn group_cid_retry_after_leaving_is_the_first_post<B: StoreBackend>(mut b: B) {
    create_group(&mut b, "hall", "own", &["a1"]);
    create_group(&mut b, "side", "own", &[]);
    let first = ok(&mut b, group_text("a1", "hall", Some("c1"), "once")).group_appended().expect("group");
    assert_eq!((first.seq, first.duplicate), (1, false));
    ok(&mut b, Op::RemoveMember { group: "hall".into(), user: "a1".into() });
    let again = ok(&mut b, group_text("a1", "hall", Some("c1"), "retry")).group_appended().expect("group");
    assert_eq!((again.id, again.ts, again.seq, again.duplicate), (first.id, first.ts, first.seq, true));
    let r = b.apply_batch(&[
        group_text("a1", "hall", Some("c1"), "retry in a batch"),
        group_text("a1", "hall", Some("c2"), "a new cid"),
        group_text("a1", "hall", None, "no cid"),
        group_text("a1", "side", Some("c1"), "its cid in another group"),
    ]);
    assert_eq!(r.len(), 4);
    let mut r = r.into_iter();
    let dup = r.next().expect("reply").and_then(Reply::group_appended).expect("group");
    assert_eq!((dup.id, dup.seq, dup.duplicate), (first.id, first.seq, true));
    for (i, refused) in r.enumerate() {
        assert!(matches!(refused, Err(StoreError::Forbidden(_))), "{i}: {refused:?}");
    }
    while b.maintain(u64::MAX).unwrap_or(false) {}
    let later = ok(&mut b, group_text("a1", "hall", Some("c1"), "retry later")).group_appended().expect("group");
    assert_eq!((later.id, later.ts, later.seq, later.duplicate), (first.id, first.ts, first.seq, true));
    assert!(matches!(b.apply(group_text("a1", "hall", Some("c3"), "new")), Err(StoreError::Forbidden(_))));
    let hall = group_log(&mut b, "hall");
    assert_eq!(hall.iter().map(body_text).collect::<Vec<_>>(), ["once"]);
    // Dissolved and created again under the same name: another scope for the old cid.
    ok(&mut b, Op::DissolveGroup { group: "hall".into() });
    create_group(&mut b, "hall", "own", &[]);
    assert!(
        matches!(b.apply(group_text("a1", "hall", Some("c1"), "not a member")), Err(StoreError::Forbidden(_))),
        "the old group's cid does not answer in the new one"
    );
    ok(
        &mut b,
        Op::AddMembers { group: "hall".into(), users: vec!["a1".into()], members_max: 100, groups_per_user_max: 100 },
    );
    let fresh = ok(&mut b, group_text("a1", "hall", Some("c1"), "new group")).group_appended().expect("group");
    assert_eq!((fresh.seq, fresh.duplicate), (1, false));
    assert_ne!(fresh.id, first.id);
}

/// Inbox pages (bounded) concatenate to the whole inbox, in order, without gaps.
pub fn paging_concatenates<B: StoreBackend>(mut b: B) {
    for i in 0..60 {
        let from = format!("u{}", i % 5);
        send(&mut b, &from, "reader", &format!("m{i}"));
        if i % 17 == 0 {
            let _ = b.maintain(u64::MAX);
        }
    }
    let all = inbox(&mut b, "reader");
    assert_eq!(all.len(), 60);
    for (i, e) in all.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1);
        assert_eq!(body_text(e), format!("m{i}"));
    }
    let p = ok(&mut b, Op::ReadInbox { user: "reader".into(), after_seq: 55, limit: 100 }).page().expect("page");
    assert_eq!(p.entries.len(), 5);
    assert!(!p.more);
    assert_eq!(p.head, 60);
    let huge =
        ok(&mut b, Op::ReadInbox { user: "reader".into(), after_seq: 0, limit: usize::MAX }).page().expect("page");
    assert!(huge.entries.len() <= PAGE_LIMIT_MAX);
}

/// History: newest-first by default and from `before_seq`, oldest-first with only
/// `after_seq`, filtered by chat.
pub fn history_orders<B: StoreBackend>(mut b: B) {
    for i in 1..=10 {
        let from = if i % 2 == 0 { "even" } else { "odd" };
        send(&mut b, from, "h", &format!("{i}"));
    }
    let _ = b.maintain(u64::MAX);
    let q = |chat: Option<&str>, before, after, limit| {
        Op::History(HistoryQuery {
            user: "h".into(),
            chat: chat.map(Into::into),
            before_seq: before,
            after_seq: after,
            limit,
        })
    };
    let seqs = |r: Reply| -> Vec<u64> { r.page().expect("page").entries.iter().map(|e| e.seq).collect() };
    assert_eq!(seqs(ok(&mut b, q(None, None, None, 3))), [10, 9, 8]);
    assert_eq!(seqs(ok(&mut b, q(None, Some(8), None, 3))), [7, 6, 5]);
    assert_eq!(seqs(ok(&mut b, q(None, None, Some(7), 10))), [8, 9, 10]);
    assert_eq!(seqs(ok(&mut b, q(None, Some(6), Some(2), 10))), [5, 4, 3]);
    assert_eq!(seqs(ok(&mut b, q(Some("u:even"), None, None, 3))), [10, 8, 6]);
    assert_eq!(seqs(ok(&mut b, q(Some("u:odd"), None, Some(4), 10))), [5, 7, 9]);
    assert!(seqs(ok(&mut b, q(Some("u:stranger"), None, None, 3))).is_empty());
    let p = ok(&mut b, q(None, None, None, 3)).page().expect("page");
    assert!(p.more);
    assert!(matches!(b.apply(q(Some("x:bad"), None, None, 3)), Err(StoreError::Invalid(_))));
}

/// A filtered history page whose scan budget ([`crate::sqlite::SCAN_ITEMS_MAX`] positions) is
/// spent on positions the filter does not keep answers `more` with a `scanned_to` past them
/// all: following it reaches the older matching messages (it used to stay where it began, so
/// the reader asked the same page forever).
pub fn filtered_history_moves_past_a_scan_budget<B: StoreBackend>(mut b: B) {
    let budget = crate::sqlite::SCAN_ITEMS_MAX as u64;
    send(&mut b, "carol", "bob", "the old one");
    let others = budget + budget / 2;
    let mut ops = Vec::new();
    for i in 0..others {
        ops.push(text("alice", "bob", None, &i.to_string()));
        if ops.len() == 1000 || i + 1 == others {
            assert!(b.apply_batch(&ops).iter().all(Result::is_ok));
            ops.clear();
            let _ = b.maintain(u64::MAX);
        }
    }
    let q = |before: Option<u64>, after: Option<u64>| {
        Op::History(HistoryQuery {
            user: "bob".into(),
            chat: Some("u:carol".into()),
            before_seq: before,
            after_seq: after,
            limit: 10,
        })
    };
    // Newest first: pages follow `before_seq = scanned_to` until carol's message.
    let (mut before, mut found, mut pages) = (None, Vec::new(), 0);
    loop {
        let p = ok(&mut b, q(before, None)).page().expect("page");
        pages += 1;
        assert!(pages <= 4, "the reader must get on: {pages} pages, scanned_to {}", p.scanned_to);
        found.extend(p.entries.iter().map(|e| e.seq));
        if !p.more {
            break;
        }
        assert!(before.is_none_or(|b| p.scanned_to < b), "scanned_to {} moves down from {before:?}", p.scanned_to);
        before = Some(p.scanned_to);
    }
    assert_eq!(found, [1]);
    // Oldest first from carol's message: nothing more of carol's, and the reader gets to the end.
    let (mut after, mut pages) = (1, 0);
    loop {
        let p = ok(&mut b, q(None, Some(after))).page().expect("page");
        pages += 1;
        assert!(pages <= 4, "the reader must get on: {pages} pages, scanned_to {}", p.scanned_to);
        assert!(p.entries.is_empty());
        if !p.more {
            break;
        }
        assert!(p.scanned_to > after, "scanned_to {} moves up from {after}", p.scanned_to);
        after = p.scanned_to;
    }
}

/// Positions far past anything stored (up to `u64::MAX`, which the API and terminals may
/// send) read nothing and move nothing past the head: never a panic or a backend failure.
/// A page read after such a position never sends the reader back below it (`scanned_to`
/// at or past it, taken as at most `i64::MAX`: no seq is above that), whatever the backend
/// can hold in its own numbers (the Redis one answered 2^52 for anything past it).
pub fn positions_past_any_seq<B: StoreBackend>(mut b: B) {
    send(&mut b, "ann", "ben", "one");
    create_group(&mut b, "far", "ann", &["ben"]);
    ok(&mut b, group_text("ann", "far", None, "g"));
    let _ = b.maintain(u64::MAX);
    for big in [u64::MAX, u64::MAX - 1, i64::MAX as u64, 1 << 53, (1 << 52) + 1] {
        let floor = big.min(i64::MAX as u64);
        for user in ["ben", "nobody"] {
            let p = ok(&mut b, Op::ReadInbox { user: user.into(), after_seq: big, limit: 10 }).page().expect("page");
            assert!(p.entries.is_empty());
            assert!(user == "nobody" || p.scanned_to >= floor, "after {big}: scanned_to {}", p.scanned_to);
            for (before, after) in [(Some(big), None), (None, Some(big)), (Some(big), Some(big)), (Some(2), Some(big))]
            {
                for chat in [None, Some("u:ann".to_string()), Some("g:far".to_string())] {
                    let h = b.apply(Op::History(HistoryQuery {
                        user: user.into(),
                        chat: chat.clone(),
                        before_seq: before,
                        after_seq: after,
                        limit: 10,
                    }));
                    match h {
                        Ok(Reply::Page(p)) => {
                            assert!(before.is_some() || p.entries.is_empty(), "{before:?} {after:?} {chat:?}");
                            assert!(
                                user == "nobody" || after.is_none() || p.scanned_to >= floor,
                                "{before:?} {after:?} {chat:?}: scanned_to {}",
                                p.scanned_to
                            );
                        }
                        Err(StoreError::Forbidden(_)) if user == "nobody" => {}
                        other => panic!("{user} {before:?} {after:?} {chat:?}: {other:?}"),
                    }
                }
            }
            let s = ok(
                &mut b,
                Op::Sync {
                    user: user.into(),
                    inbox_after: big,
                    groups: BTreeMap::from([("far".to_string(), big)]),
                    limit: 10,
                },
            )
            .synced()
            .expect("synced");
            assert!(s.entries.is_empty());
        }
        let p = ok(&mut b, Op::ReadGroup { group: "far".into(), after_seq: big, limit: 10 }).page().expect("page");
        assert!(p.entries.is_empty());
        assert!(p.scanned_to >= floor, "group after {big}: scanned_to {}", p.scanned_to);
        for (before, after) in [(Some(big), None), (None, Some(big)), (Some(big), Some(big))] {
            let p =
                ok(&mut b, Op::GroupHistory { group: "far".into(), before_seq: before, after_seq: after, limit: 10 })
                    .page()
                    .expect("page");
            assert_eq!(p.entries.len(), usize::from(after.is_none()), "{before:?} {after:?}");
            assert!(after.is_none() || p.scanned_to >= floor, "{before:?} {after:?}: scanned_to {}", p.scanned_to);
        }
        let d = ok(&mut b, Op::SetDelivered { user: "ben".into(), device: "d".into(), group: None, seq: big });
        assert!(matches!(d, Reply::Position { seq: 1, .. }), "{d:?}");
        let r = ok(&mut b, Op::SetRead { user: "ben".into(), chat: "u:ann".into(), seq: big, emit_event: false });
        assert!(matches!(r, Reply::Read(ReadMoved { seq: 1, .. })), "{r:?}");
    }
}

/// `Heads` and `Sync`: inbox then each group after the given positions, bounded, `more` set.
pub fn heads_and_sync<B: StoreBackend>(mut b: B) {
    create_group(&mut b, "team", "ann", &["ben"]);
    for i in 0..5 {
        send(&mut b, "ben", "ann", &format!("d{i}"));
        ok(&mut b, group_text("ben", "team", None, &format!("g{i}")));
    }
    let h = ok(&mut b, Op::Heads { user: "ann".into() }).heads().expect("heads");
    assert_eq!(h.inbox_seq, 5);
    assert_eq!(h.groups, BTreeMap::from([("team".to_string(), 5)]));
    let sync = |after: u64, g: u64, limit| Op::Sync {
        user: "ann".into(),
        inbox_after: after,
        groups: BTreeMap::from([("team".to_string(), g)]),
        limit,
    };
    let s = ok(&mut b, sync(3, 1, 100)).synced().expect("synced");
    let got: Vec<(String, u64)> = s.entries.iter().map(|e| (e.chat.clone(), e.seq)).collect();
    assert_eq!(
        got,
        [
            ("u:ben".to_string(), 4),
            ("u:ben".to_string(), 5),
            ("g:team".to_string(), 2),
            ("g:team".to_string(), 3),
            ("g:team".to_string(), 4),
            ("g:team".to_string(), 5)
        ]
    );
    assert!(!s.more);
    assert_eq!(s.heads, h);
    let s = ok(&mut b, sync(0, 0, 3)).synced().expect("synced");
    assert_eq!(s.entries.len(), 3);
    assert!(s.more);
    let s = ok(&mut b, sync(5, 5, 3)).synced().expect("synced");
    assert!(s.entries.is_empty() && !s.more);
    // Not a member: the group is skipped.
    let s = ok(
        &mut b,
        Op::Sync {
            user: "stranger".into(),
            inbox_after: 0,
            groups: BTreeMap::from([("team".to_string(), 0)]),
            limit: 10,
        },
    )
    .synced()
    .expect("synced");
    assert!(s.entries.is_empty());
}

/// Delivery positions per (user, device), clamped to the head, never backwards.
pub fn delivery_never_backwards<B: StoreBackend>(mut b: B) {
    for _ in 0..5 {
        send(&mut b, "x", "y", "m");
    }
    create_group(&mut b, "dg", "y", &[]);
    ok(&mut b, group_text("y", "dg", None, "g"));
    let set = |device: &str, group: Option<&str>, seq| Op::SetDelivered {
        user: "y".into(),
        device: device.into(),
        group: group.map(Into::into),
        seq,
    };
    assert_eq!(ok(&mut b, set("phone", None, 3)), Reply::Position { prev: 0, seq: 3 });
    assert_eq!(ok(&mut b, set("phone", None, 2)), Reply::Position { prev: 3, seq: 3 });
    assert_eq!(ok(&mut b, set("phone", None, 99)), Reply::Position { prev: 3, seq: 5 });
    ok(&mut b, set("laptop", None, 1));
    ok(&mut b, set("phone", Some("dg"), 1));
    let d = ok(&mut b, Op::GetDelivered { user: "y".into(), device: "phone".into() }).delivered().expect("delivered");
    assert_eq!(d.inbox_seq, 5);
    assert_eq!(d.groups, BTreeMap::from([("dg".to_string(), 1)]));
    let d = ok(&mut b, Op::GetDelivered { user: "y".into(), device: "laptop".into() }).delivered().expect("delivered");
    assert_eq!(d.inbox_seq, 1);
}

/// Consecutive delivery positions in one batch (a shard's acks of one tick, which the Redis
/// backend sends as one call) are answered each on its own and in order: a refused one (an
/// unknown group) refuses only itself, a later position of the same device sees the earlier
/// one, a message appended between two runs moves the head they are clamped to, and a run
/// longer than one call holds is answered in full.
pub fn delivery_positions_in_one_batch<B: StoreBackend>(mut b: B) {
    for _ in 0..3 {
        send(&mut b, "x", "y", "m");
    }
    create_group(&mut b, "dp", "y", &[]);
    ok(&mut b, group_text("y", "dp", None, "g"));
    let set = |user: &str, device: &str, group: Option<&str>, seq| Op::SetDelivered {
        user: user.into(),
        device: device.into(),
        group: group.map(Into::into),
        seq,
    };
    let r = b.apply_batch(&[
        set("y", "phone", None, 2),
        set("y", "phone", None, 1),
        set("y", "phone", Some("nogroup"), 1),
        set("y", "phone", Some("dp"), 5),
        set("y", "phone", None, 9),
        text("x", "y", None, "4"),
        set("y", "phone", None, 9),
        set("x", "web", None, 1),
    ]);
    let pos = |i: usize| r[i].clone().expect("a position");
    assert_eq!(r.len(), 8);
    assert_eq!(pos(0), Reply::Position { prev: 0, seq: 2 });
    assert_eq!(pos(1), Reply::Position { prev: 2, seq: 2 });
    assert!(matches!(r[2], Err(StoreError::NotFound)), "{:?}", r[2]);
    assert_eq!(pos(3), Reply::Position { prev: 0, seq: 1 });
    assert_eq!(pos(4), Reply::Position { prev: 2, seq: 3 });
    assert_eq!(r[5].clone().and_then(Reply::appended).expect("appended").receiver_seq, 4);
    assert_eq!(pos(6), Reply::Position { prev: 3, seq: 4 });
    assert_eq!(pos(7), Reply::Position { prev: 0, seq: 1 });
    let d = ok(&mut b, Op::GetDelivered { user: "y".into(), device: "phone".into() }).delivered().expect("delivered");
    assert_eq!((d.inbox_seq, d.groups), (4, BTreeMap::from([("dp".to_string(), 1)])));

    let devices: Vec<String> = (0..300).map(|i| format!("d{i}")).collect();
    let run: Vec<Op> = devices.iter().enumerate().map(|(i, d)| set("y", d, None, 1 + i as u64 % 4)).collect();
    let r = b.apply_batch(&run);
    assert_eq!(r.len(), 300);
    for (i, r) in r.into_iter().enumerate() {
        assert_eq!(r.expect("a position"), Reply::Position { prev: 0, seq: 1 + i as u64 % 4 });
    }
    let d = ok(&mut b, Op::GetDelivered { user: "y".into(), device: "d299".into() }).delivered().expect("delivered");
    assert_eq!(d.inbox_seq, 4);

    // A member removed from a group leaves no delivery position of it behind (a welcome
    // would list a group the user is no longer in).
    create_group(&mut b, "rm", "o", &["m"]);
    ok(&mut b, group_text("o", "rm", None, "g"));
    ok(&mut b, set("m", "phone", Some("rm"), 1));
    ok(&mut b, set("m", "web", Some("rm"), 1));
    let groups = |b: &mut B, device: &str| {
        let op = Op::GetDelivered { user: "m".into(), device: device.into() };
        ok(b, op).delivered().expect("delivered").groups
    };
    assert_eq!(groups(&mut b, "phone"), BTreeMap::from([("rm".to_string(), 1)]));
    ok(&mut b, Op::RemoveMember { group: "rm".into(), user: "m".into() });
    assert!(groups(&mut b, "phone").is_empty() && groups(&mut b, "web").is_empty(), "positions forgotten");
}

/// Consecutive messages of one batch (which a backend may store in one call) are each
/// answered on their own, in order: a later one sees the earlier ones (seqs, its cid), a
/// refused one writes nothing and does not stop the rest, and a long run keeps every seq.
pub fn messages_in_one_batch<B: StoreBackend>(mut b: B) {
    create_group(&mut b, "mb", "x", &["y"]);
    let appended = |r: &Result<Reply, StoreError>| r.clone().and_then(Reply::appended).expect("appended");
    let in_group = |r: &Result<Reply, StoreError>| match r.clone().expect("group appended") {
        Reply::GroupAppended(a) => a,
        other => panic!("not a group append: {other:?}"),
    };
    let r = b.apply_batch(&[
        text("x", "y", Some("c1"), "1"),
        text("x", "y", Some("c1"), "1 again"),
        text("y", "y", None, "to myself"),
        text("x", "bad user", None, "refused in Rust"),
        text("y", "x", None, "2"),
        group_text("x", "mb", Some("g1"), "g1"),
        group_text("z", "mb", None, "not a member"),
        group_text("y", "nogroup", None, "no group"),
        group_text("x", "mb", Some("g1"), "g1 again"),
        group_text("y", "mb", None, "g2"),
        text("x", "y", None, "3"),
    ]);
    assert_eq!(r.len(), 11);
    let first = appended(&r[0]);
    assert_eq!((first.receiver_seq, first.sender_seq, first.duplicate), (1, Some(1), false));
    let again = appended(&r[1]);
    assert_eq!((again.id, again.receiver_seq, again.duplicate), (first.id, 1, true), "same cid, same message");
    let own = appended(&r[2]);
    assert_eq!((own.receiver_seq, own.sender_seq), (2, None));
    assert!(matches!(r[3], Err(StoreError::Invalid(_))), "{:?}", r[3]);
    let back = appended(&r[4]);
    assert_eq!((back.receiver_seq, back.sender_seq), (2, Some(3)));
    let g1 = in_group(&r[5]);
    assert_eq!((g1.seq, g1.duplicate), (1, false));
    assert!(matches!(r[6], Err(StoreError::Forbidden(_))), "{:?}", r[6]);
    assert!(matches!(r[7], Err(StoreError::NotFound)), "{:?}", r[7]);
    let g1_again = in_group(&r[8]);
    assert_eq!((g1_again.id, g1_again.seq, g1_again.duplicate), (g1.id, 1, true));
    assert_eq!(in_group(&r[9]).seq, 2);
    assert_eq!(appended(&r[10]).receiver_seq, 4);
    let y: Vec<(u64, String)> = inbox(&mut b, "y").iter().map(|e| (e.seq, body_text(e))).collect();
    let texts = |v: &[(u64, &str)]| v.iter().map(|(s, t)| (*s, t.to_string())).collect::<Vec<_>>();
    assert_eq!(y, texts(&[(1, "1"), (2, "to myself"), (3, "2"), (4, "3")]));
    let page = ok(&mut b, Op::ReadGroup { group: "mb".into(), after_seq: 0, limit: 10 }).page().expect("page");
    assert_eq!(page.entries.iter().map(|e| (e.seq, body_text(e))).collect::<Vec<_>>(), texts(&[(1, "g1"), (2, "g2")]));

    let run: Vec<Op> = (0..300).map(|i| text("s", &format!("r{}", i % 3), None, &i.to_string())).collect();
    let r = b.apply_batch(&run);
    assert_eq!(r.len(), 300);
    for (i, r) in r.iter().enumerate() {
        let a = appended(r);
        assert_eq!((a.receiver_seq, a.sender_seq), (1 + i as u64 / 3, Some(1 + i as u64)), "message {i}");
    }
    let run: Vec<Op> = (0..300).map(|i| group_text(["x", "y"][i % 2], "mb", None, &i.to_string())).collect();
    let r = b.apply_batch(&run);
    for (i, r) in r.iter().enumerate() {
        assert_eq!(in_group(r).seq, 3 + i as u64, "group message {i}");
    }
    let s = inbox(&mut b, "s");
    assert_eq!(s.len(), 300);
    assert!(s.iter().enumerate().all(|(i, e)| body_text(e) == i.to_string()), "stored in order");
}

/// Read positions never move backwards, are clamped to the head, name the newest message of
/// the chat at or before them, and emit `message.read` in the same transaction.
pub fn read_never_backwards<B: StoreBackend>(mut b: B) {
    let m1 = send(&mut b, "p", "r", "1");
    let _m2 = send(&mut b, "q", "r", "2");
    let m3 = send(&mut b, "p", "r", "3");
    let _m4 = send(&mut b, "q", "r", "4");
    let set = |chat: &str, seq, ev| Op::SetRead { user: "r".into(), chat: chat.into(), seq, emit_event: ev };
    let r = ok(&mut b, set("u:p", 2, true)).read().expect("read");
    assert_eq!((r.prev, r.seq, r.moved, r.up_to), (0, 2, true, Some(m1.id)));
    let r = ok(&mut b, set("u:p", 1, true)).read().expect("read");
    assert_eq!((r.prev, r.seq, r.moved), (2, 2, false));
    let r = ok(&mut b, set("u:p", 100, false)).read().expect("read");
    assert_eq!((r.prev, r.seq, r.up_to), (2, 4, Some(m3.id)));
    let ev = ok(&mut b, Op::OutboxFetch { after: 0, limit: 10 }).events().expect("events");
    assert_eq!(ev.len(), 1, "one event: only the first read moved with emit_event");
    assert_eq!(ev[0].kind, "message.read");
    let v: serde_json::Value = serde_json::from_str(&ev[0].data).expect("json");
    assert_eq!(v["chat"], "u:p");
    assert_eq!(v["user"], "r");
    assert_eq!(v["up_to"], m1.id.to_string());
    assert!(matches!(b.apply(set("u:nobody", 1, false)), Err(StoreError::NotFound)));
    assert!(matches!(b.apply(set("bad", 1, false)), Err(StoreError::Invalid(_))));
}

/// Unread counts per chat: incoming messages after the chat's read position.
pub fn unread_counts<B: StoreBackend>(mut b: B) {
    create_group(&mut b, "ug", "me", &["a"]);
    for _ in 0..3 {
        send(&mut b, "a", "me", "x");
    }
    send(&mut b, "b", "me", "y");
    send(&mut b, "me", "a", "my own: not unread");
    for _ in 0..4 {
        ok(&mut b, group_text("a", "ug", None, "g"));
    }
    ok(&mut b, group_text("me", "ug", None, "mine"));
    let _ = b.maintain(u64::MAX);
    let u = ok(&mut b, Op::Unread { user: "me".into() }).unread().expect("unread");
    assert_eq!(u, BTreeMap::from([("u:a".to_string(), 3), ("u:b".to_string(), 1), ("g:ug".to_string(), 4)]));
    ok(&mut b, Op::SetRead { user: "me".into(), chat: "u:a".into(), seq: 2, emit_event: false });
    ok(&mut b, Op::SetRead { user: "me".into(), chat: "g:ug".into(), seq: 5, emit_event: false });
    let u = ok(&mut b, Op::Unread { user: "me".into() }).unread().expect("unread");
    assert_eq!(u, BTreeMap::from([("u:a".to_string(), 1), ("u:b".to_string(), 1)]));
}

/// The outbox hands events back in order, by increasing never-reused seq; acks delete.
pub fn outbox_in_order<B: StoreBackend>(mut b: B) {
    let ev = |k: &str, i: u32| NewEvent { kind: k.into(), data: format!("{{\"i\":{i}}}"), ts: 1 };
    let r = ok(&mut b, Op::OutboxAppend { events: vec![ev("user.online", 0), ev("user.offline", 1)].into() });
    let Reply::OutboxAppended { first, last } = r else { panic!("{r:?}") };
    assert_eq!(last, first + 1);
    ok(&mut b, Op::OutboxAppend { events: (2..10).map(|i| ev("message.unreached", i)).collect() });
    let all = ok(&mut b, Op::OutboxFetch { after: 0, limit: 100 }).events().expect("events");
    assert_eq!(all.len(), 10);
    let stats = ok(&mut b, Op::OutboxStats).outbox_stats().expect("stats");
    assert_eq!(stats, OutboxStats { events: 10, dropped: 0 }, "within the cap nothing is dropped");
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(all[1].kind, "user.offline");
    let page = ok(&mut b, Op::OutboxFetch { after: all[2].seq, limit: 3 }).events().expect("events");
    assert_eq!(page, all[3..6]);
    assert_eq!(ok(&mut b, Op::OutboxAck { through: all[4].seq }), Reply::Count(5));
    let rest = ok(&mut b, Op::OutboxFetch { after: 0, limit: 100 }).events().expect("events");
    assert_eq!(rest, all[5..]);
    assert_eq!(ok(&mut b, Op::OutboxStats), Reply::OutboxStats(OutboxStats { events: 5, dropped: 0 }));
    ok(&mut b, Op::OutboxAck { through: u64::MAX / 2 });
    assert_eq!(ok(&mut b, Op::OutboxStats), Reply::OutboxStats(OutboxStats { events: 0, dropped: 0 }));
    let r = ok(&mut b, Op::OutboxAppend { events: vec![ev("user.online", 11)].into() });
    let Reply::OutboxAppended { first, .. } = r else { panic!("{r:?}") };
    assert!(first > all[9].seq, "event ids are never reused");
}

/// With the backend's outbox cap at `cap` (at least 2): every write that takes the outbox
/// past it drops the oldest events first and counts them, so what is fetched is exactly the
/// newest `cap` events, in order, seqs increasing, whether they came one per write, as a
/// read's own `message.read`, or many in one write (even more than `cap`); acks shrink the
/// outbox without counting drops.
pub fn outbox_capped_keeps_the_newest<B: StoreBackend>(mut b: B, cap: u64) {
    assert!(cap >= 2);
    let ev = |i: u64| NewEvent { kind: "user.online".into(), data: format!("{{\"i\":{i}}}"), ts: i };
    let i_of = |e: &Event| -> u64 {
        let v: serde_json::Value = serde_json::from_str(&e.data).expect("json");
        v["i"].as_u64().expect("i")
    };
    let fetch = |b: &mut B| ok(b, Op::OutboxFetch { after: 0, limit: 1000 }).events().expect("events");
    let stats = |b: &mut B| ok(b, Op::OutboxStats).outbox_stats().expect("stats");
    let mut seqs = Vec::new();
    for i in 0..cap + 3 {
        let r = ok(&mut b, Op::OutboxAppend { events: vec![ev(i)].into() });
        let Reply::OutboxAppended { first, last } = r else { panic!("{r:?}") };
        assert_eq!(first, last);
        seqs.push(first);
    }
    let kept = fetch(&mut b);
    assert_eq!(kept.iter().map(i_of).collect::<Vec<_>>(), (3..cap + 3).collect::<Vec<_>>(), "the newest {cap}");
    assert_eq!(kept.iter().map(|e| e.seq).collect::<Vec<_>>(), seqs[3..], "their own seqs, in order");
    assert_eq!(stats(&mut b), OutboxStats { events: cap, dropped: 3 });

    // A read's own event goes through the cap too.
    let m = ok(&mut b, text("p", "r", None, "hi")).appended().expect("appended");
    let read = Op::SetRead { user: "r".into(), chat: "u:p".into(), seq: m.receiver_seq, emit_event: true };
    assert!(ok(&mut b, read).read().expect("read").moved);
    let kept = fetch(&mut b);
    assert_eq!(kept.len() as u64, cap);
    assert_eq!(kept.last().map(|e| e.kind.as_str()), Some("message.read"));
    assert_eq!(i_of(&kept[0]), 4);
    assert!(kept.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(stats(&mut b), OutboxStats { events: cap, dropped: 4 });

    // One write of more than the cap keeps its own newest `cap`.
    let n = 2 * cap + 1;
    let r = ok(&mut b, Op::OutboxAppend { events: (100..100 + n).map(ev).collect() });
    let Reply::OutboxAppended { first, last } = r else { panic!("{r:?}") };
    assert_eq!(last, first + n - 1);
    let kept = fetch(&mut b);
    assert_eq!(kept.iter().map(i_of).collect::<Vec<_>>(), (100 + n - cap..100 + n).collect::<Vec<_>>());
    assert_eq!(kept.iter().map(|e| e.seq).collect::<Vec<_>>(), (last + 1 - cap..=last).collect::<Vec<_>>());
    assert_eq!(stats(&mut b), OutboxStats { events: cap, dropped: 4 + n });

    // Acks are not drops; below the cap nothing more is dropped.
    assert_eq!(ok(&mut b, Op::OutboxAck { through: kept[cap as usize - 2].seq }), Reply::Count(cap - 1));
    ok(&mut b, Op::OutboxAppend { events: vec![ev(900)].into() });
    let kept = fetch(&mut b);
    assert_eq!(kept.iter().map(i_of).collect::<Vec<_>>(), [99 + n, 900]);
    assert_eq!(stats(&mut b), OutboxStats { events: 2, dropped: 4 + n });
}

/// Groups: create (conflict, limit, generated id), get, members add/remove/list with
/// cursor, groups of a user, dissolve.
pub fn groups_lifecycle<B: StoreBackend>(mut b: B) {
    let create = |id: Option<&str>, members: &[&str], max| Op::CreateGroup {
        id: id.map(Into::into),
        name: "Team".into(),
        owner: "o".into(),
        members: members.iter().map(|s| s.to_string()).collect(),
        created_ms: 42,
        members_max: max,
        groups_per_user_max: 100,
    };
    assert_eq!(ok(&mut b, create(Some("t1"), &["a", "b", "a"], 10)), Reply::GroupCreated { id: "t1".into() });
    assert!(matches!(b.apply(create(Some("t1"), &[], 10)), Err(StoreError::Conflict(_))));
    assert!(matches!(b.apply(create(Some("t2"), &["a", "b", "c"], 3)), Err(StoreError::LimitExceeded(_))));
    let Reply::GroupCreated { id: gen } = ok(&mut b, create(None, &[], 10)) else { panic!() };
    assert!(ether_proto::ids::is_valid_id(&gen));
    let g = ok(&mut b, Op::GetGroup { group: "t1".into() }).group().expect("group");
    assert_eq!(
        (g.id.as_str(), g.name.as_str(), g.owner.as_str(), g.created_ms, g.member_count, g.seq),
        ("t1", "Team", "o", 42, 3, 0)
    );
    let add = |users: &[&str], max| Op::AddMembers {
        group: "t1".into(),
        users: users.iter().map(|s| s.to_string()).collect(),
        members_max: max,
        groups_per_user_max: 100,
    };
    assert_eq!(ok(&mut b, add(&["c", "a", "d"], 10)), Reply::Count(2));
    assert!(matches!(b.apply(add(&["e", "f"], 6)), Err(StoreError::LimitExceeded(_))));
    assert_eq!(ok(&mut b, add(&["e"], 6)), Reply::Count(1));
    let rm = |u: &str| Op::RemoveMember { group: "t1".into(), user: u.into() };
    assert_eq!(ok(&mut b, rm("b")), Reply::Count(1));
    assert_eq!(ok(&mut b, rm("b")), Reply::Count(0));
    let mut listed = Vec::new();
    let mut cursor = None;
    loop {
        let r = ok(&mut b, Op::ListMembers { group: "t1".into(), cursor: cursor.clone(), limit: 2 });
        let Reply::Members { members, next_cursor } = r else { panic!("{r:?}") };
        assert!(members.len() <= 2);
        listed.extend(members);
        match next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    listed.sort();
    assert_eq!(listed, ["a", "c", "d", "e", "o"]);
    let g = ok(&mut b, Op::GetGroup { group: "t1".into() }).group().expect("group");
    assert_eq!(g.member_count, 5);
    let mut gs = ok(&mut b, Op::GroupsOf { user: "o".into() }).groups().expect("groups");
    gs.sort();
    let mut want = vec!["t1".to_string(), gen.clone()];
    want.sort();
    assert_eq!(gs, want);
    assert_eq!(ok(&mut b, Op::DissolveGroup { group: "t1".into() }), Reply::Done);
    assert!(matches!(b.apply(Op::GetGroup { group: "t1".into() }), Err(StoreError::NotFound)));
    assert!(matches!(b.apply(Op::DissolveGroup { group: "t1".into() }), Err(StoreError::NotFound)));
    assert_eq!(ok(&mut b, Op::GroupsOf { user: "a".into() }).groups().expect("groups"), Vec::<String>::new());
    // The id is free again and starts a fresh log.
    create_group(&mut b, "t1", "o", &[]);
    ok(&mut b, group_text("o", "t1", None, "fresh"));
    let g = ok(&mut b, Op::GetGroup { group: "t1".into() }).group().expect("group");
    assert_eq!((g.seq, g.member_count), (1, 1));
}

/// Only members send to a group; its log gets gap-free seqs; cids are idempotent there too.
pub fn group_membership_enforced<B: StoreBackend>(mut b: B) {
    create_group(&mut b, "club", "m1", &["m2"]);
    assert!(matches!(b.apply(group_text("outsider", "club", None, "let me in")), Err(StoreError::Forbidden(_))));
    assert!(matches!(b.apply(group_text("m1", "nope", None, "?")), Err(StoreError::NotFound)));
    let mut seqs = Vec::new();
    for i in 0..12 {
        let from = if i % 2 == 0 { "m1" } else { "m2" };
        let r = ok(&mut b, group_text(from, "club", None, &format!("{i}"))).group_appended().expect("group appended");
        seqs.push(r.seq);
        if i == 5 {
            let _ = b.maintain(u64::MAX);
        }
    }
    assert_eq!(seqs, (1..=12).collect::<Vec<u64>>());
    let a = ok(&mut b, group_text("m1", "club", Some("k"), "x")).group_appended().expect("ga");
    let d = ok(&mut b, group_text("m1", "club", Some("k"), "y")).group_appended().expect("ga");
    assert!(d.duplicate && d.id == a.id && d.seq == 13);
    let p = ok(&mut b, Op::ReadGroup { group: "club".into(), after_seq: 10, limit: 10 }).page().expect("page");
    assert_eq!(p.entries.iter().map(|e| e.seq).collect::<Vec<_>>(), [11, 12, 13]);
    assert!(p.entries.iter().all(|e| e.chat == "g:club"));
    let h = ok(&mut b, Op::GroupHistory { group: "club".into(), before_seq: None, after_seq: None, limit: 2 })
        .page()
        .expect("page");
    assert_eq!(h.entries.iter().map(|e| e.seq).collect::<Vec<_>>(), [13, 12]);
    let set =
        |user: &str, seq| Op::SetDelivered { user: user.into(), device: "d".into(), group: Some("club".into()), seq };
    ok(&mut b, set("m2", 3));
    ok(&mut b, Op::RemoveMember { group: "club".into(), user: "m2".into() });
    assert!(matches!(b.apply(group_text("m2", "club", None, "gone")), Err(StoreError::Forbidden(_))));
    // An ack position saved after the removal (a terminal's last acks, written a tick later)
    // is refused: a stale row would show in `welcome.delivered` if the user came back.
    assert!(matches!(b.apply(set("m2", 5)), Err(StoreError::Forbidden(_))));
    let d = ok(&mut b, Op::GetDelivered { user: "m2".into(), device: "d".into() }).delivered().expect("delivered");
    assert_eq!(d.groups.get("club"), None, "{d:?}");
    ok(&mut b, set("m1", 5));
    assert!(matches!(
        b.apply(Op::History(HistoryQuery {
            user: "m2".into(),
            chat: Some("g:club".into()),
            limit: 5,
            ..Default::default()
        })),
        Err(StoreError::Forbidden(_))
    ));
}

/// `GroupReads`: members other than the sender whose read position covers the message.
pub fn group_reads<B: StoreBackend>(mut b: B) {
    create_group(&mut b, "rg", "s", &["r1", "r2", "r3"]);
    let m1 = ok(&mut b, group_text("s", "rg", None, "1")).group_appended().expect("ga");
    let m2 = ok(&mut b, group_text("s", "rg", None, "2")).group_appended().expect("ga");
    let read = |u: &str, seq| Op::SetRead { user: u.into(), chat: "g:rg".into(), seq, emit_event: false };
    ok(&mut b, read("r1", 2));
    ok(&mut b, read("r2", 1));
    let reads = |id| Op::GroupReads { group: "rg".into(), msg_id: id };
    assert_eq!(ok(&mut b, reads(m1.id)), Reply::Reads { read: 2, members: 3 });
    assert_eq!(ok(&mut b, reads(m2.id)), Reply::Reads { read: 1, members: 3 });
    assert!(matches!(b.apply(reads(12345)), Err(StoreError::NotFound)));
    assert!(matches!(b.apply(read("outsider", 1)), Err(StoreError::Forbidden(_))));
}

/// A member added later counts as unread only what was posted after it joined, and read
/// counts leave it out for what was posted before; removed and added again, it joins anew.
/// Its history still holds the earlier messages.
pub fn late_joiners<B: StoreBackend>(mut b: B) {
    create_group(&mut b, "lj", "s", &["early"]);
    for i in 0..3 {
        ok(&mut b, group_text("s", "lj", None, &format!("before {i}")));
    }
    let add = |u: &str| Op::AddMembers {
        group: "lj".into(),
        users: vec![u.into()],
        members_max: 100,
        groups_per_user_max: 100,
    };
    ok(&mut b, add("late"));
    let unread = |b: &mut B, u: &str| ok(b, Op::Unread { user: u.into() }).unread().expect("unread");
    assert_eq!(unread(&mut b, "late"), BTreeMap::new(), "nothing posted since it joined");
    assert_eq!(unread(&mut b, "early"), BTreeMap::from([("g:lj".to_string(), 3)]));
    let after = ok(&mut b, group_text("s", "lj", None, "after")).group_appended().expect("ga");
    let _ = b.maintain(u64::MAX);
    assert_eq!(unread(&mut b, "late"), BTreeMap::from([("g:lj".to_string(), 1)]));
    let page = ok(&mut b, Op::ReadGroup { group: "lj".into(), after_seq: 0, limit: 10 }).page().expect("page");
    assert_eq!(page.entries.len(), 4, "the earlier messages are its history");

    let reads = |id| Op::GroupReads { group: "lj".into(), msg_id: id };
    let first = page.entries[0].id;
    ok(&mut b, Op::SetRead { user: "late".into(), chat: "g:lj".into(), seq: after.seq, emit_event: false });
    assert_eq!(ok(&mut b, reads(first)), Reply::Reads { read: 0, members: 1 }, "posted before it joined");
    assert_eq!(ok(&mut b, reads(after.id)), Reply::Reads { read: 1, members: 2 });

    // Out and in again: joined anew at the head then.
    ok(&mut b, Op::RemoveMember { group: "lj".into(), user: "late".into() });
    ok(&mut b, group_text("s", "lj", None, "while away"));
    ok(&mut b, add("late"));
    assert_eq!(unread(&mut b, "late"), BTreeMap::new());
    ok(&mut b, group_text("s", "lj", None, "back"));
    assert_eq!(unread(&mut b, "late"), BTreeMap::from([("g:lj".to_string(), 1)]));
}

/// A failing op in a batch fails alone; the others commit with the seqs they were given.
pub fn batch_isolation<B: StoreBackend>(mut b: B) {
    create_group(&mut b, "bi", "a", &[]);
    let dup_id = next_id();
    let with_id = |id| {
        Op::Append(NewMessage {
            id,
            ts: now_ms(),
            from: "a".into(),
            to: "b".into(),
            kind: Kind::Text,
            body: "{\"text\":\"x\"}".into(),
            cid: None,
        })
    };
    let r = b.apply_batch(&[
        text("a", "b", None, "1"),
        group_text("z", "bi", None, "forbidden"),
        with_id(dup_id),
        with_id(dup_id),
        text("a", "b", None, "3"),
        Op::GetGroup { group: "missing".into() },
    ]);
    assert_eq!(r.len(), 6);
    assert_eq!(r[0].clone().and_then(Reply::appended).expect("ok").receiver_seq, 1);
    assert!(matches!(r[1], Err(StoreError::Forbidden(_))));
    assert_eq!(r[2].clone().and_then(Reply::appended).expect("ok").receiver_seq, 2);
    assert!(matches!(r[3], Err(StoreError::Conflict(_))));
    assert_eq!(r[4].clone().and_then(Reply::appended).expect("ok").receiver_seq, 3);
    assert!(matches!(r[5], Err(StoreError::NotFound)));
    assert_eq!(inbox(&mut b, "b").iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3]);
}

/// Malformed ops are `Invalid`, never a panic.
pub fn invalid_input<B: StoreBackend>(mut b: B) {
    assert!(matches!(b.apply(text("bad user", "b", None, "x")), Err(StoreError::Invalid(_))));
    assert!(matches!(b.apply(text("a", "", None, "x")), Err(StoreError::Invalid(_))));
    assert!(matches!(b.apply(text("a", "b", Some(""), "x")), Err(StoreError::Invalid(_))));
    assert!(matches!(b.apply(text("a", "b", None, &"x".repeat(BODY_BYTES_MAX))), Err(StoreError::Invalid(_))));
    let mut m =
        NewMessage { id: 0, ts: 0, from: "a".into(), to: "b".into(), kind: Kind::Text, body: "{}".into(), cid: None };
    assert!(matches!(b.apply(Op::Append(m.clone())), Err(StoreError::Invalid(_))));
    m.id = u64::MAX;
    assert!(matches!(b.apply(Op::Append(m)), Err(StoreError::Invalid(_))));
    assert!(matches!(
        b.apply(Op::ListMembers { group: "nope".into(), cursor: None, limit: 1 }),
        Err(StoreError::NotFound)
    ));
}

/// Token revocations never move back (the later time wins), are kept for every device and
/// per device apart, list back as written (exactly, any time up to `i64::MAX`), and refuse
/// invalid ids.
pub fn token_revocations<B: StoreBackend>(mut b: B) {
    let user = format!("rv{}", next_id());
    let mut revoke = |device: Option<&str>, before_ms: u64| {
        let op = Op::RevokeTokens { user: user.clone(), device: device.map(str::to_owned), before_ms };
        ok(&mut b, op).count().expect("count")
    };
    assert_eq!(revoke(None, 1_000), 1_000);
    assert_eq!(revoke(None, 500), 1_000, "a revocation never moves back");
    assert_eq!(revoke(None, 2_000), 2_000);
    assert_eq!(revoke(Some("phone"), 700), 700, "per device, apart from every device's");
    // Times are kept exactly (past 2^53 too), at most `i64::MAX`; a first one of 0 is kept.
    let exact = (1 << 53) + 1;
    assert_eq!(revoke(Some("tablet"), exact), exact);
    assert_eq!(revoke(Some("tablet"), exact - 1), exact, "never back, by one");
    assert_eq!(revoke(Some("tablet"), exact + 1), exact + 1, "on, by one");
    assert_eq!(revoke(Some("watch"), u64::MAX), i64::MAX as u64);
    assert_eq!(revoke(Some("tv"), 0), 0);
    let mut mine: Vec<Revocation> =
        ok(&mut b, Op::Revocations).revocations().expect("list").into_iter().filter(|r| r.user == user).collect();
    mine.sort_by(|x, y| x.device.cmp(&y.device));
    let r =
        |device: Option<&str>, before_ms| Revocation { user: user.clone(), device: device.map(Into::into), before_ms };
    assert_eq!(
        mine,
        vec![
            r(None, 2_000),
            r(Some("phone"), 700),
            r(Some("tablet"), exact + 1),
            r(Some("tv"), 0),
            r(Some("watch"), i64::MAX as u64),
        ]
    );
    for (u, d) in [("bad user", None), ("ok", Some("bad device"))] {
        let op = Op::RevokeTokens { user: u.into(), device: d.map(str::to_owned), before_ms: 1 };
        assert!(matches!(b.apply(op), Err(StoreError::Invalid(_))), "{u:?} {d:?}");
    }
}

/// Retention: messages older than the cutoff go, in bounded steps; newer stay; seqs continue
/// after the purge (never reused), and the cid of a purged message is free again.
pub fn retention_purge<B: StoreBackend>(mut b: B) {
    let old_ts = now_ms() - 40 * 86_400_000;
    for i in 0..10 {
        let op = Op::Append(NewMessage {
            id: next_id(),
            ts: old_ts + i,
            from: "old".into(),
            to: "keeper".into(),
            kind: Kind::Text,
            body: "{\"text\":\"old\"}".into(),
            cid: Some(format!("old{i}")),
        });
        ok(&mut b, op);
    }
    send(&mut b, "new", "keeper", "new");
    // Messages whose positions are still in memory are never purged: write them out first.
    while b.maintain(u64::MAX).unwrap_or(false) {}
    let cutoff = now_ms() - 30 * 86_400_000;
    let mut purged = 0;
    let mut steps = 0;
    loop {
        let r = ok(&mut b, Op::Purge { older_than_ms: cutoff, max_rows: 3 });
        let Reply::Purged { messages, more } = r else { panic!("{r:?}") };
        assert!(messages <= 3);
        purged += messages;
        steps += 1;
        if !more {
            break;
        }
        assert!(steps < 100);
    }
    assert_eq!(purged, 10);
    let left = inbox(&mut b, "keeper");
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].seq, 11);
    for _ in 0..3 {
        let _ = b.apply(Op::Purge { older_than_ms: cutoff, max_rows: 1000 });
    }
    let a = send(&mut b, "old", "keeper", "after purge");
    assert_eq!((a.receiver_seq, a.sender_seq), (12, Some(11)));
    let again = ok(&mut b, text("old", "keeper", Some("old3"), "reuse")).appended().expect("appended");
    assert!(!again.duplicate);
    assert_eq!(again.receiver_seq, 13);
    // The sender's own stream was purged whole (every position of it was old): the new
    // positions after it are written out like any others, and the stream goes on.
    while b.maintain(u64::MAX).expect("positions after a purged stream are written") {}
    let mine: Vec<u64> = inbox(&mut b, "old").iter().map(|e| e.seq).collect();
    assert_eq!(mine, [11, 12]);
    let a = send(&mut b, "old", "keeper", "and again");
    assert_eq!((a.receiver_seq, a.sender_seq), (14, Some(13)));
    while b.maintain(u64::MAX).expect("maintain") {}
    for _ in 0..3 {
        let r = b.apply(Op::Purge { older_than_ms: cutoff, max_rows: 1000 });
        assert!(r.is_ok(), "purge goes on: {r:?}");
    }
    let mine: Vec<u64> = inbox(&mut b, "old").iter().map(|e| e.seq).collect();
    assert_eq!(mine, [11, 12, 13]);
    assert_eq!(inbox(&mut b, "keeper").iter().map(|e| e.seq).collect::<Vec<_>>(), [11, 12, 13, 14]);
    // Purged messages are gone, not unread (their positions may share an index block with
    // live ones).
    let unread = ok(&mut b, Op::Unread { user: "keeper".into() }).unread().expect("unread");
    assert_eq!(unread, BTreeMap::from([("u:new".to_string(), 1), ("u:old".to_string(), 3)]));
}

/// Random interleavings of senders, receivers and background steps: every inbox holds
/// exactly its messages at seqs `1..=n`, and bounded pages concatenate to the whole inbox.
pub fn random_interleavings<B: StoreBackend>(make: &impl Fn() -> B) {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    let mut runner = TestRunner::new(Config { cases: 12, failure_persistence: None, ..Config::default() });
    let step = (0u8..5, 0u8..5, 0u8..10, 1usize..4);
    runner
        .run(&prop::collection::vec(step, 1..60), |steps| {
            let mut b = make();
            let mut want: HashMap<String, Vec<u64>> = HashMap::new();
            let mut batch = Vec::new();
            for (from, to, extra, n) in steps {
                let (from, to) = (format!("p{from}"), format!("p{to}"));
                for _ in 0..n {
                    batch.push(text(&from, &to, None, "x"));
                }
                if extra < 3 || batch.len() > 6 {
                    let ops = std::mem::take(&mut batch);
                    let rs = b.apply_batch(&ops);
                    for (op, r) in ops.iter().zip(rs) {
                        let a = r.and_then(Reply::appended).expect("append");
                        let Op::Append(m) = op else { unreachable!() };
                        want.entry(m.to.clone()).or_default().push(a.id);
                        if m.from != m.to {
                            want.entry(m.from.clone()).or_default().push(a.id);
                        }
                    }
                }
                if extra == 0 {
                    let _ = b.maintain(u64::MAX);
                }
            }
            for (user, ids) in &want {
                let got = inbox(&mut b, user);
                prop_assert_eq!(
                    got.iter().map(|e| e.seq).collect::<Vec<_>>(),
                    (1..=ids.len() as u64).collect::<Vec<_>>()
                );
                prop_assert_eq!(&got.iter().map(|e| e.id).collect::<Vec<_>>(), ids);
            }
            Ok(())
        })
        .expect("random interleavings");
}

// ---- through the storage thread ------------------------------------------------------------

/// Completions run after commit, in submission order, including failed ops; batches form.
pub fn thread_completions_in_order<B: StoreBackend>(b: B, mut opts: StoreOptions) {
    let n = 200usize;
    opts.queue_capacity = opts.queue_capacity.max(n + 1);
    let h = StoreThread::spawn(b, opts).expect("spawn");
    h.call_blocking(Op::CreateGroup {
        id: Some("tg".into()),
        name: "t".into(),
        owner: "a".into(),
        members: vec![],
        created_ms: 0,
        members_max: 10,
        groups_per_user_max: 10,
    })
    .expect("group");
    let order = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = crossbeam::channel::unbounded();
    let mut submitted = 0;
    for i in 0..n {
        let op =
            if i % 10 == 9 { group_text("outsider", "tg", None, "no") } else { text("a", "b", None, &i.to_string()) };
        let order = order.clone();
        let tx = tx.clone();
        let cmd = StoreCmd::new(op, move |r| {
            if let Ok(mut o) = order.lock() {
                o.push((i, r.clone().ok().and_then(|r| r.appended().ok())));
            }
            let _ = tx.send(r);
        });
        h.submit(cmd).expect("queue sized for the test");
        submitted += 1;
    }
    for _ in 0..submitted {
        let _r = rx.recv_timeout(Duration::from_secs(10)).expect("completion");
    }
    let order = order.lock().expect("lock").clone();
    assert_eq!(order.len(), n);
    assert_eq!(
        order.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        (0..n).collect::<Vec<_>>(),
        "completions in submission order"
    );
    let seqs: Vec<u64> = order.iter().filter_map(|(_, a)| a.map(|a| a.receiver_seq)).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    assert_eq!(seqs.len(), n - n / 10);
    let batches = h.stats().batches.load(Ordering::Relaxed);
    assert!(batches < n as u64, "group commit: {batches} batches for {n} ops");
    h.shutdown();
    assert!(matches!(h.submit(StoreCmd::new(text("a", "b", None, "late"), |_| {})), Err(StoreError::Closed)));
}

/// Several threads submit at once to overlapping inboxes: every inbox's seqs are exactly
/// `1..=n`, each message once.
pub fn thread_concurrent_submitters<B: StoreBackend>(b: B, opts: StoreOptions) {
    let h = StoreThread::spawn(b, opts).expect("spawn");
    let threads = 4;
    let per = 150;
    let mut joins = Vec::new();
    for t in 0..threads {
        let h = h.clone();
        joins.push(std::thread::spawn(move || {
            let mut got = Vec::new();
            for i in 0..per {
                let to = format!("r{}", i % 3);
                let from = format!("s{t}");
                let op = text(&from, &to, Some(&format!("c{i}")), "x");
                loop {
                    match h.call_blocking(op.clone()) {
                        Ok(r) => {
                            got.push((to.clone(), r.appended().expect("appended")));
                            break;
                        }
                        Err(StoreError::Overloaded) => std::thread::yield_now(),
                        Err(e) => panic!("{e}"),
                    }
                }
            }
            got
        }));
    }
    let mut per_inbox: HashMap<String, Vec<u64>> = HashMap::new();
    for j in joins {
        for (to, a) in j.join().expect("join") {
            assert!(!a.duplicate);
            per_inbox.entry(to).or_default().push(a.receiver_seq);
        }
    }
    let mut total = 0;
    for (to, mut seqs) in per_inbox {
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "{to}");
        total += seqs.len();
        let page = h
            .call_blocking(Op::ReadInbox { user: to.clone(), after_seq: 0, limit: 1000 })
            .and_then(Reply::page)
            .expect("page");
        assert_eq!(page.entries.len(), seqs.len());
    }
    assert_eq!(total, threads * per);
    h.shutdown();
}
