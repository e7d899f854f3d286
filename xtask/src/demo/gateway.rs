//! The `sluice` child process of the demo: start it, wait until it is healthy, stop it.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::Result;

const POLL_INTERVAL: Duration = Duration::from_millis(250);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Above the quickstart's `shutdown_grace_ms`, so a clean drain is never cut short.
const STOP_WITHIN: Duration = Duration::from_secs(10);

/// The running gateway. Dropping it kills the process, so an error on the way out of the demo
/// does not leave a gateway holding the ports.
pub struct Gateway {
    child: Child,
}

// === impl Gateway ===

impl Gateway {
    /// Starts `sluice run`; its log goes to this terminal.
    pub fn spawn(binary: &Path, config: &Path, root: &Path) -> Result<Self> {
        let child = Command::new(binary)
            .arg("run")
            .arg("--config")
            .arg(config)
            .current_dir(root)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|err| format!("cannot start {}: {err}", binary.display()))?;
        Ok(Gateway { child })
    }

    /// Polls the admin `/healthz` until it answers 200, the process exits, or `limit` passes.
    pub async fn wait_healthy(&mut self, admin: SocketAddr, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if is_healthy(admin).await {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                return Err(format!("the gateway exited while starting ({status})").into());
            }
            if Instant::now() >= deadline {
                let secs = limit.as_secs();
                return Err(
                    format!("http://{admin}/healthz did not answer 200 in {secs} s").into(),
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Waits for the gateway to exit by itself.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        self.child.wait().await
    }

    /// Asks the gateway to drain and stop, and kills it if it takes too long.
    pub async fn stop(&mut self) -> Result<ExitStatus> {
        self.terminate();
        if let Ok(status) = tokio::time::timeout(STOP_WITHIN, self.child.wait()).await {
            return Ok(status?);
        }

        eprintln!("xtask: the gateway did not stop within {STOP_WITHIN:?}; killing it");
        self.child.kill().await?;
        Ok(self.child.wait().await?)
    }

    /// Sends SIGTERM, the gateway's graceful shutdown signal. Through the `kill` command
    /// because the workspace denies the unsafe code that `libc::kill` needs.
    #[cfg(unix)]
    fn terminate(&mut self) {
        // NB: no pid means the child was already reaped, and the wait that follows returns.
        if let Some(pid) = self.child.id() {
            let sent = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
            if !sent.is_ok_and(|status| status.success()) {
                eprintln!("xtask: could not send SIGTERM to the gateway (pid {pid})");
            }
        }
    }

    #[cfg(not(unix))]
    fn terminate(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Whether `GET /healthz` on the admin listener answers 200. A hand-written request is enough
/// for a yes or no, and keeps an HTTP client out of this crate.
async fn is_healthy(admin: SocketAddr) -> bool {
    let probe = async {
        let mut stream = TcpStream::connect(admin).await?;
        let request =
            format!("GET /healthz HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;

        let mut status_line = [0u8; 12];
        stream.read_exact(&mut status_line).await?;
        io::Result::Ok(status_line.starts_with(b"HTTP/1.") && status_line.ends_with(b" 200"))
    };
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, probe).await,
        Ok(Ok(true))
    )
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    fn unused_port() -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
        listener.local_addr().expect("local address")
    }

    #[tokio::test]
    async fn a_gateway_that_exits_while_starting_is_reported() {
        let mut gateway = Gateway::spawn(Path::new("false"), Path::new("x"), Path::new("/"))
            .expect("spawn `false`");
        let err = gateway
            .wait_healthy(unused_port(), Duration::from_secs(10))
            .await
            .expect_err("not healthy");
        assert!(err.to_string().contains("exited while starting"), "{err}");
    }

    #[tokio::test]
    async fn stop_ends_the_process_with_sigterm() {
        let child = Command::new("sleep").arg("30").kill_on_drop(true).spawn();
        let mut gateway = Gateway {
            child: child.expect("spawn `sleep`"),
        };
        let status = gateway.stop().await.expect("stopped");
        assert!(!status.success(), "{status}");
    }

    #[tokio::test]
    async fn the_echo_upstream_passes_the_health_probe() {
        let addr = unused_port();
        let upstream = crate::demo::upstream::start(addr).await.expect("upstream");
        assert!(is_healthy(addr).await);
        upstream.abort();
        assert!(!is_healthy(unused_port()).await);
    }
}
