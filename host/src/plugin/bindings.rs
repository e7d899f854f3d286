//! Host bindings for the `sluice:policy` WIT world.
//!
//! `bindgen!` generates, from `wit/policy.wit`:
//! - `Policy` and `PolicyPre`: the instantiated world and its pre-linked form, with
//!   `sluice_policy_handler()` giving typed, async `call_init`, `call_on_request` and
//!   `call_on_response` functions;
//! - `sluice::policy::types`: the records passed across the boundary (`RequestHead`,
//!   `RequestDecision`, `HeaderChanges`, ...);
//! - `sluice::policy::host::Host`: the trait the gateway implements for the functions
//!   policies import (log, clock, rate limit), implemented in `host_api`.
//!
//! Exports are async so that calls run on a fiber that yields to tokio as fuel is consumed;
//! imports are cheap and synchronous.

#![allow(unsafe_code)] // NB: generated lifting and lowering code implements unsafe traits.

wasmtime::component::bindgen!({
    world: "policy",
    path: "../wit",
    exports: { default: async },
});

pub use self::sluice::policy::{host, types};
