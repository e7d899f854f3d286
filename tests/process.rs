//! The gateway binary run as its own process, for measurements that must not include the
//! test harness (its memory).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::AsyncBufReadExt;
use tokio::process::Child;

/// `sluice run` on a config written to a temporary file; killed when dropped.
pub struct GatewayProcess {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    child: Child,
    config: PathBuf,
}

impl GatewayProcess {
    /// Starts `binary` (the tests' `CARGO_BIN_EXE_sluice-gateway`) on the complete config
    /// `text` and waits until it says where it listens.
    pub async fn start(binary: &Path, text: &str) -> GatewayProcess {
        Self::start_with_env(binary, text, &[]).await
    }

    /// Like [`GatewayProcess::start`], with extra environment variables for the gateway.
    pub async fn start_with_env(binary: &Path, text: &str, env: &[(&str, &str)]) -> GatewayProcess {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let number = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let config = std::env::temp_dir().join(format!(
            "sluice-process-{}-{number}.toml",
            std::process::id()
        ));
        std::fs::write(&config, text).expect("write the config");
        let mut child = tokio::process::Command::new(binary)
            .args(["run", "--json-logs", "--workers", "2", "--config"])
            .arg(&config)
            .envs(env.iter().copied())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the gateway binary starts");
        let stderr = child.stderr.take().expect("piped stderr");
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        let (addr, admin) = loop {
            let line = lines.next_line().await.expect("read the log");
            let line = line.expect("the gateway logs where it listens before it exits");
            let line: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
            let fields = &line["fields"];
            if let (Some(addr), Some(admin)) =
                (fields["listener"].as_str(), fields["admin"].as_str())
            {
                break (
                    addr.parse().expect("an address"),
                    admin.parse().expect("an address"),
                );
            }
        };
        // Keep reading, so the gateway never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        GatewayProcess {
            addr,
            admin,
            child,
            config,
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
