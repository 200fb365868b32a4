//! The conformance suite against `SqliteBackend`, directly and through `StoreThread`, plus
//! the SQLite-only paths: a full disk, a crash (SIGKILL) and reopen.
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ether_store::conformance::{self, text};
use ether_store::*;

static N: AtomicUsize = AtomicUsize::new(0);

fn open(dir: &Path, opts: SqliteOptions) -> SqliteBackend {
    let n = N.fetch_add(1, Ordering::Relaxed);
    SqliteBackend::open(dir.join(format!("{n}.db")), opts).expect("open")
}

#[test]
fn conformance_tiny_limits() {
    // flush_age 0 and 3 streams per step: positions move between memory and tables all the time.
    let dir = tempfile::tempdir().unwrap();
    conformance::run_all(|| open(dir.path(), SqliteOptions::test_min()));
}

#[test]
fn conformance_default_options() {
    // Default flush age: positions stay in memory unless a step forces them out.
    let dir = tempfile::tempdir().unwrap();
    conformance::run_all(|| open(dir.path(), SqliteOptions::default()));
}

#[test]
fn conformance_full_durability() {
    let dir = tempfile::tempdir().unwrap();
    let opts = SqliteOptions { durability: Durability::Full, ..SqliteOptions::test_min() };
    conformance::single_chat_both_inboxes(open(dir.path(), opts.clone()));
    conformance::idempotent_cid(open(dir.path(), opts));
}

#[test]
fn thread_completions_in_order() {
    let dir = tempfile::tempdir().unwrap();
    conformance::thread_completions_in_order(open(dir.path(), SqliteOptions::test_min()), StoreOptions::test_min());
}

#[test]
fn thread_concurrent_submitters() {
    let dir = tempfile::tempdir().unwrap();
    conformance::thread_concurrent_submitters(open(dir.path(), SqliteOptions::test_min()), StoreOptions::test_min());
    conformance::thread_concurrent_submitters(open(dir.path(), SqliteOptions::default()), StoreOptions::default());
}

#[test]
fn thread_overloaded_and_closed() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions { queue_capacity: 2, batch_wait: Duration::from_millis(50), ..StoreOptions::test_min() };
    let h = StoreThread::spawn(open(dir.path(), SqliteOptions::test_min()), opts).unwrap();
    // Block the storage thread inside a completion so the queue fills up.
    let (gate_tx, gate_rx) = crossbeam::channel::bounded::<()>(0);
    h.submit(StoreCmd::new(text("a", "b", None, "x"), move |_| {
        let _ = gate_rx.recv_timeout(Duration::from_secs(5));
    }))
    .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let mut overloaded = false;
    for _ in 0..10 {
        match h.submit(StoreCmd::new(text("a", "b", None, "y"), |_| {})) {
            Err(StoreError::Overloaded) => {
                overloaded = true;
                break;
            }
            Ok(()) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert!(overloaded, "a full queue answers Overloaded");
    assert_eq!(StoreError::Overloaded.code(), ether_proto::ErrorCode::Unavailable);
    let _ = gate_tx.send(());
    h.shutdown();
    assert_eq!(h.submit(StoreCmd::new(text("a", "b", None, "z"), |_| {})).unwrap_err(), StoreError::Closed);
}

#[test]
fn thread_call_async() {
    let dir = tempfile::tempdir().unwrap();
    let h = StoreThread::spawn(open(dir.path(), SqliteOptions::test_min()), StoreOptions::default()).unwrap();
    let fut = h.call(text("a", "b", Some("k"), "x"));
    // A minimal executor: the future completes from the storage thread's wake-up.
    let r = block_on(fut).unwrap().appended().unwrap();
    assert_eq!(r.receiver_seq, 1);
    let r = block_on(h.call(text("a", "b", Some("k"), "x"))).unwrap().appended().unwrap();
    assert!(r.duplicate);
    h.shutdown();
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    use std::sync::Arc;
    use std::task::{Context, Poll, Wake, Waker};
    struct T(std::thread::Thread);
    impl Wake for T {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(T(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park_timeout(Duration::from_millis(10));
    }
}

#[test]
fn full_disk_is_unavailable_and_reads_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let opts = SqliteOptions { max_page_count: Some(60), ..SqliteOptions::test_min() };
    let h = StoreThread::spawn(open(dir.path(), opts), StoreOptions::test_min()).unwrap();
    let big = "y".repeat(20_000);
    let mut stored = 0u64;
    let mut failed = None;
    for _ in 0..200 {
        match h.call_blocking(text("a", "b", None, &big)) {
            Ok(r) => stored = r.appended().unwrap().receiver_seq,
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    let e = failed.expect("the tiny database fills up");
    assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
    assert_eq!(e.code().http_status(), 503);
    assert!(stored > 0);
    // Still failing, still not panicking; a batch mixing reads and failing writes answers both.
    let (tx, rx) = crossbeam::channel::unbounded();
    for op in [text("a", "b", None, &big), Op::ReadInbox { user: "b".into(), after_seq: 0, limit: 1000 }] {
        let tx = tx.clone();
        h.submit(StoreCmd::new(op, move |r| tx.send(r).unwrap())).unwrap();
    }
    assert!(matches!(rx.recv().unwrap(), Err(StoreError::Unavailable(_))));
    let page = rx.recv().unwrap().unwrap().page().unwrap();
    assert_eq!(page.entries.len() as u64, stored);
    assert_eq!(page.head, stored);
    // Small writes that fit may still succeed; the seqs stay gap-free either way.
    let heads = h.call_blocking(Op::Heads { user: "b".into() }).unwrap().heads().unwrap();
    assert_eq!(heads.inbox_seq, stored);
    h.shutdown();
}

/// Runs in the child process of `crash_recovers_every_acknowledged_message`.
#[test]
#[ignore = "child process of crash_recovers_every_acknowledged_message"]
fn crash_child() {
    let Ok(dir) = std::env::var("ETHER_STORE_CRASH_DIR") else {
        return;
    };
    let b = SqliteBackend::open_dir(&dir, SqliteOptions::default()).unwrap();
    let h = StoreThread::spawn(b, StoreOptions::default()).unwrap();
    let out = std::sync::Arc::new(std::sync::Mutex::new(std::io::stdout()));
    for i in 0.. {
        let to = format!("r{}", i % 7);
        let from = format!("s{}", i % 5);
        let op = text(&from, &to, Some(&format!("c{i}")), "crash me");
        let make = || {
            let (out, to, from) = (out.clone(), to.clone(), from.clone());
            StoreCmd::new(op.clone(), move |r| {
                if let Ok(Reply::Appended(a)) = r {
                    let mut o = out.lock().unwrap();
                    let _ = writeln!(o, "ACK {to} {} {from} {} {}", a.receiver_seq, a.sender_seq.unwrap_or(0), a.id);
                    let _ = o.flush();
                }
            })
        };
        // A refused command is dropped unrun: build it again and retry.
        while let Err(e) = h.submit(make()) {
            assert_eq!(e, StoreError::Overloaded);
            std::thread::sleep(Duration::from_micros(200));
        }
        if i % 64 == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn acked(dir: &Path) -> Vec<(String, u64, String, u64, u64)> {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args(["--exact", "crash_child", "--ignored", "--nocapture", "--test-threads=1"])
        .env("ETHER_STORE_CRASH_DIR", dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut acks = Vec::new();
    while acks.len() < 3000 {
        let Some(Ok(l)) = lines.next() else { break };
        // The test harness may print its own words on the same line first.
        let Some(at) = l.find("ACK ") else { continue };
        let f: Vec<&str> = l[at..].split_whitespace().collect();
        if f.len() == 6 && f[0] == "ACK" {
            acks.push((
                f[1].to_string(),
                f[2].parse().unwrap(),
                f[3].to_string(),
                f[4].parse().unwrap(),
                f[5].parse().unwrap(),
            ));
        }
    }
    child.kill().unwrap(); // SIGKILL: no clean shutdown, no flush of the in-memory index
    let _ = child.wait();
    acks
}

#[test]
fn crash_recovers_every_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().into();
    let acks = acked(&path);
    assert!(acks.len() >= 3000, "child acknowledged {} messages", acks.len());
    let mut b = SqliteBackend::open_dir(&path, SqliteOptions::default()).unwrap();
    let mut inboxes = std::collections::HashMap::new();
    for u in (0..7).map(|i| format!("r{i}")).chain((0..5).map(|i| format!("s{i}"))) {
        let mut all = Vec::new();
        let mut after = 0;
        loop {
            let p = b.apply(Op::ReadInbox { user: u.clone(), after_seq: after, limit: 1000 }).unwrap().page().unwrap();
            after = p.entries.last().map_or(after, |e| e.seq);
            all.extend(p.entries);
            if !p.more {
                break;
            }
        }
        let seqs: Vec<u64> = all.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "{u}: gap-free");
        let by_seq: std::collections::HashMap<u64, u64> = all.iter().map(|e| (e.seq, e.id)).collect();
        inboxes.insert(u, by_seq);
    }
    for (to, rseq, from, sseq, id) in &acks {
        assert_eq!(inboxes[to].get(rseq), Some(id), "{to} seq {rseq}");
        assert_eq!(inboxes[from].get(sseq), Some(id), "{from} seq {sseq}");
    }
    // Writing goes on after the last stored position, and cids are still remembered.
    let head = inboxes["r0"].len() as u64;
    let a = b.apply(text("x", "r0", None, "after")).unwrap().appended().unwrap();
    assert_eq!(a.receiver_seq, head + 1);
    let (to, _, from, _, id) = &acks[0];
    let _ = to;
    let i: u64 = 0;
    let dup = b.apply(text(from, "r0", Some(&format!("c{i}")), "again")).unwrap().appended().unwrap();
    assert!(dup.duplicate, "{dup:?} vs {:?}", acks[0]);
    assert_eq!(dup.id, *id);
}

/// An idle store commits a lone command at once; only after a big batch does the next one
/// stay open for more (`batch_wait_after_ops`). With a 30 s wait, a lone command that waited
/// would not be answered within the 10 s this test allows.
#[test]
fn thread_waits_for_more_only_when_busy() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions {
        batch_wait: Duration::from_secs(30),
        batch_wait_after_ops: 4,
        batch_ops_max: 1024,
        ..StoreOptions::test_min()
    };
    let h = StoreThread::spawn(open(dir.path(), SqliteOptions::test_min()), opts).unwrap();
    for i in 0..3 {
        let (tx, rx) = crossbeam::channel::bounded(1);
        h.submit(StoreCmd::new(text("a", "b", None, &format!("m{i}")), move |r| {
            let _ = tx.send(r.is_ok());
        }))
        .unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(true), "lone command {i} committed at once");
    }
    h.shutdown();
}

/// A group message with a `cid` from a user whose inbox is not in memory (its stream state
/// was trimmed from the cache) must not reset that inbox's head: the user's next single-chat
/// message still gets the next seq. It used to get seq 1 again (found by comparing random
/// batches with the Redis backend).
#[test]
fn a_group_send_with_a_cid_keeps_the_senders_inbox_seqs() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = open(dir.path(), SqliteOptions::test_min());
    for i in 0..3 {
        b.apply(text("una", "vic", None, &format!("m{i}"))).unwrap();
    }
    b.apply(conformance::group_op("g1", "una", &[])).unwrap();
    // Flush every position, then touch more streams than the cache keeps (test_min: 8), so
    // una's clean inbox leaves memory.
    let far = u64::MAX / 4;
    while b.maintain(far).unwrap() {}
    for i in 0..20 {
        b.apply(text(&format!("x{i}"), &format!("y{i}"), None, "filler")).unwrap();
        while b.maintain(far).unwrap() {}
    }
    b.apply(conformance::group_text("una", "g1", Some("gc-1"), "to the group")).unwrap();
    let a = b.apply(text("una", "vic", None, "after")).unwrap().appended().unwrap();
    assert_eq!(a.sender_seq, Some(4), "una's inbox held seqs 1..=3");
    let page = b.apply(Op::ReadInbox { user: "una".into(), after_seq: 0, limit: 10 }).unwrap().page().unwrap();
    let seqs: Vec<u64> = page.entries.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [1, 2, 3, 4], "no seq given twice");
}

/// The same after a restart: a group message with a `cid` still only in the index tail (not
/// yet flushed) is recovered on open without resetting its sender's inbox head.
#[test]
fn recovering_a_group_send_with_a_cid_keeps_the_senders_inbox_seqs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("recover.db");
    {
        let mut b = SqliteBackend::open(&path, SqliteOptions::default()).unwrap();
        for i in 0..3 {
            b.apply(text("una", "vic", None, &format!("m{i}"))).unwrap();
        }
        b.apply(conformance::group_op("g1", "una", &[])).unwrap();
        // The inbox positions reach their table; the group message stays in the tail.
        let far = u64::MAX / 4;
        while b.maintain(far).unwrap() {}
        b.apply(conformance::group_text("una", "g1", Some("gc-1"), "to the group")).unwrap();
    }
    let mut b = SqliteBackend::open(&path, SqliteOptions::default()).unwrap();
    let a = b.apply(text("una", "vic", None, "after")).unwrap().appended().unwrap();
    assert_eq!(a.sender_seq, Some(4), "una's inbox held seqs 1..=3");
    // And the recovered cid still deduplicates.
    let again = b.apply(conformance::group_text("una", "g1", Some("gc-1"), "to the group")).unwrap();
    assert!(again.group_appended().unwrap().duplicate);
}

/// A database an older build left at schema version 1 (no `members.joined`) opens with this
/// one: migrated to version 2 in place, its groups, members and messages kept; its members
/// count as joined at 0 (as version 1 counted every member), members added now join at the
/// head.
#[test]
fn a_version_1_database_is_migrated_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1.db");
    {
        let mut b = SqliteBackend::open(&path, SqliteOptions::default()).expect("open");
        let create = Op::CreateGroup {
            id: Some("old".into()),
            name: "old".into(),
            owner: "a".into(),
            members: vec!["b".into()],
            created_ms: 1,
            members_max: 100,
            groups_per_user_max: 100,
        };
        b.apply(create).unwrap();
        for t in ["1", "2"] {
            b.apply(conformance::group_text("a", "old", None, t)).unwrap();
        }
    }
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch("ALTER TABLE members DROP COLUMN joined; UPDATE meta SET v = 1 WHERE k = 'schema';")
            .unwrap();
    }
    let mut b = SqliteBackend::open(&path, SqliteOptions::default()).expect("a version 1 database opens");
    let unread = |b: &mut SqliteBackend, u: &str| b.apply(Op::Unread { user: u.into() }).unwrap().unread().unwrap();
    assert_eq!(unread(&mut b, "b"), [("g:old".to_string(), 2)].into());
    b.apply(Op::AddMembers {
        group: "old".into(),
        users: vec!["c".into()],
        members_max: 100,
        groups_per_user_max: 100,
    })
    .unwrap();
    assert!(unread(&mut b, "c").is_empty());
    b.apply(conformance::group_text("a", "old", None, "3")).unwrap();
    assert_eq!(unread(&mut b, "c"), [("g:old".to_string(), 1)].into());
    let page = b.apply(Op::ReadGroup { group: "old".into(), after_seq: 0, limit: 10 }).unwrap().page().unwrap();
    assert_eq!(page.entries.len(), 3);
    drop(b);
    let conn = rusqlite::Connection::open(&path).unwrap();
    let v: i64 = conn.query_row("SELECT v FROM meta WHERE k = 'schema'", [], |r| r.get(0)).unwrap();
    assert_eq!(v, 2);
}

/// `outbox_max` caps the outbox: the newest events are kept, the oldest dropped and counted.
#[test]
fn outbox_capped_keeps_the_newest() {
    let dir = tempfile::tempdir().unwrap();
    for opts in [SqliteOptions::test_min(), SqliteOptions::default()] {
        conformance::outbox_capped_keeps_the_newest(open(dir.path(), SqliteOptions { outbox_max: 5, ..opts }), 5);
    }
}

/// The drop count survives a restart; an outbox far past a lowered cap shrinks by a bounded
/// step per write (no single long delete), then holds exactly the cap.
#[test]
fn outbox_far_past_its_cap_shrinks_in_steps_and_its_drops_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let ev = |i: u64| NewEvent { kind: "user.online".into(), data: format!("{{\"i\":{i}}}"), ts: i };
    let stats = |b: &mut SqliteBackend| b.apply(Op::OutboxStats).unwrap().outbox_stats().unwrap();
    let total = 3 * OUTBOX_TRIM_STEP;
    {
        let mut b = SqliteBackend::open(&path, SqliteOptions::default()).unwrap();
        b.apply(Op::OutboxAppend { events: (0..total).map(ev).collect() }).unwrap();
        assert_eq!(stats(&mut b), OutboxStats { events: total, dropped: 0 });
    }
    let mut b = SqliteBackend::open(&path, SqliteOptions { outbox_max: 10, ..SqliteOptions::default() }).unwrap();
    b.apply(Op::OutboxAppend { events: vec![ev(total)].into() }).unwrap();
    assert_eq!(
        stats(&mut b),
        OutboxStats { events: total + 1 - (OUTBOX_TRIM_STEP + 1), dropped: OUTBOX_TRIM_STEP + 1 }
    );
    for i in 1..=2 {
        b.apply(Op::OutboxAppend { events: vec![ev(total + i)].into() }).unwrap();
    }
    assert_eq!(stats(&mut b), OutboxStats { events: 10, dropped: total + 3 - 10 });
    drop(b);
    let mut b = SqliteBackend::open(&path, SqliteOptions { outbox_max: 10, ..SqliteOptions::default() }).unwrap();
    assert_eq!(stats(&mut b), OutboxStats { events: 10, dropped: total + 3 - 10 }, "kept across a restart");
}

/// FNV-1a of a cid alone: how a group message's cid row was keyed before group cids were
/// scoped to their group (a copy of the store's hash, to write such a row by hand).
fn legacy_cid_hash(cid: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in cid.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h as i64
}

/// A database written before group cids were scoped keeps a group message's cid row under
/// the sender and the cid alone. It no longer answers for anything: not a group retry (stored
/// again: accepted across the upgrade), not the sender's single chat with the same cid, which
/// gets its own message and, retried, is that message again, after the index is written and
/// after a restart.
#[test]
fn a_group_cid_row_from_before_scoping_stays_readable_and_blocks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("legacy.db");
    {
        let mut b = SqliteBackend::open(&path, SqliteOptions::default()).unwrap();
        b.apply(conformance::group_op("g1", "una", &[])).unwrap();
        b.apply(conformance::group_text("una", "g1", Some("old-1"), "before the upgrade")).unwrap();
        b.flush_all().unwrap();
    }
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        let n = c.execute("UPDATE cids SET h = ?1", [legacy_cid_hash("old-1")]).unwrap();
        assert_eq!(n, 1, "the group message's cid row, now as an older build keyed it");
    }
    let mut b = SqliteBackend::open(&path, SqliteOptions::default()).unwrap();
    let log = b.apply(Op::ReadGroup { group: "g1".into(), after_seq: 0, limit: 10 }).unwrap().page().unwrap();
    assert_eq!(log.entries.len(), 1, "stored data reads as before");
    let single = b.apply(text("una", "vic", Some("old-1"), "single")).unwrap().appended().unwrap();
    assert!(!single.duplicate);
    assert_eq!(single.receiver_seq, 1);
    b.flush_all().unwrap();
    let again = b.apply(text("una", "vic", Some("old-1"), "retry")).unwrap().appended().unwrap();
    assert!(again.duplicate && again.id == single.id, "{again:?}");
    drop(b);
    let mut b = SqliteBackend::open(&path, SqliteOptions::default()).unwrap();
    let again = b.apply(text("una", "vic", Some("old-1"), "retry")).unwrap().appended().unwrap();
    assert!(again.duplicate && again.id == single.id, "{again:?}");
    let vic = b.apply(Op::ReadInbox { user: "vic".into(), after_seq: 0, limit: 10 }).unwrap().page().unwrap();
    assert_eq!(vic.entries.len(), 1);
}

/// The storage thread reads the outbox's size and drop count into its stats (what the admin
/// port shows as `ether_outbox_events` and `ether_outbox_dropped_total`).
#[test]
fn thread_stats_show_the_outbox_and_its_drops() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(dir.path(), SqliteOptions { outbox_max: 3, ..SqliteOptions::test_min() });
    let h = StoreThread::spawn(b, StoreOptions::test_min()).unwrap();
    let ev = |i: u64| NewEvent { kind: "user.online".into(), data: format!("{{\"i\":{i}}}"), ts: i };
    h.call_blocking(Op::OutboxAppend { events: (0..5).map(ev).collect() }).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let read = |h: &StoreHandle| {
        (h.stats().outbox_events.load(Ordering::Relaxed), h.stats().outbox_dropped.load(Ordering::Relaxed))
    };
    while read(&h) != (3, 2) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(read(&h), (3, 2));
    h.shutdown();
}
