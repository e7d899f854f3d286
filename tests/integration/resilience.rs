//! Upstream resilience against real misbehaving servers: status mapping, retries and their
//! budget, the circuit breaker, load balancing, and active and passive health checks.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sluice_tests::faulty::{self, ControlledUpstream};
use sluice_tests::{Reply, TestGateway, TestUpstream, get, metric, send, send_raw};

/// A gateway with one route, `/`, to an upstream called `pool` set up by `upstream` (its
/// `targets` and any other keys and sub-tables).
async fn gateway(upstream: &str) -> TestGateway {
    let app = TestUpstream::start().await;
    let fragment = format!(
        "[[routes]]\nname = \"pool\"\nupstream = \"pool\"\n\n\
         [[upstreams]]\nname = \"pool\"\n{upstream}\n"
    );
    TestGateway::start(&app, &fragment).await
}

/// Polls the gateway's metrics until `series` has `value`, for up to five seconds.
async fn wait_for_metric(gateway: &TestGateway, series: &str, value: f64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = gateway.metrics().await;
        if metric(&text, series) == value {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} never became {value}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn healthy_series(target: &ControlledUpstream) -> String {
    format!(
        "sluice_upstream_target_healthy{{target=\"{}\",upstream=\"pool\"}}",
        target.addr
    )
}

/// One client with a connection pool, for tests that send many requests.
fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn get_with(client: &Client<HttpConnector, Full<Bytes>>, url: &str) -> Reply {
    let request = Request::get(url)
        .body(Full::new(Bytes::new()))
        .expect("valid");
    let response = client.request(request).await.expect("response");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

#[tokio::test]
async fn failures_map_to_502_504_and_503_with_their_reason() {
    let (refused, reset, silent) = (
        faulty::refusing().await,
        faulty::resetting().await,
        faulty::silent().await,
    );
    let app = TestUpstream::start().await;
    let mut fragment = String::new();
    for (name, target) in [("refused", refused), ("reset", reset), ("silent", silent)] {
        fragment += &format!(
            "[[routes]]\nname = \"{name}\"\npath_prefix = \"/{name}\"\nupstream = \"{name}\"\n\
             [[upstreams]]\nname = \"{name}\"\ntargets = [\"{target}\"]\ntry_timeout_ms = 300\n\
             [upstreams.retry]\nmax_retries = 0\n"
        );
    }
    let gateway = TestGateway::start(&app, &fragment).await;

    for (path, status, reason) in [
        ("/refused", StatusCode::BAD_GATEWAY, "upstream_unavailable"),
        ("/reset", StatusCode::BAD_GATEWAY, "upstream_reset"),
        ("/silent", StatusCode::GATEWAY_TIMEOUT, "upstream_timeout"),
    ] {
        let reply = get(&gateway.url(path)).await;
        assert_eq!(reply.status, status, "{path}: {}", reply.text());
        assert_eq!(reply.json()["error"], reason, "{path}");
    }
    let metrics = gateway.metrics().await;
    for series in [
        "sluice_upstream_requests_total{status=\"connect_failed\",upstream=\"refused\"} 1",
        "sluice_upstream_requests_total{status=\"reset\",upstream=\"reset\"} 1",
        "sluice_upstream_requests_total{status=\"timeout\",upstream=\"silent\"} 1",
    ] {
        assert!(metrics.contains(series), "{series} missing:\n{metrics}");
    }
}

#[tokio::test]
async fn a_connect_that_never_completes_gets_504_after_the_connect_timeout() {
    let (addr, _backlog) = faulty::unanswered_syn().await;
    let gateway = gateway(&format!(
        "targets = [\"{addr}\"]\nconnect_timeout_ms = 300\n[upstreams.retry]\nmax_retries = 0\n"
    ))
    .await;

    let started = Instant::now();
    let reply = get(&gateway.url("/")).await;
    assert_eq!(
        reply.status,
        StatusCode::GATEWAY_TIMEOUT,
        "{}",
        reply.text()
    );
    assert_eq!(reply.json()["error"], "upstream_connect_timeout");
    assert!(started.elapsed() >= Duration::from_millis(300));
    let metrics = gateway.metrics().await;
    let series = "sluice_upstream_requests_total{status=\"connect_timeout\",upstream=\"pool\"}";
    assert_eq!(metric(&metrics, series), 1.0, "{metrics}");
}

#[tokio::test]
async fn a_keep_alive_connection_closed_under_a_request_retries_a_get_but_not_a_post() {
    let (addr, seen) = faulty::closing_after_first().await;
    let gateway = gateway(&format!("targets = [\"{addr}\"]")).await;

    assert_eq!(get(&gateway.url("/one")).await.status, StatusCode::OK);
    // The pooled connection is reused; the upstream reads the GET and closes.
    let retried = get(&gateway.url("/two")).await;
    assert_eq!(retried.status, StatusCode::OK, "{}", retried.text());
    assert_eq!(seen.load(Ordering::SeqCst), 3, "first, cut off, retried");

    // The retry's connection is pooled in turn; a POST on it is cut off and not sent again.
    let post = Request::post(gateway.url("/three"))
        .body(Bytes::from_static(b"payload"))
        .expect("valid");
    let reply = send(post).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
    assert_eq!(reply.json()["error"], "upstream_reset");
    assert_eq!(seen.load(Ordering::SeqCst), 4, "the POST reached it once");

    let metrics = gateway.metrics().await;
    let retries = "sluice_upstream_retries_total{reason=\"reset\",upstream=\"pool\"}";
    assert_eq!(metric(&metrics, retries), 1.0, "{metrics}");
}

#[tokio::test]
async fn the_breaker_opens_admits_only_its_probes_when_half_open_then_closes() {
    let upstream = ControlledUpstream::start().await;
    upstream.set_status(503);
    let gateway = gateway(&format!(
        "targets = [\"{}\"]\n[upstreams.retry]\nmax_retries = 0\n\
         [upstreams.circuit_breaker]\nconsecutive_failures = 3\nopen_ms = 500\nhalf_open_probes = 2\n",
        upstream.addr
    ))
    .await;

    for _ in 0..3 {
        let reply = get(&gateway.url("/")).await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            reply.text(),
            upstream.addr.to_string(),
            "the upstream's own 503"
        );
    }
    let fast = get(&gateway.url("/")).await;
    assert_eq!(fast.json()["error"], "circuit_open");
    assert!(fast.header("retry-after").is_some());
    assert_eq!(upstream.served(), 3, "an open circuit sends nothing");
    wait_for_metric(
        &gateway,
        "sluice_upstream_circuit_state{upstream=\"pool\"}",
        1.0,
    )
    .await;

    upstream.set_status(200);
    upstream.set_delay(Duration::from_millis(400));
    tokio::time::sleep(Duration::from_millis(600)).await;
    let requests: Vec<_> = (0..5)
        .map(|_| {
            let url = gateway.url("/");
            tokio::spawn(async move { get(&url).await.status })
        })
        .collect();
    let mut statuses = Vec::new();
    for request in requests {
        statuses.push(request.await.expect("request task"));
    }
    let passed = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    assert_eq!(passed, 2, "only the probes pass: {statuses:?}");
    assert_eq!(upstream.served(), 5);

    upstream.set_delay(Duration::ZERO);
    assert_eq!(
        get(&gateway.url("/")).await.status,
        StatusCode::OK,
        "closed"
    );
    let metrics = gateway.metrics().await;
    assert_eq!(
        metric(&metrics, "sluice_upstream_circuit_state{upstream=\"pool\"}"),
        0.0
    );
    for state in ["open", "half_open", "closed"] {
        let series = format!(
            "sluice_upstream_circuit_transitions_total{{state=\"{state}\",upstream=\"pool\"}}"
        );
        assert_eq!(metric(&metrics, &series), 1.0, "{series}\n{metrics}");
    }
}

#[tokio::test]
async fn a_retry_budget_of_20_percent_bounds_retries_of_200_failing_requests() {
    let upstream = ControlledUpstream::start().await;
    upstream.set_status(503);
    upstream.set_delay(Duration::from_millis(100));
    let gateway = gateway(&format!(
        "targets = [\"{}\"]\n[upstreams.retry]\nmax_retries = 1\non_status = [503]\n\
         budget_percent = 20\nmin_retries_in_flight = 1\nbackoff_base_ms = 10\n",
        upstream.addr
    ))
    .await;

    let requests: Vec<_> = (0..200)
        .map(|_| {
            let url = gateway.url("/");
            tokio::spawn(async move { get(&url).await.status })
        })
        .collect();
    for request in requests {
        assert_eq!(
            request.await.expect("task"),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    let retries = upstream.served() - 200;
    assert!(retries > 0, "some requests were retried");
    assert!(retries <= 45, "{retries} retries for 200 requests");
    let metrics = gateway.metrics().await;
    let refused = "sluice_upstream_retries_total{reason=\"budget_exhausted\",upstream=\"pool\"}";
    assert!(metric(&metrics, refused) > 0.0, "{metrics}");
}

#[tokio::test]
async fn an_adaptive_limit_falls_when_the_upstream_queues_and_the_excess_is_shed() {
    let (addr, present) = faulty::queueing(Duration::from_millis(10)).await;
    let gateway = gateway(&format!(
        "targets = [\"{addr}\"]\n[upstreams.adaptive_concurrency]\ninitial_limit = 40\n"
    ))
    .await;
    let limit = "sluice_upstream_concurrency_limit{upstream=\"pool\"}";
    assert_eq!(metric(&gateway.metrics().await, limit), 40.0);

    // One at a time, every answer takes the service time: the upstream's usual latency.
    let client = client();
    for _ in 0..20 {
        let reply = get_with(&client, &gateway.url("/")).await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    // Forty clients at once for twelve seconds, past the limiter's first probe of the
    // upstream's own latency: unlimited, each would wait behind 39 others.
    let until = Instant::now() + Duration::from_secs(12);
    let clients: Vec<_> = (0..40)
        .map(|_| {
            let (client, url) = (client.clone(), gateway.url("/"));
            tokio::spawn(async move {
                let (mut served, mut shed) = (0, 0);
                while Instant::now() < until {
                    let reply = get_with(&client, &url).await;
                    if reply.status == StatusCode::OK {
                        served += 1;
                    } else {
                        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
                        assert_eq!(reply.json()["error"], "upstream_saturated");
                        shed += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                (served, shed)
            })
        })
        .collect();
    // Once the limit has settled, the upstream's own queue stays short, and stays so.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut queued = 0;
    while Instant::now() < until {
        queued = queued.max(present.load(Ordering::SeqCst));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (mut served, mut shed) = (0, 0);
    for counts in clients {
        let (s, r) = counts.await.expect("client task");
        (served, shed) = (served + s, shed + r);
    }

    let settled = metric(&gateway.metrics().await, limit);
    assert!(settled <= 15.0, "the limit stayed at {settled}");
    assert!(queued <= 20, "{queued} requests queued in the upstream");
    assert!(served > 0 && shed > 0, "{served} served, {shed} shed");
}

#[tokio::test]
async fn weighted_round_robin_follows_the_weights() {
    let (light, heavy) = (
        ControlledUpstream::start().await,
        ControlledUpstream::start().await,
    );
    let gateway = gateway(&format!(
        "load_balancing = \"weighted_round_robin\"\n\
         targets = [{{ address = \"{}\", weight = 1 }}, {{ address = \"{}\", weight = 3 }}]",
        light.addr, heavy.addr
    ))
    .await;

    let client = client();
    for _ in 0..1000 {
        assert_eq!(
            get_with(&client, &gateway.url("/")).await.status,
            StatusCode::OK
        );
    }
    let (light, heavy) = (light.served(), heavy.served());
    assert!(
        light.abs_diff(250) <= 25 && heavy.abs_diff(750) <= 25,
        "{light} / {heavy}"
    );
}

#[tokio::test]
async fn consistent_hashing_keeps_a_key_on_one_target() {
    let targets = [
        ControlledUpstream::start().await,
        ControlledUpstream::start().await,
        ControlledUpstream::start().await,
    ];
    let list: Vec<String> = targets.iter().map(|t| format!("\"{}\"", t.addr)).collect();
    let gateway = gateway(&format!(
        "load_balancing = \"consistent_hash\"\nhash_on = {{ header = \"x-user\" }}\n\
         targets = [{}]",
        list.join(", ")
    ))
    .await;

    let mut chosen = std::collections::HashSet::new();
    for user in 0..12 {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..4 {
            let request = Request::get(gateway.url("/"))
                .header("x-user", format!("user-{user}"))
                .body(Bytes::new())
                .expect("valid");
            seen.insert(send(request).await.text());
        }
        assert_eq!(seen.len(), 1, "user-{user} went to {seen:?}");
        chosen.extend(seen);
    }
    assert!(
        chosen.len() >= 2,
        "12 keys spread over the targets: {chosen:?}"
    );
}

#[tokio::test]
async fn least_request_avoids_the_target_with_requests_in_flight() {
    let (slow, fast) = (
        ControlledUpstream::start().await,
        ControlledUpstream::start().await,
    );
    slow.set_delay(Duration::from_secs(2));
    let gateway = gateway(&format!(
        "load_balancing = \"least_request\"\ntargets = [\"{}\", \"{}\"]",
        slow.addr, fast.addr
    ))
    .await;

    let burst: Vec<_> = (0..20)
        .map(|_| {
            let url = gateway.url("/");
            tokio::spawn(async move { get(&url).await.status })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stuck = slow.served();
    assert!(stuck >= 1, "the burst reached both targets");
    let client = client();
    for _ in 0..10 {
        assert_eq!(
            get_with(&client, &gateway.url("/")).await.text(),
            fast.addr.to_string()
        );
    }
    assert_eq!(slow.served(), stuck, "nothing more went to the busy target");
    for request in burst {
        assert_eq!(request.await.expect("task"), StatusCode::OK);
    }
}

#[tokio::test]
async fn a_target_failing_health_checks_gets_no_traffic_until_it_recovers() {
    let (steady, flaky) = (
        ControlledUpstream::start().await,
        ControlledUpstream::start().await,
    );
    let gateway = gateway(&format!(
        "targets = [\"{}\", \"{}\"]\n[upstreams.health_check]\npath = \"/healthz\"\n\
         interval_ms = 100\ntimeout_ms = 200\nhealthy_threshold = 2\nunhealthy_threshold = 2\n",
        steady.addr, flaky.addr
    ))
    .await;
    let client = client();

    flaky.set_health(503);
    wait_for_metric(&gateway, &healthy_series(&flaky), 0.0).await;
    let before = flaky.served();
    for _ in 0..20 {
        assert_eq!(
            get_with(&client, &gateway.url("/")).await.status,
            StatusCode::OK
        );
    }
    assert_eq!(flaky.served(), before, "an unhealthy target gets nothing");

    flaky.set_health(200);
    wait_for_metric(&gateway, &healthy_series(&flaky), 1.0).await;
    for _ in 0..20 {
        get_with(&client, &gateway.url("/")).await;
    }
    assert_eq!(flaky.served() - before, 10, "back in the rotation");
    assert!(steady.checked() > 0 && flaky.checked() > 0);
}

#[tokio::test]
async fn a_target_answering_5xx_is_ejected_for_a_while_then_returns() {
    let (steady, failing) = (
        ControlledUpstream::start().await,
        ControlledUpstream::start().await,
    );
    failing.set_status(500);
    let gateway = gateway(&format!(
        "targets = [\"{}\", \"{}\"]\n[upstreams.retry]\nmax_retries = 0\n\
         [upstreams.outlier_detection]\nconsecutive_failures = 3\nbase_ejection_ms = 700\n",
        steady.addr, failing.addr
    ))
    .await;
    let client = client();

    for _ in 0..30 {
        get_with(&client, &gateway.url("/")).await;
    }
    assert_eq!(failing.served(), 3, "ejected after three failures in a row");
    let metrics = gateway.metrics().await;
    assert_eq!(
        metric(&metrics, &healthy_series(&failing)),
        0.0,
        "{metrics}"
    );
    let ejections = format!(
        "sluice_upstream_target_ejections_total{{target=\"{}\",upstream=\"pool\"}}",
        failing.addr
    );
    assert_eq!(metric(&metrics, &ejections), 1.0);

    failing.set_status(200);
    wait_for_metric(&gateway, &healthy_series(&failing), 1.0).await;
    for _ in 0..10 {
        get_with(&client, &gateway.url("/")).await;
    }
    assert!(failing.served() > 3, "back after the ejection");
}

#[tokio::test]
async fn an_upstream_dying_mid_body_aborts_the_client_connection() {
    for chunked in [false, true] {
        let addr = faulty::truncating(chunked).await;
        let gateway = gateway(&format!("targets = [\"{addr}\"]")).await;
        let request = format!("GET / HTTP/1.1\r\nhost: {}\r\n\r\n", gateway.addr);
        let started = Instant::now();
        let raw = send_raw(gateway.addr, request.as_bytes(), Duration::from_secs(5)).await;
        let text = String::from_utf8_lossy(&raw);
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "closed, not left hanging"
        );
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.contains("0123456789"), "{text}");
        if chunked {
            assert!(
                !text.ends_with("0\r\n\r\n"),
                "no clean end of chunks: {text:?}"
            );
        } else {
            let body = &text[text.find("\r\n\r\n").expect("head") + 4..];
            assert!(body.len() < 100, "fewer bytes than announced: {text:?}");
        }
    }
}

#[tokio::test]
async fn a_failed_connect_is_retried_on_another_target_even_for_a_post_with_a_body() {
    let (refused, good) = (faulty::refusing().await, TestUpstream::start().await);
    let gateway = gateway(&format!("targets = [\"{refused}\", \"{}\"]", good.addr)).await;

    for _ in 0..4 {
        let post = Request::post(gateway.url("/orders"))
            .body(Bytes::from_static(b"payload"))
            .expect("valid");
        let reply = send(post).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    let received = good.received();
    assert_eq!(received.len(), 4, "each POST reached the good target once");
    assert!(received.iter().all(|r| &r.body[..] == b"payload"));
    let metrics = gateway.metrics().await;
    let retried = "sluice_upstream_retries_total{reason=\"connect_failed\",upstream=\"pool\"}";
    // Round robin starts every request on the refusing target; each was tried again.
    assert_eq!(metric(&metrics, retried), 4.0, "{metrics}");
}
