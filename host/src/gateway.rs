//! The running gateway: the current configuration snapshot and what outlives it.
//!
//! A [`Snapshot`] is everything built from one configuration: routes resolved against their
//! upstreams and loaded plugins. It is built whole, off the request path, and published in
//! one atomic store; each request loads the snapshot once and keeps it until its response has
//! been sent. A reload builds the next snapshot beside the current one, keeping whatever did
//! not change (plugins with their warm instances, upstreams with their connection pools,
//! routes' admission queues), and publishes it only if every part of it loaded.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use sluice_ratelimit::Buckets;

use crate::admission::Gate;
use crate::config::{self, Config, ConfigError};
use crate::llm::LlmRoute;
use crate::metrics::Metrics;
use crate::plugin::{Plugin, Runtime, digest};
use crate::proxy::{Route, Router, TrustedProxies};
use crate::upstream::Upstream;

/// How often idle rate-limit keys are forgotten.
const BUCKET_SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// How often the metric series of removed parts are dropped again once the requests that
/// were still using them have finished.
const RETIRED_SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Everything built from one configuration.
#[derive(Debug)]
pub struct Snapshot {
    /// 1 for the configuration the gateway started with, then one more per reload.
    pub generation: u64,
    pub router: Router,
    /// Largest request body accepted.
    pub max_body_bytes: u64,
    /// Longest request target accepted.
    pub max_uri_bytes: usize,
    /// What to do with an encoded slash in a path.
    pub encoded_slash: config::EncodedSlash,
    /// Proxies whose forwarding headers are believed.
    pub trusted_proxies: TrustedProxies,
    config: Config,
    plugins: HashMap<String, Arc<Plugin>>,
    upstreams: HashMap<String, Arc<Upstream>>,
}

/// The gateway: its current snapshot, plugin runtime, shared rate-limit state and metrics.
pub struct Gateway {
    snapshot: ArcSwap<Snapshot>,
    metrics: Metrics,
    runtime: Arc<Runtime>,
    buckets: Arc<Buckets>,
    /// Reloads run one at a time, so each builds on the snapshot before it.
    reloading: tokio::sync::Mutex<()>,
    /// Snapshots replaced by a reload, with their configuration: requests that started on one
    /// may record metrics under names a reload removed, so once a snapshot is gone its removed
    /// names are dropped again.
    retired: std::sync::Mutex<Vec<(Weak<Snapshot>, Config)>>,
}

/// What a snapshot can reuse from the one before it.
struct Previous<'a> {
    snapshot: &'a Snapshot,
    admission: HashMap<&'a str, &'a Arc<Gate>>,
}

impl Gateway {
    /// Builds the plugin runtime and the first snapshot; any problem fails the whole start.
    pub async fn new(config: &Config, metrics: Metrics) -> Result<Arc<Gateway>, ConfigError> {
        let runtime =
            Runtime::new(&config.runtime).map_err(|err| ConfigError::one(format!("{err:#}")))?;
        let buckets = Arc::new(Buckets::new());
        let snapshot = build_snapshot(config, None, 1, &runtime, &buckets, &metrics).await?;
        metrics.config_loaded(1);
        spawn_sweeper(
            Arc::downgrade(&buckets),
            BUCKET_SWEEP_INTERVAL,
            Buckets::retain_recent,
        );
        let gateway = Arc::new(Gateway {
            snapshot: ArcSwap::from_pointee(snapshot),
            metrics,
            runtime,
            buckets,
            reloading: tokio::sync::Mutex::new(()),
            retired: std::sync::Mutex::default(),
        });
        spawn_sweeper(
            Arc::downgrade(&gateway),
            RETIRED_SWEEP_INTERVAL,
            Gateway::sweep_retired,
        );
        Ok(gateway)
    }

    /// The current snapshot; the caller keeps it alive for as long as it holds it.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Builds a snapshot from `config` and publishes it, returning its generation; on any
    /// problem the current snapshot stays and every problem is reported.
    pub async fn reload(&self, config: Config) -> Result<u64, ConfigError> {
        let _one_at_a_time = self.reloading.lock().await;
        let current = self.snapshot.load_full();
        let next = match needs_restart(&current.config, &config) {
            Some(problem) => Err(ConfigError::one(problem)),
            None => {
                let generation = current.generation + 1;
                let previous = Previous::of(&current);
                build_snapshot(
                    &config,
                    Some(previous),
                    generation,
                    &self.runtime,
                    &self.buckets,
                    &self.metrics,
                )
                .await
            }
        };
        match next {
            Ok(next) => {
                let generation = next.generation;
                // Components of this and the previous generation stay compiled, so switching
                // back to the version just replaced (a rollback) does not compile again.
                let live: HashSet<_> = next
                    .plugins
                    .values()
                    .chain(current.plugins.values())
                    .map(|p| *p.digest())
                    .collect();
                forget_removed(&self.metrics, &current.config, &next.config);
                self.retire(&current);
                self.snapshot.store(Arc::new(next));
                self.runtime.retain_compiled(&live);
                self.metrics.config_loaded(generation);
                tracing::info!(generation, "configuration reloaded");
                Ok(generation)
            }
            Err(err) => {
                self.metrics.config_refused();
                for problem in &err.problems {
                    tracing::warn!(generation = current.generation, "reload refused: {problem}");
                }
                Err(err)
            }
        }
    }
}

impl Gateway {
    fn retire(&self, snapshot: &Arc<Snapshot>) {
        let entry = (Arc::downgrade(snapshot), snapshot.config.clone());
        self.lock_retired().push(entry);
    }

    /// Drops again the series of names that snapshots no longer in use had and the current
    /// one does not, and forgets those snapshots.
    fn sweep_retired(&self) {
        let current = self.snapshot.load();
        self.lock_retired().retain(|(snapshot, config)| {
            let in_use = snapshot.strong_count() > 0;
            if !in_use {
                forget_removed(&self.metrics, config, &current.config);
            }
            in_use
        });
    }

    fn lock_retired(&self) -> std::sync::MutexGuard<'_, Vec<(Weak<Snapshot>, Config)>> {
        // NB: the list is only pushed to or filtered while locked; nothing panics inside.
        self.retired
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
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
    if let Some(tls) = &config.listener.tls {
        crate::proxy::tls::check(tls)
            .map_err(|err| ConfigError::one(format!("listener: {err:#}")))?;
    }
    Gateway::new(config, Metrics::new()).await.map(drop)
}

/// Why `next` cannot be applied without a restart, if it cannot: the listeners are bound and
/// the plugin engine's pool is sized once, at start.
fn needs_restart(current: &Config, next: &Config) -> Option<String> {
    let listener = |c: &Config| config::Listener {
        max_body_bytes: 0,
        max_uri_bytes: 0,
        trusted_proxies: Vec::new(),
        encoded_slash: config::EncodedSlash::default(),
        ..c.listener.clone()
    };
    let changed = if listener(current) != listener(next) {
        return Some(
            "[listener] changed: restart the gateway to apply it (of [listener], only \
             `max_body_bytes`, `max_uri_bytes`, `encoded_slash` and `trusted_proxies` can \
             change on reload)"
                .to_string(),
        );
    } else if current.admin != next.admin {
        "[admin]"
    } else if current.runtime != next.runtime {
        "[runtime]"
    } else if current.access_log != next.access_log {
        "[access_log]"
    } else {
        return None;
    };
    Some(format!(
        "{changed} changed: restart the gateway to apply it"
    ))
}

impl<'a> Previous<'a> {
    fn of(snapshot: &'a Snapshot) -> Self {
        let admission = snapshot
            .router
            .routes()
            .map(|r| (&*r.name, &r.admission))
            .collect();
        Previous {
            snapshot,
            admission,
        }
    }

    /// The LLM state (consumer budgets, deployments' standing) of the route of the same name,
    /// if its settings and every upstream its deployments use are unchanged.
    fn llm(
        &self,
        route: &config::Route,
        upstreams: &HashMap<String, Arc<Upstream>>,
    ) -> Option<Arc<LlmRoute>> {
        let old = self
            .snapshot
            .router
            .routes()
            .find(|r| *r.name == *route.name)?;
        let old_settings = self
            .snapshot
            .config
            .routes
            .iter()
            .find(|r| r.name == route.name)?;
        let settings = route.llm.as_ref()?;
        let same_upstreams = settings
            .models
            .iter()
            .flat_map(|m| &m.deployments)
            .all(|d| {
                let (before, now) = (
                    self.snapshot.upstreams.get(&d.upstream),
                    upstreams.get(&d.upstream),
                );
                before.zip(now).is_some_and(|(a, b)| Arc::ptr_eq(a, b))
            });
        (old_settings.llm.as_ref() == Some(settings) && same_upstreams)
            .then(|| old.llm.clone())
            .flatten()
    }

    /// The admission gate of the route of the same name, if its limits did not change, so the
    /// requests already in it keep counting.
    fn admission(&self, route: &config::Route) -> Option<Arc<Gate>> {
        let old = self
            .snapshot
            .config
            .routes
            .iter()
            .find(|r| r.name == route.name)?;
        let same = (old.max_in_flight, old.max_queued, old.queue_timeout_ms)
            == (
                route.max_in_flight,
                route.max_queued,
                route.queue_timeout_ms,
            );
        same.then(|| {
            self.admission
                .get(route.name.as_str())
                .map(|g| (*g).clone())
        })?
    }
}

/// Loads every plugin and resolves every route; collects all problems rather than the first.
async fn build_snapshot(
    config: &Config,
    previous: Option<Previous<'_>>,
    generation: u64,
    runtime: &Arc<Runtime>,
    buckets: &Arc<Buckets>,
    metrics: &Metrics,
) -> Result<Snapshot, ConfigError> {
    let old = previous.as_ref().map(|p| p.snapshot);
    let plugins = load_plugins(config, old, runtime, buckets, metrics).await?;
    let mut upstreams = HashMap::new();
    let mut problems = Vec::new();
    for settings in &config.upstreams {
        let kept = old.and_then(|old| old.upstream_if_unchanged(settings));
        let upstream = match kept {
            Some(kept) => kept,
            None => match Upstream::new(settings, metrics) {
                Ok(upstream) => Arc::new(upstream),
                Err(err) => {
                    problems.push(format!("upstream `{}`: {err:#}", settings.name));
                    continue;
                }
            },
        };
        upstreams.insert(settings.name.clone(), upstream);
    }
    if !problems.is_empty() {
        return Err(ConfigError { problems });
    }

    let routes = config.routes.iter().map(|route| {
        // NB: `Config::parse` has checked that every name a route uses exists.
        let upstream = upstreams[&route.upstream].clone();
        let policies = route
            .policies
            .iter()
            .map(|name| plugins[name].clone())
            .collect();
        let admission = previous.as_ref().and_then(|p| p.admission(route));
        let llm = route.llm.as_ref().map(|llm| {
            let kept = previous.as_ref().and_then(|p| p.llm(route, &upstreams));
            kept.unwrap_or_else(|| {
                Arc::new(LlmRoute::new(&route.name, llm, &upstreams, metrics.llm()))
            })
        });
        Route::new(route, upstream, policies, admission, llm, metrics)
    });
    Ok(Snapshot {
        generation,
        router: Router::new(routes.collect()),
        max_body_bytes: config.listener.max_body_bytes,
        max_uri_bytes: config.listener.max_uri_bytes,
        encoded_slash: config.listener.encoded_slash,
        trusted_proxies: TrustedProxies::new(config.listener.trusted_proxies.clone()),
        config: config.clone(),
        plugins,
        upstreams,
    })
}

async fn load_plugins(
    config: &Config,
    old: Option<&Snapshot>,
    runtime: &Arc<Runtime>,
    buckets: &Arc<Buckets>,
    metrics: &Metrics,
) -> Result<HashMap<String, Arc<Plugin>>, ConfigError> {
    let mut problems = Vec::new();
    let mut plugins = HashMap::new();
    for settings in &config.plugins {
        let kept = old.and_then(|old| old.plugin_if_unchanged(settings));
        let loaded = match kept {
            Some(plugin) => Ok(plugin),
            None => Plugin::load(runtime, settings, buckets.clone(), metrics).await,
        };
        match loaded {
            Ok(plugin) => {
                plugins.insert(settings.name.clone(), plugin);
            }
            Err(err) => problems.push(format!("plugin `{}`: {err}", settings.name)),
        }
    }
    if problems.is_empty() {
        Ok(plugins)
    } else {
        Err(ConfigError { problems })
    }
}

impl Snapshot {
    /// The loaded plugin of this name, if its settings and component bytes are unchanged.
    fn plugin_if_unchanged(&self, settings: &config::Plugin) -> Option<Arc<Plugin>> {
        let plugin = self.plugins.get(&settings.name)?;
        let bytes = std::fs::read(&settings.path).ok()?;
        plugin
            .is_unchanged(settings, &digest(&bytes))
            .then(|| plugin.clone())
    }

    fn upstream_if_unchanged(&self, settings: &config::Upstream) -> Option<Arc<Upstream>> {
        let old = self
            .config
            .upstreams
            .iter()
            .find(|u| u.name == settings.name)?;
        (old == settings).then(|| self.upstreams.get(&settings.name).cloned())?
    }
}

/// Drops the metric series of what `old` has and `new` does not: removed routes, upstreams,
/// plugins and LLM deployments, and the targets, breaker or adaptive limit an upstream lost,
/// so that `/metrics` stops exporting their last values. A request still finishing on `old`
/// may count itself once more under a removed name; the retired-snapshot sweep drops that
/// too once `old` is no longer in use.
fn forget_removed(metrics: &Metrics, old: &Config, new: &Config) {
    let routes = |c: &Config| c.routes.iter().map(|r| r.name.clone()).collect();
    for route in removed(routes(old), routes(new)) {
        metrics.forget("route", &route);
    }
    let plugins = |c: &Config| c.plugins.iter().map(|p| p.name.clone()).collect();
    for plugin in removed(plugins(old), plugins(new)) {
        metrics.forget("plugin", &plugin);
    }
    let deployments = |c: &Config| {
        let llm = c.routes.iter().filter_map(|r| r.llm.as_ref());
        let all = llm.flat_map(|l| &l.models).flat_map(|m| &m.deployments);
        all.map(|d| d.label()).collect()
    };
    for deployment in removed(deployments(old), deployments(new)) {
        metrics.forget("deployment", &deployment);
    }
    for before in &old.upstreams {
        let name = before.name.as_str();
        let Some(now) = new.upstreams.iter().find(|u| u.name == name) else {
            metrics.forget("upstream", name);
            continue;
        };
        let targets =
            |u: &config::Upstream| u.targets.iter().map(|t| t.address().to_string()).collect();
        for target in removed(targets(before), targets(now)) {
            metrics.forget_target(name, &target);
        }
        if before.circuit_breaker.is_some() && now.circuit_breaker.is_none() {
            metrics.forget_circuit(name);
        }
        if before.adaptive_concurrency.is_some() && now.adaptive_concurrency.is_none() {
            metrics.forget_concurrency_limit(name);
        }
    }
}

/// The names in `old` that are not in `new`.
fn removed(old: HashSet<String>, new: HashSet<String>) -> impl Iterator<Item = String> {
    old.into_iter().filter(move |name| !new.contains(name))
}

/// Runs `sweep` on what `target` points to every `interval`, for as long as it lives.
fn spawn_sweeper<T: Send + Sync + 'static>(target: Weak<T>, interval: Duration, sweep: fn(&T)) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(interval);
        every.tick().await;
        loop {
            every.tick().await;
            let Some(target) = target.upgrade() else {
                return;
            };
            sweep(&target);
        }
    });
}
