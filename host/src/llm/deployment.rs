//! Deployments of a model: where they stand against their provider's rate limits, as told by
//! its rate-limit headers, less what requests in flight have reserved; and their cool-down
//! after a failure.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderMap, HeaderValue};
use prometheus::{IntGauge, IntGaugeVec};

use crate::config::{self, Provider};
use crate::upstream::Upstream;

/// One deployment and its standing.
#[derive(Debug)]
pub struct Deployment {
    pub settings: config::Deployment,
    pub label: String,
    pub upstream: Arc<Upstream>,
    /// The credential header to send, when the deployment has its own.
    pub credential: Option<(http::HeaderName, HeaderValue)>,
    state: Mutex<Standing>,
    remaining: IntGaugeVec,
    /// The deployment's series of `remaining`, made with the provider's first figures rather
    /// than shown as a 0 before.
    remaining_series: OnceLock<IntGauge>,
}

#[derive(Debug, Default)]
struct Standing {
    requests: Option<Quota>,
    tokens: Option<Quota>,
    /// The provider's token limit for a whole window, when its headers gave it.
    token_limit: Option<u64>,
    /// Requests sent and not yet answered, and the tokens they reserved: the provider has
    /// not counted them in the headers seen so far.
    in_flight: u64,
    reserved: u64,
    cooling_until: Option<Instant>,
}

/// What the provider's headers last said about one limit.
#[derive(Debug, Clone, Copy)]
struct Quota {
    remaining: u64,
    resets_at: Instant,
}

/// A request counted against a deployment until its answer's headers arrive (from then on
/// the provider's own headers count it).
#[derive(Debug)]
pub struct Claim {
    deployment: Arc<Deployment>,
    tokens: u64,
}

// === impl Deployment ===

impl Deployment {
    pub fn new(
        settings: &config::Deployment,
        upstream: Arc<Upstream>,
        remaining: IntGaugeVec,
    ) -> Deployment {
        Deployment {
            label: settings.label(),
            credential: credential(settings),
            settings: settings.clone(),
            upstream,
            state: Mutex::new(Standing::default()),
            remaining,
            remaining_series: OnceLock::new(),
        }
    }

    /// `Ok` if a request of `tokens` may go now; else the earliest time worth trying again.
    pub fn ready(&self, tokens: u64, now: Instant) -> Result<(), Instant> {
        let state = self.lock();
        if let Some(until) = state.cooling_until.filter(|&until| until > now) {
            return Err(until);
        }
        if let Some(quota) = state.requests.filter(|q| q.resets_at > now)
            && quota.remaining <= state.in_flight
        {
            return Err(quota.resets_at);
        }
        if let Some(quota) = state.tokens.filter(|q| q.resets_at > now)
            && quota.remaining < state.reserved + tokens
        {
            return Err(quota.resets_at);
        }
        Ok(())
    }

    /// Whether a request of `tokens` fits the provider's limit for a whole window at all, as
    /// far as its headers told.
    pub fn could_ever_take(&self, tokens: u64) -> bool {
        self.lock().token_limit.is_none_or(|limit| tokens <= limit)
    }

    /// Counts a request of `tokens` as sent.
    pub fn claim(self: &Arc<Self>, tokens: u64) -> Claim {
        let mut state = self.lock();
        state.in_flight += 1;
        state.reserved += tokens;
        self.publish(&state);
        Claim {
            deployment: self.clone(),
            tokens,
        }
    }

    /// Reads the provider's rate-limit headers from an answer. Only for a deployment with
    /// its own credential: when each client's key passes through, the headers speak for that
    /// client's key alone, not for the deployment.
    pub fn observe(&self, headers: &HeaderMap) {
        if self.credential.is_none() {
            return;
        }
        let now = Instant::now();
        let (requests, tokens, token_limit) = match self.settings.provider {
            Provider::Openai => (
                openai_quota(headers, "requests", now),
                openai_quota(headers, "tokens", now),
                number(headers, "x-ratelimit-limit-tokens"),
            ),
            Provider::Anthropic => (
                anthropic_quota(headers, "requests", now),
                anthropic_quota(headers, "tokens", now),
                number(headers, "anthropic-ratelimit-tokens-limit"),
            ),
        };
        let mut state = self.lock();
        state.requests = requests.or(state.requests);
        state.tokens = tokens.or(state.tokens);
        state.token_limit = token_limit.or(state.token_limit);
        self.publish(&state);
    }

    /// Leaves the deployment alone for `period`, or its configured cool-down.
    pub fn cool_down(&self, period: Option<Duration>) {
        let period = period.unwrap_or(self.settings.cooldown_ms);
        tracing::warn!(deployment = %self.label, seconds = period.as_secs_f64(), "deployment cooling down");
        self.lock().cooling_until = Some(Instant::now() + period);
    }

    fn publish(&self, state: &Standing) {
        if let Some(tokens) = state.tokens {
            let left = tokens.remaining.saturating_sub(state.reserved);
            let gauge = (self.remaining_series)
                .get_or_init(|| self.remaining.with_label_values(&[&self.label]));
            gauge.set(i64::try_from(left).unwrap_or(i64::MAX));
        }
    }

    fn lock(&self) -> MutexGuard<'_, Standing> {
        // NB: every update leaves the standing consistent, so a poisoned lock is usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut state = self.deployment.lock();
        state.in_flight = state.in_flight.saturating_sub(1);
        state.reserved = state.reserved.saturating_sub(self.tokens);
        self.deployment.publish(&state);
    }
}

/// The header the deployment's API key goes in, read from its environment variable.
fn credential(settings: &config::Deployment) -> Option<(http::HeaderName, HeaderValue)> {
    let variable = settings.api_key_env.as_ref()?;
    let Ok(key) = std::env::var(variable) else {
        tracing::warn!(deployment = %settings.label(), variable, "API key variable is not set; the client's credential passes through");
        return None;
    };
    let (name, value) = match settings.provider {
        Provider::Openai => (http::header::AUTHORIZATION, format!("Bearer {key}")),
        Provider::Anthropic => (http::HeaderName::from_static("x-api-key"), key),
    };
    let mut value = HeaderValue::from_str(&value).ok()?;
    value.set_sensitive(true);
    Some((name, value))
}

/// `x-ratelimit-remaining-{kind}` and `x-ratelimit-reset-{kind}` (a duration like `6m0s`).
fn openai_quota(headers: &HeaderMap, kind: &str, now: Instant) -> Option<Quota> {
    let remaining = number(headers, &format!("x-ratelimit-remaining-{kind}"))?;
    let reset = text(headers, &format!("x-ratelimit-reset-{kind}")).and_then(go_duration)?;
    Some(Quota {
        remaining,
        resets_at: now.checked_add(reset)?,
    })
}

/// `anthropic-ratelimit-{kind}-remaining` and `-reset` (an RFC 3339 time).
fn anthropic_quota(headers: &HeaderMap, kind: &str, now: Instant) -> Option<Quota> {
    let remaining = number(headers, &format!("anthropic-ratelimit-{kind}-remaining"))?;
    let reset = text(headers, &format!("anthropic-ratelimit-{kind}-reset"))?;
    let at = humantime::parse_rfc3339_weak(reset).ok()?;
    let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
    Some(Quota {
        remaining,
        resets_at: now.checked_add(wait)?,
    })
}

/// `Retry-After` in seconds (the HTTP-date form is rare from LLM providers and ignored).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let seconds: f64 = text(headers, "retry-after")?.trim().parse().ok()?;
    (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds.min(3600.0)))
}

fn number(headers: &HeaderMap, name: &str) -> Option<u64> {
    text(headers, name)?.trim().parse().ok()
}

fn text<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name)?.to_str().ok()
}

/// A Go-style duration as OpenAI writes them: `20ms`, `1.5s`, `6m0s`, `1h2m3s`.
fn go_duration(text: &str) -> Option<Duration> {
    let mut total = 0.0;
    let mut rest = text.trim();
    while !rest.is_empty() {
        let split = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .filter(|&at| at > 0)?;
        let (number, after) = rest.split_at(split);
        let number: f64 = number.parse().ok()?;
        let unit_end = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_end);
        total += number
            * match unit {
                "h" => 3600.0,
                "m" => 60.0,
                "s" => 1.0,
                "ms" => 0.001,
                "us" | "µs" => 0.000_001,
                "ns" => 0.000_000_001,
                _ => return None,
            };
        rest = after;
    }
    Duration::try_from_secs_f64(total).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_parse() {
        assert_eq!(go_duration("20ms"), Some(Duration::from_millis(20)));
        assert_eq!(go_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(go_duration("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(go_duration("1h2m3s"), Some(Duration::from_secs(3723)));
        assert_eq!(go_duration("soon"), None);
        assert_eq!(go_duration("5"), None);
    }
}
