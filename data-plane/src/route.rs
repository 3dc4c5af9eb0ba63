//! Routing: the layer that reads and parses the request body once, resolves
//! the canonical model to its [`Route`] and hands a typed [`Routed`] request
//! to the retry layer; and [`select`], which picks the backend for an attempt.
//!
//! Selection follows DESIGN "Routing order": candidates are the enabled
//! backends mapping the model that are neither cooling nor ejected; the
//! primary pool before the fallback pool; within a pool the least loaded
//! (in-flight ÷ weight, ties rotated). A candidate whose rate limiter
//! refuses is skipped; if all usable ones are rate-limited the caller queues;
//! if all are cooling, the emergency limiter of the soonest-recovering one
//! may admit; otherwise the model is unavailable until the soonest recovery.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use claw_proto::Pool;
use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Body;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use tokio::time::Instant;
use tower::{Layer, Service};

use crate::body::ProxyBody;
use crate::error::ApiError;
use crate::queue::Priority;
use crate::snapshot::{Candidate, Route};
use crate::stream::BoxError;
use crate::target::Authenticated;
pub use crate::target::{RequestBody, Routed};
use crate::upstream::upstream_headers;
use crate::usage::request_stream_usage;

/// Candidates beyond this many per model are ignored (bitmask width).
pub const MAX_CANDIDATES: usize = 128;

/// What [`select`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    /// Use `route.candidates[index]`; its tokens are taken.
    Admitted {
        /// Candidate index.
        index: usize,
        /// Admitted by the emergency limiter while cooling.
        emergency: bool,
    },
    /// Usable candidates exist but all are at their rate limit.
    RateLimited {
        /// Until the soonest conforming instant of a candidate.
        wait: Duration,
    },
    /// Nothing can take the request now.
    Unavailable {
        /// Until the soonest candidate is usable again.
        retry_after: Duration,
    },
}

fn bit(i: usize) -> u128 {
    1u128 << i
}

fn less_loaded(a: &Candidate, b: &Candidate) -> bool {
    let la = u64::from(a.backend.runtime.in_flight.load(Ordering::Relaxed));
    let lb = u64::from(b.backend.runtime.in_flight.load(Ordering::Relaxed));
    la * u64::from(b.backend.weight) < lb * u64::from(a.backend.weight)
}

fn admit(c: &Candidate, tokens: f64, now: Instant) -> Result<(), Duration> {
    let rt = &c.backend.runtime;
    rt.rpm.try_acquire(1.0, now)?;
    if c.backend.tpm.is_some()
        && let Err(w) = rt.tpm.try_acquire(tokens, now)
    {
        rt.rpm.refund(1.0);
        return Err(w);
    }
    Ok(())
}

/// Picks the candidate for the next attempt, skipping those in `tried`
/// (a bitmask of candidate indices), and takes its tokens.
pub fn select(route: &Route, tried: u128, tokens: f64, now: Instant) -> Selection {
    let cands = &route.candidates[..route.candidates.len().min(MAX_CANDIDATES)];
    let n = cands.len();
    if n == 0 {
        return Selection::Unavailable {
            retry_after: Duration::from_secs(1),
        };
    }
    let rot = route.next_rotation() % n;
    let mut checked = tried;
    let mut soonest: Option<Instant> = None;
    let mut soonest_cooling: Option<(usize, Instant)> = None;
    for (i, c) in cands.iter().enumerate() {
        if tried & bit(i) != 0 {
            continue;
        }
        let cool = c.backend.runtime.cooldown.cooling_until(now);
        let ejected = c.backend.runtime.outlier.ejected_until(now);
        if let Some(until) = cool.max(ejected) {
            checked |= bit(i);
            soonest = Some(soonest.map_or(until, |s| s.min(until)));
            if let (Some(c), None) = (cool, ejected)
                && soonest_cooling.is_none_or(|(_, s)| c < s)
            {
                soonest_cooling = Some((i, c));
            }
        }
    }
    let mut min_wait: Option<Duration> = None;
    for pool in [Pool::Primary, Pool::Fallback] {
        loop {
            let mut best: Option<usize> = None;
            for k in 0..n {
                let i = (rot + k) % n;
                if checked & bit(i) != 0 || cands[i].backend.pool != pool {
                    continue;
                }
                if best.is_none_or(|b| less_loaded(&cands[i], &cands[b])) {
                    best = Some(i);
                }
            }
            let Some(i) = best else { break };
            checked |= bit(i);
            match admit(&cands[i], tokens, now) {
                Ok(()) => {
                    return Selection::Admitted {
                        index: i,
                        emergency: false,
                    };
                }
                Err(w) => min_wait = Some(min_wait.map_or(w, |m| m.min(w))),
            }
        }
    }
    if let Some(wait) = min_wait {
        return Selection::RateLimited { wait };
    }
    if let Some((i, _)) = soonest_cooling
        && cands[i]
            .backend
            .runtime
            .emergency
            .try_acquire(1.0, now)
            .is_ok()
    {
        return Selection::Admitted {
            index: i,
            emergency: true,
        };
    }
    Selection::Unavailable {
        retry_after: soonest.map_or(Duration::from_secs(1), |u| u - now),
    }
}

/// Layer of [`RouteService`].
#[derive(Clone)]
pub struct RouteLayer {
    max_body_bytes: usize,
    body_timeout: Duration,
}

impl RouteLayer {
    /// Bodies above `max_body_bytes` get 413; slower than `body_timeout`, 408.
    pub fn new(max_body_bytes: usize, body_timeout: Duration) -> Self {
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
pub struct RouteService<S> {
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

/// How much of an oversized body is read and thrown away before answering
/// 413, and for how long: without this "lingering" read, a client still
/// uploading gets a connection reset instead of the 413 (the kernel resets a
/// socket closed with unread data), as nginx's `lingering_close` avoids.
const OVERSIZE_DRAIN_BYTES: usize = 8 * 1024 * 1024;
const OVERSIZE_DRAIN_TIME: Duration = Duration::from_secs(2);

async fn read_body<B>(body: B, max: usize, timeout: Duration) -> Result<Bytes, ApiError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    use http_body_util::BodyExt as _;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut body = std::pin::pin!(body);
    let mut buf = bytes::BytesMut::new();
    let mut oversize: Option<(usize, tokio::time::Instant)> = None;
    loop {
        let until = match oversize {
            Some((_, drain_until)) => drain_until.min(deadline),
            None => deadline,
        };
        let frame = match tokio::time::timeout_at(until, body.frame()).await {
            Err(_) if oversize.is_some() => return Err(ApiError::payload_too_large(max)),
            Err(_) => return Err(ApiError::request_timeout()),
            Ok(None) => break,
            Ok(Some(Err(_))) if oversize.is_some() => {
                return Err(ApiError::payload_too_large(max));
            }
            Ok(Some(Err(_))) => {
                return Err(ApiError::bad_request("Could not read the request body."));
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        match &mut oversize {
            Some((drained, _)) => {
                *drained += data.len();
                if *drained > OVERSIZE_DRAIN_BYTES {
                    return Err(ApiError::payload_too_large(max));
                }
            }
            None if buf.len() + data.len() > max => {
                buf.clear();
                let drain_until = tokio::time::Instant::now() + OVERSIZE_DRAIN_TIME;
                oversize = Some((data.len(), drain_until));
            }
            None => buf.extend_from_slice(&data),
        }
    }
    match oversize {
        Some(_) => Err(ApiError::payload_too_large(max)),
        None => Ok(buf.freeze()),
    }
}

/// The estimated tokens of a request: its output cap plus ~4 bytes per prompt token.
pub fn estimate_tokens(body: &Map<String, Value>, body_len: usize) -> f64 {
    let max_out = ["max_completion_tokens", "max_tokens"]
        .iter()
        .find_map(|k| body.get(*k).and_then(Value::as_u64))
        .unwrap_or(0);
    max_out as f64 + prompt_estimate(body_len) as f64
}

/// About four bytes of request body per prompt token.
pub fn prompt_estimate(body_len: usize) -> u64 {
    (body_len as u64).div_ceil(4)
}

/// Parses a JSON request body into its top-level object and canonical model.
pub fn parse_body(bytes: &[u8]) -> Result<(Map<String, Value>, String), ApiError> {
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("The request body is not valid JSON: {e}.")))?;
    let Value::Object(map) = v else {
        return Err(ApiError::bad_request(
            "The request body must be a JSON object.",
        ));
    };
    match map.get("model") {
        Some(Value::String(m)) if !m.is_empty() => {
            let m = m.clone();
            Ok((map, m))
        }
        _ => Err(ApiError::bad_model()),
    }
}

/// What routing needs from a body, read without building a `Value`.
#[derive(Debug, Default)]
pub struct Scanned {
    /// The canonical model.
    pub model: String,
    /// Byte range of the `model` value (a JSON string, quotes included).
    pub model_span: std::ops::Range<usize>,
    /// `stream: true`.
    pub stream: bool,
    /// `max_completion_tokens`, else `max_tokens`, when an unsigned integer.
    pub max_out: Option<u64>,
}

/// The shape of a JSON value as far as routing cares. Deserialising it goes
/// through `deserialize_any` all the way down, exactly like `Value` does, so
/// it accepts and rejects the same documents, without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    True,
    U64(u64),
    Other,
}

impl<'de> Deserialize<'de> for Shape {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Shape;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_bool<E>(self, b: bool) -> Result<Shape, E> {
                Ok(if b { Shape::True } else { Shape::Other })
            }
            fn visit_u64<E>(self, n: u64) -> Result<Shape, E> {
                Ok(Shape::U64(n))
            }
            fn visit_i64<E>(self, n: i64) -> Result<Shape, E> {
                Ok(u64::try_from(n).map_or(Shape::Other, Shape::U64))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Shape, E> {
                Ok(Shape::Other)
            }
            fn visit_str<E>(self, _: &str) -> Result<Shape, E> {
                Ok(Shape::Other)
            }
            fn visit_unit<E>(self) -> Result<Shape, E> {
                Ok(Shape::Other)
            }
            fn visit_none<E>(self) -> Result<Shape, E> {
                Ok(Shape::Other)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Shape, A::Error> {
                while a.next_element::<Shape>()?.is_some() {}
                Ok(Shape::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Shape, A::Error> {
                while a.next_key::<Shape>()?.is_some() {
                    a.next_value::<Shape>()?;
                }
                Ok(Shape::Other)
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Key {
    Model,
    Stream,
    MaxCompletionTokens,
    MaxTokens,
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E>(self, k: &str) -> Result<Key, E> {
                Ok(match k {
                    "model" => Key::Model,
                    "stream" => Key::Stream,
                    "max_completion_tokens" => Key::MaxCompletionTokens,
                    "max_tokens" => Key::MaxTokens,
                    _ => Key::Other,
                })
            }
        }
        d.deserialize_any(V)
    }
}

struct Top<'a> {
    model: &'a RawValue,
    stream: bool,
    max_out: Option<u64>,
}

impl<'de> Deserialize<'de> for Top<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Top<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Top<'de>, A::Error> {
                let mut model: Option<&'de RawValue> = None;
                let (mut stream, mut mct, mut mt) = (Shape::Other, Shape::Other, Shape::Other);
                while let Some(k) = a.next_key::<Key>()? {
                    match k {
                        Key::Model => {
                            // A repeated `model` takes the general path.
                            if model.replace(a.next_value()?).is_some() {
                                return Err(de::Error::custom("duplicate model"));
                            }
                        }
                        Key::Stream => stream = a.next_value()?,
                        Key::MaxCompletionTokens => mct = a.next_value()?,
                        Key::MaxTokens => mt = a.next_value()?,
                        Key::Other => {
                            a.next_value::<Shape>()?;
                        }
                    }
                }
                let max_out = [mct, mt].into_iter().find_map(|s| match s {
                    Shape::U64(n) => Some(n),
                    _ => None,
                });
                Ok(Top {
                    model: model.ok_or_else(|| de::Error::custom("no model"))?,
                    stream: stream == Shape::True,
                    max_out,
                })
            }
        }
        d.deserialize_map(V)
    }
}

/// Reads `model`, `stream` and the output cap of a body without building a
/// `Value`, validating it as [`parse_body`] would. `None` whenever the body
/// is anything but a valid object with one non-empty string `model`: the
/// caller then takes [`parse_body`], which answers exactly as before.
pub fn scan_body(bytes: &[u8]) -> Option<Scanned> {
    let top: Top<'_> = serde_json::from_slice(bytes).ok()?;
    let raw = top.model.get();
    if !raw.starts_with('"') {
        return None;
    }
    // A plain string is its own content; escapes are decoded (and checked).
    let inner = &raw[1..raw.len() - 1];
    let model = if inner.contains('\\') {
        serde_json::from_str::<String>(raw).ok()?
    } else {
        inner.to_string()
    };
    if model.is_empty() {
        return None;
    }
    let start = raw.as_ptr() as usize - bytes.as_ptr() as usize;
    Some(Scanned {
        model,
        model_span: start..start + raw.len(),
        stream: top.stream,
        max_out: top.max_out,
    })
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
    Ok(Routed {
        snapshot: auth.snapshot,
        key: auth.key,
        route,
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
    use crate::snapshot::tests::{backend, key};
    use crate::snapshot::{Snapshot, compile};
    use claw_proto::v1;
    use std::sync::Arc;

    fn route_of(backends: Vec<v1::SnapshotBackend>) -> (Snapshot, Arc<Route>) {
        let s = v1::Snapshot {
            version: 1,
            backends,
            pools: vec![],
            client_keys: vec![key("ck", "s")],
            models: vec![],
        };
        let c = compile(1, &s, None, Instant::now()).unwrap();
        let r = c.route("m").unwrap().clone();
        (c, r)
    }

    fn id(r: &Route, s: Selection) -> &str {
        match s {
            Selection::Admitted { index, .. } => &r.candidates[index].backend.id,
            other => panic!("not admitted: {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn primary_before_fallback_and_least_loaded_within_a_pool() {
        let (_s, r) = route_of(vec![
            backend("fb", Pool::Fallback, &[("m", "m")]),
            backend("p1", Pool::Primary, &[("m", "m")]),
            backend("p2", Pool::Primary, &[("m", "m")]),
        ]);
        let now = Instant::now();
        r.candidates[0]
            .backend
            .runtime
            .in_flight
            .store(5, Ordering::Relaxed);
        assert_eq!(id(&r, select(&r, 0, 1.0, now)), "p2");
        r.candidates[1]
            .backend
            .runtime
            .in_flight
            .store(9, Ordering::Relaxed);
        assert_eq!(id(&r, select(&r, 0, 1.0, now)), "p1");
        // Both primaries tried: fallback.
        assert_eq!(id(&r, select(&r, 0b11, 1.0, now)), "fb");
        assert!(matches!(
            select(&r, 0b111, 1.0, now),
            Selection::Unavailable { .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn ties_rotate() {
        let (_s, r) = route_of(vec![
            backend("a", Pool::Primary, &[("m", "m")]),
            backend("b", Pool::Primary, &[("m", "m")]),
        ]);
        let now = Instant::now();
        let first = id(&r, select(&r, 0, 1.0, now)).to_string();
        let second = id(&r, select(&r, 0, 1.0, now)).to_string();
        assert_ne!(first, second);
    }

    #[tokio::test(start_paused = true)]
    async fn weight_divides_load() {
        let mut heavy = backend("heavy", Pool::Primary, &[("m", "m")]);
        heavy.weight = 4;
        let (_s, r) = route_of(vec![backend("light", Pool::Primary, &[("m", "m")]), heavy]);
        r.candidates[0]
            .backend
            .runtime
            .in_flight
            .store(1, Ordering::Relaxed);
        r.candidates[1]
            .backend
            .runtime
            .in_flight
            .store(3, Ordering::Relaxed);
        assert_eq!(id(&r, select(&r, 0, 1.0, Instant::now())), "heavy");
    }

    #[tokio::test(start_paused = true)]
    async fn cooling_skips_rate_limited_queues_all_cooling_uses_emergency() {
        let mut a = backend("a", Pool::Primary, &[("m", "m")]);
        a.rpm = 1;
        let mut b = backend("b", Pool::Fallback, &[("m", "m")]);
        b.rpm = 20; // emergency 0.05 × 20 = 1 per minute
        let (_s, r) = route_of(vec![a, b]);
        let now = Instant::now();
        assert_eq!(id(&r, select(&r, 0, 1.0, now)), "a");
        // a is out of tokens: b.
        assert_eq!(id(&r, select(&r, 0, 1.0, now)), "b");
        // Only a (rate-limited) left untried.
        assert!(matches!(
            select(&r, 0b10, 1.0, now),
            Selection::RateLimited { .. }
        ));
        // Cool both: emergency admits once on the soonest-recovering, then 503.
        r.candidates[0]
            .backend
            .runtime
            .cooldown
            .apply(now + Duration::from_secs(30), 1);
        r.candidates[1]
            .backend
            .runtime
            .cooldown
            .apply(now + Duration::from_secs(10), 1);
        assert_eq!(
            select(&r, 0, 1.0, now),
            Selection::Admitted {
                index: 1,
                emergency: true
            }
        );
        assert_eq!(
            select(&r, 0, 1.0, now),
            Selection::Unavailable {
                retry_after: Duration::from_secs(10)
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn ejected_backends_are_skipped() {
        let (_s, r) = route_of(vec![
            backend("a", Pool::Primary, &[("m", "m")]),
            backend("b", Pool::Primary, &[("m", "m")]),
        ]);
        let now = Instant::now();
        let p = crate::outlier::OutlierPolicy::default();
        for _ in 0..5 {
            r.candidates[0].backend.runtime.outlier.on_failure(&p, now);
        }
        // A second apart: the limiters pace requests at the rate (600 rpm),
        // they no longer admit a minute's worth at one instant.
        for i in 0..4 {
            let at = now + Duration::from_secs(i);
            assert_eq!(id(&r, select(&r, 0, 1.0, at)), "b");
        }
    }

    #[test]
    fn body_parsing_rejects_bad_input() {
        assert!(parse_body(b"{not json").is_err());
        assert!(parse_body(b"[1,2]").is_err());
        assert!(parse_body(b"{\"messages\":[]}").is_err());
        assert!(parse_body(b"{\"model\":42}").is_err());
        assert!(parse_body(b"{\"model\":\"\"}").is_err());
        assert!(parse_body(b"{\"model\":\"m\xff\"}").is_err());
        assert!(parse_body(b"").is_err());
        let (map, m) = parse_body(br#"{"model":"gpt","max_tokens":100}"#).unwrap();
        assert_eq!(m, "gpt");
        assert_eq!(estimate_tokens(&map, 400), 200.0);
    }

    #[test]
    fn scanning_agrees_with_parsing() {
        let bodies: &[&[u8]] = &[
            br#"{"model":"gpt","max_tokens":100}"#,
            br#" { "messages" : [ {"role":"user","content":"h\u00e9 \"x\""} ], "model" : "gpt" , "stream":false } "#,
            br#"{"model":"g\u0070t","max_completion_tokens":7,"max_tokens":9}"#,
            br#"{"model":"gpt","max_completion_tokens":1.5,"max_tokens":9}"#,
            br#"{"model":"gpt","max_tokens":-0}"#,
            br#"{"model":"gpt","max_tokens":-3}"#,
            br#"{"model":"gpt","max_tokens":1e2}"#,
            br#"{"model":"gpt","max_tokens":18446744073709551616}"#,
            br#"{"model":"gpt","stream":true}"#,
            br#"{"mod\u0065l":"gpt","stream":"true"}"#,
            br#"{"model":"a","model":"b"}"#,
            br#"{"model":"gpt","x":"\ud800"}"#,
            br#"{"model":"\ud800"}"#,
            br#"{"model":"gpt","x":[1,2,{"a":null}]} x"#,
            br#"{"model":"gpt","x":"a	b"}"#,
            b"{\"model\":\"gpt\",\"x\":\"\xff\"}",
            br#"{"model":null}"#,
            br#"{"model":["gpt"]}"#,
            br#"{"model":""}"#,
            br#"{"model":"gpt",}"#,
            br#"{"model":"gpt","n":01}"#,
            br#"[1,2]"#,
            b"",
        ];
        for b in bodies {
            let parsed = parse_body(b);
            match scan_body(b) {
                Some(s) => {
                    let (map, m) = parsed
                        .unwrap_or_else(|_| panic!("scan accepted {}", String::from_utf8_lossy(b)));
                    assert_eq!(s.model, m);
                    assert_eq!(s.stream, map.get("stream") == Some(&Value::Bool(true)));
                    assert_eq!(
                        s.max_out.unwrap_or(0) as f64 + prompt_estimate(b.len()) as f64,
                        estimate_tokens(&map, b.len())
                    );
                    let mut raw = RequestBody::Raw {
                        bytes: Bytes::copy_from_slice(b),
                        model: s.model_span,
                    };
                    let sent: Value =
                        serde_json::from_slice(&raw.with_model("n\"é").unwrap()).unwrap();
                    let mut want = map.clone();
                    want.insert("model".into(), Value::String("n\"é".into()));
                    assert_eq!(sent, Value::Object(want));
                }
                None => {
                    // Only the general path's cases: errors, or a repeated model.
                    assert!(parsed.is_err() || b.starts_with(br#"{"model":"a","model""#));
                }
            }
        }
        // Deeply nested values: both reject past serde_json's recursion limit.
        for depth in [100, 126, 127, 128, 200] {
            let b = format!(
                "{{\"model\":\"m\",\"x\":{}{}}}",
                "[".repeat(depth),
                "]".repeat(depth)
            );
            assert_eq!(
                scan_body(b.as_bytes()).is_some(),
                parse_body(b.as_bytes()).is_ok(),
                "depth {depth}"
            );
        }
    }

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
