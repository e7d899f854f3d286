//! The gateway's Prometheus metrics, held in one registry that is passed down explicitly.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use prometheus::core::{Collector, MetricVec, MetricVecBuilder};
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::admission::GateGauges;
use crate::plugin::{Phase, PluginFailure};

/// Buckets for request and plugin durations: 50 µs to 10 s.
const DURATION_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 10.0,
];

/// Buckets for fuel used per call: 1,000 to 100 million units.
const FUEL_BUCKETS: &[f64] = &[1e3, 1e4, 3e4, 1e5, 3e5, 1e6, 3e6, 1e7, 3e7, 1e8];

/// Every metric the gateway exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Every labelled metric, so that series can be dropped by label.
    labelled: Arc<[Box<dyn Forget + Send + Sync>]>,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    rejected: IntCounterVec,
    queue_depth: IntGaugeVec,
    queue_capacity: IntGaugeVec,
    queue_wait: HistogramVec,
    in_flight: IntGaugeVec,
    upstream_in_flight: IntGaugeVec,
    upstream_requests: IntCounterVec,
    upstream_retries: IntCounterVec,
    target_healthy: IntGaugeVec,
    target_ejections: IntCounterVec,
    circuit_state: IntGaugeVec,
    circuit_transitions: IntCounterVec,
    concurrency_limit: IntGaugeVec,
    pub connections_active: IntGauge,
    llm: LlmMetrics,
    plugin_compile: Histogram,
    reloads: IntCounterVec,
    generation: IntGauge,
    last_reload_success: Gauge,
    pub connections_rejected: IntCounterVec,
    plugin_duration: HistogramVec,
    plugin_fuel: HistogramVec,
    plugin_failures: IntCounterVec,
    plugin_instances: IntGaugeVec,
    plugin_wait: HistogramVec,
    plugin_waiting: IntGaugeVec,
    plugin_recycled: IntCounterVec,
    pub access_log_dropped: IntCounter,
}

/// One route's metrics, with labels resolved once when the route is built.
#[derive(Debug, Clone)]
pub struct RouteMetrics {
    pub admission: GateGauges,
    pub queue_wait: Histogram,
}

/// One upstream's metrics; per-target series are resolved when the targets are built.
#[derive(Debug, Clone)]
pub struct UpstreamMetrics {
    pub upstream: String,
    pub bulkhead: GateGauges,
    requests: IntCounterVec,
    retries: IntCounterVec,
    target_healthy: IntGaugeVec,
    target_ejections: IntCounterVec,
    circuit_state: IntGaugeVec,
    circuit_transitions: IntCounterVec,
    concurrency_limit: IntGaugeVec,
}

/// Metrics of LLM routes, named after the OpenTelemetry GenAI conventions where one exists.
#[derive(Debug, Clone)]
pub struct LlmMetrics {
    token_usage: HistogramVec,
    time_to_first_token: HistogramVec,
    time_per_output_token: HistogramVec,
    request_duration: HistogramVec,
    pub reserved: IntGaugeVec,
    pub remaining: IntGaugeVec,
    shed: IntCounterVec,
    unparsed: IntCounterVec,
    failovers: IntCounterVec,
}

/// Buckets for token counts, as the GenAI conventions advise: 1 to 67 million, by fours.
const TOKEN_BUCKETS: &[f64] = &[
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
    16777216.0, 67108864.0,
];

/// One plugin's metrics, with labels resolved once at load time.
#[derive(Clone)]
pub struct PluginMetrics {
    plugin: String,
    failures: IntCounterVec,
    recycled: IntCounterVec,
    request_duration: Histogram,
    response_duration: Histogram,
    pub fuel: Histogram,
    pub wait: Histogram,
    pub instances_idle: IntGauge,
    pub instances_busy: IntGauge,
    pub waiting: IntGauge,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registrar::default();
        Metrics {
            requests: counter(
                &registry,
                "sluice_requests_total",
                "Requests answered, by route and status code.",
                &["route", "status"],
            ),
            request_duration: histogram(
                &registry,
                "sluice_request_duration_seconds",
                "Time from receiving a request to sending its response headers, by route.",
                &["route"],
                DURATION_BUCKETS,
            ),
            rejected: counter(
                &registry,
                "sluice_requests_rejected_total",
                "Requests the gateway refused or cut short, by route and reason.",
                &["route", "reason"],
            ),
            queue_depth: gauge(
                &registry,
                "sluice_queue_depth",
                "Requests waiting for a slot on a route.",
                &["route"],
            ),
            queue_capacity: gauge(
                &registry,
                "sluice_queue_capacity",
                "Requests that may wait for a slot on a route.",
                &["route"],
            ),
            queue_wait: histogram(
                &registry,
                "sluice_queue_wait_seconds",
                "Time a request waited for a slot on a route.",
                &["route"],
                DURATION_BUCKETS,
            ),
            in_flight: gauge(
                &registry,
                "sluice_in_flight",
                "Requests a route is serving.",
                &["route"],
            ),
            upstream_in_flight: gauge(
                &registry,
                "sluice_upstream_in_flight",
                "Requests in flight to an upstream.",
                &["upstream"],
            ),
            upstream_requests: counter(
                &registry,
                "sluice_upstream_requests_total",
                "Attempts sent to an upstream, by upstream and status code, or by what went \
                 wrong when there was no answer (connect_failed, connect_timeout, reset, \
                 timeout, bad_response).",
                &["upstream", "status"],
            ),
            upstream_retries: counter(
                &registry,
                "sluice_upstream_retries_total",
                "Attempts sent again, by upstream and the reason for the retry; \
                 reason budget_exhausted counts retries refused by the retry budget.",
                &["upstream", "reason"],
            ),
            target_healthy: gauge(
                &registry,
                "sluice_upstream_target_healthy",
                "1 while a target takes traffic; 0 while failing health checks or ejected.",
                &["upstream", "target"],
            ),
            target_ejections: counter(
                &registry,
                "sluice_upstream_target_ejections_total",
                "Times a target was set aside for failing requests.",
                &["upstream", "target"],
            ),
            circuit_state: gauge(
                &registry,
                "sluice_upstream_circuit_state",
                "An upstream's circuit breaker: 0 closed, 1 open, 2 half open.",
                &["upstream"],
            ),
            circuit_transitions: counter(
                &registry,
                "sluice_upstream_circuit_transitions_total",
                "Circuit breaker state changes, by upstream and the state entered.",
                &["upstream", "state"],
            ),
            concurrency_limit: gauge(
                &registry,
                "sluice_upstream_concurrency_limit",
                "An upstream's adaptive concurrency limit: requests it may have in flight now.",
                &["upstream"],
            ),
            connections_active: plain_gauge(
                &registry,
                "sluice_connections_active",
                "Open client connections.",
            ),
            connections_rejected: counter(
                &registry,
                "sluice_connections_rejected_total",
                "Client connections closed by the gateway before a request was read, by reason.",
                &["reason"],
            ),
            llm: LlmMetrics::new(&registry),
            plugin_compile: {
                let opts = HistogramOpts::new(
                    "sluice_plugin_compile_seconds",
                    "Time to compile and pre-link one plugin component.",
                )
                .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]);
                registry.add(Histogram::with_opts(opts).expect("valid metric"))
            },
            reloads: counter(
                &registry,
                "sluice_config_reloads_total",
                "Configuration reloads, by result (success or failure).",
                &["result"],
            ),
            generation: plain_gauge(
                &registry,
                "sluice_config_generation",
                "Generation of the configuration being served; the first is 1.",
            ),
            last_reload_success: {
                registry.add(
                    Gauge::new(
                        "sluice_config_last_reload_success_timestamp_seconds",
                        "Unix time of the last successful configuration load.",
                    )
                    .expect("valid metric"),
                )
            },
            plugin_duration: histogram(
                &registry,
                "sluice_plugin_duration_seconds",
                "Time spent in one plugin call, by plugin and phase.",
                &["plugin", "phase"],
                DURATION_BUCKETS,
            ),
            plugin_fuel: histogram(
                &registry,
                "sluice_plugin_fuel_consumed",
                "Fuel consumed by one plugin call, by plugin.",
                &["plugin"],
                FUEL_BUCKETS,
            ),
            plugin_failures: counter(
                &registry,
                "sluice_plugin_failures_total",
                "Plugin calls that failed, by plugin and reason.",
                &["plugin", "reason"],
            ),
            plugin_instances: gauge(
                &registry,
                "sluice_plugin_instances",
                "Live plugin instances, by plugin and state (idle or busy).",
                &["plugin", "state"],
            ),
            plugin_wait: histogram(
                &registry,
                "sluice_plugin_wait_seconds",
                "Time a call waited for a free plugin instance, by plugin.",
                &["plugin"],
                DURATION_BUCKETS,
            ),
            plugin_waiting: gauge(
                &registry,
                "sluice_plugin_queue_depth",
                "Calls waiting for a free plugin instance, by plugin.",
                &["plugin"],
            ),
            plugin_recycled: counter(
                &registry,
                "sluice_plugin_instances_recycled_total",
                "Plugin instances thrown away instead of reused, by plugin and reason.",
                &["plugin", "reason"],
            ),
            access_log_dropped: {
                registry.add(
                    IntCounter::new(
                        "sluice_access_log_dropped_total",
                        "Access log lines dropped because the writer had fallen behind or failed.",
                    )
                    .expect("valid metric"),
                )
            },
            labelled: registry.labelled.into_inner().into(),
            registry: registry.registry,
        }
    }

    /// Counts an answered request.
    pub fn request(&self, route: &str, status: http::StatusCode, seconds: f64) {
        self.requests
            .with_label_values(&[route, status.as_str()])
            .inc();
        self.request_duration
            .with_label_values(&[route])
            .observe(seconds);
    }

    /// Records one plugin compilation.
    pub fn plugin_compiled(&self, seconds: f64) {
        self.plugin_compile.observe(seconds);
    }

    /// Records a configuration load: the first one or a reload.
    pub fn config_loaded(&self, generation: u64) {
        self.reloads.with_label_values(&["success"]).inc();
        self.generation.set(generation as i64);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        self.last_reload_success
            .set(now.map_or(0.0, |d| d.as_secs_f64()));
    }

    /// Records a reload that was refused.
    pub fn config_refused(&self) {
        self.reloads.with_label_values(&["failure"]).inc();
    }

    /// Counts a request refused or cut short by the gateway.
    pub fn rejected(&self, route: &str, reason: &str) {
        self.rejected.with_label_values(&[route, reason]).inc();
    }

    /// The metrics of one route, with its admission queue's capacity published.
    pub fn route(&self, name: &str, queue_capacity: u32) -> RouteMetrics {
        self.queue_capacity
            .with_label_values(&[name])
            .set(i64::from(queue_capacity));
        RouteMetrics {
            admission: GateGauges {
                in_use: Some(self.in_flight.with_label_values(&[name])),
                waiting: Some(self.queue_depth.with_label_values(&[name])),
            },
            queue_wait: self.queue_wait.with_label_values(&[name]),
        }
    }

    /// The metrics of one upstream; its bulkhead has no wait line.
    pub fn upstream(&self, name: &str) -> UpstreamMetrics {
        UpstreamMetrics {
            upstream: name.to_string(),
            bulkhead: GateGauges {
                in_use: Some(self.upstream_in_flight.with_label_values(&[name])),
                waiting: None,
            },
            requests: self.upstream_requests.clone(),
            retries: self.upstream_retries.clone(),
            target_healthy: self.target_healthy.clone(),
            target_ejections: self.target_ejections.clone(),
            circuit_state: self.circuit_state.clone(),
            circuit_transitions: self.circuit_transitions.clone(),
            concurrency_limit: self.concurrency_limit.clone(),
        }
    }

    /// The metrics of LLM routes.
    pub fn llm(&self) -> &LlmMetrics {
        &self.llm
    }

    /// The metrics of one plugin.
    pub fn plugin(&self, name: &str) -> PluginMetrics {
        PluginMetrics {
            plugin: name.to_string(),
            failures: self.plugin_failures.clone(),
            recycled: self.plugin_recycled.clone(),
            request_duration: self.plugin_duration.with_label_values(&[name, "request"]),
            response_duration: self.plugin_duration.with_label_values(&[name, "response"]),
            fuel: self.plugin_fuel.with_label_values(&[name]),
            wait: self.plugin_wait.with_label_values(&[name]),
            instances_idle: self.plugin_instances.with_label_values(&[name, "idle"]),
            instances_busy: self.plugin_instances.with_label_values(&[name, "busy"]),
            waiting: self.plugin_waiting.with_label_values(&[name]),
        }
    }

    /// Drops every series whose label `label` is `value`, in every metric that has that
    /// label: what a reload does for the routes, upstreams, plugins and LLM deployments it
    /// removed, so that they stop being exported with their last values.
    pub fn forget(&self, label: &str, value: &str) {
        for metric in self.labelled.iter() {
            metric.forget(&[(label, value)]);
        }
    }

    /// Drops the series of one target of an upstream that is still configured.
    pub fn forget_target(&self, upstream: &str, target: &str) {
        let series = [("upstream", upstream), ("target", target)];
        self.target_healthy.forget(&series);
        self.target_ejections.forget(&series);
    }

    /// Drops the circuit breaker series of an upstream that no longer has a breaker.
    pub fn forget_circuit(&self, upstream: &str) {
        self.circuit_state.forget(&[("upstream", upstream)]);
        self.circuit_transitions.forget(&[("upstream", upstream)]);
    }

    /// Drops the adaptive limit series of an upstream that no longer has one.
    pub fn forget_concurrency_limit(&self, upstream: &str) {
        self.concurrency_limit.forget(&[("upstream", upstream)]);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // NB: encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

// === impl LlmMetrics ===

impl LlmMetrics {
    fn new(registry: &Registrar) -> LlmMetrics {
        let model = &["gen_ai_request_model", "gen_ai_provider_name"];
        LlmMetrics {
            token_usage: histogram(
                registry,
                "gen_ai_client_token_usage",
                "Tokens used by one LLM request, by token type (input or output), requested \
                 model and provider.",
                &[
                    "gen_ai_token_type",
                    "gen_ai_request_model",
                    "gen_ai_provider_name",
                ],
                TOKEN_BUCKETS,
            ),
            time_to_first_token: histogram(
                registry,
                "gen_ai_server_time_to_first_token_seconds",
                "Time from sending an LLM request upstream to the first piece of its answer.",
                model,
                DURATION_BUCKETS,
            ),
            time_per_output_token: histogram(
                registry,
                "gen_ai_server_time_per_output_token_seconds",
                "Time per output token after the first, in a streamed LLM answer.",
                model,
                DURATION_BUCKETS,
            ),
            request_duration: histogram(
                registry,
                "gen_ai_server_request_duration_seconds",
                "Time from sending an LLM request upstream to the end of its answer.",
                model,
                DURATION_BUCKETS,
            ),
            reserved: gauge(
                registry,
                "sluice_llm_reserved_tokens",
                "Tokens reserved by LLM requests in flight, by route.",
                &["route"],
            ),
            remaining: gauge(
                registry,
                "sluice_llm_upstream_remaining_tokens",
                "Tokens a deployment has left, from its provider's rate-limit headers, less \
                 what requests in flight have reserved.",
                &["deployment"],
            ),
            shed: counter(
                registry,
                "sluice_llm_shed_total",
                "LLM requests answered 429 before reaching a provider, by reason \
                 (consumer_budget, provider_budget).",
                &["reason"],
            ),
            unparsed: counter(
                registry,
                "sluice_llm_unparsed_requests_total",
                "LLM requests whose body could not be read as JSON with a model; they pass \
                 through unchanged.",
                &["route"],
            ),
            failovers: counter(
                registry,
                "sluice_llm_failovers_total",
                "LLM requests moved off a deployment before the first byte, by deployment and \
                 reason.",
                &["deployment", "reason"],
            ),
        }
    }

    pub fn shed(&self, reason: &str) {
        self.shed.with_label_values(&[reason]).inc();
    }

    pub fn unparsed(&self, route: &str) {
        self.unparsed.with_label_values(&[route]).inc();
    }

    pub fn failover(&self, deployment: &str, reason: &str) {
        self.failovers
            .with_label_values(&[deployment, reason])
            .inc();
    }

    /// Records a finished LLM answer: token counts and timings.
    pub fn answered(&self, model: &str, provider: &str, usage: LlmUsage) {
        let labels = [model, provider];
        for (kind, tokens) in [("input", usage.input), ("output", usage.output)] {
            if let Some(tokens) = tokens {
                self.token_usage
                    .with_label_values(&[kind, model, provider])
                    .observe(tokens as f64);
            }
        }
        if let Some(first) = usage.first_token {
            self.time_to_first_token
                .with_label_values(&labels)
                .observe(first.as_secs_f64());
            if let Some(output) = usage.output.filter(|&n| n > 1) {
                let rest = usage.duration.saturating_sub(first).as_secs_f64();
                self.time_per_output_token
                    .with_label_values(&labels)
                    .observe(rest / (output - 1) as f64);
            }
        }
        self.request_duration
            .with_label_values(&labels)
            .observe(usage.duration.as_secs_f64());
    }
}

/// What one LLM answer used and how long it took.
#[derive(Debug, Clone, Copy, Default)]
pub struct LlmUsage {
    pub input: Option<u64>,
    pub output: Option<u64>,
    pub first_token: Option<std::time::Duration>,
    pub duration: std::time::Duration,
}

// === impl UpstreamMetrics ===

impl UpstreamMetrics {
    /// Counts one attempt by its status code or what went wrong.
    pub fn attempt(&self, status: &str) {
        self.requests
            .with_label_values(&[&self.upstream, status])
            .inc();
    }

    pub fn retry(&self, reason: &str) {
        self.retries
            .with_label_values(&[&self.upstream, reason])
            .inc();
    }

    /// The health gauge of one target.
    pub fn target_healthy(&self, target: &str) -> IntGauge {
        self.target_healthy
            .with_label_values(&[&self.upstream, target])
    }

    pub fn ejected(&self, target: &str) {
        self.target_ejections
            .with_label_values(&[&self.upstream, target])
            .inc();
    }

    /// The gauge of the upstream's adaptive concurrency limit; only upstreams that have one
    /// get the series.
    pub fn concurrency_limit(&self) -> IntGauge {
        self.concurrency_limit.with_label_values(&[&self.upstream])
    }

    /// The gauge of the upstream's circuit breaker state; only upstreams with a breaker get
    /// the series.
    pub fn circuit_state_gauge(&self) -> IntGauge {
        self.circuit_state.with_label_values(&[&self.upstream])
    }

    /// Records the circuit breaker entering `state` (0 closed, 1 open, 2 half open).
    pub fn circuit(&self, state: i64, name: &str) {
        self.circuit_state_gauge().set(state);
        self.circuit_transitions
            .with_label_values(&[&self.upstream, name])
            .inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl PluginMetrics {
    pub fn duration(&self, phase: Phase) -> &Histogram {
        match phase {
            Phase::Request => &self.request_duration,
            Phase::Response => &self.response_duration,
        }
    }

    /// Counts an instance thrown away: after a failure, `max_uses`, memory growth, or because
    /// every request gets a fresh one.
    pub fn recycled(&self, reason: &str) {
        self.recycled
            .with_label_values(&[self.plugin.as_str(), reason])
            .inc();
    }

    pub fn failure(&self, failure: &PluginFailure) {
        self.failures
            .with_label_values(&[self.plugin.as_str(), failure.reason()])
            .inc();
    }
}

/// A labelled metric whose series can be dropped by some of their labels.
trait Forget {
    /// Drops every series that has all of `labels` (name and value).
    fn forget(&self, labels: &[(&str, &str)]);
}

impl<T: MetricVecBuilder> Forget for MetricVec<T> {
    fn forget(&self, labels: &[(&str, &str)]) {
        for family in self.collect() {
            for series in family.get_metric() {
                let pairs = series.get_label();
                let matches = labels.iter().all(|(name, value)| {
                    pairs
                        .iter()
                        .any(|p| p.name() == *name && p.value() == *value)
                });
                if matches {
                    let all: HashMap<&str, &str> =
                        pairs.iter().map(|p| (p.name(), p.value())).collect();
                    // NB: the series was just collected, so it exists; a concurrent removal
                    // would only make this one a no-op.
                    let _ = self.remove(&all);
                }
            }
        }
    }
}

/// Registers every metric in one registry, and keeps the labelled ones so that their series
/// can be dropped by label.
#[derive(Default)]
struct Registrar {
    registry: Registry,
    labelled: RefCell<Vec<Box<dyn Forget + Send + Sync>>>,
}

impl Registrar {
    fn add<M: Collector + Clone + 'static>(&self, metric: M) -> M {
        self.registry
            .register(Box::new(metric.clone()))
            .expect("metric names are unique");
        metric
    }

    fn add_labelled<T: MetricVecBuilder + 'static>(&self, metric: MetricVec<T>) -> MetricVec<T> {
        self.labelled.borrow_mut().push(Box::new(metric.clone()));
        self.add(metric)
    }
}

fn counter(registry: &Registrar, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    registry.add_labelled(IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
}

fn plain_gauge(registry: &Registrar, name: &str, help: &str) -> IntGauge {
    registry.add(IntGauge::new(name, help).expect("valid metric"))
}

fn gauge(registry: &Registrar, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    registry.add_labelled(IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"))
}

fn histogram(
    registry: &Registrar,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
    registry.add_labelled(HistogramVec::new(opts, labels).expect("valid metric"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forgetting_a_label_value_drops_its_series_in_every_labelled_metric() {
        let metrics = Metrics::new();
        for route in ["gone", "kept"] {
            metrics.request(route, http::StatusCode::OK, 0.01);
            metrics.rejected(route, "queue_full");
            let _ = metrics.route(route, 8);
        }
        metrics.upstream("gone").attempt("200");

        metrics.forget("route", "gone");
        metrics.forget("upstream", "gone");
        let text = metrics.render();
        assert!(!text.contains("\"gone\""), "{text}");
        for series in [
            r#"sluice_requests_total{route="kept",status="200"} 1"#,
            r#"sluice_requests_rejected_total{reason="queue_full",route="kept"} 1"#,
            r#"sluice_queue_capacity{route="kept"} 8"#,
        ] {
            assert!(text.contains(series), "{series} is gone");
        }
    }
}
