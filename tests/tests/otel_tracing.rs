//! OpenTelemetry traces with real processes: the real control plane and
//! proxy export to a fake OTLP collector (the proxy over OTLP/HTTP, the
//! control plane over OTLP/gRPC), an in-process mock upstream stands in for
//! the provider and records the `traceparent` it receives.
//!
//! - a chat completion carrying a client `traceparent` gives a proxy span in
//!   that trace with the GenAI attributes and an attempt child span, whose
//!   context is what the upstream receives;
//! - a manual heartbeat run gives a control-plane span, and the proxy's span
//!   of the run's request joins its trace;
//! - no span carries the provider key or the client key;
//! - without an endpoint (or with `OTEL_SDK_DISABLED=true`) nothing is
//!   exported, nothing is logged about it, and the client's `traceparent`
//!   reaches the upstream untouched.

use std::time::Duration;

use claw_tests::harness::{ControlPlane, ControlPlaneBuilder, Proxy, ProxyBuilder};
use claw_tests::mock::{Action, MockConfig, MockUpstream};
use claw_tests::otlp::{FakeCollector, ReceivedSpan};
use serde_json::{Value, json};

const PROVIDER_KEY: &str = "sk-up-traced-0123456789abcdef";
const MODEL: &str = "chat";
const NATIVE: &str = "native-chat-traced";
const AGENT: &str = "agent-traced";
/// The client's trace and its span.
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";
/// The trace of a request that fails.
const FAILED_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
/// How long exported spans may take to reach the collector.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(20);

/// Every `OTEL_*` variable the binaries read: cleared on the children so
/// the test's own environment cannot leak in.
const OTEL_VARS: [&str; 14] = [
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
];

fn clean_cp(mut b: ControlPlaneBuilder) -> ControlPlaneBuilder {
    for v in OTEL_VARS {
        b = b.env_remove(v);
    }
    b
}

fn clean_proxy(mut b: ProxyBuilder) -> ProxyBuilder {
    for v in OTEL_VARS {
        b = b.env_remove(v);
    }
    b
}

fn traceparent(trace: &str, span: &str) -> String {
    format!("00-{trace}-{span}-01")
}

/// `(trace id, span id)` of a `traceparent` header.
fn parse_traceparent(h: &str) -> (String, String) {
    let parts: Vec<&str> = h.split('-').collect();
    assert_eq!(parts.len(), 4, "not a traceparent: {h:?}");
    assert_eq!(parts[0], "00", "{h:?}");
    (parts[1].to_owned(), parts[2].to_owned())
}

/// A backend serving [`MODEL`] as [`NATIVE`] at `url`, and a client key
/// (its secret).
fn configure(cp: &ControlPlane, url: &str) -> String {
    cp.clawctl_with_env(
        &[
            "backend",
            "add",
            "traced",
            "--url",
            url,
            "--api-key-env",
            "K",
            "--rpm",
            "6000",
            "--model",
            &format!("{MODEL}={NATIVE}"),
        ],
        &[("K", PROVIDER_KEY)],
    )
    .assert_ok();
    // The key speaks for the agent ids its requests name (x-claw-agent-id
    // is honoured only for a key's own agents).
    cp.clawctl(&[
        "key",
        "add",
        "traced-client",
        "--agents",
        "agent-chat",
        "-o",
        "json",
    ])
    .assert_ok()
    .json()["secret"]
        .as_str()
        .expect("`key add -o json` prints the secret")
        .to_owned()
}

async fn post_chat(proxy: &Proxy, key: &str, traceparent: &str, agent: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", proxy.url()))
        .bearer_auth(key)
        .header("traceparent", traceparent)
        .header("x-claw-agent-id", agent)
        .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "hello"}]}))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("the proxy answers")
}

async fn chat(proxy: &Proxy, key: &str, traceparent: &str, agent: &str) -> Value {
    let res = post_chat(proxy, key, traceparent, agent).await;
    assert_eq!(res.status(), 200, "{:?}", res.text().await);
    res.json().await.expect("a JSON completion")
}

fn find(spans: &[ReceivedSpan], pred: impl Fn(&ReceivedSpan) -> bool) -> Option<&ReceivedSpan> {
    spans.iter().find(|s| pred(s))
}

/// No attribute of any span or resource mentions a secret.
#[track_caller]
fn assert_no_secrets(spans: &[ReceivedSpan], secrets: &[&str]) {
    for s in spans {
        for (k, v) in s.attributes.iter().chain(s.resource.iter()) {
            let text = v.to_string();
            for secret in secrets {
                assert!(
                    !text.contains(secret),
                    "span {:?} attribute {k} carries a secret: {text}",
                    s.name
                );
            }
            assert!(
                !text.contains("Bearer"),
                "span {:?} attribute {k}: {text}",
                s.name
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completions_and_heartbeat_runs_are_traced_through_the_proxy_to_the_upstream() {
    let collector = FakeCollector::start();
    let upstream = MockUpstream::start(
        MockConfig::default()
            .name("traced")
            .api_key(PROVIDER_KEY)
            .models([NATIVE]),
    )
    .await;
    upstream.set_always(Some(Action::reply("HEARTBEAT_OK")));
    let fwd = claw_tests::harness::Forwarder::start().await;
    let cp = clean_cp(ControlPlane::builder())
        .heartbeat_proxy(format!("http://{}", fwd.addr()))
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint())
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .start();
    let key = configure(&cp, &upstream.url());
    cp.clawctl_stdin(
        &[
            "agent",
            "add",
            AGENT,
            "--model",
            MODEL,
            "--interval",
            "24h",
            "--checklist-file",
            "-",
        ],
        "- [ ] check the disk\n",
    )
    .assert_ok();
    let proxy = clean_proxy(Proxy::builder(&cp))
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint())
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .start();
    proxy.wait_ready();
    fwd.point_to(proxy.addr());

    // A client request in the client's trace.
    let reply = chat(
        &proxy,
        &key,
        &traceparent(TRACE_ID, CLIENT_SPAN),
        "agent-chat",
    )
    .await;
    assert_eq!(reply["model"], NATIVE, "{reply}");
    let seen = upstream.wait_for_requests(1, Duration::from_secs(10)).await;
    let sent = seen[0]
        .header("traceparent")
        .unwrap_or_else(|| panic!("the upstream got no traceparent: {:?}", seen[0].headers));
    let (trace, attempt_id) = parse_traceparent(sent);
    assert_eq!(
        trace, TRACE_ID,
        "the upstream request continues the client's trace"
    );
    assert_ne!(
        attempt_id, CLIENT_SPAN,
        "the proxy's attempt span is the upstream's parent"
    );

    let spans = collector
        .wait_for(EXPORT_TIMEOUT, |s| {
            find(s, |x| x.span_id == attempt_id).is_some()
                && find(s, |x| x.trace_id == TRACE_ID && x.kind == 2).is_some()
        })
        .unwrap_or_else(|s| {
            panic!(
                "no proxy spans in trace {TRACE_ID}: {s:#?}\n{}",
                proxy.logs()
            )
        });
    let request = find(&spans, |x| x.trace_id == TRACE_ID && x.kind == 2).expect("request span");
    assert_eq!(request.service, "claw-data-plane");
    assert_eq!(request.protocol, "http/protobuf");
    assert_eq!(request.name, format!("chat {MODEL}"));
    assert_eq!(
        request.parent_span_id, CLIENT_SPAN,
        "it continues the client's span"
    );
    assert_eq!(request.attr("gen_ai.operation.name"), "chat");
    assert_eq!(request.attr("gen_ai.request.model"), MODEL);
    assert_eq!(request.attr("gen_ai.response.model"), NATIVE);
    assert!(
        request.attr("gen_ai.usage.input_tokens").as_i64() > Some(0),
        "{request:#?}"
    );
    assert!(
        request.attr("gen_ai.usage.output_tokens").as_i64() > Some(0),
        "{request:#?}"
    );
    assert_eq!(request.attr("http.response.status_code"), 200);
    assert_eq!(request.attr("claw.retries"), 0);
    assert_eq!(request.attr("claw.agent.id"), "agent-chat");
    assert_eq!(request.attr("server.address"), "127.0.0.1");
    assert!(
        request
            .attr("claw.backend.id")
            .as_str()
            .is_some_and(|b| !b.is_empty()),
        "{request:#?}"
    );
    assert_eq!(request.attr("error.type"), &Value::Null);
    assert_ne!(request.status_code, 2, "not an error");

    let attempt = find(&spans, |x| x.span_id == attempt_id).expect("attempt span");
    assert_eq!(attempt.trace_id, TRACE_ID);
    assert_eq!(
        attempt.parent_span_id, request.span_id,
        "the attempt is the request's child"
    );
    assert_eq!(attempt.kind, 3, "client");
    assert_eq!(attempt.name, format!("chat {NATIVE}"));
    assert_eq!(attempt.attr("gen_ai.request.model"), NATIVE);
    assert_eq!(attempt.attr("http.response.status_code"), 200);
    assert_eq!(attempt.attr("claw.attempt"), 1);
    assert_eq!(
        attempt.attr("claw.backend.id"),
        request.attr("claw.backend.id")
    );

    // A manual heartbeat run: the control plane's span, and the proxy's span
    // of the run's request in the same trace.
    let run = cp
        .clawctl(&["heartbeat", "run", AGENT, "--wait", "-o", "json"])
        .assert_ok()
        .json();
    let run_id = run["run_id"].as_str().expect("a run id").to_owned();
    assert_eq!(run["status"], "suppressed", "{run}");
    let spans = collector
        .wait_for(EXPORT_TIMEOUT, |s| {
            find(s, |x| x.attr("claw.heartbeat.run_id") == run_id.as_str()).is_some_and(|hb| {
                find(s, |x| {
                    x.service == "claw-data-plane" && x.parent_span_id == hb.span_id
                })
                .is_some()
            })
        })
        .unwrap_or_else(|s| panic!("no heartbeat trace for run {run_id}: {s:#?}\n{}", cp.logs()));
    let hb = find(&spans, |x| {
        x.attr("claw.heartbeat.run_id") == run_id.as_str()
    })
    .expect("run span");
    assert_eq!(hb.service, "claw-control-plane");
    assert_eq!(hb.protocol, "grpc");
    assert_eq!(hb.name, format!("heartbeat {AGENT}"));
    assert_eq!(hb.attr("claw.agent.id"), AGENT);
    assert_eq!(hb.attr("claw.heartbeat.trigger"), "manual");
    assert_eq!(hb.attr("claw.heartbeat.outcome"), "suppressed");
    assert!(
        hb.attr("gen_ai.usage.input_tokens").as_i64() > Some(0),
        "{hb:#?}"
    );
    let served = find(&spans, |x| {
        x.service == "claw-data-plane" && x.parent_span_id == hb.span_id
    })
    .expect("the proxy's span of the run");
    assert_eq!(
        served.trace_id, hb.trace_id,
        "the proxy's span joins the heartbeat's trace"
    );
    assert_eq!(served.attr("claw.agent.id"), AGENT);
    let upstream_trace = upstream
        .requests()
        .iter()
        .filter_map(|r| r.header("traceparent").map(|h| parse_traceparent(h).0))
        .any(|t| t == hb.trace_id);
    assert!(upstream_trace, "the upstream saw the heartbeat's trace");

    // A failed request: the attempt's 500 and the request's 502 are errors.
    upstream.push(Action::status(500));
    let res = post_chat(
        &proxy,
        &key,
        &traceparent(FAILED_TRACE, CLIENT_SPAN),
        "agent-chat",
    )
    .await;
    assert_eq!(res.status(), 502);
    let spans = collector
        .wait_for(EXPORT_TIMEOUT, |s| {
            find(s, |x| x.trace_id == FAILED_TRACE && x.kind == 2).is_some()
                && find(s, |x| x.trace_id == FAILED_TRACE && x.kind == 3).is_some()
        })
        .unwrap_or_else(|s| panic!("no spans of the failed request: {s:#?}"));
    let failed = find(&spans, |x| x.trace_id == FAILED_TRACE && x.kind == 2).expect("request");
    assert_eq!(failed.attr("http.response.status_code"), 502);
    assert_eq!(failed.attr("error.type"), "upstream_error");
    assert_eq!(failed.status_code, 2, "error status");
    let attempt = find(&spans, |x| x.trace_id == FAILED_TRACE && x.kind == 3).expect("attempt");
    assert_eq!(attempt.attr("http.response.status_code"), 500);
    assert_eq!(attempt.attr("error.type"), "500");
    assert_eq!(attempt.parent_span_id, failed.span_id);

    assert_no_secrets(
        &spans,
        &[PROVIDER_KEY, &key, cp.admin_token(), cp.proxy_token()],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_endpoint_nothing_is_exported_and_traceparent_passes_through() {
    let collector = FakeCollector::start();
    let upstream = MockUpstream::start(
        MockConfig::default()
            .name("untraced")
            .api_key(PROVIDER_KEY)
            .models([NATIVE]),
    )
    .await;
    let cp = clean_cp(ControlPlane::builder()).start();
    let key = configure(&cp, &upstream.url());
    // One proxy without any OTEL_* variable, one with an endpoint but the SDK disabled.
    let plain = clean_proxy(Proxy::builder(&cp)).start();
    let disabled = clean_proxy(Proxy::builder(&cp))
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint())
        .env("OTEL_SDK_DISABLED", "true")
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .start();
    let client_traceparent = traceparent(TRACE_ID, CLIENT_SPAN);
    for (i, proxy) in [&plain, &disabled].into_iter().enumerate() {
        proxy.wait_ready();
        chat(proxy, &key, &client_traceparent, "agent-chat").await;
        let seen = upstream
            .wait_for_requests(i as u64 + 1, Duration::from_secs(10))
            .await;
        assert_eq!(
            seen[i].header("traceparent"),
            Some(client_traceparent.as_str()),
            "untouched when not tracing"
        );
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(collector.spans().is_empty(), "{:#?}", collector.spans());
    for (what, logs) in [
        ("control plane", cp.logs()),
        ("plain proxy", plain.logs()),
        ("disabled proxy", disabled.logs()),
    ] {
        let lower = logs.to_lowercase();
        assert!(
            !lower.contains("opentelemetry") && !lower.contains("otlp") && !logs.contains("ERROR"),
            "{what} logged about tracing or an error:\n{logs}"
        );
    }
}
