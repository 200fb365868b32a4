//! The turn to deliver the shared event outbox in cluster mode: a lease in Redis
//! (`ether:events:dispatcher`, the holder's node id, with a TTL), taken by one node's
//! `ether-events` thread at a time and renewed while it runs, so the business gets each batch
//! from one node instead of once per node. Implements [`DispatchGate`]; owns only that key and
//! its own Redis connection (never shard state, never the outbox itself).
//!
//! A holder that stops gives the lease up at once; one that dies (or loses Redis) keeps it
//! until its TTL runs out, then another node takes over and re-sends what was not acked
//! (at-least-once: receivers dedupe by `event_id`).
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::warn;

use crate::cluster::KEY_PREFIX;
use crate::events::DispatchGate;

/// How long the lease outlives its holder's last renewal: longer than the holder can spend in
/// one webhook attempt between two asks of the gate (`events::WEBHOOK_ATTEMPT_STEPS` times
/// `DispatchOptions::timeout`: 15 s, the retry on a stale pooled connection and a receiver
/// trickling its answer included), so a slow attempt never lets a second node start
/// delivering beside it (duplicates, and batches out of order). A node that dies holds the
/// turn this long before another takes over.
pub const LEASE_TTL: Duration = Duration::from_secs(40);
/// How often the holder renews it (well inside the TTL; the dispatcher asks the gate before
/// every fetch and every attempt, so a renewal is at most one webhook request late).
const RENEW_EVERY: Duration = Duration::from_secs(2);
/// How long a failed Redis call keeps this node from asking again.
const RETRY_AFTER_ERROR: Duration = Duration::from_millis(500);

/// Takes the lease when free, or renews it when this node holds it: 1 held, 0 someone else's.
const TAKE_OR_RENEW: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
elseif holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
";

/// Deletes the lease only when this node holds it.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// The Redis key of the lease.
pub fn lease_key() -> String {
    format!("{KEY_PREFIX}events:dispatcher")
}

/// This node's side of the lease.
pub struct OutboxLease {
    client: redis::Client,
    con: Option<redis::Connection>,
    node_id: String,
    ttl: Duration,
    renew_every: Duration,
    /// When the lease was last taken or renewed by this node (`None`: not held).
    held_since: Option<Instant>,
    /// When to ask Redis next while not holding it (or after an error).
    next_ask: Instant,
    /// Set by the node once it joined the cluster (its id checked as its own): until then the
    /// lease is not asked for. A node started with a live node's id would otherwise count as
    /// that node's lease holder (the lease holds the id), deliver beside it, and on its failed
    /// start release the live node's lease.
    joined: Arc<AtomicBool>,
}

impl OutboxLease {
    /// The lease of `node_id` in the cluster at `url` (connects on first use).
    pub fn new(url: &str, node_id: &str) -> redis::RedisResult<OutboxLease> {
        OutboxLease::with_timing(url, node_id, LEASE_TTL, RENEW_EVERY)
    }

    /// As [`OutboxLease::new`] with another TTL and renewal period (`renew_every < ttl`).
    pub fn with_timing(url: &str, node_id: &str, ttl: Duration, renew_every: Duration) -> redis::RedisResult<Self> {
        debug_assert!(renew_every < ttl, "the lease must be renewed before it expires");
        Ok(OutboxLease {
            client: redis::Client::open(url)?,
            con: None,
            node_id: node_id.to_owned(),
            ttl,
            renew_every,
            held_since: None,
            next_ask: Instant::now(),
            joined: Arc::new(AtomicBool::new(false)),
        })
    }

    fn connection(&mut self) -> redis::RedisResult<&mut redis::Connection> {
        if self.con.is_none() {
            let con = self.client.get_connection_with_timeout(Duration::from_secs(2))?;
            // A Redis that stops answering must cost the turn, not the events thread (and with
            // it the node's stop): without a bound the call waited for as long as Redis did.
            con.set_read_timeout(Some(crate::cluster::REDIS_IO_TIMEOUT))?;
            con.set_write_timeout(Some(crate::cluster::REDIS_IO_TIMEOUT))?;
            self.con = Some(con);
        }
        Ok(self.con.as_mut().expect("just set"))
    }

    /// One round trip: take or renew.
    fn take_or_renew(&mut self) -> redis::RedisResult<bool> {
        let ttl = self.ttl.as_millis() as u64;
        let node_id = self.node_id.clone();
        let con = self.connection()?;
        let held: i64 = redis::Script::new(TAKE_OR_RENEW).key(lease_key()).arg(node_id).arg(ttl).invoke(con)?;
        Ok(held == 1)
    }
}

impl OutboxLease {
    /// The flag the node sets once it joined the cluster; the lease is asked for only then.
    pub fn joined(&self) -> Arc<AtomicBool> {
        self.joined.clone()
    }
}

impl DispatchGate for OutboxLease {
    fn may_dispatch(&mut self) -> bool {
        if !self.joined.load(Ordering::Acquire) {
            return false;
        }
        let now = Instant::now();
        if let Some(since) = self.held_since {
            if now.duration_since(since) < self.renew_every {
                return true;
            }
        } else if now < self.next_ask {
            return false;
        }
        match self.take_or_renew() {
            Ok(true) => {
                self.held_since = Some(now);
                true
            }
            Ok(false) => {
                self.held_since = None;
                self.next_ask = now + self.renew_every;
                false
            }
            Err(e) => {
                // Not sure to hold it any more: stop sending until Redis answers again.
                warn!(node = %self.node_id, error = %e, "event outbox lease: redis failed");
                self.con = None;
                self.held_since = None;
                self.next_ask = now + RETRY_AFTER_ERROR;
                false
            }
        }
    }

    fn release(&mut self) {
        if self.held_since.take().is_none() {
            return;
        }
        let node_id = self.node_id.clone();
        let released = self
            .connection()
            .and_then(|con| redis::Script::new(RELEASE).key(lease_key()).arg(node_id).invoke::<i64>(con));
        if let Err(e) = released {
            warn!(node = %self.node_id, error = %e, "event outbox lease not released; it expires by itself");
        }
    }
}

#[cfg(test)]
mod tests {
    use ether_store::redis::TestRedis;

    use super::*;

    fn holder(redis: &TestRedis) -> Option<String> {
        let mut con = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
        redis::cmd("GET").arg(lease_key()).query(&mut con).unwrap()
    }

    fn lease(redis: &TestRedis, node: &str, ttl_ms: u64) -> OutboxLease {
        let ttl = Duration::from_millis(ttl_ms);
        let l = OutboxLease::with_timing(&redis.url(), node, ttl, ttl / 4).unwrap();
        l.joined().store(true, Ordering::Release);
        l
    }

    /// Before its node joined the cluster (its id not yet checked as its own), a lease is never
    /// taken, and one held by a live node of the same id is left alone: neither delivered beside
    /// nor released when the second node's start fails.
    #[test]
    fn a_node_that_has_not_joined_never_takes_or_releases_the_lease() {
        let Some(redis) = TestRedis::start_or_skip() else { return };
        let ttl = Duration::from_millis(400);
        let mut early = OutboxLease::with_timing(&redis.url(), "node-a", ttl, ttl / 4).unwrap();
        assert!(!early.may_dispatch(), "not joined: no turn");
        assert_eq!(holder(&redis), None, "not even asked for");
        let mut live = lease(&redis, "node-a", 400);
        assert!(live.may_dispatch());
        // A second node started with the live node's id, whose start then fails.
        let mut imposter = OutboxLease::with_timing(&redis.url(), "node-a", ttl, ttl / 4).unwrap();
        assert!(!imposter.may_dispatch());
        imposter.release();
        assert_eq!(holder(&redis).as_deref(), Some("node-a"));
        assert!(live.may_dispatch(), "the live node keeps its turn");
        early.joined().store(true, Ordering::Release);
        live.release();
        early.next_ask = Instant::now();
        assert!(early.may_dispatch(), "joined: it takes a free lease");
    }

    #[test]
    fn one_holder_at_a_time_handed_over_on_release_and_on_expiry() {
        let Some(redis) = TestRedis::start_or_skip() else { return };
        let mut a = lease(&redis, "node-a", 400);
        let mut b = lease(&redis, "node-b", 400);
        assert!(a.may_dispatch());
        assert!(!b.may_dispatch(), "a holds it");
        assert_eq!(holder(&redis).as_deref(), Some("node-a"));
        // A keeps renewing past several TTLs; B never gets it meanwhile.
        let until = Instant::now() + Duration::from_millis(1000);
        while Instant::now() < until {
            assert!(a.may_dispatch());
            b.next_ask = Instant::now();
            assert!(!b.may_dispatch());
            std::thread::sleep(Duration::from_millis(50));
        }
        // Released on stop: B takes it at its next ask.
        a.release();
        assert_eq!(holder(&redis), None);
        b.next_ask = Instant::now();
        assert!(b.may_dispatch());
        assert_eq!(holder(&redis).as_deref(), Some("node-b"));
        // A release by a node that does not hold it changes nothing.
        a.release();
        assert_eq!(holder(&redis).as_deref(), Some("node-b"));
        // B dies without releasing (no more renewals): A gets it once the TTL ran out.
        drop(b);
        a.next_ask = Instant::now();
        assert!(!a.may_dispatch());
        std::thread::sleep(Duration::from_millis(500));
        a.next_ask = Instant::now();
        assert!(a.may_dispatch());
        assert_eq!(holder(&redis).as_deref(), Some("node-a"));
    }

    #[test]
    fn the_lease_outlasts_the_slowest_webhook_attempt() {
        let timeout = crate::events::DispatchOptions::default().timeout;
        let slowest_attempt = timeout * crate::events::WEBHOOK_ATTEMPT_STEPS;
        assert!(LEASE_TTL > slowest_attempt + RENEW_EVERY, "{LEASE_TTL:?} vs {slowest_attempt:?}");
    }

    /// A Redis that stops answering (paused here) costs the holder its turn within the I/O
    /// timeout. Before, the renewal waited for as long as Redis did, and the events thread,
    /// and the node's stop, with it.
    #[test]
    fn a_redis_that_stops_answering_costs_the_turn_not_the_thread() {
        let Some(redis) = TestRedis::start_or_skip() else { return };
        let mut a = lease(&redis, "node-a", 60_000);
        assert!(a.may_dispatch());
        let paused = redis.pause();
        a.held_since = Some(Instant::now() - a.renew_every); // due for renewal
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(a.may_dispatch());
        });
        let answer = rx.recv_timeout(crate::cluster::REDIS_IO_TIMEOUT + Duration::from_secs(5));
        drop(paused);
        assert_eq!(answer, Ok(false), "no answer from Redis: no turn, and no thread stuck waiting");
    }

    #[test]
    fn no_redis_means_no_turn() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut a = OutboxLease::new(&format!("redis://127.0.0.1:{port}"), "node-a").unwrap();
        assert!(!a.may_dispatch());
        a.release();
    }
}
