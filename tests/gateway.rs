//! A gateway started in-process from a config fragment, on free loopback ports.

use std::net::SocketAddr;
use std::path::PathBuf;

use sluice::{Config, Server};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::TestUpstream;

/// The compiled test or bundled policy called `name` (e.g. `auth`, `chaos`).
///
/// `cargo xtask test` builds them before the tests run.
pub fn plugin_path(name: &str) -> PathBuf {
    let path = target_dir()
        .join("wasm32-wasip2/plugin")
        .join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "{} is missing: run the tests with `cargo xtask test`",
        path.display()
    );
    path
}

/// The workspace's target folder.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// A running gateway; stopped when dropped.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestGateway {
    /// Starts a gateway whose config is `fragment` plus listeners on free ports and an
    /// upstream called `app` pointing at `upstream`. In `fragment`, `{plugin:NAME}` stands for
    /// the path of a compiled policy.
    pub async fn start(upstream: &TestUpstream, fragment: &str) -> TestGateway {
        Self::start_with(upstream, "", fragment).await
    }

    /// Like [`TestGateway::start`], with extra `[listener]` settings.
    pub async fn start_with(
        upstream: &TestUpstream,
        listener: &str,
        fragment: &str,
    ) -> TestGateway {
        let text = config_text_with(upstream, listener, fragment);
        let config = Config::parse(&text).expect("valid test config");
        Self::start_config(config).await.expect("gateway starts")
    }

    /// Starts a gateway from a config file that it reloads when the file changes, on
    /// `SIGHUP` and on `POST /reload`.
    pub async fn start_file(path: &std::path::Path) -> TestGateway {
        Self::run(Server::bind_file(path).await.expect("gateway starts"))
    }

    /// Starts a gateway from a complete config.
    pub async fn start_config(config: Config) -> anyhow::Result<TestGateway> {
        Ok(Self::run(Server::bind(config).await?))
    }

    fn run(server: Server) -> TestGateway {
        let (addr, admin) = (server.local_addr(), server.admin_addr());
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        TestGateway {
            addr,
            admin,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// `POST /reload` on the admin listener: its status and JSON answer.
    pub async fn reload(&self) -> (http::StatusCode, serde_json::Value) {
        let url = format!("http://{}/reload", self.admin);
        let request = http::Request::post(url)
            .body(bytes::Bytes::new())
            .expect("valid request");
        let reply = crate::send(request).await;
        (reply.status, reply.json())
    }

    /// A URL on the gateway's public listener.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The admin listener's `/metrics` text.
    pub async fn metrics(&self) -> String {
        crate::get(&format!("http://{}/metrics", self.admin))
            .await
            .text()
    }

    /// Stops accepting, drains in-flight requests and waits for the server to end.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The full config text for a test gateway.
pub fn config_text(upstream: &TestUpstream, fragment: &str) -> String {
    config_text_with(upstream, "", fragment)
}

/// The full config text for a test gateway, with extra `[listener]` settings.
pub fn config_text_with(upstream: &TestUpstream, listener: &str, fragment: &str) -> String {
    let mut fragment = fragment.to_string();
    while let Some(start) = fragment.find("{plugin:") {
        let end = start + fragment[start..].find('}').expect("closing brace");
        let name = &fragment[start + "{plugin:".len()..end];
        let path = plugin_path(name).display().to_string();
        fragment.replace_range(start..=end, &path);
    }
    format!(
        r#"
[listener]
address = "127.0.0.1:0"
shutdown_grace_ms = 2000
{listener}

[admin]
address = "127.0.0.1:0"

[runtime]
instance_slots = 64

[[upstreams]]
name = "app"
targets = ["{}"]

{fragment}
"#,
        upstream.addr
    )
}

/// The value of the metric line that starts with `series` (name and labels) in Prometheus
/// text, or 0 when there is none.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}
