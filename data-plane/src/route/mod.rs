//! Routing: the layer that reads and parses the request body once
//! ([`body`]), resolves the canonical model to its [`Route`](crate::snapshot::Route),
//! checks the key may use it, and hands a typed [`Routed`] request to the
//! retry layer, which picks a backend per attempt ([`crate::select`]).

pub(crate) mod body;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Body;
use serde_json::Value;
use tokio::time::Instant;
use tower::{Layer, Service};

use self::body::{
    OVERSIZE_DRAIN_BYTES, estimate_tokens, parse_body, prompt_estimate, read_body, scan_body,
};
use crate::affinity::BodyHints;
use crate::body::ProxyBody;
use crate::error::ApiError;
use crate::queue::Priority;
use crate::stream::BoxError;
use crate::target::{Authenticated, Endpoint, RequestBody, Routed};
use crate::upstream::upstream_headers;
use crate::usage::request_stream_usage;

/// Layer of [`RouteService`].
#[derive(Clone)]
pub(crate) struct RouteLayer {
    max_body_bytes: usize,
    body_timeout: Duration,
}

impl RouteLayer {
    /// Bodies above `max_body_bytes` get 413; slower than `body_timeout`, 408.
    pub(crate) fn new(max_body_bytes: usize, body_timeout: Duration) -> Self {
        RouteLayer {
            max_body_bytes,
            body_timeout,
        }
    }
}

impl<S> Layer<S> for RouteLayer {
    type Service = RouteService<S>;
    fn layer(&self, inner: S) -> RouteService<S> {
        RouteService {
            inner,
            params: self.clone(),
        }
    }
}

/// Parses and routes requests; serves `GET /v1/models`.
#[derive(Clone)]
pub(crate) struct RouteService<S> {
    inner: S,
    params: RouteLayer,
}

fn endpoint(method: &Method, path: &str) -> Result<Option<&'static str>, ApiError> {
    let suffix = match path {
        "/v1/models" => {
            return if method == Method::GET {
                Ok(None)
            } else {
                Err(ApiError::method_not_allowed())
            };
        }
        "/v1/chat/completions" => "/chat/completions",
        "/v1/completions" => "/completions",
        "/v1/embeddings" => "/embeddings",
        _ => return Err(ApiError::not_found()),
    };
    if method == Method::POST {
        Ok(Some(suffix))
    } else {
        Err(ApiError::method_not_allowed())
    }
}

impl<S, B> Service<Request<B>> for RouteService<S>
where
    S: Service<Routed, Response = Response<ProxyBody>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let started = Instant::now();
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let params = self.params.clone();
        Box::pin(async move {
            match route_request(req, &params, started).await {
                Ok(routed) if routed.span.is_none() => inner.call(routed).await,
                Ok(routed) => {
                    use tracing::Instrument as _;
                    let span = routed.span.clone();
                    inner.call(routed).instrument(span).await
                }
                Err(e) => Ok(e),
            }
        })
    }
}

async fn route_request<B>(
    req: Request<B>,
    params: &RouteLayer,
    started: Instant,
) -> Result<Routed, Response<ProxyBody>>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let (parts, body) = req.into_parts();
    let Some(auth) = parts.extensions.get::<Authenticated>().cloned() else {
        return Err(ApiError::internal().into_response());
    };
    let suffix = match endpoint(&parts.method, parts.uri.path()) {
        Err(e) => return Err(reject(e, &auth)),
        Ok(None) => {
            let mut res = Response::new(ProxyBody::full(auth.snapshot.models_body(&auth.key)));
            res.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            return Err(res);
        }
        Ok(Some(s)) => s,
    };
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // A declared oversize within the drain budget is read (and thrown away)
    // by `read_body`, so the client sees the 413 rather than a reset.
    if declared.is_some_and(|n| n > (params.max_body_bytes + OVERSIZE_DRAIN_BYTES) as u64) {
        return Err(reject(
            ApiError::payload_too_large(params.max_body_bytes),
            &auth,
        ));
    }
    let bytes = read_body(body, params.max_body_bytes, params.body_timeout)
        .await
        .map_err(|e| reject(e, &auth))?;
    // Only a stream asking for usage changes the body's structure; anything
    // else is forwarded as received with `model` spliced in.
    let scanned = scan_body(&bytes).filter(|s| !(s.stream && suffix != "/embeddings"));
    let (body, model, stream, est_tokens, stream_usage) = match scanned {
        Some(s) => {
            let est = s.max_out.unwrap_or(0) as f64 + prompt_estimate(bytes.len()) as f64;
            let body = RequestBody::Raw {
                bytes: bytes.clone(),
                model: s.model_span,
            };
            // `stream` is only set here on embeddings, which never stream.
            (body, s.model, false, est, None)
        }
        None => {
            let (mut body, model) = parse_body(&bytes).map_err(|e| reject(e, &auth))?;
            let stream = suffix != "/embeddings" && body.get("stream") == Some(&Value::Bool(true));
            let est = estimate_tokens(&body, bytes.len());
            let stream_usage = stream.then(|| request_stream_usage(&mut body));
            (RequestBody::Json(body), model, stream, est, stream_usage)
        }
    };
    if !auth.key.allows(&model) {
        return Err(reject(ApiError::model_not_allowed(&model), &auth));
    }
    let Some(route) = auth.snapshot.route(&model).cloned() else {
        return Err(reject(ApiError::model_not_found(&model), &auth));
    };
    let priority = match parts.headers.get("x-claw-priority") {
        Some(v) if v.as_bytes().eq_ignore_ascii_case(b"background") => Priority::Background,
        _ => Priority::Interactive,
    };
    let agent_id = parts
        .headers
        .get("x-claw-agent-id")
        .and_then(|v| v.to_str().ok())
        .map(|s| s.chars().take(256).collect());
    let span =
        claw_telemetry::genai::request_span(suffix, &model, agent_id.as_deref(), &parts.headers);
    let affinity = crate::affinity::key(&parts.headers, &BodyHints::default(), agent_id.as_deref());
    let endpoint = match suffix {
        "/completions" => Endpoint::Completions,
        "/embeddings" => Endpoint::Embeddings,
        _ => Endpoint::ChatCompletions,
    };
    Ok(Routed {
        snapshot: auth.snapshot,
        key: auth.key,
        route,
        endpoint,
        affinity,
        response_id: None,
        owner: None,
        path: suffix,
        query: parts.uri.query().map(str::to_string),
        headers: upstream_headers(parts.headers),
        body,
        stream,
        priority,
        agent_id,
        est_tokens,
        est_prompt_tokens: prompt_estimate(bytes.len()),
        stream_usage,
        started,
        span,
    })
}

fn reject(e: ApiError, auth: &Authenticated) -> Response<ProxyBody> {
    tracing::debug!(key = %auth.key.name, status = e.status.as_u16(), code = ?e.code, "rejected request");
    if e.status != StatusCode::NOT_FOUND || e.code == Some("model_not_found") {
        crate::metrics::request("", "", crate::metrics::status_label(e.status.as_u16()));
    }
    e.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            endpoint(&Method::POST, "/v1/chat/completions"),
            Ok(Some("/chat/completions"))
        );
        assert_eq!(endpoint(&Method::GET, "/v1/models"), Ok(None));
        assert_eq!(
            endpoint(&Method::GET, "/v1/embeddings").unwrap_err().status,
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            endpoint(&Method::POST, "/v1/nope").unwrap_err().status,
            StatusCode::NOT_FOUND
        );
    }
}
