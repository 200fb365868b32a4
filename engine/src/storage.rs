//! The engine's link to the storage thread (`ether-store`): opening the store for a node, the
//! per-shard queues of committed deliveries, and stored entries turned back into messages.
//!
//! Store completions run on the storage thread in commit order; they only push into these
//! queues (lock-free) and wake the shard, which drains its queue on its own executor. So a
//! message reaches a user's terminals only after it is durable, and in seq order per inbox.
//! Membership changes made through this node's API travel the same queues (`Membership`,
//! `GroupGone`), so each shard applies them in commit order, between the group messages
//! committed before and after them. This module holds no shard state.
use std::future::poll_fn;
use std::sync::Arc;
use std::task::Poll;

use atomic_waker::AtomicWaker;
use crossbeam::queue::SegQueue;
use ether_store::op::{Appended, Entry, GroupAppended};
use ether_store::{SqliteBackend, SqliteOptions, StoreError, StoreHandle, StoreOptions, StoreThread};
use futures_channel::oneshot;
use serde_json::value::RawValue;

use crate::config::Config;
use crate::group_shards::{shards_in, GroupShards};
use crate::message::{Message, SharedMessage};
use crate::session::SessionKey;
use crate::shard::home_shard;
use ether_proto::frame::ServerFrame;

/// Something made durable that a shard pushes to its terminals.
#[derive(Debug)]
pub enum Committed {
    /// A single-chat message in one inbox.
    Inbox(InboxDelivery),
    /// A group message: the same frame bytes for every online member on every shard.
    Group(GroupDelivery),
    /// The answer to a terminal's `send`, for the shard that holds the terminal.
    Answer(TerminalAnswer),
    /// What another node asked this node's shards to do (cluster mode).
    Cluster(ClusterEvent),
    /// Events whose outbox write failed, back to the shard that made them to be written again
    /// (`EventBatch::requeue`).
    EventsRetry(Arc<[ether_store::NewEvent]>),
    /// A group message this shard accepted was stored: it tells the business which members
    /// it reached no terminal of (`group.unreached`).
    GroupPosted(GroupPosted),
    /// These users (who live on this shard) joined or left `group` through this node's API:
    /// queued by the change's store completion, so in commit order with every other
    /// membership change and group message of this node ([`CommitQueues::push_membership`]).
    Membership { group: Arc<str>, users: Vec<Arc<str>>, joined: bool },
    /// `group` was dissolved through this node's API (queued to every shard, in commit order).
    GroupGone(Arc<str>),
}

/// A group message made durable, for the `group.unreached` event of the shard that accepted
/// it.
#[derive(Debug)]
pub struct GroupPosted {
    pub group: Arc<str>,
    pub id: u64,
    pub seq: u64,
    /// The sender (`system` for the business's own posts): not a member to reach.
    pub from: Box<str>,
}

/// What another node of the cluster asks a shard to do to its own terminals.
#[derive(Debug)]
pub enum ClusterEvent {
    /// Push `frame` to every terminal of `user` (receipts, read syncs).
    UserFrame {
        user: Arc<str>,
        frame: Arc<ServerFrame>,
    },
    Kick {
        user: String,
        device: Option<String>,
        reason: String,
        /// Only terminals connected before this (Unix ms); `None`: all.
        before_ms: Option<u64>,
    },
    Broadcast(Arc<ServerFrame>),
    /// These users (who live on this shard) joined or left `group`.
    Membership {
        group: Arc<str>,
        users: Vec<Arc<str>>,
        joined: bool,
    },
    GroupGone(Arc<str>),
    /// Bus entries may have been lost (this node read behind what the streams keep, or another
    /// node failed to publish): check every local inbox and group against the store.
    Resync,
    /// Presence writes were lost (a failed write to Redis): write every local terminal's
    /// again, then resync (other nodes routed their users' traffic elsewhere meanwhile).
    Present,
}

/// Where a terminal's `send` is answered: its session, on the shard that submitted it.
#[derive(Debug)]
pub struct TerminalSend {
    pub shard: usize,
    pub session: SessionKey,
    pub cid: Box<str>,
}

/// A terminal's `send` made durable (or refused): the shard writes `sent` (or `error`).
#[derive(Debug)]
pub struct TerminalAnswer {
    pub session: SessionKey,
    pub cid: Box<str>,
    pub result: Result<Accepted, StoreError>,
}

/// A message made durable, as its sender is told: its id, its position in the sender's
/// stream (own inbox, or the group), and whether it repeated an earlier `cid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    pub id: u64,
    pub seq: u64,
    pub ts: u64,
    pub duplicate: bool,
}

impl From<&Appended> for Accepted {
    fn from(a: &Appended) -> Accepted {
        // The sender's own inbox position; the receiver's when the sender wrote to themself.
        Accepted { id: a.id, seq: a.sender_seq.unwrap_or(a.receiver_seq), ts: a.ts, duplicate: a.duplicate }
    }
}

impl From<&GroupAppended> for Accepted {
    fn from(a: &GroupAppended) -> Accepted {
        Accepted { id: a.id, seq: a.seq, ts: a.ts, duplicate: a.duplicate }
    }
}

/// Who hears that a submitted message is durable: a task awaiting it (API handlers) or, with
/// no task at all, a terminal's session through its shard's commit queue.
pub enum Answer<T> {
    Waiter(oneshot::Sender<Result<T, StoreError>>),
    Terminal(TerminalSend),
}

impl<T> Answer<T>
where
    for<'a> &'a T: Into<Accepted>,
{
    /// Hands the store's result over (on the storage thread, after the message's own
    /// deliveries were queued, so a shard reads them first).
    pub fn give(self, commits: &CommitQueues, result: Result<T, StoreError>) {
        match self {
            Answer::Waiter(tx) => {
                let _ = tx.send(result);
            }
            Answer::Terminal(t) => commits.push(
                t.shard,
                Committed::Answer(TerminalAnswer {
                    session: t.session,
                    cid: t.cid,
                    result: result.map(|v| (&v).into()),
                }),
            ),
        }
    }
}

/// A group message made durable, encoded once for every member.
#[derive(Debug, Clone)]
pub struct GroupDelivery {
    pub group: Arc<str>,
    pub seq: u64,
    pub id: u64,
    /// Unix ms when accepted.
    pub ts: u64,
    /// The `msg` frame in JSON, encoded once on the storage thread for every shard.
    pub frame: bytes::Bytes,
    /// The message, for the `ether.v1.proto` frame: encoded on a shard the first time one of
    /// its members speaks it.
    pub msg: SharedMessage,
}

/// A message made durable in one inbox, to push to that inbox owner's terminals.
#[derive(Debug)]
pub struct InboxDelivery {
    pub owner: Arc<str>,
    /// The chat as the owner names it (`u:<peer>`).
    pub chat: Arc<str>,
    pub seq: u64,
    pub msg: SharedMessage,
    /// The owner is the receiver (not the sender's own copy): an offline receiver is
    /// `message.unreached`.
    pub incoming: bool,
}

struct ShardQueue {
    items: SegQueue<Committed>,
    waker: AtomicWaker,
}

/// One queue of committed deliveries per shard, filled by store completions.
pub struct CommitQueues {
    shards: Vec<ShardQueue>,
    /// Which shards want which group's messages (shards keep their own bits).
    pub groups: GroupShards,
}

impl CommitQueues {
    pub fn new(shards: usize) -> Arc<CommitQueues> {
        debug_assert!(shards <= crate::message::SHARDS_MAX);
        Arc::new(CommitQueues {
            shards: (0..shards).map(|_| ShardQueue { items: SegQueue::new(), waker: AtomicWaker::new() }).collect(),
            groups: GroupShards::default(),
        })
    }

    /// Queues a committed group message for the shards that want the group (see
    /// [`GroupShards`]): `make` is called once per such shard. Returns how many.
    pub fn push_group(&self, group: &str, mut make: impl FnMut() -> GroupDelivery) -> usize {
        let mut queued = 0;
        for shard in shards_in(self.groups.wanting(group)).filter(|&s| s < self.shards.len()) {
            self.push(shard, Committed::Group(make()));
            queued += 1;
        }
        queued
    }

    /// Queues a committed membership change to the home shards of `users` (on the storage
    /// thread, in commit order). A join makes each such shard want the group's messages at
    /// once (`GroupShards::expect_join`), so one committed after the join reaches it even
    /// before it handled the join; it settles the bit when it does (`join_handled`).
    pub fn push_membership(&self, group: &Arc<str>, users: &[String], joined: bool) {
        let shards = self.shards.len();
        let mut per_shard: Vec<Vec<Arc<str>>> = vec![Vec::new(); shards];
        for u in users {
            per_shard[home_shard(u, shards)].push(Arc::from(u.as_str()));
        }
        for (shard, users) in per_shard.into_iter().enumerate().filter(|(_, u)| !u.is_empty()) {
            if joined {
                self.groups.expect_join(group, shard, None);
            }
            self.push(shard, Committed::Membership { group: group.clone(), users, joined });
        }
    }

    /// Queues a committed dissolution of `group` to every shard (on the storage thread, in
    /// commit order).
    pub fn push_group_gone(&self, group: &Arc<str>) {
        for shard in 0..self.shards.len() {
            self.push(shard, Committed::GroupGone(group.clone()));
        }
    }

    /// Queues a delivery for shard `shard` and wakes it (from any thread).
    pub fn push(&self, shard: usize, item: Committed) {
        let q = &self.shards[shard];
        q.items.push(item);
        q.waker.wake();
    }

    /// Deliveries waiting for shard `shard`.
    pub fn len(&self, shard: usize) -> usize {
        self.shards[shard].items.len()
    }

    pub fn is_empty(&self, shard: usize) -> bool {
        self.shards[shard].items.is_empty()
    }

    /// Waits until shard `shard` has deliveries, then moves up to `max` of them into `out`.
    pub async fn next_batch(&self, shard: usize, out: &mut Vec<Committed>, max: usize) {
        let q = &self.shards[shard];
        poll_fn(|cx| {
            q.waker.register(cx.waker());
            while out.len() < max {
                match q.items.pop() {
                    Some(item) => out.push(item),
                    None => break,
                }
            }
            if out.is_empty() {
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await
    }
}

/// Opens the node's store and starts its storage thread: in cluster mode the store the nodes
/// share (Redis, keys under `cluster::KEY_PREFIX`), else `<data>/ether.db` (SQLite).
pub fn open(config: &Config) -> Result<StoreHandle, ether_store::StoreError> {
    let opts = StoreOptions {
        on_idle: Some(crate::allocator::release_when_idle),
        retention: std::time::Duration::from_secs(u64::from(config.retention.days) * 86_400),
        batch_wait: config.store_batch_wait,
        batch_wait_after_ops: config.store_batch_wait_after_ops,
        queue_bytes_max: config.store_queue_bytes_max,
        ..StoreOptions::default()
    };
    if let Some(url) = &config.cluster.redis_url {
        let options = ether_store::RedisOptions {
            prefix: format!("{}store:", crate::cluster::KEY_PREFIX),
            // API.md: in cluster mode every event is also in the Redis stream `ether:events`.
            events_stream: Some(format!("{}events", crate::cluster::KEY_PREFIX)),
            // Without a webhook nobody fetches the outbox: the stream alone carries events.
            outbox: config.events.webhook.is_some(),
        };
        let backend = ether_store::RedisBackend::open(url, options)?.with_outbox_max(config.events.outbox_max);
        return StoreThread::spawn(backend, opts);
    }
    let backend = SqliteBackend::open_dir(
        &config.node.data_dir,
        SqliteOptions {
            durability: config.store_durability,
            flush_age: config.store_index_flush_age,
            pending_entries_max: config.store_index_pending_max,
            outbox_max: config.events.outbox_max,
            ..SqliteOptions::default()
        },
    )?;
    StoreThread::spawn(backend, opts)
}

/// A stored entry as a message again (for `sync` and history).
pub fn message_of(e: &Entry) -> Message {
    let body = RawValue::from_string(e.body.clone()).unwrap_or_else(|_| {
        // Stored bodies were validated JSON when written; a broken one is shown, not dropped.
        RawValue::from_string("{\"error\":\"stored body is not valid JSON\"}".into()).unwrap_or_default()
    });
    Message {
        id: e.id,
        ts: e.ts,
        from: e.from.as_str().into(),
        kind: e.kind,
        body,
        cid: e.cid.as_deref().map(Into::into),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg() -> SharedMessage {
        Arc::new(Message {
            id: 1,
            ts: 1,
            from: "a".into(),
            kind: ether_proto::Kind::Text,
            body: RawValue::from_string("{\"text\":\"x\"}".into()).unwrap(),
            cid: None,
        })
    }

    #[test]
    fn queues_keep_order_and_batch() {
        let q = CommitQueues::new(2);
        for seq in 1..=5 {
            q.push(
                1,
                Committed::Inbox(InboxDelivery {
                    owner: "b".into(),
                    chat: "u:a".into(),
                    seq,
                    msg: msg(),
                    incoming: true,
                }),
            );
        }
        assert_eq!(q.len(1), 5);
        assert!(q.is_empty(0));
        let mut out = Vec::new();
        futures_lite::future::block_on(q.next_batch(1, &mut out, 3));
        let seqs = |out: &[Committed]| -> Vec<u64> {
            out.iter()
                .map(|c| match c {
                    Committed::Inbox(d) => d.seq,
                    Committed::Group(g) => g.seq,
                    Committed::Answer(a) => a.result.as_ref().map_or(0, |a| a.seq),
                    Committed::Cluster(_)
                    | Committed::EventsRetry(_)
                    | Committed::GroupPosted(_)
                    | Committed::Membership { .. }
                    | Committed::GroupGone(_) => 0,
                })
                .collect()
        };
        assert_eq!(seqs(&out), vec![1, 2, 3]);
        out.clear();
        futures_lite::future::block_on(q.next_batch(1, &mut out, 10));
        assert_eq!(seqs(&out), vec![4, 5]);
    }

    /// A committed join goes to each user's home shard only, which wants the group's messages
    /// from then on (before it handled the join); a removal sets no bit; a dissolution goes to
    /// every shard.
    #[test]
    fn membership_changes_go_to_the_home_shards_in_order() {
        let q = CommitQueues::new(3);
        let crew: Arc<str> = Arc::from("crew");
        let users: Vec<String> = (0..12).map(|i| format!("u{i}")).collect();
        q.push_membership(&crew, &users, true);
        q.push_membership(&crew, &users[..1], false);
        q.push_group_gone(&crew);
        let home = home_shard(&users[0], 3);
        for shard in 0..3 {
            let mine: Vec<&str> = users.iter().filter(|u| home_shard(u, 3) == shard).map(String::as_str).collect();
            let mut out = Vec::new();
            futures_lite::future::block_on(q.next_batch(shard, &mut out, 10));
            let seen: Vec<String> = out
                .iter()
                .map(|c| match c {
                    Committed::Membership { users, joined, .. } => format!("{joined}:{}", users.join(",")),
                    Committed::GroupGone(g) => format!("gone:{g}"),
                    other => panic!("unexpected {other:?}"),
                })
                .collect();
            let mut want = Vec::new();
            if !mine.is_empty() {
                want.push(format!("true:{}", mine.join(",")));
            }
            if shard == home {
                want.push(format!("false:{}", users[0]));
            }
            want.push("gone:crew".to_owned());
            assert_eq!(seen, want, "shard {shard}");
            assert_eq!(q.groups.wanting("crew") & (1 << shard) != 0, !mine.is_empty(), "shard {shard}");
        }
    }

    #[test]
    fn entries_become_messages() {
        let e = Entry {
            seq: 3,
            chat: "u:a".into(),
            id: 9,
            ts: 7,
            from: "a".into(),
            kind: ether_proto::Kind::Text,
            body: "{\"text\":\"hi\"}".into(),
            cid: Some("c".into()),
        };
        let m = message_of(&e);
        assert_eq!((m.id, m.ts, &*m.from, m.body.get(), m.cid.as_deref()), (9, 7, "a", "{\"text\":\"hi\"}", Some("c")));
    }
}
