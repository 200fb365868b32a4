//! The storage thread: a plain OS thread that alone owns a [`StoreBackend`], takes commands
//! from a lock-free queue bounded in commands and in bytes, applies them in batches (group
//! commit) and runs each command's completion once, after its batch commits, in submission
//! order (`Closed` if the thread ends first, by a stop or a backend panic). Touches no shard
//! state.
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, RecvTimeoutError, Sender, TryRecvError, TrySendError};

use crate::backend::StoreBackend;
use crate::op::{Op, Reply};
use crate::StoreError;

/// What runs when a command's batch has committed (or failed): on the storage thread, so it
/// must be quick (send to a shard's queue, complete a oneshot) and never block.
pub type Completion = Box<dyn FnOnce(Result<Reply, StoreError>) + Send + 'static>;

/// One command for the storage thread.
pub struct StoreCmd {
    pub op: Op,
    pub done: Completion,
}

impl StoreCmd {
    pub fn new(op: Op, done: impl FnOnce(Result<Reply, StoreError>) + Send + 'static) -> Self {
        StoreCmd { op, done: Box::new(done) }
    }
}

impl std::fmt::Debug for StoreCmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreCmd").field("op", &self.op).finish()
    }
}

/// How the storage thread batches and maintains.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Most commands per transaction.
    pub batch_ops_max: usize,
    /// How long a batch stays open for more commands after its first one arrived, at most (a
    /// busy queue fills it sooner; a tenth of it without a new command ends the wait). Zero:
    /// commit whatever is queued at once.
    pub batch_wait: Duration,
    /// A batch waits (`batch_wait`) only when the one before had at least this many commands:
    /// under light load every batch commits at once (no latency added), under heavy load
    /// batches grow (fewer transactions per message). 0: always wait.
    pub batch_wait_after_ops: usize,
    /// Commands queued at most; beyond it `submit` answers `Overloaded`.
    pub queue_capacity: usize,
    /// Payload bytes (bodies, ids, events: see [`payload_bytes`]) of the commands queued and
    /// being applied, at most; a command that would go past it answers `Overloaded` (one
    /// command is always taken when none is queued). `queue_capacity` alone let a slow disk
    /// queue 65,536 bodies of 64 KiB (4 GiB) before shedding anything.
    pub queue_bytes_max: usize,
    /// How often a retention purge step runs (steps repeat between batches while there is
    /// more to purge).
    pub purge_every: Duration,
    /// Most messages deleted per purge step (one short transaction).
    pub purge_rows: usize,
    /// Messages older than this are purged (`retention.days`).
    pub retention: Duration,
    /// How long the thread sleeps when idle before doing background work.
    pub idle_tick: Duration,
    /// Called on the storage thread when it has been idle for `idle_tick` (and then every
    /// `idle_tick` while it stays idle): the engine gives back freed memory there.
    pub on_idle: Option<fn()>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            batch_ops_max: 2048,
            batch_wait: Duration::from_millis(2),
            batch_wait_after_ops: 64,
            queue_capacity: 65_536,
            queue_bytes_max: QUEUE_BYTES_MAX_DEFAULT,
            purge_every: Duration::from_secs(10),
            purge_rows: 500,
            retention: Duration::from_secs(30 * 86_400),
            idle_tick: Duration::from_millis(50),
            on_idle: None,
        }
    }
}

impl StoreOptions {
    /// Tiny limits so that batching, overload and purge paths run in tests.
    pub fn test_min() -> Self {
        StoreOptions {
            batch_ops_max: 8,
            batch_wait: Duration::from_millis(1),
            batch_wait_after_ops: 0,
            queue_capacity: 64,
            purge_every: Duration::from_millis(10),
            purge_rows: 4,
            idle_tick: Duration::from_millis(5),
            ..StoreOptions::default()
        }
    }
}

/// Default of [`StoreOptions::queue_bytes_max`]: 256 MiB.
pub const QUEUE_BYTES_MAX_DEFAULT: usize = 256 << 20;
/// What a command counts for in [`StoreOptions::queue_bytes_max`] besides its payload.
const COMMAND_OVERHEAD_BYTES: usize = 256;

/// The bytes a command holds while queued, as [`StoreOptions::queue_bytes_max`] counts them:
/// the strings it carries (a message's body and ids, events, member lists) and a fixed
/// overhead.
pub fn payload_bytes(op: &Op) -> usize {
    let strs = |v: &[String]| v.iter().map(String::len).sum::<usize>();
    let payload = match op {
        Op::Append(m) => m.from.len() + m.to.len() + m.body.len() + m.cid.as_ref().map_or(0, String::len),
        Op::AppendGroup(m) => m.from.len() + m.group.len() + m.body.len() + m.cid.as_ref().map_or(0, String::len),
        Op::OutboxAppend { events } => events.iter().map(|e| e.kind.len() + e.data.len()).sum(),
        Op::CreateGroup { members, name, .. } => strs(members) + name.len(),
        Op::AddMembers { users, .. } => strs(users),
        Op::Sync { groups, .. } => groups.keys().map(String::len).sum(),
        _ => 0,
    };
    payload + COMMAND_OVERHEAD_BYTES
}

/// How often the storage thread reads the outbox's size and drop count into [`ThreadStats`]
/// (or every `purge_every`, if shorter).
pub const OUTBOX_STATS_EVERY: Duration = Duration::from_secs(1);
/// Drops by the outbox cap are logged at most this often, unless their total reached a new
/// power of two.
const OUTBOX_DROP_LOG_EVERY: Duration = Duration::from_secs(60);

/// Bucket bounds of the commit latency histogram, seconds.
pub const COMMIT_BOUNDS_S: &[f64] =
    &[0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Bucket bounds of the batch size histogram, operations.
pub const BATCH_BOUNDS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0];

/// A histogram any thread may read while the storage thread records: fixed bounds, one atomic
/// counter per bucket (the last is `+Inf`).
#[derive(Debug)]
pub struct AtomicHistogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    /// Sum of observations, in millionths of the unit.
    sum_micros: AtomicU64,
    max_micros: AtomicU64,
}

/// A reading of an [`AtomicHistogram`]: `cumulative[i]` counts observations `<= bounds[i]`.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramReading {
    pub bounds: Vec<f64>,
    pub cumulative: Vec<u64>,
    pub count: u64,
    pub sum: f64,
    pub max: f64,
}

impl AtomicHistogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        AtomicHistogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            max_micros: AtomicU64::new(0),
        }
    }

    pub fn record(&self, value: f64) {
        let i = self.bounds.iter().position(|b| value <= *b).unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let micros = (value.max(0.0) * 1e6) as u64;
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
        self.max_micros.fetch_max(micros, Ordering::Relaxed);
    }

    pub fn read(&self) -> HistogramReading {
        let mut running = 0;
        let mut cumulative = Vec::with_capacity(self.bounds.len());
        for b in &self.buckets[..self.bounds.len()] {
            running += b.load(Ordering::Relaxed);
            cumulative.push(running);
        }
        let count = running + self.buckets[self.bounds.len()].load(Ordering::Relaxed);
        HistogramReading {
            bounds: self.bounds.to_vec(),
            cumulative,
            count,
            sum: self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
            max: self.max_micros.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }
}

/// Counters the storage thread keeps (for the admin port's `storage` stats).
#[derive(Debug)]
pub struct ThreadStats {
    pub batches: AtomicU64,
    pub ops: AtomicU64,
    pub errors: AtomicU64,
    pub batch_ops_last: AtomicU64,
    pub purged: AtomicU64,
    pub pending_entries: AtomicU64,
    /// Gauge: events in the outbox (in cluster mode the shared one), read every
    /// [`OUTBOX_STATS_EVERY`] at most.
    pub outbox_events: AtomicU64,
    /// Counter: events the outbox's cap (`events.outbox_max`) dropped, oldest first, since the
    /// store was created; read with `outbox_events`.
    pub outbox_dropped: AtomicU64,
    /// Nanoseconds spent applying and committing the last batch.
    pub commit_ns_last: AtomicU64,
    /// Seconds spent applying and committing each batch.
    pub commit_latency: AtomicHistogram,
    /// Commands per batch.
    pub batch_size: AtomicHistogram,
    /// When a command last failed with [`StoreError::Unavailable`] (Unix ms; 0: never), and
    /// why: what [`StoreHandle::unavailable_within`] reports for readiness.
    pub unavailable_ms: AtomicU64,
    pub unavailable_why: Mutex<String>,
}

impl Default for ThreadStats {
    fn default() -> Self {
        ThreadStats {
            batches: AtomicU64::new(0),
            ops: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            batch_ops_last: AtomicU64::new(0),
            purged: AtomicU64::new(0),
            pending_entries: AtomicU64::new(0),
            outbox_events: AtomicU64::new(0),
            outbox_dropped: AtomicU64::new(0),
            commit_ns_last: AtomicU64::new(0),
            commit_latency: AtomicHistogram::new(COMMIT_BOUNDS_S),
            batch_size: AtomicHistogram::new(BATCH_BOUNDS),
            unavailable_ms: AtomicU64::new(0),
            unavailable_why: Mutex::new(String::new()),
        }
    }
}

struct Shared {
    stats: ThreadStats,
    thread: Mutex<Option<JoinHandle<()>>>,
    stopping: AtomicBool,
    /// [`payload_bytes`] of the commands queued or in the batch being applied.
    queued_bytes: AtomicUsize,
    queue_bytes_max: usize,
}

enum Msg {
    Cmd(Queued),
    Stop,
}

/// A command on its way through the thread.
struct Queued {
    op: Op,
    done: Once,
    /// Its share of [`Shared::queued_bytes`].
    bytes: usize,
}

/// A completion that runs exactly once: with the command's result, or with `Closed` when it
/// is dropped unrun, so that no caller waits forever. That happens when the backend panics
/// (the batch being applied and everything queued go with the thread), and when a command
/// slips into the queue between the thread's last look at it and its end.
struct Once(Option<Completion>);

impl Once {
    fn run(mut self, r: Result<Reply, StoreError>) {
        if let Some(done) = self.0.take() {
            // A panicking completion must not take the store down with it.
            if catch_unwind(AssertUnwindSafe(move || done(r))).is_err() {
                tracing::error!("store completion panicked");
            }
        }
    }

    /// Drops the completion unrun (the submitter answers the error itself).
    fn forget(mut self) {
        drop(self.0.take());
    }
}

impl Drop for Once {
    fn drop(&mut self) {
        if let Some(done) = self.0.take() {
            tracing::warn!("a store command ended unapplied (the storage thread stopped): answered closed");
            // Also while unwinding from a backend panic: a second panic must not escape here.
            if catch_unwind(AssertUnwindSafe(move || done(Err(StoreError::Closed)))).is_err() {
                tracing::error!("store completion panicked");
            }
        }
    }
}

/// Starts storage threads.
#[derive(Debug)]
pub struct StoreThread;

impl StoreThread {
    /// Moves `backend` onto a new OS thread named `ether-store` and returns the handle that
    /// feeds it. The thread stops when every handle is dropped or [`StoreHandle::shutdown`].
    pub fn spawn<B: StoreBackend>(backend: B, opts: StoreOptions) -> Result<StoreHandle, StoreError> {
        let (tx, rx) = channel::bounded(opts.queue_capacity.max(1));
        let shared = Arc::new(Shared {
            stats: ThreadStats::default(),
            thread: Mutex::new(None),
            stopping: AtomicBool::new(false),
            queued_bytes: AtomicUsize::new(0),
            queue_bytes_max: opts.queue_bytes_max,
        });
        let sh = shared.clone();
        let t = std::thread::Builder::new()
            .name("ether-store".into())
            .spawn(move || run(backend, opts, rx, sh))
            .map_err(|e| StoreError::Unavailable(format!("spawn storage thread: {e}")))?;
        if let Ok(mut g) = shared.thread.lock() {
            *g = Some(t);
        }
        Ok(StoreHandle { tx, shared })
    }
}

/// The way into the storage thread: cheap to clone, usable from any thread, never blocks.
#[derive(Clone)]
pub struct StoreHandle {
    tx: Sender<Msg>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for StoreHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreHandle").field("queued", &self.tx.len()).finish()
    }
}

impl StoreHandle {
    /// Queues a command without blocking. On `Err` the command (and its completion) is
    /// dropped unrun: the caller answers with the error itself. `Overloaded` when the queue
    /// holds `queue_capacity` commands or `queue_bytes_max` bytes ([`payload_bytes`]).
    /// Once `Ok`, the completion runs exactly once (with `Closed` if the thread ends first).
    pub fn submit(&self, cmd: StoreCmd) -> Result<(), StoreError> {
        if self.shared.stopping.load(Ordering::Relaxed) {
            return Err(StoreError::Closed);
        }
        let bytes = payload_bytes(&cmd.op);
        let before = self.shared.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
        if before > 0 && before.saturating_add(bytes) > self.shared.queue_bytes_max {
            self.shared.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
            return Err(StoreError::Overloaded);
        }
        let StoreCmd { op, done } = cmd;
        let (err, msg) = match self.tx.try_send(Msg::Cmd(Queued { op, done: Once(Some(done)), bytes })) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Full(m)) => (StoreError::Overloaded, m),
            Err(TrySendError::Disconnected(m)) => (StoreError::Closed, m),
        };
        self.shared.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
        if let Msg::Cmd(q) = msg {
            q.done.forget();
        }
        Err(err)
    }

    /// Submits `op` and waits (asynchronously) for its committed result.
    pub async fn call(&self, op: Op) -> Result<Reply, StoreError> {
        let (tx, rx) = futures_channel::oneshot::channel();
        self.submit(StoreCmd::new(op, move |r| {
            let _ = tx.send(r);
        }))?;
        rx.await.unwrap_or(Err(StoreError::Closed))
    }

    /// Submits `op` and blocks this thread until it is committed. Not for shard threads.
    pub fn call_blocking(&self, op: Op) -> Result<Reply, StoreError> {
        let (tx, rx) = channel::bounded(1);
        self.submit(StoreCmd::new(op, move |r| {
            let _ = tx.send(r);
        }))?;
        rx.recv().unwrap_or(Err(StoreError::Closed))
    }

    /// Whether the storage thread takes commands (not shut down, not gone).
    pub fn is_open(&self) -> bool {
        !self.shared.stopping.load(Ordering::Relaxed)
            && self.shared.thread.lock().map(|t| t.as_ref().is_some_and(|t| !t.is_finished())).unwrap_or(false)
    }

    /// Why the store failed a command as unavailable (a full disk, an I/O error, Redis away)
    /// within the last `window`, if it did: readiness (`/readyz`) reports it, so a load
    /// balancer sends traffic elsewhere while writes fail. With no traffic it reads ready
    /// again after `window` (nothing tells otherwise).
    pub fn unavailable_within(&self, window: std::time::Duration) -> Option<String> {
        let at = self.shared.stats.unavailable_ms.load(Ordering::Relaxed);
        if at == 0 || unix_ms().saturating_sub(at) > window.as_millis() as u64 {
            return None;
        }
        Some(self.shared.stats.unavailable_why.lock().map(|w| w.clone()).unwrap_or_default())
    }

    /// Commands waiting in the queue.
    pub fn queued(&self) -> usize {
        self.tx.len()
    }

    /// [`payload_bytes`] of the commands queued or being applied.
    pub fn queued_bytes(&self) -> usize {
        self.shared.queued_bytes.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> &ThreadStats {
        &self.shared.stats
    }

    /// Stops the thread after the commands already queued, and waits for it. Later submits
    /// answer `Closed`.
    pub fn shutdown(&self) {
        self.shared.stopping.store(true, Ordering::Relaxed);
        let _ = self.tx.send(Msg::Stop);
        let t = self.shared.thread.lock().ok().and_then(|mut g| g.take());
        if let Some(t) = t {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn run<B: StoreBackend>(mut backend: B, opts: StoreOptions, rx: Receiver<Msg>, sh: Arc<Shared>) {
    let _closing = Closing { rx: &rx, sh: &sh };
    let max = opts.batch_ops_max.max(1);
    let mut ops: Vec<Op> = Vec::with_capacity(max);
    // Dropped unrun (a backend panic unwinding through here), each answers `Closed`.
    let mut dones: Vec<Once> = Vec::with_capacity(max);
    let mut batch_bytes = 0;
    let mut next_purge = Instant::now() + opts.purge_every;
    let mut maintenance = MaintainBackoff::default();
    let mut outbox = OutboxWatch::new(&opts);
    let mut stop = false;
    let mut last_batch = 0;
    while !stop {
        let first = match rx.recv_timeout(opts.idle_tick) {
            Ok(Msg::Cmd(c)) => c,
            Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                idle(&mut backend, &opts, &sh, &mut next_purge, &mut maintenance);
                outbox.step(&mut backend, &sh.stats);
                continue;
            }
        };
        ops.push(first.op);
        dones.push(first.done);
        batch_bytes += first.bytes;
        // Wait for more only while busy: the previous batch was big.
        let wait = if last_batch >= opts.batch_wait_after_ops { opts.batch_wait } else { Duration::ZERO };
        let deadline = Instant::now() + wait;
        while ops.len() < max {
            let msg = match rx.try_recv() {
                Ok(m) => m,
                Err(TryRecvError::Disconnected) => {
                    stop = true;
                    break;
                }
                Err(TryRecvError::Empty) => {
                    if wait.is_zero() {
                        break;
                    }
                    // Keep collecting while commands keep coming: stop at the cap, or when
                    // none arrived for a tenth of it (a closed loop of callers waiting for
                    // this very batch sends nothing more; waiting would only add latency).
                    let gap = Instant::now() + wait / 10;
                    match rx.recv_deadline(deadline.min(gap)) {
                        Ok(m) => m,
                        Err(RecvTimeoutError::Timeout) => break,
                        Err(RecvTimeoutError::Disconnected) => {
                            stop = true;
                            break;
                        }
                    }
                }
            };
            match msg {
                Msg::Cmd(c) => {
                    ops.push(c.op);
                    dones.push(c.done);
                    batch_bytes += c.bytes;
                }
                Msg::Stop => {
                    stop = true;
                    break;
                }
            }
        }
        let t0 = Instant::now();
        let results = backend.apply_batch(&ops);
        let st = &sh.stats;
        let took = t0.elapsed();
        st.commit_ns_last.store(took.as_nanos() as u64, Ordering::Relaxed);
        st.commit_latency.record(took.as_secs_f64());
        st.batch_size.record(ops.len() as f64);
        st.batches.fetch_add(1, Ordering::Relaxed);
        st.ops.fetch_add(ops.len() as u64, Ordering::Relaxed);
        st.batch_ops_last.store(ops.len() as u64, Ordering::Relaxed);
        last_batch = ops.len();
        debug_assert_eq!(results.len(), ops.len());
        // Applied: its commands' bytes are free before anyone hears of it.
        ops.clear();
        sh.queued_bytes.fetch_sub(std::mem::take(&mut batch_bytes), Ordering::Relaxed);
        let mut results = results.into_iter();
        for done in dones.drain(..) {
            let r = results.next().unwrap_or_else(|| Err(StoreError::Unavailable("no result".into())));
            if let Err(e) = &r {
                st.errors.fetch_add(1, Ordering::Relaxed);
                if let StoreError::Unavailable(why) = e {
                    st.unavailable_ms.store(unix_ms(), Ordering::Relaxed);
                    if let Ok(mut w) = st.unavailable_why.lock() {
                        w.clone_from(why);
                    }
                }
            }
            done.run(r);
        }
        if Instant::now() >= next_purge {
            purge_step(&mut backend, &opts, &sh, &mut next_purge);
        }
        outbox.step(&mut backend, st);
        st.pending_entries.store(backend.stats().pending_entries, Ordering::Relaxed);
    }
    // `_closing` answers what is still queued.
}

/// Ends the thread's intake when the thread ends, also by a backend panic: later submits
/// answer `Closed`, and the commands still queued are answered `Closed`, not dropped
/// silently (a queue outlives its receiver while any handle lives: left there, their
/// completions would wait for the last handle to go).
struct Closing<'a> {
    rx: &'a Receiver<Msg>,
    sh: &'a Shared,
}

impl Drop for Closing<'_> {
    fn drop(&mut self) {
        self.sh.stopping.store(true, Ordering::Relaxed);
        while let Ok(m) = self.rx.try_recv() {
            if let Msg::Cmd(c) = m {
                self.sh.queued_bytes.fetch_sub(c.bytes, Ordering::Relaxed);
                c.done.run(Err(StoreError::Closed));
            }
        }
    }
}

/// Reads the outbox's size and what its cap dropped into the stats now and then, and warns
/// when the cap dropped events (at most once a minute, or when their total reaches a new
/// power of two).
struct OutboxWatch {
    every: Duration,
    next: Instant,
    /// The drop total last logged (or first read: drops from before this process are not
    /// logged again); `None` until the first reading.
    logged: Option<u64>,
    logged_at: Option<Instant>,
}

impl OutboxWatch {
    fn new(opts: &StoreOptions) -> Self {
        OutboxWatch {
            every: OUTBOX_STATS_EVERY.min(opts.purge_every).max(Duration::from_millis(1)),
            next: Instant::now(),
            logged: None,
            logged_at: None,
        }
    }

    fn step<B: StoreBackend>(&mut self, backend: &mut B, st: &ThreadStats) {
        let now = Instant::now();
        if now < self.next {
            return;
        }
        self.next = now + self.every;
        let s = match backend.apply(Op::OutboxStats) {
            Ok(Reply::OutboxStats(s)) => s,
            Ok(other) => {
                tracing::warn!(reply = ?other, "outbox stats: unexpected reply");
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "outbox stats not read");
                return;
            }
        };
        st.outbox_events.store(s.events, Ordering::Relaxed);
        st.outbox_dropped.store(s.dropped, Ordering::Relaxed);
        if self.should_log(s.dropped, now) {
            tracing::warn!(
                dropped_total = s.dropped,
                outbox_events = s.events,
                "event outbox over events.outbox_max: its oldest events were dropped (is the webhook down?)"
            );
        }
    }

    /// Whether a drop total read `now` is to be logged (and if so, remembers it).
    fn should_log(&mut self, dropped: u64, now: Instant) -> bool {
        let Some(logged) = self.logged else {
            self.logged = Some(dropped);
            return false;
        };
        if dropped <= logged {
            return false;
        }
        let new_power = logged == 0 || dropped.ilog2() > logged.ilog2();
        let quiet = self.logged_at.is_none_or(|t| now.duration_since(t) >= OUTBOX_DROP_LOG_EVERY);
        if !(new_power || quiet) {
            return false;
        }
        self.logged = Some(dropped);
        self.logged_at = Some(now);
        true
    }
}

fn purge_step<B: StoreBackend>(backend: &mut B, opts: &StoreOptions, sh: &Shared, next_purge: &mut Instant) {
    let cutoff = unix_ms().saturating_sub(opts.retention.as_millis() as u64);
    let r = backend.apply(Op::Purge { older_than_ms: cutoff, max_rows: opts.purge_rows });
    *next_purge = Instant::now() + opts.purge_every;
    match r {
        Ok(Reply::Purged { messages, more }) => {
            sh.stats.purged.fetch_add(messages, Ordering::Relaxed);
            if more {
                // Next step right after the next batch (or idle tick): small steps.
                *next_purge = Instant::now();
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "purge step failed"),
    }
}

fn idle<B: StoreBackend>(
    backend: &mut B,
    opts: &StoreOptions,
    sh: &Shared,
    next_purge: &mut Instant,
    maintenance: &mut MaintainBackoff,
) {
    // Bounded: a few index steps per tick, then back to the queue.
    if maintenance.ready(Instant::now()) {
        for _ in 0..4 {
            match backend.maintain(crate::backend::clock_ms()) {
                Ok(more) => {
                    maintenance.succeeded();
                    if !more {
                        break;
                    }
                }
                Err(e) => {
                    let retry = maintenance.failed(Instant::now());
                    tracing::warn!(error = %e, retry_in_ms = retry.as_millis() as u64, "store maintenance failed");
                    break;
                }
            }
        }
    }
    if Instant::now() >= *next_purge {
        purge_step(backend, opts, sh, next_purge);
    }
    sh.stats.pending_entries.store(backend.stats().pending_entries, Ordering::Relaxed);
    if let Some(on_idle) = opts.on_idle {
        on_idle();
    }
}

/// Idle maintenance (the index flush) after a failure: tried again after a delay doubling from
/// `MAINTAIN_RETRY_MIN` to `MAINTAIN_RETRY_MAX`, so a full disk costs a write attempt and a
/// log line every few seconds, not every idle tick (20 a second). A success resets it.
#[derive(Debug, Default)]
struct MaintainBackoff {
    /// No attempt before this (none: attempt now).
    next: Option<Instant>,
    /// The delay after the next failure.
    delay: Duration,
}

const MAINTAIN_RETRY_MIN: Duration = Duration::from_millis(100);
const MAINTAIN_RETRY_MAX: Duration = Duration::from_secs(5);

impl MaintainBackoff {
    fn ready(&self, now: Instant) -> bool {
        self.next.is_none_or(|t| now >= t)
    }

    /// Records a failure at `now`; returns the delay before the next attempt.
    fn failed(&mut self, now: Instant) -> Duration {
        let delay = self.delay.clamp(MAINTAIN_RETRY_MIN, MAINTAIN_RETRY_MAX);
        self.next = Some(now + delay);
        self.delay = (delay * 2).min(MAINTAIN_RETRY_MAX);
        delay
    }

    fn succeeded(&mut self) {
        *self = MaintainBackoff::default();
    }
}

#[cfg(test)]
mod histogram_tests {
    use super::*;

    /// A failing maintenance (a full disk) is tried again after 100 ms, 200 ms, … up to 5 s,
    /// not at every idle tick (each time with a warning); a success resets the delay.
    #[test]
    fn failed_maintenance_backs_off() {
        let mut m = MaintainBackoff::default();
        let t0 = Instant::now();
        assert!(m.ready(t0));
        let delays: Vec<u128> = (0..8).map(|_| m.failed(t0).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert!(!m.ready(t0 + Duration::from_millis(4999)));
        assert!(m.ready(t0 + Duration::from_secs(5)));
        m.succeeded();
        assert!(m.ready(t0));
        assert_eq!(m.failed(t0), Duration::from_millis(100));
    }

    #[test]
    fn outbox_drops_are_logged_once_a_minute_or_per_power_of_two() {
        let mut w = OutboxWatch::new(&StoreOptions::default());
        let t0 = Instant::now();
        assert!(!w.should_log(5, t0), "the first reading is the baseline");
        assert!(!w.should_log(5, t0), "nothing new");
        assert!(w.should_log(6, t0), "the first drops since start");
        assert!(!w.should_log(7, t0 + Duration::from_secs(1)), "same power of two, within a minute");
        assert!(w.should_log(8, t0 + Duration::from_secs(2)), "a new power of two");
        assert!(!w.should_log(15, t0 + Duration::from_secs(59)));
        assert!(w.should_log(15, t0 + Duration::from_secs(63)), "a minute later");
        assert!(!w.should_log(15, t0 + Duration::from_secs(200)), "nothing new");
    }

    #[test]
    fn atomic_histogram_counts_cumulatively() {
        let h = AtomicHistogram::new(&[1.0, 2.0, 4.0]);
        for v in [0.5, 1.0, 1.5, 3.0, 9.0] {
            h.record(v);
        }
        let r = h.read();
        assert_eq!(r.cumulative, vec![2, 3, 4]);
        assert_eq!(r.count, 5);
        assert!((r.sum - 15.0).abs() < 1e-6);
        assert!((r.max - 9.0).abs() < 1e-6);
    }
}

#[cfg(test)]
mod queue_tests {
    use super::*;
    use crate::op::NewMessage;
    use std::sync::atomic::AtomicUsize;

    /// A backend that holds its first batch until told, answers `Done` to everything, and
    /// panics on a batch holding `Op::Revocations` (a bug in a backend, say).
    struct Gated {
        entered: channel::Sender<()>,
        release: Receiver<()>,
        first: bool,
    }

    impl StoreBackend for Gated {
        fn apply_batch(&mut self, ops: &[Op]) -> Vec<Result<Reply, StoreError>> {
            if std::mem::take(&mut self.first) {
                let _ = self.entered.send(());
                let _ = self.release.recv();
            }
            assert!(!ops.iter().any(|op| matches!(op, Op::Revocations)), "backend bug");
            ops.iter().map(|_| Ok(Reply::Done)).collect()
        }

        fn maintain(&mut self, _now_ms: u64) -> Result<bool, StoreError> {
            Ok(false)
        }
    }

    /// A store whose first command is being applied (and held) when this returns.
    fn held(opts: StoreOptions) -> (StoreHandle, channel::Sender<()>, Receiver<Result<Reply, StoreError>>) {
        let (entered, entered_rx) = channel::unbounded();
        let (release, release_rx) = channel::unbounded();
        let h = StoreThread::spawn(Gated { entered, release: release_rx, first: true }, opts).unwrap();
        let (first_tx, first_rx) = channel::unbounded();
        h.submit(StoreCmd::new(Op::Heads { user: "u".into() }, move |r| {
            let _ = first_tx.send(r);
        }))
        .unwrap();
        entered_rx.recv().unwrap();
        (h, release, first_rx)
    }

    fn append(body: usize) -> Op {
        Op::Append(NewMessage {
            id: 1,
            ts: 1,
            from: "a".into(),
            to: "b".into(),
            kind: ether_proto::Kind::Text,
            body: "x".repeat(body),
            cid: None,
        })
    }

    /// The queue is bounded in bytes, not only in commands: with the store held, big bodies
    /// are refused as `Overloaded` once `queue_bytes_max` is queued (before, all 1000 were
    /// taken), every one taken is answered, and the bytes are given back after their batch.
    #[test]
    fn the_queue_is_bounded_in_bytes() {
        let opts = StoreOptions { queue_capacity: 1000, queue_bytes_max: 256 << 10, ..StoreOptions::test_min() };
        let (h, release, first) = held(opts);
        let answered = Arc::new(AtomicUsize::new(0));
        let mut taken = 0;
        let mut refused = 0;
        for _ in 0..1000 {
            let answered = answered.clone();
            match h.submit(StoreCmd::new(append(60_000), move |r| {
                assert!(r.is_ok());
                answered.fetch_add(1, Ordering::SeqCst);
            })) {
                Ok(()) => taken += 1,
                Err(StoreError::Overloaded) => refused += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert!((3..=4).contains(&taken), "{taken} bodies of 60 kB under a 256 KiB bound");
        assert_eq!(refused, 1000 - taken);
        assert!(h.queued_bytes() <= 256 << 10, "{}", h.queued_bytes());
        release.send(()).unwrap();
        assert!(first.recv().unwrap().is_ok());
        // Commands behind the big ones are answered after them: all of those were answered.
        assert!(h.call_blocking(Op::Heads { user: "u".into() }).is_ok());
        assert_eq!(answered.load(Ordering::SeqCst), taken);
        h.submit(StoreCmd::new(append(60_000), |_| ())).expect("room again once applied");
        h.shutdown();
        assert_eq!(h.queued_bytes(), 0);
    }

    /// A backend that panics takes its thread down, but every command it had taken (the
    /// batch being applied, those queued behind it) is still answered, as `Closed`: before,
    /// their completions were dropped unrun and a terminal's `send` never got its `sent` or
    /// `error`.
    #[test]
    fn a_panicking_backend_answers_every_command_it_took() {
        let (h, release, first) = held(StoreOptions::test_min());
        let (tx, rx) = channel::unbounded();
        let mut ops = vec![Op::Revocations];
        ops.extend((0..20).map(|_| Op::Heads { user: "u".into() }));
        for op in ops {
            let tx = tx.clone();
            h.submit(StoreCmd::new(op, move |r| {
                let _ = tx.send(r);
            }))
            .unwrap();
        }
        drop(tx);
        release.send(()).unwrap();
        assert!(first.recv().unwrap().is_ok());
        // A completion dropped unrun ends nothing: a queue outlives its receiver while a handle
        // lives, so the wait needs a bound (a liveness bound, not a latency check).
        let answers: Vec<_> = std::iter::from_fn(|| rx.recv_timeout(Duration::from_secs(10)).ok()).take(21).collect();
        assert_eq!(answers.len(), 21, "{answers:?}");
        assert!(answers.iter().all(|r| *r == Err(StoreError::Closed)), "{answers:?}");
        assert_eq!(h.submit(StoreCmd::new(Op::Revocations, |_| ())).unwrap_err(), StoreError::Closed);
        h.shutdown();
    }
}
