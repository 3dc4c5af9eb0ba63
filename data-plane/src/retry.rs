//! The retry layer: admits each attempt in routing order ([`crate::select`]),
//! sends the attempt through the upstream service, and reacts to the answer.
//!
//! - 429: the backend is cooled at once ([`crate::cooldown`]) and the request
//!   moves to the next candidate. A 429 saying the account's quota is spent
//!   (a `Retry-After` over an hour, or an error type/code naming quota or
//!   billing in the first 64 KiB of its body) marks the backend
//!   quota-exhausted until then (an hour without `Retry-After`) instead.
//! - 529 (provider overloaded): a short local hold (the pool's base
//!   cooldown, at most 5 s, or the `Retry-After`) and the next candidate.
//! - 401/403: the provider rejected the gateway's key for the backend (the
//!   client's key was checked already). The backend is held here until its
//!   key or URL changes (a new snapshot) and, through the failure report,
//!   on every proxy; the request moves to the next candidate. With none
//!   left, the client gets 502 `upstream_auth_failed` naming the backend
//!   (also when every candidate is already held for its key).
//! - 5xx, connect errors, timeouts: count towards outlier ejection
//!   ([`crate::outlier`]) and move to the next candidate.
//! - Anything else is the answer and streams to the client.
//! - A request naming a stored response (`response_id`) tries its owner
//!   first ([`crate::select`]); a backend that answers it does not know the
//!   id (404 to `GET`/`DELETE`, 400/404 `previous_response_not_found` to a
//!   continuation) is passed over without counting a failure and without
//!   using up a retry, until every candidate was asked; the last such
//!   answer is the client's when every candidate was asked and none knows
//!   the id (with one unavailable, it may be the owner: the client gets
//!   the capacity error and its `Retry-After`). Ids are scoped to a
//!   provider account, so this finds the owner from any proxy without
//!   shared state.
//!
//! - A chat or Messages request on a backend of the other protocol is
//!   translated ([`crate::translate`]): the client's body is parsed once,
//!   on the first such attempt (never on the native path), translated per
//!   candidate (its native model, its mapping's `max_tokens`), and sent to
//!   the backend's own path. A field the backend cannot express
//!   ([`Refused`]) is a 400 in the client's shape naming it, unless the
//!   candidate is in the fallback pool and the route has a native
//!   candidate: then the candidate is passed over (no failure, no retry
//!   used, its rate-limit token given back). The answer is translated back
//!   ([`respond`]): JSON and errors whole, streams event by event.
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

use crate::accounting::{self, Abandoned, Framing, InFlight, RequestMeta};
use crate::body::ProxyBody;
use crate::cooldown::{Cooldowns, QUOTA_HOLD_MAX, parse_retry_after};
use crate::error::{ApiError, retry_after_secs};
use crate::events::{EventSink, Failure, FailureKind, Signal};
use crate::metrics;
use crate::outlier::OutlierPolicy;
use crate::queue::Priority;
use crate::select::{Admission, CandidateSet, MAX_CANDIDATES, admit};
use crate::snapshot::Api;
use crate::snapshot::{Backend, Candidate};
use crate::target::{Endpoint, RequestBody, Routed};
use crate::translate::{self, Refused, RequestOptions, TranslatedRequest};
use crate::upstream::{Attempt, UpstreamError, strip_hop_by_hop};
use claw_proto::Pool;

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
///
/// The backend's key goes in its protocol's header (`Authorization: Bearer`
/// or `x-api-key`, [`crate::snapshot::Credential`]); an `anthropic` backend
/// also gets `anthropic-version: 2023-06-01` unless the client sent one.
/// The client's own credentials never reach here
/// ([`crate::upstream::upstream_headers`]).
///
/// A `translated` body goes to the backend's own path (`/messages` or
/// `/chat/completions`, without the client's query), as JSON, uncompressed
/// (the answer is translated too).
fn build_request(
    r: &mut Routed,
    c: &Candidate,
    last: bool,
    translated: Option<Bytes>,
) -> Option<Request<Full<Bytes>>> {
    let target = &c.backend.target;
    let is_translated = translated.is_some();
    let uri = match (r.endpoint.by_response_id(), r.response_id.as_deref()) {
        _ if is_translated => target.uri(backend_path(c.backend.api), None)?,
        (true, Some(id)) => target.uri(&format!("{}/{id}", r.path), r.query.as_deref())?,
        (true, None) => return None,
        (false, _) => target.uri(r.path, r.query.as_deref())?,
    };
    let bytes = match translated {
        Some(b) => b,
        None => r.body.with_model(&c.native)?,
    };
    let mut req = Request::new(Full::new(bytes));
    *req.method_mut() = r.endpoint.method();
    *req.uri_mut() = uri;
    *req.headers_mut() = if last {
        std::mem::take(&mut r.headers)
    } else {
        r.headers.clone()
    };
    let h = req.headers_mut();
    if matches!(r.body, RequestBody::Empty) {
        h.remove(header::CONTENT_TYPE);
    }
    if is_translated {
        h.insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        h.remove(header::ACCEPT_ENCODING);
    }
    let credential = &c.backend.credential;
    h.insert(credential.name.clone(), credential.value.clone());
    if c.backend.api == Api::Anthropic && !h.contains_key(ANTHROPIC_VERSION) {
        h.insert(
            ANTHROPIC_VERSION,
            http::HeaderValue::from_static(DEFAULT_ANTHROPIC_VERSION),
        );
    }
    h.insert(header::HOST, target.host().clone());
    Some(req)
}

/// The path after the base URL a translated request goes to: the
/// backend's protocol's chat endpoint.
fn backend_path(api: Api) -> &'static str {
    match api {
        Api::OpenAi => Endpoint::ChatCompletions.upstream_path(),
        Api::Anthropic => Endpoint::Messages.upstream_path(),
    }
}

/// Why a translated attempt has no body.
#[derive(Debug)]
enum Untranslated {
    /// A field the backend's protocol cannot express.
    Refused(Refused),
    /// The client's body is not a JSON object, or the endpoint does not
    /// translate (a route never mixes protocols for it).
    Invalid,
}

impl Untranslated {
    /// The client's error.
    fn error(self) -> ApiError {
        match self {
            Untranslated::Refused(f) => ApiError::untranslatable(&f.field, &f.message),
            Untranslated::Invalid => {
                ApiError::bad_request("The request body must be a JSON object.")
            }
        }
    }
}

/// The body of `r` translated for `c`, a backend of the other protocol:
/// from the client's body parsed once per request ([`Routed::parsed_body`]),
/// with `c`'s native model and its mapping's `max_tokens` as the default
/// (Anthropic requires one).
fn translate_request(r: &mut Routed, c: &Candidate) -> Result<TranslatedRequest, Untranslated> {
    let opts = RequestOptions {
        native_model: &c.native,
        default_max_tokens: c.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
    };
    let endpoint = r.endpoint;
    let body = r.parsed_body().ok_or(Untranslated::Invalid)?;
    let out = match endpoint {
        Endpoint::ChatCompletions => translate::to_messages::request(body, &opts),
        Endpoint::Messages => translate::to_chat::request(body, &opts),
        _ => return Err(Untranslated::Invalid),
    };
    out.map_err(Untranslated::Refused)
}

/// `max_tokens` of a request translated for an Anthropic backend when
/// neither the client nor the model mapping set one.
const DEFAULT_MAX_TOKENS: u32 = 4096;

/// Whether `route` has a candidate speaking `api` natively.
fn has_native(route: &crate::snapshot::Route, api: Api) -> bool {
    route.candidates.iter().any(|c| c.backend.api == api)
}

/// Gives back the request an admitted candidate counted for an attempt that
/// was not made (its tpm tokens go back with its [`accounting::Reservation`]).
fn give_back(c: &Candidate, emergency: bool) {
    let rt = &c.backend.runtime;
    if emergency {
        rt.emergency.refund(1.0);
        return;
    }
    rt.rpm.refund(1.0);
}

/// The Anthropic API version header.
const ANTHROPIC_VERSION: http::HeaderName = http::HeaderName::from_static("anthropic-version");
/// The version sent when the client named none.
const DEFAULT_ANTHROPIC_VERSION: &str = "2023-06-01";

/// How much of an answer's body is read to classify it (a 429's error type,
/// a response-id miss).
const CLASSIFY_BODY_BYTES: usize = 64 * 1024;
/// How long reading that body may take.
const CLASSIFY_BODY_TIME: Duration = Duration::from_secs(5);
/// A 429 whose `Retry-After` is longer is a spent quota, not a rate limit.
const QUOTA_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// How long a spent quota holds a backend without a `Retry-After`.
const QUOTA_DEFAULT: Duration = Duration::from_secs(3600);
/// The longest default hold after a 529.
const OVERLOADED_MAX: Duration = Duration::from_secs(5);

/// Up to [`CLASSIFY_BODY_BYTES`] of `body`, read until `deadline` (at most
/// [`CLASSIFY_BODY_TIME`]); what arrived in time on a timeout or error.
async fn read_prefix(body: Incoming, deadline: Instant) -> Bytes {
    use http_body_util::BodyExt as _;
    let until = deadline.min(Instant::now() + CLASSIFY_BODY_TIME);
    let mut body = std::pin::pin!(body);
    let mut buf = bytes::BytesMut::new();
    while buf.len() < CLASSIFY_BODY_BYTES {
        match tokio::time::timeout_at(until, body.frame()).await {
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    let room = CLASSIFY_BODY_BYTES - buf.len();
                    buf.extend_from_slice(&data[..data.len().min(room)]);
                }
            }
            _ => break,
        }
    }
    buf.freeze()
}

/// An attempt's result, its body read when classifying needed it.
enum Read {
    /// The response as it came (its body still to stream), or no response.
    Streaming(Result<Response<Incoming>, UpstreamError>),
    /// The response head and its body's first [`CLASSIFY_BODY_BYTES`].
    Buffered(http::response::Parts, Bytes),
}

impl Read {
    /// The upstream status, if a response came.
    fn status(&self) -> Option<u16> {
        match self {
            Read::Streaming(Ok(res)) => Some(res.status().as_u16()),
            Read::Streaming(Err(_)) => None,
            Read::Buffered(parts, _) => Some(parts.status.as_u16()),
        }
    }

    /// The provider's own request id (its `x-request-id`, as OpenAI and
    /// Anthropic send), for a support ticket about a failure.
    fn upstream_request_id(&self) -> Option<String> {
        let headers = match self {
            Read::Streaming(Ok(res)) => res.headers(),
            Read::Streaming(Err(_)) => return None,
            Read::Buffered(parts, _) => &parts.headers,
        };
        let v = headers
            .get("x-request-id")
            .or_else(|| headers.get("request-id"))?;
        let v = v.to_str().ok()?;
        Some(v.chars().take(128).collect())
    }
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
    let wire = r.endpoint.wire();
    let probe = Probe::of(&r);
    let mut tried = CandidateSet::default();
    let mut attempts: u32 = 0;
    // Attempts that only learned a backend does not know the response id:
    // they use up no retry.
    let mut probes: u32 = 0;
    let mut failed = false;
    let mut unknown: Option<(http::response::Parts, Bytes)> = None;
    let mut last_error: Option<ApiError> = None;
    let mut abandoned = Abandoned::new(&shared.events, RequestMeta::new(&r));
    signal_activity(&shared.events, &r);
    while attempts - probes < max_attempts {
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
                    last_error = all_auth_failed(&r).or(Some(e));
                }
                break;
            }
        };
        let route = r.route.clone();
        let cand = &route.candidates[index];
        // The tpm tokens the admission took: every way out of this
        // iteration but a successful answer's settlement refunds them.
        let reservation = accounting::Reservation::new(cand, r.est_tokens, emergency);
        let translated = if accounting::is_translated(&r, cand) {
            match translate_request(&mut r, cand) {
                Ok(t) => {
                    metrics::cache_control_dropped(t.dropped_cache_control);
                    Some(Bytes::from(t.body))
                }
                Err(Untranslated::Refused(f))
                    if cand.backend.pool == Pool::Fallback
                        && has_native(&route, r.endpoint.api()) =>
                {
                    // A native candidate can serve it: not a failure.
                    tracing::debug!(backend = %cand.backend.name, field = %f.field, "untranslatable request passed over to a native candidate");
                    give_back(cand, emergency);
                    tried.insert(index);
                    continue;
                }
                Err(e) => {
                    give_back(cand, emergency);
                    let err = e.error();
                    abandoned.disarm().proxy_answered(
                        &shared.events,
                        err.status,
                        err.code.unwrap_or(err.kind),
                        &r.span,
                    );
                    return err.into_response_for(wire);
                }
            }
        } else {
            None
        };
        if attempts > 0 {
            metrics::retry();
        }
        attempts += 1;
        abandoned.set_attempts(attempts);
        tried.insert(index);
        let in_flight = InFlight::new(cand.backend.clone());
        cand.backend.runtime.demand.record(r.est_tokens);
        // No attempt follows one that has used up the retries or the
        // candidates (a probe for a response id may use up no retry).
        let out_of_candidates = tried.len() >= route.candidates.len().min(MAX_CANDIDATES);
        let last = out_of_candidates || (probe == Probe::None && attempts >= max_attempts);
        let sent = attempt(
            &mut inner, &mut r, cand, attempts, last, deadline, translated,
        );
        let Some(result) = sent.await else {
            last_error = Some(ApiError::bad_gateway());
            continue;
        };
        let mut class = classify(&result, SystemTime::now, probe);
        let result = match result {
            Ok(res) if class.needs_body(probe) => {
                let (parts, body) = res.into_parts();
                let bytes = read_prefix(body, deadline).await;
                class = refine(class, &bytes);
                Read::Buffered(parts, bytes)
            }
            other => Read::Streaming(other),
        };
        if let AttemptClass::ResponseUnknown(_) = class {
            // Not this backend's response: no failure, no retry used.
            metrics::upstream_attempt(cand.backend.id.clone(), class.outcome());
            probes += 1;
            if let Read::Buffered(parts, bytes) = result {
                unknown = Some((parts, bytes));
            }
            continue;
        }
        let error = match &result {
            Read::Streaming(Err(e)) => Some(e),
            _ => None,
        };
        match react(&shared, &r, cand, emergency, class, error) {
            Some(error) => {
                let upstream = FailedAttempt {
                    status: result.status(),
                    error: error_text(&result),
                    upstream_request_id: result.upstream_request_id(),
                };
                log_failure(&r, cand, attempts, !last, class, upstream);
                failed = true;
                last_error = Some(error);
            }
            None => match result {
                Read::Streaming(Ok(res)) => {
                    if attempts > 1 {
                        tracing::info!(request_id = %r.request_id, model = %r.route.model, backend = %cand.backend.name, backend_id = %cand.backend.id, attempts, "answered after a retry");
                    }
                    let meta = abandoned.disarm();
                    let held = (in_flight, reservation);
                    return respond(&shared, &r, cand, res, held, meta, deadline).await;
                }
                Read::Buffered(parts, bytes) => {
                    let bytes = if accounting::is_translated(&r, cand) {
                        translated_error(&r, cand, parts.status, &bytes)
                    } else {
                        bytes
                    };
                    return buffered(&shared, &r, parts, bytes, abandoned.disarm());
                }
                // Only a response is classified as the answer.
                Read::Streaming(Err(_)) => {}
            },
        }
    }
    // Every candidate asked, none failed, none knows the id: the last
    // one's answer says so. A candidate not asked (cooling, ejected, at its
    // limit) may be the owner: the client gets the capacity error and
    // comes back.
    let all_asked = tried.len() >= r.route.candidates.len().min(MAX_CANDIDATES);
    if let Some((parts, bytes)) = unknown
        && !failed
        && all_asked
    {
        return buffered(&shared, &r, parts, bytes, abandoned.disarm());
    }
    let err = last_error.unwrap_or_else(|| ApiError::no_capacity(1));
    let error_type = err.code.unwrap_or(err.kind);
    abandoned
        .disarm()
        .proxy_answered(&shared.events, err.status, error_type, &r.span);
    err.into_response_for(wire)
}

/// What the log line of a failed attempt says about the upstream's side.
struct FailedAttempt {
    /// Its status, if it answered.
    status: Option<u16>,
    /// The error, with its cause, if it did not.
    error: Option<String>,
    /// Its own id for the request, if it sent one.
    upstream_request_id: Option<String>,
}

/// Logs a failed attempt, once, with what an operator needs to find it:
/// the request id the client got, the model, the backend's name and id, the
/// status or error (and the provider's own request id), and whether another
/// candidate may still be tried. A backend fault (5xx, no connection, no
/// answer, a cut connection, a refused key) is a warning even when a retry
/// hides it from the client; a capacity signal (429, 529) is info, its
/// cooldown logs on its own.
fn log_failure(
    r: &Routed,
    cand: &Candidate,
    attempt: u32,
    retrying: bool,
    class: AttemptClass,
    failed: FailedAttempt,
) {
    let backend = &cand.backend;
    let FailedAttempt {
        status,
        error,
        upstream_request_id,
    } = failed;
    macro_rules! line {
        ($level:ident) => {
            tracing::$level!(
                request_id = %r.request_id,
                model = %r.route.model,
                backend = %backend.name,
                backend_id = %backend.id,
                attempt,
                status,
                error = error.as_deref(),
                upstream_request_id = upstream_request_id.as_deref(),
                outcome = class.outcome(),
                retrying,
                "upstream attempt failed"
            )
        };
    }
    match class {
        AttemptClass::RateLimited { .. }
        | AttemptClass::QuotaExhausted { .. }
        | AttemptClass::Overloaded { .. } => line!(info),
        _ => line!(warn),
    }
}

/// The error of an attempt that got no response, with its cause.
fn error_text(result: &Read) -> Option<String> {
    let Read::Streaming(Err(e)) = result else {
        return None;
    };
    Some(match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    })
}

/// An upstream answer whose body was read to classify it, passed to the
/// client as it came (it is an error answer: no usage to account).
fn buffered(
    shared: &Arc<Shared>,
    r: &Routed,
    mut parts: http::response::Parts,
    bytes: Bytes,
    meta: RequestMeta,
) -> Response<ProxyBody> {
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::CONTENT_LENGTH);
    meta.proxy_answered(&shared.events, parts.status, "upstream_error", &r.span);
    Response::from_parts(parts, ProxyBody::full(bytes))
}

/// An interactive request tells the control plane its agent is active; a
/// heartbeat run never does, whatever priority it was sent with (the
/// scheduler would otherwise skip the agent's next heartbeat as busy).
fn signal_activity(events: &EventSink, r: &Routed) {
    if r.priority == Priority::Interactive
        && r.run_kind != crate::run_kind::RunKind::Heartbeat
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
    translated: Option<Bytes>,
) -> Option<Result<Response<Incoming>, UpstreamError>>
where
    S: Service<Attempt, Response = Response<Incoming>, Error = UpstreamError>,
{
    let backend = &cand.backend;
    let mut request = build_request(r, cand, last, translated)?;
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

/// Whether (and how) a request names a stored response, which changes what
/// a 404 or 400 means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    /// It names none.
    None,
    /// `GET`/`DELETE /v1/responses/{id}`: a 404 is "not mine".
    ById,
    /// `POST /v1/responses` with `previous_response_id`: a 400/404 with
    /// code `previous_response_not_found` is "not mine".
    Previous,
}

impl Probe {
    fn of(r: &Routed) -> Probe {
        match (r.endpoint, &r.response_id) {
            (_, None) => Probe::None,
            (Endpoint::ResponsesGet | Endpoint::ResponsesDelete, Some(_)) => Probe::ById,
            (Endpoint::Responses, Some(_)) => Probe::Previous,
            _ => Probe::None,
        }
    }
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
    /// 429 saying the quota is spent: hold the backend for `until`, try the
    /// next candidate.
    QuotaExhausted {
        /// The upstream's `Retry-After`: how long the quota stays spent
        /// (an hour without one).
        retry_after: Option<Duration>,
    },
    /// 529: hold the backend briefly, try the next candidate.
    Overloaded {
        /// The upstream's `Retry-After`.
        retry_after: Option<Duration>,
    },
    /// The backend does not know the stored response the request names:
    /// try the next candidate, no failure counted.
    ResponseUnknown(u16),
    /// 401/403: the provider rejected the gateway's key for the backend.
    /// Hold it until its key or URL changes, try the next candidate.
    AuthFailed(u16),
    /// 5xx: counts towards ejection, try the next candidate.
    ServerError(u16),
    /// No connection: nothing reached the backend.
    Connect,
    /// No response head in time.
    Timeout,
    /// The connection failed after the request was sent.
    Failed,
    /// A status outside 100–599: a failure like a 5xx, never passed on.
    InvalidStatus,
    /// Anything else (2xx, 4xx but 429): the answer, streamed to the client.
    Answer(u16),
}

impl AttemptClass {
    /// `claw_dp_upstream_attempts_total{outcome}`.
    fn outcome(self) -> &'static str {
        match self {
            AttemptClass::RateLimited { .. } => "rate_limited",
            AttemptClass::QuotaExhausted { .. } => "quota_exhausted",
            AttemptClass::Overloaded { .. } => "overloaded",
            AttemptClass::ResponseUnknown(_) => "response_unknown",
            AttemptClass::AuthFailed(_) => "auth_failed",
            AttemptClass::ServerError(_) | AttemptClass::InvalidStatus => "server_error",
            // As `UpstreamError::label`.
            AttemptClass::Connect => "connect_error",
            AttemptClass::Timeout => "timeout",
            AttemptClass::Failed => "failed",
            AttemptClass::Answer(s) if (200..300).contains(&s) => "success",
            AttemptClass::Answer(_) => "client_error",
        }
    }

    /// Whether the body decides the class ([`refine`]): a 429 (quota?), a
    /// continuation's 400/404 (unknown previous response?), and a by-id
    /// 404 (kept as the answer should no backend know the id).
    fn needs_body(self, probe: Probe) -> bool {
        match self {
            AttemptClass::RateLimited { .. } | AttemptClass::ResponseUnknown(_) => true,
            AttemptClass::Answer(400 | 404) => probe == Probe::Previous,
            _ => false,
        }
    }
}

/// Classifies an attempt's result by its head. Pure: `wall` (the wall
/// clock, for a `Retry-After` date) is read only for a 429 or 529 with a
/// `Retry-After`. [`refine`] may change the class by the body.
fn classify<B>(
    result: &Result<Response<B>, UpstreamError>,
    wall: impl FnOnce() -> SystemTime,
    probe: Probe,
) -> AttemptClass {
    let retry_after = |res: &Response<B>| {
        res.headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| parse_retry_after(v, wall()))
    };
    match result {
        Ok(res) if res.status() == StatusCode::TOO_MANY_REQUESTS => match retry_after(res) {
            Some(d) if d > QUOTA_RETRY_AFTER => AttemptClass::QuotaExhausted {
                retry_after: Some(d),
            },
            retry_after => AttemptClass::RateLimited { retry_after },
        },
        Ok(res) if res.status().as_u16() == 529 => AttemptClass::Overloaded {
            retry_after: retry_after(res),
        },
        Ok(res) if matches!(res.status().as_u16(), 401 | 403) => {
            AttemptClass::AuthFailed(res.status().as_u16())
        }
        Ok(res) if res.status().is_server_error() => {
            AttemptClass::ServerError(res.status().as_u16())
        }
        Ok(res) if res.status() == StatusCode::NOT_FOUND && probe == Probe::ById => {
            AttemptClass::ResponseUnknown(404)
        }
        Ok(res) => AttemptClass::Answer(res.status().as_u16()),
        Err(UpstreamError::Connect(_)) => AttemptClass::Connect,
        Err(UpstreamError::Timeout) => AttemptClass::Timeout,
        Err(UpstreamError::Failed(_)) => AttemptClass::Failed,
        Err(UpstreamError::InvalidStatus(_)) => AttemptClass::InvalidStatus,
    }
}

/// Refines a head's class by the first bytes of the body: a 429 whose
/// error names a quota or billing is [`AttemptClass::QuotaExhausted`] (for
/// its `Retry-After`, else an hour: [`QUOTA_DEFAULT`]); a 400/404 with code
/// `previous_response_not_found` is [`AttemptClass::ResponseUnknown`].
fn refine(class: AttemptClass, body: &[u8]) -> AttemptClass {
    match class {
        AttemptClass::RateLimited { retry_after } if names_quota(body) => {
            AttemptClass::QuotaExhausted { retry_after }
        }
        AttemptClass::Answer(status @ (400 | 404))
            if error_fields(body).any(|f| f == "previous_response_not_found") =>
        {
            AttemptClass::ResponseUnknown(status)
        }
        other => other,
    }
}

/// The `type` and `code` strings of an error body: OpenAI's
/// `{"error":{"type","code"}}` and Anthropic's `{"type":"error","error":{"type"}}`.
fn error_fields(body: &[u8]) -> impl Iterator<Item = String> {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let e = &v["error"];
    [&e["type"], &e["code"]]
        .into_iter()
        .filter_map(|f| f.as_str().map(str::to_ascii_lowercase))
        .collect::<Vec<_>>()
        .into_iter()
}

/// Whether an error body's type or code names a spent quota or billing
/// (`insufficient_quota`, `billing_error`, …).
fn names_quota(body: &[u8]) -> bool {
    error_fields(body).any(|f| f.contains("quota") || f.contains("billing"))
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
        AttemptClass::QuotaExhausted { retry_after } => {
            return Some(exhaust(shared, r, backend, retry_after, now));
        }
        AttemptClass::Overloaded { retry_after } => {
            return Some(overloaded(shared, r, backend, retry_after, now));
        }
        AttemptClass::AuthFailed(status) => {
            return Some(auth_failed(shared, backend, status, now));
        }
        // Handled by the caller (no failure); the error is never used.
        AttemptClass::ResponseUnknown(_) => return Some(ApiError::bad_gateway()),
        AttemptClass::ServerError(status) => (
            FailureKind::ServerError,
            Some(status),
            "upstream server error",
        ),
        AttemptClass::Connect => (FailureKind::Connect, None, "connect error"),
        AttemptClass::Timeout => (FailureKind::Timeout, None, "no response in time"),
        AttemptClass::Failed => (
            FailureKind::ServerError,
            None,
            "connection failed after the request was sent",
        ),
        AttemptClass::InvalidStatus => (
            FailureKind::ServerError,
            None,
            "upstream answered an invalid HTTP status",
        ),
    };
    if class == AttemptClass::Connect {
        // Nothing reached the backend: give its request back (its tpm
        // tokens go back with the attempt's reservation, as for every
        // failed attempt).
        rt.rpm.refund(1.0);
    }
    let ejected = rt.outlier.on_failure(&shared.outlier, now).map(|until| {
        let d = until.saturating_duration_since(now);
        let cause = error.and_then(std::error::Error::source);
        tracing::warn!(request_id = %r.request_id, model = %r.route.model, backend = %backend.name, backend_id = %backend.id, ejected_ms = d.as_millis() as u64, cause = cause.map(tracing::field::display), "ejecting failing backend");
        d
    });
    // The report carries the ejection, so the control plane can eject the
    // backend fleet-wide.
    shared
        .events
        .signal(Signal::failure(&backend.id, kind, status, summary).with_ejection(ejected));
    Some(match class {
        AttemptClass::Timeout => ApiError::gateway_timeout(),
        AttemptClass::InvalidStatus => ApiError::upstream_invalid_status(&backend.name),
        _ => ApiError::bad_gateway(),
    })
}

/// An answer from `backend`: the end of its 429 run and of its failures.
/// Either ending is reported (one `BackendSuccess`), so the control plane
/// resets the fleet-wide counts too.
fn answered(shared: &Shared, backend: &Backend, emergency: bool, now: Instant) {
    let rt = &backend.runtime;
    let after_429s = rt.cooldown.on_success() > 0;
    let after_failures = rt.outlier.on_success(now);
    if after_429s || after_failures {
        shared.events.signal(Signal::Recovered {
            backend_id: backend.id.clone(),
            at: SystemTime::now(),
        });
    }
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
    // Capped at cooldown_max by the cooldown itself: the real wait.
    let cooldown = until.saturating_duration_since(now);
    shared.events.signal(Signal::Failure(Failure {
        at: SystemTime::now(),
        backend_id: backend.id.clone(),
        kind: FailureKind::RateLimited,
        status: Some(429),
        retry_after,
        consecutive,
        cooldown: Some(cooldown),
        ejected: None,
        summary: "rate limited (429)",
    }));
    ApiError::capacity_rate_limited(retry_after_secs(cooldown))
}

/// A 429 saying `backend`'s quota is spent: it is held for `d` here (and,
/// through the signal and the control plane, on the rest of the fleet).
fn exhaust(
    shared: &Shared,
    r: &Routed,
    backend: &Backend,
    retry_after: Option<Duration>,
    now: Instant,
) -> ApiError {
    // At most an hour ([`QUOTA_HOLD_MAX`], the quota rule: see there).
    let d = retry_after.unwrap_or(QUOTA_DEFAULT).min(QUOTA_HOLD_MAX);
    let until = shared
        .cooldowns
        .exhaust_local(&backend.id, &backend.runtime.cooldown, d, now);
    let cooldown = until.saturating_duration_since(now);
    shared.events.signal(Signal::Failure(Failure {
        at: SystemTime::now(),
        backend_id: backend.id.clone(),
        kind: FailureKind::QuotaExhausted,
        status: Some(429),
        retry_after,
        consecutive: backend.runtime.cooldown.consecutive(),
        cooldown: Some(cooldown),
        ejected: None,
        summary: "quota exhausted (429)",
    }));
    // The client is told no more than the pool's longest cooldown.
    let cap = r.snapshot.pool(backend.pool).cooldown.cap();
    ApiError::capacity_rate_limited(retry_after_secs(cooldown.min(cap)))
}

/// A 401/403 from `backend`: the provider rejected the gateway's key. It
/// is held here until its key or URL changes (a new snapshot) and, through
/// the signal and the control plane, on the rest of the fleet. The error
/// names the backend: the client's key was fine.
fn auth_failed(shared: &Shared, backend: &Backend, status: u16, now: Instant) -> ApiError {
    if backend.runtime.cooldown.fail_auth(status, now) {
        tracing::error!(backend = %backend.name, backend_id = %backend.id, status, "upstream rejected the gateway's provider key: backend excluded until its key or URL is updated");
    }
    shared.events.signal(Signal::Failure(Failure {
        at: SystemTime::now(),
        backend_id: backend.id.clone(),
        kind: FailureKind::AuthFailed,
        status: Some(status),
        retry_after: None,
        consecutive: 0,
        cooldown: None,
        ejected: None,
        summary: if status == 403 {
            "provider key rejected (403)"
        } else {
            "provider key rejected (401)"
        },
    }));
    ApiError::upstream_auth_failed(&backend.name, status)
}

/// The error for a request every candidate of which is held for a
/// rejected key: the first one's, so the client (and whoever reads its
/// logs) learns which backend's key to fix rather than "no capacity".
fn all_auth_failed(r: &Routed) -> Option<ApiError> {
    let cands = &r.route.candidates[..r.route.candidates.len().min(MAX_CANDIDATES)];
    let mut failed = cands
        .iter()
        .map(|c| (c, c.backend.runtime.cooldown.auth_failed()));
    let (first, status) = failed.next()?;
    let status = status?;
    failed
        .all(|(_, s)| s.is_some())
        .then(|| ApiError::upstream_auth_failed(&first.backend.name, status))
}

/// A 529 from `backend`: held here for its `Retry-After`, else the pool's
/// base cooldown (at most [`OVERLOADED_MAX`]), without counting a 429.
fn overloaded(
    shared: &Shared,
    r: &Routed,
    backend: &Backend,
    retry_after: Option<Duration>,
    now: Instant,
) -> ApiError {
    let policy = r.snapshot.pool(backend.pool).cooldown;
    // The upstream's word, but never beyond the pool's cooldown_max.
    let d = retry_after.map_or_else(|| policy.base.min(OVERLOADED_MAX), |d| d.min(policy.cap()));
    backend.runtime.cooldown.hold(now + d);
    tracing::info!(request_id = %r.request_id, backend = %backend.name, backend_id = %backend.id, hold_ms = d.as_millis() as u64, "holding overloaded backend (529)");
    shared.events.signal(Signal::Failure(Failure {
        at: SystemTime::now(),
        backend_id: backend.id.clone(),
        kind: FailureKind::Overloaded,
        status: Some(529),
        retry_after,
        consecutive: 0,
        cooldown: Some(d),
        ejected: None,
        summary: "upstream overloaded (529)",
    }));
    ApiError::no_capacity(retry_after_secs(d))
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

/// The client's answer: the upstream's, tracked to its end
/// ([`crate::accounting::track`]) and, for a translated request, translated
/// ([`translated_answer`]).
async fn respond(
    shared: &Arc<Shared>,
    r: &Routed,
    cand: &Candidate,
    res: Response<Incoming>,
    (guard, reservation): (InFlight, accounting::Reservation),
    meta: RequestMeta,
    deadline: Instant,
) -> Response<ProxyBody> {
    let translated = accounting::is_translated(r, cand);
    let meta = if translated { meta.translated() } else { meta };
    let (mut parts, body) = res.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let sse = content_type.starts_with("text/event-stream");
    // A translated answer that is not a stream is read as JSON whatever
    // its content-type says: it is translated as JSON.
    let json = content_type.contains("json") || (translated && !sse);
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
        reservation,
    );
    if !translated {
        return Response::from_parts(parts, ProxyBody::Upstream(body));
    }
    metrics::translated(r.endpoint.api().name(), cand.backend.api.name());
    translated_answer(r, cand, parts, body, sse, deadline).await
}

/// The largest successful JSON answer translated (read whole).
const MAX_TRANSLATED_BODY: usize = 8 * 1024 * 1024;

/// A translated request's answer for the client: a successful stream is
/// translated event by event on its way (the tracked body's translator);
/// a JSON answer is read whole (up to [`MAX_TRANSLATED_BODY`], by the
/// request deadline) and translated, an error answer up to
/// [`CLASSIFY_BODY_BYTES`] into the client's error shape. A JSON answer
/// that cannot be read or translated is a 502.
async fn translated_answer(
    r: &Routed,
    cand: &Candidate,
    mut parts: http::response::Parts,
    body: crate::stream::UpstreamBody<Incoming, crate::accounting::Tracker>,
    sse: bool,
    deadline: Instant,
) -> Response<ProxyBody> {
    let status = parts.status;
    parts.headers.remove(header::CONTENT_LENGTH);
    if status.is_success() && sse {
        return Response::from_parts(parts, ProxyBody::Upstream(body));
    }
    let cap = if status.is_success() {
        MAX_TRANSLATED_BODY
    } else {
        CLASSIFY_BODY_BYTES
    };
    let (bytes, complete) = read_upto(body, cap, deadline).await;
    let out = if status.is_success() {
        let out = complete.then(|| translate_response(r, &bytes)).flatten();
        let Some(out) = out else {
            tracing::warn!(backend = %cand.backend.name, status = status.as_u16(), complete, "upstream answer could not be translated");
            return ApiError::bad_gateway().into_response_for(r.endpoint.wire());
        };
        out
    } else {
        translated_error(r, cand, status, &bytes)
    };
    parts.headers.remove(header::CONTENT_ENCODING);
    parts.headers.insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, ProxyBody::full(out))
}

/// Up to `cap` bytes of `body`, read until `until`; whether that was all of
/// it (the body ended cleanly, within the cap and in time).
async fn read_upto<B>(body: B, cap: usize, until: Instant) -> (Bytes, bool)
where
    B: hyper::body::Body<Data = Bytes>,
{
    use http_body_util::BodyExt as _;
    let mut body = std::pin::pin!(body);
    let mut buf = bytes::BytesMut::new();
    loop {
        match tokio::time::timeout_at(until, body.frame()).await {
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    let room = cap - buf.len();
                    if data.len() > room {
                        buf.extend_from_slice(&data[..room]);
                        return (buf.freeze(), false);
                    }
                    buf.extend_from_slice(&data);
                }
            }
            Ok(None) => return (buf.freeze(), true),
            Ok(Some(Err(_))) | Err(_) => return (buf.freeze(), false),
        }
    }
}

/// The client's JSON answer for a translated request's JSON answer
/// `body`; `None` when it is not one of the backend's protocol.
fn translate_response(r: &Routed, body: &[u8]) -> Option<Bytes> {
    let model = &*r.route.model;
    let out = match r.endpoint {
        Endpoint::ChatCompletions => translate::to_messages::response(body, model),
        Endpoint::Messages => translate::to_chat::response(body, model),
        _ => None,
    };
    out.map(Bytes::from)
}

/// The client's error body for a translated request's error answer
/// (`status`, `body`, from `cand`): the translation's, or the proxy's own
/// error of that status in the client's shape should the translation give
/// nothing.
fn translated_error(r: &Routed, cand: &Candidate, status: StatusCode, body: &[u8]) -> Bytes {
    let out = match r.endpoint {
        Endpoint::ChatCompletions => translate::to_messages::error(status.as_u16(), body),
        Endpoint::Messages => translate::to_chat::error(status.as_u16(), body),
        _ => Vec::new(),
    };
    if out.is_empty() {
        tracing::debug!(backend = %cand.backend.name, status = status.as_u16(), "untranslated upstream error");
        return ApiError::upstream_status(status).body_for(r.endpoint.wire());
    }
    Bytes::from(out)
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
            classify(&answer(429, Some("7".into())), wall, Probe::None),
            AttemptClass::RateLimited {
                retry_after: Some(Duration::from_secs(7))
            }
        );
        let date = httpdate::fmt_http_date(wall() + Duration::from_secs(30));
        assert_eq!(
            classify(&answer(429, Some(date)), wall, Probe::None),
            AttemptClass::RateLimited {
                retry_after: Some(Duration::from_secs(30))
            }
        );
    }

    #[test]
    fn a_429_without_retry_after_is_rate_limited_for_the_policy_to_decide() {
        assert_eq!(
            classify(&answer(429, None), no_clock, Probe::None),
            AttemptClass::RateLimited { retry_after: None }
        );
        assert_eq!(
            classify(&answer(429, Some("soon".into())), wall, Probe::None),
            AttemptClass::RateLimited { retry_after: None }
        );
    }

    #[test]
    fn a_5xx_is_a_server_error() {
        for status in [500, 502, 503, 599] {
            assert_eq!(
                classify(&answer(status, Some("5".into())), no_clock, Probe::None),
                AttemptClass::ServerError(status)
            );
        }
        assert_eq!(AttemptClass::ServerError(500).outcome(), "server_error");
    }

    #[test]
    fn a_connect_error_is_connect_and_a_failure_after_sending_is_failed() {
        assert_eq!(
            classify::<()>(
                &Err(UpstreamError::Connect("refused".into())),
                no_clock,
                Probe::None
            ),
            AttemptClass::Connect
        );
        assert_eq!(
            classify::<()>(
                &Err(UpstreamError::Failed("reset".into())),
                no_clock,
                Probe::None
            ),
            AttemptClass::Failed
        );
        assert_eq!(AttemptClass::Connect.outcome(), "connect_error");
        assert_eq!(AttemptClass::Failed.outcome(), "failed");
    }

    #[test]
    fn a_timeout_is_a_timeout() {
        assert_eq!(
            classify::<()>(&Err(UpstreamError::Timeout), no_clock, Probe::None),
            AttemptClass::Timeout
        );
        assert_eq!(AttemptClass::Timeout.outcome(), "timeout");
    }

    #[test]
    fn success_and_other_client_errors_are_the_answer() {
        assert_eq!(
            classify(&answer(200, None), no_clock, Probe::None),
            AttemptClass::Answer(200)
        );
        assert_eq!(AttemptClass::Answer(200).outcome(), "success");
        for status in [400, 404, 422] {
            assert_eq!(
                classify(&answer(status, None), no_clock, Probe::None),
                AttemptClass::Answer(status)
            );
            assert_eq!(AttemptClass::Answer(status).outcome(), "client_error");
        }
    }

    fn routed(api: i32, endpoint: Endpoint, client: &[(&str, &str)]) -> (Routed, Candidate) {
        use crate::test_util::{backend, key};
        let mut b = backend("be_1", claw_proto::Pool::Primary, &[("m", "native-m")]);
        b.api = api;
        b.base_url = "http://127.0.0.1:9/v1".into();
        let snap = claw_proto::v1::Snapshot {
            version: 1,
            backends: vec![b],
            client_keys: vec![key("ck", "client-secret")],
            ..Default::default()
        };
        let snapshot = Arc::new(crate::snapshot::compile(1, &snap, None, Instant::now()).unwrap());
        let route = snapshot.route("m").unwrap().clone();
        let cand = route.candidates[0].clone();
        let mut headers = http::HeaderMap::new();
        for (k, v) in client {
            headers.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        let body = br#"{ "model" : "m", "x":1 }"#;
        let key = snapshot.backends().next().map(|_| ()).and_then(|_| {
            use sha2::Digest as _;
            let d: [u8; 32] = sha2::Sha256::digest(b"client-secret").into();
            snapshot.key(&d).cloned()
        });
        let r = Routed {
            snapshot: snapshot.clone(),
            key: key.unwrap(),
            route,
            endpoint,
            path: endpoint.upstream_path(),
            query: None,
            headers: crate::upstream::upstream_headers(headers),
            body: if endpoint.by_response_id() {
                RequestBody::Empty
            } else {
                RequestBody::Raw {
                    bytes: Bytes::from_static(body),
                    model: 12..15,
                }
            },
            stream: false,
            priority: Priority::Interactive,
            parsed: None,
            agent_id: None,
            run_kind: crate::run_kind::RunKind::Interactive,
            est_tokens: 0.0,
            est_prompt_tokens: 0,
            stream_usage: None,
            affinity: None,
            response_id: endpoint.by_response_id().then(|| "resp_7".to_string()),
            owner: None,
            request_id: crate::target::RequestId::generate(),
            started: Instant::now(),
            span: tracing::Span::none(),
        };
        (r, cand)
    }

    /// Regression (issue 15): the ejection a failure caused did not reach
    /// the control plane, and a success after a streak of 5xx/connect
    /// failures sent no `BackendSuccess`, so the fleet-wide count never reset.
    #[tokio::test(start_paused = true)]
    async fn the_ejecting_failure_reports_its_ejection_and_the_next_success_ends_the_streak() {
        let (r, cand) = routed(0, Endpoint::ChatCompletions, &[]);
        let (events, mut streams) = crate::events::channel(64);
        let shared = Shared {
            cooldowns: Cooldowns::new(crate::snapshot::SnapshotStore::default()),
            outlier: OutlierPolicy::default(),
            events,
        };
        // A lone success: nothing to report.
        assert!(react(&shared, &r, &cand, false, AttemptClass::Answer(200), None).is_none());
        assert!(streams.signals.try_recv().is_err());
        let mut ejected = Vec::new();
        for class in [
            AttemptClass::Connect,
            AttemptClass::Timeout,
            AttemptClass::ServerError(503),
            AttemptClass::Failed,
            AttemptClass::ServerError(500),
        ] {
            assert!(react(&shared, &r, &cand, false, class, None).is_some());
            match streams.signals.try_recv() {
                Ok(Signal::Failure(f)) => ejected.push(f.ejected),
                other => panic!("not a failure: {other:?}"),
            }
        }
        // The fifth ejects (30 s by default), and says so.
        assert_eq!(
            ejected,
            [None, None, None, None, Some(Duration::from_secs(30))]
        );
        assert!(react(&shared, &r, &cand, false, AttemptClass::Answer(200), None).is_none());
        assert!(matches!(
            streams.signals.try_recv(),
            Ok(Signal::Recovered { backend_id, .. }) if &*backend_id == "be_1"
        ));
        // Once per streak.
        react(&shared, &r, &cand, false, AttemptClass::Answer(200), None);
        assert!(streams.signals.try_recv().is_err());
    }

    /// An interactive request is the agent's activity; a heartbeat run is
    /// not, even sent without `x-claw-priority: background` (it would make
    /// the scheduler skip the agent's next heartbeat as busy).
    #[test]
    fn heartbeat_runs_are_never_agent_activity() {
        let api = claw_proto::v1::Api::Openai as i32;
        let (sink, mut streams) = crate::events::channel(4);
        let (mut r, _) = routed(api, Endpoint::ChatCompletions, &[]);
        r.agent_id = Some("ag".into());
        r.run_kind = crate::run_kind::RunKind::Heartbeat;
        signal_activity(&sink, &r);
        assert!(streams.signals.try_recv().is_err(), "no activity");
        r.run_kind = crate::run_kind::RunKind::Interactive;
        signal_activity(&sink, &r);
        assert!(matches!(
            streams.signals.try_recv(),
            Ok(Signal::Activity { agent_id, .. }) if agent_id == "ag"
        ));
    }

    #[tokio::test]
    async fn an_anthropic_backend_gets_its_key_in_x_api_key_and_a_version() {
        let client = [
            ("x-api-key", "client-secret"),
            ("authorization", "Bearer client-secret"),
            ("anthropic-beta", "prompt-caching-2024-07-31"),
        ];
        let (mut r, c) = routed(
            claw_proto::v1::Api::Anthropic as i32,
            Endpoint::Messages,
            &client,
        );
        let req = build_request(&mut r, &c, false, None).unwrap();
        let h = req.headers();
        assert_eq!(req.uri().path(), "/v1/messages");
        assert_eq!(req.method(), http::Method::POST);
        assert_eq!(h.get_all("x-api-key").iter().count(), 1);
        assert_eq!(h["x-api-key"], "sk-be_1");
        assert!(h["x-api-key"].is_sensitive());
        assert!(h.get(header::AUTHORIZATION).is_none());
        assert_eq!(h["anthropic-version"], "2023-06-01");
        assert_eq!(h["anthropic-beta"], "prompt-caching-2024-07-31");
        let body = http_body_util::BodyExt::collect(req.into_body())
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(&body[..], br#"{ "model" : "native-m", "x":1 }"#);
        // The client's own version wins.
        let (mut r, c) = routed(
            claw_proto::v1::Api::Anthropic as i32,
            Endpoint::Messages,
            &[("anthropic-version", "2099-01-01")],
        );
        let req = build_request(&mut r, &c, true, None).unwrap();
        assert_eq!(req.headers()["anthropic-version"], "2099-01-01");
        assert_eq!(req.headers().get_all("anthropic-version").iter().count(), 1);
    }

    #[tokio::test]
    async fn an_openai_backend_gets_a_bearer_and_no_client_key() {
        let client = [
            ("x-api-key", "client-secret"),
            ("authorization", "Bearer client-secret"),
        ];
        let (mut r, c) = routed(0, Endpoint::ChatCompletions, &client);
        let req = build_request(&mut r, &c, false, None).unwrap();
        let h = req.headers();
        assert_eq!(h[header::AUTHORIZATION], "Bearer sk-be_1");
        assert!(h[header::AUTHORIZATION].is_sensitive());
        assert!(h.get("x-api-key").is_none());
        assert!(h.get("anthropic-version").is_none());
        assert_eq!(h[header::CONTENT_TYPE], "application/json");
        // GET /v1/responses/{id}: the id in the path, no body.
        let (mut r, c) = routed(0, Endpoint::ResponsesGet, &client);
        let req = build_request(&mut r, &c, false, None).unwrap();
        assert_eq!(req.method(), http::Method::GET);
        assert_eq!(req.uri().path(), "/v1/responses/resp_7");
        assert!(req.headers().get(header::CONTENT_TYPE).is_none());
        let (mut r, c) = routed(0, Endpoint::ResponsesDelete, &client);
        let req = build_request(&mut r, &c, false, None).unwrap();
        assert_eq!(req.method(), http::Method::DELETE);
        let body = http_body_util::BodyExt::collect(req.into_body())
            .await
            .unwrap()
            .to_bytes();
        assert!(body.is_empty());
    }

    #[tokio::test]
    async fn a_translated_attempt_goes_to_the_backends_own_path_with_its_credential() {
        let client = [
            ("authorization", "Bearer client-secret"),
            ("accept-encoding", "gzip"),
        ];
        let (mut r, c) = routed(
            claw_proto::v1::Api::Anthropic as i32,
            Endpoint::ChatCompletions,
            &client,
        );
        r.query = Some("x=1".into());
        assert!(accounting::is_translated(&r, &c));
        let body = Bytes::from_static(br#"{"model":"native-m","max_tokens":4096,"messages":[]}"#);
        let req = build_request(&mut r, &c, false, Some(body.clone())).unwrap();
        assert_eq!(req.uri().path(), "/v1/messages");
        assert_eq!(req.uri().query(), None);
        let h = req.headers();
        assert_eq!(h["x-api-key"], "sk-be_1");
        assert!(h.get(header::AUTHORIZATION).is_none());
        assert!(h.get(header::ACCEPT_ENCODING).is_none());
        assert_eq!(h["anthropic-version"], "2023-06-01");
        assert_eq!(h[header::CONTENT_TYPE], "application/json");
        let sent = http_body_util::BodyExt::collect(req.into_body())
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(sent, body);
        // A Messages client on an openai backend: /chat/completions, a Bearer.
        let (mut r, c) = routed(0, Endpoint::Messages, &[("x-api-key", "client-secret")]);
        let req = build_request(&mut r, &c, true, Some(Bytes::from_static(b"{}"))).unwrap();
        assert_eq!(req.uri().path(), "/v1/chat/completions");
        assert_eq!(req.headers()[header::AUTHORIZATION], "Bearer sk-be_1");
        assert!(req.headers().get("x-api-key").is_none());
    }

    #[test]
    fn the_client_body_is_parsed_once_and_only_for_translation() {
        let (mut r, c) = routed(0, Endpoint::Messages, &[]);
        assert!(r.parsed.is_none(), "the native path parses nothing");
        assert_eq!(r.parsed_body().map(|m| m["x"].clone()), Some(1.into()));
        assert!(r.parsed.is_some());
        // Today's stubs refuse: the field comes back by name.
        match translate_request(&mut r, &c) {
            Err(Untranslated::Refused(f)) => {
                let e = Untranslated::Refused(f.clone()).error();
                assert_eq!(e.status, StatusCode::BAD_REQUEST);
                assert_eq!(e.param.as_deref(), Some(f.field.as_str()));
            }
            Ok(t) => assert!(!t.body.is_empty()),
            Err(Untranslated::Invalid) => panic!("the body is a JSON object"),
        }
        let (mut r, _) = routed(0, Endpoint::Messages, &[]);
        r.body = RequestBody::Raw {
            bytes: Bytes::from_static(b"[1]"),
            model: 0..0,
        };
        assert!(r.parsed_body().is_none());
        assert_eq!(
            Untranslated::Invalid.error().status,
            StatusCode::BAD_REQUEST
        );
    }

    fn cond(status: u16, retry_after: Option<&str>, probe: Probe, body: &str) -> AttemptClass {
        let res = answer(status, retry_after.map(str::to_string));
        let class = classify(&res, wall, probe);
        if class.needs_body(probe) {
            refine(class, body.as_bytes())
        } else {
            class
        }
    }

    #[test]
    fn an_upstream_401_or_403_is_a_rejected_key_not_an_answer() {
        for status in [401, 403] {
            let class = cond(status, None, Probe::None, "");
            assert_eq!(class, AttemptClass::AuthFailed(status));
            assert_eq!(class.outcome(), "auth_failed");
        }
        assert_eq!(cond(400, None, Probe::None, ""), AttemptClass::Answer(400));
        let e = ApiError::upstream_auth_failed("b1", 401);
        assert_eq!(e.status, StatusCode::BAD_GATEWAY);
        assert_eq!(
            e.message,
            "backend \"b1\" rejected the gateway's provider key (401); an operator must update its key"
        );
        assert_ne!(e.code, Some("invalid_api_key"));
    }

    #[test]
    fn a_429_with_a_retry_after_over_an_hour_is_a_spent_quota() {
        assert_eq!(
            cond(429, Some("7200"), Probe::None, ""),
            AttemptClass::QuotaExhausted {
                retry_after: Some(Duration::from_secs(7200))
            }
        );
        assert_eq!(
            cond(429, Some("3600"), Probe::None, ""),
            AttemptClass::RateLimited {
                retry_after: Some(Duration::from_secs(3600))
            }
        );
    }

    #[test]
    fn a_429_naming_quota_or_billing_is_a_spent_quota() {
        let openai = r#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
        let anthropic = r#"{"type":"error","error":{"type":"billing_error","message":"credit balance too low"}}"#;
        let code_only = r#"{"error":{"type":"requests","code":"QUOTA_EXCEEDED"}}"#;
        for body in [openai, anthropic, code_only] {
            assert_eq!(
                cond(429, None, Probe::None, body),
                AttemptClass::QuotaExhausted { retry_after: None },
                "{body}"
            );
        }
        assert_eq!(
            cond(429, Some("120"), Probe::None, openai),
            AttemptClass::QuotaExhausted {
                retry_after: Some(Duration::from_secs(120))
            }
        );
        // A plain rate limit, and a message merely mentioning quota.
        let plain =
            r#"{"type":"error","error":{"type":"rate_limit_error","message":"quota soon"}}"#;
        for body in [plain, "not json", ""] {
            assert_eq!(
                cond(429, Some("2"), Probe::None, body),
                AttemptClass::RateLimited {
                    retry_after: Some(Duration::from_secs(2))
                }
            );
        }
        assert_eq!(
            AttemptClass::QuotaExhausted { retry_after: None }.outcome(),
            "quota_exhausted"
        );
    }

    #[test]
    fn a_529_is_overloaded() {
        assert_eq!(
            cond(529, None, Probe::None, ""),
            AttemptClass::Overloaded { retry_after: None }
        );
        assert_eq!(
            cond(529, Some("3"), Probe::None, ""),
            AttemptClass::Overloaded {
                retry_after: Some(Duration::from_secs(3))
            }
        );
        assert!(!AttemptClass::Overloaded { retry_after: None }.needs_body(Probe::None));
    }

    #[test]
    fn response_id_misses_are_not_answers() {
        assert_eq!(
            cond(404, None, Probe::ById, "{}"),
            AttemptClass::ResponseUnknown(404)
        );
        assert_eq!(
            cond(404, None, Probe::None, "{}"),
            AttemptClass::Answer(404)
        );
        let miss = r#"{"error":{"message":"Previous response with id 'resp_1' not found.","type":"invalid_request_error","param":"previous_response_id","code":"previous_response_not_found"}}"#;
        assert_eq!(
            cond(400, None, Probe::Previous, miss),
            AttemptClass::ResponseUnknown(400)
        );
        assert_eq!(
            cond(404, None, Probe::Previous, miss),
            AttemptClass::ResponseUnknown(404)
        );
        let other = r#"{"error":{"type":"invalid_request_error","code":"invalid_value"}}"#;
        assert_eq!(
            cond(400, None, Probe::Previous, other),
            AttemptClass::Answer(400)
        );
        assert_eq!(
            cond(400, None, Probe::None, miss),
            AttemptClass::Answer(400)
        );
        assert_eq!(
            cond(200, None, Probe::Previous, miss),
            AttemptClass::Answer(200)
        );
    }
}
