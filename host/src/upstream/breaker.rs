//! A circuit breaker over a whole upstream.
//!
//! Closed, it counts how attempts end and opens on too many consecutive failures or too high
//! a failure rate within a sliding window. Open, it refuses every attempt until its cool-down
//! ends. Then it is half open: it lets through a fixed number of probes and refuses the rest;
//! when every probe succeeds it closes, and one failed probe opens it again for another
//! cool-down.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::config;
use crate::metrics::UpstreamMetrics;

/// Buckets of the failure-rate window; the window slides one bucket at a time.
const WINDOW_BUCKETS: u32 = 10;

#[derive(Debug)]
pub struct Breaker {
    settings: config::CircuitBreaker,
    state: Mutex<State>,
    metrics: UpstreamMetrics,
}

/// Leave to send one attempt; tell the breaker how it went with [`Permit::record`]. A permit
/// dropped without a verdict (its request was cancelled) gives its probe place back.
#[derive(Debug)]
pub struct Permit {
    breaker: Arc<Breaker>,
    /// The state's epoch when the permit was given, so that verdicts on attempts admitted
    /// under an earlier state are ignored.
    epoch: u64,
    recorded: bool,
}

/// The breaker refused the attempt; it may let one through after this long.
#[derive(Debug, Clone, Copy)]
pub struct Open(pub Duration);

#[derive(Debug)]
struct State {
    phase: Phase,
    /// Counts state changes.
    epoch: u64,
    consecutive_failures: u32,
    window: Window,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen { admitted: u32, succeeded: u32 },
}

/// Attempts and failures over the last `window_ms`, in buckets.
#[derive(Debug)]
struct Window {
    started: Instant,
    bucket_length: Duration,
    /// `(bucket number since start, attempts, failures)`.
    buckets: [(u64, u32, u32); WINDOW_BUCKETS as usize],
}

// === impl Breaker ===

impl Breaker {
    pub fn new(settings: &config::CircuitBreaker, metrics: &UpstreamMetrics) -> Breaker {
        metrics.circuit_state_gauge().set(0);
        Breaker {
            state: Mutex::new(State {
                phase: Phase::Closed,
                epoch: 0,
                consecutive_failures: 0,
                window: Window::new(settings.window_ms),
            }),
            settings: settings.clone(),
            metrics: metrics.clone(),
        }
    }

    /// Leave to send an attempt, unless the circuit is open or every probe place is taken.
    pub fn admit(self: &Arc<Self>) -> Result<Permit, Open> {
        let mut state = self.lock();
        let now = Instant::now();
        match state.phase {
            Phase::Closed => {}
            Phase::Open { until } if now < until => return Err(Open(until - now)),
            Phase::Open { .. } => {
                self.enter(
                    &mut state,
                    Phase::HalfOpen {
                        admitted: 1,
                        succeeded: 0,
                    },
                );
            }
            Phase::HalfOpen {
                admitted,
                succeeded,
            } if admitted < self.settings.half_open_probes => {
                state.phase = Phase::HalfOpen {
                    admitted: admitted + 1,
                    succeeded,
                };
            }
            // The probes are out; their answers decide within about a request's time.
            Phase::HalfOpen { .. } => return Err(Open(Duration::from_secs(1))),
        }
        Ok(Permit {
            breaker: self.clone(),
            epoch: state.epoch,
            recorded: false,
        })
    }

    fn record(&self, epoch: u64, failed: bool) {
        let mut state = self.lock();
        if state.epoch != epoch {
            return;
        }
        let now = Instant::now();
        match state.phase {
            Phase::Closed => {
                state.window.add(now, failed);
                state.consecutive_failures = if failed {
                    state.consecutive_failures + 1
                } else {
                    0
                };
                if self.should_open(&state) {
                    self.open(&mut state, now);
                }
            }
            Phase::HalfOpen { .. } if failed => self.open(&mut state, now),
            Phase::HalfOpen {
                admitted,
                succeeded,
            } => {
                if succeeded + 1 >= self.settings.half_open_probes {
                    self.enter(&mut state, Phase::Closed);
                } else {
                    state.phase = Phase::HalfOpen {
                        admitted,
                        succeeded: succeeded + 1,
                    };
                }
            }
            Phase::Open { .. } => {}
        }
    }

    /// A probe that ended without a verdict frees its place for another.
    fn cancel(&self, epoch: u64) {
        let mut state = self.lock();
        if let (
            true,
            Phase::HalfOpen {
                admitted,
                succeeded,
            },
        ) = (state.epoch == epoch, state.phase)
        {
            state.phase = Phase::HalfOpen {
                admitted: admitted.saturating_sub(1),
                succeeded,
            };
        }
    }

    fn should_open(&self, state: &State) -> bool {
        let settings = &self.settings;
        if settings.consecutive_failures > 0
            && state.consecutive_failures >= settings.consecutive_failures
        {
            return true;
        }
        let Some(rate) = settings.failure_rate else {
            return false;
        };
        let (attempts, failures) = state.window.totals(Instant::now());
        attempts >= settings.minimum_requests.max(1)
            && f64::from(failures) >= rate * f64::from(attempts)
    }

    fn open(&self, state: &mut State, now: Instant) {
        tracing::warn!(
            upstream = %self.metrics.upstream,
            seconds = self.settings.open_ms.as_secs_f64(),
            "circuit opened: the upstream's requests fail fast"
        );
        self.enter(
            state,
            Phase::Open {
                until: now + self.settings.open_ms,
            },
        );
    }

    fn enter(&self, state: &mut State, phase: Phase) {
        let (code, name) = match phase {
            Phase::Closed => (0, "closed"),
            Phase::Open { .. } => (1, "open"),
            Phase::HalfOpen { .. } => (2, "half_open"),
        };
        if phase == Phase::Closed {
            tracing::info!(upstream = %self.metrics.upstream, "circuit closed");
            state.consecutive_failures = 0;
            state.window = Window::new(self.settings.window_ms);
        }
        state.phase = phase;
        state.epoch += 1;
        self.metrics.circuit(code, name);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // NB: the state is consistent after every statement, so a poisoned lock is usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

// === impl Permit ===

impl Permit {
    pub fn record(mut self, failed: bool) {
        self.recorded = true;
        self.breaker.record(self.epoch, failed);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.recorded {
            self.breaker.cancel(self.epoch);
        }
    }
}

// === impl Window ===

impl Window {
    fn new(length: Duration) -> Window {
        Window {
            started: Instant::now(),
            bucket_length: (length / WINDOW_BUCKETS).max(Duration::from_millis(1)),
            buckets: [(0, 0, 0); WINDOW_BUCKETS as usize],
        }
    }

    fn bucket_number(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.started).as_nanos();
        u64::try_from(elapsed / self.bucket_length.as_nanos()).unwrap_or(u64::MAX)
    }

    fn add(&mut self, now: Instant, failed: bool) {
        let number = self.bucket_number(now);
        let bucket = &mut self.buckets[(number % u64::from(WINDOW_BUCKETS)) as usize];
        if bucket.0 != number {
            *bucket = (number, 0, 0);
        }
        bucket.1 += 1;
        bucket.2 += u32::from(failed);
    }

    /// Attempts and failures in the buckets that are still inside the window.
    fn totals(&self, now: Instant) -> (u32, u32) {
        let current = self.bucket_number(now);
        self.buckets
            .iter()
            .filter(|(number, ..)| current - number < u64::from(WINDOW_BUCKETS))
            .fold((0, 0), |(attempts, failures), &(_, a, f)| {
                (attempts + a, failures + f)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn breaker(consecutive_failures: u32, open_ms: u64, probes: u32) -> Arc<Breaker> {
        let settings = config::CircuitBreaker {
            consecutive_failures,
            failure_rate: None,
            minimum_requests: 1,
            window_ms: Duration::from_secs(10),
            open_ms: Duration::from_millis(open_ms),
            half_open_probes: probes,
        };
        Arc::new(Breaker::new(&settings, &Metrics::new().upstream("test")))
    }

    #[test]
    fn opens_after_consecutive_failures_and_probes_after_cool_down() {
        let breaker = breaker(2, 20, 2);
        breaker.admit().expect("closed").record(true);
        breaker.admit().expect("closed").record(true);
        assert!(breaker.admit().is_err(), "open after two failures");

        std::thread::sleep(Duration::from_millis(30));
        let probes = [breaker.admit(), breaker.admit()];
        assert!(probes.iter().all(Result::is_ok), "two probes let through");
        assert!(
            breaker.admit().is_err(),
            "a third is refused while half open"
        );
        for probe in probes {
            probe.expect("probe").record(false);
        }
        assert!(breaker.admit().is_ok(), "closed after the probes succeed");
    }

    #[test]
    fn a_failed_probe_reopens_and_a_cancelled_one_frees_its_place() {
        let breaker = breaker(1, 20, 1);
        breaker.admit().expect("closed").record(true);
        std::thread::sleep(Duration::from_millis(30));
        drop(breaker.admit().expect("probe"));
        breaker
            .admit()
            .expect("the cancelled probe's place")
            .record(true);
        assert!(breaker.admit().is_err(), "open again after a failed probe");
    }

    #[test]
    fn failure_rate_opens_once_the_window_has_enough_attempts() {
        let settings = config::CircuitBreaker {
            consecutive_failures: 0,
            failure_rate: Some(0.5),
            minimum_requests: 4,
            window_ms: Duration::from_secs(10),
            open_ms: Duration::from_secs(10),
            half_open_probes: 1,
        };
        let breaker = Arc::new(Breaker::new(&settings, &Metrics::new().upstream("t")));
        for failed in [false, false, true] {
            breaker.admit().expect("closed").record(failed);
        }
        assert!(
            breaker.admit().is_ok(),
            "three attempts are below the minimum"
        );
        for failed in [false, true] {
            breaker.admit().expect("closed").record(failed);
        }
        assert!(breaker.admit().is_ok(), "2 of 5 failed");
        breaker.admit().expect("closed").record(true);
        assert!(breaker.admit().is_err(), "3 of 6 failed");
    }
}
