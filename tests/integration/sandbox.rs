//! The plugin sandbox: traps, endless loops, unbounded memory, invalid header changes and
//! instance reuse, each with a real misbehaving policy (`tests/guests/chaos`).

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use sluice_tests::{TestGateway, TestUpstream, get, send};

/// A config with one chaos plugin on route `/chaos` and a plain route `/plain`.
fn chaos_config(mode: &str, extra: &str) -> String {
    format!(
        r#"
[[plugins]]
name = "chaos"
path = "{{plugin:chaos}}"
{extra}
config = {{ mode = "{mode}" }}

[[routes]]
name = "chaos"
path_prefix = "/chaos"
upstream = "app"
policies = ["chaos"]

[[routes]]
name = "plain"
path_prefix = "/plain"
upstream = "app"
"#
    )
}

fn failures(metrics: &str, reason: &str) -> u64 {
    let prefix = format!(r#"sluice_plugin_failures_total{{plugin="chaos",reason="{reason}"}} "#);
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map_or(0, |n| n.parse().expect("a count"))
}

#[tokio::test]
async fn a_pooled_instance_is_reused_and_replaced_after_a_trap() {
    let upstream = TestUpstream::start().await;
    let gateway = TestGateway::start(
        &upstream,
        &chaos_config("trap-on-header", "max_instances = 1"),
    )
    .await;

    get(&gateway.url("/chaos/1")).await;
    let first = upstream.last().headers;
    get(&gateway.url("/chaos/2")).await;
    let second = upstream.last().headers;
    assert_eq!(
        first["x-instance-born"], second["x-instance-born"],
        "the instance is reused"
    );
    assert_eq!(second["x-instance-calls"], "2");

    let trap = send(
        Request::get(gateway.url("/chaos/3"))
            .header("x-chaos-trap", "1")
            .body(Bytes::new())
            .unwrap(),
    )
    .await;
    assert_eq!(trap.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(trap.json()["error"], "policy_failed");
    assert_eq!(trap.header("retry-after"), Some("1"));
    assert_eq!(
        upstream.received().len(),
        2,
        "nothing is forwarded after a trap"
    );

    let after = get(&gateway.url("/chaos/4")).await;
    assert_eq!(after.status, StatusCode::OK);
    let fresh = upstream.last().headers;
    assert_ne!(
        fresh["x-instance-born"], second["x-instance-born"],
        "the trapped instance is replaced"
    );
    assert_eq!(fresh["x-instance-calls"], "1");
    assert_eq!(failures(&gateway.metrics().await, "trap"), 1);
}

#[tokio::test]
async fn isolation_per_request_gives_every_request_a_fresh_instance() {
    let upstream = TestUpstream::start().await;
    let gateway =
        TestGateway::start(&upstream, &chaos_config("count", "isolation = \"request\"")).await;

    for _ in 0..3 {
        get(&gateway.url("/chaos")).await;
        assert_eq!(upstream.last().headers["x-instance-calls"], "1");
    }
}

// One worker thread for the gateway, the upstream and the clients: if the looping plugin held
// the worker, nothing else could run until its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_looping_plugin_is_stopped_at_its_deadline_without_blocking_other_routes() {
    let upstream = TestUpstream::start().await;
    let limits = "deadline_ms = 1500\nfuel = 1_000_000_000_000";
    let gateway = TestGateway::start(&upstream, &chaos_config("loop", limits)).await;

    let url = gateway.url("/chaos");
    let looping = tokio::spawn(async move { get(&url).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut others = Vec::new();
    for _ in 0..10 {
        let started = Instant::now();
        assert_eq!(get(&gateway.url("/plain")).await.status, StatusCode::OK);
        others.push(started.elapsed());
    }
    assert!(
        !looping.is_finished(),
        "the other route was served while the plugin looped: {others:?}"
    );

    let started = Instant::now();
    let looped = looping.await.unwrap();
    assert_eq!(looped.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(failures(&gateway.metrics().await, "deadline"), 1);
}

#[tokio::test]
async fn a_looping_plugin_runs_out_of_fuel() {
    let upstream = TestUpstream::start().await;
    let limits = "deadline_ms = 60_000\nfuel = 50_000_000";
    let gateway = TestGateway::start(&upstream, &chaos_config("loop", limits)).await;

    let reply = get(&gateway.url("/chaos")).await;

    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(failures(&gateway.metrics().await, "fuel"), 1);
    assert!(upstream.received().is_empty());
}

#[tokio::test]
async fn unbounded_allocation_is_stopped_by_the_memory_cap() {
    let upstream = TestUpstream::start().await;
    let limits = "memory_limit_bytes = 16_777_216\nfuel = 1_000_000_000_000\ndeadline_ms = 10_000";
    let gateway = TestGateway::start(&upstream, &chaos_config("alloc", limits)).await;

    let reply = get(&gateway.url("/chaos")).await;

    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(failures(&gateway.metrics().await, "memory"), 1);
    assert_eq!(get(&gateway.url("/plain")).await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_crlf_header_value_is_a_plugin_failure_and_nothing_is_forwarded() {
    let upstream = TestUpstream::start().await;
    let gateway = TestGateway::start(&upstream, &chaos_config("crlf", "")).await;

    let reply = get(&gateway.url("/chaos")).await;

    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.header("x-sluice-plugin"), Some("chaos"));
    assert!(upstream.received().is_empty());
    assert_eq!(failures(&gateway.metrics().await, "invalid_mutation"), 1);
}

#[tokio::test]
async fn on_error_allow_skips_a_failing_plugin() {
    let upstream = TestUpstream::start().await;
    let gateway =
        TestGateway::start(&upstream, &chaos_config("crlf", "on_error = \"allow\"")).await;

    let reply = get(&gateway.url("/chaos")).await;

    assert_eq!(reply.status, StatusCode::OK);
    let seen = upstream.last().headers;
    assert!(!seen.contains_key("x-evil"));
    assert!(!seen.contains_key("x-injected"));
    assert_eq!(failures(&gateway.metrics().await, "invalid_mutation"), 1);
}

#[tokio::test]
async fn a_non_utf8_header_value_reaches_a_policy_without_a_trap() {
    let upstream = TestUpstream::start().await;
    let gateway = TestGateway::start(&upstream, &chaos_config("inspect", "")).await;

    let request = Request::get(gateway.url("/chaos"))
        .header(
            "x-latin",
            http::HeaderValue::from_bytes(&[b'c', 0xC0, b'a']).unwrap(),
        )
        .body(Bytes::new())
        .unwrap();
    let reply = send(request).await;

    assert_eq!(reply.status, StatusCode::OK);
    let seen = upstream.last().headers;
    assert_eq!(seen["x-headers-binary"], "1");
    assert_eq!(seen["x-latin"].as_bytes(), [b'c', 0xC0, b'a']);
}

#[tokio::test]
async fn plugin_metrics_show_calls_fuel_and_instances() {
    let upstream = TestUpstream::start().await;
    let gateway = TestGateway::start(&upstream, &chaos_config("count", "")).await;
    get(&gateway.url("/chaos")).await;

    let metrics = gateway.metrics().await;
    for expected in [
        r#"sluice_plugin_duration_seconds_count{phase="request",plugin="chaos"} 1"#,
        // One call for the request phase and one for the response phase.
        r#"sluice_plugin_fuel_consumed_count{plugin="chaos"} 2"#,
        r#"sluice_plugin_instances{plugin="chaos",state="idle"} 1"#,
    ] {
        assert!(
            metrics.contains(expected),
            "missing {expected} in\n{metrics}"
        );
    }
}
