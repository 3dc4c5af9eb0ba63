//! Mixed pools at the proxy, as far as the translators allow today: chat
//! and Messages requests route over backends of both protocols, a field the
//! other protocol cannot express is a 400 in the client's shape naming it
//! (or passed over to a native candidate from the fallback pool),
//! `native_only` backends see only their own protocol, and native requests
//! stay byte for byte. The translated path end to end is in `translate_e2e`.
//!
//! The untranslatable fields used (`n: 2` towards Anthropic, `thinking`
//! towards OpenAI) are refused by the real translators too; the groundwork
//! stubs refuse every request, naming `model`.

use claw_proto::{Pool, v1};
use serde_json::json;

use crate::protocols::{MESSAGE, Reply, Upstream, anthropic, anthropic_error, client};
use crate::support::*;

pub(crate) const CHAT: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","created":1700000000,"model":"gpt-native","choices":[{"index":0,"message":{"role":"assistant","content":"hi","refusal":null},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}"#;

/// An upstream answering each protocol's path in its own shape.
pub(crate) async fn both_protocols() -> Upstream {
    Upstream::start(|s| {
        if s.path.ends_with("/chat/completions") {
            Reply::json(200, CHAT)
        } else {
            Reply::json(200, MESSAGE)
        }
    })
    .await
}

fn fallback(b: v1::SnapshotBackend) -> v1::SnapshotBackend {
    v1::SnapshotBackend {
        pool: Pool::Fallback as i32,
        ..b
    }
}

/// The fields the translators name when refusing (`model`: today's stubs).
fn refused_field(field: &str, real: &str) -> bool {
    field == real || field == "model"
}

async fn messages(p: &TestProxy, body: serde_json::Value) -> reqwest::Response {
    client()
        .post(p.url("/v1/messages"))
        .header("x-api-key", CLIENT_KEY)
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untranslatable_chat_request_is_a_400_in_the_openai_shape_naming_the_field() {
    let up = both_protocols().await;
    let mut p = TestProxy::start(snapshot(vec![
        anthropic("pa", &up.url(), &[("m", "claude-native")]),
        // A native candidate in the fallback does not rescue a primary refusal.
        fallback(backend(
            "fo",
            &up.url(),
            Pool::Primary,
            &[("m", "gpt-native")],
        )),
    ]))
    .await;
    let body = json!({"model": "m", "n": 2, "messages": [{"role": "user", "content": "hi"}]});
    let (status, v) = error_of(p.post("/v1/chat/completions", body).await).await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(v["error"]["code"], "unsupported_parameter");
    let param = v["error"]["param"].as_str().expect("param names the field");
    assert!(refused_field(param, "n"), "{v}");
    assert!(up.seen().is_empty(), "nothing went upstream");
    let o = p.next_outcome().await;
    assert_eq!((o.status, o.attempts, o.translated), (400, 0, false));
    p.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untranslatable_messages_request_is_a_400_in_the_anthropic_shape() {
    let up = both_protocols().await;
    let p = TestProxy::start(snapshot(vec![backend(
        "o",
        &up.url(),
        Pool::Primary,
        &[("gpt", "gpt-native")],
    )]))
    .await;
    let body = json!({"model": "gpt", "max_tokens": 64,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "messages": [{"role": "user", "content": "hi"}]});
    let (status, kind, msg) = anthropic_error(messages(&p, body).await).await;
    assert_eq!((status, kind.as_str()), (400, "invalid_request_error"));
    assert!(msg.contains("thinking") || msg.contains("model"), "{msg}");
    assert!(up.seen().is_empty());
    p.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_in_the_fallback_a_native_candidate_serves() {
    let up = both_protocols().await;
    let mut p = TestProxy::start(snapshot(vec![
        fallback(anthropic("fa", &up.url(), &[("m", "claude-native")])),
        fallback(backend(
            "fo",
            &up.url(),
            Pool::Primary,
            &[("m", "gpt-native")],
        )),
    ]))
    .await;
    // Ties rotate: some requests rank the Anthropic backend first.
    for _ in 0..4 {
        let body = json!({"model": "m", "n": 2, "messages": [{"role": "user", "content": "hi"}]});
        let res = p.post("/v1/chat/completions", body).await;
        assert_eq!(res.status(), 200);
        let v: serde_json::Value = res.json().await.unwrap();
        assert_eq!(v["object"], "chat.completion");
        let o = p.next_outcome().await;
        assert_eq!(o.backend_id.as_deref(), Some("fo"));
        assert_eq!((o.attempts, o.translated), (1, false));
    }
    let seen = up.seen();
    assert_eq!(seen.len(), 4);
    assert!(seen.iter().all(|s| s.path == "/v1/chat/completions"));
    assert!(seen.iter().all(|s| s.header("x-api-key").is_none()));
    p.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_only_backends_never_see_the_other_protocol() {
    let up = both_protocols().await;
    let a = v1::SnapshotBackend {
        native_only: true,
        ..anthropic(
            "a",
            &up.url(),
            &[("m", "claude-native"), ("c", "claude-only")],
        )
    };
    let mut p = TestProxy::start(snapshot(vec![
        a,
        fallback(backend(
            "o",
            &up.url(),
            Pool::Primary,
            &[("m", "gpt-native")],
        )),
    ]))
    .await;
    // The primary Anthropic backend takes no chat: the fallback serves.
    for _ in 0..3 {
        let res = p.chat("m").await;
        assert_eq!(res.status(), 200);
        assert_eq!(p.next_outcome().await.backend_id.as_deref(), Some("o"));
    }
    let res = messages(
        &p,
        json!({"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(res.status(), 200);
    assert_eq!(p.next_outcome().await.backend_id.as_deref(), Some("a"));
    // A model only a native-only backend of the other protocol serves.
    let (status, v) = error_of(p.chat("c").await).await;
    assert_eq!(status, 404);
    let m = v["error"]["message"].as_str().unwrap();
    assert!(m.contains("/v1/messages"), "{m}");
    for s in up.seen() {
        if s.header("x-api-key") == Some("sk-up-a") {
            assert_eq!(s.path, "/v1/messages");
        } else {
            assert_eq!(s.path, "/v1/chat/completions");
        }
    }
    p.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_requests_in_a_mixed_pool_pass_byte_for_byte() {
    let up = both_protocols().await;
    let mut p = TestProxy::start(snapshot(vec![
        anthropic("a", &up.url(), &[("claude-first", "claude-native")]),
        backend(
            "o",
            &up.url(),
            Pool::Primary,
            &[("gpt-first", "gpt-native")],
        ),
        fallback(anthropic(
            "fa",
            &up.url(),
            &[("gpt-first", "claude-native")],
        )),
        fallback(backend(
            "fo",
            &up.url(),
            Pool::Primary,
            &[("claude-first", "gpt-native")],
        )),
    ]))
    .await;
    let msg = "{ \"messages\":[{\"role\":\"user\",\"content\":\"caf\\u00e9\"}],\n \"model\" : \"claude-first\", \"max_tokens\":16}";
    let res = client()
        .post(p.url("/v1/messages"))
        .header("x-api-key", CLIENT_KEY)
        .body(msg)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), MESSAGE, "the upstream's bytes");
    let o = p.next_outcome().await;
    assert_eq!(o.backend_id.as_deref(), Some("a"));
    assert!(!o.translated);
    let chat = "{\"model\":\"gpt-first\" , \"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"temperature\":0.50}";
    let res = client()
        .post(p.url("/v1/chat/completions"))
        .bearer_auth(CLIENT_KEY)
        .body(chat)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), CHAT);
    assert_eq!(p.next_outcome().await.backend_id.as_deref(), Some("o"));
    let seen = up.seen();
    assert_eq!(
        std::str::from_utf8(&seen[0].body).unwrap(),
        msg.replace("\"claude-first\"", "\"claude-native\"")
    );
    assert_eq!(seen[0].header("x-api-key"), Some("sk-up-a"));
    assert_eq!(
        std::str::from_utf8(&seen[1].body).unwrap(),
        chat.replace("\"gpt-first\"", "\"gpt-native\"")
    );
    assert_eq!(seen[1].header("authorization"), Some("Bearer sk-up-o"));
    p.shutdown().await.unwrap();
}
