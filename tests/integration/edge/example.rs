//! `examples/passthrough/sluice.toml`, the config an outside conformance suite runs against.

use std::path::PathBuf;

use sluice::Config;

fn example() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/passthrough/sluice.toml")
}

#[tokio::test]
async fn the_passthrough_example_passes_sluice_check() {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice-gateway"))
        .arg("check")
        .arg("--config")
        .arg(example())
        .output()
        .await
        .expect("sluice check runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_passthrough_example_is_a_plain_proxy_to_one_upstream() {
    let config = Config::load(&example()).expect("valid");
    assert_eq!(config.listener.address.to_string(), "127.0.0.1:8080");
    assert_eq!(config.admin.address.to_string(), "127.0.0.1:9901");
    assert!(config.plugins.is_empty());
    assert_eq!(config.upstreams.len(), 1);
    let targets: Vec<&str> = config.upstreams[0]
        .targets
        .iter()
        .map(|t| t.address())
        .collect();
    assert_eq!(targets, ["127.0.0.1:9000"]);
    assert_eq!(config.routes.len(), 1);
    assert_eq!(config.routes[0].path_prefix, "/");
    assert!(config.routes[0].policies.is_empty());
    assert!(config.access_log.enabled);
}
