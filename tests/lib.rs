//! Helpers for the integration tests: a recording upstream, a gateway started from a config
//! fragment, paths of the compiled test policies, and a small HTTP client.

pub mod client;
pub mod faulty;
pub mod gateway;
pub mod llmock;
pub mod process;
pub mod upstream;

pub use client::{RawConnection, RawResponse, Reply, get, in_flight_get, send, send_raw};
pub use gateway::{TestGateway, metric, plugin_path, target_dir};
pub use upstream::{Recorded, TestUpstream};
