//! Active health checks: a background task per upstream that requests a path from every
//! target at an interval and takes targets out of, and back into, the rotation.

use std::sync::{Arc, Weak};

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery};
use http::{Request, header};
use http_body_util::{Either, Full};
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;

use super::RequestBody;
use super::connect::Addressing;
use super::target::Targets;
use crate::config;

/// Consecutive results of one target's checks.
#[derive(Debug, Clone, Copy, Default)]
struct Streak {
    passes: u32,
    failures: u32,
}

/// Checks the targets until they are dropped (when their upstream leaves the configuration).
///
/// Checks go through each target's own pool, as requests do, naming `host` when there is
/// one (the upstream's `host_header`).
pub fn spawn(
    upstream: String,
    targets: Weak<Targets>,
    settings: config::HealthCheck,
    addressing: Addressing,
    host: Option<Authority>,
) {
    // NB: the config check has parsed the path.
    let path: PathAndQuery = settings
        .path
        .parse()
        .unwrap_or(PathAndQuery::from_static("/"));

    tokio::spawn(async move {
        let mut streaks = Vec::new();
        let mut every = tokio::time::interval(settings.interval_ms);
        every.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let Some(targets) = targets.upgrade() else {
                return;
            };
            streaks.resize(targets.list.len(), Streak::default());
            let results = check_all(&targets, &addressing, &host, &path, &settings).await;
            for (index, passed) in results {
                judge(
                    &upstream,
                    &targets,
                    index,
                    &mut streaks[index],
                    passed,
                    &settings,
                );
            }
        }
    });
}

/// Checks every target at once; `(target index, passed)` for each.
async fn check_all(
    targets: &Targets,
    addressing: &Addressing,
    host: &Option<Authority>,
    path: &PathAndQuery,
    settings: &config::HealthCheck,
) -> Vec<(usize, bool)> {
    let mut checks = JoinSet::new();
    for (index, target) in targets.list.iter().enumerate() {
        let uri = addressing.uri(&target.authority, host.clone(), path.clone());
        let response = target.pool.request(check_request(uri, host.as_ref()));
        let timeout = settings.timeout_ms;
        checks.spawn(async move {
            let passed = matches!(
                tokio::time::timeout(timeout, response).await,
                Ok(Ok(response)) if response.status().is_success()
            );
            (index, passed)
        });
    }
    checks.join_all().await
}

/// Applies the thresholds to one result and logs a change of verdict.
fn judge(
    upstream: &str,
    targets: &Arc<Targets>,
    index: usize,
    streak: &mut Streak,
    passed: bool,
    settings: &config::HealthCheck,
) {
    if passed {
        *streak = Streak {
            passes: streak.passes + 1,
            failures: 0,
        };
    } else {
        *streak = Streak {
            passes: 0,
            failures: streak.failures + 1,
        };
    }
    let target = &targets.list[index];
    let was_passing = targets.passes_checks(index);
    if was_passing && streak.failures >= settings.unhealthy_threshold {
        tracing::warn!(upstream, target = %target.authority, failures = streak.failures, "target failed its health checks");
        targets.set_passes_checks(index, false);
    } else if !was_passing && streak.passes >= settings.healthy_threshold {
        tracing::info!(upstream, target = %target.authority, "target passes its health checks again");
        targets.set_passes_checks(index, true);
    }
}

fn check_request(uri: http::Uri, host: Option<&Authority>) -> Request<RequestBody> {
    let mut request = Request::new(Either::Right(Full::new(Bytes::new())));
    *request.uri_mut() = uri;
    if let Some(host) = host.and_then(|host| header::HeaderValue::from_str(host.as_str()).ok()) {
        request.headers_mut().insert(header::HOST, host);
    }
    request.headers_mut().insert(
        header::USER_AGENT,
        http::HeaderValue::from_static("sluice-health-check"),
    );
    request
}
