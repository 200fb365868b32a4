//! `EventBatch`: a shard's events on their way to the durable outbox. Events the shard makes
//! (`message.delivered`, `message.unreached`, `user.online`/`offline`) gather here for
//! `events.batch_wait_ms` and go to the storage thread as one `OutboxAppend` command, so an
//! outbox write (an SQLite insert loop, or one Redis function call in cluster mode) carries
//! many events instead of one per acked message.
//!
//! Owns the pending events and the flush signal; never touches sessions or the store (the
//! shard submits what [`EventBatch::take`] hands it, at most [`EVENTS_PER_WRITE_MAX`] events a
//! write, in order). Order is kept: events leave in the
//! order they were added, and the shard takes whatever is pending before it submits a command
//! that writes an event itself (`SetRead`), so the outbox never has a read before the
//! deliveries made earlier on the same shard.
//!
//! Nothing is dropped for a failed write: events the store could not take (its queue full, a
//! full disk, Redis away) come back through [`EventBatch::requeue`], ahead of newer ones, and
//! the batch holds them for a backoff (100 ms doubling to 5 s) before the next try. Only past
//! `limits.events_pending_max` pending events are the oldest dropped, counted and logged by
//! the shard: memory stays bounded through a long store outage.
use std::cell::{Cell, RefCell};
use std::time::{Duration, Instant};

use ether_store::NewEvent;
use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};

/// Most events in one outbox write; a batch this full is written at once, without waiting.
pub const EVENTS_PER_WRITE_MAX: usize = 512;
/// The first wait before writing events again after a failed write.
pub const RETRY_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The longest wait between tries (the backoff doubles up to it).
pub const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A failure this long after the previous one starts the backoff again from the minimum.
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(30);

/// What [`EventBatch::add`] asks of the shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddOutcome {
    /// Held; the flush task was signalled (or already had been) and writes it later.
    Held,
    /// Write what is pending now ([`EventBatch::take`]): the batch is full or waiting is off.
    WriteNow,
}

/// The pending events of one shard.
pub struct EventBatch {
    pending: RefCell<Vec<NewEvent>>,
    /// The flush task has been signalled and has not taken the batch yet.
    signalled: Cell<bool>,
    wait_enabled: bool,
    signal: LocalSender<()>,
    /// `limits.events_pending_max`: beyond it the oldest pending events are dropped.
    pending_max: usize,
    /// After a failed write: no write before this.
    hold_until: Cell<Option<Instant>>,
    /// The current backoff and when the last failure came.
    backoff: Cell<Duration>,
    last_failure: Cell<Option<Instant>>,
    /// Events written again after a failure, and dropped past `pending_max`, since start.
    retried: Cell<u64>,
    dropped: Cell<u64>,
}

impl EventBatch {
    /// A batch and the receiver its flush task waits on (see [`EventBatch::flushed`]).
    /// `wait_enabled` false: every add is written at once (`events.batch_wait_ms` = 0).
    /// `pending_max`: most events held (`limits.events_pending_max`).
    pub fn new(wait_enabled: bool, pending_max: usize) -> (EventBatch, LocalReceiver<()>) {
        debug_assert!(pending_max > 0);
        let (signal, rx) = local_channel::new_bounded(1);
        let batch = EventBatch {
            pending: RefCell::new(Vec::new()),
            signalled: Cell::new(false),
            wait_enabled,
            signal,
            pending_max: pending_max.max(1),
            hold_until: Cell::new(None),
            backoff: Cell::new(Duration::ZERO),
            last_failure: Cell::new(None),
            retried: Cell::new(0),
            dropped: Cell::new(0),
        };
        (batch, rx)
    }

    /// Adds events in order.
    pub fn add(&self, events: impl IntoIterator<Item = NewEvent>) -> AddOutcome {
        let mut pending = self.pending.borrow_mut();
        pending.extend(events);
        // No clock read unless a failed write set a hold (an add per acked message).
        let held = self.hold_until.get().is_some_and(|t| t > Instant::now());
        // Written at once when a write could not hold more, or the bound is reached: the bound
        // is for while writes fail (a healthy store drops nothing, even with a bound below a
        // full write, or a burst bigger than it in one add).
        let full = pending.len() >= EVENTS_PER_WRITE_MAX.min(self.pending_max);
        if !held && (!self.wait_enabled || full) {
            return AddOutcome::WriteNow;
        }
        self.bound(&mut pending);
        drop(pending);
        self.signal_flush();
        AddOutcome::Held
    }

    /// Events a write failed to store: back ahead of everything added since (they are older),
    /// held for the backoff before the next try. Returns how many were dropped to stay within
    /// `pending_max` (the oldest go first).
    pub fn requeue(&self, failed: &[NewEvent], now: Instant) -> usize {
        let mut pending = self.pending.borrow_mut();
        let newer = std::mem::take(&mut *pending);
        pending.extend_from_slice(failed);
        pending.extend(newer);
        let dropped = self.bound(&mut pending);
        drop(pending);
        self.retried.set(self.retried.get() + (failed.len() - dropped.min(failed.len())) as u64);
        let fresh = self.last_failure.get().is_none_or(|t| now.duration_since(t) > BACKOFF_RESET_AFTER);
        let backoff = if fresh {
            RETRY_BACKOFF_MIN
        } else {
            (self.backoff.get() * 2).clamp(RETRY_BACKOFF_MIN, RETRY_BACKOFF_MAX)
        };
        self.backoff.set(backoff);
        self.last_failure.set(Some(now));
        self.hold_until.set(Some(now + backoff));
        self.signal_flush();
        dropped
    }

    /// How long writes are still held after a failure, if they are.
    pub fn holding(&self, now: Instant) -> Option<Duration> {
        self.hold_until.get().and_then(|t| t.checked_duration_since(now)).filter(|d| !d.is_zero())
    }

    /// Lifts the hold (the shard's last write at stop).
    pub fn release(&self) {
        self.hold_until.set(None);
    }

    /// The oldest pending events, at most [`EVENTS_PER_WRITE_MAX`] of them: one outbox write
    /// (empty when nothing is pending). The caller takes again while [`EventBatch::len`] is not
    /// zero: after a store outage the batch can hold up to `limits.events_pending_max`, and one
    /// write of all of them would hold the storage thread (or Redis, one function call) for as
    /// long as it takes.
    pub fn take(&self) -> Vec<NewEvent> {
        self.signalled.set(false);
        let mut pending = self.pending.borrow_mut();
        if pending.len() <= EVENTS_PER_WRITE_MAX {
            return std::mem::take(&mut *pending);
        }
        let rest = pending.split_off(EVENTS_PER_WRITE_MAX);
        std::mem::replace(&mut *pending, rest)
    }

    /// Events written again after a failed write, since start.
    pub fn retried(&self) -> u64 {
        self.retried.get()
    }

    /// Events dropped past `pending_max`, since start.
    pub fn dropped(&self) -> u64 {
        self.dropped.get()
    }

    /// Drops the oldest events beyond `pending_max`; how many.
    fn bound(&self, pending: &mut Vec<NewEvent>) -> usize {
        let over = pending.len().saturating_sub(self.pending_max);
        if over > 0 {
            pending.drain(..over);
            self.dropped.set(self.dropped.get() + over as u64);
        }
        over
    }

    fn signal_flush(&self) {
        if !self.pending.borrow().is_empty() && !self.signalled.replace(true) {
            // Capacity 1 and `signalled` guard it: the channel is empty here, unless the
            // receiver is gone (the shard is stopping; its last take writes the rest).
            let _ = self.signal.try_send(());
        }
    }

    /// Events pending now.
    pub fn len(&self) -> usize {
        self.pending.borrow().len()
    }

    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.pending.borrow().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(i: u64) -> NewEvent {
        NewEvent { kind: "message.delivered".into(), data: format!("{{\"id\":\"{i}\"}}"), ts: i }
    }

    #[test]
    fn events_leave_in_order_once() {
        glommio::LocalExecutorBuilder::default()
            .spawn(|| async {
                let (batch, rx) = EventBatch::new(true, 100_000);
                assert_eq!(batch.add([ev(1), ev(2)]), AddOutcome::Held);
                assert_eq!(batch.add([ev(3)]), AddOutcome::Held);
                // One signal for the whole batch.
                assert_eq!(batch.signal.len(), 1);
                assert_eq!(rx.recv().await, Some(()));
                assert_eq!(batch.signal.len(), 0);
                let got: Vec<u64> = batch.take().iter().map(|e| e.ts).collect();
                assert_eq!(got, [1, 2, 3]);
                assert!(batch.take().is_empty());
                // Taken: the next add signals again.
                assert_eq!(batch.add([ev(4)]), AddOutcome::Held);
                assert_eq!(rx.recv().await, Some(()));
                assert_eq!(batch.take().len(), 1);
            })
            .unwrap()
            .join()
            .unwrap();
    }

    /// A bound below a full write (or a burst past it in one add) drops nothing while the
    /// store takes writes: the batch is written at once instead.
    #[test]
    fn the_bound_drops_nothing_while_writes_succeed() {
        glommio::LocalExecutorBuilder::default()
            .spawn(|| async {
                let (batch, _rx) = EventBatch::new(true, 64);
                for i in 0..63 {
                    assert_eq!(batch.add([ev(i)]), AddOutcome::Held);
                }
                assert_eq!(batch.add([ev(63)]), AddOutcome::WriteNow, "the bound is a full batch");
                assert_eq!(batch.take().len(), 64);
                assert_eq!(batch.add((0..100).map(ev)), AddOutcome::WriteNow);
                assert_eq!(batch.take().len(), 100, "a burst bigger than the bound is written whole");
                assert_eq!(batch.dropped(), 0);
            })
            .unwrap()
            .join()
            .unwrap();
    }

    /// What piled up through an outage leaves in writes of at most `EVENTS_PER_WRITE_MAX`,
    /// oldest first, nothing lost or repeated.
    #[test]
    fn a_backlog_leaves_in_bounded_writes_in_order() {
        glommio::LocalExecutorBuilder::default()
            .spawn(|| async {
                let (batch, _rx) = EventBatch::new(true, 100_000);
                let failed: Vec<NewEvent> = (0..1_800).map(ev).collect();
                batch.requeue(&failed, Instant::now());
                assert_eq!(batch.add((1_800..2_000).map(ev)), AddOutcome::Held, "held for the backoff");
                let mut sizes = Vec::new();
                let mut got = Vec::new();
                while !batch.is_empty() {
                    let write = batch.take();
                    sizes.push(write.len());
                    got.extend(write.iter().map(|e| e.ts));
                }
                assert_eq!(sizes, [512, 512, 512, 464]);
                assert_eq!(got, (0..2_000).collect::<Vec<u64>>());
                assert!(batch.take().is_empty());
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn a_full_batch_or_no_wait_is_written_now() {
        glommio::LocalExecutorBuilder::default()
            .spawn(|| async {
                let (batch, _rx) = EventBatch::new(true, 100_000);
                for i in 0..EVENTS_PER_WRITE_MAX as u64 - 1 {
                    assert_eq!(batch.add([ev(i)]), AddOutcome::Held);
                }
                assert_eq!(batch.add([ev(9_999)]), AddOutcome::WriteNow);
                assert_eq!(batch.take().len(), EVENTS_PER_WRITE_MAX);

                let (eager, _rx) = EventBatch::new(false, 100_000);
                assert_eq!(eager.add([ev(1)]), AddOutcome::WriteNow);
                assert_eq!(eager.len(), 1);
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn failed_events_come_back_first_and_wait_for_the_backoff() {
        glommio::LocalExecutorBuilder::default()
            .spawn(|| async {
                let (batch, _rx) = EventBatch::new(false, 5);
                assert_eq!(batch.add([ev(1), ev(2)]), AddOutcome::WriteNow);
                let failed = batch.take();
                assert_eq!(batch.add([ev(3)]), AddOutcome::WriteNow);
                let t0 = Instant::now();
                assert_eq!(batch.requeue(&failed, t0), 0);
                let order: Vec<u64> = batch.pending.borrow().iter().map(|e| e.ts).collect();
                assert_eq!(order, [1, 2, 3], "the failed ones are older: they go first");
                assert_eq!(batch.holding(t0), Some(RETRY_BACKOFF_MIN));
                // While held, even a no-wait batch is not written at once.
                assert_eq!(batch.add([ev(4)]), AddOutcome::Held);
                assert_eq!(batch.retried(), 2);

                // Failing again soon doubles the wait, up to the maximum.
                let again = batch.take();
                batch.requeue(&again, t0 + Duration::from_millis(150));
                assert_eq!(batch.holding(t0 + Duration::from_millis(150)), Some(RETRY_BACKOFF_MIN * 2));
                for i in 0..10 {
                    let e = batch.take();
                    batch.requeue(&e, t0 + Duration::from_secs(1 + i));
                }
                assert_eq!(batch.holding(t0 + Duration::from_secs(10)), Some(RETRY_BACKOFF_MAX));
                // A failure long after the last one starts from the minimum again.
                let e = batch.take();
                let later = t0 + Duration::from_secs(100);
                batch.requeue(&e, later);
                assert_eq!(batch.holding(later), Some(RETRY_BACKOFF_MIN));
                assert_eq!(batch.holding(later + RETRY_BACKOFF_MIN), None);

                // Bounded: past pending_max the oldest go, counted.
                assert_eq!(batch.dropped(), 0);
                batch.add([ev(5), ev(6)]);
                assert_eq!(batch.pending.borrow().len(), 5);
                assert_eq!(batch.dropped(), 1);
                let kept: Vec<u64> = batch.take().iter().map(|e| e.ts).collect();
                assert_eq!(kept, [2, 3, 4, 5, 6], "the oldest was dropped");
                batch.release();
                assert_eq!(batch.holding(later), None);
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
