//! The proxy's spans, after the OpenTelemetry GenAI semantic conventions.
//!
//! - A **request** span (kind server, named `{operation} {model}`) per
//!   proxied `/v1/*` request: `gen_ai.operation.name`,
//!   `gen_ai.request.model` (canonical), `gen_ai.response.model` (the
//!   backend's native id), `server.address`/`server.port` and
//!   `claw.backend.id` of the backend that answered, `claw.retries`,
//!   `claw.agent.id`, `gen_ai.usage.input_tokens`/`output_tokens`,
//!   `http.response.status_code`, `error.type` on failure. It ends with the
//!   response body.
//! - An **attempt** span (kind client, `{operation} {native model}`) per
//!   upstream attempt, child of the request span, until the response head;
//!   its context is what the upstream receives as `traceparent`.
//!
//! Never a key, an `Authorization` header or request/response content.
//!
//! Every function returns or ignores [`Span::none`] while traces are off
//! ([`crate::traces_enabled`]), so the request path then pays one atomic
//! load per request and nothing else.

use http::{HeaderMap, Uri};
use opentelemetry::trace::Status;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::{TARGET, propagation, traces_enabled};

/// `gen_ai.operation.name` of an upstream path (`/chat/completions`, …).
pub fn operation(path: &str) -> &'static str {
    if path.starts_with("/chat/") {
        "chat"
    } else if path.starts_with("/embeddings") {
        "embeddings"
    } else {
        "text_completion"
    }
}

/// Starts the span of one proxied request, continuing the client's
/// `traceparent` when `headers` carry one. `path` is the upstream path
/// (`/chat/completions`), `model` the requested (canonical) model.
#[inline]
pub fn request_span(path: &str, model: &str, agent_id: Option<&str>, headers: &HeaderMap) -> Span {
    if !traces_enabled() {
        return Span::none();
    }
    new_request_span(path, model, agent_id, headers)
}

fn new_request_span(path: &str, model: &str, agent_id: Option<&str>, headers: &HeaderMap) -> Span {
    let op = operation(path);
    let name = format!("{op} {model}");
    let span = tracing::info_span!(
        target: TARGET,
        "gen_ai.request",
        otel.name = name.as_str(),
        otel.kind = "server",
        gen_ai.operation.name = op,
        gen_ai.request.model = model,
    );
    if let Some(agent) = agent_id {
        span.set_attribute("claw.agent.id", agent.to_string());
    }
    propagation::continue_trace(&span, headers);
    span
}

/// Records the request's id (the `x-request-id` the client gets) on its
/// span as `claw.request.id`, so a trace is found from a log line or a
/// client's report.
pub fn set_request_id(span: &Span, id: impl std::fmt::Display) {
    if !span.is_none() {
        span.set_attribute("claw.request.id", id.to_string());
    }
}

/// Starts the span of one upstream attempt under `request`.
#[inline]
pub fn attempt_span(
    request: &Span,
    path: &str,
    native_model: &str,
    backend_id: &str,
    base_url: &str,
    attempt: u32,
) -> Span {
    if request.is_none() {
        return Span::none();
    }
    new_attempt_span(request, path, native_model, backend_id, base_url, attempt)
}

fn new_attempt_span(
    request: &Span,
    path: &str,
    native_model: &str,
    backend_id: &str,
    base_url: &str,
    attempt: u32,
) -> Span {
    let op = operation(path);
    let name = format!("{op} {native_model}");
    let span = tracing::info_span!(
        target: TARGET,
        parent: request,
        "gen_ai.attempt",
        otel.name = name.as_str(),
        otel.kind = "client",
        gen_ai.operation.name = op,
        gen_ai.request.model = native_model,
        claw.backend.id = backend_id,
        claw.attempt = i64::from(attempt),
    );
    set_server(&span, base_url);
    span
}

/// Writes the attempt span's context into the upstream request's headers.
#[inline]
pub fn inject(attempt: &Span, headers: &mut HeaderMap) {
    propagation::inject(attempt, headers);
}

/// Records how an attempt ended: the upstream's status, or `error_type`
/// when there was no response (`timeout`, `connect_error`, …) or it failed.
pub fn end_attempt(attempt: &Span, status: Option<u16>, error_type: Option<&str>) {
    if attempt.is_none() {
        return;
    }
    if let Some(s) = status {
        attempt.set_attribute("http.response.status_code", i64::from(s));
    }
    if let Some(e) = error_type {
        set_error(attempt, e);
    }
}

/// Records the backend that answered the request.
#[inline]
pub fn record_backend(
    request: &Span,
    native_model: &str,
    backend_id: &str,
    base_url: &str,
    attempts: u32,
) {
    if !request.is_none() {
        set_backend(request, native_model, backend_id, base_url, attempts);
    }
}

fn set_backend(
    request: &Span,
    native_model: &str,
    backend_id: &str,
    base_url: &str,
    attempts: u32,
) {
    request.set_attribute("gen_ai.response.model", native_model.to_string());
    request.set_attribute("claw.backend.id", backend_id.to_string());
    request.set_attribute("claw.retries", i64::from(attempts.saturating_sub(1)));
    set_server(request, base_url);
}

/// Records the end of a request: its status, token usage when known, and
/// `error_type` when it failed.
pub fn end_request(
    request: &Span,
    status: u16,
    usage: Option<(u64, u64)>,
    error_type: Option<&str>,
) {
    if request.is_none() {
        return;
    }
    request.set_attribute("http.response.status_code", i64::from(status));
    if let Some((input, output)) = usage {
        request.set_attribute("gen_ai.usage.input_tokens", clamp(input));
        request.set_attribute("gen_ai.usage.output_tokens", clamp(output));
    }
    if let Some(e) = error_type {
        set_error(request, e);
    }
}

/// Records the retries of a request that got no answer.
pub fn record_retries(request: &Span, attempts: u32) {
    if request.is_none() {
        return;
    }
    request.set_attribute("claw.retries", i64::from(attempts.saturating_sub(1)));
}

fn set_error(span: &Span, error_type: &str) {
    span.set_attribute("error.type", error_type.to_string());
    span.set_status(Status::error(error_type.to_string()));
}

fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// `server.address` and `server.port` of a backend's base URL.
fn set_server(span: &Span, base_url: &str) {
    let Ok(uri) = base_url.parse::<Uri>() else {
        return;
    };
    if let Some(host) = uri.host() {
        span.set_attribute("server.address", host.to_string());
    }
    let port = uri.port_u16().or(match uri.scheme_str() {
        Some("https") => Some(443),
        Some("http") => Some(80),
        _ => None,
    });
    if let Some(p) = port {
        span.set_attribute("server.port", i64::from(p));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_follow_the_genai_names() {
        assert_eq!(operation("/chat/completions"), "chat");
        assert_eq!(operation("/chat/completions?x=1"), "chat");
        assert_eq!(operation("/completions"), "text_completion");
        assert_eq!(operation("/embeddings"), "embeddings");
    }

    #[test]
    fn spans_are_disabled_while_traces_are_off() {
        let span = request_span("/chat/completions", "m", Some("a"), &HeaderMap::new());
        assert!(span.is_none());
        let attempt = attempt_span(&span, "/chat/completions", "n", "b", "http://h:1/v1", 1);
        assert!(attempt.is_none());
        let mut h = HeaderMap::new();
        inject(&attempt, &mut h);
        assert!(h.is_empty());
    }
}
