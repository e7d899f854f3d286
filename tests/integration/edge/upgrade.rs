//! WebSocket upgrades: forwarded, tunnelled end to end once the upstream answers 101, and
//! not before.

use std::net::SocketAddr;
use std::time::Duration;

use sluice_tests::{RawConnection, TestGateway, TestUpstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use super::PLAIN_ROUTE;

const UPGRADE: &[u8] = b"GET /chat HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Upgrade\r\n\
    Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
    Sec-WebSocket-Version: 13\r\n\r\n";

/// What the WebSocket upstream saw before it switched protocols.
#[derive(Debug)]
struct BeforeSwitch {
    head: String,
    early_bytes: usize,
}

/// An upstream that reads one request head, waits a moment (noting any bytes that arrive
/// meanwhile), answers 101, then echoes everything back.
async fn websocket_upstream() -> (SocketAddr, oneshot::Receiver<BeforeSwitch>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (report, reported) = oneshot::channel();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let head = read_head(&mut stream).await;
        let mut early = [0; 64];
        let early_bytes = tokio::time::timeout(Duration::from_millis(300), stream.read(&mut early))
            .await
            .map_or(0, |read| read.unwrap_or(0));
        let _ = report.send(BeforeSwitch { head, early_bytes });
        stream
            .write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                  Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
            )
            .await
            .unwrap();
        let (mut read, mut write) = stream.split();
        let _ = tokio::io::copy(&mut read, &mut write).await;
    });
    (addr, reported)
}

async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await.unwrap() == 0 {
            break;
        }
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).to_lowercase()
}

#[tokio::test]
async fn a_switch_of_protocols_nobody_asked_for_is_a_502() {
    let (upstream_addr, _) = websocket_upstream().await;
    let upstream = TestUpstream::external(upstream_addr);
    let gateway = TestGateway::start(&upstream, PLAIN_ROUTE).await;

    let mut connection = RawConnection::open(gateway.addr).await;
    connection
        .write(b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let response = connection.response(false).await.expect("a response");
    assert_eq!(response.status(), 502, "{}", response.head);
    let metrics = gateway.metrics().await;
    let series = r#"sluice_requests_rejected_total{reason="upstream_bad_response",route="plain"}"#;
    assert_eq!(sluice_tests::metric(&metrics, series), 1.0, "{metrics}");
}

#[tokio::test]
async fn a_websocket_is_tunnelled_after_the_upstreams_101() {
    let (upstream_addr, before_switch) = websocket_upstream().await;
    let upstream = TestUpstream::external(upstream_addr);
    let gateway = TestGateway::start(&upstream, PLAIN_ROUTE).await;

    let mut connection = RawConnection::open(gateway.addr).await;
    connection.write(UPGRADE).await;
    connection.write(b"early").await;
    let switched = connection.response(true).await.expect("a response");
    assert_eq!(switched.status(), 101, "{}", switched.head);
    assert_eq!(switched.header("upgrade"), Some("websocket"));
    assert!(
        switched
            .header("connection")
            .unwrap()
            .eq_ignore_ascii_case("upgrade")
    );
    assert_eq!(
        switched.header("sec-websocket-accept"),
        Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    );

    let before = before_switch.await.unwrap();
    assert!(
        before.head.contains("upgrade: websocket"),
        "{}",
        before.head
    );
    assert!(
        before.head.contains("connection: upgrade"),
        "{}",
        before.head
    );
    assert!(
        before.head.contains("sec-websocket-key:"),
        "{}",
        before.head
    );
    assert_eq!(before.early_bytes, 0, "bytes were tunnelled before the 101");

    assert_eq!(connection.read_exact(5).await, b"early");
    connection.write(b"\x81\x05hello").await;
    assert_eq!(connection.read_exact(7).await, b"\x81\x05hello");
}

#[tokio::test]
async fn an_upgrade_the_upstream_declines_is_answered_then_the_connection_closed() {
    let upstream = TestUpstream::start().await;
    let gateway = TestGateway::start(&upstream, PLAIN_ROUTE).await;

    let mut connection = RawConnection::open(gateway.addr).await;
    connection.write(UPGRADE).await;
    let declined = connection.response(false).await.unwrap();
    assert_eq!(declined.status(), 200);
    assert_eq!(declined.header("connection"), Some("close"));
    assert!(!upstream.last().headers.contains_key("sec-websocket-accept"));
    assert!(connection.is_closed_within(Duration::from_secs(5)).await);
}

/// A request hidden behind an upgrade that was not taken: whatever the gateway answers, it
/// must never reach the upstream.
const SMUGGLED: &[u8] = b"POST /smuggled HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\
    Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n";

/// Sends `first` and then, on the same connection, the smuggled request; returns the
/// statuses of the responses read before the connection closed.
async fn then_smuggled(gateway: &TestGateway, first: &[u8], together: bool) -> Vec<u16> {
    let mut connection = RawConnection::open(gateway.addr).await;
    if together {
        connection.write(&[first, SMUGGLED].concat()).await;
    } else {
        connection.write(first).await;
    }
    let mut statuses = Vec::new();
    if let Some(response) = connection.response(false).await {
        statuses.push(response.status());
    }
    if !together {
        connection.try_write(SMUGGLED).await;
    }
    while let Some(response) = connection.response(false).await {
        statuses.push(response.status());
    }
    statuses
}

#[tokio::test]
async fn a_request_after_an_upgrade_not_taken_never_reaches_the_upstream() {
    let upstream = TestUpstream::start().await;
    let gateway = TestGateway::start(&upstream, PLAIN_ROUTE).await;

    let no_connection = b"GET /plain HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n";
    let connect = b"CONNECT example:443 HTTP/1.1\r\nHost: example:443\r\n\r\n";
    for first in [UPGRADE, &no_connection[..], &connect[..]] {
        for together in [true, false] {
            let statuses = then_smuggled(&gateway, first, together).await;
            let label = String::from_utf8_lossy(first.split(|&b| b == b'\r').next().unwrap());
            assert!(
                statuses.len() <= 2 && statuses.get(1).is_none_or(|&status| status == 400),
                "{label} (together: {together}): {statuses:?}"
            );
        }
    }
    let received = upstream.received();
    assert!(
        received.iter().all(|r| r.path_and_query != "/smuggled"),
        "{:?}",
        received
            .iter()
            .map(|r| &r.path_and_query)
            .collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn an_h2c_upgrade_is_never_forwarded() {
    let upstream = TestUpstream::start().await;
    let gateway = TestGateway::start(&upstream, PLAIN_ROUTE).await;

    let mut connection = RawConnection::open(gateway.addr).await;
    connection
        .write(
            b"GET /smuggle HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n\
              Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
        )
        .await;
    assert_eq!(connection.response(false).await.unwrap().status(), 200);

    let seen = upstream.last().headers;
    for name in ["upgrade", "connection", "http2-settings"] {
        assert!(!seen.contains_key(name), "{name} reached the upstream");
    }
}
