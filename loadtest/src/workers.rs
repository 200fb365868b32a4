//! More terminals than one process may hold: the tool re-executes itself as
//! `ether-loadtest worker` processes. A worker reads its [`FleetSpec`] as one JSON line on
//! stdin, runs a [`LocalFleet`], prints `{"progress":...}` lines every 250 ms, carries out
//! the [`FleetCmd`] JSON lines it reads, and when it reads `stop` (or its stdin closes),
//! prints one `{"final":...}` line with its [`FleetReport`].
use std::io::{self, BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::fleet::{FleetCmd, FleetSpec, LocalFleet};
use crate::stats::{FleetProgress, FleetReport, Hist};

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum WorkerMsg {
    Progress(Box<FleetProgress>),
    Final(Box<FleetReport>),
    Error(String),
}

/// A fleet in this process or in a worker process.
pub enum Fleet {
    Local(LocalFleet),
    Remote(RemoteFleet),
}

/// Splits `spec` (the whole run) into `parts` fleets of consecutive terminals.
pub fn split(spec: &FleetSpec, parts: usize) -> Vec<FleetSpec> {
    let parts = parts.max(1) as u64;
    let mut out = Vec::new();
    let mut first = spec.first;
    for i in 0..parts {
        let count = spec.count / parts + u64::from(i < spec.count % parts);
        let mut s = spec.clone();
        s.first = first;
        s.count = count;
        s.connect_rate = if spec.count > 0 { spec.connect_rate * count as f64 / spec.count as f64 } else { 0.0 };
        first += count;
        out.push(s);
    }
    out
}

impl Fleet {
    /// Starts the fleets of a run: in this process when `spec.count <= per_process_max`,
    /// else in `ceil(count / per_process_max)` worker processes.
    pub fn start_all(spec: &FleetSpec, per_process_max: u64) -> io::Result<Vec<Fleet>> {
        if spec.count <= per_process_max {
            return Ok(vec![Fleet::Local(LocalFleet::start(spec.clone())?)]);
        }
        let n = spec.count.div_ceil(per_process_max.max(1)) as usize;
        split(spec, n).into_iter().map(|s| RemoteFleet::start(&s).map(Fleet::Remote)).collect()
    }

    pub fn progress(&self) -> FleetProgress {
        match self {
            Fleet::Local(f) => f.progress(),
            Fleet::Remote(f) => f.progress(),
        }
    }

    pub fn stop(self) -> FleetReport {
        match self {
            Fleet::Local(f) => f.stop(),
            Fleet::Remote(f) => f.stop(),
        }
    }

    /// Passes an order to the fleet's threads; returns its number in the fleet's order log
    /// (from 1): the fleet's progress reflects it once its `orders_applied` reaches that
    /// number.
    pub fn command(&self, cmd: &FleetCmd) -> u64 {
        match self {
            Fleet::Local(f) => f.command(cmd.clone()),
            Fleet::Remote(f) => f.command(cmd),
        }
    }

    /// Live counters of distinct messages received (a worker's lag behind by its progress
    /// period).
    pub fn live(&self) -> Vec<Arc<AtomicU64>> {
        match self {
            Fleet::Local(f) => f.live(),
            Fleet::Remote(f) => vec![f.live.clone()],
        }
    }

    /// The worker process, if any (for CPU and RSS sampling).
    pub fn pid(&self) -> Option<u32> {
        match self {
            Fleet::Local(_) => None,
            Fleet::Remote(f) => Some(f.child.id()),
        }
    }
}

#[derive(Default)]
struct RemoteState {
    progress: FleetProgress,
    interval: Option<Hist>,
    report: Option<FleetReport>,
    error: Option<String>,
    ended: bool,
}

/// A worker process running one fleet.
pub struct RemoteFleet {
    child: Child,
    stdin: Mutex<Option<ChildStdin>>,
    state: Arc<Mutex<RemoteState>>,
    live: Arc<AtomicU64>,
    /// The worker's terminals (its report lists them all, even when it is lost).
    count: u64,
    /// Orders written to the worker: its order log holds them in the same order.
    orders: AtomicU64,
}

impl RemoteFleet {
    pub fn start(spec: &FleetSpec) -> io::Result<RemoteFleet> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .arg("worker")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let mut stdin = child.stdin.take().ok_or(io::Error::other("no stdin"))?;
        let stdout = child.stdout.take().ok_or(io::Error::other("no stdout"))?;
        writeln!(stdin, "{}", serde_json::to_string(spec)?)?;
        stdin.flush()?;
        let state = Arc::new(Mutex::new(RemoteState::default()));
        let st = state.clone();
        let live = Arc::new(AtomicU64::new(0));
        let live2 = live.clone();
        std::thread::Builder::new().name("lt-worker-rx".into()).spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let msg = serde_json::from_str::<WorkerMsg>(&line);
                let mut s = st.lock().unwrap_or_else(|e| e.into_inner());
                match msg {
                    Ok(WorkerMsg::Progress(p)) => {
                        live2.store(p.counters.received, Ordering::Relaxed);
                        s.interval.get_or_insert_with(Hist::new).add_data(&p.interval_latency);
                        s.progress = *p;
                    }
                    Ok(WorkerMsg::Final(r)) => s.report = Some(*r),
                    Ok(WorkerMsg::Error(e)) => s.error = Some(e),
                    Err(e) => s.error = Some(format!("worker said {line:?}: {e}")),
                }
            }
            st.lock().unwrap_or_else(|e| e.into_inner()).ended = true;
        })?;
        Ok(RemoteFleet {
            child,
            stdin: Mutex::new(Some(stdin)),
            state,
            live,
            count: spec.count,
            orders: AtomicU64::new(0),
        })
    }

    /// Writes an order to the worker; returns its number in the worker's order log (an order
    /// the worker never gets keeps its number: its progress then never reflects it).
    fn command(&self, cmd: &FleetCmd) -> u64 {
        let mut stdin = self.stdin.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = stdin.as_mut() {
            let _ = writeln!(s, "{}", serde_json::to_string(cmd).unwrap_or_default());
            let _ = s.flush();
        }
        self.orders.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn progress(&self) -> FleetProgress {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut p = s.progress.clone();
        p.interval_latency = s.interval.take().map(|h| h.data()).unwrap_or_default();
        p
    }

    fn stop(mut self) -> FleetReport {
        if let Some(mut stdin) = self.stdin.get_mut().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = writeln!(stdin, "stop");
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            {
                let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(r) = s.report.take() {
                    drop(s);
                    let _ = self.child.wait();
                    return r;
                }
                if s.ended || Instant::now() > deadline {
                    let why = s.error.clone().unwrap_or_else(|| "worker ended without a report".into());
                    let r = lost_worker_report(&s.progress.counters, self.count, &why);
                    drop(s);
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return r;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RemoteFleet {
    fn drop(&mut self) {
        drop(self.stdin.get_mut().unwrap_or_else(|e| e.into_inner()).take());
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The account of a worker that ended without its report: what its last progress said, and
/// every terminal it held counted as dropped (those it had not settled as failed), so the run
/// fails and says why. Its per-terminal accounts went with it: it lists `count` terminals
/// received nothing and down at the end (their messages are unreachable, not counted lost or
/// delivered), so the fleets after it keep their places in the merged report.
fn lost_worker_report(last: &crate::stats::Counters, count: u64, why: &str) -> FleetReport {
    let reason = format!("worker lost: {why}");
    let mut r = FleetReport { counters: last.clone(), ..Default::default() };
    let c = &mut r.counters;
    if c.failed > 0 {
        r.failures.insert("(reasons lost with the worker)".into(), c.failed);
    }
    let unsettled = count.saturating_sub(c.welcomed + c.failed);
    if unsettled > 0 {
        c.failed += unsettled;
        r.failures.insert(reason.clone(), unsettled);
    }
    let open = c.open();
    if open > 0 {
        c.dropped += open;
        r.drops.insert(reason, open);
    }
    r.per_user_received = vec![0; count as usize];
    r.up = vec![false; count as usize];
    r
}

/// Entry of `ether-loadtest worker`.
pub fn worker_main() -> io::Result<()> {
    crate::procstat::raise_nofile_limit();
    let stdin = io::stdin();
    let mut line = String::new();
    stdin.lock().read_line(&mut line)?;
    let out = Arc::new(Mutex::new(io::stdout()));
    let say = |m: &WorkerMsg| {
        let mut o = out.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(o, "{}", serde_json::to_string(m).unwrap_or_default());
        let _ = o.flush();
    };
    let spec: FleetSpec = match serde_json::from_str(line.trim()) {
        Ok(s) => s,
        Err(e) => {
            say(&WorkerMsg::Error(format!("bad fleet spec: {e}")));
            return Ok(());
        }
    };
    let fleet = match LocalFleet::start(spec) {
        Ok(f) => f,
        Err(e) => {
            say(&WorkerMsg::Error(format!("cannot start fleet: {e}")));
            return Ok(());
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let control = fleet.control();
    std::thread::spawn(move || {
        let mut l = String::new();
        loop {
            l.clear();
            match io::stdin().lock().read_line(&mut l) {
                Ok(n) if n > 0 && l.trim() != "stop" => {
                    if let Ok(cmd) = serde_json::from_str::<FleetCmd>(l.trim()) {
                        control.lock().unwrap_or_else(|e| e.into_inner()).push(cmd);
                    }
                }
                _ => break,
            }
        }
        s2.store(true, Ordering::SeqCst);
    });
    while !stop.load(Ordering::SeqCst) {
        say(&WorkerMsg::Progress(Box::new(fleet.progress())));
        for _ in 0..5 {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let report = fleet.stop();
    say(&WorkerMsg::Final(Box::new(report)));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_worker_counts_its_terminals_dropped_and_keeps_the_others_in_place() {
        // The lost worker's last progress: 3 welcomed of 4 (one not settled yet), 5 received.
        let last = crate::stats::Counters { welcomed: 3, received: 5, ..Default::default() };
        let lost = lost_worker_report(&last, 4, "killed");
        assert_eq!((lost.counters.dropped, lost.counters.failed), (3, 1));
        assert_eq!(lost.drops.get("worker lost: killed"), Some(&3));
        assert_eq!(lost.failures.get("worker lost: killed"), Some(&1));
        // The next worker's terminals keep their global places; the lost ones are down.
        let next = FleetReport {
            per_user_received: vec![7, 8],
            ids: vec![vec![1], vec![2]],
            up: vec![true, true],
            ..Default::default()
        };
        let m = FleetReport::merge(vec![lost, next]);
        assert_eq!(m.per_user_received, vec![0, 0, 0, 0, 7, 8]);
        assert_eq!(m.up, vec![false, false, false, false, true, true]);
        assert_eq!(m.ids, vec![vec![], vec![], vec![], vec![], vec![1], vec![2]]);
        // Without `up` from the others (not `reconnect`), theirs are up.
        let other = FleetReport { per_user_received: vec![7], ..Default::default() };
        let m = FleetReport::merge(vec![other, lost_worker_report(&last, 2, "killed")]);
        assert_eq!(m.up, vec![true, false, false]);
    }

    #[test]
    fn split_covers_every_terminal_once() {
        let spec = FleetSpec { connect_rate: 100.0, ..FleetSpec::for_tests(10) };
        let parts = split(&spec, 3);
        assert_eq!(parts.iter().map(|p| (p.first, p.count)).collect::<Vec<_>>(), vec![(0, 4), (4, 3), (7, 3)]);
        let rate: f64 = parts.iter().map(|p| p.connect_rate).sum();
        assert!((rate - 100.0).abs() < 1e-9);
    }
}
