//! Mixed pools (issue 13): Chat Completions clients served by `anthropic`
//! backends and Messages clients served by `openai` backends, through real
//! proxies, written against the contract:
//! - the official `openai` SDK runs a full tool-call round trip (tools →
//!   `tool_calls` → a `role: tool` result → the final text) on an
//!   `anthropic` backend, JSON and streamed (`tests/python/openai_tools_check.py`);
//! - the official `anthropic` SDK streams from an `openai` backend
//!   (`get_final_message()` text, stop reason and usage, cache reads
//!   included; a streamed `tool_use`; `tests/python/anthropic_translated_check.py`);
//! - an `anthropic` primary cooling after a 429 hands a Messages client to
//!   an `openai` fallback, with the real event sequence on the wire;
//! - `clawctl stats total` counts the translated requests, with exactly the
//!   usage the mocks reported;
//! - `--native-only` keeps a backend to its own protocol.
//!
//! They need the translators; until those merge the proxy refuses every
//! translated request, hence the `#[ignore]`s.

use crate::data_plane_support::*;
use claw_tests::mock::{Action, Totals};
use serde_json::{Value, json};
use std::time::Duration;

/// `(event name, data)` of every SSE event of an Anthropic stream, checking
/// that each `data` is JSON whose `type` is the event's name.
#[track_caller]
fn named_events(body: &str) -> Vec<(String, Value)> {
    body.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let (name, data) = e
                .strip_prefix("event: ")
                .and_then(|e| e.split_once("\ndata: "))
                .unwrap_or_else(|| panic!("not an `event:`/`data:` pair: {e:?} in\n{body}"));
            let data: Value = serde_json::from_str(data)
                .unwrap_or_else(|err| panic!("data is not JSON ({err}): {data:?}"));
            assert_eq!(data["type"], name, "the data's type names the event");
            (name.to_owned(), data)
        })
        .collect()
}

/// Asserts the Messages stream grammar (pings aside): `message_start`,
/// then per content block `content_block_start`, its deltas and
/// `content_block_stop`, then `message_delta`, `message_stop`; returns the
/// text of the text deltas and the `message_delta`.
#[track_caller]
fn assert_messages_stream(body: &str) -> (String, Value) {
    let events: Vec<(String, Value)> = named_events(body)
        .into_iter()
        .filter(|(n, _)| n != "ping")
        .collect();
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.len() >= 6, "too few events: {names:?}");
    assert_eq!(names[0], "message_start", "{names:?}");
    let n = names.len();
    assert_eq!(
        &names[n - 2..],
        ["message_delta", "message_stop"],
        "{names:?}"
    );
    let mut open: Option<u64> = None;
    let mut blocks = 0;
    for (name, data) in &events[1..n - 2] {
        match (name.as_str(), open) {
            ("content_block_start", None) => {
                let index = data["index"].as_u64().expect("an index");
                assert_eq!(index, blocks, "blocks are numbered in order: {names:?}");
                open = Some(index);
            }
            ("content_block_delta", Some(i)) | ("content_block_stop", Some(i)) => {
                assert_eq!(data["index"].as_u64(), Some(i), "{names:?}");
                if name == "content_block_stop" {
                    open = None;
                    blocks += 1;
                }
            }
            _ => panic!("`{name}` out of order in {names:?}"),
        }
    }
    assert!(open.is_none() && blocks >= 1, "{names:?}");
    assert!(names.contains(&"content_block_delta"), "{names:?}");
    let text = events
        .iter()
        .filter_map(|(_, d)| d.pointer("/delta/text").and_then(Value::as_str))
        .collect();
    (text, events[n - 2].1.clone())
}

/// Polls `clawctl stats total -o json` until `done` holds (or 40 s pass);
/// returns the last answer.
async fn stats_total_until(f: &Fleet, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    loop {
        let out = f.cp.clawctl(&["stats", "total", "-o", "json"]);
        let v = if out.success() {
            out.json()
        } else {
            Value::Null
        };
        if done(&v) || std::time::Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A counter of `stats total -o json` (numbers may come as strings).
fn n(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .or_else(|| v[k].as_str().and_then(|s| s.parse().ok()))
        .unwrap_or(0)
}

#[test]

fn the_openai_sdk_runs_a_tool_round_trip_on_an_anthropic_backend() {
    let f = Fleet::start(vec![BackendSpec::new("ant", "anthropic", "claude", "")], 2);
    run_python_checks(
        "openai_tools_check.py",
        "openai",
        &[
            ("CLAW_BASE_URL", format!("{}/v1", f.proxies[0].url())),
            ("CLAW_API_KEY", f.key.clone()),
            ("CLAW_MODEL", "claude".to_owned()),
        ],
        &["ok tools json", "ok tools stream"],
        || f.logs(),
    );
    // Everything reached the backend as Messages: tools as `input_schema`,
    // the system prompt as `system`, a `max_tokens`, and the tool's result
    // as a `tool_result` for the very id the backend gave its `tool_use`.
    let seen = f.mocks[0].requests();
    assert_eq!(seen.len(), 4, "two round trips of two requests");
    for r in &seen {
        assert_eq!(r.path, "/v1/messages");
        assert_eq!(r.model.as_deref(), Some("claude-ant"));
        assert_eq!(r.body["tools"][0]["name"], "get_weather", "{}", r.body);
        assert_eq!(
            r.body["tools"][0]["input_schema"]["required"],
            json!(["city"]),
            "{}",
            r.body
        );
        assert!(r.body["max_tokens"].as_u64().is_some(), "{}", r.body);
        assert!(
            r.body["system"]
                .to_string()
                .contains("you answer with tools"),
            "{}",
            r.body
        );
    }
    assert_eq!(
        seen.iter().filter(|r| r.stream).count(),
        2,
        "the streamed round trip streamed"
    );
    for (call, answer) in [(&seen[0], &seen[1]), (&seen[2], &seen[3])] {
        let given = String::from_utf8_lossy(&call.response_body).into_owned();
        let id = given
            .split("\"id\":\"")
            .find_map(|s| s.strip_prefix("toolu_mock"))
            .and_then(|s| s.split('"').next())
            .map(|s| format!("toolu_mock{s}"))
            .unwrap_or_else(|| panic!("no tool_use id in {given}"));
        let messages = answer.body["messages"].as_array().expect("messages");
        let last = messages.last().expect("a last message");
        assert_eq!(last["role"], "user", "{}", answer.body);
        let result = last["content"]
            .as_array()
            .and_then(|c| c.iter().find(|b| b["type"] == "tool_result"))
            .unwrap_or_else(|| panic!("no tool_result in {}", answer.body));
        assert_eq!(result["tool_use_id"], id.as_str(), "ids are kept");
        assert!(
            result["content"]
                .to_string()
                .contains("sunny and 21 degrees"),
            "{result}"
        );
        let assistant = &messages[messages.len() - 2];
        assert_eq!(assistant["role"], "assistant");
        let tool_use = assistant["content"]
            .as_array()
            .and_then(|c| c.iter().find(|b| b["type"] == "tool_use"))
            .unwrap_or_else(|| panic!("no tool_use in {}", answer.body));
        assert_eq!(
            (&tool_use["id"], &tool_use["name"], &tool_use["input"]),
            (&json!(id), &json!("get_weather"), &json!({"city": "x"}))
        );
    }
}

#[test]

fn the_anthropic_sdk_streams_from_an_openai_backend() {
    let f = Fleet::start(vec![BackendSpec::new("oai", "openai", "claude", "")], 2);
    run_python_checks(
        "anthropic_translated_check.py",
        "anthropic",
        &[
            ("CLAW_BASE_URL", f.proxies[1].url()),
            ("CLAW_API_KEY", f.key.clone()),
            ("CLAW_MODEL", "claude".to_owned()),
        ],
        &[
            "ok stream",
            "ok stream cache",
            "ok messages",
            "ok tool stream",
        ],
        || f.logs(),
    );
    let seen = f.mocks[0].requests();
    assert!(!seen.is_empty());
    for r in &seen {
        assert_eq!(r.path, "/v1/chat/completions");
        assert_eq!(r.model.as_deref(), Some("claude-oai"));
        // Chat takes the system prompt as a message, not a field.
        assert!(r.body.get("system").is_none(), "{}", r.body);
        assert_eq!(
            r.header("authorization"),
            Some(format!("Bearer {}", f.specs[0].key()).as_str())
        );
    }
    let first = &seen[0];
    assert!(first.stream, "{}", first.body);
    let system = &first.body["messages"][0];
    assert!(
        matches!(system["role"].as_str(), Some("system" | "developer"))
            && system["content"]
                .to_string()
                .contains("you are a terse assistant"),
        "{}",
        first.body
    );
    // The usage the Anthropic client was promised needs the backend's usage
    // chunk, asked for whatever the client said.
    assert!(first.include_usage, "{}", first.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn a_cooling_anthropic_primary_hands_messages_clients_to_an_openai_fallback() {
    let f = Fleet::start(
        vec![
            BackendSpec::new("ant", "anthropic", "claude", ""),
            BackendSpec::new("oai", "openai", "claude", "").with_args(&["--pool", "fallback"]),
        ],
        2,
    );
    f.mocks[0].push(Action::rate_limited(Some(120)));
    let body = |stream: bool| {
        json!({"model": "claude", "max_tokens": 5, "stream": stream,
               "system": "be brief",
               "messages": [{"role": "user", "content": "hello there"}]})
        .to_string()
    };

    let res = f.messages(0, &body(true), &[]).await;
    let status = res.status();
    let ctype = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let text = res.text().await.expect("stream body");
    assert_eq!(status, 200, "{text}\n{}", f.logs());
    assert!(ctype.starts_with("text/event-stream"), "{ctype}");
    let (joined, delta) = assert_messages_stream(&text);
    assert_eq!(joined, "tok0 tok1 tok2 tok3 tok4", "{text}");
    assert_eq!(delta["delta"]["stop_reason"], "max_tokens", "{text}");
    assert_eq!(delta["usage"]["output_tokens"], 5, "{text}");
    assert!(
        !text.contains("chat.completion"),
        "no chat chunk leaks: {text}"
    );
    assert!(!text.contains("[DONE]"), "{text}");

    let ant = f.mocks[0].requests();
    assert_eq!(ant.len(), 1, "the primary was tried once");
    assert_eq!(ant[0].status, Some(429));
    let oai = f.mocks[1].requests();
    assert_eq!(oai.len(), 1, "{}", f.logs());
    assert_eq!(oai[0].path, "/v1/chat/completions");
    assert_eq!(oai[0].model.as_deref(), Some("claude-oai"));
    assert!(oai[0].stream);

    // While the primary cools, the proxy goes straight to the fallback; a
    // JSON answer is a whole Message.
    let res = f.messages(0, &body(false), &[]).await;
    let status = res.status();
    let text = res.text().await.expect("body");
    assert_eq!(status, 200, "{text}\n{}", f.logs());
    let v: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(
        (&v["type"], &v["role"]),
        (&json!("message"), &json!("assistant"))
    );
    assert_eq!(v["content"][0]["type"], "text", "{v}");
    assert_eq!(v["content"][0]["text"], "tok0 tok1 tok2 tok3 tok4", "{v}");
    assert_eq!(v["stop_reason"], "max_tokens", "{v}");
    // "be brief" (2) + "hello there" (2), nothing cached on a 2-token prefix.
    assert_eq!(v["usage"]["input_tokens"], 4, "{v}");
    assert_eq!(v["usage"]["output_tokens"], 5, "{v}");
    assert_eq!(f.mocks[0].requests().len(), 1, "the primary is cooling");
    assert_eq!(f.mocks[1].requests().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn stats_total_counts_translated_requests_with_the_mocks_usage() {
    let f = Fleet::start(
        vec![
            BackendSpec::new("ant", "anthropic", "claude", ",in=0.000003,out=0.000015"),
            BackendSpec::new("oai", "openai", "gpt", ",in=0.0000025,out=0.00001"),
        ],
        2,
    );
    // Translated: chat → anthropic, JSON and streamed (without asking for
    // usage: the proxy must still count it, and hide it).
    for (proxy, stream) in [(0, false), (1, true)] {
        let body = json!({"model": "claude", "max_tokens": 6, "stream": stream,
                          "messages": [{"role": "user", "content": "count me in"}]});
        let res = f.post_openai(proxy, "chat/completions", &body, &[]).await;
        let status = res.status();
        let text = res.text().await.expect("body");
        assert_eq!(status, 200, "{text}\n{}", f.logs());
        if stream {
            assert!(text.contains("chat.completion.chunk"), "{text}");
            assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
            assert!(!text.contains("\"usage\":{"), "no usage asked for: {text}");
        } else {
            let v: Value = serde_json::from_str(&text).expect("JSON");
            assert_eq!(v["object"], "chat.completion");
            assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
            assert_eq!(v["usage"]["prompt_tokens"], 3, "{v}");
            assert_eq!(v["usage"]["completion_tokens"], 6, "{v}");
        }
    }
    // Translated: Messages → openai, JSON and streamed.
    for (proxy, stream) in [(1, false), (0, true)] {
        let body = json!({"model": "gpt", "max_tokens": 4, "stream": stream,
                          "messages": [{"role": "user", "content": "and me too"}]});
        let res = f.messages(proxy, &body.to_string(), &[]).await;
        let status = res.status();
        let text = res.text().await.expect("body");
        assert_eq!(status, 200, "{text}\n{}", f.logs());
        if stream {
            assert_messages_stream(&text);
        }
    }
    // Native: not translated.
    let body = json!({"model": "gpt", "max_tokens": 3,
                      "messages": [{"role": "user", "content": "native"}]});
    let res = f.post_openai(0, "chat/completions", &body, &[]).await;
    assert_eq!(res.status(), 200, "{}", f.logs());

    let (ant, oai): (Totals, Totals) = (f.mocks[0].totals(), f.mocks[1].totals());
    let want = (
        5,
        4,
        ant.prompt_tokens + oai.prompt_tokens,
        ant.completion_tokens_sent + oai.completion_tokens_sent,
        ant.cache_read_tokens + oai.cache_read_tokens,
        ant.cache_write_tokens() + oai.cache_write_tokens(),
    );
    let got = |v: &Value| {
        (
            n(v, "requests"),
            n(v, "translated"),
            n(v, "prompt_tokens"),
            n(v, "completion_tokens"),
            n(v, "cache_read_tokens"),
            n(v, "cache_write_tokens"),
        )
    };
    let v = stats_total_until(&f, |v| got(v) == want).await;
    assert_eq!(
        got(&v),
        want,
        "stats total (requests, translated, prompt, completion, cache read, cache write) \
         vs the mocks (anthropic {ant:?}, openai {oai:?}): {v}"
    );
    let cost = v["cost"]
        .as_f64()
        .or_else(|| v["cost"].as_str().and_then(|s| s.parse().ok()))
        .unwrap_or(f64::NAN);
    let want_cost = ant.prompt_tokens as f64 * 0.000003
        + ant.completion_tokens_sent as f64 * 0.000015
        + oai.prompt_tokens as f64 * 0.0000025
        + oai.completion_tokens_sent as f64 * 0.00001;
    assert!(
        (cost - want_cost).abs() <= want_cost * 1e-9,
        "cost {cost} != {want_cost}: the backend's usage at the mapping's prices"
    );
    let table = f.cp.clawctl(&["stats", "total"]).assert_ok().stdout;
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("translated") && l.trim_end().ends_with('4')),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn a_native_only_backend_is_never_given_the_other_protocol() {
    let f = Fleet::start(
        vec![
            BackendSpec::new("ant", "anthropic", "claude", "").with_args(&["--native-only"]),
            BackendSpec::new("oai", "openai", "claude", "").with_args(&["--pool", "fallback"]),
        ],
        1,
    );
    let chat = json!({"model": "claude", "max_tokens": 3,
                      "messages": [{"role": "user", "content": "hi"}]});
    let messages = chat.to_string();
    // The primary is native-only: a chat client goes to the fallback, a
    // Messages client to the primary.
    let before = f.ok_counts();
    let res = f.post_openai(0, "chat/completions", &chat, &[]).await;
    assert_eq!(res.status(), 200, "{}", f.logs());
    assert_eq!(
        f.served_by(&before),
        1,
        "chat skipped the native-only primary"
    );
    let before = f.ok_counts();
    let res = f.messages(0, &messages, &[]).await;
    assert_eq!(res.status(), 200, "{}", f.logs());
    assert_eq!(f.served_by(&before), 0, "Messages on its own backend");
    assert!(
        f.mocks[0]
            .requests()
            .iter()
            .all(|r| r.path == "/v1/messages")
    );

    // Cleared: the primary comes first again, translating.
    f.cp.clawctl(&["backend", "update", "ant", "--native-only=false"])
        .assert_ok();
    f.wait_synced();
    let before = f.ok_counts();
    let res = f.post_openai(0, "chat/completions", &chat, &[]).await;
    let status = res.status();
    let v: Value = res.json().await.expect("JSON");
    assert_eq!(status, 200, "{v}\n{}", f.logs());
    assert_eq!(f.served_by(&before), 0, "chat translated onto the primary");
    assert_eq!(v["object"], "chat.completion", "{v}");
}
