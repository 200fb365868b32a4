//! Process and kernel figures from /proc: RSS (`VmRSS`), CPU time (`utime + stime`), kernel
//! TCP socket memory (`/proc/net/sockstat`, `TCP: ... mem N` in pages), the fd limit.
use serde::Serialize;
use std::time::Instant;

/// Clock ticks per second for /proc/PID/stat times.
pub fn clk_tck() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

/// Resident set size of `pid` in bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vmrss(&s)
}

fn parse_vmrss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// User + system CPU time of `pid` (all its threads), in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_cpu(&s)
}

fn parse_stat_cpu(stat: &str) -> Option<u64> {
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state(0) ppid(1) ... utime is field 14 of the line = index 11 here.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Kernel TCP figures from /proc/net/sockstat.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct SockStat {
    pub tcp_inuse: u64,
    pub tcp_alloc: u64,
    /// `mem` pages times the page size: socket buffers in use.
    pub tcp_mem_bytes: u64,
    /// `Slab:` of /proc/meminfo: kernel objects, where idle sockets live (system-wide).
    pub slab_bytes: u64,
}

pub fn sockstat() -> SockStat {
    let mut s =
        std::fs::read_to_string("/proc/net/sockstat").ok().map(|s| parse_sockstat(&s, page_size())).unwrap_or_default();
    s.slab_bytes = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let l = m.lines().find(|l| l.starts_with("Slab:"))?;
            l.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0);
    s
}

fn parse_sockstat(s: &str, page: u64) -> SockStat {
    let mut out = SockStat::default();
    for line in s.lines() {
        let Some(rest) = line.strip_prefix("TCP:") else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        for pair in f.chunks(2) {
            if let [k, v] = pair {
                let v: u64 = v.parse().unwrap_or(0);
                match *k {
                    "inuse" => out.tcp_inuse = v,
                    "alloc" => out.tcp_alloc = v,
                    "mem" => out.tcp_mem_bytes = v * page,
                    _ => {}
                }
            }
        }
    }
    out
}

/// Raises the soft fd limit to the hard one; returns the limit in force.
pub fn raise_nofile_limit() -> u64 {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: r is a valid rlimit to fill in / read from.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 1024;
        }
        if r.rlim_cur < r.rlim_max {
            let want = libc::rlimit { rlim_cur: r.rlim_max, rlim_max: r.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                r.rlim_cur = r.rlim_max;
            }
        }
    }
    r.rlim_cur
}

/// CPU use of a set of processes, in percent of one core, between successive samples.
pub struct CpuMeter {
    /// Empty: the whole machine.
    pids: Vec<u32>,
    last: Option<(Instant, u64)>,
    first: Option<(Instant, u64)>,
    tck: u64,
}

impl CpuMeter {
    pub fn new(pids: Vec<u32>) -> CpuMeter {
        let mut m = CpuMeter { pids, last: None, first: None, tck: clk_tck() };
        m.sample();
        m.first = m.last;
        m
    }

    /// A meter of the whole machine's busy time (percent of one core, up to cores x 100).
    pub fn machine() -> CpuMeter {
        CpuMeter::new(Vec::new())
    }

    fn total(&self) -> u64 {
        if self.pids.is_empty() {
            return machine_busy_ticks().unwrap_or(0);
        }
        self.pids.iter().filter_map(|p| cpu_ticks(*p)).sum()
    }

    /// Percent of one core since the previous sample.
    pub fn sample(&mut self) -> f64 {
        let now = (Instant::now(), self.total());
        let pct = match self.last {
            Some(prev) => pct(prev, now, self.tck),
            None => 0.0,
        };
        self.last = Some(now);
        pct
    }

    /// Restarts the long average (e.g. at the start of a measured phase).
    pub fn mark(&mut self) {
        self.first = Some((Instant::now(), self.total()));
    }

    /// Percent of one core since the last `mark` (or creation).
    pub fn average(&self) -> f64 {
        match self.first {
            Some(first) => pct(first, (Instant::now(), self.total()), self.tck),
            None => 0.0,
        }
    }

    /// CPU seconds used since the last `mark`.
    pub fn seconds_since_mark(&self) -> f64 {
        match self.first {
            Some((_, t0)) => self.total().saturating_sub(t0) as f64 / self.tck as f64,
            None => 0.0,
        }
    }
}

fn pct(a: (Instant, u64), b: (Instant, u64), tck: u64) -> f64 {
    let dt = b.0.duration_since(a.0).as_secs_f64();
    if dt <= 0.0 {
        return 0.0;
    }
    (b.1.saturating_sub(a.1)) as f64 / tck as f64 / dt * 100.0
}

/// CPU use of every thread of a set of processes (`/proc/PID/task/TID/stat`): the busiest
/// one's share of a core. A process's total over its threads cannot tell a tool whose one
/// terminal thread is pegged (100% of a core: the tool's limit) beside an idle API thread
/// (130% of two threads' 200%) from one with room to spare.
pub struct ThreadCpuMeter {
    pids: Vec<u32>,
    /// Per thread id: its name and CPU ticks at the mark.
    at_mark: (Instant, std::collections::HashMap<u32, (String, u64)>),
    tck: u64,
}

impl ThreadCpuMeter {
    pub fn new(pids: Vec<u32>) -> ThreadCpuMeter {
        let at_mark = (Instant::now(), thread_ticks(&pids));
        ThreadCpuMeter { pids, at_mark, tck: clk_tck() }
    }

    /// Restarts the measurement.
    pub fn mark(&mut self) {
        self.at_mark = (Instant::now(), thread_ticks(&self.pids));
    }

    /// The busiest thread since the mark: its name and percent of one core.
    pub fn busiest(&self) -> Option<(String, f64)> {
        let dt = self.at_mark.0.elapsed().as_secs_f64();
        busiest_thread(&self.at_mark.1, &thread_ticks(&self.pids), dt, self.tck)
    }
}

/// Name and CPU ticks of every thread of `pids`, by thread id.
fn thread_ticks(pids: &[u32]) -> std::collections::HashMap<u32, (String, u64)> {
    let mut out = std::collections::HashMap::new();
    for pid in pids {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { continue };
        for e in dir.flatten() {
            let Some(tid) = e.file_name().to_str().and_then(|t| t.parse::<u32>().ok()) else { continue };
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
            if let (Some(name), Some(ticks)) = (parse_stat_comm(&stat), parse_stat_cpu(&stat)) {
                out.insert(tid, (name.to_owned(), ticks));
            }
        }
    }
    out
}

/// The thread that used the most CPU between two readings `dt` seconds apart (a thread
/// started since the first counts from zero): its name and percent of one core.
fn busiest_thread(
    before: &std::collections::HashMap<u32, (String, u64)>,
    after: &std::collections::HashMap<u32, (String, u64)>,
    dt: f64,
    tck: u64,
) -> Option<(String, f64)> {
    if dt <= 0.0 {
        return None;
    }
    after
        .iter()
        .map(|(tid, (name, ticks))| {
            let was = before.get(tid).map_or(0, |b| b.1);
            (name, ticks.saturating_sub(was) as f64 / tck as f64 / dt * 100.0)
        })
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(name, pct)| (name.clone(), pct))
}

/// The command (thread) name of a `stat` line: between the first '(' and the last ')'.
fn parse_stat_comm(stat: &str) -> Option<&str> {
    stat.get(stat.find('(')? + 1..stat.rfind(')')?)
}

/// Busy CPU ticks of the whole machine (all cores) from /proc/stat.
pub fn machine_busy_ticks() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    parse_machine_busy(&s)
}

fn parse_machine_busy(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let total: u64 = f.iter().take(8).sum();
    let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
    Some(total.saturating_sub(idle))
}

/// Sum of RSS over `pids`.
pub fn rss_sum(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|p| rss_bytes(*p)).sum()
}

/// `rss_sum` once it stopped changing (the same three reads 100 ms apart), or after `max`.
pub fn settled_rss(pids: &[u32], max: std::time::Duration) -> u64 {
    let start = std::time::Instant::now();
    let mut last = rss_sum(pids);
    let mut same = 0;
    while same < 2 && start.elapsed() < max {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let now = rss_sum(pids);
        same = if now == last { same + 1 } else { 0 };
        last = now;
    }
    last
}

/// Bytes waiting unread in the kernel receive queues of established TCP sockets connected to
/// `port` (any address), and how many such sockets: the tool's terminals when `port` is the
/// node's client port (`/proc/net/tcp` and `tcp6`, this network namespace).
pub fn tcp_unread_to(port: u16) -> (u64, u64) {
    let mut total = (0, 0);
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(s) = std::fs::read_to_string(f) {
            let (bytes, n) = parse_unread_to(&s, port);
            total = (total.0 + bytes, total.1 + n);
        }
    }
    total
}

/// `/proc/net/tcp` lines: `sl local rem st tx_queue:rx_queue ...`, addresses `HEXIP:HEXPORT`.
fn parse_unread_to(s: &str, port: u16) -> (u64, u64) {
    let mut out = (0, 0);
    for line in s.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().take(5).collect();
        let [_, _, rem, st, queues] = f[..] else { continue };
        let rem_port = rem.rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
        if rem_port != Some(port) || st != "01" {
            continue;
        }
        if let Some(rx) = queues.split(':').nth(1).and_then(|q| u64::from_str_radix(q, 16).ok()) {
            out = (out.0 + rx, out.1 + 1);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unread_bytes_of_sockets_to_a_port() {
        let s = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:A1B2 0100007F:1F90 01 00000000:00000400 00:00000000 00000000     0        0 1
   1: 0100007F:A1B3 0100007F:1F90 01 00000010:00000001 00:00000000 00000000     0        0 2
   2: 0100007F:1F90 0100007F:A1B2 01 00000000:00000009 00:00000000 00000000     0        0 3
   3: 0100007F:A1B4 0100007F:1F90 06 00000000:00000100 00:00000000 00000000     0        0 4
";
        // Two established sockets to port 8080 (0x1F90): 0x400 + 0x1 bytes unread; the server
        // side (local 8080) and a socket in TIME_WAIT (06) do not count.
        assert_eq!(parse_unread_to(s, 8080), (1025, 2));
        assert_eq!(parse_unread_to(s, 1), (0, 0));
    }

    #[test]
    fn parses_proc_formats() {
        assert_eq!(parse_vmrss("Name:\tx\nVmRSS:\t  1234 kB\nVmData: 5 kB\n"), Some(1234 * 1024));
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 17 5 0 0 20 0 1 0 1 1 1";
        assert_eq!(parse_stat_cpu(stat), Some(22));
        let ss = "sockets: used 10\nTCP: inuse 3 orphan 0 tw 1 alloc 7 mem 12\nUDP: inuse 1 mem 2\n";
        assert_eq!(parse_machine_busy("cpu  10 1 5 100 7 1 1 0 0 0\ncpu0 1 1 1 1 1 1 1 1\n"), Some(18));
        let s = parse_sockstat(ss, 4096);
        assert_eq!((s.tcp_inuse, s.tcp_alloc, s.tcp_mem_bytes), (3, 7, 12 * 4096));
    }

    #[test]
    fn the_busiest_thread_is_found_whatever_the_process_total() {
        let t = |name: &str, ticks| (name.to_owned(), ticks);
        // Over 2 s at 100 ticks/s: the terminal thread used 196 ticks (98% of a core), the
        // API thread 40 (20%), a thread started meanwhile 10 (5%): 123% for the process, of
        // its two main threads' 200%, yet one of them had no room left.
        let before = [(10, t("lt-term-0", 1000)), (11, t("lt-api", 50))].into_iter().collect();
        let after =
            [(10, t("lt-term-0", 1196)), (11, t("lt-api", 90)), (12, t("lt-worker-rx", 10))].into_iter().collect();
        let (name, pct) = busiest_thread(&before, &after, 2.0, 100).unwrap();
        assert_eq!(name, "lt-term-0");
        assert!((pct - 98.0).abs() < 1e-9, "{pct}");
        assert_eq!(busiest_thread(&before, &after, 0.0, 100), None);
        assert_eq!(parse_stat_comm("42 (lt-term-0) S 1 2"), Some("lt-term-0"));
        assert_eq!(parse_stat_comm("42 (a (b) c) S 1 2"), Some("a (b) c"));
        let me = ThreadCpuMeter::new(vec![std::process::id()]);
        assert!(me.busiest().is_some(), "this process's threads are readable");
    }

    #[test]
    fn self_figures_are_readable() {
        let me = std::process::id();
        assert!(rss_bytes(me).unwrap() > 0);
        assert!(cpu_ticks(me).is_some());
        assert!(raise_nofile_limit() >= 256);
    }
}
