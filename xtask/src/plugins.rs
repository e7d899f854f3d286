//! `cargo xtask build-plugins`: every policy and test guest, built as WebAssembly components.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Result, cargo};

const TARGET: &str = "wasm32-wasip2";
const PROFILE: &str = "plugin";

/// Folders whose subfolders are plugin crates: the shipped policies and the test guests.
const PLUGIN_FOLDERS: [&str; 2] = ["plugins", "tests/guests"];

/// A plugin crate and the component file cargo makes of it.
#[derive(Debug)]
struct PluginCrate {
    package: String,
    wasm_file: String,
}

/// Builds every plugin crate and prints where the components are.
pub fn build(root: &Path) -> Result<()> {
    ensure_target(root)?;
    let crates = discover(root)?;
    if crates.is_empty() {
        return Err("no plugin crates found in plugins/*/ or tests/guests/*/".into());
    }

    // One invocation, not one per crate: cargo then builds the shared dependencies once and
    // compiles the crates in parallel.
    let mut command = cargo::cargo(root);
    command.args(["build", "--target", TARGET, "--profile", PROFILE]);
    for plugin in &crates {
        command.args(["-p", &plugin.package]);
    }
    println!(
        "xtask: building {} plugin crate(s) for {TARGET}",
        crates.len()
    );
    cargo::run(&mut command)?;

    report(&cargo::target_dir(root).join(TARGET).join(PROFILE), &crates)
}

/// Installs the wasm target through rustup when it is missing, since the build fails without it.
fn ensure_target(root: &Path) -> Result<()> {
    let listed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .current_dir(root)
        .output();
    let installed = match listed {
        Ok(output) if output.status.success() => output.stdout,
        _ => {
            // NB: a toolchain not managed by rustup may still have the target; cargo will say.
            eprintln!("xtask: note: cannot ask rustup for installed targets; assuming {TARGET}");
            return Ok(());
        }
    };
    if String::from_utf8_lossy(&installed)
        .lines()
        .any(|line| line.trim() == TARGET)
    {
        return Ok(());
    }

    println!("xtask: the {TARGET} target is not installed; running `rustup target add {TARGET}`");
    let mut add = Command::new("rustup");
    add.args(["target", "add", TARGET]).current_dir(root);
    cargo::run(&mut add).map_err(|err| {
        format!("{err}; install the target with `rustup target add {TARGET}`").into()
    })
}

/// The plugin crates, sorted by package name so builds and reports are stable.
fn discover(root: &Path) -> Result<Vec<PluginCrate>> {
    let mut crates = Vec::new();
    for folder in PLUGIN_FOLDERS {
        for crate_dir in subfolders(&root.join(folder))? {
            let manifest = crate_dir.join("Cargo.toml");
            if manifest.is_file() {
                crates.push(PluginCrate::read(&manifest)?);
            }
        }
    }
    crates.sort_by(|a, b| a.package.cmp(&b.package));
    Ok(crates)
}

/// The subfolders of `dir`, or none if it does not exist (there may be no test guests yet).
fn subfolders(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(format!("{}: {err}", dir.display()).into()),
    };
    let mut dirs = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|err| format!("{}: {err}", dir.display()))?
            .path();
        if path.is_dir() {
            dirs.push(path);
        }
    }
    Ok(dirs)
}

/// Lists each component with its size; a missing one is an error, since cargo succeeded.
fn report(out_dir: &Path, crates: &[PluginCrate]) -> Result<()> {
    println!("xtask: plugins are in {}", out_dir.display());
    for plugin in crates {
        let path = out_dir.join(&plugin.wasm_file);
        let metadata = fs::metadata(&path).map_err(|err| {
            format!(
                "{} of `{}` is missing ({err}); is the crate a `cdylib`?",
                path.display(),
                plugin.package
            )
        })?;
        let kib = metadata.len().div_ceil(1024);
        println!(
            "  {:<24} {kib:>6} KiB  ({})",
            plugin.wasm_file, plugin.package
        );
    }
    Ok(())
}

// === impl PluginCrate ===

impl PluginCrate {
    /// Reads the package name and the name of the file cargo will write.
    fn read(manifest: &Path) -> Result<Self> {
        let text =
            fs::read_to_string(manifest).map_err(|err| format!("{}: {err}", manifest.display()))?;
        let table: toml::Table =
            toml::from_str(&text).map_err(|err| format!("{}: {err}", manifest.display()))?;

        let package = string_at(&table, "package", "name")
            .ok_or_else(|| format!("{}: no `[package] name`", manifest.display()))?;
        let crate_dir = manifest.parent().unwrap_or(Path::new("."));
        let has_lib = table.contains_key("lib") || crate_dir.join("src/lib.rs").is_file();
        Ok(PluginCrate {
            wasm_file: format!("{}.wasm", artifact_name(&table, package, has_lib)),
            package: package.to_string(),
        })
    }
}

/// The stem of the `.wasm` file: a library is named after its lib target, with `-` turned
/// into `_` as cargo does; a binary keeps the package name as written.
fn artifact_name(table: &toml::Table, package: &str, has_lib: bool) -> String {
    match (has_lib, string_at(table, "lib", "name")) {
        (true, Some(lib)) => lib.to_string(),
        (true, None) => package.replace('-', "_"),
        (false, _) => package.to_string(),
    }
}

fn string_at<'a>(table: &'a toml::Table, section: &str, key: &str) -> Option<&'a str> {
    table.get(section)?.get(key)?.as_str()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> toml::Table {
        toml::from_str(text).expect("valid toml")
    }

    #[test]
    fn lib_name_wins_over_package_name() {
        let manifest = table("[package]\nname = \"sluice-plugin-auth\"\n[lib]\nname = \"auth\"\n");
        assert_eq!(artifact_name(&manifest, "sluice-plugin-auth", true), "auth");
    }

    #[test]
    fn library_without_lib_name_uses_underscores() {
        let manifest = table("[package]\nname = \"guest-trap\"\n");
        assert_eq!(artifact_name(&manifest, "guest-trap", true), "guest_trap");
        assert_eq!(artifact_name(&manifest, "guest-trap", false), "guest-trap");
    }

    #[test]
    fn shipped_plugins_are_discovered() {
        let crates = discover(&crate::workspace_root()).expect("plugins folder readable");
        assert!(
            crates.iter().any(|plugin| plugin.wasm_file == "auth.wasm"),
            "{crates:?}"
        );
    }
}
