//! An upstream's concurrency limit that follows its latency.
//!
//! An upstream that gets more requests than it can work on at once queues them, and its
//! answers slow down by the time they wait. The limiter watches for that: it keeps a
//! long-run average of the time to the response head, and compares every new answer with it.
//! An answer within `tolerance` times the average is no sign of queueing, and the limit
//! grows by a fraction of its square root (room for a short queue); a slower answer shrinks
//! the limit in proportion to the slowdown, by at most half. Changes are smoothed over
//! several answers. While the upstream gets less than half its limit, answers say nothing
//! about the limit and leave it alone.
//!
//! Requests over the limit are refused at once like those over the bulkhead, so a slowing
//! upstream sheds load at the gateway with a clear answer rather than holding requests in
//! its own queue until they time out.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::IntGauge;

use crate::config;

/// Answers averaged plainly before the long-run average starts to move as a running one.
const WARMUP: u32 = 10;

/// The number of answers the long-run average spans, roughly.
const WINDOW: f64 = 500.0;

/// The share of each new estimate taken into the limit.
const SMOOTHING: f64 = 0.2;

#[derive(Debug)]
pub struct AdaptiveLimit {
    settings: config::AdaptiveConcurrency,
    max_limit: u32,
    /// The limit requests are admitted against, the estimate rounded down.
    limit: AtomicU32,
    in_flight: AtomicU32,
    estimate: Mutex<Estimate>,
    gauge: IntGauge,
}

#[derive(Debug)]
struct Estimate {
    limit: f64,
    /// The long-run average time to the response head, in seconds.
    usual: f64,
    samples: u32,
}

/// One request counted against the limit until dropped.
#[derive(Debug)]
pub struct Ticket(Arc<AdaptiveLimit>);

// === impl AdaptiveLimit ===

impl AdaptiveLimit {
    /// A limit that starts at `initial_limit` and stays between `min_limit` and `max_limit`.
    pub fn new(
        settings: &config::AdaptiveConcurrency,
        max_limit: u32,
        gauge: IntGauge,
    ) -> AdaptiveLimit {
        gauge.set(i64::from(settings.initial_limit));
        AdaptiveLimit {
            settings: settings.clone(),
            max_limit,
            limit: AtomicU32::new(settings.initial_limit),
            in_flight: AtomicU32::new(0),
            estimate: Mutex::new(Estimate {
                limit: f64::from(settings.initial_limit),
                usual: 0.0,
                samples: 0,
            }),
            gauge,
        }
    }

    pub fn limit(&self) -> u32 {
        self.limit.load(Ordering::Relaxed)
    }

    /// Counts one more request in flight if that stays within the limit.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Ticket> {
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.limit()).then_some(n + 1)
            })
            .ok()?;
        Some(Ticket(self.clone()))
    }

    /// Takes in how long an answer took to arrive (or how long a try waited before it was
    /// given up).
    pub fn sample(&self, latency: Duration) {
        let latency = latency.as_secs_f64().max(1e-6);
        let in_flight = f64::from(self.in_flight.load(Ordering::Relaxed));
        let mut estimate = self.estimate.lock().unwrap_or_else(|e| e.into_inner());
        let estimate = &mut *estimate;

        estimate.samples = estimate.samples.saturating_add(1);
        let weight = if estimate.samples <= WARMUP {
            f64::from(estimate.samples)
        } else {
            WINDOW
        };
        estimate.usual += (latency - estimate.usual) / weight;
        // An average far above the present answers still carries an old queue: let it fall
        // faster than the window alone would.
        if estimate.usual > 2.0 * latency {
            estimate.usual *= 0.95;
        }
        if estimate.samples < WARMUP || in_flight < estimate.limit / 2.0 {
            return;
        }

        let gradient = (self.settings.tolerance * estimate.usual / latency).clamp(0.5, 1.0);
        let target = estimate.limit * gradient + estimate.limit.sqrt();
        let limit = estimate.limit * (1.0 - SMOOTHING) + target * SMOOTHING;
        estimate.limit = limit.clamp(
            f64::from(self.settings.min_limit),
            f64::from(self.max_limit),
        );
        // NB: the clamp keeps the estimate within u32, so the cast cannot saturate.
        let admitted = estimate.limit as u32;
        self.limit.store(admitted, Ordering::Relaxed);
        self.gauge.set(i64::from(admitted));
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(initial_limit: u32) -> Arc<AdaptiveLimit> {
        let settings = config::AdaptiveConcurrency {
            initial_limit,
            ..Default::default()
        };
        let gauge = IntGauge::new("limit", "h").unwrap();
        Arc::new(AdaptiveLimit::new(&settings, 100, gauge))
    }

    /// Holds `n` requests in flight and feeds `count` samples of `latency`.
    fn feed(limiter: &Arc<AdaptiveLimit>, n: u32, count: u32, latency: Duration) {
        let _held: Vec<_> = (0..n).filter_map(|_| limiter.try_acquire()).collect();
        for _ in 0..count {
            limiter.sample(latency);
        }
    }

    #[test]
    fn requests_past_the_limit_are_refused_until_one_ends() {
        let limiter = limiter(2);
        let first = limiter.try_acquire().unwrap();
        let _second = limiter.try_acquire().unwrap();
        assert!(limiter.try_acquire().is_none());
        drop(first);
        assert!(limiter.try_acquire().is_some());
    }

    #[test]
    fn the_limit_falls_when_answers_slow_down_and_grows_while_they_do_not() {
        let limiter = limiter(40);
        let fast = Duration::from_millis(10);
        feed(&limiter, 1, 20, fast);
        assert_eq!(
            limiter.limit(),
            40,
            "a lone request says nothing of the limit"
        );

        feed(&limiter, 40, 50, fast * 20);
        let fallen = limiter.limit();
        assert!(fallen < 10, "queueing brought the limit down to {fallen}");

        feed(&limiter, fallen, 30, fast);
        assert!(limiter.limit() > fallen, "fast answers let it grow again");
    }

    #[test]
    fn the_limit_stays_within_its_bounds() {
        let settings = config::AdaptiveConcurrency {
            initial_limit: 20,
            min_limit: 6,
            ..Default::default()
        };
        let gauge = IntGauge::new("limit", "h").unwrap();
        let limiter = Arc::new(AdaptiveLimit::new(&settings, 100, gauge.clone()));
        feed(&limiter, 20, 20, Duration::from_millis(10));
        feed(&limiter, 20, 100, Duration::from_secs(1));
        assert_eq!((limiter.limit(), gauge.get()), (6, 6), "min_limit");

        let limiter = self::limiter(90);
        feed(&limiter, 100, 200, Duration::from_millis(1));
        assert_eq!(limiter.limit(), 100, "max_in_flight");
    }
}
