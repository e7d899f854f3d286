//! HTTP/1.1 upgrades to WebSocket: the `Upgrade` request is forwarded, and only when the
//! upstream answers `101 Switching Protocols` are the two connections joined into a tunnel.
//!
//! `Upgrade` and `Connection` are hop-by-hop headers, stripped from every other request; a
//! WebSocket upgrade request gets them back, set by the gateway, after the stripping. A
//! tunnel holds no route or upstream slot: it may last for hours, and the in-flight limits
//! are about requests. It ends when either side closes.

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

/// An upgrade the client asked for, waiting for the upstream's answer.
#[derive(Debug)]
pub struct Upgrade {
    protocol: HeaderValue,
    client: OnUpgrade,
}

// === impl Upgrade ===

impl Upgrade {
    /// Takes the upgrade `request` asks for: HTTP/1.1 with `Upgrade: websocket` named in
    /// `Connection`.
    ///
    /// Other protocols are not tunnelled (as in Envoy by default): `Upgrade: h2c` in
    /// particular would let a client open an HTTP/2 connection straight to the upstream and
    /// send requests that no route or policy ever sees. Such a request is forwarded as a plain
    /// one, without its `Upgrade` header.
    pub fn take<B>(request: &mut Request<B>) -> Option<Upgrade> {
        if request.version() != Version::HTTP_11 || !names_upgrade(request.headers()) {
            return None;
        }
        let protocol = request.headers().get(header::UPGRADE)?.clone();
        if !is_websocket(&protocol) {
            return None;
        }
        Some(Upgrade {
            protocol,
            client: hyper::upgrade::on(request),
        })
    }

    /// Puts back the headers the upstream needs to see the upgrade, after hop-by-hop
    /// headers were stripped.
    pub fn restore_request_headers(&self, headers: &mut HeaderMap) {
        headers.insert(header::UPGRADE, self.protocol.clone());
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }

    /// When the upstream switched protocols, starts the tunnel between both connections and
    /// returns the protocol to announce to the client.
    pub fn accept<B>(
        self,
        response: &mut Response<B>,
        peer: std::net::SocketAddr,
    ) -> Option<HeaderValue> {
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            return None;
        }
        let protocol = response
            .headers()
            .get(header::UPGRADE)
            .cloned()
            .unwrap_or(self.protocol);
        let upstream = hyper::upgrade::on(response);
        tokio::spawn(tunnel(self.client, upstream, peer));
        Some(protocol)
    }
}

/// Whether an HTTP/1 request asked to switch protocols (any `Upgrade`, or CONNECT): unless a
/// tunnel starts, its connection is closed after the response. The framing check in `framing`
/// stops following a connection after a WebSocket upgrade request, and hyper would otherwise
/// keep reading requests on it that were never checked.
pub fn asked<B>(request: &Request<B>) -> bool {
    request.version() < Version::HTTP_2
        && (request.headers().contains_key(header::UPGRADE) || request.method() == Method::CONNECT)
}

/// Closes the client connection after `response` when the request asked to upgrade and no
/// tunnel started.
pub fn close_unless_switched<B>(asked: bool, response: &mut Response<B>) {
    if asked && response.status() != StatusCode::SWITCHING_PROTOCOLS {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
}

/// Puts the upgrade headers back on the 101 sent to the client.
pub fn restore_response_headers(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(header::UPGRADE, protocol);
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
}

/// Whether an `Upgrade` value asks for WebSocket; the scanner in `framing` stops following
/// a connection on the same test.
pub fn is_websocket(protocol: &HeaderValue) -> bool {
    protocol
        .as_bytes()
        .split(|&b| b == b',')
        .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"websocket"))
}

fn names_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// Copies bytes both ways once both sides have switched, until either closes.
async fn tunnel(client: OnUpgrade, upstream: OnUpgrade, peer: std::net::SocketAddr) {
    let (client, upstream) = match tokio::join!(client, upstream) {
        (Ok(client), Ok(upstream)) => (client, upstream),
        (client, upstream) => {
            let err = client.err().or(upstream.err());
            tracing::debug!(client.addr = %peer, "upgrade abandoned: {err:?}");
            return;
        }
    };
    let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((sent, received)) => {
            tracing::debug!(client.addr = %peer, sent, received, "tunnel closed");
        }
        Err(err) => tracing::debug!(client.addr = %peer, "tunnel broke off: {err}"),
    }
}
