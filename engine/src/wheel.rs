//! One hashed timer wheel per shard for per-connection deadlines (idle timeout), instead of a
//! timer per connection. Holds keys only; the shard decides what a due key means.
//!
//! The wheel is lazy: a connection's activity does not touch it. When a key comes due the shard
//! checks the connection's last activity and either closes it or schedules it again.

/// A wheel of `slots` buckets, one per tick.
#[derive(Debug)]
pub struct TimerWheel<K> {
    slots: Vec<Vec<K>>,
    /// The last tick `advance` processed.
    tick: u64,
    len: usize,
}

impl<K: Copy> TimerWheel<K> {
    /// A wheel that can hold deadlines up to `slots - 1` ticks ahead (further ones are parked at
    /// the far end and come due early, to be scheduled again).
    pub fn new(slots: usize, now_tick: u64) -> Self {
        assert!(slots >= 2, "a wheel needs at least two slots");
        TimerWheel { slots: (0..slots).map(|_| Vec::new()).collect(), tick: now_tick, len: 0 }
    }

    /// Keys waiting in the wheel.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Schedules `key` to come due at `due_tick` (at the next tick if that is already past).
    pub fn schedule(&mut self, key: K, due_tick: u64) {
        let span = self.slots.len() as u64 - 1;
        let due = due_tick.clamp(self.tick + 1, self.tick + span);
        let idx = (due % self.slots.len() as u64) as usize;
        self.slots[idx].push(key);
        self.len += 1;
    }

    /// Moves every key due at or before `now_tick` into `due`.
    pub fn advance(&mut self, now_tick: u64, due: &mut Vec<K>) {
        let n = self.slots.len() as u64;
        // After a long stall every slot is due once: no need to walk more than the wheel.
        let first = (self.tick + 1).max(now_tick.saturating_sub(n - 1));
        for t in first..=now_tick {
            let slot = &mut self.slots[(t % n) as usize];
            self.len -= slot.len();
            due.append(slot);
        }
        self.tick = self.tick.max(now_tick);
        debug_assert_eq!(self.len, self.slots.iter().map(Vec::len).sum::<usize>());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn keys_come_due_at_their_tick() {
        let mut w = TimerWheel::new(8, 0);
        w.schedule(1u32, 3);
        w.schedule(2, 5);
        w.schedule(3, 0); // past: next tick
        let mut due = Vec::new();
        w.advance(1, &mut due);
        assert_eq!(due, vec![3]);
        due.clear();
        w.advance(4, &mut due);
        assert_eq!(due, vec![1]);
        due.clear();
        w.advance(100, &mut due);
        assert_eq!(due, vec![2]);
        assert!(w.is_empty());
    }

    #[test]
    fn far_deadlines_come_due_early_never_late() {
        let mut w = TimerWheel::new(4, 10);
        w.schedule(7u32, 1000);
        let mut due = Vec::new();
        w.advance(12, &mut due);
        assert!(due.is_empty());
        w.advance(13, &mut due);
        assert_eq!(due, vec![7]);
    }

    proptest! {
        /// Every key comes due exactly once, never before its tick unless its tick lies beyond
        /// the wheel, and never after it.
        #[test]
        fn every_key_due_exactly_once(deadlines in proptest::collection::vec(0u64..200, 1..200), step in 1u64..7) {
            let slots = 64u64;
            let mut w = TimerWheel::new(slots as usize, 0);
            for (k, d) in deadlines.iter().enumerate() {
                w.schedule(k, *d);
            }
            let mut seen = vec![0u32; deadlines.len()];
            let mut now = 0;
            while now < 400 {
                now += step;
                let mut due = Vec::new();
                w.advance(now, &mut due);
                for k in due {
                    seen[k] += 1;
                    let want = deadlines[k].max(1).min(slots - 1);
                    prop_assert!(now >= want, "key {} due at {} came at {}", k, want, now);
                    prop_assert!(now < want + step, "key {} due at {} came late at {}", k, want, now);
                }
            }
            prop_assert!(seen.iter().all(|&s| s == 1));
            prop_assert!(w.is_empty());
        }
    }
}
