//! TLS from PEM files, for the Chat Server's listeners and (reused by `bgs`) for the gateway's
//! listeners and links: a server side from a certificate chain and its key, a client side that
//! trusts the certificates of one CA file. rustls with ring; TLS 1.2 and 1.3.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// A TLS handshake must complete within this time, or the connection is closed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A byte stream: a plain TCP connection or a TLS session over one.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}
pub type BoxIo = Pin<Box<dyn Io>>;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate", path.display()));
    }
    Ok(certs)
}

/// The server side: the certificate chain (leaf first) and its private key, both PEM.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, String> {
    let chain = certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    Ok(Arc::new(config))
}

/// The client side: trusts the certificates in `ca` (PEM), nothing else.
pub fn client_config(ca: &Path) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    for c in certs(ca)? {
        roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Accepts a connection: TLS when `acceptor` is given (within [`HANDSHAKE_TIMEOUT`]), else
/// the plain stream.
pub async fn accept(stream: TcpStream, acceptor: Option<&TlsAcceptor>) -> std::io::Result<BoxIo> {
    accept_within(stream, acceptor, HANDSHAKE_TIMEOUT).await
}

/// [`accept`] with a handshake deadline of `within`.
pub async fn accept_within(
    stream: TcpStream,
    acceptor: Option<&TlsAcceptor>,
    within: std::time::Duration,
) -> std::io::Result<BoxIo> {
    match acceptor {
        None => Ok(Box::pin(stream)),
        Some(a) => {
            let tls = tokio::time::timeout(within, a.accept(stream))
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
                })??;
            Ok(Box::pin(tls))
        }
    }
}

/// Opens the client side over `stream` to `address` (`host:port`; the host, a name or an IP
/// address, must be in the peer's certificate).
pub async fn connect(
    stream: TcpStream,
    address: &str,
    config: Option<&Arc<ClientConfig>>,
) -> std::io::Result<BoxIo> {
    let Some(config) = config else {
        return Ok(Box::pin(stream));
    };
    let host = address
        .rsplit_once(':')
        .map_or(address, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let name = ServerName::try_from(host.to_string()).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{host}: not a TLS server name: {e}"),
        )
    })?;
    let tls = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        TlsConnector::from(config.clone()).connect(name, stream),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
    Ok(Box::pin(tls))
}
