//! The WAL checkpointer: a thread with its own connection that copies the WAL back into the
//! database (PASSIVE: it never blocks the writer), so the storage thread rarely pays for it.
//! Under sustained writes it cannot make the WAL start over (see
//! `SqliteOptions::checkpoint_wal_bytes`): the writer's autocheckpoint, past that size, copies
//! what is left and lets the next commit start the WAL over.
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::Connection;

/// How often the checkpointer looks at the WAL.
const POLL: Duration = Duration::from_millis(20);

pub struct Checkpointer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Starts the thread; `None` (and the writer's own autocheckpoint does the work) if it
    /// cannot open its connection.
    pub fn start(db: &Path) -> Option<Self> {
        let conn = Connection::open(db).ok()?;
        conn.busy_timeout(Duration::from_millis(50)).ok()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("ether-store-ckpt".into())
            .spawn(move || {
                while !stop2.load(Ordering::Relaxed) {
                    std::thread::sleep(POLL);
                    // Cheap when there is nothing new; copies what the writer committed.
                    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                        tracing::debug!(error = %e, "checkpoint");
                    }
                }
            })
            .ok()?;
        Some(Checkpointer { stop, thread: Some(thread) })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
