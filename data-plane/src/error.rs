//! OpenAI-format error responses. Every error the proxy produces itself is
//! rendered by [`ApiError::into_response`]: `{"error":{"message","type","param","code"}}`
//! with the matching status and, where it helps the client, `Retry-After`.
//! Messages are fixed, client-facing text: no internals, no keys.

use std::borrow::Cow;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::body::ProxyBody;

/// An error the proxy answers with instead of an upstream response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Human-readable message (safe for clients).
    pub message: Cow<'static, str>,
    /// OpenAI error `type`.
    pub kind: &'static str,
    /// OpenAI error `param`.
    pub param: Option<&'static str>,
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

    fn param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
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
            "Invalid or missing API key. Send `Authorization: Bearer <key>`.",
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

    /// 400: the request is not what the endpoint accepts.
    pub(crate) fn bad_request(message: impl Into<Cow<'static, str>>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 about the `model` field.
    pub(crate) fn bad_model() -> Self {
        ApiError::bad_request("The request body must be a JSON object with a string `model`.")
            .param("model")
    }

    /// 404: unknown path.
    pub(crate) fn not_found() -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "Unknown endpoint.",
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

    /// Renders the error as an HTTP response.
    pub(crate) fn into_response(self) -> Response<ProxyBody> {
        let mut res = Response::new(ProxyBody::full(self.body_json()));
        *res.status_mut() = self.status;
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
    fn retry_after_rounds_up() {
        use std::time::Duration;
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
        assert_eq!(retry_after_secs(Duration::MAX), 86_400);
    }

    #[test]
    fn model_names_are_clipped() {
        let long = "m".repeat(1000);
        let e = ApiError::model_not_found(&long);
        assert!(e.message.len() < 200);
    }
}
