//! Counting: HDR histograms (in microseconds), per-user sequence tracking, and the
//! serializable progress and report types that fleets (threads or worker processes) send to
//! the coordinator.
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// A histogram of microseconds, auto-resizing, 3 significant figures.
#[derive(Clone)]
pub struct Hist(pub Histogram<u64>);

impl std::fmt::Debug for Hist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Hist({} values)", self.count())
    }
}

impl Default for Hist {
    fn default() -> Self {
        Hist::new()
    }
}

impl Hist {
    pub fn new() -> Hist {
        // 3 significant figures with auto-resize cannot fail.
        let mut h = Histogram::<u64>::new(3).unwrap_or_else(|_| unreachable!());
        h.auto(true);
        Hist(h)
    }

    pub fn record_us(&mut self, us: u64) {
        let _ = self.0.record(us.max(1));
    }

    pub fn record_nanos(&mut self, ns: u64) {
        self.record_us(ns / 1000);
    }

    pub fn add(&mut self, other: &Hist) {
        let _ = self.0.add(&other.0);
    }

    pub fn add_data(&mut self, d: &HistData) {
        for &(v, c) in &d.0 {
            let _ = self.0.record_n(v.max(1), c);
        }
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// Value at quantile `q` (0..=1), in milliseconds; 0 when empty.
    pub fn q_ms(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        self.0.value_at_quantile(q) as f64 / 1000.0
    }

    pub fn data(&self) -> HistData {
        HistData(self.0.iter_recorded().map(|v| (v.value_iterated_to(), v.count_at_value())).collect())
    }

    pub fn reset(&mut self) {
        self.0.reset();
    }

    /// A compact summary for reports.
    pub fn summary(&self) -> LatencySummary {
        LatencySummary {
            count: self.count(),
            min_ms: if self.0.is_empty() { 0.0 } else { self.0.min() as f64 / 1000.0 },
            p50_ms: self.q_ms(0.5),
            p90_ms: self.q_ms(0.9),
            p99_ms: self.q_ms(0.99),
            p999_ms: self.q_ms(0.999),
            max_ms: if self.0.is_empty() { 0.0 } else { self.0.max() as f64 / 1000.0 },
            mean_ms: if self.0.is_empty() { 0.0 } else { self.0.mean() / 1000.0 },
        }
    }

    /// (percentile, ms) points for a percentile plot, up to the largest recorded value.
    pub fn percentile_curve(&self) -> Vec<(f64, f64)> {
        if self.0.is_empty() {
            return Vec::new();
        }
        let mut out = Vec::new();
        for p in [0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 99.999, 100.0] {
            out.push((p, self.q_ms(p / 100.0)));
        }
        out
    }
}

/// A histogram as (value, count) pairs, for JSON between processes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HistData(pub Vec<(u64, u64)>);

impl HistData {
    pub fn to_hist(&self) -> Hist {
        let mut h = Hist::new();
        h.add_data(self);
        h
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub min_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

/// What one delivered `seq` was, relative to what came before on that stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// First time, and in order.
    New,
    /// First time, but after a higher seq had arrived.
    Reordered,
    /// Seen before (a resend, or a duplicate).
    Duplicate,
}

/// Tracks which sequence numbers of one stream were seen. Costs nothing while delivery is in
/// order; holes are kept in a set until filled.
#[derive(Debug, Clone, Default)]
pub struct SeqTracker {
    /// Every seq `<= base` was seen (or predates the run).
    base: u64,
    max: u64,
    above: BTreeSet<u64>,
}

impl SeqTracker {
    pub fn starting_at(base: u64) -> SeqTracker {
        SeqTracker { base, max: base, above: BTreeSet::new() }
    }

    pub fn observe(&mut self, seq: u64) -> Seen {
        if seq <= self.base || self.above.contains(&seq) {
            return Seen::Duplicate;
        }
        let reordered = seq < self.max;
        self.max = self.max.max(seq);
        if seq == self.base + 1 {
            self.base = seq;
            while self.above.remove(&(self.base + 1)) {
                self.base += 1;
            }
        } else {
            self.above.insert(seq);
        }
        if reordered {
            Seen::Reordered
        } else {
            Seen::New
        }
    }

    /// Highest seq up to which everything was seen: what a cumulative ack may claim.
    pub fn contiguous(&self) -> u64 {
        self.base
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    /// Seqs below the highest seen that never arrived.
    pub fn holes(&self) -> u64 {
        (self.max - self.base).saturating_sub(self.above.len() as u64)
    }
}

/// Which numbers `0, 1, 2, ...` were seen, one bit each: bounded by the highest number,
/// whatever the holes (a message the API refused leaves one for good).
#[derive(Debug, Clone, Default)]
pub struct BitSet(Vec<u64>);

impl BitSet {
    /// Marks `n` seen; false when it had been already.
    pub fn insert(&mut self, n: u64) -> bool {
        let (w, b) = ((n / 64) as usize, n % 64);
        if w >= self.0.len() {
            self.0.resize(w + 1, 0);
        }
        let first = self.0[w] & (1 << b) == 0;
        self.0[w] |= 1 << b;
        first
    }
}

/// Counters of a fleet (or of one of its threads), cumulative since the fleet started.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Counters {
    /// Connection attempts started.
    pub attempted: u64,
    /// Terminals that got their welcome.
    pub welcomed: u64,
    /// Terminals that never got a welcome.
    pub failed: u64,
    /// Welcomed terminals whose connection ended before the run did.
    pub dropped: u64,
    /// Messages of this run received for the first time.
    pub received: u64,
    pub duplicates: u64,
    pub reordered: u64,
    /// Messages delivered to a terminal that was not their addressee.
    pub misrouted: u64,
    /// Messages not sent by this run (other traffic, or left over from earlier runs).
    pub foreign: u64,
    /// Message frames that could not be understood.
    pub bad_frames: u64,
    pub acks_sent: u64,
    pub pings_answered: u64,
    /// Heartbeat `ping` frames sent by the terminals.
    pub heartbeats_sent: u64,
    pub server_errors: u64,
    /// Unix nanos of the first connection attempt and of the last welcome (0 = none yet).
    pub first_attempt_ns: u64,
    pub last_welcome_ns: u64,
    /// Unix nanos of the first and the last message of this run received (0 = none yet).
    pub first_recv_ns: u64,
    pub last_recv_ns: u64,
    /// `chat`: `send` frames written, answered by `sent`, answered by `error`.
    pub sends: u64,
    pub sends_answered: u64,
    pub send_errors: u64,
    /// `chat`: a terminal's own messages coming back on its own inbox (multi-device sync).
    pub echoes: u64,
    /// `chat`: `read` frames written, `receipt` and `read_sync` frames received.
    pub reads_sent: u64,
    pub receipts: u64,
    pub read_syncs: u64,
    /// `group`: cumulative group acks written.
    pub group_acks_sent: u64,
    /// `reconnect`: terminals closed abruptly on the coordinator's order, connected again,
    /// failed to connect again, `sync` frames written, terminals caught up (`synced` with
    /// `more: false`), and the Unix nanos of the last one.
    pub dropped_on_purpose: u64,
    pub reconnected: u64,
    pub reconnect_failed: u64,
    pub syncs_sent: u64,
    pub synced: u64,
    pub last_synced_ns: u64,
}

impl Counters {
    pub fn add(&mut self, o: &Counters) {
        self.attempted += o.attempted;
        self.welcomed += o.welcomed;
        self.failed += o.failed;
        self.dropped += o.dropped;
        self.received += o.received;
        self.duplicates += o.duplicates;
        self.reordered += o.reordered;
        self.misrouted += o.misrouted;
        self.foreign += o.foreign;
        self.bad_frames += o.bad_frames;
        self.acks_sent += o.acks_sent;
        self.pings_answered += o.pings_answered;
        self.heartbeats_sent += o.heartbeats_sent;
        self.server_errors += o.server_errors;
        self.first_attempt_ns = min_nonzero(self.first_attempt_ns, o.first_attempt_ns);
        self.last_welcome_ns = self.last_welcome_ns.max(o.last_welcome_ns);
        self.first_recv_ns = min_nonzero(self.first_recv_ns, o.first_recv_ns);
        self.last_recv_ns = self.last_recv_ns.max(o.last_recv_ns);
        self.sends += o.sends;
        self.sends_answered += o.sends_answered;
        self.send_errors += o.send_errors;
        self.echoes += o.echoes;
        self.reads_sent += o.reads_sent;
        self.receipts += o.receipts;
        self.read_syncs += o.read_syncs;
        self.group_acks_sent += o.group_acks_sent;
        self.dropped_on_purpose += o.dropped_on_purpose;
        self.reconnected += o.reconnected;
        self.reconnect_failed += o.reconnect_failed;
        self.syncs_sent += o.syncs_sent;
        self.synced += o.synced;
        self.last_synced_ns = self.last_synced_ns.max(o.last_synced_ns);
    }

    /// Terminals currently connected.
    pub fn open(&self) -> u64 {
        (self.welcomed + self.reconnected).saturating_sub(self.dropped + self.dropped_on_purpose)
    }

    /// Notes that a message of this run arrived at `now` (Unix nanos).
    pub fn note_recv(&mut self, now: u64) {
        if self.first_recv_ns == 0 {
            self.first_recv_ns = now;
        }
        self.last_recv_ns = now;
    }
}

fn min_nonzero(a: u64, b: u64) -> u64 {
    match (a, b) {
        (0, x) | (x, 0) => x,
        (a, b) => a.min(b),
    }
}

/// A fleet's state while it runs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FleetProgress {
    pub counters: Counters,
    /// Message latency recorded since the previous progress report.
    pub interval_latency: HistData,
    /// Every terminal has either got its welcome or failed.
    pub connect_done: bool,
    /// How many times the fleet's slowest thread has published its counters: a report whose
    /// count has not moved since the last one carries counters that are behind (a thread's
    /// timer ran late under load).
    #[serde(default)]
    pub published: u64,
    /// The longest a thread's 200 ms publish timer has run late so far, milliseconds.
    #[serde(default)]
    pub timer_late_ms_max: u64,
    /// How many of the fleet's orders (`Fleet::command`) every one of its threads had carried
    /// out when it published these counters (the minimum over the threads): counters that
    /// reflect order `n` (numbered from 1 as `Fleet::command` returns it) come with
    /// `orders_applied >= n`.
    #[serde(default)]
    pub orders_applied: u64,
}

/// How the members of a group saw one published message (`group`): how many got it and the
/// latest arrival, publish to receipt.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsgSeen {
    /// The message: its publish number `k` (from the payload).
    pub k: u64,
    /// Members that received it (first time).
    pub count: u32,
    /// Publish to the last member's receipt, microseconds.
    pub last_us: u64,
}

/// Merges per-message accounts by `k` (counts add, the latest arrival wins), sorted by `k`.
pub fn merge_seen(parts: impl IntoIterator<Item = MsgSeen>) -> Vec<MsgSeen> {
    let mut m: BTreeMap<u64, MsgSeen> = BTreeMap::new();
    for p in parts {
        let e = m.entry(p.k).or_insert(MsgSeen { k: p.k, ..Default::default() });
        e.count += p.count;
        e.last_us = e.last_us.max(p.last_us);
    }
    m.into_values().collect()
}

/// A fleet's final account.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct FleetReport {
    pub counters: Counters,
    /// Why terminals failed to connect, by reason.
    pub failures: BTreeMap<String, u64>,
    /// Why connected terminals were closed, by reason.
    pub drops: BTreeMap<String, u64>,
    /// Connect start to welcome, microseconds.
    pub connect_latency: HistData,
    /// Publish (timestamp in the payload) to receipt, microseconds.
    pub msg_latency: HistData,
    /// Distinct messages of this run received, per terminal, in fleet order.
    pub per_user_received: Vec<u32>,
    /// Seqs missing below the highest one received, summed over terminals.
    pub seq_holes: u64,
    /// `chat`: messages accepted (`sent`) per addressee, indexed by the addressee's global
    /// terminal number over the whole run (fleets add theirs up).
    pub acked_to: Vec<u32>,
    /// `chat`: `send` to `sent`, microseconds.
    pub send_latency: HistData,
    /// `chat`: `send` answered by an `error`, by code.
    pub send_errors: BTreeMap<String, u64>,
    /// `group`: every published message as its members saw it.
    pub per_msg: Vec<MsgSeen>,
    /// `reconnect`: message ids received per terminal (fleet order), sorted, duplicates kept.
    pub ids: Vec<Vec<u64>>,
    /// `reconnect`: the reconnect order to `synced` (caught up), per reconnected terminal,
    /// microseconds.
    pub sync_latency: HistData,
    /// `reconnect`: per terminal (fleet order), whether it was connected when the fleet
    /// stopped (missing ids of a terminal that was not are unreachable, not lost).
    pub up: Vec<bool>,
}

impl FleetReport {
    /// Merges reports of several fleets, which hold consecutive terminal ranges in order.
    pub fn merge(parts: Vec<FleetReport>) -> FleetReport {
        let mut out = FleetReport::default();
        let mut cl = Hist::new();
        let mut ml = Hist::new();
        let mut sl = Hist::new();
        let mut yl = Hist::new();
        let mut seen = Vec::new();
        // Per-terminal lists that some parts have (`up`, `ids`) are filled in for the parts
        // without them (up, nothing received), so every terminal keeps its place.
        let with_up = parts.iter().any(|p| !p.up.is_empty());
        let with_ids = parts.iter().any(|p| !p.ids.is_empty());
        for p in parts {
            let terminals = p.per_user_received.len();
            out.counters.add(&p.counters);
            for (k, v) in p.failures {
                *out.failures.entry(k).or_default() += v;
            }
            for (k, v) in p.drops {
                *out.drops.entry(k).or_default() += v;
            }
            cl.add_data(&p.connect_latency);
            ml.add_data(&p.msg_latency);
            out.per_user_received.extend(p.per_user_received);
            out.seq_holes += p.seq_holes;
            if out.acked_to.len() < p.acked_to.len() {
                out.acked_to.resize(p.acked_to.len(), 0);
            }
            for (a, b) in out.acked_to.iter_mut().zip(&p.acked_to) {
                *a += b;
            }
            sl.add_data(&p.send_latency);
            yl.add_data(&p.sync_latency);
            for (k, v) in p.send_errors {
                *out.send_errors.entry(k).or_default() += v;
            }
            seen.extend(p.per_msg);
            if with_ids && p.ids.is_empty() {
                out.ids.resize(out.ids.len() + terminals, Vec::new());
            } else {
                out.ids.extend(p.ids);
            }
            if with_up && p.up.is_empty() {
                out.up.resize(out.up.len() + terminals, true);
            } else {
                out.up.extend(p.up);
            }
        }
        out.connect_latency = cl.data();
        out.msg_latency = ml.data();
        out.send_latency = sl.data();
        out.sync_latency = yl.data();
        out.per_msg = merge_seen(seen);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_tracker_classifies() {
        let mut t = SeqTracker::starting_at(10);
        assert_eq!(t.observe(11), Seen::New);
        assert_eq!(t.observe(11), Seen::Duplicate);
        assert_eq!(t.observe(5), Seen::Duplicate);
        assert_eq!(t.observe(14), Seen::New);
        assert_eq!(t.contiguous(), 11);
        assert_eq!(t.holes(), 2);
        assert_eq!(t.observe(13), Seen::Reordered);
        assert_eq!(t.observe(12), Seen::Reordered);
        assert_eq!(t.contiguous(), 14);
        assert_eq!(t.holes(), 0);
        assert_eq!(t.observe(13), Seen::Duplicate);
        assert_eq!(t.max(), 14);
    }

    #[test]
    fn hist_roundtrips_through_data() {
        let mut h = Hist::new();
        for v in 1..=1000 {
            h.record_us(v);
        }
        let back = h.data().to_hist();
        assert_eq!(back.count(), 1000);
        assert!((back.q_ms(0.99) - 0.99).abs() < 0.01);
        let s = back.summary();
        assert!(s.p50_ms > 0.4 && s.p50_ms < 0.6);
    }

    #[test]
    fn reports_merge_in_order() {
        let a = FleetReport {
            per_user_received: vec![1, 2],
            counters: Counters { welcomed: 2, first_attempt_ns: 5, ..Default::default() },
            ..Default::default()
        };
        let b = FleetReport {
            per_user_received: vec![3],
            counters: Counters { welcomed: 1, first_attempt_ns: 3, last_welcome_ns: 9, ..Default::default() },
            ..Default::default()
        };
        let m = FleetReport::merge(vec![a, b]);
        assert_eq!(m.per_user_received, vec![1, 2, 3]);
        assert_eq!(m.counters.welcomed, 3);
        assert_eq!(m.counters.first_attempt_ns, 3);
        assert_eq!(m.counters.last_welcome_ns, 9);
    }

    #[test]
    fn per_message_accounts_and_chat_counts_merge() {
        let a = FleetReport {
            acked_to: vec![1, 0, 2],
            per_msg: vec![MsgSeen { k: 1, count: 2, last_us: 50 }, MsgSeen { k: 2, count: 1, last_us: 9 }],
            ..Default::default()
        };
        let b = FleetReport {
            acked_to: vec![0, 4, 1],
            per_msg: vec![MsgSeen { k: 1, count: 3, last_us: 70 }],
            ..Default::default()
        };
        let m = FleetReport::merge(vec![a, b]);
        assert_eq!(m.acked_to, vec![1, 4, 3]);
        assert_eq!(m.per_msg, vec![MsgSeen { k: 1, count: 5, last_us: 70 }, MsgSeen { k: 2, count: 1, last_us: 9 }]);
    }
}
