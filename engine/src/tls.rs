//! TLS for terminals (`wss://`): the optional `listen.client_tls` listener. Owns the rustls
//! server configuration and the certificate it presents ([`CertStore`]: read from
//! `tls.cert_path` / `tls.key_path` at start, and again by the `ether-tls-reload` thread
//! whenever the files change, so a renewed certificate is served without a restart), the TLS
//! handshakes, and the relay that gives every TLS terminal to the ordinary `ws://` path: after
//! the handshake (bounded by `limits.handshake_timeout_ms`) the connection's plaintext goes
//! through a local socket pair whose other end `conn` serves exactly like a plain TCP terminal
//! (upgrade, token checks, hand-over, session, parking, limits). Never touches sessions.
//!
//! What a TLS terminal costs beyond a plain one: three descriptors instead of one (the TCP
//! socket and both ends of the pair) and, for as long as it is connected, the relay task with
//! its TLS state; the relay reads through one buffer per shard thread and keeps only what a
//! full writer could not take yet. Once the engine has closed its end, the relay delivers
//! what it wrote and lingers for the terminal's end for at most `DRAIN_TIMEOUT`. The plain `client`
//! listener is unchanged by it.
use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};

use ether_http::server::Stop;
use futures_lite::{AsyncRead, AsyncWrite};
use futures_rustls::TlsAcceptor;
use glommio::net::{TcpListener, TcpStream, UnixStream};
use glommio::sync::{Semaphore, StaticPermit};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use std::future::Future;
use std::sync::{mpsc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};
use tracing::{debug, error, info, warn};

use crate::config::Tls;
use crate::shard::Shard;
use crate::stats::ShardCounters;

/// Bytes a relay reads at once (into a buffer per shard thread, not per connection).
pub const RELAY_BUFFER_BYTES: usize = 16 * 1024;

/// Why the TLS listener could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.cert_path {path}: {message}")]
    Certificate { path: PathBuf, message: String },
    #[error("tls.key_path {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("the certificate and key do not make a TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("cannot start the certificate reloader: {0}")]
    Reloader(#[from] io::Error),
}

/// The server configuration of the TLS listeners: the certificate of `store`, TLS 1.2 and
/// 1.3 with rustls's safe defaults (ring), ALPN `http/1.1`, and session tickets (keys made
/// per process, rotated every 6 h), so a terminal reconnecting to the same node resumes
/// its session without the key exchange and signature of a full handshake.
pub fn server_config(store: Arc<CertStore>) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(store.provider.clone())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(store);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.ticketer = rustls::crypto::ring::Ticketer::new()?;
    Ok(Arc::new(config))
}

/// The certificate chain and key the TLS listener presents, replaced when the files change.
#[derive(Debug)]
pub struct CertStore {
    files: Tls,
    provider: Arc<rustls::crypto::CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
    /// Modification times of the certificate and key files when they were last read.
    stamp: Mutex<(Option<SystemTime>, Option<SystemTime>)>,
}

impl CertStore {
    /// Reads the PEM chain (leaf first) and key of `files`; the key must match the leaf.
    pub fn load(files: &Tls) -> Result<Arc<CertStore>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let stamp = stamps(files);
        let key = certified_key(files, &provider)?;
        Ok(Arc::new(CertStore {
            files: files.clone(),
            provider,
            current: RwLock::new(Arc::new(key)),
            stamp: Mutex::new(stamp),
        }))
    }

    /// Reads the files again if either changed since they were last read. `Ok(true)`: the new
    /// pair is served from now on; an error leaves the previous pair in place (and the files
    /// are tried again when they change again).
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let now = stamps(&self.files);
        {
            let mut seen = self.stamp.lock().unwrap_or_else(PoisonError::into_inner);
            if *seen == now {
                return Ok(false);
            }
            *seen = now;
        }
        let key = certified_key(&self.files, &self.provider)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(key);
        Ok(true)
    }

    /// Checks the files every `every` on the `ether-tls-reload` thread until `stop` is dropped
    /// (or sent to).
    pub fn spawn_reloader(self: &Arc<Self>, every: Duration, stop: mpsc::Receiver<()>) -> Result<(), TlsError> {
        let store = Arc::downgrade(self);
        std::thread::Builder::new().name("ether-tls-reload".into()).spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(every) {
                let Some(store) = store.upgrade() else { return };
                let cert = store.files.cert_path.display().to_string();
                match store.reload_if_changed() {
                    Ok(true) => info!(cert = %cert, "TLS certificate reloaded"),
                    Ok(false) => {}
                    Err(e) => error!(error = %e, "TLS certificate not reloaded; still serving the previous one"),
                }
            }
        })?;
        Ok(())
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(PoisonError::into_inner).clone())
    }
}

fn stamps(files: &Tls) -> (Option<SystemTime>, Option<SystemTime>) {
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    (mtime(&files.cert_path), mtime(&files.key_path))
}

fn certified_key(files: &Tls, provider: &rustls::crypto::CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let chain = read_chain(&files.cert_path)?;
    let key = PrivateKeyDer::from_pem_file(&files.key_path).map_err(|e| TlsError::Key {
        path: files.key_path.clone(),
        message: format!("no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"),
    })?;
    CertifiedKey::from_der(chain, key, provider).map_err(|e| TlsError::Key {
        path: files.key_path.clone(),
        message: format!("not the key of the certificate's public key, or unusable: {e}"),
    })
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let error = |message: String| TlsError::Certificate { path: path.to_path_buf(), message };
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(|e| error(format!("cannot read it: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(format!("not a PEM certificate chain: {e}")))?;
    if chain.is_empty() {
        return Err(error("no CERTIFICATE block in it".into()));
    }
    Ok(chain)
}

/// Whether a listener is at its connection cap.
type Full = dyn Fn(&Shard) -> bool;

/// What a TLS listener serves behind the handshake.
pub enum Behind {
    /// Terminals: the plaintext end goes through the `ws://` upgrade (`conn`).
    Terminals,
    /// An HTTP port (`listen.api_tls`, `listen.admin_tls`, named by `what` in logs): the
    /// plaintext end is served by `serve`, at most `max` connections at once per shard.
    Http { what: &'static str, max: usize, serve: Rc<dyn Fn(TcpStream)> },
}

/// Accepts TLS connections until the node stops; each gets its own task (handshake, then
/// relay). At most `limits.tls_handshakes_per_shard_max` handshakes are in progress at once
/// per shard: past it, new connections wait in the listen backlog until one ends (each is
/// bounded by `limits.handshake_timeout_ms`), so a burst of clients connects more slowly
/// instead of being reset.
pub async fn accept_loop(shard: Rc<Shard>, listener: TcpListener, acceptor: TlsAcceptor, behind: Behind, stop: Stop) {
    let handshakes = Rc::new(Semaphore::new(shard.config.limits.tls_handshakes_per_shard_max as u64));
    let http_live = Rc::new(Cell::new(0usize));
    let behind = Rc::new(behind);
    let (what, full): (&'static str, Box<Full>) = match &*behind {
        Behind::Terminals => ("client_tls", Box::new(crate::conn::terminals_full)),
        Behind::Http { what, max, .. } => {
            let (live, max) = (http_live.clone(), *max);
            (what, Box::new(move |_: &Shard| live.get() >= max))
        }
    };
    crate::conn::accept_connections(shard, listener, stop, what, full, Some(handshakes), |shard, stream, slot| {
        let http_conn = matches!(&*behind, Behind::Http { .. }).then(|| HttpConnection::enter(&http_live));
        let behind = behind.clone();
        shard.spawn_terminal_task(serve(shard.clone(), stream, acceptor.clone(), slot, behind, http_conn))
    })
    .await;
}

/// One API connection served over TLS, counted until dropped.
struct HttpConnection(Rc<Cell<usize>>);

impl HttpConnection {
    fn enter(count: &Rc<Cell<usize>>) -> HttpConnection {
        count.set(count.get() + 1);
        HttpConnection(count.clone())
    }
}

impl Drop for HttpConnection {
    fn drop(&mut self) {
        debug_assert!(self.0.get() > 0, "API connection count underflow");
        self.0.set(self.0.get().saturating_sub(1));
    }
}

/// One TLS connection: handshake, then the plaintext side goes to what is `behind` and this
/// task relays. `_http_conn` counts an API connection until the relay ends.
async fn serve(
    shard: Rc<Shard>,
    tcp: TcpStream,
    acceptor: TlsAcceptor,
    handshaking: Option<StaticPermit>,
    behind: Rc<Behind>,
    _http_conn: Option<HttpConnection>,
) {
    let remote = tcp.peer_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let limit = shard.config.limits.handshake_timeout;
    let tls = match glommio::timer::timeout(limit, async { acceptor.accept(tcp).await.map_err(Into::into) }).await {
        Ok(tls) => tls,
        Err(e) => {
            debug!(shard = shard.id, %remote, error = %e, "TLS handshake failed");
            ShardCounters::add(&shard.counters().handshake_failures, 1);
            ShardCounters::add(&shard.counters().tls_handshake_failures, 1);
            return;
        }
    };
    drop(handshaking);
    ShardCounters::add(&shard.counters().tls_handshakes, 1);
    if tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
        ShardCounters::add(&shard.counters().tls_resumptions, 1);
    }
    let (engine_end, relay_end) = match std::os::unix::net::UnixStream::pair() {
        Ok(pair) => pair,
        Err(e) => {
            warn!(shard = shard.id, %remote, error = %e, "no socket pair for a TLS terminal; closing it");
            ShardCounters::add(&shard.counters().handshake_failures, 1);
            return;
        }
    };
    if let Err(e) = engine_end.set_nonblocking(true).and_then(|()| relay_end.set_nonblocking(true)) {
        warn!(shard = shard.id, %remote, error = %e, "socket pair setup failed; closing a TLS terminal");
        return;
    }
    // SAFETY: both are fresh, connected stream sockets owned only by the wrappers made here.
    let engine_end = unsafe { TcpStream::from_raw_fd(engine_end.into_raw_fd()) };
    let fd = relay_end.as_raw_fd();
    // SAFETY: as above.
    let relay_end = unsafe { UnixStream::from_raw_fd(relay_end.into_raw_fd()) };
    match &*behind {
        Behind::Terminals => shard.spawn_terminal_task(crate::conn::upgrade_from(shard.clone(), engine_end, remote)),
        Behind::Http { serve, .. } => serve(engine_end),
    }
    if let Err(e) = relay(tls, relay_end, move || hung_up(fd)).await {
        debug!(shard = shard.id, %remote, error = %e, "TLS relay ended");
    }
}

/// How long a relay goes on once the engine has ended its end (closed the session): enough to
/// deliver what the engine wrote before (the last frames, the close frame) to a terminal that
/// reads, not enough for one that stopped reading to hold the connection (its descriptors, TLS
/// state and buffers, no longer counted as a session) for ever.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// While writing to the terminal is blocked, how often to look whether the engine's end has
/// hung up meanwhile (then the rest is bounded by [`DRAIN_TIMEOUT`]).
const HANGUP_CHECK: Duration = Duration::from_secs(1);

/// Whether the engine's end of the pair behind `fd` has shut down or closed.
fn hung_up(fd: RawFd) -> bool {
    let mut p = libc::pollfd { fd, events: libc::POLLRDHUP, revents: 0 };
    // SAFETY: polls one descriptor, open for the duration of the call (the relay owns it).
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// Copies both ways between the TLS stream and the plaintext end. An EOF is passed on as a
/// write shutdown (a TLS `close_notify` towards the terminal); a terminal's FIN without
/// `close_notify` is an EOF too. Once the engine's side has ended (EOF, or `engine_hung_up`
/// while the terminal is not taking bytes), what it wrote is still delivered, the
/// `close_notify` follows, and the relay lingers for the terminal's end (reading and
/// dropping what it still sends, so the close does not reset the connection and lose the end
/// of what was sent), all within [`DRAIN_TIMEOUT`] (a terminal that stopped reading is then
/// let go). What the terminal sends after the engine's end is gone is dropped, never an end
/// of the delivery.
/// Ends early when writing to the terminal fails or the terminal's TLS stream breaks.
async fn relay<T, P>(mut tls: T, mut plain: P, engine_hung_up: impl Fn() -> bool) -> io::Result<()>
where
    T: AsyncRead + AsyncWrite + Unpin,
    P: AsyncRead + AsyncWrite + Unpin,
{
    let mut inbound = Pump::new();
    let mut outbound = Pump::new();
    // When the rest must be done by (from the engine's end), when to look for the engine's
    // hang-up next, and the timer for the earlier of these.
    let mut deadline: Option<Instant> = None;
    let mut check_at: Option<Instant> = None;
    let mut timer: Option<(Instant, glommio::timer::Timer)> = None;
    std::future::poll_fn(|cx| loop {
        let mut again = false;
        match inbound.poll(cx, &mut tls, &mut plain) {
            Poll::Ready(Err(Fault::Read(e))) if e.kind() == io::ErrorKind::UnexpectedEof => {
                inbound.eof = true;
                again = true;
            }
            Poll::Ready(Err(Fault::Read(e))) => return Poll::Ready(Err(e)),
            // The engine's end is gone: what the terminal still sends has no reader.
            Poll::Ready(Err(Fault::Write(_))) => {
                inbound.discard();
                again = true;
            }
            _ => {}
        }
        match outbound.poll(cx, &mut plain, &mut tls) {
            // The engine's end reset (closed with input unread): an end all the same.
            Poll::Ready(Err(Fault::Read(_))) => {
                outbound.eof = true;
                again = true;
            }
            Poll::Ready(Err(Fault::Write(e))) => return Poll::Ready(Err(e)),
            _ => {}
        }
        if again {
            continue;
        }
        let now = Instant::now();
        if outbound.eof && deadline.is_none() {
            deadline = Some(now + DRAIN_TIMEOUT);
        }
        if outbound.done {
            if inbound.done {
                return Poll::Ready(Ok(()));
            }
            // Linger for the terminal's end (a client reading our close answers it at once):
            // closing with its input unread would reset the connection, and bytes still in
            // the socket's send queue (the last frames, the close) would be lost.
            if deadline.is_some_and(|d| now >= d) {
                return Poll::Ready(Ok(()));
            }
        } else if deadline.is_some_and(|d| now >= d) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the terminal did not take the end of its session in time",
            )));
        }
        if deadline.is_none() && outbound.stalled {
            let at = *check_at.get_or_insert(now + HANGUP_CHECK);
            if now >= at {
                check_at = None;
                if engine_hung_up() {
                    deadline = Some(now + DRAIN_TIMEOUT);
                }
                continue;
            }
        } else {
            check_at = None;
        }
        let Some(wake) = deadline.or(check_at) else {
            timer = None;
            return Poll::Pending;
        };
        if timer.as_ref().is_none_or(|(at, _)| *at != wake) {
            timer = Some((wake, glommio::timer::Timer::new(wake.saturating_duration_since(now))));
        }
        let (_, t) = timer.as_mut().expect("just set");
        match Pin::new(t).poll(cx) {
            Poll::Ready(_) => timer = None,
            Poll::Pending => return Poll::Pending,
        }
    })
    .await
}

thread_local! {
    /// Where every relay of the shard reads (one buffer per thread, not per connection).
    static RELAY_SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; RELAY_BUFFER_BYTES]);
}

/// What failed in a [`Pump`]: reading its source, or writing (or shutting down) its sink.
#[derive(Debug)]
enum Fault {
    Read(io::Error),
    Write(io::Error),
}

/// One direction of a relay: reads into the thread's scratch buffer and writes it straight
/// out; only bytes the writer cannot take yet are kept (in `pending`, released once written),
/// so an idle relay holds no buffer at all.
struct Pump {
    pending: Vec<u8>,
    start: usize,
    /// The reader ended: shut the writer down, then this direction is done.
    eof: bool,
    done: bool,
    /// The writer is gone: what is read is dropped.
    discarding: bool,
    /// The last poll is waiting for the writer to take bytes (or a flush or shutdown).
    stalled: bool,
}

impl Pump {
    fn new() -> Pump {
        Pump { pending: Vec::new(), start: 0, eof: false, done: false, discarding: false, stalled: false }
    }

    /// From now on, drop what is read (and what was kept), and end at the reader's EOF.
    fn discard(&mut self) {
        (self.pending, self.start, self.discarding, self.stalled) = (Vec::new(), 0, true, false);
    }

    fn poll<R, W>(&mut self, cx: &mut Context<'_>, from: &mut R, to: &mut W) -> Poll<Result<(), Fault>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            self.stalled = false;
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if self.discarding {
                if self.eof {
                    self.done = true;
                    return Poll::Ready(Ok(()));
                }
            } else {
                while self.start < self.pending.len() {
                    match Pin::new(&mut *to).poll_write(cx, &self.pending[self.start..]) {
                        Poll::Ready(Ok(0)) => return Poll::Ready(Err(Fault::Write(io::ErrorKind::WriteZero.into()))),
                        Poll::Ready(Ok(n)) => self.start += n,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(Fault::Write(e))),
                        Poll::Pending => {
                            self.stalled = true;
                            return Poll::Pending;
                        }
                    }
                }
                if !self.pending.is_empty() {
                    (self.pending, self.start) = (Vec::new(), 0);
                }
                // Written out: push it through (TLS records leave on flush).
                match Pin::new(&mut *to).poll_flush(cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(Fault::Write(e))),
                    Poll::Pending => {
                        self.stalled = true;
                        return Poll::Pending;
                    }
                }
                if self.eof {
                    return match Pin::new(&mut *to).poll_close(cx) {
                        Poll::Ready(r) => {
                            self.done = true;
                            Poll::Ready(r.map_err(Fault::Write))
                        }
                        Poll::Pending => {
                            self.stalled = true;
                            Poll::Pending
                        }
                    };
                }
            }
            let discarding = self.discarding;
            let moved = RELAY_SCRATCH.with(|scratch| -> Poll<Result<(), Fault>> {
                let mut scratch = scratch.borrow_mut();
                let n = match Pin::new(&mut *from).poll_read(cx, &mut scratch[..]) {
                    Poll::Ready(Ok(0)) => {
                        self.eof = true;
                        return Poll::Ready(Ok(()));
                    }
                    Poll::Ready(Ok(n)) => n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(Fault::Read(e))),
                    Poll::Pending => return Poll::Pending,
                };
                if discarding {
                    return Poll::Ready(Ok(()));
                }
                let mut off = 0;
                while off < n {
                    match Pin::new(&mut *to).poll_write(cx, &scratch[off..n]) {
                        Poll::Ready(Ok(0)) => return Poll::Ready(Err(Fault::Write(io::ErrorKind::WriteZero.into()))),
                        Poll::Ready(Ok(k)) => off += k,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(Fault::Write(e))),
                        Poll::Pending => break,
                    }
                }
                // The writer is full: keep the rest (the scratch buffer is the next relay's).
                self.pending.extend_from_slice(&scratch[off..n]);
                Poll::Ready(Ok(()))
            });
            match moved {
                Poll::Ready(Ok(())) => {}
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls(cert: &str, key: &str) -> Tls {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        Tls { cert_path: dir.join(cert), key_path: dir.join(key), reload_check: Duration::from_secs(10) }
    }

    fn load(cert: &str, key: &str) -> Result<Arc<CertStore>, TlsError> {
        CertStore::load(&tls(cert, key))
    }

    #[test]
    fn the_fixture_certificate_makes_a_server_config() {
        let config = server_config(load("tls-cert.pem", "tls-key.pem").unwrap()).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"http/1.1".to_vec()]);
    }

    #[test]
    fn unusable_files_are_named_in_the_error() {
        let missing = load("nope.pem", "tls-key.pem").unwrap_err().to_string();
        assert!(missing.starts_with("tls.cert_path") && missing.contains("nope.pem"), "{missing}");
        // A key file given as the certificate: no CERTIFICATE block.
        let swapped = load("tls-key.pem", "tls-key.pem").unwrap_err().to_string();
        assert!(swapped.contains("no CERTIFICATE block"), "{swapped}");
        // A certificate given as the key: no private key.
        let no_key = load("tls-cert.pem", "tls-cert.pem").unwrap_err().to_string();
        assert!(no_key.starts_with("tls.key_path") && no_key.contains("no usable PEM private key"), "{no_key}");
        // The key of another certificate.
        let mismatch = load("tls-cert.pem", "tls-key-2.pem").unwrap_err().to_string();
        assert!(mismatch.contains("not the key of the certificate"), "{mismatch}");
    }

    #[test]
    fn a_changed_pair_is_served_and_a_broken_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let files = Tls {
            cert_path: dir.path().join("cert.pem"),
            key_path: dir.path().join("key.pem"),
            reload_check: Duration::from_secs(10),
        };
        let put = |cert: &str, key: &str| {
            std::fs::copy(fixtures.join(cert), &files.cert_path).unwrap();
            std::fs::copy(fixtures.join(key), &files.key_path).unwrap();
            // Distinct modification times even on coarse-grained file systems.
            let later = SystemTime::now() + Duration::from_secs(rand_secs());
            for p in [&files.cert_path, &files.key_path] {
                std::fs::File::options().write(true).open(p).unwrap().set_modified(later).unwrap();
            }
        };
        put("tls-cert.pem", "tls-key.pem");
        let store = CertStore::load(&files).unwrap();
        let leaf = |s: &CertStore| s.current.read().unwrap().cert[0].clone();
        let first = leaf(&store);
        assert!(!store.reload_if_changed().unwrap(), "nothing changed");
        put("tls-cert-2.pem", "tls-key-2.pem");
        assert!(store.reload_if_changed().unwrap());
        let second = leaf(&store);
        assert_ne!(first, second);
        // A half-written renewal (new certificate, old key) is refused; the pair in use stays.
        put("tls-cert.pem", "tls-key-2.pem");
        assert!(store.reload_if_changed().is_err());
        assert_eq!(leaf(&store), second);
    }

    /// A different number of seconds each call (so every `put` moves the modification time).
    fn rand_secs() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(1);
        N.fetch_add(1, Ordering::Relaxed)
    }

    /// A writer that takes at most 7 bytes at a time and is busy every other call.
    #[derive(Default)]
    struct Slow {
        got: Vec<u8>,
        calls: usize,
        closed: bool,
    }

    impl AsyncWrite for Slow {
        fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            self.calls += 1;
            if self.calls.is_multiple_of(2) {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let n = buf.len().min(7);
            self.got.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.closed = true;
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn a_pump_keeps_only_what_a_busy_writer_has_not_taken_and_lets_it_go() {
        let data: Vec<u8> = (0..50_000u32).map(|i| (i * 7) as u8).collect();
        let mut from = futures_lite::io::Cursor::new(data.clone());
        let mut to = Slow::default();
        let mut pump = Pump::new();
        let mut most_kept = 0;
        futures_lite::future::block_on(std::future::poll_fn(|cx| {
            let r = pump.poll(cx, &mut from, &mut to);
            most_kept = most_kept.max(pump.pending.capacity());
            r
        }))
        .unwrap();
        assert_eq!(to.got, data, "every byte, in order");
        assert!(to.closed, "the reader's end passed on");
        assert!(most_kept > 0, "the busy writer made the pump keep bytes");
        assert_eq!(pump.pending.capacity(), 0, "released once written");
    }

    #[test]
    fn what_the_engine_wrote_before_it_closed_is_delivered_though_the_terminal_still_sends() {
        glommio::LocalExecutorBuilder::default()
            .spawn(|| async {
                use futures_lite::{AsyncReadExt, AsyncWriteExt};
                let (mut outside, tls_side) = UnixStream::pair().unwrap();
                let (plain_side, mut inside) = UnixStream::pair().unwrap();
                // The terminal sends (an ack) while the engine writes its last frame and
                // closes its end for good: writing the ack inwards fails, which must not cut
                // the delivery of the last frame.
                outside.write_all(b"ack").await.unwrap();
                inside.write_all(b"last frame").await.unwrap();
                drop(inside);
                let relay = glommio::spawn_local(relay(tls_side, plain_side, || false));
                let mut got = Vec::new();
                outside.read_to_end(&mut got).await.unwrap();
                assert_eq!(got, b"last frame");
                outside.close().await.unwrap();
                relay.await.unwrap();
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn the_relay_copies_both_ways_and_passes_each_eof_on() {
        glommio::LocalExecutorBuilder::default()
            .spawn(|| async {
                let (outside, tls_side) = UnixStream::pair().unwrap();
                let (plain_side, inside) = UnixStream::pair().unwrap();
                let relay = glommio::spawn_local(relay(tls_side, plain_side, || false));
                use futures_lite::{AsyncReadExt, AsyncWriteExt};
                let (mut outside, mut inside) = (outside, inside);
                let big: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
                outside.write_all(&big).await.unwrap();
                let mut got = vec![0; big.len()];
                inside.read_exact(&mut got).await.unwrap();
                assert_eq!(got, big, "in, across several buffers");
                inside.write_all(b"answer").await.unwrap();
                let mut got = [0; 6];
                outside.read_exact(&mut got).await.unwrap();
                assert_eq!(&got, b"answer");
                // The outside ends: the inside sees EOF, may still answer, then ends too.
                outside.close().await.unwrap();
                let mut rest = Vec::new();
                inside.read_to_end(&mut rest).await.unwrap();
                assert!(rest.is_empty());
                inside.write_all(b"bye").await.unwrap();
                inside.close().await.unwrap();
                let mut tail = Vec::new();
                outside.read_to_end(&mut tail).await.unwrap();
                assert_eq!(tail, b"bye");
                relay.await.unwrap();
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
