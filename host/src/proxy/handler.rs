//! The life of one request: route, request policies, upstream, response policies.

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use super::forward::UpstreamError;
use super::headers::{set_forwarded, strip_hop_by_hop};
use super::{Body, Route};
use crate::config::OnError;
use crate::gateway::Snapshot;
use crate::metrics::Metrics;
use crate::plugin::{
    Header, Plugin, PluginFailure, RequestDecision, RequestHead, ResponseHead,
    apply_header_changes, direct_response, rewrite_path,
};

/// What the request phase of a route's policies decided.
#[expect(
    clippy::large_enum_variant,
    reason = "made and moved once per request; boxing would only add an allocation"
)]
enum Outcome {
    Forward(Parts, RequestHead),
    Answer(Response<Body>),
}

/// Serves one request with the configuration snapshot it arrived under.
pub async fn handle(
    snapshot: &Snapshot,
    metrics: &Metrics,
    request: Request<Incoming>,
    client: SocketAddr,
) -> Response<Body> {
    let started = Instant::now();
    let host = request_host(&request);
    let host = host.as_ref().and_then(|h| h.to_str().ok());
    let Some(route) = snapshot.router.find(host, request.uri().path()) else {
        let response = error_response(StatusCode::NOT_FOUND, "no_route");
        metrics.request("", response.status(), started.elapsed().as_secs_f64());
        return response;
    };

    let response = proxy(route, request, client).await;
    metrics.request(
        &route.name,
        response.status(),
        started.elapsed().as_secs_f64(),
    );
    response
}

async fn proxy(route: &Route, request: Request<Incoming>, client: SocketAddr) -> Response<Body> {
    let host = request_host(&request);
    let (mut parts, body) = request.into_parts();
    if let Some(host) = &host {
        // HTTP/2 clients send `:authority` instead; the upstream speaks HTTP/1.1 and needs Host.
        parts.headers.insert(header::HOST, host.clone());
    }
    strip_hop_by_hop(&mut parts.headers);
    set_forwarded(&mut parts.headers, client.ip(), host.as_ref());

    let (parts, head) = match request_phase(route, parts, client).await {
        Outcome::Forward(parts, head) => (parts, head),
        Outcome::Answer(response) => return response,
    };

    let upstream = &route.upstream;
    match upstream
        .send(Request::from_parts(parts, body), route.upstream_timeout)
        .await
    {
        Ok(response) => response_phase(route, &head, response).await,
        Err(err) => {
            tracing::warn!(route = &*route.name, upstream = %upstream.name, "upstream failed: {err}");
            upstream_error_response(&err)
        }
    }
}

/// Runs each policy's request phase in order, applying its changes before the next one.
async fn request_phase(route: &Route, mut parts: Parts, client: SocketAddr) -> Outcome {
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
    response: Response<Incoming>,
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
    Response::from_parts(parts, body.map_err(Into::into).boxed())
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
                .insert("x-sluice-plugin", header_value(plugin.name()));
            Some(response)
        }
    }
}

fn upstream_error_response(err: &UpstreamError) -> Response<Body> {
    let (status, reason) = match err {
        UpstreamError::Connect {
            timed_out: true, ..
        } => (StatusCode::GATEWAY_TIMEOUT, "upstream_connect_timeout"),
        UpstreamError::Connect { .. } => (StatusCode::BAD_GATEWAY, "upstream_unavailable"),
        UpstreamError::Response { .. } => (StatusCode::BAD_GATEWAY, "upstream_bad_response"),
        UpstreamError::Timeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout"),
    };
    error_response(status, reason)
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
