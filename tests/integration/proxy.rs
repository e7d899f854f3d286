//! Proxying without policies: what reaches the upstream, and what comes back.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sluice_tests::{TestGateway, TestUpstream, get, in_flight_get, send, send_raw};

const PLAIN_ROUTE: &str = r#"
[[routes]]
name = "plain"
path_prefix = "/"
upstream = "app"
"#;

#[tokio::test]
async fn method_path_query_headers_and_body_pass_through() {
    let upstream = TestUpstream::start().await;
    let gateway = TestGateway::start(&upstream, PLAIN_ROUTE).await;
    let body = Bytes::from(vec![b'x'; 3 << 20]);

    let request = Request::put(gateway.url("/items/7?view=full&x=%20y"))
        .header("x-custom", "value")
        .body(body.clone())
        .unwrap();
    let reply = send(request).await;

    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("x-upstream-header"), Some("present"));
    let seen = upstream.last();
    assert_eq!(seen.method, "PUT");
    assert_eq!(seen.path_and_query, "/items/7?view=full&x=%20y");
    assert_eq!(seen.headers["x-custom"], "value");
    assert_eq!(seen.body, body);
}

#[tokio::test]
async fn a_chunked_request_body_is_streamed_through() {
    let upstream = TestUpstream::start().await;
    let gateway = TestGateway::start(&upstream, PLAIN_ROUTE).await;

    let raw = b"POST /upload HTTP/1.1\r\nHost: example\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
    let response = send_raw(gateway.addr, raw, Duration::from_secs(10)).await;

    assert!(
        response.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&response)
    );
    assert_eq!(upstream.last().body, Bytes::from_static(b"hello world"));
}

#[tokio::test]
async fn hop_by_hop_headers_and_those_named_in_connection_are_not_forwarded() {
    let upstream = TestUpstream::start().await;
    let gateway = TestGateway::start(&upstream, PLAIN_ROUTE).await;

    let raw = b"GET / HTTP/1.1\r\nHost: example\r\nConnection: close, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n";
    let response = send_raw(gateway.addr, raw, Duration::from_secs(10)).await;

    assert!(response.starts_with(b"HTTP/1.1 200"));
    let seen = upstream.last().headers;
    for name in [
        "x-secret",
        "keep-alive",
        "proxy-authorization",
        "connection",
    ] {
        assert!(!seen.contains_key(name), "{name} was forwarded");
    }
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["host"], "example");
}

#[tokio::test]
async fn http2_clients_are_served_over_h2c() {
    let upstream = TestUpstream::start().await;
    let gateway = TestGateway::start(&upstream, PLAIN_ROUTE).await;

    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let request = Request::get(gateway.url("/over-h2"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = client.request(request).await.expect("h2c response");

    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), http::Version::HTTP_2);
    let _ = response.into_body().collect().await;
    let seen = upstream.last();
    assert_eq!(seen.path_and_query, "/over-h2");
    assert_eq!(seen.headers["host"], gateway.addr.to_string());

    // A `host` that names another host than `:authority` is malformed (RFC 9113, 8.3.1).
    let request = Request::get(gateway.url("/other-host"))
        .header("host", "other.example")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = client.request(request).await.expect("h2c response");
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(upstream.received().len(), 1, "nothing more was forwarded");
}

#[tokio::test]
async fn unknown_routes_get_404_and_dead_upstreams_502() {
    let upstream = TestUpstream::start().await;
    let fragment = r#"
[[upstreams]]
name = "dead"
targets = ["127.0.0.1:1"]

[[routes]]
name = "app"
path_prefix = "/app"
upstream = "app"

[[routes]]
name = "dead"
path_prefix = "/dead"
upstream = "dead"
"#;
    let gateway = TestGateway::start(&upstream, fragment).await;

    let missing = get(&gateway.url("/elsewhere")).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.json()["error"], "no_route");

    let dead = get(&gateway.url("/dead/x")).await;
    assert_eq!(dead.status, StatusCode::BAD_GATEWAY);
    assert_eq!(dead.json()["error"], "upstream_unavailable");

    assert_eq!(get(&gateway.url("/app/x")).await.status, StatusCode::OK);
}

#[tokio::test]
async fn the_longest_matching_prefix_wins() {
    let upstream = TestUpstream::start().await;
    let other = TestUpstream::start().await;
    let fragment = format!(
        r#"
[[upstreams]]
name = "other"
targets = ["{}"]

[[routes]]
name = "short"
path_prefix = "/api"
upstream = "app"

[[routes]]
name = "long"
path_prefix = "/api/v2"
upstream = "other"
"#,
        other.addr
    );
    let gateway = TestGateway::start(&upstream, &fragment).await;

    get(&gateway.url("/api/v2/users")).await;
    get(&gateway.url("/api/v1/users")).await;

    assert_eq!(other.last().path_and_query, "/api/v2/users");
    assert_eq!(upstream.last().path_and_query, "/api/v1/users");
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_status() {
    let upstream = TestUpstream::start().await;
    let gateway = TestGateway::start(&upstream, PLAIN_ROUTE).await;
    for _ in 0..3 {
        get(&gateway.url("/counted")).await;
    }

    let metrics = gateway.metrics().await;
    assert!(
        metrics.contains(r#"sluice_requests_total{route="plain",status="200"} 3"#),
        "{metrics}"
    );
    assert!(metrics.contains("sluice_request_duration_seconds_bucket{route=\"plain\""));
    assert_eq!(
        get(&format!("http://{}/healthz", gateway.admin))
            .await
            .status,
        StatusCode::OK
    );
    let wrong_method = get(&format!("http://{}/reload", gateway.admin)).await;
    assert_eq!(wrong_method.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(wrong_method.header("allow"), Some("POST"));
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish() {
    let upstream = TestUpstream::start().await;
    let gateway = TestGateway::start(&upstream, PLAIN_ROUTE).await;
    let in_flight = in_flight_get(&gateway.url("/slow"), Duration::from_millis(500)).await;

    gateway.shutdown().await;

    assert_eq!(in_flight.await.unwrap().status, StatusCode::OK);
}

/// A gateway with a `/public/` route to `app` and an `/admin` route to `admin`.
async fn public_and_admin(
    upstream: &TestUpstream,
    admin: &TestUpstream,
    listener: &str,
) -> TestGateway {
    let fragment = format!(
        r#"
[[upstreams]]
name = "admin"
targets = ["{}"]

[[routes]]
name = "public"
path_prefix = "/public/"
upstream = "app"

[[routes]]
name = "admin"
path_prefix = "/admin"
upstream = "admin"
"#,
        admin.addr
    );
    TestGateway::start_with(upstream, listener, &fragment).await
}

/// Sends `GET path` on its own connection and returns the response's status line.
async fn status_line(gateway: &TestGateway, path: &str) -> String {
    let raw = format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
    let response = send_raw(gateway.addr, raw.as_bytes(), Duration::from_secs(10)).await;
    let response = String::from_utf8_lossy(&response).into_owned();
    response.lines().next().unwrap_or_default().to_string()
}

fn paths(upstream: &TestUpstream) -> Vec<String> {
    upstream
        .received()
        .into_iter()
        .map(|r| r.path_and_query)
        .collect()
}

#[tokio::test]
async fn broken_escapes_in_the_path_get_400() {
    let upstream = TestUpstream::start().await;
    let route = "[[routes]]\nname = \"all\"\nupstream = \"app\"\n";
    let gateway = TestGateway::start(&upstream, route).await;
    for path in ["/public/%", "/public/x%2", "/public/%zz", "/public/x%00y"] {
        let line = status_line(&gateway, path).await;
        assert!(line.starts_with("HTTP/1.1 400"), "{path}: {line}");
    }
    assert!(upstream.received().is_empty());
    let metrics = gateway.metrics().await;
    let series = r#"sluice_requests_rejected_total{reason="invalid_path",route=""}"#;
    assert_eq!(sluice_tests::metric(&metrics, series), 4.0, "{metrics}");
}

#[tokio::test]
async fn encoded_slashes_are_rejected_kept_or_decoded_as_configured() {
    let escaped = "/public/x%2F..%2F..%5Cadmin";
    for (action, public, admin_paths) in [
        ("reject", vec![], vec![]),
        ("keep", vec![escaped.to_string()], vec![]),
        ("decode", vec![], vec!["/admin".to_string()]),
    ] {
        let (upstream, admin) = (TestUpstream::start().await, TestUpstream::start().await);
        let listener = format!("encoded_slash = \"{action}\"");
        let gateway = public_and_admin(&upstream, &admin, &listener).await;
        let status = status_line(&gateway, escaped).await;
        let expected = if action == "reject" { "400" } else { "200" };
        assert!(
            status.starts_with(&format!("HTTP/1.1 {expected}")),
            "{action}: {status}"
        );
        assert_eq!(paths(&upstream), public, "{action}: the public upstream");
        assert_eq!(paths(&admin), admin_paths, "{action}: the admin upstream");
    }
}

#[tokio::test]
async fn escapes_of_unreserved_characters_are_decoded_before_routing() {
    let (upstream, admin) = (TestUpstream::start().await, TestUpstream::start().await);
    let gateway = public_and_admin(&upstream, &admin, "").await;

    let status = status_line(&gateway, "/public/%2E%2e/%61dmin/%7eme?q=%61").await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let status = status_line(&gateway, "/public/a%0d%0aX-Injected:%20yes").await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(paths(&admin), ["/admin/~me?q=%61"]);
    assert_eq!(paths(&upstream), ["/public/a%0D%0AX-Injected:%20yes"]);
}

#[tokio::test]
async fn dot_segments_are_resolved_before_routing_and_encoded_slashes_refused() {
    let upstream = TestUpstream::start().await;
    let admin = TestUpstream::start().await;
    let fragment = format!(
        r#"
[[upstreams]]
name = "admin"
targets = ["{}"]

[[routes]]
name = "public"
path_prefix = "/public/"
upstream = "app"

[[routes]]
name = "admin"
path_prefix = "/admin"
upstream = "admin"
"#,
        admin.addr
    );
    let gateway = TestGateway::start(&upstream, &fragment).await;

    let raw = b"GET /public/../admin/users?x=1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    send_raw(gateway.addr, raw, Duration::from_secs(10)).await;
    let raw = b"GET /public/%2e%2E/admin HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    send_raw(gateway.addr, raw, Duration::from_secs(10)).await;
    assert!(
        upstream.received().is_empty(),
        "the public route never sees an admin path"
    );
    let paths: Vec<_> = admin
        .received()
        .into_iter()
        .map(|r| r.path_and_query)
        .collect();
    assert_eq!(
        paths,
        ["/admin/users?x=1", "/admin"],
        "routed and forwarded on the resolved path"
    );

    let raw = b"GET /public%2F..%2Fadmin HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    let refused = send_raw(gateway.addr, raw, Duration::from_secs(10)).await;
    assert!(
        refused.starts_with(b"HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&refused)
    );
    assert_eq!(admin.received().len(), 2);
}
