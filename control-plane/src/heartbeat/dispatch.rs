//! The run itself: one chat completion through a proxy.
//!
//! `POST {CLAW_HEARTBEAT_PROXY}/v1/chat/completions` with the agent's model,
//! a system message (the built-in heartbeat prompt or the agent's
//! override) and the checklist as the user message; authenticated with the
//! control plane's internal client key and sent as background traffic under
//! the agent's heartbeat session. The whole exchange is bounded by the
//! run's timeout.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

/// The prompt a heartbeat run gets unless the agent overrides it.
pub const DEFAULT_PROMPT: &str = "This is a scheduled heartbeat. Read the checklist below (the \
agent's HEARTBEAT.md) and follow it strictly; do not infer or repeat old tasks from earlier \
conversations. If nothing needs attention, reply with exactly HEARTBEAT_OK. Otherwise reply \
with a short alert saying what needs attention, without HEARTBEAT_OK.";

/// Largest reply body read from the proxy.
const MAX_REPLY_BYTES: usize = 4 * 1024 * 1024;

/// The pooled HTTP(S) client used for runs and webhook deliveries.
pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Builds the HTTP client (webpki roots, HTTP/1.1).
pub fn http_client() -> anyhow::Result<HttpClient> {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())?;
    Ok(client_over(https))
}

/// Like [`http_client`], but an `https://` peer must present a certificate
/// issued by the CA bundle at `ca` (`--heartbeat-proxy-ca`), not by a public
/// root. Used only for the runs, so webhooks keep the public roots.
pub fn http_client_trusting(ca: &std::path::Path) -> anyhow::Result<HttpClient> {
    let tls = claw_tls::client::client_config(ca)?;
    Ok(client_over(
        hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls),
    ))
}

fn client_over(
    https: hyper_rustls::HttpsConnectorBuilder<hyper_rustls::builderstates::WantsSchemes>,
) -> HttpClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(10)));
    let https = https.https_or_http().enable_http1().wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .build(https)
}

/// What a run sends.
#[derive(Debug, Clone)]
pub struct RunRequest {
    /// The agent (`x-claw-agent-id`).
    pub agent_id: String,
    /// The run's id (for its trace span).
    pub run_id: String,
    /// `schedule` or `manual` (for its trace span).
    pub trigger: &'static str,
    /// The canonical model.
    pub model: String,
    /// The system message.
    pub prompt: String,
    /// The user message: the checklist.
    pub checklist: String,
    /// `x-claw-session-key`.
    pub session_key: String,
    /// Bound on the whole exchange.
    pub timeout: Duration,
}

/// What a run got back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunReply {
    /// The assistant message.
    pub content: String,
    /// The model that answered (as the proxy reports it).
    pub model: String,
    /// Usage.
    pub prompt_tokens: u64,
    /// Usage.
    pub completion_tokens: u64,
    /// Usage (prompt + completion when the reply omits it).
    pub total_tokens: u64,
}

/// Sends heartbeat runs. The real one talks to a proxy; tests and the
/// scale benchmark answer with a stub.
pub trait Dispatcher: Send + Sync + 'static {
    /// Performs one run; the error is the run's `error` text.
    fn run(&self, req: RunRequest) -> BoxFuture<'static, Result<RunReply, String>>;
}

/// The session key of a run.
pub fn session_key(agent_id: &str, isolated: bool, started_ms: i64) -> String {
    if isolated {
        format!("agent:{agent_id}:heartbeat:{started_ms}")
    } else {
        format!("agent:{agent_id}:heartbeat")
    }
}

/// Sends runs through a proxy with the internal client key.
pub struct ProxyDispatcher {
    client: HttpClient,
    endpoint: String,
    key: Arc<str>,
}

impl std::fmt::Debug for ProxyDispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyDispatcher")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl ProxyDispatcher {
    /// A dispatcher posting to `{proxy}/v1/chat/completions` with `key`.
    pub fn new(client: HttpClient, proxy: &str, key: String) -> Self {
        ProxyDispatcher {
            client,
            endpoint: format!("{}/v1/chat/completions", proxy.trim_end_matches('/')),
            key: key.into(),
        }
    }
}

impl Dispatcher for ProxyDispatcher {
    fn run(&self, req: RunRequest) -> BoxFuture<'static, Result<RunReply, String>> {
        let client = self.client.clone();
        let endpoint = self.endpoint.clone();
        let key = self.key.clone();
        let span = run_span(&req);
        Box::pin(async move {
            let timeout = req.timeout;
            let result = match tokio::time::timeout(
                timeout,
                call(client, endpoint, key, req, &span),
            )
            .await
            {
                Ok(result) => result,
                Err(_) => Err(format!("timed out after {}s", timeout.as_secs_f64())),
            };
            record_outcome(&span, &result);
            result
        })
    }
}

/// The span of one run, when traces are exported: the proxy's request span
/// joins its trace through the `traceparent` the run sends.
fn run_span(req: &RunRequest) -> tracing::Span {
    if !claw_telemetry::traces_enabled() {
        return tracing::Span::none();
    }
    tracing::info_span!(
        target: claw_telemetry::TARGET,
        "heartbeat.run",
        otel.name = %format_args!("heartbeat {}", req.agent_id),
        otel.kind = "client",
        claw.agent.id = %req.agent_id,
        claw.heartbeat.run_id = %req.run_id,
        claw.heartbeat.trigger = req.trigger,
        gen_ai.operation.name = "chat",
        gen_ai.request.model = %req.model,
        claw.heartbeat.outcome = tracing::field::Empty,
        gen_ai.usage.input_tokens = tracing::field::Empty,
        gen_ai.usage.output_tokens = tracing::field::Empty,
        error.type = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    )
}

/// `suppressed` (a `HEARTBEAT_OK` reply), `alert` (anything else) or `failed`.
fn record_outcome(span: &tracing::Span, result: &Result<RunReply, String>) {
    if span.is_none() {
        return;
    }
    match result {
        Ok(reply) => {
            let outcome = match super::reply::classify(&reply.content) {
                super::reply::ReplyKind::Suppressed => "suppressed",
                super::reply::ReplyKind::Alert(_) => "alert",
            };
            span.record("claw.heartbeat.outcome", outcome);
            // As i64: tracing-opentelemetry exports a u64 as a string.
            let tokens = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
            span.record("gen_ai.usage.input_tokens", tokens(reply.prompt_tokens));
            span.record(
                "gen_ai.usage.output_tokens",
                tokens(reply.completion_tokens),
            );
        }
        Err(_) => {
            span.record("claw.heartbeat.outcome", "failed");
            span.record("error.type", "heartbeat_failed");
            span.record("otel.status_code", "ERROR");
        }
    }
}

async fn call(
    client: HttpClient,
    endpoint: String,
    key: Arc<str>,
    req: RunRequest,
    span: &tracing::Span,
) -> Result<RunReply, String> {
    let body = serde_json::json!({
        "model": req.model,
        "messages": [
            {"role": "system", "content": req.prompt},
            {"role": "user", "content": req.checklist},
        ],
        "stream": false,
    });
    let mut request = http::Request::post(&endpoint)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::AUTHORIZATION, format!("Bearer {key}"))
        .header("x-claw-priority", "background")
        .header("x-claw-agent-id", &req.agent_id)
        .header("x-claw-session-key", &req.session_key)
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| format!("building the request: {e}"))?;
    claw_telemetry::propagation::inject(span, request.headers_mut());
    let response = client
        .request(request)
        .await
        .map_err(|e| format!("proxy unreachable: {e}"))?;
    let status = response.status();
    let bytes = Limited::new(response.into_body(), MAX_REPLY_BYTES)
        .collect()
        .await
        .map_err(|e| format!("reading the reply: {e}"))?
        .to_bytes();
    if !status.is_success() {
        return Err(format!(
            "proxy answered {}: {}",
            status.as_u16(),
            error_message(&bytes)
        ));
    }
    parse_reply(&bytes)
}

/// The `error.message` of an OpenAI-format error body, else its start.
fn error_message(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| super::reply::excerpt(&String::from_utf8_lossy(body), 200))
}

/// Parses a non-streaming chat completion.
pub fn parse_reply(body: &[u8]) -> Result<RunReply, String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("reply is not JSON: {e}"))?;
    let content = v["choices"][0]["message"]["content"]
        .as_str()
        .ok_or("reply has no choices[0].message.content")?
        .to_string();
    let usage = &v["usage"];
    let prompt_tokens = usage["prompt_tokens"].as_u64().unwrap_or(0);
    let completion_tokens = usage["completion_tokens"].as_u64().unwrap_or(0);
    Ok(RunReply {
        content,
        model: v["model"].as_str().unwrap_or_default().to_string(),
        prompt_tokens,
        completion_tokens,
        total_tokens: usage["total_tokens"]
            .as_u64()
            .unwrap_or(prompt_tokens + completion_tokens),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_keys() {
        assert_eq!(session_key("a1", false, 5), "agent:a1:heartbeat");
        assert_eq!(session_key("a1", true, 5), "agent:a1:heartbeat:5");
    }

    #[test]
    fn replies_parse_with_usage() {
        let r = parse_reply(
            br#"{"model":"m","choices":[{"message":{"content":"HEARTBEAT_OK"}}],
                "usage":{"prompt_tokens":10,"completion_tokens":2}}"#,
        )
        .expect("parses");
        assert_eq!(
            (r.content.as_str(), r.prompt_tokens, r.total_tokens),
            ("HEARTBEAT_OK", 10, 12)
        );
        assert!(parse_reply(b"{}").is_err());
        assert_eq!(
            error_message(br#"{"error":{"message":"no capacity"}}"#),
            "no capacity"
        );
    }
}
