//! Usage without client opt-in, end to end against the mock upstream: the
//! proxy asks for usage, hides it from clients that did not, and accounts
//! answers whose client went away.

use std::time::Duration;

use crate::support::*;
use claw_proto::Pool;
use claw_tests::mock::{MockConfig, MockUpstream};
use futures::StreamExt;

async fn mock(name: &str, config: MockConfig) -> MockUpstream {
    MockUpstream::start(config.name(name).api_key(format!("sk-up-{name}"))).await
}

/// `"created":<secs>` differs between two calls a second apart.
fn normalize(body: &str) -> String {
    let mut out = String::with_capacity(body.len());
    let mut rest = body;
    while let Some(at) = rest.find("\"created\":") {
        let (head, tail) = rest.split_at(at + "\"created\":".len());
        out.push_str(head);
        out.push('0');
        rest = tail.trim_start_matches(|c: char| c.is_ascii_digit());
    }
    out.push_str(rest);
    out
}

async fn direct(up: &MockUpstream, path: &str, body: &serde_json::Value) -> String {
    reqwest::Client::new()
        .post(format!("{}{path}", up.url()))
        .bearer_auth("sk-up-direct")
        .json(body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_without_include_usage_is_byte_identical_and_still_accounted() {
    for (path, body) in [
        (
            "/chat/completions",
            serde_json::json!({"model": "mock-model", "stream": true, "messages": [{"role": "user", "content": "one two three"}]}),
        ),
        (
            "/completions",
            serde_json::json!({"model": "mock-model", "stream": true, "prompt": "four five", "max_tokens": 7}),
        ),
    ] {
        // Two fresh mocks, so both answers carry the same ids.
        let reference = mock("direct", MockConfig::default()).await;
        let up = mock("a", MockConfig::default()).await;
        let mut p = TestProxy::start(snapshot(vec![backend(
            "a",
            &up.url(),
            Pool::Primary,
            &[("mock-model", "mock-model")],
        )]))
        .await;
        let expected = direct(&reference, path, &body).await;
        assert!(!expected.contains("\"usage\""), "{expected}");

        let res = p.post(&format!("/v1{path}"), body.clone()).await;
        assert_eq!(res.status(), 200);
        let got = res.text().await.unwrap();
        assert_eq!(normalize(&got), normalize(&expected));

        let rec = &up.wait_for_requests(1, Duration::from_secs(5)).await[0];
        assert!(rec.include_usage, "the proxy asks the upstream for usage");
        let o = p.next_outcome().await;
        let u = o.usage.expect("usage from the stream");
        assert!(!o.usage_estimated);
        assert_eq!(u.prompt_tokens, rec.prompt_tokens);
        assert_eq!(u.completion_tokens, rec.completion_tokens_sent);
        p.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_asked_for_usage_gets_it_untouched() {
    let reference = mock("direct", MockConfig::default()).await;
    let up = mock("a", MockConfig::default()).await;
    let mut p = TestProxy::start(snapshot(vec![backend(
        "a",
        &up.url(),
        Pool::Primary,
        &[("mock-model", "mock-model")],
    )]))
    .await;
    let body = serde_json::json!({"model": "mock-model", "stream": true, "stream_options": {"include_usage": true}, "messages": [{"role": "user", "content": "hi"}]});
    let expected = direct(&reference, "/chat/completions", &body).await;
    let got = p
        .post("/v1/chat/completions", body)
        .await
        .text()
        .await
        .unwrap();
    assert!(got.contains("\"usage\":{"));
    assert_eq!(normalize(&got), normalize(&expected));
    let o = p.next_outcome().await;
    assert_eq!(o.usage.unwrap().completion_tokens, 16);
    p.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_stream_is_accounted_for_what_was_produced() {
    let up = mock(
        "a",
        MockConfig::default()
            .completion_tokens(40)
            .chunk_delay(Duration::from_millis(10)),
    )
    .await;
    let mut p = TestProxy::start(snapshot(vec![backend(
        "a",
        &up.url(),
        Pool::Primary,
        &[("mock-model", "mock-model")],
    )]))
    .await;
    let res = p
        .post(
            "/v1/chat/completions",
            serde_json::json!({"model": "mock-model", "stream": true, "messages": [{"role": "user", "content": "count to forty please"}]}),
        )
        .await;
    let mut body = res.bytes_stream();
    // Read a few events, then hang up.
    let mut seen = 0;
    while seen < 3 {
        let chunk = body.next().await.unwrap().unwrap();
        seen += chunk.windows(6).filter(|w| w == b"data: ").count();
    }
    drop(body);

    let o = tokio::time::timeout(Duration::from_secs(10), p.outcomes.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(o.end, Some(claw_data_plane::stream::End::ClientGone));
    let rec = &up.wait_for_requests(1, Duration::from_secs(5)).await[0];
    assert_eq!(rec.completion_tokens_sent, 40, "the upstream finished");
    let u = o.usage.expect("usage of the drained answer");
    assert!(!o.usage_estimated);
    assert_eq!(u.prompt_tokens, rec.prompt_tokens);
    assert_eq!(u.completion_tokens, rec.completion_tokens_sent);
    p.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_by_the_upstream_is_estimated_from_its_content() {
    let up = mock("a", MockConfig::default()).await;
    up.push(claw_tests::mock::Action::reset_mid_stream(5));
    let mut p = TestProxy::start(snapshot(vec![backend(
        "a",
        &up.url(),
        Pool::Primary,
        &[("mock-model", "mock-model")],
    )]))
    .await;
    let text = p
        .post(
            "/v1/chat/completions",
            serde_json::json!({"model": "mock-model", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await
        .text()
        .await;
    let _ = text;
    let o = p.next_outcome().await;
    assert_eq!(o.end, Some(claw_data_plane::stream::End::UpstreamError));
    assert!(o.usage_estimated);
    assert_eq!(
        o.usage.unwrap().completion_tokens,
        up.wait_for_requests(1, Duration::from_secs(5)).await[0].completion_tokens_sent
    );
    p.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_and_non_streaming_answers_are_priced() {
    let up = mock("a", MockConfig::default()).await;
    let mut b = backend(
        "a",
        &up.url(),
        Pool::Primary,
        &[("mock-model", "mock-model")],
    );
    b.models[0].input_cost_per_token = 0.5;
    b.models[0].output_cost_per_token = 2.0;
    let mut p = TestProxy::start(snapshot(vec![b])).await;
    let res = p
        .post(
            "/v1/embeddings",
            serde_json::json!({"model": "mock-model", "input": "a b c"}),
        )
        .await;
    assert_eq!(res.status(), 200);
    let _ = res.bytes().await;
    let o = p.next_outcome().await;
    let u = o.usage.unwrap();
    assert_eq!((u.prompt_tokens, u.completion_tokens), (3, 0));
    assert_eq!(o.cost, Some(1.5));

    let _ = p.chat("mock-model").await.bytes().await;
    let o = p.next_outcome().await;
    let u = o.usage.unwrap();
    assert_eq!(o.cost, Some(u.prompt_tokens as f64 * 0.5 + 16.0 * 2.0));
    p.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_before_the_answer_is_counted_as_499() {
    let up = mock(
        "a",
        MockConfig::default().latency(Duration::from_millis(800)),
    )
    .await;
    let mut p = TestProxy::start(snapshot(vec![backend(
        "a",
        &up.url(),
        Pool::Primary,
        &[("mock-model", "mock-model")],
    )]))
    .await;
    let res = reqwest::Client::new()
        .post(p.url("/v1/chat/completions"))
        .bearer_auth(CLIENT_KEY)
        .header("x-claw-agent-id", "ag-1")
        .timeout(Duration::from_millis(150))
        .json(&serde_json::json!({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await;
    assert!(res.is_err(), "the client gave up");
    let o = p.next_outcome().await;
    assert_eq!(o.status, 499);
    assert_eq!(o.end, Some(claw_data_plane::stream::End::ClientGone));
    assert_eq!(o.attempts, 1);
    assert_eq!(o.agent_id.as_deref(), Some("ag-1"));
    assert!(o.usage.is_none());
    p.shutdown().await.unwrap();
}
