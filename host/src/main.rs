//! The `sluice` command: run the gateway, or check a configuration.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sluice::{Config, ConfigError, Server};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "A programmable edge and API gateway with WebAssembly policies"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Run {
        /// The configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// Log as JSON lines instead of text.
        #[arg(long)]
        json_logs: bool,
        /// Async worker threads; the default is one per CPU core.
        #[arg(long)]
        workers: Option<usize>,
    },
    /// Check a configuration: parse it, compile every plugin and run its config check.
    Check {
        /// The configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json_logs = matches!(
        cli.command,
        Command::Run {
            json_logs: true,
            ..
        }
    );
    init_logging(json_logs);

    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Command::Run {
        workers: Some(workers),
        ..
    } = &cli.command
    {
        builder.worker_threads((*workers).max(1));
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        match cli.command {
            Command::Run { config, .. } => run(config).await,
            Command::Check { config } => check(config).await,
        }
    })
}

async fn run(path: PathBuf) -> ExitCode {
    match Server::bind_file(&path).await {
        Ok(server) => {
            server.run(shutdown_signal()).await;
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(err) => {
            report(&err);
            ExitCode::FAILURE
        }
    }
}

async fn check(path: PathBuf) -> ExitCode {
    let checked = match Config::load(&path) {
        Ok(config) => sluice::gateway::check(&config).await,
        Err(err) => Err(err),
    };
    match checked {
        Ok(()) => {
            println!("{}: ok", path.display());
            ExitCode::SUCCESS
        }
        Err(err) => {
            report(&err.into());
            ExitCode::FAILURE
        }
    }
}

fn report(err: &anyhow::Error) {
    match err.downcast_ref::<ConfigError>() {
        Some(config) => config
            .problems
            .iter()
            .for_each(|problem| eprintln!("error: {problem}")),
        None => eprintln!("error: {err:#}"),
    }
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
    tracing::info!("shutdown signal received");
}

fn init_logging(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a terminal: a log redirected to a file or a collector stays plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
