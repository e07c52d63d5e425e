//! The client for requests the gateway makes to URLs users configure (metering webhooks,
//! async callbacks): http, or https verified against the system's roots plus `--tls-ca-file`.

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

pub type OutboundClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls_ca_file {0}: {1}")]
    CaFile(String, String),
    #[error("no TLS root certificates: none from the system and no --tls-ca-file")]
    NoRoots,
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// Root certificates, loaded once per process (the system's store is read from disk).
static ROOTS: OnceLock<Arc<rustls::RootCertStore>> = OnceLock::new();

/// Loads the roots: the system's, plus every certificate in `ca_file` (PEM). Call at start
/// so a bad file is a start-up error; later calls reuse the first result.
pub fn load_roots(ca_file: Option<&Path>) -> Result<(), TlsError> {
    if ROOTS.get().is_some() {
        return Ok(());
    }
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        tracing::debug!("system root certificates: {e}");
    }
    let (added, _ignored) = roots.add_parsable_certificates(native.certs);
    if let Some(path) = ca_file {
        let shown = path.display().to_string();
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| TlsError::CaFile(shown.clone(), e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| TlsError::CaFile(shown.clone(), e.to_string()))?;
        if certs.is_empty() {
            return Err(TlsError::CaFile(shown, "no PEM certificate in it".into()));
        }
        for c in certs {
            roots
                .add(c)
                .map_err(|e| TlsError::CaFile(shown.clone(), e.to_string()))?;
        }
    } else if added == 0 {
        return Err(TlsError::NoRoots);
    }
    let _ = ROOTS.set(Arc::new(roots));
    Ok(())
}

/// A pooled client for http and https URLs.
pub fn client(idle: Duration) -> Result<OutboundClient, TlsError> {
    let roots = ROOTS
        .get()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::RootCertStore::empty()));
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(10)));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(idle)
        .build(connector))
}
