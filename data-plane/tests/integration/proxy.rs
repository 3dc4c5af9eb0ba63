//! End-to-end tests: the proxy started with a static snapshot in front of
//! mock OpenAI upstreams (`claw_tests::mock`).

use std::time::{Duration, Instant};

use crate::support::*;
use claw_proto::Pool;
use claw_tests::mock::{Action, MockConfig, MockUpstream, Outcome};
use futures::StreamExt;

async fn mock(name: &str) -> MockUpstream {
    MockUpstream::start(
        MockConfig::default()
            .name(name)
            .api_key(format!("sk-up-{name}")),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_streaming_chat_rewrites_model_and_replaces_credentials() {
    let up = mock("a").await;
    let mut p = TestProxy::start(snapshot(vec![backend(
        "a",
        &up.url(),
        Pool::Primary,
        &[("gpt-canon", "mock-model")],
    )]))
    .await;
    let res = reqwest::Client::new()
        .post(p.url("/v1/chat/completions"))
        .bearer_auth(CLIENT_KEY)
        .header("x-claw-agent-id", "agent-7")
        .header("connection", "keep-alive, x-secret-hop")
        .header("x-secret-hop", "1")
        .json(&serde_json::json!({"model": "gpt-canon", "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let v: serde_json::Value = res.json().await.unwrap();
    assert!(v["choices"][0]["message"]["content"].is_string(), "{v}");

    let reqs = up.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.path, "/v1/chat/completions");
    assert_eq!(r.model.as_deref(), Some("mock-model"));
    assert_eq!(r.header("authorization"), Some("Bearer sk-up-a"));
    assert_eq!(r.header("x-claw-agent-id"), Some("agent-7"));
    assert_eq!(r.header("x-secret-hop"), None);
    assert_eq!(r.body["max_tokens"], 5);

    let o = p.next_outcome().await;
    assert_eq!(o.status, 200);
    assert_eq!(&*o.model, "gpt-canon");
    assert_eq!(o.backend_id.as_deref(), Some("a"));
    assert_eq!(o.agent_id.as_deref(), Some("agent-7"));
    assert_eq!(&*o.client_key_id, "ck_test");
    assert_eq!(o.attempts, 1);
    assert!(!o.streamed);
    assert!(
        o.usage
            .is_some_and(|u| u.prompt_tokens > 0 && u.completion_tokens == 5)
    );
    p.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_chat_passes_sse_through() {
    let up = mock("a").await;
    let mut p = TestProxy::start(snapshot(vec![backend(
        "a",
        &up.url(),
        Pool::Primary,
        &[("gpt", "mock-model")],
    )]))
    .await;
    let res = p
        .post(
            "/v1/chat/completions",
            serde_json::json!({"model": "gpt", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(res.status(), 200);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let body = res.text().await.unwrap();
    assert!(body.contains("data: "), "{body}");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    let o = p.next_outcome().await;
    assert!(o.streamed);
    assert!(o.ttft.is_some());
    assert_eq!(o.end, Some(claw_data_plane::stream::End::Complete));
    p.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_on_primary_is_answered_by_fallback_and_cools_primary() {
    let primary = mock("p").await;
    let fallback = mock("f").await;
    let mut p = TestProxy::start(snapshot(vec![
        backend("p", &primary.url(), Pool::Primary, &[("gpt", "mock-model")]),
        backend(
            "f",
            &fallback.url(),
            Pool::Fallback,
            &[("gpt", "mock-model")],
        ),
    ]))
    .await;
    primary.push(Action::rate_limited(None));
    let res = p.chat("gpt").await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-mock-name"], "f");
    let ev = p.cooldowns.recv().await.unwrap();
    assert_eq!(&*ev.backend_id, "p");
    assert_eq!(ev.consecutive, 1);
    // Default pool cooldown base: 5 s.
    let left = ev.until - tokio::time::Instant::now();
    assert!(
        left > Duration::from_secs(3) && left <= Duration::from_secs(5),
        "{left:?}"
    );
    let o = p.next_outcome().await;
    assert_eq!(o.attempts, 2);
    // Primary is cooling: the next request goes straight to the fallback.
    let res = p.chat("gpt").await;
    assert_eq!(res.headers()["x-mock-name"], "f");
    assert_eq!(primary.totals().requests, 1);
    assert_eq!(fallback.totals().requests, 2);
    p.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_sets_the_cooldown() {
    let a = mock("a").await;
    let b = mock("b").await;
    let mut p = TestProxy::start(snapshot(vec![
        backend("a", &a.url(), Pool::Primary, &[("gpt", "mock-model")]),
        backend("b", &b.url(), Pool::Fallback, &[("gpt", "mock-model")]),
    ]))
    .await;
    a.push(Action::rate_limited(Some(1)));
    assert_eq!(p.chat("gpt").await.status(), 200);
    let ev = p.cooldowns.recv().await.unwrap();
    assert_eq!(ev.retry_after, Some(Duration::from_secs(1)));
    assert_eq!(p.chat("gpt").await.headers()["x-mock-name"], "b");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(p.chat("gpt").await.headers()["x-mock-name"], "a");
    p.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundreds_and_resets_retry_on_another_backend() {
    let a = mock("a").await;
    let b = mock("b").await;
    let p = TestProxy::start(snapshot(vec![
        backend("a", &a.url(), Pool::Primary, &[("gpt", "mock-model")]),
        backend("b", &b.url(), Pool::Primary, &[("gpt", "mock-model")]),
    ]))
    .await;
    a.set_always(Some(Action::status(500)));
    b.set_always(Some(Action::reset_before()));
    // Both fail: 502 in OpenAI format, after two attempts.
    let (status, v) = error_of(p.chat("gpt").await).await;
    assert_eq!(status, 502, "{v}");
    assert_eq!(v["error"]["type"], "upstream_error");
    b.set_always(None);
    for _ in 0..4 {
        let res = p.chat("gpt").await;
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["x-mock-name"], "b");
    }
    p.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_cooling_admits_emergency_then_503_with_retry_after() {
    let a = mock("a").await;
    let mut be = backend("a", &a.url(), Pool::Primary, &[("gpt", "mock-model")]);
    be.rpm = 20; // emergency: 0.05 × 20 = 1 per minute
    let p = TestProxy::start(snapshot(vec![be])).await;
    a.push(Action::rate_limited(Some(30)));
    // The 429 cools the only backend; the client gets 429 with Retry-After.
    let res = p.chat("gpt").await;
    assert_eq!(res.status(), 429);
    let ra: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((29..=30).contains(&ra), "{ra}");
    // Everything cools: the emergency bucket lets one through.
    assert_eq!(p.chat("gpt").await.status(), 200);
    // Then 503 with Retry-After until the cooldown ends.
    let res = p.chat("gpt").await;
    let ra: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((28..=30).contains(&ra), "{ra}");
    let (status, v) = error_of(res).await;
    assert_eq!(status, 503);
    assert_eq!(v["error"]["code"], "no_backend_available");
    assert_eq!(a.totals().requests, 2);
    p.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_requests_wait_in_the_queue() {
    let a = mock("a").await;
    let mut be = backend("a", &a.url(), Pool::Primary, &[("gpt", "mock-model")]);
    be.rpm = 60; // one request per second
    let mut snap = snapshot(vec![be]);
    let mut pool = claw_proto::validate::default_pool_settings(Pool::Primary);
    pool.queue_timeout_ms = 3_000;
    pool.queue_depth = 1;
    snap.pools = vec![pool];
    let p = TestProxy::start(snap).await;
    // Take this second's request: the next conforms in just under a second.
    // (The limiter paces at the rate; taking 60 at once would block it for
    // a minute, where the old bucket merely emptied.)
    let s = p.store.load().unwrap();
    let rt = &s.backend("a").unwrap().runtime;
    assert!(rt.rpm.try_acquire(1.0, tokio::time::Instant::now()).is_ok());

    let t = Instant::now();
    let first = p.chat("gpt");
    let second = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The queue (depth 1) is taken: rejected at once with 429.
        p.chat("gpt").await
    };
    let (first, second) = tokio::join!(first, second);
    assert_eq!(first.status(), 200);
    assert!(
        t.elapsed() >= Duration::from_millis(700),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(second.status(), 429);
    assert!(second.headers().contains_key("retry-after"));
    let (_, v) = error_of(second).await;
    assert_eq!(v["error"]["type"], "rate_limit_error");
    p.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_timeout_answers_429() {
    let a = mock("a").await;
    let mut be = backend("a", &a.url(), Pool::Primary, &[("gpt", "mock-model")]);
    be.rpm = 1;
    let mut snap = snapshot(vec![be]);
    let mut pool = claw_proto::validate::default_pool_settings(Pool::Primary);
    pool.queue_timeout_ms = 300;
    snap.pools = vec![pool];
    let p = TestProxy::start(snap).await;
    assert_eq!(p.chat("gpt").await.status(), 200);
    let t = Instant::now();
    let res = p.chat("gpt").await;
    assert_eq!(res.status(), 429);
    assert!(t.elapsed() >= Duration::from_millis(250));
    let ra: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(ra >= 1);
    p.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mid_stream_reset_sends_an_sse_error_event_and_no_done() {
    let a = mock("a").await;
    let mut p = TestProxy::start(snapshot(vec![backend(
        "a",
        &a.url(),
        Pool::Primary,
        &[("gpt", "mock-model")],
    )]))
    .await;
    a.push(Action::reset_mid_stream(2));
    let res = p
        .post(
            "/v1/chat/completions",
            serde_json::json!({"model": "gpt", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(res.status(), 200);
    let mut stream = res.bytes_stream();
    let mut seen = Vec::new();
    let mut errored = false;
    while let Some(item) = stream.next().await {
        match item {
            Ok(b) => seen.extend_from_slice(&b),
            Err(_) => {
                errored = true;
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&seen);
    assert!(
        text.contains("\"code\":\"upstream_disconnected\""),
        "{text}"
    );
    assert!(!text.contains("[DONE]"), "{text}");
    assert!(errored, "the body must end with an error, not cleanly");
    let o = p.next_outcome().await;
    assert_eq!(o.end, Some(claw_data_plane::stream::End::UpstreamError));
    assert_eq!(a.requests()[0].outcome, Outcome::Reset);
    p.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_openai_errors() {
    let a = mock("a").await;
    let mut snap = snapshot(vec![backend(
        "a",
        &a.url(),
        Pool::Primary,
        &[("gpt", "mock-model"), ("secret-model", "mock-model")],
    )]);
    let mut limited = client_key("ck_lim", "sk-limited");
    limited.models = vec!["gpt".into()];
    snap.client_keys.push(limited);
    let limits = claw_data_plane::ServerLimits {
        max_body_bytes: 1024,
        ..Default::default()
    };
    let p = TestProxy::start_with(snap, limits).await;
    let c = reqwest::Client::new();
    let url = p.url("/v1/chat/completions");

    // 401: no key, unknown key.
    let (s, v) = error_of(
        c.post(&url)
            .json(&serde_json::json!({"model":"gpt"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (401, Some("invalid_api_key"))
    );
    let (s, _) = error_of(
        c.post(&url)
            .bearer_auth("nope")
            .body("{}")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 401);

    let send = |body: Vec<u8>| {
        let c = c.clone();
        let url = url.clone();
        async move {
            error_of(
                c.post(&url)
                    .bearer_auth(CLIENT_KEY)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .unwrap(),
            )
            .await
        }
    };
    assert_eq!(send(b"{not json".to_vec()).await.0, 400);
    assert_eq!(send(b"".to_vec()).await.0, 400);
    let (s, v) = send(br#"{"messages":[]}"#.to_vec()).await;
    assert_eq!((s, v["error"]["param"].as_str()), (400, Some("model")));
    assert_eq!(send(br#"{"model":7}"#.to_vec()).await.0, 400);
    assert_eq!(send(b"{\"model\":\"gpt\xff\"}".to_vec()).await.0, 400);
    assert_eq!(send(b"\xff\xfe".to_vec()).await.0, 400);
    let (s, v) = send(br#"{"model":"nope"}"#.to_vec()).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );
    let (s, v) =
        send(format!(r#"{{"model":"gpt","x":"{}"}}"#, "a".repeat(2000)).into_bytes()).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (413, Some("request_too_large"))
    );
    // 413 also without a Content-Length (chunked body).
    let chunks = futures::stream::iter(vec![
        Ok::<_, std::io::Error>(vec![b' '; 800]),
        Ok(vec![b' '; 800]),
    ]);
    let res = c
        .post(&url)
        .bearer_auth(CLIENT_KEY)
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(res).await.0, 413);

    // 403: the key may not use the model.
    let res = c
        .post(&url)
        .bearer_auth("sk-limited")
        .json(&serde_json::json!({"model":"secret-model"}))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(res).await.0, 403);
    // 405 and 404.
    let res = c.get(&url).bearer_auth(CLIENT_KEY).send().await.unwrap();
    assert_eq!(error_of(res).await.0, 405);
    let res = c.get(p.url("/nope")).send().await.unwrap();
    assert_eq!(error_of(res).await.0, 404);
    // Nothing reached the upstream.
    assert_eq!(a.totals().requests, 0);
    p.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_health_readiness_and_metrics() {
    let a = mock("a").await;
    let mut snap = snapshot(vec![backend(
        "a",
        &a.url(),
        Pool::Primary,
        &[("gpt", "m"), ("emb", "e")],
    )]);
    let mut limited = client_key("ck_lim", "sk-limited");
    limited.models = vec!["emb".into()];
    snap.client_keys.push(limited);
    let p = TestProxy::start(snap).await;
    let c = reqwest::Client::new();
    let v: serde_json::Value = c
        .get(p.url("/v1/models"))
        .bearer_auth(CLIENT_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "list");
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["emb", "gpt"]);
    assert_eq!(v["data"][0]["object"], "model");
    assert_eq!(v["data"][0]["owned_by"], "claw");
    let v: serde_json::Value = c
        .get(p.url("/v1/models"))
        .bearer_auth("sk-limited")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 1);
    assert_eq!(c.get(p.url("/healthz")).send().await.unwrap().status(), 200);
    assert_eq!(c.get(p.url("/readyz")).send().await.unwrap().status(), 200);
    // Embeddings go through too.
    let res = p
        .post(
            "/v1/embeddings",
            serde_json::json!({"model": "emb", "input": "hello"}),
        )
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(a.requests()[0].path, "/v1/embeddings");
    let m = c
        .get(p.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "claw_dp_requests_total",
        "claw_dp_upstream_attempts_total",
        "gen_ai_server_request_duration_seconds",
        "claw_dp_snapshot_version",
        "claw_dp_cooldowns_active",
    ] {
        assert!(m.contains(name), "{name} missing from\n{m}");
    }
    p.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_streams() {
    let a = MockUpstream::start(MockConfig::default().chunk_delay(Duration::from_millis(50))).await;
    let mut p = TestProxy::start(snapshot(vec![backend(
        "a",
        &a.url(),
        Pool::Primary,
        &[("gpt", "mock-model")],
    )]))
    .await;
    let res = p
        .post(
            "/v1/chat/completions",
            serde_json::json!({"model": "gpt", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(res.status(), 200);
    p.trigger_shutdown();
    let body = res.text().await.unwrap();
    assert!(body.contains("[DONE]"), "{body}");
    tokio::time::timeout(Duration::from_secs(5), p.join())
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_key_over_its_rpm_gets_429_with_retry_after() {
    let a = mock("a").await;
    let mut snap = snapshot(vec![backend(
        "a",
        &a.url(),
        Pool::Primary,
        &[("gpt", "mock-model")],
    )]);
    snap.client_keys[0].rpm = 1;
    let p = TestProxy::start(snap).await;
    assert_eq!(p.chat("gpt").await.status(), 200);
    let res = p.chat("gpt").await;
    let ra: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&ra), "{ra}");
    let (status, v) = error_of(res).await;
    assert_eq!(status, 429);
    assert_eq!(v["error"]["type"], "rate_limit_error");
    assert_eq!(a.totals().requests, 1);
    p.shutdown().await.unwrap();
}
