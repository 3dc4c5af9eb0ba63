//! What operators read (issue 15): every proxy answer carries an
//! `x-request-id` (the client's own when sane, forwarded upstream), a failed
//! upstream attempt (or a stream cut mid-way) is logged once with the
//! backend's name and id, the model and that request id, and logs written to a file have no colour codes.

use crate::data_plane_support::*;
use claw_tests::harness::{ControlPlane, Proxy};
use claw_tests::mock::Action;

fn request_id(res: &reqwest::Response) -> String {
    res.headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("no x-request-id on a {} answer", res.status()))
        .to_owned()
}

fn is_generated(id: &str) -> bool {
    id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A chat completion with `x-request-id: id` (if any).
async fn chat_with_id(c: &Cluster, id: Option<&str>, stream: bool) -> reqwest::Response {
    let mut req = c
        .http
        .post(format!("{}/v1/chat/completions", c.proxy().url()))
        .bearer_auth(&c.key)
        .json(&chat_body(CHAT, stream));
    if let Some(id) = id {
        req = req.header("x-request-id", id);
    }
    req.send().await.expect("POST /v1/chat/completions")
}

/// The `x-request-id` the primary mock got on its latest request.
fn upstream_id(c: &Cluster) -> Option<String> {
    c.primary
        .requests()
        .last()
        .and_then(|r| r.header("x-request-id").map(str::to_owned))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_carries_an_x_request_id_and_a_sane_client_one_is_kept() {
    let c = Cluster::with(ClusterOptions {
        proxies: 1,
        ..ClusterOptions::default()
    });

    // The client's own id: returned and forwarded upstream.
    let res = chat_with_id(&c, Some("client-req_1:a.b"), false).await;
    assert_eq!(res.status(), 200);
    assert_eq!(request_id(&res), "client-req_1:a.b");
    assert_eq!(upstream_id(&c).as_deref(), Some("client-req_1:a.b"));

    // None, or junk: a generated one, and the junk never goes upstream.
    let res = chat_with_id(&c, None, false).await;
    assert_eq!(res.status(), 200);
    assert!(is_generated(&request_id(&res)), "{}", request_id(&res));
    let res = chat_with_id(&c, Some("has spaces/and slashes"), false).await;
    assert_eq!(res.status(), 200);
    let id = request_id(&res);
    assert!(is_generated(&id), "{id}");
    assert_eq!(upstream_id(&c), Some(id));

    // A stream.
    let res = chat_with_id(&c, Some("stream-1"), true).await;
    assert_eq!(res.status(), 200);
    assert_eq!(request_id(&res), "stream-1");
    let body = res.text().await.expect("the stream");
    assert!(body.contains("data:"), "{body}");

    // Errors: no key (401), an unknown path (404), an unknown model (404).
    let url = c.proxy().url();
    let res = c
        .http
        .post(format!("{url}/v1/chat/completions"))
        .json(&chat_body(CHAT, false))
        .send()
        .await
        .expect("POST without a key");
    assert_eq!(res.status(), 401);
    assert!(is_generated(&request_id(&res)));
    let res = c
        .http
        .get(format!("{url}/nowhere"))
        .header("x-request-id", "lost-1")
        .send()
        .await
        .expect("GET /nowhere");
    assert_eq!(res.status(), 404);
    assert_eq!(request_id(&res), "lost-1");
    let res = c
        .post(
            c.proxy(),
            "chat/completions",
            &chat_body("no-such-model", false),
        )
        .await;
    assert!(res.status().is_client_error(), "{}", res.status());
    assert!(is_generated(&request_id(&res)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_attempt_is_logged_once_with_backend_model_and_the_clients_request_id() {
    let c = Cluster::with(ClusterOptions {
        proxies: 1,
        ..ClusterOptions::default()
    });
    // The primary answers 500; the fallback answers.
    c.primary.push(Action::status(500));
    let res = chat_with_id(&c, None, false).await;
    assert_eq!(res.status(), 200);
    let id = request_id(&res);
    assert_eq!(c.primary.totals().http_errors, 1);

    let logs = c.proxy().logs();
    let failed: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("upstream attempt failed"))
        .collect();
    assert_eq!(failed.len(), 1, "one line for the failure:\n{logs}");
    let line = failed[0];
    for want in [
        "WARN",
        "backend=primary",
        "backend_id=",
        "model=chat",
        "status=500",
        "retrying=true",
        &format!("request_id={id}"),
    ] {
        assert!(line.contains(want), "no `{want}` in: {line}");
    }
    assert!(
        logs.lines()
            .any(|l| l.contains("answered after a retry") && l.contains(&id)),
        "the retry's success is logged:\n{logs}"
    );
    for secret in [PRIMARY_KEY, FALLBACK_KEY] {
        assert!(
            !logs.contains(secret),
            "a provider key in the logs:\n{logs}"
        );
    }
}

#[test]
fn logs_written_to_a_file_have_no_colour_codes() {
    // The harness sets NO_COLOR; without it, only "stderr is not a
    // terminal" may keep the colours out.
    let cp = ControlPlane::builder().env_remove("NO_COLOR").start();
    let proxy = Proxy::builder(&cp).env_remove("NO_COLOR").start();
    proxy.wait_ready();
    for (name, logs) in [("control plane", cp.logs()), ("proxy", proxy.logs())] {
        assert!(logs.contains("INFO"), "the {name} logged nothing:\n{logs}");
        assert!(
            !logs.contains("\x1b["),
            "ANSI colour codes in the {name}'s log file:\n{logs:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_mid_way_is_logged_with_backend_and_request_id() {
    let c = Cluster::with(ClusterOptions {
        proxies: 1,
        ..ClusterOptions::default()
    });
    c.primary.push(Action::reset_mid_stream(2));
    let res = chat_with_id(&c, Some("cut-1"), true).await;
    assert_eq!(res.status(), 200);
    assert_eq!(request_id(&res), "cut-1");
    // The client's stream ends (with an error event) after the line is written.
    let _ = res.bytes().await;
    let logs = c.proxy().logs();
    let cut: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("broke off mid-stream"))
        .collect();
    assert_eq!(cut.len(), 1, "{logs}");
    for want in [
        "WARN",
        "request_id=cut-1",
        "backend=primary",
        "backend_id=",
        "model=chat",
    ] {
        assert!(cut[0].contains(want), "no `{want}` in: {}", cut[0]);
    }
}
