//! Unit tests of the auth policy, run natively through the SDK's test harness.

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode, get_current_timestamp};
use serde_json::{Value, json};
use sluice_sdk::testing::{TestRequest, instantiate};
use sluice_sdk::{Decision, Policy, Reply, Request};

use crate::Auth;

const SECRET: &str = "a shared secret of at least 32 bytes";
const RSA_PRIVATE_PEM: &str = include_str!("../testdata/rsa-private.pem");
const RSA_PUBLIC_PEM: &str = include_str!("../testdata/rsa-public.pem");
const OTHER_RSA_PUBLIC_PEM: &str = include_str!("../testdata/other-rsa-public.pem");

fn policy(config: Value) -> Auth {
    instantiate(&config.to_string()).expect("the config is valid")
}

fn config_error(config: Value) -> String {
    match instantiate::<Auth>(&config.to_string()) {
        Ok(_) => panic!("the config {config} was accepted"),
        Err(message) => message,
    }
}

fn keys_and_hs256() -> Auth {
    policy(json!({
        "api_keys": { "keys": { "demo-key": "demo-user" } },
        "jwt": { "algorithm": "HS256", "secret": SECRET, "audience": "my-api" },
    }))
}

fn rs256(public_key_pem: &str) -> Auth {
    policy(json!({ "jwt": { "algorithm": "RS256", "public_key_pem": public_key_pem } }))
}

fn hs256_token(claims: Value) -> String {
    let key = EncodingKey::from_secret(SECRET.as_bytes()).expect("a valid secret");
    encode(&Header::new(Algorithm::HS256), &claims, &key).expect("the token encodes")
}

fn rs256_token(claims: Value) -> String {
    let key = EncodingKey::from_rsa_pem(RSA_PRIVATE_PEM.as_bytes()).expect("a valid key");
    encode(&Header::new(Algorithm::RS256), &claims, &key).expect("the token encodes")
}

fn in_an_hour() -> u64 {
    get_current_timestamp() + 3600
}

fn bearer(token: &str) -> Request {
    TestRequest::get("/")
        .header("authorization", format!("Bearer {token}"))
        .build()
}

/// The identity set on a forwarded request, checking that the client's own value is removed.
fn forwarded_identity(decision: Decision) -> String {
    let Decision::Continue(changes) = decision else {
        panic!("the request was answered: {decision:?}");
    };
    assert_eq!(changes.headers.remove, ["x-sluice-identity"]);
    let [(name, value)] = changes.headers.set.as_slice() else {
        panic!("expected exactly one header set: {changes:?}");
    };
    assert_eq!(name, "x-sluice-identity");
    String::from_utf8(value.clone()).expect("the identity is UTF-8")
}

/// The 401 reply, checked for what every refusal must have.
fn refusal(decision: Decision) -> Reply {
    let Decision::Respond(reply) = decision else {
        panic!("the request was forwarded: {decision:?}");
    };
    assert_eq!(reply.status, 401);
    assert!(reply.header_value("www-authenticate").is_some());
    for (name, value) in &reply.headers {
        assert!(
            !value.iter().any(|b| matches!(b, b'\r' | b'\n' | 0)),
            "bad value of {name}"
        );
    }
    reply
}

fn challenge(reply: &Reply) -> &str {
    let value = reply.header_value("www-authenticate").unwrap_or_default();
    std::str::from_utf8(value).expect("the challenge is UTF-8")
}

fn reason(reply: &Reply) -> String {
    let body: Value = serde_json::from_slice(&reply.body).expect("the body is JSON");
    assert_eq!(body["error"], "unauthorized");
    body["reason"].as_str().expect("a reason").to_string()
}

// === API keys ===

#[test]
fn a_configured_api_key_is_admitted_with_its_identity() {
    let request = TestRequest::get("/")
        .header("x-api-key", "demo-key")
        .build();
    assert_eq!(
        forwarded_identity(keys_and_hs256().on_request(&request)),
        "demo-user"
    );
}

#[test]
fn an_unknown_api_key_is_refused() {
    let request = TestRequest::get("/")
        .header("x-api-key", "demo-kez")
        .build();
    let reply = refusal(keys_and_hs256().on_request(&request));
    assert_eq!(reason(&reply), "invalid API key");
}

#[test]
fn the_api_key_header_can_be_renamed() {
    let auth = policy(json!({ "api_keys": { "header": "X-Key", "keys": { "k1": "alice" } } }));
    let request = TestRequest::get("/").header("x-key", "k1").build();
    assert_eq!(forwarded_identity(auth.on_request(&request)), "alice");
}

#[test]
fn a_request_without_credentials_gets_a_plain_challenge() {
    let reply = refusal(keys_and_hs256().on_request(&TestRequest::get("/").build()));
    assert_eq!(reason(&reply), "missing credentials");
    assert_eq!(challenge(&reply), "Bearer realm=\"sluice\"");
    let challenges: Vec<_> = reply
        .headers
        .iter()
        .filter(|(name, _)| name == "www-authenticate")
        .collect();
    assert_eq!(
        challenges.len(),
        2,
        "one challenge per scheme: {challenges:?}"
    );
}

#[test]
fn a_spoofed_identity_header_is_replaced() {
    let request = TestRequest::get("/")
        .header("x-sluice-identity", "admin")
        .header("x-api-key", "demo-key")
        .build();
    assert_eq!(
        forwarded_identity(keys_and_hs256().on_request(&request)),
        "demo-user"
    );
}

#[test]
fn a_spoofed_identity_header_alone_is_not_a_credential() {
    let request = TestRequest::get("/")
        .header("x-sluice-identity", "admin")
        .build();
    refusal(keys_and_hs256().on_request(&request));
}

// === JWT ===

#[test]
fn a_valid_hs256_token_is_admitted_with_its_subject() {
    let token = hs256_token(json!({ "sub": "alice", "aud": "my-api", "exp": in_an_hour() }));
    assert_eq!(
        forwarded_identity(keys_and_hs256().on_request(&bearer(&token))),
        "alice"
    );
}

#[test]
fn the_bearer_scheme_is_case_insensitive() {
    let token = hs256_token(json!({ "sub": "alice", "aud": "my-api", "exp": in_an_hour() }));
    let request = TestRequest::get("/")
        .header("authorization", format!("bearer {token}"))
        .build();
    assert_eq!(
        forwarded_identity(keys_and_hs256().on_request(&request)),
        "alice"
    );
}

#[test]
fn an_expired_token_is_refused_as_invalid() {
    let exp = get_current_timestamp() - 120;
    let token = hs256_token(json!({ "sub": "alice", "aud": "my-api", "exp": exp }));
    let reply = refusal(keys_and_hs256().on_request(&bearer(&token)));
    assert_eq!(reason(&reply), "the token has expired");
    assert_eq!(
        challenge(&reply),
        "Bearer realm=\"sluice\", error=\"invalid_token\", \
         error_description=\"the token has expired\""
    );
}

#[test]
fn a_token_for_another_audience_is_refused() {
    let token = hs256_token(json!({ "sub": "alice", "aud": "other-api", "exp": in_an_hour() }));
    let reply = refusal(keys_and_hs256().on_request(&bearer(&token)));
    assert_eq!(reason(&reply), "the token is not meant for this audience");
}

#[test]
fn a_configured_audience_is_required() {
    let token = hs256_token(json!({ "sub": "alice", "exp": in_an_hour() }));
    refusal(keys_and_hs256().on_request(&bearer(&token)));
}

#[test]
fn a_token_without_exp_is_refused() {
    let token = hs256_token(json!({ "sub": "alice", "aud": "my-api" }));
    let reply = refusal(keys_and_hs256().on_request(&bearer(&token)));
    assert_eq!(reason(&reply), "the token lacks a required claim");
}

#[test]
fn a_token_signed_with_another_secret_is_refused() {
    let claims = json!({ "sub": "alice", "aud": "my-api", "exp": in_an_hour() });
    let key = EncodingKey::from_secret(b"somebody else's secret of 32 bytes").expect("a secret");
    let forged = encode(&Header::new(Algorithm::HS256), &claims, &key).expect("it encodes");
    let reply = refusal(keys_and_hs256().on_request(&bearer(&forged)));
    assert_eq!(reason(&reply), "the token signature is invalid");
    assert!(challenge(&reply).contains("error=\"invalid_token\""));
}

#[test]
fn garbage_is_an_invalid_token() {
    let reply = refusal(keys_and_hs256().on_request(&bearer("not.a.jwt")));
    assert_eq!(reason(&reply), "the token is malformed");
}

#[test]
fn the_issuer_is_checked_when_configured() {
    let auth =
        policy(json!({ "jwt": { "algorithm": "HS256", "secret": SECRET, "issuer": "idp" } }));
    let good = hs256_token(json!({ "sub": "alice", "iss": "idp", "exp": in_an_hour() }));
    let bad = hs256_token(json!({ "sub": "alice", "iss": "evil", "exp": in_an_hour() }));
    assert_eq!(forwarded_identity(auth.on_request(&bearer(&good))), "alice");
    assert_eq!(
        reason(&refusal(auth.on_request(&bearer(&bad)))),
        "the token issuer is not trusted"
    );
}

#[test]
fn the_identity_claim_can_be_chosen() {
    let config =
        json!({ "jwt": { "algorithm": "HS256", "secret": SECRET, "identity_claim": "email" } });
    let auth = policy(config);
    let token = hs256_token(json!({ "sub": "1", "email": "a@example.com", "exp": in_an_hour() }));
    assert_eq!(
        forwarded_identity(auth.on_request(&bearer(&token))),
        "a@example.com"
    );
}

#[test]
fn an_identity_with_a_newline_is_refused() {
    let token =
        hs256_token(json!({ "sub": "alice\r\nx-admin: 1", "aud": "my-api", "exp": in_an_hour() }));
    refusal(keys_and_hs256().on_request(&bearer(&token)));
}

#[test]
fn a_valid_rs256_token_is_admitted() {
    let token = rs256_token(json!({ "sub": "bob", "exp": in_an_hour() }));
    assert_eq!(
        forwarded_identity(rs256(RSA_PUBLIC_PEM).on_request(&bearer(&token))),
        "bob"
    );
}

#[test]
fn an_rs256_token_signed_with_another_key_is_refused() {
    let token = rs256_token(json!({ "sub": "bob", "exp": in_an_hour() }));
    let reply = refusal(rs256(OTHER_RSA_PUBLIC_PEM).on_request(&bearer(&token)));
    assert_eq!(reason(&reply), "the token signature is invalid");
}

#[test]
fn an_hs256_token_is_not_accepted_by_an_rs256_policy() {
    let token = hs256_token(json!({ "sub": "bob", "exp": in_an_hour() }));
    let reply = refusal(rs256(RSA_PUBLIC_PEM).on_request(&bearer(&token)));
    assert_eq!(reason(&reply), "the token algorithm is not accepted");
}

#[test]
fn a_bearer_token_is_ignored_when_only_api_keys_are_configured() {
    let auth = policy(json!({ "api_keys": { "keys": { "k1": "alice" } } }));
    let reply = refusal(auth.on_request(&bearer("whatever")));
    assert_eq!(
        challenge(&reply),
        "ApiKey realm=\"sluice\", header=\"x-api-key\""
    );
}

// === configuration ===

#[test]
fn a_config_without_any_scheme_is_rejected() {
    assert!(config_error(json!({})).contains("[api_keys]"));
}

#[test]
fn unknown_settings_are_rejected() {
    let config = json!({ "api_keys": { "keys": { "k": "u" }, "heder": "x" } });
    assert!(config_error(config).contains("heder"));
}

#[test]
fn jwt_keys_must_match_the_algorithm() {
    let hs256 = json!({ "jwt": { "algorithm": "HS256", "public_key_pem": RSA_PUBLIC_PEM } });
    assert!(config_error(hs256).contains("needs jwt.secret"));
    let rs256 = json!({ "jwt": { "algorithm": "RS256", "secret": SECRET } });
    assert!(config_error(rs256).contains("needs jwt.public_key_pem"));
    let other = json!({ "jwt": { "algorithm": "none", "secret": SECRET } });
    assert!(config_error(other).contains("none"));
}

#[test]
fn weak_or_broken_keys_are_rejected() {
    let short = json!({ "jwt": { "algorithm": "HS256", "secret": "short" } });
    assert!(config_error(short).contains("at least 32 bytes"));
    let not_pem = json!({ "jwt": { "algorithm": "RS256", "public_key_pem": "hello" } });
    assert!(config_error(not_pem).contains("public_key_pem"));
    let not_rsa = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n";
    let not_rsa = json!({ "jwt": { "algorithm": "RS256", "public_key_pem": not_rsa } });
    assert!(config_error(not_rsa).contains("public_key_pem"));
}

#[test]
fn header_settings_are_validated() {
    let bad_header =
        json!({ "identity_header": "x identity", "api_keys": { "keys": { "k": "u" } } });
    assert!(config_error(bad_header).contains("identity_header"));
    let no_keys = json!({ "api_keys": { "keys": {} } });
    assert!(config_error(no_keys).contains("at least one key"));
    let bad_identity = json!({ "api_keys": { "keys": { "k": "u\nx" } } });
    assert!(config_error(bad_identity).contains("control characters"));
    let bad_realm = json!({ "realm": "a\"b", "api_keys": { "keys": { "k": "u" } } });
    assert!(config_error(bad_realm).contains("realm"));
}

#[test]
fn a_huge_leeway_is_rejected() {
    let config =
        json!({ "jwt": { "algorithm": "HS256", "secret": SECRET, "leeway_seconds": 86400 } });
    assert!(config_error(config).contains("leeway_seconds"));
}
