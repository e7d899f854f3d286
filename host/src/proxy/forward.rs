//! Upstreams: their targets, their connection pool, and sending a request to one of them.

use std::error::Error as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config;

/// A named group of servers sharing one keep-alive connection pool.
pub struct Upstream {
    pub name: String,
    targets: Vec<Authority>,
    next: AtomicUsize,
    client: Client<HttpConnector, Incoming>,
}

/// Why a request got no response from the upstream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to {target} failed: {cause}")]
    Connect {
        target: Authority,
        cause: String,
        timed_out: bool,
    },
    #[error("{target} gave no valid response: {cause}")]
    Response { target: Authority, cause: String },
    #[error("{target} did not answer within {timeout:?}")]
    Timeout {
        target: Authority,
        timeout: Duration,
    },
}

impl Upstream {
    pub fn new(settings: &config::Upstream) -> Upstream {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(settings.connect_timeout_ms));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(settings.idle_timeout_ms)
            .build(connector);
        Upstream {
            name: settings.name.clone(),
            // NB: the config check has already parsed every target as an authority.
            targets: settings
                .targets
                .iter()
                .filter_map(|t| t.parse().ok())
                .collect(),
            next: AtomicUsize::new(0),
            client,
        }
    }

    /// Sends `request` (with its path already final) to the next target, round robin.
    pub async fn send(
        &self,
        mut request: Request<Incoming>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let target = self.pick();
        let path = request
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or(PathAndQuery::from_static("/"));
        *request.uri_mut() = upstream_uri(&target, path);
        // The pool speaks HTTP/1.1 to upstreams whatever the client spoke to the gateway.
        *request.version_mut() = Version::HTTP_11;

        match tokio::time::timeout(timeout, self.client.request(request)).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(err)) if err.is_connect() => Err(UpstreamError::Connect {
                timed_out: is_timeout(&err),
                cause: root_cause(&err),
                target,
            }),
            Ok(Err(err)) => Err(UpstreamError::Response {
                cause: root_cause(&err),
                target,
            }),
            Err(_) => Err(UpstreamError::Timeout { target, timeout }),
        }
    }

    fn pick(&self) -> Authority {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.targets.len();
        self.targets[index].clone()
    }
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .field("targets", &self.targets)
            .finish()
    }
}

fn upstream_uri(target: &Authority, path: PathAndQuery) -> Uri {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(target.clone());
    parts.path_and_query = Some(path);
    // NB: scheme, authority and path are each valid, so the URI is too.
    Uri::from_parts(parts).unwrap_or_default()
}

fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = err;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

fn is_timeout(err: &hyper_util::client::legacy::Error) -> bool {
    let mut cause = err.source();
    while let Some(err) = cause {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return io.kind() == std::io::ErrorKind::TimedOut;
        }
        cause = err.source();
    }
    false
}
