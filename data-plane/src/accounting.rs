//! Per-request accounting: every proxied request ends in exactly one
//! [`RequestOutcome`], whoever answered and however the answer ended.
//!
//! - An upstream answer is followed to the end of its body by a [`Tracker`]
//!   (the [`Observer`] of [`crate::stream::UpstreamBody`]): time to first
//!   byte, usage from the JSON body or the SSE stream in the endpoint's
//!   [`Dialect`] (estimated when a stream reports none), tpm reconciliation,
//!   cost, metrics, the request's span. Only answers that generate are
//!   billable: `count_tokens` and reading or deleting a stored response are
//!   accounted with zero tokens and zero cost, whatever their body says.
//! - Stored responses: a successful `POST /v1/responses` answer's id is
//!   remembered as owned by its backend, a successful `DELETE` forgets it
//!   ([`crate::responses`]), so follow-ups reach the account that holds it.
//! - An error the proxy answers itself (no capacity, every attempt failed)
//!   is accounted by [`RequestMeta::proxy_answered`].
//! - A client that leaves before any answer (hyper drops the request future
//!   while it waits in the queue or for a response head) is accounted when
//!   the [`Abandoned`] guard drops: status 499, no usage.
//!
//! - Every outcome carries the request's [`RunKind`] (`x-claw-run-kind`,
//!   [`crate::run_kind`]),
//!   so usage is summed per run kind: what heartbeats cost is told apart
//!   from the agent's own conversations.
//!
//! The three share one [`RequestMeta`] (what is known of the request before
//! an answer), which alone builds the [`RequestOutcome`]. [`InFlight`] counts
//! the request on its backend for least-loaded selection until the body ends.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use claw_telemetry::genai;
use http::StatusCode;
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::events::{EventSink, FailureKind, RequestOutcome, Signal, Usage};
use crate::metrics::{self, CandidateMetrics, status_label};
use crate::queue::Priority;
use crate::run_kind::RunKind;
use crate::snapshot::{Api, Backend, Candidate};
use crate::stream::{End, Observer, UpstreamBody};
use crate::target::{Endpoint, Routed};
use crate::translate::{self, StreamTranslator};
use crate::usage::{Dialect, MAX_USAGE_TOKENS, Prices, SseTally, SseUsage, StreamUsage};

mod large_answer;

/// Largest non-streaming JSON body collected whole for its `usage`; a
/// larger one is followed by [`large_answer::TopLevelScan`], which keeps
/// only the members it needs (issue 18: answers over 4 MiB were recorded
/// as 0 tokens).
const MAX_USAGE_BODY: usize = 4 * 1024 * 1024;

/// Counts a request in flight on a backend until dropped.
pub(crate) struct InFlight(Arc<Backend>);

impl InFlight {
    /// Counts one more request on `b`.
    #[inline]
    pub(crate) fn new(b: Arc<Backend>) -> Self {
        b.runtime.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(b)
    }
}

impl Drop for InFlight {
    #[inline]
    fn drop(&mut self) {
        self.0.runtime.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What every outcome of a request carries, known before any answer.
pub(crate) struct RequestMeta {
    key_id: Arc<str>,
    model: Arc<str>,
    agent_id: Option<String>,
    run_kind: RunKind,
    streamed: bool,
    priority: Priority,
    started: Instant,
    /// Upstream attempts made so far.
    attempts: u32,
    /// The answer was translated from the other protocol.
    translated: bool,
    /// For log lines ([`crate::target::RequestId`]).
    request_id: crate::target::RequestId,
}

/// What an upstream answer adds to its outcome.
struct Answered {
    backend_id: Arc<str>,
    ttft: Option<Duration>,
    usage: Option<Usage>,
    usage_estimated: bool,
    cost: Option<f64>,
}

impl RequestMeta {
    /// The meta of `r`, before its first attempt.
    #[inline]
    pub(crate) fn new(r: &Routed) -> Self {
        RequestMeta {
            key_id: r.key.id.clone(),
            model: r.route.model.clone(),
            agent_id: r.agent_id.clone(),
            run_kind: r.run_kind,
            streamed: r.stream,
            priority: r.priority,
            started: r.started,
            attempts: 0,
            translated: false,
            request_id: r.request_id.clone(),
        }
    }

    /// The answer comes from a backend of the other protocol, translated.
    #[inline]
    pub(crate) fn translated(mut self) -> Self {
        self.translated = true;
        self
    }

    /// Upstream attempts made so far.
    #[inline]
    pub(crate) fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The one place a [`RequestOutcome`] is built.
    #[inline]
    fn outcome(
        &mut self,
        status: u16,
        latency: Duration,
        end: Option<End>,
        answered: Option<Answered>,
    ) -> RequestOutcome {
        let (backend_id, ttft, usage, usage_estimated, cost) = match answered {
            Some(a) => (
                Some(a.backend_id),
                a.ttft,
                a.usage,
                a.usage_estimated,
                a.cost,
            ),
            None => (None, None, None, false, None),
        };
        RequestOutcome {
            client_key_id: self.key_id.clone(),
            agent_id: self.agent_id.take(),
            run_kind: self.run_kind,
            model: self.model.clone(),
            backend_id,
            status,
            streamed: self.streamed,
            priority: self.priority,
            latency,
            ttft,
            attempts: self.attempts,
            usage,
            usage_estimated,
            end,
            cost,
            translated: self.translated,
        }
    }

    /// Accounts an error the proxy answers itself (`status`, of OpenAI
    /// code or type `error_type`) after `self.attempts` attempts: metrics,
    /// the request's span, the outcome.
    pub(crate) fn proxy_answered(
        mut self,
        events: &EventSink,
        status: StatusCode,
        error_type: &'static str,
        span: &tracing::Span,
    ) {
        let latency = self.started.elapsed();
        metrics::request(self.model.clone(), "", status_label(status.as_u16()));
        metrics::request_duration_histogram(self.model.clone()).record(latency.as_secs_f64());
        if !span.is_none() {
            genai::record_retries(span, self.attempts);
            genai::end_request(span, status.as_u16(), None, Some(error_type));
        }
        events.emit(self.outcome(status.as_u16(), latency, None, None));
    }
}

/// Accounts a request whose client left before any answer (hyper drops the
/// request future): waiting in the queue or for an upstream's response head.
/// It is reported with status 499 and no usage — the upstream, cut off before
/// its head, produced nothing billable. [`Abandoned::disarm`] hands the meta
/// on once the request has an answer.
pub(crate) struct Abandoned<'a> {
    events: &'a EventSink,
    /// `None` only after `disarm`.
    meta: Option<RequestMeta>,
}

impl<'a> Abandoned<'a> {
    /// Armed: dropping it reports a 499.
    #[inline]
    pub(crate) fn new(events: &'a EventSink, meta: RequestMeta) -> Self {
        Abandoned {
            events,
            meta: Some(meta),
        }
    }

    /// Records that `n` attempts have been made.
    #[inline]
    pub(crate) fn set_attempts(&mut self, n: u32) {
        if let Some(m) = self.meta.as_mut() {
            m.attempts = n;
        }
    }

    /// The request has an answer: the meta goes on to whoever accounts it.
    #[inline]
    pub(crate) fn disarm(mut self) -> RequestMeta {
        self.meta
            .take()
            .expect("set by `new` and taken only here, by value, so at most once")
    }
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        let Some(mut meta) = self.meta.take() else {
            return;
        };
        let latency = meta.started.elapsed();
        metrics::request(meta.model.clone(), "", "499");
        self.events
            .emit(meta.outcome(499, latency, Some(End::ClientGone), None));
    }
}

/// How an upstream answer is framed, from its `content-type`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Framing {
    /// `text/event-stream`.
    pub sse: bool,
    /// A JSON body.
    pub json: bool,
}

/// The dialect of `endpoint`'s answers.
pub(crate) fn dialect(endpoint: Endpoint) -> Dialect {
    match endpoint {
        Endpoint::ChatCompletions | Endpoint::Completions | Endpoint::Embeddings => Dialect::Chat,
        Endpoint::Messages | Endpoint::CountTokens => Dialect::Messages,
        Endpoint::Responses | Endpoint::ResponsesGet | Endpoint::ResponsesDelete => {
            Dialect::Responses
        }
    }
}

/// The dialect a backend speaking `api` answers chat or Messages requests in.
fn backend_dialect(api: Api) -> Dialect {
    match api {
        Api::OpenAi => Dialect::Chat,
        Api::Anthropic => Dialect::Messages,
    }
}

/// The dialect of `cand`'s answers to `r`: the endpoint's, or for a
/// translated request the backend's own (usage is read from the upstream's
/// bytes, before translation).
pub(crate) fn upstream_dialect(r: &Routed, cand: &Candidate) -> Dialect {
    if is_translated(r, cand) {
        backend_dialect(cand.backend.api)
    } else {
        dialect(r.endpoint)
    }
}

/// Whether an attempt of `r` on `cand` is translated: the backend speaks the
/// other protocol.
#[inline]
pub(crate) fn is_translated(r: &Routed, cand: &Candidate) -> bool {
    cand.backend.api != r.endpoint.api()
}

/// The translator of a successful stream of `cand` answering `r`, when the
/// request is translated.
fn stream_translator(r: &Routed, cand: &Candidate) -> Option<Box<dyn StreamTranslator>> {
    if !is_translated(r, cand) {
        return None;
    }
    let model = &*r.route.model;
    match r.endpoint {
        Endpoint::ChatCompletions => {
            // The Anthropic stream always reports usage; the chat client
            // sees it only if it asked.
            let include_usage = r.stream_usage == Some(StreamUsage::ClientAsked);
            Some(Box::new(translate::to_messages::Stream::new(
                model,
                include_usage,
            )))
        }
        Endpoint::Messages => Some(Box::new(translate::to_chat::Stream::new(model))),
        _ => None,
    }
}

/// Whether `endpoint`'s answers carry billable usage (they generate).
fn billable(endpoint: Endpoint) -> bool {
    !matches!(
        endpoint,
        Endpoint::CountTokens | Endpoint::ResponsesGet | Endpoint::ResponsesDelete
    )
}

/// The client's body of `cand`'s answer to `r` (status `status`): the
/// upstream body followed to its end by a [`Tracker`], with the stream's
/// usage scanner when it is a successful stream (chat: per
/// `r.stream_usage`, stripping what the proxy asked for; Messages and
/// Responses: always, read only), the mid-stream error event in the
/// endpoint's protocol, drained for its usage if the client leaves (up to
/// the request timeout). A translated answer is read in the backend's
/// dialect (a reading scanner: nothing to strip) and a successful stream is
/// translated for the client after the tracker and the scanner; a JSON
/// answer or an error is translated by the caller, once whole.
#[allow(clippy::too_many_arguments)]
pub(crate) fn track(
    meta: RequestMeta,
    events: EventSink,
    in_flight: InFlight,
    r: &Routed,
    cand: &Candidate,
    status: StatusCode,
    framing: Framing,
    body: Incoming,
    reservation: Reservation,
) -> UpstreamBody<Incoming, Tracker> {
    let success = status.is_success();
    let client_dialect = dialect(r.endpoint);
    let dialect = upstream_dialect(r, cand);
    let translated = is_translated(r, cand);
    let billable = billable(r.endpoint);
    // The body is kept for its usage (and a stored response's id).
    let collect = framing.json && !framing.sse && success && billable;
    if success
        && r.endpoint == Endpoint::ResponsesDelete
        && let Some(id) = r.response_id.as_deref()
    {
        crate::responses::forget(id);
    }
    let tracker = Tracker::new(
        meta,
        events,
        in_flight,
        r,
        cand,
        status,
        collect,
        reservation,
    );
    let mut body = UpstreamBody::new(body, framing.sse, tracker).with_dialect(client_dialect);
    if framing.sse && success && billable {
        let scanner = match dialect {
            _ if translated => Some(SseUsage::reading(dialect)),
            Dialect::Chat => r.stream_usage.map(|mode| SseUsage::new(mode.strip())),
            Dialect::Messages | Dialect::Responses => Some(SseUsage::reading(dialect)),
        };
        if let Some(s) = scanner {
            body = body.with_scanner(s);
        }
        if let Some(t) = stream_translator(r, cand) {
            body = body.with_translator(t);
        }
    }
    if success {
        // A client leaving mid-answer does not stop the accounting.
        body = body.drain_until(r.started + r.route.settings.request_timeout);
    }
    body
}

/// The most tokens of any one kind an answer of `cand` may claim: twice the
/// mapping's context window when known (a request cannot use more than its
/// window; the factor leaves room for providers counting cache traffic
/// apart), never above [`MAX_USAGE_TOKENS`]. Above it a count is clamped:
/// an upstream's `u64::MAX` must neither saturate the stats nor hold the
/// tpm limiter for ever.
fn usage_max(cand: &Candidate) -> u64 {
    cand.context_window
        .map_or(MAX_USAGE_TOKENS, |w| u64::from(w).saturating_mul(2))
        .min(MAX_USAGE_TOKENS)
}

/// A request's tokens taken from one backend's tpm limiter for one attempt.
///
/// Reconciliation is structural: whoever holds it either settles it
/// ([`Reservation::settle`]: the real usage; [`Reservation::keep`]: the
/// estimate, when the usage cannot be read) or drops it, and a drop refunds
/// the whole reservation. So an attempt that fails (an error answer, a
/// timeout, no connection, a refused translation), an answer whose tracker
/// never ends, a client gone before the answer: each gives its tokens back,
/// whatever path it takes out of the retry loop. Only a successful answer
/// keeps tokens, and then at most its (bounded) estimate or its (clamped)
/// usage. Empty (a no-op) for a backend without tpm and for an emergency
/// admission, which takes no tpm.
#[derive(Debug)]
pub(crate) struct Reservation {
    backend: Option<Arc<Backend>>,
    tokens: f64,
}

impl Reservation {
    /// The `tokens` the admission of `cand` took (none if `emergency` or
    /// the backend has no tpm).
    pub(crate) fn new(cand: &Candidate, tokens: f64, emergency: bool) -> Self {
        let takes = !emergency && cand.backend.tpm.is_some();
        Reservation {
            backend: takes.then(|| cand.backend.clone()),
            tokens,
        }
    }

    /// No reservation (tests, answers that took none).
    #[cfg(test)]
    pub(crate) fn none() -> Self {
        Reservation {
            backend: None,
            tokens: 0.0,
        }
    }

    /// Settles at the `actual` tokens used.
    pub(crate) fn settle(mut self, actual: f64) {
        if let Some(b) = self.backend.take() {
            b.runtime.tpm.reconcile(self.tokens, actual);
        }
    }

    /// Settles at `estimate`, at most the reservation: the usage could
    /// not be read.
    pub(crate) fn keep(self, estimate: f64) {
        let at = estimate.min(self.tokens);
        self.settle(at);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(b) = self.backend.take() {
            b.runtime.tpm.refund(self.tokens);
        }
    }
}

/// Follows a response body to its end, then records metrics, reconciles the
/// tpm reservation and emits the [`RequestOutcome`].
pub(crate) struct Tracker {
    meta: RequestMeta,
    /// The request's span: it ends when the body does.
    span: tracing::Span,
    events: EventSink,
    _in_flight: InFlight,
    backend: Arc<Backend>,
    endpoint: Endpoint,
    /// The dialect of the upstream's answer ([`upstream_dialect`]).
    dialect: Dialect,
    metrics: Arc<OnceLock<CandidateMetrics>>,
    prices: Prices,
    status: StatusCode,
    first_byte: Option<Instant>,
    /// The tpm reservation, settled when the body ends (refunded if it
    /// never does).
    reservation: Option<Reservation>,
    /// The most tokens of any one kind the answer may claim
    /// ([`usage_max`]).
    usage_max: u64,
    est_prompt_tokens: u64,
    collected: Option<Vec<Bytes>>,
    collected_len: usize,
    /// Past [`MAX_USAGE_BODY`]: the scan that replaced `collected`.
    scan: Option<Box<large_answer::TopLevelScan>>,
}

impl Tracker {
    /// Follows the answer of `cand` to `r` (status `status`); `collect`
    /// keeps the body for its JSON usage; `reservation` is settled by the
    /// end of the body.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        meta: RequestMeta,
        events: EventSink,
        in_flight: InFlight,
        r: &Routed,
        cand: &Candidate,
        status: StatusCode,
        collect: bool,
        reservation: Reservation,
    ) -> Self {
        Tracker {
            meta,
            span: r.span.clone(),
            events,
            _in_flight: in_flight,
            backend: cand.backend.clone(),
            endpoint: r.endpoint,
            dialect: upstream_dialect(r, cand),
            metrics: cand.metrics.clone(),
            prices: cand.prices,
            status,
            first_byte: None,
            reservation: Some(reservation),
            usage_max: usage_max(cand),
            est_prompt_tokens: r.est_prompt_tokens,
            collected: collect.then(Vec::new),
            collected_len: 0,
            scan: None,
        }
    }

    /// Usage of a JSON answer collected whole (and, for a stored response,
    /// remembers its owner).
    fn json_usage(&mut self) -> Option<Usage> {
        if let Some(scan) = self.scan.take() {
            return self.read_scanned(*scan);
        }
        let chunks = self.collected.take()?;
        if let [one] = chunks.as_slice() {
            return self.read_answer(one);
        }
        let mut buf = Vec::with_capacity(self.collected_len);
        for c in &chunks {
            buf.extend_from_slice(c);
        }
        self.read_answer(&buf)
    }

    /// Reads a whole JSON answer: its owner if it is a stored response, its
    /// usage in the endpoint's dialect.
    fn read_answer(&self, body: &[u8]) -> Option<Usage> {
        if self.endpoint == Endpoint::Responses
            && let Some(id) = crate::usage::answer_id(body)
        {
            crate::responses::remember(&id, &self.backend.id);
        }
        Usage::from_answer(self.dialect, body)
    }

    /// Reads what the scan of a large answer kept, as [`Self::read_answer`]
    /// reads a whole one.
    fn read_scanned(&self, scan: large_answer::TopLevelScan) -> Option<Usage> {
        let (usage, id) = scan.finish();
        if self.endpoint == Endpoint::Responses
            && let Some(id) = id
            && let Some(id) = crate::usage::answer_id(&large_answer::alone("id", &id))
        {
            crate::responses::remember(&id, &self.backend.id);
        }
        Usage::from_answer(self.dialect, &large_answer::alone("usage", &usage?))
    }

    /// `u` with every count clamped to `usage_max`: a clamp is
    /// counted (`claw_usage_clamped_total{backend}`) and logged, once for
    /// the request.
    fn bounded(&self, u: Usage) -> Usage {
        let (u, clamped) = u.clamped(self.usage_max);
        if clamped {
            metrics::usage_clamped(self.backend.id.clone());
            tracing::warn!(
                request_id = %self.meta.request_id,
                backend = %self.backend.name,
                backend_id = %self.backend.id,
                max = self.usage_max,
                "upstream reported implausible usage; clamped"
            );
        }
        u
    }

    /// Usage of the answer and whether it is an estimate: a stream that
    /// ended without a usage chunk is counted from its content events; an
    /// answer that does not generate is worth nothing.
    fn usage(&mut self, sse: Option<SseTally>) -> (Option<Usage>, bool) {
        if !billable(self.endpoint) {
            return (Some(Usage::default()), false);
        }
        if self.endpoint == Endpoint::Responses
            && self.status.is_success()
            && let Some(id) = sse.as_ref().and_then(|t| t.response_id.as_deref())
        {
            crate::responses::remember(id, &self.backend.id);
        }
        match sse {
            Some(SseTally { usage: Some(u), .. }) => (Some(u), false),
            Some(t) => {
                let (p, c) = (self.est_prompt_tokens, t.content_events);
                let u = Usage {
                    prompt_tokens: p,
                    completion_tokens: c,
                    total_tokens: p + c,
                    ..Usage::default()
                };
                (Some(u), true)
            }
            None => (self.json_usage(), false),
        }
    }
}

impl Observer for Tracker {
    #[inline]
    fn on_data(&mut self, chunk: &Bytes) {
        if self.first_byte.is_none() {
            let now = Instant::now();
            self.first_byte = Some(now);
            if self.meta.streamed {
                metrics::time_to_first_token(
                    self.meta.model.clone(),
                    (now - self.meta.started).as_secs_f64(),
                );
            }
        }
        if let Some(scan) = self.scan.as_mut() {
            self.collected_len += chunk.len();
            scan.feed(chunk);
        } else if let Some(c) = self.collected.as_mut() {
            self.collected_len += chunk.len();
            if self.collected_len > MAX_USAGE_BODY {
                // Too large to keep: scan what came and what follows.
                let mut scan = Box::new(large_answer::TopLevelScan::new());
                for c in c.iter().chain(std::iter::once(chunk)) {
                    scan.feed(c);
                }
                self.collected = None;
                self.scan = Some(scan);
            } else {
                c.push(chunk.clone());
            }
        }
    }

    fn on_end(&mut self, end: End, sse: Option<SseTally>) {
        let latency = self.meta.started.elapsed();
        let (usage, usage_estimated) = self.usage(sse);
        if !self.span.is_none() {
            let error = if end == End::UpstreamError {
                Some("stream_broken")
            } else {
                self.status.is_server_error().then(|| self.status.as_str())
            };
            let tokens = usage.map(|u| (u.prompt_tokens, u.completion_tokens));
            genai::end_request(&self.span, self.status.as_u16(), tokens, error);
        }
        if end == End::UpstreamError {
            tracing::warn!(
                request_id = %self.meta.request_id,
                model = %self.meta.model,
                backend = %self.backend.name,
                backend_id = %self.backend.id,
                "upstream answer broke off mid-stream"
            );
            self.events.signal(Signal::failure(
                &self.backend.id,
                FailureKind::StreamBroken,
                None,
                "the answer broke off mid-stream",
            ));
        }
        let m = self
            .metrics
            .get_or_init(|| CandidateMetrics::new(&self.meta.model, &self.backend.id));
        if self.status == StatusCode::OK {
            m.requests_ok.increment(1);
        } else {
            metrics::request(
                self.meta.model.clone(),
                self.backend.id.clone(),
                status_label(self.status.as_u16()),
            );
        }
        m.duration.record(latency.as_secs_f64());
        let mut cost = None;
        let usage = usage.map(|u| self.bounded(u));
        let reservation = self.reservation.take();
        if let Some(u) = usage {
            m.tokens_input.record(u.prompt_tokens as f64);
            m.tokens_output.record(u.completion_tokens as f64);
            cost = Some(u.cost(&self.prices));
            if let Some(res) = reservation {
                res.settle(u.total_tokens as f64);
            }
        } else if self.status.is_success()
            && let Some(res) = reservation
        {
            // A success whose usage cannot be read: the prompt estimate plus
            // ~4 bytes of answer per token, at most the reservation (which
            // the route bounded by the mapping's limits).
            let answer = (self.collected_len as u64).div_ceil(4);
            res.keep(self.est_prompt_tokens.saturating_add(answer) as f64);
        }
        // Otherwise (an error answer) the reservation drops: refunded.
        let answered = Answered {
            backend_id: self.backend.id.clone(),
            ttft: self.first_byte.map(|t| t - self.meta.started),
            usage,
            usage_estimated,
            cost,
        };
        let outcome = self
            .meta
            .outcome(self.status.as_u16(), latency, Some(end), Some(answered));
        self.events.emit(outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{EventStreams, channel};
    use crate::snapshot::SnapshotStore;
    use crate::target::RequestBody;
    use crate::test_util::{backend, key};
    use crate::usage::samples;
    use claw_proto::{Pool, v1};
    use sha2::Digest;

    /// A request to `endpoint` for model `m` on the one backend `be_acct`,
    /// priced at Claude Sonnet's per-token prices.
    fn fixture(endpoint: Endpoint) -> (Routed, Candidate) {
        fixture_with(endpoint, None)
    }

    /// [`fixture`] with the backend's tpm.
    fn fixture_with(endpoint: Endpoint, tpm: Option<u32>) -> (Routed, Candidate) {
        let mut b = backend("be_acct", Pool::Primary, &[("m", "m-native")]);
        b.tpm = tpm;
        if endpoint.api() == Api::Anthropic {
            b.api = v1::Api::Anthropic as i32;
        }
        let mm = &mut b.models[0];
        mm.input_cost_per_token = 3e-6;
        mm.output_cost_per_token = 15e-6;
        mm.cache_read_cost_per_token = 0.3e-6;
        mm.cache_write_cost_per_token = 3.75e-6;
        mm.cache_write_1h_cost_per_token = 6e-6;
        let store = SnapshotStore::default();
        store
            .apply(
                1,
                &v1::Snapshot {
                    version: 1,
                    backends: vec![b],
                    client_keys: vec![key("ck_a", "secret")],
                    ..Default::default()
                },
            )
            .unwrap();
        let snapshot = store.load().unwrap();
        let route = snapshot.route("m").unwrap().clone();
        let sha: [u8; 32] = sha2::Sha256::digest(b"secret").into();
        let key = snapshot.key(&sha).unwrap().clone();
        let cand = route.candidates[0].clone();
        let r = Routed {
            snapshot: snapshot.clone(),
            key,
            route,
            endpoint,
            path: "/x",
            query: None,
            headers: http::HeaderMap::new(),
            body: RequestBody::Raw {
                bytes: Bytes::new(),
                model: 0..0,
            },
            stream: false,
            priority: Priority::Interactive,
            parsed: None,
            agent_id: None,
            run_kind: RunKind::Interactive,
            est_tokens: 100.0,
            est_prompt_tokens: 77,
            stream_usage: None,
            affinity: None,
            response_id: None,
            owner: None,
            request_id: crate::target::RequestId::generate(),
            started: Instant::now(),
            span: tracing::Span::none(),
        };
        (r, cand)
    }

    /// The outcome of `body` answering `endpoint` with 200, as a JSON body
    /// or (when `sse`) an SSE stream read by the endpoint's scanner.
    fn account(endpoint: Endpoint, body: &str, sse: bool) -> RequestOutcome {
        let (r, cand) = fixture(endpoint);
        let (sink, mut streams): (EventSink, EventStreams) = channel(4);
        let meta = RequestMeta::new(&r);
        let in_flight = InFlight::new(cand.backend.clone());
        let mut t = Tracker::new(
            meta,
            sink,
            in_flight,
            &r,
            &cand,
            StatusCode::OK,
            !sse,
            Reservation::none(),
        );
        let tally = sse.then(|| {
            let mut s = SseUsage::reading(dialect(endpoint));
            s.observe(body.as_bytes());
            s.finish();
            s.tally()
        });
        // In two chunks, as a body arrives.
        let (a, b) = body.as_bytes().split_at(body.len() / 2);
        t.on_data(&Bytes::copy_from_slice(a));
        t.on_data(&Bytes::copy_from_slice(b));
        t.on_end(End::Complete, tally);
        streams.outcomes.try_recv().unwrap()
    }

    /// A candidate whose backend has a tpm of 600 a minute (10 a second).
    fn tpm_fixture() -> (Routed, Candidate) {
        fixture_with(Endpoint::ChatCompletions, Some(600))
    }

    #[test]
    fn a_reservation_is_refunded_unless_settled() {
        let (_, cand) = tpm_fixture();
        let tpm = &cand.backend.runtime.tpm;
        let now = Instant::now();
        // Dropped (a failed attempt): all of it back.
        tpm.try_acquire(1e6, now).unwrap();
        drop(Reservation::new(&cand, 1e6, false));
        assert_eq!(tpm.time_until(now), Duration::ZERO);
        // Settled at the real use: only that is kept.
        tpm.try_acquire(1e6, now).unwrap();
        Reservation::new(&cand, 1e6, false).settle(10.0);
        assert!(tpm.time_until(now) <= Duration::from_secs(1));
        tpm.refund(10.0);
        // Kept at an estimate: never more than reserved.
        tpm.try_acquire(100.0, now).unwrap();
        Reservation::new(&cand, 100.0, false).keep(1e9);
        assert!(tpm.time_until(now) <= Duration::from_secs(10));
    }

    #[test]
    fn endpoints_map_to_their_dialects() {
        assert_eq!(dialect(Endpoint::ChatCompletions), Dialect::Chat);
        assert_eq!(dialect(Endpoint::Embeddings), Dialect::Chat);
        assert_eq!(dialect(Endpoint::Messages), Dialect::Messages);
        assert_eq!(dialect(Endpoint::CountTokens), Dialect::Messages);
        assert_eq!(dialect(Endpoint::Responses), Dialect::Responses);
        assert!(billable(Endpoint::Messages) && billable(Endpoint::Responses));
        assert!(!billable(Endpoint::CountTokens));
        assert!(!billable(Endpoint::ResponsesGet) && !billable(Endpoint::ResponsesDelete));
    }

    #[test]
    fn a_messages_answer_is_accounted_with_its_cache_and_priced_by_the_mapping() {
        for (body, sse) in [
            (samples::MESSAGES_JSON, false),
            (samples::MESSAGES_SSE_CUMULATIVE, true),
        ] {
            let o = account(Endpoint::Messages, body, sse);
            let u = o.usage.unwrap();
            let want = Usage::from_answer(Dialect::Messages, body.as_bytes()).or_else(|| {
                let mut s = SseUsage::reading(Dialect::Messages);
                s.observe(body.as_bytes());
                s.tally().usage
            });
            assert_eq!(Some(u), want);
            assert!(!o.usage_estimated);
            assert!(u.cache_read_tokens > 0 && u.cache_write_1h_tokens > 0);
            let prompt = u.prompt_tokens as f64;
            let (r, w5, w1) = (
                u.cache_read_tokens as f64,
                u.cache_write_5m_tokens as f64,
                u.cache_write_1h_tokens as f64,
            );
            let cost = (prompt - r - w5 - w1) * 3e-6
                + r * 0.3e-6
                + w5 * 3.75e-6
                + w1 * 6e-6
                + u.completion_tokens as f64 * 15e-6;
            assert!((o.cost.unwrap() - cost).abs() < 1e-15);
        }
    }

    #[test]
    fn a_responses_answer_makes_its_backend_the_owner_of_its_id() {
        let o = account(Endpoint::Responses, samples::RESPONSES_JSON, false);
        assert_eq!(o.usage.map(|u| u.cache_read_tokens), Some(1152));
        assert_eq!(
            crate::responses::owner("resp_67ccd3a9da748190baa7f1570fe91ac604becb25c45c1d41")
                .as_deref(),
            Some("be_acct")
        );
        let o = account(Endpoint::Responses, samples::RESPONSES_SSE, true);
        assert_eq!(o.usage.map(|u| u.prompt_tokens), Some(2037));
        assert_eq!(
            crate::responses::owner("resp_67c9fdcecf488190bdd9a0409de3a1ec07b8b0ad4e5eb654")
                .as_deref(),
            Some("be_acct")
        );
    }

    #[test]
    fn count_tokens_and_stored_response_reads_bill_nothing() {
        let o = account(Endpoint::CountTokens, r#"{"input_tokens":2095}"#, false);
        assert_eq!(o.usage, Some(Usage::default()));
        assert_eq!(o.cost, Some(0.0));
        // A stored response read back carries its usage; it was billed once.
        let o = account(Endpoint::ResponsesGet, samples::RESPONSES_JSON, false);
        assert_eq!(o.usage, Some(Usage::default()));
        assert_eq!(o.cost, Some(0.0));
    }

    #[test]
    fn a_stream_without_usage_is_estimated_from_its_content_events() {
        let body = "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"a\"}}\n\n";
        let o = account(Endpoint::Messages, &body.repeat(3), true);
        assert!(o.usage_estimated);
        let u = o.usage.unwrap();
        assert_eq!((u.prompt_tokens, u.completion_tokens), (77, 3));
    }
}
