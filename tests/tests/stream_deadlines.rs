//! Streams have time limits (issue 17, item 8): the pool's request deadline
//! bounds a whole streamed answer, and an upstream that goes silent
//! mid-stream is cut after `--stream-idle-timeout`. Either way the client
//! gets the error event of its own protocol — the OpenAI error chunk, an
//! Anthropic `event: error`, the Responses `error` event — and the stream
//! does not end cleanly.

use crate::data_plane_support::*;
use claw_tests::mock::{Action, MockConfig};
use futures::StreamExt as _;
use serde_json::{Value, json};
use std::time::Duration;

/// Reads a streamed body to its end: the text, and whether it ended cleanly.
async fn read_stream(res: reqwest::Response) -> (String, bool) {
    let mut body = Vec::new();
    let mut stream = res.bytes_stream();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(bytes) => body.extend_from_slice(&bytes),
            Err(_) => return (String::from_utf8_lossy(&body).into_owned(), false),
        }
    }
    (String::from_utf8_lossy(&body).into_owned(), true)
}

/// The last SSE event of `body`: its `event:` name and its JSON data.
fn last_event(body: &str) -> (Option<String>, Value) {
    let event = body
        .split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .last()
        .unwrap_or_else(|| panic!("no event in {body:?}"));
    let mut name = None;
    let mut data = None;
    for line in event.lines() {
        if let Some(n) = line.strip_prefix("event: ") {
            name = Some(n.to_owned());
        } else if let Some(d) = line.strip_prefix("data: ") {
            data = Some(serde_json::from_str(d).unwrap_or_else(|e| panic!("{e}: {d}")));
        }
    }
    (name, data.unwrap_or_else(|| panic!("no data in {event:?}")))
}

/// A reply long enough to stream for far longer than any limit here.
fn endless_reply() -> String {
    "tok ".repeat(50_000)
}

fn chat_stream() -> Value {
    json!({
        "model": CHAT,
        "messages": [{"role": "user", "content": "go on forever"}],
        "stream": true,
    })
}

fn messages_stream() -> Value {
    json!({
        "model": CHAT,
        "max_tokens": 50_000,
        "messages": [{"role": "user", "content": "go on forever"}],
        "stream": true,
    })
}

fn responses_stream() -> Value {
    json!({"model": CHAT, "input": "go on forever", "stream": true})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_stream_is_ended_at_the_request_deadline_in_each_protocol() {
    let c = Cluster::with(ClusterOptions {
        proxies: 1,
        proxy_args: vec!["--stream-idle-timeout".into(), "60s".into()],
        mock: MockConfig::default().chunk_delay(Duration::from_millis(20)),
        ..ClusterOptions::default()
    });
    for mock in [&c.primary, &c.fallback] {
        mock.set_always(Some(Action::reply(endless_reply())));
    }
    for pool in ["primary", "fallback"] {
        c.cp.clawctl(&[
            "pool",
            "set",
            pool,
            "--queue-timeout",
            "1s",
            "--request-timeout",
            "3s",
        ])
        .assert_ok();
    }
    c.wait_synced();

    // Chat: the OpenAI error chunk.
    let res = c.post(c.proxy(), "chat/completions", &chat_stream()).await;
    assert_eq!(res.status(), 200);
    let (body, clean) = read_stream(res).await;
    assert!(!clean, "a stream cut at the deadline must not end cleanly");
    assert!(!body.contains("[DONE]"));
    assert!(body.contains("chat.completion.chunk"), "chunks came first");
    let (_, data) = last_event(&body);
    assert_eq!(data["error"]["code"], "request_timeout", "{data}");

    // Messages: Anthropic's `event: error`.
    let res = c.post(c.proxy(), "messages", &messages_stream()).await;
    assert_eq!(res.status(), 200);
    let (body, clean) = read_stream(res).await;
    assert!(!clean);
    assert!(body.contains("content_block_delta"), "deltas came first");
    let (name, data) = last_event(&body);
    assert_eq!(name.as_deref(), Some("error"), "{body:.300}");
    assert_eq!(data["type"], "error");
    assert_eq!(data["error"]["type"], "api_error");

    // Responses: the `error` event.
    let res = c.post(c.proxy(), "responses", &responses_stream()).await;
    let status = res.status();
    let (body, clean) = read_stream(res).await;
    assert_eq!(status, 200, "{body:.500}");
    assert!(!clean);
    let (name, data) = last_event(&body);
    assert_eq!(name.as_deref(), Some("error"), "{body:.300}");
    assert_eq!(data["code"], "request_timeout", "{data}");
    assert!(data["sequence_number"].as_u64().is_some(), "{data}");

    // The proxy is fine afterwards.
    for mock in [&c.primary, &c.fallback] {
        mock.set_always(None);
    }
    assert_eq!(c.chat(c.proxy(), CHAT).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stream_is_ended_by_the_stream_idle_timeout() {
    let c = Cluster::with(ClusterOptions {
        proxies: 1,
        proxy_args: vec!["--stream-idle-timeout".into(), "1s".into()],
        ..ClusterOptions::default()
    });
    c.primary.push(Action::stall_after(3));
    let res = c.post(c.proxy(), "chat/completions", &chat_stream()).await;
    assert_eq!(res.status(), 200);
    let (body, clean) = read_stream(res).await;
    assert!(!clean, "a stalled stream must not end cleanly");
    let content = body.matches("chat.completion.chunk").count();
    assert!(content >= 3, "the chunks before the stall arrived: {body}");
    let (_, data) = last_event(&body);
    assert_eq!(data["error"]["code"], "stream_idle_timeout", "{data}");

    // Anthropic clients get their own error event for the same stall.
    c.primary.push(Action::stall_after(2));
    let res = c.post(c.proxy(), "messages", &messages_stream()).await;
    assert_eq!(res.status(), 200);
    let (body, clean) = read_stream(res).await;
    assert!(!clean);
    let (name, data) = last_event(&body);
    assert_eq!(name.as_deref(), Some("error"), "{body:.300}");
    assert_eq!(data["type"], "error");

    assert_eq!(c.chat(c.proxy(), CHAT).await.status(), 200);
}
