//! A policy built for `sluice:policy@0.1.0`, an interface version the gateway no longer
//! speaks: the gateway must refuse it and say which version it was built for.

wit_bindgen::generate!({ world: "policy", path: "wit" });

use exports::sluice::policy::handler::{Guest, HeaderChanges, RequestHead, ResponseHead};
use sluice::policy::types::{RequestChanges, RequestDecision};

pub struct Outdated;

impl Guest for Outdated {
    fn init(_config: String) -> Result<(), String> {
        Ok(())
    }

    fn on_request(_request: RequestHead) -> RequestDecision {
        RequestDecision::Continue(RequestChanges {
            headers: no_changes(),
            path_and_query: None,
        })
    }

    fn on_response(_request: RequestHead, _response: ResponseHead) -> HeaderChanges {
        no_changes()
    }
}

fn no_changes() -> HeaderChanges {
    HeaderChanges {
        remove: Vec::new(),
        set: Vec::new(),
        add: Vec::new(),
    }
}

// Component exports exist only in the WebAssembly build.
#[cfg(target_arch = "wasm32")]
export!(Outdated);
