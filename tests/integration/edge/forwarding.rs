//! Forwarding headers and the client address policies see: believed from trusted proxies
//! only.

use std::time::Duration;

use sluice_tests::{TestGateway, TestUpstream, send_raw};

const MIRROR: &str = r#"
[[plugins]]
name = "mirror"
path = "{plugin:chaos}"
config = { mode = "mirror" }

[[routes]]
name = "mirrored"
upstream = "app"
policies = ["mirror"]
"#;

const FORGED: &[u8] = b"GET /who HTTP/1.1\r\nHost: example.com\r\n\
    X-Forwarded-For: 198.51.100.1, 203.0.113.7\r\nX-Forwarded-Proto: https\r\n\
    X-Forwarded-Host: claimed.example\r\nForwarded: for=198.51.100.1\r\nX-Real-IP: 198.51.100.1\r\n\
    Connection: close\r\n\r\n";

#[tokio::test]
async fn headers_from_an_untrusted_client_are_replaced_and_its_address_is_used() {
    let upstream = TestUpstream::start().await;
    let gateway = TestGateway::start(&upstream, MIRROR).await;

    let response = send_raw(gateway.addr, FORGED, Duration::from_secs(10)).await;
    assert!(response.starts_with(b"HTTP/1.1 200"));

    let seen = upstream.last().headers;
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], "example.com");
    assert_eq!(
        seen["forwarded"],
        "for=127.0.0.1;host=\"example.com\";proto=http"
    );
    assert_eq!(seen["x-seen-client"], "127.0.0.1", "what policies see");
    assert!(
        !seen.contains_key("x-real-ip"),
        "a client's X-Real-IP is dropped"
    );
}

#[tokio::test]
async fn headers_from_a_trusted_proxy_are_extended_and_the_client_is_the_first_untrusted_hop() {
    let upstream = TestUpstream::start().await;
    let listener = r#"trusted_proxies = ["127.0.0.0/8", "203.0.113.0/24"]"#;
    let gateway = TestGateway::start_with(&upstream, listener, MIRROR).await;

    let response = send_raw(gateway.addr, FORGED, Duration::from_secs(10)).await;
    assert!(response.starts_with(b"HTTP/1.1 200"));

    let seen = upstream.last().headers;
    assert_eq!(
        seen["x-forwarded-for"],
        "198.51.100.1, 203.0.113.7, 127.0.0.1"
    );
    assert_eq!(seen["x-forwarded-proto"], "https");
    assert_eq!(seen["x-forwarded-host"], "claimed.example");
    assert_eq!(
        seen["forwarded"],
        "for=198.51.100.1, for=127.0.0.1;host=\"example.com\";proto=http"
    );
    assert_eq!(
        seen["x-seen-client"], "198.51.100.1",
        "203.0.113.7 is a trusted proxy too, so the client is the hop before it"
    );
}
