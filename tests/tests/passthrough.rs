//! Byte-faithful passthrough (issue 12): a hand-written Messages body (odd
//! key order, extra whitespace, unicode escapes, `cache_control` with
//! `ttl: "1h"`) reaches the upstream byte for byte with only the `model`
//! value replaced; the upstream gets the backend's `x-api-key`, the client's
//! `anthropic-version` and `anthropic-beta`, and no client key; the client
//! gets the upstream's bytes unchanged, streamed or not.

use crate::data_plane_support::*;
use std::time::Duration;

/// Deliberately not what any serializer would write.
const RAW: &str = "{\n  \"stream\" : false ,\n\t\"max_tokens\":  7,\n  \"model\" :\"claude\",\
\n  \"metadata\": {\"user_id\" : \"u-\\u00e9t\\u00e9\"},\
\n  \"system\": [ {\"type\":\"text\", \"text\":\"caf\\u00e9 \\ud83d\\ude00   rules\",\
 \"cache_control\": {\"ttl\":\"1h\",  \"type\":\"ephemeral\"}} ],\
\n  \"messages\":[{\"content\":\"hi   there \\\"quoted\\\"\",\"role\":\"user\"}]\n}\n";

fn expected_upstream(raw: &str) -> String {
    raw.replacen("\"model\" :\"claude\"", "\"model\" :\"claude-ant\"", 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_bodies_pass_byte_for_byte_with_only_the_model_replaced() {
    let f = Fleet::start(vec![BackendSpec::new("ant", "anthropic", "claude", "")], 1);
    let beta = "prompt-caching-2024-07-31,extended-cache-ttl-2025-04-11";
    let streamed = RAW.replacen("\"stream\" : false", "\"stream\" : true", 1);
    let mut bearer_raw = RAW.replacen("\"max_tokens\":  7", "\"max_tokens\":  3", 1);
    bearer_raw.push(' ');
    for (i, (body, bearer)) in [
        (RAW, false),
        (streamed.as_str(), false),
        (bearer_raw.as_str(), true),
    ]
    .into_iter()
    .enumerate()
    {
        let mut req = f
            .http
            .post(format!("{}/v1/messages", f.proxies[0].url()))
            .header("anthropic-version", "2023-06-01")
            .header("anthropic-beta", beta)
            .header("content-type", "application/json")
            .body(body.to_owned());
        req = if bearer {
            req.bearer_auth(&f.key)
        } else {
            req.header("x-api-key", &f.key)
        };
        let res = req.send().await.expect("sent");
        let status = res.status();
        let got = res.bytes().await.expect("body");
        assert_eq!(
            status,
            200,
            "request {i}: {}\n{}",
            String::from_utf8_lossy(&got),
            f.logs()
        );
        let recs = f.mocks[0]
            .wait_for_requests(i as u64 + 1, Duration::from_secs(10))
            .await;
        let rec = &recs[i];
        assert_eq!(
            String::from_utf8_lossy(&rec.body_bytes),
            expected_upstream(body),
            "request {i}: the upstream must get the client's bytes with only the model replaced"
        );
        assert_eq!(rec.body_bytes, expected_upstream(body).as_bytes());
        assert_eq!(rec.header("x-api-key"), Some(f.specs[0].key().as_str()));
        assert_eq!(rec.header("anthropic-version"), Some("2023-06-01"));
        assert_eq!(rec.header("anthropic-beta"), Some(beta));
        for (name, value) in &rec.header_list {
            assert!(
                !value.contains(&f.key),
                "request {i}: the client key reached the upstream in `{name}`"
            );
        }
        assert!(
            rec.header("authorization").is_none(),
            "request {i}: an Anthropic backend gets x-api-key, not Authorization"
        );
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&rec.response_body),
            "request {i}: the client must get the upstream's bytes unchanged"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_anthropic_version_is_added_for_the_upstream() {
    let f = Fleet::start(vec![BackendSpec::new("ant", "anthropic", "claude", "")], 1);
    let res = f
        .http
        .post(format!("{}/v1/messages", f.proxies[0].url()))
        .header("x-api-key", &f.key)
        .body(RAW)
        .send()
        .await
        .expect("sent");
    assert_eq!(res.status(), 200, "{}", f.logs());
    let recs = f.mocks[0]
        .wait_for_requests(1, Duration::from_secs(10))
        .await;
    assert_eq!(recs[0].header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(recs[0].body_bytes, expected_upstream(RAW).as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_bodies_pass_byte_for_byte_and_unknown_paths_list_the_endpoints() {
    let f = Fleet::start(vec![BackendSpec::new("oai", "openai", "gpt", "")], 1);
    let raw = "{ \"input\" : [ {\"role\":\"user\",\"content\":\"na\\u00efve  text\"} ],\n\
               \"model\":   \"gpt\", \"prompt_cache_key\":\"k-1\", \"store\" : true }";
    let res = f
        .http
        .post(format!("{}/v1/responses", f.proxies[0].url()))
        .bearer_auth(&f.key)
        .header("content-type", "application/json")
        .body(raw)
        .send()
        .await
        .expect("sent");
    let status = res.status();
    let got = res.bytes().await.expect("body");
    assert_eq!(
        status,
        200,
        "{}\n{}",
        String::from_utf8_lossy(&got),
        f.logs()
    );
    let recs = f.mocks[0]
        .wait_for_requests(1, Duration::from_secs(10))
        .await;
    let want = raw.replacen("\"model\":   \"gpt\"", "\"model\":   \"gpt-oai\"", 1);
    assert_eq!(String::from_utf8_lossy(&recs[0].body_bytes), want);
    assert_eq!(
        recs[0].header("authorization"),
        Some(format!("Bearer {}", f.specs[0].key()).as_str())
    );
    assert_eq!(got.as_ref(), recs[0].response_body.as_slice());

    let res = f
        .http
        .post(format!("{}/v1/no-such-endpoint", f.proxies[0].url()))
        .bearer_auth(&f.key)
        .body("{}")
        .send()
        .await
        .expect("sent");
    assert_eq!(res.status(), 404);
    let text = res.text().await.expect("body");
    for endpoint in ["/v1/messages", "/v1/responses", "/v1/chat/completions"] {
        assert!(
            text.contains(endpoint),
            "the 404 must list {endpoint}: {text}"
        );
    }
}
