//! The forwarding headers (`X-Forwarded-For`, `-Proto`, `-Host` and `Forwarded`) and the
//! client address they lead to.
//!
//! What a client writes in these headers is a claim, believed only from a configured trusted
//! proxy. From a trusted peer the gateway appends the peer's address and keeps the rest; from
//! anyone else it replaces them. The client address that policies and rate limits see is the
//! rightmost address in `X-Forwarded-For` that is not a trusted proxy (nginx's `real_ip` with
//! `real_ip_recursive`, Envoy's trusted hops), so a client cannot choose it by sending a
//! forged header.

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;
use http::header::{self, HeaderName, HeaderValue};
use ipnet::IpNet;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// Not set by the gateway, but one that upstreams behind nginx often trust: only a trusted
/// proxy may pass it on.
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// The far end of a client connection, with the text the forwarding headers give its
/// address: written once per connection, not once per request.
#[derive(Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The address, an IPv4-mapped IPv6 one as IPv4.
    ip: IpAddr,
    /// As `X-Forwarded-For` lists it.
    listed: String,
    /// As `Forwarded` names it (RFC 7239: an IPv6 address in brackets and quotes).
    node: String,
}

/// The proxies whose forwarding headers are believed.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    networks: Vec<IpNet>,
}

// === impl Peer ===

impl Peer {
    pub fn new(addr: SocketAddr) -> Peer {
        let ip = addr.ip().to_canonical();
        let node = match ip {
            IpAddr::V4(ip) => format!("for={ip}"),
            IpAddr::V6(ip) => format!("for=\"[{ip}]\""),
        };
        Peer {
            addr,
            ip,
            listed: ip.to_string(),
            node,
        }
    }
}

// === impl TrustedProxies ===

impl TrustedProxies {
    pub fn new(networks: Vec<IpNet>) -> Self {
        TrustedProxies { networks }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.networks.iter().any(|net| net.contains(&ip))
    }

    /// The address of the client: the peer, or when the peer is trusted, the rightmost address
    /// in `X-Forwarded-For` that is not (the leftmost one if all are).
    pub fn client_addr(&self, headers: &HeaderMap, peer: &Peer) -> IpAddr {
        let peer = peer.ip;
        if !self.contains(peer) {
            return peer;
        }
        let mut hops = forwarded_for(headers);
        let mut client = peer;
        while let Some(hop) = hops.pop() {
            let Some(ip) = hop else {
                // An entry that is not an address ends the chain: the hop before it is the
                // last one known.
                break;
            };
            client = ip;
            if !self.contains(ip) {
                break;
            }
        }
        client
    }

    /// Sets the forwarding headers for the upstream: extended when `peer` is trusted,
    /// replaced otherwise. `scheme` is what the client spoke to the gateway.
    pub fn set_headers(
        &self,
        headers: &mut HeaderMap,
        peer: &Peer,
        host: Option<&HeaderValue>,
        scheme: &'static str,
    ) {
        let trusted = self.contains(peer.ip);
        if !trusted {
            for name in [
                &X_FORWARDED_FOR,
                &X_FORWARDED_PROTO,
                &X_FORWARDED_HOST,
                &header::FORWARDED,
                &X_REAL_IP,
            ] {
                headers.remove(name);
            }
        }

        append_forwarded_for(headers, peer);
        if !headers.contains_key(&X_FORWARDED_PROTO) {
            headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(scheme));
        }
        if let Some(host) = host
            && !headers.contains_key(&X_FORWARDED_HOST)
        {
            headers.insert(X_FORWARDED_HOST.clone(), host.clone());
        }
        append_forwarded(headers, peer, host, scheme);
    }
}

/// Every entry of every `X-Forwarded-For` line, left to right; `None` for one that is not an
/// address.
fn forwarded_for(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b','))
        .map(|entry| std::str::from_utf8(entry).ok().and_then(parse_hop))
        .collect()
}

/// An address as proxies write it in `X-Forwarded-For`: bare, or with a port.
fn parse_hop(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    entry
        .parse::<IpAddr>()
        .or_else(|_| entry.parse::<SocketAddr>().map(|s| s.ip()))
        .ok()
        .map(|ip| ip.to_canonical())
}

/// Appends `peer` to `X-Forwarded-For`, joining earlier lines into one.
fn append_forwarded_for(headers: &mut HeaderMap, peer: &Peer) {
    let mut value = join(headers, &X_FORWARDED_FOR);
    if !value.is_empty() {
        value.push_str(", ");
    }
    value.push_str(&peer.listed);
    set_text(headers, X_FORWARDED_FOR.clone(), &value);
}

/// Appends this hop to `Forwarded` (RFC 7239).
fn append_forwarded(
    headers: &mut HeaderMap,
    peer: &Peer,
    host: Option<&HeaderValue>,
    scheme: &str,
) {
    let mut value = join(headers, &header::FORWARDED);
    if !value.is_empty() {
        value.push_str(", ");
    }
    value.push_str(&peer.node);
    if let Some(host) = host.and_then(|h| h.to_str().ok()) {
        value.push_str(";host=\"");
        if host.contains(['"', '\\']) {
            value.extend(host.chars().filter(|c| !matches!(c, '"' | '\\')));
        } else {
            value.push_str(host);
        }
        value.push('"');
    }
    value.push_str(";proto=");
    value.push_str(scheme);
    set_text(headers, header::FORWARDED, &value);
}

/// Every value of `name`, joined by commas as one line.
fn join(headers: &HeaderMap, name: &HeaderName) -> String {
    let values: Vec<&str> = headers
        .get_all(name)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .collect();
    values.join(", ")
}

fn set_text(headers: &mut HeaderMap, name: HeaderName, text: &str) {
    // NB: built from header values already accepted and address text, so it stays valid.
    if let Ok(value) = HeaderValue::from_str(text) {
        headers.insert(name, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusting(networks: &[&str]) -> TrustedProxies {
        TrustedProxies::new(networks.iter().map(|n| n.parse().unwrap()).collect())
    }

    fn peer(ip: &str) -> Peer {
        Peer::new(SocketAddr::new(ip.parse().unwrap(), 40000))
    }

    fn with_xff(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", HeaderValue::from_str(value).unwrap());
        headers.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        headers.insert(header::FORWARDED, HeaderValue::from_static("for=6.6.6.6"));
        headers
    }

    #[test]
    fn an_untrusted_peer_is_the_client_and_its_headers_are_replaced() {
        let proxies = trusting(&["10.0.0.0/8"]);
        let mut headers = with_xff("6.6.6.6");
        assert_eq!(
            proxies.client_addr(&headers, &peer("192.0.2.1")),
            peer("192.0.2.1").addr.ip()
        );

        proxies.set_headers(&mut headers, &peer("192.0.2.1"), None, "http");
        assert_eq!(headers["x-forwarded-for"], "192.0.2.1");
        assert_eq!(headers["x-forwarded-proto"], "http");
        assert_eq!(headers[header::FORWARDED], "for=192.0.2.1;proto=http");
    }

    #[test]
    fn a_trusted_peer_has_its_headers_extended() {
        let proxies = trusting(&["10.0.0.0/8"]);
        let mut headers = with_xff("203.0.113.9, 10.1.1.1");
        let host = HeaderValue::from_static("example.com");
        proxies.set_headers(&mut headers, &peer("10.0.0.2"), Some(&host), "http");
        assert_eq!(
            headers["x-forwarded-for"],
            "203.0.113.9, 10.1.1.1, 10.0.0.2"
        );
        assert_eq!(headers["x-forwarded-proto"], "https");
        assert_eq!(
            headers[header::FORWARDED],
            "for=6.6.6.6, for=10.0.0.2;host=\"example.com\";proto=http"
        );
    }

    #[test]
    fn the_client_is_the_rightmost_untrusted_hop() {
        let proxies = trusting(&["10.0.0.0/8", "::1/128"]);
        let headers = with_xff("1.1.1.1, 203.0.113.9, 10.1.1.1");
        assert_eq!(
            proxies.client_addr(&headers, &peer("10.0.0.2")),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );

        let all_trusted = with_xff("10.3.3.3, 10.1.1.1");
        assert_eq!(
            proxies.client_addr(&all_trusted, &peer("::1")),
            "10.3.3.3".parse::<IpAddr>().unwrap()
        );

        let garbage = with_xff("1.1.1.1, not-an-ip, 10.1.1.1");
        assert_eq!(
            proxies.client_addr(&garbage, &peer("10.0.0.2")),
            "10.1.1.1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn ipv4_mapped_peers_match_ipv4_networks() {
        let proxies = trusting(&["127.0.0.0/8"]);
        assert!(proxies.contains("::ffff:127.0.0.1".parse().unwrap()));
        let mut headers = HeaderMap::new();
        proxies.set_headers(&mut headers, &peer("::1"), None, "https");
        assert_eq!(headers[header::FORWARDED], "for=\"[::1]\";proto=https");
    }
}
