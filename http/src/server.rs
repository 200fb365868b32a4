//! Connection side on glommio: the per-connection keep-alive loop ([`serve_connection`]),
//! the accept loop with its connection cap and accept back-off ([`accept_loop`]), the
//! [`Stop`] signal, and [`read_request`] for callers (the WebSocket port) that read one
//! request and then keep the socket. Parsing and encoding stay in `request` / `response`.
//!
//! Per connection the server holds one read buffer (starts at [`READ_BUFFER_BYTES_MIN`],
//! grows by doubling only as bytes arrive, never past `Limits::request_bytes_max()`, shrinks
//! back once drained) and one output buffer (all responses of one batch, one `write_all`).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::Shutdown;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use futures_lite::future;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};

use crate::request::{check, parse, parse_head, HttpError, Limits, Method, Progress, Request};
use crate::response::{error_response, Framing, Response};

/// First size of a connection's read buffer, and the size it shrinks back to.
pub const READ_BUFFER_BYTES_MIN: usize = 4 * 1024;
/// An output buffer that grew past this is freed after its batch is written.
const WRITE_BUFFER_BYTES_KEEP: usize = 64 * 1024;
/// After refusing a request: read and drop at most this much of what the peer still sends,
/// so closing does not reset the connection before the peer reads our error response.
const LINGER_BYTES_MAX: usize = 256 * 1024;
/// ...and for at most this long.
const LINGER_TIME_MAX: Duration = Duration::from_secs(2);
/// Accept back-off after an accept error: starts here, doubles per consecutive error…
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
/// …up to here, and resets on the next successful accept.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

const CONTINUE_100: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// Why a connection ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer closed between requests.
    PeerClosed,
    /// The last request asked for it (`Connection: close`, or HTTP/1.0 without keep-alive).
    RequestedClose,
    /// No new request within the idle timeout.
    IdleTimeout,
    /// The [`Stop`] signal fired.
    Stopped,
    /// The [`HeadGate`] refused a request before its body; its response was written.
    RefusedBeforeBody,
}

/// Looks at a request's head before its body is read, when the body did not arrive with the
/// head: `Some(response)` refuses the request then (the response goes out with `Connection:
/// close` and the body is never buffered), so a request without credentials cannot make the
/// server hold a large body. Requests that arrive whole go to the handler, which must check
/// the same itself.
pub type HeadGate = Rc<dyn Fn(&Request) -> Option<Response>>;

/// Why a connection ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The request was refused; the error response (with `Connection: close`) was written
    /// before closing.
    #[error("request refused: {0}")]
    Http(#[from] HttpError),
    /// Socket error, a peer that closed mid-request, or a write that timed out.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
}

impl From<glommio::GlommioError<()>> for ServeError {
    fn from(err: glommio::GlommioError<()>) -> ServeError {
        ServeError::Io(err.into())
    }
}

/// A one-way stop signal for one executor (not `Send`): [`Stop::stop`] wakes every task
/// waiting in [`Stop::stopped`]. Clones share the signal.
///
/// [`accept_loop`] stops accepting when it fires, closes idle keep-alive connections at once,
/// lets busy ones finish their current batch (answered with `Connection: close`), and
/// returns when its last connection is gone.
#[derive(Debug, Clone, Default)]
pub struct Stop {
    inner: Rc<StopInner>,
}

#[derive(Debug, Default)]
struct StopInner {
    stopped: Cell<bool>,
    waiters: RefCell<HashMap<u64, Waker>>,
    next_waiter: Cell<u64>,
}

impl Stop {
    pub fn new() -> Stop {
        Stop::default()
    }

    /// Fires the signal (idempotent).
    pub fn stop(&self) {
        if self.inner.stopped.replace(true) {
            return;
        }
        let waiters = std::mem::take(&mut *self.inner.waiters.borrow_mut());
        for (_, waker) in waiters {
            waker.wake();
        }
    }

    pub fn is_stopped(&self) -> bool {
        self.inner.stopped.get()
    }

    /// Resolves once [`Stop::stop`] has been called.
    pub fn stopped(&self) -> Stopped {
        Stopped { stop: self.clone(), key: None }
    }
}

/// Future of [`Stop::stopped`].
#[derive(Debug)]
pub struct Stopped {
    stop: Stop,
    key: Option<u64>,
}

impl Future for Stopped {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let inner = &this.stop.inner;
        if inner.stopped.get() {
            return Poll::Ready(());
        }
        let key = *this.key.get_or_insert_with(|| {
            let key = inner.next_waiter.get();
            inner.next_waiter.set(key.wrapping_add(1));
            key
        });
        let mut waiters = inner.waiters.borrow_mut();
        match waiters.get_mut(&key) {
            Some(w) if w.will_wake(cx.waker()) => {}
            Some(w) => w.clone_from(cx.waker()),
            None => {
                waiters.insert(key, cx.waker().clone());
            }
        }
        Poll::Pending
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            self.stop.inner.waiters.borrow_mut().remove(&key);
        }
    }
}

/// Serves one connection until it closes: reads, answers every complete (pipelined) request
/// in order with `handler`, writes each batch of responses with one `write_all`, and loops
/// while the requests allow keep-alive.
///
/// `idle_timeout` bounds the wait for a new request, the time to receive a started request
/// (408 past it), and each write; `Duration::ZERO` disables all three. A refused request
/// gets its error response with `Connection: close`, then the connection closes
/// (`Err(ServeError::Http)`). A connection closed after a request that asked for it (or
/// after the last batch of a stop) is half-closed and drained the same way as a refused one
/// (bounded in bytes and time), so unread input cannot turn the close into a reset that
/// destroys the response. `HEAD` requests get the handler's head without the body.
/// `Expect: 100-continue` is answered with `100 Continue` before the body is read.
pub async fn serve_connection<H, F>(
    stream: TcpStream,
    limits: Limits,
    idle_timeout: Duration,
    handler: H,
) -> Result<CloseReason, ServeError>
where
    H: Fn(Request) -> F,
    F: Future<Output = Response>,
{
    serve(stream, limits, idle_timeout, &handler, None, None).await
}

/// [`serve_connection`] that also ends when `stop` fires, as [`accept_loop`]'s connections do:
/// idle, it closes at once; busy, after its current batch (answered `Connection: close`).
/// With a `gate`, requests whose body is still to come pass it first (see [`HeadGate`]).
pub async fn serve_connection_until<H, F>(
    stream: TcpStream,
    limits: Limits,
    idle_timeout: Duration,
    handler: H,
    gate: Option<&HeadGate>,
    stop: &Stop,
) -> Result<CloseReason, ServeError>
where
    H: Fn(Request) -> F,
    F: Future<Output = Response>,
{
    serve(stream, limits, idle_timeout, &handler, gate, Some(stop)).await
}

/// Most pipelined requests handled concurrently in one round.
const PIPELINE_BATCH_MAX: usize = 256;

/// Polls every handler of a round until all are done (each first polled in request order),
/// then encodes their answers in request order.
async fn answer_all<F: Future<Output = Response>>(batch: &mut Vec<(Framing, bool, Pin<Box<F>>)>, out: &mut Vec<u8>) {
    if batch.is_empty() {
        return;
    }
    let mut done: Vec<Option<Response>> = batch.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, (_, _, fut)) in batch.iter_mut().enumerate() {
            if done[i].is_none() {
                match fut.as_mut().poll(cx) {
                    std::task::Poll::Ready(r) => done[i] = Some(r),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    for ((framing, head_only, _), response) in batch.drain(..).zip(done) {
        if let Some(response) = response {
            response.encode(framing, head_only, out);
        }
    }
}

async fn serve<H, F>(
    mut stream: TcpStream,
    limits: Limits,
    idle_timeout: Duration,
    handler: &H,
    gate: Option<&HeadGate>,
    stop: Option<&Stop>,
) -> Result<CloseReason, ServeError>
where
    H: Fn(Request) -> F,
    F: Future<Output = Response>,
{
    let timeout = (!idle_timeout.is_zero()).then_some(idle_timeout);
    stream.set_write_timeout(timeout)?;
    // Responses are written once per batch; Nagle would only delay a batch's last segment.
    // A local stream socket (the TLS relay's plaintext end) has no Nagle: nothing to set.
    if let Err(e) = stream.set_nodelay(true) {
        tracing::trace!(error = %e, "TCP_NODELAY not set");
    }
    let mut rx = ReadBuf::new(limits);
    let mut out: Vec<u8> = Vec::new();
    // When the request at the front of `rx` started to arrive (None: `rx` is empty).
    let mut request_started: Option<Instant> = None;
    let mut continue_sent = false;
    // Whether the request at the front of `rx` passed the gate already.
    let mut gated = false;
    loop {
        // 1. Answer every whole request at the front of the buffer (at most
        //    `PIPELINE_BATCH_MAX` per round). Their handlers run concurrently, each started in
        //    request order (so whatever a handler does before its first await happens in
        //    request order), and the answers are written in request order.
        let mut close = None;
        let mut batch: Vec<(Framing, bool, Pin<Box<F>>)> = Vec::new();
        while rx.worth_parsing() && batch.len() < PIPELINE_BATCH_MAX {
            match parse(rx.data(), &limits) {
                Ok(Some((request, used))) => {
                    rx.consume(used);
                    request_started = None;
                    continue_sent = false;
                    gated = false;
                    let stopping = stop.is_some_and(Stop::is_stopped);
                    let framing = if !request.keep_alive || stopping {
                        Framing::Close
                    } else if request.version_minor() == 0 {
                        Framing::KeepAliveAnnounced
                    } else {
                        Framing::KeepAlive
                    };
                    let head_only = request.method == Method::Head;
                    batch.push((framing, head_only, Box::pin(handler(request))));
                    if framing == Framing::Close {
                        close = Some(if stopping { CloseReason::Stopped } else { CloseReason::RequestedClose });
                        break;
                    }
                }
                Ok(None) => {
                    // Incomplete: note how much is needed before parsing again.
                    match check(rx.data(), &limits) {
                        Ok(Progress::NeedBody { total, expect_continue }) => {
                            if let (Some(gate), false) = (gate, gated) {
                                gated = true;
                                let refusal = match parse_head(rx.data(), &limits) {
                                    Ok(Some(head)) => gate(&head),
                                    Ok(None) | Err(_) => None, // the full parse will answer
                                };
                                if let Some(response) = refusal {
                                    answer_all(&mut batch, &mut out).await;
                                    response.encode(Framing::Close, false, &mut out);
                                    stream.write_all(&out).await?;
                                    linger(&mut stream, &mut rx).await;
                                    return Ok(CloseReason::RefusedBeforeBody);
                                }
                            }
                            rx.need_total(total);
                            if expect_continue && !continue_sent {
                                // Earlier answers first: the 100 must follow them on the wire.
                                answer_all(&mut batch, &mut out).await;
                                out.extend_from_slice(CONTINUE_100);
                                continue_sent = true;
                            }
                        }
                        Ok(Progress::NeedHead | Progress::Complete { .. }) => rx.need_more(),
                        Err(err) => {
                            answer_all(&mut batch, &mut out).await;
                            return refuse(&mut stream, &mut rx, &mut out, err).await;
                        }
                    }
                    break;
                }
                Err(err) => {
                    answer_all(&mut batch, &mut out).await;
                    return refuse(&mut stream, &mut rx, &mut out, err).await;
                }
            }
        }
        answer_all(&mut batch, &mut out).await;
        if close.is_none() && rx.worth_parsing() {
            // More complete requests wait behind a full round: write this round, then loop.
            if !out.is_empty() {
                stream.write_all(&out).await?;
                out.clear();
            }
            continue;
        }

        // 2. One write for the whole batch.
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
            if out.capacity() > WRITE_BUFFER_BYTES_KEEP {
                out = Vec::new();
            }
        }
        if let Some(reason) = close {
            // The peer may have sent more (pipelined requests, a stray CRLF) that is unread:
            // closing now would reset the connection and could destroy the response in flight.
            linger(&mut stream, &mut rx).await;
            return Ok(reason);
        }
        if rx.is_empty() && stop.is_some_and(Stop::is_stopped) {
            return Ok(CloseReason::Stopped);
        }

        // 3. Read more, within the deadline.
        rx.compact();
        let now = Instant::now();
        // Idle wait: a fresh timeout. A started request: its whole arrival is bounded.
        let deadline = timeout.map(|t| match request_started {
            _ if rx.is_empty() => now + t,
            Some(started) => started + t,
            None => *request_started.insert(now) + t,
        });
        let remaining = deadline.map(|d| d.saturating_duration_since(now));
        let read = match remaining {
            Some(r) if r.is_zero() => Err(io::ErrorKind::TimedOut.into()),
            _ => {
                stream.set_read_timeout(remaining)?;
                match (rx.is_empty(), stop) {
                    // Between requests a stop closes the connection at once.
                    (true, Some(stop)) => {
                        let read = async { Some(stream.read(rx.spare()).await) };
                        let stopped = async {
                            stop.stopped().await;
                            None
                        };
                        match future::or(read, stopped).await {
                            Some(read) => read,
                            None => return Ok(CloseReason::Stopped),
                        }
                    }
                    _ => stream.read(rx.spare()).await,
                }
            }
        };
        match read {
            Ok(0) if rx.is_empty() => return Ok(CloseReason::PeerClosed),
            Ok(0) => {
                return Err(ServeError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed in the middle of a request",
                )))
            }
            Ok(n) => {
                rx.filled(n);
                if request_started.is_none() {
                    request_started = Some(Instant::now());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::TimedOut && rx.is_empty() => return Ok(CloseReason::IdleTimeout),
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                return refuse(&mut stream, &mut rx, &mut out, HttpError::RequestTimeout).await
            }
            Err(e) => return Err(ServeError::Io(e)),
        }
    }
}

/// Writes `err`'s response after whatever is already in `out`, then closes gracefully.
async fn refuse(
    stream: &mut TcpStream,
    rx: &mut ReadBuf,
    out: &mut Vec<u8>,
    err: HttpError,
) -> Result<CloseReason, ServeError> {
    tracing::debug!(error = %err, "refusing request");
    error_response(&err).encode_into(false, out);
    stream.write_all(out).await?;
    linger(stream, rx).await;
    Err(ServeError::Http(err))
}

/// Half-closes, then drains (bounded in bytes and time) what the peer still sends: closing a
/// socket with unread input resets it, and the reset can destroy the response in flight.
async fn linger(stream: &mut TcpStream, rx: &mut ReadBuf) {
    if stream.shutdown(Shutdown::Write).await.is_err() {
        return;
    }
    let deadline = Instant::now() + LINGER_TIME_MAX;
    let mut drained = 0;
    rx.clear();
    while drained < LINGER_BYTES_MAX {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() || stream.set_read_timeout(Some(remaining)).is_err() {
            return;
        }
        match stream.read(rx.scratch()).await {
            Ok(0) | Err(_) => return,
            Ok(n) => drained += n,
        }
    }
}

/// A connection's read buffer: `buf[start..end]` holds received, unconsumed bytes.
struct ReadBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Parse again only once `end - start >= need` (avoids re-scanning the head for every
    /// chunk of a large body).
    need: usize,
    /// Total size of the request being received, once its head is in.
    need_body: Option<usize>,
    bytes_max: usize,
}

impl ReadBuf {
    fn new(limits: Limits) -> ReadBuf {
        let bytes_max = limits.request_bytes_max().max(1);
        ReadBuf {
            buf: vec![0; READ_BUFFER_BYTES_MIN.min(bytes_max)],
            start: 0,
            end: 0,
            need: 1,
            need_body: None,
            bytes_max,
        }
    }

    fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn len(&self) -> usize {
        self.end - self.start
    }

    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    fn worth_parsing(&self) -> bool {
        !self.is_empty() && self.len() >= self.need
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        self.need = 1;
        self.need_body = None;
        if self.is_empty() {
            self.start = 0;
            self.end = 0;
        }
    }

    fn need_total(&mut self, total: usize) {
        self.need = total;
        self.need_body = Some(total);
    }

    fn need_more(&mut self) {
        self.need = self.len() + 1;
    }

    fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// Moves unconsumed bytes to the front and shrinks a grown buffer that is mostly empty.
    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() > READ_BUFFER_BYTES_MIN
            && self.end <= READ_BUFFER_BYTES_MIN
            && self.need_body.is_none_or(|n| n <= READ_BUFFER_BYTES_MIN)
        {
            self.buf.truncate(READ_BUFFER_BYTES_MIN);
            self.buf.shrink_to_fit();
        }
    }

    /// Free space to read into, growing the buffer (doubling, capped by the pending
    /// request's size and the limits) when it is full. Call after `compact`.
    fn spare(&mut self) -> &mut [u8] {
        if self.end == self.buf.len() {
            let mut grown = (self.buf.len() * 2).min(self.bytes_max);
            if let Some(total) = self.need_body {
                grown = grown.min(total.max(self.end + 1));
            }
            // `check` refuses any request larger than bytes_max before the buffer fills, so
            // a full buffer always has room to grow.
            debug_assert!(grown > self.end, "read buffer full at its limit");
            let grown = grown.max(self.end + 1);
            self.buf.resize(grown, 0);
        }
        &mut self.buf[self.end..]
    }

    /// Scratch space for discarding input.
    fn scratch(&mut self) -> &mut [u8] {
        &mut self.buf[..]
    }

    fn filled(&mut self, n: usize) {
        self.end += n;
    }
}

/// Reads one request from `stream` into `buf` (which may already hold bytes), for callers
/// that keep the socket afterwards, like the WebSocket upgrade on the client port.
///
/// `Ok(Some(request))`: the request's bytes were removed from `buf`; anything after them
/// (for instance WebSocket frames sent right behind the handshake) stays in `buf`.
/// `Ok(None)`: the peer closed before sending a byte. `Err(ServeError::Http)`: refused; the
/// caller should write [`error_response`] and close. `timeout` bounds the whole request
/// (`Duration::ZERO`: none); past it the error is `HttpError::RequestTimeout`.
pub async fn read_request(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    limits: &Limits,
    timeout: Duration,
) -> Result<Option<Request>, ServeError> {
    let deadline = (!timeout.is_zero()).then(|| Instant::now() + timeout);
    let bytes_max = limits.request_bytes_max().max(1);
    loop {
        if let Some((request, used)) = parse(buf, limits)? {
            buf.drain(..used);
            return Ok(Some(request));
        }
        let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if remaining.is_some_and(|r| r.is_zero()) {
            return Err(HttpError::RequestTimeout.into());
        }
        stream.set_read_timeout(remaining)?;
        let filled = buf.len();
        let want = READ_BUFFER_BYTES_MIN.max(filled).min(bytes_max.saturating_sub(filled)).max(1);
        buf.resize(filled + want, 0);
        let read = stream.read(&mut buf[filled..]).await;
        buf.truncate(filled + *read.as_ref().unwrap_or(&0));
        match read {
            Ok(0) if filled == 0 => return Ok(None),
            Ok(0) => {
                return Err(ServeError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed in the middle of a request",
                )))
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::TimedOut => return Err(HttpError::RequestTimeout.into()),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Accepts connections on `listener` until `stop` fires, serving each with
/// [`serve_connection`] semantics in its own local task (`glommio::spawn_local(..).detach()`)
/// on the current executor.
///
/// At most `max_connections` are served at once; beyond that a connection is accepted and
/// closed at once (the peer sees EOF or a reset, not a hang in the backlog). An accept error
/// (EMFILE, ENFILE, ENOBUFS, ENOMEM, …) never makes the loop spin: it is logged and the loop
/// sleeps, 5 ms doubling to 1 s, reset by the next successful accept.
///
/// When `stop` fires the listener is dropped, idle connections close, busy ones close after
/// their current batch, and the function returns once no connection is left. With a `gate`,
/// requests whose body is still to come pass it first (see [`HeadGate`]).
pub async fn accept_loop<H, F>(
    listener: TcpListener,
    limits: Limits,
    idle_timeout: Duration,
    max_connections: usize,
    handler: Rc<H>,
    gate: Option<HeadGate>,
    stop: Stop,
) where
    H: Fn(Request) -> F + 'static,
    F: Future<Output = Response> + 'static,
{
    let live = Rc::new(Cell::new(0usize));
    let drained = Stop::new();
    let mut backoff: Option<Duration> = None;
    let mut refused_total: u64 = 0;
    while !stop.is_stopped() {
        let accepted = future::or(async { Some(listener.accept().await) }, async {
            stop.stopped().await;
            None
        })
        .await;
        let Some(accepted) = accepted else { break };
        let stream = match accepted {
            Ok(stream) => {
                backoff = None;
                stream
            }
            Err(err) => {
                let errno = os_error(&err);
                let delay = backoff.map_or(ACCEPT_BACKOFF_MIN, |d| (d * 2).min(ACCEPT_BACKOFF_MAX));
                backoff = Some(delay);
                if errno == Some(libc::ECONNABORTED) {
                    tracing::debug!(error = %err, "accept: peer aborted");
                } else {
                    tracing::warn!(
                        error = %err,
                        errno,
                        backoff_ms = delay.as_millis() as u64,
                        "accept failed; backing off"
                    );
                }
                future::or(glommio::timer::sleep(delay), stop.stopped()).await;
                continue;
            }
        };
        if live.get() >= max_connections {
            refused_total += 1;
            tracing::debug!(max_connections, refused_total, "connection cap reached; closing new connection");
            drop(stream);
            continue;
        }
        let guard = LiveGuard::new(live.clone(), stop.clone(), drained.clone());
        let handler = handler.clone();
        let gate = gate.clone();
        let stop = stop.clone();
        glommio::spawn_local(async move {
            let result = serve(stream, limits, idle_timeout, &*handler, gate.as_ref(), Some(&stop)).await;
            match result {
                Ok(reason) => tracing::trace!(?reason, "connection closed"),
                Err(err) => tracing::debug!(error = %err, "connection closed"),
            }
            drop(guard);
        })
        .detach();
    }
    drop(listener);
    if live.get() > 0 {
        drained.stopped().await;
    }
}

/// Counts a live connection; the last one to go after a stop signals `drained`.
struct LiveGuard {
    live: Rc<Cell<usize>>,
    stop: Stop,
    drained: Stop,
}

impl LiveGuard {
    fn new(live: Rc<Cell<usize>>, stop: Stop, drained: Stop) -> LiveGuard {
        live.set(live.get() + 1);
        LiveGuard { live, stop, drained }
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        let left = self.live.get() - 1;
        self.live.set(left);
        if left == 0 && self.stop.is_stopped() {
            self.drained.stop();
        }
    }
}

fn os_error<T>(err: &glommio::GlommioError<T>) -> Option<i32> {
    match err {
        glommio::GlommioError::IoError(e) => e.raw_os_error(),
        glommio::GlommioError::EnhancedIoError { source, .. } => source.raw_os_error(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_wakes_waiters_and_forgets_dropped_ones() {
        let stop = Stop::new();
        let mut cx = Context::from_waker(Waker::noop());
        let mut a = stop.stopped();
        let mut b = stop.stopped();
        assert!(Pin::new(&mut a).poll(&mut cx).is_pending());
        assert!(Pin::new(&mut a).poll(&mut cx).is_pending(), "re-poll does not add a waiter");
        assert!(Pin::new(&mut b).poll(&mut cx).is_pending());
        assert_eq!(stop.inner.waiters.borrow().len(), 2);
        drop(b);
        assert_eq!(stop.inner.waiters.borrow().len(), 1);
        stop.stop();
        stop.stop();
        assert!(stop.is_stopped());
        assert!(Pin::new(&mut a).poll(&mut cx).is_ready());
        assert!(stop.inner.waiters.borrow().is_empty());
        let mut late = stop.clone().stopped();
        assert!(Pin::new(&mut late).poll(&mut cx).is_ready());
    }

    #[test]
    fn read_buf_grows_by_doubling_within_limits() {
        let limits = Limits { header_bytes_max: 1024, headers_max: 8, body_bytes_max: 20_000 };
        let mut rx = ReadBuf::new(limits);
        assert_eq!(rx.spare().len(), READ_BUFFER_BYTES_MIN);
        rx.filled(READ_BUFFER_BYTES_MIN);
        rx.need_total(10_000);
        assert_eq!(rx.spare().len(), READ_BUFFER_BYTES_MIN, "doubled");
        rx.filled(READ_BUFFER_BYTES_MIN);
        let spare = rx.spare().len();
        assert_eq!(rx.end + spare, 10_000, "capped by the request size");
        rx.filled(10_000 - 2 * READ_BUFFER_BYTES_MIN);
        rx.consume(10_000);
        rx.compact();
        assert_eq!(rx.buf.len(), READ_BUFFER_BYTES_MIN, "shrunk once drained");
        assert!(rx.is_empty());
    }
}
