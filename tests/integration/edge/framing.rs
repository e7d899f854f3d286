//! Framing and header cases from raw HTTP/1.1 bytes: what is refused, what never reaches the
//! upstream, and which connections stay open.

use std::time::{Duration, Instant};

use sluice_tests::{RawConnection, TestGateway, TestUpstream};

use super::PLAIN_ROUTE;

/// Sends `raw` on a new connection and returns the response and whether the gateway then
/// closed the connection.
async fn refused(gateway: &TestGateway, raw: &[u8]) -> (u16, bool) {
    let mut connection = RawConnection::open(gateway.addr).await;
    connection.write(raw).await;
    let response = connection.response(false).await.expect("a response");
    let closed = connection.is_closed_within(Duration::from_secs(5)).await;
    (response.status(), closed)
}

#[tokio::test]
async fn hop_by_hop_headers_never_reach_the_upstream_and_a_client_close_keeps_the_pool() {
    let upstream = TestUpstream::start().await;
    let gateway = TestGateway::start(&upstream, PLAIN_ROUTE).await;

    for _ in 0..2 {
        let mut connection = RawConnection::open(gateway.addr).await;
        connection
            .write(
                b"GET /hop HTTP/1.1\r\nHost: example\r\nConnection: close, X-Secret, x-other\r\n\
                  X-Secret: 1\r\nX-Other: 2\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\n\
                  Proxy-Authorization: Basic Zm9vOmJhcg==\r\nTE: deflate\r\nTrailer: x-checksum\r\n\
                  Upgrade: h2c\r\nX-Kept: yes\r\n\r\n",
            )
            .await;
        assert_eq!(connection.response(false).await.unwrap().status(), 200);
        assert!(connection.is_closed_within(Duration::from_secs(5)).await);
    }

    let seen = upstream.last().headers;
    for name in [
        "connection",
        "x-secret",
        "x-other",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "te",
        "trailer",
        "upgrade",
        "transfer-encoding",
    ] {
        assert!(!seen.contains_key(name), "{name} reached the upstream");
    }
    assert_eq!(seen["x-kept"], "yes");
    assert_eq!(
        upstream.connections(),
        1,
        "the client's close did not close the pooled upstream connection"
    );
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_refused_and_the_connection_closed() {
    let upstream = TestUpstream::start().await;
    let gateway = TestGateway::start(&upstream, PLAIN_ROUTE).await;
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: example\r\n\r\n";

    for (first, second) in [
        ("Content-Length: 4", "Transfer-Encoding: chunked"),
        ("Transfer-Encoding: chunked", "Content-Length: 4"),
    ] {
        let raw = format!(
            "POST /upload HTTP/1.1\r\nHost: example\r\n{first}\r\n{second}\r\n\r\n0\r\n\r\n{smuggled}"
        );
        let (status, closed) = refused(&gateway, raw.as_bytes()).await;
        assert_eq!(status, 400, "{first} then {second}");
        assert!(closed, "{first} then {second}: the connection stays open");
    }
    assert!(upstream.received().is_empty(), "{:?}", upstream.received());

    let metrics = gateway.metrics().await;
    assert!(
        metrics
            .contains(r#"sluice_requests_rejected_total{reason="ambiguous_framing",route=""} 2"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn two_different_content_lengths_are_refused() {
    let upstream = TestUpstream::start().await;
    let gateway = TestGateway::start(&upstream, PLAIN_ROUTE).await;

    for lengths in [
        "Content-Length: 3\r\nContent-Length: 5",
        "Content-Length: 3, 5",
    ] {
        let raw = format!("POST / HTTP/1.1\r\nHost: example\r\n{lengths}\r\n\r\nabcde");
        let (status, closed) = refused(&gateway, raw.as_bytes()).await;
        assert_eq!(status, 400, "{lengths}");
        assert!(closed, "{lengths}");
    }
    assert!(upstream.received().is_empty());
}

#[tokio::test]
async fn a_space_before_the_colon_or_a_folded_header_is_refused() {
    let upstream = TestUpstream::start().await;
    let gateway = TestGateway::start(&upstream, PLAIN_ROUTE).await;

    for raw in [
        &b"POST / HTTP/1.1\r\nHost: example\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: example\r\nX-Folded: one\r\n two\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: example\r\nX-Folded: one\r\n\ttwo\r\n\r\n",
    ] {
        let (status, closed) = refused(&gateway, raw).await;
        assert_eq!(status, 400, "{}", String::from_utf8_lossy(raw));
        assert!(closed);
    }
    assert!(upstream.received().is_empty());
    let metrics = gateway.metrics().await;
    assert!(
        metrics.contains(r#"sluice_connections_rejected_total{reason="malformed_request"} 3"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_missing_repeated_or_malformed_host_is_refused_and_the_targets_authority_wins() {
    let upstream = TestUpstream::start().await;
    let gateway = TestGateway::start(&upstream, PLAIN_ROUTE).await;

    for raw in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: good.example\r\nHost: bad.example\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a b/c\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a, for=6.6.6.6\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a..b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a:99999\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: user@a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost:\r\n\r\n",
    ] {
        let (status, closed) = refused(&gateway, raw).await;
        assert_eq!(status, 400, "{}", String::from_utf8_lossy(raw));
        assert!(closed, "{}", String::from_utf8_lossy(raw));
    }
    assert!(upstream.received().is_empty());
    let metrics = gateway.metrics().await;
    for (reason, count) in [("missing_host", 1.0), ("invalid_host", 7.0)] {
        let series = format!("sluice_requests_rejected_total{{reason=\"{reason}\",route=\"\"}}");
        assert_eq!(sluice_tests::metric(&metrics, &series), count, "{metrics}");
    }

    // HTTP/1.0 needs no Host; a name with a port, an address and an IPv6 literal are hosts.
    for raw in [
        &b"GET / HTTP/1.0\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: Api.Example.com:8080\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n",
    ] {
        let mut connection = RawConnection::open(gateway.addr).await;
        connection.write(raw).await;
        let response = connection.response(false).await.expect("a response");
        assert_eq!(response.status(), 200, "{}", String::from_utf8_lossy(raw));
    }

    // An absolute-form target names the host; Host is replaced by it.
    let mut connection = RawConnection::open(gateway.addr).await;
    connection
        .write(b"GET http://good.example/x HTTP/1.1\r\nHost: bad.example\r\n\r\n")
        .await;
    assert_eq!(
        connection
            .response(false)
            .await
            .expect("a response")
            .status(),
        200
    );
    let seen = upstream.last().headers;
    assert_eq!(seen["host"], "good.example");
    assert_eq!(seen["x-forwarded-host"], "good.example");
}

#[tokio::test]
async fn oversized_headers_get_431_and_long_targets_414() {
    let upstream = TestUpstream::start().await;
    let listener = "max_header_bytes = 8192\nmax_uri_bytes = 1024";
    let gateway = TestGateway::start_with(&upstream, listener, PLAIN_ROUTE).await;

    let big_header = format!(
        "GET / HTTP/1.1\r\nHost: example\r\nX-Big: {}\r\n\r\n",
        "a".repeat(9000)
    );
    assert_eq!(refused(&gateway, big_header.as_bytes()).await, (431, true));

    let many_headers: String = (0..400).map(|i| format!("X-H{i}: {i}\r\n")).collect();
    let raw = format!("GET / HTTP/1.1\r\nHost: example\r\n{many_headers}\r\n");
    assert_eq!(refused(&gateway, raw.as_bytes()).await, (431, true));
    let metrics = gateway.metrics().await;
    assert!(
        metrics.contains(r#"sluice_connections_rejected_total{reason="header_too_large"} 2"#),
        "{metrics}"
    );

    let long_target = format!(
        "GET /{} HTTP/1.1\r\nHost: example\r\n\r\n",
        "p".repeat(1100)
    );
    let mut connection = RawConnection::open(gateway.addr).await;
    connection.write(long_target.as_bytes()).await;
    let response = connection.response(false).await.unwrap();
    assert_eq!(response.status(), 414);
    assert_eq!(
        String::from_utf8_lossy(&response.body),
        r#"{"error":"uri_too_long"}"#
    );
    assert!(connection.is_closed_within(Duration::from_secs(5)).await);
    assert!(upstream.received().is_empty());

    let fits = format!(
        "GET /{} HTTP/1.1\r\nHost: example\r\n\r\n",
        "p".repeat(1000)
    );
    let mut connection = RawConnection::open(gateway.addr).await;
    connection.write(fits.as_bytes()).await;
    assert_eq!(connection.response(false).await.unwrap().status(), 200);
}

#[tokio::test]
async fn bodiless_responses_come_back_at_once_on_a_reused_upstream_connection() {
    let upstream = TestUpstream::start().await;
    let gateway = TestGateway::start(&upstream, PLAIN_ROUTE).await;
    let mut connection = RawConnection::open(gateway.addr).await;

    for (request, head_only, status) in [
        (
            "GET /a HTTP/1.1\r\nHost: x\r\nX-Respond-Status: 204\r\n\r\n",
            true,
            204,
        ),
        (
            "GET /b HTTP/1.1\r\nHost: x\r\nX-Respond-Status: 304\r\n\r\n",
            true,
            304,
        ),
        (
            "HEAD /c HTTP/1.1\r\nHost: x\r\nX-Respond-Length: 1234\r\n\r\n",
            true,
            200,
        ),
        ("GET /d HTTP/1.1\r\nHost: x\r\n\r\n", false, 200),
    ] {
        let sent = Instant::now();
        connection.write(request.as_bytes()).await;
        let response = connection.response(head_only).await.expect("a response");
        assert_eq!(response.status(), status, "{request}");
        assert!(
            sent.elapsed() < Duration::from_secs(2),
            "{request} took {:?}",
            sent.elapsed()
        );
        if request.starts_with("HEAD") {
            assert_eq!(response.header("content-length"), Some("1234"));
        }
    }

    assert_eq!(upstream.received().len(), 4);
    assert_eq!(
        upstream.connections(),
        1,
        "the upstream connection was reused"
    );
}

#[tokio::test]
async fn an_encoded_crlf_in_the_path_never_becomes_a_header_line() {
    let upstream = TestUpstream::start().await;
    let fragment = r#"
[[plugins]]
name = "mirror-allow"
path = "{plugin:chaos}"
on_error = "allow"
config = { mode = "mirror" }

[[plugins]]
name = "mirror-deny"
path = "{plugin:chaos}"
config = { mode = "mirror" }

[[routes]]
name = "allow"
path_prefix = "/allow/"
upstream = "app"
policies = ["mirror-allow"]

[[routes]]
name = "deny"
path_prefix = "/deny/"
upstream = "app"
policies = ["mirror-deny"]
"#;
    let gateway = TestGateway::start(&upstream, fragment).await;

    let mut connection = RawConnection::open(gateway.addr).await;
    connection
        .write(b"GET /allow/a%0d%0aX-Injected:%20yes HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let allowed = connection.response(false).await.unwrap();
    connection
        .write(b"GET /deny/a%0D%0AX-Injected:%20yes HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let denied = connection.response(false).await.unwrap();

    // The policy's change carrying the decoded CR LF is refused whole: skipped under
    // `allow`, answered 503 under `deny`.
    assert_eq!(allowed.status(), 200, "{}", allowed.head);
    assert_eq!(denied.status(), 503, "{}", denied.head);
    for response in [&allowed, &denied] {
        assert!(response.header("x-injected").is_none(), "{}", response.head);
    }
    let seen = upstream.received();
    assert_eq!(seen.len(), 1);
    // The escapes reach the upstream still escaped, their hex uppercased.
    assert_eq!(seen[0].path_and_query, "/allow/a%0D%0AX-Injected:%20yes");
    assert!(!seen[0].headers.contains_key("x-injected"));
    assert!(!seen[0].headers.contains_key("x-decoded-path"));
}

#[tokio::test]
async fn an_ambiguous_request_is_refused_when_dripped_or_pipelined_behind_a_good_one() {
    let upstream = TestUpstream::start().await;
    let gateway = TestGateway::start(&upstream, PLAIN_ROUTE).await;
    let ambiguous =
        b"POST /ambiguous HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";

    let mut connection = RawConnection::open(gateway.addr).await;
    for piece in ambiguous.chunks(7) {
        connection.write(piece).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(connection.response(false).await.unwrap().status(), 400);
    assert!(connection.is_closed_within(Duration::from_secs(5)).await);

    // A good request with a body that looks like an ambiguous head is served; the ambiguous
    // request pipelined behind it is not.
    let mut pipelined = format!(
        "POST /good HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        ambiguous.len()
    )
    .into_bytes();
    pipelined.extend_from_slice(ambiguous);
    pipelined.extend_from_slice(ambiguous);
    let mut connection = RawConnection::open(gateway.addr).await;
    connection.write(&pipelined).await;
    assert_eq!(connection.response(false).await.unwrap().status(), 200);
    assert_eq!(connection.response(false).await.unwrap().status(), 400);
    assert!(connection.is_closed_within(Duration::from_secs(5)).await);

    let paths: Vec<_> = upstream
        .received()
        .into_iter()
        .map(|r| r.path_and_query)
        .collect();
    assert_eq!(paths, ["/good"]);
    assert_eq!(upstream.last().body, &ambiguous[..]);
}

/// An upstream that answers every request on a connection with hop-by-hop headers, one of
/// them named only in its `Connection` header.
async fn hop_by_hop_upstream() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut chunk = [0; 4096];
                loop {
                    let Ok(read @ 1..) = stream.read(&mut chunk).await else {
                        return;
                    };
                    head.extend_from_slice(&chunk[..read]);
                    if !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        continue;
                    }
                    head.clear();
                    let answer = b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Foo\r\n\
                        X-Foo: secret\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\n\
                        Proxy-Authenticate: Basic\r\nUpgrade: h2c\r\nX-Kept: yes\r\n\
                        Content-Length: 2\r\n\r\nok";
                    if stream.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn hop_by_hop_response_headers_never_reach_the_client() {
    let upstream = TestUpstream::external(hop_by_hop_upstream().await);
    let gateway = TestGateway::start(&upstream, PLAIN_ROUTE).await;

    let mut connection = RawConnection::open(gateway.addr).await;
    for _ in 0..2 {
        connection
            .write(b"GET /hop HTTP/1.1\r\nHost: example\r\n\r\n")
            .await;
        let response = connection.response(false).await.expect("a response");
        assert_eq!(response.status(), 200, "{}", response.head);
        assert_eq!(response.header("x-kept"), Some("yes"), "{}", response.head);
        assert_eq!(response.body, b"ok");
        for name in [
            "connection",
            "x-foo",
            "keep-alive",
            "proxy-connection",
            "proxy-authenticate",
            "upgrade",
        ] {
            assert_eq!(response.header(name), None, "{name}: {}", response.head);
        }
    }
}

#[tokio::test]
async fn a_length_padded_past_what_the_check_reads_is_refused() {
    let upstream = TestUpstream::start().await;
    let gateway = TestGateway::start(&upstream, PLAIN_ROUTE).await;
    // Read as 0, the padded length would hide nothing; read as 10, it covers "0123456789" and
    // the smuggled request after it must still be checked. Either way it is refused whole.
    let smuggled = "POST /smuggled HTTP/1.1\r\nHost: example\r\nContent-Length: 4\r\n\
        Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    for padded in [
        format!("Content-Length:{}10", " ".repeat(50)),
        format!("Content-Length: {}10", "0".repeat(60)),
    ] {
        let raw =
            format!("POST /a HTTP/1.1\r\nHost: example\r\n{padded}\r\n\r\n0123456789{smuggled}");
        assert_eq!(
            refused(&gateway, raw.as_bytes()).await,
            (400, true),
            "{padded}"
        );
    }
    assert!(upstream.received().is_empty(), "{:?}", upstream.received());
}

#[tokio::test]
async fn trace_and_connect_are_refused_with_405() {
    let upstream = TestUpstream::start().await;
    let gateway = TestGateway::start(&upstream, PLAIN_ROUTE).await;
    let allows = |response: &sluice_tests::RawResponse| {
        let allow = response.header("allow").unwrap_or_default();
        allow.contains("GET") && !allow.contains("TRACE") && !allow.contains("CONNECT")
    };

    // TRACE is refused and the connection goes on serving.
    let mut connection = RawConnection::open(gateway.addr).await;
    connection
        .write(b"TRACE /echo HTTP/1.1\r\nHost: example\r\nAuthorization: Bearer secret\r\n\r\n")
        .await;
    let traced = connection.response(false).await.expect("a response");
    assert_eq!(traced.status(), 405);
    assert!(allows(&traced));
    connection
        .write(b"GET /after HTTP/1.1\r\nHost: example\r\n\r\n")
        .await;
    assert_eq!(connection.response(false).await.unwrap().status(), 200);

    // CONNECT is refused, and like any upgrade not taken its connection is closed.
    let (status, closed) = refused(
        &gateway,
        b"CONNECT internal.example:22 HTTP/1.1\r\nHost: internal.example:22\r\n\r\n",
    )
    .await;
    assert_eq!(status, 405);
    assert!(closed);

    let paths: Vec<_> = upstream
        .received()
        .into_iter()
        .map(|r| r.path_and_query)
        .collect();
    assert_eq!(paths, ["/after"]);
}

#[tokio::test]
async fn an_http10_upstream_is_answered_to_the_client_as_http11_on_a_kept_connection() {
    let upstream = TestUpstream::external(sluice_tests::faulty::http10().await);
    let gateway = TestGateway::start(&upstream, PLAIN_ROUTE).await;

    let mut connection = RawConnection::open(gateway.addr).await;
    for _ in 0..2 {
        connection
            .write(b"GET /old HTTP/1.1\r\nHost: example\r\n\r\n")
            .await;
        let response = connection.response(false).await.expect("a response");
        assert!(
            response.head.starts_with("HTTP/1.1 200"),
            "{}",
            response.head
        );
        assert_eq!(response.body, b"ok");
    }
}
