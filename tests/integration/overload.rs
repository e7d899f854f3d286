//! Overload protection: bounded queues shed excess at once, slow upstreams fill only their own
//! bulkhead, idle connections are closed, and every queue shows in the metrics.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use sluice_tests::{Reply, TestGateway, TestUpstream, get, send, send_raw};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

async fn slow_get(url: String, delay_ms: u64) -> (Reply, Instant) {
    let request = Request::get(url)
        .header("x-delay-ms", delay_ms.to_string())
        .body(Bytes::new())
        .unwrap();
    let reply = send(request).await;
    (reply, Instant::now())
}

fn metric(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

/// The metrics text once `series` has reached `value`, or after a few seconds regardless.
async fn wait_for_metric(gateway: &TestGateway, series: &str, value: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let metrics = gateway.metrics().await;
        if metric(&metrics, series) >= Some(value) || Instant::now() > deadline {
            return metrics;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn excess_requests_are_shed_at_once_and_the_queue_is_served_in_order() {
    let upstream = TestUpstream::start().await;
    let fragment = r#"
[[routes]]
name = "narrow"
upstream = "app"
max_in_flight = 2
max_queued = 2
queue_timeout_ms = 10_000
"#;
    let gateway = TestGateway::start(&upstream, fragment).await;

    let requests: Vec<_> = (0..20)
        .map(|_| tokio::spawn(slow_get(gateway.url("/work"), 1500)))
        .collect();
    let rejected = r#"sluice_requests_rejected_total{reason="queue_full",route="narrow"}"#;
    let during = wait_for_metric(&gateway, rejected, 16.0).await;
    let mut replies = Vec::new();
    for request in requests {
        replies.push(request.await.unwrap());
    }

    let (served, shed): (Vec<_>, Vec<_>) = replies
        .iter()
        .partition(|(r, _)| r.status == StatusCode::OK);
    assert_eq!(served.len(), 4, "two in flight and two queued are served");
    let first_served = served.iter().map(|(_, at)| *at).min().unwrap();
    for (reply, at) in &shed {
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(reply.json()["error"], "queue_full");
        assert_eq!(reply.header("retry-after"), Some("1"));
        assert!(
            *at < first_served,
            "shed responses do not wait for the upstream"
        );
    }
    assert_eq!(
        metric(&during, r#"sluice_in_flight{route="narrow"}"#),
        Some(2.0),
        "{during}"
    );
    assert_eq!(
        metric(&during, r#"sluice_queue_depth{route="narrow"}"#),
        Some(2.0)
    );
    assert_eq!(
        metric(&during, r#"sluice_queue_capacity{route="narrow"}"#),
        Some(2.0)
    );

    let after = gateway.metrics().await;
    assert_eq!(metric(&after, rejected), Some(16.0));
    assert_eq!(
        metric(&after, r#"sluice_in_flight{route="narrow"}"#),
        Some(0.0)
    );
    assert_eq!(
        get(&gateway.url("/after")).await.status,
        StatusCode::OK,
        "serves normally after"
    );
}

#[tokio::test]
async fn a_request_that_waits_past_the_queue_timeout_gets_503() {
    let upstream = TestUpstream::start().await;
    let fragment = r#"
[[routes]]
name = "single"
upstream = "app"
max_in_flight = 1
max_queued = 10
queue_timeout_ms = 100
"#;
    let gateway = TestGateway::start(&upstream, fragment).await;

    let busy = tokio::spawn(slow_get(gateway.url("/busy"), 800));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let waited = get(&gateway.url("/waits")).await;

    assert_eq!(waited.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(waited.json()["error"], "queue_timeout");
    assert_eq!(busy.await.unwrap().0.status, StatusCode::OK);
}

#[tokio::test]
async fn a_saturated_slow_upstream_does_not_slow_routes_to_other_upstreams() {
    let fast = TestUpstream::start().await;
    let slow = TestUpstream::start().await;
    let fragment = format!(
        r#"
[[upstreams]]
name = "slow"
targets = ["{}"]
max_in_flight = 3

[[routes]]
name = "slow"
path_prefix = "/slow"
upstream = "slow"

[[routes]]
name = "fast"
path_prefix = "/fast"
upstream = "app"
"#,
        slow.addr
    );
    let gateway = TestGateway::start(&fast, &fragment).await;

    let slow_requests: Vec<_> = (0..10)
        .map(|_| tokio::spawn(slow_get(gateway.url("/slow"), 1500)))
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..5 {
        let reply = get(&gateway.url("/fast")).await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    assert!(
        !slow_requests[0].is_finished(),
        "the fast route was served while the slow one waited"
    );

    let mut statuses = Vec::new();
    for request in slow_requests {
        let (reply, _) = request.await.unwrap();
        if reply.status != StatusCode::OK {
            assert_eq!(reply.json()["error"], "upstream_saturated");
        }
        statuses.push(reply.status);
    }
    let served = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    assert_eq!(
        served, 3,
        "only the bulkhead's slots reach the slow upstream: {statuses:?}"
    );
}

#[tokio::test]
async fn idle_and_trickling_connections_are_closed_by_the_header_deadline() {
    let upstream = TestUpstream::start().await;
    let fragment = "[[routes]]\nname = \"r\"\nupstream = \"app\"\n";
    let gateway =
        TestGateway::start_with(&upstream, "header_read_timeout_ms = 500", fragment).await;

    let mut idle = Vec::new();
    for _ in 0..1000 {
        idle.push(TcpStream::connect(gateway.addr).await.unwrap());
    }
    let trickle = tokio::spawn(trickle(gateway.addr));
    assert_eq!(get(&gateway.url("/meanwhile")).await.status, StatusCode::OK);

    tokio::time::sleep(Duration::from_millis(1500)).await;
    for stream in &mut idle {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "an idle connection is closed"
        );
    }
    let trickled = trickle.await.unwrap();
    assert!(
        trickled < Duration::from_secs(3),
        "a trickling client is cut off: {trickled:?}"
    );
    let metrics = gateway.metrics().await;
    let rejected = metric(
        &metrics,
        r#"sluice_connections_rejected_total{reason="header_timeout"}"#,
    );
    assert!(rejected >= Some(1000.0), "{rejected:?}");
    assert_eq!(get(&gateway.url("/after")).await.status, StatusCode::OK);
}

/// Sends a request header one byte every 100 ms; returns how long the gateway let it go on.
async fn trickle(addr: std::net::SocketAddr) -> Duration {
    use tokio::io::AsyncWriteExt;
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    for byte in b"GET / HTTP/1.1\r\nHost: slow\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n" {
        if stream.write_all(&[*byte]).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    started.elapsed()
}

#[tokio::test]
async fn the_connection_cap_makes_new_clients_wait_not_fail() {
    let upstream = TestUpstream::start().await;
    let fragment = "[[routes]]\nname = \"r\"\nupstream = \"app\"\n";
    let listener = "max_connections = 1\nheader_read_timeout_ms = 700";
    let gateway = TestGateway::start_with(&upstream, listener, fragment).await;

    let _hog = TcpStream::connect(gateway.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    let reply = get(&gateway.url("/waits-for-a-slot")).await;

    assert_eq!(reply.status, StatusCode::OK);
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "served only once the idle one was closed"
    );
}

#[tokio::test]
async fn bodies_over_the_cap_get_413_and_reach_nothing() {
    let upstream = TestUpstream::start().await;
    let fragment = "[[routes]]\nname = \"r\"\nupstream = \"app\"\n";
    let gateway = TestGateway::start_with(&upstream, "max_body_bytes = 1024", fragment).await;

    let declared = send(
        Request::post(gateway.url("/big"))
            .body(Bytes::from(vec![b'x'; 2048]))
            .unwrap(),
    )
    .await;
    assert_eq!(declared.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(declared.json()["error"], "body_too_large");

    let mut chunked =
        b"POST /big HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            .to_vec();
    for _ in 0..4 {
        chunked.extend_from_slice(b"200\r\n");
        chunked.extend_from_slice(&[b'y'; 0x200]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let streamed = send_raw(gateway.addr, &chunked, Duration::from_secs(5)).await;
    assert!(
        streamed.starts_with(b"HTTP/1.1 413"),
        "{}",
        String::from_utf8_lossy(&streamed)
    );

    let small = send(
        Request::post(gateway.url("/small"))
            .body(Bytes::from(vec![b'x'; 1000]))
            .unwrap(),
    )
    .await;
    assert_eq!(small.status, StatusCode::OK);
    assert!(upstream.received().iter().all(|r| r.body.len() <= 1024));
}

#[tokio::test]
async fn a_route_that_takes_too_long_answers_504() {
    let upstream = TestUpstream::start().await;
    let fragment = "[[routes]]\nname = \"r\"\nupstream = \"app\"\nrequest_timeout_ms = 200\n";
    let gateway = TestGateway::start(&upstream, fragment).await;

    let (reply, _) = slow_get(gateway.url("/slow"), 2000).await;

    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(reply.json()["error"], "request_timeout");
    let metrics = gateway.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            r#"sluice_requests_rejected_total{reason="request_timeout",route="r"}"#
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn a_client_that_stops_sending_its_body_gets_408_not_504() {
    let upstream = TestUpstream::start().await;
    let fragment = "[[routes]]\nname = \"r\"\nupstream = \"app\"\nrequest_timeout_ms = 300\n";
    let gateway = TestGateway::start(&upstream, fragment).await;

    for raw in [
        &b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nfirst"[..],
        b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n",
    ] {
        let response = send_raw(gateway.addr, raw, Duration::from_secs(5)).await;
        let response = String::from_utf8_lossy(&response);
        assert!(response.starts_with("HTTP/1.1 408"), "{response}");
        assert!(response.contains("client_body_timeout"), "{response}");
    }
    let metrics = gateway.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            r#"sluice_requests_rejected_total{reason="client_body_timeout",route="r"}"#
        ),
        Some(2.0)
    );
}
