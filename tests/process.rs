//! The gateway binary run as its own process, for measurements that must not include the
//! test harness (its memory).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use crate::target_dir;

/// `sluice run` on a config written to a temporary file; killed when dropped.
pub struct GatewayProcess {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    child: Child,
    config: PathBuf,
}

impl GatewayProcess {
    /// Starts the gateway with `fragment` (upstreams, routes) after listeners on free ports,
    /// and waits until its admin listener answers.
    pub async fn start(fragment: &str) -> GatewayProcess {
        let (addr, admin) = (free_address(), free_address());
        let config = std::env::temp_dir().join(format!("sluice-process-{}.toml", addr.port()));
        let text =
            format!("[listener]\naddress = \"{addr}\"\n[admin]\naddress = \"{admin}\"\n{fragment}");
        std::fs::write(&config, text).expect("write config");
        let binary = target_dir().join("debug/sluice");
        let child = Command::new(&binary)
            .args(["run", "--config"])
            .arg(&config)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|err| {
                panic!(
                    "{}: {err}: run the tests with `cargo xtask test`",
                    binary.display()
                )
            });
        let process = GatewayProcess {
            addr,
            admin,
            child,
            config,
        };
        process.wait_until_up().await;
        process
    }

    async fn wait_until_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(self.admin).await.is_err() {
            assert!(Instant::now() < deadline, "the gateway did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Resident memory of the process, in bytes.
    pub fn rss_bytes(&self) -> u64 {
        let pid = self.child.id().expect("running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS line");
        kib * 1024
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_file(&self.config);
    }
}

fn free_address() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address")
}
