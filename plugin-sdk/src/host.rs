//! Functions the gateway provides to policies: logging, a clock and a shared rate limiter.
//!
//! In a WebAssembly build these call the gateway. In a native build (unit tests) they are
//! served by the [`testing`](crate::testing) module.

#[cfg(target_arch = "wasm32")]
use crate::bindings::sluice::policy::{host as wit, types as wit_types};

/// Severity of a log record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    /// Very detailed tracing.
    Trace,
    /// Debugging detail.
    Debug,
    /// Normal operation.
    Info,
    /// Something unexpected that the policy handled.
    Warn,
    /// Something the policy could not handle.
    Error,
}

pub use sluice_ratelimit::{Outcome as RateLimitOutcome, Quota};

/// Writes a record to the gateway log, tagged with the plugin's name.
pub fn log(level: LogLevel, message: &str, fields: &[(&str, &str)]) {
    #[cfg(target_arch = "wasm32")]
    {
        let level = match level {
            LogLevel::Trace => wit_types::LogLevel::Trace,
            LogLevel::Debug => wit_types::LogLevel::Debug,
            LogLevel::Info => wit_types::LogLevel::Info,
            LogLevel::Warn => wit_types::LogLevel::Warn,
            LogLevel::Error => wit_types::LogLevel::Error,
        };
        let fields: Vec<(String, String)> = fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        wit::log(level, message, &fields);
    }
    #[cfg(not(target_arch = "wasm32"))]
    crate::testing::native::log(level, message, fields);
}

/// Nanoseconds since a fixed point in the past; never goes backwards.
pub fn monotonic_now() -> u64 {
    #[cfg(target_arch = "wasm32")]
    return wit::monotonic_now();
    #[cfg(not(target_arch = "wasm32"))]
    return crate::testing::native::monotonic_now();
}

/// Takes `cost` units for `key` from the gateway's bucket `bucket`.
///
/// Buckets are shared by every instance of this plugin and every request, so the limit holds
/// however many instances the gateway runs. Use one bucket name per quota.
pub fn rate_limit(bucket: &str, key: &str, quota: Quota, cost: u32) -> RateLimitOutcome {
    #[cfg(target_arch = "wasm32")]
    {
        let quota = wit::Quota {
            limit: quota.limit,
            period_ms: quota.period_ms,
            burst: quota.burst,
        };
        let outcome = wit::rate_limit(bucket, key, quota, cost);
        RateLimitOutcome {
            allowed: outcome.allowed,
            remaining: outcome.remaining,
            retry_after_ms: outcome.retry_after_ms,
            reset_after_ms: outcome.reset_after_ms,
        }
    }
    #[cfg(not(target_arch = "wasm32"))]
    crate::testing::native::rate_limit(bucket, key, quota, cost)
}
