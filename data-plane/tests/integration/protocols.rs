//! The agents' protocols at the proxy: Anthropic Messages and OpenAI
//! Responses endpoints, `x-api-key` client auth, Anthropic-shaped errors,
//! the protocol's credential header upstream, byte-faithful bodies, 529
//! and quota-exhausted 429s, `models/{id}`, and stored-response probing.
//!
//! The upstream is a scripted local hyper server that records exactly what
//! it received (method, path, headers, body bytes) and answers as the
//! provider would; `claw_tests::mock` covers whole conversations.

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use claw_proto::{Pool, v1};
use http::{HeaderMap, Method, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use parking_lot::Mutex;

use crate::support::*;

/// One request as the upstream received it.
#[derive(Clone, Debug)]
pub(crate) struct Seen {
    pub(crate) method: Method,
    pub(crate) path: String,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

impl Seen {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// An answer: status, headers, body.
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(&'static str, String)>,
    pub(crate) body: String,
}

impl Reply {
    pub(crate) fn json(status: u16, body: impl Into<String>) -> Reply {
        Reply {
            status,
            headers: vec![("content-type", "application/json".into())],
            body: body.into(),
        }
    }

    pub(crate) fn header(mut self, name: &'static str, value: impl Into<String>) -> Reply {
        self.headers.push((name, value.into()));
        self
    }
}

type Answer = dyn Fn(&Seen) -> Reply + Send + Sync;

/// A scripted upstream on an ephemeral loopback port.
pub(crate) struct Upstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Upstream {
    pub(crate) async fn start(answer: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Upstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let answer: Arc<Answer> = Arc::new(answer);
        let log = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (log, answer) = (log.clone(), answer.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (log, answer) = (log.clone(), answer.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.unwrap().to_bytes();
                            let s = Seen {
                                method: parts.method,
                                path: parts.uri.path().to_string(),
                                headers: parts.headers,
                                body,
                            };
                            let reply = answer(&s);
                            log.lock().push(s);
                            let mut res = Response::new(Full::new(Bytes::from(reply.body)));
                            *res.status_mut() = http::StatusCode::from_u16(reply.status).unwrap();
                            for (k, v) in reply.headers {
                                res.headers_mut().insert(k, v.parse().unwrap());
                            }
                            Ok::<_, Infallible>(res)
                        }
                    });
                    let io = hyper_util::rt::TokioIo::new(tcp);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                });
            }
        });
        Upstream { addr, seen }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub(crate) fn seen(&self) -> Vec<Seen> {
        self.seen.lock().clone()
    }
}

pub(crate) const MESSAGE: &str = r#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-native","content":[{"type":"text","text":"hi"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":10,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":2}}"#;

pub(crate) fn anthropic(id: &str, url: &str, models: &[(&str, &str)]) -> v1::SnapshotBackend {
    v1::SnapshotBackend {
        api: v1::Api::Anthropic as i32,
        ..backend(id, url, Pool::Primary, models)
    }
}

/// A snapshot whose primary pool has `max_retries` retries.
fn snapshot_retries(backends: Vec<v1::SnapshotBackend>, max_retries: u32) -> v1::Snapshot {
    let mut s = snapshot(backends);
    let mut p = claw_proto::validate::default_pool_settings(Pool::Primary);
    p.max_retries = max_retries;
    s.pools = vec![p];
    s
}

pub(crate) async fn anthropic_error(res: reqwest::Response) -> (u16, String, String) {
    let status = res.status().as_u16();
    let v: serde_json::Value = res.json().await.unwrap();
    assert_eq!(v["type"], "error", "Anthropic error shape: {v}");
    let kind = v["error"]["type"].as_str().expect("error.type").to_string();
    let msg = v["error"]["message"]
        .as_str()
        .expect("error.message")
        .to_string();
    (status, kind, msg)
}

pub(crate) fn client() -> reqwest::Client {
    reqwest::Client::new()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_pass_bytes_through_with_x_api_key_both_ways() {
    let up = Upstream::start(|_| Reply::json(200, MESSAGE).header("request-id", "req_1")).await;
    let p = TestProxy::start(snapshot(vec![anthropic(
        "a",
        &up.url(),
        &[("claude", "claude-native")],
    )]))
    .await;
    // Odd key order, whitespace, unicode escapes, cache_control with a 1h ttl.
    let body = "{\n  \"system\" : [ {\"type\":\"text\", \"text\":\"caf\\u00e9 \\ud83d\\ude00\",\n  \"cache_control\":{\"type\":\"ephemeral\",\"ttl\":\"1h\"}} ],\n\t\"model\":   \"claude\" ,\"max_tokens\":16,\n \"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]  }";
    let res = client()
        .post(p.url("/v1/messages"))
        .header("x-api-key", CLIENT_KEY)
        .header("anthropic-version", "2023-06-01")
        .header("anthropic-beta", "extended-cache-ttl-2025-04-11")
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["request-id"], "req_1");
    assert_eq!(res.text().await.unwrap(), MESSAGE, "the upstream's bytes");
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    let s = &seen[0];
    assert_eq!(
        (s.method.as_str(), s.path.as_str()),
        ("POST", "/v1/messages")
    );
    let want = body.replace("\"claude\" ,", "\"claude-native\" ,");
    assert_eq!(std::str::from_utf8(&s.body).unwrap(), want);
    assert_eq!(s.header("x-api-key"), Some("sk-up-a"));
    assert_eq!(s.headers.get_all("x-api-key").iter().count(), 1);
    assert_eq!(s.header("authorization"), None);
    assert_eq!(s.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(
        s.header("anthropic-beta"),
        Some("extended-cache-ttl-2025-04-11")
    );

    // Bearer works too; a client without anthropic-version gets the default;
    // a streaming body is forwarded as it is (no stream_options added).
    let stream_body = r#"{"model":"claude","stream":true,"max_tokens":4,"messages":[]}"#;
    let res = client()
        .post(p.url("/v1/messages"))
        .bearer_auth(CLIENT_KEY)
        .body(stream_body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let s = &up.seen()[1];
    assert_eq!(s.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(s.header("x-api-key"), Some("sk-up-a"));
    assert_eq!(
        std::str::from_utf8(&s.body).unwrap(),
        stream_body.replace("\"claude\"", "\"claude-native\"")
    );

    // count_tokens goes to its own upstream path.
    let res = client()
        .post(p.url("/v1/messages/count_tokens"))
        .header("x-api-key", CLIENT_KEY)
        .body(r#"{"model":"claude","messages":[]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(up.seen()[2].path, "/v1/messages/count_tokens");
    p.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_bodies_pass_through_and_openai_backends_get_a_bearer() {
    let up = Upstream::start(|_| Reply::json(200, r#"{"id":"resp_1","object":"response"}"#)).await;
    let p = TestProxy::start(snapshot(vec![backend(
        "o",
        &up.url(),
        Pool::Primary,
        &[("gpt", "gpt-native")],
    )]))
    .await;
    let body = r#"{"input":"hi",  "model":"gpt","stream":true}"#;
    let res = client()
        .post(p.url("/v1/responses"))
        .header("x-api-key", CLIENT_KEY)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let s = &up.seen()[0];
    assert_eq!(s.path, "/v1/responses");
    assert_eq!(s.header("authorization"), Some("Bearer sk-up-o"));
    assert_eq!(s.header("x-api-key"), None);
    assert_eq!(s.header("anthropic-version"), None);
    assert_eq!(
        std::str::from_utf8(&s.body).unwrap(),
        r#"{"input":"hi",  "model":"gpt-native","stream":true}"#
    );
    p.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_come_in_the_clients_own_shape() {
    let up = Upstream::start(|_| Reply::json(200, MESSAGE)).await;
    let p = TestProxy::start(snapshot(vec![
        anthropic("a", &up.url(), &[("claude", "claude-native")]),
        backend("o", &up.url(), Pool::Primary, &[("gpt", "gpt-native")]),
    ]))
    .await;
    let msg = |model: &str| format!(r#"{{"model":"{model}","max_tokens":1,"messages":[]}}"#);
    let post = |path: &str, key: &str, body: String| {
        client()
            .post(p.url(path))
            .header("x-api-key", key)
            .body(body)
            .send()
    };
    let (status, kind, _) = anthropic_error(
        post("/v1/messages", "sk-wrong", msg("claude"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, kind.as_str()), (401, "authentication_error"));
    let (status, kind, m) = anthropic_error(
        post("/v1/messages", CLIENT_KEY, msg("nope-model"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, kind.as_str()), (404, "not_found_error"));
    assert!(m.contains("nope-model"), "{m}");
    // A model only the other protocol's backends serve, on an endpoint that
    // is never translated: where to find it. (Chat and Messages requests
    // are translated instead, see `translate`.)
    let (status, kind, m) = anthropic_error(
        post("/v1/messages/count_tokens", CLIENT_KEY, msg("gpt"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, kind.as_str()), (404, "not_found_error"));
    assert!(m.contains("/v1/chat/completions"), "{m}");
    let (status, v) = error_of(
        post("/v1/responses", CLIENT_KEY, msg("claude"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 404);
    let m = v["error"]["message"].as_str().unwrap();
    assert!(m.contains("/v1/messages"), "{m}");
    let (status, kind, _) = anthropic_error(
        post("/v1/messages", CLIENT_KEY, "{not json".into())
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, kind.as_str()), (400, "invalid_request_error"));
    // OpenAI endpoints keep the OpenAI shape.
    let (status, v) = error_of(
        post("/v1/chat/completions", "sk-wrong", msg("gpt"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(v["error"]["code"], "invalid_api_key");
    // Unknown path: a 404 listing the endpoints; wrong method: 405.
    let (status, v) = error_of(post("/v1/nope", CLIENT_KEY, msg("gpt")).await.unwrap()).await;
    assert_eq!(status, 404);
    let m = v["error"]["message"].as_str().unwrap();
    for ep in [
        "/v1/messages",
        "/v1/responses",
        "/v1/chat/completions",
        "/v1/models",
    ] {
        assert!(m.contains(ep), "{m}");
    }
    let res = client()
        .get(p.url("/v1/messages"))
        .header("x-api-key", CLIENT_KEY)
        .send()
        .await
        .unwrap();
    let (status, kind, _) = anthropic_error(res).await;
    assert_eq!((status, kind.as_str()), (405, "invalid_request_error"));
    let res = client()
        .get(p.url("/v1/responses/bad.id"))
        .bearer_auth(CLIENT_KEY)
        .send()
        .await
        .unwrap();
    let (status, v) = error_of(res).await;
    assert_eq!(status, 400);
    assert_eq!(v["error"]["param"], "response_id");
    assert!(up.seen().is_empty(), "nothing reached the upstream");
    p.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_retrieve_answers_both_shapes_from_the_snapshot() {
    let p = TestProxy::start(snapshot(vec![anthropic(
        "a",
        "http://127.0.0.1:9/v1",
        &[("claude", "claude-native")],
    )]))
    .await;
    let get = |path: &str, anthropic: bool| {
        let mut b = client().get(p.url(path)).bearer_auth(CLIENT_KEY);
        if anthropic {
            b = b.header("anthropic-version", "2023-06-01");
        }
        b.send()
    };
    let v: serde_json::Value = get("/v1/models/claude", false)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["id"], "claude");
    assert_eq!(v["object"], "model");
    assert!(v["created"].as_u64().is_some_and(|c| c > 0));
    assert_eq!(v["owned_by"], "claw");
    let v: serde_json::Value = get("/v1/models/claude", true)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["type"], "model");
    assert_eq!(v["id"], "claude");
    assert_eq!(v["display_name"], "claude");
    assert!(
        v["created_at"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{v}"
    );
    let res = get("/v1/models/unknown", false).await.unwrap();
    let (status, v) = error_of(res).await;
    assert_eq!(status, 404);
    assert!(v["error"]["message"].as_str().unwrap().contains("unknown"));
    p.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_529_holds_the_backend_briefly_and_retries_elsewhere() {
    let busy = Upstream::start(|_| {
        Reply::json(
            529,
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
        )
    })
    .await;
    let fine = Upstream::start(|_| Reply::json(200, MESSAGE)).await;
    let mut p = TestProxy::start(snapshot(vec![
        anthropic("busy", &busy.url(), &[("claude", "c")]),
        anthropic("fine", &fine.url(), &[("claude", "c")]),
    ]))
    .await;
    let send = || {
        client()
            .post(p.url("/v1/messages"))
            .header("x-api-key", CLIENT_KEY)
            .body(r#"{"model":"claude","max_tokens":1,"messages":[]}"#)
            .send()
    };
    // Until `busy` has been tried once (the order is the selector's).
    let mut answered = 0;
    while busy.seen().is_empty() && answered < 20 {
        assert_eq!(send().await.unwrap().status(), 200);
        answered += 1;
    }
    assert_eq!(busy.seen().len(), 1, "busy tried");
    // The 529 was not the answer, and a held backend is not tried again.
    for _ in 0..3 {
        assert_eq!(send().await.unwrap().status(), 200);
    }
    assert_eq!(busy.seen().len(), 1, "busy held after its 529");
    let snap = p.store.load().unwrap();
    let be = snap.backends().find(|b| &*b.id == "busy").unwrap();
    let now = tokio::time::Instant::now();
    let until = be.runtime.cooldown.cooling_until(now).expect("held");
    assert!(until - now <= Duration::from_secs(5), "a short hold");
    assert_eq!(be.runtime.cooldown.consecutive(), 0, "not a 429");
    assert!(
        p.cooldowns.try_recv().is_err(),
        "no fleet cooldown for a 529"
    );
    let mut retried = false;
    for _ in 0..answered + 3 {
        retried |= p.next_outcome().await.attempts == 2;
    }
    assert!(retried);
    p.shutdown().await.unwrap();

    // With nowhere else to go, an Anthropic client gets 529 overloaded_error.
    let p = TestProxy::start(snapshot(vec![anthropic(
        "busy",
        &busy.url(),
        &[("claude", "c")],
    )]))
    .await;
    let res = client()
        .post(p.url("/v1/messages"))
        .header("x-api-key", CLIENT_KEY)
        .body(r#"{"model":"claude","max_tokens":1,"messages":[]}"#)
        .send()
        .await
        .unwrap();
    assert!(res.headers().contains_key("retry-after"));
    let (status, kind, _) = anthropic_error(res).await;
    assert_eq!((status, kind.as_str()), (529, "overloaded_error"));
    p.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_naming_the_quota_marks_the_backend_exhausted_for_an_hour() {
    let spent = Upstream::start(|_| {
        Reply::json(
            429,
            r#"{"error":{"message":"You exceeded your current quota.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#,
        )
    })
    .await;
    let fine =
        Upstream::start(|_| Reply::json(200, r#"{"id":"resp_1","object":"response"}"#)).await;
    let mut p = TestProxy::start(snapshot(vec![
        backend("spent", &spent.url(), Pool::Primary, &[("gpt", "g")]),
        backend("fine", &fine.url(), Pool::Primary, &[("gpt", "g")]),
    ]))
    .await;
    for _ in 0..20 {
        if !spent.seen().is_empty() {
            break;
        }
        let res = p
            .post(
                "/v1/responses",
                serde_json::json!({"model": "gpt", "input": "hi"}),
            )
            .await;
        assert_eq!(res.status(), 200);
    }
    assert_eq!(spent.seen().len(), 1);
    let ev = p.cooldowns.recv().await.unwrap();
    assert_eq!(&*ev.backend_id, "spent");
    assert!(ev.quota_exhausted);
    assert_eq!(ev.cooldown, Duration::from_secs(3600));
    let snap = p.store.load().unwrap();
    let be = snap.backends().find(|b| &*b.id == "spent").unwrap();
    let now = tokio::time::Instant::now();
    assert!(be.runtime.cooldown.quota_exhausted_until(now).is_some());
    // A plain 429 is not a spent quota.
    let limited = Upstream::start(|_| {
        Reply::json(
            429,
            r#"{"error":{"type":"rate_limit_error","code":"rate_limit_exceeded"}}"#,
        )
        .header("retry-after", "2")
    })
    .await;
    let mut q = TestProxy::start(snapshot(vec![backend(
        "limited",
        &limited.url(),
        Pool::Primary,
        &[("gpt", "g")],
    )]))
    .await;
    let res = q.chat("gpt").await;
    assert_eq!(res.status(), 429);
    let ev = q.cooldowns.recv().await.unwrap();
    assert!(!ev.quota_exhausted);
    assert_eq!(ev.cooldown, Duration::from_secs(2));
    p.shutdown().await.unwrap();
    q.shutdown().await.unwrap();
}

/// An OpenAI backend that holds the responses `ids` and nothing else.
async fn holder(ids: &[&str]) -> Upstream {
    let ids: HashSet<String> = ids.iter().map(|s| (*s).to_string()).collect();
    Upstream::start(move |s| {
        let by_path = s.path.strip_prefix("/v1/responses/").map(str::to_string);
        let previous = serde_json::from_slice::<serde_json::Value>(&s.body)
            .ok()
            .and_then(|v| v["previous_response_id"].as_str().map(str::to_string));
        match (by_path, previous) {
            (Some(id), _) if !ids.contains(&id) => Reply::json(
                404,
                format!(r#"{{"error":{{"message":"No response found with id '{id}'.","type":"invalid_request_error","param":null,"code":null}}}}"#),
            ),
            (None, Some(id)) if !ids.contains(&id) => Reply::json(
                400,
                format!(r#"{{"error":{{"message":"Previous response with id '{id}' not found.","type":"invalid_request_error","param":"previous_response_id","code":"previous_response_not_found"}}}}"#),
            ),
            _ => Reply::json(200, r#"{"id":"resp_next","object":"response","status":"completed"}"#),
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_response_is_found_on_whichever_backend_holds_it() {
    let a = holder(&[]).await;
    let b = holder(&[]).await;
    let c = holder(&["resp_c"]).await;
    // No retries: probing for the owner is not limited by them.
    let mut p = TestProxy::start(snapshot_retries(
        vec![
            backend("a", &a.url(), Pool::Primary, &[("gpt", "g")]),
            backend("b", &b.url(), Pool::Primary, &[("gpt", "g")]),
            backend("c", &c.url(), Pool::Primary, &[("gpt", "g")]),
        ],
        0,
    ))
    .await;
    let base = p.url("/v1/responses");
    let get = |method: Method, id: &str| {
        client()
            .request(method, format!("{base}/{id}"))
            .bearer_auth(CLIENT_KEY)
            .send()
    };
    let res = get(Method::GET, "resp_c").await.unwrap();
    assert_eq!(res.status(), 200);
    let seen = c.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        (seen[0].method.as_str(), seen[0].path.as_str()),
        ("GET", "/v1/responses/resp_c")
    );
    assert!(seen[0].body.is_empty());
    assert_eq!(seen[0].header("authorization"), Some("Bearer sk-up-c"));

    let res = get(Method::DELETE, "resp_c").await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(c.seen()[1].method, Method::DELETE);

    // Nobody holds it: every backend is asked once, the last 404 is the answer.
    let before = a.seen().len() + b.seen().len() + c.seen().len();
    let res = get(Method::GET, "resp_none").await.unwrap();
    assert_eq!(res.status(), 404);
    let v: serde_json::Value = res.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("resp_none"),
        "{v}"
    );
    assert_eq!(a.seen().len() + b.seen().len() + c.seen().len() - before, 3);

    // A continuation finds the owner the same way.
    let res = p
        .post(
            "/v1/responses",
            serde_json::json!({"model": "gpt", "input": "more", "previous_response_id": "resp_c"}),
        )
        .await;
    assert_eq!(res.status(), 200);
    assert!(c.seen().iter().any(|s| s.method == Method::POST));
    let res = p
        .post(
            "/v1/responses",
            serde_json::json!({"model": "gpt", "input": "more", "previous_response_id": "resp_gone"}),
        )
        .await;
    let (status, v) = error_of(res).await;
    assert_eq!(status, 400);
    assert_eq!(v["error"]["code"], "previous_response_not_found");

    // Misses are not failures: nothing cooled, nothing ejected.
    assert!(p.cooldowns.try_recv().is_err());
    let snap = p.store.load().unwrap();
    let now = tokio::time::Instant::now();
    for be in snap.backends() {
        assert!(
            be.runtime.cooldown.cooling_until(now).is_none(),
            "{}",
            be.id
        );
        assert!(be.runtime.outlier.ejected_until(now).is_none(), "{}", be.id);
    }
    while let Ok(o) = p.outcomes.try_recv() {
        assert!(o.status < 500, "{}", o.status);
    }

    // The owner ejected: health never empties a route (issue 15's cap and
    // fail open), and only the owner can answer, so it is still asked.
    let snap = p.store.load().unwrap();
    let owner = snap.backends().find(|b| &*b.id == "c").unwrap().clone();
    let now = tokio::time::Instant::now();
    let policy = Default::default();
    while owner.runtime.outlier.on_failure(&policy, now).is_none() {}
    let res = get(Method::GET, "resp_c").await.unwrap();
    assert_eq!(
        res.status(),
        200,
        "fail open: the ejected owner still answers"
    );

    // The owner unavailable: not "not found" but "come back later". A spent
    // quota is out whatever health says (and gets no emergency trickle).
    owner
        .runtime
        .cooldown
        .exhaust(now + std::time::Duration::from_secs(3600));
    let res = get(Method::GET, "resp_c").await.unwrap();
    assert!(res.headers().contains_key("retry-after"));
    let (status, _) = error_of(res).await;
    assert_eq!(status, 503);
    p.shutdown().await.unwrap();
}
