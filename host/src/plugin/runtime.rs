//! The wasmtime engine, its instance pool and the linker every plugin is pre-linked against.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::bindings;
use super::host_api::StoreState;
use crate::config;
use crate::metrics::Metrics;

/// The SHA-256 of a component's bytes: compiled code is cached under it.
pub type Digest = [u8; 32];

/// A compiled, pre-linked component.
#[derive(Clone)]
pub struct Compiled {
    pub digest: Digest,
    pub pre: bindings::PolicyPre<StoreState>,
}

/// One epoch tick. Plugin deadlines are counted in ticks, so this is their resolution.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Fuel a call may burn between yields to the async runtime. Small enough (about 13 µs of
/// guest code) that a looping plugin leaves the tokio worker to other tasks nearly all the
/// time; larger intervals let a busy guest starve timers on a one-worker runtime.
pub const FUEL_YIELD_INTERVAL: u64 = 10_000;

/// The engine and linker shared by every plugin, the compiled components of the current
/// configuration, and the thread that advances epochs.
pub struct Runtime {
    engine: Engine,
    linker: Linker<StoreState>,
    compiled: Mutex<HashMap<Digest, bindings::PolicyPre<StoreState>>>,
    ticker_stop: Arc<AtomicBool>,
}

impl Runtime {
    /// Builds the engine with a pooling allocator sized from `settings`.
    pub fn new(settings: &config::Runtime) -> anyhow::Result<Arc<Runtime>> {
        let engine = Engine::new(&engine_config(settings)).map_err(|err| {
            anyhow::anyhow!(
                "cannot create the plugin engine ({err}); the pool reserves \
                 2 x runtime.instance_slots x runtime.max_memory_bytes of address space: \
                 lower them or raise the process's address-space limit"
            )
        })?;
        let linker = build_linker(&engine)?;
        let ticker_stop = Arc::new(AtomicBool::new(false));
        spawn_epoch_ticker(engine.clone(), ticker_stop.clone());
        Ok(Arc::new(Runtime {
            engine,
            linker,
            compiled: Mutex::default(),
            ticker_stop,
        }))
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Compiles and pre-links a component, or takes it from the cache when the same bytes were
    /// compiled before. Compiling takes tens of milliseconds of CPU, so it runs off the async
    /// workers.
    pub async fn compile(
        self: &Arc<Self>,
        bytes: Vec<u8>,
        metrics: &Metrics,
    ) -> Result<Compiled, String> {
        let digest = digest(&bytes);
        if let Some(pre) = self.lock_compiled().get(&digest) {
            return Ok(Compiled {
                digest,
                pre: pre.clone(),
            });
        }
        let runtime = self.clone();
        let started = Instant::now();
        let pre = tokio::task::spawn_blocking(move || runtime.prepare(&bytes))
            .await
            .map_err(|err| format!("compiling stopped: {err}"))?
            // Some parser errors spread byte lists over several lines: keep log lines whole.
            .map_err(|err| {
                format!("{err:#}")
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            })?;
        metrics.plugin_compiled(started.elapsed().as_secs_f64());
        self.lock_compiled().insert(digest, pre.clone());
        Ok(Compiled { digest, pre })
    }

    /// Forgets compiled components that no plugin of the current configuration runs.
    pub fn retain_compiled(&self, live: &HashSet<Digest>) {
        self.lock_compiled()
            .retain(|digest, _| live.contains(digest));
    }

    fn lock_compiled(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<Digest, bindings::PolicyPre<StoreState>>> {
        // NB: the map is only read or written whole while locked; nothing panics inside.
        self.compiled
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Compiles a component and pre-links it, refusing one that imports anything the
    /// gateway does not provide.
    fn prepare(&self, bytes: &[u8]) -> anyhow::Result<bindings::PolicyPre<StoreState>> {
        let component = Component::new(&self.engine, bytes).map_err(|err| {
            // A core module's header: the magic number, then version 1 (a component's
            // header says layer 1 instead).
            match bytes.starts_with(b"\0asm\x01\0\0\0") {
                true => err.context(
                    "this is a core WebAssembly module, not a component: build the policy \
                     for the wasm32-wasip2 target",
                ),
                false => err,
            }
        })?;
        check_interface_version(&component, &self.engine)?;
        let instance_pre = self.linker.instantiate_pre(&component)?;
        Ok(bindings::PolicyPre::new(instance_pre)?)
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").finish_non_exhaustive()
    }
}

/// The version of the `sluice:policy` package in `wit/policy.wit`, which the gateway speaks.
pub const POLICY_VERSION: &str = "0.2.0";

/// Refuses a component built for a version of `sluice:policy` incompatible with
/// [`POLICY_VERSION`], naming both: linking would otherwise fail with a message about a
/// missing export that does not say the fix is to rebuild the policy.
fn check_interface_version(component: &Component, engine: &Engine) -> anyhow::Result<()> {
    let ty = component.component_type();
    let names = ty.imports(engine).map(|(name, _)| name);
    let names = names.chain(ty.exports(engine).map(|(name, _)| name));
    for name in names {
        let Some(interface) = name.strip_prefix("sluice:policy/") else {
            continue;
        };
        let version = interface.split_once('@').map_or("", |(_, version)| version);
        if !semver_compatible(version, POLICY_VERSION) {
            anyhow::bail!(
                "the component was built for the policy interface sluice:policy@{version}, \
                 but this gateway speaks sluice:policy@{POLICY_VERSION}: rebuild the policy \
                 with the sluice-sdk of this gateway"
            );
        }
    }
    Ok(())
}

/// Whether a component built for `built` can run where `speaks` is provided: the same major
/// version, or before 1.0 the same minor one, and no newer.
fn semver_compatible(built: &str, speaks: &str) -> bool {
    let parts = |v: &str| -> Option<(u64, u64, u64)> {
        let mut numbers = v.splitn(3, '.').map(|n| n.parse().ok());
        Some((numbers.next()??, numbers.next()??, numbers.next()??))
    };
    let (Some(built), Some(speaks)) = (parts(built), parts(speaks)) else {
        return false;
    };
    let breaking = |(major, minor, _): (u64, u64, u64)| match major {
        0 => (0, minor),
        _ => (major, 0),
    };
    breaking(built) == breaking(speaks) && built <= speaks
}

/// The SHA-256 digest of a component's bytes.
pub fn digest(bytes: &[u8]) -> Digest {
    Sha256::digest(bytes).into()
}

fn engine_config(settings: &config::Runtime) -> Config {
    let slots = settings.instance_slots;
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(slots)
        // A Rust component holds its own module plus a few small adapter modules.
        .total_core_instances(slots * 8)
        .max_core_instances_per_component(16)
        .total_memories(slots * 2)
        .max_memories_per_component(2)
        .total_tables(slots * 4)
        .max_tables_per_component(4)
        .total_stacks(slots)
        .max_memory_size(settings.max_memory_bytes as usize);

    let mut config = Config::new();
    config
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
        // Reserving only what a memory may grow to (instead of 4 GiB per slot) keeps the
        // pool's address space bounded, at the cost of explicit bounds checks.
        .memory_reservation(settings.max_memory_bytes)
        .memory_guard_size(64 << 10)
        .memory_reservation_for_growth(0)
        .consume_fuel(true)
        .epoch_interruption(true);
    config
}

fn build_linker(engine: &Engine) -> anyhow::Result<Linker<StoreState>> {
    let mut linker = Linker::new(engine);
    // Rust's std imports WASI for printing panics and reading the environment even when a
    // policy never does I/O. It is linked with a context that grants nothing: no files, no
    // sockets, no environment; output goes to the gateway log.
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    bindings::Policy::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)?;
    Ok(linker)
}

fn spawn_epoch_ticker(engine: Engine, stop: Arc<AtomicBool>) {
    thread::Builder::new()
        .name("sluice-epoch".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                thread::sleep(EPOCH_TICK);
                engine.increment_epoch();
            }
        })
        .expect("spawning the epoch thread");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_is_the_one_in_the_wit_file() {
        let wit = include_str!("../../../wit/policy.wit");
        assert!(wit.contains(&format!("package sluice:policy@{POLICY_VERSION};")));
    }

    #[test]
    fn compatible_versions_follow_semver() {
        assert!(semver_compatible("0.2.0", "0.2.0"));
        assert!(semver_compatible("0.2.0", "0.2.3"));
        assert!(
            !semver_compatible("0.2.4", "0.2.3"),
            "needs what is not there yet"
        );
        assert!(!semver_compatible("0.1.0", "0.2.0"));
        assert!(!semver_compatible("0.3.0", "0.2.0"));
        assert!(semver_compatible("1.0.0", "1.4.0"));
        assert!(!semver_compatible("1.0.0", "2.0.0"));
        assert!(!semver_compatible("", "0.2.0"));
        assert!(!semver_compatible("0.2", "0.2.0"));
    }
}
