//! TLS: the rustls acceptor towards clients (certificates reloaded with the config), the connector towards
//! PostgreSQL (`[server_tls]`), the tls-server-end-point channel binding data, and a write-through stream wrapper.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::Digest as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::config::{ChannelBinding, Config, ServerTlsMode, TlsMode};

/// The ALPN protocol name PostgreSQL 17 uses; mandatory for direct TLS (`sslnegotiation=direct`).
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// Why certificates or keys could not be loaded. The text names the file, never key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path}: {reason}")]
    Pem { path: PathBuf, reason: &'static str },
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
    #[error("{0}")]
    Verifier(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_path_buf(), source })
}

/// All certificates of a PEM file (at least one).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_pem(path)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|_| TlsError::Pem { path: path.to_path_buf(), reason: "invalid PEM" })?;
    if certs.is_empty() {
        return Err(TlsError::Pem { path: path.to_path_buf(), reason: "no certificate found" });
    }
    Ok(certs)
}

/// The first private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_pem(path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|_| TlsError::Pem { path: path.to_path_buf(), reason: "invalid PEM" })?
        .ok_or(TlsError::Pem { path: path.to_path_buf(), reason: "no private key found" })
}

/// TLS towards clients: the rustls acceptor for the configured certificate and its channel binding data.
pub struct Acceptor {
    acceptor: tokio_rustls::TlsAcceptor,
    /// RFC 5929 tls-server-end-point: hash of our certificate; `None` when its signature algorithm has no
    /// defined hash (then SCRAM-SHA-256-PLUS is not offered, as in PostgreSQL).
    pub end_point: Option<Arc<[u8]>>,
}

impl Acceptor {
    /// Loads `[tls] cert` and `key`; `Ok(None)` when `[tls] mode` is disable.
    pub fn from_config(cfg: &Config) -> Result<Option<Arc<Acceptor>>, TlsError> {
        let (TlsMode::Allow | TlsMode::Require, Some(cert), Some(key)) = (cfg.tls.mode, &cfg.tls.cert, &cfg.tls.key)
        else {
            return Ok(None);
        };
        Acceptor::load(&cfg.resolve(cert), &cfg.resolve(key)).map(|a| Some(Arc::new(a)))
    }

    /// Builds an acceptor from a certificate chain file and a key file.
    pub fn load(cert: &Path, key: &Path) -> Result<Acceptor, TlsError> {
        let certs = load_certs(cert)?;
        let key = load_key(key)?;
        let end_point = tls_server_end_point(&certs[0]).map(Arc::from);
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        // A client that offers ALPN must offer "postgresql"; clients that offer none are accepted.
        config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
        Ok(Acceptor { acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)), end_point })
    }

    /// Runs the server side of the handshake on a socket with nothing buffered ahead of it.
    pub async fn accept(&self, tcp: TcpStream) -> io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
        self.acceptor.accept(tcp).await
    }
}

/// tls-server-end-point channel binding data (RFC 5929 §4.1): the certificate hashed with the hash of its
/// signature algorithm, SHA-256 when that is MD5 or SHA-1. `None` for algorithms without a single hash
/// (RSA-PSS, Ed25519) or a certificate we cannot parse.
pub fn tls_server_end_point(cert: &[u8]) -> Option<Vec<u8>> {
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04];
    let oid = signature_algorithm_oid(cert)?;
    let hash = match oid {
        // md5WithRSA, sha1WithRSA, sha256WithRSA
        [p @ .., 0x04 | 0x05 | 0x0b] if p == RSA => 256,
        [p @ .., 0x0c] if p == RSA => 384,
        [p @ .., 0x0d] if p == RSA => 512,
        // ecdsa-with-SHA1, ecdsa-with-SHA256/384/512
        [p @ .., 0x01] if p == ECDSA => 256,
        [p @ .., 0x03, 0x02] if p == ECDSA => 256,
        [p @ .., 0x03, 0x03] if p == ECDSA => 384,
        [p @ .., 0x03, 0x04] if p == ECDSA => 512,
        _ => return None,
    };
    Some(match hash {
        256 => sha2::Sha256::digest(cert).to_vec(),
        384 => sha2::Sha384::digest(cert).to_vec(),
        _ => sha2::Sha512::digest(cert).to_vec(),
    })
}

/// One DER element: (tag, contents, rest).
fn der_item(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, r) = b.split_first()?;
    let (&l0, r) = r.split_first()?;
    let (len, r) = if l0 < 0x80 {
        (usize::from(l0), r)
    } else {
        let n = usize::from(l0 & 0x7f);
        if n == 0 || n > 4 || r.len() < n {
            return None;
        }
        (r[..n].iter().fold(0usize, |a, &x| (a << 8) | usize::from(x)), &r[n..])
    };
    (r.len() >= len).then(|| (tag, &r[..len], &r[len..]))
}

/// Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm SEQUENCE { OID, ... }, signature }.
fn signature_algorithm_oid(cert: &[u8]) -> Option<&[u8]> {
    let (0x30, body, _) = der_item(cert)? else { return None };
    let (_, _tbs, rest) = der_item(body)?;
    let (0x30, alg, _) = der_item(rest)? else { return None };
    let (0x06, oid, _) = der_item(alg)? else { return None };
    Some(oid)
}

/// TLS towards PostgreSQL, per `[server_tls]`.
pub struct Connector {
    pub mode: ServerTlsMode,
    /// Whether pgrelay's SCRAM login binds to the TLS session (`[server_tls] channel_binding`).
    pub channel_binding: ChannelBinding,
    connector: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector").field("mode", &self.mode).field("channel_binding", &self.channel_binding).finish()
    }
}

impl Connector {
    /// `Ok(None)` when `[server_tls] mode` is disable.
    pub fn from_config(cfg: &Config) -> Result<Option<Arc<Connector>>, TlsError> {
        let mode = cfg.server_tls.mode;
        let verifier: Arc<dyn ServerCertVerifier> = match mode {
            ServerTlsMode::Disable => return Ok(None),
            ServerTlsMode::Prefer | ServerTlsMode::Require => Arc::new(AcceptAnyCertificate(provider())),
            ServerTlsMode::VerifyCa | ServerTlsMode::VerifyFull => {
                let ca = cfg.server_tls.ca_file.as_ref().map(|p| cfg.resolve(p)).ok_or_else(|| {
                    TlsError::Verifier("server_tls.mode verify-ca/verify-full needs server_tls.ca_file".into())
                })?;
                let mut roots = rustls::RootCertStore::empty();
                for c in load_certs(&ca)? {
                    roots.add(c).map_err(|e| TlsError::Verifier(format!("{}: {e}", ca.display())))?;
                }
                let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
                    .build()
                    .map_err(|e| TlsError::Verifier(e.to_string()))?;
                if mode == ServerTlsMode::VerifyCa {
                    Arc::new(ChainOnly(webpki))
                } else {
                    webpki
                }
            }
        };
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(Some(Arc::new(Connector {
            mode,
            channel_binding: cfg.server_tls.channel_binding,
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        })))
    }

    /// The leaf certificate's tls-server-end-point data on an established connection, `None` when the
    /// certificate's signature algorithm defines no hash for it.
    pub fn end_point(tls: &tokio_rustls::client::TlsStream<TcpStream>) -> Option<Vec<u8>> {
        tls_server_end_point(tls.get_ref().1.peer_certificates()?.first()?)
    }

    /// Runs the client side of the handshake (after the server answered 'S' and nothing else).
    pub async fn connect(&self, host: &str, tcp: TcpStream) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let name = ServerName::try_from(host.to_string())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("invalid server name {host:?}")))?;
        self.connector.connect(name, tcp).await
    }
}

/// The connector as a field of `ProxyConfig` (not a key): equal when both are absent or are the same one.
#[derive(Clone, Default, Debug)]
pub struct ConnectorSlot(pub Option<Arc<Connector>>);

impl PartialEq for ConnectorSlot {
    fn eq(&self, other: &Self) -> bool {
        match (&self.0, &other.0) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

/// `prefer`/`require`: encryption without authentication, like libpq's sslmode of the same names. An attacker
/// on the path can still present its own certificate; use verify-ca or verify-full against that.
/// Handshake signatures are still checked, so the peer must hold the key of the certificate it sent.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to the CA file, the host name is not checked. webpki checks the name
/// last, so a name mismatch after a good chain is the only error turned into success.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use rustls::CertificateError::{NotValidForName, NotValidForNameContext};
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(NotValidForName | NotValidForNameContext { .. })) => {
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// A TLS stream that can tell whether it still holds encrypted bytes for the socket.
pub trait PendingTls {
    /// True while records made from earlier writes wait for the socket.
    fn has_pending_output(&self) -> bool;
}

impl PendingTls for tokio_rustls::server::TlsStream<TcpStream> {
    fn has_pending_output(&self) -> bool {
        self.get_ref().1.wants_write()
    }
}

impl PendingTls for tokio_rustls::client::TlsStream<TcpStream> {
    fn has_pending_output(&self) -> bool {
        self.get_ref().1.wants_write()
    }
}

/// A TLS stream whose writes complete only once the encrypted bytes reached the socket.
///
/// tokio-rustls accepts plaintext and may keep the records it made from it buffered when the socket would
/// block, expecting a `flush()`. The relay writes with `write_all` and then waits for the other side, so a
/// record left in the buffer would stall the session. This wrapper reports a write as done only after the
/// flush finished; if the flush is pending it remembers the count and reports it on the retry (`write_all`
/// retries with the same buffer). tokio-rustls' `poll_write` already sends every record the socket takes, so
/// the flushes around it run only when rustls still holds output (one `wants_write()` check each otherwise).
pub struct WriteThrough<S> {
    pub inner: S,
    unacked: Option<usize>,
}

impl<S> WriteThrough<S> {
    /// Wraps a TLS stream.
    pub fn new(inner: S) -> WriteThrough<S> {
        WriteThrough { inner, unacked: None }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteThrough<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + PendingTls + Unpin> AsyncWrite for WriteThrough<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(n) = this.unacked {
            ready!(Pin::new(&mut this.inner).poll_flush(cx))?;
            this.unacked = None;
            return Poll::Ready(Ok(n.min(buf.len())));
        }
        if this.inner.has_pending_output() {
            ready!(Pin::new(&mut this.inner).poll_flush(cx))?;
        }
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        if !this.inner.has_pending_output() {
            return Poll::Ready(Ok(n));
        }
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(n)),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                this.unacked = Some(n);
                Poll::Pending
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // TCP has no flush of its own: with no record held back there is nothing to do.
        if !this.inner.has_pending_output() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_walker_is_bounded() {
        assert_eq!(signature_algorithm_oid(&[]), None);
        assert_eq!(signature_algorithm_oid(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(tls_server_end_point(&[0x30, 0x03, 0x30, 0x01, 0x00]), None);
        // SEQUENCE { SEQUENCE {}, SEQUENCE { OID sha256WithRSA } }
        let oid = [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b];
        let mut alg = vec![0x06, oid.len() as u8];
        alg.extend_from_slice(&oid);
        let mut body = vec![0x30, 0x00, 0x30, alg.len() as u8];
        body.extend_from_slice(&alg);
        let mut cert = vec![0x30, body.len() as u8];
        cert.extend_from_slice(&body);
        assert_eq!(signature_algorithm_oid(&cert), Some(&oid[..]));
        assert_eq!(tls_server_end_point(&cert).map(|h| h.len()), Some(32));
    }
}
