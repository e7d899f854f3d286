//! `cargo xtask demo`: the quickstart gateway in front of a local echo upstream, to try by hand.

mod gateway;
mod upstream;

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::process::{ExitCode, ExitStatus};
use std::time::Duration;

use crate::{Result, cargo, plugins};

use self::gateway::Gateway;

/// The addresses of `examples/quickstart/sluice.toml`; change them together.
const UPSTREAM_PORT: u16 = 9000;
const LISTENER_PORT: u16 = 8080;
const ADMIN_PORT: u16 = 9901;

const CONFIG: &str = "examples/quickstart/sluice.toml";

/// A cold start compiles every plugin with Cranelift, which takes a while in a debug build.
const HEALTHY_WITHIN: Duration = Duration::from_secs(60);

/// Builds what the demo needs, then runs it until Ctrl-C or until the gateway exits.
pub fn run(root: &Path) -> Result<ExitCode> {
    // Checked before building as well as at start, so a busy port fails fast, not after minutes.
    ensure_ports_free()?;
    plugins::build(root)?;
    cargo::run(cargo::cargo(root).args(["build", "-p", "sluice"]))?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|err| format!("cannot start the async runtime: {err}"))?;
    runtime.block_on(serve(root))
}

async fn serve(root: &Path) -> Result<ExitCode> {
    ensure_ports_free()?;
    let upstream = upstream::start(local(UPSTREAM_PORT)).await?;

    let binary = cargo::target_dir(root).join("debug").join("sluice");
    let mut gateway = Gateway::spawn(&binary, &root.join(CONFIG), root)?;
    gateway
        .wait_healthy(local(ADMIN_PORT), HEALTHY_WITHIN)
        .await?;
    print_banner();

    let code = tokio::select! {
        () = shutdown_signal() => {
            println!("\nxtask: stopping the gateway");
            report_stop(gateway.stop().await?)
        }
        status = gateway.wait() => report_exit(status?),
    };
    upstream.abort();
    Ok(code)
}

/// Fails with the port's name and role if something already listens there.
fn ensure_ports_free() -> Result<()> {
    let ports = [
        (UPSTREAM_PORT, "the demo upstream"),
        (LISTENER_PORT, "the gateway listener"),
        (ADMIN_PORT, "the gateway admin listener"),
    ];
    for (port, role) in ports {
        TcpListener::bind(local(port)).map_err(|err| busy(port, role, &err))?;
    }
    Ok(())
}

fn busy(port: u16, role: &str, err: &std::io::Error) -> String {
    format!("port {port} ({role}) is not free: {err}; stop whatever listens on 127.0.0.1:{port}")
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

fn print_banner() {
    let gateway = local(LISTENER_PORT);
    let admin = local(ADMIN_PORT);
    let upstream = local(UPSTREAM_PORT);
    println!(
        "
Sluice quickstart is running ({CONFIG}).
  gateway   http://{gateway}   routes /api (API key, rate limit) and /public (open)
  admin     http://{admin}   /healthz and /metrics
  upstream  http://{upstream}   answers every request with a JSON echo of it

Try:
  # No API key: the auth policy answers 401.
  curl -i http://{gateway}/api/hello

  # With the demo key: 200, and the echo shows x-sluice-identity and the transform headers.
  curl -i -H 'x-api-key: demo-key' http://{gateway}/api/hello

  # A burst: the throttle policy lets 5 through, then answers 429.
  for i in $(seq 1 20); do curl -s -o /dev/null -w '%{{http_code}}\\n' -H 'x-api-key: demo-key' http://{gateway}/api/hello; done

  # What the gateway counted.
  curl -s http://{admin}/metrics | grep sluice_

  # Hot reload: edit {CONFIG} (say, the throttle's `limit`) and save,
  # or rebuild a policy with `cargo xtask build-plugins`; the gateway reloads by itself.
  # Or ask for it and see the outcome:
  curl -s -X POST http://{admin}/reload

Press Ctrl-C to stop.
"
    );
}

/// Ctrl-C, or SIGTERM so that `timeout` or `kill` on this process also stops the gateway
/// rather than leaving it behind holding the ports.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut terminate) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

fn report_stop(status: ExitStatus) -> ExitCode {
    println!("xtask: gateway stopped ({status})");
    ExitCode::SUCCESS
}

/// The gateway exiting without being asked is a failure of the demo, whatever its status.
fn report_exit(status: ExitStatus) -> ExitCode {
    eprintln!("xtask: error: the gateway exited on its own ({status}); see its log above");
    ExitCode::FAILURE
}
