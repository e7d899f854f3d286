//! Route matching: by host, then by the longest path prefix.

use std::sync::Arc;
use std::time::Duration;

use crate::admission::Gate;
use crate::llm::LlmRoute;
use crate::metrics::{Metrics, RouteMetrics};
use crate::plugin::Plugin;
use crate::upstream::Upstream;

/// A route, resolved against its upstream and plugins.
#[derive(Debug)]
pub struct Route {
    pub name: Arc<str>,
    host: HostPattern,
    path_prefix: String,
    pub upstream: Arc<Upstream>,
    pub policies: Vec<Arc<Plugin>>,
    pub request_timeout: Duration,
    /// Whether the upstream may retry this route's requests whatever their method.
    pub retry_non_idempotent: bool,
    /// Token budgets and model deployments, for an LLM route.
    pub llm: Option<Arc<LlmRoute>>,
    /// The route's in-flight slots and wait queue; kept across reloads that leave its limits
    /// unchanged.
    pub admission: Arc<Gate>,
    pub metrics: RouteMetrics,
}

/// The routes of one configuration, in match order.
#[derive(Debug, Default)]
pub struct Router {
    routes: Vec<Route>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum HostPattern {
    /// Exact host names sort first: they are the most specific.
    Exact(String),
    /// `*.example.com`, stored as `.example.com`.
    Suffix(String),
    Any,
}

impl Route {
    pub fn new(
        settings: &crate::config::Route,
        upstream: Arc<Upstream>,
        policies: Vec<Arc<Plugin>>,
        admission: Option<Arc<Gate>>,
        llm: Option<Arc<LlmRoute>>,
        metrics: &Metrics,
    ) -> Route {
        let metrics = metrics.route(&settings.name, settings.max_queued);
        let admission = admission.unwrap_or_else(|| {
            let gate = Gate::new(
                settings.max_in_flight,
                settings.max_queued,
                settings.queue_timeout_ms,
            );
            Arc::new(gate.with_gauges(metrics.admission.clone()))
        });
        Route {
            name: Arc::from(settings.name.as_str()),
            host: HostPattern::parse(settings.host.as_deref()),
            path_prefix: settings.path_prefix.clone(),
            upstream,
            policies,
            request_timeout: settings.request_timeout_ms,
            retry_non_idempotent: settings.retry_non_idempotent,
            llm,
            admission,
            metrics,
        }
    }
}

impl Router {
    pub fn new(mut routes: Vec<Route>) -> Router {
        // Most specific host first; within a host, longest prefix first.
        routes.sort_by(|a, b| {
            a.host
                .cmp(&b.host)
                .then_with(|| b.path_prefix.len().cmp(&a.path_prefix.len()))
        });
        Router { routes }
    }

    /// Every route, in match order.
    pub fn routes(&self) -> impl Iterator<Item = &Route> {
        self.routes.iter()
    }

    /// The route for a request to `host` (port and case ignored) and `path`.
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<&Route> {
        let host = host.map(strip_port).unwrap_or("");
        self.routes
            .iter()
            .find(|route| route.host.matches(host) && path.starts_with(&route.path_prefix))
    }
}

impl HostPattern {
    fn parse(host: Option<&str>) -> HostPattern {
        match host.map(str::to_ascii_lowercase) {
            None => HostPattern::Any,
            Some(host) if host == "*" => HostPattern::Any,
            Some(host) => match host.strip_prefix('*') {
                Some(suffix) => HostPattern::Suffix(suffix.to_string()),
                None => HostPattern::Exact(host),
            },
        }
    }

    fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(name) => name.eq_ignore_ascii_case(host),
            HostPattern::Suffix(suffix) => {
                host.len() > suffix.len()
                    && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
            }
            HostPattern::Any => true,
        }
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // An IPv6 literal: `[::1]:8080`.
        return host
            .split_once(']')
            .map_or(host, |(addr, _)| &host[..addr.len() + 1]);
    }
    host.rsplit_once(':').map_or(host, |(name, _)| name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_match_exactly_or_by_suffix() {
        let exact = HostPattern::parse(Some("api.example.com"));
        let wildcard = HostPattern::parse(Some("*.example.com"));
        assert!(exact.matches("API.example.com"));
        assert!(wildcard.matches("a.example.com"));
        assert!(!wildcard.matches("example.com"));
        assert!(!wildcard.matches("a.example.org"));
        assert_eq!(strip_port("example.com:8080"), "example.com");
        assert_eq!(strip_port("[::1]:8080"), "[::1]");
    }

    #[test]
    fn specific_hosts_sort_before_wildcards() {
        let mut patterns = [
            HostPattern::Any,
            HostPattern::parse(Some("*.a")),
            HostPattern::parse(Some("b")),
        ];
        patterns.sort();
        assert_eq!(patterns[0], HostPattern::Exact("b".into()));
        assert_eq!(patterns[2], HostPattern::Any);
    }
}
