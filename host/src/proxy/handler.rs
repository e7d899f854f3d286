//! The life of one request: route, request policies, upstream, response policies.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;

use super::body::Guarded;
use super::headers::{set_forwarded, strip_hop_by_hop};
use super::path::{self, PathError};
use super::{Body, Route};
use crate::admission::Refused;
use crate::config::OnError;
use crate::gateway::Snapshot;
use crate::llm::LlmError;
use crate::metrics::Metrics;
use crate::plugin::{
    Header, Plugin, PluginFailure, RequestDecision, RequestHead, ResponseHead,
    apply_header_changes, direct_response, rewrite_path,
};
use crate::upstream::{Lease, Outgoing, UpstreamError};

/// What the request phase of a route's policies decided.
#[expect(
    clippy::large_enum_variant,
    reason = "made and moved once per request; boxing would only add an allocation"
)]
enum Outcome {
    Forward(Parts, RequestHead),
    Answer(Response<Body>),
}

/// Names the plugin whose failure the gateway answered for.
const PLUGIN_HEADER: &str = "x-sluice-plugin";

/// Why the gateway answered a request itself rather than with an upstream response.
#[derive(Debug)]
enum Rejection {
    QueueFull,
    QueueTimeout,
    RequestTimeout,
    BodyTooLarge,
    Upstream(UpstreamError),
    /// An LLM request over its consumer's or its providers' budget; retry after this long.
    TokenBudget(&'static str, Duration),
    ClientBody(String),
}

impl From<LlmError> for Rejection {
    fn from(err: LlmError) -> Self {
        match err {
            LlmError::ConsumerBudget(wait) => Rejection::TokenBudget("consumer_budget", wait),
            LlmError::ProviderBudget(wait) => Rejection::TokenBudget("provider_budget", wait),
            LlmError::BodyTooLarge => Rejection::BodyTooLarge,
            LlmError::ClientBody(err) => Rejection::ClientBody(err),
            LlmError::Upstream(UpstreamError::BodyTooLarge) => Rejection::BodyTooLarge,
            LlmError::Upstream(err) => Rejection::Upstream(err),
        }
    }
}

/// Serves one request with the configuration snapshot it arrived under.
///
/// The snapshot, the route's admission slot and the upstream's bulkhead slot stay with the
/// response body until its last byte is sent, so in-flight counts cover streaming responses
/// and a request finishes on the configuration it started with.
pub async fn handle(
    snapshot: Arc<Snapshot>,
    metrics: &Metrics,
    request: Request<Incoming>,
    client: SocketAddr,
) -> Response<Body> {
    let started = Instant::now();
    let mut request = request;
    if let Err(reason) = normalize_path(&mut request) {
        let response = error_response(StatusCode::BAD_REQUEST, reason);
        metrics.request("", response.status(), started.elapsed().as_secs_f64());
        return response;
    }
    let host = request_host(&request);
    let host = host.as_ref().and_then(|h| h.to_str().ok());
    let Some(route) = snapshot.router.find(host, request.uri().path()) else {
        let response = error_response(StatusCode::NOT_FOUND, "no_route");
        metrics.request("", response.status(), started.elapsed().as_secs_f64());
        return response;
    };

    let admitted = route.admission.enter().await;
    route
        .metrics
        .queue_wait
        .observe(started.elapsed().as_secs_f64());
    let response = match admitted {
        Err(Refused::QueueFull) => Rejection::QueueFull.respond(route, metrics),
        Err(Refused::QueueTimeout) => Rejection::QueueTimeout.respond(route, metrics),
        Ok(route_slot) => {
            let proxied = proxy(route, metrics, request, client, snapshot.max_body_bytes);
            match tokio::time::timeout(route.request_timeout, proxied).await {
                Ok(Ok((response, upstream_lease))) => {
                    if response.headers().contains_key(PLUGIN_HEADER) {
                        metrics.rejected(&route.name, "policy_failed");
                    }
                    let held = (route_slot, upstream_lease, snapshot.clone());
                    response.map(|body| Guarded::new(body, held).boxed())
                }
                Ok(Err(rejection)) => rejection.respond(route, metrics),
                Err(_) => Rejection::RequestTimeout.respond(route, metrics),
            }
        }
    };
    metrics.request(
        &route.name,
        response.status(),
        started.elapsed().as_secs_f64(),
    );
    response
}

/// Runs the route's policies and forwards the request; the upstream's bulkhead slot comes
/// back with the response when it came from the upstream.
async fn proxy(
    route: &Route,
    metrics: &Metrics,
    request: Request<Incoming>,
    client: SocketAddr,
    max_body_bytes: u64,
) -> Result<(Response<Body>, Option<Lease>), Rejection> {
    if declared_length(request.headers()).is_some_and(|length| length > max_body_bytes) {
        return Err(Rejection::BodyTooLarge);
    }
    let host = request_host(&request);
    let (mut parts, body) = request.into_parts();
    if let Some(host) = &host {
        // HTTP/2 clients send `:authority` instead; the upstream speaks HTTP/1.1 and needs Host.
        parts.headers.insert(header::HOST, host.clone());
    }
    strip_hop_by_hop(&mut parts.headers);
    if route.llm.is_some() {
        // Only the route's policies may replace the token estimate.
        parts.headers.remove(crate::llm::ESTIMATE_HEADER);
    }
    set_forwarded(&mut parts.headers, client.ip(), host.as_ref());

    let (parts, head) = match request_phase(route, parts, client).await {
        Outcome::Forward(parts, head) => (parts, head),
        Outcome::Answer(response) => {
            if response.status() == StatusCode::TOO_MANY_REQUESTS {
                metrics.rejected(&route.name, "rate_limited");
            }
            return Ok((response, None));
        }
    };

    let (response, lease) = match &route.llm {
        Some(llm) if llm.applies(&parts) => {
            let sent = llm.forward(&route.name, &route.upstream, parts, body, client.ip());
            sent.await.map_err(Rejection::from)?
        }
        _ => {
            let body = Limited::new(body, usize::try_from(max_body_bytes).unwrap_or(usize::MAX));
            let request = Request::from_parts(parts, Outgoing::Streamed(body));
            let upstream = (route.upstream)
                .send(request, client.ip(), route.retry_non_idempotent)
                .await;
            let (response, lease) = upstream.map_err(|err| match err {
                UpstreamError::BodyTooLarge => Rejection::BodyTooLarge,
                err => Rejection::Upstream(err),
            })?;
            (response.map(|body| body.map_err(Into::into).boxed()), lease)
        }
    };
    Ok((response_phase(route, &head, response).await, Some(lease)))
}

/// Runs each policy's request phase in order, applying its changes before the next one.
async fn request_phase(route: &Route, mut parts: Parts, client: SocketAddr) -> Outcome {
    if route.policies.is_empty() {
        // Nothing will read the head: skip copying every header into it.
        let head = RequestHead {
            method: String::new(),
            path_and_query: String::new(),
            headers: Vec::new(),
            client_addr: String::new(),
            route: String::new(),
        };
        return Outcome::Forward(parts, head);
    }
    let mut head = request_head(&parts, &route.name, client);
    for plugin in &route.policies {
        let decision = plugin
            .on_request(&head)
            .await
            .and_then(|decision| match decision {
                RequestDecision::Continue(changes) => apply_request_changes(&mut parts, changes)
                    .map(|()| None)
                    .map_err(PluginFailure::from),
                RequestDecision::Respond(reply) => Ok(Some(direct_response(reply)?)),
            });
        match decision {
            Ok(None) => head = request_head(&parts, &route.name, client),
            Ok(Some(reply)) => return Outcome::Answer(reply),
            Err(failure) => {
                if let Some(response) = plugin_failed(plugin, failure) {
                    return Outcome::Answer(response);
                }
            }
        }
    }
    Outcome::Forward(parts, head)
}

/// Runs each policy's response phase, in reverse order, on the upstream's response.
async fn response_phase(
    route: &Route,
    request: &RequestHead,
    response: Response<Body>,
) -> Response<Body> {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);

    for plugin in route.policies.iter().rev() {
        let head = ResponseHead {
            status: parts.status.as_u16(),
            headers: wit_headers(&parts.headers),
        };
        let changed = plugin
            .on_response(request, &head)
            .await
            .and_then(|changes| {
                apply_header_changes(&mut parts.headers, changes).map_err(PluginFailure::from)
            });
        if let Err(failure) = changed
            && let Some(response) = plugin_failed(plugin, failure)
        {
            return response;
        }
    }
    Response::from_parts(parts, body)
}

fn apply_request_changes(
    parts: &mut Parts,
    changes: crate::plugin::RequestChanges,
) -> Result<(), crate::plugin::InvalidMutation> {
    let path = changes
        .path_and_query
        .as_deref()
        .map(rewrite_path)
        .transpose()?;
    apply_header_changes(&mut parts.headers, changes.headers)?;
    if let Some(path) = path {
        parts.uri = http::Uri::from(path);
    }
    Ok(())
}

/// Applies the plugin's failure policy: the response to send for `deny`, or `None` to skip
/// the plugin for `allow`.
fn plugin_failed(plugin: &Plugin, failure: PluginFailure) -> Option<Response<Body>> {
    plugin.failed(failure);
    match plugin.on_error() {
        OnError::Allow => None,
        OnError::Deny => {
            let mut response = error_response(StatusCode::SERVICE_UNAVAILABLE, "policy_failed");
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            response
                .headers_mut()
                .insert(PLUGIN_HEADER, header_value(plugin.name()));
            Some(response)
        }
    }
}

impl Rejection {
    fn respond(self, route: &Route, metrics: &Metrics) -> Response<Body> {
        let (status, reason) = self.status_and_reason();
        metrics.rejected(&route.name, reason);
        match &self {
            Rejection::Upstream(UpstreamError::ClientBody(err)) | Rejection::ClientBody(err) => {
                tracing::debug!(route = &*route.name, reason, "client body failed: {err}");
            }
            Rejection::Upstream(err) => {
                tracing::warn!(route = &*route.name, upstream = %route.upstream.name, reason, "upstream failed: {err}");
            }
            _ => tracing::debug!(route = &*route.name, reason, "request rejected"),
        }
        let mut response = error_response(status, reason);
        if let Rejection::TokenBudget(_, wait) = &self {
            let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            // Every 503 the gateway makes is about load that passes: ask clients to come back.
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }

    fn status_and_reason(&self) -> (StatusCode, &'static str) {
        match self {
            Rejection::QueueFull => (StatusCode::SERVICE_UNAVAILABLE, "queue_full"),
            Rejection::QueueTimeout => (StatusCode::SERVICE_UNAVAILABLE, "queue_timeout"),
            Rejection::RequestTimeout => (StatusCode::GATEWAY_TIMEOUT, "request_timeout"),
            Rejection::BodyTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
            Rejection::TokenBudget(reason, _) => (StatusCode::TOO_MANY_REQUESTS, reason),
            Rejection::ClientBody(_) => (StatusCode::BAD_REQUEST, "client_body_error"),
            Rejection::Upstream(err) => match err {
                UpstreamError::Saturated(_) => {
                    (StatusCode::SERVICE_UNAVAILABLE, "upstream_saturated")
                }
                UpstreamError::CircuitOpen => (StatusCode::SERVICE_UNAVAILABLE, "circuit_open"),
                UpstreamError::NoHealthyTarget => {
                    (StatusCode::SERVICE_UNAVAILABLE, "no_healthy_target")
                }
                UpstreamError::Connect {
                    timed_out: true, ..
                } => (StatusCode::GATEWAY_TIMEOUT, "upstream_connect_timeout"),
                UpstreamError::Connect { .. } => (StatusCode::BAD_GATEWAY, "upstream_unavailable"),
                UpstreamError::Reset { .. } => (StatusCode::BAD_GATEWAY, "upstream_reset"),
                UpstreamError::Timeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout"),
                UpstreamError::Response { .. } => {
                    (StatusCode::BAD_GATEWAY, "upstream_bad_response")
                }
                UpstreamError::BodyTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
                UpstreamError::ClientBody(_) => (StatusCode::BAD_REQUEST, "client_body_error"),
            },
        }
    }
}

/// Resolves dot segments in the request's path, so that routes, policies and the upstream
/// all see the same path; the reason to answer 400 when the path is refused.
fn normalize_path(request: &mut Request<Incoming>) -> Result<(), &'static str> {
    let uri = request.uri();
    let normalized = match path::normalize(uri.path()) {
        Ok(Cow::Borrowed(_)) => return Ok(()),
        Ok(Cow::Owned(normalized)) => normalized,
        Err(PathError::EncodedSlash) => {
            tracing::debug!(path = uri.path(), "refused a path with an encoded slash");
            return Err("encoded_slash");
        }
    };
    let path_and_query = match uri.query() {
        Some(query) => format!("{normalized}?{query}"),
        None => normalized,
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = path_and_query.parse().ok();
    match http::Uri::from_parts(parts) {
        Ok(uri) => {
            *request.uri_mut() = uri;
            Ok(())
        }
        Err(_) => Err("invalid_path"),
    }
}

/// The `Content-Length` a request declares, if it declares exactly one valid one.
fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// A small JSON error that names the reason, so clients and operators can tell causes apart.
pub fn error_response(status: StatusCode, reason: &str) -> Response<Body> {
    let body = serde_json::json!({ "error": reason }).to_string();
    let mut response = Response::new(Full::new(Bytes::from(body)).map_err(|e| match e {}).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn request_host(request: &Request<Incoming>) -> Option<HeaderValue> {
    match request.headers().get(header::HOST) {
        Some(host) => Some(host.clone()),
        None => request
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
    }
}

fn request_head(parts: &Parts, route: &str, client: SocketAddr) -> RequestHead {
    RequestHead {
        method: parts.method.as_str().to_string(),
        path_and_query: parts
            .uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_string(),
        headers: wit_headers(&parts.headers),
        client_addr: client.ip().to_string(),
        route: route.to_string(),
    }
}

fn wit_headers(headers: &HeaderMap) -> Vec<Header> {
    headers
        .iter()
        .map(|(name, value)| Header {
            name: name.as_str().to_string(),
            value: value.as_bytes().to_vec(),
        })
        .collect()
}

fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}
