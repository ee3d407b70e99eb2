//! TLS to Redis (`rediss://`, `rediss+cluster://`): which server certificates the node trusts
//! (a private CA from `SSE_REDIS_TLS_CA_FILE`, else the system's roots) and which certificate it
//! shows when Redis asks for one (`SSE_REDIS_TLS_CERT_FILE` + `SSE_REDIS_TLS_KEY_FILE`, for
//! `tls-auth-clients yes`). The files are read once, at startup, so a wrong path or a file that
//! is not PEM stops the node with exit 2 instead of surfacing as a bus that never gets ready.
//!
//! Every Redis connection the node makes is built from here — the bus's subscriber, pool and
//! reads, presence, a cluster's command connections (redis-rs) and the cluster shard
//! subscribers' own RESP client ([`RedisTls::connect`]) — so none of them can skip the trust
//! settings the others use.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use deadpool_redis::redis::{self, ClientTlsConfig, IntoConnectionInfo, TlsCertificates};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// A TLS setting that cannot be used. The node exits 2: the fix is in the configuration.
#[derive(Debug, thiserror::Error)]
pub enum RedisTlsError {
    #[error("cannot read {setting} {path}: {source}")]
    Read { setting: &'static str, path: PathBuf, source: io::Error },
    #[error("{setting} {path} holds no {what} in PEM form")]
    NotPem { setting: &'static str, path: PathBuf, what: &'static str },
    #[error("TLS to Redis cannot be set up: {0}")]
    Setup(String),
}

/// The node's TLS settings for Redis, shared by every connection it makes. `None` inside: the
/// URL is not a TLS one.
#[derive(Clone, Default)]
pub struct RedisTls {
    loaded: Option<Arc<Loaded>>,
}

struct Loaded {
    /// For redis-rs clients; `None` fields mean its defaults (the system's roots, no client
    /// certificate).
    certificates: TlsCertificates,
    /// For the cluster shard subscribers, which speak RESP on a socket of their own.
    connector: TlsConnector,
}

impl std::fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTls").field("enabled", &self.loaded.is_some()).finish()
    }
}

/// Whether `url` asks for TLS: `rediss://` or `rediss+cluster://`.
pub fn is_tls_url(url: &str) -> bool {
    url.starts_with("rediss://") || url.starts_with("rediss+")
}

impl RedisTls {
    /// Reads the files once. With a plain `redis://` URL (or none) there is nothing to load;
    /// the settings are refused with such a URL by the configuration's check.
    pub fn load(url: Option<&str>, ca: Option<&Path>, identity: Option<(&Path, &Path)>) -> Result<Self, RedisTlsError> {
        if !url.is_some_and(is_tls_url) {
            return Ok(Self::default());
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| RedisTlsError::Setup(e.to_string()))?;
        let (root_pem, builder) = match ca {
            Some(path) => {
                let pem = read("SSE_REDIS_TLS_CA_FILE", path)?;
                let mut roots = rustls::RootCertStore::empty();
                for cert in certificates("SSE_REDIS_TLS_CA_FILE", path, &pem)? {
                    roots.add(cert).map_err(|e| RedisTlsError::Setup(format!("{}: {e}", path.display())))?;
                }
                (Some(pem), builder.with_root_certificates(roots))
            }
            None => {
                let verifier = rustls_platform_verifier::Verifier::new(provider)
                    .map_err(|e| RedisTlsError::Setup(e.to_string()))?;
                (None, builder.dangerous().with_custom_certificate_verifier(Arc::new(verifier)))
            }
        };
        let (client_tls, config) = match identity {
            Some((cert_path, key_path)) => {
                let cert_pem = read("SSE_REDIS_TLS_CERT_FILE", cert_path)?;
                let key_pem = read("SSE_REDIS_TLS_KEY_FILE", key_path)?;
                let chain = certificates("SSE_REDIS_TLS_CERT_FILE", cert_path, &cert_pem)?;
                let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| RedisTlsError::NotPem {
                    setting: "SSE_REDIS_TLS_KEY_FILE",
                    path: key_path.to_owned(),
                    what: "private key",
                })?;
                let config =
                    builder.with_client_auth_cert(chain, key).map_err(|e| RedisTlsError::Setup(e.to_string()))?;
                (Some(ClientTlsConfig { client_cert: cert_pem, client_key: key_pem }), config)
            }
            None => (None, builder.with_no_client_auth()),
        };
        Ok(Self {
            loaded: Some(Arc::new(Loaded {
                certificates: TlsCertificates { client_tls, root_cert: root_pem },
                connector: TlsConnector::from(Arc::new(config)),
            })),
        })
    }

    /// A redis-rs client for `url`, with these certificates when it is a TLS URL.
    pub fn client(&self, url: impl IntoConnectionInfo) -> redis::RedisResult<redis::Client> {
        match &self.loaded {
            Some(loaded) => redis::Client::build_with_tls(url, loaded.certificates.clone()),
            None => redis::Client::open(url),
        }
    }

    /// For a cluster's command connections (redis-rs): `None` when TLS is off.
    pub fn certificates(&self) -> Option<TlsCertificates> {
        self.loaded.as_ref().map(|loaded| loaded.certificates.clone())
    }

    pub fn is_enabled(&self) -> bool {
        self.loaded.is_some()
    }

    /// Opens TLS over `tcp` to `host` (a name or an address, which the server certificate must
    /// name), for connections redis-rs does not make.
    pub async fn connect(&self, tcp: TcpStream, host: &str) -> io::Result<TlsStream<TcpStream>> {
        let Some(loaded) = &self.loaded else {
            return Err(io::Error::other("TLS is not configured"));
        };
        let name = ServerName::try_from(host.to_owned()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        loaded.connector.connect(name, tcp).await
    }
}

fn read(setting: &'static str, path: &Path) -> Result<Vec<u8>, RedisTlsError> {
    std::fs::read(path).map_err(|source| RedisTlsError::Read { setting, path: path.to_owned(), source })
}

fn certificates(setting: &'static str, path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, RedisTlsError> {
    let not_pem = || RedisTlsError::NotPem { setting, path: path.to_owned(), what: "certificate" };
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem).collect::<Result<_, _>>().map_err(|_| not_pem())?;
    if certs.is_empty() {
        return Err(not_pem());
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_urls_load_nothing_and_build_plain_clients() {
        let tls = RedisTls::load(Some("redis://127.0.0.1:6379"), Some(Path::new("/nonexistent")), None).expect("plain");
        assert!(!tls.is_enabled());
        assert!(RedisTls::load(None, None, None).is_ok_and(|t| !t.is_enabled()));
        assert!(tls.client("redis://127.0.0.1:6379").is_ok());
    }

    #[test]
    fn tls_urls_are_recognised() {
        assert!(is_tls_url("rediss://h:1"));
        assert!(is_tls_url("rediss+cluster://h:1,h:2"));
        assert!(!is_tls_url("redis://h:1"));
        assert!(!is_tls_url("redis+cluster://h:1"));
    }

    #[test]
    fn unreadable_and_non_pem_files_are_named_in_the_error() {
        let missing = RedisTls::load(Some("rediss://h:1"), Some(Path::new("/nonexistent/ca.pem")), None);
        let message = missing.expect_err("missing file").to_string();
        assert!(message.contains("SSE_REDIS_TLS_CA_FILE") && message.contains("/nonexistent/ca.pem"), "{message}");

        let dir = std::env::temp_dir().join(format!("sse-redis-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a certificate").expect("write");
        let message = RedisTls::load(Some("rediss://h:1"), Some(&junk), None).expect_err("junk").to_string();
        assert!(message.contains("no certificate in PEM form"), "{message}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_system_roots_are_the_default_trust() {
        let tls = RedisTls::load(Some("rediss://h:1"), None, None).expect("platform roots");
        assert!(tls.is_enabled());
        assert!(tls.certificates().is_some_and(|c| c.root_cert.is_none() && c.client_tls.is_none()));
    }
}
