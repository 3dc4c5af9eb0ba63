//! The retry layer: admits each attempt in routing order ([`crate::select`]),
//! sends the attempt through the upstream service, and reacts to the answer.
//!
//! - 429: the backend is cooled at once ([`crate::cooldown`]) and the request
//!   moves to the next candidate.
//! - 5xx, connect errors, timeouts: count towards outlier ejection
//!   ([`crate::outlier`]) and move to the next candidate.
//! - Anything else is the answer and streams to the client.
//!
//! Retries happen only before the first byte reaches the client (an answer is
//! never retried once its body starts), up to the pool's `max_retries` and
//! the request deadline. When every usable candidate is rate-limited the
//! request waits in the model's queue. The answer, or its absence, is
//! accounted by [`crate::accounting`].
//!
//! When traces are exported, each attempt gets a child span of the request's
//! ([`claw_telemetry::genai`]) whose `traceparent` goes upstream; otherwise
//! the spans are [`tracing::Span::none`] and cost nothing.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::Bytes;
use claw_telemetry::genai;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

use crate::accounting::{Abandoned, InFlight, RequestMeta, Tracker};
use crate::body::ProxyBody;
use crate::cooldown::{Cooldowns, parse_retry_after};
use crate::error::ApiError;
use crate::error::retry_after_secs;
use crate::events::{EventSink, Failure, FailureKind, Signal};
use crate::metrics;
use crate::outlier::OutlierPolicy;
use crate::queue::Priority;
use crate::select::{Admission, CandidateSet, MAX_CANDIDATES, admit};
use crate::snapshot::{Backend, Candidate};
use crate::stream::UpstreamBody;
use crate::target::Routed;
use crate::upstream::{Attempt, UpstreamError, strip_hop_by_hop};
use crate::usage::SseUsage;

struct Shared {
    cooldowns: Cooldowns,
    outlier: OutlierPolicy,
    events: EventSink,
}

/// Layer of [`Retry`].
#[derive(Clone)]
pub struct RetryLayer {
    shared: Arc<Shared>,
}

impl RetryLayer {
    /// Cools through `cooldowns`, ejects per `outlier`, reports to `events`.
    pub fn new(cooldowns: Cooldowns, outlier: OutlierPolicy, events: EventSink) -> Self {
        RetryLayer {
            shared: Arc::new(Shared {
                cooldowns,
                outlier,
                events,
            }),
        }
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;
    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// Retries attempts across candidates.
#[derive(Clone)]
pub struct Retry<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> Service<Routed> for Retry<S>
where
    S: Service<Attempt, Response = Response<Incoming>, Error = UpstreamError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, r: Routed) -> Self::Future {
        let inner = self.inner.clone();
        let shared = self.shared.clone();
        Box::pin(async move { Ok(run(inner, shared, r).await) })
    }
}

/// Builds the upstream request with `model` set to the candidate's native id
/// (spliced into the client's bytes, or re-serialised for a rewritten body).
/// The last attempt a request can make takes the client's headers instead
/// of copying them.
fn build_request(r: &mut Routed, c: &Candidate, last: bool) -> Option<Request<Full<Bytes>>> {
    let target = &c.backend.target;
    let uri = target.uri(r.path, r.query.as_deref())?;
    let bytes = r.body.with_model(&c.native)?;
    let mut req = Request::new(Full::new(bytes));
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = uri;
    *req.headers_mut() = if last {
        std::mem::take(&mut r.headers)
    } else {
        r.headers.clone()
    };
    let h = req.headers_mut();
    h.insert(header::AUTHORIZATION, c.backend.authorization.clone());
    h.insert(header::HOST, target.host().clone());
    Some(req)
}

fn attempt_metric(backend: &Backend, outcome: &'static str) {
    metrics::upstream_attempt(backend.id.clone(), outcome);
}

async fn run<S>(mut inner: S, shared: Arc<Shared>, mut r: Routed) -> Response<ProxyBody>
where
    S: Service<Attempt, Response = Response<Incoming>, Error = UpstreamError>,
{
    let settings = &r.route.settings;
    let deadline = r.started + settings.request_timeout;
    let max_attempts = settings.max_retries.saturating_add(1);
    let mut tried = CandidateSet::default();
    let mut attempts: u32 = 0;
    let mut last_error: Option<ApiError> = None;
    let mut abandoned = Abandoned::new(&shared.events, RequestMeta::new(&r));
    if r.priority == Priority::Interactive
        && let Some(agent_id) = &r.agent_id
    {
        shared.events.signal(Signal::Activity {
            agent_id: agent_id.clone(),
            at: SystemTime::now(),
        });
    }

    while attempts < max_attempts {
        let now = Instant::now();
        if now >= deadline {
            last_error = Some(ApiError::gateway_timeout());
            break;
        }
        let (index, emergency) = match admit(&r, tried, deadline).await {
            Admission::Go { index, emergency } => (index, emergency),
            Admission::Stop(e) => {
                // Demand: the request wanted every candidate it could not get.
                for (i, c) in r.route.candidates.iter().enumerate().take(MAX_CANDIDATES) {
                    if !tried.contains(i) {
                        c.backend.runtime.demand.record(r.est_tokens);
                    }
                }
                // After a failed attempt, its error explains more than "no capacity".
                if last_error.is_none() || e.status == StatusCode::TOO_MANY_REQUESTS {
                    last_error = Some(e);
                }
                break;
            }
        };
        if attempts > 0 {
            metrics::retry();
        }
        attempts += 1;
        abandoned.set_attempts(attempts);
        tried.insert(index);
        let route = r.route.clone();
        let cand = &route.candidates[index];
        let backend = &cand.backend;
        let guard = InFlight::new(backend.clone());
        backend.runtime.demand.record(r.est_tokens);
        // No attempt follows one that has used up the retries or the candidates.
        let last =
            attempts >= max_attempts || tried.len() >= route.candidates.len().min(MAX_CANDIDATES);
        let Some(mut request) = build_request(&mut r, cand, last) else {
            last_error = Some(ApiError::bad_gateway());
            continue;
        };
        let attempt_span = genai::attempt_span(
            &r.span,
            r.path,
            &cand.native,
            &backend.id,
            &backend.base_url,
            attempts,
        );
        genai::inject(&attempt_span, request.headers_mut());
        let timeout = backend
            .timeout
            .min(deadline.saturating_duration_since(Instant::now()));
        let result = match inner.ready().await {
            Ok(svc) => {
                svc.call(Attempt {
                    request,
                    target: backend.target.clone(),
                    timeout,
                })
                .await
            }
            Err(e) => Err(e),
        };
        if !attempt_span.is_none() {
            end_attempt_span(&attempt_span, &result);
        }
        let now = Instant::now();
        let rt = &backend.runtime;
        match result {
            Ok(res) if res.status() == StatusCode::TOO_MANY_REQUESTS => {
                attempt_metric(backend, "rate_limited");
                let retry_after = res
                    .headers()
                    .get(header::RETRY_AFTER)
                    .and_then(|v| parse_retry_after(v, SystemTime::now()));
                let policy = r.snapshot.pool(backend.pool).cooldown;
                let (until, consecutive) = shared.cooldowns.start_local(
                    &backend.id,
                    &rt.cooldown,
                    &policy,
                    retry_after,
                    now,
                );
                shared.events.signal(Signal::Failure(Failure {
                    at: SystemTime::now(),
                    backend_id: backend.id.clone(),
                    kind: FailureKind::RateLimited,
                    status: Some(429),
                    retry_after,
                    consecutive,
                    cooldown: Some(until.saturating_duration_since(now)),
                    summary: "rate limited (429)",
                }));
                last_error = Some(ApiError::capacity_rate_limited(retry_after_secs(
                    until.saturating_duration_since(now),
                )));
            }
            Ok(res) if res.status().is_server_error() => {
                attempt_metric(backend, "server_error");
                tracing::debug!(backend = %backend.name, status = res.status().as_u16(), "upstream server error");
                shared.events.signal(Signal::failure(
                    &backend.id,
                    FailureKind::ServerError,
                    Some(res.status().as_u16()),
                    "upstream server error",
                ));
                if let Some(until) = rt.outlier.on_failure(&shared.outlier, now) {
                    tracing::warn!(backend = %backend.name, ejected_ms = (until - now).as_millis() as u64, "ejecting failing backend");
                }
                last_error = Some(ApiError::bad_gateway());
            }
            Ok(res) => {
                if res.status().is_success() {
                    cand.metrics(&r.route.model).attempt_success.increment(1);
                } else {
                    attempt_metric(backend, "client_error");
                }
                if rt.cooldown.on_success() > 0 {
                    shared.events.signal(Signal::Recovered {
                        backend_id: backend.id.clone(),
                        at: SystemTime::now(),
                    });
                }
                rt.outlier.on_success(now);
                if emergency {
                    tracing::info!(backend = %backend.name, "emergency admission while cooling");
                }
                return respond(&shared, &r, cand, res, guard, abandoned.disarm());
            }
            Err(e) => {
                attempt_metric(backend, e.label());
                let (kind, summary) = match e {
                    UpstreamError::Connect => (FailureKind::Connect, "connect error"),
                    UpstreamError::Timeout => (FailureKind::Timeout, "no response in time"),
                    UpstreamError::Failed => (
                        FailureKind::ServerError,
                        "connection failed after the request was sent",
                    ),
                };
                shared
                    .events
                    .signal(Signal::failure(&backend.id, kind, None, summary));
                if e == UpstreamError::Connect {
                    // Nothing reached the backend: give its tokens back.
                    rt.rpm.refund(1.0);
                    if backend.tpm.is_some() {
                        rt.tpm.refund(r.est_tokens);
                    }
                }
                if let Some(until) = rt.outlier.on_failure(&shared.outlier, now) {
                    tracing::warn!(backend = %backend.name, ejected_ms = (until - now).as_millis() as u64, "ejecting failing backend");
                }
                last_error = Some(if e == UpstreamError::Timeout {
                    ApiError::gateway_timeout()
                } else {
                    ApiError::bad_gateway()
                });
            }
        }
    }
    let err = last_error.unwrap_or_else(|| ApiError::no_capacity(1));
    abandoned.disarm().proxy_answered(
        &shared.events,
        err.status,
        err.code.unwrap_or(err.kind),
        &r.span,
    );
    err.into_response()
}

/// Records how an attempt ended on its span: the status, and `error.type`
/// for an error status or no response.
fn end_attempt_span(span: &tracing::Span, result: &Result<Response<Incoming>, UpstreamError>) {
    match result {
        Ok(res) => {
            let status = res.status();
            let error =
                (status.is_client_error() || status.is_server_error()).then(|| status.as_str());
            genai::end_attempt(span, Some(status.as_u16()), error);
        }
        Err(e) => genai::end_attempt(span, None, Some(e.label())),
    }
}

fn respond(
    shared: &Arc<Shared>,
    r: &Routed,
    cand: &Candidate,
    res: Response<Incoming>,
    guard: InFlight,
    meta: RequestMeta,
) -> Response<ProxyBody> {
    let (mut parts, body) = res.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let sse = content_type.starts_with("text/event-stream");
    let json = content_type.contains("json");
    if sse {
        // The proxy may append an error event; the length would be wrong.
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    genai::record_backend(
        &r.span,
        &cand.native,
        &cand.backend.id,
        &cand.backend.base_url,
        meta.attempts(),
    );
    let collect = json && !sse && parts.status.is_success();
    let tracker = Tracker::new(
        meta,
        shared.events.clone(),
        guard,
        r,
        cand,
        parts.status,
        collect,
    );
    let success = parts.status.is_success();
    let mut body = UpstreamBody::new(body, sse, tracker);
    if sse
        && success
        && let Some(mode) = r.stream_usage
    {
        body = body.with_scanner(SseUsage::new(mode.strip()));
    }
    if success {
        // A client leaving mid-answer does not stop the accounting.
        body = body.drain_until(r.started + r.route.settings.request_timeout);
    }
    Response::from_parts(parts, ProxyBody::Upstream(body))
}
