//! HTTP/2 and TLS towards upstreams: h2c with prior knowledge, TLS whose server name and
//! certificate check follow the `Host` sent upstream, and ALPN choosing the version.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, StatusCode, Version};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sluice::Config;
use sluice_tests::{Reply, TestGateway, TestUpstream, gateway::config_text, send};

use super::PLAIN_ROUTE;

/// A certificate authority of the test's own, written to a PEM file the gateway can trust.
struct Authority {
    issuer: CertifiedIssuer<'static, KeyPair>,
    file: PathBuf,
}

impl Authority {
    fn new(name: &str) -> Authority {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let file = std::env::temp_dir().join(format!(
            "sluice-upstream-ca-{name}-{}.pem",
            std::process::id()
        ));
        std::fs::write(&file, issuer.pem()).unwrap();
        Authority { issuer, file }
    }

    /// A server's TLS settings with a certificate for `names`, offering `alpn`.
    fn server(&self, names: &[&str], alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
        let key = KeyPair::generate().unwrap();
        let names = names
            .iter()
            .map(|name| name.to_string())
            .collect::<Vec<_>>();
        let params = CertificateParams::new(names).unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let chain = vec![cert.der().clone(), CertificateDer::clone(self.issuer.der())];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

impl Drop for Authority {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
    }
}

const BOTH: &[&[u8]] = &[b"h2", b"http/1.1"];

/// A GET through `gateway` naming `host` in its `Host` header.
fn get_as(gateway: &TestGateway, host: &str) -> impl Future<Output = Reply> + Send + 'static {
    let request = Request::get(gateway.url("/thing"))
        .header("host", host)
        .body(Bytes::new())
        .unwrap();
    send(request)
}

/// The upstream settings of the test gateway (they follow its target), then the route.
fn fragment(upstream_settings: &str) -> String {
    format!("{upstream_settings}\n{PLAIN_ROUTE}")
}

#[tokio::test]
async fn http2_in_clear_text_multiplexes_one_connection_and_names_the_host() {
    let upstream = TestUpstream::start().await;
    let gateway = TestGateway::start(&upstream, &fragment("protocol = \"http2\"")).await;

    let calls: Vec<_> = (0..10)
        .map(|_| tokio::spawn(get_as(&gateway, "app.example")))
        .collect();
    for call in calls {
        let reply = call.await.unwrap();
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    let received = upstream.received();
    assert_eq!(received.len(), 10);
    for request in &received {
        assert_eq!(request.version, Version::HTTP_2);
        assert_eq!(request.host.as_deref(), Some("app.example"));
    }
    assert_eq!(
        upstream.connections(),
        1,
        "one HTTP/2 connection carries all"
    );
}

#[tokio::test]
async fn pools_are_kept_for_a_bounded_number_of_hosts_the_least_recently_used_dropped() {
    let upstream = TestUpstream::start().await;
    let gateway = TestGateway::start(&upstream, &fragment("protocol = \"http2\"")).await;
    let host = |i: usize| format!("h{i}.example");
    let names = sluice::upstream::MAX_NAMES;

    // One more host than are kept: the first one's pool goes to make room for the last.
    for i in 0..=names {
        let reply = get_as(&gateway, &host(i)).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    assert_eq!(upstream.connections(), names + 1, "one connection per host");
    for i in [names, 1, names] {
        assert_eq!(get_as(&gateway, &host(i)).await.status, StatusCode::OK);
    }
    assert_eq!(
        upstream.connections(),
        names + 1,
        "kept hosts reuse their connection"
    );
    assert_eq!(get_as(&gateway, &host(0)).await.status, StatusCode::OK);
    assert_eq!(
        upstream.connections(),
        names + 2,
        "the least recently used host's pool was dropped"
    );
}

#[tokio::test]
async fn tls_checks_the_certificate_against_the_host_sent_upstream() {
    let authority = Authority::new("host-sent");
    let upstream = TestUpstream::start_tls(authority.server(&["backend.test"], BOTH)).await;
    // Ejection and the breaker both on the first failure: a name the client chose must not
    // count against the target.
    let settings = format!(
        "tls = {{ ca_file = \"{}\" }}\n\
         [upstreams.outlier_detection]\nconsecutive_failures = 1\n\
         [upstreams.circuit_breaker]\nconsecutive_failures = 1",
        authority.file.display()
    );
    let gateway = TestGateway::start(&upstream, &fragment(&settings)).await;

    let reply = get_as(&gateway, "backend.test").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let seen = upstream.last();
    assert_eq!(seen.server_name.as_deref(), Some("backend.test"));
    assert_eq!(seen.host.as_deref(), Some("backend.test"));
    assert_eq!(
        seen.version,
        Version::HTTP_11,
        "protocol defaults to HTTP/1.1"
    );

    // A name the certificate does not cover: no request is sent over that connection, and
    // it is not retried.
    for _ in 0..3 {
        let reply = get_as(&gateway, "elsewhere.test").await;
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
        assert_eq!(reply.json()["error"], "upstream_certificate_name");
    }
    assert_eq!(upstream.received().len(), 1);
    let metrics = gateway.metrics().await;
    assert!(
        !metrics.contains("sluice_upstream_retries_total{"),
        "{metrics}"
    );

    // The target is neither ejected nor behind an open circuit, and the verified name keeps
    // working on its own connections.
    let reply = get_as(&gateway, "backend.test:443").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(upstream.received().len(), 2);
}

#[tokio::test]
async fn host_header_and_server_name_fix_what_the_upstream_sees() {
    let authority = Authority::new("fixed");
    let upstream = TestUpstream::start_tls(authority.server(&["backend.test"], BOTH)).await;

    let settings = format!(
        "host_header = \"backend.test\"\ntls = {{ ca_file = \"{}\" }}",
        authority.file.display()
    );
    let gateway = TestGateway::start(&upstream, &fragment(&settings)).await;
    let reply = get_as(&gateway, "public.example").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let seen = upstream.last();
    assert_eq!(seen.host.as_deref(), Some("backend.test"));
    assert_eq!(seen.server_name.as_deref(), Some("backend.test"));
    drop(gateway);

    // A fixed server name: the client's Host goes upstream unchanged.
    let settings = format!(
        "tls = {{ ca_file = \"{}\", server_name = \"backend.test\" }}",
        authority.file.display()
    );
    let gateway = TestGateway::start(&upstream, &fragment(&settings)).await;
    let reply = get_as(&gateway, "public.example").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let seen = upstream.last();
    assert_eq!(seen.host.as_deref(), Some("public.example"));
    assert_eq!(seen.server_name.as_deref(), Some("backend.test"));
}

#[tokio::test]
async fn a_certificate_from_an_untrusted_authority_is_refused() {
    let trusted = Authority::new("trusted");
    let other = Authority::new("other");
    let upstream = TestUpstream::start_tls(other.server(&["backend.test"], BOTH)).await;
    let settings = format!(
        "host_header = \"backend.test\"\ntls = {{ ca_file = \"{}\" }}",
        trusted.file.display()
    );
    let gateway = TestGateway::start(&upstream, &fragment(&settings)).await;

    let reply = get_as(&gateway, "backend.test").await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
    assert!(upstream.received().is_empty());
}

#[tokio::test]
async fn alpn_picks_the_version_over_tls() {
    let authority = Authority::new("alpn");
    let h2_and_h1 = TestUpstream::start_tls(authority.server(&["backend.test"], BOTH)).await;
    let h1_only =
        TestUpstream::start_tls(authority.server(&["backend.test"], &[b"http/1.1"])).await;
    let tls = format!(
        "host_header = \"backend.test\"\ntls = {{ ca_file = \"{}\" }}",
        authority.file.display()
    );

    for (upstream, protocol, version) in [
        (&h2_and_h1, "http2", Version::HTTP_2),
        (&h2_and_h1, "auto", Version::HTTP_2),
        (&h1_only, "auto", Version::HTTP_11),
        (&h2_and_h1, "http1", Version::HTTP_11),
    ] {
        let settings = format!("protocol = \"{protocol}\"\n{tls}");
        let gateway = TestGateway::start(upstream, &fragment(&settings)).await;
        let reply = get_as(&gateway, "backend.test").await;
        assert_eq!(reply.status, StatusCode::OK, "{protocol}: {}", reply.text());
        assert_eq!(upstream.last().version, version, "{protocol}");
    }
}

#[tokio::test]
async fn unusable_upstream_tls_settings_are_refused_at_load() {
    let upstream = TestUpstream::start().await;
    let missing = "tls = { ca_file = \"/nonexistent/ca.pem\" }";
    let config = Config::parse(&config_text(&upstream, &fragment(missing))).expect("parses");
    let err = TestGateway::start_config(config)
        .await
        .err()
        .expect("a CA file that cannot be read is refused");
    assert!(err.to_string().contains("tls.ca_file"), "{err:#}");

    for (settings, expected) in [
        ("protocol = \"auto\"", "ALPN"),
        ("tls = { server_name = \"not a name\" }", "server_name"),
        ("host_header = \"a b\"", "host_header"),
    ] {
        let err = Config::parse(&config_text(&upstream, &fragment(settings)))
            .expect_err(settings)
            .to_string();
        assert!(err.contains(expected), "{settings}: {err}");
    }
}
