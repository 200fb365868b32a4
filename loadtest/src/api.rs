//! The business-system side: pushes messages through the API at a target rate.
//!
//! `--api-conns` keep-alive HTTP/1.1 connections on one glommio executor; each has a writer
//! task that sends its share of requests when they fall due (coalescing those already due into
//! one write, up to `--pipeline` unanswered requests) and a reader task that matches
//! responses to requests in order. Message `k` goes to user `k % users` (or, publishing to
//! groups, to group `k % groups` from its first member), its body carries the send time:
//! `{"text":"t=<unix nanos>;k=<k>;r=<run>"}`. A paced run stamps the time the request was
//! due by its schedule when it left later than that (waiting for a free `--pipeline` slot
//! behind slow answers, or for the tool's own thread): latency counts from when the business
//! system meant to publish, so a node that answers slowly cannot hide its queueing delay in
//! the sender's lag (coordinated omission); `send_lag` still says how late requests left.
//! A [`Gate`] holds the sender back while too many published messages are not yet delivered
//! at the terminals (`group --mode hot`: as fast as the node delivers, without overrunning the
//! terminals' queues). [`call`] is a plain blocking request for set-up (creating groups).
use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::AsyncWriteExt;
use glommio::{LocalExecutorBuilder, Placement};
use serde::{Deserialize, Serialize};

use crate::stats::{Hist, HistData};
use crate::terminal::read_some;

/// The send stamp in a message body: `t=<unix nanos>;k=<message number>;r=<run id>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp<'a> {
    pub t_ns: u64,
    pub k: u64,
    pub run: &'a str,
}

impl<'a> Stamp<'a> {
    pub fn parse(text: &'a str) -> Option<Stamp<'a>> {
        let mut it = text.split(';');
        let t_ns = it.next()?.strip_prefix("t=")?.parse().ok()?;
        let k = it.next()?.strip_prefix("k=")?.parse().ok()?;
        let run = it.next()?.strip_prefix("r=")?;
        Some(Stamp { t_ns, k, run })
    }

    pub fn write(&self, out: &mut Vec<u8>) {
        let _ = write!(out, "t={};k={};r={}", self.t_ns, self.k, self.run);
    }
}

/// What the API driver does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiSpec {
    pub addr: SocketAddr,
    /// The other nodes of a cluster: connection `c` goes to node `c % nodes`.
    #[serde(default)]
    pub more_addrs: Vec<SocketAddr>,
    pub api_key: String,
    pub conns: usize,
    /// Unanswered requests allowed per connection.
    pub pipeline: usize,
    /// Messages per second (0 = as fast as the window allows).
    pub rate: f64,
    /// Messages to send (at most; sending also ends after `duration`).
    pub messages: u64,
    pub duration: Duration,
    /// Messages per request through `/v1/messages/batch`; 0 = `/v1/messages`, one each.
    pub batch_size: usize,
    pub users: u64,
    pub user_prefix: String,
    pub from: String,
    pub run_id: String,
    /// How long to wait for outstanding answers once everything is sent.
    pub drain_timeout: Duration,
    pub pin: Option<usize>,
    /// Publish to groups instead of users (`users` is then the number of groups).
    #[serde(default)]
    pub group: Option<GroupTarget>,
    /// Keep the id of every accepted message, per user (`reconnect`).
    #[serde(default)]
    pub record_ids: bool,
    #[serde(skip)]
    pub gate: Option<Gate>,
}

/// Where group messages go: group `<prefix><g>`, sent by its first member
/// `<user_prefix><g * members>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupTarget {
    pub prefix: String,
    pub members: u64,
}

/// Holds the sender while more than `window` messages are published but not yet delivered:
/// delivered = the terminals' live counters summed, divided by deliveries per message.
#[derive(Debug, Clone)]
pub struct Gate {
    pub delivered: Vec<Arc<AtomicU64>>,
    pub per_msg: u64,
    pub window: u64,
}

impl Gate {
    fn open(&self, sent: u64) -> bool {
        let delivered: u64 = self.delivered.iter().map(|c| c.load(Ordering::Relaxed)).sum();
        sent <= delivered / self.per_msg.max(1) + self.window
    }
}

impl ApiSpec {
    fn per_request(&self) -> u64 {
        self.batch_size.max(1) as u64
    }

    fn requests(&self) -> u64 {
        self.messages.div_ceil(self.per_request())
    }
}

/// Live counters of a running driver.
#[derive(Default)]
pub struct ApiShared {
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub errors: AtomicU64,
    pub stop: AtomicBool,
    pub sending_done: AtomicBool,
}

/// The driver's account.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ApiReport {
    pub requests: u64,
    pub messages_sent: u64,
    pub messages_acked: u64,
    pub messages_failed: u64,
    /// Failed messages by reason (`http 503 unavailable`, `connection closed`, ...).
    pub errors: BTreeMap<String, u64>,
    /// Messages acknowledged by the API, per user (per group when publishing to groups).
    pub per_user_acked: Vec<u32>,
    /// Ids of the acknowledged messages, per user (with `record_ids`).
    #[serde(default)]
    pub per_user_ids: Vec<Vec<u64>>,
    /// Request to response, microseconds.
    pub api_latency: HistData,
    /// How late requests left against their schedule, microseconds (the sender's own lag).
    pub send_lag: HistData,
    pub first_send_ns: u64,
    pub last_send_ns: u64,
    pub last_answer_ns: u64,
}

/// A driver running on its own thread.
pub struct ApiRun {
    pub shared: Arc<ApiShared>,
    handle: glommio::ExecutorJoinHandle<ApiReport>,
}

impl ApiRun {
    pub fn start(spec: ApiSpec) -> io::Result<ApiRun> {
        let shared = Arc::new(ApiShared::default());
        let sh = shared.clone();
        let placement = match spec.pin {
            Some(p) => Placement::Fixed(p),
            None => Placement::Unbound,
        };
        let handle = LocalExecutorBuilder::new(placement)
            .name("lt-api")
            .io_memory(256 << 10)
            .ring_depth(crate::RING_DEPTH)
            .spawn(move || drive(spec, sh))
            .map_err(|e| io::Error::other(format!("executor: {e}")))?;
        Ok(ApiRun { shared, handle })
    }

    /// Everything was sent and every request answered (or failed).
    pub fn finished(&self) -> bool {
        self.shared.sending_done.load(Ordering::SeqCst)
            && self.shared.sent.load(Ordering::SeqCst)
                <= self.shared.acked.load(Ordering::SeqCst) + self.shared.errors.load(Ordering::SeqCst)
    }

    pub fn join(self) -> ApiReport {
        self.handle.join().unwrap_or_else(|e| {
            let mut r = ApiReport::default();
            r.errors.insert(format!("driver failed: {e}"), 1);
            r
        })
    }
}

struct InFlight {
    first_k: u64,
    n: u64,
    sent_at: Instant,
}

#[derive(Default)]
struct DriverState {
    report: ApiReport,
    api_hist: Hist,
    lag_hist: Hist,
}

impl DriverState {
    fn fail(&mut self, shared: &ApiShared, reason: &str, n: u64) {
        self.report.messages_failed += n;
        *self.report.errors.entry(reason.to_owned()).or_default() += n;
        shared.errors.fetch_add(n, Ordering::SeqCst);
    }

    fn ack(&mut self, shared: &ApiShared, spec: &ApiSpec, k: u64, id: Option<u64>) {
        self.report.messages_acked += 1;
        if spec.users > 0 {
            let u = (k % spec.users) as usize;
            self.report.per_user_acked[u] += 1;
            if let (Some(ids), Some(id)) = (self.report.per_user_ids.get_mut(u), id) {
                ids.push(id);
            }
        }
        shared.acked.fetch_add(1, Ordering::SeqCst);
    }
}

async fn drive(spec: ApiSpec, shared: Arc<ApiShared>) -> ApiReport {
    let spec = Rc::new(spec);
    let state = Rc::new(RefCell::new(DriverState::default()));
    state.borrow_mut().report.per_user_acked = vec![0; spec.users as usize];
    if spec.record_ids {
        state.borrow_mut().report.per_user_ids = vec![Vec::new(); spec.users as usize];
    }
    let start = Instant::now();
    let start_ns = crate::unix_nanos();
    let mut writers = Vec::new();
    let mut queues = Vec::new();
    for c in 0..spec.conns.max(1) {
        let q: Rc<RefCell<VecDeque<InFlight>>> = Rc::default();
        queues.push(q.clone());
        let (spec, state, shared) = (spec.clone(), state.clone(), shared.clone());
        writers
            .push(glommio::spawn_local(async move { connection(c, (start, start_ns), spec, state, shared, q).await }));
    }
    for w in writers {
        w.await;
    }
    shared.sending_done.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + spec.drain_timeout;
    while queues.iter().any(|q| !q.borrow().is_empty()) && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    let mut st = state.borrow_mut();
    for q in &queues {
        for f in q.borrow_mut().drain(..) {
            st.fail(&shared, "no answer", f.n);
        }
    }
    let DriverState { mut report, api_hist, lag_hist } = std::mem::take(&mut *st);
    report.api_latency = api_hist.data();
    report.send_lag = lag_hist.data();
    report
}

/// One connection: writes its requests (`c, c+conns, ...`) on schedule; a reader task takes
/// the answers. Returns when every request was written (or the connection broke). `start` is
/// the schedule's origin, as an instant and in Unix nanos.
async fn connection(
    c: usize,
    (start, start_ns): (Instant, u64),
    spec: Rc<ApiSpec>,
    state: Rc<RefCell<DriverState>>,
    shared: Arc<ApiShared>,
    queue: Rc<RefCell<VecDeque<InFlight>>>,
) {
    let conns = spec.conns.max(1) as u64;
    let mut mine = (c as u64..spec.requests()).step_by(conns as usize).peekable();
    let addr = match c % (1 + spec.more_addrs.len()) {
        0 => spec.addr,
        n => spec.more_addrs[n - 1],
    };
    let stream = match glommio::net::TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => {
            // Everything this connection was to send fails (one request's worth when the
            // count is open-ended).
            let n: u64 = if spec.rate > 0.0 {
                mine.map(|r| msgs_in(&spec, r)).sum()
            } else {
                mine.next().map(|r| msgs_in(&spec, r)).unwrap_or(0)
            };
            state.borrow_mut().fail(&shared, &format!("api connect: {e}"), n);
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    let (rd, mut wr) = futures_lite::io::split(stream);
    let window = Rc::new(glommio::sync::Semaphore::new(spec.pipeline.max(1) as u64));
    let broken = Rc::new(std::cell::Cell::new(false));
    glommio::spawn_local(reader(
        rd,
        spec.clone(),
        state.clone(),
        shared.clone(),
        queue.clone(),
        window.clone(),
        broken.clone(),
    ))
    .detach();
    let due = |r: u64| -> Instant {
        if spec.rate > 0.0 {
            start + Duration::from_secs_f64((r * spec.per_request()) as f64 / spec.rate)
        } else {
            start
        }
    };
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut body: Vec<u8> = Vec::with_capacity(4 * 1024);
    while let Some(&r) = mine.peek() {
        if shared.stop.load(Ordering::Relaxed) || broken.get() {
            break;
        }
        if start.elapsed() >= spec.duration {
            // Out of time: the rest was never due.
            break;
        }
        let d = due(r);
        let now = Instant::now();
        if d > now + Duration::from_millis(1) {
            glommio::timer::sleep(d - now).await;
        }
        if let Some(g) = &spec.gate {
            while !g.open(shared.sent.load(Ordering::SeqCst)) && start.elapsed() < spec.duration {
                glommio::timer::sleep(Duration::from_micros(200)).await;
            }
            if start.elapsed() >= spec.duration {
                break;
            }
        }
        if window.acquire(1).await.is_err() {
            break;
        }
        // This request and every other one already due, in one write.
        buf.clear();
        let mut first = true;
        while let Some(&r) = mine.peek() {
            let now = Instant::now();
            let gated = spec.gate.as_ref().is_some_and(|g| !g.open(shared.sent.load(Ordering::SeqCst)));
            if !first && (due(r) > now || buf.len() > 60 * 1024 || gated || !window_take(&window)) {
                break;
            }
            first = false;
            mine.next();
            let n = msgs_in(&spec, r);
            let first_k = r * spec.per_request();
            let stamp = stamp_ns(&spec, start_ns, due(r).saturating_duration_since(start), crate::unix_nanos());
            build_request(&spec, first_k, n, stamp, &mut body, &mut buf);
            let lag = now.saturating_duration_since(due(r));
            let mut st = state.borrow_mut();
            if spec.rate > 0.0 {
                st.lag_hist.record_us(lag.as_micros() as u64);
            }
            st.report.requests += 1;
            st.report.messages_sent += n;
            let ns = crate::unix_nanos();
            if st.report.first_send_ns == 0 {
                st.report.first_send_ns = ns;
            }
            st.report.last_send_ns = ns;
            queue.borrow_mut().push_back(InFlight { first_k, n, sent_at: now });
            shared.sent.fetch_add(n, Ordering::SeqCst);
        }
        if let Err(e) = wr.write_all(&buf).await {
            broken.set(true);
            let _ = e;
            break;
        }
    }
    if broken.get() || shared.stop.load(Ordering::Relaxed) {
        // Paced: what fell due within the duration. Unpaced, the count is open-ended (2^40:
        // counting it would take hours and report nonsense): one request's worth, as when the
        // connection could not be made.
        let n: u64 = if spec.rate > 0.0 {
            mine.take_while(|&r| due(r) <= start + spec.duration).map(|r| msgs_in(&spec, r)).sum()
        } else {
            mine.next().map(|r| msgs_in(&spec, r)).unwrap_or(0)
        };
        if n > 0 {
            let why = if broken.get() { "not sent: api connection lost" } else { "not sent: stopped" };
            state.borrow_mut().fail(&shared, why, n);
        }
    }
    // Keep the write half alive until the answers are in (dropping it would not close the
    // socket, the reader holds the other half; this just keeps ownership obvious).
    let _keep = wr;
}

fn window_take(w: &glommio::sync::Semaphore) -> bool {
    w.try_acquire(1).unwrap_or(false)
}

/// The send time written into a request's messages: now, or in a paced run the time the
/// request was due (`start_ns + due`) when that is earlier (it left late).
fn stamp_ns(spec: &ApiSpec, start_ns: u64, due: Duration, now_ns: u64) -> u64 {
    if spec.rate > 0.0 {
        now_ns.min(start_ns.saturating_add(due.as_nanos() as u64))
    } else {
        now_ns
    }
}

fn msgs_in(spec: &ApiSpec, r: u64) -> u64 {
    let b = spec.per_request();
    (spec.messages - r * b).min(b)
}

/// Appends the HTTP request for messages `first_k..first_k + n`, stamped `t_ns`.
fn build_request(spec: &ApiSpec, first_k: u64, n: u64, t_ns: u64, body: &mut Vec<u8>, out: &mut Vec<u8>) {
    body.clear();
    let batch = spec.batch_size > 0;
    if batch {
        body.extend_from_slice(b"{\"messages\":[");
    }
    for k in first_k..first_k + n {
        if k > first_k {
            body.push(b',');
        }
        message_json(spec, k, t_ns, body);
    }
    if batch {
        body.extend_from_slice(b"]}");
    }
    let path: std::borrow::Cow<str> = match (&spec.group, batch) {
        (Some(g), _) => format!("/v1/groups/{}{}/messages", g.prefix, first_k % spec.users.max(1)).into(),
        (None, true) => "/v1/messages/batch".into(),
        (None, false) => "/v1/messages".into(),
    };
    let _ = write!(
        out,
        "POST {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        spec.addr,
        spec.api_key,
        body.len()
    );
    out.extend_from_slice(body);
}

/// `{"from","to","kind":"text","body":{"text":"t=..;k=..;r=.."}}` for message `k` (no `to`
/// for a group: the path names it; `from` is the group's first member), stamped `t_ns`.
fn message_json(spec: &ApiSpec, k: u64, t_ns: u64, out: &mut Vec<u8>) {
    let to = if spec.users > 0 { k % spec.users } else { 0 };
    match &spec.group {
        Some(g) => {
            let _ = write!(
                out,
                "{{\"from\":\"{}{}\",\"kind\":\"text\",\"body\":{{\"text\":\"",
                spec.user_prefix,
                to * g.members
            );
        }
        None => {
            let _ = write!(
                out,
                "{{\"from\":\"{}\",\"to\":\"{}{}\",\"kind\":\"text\",\"body\":{{\"text\":\"",
                spec.from, spec.user_prefix, to
            );
        }
    }
    Stamp { t_ns, k, run: &spec.run_id }.write(out);
    out.extend_from_slice(b"\"}}");
}

#[derive(Deserialize)]
struct Sent {
    id: serde_json::Value,
}

/// A message id as the API gives it (a decimal string).
fn id_of(v: &serde_json::Value) -> Option<u64> {
    match v {
        serde_json::Value::String(s) => s.parse().ok(),
        serde_json::Value::Number(n) => n.as_u64(),
        _ => None,
    }
}

#[derive(Deserialize)]
struct BatchAnswer {
    results: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct ErrorAnswer {
    error: ErrorInner,
}

#[derive(Deserialize)]
struct ErrorInner {
    code: String,
}

async fn reader<R: futures_lite::AsyncRead + Unpin>(
    mut rd: R,
    spec: Rc<ApiSpec>,
    state: Rc<RefCell<DriverState>>,
    shared: Arc<ApiShared>,
    queue: Rc<RefCell<VecDeque<InFlight>>>,
    window: Rc<glommio::sync::Semaphore>,
    broken: Rc<std::cell::Cell<bool>>,
) {
    let mut rx: Vec<u8> = Vec::new();
    loop {
        let mut off = 0;
        loop {
            match parse_response(&rx[off..]) {
                Ok(None) => break,
                Ok(Some((status, body_range, len))) => {
                    let body = &rx[off + body_range.start..off + body_range.end];
                    off += len;
                    let Some(f) = queue.borrow_mut().pop_front() else {
                        state.borrow_mut().fail(&shared, "answer without request", 0);
                        continue;
                    };
                    let mut st = state.borrow_mut();
                    st.api_hist.record_us(f.sent_at.elapsed().as_micros() as u64);
                    st.report.last_answer_ns = crate::unix_nanos();
                    account(&mut st, &spec, &shared, &f, status, body);
                    window.signal(1);
                }
                Err(e) => {
                    broken.set(true);
                    fail_all(&state, &shared, &queue, &format!("bad http answer: {e}"));
                    return;
                }
            }
        }
        rx.drain(..off);
        match read_some(&mut rd, &mut rx).await {
            Ok(n) if n > 0 => {}
            _ => {
                broken.set(true);
                window.close();
                fail_all(&state, &shared, &queue, "api connection closed");
                return;
            }
        }
    }
}

fn fail_all(state: &Rc<RefCell<DriverState>>, shared: &ApiShared, queue: &Rc<RefCell<VecDeque<InFlight>>>, why: &str) {
    let mut st = state.borrow_mut();
    for f in queue.borrow_mut().drain(..) {
        st.fail(shared, why, f.n);
    }
}

fn account(st: &mut DriverState, spec: &ApiSpec, shared: &ApiShared, f: &InFlight, status: u16, body: &[u8]) {
    if !(200..300).contains(&status) {
        let code = serde_json::from_slice::<ErrorAnswer>(body).map(|e| e.error.code).unwrap_or_default();
        st.fail(shared, format!("http {status} {code}").trim_end(), f.n);
        return;
    }
    if spec.batch_size == 0 {
        match serde_json::from_slice::<Sent>(body) {
            Ok(a) => st.ack(shared, spec, f.first_k, id_of(&a.id)),
            Err(_) => st.fail(shared, "answer without id", f.n),
        }
        return;
    }
    let Ok(b) = serde_json::from_slice::<BatchAnswer>(body) else {
        st.fail(shared, "batch answer without results", f.n);
        return;
    };
    for i in 0..f.n {
        match b.results.get(i as usize) {
            Some(v) if v.get("id").is_some() => st.ack(shared, spec, f.first_k + i, v.get("id").and_then(id_of)),
            Some(v) => {
                let code = v.pointer("/error/code").and_then(|c| c.as_str()).unwrap_or("?");
                st.fail(shared, &format!("batch item {code}"), 1);
            }
            None => st.fail(shared, "batch item missing", 1),
        }
    }
}

/// One blocking request with a JSON body (set-up calls); returns the status and the body.
pub fn call(addr: SocketAddr, api_key: &str, method: &str, path: &str, body: &str) -> Result<(u16, String), String> {
    use std::io::Read;
    let fail = |e: std::io::Error| format!("{method} {path}: {e}");
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(fail)?;
    s.set_read_timeout(Some(Duration::from_secs(120))).map_err(fail)?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {api_key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).and_then(|()| s.write_all(body.as_bytes())).map_err(fail)?;
    let mut rx = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        if let Some((status, range, _)) = parse_response(&rx).map_err(|e| format!("{method} {path}: {e}"))? {
            return Ok((status, String::from_utf8_lossy(&rx[range]).into_owned()));
        }
        let n = s.read(&mut buf).map_err(fail)?;
        if n == 0 {
            return Err(format!("{method} {path}: connection closed before the answer"));
        }
        rx.extend_from_slice(&buf[..n]);
    }
}

/// Parses one response at the start of `buf`: (status, body range, total length).
fn parse_response(buf: &[u8]) -> Result<Option<(u16, std::ops::Range<usize>, usize)>, String> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head = match resp.parse(buf) {
        Ok(httparse::Status::Partial) => return Ok(None),
        Ok(httparse::Status::Complete(n)) => n,
        Err(e) => return Err(e.to_string()),
    };
    let mut len = 0usize;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            len = std::str::from_utf8(h.value).ok().and_then(|v| v.trim().parse().ok()).ok_or("bad content-length")?;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("chunked answers are not supported".into());
        }
    }
    if buf.len() < head + len {
        return Ok(None);
    }
    Ok(Some((resp.code.unwrap_or(0), head..head + len, head + len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(batch: usize) -> ApiSpec {
        ApiSpec {
            addr: "127.0.0.1:1".parse().unwrap(),
            more_addrs: Vec::new(),
            api_key: "key".into(),
            conns: 1,
            pipeline: 1,
            rate: 0.0,
            messages: 5,
            duration: Duration::from_secs(1),
            batch_size: batch,
            users: 3,
            user_prefix: "u".into(),
            from: "src".into(),
            run_id: "r1".into(),
            drain_timeout: Duration::from_secs(1),
            pin: None,
            group: None,
            record_ids: false,
            gate: None,
        }
    }

    /// An unpaced run (`--rate 0`: the count is open-ended) whose API connection is closed by
    /// the node: the driver ends, and says what failed, in a sane number.
    #[test]
    fn an_unpaced_run_survives_a_lost_api_connection() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut s = spec(0);
        s.addr = l.local_addr().unwrap();
        s.messages = 1 << 40;
        s.duration = Duration::from_secs(2);
        s.pipeline = 4;
        // The node: reads the first request, answers nothing and closes.
        let node = std::thread::spawn(move || {
            use std::io::Read;
            let (mut c, _) = l.accept().unwrap();
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf);
        });
        let run = ApiRun::start(s).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(run.join());
        });
        let r = rx.recv_timeout(Duration::from_secs(20)).expect("the driver never ended");
        node.join().unwrap();
        assert_eq!(r.messages_acked, 0);
        assert!(r.messages_failed >= 1, "{r:?}");
        assert!(r.messages_failed <= r.messages_sent + 1, "failures beyond what was ever due: {r:?}");
    }

    /// A paced run (100 msgs/s: one due every 10 ms) against a node that answers each request
    /// 60 ms late, one request in flight: requests leave 60 ms apart, behind schedule. The
    /// stamps are the schedule's (10 ms apart), so the wait behind the slow answers counts in
    /// the latency the terminals measure instead of being omitted; `send_lag` shows it too.
    #[test]
    fn a_paced_run_stamps_the_schedule_when_requests_leave_late() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut s = spec(0);
        s.addr = l.local_addr().unwrap();
        s.rate = 100.0;
        s.messages = 4;
        s.duration = Duration::from_secs(10);
        s.pipeline = 1;
        let node = std::thread::spawn(move || {
            use std::io::Read;
            let (mut c, _) = l.accept().unwrap();
            let (mut rx, mut buf, mut stamps) = (Vec::new(), [0u8; 4096], Vec::new());
            while stamps.len() < 4 {
                let n = c.read(&mut buf).unwrap();
                assert!(n > 0, "the driver closed early");
                rx.extend_from_slice(&buf[..n]);
                while let Some((head, len)) = request_at(&rx) {
                    let body = String::from_utf8(rx[head..head + len].to_vec()).unwrap();
                    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                    let text = v["body"]["text"].as_str().unwrap().to_owned();
                    stamps.push(Stamp::parse(&text).unwrap().t_ns);
                    rx.drain(..head + len);
                    std::thread::sleep(Duration::from_millis(60));
                    c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{\"id\":\"1\"}").unwrap();
                }
            }
            stamps
        });
        let r = ApiRun::start(s).unwrap().join();
        let stamps = node.join().unwrap();
        assert_eq!(r.messages_acked, 4, "{r:?}");
        for w in stamps.windows(2) {
            let gap = w[1] as i64 - w[0] as i64;
            assert!((gap - 10_000_000).abs() < 100_000, "stamps {gap} ns apart, not the schedule's 10 ms: {stamps:?}");
        }
        assert!(r.send_lag.to_hist().q_ms(1.0) >= 100.0, "the lag is still reported: {r:?}");
    }

    /// (head length, body length) of a complete request at the start of `rx`.
    fn request_at(rx: &[u8]) -> Option<(usize, usize)> {
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut req = httparse::Request::new(&mut headers);
        let httparse::Status::Complete(head) = req.parse(rx).ok()? else { return None };
        let len: usize = req
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())?;
        (rx.len() >= head + len).then_some((head, len))
    }

    #[test]
    fn stamps_roundtrip() {
        let mut v = Vec::new();
        Stamp { t_ns: 12, k: 7, run: "ab" }.write(&mut v);
        let s = String::from_utf8(v).unwrap();
        assert_eq!(Stamp::parse(&s), Some(Stamp { t_ns: 12, k: 7, run: "ab" }));
        assert_eq!(Stamp::parse("hello"), None);
    }

    #[test]
    fn requests_are_valid_api_calls() {
        let s = spec(0);
        let (mut body, mut out) = (Vec::new(), Vec::new());
        build_request(&s, 4, 1, 9, &mut body, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("POST /v1/messages HTTP/1.1\r\n"));
        let json = text.split("\r\n\r\n").nth(1).unwrap();
        let m: ether_proto::api::SendMessage = ether_proto::api::parse_request(json.as_bytes()).unwrap();
        m.validate("").unwrap();
        assert_eq!(m.to, "u1");
        let s = spec(2);
        assert_eq!(s.requests(), 3);
        assert_eq!(msgs_in(&s, 2), 1);
        let (mut body, mut out) = (Vec::new(), Vec::new());
        build_request(&s, 2, 2, 9, &mut body, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("POST /v1/messages/batch HTTP/1.1\r\n"));
        let json = text.split("\r\n\r\n").nth(1).unwrap();
        let b: ether_proto::api::SendBatch = ether_proto::api::parse_request(json.as_bytes()).unwrap();
        assert_eq!(b.messages.len(), 2);
        assert_eq!(b.messages[1]["to"], "u0");
        // Group messages: the path names the group, the first member sends.
        let mut s = spec(0);
        s.group = Some(GroupTarget { prefix: "g".into(), members: 10 });
        s.users = 2;
        let (mut body, mut out) = (Vec::new(), Vec::new());
        build_request(&s, 3, 1, 9, &mut body, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("POST /v1/groups/g1/messages HTTP/1.1\r\n"), "{text}");
        let json: serde_json::Value = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(json["from"], "u10");
        assert!(json.get("to").is_none());
    }

    #[test]
    fn gate_opens_as_deliveries_come_in() {
        let c = Arc::new(AtomicU64::new(0));
        let g = Gate { delivered: vec![c.clone()], per_msg: 10, window: 2 };
        assert!(g.open(2));
        assert!(!g.open(3));
        c.store(10, Ordering::Relaxed);
        assert!(g.open(3));
        assert_eq!(id_of(&serde_json::json!("42")), Some(42));
    }

    #[test]
    fn responses_parse_pipelined() {
        let two = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}HTTP/1.1 503 X\r\ncontent-length: 0\r\n\r\n";
        let (st, body, len) = parse_response(two).unwrap().unwrap();
        assert_eq!((st, &two[body]), (200, &b"{}"[..]));
        let (st, _, len2) = parse_response(&two[len..]).unwrap().unwrap();
        assert_eq!(st, 503);
        assert_eq!(len + len2, two.len());
        assert_eq!(parse_response(&two[..20]).unwrap(), None);
    }
}
