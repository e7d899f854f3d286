//! Buckets of GCRA rate limiters, shared across threads.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::{DefaultKeyedRateLimiter, NotUntil, RateLimiter};

use crate::{Outcome, Quota};

type KeyedLimiter = DefaultKeyedRateLimiter<String, StateInformationMiddleware>;

/// Named, keyed rate-limit buckets.
///
/// The map from bucket name to limiter takes a lock only to find the limiter; the check
/// itself is lock-free inside `governor`.
#[derive(Default)]
pub struct Buckets {
    limiters: Mutex<HashMap<(String, Quota), Arc<KeyedLimiter>>>,
}

impl std::fmt::Debug for Buckets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buckets").finish_non_exhaustive()
    }
}

impl Buckets {
    /// Empty buckets.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes `cost` units for `key` from bucket `bucket` with quota `quota`.
    pub fn check(&self, bucket: &str, key: &str, quota: Quota, cost: u32) -> Outcome {
        let (Some(burst), Some(cost)) = (NonZeroU32::new(quota.burst), NonZeroU32::new(cost))
        else {
            return Outcome::NEVER;
        };
        let Some((gcra, per_unit)) = gcra_quota(quota, burst) else {
            return Outcome::NEVER;
        };
        let limiter = self.limiter(bucket, quota, gcra);

        match limiter.check_key_n(&key.to_string(), cost) {
            Ok(Ok(snapshot)) => {
                let remaining = snapshot.remaining_burst_capacity();
                Outcome {
                    allowed: true,
                    remaining,
                    retry_after_ms: 0,
                    reset_after_ms: millis(per_unit * (burst.get() - remaining)),
                }
            }
            Ok(Err(not_until)) => refused(&not_until, per_unit * burst.get()),
            Err(_) => Outcome::NEVER,
        }
    }

    /// Forgets keys whose buckets have refilled completely, so the key space of a long-running
    /// gateway stays bounded by the keys active within one quota period.
    pub fn retain_recent(&self) {
        let limiters = self.limiters.lock().unwrap_or_else(|e| e.into_inner());
        for limiter in limiters.values() {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    fn limiter(&self, bucket: &str, quota: Quota, gcra: governor::Quota) -> Arc<KeyedLimiter> {
        let mut limiters = self.limiters.lock().unwrap_or_else(|e| e.into_inner());
        let entry = limiters.entry((bucket.to_string(), quota));
        entry
            .or_insert_with(|| Arc::new(RateLimiter::keyed(gcra).with_middleware()))
            .clone()
    }
}

/// The `governor` quota for `quota`, and the time it takes to refill one unit.
fn gcra_quota(quota: Quota, burst: NonZeroU32) -> Option<(governor::Quota, Duration)> {
    let per_unit = Duration::from_millis(quota.period_ms).checked_div(quota.limit)?;
    let gcra = governor::Quota::with_period(per_unit)?.allow_burst(burst);
    Some((gcra, per_unit))
}

fn refused(
    not_until: &NotUntil<<DefaultClock as Clock>::Instant>,
    full_refill: Duration,
) -> Outcome {
    let wait = not_until.wait_time_from(DefaultClock::default().now());
    Outcome {
        allowed: false,
        remaining: 0,
        retry_after_ms: millis(wait),
        reset_after_ms: millis(full_refill),
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIVE_PER_SECOND: Quota = Quota {
        limit: 5,
        period_ms: 1000,
        burst: 5,
    };

    #[test]
    fn burst_is_spent_then_refused_with_a_retry_time() {
        let buckets = Buckets::new();
        for expected_remaining in (0..5).rev() {
            let outcome = buckets.check("b", "k", FIVE_PER_SECOND, 1);
            assert!(outcome.allowed);
            assert_eq!(outcome.remaining, expected_remaining);
        }
        let refused = buckets.check("b", "k", FIVE_PER_SECOND, 1);
        assert!(!refused.allowed);
        assert!(refused.retry_after_ms > 0 && refused.retry_after_ms <= 200);
    }

    #[test]
    fn keys_and_buckets_are_independent() {
        let buckets = Buckets::new();
        for _ in 0..5 {
            assert!(buckets.check("b", "k1", FIVE_PER_SECOND, 1).allowed);
        }
        assert!(!buckets.check("b", "k1", FIVE_PER_SECOND, 1).allowed);
        assert!(buckets.check("b", "k2", FIVE_PER_SECOND, 1).allowed);
        assert!(buckets.check("other", "k1", FIVE_PER_SECOND, 1).allowed);
    }

    #[test]
    fn impossible_checks_are_refused() {
        let buckets = Buckets::new();
        assert_eq!(buckets.check("b", "k", FIVE_PER_SECOND, 6), Outcome::NEVER);
        assert_eq!(buckets.check("b", "k", FIVE_PER_SECOND, 0), Outcome::NEVER);
        let zero = Quota {
            limit: 0,
            ..FIVE_PER_SECOND
        };
        assert_eq!(buckets.check("b", "k", zero, 1), Outcome::NEVER);
    }
}
