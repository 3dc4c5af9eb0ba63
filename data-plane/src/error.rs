//! Error responses in the client's own shape. Every error the proxy produces
//! itself is rendered by [`ApiError::into_response_for`] in the wire of the
//! endpoint the client called ([`Wire::for_path`]): OpenAI's
//! `{"error":{"message","type","param","code"}}`, or, for `/v1/messages*`,
//! Anthropic's `{"type":"error","error":{"type","message"}}` with the type
//! its SDK classifies by status (and 529 `overloaded_error` for "no
//! capacity", which the SDK retries). Either way with the matching status
//! and, where it helps the client, `Retry-After`. Messages are fixed,
//! client-facing text: no internals, no keys (a provider rejecting the
//! gateway's key names the backend, by name, so the client can tell its
//! operator which one: [`ApiError::upstream_auth_failed`]).

use std::borrow::Cow;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::body::ProxyBody;

pub(crate) use crate::target::Wire;

/// The endpoints the proxy serves, for the unknown-path message.
pub(crate) const SUPPORTED_ENDPOINTS: &str = "POST /v1/chat/completions, POST /v1/completions, \
POST /v1/embeddings, POST /v1/responses, GET /v1/responses/{id}, DELETE /v1/responses/{id}, \
POST /v1/messages, POST /v1/messages/count_tokens, GET /v1/models, GET /v1/models/{id}";

/// An error the proxy answers with instead of an upstream response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Human-readable message (safe for clients).
    pub message: Cow<'static, str>,
    /// OpenAI error `type`.
    pub kind: &'static str,
    /// OpenAI error `param` (a field the translation refused names itself).
    pub param: Option<Cow<'static, str>>,
    /// OpenAI error `code`.
    pub code: Option<&'static str>,
    /// Seconds for `Retry-After`, when the client should come back later.
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<Cow<'static, str>>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    fn param(mut self, param: impl Into<Cow<'static, str>>) -> Self {
        self.param = Some(param.into());
        self
    }

    /// Sets `Retry-After` (at least one second; [`retry_after_secs`] turns a
    /// wait into seconds).
    pub(crate) fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs.max(1));
        self
    }

    /// 401: no or unknown client key.
    pub(crate) fn unauthorized() -> Self {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "Invalid or missing API key. Send `Authorization: Bearer <key>` or `x-api-key: <key>`.",
        )
        .code("invalid_api_key")
    }

    /// 403: the client key may not use this model.
    pub(crate) fn model_not_allowed(model: &str) -> Self {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            format!(
                "This API key is not allowed to use the model `{}`.",
                clip(model)
            ),
        )
        .param("model")
        .code("model_not_allowed")
    }

    /// 404: no backend serves this model.
    pub(crate) fn model_not_found(model: &str) -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("The model `{}` does not exist.", clip(model)),
        )
        .param("model")
        .code("model_not_found")
    }

    /// 404: the model exists, but only behind the other protocol's endpoint
    /// (its backends speak `api`).
    pub(crate) fn model_other_protocol(model: &str, serving: &'static str) -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!(
                "The model `{}` is not served on this endpoint; it is served by {serving}.",
                clip(model)
            ),
        )
        .param("model")
        .code("model_not_found")
    }

    /// 404: no `openai` backend, so no stored responses to read.
    pub(crate) fn no_responses_backend() -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "No backend serves the Responses API.",
        )
        .code("not_found")
    }

    /// 404: no model of that id (`GET /v1/models/{id}`).
    pub(crate) fn unknown_model_id(model: &str) -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("The model `{}` does not exist.", clip(model)),
        )
        .code("model_not_found")
    }

    /// 400: a response id that cannot be one (1–256 of `[A-Za-z0-9_-]`).
    pub(crate) fn bad_response_id() -> Self {
        ApiError::bad_request(
            "The response id must be 1 to 256 characters of letters, digits, `_` and `-`.",
        )
        .param("response_id")
        .code("invalid_response_id")
    }

    /// 400: the request is not what the endpoint accepts.
    pub(crate) fn bad_request(message: impl Into<Cow<'static, str>>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 about the `model` field.
    pub(crate) fn bad_model() -> Self {
        ApiError::bad_request("The request body must be a JSON object with a string `model`.")
            .param("model")
    }

    /// 400: a field the backend's protocol cannot express (the request
    /// would be translated, [`crate::translate::Refused`]); `param` names it.
    pub(crate) fn untranslatable(field: &str, reason: &str) -> Self {
        ApiError::bad_request(format!(
            "`{}` cannot be served by this model's backend: {}",
            clip(field),
            clip(reason)
        ))
        .param(clip(field).to_string())
        .code("unsupported_parameter")
    }

    /// 404: unknown path.
    pub(crate) fn not_found() -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("Unknown endpoint. Supported endpoints: {SUPPORTED_ENDPOINTS}."),
        )
        .code("unknown_url")
    }

    /// 405: known path, wrong method.
    pub(crate) fn method_not_allowed() -> Self {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "Method not allowed for this endpoint.",
        )
    }

    /// 413: the request body exceeds the limit.
    pub(crate) fn payload_too_large(limit: usize) -> Self {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("The request body exceeds {limit} bytes."),
        )
        .code("request_too_large")
    }

    /// 408: the client did not send its body in time.
    pub(crate) fn request_timeout() -> Self {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            "Timed out reading the request body.",
        )
        .code("request_timeout")
    }

    /// 429: the client key's own rate limit.
    pub(crate) fn key_rate_limited(retry_after: u64) -> Self {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "Rate limit reached for this API key.",
        )
        .code("rate_limit_exceeded")
        .retry_after(retry_after)
    }

    /// 429: every backend is at its rate limit and the queue is full or timed out.
    pub(crate) fn capacity_rate_limited(retry_after: u64) -> Self {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "All backends for this model are at their rate limit; try again later.",
        )
        .code("rate_limit_exceeded")
        .retry_after(retry_after)
    }

    /// 503: no backend can take the request now (cooling, ejected, disabled).
    pub(crate) fn no_capacity(retry_after: u64) -> Self {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "No backend is currently available for this model; try again later.",
        )
        .code("no_backend_available")
        .retry_after(retry_after)
    }

    /// 429: the key has `max` requests in flight on this proxy (its
    /// `max_parallel`).
    pub(crate) fn key_parallel_limited(key: &str, max: u32) -> Self {
        let key: String = key.chars().take(64).collect();
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!(
                "Key {key:?} has {max} requests in flight, its max-parallel on this proxy; \
                 retry when one finishes."
            ),
        )
        .code("max_parallel_exceeded")
        .retry_after(1)
    }

    /// 503: the proxy holds as many request body bytes as it may
    /// (`--max-inflight-body-bytes`).
    pub(crate) fn body_budget_exhausted() -> Self {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "The proxy is holding too many request bodies at once; try again shortly.",
        )
        .code("body_budget_exhausted")
        .retry_after(1)
    }

    /// 503: the proxy has no configuration yet.
    pub(crate) fn not_ready() -> Self {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "The proxy has no configuration yet.",
        )
        .code("not_ready")
        .retry_after(1)
    }

    /// 502: the upstream failed and no retry was possible.
    pub(crate) fn bad_gateway() -> Self {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            "The upstream backend failed to answer.",
        )
        .code("upstream_error")
    }

    /// 502: `backend` answered with a status outside 100–599 (or one that
    /// does not parse): not HTTP the client could act on, so never passed
    /// through. Names the backend so the client can tell its operator.
    pub(crate) fn upstream_invalid_status(backend: &str) -> Self {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            format!(
                "backend \"{}\" answered with an invalid HTTP status",
                clip(backend)
            ),
        )
        .code("upstream_invalid_status")
    }

    /// 400: the request line or headers are not valid HTTP/1.1 (hyper's
    /// own answer, made JSON by [`crate::io`]).
    pub(crate) fn malformed_request() -> Self {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "The request is not valid HTTP/1.1 (malformed request line or headers).",
        )
        .code("malformed_request")
    }

    /// 414: the request target is longer than `limit` bytes.
    pub(crate) fn uri_too_long(limit: usize) -> Self {
        ApiError::new(
            StatusCode::URI_TOO_LONG,
            "invalid_request_error",
            format!("The request URI is longer than {limit} bytes."),
        )
        .code("uri_too_long")
    }

    /// 431: the request line and headers are larger than `limit` bytes (or
    /// too many).
    pub(crate) fn headers_too_large(limit: usize) -> Self {
        ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "invalid_request_error",
            format!("The request headers are larger than {limit} bytes or too many."),
        )
        .code("headers_too_large")
    }

    /// 502: the provider rejected the gateway's own key for `backend` (an
    /// upstream 401/403; `status` 0 when another proxy saw it). Names the
    /// backend, never the key, and is not the client's `invalid_api_key`:
    /// the client's key was fine, an operator must fix the backend's.
    pub(crate) fn upstream_auth_failed(backend: &str, status: u16) -> Self {
        let status = if status == 0 {
            String::new()
        } else {
            format!(" ({status})")
        };
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "upstream_auth_failed",
            format!(
                "backend \"{}\" rejected the gateway's provider key{status}; an operator must update its key",
                clip(backend)
            ),
        )
        .code("upstream_auth_failed")
    }

    /// An upstream error answer of `status` the proxy could not translate
    /// into the client's protocol: the status, a generic message.
    pub(crate) fn upstream_status(status: StatusCode) -> Self {
        let kind = if status.is_client_error() {
            "invalid_request_error"
        } else {
            "upstream_error"
        };
        ApiError::new(
            status,
            kind,
            format!(
                "The upstream backend answered with status {}.",
                status.as_u16()
            ),
        )
    }

    /// The body in `wire`'s shape.
    pub(crate) fn body_for(&self, wire: Wire) -> Bytes {
        match wire {
            Wire::OpenAi => self.body_json(),
            Wire::Anthropic => self.body_anthropic(),
        }
    }

    /// 504: the request deadline passed before an upstream answered.
    pub(crate) fn gateway_timeout() -> Self {
        ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_error",
            "The upstream backend did not answer in time.",
        )
        .code("upstream_timeout")
    }

    /// 500: a bug in the proxy (a caught panic).
    pub(crate) fn internal() -> Self {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "Internal error in the proxy.",
        )
        .code("internal_error")
    }

    /// The JSON body, `{"error":{...}}`.
    pub(crate) fn body_json(&self) -> Bytes {
        let v = serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        });
        Bytes::from(v.to_string())
    }

    /// The Anthropic error `type` and status for this error: the type the
    /// Anthropic SDK expects for the status, and 529 for "no capacity".
    fn anthropic(&self) -> (StatusCode, &'static str) {
        let overloaded = StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        match self.status.as_u16() {
            400 | 405 | 408 | 422 => (self.status, "invalid_request_error"),
            401 => (self.status, "authentication_error"),
            403 => (self.status, "permission_error"),
            404 => (self.status, "not_found_error"),
            413 => (self.status, "request_too_large"),
            429 => (self.status, "rate_limit_error"),
            503 if self.code == Some("no_backend_available") => (overloaded, "overloaded_error"),
            503 | 529 => (self.status, "overloaded_error"),
            504 => (self.status, "timeout_error"),
            s if (400..500).contains(&s) => (self.status, "invalid_request_error"),
            _ => (self.status, "api_error"),
        }
    }

    /// The Anthropic JSON body, `{"type":"error","error":{...}}`.
    pub(crate) fn body_anthropic(&self) -> Bytes {
        let v = serde_json::json!({
            "type": "error",
            "error": {"type": self.anthropic().1, "message": self.message},
        });
        Bytes::from(v.to_string())
    }

    /// The whole HTTP/1.1 response in `wire`'s shape, as bytes for the
    /// socket, closing the connection: for answers written below hyper
    /// ([`crate::io`]), with `request_id` as `x-request-id`.
    pub(crate) fn raw_response(&self, wire: Wire, request_id: &str) -> Vec<u8> {
        let (status, body) = match wire {
            Wire::OpenAi => (self.status, self.body_json()),
            Wire::Anthropic => (self.anthropic().0, self.body_anthropic()),
        };
        let head = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             connection: close\r\nx-request-id: {request_id}\r\n\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            body.len()
        );
        let mut out = Vec::with_capacity(head.len() + body.len());
        out.extend_from_slice(head.as_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Renders the error as an HTTP response in the OpenAI shape.
    pub(crate) fn into_response(self) -> Response<ProxyBody> {
        self.into_response_for(Wire::OpenAi)
    }

    /// Renders the error as an HTTP response in `wire`'s shape.
    pub(crate) fn into_response_for(self, wire: Wire) -> Response<ProxyBody> {
        let (status, body) = match wire {
            Wire::OpenAi => (self.status, self.body_json()),
            Wire::Anthropic => (self.anthropic().0, self.body_anthropic()),
        };
        let mut res = Response::new(ProxyBody::full(body));
        *res.status_mut() = status;
        let h = res.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(secs) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        res
    }
}

/// Seconds for `Retry-After` from a wait: rounded up, at least 1, at most a day.
#[inline]
pub(crate) fn retry_after_secs(d: std::time::Duration) -> u64 {
    let s = d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0));
    s.clamp(1, 86_400)
}

/// Model names come from clients; keep echoes short.
fn clip(s: &str) -> &str {
    match s.char_indices().nth(128) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_openai_shape_with_retry_after() {
        let e = ApiError::no_capacity(0);
        let res = e.clone().into_response();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(res.headers()[header::RETRY_AFTER], "1");
        let v: serde_json::Value = serde_json::from_slice(&e.body_json()).unwrap();
        assert_eq!(v["error"]["type"], "service_unavailable");
        assert_eq!(v["error"]["code"], "no_backend_available");
        assert!(v["error"]["param"].is_null());
    }

    #[test]
    fn wire_follows_the_path() {
        assert_eq!(Wire::for_path("/v1/messages"), Wire::Anthropic);
        assert_eq!(Wire::for_path("/v1/messages/count_tokens"), Wire::Anthropic);
        assert_eq!(Wire::for_path("/v1/messagesx"), Wire::OpenAi);
        assert_eq!(Wire::for_path("/v1/chat/completions"), Wire::OpenAi);
        assert_eq!(Wire::for_path("/v1/responses"), Wire::OpenAi);
    }

    #[test]
    fn renders_anthropic_shape_by_status() {
        let cases = [
            (ApiError::bad_model(), 400, "invalid_request_error"),
            (ApiError::unauthorized(), 401, "authentication_error"),
            (ApiError::model_not_allowed("m"), 403, "permission_error"),
            (ApiError::model_not_found("m"), 404, "not_found_error"),
            (ApiError::payload_too_large(1), 413, "request_too_large"),
            (ApiError::key_rate_limited(3), 429, "rate_limit_error"),
            (ApiError::internal(), 500, "api_error"),
            (ApiError::bad_gateway(), 502, "api_error"),
            (ApiError::upstream_invalid_status("b"), 502, "api_error"),
            (ApiError::malformed_request(), 400, "invalid_request_error"),
            (ApiError::uri_too_long(1), 414, "invalid_request_error"),
            (ApiError::headers_too_large(1), 431, "invalid_request_error"),
            (ApiError::no_capacity(2), 529, "overloaded_error"),
            (ApiError::not_ready(), 503, "overloaded_error"),
        ];
        for (e, status, kind) in cases {
            let body = e.body_anthropic();
            let res = e.into_response_for(Wire::Anthropic);
            assert_eq!(res.status().as_u16(), status, "{kind}");
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["type"], "error");
            assert_eq!(v["error"]["type"], kind);
            assert!(
                v["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty())
            );
            assert!(v.get("param").is_none());
        }
        let res = ApiError::key_rate_limited(3).into_response_for(Wire::Anthropic);
        assert_eq!(res.headers()[header::RETRY_AFTER], "3");
        let res = ApiError::no_capacity(4).into_response_for(Wire::Anthropic);
        assert_eq!(res.headers()[header::RETRY_AFTER], "4");
    }

    #[test]
    fn unknown_endpoint_lists_the_supported_ones() {
        let e = ApiError::not_found();
        for ep in [
            "/v1/messages",
            "/v1/responses",
            "/v1/chat/completions",
            "/v1/models/{id}",
        ] {
            assert!(e.message.contains(ep), "{ep}");
        }
    }

    #[test]
    fn retry_after_rounds_up() {
        use std::time::Duration;
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
        assert_eq!(retry_after_secs(Duration::MAX), 86_400);
    }

    #[test]
    fn raw_responses_are_complete_http_answers() {
        let raw = ApiError::headers_too_large(65536).raw_response(Wire::Anthropic, "req_1");
        let text = String::from_utf8(raw).expect("utf-8");
        let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
        assert!(
            head.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            "{head}"
        );
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        assert!(head.contains("connection: close") && head.contains("x-request-id: req_1"));
        let v: serde_json::Value = serde_json::from_str(body).expect("json");
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        let raw = ApiError::malformed_request().raw_response(Wire::OpenAi, "req_2");
        let text = String::from_utf8(raw).expect("utf-8");
        let body = text.split_once("\r\n\r\n").expect("body").1;
        let v: serde_json::Value = serde_json::from_str(body).expect("json");
        assert_eq!(v["error"]["code"], "malformed_request");
    }

    #[test]
    fn model_names_are_clipped() {
        let long = "m".repeat(1000);
        let e = ApiError::model_not_found(&long);
        assert!(e.message.len() < 200);
    }
}
