//! TLS on the proxy listener (`gateway.tls`, with the `tls` cargo feature): rustls on the ring
//! provider (it builds in 30 s here against aws-lc-rs's 67 s, BENCHMARKS.md), TLS 1.2 and 1.3, the certificate chain and key read from PEM files. ALPN offers
//! `h2` (when built with `http2`) and `http/1.1`; a client that names neither speaks HTTP/1.1.
//! The files are read when the configuration is loaded, so a reload (SIGHUP) picks up a renewed
//! certificate; connections already open keep the one they started with.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;

use crate::config::TlsConfig;

/// Accepts TLS connections with the configured certificate.
pub struct Acceptor {
    inner: tokio_rustls::TlsAcceptor,
}

/// A client connection after its handshake.
pub struct Accepted {
    pub stream: tokio_rustls::server::TlsStream<TcpStream>,
    /// ALPN chose HTTP/2 (offered only in builds with `http2`).
    #[cfg_attr(not(feature = "http2"), allow(dead_code))]
    pub h2: bool,
}

impl Acceptor {
    /// Reads the certificate chain and key named by `config`; errors name the file and the key.
    pub fn new(config: &TlsConfig) -> Result<Acceptor, String> {
        let certs = CertificateDer::pem_file_iter(&config.cert_path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| {
                format!(
                    "gateway.tls.cert_path: cannot read certificates from {}: {e}",
                    config.cert_path.display()
                )
            })?;
        if certs.is_empty() {
            return Err(format!(
                "gateway.tls.cert_path: {} holds no certificate",
                config.cert_path.display()
            ));
        }
        let key = PrivateKeyDer::from_pem_file(&config.key_path).map_err(|e| {
            format!(
                "gateway.tls.key_path: cannot read a private key from {}: {e}",
                config.key_path.display()
            )
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("gateway.tls: {e}"))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| format!("gateway.tls: the certificate and key do not fit: {e}"))?;
        server.alpn_protocols = Vec::new();
        if cfg!(feature = "http2") {
            server.alpn_protocols.push(b"h2".to_vec());
        }
        server.alpn_protocols.push(b"http/1.1".to_vec());
        Ok(Acceptor {
            inner: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
        })
    }

    /// Runs the server side of the handshake within `within`: `None` when it fails (logged at
    /// debug: a port scanner or a client that distrusts the certificate is not an event).
    pub async fn accept(&self, tcp: TcpStream, within: Duration) -> Option<Accepted> {
        match tokio::time::timeout(within, self.inner.accept(tcp)).await {
            Ok(Ok(stream)) => {
                let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                Some(Accepted { stream, h2 })
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "TLS handshake failed");
                None
            }
            Err(_) => None,
        }
    }
}
