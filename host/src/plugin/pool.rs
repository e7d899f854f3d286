//! A bounded pool of plugin instances with a bounded, first-come-first-served wait queue.
//!
//! At most `max_instances` instances exist at once: each live instance holds a slot of the
//! pool's semaphore, whether it is running or idle in the pool. A request that finds every
//! slot taken waits in line (tokio's semaphore is fair) unless `max_waiting` requests already
//! wait, and gives up after `wait_timeout`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};

use crate::config;
use crate::metrics::PluginMetrics;

pub struct Pool<T> {
    idle: Mutex<Vec<T>>,
    slots: Semaphore,
    capacity: u32,
    waiting: AtomicU32,
    max_waiting: u32,
    wait_timeout: Duration,
}

/// The right to use one instance slot until it is released or dropped.
pub struct Lease<'a, T> {
    pool: &'a Pool<T>,
    _slot: SemaphorePermit<'a>,
}

/// Counts a waiter for as long as it waits, even if its request is cancelled.
struct Waiting<'a>(&'a AtomicU32);

impl<T> Pool<T> {
    pub fn new(settings: &config::Plugin) -> Self {
        Pool {
            idle: Mutex::new(Vec::new()),
            slots: Semaphore::new(settings.max_instances as usize),
            capacity: settings.max_instances,
            waiting: AtomicU32::new(0),
            max_waiting: settings.max_waiting,
            wait_timeout: settings.wait_timeout_ms,
        }
    }

    /// Keeps the instance made at load time, if instances are reused.
    pub fn seed(&self, instance: T, keep: bool) {
        if keep {
            self.lock_idle().push(instance);
        }
    }

    /// Takes a slot, waiting in line if needed; `None` when the line is full or the wait
    /// timed out.
    pub async fn acquire(&self) -> Option<Lease<'_, T>> {
        if let Ok(slot) = self.slots.try_acquire() {
            return Some(Lease {
                pool: self,
                _slot: slot,
            });
        }
        let _waiting = Waiting::enter(&self.waiting, self.max_waiting)?;
        let slot = tokio::time::timeout(self.wait_timeout, self.slots.acquire())
            .await
            .ok()?
            .ok()?;
        Some(Lease {
            pool: self,
            _slot: slot,
        })
    }

    /// Publishes the pool's occupancy.
    pub fn report(&self, metrics: &PluginMetrics) {
        let idle = self.lock_idle().len() as i64;
        let live = i64::from(self.capacity) - self.slots.available_permits() as i64;
        metrics.instances_idle.set(idle);
        metrics.instances_busy.set((live - idle).max(0));
        metrics
            .waiting
            .set(i64::from(self.waiting.load(Ordering::Relaxed)));
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

impl<'a> Waiting<'a> {
    fn enter(counter: &'a AtomicU32, max: u32) -> Option<Self> {
        let admitted = counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok();
        admitted.then_some(Waiting(counter))
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(max_instances: u32, max_waiting: u32) -> Pool<u32> {
        let mut settings: config::Plugin =
            toml::from_str("name = \"p\"\npath = \"p.wasm\"").unwrap();
        settings.max_instances = max_instances;
        settings.max_waiting = max_waiting;
        settings.wait_timeout_ms = Duration::from_millis(50);
        Pool::new(&settings)
    }

    #[tokio::test]
    async fn released_instances_are_reused() {
        let pool = pool(1, 0);
        let mut lease = pool.acquire().await.unwrap();
        assert_eq!(lease.take_idle(), None);
        lease.release(Some(7));
        let mut lease = pool.acquire().await.unwrap();
        assert_eq!(lease.take_idle(), Some(7));
    }

    #[tokio::test]
    async fn full_pool_with_full_queue_sheds_at_once() {
        let pool = pool(1, 0);
        let _held = pool.acquire().await.unwrap();
        assert!(pool.acquire().await.is_none());
    }

    #[tokio::test]
    async fn waiters_time_out_and_leave_the_queue() {
        let pool = pool(1, 1);
        let _held = pool.acquire().await.unwrap();
        assert!(pool.acquire().await.is_none());
        assert_eq!(pool.waiting.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_waiter_gets_the_slot_when_it_is_released() {
        let pool = std::sync::Arc::new(pool(1, 1));
        let held = pool.acquire().await.unwrap();
        let waiter = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.acquire().await.map(|mut l| l.take_idle()) })
        };
        tokio::task::yield_now().await;
        held.release(Some(3));
        assert_eq!(waiter.await.unwrap(), Some(Some(3)));
    }
}
