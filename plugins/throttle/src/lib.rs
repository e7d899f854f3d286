//! A Sluice policy that rate-limits requests per client, identity or header value.
//!
//! ```toml
//! key = "client"            # "client", "identity" or "header:<name>"
//! identity_header = "x-sluice-identity"  # only with key = "identity"; this is the default
//! limit = 10                # requests per period
//! period = "1s"             # a whole number with ms, s, m or h
//! burst = 10                # requests allowed at once; defaults to `limit`
//! name = "throttle"         # the bucket, and the policy name in RateLimit headers
//! ```
//!
//! The buckets live in the gateway (GCRA through the `rate-limit` host function), so the limit
//! holds across every instance of the policy. A request whose key header is missing, empty or
//! not UTF-8 is limited by its client address instead. A refused request is answered with 429,
//! `Retry-After`, `RateLimit-Policy` and `RateLimit`; an allowed one continues unchanged.
//!
//! With `key = "header:<name>"` a client chooses its own key, so a fresh value escapes the
//! limit; key by identity behind the auth policy when that matters.

mod key;
mod period;
mod reply;
#[cfg(test)]
mod tests;

use serde::Deserialize;
use sluice_sdk::{Config, Decision, LogLevel, Phases, Policy, Quota, Request};

use crate::key::KeySource;

/// The policy's configuration table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default = "default_key")]
    key: String,
    identity_header: Option<String>,
    limit: u32,
    period: String,
    burst: Option<u32>,
    #[serde(default = "default_name")]
    name: String,
}

/// The throttle policy.
#[derive(Debug)]
pub struct Throttle {
    name: String,
    key: KeySource,
    quota: Quota,
}

fn default_key() -> String {
    "client".to_string()
}

fn default_name() -> String {
    "throttle".to_string()
}

// === impl Throttle ===

impl Policy for Throttle {
    /// Responses pass through untouched: skip that call.
    const PHASES: Phases = Phases::REQUEST;

    fn new(config: Config) -> Result<Self, String> {
        let settings: Settings = config.parse()?;
        Ok(Throttle {
            key: key_source(&settings)?,
            quota: quota(&settings)?,
            name: policy_name(settings.name)?,
        })
    }

    fn on_request(&self, request: &Request) -> Decision {
        let key = self.key.key_of(request);
        let outcome = sluice_sdk::rate_limit(&self.name, &key, self.quota, 1);
        if outcome.allowed {
            return Decision::proceed();
        }

        sluice_sdk::log(
            LogLevel::Debug,
            "request rate-limited",
            &[("key", &key), ("policy", &self.name)],
        );
        reply::too_many_requests(&self.name, self.quota.limit, self.quota.period_ms, &outcome)
            .into()
    }
}

fn key_source(settings: &Settings) -> Result<KeySource, String> {
    let identity_header = match (&settings.identity_header, settings.key.as_str()) {
        (None, _) => "x-sluice-identity".to_string(),
        (Some(name), "identity") => {
            key::header_name(name).map_err(|err| format!("identity_header: {err}"))?
        }
        (Some(_), _) => {
            return Err("identity_header only applies with key = \"identity\"".to_string());
        }
    };
    KeySource::parse(&settings.key, &identity_header)
}

fn quota(settings: &Settings) -> Result<Quota, String> {
    let period_ms = period::parse_millis(&settings.period)?;
    let burst = settings.burst.unwrap_or(settings.limit);
    if settings.limit == 0 || burst == 0 {
        return Err("limit and burst must be at least 1".to_string());
    }
    // The gateway refills one unit every period / limit; below a nanosecond that rounds to
    // zero and every request would be refused.
    if period_ms.saturating_mul(1_000_000) < u64::from(settings.limit) {
        return Err(format!(
            "limit {} per {} is finer than the limiter can count",
            settings.limit, settings.period
        ));
    }
    Ok(Quota {
        limit: settings.limit,
        period_ms,
        burst,
    })
}

/// The name goes into a quoted header parameter, so it is kept to token characters.
fn policy_name(name: String) -> Result<String, String> {
    if !key::is_token(&name) {
        return Err(format!(
            "name {name:?} must be a token such as \"throttle\""
        ));
    }
    Ok(name)
}

sluice_sdk::export_policy!(Throttle);
