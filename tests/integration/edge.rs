//! Edge-grade HTTP: hostile framing and headers, forwarding headers and the client address,
//! request ids and traces, access logs, upgrades, streaming, HTTP/2 and TLS to upstreams, and
//! the passthrough example.
//! Most cases send raw bytes over a real socket to a gateway in front of a recording upstream.

mod access_log;
mod example;
mod forwarding;
mod framing;
mod identity;
mod streaming;
mod tls;
mod upgrade;
mod upstreams;

const PLAIN_ROUTE: &str = r#"
[[routes]]
name = "plain"
path_prefix = "/"
upstream = "app"
"#;
