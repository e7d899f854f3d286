//! The life of one request: identify it, route it, run the request policies, forward it
//! upstream, run the response policies, and log it once its response has been sent.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;

use super::body::{Counted, Guarded, Logged, Unsized};
use super::forwarded::Peer;
use super::headers::{strip_request_hop_by_hop, strip_response_hop_by_hop};
use super::host;
use super::identity::{self, Identity, X_REQUEST_ID};
use super::path::{self, PathError};
use super::upgrade::{self, Upgrade};
use super::{Body, Route};
use crate::access_log::{AccessLog, Entry, Unanswered, millis};
use crate::admission::Refused;
use crate::config::{EncodedSlash, OnError};
use crate::gateway::Snapshot;
use crate::llm::LlmError;
use crate::metrics::Metrics;
use crate::plugin::{
    HeaderList, Phase, Plugin, PluginFailure, RequestDecision, RequestHead, ResponseHead,
    apply_header_changes, direct_response, header_list, rewrite_path,
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

/// What one policy's request phase did.
enum Step {
    Unchanged,
    Changed,
    Answer(Response<Body>),
}

/// Names the plugin whose failure the gateway answered for.
const PLUGIN_HEADER: &str = "x-sluice-plugin";

/// The `Allow` header of a refused TRACE or CONNECT: the standard methods the gateway
/// forwards (extension methods are forwarded too).
const FORWARDED_METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

/// What the gateway knows about a request before routing it.
struct Arrival {
    started: Instant,
    /// The address the connection came from.
    peer: SocketAddr,
    /// The client, once trusted proxies in front of the gateway are looked through.
    client: IpAddr,
    upgrade: Option<Upgrade>,
    /// Why the request's host cannot be told, if it cannot (see `host`).
    bad_host: Option<&'static str>,
}

/// Why the gateway answered a request itself rather than with an upstream response.
#[derive(Debug)]
enum Rejection {
    QueueFull,
    QueueTimeout,
    RequestTimeout,
    /// The route's time ran out while the client was still sending its body.
    ClientBodyTimeout,
    BodyTooLarge,
    Upstream(UpstreamError),
    /// An LLM request over its consumer's or its providers' budget; retry after this long.
    TokenBudget(&'static str, Duration),
    /// An LLM request whose estimate exceeds its consumer's whole budget, or every provider's
    /// whole limit: it never fits.
    OverBudget(&'static str),
    ClientBody(String),
}

impl From<LlmError> for Rejection {
    fn from(err: LlmError) -> Self {
        match err {
            LlmError::ConsumerBudget(wait) => Rejection::TokenBudget("consumer_budget", wait),
            LlmError::ProviderBudget(wait) => Rejection::TokenBudget("provider_budget", wait),
            LlmError::BodyTooLarge => Rejection::BodyTooLarge,
            LlmError::OverBudget => Rejection::OverBudget("token_estimate_over_budget"),
            LlmError::OverProviderLimit => {
                Rejection::OverBudget("token_estimate_over_provider_limit")
            }
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
/// and a request finishes on the configuration it started with. The access log line is
/// written then too.
pub async fn handle(
    snapshot: Arc<Snapshot>,
    metrics: &Metrics,
    access_log: &AccessLog,
    request: Request<Incoming>,
    peer: &Peer,
    secure: bool,
) -> Response<Body> {
    let started = Instant::now();
    let mut request = request;
    let asked_upgrade = upgrade::asked(&request);
    let (identity, arrival) = arrive(&snapshot, &mut request, peer, secure, started);
    let entry = log_entry(access_log, &request, &identity, &arrival);
    let mut line = Unanswered::new(access_log, entry, started);

    let mut response = serve(snapshot, metrics, request, arrival, line.entry()).await;
    upgrade::close_unless_switched(asked_upgrade, &mut response);
    // The client's connection is the gateway's: an HTTP/1.0 upstream's version must not
    // reach it (hyper would answer `HTTP/1.0` and close the connection after each response).
    *response.version_mut() = http::Version::HTTP_11;

    response
        .headers_mut()
        .insert(X_REQUEST_ID.clone(), identity.request_id);
    let line = line.answered(response.status());
    match access_log.is_enabled() {
        true => response.map(|body| Logged::new(body, line).boxed()),
        false => response,
    }
}

/// Cleans the request's headers and works out who it is from: hop-by-hop headers out, the
/// request id and trace in, and the forwarding headers set for the upstream.
fn arrive(
    snapshot: &Snapshot,
    request: &mut Request<Incoming>,
    peer: &Peer,
    secure: bool,
    started: Instant,
) -> (Identity, Arrival) {
    let upgrade = Upgrade::take(request);
    // Before anything else is set: `Connection` may name any header, ours included.
    strip_request_hop_by_hop(request.headers_mut());
    let identity = identity::assign(request.headers_mut());
    // From here on `Host` names the host the request was addressed to.
    let bad_host = host::check(request).err();

    let trusted = &snapshot.trusted_proxies;
    let client = trusted.client_addr(request.headers(), peer);
    let host = request.headers().get(header::HOST).cloned();
    let scheme = if secure { "https" } else { "http" };
    trusted.set_headers(request.headers_mut(), peer, host.as_ref(), scheme);

    let arrival = Arrival {
        started,
        peer: peer.addr,
        client,
        upgrade,
        bad_host,
    };
    (identity, arrival)
}

/// The start of the request's access log line; empty when the log is off, since its text
/// costs a few allocations.
fn log_entry<B>(
    access_log: &AccessLog,
    request: &Request<B>,
    identity: &Identity,
    arrival: &Arrival,
) -> Entry {
    if !access_log.is_enabled() {
        return Entry::default();
    }
    let mut entry = Entry::new(request, arrival.client, arrival.peer);
    entry.request_id = String::from_utf8_lossy(identity.request_id.as_bytes()).into_owned();
    entry.trace_id = identity.trace_id.clone();
    entry
}

/// Routes the request, waits for a slot and proxies it.
async fn serve(
    snapshot: Arc<Snapshot>,
    metrics: &Metrics,
    mut request: Request<Incoming>,
    arrival: Arrival,
    entry: &mut Entry,
) -> Response<Body> {
    let started = arrival.started;
    let checked = match arrival.bad_host {
        Some(reason) => Err((StatusCode::BAD_REQUEST, reason)),
        None => check_target(&mut request, &snapshot),
    };
    if let Err((status, reason)) = checked {
        entry.reason = Some(reason);
        metrics.rejected("", reason);
        metrics.request("", status, started.elapsed().as_secs_f64());
        return refusal(status, reason);
    }
    let host = request.headers().get(header::HOST);
    let host = host.and_then(|h| h.to_str().ok());
    let Some(route) = snapshot.router.find(host, request.uri().path()) else {
        entry.reason = Some("no_route");
        metrics.rejected("", "no_route");
        let response = error_response(StatusCode::NOT_FOUND, "no_route");
        metrics.request("", response.status(), started.elapsed().as_secs_f64());
        return response;
    };
    entry.route = Some(route.name.clone());
    entry.upstream = Some(route.upstream.name.clone());

    let admitted = route.admission.enter().await;
    let queued = started.elapsed();
    route.metrics.queue_wait.observe(queued.as_secs_f64());
    entry.queue_ms = millis(queued);
    let response = match admitted {
        Err(Refused::QueueFull) => Rejection::QueueFull.respond(route, metrics, entry),
        Err(Refused::QueueTimeout) => Rejection::QueueTimeout.respond(route, metrics, entry),
        Ok(route_slot) => {
            let max_body_bytes = snapshot.max_body_bytes;
            let proxied = proxy(route, metrics, request, arrival, max_body_bytes, entry);
            match tokio::time::timeout(route.request_timeout, proxied).await {
                Ok(Ok((response, upstream_slot))) => {
                    if response.headers().contains_key(PLUGIN_HEADER) {
                        metrics.rejected(&route.name, "policy_failed");
                        entry.reason = Some("policy_failed");
                    }
                    let held = (route_slot, upstream_slot, snapshot.clone());
                    response.map(|body| Guarded::new(body, held).boxed())
                }
                Ok(Err(rejection)) => rejection.respond(route, metrics, entry),
                Err(_) => {
                    let ended = entry
                        .body_in
                        .ended
                        .load(std::sync::atomic::Ordering::Relaxed);
                    let rejection = match ended {
                        false => Rejection::ClientBodyTimeout,
                        true => Rejection::RequestTimeout,
                    };
                    rejection.respond(route, metrics, entry)
                }
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
    arrival: Arrival,
    max_body_bytes: u64,
    entry: &mut Entry,
) -> Result<(Response<Body>, Option<Lease>), Rejection> {
    if declared_length(request.headers()).is_some_and(|length| length > max_body_bytes) {
        return Err(Rejection::BodyTooLarge);
    }
    let (mut parts, body) = request.into_parts();
    // Counted from the start, so a timeout can tell whether the client was still sending.
    let body = Counted::new(body, entry.body_in.clone());
    if route.llm.is_some() {
        // Only the route's policies may replace the token estimate.
        parts.headers.remove(crate::llm::ESTIMATE_HEADER);
    }

    let policies = Instant::now();
    let outcome = request_phase(route, parts, arrival.client).await;
    entry.policies_ms = millis(policies.elapsed());
    let (mut parts, head) = match outcome {
        Outcome::Forward(parts, head) => (parts, head),
        Outcome::Answer(response) => {
            if response.status() == StatusCode::TOO_MANY_REQUESTS {
                metrics.rejected(&route.name, "rate_limited");
                entry.reason = Some("rate_limited");
            }
            return Ok((response, None));
        }
    };
    if let Some(upgrade) = &arrival.upgrade {
        upgrade.restore_request_headers(&mut parts.headers);
    }

    let sent = Instant::now();
    let (mut response, lease) = match &route.llm {
        Some(llm) if llm.applies(&parts) => {
            let forwarded = llm.forward(&route.name, &route.upstream, parts, body, arrival.client);
            forwarded.await.map_err(Rejection::from)?
        }
        _ => {
            let body = Limited::new(body, usize::try_from(max_body_bytes).unwrap_or(usize::MAX));
            let request = Request::from_parts(parts, Outgoing::Streamed(body));
            let upstream = (route.upstream)
                .send(request, arrival.client, route.retry_non_idempotent)
                .await;
            let (response, lease) = upstream.map_err(|err| match err {
                UpstreamError::BodyTooLarge => Rejection::BodyTooLarge,
                err => Rejection::Upstream(err),
            })?;
            (response.map(|body| body.map_err(Into::into).boxed()), lease)
        }
    };
    entry.upstream_ms = Some(millis(sent.elapsed()));
    entry.target = Some(lease.target().clone());
    let upgraded = arrival
        .upgrade
        .and_then(|upgrade| upgrade.accept(&mut response, arrival.peer));
    if response.status() == StatusCode::SWITCHING_PROTOCOLS && upgraded.is_none() {
        // A switch nobody asked for: the client could make nothing of what would follow.
        return Err(Rejection::Upstream(UpstreamError::Response {
            target: lease.target().clone(),
            cause: "101 Switching Protocols to a request that asked for no upgrade".into(),
        }));
    }

    let policies = Instant::now();
    let mut response = response_phase(route, &head, response).await;
    entry.policies_ms += millis(policies.elapsed());
    if let Some(protocol) = upgraded {
        upgrade::restore_response_headers(response.headers_mut(), protocol);
    }
    Ok((response, Some(lease)))
}

/// Runs each policy's request phase in order, applying its changes before the next one.
async fn request_phase(route: &Route, mut parts: Parts, client: IpAddr) -> Outcome {
    if route.policies.is_empty() {
        // Nothing will read the head: skip copying every header into it.
        let head = RequestHead {
            method: String::new(),
            path_and_query: String::new(),
            headers: HeaderList {
                bytes: Vec::new(),
                ends: Vec::new(),
            },
            client_addr: String::new(),
            route: String::new(),
        };
        return Outcome::Forward(parts, head);
    }
    let mut head = request_head(&parts, &route.name, client);
    let taking_part = route.policies.iter();
    for plugin in taking_part.filter(|p| p.takes_part_in(Phase::Request)) {
        let decision = plugin
            .on_request(&head)
            .await
            .and_then(|decision| match decision {
                RequestDecision::Continue(changes) if changes_nothing(&changes) => {
                    Ok(Step::Unchanged)
                }
                RequestDecision::Continue(changes) => apply_request_changes(&mut parts, changes)
                    .map(|()| Step::Changed)
                    .map_err(PluginFailure::from),
                RequestDecision::Respond(reply) => Ok(Step::Answer(direct_response(reply)?)),
            });
        match decision {
            Ok(Step::Unchanged) => {}
            // The next policy sees the request as this one left it.
            Ok(Step::Changed) => head = request_head(&parts, &route.name, client),
            Ok(Step::Answer(reply)) => return Outcome::Answer(reply),
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
    let (mut parts, mut body) = response.into_parts();
    strip_response_hop_by_hop(&mut parts.headers);
    declare_grpc_trailers(&mut parts.headers);
    if parts.headers.contains_key(header::TRAILER) {
        // The length an HTTP/2 upstream gave would make hyper drop the trailers for an
        // HTTP/1.1 client.
        body = Unsized(body).boxed();
    }

    let mut head = None;
    let taking_part = route.policies.iter().rev();
    for plugin in taking_part.filter(|p| p.takes_part_in(Phase::Response)) {
        let seen = head.get_or_insert_with(|| ResponseHead {
            status: parts.status.as_u16(),
            headers: header_list(&parts.headers),
        });
        let changed = plugin.on_response(request, seen).await.and_then(|changes| {
            if header_changes_nothing(&changes) {
                return Ok(false);
            }
            let applied = apply_header_changes(&mut parts.headers, changes);
            applied.map(|()| true).map_err(PluginFailure::from)
        });
        match changed {
            Ok(false) => {}
            // The next policy sees the response as this one left it.
            Ok(true) => head = None,
            Err(failure) => {
                if let Some(response) = plugin_failed(plugin, failure) {
                    return response;
                }
            }
        }
    }
    Response::from_parts(parts, body)
}

/// Announces gRPC's trailers on a gRPC response that does not: HTTP/2 servers never do, and
/// hyper sends an HTTP/1.1 client only the trailers its `Trailer` header names.
fn declare_grpc_trailers(headers: &mut HeaderMap) {
    let grpc = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("application/grpc"))
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(['+', ';']));
    if grpc && !headers.contains_key(header::TRAILER) {
        headers.insert(
            header::TRAILER,
            HeaderValue::from_static("grpc-status, grpc-message, grpc-status-details-bin"),
        );
        headers.remove(header::CONTENT_LENGTH);
    }
}

fn changes_nothing(changes: &crate::plugin::RequestChanges) -> bool {
    changes.path_and_query.is_none() && header_changes_nothing(&changes.headers)
}

fn header_changes_nothing(changes: &crate::plugin::HeaderChanges) -> bool {
    changes.remove.is_empty() && changes.set.is_empty() && changes.add.is_empty()
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
    fn respond(self, route: &Route, metrics: &Metrics, entry: &mut Entry) -> Response<Body> {
        let (status, reason) = self.status_and_reason();
        metrics.rejected(&route.name, reason);
        entry.reason = Some(reason);
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
        if let Rejection::TokenBudget(_, wait)
        | Rejection::Upstream(UpstreamError::CircuitOpen(wait)) = &self
        {
            let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if status == StatusCode::REQUEST_TIMEOUT {
            // The rest of the body may still come; nothing after it can be read as a request.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            // Every 503 the gateway makes is about load that passes: ask clients to come back.
            response
                .headers_mut()
                .entry(header::RETRY_AFTER)
                .or_insert(HeaderValue::from_static("1"));
        }
        response
    }

    fn status_and_reason(&self) -> (StatusCode, &'static str) {
        match self {
            Rejection::QueueFull => (StatusCode::SERVICE_UNAVAILABLE, "queue_full"),
            Rejection::QueueTimeout => (StatusCode::SERVICE_UNAVAILABLE, "queue_timeout"),
            Rejection::RequestTimeout => (StatusCode::GATEWAY_TIMEOUT, "request_timeout"),
            Rejection::ClientBodyTimeout => (StatusCode::REQUEST_TIMEOUT, "client_body_timeout"),
            Rejection::BodyTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
            Rejection::TokenBudget(reason, _) => (StatusCode::TOO_MANY_REQUESTS, reason),
            Rejection::OverBudget(reason) => (StatusCode::PAYLOAD_TOO_LARGE, reason),
            Rejection::ClientBody(_) => (StatusCode::BAD_REQUEST, "client_body_error"),
            Rejection::Upstream(err) => match err {
                UpstreamError::Saturated(_) => {
                    (StatusCode::SERVICE_UNAVAILABLE, "upstream_saturated")
                }
                UpstreamError::CircuitOpen(_) => (StatusCode::SERVICE_UNAVAILABLE, "circuit_open"),
                UpstreamError::NoHealthyTarget => {
                    (StatusCode::SERVICE_UNAVAILABLE, "no_healthy_target")
                }
                UpstreamError::Connect {
                    timed_out: true, ..
                } => (StatusCode::GATEWAY_TIMEOUT, "upstream_connect_timeout"),
                UpstreamError::Connect { .. } => (StatusCode::BAD_GATEWAY, "upstream_unavailable"),
                UpstreamError::WrongName { .. } => {
                    (StatusCode::BAD_GATEWAY, "upstream_certificate_name")
                }
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

/// Refuses TRACE and CONNECT and a request target over `max_uri_bytes`, then normalises the
/// path.
fn check_target(
    request: &mut Request<Incoming>,
    snapshot: &Snapshot,
) -> Result<(), (StatusCode, &'static str)> {
    // TRACE would echo the request, credentials included, back through the gateway; CONNECT
    // would make the gateway an open tunnel. Neither is forwarded, as at common edge proxies.
    if matches!(*request.method(), Method::TRACE | Method::CONNECT) {
        tracing::debug!(method = %request.method(), "refused a method the gateway does not forward");
        return Err((StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"));
    }
    let max_uri_bytes = snapshot.max_uri_bytes;
    let uri = request.uri();
    let length = uri.path_and_query().map_or(0, |pq| pq.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len());
    if length > max_uri_bytes {
        tracing::debug!(
            length,
            max_uri_bytes,
            "refused a request target over the limit"
        );
        return Err((StatusCode::URI_TOO_LONG, "uri_too_long"));
    }
    normalize_path(request, snapshot.encoded_slash)
        .map_err(|reason| (StatusCode::BAD_REQUEST, reason))
}

/// Normalises the request's path (see `path`), so that routes, policies and the upstream all
/// see the same path; the reason to answer 400 when the path is refused.
fn normalize_path(
    request: &mut Request<Incoming>,
    encoded_slash: EncodedSlash,
) -> Result<(), &'static str> {
    let uri = request.uri();
    let normalized = match path::normalize(uri.path(), encoded_slash) {
        Ok(Cow::Borrowed(_)) => return Ok(()),
        Ok(Cow::Owned(normalized)) => normalized,
        Err(PathError::EncodedSlash) => {
            tracing::debug!(path = uri.path(), "refused a path with an encoded slash");
            return Err("encoded_slash");
        }
        Err(PathError::BadEscape) => {
            tracing::debug!(path = uri.path(), "refused a path with a broken escape");
            return Err("invalid_path");
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

/// An error for a request refused before routing. After an oversized request or one whose
/// host cannot be told the connection is closed: what follows it cannot be trusted either.
fn refusal(status: StatusCode, reason: &str) -> Response<Body> {
    let mut response = error_response(status, reason);
    if status == StatusCode::METHOD_NOT_ALLOWED {
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(FORWARDED_METHODS));
    }
    if status == StatusCode::URI_TOO_LONG || reason.ends_with("_host") {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
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

fn request_head(parts: &Parts, route: &str, client: IpAddr) -> RequestHead {
    RequestHead {
        method: parts.method.as_str().to_string(),
        path_and_query: parts
            .uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_string(),
        headers: header_list(&parts.headers),
        client_addr: client.to_string(),
        route: route.to_string(),
    }
}

fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}
