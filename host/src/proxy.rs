//! The proxy: accept connections, match a route, run its policies, forward upstream and
//! stream the response back.

mod body;
mod forwarded;
mod framing;
mod handler;
mod headers;
mod host;
mod identity;
mod path;
mod router;
mod server;
pub mod tls;
mod upgrade;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;

pub use body::{Counted, Progress};
pub use forwarded::TrustedProxies;
pub use handler::handle;
pub use router::{Route, Router};
pub use server::{ConnectionLimits, Front, serve};

/// Errors from a streamed body, whichever side it came from.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A response body: streamed from an upstream, or written whole by the gateway or a policy.
pub type Body = BoxBody<Bytes, BoxError>;
