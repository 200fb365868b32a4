//! `ether-store-bench`: messages made durable per second through the storage thread, and the
//! latency from submit to committed completion, for `synchronous=NORMAL` and `FULL`.
//!
//! ```sh
//! cargo build --release -p ether-store
//! target/release/ether-store-bench --seconds 20 --users 100000 --submitters 2
//! ```
//! Records `bench-results/<date>-storage/{summary.md,result.json}` and the `storage` row of
//! `bench-results/README.md` (unless `--no-record`).
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ether_proto::Kind;
use ether_store::{
    Durability, NewMessage, Op, Reply, SqliteBackend, SqliteOptions, StoreCmd, StoreError, StoreOptions, StoreThread,
};
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};

struct Args {
    seconds: u64,
    users: u64,
    submitters: usize,
    in_flight: usize,
    modes: Vec<Durability>,
    data: PathBuf,
    out: PathBuf,
    record: bool,
    body_bytes: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        seconds: 20,
        users: 100_000,
        submitters: 2,
        in_flight: 8192,
        modes: vec![Durability::Normal, Durability::Full],
        data: std::env::temp_dir(),
        out: PathBuf::from("bench-results"),
        record: true,
        body_bytes: 100,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or(format!("{k}: needs a value"));
        match k.as_str() {
            "--seconds" => a.seconds = v()?.parse().map_err(|e| format!("{k}: {e}"))?,
            "--users" => a.users = v()?.parse().map_err(|e| format!("{k}: {e}"))?,
            "--submitters" => a.submitters = v()?.parse().map_err(|e| format!("{k}: {e}"))?,
            "--in-flight" => a.in_flight = v()?.parse().map_err(|e| format!("{k}: {e}"))?,
            "--body-bytes" => a.body_bytes = v()?.parse().map_err(|e| format!("{k}: {e}"))?,
            "--durability" => {
                a.modes = match v()?.as_str() {
                    "normal" => vec![Durability::Normal],
                    "full" => vec![Durability::Full],
                    "both" => vec![Durability::Normal, Durability::Full],
                    o => return Err(format!("--durability: normal|full|both, not {o}")),
                }
            }
            "--data" => a.data = v()?.into(),
            "--out" => a.out = v()?.into(),
            "--no-record" => a.record = false,
            "-h" | "--help" => {
                return Err("usage: ether-store-bench [--seconds 20] [--users 100000] \
                     [--submitters 2] [--in-flight 8192] [--body-bytes 100] \
                     [--durability normal|full|both] [--data DIR] [--out bench-results] \
                     [--no-record]"
                    .into())
            }
            o => return Err(format!("unknown argument {o}")),
        }
    }
    Ok(a)
}

/// CPU jiffies: (this process utime+stime, machine busy, machine total).
fn cpu_sample() -> (u64, u64, u64) {
    let me = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1.to_owned();
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    let (busy, total) = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let l = s.lines().next()?.to_owned();
            let v: Vec<u64> = l.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
            let total: u64 = v.iter().sum();
            let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
            Some((total - idle, total))
        })
        .unwrap_or((0, 1));
    (me, busy, total)
}

struct RunResult {
    mode: &'static str,
    seconds: f64,
    committed: u64,
    errors: u64,
    overloaded: u64,
    msgs_per_s: f64,
    batches: u64,
    batch_avg: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    cpu_self_pct: f64,
    cpu_machine_pct: f64,
    cpu_others_pct: f64,
    db_bytes: u64,
    wal_bytes: u64,
    verified: bool,
}

fn run(a: &Args, mode: Durability) -> Result<RunResult, String> {
    let mode_name = match mode {
        Durability::Normal => "NORMAL",
        Durability::Full => "FULL",
    };
    let dir = tempfile::Builder::new()
        .prefix("ether-store-bench")
        .tempdir_in(&a.data)
        .map_err(|e| format!("temp dir: {e}"))?;
    let db = dir.path().join("ether.db");
    let backend = SqliteBackend::open(&db, SqliteOptions { durability: mode, ..SqliteOptions::default() })
        .map_err(|e| e.to_string())?;
    let opts = StoreOptions::default();
    let h = StoreThread::spawn(backend, opts.clone()).map_err(|e| e.to_string())?;
    let hist =
        Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(1_000, 60_000_000_000, 3).map_err(|e| e.to_string())?));
    let committed = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let overloaded = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let ms0 = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let text = "x".repeat(a.body_bytes.saturating_sub(12));
    let window = (a.in_flight / a.submitters.max(1)).max(1) as u64;
    let cpu0 = cpu_sample();
    let t0 = Instant::now();
    let mut joins = Vec::new();
    for t in 0..a.submitters {
        let (h, hist, committed, errors, overloaded, stop) =
            (h.clone(), hist.clone(), committed.clone(), errors.clone(), overloaded.clone(), stop.clone());
        let text = text.clone();
        let users = a.users.max(2);
        joins.push(std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(t as u64 + 1);
            let in_flight = Arc::new(AtomicU64::new(0));
            let mut n: u64 = 0;
            while !stop.load(Ordering::Relaxed) {
                if in_flight.load(Ordering::Relaxed) >= window {
                    std::thread::sleep(Duration::from_micros(100));
                    continue;
                }
                let from = rng.gen_range(0..users);
                let mut to = rng.gen_range(0..users);
                if to == from {
                    to = (to + 1) % users;
                }
                // Engine-like ids: time-ordered, unique per submitter ("shard").
                let ms = ms0 + t0.elapsed().as_millis() as u64;
                let id = (ms << 20) | ((t as u64) << 14) | (n & 0x3FFF);
                let id = id + ((n >> 14) << 20);
                n += 1;
                let op = Op::Append(NewMessage {
                    id,
                    ts: ms,
                    from: format!("user{from}"),
                    to: format!("user{to}"),
                    kind: Kind::Text,
                    body: format!("{{\"text\":\"{text}\"}}"),
                    cid: Some(format!("c{t}-{n}")),
                });
                let start = Instant::now();
                let (hist, committed, errors, inf) =
                    (hist.clone(), committed.clone(), errors.clone(), in_flight.clone());
                in_flight.fetch_add(1, Ordering::Relaxed);
                let cmd = StoreCmd::new(op, move |r: Result<Reply, StoreError>| {
                    inf.fetch_sub(1, Ordering::Relaxed);
                    if r.is_ok() {
                        committed.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut hg) = hist.lock() {
                            let _ = hg.record(start.elapsed().as_nanos() as u64);
                        }
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                });
                if let Err(e) = h.submit(cmd) {
                    in_flight.fetch_sub(1, Ordering::Relaxed);
                    overloaded.fetch_add(1, Ordering::Relaxed);
                    if e != StoreError::Overloaded {
                        return;
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
            while in_flight.load(Ordering::Relaxed) > 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }));
    }
    let mut last = 0;
    for s in 1..=a.seconds {
        std::thread::sleep(Duration::from_secs(1));
        let c = committed.load(Ordering::Relaxed);
        eprintln!(
            "{mode_name} t={s}s {} msgs/s, queue {}, pending index {}",
            c - last,
            h.queued(),
            h.stats().pending_entries.load(Ordering::Relaxed)
        );
        last = c;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let done = committed.load(Ordering::Relaxed);
    let cpu1 = cpu_sample();
    stop.store(true, Ordering::Relaxed);
    for j in joins {
        let _ = j.join();
    }
    let batches = h.stats().batches.load(Ordering::Relaxed);
    let ops = h.stats().ops.load(Ordering::Relaxed);
    // Spot check: a random user's inbox reads back gap-free.
    let verified = match h.call_blocking(Op::ReadInbox { user: "user1".into(), after_seq: 0, limit: 1000 }) {
        Ok(Reply::Page(p)) => p.entries.iter().enumerate().all(|(i, e)| e.seq == i as u64 + 1),
        _ => false,
    };
    h.shutdown();
    let hz = 100.0; // USER_HZ
    let wall = elapsed;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let self_pct = (cpu1.0 - cpu0.0) as f64 / hz / wall * 100.0;
    let mach_pct = (cpu1.1 - cpu0.1) as f64 / (cpu1.2 - cpu0.2).max(1) as f64 * 100.0 * cores;
    let hg = hist.lock().map_err(|_| "histogram lock".to_string())?;
    let ms = |ns: u64| ns as f64 / 1e6;
    let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    let r = RunResult {
        mode: mode_name,
        seconds: elapsed,
        committed: done,
        errors: errors.load(Ordering::Relaxed),
        overloaded: overloaded.load(Ordering::Relaxed),
        msgs_per_s: done as f64 / elapsed,
        batches,
        batch_avg: ops as f64 / batches.max(1) as f64,
        p50_ms: ms(hg.value_at_quantile(0.50)),
        p99_ms: ms(hg.value_at_quantile(0.99)),
        p999_ms: ms(hg.value_at_quantile(0.999)),
        max_ms: ms(hg.max()),
        cpu_self_pct: self_pct,
        cpu_machine_pct: mach_pct,
        cpu_others_pct: (mach_pct - self_pct).max(0.0),
        db_bytes: size(&db),
        wal_bytes: size(&dir.path().join("ether.db-wal")),
        verified,
    };
    Ok(r)
}

fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn main() {
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let mut results = Vec::new();
    for &m in &a.modes {
        match run(&a, m) {
            Ok(r) => results.push(r),
            Err(e) => {
                eprintln!("run failed: {e}");
                std::process::exit(1);
            }
        }
    }
    let target = |r: &RunResult| match r.mode {
        "NORMAL" => r.msgs_per_s >= 100_000.0 && r.p99_ms <= 20.0,
        _ => r.msgs_per_s >= 50_000.0,
    };
    let date = sh("date", &["-u", "+%Y-%m-%d"]);
    let rev = sh("git", &["rev-parse", "HEAD"]);
    let dirty = !sh("git", &["status", "--porcelain"]).is_empty();
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_default();
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let mut rows = String::new();
    for r in &results {
        rows.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0}% | {:.0}% | {} | {} | {} |\n",
            r.mode,
            r.msgs_per_s,
            r.batch_avg,
            r.p50_ms,
            r.p99_ms,
            r.p999_ms,
            r.max_ms,
            r.cpu_self_pct,
            r.cpu_others_pct,
            r.errors,
            if r.verified { "yes" } else { "NO" },
            if target(r) { "met" } else { "MISSED" },
        ));
    }
    let summary = format!(
        "# Storage benchmark {date}\n\n\
         Messages made durable per second through the storage thread (`StoreThread` + \
         `SqliteBackend`), single-chat appends between {users} distinct users (random pairs), \
         ~{body} B text bodies, every message with a `cid`; {subs} submitter threads at full \
         speed with at most {inflight} messages in flight; {secs} s per mode. Latency = submit \
         to completion (queue + group commit + completion), hdrhistogram.\n\n\
         | mode | msgs/s | avg batch | p50 ms | p99 ms | p99.9 ms | max ms | CPU bench proc | CPU others | errors | read-back | target |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n{rows}\n\
         Targets: NORMAL >= 100,000 msgs/s with p99 <= 20 ms; FULL >= 50,000 msgs/s.\n\n\
         Machine: {nproc} cores, {cpu_model}; load average at the end: {load}. CPU columns are \
         percent of one core (the bench process includes the submitter threads, the storage \
         thread and the checkpointer); \"others\" is the rest of the machine over the run.\n\n\
         Command: `{command}` — git {rev}{dirty}\n",
        users = a.users,
        body = a.body_bytes,
        subs = a.submitters,
        inflight = a.in_flight,
        secs = a.seconds,
        load = loadavg.trim(),
        rev = rev,
        dirty = if dirty { " (uncommitted changes)" } else { "" },
    );
    print!("{summary}");
    if !a.record {
        return;
    }
    let run_dir = format!("{date}-storage");
    let dir = a.out.join(&run_dir);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("create {}: {e}", dir.display());
        std::process::exit(1);
    }
    let json = serde_json::json!({
        "scenario": "storage",
        "date": date,
        "command": command,
        "git_revision": rev,
        "git_dirty": dirty,
        "machine": {"nproc": nproc, "cpu_model": cpu_model, "loadavg_end": loadavg.trim()},
        "workload": {
            "users": a.users, "submitters": a.submitters, "in_flight_max": a.in_flight,
            "body_bytes": a.body_bytes, "seconds": a.seconds, "cid": true,
            "store_options": {"batch_ops_max": StoreOptions::default().batch_ops_max,
                "batch_wait_ms": StoreOptions::default().batch_wait.as_millis() as u64},
        },
        "results": results.iter().map(|r| serde_json::json!({
            "durability": r.mode, "seconds": r.seconds, "committed": r.committed,
            "errors": r.errors, "refused_overloaded": r.overloaded,
            "msgs_per_s": r.msgs_per_s, "batches": r.batches, "batch_avg": r.batch_avg,
            "latency_ms": {"p50": r.p50_ms, "p99": r.p99_ms, "p999": r.p999_ms, "max": r.max_ms},
            "cpu_pct_of_one_core": {"bench_process": r.cpu_self_pct, "machine": r.cpu_machine_pct,
                "others": r.cpu_others_pct},
            "db_bytes": r.db_bytes, "wal_bytes": r.wal_bytes, "read_back_ok": r.verified,
            "target_met": target(r),
        })).collect::<Vec<_>>(),
    });
    let write = |p: PathBuf, s: String| {
        if let Err(e) = std::fs::write(&p, s) {
            eprintln!("write {}: {e}", p.display());
            std::process::exit(1);
        }
    };
    write(dir.join("summary.md"), summary);
    write(dir.join("result.json"), serde_json::to_string_pretty(&json).unwrap_or_default() + "\n");
    let headline = results
        .iter()
        .map(|r| format!("{} {:.0} msgs/s, p99 {:.1} ms", r.mode, r.msgs_per_s, r.p99_ms))
        .collect::<Vec<_>>()
        .join("; ");
    let all_met = results.iter().all(target);
    let errors: u64 = results.iter().map(|r| r.errors).sum();
    let row = format!(
        "| storage | {date} | ether-store (SQLite) | {} users, {} submitters, {} s/mode | {headline} | - | {errors} errors | {} | [{run_dir}]({run_dir}/summary.md) |",
        a.users,
        a.submitters,
        a.seconds,
        if all_met && errors == 0 { "pass" } else { "FAIL (target missed)" },
    );
    update_readme(&a.out.join("README.md"), &row);
}

/// Replaces the `storage` row of the results table (or adds it before the end marker).
fn update_readme(path: &Path, row: &str) {
    let Ok(s) = std::fs::read_to_string(path) else {
        eprintln!("{} not found: row not recorded", path.display());
        return;
    };
    let mut out: Vec<String> = Vec::new();
    let mut placed = false;
    for line in s.lines() {
        if line.starts_with("| storage |") {
            if !placed {
                out.push(row.to_owned());
                placed = true;
            }
            continue;
        }
        if line.trim() == "<!-- results:end -->" && !placed {
            out.push(row.to_owned());
            placed = true;
        }
        out.push(line.to_owned());
    }
    let mut text = out.join("\n");
    text.push('\n');
    if let Err(e) = std::fs::write(path, text) {
        eprintln!("write {}: {e}", path.display());
    }
}
