//! LLM routes: token-aware admission, provider deployments with failover, and metered
//! streams.
//!
//! A request to an LLM API path is read (up to a size cap) for its model, stream flag and
//! output cap. Its token estimate (the prompt's tokens, see [`tokens`], plus the output cap
//! for every answer asked for) is reserved from the consumer's budget before anything is sent;
//! when it does not fit, the answer is 429 at once. The request goes to a deployment of its
//! model that has budget left by its provider's rate-limit headers; when none has, it waits
//! (up to `budget_wait_ms`) for the earliest reset, then gets 429. Before the answer's first
//! byte, a 429, 5xx or failed connect cools the deployment down and the next one is tried.
//! The answer streams back through [`stream::Metered`], which settles the reservation to the
//! real usage.

mod budget;
mod deployment;
mod request;
mod stream;
mod tokens;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use xxhash_rust::xxh3::xxh3_64;

use crate::config::{self, Consumer, Provider, Tokenizer};
use crate::metrics::LlmMetrics;
use crate::proxy::Body;
use crate::upstream::{ClientBody, Lease, Outgoing, Upstream, UpstreamError};
use budget::{Charge, ConsumerBudgets, Refusal};
use deployment::{Deployment, retry_after};
use request::{Api, LlmRequest};
use stream::{Account, Metered};

/// A request header through which a policy may replace the gateway's token estimate for an
/// LLM request. A client's own is removed before the policies run, and the header is never
/// sent upstream.
pub const ESTIMATE_HEADER: &str = "x-sluice-llm-estimate";

/// Bodies up to this size are run through a tokenizer on the async worker that read them.
const INLINE_TOKENIZER_BYTES: usize = 16 << 10;

/// An LLM route's settings, its models' deployments and its consumers' budgets.
#[derive(Debug)]
pub struct LlmRoute {
    settings: config::Llm,
    models: HashMap<String, Vec<Arc<Deployment>>>,
    budgets: Option<Arc<ConsumerBudgets>>,
    metrics: LlmMetrics,
}

/// Why an LLM request was answered by the gateway.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error("the consumer's token budget is spent for now")]
    ConsumerBudget(Duration),
    #[error("the request's token estimate is larger than a whole minute of its budget")]
    OverBudget,
    #[error("every deployment of the model is out of budget or cooling down")]
    ProviderBudget(Duration),
    #[error(
        "the request's token estimate is larger than a whole window of every deployment's provider limit"
    )]
    OverProviderLimit,
    #[error("the request body is larger than the route reads")]
    BodyTooLarge,
    #[error("the client's request body broke off: {0}")]
    ClientBody(String),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
}

/// The request as it stands before it is sent.
struct Pending<'a> {
    parts: Parts,
    llm: LlmRequest,
    estimate: u64,
    route: &'a str,
    client: IpAddr,
}

// === impl LlmRoute ===

impl LlmRoute {
    pub fn new(
        route: &str,
        settings: &config::Llm,
        upstreams: &HashMap<String, Arc<Upstream>>,
        metrics: &LlmMetrics,
    ) -> LlmRoute {
        // A deployment listed under several models is one account with its provider: its
        // standing is shared.
        let mut shared: HashMap<String, Arc<Deployment>> = HashMap::new();
        let mut deployment = |d: &config::Deployment| {
            let entry = shared.entry(d.label()).or_insert_with(|| {
                // NB: the config check has resolved every deployment's upstream.
                let upstream = upstreams[&d.upstream].clone();
                Arc::new(Deployment::new(d, upstream, metrics.remaining.clone()))
            });
            entry.clone()
        };
        let models = settings
            .models
            .iter()
            .map(|model| {
                let deployments = model.deployments.iter().map(&mut deployment).collect();
                (model.name.clone(), deployments)
            })
            .collect();
        tokens::load(settings.tokenizer);
        let budgets = settings.consumer_tokens_per_minute.map(|per_minute| {
            let reserved = metrics.reserved.with_label_values(&[route]);
            Arc::new(ConsumerBudgets::new(per_minute, reserved))
        });
        LlmRoute {
            settings: settings.clone(),
            models,
            budgets,
            metrics: metrics.clone(),
        }
    }

    /// Whether the request is for an LLM API this route meters.
    pub fn applies(&self, parts: &Parts) -> bool {
        parts.method == http::Method::POST && Api::of_path(parts.uri.path()).is_some()
    }

    /// Admits, sends and meters one LLM request. Bodies that are not an LLM request, and
    /// models the route does not list, go to `fallback` unchanged.
    pub async fn forward(
        &self,
        route: &str,
        fallback: &Upstream,
        parts: Parts,
        body: ClientBody,
        client: IpAddr,
    ) -> Result<(Response<Body>, Lease), LlmError> {
        let mut parts = parts;
        let replaced = parts.headers.remove(ESTIMATE_HEADER);
        let bytes = self.read_body(body).await?;
        let api = Api::of_path(parts.uri.path());
        let parsed = match api {
            Some(api) => self.parse(api, bytes.clone()).await,
            None => None,
        };
        let Some(llm) = parsed else {
            self.metrics.unparsed(route);
            return pass_through(fallback, parts, bytes, client).await;
        };
        let Some(deployments) = self.models.get(&llm.model) else {
            return pass_through(fallback, parts, bytes, client).await;
        };

        let estimate = replaced
            .and_then(|value| value.to_str().ok()?.trim().parse().ok())
            .unwrap_or_else(|| llm.estimate(self.settings.default_max_tokens));
        let charge = self.reserve(&parts, client, &llm.model, estimate)?;
        let pending = Pending {
            parts,
            llm,
            estimate,
            route,
            client,
        };
        self.dispatch(deployments, pending, charge).await
    }

    /// Reads the request and counts its prompt: off the async workers when that means
    /// running a tokenizer over a large body.
    async fn parse(&self, api: Api, bytes: Bytes) -> Option<LlmRequest> {
        let tokenizer = self.settings.tokenizer;
        if tokenizer == Tokenizer::Bytes || bytes.len() <= INLINE_TOKENIZER_BYTES {
            return LlmRequest::parse(api, &bytes, tokenizer);
        }
        let parse = move || LlmRequest::parse(api, &bytes, tokenizer);
        tokio::task::spawn_blocking(parse).await.ok().flatten()
    }

    async fn read_body(&self, body: ClientBody) -> Result<Bytes, LlmError> {
        let limit = usize::try_from(self.settings.max_request_bytes).unwrap_or(usize::MAX);
        match Limited::new(body, limit).collect().await {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(err) if err.is::<LengthLimitError>() => Err(LlmError::BodyTooLarge),
            Err(err) => Err(LlmError::ClientBody(err.to_string())),
        }
    }

    /// Reserves the estimate from the consumer's budget, if the route has budgets.
    fn reserve(
        &self,
        parts: &Parts,
        client: IpAddr,
        model: &str,
        estimate: u64,
    ) -> Result<Option<Charge>, LlmError> {
        let Some(budgets) = &self.budgets else {
            return Ok(None);
        };
        let consumer = match &self.settings.consumer {
            Consumer::ClientAddress => xxh3_64(client.to_string().as_bytes()),
            Consumer::Header(name) => {
                let value = parts.headers.get(name).map_or(&b""[..], |v| v.as_bytes());
                xxh3_64(value)
            }
        };
        match budgets.reserve(consumer, model, estimate) {
            Ok(charge) => Ok(Some(charge)),
            Err(Refusal::Wait(wait)) => {
                self.metrics.shed("consumer_budget");
                Err(LlmError::ConsumerBudget(wait))
            }
            Err(Refusal::Never) => {
                self.metrics.shed("over_budget");
                Err(LlmError::OverBudget)
            }
        }
    }

    /// Sends to the model's deployments in turn until one answers with something other than
    /// a failure worth moving on from.
    async fn dispatch(
        &self,
        deployments: &[Arc<Deployment>],
        pending: Pending<'_>,
        charge: Option<Charge>,
    ) -> Result<(Response<Body>, Lease), LlmError> {
        let deadline = Instant::now() + self.settings.budget_wait_ms;
        let mut tried = Vec::new();
        let mut last: Option<Result<(Response<Incoming>, Lease), UpstreamError>> = None;
        loop {
            let Some(deployment) = self.pick(deployments, &tried, &pending, deadline).await? else {
                // Every deployment was tried: the last failure is the answer.
                return match last {
                    Some(Ok((response, lease))) => Ok((boxed(response), lease)),
                    Some(Err(err)) => Err(err.into()),
                    None => Err(LlmError::ProviderBudget(Duration::from_secs(1))),
                };
            };
            tried.push(deployment);
            let deployment = &deployments[deployment];
            let sent_at = Instant::now();
            let outcome = self.send(deployment, &pending).await;
            match outcome {
                Ok((response, lease)) if !worth_moving_on(response.status()) => {
                    let account = Account::new(
                        charge,
                        pending.llm.prompt_estimate(),
                        pending.llm.model.clone(),
                        deployment.settings.provider.as_str(),
                        self.metrics.clone(),
                        sent_at,
                    );
                    return Ok((self.metered(response, &pending.llm, account), lease));
                }
                Ok((response, lease)) => {
                    let reason = response.status();
                    self.metrics.failover(&deployment.label, reason.as_str());
                    deployment.cool_down(retry_after(response.headers()));
                    last = Some(Ok((response, lease)));
                }
                Err(err) => {
                    self.metrics.failover(&deployment.label, "unavailable");
                    deployment.cool_down(None);
                    last = Some(Err(err));
                }
            }
        }
    }

    /// A deployment not tried yet that has budget for the request, waiting up to `deadline`
    /// for one; `None` when every deployment has been tried.
    async fn pick(
        &self,
        deployments: &[Arc<Deployment>],
        tried: &[usize],
        pending: &Pending<'_>,
        deadline: Instant,
    ) -> Result<Option<usize>, LlmError> {
        loop {
            let now = Instant::now();
            let untried: Vec<(usize, &Arc<Deployment>)> = deployments
                .iter()
                .enumerate()
                .filter(|(index, _)| !tried.contains(index))
                .collect();
            if untried.is_empty() {
                return Ok(None);
            }
            if !untried
                .iter()
                .any(|(_, d)| d.could_ever_take(pending.estimate))
            {
                // Waiting for a reset would not help: answer now, as for a consumer budget.
                self.metrics.shed("over_provider_limit");
                return Err(LlmError::OverProviderLimit);
            }
            let mut earliest = None::<Instant>;
            let mut ready = Vec::new();
            for (index, deployment) in untried {
                match deployment.ready(pending.estimate, now) {
                    Ok(()) => ready.push((index, deployment)),
                    Err(at) => earliest = Some(earliest.map_or(at, |e| e.min(at))),
                }
            }
            if let Some(chosen) = weighted_choice(&ready) {
                return Ok(Some(chosen));
            }
            let at = earliest.unwrap_or(now);
            if at > deadline {
                self.metrics.shed("provider_budget");
                return Err(LlmError::ProviderBudget(at - now));
            }
            tokio::time::sleep_until(at.into()).await;
        }
    }

    /// Sends the request to one deployment; the answer's headers must come within the first
    /// byte timeout.
    async fn send(
        &self,
        deployment: &Arc<Deployment>,
        pending: &Pending<'_>,
    ) -> Result<(Response<Incoming>, Lease), UpstreamError> {
        let body = pending.llm.body_for(&deployment.settings.model);
        let mut request = Request::new(Outgoing::Whole(body.clone()));
        *request.method_mut() = pending.parts.method.clone();
        *request.uri_mut() = pending.parts.uri.clone();
        *request.headers_mut() = pending.parts.headers.clone();
        let headers = request.headers_mut();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        if let Some((name, value)) = &deployment.credential {
            headers.remove(header::AUTHORIZATION);
            headers.insert(name.clone(), value.clone());
        }
        if deployment.settings.provider == Provider::Anthropic {
            headers
                .entry("anthropic-version")
                .or_insert(HeaderValue::from_static("2023-06-01"));
        }

        let _claim = deployment.claim(pending.estimate);
        let sent = deployment.upstream.send(request, pending.client, false);
        let (response, lease) = tokio::time::timeout(self.settings.first_byte_timeout_ms, sent)
            .await
            .map_err(|_| UpstreamError::Timeout {
                target: authority(&deployment.upstream),
                after: self.settings.first_byte_timeout_ms,
            })??;
        deployment.observe(response.headers());
        tracing::debug!(route = pending.route, deployment = %deployment.label, status = %response.status(), "LLM answer");
        Ok((response, lease))
    }

    fn metered(
        &self,
        response: Response<Incoming>,
        llm: &LlmRequest,
        account: Account,
    ) -> Response<Body> {
        let sse = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let strip = sse && llm.needs_usage_event();
        let (mut parts, body) = response.into_parts();
        if strip {
            // The body loses an event, so a declared length would be wrong.
            parts.headers.remove(header::CONTENT_LENGTH);
        }
        let body = Metered::new(body, sse, strip, &self.settings, account);
        Response::from_parts(parts, body.boxed())
    }
}

/// Sends a request that is not metered, with its body as read, to the route's upstream.
async fn pass_through(
    upstream: &Upstream,
    parts: Parts,
    body: Bytes,
    client: IpAddr,
) -> Result<(Response<Body>, Lease), LlmError> {
    let request = Request::from_parts(parts, Outgoing::Whole(body));
    let (response, lease) = upstream.send(request, client, false).await?;
    Ok((boxed(response), lease))
}

fn boxed(response: Response<Incoming>) -> Response<Body> {
    response.map(|body| body.map_err(Into::into).boxed())
}

/// A 429, 5xx or 529 before the first byte: another deployment may do better.
fn worth_moving_on(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

/// One of the ready deployments (index and deployment), drawn in proportion to its weight.
fn weighted_choice(ready: &[(usize, &Arc<Deployment>)]) -> Option<usize> {
    let total: u32 = ready.iter().map(|(_, d)| d.settings.weight).sum();
    if total == 0 {
        return None;
    }
    let mut point = rand::random_range(0..total);
    ready.iter().find_map(|&(index, d)| {
        let hit = point < d.settings.weight;
        point = point.saturating_sub(d.settings.weight);
        hit.then_some(index)
    })
}

fn authority(upstream: &Upstream) -> http::uri::Authority {
    http::uri::Authority::from_maybe_shared(upstream.name.clone())
        .unwrap_or_else(|_| http::uri::Authority::from_static("upstream"))
}
