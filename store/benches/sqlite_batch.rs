//! Criterion benchmarks of the SQLite backend's write path as the storage thread runs it: one
//! `apply_batch` (one transaction) of single-chat messages between users of a 10,000-user
//! population, alone and in the shape `chat` traffic gives (every message acked by its
//! receiver's terminal, every tenth read), and of group messages.
//!
//! ```sh
//! cargo bench -p ether-store --bench sqlite_batch
//! ```
//! Each benchmark writes into its own fresh database in a temporary directory; the stream
//! index is flushed by the backend's own rules (as in the node), so a long run includes it.
//! The storage thread's queueing and the submit → committed latency are measured by
//! `ether-store-bench` (crate binary) and end to end by `ether-loadtest`.
use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ether_proto::Kind;
use ether_store::{NewGroupMessage, NewMessage, Op, Reply, SqliteBackend, SqliteOptions, StoreBackend, StoreError};
use rand::{Rng, SeedableRng};

/// Operations per transaction: about what the storage thread takes at once under load.
const BATCH: usize = 256;
const USERS: u64 = 10_000;

/// Message ids as the engine makes them: unix ms above 20 bits of shard and counter.
struct Ids {
    next: u64,
}

impl Ids {
    fn new() -> Self {
        Ids { next: 1_795_000_000_000u64 << 20 }
    }
    fn take(&mut self) -> (u64, u64) {
        self.next += 1;
        (self.next, self.next >> 20)
    }
}

fn open() -> (tempfile::TempDir, SqliteBackend) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteBackend::open_dir(dir.path(), SqliteOptions::default()).expect("open store");
    (dir, store)
}

fn check(replies: Vec<Result<Reply, StoreError>>) -> usize {
    let ok = replies.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, replies.len(), "every op of a benchmark batch succeeds: {:?}", replies.iter().find(|r| r.is_err()));
    ok
}

fn chat_message(ids: &mut Ids, rng: &mut impl Rng, with_cid: bool) -> (Op, String, u64) {
    let (id, ts) = ids.take();
    let from = rng.gen_range(0..USERS);
    let to = (from + rng.gen_range(1..USERS)) % USERS;
    let op = Op::Append(NewMessage {
        id,
        ts,
        from: format!("user-{from}"),
        to: format!("user-{to}"),
        kind: Kind::Text,
        body: r#"{"text":"see you at 8, table by the window"}"#.to_string(),
        cid: with_cid.then(|| format!("c-{id:x}")),
    });
    (op, format!("user-{to}"), from)
}

fn single_chat(c: &mut Criterion) {
    let mut g = c.benchmark_group("sqlite_batch");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.sample_size(30);

    for (name, with_cid) in [("append_256", false), ("append_256_with_cid", true)] {
        let (_dir, mut store) = open();
        let mut ids = Ids::new();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        g.bench_function(name, |b| {
            b.iter_batched(
                || (0..BATCH).map(|_| chat_message(&mut ids, &mut rng, with_cid).0).collect::<Vec<_>>(),
                |ops| black_box(check(store.apply_batch(&ops))),
                criterion::BatchSize::LargeInput,
            )
        });
    }

    // The chat shape: each message, its receiver's delivery ack, and every tenth a read.
    let (_dir, mut store) = open();
    let mut ids = Ids::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut seqs: BTreeMap<String, u64> = BTreeMap::new();
    g.bench_function("chat_256_with_acks_and_reads", |b| {
        b.iter_batched(
            || {
                let mut ops = Vec::with_capacity(BATCH * 2 + BATCH / 10);
                for i in 0..BATCH {
                    let (op, to, from) = chat_message(&mut ids, &mut rng, true);
                    ops.push(op);
                    let seq = seqs.entry(to.clone()).or_insert(0);
                    *seq += 1;
                    ops.push(Op::SetDelivered { user: to.clone(), device: "phone".into(), group: None, seq: *seq });
                    if i % 10 == 0 {
                        ops.push(Op::SetRead {
                            user: to,
                            chat: format!("u:user-{from}"),
                            seq: u64::MAX,
                            emit_event: true,
                        });
                    }
                }
                ops
            },
            |ops| black_box(check(store.apply_batch(&ops))),
            criterion::BatchSize::LargeInput,
        )
    });
    g.finish();
}

fn group_messages(c: &mut Criterion) {
    let mut g = c.benchmark_group("sqlite_batch");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.sample_size(30);
    let (_dir, mut store) = open();
    let members: Vec<String> = (0..100).map(|i| format!("user-{i}")).collect();
    let created = store.apply_batch(&[Op::CreateGroup {
        id: Some("g-bench".into()),
        name: "bench".into(),
        owner: members[0].clone(),
        members: members.clone(),
        created_ms: 1_795_000_000_000,
        members_max: 10_000,
        groups_per_user_max: 1_000,
    }]);
    match created.first() {
        Some(Ok(Reply::GroupCreated { .. })) => {}
        other => panic!("group created: {other:?}"),
    }
    let mut ids = Ids::new();
    let mut n = 0usize;
    g.bench_function("group_append_256", |b| {
        b.iter_batched(
            || {
                (0..BATCH)
                    .map(|_| {
                        let (id, ts) = ids.take();
                        n += 1;
                        Op::AppendGroup(NewGroupMessage {
                            id,
                            ts,
                            from: members[n % members.len()].clone(),
                            group: "g-bench".into(),
                            kind: Kind::Text,
                            body: r#"{"text":"standup moved to 10:30"}"#.to_string(),
                            cid: None,
                            system: false,
                        })
                    })
                    .collect::<Vec<_>>()
            },
            |ops| black_box(check(store.apply_batch(&ops))),
            criterion::BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, single_chat, group_messages);
criterion_main!(benches);
