//! The gateway's Prometheus metrics, held in one registry that is passed down explicitly.

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
    requests: IntCounterVec,
    request_duration: HistogramVec,
    rejected: IntCounterVec,
    queue_depth: IntGaugeVec,
    queue_capacity: IntGaugeVec,
    queue_wait: HistogramVec,
    in_flight: IntGaugeVec,
    upstream_in_flight: IntGaugeVec,
    pub connections_active: IntGauge,
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
        let registry = Registry::new();
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
            plugin_compile: {
                let opts = HistogramOpts::new(
                    "sluice_plugin_compile_seconds",
                    "Time to compile and pre-link one plugin component.",
                )
                .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]);
                let metric = Histogram::with_opts(opts).expect("valid metric");
                registry
                    .register(Box::new(metric.clone()))
                    .expect("metric names are unique");
                metric
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
                let metric = Gauge::new(
                    "sluice_config_last_reload_success_timestamp_seconds",
                    "Unix time of the last successful configuration load.",
                )
                .expect("valid metric");
                registry
                    .register(Box::new(metric.clone()))
                    .expect("metric names are unique");
                metric
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
                let metric = IntCounter::new(
                    "sluice_access_log_dropped_total",
                    "Access log lines dropped because the writer had fallen behind or failed.",
                )
                .expect("valid metric");
                registry
                    .register(Box::new(metric.clone()))
                    .expect("metric names are unique");
                metric
            },
            registry,
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

    /// The gauges of one upstream's bulkhead, which has no wait line.
    pub fn upstream(&self, name: &str) -> GateGauges {
        GateGauges {
            in_use: Some(self.upstream_in_flight.with_label_values(&[name])),
            waiting: None,
        }
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

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // NB: encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
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

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are unique");
    metric
}

fn plain_gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let metric = IntGauge::new(name, help).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are unique");
    metric
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let metric = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are unique");
    metric
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
    let metric = HistogramVec::new(opts, labels).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are unique");
    metric
}
