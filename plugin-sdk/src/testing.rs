//! A native test harness: unit-test a policy with `cargo test`, without WebAssembly.
//!
//! ```
//! use sluice_sdk::testing::{TestRequest, instantiate};
//! use sluice_sdk::{Config, Decision, Policy, Request};
//!
//! struct Deny;
//! impl Policy for Deny {
//!     fn new(_: Config) -> Result<Self, String> { Ok(Deny) }
//!     fn on_request(&self, _: &Request) -> Decision {
//!         sluice_sdk::Reply::new(403).into()
//!     }
//! }
//!
//! let policy: Deny = instantiate("{}").unwrap();
//! let request = TestRequest::get("/anything").header("x-api-key", "k").build();
//! assert!(matches!(policy.on_request(&request), Decision::Respond(r) if r.status == 403));
//! ```
//!
//! The host functions behave as in the gateway: [`rate_limit`](crate::rate_limit) uses the
//! same algorithm (GCRA) with state shared by the whole test process, and
//! [`log`](crate::log) records are kept per thread and read with [`take_logs`].

use crate::bindings::sluice::policy::types::{RequestHead, ResponseHead};
use crate::http::{pack, push};
use crate::{Config, LogLevel, Policy, Request, Response};

/// Builds a policy from configuration JSON, as the gateway does when it loads a plugin.
pub fn instantiate<P: Policy>(config_json: &str) -> Result<P, String> {
    P::new(Config::from_json(config_json))
}

/// The log records the current thread's policy calls wrote, oldest first; clears them.
pub fn take_logs() -> Vec<(LogLevel, String)> {
    native::LOGS.with(|logs| std::mem::take(&mut *logs.borrow_mut()))
}

/// A request for tests, built step by step.
#[derive(Debug, Clone)]
pub struct TestRequest {
    head: RequestHead,
}

impl TestRequest {
    /// A request with this method and path, from `127.0.0.1` on route `test`.
    pub fn new(method: &str, path_and_query: &str) -> Self {
        TestRequest {
            head: RequestHead {
                method: method.to_string(),
                path_and_query: path_and_query.to_string(),
                headers: pack([]),
                client_addr: "127.0.0.1".to_string(),
                route: "test".to_string(),
            },
        }
    }

    /// A `GET` request.
    pub fn get(path_and_query: &str) -> Self {
        Self::new("GET", path_and_query)
    }

    /// Adds a header; the name is lower-cased as the gateway does.
    pub fn header(mut self, name: &str, value: impl Into<Vec<u8>>) -> Self {
        push(&mut self.head.headers, name, &value.into());
        self
    }

    /// Sets the client address.
    pub fn client_addr(mut self, addr: &str) -> Self {
        self.head.client_addr = addr.to_string();
        self
    }

    /// Sets the route name.
    pub fn route(mut self, route: &str) -> Self {
        self.head.route = route.to_string();
        self
    }

    /// The finished request.
    pub fn build(self) -> Request {
        Request::from_head(self.head)
    }
}

/// A response for tests.
pub fn response(status: u16, headers: &[(&str, &str)]) -> Response {
    Response::from_head(ResponseHead {
        status,
        headers: pack(headers.iter().map(|(n, v)| (*n, v.as_bytes()))),
    })
}

pub(crate) mod native {
    //! Native stand-ins for the gateway's host functions.

    use std::cell::RefCell;
    use std::sync::OnceLock;
    use std::time::Instant;

    use sluice_ratelimit::Buckets;

    use crate::{LogLevel, Quota, RateLimitOutcome};

    thread_local! {
        pub(super) static LOGS: RefCell<Vec<(LogLevel, String)>> = const { RefCell::new(Vec::new()) };
    }

    pub(crate) fn log(level: LogLevel, message: &str, fields: &[(&str, &str)]) {
        let mut line = message.to_string();
        for (key, value) in fields {
            line.push_str(&format!(" {key}={value}"));
        }
        LOGS.with(|logs| logs.borrow_mut().push((level, line)));
    }

    pub(crate) fn monotonic_now() -> u64 {
        static START: OnceLock<Instant> = OnceLock::new();
        START.get_or_init(Instant::now).elapsed().as_nanos() as u64
    }

    pub(crate) fn rate_limit(bucket: &str, key: &str, quota: Quota, cost: u32) -> RateLimitOutcome {
        static BUCKETS: OnceLock<Buckets> = OnceLock::new();
        BUCKETS
            .get_or_init(Buckets::new)
            .check(bucket, key, quota, cost)
    }
}
