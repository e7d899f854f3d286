//! Upstreams: groups of servers behind one bulkhead and one connection pool, with load
//! balancing, health checks, a circuit breaker and retries.
//!
//! A request to an upstream passes, in order: the bulkhead and the adaptive concurrency
//! limit, when there is one (503 `upstream_saturated` when full), target selection among the
//! usable targets (503 `no_healthy_target` when there is none), the circuit breaker (503
//! `circuit_open`), then one attempt per try. A failed try is retried, on another target when
//! there is one, only when that is safe: the connection was never made, or the method is
//! idempotent and no answer arrived (or the answer's status is configured as retryable), and
//! the retry budget has room.

mod adaptive;
mod balance;
mod breaker;
mod connect;
mod health;
mod retry;
mod target;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::request::Parts;
use http::uri::{Authority, PathAndQuery};
use http::{HeaderMap, HeaderValue, Request, Response, Version, header};
use http_body_util::LengthLimitError;
use hyper::body::Incoming;

use crate::admission::{Gate, Slot};
use crate::config;
use crate::metrics::{Metrics, UpstreamMetrics};

use adaptive::{AdaptiveLimit, Ticket};
use balance::Balancer;
use breaker::Breaker;
use connect::Addressing;
pub use connect::MAX_NAMES;
pub use retry::{ClientBody, Outgoing, RequestBody};
use retry::{InFlight, Reason, Replay, Retries};
use target::{TargetLease, Targets};

/// A named group of servers sharing one keep-alive connection pool and one bulkhead.
pub struct Upstream {
    pub name: String,
    targets: Arc<Targets>,
    balancer: Balancer,
    bulkhead: Gate,
    adaptive: Option<Arc<AdaptiveLimit>>,
    breaker: Option<Arc<Breaker>>,
    retries: Retries,
    try_timeout: Option<Duration>,
    addressing: Addressing,
    /// Sent as `Host` in place of the client's.
    host_header: Option<HeaderValue>,
    metrics: UpstreamMetrics,
}

/// What a response from an upstream holds on to until its body has been sent on: the
/// bulkhead slot, its place under the adaptive limit, the target's in-flight count and the
/// retry budget's count of requests.
#[derive(Debug)]
pub struct Lease {
    _slot: Slot,
    _ticket: Option<Ticket>,
    target: TargetLease,
    _in_flight: InFlight,
}

/// Why a request got no response from the upstream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("every one of the upstream's {0} request slots is taken")]
    Saturated(u32),
    #[error("the upstream's circuit breaker is open for {}ms more", .0.as_millis())]
    CircuitOpen(Duration),
    #[error("no target of the upstream is healthy")]
    NoHealthyTarget,
    #[error("connecting to {target} failed: {cause}")]
    Connect {
        target: Authority,
        cause: String,
        timed_out: bool,
    },
    /// The target's certificate does not cover the name the request was sent for: the
    /// doing of whoever chose that name (usually the client, by its `Host`), not the target's.
    #[error("{target}'s certificate does not cover the name sent: {cause}")]
    WrongName { target: Authority, cause: String },
    #[error("{target} closed or reset the connection before answering: {cause}")]
    Reset { target: Authority, cause: String },
    #[error("{target} did not answer within {}ms", after.as_millis())]
    Timeout { target: Authority, after: Duration },
    #[error("{target} gave no valid response: {cause}")]
    Response { target: Authority, cause: String },
    #[error("the request body is larger than the gateway accepts")]
    BodyTooLarge,
    #[error("the client's request body broke off or was malformed: {0}")]
    ClientBody(String),
}

/// One try's result, with the target it went to.
type Attempt = Result<(Response<Incoming>, TargetLease), (UpstreamError, Option<usize>)>;

// === impl Upstream ===

impl Upstream {
    /// Builds the upstream and starts its health checks, which end when it is dropped.
    ///
    /// Fails when the TLS settings name files that cannot be used.
    pub fn new(settings: &config::Upstream, metrics: &Metrics) -> anyhow::Result<Upstream> {
        let tls = connect::tls_config(settings)?;
        let metrics = metrics.upstream(&settings.name);
        let targets = Arc::new(Targets::new(settings, &tls, &metrics));
        let addressing = Addressing::new(settings);
        // NB: the config check has parsed it.
        let host_header =
            (settings.host_header.as_deref()).and_then(|host| HeaderValue::from_str(host).ok());
        if let Some(check) = &settings.health_check {
            let host = host_header.as_ref().and_then(authority);
            health::spawn(
                settings.name.clone(),
                Arc::downgrade(&targets),
                check.clone(),
                addressing.clone(),
                host,
            );
        }
        let bulkhead = Gate::new(settings.max_in_flight, 0, Duration::ZERO)
            .with_gauges(metrics.bulkhead.clone());
        Ok(Upstream {
            name: settings.name.clone(),
            balancer: Balancer::new(settings),
            targets,
            bulkhead,
            adaptive: (settings.adaptive_concurrency.as_ref()).map(|adaptive| {
                let gauge = metrics.concurrency_limit();
                Arc::new(AdaptiveLimit::new(adaptive, settings.max_in_flight, gauge))
            }),
            breaker: (settings.circuit_breaker.as_ref())
                .map(|breaker| Arc::new(Breaker::new(breaker, &metrics))),
            retries: Retries::new(&settings.retry),
            try_timeout: settings.try_timeout_ms,
            addressing,
            host_header,
            metrics,
        })
    }

    /// Sends `request` (with its path already final) and returns the first response worth
    /// passing on, retrying failed tries where that is safe.
    ///
    /// `client` is the address consistent hashing may key on; `resend_any_method` lets
    /// requests that are not idempotent be retried after they were sent.
    pub async fn send(
        &self,
        request: Request<Outgoing>,
        client: IpAddr,
        resend_any_method: bool,
    ) -> Result<(Response<Incoming>, Lease), UpstreamError> {
        let slot = self
            .bulkhead
            .try_enter()
            .ok_or(UpstreamError::Saturated(self.bulkhead.capacity()))?;
        let ticket = match &self.adaptive {
            Some(limit) => {
                Some((limit.try_acquire()).ok_or_else(|| UpstreamError::Saturated(limit.limit()))?)
            }
            None => None,
        };
        let in_flight = self.retries.in_flight();
        let (mut parts, body) = request.into_parts();
        if let Some(host) = &self.host_header {
            parts.headers.insert(header::HOST, host.clone());
        }
        let may_resend = self.retries.may_resend(&parts.method, resend_any_method);
        let mut body = self.retries.replay(body).await?;
        let key = self.balancer.key(&parts.headers, client);

        let mut previous = None;
        let mut _place = None;
        for retry in 0.. {
            let last = retry >= self.retries.max_retries() || !body.can_resend();
            let headers = if last {
                std::mem::take(&mut parts.headers)
            } else {
                parts.headers.clone()
            };
            let attempt = self
                .attempt(&parts, headers, &mut body, key, previous)
                .await;
            let reason = self.retry_reason(&attempt, may_resend);
            // A retry holds one place in the budget, from its backoff to its answer.
            _place = None;
            let place = reason.filter(|_| !last).and_then(|reason| {
                let place = self.retries.try_place();
                let counted = if place.is_some() {
                    reason.as_str()
                } else {
                    "budget_exhausted"
                };
                self.metrics.retry(counted);
                place
            });
            let Some(place) = place else {
                return attempt
                    .map(|(response, target)| {
                        let lease = Lease {
                            _slot: slot,
                            _ticket: ticket,
                            target,
                            _in_flight: in_flight,
                        };
                        (response, lease)
                    })
                    .map_err(|(err, _)| err);
            };
            previous = match attempt {
                Ok((_, target)) => Some(target.index()),
                Err((_, target)) => target,
            };
            _place = Some(place);
            tokio::time::sleep(self.retries.backoff(retry + 1)).await;
        }
        unreachable!("the loop returns on its last try")
    }

    /// Sends one try to a target picked by the balancer, avoiding `previous`.
    async fn attempt(
        &self,
        parts: &Parts,
        headers: HeaderMap,
        body: &mut Replay,
        key: Option<u64>,
        previous: Option<usize>,
    ) -> Attempt {
        let index = (self.balancer.pick(&self.targets, key, previous))
            .ok_or((UpstreamError::NoHealthyTarget, None))?;
        let permit = match &self.breaker {
            Some(breaker) => {
                let admitted = breaker.admit();
                Some(admitted.map_err(|open| (UpstreamError::CircuitOpen(open.0), None))?)
            }
            None => None,
        };
        let lease = self.targets.lease(index);
        let pool = &lease.target().pool;
        let target = &lease.target().authority;
        let body = body.next().ok_or_else(|| {
            let err = UpstreamError::ClientBody("the request body was sent already".into());
            (err, None)
        })?;
        let request = self.attempt_request(parts, headers, target, body);

        let started = Instant::now();
        let outcome = match self.try_timeout {
            Some(limit) => match tokio::time::timeout(limit, pool.request(request)).await {
                Ok(result) => result.map_err(|err| classify(&err, target)),
                Err(_) => Err(UpstreamError::Timeout {
                    target: target.clone(),
                    after: limit,
                }),
            },
            None => (pool.request(request).await).map_err(|err| classify(&err, target)),
        };
        if let Some(limit) = &self.adaptive
            && matches!(outcome, Ok(_) | Err(UpstreamError::Timeout { .. }))
        {
            limit.sample(started.elapsed());
        }
        let failed = match &outcome {
            Ok(response) => {
                let status = response.status();
                self.metrics.attempt(status.as_str());
                Some(status.is_server_error())
            }
            Err(err) => {
                let (label, failed) = judge(err);
                self.metrics.attempt(label);
                failed
            }
        };
        if let Some(failed) = failed {
            self.targets.record(index, failed);
            if let Some(permit) = permit {
                permit.record(failed);
            }
        }
        match outcome {
            Ok(response) => Ok((response, lease)),
            Err(err) => Err((err, Some(index))),
        }
    }

    /// Why this try should be sent again, if it should.
    fn retry_reason(&self, attempt: &Attempt, may_resend: bool) -> Option<Reason> {
        let reason = match attempt {
            Ok((response, _)) if self.retries.retries_status(response.status()) => Reason::Status,
            Ok(_) => return None,
            Err((UpstreamError::Connect { .. }, _)) => return Some(Reason::ConnectFailed),
            Err((UpstreamError::Reset { .. }, _)) => Reason::Reset,
            Err((UpstreamError::Timeout { .. }, _)) => Reason::Timeout,
            Err(_) => return None,
        };
        may_resend.then_some(reason)
    }

    fn attempt_request(
        &self,
        parts: &Parts,
        headers: HeaderMap,
        target: &Authority,
        body: RequestBody,
    ) -> Request<RequestBody> {
        let path = (parts.uri.path_and_query().cloned()).unwrap_or(PathAndQuery::from_static("/"));
        let host = headers.get(header::HOST).and_then(authority);
        let mut request = Request::new(body);
        *request.method_mut() = parts.method.clone();
        *request.uri_mut() = self.addressing.uri(target, host, path);
        // The pool picks the version it speaks to the target, whatever the client spoke.
        *request.version_mut() = Version::HTTP_11;
        *request.headers_mut() = headers;
        request
    }
}

// === impl Lease ===

impl Lease {
    /// The target the response came from.
    pub fn target(&self) -> &Authority {
        &self.target.target().authority
    }
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .field("targets", &self.targets.list)
            .finish()
    }
}

/// A `Host` value as a URI authority, if it is one.
fn authority(host: &HeaderValue) -> Option<Authority> {
    Authority::try_from(host.as_bytes()).ok()
}

/// The metric label of a failed try, and whether it counts as the target failing (`None`
/// when the client, not the target, is to blame).
fn judge(err: &UpstreamError) -> (&'static str, Option<bool>) {
    match err {
        UpstreamError::Connect {
            timed_out: true, ..
        } => ("connect_timeout", Some(true)),
        UpstreamError::Connect { .. } => ("connect_failed", Some(true)),
        UpstreamError::Reset { .. } => ("reset", Some(true)),
        UpstreamError::Timeout { .. } => ("timeout", Some(true)),
        UpstreamError::Response { .. } => ("bad_response", Some(true)),
        UpstreamError::WrongName { .. } => ("wrong_name", None),
        _ => ("client_error", None),
    }
}

/// Sorts a failed try by what went wrong and whose doing it was.
fn classify(err: &hyper_util::client::legacy::Error, target: &Authority) -> UpstreamError {
    let target = target.clone();
    let cause = root_cause(err);
    if caused_by::<LengthLimitError>(err) {
        UpstreamError::BodyTooLarge
    } else if causes(err).any(is_body_error) {
        // The body being sent failed: that is the client's doing, not the upstream's.
        UpstreamError::ClientBody(cause)
    } else if causes(err).any(is_wrong_name) {
        UpstreamError::WrongName { target, cause }
    } else if err.is_connect() {
        let timed_out = causes(err)
            .filter_map(|cause| cause.downcast_ref::<std::io::Error>())
            .any(|io| io.kind() == std::io::ErrorKind::TimedOut);
        UpstreamError::Connect {
            target,
            cause,
            timed_out,
        }
    } else if causes(err).any(is_reset) {
        UpstreamError::Reset { target, cause }
    } else {
        UpstreamError::Response { target, cause }
    }
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

/// A TLS handshake failed because the certificate is for other names.
fn is_wrong_name(err: &(dyn std::error::Error + 'static)) -> bool {
    use rustls::CertificateError::{NotValidForName, NotValidForNameContext};
    // The TLS error travels wrapped in I/O errors, which do not name it as their source.
    let mut err = err;
    while let Some(inner) = (err.downcast_ref::<std::io::Error>()).and_then(|io| io.get_ref()) {
        err = inner;
    }
    let rustls = err.downcast_ref::<rustls::Error>();
    matches!(
        rustls,
        Some(rustls::Error::InvalidCertificate(
            NotValidForName | NotValidForNameContext { .. }
        ))
    )
}

/// The connection ended before an answer: closed, reset, or cut mid-way.
fn is_reset(err: &(dyn std::error::Error + 'static)) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    if let Some(err) = err.downcast_ref::<hyper::Error>() {
        return err.is_incomplete_message() || err.is_canceled() || err.is_closed();
    }
    err.downcast_ref::<std::io::Error>().is_some_and(|io| {
        matches!(
            io.kind(),
            ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
        )
    })
}
