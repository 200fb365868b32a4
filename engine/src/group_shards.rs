//! Which shards a committed group message goes to: those with an online member of the group in
//! their fan-out index, and those taking on a terminal (its groups are not known until the
//! store read its heads, so such a shard sees every group's messages meanwhile). Shards set and
//! clear their own bit; whoever queues a committed group message (the storage thread, the
//! cluster bus) reads the bits, so a message of a small group crosses to the shards that have
//! its members, not to every shard. Owns no shard state; holds no session.
//!
//! Why nothing is missed: a shard sets its taking-on bit before it asks the store for a
//! terminal's heads, and sets a group's bit (joining the terminal to the group's fan-out)
//! before it clears the taking-on bit (at its next tick, not at once). A message committed
//! before the heads were read is within them; one committed after is queued to the shard, whose
//! bit the storage thread sees set (the heads read ran on that thread before the commit).
//!
//! In cluster mode a member added on another node reaches this node as a membership change on
//! the bus, followed there by what was posted after it: the bus reader sets the member's home
//! shard's bit before it queues the change (`expect_join`), so the messages it queues next go
//! there too, and the shard settles the bit once it handled the change (`join_handled`: kept
//! only if a member of the group is online there). Until then the last member there leaving
//! does not clear it either. The reader also notes where the group stood when the members
//! joined (the store's join head), which `join_handled` hands back: a shard that had no member
//! of the group starts its pushes right after it (filling from the store what the bus brings
//! late), not at whichever of the group's messages happens to come first.
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

/// The bits of `shards` shards, one per shard (shard ids are below `message::SHARDS_MAX`).
fn bit(shard: usize) -> u64 {
    debug_assert!(shard < 64, "a shard bit per shard, at most 64 shards");
    1 << shard
}

/// Group → a value, keyed by the group's id.
type ByGroup<V> = HashMap<Arc<str>, V, foldhash::fast::RandomState>;

/// The joins of a group on their way to each shard: the shard and, in the order queued, each
/// join's `joined_at` ([`GroupShards::expect_join`]).
type PendingJoins = Vec<(usize, VecDeque<Option<u64>>)>;

/// Shards wanting each group's messages. See the module docs.
#[derive(Debug, Default)]
pub struct GroupShards {
    /// Bit `s`: shard `s` is taking on terminals (or was, until its next tick).
    adopting: AtomicU64,
    /// Group → bits of the shards with an online member of it (or a join on its way: see the
    /// module docs). No entry: none anywhere.
    groups: RwLock<ByGroup<u64>>,
    /// Cluster mode: membership joins queued to a shard by the bus reader and not handled by
    /// it yet, per group. Changed with the `groups` lock held.
    joins_pending: Mutex<ByGroup<PendingJoins>>,
}

impl GroupShards {
    /// The shards to queue a committed message of `group` to, as bits.
    pub fn wanting(&self, group: &str) -> u64 {
        let adopting = self.adopting.load(Ordering::Acquire);
        let groups = self.groups.read().unwrap_or_else(PoisonError::into_inner);
        adopting | groups.get(group).copied().unwrap_or(0)
    }

    /// Shard `shard` has an online member of `group` now (its first).
    pub fn join(&self, group: &Arc<str>, shard: usize) {
        let mut groups = self.groups.write().unwrap_or_else(PoisonError::into_inner);
        *groups.entry(group.clone()).or_insert(0) |= bit(shard);
    }

    /// Shard `shard` has no online member of `group` any more (its bit stays while a join
    /// of the group is on its way to it).
    pub fn leave(&self, group: &str, shard: usize) {
        let mut groups = self.groups.write().unwrap_or_else(PoisonError::into_inner);
        if self.pending_joins(group, shard) == 0 {
            clear(&mut groups, group, shard);
        }
    }

    /// Joins of `group` on their way to shard `shard` ([`Self::expect_join`]).
    fn pending_joins(&self, group: &str, shard: usize) -> usize {
        let pending = self.joins_pending.lock().unwrap_or_else(PoisonError::into_inner);
        pending.get(group).and_then(|p| p.iter().find(|(s, _)| *s == shard)).map_or(0, |(_, heads)| heads.len())
    }

    /// Cluster mode: the bus reader is about to queue a membership join of `group` to shard
    /// `shard`: the group's messages it queues from now on go there too, until the shard
    /// handled the join ([`Self::join_handled`]). `joined_at`: the group's head when the
    /// members joined (the lowest, for several), if known: what the shard pushes them starts
    /// after it.
    pub fn expect_join(&self, group: &Arc<str>, shard: usize, joined_at: Option<u64>) {
        let mut groups = self.groups.write().unwrap_or_else(PoisonError::into_inner);
        let mut pending = self.joins_pending.lock().unwrap_or_else(PoisonError::into_inner);
        let list = pending.entry(group.clone()).or_default();
        match list.iter_mut().find(|(s, _)| *s == shard) {
            Some((_, heads)) => heads.push_back(joined_at),
            None => list.push((shard, VecDeque::from([joined_at]))),
        }
        *groups.entry(group.clone()).or_insert(0) |= bit(shard);
    }

    /// Shard `shard` handled a join [`Self::expect_join`] announced (the joins of a group reach
    /// a shard in the order announced); `has_members`: it has an online member of `group` now.
    /// Without one, and no other join on its way, its bit goes. Returns the join's `joined_at`.
    pub fn join_handled(&self, group: &str, shard: usize, has_members: bool) -> Option<u64> {
        let mut groups = self.groups.write().unwrap_or_else(PoisonError::into_inner);
        let (left, joined_at) = {
            let mut pending = self.joins_pending.lock().unwrap_or_else(PoisonError::into_inner);
            let list = pending.get_mut(group)?;
            let (_, heads) = list.iter_mut().find(|(s, _)| *s == shard)?;
            let joined_at = heads.pop_front().flatten();
            let left = heads.len();
            list.retain(|(_, heads)| !heads.is_empty());
            if list.is_empty() {
                pending.remove(group);
            }
            (left, joined_at)
        };
        if left == 0 && !has_members {
            clear(&mut groups, group, shard);
        }
        joined_at
    }

    /// Shard `shard` starts taking on terminals (`true`), or took on all it had and joined
    /// them to their groups' fan-out (`false`).
    pub fn set_adopting(&self, shard: usize, adopting: bool) {
        if adopting {
            self.adopting.fetch_or(bit(shard), Ordering::AcqRel);
        } else {
            self.adopting.fetch_and(!bit(shard), Ordering::AcqRel);
        }
    }

    /// Groups with an online member on some shard (for stats and tests).
    pub fn groups(&self) -> usize {
        self.groups.read().unwrap_or_else(PoisonError::into_inner).len()
    }
}

/// Clears shard `shard`'s bit of `group` (forgetting a group no shard wants).
fn clear(groups: &mut ByGroup<u64>, group: &str, shard: usize) {
    if let Some(bits) = groups.get_mut(group) {
        *bits &= !bit(shard);
        if *bits == 0 {
            groups.remove(group);
        }
    }
}

/// The shard ids in `bits`, lowest first.
pub fn shards_in(mut bits: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if bits == 0 {
            return None;
        }
        let s = bits.trailing_zeros() as usize;
        bits &= bits - 1;
        Some(s)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wanting(g: &GroupShards, group: &str) -> Vec<usize> {
        shards_in(g.wanting(group)).collect()
    }

    #[test]
    fn a_group_goes_to_the_shards_with_members_and_to_those_taking_on_terminals() {
        let g = GroupShards::default();
        let team: Arc<str> = Arc::from("team");
        assert!(wanting(&g, "team").is_empty(), "no member online anywhere: no shard");
        g.join(&team, 3);
        g.join(&team, 0);
        g.join(&team, 3);
        assert_eq!(wanting(&g, "team"), [0, 3]);
        assert!(wanting(&g, "other").is_empty());
        g.set_adopting(5, true);
        assert_eq!(wanting(&g, "team"), [0, 3, 5]);
        assert_eq!(wanting(&g, "other"), [5], "a shard taking on a terminal sees every group");
        g.set_adopting(5, false);
        g.leave(&team, 3);
        assert_eq!(wanting(&g, "team"), [0]);
        g.leave(&team, 0);
        g.leave(&team, 0);
        assert!(wanting(&g, "team").is_empty());
        assert_eq!(g.groups(), 0, "a group no shard has a member of is forgotten");
        g.leave("never", 1);
        assert_eq!(g.groups(), 0);
    }

    #[test]
    fn a_join_on_its_way_keeps_the_shard_wanting_the_group_until_handled() {
        let g = GroupShards::default();
        let team: Arc<str> = Arc::from("team");
        g.expect_join(&team, 2, None);
        assert_eq!(wanting(&g, "team"), [2], "messages after the join go to its shard");
        // The shard's last member of the group leaves meanwhile: the join still comes.
        g.join(&team, 2);
        g.leave("team", 2);
        assert_eq!(wanting(&g, "team"), [2]);
        // Handled, the user not online there: the bit goes.
        g.join_handled("team", 2, false);
        assert!(wanting(&g, "team").is_empty());
        assert_eq!(g.groups(), 0);
        // Two joins on their way; the first handled without a member, the second with one.
        g.expect_join(&team, 1, None);
        g.expect_join(&team, 1, None);
        g.join_handled("team", 1, false);
        assert_eq!(wanting(&g, "team"), [1], "another join is still on its way");
        g.join(&team, 1);
        g.join_handled("team", 1, true);
        assert_eq!(wanting(&g, "team"), [1]);
        g.join_handled("team", 1, false); // none announced: changes nothing
        assert_eq!(wanting(&g, "team"), [1]);
        g.leave("team", 1);
        assert!(wanting(&g, "team").is_empty());
    }

    #[test]
    fn each_join_handled_hands_back_where_its_members_joined_in_the_order_announced() {
        let g = GroupShards::default();
        let team: Arc<str> = Arc::from("team");
        g.expect_join(&team, 1, Some(4));
        g.expect_join(&team, 1, None);
        g.expect_join(&team, 1, Some(9));
        g.expect_join(&team, 2, Some(5));
        assert_eq!(g.join_handled("team", 1, true), Some(4));
        assert_eq!(g.join_handled("team", 2, true), Some(5));
        assert_eq!(g.join_handled("team", 1, true), None, "not known for that one");
        assert_eq!(g.join_handled("team", 1, true), Some(9));
        assert_eq!(g.join_handled("team", 1, true), None, "none announced");
        assert_eq!(wanting(&g, "team"), [1, 2]);
    }

    #[test]
    fn shards_in_lists_every_set_bit_once_in_order() {
        assert_eq!(shards_in(0).count(), 0);
        assert_eq!(shards_in(0b1010_0001).collect::<Vec<_>>(), [0, 5, 7]);
        assert_eq!(shards_in(1 << 63).collect::<Vec<_>>(), [63]);
        assert_eq!(shards_in(u64::MAX).count(), 64);
    }
}
