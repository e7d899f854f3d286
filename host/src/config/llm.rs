//! `[routes.llm]`: a route that serves LLM APIs (OpenAI chat completions and Responses,
//! Anthropic messages) with token budgets, provider deployments and failover.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde::Deserialize;

use super::millis;

/// What makes a route an LLM route.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Llm {
    /// The largest request body read to find the model and output cap; larger ones get 413.
    #[serde(default = "defaults::max_request_bytes")]
    pub max_request_bytes: u64,
    /// How a prompt's tokens are estimated: `"bytes"` (a quarter of the body's bytes, the
    /// default), or with an OpenAI tokenizer over the prompt's text, `"o200k_base"` or
    /// `"cl100k_base"` (in gateways built with the `exact-tokens` feature).
    #[serde(default)]
    pub tokenizer: Tokenizer,
    /// The output cap assumed for a request that sets none.
    #[serde(default = "defaults::default_max_tokens")]
    pub default_max_tokens: u64,
    /// Whose token budget a request spends: `"client_address"` or `{ header = "x-api-key" }`.
    #[serde(default)]
    pub consumer: Consumer,
    /// Tokens each consumer may spend per minute on each model; absent for no limit.
    #[serde(default)]
    pub consumer_tokens_per_minute: Option<u64>,
    /// Time from sending the request to the first byte of the response body.
    #[serde(default = "defaults::first_byte_timeout", with = "millis")]
    pub first_byte_timeout_ms: Duration,
    /// The longest pause between two pieces of a streamed response.
    #[serde(default = "defaults::idle_timeout", with = "millis")]
    pub idle_timeout_ms: Duration,
    /// A cap on a whole answer, streams included; absent for none (the default: long
    /// generations are bounded by the idle timeout instead).
    #[serde(default, with = "millis::optional")]
    pub total_timeout_ms: Option<Duration>,
    /// How long a request may wait for a deployment with budget left; then 429.
    #[serde(default = "defaults::budget_wait", with = "millis")]
    pub budget_wait_ms: Duration,
    /// Public model names and the deployments that serve them. A request for a model not
    /// listed goes to the route's `upstream` unchanged.
    #[serde(default)]
    pub models: Vec<Model>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tokenizer {
    #[default]
    Bytes,
    O200kBase,
    Cl100kBase,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Consumer {
    #[default]
    ClientAddress,
    Header(String),
}

/// A public model name and its deployments.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Model {
    pub name: String,
    pub deployments: Vec<Deployment>,
}

/// One place a model is served: an upstream, the provider's name for the model, and the
/// credential to send.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deployment {
    /// Names the deployment in metrics and logs; defaults to `upstream/model`.
    #[serde(default)]
    pub name: Option<String>,
    pub upstream: String,
    /// The model name the provider knows.
    pub model: String,
    #[serde(default)]
    pub provider: Provider,
    #[serde(default = "defaults::weight")]
    pub weight: u32,
    /// Environment variable holding the API key, sent as the provider expects it
    /// (`Authorization: Bearer` for OpenAI, `x-api-key` for Anthropic) in place of the
    /// client's. Without it the client's credential passes through.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// How long a deployment is left alone after a 429, 5xx or failed connect that gave no
    /// `Retry-After`.
    #[serde(default = "defaults::cooldown", with = "millis")]
    pub cooldown_ms: Duration,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Provider {
    #[default]
    Openai,
    Anthropic,
}

// === impl Llm ===

impl Llm {
    pub(super) fn check(&self, route: &str, upstreams: &HashSet<&str>, problems: &mut Vec<String>) {
        let mut names = HashSet::new();
        // A deployment listed under several models is one account: one label, one deployment.
        let mut deployments: HashMap<String, &Deployment> = HashMap::new();
        for model in &self.models {
            if model.name.is_empty() {
                problems.push(format!("route `{route}`: a model has an empty name"));
            }
            if !names.insert(model.name.as_str()) {
                problems.push(format!(
                    "route `{route}`: model `{}` is listed twice",
                    model.name
                ));
            }
            if model.deployments.is_empty() {
                problems.push(format!(
                    "route `{route}`: model `{}` has no deployments",
                    model.name
                ));
            }
            for deployment in &model.deployments {
                if !upstreams.contains(deployment.upstream.as_str()) {
                    problems.push(format!(
                        "route `{route}`: model `{}`: unknown upstream `{}`",
                        model.name, deployment.upstream
                    ));
                }
                if !(1..=1000).contains(&deployment.weight) {
                    problems.push(format!(
                        "route `{route}`: model `{}`: weights must be from 1 to 1000",
                        model.name
                    ));
                }
                if deployment.cooldown_ms.is_zero() {
                    problems.push(format!(
                        "route `{route}`: model `{}`: cooldown_ms must be above zero",
                        model.name
                    ));
                }
                let label = deployment.label();
                match deployments.get(&label) {
                    Some(seen) if !seen.same_account(deployment) => problems.push(format!(
                        "route `{route}`: deployment name `{label}` names two different \
                         deployments (upstream, model, provider or api_key_env differ)"
                    )),
                    _ => {
                        deployments.insert(label, deployment);
                    }
                }
            }
        }
        if self.default_max_tokens == 0 {
            problems.push(format!(
                "route `{route}`: default_max_tokens must be above zero"
            ));
        }
        if self.total_timeout_ms.is_some_and(|total| total.is_zero()) {
            problems.push(format!(
                "route `{route}`: total_timeout_ms must be above zero (leave it out for none)"
            ));
        }
        if self.max_request_bytes == 0
            || self.first_byte_timeout_ms.is_zero()
            || self.idle_timeout_ms.is_zero()
        {
            problems.push(format!(
                "route `{route}`: max_request_bytes, first_byte_timeout_ms and idle_timeout_ms \
                 must be above zero"
            ));
        }
        if let Consumer::Header(name) = &self.consumer
            && http::HeaderName::from_bytes(name.as_bytes()).is_err()
        {
            problems.push(format!(
                "route `{route}`: consumer header `{name}` is not a header name"
            ));
        }
        if self.tokenizer != Tokenizer::Bytes && !cfg!(feature = "exact-tokens") {
            problems.push(format!(
                "route `{route}`: tokenizer = \"{}\" needs a gateway built with the \
                 `exact-tokens` feature (cargo build -p sluice --features exact-tokens)",
                self.tokenizer.as_str()
            ));
        }
        if self.consumer_tokens_per_minute == Some(0) {
            problems.push(format!(
                "route `{route}`: consumer_tokens_per_minute must be above zero"
            ));
        }
    }
}

impl Deployment {
    /// Whether `other` is the same account with its provider (its weight aside).
    fn same_account(&self, other: &Deployment) -> bool {
        (
            &self.upstream,
            &self.model,
            self.provider,
            &self.api_key_env,
        ) == (
            &other.upstream,
            &other.model,
            other.provider,
            &other.api_key_env,
        )
    }

    pub fn label(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("{}/{}", self.upstream, self.model))
    }
}

impl Tokenizer {
    pub fn as_str(self) -> &'static str {
        match self {
            Tokenizer::Bytes => "bytes",
            Tokenizer::O200kBase => "o200k_base",
            Tokenizer::Cl100kBase => "cl100k_base",
        }
    }
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Openai => "openai",
            Provider::Anthropic => "anthropic",
        }
    }
}

mod defaults {
    use std::time::Duration;

    pub fn max_request_bytes() -> u64 {
        1 << 20
    }
    pub fn default_max_tokens() -> u64 {
        1024
    }
    pub fn first_byte_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub fn idle_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn budget_wait() -> Duration {
        Duration::from_secs(5)
    }
    pub fn weight() -> u32 {
        1
    }
    pub fn cooldown() -> Duration {
        Duration::from_secs(10)
    }
}
