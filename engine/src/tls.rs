//! TLS for terminals (`wss://`): the optional `listen.client_tls` listener. Owns the rustls
//! server configuration (read once at start from `tls.cert_path` / `tls.key_path`), the TLS
//! handshakes, and the relay that gives every TLS terminal to the ordinary `ws://` path: after
//! the handshake (bounded by `limits.handshake_timeout_ms`) the connection's plaintext goes
//! through a local socket pair whose other end `conn` serves exactly like a plain TCP terminal
//! (upgrade, token checks, hand-over, session, parking, limits). Never touches sessions.
//!
//! What a TLS terminal costs beyond a plain one: three descriptors instead of one (the TCP
//! socket and both ends of the pair) and, for as long as it is connected, the relay task with
//! its TLS state and two copy buffers ([`RELAY_BUFFER_BYTES`] each). The plain `client`
//! listener is unchanged by it.
use std::io;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};

use ether_http::server::Stop;
use futures_lite::{AsyncRead, AsyncWrite};
use futures_rustls::TlsAcceptor;
use glommio::net::{TcpListener, TcpStream, UnixStream};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use tracing::{debug, warn};

use crate::config::Tls;
use crate::shard::Shard;
use crate::stats::ShardCounters;

/// Bytes each direction of a relay copies at once.
pub const RELAY_BUFFER_BYTES: usize = 4 * 1024;

/// Why the TLS listener could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.cert_path {path}: {message}")]
    Certificate { path: PathBuf, message: String },
    #[error("tls.key_path {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("the certificate and key do not make a TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// The server configuration of the TLS listener: the PEM chain (leaf first) and key of
/// `tls`, TLS 1.2 and 1.3 with rustls's safe defaults (ring), ALPN `http/1.1`.
pub fn server_config(tls: &Tls) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = read_chain(&tls.cert_path)?;
    let key = PrivateKeyDer::from_pem_file(&tls.key_path).map_err(|e| TlsError::Key {
        path: tls.key_path.clone(),
        message: format!("no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
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

/// Accepts TLS terminals until the node stops; each gets its own task (handshake, then relay).
pub async fn accept_loop(shard: Rc<Shard>, listener: TcpListener, acceptor: TlsAcceptor, stop: Stop) {
    crate::conn::accept_terminals(shard, listener, stop, "client_tls", |shard, stream| {
        shard.spawn_terminal_task(serve(shard.clone(), stream, acceptor.clone()))
    })
    .await;
}

/// One TLS terminal: handshake, then the plaintext side goes to `conn` and this task relays.
async fn serve(shard: Rc<Shard>, tcp: TcpStream, acceptor: TlsAcceptor) {
    let remote = tcp.peer_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let limit = shard.config.limits.handshake_timeout;
    let tls = match glommio::timer::timeout(limit, async { acceptor.accept(tcp).await.map_err(Into::into) }).await {
        Ok(tls) => tls,
        Err(e) => {
            debug!(shard = shard.id, %remote, error = %e, "TLS handshake failed");
            ShardCounters::add(&shard.counters().handshake_failures, 1);
            return;
        }
    };
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
    // SAFETY: as above.
    let relay_end = unsafe { UnixStream::from_raw_fd(relay_end.into_raw_fd()) };
    shard.spawn_terminal_task(crate::conn::upgrade_from(shard.clone(), engine_end, remote));
    if let Err(e) = relay(tls, relay_end).await {
        debug!(shard = shard.id, %remote, error = %e, "TLS terminal relay ended");
    }
}

/// Copies both ways between the TLS stream and the plaintext end. An EOF is passed on as a
/// write shutdown (a TLS `close_notify` towards the terminal). Ends when the engine's side has
/// ended and that was passed on (the engine closes a session for good: whatever the terminal
/// still sends could not be served, and a terminal that vanished without a FIN must not keep
/// the relay alive), or when either direction fails.
async fn relay<T, P>(mut tls: T, mut plain: P) -> io::Result<()>
where
    T: AsyncRead + AsyncWrite + Unpin,
    P: AsyncRead + AsyncWrite + Unpin,
{
    let mut inbound = Pump::new();
    let mut outbound = Pump::new();
    std::future::poll_fn(|cx| {
        let _ = inbound.poll(cx, &mut tls, &mut plain)?;
        outbound.poll(cx, &mut plain, &mut tls)
    })
    .await
}

/// One direction of a relay: reads into its buffer, writes it all out, flushes, again.
struct Pump {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// The reader ended: shut the writer down, then this direction is done.
    eof: bool,
    done: bool,
}

impl Pump {
    fn new() -> Pump {
        Pump { buf: vec![0; RELAY_BUFFER_BYTES].into_boxed_slice(), start: 0, end: 0, eof: false, done: false }
    }

    fn poll<R, W>(&mut self, cx: &mut Context<'_>, from: &mut R, to: &mut W) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            while self.start < self.end {
                match Pin::new(&mut *to).poll_write(cx, &self.buf[self.start..self.end]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => self.start += n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
            }
            // Written out: push it through (TLS records leave on flush).
            match Pin::new(&mut *to).poll_flush(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
            if self.eof {
                return match Pin::new(&mut *to).poll_close(cx) {
                    Poll::Ready(r) => {
                        self.done = true;
                        Poll::Ready(r)
                    }
                    Poll::Pending => Poll::Pending,
                };
            }
            match Pin::new(&mut *from).poll_read(cx, &mut self.buf) {
                Poll::Ready(Ok(0)) => self.eof = true,
                Poll::Ready(Ok(n)) => (self.start, self.end) = (0, n),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls(cert: &str, key: &str) -> Tls {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        Tls { cert_path: dir.join(cert), key_path: dir.join(key) }
    }

    #[test]
    fn the_fixture_certificate_makes_a_server_config() {
        let config = server_config(&tls("tls-cert.pem", "tls-key.pem")).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"http/1.1".to_vec()]);
    }

    #[test]
    fn unusable_files_are_named_in_the_error() {
        let missing = server_config(&tls("nope.pem", "tls-key.pem")).unwrap_err().to_string();
        assert!(missing.starts_with("tls.cert_path") && missing.contains("nope.pem"), "{missing}");
        // A key file given as the certificate: no CERTIFICATE block.
        let swapped = server_config(&tls("tls-key.pem", "tls-key.pem")).unwrap_err().to_string();
        assert!(swapped.contains("no CERTIFICATE block"), "{swapped}");
        // A certificate given as the key: no private key.
        let no_key = server_config(&tls("tls-cert.pem", "tls-cert.pem")).unwrap_err().to_string();
        assert!(no_key.starts_with("tls.key_path") && no_key.contains("no usable PEM private key"), "{no_key}");
    }

    #[test]
    fn the_relay_copies_both_ways_and_passes_each_eof_on() {
        glommio::LocalExecutorBuilder::default()
            .spawn(|| async {
                let (outside, tls_side) = UnixStream::pair().unwrap();
                let (plain_side, inside) = UnixStream::pair().unwrap();
                let relay = glommio::spawn_local(relay(tls_side, plain_side));
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
