//! `llmock`, a mock OpenAI- and Anthropic-compatible provider, run as a child process on a
//! free loopback port, with its control API: scripted faults and the journal of requests.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

use crate::gateway::target_dir;

/// A running llmock; killed when dropped.
pub struct Llmock {
    pub addr: SocketAddr,
    child: Child,
}

impl Llmock {
    /// Starts llmock with extra `serve` arguments (e.g. `--rpm 3`) and waits until it answers.
    pub async fn start(args: &[&str]) -> Llmock {
        let port = free_port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let child = Command::new(program())
            .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--log-level", "warning", "--tool-mode", "off"])
            .args(args)
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("llmock starts: run the tests with `cargo xtask test`, which installs it");
        let llmock = Llmock { addr, child };
        llmock.wait_until_up().await;
        llmock
    }

    async fn wait_until_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while tokio::net::TcpStream::connect(self.addr).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "llmock did not start on {}",
                self.addr
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Queues scripted behaviours (llmock's `/_llmock/scenario`).
    pub async fn script(&self, behaviors: Value) {
        let request = http::Request::post(format!("http://{}/_llmock/scenario", self.addr))
            .header("content-type", "application/json")
            .body(Bytes::from(json!({ "behaviors": behaviors }).to_string()))
            .expect("valid");
        let reply = crate::send(request).await;
        assert!(
            reply.status.is_success(),
            "scenario refused: {}",
            reply.text()
        );
    }

    /// Every request llmock served, oldest first.
    pub async fn journal(&self) -> Vec<Value> {
        let reply = crate::get(&format!("http://{}/_llmock/requests", self.addr)).await;
        reply.json()["requests"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The process id, to stop it the way it was started.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

/// The llmock executable: `SLUICE_LLMOCK`, as `cargo xtask test` sets it, or the virtualenv
/// it installs into.
fn program() -> PathBuf {
    std::env::var_os("SLUICE_LLMOCK")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("llmock-venv/bin/llmock"))
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address").port()
}
