//! The 429 response, with `Retry-After` and the `RateLimit-Policy` and `RateLimit` fields of
//! the IETF httpapi rate-limit headers draft.

use serde_json::json;
use sluice_sdk::{RateLimitOutcome, Reply};

/// Builds the 429 response.
pub fn too_many_requests(
    policy: &str,
    limit: u32,
    period_ms: u64,
    outcome: &RateLimitOutcome,
) -> Reply {
    // Clients can only wait whole seconds, and waiting less than asked is refused again.
    let retry_after = whole_seconds(outcome.retry_after_ms);
    let window = whole_seconds(period_ms);
    Reply::new(429)
        .header("retry-after", retry_after.to_string())
        .header(
            "ratelimit-policy",
            format!("\"{policy}\";q={limit};w={window}"),
        )
        .header("ratelimit", format!("\"{policy}\";r=0;t={retry_after}"))
        .json(&json!({ "error": "rate_limited", "retry_after_seconds": retry_after }))
}

/// Milliseconds rounded up to whole seconds, at least one.
fn whole_seconds(millis: u64) -> u64 {
    millis.div_ceil(1000).max(1)
}

#[cfg(test)]
mod tests {
    use super::whole_seconds;

    #[test]
    fn seconds_are_rounded_up_and_never_zero() {
        assert_eq!(whole_seconds(0), 1);
        assert_eq!(whole_seconds(1), 1);
        assert_eq!(whole_seconds(1000), 1);
        assert_eq!(whole_seconds(1001), 2);
        assert_eq!(whole_seconds(u64::MAX), u64::MAX / 1000 + 1);
    }
}
