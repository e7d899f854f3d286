//! Bounded admission: a fixed number of slots and a bounded, first-come-first-served line.
//!
//! Every queue in the gateway is one of these: a route's in-flight requests and their wait
//! queue, an upstream's bulkhead, and a plugin's instance pool. Whoever finds every slot taken
//! waits in line (tokio's semaphore serves waiters in arrival order) unless the line is full,
//! and gives up after the wait timeout; so neither the number of requests being served nor the
//! number waiting can grow past its limit, and excess work is refused at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use prometheus::IntGauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A bounded set of slots with a bounded wait line.
#[derive(Debug)]
pub struct Gate {
    slots: Arc<Semaphore>,
    capacity: u32,
    waiting: AtomicU32,
    max_waiting: u32,
    wait_timeout: Duration,
    gauges: Option<GateGauges>,
}

/// Gauges that follow a gate's occupancy.
#[derive(Debug, Clone)]
pub struct GateGauges {
    /// Slots taken, if the gate's owner wants them counted.
    pub in_use: Option<IntGauge>,
    /// Waiters in line, if the gate has a line worth counting.
    pub waiting: Option<IntGauge>,
}

/// Why a gate refused entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Every slot was taken and the line was full.
    QueueFull,
    /// The wait in line took longer than the gate's timeout.
    QueueTimeout,
}

/// A held slot; dropping it frees the slot for the next in line.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    in_use: Option<IntGauge>,
}

/// Counts a waiter for exactly as long as it waits, even if its request is cancelled.
struct InLine<'a> {
    gate: &'a Gate,
}

// === impl Gate ===

impl Gate {
    pub fn new(capacity: u32, max_waiting: u32, wait_timeout: Duration) -> Gate {
        Gate {
            slots: Arc::new(Semaphore::new(capacity as usize)),
            capacity,
            waiting: AtomicU32::new(0),
            max_waiting,
            wait_timeout,
            gauges: None,
        }
    }

    /// Reports occupancy through these gauges from now on.
    pub fn with_gauges(mut self, gauges: GateGauges) -> Gate {
        self.gauges = Some(gauges);
        self
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Slots taken right now.
    pub fn in_use(&self) -> u32 {
        self.capacity - self.slots.available_permits() as u32
    }

    /// A slot if one is free now; never waits.
    pub fn try_enter(&self) -> Option<Slot> {
        let permit = self.slots.clone().try_acquire_owned().ok()?;
        Some(self.slot(permit))
    }

    /// A slot, waiting in line for one if needed.
    pub async fn enter(&self) -> Result<Slot, Refused> {
        if let Some(slot) = self.try_enter() {
            return Ok(slot);
        }
        let _in_line = InLine::join(self).ok_or(Refused::QueueFull)?;
        let acquire = self.slots.clone().acquire_owned();
        match tokio::time::timeout(self.wait_timeout, acquire).await {
            Ok(Ok(permit)) => Ok(self.slot(permit)),
            // NB: the semaphore is never closed, so only the timeout can end the wait early.
            Ok(Err(_)) | Err(_) => Err(Refused::QueueTimeout),
        }
    }

    fn slot(&self, permit: OwnedSemaphorePermit) -> Slot {
        let in_use = self.gauges.as_ref().and_then(|g| g.in_use.clone());
        if let Some(gauge) = &in_use {
            gauge.inc();
        }
        Slot {
            _permit: permit,
            in_use,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(gauge) = &self.in_use {
            gauge.dec();
        }
    }
}

impl<'a> InLine<'a> {
    fn join(gate: &'a Gate) -> Option<Self> {
        let max = gate.max_waiting;
        let joined = gate
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok();
        if joined && let Some(waiting) = gate.gauges.as_ref().and_then(|g| g.waiting.as_ref()) {
            waiting.inc();
        }
        // NB: `then`, not `then_some`: building an `InLine` that is then discarded would run
        // its `Drop` and give back a place in line that was never taken.
        joined.then(|| InLine { gate })
    }
}

impl Drop for InLine<'_> {
    fn drop(&mut self) {
        self.gate.waiting.fetch_sub(1, Ordering::AcqRel);
        if let Some(waiting) = self.gate.gauges.as_ref().and_then(|g| g.waiting.as_ref()) {
            waiting.dec();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(capacity: u32, max_waiting: u32) -> Arc<Gate> {
        Arc::new(Gate::new(capacity, max_waiting, Duration::from_millis(100)))
    }

    #[tokio::test]
    async fn a_full_gate_with_a_full_line_refuses_at_once() {
        let gate = gate(1, 0);
        let _held = gate.enter().await.unwrap();
        assert_eq!(gate.enter().await.unwrap_err(), Refused::QueueFull);
    }

    #[tokio::test]
    async fn the_line_never_holds_more_than_its_limit() {
        let gate = gate(1, 2);
        let _held = gate.enter().await.unwrap();
        let waiters: Vec<_> = (0..10)
            .map(|_| {
                let gate = gate.clone();
                tokio::spawn(async move { gate.enter().await.map(drop) })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;

        let refused = waiters.iter().filter(|w| w.is_finished()).count();
        assert_eq!(refused, 8);
        assert_eq!(gate.waiting.load(Ordering::Relaxed), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_time_out_and_leave_the_line() {
        let gate = gate(1, 1);
        let _held = gate.enter().await.unwrap();
        assert_eq!(gate.enter().await.unwrap_err(), Refused::QueueTimeout);
        assert_eq!(gate.waiting.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn waiters_are_served_in_arrival_order() {
        let gate = gate(1, 8);
        let held = gate.enter().await.unwrap();
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        for n in 0..4 {
            let (gate, order) = (gate.clone(), order.clone());
            waiters.push(tokio::spawn(async move {
                let _slot = gate.enter().await.unwrap();
                order.lock().unwrap().push(n);
            }));
            // Let this waiter join the line before the next one.
            tokio::task::yield_now().await;
        }
        drop(held);
        for waiter in waiters {
            waiter.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), [0, 1, 2, 3]);
    }

    #[tokio::test]
    async fn gauges_follow_occupancy() {
        let gauges = GateGauges {
            in_use: Some(IntGauge::new("in_use", "h").unwrap()),
            waiting: Some(IntGauge::new("waiting", "h").unwrap()),
        };
        let gate = Gate::new(2, 2, Duration::from_secs(1)).with_gauges(gauges.clone());
        let a = gate.enter().await.unwrap();
        let _b = gate.try_enter().unwrap();
        let in_use = gauges.in_use.as_ref().unwrap();
        assert_eq!(in_use.get(), 2);
        assert!(gate.try_enter().is_none());
        drop(a);
        assert_eq!((in_use.get(), gate.in_use()), (1, 1));
    }
}
