//! Delivery on a shard: single-chat messages made durable through the storage thread, then
//! pushed to every terminal of both users in commit order; acks and resends; `sync` pages;
//! read positions with receipts; inbox heads for `welcome`. Works on the shard's own state
//! (sessions, users, wheels) and reaches other shards only by `ShardMsg`.
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use ether_proto::frame::{FrameType, ServerFrame};
use ether_proto::ids::Chat;
use ether_proto::{ApiError, ErrorCode};
use ether_store::op::{Appended, Heads, NewEvent, NewMessage as StoreMessage, Op, Reply};
use ether_store::{StoreCmd, StoreError};
use futures_channel::oneshot;
use tracing::{debug, warn};

use crate::cluster::{BusEvent, BusMessage};
use crate::error::EngineError;
use crate::event_batch::AddOutcome;
use crate::mesh::ShardMsg;
use crate::message::{encode_for, frame_set, unix_now_ms, FrameSet, Message, NewMessage};
use crate::session::{Session, SessionKey};
use crate::shard::{home_shard, Shard, UserEntry};
use crate::stats::ShardCounters;
use crate::storage::{message_of, Answer, ClusterEvent, Committed, InboxDelivery, TerminalAnswer};

/// Committed deliveries a shard handles before it lets its other tasks run.
const COMMIT_BATCH_MAX: usize = 256;
/// Longest a terminal's own ack timeout may stretch the wait before a resend (RFC 6298 allows
/// an upper bound of 60 s): beyond it, even very late acks do not hold resends back further.
const ACK_TIMEOUT_MAX_MS: u64 = 60_000;

/// A session's own ack timeout ([`Session::ack_timeout_ms`], at most `ACK_TIMEOUT_MAX_MS`) in
/// shard ticks, rounded up.
pub(crate) fn ack_timeout_ticks(s: &Session) -> u64 {
    let tick_ms = crate::shard::TICK.as_millis() as u64;
    s.ack_timeout_ms().min(ACK_TIMEOUT_MAX_MS).div_ceil(tick_ms)
}

/// A message accepted (durable) for a sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub id: u64,
    pub ts: u64,
    /// The message's seq in the sender's own inbox (the receiver's when sent to oneself).
    pub sender_seq: u64,
}

/// How long `push_paced` waits at most for a terminal to read before pushing anyway.
const PACED_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(30);
/// How often `push_paced` looks at the queue again while it waits.
const PACED_POLL: std::time::Duration = std::time::Duration::from_millis(5);

impl Shard {
    // ---- accepting -----------------------------------------------------------------------

    /// Submits a single-chat message to the storage thread. When its batch commits, the
    /// completion (on the storage thread, in commit order) queues the message for the
    /// receiver's home shard (chat `u:<from>`), then gives `answer` the stored result, then
    /// queues the sender's copy (chat `u:<to>`). A repeated `(from, cid)` pushes nothing and
    /// answers with the first message's id, ts and seqs.
    pub(crate) fn submit_single(&self, new: NewMessage, answer: Answer<Appended>) -> Result<(), EngineError> {
        if self.node.stopping() || self.node.draining() {
            return Err(EngineError::ShuttingDown);
        }
        let (id, ts) =
            self.ids.next().ok_or_else(|| Shard::api_error(ErrorCode::Unavailable, crate::cluster::NO_ID_LEASE))?;
        let NewMessage { from, to, kind, body, cid } = new;
        let op = Op::Append(StoreMessage {
            id,
            ts,
            from: from.to_string(),
            to: to.to_string(),
            kind,
            body: body.get().to_owned(),
            cid: cid.as_deref().map(str::to_owned),
        });
        let msg = Arc::new(Message { id, ts, from: from.clone(), kind, body, cid });
        let commits = self.commits.clone();
        let shards = self.shards;
        let cluster = self.node.cluster().cloned();
        let (from, to): (Arc<str>, Arc<str>) = (Arc::from(&*from), Arc::from(&*to));
        self.store.submit(StoreCmd::new(op, move |result| {
            let result = result.and_then(Reply::appended);
            if let (Some(cluster), Ok(a)) = (&cluster, &result) {
                if !a.duplicate {
                    // The other nodes push it to the terminals they hold (from the store if
                    // this is lost on the way).
                    cluster.publish(BusEvent::Inbox {
                        owner: to.to_string(),
                        chat: format!("u:{from}"),
                        seq: a.receiver_seq,
                        msg: BusMessage::of(&msg),
                    });
                    if let Some(seq) = a.sender_seq {
                        cluster.publish(BusEvent::Inbox {
                            owner: from.to_string(),
                            chat: format!("u:{to}"),
                            seq,
                            msg: BusMessage::of(&msg),
                        });
                    }
                }
            }
            let own_copy = match &result {
                Ok(a) if !a.duplicate => {
                    commits.push(
                        home_shard(&to, shards),
                        Committed::Inbox(InboxDelivery {
                            owner: to.clone(),
                            chat: Arc::from(format!("u:{from}")),
                            seq: a.receiver_seq,
                            msg: msg.clone(),
                            incoming: true,
                        }),
                    );
                    a.sender_seq
                }
                _ => None,
            };
            answer.give(&commits, result);
            if let Some(seq) = own_copy {
                commits.push(
                    home_shard(&from, shards),
                    Committed::Inbox(InboxDelivery {
                        owner: from,
                        chat: Arc::from(format!("u:{to}")),
                        seq,
                        msg,
                        incoming: false,
                    }),
                );
            }
        }))?;
        Ok(())
    }

    /// Submits a single-chat message and waits until it is durable.
    fn submit_single_waiting(
        &self,
        new: NewMessage,
    ) -> Result<oneshot::Receiver<Result<Appended, StoreError>>, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.submit_single(new, Answer::Waiter(tx))?;
        Ok(rx)
    }

    fn sent_of(a: Appended) -> Sent {
        Sent { id: a.id, ts: a.ts, sender_seq: a.sender_seq.unwrap_or(a.receiver_seq) }
    }

    /// Accepts a single-chat message: answers once it is durable in both inboxes.
    pub async fn send_single(self: &Rc<Self>, new: NewMessage) -> Result<Sent, EngineError> {
        let rx = self.submit_single_waiting(new)?;
        let appended = rx.await.map_err(|_| EngineError::Store(StoreError::Closed))??;
        if !appended.duplicate {
            ShardCounters::add(&self.counters().messages_accepted, 1);
        }
        Ok(Self::sent_of(appended))
    }

    /// Accepts many single-chat messages (submitted in order, so per-inbox order is kept);
    /// one result per message.
    pub async fn send_many(self: &Rc<Self>, msgs: Vec<NewMessage>) -> Vec<Result<Sent, EngineError>> {
        let pending: Vec<_> = msgs.into_iter().map(|m| self.submit_single_waiting(m)).collect();
        let mut out = Vec::with_capacity(pending.len());
        let mut accepted = 0;
        for p in pending {
            out.push(match p {
                Ok(rx) => match rx.await {
                    Ok(Ok(a)) => {
                        accepted += u64::from(!a.duplicate);
                        Ok(Self::sent_of(a))
                    }
                    Ok(Err(e)) => Err(EngineError::Store(e)),
                    Err(_) => Err(EngineError::Store(StoreError::Closed)),
                },
                Err(e) => Err(e),
            });
        }
        ShardCounters::add(&self.counters().messages_accepted, accepted);
        out
    }

    // ---- pushing -------------------------------------------------------------------------

    /// Drains this shard's committed deliveries until the node stops.
    pub async fn commit_loop(self: Rc<Self>) {
        let mut batch = Vec::with_capacity(COMMIT_BATCH_MAX);
        let mut groups = Vec::new();
        while !self.node.stopping() {
            self.commits.next_batch(self.id, &mut batch, COMMIT_BATCH_MAX).await;
            let mut delivered = 0;
            // Inbox and group streams are independent; each keeps its own order.
            for c in batch.drain(..) {
                match c {
                    Committed::Inbox(d) => delivered += self.deliver_committed(&d),
                    Committed::Group(g) => groups.push(g),
                    Committed::Answer(a) => self.answer_terminal(a),
                    Committed::Cluster(e) => self.on_cluster_event(e),
                    Committed::EventsRetry(events) => self.requeue_events(&events),
                    Committed::GroupPosted(p) => self.emit_group_unreached(p),
                    // In commit order with the group messages around it: those committed
                    // before it are fanned out first, those after it find it applied.
                    Committed::Membership { group, users, joined } => {
                        delivered += self.fan_out_committed(&mut groups).await;
                        self.membership_committed(&group, &users, joined);
                    }
                    Committed::GroupGone(group) => {
                        delivered += self.fan_out_committed(&mut groups).await;
                        self.group_gone_local(&group);
                    }
                }
            }
            delivered += self.fan_out_committed(&mut groups).await;
            ShardCounters::add(&self.counters().deliveries, delivered);
            glommio::yield_if_needed().await;
        }
    }

    /// Writes `sent` (or `error`) to the terminal whose `send` this answers; a terminal that
    /// left meanwhile finds its message by `sync`.
    fn answer_terminal(&self, a: TerminalAnswer) {
        let frame = match a.result {
            Ok(accepted) => {
                if !accepted.duplicate {
                    ShardCounters::add(&self.counters().messages_accepted, 1);
                }
                ServerFrame::Sent { cid: a.cid.into(), id: accepted.id.to_string(), seq: accepted.seq, ts: accepted.ts }
            }
            Err(e) => {
                let e = EngineError::Store(e).to_api();
                ServerFrame::Error {
                    code: e.code,
                    message: e.message,
                    reference: Some(a.cid.into()),
                    of: Some(FrameType::Send),
                }
            }
        };
        if let Some(s) = self.session(a.session) {
            self.push(&s, encode_for(&frame, s.wire));
        }
    }

    /// Pushes a committed message to its owner's terminals (the frame encoded once for the
    /// inbox, shared by all of them); returns how many got it. A message to a user without a
    /// terminal online here makes `message.unreached` (see [`Shard::emit_unreached`]).
    fn deliver_committed(self: &Rc<Self>, c: &InboxDelivery) -> u64 {
        debug_assert_eq!(home_shard(&c.owner, self.shards), self.id, "delivery away from the owner's home shard");
        if c.incoming && self.events_enabled() && !self.online_here(&c.owner) {
            // The message waits in the store for `sync`; the business may push it.
            self.emit_unreached(c.msg.id, c.owner.clone());
        }
        let mut users = self.users.borrow_mut();
        let entry = match users.get_mut(&c.owner) {
            Some(entry) if !entry.sessions.is_empty() => entry,
            Some(entry) => {
                // Only terminals being taken on: their `welcome` gives this head, they `sync`.
                entry.inbox_seq = entry.inbox_seq.max(c.seq);
                return 0;
            }
            None => return 0,
        };
        if self.node.cluster().is_some() && entry.heads_known {
            // Several nodes write this inbox and the bus may reorder or lose: push only the
            // next seq; for anything else read what is missing from the store, in order.
            if c.seq <= entry.inbox_seq {
                return 0;
            }
            if c.seq != entry.inbox_seq + 1 || entry.fill_to > 0 {
                let start = entry.fill_to == 0;
                entry.fill_to = entry.fill_to.max(c.seq);
                drop(users);
                if start {
                    self.fill_inbox(c.owner.clone());
                }
                return 0;
            }
        }
        entry.inbox_seq = entry.inbox_seq.max(c.seq);
        let waited_ms = unix_now_ms().saturating_sub(c.msg.ts);
        self.push_latency.borrow_mut().record(waited_ms as f64 / 1000.0);
        self.push_inbox(&entry.sessions, &c.msg, &c.chat, c.seq)
    }

    /// Pushes one inbox message to the given terminals of its owner, encoded once per
    /// subprotocol. Touches sessions and wheels, never the user index (which callers may hold
    /// borrowed).
    fn push_inbox(&self, sessions: &[SessionKey], msg: &Message, chat: &str, seq: u64) -> u64 {
        let mut frames = FrameSet::new(|wire| msg.encode_frame_for(wire, chat, seq));
        let mut delivered = 0;
        for key in sessions {
            if let Some(s) = self.session(*key) {
                let frame = frames.get(s.wire);
                if self.push(&s, frame.clone()) {
                    self.track(&s, seq, msg.id, frame);
                    delivered += 1;
                }
            }
        }
        delivered
    }

    /// Cluster mode: reads the owner's inbox from what this shard pushed up to `fill_to` (and
    /// whatever came meanwhile) from the store and pushes it, in seq order, at the pace the
    /// owner's terminals read (as a `sync` page: a run of big messages must not close them as
    /// slow consumers). Call it without holding the user index: the task may start at once.
    fn fill_inbox(self: &Rc<Self>, owner: Arc<str>) {
        let shard = self.clone();
        glommio::spawn_local(async move {
            loop {
                let (after, to) = match shard.users.borrow_mut().get_mut(&owner) {
                    Some(e) if !e.sessions.is_empty() && e.fill_to > e.inbox_seq => (e.inbox_seq, e.fill_to),
                    Some(e) => {
                        e.fill_to = 0;
                        return;
                    }
                    None => return,
                };
                let limit = usize::try_from(to - after).unwrap_or(usize::MAX).min(shard.config.limits.sync_page_max);
                let op = Op::ReadInbox { user: owner.to_string(), after_seq: after, limit };
                let page = match shard.store.call(op).await.and_then(Reply::page) {
                    Ok(p) => p,
                    Err(e) => {
                        // The terminals catch up with `sync` (they see the gap in seqs).
                        warn!(user = %owner, shard = shard.id, error = %e, "cluster: cannot read the inbox to fill a gap");
                        if let Some(entry) = shard.users.borrow_mut().get_mut(&owner) {
                            entry.fill_to = 0;
                        }
                        return;
                    }
                };
                let mut delivered = 0;
                for e in &page.entries {
                    // Live deliveries meanwhile only raise `fill_to` (they are read next), so
                    // waiting here keeps the seq order.
                    shard.wait_for_room(&owner, e.body.len()).await;
                    let mut users = shard.users.borrow_mut();
                    let Some(entry) = users.get_mut(&owner) else { return };
                    if e.seq <= entry.inbox_seq {
                        continue;
                    }
                    entry.inbox_seq = e.seq;
                    delivered += shard.push_inbox(&entry.sessions, &message_of(e), &e.chat, e.seq);
                }
                let mut users = shard.users.borrow_mut();
                let Some(entry) = users.get_mut(&owner) else { return };
                // Purged or unreadable positions are skipped, never waited for.
                entry.inbox_seq = entry.inbox_seq.max(page.scanned_to.min(to));
                if page.entries.is_empty() && page.scanned_to <= after {
                    entry.inbox_seq = to;
                }
                ShardCounters::add(&shard.counters().deliveries, delivered);
            }
        })
        .detach();
    }

    /// Whether `user` (who lives here) has a terminal online on this shard: taken on (its
    /// `welcome` is queued with its registration, in one step) and not closing. A terminal
    /// still being taken on (between its upgrade and its `welcome`, `UserEntry::pending`) is
    /// not: it may never be welcomed, and nothing is pushed to it.
    fn online_here(&self, user: &str) -> bool {
        self.users
            .borrow()
            .get(user)
            .is_some_and(|e| e.sessions.iter().any(|k| self.session(*k).is_some_and(|s| s.close_reason().is_none())))
    }

    /// `message.unreached` for a message to a user without a terminal online here (see
    /// `online_here`) when it is committed; in cluster mode only if no other node holds one
    /// either. Made then, once per message: a terminal welcomed a moment later still gets the
    /// message by `sync` (one push too many, never one too few).
    fn emit_unreached(self: &Rc<Self>, id: u64, user: Arc<str>) {
        let data = serde_json::json!({ "id": id.to_string(), "user": &*user });
        match self.node.cluster().cloned() {
            None => self.emit("message.unreached", data),
            Some(cluster) => {
                let shard = self.clone();
                glommio::spawn_local(async move {
                    if cluster.presence_elsewhere(&user).await.is_empty() {
                        shard.emit("message.unreached", data);
                    }
                })
                .detach();
            }
        }
    }

    /// What another node asks of this shard's terminals.
    fn on_cluster_event(self: &Rc<Self>, e: ClusterEvent) {
        match e {
            ClusterEvent::UserFrame { user, frame } => {
                let mut frames = frame_set(&frame);
                for s in self.sessions_of(&user) {
                    self.push(&s, frames.get(s.wire));
                }
            }
            ClusterEvent::Kick { user, device, reason, before_ms } => {
                self.kick_local(&user, device.as_deref(), &reason, before_ms);
            }
            ClusterEvent::Broadcast(frame) => {
                self.broadcast_local(&frame);
            }
            ClusterEvent::Membership { group, users, joined } => {
                self.membership_local(&group, &users, joined);
                if joined {
                    // The bus reader made this shard want the group until now (`expect_join`).
                    let has_members = self.group_index.borrow().contains_key(&group);
                    let joined_at = self.commits.groups.join_handled(&group, self.id, has_members);
                    // The group's first members here: pushes start after their join (what the
                    // bus brings late, or brought before the join reached it, is filled from
                    // the store in seq order), not at whichever message comes first.
                    if let Some(at) = joined_at.filter(|_| has_members) {
                        self.group_heads.borrow_mut().entry(group.clone()).or_insert(at);
                    }
                }
            }
            ClusterEvent::GroupGone(group) => self.group_gone_local(&group),
            ClusterEvent::Resync => self.resync(),
            ClusterEvent::Present => self.present_again(),
        }
    }

    /// Cluster mode, after presence writes were lost: writes every terminal's presence here
    /// again and, once Redis has them, resyncs (what was routed while they were missing).
    fn present_again(self: &Rc<Self>) {
        let Some(cluster) = self.node.cluster().cloned() else { return };
        let written: Vec<_> = self
            .all_sessions()
            .iter()
            .map(|s| cluster.online(&s.user, &s.device, s.platform.as_str(), s.since_ms))
            .collect();
        let shard = self.clone();
        glommio::spawn_local(async move {
            for w in written {
                let _ = w.await;
            }
            shard.resync();
        })
        .detach();
    }

    /// Cluster mode, after bus entries may have been lost: reads the heads of every user with
    /// terminals here, one user after the other, and pushes what they were not pushed: their
    /// inbox (the same fill as for a gap) and each of their groups this shard delivers (once
    /// per group). Without this they would get it only with the next message or `sync`.
    /// Shard 0 also reads the token revocations again (merged: never lowered).
    fn resync(self: &Rc<Self>) {
        let users: Vec<Arc<str>> = self
            .users
            .borrow()
            .iter()
            .filter(|(_, e)| e.heads_known && !e.sessions.is_empty())
            .map(|(u, _)| u.clone())
            .collect();
        debug!(shard = self.id, users = users.len(), "cluster: checking inboxes and groups against the store");
        let shard = self.clone();
        glommio::spawn_local(async move {
            // Revocations other nodes published may have been among what was lost.
            if shard.id == 0 {
                match shard.store.call(Op::Revocations).await.and_then(Reply::revocations) {
                    Ok(list) => shard.node.revocations.merge(list),
                    Err(e) => warn!(shard = shard.id, error = %e, "cluster: cannot read token revocations to resync"),
                }
            }
            let mut groups_checked = std::collections::HashSet::new();
            for user in users {
                let heads = match shard.store.call(Op::Heads { user: user.to_string() }).await.and_then(Reply::heads) {
                    Ok(heads) => heads,
                    Err(e) => {
                        warn!(user = %user, shard = shard.id, error = %e, "cluster: cannot read heads to resync");
                        continue;
                    }
                };
                let start = shard.users.borrow_mut().get_mut(&user).is_some_and(|e| want_fill(e, heads.inbox_seq));
                if start {
                    shard.fill_inbox(user);
                }
                for (group, head) in heads.groups {
                    if groups_checked.insert(group.clone()) {
                        shard.catch_up_group(Arc::from(group), head).await;
                    }
                }
            }
        })
        .detach();
    }

    /// Remembers a pushed inbox message until the terminal acks it (for resends).
    pub(crate) fn track(&self, s: &Session, seq: u64, id: u64, frame: Bytes) {
        s.pushed_inbox.set(s.pushed_inbox.get().max(seq));
        let now = self.now_tick();
        let due = now + self.resend_ticks();
        let pushed_ms = self.epoch.elapsed().as_millis() as u64;
        if s.track_unacked(seq, id, frame, now, pushed_ms, self.config.limits.unacked_per_terminal_max) {
            self.resend_wheel.borrow_mut().schedule(s.key, due);
        }
    }

    /// Pushes again what is due on the sessions whose resend check came due, each after the
    /// larger of `limits.resend_timeout_ms` and its terminal's own ack timeout.
    pub(crate) fn resend_due(&self, now: u64, due: &mut Vec<SessionKey>) {
        self.resend_wheel.borrow_mut().advance(now, due);
        // A session may come due more than once at a tick (a check per tick of pushes, see
        // `Session::track_unacked`): looked at once, so it is scheduled again once.
        due.sort_unstable_by_key(|k| (k.slot, k.generation));
        due.dedup();
        let mut resent = 0;
        for key in due.drain(..) {
            let Some(s) = self.session(key) else { continue };
            let timeout = self.resend_ticks().max(ack_timeout_ticks(&s));
            if self.queue_too_full(&s, 0) {
                // What was pushed is not even written yet: sending it again would only add
                // to the backlog, and could overrun it (a reading terminal closed as a slow
                // consumer by our own resends). Looked at again a timeout later.
                self.resend_wheel.borrow_mut().schedule(key, now + timeout);
                continue;
            }
            let (frames, next) = s.due_resends(now, timeout, self.config.limits.resend_attempts_max);
            for f in frames {
                if self.queue_too_full(&s, f.len()) {
                    break; // the rest when their next attempt comes due
                }
                if self.push(&s, f) {
                    resent += 1;
                }
            }
            if let Some(next) = next {
                self.resend_wheel.borrow_mut().schedule(key, next);
            }
        }
        ShardCounters::add(&self.counters().resends, resent);
    }

    // ---- heads ---------------------------------------------------------------------------

    /// The user's inbox head and group heads, from the store the first time, then from what
    /// this shard has seen committed. Call with the user's entry present (see `conn::adopt`).
    pub async fn heads(self: &Rc<Self>, user: &Arc<str>) -> Result<Heads, EngineError> {
        let heads = self.store.call(Op::Heads { user: user.to_string() }).await?.heads()?;
        let mut users = self.users.borrow_mut();
        let mut fill = false;
        let inbox_seq = match users.get_mut(user) {
            // Cluster mode, terminals of the user already here: what the store has beyond
            // what they were pushed may still be on its way over the bus, so they get it from
            // the store (raising the position alone would make them skip it when it comes).
            // The new terminal's `welcome` gives the position (what is pushed after it).
            Some(entry) if entry.heads_known && !entry.sessions.is_empty() && self.node.cluster().is_some() => {
                fill = want_fill(entry, heads.inbox_seq);
                heads.inbox_seq.max(entry.inbox_seq)
            }
            Some(entry) => {
                entry.inbox_seq = entry.inbox_seq.max(heads.inbox_seq);
                entry.heads_known = true;
                entry.inbox_seq
            }
            None => heads.inbox_seq,
        };
        drop(users);
        if fill {
            self.fill_inbox(user.clone());
        }
        Ok(Heads { inbox_seq, groups: heads.groups })
    }

    // ---- terminal frames -----------------------------------------------------------------

    /// Answers a terminal's frame of type `of` with an `error` (`reference`: a `send`'s `cid`).
    pub(crate) fn frame_error(&self, s: &Session, e: &ApiError, of: FrameType, reference: Option<String>) {
        let frame = ServerFrame::Error { code: e.code, message: e.message.clone(), reference, of: Some(of) };
        self.push(s, encode_for(&frame, s.wire));
    }

    /// A cumulative delivery ack: forgets what it covers, keeps the position durable.
    pub(crate) fn on_ack(self: &Rc<Self>, s: &Rc<Session>, seq: u64, group: Option<String>) {
        ShardCounters::add(&self.counters().acks, 1);
        if let Some(g) = &group {
            // Held until the next save (bounded per session), so it must be a real group id.
            if let Err(e) = ether_proto::ids::check_id("group", g) {
                return self.reject_frame(s, e.code, e.message, Some(FrameType::Ack), None);
            }
            // Only a group this terminal is in: an ack of any other would store a position
            // for it (a store write per ack, and its head told back in the next `welcome`).
            if !s.groups.borrow().iter().any(|mine| *mine.group == **g) {
                let e = ApiError::new(ErrorCode::Forbidden, format!("ack: not a member of group {g}"));
                return self.frame_error(s, &e, FrameType::Ack, None);
            }
        }
        if group.is_none() {
            // An ack at or below the position still forgets what it covers (a `sync` from an
            // older position pushed those seqs again); only a moved position is saved.
            let moved = seq > s.acked_inbox.get();
            if !moved && !s.tracks_inbox_up_to(seq) {
                return;
            }
            let now_ms = self.epoch.elapsed().as_millis() as u64;
            let events = self.events_enabled();
            let mut delivered = Vec::new();
            {
                let mut hist = self.ack_latency.borrow_mut();
                s.ack_inbox(seq, self.now_tick(), now_ms, |pushed_ms, id| {
                    hist.record(now_ms.saturating_sub(pushed_ms) as f64 / 1000.0);
                    if events {
                        delivered.push(id);
                    }
                });
            }
            if !delivered.is_empty() {
                let ts = unix_now_ms();
                let batch = delivered
                    .into_iter()
                    .map(|id| NewEvent {
                        kind: "message.delivered".into(),
                        data: serde_json::json!({ "id": id.to_string(), "user": &*s.user, "device": &*s.device })
                            .to_string(),
                        ts,
                    })
                    .collect();
                self.emit_all(batch);
            }
            if !moved {
                return;
            }
        }
        // Positions are saved once per tick per terminal (`save_ack_positions`), however many
        // acks it sent meanwhile.
        match group {
            None => s.inbox_dirty.set(true),
            Some(group) => {
                let now = self.now_tick();
                if let Some(c) = s.groups.borrow_mut().iter_mut().find(|c| *c.group == *group) {
                    c.ack(seq, now);
                }
                let mut pending = self.group_acks_pending.borrow_mut();
                let list = pending.entry(s.key).or_default();
                if let Some(entry) = list.iter_mut().find(|(g, _)| *g == group) {
                    entry.1 = entry.1.max(seq);
                } else if list.len() < self.config.limits.groups_per_user_max {
                    list.push((group, seq));
                } else {
                    // More distinct groups than a user can be in: not held, saved at once.
                    drop(pending);
                    return self.save_position(s, Some(group), seq);
                }
            }
        }
        if !s.ack_dirty.replace(true) {
            self.ack_dirty.borrow_mut().push(s.key);
        }
    }

    fn save_position(&self, s: &Session, group: Option<String>, seq: u64) {
        // The `message.delivered` events of the acks this position covers go first: a crash
        // that loses them loses the position too, so the messages come again and are acked
        // (and reported) again. (While writes are held after a failed one, the events wait
        // and the position goes ahead: a crash in that window can lose those events.)
        self.write_events();
        let op = Op::SetDelivered { user: s.user.to_string(), device: s.device.to_string(), group, seq };
        // Best effort: a position not saved only means a few messages come again on `sync`.
        if let Err(e) = self.store.submit(StoreCmd::new(op, |_| ())) {
            debug!(user = %s.user, device = %s.device, shard = self.id, error = %e, "delivery position not saved");
        }
    }

    /// Saves the ack positions that moved since the last tick (one store write per terminal
    /// and stream per tick, however many acks it sent).
    pub(crate) fn save_ack_positions(&self) {
        // Bounded per tick (`store.position_saves_per_tick_max`), oldest first: a burst of
        // position writes would queue every message behind it on the storage thread.
        let keys: Vec<_> = {
            let mut dirty = self.ack_dirty.borrow_mut();
            let n = dirty.len().min(self.config.store_position_saves_per_tick_max);
            dirty.drain(..n).collect()
        };
        for key in keys {
            if let Some(s) = self.session(key) {
                self.flush_ack_position(&s);
            }
        }
    }

    /// Saves one terminal's ack positions that moved, inbox and groups (also when it closes).
    pub(crate) fn flush_ack_position(&self, s: &Session) {
        if s.ack_dirty.replace(false) {
            if s.inbox_dirty.replace(false) {
                self.save_position(s, None, s.acked_inbox.get());
            }
            let groups = self.group_acks_pending.borrow_mut().remove(&s.key);
            for (group, seq) in groups.into_iter().flatten() {
                self.save_position(s, Some(group), seq);
            }
        }
    }

    /// `sync`: everything after the given positions, in order, one bounded page, then `synced`.
    pub(crate) fn on_sync(
        self: &Rc<Self>,
        s: &Rc<Session>,
        inbox_after: u64,
        groups: BTreeMap<String, u64>,
        limit: Option<u32>,
    ) {
        // One at a time: each holds a page (up to `sync_page_max` messages) until the terminal
        // has read it, so unbounded concurrent syncs of a terminal that does not read would
        // hold unbounded memory. A well-behaved terminal waits for `synced` anyway.
        if s.sync_in_flight.replace(true) {
            let e = ApiError::new(ErrorCode::RateLimited, "a sync is being answered: wait for its synced");
            return self.frame_error(s, &e, FrameType::Sync, None);
        }
        let page_max = self.config.limits.sync_page_max;
        let limit = limit.map_or(page_max, |l| (l as usize).clamp(1, page_max));
        let shard = self.clone();
        let s = s.clone();
        glommio::spawn_local(async move {
            /// Clears `sync_in_flight` however the answer ends.
            struct InFlight<'a>(&'a Session);
            impl Drop for InFlight<'_> {
                fn drop(&mut self) {
                    self.0.sync_in_flight.set(false);
                }
            }
            let _in_flight = InFlight(&s);
            let op = Op::Sync { user: s.user.to_string(), inbox_after, groups, limit };
            let synced = match shard.store.call(op).await.and_then(Reply::synced) {
                Ok(r) => r,
                Err(e) => return shard.frame_error(&s, &EngineError::Store(e).to_api(), FrameType::Sync, None),
            };
            for e in &synced.entries {
                let frame = message_of(e).encode_frame_for(s.wire, &e.chat, e.seq);
                if !shard.push_paced(&s, frame.clone()).await {
                    return;
                }
                if e.chat.starts_with("u:") {
                    shard.track(&s, e.seq, e.id, frame);
                }
            }
            // The user's inbox position on this shard is what its terminals here were pushed
            // live: a sync page (one terminal's, read from the store) does not move it. In
            // cluster mode a head raised to the store's would make the other terminals skip
            // what the bus has not brought yet (`deliver_committed` drops seqs at or below it).
            let done = ServerFrame::Synced {
                inbox_seq: synced.heads.inbox_seq,
                groups: synced.heads.groups,
                more: synced.more,
            };
            shard.push(&s, encode_for(&done, s.wire));
        })
        .detach();
    }

    /// Pushes a frame of a long run (a `sync` page) at the pace the terminal reads: while its
    /// outbound queue holds more than half of `limits.outbound_queue_bytes_max`, waits for it
    /// to drain (at most `PACED_WAIT_MAX`, then pushes anyway). A page of 500 big messages
    /// would otherwise overrun the queue at once and close a healthy terminal as a slow
    /// consumer, again on every reconnect. False when the terminal is gone or closing.
    pub(crate) async fn push_paced(&self, s: &Session, frame: Bytes) -> bool {
        let deadline = Instant::now() + PACED_WAIT_MAX;
        while self.queue_too_full(s, frame.len()) && Instant::now() < deadline {
            if s.close_reason().is_some() {
                return false;
            }
            glommio::timer::sleep(PACED_POLL).await;
        }
        self.push(s, frame)
    }

    /// [`Self::push_paced`]'s wait for every terminal of `user` on this shard, before a frame
    /// of about `len` bytes is pushed to all of them.
    async fn wait_for_room(&self, user: &Arc<str>, len: usize) {
        let deadline = Instant::now() + PACED_WAIT_MAX;
        while Instant::now() < deadline
            && self.sessions_of(user).iter().any(|s| s.close_reason().is_none() && self.queue_too_full(s, len))
        {
            glommio::timer::sleep(PACED_POLL).await;
        }
    }

    /// Whether a paced push of `len` bytes waits: the queue holds something and would then
    /// hold more than half of `limits.outbound_queue_bytes_max`.
    fn queue_too_full(&self, s: &Session, len: usize) -> bool {
        let queued = s.queued_bytes();
        queued > 0 && queued + len > self.config.limits.outbound_queue_bytes_max / 2
    }

    /// `read`: moves the user's read position in a chat; the peer's terminals get `receipt`,
    /// the user's other terminals `read_sync`.
    pub(crate) fn on_read(self: &Rc<Self>, s: &Rc<Session>, chat: String, seq: u64) {
        let Some(parsed) = Chat::parse(&chat) else {
            let e = ApiError::new(ErrorCode::InvalidBody, format!("chat: {chat:?} is not u:<user> or g:<group>"));
            return self.reject_frame(s, e.code, e.message, Some(FrameType::Read), None);
        };
        let shard = self.clone();
        let s = s.clone();
        glommio::spawn_local(async move {
            let emit_event = shard.events_enabled();
            if emit_event {
                // The store writes this read's event itself: deliveries batched before it go
                // first, so the outbox keeps this shard's order.
                shard.write_events();
            }
            let op = Op::SetRead { user: s.user.to_string(), chat: chat.clone(), seq, emit_event };
            let moved = match shard.store.call(op).await.and_then(Reply::read) {
                Ok(m) => m,
                Err(e) => return shard.frame_error(&s, &EngineError::Store(e).to_api(), FrameType::Read, None),
            };
            if !moved.moved {
                return;
            }
            let sync = ServerFrame::ReadSync { chat: moved.chat.clone(), seq: moved.seq };
            let mut frames = frame_set(&sync);
            for other in shard.sessions_of(&s.user) {
                if other.key != s.key {
                    shard.push(&other, frames.get(other.wire));
                }
            }
            let cluster = shard.node.cluster();
            if let Some(cluster) = cluster {
                cluster.publish(BusEvent::UserFrame { user: s.user.to_string(), frame: sync.clone() });
            }
            if let (Chat::User(peer), Some(up_to)) = (parsed, moved.up_to) {
                let receipt = ServerFrame::Receipt {
                    chat: format!("u:{}", s.user),
                    by: s.user.to_string(),
                    up_to: up_to.to_string(),
                };
                if let Some(cluster) = cluster {
                    cluster.publish(BusEvent::UserFrame { user: peer.clone(), frame: receipt.clone() });
                }
                let frame = Arc::new(receipt);
                let peer: Arc<str> = Arc::from(peer);
                let home = home_shard(&peer, shard.shards);
                if let Err(e) = shard.route(home, ShardMsg::UserFrame { user: peer, frame }).await {
                    debug!(shard = shard.id, error = %e, "receipt not delivered");
                }
            }
        })
        .detach();
    }

    /// Appends one event to the durable outbox (through the shard's batch: see `write_events`).
    pub(crate) fn emit(&self, kind: &str, data: serde_json::Value) {
        self.emit_all(vec![NewEvent { kind: kind.to_owned(), data: data.to_string(), ts: unix_now_ms() }]);
    }

    /// Adds events to the shard's batch for the outbox (`event_batch`): written by
    /// `event_flush_loop` after `events.batch_wait_ms`, at once when the batch is full.
    pub(crate) fn emit_all(&self, events: Vec<NewEvent>) {
        if self.events_out.add(events) == AddOutcome::WriteNow {
            self.write_events();
        }
    }

    /// The shard's last outbox write, as it stops: waited for, since a failed write can no
    /// longer come back to the shard's queue (its commit loop is gone): what it could not write
    /// is said, not dropped in silence.
    pub(crate) async fn write_events_at_stop(&self) {
        while !self.events_out.is_empty() {
            let events: Arc<[NewEvent]> = self.events_out.take().into();
            let n = events.len();
            if let Err(e) = self.store.call(Op::OutboxAppend { events }).await {
                let lost = n + self.events_out.len();
                tracing::error!(shard = self.id, events = lost, error = %e, "stopping: events not written to the outbox, lost");
                return;
            }
        }
    }

    /// Submits the pending events in outbox writes of at most `EVENTS_PER_WRITE_MAX`, oldest
    /// first, unless writes are held after a failure (the flush task writes them when the hold
    /// ends). A write the store cannot take (its queue full) or fails (a full disk, Redis away)
    /// brings the events back to this shard (`requeue_events`): nothing is dropped short of
    /// `limits.events_pending_max`.
    pub(crate) fn write_events(&self) {
        while !self.events_out.is_empty() && self.events_out.holding(Instant::now()).is_none() {
            self.write_event_batch();
        }
    }

    /// One outbox write of the oldest pending events (at most `EVENTS_PER_WRITE_MAX`).
    fn write_event_batch(&self) {
        let events: Arc<[NewEvent]> = self.events_out.take().into();
        if events.is_empty() {
            return;
        }
        let (commits, home, failed) = (self.commits.clone(), self.id, events.clone());
        let cmd = StoreCmd::new(Op::OutboxAppend { events: events.clone() }, move |r| match r {
            Ok(_) => {}
            Err(StoreError::Closed) => {
                tracing::warn!(shard = home, events = failed.len(), "store closed: events not written to the outbox")
            }
            Err(_) => commits.push(home, Committed::EventsRetry(failed)),
        });
        match self.store.submit(cmd) {
            Ok(()) => {}
            Err(StoreError::Closed) => {
                tracing::warn!(shard = self.id, events = events.len(), "store closed: events not written to the outbox")
            }
            Err(_) => self.requeue_events(&events),
        }
    }

    /// Events a write could not store: pending again, ahead of newer ones, written after a
    /// backoff.
    pub(crate) fn requeue_events(&self, events: &[NewEvent]) {
        let dropped = self.events_out.requeue(events, Instant::now());
        let retry_in = self.events_out.holding(Instant::now()).unwrap_or_default();
        tracing::warn!(
            shard = self.id,
            events = events.len(),
            retry_in_ms = retry_in.as_millis() as u64,
            "outbox write failed: events kept and tried again"
        );
        if dropped > 0 {
            tracing::error!(
                shard = self.id,
                dropped,
                max = self.config.limits.events_pending_max,
                "events dropped: more pending than limits.events_pending_max while the store could not take them"
            );
        }
    }

    /// Writes the event batch `events.batch_wait_ms` after its first event (and, after a
    /// failed write, once the backoff is over). Runs as long as the shard's executor; what is
    /// pending when the shard stops is written by `run_shard`.
    pub async fn event_flush_loop(self: Rc<Self>) {
        let Some(signal) = self.events_out_signal.borrow_mut().take() else { return };
        while signal.recv().await.is_some() {
            glommio::timer::sleep(self.config.events.batch_wait).await;
            while let Some(wait) = self.events_out.holding(Instant::now()) {
                glommio::timer::sleep(wait).await;
            }
            self.write_events();
        }
    }

    /// Whether events are made at all (someone consumes them: the webhook, or in cluster mode
    /// the `ether:events` stream).
    pub fn events_enabled(&self) -> bool {
        self.config.events.webhook.is_some() || self.config.cluster.redis_url.is_some()
    }
}

/// Cluster mode: asks for a fill of the user's inbox up to the store's `head` if that is past
/// what the user's terminals here were pushed (or are being filled to). True when the caller
/// must start the fill (none is under way yet).
fn want_fill(entry: &mut UserEntry, head: u64) -> bool {
    if entry.sessions.is_empty() || head <= entry.inbox_seq.max(entry.fill_to) {
        return false;
    }
    let start = entry.fill_to == 0;
    entry.fill_to = head;
    start
}
