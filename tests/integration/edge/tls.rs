//! TLS on the listener: HTTP/1.1 and HTTP/2 chosen by ALPN, `https` in the forwarding
//! headers, and a renewed certificate picked up from disk without a restart.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use sluice_tests::{TestGateway, TestUpstream, send_raw};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::PLAIN_ROUTE;

/// A folder holding `cert.pem` and `key.pem`.
struct CertFiles {
    dir: PathBuf,
}

impl CertFiles {
    fn new(name: &str) -> CertFiles {
        let dir = std::env::temp_dir().join(format!("sluice-tls-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        CertFiles { dir }
    }

    /// Writes a new self-signed certificate for `localhost` and returns it.
    fn renew(&self) -> CertificateDer<'static> {
        let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        std::fs::write(
            self.dir.join("key.pem"),
            generated.signing_key.serialize_pem(),
        )
        .unwrap();
        std::fs::write(self.dir.join("cert.pem"), generated.cert.pem()).unwrap();
        generated.cert.der().clone()
    }

    fn listener(&self) -> String {
        format!(
            "tls = {{ cert_path = \"{}\", key_path = \"{}\" }}",
            self.dir.join("cert.pem").display(),
            self.dir.join("key.pem").display()
        )
    }
}

impl Drop for CertFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn connect(
    addr: SocketAddr,
    roots: &[&CertificateDer<'static>],
    alpn: &[u8],
) -> std::io::Result<TlsStream<TcpStream>> {
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store.add((*root).clone()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await
}

fn get(path: &str) -> Request<Empty<Bytes>> {
    Request::get(path)
        .header("host", "localhost")
        .body(Empty::new())
        .unwrap()
}

#[tokio::test]
async fn https_speaks_http1_and_http2_as_alpn_chooses() {
    let upstream = TestUpstream::start().await;
    let certs = CertFiles::new("alpn");
    let cert = certs.renew();
    let gateway = TestGateway::start_with(&upstream, &certs.listener(), PLAIN_ROUTE).await;

    let stream = connect(gateway.addr, &[&cert], b"http/1.1").await.unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let response = sender.send_request(get("/over-h1")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let seen = upstream.last().headers;
    assert_eq!(seen["x-forwarded-proto"], "https");
    assert!(seen["forwarded"].to_str().unwrap().ends_with("proto=https"));

    let stream = connect(gateway.addr, &[&cert], b"h2").await.unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let response = sender
        .send_request(get("https://localhost/over-h2"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), Version::HTTP_2);
    let _ = response.into_body().collect().await;
    assert_eq!(upstream.last().path_and_query, "/over-h2");
}

#[tokio::test]
async fn a_renewed_certificate_is_served_without_a_restart() {
    let upstream = TestUpstream::start().await;
    let certs = CertFiles::new("renew");
    let first = certs.renew();
    let gateway = TestGateway::start_with(&upstream, &certs.listener(), PLAIN_ROUTE).await;
    let served =
        |stream: &TlsStream<TcpStream>| stream.get_ref().1.peer_certificates().unwrap()[0].clone();

    let stream = connect(gateway.addr, &[&first], b"http/1.1").await.unwrap();
    assert_eq!(served(&stream), first);

    // A file that is not a certificate (a half-written renewal) leaves the current one.
    std::fs::write(certs.dir.join("cert.pem"), "not a certificate").unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let stream = connect(gateway.addr, &[&first], b"http/1.1").await.unwrap();
    assert_eq!(served(&stream), first);

    let second = certs.renew();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stream = connect(gateway.addr, &[&first, &second], b"http/1.1")
            .await
            .unwrap();
        if served(&stream) == second {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the renewed certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn plain_http_on_a_tls_listener_gets_no_answer() {
    let upstream = TestUpstream::start().await;
    let certs = CertFiles::new("plain");
    certs.renew();
    let gateway = TestGateway::start_with(&upstream, &certs.listener(), PLAIN_ROUTE).await;

    let raw = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    let response = send_raw(gateway.addr, raw, Duration::from_secs(5)).await;
    assert!(!response.starts_with(b"HTTP/1.1 200"));
    assert!(upstream.received().is_empty());
    let metrics = gateway.metrics().await;
    assert!(
        metrics.contains(r#"sluice_connections_rejected_total{reason="tls_handshake"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn sluice_check_names_a_missing_certificate() {
    let upstream = TestUpstream::start().await;
    let listener = "tls = { cert_path = \"/nowhere/cert.pem\", key_path = \"/nowhere/key.pem\" }";
    let text = sluice_tests::gateway::config_text_with(&upstream, listener, PLAIN_ROUTE);
    let config = sluice::Config::parse(&text).unwrap();
    let err = sluice::gateway::check(&config)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nowhere/cert.pem"), "{err}");
}
