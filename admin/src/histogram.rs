//! Fixed-bucket histograms: [`Histogram`], the recorder a shard owns (allocation-free
//! `record`, `merge` across shards), and [`HistogramSnapshot`], its data-only, serializable
//! form with Prometheus-style cumulative buckets and estimated percentiles. No clock, no I/O.
//!
//! Bucket semantics are Prometheus's: an observation `v` is counted in every bucket whose
//! upper bound `le >= v`; the `+Inf` bucket is the total count. Percentiles are estimated like
//! PromQL's `histogram_quantile` (linear interpolation inside the bucket that holds the rank),
//! then clamped to the largest observation, which the recorder keeps exactly.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Bucket bounds for latencies, in seconds: 100 µs to 10 s, roughly 1-2.5-5 per decade.
pub const LATENCY_BOUNDS_S: &[f64] =
    &[0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Bucket bounds for sizes and counts (storage batch sizes, in operations): powers of two
/// from 1 to 4096.
pub const SIZE_BOUNDS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0];

/// Two histograms (or snapshots) with different bucket bounds cannot be merged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("histogram bucket bounds differ; cannot merge")]
pub struct BoundsMismatch;

/// A recorder with fixed bucket bounds. Memory is allocated once in [`Histogram::new`];
/// [`Histogram::record`] only increments (a binary search over the bounds, no allocation),
/// so a shard can record on its hot path and hand out [`Histogram::snapshot`]s.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per-bucket (not cumulative) counts; `bounds.len() + 1` slots, the last one is `+Inf`.
    counts: Box<[u64]>,
    sum: f64,
    count: u64,
    max: f64,
}

impl Histogram {
    /// A recorder over `bounds`.
    ///
    /// # Panics
    /// When `bounds` is empty, not strictly increasing, or holds a non-finite value: bounds
    /// are compile-time constants, so this is a programming error caught by the first test.
    pub fn new(bounds: &'static [f64]) -> Histogram {
        assert!(!bounds.is_empty(), "histogram needs at least one bound");
        assert!(
            bounds.iter().all(|b| b.is_finite()) && bounds.windows(2).all(|w| w[0] < w[1]),
            "histogram bounds must be finite and strictly increasing: {bounds:?}"
        );
        Histogram { bounds, counts: vec![0; bounds.len() + 1].into_boxed_slice(), sum: 0.0, count: 0, max: 0.0 }
    }

    /// A latency recorder in seconds ([`LATENCY_BOUNDS_S`]).
    pub fn latency() -> Histogram {
        Histogram::new(LATENCY_BOUNDS_S)
    }

    /// A size recorder ([`SIZE_BOUNDS`]).
    pub fn sizes() -> Histogram {
        Histogram::new(SIZE_BOUNDS)
    }

    /// Records one observation. NaN is ignored; negative values count as 0.
    pub fn record(&mut self, value: f64) {
        if value.is_nan() {
            return;
        }
        let value = value.max(0.0);
        // First bucket whose bound is >= value (Prometheus `le`); past the end is `+Inf`.
        let i = self.bounds.partition_point(|b| *b < value);
        self.counts[i] += 1;
        self.count += 1;
        self.sum += value;
        if value > self.max {
            self.max = value;
        }
    }

    /// Records a duration, in seconds.
    pub fn record_duration(&mut self, d: Duration) {
        self.record(d.as_secs_f64());
    }

    /// Records `n` (a size or count).
    pub fn record_u64(&mut self, n: u64) {
        self.record(n as f64);
    }

    /// Adds `other`'s observations to this one (e.g. the per-shard recorders of a node).
    pub fn merge(&mut self, other: &Histogram) -> Result<(), BoundsMismatch> {
        if self.bounds != other.bounds {
            return Err(BoundsMismatch);
        }
        for (mine, theirs) in self.counts.iter_mut().zip(other.counts.iter()) {
            *mine += theirs;
        }
        self.count += other.count;
        self.sum += other.sum;
        self.max = self.max.max(other.max);
        Ok(())
    }

    /// How many observations were recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The sum of all observations.
    pub fn sum(&self) -> f64 {
        self.sum
    }

    /// The bucket bounds.
    pub fn bounds(&self) -> &'static [f64] {
        self.bounds
    }

    /// The data-only form: cumulative buckets and percentiles.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut running = 0u64;
        let counts = self.counts[..self.bounds.len()]
            .iter()
            .map(|c| {
                running += c;
                running
            })
            .collect();
        let mut snap = HistogramSnapshot {
            bounds: self.bounds.to_vec(),
            counts,
            sum: self.sum,
            count: self.count,
            max: self.max,
            p50: 0.0,
            p90: 0.0,
            p99: 0.0,
        };
        snap.update_percentiles();
        snap
    }
}

/// A histogram as data: Prometheus-style cumulative buckets plus estimated percentiles.
///
/// `counts[i]` is the number of observations `<= bounds[i]`; the `+Inf` bucket is `count`.
/// Units are the recorder's (seconds for latencies). `p50`/`p90`/`p99` are estimates (see
/// the module docs), 0 when `count` is 0. `Default` is the empty histogram with no bounds,
/// which [`HistogramSnapshot::merge`] treats as "nothing yet".
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HistogramSnapshot {
    pub bounds: Vec<f64>,
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
    /// The largest observation.
    #[serde(default)]
    pub max: f64,
    #[serde(default)]
    pub p50: f64,
    #[serde(default)]
    pub p90: f64,
    #[serde(default)]
    pub p99: f64,
}

impl HistogramSnapshot {
    /// Estimates the `q` quantile (`0.0..=1.0`) from the buckets: linear interpolation inside
    /// the bucket holding rank `q * count` (the first bucket starts at 0), the `+Inf` bucket
    /// answers the largest observation, and no estimate exceeds that largest observation.
    pub fn quantile(&self, q: f64) -> f64 {
        if self.count == 0 || q.is_nan() {
            return 0.0;
        }
        let q = q.clamp(0.0, 1.0);
        let rank = q * self.count as f64;
        let mut below = 0u64; // cumulative count of the buckets before this one
        for (i, (&bound, &cumulative)) in self.bounds.iter().zip(&self.counts).enumerate() {
            if cumulative as f64 >= rank && cumulative > 0 {
                let lower = if i == 0 { 0.0 } else { self.bounds[i - 1] };
                let in_bucket = (cumulative - below) as f64;
                let estimate =
                    if in_bucket > 0.0 { lower + (bound - lower) * ((rank - below as f64) / in_bucket) } else { bound };
                return estimate.clamp(0.0, self.max.max(0.0));
            }
            below = cumulative;
        }
        self.max
    }

    /// Recomputes `p50`, `p90`, `p99` from the buckets.
    pub fn update_percentiles(&mut self) {
        self.p50 = self.quantile(0.50);
        self.p90 = self.quantile(0.90);
        self.p99 = self.quantile(0.99);
    }

    /// Adds `other` into this snapshot (same bounds, or this one empty), then recomputes the
    /// percentiles. Used to build node totals from per-shard snapshots.
    pub fn merge(&mut self, other: &HistogramSnapshot) -> Result<(), BoundsMismatch> {
        if other.bounds.is_empty() && other.count == 0 {
            return Ok(());
        }
        if self.bounds.is_empty() && self.count == 0 {
            *self = other.clone();
            return Ok(());
        }
        if self.bounds != other.bounds || self.counts.len() != other.counts.len() {
            return Err(BoundsMismatch);
        }
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        self.count += other.count;
        self.sum += other.sum;
        self.max = self.max.max(other.max);
        self.update_percentiles();
        Ok(())
    }

    /// The mean observation (0 when empty).
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum / self.count as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: &[f64] = &[1.0, 2.0, 5.0];

    #[test]
    fn values_land_in_the_le_bucket() {
        let mut h = Histogram::new(B);
        for v in [0.0, 1.0, 1.5, 2.0, 3.0, 5.0, 5.000_1, 100.0, -3.0, f64::NAN] {
            h.record(v);
        }
        // <=1: 0, 1, -3(->0) ; <=2: +1.5, 2 ; <=5: +3, 5 ; +Inf: 5.0001, 100. NaN ignored.
        let s = h.snapshot();
        assert_eq!(s.counts, vec![3, 5, 7]);
        assert_eq!(s.count, 9);
        assert_eq!(h.count(), 9);
        assert_eq!(s.max, 100.0);
        assert!((s.sum - (0.0 + 1.0 + 1.5 + 2.0 + 3.0 + 5.0 + 5.000_1 + 100.0)).abs() < 1e-9);
        assert_eq!(s.bounds, B.to_vec());
    }

    #[test]
    fn cumulative_counts_never_decrease_and_end_at_count() {
        let mut h = Histogram::latency();
        for i in 0..1000u32 {
            h.record(f64::from(i) * 0.000_7);
        }
        let s = h.snapshot();
        assert!(s.counts.windows(2).all(|w| w[0] <= w[1]));
        assert!(*s.counts.last().unwrap() <= s.count);
        assert_eq!(s.count, 1000);
    }

    #[test]
    fn percentiles_interpolate_inside_the_bucket() {
        let mut h = Histogram::new(&[10.0, 20.0, 30.0, 40.0]);
        // 100 values spread uniformly over (0, 40].
        for i in 1..=100 {
            h.record(f64::from(i) * 0.4);
        }
        let s = h.snapshot();
        assert!((s.p50 - 20.0).abs() < 0.5, "p50 {}", s.p50);
        assert!((s.p90 - 36.0).abs() < 0.5, "p90 {}", s.p90);
        assert!((s.p99 - 39.6).abs() < 0.5, "p99 {}", s.p99);
        assert!(s.p50 <= s.p90 && s.p90 <= s.p99);
        assert_eq!(s.quantile(1.0), 40.0);
        assert_eq!(s.quantile(0.0), 0.0);
    }

    #[test]
    fn percentiles_never_exceed_the_largest_observation() {
        let mut h = Histogram::new(B);
        h.record(3.0);
        let s = h.snapshot();
        // Interpolation inside (2, 5] would say 3.5 for p50; the max clamps it.
        assert_eq!(s.p50, 3.0);
        assert_eq!(s.p99, 3.0);
        // Observations past the last bound: the +Inf bucket answers the max.
        let mut h = Histogram::new(B);
        h.record(0.5);
        for _ in 0..99 {
            h.record(70.0);
        }
        assert_eq!(h.snapshot().p99, 70.0);
    }

    #[test]
    fn empty_histogram_is_all_zero() {
        let s = Histogram::latency().snapshot();
        assert_eq!((s.count, s.p50, s.p99, s.mean()), (0, 0.0, 0.0, 0.0));
        assert!(s.counts.iter().all(|c| *c == 0));
        assert_eq!(HistogramSnapshot::default().quantile(0.5), 0.0);
    }

    #[test]
    fn merge_adds_recorders_and_snapshots() {
        let mut a = Histogram::new(B);
        let mut b = Histogram::new(B);
        a.record(0.5);
        a.record(4.0);
        b.record(1.5);
        b.record(9.0);
        let mut snap = a.snapshot();
        snap.merge(&b.snapshot()).unwrap();
        a.merge(&b).unwrap();
        assert_eq!(a.snapshot(), snap);
        assert_eq!(snap.counts, vec![1, 2, 3]);
        assert_eq!((snap.count, snap.max, snap.sum), (4, 9.0, 15.0));

        let mut total = HistogramSnapshot::default();
        total.merge(&snap).unwrap();
        assert_eq!(total, snap, "merging into the empty snapshot copies");
        total.merge(&HistogramSnapshot::default()).unwrap();
        assert_eq!(total, snap, "merging the empty snapshot changes nothing");

        assert_eq!(a.merge(&Histogram::latency()), Err(BoundsMismatch));
        assert_eq!(total.merge(&Histogram::latency().snapshot()), Err(BoundsMismatch));
    }

    #[test]
    fn durations_and_sizes() {
        let mut h = Histogram::latency();
        h.record_duration(Duration::from_millis(3));
        let s = h.snapshot();
        // 3 ms is in the (2.5 ms, 5 ms] bucket.
        let i = s.bounds.iter().position(|b| *b == 0.005).unwrap();
        assert_eq!(s.counts[i], 1);
        assert_eq!(s.counts[i - 1], 0);
        let mut h = Histogram::sizes();
        h.record_u64(3);
        assert_eq!(h.snapshot().counts[..3], [0, 0, 1]);
    }

    #[test]
    #[should_panic(expected = "strictly increasing")]
    fn bounds_must_increase() {
        let _ = Histogram::new(&[1.0, 1.0]);
    }
}
