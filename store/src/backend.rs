//! The `StoreBackend` trait: what a storage engine must do. Used only on the storage thread.
use crate::op::{Op, Reply};
use crate::StoreError;

/// What a backend reports about itself (for the admin port's `storage` stats).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendStats {
    /// Index entries (inbox/group positions, cids) held in memory, not yet in their tables.
    pub pending_entries: u64,
    /// Streams (inboxes, group logs) with entries waiting to be written to their tables.
    pub pending_streams: u64,
}

/// A durable store for messages, positions, groups and the event outbox.
///
/// Owned by one thread (the storage thread), which hands it batches in submission order.
/// Implemented by [`crate::SqliteBackend`]; a cluster backend (Redis) must pass the same
/// [`crate::conformance`] suite.
pub trait StoreBackend: Send + 'static {
    /// Applies `ops` in order inside one transaction and returns one result per op, in order.
    ///
    /// An op that fails (`NotFound`, `Forbidden`, even `Unavailable`) does not change the
    /// others' outcome: its own effects are undone, the rest commit. A database failure that
    /// takes the whole transaction down is reported as `Unavailable` on every write it hit.
    fn apply_batch(&mut self, ops: &[Op]) -> Vec<Result<Reply, StoreError>>;

    /// One bounded step of background work (index writes, compaction); `now_ms` is
    /// [`clock_ms`] (`u64::MAX`: everything is due). Returns whether more work is waiting.
    /// Never required for correctness of reads.
    fn maintain(&mut self, now_ms: u64) -> Result<bool, StoreError>;

    /// A cheap snapshot of the backend's own state.
    fn stats(&self) -> BackendStats {
        BackendStats::default()
    }

    /// One op in its own batch.
    fn apply(&mut self, op: Op) -> Result<Reply, StoreError> {
        let mut r = self.apply_batch(std::slice::from_ref(&op));
        r.pop().unwrap_or_else(|| Err(StoreError::Unavailable("backend returned no result".into())))
    }
}

/// Milliseconds on the store's own monotonic clock (since its first reading in this process),
/// for the ages of background work: a wall clock set back (NTP step, a VM resumed) made
/// pending index positions look young, and their writes, the watermark and the retention
/// purge stalled until it caught up.
pub fn clock_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed().as_millis() as u64
}
