//! Route matching over 1,000 routes: by host, then by the longest path prefix.

use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use sluice::config;
use sluice::metrics::Metrics;
use sluice::proxy::{Route, Router};
use sluice::upstream::Upstream;

fn router(routes: usize) -> Router {
    let metrics = Metrics::new();
    let upstream: config::Upstream =
        toml::from_str("name = \"app\"\ntargets = [\"127.0.0.1:9000\"]").expect("valid");
    let upstream = Arc::new(Upstream::new(&upstream, &metrics).expect("plain upstream"));
    let routes = (0..routes).map(|i| {
        let host = if i % 2 == 0 {
            format!("host = \"svc{i}.example.com\"\n")
        } else {
            String::new()
        };
        let text =
            format!("name = \"r{i}\"\n{host}path_prefix = \"/svc{i}/v1\"\nupstream = \"app\"\n");
        let settings: config::Route = toml::from_str(&text).expect("valid route");
        Route::new(
            &settings,
            upstream.clone(),
            Vec::new(),
            None,
            None,
            &metrics,
        )
    });
    Router::new(routes.collect())
}

fn routing(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _entered = rt.enter();
    let router = router(1000);

    let mut group = c.benchmark_group("routing_1000_routes");
    group.bench_function("exact_host_hit", |b| {
        b.iter(|| {
            router
                .find(Some("svc998.example.com:8080"), "/svc998/v1/items")
                .expect("a route")
        })
    });
    group.bench_function("any_host_last", |b| {
        b.iter(|| {
            router
                .find(Some("other.example.com"), "/svc999/v1/items")
                .expect("a route")
        })
    });
    group.bench_function("miss", |b| {
        b.iter(|| router.find(Some("other.example.com"), "/nowhere"))
    });
    group.finish();
}

criterion_group!(benches, routing);
criterion_main!(benches);
