//! The running gateway: the current configuration snapshot and what outlives it.
//!
//! A [`Snapshot`] is everything built from one configuration: routes resolved against their
//! upstreams and loaded plugins. It is built whole, off the request path, and published in
//! one atomic store; each request loads the snapshot once and keeps it until it is answered.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use sluice_ratelimit::Buckets;

use crate::config::{Config, ConfigError};
use crate::metrics::Metrics;
use crate::plugin::{Plugin, Runtime};
use crate::proxy::{Route, Router, Upstream};

/// How often idle rate-limit keys are forgotten.
const BUCKET_SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// Everything built from one configuration.
#[derive(Debug)]
pub struct Snapshot {
    pub router: Router,
    /// Largest request body accepted.
    pub max_body_bytes: u64,
}

/// The gateway: its current snapshot, plugin runtime, shared rate-limit state and metrics.
pub struct Gateway {
    snapshot: ArcSwap<Snapshot>,
    metrics: Metrics,
    _runtime: Arc<Runtime>,
}

impl Gateway {
    /// Builds the plugin runtime and the first snapshot; any problem fails the whole start.
    pub async fn new(config: &Config, metrics: Metrics) -> Result<Arc<Gateway>, ConfigError> {
        let runtime =
            Runtime::new(&config.runtime).map_err(|err| ConfigError::one(format!("{err:#}")))?;
        let buckets = Arc::new(Buckets::new());
        let snapshot = build_snapshot(config, &runtime, &buckets, &metrics).await?;
        spawn_bucket_sweeper(Arc::downgrade(&buckets));
        Ok(Arc::new(Gateway {
            snapshot: ArcSwap::from_pointee(snapshot),
            metrics,
            _runtime: runtime,
        }))
    }

    /// The current snapshot; the caller keeps it alive for as long as it holds it.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").finish_non_exhaustive()
    }
}

/// Checks a configuration the way a start would: compiles and links every plugin and runs
/// its configuration check, reporting every problem found.
pub async fn check(config: &Config) -> Result<(), ConfigError> {
    Gateway::new(config, Metrics::new()).await.map(drop)
}

/// Loads every plugin and resolves every route; collects all problems rather than the first.
async fn build_snapshot(
    config: &Config,
    runtime: &Arc<Runtime>,
    buckets: &Arc<Buckets>,
    metrics: &Metrics,
) -> Result<Snapshot, ConfigError> {
    let mut problems = Vec::new();
    let mut plugins = HashMap::new();
    for settings in &config.plugins {
        match Plugin::load(runtime, settings, buckets.clone(), metrics).await {
            Ok(plugin) => {
                plugins.insert(settings.name.as_str(), plugin);
            }
            Err(err) => problems.push(format!("plugin `{}`: {err}", settings.name)),
        }
    }
    if !problems.is_empty() {
        return Err(ConfigError { problems });
    }

    let upstreams: HashMap<&str, Arc<Upstream>> = config
        .upstreams
        .iter()
        .map(|u| (u.name.as_str(), Arc::new(Upstream::new(u, metrics))))
        .collect();
    let routes = config.routes.iter().map(|route| {
        // NB: `Config::parse` has checked that every name a route uses exists.
        let upstream = upstreams[route.upstream.as_str()].clone();
        let policies = route
            .policies
            .iter()
            .map(|name| plugins[name.as_str()].clone())
            .collect();
        Route::new(route, upstream, policies, metrics)
    });
    Ok(Snapshot {
        router: Router::new(routes.collect()),
        max_body_bytes: config.listener.max_body_bytes,
    })
}

fn spawn_bucket_sweeper(buckets: std::sync::Weak<Buckets>) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(BUCKET_SWEEP_INTERVAL);
        every.tick().await;
        loop {
            every.tick().await;
            let Some(buckets) = buckets.upgrade() else {
                return;
            };
            buckets.retain_recent();
        }
    });
}
