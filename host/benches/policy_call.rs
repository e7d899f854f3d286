//! The cost of one policy call, per bundled plugin: on a pooled instance (the default), and
//! with `isolation = "request"`, where each call instantiates from the pre-linked component,
//! runs the request phase and drops the instance. The request carries 20 headers.
//!
//! Needs the compiled plugins: run `cargo xtask build-plugins` first.

use std::path::PathBuf;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use sluice::config;
use sluice::metrics::Metrics;
use sluice::plugin::{Plugin, RequestHead, Runtime, header_list};
use sluice_ratelimit::Buckets;

const PLUGINS: &[(&str, &str)] = &[
    (
        "auth",
        r#"{ api_keys = { keys = { "bench-key" = "bench-user" } } }"#,
    ),
    (
        "transform",
        r#"{ request = { set = { "x-env" = "bench" }, remove = ["x-internal"] } }"#,
    ),
    (
        "throttle",
        r#"{ key = "client", limit = 1000000000, period = "1s" }"#,
    ),
];

fn plugin_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(format!("../target/wasm32-wasip2/plugin/{name}.wasm"))
}

fn settings(name: &str, config: &str, isolation: &str) -> config::Plugin {
    let text = format!(
        "name = \"{name}\"\npath = \"{}\"\nisolation = \"{isolation}\"\nconfig = {config}\n",
        plugin_path(name).display()
    );
    toml::from_str(&text).expect("valid plugin settings")
}

fn request() -> RequestHead {
    let mut headers = http::HeaderMap::new();
    for i in 0..18 {
        let name = http::HeaderName::try_from(format!("x-header-{i}")).expect("header name");
        let value = http::HeaderValue::try_from(format!("value number {i}")).expect("value");
        headers.insert(name, value);
    }
    headers.insert("host", http::HeaderValue::from_static("api.example.com"));
    headers.insert("x-api-key", http::HeaderValue::from_static("bench-key"));
    RequestHead {
        method: "GET".into(),
        path_and_query: "/v1/items?page=2".into(),
        headers: header_list(&headers),
        client_addr: "203.0.113.7".into(),
        route: "bench".into(),
    }
}

fn policy_call(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let runtime = Runtime::new(&config::Runtime::default()).expect("engine");
    let (buckets, metrics) = (Arc::new(Buckets::new()), Metrics::new());
    let request = request();

    let mut group = c.benchmark_group("policy_call");
    for (name, config) in PLUGINS {
        for isolation in ["pooled", "request"] {
            let settings = settings(name, config, isolation);
            let plugin = rt
                .block_on(Plugin::load(&runtime, &settings, buckets.clone(), &metrics))
                .unwrap_or_else(|err| panic!("{name}: {err} (run `cargo xtask build-plugins`)"));
            group.bench_function(format!("{name}/{isolation}"), |b| {
                b.iter(|| {
                    rt.block_on(plugin.on_request(&request))
                        .expect("the call succeeds")
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, policy_call);
criterion_main!(benches);
