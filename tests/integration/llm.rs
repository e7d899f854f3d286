//! LLM routes against llmock, a mock OpenAI-compatible provider run as a child process:
//! streams pass event by event, token budgets admit only what fits, provider limits are
//! respected before they answer 429, failing deployments are cooled down, and a client that
//! leaves ends the provider's stream.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use sluice_tests::gateway::config_text;
use sluice_tests::llmock::Llmock;
use sluice_tests::process::GatewayProcess;
use sluice_tests::{Reply, TestGateway, TestUpstream, metric, send};

/// A gateway with an LLM route on `/v1`: `llm` holds `[routes.llm]` keys, and each model
/// maps to deployments named by upstream. `upstreams` are `(name, llmock)`.
async fn gateway(
    upstreams: &[(&str, &Llmock)],
    llm: &str,
    models: &[(&str, &[&str])],
) -> TestGateway {
    let app = TestUpstream::start().await;
    TestGateway::start(&app, &fragment(upstreams, llm, models)).await
}

fn fragment(upstreams: &[(&str, &Llmock)], llm: &str, models: &[(&str, &[&str])]) -> String {
    let mut text = String::new();
    for (name, mock) in upstreams {
        text += &format!(
            "[[upstreams]]\nname = \"{name}\"\ntargets = [\"{}\"]\n",
            mock.addr
        );
    }
    text += &format!(
        "[[routes]]\nname = \"llm\"\npath_prefix = \"/v1\"\nupstream = \"{}\"\n[routes.llm]\n{llm}\n",
        upstreams[0].0
    );
    for (model, deployments) in models {
        let list: Vec<String> = deployments
            .iter()
            .map(|d| format!("{{ upstream = \"{d}\", model = \"gpt-4o-mini\" }}"))
            .collect();
        text += &format!(
            "[[routes.llm.models]]\nname = \"{model}\"\ndeployments = [{}]\n",
            list.join(", ")
        );
    }
    text
}

fn chat(url: &str, body: Value) -> Request<Bytes> {
    Request::post(url)
        .header("content-type", "application/json")
        .header("authorization", "Bearer test-key")
        .body(Bytes::from(body.to_string()))
        .expect("valid")
}

fn words(count: usize) -> String {
    (0..count).map(|i| format!("w{i} ")).collect()
}

/// Sends a streaming request and reads its events as they arrive: `(arrival, event)`.
async fn stream(url: &str, body: Value) -> (StatusCode, Vec<(Instant, String)>) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let response = client
        .request(chat(url, body).map(Full::new))
        .await
        .expect("response");
    let status = response.status();
    let mut body = response.into_body();
    let (mut events, mut pending) = (Vec::new(), String::new());
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.expect("frame").into_data() else {
            continue;
        };
        pending.push_str(&String::from_utf8_lossy(&data));
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            events.push((Instant::now(), event.trim().to_string()));
        }
    }
    (status, events)
}

#[tokio::test]
async fn stream_events_reach_the_client_as_the_provider_sends_them() {
    let mock = Llmock::start(&["--stream-chunk-delay-ms", "50"]).await;
    let gateway = gateway(&[("mock", &mock)], "", &[("public", &["mock"])]).await;
    let url = gateway.url("/v1/chat/completions");

    mock.script(json!([{ "type": "reply", "text": words(20) }]))
        .await;
    let body = json!({
        "model": "public", "stream": true, "stream_options": { "include_usage": true },
        "messages": [{ "role": "user", "content": "hello" }],
    });
    let (status, events) = stream(&url, body).await;
    assert_eq!(status, StatusCode::OK);
    let gaps: Vec<u128> = events
        .windows(2)
        .map(|pair| pair[1].0.duration_since(pair[0].0).as_millis())
        .collect();
    let mut sorted = gaps.clone();
    sorted.sort_unstable();
    let median = sorted[sorted.len() / 2];
    assert!((30..=150).contains(&median), "gaps {gaps:?}");
    assert_eq!(events.last().expect("events").1, "data: [DONE]");
    assert!(
        events
            .iter()
            .any(|(_, e)| e.contains("\"usage\"") && e.contains("\"choices\":[]")),
        "the usage event the client asked for arrives"
    );

    // A client that did not ask for usage does not get the event the gateway asked for.
    let body = json!({ "model": "public", "stream": true, "messages": [] });
    let (_, events) = stream(&url, body).await;
    assert!(
        !events.iter().any(|(_, e)| e.contains("\"choices\":[]")),
        "{events:?}"
    );
    assert_eq!(events.last().expect("events").1, "data: [DONE]");
    let sent = mock.journal().await.pop().expect("journaled")["body"].clone();
    assert_eq!(sent["model"], "gpt-4o-mini", "the deployment's model name");
    assert_eq!(sent["stream_options"]["include_usage"], true);

    // Both streams were timed from their first token to their last.
    let metrics = gateway.metrics().await;
    let per_token = "gen_ai_server_time_per_output_token_seconds_count{\
        gen_ai_provider_name=\"openai\",gen_ai_request_model=\"public\"}";
    assert_eq!(metric(&metrics, per_token), 2.0, "{metrics}");
}

#[tokio::test]
async fn a_token_budget_admits_only_what_fits_and_settles_to_real_usage() {
    let mock = Llmock::start(&[]).await;
    let gateway = gateway(
        &[("mock", &mock)],
        "consumer_tokens_per_minute = 100",
        &[("public", &["mock"])],
    )
    .await;
    let url = gateway.url("/v1/chat/completions");
    // Each request reserves about 34 tokens (a 75-byte body over four, plus 15); two fit.
    let body = json!({ "model": "public", "max_tokens": 15, "messages": [{ "role": "user", "content": "hi" }] });
    mock.script(json!([{ "type": "delay", "seconds": 1, "times": 2 }]))
        .await;

    let requests: Vec<_> = (0..5)
        .map(|_| {
            let request = chat(&url, body.clone());
            tokio::spawn(async move { send(request).await })
        })
        .collect();
    let mut replies: Vec<Reply> = Vec::new();
    for request in requests {
        replies.push(request.await.expect("task"));
    }
    let admitted = replies
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .count();
    assert_eq!(
        admitted,
        2,
        "{:?}",
        replies.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    for refused in replies.iter().filter(|r| r.status != StatusCode::OK) {
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(refused.json()["error"], "consumer_budget");
        let wait: u64 = refused
            .header("retry-after")
            .expect("Retry-After")
            .parse()
            .expect("seconds");
        assert!(wait >= 1);
    }
    assert_eq!(
        mock.journal().await.len(),
        2,
        "the refused never reached the provider"
    );

    // The two used about 8 tokens each, not 34: what was not used is back in the bucket.
    assert_eq!(send(chat(&url, body)).await.status, StatusCode::OK);

    // Numbers that would overflow the estimate make it larger, never smaller: it never fits.
    let huge = json!({ "model": "public", "max_tokens": 4_294_967_296u64, "n": 4_294_967_296u64 });
    let refused = send(chat(&url, huge)).await;
    assert_eq!(
        refused.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        refused.text()
    );
    assert_eq!(refused.json()["error"], "token_estimate_over_budget");
    let metrics = gateway.metrics().await;
    assert_eq!(
        metric(&metrics, "sluice_llm_reserved_tokens{route=\"llm\"}"),
        0.0
    );
    assert_eq!(
        metric(
            &metrics,
            "sluice_llm_shed_total{reason=\"consumer_budget\"}"
        ),
        3.0
    );
}

#[tokio::test]
async fn a_provider_limit_seen_in_its_headers_is_never_spent_on_a_429() {
    let (limited, spare) = (
        Llmock::start(&["--rpm", "3", "--tpm", "100000"]).await,
        Llmock::start(&[]).await,
    );
    // The deployments send their own key, so the provider's headers describe the deployment.
    let app = TestUpstream::start().await;
    let llm = fragment(
        &[("limited", &limited), ("spare", &spare)],
        "budget_wait_ms = 200\nconsumer_tokens_per_minute = 1000000",
        &[
            ("only-limited", &["limited"]),
            ("with-spare", &["limited", "spare"]),
        ],
    )
    .replace(
        "model = \"gpt-4o-mini\" }",
        "model = \"gpt-4o-mini\", api_key_env = \"PROVIDER_KEY\" }",
    );
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_sluice-gateway"));
    let env = [("PROVIDER_KEY", "deployment-key")];
    let gateway = GatewayProcess::start_with_env(binary, &config_text(&app, &llm), &env).await;
    let url = format!("http://{}/v1/chat/completions", gateway.addr);
    let body = |model: &str| json!({ "model": model, "max_tokens": 10, "messages": [] });

    for _ in 0..3 {
        assert_eq!(
            send(chat(&url, body("only-limited"))).await.status,
            StatusCode::OK
        );
    }
    let fourth = send(chat(&url, body("only-limited"))).await;
    assert_eq!(
        fourth.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        fourth.text()
    );
    assert_eq!(fourth.json()["error"], "provider_budget");
    assert!(fourth.header("retry-after").is_some());
    assert_eq!(
        limited.journal().await.len(),
        3,
        "the fourth never reached the provider"
    );
    // More tokens than the provider allows in a whole minute: no wait would help.
    let huge = json!({ "model": "only-limited", "max_tokens": 200000, "messages": [] });
    let never = send(chat(&url, huge)).await;
    assert_eq!(
        never.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        never.text()
    );
    assert_eq!(never.json()["error"], "token_estimate_over_provider_limit");
    assert_eq!(limited.journal().await.len(), 3);

    assert_eq!(
        send(chat(&url, body("with-spare"))).await.status,
        StatusCode::OK
    );
    assert_eq!(limited.journal().await.len(), 3);
    assert_eq!(
        spare.journal().await.len(),
        1,
        "sent to the deployment with budget"
    );

    let metrics = sluice_tests::get(&format!("http://{}/metrics", gateway.admin))
        .await
        .text();
    for name in [
        "gen_ai_client_token_usage_bucket",
        "gen_ai_server_time_to_first_token_seconds_bucket",
        "gen_ai_server_request_duration_seconds_bucket",
        "sluice_llm_reserved_tokens",
        "sluice_llm_upstream_remaining_tokens{deployment=\"limited/gpt-4o-mini\"}",
        "sluice_llm_shed_total{reason=\"provider_budget\"} 1",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }
}

#[tokio::test]
async fn a_failing_deployment_is_cooled_down_and_requests_go_to_the_next() {
    let (failing, healthy) = (Llmock::start(&[]).await, Llmock::start(&[]).await);
    failing
        .script(json!([{ "type": "fail", "status": 503, "times": null }]))
        .await;
    let gateway = gateway(
        &[("failing", &failing), ("healthy", &healthy)],
        "",
        &[("public", &["failing", "healthy"])],
    )
    .await;
    let url = gateway.url("/v1/chat/completions");

    for _ in 0..6 {
        let body = json!({ "model": "public", "messages": [] });
        assert_eq!(send(chat(&url, body)).await.status, StatusCode::OK);
    }
    let failed = failing.journal().await.len();
    assert!(failed <= 1, "cooled down after its first 503: {failed}");
    assert_eq!(healthy.journal().await.len(), 6);
    let metrics = gateway.metrics().await;
    let series = "sluice_llm_failovers_total{deployment=\"failing/gpt-4o-mini\",reason=\"503\"}";
    assert_eq!(metric(&metrics, series), failed as f64, "{metrics}");
}

#[tokio::test]
async fn a_client_leaving_mid_stream_ends_the_providers_stream_within_a_second() {
    let mock = Llmock::start(&["--stream-chunk-delay-ms", "50"]).await;
    let gateway = gateway(&[("mock", &mock)], "", &[("public", &["mock"])]).await;
    mock.script(json!([{ "type": "reply", "text": words(200) }]))
        .await;

    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let body = json!({ "model": "public", "stream": true, "messages": [] });
    let request = chat(&gateway.url("/v1/chat/completions"), body).map(Full::new);
    let sent = Instant::now();
    let response = client.request(request).await.expect("response");
    let mut body = response.into_body();
    for _ in 0..3 {
        body.frame().await.expect("an event").expect("frame");
    }
    drop(body);
    drop(client);
    let left_after = sent.elapsed().as_secs_f64();

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let record = mock.journal().await.pop().expect("journaled");
    assert_eq!(record["completed"], false, "{record}");
    let duration = record["duration"].as_f64().expect("duration");
    assert!(
        duration < left_after + 1.0,
        "the stream ran {duration}s; the client left at {left_after}s"
    );
}

#[tokio::test]
async fn a_slow_first_token_then_2000_events_pass_with_flat_gateway_memory() {
    let mock = Llmock::start(&[]).await;
    let app = TestUpstream::start().await;
    let text = config_text(
        &app,
        &fragment(&[("mock", &mock)], "", &[("public", &["mock"])]),
    );
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_sluice-gateway"));
    let gateway = GatewayProcess::start(binary, &text).await;
    let url = format!("http://{}/v1/chat/completions", gateway.addr);
    let body = json!({ "model": "public", "stream": true, "messages": [] });

    mock.script(json!([{ "type": "reply", "text": words(50) }]))
        .await;
    stream(&url, body.clone()).await;
    let before = gateway.rss_bytes();

    mock.script(json!([
        { "type": "slow_first_token", "seconds": 1.5 },
        { "type": "reply", "text": words(2000) },
    ]))
    .await;
    let started = Instant::now();
    let (status, events) = stream(&url, body).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "the first token was slow"
    );
    assert!(events.len() >= 2000, "{} events", events.len());
    assert_eq!(events.last().expect("events").1, "data: [DONE]");

    let growth = gateway.rss_bytes().saturating_sub(before);
    assert!(growth < 5 << 20, "gateway memory grew by {growth} bytes");
}

#[tokio::test]
async fn a_policy_may_replace_the_token_estimate_and_a_client_may_not() {
    let mock = Llmock::start(&[]).await;
    let plain = fragment(
        &[("mock", &mock)],
        "consumer_tokens_per_minute = 100",
        &[("public", &["mock"])],
    );
    let with_policy = plain.replace(
        "upstream = \"mock\"\n[routes.llm]",
        "upstream = \"mock\"\npolicies = [\"estimate\"]\n[routes.llm]",
    ) + "[[plugins]]\nname = \"estimate\"\npath = \"{plugin:transform}\"\n\
         [plugins.config.request]\nset = { \"x-sluice-llm-estimate\" = \"90\" }\n";
    let app = TestUpstream::start().await;
    // About 60 tokens each without a policy: one fits in 100, whatever the client claims.
    let body = json!({ "model": "public", "max_tokens": 40, "messages": [] });
    let claiming_little = |url: &str| {
        let mut request = chat(url, body.clone());
        request
            .headers_mut()
            .insert("x-sluice-llm-estimate", "1".parse().expect("valid"));
        request
    };

    let gateway = TestGateway::start(&app, &plain).await;
    let url = gateway.url("/v1/chat/completions");
    assert_eq!(send(claiming_little(&url)).await.status, StatusCode::OK);
    mock.script(json!([{ "type": "delay", "seconds": 1 }]))
        .await;
    let (slow, second) = tokio::join!(send(claiming_little(&url)), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        send(claiming_little(&url)).await
    });
    assert_eq!(
        slow.status,
        StatusCode::OK,
        "settled usage made room for one more"
    );
    assert_eq!(
        second.status,
        StatusCode::TOO_MANY_REQUESTS,
        "the client's claim is ignored"
    );

    let gateway = TestGateway::start(&app, &with_policy).await;
    let url = gateway.url("/v1/chat/completions");
    mock.script(json!([{ "type": "delay", "seconds": 1 }]))
        .await;
    let (first, second) = tokio::join!(send(chat(&url, body.clone())), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        send(chat(&url, body.clone())).await
    });
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(
        second.status,
        StatusCode::TOO_MANY_REQUESTS,
        "the policy's 90 leaves 10"
    );
    let sent = mock.journal().await;
    assert!(sent.len() >= 3);
}

#[tokio::test]
async fn anthropic_messages_and_responses_streams_are_metered_from_their_usage_events() {
    let mock = Llmock::start(&[]).await;
    let app = TestUpstream::start().await;
    let fragment = format!(
        "[[upstreams]]\nname = \"mock\"\ntargets = [\"{}\"]\n\
         [[routes]]\nname = \"llm\"\npath_prefix = \"/\"\nupstream = \"mock\"\n[routes.llm]\n\
         [[routes.llm.models]]\nname = \"claude\"\n\
         deployments = [{{ upstream = \"mock\", model = \"claude-x\", provider = \"anthropic\" }}]\n\
         [[routes.llm.models]]\nname = \"public\"\n\
         deployments = [{{ upstream = \"mock\", model = \"gpt-4o-mini\" }}]\n",
        mock.addr
    );
    let gateway = TestGateway::start(&app, &fragment).await;

    let messages = json!({ "model": "claude", "stream": true, "max_tokens": 50,
        "messages": [{ "role": "user", "content": "hi" }] });
    let (status, events) = stream(&gateway.url("/anthropic/v1/messages"), messages).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        events.iter().any(|(_, e)| e.contains("message_stop")),
        "{events:?}"
    );
    let responses = json!({ "model": "public", "stream": true, "input": "hi" });
    let (status, events) = stream(&gateway.url("/v1/responses"), responses).await;
    assert_eq!(status, StatusCode::OK);
    assert!(events.iter().any(|(_, e)| e.contains("response.completed")));

    let metrics = gateway.metrics().await;
    for (provider, model) in [("anthropic", "claude"), ("openai", "public")] {
        let series = format!(
            "gen_ai_client_token_usage_sum{{gen_ai_provider_name=\"{provider}\",\
             gen_ai_request_model=\"{model}\",gen_ai_token_type=\"output\"}}"
        );
        assert!(metric(&metrics, &series) > 0.0, "{series}\n{metrics}");
    }
    let sent = mock.journal().await;
    assert_eq!(sent[0]["body"]["model"], "claude-x");
    assert_eq!(sent[1]["body"]["model"], "gpt-4o-mini");
}

#[tokio::test]
async fn budgets_survive_a_reload_that_leaves_the_route_unchanged() {
    let mock = Llmock::start(&[]).await;
    let app = TestUpstream::start().await;
    let llm = fragment(
        &[("mock", &mock)],
        "consumer_tokens_per_minute = 100",
        &[("public", &["mock"])],
    );
    let path = std::env::temp_dir().join(format!("sluice-llm-reload-{}.toml", mock.addr.port()));
    std::fs::write(&path, config_text(&app, &llm)).expect("write");
    let gateway = TestGateway::start_file(&path).await;
    let url = gateway.url("/v1/chat/completions");
    // About 75 tokens: one at a time fits in 100.
    let body = json!({ "model": "public", "max_tokens": 60, "messages": [] });

    mock.script(json!([{ "type": "delay", "seconds": 2 }]))
        .await;
    let in_flight = tokio::spawn(send(chat(&url, body.clone())));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let unrelated =
        "\n[[routes]]\nname = \"other\"\npath_prefix = \"/other\"\nupstream = \"app\"\n";
    std::fs::write(&path, config_text(&app, &(llm + unrelated))).expect("write");
    let (status, answer) = gateway.reload().await;
    assert_eq!(status, StatusCode::OK, "{answer}");

    let second = send(chat(&url, body)).await;
    assert_eq!(
        second.status,
        StatusCode::TOO_MANY_REQUESTS,
        "the reservation in flight still counts"
    );
    assert_eq!(in_flight.await.expect("task").status, StatusCode::OK);
    let _ = std::fs::remove_file(&path);
}

#[tokio::test]
async fn a_stream_that_stalls_past_the_idle_timeout_is_cut_not_ended_cleanly() {
    let mock = Llmock::start(&[]).await;
    let gateway = gateway(
        &[("mock", &mock)],
        "idle_timeout_ms = 500",
        &[("public", &["mock"])],
    )
    .await;
    mock.script(json!([
        { "type": "stream_fault", "kind": "stall", "after_chunks": 3, "stall_seconds": 20 },
    ]))
    .await;

    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let body = json!({ "model": "public", "stream": true, "messages": [] });
    let request = chat(&gateway.url("/v1/chat/completions"), body).map(Full::new);
    let started = Instant::now();
    let mut body = client.request(request).await.expect("response").into_body();
    let mut events = 0;
    let ended = loop {
        match body.frame().await {
            Some(Ok(_)) => events += 1,
            Some(Err(err)) => break Err(err),
            None => break Ok(()),
        }
    };
    assert!(
        ended.is_err(),
        "the client sees a broken stream, not a complete one"
    );
    assert!(events >= 3, "the events before the stall arrived");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "cut at the idle timeout"
    );
}
