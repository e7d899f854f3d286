//! Workspace automation for Sluice, run as `cargo xtask <command>`.
//!
//! Policies are WebAssembly components that cargo cannot build as part of a native
//! `cargo build`, so the commands that need them (tests, the demo) build them first here.
//! `bench` runs the benchmark script, `bench/bench.sh`, which builds what it measures itself.

mod bench;
mod cargo;
mod demo;
mod llmock;
mod plugins;

use std::path::{Path, PathBuf};
use std::process::{ExitCode, ExitStatus};

/// Failures of this tool are messages for a developer at a terminal.
type Error = Box<dyn std::error::Error + Send + Sync>;
type Result<T, E = Error> = std::result::Result<T, E>;

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  build-plugins   build every policy and test guest for wasm32-wasip2 (profile `plugin`)
  test [ARGS]     build the plugins, install llmock (the mock LLM provider), then
                  `cargo test --workspace [ARGS]`; without ARGS, also the gateway's
                  unit tests with its `exact-tokens` feature
  llmock          install llmock into target/llmock-venv (`test` does this when needed)
  demo            run the quickstart gateway in front of a local echo upstream
  bench [ARGS]    benchmark Sluice side by side with nginx (`bench/bench.sh help`)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        eprintln!("{USAGE}");
        return ExitCode::FAILURE;
    };

    match run(command, rest, &workspace_root()) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("xtask: error: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: &str, args: &[String], root: &Path) -> Result<ExitCode> {
    match command {
        "build-plugins" => {
            no_arguments(command, args)?;
            plugins::build(root)?;
            Ok(ExitCode::SUCCESS)
        }
        "test" => test(root, args),
        "llmock" => {
            no_arguments(command, args)?;
            println!("{}", llmock::ensure(root)?.display());
            Ok(ExitCode::SUCCESS)
        }
        "demo" => {
            no_arguments(command, args)?;
            demo::run(root)
        }
        "bench" => bench::run(root, args),
        "help" | "--help" | "-h" => {
            println!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        _ => Err(format!("unknown command `{command}`\n\n{USAGE}").into()),
    }
}

/// `cargo xtask test`: the workspace tests need the plugins, which `cargo test` cannot build,
/// and the mock LLM provider. Without arguments, the gateway's own tests then run again with
/// its optional `exact-tokens` feature. Exits with the status of the first `cargo test` that
/// fails, so CI sees its failure as it is.
fn test(root: &Path, args: &[String]) -> Result<ExitCode> {
    plugins::build(root)?;
    let llmock = llmock::ensure(root)?;

    let run = |args: &[&str]| {
        cargo::cargo(root)
            .arg("test")
            .args(args)
            .env("SLUICE_LLMOCK", &llmock)
            .status()
            .map_err(|err| format!("cannot run cargo: {err}"))
    };
    let mut workspace = vec!["--workspace"];
    workspace.extend(args.iter().map(String::as_str));
    let status = run(&workspace)?;
    if !status.success() || !args.is_empty() {
        return Ok(exit_code(status));
    }
    let status = run(&["-p", "sluice", "--lib", "--features", "exact-tokens"])?;
    Ok(exit_code(status))
}

fn no_arguments(command: &str, args: &[String]) -> Result<()> {
    match args {
        [] => Ok(()),
        _ => Err(format!("`{command}` takes no arguments, got `{}`", args.join(" ")).into()),
    }
}

/// The folder of the workspace `Cargo.toml`; this crate sits directly inside it.
fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// A child's status as this process's own; killed by a signal counts as a plain failure.
fn exit_code(status: ExitStatus) -> ExitCode {
    match status.code() {
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => ExitCode::FAILURE,
    }
}
