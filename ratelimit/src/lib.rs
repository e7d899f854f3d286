//! The keyed rate limiter behind the `rate-limit` host function that policies call.
//!
//! Buckets use GCRA (from the `governor` crate): a quota of `limit` units per `period` refills
//! one unit every `period / limit` and holds at most `burst` units. Buckets are grouped by a
//! name and a quota, then keyed by a string such as an API key or client address.

#[cfg(feature = "limiter")]
mod limiter;

#[cfg(feature = "limiter")]
pub use limiter::Buckets;

/// A rate: `limit` units per `period_ms` milliseconds, of which up to `burst` may be spent at
/// once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Quota {
    /// Units per period.
    pub limit: u32,
    /// The period in milliseconds.
    pub period_ms: u64,
    /// The most units that may be spent at once.
    pub burst: u32,
}

/// The answer to a rate-limit check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Whether the units were taken.
    pub allowed: bool,
    /// Units that could still be taken at once.
    pub remaining: u32,
    /// When refused, milliseconds until the same check could succeed.
    pub retry_after_ms: u64,
    /// Milliseconds until the bucket is full again.
    pub reset_after_ms: u64,
}

impl Outcome {
    /// The answer to a check that can never succeed: a zero or overflowing quota, or a cost
    /// above the burst.
    pub const NEVER: Outcome = Outcome {
        allowed: false,
        remaining: 0,
        retry_after_ms: u64::MAX,
        reset_after_ms: 0,
    };
}
