//! One process's share of terminals, spread over glommio executor threads.
//!
//! Thread `t` of `T` runs the fleet's terminals `t, t+T, t+2T, ...`, connecting them at its
//! share of the connect rate with a bounded number of handshakes in flight (the io_uring rings
//! are small). Terminal tasks run in a glommio task queue of their own, so the thread's timer
//! tasks (publish, heartbeats, orders) are not queued behind every ready terminal. Every
//! 200 ms each thread publishes its counters; the coordinator (or the
//! worker's main thread) reads them with [`LocalFleet::progress`]. [`LocalFleet::command`]
//! passes the coordinator's orders ([`FleetCmd`]: start or stop chatting, drop a share of the
//! terminals, reconnect them), which every thread picks up within 5 ms, publishing its
//! counters at once; the progress says how many orders every thread had carried out when
//! it published ([`FleetProgress::orders_applied`]). [`LocalFleet::stop`]
//! ends the executors and returns the fleet's [`FleetReport`].
use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use glommio::{Latency, LocalExecutorBuilder, Placement, Shares};
use serde::{Deserialize, Serialize};

use crate::stats::{Counters, FleetProgress, FleetReport, Hist, MsgSeen};
use crate::terminal::{self, ExecState, Role, TermCtx, UserTrack};
use crate::token::Minter;

/// Everything a fleet needs; sent as JSON to worker processes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FleetSpec {
    pub client: SocketAddr,
    /// The other nodes of a cluster: terminal `i` connects to node `i % nodes`.
    #[serde(default)]
    pub more_clients: Vec<SocketAddr>,
    /// WebSocket path, `/ws`.
    pub path: String,
    pub jwt_secret: String,
    pub token_ttl_s: u64,
    /// Terminal `i` (global index) is user `<user_prefix><i>`.
    pub user_prefix: String,
    pub device: String,
    pub platform: String,
    /// Global index of this fleet's first terminal.
    pub first: u64,
    pub count: u64,
    /// Terminals over all fleets (message `k` is for terminal `k % total`).
    pub total: u64,
    /// This fleet's share of the connect rate, per second (0 = as fast as allowed).
    pub connect_rate: f64,
    pub threads: usize,
    /// Spread source addresses over 127.0.0.1..=127.0.0.n (0 = kernel's choice).
    pub source_ips: u32,
    /// Tag carried in every message body of this run.
    pub run_id: String,
    pub connect_timeout_ms: u64,
    /// Handshakes in flight per thread.
    pub max_inflight: usize,
    /// Pin thread `t` to CPU `pin + t` (None: let the scheduler place threads).
    pub pin: Option<usize>,
    /// What the terminals do besides counting their inbox.
    #[serde(default)]
    pub role: Role,
    /// `group`: terminal `i` is a member of group `<group_prefix><i / members>`, one of
    /// `groups`.
    #[serde(default)]
    pub group_prefix: String,
    #[serde(default)]
    pub members: u64,
    #[serde(default)]
    pub groups: u64,
    /// `group`: a member acks its group at most this often (ms; the heartbeat tick flushes).
    #[serde(default)]
    pub group_ack_ms: u64,
    /// `chat`: a `read` after this many peer messages (0 = never).
    #[serde(default)]
    pub read_every: u32,
    /// Keep the id of every message received (`reconnect`).
    #[serde(default)]
    pub track_ids: bool,
    /// Connect over TLS (`wss://`, `--tls`).
    #[serde(default)]
    pub tls: Option<crate::tls::TlsSpec>,
}

impl FleetSpec {
    /// The node terminal `global` connects to.
    pub fn client_for(&self, global: u64) -> SocketAddr {
        let nodes = 1 + self.more_clients.len() as u64;
        match (global % nodes) as usize {
            0 => self.client,
            n => self.more_clients[n - 1],
        }
    }
}

/// An order from the coordinator to every thread of a fleet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum FleetCmd {
    /// Start sending: `rate` messages per second for this fleet (0 = every terminal keeps
    /// `window` sends unanswered), at most `window` unanswered per terminal.
    Chat { rate: f64, window: u32 },
    /// Stop sending (answers and deliveries still count).
    StopSending,
    /// Close abruptly (RST, no close frame) every connected terminal picked by
    /// [`should_drop`].
    Drop { share: f64 },
    /// Connect the dropped terminals again and `sync` from their last acked seq; `at_ns` is
    /// the order's Unix time, the start of the reconnect measurement.
    Reconnect { at_ns: u64 },
}

/// Whether terminal `global` is among the `share` (0..=1) dropped: a Weyl sequence over the
/// golden ratio, so any prefix of the terminals holds close to that share.
pub fn should_drop(global: u64, share: f64) -> bool {
    let frac = (global.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64 / (1u64 << 53) as f64;
    frac < share
}

#[derive(Default)]
struct ThreadShared {
    counters: Counters,
    interval: Hist,
    settled: u64,
    count: u64,
    /// Times `publish` ran.
    publishes: u64,
    /// The longest the publish timer ran late, milliseconds.
    timer_late_ms_max: u64,
    /// Orders carried out before these counters were taken (`ExecState::orders_applied`).
    orders_applied: u64,
}

/// How often a terminal thread publishes its counters for the monitor.
const PUBLISH_EVERY: Duration = Duration::from_millis(200);

/// Orders for the threads of a fleet: a log every thread reads from its own position.
pub type Control = Arc<Mutex<Vec<FleetCmd>>>;

/// A fleet running on threads of this process.
pub struct LocalFleet {
    stop: Arc<AtomicBool>,
    shared: Vec<Arc<Mutex<ThreadShared>>>,
    handles: Vec<glommio::ExecutorJoinHandle<FleetReport>>,
    threads: usize,
    control: Control,
    live: Vec<Arc<AtomicU64>>,
}

impl LocalFleet {
    pub fn start(spec: FleetSpec) -> io::Result<LocalFleet> {
        let threads = spec.threads.max(1).min(spec.count.max(1) as usize);
        let spec = Arc::new(spec);
        let stop = Arc::new(AtomicBool::new(false));
        let control: Control = Arc::default();
        let mut shared = Vec::new();
        let mut handles = Vec::new();
        let mut live = Vec::new();
        for t in 0..threads {
            let sh = Arc::new(Mutex::new(ThreadShared {
                count: (t as u64..spec.count).step_by(threads).count() as u64,
                ..Default::default()
            }));
            shared.push(sh.clone());
            let counter = Arc::new(AtomicU64::new(0));
            live.push(counter.clone());
            let (spec, stop, control) = (spec.clone(), stop.clone(), control.clone());
            let placement = match spec.pin {
                Some(p) => Placement::Fixed(p + t),
                None => Placement::Unbound,
            };
            let h = LocalExecutorBuilder::new(placement)
                .name(&format!("lt-term-{t}"))
                .io_memory(256 << 10)
                .ring_depth(crate::RING_DEPTH)
                .spawn(move || thread_main(spec, t, threads, sh, stop, control, counter))
                .map_err(|e| io::Error::other(format!("executor: {e}")))?;
            handles.push(h);
        }
        Ok(LocalFleet { stop, shared, handles, threads, control, live })
    }

    /// Passes an order to every thread; returns its number in the order log (from 1): the
    /// fleet's progress reflects it once its `orders_applied` reaches that number.
    pub fn command(&self, cmd: FleetCmd) -> u64 {
        let mut log = self.control.lock().unwrap_or_else(|e| e.into_inner());
        log.push(cmd);
        log.len() as u64
    }

    /// The order log (for a worker's stdin reader).
    pub fn control(&self) -> Control {
        self.control.clone()
    }

    /// Distinct messages received so far, one live counter per thread.
    pub fn live(&self) -> Vec<Arc<AtomicU64>> {
        self.live.clone()
    }

    /// Counters so far, and the message latency since the previous call.
    pub fn progress(&self) -> FleetProgress {
        let mut p =
            FleetProgress { connect_done: true, published: u64::MAX, orders_applied: u64::MAX, ..Default::default() };
        let mut interval = Hist::new();
        for sh in &self.shared {
            let mut s = sh.lock().unwrap_or_else(|e| e.into_inner());
            p.published = p.published.min(s.publishes);
            p.orders_applied = p.orders_applied.min(s.orders_applied);
            p.timer_late_ms_max = p.timer_late_ms_max.max(s.timer_late_ms_max);
            p.counters.add(&s.counters);
            interval.add(&s.interval);
            s.interval.reset();
            if s.settled < s.count {
                p.connect_done = false;
            }
        }
        p.interval_latency = interval.data();
        p
    }

    /// Stops every terminal and returns the fleet's account.
    pub fn stop(self) -> FleetReport {
        self.stop.store(true, Ordering::SeqCst);
        let mut parts = Vec::new();
        for h in self.handles {
            match h.join() {
                Ok(r) => parts.push(r),
                Err(e) => {
                    let mut r = FleetReport::default();
                    r.failures.insert(format!("executor failed: {e}"), 1);
                    parts.push(r);
                }
            }
        }
        let total = self.shared.iter().map(|sh| sh.lock().unwrap_or_else(|e| e.into_inner()).count).sum::<u64>();
        interleave(parts, self.threads, total as usize)
    }
}

/// Thread reports hold terminals `t, t+T, ...`; the fleet report lists its `total` terminals
/// in order. A thread whose report is missing (its executor failed) lists its terminals as
/// having received nothing and, where the others say whether theirs were up, as down.
fn interleave(mut parts: Vec<FleetReport>, threads: usize, total: usize) -> FleetReport {
    let per: Vec<Vec<u32>> = parts.iter().map(|p| p.per_user_received.clone()).collect();
    let with_ids = parts.iter().any(|p| !p.ids.is_empty());
    let with_up = parts.iter().any(|p| !p.up.is_empty());
    let mut ids: Vec<std::vec::IntoIter<Vec<u64>>> =
        parts.iter_mut().map(|p| std::mem::take(&mut p.ids).into_iter()).collect();
    let mut up: Vec<std::vec::IntoIter<bool>> =
        parts.iter_mut().map(|p| std::mem::take(&mut p.up).into_iter()).collect();
    let mut up_order = Vec::new();
    let mut order = Vec::with_capacity(total);
    let mut id_order = Vec::new();
    for i in 0..total {
        let (t, j) = (i % threads, i / threads);
        order.push(per.get(t).and_then(|v| v.get(j)).copied().unwrap_or(0));
        if with_ids {
            id_order.push(ids.get_mut(t).and_then(|it| it.next()).unwrap_or_default());
        }
        if with_up {
            up_order.push(up.get_mut(t).and_then(|it| it.next()).unwrap_or(false));
        }
    }
    let mut merged = FleetReport::merge(parts);
    merged.per_user_received = order;
    merged.ids = id_order;
    merged.up = up_order;
    merged
}

async fn thread_main(
    spec: Arc<FleetSpec>,
    t: usize,
    threads: usize,
    shared: Arc<Mutex<ThreadShared>>,
    stop: Arc<AtomicBool>,
    control: Control,
    live: Arc<AtomicU64>,
) -> FleetReport {
    let mine: Vec<u64> = (t as u64..spec.count).step_by(threads).map(|i| spec.first + i).collect();
    let n = mine.len();
    let state = Rc::new(RefCell::new(ExecState {
        users: (0..n).map(|_| UserTrack::default()).collect(),
        acked_to: if spec.role == Role::Chat { vec![0; spec.total as usize] } else { Vec::new() },
        ..Default::default()
    }));
    let ctx = Rc::new(TermCtx {
        minter: Minter::new(&spec.jwt_secret, spec.token_ttl_s),
        host: spec.client.to_string(),
        spec: spec.clone(),
        state: state.clone(),
        connects: Rc::new(glommio::sync::Semaphore::new(spec.max_inflight.max(1) as u64)),
        tls: spec.tls.as_ref().and_then(|t| t.connector().ok()),
        rejoin: Rc::new(glommio::sync::Semaphore::new(0)),
        live,
        thread: t,
        threads,
    });
    let rate = spec.connect_rate / threads as f64;
    // Terminal tasks run in a queue of their own, as the engine's do: a timer's task (the
    // counter publish, heartbeats, orders) then waits for the scheduler's next turn between
    // queues instead of behind every ready terminal task (which made the 200 ms publish run
    // up to 1.2 s late under chat load).
    let terminals = glommio::executor().create_task_queue(Shares::Static(1000), Latency::NotImportant, "terminals");
    let stop2 = stop.clone();
    let ctx2 = ctx.clone();
    glommio::spawn_local(async move {
        let start = Instant::now();
        for (slot, global) in mine.into_iter().enumerate() {
            if stop2.load(Ordering::Relaxed) {
                break;
            }
            if rate > 0.0 && rate.is_finite() {
                let due = start + Duration::from_secs_f64(slot as f64 / rate);
                let now = Instant::now();
                if due > now + Duration::from_millis(1) {
                    glommio::timer::sleep(due - now).await;
                }
            }
            let Ok(permit) = ctx2.connects.acquire_static_permit(1).await else {
                break;
            };
            match glommio::spawn_local_into(terminal::run(ctx2.clone(), slot, global, permit), terminals) {
                Ok(task) => drop(task.detach()),
                Err(e) => {
                    // The queue lives as long as the thread; if this ever failed, the terminal
                    // would be missing from the run and reported as not connected.
                    debug_assert!(false, "terminal queue gone: {e}");
                    break;
                }
            }
        }
    })
    .detach();
    let hb = ctx.clone();
    glommio::spawn_local(async move {
        let mut tick = 0u64;
        loop {
            glommio::timer::sleep(Duration::from_secs(1)).await;
            tick += 1;
            terminal::heartbeat_tick(&hb, tick);
        }
    })
    .detach();
    let orders = ctx.clone();
    let stop3 = stop.clone();
    let shared3 = shared.clone();
    glommio::spawn_local(async move {
        let mut seen = 0;
        while !stop3.load(Ordering::Relaxed) {
            let new: Vec<FleetCmd> = {
                let log = control.lock().unwrap_or_else(|e| e.into_inner());
                let v = log[seen.min(log.len())..].to_vec();
                seen = log.len();
                v
            };
            if !new.is_empty() {
                for cmd in new {
                    apply(&orders, cmd);
                }
                // Counters taken from here on reflect the orders (the coordinator's chat drain
                // waits for them: see `scenario::chat_drained`); publish them now rather than
                // up to a publish period later.
                orders.state.borrow_mut().orders_applied = seen as u64;
                publish(&orders.state, &shared3);
            }
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
    })
    .detach();
    loop {
        publish(&state, &shared);
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let asleep = Instant::now();
        glommio::timer::sleep(PUBLISH_EVERY).await;
        // How late the timer woke this task (reported with the run: see `scenario::saturation`).
        let late = asleep.elapsed().saturating_sub(PUBLISH_EVERY).as_millis() as u64;
        let mut sh = shared.lock().unwrap_or_else(|e| e.into_inner());
        sh.timer_late_ms_max = sh.timer_late_ms_max.max(late);
    }
    publish(&state, &shared);
    let up: Vec<bool> =
        if spec.track_ids { state.borrow().users.iter().map(|u| u.connected).collect() } else { Vec::new() };
    // End every terminal's task (and close its socket) before the executor goes: tasks
    // still pending when it ends are leaked with their sockets.
    terminal::stop_all(&ctx);
    let deadline = Instant::now() + Duration::from_secs(5);
    while state.borrow().tasks > 0 && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    let st = state.borrow();
    FleetReport {
        counters: st.counters.clone(),
        failures: st.failures.clone(),
        drops: st.drops.clone(),
        connect_latency: st.connect_hist.data(),
        msg_latency: st.msg_hist.data(),
        per_user_received: st.users.iter().map(|u| u.received).collect(),
        seq_holes: st.users.iter().map(|u| u.seq.holes() + u.group.as_ref().map_or(0, |g| g.seq.holes())).sum(),
        acked_to: st.acked_to.clone(),
        send_latency: st.send_hist.data(),
        send_errors: st.send_errors.clone(),
        per_msg: st.per_msg.iter().map(|(&k, &(count, last_us))| MsgSeen { k, count, last_us }).collect(),
        ids: if spec.track_ids {
            st.users
                .iter()
                .map(|u| {
                    let mut v = u.ids.clone();
                    v.sort_unstable();
                    v
                })
                .collect()
        } else {
            Vec::new()
        },
        sync_latency: st.sync_hist.data(),
        up,
    }
}

/// Carries out one order on this thread.
fn apply(ctx: &Rc<TermCtx>, cmd: FleetCmd) {
    match cmd {
        FleetCmd::Chat { rate, window } => {
            {
                let mut st = ctx.state.borrow_mut();
                let st = &mut *st;
                st.chat_active = true;
                st.chat_window = window.max(1);
                st.chat_refill = rate <= 0.0;
                if st.chat_refill {
                    for slot in 0..st.users.len() {
                        if st.users[slot].connected {
                            for _ in 0..st.chat_window {
                                terminal::queue_send(st, ctx, slot, ctx.global(slot));
                            }
                        }
                    }
                    return;
                }
            }
            // Spawned with the state released: the new task may run at once.
            glommio::spawn_local(chat_driver(ctx.clone(), rate / ctx.threads as f64)).detach();
        }
        FleetCmd::StopSending => ctx.state.borrow_mut().chat_active = false,
        FleetCmd::Drop { share } => {
            let mut st = ctx.state.borrow_mut();
            for slot in 0..st.users.len() {
                let u = &mut st.users[slot];
                if u.connected && should_drop(ctx.global(slot), share) {
                    u.drop_req = true;
                    if let Some(w) = u.waker.take() {
                        w.wake();
                    }
                }
            }
        }
        FleetCmd::Reconnect { at_ns } => {
            let waiting = {
                let mut st = ctx.state.borrow_mut();
                st.reconnect_ns = at_ns;
                st.users.iter().filter(|u| u.drop_req).count()
            };
            ctx.rejoin.signal(waiting as u64);
        }
    }
}

/// Sends at `rate` per second from this thread's terminals in turn, skipping those whose
/// window is full or that are not connected; a round where every window is full forgives the
/// backlog (the node sets the pace then, not the schedule).
async fn chat_driver(ctx: Rc<TermCtx>, rate: f64) {
    let start = Instant::now();
    let mut issued = 0u64;
    let mut cursor = 0usize;
    loop {
        {
            let mut st = ctx.state.borrow_mut();
            let st = &mut *st;
            if !st.chat_active {
                return;
            }
            let allowed = (rate * start.elapsed().as_secs_f64()) as u64;
            let n = st.users.len();
            let window = st.chat_window as usize;
            let mut misses = 0;
            while issued < allowed && misses < n {
                let slot = cursor;
                cursor = (cursor + 1) % n.max(1);
                let u = &st.users[slot];
                let free = u.connected && !u.drop_req && u.chat.as_ref().map_or(0, |c| c.pending.len()) < window;
                if free && terminal::queue_send(st, &ctx, slot, ctx.global(slot)) {
                    issued += 1;
                    misses = 0;
                } else {
                    misses += 1;
                }
            }
            if misses >= n {
                issued = allowed;
            }
        }
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
}

fn publish(state: &Rc<RefCell<ExecState>>, shared: &Arc<Mutex<ThreadShared>>) {
    let mut st = state.borrow_mut();
    let mut sh = shared.lock().unwrap_or_else(|e| e.into_inner());
    sh.counters = st.counters.clone();
    sh.settled = st.settled;
    sh.orders_applied = st.orders_applied;
    sh.interval.add(&st.interval_hist);
    st.interval_hist.reset();
    sh.publishes += 1;
}

/// A spec for unit tests: `count` terminals of user prefix `u` towards port 1 (where nothing
/// listens), one thread, no groups, no TLS.
#[cfg(test)]
impl FleetSpec {
    pub(crate) fn for_tests(count: u64) -> FleetSpec {
        FleetSpec {
            client: "127.0.0.1:1".parse().expect("an address"),
            more_clients: Vec::new(),
            path: "/ws".into(),
            jwt_secret: "s".into(),
            token_ttl_s: 60,
            user_prefix: "u".into(),
            device: "d".into(),
            platform: "other".into(),
            first: 0,
            count,
            total: count,
            connect_rate: 0.0,
            threads: 1,
            source_ips: 0,
            run_id: "r".into(),
            connect_timeout_ms: 1000,
            max_inflight: 8,
            pin: None,
            role: Role::default(),
            group_prefix: String::new(),
            members: 0,
            groups: 0,
            group_ack_ms: 0,
            read_every: 0,
            track_ids: false,
            tls: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleave_restores_fleet_order() {
        let a = FleetReport {
            per_user_received: vec![0, 2, 4],
            ids: vec![vec![0], vec![2], vec![4]],
            ..Default::default()
        };
        let b = FleetReport { per_user_received: vec![1, 3], ids: vec![vec![1], vec![3]], ..Default::default() };
        let m = interleave(vec![a, b], 2, 5);
        assert_eq!(m.per_user_received, vec![0, 1, 2, 3, 4]);
        assert_eq!(m.ids, vec![vec![0], vec![1], vec![2], vec![3], vec![4]]);
    }

    #[test]
    fn interleave_keeps_places_of_a_failed_thread() {
        // Thread 1 of 2 failed (default report): its terminals 1 and 3 received nothing and are
        // down; terminal 4 stays at its place.
        let a = FleetReport {
            per_user_received: vec![10, 12, 14],
            ids: vec![vec![0], vec![2], vec![4]],
            up: vec![true, true, true],
            ..Default::default()
        };
        let m = interleave(vec![a, FleetReport::default()], 2, 5);
        assert_eq!(m.per_user_received, vec![10, 0, 12, 0, 14]);
        assert_eq!(m.ids, vec![vec![0], vec![], vec![2], vec![], vec![4]]);
        assert_eq!(m.up, vec![true, false, true, false, true]);
    }

    #[test]
    fn drop_share_is_close_for_any_prefix() {
        for n in [10u64, 40, 1000, 20_000] {
            let dropped = (0..n).filter(|&g| should_drop(g, 0.5)).count() as f64;
            assert!((dropped / n as f64 - 0.5).abs() <= 0.1 + 1.0 / n as f64, "{n}: {dropped}");
        }
        assert!((0..100).all(|g| should_drop(g, 1.0)));
        assert!((0..100).all(|g| !should_drop(g, 0.0)));
    }

    #[test]
    fn progress_says_which_orders_the_counters_reflect() {
        // Nothing listens on port 1: the terminals fail at once; the orders still run.
        let spec = FleetSpec { threads: 2, role: Role::Chat, ..FleetSpec::for_tests(2) };
        let fleet = LocalFleet::start(spec).unwrap();
        assert_eq!(fleet.command(FleetCmd::Chat { rate: 1.0, window: 1 }), 1);
        assert_eq!(fleet.command(FleetCmd::StopSending), 2);
        // Each thread publishes as soon as it has carried the orders out (not timed here: the
        // machine may be busy).
        let t0 = Instant::now();
        let mut p = fleet.progress();
        while p.orders_applied < 2 && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
            p = fleet.progress();
        }
        assert_eq!(p.orders_applied, 2, "progress after {:?}", t0.elapsed());
        fleet.stop();
    }

    #[test]
    fn commands_roundtrip_as_json_lines() {
        for c in [
            FleetCmd::Chat { rate: 5.0, window: 2 },
            FleetCmd::StopSending,
            FleetCmd::Drop { share: 0.5 },
            FleetCmd::Reconnect { at_ns: 7 },
        ] {
            let line = serde_json::to_string(&c).unwrap();
            assert_eq!(serde_json::from_str::<FleetCmd>(&line).unwrap(), c);
        }
    }
}
