//! TLS for the tool's terminals (`--tls`): the node's `wss://` listener instead of `ws://`.
//! Owns the client configuration (the roots a run trusts) and [`Conn`], the connection a
//! terminal reads and writes whichever it is; the terminal logic above it is unchanged.
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_lite::{AsyncRead, AsyncWrite};
use futures_rustls::client::TlsStream;
use futures_rustls::TlsConnector;
use glommio::net::TcpStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde::{Deserialize, Serialize};

/// The certificate `--spawn --tls` gives the node it starts (a self-signed one for
/// `localhost` and 127.0.0.1; its key is public: for load tests on loopback only).
pub const SPAWN_CERT_PEM: &str = include_str!("../../engine/tests/fixtures/tls-cert.pem");
/// The key of [`SPAWN_CERT_PEM`].
pub const SPAWN_KEY_PEM: &str = include_str!("../../engine/tests/fixtures/tls-key.pem");

/// What a fleet needs to speak TLS (sent to worker processes as is).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsSpec {
    /// PEM certificates to trust (the node's own, or its CA).
    pub ca_pem: String,
    /// The name the node's certificate must be for.
    pub server_name: String,
}

impl TlsSpec {
    /// A connector trusting `ca_pem` only.
    pub fn connector(&self) -> Result<(TlsConnector, ServerName<'static>), String> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            let cert = cert.map_err(|e| format!("--tls-ca: not a PEM certificate: {e}"))?;
            roots.add(cert).map_err(|e| format!("--tls-ca: unusable certificate: {e}"))?;
        }
        if roots.is_empty() {
            return Err("--tls-ca: no CERTIFICATE block".into());
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        // rustls keeps resumable sessions per server name and uses each TLS 1.3 ticket once:
        // the tool's terminals, which share this configuration and one name, share a few
        // tickets, so most of their reconnects are full handshakes (a real device keeps its own).
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = ServerName::try_from(self.server_name.clone())
            .map_err(|e| format!("--tls-name {:?}: {e}", self.server_name))?;
        Ok((TlsConnector::from(Arc::new(config)), name))
    }
}

/// A terminal's connection: plain TCP, or TLS over it.
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsRawFd for Conn {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Conn::Plain(s) => s.as_raw_fd(),
            Conn::Tls(s) => s.get_ref().0.as_raw_fd(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_close(cx),
            Conn::Tls(s) => Pin::new(&mut **s).poll_close(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spawn_certificate_makes_a_connector() {
        let spec = TlsSpec { ca_pem: SPAWN_CERT_PEM.into(), server_name: "localhost".into() };
        assert!(spec.connector().is_ok());
        let bad = TlsSpec { ca_pem: "nothing".into(), server_name: "localhost".into() };
        assert!(bad.connector().err().unwrap().contains("no CERTIFICATE"));
        let bad_name = TlsSpec { ca_pem: SPAWN_CERT_PEM.into(), server_name: "not a name!".into() };
        assert!(bad_name.connector().err().unwrap().contains("--tls-name"));
    }
}
