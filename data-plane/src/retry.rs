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
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use claw_telemetry::genai;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

use crate::accounting::{Abandoned, Framing, InFlight, RequestMeta};
use crate::body::ProxyBody;
use crate::cooldown::{Cooldowns, parse_retry_after};
use crate::error::{ApiError, retry_after_secs};
use crate::events::{EventSink, Failure, FailureKind, Signal};
use crate::metrics;
use crate::outlier::OutlierPolicy;
use crate::queue::Priority;
use crate::select::{Admission, CandidateSet, MAX_CANDIDATES, admit};
use crate::snapshot::{Backend, Candidate};
use crate::target::Routed;
use crate::upstream::{Attempt, UpstreamError, strip_hop_by_hop};

struct Shared {
    cooldowns: Cooldowns,
    outlier: OutlierPolicy,
    events: EventSink,
}

/// Layer of [`Retry`].
#[derive(Clone)]
pub(crate) struct RetryLayer {
    shared: Arc<Shared>,
}

impl RetryLayer {
    /// Cools through `cooldowns`, ejects per `outlier`, reports to `events`.
    pub(crate) fn new(cooldowns: Cooldowns, outlier: OutlierPolicy, events: EventSink) -> Self {
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
pub(crate) struct Retry<S> {
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

/// Serves `r`: admit → attempt → classify → react, until an answer, the
/// retries, the candidates or the deadline run out.
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
    signal_activity(&shared.events, &r);
    while attempts < max_attempts {
        if Instant::now() >= deadline {
            last_error = Some(ApiError::gateway_timeout());
            break;
        }
        let (index, emergency) = match admit(&r, tried, deadline).await {
            Admission::Go { index, emergency } => (index, emergency),
            Admission::Stop(e) => {
                record_demand(&r, tried);
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
        let in_flight = InFlight::new(cand.backend.clone());
        cand.backend.runtime.demand.record(r.est_tokens);
        // No attempt follows one that has used up the retries or the candidates.
        let last =
            attempts >= max_attempts || tried.len() >= route.candidates.len().min(MAX_CANDIDATES);
        let Some(result) = attempt(&mut inner, &mut r, cand, attempts, last, deadline).await else {
            last_error = Some(ApiError::bad_gateway());
            continue;
        };
        let class = classify(&result, SystemTime::now);
        match react(&shared, &r, cand, emergency, class, result.as_ref().err()) {
            Some(error) => last_error = Some(error),
            // Only a response is classified as the answer.
            None => {
                if let Ok(res) = result {
                    return respond(&shared, &r, cand, res, in_flight, abandoned.disarm());
                }
            }
        }
    }
    let err = last_error.unwrap_or_else(|| ApiError::no_capacity(1));
    let error_type = err.code.unwrap_or(err.kind);
    abandoned
        .disarm()
        .proxy_answered(&shared.events, err.status, error_type, &r.span);
    err.into_response()
}

/// An interactive request tells the control plane its agent is active.
fn signal_activity(events: &EventSink, r: &Routed) {
    if r.priority == Priority::Interactive
        && let Some(agent_id) = &r.agent_id
    {
        events.signal(Signal::Activity {
            agent_id: agent_id.clone(),
            at: SystemTime::now(),
        });
    }
}

/// Demand: a request that gets no (further) attempt wanted every candidate
/// it has not tried.
fn record_demand(r: &Routed, tried: CandidateSet) {
    let cands = r.route.candidates.iter().take(MAX_CANDIDATES);
    for (i, c) in cands.enumerate() {
        if !tried.contains(i) {
            c.backend.runtime.demand.record(r.est_tokens);
        }
    }
}

/// Sends attempt `n` of `r` to `cand` under the attempt's own span; `None`
/// when no request can be built for the backend.
async fn attempt<S>(
    inner: &mut S,
    r: &mut Routed,
    cand: &Candidate,
    n: u32,
    last: bool,
    deadline: Instant,
) -> Option<Result<Response<Incoming>, UpstreamError>>
where
    S: Service<Attempt, Response = Response<Incoming>, Error = UpstreamError>,
{
    let backend = &cand.backend;
    let mut request = build_request(r, cand, last)?;
    let span = genai::attempt_span(
        &r.span,
        r.path,
        &cand.native,
        &backend.id,
        &backend.base_url,
        n,
    );
    genai::inject(&span, request.headers_mut());
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
    if !span.is_none() {
        end_attempt_span(&span, &result);
    }
    Some(result)
}

/// What an attempt's result means for the request: the retry policy's
/// whole decision, apart from its effects ([`react`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AttemptClass {
    /// 429: cool the backend (for its `Retry-After`, if it sent one), try
    /// the next candidate.
    RateLimited {
        /// The upstream's `Retry-After`.
        retry_after: Option<Duration>,
    },
    /// 5xx: counts towards ejection, try the next candidate.
    ServerError(u16),
    /// No connection: nothing reached the backend.
    Connect,
    /// No response head in time.
    Timeout,
    /// The connection failed after the request was sent.
    Failed,
    /// Anything else (2xx, 4xx but 429): the answer, streamed to the client.
    Answer(u16),
}

impl AttemptClass {
    /// `claw_dp_upstream_attempts_total{outcome}`.
    fn outcome(self) -> &'static str {
        match self {
            AttemptClass::RateLimited { .. } => "rate_limited",
            AttemptClass::ServerError(_) => "server_error",
            // As `UpstreamError::label`.
            AttemptClass::Connect => "connect_error",
            AttemptClass::Timeout => "timeout",
            AttemptClass::Failed => "failed",
            AttemptClass::Answer(s) if (200..300).contains(&s) => "success",
            AttemptClass::Answer(_) => "client_error",
        }
    }
}

/// Classifies an attempt's result. Pure: `wall` (the wall clock, for a
/// `Retry-After` date) is read only for a 429 with a `Retry-After`.
fn classify<B>(
    result: &Result<Response<B>, UpstreamError>,
    wall: impl FnOnce() -> SystemTime,
) -> AttemptClass {
    match result {
        Ok(res) if res.status() == StatusCode::TOO_MANY_REQUESTS => AttemptClass::RateLimited {
            retry_after: res
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| parse_retry_after(v, wall())),
        },
        Ok(res) if res.status().is_server_error() => {
            AttemptClass::ServerError(res.status().as_u16())
        }
        Ok(res) => AttemptClass::Answer(res.status().as_u16()),
        Err(UpstreamError::Connect(_)) => AttemptClass::Connect,
        Err(UpstreamError::Timeout) => AttemptClass::Timeout,
        Err(UpstreamError::Failed(_)) => AttemptClass::Failed,
    }
}

/// The effects of an attempt on `cand`, by its class: the attempt metric,
/// the failure signal, the cooldown (429), outlier accounting, the token
/// refund (connect errors). `None` for the answer; otherwise the error the
/// request gets if no attempt follows. `error`, when there was no response,
/// goes into the ejection's log line.
fn react(
    shared: &Shared,
    r: &Routed,
    cand: &Candidate,
    emergency: bool,
    class: AttemptClass,
    error: Option<&UpstreamError>,
) -> Option<ApiError> {
    let backend = &cand.backend;
    let rt = &backend.runtime;
    let now = Instant::now();
    match class {
        AttemptClass::Answer(s) if (200..300).contains(&s) => {
            cand.metrics(&r.route.model).attempt_success.increment(1);
        }
        _ => metrics::upstream_attempt(backend.id.clone(), class.outcome()),
    }
    let (kind, status, summary) = match class {
        AttemptClass::Answer(_) => {
            answered(shared, backend, emergency, now);
            return None;
        }
        AttemptClass::RateLimited { retry_after } => {
            return Some(cool(shared, r, backend, retry_after, now));
        }
        AttemptClass::ServerError(status) => {
            tracing::debug!(backend = %backend.name, status, "upstream server error");
            (
                FailureKind::ServerError,
                Some(status),
                "upstream server error",
            )
        }
        AttemptClass::Connect => (FailureKind::Connect, None, "connect error"),
        AttemptClass::Timeout => (FailureKind::Timeout, None, "no response in time"),
        AttemptClass::Failed => (
            FailureKind::ServerError,
            None,
            "connection failed after the request was sent",
        ),
    };
    shared
        .events
        .signal(Signal::failure(&backend.id, kind, status, summary));
    if class == AttemptClass::Connect {
        // Nothing reached the backend: give its tokens back.
        rt.rpm.refund(1.0);
        if backend.tpm.is_some() {
            rt.tpm.refund(r.est_tokens);
        }
    }
    if let Some(until) = rt.outlier.on_failure(&shared.outlier, now) {
        let cause = error.and_then(std::error::Error::source);
        tracing::warn!(backend = %backend.name, ejected_ms = (until - now).as_millis() as u64, cause = cause.map(tracing::field::display), "ejecting failing backend");
    }
    Some(match class {
        AttemptClass::Timeout => ApiError::gateway_timeout(),
        _ => ApiError::bad_gateway(),
    })
}

/// An answer from `backend`: the end of its 429 run and of its failures.
fn answered(shared: &Shared, backend: &Backend, emergency: bool, now: Instant) {
    let rt = &backend.runtime;
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
}

/// A 429 from `backend`: cools it here (and, through the signal, on the
/// rest of the fleet); the request's error says when to come back.
fn cool(
    shared: &Shared,
    r: &Routed,
    backend: &Backend,
    retry_after: Option<Duration>,
    now: Instant,
) -> ApiError {
    let policy = r.snapshot.pool(backend.pool).cooldown;
    let (until, consecutive) = shared.cooldowns.start_local(
        &backend.id,
        &backend.runtime.cooldown,
        &policy,
        retry_after,
        now,
    );
    let cooldown = until.saturating_duration_since(now);
    shared.events.signal(Signal::Failure(Failure {
        at: SystemTime::now(),
        backend_id: backend.id.clone(),
        kind: FailureKind::RateLimited,
        status: Some(429),
        retry_after,
        consecutive,
        cooldown: Some(cooldown),
        summary: "rate limited (429)",
    }));
    ApiError::capacity_rate_limited(retry_after_secs(cooldown))
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
    let body = crate::accounting::track(
        meta,
        shared.events.clone(),
        guard,
        r,
        cand,
        parts.status,
        Framing { sse, json },
        body,
    );
    Response::from_parts(parts, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, retry_after: Option<String>) -> Result<Response<()>, UpstreamError> {
        let mut res = Response::builder().status(status);
        if let Some(v) = retry_after {
            res = res.header(header::RETRY_AFTER, v);
        }
        Ok(res.body(()).unwrap())
    }

    fn wall() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    fn no_clock() -> SystemTime {
        panic!("the wall clock is read only for a 429 with a Retry-After")
    }

    #[test]
    fn a_429_with_retry_after_is_rate_limited_for_that_long() {
        assert_eq!(
            classify(&answer(429, Some("7".into())), wall),
            AttemptClass::RateLimited {
                retry_after: Some(Duration::from_secs(7))
            }
        );
        let date = httpdate::fmt_http_date(wall() + Duration::from_secs(30));
        assert_eq!(
            classify(&answer(429, Some(date)), wall),
            AttemptClass::RateLimited {
                retry_after: Some(Duration::from_secs(30))
            }
        );
    }

    #[test]
    fn a_429_without_retry_after_is_rate_limited_for_the_policy_to_decide() {
        assert_eq!(
            classify(&answer(429, None), no_clock),
            AttemptClass::RateLimited { retry_after: None }
        );
        assert_eq!(
            classify(&answer(429, Some("soon".into())), wall),
            AttemptClass::RateLimited { retry_after: None }
        );
    }

    #[test]
    fn a_5xx_is_a_server_error() {
        for status in [500, 502, 503, 599] {
            assert_eq!(
                classify(&answer(status, Some("5".into())), no_clock),
                AttemptClass::ServerError(status)
            );
        }
        assert_eq!(AttemptClass::ServerError(500).outcome(), "server_error");
    }

    #[test]
    fn a_connect_error_is_connect_and_a_failure_after_sending_is_failed() {
        assert_eq!(
            classify::<()>(&Err(UpstreamError::Connect("refused".into())), no_clock),
            AttemptClass::Connect
        );
        assert_eq!(
            classify::<()>(&Err(UpstreamError::Failed("reset".into())), no_clock),
            AttemptClass::Failed
        );
        assert_eq!(AttemptClass::Connect.outcome(), "connect_error");
        assert_eq!(AttemptClass::Failed.outcome(), "failed");
    }

    #[test]
    fn a_timeout_is_a_timeout() {
        assert_eq!(
            classify::<()>(&Err(UpstreamError::Timeout), no_clock),
            AttemptClass::Timeout
        );
        assert_eq!(AttemptClass::Timeout.outcome(), "timeout");
    }

    #[test]
    fn success_and_other_client_errors_are_the_answer() {
        assert_eq!(
            classify(&answer(200, None), no_clock),
            AttemptClass::Answer(200)
        );
        assert_eq!(AttemptClass::Answer(200).outcome(), "success");
        for status in [400, 404, 422] {
            assert_eq!(
                classify(&answer(status, None), no_clock),
                AttemptClass::Answer(status)
            );
            assert_eq!(AttemptClass::Answer(status).outcome(), "client_error");
        }
    }
}
