//! Unit tests of the transform policy, run natively through the SDK's test harness.

use serde_json::{Value, json};
use sluice_sdk::testing::{TestRequest, instantiate, response};
use sluice_sdk::{Decision, Policy, RequestChanges};

use crate::Transform;

fn policy(config: Value) -> Transform {
    instantiate(&config.to_string()).expect("the config is valid")
}

fn config_error(config: Value) -> String {
    match instantiate::<Transform>(&config.to_string()) {
        Ok(policy) => panic!("the config {config} was accepted: {policy:?}"),
        Err(message) => message,
    }
}

fn request_changes(transform: &Transform, path_and_query: &str) -> RequestChanges {
    match transform.on_request(&TestRequest::get(path_and_query).build()) {
        Decision::Continue(changes) => changes,
        Decision::Respond(reply) => panic!("the request was answered: {reply:?}"),
    }
}

fn rewritten(prefix: &str, replacement: &str, path_and_query: &str) -> Option<String> {
    let transform = policy(json!({ "rewrite": { "prefix": prefix, "replacement": replacement } }));
    request_changes(&transform, path_and_query).path_and_query
}

fn headers(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
    pairs
        .iter()
        .map(|(name, value)| (name.to_string(), value.as_bytes().to_vec()))
        .collect()
}

// === headers ===

#[test]
fn request_headers_are_set_added_and_removed() {
    let transform = policy(json!({ "request": {
        "set": { "X-Env": "demo" },
        "add": { "x-via": "sluice" },
        "remove": ["X-Internal"],
    } }));
    let changes = request_changes(&transform, "/");
    assert_eq!(changes.headers.set, headers(&[("x-env", "demo")]));
    assert_eq!(changes.headers.add, headers(&[("x-via", "sluice")]));
    assert_eq!(changes.headers.remove, ["x-internal"]);
    assert_eq!(changes.path_and_query, None);
}

#[test]
fn response_headers_are_set_added_and_removed() {
    let transform = policy(json!({ "response": {
        "set": { "cache-control": "no-store" },
        "add": { "x-served-by": "sluice" },
        "remove": ["server"],
    } }));
    let request = TestRequest::get("/").build();
    let changes = transform.on_response(&request, &response(200, &[("server", "upstream")]));
    assert_eq!(changes.set, headers(&[("cache-control", "no-store")]));
    assert_eq!(changes.add, headers(&[("x-served-by", "sluice")]));
    assert_eq!(changes.remove, ["server"]);
}

#[test]
fn request_edits_leave_the_response_alone() {
    let transform = policy(json!({ "request": { "set": { "x-env": "demo" } } }));
    let request = TestRequest::get("/").build();
    assert!(
        transform
            .on_response(&request, &response(200, &[]))
            .is_empty()
    );
}

#[test]
fn header_values_may_hold_any_visible_text() {
    let transform = policy(json!({ "request": { "set": { "x-note": "a \"quoted\";\tb=1, ü" } } }));
    let set = request_changes(&transform, "/").headers.set;
    assert_eq!(set, headers(&[("x-note", "a \"quoted\";\tb=1, ü")]));
}

#[test]
fn header_names_must_be_tokens() {
    for bad in ["x env", "x:y", "", "x\r\ny", "é"] {
        let error = config_error(json!({ "request": { "set": { bad: "v" } } }));
        assert!(
            error.contains("not a valid header name"),
            "{bad:?}: {error}"
        );
    }
    let error = config_error(json!({ "response": { "remove": ["bad name"] } }));
    assert!(error.contains("response.remove"), "{error}");
}

#[test]
fn header_values_must_not_hold_control_characters() {
    for bad in [
        "a\rb",
        "a\nb",
        "a\0b",
        "ok\r\nx-evil: 1",
        "a\x01b",
        "a\x7fb",
    ] {
        let error = config_error(json!({ "response": { "add": { "x-a": bad } } }));
        assert!(error.contains("control character"), "{bad:?}: {error}");
    }
}

#[test]
fn connection_headers_are_refused() {
    let error = config_error(json!({ "request": { "remove": ["Transfer-Encoding"] } }));
    assert!(error.contains("managed by the gateway"), "{error}");
    let error = config_error(json!({ "response": { "set": { "connection": "close" } } }));
    assert!(error.contains("managed by the gateway"), "{error}");
    let error = config_error(json!({ "request": { "add": { "Proxy-Authorization": "x" } } }));
    assert!(error.contains("managed by the gateway"), "{error}");
}

#[test]
fn names_differing_only_in_case_are_refused() {
    let error = config_error(json!({ "request": { "set": { "X-Env": "a", "x-env": "b" } } }));
    assert!(error.contains("listed twice"), "{error}");
    let error = config_error(json!({ "request": { "remove": ["x-a", "X-A"] } }));
    assert!(error.contains("listed twice"), "{error}");
}

// === rewrite ===

#[test]
fn a_prefix_is_replaced_and_the_query_kept() {
    assert_eq!(
        rewritten("/api", "/v1", "/api/users?x=1").as_deref(),
        Some("/v1/users?x=1")
    );
    assert_eq!(rewritten("/api", "/v1", "/api").as_deref(), Some("/v1"));
    assert_eq!(rewritten("/api", "/v1", "/api/").as_deref(), Some("/v1/"));
    assert_eq!(
        rewritten("/api", "/v1", "/api?x=/api").as_deref(),
        Some("/v1?x=/api")
    );
}

#[test]
fn a_prefix_matches_whole_segments_only() {
    assert_eq!(rewritten("/api", "/v1", "/apis/users"), None);
    assert_eq!(rewritten("/api", "/v1", "/other/api"), None);
    assert_eq!(rewritten("/api", "/v1", "/ap"), None);
    assert_eq!(rewritten("/api", "/v1", "/API/users"), None);
}

#[test]
fn trailing_slashes_do_not_matter() {
    assert_eq!(
        rewritten("/api/", "/v1/", "/api/users").as_deref(),
        Some("/v1/users")
    );
    assert_eq!(rewritten("/api/", "/v1", "/api").as_deref(), Some("/v1"));
}

#[test]
fn a_prefix_can_be_stripped_or_added() {
    assert_eq!(
        rewritten("/api", "/", "/api/users?x=1").as_deref(),
        Some("/users?x=1")
    );
    assert_eq!(rewritten("/api", "/", "/api").as_deref(), Some("/"));
    assert_eq!(rewritten("/api", "/", "/api?x=1").as_deref(), Some("/?x=1"));
    assert_eq!(
        rewritten("/", "/v1", "/users").as_deref(),
        Some("/v1/users")
    );
    assert_eq!(rewritten("/", "/v1", "/").as_deref(), Some("/v1/"));
}

#[test]
fn rewrite_paths_are_validated() {
    let rewrite = |prefix: &str, replacement: &str| {
        config_error(json!({ "rewrite": { "prefix": prefix, "replacement": replacement } }))
    };
    assert!(rewrite("/api", "v1").contains("rewrite.replacement"));
    assert!(rewrite("api", "/v1").contains("rewrite.prefix"));
    for bad in ["/v1?x=1", "/v1#top", "/a b", "/v1\r\n", "/<v1>", "/`", "/é"] {
        assert!(rewrite("/api", bad).contains("path characters"), "{bad:?}");
        assert!(rewrite(bad, "/v1").contains("path characters"), "{bad:?}");
    }
    assert_eq!(
        rewritten("/a%20b", "/c:d@e", "/a%20b/x").as_deref(),
        Some("/c:d@e/x")
    );
    assert!(config_error(json!({ "rewrite": { "prefix": "/api" } })).contains("replacement"));
}

// === configuration ===

#[test]
fn an_empty_config_is_refused() {
    assert!(config_error(json!({})).contains("nothing to do"));
    assert!(config_error(json!({ "request": {} })).contains("nothing to do"));
}

#[test]
fn unknown_settings_are_refused() {
    assert!(config_error(json!({ "request": { "sett": {} } })).contains("sett"));
    assert!(config_error(json!({ "rewrites": {} })).contains("rewrites"));
}
