//! The rate-limit primitive behind the `rate-limit` host function, alone and under contention
//! from several threads checking keys of the same bucket.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use sluice_ratelimit::{Buckets, Quota};

const QUOTA: Quota = Quota {
    limit: 1_000_000_000,
    period_ms: 1000,
    burst: 1_000_000,
};
const KEYS: usize = 1024;

fn contended(
    buckets: &Arc<Buckets>,
    keys: &Arc<Vec<String>>,
    threads: u64,
    iterations: u64,
) -> Duration {
    let per_thread = iterations.div_ceil(threads);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for t in 0..threads {
            let (buckets, keys) = (buckets.clone(), keys.clone());
            scope.spawn(move || {
                for i in 0..per_thread {
                    let key = &keys[((i * 7 + t * 131) as usize) % KEYS];
                    std::hint::black_box(buckets.check("bench", key, QUOTA, 1));
                }
            });
        }
    });
    // Time per check as seen by the whole process.
    started.elapsed()
}

fn rate_limit(c: &mut Criterion) {
    let buckets = Arc::new(Buckets::new());
    let keys = Arc::new((0..KEYS).map(|i| format!("client-{i}")).collect::<Vec<_>>());

    let mut group = c.benchmark_group("rate_limit");
    group.bench_function("one_thread", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % KEYS;
            buckets.check("bench", &keys[i], QUOTA, 1)
        })
    });
    for threads in [2, 4] {
        group.bench_function(format!("{threads}_threads"), |b| {
            b.iter_custom(|iterations| contended(&buckets, &keys, threads, iterations))
        });
    }
    group.finish();
}

criterion_group!(benches, rate_limit);
criterion_main!(benches);
