//! A Sluice policy that edits request and response headers and rewrites a path prefix.
//!
//! ```toml
//! [request]
//! set = { "x-env" = "demo" }      # replaces every value the request had
//! add = { "x-via" = "sluice" }    # appends a value
//! remove = ["x-internal"]
//!
//! [response]
//! set = { "cache-control" = "no-store" }
//! remove = ["server"]
//!
//! [rewrite]
//! prefix = "/api"                 # "/api/users?x=1" becomes "/v1/users?x=1"
//! replacement = "/v1"             # "/apis" is left alone: prefixes match whole segments
//! ```
//!
//! The gateway applies header edits as: removals, then sets, then adds. Header names are
//! lower-cased; a name that is not a token, a value with a control character other than tab,
//! a connection or framing header such as `transfer-encoding`, and a rewrite path with
//! characters a URL path cannot hold are refused when the config loads.

mod edits;
mod header;
mod rewrite;
#[cfg(test)]
mod tests;

use serde::Deserialize;
use sluice_sdk::{Config, Decision, HeaderChanges, Policy, Request, RequestChanges, Response};

use crate::edits::{EditSettings, HeaderEdits};
use crate::rewrite::{PrefixRewrite, RewriteSettings};

/// The policy's configuration table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default)]
    request: EditSettings,
    #[serde(default)]
    response: EditSettings,
    rewrite: Option<RewriteSettings>,
}

/// The transform policy.
#[derive(Debug)]
pub struct Transform {
    request: HeaderEdits,
    response: HeaderEdits,
    rewrite: Option<PrefixRewrite>,
}

// === impl Transform ===

impl Policy for Transform {
    fn new(config: Config) -> Result<Self, String> {
        let settings: Settings = config.parse()?;
        let transform = Transform {
            request: HeaderEdits::new(settings.request, "request")?,
            response: HeaderEdits::new(settings.response, "response")?,
            rewrite: settings.rewrite.map(PrefixRewrite::new).transpose()?,
        };

        // An empty transform is almost surely a config written under the wrong table.
        if transform.request.is_empty()
            && transform.response.is_empty()
            && transform.rewrite.is_none()
        {
            return Err("nothing to do: configure [request], [response] or [rewrite]".to_string());
        }
        Ok(transform)
    }

    fn on_request(&self, request: &Request) -> Decision {
        let path_and_query = self
            .rewrite
            .as_ref()
            .and_then(|rewrite| rewrite.apply(request.path_and_query()));
        RequestChanges {
            headers: self.request.changes(),
            path_and_query,
        }
        .into()
    }

    fn on_response(&self, _request: &Request, _response: &Response) -> HeaderChanges {
        self.response.changes()
    }
}

sluice_sdk::export_policy!(Transform);
