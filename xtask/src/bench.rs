//! `cargo xtask bench`: Sluice side by side with nginx, by `bench/bench.sh`.
//!
//! The script does the work (installs nginx and wrk if missing, builds, runs, reports); this
//! only runs it from the workspace root, so it is reachable the same way as the other tasks.

use std::path::Path;
use std::process::{Command, ExitCode};

use crate::{Result, exit_code};

const SCRIPT: &str = "bench/bench.sh";

/// Runs the bench script with `args`; its settings (`RUNS`, `DURATION`, `NICE`, ...) come from
/// the environment, which passes through unchanged. Exits with the script's status.
pub fn run(root: &Path, args: &[String]) -> Result<ExitCode> {
    let status = Command::new("bash")
        .arg(root.join(SCRIPT))
        .args(args)
        .current_dir(root)
        .status()
        .map_err(|err| format!("cannot run `bash {SCRIPT}`: {err}"))?;
    Ok(exit_code(status))
}
