//! The mock upstream's Anthropic Messages and OpenAI Responses, checked
//! directly (no proxy): against the official Python SDKs, the wire formats
//! byte by byte, the simulated per-account prompt cache, the response store
//! and the exact-bytes record. The gateway's tests trust these answers, so
//! they must be the real providers' shapes.

use crate::data_plane_support::run_python_checks;
use claw_tests::mock::{Action, MockConfig, MockUpstream, Outcome};
use serde_json::{Value, json};
use std::time::Duration;

const KEY: &str = "sk-ant-mock-0123456789";
const WAIT: Duration = Duration::from_secs(5);

async fn mock() -> MockUpstream {
    MockUpstream::start(MockConfig::default().api_key(KEY).name("m")).await
}

/// `POST {mock}/v1/messages` with Anthropic headers and a raw body.
async fn messages(m: &MockUpstream, path: &str, body: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}{path}", m.url()))
        .header("x-api-key", KEY)
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .expect("request sent")
}

/// `(event name, data JSON)` of each SSE event, checking the framing.
fn named_events(body: &str) -> Vec<(String, Value)> {
    assert!(body.ends_with("\n\n"), "events end with a blank line");
    body.trim_end_matches("\n\n")
        .split("\n\n")
        .map(|e| {
            let (name, data) = e
                .strip_prefix("event: ")
                .and_then(|e| e.split_once("\ndata: "))
                .unwrap_or_else(|| panic!("not an `event:`/`data:` pair: {e:?}"));
            let data: Value = serde_json::from_str(data).expect("JSON data");
            assert_eq!(data["type"], name, "the data's type names the event");
            (name.to_owned(), data)
        })
        .collect()
}

#[test]
fn the_official_anthropic_sdk_accepts_the_mock() {
    let m = MockUpstream::start_blocking(MockConfig::default().api_key(KEY).models(["claude-x"]));
    run_python_checks(
        "anthropic_sdk_check.py",
        "anthropic",
        &[
            ("CLAW_BASE_URL", m.base_url()),
            ("CLAW_API_KEY", KEY.to_owned()),
            ("CLAW_MODEL", "claude-x".to_owned()),
            ("CLAW_SKIP", "unknown_model".to_owned()),
        ],
        &[
            "ok messages",
            "ok stream",
            "ok count_tokens",
            "ok cache",
            "ok bad key",
            "ok models.retrieve",
        ],
        String::new,
    );
}

/// The mock's tool calls as the SDKs parse them: the openai SDK's full
/// round trip on the mock's chat endpoint (JSON and streamed argument
/// deltas), the anthropic SDK's streamed `tool_use` and the `tool_result`
/// follow-up on its Messages endpoint.
#[test]
fn the_official_sdks_accept_the_mocks_tool_calls() {
    let m = MockUpstream::start_blocking(MockConfig::default().api_key(KEY).models(["m-x"]));
    run_python_checks(
        "openai_tools_check.py",
        "openai",
        &[
            ("CLAW_BASE_URL", m.url()),
            ("CLAW_API_KEY", KEY.to_owned()),
            ("CLAW_MODEL", "m-x".to_owned()),
        ],
        &["ok tools json", "ok tools stream"],
        String::new,
    );
    run_python_checks(
        "anthropic_translated_check.py",
        "anthropic",
        &[
            ("CLAW_BASE_URL", m.base_url()),
            ("CLAW_API_KEY", KEY.to_owned()),
            ("CLAW_MODEL", "m-x".to_owned()),
            ("CLAW_ONLY", "tool".to_owned()),
        ],
        &["ok tool stream"],
        String::new,
    );
}

#[test]
fn the_official_openai_sdk_accepts_the_mocks_responses() {
    let m = MockUpstream::start_blocking(MockConfig::default().api_key(KEY).models(["gpt-x"]));
    run_python_checks(
        "openai_responses_check.py",
        "openai",
        &[
            ("CLAW_BASE_URL", m.url()),
            ("CLAW_API_KEY", KEY.to_owned()),
            ("CLAW_MODEL", "gpt-x".to_owned()),
        ],
        &[
            "ok responses ",
            "ok responses stream",
            "ok responses continue",
            "ok responses retrieve",
            "ok responses delete",
            "ok responses unknown previous -> 400 previous_response_not_found",
            "ok models.retrieve",
        ],
        String::new,
    );
}

#[tokio::test]
async fn messages_need_the_key_and_the_version_and_fail_in_anthropic_shape() {
    let m = mock().await;
    let body = r#"{"model":"c","max_tokens":4,"messages":[{"role":"user","content":"hi"}]}"#;
    let http = reqwest::Client::new();
    let url = format!("{}/messages", m.url());
    for (name, value, status) in [
        ("x-api-key", "sk-wrong".to_owned(), 401),
        ("authorization", "Bearer sk-wrong".to_owned(), 401),
        // The official SDK 2.x sends its key this way.
        ("authorization", format!("Bearer {KEY}"), 200),
    ] {
        let r = http
            .post(&url)
            .header(name, value)
            .header("anthropic-version", "2023-06-01")
            .body(body)
            .send()
            .await
            .expect("sent");
        assert_eq!(r.status(), status, "{name}");
        if status == 401 {
            let v: Value = r.json().await.expect("json");
            assert_eq!(v["type"], "error");
            assert_eq!(v["error"]["type"], "authentication_error");
        }
    }
    let r = http
        .post(&url)
        .header("x-api-key", KEY)
        .body(body)
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|s| s.contains("anthropic-version")),
        "{v}"
    );
    let r = messages(&m, "/messages", r#"{"model":"c","messages":[]}"#).await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"]["message"], "max_tokens: Field required");

    for (status, kind, retry) in [
        (429, "rate_limit_error", Some(7)),
        (529, "overloaded_error", None),
        (404, "not_found_error", None),
        (401, "authentication_error", None),
        (500, "api_error", None),
    ] {
        let mut action = Action::status(status);
        action.retry_after = retry;
        m.push(action);
        let r = messages(&m, "/messages", body).await;
        assert_eq!(r.status().as_u16(), status);
        assert_eq!(
            r.headers().get("retry-after").and_then(|v| v.to_str().ok()),
            retry.map(|s| s.to_string()).as_deref()
        );
        let v: Value = r.json().await.expect("json");
        assert_eq!(v["type"], "error", "{v}");
        assert_eq!(v["error"]["type"], kind, "{v}");
        assert!(v["error"]["message"].is_string());
    }
    // The same script on an OpenAI endpoint keeps OpenAI's shape.
    m.push(Action::rate_limited(Some(1)));
    let r = reqwest::Client::new()
        .post(format!("{}/responses", m.url()))
        .bearer_auth(KEY)
        .json(&json!({"model": "g", "input": "x"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 429);
    let v: Value = r.json().await.expect("json");
    assert!(
        v["error"]["message"].is_string() && v.get("type").is_none(),
        "{v}"
    );
}

#[tokio::test]
async fn a_messages_stream_is_the_real_event_sequence_with_cumulative_usage() {
    let m = mock().await;
    let body = r#"{"model":"c","max_tokens":3,"stream":true,"system":"a b","messages":[{"role":"user","content":"c d e"}]}"#;
    let r = messages(&m, "/messages", body).await;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .is_ok_and(|c| c.starts_with("text/event-stream"))
    );
    let text = r.text().await.expect("body");
    let events = named_events(&text);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    let start = &events[0].1["message"];
    assert_eq!(start["usage"]["input_tokens"], 5);
    assert_eq!(start["usage"]["cache_read_input_tokens"], 0);
    let delta = &events[7].1;
    assert_eq!(delta["delta"]["stop_reason"], "max_tokens");
    assert_eq!(delta["usage"]["output_tokens"], 3);
    assert_eq!(delta["usage"]["input_tokens"], 5);
    let joined: String = events[3..6]
        .iter()
        .map(|(_, d)| d["delta"]["text"].as_str().expect("text delta"))
        .collect();
    assert_eq!(joined, "tok0 tok1 tok2");

    // A scripted cut leaves the stream without message_stop.
    m.push(Action::reset_mid_stream(1));
    let r = messages(&m, "/messages", body).await;
    assert!(r.text().await.is_err(), "the body must break off");
    let records = m.wait_for_requests(2, WAIT).await;
    assert_eq!(records[1].outcome, Outcome::Reset);
    assert_eq!(records[1].completion_tokens_sent, 1);
}

#[tokio::test]
async fn anthropic_breakpoints_are_written_then_read_per_mock_with_ttls_apart() {
    let a = mock().await;
    let b = mock().await;
    let sys = |extra: &str| {
        format!(
            r#"{{"model":"c","max_tokens":2,"system":[
                {{"type":"text","text":"one two three four five","cache_control":{{"type":"ephemeral","ttl":"1h"}}}},
                {{"type":"text","text":"six seven eight","cache_control":{{"type":"ephemeral"}}}}],
              "messages":[{{"role":"user","content":"{extra}"}}]}}"#
        )
    };
    let usage = |r: Value| r["usage"].clone();
    let first = usage(
        messages(&a, "/messages", &sys("hi"))
            .await
            .json()
            .await
            .expect("json"),
    );
    assert_eq!(first["cache_creation_input_tokens"], 8, "{first}");
    assert_eq!(first["cache_creation"]["ephemeral_1h_input_tokens"], 5);
    assert_eq!(first["cache_creation"]["ephemeral_5m_input_tokens"], 3);
    assert_eq!(first["cache_read_input_tokens"], 0);
    assert_eq!(first["input_tokens"], 1);
    let again = usage(
        messages(&a, "/messages", &sys("there you"))
            .await
            .json()
            .await
            .expect("json"),
    );
    assert_eq!(again["cache_read_input_tokens"], 8, "{again}");
    assert_eq!(again["cache_creation_input_tokens"], 0);
    assert_eq!(again["input_tokens"], 2);
    // Another account has its own cache.
    let other = usage(
        messages(&b, "/messages", &sys("hi"))
            .await
            .json()
            .await
            .expect("json"),
    );
    assert_eq!(other["cache_read_input_tokens"], 0, "{other}");
    assert_eq!(other["cache_creation_input_tokens"], 8);

    let t = a.totals();
    assert_eq!(t.prompt_tokens, 9 + 10);
    assert_eq!(t.cache_read_tokens, 8);
    assert_eq!((t.cache_write_1h_tokens, t.cache_write_5m_tokens), (5, 3));
    assert_eq!(t.completion_tokens_sent, 4);

    // count_tokens counts everything and touches no cache or totals.
    let n: Value = messages(&a, "/messages/count_tokens", &sys("hi"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(n, json!({"input_tokens": 9}));
    assert_eq!(a.totals().prompt_tokens, 19);
}

#[tokio::test]
async fn openai_chat_prefixes_are_cached_automatically() {
    let m = MockUpstream::start(MockConfig::default().cache_min_tokens(3)).await;
    let body = |last: &str| {
        json!({"model": "g", "messages": [
            {"role": "system", "content": "a long system prompt"},
            {"role": "user", "content": last},
        ]})
    };
    let http = reqwest::Client::new();
    let url = format!("{}/chat/completions", m.url());
    let first: Value = http
        .post(&url)
        .json(&body("one"))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert!(first["usage"].get("prompt_tokens_details").is_none());
    let mut streamed = body("two three");
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let text = http
        .post(&url)
        .json(&streamed)
        .send()
        .await
        .expect("sent")
        .text()
        .await
        .expect("body");
    let usage_chunk = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find(|v| v["usage"].is_object())
        .expect("a usage chunk");
    assert_eq!(usage_chunk["usage"]["prompt_tokens"], 6);
    assert_eq!(
        usage_chunk["usage"]["prompt_tokens_details"]["cached_tokens"],
        4
    );
    let t = m.totals();
    assert_eq!((t.prompt_tokens, t.cache_read_tokens), (5 + 6, 4));
    assert_eq!(t.cache_write_tokens(), 0);
}

#[tokio::test]
async fn the_record_keeps_the_exact_body_bytes_and_headers() {
    let m = mock().await;
    let raw = "{ \"max_tokens\" : 4,\n  \"model\":\"c\", \"messages\":[{\"role\":\"user\",\"content\":\"caf\\u00e9  \\u2603\"}] }";
    let r = reqwest::Client::new()
        .post(format!("{}/messages", m.url()))
        .header("x-api-key", KEY)
        .header("anthropic-version", "2023-06-01")
        .header("anthropic-beta", "a-1")
        .header("anthropic-beta", "b-2")
        .body(raw)
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 200);
    let rec = &m.wait_for_requests(1, WAIT).await[0];
    assert_eq!(rec.body_bytes, raw.as_bytes());
    let betas: Vec<&str> = rec
        .header_list
        .iter()
        .filter(|(n, _)| n == "anthropic-beta")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(betas, ["a-1", "b-2"]);
    assert_eq!(rec.header("x-api-key"), Some(KEY));
    assert_eq!(rec.prompt_tokens, 2);
}

#[tokio::test]
async fn response_ids_belong_to_the_mock_that_stored_them() {
    let a = mock().await;
    let b = mock().await;
    let http = reqwest::Client::new();
    let created: Value = http
        .post(format!("{}/responses", a.url()))
        .bearer_auth(KEY)
        .json(&json!({"model": "g", "input": "remember me"}))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    let id = created["id"].as_str().expect("an id").to_owned();
    assert!(id.starts_with("resp_"));
    assert_eq!(created["usage"]["input_tokens_details"]["cached_tokens"], 0);

    let get = |m: &MockUpstream| {
        http.get(format!("{}/responses/{id}", m.url()))
            .bearer_auth(KEY)
            .send()
    };
    assert_eq!(get(&a).await.expect("sent").status(), 200);
    let missing = get(&b).await.expect("sent");
    assert_eq!(missing.status(), 404);
    let v: Value = missing.json().await.expect("json");
    assert_eq!(
        v,
        json!({"error": {"message": format!("Response with id '{id}' not found."),
                         "type": "invalid_request_error", "param": null, "code": null}})
    );
    let cont = http
        .post(format!("{}/responses", b.url()))
        .bearer_auth(KEY)
        .json(&json!({"model": "g", "input": "next", "previous_response_id": id}))
        .send()
        .await
        .expect("sent");
    assert_eq!(cont.status(), 400);
    let v: Value = cont.json().await.expect("json");
    assert_eq!(v["error"]["code"], "previous_response_not_found");

    let del = http
        .delete(format!("{}/responses/{id}", a.url()))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("sent");
    let v: Value = del.json().await.expect("json");
    assert_eq!(v, json!({"id": id, "object": "response", "deleted": true}));
    assert_eq!(get(&a).await.expect("sent").status(), 404);
    // Only the answered Responses request carries billable input.
    assert_eq!(a.totals().prompt_tokens, 2);
}
