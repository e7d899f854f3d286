//! Upstreams: their targets, bulkhead and connection pool, and sending a request to them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version};
use http_body_util::{LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::admission::{Gate, Slot};
use crate::config;
use crate::metrics::Metrics;

/// A request body on its way upstream, cut off past the gateway's size limit.
pub type RequestBody = Limited<super::body::Counted<Incoming>>;

/// A named group of servers sharing one keep-alive connection pool and one bulkhead.
pub struct Upstream {
    pub name: String,
    targets: Vec<Authority>,
    next: AtomicUsize,
    bulkhead: Gate,
    client: Client<HttpConnector, RequestBody>,
}

/// Why a request got no response from the upstream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("every one of the upstream's {0} request slots is taken")]
    Saturated(u32),
    #[error("connecting to {target} failed: {cause}")]
    Connect {
        target: Authority,
        cause: String,
        timed_out: bool,
    },
    #[error("{target} gave no valid response: {cause}")]
    Response { target: Authority, cause: String },
    #[error("the request body is larger than the gateway accepts")]
    BodyTooLarge,
    #[error("the client's request body broke off or was malformed: {0}")]
    ClientBody(String),
}

impl Upstream {
    pub fn new(settings: &config::Upstream, metrics: &Metrics) -> Upstream {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(settings.connect_timeout_ms));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(settings.idle_timeout_ms)
            .build(connector);
        let bulkhead = Gate::new(settings.max_in_flight, 0, Duration::ZERO)
            .with_gauges(metrics.upstream(&settings.name));
        Upstream {
            name: settings.name.clone(),
            // NB: the config check has already parsed every target as an authority.
            targets: settings
                .targets
                .iter()
                .filter_map(|t| t.parse().ok())
                .collect(),
            next: AtomicUsize::new(0),
            bulkhead,
            client,
        }
    }

    /// Sends `request` (with its path already final) to the next target, round robin.
    ///
    /// The returned slot of the upstream's bulkhead must be held until the response body
    /// has been sent on.
    pub async fn send(
        &self,
        mut request: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Slot), UpstreamError> {
        let slot = self
            .bulkhead
            .try_enter()
            .ok_or(UpstreamError::Saturated(self.bulkhead.capacity()))?;
        let target = self.pick();
        let path = request
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or(PathAndQuery::from_static("/"));
        *request.uri_mut() = upstream_uri(&target, path);
        // The pool speaks HTTP/1.1 to upstreams whatever the client spoke to the gateway.
        *request.version_mut() = Version::HTTP_11;

        match self.client.request(request).await {
            Ok(response) => Ok((response, slot)),
            Err(err) if caused_by::<LengthLimitError>(&err) => Err(UpstreamError::BodyTooLarge),
            // The body being sent failed: that is the client's doing, not the upstream's.
            Err(err) if causes(&err).any(is_body_error) => {
                Err(UpstreamError::ClientBody(root_cause(&err)))
            }
            Err(err) if err.is_connect() => Err(UpstreamError::Connect {
                timed_out: caused_by_timeout(&err),
                cause: root_cause(&err),
                target,
            }),
            Err(err) => Err(UpstreamError::Response {
                cause: root_cause(&err),
                target,
            }),
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

fn causes<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(err), |&err| err.source())
}

fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    causes(err)
        .last()
        .map(ToString::to_string)
        .unwrap_or_default()
}

fn caused_by<E: std::error::Error + 'static>(err: &(dyn std::error::Error + 'static)) -> bool {
    causes(err).any(|cause| cause.is::<E>())
}

fn is_body_error(err: &(dyn std::error::Error + 'static)) -> bool {
    err.downcast_ref::<hyper::Error>()
        .is_some_and(hyper::Error::is_user)
}

fn caused_by_timeout(err: &(dyn std::error::Error + 'static)) -> bool {
    causes(err)
        .filter_map(|cause| cause.downcast_ref::<std::io::Error>())
        .any(|io| io.kind() == std::io::ErrorKind::TimedOut)
}
