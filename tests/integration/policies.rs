//! The bundled policies (auth, transform, throttle), compiled to WebAssembly and run by the
//! gateway in front of a recording upstream.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, StatusCode};
use jsonwebtoken::{EncodingKey, Header, encode};
use sluice_tests::{Reply, TestGateway, TestUpstream, get, send};

const SECRET: &str = "a shared secret of at least thirty-two bytes";

const AUTH: &str = r#"
[[plugins]]
name = "auth"
path = "{plugin:auth}"
[plugins.config.api_keys]
keys = { "demo-key" = "demo-user" }
[plugins.config.jwt]
algorithm = "HS256"
secret = "a shared secret of at least thirty-two bytes"
audience = "sluice-tests"

[[routes]]
name = "api"
path_prefix = "/api"
upstream = "app"
policies = ["auth"]
"#;

async fn get_with(url: &str, headers: &[(&str, &str)]) -> Reply {
    let mut request = Request::get(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    send(request.body(Bytes::new()).unwrap()).await
}

fn token(subject: &str, audience: &str, expires_in: i64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let claims = serde_json::json!({ "sub": subject, "aud": audience, "exp": now + expires_in });
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
    )
    .unwrap()
}

#[tokio::test]
async fn auth_refuses_missing_and_wrong_api_keys_and_admits_the_right_one() {
    let upstream = TestUpstream::start().await;
    let gateway = TestGateway::start(&upstream, AUTH).await;

    let missing = get(&gateway.url("/api/x")).await;
    assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
    assert!(missing.header("www-authenticate").is_some());

    let wrong = get_with(&gateway.url("/api/x"), &[("x-api-key", "nope")]).await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert!(upstream.received().is_empty());

    let spoofed = [("x-api-key", "demo-key"), ("x-sluice-identity", "admin")];
    let admitted = get_with(&gateway.url("/api/x"), &spoofed).await;
    assert_eq!(admitted.status, StatusCode::OK);
    let identities: Vec<_> = upstream
        .last()
        .headers
        .get_all("x-sluice-identity")
        .iter()
        .cloned()
        .collect();
    assert_eq!(identities, ["demo-user"]);
}

#[tokio::test]
async fn auth_checks_jwt_signature_expiry_and_audience() {
    let upstream = TestUpstream::start().await;
    let gateway = TestGateway::start(&upstream, AUTH).await;
    let bearer = |token: String| format!("Bearer {token}");

    let valid = get_with(
        &gateway.url("/api/x"),
        &[(
            "authorization",
            &bearer(token("alice", "sluice-tests", 300)),
        )],
    )
    .await;
    assert_eq!(valid.status, StatusCode::OK);
    assert_eq!(upstream.last().headers["x-sluice-identity"], "alice");

    let expired = get_with(
        &gateway.url("/api/x"),
        &[(
            "authorization",
            &bearer(token("alice", "sluice-tests", -600)),
        )],
    )
    .await;
    assert_eq!(expired.status, StatusCode::UNAUTHORIZED);
    assert!(
        expired
            .header("www-authenticate")
            .unwrap()
            .contains("invalid_token")
    );

    let other_audience = get_with(
        &gateway.url("/api/x"),
        &[("authorization", &bearer(token("alice", "elsewhere", 300)))],
    )
    .await;
    assert_eq!(other_audience.status, StatusCode::UNAUTHORIZED);

    let oversized = format!("{}.{}.sig", "a".repeat(30_000), "b".repeat(30_000));
    let oversized = get_with(
        &gateway.url("/api/x"),
        &[("authorization", &bearer(oversized))],
    )
    .await;
    assert_eq!(
        oversized.status,
        StatusCode::UNAUTHORIZED,
        "a huge token is refused, not a failure"
    );

    let mut forged = token("alice", "sluice-tests", 300);
    forged.pop();
    let forged = get_with(
        &gateway.url("/api/x"),
        &[("authorization", &bearer(forged))],
    )
    .await;
    assert_eq!(forged.status, StatusCode::UNAUTHORIZED);
    assert_eq!(upstream.received().len(), 1);
}

#[tokio::test]
async fn transform_changes_request_and_response_headers_and_the_path() {
    let upstream = TestUpstream::start().await;
    let fragment = r#"
[[plugins]]
name = "transform"
path = "{plugin:transform}"
[plugins.config.request]
set = { "x-env" = "test" }
add = { "x-via" = "sluice" }
remove = ["x-internal"]
[plugins.config.response]
set = { "x-served-by" = "sluice" }
remove = ["x-upstream-header"]
[plugins.config.rewrite]
prefix = "/old"
replacement = "/new"

[[routes]]
name = "t"
path_prefix = "/"
upstream = "app"
policies = ["transform"]
"#;
    let gateway = TestGateway::start(&upstream, fragment).await;

    let reply = get_with(
        &gateway.url("/old/items?page=2"),
        &[("x-internal", "secret"), ("x-env", "prod")],
    )
    .await;

    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("x-served-by"), Some("sluice"));
    assert_eq!(reply.header("x-upstream-header"), None);
    let seen = upstream.last();
    assert_eq!(seen.path_and_query, "/new/items?page=2");
    assert_eq!(seen.headers["x-env"], "test");
    assert_eq!(seen.headers["x-via"], "sluice");
    assert!(!seen.headers.contains_key("x-internal"));
}

#[tokio::test]
async fn throttle_answers_429_with_retry_after_once_the_burst_is_spent() {
    let upstream = TestUpstream::start().await;
    let fragment = r#"
[[plugins]]
name = "throttle"
path = "{plugin:throttle}"
max_instances = 2
config = { key = "header:x-tenant", limit = 3, period = "1m", burst = 3 }

[[routes]]
name = "limited"
path_prefix = "/"
upstream = "app"
policies = ["throttle"]
"#;
    let gateway = TestGateway::start(&upstream, fragment).await;

    for _ in 0..3 {
        let ok = get_with(&gateway.url("/"), &[("x-tenant", "a")]).await;
        assert_eq!(ok.status, StatusCode::OK);
    }
    let limited = get_with(&gateway.url("/"), &[("x-tenant", "a")]).await;
    let other_tenant = get_with(&gateway.url("/"), &[("x-tenant", "b")]).await;

    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = limited.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=20).contains(&retry_after), "{retry_after}");
    assert!(limited.header("ratelimit-policy").unwrap().contains("q=3"));
    assert!(limited.header("ratelimit").is_some());
    assert_eq!(
        other_tenant.status,
        StatusCode::OK,
        "tenants have separate buckets"
    );
    assert_eq!(upstream.received().len(), 4);
}

#[tokio::test]
async fn the_three_policies_run_as_one_chain() {
    let upstream = TestUpstream::start().await;
    let fragment = r#"
[[plugins]]
name = "auth"
path = "{plugin:auth}"
config = { api_keys = { keys = { "k1" = "tenant-1" } } }

[[plugins]]
name = "transform"
path = "{plugin:transform}"
config = { response = { set = { "x-chain" = "done" } } }

[[plugins]]
name = "throttle"
path = "{plugin:throttle}"
config = { key = "identity", limit = 2, period = "1m" }

[[routes]]
name = "chain"
path_prefix = "/"
upstream = "app"
policies = ["auth", "transform", "throttle"]
"#;
    let gateway = TestGateway::start(&upstream, fragment).await;
    let key = [("x-api-key", "k1")];

    assert_eq!(
        get(&gateway.url("/")).await.status,
        StatusCode::UNAUTHORIZED
    );
    let first = get_with(&gateway.url("/"), &key).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.header("x-chain"), Some("done"));
    assert_eq!(
        get_with(&gateway.url("/"), &key).await.status,
        StatusCode::OK
    );
    assert_eq!(
        get_with(&gateway.url("/"), &key).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[tokio::test]
async fn a_policy_is_called_only_in_the_phases_it_takes_part_in() {
    let upstream = TestUpstream::start().await;
    let fragment = AUTH.replace(
        "policies = [\"auth\"]",
        "policies = [\"auth\", \"transform\"]",
    ) + r#"
[[plugins]]
name = "transform"
path = "{plugin:transform}"
config = { response = { set = { "x-served-by" = "sluice" } } }
"#;
    let gateway = TestGateway::start(&upstream, &fragment).await;

    for _ in 0..3 {
        let reply = get_with(&gateway.url("/api/x"), &[("x-api-key", "demo-key")]).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.header("x-served-by"), Some("sluice"));
    }
    let metrics = gateway.metrics().await;
    let calls = |plugin: &str, phase: &str| {
        let series = format!(
            "sluice_plugin_duration_seconds_count{{phase=\"{phase}\",plugin=\"{plugin}\"}}"
        );
        sluice_tests::metric(&metrics, &series)
    };
    // auth looks only at requests; transform edits both ways.
    assert_eq!(calls("auth", "request"), 3.0);
    assert_eq!(calls("auth", "response"), 0.0);
    assert_eq!(calls("transform", "request"), 3.0);
    assert_eq!(calls("transform", "response"), 3.0);
}
