//! The event dispatcher: delivers the durable outbox to the business webhook, at-least-once
//! (API.md section 4).
//!
//! A plain OS thread (`ether-events`, never a shard) loops:
//!
//! 1. `OutboxFetch { after, limit: batch_max }` through [`StoreHandle::call_blocking`]; an
//!    empty outbox sleeps `idle_poll` (a stop wakes it).
//! 2. The batch becomes `{"events":[{"event_id":"<seq>","type":kind,"ts":ts,…data fields}]}`
//!    ([`encode_batch`]), signed `X-Ether-Signature: sha256=<hex HMAC-SHA256(secret, body)>`
//!    ([`sign`]; receivers check it with [`verify`]) and POSTed as `application/json`.
//! 3. A 2xx answer → `OutboxAck { through: last seq of the batch }`, then the next batch.
//!    Anything else (a non-2xx status, a timeout, a connection error) is logged and the *same*
//!    body is sent again after an exponential, jittered backoff (`backoff_min` doubling up to
//!    `backoff_max`); receivers dedupe by `event_id`. A store error backs off the same way.
//!
//! Nothing is acked before a 2xx, so a crash or a stop at any point only causes re-delivery.
//! Counters for the admin port live in [`DispatchStats`].
//!
//! In cluster mode every node shares one outbox; a [`DispatchGate`] (the cluster's lease in
//! Redis) lets one node at a time deliver it, so the business does not get each batch once per
//! node. The gate is asked before every fetch and every retry; a node that loses its turn
//! mid-batch stops sending it and the next holder sends it again (at-least-once, as above).
//!
//! The HTTP side is [`ether_sdk::GatewayClient`] (blocking HTTP/1.1, one keep-alive
//! connection; `https://` over rustls with the Mozilla roots, or `events.webhook_ca_path`'s):
//! the webhook URL is split here into `scheme://host:port` and the request target (path and
//! query, sent as is), so path prefixes and query strings survive; `user:pass@` in the URL
//! becomes `Authorization: Basic`.
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ether_sdk::GatewayClient;
use ether_store::{Event, Op, Reply, StoreError, StoreHandle, PAGE_LIMIT_MAX};
use hmac::{Hmac, Mac};
use rand::Rng;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use sha2::Sha256;

use crate::config::Webhook;

/// The signature header of every POST.
pub const SIGNATURE_HEADER: &str = "X-Ether-Signature";
/// Prefix of the signature header's value.
pub const SIGNATURE_PREFIX: &str = "sha256=";
/// Keys every event object carries; a `data` field of the same name is left out.
const RESERVED_KEYS: [&str; 3] = ["event_id", "type", "ts"];
/// Longest response snippet kept in `last_error`.
const ERROR_SNIPPET_CHARS: usize = 200;

type HmacSha256 = Hmac<Sha256>;

/// `sha256=<lowercase hex of HMAC-SHA256(secret, body)>`: the `X-Ether-Signature` value.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = mac(secret);
    mac.update(body);
    format!("{SIGNATURE_PREFIX}{}", hex::encode(mac.finalize().into_bytes()))
}

/// Whether `header` (an `X-Ether-Signature` value) is the signature of `body` under `secret`.
/// The comparison takes the same time wherever the values differ.
pub fn verify(secret: &[u8], body: &[u8], header: &str) -> bool {
    let header = header.trim();
    let Some(digest) = header
        .get(..SIGNATURE_PREFIX.len())
        .and_then(|p| p.eq_ignore_ascii_case(SIGNATURE_PREFIX).then(|| &header[SIGNATURE_PREFIX.len()..]))
    else {
        return false;
    };
    let Ok(digest) = hex::decode(digest) else {
        return false;
    };
    let mut mac = mac(secret);
    mac.update(body);
    mac.verify_slice(&digest).is_ok()
}

fn mac(secret: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length: this cannot fail.
    HmacSha256::new_from_slice(secret).expect("HMAC accepts any key length")
}

/// The object fields of an event's `data`, in their original order, values untouched.
struct Fields(Vec<(String, Box<RawValue>)>);

impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Fields;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry::<String, Box<RawValue>>()? {
                    out.push(entry);
                }
                Ok(Fields(out))
            }
        }
        d.deserialize_map(V)
    }
}

fn push_json_str(out: &mut Vec<u8>, s: &str) {
    // Serializing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// The webhook body of a batch: `{"events":[{"event_id":"<seq>","type":…,"ts":…,…}]}`.
///
/// The fields of each event's `data` (a JSON object text) are merged into its object, in
/// their order; a field named like a reserved key (`event_id`, `type`, `ts`) or repeating an
/// earlier one is left out. `data` that is not an object is sent as `"data": <value>` (text
/// that is not JSON as a string), so no event is ever lost to its encoding.
pub fn encode_batch(events: &[Event]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + events.iter().map(|e| e.data.len() + e.kind.len() + 64).sum::<usize>());
    out.extend_from_slice(b"{\"events\":[");
    for (i, ev) in events.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(format!("{{\"event_id\":\"{}\",\"type\":", ev.seq).as_bytes());
        push_json_str(&mut out, &ev.kind);
        out.extend_from_slice(format!(",\"ts\":{}", ev.ts).as_bytes());
        match serde_json::from_str::<Fields>(&ev.data) {
            Ok(Fields(fields)) => {
                let mut seen: Vec<&str> = Vec::with_capacity(fields.len());
                for (k, v) in &fields {
                    if RESERVED_KEYS.contains(&k.as_str()) || seen.contains(&k.as_str()) {
                        continue;
                    }
                    seen.push(k);
                    out.push(b',');
                    push_json_str(&mut out, k);
                    out.push(b':');
                    out.extend_from_slice(v.get().as_bytes());
                }
            }
            Err(_) => {
                out.extend_from_slice(b",\"data\":");
                match serde_json::from_str::<Box<RawValue>>(&ev.data) {
                    Ok(v) => out.extend_from_slice(v.get().as_bytes()),
                    Err(_) => push_json_str(&mut out, &ev.data),
                }
            }
        }
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
    out
}

/// How the dispatcher batches, waits and retries.
#[derive(Debug, Clone)]
pub struct DispatchOptions {
    /// Most events per POST (at most [`PAGE_LIMIT_MAX`]).
    pub batch_max: usize,
    /// Time allowed to connect, and for each write and read of a request.
    pub timeout: Duration,
    /// First delay after a failure; doubles per consecutive failure…
    pub backoff_min: Duration,
    /// …up to this.
    pub backoff_max: Duration,
    /// Sleep when the outbox is empty.
    pub idle_poll: Duration,
}

impl Default for DispatchOptions {
    fn default() -> Self {
        DispatchOptions {
            batch_max: 100,
            timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            idle_poll: Duration::from_millis(200),
        }
    }
}

impl DispatchOptions {
    /// The delay after the `failures`-th consecutive failure (1-based): `backoff_min`
    /// doubled `failures - 1` times, capped at `backoff_max`, then jittered down by up to half
    /// (never below `backoff_min`), so receivers coming back are not hit in lockstep.
    pub fn backoff(&self, failures: u32) -> Duration {
        let min = self.backoff_min;
        let max = self.backoff_max.max(min);
        let doublings = failures.saturating_sub(1);
        let base = if doublings >= 31 { max } else { min.saturating_mul(1u32 << doublings).min(max) };
        let half = base / 2;
        let half_ns = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        let jitter = Duration::from_nanos(rand::thread_rng().gen_range(0..=half_ns));
        (half + jitter).max(min)
    }
}

/// Whether this node delivers the outbox now. A standalone node always does (no gate); in
/// cluster mode only the holder of a lease in Redis does ([`crate::cluster::OutboxLease`]).
pub trait DispatchGate: Send {
    /// `true` while this node may deliver. Called before every fetch and every attempt, from
    /// the dispatcher's thread (it may block on I/O briefly).
    fn may_dispatch(&mut self) -> bool;
    /// Gives the turn up (on stop), so another node takes over without waiting for a timeout.
    fn release(&mut self);
}

/// Counters of the dispatcher, for the admin port. Relaxed atomics; any thread may read.
#[derive(Debug, Default)]
pub struct DispatchStats {
    /// Gauge: this node holds the turn to deliver (always, without a gate).
    pub dispatching: std::sync::atomic::AtomicBool,
    /// Batches answered 2xx.
    pub batches_sent: AtomicU64,
    /// Events in those batches (each counted once, however often it was re-sent).
    pub events_sent: AtomicU64,
    /// Failed attempts: non-2xx, timeouts, connection and store errors.
    pub failures: AtomicU64,
    /// Gauge: failures since the last success (0 when healthy).
    pub consecutive_failures: AtomicU64,
    /// The highest outbox seq acked (removed from the outbox after its delivery).
    pub acked_through: AtomicU64,
    /// The most recent failure, kept after recovery (see `consecutive_failures`).
    pub last_error: Mutex<Option<String>>,
}

impl DispatchStats {
    /// A copy of `last_error`.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The counters as JSON, for the admin port.
    pub fn to_json(&self) -> serde_json::Value {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "dispatching": self.dispatching.load(Ordering::Relaxed),
            "batches_sent": n(&self.batches_sent),
            "events_sent": n(&self.events_sent),
            "failures": n(&self.failures),
            "consecutive_failures": n(&self.consecutive_failures),
            "acked_through": n(&self.acked_through),
            "last_error": self.last_error(),
        })
    }

    fn failed(&self, error: String) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        self.consecutive_failures.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(PoisonError::into_inner) = Some(error);
    }
}

/// Largest webhook answer body read (its content is ignored; a bigger one is not read: the
/// answer counts by its status, and the connection is closed).
const WEBHOOK_ANSWER_BYTES_MAX: usize = 64 * 1024;

/// One webhook attempt (connect, write, read, and its retry on a stale pooled connection) takes
/// at most this many `DispatchOptions::timeout`s, however slowly the receiver trickles its
/// answer: the cluster's outbox lease (`outbox_lease::LEASE_TTL`) is sized on it.
pub const WEBHOOK_ATTEMPT_STEPS: u32 = 3;

/// Where the POSTs go, split for [`GatewayClient`].
#[derive(Clone, PartialEq, Eq)]
struct Target {
    /// `http://host:port` (no path).
    base: String,
    /// Request target: path and query, at least `/`.
    path: String,
    /// `Basic …` from `user:pass@` in the URL.
    authorization: Option<String>,
    /// The URL with any user info replaced by `***`, for logs.
    display: String,
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display)
    }
}

fn percent_decode(s: &str) -> String {
    let hex_val = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(hi), Some(lo)) = (hex_val(b[i + 1]), hex_val(b[i + 2])) {
                out.push(hi << 4 | lo);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_target(url: &str) -> Result<Target, String> {
    let url = url.trim();
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err("webhook URL must start with http:// or https://".into());
    };
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "http" && scheme != "https" {
        return Err(format!("unsupported webhook URL scheme {scheme:?}: use http:// or https://"));
    }
    // No fragment is ever sent.
    let rest = rest.split('#').next().unwrap_or_default();
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let (userinfo, host) = match authority.rfind('@') {
        Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
        None => (None, authority),
    };
    if host.is_empty() {
        return Err("webhook URL has no host".into());
    }
    let authorization = userinfo.map(|ui| {
        let (user, pass) = ui.split_once(':').unwrap_or((ui, ""));
        let creds = format!("{}:{}", percent_decode(user), percent_decode(pass));
        format!("Basic {}", BASE64.encode(creds))
    });
    let path = if path.starts_with('/') { path.to_owned() } else { format!("/{path}") };
    let display = match userinfo {
        Some(_) => format!("{scheme}://***@{host}{path}"),
        None => format!("{scheme}://{host}{path}"),
    };
    Ok(Target { base: format!("{scheme}://{host}"), path, authorization, display })
}

#[derive(Default)]
struct State {
    stop: bool,
    exited: bool,
}

/// Stop flag and exit signal shared with the thread.
#[derive(Default)]
struct Control {
    state: Mutex<State>,
    cv: Condvar,
}

impl Control {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stopping(&self) -> bool {
        self.lock().stop
    }

    /// Sleeps `d` unless stopped first; `true` when stopping.
    fn sleep(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        let mut g = self.lock();
        while !g.stop {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = self.cv.wait_timeout(g, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
        }
        true
    }

    fn request_stop(&self) {
        self.lock().stop = true;
        self.cv.notify_all();
    }

    /// Waits until the thread has exited or `grace` has passed; whether it exited.
    fn wait_exited(&self, grace: Duration) -> bool {
        let deadline = Instant::now() + grace;
        let mut g = self.lock();
        while !g.exited {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = self.cv.wait_timeout(g, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
        }
        true
    }
}

/// Marks the thread exited however it ends (a panic included).
struct ExitGuard(Arc<Control>);

impl Drop for ExitGuard {
    fn drop(&mut self) {
        self.0.lock().exited = true;
        self.0.cv.notify_all();
    }
}

/// The running dispatcher thread. [`EventDispatcher::stop`] (or dropping it) stops it.
pub struct EventDispatcher {
    control: Arc<Control>,
    stats: Arc<DispatchStats>,
    thread: Option<JoinHandle<()>>,
    /// How long a stop waits for the thread (stuck in a request at worst).
    grace: Duration,
    display: String,
}

impl fmt::Debug for EventDispatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventDispatcher").field("url", &self.display).field("stats", &self.stats).finish()
    }
}

impl EventDispatcher {
    /// Starts the `ether-events` thread delivering `store`'s outbox to `webhook`.
    ///
    /// Fails with `InvalidInput` for a URL it cannot send to (another scheme, no host) or an
    /// unusable `ca_path`, or with the error of spawning the thread.
    /// `gate`: `None` delivers always (standalone); in cluster mode the cluster's lease.
    pub fn spawn(
        store: StoreHandle,
        webhook: &Webhook,
        opts: DispatchOptions,
        gate: Option<Box<dyn DispatchGate>>,
    ) -> std::io::Result<EventDispatcher> {
        let target = parse_target(&webhook.url)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("events.webhook_url: {e}")))?;
        // The receiver's answer body is not used: a small bound, so a hostile or broken
        // receiver cannot make the node buffer (or try to allocate) a huge one; a 2xx with a
        // bigger body (an echo, a page) still acknowledges the batch.
        let mut client = GatewayClient::new(&target.base, "")
            .with_connect_timeout(opts.timeout)
            .with_timeout(opts.timeout)
            .with_max_body_bytes(WEBHOOK_ANSWER_BYTES_MAX)
            .with_oversized_body_discarded()
            .with_call_timeout(opts.timeout * WEBHOOK_ATTEMPT_STEPS);
        if let Some(ca) = &webhook.ca_path {
            let invalid = |e: String| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("events.webhook_ca_path {}: {e}", ca.display()),
                )
            };
            let pem = std::fs::read(ca).map_err(|e| invalid(e.to_string()))?;
            client = client.with_tls(ether_sdk::tls_config_with_roots(&pem).map_err(|e| invalid(e.to_string()))?);
        }
        let control = Arc::new(Control::default());
        let stats = Arc::new(DispatchStats::default());
        let grace = opts.timeout + Duration::from_secs(1);
        let display = target.display.clone();
        let worker = Worker {
            store,
            client,
            target,
            secret: webhook.secret.expose().as_bytes().to_vec(),
            opts,
            control: control.clone(),
            stats: stats.clone(),
            failures: 0,
            gate,
        };
        let guard = ExitGuard(control.clone());
        let thread = std::thread::Builder::new().name("ether-events".into()).spawn(move || {
            let _guard = guard;
            worker.run();
        })?;
        Ok(EventDispatcher { control, stats, thread: Some(thread), grace, display })
    }

    /// The webhook URL, user info redacted (for logs and the admin port).
    pub fn url(&self) -> &str {
        &self.display
    }

    /// The dispatcher's counters (shared: they stay readable after a stop).
    pub fn stats(&self) -> Arc<DispatchStats> {
        self.stats.clone()
    }

    /// Stops the thread and waits for it, at most about `timeout` (+1 s) even while a
    /// request hangs; past that the thread is left to finish its request alone (it sends
    /// nothing more). Undelivered events stay in the outbox for the next start.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.control.request_stop();
        if thread.thread().id() == std::thread::current().id() {
            return;
        }
        if self.control.wait_exited(self.grace) {
            let _ = thread.join();
        } else {
            tracing::warn!(url = %self.display, "event dispatcher still in a request after stop; not waiting for it");
        }
    }
}

impl Drop for EventDispatcher {
    fn drop(&mut self) {
        self.halt();
    }
}

/// The thread's state.
struct Worker {
    store: StoreHandle,
    client: GatewayClient,
    target: Target,
    secret: Vec<u8>,
    opts: DispatchOptions,
    control: Arc<Control>,
    stats: Arc<DispatchStats>,
    /// Consecutive failures (drives the backoff).
    failures: u32,
    /// Who may deliver now; `None`: this node, always.
    gate: Option<Box<dyn DispatchGate>>,
}

/// How a batch's delivery ended.
enum Delivery {
    /// Answered 2xx.
    Done,
    /// Another node holds the turn now; the batch stays in the outbox for it.
    TurnLost,
    /// The dispatcher is stopping.
    Stopped,
}

impl Worker {
    fn run(mut self) {
        tracing::info!(url = %self.target.display, "event dispatcher started");
        let limit = self.opts.batch_max.clamp(1, PAGE_LIMIT_MAX);
        let mut after = 0u64;
        while !self.control.stopping() {
            if !self.holds_turn() {
                if self.control.sleep(self.opts.idle_poll) {
                    break;
                }
                continue;
            }
            let events = match self.store.call_blocking(Op::OutboxFetch { after, limit }).and_then(Reply::events) {
                Ok(events) => events,
                Err(e) => {
                    if self.store_failed("fetch", &e) {
                        break;
                    }
                    continue;
                }
            };
            let (Some(first), Some(last)) = (events.first(), events.last()) else {
                if self.control.sleep(self.opts.idle_poll) {
                    break;
                }
                continue;
            };
            let (first, through) = (first.seq, last.seq);
            match self.deliver(&events, first, through) {
                Delivery::Done => {}
                Delivery::TurnLost => continue,
                Delivery::Stopped => break,
            }
            after = through;
            if !self.ack(through) {
                break;
            }
        }
        if let Some(gate) = &mut self.gate {
            gate.release();
        }
        self.stats.dispatching.store(false, Ordering::Relaxed);
        tracing::info!(url = %self.target.display, "event dispatcher stopped");
    }

    /// Asks the gate (if any) and shows the answer in the stats.
    fn holds_turn(&mut self) -> bool {
        let holds = self.gate.as_mut().is_none_or(|g| g.may_dispatch());
        let was = self.stats.dispatching.swap(holds, Ordering::Relaxed);
        if holds != was {
            tracing::info!(url = %self.target.display, dispatching = holds, "event outbox delivery turn changed");
        }
        holds
    }

    /// POSTs the batch until a 2xx, while this node holds the turn.
    fn deliver(&mut self, events: &[Event], first: u64, through: u64) -> Delivery {
        let body = encode_batch(events);
        let signature = sign(&self.secret, &body);
        let mut headers: Vec<(&str, &str)> =
            vec![("Content-Type", "application/json"), (SIGNATURE_HEADER, signature.as_str())];
        let authorization = self.target.authorization.clone();
        if let Some(auth) = &authorization {
            headers.push(("Authorization", auth.as_str()));
        }
        loop {
            if self.control.stopping() {
                return Delivery::Stopped;
            }
            if !self.holds_turn() {
                return Delivery::TurnLost;
            }
            let error = match self.client.request_with_headers("POST", &self.target.path, &headers, Some(&body)) {
                Ok(resp) if resp.is_success() => break,
                Ok(resp) => {
                    let text = resp.text();
                    let snippet: String = text.chars().take(ERROR_SNIPPET_CHARS).collect();
                    format!("HTTP {} {}", resp.status, snippet.trim())
                }
                Err(e) => e.to_string(),
            };
            let delay = self.failed(error.clone());
            tracing::warn!(
                url = %self.target.display,
                error = %error,
                attempt = self.failures,
                first_event = first,
                last_event = through,
                retry_in_ms = delay.as_millis() as u64,
                "event webhook delivery failed; retrying the same batch"
            );
            if self.control.sleep(delay) {
                return Delivery::Stopped;
            }
        }
        self.failures = 0;
        let st = &self.stats;
        st.consecutive_failures.store(0, Ordering::Relaxed);
        st.batches_sent.fetch_add(1, Ordering::Relaxed);
        st.events_sent.fetch_add(events.len() as u64, Ordering::Relaxed);
        Delivery::Done
    }

    /// Removes the delivered batch from the outbox; `false` when stopped first (the batch is
    /// then sent again after a restart: at-least-once).
    fn ack(&mut self, through: u64) -> bool {
        loop {
            match self.store.call_blocking(Op::OutboxAck { through }) {
                Ok(_) => {
                    self.stats.acked_through.fetch_max(through, Ordering::Relaxed);
                    return true;
                }
                Err(e) => {
                    if self.store_failed("ack", &e) {
                        return false;
                    }
                }
            }
        }
    }

    /// Counts, logs and backs off a store failure; `true` when stopping.
    fn store_failed(&mut self, what: &str, e: &StoreError) -> bool {
        let delay = self.failed(format!("store {what}: {e}"));
        tracing::warn!(
            url = %self.target.display,
            error = %e,
            attempt = self.failures,
            retry_in_ms = delay.as_millis() as u64,
            "event outbox {what} failed; retrying"
        );
        self.control.sleep(delay)
    }

    /// Records a failure; the delay before the next attempt.
    fn failed(&mut self, error: String) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.stats.failed(error);
        self.opts.backoff(self.failures)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;
    use std::sync::atomic::AtomicBool;

    use ether_store::{NewEvent, SqliteBackend, SqliteOptions, StoreOptions, StoreThread};
    use serde_json::{json, Value};

    use super::*;
    use crate::secrets::Secret;

    const SECRET: &str = "webhook-secret-0123456789";

    #[test]
    fn sign_matches_rfc4231_case_2() {
        let sig = sign(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(sig, "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
        assert!(verify(b"Jefe", b"what do ya want for nothing?", &sig));
        assert!(verify(b"Jefe", b"what do ya want for nothing?", &sig.to_uppercase().replace("SHA256=", "sha256=")));
        assert!(!verify(b"Jefe", b"what do ya want for nothing!", &sig));
        assert!(!verify(b"jefe", b"what do ya want for nothing?", &sig));
        assert!(!verify(b"Jefe", b"what do ya want for nothing?", &sig[7..]));
        assert!(!verify(b"Jefe", b"what do ya want for nothing?", "sha256=zz"));
        assert!(!verify(b"Jefe", b"what do ya want for nothing?", &sig[..sig.len() - 2]));
        assert!(!verify(b"Jefe", b"x", ""));
    }

    fn ev(seq: u64, kind: &str, data: &str) -> Event {
        Event { seq, ts: 1_700_000_000_000 + seq, kind: kind.into(), data: data.into() }
    }

    #[test]
    fn body_merges_data_fields() {
        let events = [
            ev(7, "message.delivered", r#"{"id":"123","user":"bob","device":"d1"}"#),
            ev(8, "message.read", r#"{"chat":"u:alice","user":"bob","up_to":5,"nested":{"a":[1,2]}}"#),
            ev(9, "user.online", r#"{"event_id":"evil","type":"x","ts":0,"user":"carol","user":"dup"}"#),
            ev(10, "odd", "[1,2]"),
            ev(11, "broken", "not json \""),
            ev(12, "user.offline", "{}"),
        ];
        let body = encode_batch(&events);
        let v: Value = serde_json::from_slice(&body).unwrap();
        let text = String::from_utf8(body).unwrap();
        assert!(text.starts_with(r#"{"events":[{"event_id":"7","type":"message.delivered","ts":1700000000007,"id":"123","user":"bob","device":"d1"}"#), "{text}");
        let evs = v["events"].as_array().unwrap();
        assert_eq!(evs.len(), 6);
        assert_eq!(
            evs[0],
            json!({"event_id":"7","type":"message.delivered","ts":1_700_000_000_007u64,"id":"123","user":"bob","device":"d1"})
        );
        assert_eq!(evs[1]["event_id"], "8");
        assert_eq!(evs[1]["up_to"], 5);
        assert_eq!(evs[1]["nested"], json!({"a":[1,2]}));
        // Reserved keys cannot be overridden by data; the first of repeated keys wins.
        assert_eq!(evs[2], json!({"event_id":"9","type":"user.online","ts":1_700_000_000_009u64,"user":"carol"}));
        assert_eq!(evs[3]["data"], json!([1, 2]));
        assert_eq!(evs[4]["data"], "not json \"");
        assert_eq!(evs[5], json!({"event_id":"12","type":"user.offline","ts":1_700_000_000_012u64}));
        assert_eq!(encode_batch(&[]), br#"{"events":[]}"#);
    }

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let o = DispatchOptions {
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            ..DispatchOptions::default()
        };
        for _ in 0..50 {
            let d1 = o.backoff(1);
            assert_eq!(d1, Duration::from_millis(100));
            let d4 = o.backoff(4);
            assert!(d4 >= Duration::from_millis(400) && d4 <= Duration::from_millis(800), "{d4:?}");
            for n in [20, 40, 1000, u32::MAX] {
                let d = o.backoff(n);
                assert!(d >= Duration::from_secs(15) && d <= Duration::from_secs(30), "{n}: {d:?}");
            }
        }
        let zero = DispatchOptions { backoff_min: Duration::ZERO, backoff_max: Duration::ZERO, ..o };
        assert_eq!(zero.backoff(5), Duration::ZERO);
    }

    #[test]
    fn webhook_urls() {
        let t = parse_target("http://127.0.0.1:8080/hooks/ether?tenant=1#frag").unwrap();
        assert_eq!(t.base, "http://127.0.0.1:8080");
        assert_eq!(t.path, "/hooks/ether?tenant=1");
        assert_eq!(t.authorization, None);
        let t = parse_target("HTTP://hooks.example").unwrap();
        assert_eq!((t.base.as_str(), t.path.as_str()), ("http://hooks.example", "/"));
        let t = parse_target("http://hooks.example?x=1").unwrap();
        assert_eq!(t.path, "/?x=1");
        let t = parse_target("http://us%40er:hunter2@[::1]:9/e").unwrap();
        assert_eq!(t.base, "http://[::1]:9");
        assert_eq!(t.authorization.as_deref(), Some(format!("Basic {}", BASE64.encode("us@er:hunter2")).as_str()));
        assert_eq!(t.display, "http://***@[::1]:9/e");
        assert!(!format!("{t:?}").contains("hunter2"));
        let t = parse_target("https://hooks.example/e").unwrap();
        assert_eq!((t.base.as_str(), t.path.as_str()), ("https://hooks.example", "/e"));
        assert!(parse_target("ftp://x/").is_err());
        assert!(parse_target("http:///x").is_err());
        assert!(parse_target("hooks.example").is_err());
        assert_eq!(percent_decode("a%2Fb%zz%4"), "a/b%zz%4");
    }

    // ---- against a real store and a tiny webhook receiver ----------------------------------

    fn store() -> (tempfile::TempDir, StoreHandle) {
        let dir = tempfile::tempdir().unwrap();
        let backend = SqliteBackend::open_dir(dir.path(), SqliteOptions::test_min()).unwrap();
        let handle = StoreThread::spawn(backend, StoreOptions::test_min()).unwrap();
        (dir, handle)
    }

    fn append(store: &StoreHandle, n: u64) {
        let events = (0..n)
            .map(|i| NewEvent {
                kind: "message.delivered".into(),
                data: json!({"id": format!("{}", 1000 + i), "user": "bob", "device": "d1"}).to_string(),
                ts: 1_700_000_000_000 + i,
            })
            .collect();
        match store.call_blocking(Op::OutboxAppend { events }).unwrap() {
            Reply::OutboxAppended { .. } => {}
            other => panic!("{other:?}"),
        }
    }

    fn outbox(store: &StoreHandle) -> Vec<Event> {
        store.call_blocking(Op::OutboxFetch { after: 0, limit: 100 }).unwrap().events().unwrap()
    }

    fn webhook(url: String) -> Webhook {
        Webhook { url, secret: Secret::new(SECRET), ca_path: None }
    }

    fn fast(timeout: Duration) -> DispatchOptions {
        DispatchOptions {
            batch_max: 2,
            timeout,
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_millis(50),
            idle_poll: Duration::from_millis(10),
        }
    }

    fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[derive(Debug, Clone)]
    struct Post {
        target: String,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Post {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
        }
    }

    /// A keep-alive HTTP/1.1 webhook receiver; `answer(n)` is the status of the n-th POST
    /// (0-based), `None` to never answer.
    struct Receiver {
        port: u16,
        posts: Arc<Mutex<Vec<Post>>>,
        stop: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
    }

    impl Receiver {
        fn start(answer: fn(usize) -> Option<u16>) -> Receiver {
            Receiver::start_with(answer, None)
        }

        /// With `tls`, every connection is a TLS server session with that configuration.
        fn start_with(answer: fn(usize) -> Option<u16>, tls: Option<Arc<rustls::ServerConfig>>) -> Receiver {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            listener.set_nonblocking(true).unwrap();
            let port = listener.local_addr().unwrap().port();
            let posts = Arc::new(Mutex::new(Vec::new()));
            let stop = Arc::new(AtomicBool::new(false));
            let (p, s) = (posts.clone(), stop.clone());
            let thread = std::thread::spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let (p, s, tls) = (p.clone(), s.clone(), tls.clone());
                            stream.set_nonblocking(false).unwrap();
                            stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                            std::thread::spawn(move || match tls {
                                None => serve(stream, answer, &p, &s),
                                Some(config) => {
                                    let session = rustls::ServerConnection::new(config).unwrap();
                                    serve(rustls::StreamOwned::new(session, stream), answer, &p, &s)
                                }
                            });
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
            });
            Receiver { port, posts, stop, thread: Some(thread) }
        }

        fn posts(&self) -> Vec<Post> {
            self.posts.lock().unwrap().clone()
        }
    }

    impl Drop for Receiver {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn serve<S: Read + Write>(
        stream: S,
        answer: fn(usize) -> Option<u16>,
        posts: &Mutex<Vec<Post>>,
        stop: &AtomicBool,
    ) {
        let mut r = BufReader::new(stream);
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let target = line.split_whitespace().nth(1).unwrap_or_default().to_owned();
            assert!(line.starts_with("POST "), "{line:?}");
            let mut headers = Vec::new();
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).unwrap_or(0) == 0 {
                    return;
                }
                let h = h.trim_end();
                if h.is_empty() {
                    break;
                }
                let (k, v) = h.split_once(':').unwrap();
                headers.push((k.trim().to_owned(), v.trim().to_owned()));
            }
            let len: usize = headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .map_or(0, |(_, v)| v.parse().unwrap());
            let mut body = vec![0; len];
            if r.read_exact(&mut body).is_err() {
                return;
            }
            let n = {
                let mut g = posts.lock().unwrap();
                g.push(Post { target, headers, body });
                g.len() - 1
            };
            match answer(n) {
                Some(status) => {
                    let resp = format!("HTTP/1.1 {status} X\r\nContent-Length: 4\r\n\r\nnope");
                    let w = r.get_mut();
                    if w.write_all(resp.as_bytes()).and_then(|()| w.flush()).is_err() {
                        return;
                    }
                }
                None => {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    return;
                }
            }
        }
    }

    fn event_ids(post: &Post) -> Vec<String> {
        let v: Value = serde_json::from_slice(&post.body).unwrap();
        v["events"].as_array().unwrap().iter().map(|e| e["event_id"].as_str().unwrap().to_owned()).collect()
    }

    #[test]
    fn delivers_every_event_after_retries_and_empties_the_outbox() {
        let (_dir, store) = store();
        append(&store, 5);
        let rx = Receiver::start(|n| Some(if n < 2 { 500 } else { 200 }));
        let url = format!("http://127.0.0.1:{}/hooks/ether?tenant=t1", rx.port);
        let d = EventDispatcher::spawn(store.clone(), &webhook(url), fast(Duration::from_secs(5)), None).unwrap();
        let stats = d.stats();

        wait_until("an empty outbox", || outbox(&store).is_empty() && stats.acked_through.load(Ordering::Relaxed) == 5);
        let posts = rx.posts();
        let seen: BTreeSet<String> = posts.iter().flat_map(event_ids).collect();
        let expected: BTreeSet<String> = (1..=5).map(|i: u64| i.to_string()).collect();
        assert_eq!(seen, expected);
        // Two 500s, then three 2xx batches of at most 2 events.
        assert!(posts.len() >= 3, "{}", posts.len());
        assert_eq!(posts.len(), 5);
        assert_eq!(posts[0].body, posts[1].body, "a failed batch is retried as is");
        assert_eq!(posts[1].body, posts[2].body);
        assert_eq!(event_ids(&posts[2]), ["1", "2"]);
        assert_eq!(event_ids(&posts[3]), ["3", "4"]);
        assert_eq!(event_ids(&posts[4]), ["5"]);
        for p in &posts {
            assert_eq!(p.target, "/hooks/ether?tenant=t1");
            assert_eq!(p.header("content-type"), Some("application/json"));
            assert_eq!(p.header("authorization"), None);
            let sig = p.header(SIGNATURE_HEADER).unwrap();
            assert!(verify(SECRET.as_bytes(), &p.body, sig), "{sig}");
            assert_eq!(sig, sign(SECRET.as_bytes(), &p.body));
            let v: Value = serde_json::from_slice(&p.body).unwrap();
            for e in v["events"].as_array().unwrap() {
                assert_eq!(e["type"], "message.delivered");
                assert_eq!(e["user"], "bob");
                assert_eq!(e["device"], "d1");
                assert!(e["ts"].is_u64() && e["id"].is_string(), "{e}");
            }
        }
        assert_eq!(stats.batches_sent.load(Ordering::Relaxed), 3);
        assert_eq!(stats.events_sent.load(Ordering::Relaxed), 5);
        assert_eq!(stats.failures.load(Ordering::Relaxed), 2);
        assert_eq!(stats.consecutive_failures.load(Ordering::Relaxed), 0);
        assert!(stats.last_error().unwrap().contains("500"), "{:?}", stats.last_error());

        // New events keep flowing after an idle spell.
        append(&store, 1);
        wait_until("the late event", || outbox(&store).is_empty() && rx.posts().len() == 6);
        assert_eq!(event_ids(&rx.posts()[5]), ["6"]);
        assert_eq!(stats.to_json()["events_sent"], 6);

        let t0 = Instant::now();
        d.stop();
        assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
        store.shutdown();
    }

    /// A gate whose answer the test sets; counts releases.
    #[derive(Clone, Default)]
    struct Turn {
        open: Arc<AtomicBool>,
        released: Arc<AtomicU64>,
    }

    impl DispatchGate for Turn {
        fn may_dispatch(&mut self) -> bool {
            self.open.load(Ordering::SeqCst)
        }
        fn release(&mut self) {
            self.released.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn only_the_turn_holder_delivers_and_a_lost_turn_stops_retries() {
        let (_dir, store) = store();
        append(&store, 3);
        // Fails until the test says otherwise: the batch is in its retry loop.
        static ANSWER: AtomicU64 = AtomicU64::new(500);
        let rx = Receiver::start(|_| Some(ANSWER.load(Ordering::SeqCst) as u16));
        let url = format!("http://127.0.0.1:{}/", rx.port);
        let turn = Turn::default();
        let d = EventDispatcher::spawn(
            store.clone(),
            &webhook(url),
            fast(Duration::from_secs(5)),
            Some(Box::new(turn.clone())),
        )
        .unwrap();
        let stats = d.stats();
        // Without the turn nothing is fetched or sent.
        std::thread::sleep(Duration::from_millis(150));
        assert!(rx.posts().is_empty());
        assert!(!stats.dispatching.load(Ordering::Relaxed));
        assert_eq!(stats.to_json()["dispatching"], false);
        // With it, the batch is tried (and fails); losing the turn ends the retries.
        turn.open.store(true, Ordering::SeqCst);
        wait_until("a failed attempt", || !rx.posts().is_empty());
        assert!(stats.dispatching.load(Ordering::Relaxed));
        turn.open.store(false, Ordering::SeqCst);
        wait_until("the turn given up", || !stats.dispatching.load(Ordering::Relaxed));
        let tried = rx.posts().len();
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(rx.posts().len(), tried, "no retry without the turn");
        assert_eq!(outbox(&store).len(), 3, "nothing acked");
        // The turn back and a healthy receiver: the same events, acked.
        ANSWER.store(200, Ordering::SeqCst);
        turn.open.store(true, Ordering::SeqCst);
        wait_until("an empty outbox", || outbox(&store).is_empty());
        let seen: BTreeSet<String> = rx.posts().iter().skip(tried).flat_map(event_ids).collect();
        assert_eq!(seen, ["1", "2", "3"].map(String::from).into());
        d.stop();
        assert_eq!(turn.released.load(Ordering::SeqCst), 1, "the turn is given up on stop");
        assert!(!stats.dispatching.load(Ordering::Relaxed));
        store.shutdown();
    }

    /// API.md: a timeout is retried like a non-2xx answer: the batch whose request hung is
    /// sent again (the same events, first) and acked only once a later request is answered.
    #[test]
    fn a_timed_out_batch_is_sent_again_and_acked_once_answered() {
        let (_dir, store) = store();
        append(&store, 3);
        // The first POST hangs (no answer at all); every later one is answered 200.
        let rx = Receiver::start(|n| if n == 0 { None } else { Some(200) });
        let url = format!("http://127.0.0.1:{}/", rx.port);
        let d = EventDispatcher::spawn(store.clone(), &webhook(url), fast(Duration::from_millis(300)), None).unwrap();
        wait_until("an empty outbox", || outbox(&store).is_empty());
        let posts = rx.posts();
        assert!(posts.len() >= 2, "the timed-out batch was sent again");
        assert_eq!(event_ids(&posts[0]), event_ids(&posts[1]), "the same batch, first");
        let seen: BTreeSet<String> = posts.iter().skip(1).flat_map(event_ids).collect();
        assert_eq!(seen, ["1", "2", "3"].map(String::from).into());
        assert!(d.stats().consecutive_failures.load(Ordering::Relaxed) == 0, "healthy again");
        d.stop();
        store.shutdown();
    }

    /// A receiver that answers a byte at a time never trips the per-read timeout; the attempt
    /// is still cut after `WEBHOOK_ATTEMPT_STEPS` timeouts and tried again (in cluster mode a
    /// longer one would outlast the outbox lease, and a second node would deliver beside it).
    #[test]
    fn an_answer_trickled_a_byte_at_a_time_is_cut_at_the_attempts_bound() {
        use std::sync::atomic::AtomicUsize;
        let (_dir, store) = store();
        append(&store, 1);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let posts = Arc::new(AtomicUsize::new(0));
        let seen = posts.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let seen = seen.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    if conn.read(&mut buf).unwrap_or(0) == 0 {
                        return;
                    }
                    seen.fetch_add(1, Ordering::SeqCst);
                    // 1,000 bytes announced, one every 100 ms: 100 s if waited for.
                    if conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n").is_err() {
                        return;
                    }
                    for _ in 0..1000 {
                        std::thread::sleep(Duration::from_millis(100));
                        if conn.write_all(b"x").is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let url = format!("http://127.0.0.1:{port}/");
        let d = EventDispatcher::spawn(store.clone(), &webhook(url), fast(Duration::from_millis(300)), None).unwrap();
        // Attempts of 0.9 s at most: three within 4 s (one only, without the bound).
        wait_until("a third attempt", || posts.load(Ordering::SeqCst) >= 3);
        assert_eq!(outbox(&store).len(), 1, "nothing acked without a whole 2xx answer");
        d.stop();
        store.shutdown();
    }

    #[test]
    fn stop_is_prompt_while_the_receiver_hangs_and_nothing_is_acked() {
        let (_dir, store) = store();
        append(&store, 3);
        let rx = Receiver::start(|_| None);
        let url = format!("http://127.0.0.1:{}/", rx.port);
        let timeout = Duration::from_millis(300);
        let d = EventDispatcher::spawn(store.clone(), &webhook(url), fast(timeout), None).unwrap();
        wait_until("a request in flight", || !rx.posts().is_empty());
        let t0 = Instant::now();
        d.stop();
        let took = t0.elapsed();
        assert!(took < timeout + Duration::from_millis(700), "{took:?}");
        assert_eq!(outbox(&store).len(), 3, "nothing acked without a 2xx");
        store.shutdown();
    }

    #[test]
    fn unreachable_webhook_backs_off_and_keeps_the_events() {
        let (_dir, store) = store();
        append(&store, 2);
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let d = EventDispatcher::spawn(
            store.clone(),
            &webhook(format!("http://127.0.0.1:{port}")),
            fast(Duration::from_secs(1)),
            None,
        )
        .unwrap();
        let stats = d.stats();
        wait_until("repeated failures", || stats.consecutive_failures.load(Ordering::Relaxed) >= 3);
        assert!(stats.last_error().is_some());
        assert_eq!(stats.batches_sent.load(Ordering::Relaxed), 0);
        drop(d);
        assert_eq!(outbox(&store).len(), 2);
        store.shutdown();
    }

    #[test]
    fn store_errors_back_off_and_stop_stays_prompt() {
        let (_dir, store) = store();
        store.shutdown();
        let rx = Receiver::start(|_| Some(200));
        let url = format!("http://127.0.0.1:{}/", rx.port);
        let d = EventDispatcher::spawn(store, &webhook(url), fast(Duration::from_secs(5)), None).unwrap();
        let stats = d.stats();
        wait_until("store failures", || stats.failures.load(Ordering::Relaxed) >= 2);
        assert!(stats.last_error().unwrap().starts_with("store fetch"), "{:?}", stats.last_error());
        let t0 = Instant::now();
        d.stop();
        assert!(t0.elapsed() < Duration::from_secs(1));
        assert!(rx.posts().is_empty());
    }

    #[test]
    fn an_unusable_url_or_ca_is_refused_at_spawn() {
        let (_dir, store) = store();
        let spawn = |hook: Webhook| EventDispatcher::spawn(store.clone(), &hook, DispatchOptions::default(), None);
        let err = spawn(webhook("ftp://hooks.example/e".into())).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
        let mut hook = webhook("https://hooks.example/e".into());
        hook.ca_path = Some("/nonexistent/ca.pem".into());
        let err = spawn(hook).unwrap_err();
        assert!(err.to_string().contains("events.webhook_ca_path"), "{err}");
        store.shutdown();
    }

    /// A webhook receiver over TLS with the test certificate (`tests/fixtures/tls-cert.pem`).
    fn tls_receiver(answer: fn(usize) -> Option<u16>) -> Receiver {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let files = crate::config::Tls {
            cert_path: fixtures.join("tls-cert.pem"),
            key_path: fixtures.join("tls-key.pem"),
            reload_check: Duration::ZERO,
        };
        let config = crate::tls::server_config(crate::tls::CertStore::load(&files).unwrap()).unwrap();
        Receiver::start_with(answer, Some(config))
    }

    #[test]
    fn https_webhooks_get_the_events_when_their_certificate_is_trusted() {
        let (_dir, store) = store();
        append(&store, 3);
        let rx = tls_receiver(|_| Some(200));
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        // The default (Mozilla) roots do not trust the test certificate: failures, nothing acked.
        let d = EventDispatcher::spawn(
            store.clone(),
            &webhook(format!("https://localhost:{}/hooks", rx.port)),
            fast(Duration::from_secs(5)),
            None,
        )
        .unwrap();
        let stats = d.stats();
        wait_until("a certificate failure", || stats.failures.load(Ordering::Relaxed) >= 1);
        let error = stats.last_error().unwrap_or_default().to_lowercase();
        assert!(error.contains("certificate"), "{error}");
        d.stop();
        assert_eq!(outbox(&store).len(), 3);
        // With the certificate as the root: delivered, signed, acked.
        let mut hook = webhook(format!("https://localhost:{}/hooks", rx.port));
        hook.ca_path = Some(fixtures.join("tls-cert.pem"));
        let d = EventDispatcher::spawn(store.clone(), &hook, fast(Duration::from_secs(5)), None).unwrap();
        wait_until("an empty outbox", || outbox(&store).is_empty());
        let posts = rx.posts();
        let seen: BTreeSet<String> = posts.iter().flat_map(event_ids).collect();
        assert_eq!(seen, ["1", "2", "3"].map(String::from).into());
        for p in &posts {
            assert_eq!(p.target, "/hooks");
            assert!(verify(SECRET.as_bytes(), &p.body, p.header(SIGNATURE_HEADER).unwrap()));
        }
        d.stop();
        store.shutdown();
    }
}
