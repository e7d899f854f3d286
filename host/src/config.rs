//! The gateway configuration file (TOML), parsed and checked as a whole.
//!
//! Every table rejects unknown keys, so a misspelt setting is an error that names the key and
//! its line rather than a silently ignored line. Relative plugin paths are resolved against the
//! folder of the config file.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

mod llm;
mod upstream;

pub use llm::{Consumer, Deployment, Llm, Model, Provider, Tokenizer};

pub use upstream::{
    AdaptiveConcurrency, CircuitBreaker, HashOn, HealthCheck, LoadBalancing, OutlierDetection,
    Protocol, Retry, Target, Upstream, UpstreamTls,
};

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub listener: Listener,
    #[serde(default)]
    pub admin: Admin,
    #[serde(default)]
    pub runtime: Runtime,
    #[serde(default)]
    pub access_log: AccessLog,
    #[serde(default)]
    pub upstreams: Vec<Upstream>,
    #[serde(default)]
    pub plugins: Vec<Plugin>,
    #[serde(default)]
    pub routes: Vec<Route>,
}

/// The public listener.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listener {
    pub address: SocketAddr,
    /// How long a client has, from accept, to send a complete request header section.
    #[serde(with = "millis")]
    pub header_read_timeout_ms: Duration,
    /// Client connections open at once; when reached, the gateway stops accepting until one
    /// closes (connections wait in the kernel's backlog, they are not refused).
    pub max_connections: u32,
    /// Largest request body accepted; a larger one is answered with 413.
    pub max_body_bytes: u64,
    /// How long in-flight requests may take to finish after a shutdown signal.
    #[serde(with = "millis")]
    pub shutdown_grace_ms: Duration,
    /// Largest request header section (request line and headers) accepted: a larger one is
    /// answered 431 and the connection closed. At least 8192.
    pub max_header_bytes: usize,
    /// Longest request target (path and query) accepted: a longer one is answered 414 and the
    /// connection closed.
    pub max_uri_bytes: usize,
    /// Proxies in front of the gateway, as CIDR blocks (`10.0.0.0/8`, `192.0.2.7/32`). Their
    /// `X-Forwarded-*` and `Forwarded` headers are extended; anyone else's are replaced.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// What to do with `%2F`, `%5C` or `\` in a request path.
    pub encoded_slash: EncodedSlash,
    /// TLS on this listener; plain HTTP when absent.
    pub tls: Option<Tls>,
}

/// What the gateway does with an encoded slash or backslash (`%2F`, `%5C`, or a raw `\`) in a
/// request path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncodedSlash {
    /// Answer 400 `encoded_slash`.
    #[default]
    Reject,
    /// Forward the path as it is: routes and policies see the escape as ordinary characters.
    Keep,
    /// Turn each into `/` before dot segments are resolved, then route on the result.
    Decode,
}

/// TLS settings of the listener.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// PEM certificate chain, leaf first; relative to the config file's folder. Read again
    /// when it changes.
    pub cert_path: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of the leaf certificate.
    pub key_path: PathBuf,
}

/// The access log: one JSON line per request.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessLog {
    pub enabled: bool,
    /// A file to append to; standard output when absent.
    pub path: Option<PathBuf>,
    /// Lines waiting to be written; when full, lines are dropped and counted rather than
    /// slowing requests down.
    pub buffer_lines: usize,
}

/// The admin listener: health and metrics.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Admin {
    pub address: SocketAddr,
}

/// The plugin runtime shared by every plugin.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Runtime {
    /// Slots in the instance pool for all plugins together. Each slot reserves address space
    /// (not memory) for two linear memories of `max_memory_bytes` up front.
    pub instance_slots: u32,
    /// The largest linear memory any plugin may be given; the size of a pool slot.
    pub max_memory_bytes: u64,
}

/// A policy: a WebAssembly component and how to run it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plugin {
    pub name: String,
    /// The `.wasm` component; relative to the config file's folder.
    pub path: PathBuf,
    /// What happens when the plugin fails: `deny` answers 503, `allow` skips it.
    #[serde(default)]
    pub on_error: OnError,
    /// `pooled` reuses instances across requests; `request` makes a fresh one per request.
    #[serde(default)]
    pub isolation: Isolation,
    #[serde(default = "defaults::fuel")]
    pub fuel: u64,
    /// Wall-clock budget of one call.
    #[serde(default = "defaults::deadline", with = "millis")]
    pub deadline_ms: Duration,
    #[serde(default = "defaults::memory_limit")]
    pub memory_limit_bytes: u64,
    /// Instances of this plugin that may exist at once.
    #[serde(default = "defaults::max_instances")]
    pub max_instances: u32,
    /// Requests that may wait for a free instance; beyond it a request is shed.
    #[serde(default = "defaults::max_waiting")]
    pub max_waiting: u32,
    /// How long a request may wait for a free instance.
    #[serde(default = "defaults::wait_timeout", with = "millis")]
    pub wait_timeout_ms: Duration,
    /// A pooled instance is replaced after this many calls.
    #[serde(default = "defaults::max_uses")]
    pub max_uses: u64,
    /// A pooled instance whose memory has grown past this is replaced after its call.
    #[serde(default = "defaults::recycle_memory")]
    pub recycle_memory_bytes: u64,
    /// Handed to the plugin as JSON when each instance starts.
    #[serde(default = "defaults::plugin_config")]
    pub config: toml::Table,
}

/// A route: which requests it takes, where they go, and the policies they pass through.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub name: String,
    /// The `Host` to match (without port), `*.example.com` for subdomains, or absent for any.
    #[serde(default)]
    pub host: Option<String>,
    /// The longest matching prefix wins among the routes for a host.
    #[serde(default = "defaults::path_prefix")]
    pub path_prefix: String,
    pub upstream: String,
    /// Plugin names, run in this order on requests and in reverse order on responses.
    #[serde(default)]
    pub policies: Vec<String>,
    /// Lets the upstream's retries apply to methods that are not idempotent (POST, PATCH)
    /// on this route; only for handlers that tolerate a request arriving twice.
    #[serde(default)]
    pub retry_non_idempotent: bool,
    /// Makes the route an LLM route: token budgets, model deployments and failover.
    #[serde(default)]
    pub llm: Option<Llm>,
    /// Time from admission to the response headers (policies, upstream attempts and their
    /// retries); then 504.
    #[serde(default = "defaults::request_timeout", with = "millis")]
    pub request_timeout_ms: Duration,
    /// Requests this route serves at once, until their response bodies end.
    #[serde(default = "defaults::route_max_in_flight")]
    pub max_in_flight: u32,
    /// Requests that may wait, in arrival order, for a slot; beyond it 503 `queue_full`.
    #[serde(default = "defaults::max_queued")]
    pub max_queued: u32,
    /// How long a request may wait for a slot; then 503 `queue_timeout`.
    #[serde(default = "defaults::queue_timeout", with = "millis")]
    pub queue_timeout_ms: Duration,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    #[default]
    Deny,
    Allow,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    #[default]
    Pooled,
    Request,
}

/// A configuration that could not be used, with every problem found.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}", problems.join("\n"))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

// === impl Config ===

impl Config {
    /// Reads, parses and checks a config file; the paths it names become relative to its
    /// folder.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|err| ConfigError::one(format!("{}: {err}", path.display())))?;
        let mut config = Config::parse(&text)
            .map_err(|err| ConfigError::one(format!("{}: {err}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for plugin in &mut config.plugins {
            plugin.path = base.join(&plugin.path);
        }
        if let Some(log) = &mut config.access_log.path {
            *log = base.join(&*log);
        }
        if let Some(tls) = &mut config.listener.tls {
            tls.cert_path = base.join(&tls.cert_path);
            tls.key_path = base.join(&tls.key_path);
        }
        let upstream_cas = (config.upstreams.iter_mut())
            .filter_map(|upstream| upstream.tls.as_mut()?.ca_file.as_mut());
        for ca_file in upstream_cas {
            *ca_file = base.join(&*ca_file);
        }
        Ok(config)
    }

    /// Parses and checks config text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(ConfigError::one)?;
        let problems = config.problems();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError { problems })
        }
    }

    /// Everything wrong with the references and values of a parsed config.
    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        self.listener.check(&mut problems);
        // NB: port 0 asks the system for a free port, a different one for each.
        if self.admin.address == self.listener.address && self.admin.address.port() != 0 {
            problems.push(format!(
                "admin.address {} is also the listener's: give each its own port",
                self.admin.address
            ));
        }
        if self.access_log.buffer_lines == 0 {
            problems.push("access_log: buffer_lines must be at least 1".to_string());
        }
        let upstreams = unique_names(
            "upstream",
            self.upstreams.iter().map(|u| &u.name),
            &mut problems,
        );
        let plugins = unique_names(
            "plugin",
            self.plugins.iter().map(|p| &p.name),
            &mut problems,
        );
        unique_names("route", self.routes.iter().map(|r| &r.name), &mut problems);

        for upstream in &self.upstreams {
            upstream.check(&mut problems);
        }
        for plugin in &self.plugins {
            plugin.check(&self.runtime, &mut problems);
        }
        for route in &self.routes {
            route.check(&upstreams, &plugins, &mut problems);
        }
        problems
    }
}

// === impl Listener ===

impl Listener {
    /// The smallest header limit: hyper's read buffer cannot be smaller.
    const MIN_HEADER_BYTES: usize = 8192;

    fn check(&self, problems: &mut Vec<String>) {
        if self.max_header_bytes < Self::MIN_HEADER_BYTES {
            problems.push(format!(
                "listener: max_header_bytes must be at least {}",
                Self::MIN_HEADER_BYTES
            ));
        }
        if self.max_uri_bytes == 0 {
            problems.push("listener: max_uri_bytes must be at least 1".to_string());
        }
        if self.max_uri_bytes > self.max_header_bytes {
            // The request line is part of the header section: hyper would answer 431 first.
            problems.push(format!(
                "listener: max_uri_bytes ({}) must not exceed max_header_bytes ({}): a longer \
                 request target would be refused as a header section over the limit (431), not \
                 as a target over its own (414)",
                self.max_uri_bytes, self.max_header_bytes
            ));
        }
    }
}

// === impl Plugin ===

impl Plugin {
    fn check(&self, runtime: &Runtime, problems: &mut Vec<String>) {
        let name = &self.name;
        if self.memory_limit_bytes > runtime.max_memory_bytes {
            problems.push(format!(
                "plugin `{name}`: memory_limit_bytes {} is above runtime.max_memory_bytes {}",
                self.memory_limit_bytes, runtime.max_memory_bytes
            ));
        }
        if self.max_instances == 0 {
            problems.push(format!("plugin `{name}`: max_instances must be at least 1"));
        }
        if self.fuel == 0 || self.deadline_ms.is_zero() {
            problems.push(format!(
                "plugin `{name}`: fuel and deadline_ms must be above zero"
            ));
        }
    }

    /// The plugin's `config` table as the JSON text handed to its `init`.
    pub fn config_json(&self) -> String {
        serde_json::to_string(&self.config).unwrap_or_else(|_| "{}".to_string())
    }
}

// === impl Route ===

impl Route {
    fn check(
        &self,
        upstreams: &HashSet<&str>,
        plugins: &HashSet<&str>,
        problems: &mut Vec<String>,
    ) {
        let name = &self.name;
        if !upstreams.contains(self.upstream.as_str()) {
            problems.push(format!(
                "route `{name}`: unknown upstream `{}`",
                self.upstream
            ));
        }
        for policy in &self.policies {
            if !plugins.contains(policy.as_str()) {
                problems.push(format!("route `{name}`: unknown plugin `{policy}`"));
            }
        }
        if self.max_in_flight == 0 {
            problems.push(format!("route `{name}`: max_in_flight must be at least 1"));
        }
        if let Some(llm) = &self.llm {
            llm.check(name, upstreams, problems);
        }
        if self.request_timeout_ms.is_zero() {
            problems.push(format!(
                "route `{name}`: request_timeout_ms must be above zero"
            ));
        }
        if !self.path_prefix.starts_with('/') {
            problems.push(format!("route `{name}`: path_prefix must start with `/`"));
        }
    }
}

impl ConfigError {
    pub fn one(problem: impl ToString) -> Self {
        ConfigError {
            problems: vec![problem.to_string()],
        }
    }
}

fn unique_names<'a>(
    kind: &str,
    names: impl Iterator<Item = &'a String>,
    problems: &mut Vec<String>,
) -> HashSet<&'a str> {
    let mut seen = HashSet::new();
    for name in names {
        if !seen.insert(name.as_str()) {
            problems.push(format!("{kind} `{name}` is defined twice"));
        }
    }
    seen
}

impl Default for Listener {
    fn default() -> Self {
        Listener {
            address: SocketAddr::from(([127, 0, 0, 1], 8080)),
            header_read_timeout_ms: Duration::from_secs(10),
            max_connections: 10_000,
            max_body_bytes: 10 << 20,
            shutdown_grace_ms: Duration::from_secs(30),
            // Envoy's default is 60 KiB, nginx's 32 KiB in four buffers.
            max_header_bytes: 64 << 10,
            // nginx's default buffer for a request line.
            max_uri_bytes: 8 << 10,
            trusted_proxies: Vec::new(),
            encoded_slash: EncodedSlash::Reject,
            tls: None,
        }
    }
}

impl Default for AccessLog {
    fn default() -> Self {
        AccessLog {
            enabled: false,
            path: None,
            buffer_lines: 8192,
        }
    }
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            address: SocketAddr::from(([127, 0, 0, 1], 9901)),
        }
    }
}

impl Default for Runtime {
    fn default() -> Self {
        Runtime {
            instance_slots: 256,
            max_memory_bytes: 64 << 20,
        }
    }
}

mod defaults {
    use std::time::Duration;

    pub fn fuel() -> u64 {
        // About 5 ms of straight-line guest code; a typical policy call uses about 10,000.
        5_000_000
    }
    pub fn deadline() -> Duration {
        // Wall-clock time, so it includes time the call waits for a CPU on a busy machine;
        // fuel is the limit on work done.
        Duration::from_millis(200)
    }
    pub fn memory_limit() -> u64 {
        16 << 20
    }
    pub fn max_instances() -> u32 {
        16
    }
    pub fn max_waiting() -> u32 {
        256
    }
    pub fn wait_timeout() -> Duration {
        Duration::from_secs(1)
    }
    pub fn max_uses() -> u64 {
        10_000
    }
    pub fn recycle_memory() -> u64 {
        8 << 20
    }
    pub fn plugin_config() -> toml::Table {
        toml::Table::new()
    }
    pub fn path_prefix() -> String {
        "/".to_string()
    }
    pub fn request_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn route_max_in_flight() -> u32 {
        512
    }
    pub fn max_queued() -> u32 {
        256
    }
    pub fn queue_timeout() -> Duration {
        Duration::from_secs(1)
    }
}

/// Durations written as whole milliseconds in the config.
mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    /// A week: longer durations are mistakes, and would overflow the clock's arithmetic.
    const MAX: u64 = 7 * 24 * 3600 * 1000;

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let ms = u64::deserialize(deserializer)?;
        if ms > MAX {
            return Err(serde::de::Error::custom(format!(
                "{ms} ms is more than a week; the most is {MAX}"
            )));
        }
        Ok(Duration::from_millis(ms))
    }

    /// An optional duration in milliseconds: absent is `None`.
    pub mod optional {
        use std::time::Duration;

        use serde::Deserializer;

        pub fn deserialize<'de, D: Deserializer<'de>>(
            deserializer: D,
        ) -> Result<Option<Duration>, D::Error> {
            super::deserialize(deserializer).map(Some)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [[upstreams]]
        name = "app"
        targets = ["127.0.0.1:3000"]

        [[routes]]
        name = "all"
        upstream = "app"
    "#;

    #[test]
    fn minimal_config_gets_defaults() {
        let config = Config::parse(MINIMAL).expect("valid");
        assert_eq!(config.listener.address.port(), 8080);
        assert_eq!(config.routes[0].path_prefix, "/");
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let text = format!("{MINIMAL}\ncolour = \"blue\"\n");
        let err = Config::parse(&text).expect_err("unknown key");
        let message = err.to_string();
        assert!(message.contains("colour"), "{message}");
        assert!(message.contains("line"), "{message}");
    }

    #[test]
    fn dangling_references_are_all_reported() {
        let text = MINIMAL.replace(
            "upstream = \"app\"",
            "upstream = \"nope\"\npolicies = [\"ghost\"]",
        );
        let err = Config::parse(&text).expect_err("dangling");
        assert_eq!(err.problems.len(), 2, "{err}");
    }

    #[test]
    fn an_llm_tokenizer_is_refused_or_taken_as_the_build_allows() {
        let text = format!("{MINIMAL}\n[routes.llm]\ntokenizer = \"o200k_base\"\n");
        let parsed = Config::parse(&text);
        if cfg!(feature = "exact-tokens") {
            let config = parsed.expect("valid");
            let llm = config.routes[0].llm.as_ref().expect("an LLM route");
            assert_eq!(llm.tokenizer, Tokenizer::O200kBase);
        } else {
            let message = parsed.expect_err("needs the feature").to_string();
            assert!(message.contains("exact-tokens"), "{message}");
        }
    }

    #[test]
    fn the_admin_listener_needs_its_own_address() {
        let text = format!(
            "[listener]\naddress = \"127.0.0.1:8080\"\n[admin]\naddress = \"127.0.0.1:8080\"\n{MINIMAL}"
        );
        let message = Config::parse(&text).expect_err("same address").to_string();
        assert!(message.contains("admin.address"), "{message}");
    }

    #[test]
    fn trusted_proxies_are_cidrs_or_addresses() {
        let text = format!(
            "[listener]\ntrusted_proxies = [\"10.0.0.0/8\", \"::1/128\", \"192.168.1.7/32\"]\n{MINIMAL}"
        );
        let config = Config::parse(&text).expect("valid");
        assert_eq!(config.listener.trusted_proxies.len(), 3);

        let text = format!("[listener]\ntrusted_proxies = [\"10.0.0.300/8\"]\n{MINIMAL}");
        assert!(Config::parse(&text).is_err());
    }

    #[test]
    fn a_header_limit_below_hypers_buffer_is_refused() {
        let text = format!("[listener]\nmax_header_bytes = 1024\n{MINIMAL}");
        let err = Config::parse(&text).expect_err("too small");
        assert!(err.to_string().contains("max_header_bytes"), "{err}");
    }

    #[test]
    fn a_uri_limit_over_the_header_limit_is_refused() {
        let text = format!("[listener]\nmax_header_bytes = 8192\nmax_uri_bytes = 8193\n{MINIMAL}");
        let err = Config::parse(&text).expect_err("uri over header limit");
        assert!(
            err.to_string()
                .contains("max_uri_bytes (8193) must not exceed max_header_bytes"),
            "{err}"
        );
        let text = format!("[listener]\nmax_header_bytes = 8192\nmax_uri_bytes = 8192\n{MINIMAL}");
        assert!(Config::parse(&text).is_ok());
    }

    #[test]
    fn encoded_slash_is_reject_keep_or_decode() {
        assert_eq!(
            Config::parse(MINIMAL).unwrap().listener.encoded_slash,
            EncodedSlash::Reject
        );
        for (value, expected) in [
            ("reject", EncodedSlash::Reject),
            ("keep", EncodedSlash::Keep),
            ("decode", EncodedSlash::Decode),
        ] {
            let text = format!("[listener]\nencoded_slash = \"{value}\"\n{MINIMAL}");
            assert_eq!(
                Config::parse(&text).unwrap().listener.encoded_slash,
                expected
            );
        }
        let text = format!("[listener]\nencoded_slash = \"merge\"\n{MINIMAL}");
        assert!(Config::parse(&text).is_err());
    }
}
