//! The `[[upstreams]]` tables: targets, load balancing, health, circuit breaking and retries.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::millis;

/// A named group of upstream servers.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    pub name: String,
    /// Each server: `"host:port"`, or `{ address = "host:port", weight = 3 }`.
    pub targets: Vec<Target>,
    /// How a request picks its target.
    #[serde(default)]
    pub load_balancing: LoadBalancing,
    /// What `consistent_hash` hashes: `"client_address"`, `{ header = "x-user" }` or
    /// `{ cookie = "session" }`. A request without the key goes round robin.
    #[serde(default)]
    pub hash_on: Option<HashOn>,
    /// Time to establish a TCP connection to a target; then 504 (or a retry).
    #[serde(default = "defaults::connect_timeout", with = "millis")]
    pub connect_timeout_ms: Duration,
    /// Time one attempt may wait for the response headers; then 504 (or a retry). Without
    /// it an attempt is bounded only by the route's `request_timeout_ms`.
    #[serde(default, with = "millis::optional")]
    pub try_timeout_ms: Option<Duration>,
    /// Idle pooled connections are closed after this long; keep it below the upstream's own
    /// keep-alive timeout so the gateway never reuses a connection the upstream is closing.
    #[serde(default = "defaults::idle_timeout", with = "millis")]
    pub idle_timeout_ms: Duration,
    /// Requests in flight to this upstream at once, from all routes (a bulkhead): a slow
    /// upstream fills only its own slots. Beyond it requests are answered 503 at once.
    #[serde(default = "defaults::max_in_flight")]
    pub max_in_flight: u32,
    /// A limit under `max_in_flight` that follows the upstream's latency, so that requests
    /// are refused at the gateway rather than left to queue inside the upstream.
    #[serde(default)]
    pub adaptive_concurrency: Option<AdaptiveConcurrency>,
    /// Active checks: a request to each target at an interval, in the background.
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
    /// Passive checks: targets that keep failing real requests are set aside for a while.
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetection>,
    /// Fails requests fast while the upstream as a whole keeps failing.
    #[serde(default)]
    pub circuit_breaker: Option<CircuitBreaker>,
    #[serde(default)]
    pub retry: Retry,
    /// The HTTP version spoken to the targets.
    #[serde(default)]
    pub protocol: Protocol,
    /// The `Host` sent to every target in place of the client's (e.g. a provider's own
    /// name); policies cannot change it. TLS verifies this name unless `tls.server_name`
    /// says otherwise.
    #[serde(default)]
    pub host_header: Option<String>,
    /// TLS to the targets; plain TCP when absent.
    #[serde(default)]
    pub tls: Option<UpstreamTls>,
}

/// The HTTP version spoken to an upstream's targets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// HTTP/1.1, one request at a time per pooled connection.
    #[default]
    Http1,
    /// HTTP/2, every request multiplexed on one connection per target: over TLS by ALPN, or
    /// in clear text with prior knowledge (h2c). gRPC needs it.
    Http2,
    /// Whatever the target picks by ALPN, preferring HTTP/2; needs `tls`.
    Auto,
}

/// How the gateway verifies the targets it connects to with TLS.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// The name sent as SNI and verified against the certificate. Absent, it is the host of
    /// the `Host` header sent upstream: the client's, a policy's, or `host_header`.
    #[serde(default)]
    pub server_name: Option<String>,
    /// PEM certificates of the authorities trusted to sign the targets' certificates.
    /// Absent, the Mozilla root program's authorities (as bundled in the gateway) are.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// One server of an upstream.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(
    untagged,
    expecting = "a `host:port` string or a table `{ address = \"host:port\", weight = N }`"
)]
pub enum Target {
    Address(String),
    Weighted(WeightedTarget),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedTarget {
    pub address: String,
    #[serde(default = "defaults::weight")]
    pub weight: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalancing {
    /// Each target in turn; weights must all be equal.
    #[default]
    RoundRobin,
    /// Each target in turn, as often as its weight, spread evenly.
    WeightedRoundRobin,
    /// Of two targets drawn at random, the one with fewer requests in flight per weight.
    LeastRequest,
    /// The same key goes to the same target while it is healthy (see `hash_on`).
    ConsistentHash,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum HashOn {
    ClientAddress,
    Header(String),
    Cookie(String),
}

/// Active health checking: `GET path` on each target every `interval_ms`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// Path and query requested; a 2xx answer within `timeout_ms` is a pass.
    #[serde(default = "defaults::health_path")]
    pub path: String,
    #[serde(default = "defaults::health_interval", with = "millis")]
    pub interval_ms: Duration,
    #[serde(default = "defaults::health_timeout", with = "millis")]
    pub timeout_ms: Duration,
    /// Consecutive passes that bring an unhealthy target back.
    #[serde(default = "defaults::healthy_threshold")]
    pub healthy_threshold: u32,
    /// Consecutive failures that take a healthy target out.
    #[serde(default = "defaults::unhealthy_threshold")]
    pub unhealthy_threshold: u32,
}

/// Passive health: ejection of targets that fail real requests.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierDetection {
    /// Consecutive connect failures, resets, timeouts or 5xx answers that eject a target.
    #[serde(default = "defaults::outlier_failures")]
    pub consecutive_failures: u32,
    /// The first ejection's length; each ejection that follows soon after the last one is
    /// longer by this much, up to `max_ejection_ms`.
    #[serde(default = "defaults::base_ejection", with = "millis")]
    pub base_ejection_ms: Duration,
    #[serde(default = "defaults::max_ejection", with = "millis")]
    pub max_ejection_ms: Duration,
    /// The most targets ejected at once, as a percentage of all; one target may always be
    /// ejected when there are two or more, and the last one never is.
    #[serde(default = "defaults::max_ejection_percent")]
    pub max_ejection_percent: u32,
}

/// A circuit breaker over the whole upstream.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreaker {
    /// Consecutive failed attempts that open the circuit (0 turns this trigger off).
    #[serde(default = "defaults::breaker_failures")]
    pub consecutive_failures: u32,
    /// Share of failed attempts within `window_ms` that opens the circuit, from 0 to 1
    /// (absent turns this trigger off).
    #[serde(default)]
    pub failure_rate: Option<f64>,
    /// Attempts the window must hold before `failure_rate` is judged.
    #[serde(default = "defaults::breaker_minimum_requests")]
    pub minimum_requests: u32,
    #[serde(default = "defaults::breaker_window", with = "millis")]
    pub window_ms: Duration,
    /// How long the circuit stays open before letting probes through.
    #[serde(default = "defaults::breaker_open", with = "millis")]
    pub open_ms: Duration,
    /// Probe requests let through when half open; when all succeed the circuit closes, and
    /// one failure opens it again.
    #[serde(default = "defaults::half_open_probes")]
    pub half_open_probes: u32,
}

/// A concurrency limit found from latency: it grows while the upstream answers as fast as it
/// usually does, and shrinks, by at most half at a time, when answers slow down because
/// requests queue inside it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdaptiveConcurrency {
    /// The limit before any latency has been measured (at most `max_in_flight`, which is
    /// also the highest the limit goes).
    pub initial_limit: u32,
    /// The lowest the limit goes.
    pub min_limit: u32,
    /// Latency up to this multiple of the long-run average counts as no queueing (at least 1).
    pub tolerance: f64,
}

/// When and how a failed attempt is tried again, on another target when there is one.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Retry {
    /// Attempts after the first (0 turns retries off).
    pub max_retries: u32,
    /// Answers that are retried like a failed connection (e.g. `[503]`).
    pub on_status: Vec<u16>,
    /// Backoff before retry `n` is random between zero and `base * 2^(n-1)`, at most `max`.
    #[serde(with = "millis")]
    pub backoff_base_ms: Duration,
    #[serde(with = "millis")]
    pub backoff_max_ms: Duration,
    /// Retries (those waiting in backoff included) may be at most this percentage of the
    /// requests in flight to the upstream ...
    pub budget_percent: u32,
    /// ... or this many, whichever is more, so a quiet upstream can still retry.
    pub min_retries_in_flight: u32,
    /// Request bodies up to this size are kept so that they can be sent again; a request
    /// with a larger body is tried once.
    pub max_buffered_body_bytes: u64,
}

// === impl Upstream ===

impl Upstream {
    pub(super) fn check(&self, problems: &mut Vec<String>) {
        let mut problem = |text: String| problems.push(format!("upstream `{}`: {text}", self.name));
        if self.max_in_flight == 0 {
            problem("max_in_flight must be at least 1".into());
        }
        if self.targets.is_empty() {
            problem("has no targets".into());
        }
        for target in &self.targets {
            let address = target.address();
            if address
                .parse::<http::uri::Authority>()
                .map_or(true, |a| a.port_u16().is_none_or(|port| port == 0))
            {
                problem(format!("target `{address}` is not `host:port`"));
            }
            if target.weight() == 0 || target.weight() > 1000 {
                problem(format!("target `{address}`: weight must be from 1 to 1000"));
            }
        }
        let weighted = self.targets.iter().any(|t| t.weight() > 1);
        if weighted && self.load_balancing == LoadBalancing::RoundRobin {
            problem("targets have weights: use load_balancing = \"weighted_round_robin\"".into());
        }
        match (&self.hash_on, self.load_balancing) {
            (None, LoadBalancing::ConsistentHash) => {
                problem("consistent_hash needs `hash_on`".into());
            }
            (Some(_), balancing) if balancing != LoadBalancing::ConsistentHash => {
                problem("`hash_on` applies only to load_balancing = \"consistent_hash\"".into());
            }
            _ => {}
        }
        if let Some(check) = &self.health_check {
            check.check(&mut problem);
        }
        if let Some(adaptive) = &self.adaptive_concurrency {
            adaptive.check(self.max_in_flight, &mut problem);
        }
        if let Some(breaker) = &self.circuit_breaker {
            breaker.check(&mut problem);
        }
        if let Some(outlier) = &self.outlier_detection {
            outlier.check(&mut problem);
        }
        if let Some(HashOn::Header(name) | HashOn::Cookie(name)) = &self.hash_on
            && http::HeaderName::from_bytes(name.as_bytes()).is_err()
        {
            problem(format!(
                "hash_on: `{name}` is not a valid header or cookie name"
            ));
        }
        for status in &self.retry.on_status {
            if !(500..=599).contains(status) && ![408, 429].contains(status) {
                problem(format!(
                    "retry.on_status: {status} is not a 5xx, 408 or 429"
                ));
            }
        }
        if self.retry.budget_percent > 100 {
            problem("retry.budget_percent must be at most 100".into());
        }
        if self.retry.backoff_base_ms > self.retry.backoff_max_ms {
            problem("retry.backoff_base_ms must be at most retry.backoff_max_ms".into());
        }
        if self.try_timeout_ms.is_some_and(|limit| limit.is_zero())
            || self.connect_timeout_ms.is_zero()
        {
            problem(
                "try_timeout_ms and connect_timeout_ms must be above zero (leave \
                 try_timeout_ms out for none)"
                    .into(),
            );
        }
        if self.protocol == Protocol::Auto && self.tls.is_none() {
            problem(
                "protocol = \"auto\" picks the version by TLS ALPN: set `tls`, or pick \
                 \"http1\" or \"http2\""
                    .into(),
            );
        }
        if let Some(host) = &self.host_header
            && host.parse::<http::uri::Authority>().is_err()
        {
            problem(format!("host_header: `{host}` is not a host name"));
        }
        if let Some(name) = self.tls.as_ref().and_then(|tls| tls.server_name.as_ref())
            && rustls::pki_types::ServerName::try_from(name.as_str()).is_err()
        {
            problem(format!(
                "tls.server_name: `{name}` is not a DNS name or IP address"
            ));
        }
    }
}

impl HealthCheck {
    fn check(&self, problem: &mut impl FnMut(String)) {
        if !self.path.starts_with('/') || self.path.parse::<http::uri::PathAndQuery>().is_err() {
            problem(format!(
                "health_check: path `{}` is not a valid path",
                self.path
            ));
        }
        if self.interval_ms.is_zero() || self.timeout_ms.is_zero() {
            problem("health_check: interval_ms and timeout_ms must be above zero".into());
        }
        if self.healthy_threshold == 0 || self.unhealthy_threshold == 0 {
            problem("health_check: thresholds must be at least 1".into());
        }
    }
}

impl AdaptiveConcurrency {
    fn check(&self, max_in_flight: u32, problem: &mut impl FnMut(String)) {
        if self.min_limit == 0
            || self.min_limit > self.initial_limit
            || self.initial_limit > max_in_flight
        {
            problem(format!(
                "adaptive_concurrency: need 1 <= min_limit <= initial_limit <= max_in_flight \
                 ({max_in_flight})"
            ));
        }
        if !(self.tolerance >= 1.0 && self.tolerance.is_finite()) {
            problem("adaptive_concurrency: tolerance must be a number of at least 1".into());
        }
    }
}

impl OutlierDetection {
    fn check(&self, problem: &mut impl FnMut(String)) {
        if self.consecutive_failures == 0 {
            problem("outlier_detection: consecutive_failures must be at least 1".into());
        }
        if self.max_ejection_percent > 100 {
            problem("outlier_detection: max_ejection_percent must be at most 100".into());
        }
        if self.base_ejection_ms.is_zero() || self.max_ejection_ms < self.base_ejection_ms {
            problem(
                "outlier_detection: base_ejection_ms must be above zero and at most \
                 max_ejection_ms"
                    .into(),
            );
        }
    }
}

impl CircuitBreaker {
    fn check(&self, problem: &mut impl FnMut(String)) {
        if self
            .failure_rate
            .is_some_and(|rate| !(rate > 0.0 && rate <= 1.0))
        {
            problem("circuit_breaker: failure_rate must be above 0 and at most 1".into());
        }
        if self.consecutive_failures == 0 && self.failure_rate.is_none() {
            problem("circuit_breaker: set consecutive_failures or failure_rate".into());
        }
        if self.half_open_probes == 0
            || self.window_ms.is_zero()
            || self.open_ms.is_zero()
            || self.minimum_requests == 0
        {
            problem(
                "circuit_breaker: half_open_probes, minimum_requests, window_ms and open_ms \
                 must be above zero"
                    .into(),
            );
        }
    }
}

// === impl Target ===

impl Target {
    pub fn address(&self) -> &str {
        match self {
            Target::Address(address) | Target::Weighted(WeightedTarget { address, .. }) => address,
        }
    }

    pub fn weight(&self) -> u32 {
        match self {
            Target::Address(_) => 1,
            Target::Weighted(target) => target.weight,
        }
    }
}

impl Default for AdaptiveConcurrency {
    fn default() -> Self {
        AdaptiveConcurrency {
            initial_limit: 20,
            min_limit: 1,
            tolerance: 1.5,
        }
    }
}

impl Default for Retry {
    fn default() -> Self {
        // One retry of what is safe to retry: a failed connect, or an idempotent request
        // whose connection closed before any answer.
        Retry {
            max_retries: 1,
            on_status: Vec::new(),
            backoff_base_ms: Duration::from_millis(25),
            backoff_max_ms: Duration::from_millis(250),
            budget_percent: 20,
            min_retries_in_flight: 3,
            max_buffered_body_bytes: 64 << 10,
        }
    }
}

mod defaults {
    use std::time::Duration;

    pub fn weight() -> u32 {
        1
    }
    pub fn connect_timeout() -> Duration {
        Duration::from_secs(2)
    }
    pub fn idle_timeout() -> Duration {
        // Below the shortest keep-alive timeout in common use (Node.js: 5 s).
        Duration::from_secs(4)
    }
    pub fn max_in_flight() -> u32 {
        512
    }
    pub fn health_path() -> String {
        "/healthz".to_string()
    }
    pub fn health_interval() -> Duration {
        Duration::from_secs(5)
    }
    pub fn health_timeout() -> Duration {
        Duration::from_secs(1)
    }
    pub fn healthy_threshold() -> u32 {
        2
    }
    pub fn unhealthy_threshold() -> u32 {
        3
    }
    pub fn outlier_failures() -> u32 {
        5
    }
    pub fn base_ejection() -> Duration {
        Duration::from_secs(30)
    }
    pub fn max_ejection() -> Duration {
        Duration::from_secs(300)
    }
    pub fn max_ejection_percent() -> u32 {
        50
    }
    pub fn breaker_failures() -> u32 {
        5
    }
    pub fn breaker_minimum_requests() -> u32 {
        20
    }
    pub fn breaker_window() -> Duration {
        Duration::from_secs(10)
    }
    pub fn breaker_open() -> Duration {
        Duration::from_secs(5)
    }
    pub fn half_open_probes() -> u32 {
        3
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn upstream(table: &str) -> Result<Config, crate::config::ConfigError> {
        Config::parse(&format!(
            "[[upstreams]]\nname = \"app\"\n{table}\n\
             [[routes]]\nname = \"all\"\nupstream = \"app\"\n"
        ))
    }

    #[test]
    fn targets_may_be_strings_or_weighted_tables() {
        let config = upstream(
            "targets = [\"127.0.0.1:1\", { address = \"127.0.0.1:2\", weight = 3 }]\n\
             load_balancing = \"weighted_round_robin\"",
        )
        .expect("valid");
        let weights: Vec<u32> = config.upstreams[0]
            .targets
            .iter()
            .map(|t| t.weight())
            .collect();
        assert_eq!(weights, [1, 3]);
    }

    #[test]
    fn weights_with_plain_round_robin_are_refused() {
        let err = upstream("targets = [{ address = \"127.0.0.1:2\", weight = 3 }]")
            .expect_err("weights need weighted_round_robin");
        assert!(err.to_string().contains("weighted_round_robin"), "{err}");
    }

    #[test]
    fn hash_on_takes_a_header_cookie_or_client_address() {
        for hash_on in [
            "\"client_address\"",
            "{ header = \"x-user\" }",
            "{ cookie = \"session\" }",
        ] {
            upstream(&format!(
                "targets = [\"127.0.0.1:1\"]\nload_balancing = \"consistent_hash\"\n\
                 hash_on = {hash_on}"
            ))
            .expect(hash_on);
        }
        let err = upstream("targets = [\"127.0.0.1:1\"]\nload_balancing = \"consistent_hash\"")
            .expect_err("needs hash_on");
        assert!(err.to_string().contains("hash_on"), "{err}");
    }

    #[test]
    fn a_target_needs_a_port_other_than_zero() {
        for address in ["127.0.0.1", "127.0.0.1:0", "127.0.0.1:99999"] {
            let err = upstream(&format!("targets = [\"{address}\"]")).expect_err(address);
            assert!(err.to_string().contains("is not `host:port`"), "{err}");
        }
    }

    #[test]
    fn unworkable_values_are_refused_by_name() {
        for (table, expected) in [
            (
                "hash_on = { header = \"bad header\" }\nload_balancing = \"consistent_hash\"",
                "hash_on",
            ),
            (
                "[upstreams.outlier_detection]\nbase_ejection_ms = 0",
                "base_ejection_ms",
            ),
            ("try_timeout_ms = 0", "try_timeout_ms"),
            (
                "[upstreams.retry]\nbackoff_base_ms = 1000\nbackoff_max_ms = 10",
                "backoff_base_ms",
            ),
            ("[upstreams.circuit_breaker]\nopen_ms = 0", "open_ms"),
            ("[upstreams.retry]\non_status = [404]", "404"),
            (
                "max_in_flight = 10\n[upstreams.adaptive_concurrency]\ninitial_limit = 20",
                "initial_limit",
            ),
            (
                "[upstreams.adaptive_concurrency]\ntolerance = 0.5",
                "tolerance",
            ),
            (
                "[upstreams.retry]\nbackoff_base_ms = 18446744073709551615",
                "more than a week",
            ),
        ] {
            let err = upstream(&format!("targets = [\"127.0.0.1:1\"]\n{table}")).expect_err(table);
            assert!(err.to_string().contains(expected), "{table}: {err}");
        }
    }

    #[test]
    fn every_section_gets_defaults() {
        let config = upstream(
            "targets = [\"127.0.0.1:1\"]\n[upstreams.health_check]\n\
             [upstreams.outlier_detection]\n[upstreams.circuit_breaker]\n",
        )
        .expect("valid");
        let upstream = &config.upstreams[0];
        assert_eq!(
            upstream.health_check.as_ref().expect("set").path,
            "/healthz"
        );
        assert_eq!(upstream.retry.max_retries, 1);
        assert!(upstream.circuit_breaker.is_some() && upstream.outlier_detection.is_some());
    }
}
