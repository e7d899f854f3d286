//! The wasmtime engine, its instance pool and the linker every plugin is pre-linked against.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::bindings;
use super::host_api::StoreState;
use crate::config;

/// One epoch tick. Plugin deadlines are counted in ticks, so this is their resolution.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Fuel a call may burn between yields to the async runtime. Small enough (about 13 µs of
/// guest code) that a looping plugin leaves the tokio worker to other tasks nearly all the
/// time; larger intervals let a busy guest starve timers on a one-worker runtime.
pub const FUEL_YIELD_INTERVAL: u64 = 10_000;

/// The engine and linker shared by every plugin, and the thread that advances epochs.
pub struct Runtime {
    engine: Engine,
    linker: Linker<StoreState>,
    ticker_stop: Arc<AtomicBool>,
}

impl Runtime {
    /// Builds the engine with a pooling allocator sized from `settings`.
    pub fn new(settings: &config::Runtime) -> anyhow::Result<Arc<Runtime>> {
        let engine = Engine::new(&engine_config(settings)).map_err(|err| {
            anyhow::anyhow!(
                "cannot create the plugin engine ({err}); the pool reserves \
                 runtime.instance_slots x runtime.max_memory_bytes of address space: \
                 lower them or raise the process's address-space limit"
            )
        })?;
        let linker = build_linker(&engine)?;
        let ticker_stop = Arc::new(AtomicBool::new(false));
        spawn_epoch_ticker(engine.clone(), ticker_stop.clone());
        Ok(Arc::new(Runtime {
            engine,
            linker,
            ticker_stop,
        }))
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Compiles a component and pre-links it, refusing one that imports anything the
    /// gateway does not provide.
    pub fn prepare(&self, bytes: &[u8]) -> anyhow::Result<bindings::PolicyPre<StoreState>> {
        let component = Component::new(&self.engine, bytes)?;
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
