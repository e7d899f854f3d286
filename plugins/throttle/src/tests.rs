//! Unit tests of the throttle policy. The native harness serves `rate_limit` with the
//! gateway's own GCRA buckets, shared by the whole test process, so every test uses keys of
//! its own.

use serde_json::{Value, json};
use sluice_sdk::testing::{TestRequest, instantiate};
use sluice_sdk::{Decision, Policy, Reply, Request};

use crate::Throttle;

fn policy(config: Value) -> Throttle {
    instantiate(&config.to_string()).expect("the config is valid")
}

fn config_error(config: Value) -> String {
    match instantiate::<Throttle>(&config.to_string()) {
        Ok(policy) => panic!("the config {config} was accepted: {policy:?}"),
        Err(message) => message,
    }
}

fn from(client_addr: &str) -> TestRequest {
    TestRequest::get("/").client_addr(client_addr)
}

fn is_allowed(throttle: &Throttle, request: &Request) -> bool {
    match throttle.on_request(request) {
        Decision::Continue(changes) => {
            assert!(changes.headers.is_empty() && changes.path_and_query.is_none());
            true
        }
        Decision::Respond(_) => false,
    }
}

fn refusal(throttle: &Throttle, request: &Request) -> Reply {
    match throttle.on_request(request) {
        Decision::Respond(reply) => reply,
        Decision::Continue(changes) => panic!("the request was allowed: {changes:?}"),
    }
}

fn header(reply: &Reply, name: &str) -> String {
    let value = reply
        .header_value(name)
        .unwrap_or_else(|| panic!("no {name} header"));
    String::from_utf8(value.to_vec()).expect("the header is UTF-8")
}

/// Sends `count` requests and asserts that all of them are allowed.
fn spend(throttle: &Throttle, request: &Request, count: u32) {
    for sent in 0..count {
        assert!(
            is_allowed(throttle, request),
            "request {} of {count} was refused",
            sent + 1
        );
    }
}

#[test]
fn the_request_after_the_burst_gets_429_with_rate_limit_headers() {
    let throttle = policy(json!({ "limit": 2, "period": "1h", "burst": 3 }));
    let request = from("192.0.2.1").build();
    spend(&throttle, &request, 3);

    let reply = refusal(&throttle, &request);
    assert_eq!(reply.status, 429);
    let retry_after: u64 = header(&reply, "retry-after")
        .parse()
        .expect("whole seconds");
    // One of 2 units per hour refills every 30 minutes.
    assert!((1799..=1800).contains(&retry_after), "{retry_after}");
    assert_eq!(
        header(&reply, "ratelimit-policy"),
        "\"throttle\";q=2;w=3600"
    );
    assert_eq!(
        header(&reply, "ratelimit"),
        format!("\"throttle\";r=0;t={retry_after}")
    );

    let body: Value = serde_json::from_slice(&reply.body).expect("a JSON body");
    assert_eq!(
        body,
        json!({ "error": "rate_limited", "retry_after_seconds": retry_after })
    );
    assert_eq!(header(&reply, "content-type"), "application/json");
}

#[test]
fn burst_defaults_to_the_limit() {
    let throttle = policy(json!({ "limit": 4, "period": "1m" }));
    let request = from("192.0.2.2").build();
    spend(&throttle, &request, 4);
    assert_eq!(refusal(&throttle, &request).status, 429);
}

#[test]
fn sub_second_waits_round_up_to_one_second() {
    let throttle = policy(json!({ "limit": 1, "period": "500ms", "name": "fast" }));
    let request = from("192.0.2.3").build();

    // A unit refills every 500 ms, so a stalled test thread may see a request allowed; one of
    // a few quick requests is refused all the same.
    let reply = (0..10)
        .find_map(|_| match throttle.on_request(&request) {
            Decision::Respond(reply) => Some(reply),
            Decision::Continue(_) => None,
        })
        .expect("a request was refused");
    assert_eq!(header(&reply, "retry-after"), "1");
    assert_eq!(header(&reply, "ratelimit-policy"), "\"fast\";q=1;w=1");
    assert_eq!(header(&reply, "ratelimit"), "\"fast\";r=0;t=1");
}

#[test]
fn clients_have_separate_buckets() {
    let throttle = policy(json!({ "limit": 1, "period": "1h" }));
    spend(&throttle, &from("192.0.2.4").build(), 1);
    assert!(!is_allowed(&throttle, &from("192.0.2.4").build()));
    assert!(is_allowed(&throttle, &from("192.0.2.5").build()));
}

#[test]
fn a_header_key_gives_each_value_its_bucket() {
    let throttle = policy(json!({ "key": "header:X-Tenant", "limit": 1, "period": "1h" }));
    let tenant = |name: &str| from("192.0.2.6").header("x-tenant", name).build();
    spend(&throttle, &tenant("tenant-a"), 1);
    assert!(!is_allowed(&throttle, &tenant("tenant-a")));
    assert!(is_allowed(&throttle, &tenant("tenant-b")));
}

#[test]
fn a_missing_or_unreadable_key_falls_back_to_the_client_address() {
    let throttle = policy(json!({ "key": "header:x-tenant", "limit": 2, "period": "1h" }));
    spend(&throttle, &from("192.0.2.7").build(), 1);
    spend(
        &throttle,
        &from("192.0.2.7")
            .header("x-tenant", b"\xff\xfe".to_vec())
            .build(),
        1,
    );
    assert!(!is_allowed(
        &throttle,
        &from("192.0.2.7").header("x-tenant", "").build()
    ));
    assert!(is_allowed(
        &throttle,
        &from("192.0.2.7").header("x-tenant", "t").build()
    ));
}

#[test]
fn a_header_value_never_shares_a_bucket_with_a_client_address() {
    let throttle = policy(json!({ "key": "header:x-tenant", "limit": 1, "period": "1h" }));
    spend(&throttle, &from("192.0.2.8").build(), 1);
    let posing = from("198.51.100.1").header("x-tenant", "192.0.2.8").build();
    assert!(is_allowed(&throttle, &posing));
}

#[test]
fn the_identity_key_reads_the_identity_header() {
    let throttle = policy(json!({ "key": "identity", "limit": 1, "period": "1h" }));
    let user = |name: &str| from("192.0.2.9").header("x-sluice-identity", name).build();
    spend(&throttle, &user("throttle-test-alice"), 1);
    assert!(!is_allowed(&throttle, &user("throttle-test-alice")));
    assert!(is_allowed(&throttle, &user("throttle-test-bob")));
}

#[test]
fn the_identity_header_can_be_renamed() {
    let config =
        json!({ "key": "identity", "identity_header": "X-User", "limit": 1, "period": "1h" });
    let throttle = policy(config);
    let user = |name: &str| from("192.0.2.10").header("x-user", name).build();
    spend(&throttle, &user("throttle-test-carol"), 1);
    assert!(!is_allowed(&throttle, &user("throttle-test-carol")));
    assert!(is_allowed(&throttle, &user("throttle-test-dave")));
}

// === configuration ===

#[test]
fn bad_keys_are_refused() {
    let error = config_error(json!({ "key": "ip", "limit": 1, "period": "1s" }));
    assert!(error.contains("\"header:<name>\""), "{error}");
    let error = config_error(json!({ "key": "header:", "limit": 1, "period": "1s" }));
    assert!(error.contains("not a valid header name"), "{error}");
    let error = config_error(json!({ "key": "header:a b", "limit": 1, "period": "1s" }));
    assert!(error.contains("not a valid header name"), "{error}");
}

#[test]
fn identity_header_needs_the_identity_key() {
    let config =
        json!({ "key": "client", "identity_header": "x-user", "limit": 1, "period": "1s" });
    assert!(config_error(config).contains("key = \"identity\""));
    let config =
        json!({ "key": "identity", "identity_header": "x user", "limit": 1, "period": "1s" });
    assert!(config_error(config).contains("identity_header"));
}

#[test]
fn quotas_are_validated() {
    assert!(config_error(json!({ "limit": 0, "period": "1s" })).contains("at least 1"));
    assert!(config_error(json!({ "limit": 1, "burst": 0, "period": "1s" })).contains("at least 1"));
    assert!(config_error(json!({ "limit": 1, "period": "1 second" })).contains("period"));
    assert!(config_error(json!({ "limit": -1, "period": "1s" })).contains("invalid"));
    let too_fine = json!({ "limit": 4_000_000_000u32, "period": "1ms" });
    assert!(config_error(too_fine).contains("finer"));
}

#[test]
fn required_and_unknown_settings_are_checked() {
    assert!(config_error(json!({ "period": "1s" })).contains("limit"));
    assert!(config_error(json!({ "limit": 1 })).contains("period"));
    assert!(config_error(json!({ "limit": 1, "period": "1s", "burts": 2 })).contains("burts"));
    assert!(config_error(json!({ "limit": 1, "period": "1s", "name": "a\"b" })).contains("name"));
}
