//! TLS on the public listener, with rustls: the certificate chain and key come from PEM
//! files, ALPN offers `h2` and `http/1.1`, and the files are read again when they change.
//!
//! Certificates are renewed on disk (certbot, cert-manager, a Kubernetes secret's symlink
//! swap) while the gateway runs, so the listener looks at the files every few seconds and,
//! when either changed, loads the pair and uses it for new handshakes. A pair that does not
//! load (half written, a key that does not match) is logged and the previous one stays.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

use crate::config;

/// How often the certificate and key files are checked for changes.
const CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// The certificate in use, replaced when its files change.
#[derive(Debug)]
struct ReloadingCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<CertifiedKey>,
}

/// What identifies one version of the files: their modification times and sizes.
type Stamp = Option<[(SystemTime, u64); 2]>;

/// A TLS acceptor for the listener's settings; starts the task that watches the files.
pub fn acceptor(settings: &config::Tls) -> anyhow::Result<TlsAcceptor> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let first = load(&settings.cert_path, &settings.key_path, &provider)?;
    let cert = Arc::new(ReloadingCert {
        cert_path: settings.cert_path.clone(),
        key_path: settings.key_path.clone(),
        provider: provider.clone(),
        current: ArcSwap::from_pointee(first),
    });
    tokio::spawn(watch(Arc::downgrade(&cert)));

    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Checks that the configured certificate and key load and belong together.
pub fn check(settings: &config::Tls) -> anyhow::Result<()> {
    let provider = rustls::crypto::ring::default_provider();
    load(&settings.cert_path, &settings.key_path, &provider).map(drop)
}

/// Reads a certificate chain and its private key, checking that they belong together.
fn load(
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> anyhow::Result<CertifiedKey> {
    let chain = CertificateDer::pem_file_iter(cert_path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|err| {
            anyhow::anyhow!(
                "cannot read certificates from {}: {err}",
                cert_path.display()
            )
        })?;
    if chain.is_empty() {
        anyhow::bail!("no certificate in {}", cert_path.display());
    }
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|err| {
        anyhow::anyhow!(
            "cannot read a private key from {}: {err}",
            key_path.display()
        )
    })?;
    CertifiedKey::from_der(chain, key, provider).map_err(|err| {
        anyhow::anyhow!(
            "{} and {} do not make a certificate: {err}",
            cert_path.display(),
            key_path.display()
        )
    })
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl ReloadingCert {
    fn stamp(&self) -> Stamp {
        let stamp = |path: &Path| {
            let metadata = std::fs::metadata(path).ok()?;
            Some((metadata.modified().ok()?, metadata.len()))
        };
        Some([stamp(&self.cert_path)?, stamp(&self.key_path)?])
    }

    fn reload(&self) {
        match load(&self.cert_path, &self.key_path, &self.provider) {
            Ok(loaded) => {
                self.current.store(Arc::new(loaded));
                tracing::info!(cert = %self.cert_path.display(), "TLS certificate reloaded");
            }
            Err(err) => {
                tracing::warn!("TLS certificate not reloaded, the previous one stays: {err:#}")
            }
        }
    }
}

/// Reloads the certificate whenever its files change, for as long as the listener lives.
async fn watch(cert: std::sync::Weak<ReloadingCert>) {
    let first = cert.clone();
    let first = tokio::task::spawn_blocking(move || first.upgrade().and_then(|c| c.stamp()));
    let mut loaded = first.await.ok().flatten();
    let mut every = tokio::time::interval(CHECK_INTERVAL);
    loop {
        every.tick().await;
        let Some(cert) = cert.upgrade() else {
            return;
        };
        // The file system may be slow (a network mount): block a thread of the blocking
        // pool, never a worker that serves requests.
        let checked = tokio::task::spawn_blocking(move || {
            let now = cert.stamp();
            if now.is_some() && now != loaded {
                cert.reload();
                return now;
            }
            loaded
        });
        match checked.await {
            Ok(now) => loaded = now,
            Err(err) => tracing::warn!("TLS certificate check failed: {err}"),
        }
    }
}
