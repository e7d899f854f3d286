//! Connections to one target: TCP, TLS when the upstream asks for it, and the HTTP version.
//!
//! Each target has its own pool. Its connector always dials the target's address, whatever
//! host the request's URI names, so the URI is free to carry the host the request is meant
//! for. That host is what HTTP/2 sends as `:authority` and what TLS sends as SNI and
//! verifies, and it keys the pool, so a connection verified for one name never carries a
//! request for another.
//!
//! The host comes from the client when the upstream fixes neither `host_header` nor
//! `server_name`, so a target keeps pools for at most [`MAX_NAMES`] hosts besides its own
//! address: past that, the least recently used is dropped with its idle connections. A client
//! sending a new `Host` with every request costs a handshake each time, not memory that grows
//! until the connections' idle timeout.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Uri};
use hyper_rustls::{FixedServerNameResolver, HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Builder, Client, ResponseFuture};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tower_service::Service;

use super::RequestBody;
use crate::config::{self, Protocol};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Hosts a target keeps connection pools for, besides its own address.
pub const MAX_NAMES: usize = 100;

type Pooled = Client<Connector, RequestBody>;

/// A target's connection pools: one for requests addressed to the target itself, and one per
/// host name requests are addressed by (see the module's description).
pub struct Pool {
    target: Authority,
    builder: Builder,
    connector: Connector,
    own: Pooled,
    by_name: Mutex<Names>,
}

/// The pools for host names, each with when it was last used.
#[derive(Default)]
struct Names {
    pools: HashMap<Authority, (Pooled, u64)>,
    uses: u64,
}

/// How an upstream's requests are addressed, shared by the pools of all its targets.
#[derive(Debug, Clone)]
pub struct Addressing {
    scheme: Scheme,
    /// Whether the URI names the request's host (see the module's description) rather than
    /// the target: HTTP/2 needs it for `:authority`, and TLS for the server name unless that
    /// is fixed.
    by_host: bool,
}

/// Opens a connection to one target: TCP within the connect timeout, then the TLS handshake
/// within what is left of it.
#[derive(Clone)]
pub struct Connector {
    inner: HttpsConnector<ToTarget>,
    timeout: Duration,
}

/// Dials one address, whatever the URI it is given.
#[derive(Clone)]
pub struct ToTarget {
    http: HttpConnector,
    target: Uri,
}

// === impl Addressing ===

impl Addressing {
    pub fn new(settings: &config::Upstream) -> Addressing {
        let fixed_name = settings
            .tls
            .as_ref()
            .is_none_or(|tls| tls.server_name.is_some());
        Addressing {
            scheme: match settings.tls {
                Some(_) => Scheme::HTTPS,
                None => Scheme::HTTP,
            },
            by_host: settings.protocol != Protocol::Http1 || !fixed_name,
        }
    }

    /// The URI of a request for `host` (the `Host` sent upstream, if valid) to `target`.
    pub fn uri(&self, target: &Authority, host: Option<Authority>, path: PathAndQuery) -> Uri {
        let authority = match host {
            Some(host) if self.by_host => host,
            _ => target.clone(),
        };
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(authority);
        parts.path_and_query = Some(path);
        // NB: as in `plain_uri`.
        Uri::from_parts(parts).unwrap_or_default()
    }
}

/// The TLS settings every target of an upstream shares. Without `tls` it trusts no one, and
/// is never used: the upstream's URIs are all `http`.
pub fn tls_config(settings: &config::Upstream) -> anyhow::Result<Arc<ClientConfig>> {
    let roots = match settings.tls.as_ref().map(|tls| &tls.ca_file) {
        Some(Some(path)) => roots_from(path)?,
        Some(None) => RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        },
        None => RootCertStore::empty(),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The pool of connections to `target`.
pub fn pool(settings: &config::Upstream, tls: &ClientConfig, target: &Authority) -> Pool {
    let mut http = HttpConnector::new();
    // The TLS layer is in charge of `https` URIs: plain TCP here whatever the scheme.
    http.enforce_http(false);
    http.set_nodelay(true);
    let to_target = ToTarget {
        http,
        target: plain_uri(target, PathAndQuery::from_static("/")),
    };
    let connector = Connector {
        inner: https(settings, tls, to_target),
        timeout: settings.connect_timeout_ms,
    };
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(settings.idle_timeout_ms)
        // With TLS, ALPN decides; in clear text only prior knowledge can.
        .http2_only(settings.protocol == Protocol::Http2);
    Pool {
        target: target.clone(),
        own: builder.build(connector.clone()),
        builder,
        connector,
        by_name: Mutex::default(),
    }
}

// === impl Pool ===

impl Pool {
    /// Sends `request` on a connection for the host its URI names.
    pub fn request(&self, request: Request<RequestBody>) -> ResponseFuture {
        match request.uri().authority() {
            Some(name) if *name != self.target => self.for_name(name).request(request),
            _ => self.own.request(request),
        }
    }

    /// The pool for `name`, made if there is none; the least recently used one goes when
    /// there are too many.
    fn for_name(&self, name: &Authority) -> Pooled {
        // A poisoned lock only means a panic while the map was consistent: keep using it.
        let mut names = self.by_name.lock().unwrap_or_else(|e| e.into_inner());
        names.uses += 1;
        let now = names.uses;
        if let Some((pool, used)) = names.pools.get_mut(name) {
            *used = now;
            return pool.clone();
        }
        if names.pools.len() >= MAX_NAMES {
            let oldest = names.pools.iter().min_by_key(|(_, (_, used))| *used);
            if let Some(oldest) = oldest.map(|(name, _)| name.clone()) {
                names.pools.remove(&oldest);
            }
        }
        let pool = self.builder.build(self.connector.clone());
        names.pools.insert(name.clone(), (pool.clone(), now));
        pool
    }
}

fn https(
    settings: &config::Upstream,
    tls: &ClientConfig,
    to_target: ToTarget,
) -> HttpsConnector<ToTarget> {
    let builder = HttpsConnectorBuilder::new()
        .with_tls_config(tls.clone())
        .https_or_http();
    let name = (settings.tls.as_ref())
        .and_then(|tls| tls.server_name.as_deref())
        // NB: the config check has parsed it.
        .and_then(|name| ServerName::try_from(name.to_string()).ok());
    match (name, settings.protocol) {
        (Some(name), Protocol::Http1) => builder
            .with_server_name_resolver(FixedServerNameResolver::new(name))
            .enable_http1()
            .wrap_connector(to_target),
        (Some(name), Protocol::Http2) => builder
            .with_server_name_resolver(FixedServerNameResolver::new(name))
            .enable_http2()
            .wrap_connector(to_target),
        (Some(name), Protocol::Auto) => builder
            .with_server_name_resolver(FixedServerNameResolver::new(name))
            .enable_all_versions()
            .wrap_connector(to_target),
        (None, Protocol::Http1) => builder.enable_http1().wrap_connector(to_target),
        (None, Protocol::Http2) => builder.enable_http2().wrap_connector(to_target),
        (None, Protocol::Auto) => builder.enable_all_versions().wrap_connector(to_target),
    }
}

/// `http://target/path`.
fn plain_uri(target: &Authority, path: PathAndQuery) -> Uri {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(target.clone());
    parts.path_and_query = Some(path);
    // NB: scheme, authority and path are each valid, so the URI is too.
    Uri::from_parts(parts).unwrap_or_default()
}

fn roots_from(path: &Path) -> anyhow::Result<RootCertStore> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| {
            format!(
                "tls.ca_file: cannot read certificates from {}",
                path.display()
            )
        })?;
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        anyhow::bail!("tls.ca_file: no usable certificate in {}", path.display());
    }
    Ok(roots)
}

// === impl Connector ===

impl Service<Uri> for Connector {
    type Response = hyper_rustls::MaybeHttpsStream<TokioIo<TcpStream>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, connecting).await {
                Ok(connected) => connected,
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no connection within {}ms", timeout.as_millis()),
                )
                .into()),
            }
        })
    }
}

// === impl ToTarget ===

impl Service<Uri> for ToTarget {
    type Response = <HttpConnector as Service<Uri>>::Response;
    type Error = <HttpConnector as Service<Uri>>::Error;
    type Future = <HttpConnector as Service<Uri>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.http.poll_ready(cx)
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        self.http.call(self.target.clone())
    }
}
