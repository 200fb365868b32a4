//! TLS for the SDK's clients: the rustls client configurations (the Mozilla roots by default,
//! or the roots a caller gives) and [`Conn`], a blocking connection that is plain TCP or TLS
//! over it. Used by [`crate::TerminalClient`] for `wss://` and [`crate::GatewayClient`] for
//! `https://`; knows nothing of HTTP or WebSocket.
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, OnceLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use crate::SdkError;

/// A TLS client configuration trusting exactly the certificates in `pem` (PEM text: a private
/// CA, or a node's self-signed certificate).
pub fn tls_config_with_roots(pem: &[u8]) -> Result<Arc<rustls::ClientConfig>, SdkError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| SdkError::Tls(format!("not a PEM certificate: {e}")))?;
        roots.add(cert).map_err(|e| SdkError::Tls(format!("unusable root certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(SdkError::Tls("no CERTIFICATE block in the PEM text".into()));
    }
    Ok(client_config(roots))
}

fn client_config(roots: rustls::RootCertStore) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// The Mozilla roots (`webpki-roots`), built once.
pub fn default_tls_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| client_config(rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() }))
        .clone()
}

/// A client TLS session for `name` (a DNS name or an IP address).
pub fn client_session(config: Arc<rustls::ClientConfig>, name: &str) -> Result<rustls::ClientConnection, SdkError> {
    let name = ServerName::try_from(name.to_owned())
        .map_err(|e| SdkError::InvalidUrl(format!("{name:?} is not a TLS server name: {e}")))?;
    rustls::ClientConnection::new(config, name).map_err(|e| SdkError::Tls(e.to_string()))
}

/// A blocking connection: plain TCP, or TLS over it. TLS handshake errors (an untrusted
/// certificate, say) surface as I/O errors on the first read or write.
#[derive(Debug)]
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Conn {
    /// The TCP stream underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(s) => s.get_ref(),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots_from_pem() {
        assert!(matches!(tls_config_with_roots(b"not pem"), Err(SdkError::Tls(_))));
        let broken = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(matches!(tls_config_with_roots(broken), Err(SdkError::Tls(_))));
        assert!(client_session(default_tls_config(), "not a name!").is_err());
        assert!(client_session(default_tls_config(), "127.0.0.1").is_ok());
    }
}
