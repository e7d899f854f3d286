//! Policies: WebAssembly components compiled once, pre-linked, and run from a bounded pool of
//! instances under fuel, deadline and memory limits.
//!
//! A call takes an instance from the plugin's pool (or makes one, up to `max_instances`),
//! gives it a fresh fuel budget and epoch deadline, and runs the phase on a fiber that yields
//! to tokio every few microseconds of guest work, so a looping policy never holds a worker
//! thread. An instance that trapped, or whose call was cancelled, can never be entered again,
//! so it is dropped rather than returned; instances are also replaced after `max_uses` calls
//! and when their memory has grown past `recycle_memory_bytes`.

mod bindings;
mod host_api;
mod mutation;
mod pool;
mod runtime;

use std::sync::Arc;
use std::time::Instant;

use sluice_ratelimit::Buckets;
use wasmtime::{Store, Trap};

pub use bindings::types::{
    Header, HeaderChanges, HeaderList, Phases, RequestChanges, RequestDecision, RequestHead,
    ResponseHead,
};
pub use mutation::{InvalidMutation, apply_header_changes, direct_response, rewrite_path};
pub use runtime::{Digest, POLICY_VERSION, Runtime, digest};

use self::bindings::{Policy, PolicyPre};
use self::host_api::StoreState;
use self::pool::{Lease, Pool};
use crate::config::{self, Isolation, OnError};
use crate::metrics::{Metrics, PluginMetrics};

/// Packs headers for a policy: every name and value in one byte list, and where each ends.
pub fn header_list(headers: &http::HeaderMap) -> HeaderList {
    let size = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    let mut list = HeaderList {
        bytes: Vec::with_capacity(size),
        ends: Vec::with_capacity(headers.len() * 2),
    };
    // NB: offsets fit in u32: hyper limits a header section to far less than 4 GiB, and a
    // policy's own additions are bounded by its memory cap.
    for (name, value) in headers {
        list.bytes.extend_from_slice(name.as_str().as_bytes());
        list.ends.push(list.bytes.len() as u32);
        list.bytes.extend_from_slice(value.as_bytes());
        list.ends.push(list.bytes.len() as u32);
    }
    list
}

/// Init may parse keys and build tables, so it gets more room than a request phase.
const INIT_BUDGET_FACTOR: u64 = 20;

/// A loaded policy, ready to be called.
pub struct Plugin {
    name: Arc<str>,
    settings: config::Plugin,
    config_json: String,
    digest: Digest,
    pre: PolicyPre<StoreState>,
    engine: wasmtime::Engine,
    buckets: Arc<Buckets>,
    pool: Pool<Instance>,
    metrics: PluginMetrics,
    /// The phases the policy takes part in, from its first instance's `init`.
    phases: Phases,
}

/// Why a plugin call did not produce a result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PluginFailure {
    #[error("trapped: {0}")]
    Trap(String),
    #[error("ran out of fuel")]
    Fuel,
    #[error("missed its deadline")]
    Deadline,
    #[error("hit its memory cap")]
    Memory,
    #[error("made an invalid change: {0}")]
    InvalidMutation(#[from] InvalidMutation),
    #[error("every instance is busy and the wait queue is full or timed out")]
    Busy,
    #[error("failed to start an instance: {0}")]
    Init(String),
}

/// One phase of a request, for metric labels.
#[derive(Debug, Clone, Copy)]
pub enum Phase {
    Request,
    Response,
}

/// A live instance with its store.
struct Instance {
    store: Store<StoreState>,
    policy: Policy,
    uses: u64,
}

// === impl Plugin ===

impl Plugin {
    /// Compiles the plugin, links it, and starts one instance with its configuration, so a
    /// broken component or a configuration the policy rejects fails here, at load time.
    pub async fn load(
        runtime: &Arc<Runtime>,
        settings: &config::Plugin,
        buckets: Arc<Buckets>,
        metrics: &Metrics,
    ) -> Result<Arc<Plugin>, String> {
        let bytes = std::fs::read(&settings.path)
            .map_err(|err| format!("cannot read {}: {err}", settings.path.display()))?;
        let compiled = runtime.compile(bytes, metrics).await?;
        let plugin_metrics = metrics.plugin(&settings.name);
        let mut plugin = Plugin {
            name: Arc::from(settings.name.as_str()),
            settings: settings.clone(),
            config_json: settings.config_json(),
            digest: compiled.digest,
            pre: compiled.pre,
            engine: runtime.engine().clone(),
            buckets,
            pool: Pool::new(settings, &plugin_metrics),
            metrics: plugin_metrics,
            phases: Phases::all(),
        };
        let (first, phases) = plugin
            .instantiate()
            .await
            .map_err(|failure| match failure {
                PluginFailure::Init(message) => format!("rejected its config: {message}"),
                other => other.to_string(),
            })?;
        plugin.phases = phases;
        plugin
            .pool
            .seed(first, plugin.settings.isolation == Isolation::Pooled);
        Ok(Arc::new(plugin))
    }

    /// Whether this plugin was loaded from exactly these settings and component bytes, so a
    /// reload can keep it, with its warm instances.
    pub fn is_unchanged(&self, settings: &config::Plugin, digest: &Digest) -> bool {
        self.settings == *settings && self.digest == *digest
    }

    /// The digest of the component this plugin runs.
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn on_error(&self) -> OnError {
        self.settings.on_error
    }

    /// Whether the policy takes part in `phase`, as its `init` said; it is not called in the
    /// others.
    pub fn takes_part_in(&self, phase: Phase) -> bool {
        self.phases.contains(match phase {
            Phase::Request => Phases::REQUEST,
            Phase::Response => Phases::RESPONSE,
        })
    }

    /// Runs the request phase.
    pub async fn on_request(
        &self,
        request: &RequestHead,
    ) -> Result<RequestDecision, PluginFailure> {
        self.call(Phase::Request, async |instance: &mut Instance| {
            let handler = instance.policy.sluice_policy_handler();
            handler.call_on_request(&mut instance.store, request).await
        })
        .await
    }

    /// Runs the response phase.
    pub async fn on_response(
        &self,
        request: &RequestHead,
        response: &ResponseHead,
    ) -> Result<HeaderChanges, PluginFailure> {
        self.call(Phase::Response, async |instance: &mut Instance| {
            let handler = instance.policy.sluice_policy_handler();
            handler
                .call_on_response(&mut instance.store, request, response)
                .await
        })
        .await
    }

    async fn call<R>(
        &self,
        phase: Phase,
        run: impl AsyncFnOnce(&mut Instance) -> wasmtime::Result<R>,
    ) -> Result<R, PluginFailure> {
        let waited = Instant::now();
        let lease = self.pool.acquire().await;
        self.metrics.wait.observe(waited.elapsed().as_secs_f64());
        let Ok(mut lease) = lease else {
            return Err(PluginFailure::Busy);
        };
        let mut instance = match lease.take_idle() {
            Some(instance) => instance,
            None => self.instantiate().await?.0,
        };

        let started = Instant::now();
        self.arm(&mut instance.store, 1);
        let result = run(&mut instance).await;
        self.record_call(phase, started, &instance.store);

        match result {
            Ok(value) => {
                instance.uses += 1;
                self.give_back(lease, instance);
                Ok(value)
            }
            Err(err) => {
                drop(lease);
                self.metrics.recycled("failure");
                self.pool.report(&self.metrics);
                Err(classify(&err, &instance.store))
            }
        }
    }

    /// Creates an instance and runs the policy's `init` with its configuration; returns it
    /// with the phases it takes part in.
    async fn instantiate(&self) -> Result<(Instance, Phases), PluginFailure> {
        let state = StoreState::new(
            self.name.clone(),
            self.buckets.clone(),
            self.settings.memory_limit_bytes as usize,
        );
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.memory);
        store
            .fuel_async_yield_interval(Some(runtime::FUEL_YIELD_INTERVAL))
            .map_err(|err| PluginFailure::Init(err.to_string()))?;
        self.arm(&mut store, INIT_BUDGET_FACTOR);

        let policy = self
            .pre
            .instantiate_async(&mut store)
            .await
            .map_err(|err| classify(&err, &store))?;
        let init = policy
            .sluice_policy_handler()
            .call_init(&mut store, &self.config_json)
            .await;
        match init {
            Ok(Ok(phases)) => {
                let instance = Instance {
                    store,
                    policy,
                    uses: 0,
                };
                Ok((instance, phases))
            }
            Ok(Err(message)) => Err(PluginFailure::Init(message)),
            Err(err) => Err(PluginFailure::Init(classify(&err, &store).to_string())),
        }
    }

    /// Gives a store a fresh fuel budget and wall-clock deadline, `factor` times the call's.
    fn arm(&self, store: &mut Store<StoreState>, factor: u64) {
        let ticks =
            self.settings.deadline_ms.as_millis() as u64 / runtime::EPOCH_TICK.as_millis() as u64;
        // NB: setting fuel only fails when fuel is disabled, and the engine always enables it.
        let _ = store.set_fuel(self.settings.fuel.saturating_mul(factor));
        store.set_epoch_deadline(ticks.max(1).saturating_mul(factor));
        store.epoch_deadline_trap();
    }

    fn give_back(&self, lease: Lease<'_, Instance>, instance: Instance) {
        let settings = &self.settings;
        let retire = if settings.isolation == Isolation::Request {
            Some("isolation")
        } else if instance.uses >= settings.max_uses {
            Some("max_uses")
        } else if instance.store.data().memory.current as u64 > settings.recycle_memory_bytes {
            Some("memory")
        } else {
            None
        };
        match retire {
            Some(reason) => {
                lease.release(None);
                self.metrics.recycled(reason);
            }
            None => lease.release(Some(instance)),
        }
        self.pool.report(&self.metrics);
    }

    fn record_call(&self, phase: Phase, started: Instant, store: &Store<StoreState>) {
        let fuel_left = store.get_fuel().unwrap_or(0);
        let used = self.settings.fuel.saturating_sub(fuel_left);
        self.metrics
            .duration(phase)
            .observe(started.elapsed().as_secs_f64());
        self.metrics.fuel.observe(used as f64);
    }

    /// Counts and logs a failure, and hands it back.
    pub fn failed(&self, failure: PluginFailure) -> PluginFailure {
        self.metrics.failure(&failure);
        self.pool.report(&self.metrics);
        tracing::warn!(
            plugin = &*self.name,
            reason = failure.reason(),
            "plugin failed: {failure}"
        );
        failure
    }
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

// === impl PluginFailure ===

impl PluginFailure {
    /// The metric label for this failure.
    pub fn reason(&self) -> &'static str {
        match self {
            PluginFailure::Trap(_) => "trap",
            PluginFailure::Fuel => "fuel",
            PluginFailure::Deadline => "deadline",
            PluginFailure::Memory => "memory",
            PluginFailure::InvalidMutation(_) => "invalid_mutation",
            PluginFailure::Busy => "busy",
            PluginFailure::Init(_) => "init",
        }
    }
}

/// Maps a wasmtime error from a call into the reason it failed.
fn classify(err: &wasmtime::Error, store: &Store<StoreState>) -> PluginFailure {
    if store.data().memory.exceeded {
        return PluginFailure::Memory;
    }
    match err.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => PluginFailure::Fuel,
        Some(Trap::Interrupt) => PluginFailure::Deadline,
        _ => PluginFailure::Trap(format!("{err:#}")),
    }
}
