//! The access log: one JSON line per request, written without slowing requests down.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use sluice_tests::{RawConnection, TestGateway, TestUpstream, get, send};

use super::PLAIN_ROUTE;

fn temp_path(name: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("sluice-{name}-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

/// The log's lines once there are `count` of them (or after 5 s).
async fn lines(path: &Path, count: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).expect("a JSON line"))
            .collect();
        if lines.len() >= count || Instant::now() > deadline {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn each_request_writes_one_json_line_with_its_story() {
    let upstream = TestUpstream::start().await;
    let path = temp_path("access.log");
    let fragment = format!(
        "[access_log]\nenabled = true\npath = \"{}\"\n{PLAIN_ROUTE}",
        path.display()
    );
    let gateway = TestGateway::start(&upstream, &fragment).await;

    let proxied = send(
        Request::post(gateway.url("/items?x=1"))
            .header("x-forwarded-for", "6.6.6.6")
            .body(Bytes::from_static(b"hello"))
            .unwrap(),
    )
    .await;
    let refused = send(
        Request::get(gateway.url("/public%2Fsecret"))
            .body(Bytes::new())
            .unwrap(),
    )
    .await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);

    let lines = lines(&path, 2).await;
    assert_eq!(lines.len(), 2, "{lines:?}");
    let line = &lines[0];
    assert_eq!(line["request_id"], proxied.header("x-request-id").unwrap());
    assert_eq!(line["trace_id"].as_str().unwrap().len(), 32);
    assert_eq!(line["client"], "127.0.0.1");
    assert_eq!(line["method"], "POST");
    assert_eq!(line["path"], "/items?x=1");
    assert_eq!(line["route"], "plain");
    assert_eq!(line["upstream"], "app");
    assert_eq!(line["target"], upstream.addr.to_string());
    assert_eq!(line["status"], 200);
    assert_eq!(line["bytes_in"], 5);
    assert_eq!(line["bytes_out"], proxied.body.len());
    assert!(line["timestamp"].as_str().unwrap().ends_with('Z'), "{line}");
    for field in ["duration_ms", "queue_ms", "policies_ms", "upstream_ms"] {
        assert!(line[field].as_f64().is_some(), "{field} in {line}");
    }
    assert!(line.get("reason").is_none(), "{line}");

    let line = &lines[1];
    assert_eq!(line["status"], 400);
    assert_eq!(line["reason"], "encoded_slash");
    assert_eq!(line["request_id"], refused.header("x-request-id").unwrap());
    assert!(line.get("route").is_none(), "{line}");
    let _ = std::fs::remove_file(&path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_log_drops_and_counts_lines_instead_of_slowing_requests() {
    let upstream = TestUpstream::start().await;
    let fifo = temp_path("access.fifo");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    assert!(made.expect("mkfifo runs").success());
    // A reader that never reads: once the pipe's buffer is full, every write blocks.
    let reader_path = fifo.clone();
    let reader = std::thread::spawn(move || std::fs::File::open(reader_path).expect("open fifo"));
    let fragment = format!(
        "[access_log]\nenabled = true\nbuffer_lines = 4\npath = \"{}\"\n{PLAIN_ROUTE}",
        fifo.display()
    );
    let gateway = TestGateway::start(&upstream, &fragment).await;
    let _reader = reader.join().unwrap();

    let started = Instant::now();
    for _ in 0..400 {
        assert_eq!(get(&gateway.url("/logged")).await.status, StatusCode::OK);
    }
    let elapsed = started.elapsed();

    let metrics = gateway.metrics().await;
    let dropped: f64 = metrics
        .lines()
        .find_map(|line| {
            line.strip_prefix("sluice_access_log_dropped_total ")?
                .parse()
                .ok()
        })
        .expect("the dropped counter");
    assert!(dropped >= 100.0, "{dropped} dropped");
    assert!(elapsed < Duration::from_secs(30), "{elapsed:?}");
    let _ = std::fs::remove_file(&fifo);
}

#[tokio::test]
async fn a_request_whose_client_goes_away_is_logged_as_499() {
    let upstream = TestUpstream::start().await;
    let path = temp_path("access-499.log");
    let fragment = format!(
        "[access_log]\nenabled = true\npath = \"{}\"\n{PLAIN_ROUTE}",
        path.display()
    );
    let gateway = TestGateway::start(&upstream, &fragment).await;

    let mut connection = RawConnection::open(gateway.addr).await;
    connection
        .write(b"GET /slow HTTP/1.1\r\nHost: x\r\nX-Delay-Ms: 3000\r\nX-Request-Id: gone-1\r\n\r\n")
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(connection);

    let lines = lines(&path, 1).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["request_id"], "gone-1");
    assert_eq!(lines[0]["status"], 499);
    assert_eq!(lines[0]["reason"], "client_closed");
    assert_eq!(lines[0]["route"], "plain");
    let _ = std::fs::remove_file(&path);
}

#[tokio::test]
async fn a_response_body_that_breaks_off_is_logged_with_a_reason() {
    let upstream = TestUpstream::external(sluice_tests::faulty::truncating(false).await);
    let path = temp_path("access-broken.log");
    let fragment = format!(
        "[access_log]\nenabled = true\npath = \"{}\"\n{PLAIN_ROUTE}",
        path.display()
    );
    let gateway = TestGateway::start(&upstream, &fragment).await;

    let mut connection = RawConnection::open(gateway.addr).await;
    connection
        .write(b"GET /broken HTTP/1.1\r\nHost: x\r\nX-Request-Id: broken-1\r\n\r\n")
        .await;
    let head = connection.response(true).await.expect("the response head");
    assert_eq!(head.status(), 200);
    assert!(connection.is_closed_within(Duration::from_secs(10)).await);

    let lines = lines(&path, 1).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["request_id"], "broken-1");
    assert_eq!(lines[0]["status"], 200);
    assert_eq!(lines[0]["reason"], "upstream_reset", "{}", lines[0]);
    assert_eq!(lines[0]["bytes_out"], 10);
    let _ = std::fs::remove_file(&path);
}
