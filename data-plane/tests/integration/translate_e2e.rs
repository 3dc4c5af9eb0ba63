//! The translated path end to end: a chat client served by an `anthropic`
//! backend and a Messages client by an `openai` one, JSON and streams,
//! errors, usage, the fallback after a cooling Anthropic primary.
//!
//! Ignored until the translators (`translate::to_messages`,
//! `translate::to_chat`) are merged: the groundwork stubs refuse every
//! request.

use claw_proto::{Pool, v1};
use serde_json::{Value, json};

use crate::protocols::{Reply, Upstream, anthropic, client};
use crate::support::*;
use crate::translate::{CHAT, both_protocols};

fn sse(body: &str) -> Reply {
    Reply {
        status: 200,
        headers: vec![("content-type", "text/event-stream".into())],
        body: body.into(),
    }
}

const MESSAGES_SSE: &str = concat!(
    "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-native\",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":10,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":4,\"output_tokens\":1}}}\n\n",
    "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
    "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"hel\"}}\n\n",
    "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"lo\"}}\n\n",
    "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
    "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":3}}\n\n",
    "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
);

const CHAT_SSE: &str = concat!(
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-native\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n",
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-native\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hel\"},\"finish_reason\":null}]}\n\n",
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-native\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"},\"finish_reason\":null}]}\n\n",
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-native\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-native\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,\"total_tokens\":11}}\n\n",
    "data: [DONE]\n\n",
);

/// The `data:` payloads of an SSE body, in order.
fn data_lines(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

/// The `event:` names of an SSE body, in order.
fn event_names(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn a_chat_client_is_served_by_an_anthropic_backend() {
    let up = both_protocols().await;
    let mut a = anthropic("a", &up.url(), &[("claude", "claude-native")]);
    a.models[0].max_tokens = 8192;
    let mut p = TestProxy::start(snapshot(vec![a])).await;
    let body = json!({"model": "claude", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"}]});
    let res = p.post("/v1/chat/completions", body).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "application/json");
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "claude");
    assert_eq!(v["choices"][0]["message"]["content"], "hi");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["prompt_tokens"], 10);
    let s = &up.seen()[0];
    assert_eq!(s.path, "/v1/messages");
    assert_eq!(s.header("x-api-key"), Some("sk-up-a"));
    assert_eq!(s.header("authorization"), None);
    assert_eq!(s.header("anthropic-version"), Some("2023-06-01"));
    let sent: Value = serde_json::from_slice(&s.body).unwrap();
    assert_eq!(sent["model"], "claude-native");
    assert_eq!(sent["max_tokens"], 8192, "the mapping's max_tokens");
    assert_eq!(sent["system"], "be brief");
    assert_eq!(sent["messages"][0]["role"], "user");
    let o = p.next_outcome().await;
    assert!(o.translated);
    let u = o.usage.unwrap();
    assert_eq!((u.prompt_tokens, u.completion_tokens), (10, 2));
    assert!(!o.usage_estimated);
    p.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn a_chat_stream_is_translated_from_anthropic_events_with_usage_when_asked() {
    let up = Upstream::start(|_| sse(MESSAGES_SSE)).await;
    let mut p = TestProxy::start(snapshot(vec![anthropic(
        "a",
        &up.url(),
        &[("claude", "claude-native")],
    )]))
    .await;
    for include_usage in [true, false] {
        let mut body = json!({"model": "claude", "stream": true,
            "messages": [{"role": "user", "content": "hi"}]});
        if include_usage {
            body["stream_options"] = json!({"include_usage": true});
        }
        let res = p.post("/v1/chat/completions", body).await;
        assert_eq!(res.status(), 200);
        assert!(
            res.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        let text = res.text().await.unwrap();
        let data = data_lines(&text);
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{text}");
        let chunks: Vec<Value> = data[..data.len() - 1]
            .iter()
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        assert!(
            chunks
                .iter()
                .all(|c| c["object"] == "chat.completion.chunk")
        );
        let content: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(content, "hello");
        assert!(
            chunks
                .iter()
                .any(|c| c["choices"][0]["finish_reason"] == "stop")
        );
        let usage = chunks.iter().find(|c| c["usage"].is_object());
        assert_eq!(usage.is_some(), include_usage, "{text}");
        let o = p.next_outcome().await;
        assert!(o.translated);
        assert_eq!(o.usage.map(|u| u.completion_tokens), Some(3));
        let sent: Value = serde_json::from_slice(&up.seen().last().unwrap().body).unwrap();
        assert_eq!(sent["stream"], true);
        assert!(sent.get("stream_options").is_none(), "{sent}");
    }
    p.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn a_messages_client_is_served_by_an_openai_backend_json_and_stream() {
    let up = Upstream::start(|s| {
        let v: Value = serde_json::from_slice(&s.body).unwrap_or_default();
        if v["stream"] == true {
            sse(CHAT_SSE)
        } else {
            Reply::json(200, CHAT)
        }
    })
    .await;
    let mut p = TestProxy::start(snapshot(vec![backend(
        "o",
        &up.url(),
        Pool::Primary,
        &[("gpt", "gpt-native")],
    )]))
    .await;
    let url = p.url("/v1/messages");
    let post = |body: Value| {
        client()
            .post(&url)
            .header("x-api-key", CLIENT_KEY)
            .header("anthropic-version", "2023-06-01")
            .json(&body)
            .send()
    };
    let res = post(json!({"model": "gpt", "max_tokens": 64,
        "system": [{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": "hi"}]}))
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["type"], "message");
    assert_eq!(v["model"], "gpt");
    assert_eq!(v["content"][0]["text"], "hi");
    assert_eq!(v["stop_reason"], "end_turn");
    assert_eq!(v["usage"]["input_tokens"], 9);
    let s = &up.seen()[0];
    assert_eq!(s.path, "/v1/chat/completions");
    assert_eq!(s.header("authorization"), Some("Bearer sk-up-o"));
    assert_eq!(s.header("x-api-key"), None);
    let sent = std::str::from_utf8(&s.body).unwrap();
    assert!(
        !sent.contains("cache_control"),
        "removed for OpenAI: {sent}"
    );
    let o = p.next_outcome().await;
    assert!(o.translated);
    assert_eq!(o.usage.map(|u| u.prompt_tokens), Some(9));

    let res = post(json!({"model": "gpt", "max_tokens": 64, "stream": true,
        "messages": [{"role": "user", "content": "hi"}]}))
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    let names = event_names(&text);
    assert_eq!(names.first().map(String::as_str), Some("message_start"));
    assert_eq!(names.last().map(String::as_str), Some("message_stop"));
    for want in [
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
    }
    let sent: Value = serde_json::from_slice(&up.seen()[1].body).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);
    let o = p.next_outcome().await;
    assert!(o.translated);
    assert_eq!(o.usage.map(|u| u.completion_tokens), Some(2));
    p.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn a_cooling_anthropic_primary_falls_back_to_openai_for_a_messages_client() {
    let claude = Upstream::start(|_| {
        Reply::json(
            429,
            r#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#,
        )
        .header("retry-after", "30")
    })
    .await;
    let gpt = Upstream::start(|_| sse(CHAT_SSE)).await;
    let mut p = TestProxy::start(snapshot(vec![
        anthropic("a", &claude.url(), &[("m", "claude-native")]),
        v1::SnapshotBackend {
            pool: Pool::Fallback as i32,
            ..backend("o", &gpt.url(), Pool::Primary, &[("m", "gpt-native")])
        },
    ]))
    .await;
    let res = client()
        .post(p.url("/v1/messages"))
        .header("x-api-key", CLIENT_KEY)
        .json(&json!({"model": "m", "max_tokens": 64, "stream": true,
            "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let names = event_names(&res.text().await.unwrap());
    assert_eq!(names.first().map(String::as_str), Some("message_start"));
    assert_eq!(names.last().map(String::as_str), Some("message_stop"));
    let o = p.next_outcome().await;
    assert_eq!(o.backend_id.as_deref(), Some("o"));
    assert_eq!(o.attempts, 2);
    assert!(o.translated);
    assert_eq!(claude.seen().len(), 1);
    p.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn a_translated_error_reaches_the_client_in_its_own_shape() {
    let up = Upstream::start(|_| {
        Reply::json(
            400,
            r#"{"type":"error","error":{"type":"invalid_request_error","message":"messages: roles must alternate"}}"#,
        )
    })
    .await;
    let p = TestProxy::start(snapshot(vec![anthropic(
        "a",
        &up.url(),
        &[("claude", "claude-native")],
    )]))
    .await;
    let (status, v) = error_of(p.chat("claude").await).await;
    assert_eq!(status, 400);
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("roles must alternate"),
        "{v}"
    );
    p.shutdown().await.unwrap();
}
