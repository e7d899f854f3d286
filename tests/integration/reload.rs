//! Reloading configuration and policies while serving: atomic, refused whole when any part is
//! bad, triggered once per save however the file is saved.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use http::StatusCode;
use sluice_tests::{Reply, TestGateway, TestUpstream, get, in_flight_get, plugin_path};

/// A folder of its own for one test's config and plugin files.
struct Workspace {
    dir: PathBuf,
}

impl Workspace {
    fn new(name: &str) -> Workspace {
        let dir = std::env::temp_dir().join(format!("sluice-reload-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Workspace { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Two different components with the same behaviour: the chaos policy, and the same
    /// bytes with a custom section appended (so a different digest and a fresh compile).
    fn plugin_versions(&self) -> (PathBuf, PathBuf) {
        let v1 = std::fs::read(plugin_path("chaos")).unwrap();
        let mut v2 = v1.clone();
        let name = b"sluice-test-version";
        v2.push(0); // custom section id
        v2.push((1 + name.len() + 1) as u8);
        v2.push(name.len() as u8);
        v2.extend_from_slice(name);
        v2.push(2);
        std::fs::write(self.path("chaos-v1.wasm"), v1).unwrap();
        std::fs::write(self.path("chaos-v2.wasm"), v2).unwrap();
        (self.path("chaos-v1.wasm"), self.path("chaos-v2.wasm"))
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A full config: the chaos policy from `plugin` tagging with `tag`, and one or two routes.
fn config(upstream: &TestUpstream, plugin: &Path, tag: &str, extra_route: bool) -> String {
    let text = sluice_tests::gateway::config_text(
        upstream,
        &format!(
            r#"
[[plugins]]
name = "chaos"
path = "{}"
# Generous: the reloads compile components on this machine's two cores while traffic runs.
deadline_ms = 2000
config = {{ mode = "count", tag = "{tag}" }}

[[routes]]
name = "chaos"
path_prefix = "/chaos"
upstream = "app"
policies = ["chaos"]
"#,
            plugin.display()
        ),
    );
    if extra_route {
        text + "\n[[routes]]\nname = \"plain\"\npath_prefix = \"/plain\"\nupstream = \"app\"\n"
    } else {
        text
    }
}

/// The version a response came from, checking that both phases ran the same one.
fn version(reply: &Reply) -> String {
    let request_phase = reply.header("x-echo-request-tag").unwrap_or("none");
    let response_phase = reply.header("x-chaos-tag").unwrap_or("none");
    assert_eq!(
        request_phase, response_phase,
        "one request saw two versions"
    );
    response_phase.to_string()
}

async fn generation(gateway: &TestGateway) -> u64 {
    let metrics = gateway.metrics().await;
    let line = metrics
        .lines()
        .find(|l| l.starts_with("sluice_config_generation "))
        .unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

async fn reload_failures(gateway: &TestGateway) -> u64 {
    let metrics = gateway.metrics().await;
    let prefix = r#"sluice_config_reloads_total{result="failure"} "#;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .map_or(0, |n| n.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_reloads_under_traffic_lose_nothing_and_never_mix_versions() {
    let upstream = TestUpstream::start().await;
    let files = Workspace::new("fifty");
    let (v1, v2) = files.plugin_versions();
    let path = files.path("sluice.toml");
    std::fs::write(&path, config(&upstream, &v1, "v1", false)).unwrap();
    let gateway = Arc::new(TestGateway::start_file(&path).await);

    let stop = Arc::new(AtomicBool::new(false));
    let traffic: Vec<_> = (0..4)
        .map(|_| {
            let (gateway, stop) = (gateway.clone(), stop.clone());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let reply = get(&gateway.url("/chaos")).await;
                    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
                    seen.push(version(&reply));
                }
                seen
            })
        })
        .collect();

    for round in 0..50u64 {
        let (plugin, tag, extra) = if round % 2 == 0 {
            (&v2, "v2", true)
        } else {
            (&v1, "v1", false)
        };
        std::fs::write(&path, config(&upstream, plugin, tag, extra)).unwrap();
        let (status, outcome) = gateway.reload().await;
        assert_eq!(status, StatusCode::OK, "{outcome}");
        assert_eq!(outcome["generation"], round + 2);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);

    let mut versions = Vec::new();
    for task in traffic {
        versions.extend(task.await.unwrap());
    }
    assert!(versions.iter().any(|v| v == "v1") && versions.iter().any(|v| v == "v2"));
    assert_eq!(reload_failures(&gateway).await, 0);
    let metrics = gateway.metrics().await;
    let compiles = metrics
        .lines()
        .find_map(|l| l.strip_prefix("sluice_plugin_compile_seconds_count "));
    assert_eq!(
        compiles,
        Some("2"),
        "each version is compiled once, then cached"
    );
}

#[tokio::test]
async fn a_bad_reload_is_refused_whole_and_the_old_configuration_keeps_serving() {
    let upstream = TestUpstream::start().await;
    let files = Workspace::new("bad");
    let (v1, _) = files.plugin_versions();
    let path = files.path("sluice.toml");
    let good = config(&upstream, &v1, "v1", false);
    std::fs::write(&path, &good).unwrap();
    let gateway = TestGateway::start_file(&path).await;

    let corrupt = files.path("corrupt.wasm");
    std::fs::write(&corrupt, b"\0asm not really").unwrap();
    let bad_configs = [
        ("syntax error", good.replace("[[routes]]", "[[routes]")),
        (
            "unknown key",
            good.replace(
                "path_prefix = \"/chaos\"",
                "path_prefix = \"/chaos\"\ncolour = 1",
            ),
        ),
        ("corrupt wasm", config(&upstream, &corrupt, "v2", false)),
        (
            "rejected plugin config",
            good.replace("mode = \"count\"", "mode = \"explode\""),
        ),
        (
            "listener change",
            good.replace("shutdown_grace_ms = 2000", "shutdown_grace_ms = 3000"),
        ),
    ];
    for (failures, (what, text)) in (1..).zip(bad_configs) {
        std::fs::write(&path, text).unwrap();
        let (status, outcome) = gateway.reload().await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{what}: {outcome}"
        );
        assert_eq!(outcome["generation"], 1, "{what}");
        assert!(!outcome["errors"].as_array().unwrap().is_empty(), "{what}");
        assert_eq!(reload_failures(&gateway).await, failures, "{what}");
        assert_eq!(version(&get(&gateway.url("/chaos")).await), "v1", "{what}");
    }

    std::fs::write(&path, good.replace("tag = \"v1\"", "tag = \"v3\"")).unwrap();
    let (status, outcome) = gateway.reload().await;
    assert_eq!(status, StatusCode::OK, "{outcome}");
    assert_eq!(version(&get(&gateway.url("/chaos")).await), "v3");
}

#[tokio::test]
async fn a_request_in_flight_during_a_reload_finishes_on_its_old_configuration() {
    let upstream = TestUpstream::start().await;
    let files = Workspace::new("inflight");
    let (v1, v2) = files.plugin_versions();
    let path = files.path("sluice.toml");
    std::fs::write(&path, config(&upstream, &v1, "v1", false)).unwrap();
    let gateway = TestGateway::start_file(&path).await;

    let in_flight = in_flight_get(&gateway.url("/chaos"), Duration::from_millis(800)).await;
    std::fs::write(&path, config(&upstream, &v2, "v2", false)).unwrap();
    assert_eq!(gateway.reload().await.0, StatusCode::OK);

    assert_eq!(version(&get(&gateway.url("/chaos")).await), "v2");
    let old = in_flight.await.unwrap();
    assert_eq!(old.status, StatusCode::OK);
    assert_eq!(version(&old), "v1");
}

/// Saves the config with `save`, then checks that exactly one reload followed.
async fn saving_reloads_once(name: &str, save: impl Fn(&Workspace, &str)) {
    let upstream = TestUpstream::start().await;
    let files = Workspace::new(name);
    let (v1, _) = files.plugin_versions();
    save(&files, &config(&upstream, &v1, "v1", false));
    let gateway = TestGateway::start_file(&files.path("sluice.toml")).await;
    assert_eq!(generation(&gateway).await, 1);

    save(&files, &config(&upstream, &v1, "v2", false));
    let deadline = Instant::now() + Duration::from_secs(5);
    while generation(&gateway).await == 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(800)).await;

    assert_eq!(generation(&gateway).await, 2, "{name}: exactly one reload");
    assert_eq!(version(&get(&gateway.url("/chaos")).await), "v2", "{name}");
}

#[tokio::test]
async fn saving_in_place_reloads_once() {
    saving_reloads_once("in-place", |files, text| {
        std::fs::write(files.path("sluice.toml"), text).unwrap();
    })
    .await;
}

#[tokio::test]
async fn saving_by_renaming_over_reloads_once() {
    saving_reloads_once("rename", |files, text| {
        let temporary = files.path(".sluice.toml.swp");
        std::fs::write(&temporary, text).unwrap();
        std::fs::rename(&temporary, files.path("sluice.toml")).unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_kubernetes_style_symlink_swap_reloads_once() {
    use std::sync::atomic::AtomicU32;
    static VERSION: AtomicU32 = AtomicU32::new(0);
    saving_reloads_once("symlink", |files, text| {
        // sluice.toml -> ..data/sluice.toml, and ..data -> ..vN, swapped by renaming a new link.
        let version = format!("..v{}", VERSION.fetch_add(1, Ordering::Relaxed));
        std::fs::create_dir_all(files.path(&version)).unwrap();
        std::fs::write(files.path(&version).join("sluice.toml"), text).unwrap();
        std::os::unix::fs::symlink(&version, files.path("..data_tmp")).unwrap();
        std::fs::rename(files.path("..data_tmp"), files.path("..data")).unwrap();
        if !files.path("sluice.toml").exists() {
            std::os::unix::fs::symlink("..data/sluice.toml", files.path("sluice.toml")).unwrap();
        }
    })
    .await;
}

#[tokio::test]
async fn encoded_slash_changes_on_reload() {
    let upstream = TestUpstream::start().await;
    let workspace = Workspace::new("encoded-slash");
    let path = workspace.path("sluice.toml");
    let route = "[[routes]]\nname = \"plain\"\npath_prefix = \"/\"\nupstream = \"app\"\n";
    let text = |action: &str| {
        sluice_tests::gateway::config_text_with(
            &upstream,
            &format!("encoded_slash = \"{action}\""),
            route,
        )
    };
    std::fs::write(&path, text("reject")).unwrap();
    let gateway = TestGateway::start_file(&path).await;
    assert_eq!(
        get(&gateway.url("/a%2Fb")).await.status,
        StatusCode::BAD_REQUEST
    );

    std::fs::write(&path, text("decode")).unwrap();
    let (status, answer) = gateway.reload().await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(get(&gateway.url("/a%2Fb")).await.status, StatusCode::OK);
    assert_eq!(upstream.last().path_and_query, "/a/b");
}

#[tokio::test]
async fn a_reload_drops_the_metric_series_of_what_it_removed() {
    let upstream = TestUpstream::start().await;
    let files = Workspace::new("forget");
    let (v1, _) = files.plugin_versions();
    let path = files.path("sluice.toml");
    // A second target that refuses connections, so the legacy upstream has series for both.
    let refusing = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let refusing_addr = refusing.local_addr().unwrap();
    drop(refusing);
    let legacy = |targets: &str, breaker: bool| {
        let breaker = match breaker {
            true => "[upstreams.circuit_breaker]\nconsecutive_failures = 100\n",
            false => "",
        };
        format!(
            "\n[[upstreams]]\nname = \"legacy\"\ntargets = [{targets}]\n{breaker}\n\
             [[routes]]\nname = \"legacy\"\npath_prefix = \"/legacy\"\nupstream = \"legacy\"\n"
        )
    };
    let both = format!("\"{}\", \"{refusing_addr}\"", upstream.addr);
    let one = format!("\"{}\"", upstream.addr);
    let with_legacy = |legacy_part: String| config(&upstream, &v1, "v1", true) + &legacy_part;

    std::fs::write(&path, with_legacy(legacy(&both, true))).unwrap();
    let gateway = TestGateway::start_file(&path).await;
    for path in ["/chaos", "/plain", "/legacy", "/legacy", "/legacy"] {
        get(&gateway.url(path)).await;
    }
    let before = gateway.metrics().await;
    for series in [
        r#"route="legacy""#,
        r#"route="chaos""#,
        r#"plugin="chaos""#,
        &format!(r#"target="{refusing_addr}""#),
        r#"sluice_upstream_circuit_state{upstream="legacy"}"#,
    ] {
        assert!(before.contains(series), "{series} is exported");
    }

    // The legacy upstream keeps its name but loses a target and its breaker.
    std::fs::write(&path, with_legacy(legacy(&one, false))).unwrap();
    assert_eq!(gateway.reload().await.0, StatusCode::OK);
    let after = gateway.metrics().await;
    assert!(!after.contains(&format!(r#"target="{refusing_addr}""#)));
    assert!(!after.contains("sluice_upstream_circuit_state{"));
    assert!(after.contains(&format!(
        r#"sluice_upstream_target_healthy{{target="{}",upstream="legacy"}} 1"#,
        upstream.addr
    )));

    // Then the legacy route and upstream go, and the chaos route with its plugin.
    let plain_only = sluice_tests::gateway::config_text(
        &upstream,
        "[[routes]]\nname = \"plain\"\npath_prefix = \"/plain\"\nupstream = \"app\"\n",
    );
    std::fs::write(&path, plain_only).unwrap();
    assert_eq!(gateway.reload().await.0, StatusCode::OK);
    assert_eq!(get(&gateway.url("/plain")).await.status, StatusCode::OK);
    let after = gateway.metrics().await;
    for gone in [
        r#"route="legacy""#,
        r#"upstream="legacy""#,
        r#"route="chaos""#,
        r#"plugin="chaos""#,
    ] {
        assert!(!after.contains(gone), "{gone} is still exported");
    }
    assert!(after.contains(r#"sluice_requests_total{route="plain",status="200"} 2"#));
}

#[tokio::test]
async fn a_file_written_all_the_time_beside_the_config_does_not_hold_reloads_back() {
    let upstream = TestUpstream::start().await;
    let files = Workspace::new("busy-folder");
    let (v1, _) = files.plugin_versions();
    let path = files.path("sluice.toml");
    std::fs::write(&path, config(&upstream, &v1, "v1", false)).unwrap();
    let gateway = TestGateway::start_file(&path).await;

    // An access log in the same folder, appended to every 20 ms.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (log, stop) = (files.path("access.log"), stop.clone());
        std::thread::spawn(move || {
            use std::io::Write;
            let mut file = std::fs::File::create(log).unwrap();
            while !stop.load(Ordering::Relaxed) {
                writeln!(file, "{{\"status\":200}}").unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    std::fs::write(&path, config(&upstream, &v1, "v2", false)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while generation(&gateway).await == 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        generation(&gateway).await,
        2,
        "the saved config was picked up"
    );
    assert_eq!(version(&get(&gateway.url("/chaos")).await), "v2");

    std::fs::write(&path, config(&upstream, &v1, "v3", false)).unwrap();
    let asked = Instant::now();
    let (status, outcome) = gateway.reload().await;
    assert_eq!(status, StatusCode::OK, "{outcome}");
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "POST /reload waited {:?}",
        asked.elapsed()
    );
    assert_eq!(version(&get(&gateway.url("/chaos")).await), "v3");

    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
}

#[tokio::test]
async fn a_request_finishing_on_a_removed_route_leaves_no_series_behind() {
    let upstream = TestUpstream::start().await;
    let files = Workspace::new("straggler");
    let path = files.path("sluice.toml");
    let plain = "[[routes]]\nname = \"plain\"\npath_prefix = \"/plain\"\nupstream = \"app\"\n";
    let slow = "[[routes]]\nname = \"slow\"\npath_prefix = \"/slow\"\nupstream = \"app\"\n";
    let text = |routes: &str| sluice_tests::gateway::config_text(&upstream, routes);
    std::fs::write(&path, text(&format!("{plain}\n{slow}"))).unwrap();
    let gateway = TestGateway::start_file(&path).await;

    let in_flight = in_flight_get(&gateway.url("/slow"), Duration::from_millis(800)).await;
    std::fs::write(&path, text(plain)).unwrap();
    assert_eq!(gateway.reload().await.0, StatusCode::OK);
    assert_eq!(in_flight.await.unwrap().status, StatusCode::OK);

    // The finished request counted itself under the removed route; once its configuration
    // is no longer in use, that series goes too.
    let deadline = Instant::now() + Duration::from_secs(15);
    while gateway.metrics().await.contains(r#"route="slow""#) {
        assert!(
            Instant::now() < deadline,
            "route=\"slow\" is still exported"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
