//! The HTTP client settings every Keel client of a Keel server shares (the projector's gap
//! repair, `keel audit --url`, `keel-bench`): http or https, the server's CA certificate
//! (`--ca-cert`), and an API key (`--api-key`) sent as `Authorization: Bearer` on every request.
//!
//! TLS is rustls with the ring provider, the one already in the tree (the MongoDB driver's),
//! configured here rather than through reqwest's default provider (aws-lc, a second C crypto
//! build).

use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How a client reaches a Keel server.
#[derive(Clone, Debug, Default)]
pub struct ClientOptions {
    /// PEM file of the certificates to trust for https (instead of the system's roots).
    pub ca_cert: Option<PathBuf>,
    /// API key sent on every request.
    pub api_key: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("--ca-cert {path}: {detail}")]
    CaCert { path: PathBuf, detail: String },
    #[error("the API key is not a valid header value (use the key `keel keys add` printed)")]
    ApiKey,
    #[error("TLS: {0}")]
    Tls(String),
}

/// A client builder with `options` applied; the caller adds its timeouts and builds.
pub fn builder(options: &ClientOptions) -> Result<reqwest::ClientBuilder, ClientError> {
    let mut headers = HeaderMap::new();
    if let Some(key) = &options.api_key {
        let mut value =
            HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| ClientError::ApiKey)?;
        value.set_sensitive(true);
        headers.insert(AUTHORIZATION, value);
    }
    let tls = rustls_config(options.ca_cert.as_deref())?;
    Ok(reqwest::Client::builder()
        .no_proxy()
        .default_headers(headers)
        .tls_backend_preconfigured(tls))
}

fn rustls_config(ca_cert: Option<&Path>) -> Result<rustls::ClientConfig, ClientError> {
    let mut roots = RootCertStore::empty();
    match ca_cert {
        Some(path) => {
            let ca_error = |detail: String| ClientError::CaCert {
                path: path.to_owned(),
                detail,
            };
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| ca_error(e.to_string()))?;
            if certs.is_empty() {
                return Err(ca_error("no certificate in the file".into()));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| ca_error(e.to_string()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for error in &found.errors {
                tracing::debug!(%error, "a system root certificate could not be loaded");
            }
            let (_added, _ignored) = roots.add_parsable_certificates(found.certs);
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
