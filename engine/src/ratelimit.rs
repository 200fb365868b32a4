//! Rate limits: a sustained rate with a burst allowance, kept as one timestamp per limited
//! thing (GCRA, the generic cell rate algorithm: the "theoretical arrival time" of the next
//! request). A terminal carries one per limit in its `Session` (8 bytes each); the node one for
//! the API, shared by its shards ([`SharedGate`]). Pure arithmetic on a caller-given clock
//! (the shared gate's own, for its callers on every shard): no I/O, no shard state.
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// A rate limit: `per_s` on average, up to `burst` at once after a quiet spell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Time one request uses up, µs.
    interval_us: u64,
    /// How far ahead of the clock the schedule may run: `(burst - 1)` intervals, µs.
    tolerance_us: u64,
}

impl Rate {
    /// `None` (no limit) when `per_s` is 0.
    pub fn new(per_s: u32, burst: u32) -> Option<Rate> {
        if per_s == 0 {
            return None;
        }
        let interval_us = (1_000_000 / u64::from(per_s)).max(1);
        Some(Rate { interval_us, tolerance_us: interval_us * u64::from(burst.max(1) - 1) })
    }

    /// How long until one more request would be allowed, after a refusal at `now_us`.
    pub fn retry_after_us(&self, gate: &Gate, now_us: u64) -> u64 {
        gate.tat_us.get().saturating_sub(now_us + self.tolerance_us)
    }
}

/// One limited thing's state: when its next request is due on the schedule, µs of the
/// caller's clock.
#[derive(Debug, Default)]
pub struct Gate {
    tat_us: Cell<u64>,
}

impl Gate {
    /// Takes one request at `now_us` if the rate allows it; a refused one uses up nothing.
    pub fn allow(&self, rate: &Rate, now_us: u64) -> bool {
        let tat = self.tat_us.get().max(now_us);
        if tat - now_us > rate.tolerance_us {
            return false;
        }
        self.tat_us.set(tat + rate.interval_us);
        true
    }
}

/// A [`Gate`] that every shard of the node takes from at once (the node-wide API limit):
/// the schedule in an atomic, on a clock of its own. One limit for the node, wherever its
/// API connections landed: shares per shard would let `shards` times the rate through when
/// it is below the shard count, and a node whose API connections sit on one shard only that
/// shard's share.
#[derive(Debug)]
pub struct SharedGate {
    epoch: Instant,
    tat_us: AtomicU64,
}

impl Default for SharedGate {
    fn default() -> Self {
        SharedGate { epoch: Instant::now(), tat_us: AtomicU64::new(0) }
    }
}

impl SharedGate {
    /// Takes one request now if `rate` allows it; otherwise how long until one more would be
    /// allowed, µs. A refused one uses up nothing.
    pub fn allow(&self, rate: &Rate) -> Result<(), u64> {
        let now_us = u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.allow_at(rate, now_us)
    }

    /// [`SharedGate::allow`] at `now_us` of the gate's clock.
    pub fn allow_at(&self, rate: &Rate, now_us: u64) -> Result<(), u64> {
        let mut seen = self.tat_us.load(Ordering::Acquire);
        loop {
            let tat = seen.max(now_us);
            if tat - now_us > rate.tolerance_us {
                return Err(tat - (now_us + rate.tolerance_us));
            }
            match self.tat_us.compare_exchange_weak(seen, tat + rate.interval_us, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(()),
                Err(now_seen) => seen = now_seen,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: u64 = 1_000_000;

    #[test]
    fn zero_means_no_limit() {
        assert_eq!(Rate::new(0, 10), None);
    }

    #[test]
    fn a_burst_then_the_sustained_rate() {
        let rate = Rate::new(10, 5).unwrap();
        let gate = Gate::default();
        let t0 = 100 * S;
        let burst = (0..20).filter(|_| gate.allow(&rate, t0)).count();
        assert_eq!(burst, 5, "the burst at once, no more");
        assert!(rate.retry_after_us(&gate, t0) > 0);
        // Then one every 100 ms.
        assert!(!gate.allow(&rate, t0 + S / 20));
        assert!(gate.allow(&rate, t0 + S / 10));
        assert!(!gate.allow(&rate, t0 + S / 10));
        // After a quiet second the whole burst is back, and no more.
        let later = t0 + 3 * S;
        assert_eq!((0..20).filter(|_| gate.allow(&rate, later)).count(), 5);
    }

    /// Shards taking from one gate at once get the burst between them, not a burst each.
    #[test]
    fn a_shared_gate_lets_the_burst_through_once_across_threads() {
        let rate = Rate::new(10, 50).unwrap();
        let gate = std::sync::Arc::new(SharedGate::default());
        let t0 = 100 * S;
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let gate = gate.clone();
                std::thread::spawn(move || (0..1000).filter(|_| gate.allow_at(&rate, t0).is_ok()).count())
            })
            .collect();
        let allowed: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(allowed, 50);
        let wait = gate.allow_at(&rate, t0).unwrap_err();
        assert!(wait > 0 && wait <= 100_000, "one interval at most: {wait}");
        assert!(gate.allow_at(&rate, t0 + wait).is_ok(), "allowed once the wait is over");
    }

    proptest! {
        /// Over any stretch, no more than `burst + per_s × seconds` requests get through, and a
        /// caller that keeps to the rate is never refused.
        #[test]
        fn never_more_than_the_rate_allows(
            per_s in 1u32..2000,
            burst in 1u32..100,
            gaps in proptest::collection::vec(0u64..50_000, 1..400),
        ) {
            let rate = Rate::new(per_s, burst).unwrap();
            let gate = Gate::default();
            let start = 10 * S;
            let mut now = start;
            let mut allowed = 0u64;
            for g in &gaps {
                now += g;
                allowed += u64::from(gate.allow(&rate, now));
            }
            let interval = (S / u64::from(per_s)).max(1);
            let max = u64::from(burst) + (now - start) / interval + 1;
            prop_assert!(allowed <= max, "{allowed} > {max}");

            let polite = Gate::default();
            let mut t = start;
            for _ in 0..50 {
                prop_assert!(polite.allow(&rate, t));
                t += interval;
            }
        }
    }
}
