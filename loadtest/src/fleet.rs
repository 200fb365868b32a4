//! One process's share of terminals, spread over glommio executor threads.
//!
//! Thread `t` of `T` runs the fleet's terminals `t, t+T, t+2T, ...`, connecting them at its
//! share of the connect rate with a bounded number of handshakes in flight (the io_uring rings
//! are small). Every 200 ms each thread publishes its counters; the coordinator (or the
//! worker's main thread) reads them with [`LocalFleet::progress`]. [`LocalFleet::stop`] ends
//! the executors and returns the fleet's [`FleetReport`].
use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use glommio::{LocalExecutorBuilder, Placement};
use serde::{Deserialize, Serialize};

use crate::stats::{Counters, FleetProgress, FleetReport, Hist};
use crate::terminal::{self, ExecState, TermCtx, UserTrack};
use crate::token::Minter;

/// Everything a fleet needs; sent as JSON to worker processes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FleetSpec {
    pub client: SocketAddr,
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
}

#[derive(Default)]
struct ThreadShared {
    counters: Counters,
    interval: Hist,
    settled: u64,
    count: u64,
}

/// A fleet running on threads of this process.
pub struct LocalFleet {
    stop: Arc<AtomicBool>,
    shared: Vec<Arc<Mutex<ThreadShared>>>,
    handles: Vec<glommio::ExecutorJoinHandle<FleetReport>>,
    threads: usize,
}

impl LocalFleet {
    pub fn start(spec: FleetSpec) -> io::Result<LocalFleet> {
        let threads = spec.threads.max(1).min(spec.count.max(1) as usize);
        let spec = Arc::new(spec);
        let stop = Arc::new(AtomicBool::new(false));
        let mut shared = Vec::new();
        let mut handles = Vec::new();
        for t in 0..threads {
            let sh = Arc::new(Mutex::new(ThreadShared {
                count: (t as u64..spec.count).step_by(threads).count() as u64,
                ..Default::default()
            }));
            shared.push(sh.clone());
            let (spec, stop) = (spec.clone(), stop.clone());
            let placement = match spec.pin {
                Some(p) => Placement::Fixed(p + t),
                None => Placement::Unbound,
            };
            let h = LocalExecutorBuilder::new(placement)
                .name(&format!("lt-term-{t}"))
                .io_memory(256 << 10)
                .spawn(move || thread_main(spec, t, threads, sh, stop))
                .map_err(|e| io::Error::other(format!("executor: {e}")))?;
            handles.push(h);
        }
        Ok(LocalFleet { stop, shared, handles, threads })
    }

    /// Counters so far, and the message latency since the previous call.
    pub fn progress(&self) -> FleetProgress {
        let mut p = FleetProgress { connect_done: true, ..Default::default() };
        let mut interval = Hist::new();
        for sh in &self.shared {
            let mut s = sh.lock().unwrap_or_else(|e| e.into_inner());
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
        interleave(parts, self.threads)
    }
}

/// Thread reports hold terminals `t, t+T, ...`; the fleet report lists them in order.
fn interleave(parts: Vec<FleetReport>, threads: usize) -> FleetReport {
    let per: Vec<Vec<u32>> = parts.iter().map(|p| p.per_user_received.clone()).collect();
    let total: usize = per.iter().map(|v| v.len()).sum();
    let mut order = Vec::with_capacity(total);
    for i in 0..total {
        let (t, j) = (i % threads, i / threads);
        order.push(per.get(t).and_then(|v| v.get(j)).copied().unwrap_or(0));
    }
    let mut merged = FleetReport::merge(parts);
    merged.per_user_received = order;
    merged
}

async fn thread_main(
    spec: Arc<FleetSpec>,
    t: usize,
    threads: usize,
    shared: Arc<Mutex<ThreadShared>>,
    stop: Arc<AtomicBool>,
) -> FleetReport {
    let mine: Vec<u64> = (t as u64..spec.count).step_by(threads).map(|i| spec.first + i).collect();
    let n = mine.len();
    let state = Rc::new(RefCell::new(ExecState {
        users: (0..n).map(|_| UserTrack::default()).collect(),
        ..Default::default()
    }));
    let ctx = Rc::new(TermCtx {
        minter: Minter::new(&spec.jwt_secret, spec.token_ttl_s),
        host: spec.client.to_string(),
        spec: spec.clone(),
        state: state.clone(),
    });
    let rate = spec.connect_rate / threads as f64;
    let sem = Rc::new(glommio::sync::Semaphore::new(spec.max_inflight.max(1) as u64));
    let stop2 = stop.clone();
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
            let Ok(permit) = sem.acquire_static_permit(1).await else {
                break;
            };
            glommio::spawn_local(terminal::run(ctx.clone(), slot, global, permit)).detach();
        }
    })
    .detach();
    let hb_state = state.clone();
    glommio::spawn_local(async move {
        let mut tick = 0u64;
        loop {
            glommio::timer::sleep(Duration::from_secs(1)).await;
            tick += 1;
            terminal::heartbeat_tick(&hb_state, tick);
        }
    })
    .detach();
    loop {
        publish(&state, &shared);
        if stop.load(Ordering::SeqCst) {
            break;
        }
        glommio::timer::sleep(Duration::from_millis(200)).await;
    }
    publish(&state, &shared);
    let st = state.borrow();
    FleetReport {
        counters: st.counters.clone(),
        failures: st.failures.clone(),
        drops: st.drops.clone(),
        connect_latency: st.connect_hist.data(),
        msg_latency: st.msg_hist.data(),
        per_user_received: st.users.iter().map(|u| u.received).collect(),
        seq_holes: st.users.iter().map(|u| u.seq.holes()).sum(),
    }
}

fn publish(state: &Rc<RefCell<ExecState>>, shared: &Arc<Mutex<ThreadShared>>) {
    let mut st = state.borrow_mut();
    let mut sh = shared.lock().unwrap_or_else(|e| e.into_inner());
    sh.counters = st.counters.clone();
    sh.settled = st.settled;
    sh.interval.add(&st.interval_hist);
    st.interval_hist.reset();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleave_restores_fleet_order() {
        let a = FleetReport { per_user_received: vec![0, 2, 4], ..Default::default() };
        let b = FleetReport { per_user_received: vec![1, 3], ..Default::default() };
        assert_eq!(interleave(vec![a, b], 2).per_user_received, vec![0, 1, 2, 3, 4]);
    }
}
