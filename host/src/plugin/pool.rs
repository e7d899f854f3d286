//! A bounded pool of plugin instances.
//!
//! At most `max_instances` instances exist at once: each live instance, running or idle,
//! belongs to a slot of the pool's [`Gate`], and a call that finds every slot taken waits in
//! the gate's bounded line.

use std::sync::Mutex;

use crate::admission::{Gate, GateGauges, Refused, Slot};
use crate::config;
use crate::metrics::PluginMetrics;

pub struct Pool<T> {
    idle: Mutex<Vec<T>>,
    gate: Gate,
}

/// The right to use one instance slot until it is released or dropped.
pub struct Lease<'a, T> {
    pool: &'a Pool<T>,
    _slot: Slot,
}

impl<T> Pool<T> {
    pub fn new(settings: &config::Plugin, metrics: &PluginMetrics) -> Self {
        let gate = Gate::new(
            settings.max_instances,
            settings.max_waiting,
            settings.wait_timeout_ms,
        );
        let gauges = GateGauges {
            in_use: None,
            waiting: Some(metrics.waiting.clone()),
        };
        Pool {
            idle: Mutex::new(Vec::new()),
            gate: gate.with_gauges(gauges),
        }
    }

    /// Keeps the instance made at load time, if instances are reused.
    pub fn seed(&self, instance: T, keep: bool) {
        if keep {
            self.lock_idle().push(instance);
        }
    }

    /// Takes a slot, waiting in line if needed.
    pub async fn acquire(&self) -> Result<Lease<'_, T>, Refused> {
        let slot = self.gate.enter().await?;
        Ok(Lease {
            pool: self,
            _slot: slot,
        })
    }

    /// Publishes the pool's occupancy.
    pub fn report(&self, metrics: &PluginMetrics) {
        let idle = self.lock_idle().len() as i64;
        let live = i64::from(self.gate.in_use()) + idle;
        metrics.instances_idle.set(idle);
        metrics.instances_busy.set(live - idle);
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<T>> {
        // NB: the lock guards a plain Vec and no code panics while holding it.
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl<T> Lease<'_, T> {
    /// An idle instance, if the pool has one; otherwise the caller makes one in this slot.
    pub fn take_idle(&mut self) -> Option<T> {
        self.pool.lock_idle().pop()
    }

    /// Ends the lease, keeping the instance for reuse when one is given.
    pub fn release(self, instance: Option<T>) {
        if let Some(instance) = instance {
            self.pool.lock_idle().push(instance);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn pool(max_instances: u32) -> Pool<u32> {
        let mut settings: config::Plugin =
            toml::from_str("name = \"p\"\npath = \"p.wasm\"").unwrap();
        settings.max_instances = max_instances;
        settings.max_waiting = 0;
        Pool::new(&settings, &Metrics::new().plugin("p"))
    }

    #[tokio::test]
    async fn released_instances_are_reused() {
        let pool = pool(1);
        let mut lease = pool.acquire().await.unwrap();
        assert_eq!(lease.take_idle(), None);
        lease.release(Some(7));
        let mut lease = pool.acquire().await.unwrap();
        assert_eq!(lease.take_idle(), Some(7));
    }

    #[tokio::test]
    async fn a_dropped_lease_frees_its_slot_and_keeps_nothing() {
        let pool = pool(1);
        let lease = pool.acquire().await.unwrap();
        assert!(pool.acquire().await.is_err());
        drop(lease);
        let mut lease = pool.acquire().await.unwrap();
        assert_eq!(lease.take_idle(), None);
    }
}
