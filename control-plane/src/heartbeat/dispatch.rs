//! The run itself: one request through a proxy, in the protocol that serves
//! the agent's model.
//!
//! - [`Protocol::ChatCompletions`]: `POST {CLAW_HEARTBEAT_PROXY}/v1/chat/completions`
//!   with the agent's model, a system message (the built-in heartbeat prompt
//!   or the agent's override) and the checklist as the user message,
//!   `Authorization: Bearer <internal key>`.
//! - [`Protocol::Messages`]: `POST {proxy}/v1/messages` with `x-api-key:
//!   <internal key>`, `anthropic-version: 2023-06-01`, the prompt as `system`
//!   and the checklist as the user message; the reply text is the `text`
//!   blocks of `content`, its prompt tokens `input_tokens` plus the cache
//!   reads and writes (Anthropic's `input_tokens` excludes them).
//!
//! A run is asked in the protocol of the backends serving the model, so a
//! model served only by `anthropic` backends is asked in Messages (the
//! scheduler decides, from the catalog). The proxy could translate a chat
//! completion for them (issue 13), but a native request stays byte-faithful
//! and also reaches `--native-only` backends. Either way the run is background
//! traffic under the agent's id and heartbeat session key (so it lands on the
//! backend the agent's own traffic uses and keeps that prompt cache warm),
//! and the whole exchange is bounded by the run's timeout.

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

/// `max_tokens` of a Messages run (required by the protocol): far above a
/// heartbeat's `HEARTBEAT_OK` or short alert.
pub const MESSAGES_MAX_TOKENS: u32 = 2048;

/// The Anthropic API version a Messages run asks for.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

/// Largest reply body read from the proxy.
const MAX_REPLY_BYTES: usize = 4 * 1024 * 1024;

/// The pooled HTTP(S) client used for runs (and health probes).
pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The pooled HTTP(S) client of webhook deliveries and wake requests:
/// every connection goes through [`crate::net_guard::GuardedConnector`],
/// which refuses link-local/metadata addresses, the control plane's own
/// listeners and (without `--allow-loopback-webhooks`) loopback, after DNS
/// resolution. Like every hyper client it follows no redirects.
pub type WebhookClient = Client<HttpsConnector<crate::net_guard::GuardedConnector>, Full<Bytes>>;

/// Builds the HTTP client (webpki roots, HTTP/1.1).
pub fn http_client() -> anyhow::Result<HttpClient> {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())?;
    Ok(client_over(https, tcp_connector()))
}

/// Builds the webhook/wake client (webpki roots, HTTP/1.1) over the
/// guarded connector with the system resolver and the process-wide policy.
pub fn webhook_client() -> anyhow::Result<WebhookClient> {
    crate::net_guard::describe();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())?;
    Ok(client_over(
        https,
        crate::net_guard::GuardedConnector::new(
            tcp_connector(),
            crate::net_guard::system_resolver(),
        ),
    ))
}

/// Like [`http_client`], but an `https://` peer must present a certificate
/// issued by the CA bundle at `ca` (`--heartbeat-proxy-ca`), not by a public
/// root. Used only for the runs, so webhooks keep the public roots.
pub fn http_client_trusting(ca: &std::path::Path) -> anyhow::Result<HttpClient> {
    let tls = claw_tls::client::client_config(ca)?;
    Ok(client_over(
        hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls),
        tcp_connector(),
    ))
}

fn tcp_connector() -> HttpConnector {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(10)));
    http
}

fn client_over<C>(
    https: hyper_rustls::HttpsConnectorBuilder<hyper_rustls::builderstates::WantsSchemes>,
    tcp: C,
) -> Client<HttpsConnector<C>, Full<Bytes>>
where
    C: tower::Service<http::Uri> + Clone + Send + Sync + 'static,
    C::Response: hyper::rt::Read
        + hyper::rt::Write
        + hyper_util::client::legacy::connect::Connection
        + Send
        + Unpin
        + 'static,
    C::Future: Send + 'static,
    C::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let https = https.https_or_http().enable_http1().wrap_connector(tcp);
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .build(https)
}

/// The client protocol a run speaks to the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// OpenAI Chat Completions (`/v1/chat/completions`).
    #[default]
    ChatCompletions,
    /// Anthropic Messages (`/v1/messages`).
    Messages,
}

impl Protocol {
    /// The proxy path of the protocol.
    pub fn path(self) -> &'static str {
        match self {
            Protocol::ChatCompletions => "/v1/chat/completions",
            Protocol::Messages => "/v1/messages",
        }
    }
}

/// What a run sends.
#[derive(Debug, Clone)]
pub struct RunRequest {
    /// The protocol of the backends serving the model.
    pub protocol: Protocol,
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
    /// The proxy's base URL, without a trailing `/`.
    proxy: String,
    key: Arc<str>,
}

impl std::fmt::Debug for ProxyDispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyDispatcher")
            .field("proxy", &self.proxy)
            .finish_non_exhaustive()
    }
}

impl ProxyDispatcher {
    /// A dispatcher posting to `{proxy}/v1/chat/completions` or
    /// `{proxy}/v1/messages` with `key`.
    pub fn new(client: HttpClient, proxy: &str, key: String) -> Self {
        ProxyDispatcher {
            client,
            proxy: proxy.trim_end_matches('/').to_string(),
            key: key.into(),
        }
    }
}

impl Dispatcher for ProxyDispatcher {
    fn run(&self, req: RunRequest) -> BoxFuture<'static, Result<RunReply, String>> {
        let client = self.client.clone();
        let endpoint = format!("{}{}", self.proxy, req.protocol.path());
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
        claw.heartbeat.protocol = ?req.protocol,
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

/// The HTTP request of a run (without trace headers): path, credential
/// header and body in the run's protocol, the same `x-claw-*` headers for
/// both.
pub fn build_request(
    endpoint: &str,
    key: &str,
    req: &RunRequest,
) -> Result<http::Request<Full<Bytes>>, String> {
    let builder = http::Request::post(endpoint)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header("x-claw-priority", "background")
        .header("x-claw-agent-id", &req.agent_id)
        .header("x-claw-session-key", &req.session_key)
        // The proxies account the run's usage as heartbeat cost, not as
        // the agent's conversation (and never as its activity).
        .header("x-claw-run-kind", "heartbeat")
        .header("x-claw-run-id", &req.run_id);
    let (builder, body) = match req.protocol {
        Protocol::ChatCompletions => (
            builder.header(http::header::AUTHORIZATION, format!("Bearer {key}")),
            serde_json::json!({
                "model": req.model,
                "messages": [
                    {"role": "system", "content": req.prompt},
                    {"role": "user", "content": req.checklist},
                ],
                "stream": false,
            }),
        ),
        Protocol::Messages => (
            builder
                .header("x-api-key", key)
                .header("anthropic-version", ANTHROPIC_VERSION),
            serde_json::json!({
                "model": req.model,
                "max_tokens": MESSAGES_MAX_TOKENS,
                "system": req.prompt,
                "messages": [
                    {"role": "user", "content": req.checklist},
                ],
            }),
        ),
    };
    builder
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| format!("building the request: {e}"))
}

async fn call(
    client: HttpClient,
    endpoint: String,
    key: Arc<str>,
    req: RunRequest,
    span: &tracing::Span,
) -> Result<RunReply, String> {
    let mut request = build_request(&endpoint, &key, &req)?;
    claw_telemetry::propagation::inject(span, request.headers_mut());
    let response = client.request(request).await.map_err(|e| {
        if e.is_connect() {
            format!("{UNREACHABLE_PREFIX}{}", connect_cause(&e))
        } else if closed_before_response(&e) {
            // What a TCP load balancer with no proxy behind it does: accept,
            // then close. (A proxy crashing mid-request looks the same; its
            // retry may then call the model a second time for the slot.)
            format!("{UNREACHABLE_PREFIX}connection closed before a response")
        } else {
            format!("proxy request failed: {e}: {}", connect_cause(&e))
        }
    })?;
    let status = response.status();
    let bytes = Limited::new(response.into_body(), MAX_REPLY_BYTES)
        .collect()
        .await
        .map_err(|e| format!("reading the reply: {e}"))?
        .to_bytes();
    if status == http::StatusCode::NOT_FOUND && is_model_not_found(&bytes) {
        return Err(format!("model {} {MODEL_UNKNOWN_SUFFIX}", req.model));
    }
    if !status.is_success() {
        return Err(format!(
            "proxy answered {}: {}",
            status.as_u16(),
            error_message(&bytes)
        ));
    }
    match req.protocol {
        Protocol::ChatCompletions => parse_reply(&bytes),
        Protocol::Messages => parse_messages_reply(&bytes),
    }
}

/// How a run's error starts when the proxy could not be connected to.
const UNREACHABLE_PREFIX: &str = "proxy unreachable: ";
/// How a run's error ends when the proxy does not know the model (yet).
const MODEL_UNKNOWN_SUFFIX: &str = "unknown to the proxy";

/// A run failure that a later attempt may not have: the scheduler defers
/// the slot and retries it with backoff instead of failing it at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transient {
    /// The proxy refused or did not accept the connection.
    Unreachable,
    /// The proxy answered 404 `model_not_found` (its configuration is
    /// behind the control plane's).
    ModelUnknown,
}

impl Transient {
    /// The run's `defer_reason` while it waits.
    pub fn reason(self) -> &'static str {
        match self {
            Transient::Unreachable => "proxy_unreachable",
            Transient::ModelUnknown => "model_unknown",
        }
    }
}

/// Classifies a run's error text (as [`ProxyDispatcher`] words it): `None`
/// for failures that stay immediate.
pub fn transient(error: &str) -> Option<Transient> {
    if error.starts_with(UNREACHABLE_PREFIX) {
        Some(Transient::Unreachable)
    } else if error.starts_with("model ") && error.ends_with(MODEL_UNKNOWN_SUFFIX) {
        Some(Transient::ModelUnknown)
    } else {
        None
    }
}

/// The innermost cause of a connect error, worded for people
/// ("connection refused"), not hyper's "client error (Connect)".
fn connect_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut inner: &(dyn std::error::Error + 'static) = e;
    while let Some(next) = inner.source() {
        inner = next;
    }
    if let Some(io) = inner.downcast_ref::<std::io::Error>() {
        match io.kind() {
            std::io::ErrorKind::ConnectionRefused => return "connection refused".into(),
            std::io::ErrorKind::ConnectionReset => return "connection reset".into(),
            std::io::ErrorKind::TimedOut => return "connect timed out".into(),
            _ => {}
        }
    }
    inner.to_string()
}

/// Whether the connection closed before any response came (hyper's
/// "incomplete message").
fn closed_before_response(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h) = err.downcast_ref::<hyper::Error>()
            && (h.is_incomplete_message() || h.is_closed() || h.is_canceled())
        {
            return true;
        }
        // A reset before the response head: a proxy restarting, or a load
        // balancer with no proxy behind it (seen under load in tests).
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
            )
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Whether a 404 body says the model does not exist, in the OpenAI shape
/// (`error.code: "model_not_found"`) or the Anthropic one (`not_found_error`
/// whose message says the model "does not exist").
fn is_model_not_found(body: &[u8]) -> bool {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return false;
    };
    let error = &v["error"];
    error["code"].as_str() == Some("model_not_found")
        || error["message"]
            .as_str()
            .is_some_and(|m| m.contains("does not exist"))
}

/// The `error.message` of an OpenAI- or Anthropic-format error body (both
/// keep it there), else the body's start.
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

/// Parses a non-streaming Anthropic Messages reply: the text of its `text`
/// content blocks, and usage normalised like the proxy's (prompt tokens =
/// `input_tokens` + cache reads + cache writes).
pub fn parse_messages_reply(body: &[u8]) -> Result<RunReply, String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("reply is not JSON: {e}"))?;
    let blocks = v["content"]
        .as_array()
        .ok_or("reply has no content array")?;
    let content: String = blocks
        .iter()
        .filter(|b| b["type"] == "text")
        .filter_map(|b| b["text"].as_str())
        .collect::<Vec<_>>()
        .join("");
    let usage = &v["usage"];
    let n = |field: &str| usage[field].as_u64().unwrap_or(0);
    let prompt_tokens = n("input_tokens")
        .saturating_add(n("cache_read_input_tokens"))
        .saturating_add(n("cache_creation_input_tokens"));
    let completion_tokens = n("output_tokens");
    Ok(RunReply {
        content,
        model: v["model"].as_str().unwrap_or_default().to_string(),
        prompt_tokens,
        completion_tokens,
        total_tokens: prompt_tokens.saturating_add(completion_tokens),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(protocol: Protocol) -> RunRequest {
        RunRequest {
            protocol,
            agent_id: "a1".into(),
            run_id: "r1".into(),
            trigger: "schedule",
            model: "claude-sonnet".into(),
            prompt: "PROMPT".into(),
            checklist: "- [ ] inbox".into(),
            session_key: "agent:a1:heartbeat".into(),
            timeout: Duration::from_secs(5),
        }
    }

    async fn body_of(r: &http::Request<Full<Bytes>>) -> serde_json::Value {
        let bytes = r
            .body()
            .clone()
            .collect()
            .await
            .expect("in-memory body")
            .to_bytes();
        serde_json::from_slice(&bytes).expect("JSON body")
    }

    #[tokio::test]
    async fn a_messages_run_is_anthropic_shaped_with_the_same_claw_headers() {
        let r = build_request(
            "http://p/v1/messages",
            "ck-internal",
            &run(Protocol::Messages),
        )
        .expect("builds");
        let h = r.headers();
        assert_eq!(h["x-api-key"], "ck-internal");
        assert_eq!(h["anthropic-version"], "2023-06-01");
        assert!(h.get(http::header::AUTHORIZATION).is_none());
        assert_eq!(h["x-claw-agent-id"], "a1");
        assert_eq!(h["x-claw-priority"], "background");
        assert_eq!(h["x-claw-session-key"], "agent:a1:heartbeat");
        assert_eq!(h["x-claw-run-kind"], "heartbeat");
        assert_eq!(h["x-claw-run-id"], "r1");
        assert_eq!(
            body_of(&r).await,
            serde_json::json!({
                "model": "claude-sonnet",
                "max_tokens": MESSAGES_MAX_TOKENS,
                "system": "PROMPT",
                "messages": [{"role": "user", "content": "- [ ] inbox"}],
            })
        );
        assert_eq!(Protocol::Messages.path(), "/v1/messages");
    }

    #[tokio::test]
    async fn a_chat_run_keeps_its_shape() {
        let r = build_request(
            "http://p/v1/chat/completions",
            "ck-internal",
            &run(Protocol::ChatCompletions),
        )
        .expect("builds");
        let h = r.headers();
        assert_eq!(h[http::header::AUTHORIZATION], "Bearer ck-internal");
        assert!(h.get("x-api-key").is_none() && h.get("anthropic-version").is_none());
        assert_eq!(h["x-claw-session-key"], "agent:a1:heartbeat");
        assert_eq!(h["x-claw-run-kind"], "heartbeat");
        assert_eq!(h["x-claw-run-id"], "r1");
        let b = body_of(&r).await;
        assert_eq!(b["messages"][0]["role"], "system");
        assert_eq!(b["messages"][1]["content"], "- [ ] inbox");
        assert_eq!(b["stream"], false);
    }

    #[test]
    fn messages_replies_join_text_blocks_and_count_cache_tokens_as_input() {
        let r = parse_messages_reply(
            br#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-5",
                "content":[{"type":"thinking","thinking":"hmm"},{"type":"text","text":"HEARTBEAT"},
                           {"type":"text","text":"_OK"}],
                "stop_reason":"end_turn",
                "usage":{"input_tokens":12,"cache_creation_input_tokens":100,
                         "cache_read_input_tokens":1000,"output_tokens":4}}"#,
        )
        .expect("parses");
        assert_eq!(r.content, "HEARTBEAT_OK");
        assert_eq!(r.model, "claude-sonnet-4-5");
        assert_eq!(
            (r.prompt_tokens, r.completion_tokens, r.total_tokens),
            (1_112, 4, 1_116)
        );
        let bare =
            parse_messages_reply(br#"{"content":[],"usage":{"input_tokens":3}}"#).expect("parses");
        assert_eq!((bare.content.as_str(), bare.prompt_tokens), ("", 3));
        assert!(parse_messages_reply(b"{}").is_err());
        assert!(parse_messages_reply(b"not json").is_err());
        assert_eq!(
            error_message(
                br#"{"type":"error","error":{"type":"not_found_error","message":"model x not found"}}"#
            ),
            "model x not found"
        );
    }

    #[test]
    fn unknown_models_and_unreachable_proxies_are_transient() {
        let openai = br#"{"error":{"message":"The model `gpt-x` does not exist.","type":"invalid_request_error","code":"model_not_found"}}"#;
        let anthropic = br#"{"type":"error","error":{"type":"not_found_error","message":"The model `gpt-x` does not exist."}}"#;
        assert!(is_model_not_found(openai) && is_model_not_found(anthropic));
        assert!(!is_model_not_found(br#"{"error":{"message":"no route"}}"#));
        assert!(!is_model_not_found(b"not json"));
        assert_eq!(
            transient(&format!("model gpt-x {MODEL_UNKNOWN_SUFFIX}")),
            Some(Transient::ModelUnknown)
        );
        assert_eq!(
            transient("proxy unreachable: connection refused"),
            Some(Transient::Unreachable)
        );
        assert_eq!(transient("proxy answered 500: boom"), None);
        assert_eq!(transient("timed out after 5s"), None);
    }

    /// A chat run of agent `a1` with a 5 s timeout.
    fn run_request() -> RunRequest {
        RunRequest {
            protocol: Protocol::ChatCompletions,
            agent_id: "a1".into(),
            run_id: "hbr_1".into(),
            trigger: "schedule",
            model: "m".into(),
            prompt: "p".into(),
            checklist: "c".into(),
            session_key: "agent:a1:heartbeat".into(),
            timeout: Duration::from_secs(5),
        }
    }

    #[tokio::test]
    async fn a_refused_connection_reads_proxy_unreachable_connection_refused() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let client = http_client().expect("client");
        let req = run_request();
        let err = ProxyDispatcher::new(client, &format!("http://{addr}"), "k".into())
            .run(req)
            .await
            .expect_err("nothing listens");
        assert_eq!(err, "proxy unreachable: connection refused");
        assert_eq!(transient(&err), Some(Transient::Unreachable));
    }

    #[tokio::test]
    async fn a_reset_before_the_response_reads_proxy_unreachable() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        // Accept, read the request, then reset the connection (SO_LINGER 0).
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = [0u8; 4096];
                let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await;
                let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                drop(stream);
            }
        });
        let req = run_request();
        let err = ProxyDispatcher::new(
            http_client().expect("client"),
            &format!("http://{addr}"),
            "k".into(),
        )
        .run(req)
        .await
        .expect_err("reset");
        assert!(err.starts_with("proxy unreachable: "), "{err}");
        assert_eq!(transient(&err), Some(Transient::Unreachable));
    }

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
