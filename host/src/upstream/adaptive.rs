//! An upstream's concurrency limit that follows its latency.
//!
//! An upstream that gets more requests than it can work on at once queues them, and its
//! answers slow down by the time they wait. The limiter watches for that. It knows the
//! upstream's latency without a queue, its baseline, and compares every answer with it: an
//! answer within `tolerance` times the baseline is no sign of queueing, and the limit grows by
//! a fraction of its square root (room for a short queue); a slower answer shrinks the limit
//! in proportion to the slowdown, by at most half. Changes are smoothed over several answers.
//! While the upstream gets less than half its limit, answers say nothing about the limit and
//! leave it alone.
//!
//! The baseline is measured, not inferred: the fastest of the first answers, then every ten
//! seconds a probe (as Envoy's adaptive concurrency filter does): for a moment the limit drops
//! to `min_limit`, the requests in flight drain, and the fastest of the next answers is the new
//! baseline. Requests over the limit meanwhile are refused like any others. An average of
//! recent answers would not do: under a queue that lasts it catches up with the queued latency,
//! after which the limit grows back into the queue.
//!
//! Requests over the limit are refused at once like those over the bulkhead, so a slowing
//! upstream sheds load at the gateway with a clear answer rather than holding requests in
//! its own queue until they time out.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::IntGauge;

use crate::config;

/// Answers whose fastest is the first baseline, before the limit starts to move.
const WARMUP: u32 = 10;

/// How long a baseline holds before a probe measures it again.
const PROBE_EVERY: Duration = Duration::from_secs(10);

/// Answers a probe takes in, once the requests in flight are down to the probe's limit.
const PROBE_ANSWERS: u32 = 5;

/// A probe that has not drained the upstream by then is given up (long streams, say): the
/// baseline stays and the limit comes back.
const PROBE_AT_MOST: Duration = Duration::from_secs(1);

/// The share of each new estimate taken into the limit.
const SMOOTHING: f64 = 0.2;

#[derive(Debug)]
pub struct AdaptiveLimit {
    settings: config::AdaptiveConcurrency,
    max_limit: u32,
    /// The limit requests are admitted against: the estimate rounded down, or `min_limit`
    /// during a probe.
    limit: AtomicU32,
    in_flight: AtomicU32,
    estimate: Mutex<Estimate>,
    gauge: IntGauge,
}

#[derive(Debug)]
struct Estimate {
    limit: f64,
    answers: u32,
    /// The upstream's latency without a queue, in seconds.
    baseline: f64,
    /// When the baseline is to be measured again.
    next_probe: Instant,
    /// During a probe: when it started, the answers taken in and the fastest of them.
    probe: Option<(Instant, u32, f64)>,
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
                answers: 0,
                baseline: f64::INFINITY,
                next_probe: Instant::now() + PROBE_EVERY,
                probe: None,
            }),
            gauge,
        }
    }

    pub fn limit(&self) -> u32 {
        self.limit.load(Ordering::Relaxed)
    }

    /// Counts one more request in flight if that stays within the limit.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Ticket> {
        let enter = || {
            self.in_flight
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < self.limit()).then_some(n + 1)
                })
                .is_ok()
        };
        if enter() || (self.end_overdue_probe(Instant::now()) && enter()) {
            return Some(Ticket(self.clone()));
        }
        None
    }

    /// Gives up a probe that has run too long; whether there was one.
    fn end_overdue_probe(&self, now: Instant) -> bool {
        let mut estimate = self.estimate.lock().unwrap_or_else(|e| e.into_inner());
        match estimate.probe {
            Some((started, ..)) if now.saturating_duration_since(started) > PROBE_AT_MOST => {
                estimate.probe = None;
                estimate.next_probe = now + PROBE_EVERY;
                self.admit(estimate.limit);
                true
            }
            _ => false,
        }
    }

    /// Takes in how long an answer took to arrive (or how long a try waited before it was
    /// given up).
    pub fn sample(&self, latency: Duration) {
        self.sample_at(latency, Instant::now());
    }

    fn sample_at(&self, latency: Duration, now: Instant) {
        let latency = latency.as_secs_f64().max(1e-6);
        let in_flight = self.in_flight.load(Ordering::Relaxed);
        let mut estimate = self.estimate.lock().unwrap_or_else(|e| e.into_inner());
        let estimate = &mut *estimate;
        estimate.answers = estimate.answers.saturating_add(1);

        if let Some((started, answers, fastest)) = &mut estimate.probe {
            // Only answers from the drained upstream tell its latency without a queue.
            if in_flight <= self.settings.min_limit {
                *answers += 1;
                *fastest = fastest.min(latency);
            }
            let overdue = now.saturating_duration_since(*started) > PROBE_AT_MOST;
            if *answers >= PROBE_ANSWERS || overdue {
                if !overdue {
                    estimate.baseline = *fastest;
                }
                estimate.probe = None;
                estimate.next_probe = now + PROBE_EVERY;
                self.admit(estimate.limit);
            }
            return;
        }
        if estimate.answers <= WARMUP {
            estimate.baseline = estimate.baseline.min(latency);
            return;
        }
        if now >= estimate.next_probe {
            estimate.probe = Some((now, 0, f64::INFINITY));
            self.admit(f64::from(self.settings.min_limit));
            return;
        }
        if f64::from(in_flight) < estimate.limit / 2.0 {
            return;
        }

        let gradient = (self.settings.tolerance * estimate.baseline / latency).clamp(0.5, 1.0);
        let target = estimate.limit * gradient + estimate.limit.sqrt();
        let limit = estimate.limit * (1.0 - SMOOTHING) + target * SMOOTHING;
        estimate.limit = limit.clamp(
            f64::from(self.settings.min_limit),
            f64::from(self.max_limit),
        );
        self.admit(estimate.limit);
    }

    /// Admits requests against `limit` from now on.
    fn admit(&self, limit: f64) {
        // NB: every limit is clamped to u32 bounds, so the cast cannot saturate.
        let admitted = limit as u32;
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
    fn a_lasting_queue_keeps_the_limit_down() {
        let limiter = limiter(40);
        feed(&limiter, 1, 20, Duration::from_millis(10));
        // Far more answers than an average over recent ones would need to catch up.
        feed(&limiter, 40, 2000, Duration::from_millis(200));
        assert!(
            limiter.limit() < 10,
            "the limit grew back to {}",
            limiter.limit()
        );
    }

    /// A limiter of 10 with all 10 places taken, past its warm-up on 10 ms answers at `start`.
    fn warmed() -> (Arc<AdaptiveLimit>, Vec<Ticket>, Instant) {
        let limiter = limiter(10);
        let start = Instant::now();
        let held: Vec<_> = (0..10).filter_map(|_| limiter.try_acquire()).collect();
        for _ in 0..20 {
            limiter.sample_at(Duration::from_millis(10), start);
        }
        (limiter, held, start)
    }

    #[test]
    fn a_probe_measures_the_baseline_again_with_the_upstream_drained() {
        let (limiter, held, start) = warmed();
        let before = limiter.limit();

        // Time for a probe: the limit drops to min_limit until the upstream has drained.
        let later = start + PROBE_EVERY;
        limiter.sample_at(Duration::from_millis(50), later);
        assert_eq!(limiter.limit(), 1);
        for _ in 0..20 {
            limiter.sample_at(Duration::from_millis(50), later);
        }
        assert_eq!(
            limiter.limit(),
            1,
            "answers from a full upstream do not count"
        );
        drop(held);
        let _one = limiter.try_acquire().expect("the probe's one place");
        for _ in 0..PROBE_ANSWERS {
            limiter.sample_at(Duration::from_millis(50), later);
        }
        assert_eq!(limiter.limit(), before, "the limit is back");
        drop(_one);

        // 50 ms is now the upstream's own latency: answers that fast let the limit grow.
        let _held: Vec<_> = (0..before).filter_map(|_| limiter.try_acquire()).collect();
        for _ in 0..10 {
            limiter.sample_at(Duration::from_millis(50), later);
        }
        assert!(
            limiter.limit() > before,
            "{} after {before}",
            limiter.limit()
        );
    }

    #[test]
    fn a_probe_that_cannot_drain_the_upstream_is_given_up() {
        let (limiter, _held, start) = warmed();
        let before = limiter.limit();
        limiter.sample_at(Duration::from_millis(10), start + PROBE_EVERY);
        assert_eq!(limiter.limit(), 1, "probing");
        assert!(limiter.end_overdue_probe(start + PROBE_EVERY + PROBE_AT_MOST * 2));
        assert_eq!(limiter.limit(), before);
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
