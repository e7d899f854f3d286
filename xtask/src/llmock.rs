//! The mock LLM provider the LLM route tests run against: `llmock` from PyPI, installed once
//! into a virtualenv under the target folder.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::Result;
use crate::cargo::{run, target_dir};

/// The version the tests are written against.
const VERSION: &str = "0.2.2";

/// The `llmock` executable, installed first if it is missing.
pub fn ensure(root: &Path) -> Result<PathBuf> {
    let venv = target_dir(root).join("llmock-venv");
    let program = venv.join("bin/llmock");
    let marker = venv.join(format!("installed-{VERSION}"));
    if program.is_file() && marker.is_file() {
        return Ok(program);
    }
    eprintln!("xtask: installing llmock {VERSION} into {}", venv.display());
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv))
        .map_err(|err| format!("{err}: the LLM tests need Python 3 with venv"))?;
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .arg(format!("llmock=={VERSION}")))?;
    std::fs::write(&marker, VERSION)?;
    Ok(program)
}
