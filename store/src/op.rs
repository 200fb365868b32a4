//! Store operations and their replies: the typed vocabulary every backend speaks, and the
//! input checks every backend makes the same way. Plain data, no I/O.
use std::collections::BTreeMap;
use std::sync::Arc;

use ether_proto::ids::is_valid_id;
use ether_proto::Kind;

use crate::StoreError;

/// Longest page any read returns, whatever `limit` asks.
pub const PAGE_LIMIT_MAX: usize = 1000;
/// Longest stored body (JSON text), in bytes.
pub const BODY_BYTES_MAX: usize = 64 * 1024;
/// Longest `cid`, in bytes.
pub const CID_BYTES_MAX: usize = 128;
/// Default cap of the event outbox (`events.outbox_max`): events kept at most.
pub const OUTBOX_MAX_DEFAULT: u64 = 1_000_000;
/// Oldest events an outbox write drops at most beyond as many as it adds. Past the cap each
/// write drops what it adds, so the cap holds exactly; an outbox already far past it (a
/// lowered cap, an upgrade during a long webhook outage) shrinks by this much per write
/// instead of in one long delete that would stall the store (Redis: every node).
pub const OUTBOX_TRIM_STEP: u64 = 1000;

/// A single-chat message to make durable. Written once, indexed into both inboxes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    /// Engine-assigned id (time-ordered: see the crate docs on retention). At most `i64::MAX`.
    pub id: u64,
    /// Unix milliseconds.
    pub ts: u64,
    pub from: String,
    pub to: String,
    pub kind: Kind,
    /// The validated body as raw JSON text.
    pub body: String,
    pub cid: Option<String>,
}

/// A group message to make durable; the sender must be a member unless `system` is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewGroupMessage {
    pub id: u64,
    pub ts: u64,
    pub from: String,
    /// Sent by the business as the system (`from` names it): no membership check.
    pub system: bool,
    pub group: String,
    pub kind: Kind,
    pub body: String,
    pub cid: Option<String>,
}

/// An event for the durable outbox (`message.read`, `message.unreached`, …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// The event type, e.g. `message.delivered`.
    pub kind: String,
    /// The event's fields as a JSON object text.
    pub data: String,
    pub ts: u64,
}

/// Which history to read and in which direction.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HistoryQuery {
    pub user: String,
    /// `u:<peer>` or `g:<group>`; `None` for the whole inbox.
    pub chat: Option<String>,
    pub before_seq: Option<u64>,
    pub after_seq: Option<u64>,
    pub limit: usize,
}

/// One write or read. Every op is applied in submission order; writes of one batch commit
/// together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// → [`Reply::Appended`]
    Append(NewMessage),
    /// → [`Reply::GroupAppended`]
    AppendGroup(NewGroupMessage),
    /// The inbox after `after_seq`, oldest first. → [`Reply::Page`]
    ReadInbox { user: String, after_seq: u64, limit: usize },
    /// A group's log after `after_seq`, oldest first. → [`Reply::Page`]
    ReadGroup { group: String, after_seq: u64, limit: usize },
    /// Everything after the given positions, in order: the inbox first, then each group the
    /// user is a member of (others are skipped). → [`Reply::Synced`]
    Sync { user: String, inbox_after: u64, groups: BTreeMap<String, u64>, limit: usize },
    /// The inbox head and the head of each of the user's groups. → [`Reply::Heads`]
    Heads { user: String },
    /// → [`Reply::Page`]; see [`HistoryQuery`] and the crate docs for the order.
    History(HistoryQuery),
    /// A group's history, same order rules as `History`. → [`Reply::Page`]
    GroupHistory { group: String, before_seq: Option<u64>, after_seq: Option<u64>, limit: usize },
    /// Cumulative delivery ack of a terminal (inbox, or a group when `group` is set); never
    /// moves backwards. → [`Reply::Position`]
    SetDelivered { user: String, device: String, group: Option<String>, seq: u64 },
    /// → [`Reply::Delivered`]
    GetDelivered { user: String, device: String },
    /// Read `chat` (`u:x` or `g:x`) up to `seq`; never moves backwards, clamped to the head.
    /// With `emit_event`, a `message.read` event is appended in the same transaction when the
    /// position moved. → [`Reply::Read`]
    SetRead { user: String, chat: String, seq: u64, emit_event: bool },
    /// Per chat, the messages from others after the user's read position; in a group, only
    /// those posted after the user joined it. → [`Reply::Unread`]
    Unread { user: String },
    /// → [`Reply::OutboxAppended`]. Shared (`Arc`): a caller that must write the events again
    /// after a failure keeps them without a copy.
    OutboxAppend { events: Arc<[NewEvent]> },
    /// Events with `seq > after`, in order. → [`Reply::Events`]
    OutboxFetch { after: u64, limit: usize },
    /// Deletes every event with `seq <= through`. → [`Reply::Count`]
    OutboxAck { through: u64 },
    /// How many events the outbox holds and how many its cap has dropped (see
    /// [`OutboxStats`]). → [`Reply::OutboxStats`]
    OutboxStats,
    /// → [`Reply::GroupCreated`]; `Conflict` if `id` exists; the owner becomes a member.
    CreateGroup {
        id: Option<String>,
        name: String,
        owner: String,
        members: Vec<String>,
        created_ms: u64,
        members_max: usize,
        /// A user already in this many groups cannot join another (`LimitExceeded`).
        groups_per_user_max: usize,
    },
    /// → [`Reply::Group`]
    GetGroup { group: String },
    /// → [`Reply::Done`]; members and read positions go, the log is left to retention.
    DissolveGroup { group: String },
    /// → [`Reply::Count`] (members newly added)
    AddMembers { group: String, users: Vec<String>, members_max: usize, groups_per_user_max: usize },
    /// → [`Reply::Count`] (0 or 1)
    RemoveMember { group: String, user: String },
    /// Members in a stable order; `cursor` is the previous page's `next_cursor`.
    /// → [`Reply::Members`]
    ListMembers { group: String, cursor: Option<String>, limit: usize },
    /// → [`Reply::Groups`]
    GroupsOf { user: String },
    /// How many of the members the message was posted to (members other than its sender
    /// that were in the group when it was posted) have read it. → [`Reply::Reads`]
    GroupReads { group: String, msg_id: u64 },
    /// Deletes up to `max_rows` messages older than `older_than_ms`, oldest first.
    /// → [`Reply::Purged`]
    Purge { older_than_ms: u64, max_rows: usize },
    /// Revokes the user's terminal tokens issued before `before_ms` (Unix ms): on one device,
    /// or on all when `device` is `None`. Never moves back: the answer is the revocation in
    /// force afterwards (the later of the stored one and `before_ms`). → [`Reply::Count`]
    RevokeTokens { user: String, device: Option<String>, before_ms: u64 },
    /// Every revocation, in no particular order. → [`Reply::Revocations`]
    Revocations,
}

impl Op {
    /// Whether the op writes (reads are answered inside the same batch, in order).
    pub fn is_write(&self) -> bool {
        !matches!(
            self,
            Op::ReadInbox { .. }
                | Op::ReadGroup { .. }
                | Op::Sync { .. }
                | Op::Heads { .. }
                | Op::History(_)
                | Op::GroupHistory { .. }
                | Op::GetDelivered { .. }
                | Op::Unread { .. }
                | Op::OutboxFetch { .. }
                | Op::OutboxStats
                | Op::GetGroup { .. }
                | Op::ListMembers { .. }
                | Op::GroupsOf { .. }
                | Op::GroupReads { .. }
                | Op::Revocations
        )
    }
}

/// A single-chat message made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub id: u64,
    pub ts: u64,
    /// Position in the receiver's inbox.
    pub receiver_seq: u64,
    /// Position in the sender's inbox; `None` when the sender wrote to themself.
    pub sender_seq: Option<u64>,
    /// A repeated `(from, cid)` among the sender's single chats: these are the first
    /// message's values; nothing was written.
    pub duplicate: bool,
}

/// A group message made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupAppended {
    pub id: u64,
    pub ts: u64,
    pub seq: u64,
    /// A repeated `(from, group, cid)`: the first post's values; nothing was written. A cid is
    /// scoped to its group: the sender's single chats and other groups are other scopes.
    pub duplicate: bool,
}

/// A stored message as one stream (inbox or group log) holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Position in the stream that was read.
    pub seq: u64,
    /// From the reader's side: `u:<peer>` in an inbox, `g:<group>` in a group log.
    pub chat: String,
    pub id: u64,
    pub ts: u64,
    pub from: String,
    pub kind: Kind,
    pub body: String,
    pub cid: Option<String>,
}

/// A bounded page of entries.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Page {
    pub entries: Vec<Entry>,
    /// The stream's head when read.
    pub head: u64,
    /// Whether more entries lie beyond this page in the direction read.
    pub more: bool,
    /// The last position examined: continue after it (oldest-first pages) or before it
    /// (newest-first pages). Differs from the last entry's seq when the page ends on purged
    /// or filtered-out positions.
    pub scanned_to: u64,
}

/// The heads of a user's streams.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Heads {
    pub inbox_seq: u64,
    pub groups: BTreeMap<String, u64>,
}

/// The answer to `Sync`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Synced {
    /// Inbox entries first (chat `u:…`), then group entries (chat `g:…`), each in order.
    pub entries: Vec<Entry>,
    /// The heads when read (for `synced {inbox_seq, groups}`).
    pub heads: Heads,
    pub more: bool,
}

/// A read position that was set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadMoved {
    pub chat: String,
    pub prev: u64,
    pub seq: u64,
    /// The newest message of that chat at or before `seq` (for `receipt {up_to}`).
    pub up_to: Option<u64>,
    pub moved: bool,
}

/// An outbox event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Outbox position: increasing, never reused; the `event_id`.
    pub seq: u64,
    pub ts: u64,
    pub kind: String,
    pub data: String,
}

/// The outbox's size and what its cap dropped. Every outbox write (`OutboxAppend`, a
/// `SetRead`'s `message.read`) that takes the outbox past the backend's cap (`outbox_max`)
/// deletes the oldest events first (the newest are the most useful to a business catching
/// up) and counts them: events are at-least-once while within the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutboxStats {
    /// Events held now (gauge).
    pub events: u64,
    /// Events the cap has dropped, in total since the store was created (counter).
    pub dropped: u64,
}

/// A group's description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    pub id: String,
    pub name: String,
    pub owner: String,
    pub created_ms: u64,
    pub member_count: u64,
    pub seq: u64,
}

/// The answer to each op (see [`Op`] for which goes with which).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Appended(Appended),
    GroupAppended(GroupAppended),
    Page(Page),
    Synced(Synced),
    Heads(Heads),
    Position { prev: u64, seq: u64 },
    Delivered(Heads),
    Read(ReadMoved),
    Unread(BTreeMap<String, u64>),
    OutboxAppended { first: u64, last: u64 },
    Events(Vec<Event>),
    OutboxStats(OutboxStats),
    GroupCreated { id: String },
    Group(GroupInfo),
    Members { members: Vec<String>, next_cursor: Option<String> },
    Groups(Vec<String>),
    Reads { read: u64, members: u64 },
    Purged { messages: u64, more: bool },
    Count(u64),
    Revocations(Vec<Revocation>),
    Done,
}

/// Terminal tokens of `user` issued before `before_ms` (Unix ms) are no longer accepted: on
/// `device`, or on every device when it is `None` (see [`Op::RevokeTokens`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    pub user: String,
    pub device: Option<String>,
    pub before_ms: u64,
}

macro_rules! reply_as {
    ($name:ident, $variant:ident, $t:ty) => {
        /// The payload, or `Internal` if the reply is of another kind.
        pub fn $name(self) -> Result<$t, crate::StoreError> {
            match self {
                Reply::$variant(v) => Ok(v),
                other => Err(crate::StoreError::Internal(format!("unexpected reply {other:?}"))),
            }
        }
    };
}

impl Reply {
    reply_as!(appended, Appended, Appended);
    reply_as!(group_appended, GroupAppended, GroupAppended);
    reply_as!(page, Page, Page);
    reply_as!(synced, Synced, Synced);
    reply_as!(heads, Heads, Heads);
    reply_as!(delivered, Delivered, Heads);
    reply_as!(read, Read, ReadMoved);
    reply_as!(unread, Unread, BTreeMap<String, u64>);
    reply_as!(events, Events, Vec<Event>);
    reply_as!(outbox_stats, OutboxStats, OutboxStats);
    reply_as!(group, Group, GroupInfo);
    reply_as!(groups, Groups, Vec<String>);
    reply_as!(count, Count, u64);
    reply_as!(revocations, Revocations, Vec<Revocation>);
}

/// A user (or group) id field every backend checks the same way (`Invalid` otherwise).
pub(crate) fn check_user(field: &str, s: &str) -> Result<(), StoreError> {
    if is_valid_id(s) {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!("{field}: not a valid id")))
    }
}

/// A new message's id, body and cid, checked the same way by every backend.
pub(crate) fn check_body(id: u64, body: &str, cid: &Option<String>) -> Result<(), StoreError> {
    if id == 0 || id > i64::MAX as u64 {
        return Err(StoreError::Invalid("id: must be 1..=i64::MAX".into()));
    }
    if body.len() > BODY_BYTES_MAX {
        return Err(StoreError::Invalid(format!("body: at most {BODY_BYTES_MAX} bytes")));
    }
    if let Some(c) = cid {
        if c.is_empty() || c.len() > CID_BYTES_MAX {
            return Err(StoreError::Invalid(format!("cid: 1-{CID_BYTES_MAX} bytes")));
        }
    }
    Ok(())
}
