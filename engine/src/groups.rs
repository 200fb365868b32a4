//! Groups on a shard: the index group → this shard's online member sessions (kept right on
//! connect, disconnect and membership change), the fan-out of committed group messages (one
//! frame for every member, loops that yield), and group sends made durable through the store.
//! Membership itself lives in the store; this module only mirrors it for online sessions.
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
use crate::shard::{home_shard, GroupIndex, Shard};
use crate::stats::ShardCounters;
use crate::storage::{Answer, Committed, GroupDelivery, GroupPosted};

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

    /// Tells the users' home shards that they joined or left `group`, and returns once they
    /// mirrored it (this node's shards; other nodes learn it from the bus): a message the
    /// business posts after the answer then reaches a member just added, and no longer one
    /// just removed (a group's committed messages go to the shards whose fan-out index has
    /// the group at commit time, `GroupShards`).
    pub async fn announce_membership(self: &Rc<Self>, group: &str, users: &[String], joined: bool) {
        if let Some(cluster) = self.node.cluster() {
            let e = BusEvent::Membership { group: group.to_owned(), users: users.to_vec(), joined };
            cluster.publish(e);
        }
        let group: Arc<str> = Arc::from(group);
        let mut per_shard: Vec<Vec<Arc<str>>> = vec![Vec::new(); self.shards];
        for u in users {
            per_shard[home_shard(u, self.shards)].push(Arc::from(u.as_str()));
        }
        let mut told = Vec::new();
        for (to, users) in per_shard.into_iter().enumerate() {
            if users.is_empty() {
                continue;
            }
            let msg = ShardMsg::Membership { group: group.clone(), users, joined };
            match self.route(to, msg).await {
                Ok(()) => told.push(to),
                Err(e) => debug!(shard = self.id, to, error = %e, "membership change not mirrored"),
            }
        }
        for to in told {
            self.handled_by(to).await;
        }
    }

    /// Tells every shard that `group` is gone, and returns once this node's shards forgot it
    /// (see `announce_membership`): nothing the business posts afterwards (to a group made
    /// again under the same id) reaches the old members through it.
    pub async fn announce_group_gone(self: &Rc<Self>, group: &str) {
        if let Some(cluster) = self.node.cluster() {
            cluster.publish(BusEvent::GroupGone { group: group.to_owned() });
        }
        let group: Arc<str> = Arc::from(group);
        let mut told = Vec::new();
        for to in 0..self.shards {
            match self.route(to, ShardMsg::GroupGone { group: group.clone() }).await {
                Ok(()) => told.push(to),
                Err(e) => debug!(shard = self.id, to, error = %e, "dissolution not mirrored"),
            }
        }
        for to in told {
            self.handled_by(to).await;
        }
    }

    /// Waits until shard `to` has handled what this shard sent it so far: each pair of shards
    /// has its own queue, handled in order, so the answer to a question asked now comes after
    /// them. (A message to this shard itself is handled as it is sent.)
    async fn handled_by(self: &Rc<Self>, to: usize) {
        if to == self.id {
            return;
        }
        if let Err(e) = self.ask(to, |reply| ShardMsg::Offline { users: Vec::new(), reply }).await {
            debug!(shard = self.id, to, error = %e, "no answer from a shard");
        }
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
    pub(crate) async fn deliver_groups(&self, batch: &mut [GroupDelivery]) -> u64 {
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
                let run = self.order_group_run(run).await;
                delivered += self.deliver_group_run(&run).await;
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

    /// Cluster mode: the run without what this shard already pushed, with what is missing
    /// before it read from the store, in seq order. A group this shard has no head for yet
    /// (no member came since it started) starts at the run.
    async fn order_group_run(&self, run: &[GroupDelivery]) -> Vec<GroupDelivery> {
        let Some(first) = run.first() else { return Vec::new() };
        let group = first.group.clone();
        let mut last = self.group_heads.borrow().get(&group).copied();
        let mut out = Vec::with_capacity(run.len());
        for g in run {
            match last {
                Some(l) if g.seq <= l => continue,
                Some(l) if g.seq > l + 1 => self.read_group_gap(&group, l, g.seq, &mut out).await,
                _ => {}
            }
            out.push(g.clone());
            last = Some(g.seq);
        }
        if let Some(l) = last {
            self.group_heads.borrow_mut().insert(group, l);
        }
        out
    }

    /// Cluster mode: appends to `out` what the store has of `group` strictly between `after`
    /// and `before` (a gap in what the bus brought), in seq order, page after page: a gap longer
    /// than one page (`limits.sync_page_max`) is read whole, never pushed with its end missing.
    async fn read_group_gap(&self, group: &Arc<str>, mut after: u64, before: u64, out: &mut Vec<GroupDelivery>) {
        while after + 1 < before {
            let page = match self.read_group_page(group, after, before - 1).await {
                Ok(page) => page,
                Err(e) => {
                    // Members catch up with `sync` (they see the gap in seqs).
                    debug!(group = %group, shard = self.id, error = %e, "cluster: cannot read a group gap");
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

    /// Cluster mode, `resync`: the store's head of `group` is `head`; pushes to this shard's
    /// members what it has not pushed up to it, page by page, through `order_group_run` (which
    /// skips what arrives meanwhile). A group this shard has pushed nothing of yet is left to
    /// its next message (the members' `welcome` heads cover what came before).
    pub(crate) async fn catch_up_group(&self, group: Arc<str>, head: u64) {
        loop {
            let Some(known) = self.group_heads.borrow().get(&group).copied() else { return };
            if head <= known || !self.group_index.borrow().contains_key(&group) {
                return;
            }
            let page = match self.read_group_page(&group, known, head).await {
                Ok(page) => page,
                Err(e) => {
                    debug!(group = %group, shard = self.id, error = %e, "cluster: cannot read a group to resync");
                    return;
                }
            };
            let run: Vec<GroupDelivery> = page
                .entries
                .iter()
                .filter(|e| e.seq > known && e.seq <= head)
                .map(|e| stored_delivery(&group, e))
                .collect();
            if run.is_empty() {
                // Purged or unreadable positions: nothing more to push.
                return;
            }
            let run = self.order_group_run(&run).await;
            let delivered = self.deliver_group_run(&run).await;
            ShardCounters::add(&self.counters().deliveries, delivered);
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

/// A group message read back from the store, as a delivery of `group` (its frame encoded).
fn stored_delivery(group: &Arc<str>, e: &ether_store::op::Entry) -> GroupDelivery {
    let msg = Arc::new(crate::storage::message_of(e));
    GroupDelivery { group: group.clone(), seq: e.seq, id: e.id, ts: e.ts, frame: msg.encode_frame(&e.chat, e.seq), msg }
}
