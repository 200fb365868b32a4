//! Groups on a shard: the index group → this shard's online member sessions (kept right on
//! connect, disconnect and membership change), the fan-out of committed group messages (one
//! frame for every member, loops that yield), and group sends made durable through the store.
//! Membership itself lives in the store; this module only mirrors it for online sessions,
//! applying this node's changes as the storage thread queues them, in commit order.
//! In cluster mode it also puts each group's messages in seq order per shard, whatever order
//! the bus brings them in, filling gaps from the store: one task per shard and group at a time
//! (`GroupWork`), so no message is pushed twice or out of order and the head never goes back.
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use ether_proto::Kind;
use ether_store::op::{GroupAppended, NewGroupMessage, Op, Page, Reply};
use ether_store::{StoreCmd, StoreError};
use futures_channel::oneshot;
use serde_json::value::RawValue;
use tracing::debug;

use crate::cluster::{BusEvent, BusMessage};
use crate::error::EngineError;
use crate::mesh::ShardMsg;
use crate::message::{Message, Wire};
use crate::session::{GroupCursor, Session, SessionKey};
use crate::shard::{home_shard, ByName, GroupIndex, Shard};
use crate::stats::ShardCounters;
use crate::storage::{Answer, Committed, GroupDelivery, GroupPosted};

/// A membership change a store operation made, as its completion announces it.
#[derive(Debug)]
pub(crate) enum MembershipChange {
    /// `users` joined (`true`) or left `group`.
    Members { group: String, users: Vec<String>, joined: bool },
    /// `group` was dissolved.
    Gone { group: String },
}

/// Messages of one group a `group.unreached` computation covers: how many, the latest one's
/// `seq` and `id`, and their senders (left out of the event).
#[derive(Debug)]
pub(crate) struct UnreachedRun {
    messages: u64,
    seq: u64,
    id: u64,
    senders: Vec<Box<str>>,
}

impl UnreachedRun {
    fn new(seq: u64, id: u64) -> Self {
        UnreachedRun { messages: 0, seq, id, senders: Vec::new() }
    }

    fn add(&mut self, seq: u64, id: u64, from: Box<str>) {
        self.messages += 1;
        if seq >= self.seq {
            self.seq = seq;
            self.id = id;
        }
        if !self.senders.contains(&from) {
            self.senders.push(from);
        }
    }
}

/// Members read per store call for a `group.unreached` event.
const UNREACHED_MEMBERS_PAGE: usize = 1000;

/// Pushes made in a fan-out loop before it lets the shard's other tasks run.
const FANOUT_YIELD_EVERY: usize = 256;

/// A group message as accepted from the API or a member's terminal, before it gets its id.
#[derive(Debug)]
pub struct NewGroupPost {
    pub from: Box<str>,
    /// Sent by the business as the system: no membership needed.
    pub system: bool,
    pub group: Box<str>,
    pub kind: Kind,
    pub body: Box<RawValue>,
    pub cid: Option<Box<str>>,
}

/// A group message accepted (durable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupSent {
    pub id: u64,
    pub seq: u64,
    pub ts: u64,
}

impl Shard {
    /// Puts a new session into the index of each of its user's groups; its live pushes of
    /// each begin after `head` (its `welcome` head: what came before it syncs).
    pub(crate) fn join_groups<'a>(&self, s: &Session, groups: impl Iterator<Item = (&'a String, &'a u64)>) {
        let mut index = self.group_index.borrow_mut();
        let mut mine = s.groups.borrow_mut();
        let cluster = self.node.cluster().is_some();
        let now = self.now_tick();
        for (g, &head) in groups {
            let g: Arc<str> = Arc::from(g.as_str());
            if cluster {
                // The first member here: the shard pushes what comes after the store's head
                // when it came. With members here already, the shard goes on from what it
                // pushed them: the store's head may be ahead of the bus (a message in flight,
                // or lost and later filled from the store as a gap), and raising the shard's
                // head to it would make them skip those messages. The new terminal may then
                // be pushed some messages its `welcome` head counts; terminals dedupe by id.
                self.group_heads.borrow_mut().entry(g.clone()).or_insert(head);
            }
            self.index_join(&mut index, &g, s.key);
            mine.push(GroupCursor::new(g, head, now));
        }
    }

    /// Pushes again, to each terminal whose acks of a group stood still for the resend
    /// timeout, the group messages it was pushed live and did not acknowledge, read from the
    /// store (a page of at most `limits.sync_page_max`, at the pace the terminal reads), as
    /// inbox messages are (`limits.resend_timeout_ms`, then twice as long each time,
    /// `limits.resend_attempts_max` times per ack position; the terminal's own ack time when
    /// longer). One look per tick over the shard's sessions; nothing per message.
    pub(crate) fn resend_groups_due(self: &Rc<Self>, now: u64) {
        let attempts_max = self.config.limits.resend_attempts_max;
        if attempts_max == 0 || self.group_pushed.borrow().is_empty() {
            return;
        }
        let mut due: Vec<(Rc<Session>, Arc<str>, u64, u64)> = Vec::new();
        {
            let pushed = self.group_pushed.borrow();
            for (_, s) in self.sessions.borrow().iter() {
                if s.close_reason().is_some() {
                    continue;
                }
                let mut mine = s.groups.borrow_mut();
                if mine.is_empty() {
                    continue;
                }
                let timeout = self.resend_ticks().max(crate::delivery::ack_timeout_ticks(s));
                for c in mine.iter_mut() {
                    let Some(&(first, head)) = pushed.get(&c.group) else { continue };
                    if c.acked == GroupCursor::FROM_NEXT_PUSH {
                        // Added while online before this shard fanned out anything of the
                        // group: its live pushes began with the first.
                        c.acked = first.saturating_sub(1);
                    }
                    if c.resend_due(head, now, timeout, attempts_max) {
                        due.push((s.clone(), c.group.clone(), c.acked, head));
                    }
                }
            }
        }
        for (s, group, after, head) in due {
            self.resend_group(s, group, after, head);
        }
    }

    /// One page of `group`'s log from the store: the positions after `after`, as far as `to`
    /// (at most `limits.sync_page_max` of them).
    async fn read_group_page(&self, group: &str, after: u64, to: u64) -> Result<Page, StoreError> {
        let limit =
            usize::try_from(to.saturating_sub(after)).unwrap_or(usize::MAX).min(self.config.limits.sync_page_max);
        self.store.call(Op::ReadGroup { group: group.to_owned(), after_seq: after, limit }).await.and_then(Reply::page)
    }

    /// Reads `(after, head]` of `group` from the store and pushes it to `s` again, paced.
    fn resend_group(self: &Rc<Self>, s: Rc<Session>, group: Arc<str>, after: u64, head: u64) {
        let shard = self.clone();
        glommio::spawn_local(async move {
            let page = match shard.read_group_page(&group, after, head).await {
                Ok(page) => page,
                Err(e) => {
                    // The terminal catches up with `sync` (it sees the gap in seqs).
                    debug!(group = %group, shard = shard.id, error = %e, "cannot read a group to resend");
                    return;
                }
            };
            let chat = format!("g:{group}");
            let mut resent = 0;
            for e in page.entries.iter().filter(|e| e.seq > after && e.seq <= head) {
                let frame = crate::storage::message_of(e).encode_frame_for(s.wire, &chat, e.seq);
                if !shard.push_paced(&s, frame).await {
                    break;
                }
                resent += 1;
            }
            ShardCounters::add(&shard.counters().resends, resent);
        })
        .detach();
    }

    /// Takes a closing session out of every group index it is in.
    pub(crate) fn leave_all_groups(&self, s: &Session) {
        let mut index = self.group_index.borrow_mut();
        for GroupCursor { group: g, .. } in s.groups.borrow_mut().drain(..) {
            self.index_leave(&mut index, &g, s.key);
        }
    }

    /// Puts a session into a group's fan-out index; the group's first member here makes the
    /// shard one its committed messages are queued to (`GroupShards`).
    fn index_join(&self, index: &mut GroupIndex, group: &Arc<str>, key: SessionKey) {
        match index.entry(group.clone()) {
            std::collections::hash_map::Entry::Occupied(mut keys) => keys.get_mut().push(key),
            std::collections::hash_map::Entry::Vacant(v) => {
                self.commits.groups.join(group, self.id);
                v.insert(vec![key]);
            }
        }
    }

    /// Takes a session out of a group's fan-out index; with the group's last member here gone,
    /// the shard forgets the group and its messages are no longer queued to it.
    fn index_leave(&self, index: &mut GroupIndex, group: &Arc<str>, key: SessionKey) {
        if let Some(keys) = index.get_mut(group) {
            keys.retain(|k| *k != key);
            if keys.is_empty() {
                index.remove(group);
                self.commits.groups.leave(group, self.id);
                self.forget_group_head(group);
            }
        }
    }

    /// Cluster mode: the group has no member here any more, so this shard stops following its
    /// seqs; the head it knew would go stale and make the next member's first message look
    /// like a gap, pushing old messages live. A member who comes brings the head again (its
    /// `welcome`), one added while online starts at the next message.
    fn forget_group_head(&self, group: &Arc<str>) {
        self.group_heads.borrow_mut().remove(group);
        self.group_pushed.borrow_mut().remove(group);
    }

    /// Mirrors a membership change for the given users' sessions on this shard.
    pub(crate) fn membership_local(&self, group: &Arc<str>, users: &[Arc<str>], joined: bool) {
        for user in users {
            if let Some(entry) = self.users.borrow_mut().get_mut(user) {
                if entry.pending > 0 {
                    // A terminal being taken on may have read its heads before this change:
                    // it reads them again (`conn::adopt`).
                    entry.membership_changes = entry.membership_changes.wrapping_add(1);
                }
            }
            for s in self.sessions_of(user) {
                let mut index = self.group_index.borrow_mut();
                let mut mine = s.groups.borrow_mut();
                let present = mine.iter().any(|c| c.group == *group);
                if joined && !present {
                    self.index_join(&mut index, group, s.key);
                    // Live pushes begin with the next message this shard fans out.
                    let pushed = self.group_pushed.borrow().get(group).map(|&(_, last)| last);
                    let acked = pushed.unwrap_or(GroupCursor::FROM_NEXT_PUSH);
                    mine.push(GroupCursor::new(group.clone(), acked, self.now_tick()));
                } else if !joined && present {
                    mine.retain(|c| c.group != *group);
                    self.index_leave(&mut index, group, s.key);
                }
            }
        }
    }

    /// Forgets a dissolved group on this shard.
    pub(crate) fn group_gone_local(&self, group: &str) {
        // A terminal being taken on may have read its heads (this group among them) before
        // the dissolution and join the group's fan-out after it, staying in it (a group made
        // later under the same id would reach it): its user's terminals read their heads
        // again (`conn::adopt`), as for a membership change. Its members are not known here,
        // so every user with a terminal being taken on (dissolutions are rare).
        for entry in self.users.borrow_mut().values_mut().filter(|e| e.pending > 0) {
            entry.membership_changes = entry.membership_changes.wrapping_add(1);
        }
        self.group_heads.borrow_mut().remove(group);
        self.group_pushed.borrow_mut().remove(group);
        let keys = self.group_index.borrow_mut().remove(group).unwrap_or_default();
        if !keys.is_empty() {
            self.commits.groups.leave(group, self.id);
        }
        for key in keys {
            if let Some(s) = self.session(key) {
                s.groups.borrow_mut().retain(|c| &*c.group != group);
            }
        }
    }

    /// Submits a membership operation (create, add, remove, dissolve) and returns the store's
    /// result. When it commits, its completion (on the storage thread, in commit order) queues
    /// what `change` makes of the reply to the home shards of the users concerned (every shard
    /// for a dissolution), and in cluster mode publishes it on the bus, before the answer.
    /// So each shard applies this node's membership changes in the order the store committed
    /// them, however the requests were spread over the shards; and between the group messages
    /// committed before and after each: a message posted after the answer reaches a member
    /// just added (its home shard wants the group from the commit on, `push_membership`) and
    /// no longer one just removed.
    pub(crate) async fn change_membership(
        &self,
        op: Op,
        change: impl FnOnce(&Reply) -> Option<MembershipChange> + Send + 'static,
    ) -> Result<Reply, StoreError> {
        let commits = self.commits.clone();
        let cluster = self.node.cluster().cloned();
        let (tx, rx) = oneshot::channel();
        self.store.submit(StoreCmd::new(op, move |result| {
            if let Some(change) = result.as_ref().ok().and_then(change) {
                match change {
                    MembershipChange::Members { group, users, joined } => {
                        let shared: Arc<str> = Arc::from(group.as_str());
                        commits.push_membership(&shared, &users, joined);
                        if let Some(cluster) = &cluster {
                            cluster.publish(BusEvent::Membership { group, users, joined });
                        }
                    }
                    MembershipChange::Gone { group } => {
                        commits.push_group_gone(&Arc::from(group.as_str()));
                        if let Some(cluster) = &cluster {
                            cluster.publish(BusEvent::GroupGone { group });
                        }
                    }
                }
            }
            let _ = tx.send(result);
        }))?;
        rx.await.unwrap_or(Err(StoreError::Closed))
    }

    /// Applies a membership change this node's API committed (`Committed::Membership`) to the
    /// users' sessions here; a join settles the bit `push_membership` set (kept only while a
    /// member of the group is online here) and, in cluster mode, takes the join head the bus
    /// reader may have noted for a join queued at the same time (see the cluster arm).
    pub(crate) fn membership_committed(&self, group: &Arc<str>, users: &[Arc<str>], joined: bool) {
        self.membership_local(group, users, joined);
        if joined {
            let has_members = self.group_index.borrow().contains_key(group);
            let joined_at = self.commits.groups.join_handled(group, self.id, has_members);
            if let Some(at) = joined_at.filter(|_| has_members) {
                self.group_heads.borrow_mut().entry(group.clone()).or_insert(at);
            }
        }
    }

    /// The commit loop's group messages so far, fanned out and cleared (before a membership
    /// change it applies, so each shard keeps the commit order between the two).
    pub(crate) async fn fan_out_committed(self: &Rc<Self>, groups: &mut Vec<GroupDelivery>) -> u64 {
        if groups.is_empty() {
            return 0;
        }
        ShardCounters::add(&self.counters().group_fanouts, groups.len() as u64);
        let delivered = self.deliver_groups(groups).await;
        groups.clear();
        delivered
    }

    /// Writes committed messages of one group (in seq order) to this shard's online members:
    /// the same bytes for all, every message of the run queued to a member before the next
    /// member, so each terminal's writer sends the whole run in one gathered `sendmsg`;
    /// yields every few hundred members so one big group does not stall the shard.
    pub(crate) async fn deliver_group_run(&self, run: &[GroupDelivery]) -> u64 {
        let Some(first) = run.first() else { return 0 };
        debug_assert!(run.iter().all(|g| g.group == first.group), "a run is one group's messages");
        debug_assert!(run.windows(2).all(|w| w[0].seq < w[1].seq), "a run is in group seq order");
        if !self.group_index.borrow().contains_key(&first.group) {
            return 0;
        }
        if let Some(last) = run.last() {
            // What the members are pushed up to: what a resend covers (`resend_groups_due`).
            let mut pushed = self.group_pushed.borrow_mut();
            let (_, p) = pushed.entry(first.group.clone()).or_insert((first.seq, 0));
            *p = (*p).max(last.seq);
        }
        let now_ms = crate::message::unix_now_ms();
        {
            let mut latency = self.push_latency.borrow_mut();
            for g in run {
                latency.record(now_ms.saturating_sub(g.ts) as f64 / 1000.0);
            }
        }
        let mut delivered = 0;
        let mut i = 0;
        // The run's frames for members on `ether.v1.proto`, made (and the list allocated) the
        // first time one needs them: a group of JSON members costs nothing more.
        let mut proto_frames: Vec<bytes::Bytes> = Vec::new();
        // Walk the member list by position (no copy of it per message); the index may change
        // while the loop yields, which at worst skips or repeats a member that joined or left
        // during this very run.
        loop {
            let key = match self.group_index.borrow().get(&first.group).and_then(|keys| keys.get(i)) {
                Some(k) => *k,
                None => break,
            };
            if let Some(s) = self.session(key) {
                if s.wire == Wire::Proto && proto_frames.is_empty() {
                    let chat = format!("g:{}", first.group);
                    proto_frames = run.iter().map(|g| g.msg.encode_frame_for(Wire::Proto, &chat, g.seq)).collect();
                }
                for (j, g) in run.iter().enumerate() {
                    let frame = match s.wire {
                        Wire::Json => g.frame.clone(),
                        Wire::Proto => proto_frames[j].clone(),
                    };
                    if !self.push(&s, frame) {
                        break; // closing: the rest comes back by `sync`
                    }
                    delivered += 1;
                }
            }
            i += 1;
            if i % FANOUT_YIELD_EVERY == 0 {
                glommio::yield_if_needed().await;
            }
        }
        delivered
    }

    /// Writes a batch of committed group messages: one run per group (each in seq order, as
    /// committed), so a member of a busy group gets everything of the batch in one write.
    pub(crate) async fn deliver_groups(self: &Rc<Self>, batch: &mut [GroupDelivery]) -> u64 {
        for g in batch.iter() {
            self.note_group_seq(&g.group, g.seq);
        }
        let mut delivered = 0;
        if self.node.cluster().is_some() {
            // Several nodes commit to a group: order by seq and fill gaps from the store.
            batch.sort_by(|a, b| a.group.cmp(&b.group).then(a.seq.cmp(&b.seq)));
            for run in batch.chunk_by(|a, b| a.group == b.group) {
                // No member here: nothing to order or read (its head is learnt when one comes).
                if !self.group_index.borrow().contains_key(&run[0].group) {
                    continue;
                }
                delivered += push_group_run(&**self, run).await;
            }
            return delivered;
        }
        // Stable: each group's messages stay in commit (seq) order.
        batch.sort_by(|a, b| a.group.cmp(&b.group));
        for run in batch.chunk_by(|a, b| a.group == b.group) {
            delivered += self.deliver_group_run(run).await;
        }
        delivered
    }

    /// Cluster mode, `resync`: the store's head of `group` is `head`; pushes to this shard's
    /// members what it has not pushed up to it, page by page (see [`catch_up_group_to`]). What
    /// the bus brought for the group meanwhile is pushed after it by a task of its own, so the
    /// resync goes on with its next group.
    pub(crate) async fn catch_up_group(self: &Rc<Self>, group: Arc<str>, head: u64) {
        let (delivered, left) = catch_up_group_to(&**self, &group, head).await;
        ShardCounters::add(&self.counters().deliveries, delivered);
        if let Some(left) = left {
            let shard = self.clone();
            glommio::spawn_local(async move {
                let delivered = drain_group_work(&*shard, &group, left).await;
                ShardCounters::add(&shard.counters().deliveries, delivered);
            })
            .detach();
        }
    }

    /// Submits a group message; when it commits, its frame is encoded once (on the storage
    /// thread) and queued for the shards with members of the group online (or taking on a
    /// terminal: `GroupShards`), then `answer` gets the stored result.
    pub(crate) fn submit_group(&self, post: NewGroupPost, answer: Answer<GroupAppended>) -> Result<(), EngineError> {
        let NewGroupPost { from, system, group, kind, body, cid } = post;
        if self.node.stopping() || self.node.draining() {
            return Err(EngineError::ShuttingDown);
        }
        let (id, ts) = self
            .ids
            .next()
            .ok_or_else(|| Shard::api_error(ether_proto::ErrorCode::Unavailable, crate::cluster::NO_ID_LEASE))?;
        let op = Op::AppendGroup(NewGroupMessage {
            id,
            ts,
            from: from.to_string(),
            system,
            group: group.to_string(),
            kind,
            body: body.get().to_owned(),
            cid: cid.as_deref().map(str::to_owned),
        });
        let msg = Arc::new(Message { id, ts, from, kind, body, cid });
        let group: Arc<str> = Arc::from(&*group);
        let commits = self.commits.clone();
        let shards = self.shards;
        let cluster = self.node.cluster().cloned();
        let tell_unreached = self.events_enabled() && self.config.events.group_unreached_members_max > 0;
        // One shard per group tells it (it coalesces the group's busy spells).
        let teller = home_shard(&group, shards);
        self.store.submit(StoreCmd::new(op, move |result| {
            let result = result.and_then(Reply::group_appended);
            if let Ok(a) = &result {
                if !a.duplicate && tell_unreached {
                    let posted = GroupPosted { group: group.clone(), id: a.id, seq: a.seq, from: msg.from.clone() };
                    commits.push(teller, Committed::GroupPosted(posted));
                }
                if !a.duplicate {
                    if let Some(cluster) = &cluster {
                        cluster.publish(BusEvent::Group {
                            group: group.to_string(),
                            seq: a.seq,
                            msg: BusMessage::of(&msg),
                        });
                    }
                    let frame = msg.encode_frame(&format!("g:{group}"), a.seq);
                    commits.push_group(&group, || GroupDelivery {
                        group: group.clone(),
                        seq: a.seq,
                        id: a.id,
                        ts: a.ts,
                        frame: frame.clone(),
                        msg: msg.clone(),
                    });
                }
            }
            answer.give(&commits, result);
        }))?;
        Ok(())
    }

    /// `group.unreached`: the members of a group (whose home shard this is) that the node's
    /// latest messages to it reached no terminal of: none online (here, on another shard, or in cluster mode on another node), for
    /// the business's mobile push. Only for groups of at most
    /// `events.group_unreached_members_max` members; the senders are left out. Read after the
    /// messages were stored: a member connecting meanwhile may be named and still get them (a
    /// push too many, never one too few for those offline throughout).
    ///
    /// One computation per group at a time: messages stored while one runs are covered by
    /// the next, together (`messages` of them, the latest `id`/`seq`), so a busy group costs a
    /// member list and a presence check per computation, not per message (one event per
    /// message when they come slower than a computation takes).
    pub(crate) fn emit_group_unreached(self: &Rc<Self>, posted: GroupPosted) {
        let GroupPosted { group, id, seq, from } = posted;
        {
            let mut pending = self.unreached_pending.borrow_mut();
            if let Some(waiting) = pending.get_mut(&group) {
                // A computation runs for this group: the next one covers this message too.
                let w = waiting.get_or_insert_with(|| UnreachedRun::new(seq, id));
                w.add(seq, id, from);
                return;
            }
            pending.insert(group.clone(), None);
        }
        let mut run = UnreachedRun::new(seq, id);
        run.add(seq, id, from);
        let shard = self.clone();
        glommio::spawn_local(async move {
            loop {
                shard.group_unreached_once(&group, &run).await;
                let next = {
                    let mut pending = shard.unreached_pending.borrow_mut();
                    match pending.get_mut(&group).and_then(Option::take) {
                        Some(next) => Some(next),
                        None => {
                            pending.remove(&group);
                            None
                        }
                    }
                };
                match next {
                    Some(next) => run = next,
                    None => break,
                }
            }
        })
        .detach();
    }

    /// One `group.unreached` for the messages of `run` (see [`Self::emit_group_unreached`]).
    async fn group_unreached_once(self: &Rc<Self>, group: &Arc<str>, run: &UnreachedRun) {
        let max = self.config.events.group_unreached_members_max;
        // The count first (one small read): a large group's members are never listed.
        match self.store.call(Op::GetGroup { group: group.to_string() }).await {
            Ok(Reply::Group(info)) if info.member_count <= max as u64 + 1 => {}
            Ok(_) | Err(_) => return, // past the bound (a sender may be one), or gone
        }
        let mut members: Vec<Arc<str>> = Vec::new();
        let mut cursor = None;
        loop {
            let op = Op::ListMembers { group: group.to_string(), cursor, limit: UNREACHED_MEMBERS_PAGE };
            let (page, next) = match self.store.call(op).await {
                Ok(Reply::Members { members, next_cursor }) => (members, next_cursor),
                Ok(_) | Err(_) => return, // dissolved meanwhile, or the store failed: no event
            };
            members.extend(page.into_iter().filter(|m| !run.senders.iter().any(|s| **s == **m)).map(Arc::from));
            if members.len() > max {
                debug!(group = %group, max, "group.unreached: group larger than events.group_unreached_members_max");
                return;
            }
            match next {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        let mut by_shard: Vec<Vec<Arc<str>>> = vec![Vec::new(); self.shards];
        for m in members {
            by_shard[home_shard(&m, self.shards)].push(m);
        }
        let mut offline = Vec::new();
        for (to, users) in by_shard.into_iter().enumerate().filter(|(_, u)| !u.is_empty()) {
            match self.ask(to, |reply| ShardMsg::Offline { users, reply }).await {
                Ok(o) => offline.extend(o),
                Err(_) => return,
            }
        }
        if let Some(cluster) = self.node.cluster().cloned() {
            let elsewhere = cluster.presence_elsewhere_many(&offline).await;
            offline = offline.into_iter().zip(elsewhere).filter(|(_, t)| t.is_empty()).map(|(u, _)| u).collect();
        }
        if offline.is_empty() {
            return;
        }
        offline.sort();
        let users: Vec<&str> = offline.iter().map(|u| &**u).collect();
        let data = serde_json::json!({
            "id": run.id.to_string(),
            "group": &**group,
            "seq": run.seq,
            "messages": run.messages,
            "users": users,
        });
        self.emit("group.unreached", data);
        ShardCounters::add(&self.counters().group_unreached_events, 1);
    }

    /// Accepts a group message from a member; answers once it is durable.
    pub async fn send_group(self: &Rc<Self>, post: NewGroupPost) -> Result<GroupSent, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.submit_group(post, Answer::Waiter(tx))?;
        let a = rx.await.map_err(|_| EngineError::Store(StoreError::Closed))??;
        if !a.duplicate {
            ShardCounters::add(&self.counters().messages_accepted, 1);
        }
        Ok(GroupSent { id: a.id, seq: a.seq, ts: a.ts })
    }
}

// ---- cluster mode: each group's messages in seq order on a shard ----------------------------

/// Deliveries of a group kept for the task ordering and pushing it on a shard; past these, only
/// the highest seq is kept and the rest is read from the store when that task gets to it (as a
/// gap is), so a group whose store reads are slow holds no unbounded list.
const GROUP_WORK_RUNS_MAX: usize = 1024;

/// Cluster mode: the work waiting for the task that orders and pushes a group on a shard.
///
/// At most one task per shard and group does so at a time: the first to come (the commit
/// loop with a run the bus brought, or a `resync`) takes the group's turn (its entry in
/// `Shard::group_work`) and keeps it, through every store read and fan-out yield, until no
/// work is left for the group; others only leave their work here. Two of them ordering from
/// the same head across such an await pushed the same messages twice, pushed an older one
/// after a newer one, and set the head back when the slower finished.
#[derive(Debug, Default)]
pub(crate) struct GroupWork {
    /// Deliveries the bus brought meanwhile, in any order (at most `GROUP_WORK_RUNS_MAX`).
    runs: Vec<GroupDelivery>,
    /// Push up to this seq, read from the store: a `resync`'s head, or the highest of the
    /// deliveries past `GROUP_WORK_RUNS_MAX`. 0: nothing.
    to: u64,
}

impl GroupWork {
    fn add_run(&mut self, run: &[GroupDelivery]) {
        for g in run {
            if self.runs.len() < GROUP_WORK_RUNS_MAX {
                self.runs.push(g.clone());
            } else {
                self.to = self.to.max(g.seq);
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.runs.is_empty() && self.to == 0
    }
}

/// Cluster mode: what ordering a group's messages needs of a shard (a fake in the tests).
pub(crate) trait GroupLine {
    /// The shard's id (for logs).
    fn shard(&self) -> usize;
    /// The last seq of `group` this shard pushed (`Shard::group_heads`); none until a member
    /// here brought one, or its first message came.
    fn head(&self, group: &str) -> Option<u64>;
    /// Sets the head of `group` (only ever forward: [`advance_group_head`]).
    fn set_head(&self, group: &Arc<str>, seq: u64);
    /// Whether a member of `group` is online here.
    fn has_members(&self, group: &str) -> bool;
    /// The groups whose turn a task holds, with the work left for it (see [`GroupWork`]).
    fn work(&self) -> &RefCell<ByName<GroupWork>>;
    /// A page of the group's log from the store: positions after `after`, as far as `to`.
    async fn read_page(&self, group: &str, after: u64, to: u64) -> Result<Page, StoreError>;
    /// Pushes a run of the group (seq order) to its members here; returns how many pushes.
    async fn push_run(&self, run: &[GroupDelivery]) -> u64;
}

impl GroupLine for Shard {
    fn shard(&self) -> usize {
        self.id
    }

    fn head(&self, group: &str) -> Option<u64> {
        self.group_heads.borrow().get(group).copied()
    }

    fn set_head(&self, group: &Arc<str>, seq: u64) {
        self.group_heads.borrow_mut().insert(group.clone(), seq);
    }

    fn has_members(&self, group: &str) -> bool {
        self.group_index.borrow().contains_key(group)
    }

    fn work(&self) -> &RefCell<ByName<GroupWork>> {
        &self.group_work
    }

    async fn read_page(&self, group: &str, after: u64, to: u64) -> Result<Page, StoreError> {
        self.read_group_page(group, after, to).await
    }

    async fn push_run(&self, run: &[GroupDelivery]) -> u64 {
        self.deliver_group_run(run).await
    }
}

/// Cluster mode: pushes a run of one group's committed deliveries (seq order) after what the
/// shard pushed of the group, or, while a task holds the group's turn, leaves the run to it
/// (it pushes it next, in order). Returns the pushes made here.
async fn push_group_run<L: GroupLine>(line: &L, run: &[GroupDelivery]) -> u64 {
    let Some(first) = run.first() else { return 0 };
    let group = first.group.clone();
    {
        let mut work = line.work().borrow_mut();
        if let Some(waiting) = work.get_mut(&group) {
            waiting.add_run(run);
            return 0;
        }
        work.insert(group.clone(), GroupWork::default());
    }
    drain_group_work(line, &group, GroupWork { runs: run.to_vec(), to: 0 }).await
}

/// Cluster mode, `resync`: pushes what the shard has not pushed of `group` up to `head` (the
/// store's), or, while a task holds the group's turn, leaves that to it. Returns the pushes
/// made and, if work was left for the group meanwhile, that work: the caller still holds the
/// group's turn and hands both to [`drain_group_work`].
async fn catch_up_group_to<L: GroupLine>(line: &L, group: &Arc<str>, head: u64) -> (u64, Option<GroupWork>) {
    {
        let mut work = line.work().borrow_mut();
        if let Some(waiting) = work.get_mut(group) {
            waiting.to = waiting.to.max(head);
            return (0, None);
        }
        work.insert(group.clone(), GroupWork::default());
    }
    let delivered = catch_up(line, group, head).await;
    let mut work = line.work().borrow_mut();
    let left = work.get_mut(group).map(std::mem::take).unwrap_or_default();
    if left.is_empty() {
        work.remove(group);
        (delivered, None)
    } else {
        (delivered, Some(left))
    }
}

/// Cluster mode: orders and pushes `work` of `group`, then whatever was left for the group
/// meanwhile, until nothing is; then gives the group's turn up. Only its holder calls this.
async fn drain_group_work<L: GroupLine>(line: &L, group: &Arc<str>, mut work: GroupWork) -> u64 {
    let mut delivered = 0;
    loop {
        if !work.runs.is_empty() {
            // Runs left meanwhile come in any order, some maybe twice.
            work.runs.sort_unstable_by_key(|g| g.seq);
            work.runs.dedup_by_key(|g| g.seq);
            let run = order_group_run(line, &work.runs).await;
            delivered += line.push_run(&run).await;
        }
        if work.to > 0 {
            delivered += catch_up(line, group, work.to).await;
        }
        let mut waiting = line.work().borrow_mut();
        match waiting.get_mut(group) {
            Some(next) if !next.is_empty() => work = std::mem::take(next),
            _ => {
                waiting.remove(group);
                return delivered;
            }
        }
    }
}

/// Cluster mode: the run without what the shard already pushed, with what is missing before
/// it read from the store, in seq order; moves the group's head to its end. A group the shard
/// has no head for yet (no member here brought one) starts at the run; one with no member here
/// is left alone. If the group was forgotten here while the store was read (its last member
/// here left, and maybe a new one came with a head of its own), what was read is dropped and
/// the run ordered again from where the group stands now. Called with the group's turn held.
async fn order_group_run<L: GroupLine>(line: &L, run: &[GroupDelivery]) -> Vec<GroupDelivery> {
    let Some(first) = run.first() else { return Vec::new() };
    let group = &first.group;
    'order: loop {
        if !line.has_members(group) {
            return Vec::new();
        }
        let start = line.head(group);
        let mut last = start;
        let mut out = Vec::with_capacity(run.len());
        for g in run {
            match last {
                Some(l) if g.seq <= l => continue,
                Some(l) if g.seq > l + 1 => {
                    read_group_gap(line, group, l, g.seq, &mut out).await;
                    if line.head(group) != start {
                        continue 'order;
                    }
                }
                _ => {}
            }
            out.push(g.clone());
            last = Some(g.seq);
        }
        if let Some(l) = last.filter(|&l| Some(l) != start) {
            advance_group_head(line, group, l);
        }
        return out;
    }
}

/// Moves the shard's head of `group` to `seq`, which is never behind it.
fn advance_group_head<L: GroupLine>(line: &L, group: &Arc<str>, seq: u64) {
    let head = line.head(group);
    debug_assert!(head.is_none_or(|h| h <= seq), "the head of group {group} would move back from {head:?} to {seq}");
    if head.is_none_or(|h| h < seq) {
        line.set_head(group, seq);
    }
}

/// Cluster mode: appends to `out` what the store has of `group` strictly between `after`
/// and `before` (a gap in what the bus brought), in seq order, page after page: a gap longer
/// than one page (`limits.sync_page_max`) is read whole, never pushed with its end missing.
async fn read_group_gap<L: GroupLine>(
    line: &L,
    group: &Arc<str>,
    mut after: u64,
    before: u64,
    out: &mut Vec<GroupDelivery>,
) {
    while after + 1 < before {
        let page = match line.read_page(group, after, before - 1).await {
            Ok(page) => page,
            Err(e) => {
                // Members catch up with `sync` (they see the gap in seqs).
                debug!(group = %group, shard = line.shard(), error = %e, "cluster: cannot read a group gap");
                return;
            }
        };
        let mut next = after;
        for e in page.entries.iter().filter(|e| e.seq > after && e.seq < before) {
            out.push(stored_delivery(group, e));
            next = e.seq;
        }
        // Purged or unreadable positions are skipped, never waited for.
        next = next.max(page.scanned_to.min(before - 1));
        if next <= after {
            return;
        }
        after = next;
    }
}

/// Cluster mode: pushes what the shard has not pushed of `group` up to `head`, read from the
/// store page by page, through `order_group_run`. A group it has pushed nothing of yet is left
/// to its next message (its members' `welcome` heads cover what came before). Called with the
/// group's turn held.
async fn catch_up<L: GroupLine>(line: &L, group: &Arc<str>, head: u64) -> u64 {
    let mut delivered = 0;
    loop {
        let Some(known) = line.head(group) else { return delivered };
        if head <= known || !line.has_members(group) {
            return delivered;
        }
        let page = match line.read_page(group, known, head).await {
            Ok(page) => page,
            Err(e) => {
                debug!(group = %group, shard = line.shard(), error = %e, "cluster: cannot read a group to resync");
                return delivered;
            }
        };
        if line.head(group) != Some(known) {
            // Forgotten here meanwhile (and maybe taken up again): from where it stands now.
            continue;
        }
        let run: Vec<GroupDelivery> =
            page.entries.iter().filter(|e| e.seq > known && e.seq <= head).map(|e| stored_delivery(group, e)).collect();
        if run.is_empty() {
            // Purged or unreadable positions: nothing more to push.
            return delivered;
        }
        let run = order_group_run(line, &run).await;
        delivered += line.push_run(&run).await;
    }
}

/// A group message read back from the store, as a delivery of `group` (its frame encoded).
fn stored_delivery(group: &Arc<str>, e: &ether_store::op::Entry) -> GroupDelivery {
    let msg = Arc::new(crate::storage::message_of(e));
    GroupDelivery { group: group.clone(), seq: e.seq, id: e.id, ts: e.ts, frame: msg.encode_frame(&e.chat, e.seq), msg }
}

#[cfg(test)]
mod tests {
    //! The ordering of a group's messages on a shard, against a store that answers each read
    //! when the test says: two paths pushing the same group (a run the bus brought, whose gap
    //! is being read, and a `resync`) used to overlap across those reads.
    use std::cell::Cell;
    use std::collections::VecDeque;
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll, Waker};

    use super::*;

    /// Positions a store read returns at most.
    const PAGE: u64 = 4;

    /// A shard's side of group `crew`, which has one member online here (two terminals) while
    /// `members` says so. The store's log of the group is seq `1..=store_head`; each read, and
    /// each fan-out between the two terminals when `yield_in_fanout`, waits until the test lets
    /// it go on (`waits`).
    #[derive(Default)]
    struct Line {
        heads: RefCell<ByName<u64>>,
        members: Cell<bool>,
        work: RefCell<ByName<GroupWork>>,
        store_head: Cell<u64>,
        yield_in_fanout: Cell<bool>,
        waits: RefCell<VecDeque<oneshot::Sender<()>>>,
        /// What each terminal was pushed, in order.
        pushed: [RefCell<Vec<u64>>; 2],
    }

    impl Line {
        fn new(head: u64, store_head: u64) -> Line {
            let line = Line::default();
            line.heads.borrow_mut().insert(crew(), head);
            line.members.set(true);
            line.store_head.set(store_head);
            line
        }

        async fn wait(&self) {
            let (tx, rx) = oneshot::channel();
            self.waits.borrow_mut().push_back(tx);
            let _ = rx.await;
        }

        fn pushed(&self, terminal: usize) -> Vec<u64> {
            self.pushed[terminal].borrow().clone()
        }
    }

    impl GroupLine for Line {
        fn shard(&self) -> usize {
            0
        }

        fn head(&self, group: &str) -> Option<u64> {
            self.heads.borrow().get(group).copied()
        }

        fn set_head(&self, group: &Arc<str>, seq: u64) {
            self.heads.borrow_mut().insert(group.clone(), seq);
        }

        fn has_members(&self, _group: &str) -> bool {
            self.members.get()
        }

        fn work(&self) -> &RefCell<ByName<GroupWork>> {
            &self.work
        }

        async fn read_page(&self, _group: &str, after: u64, to: u64) -> Result<Page, StoreError> {
            self.wait().await;
            let head = self.store_head.get();
            let last = to.min(after + PAGE).min(head);
            let entries: Vec<_> = (after + 1..=last).map(entry).collect();
            Ok(Page { entries, head, more: last < head, scanned_to: last.max(after) })
        }

        async fn push_run(&self, run: &[GroupDelivery]) -> u64 {
            if !self.members.get() {
                return 0;
            }
            self.pushed[0].borrow_mut().extend(run.iter().map(|g| g.seq));
            if self.yield_in_fanout.get() {
                self.wait().await;
            }
            self.pushed[1].borrow_mut().extend(run.iter().map(|g| g.seq));
            2 * run.len() as u64
        }
    }

    fn crew() -> Arc<str> {
        Arc::from("crew")
    }

    fn entry(seq: u64) -> ether_store::op::Entry {
        ether_store::op::Entry {
            seq,
            chat: "g:crew".into(),
            id: 1000 + seq,
            ts: 1,
            from: "carol".into(),
            kind: Kind::Text,
            body: format!("{{\"n\":{seq}}}"),
            cid: None,
        }
    }

    /// Message `seq` of `crew` as the bus brings it.
    fn delivery(seq: u64) -> GroupDelivery {
        stored_delivery(&crew(), &entry(seq))
    }

    type Task<'a> = Pin<Box<dyn Future<Output = u64> + 'a>>;

    /// A run the bus brought, as the commit loop pushes it.
    fn bus<'a>(line: &'a Line, seqs: &[u64]) -> Task<'a> {
        let run: Vec<GroupDelivery> = seqs.iter().map(|&s| delivery(s)).collect();
        Box::pin(async move { push_group_run(line, &run).await })
    }

    /// A `resync` of `crew` to the store's head, as `Shard::catch_up_group` runs it (the work
    /// left meanwhile drained here rather than by a task of its own).
    fn resync(line: &Line) -> Task<'_> {
        Box::pin(async move {
            let group = crew();
            let (delivered, left) = catch_up_group_to(line, &group, line.store_head.get()).await;
            match left {
                Some(left) => delivered + drain_group_work(line, &group, left).await,
                None => delivered,
            }
        })
    }

    #[derive(Clone, Copy)]
    enum Let {
        OldestFirst,
        NewestFirst,
    }

    /// Polls `tasks` (in that order, on one thread as a shard does) until all are done,
    /// letting one waiting read or fan-out go on each time none can make progress.
    fn run(line: &Line, mut tasks: Vec<Task<'_>>, order: Let) -> u64 {
        let mut cx = Context::from_waker(Waker::noop());
        let mut done: Vec<Option<u64>> = vec![None; tasks.len()];
        for _ in 0..100_000 {
            for (task, done) in tasks.iter_mut().zip(done.iter_mut()) {
                if done.is_none() {
                    if let Poll::Ready(n) = task.as_mut().poll(&mut cx) {
                        *done = Some(n);
                    }
                }
            }
            if done.iter().all(Option::is_some) {
                return done.into_iter().flatten().sum();
            }
            let next = match order {
                Let::OldestFirst => line.waits.borrow_mut().pop_front(),
                Let::NewestFirst => line.waits.borrow_mut().pop_back(),
            };
            let Some(go) = next else { panic!("tasks wait for nothing the test can let go on") };
            let _ = go.send(());
        }
        panic!("the tasks never finished");
    }

    /// The bus brings seq 6 while the shard had pushed 1: the shard reads 2..5 from the store.
    /// A `resync` comes meanwhile and its read is answered first. Each of 2..6 is pushed once,
    /// in order. Before, the resync read from the same head and pushed 2..6, then the run
    /// pushed 2..6 again.
    #[test]
    fn a_resync_while_a_gap_is_read_pushes_nothing_twice() {
        let line = Line::new(1, 6);
        let delivered = run(&line, vec![bus(&line, &[6]), resync(&line)], Let::NewestFirst);
        assert_eq!(line.pushed(0), [2, 3, 4, 5, 6]);
        assert_eq!(line.pushed(1), [2, 3, 4, 5, 6]);
        assert_eq!(delivered, 10);
        assert_eq!(line.head("crew"), Some(6));
        assert!(line.work.borrow().is_empty(), "the group's turn was given up");
    }

    /// A `resync` reads the store to its head (10) while the bus brings seq 4; the resync's
    /// reads are answered first. 2..10 are pushed once, in order, and the head stays at 10.
    /// Before, the bus's run read its own gap (2..3) from the head the resync had not moved
    /// yet, and pushed 2, 3, 4 again after 10, setting the head back to 4.
    #[test]
    fn a_run_the_bus_brings_during_a_resync_is_pushed_after_it_in_order() {
        let line = Line::new(1, 10);
        let delivered = run(&line, vec![resync(&line), bus(&line, &[4])], Let::OldestFirst);
        assert_eq!(line.pushed(0), (2..=10).collect::<Vec<_>>());
        assert_eq!(line.pushed(1), (2..=10).collect::<Vec<_>>());
        assert_eq!(delivered, 18);
        assert_eq!(line.head("crew"), Some(10));
        assert!(line.work.borrow().is_empty());
    }

    /// A run is pushed to the first terminal and the fan-out yields before the second; a
    /// `resync` comes meanwhile. The second terminal, too, gets the run before what the resync
    /// reads. Before, the resync pushed 3 to both while the fan-out of 2 was halfway, so the
    /// second terminal got 3 before 2.
    #[test]
    fn a_resync_waits_for_a_fan_out_halfway_through() {
        let line = Line::new(1, 3);
        line.yield_in_fanout.set(true);
        run(&line, vec![bus(&line, &[2]), resync(&line)], Let::NewestFirst);
        assert_eq!(line.pushed(0), [2, 3]);
        assert_eq!(line.pushed(1), [2, 3]);
        assert_eq!(line.head("crew"), Some(3));
    }

    /// Two runs the bus brings out of order while the first's gap is read: all of it pushed once, in
    /// order, and the head never moves back.
    #[test]
    fn runs_left_for_the_group_are_pushed_in_seq_order() {
        let line = Line::new(1, 9);
        let tasks = vec![bus(&line, &[5]), bus(&line, &[9]), bus(&line, &[3, 7]), bus(&line, &[5, 6])];
        run(&line, tasks, Let::NewestFirst);
        assert_eq!(line.pushed(0), (2..=9).collect::<Vec<_>>());
        assert_eq!(line.head("crew"), Some(9));
    }

    /// More deliveries than a group's waiting work keeps come while a gap is read: those past
    /// it are read from the store; each is pushed once, in order.
    #[test]
    fn deliveries_past_the_waiting_bound_are_read_from_the_store() {
        let last = GROUP_WORK_RUNS_MAX as u64 + 50;
        let line = Line::new(1, last);
        let mut tasks = vec![bus(&line, &[3])];
        tasks.extend((4..=last).rev().map(|s| bus(&line, &[s])));
        run(&line, tasks, Let::OldestFirst);
        assert_eq!(line.pushed(0), (2..=last).collect::<Vec<_>>());
        assert_eq!(line.head("crew"), Some(last));
    }

    /// The group's last member here leaves while its gap is read (the shard forgets the
    /// group's head): nothing is pushed and no head is set. One comes back meanwhile with its
    /// `welcome` head (8): the run is ordered from it. Before, the shard pushed what it read
    /// and set the head to the run's end: a stale head for a group without members, and a head
    /// moved back from 8 to 6 for the new member.
    #[test]
    fn a_group_forgotten_while_its_gap_is_read_is_ordered_from_where_it_stands_then() {
        let line = Line::new(1, 10);
        let mut task = bus(&line, &[6]);
        let mut cx = Context::from_waker(Waker::noop());
        assert!(task.as_mut().poll(&mut cx).is_pending(), "reading 2..5");
        line.members.set(false);
        line.heads.borrow_mut().remove("crew");
        let _ = line.waits.borrow_mut().pop_front().map(|go| go.send(()));
        assert_eq!(task.as_mut().poll(&mut cx), Poll::Ready(0));
        assert!(line.pushed(0).is_empty());
        assert_eq!(line.head("crew"), None, "no head kept for a group without members here");

        let line = Line::new(1, 10);
        let mut task = bus(&line, &[6, 9]);
        assert!(task.as_mut().poll(&mut cx).is_pending(), "reading 2..5");
        line.heads.borrow_mut().insert(crew(), 8);
        let _ = line.waits.borrow_mut().pop_front().map(|go| go.send(()));
        assert_eq!(task.as_mut().poll(&mut cx), Poll::Ready(2));
        assert_eq!(line.pushed(0), [9]);
        assert_eq!(line.head("crew"), Some(9));
        assert!(line.work.borrow().is_empty());
    }
}
