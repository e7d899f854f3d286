//! Hop-by-hop headers, which describe one connection and are never forwarded.

use http::HeaderMap;
use http::header::{self, HeaderName, HeaderValue};

/// Headers that describe one connection and are never forwarded (RFC 9110, section 7.6.1).
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes a request's hop-by-hop headers, then says `TE: trailers` again if the client
/// said it: it means the client accepts trailers, which gRPC needs end to end (nginx's
/// `grpc_pass` and Envoy forward it the same way).
pub fn strip_request_hop_by_hop(headers: &mut HeaderMap) {
    let trailers = headers
        .get_all(header::TE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("trailers"));
    strip_hop_by_hop(headers);
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Removes a response's hop-by-hop headers but keeps `Trailer`: it announces the trailer
/// fields at the end of the body, which HTTP/1.1 needs to send them on.
///
/// A response that announces trailers loses its `Content-Length` (which an HTTP/2 upstream
/// may send with them): HTTP/1.1 carries trailers only in a chunked body.
pub fn strip_response_hop_by_hop(headers: &mut HeaderMap) {
    let trailer = headers.remove(header::TRAILER);
    strip_hop_by_hop(headers);
    if let Some(trailer) = trailer {
        headers.insert(header::TRAILER, trailer);
        headers.remove(header::CONTENT_LENGTH);
    }
}

/// Removes hop-by-hop headers, including every header the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(&HOP_BY_HOP) {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_named_headers_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, X-Secret"),
        );
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("x-kept"));
    }

    #[test]
    fn te_trailers_is_said_again_and_nothing_else_of_te() {
        let mut headers = HeaderMap::new();
        headers.insert(header::TE, HeaderValue::from_static("gzip, trailers"));
        strip_request_hop_by_hop(&mut headers);
        assert_eq!(headers[header::TE], "trailers");

        headers.insert(header::TE, HeaderValue::from_static("gzip"));
        strip_request_hop_by_hop(&mut headers);
        assert!(!headers.contains_key(header::TE));
    }
}
