//! Write policies for the Sluice gateway in Rust.
//!
//! A policy is a small program that the gateway runs on every request of the routes that list
//! it: it can check the request and answer it directly (an authentication failure, a rate
//! limit), change its headers and path before it goes upstream, and change the headers of the
//! upstream's response. Policies are compiled to WebAssembly components for the
//! `wasm32-wasip2` target and run sandboxed: each call has a fuel budget, a wall-clock
//! deadline and a memory cap, and a policy can reach nothing outside the request it is given
//! and the host functions in this crate (logging, a clock and a shared rate limiter).
//!
//! # Writing a policy
//!
//! A policy crate is a `cdylib` that depends on this crate. It defines a type, implements
//! [`Policy`] for it, and exports it with [`export_policy!`]:
//!
//! ```
//! use sluice_sdk::{Config, Decision, Phases, Policy, Reply, Request, RequestChanges};
//!
//! #[derive(serde::Deserialize)]
//! struct Settings {
//!     header: String,
//! }
//!
//! struct RequireHeader {
//!     header: String,
//! }
//!
//! impl Policy for RequireHeader {
//!     // Only requests: the gateway skips this policy on the way back.
//!     const PHASES: Phases = Phases::REQUEST;
//!
//!     fn new(config: Config) -> Result<Self, String> {
//!         let settings: Settings = config.parse()?;
//!         Ok(RequireHeader { header: settings.header })
//!     }
//!
//!     fn on_request(&self, request: &Request) -> Decision {
//!         match request.header_str(&self.header) {
//!             Some(_) => RequestChanges::new().set_header("x-checked", "yes").into(),
//!             None => Reply::new(400).text("missing header\n").into(),
//!         }
//!     }
//! }
//!
//! sluice_sdk::export_policy!(RequireHeader);
//! ```
//!
//! `new` runs once per instance with the plugin's `config` table from the gateway config. An
//! error there rejects the whole gateway config at load time, so validate everything in `new`
//! rather than on each request. The gateway may keep several instances of a policy and reuse
//! each for many requests (or, with `isolation = "request"`, make a fresh one per request), so
//! a policy must not rely on state kept between requests; shared state such as rate-limit
//! buckets lives in the gateway and is reached through [`rate_limit`].
//!
//! Build it with `cargo build --target wasm32-wasip2 --release`, with a release profile that
//! optimises for size and strips the component (the gateway's README shows one; inside the
//! gateway's workspace, `--profile plugin` is that profile), and point a `[[plugins]]` entry
//! of the gateway config at the `.wasm` file.
//!
//! # Header values are bytes
//!
//! Clients may send header values that are not UTF-8. [`Request::header`] gives the raw bytes;
//! [`Request::header_str`] gives text and returns `None` for such a value instead of failing,
//! so reading headers never traps.
//!
//! # Testing without WebAssembly
//!
//! On a native target the host functions are served by the [`testing`] module, so a policy is
//! unit-tested with a plain `cargo test`: build a request with [`testing::TestRequest`], call
//! the policy's phases, and inspect the [`Decision`].
//!
//! # Failures
//!
//! A policy that panics, runs out of fuel or time, or grows its memory past the cap is stopped
//! by the gateway, which then answers 503 or skips the policy, as the plugin's `on_error`
//! setting says. Header changes are checked by the gateway: a header name that is not a valid
//! token, a value with CR, LF or NUL, or a change to a hop-by-hop or pseudo header is a policy
//! failure and nothing is forwarded.

#![deny(missing_docs)]

pub mod bindings;
mod config;
mod decision;
mod host;
mod http;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;

pub use config::Config;
pub use decision::{Decision, HeaderChanges, Reply, RequestChanges};
pub use host::{LogLevel, Quota, RateLimitOutcome, log, monotonic_now, rate_limit};
pub use http::{Request, Response};

/// The phases a policy takes part in: [`Phases::REQUEST`], [`Phases::RESPONSE`], or both
/// (`Phases::all()`). See [`Policy::PHASES`].
pub use bindings::sluice::policy::types::Phases;

/// A gateway policy.
///
/// Every phase has a default that lets the request or response through unchanged, so a policy
/// implements only the phases it needs.
pub trait Policy: Sized + 'static {
    /// The phases the gateway calls this policy in; both by default. A policy that implements
    /// only [`on_request`](Policy::on_request) should say `Phases::REQUEST`, so responses
    /// skip the call (a call costs a few microseconds); a phase left out is never called, even
    /// when implemented.
    const PHASES: Phases = Phases::all();

    /// Builds the policy from its configuration. Called once per instance, before any request.
    ///
    /// Return an error to reject the configuration; the gateway reports the message and keeps
    /// its previous configuration.
    fn new(config: Config) -> Result<Self, String>;

    /// Decides what happens to a request: continue upstream (with changes) or answer it.
    fn on_request(&self, request: &Request) -> Decision {
        let _ = request;
        Decision::proceed()
    }

    /// Changes the headers of an upstream response before it goes to the client. `request` is
    /// the request as it was forwarded.
    fn on_response(&self, request: &Request, response: &Response) -> HeaderChanges {
        let _ = (request, response);
        HeaderChanges::new()
    }
}

/// Exports a [`Policy`] implementation as the component's `sluice:policy/handler`.
///
/// Use it once per policy crate, at the crate root.
#[macro_export]
macro_rules! export_policy {
    ($policy:ty) => {
        // Exports exist only in the WebAssembly build: component export names contain `:`,
        // which native linkers refuse when a policy crate is also built as a native cdylib
        // for its unit tests.
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            ::std::thread_local! {
                static POLICY: ::std::cell::OnceCell<$policy> =
                    const { ::std::cell::OnceCell::new() };
            }

            struct SluiceExport;

            impl $crate::bindings::exports::sluice::policy::handler::Guest for SluiceExport {
                fn init(
                    config: ::std::string::String,
                ) -> ::std::result::Result<$crate::Phases, ::std::string::String> {
                    POLICY.with(|cell| $crate::__private::init::<$policy>(cell, config))
                }

                fn on_request(
                    request: $crate::bindings::sluice::policy::types::RequestHead,
                ) -> $crate::bindings::sluice::policy::types::RequestDecision {
                    POLICY.with(|cell| $crate::__private::on_request::<$policy>(cell, request))
                }

                fn on_response(
                    request: $crate::bindings::sluice::policy::types::RequestHead,
                    response: $crate::bindings::sluice::policy::types::ResponseHead,
                ) -> $crate::bindings::sluice::policy::types::HeaderChanges {
                    POLICY.with(|cell| {
                        $crate::__private::on_response::<$policy>(cell, request, response)
                    })
                }
            }

    $crate::bindings::export!(SluiceExport with_types_in $crate::bindings);
        };

        // In a native build nothing calls the policy outside its tests; this keeps it used.
        #[cfg(not(target_arch = "wasm32"))]
        const _: fn($crate::Config) -> ::std::result::Result<$policy, ::std::string::String> =
            <$policy as $crate::Policy>::new;
    };
}

#[doc(hidden)]
pub mod __private {
    //! Glue between the generated bindings and [`Policy`](crate::Policy); used by
    //! [`export_policy!`](crate::export_policy).

    use std::cell::OnceCell;

    use crate::bindings::sluice::policy::types;
    use crate::{Config, Policy, Request, Response};

    pub fn init<P: Policy>(cell: &OnceCell<P>, config: String) -> Result<crate::Phases, String> {
        let policy = P::new(Config::from_json(config))?;
        cell.set(policy)
            .map_err(|_| "the policy was initialised twice".to_string())?;
        Ok(P::PHASES)
    }

    pub fn on_request<P: Policy>(
        cell: &OnceCell<P>,
        head: types::RequestHead,
    ) -> types::RequestDecision {
        let policy = cell
            .get()
            .expect("the gateway calls init before any request");
        policy.on_request(&Request::from_head(head)).into_wit()
    }

    pub fn on_response<P: Policy>(
        cell: &OnceCell<P>,
        request: types::RequestHead,
        response: types::ResponseHead,
    ) -> types::HeaderChanges {
        let policy = cell
            .get()
            .expect("the gateway calls init before any request");
        let request = Request::from_head(request);
        policy
            .on_response(&request, &Response::from_head(response))
            .into_wit()
    }
}
