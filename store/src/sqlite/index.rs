//! The in-memory tail of the stream index: inbox and group-log positions (and sender cids)
//! not yet written to their tables. Owns no connection; `SqliteBackend` moves data in and out.
//!
//! A stream is an inbox (`2 * uid`) or a group log (`2 * gid + 1`). Its positions `1..=head`
//! are gap-free: `1..=flushed` live in the `entries` table in blocks of up to
//! [`BLOCK_ENTRIES`], `flushed+1..=head` live here. Everything here can be rebuilt from the
//! `messages` rows at or after the durable watermark (see the crate docs).
use std::collections::{BTreeMap, HashMap, VecDeque};

/// `HashMap` keyed by internal integers (uids, stream keys: never user-chosen strings), with
/// foldhash's fast fixed-seed hash instead of the standard library's SipHash.
pub type IdMap<K, V> = HashMap<K, V, foldhash::fast::FixedState>;

/// `HashMap` keyed by names (user and group ids, chosen by the business): foldhash seeded at
/// random per process, so a crafted set of names cannot all land in one bucket.
pub type NameMap<V> = HashMap<Box<str>, V, foldhash::fast::RandomState>;

/// Pending messages are counted per id bucket (`id >> 20`: one millisecond of engine ids), so
/// the map stays small and cache-resident; the watermark derived from it is conservative.
pub const BUCKET_SHIFT: u32 = 20;

/// Entries per block row. 48 × 16 bytes keeps a row inside one 4 KiB page (no overflow page).
pub const BLOCK_ENTRIES: usize = 48;
/// Bytes per encoded entry: message id and `aux`, both little-endian i64.
pub const ENTRY_BYTES: usize = 16;
/// Capacity an emptied pending list keeps (beyond it, it is freed once written out).
const RETAINED_MAX: usize = 8;

/// One stream position's content: the message and, for inboxes, `peer * 2 + outgoing`
/// (for group logs, `sender * 2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Item {
    pub id: i64,
    pub aux: i64,
}

/// The inbox stream key of a user.
pub fn inbox_stream(uid: i64) -> i64 {
    uid * 2
}

/// The log stream key of a group (also its chat key in read positions).
pub fn group_stream(gid: i64) -> i64 {
    gid * 2 + 1
}

pub fn encode_items(out: &mut Vec<u8>, items: &[Item]) {
    for it in items {
        out.extend_from_slice(&it.id.to_le_bytes());
        out.extend_from_slice(&it.aux.to_le_bytes());
    }
}

pub fn decode_items(data: &[u8]) -> impl DoubleEndedIterator<Item = Item> + ExactSizeIterator + '_ {
    data.chunks_exact(ENTRY_BYTES).map(|c| {
        let mut a = [0u8; 8];
        let mut b = [0u8; 8];
        a.copy_from_slice(&c[..8]);
        b.copy_from_slice(&c[8..]);
        Item { id: i64::from_le_bytes(a), aux: i64::from_le_bytes(b) }
    })
}

/// A stream's position in memory.
#[derive(Debug, Default)]
pub struct StreamState {
    /// Last position written to the `entries` table.
    pub flushed: u64,
    /// Positions `flushed + 1 ..`.
    pub pending: Vec<Item>,
    /// Sender cids `(hash, message id)` not yet in the `cids` table (inbox streams only).
    pub cids: Vec<(i64, i64)>,
    /// Whether the stream sits in the flush queue.
    pub queued: bool,
}

impl StreamState {
    pub fn head(&self) -> u64 {
        self.flushed + self.pending.len() as u64
    }

    pub fn is_clean(&self) -> bool {
        self.pending.is_empty() && self.cids.is_empty() && !self.queued
    }
}

/// A change to undo if the transaction that made it rolls back.
#[derive(Debug)]
pub enum Undo {
    /// Truncate the stream's pending lists back to these lengths.
    Stream {
        stream: i64,
        pending_len: usize,
        cids_len: usize,
    },
    /// Take one reference off a pending message.
    PendingMsg(i64),
    PendingCid {
        uid: i64,
        h: i64,
    },
    /// Forget a user created in the transaction.
    User {
        name: Box<str>,
        uid: i64,
    },
    /// Forget a group created (or dissolved) in the transaction.
    Group {
        name: Box<str>,
    },
    /// Restore the durable watermark.
    Watermark(i64),
}

/// The pending tail of every stream, and what is needed to write it out in order.
#[derive(Debug, Default)]
pub struct Index {
    pub streams: IdMap<i64, StreamState>,
    /// Streams with pending data, oldest first: `(stream, ms when it became pending)`.
    pub queue: VecDeque<(i64, u64)>,
    /// Id bucket → pending items that still refer to a message in it. `min_pending_id`
    /// bounds the watermark: every message below it is fully indexed in tables.
    pub pending_msgs: BTreeMap<i64, u32>,
    /// `(sender uid, cid hash)` → message id, for cids not yet in the `cids` table.
    pub pending_cids: IdMap<(i64, i64), i64>,
    /// Items plus cids held in memory.
    pub pending_total: usize,
}

impl Index {
    pub fn add_msg_ref(&mut self, id: i64, undo: &mut Vec<Undo>) {
        *self.pending_msgs.entry(id >> BUCKET_SHIFT).or_insert(0) += 1;
        undo.push(Undo::PendingMsg(id));
    }

    pub fn drop_msg_ref(&mut self, id: i64) {
        let b = id >> BUCKET_SHIFT;
        if let Some(n) = self.pending_msgs.get_mut(&b) {
            *n -= 1;
            if *n == 0 {
                self.pending_msgs.remove(&b);
            }
        }
    }

    /// At or below the id of every message with positions (or a cid) still in memory;
    /// `i64::MAX` when nothing is pending.
    pub fn min_pending_id(&self) -> i64 {
        self.pending_msgs.keys().next().map_or(i64::MAX, |b| b << BUCKET_SHIFT)
    }

    /// Pushes `item` at the stream's next position; returns that position.
    pub fn push_item(&mut self, stream: i64, item: Item, now_ms: u64, undo: &mut Vec<Undo>) -> u64 {
        let st = self.streams.entry(stream).or_default();
        undo.push(Undo::Stream { stream, pending_len: st.pending.len(), cids_len: st.cids.len() });
        st.pending.push(item);
        if !st.queued {
            st.queued = true;
            self.queue.push_back((stream, now_ms));
        }
        self.pending_total += 1;
        let seq = st.head();
        self.add_msg_ref(item.id, undo);
        seq
    }

    /// Records a sender's cid until it is written to the `cids` table.
    /// Call with the sender's inbox stream loaded (`SqliteBackend::ensure_stream`): a default
    /// state here would claim the inbox's head is 0.
    pub fn push_cid(&mut self, uid: i64, h: i64, id: i64, now_ms: u64, undo: &mut Vec<Undo>) {
        let stream = inbox_stream(uid);
        debug_assert!(self.streams.contains_key(&stream), "push_cid on an inbox stream not loaded");
        let st = self.streams.entry(stream).or_default();
        undo.push(Undo::Stream { stream, pending_len: st.pending.len(), cids_len: st.cids.len() });
        st.cids.push((h, id));
        if !st.queued {
            st.queued = true;
            self.queue.push_back((stream, now_ms));
        }
        self.pending_total += 1;
        self.pending_cids.insert((uid, h), id);
        undo.push(Undo::PendingCid { uid, h });
        self.add_msg_ref(id, undo);
    }

    /// Undoes one recorded change (call in reverse order).
    pub fn undo_one(&mut self, u: &Undo) {
        match u {
            Undo::Stream { stream, pending_len, cids_len } => {
                if let Some(st) = self.streams.get_mut(stream) {
                    let removed =
                        st.pending.len().saturating_sub(*pending_len) + st.cids.len().saturating_sub(*cids_len);
                    st.pending.truncate(*pending_len);
                    st.cids.truncate(*cids_len);
                    self.pending_total -= removed;
                }
            }
            Undo::PendingMsg(id) => self.drop_msg_ref(*id),
            Undo::PendingCid { uid, h } => {
                self.pending_cids.remove(&(*uid, *h));
            }
            Undo::User { .. } | Undo::Group { .. } | Undo::Watermark(_) => {}
        }
    }

    /// Marks a stream written up to `flushed_to`, dropping what was written from memory.
    /// `items`/`cids` are how many pending items/cids were written.
    pub fn mark_flushed(&mut self, stream: i64, items: usize, cids: usize) {
        let Some(st) = self.streams.get_mut(&stream) else {
            return;
        };
        let items = items.min(st.pending.len());
        let cids = cids.min(st.cids.len());
        let written: Vec<Item> = st.pending.drain(..items).collect();
        let written_cids: Vec<(i64, i64)> = st.cids.drain(..cids).collect();
        // A written-out stream gives its buffers back: a burst's capacity kept by every cached
        // stream (up to `cache_entries_max` of them) would add up to far more than what is
        // pending at any time.
        if st.pending.is_empty() && st.pending.capacity() > RETAINED_MAX {
            st.pending = Vec::new();
        }
        if st.cids.is_empty() && st.cids.capacity() > RETAINED_MAX {
            st.cids = Vec::new();
        }
        st.flushed += items as u64;
        let uid = stream / 2;
        self.pending_total -= items + cids;
        for it in written {
            self.drop_msg_ref(it.id);
        }
        for (h, id) in written_cids {
            self.pending_cids.remove(&(uid, h));
            self.drop_msg_ref(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_roundtrip() {
        let items = [Item { id: 1, aux: -3 }, Item { id: i64::MAX, aux: 7 }];
        let mut buf = Vec::new();
        encode_items(&mut buf, &items);
        assert_eq!(buf.len(), 2 * ENTRY_BYTES);
        assert_eq!(decode_items(&buf).collect::<Vec<_>>(), items);
        assert_eq!(decode_items(&buf).next_back(), Some(items[1]));
    }

    #[test]
    fn push_undo_flush() {
        let mut ix = Index::default();
        let mut undo = Vec::new();
        assert_eq!(ix.push_item(2, Item { id: 10, aux: 0 }, 0, &mut undo), 1);
        let mark = undo.len();
        assert_eq!(ix.push_item(2, Item { id: 11, aux: 0 }, 0, &mut undo), 2);
        for u in undo.drain(mark..).rev() {
            ix.undo_one(&u);
        }
        assert_eq!(ix.streams[&2].head(), 1);
        assert_eq!(ix.pending_msgs.len(), 1);
        ix.mark_flushed(2, 1, 0);
        assert_eq!(ix.streams[&2].head(), 1);
        assert_eq!(ix.streams[&2].flushed, 1);
        assert!(ix.pending_msgs.is_empty());
        assert_eq!(ix.pending_total, 0);
    }

    #[test]
    fn a_written_out_burst_gives_its_memory_back() {
        let mut ix = Index::default();
        let mut undo = Vec::new();
        ix.streams.insert(4, StreamState::default());
        for id in 1..=10_000 {
            ix.push_item(4, Item { id, aux: 0 }, 0, &mut undo);
            ix.push_cid(2, id, id, 0, &mut undo);
        }
        ix.mark_flushed(4, 10_000, 0);
        ix.mark_flushed(2 * 2, 0, 10_000);
        let st = &ix.streams[&4];
        assert_eq!((st.head(), st.pending.len(), st.cids.len()), (10_000, 0, 0));
        assert!(st.pending.capacity() <= RETAINED_MAX, "{}", st.pending.capacity());
        assert!(st.cids.capacity() <= RETAINED_MAX, "{}", st.cids.capacity());
        assert_eq!(ix.pending_total, 0);
        assert!(ix.pending_msgs.is_empty());
    }
}
