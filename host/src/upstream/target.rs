//! The servers of an upstream: their load, their health, and their ejection when they keep
//! failing real requests (passive outlier detection).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use http::uri::Authority;
use prometheus::IntGauge;

use super::connect::{self, Pool};
use crate::config;
use crate::metrics::UpstreamMetrics;

/// One server of an upstream, its connections, and what the gateway knows about it.
pub struct Target {
    pub authority: Authority,
    pub weight: u32,
    pub pool: Pool,
    in_flight: AtomicU32,
    /// The verdict of active health checks; true when there are none.
    passes_checks: AtomicBool,
    /// Milliseconds since the upstream's clock started until which the target is ejected.
    ejected_until: AtomicU64,
    consecutive_failures: AtomicU32,
    /// Ejections in a row, each soon after the one before; lengthens the next one.
    ejection_streak: AtomicU32,
    healthy: IntGauge,
}

/// All the targets of an upstream, with the clock their ejections are measured on.
#[derive(Debug)]
pub struct Targets {
    pub list: Box<[Target]>,
    clock: Instant,
    outliers: Option<config::OutlierDetection>,
    metrics: UpstreamMetrics,
}

/// A request in flight to a target, counted for least-request balancing until dropped.
#[derive(Debug)]
pub struct TargetLease {
    targets: Arc<Targets>,
    index: usize,
}

// === impl Target ===

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("authority", &self.authority)
            .field("weight", &self.weight)
            .finish_non_exhaustive()
    }
}

// === impl Targets ===

impl Targets {
    pub fn new(
        settings: &config::Upstream,
        tls: &rustls::ClientConfig,
        metrics: &UpstreamMetrics,
    ) -> Targets {
        let list = settings
            .targets
            .iter()
            // NB: the config check has already parsed every target as an authority.
            .filter_map(|target| Some((target.address().parse().ok()?, target.weight())))
            .map(|(authority, weight): (Authority, u32)| {
                let healthy = metrics.target_healthy(authority.as_str());
                healthy.set(1);
                Target {
                    pool: connect::pool(settings, tls, &authority),
                    authority,
                    weight,
                    in_flight: AtomicU32::new(0),
                    passes_checks: AtomicBool::new(true),
                    ejected_until: AtomicU64::new(0),
                    consecutive_failures: AtomicU32::new(0),
                    ejection_streak: AtomicU32::new(0),
                    healthy,
                }
            })
            .collect();
        Targets {
            list,
            clock: Instant::now(),
            outliers: settings.outlier_detection.clone(),
            metrics: metrics.clone(),
        }
    }

    /// Whether target `index` may take traffic now.
    pub fn usable(&self, index: usize) -> bool {
        let target = &self.list[index];
        target.passes_checks.load(Ordering::Relaxed) && !self.is_ejected(target, self.now())
    }

    /// Requests in flight to target `index`.
    pub fn in_flight(&self, index: usize) -> u32 {
        self.list[index].in_flight.load(Ordering::Relaxed)
    }

    /// Counts a request to target `index` until the lease is dropped.
    pub fn lease(self: &Arc<Self>, index: usize) -> TargetLease {
        self.list[index].in_flight.fetch_add(1, Ordering::Relaxed);
        TargetLease {
            targets: self.clone(),
            index,
        }
    }

    pub fn passes_checks(&self, index: usize) -> bool {
        self.list[index].passes_checks.load(Ordering::Relaxed)
    }

    /// Records the active health checks' verdict on target `index`.
    pub fn set_passes_checks(&self, index: usize, passes: bool) {
        let target = &self.list[index];
        target.passes_checks.store(passes, Ordering::Relaxed);
        self.refresh_gauge(target);
    }

    /// Records how an attempt on target `index` went, and ejects the target when it has
    /// failed too many times in a row.
    pub fn record(self: &Arc<Self>, index: usize, failed: bool) {
        let target = &self.list[index];
        if !failed {
            target.consecutive_failures.store(0, Ordering::Relaxed);
            return;
        }
        let Some(outliers) = &self.outliers else {
            return;
        };
        let failures = target.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= outliers.consecutive_failures {
            self.eject(index, outliers);
        }
    }

    fn eject(self: &Arc<Self>, index: usize, outliers: &config::OutlierDetection) {
        let target = &self.list[index];
        let now = self.now();
        let ejected_until = target.ejected_until.load(Ordering::Relaxed);
        if now < ejected_until || !self.may_eject_another(outliers, now) {
            return;
        }
        let length = self.ejection_length(target, outliers, ejected_until, now);
        let until = now.saturating_add(millis(length));
        if target
            .ejected_until
            .compare_exchange(ejected_until, until, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            // Another failing request ejected it first.
            return;
        }
        target.consecutive_failures.store(0, Ordering::Relaxed);
        self.refresh_gauge(target);
        self.metrics.ejected(target.authority.as_str());
        tracing::warn!(
            upstream = %self.metrics.upstream,
            target = %target.authority,
            seconds = length.as_secs_f64(),
            "target ejected after consecutive failures"
        );
        spawn_return(Arc::downgrade(self), index, length);
    }

    /// The cap on ejections: never the last target, always one of two or more, and otherwise
    /// no more than the configured share.
    fn may_eject_another(&self, outliers: &config::OutlierDetection, now: u64) -> bool {
        let total = self.list.len();
        let ejected = self.list.iter().filter(|t| self.is_ejected(t, now)).count();
        let share = total * outliers.max_ejection_percent as usize / 100;
        let allowed = share.max(1).min(total.saturating_sub(1));
        ejected < allowed
    }

    /// `base * streak`, where the streak grows while ejections follow one another within
    /// `max_ejection_ms` and starts again after a quiet spell.
    fn ejection_length(
        &self,
        target: &Target,
        outliers: &config::OutlierDetection,
        last_until: u64,
        now: u64,
    ) -> Duration {
        let quiet = last_until == 0 || now - last_until > millis(outliers.max_ejection_ms);
        let streak = if quiet {
            target.ejection_streak.store(1, Ordering::Relaxed);
            1
        } else {
            target.ejection_streak.fetch_add(1, Ordering::Relaxed) + 1
        };
        let length = outliers.base_ejection_ms.checked_mul(streak);
        length.map_or(outliers.max_ejection_ms, |l| {
            l.min(outliers.max_ejection_ms)
        })
    }

    fn is_ejected(&self, target: &Target, now: u64) -> bool {
        now < target.ejected_until.load(Ordering::Relaxed)
    }

    fn refresh_gauge(&self, target: &Target) {
        let healthy =
            target.passes_checks.load(Ordering::Relaxed) && !self.is_ejected(target, self.now());
        target.healthy.set(i64::from(healthy));
    }

    fn now(&self) -> u64 {
        millis(self.clock.elapsed())
    }
}

/// Updates the target's health gauge when its ejection ends.
fn spawn_return(targets: Weak<Targets>, index: usize, after: Duration) {
    tokio::spawn(async move {
        tokio::time::sleep(after).await;
        if let Some(targets) = targets.upgrade() {
            targets.refresh_gauge(&targets.list[index]);
        }
    });
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

// === impl TargetLease ===

impl TargetLease {
    pub fn index(&self) -> usize {
        self.index
    }

    pub fn target(&self) -> &Target {
        &self.targets.list[self.index]
    }
}

impl Drop for TargetLease {
    fn drop(&mut self) {
        self.target().in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
