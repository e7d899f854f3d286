//! Header rules at the proxy boundary: hop-by-hop headers and the forwarding headers.

use std::net::IpAddr;

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

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

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

/// Sets the forwarding headers from what the gateway saw itself.
///
/// Values a client sent are replaced, not extended: the gateway trusts no proxy in front of
/// it, so a client cannot choose the address that policies and rate limits see upstream.
pub fn set_forwarded(headers: &mut HeaderMap, client: IpAddr, host: Option<&HeaderValue>) {
    headers.remove(header::FORWARDED);
    headers.insert(X_FORWARDED_FOR.clone(), ip_value(client));
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    match host {
        Some(host) => headers.insert(X_FORWARDED_HOST.clone(), host.clone()),
        None => headers.remove(&X_FORWARDED_HOST),
    };
}

fn ip_value(ip: IpAddr) -> HeaderValue {
    // NB: the text form of an IP address is always a valid header value.
    HeaderValue::from_str(&ip.to_string()).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
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
    fn client_forwarding_headers_are_replaced() {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        headers.insert(header::FORWARDED, HeaderValue::from_static("for=6.6.6.6"));
        set_forwarded(&mut headers, "10.0.0.1".parse().unwrap(), None);
        assert_eq!(headers["x-forwarded-for"], "10.0.0.1");
        assert!(!headers.contains_key(header::FORWARDED));
    }
}
