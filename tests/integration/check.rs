//! `sluice check`: a configuration is refused with a message for each problem, before it
//! serves anything.

use std::io::Write;

use sluice::{Config, gateway};
use sluice_tests::TestUpstream;
use sluice_tests::gateway::config_text;

async fn check(fragment: &str) -> Result<(), String> {
    let upstream = TestUpstream::start().await;
    let config = Config::parse(&config_text(&upstream, fragment)).map_err(|e| e.to_string())?;
    gateway::check(&config).await.map_err(|e| e.to_string())
}

fn plugin_at(path: &str, config: &str) -> String {
    format!(
        r#"
[[plugins]]
name = "p"
path = "{path}"
config = {config}

[[routes]]
name = "r"
upstream = "app"
policies = ["p"]
"#
    )
}

#[tokio::test]
async fn a_valid_config_passes() {
    check(&plugin_at("{plugin:chaos}", r#"{ mode = "count" }"#))
        .await
        .expect("valid");
}

#[tokio::test]
async fn an_unknown_key_is_named_with_its_line() {
    let err = check("[[routes]]\nname = \"r\"\nupstream = \"app\"\ntimeout = 5\n")
        .await
        .unwrap_err();
    assert!(err.contains("unknown field `timeout`"), "{err}");
    assert!(err.contains("line"), "{err}");
}

#[tokio::test]
async fn a_missing_plugin_file_is_named() {
    let err = check(&plugin_at("/nowhere/missing.wasm", "{}"))
        .await
        .unwrap_err();
    assert!(
        err.contains("plugin `p`") && err.contains("/nowhere/missing.wasm"),
        "{err}"
    );
}

#[tokio::test]
async fn a_corrupt_wasm_file_is_refused() {
    let mut file = tempfile();
    file.1
        .write_all(b"\0asm\x0d\0\x01\0 this is not a component")
        .unwrap();
    let err = check(&plugin_at(&file.0, "{}")).await.unwrap_err();
    assert!(err.contains("plugin `p`"), "{err}");

    // Not even a WebAssembly header: the parser's byte lists stay on one line.
    let mut file = tempfile();
    file.1
        .write_all(&[0x10, 0xd5, 0xde, 0xb2, 1, 0, 0, 0])
        .unwrap();
    let err = check(&plugin_at(&file.0, "{}")).await.unwrap_err();
    assert!(err.contains("magic") && !err.contains('\n'), "{err}");

    // A core module (what wasm32-unknown-unknown or wasm32-wasip1 builds): the smallest one.
    let mut file = tempfile();
    file.1.write_all(b"\0asm\x01\0\0\0").unwrap();
    let err = check(&plugin_at(&file.0, "{}")).await.unwrap_err();
    assert!(
        err.contains("not a component") && err.contains("wasm32-wasip2"),
        "{err}"
    );
}

#[tokio::test]
async fn a_component_importing_what_the_host_lacks_is_refused_naming_the_import() {
    let err = check(&plugin_at("{plugin:forbidden}", "{}"))
        .await
        .unwrap_err();
    assert!(err.contains("test:forbidden/secrets"), "{err}");
}

#[tokio::test]
async fn a_policy_built_for_another_interface_version_is_refused_naming_both() {
    let err = check(&plugin_at("{plugin:outdated}", "{}"))
        .await
        .unwrap_err();
    assert!(
        err.contains("sluice:policy@0.1.0")
            && err.contains(&format!("sluice:policy@{}", sluice::plugin::POLICY_VERSION))
            && err.contains("rebuild"),
        "{err}"
    );
}

#[tokio::test]
async fn a_plugin_config_the_policy_rejects_is_refused_at_load() {
    let err = check(&plugin_at("{plugin:chaos}", r#"{ mode = "explode" }"#))
        .await
        .unwrap_err();
    assert!(
        err.contains("rejected its config") && err.contains("explode"),
        "{err}"
    );
}

/// A file in the system temp folder, unique to this process and call.
fn tempfile() -> (String, std::fs::File) {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "sluice-test-{}-{}.wasm",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let path = std::env::temp_dir().join(name);
    let file = std::fs::File::create(&path).unwrap();
    (path.display().to_string(), file)
}

#[tokio::test]
async fn the_quickstart_config_is_valid() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart/sluice.toml");
    let config = Config::load(&path).expect("the quickstart config parses");
    gateway::check(&config)
        .await
        .expect("the quickstart config loads");
}

#[tokio::test]
async fn the_resilience_example_is_valid() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/resilience/sluice.toml");
    let config = Config::load(&path).expect("the resilience example parses");
    let api = &config.upstreams[0];
    assert!(api.health_check.is_some() && api.circuit_breaker.is_some());
    assert!(api.outlier_detection.is_some() && api.try_timeout_ms.is_some());
    gateway::check(&config)
        .await
        .expect("the resilience example loads");
}

#[tokio::test]
async fn the_llm_example_is_valid() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/llm/sluice.toml");
    let config = Config::load(&path).expect("the LLM example parses");
    let llm = config.routes[0].llm.as_ref().expect("an LLM route");
    assert_eq!(llm.models.len(), 2);
    gateway::check(&config)
        .await
        .expect("the LLM example loads");
}
