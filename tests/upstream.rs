//! A real HTTP upstream that records what reaches it and answers with a JSON echo.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub version: Version,
    /// The name the client sent as SNI, over TLS.
    pub server_name: Option<String>,
    /// `Host`, or `:authority` in HTTP/2.
    pub host: Option<String>,
    pub method: String,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// An upstream server on a free loopback port, recording every request it receives.
///
/// A request with an `x-delay-ms` header is answered after that delay; an
/// `x-chaos-request-tag` request header comes back as `x-echo-request-tag`. A request with
/// `x-respond-status` is answered with that status and no body, and `x-respond-length` sets
/// the response's `Content-Length` (for HEAD).
#[derive(Debug, Clone)]
pub struct TestUpstream {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Recorded>>>,
    connections: Arc<AtomicUsize>,
}

impl TestUpstream {
    /// An upstream speaking HTTP/1.1 and HTTP/2 (h2c) in clear text.
    pub async fn start() -> TestUpstream {
        Self::start_with(None).await
    }

    /// An upstream behind TLS, offering HTTP/2 and HTTP/1.1 by ALPN unless `tls` says
    /// otherwise.
    pub async fn start_tls(tls: Arc<rustls::ServerConfig>) -> TestUpstream {
        Self::start_with(Some(TlsAcceptor::from(tls))).await
    }

    async fn start_with(tls: Option<TlsAcceptor>) -> TestUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("upstream address");
        let received = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        tokio::spawn(accept(listener, tls, received.clone(), connections.clone()));
        TestUpstream {
            addr,
            received,
            connections,
        }
    }

    /// Stands for an upstream the test runs itself at `addr`; it records nothing.
    pub fn external(addr: SocketAddr) -> TestUpstream {
        TestUpstream {
            addr,
            received: Arc::default(),
            connections: Arc::default(),
        }
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Every request received so far.
    pub fn received(&self) -> Vec<Recorded> {
        self.received.lock().expect("upstream record").clone()
    }

    /// The last request received.
    pub fn last(&self) -> Recorded {
        self.received()
            .pop()
            .expect("the upstream received a request")
    }
}

async fn accept(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    received: Arc<Mutex<Vec<Recorded>>>,
    connections: Arc<AtomicUsize>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        connections.fetch_add(1, Ordering::SeqCst);
        let received = received.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let server = auto::Builder::new(TokioExecutor::new());
            let Some(tls) = tls else {
                let service = service_fn(move |request| echo(request, None, received.clone()));
                let _ = server.serve_connection(TokioIo::new(stream), service).await;
                return;
            };
            // A failed handshake (an untrusted certificate, say) just ends the connection.
            let Ok(stream) = tls.accept(stream).await else {
                return;
            };
            let name = stream.get_ref().1.server_name().map(str::to_string);
            let service = service_fn(move |request| echo(request, name.clone(), received.clone()));
            let _ = server.serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

async fn echo(
    request: Request<Incoming>,
    server_name: Option<String>,
    received: Arc<Mutex<Vec<Recorded>>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let request_tag = parts.headers.get("x-chaos-request-tag").cloned();
    let status = parts
        .headers
        .get("x-respond-status")
        .and_then(|v| http::StatusCode::from_bytes(v.as_bytes()).ok());
    let length = parts.headers.get("x-respond-length").cloned();
    let delay = parts
        .headers
        .get("x-delay-ms")
        .and_then(|v| v.to_str().ok()?.parse().ok());
    let recorded = Recorded {
        version: parts.version,
        server_name,
        host: (parts
            .headers
            .get("host")
            .and_then(|host| host.to_str().ok()))
        .or(parts.uri.authority().map(|authority| authority.as_str()))
        .map(str::to_string),
        method: parts.method.to_string(),
        path_and_query: parts
            .uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_string(),
        headers: parts.headers,
        body,
    };
    let echo = serde_json::json!({
        "method": recorded.method,
        "path": recorded.path_and_query,
        "body_bytes": recorded.body.len(),
    });
    received.lock().expect("upstream record").push(recorded);
    if let Some(ms) = delay {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let body = match (status, &length) {
        (None, None) => Bytes::from(echo.to_string()),
        _ => Bytes::new(),
    };
    let mut response = Response::new(Full::new(body));
    if let Some(status) = status {
        *response.status_mut() = status;
    }
    if let Some(length) = length {
        response.headers_mut().insert("content-length", length);
    }
    response
        .headers_mut()
        .insert("content-type", "application/json".parse().expect("valid"));
    response
        .headers_mut()
        .insert("x-upstream-header", "present".parse().expect("valid"));
    if let Some(tag) = request_tag {
        response.headers_mut().insert("x-echo-request-tag", tag);
    }
    Ok(response)
}
