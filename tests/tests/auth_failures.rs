//! An upstream 401/403 means the gateway's provider key for that backend is
//! bad (issue 15), through the real binaries: two proxies, backend `ba`
//! with a key its mock rejects, `bb` with a good one. A request is retried
//! on `bb` (the client sees 200); with only `ba` serving the model the
//! client gets 502 in its own shape naming `ba`, never its own
//! `invalid_api_key`; after the first 401 on proxy 0, proxy 1 never sends to
//! `ba`; `clawctl backend get ba -o json` says `auth_failed` until
//! `clawctl backend update ba --api-key-env …` sets a key that works.

use crate::data_plane_support::*;
use claw_tests::harness::wait_until;
use serde_json::{Value, json};
use std::time::Duration;

/// `ba`'s index in the fleet's backends and mocks.
const A: usize = 0;

fn chat(model: &str) -> Value {
    json!({"model": model, "max_tokens": 4,
           "messages": [{"role": "user", "content": "hello"}]})
}

async fn send_chat(f: &Fleet, proxy: usize, model: &str) -> (u16, Value) {
    let res = f
        .post_openai(proxy, "chat/completions", &chat(model), &[])
        .await;
    let status = res.status().as_u16();
    let text = res.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn send_messages(f: &Fleet, proxy: usize, model: &str) -> (u16, Value) {
    let res = f.messages(proxy, &chat(model).to_string(), &[]).await;
    let status = res.status().as_u16();
    let text = res.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn requests_to(f: &Fleet, i: usize) -> u64 {
    f.mocks[i].totals().requests
}

fn status_of(f: &Fleet, name: &str) -> String {
    f.cp.clawctl(&["backend", "get", name, "-o", "json"])
        .assert_ok()
        .json()["status"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn set_key(f: &Fleet, key: &str) {
    f.cp.clawctl_with_env(
        &[
            "backend",
            "update",
            "ba",
            "--api-key-env",
            "CLAW_TEST_NEW_KEY",
        ],
        &[("CLAW_TEST_NEW_KEY", key)],
    )
    .assert_ok();
    f.wait_synced();
}

/// The 502 a client gets for `ba`'s rejected key, OpenAI-shaped.
#[track_caller]
fn assert_names_ba(status: u16, v: &Value, logs: &str) {
    assert_eq!(status, 502, "{v}\n{logs}");
    let e = &v["error"];
    assert_eq!(e["type"], "upstream_auth_failed", "{v}");
    assert_ne!(e["code"], "invalid_api_key", "{v}");
    let m = e["message"].as_str().unwrap_or_default();
    assert!(
        m.contains("backend \"ba\" rejected the gateway's provider key"),
        "{m}"
    );
    assert!(m.contains("an operator must update its key"), "{m}");
    assert!(!m.contains("sk-"), "no key in the message: {m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_provider_key_is_retried_elsewhere_named_in_a_502_and_excluded_fleet_wide() {
    let mut ba = BackendSpec::new("ba", "openai", "gpt", "");
    ba.models.push("solo=solo-ba".into());
    ba.native.push("solo-ba".into());
    let f = Fleet::start(vec![ba, BackendSpec::new("bb", "openai", "gpt", "")], 2);
    set_key(&f, "sk-wrong-0123456789abcdef");

    // Proxy 0 until it has tried `ba`: each request is retried on `bb`.
    let mut tries = 0;
    while requests_to(&f, A) == 0 {
        tries += 1;
        assert!(tries <= 50, "proxy 0 never chose `ba`\n{}", f.logs());
        let (status, v) = send_chat(&f, 0, "gpt").await;
        assert_eq!(
            status,
            200,
            "a 401 is retried on the other backend: {v}\n{}",
            f.logs()
        );
    }
    f.ok_counts(); // none in flight
    assert_eq!(f.mocks[A].totals().http_errors, 1, "`ba` answered 401");

    // Only `ba` serves `solo`: 502 naming it, in the client's own shape.
    let (status, v) = send_chat(&f, 0, "solo").await;
    assert_names_ba(status, &v, &f.logs());
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("(401)")),
        "{v}"
    );
    let (status, v) = send_messages(&f, 0, "solo").await;
    assert_eq!(status, 502, "{v}");
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], "api_error", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("backend \"ba\" rejected the gateway's provider key")),
        "{v}"
    );
    assert_eq!(requests_to(&f, A), 1, "proxy 0 stopped using `ba` at once");

    // Fleet-wide: the control plane says so, proxy 1 learns it.
    let ok = wait_until(Duration::from_secs(30), || {
        status_of(&f, "ba") == "auth_failed"
    });
    assert!(
        ok,
        "`backend get ba` never showed auth_failed\n{}",
        f.logs()
    );
    let list = f.cp.clawctl(&["backend", "list"]).assert_ok().stdout;
    assert!(
        list.lines()
            .any(|l| l.contains("ba") && l.contains("auth_failed")),
        "{list}"
    );
    assert_eq!(status_of(&f, "bb"), "enabled");
    let id =
        f.cp.clawctl(&["backend", "get", "ba", "-o", "json"])
            .assert_ok()
            .json()["id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
    let metrics = f
        .http
        .get(format!("{}/metrics", f.cp.http_url()))
        .send()
        .await
        .expect("control plane /metrics")
        .text()
        .await
        .expect("metrics body");
    assert!(
        metrics.contains(&format!(
            "claw_cp_backend_auth_failed{{backend=\"{id}\"}} 1"
        )),
        "{metrics}"
    );
    let ok = wait_until(Duration::from_secs(30), || {
        f.proxies[1]
            .logs()
            .contains("rejected elsewhere in the fleet")
    });
    assert!(ok, "proxy 1 never applied the auth failure\n{}", f.logs());
    for _ in 0..10 {
        let (status, v) = send_chat(&f, 1, "gpt").await;
        assert_eq!(status, 200, "{v}");
    }
    let (status, v) = send_chat(&f, 1, "solo").await;
    assert_names_ba(status, &v, &f.logs());
    assert_eq!(requests_to(&f, A), 1, "proxy 1 never sent to `ba`");

    // The same rejected key set again with another change: still rejected,
    // so the mark stays (the proxies keep skipping `ba` too).
    f.cp.clawctl_with_env(
        &[
            "backend",
            "update",
            "ba",
            "--api-key-env",
            "CLAW_TEST_NEW_KEY",
            "--rpm",
            "77",
        ],
        &[("CLAW_TEST_NEW_KEY", "sk-wrong-0123456789abcdef")],
    )
    .assert_ok();
    f.wait_synced();
    assert_eq!(status_of(&f, "ba"), "auth_failed");

    // The operator fixes the key: cleared everywhere, `ba` serves again.
    set_key(&f, &f.specs[A].key());
    assert_eq!(status_of(&f, "ba"), "enabled");
    for proxy in 0..2 {
        let before = f.ok_counts();
        let (status, v) = send_chat(&f, proxy, "solo").await;
        assert_eq!(status, 200, "proxy {proxy}: {v}\n{}", f.logs());
        assert_eq!(f.served_by(&before), A, "proxy {proxy} used `ba`");
    }

    // Broken again, on a proxy that never saw it: the attempt's own 401.
    set_key(&f, "sk-wrong-again-0123456789abcdef");
    let (status, v) = send_chat(&f, 1, "solo").await;
    assert_names_ba(status, &v, &f.logs());
    let marked = wait_until(Duration::from_secs(30), || {
        status_of(&f, "ba") == "auth_failed"
    });
    assert!(marked, "not marked again\n{}", f.logs());

    // Fixed through `apply` this time (the exported document names the key
    // by its variable): the apply clears the mark like an update does.
    let doc = f.cp.clawctl(&["export"]).assert_ok().stdout;
    assert!(doc.contains("CLAW_TEST_NEW_KEY"), "{doc}");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("claw.yaml");
    std::fs::write(&file, &doc).expect("write the document");
    let path = file.display().to_string();
    f.cp.clawctl_with_env(
        &["apply", "-f", path.as_str()],
        &[("CLAW_TEST_NEW_KEY", f.specs[A].key().as_str())],
    )
    .assert_ok();
    f.wait_synced();
    assert_eq!(status_of(&f, "ba"), "enabled");
    let before = f.ok_counts();
    let (status, v) = send_chat(&f, 1, "solo").await;
    assert_eq!(status, 200, "{v}\n{}", f.logs());
    assert_eq!(f.served_by(&before), A, "proxy 1 used `ba` again");
}
