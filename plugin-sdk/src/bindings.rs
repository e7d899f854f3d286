//! Bindings generated from the `sluice:policy` WIT package.
//!
//! Policy authors do not need these: the rest of the SDK wraps them. They are public so that
//! the [`export_policy!`](crate::export_policy) macro can reach them from a policy crate.

#![allow(missing_docs)]
#![allow(unsafe_code)]

wit_bindgen::generate!({
    world: "policy",
    path: "../wit",
    pub_export_macro: true,
    default_bindings_module: "::sluice_sdk::bindings",
    export_macro_name: "export",
});
