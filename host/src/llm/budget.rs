//! Token budgets of consumers: a bucket per consumer and model from which a request's
//! estimate is reserved before it is sent, and which is settled to the real usage after.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prometheus::IntGauge;

/// Buckets kept before full ones (consumers that have not spent lately) are forgotten.
const MAX_BUCKETS: usize = 100_000;

/// A token bucket that refills continuously up to one minute's worth.
#[derive(Debug, Clone)]
struct Bucket {
    level: f64,
    updated: Instant,
}

/// Every consumer's bucket, for one route.
#[derive(Debug)]
pub struct ConsumerBudgets {
    per_minute: f64,
    buckets: Mutex<HashMap<(u64, String), Bucket>>,
    reserved: IntGauge,
}

/// Why a reservation was refused.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Refusal {
    /// It fits once the bucket has refilled for this long.
    Wait(Duration),
    /// It is larger than a whole minute's budget: it never fits.
    Never,
}

/// Tokens taken from a consumer's bucket. Settle it with the real usage; dropped unsettled
/// (the request failed before an answer) it gives everything back.
#[derive(Debug)]
pub struct Charge {
    budgets: Arc<ConsumerBudgets>,
    key: (u64, String),
    reserved: u64,
}

// === impl ConsumerBudgets ===

impl ConsumerBudgets {
    pub fn new(per_minute: u64, reserved: IntGauge) -> ConsumerBudgets {
        ConsumerBudgets {
            per_minute: per_minute as f64,
            buckets: Mutex::new(HashMap::new()),
            reserved,
        }
    }

    /// Takes `tokens` from the consumer's bucket for `model`, or says how long until they
    /// would fit.
    pub fn reserve(
        self: &Arc<Self>,
        consumer: u64,
        model: &str,
        tokens: u64,
    ) -> Result<Charge, Refusal> {
        if tokens as f64 > self.per_minute {
            return Err(Refusal::Never);
        }
        let now = Instant::now();
        let key = (consumer, model.to_string());
        let mut buckets = self.lock();
        if buckets.len() >= MAX_BUCKETS {
            buckets.retain(|_, bucket| self.refilled(bucket, now) < self.per_minute);
        }
        let bucket = buckets.entry(key.clone()).or_insert(Bucket {
            level: self.per_minute,
            updated: now,
        });
        bucket.level = self.refilled(bucket, now);
        bucket.updated = now;
        let wanted = tokens as f64;
        if bucket.level < wanted {
            let missing = wanted - bucket.level;
            let wait = Duration::from_secs_f64(missing / self.per_minute * 60.0);
            return Err(Refusal::Wait(wait));
        }
        bucket.level -= wanted;
        self.reserved.add(tokens as i64);
        Ok(Charge {
            budgets: self.clone(),
            key,
            reserved: tokens,
        })
    }

    fn refilled(&self, bucket: &Bucket, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        (bucket.level + elapsed * self.per_minute / 60.0).min(self.per_minute)
    }

    /// Gives back (or takes, when negative) tokens after a request's real usage is known.
    fn adjust(&self, key: &(u64, String), refund: f64, reserved: u64) {
        self.reserved.sub(reserved as i64);
        if let Some(bucket) = self.lock().get_mut(key) {
            bucket.level = (bucket.level + refund).min(self.per_minute);
        }
    }

    /// What is left in a consumer's bucket now.
    #[cfg(test)]
    fn level(&self, consumer: u64, model: &str) -> f64 {
        let buckets = self.lock();
        let bucket = &buckets[&(consumer, model.to_string())];
        self.refilled(bucket, Instant::now())
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<(u64, String), Bucket>> {
        // NB: every update leaves the map consistent, so a poisoned lock is usable.
        self.buckets.lock().unwrap_or_else(|e| e.into_inner())
    }
}

// === impl Charge ===

impl Charge {
    /// Settles the reservation to `used` tokens: the difference goes back to the bucket, or
    /// is taken from it when the request used more than was reserved.
    pub fn settle(mut self, used: u64) {
        let refund = self.reserved as f64 - used as f64;
        self.budgets.adjust(&self.key, refund, self.reserved);
        self.reserved = 0;
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if self.reserved > 0 {
            self.budgets
                .adjust(&self.key, self.reserved as f64, self.reserved);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budgets(per_minute: u64) -> Arc<ConsumerBudgets> {
        let gauge = IntGauge::new("reserved", "test").expect("valid");
        Arc::new(ConsumerBudgets::new(per_minute, gauge))
    }

    #[test]
    fn reservations_that_do_not_fit_are_refused_with_the_wait() {
        let budgets = budgets(600);
        let charge = budgets.reserve(1, "m", 500).expect("fits");
        let Err(Refusal::Wait(wait)) = budgets.reserve(1, "m", 200) else {
            panic!("does not fit yet");
        };
        assert!(
            wait > Duration::from_secs(9) && wait <= Duration::from_secs(10),
            "{wait:?}"
        );
        assert_eq!(budgets.reserve(1, "m", 601).err(), Some(Refusal::Never));
        assert!(
            budgets.reserve(2, "m", 200).is_ok(),
            "another consumer has its own"
        );
        drop(charge);
        assert!(
            budgets.reserve(1, "m", 200).is_ok(),
            "refunded when dropped"
        );
    }

    #[test]
    fn settling_gives_back_what_was_not_used() {
        let budgets = budgets(1000);
        budgets.reserve(1, "m", 800).expect("fits").settle(100);
        let level = budgets.level(1, "m");
        assert!((900.0..=901.0).contains(&level), "{level}");
    }
}
