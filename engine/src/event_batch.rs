//! `EventBatch`: a shard's events on their way to the durable outbox. Events the shard makes
//! (`message.delivered`, `message.unreached`, `user.online`/`offline`) gather here for
//! `events.batch_wait_ms` and go to the storage thread as one `OutboxAppend` command, so an
//! outbox write (an SQLite insert loop, or one Redis function call in cluster mode) carries
//! many events instead of one per acked message.
//!
//! Owns the pending events and the flush signal; never touches sessions or the store (the
//! shard submits what [`EventBatch::take`] hands it). Order is kept: events leave in the
//! order they were added, and the shard takes whatever is pending before it submits a command
//! that writes an event itself (`SetRead`), so the outbox never has a read before the
//! deliveries made earlier on the same shard.
use std::cell::{Cell, RefCell};

use ether_store::NewEvent;
use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};

/// Most events in one outbox write; a batch this full is written at once, without waiting.
pub const EVENTS_PER_WRITE_MAX: usize = 512;

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
}

impl EventBatch {
    /// A batch and the receiver its flush task waits on (see [`EventBatch::flushed`]).
    /// `wait_enabled` false: every add is written at once (`events.batch_wait_ms` = 0).
    pub fn new(wait_enabled: bool) -> (EventBatch, LocalReceiver<()>) {
        let (signal, rx) = local_channel::new_bounded(1);
        (EventBatch { pending: RefCell::new(Vec::new()), signalled: Cell::new(false), wait_enabled, signal }, rx)
    }

    /// Adds events in order.
    pub fn add(&self, events: impl IntoIterator<Item = NewEvent>) -> AddOutcome {
        let mut pending = self.pending.borrow_mut();
        pending.extend(events);
        if !self.wait_enabled || pending.len() >= EVENTS_PER_WRITE_MAX {
            return AddOutcome::WriteNow;
        }
        if !pending.is_empty() && !self.signalled.replace(true) {
            // Capacity 1 and `signalled` guard it: the channel is empty here, unless the
            // receiver is gone (the shard is stopping; its last take writes the rest).
            let _ = self.signal.try_send(());
        }
        AddOutcome::Held
    }

    /// Everything pending, oldest first (empty when nothing is).
    pub fn take(&self) -> Vec<NewEvent> {
        self.signalled.set(false);
        std::mem::take(&mut *self.pending.borrow_mut())
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
                let (batch, rx) = EventBatch::new(true);
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

    #[test]
    fn a_full_batch_or_no_wait_is_written_now() {
        glommio::LocalExecutorBuilder::default()
            .spawn(|| async {
                let (batch, _rx) = EventBatch::new(true);
                for i in 0..EVENTS_PER_WRITE_MAX as u64 - 1 {
                    assert_eq!(batch.add([ev(i)]), AddOutcome::Held);
                }
                assert_eq!(batch.add([ev(9_999)]), AddOutcome::WriteNow);
                assert_eq!(batch.take().len(), EVENTS_PER_WRITE_MAX);

                let (eager, _rx) = EventBatch::new(false);
                assert_eq!(eager.add([ev(1)]), AddOutcome::WriteNow);
                assert_eq!(eager.len(), 1);
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
