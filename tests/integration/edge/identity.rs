//! `X-Request-Id` and W3C trace context, to the upstream and back to the client.

use bytes::Bytes;
use http::{Request, StatusCode};
use sluice_tests::{TestGateway, TestUpstream, send};

use super::PLAIN_ROUTE;

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[tokio::test]
async fn a_valid_request_id_is_kept_and_a_missing_or_bad_one_generated() {
    let upstream = TestUpstream::start().await;
    let gateway = TestGateway::start(&upstream, PLAIN_ROUTE).await;

    let kept = send(
        Request::get(gateway.url("/id"))
            .header("x-request-id", "client-chosen-42")
            .body(Bytes::new())
            .unwrap(),
    )
    .await;
    assert_eq!(kept.header("x-request-id"), Some("client-chosen-42"));
    assert_eq!(upstream.last().headers["x-request-id"], "client-chosen-42");

    for bad in [None, Some("x".repeat(200)), Some("has space".to_string())] {
        let mut request = Request::get(gateway.url("/id"));
        if let Some(bad) = &bad {
            request = request.header("x-request-id", bad.as_str());
        }
        let reply = send(request.body(Bytes::new()).unwrap()).await;
        let id = reply.header("x-request-id").expect("an id").to_string();
        assert_eq!(id.len(), 36, "{bad:?} gave {id}");
        assert_eq!(upstream.last().headers["x-request-id"], id.as_str());
    }
}

#[tokio::test]
async fn gateway_made_errors_carry_the_request_id() {
    let upstream = TestUpstream::start().await;
    let gateway = TestGateway::start(&upstream, "").await;

    let reply = send(
        Request::get(gateway.url("/nowhere"))
            .header("x-request-id", "lost-1")
            .body(Bytes::new())
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.json()["error"], "no_route");
    assert_eq!(reply.header("x-request-id"), Some("lost-1"));
}

#[tokio::test]
async fn a_trace_is_continued_with_a_new_span_or_started() {
    let upstream = TestUpstream::start().await;
    let gateway = TestGateway::start(&upstream, PLAIN_ROUTE).await;

    send(
        Request::get(gateway.url("/traced"))
            .header("traceparent", TRACEPARENT)
            .header("tracestate", "vendor=opaque")
            .body(Bytes::new())
            .unwrap(),
    )
    .await;
    let seen = upstream.last().headers;
    let sent = seen["traceparent"].to_str().unwrap();
    let fields: Vec<&str> = sent.split('-').collect();
    assert_eq!(fields[1], "4bf92f3577b34da6a3ce929d0e0e4736", "{sent}");
    assert_ne!(
        fields[2], "00f067aa0ba902b7",
        "the gateway's hop has its own span"
    );
    assert_eq!(fields[3], "01");
    assert_eq!(seen["tracestate"], "vendor=opaque");

    send(
        Request::get(gateway.url("/traced"))
            .header("traceparent", "00-zz-not-valid")
            .header("tracestate", "vendor=opaque")
            .body(Bytes::new())
            .unwrap(),
    )
    .await;
    let seen = upstream.last().headers;
    let sent = seen["traceparent"].to_str().unwrap();
    assert_eq!(sent.len(), 55, "{sent}");
    assert!(!sent.contains("4bf92f3577b34da6a3ce929d0e0e4736"));
    assert!(!seen.contains_key("tracestate"));
}

#[tokio::test]
async fn a_request_without_a_trace_starts_a_new_one() {
    let upstream = TestUpstream::start().await;
    let gateway = TestGateway::start(&upstream, PLAIN_ROUTE).await;

    let mut trace_ids = Vec::new();
    for _ in 0..2 {
        send(
            Request::get(gateway.url("/untraced"))
                .body(Bytes::new())
                .unwrap(),
        )
        .await;
        let seen = upstream.last().headers;
        let sent = seen
            .get("traceparent")
            .expect("a traceparent upstream")
            .to_str()
            .unwrap()
            .to_string();
        let fields: Vec<&str> = sent.split('-').collect();
        let hex = |field: &str, len: usize| {
            field.len() == len
                && field
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        assert_eq!(fields.len(), 4, "{sent}");
        assert_eq!(fields[0], "00", "{sent}");
        assert!(hex(fields[1], 32) && fields[1] != "0".repeat(32), "{sent}");
        assert!(hex(fields[2], 16) && fields[2] != "0".repeat(16), "{sent}");
        assert!(hex(fields[3], 2), "{sent}");
        assert!(!seen.contains_key("tracestate"));
        trace_ids.push(fields[1].to_string());
    }
    assert_ne!(trace_ids[0], trace_ids[1], "each request is a new trace");
}
