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
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

/// The bits of `shards` shards, one per shard (shard ids are below `message::SHARDS_MAX`).
fn bit(shard: usize) -> u64 {
    debug_assert!(shard < 64, "a shard bit per shard, at most 64 shards");
    1 << shard
}

/// Shards wanting each group's messages. See the module docs.
#[derive(Debug, Default)]
pub struct GroupShards {
    /// Bit `s`: shard `s` is taking on terminals (or was, until its next tick).
    adopting: AtomicU64,
    /// Group → bits of the shards with an online member of it. No entry: none anywhere.
    groups: RwLock<HashMap<Arc<str>, u64, foldhash::fast::RandomState>>,
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

    /// Shard `shard` has no online member of `group` any more.
    pub fn leave(&self, group: &str, shard: usize) {
        let mut groups = self.groups.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(bits) = groups.get_mut(group) {
            *bits &= !bit(shard);
            if *bits == 0 {
                groups.remove(group);
            }
        }
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
    fn shards_in_lists_every_set_bit_once_in_order() {
        assert_eq!(shards_in(0).count(), 0);
        assert_eq!(shards_in(0b1010_0001).collect::<Vec<_>>(), [0, 5, 7]);
        assert_eq!(shards_in(1 << 63).collect::<Vec<_>>(), [63]);
        assert_eq!(shards_in(u64::MAX).count(), 64);
    }
}
