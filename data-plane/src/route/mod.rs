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
    OVERSIZE_DRAIN_BYTES, bounded_estimate, output_cap, parse_body, prompt_estimate, read_body,
    scan_body,
};
use crate::affinity::BodyHints;
use crate::body::ProxyBody;
use crate::error::{ApiError, Wire};
use crate::key_limits::{BodyBudget, BodyReservation};
use crate::queue::Priority;
use crate::run_kind::RunKind;
use crate::stream::BoxError;
use crate::target::{Authenticated, Endpoint, RequestBody, RequestId, Routed};
use crate::upstream::upstream_headers;
use crate::usage::request_stream_usage;

/// Layer of [`RouteService`].
#[derive(Clone)]
pub(crate) struct RouteLayer {
    max_body_bytes: usize,
    body_timeout: Duration,
    budget: BodyBudget,
    write_timeout: Duration,
}

impl RouteLayer {
    /// Bodies above `max_body_bytes` get 413; slower than `body_timeout`, 408.
    pub(crate) fn new(max_body_bytes: usize, body_timeout: Duration) -> Self {
        RouteLayer {
            max_body_bytes,
            body_timeout,
            budget: BodyBudget::default(),
            write_timeout: Duration::ZERO,
        }
    }

    /// Upstream responses a client stops reading for `timeout` have their
    /// upstream released (zero: never).
    pub(crate) fn with_write_timeout(mut self, timeout: Duration) -> Self {
        self.write_timeout = timeout;
        self
    }

    /// Request bodies held at once share `budget` (503 beyond it).
    pub(crate) fn with_budget(mut self, budget: BodyBudget) -> Self {
        self.budget = budget;
        self
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

/// What a request path asks for.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    /// `GET /v1/models`.
    Models,
    /// `GET /v1/models/{id}`.
    Model(String),
    /// An endpoint served upstream, with the response id its path names.
    Upstream(Endpoint, Option<String>),
}

/// The longest response id accepted in a path.
const MAX_RESPONSE_ID: usize = 256;

/// A response id as providers issue them: 1–256 of `[A-Za-z0-9_-]`.
fn valid_response_id(id: &str) -> bool {
    (1..=MAX_RESPONSE_ID).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Resolves `method path`: 404 (listing the endpoints) for an unknown path,
/// 405 for a known path and the wrong method, 400 for a malformed response id.
fn endpoint(method: &Method, path: &str) -> Result<Target, ApiError> {
    let post = |e: Endpoint| {
        if method == Method::POST {
            Ok(Target::Upstream(e, None))
        } else {
            Err(ApiError::method_not_allowed())
        }
    };
    match path {
        "/v1/models" => {
            return if method == Method::GET {
                Ok(Target::Models)
            } else {
                Err(ApiError::method_not_allowed())
            };
        }
        "/v1/chat/completions" => return post(Endpoint::ChatCompletions),
        "/v1/completions" => return post(Endpoint::Completions),
        "/v1/embeddings" => return post(Endpoint::Embeddings),
        "/v1/responses" => return post(Endpoint::Responses),
        "/v1/messages" => return post(Endpoint::Messages),
        "/v1/messages/count_tokens" => return post(Endpoint::CountTokens),
        _ => {}
    }
    if let Some(id) = path.strip_prefix("/v1/models/")
        && !id.is_empty()
    {
        return if method == Method::GET {
            Ok(Target::Model(percent_decode(id)))
        } else {
            Err(ApiError::method_not_allowed())
        };
    }
    if let Some(id) = path.strip_prefix("/v1/responses/")
        && !id.contains('/')
    {
        let e = match *method {
            Method::GET => Endpoint::ResponsesGet,
            Method::DELETE => Endpoint::ResponsesDelete,
            _ => return Err(ApiError::method_not_allowed()),
        };
        if !valid_response_id(id) {
            return Err(ApiError::bad_response_id());
        }
        return Ok(Target::Upstream(e, Some(id.to_string())));
    }
    Err(ApiError::not_found())
}

/// The body's `previous_response_id` (read by the body scan, or from the
/// parsed body), when it is a valid response id; anything else reads as none.
fn previous_response_id(hints: &BodyHints) -> Option<String> {
    hints
        .previous_response_id
        .clone()
        .filter(|id| valid_response_id(id))
}

/// A JSON answer the proxy makes itself.
fn json_response(body: Bytes) -> Response<ProxyBody> {
    let mut res = Response::new(ProxyBody::full(body));
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    res
}

/// A path segment with its `%XX` escapes decoded (SDKs escape a model id's
/// `/`); invalid escapes and non-UTF-8 results are kept as sent.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| s.to_string())
}

/// The Anthropic model object of `id`.
fn anthropic_model(id: &str, created: u64) -> Value {
    let at = std::time::UNIX_EPOCH + Duration::from_secs(created);
    serde_json::json!({
        "type": "model",
        "id": id,
        "display_name": id,
        "created_at": humantime::format_rfc3339_seconds(at).to_string(),
    })
}

/// `GET /v1/models` for an Anthropic client (`anthropic-version` sent):
/// one page holding every model.
fn anthropic_models<'a>(ids: impl Iterator<Item = &'a String>, created: u64) -> Bytes {
    let data: Vec<Value> = ids.map(|id| anthropic_model(id, created)).collect();
    let first = data.first().map(|m| m["id"].clone()).unwrap_or(Value::Null);
    let last = data.last().map(|m| m["id"].clone()).unwrap_or(Value::Null);
    let v =
        serde_json::json!({"data": data, "has_more": false, "first_id": first, "last_id": last});
    Bytes::from(v.to_string())
}

/// `GET /v1/models/{id}`: the OpenAI model object, or the Anthropic one
/// when the client sent `anthropic-version` (the Anthropic SDK always does).
fn model_body(id: &str, created: u64, anthropic: bool) -> Bytes {
    let v = if anthropic {
        anthropic_model(id, created)
    } else {
        serde_json::json!({"id": id, "object": "model", "created": created, "owned_by": "claw"})
    };
    Bytes::from(v.to_string())
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
            // The body's bytes count against the proxy's budget until the
            // request is answered (its head; the bytes are dropped by then).
            let mut reservation = params.budget.reservation();
            let res = match route_request(req, &params, started, &mut reservation).await {
                Ok(routed) if routed.span.is_none() => inner.call(routed).await,
                Ok(routed) => {
                    use tracing::Instrument as _;
                    let span = routed.span.clone();
                    inner.call(routed).instrument(span).await
                }
                Err(e) => Ok(e),
            };
            let timeout = params.write_timeout;
            res.map(|r| r.map(|b| b.watch(timeout)))
        })
    }
}

async fn route_request<B>(
    req: Request<B>,
    params: &RouteLayer,
    started: Instant,
    reservation: &mut BodyReservation,
) -> Result<Routed, Response<ProxyBody>>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let (parts, body) = req.into_parts();
    let wire = Wire::for_path(parts.uri.path());
    let Some(auth) = parts.extensions.get::<Authenticated>().cloned() else {
        return Err(ApiError::internal().into_response_for(wire));
    };
    // Set by the server on every request; a stack driven without it (unit
    // tests) gets a fresh id.
    let request_id = parts
        .extensions
        .get::<RequestId>()
        .cloned()
        .unwrap_or_else(RequestId::generate);
    let (endpoint, path_id) = match endpoint(&parts.method, parts.uri.path()) {
        Err(e) => return Err(reject(e, &auth, wire)),
        Ok(Target::Models) if parts.headers.contains_key("anthropic-version") => {
            let snap = &auth.snapshot;
            let ids = snap.models().iter().filter(|m| auth.key.allows(m));
            return Err(json_response(anthropic_models(ids, snap.created())));
        }
        Ok(Target::Models) => return Err(json_response(auth.snapshot.models_body(&auth.key))),
        Ok(Target::Model(id)) => {
            if !auth.snapshot.lists_model(&auth.key, &id) {
                return Err(reject(ApiError::unknown_model_id(&id), &auth, wire));
            }
            let anthropic = parts.headers.contains_key("anthropic-version");
            let created = auth.snapshot.created();
            return Err(json_response(model_body(&id, created, anthropic)));
        }
        Ok(Target::Upstream(e, id)) => (e, id),
    };
    let suffix = endpoint.upstream_path();
    let agent_id = bound_agent_id(&parts.headers, &auth);
    // Affinity only picks a backend: any client's agent id may steer its own
    // requests (it marks nothing busy and moves no usage).
    let affinity_agent: Option<String> = parts
        .headers
        .get("x-claw-agent-id")
        .and_then(|v| v.to_str().ok())
        .map(|s| s.chars().take(256).collect());
    let priority = match parts.headers.get("x-claw-priority") {
        Some(v) if v.as_bytes().eq_ignore_ascii_case(b"background") => Priority::Background,
        _ => Priority::Interactive,
    };
    let run_kind = RunKind::of(&parts.headers);
    crate::metrics::run_kind_request(run_kind.label());
    if endpoint.by_response_id() {
        // Only the headers can carry a key: there is no body.
        let affinity = crate::affinity::key(
            &parts.headers,
            &BodyHints::default(),
            affinity_agent.as_deref(),
        );
        // `GET`/`DELETE /v1/responses/{id}`: no body, no model; any
        // `openai` backend may hold the id.
        let Some(route) = auth.snapshot.responses_route().cloned() else {
            return Err(reject(ApiError::no_responses_backend(), &auth, wire));
        };
        let owner = path_id.as_deref().and_then(crate::responses::owner);
        let span =
            claw_telemetry::genai::request_span(suffix, "", agent_id.as_deref(), &parts.headers);
        claw_telemetry::genai::set_request_id(&span, &request_id);
        return Ok(Routed {
            snapshot: auth.snapshot,
            key: auth.key,
            route,
            endpoint,
            affinity,
            response_id: path_id,
            owner,
            path: suffix,
            query: parts.uri.query().map(str::to_string),
            headers: forwarded_headers(parts.headers, &request_id),
            body: RequestBody::Empty,
            stream: false,
            priority,
            parsed: None,
            agent_id,
            run_kind,
            est_tokens: 0.0,
            est_prompt_tokens: 0,
            stream_usage: None,
            request_id,
            started,
            span,
        });
    }
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
            wire,
        ));
    }
    let bytes = read_body(
        body,
        params.max_body_bytes,
        params.body_timeout,
        declared,
        reservation,
    )
    .await
    .map_err(|e| reject(e, &auth, wire))?;
    // Only a chat or completions stream asking for usage changes the body's
    // structure; anything else (Messages, Responses and count_tokens
    // included, streaming or not) is forwarded as received with `model`
    // spliced in.
    let injects = matches!(endpoint, Endpoint::ChatCompletions | Endpoint::Completions);
    let streams = !matches!(endpoint, Endpoint::Embeddings | Endpoint::CountTokens);
    let scanned = scan_body(&bytes).filter(|s| !(s.stream && injects));
    let (body, model, stream, est, stream_usage, hints) = match scanned {
        Some(s) => {
            let est = s.max_out;
            let body = RequestBody::Raw {
                bytes: bytes.clone(),
                model: s.model_span,
            };
            (body, s.model, s.stream && streams, est, None, s.hints)
        }
        None => {
            let (mut body, model) = parse_body(&bytes).map_err(|e| reject(e, &auth, wire))?;
            let stream = streams && body.get("stream") == Some(&Value::Bool(true));
            let est = output_cap(&body);
            let stream_usage = (stream && injects).then(|| request_stream_usage(&mut body));
            let hints = BodyHints::from_map(&body);
            (
                RequestBody::Json(body),
                model,
                stream,
                est,
                stream_usage,
                hints,
            )
        }
    };
    if !auth.key.allows(&model) {
        return Err(reject(ApiError::model_not_allowed(&model), &auth, wire));
    }
    let api = endpoint.api();
    let route = if endpoint.translates() {
        auth.snapshot.translating_route_for(&model, api)
    } else {
        auth.snapshot.route_for(&model, api)
    };
    let Some(route) = route.cloned() else {
        let e = match auth.snapshot.apis_serving(&model).find(|a| *a != api) {
            Some(other) => ApiError::model_other_protocol(&model, other.endpoint()),
            None => ApiError::model_not_found(&model),
        };
        return Err(reject(e, &auth, wire));
    };
    // count_tokens costs the provider no tokens; anything else reserves its
    // estimate, bounded by the route's mappings (or refused above them).
    let est_tokens = if endpoint == Endpoint::CountTokens {
        0.0
    } else {
        bounded_estimate(est, prompt_estimate(bytes.len()), &route.candidates)
            .map_err(|e| reject(e, &auth, wire))?
    };
    let response_id = match endpoint {
        Endpoint::Responses => previous_response_id(&hints),
        _ => None,
    };
    let affinity = crate::affinity::key(&parts.headers, &hints, affinity_agent.as_deref());
    let owner = response_id.as_deref().and_then(crate::responses::owner);
    let span =
        claw_telemetry::genai::request_span(suffix, &model, agent_id.as_deref(), &parts.headers);
    claw_telemetry::genai::set_request_id(&span, &request_id);
    Ok(Routed {
        snapshot: auth.snapshot,
        key: auth.key,
        route,
        endpoint,
        affinity,
        response_id,
        owner,
        path: suffix,
        query: parts.uri.query().map(str::to_string),
        headers: forwarded_headers(parts.headers, &request_id),
        body,
        stream,
        priority,
        parsed: None,
        agent_id,
        run_kind,
        est_tokens,
        est_prompt_tokens: prompt_estimate(bytes.len()),
        stream_usage,
        request_id,
        started,
        span,
    })
}

/// The request's `x-claw-agent-id`, if its key may speak for that agent
/// (it lists it in `agents`, or it is the control plane's own key). Any
/// other id is dropped (counted, logged at debug): a client cannot mark
/// another agent busy or move its usage onto it.
fn bound_agent_id(headers: &http::HeaderMap, auth: &Authenticated) -> Option<String> {
    let v = headers.get("x-claw-agent-id")?;
    let id = v.to_str().ok().map(str::trim).filter(|s| !s.is_empty());
    match id {
        Some(id) if auth.key.speaks_for(id) => Some(id.to_string()),
        _ => {
            crate::metrics::agent_id_rejected();
            let shown: String = String::from_utf8_lossy(v.as_bytes())
                .chars()
                .take(64)
                .collect();
            tracing::debug!(key = %auth.key.name, agent_id = ?shown, "x-claw-agent-id not bound to the client key: ignored");
            None
        }
    }
}

/// The client's headers to forward, with its `x-request-id` replaced by the
/// request's own (a client's malformed one never goes upstream).
fn forwarded_headers(client: http::HeaderMap, id: &RequestId) -> http::HeaderMap {
    let mut h = upstream_headers(client);
    h.insert(RequestId::HEADER, id.header_value());
    h
}

fn reject(e: ApiError, auth: &Authenticated, wire: Wire) -> Response<ProxyBody> {
    tracing::debug!(key = %auth.key.name, status = e.status.as_u16(), code = ?e.code, "rejected request");
    if e.status != StatusCode::NOT_FOUND || e.code == Some("model_not_found") {
        crate::metrics::request("", "", crate::metrics::status_label(e.status.as_u16()));
    }
    e.into_response_for(wire)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let up = |e| Ok(Target::Upstream(e, None));
        assert_eq!(
            endpoint(&Method::POST, "/v1/chat/completions"),
            up(Endpoint::ChatCompletions)
        );
        assert_eq!(
            endpoint(&Method::POST, "/v1/messages"),
            up(Endpoint::Messages)
        );
        assert_eq!(
            endpoint(&Method::POST, "/v1/messages/count_tokens"),
            up(Endpoint::CountTokens)
        );
        assert_eq!(
            endpoint(&Method::POST, "/v1/responses"),
            up(Endpoint::Responses)
        );
        assert_eq!(endpoint(&Method::GET, "/v1/models"), Ok(Target::Models));
        assert_eq!(
            endpoint(&Method::GET, "/v1/models/claude-x"),
            Ok(Target::Model("claude-x".into()))
        );
        assert_eq!(
            endpoint(&Method::GET, "/v1/embeddings").unwrap_err().status,
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            endpoint(&Method::GET, "/v1/messages").unwrap_err().status,
            StatusCode::METHOD_NOT_ALLOWED
        );
        let nf = endpoint(&Method::POST, "/v1/nope").unwrap_err();
        assert_eq!(nf.status, StatusCode::NOT_FOUND);
        assert!(nf.message.contains("/v1/messages"));
        assert_eq!(
            endpoint(&Method::GET, "/v1/responses/resp_1/input_items")
                .unwrap_err()
                .status,
            StatusCode::NOT_FOUND
        );
    }

    #[test]
    fn response_ids_in_paths_are_validated() {
        assert_eq!(
            endpoint(&Method::GET, "/v1/responses/resp_A-1"),
            Ok(Target::Upstream(
                Endpoint::ResponsesGet,
                Some("resp_A-1".into())
            ))
        );
        assert_eq!(
            endpoint(&Method::DELETE, "/v1/responses/resp_1"),
            Ok(Target::Upstream(
                Endpoint::ResponsesDelete,
                Some("resp_1".into())
            ))
        );
        assert_eq!(
            endpoint(&Method::POST, "/v1/responses/resp_1")
                .unwrap_err()
                .status,
            StatusCode::METHOD_NOT_ALLOWED
        );
        let long = format!("/v1/responses/{}", "a".repeat(257));
        for bad in [
            "/v1/responses/",
            "/v1/responses/a.b",
            "/v1/responses/%2e",
            &long,
        ] {
            let e = endpoint(&Method::GET, bad).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad}");
            assert_eq!(e.param.as_deref(), Some("response_id"));
        }
        let max = format!("/v1/responses/{}", "a".repeat(256));
        assert!(endpoint(&Method::GET, &max).is_ok());
    }

    #[test]
    fn previous_response_ids_are_read_from_the_body() {
        let id = |b: &[u8]| {
            let s = self::body::scan_body(b).expect("scans");
            previous_response_id(&s.hints)
        };
        let b = br#"{"model":"m","input":[{"x":1}],"previous_response_id":"resp_9"}"#;
        assert_eq!(id(b).as_deref(), Some("resp_9"));
        assert_eq!(id(br#"{"model":"m"}"#), None);
        assert_eq!(id(br#"{"model":"m","previous_response_id":null}"#), None);
        assert_eq!(id(br#"{"model":"m","previous_response_id":7}"#), None);
        assert_eq!(id(br#"{"model":"m","previous_response_id":"a/b"}"#), None);
    }

    #[test]
    fn model_objects_in_both_shapes() {
        let v: Value = serde_json::from_slice(&model_body("m", 0, false)).unwrap();
        assert_eq!(v["object"], "model");
        assert_eq!(v["id"], "m");
        let v: Value = serde_json::from_slice(&model_body("m", 0, true)).unwrap();
        assert_eq!(v["type"], "model");
        assert_eq!(v["display_name"], "m");
        assert_eq!(v["created_at"], "1970-01-01T00:00:00Z");
        let ids = ["a".to_string(), "b".to_string()];
        let v: Value = serde_json::from_slice(&anthropic_models(ids.iter(), 0)).unwrap();
        assert_eq!(v["data"][1]["type"], "model");
        assert_eq!(
            (&v["first_id"], &v["last_id"]),
            (&Value::from("a"), &Value::from("b"))
        );
        assert_eq!(v["has_more"], false);
    }

    #[test]
    fn model_ids_in_paths_are_percent_decoded() {
        assert_eq!(percent_decode("meta%2Fllama-3"), "meta/llama-3");
        assert_eq!(percent_decode("a%zz%4"), "a%zz%4");
        assert_eq!(percent_decode("%ff"), "%ff");
        assert_eq!(
            endpoint(&Method::GET, "/v1/models/org%2Fm"),
            Ok(Target::Model("org/m".into()))
        );
    }
}
