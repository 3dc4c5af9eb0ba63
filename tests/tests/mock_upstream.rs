//! The mock upstream itself: wire format, token accounting, scripts, record.

use claw_tests::mock::{Action, MockConfig, MockUpstream, Outcome, Rule};
use futures::StreamExt as _;
use serde_json::{Value, json};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(5);

async fn mock() -> MockUpstream {
    MockUpstream::start(MockConfig::default()).await
}

fn chat(model: &str, content: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": content}]})
}

async fn post(url: String, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(url)
        .json(body)
        .send()
        .await
        .expect("request sent")
}

/// The `data:` payloads of an SSE body, checking the exact framing.
fn sse_events(body: &str) -> Vec<String> {
    assert!(
        body.ends_with("\n\n"),
        "events end with a blank line: {body:?}"
    );
    body.trim_end_matches("\n\n")
        .split("\n\n")
        .map(|event| {
            event
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data event: {event:?}"))
                .to_owned()
        })
        .collect()
}

#[tokio::test]
async fn non_streaming_chat_counts_prompt_words_and_default_completion_tokens() {
    let m = mock().await;
    let resp = post(
        format!("{}/chat/completions", m.url()),
        &chat("gpt-x", "one two  three"),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "gpt-x");
    assert!(body["id"].as_str().is_some_and(|id| !id.is_empty()));
    assert!(body["created"].as_u64().is_some());
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    let content = body["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    assert_eq!(content.split(' ').count(), 16);
    assert!(content.starts_with("tok0 tok1 "));
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 16, "total_tokens": 19})
    );

    let t = m.totals();
    assert_eq!(
        (t.requests, t.ok, t.prompt_tokens, t.completion_tokens_sent),
        (1, 1, 3, 16)
    );
}

#[tokio::test]
async fn max_tokens_caps_the_completion() {
    let m = mock().await;
    let mut req = chat("m", "hi");
    req["max_tokens"] = json!(3);
    let body: Value = post(format!("{}/chat/completions", m.url()), &req)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(body["choices"][0]["message"]["content"], "tok0 tok1 tok2");
    assert_eq!(body["usage"]["completion_tokens"], 3);
}

#[tokio::test]
async fn streaming_without_include_usage_sends_role_tokens_finish_and_done() {
    let m = MockUpstream::start(MockConfig::default().completion_tokens(3)).await;
    let mut req = chat("gpt-s", "a b");
    req["stream"] = json!(true);
    let resp = post(format!("{}/chat/completions", m.url()), &req).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let events = sse_events(&resp.text().await.expect("complete body"));
    assert_eq!(events.len(), 1 + 3 + 1 + 1, "{events:#?}");
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("chunk is JSON"))
        .collect();
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["model"], "gpt-s");
        assert_eq!(c["id"], chunks[0]["id"]);
        assert!(
            c.get("usage").is_none(),
            "no usage field without include_usage"
        );
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks[1..4]
        .iter()
        .map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .expect("content")
        })
        .collect();
    assert_eq!(text, "tok0 tok1 tok2");
    assert_eq!(chunks[4]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[4]["choices"][0]["delta"], json!({}));

    let rec = m.wait_for_requests(1, WAIT).await;
    assert!(rec[0].stream && !rec[0].include_usage);
    assert_eq!(rec[0].completion_tokens_sent, 3);
    assert_eq!(rec[0].outcome, Outcome::Ok);
}

#[tokio::test]
async fn streaming_with_include_usage_sends_a_usage_chunk_before_done() {
    let m = MockUpstream::start(MockConfig::default().completion_tokens(2)).await;
    let mut req = chat("m", "w1 w2 w3 w4");
    req["stream"] = json!(true);
    req["stream_options"] = json!({"include_usage": true});
    let resp = post(format!("{}/chat/completions", m.url()), &req).await;
    let events = sse_events(&resp.text().await.expect("complete body"));
    assert_eq!(events.len(), 1 + 2 + 1 + 1 + 1, "{events:#?}");
    assert_eq!(events[5], "[DONE]");
    let usage: Value = serde_json::from_str(&events[4]).expect("JSON");
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(
        usage["usage"],
        json!({"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6})
    );
    for e in &events[..4] {
        let c: Value = serde_json::from_str(e).expect("JSON");
        assert_eq!(c["usage"], Value::Null, "other chunks carry usage: null");
    }
    let rec = m.wait_for_requests(1, WAIT).await;
    assert!(rec[0].include_usage);
}

#[tokio::test]
async fn text_completions_stream_and_embeddings_and_models_answer() {
    let m = MockUpstream::start(
        MockConfig::default()
            .completion_tokens(2)
            .models(["a", "b"]),
    )
    .await;
    let body: Value = post(
        format!("{}/completions", m.url()),
        &json!({"model": "c", "prompt": "x y"}),
    )
    .await
    .json()
    .await
    .expect("json");
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["choices"][0]["text"], "tok0 tok1");
    assert_eq!(body["usage"]["prompt_tokens"], 2);

    let req = json!({"model": "c", "prompt": "x", "stream": true});
    let text = post(format!("{}/completions", m.url()), &req)
        .await
        .text()
        .await
        .expect("body");
    let events = sse_events(&text);
    assert_eq!(
        events.len(),
        2 + 1 + 1,
        "no role chunk for text completions: {events:#?}"
    );
    let first: Value = serde_json::from_str(&events[0]).expect("JSON");
    assert_eq!(first["choices"][0]["text"], "tok0");

    let req = json!({"model": "e", "input": ["hello world", "hello world"]});
    let emb: Value = post(format!("{}/embeddings", m.url()), &req)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(emb["usage"], json!({"prompt_tokens": 4, "total_tokens": 4}));
    assert_eq!(
        emb["data"][0]["embedding"], emb["data"][1]["embedding"],
        "deterministic"
    );
    assert_eq!(
        emb["data"][0]["embedding"].as_array().map(Vec::len),
        Some(8)
    );

    let models: Value = reqwest::get(format!("{}/models", m.url()))
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(models["data"][1]["id"], "b");
}

#[tokio::test]
async fn scripted_429_carries_retry_after_then_the_next_request_succeeds() {
    let m = mock().await;
    m.push(Action::rate_limited(Some(2)));
    let url = format!("{}/chat/completions", m.url());
    let resp = post(url.clone(), &chat("m", "hi")).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "2");
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(post(url, &chat("m", "hi")).await.status(), 200);

    let rec = m.wait_for_requests(2, WAIT).await;
    assert_eq!(rec[0].outcome, Outcome::Status(429));
    assert_eq!(rec[1].outcome, Outcome::Ok);
    let t = m.totals();
    assert_eq!(
        (t.http_errors, t.ok, t.prompt_tokens),
        (1, 1, 1),
        "a 429 bills nothing"
    );
}

#[tokio::test]
async fn scripted_actions_can_target_one_model_and_always_applies_to_the_rest() {
    let m = mock().await;
    let url = format!("{}/chat/completions", m.url());
    m.push(Action::status(500).for_model("b"));
    m.set_always(Some(Action::reply("steady")));
    assert_eq!(post(url.clone(), &chat("a", "x")).await.status(), 200);
    assert_eq!(post(url.clone(), &chat("b", "x")).await.status(), 500);
    let body: Value = post(url, &chat("b", "x")).await.json().await.expect("json");
    assert_eq!(body["choices"][0]["message"]["content"], "steady");
    assert_eq!(m.pending(), 0);
}

#[tokio::test]
async fn a_custom_status_and_body_are_sent_verbatim() {
    let m = mock().await;
    m.push(Action::status(503).with_body(json!("upstream overloaded")));
    let resp = post(format!("{}/chat/completions", m.url()), &chat("m", "x")).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.text().await.expect("body"), "upstream overloaded");
}

#[tokio::test]
async fn reset_mid_stream_gives_the_client_an_incomplete_body() {
    let m = mock().await;
    m.push(Action::reset_mid_stream(3));
    let mut req = chat("m", "x");
    req["stream"] = json!(true);
    let resp = post(format!("{}/chat/completions", m.url()), &req).await;
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut received = Vec::new();
    let error = loop {
        match stream.next().await {
            Some(Ok(bytes)) => received.extend_from_slice(&bytes),
            Some(Err(e)) => break e,
            None => panic!(
                "the stream ended cleanly: {}",
                String::from_utf8_lossy(&received)
            ),
        }
    };
    assert!(error.is_body() || error.is_decode(), "{error:?}");
    let text = String::from_utf8_lossy(&received);
    assert_eq!(
        text.matches("\"content\":\"").count(),
        1 + 3,
        "role + 3 tokens: {text}"
    );
    assert!(!text.contains("[DONE]"));

    let rec = m.wait_for_requests(1, WAIT).await;
    assert_eq!(rec[0].outcome, Outcome::Reset);
    assert_eq!(rec[0].completion_tokens_sent, 3);
    assert_eq!(m.totals().completion_tokens_sent, 3);
}

#[tokio::test]
async fn reset_before_closes_the_connection_without_a_response() {
    let m = mock().await;
    m.push(Action::reset_before());
    let err = reqwest::Client::new()
        .post(format!("{}/chat/completions", m.url()))
        .json(&chat("m", "x"))
        .send()
        .await
        .expect_err("no response");
    assert!(!err.is_status(), "{err:?}");
    let rec = m.wait_for_requests(1, WAIT).await;
    assert_eq!((rec[0].outcome, rec[0].status), (Outcome::Reset, None));
}

#[tokio::test]
async fn a_client_leaving_mid_stream_is_recorded_with_the_tokens_sent() {
    let m = MockUpstream::start(
        MockConfig::default()
            .completion_tokens(50)
            .chunk_delay(Duration::from_millis(20)),
    )
    .await;
    let mut req = chat("m", "x");
    req["stream"] = json!(true);
    let resp = post(format!("{}/chat/completions", m.url()), &req).await;
    let mut stream = resp.bytes_stream();
    let mut text = String::new();
    while text.matches("tok").count() < 2 {
        let bytes = stream.next().await.expect("more").expect("ok");
        text.push_str(&String::from_utf8_lossy(&bytes));
    }
    drop(stream);
    let rec = m.wait_for_requests(1, WAIT).await;
    assert_eq!(rec[0].outcome, Outcome::ClientGone);
    assert!(
        (2..50).contains(&rec[0].completion_tokens_sent),
        "{}",
        rec[0].completion_tokens_sent
    );
}

#[tokio::test]
async fn the_record_keeps_lowercased_headers_model_and_body() {
    let m = mock().await;
    let req = chat("gpt-rec", "hello");
    reqwest::Client::new()
        .post(format!("{}/chat/completions", m.url()))
        .header("X-Claw-Agent-Id", "agent-7")
        .bearer_auth("sk-upstream")
        .json(&req)
        .send()
        .await
        .expect("sent");
    let rec = m.wait_for_requests(1, WAIT).await;
    let r = &rec[0];
    assert_eq!(
        (r.method.as_str(), r.path.as_str()),
        ("POST", "/v1/chat/completions")
    );
    assert_eq!(r.model.as_deref(), Some("gpt-rec"));
    assert_eq!(
        r.headers.get("x-claw-agent-id").map(String::as_str),
        Some("agent-7")
    );
    assert_eq!(r.header("Authorization"), Some("Bearer sk-upstream"));
    assert_eq!(r.body, req);
    assert_eq!(r.prompt_tokens, 1);
    assert!(r.timestamp_ms > 0);
    m.reset();
    assert!(m.requests().is_empty());
    assert_eq!(m.totals().requests, 0);
}

#[tokio::test]
async fn with_an_api_key_other_credentials_get_401_in_openai_format() {
    let m = MockUpstream::start(MockConfig::default().api_key("sk-real")).await;
    let url = format!("{}/chat/completions", m.url());
    for auth in [None, Some("sk-client")] {
        let mut req = reqwest::Client::new().post(&url).json(&chat("m", "x"));
        if let Some(key) = auth {
            req = req.bearer_auth(key);
        }
        let resp = req.send().await.expect("sent");
        assert_eq!(resp.status(), 401);
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body["error"]["code"], "invalid_api_key");
        assert!(body["error"]["message"].is_string());
    }
    let ok = reqwest::Client::new()
        .post(&url)
        .bearer_auth("sk-real")
        .json(&chat("m", "x"))
        .send()
        .await
        .expect("sent");
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn header_rules_give_each_agent_its_own_reply_and_name_is_echoed() {
    let m = MockUpstream::start(MockConfig::default().name("up-1").reply("HEARTBEAT_OK")).await;
    m.add_rule(Rule::header(
        "x-claw-agent-id",
        "agent-b",
        Action::reply("ALERT: disk full"),
    ));
    let url = format!("{}/chat/completions", m.url());
    let mut replies = Vec::new();
    for agent in ["agent-a", "agent-b"] {
        let resp = reqwest::Client::new()
            .post(&url)
            .header("x-claw-agent-id", agent)
            .json(&chat("m", "check"))
            .send()
            .await
            .expect("sent");
        assert_eq!(resp.headers()["x-mock-name"], "up-1");
        let body: Value = resp.json().await.expect("json");
        replies.push(body["choices"][0]["message"]["content"].clone());
        assert_eq!(
            body["usage"]["completion_tokens"],
            body["choices"][0]["message"]["content"]
                .as_str()
                .map_or(0, |s| s.split_whitespace().count())
        );
    }
    assert_eq!(replies, [json!("HEARTBEAT_OK"), json!("ALERT: disk full")]);
}

#[tokio::test]
async fn the_control_api_scripts_and_reports_over_http() {
    let m = mock().await;
    let client = reqwest::Client::new();
    let base = m.base_url();
    let pushed: Value = client
        .post(format!("{base}/_mock/script"))
        .json(&json!([{"status": 429, "retry_after": 1}, {"reply": "two words"}]))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(pushed["pending"], 2);
    let rule = json!({"match_header": ["x-claw-agent-id", "z"], "delay_ms": 1});
    let resp = client
        .post(format!("{base}/_mock/rules"))
        .json(&rule)
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 200);
    let bad = client
        .post(format!("{base}/_mock/script"))
        .json(&json!({"stauts": 500}))
        .send()
        .await
        .expect("sent");
    assert_eq!(bad.status(), 400, "unknown fields are refused");

    let url = format!("{}/chat/completions", m.url());
    assert_eq!(post(url.clone(), &chat("m", "x")).await.status(), 429);
    let body: Value = post(url, &chat("m", "x")).await.json().await.expect("json");
    assert_eq!(body["usage"]["completion_tokens"], 2);

    let totals: Value = reqwest::get(format!("{base}/_mock/totals"))
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(totals["requests"], 2);
    assert_eq!(totals["completion_tokens_sent"], 2);
    let records: Vec<Value> = reqwest::get(format!("{base}/_mock/requests?since=1"))
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["outcome"], "ok");

    client
        .post(format!("{base}/_mock/reset"))
        .send()
        .await
        .expect("sent");
    assert_eq!(m.totals().requests, 0);
}

#[tokio::test]
async fn without_the_record_totals_still_count() {
    let m = MockUpstream::start(MockConfig::default().no_record()).await;
    post(format!("{}/chat/completions", m.url()), &chat("m", "a b")).await;
    let t = m.totals();
    assert_eq!(
        (t.requests, t.prompt_tokens, t.completion_tokens_sent),
        (1, 2, 16)
    );
    assert!(m.requests().is_empty());
}

#[tokio::test]
async fn dropping_the_mock_closes_its_port() {
    let m = mock().await;
    let addr = m.addr();
    drop(m);
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
