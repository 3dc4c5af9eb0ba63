//! Prometheus metrics, served on `/metrics`.
//!
//! | name | kind | labels |
//! |---|---|---|
//! | `claw_build_info` | gauge (always 1) | `version` |
//! | `claw_backend_info` | gauge (always 1) | `backend_id`, `backend`, `pool`, `api` |
//! | `process_*` (CPU, RSS, fds, start time) | | see [`claw_telemetry::process`] |
//! | `claw_dp_requests_total` | counter | `model`, `backend`, `status` |
//! | `claw_dp_run_kind_requests_total` | counter | `kind` (`heartbeat`, `interactive`) |
//! | `claw_dp_run_kind_unrecognized_total` | counter | |
//! | `claw_dp_upstream_attempts_total` | counter | `backend`, `outcome` |
//! | `claw_dp_retries_total` | counter | |
//! | `claw_dp_affinity_total` | counter | `outcome`, `reason` (moved), `source` (with a key) |
//! | `claw_dp_translated_total` | counter | `from`, `to` (protocols) |
//! | `claw_dp_cache_control_dropped_total` | counter | |
//! | `claw_usage_clamped_total` | counter | `backend` (id) |
//! | `claw_dp_cooldowns_active` | gauge | |
//! | `claw_dp_queue_depth` | gauge | |
//! | `claw_dp_snapshot_version` | gauge | |
//! | `claw_dp_snapshot_cache_writes_total` | counter | `result` |
//! | `claw_dp_snapshot_cache_loaded_version` | gauge | |
//! | `claw_dp_discovery_connected` | gauge | |
//! | `claw_dp_events_dropped_total` | counter | |
//! | `claw_dp_report_connected` | gauge | |
//! | `claw_dp_report_batches_sent_total` | counter | |
//! | `claw_dp_report_batches_acked_total` | counter | |
//! | `claw_dp_report_buffered_events` | gauge | |
//! | `claw_dp_report_dropped_events_total` | counter | |
//! | `claw_dp_degraded_mode` | gauge | |
//! | `claw_dp_client_key_default_share` | gauge | |
//! | `claw_dp_client_keys_with_shares` | gauge | |
//! | `claw_health_fail_open_total` | counter | `model` |
//! | `claw_backend_health_excluded` | gauge (rendered at scrape) | `backend` (id) |
//! | `gen_ai_server_time_to_first_token_seconds` | histogram | `gen_ai_request_model` |
//! | `gen_ai_server_request_duration_seconds` | histogram | `gen_ai_request_model` |
//! | `gen_ai_client_token_usage` | histogram | `gen_ai_request_model`, `gen_ai_token_type` |
//!
//! The recorder is process-global; the first proxy in a process installs it.
//! Every metric name is a constant here, described (`# HELP`) at install;
//! the code outside the request path records through the small functions
//! below.

use std::sync::{Arc, OnceLock};

use metrics::{Counter, Histogram, SharedString};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
const TOKEN_BUCKETS: &[f64] = &[
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0,
];

/// Installs the Prometheus recorder once per process. Returns false when
/// another recorder was already installed (metrics then go there).
pub(crate) fn install() -> bool {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Prefix("gen_ai_server_".into()), LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(TOKEN_USAGE.into()), TOKEN_BUCKETS)
                });
            let handle = match builder.and_then(|b| b.install_recorder()) {
                Ok(h) => {
                    spawn_upkeep(h.clone());
                    Some(h)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed");
                    None
                }
            };
            // Into whichever recorder is installed: HELP and TYPE lines.
            describe();
            init_zero();
            metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            handle
        })
        .is_some()
}

/// Gives every metric of the proxy its help text (`# HELP`), once, when the
/// recorder is installed.
fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the proxy's version is the `version` label"
    );
    describe_counter!(
        REQUESTS_TOTAL,
        "Requests answered, by model, backend (empty when none answered) and status sent to the client"
    );
    describe_counter!(
        RUN_KIND_REQUESTS_TOTAL,
        "Requests routed, by run kind (x-claw-run-kind): heartbeat or interactive"
    );
    describe_counter!(
        AGENT_ID_REJECTED_TOTAL,
        "Requests whose x-claw-agent-id was dropped: the client key does not list that agent (--agents)"
    );
    describe_counter!(
        KEY_PARALLEL_REJECTED_TOTAL,
        "Requests refused with 429 because their client key had max_parallel requests in flight on this proxy"
    );
    describe_counter!(
        WRITE_TIMEOUTS_TOTAL,
        "Responses whose client stopped reading for --write-timeout: the upstream was released"
    );
    describe_counter!(
        BODY_BUDGET_REJECTED_TOTAL,
        "Requests refused with 503 because their body did not fit --max-inflight-body-bytes in time"
    );
    describe_counter!(
        RUN_KIND_UNRECOGNIZED_TOTAL,
        "Requests whose x-claw-run-kind was neither heartbeat nor interactive (accounted as interactive)"
    );
    describe_counter!(
        UPSTREAM_ATTEMPTS_TOTAL,
        "Upstream attempts, by backend and outcome"
    );
    describe_counter!(
        USAGE_CLAMPED_TOTAL,
        "Upstream answers whose reported usage was above the plausible maximum (10M tokens per count) and was clamped, by backend id"
    );
    describe_counter!(
        RETRIES_TOTAL,
        "Upstream attempts after the first of a request"
    );
    describe_counter!(
        AFFINITY_TOTAL,
        "Upstream attempts by session affinity: outcome kept (the session's first-choice backend), moved (reason: cooling, ejected, unhealthy, rate_limited, saturated, owner, retried) or none (no affinity key); source: where the key came from (header, prompt_cache_key, user_id, agent)"
    );
    describe_counter!(
        TRANSLATED_TOTAL,
        "Answers translated between protocols, by the client's protocol (from) and the backend's (to): openai, anthropic"
    );
    describe_counter!(
        CACHE_CONTROL_DROPPED_TOTAL,
        "cache_control markers removed from requests translated for an OpenAI backend (it caches prefixes by itself)"
    );
    describe_gauge!(
        COOLDOWNS_ACTIVE,
        "Backends of the current snapshot that are cooling down"
    );
    describe_gauge!(
        QUEUE_DEPTH,
        "Requests waiting for a rate-limit token, over every model's queue"
    );
    describe_gauge!(SNAPSHOT_VERSION, "Configuration version applied");
    describe_counter!(
        SNAPSHOT_CACHE_WRITES_TOTAL,
        "Snapshot cache writes, by result (ok, error)"
    );
    describe_gauge!(
        SNAPSHOT_CACHE_LOADED_VERSION,
        "Configuration version loaded from the snapshot cache at start (0: none)"
    );
    describe_gauge!(
        DISCOVERY_CONNECTED,
        "1 while the discovery stream to the control plane is open"
    );
    describe_counter!(
        DISCOVERY_TOO_LARGE_TOTAL,
        "Snapshots refused because they exceed the proxy's gRPC message limit"
    );
    describe_counter!(
        EVENTS_DROPPED_TOTAL,
        "Request outcomes or signals dropped because their channel was full"
    );
    describe_gauge!(
        REPORT_CONNECTED,
        "1 while the report stream to the control plane is open"
    );
    describe_counter!(
        REPORT_BATCHES_SENT_TOTAL,
        "Report batches handed to the report stream, resends included"
    );
    describe_counter!(
        REPORT_BATCHES_ACKED_TOTAL,
        "Report batches the control plane acknowledged"
    );
    describe_gauge!(
        REPORT_BUFFERED_EVENTS,
        "Report events buffered and not acknowledged yet"
    );
    describe_counter!(
        REPORT_DROPPED_EVENTS_TOTAL,
        "Report events dropped unacknowledged because the report buffer was full"
    );
    describe_gauge!(
        DEGRADED_MODE,
        "1 in degraded mode (equal rate-limit shares without a control plane)"
    );
    describe_gauge!(
        CLIENT_KEY_DEFAULT_SHARE,
        "Share of a client key's fleet-wide rpm this proxy applies to keys without a share of their own"
    );
    describe_gauge!(
        CLIENT_KEYS_WITH_SHARES,
        "Client keys the control plane gave this proxy a share of their own (recent demand)"
    );
    describe_counter!(
        HEALTH_FAIL_OPEN_TOTAL,
        "Selections that ignored health marks because no other candidate of the model was left (fail open), by model"
    );
    describe_histogram!(
        TIME_TO_FIRST_TOKEN_SECONDS,
        Unit::Seconds,
        "Time from the request to the first streamed token, by model"
    );
    describe_histogram!(
        REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "Time to answer a request, by model"
    );
    describe_histogram!(
        TOKEN_USAGE,
        Unit::Count,
        "Tokens per request, by model and token type (input, output)"
    );
}

/// How often histogram samples are folded into their buckets when nobody
/// scrapes `/metrics`.
const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Histogram samples are buffered until the next render or upkeep: without
/// one, a proxy nobody scrapes would keep every sample (tens of bytes per
/// request, forever). A plain thread, so it runs whatever the runtimes do.
fn spawn_upkeep(handle: PrometheusHandle) {
    let started = std::thread::Builder::new()
        .name("claw-dp-metrics".into())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_INTERVAL);
                handle.run_upkeep();
            }
        });
    if let Err(e) = started {
        tracing::warn!(error = %e, "metrics upkeep thread not started");
    }
}

/// The rendered `claw_backend_info` series of the applied snapshot.
/// Rendered here rather than recorded: the recorder cannot forget a series,
/// and a removed or renamed backend's must go.
static BACKEND_INFO_TEXT: parking_lot::Mutex<String> = parking_lot::Mutex::new(String::new());

/// Replaces the `claw_backend_info` series with one per backend of the
/// snapshot just applied: ids joined to names (and pool, protocol) for
/// dashboards, since every other series names backends by id.
///
/// Each backend is `(id, name, pool, api name)`: plain data, so this module
/// needs none of the snapshot's types.
pub(crate) fn set_backends<'a>(
    backends: impl IntoIterator<Item = (&'a str, &'a str, claw_proto::Pool, &'static str)>,
) {
    use std::fmt::Write as _;
    let mut out = format!(
        "# HELP {BACKEND_INFO} Always 1, one per configured backend: joins `backend_id` to its name, pool and protocol\n# TYPE {BACKEND_INFO} gauge\n"
    );
    for (id, name, pool, api) in backends {
        let pool = match pool {
            claw_proto::Pool::Fallback => "fallback",
            _ => "primary",
        };
        let _ = writeln!(
            out,
            "{BACKEND_INFO}{{backend_id=\"{}\",backend=\"{}\",pool=\"{pool}\",api=\"{}\"}} 1",
            label_value(id),
            label_value(name),
            api,
        );
    }
    *BACKEND_INFO_TEXT.lock() = out;
}

/// Renders series computed at scrape time (`claw_backend_health_excluded`).
type ScrapeRenderer = Box<dyn Fn(&mut String) + Send + Sync>;

/// The scrape-time renderer of the first proxy that registers one.
static SCRAPE_RENDERER: OnceLock<ScrapeRenderer> = OnceLock::new();

/// Registers `f` to append series at every scrape (the first registration
/// in a process wins, like the recorder).
pub(crate) fn render_at_scrape(f: impl Fn(&mut String) + Send + Sync + 'static) {
    let _ = SCRAPE_RENDERER.set(Box::new(f));
}

/// A Prometheus label value, escaped (`\\`, `\"`, `\n`).
pub(crate) fn label_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Renders the Prometheus text format.
pub(crate) fn render() -> String {
    match HANDLE.get() {
        Some(Some(h)) => {
            h.run_upkeep();
            let mut out = h.render();
            out.push_str(&BACKEND_INFO_TEXT.lock());
            if let Some(f) = SCRAPE_RENDERER.get() {
                f(&mut out);
            }
            claw_telemetry::process::render(&mut out);
            out
        }
        _ => String::new(),
    }
}

/// A `&'static str` for common statuses, so labels do not allocate.
pub(crate) fn status_label(status: u16) -> &'static str {
    match status {
        200 => "200",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        408 => "408",
        413 => "413",
        429 => "429",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        s if s < 300 => "2xx",
        s if s < 400 => "3xx",
        s if s < 500 => "4xx",
        _ => "5xx",
    }
}

/// Always 1, with the proxy's version as the `version` label.
pub(crate) const BUILD_INFO: &str = "claw_build_info";
/// Always 1 per backend of the snapshot: `backend_id`, `backend` (name),
/// `pool`, `api`.
pub(crate) const BACKEND_INFO: &str = "claw_backend_info";
/// Requests answered, by model, backend and status.
pub(crate) const REQUESTS_TOTAL: &str = "claw_dp_requests_total";
/// Upstream attempts, by backend and outcome.
pub(crate) const UPSTREAM_ATTEMPTS_TOTAL: &str = "claw_dp_upstream_attempts_total";
/// Backends of the current snapshot cooling (set on every scrape).
pub(crate) const COOLDOWNS_ACTIVE: &str = "claw_dp_cooldowns_active";
/// Requests waiting for a rate-limit token, over every model's queue.
pub(crate) const QUEUE_DEPTH: &str = "claw_dp_queue_depth";
/// The applied configuration version.
pub(crate) const SNAPSHOT_VERSION: &str = "claw_dp_snapshot_version";
/// Snapshot cache writes, by `result` (`ok`, `error`).
pub(crate) const SNAPSHOT_CACHE_WRITES_TOTAL: &str = "claw_dp_snapshot_cache_writes_total";
/// The version loaded from the snapshot cache at start (0: none).
pub(crate) const SNAPSHOT_CACHE_LOADED_VERSION: &str = "claw_dp_snapshot_cache_loaded_version";
/// 1 while the discovery stream is open.
pub(crate) const DISCOVERY_CONNECTED: &str = "claw_dp_discovery_connected";
/// Snapshots larger than the discovery client's message limit.
pub(crate) const DISCOVERY_TOO_LARGE_TOTAL: &str = "claw_dp_discovery_message_too_large_total";
/// 1 while the report stream is open.
pub(crate) const REPORT_CONNECTED: &str = "claw_dp_report_connected";
/// Report batches handed to the stream (resends included).
pub(crate) const REPORT_BATCHES_SENT_TOTAL: &str = "claw_dp_report_batches_sent_total";
/// Report batches the control plane acknowledged.
pub(crate) const REPORT_BATCHES_ACKED_TOTAL: &str = "claw_dp_report_batches_acked_total";
/// Events cut or pending but not acknowledged yet.
pub(crate) const REPORT_BUFFERED_EVENTS: &str = "claw_dp_report_buffered_events";
/// Events dropped unacknowledged because the report buffer was full.
pub(crate) const REPORT_DROPPED_EVENTS_TOTAL: &str = "claw_dp_report_dropped_events_total";
/// 1 in degraded mode (equal rate shares without a control plane).
pub(crate) const DEGRADED_MODE: &str = "claw_dp_degraded_mode";
/// Upstream attempts after the first of a request.
pub(crate) const RETRIES_TOTAL: &str = "claw_dp_retries_total";
/// Outcomes or signals dropped on a full channel.
pub(crate) const EVENTS_DROPPED_TOTAL: &str = "claw_dp_events_dropped_total";
/// Selections that failed open (health marks ignored), by model.
pub(crate) const HEALTH_FAIL_OPEN_TOTAL: &str = "claw_health_fail_open_total";
/// 1 while a backend is excluded for health on this proxy.
pub(crate) const BACKEND_HEALTH_EXCLUDED: &str = "claw_backend_health_excluded";
/// Time to the first streamed token, by model.
pub(crate) const TIME_TO_FIRST_TOKEN_SECONDS: &str = "gen_ai_server_time_to_first_token_seconds";
/// Time to answer a request, by model.
pub(crate) const REQUEST_DURATION_SECONDS: &str = "gen_ai_server_request_duration_seconds";
/// Tokens per request, by model and token type.
pub(crate) const TOKEN_USAGE: &str = "gen_ai_client_token_usage";

fn flag(on: bool) -> f64 {
    if on { 1.0 } else { 0.0 }
}

/// Sets [`COOLDOWNS_ACTIVE`].
pub(crate) fn set_cooldowns_active(backends: usize) {
    metrics::gauge!(COOLDOWNS_ACTIVE).set(backends as f64);
}

/// A selection failed open for `model` ([`HEALTH_FAIL_OPEN_TOTAL`]).
pub(crate) fn health_fail_open(model: &Arc<str>) {
    metrics::counter!(HEALTH_FAIL_OPEN_TOTAL, "model" => model.to_string()).increment(1);
}

/// A request joined a wait queue ([`QUEUE_DEPTH`] + 1).
pub(crate) fn queue_joined() {
    metrics::gauge!(QUEUE_DEPTH).increment(1.0);
}

/// A request left a wait queue ([`QUEUE_DEPTH`] − 1).
pub(crate) fn queue_left() {
    metrics::gauge!(QUEUE_DEPTH).decrement(1.0);
}

/// Sets [`SNAPSHOT_VERSION`].
pub(crate) fn set_snapshot_version(version: u64) {
    metrics::gauge!(SNAPSHOT_VERSION).set(version as f64);
}

/// Counts a snapshot cache write ([`SNAPSHOT_CACHE_WRITES_TOTAL`]).
pub(crate) fn snapshot_cache_written(ok: bool) {
    let result = if ok { "ok" } else { "error" };
    metrics::counter!(SNAPSHOT_CACHE_WRITES_TOTAL, "result" => result).increment(1);
}

/// Sets [`SNAPSHOT_CACHE_LOADED_VERSION`] (0: nothing loaded).
pub(crate) fn set_snapshot_cache_loaded(version: u64) {
    metrics::gauge!(SNAPSHOT_CACHE_LOADED_VERSION).set(version as f64);
}

/// Sets [`DISCOVERY_CONNECTED`].
pub(crate) fn set_discovery_connected(up: bool) {
    metrics::gauge!(DISCOVERY_CONNECTED).set(flag(up));
}

/// Counts a snapshot refused for its size ([`DISCOVERY_TOO_LARGE_TOTAL`]).
pub(crate) fn discovery_too_large() {
    metrics::counter!(DISCOVERY_TOO_LARGE_TOTAL).increment(1);
}

/// Sets [`REPORT_CONNECTED`].
pub(crate) fn set_report_connected(up: bool) {
    metrics::gauge!(REPORT_CONNECTED).set(flag(up));
}

/// Counts a batch handed to the report stream.
pub(crate) fn report_batch_sent() {
    metrics::counter!(REPORT_BATCHES_SENT_TOTAL).increment(1);
}

/// Counts batches the control plane acknowledged.
pub(crate) fn report_batches_acked(batches: usize) {
    metrics::counter!(REPORT_BATCHES_ACKED_TOTAL).increment(batches as u64);
}

/// Sets [`REPORT_BUFFERED_EVENTS`].
pub(crate) fn set_report_buffered(events: usize) {
    metrics::gauge!(REPORT_BUFFERED_EVENTS).set(events as f64);
}

/// Counts events dropped from a full report buffer.
pub(crate) fn report_events_dropped(events: u64) {
    metrics::counter!(REPORT_DROPPED_EVENTS_TOTAL).increment(events);
}

/// Sets [`DEGRADED_MODE`].
pub(crate) fn set_degraded(on: bool) {
    metrics::gauge!(DEGRADED_MODE).set(flag(on));
}

/// The share of a client key's rpm applied to keys without their own.
pub(crate) const CLIENT_KEY_DEFAULT_SHARE: &str = "claw_dp_client_key_default_share";
/// Client keys with a share of their own.
pub(crate) const CLIENT_KEYS_WITH_SHARES: &str = "claw_dp_client_keys_with_shares";

/// Sets [`CLIENT_KEY_DEFAULT_SHARE`] and [`CLIENT_KEYS_WITH_SHARES`].
pub(crate) fn set_key_shares(default_share: f64, with_own: usize) {
    metrics::gauge!(CLIENT_KEY_DEFAULT_SHARE).set(default_share);
    metrics::gauge!(CLIENT_KEYS_WITH_SHARES).set(with_own as f64);
}

/// Metric handles of one (model, backend) pair for a successful answer,
/// registered once instead of looked up (labels allocated, key hashed) per
/// request.
pub struct CandidateMetrics {
    /// `claw_dp_upstream_attempts_total{outcome="success"}`.
    pub attempt_success: Counter,
    /// `claw_dp_requests_total{status="200"}`.
    pub requests_ok: Counter,
    /// `gen_ai_server_request_duration_seconds`.
    pub duration: Histogram,
    /// `gen_ai_client_token_usage{gen_ai_token_type="input"}`.
    pub tokens_input: Histogram,
    /// `gen_ai_client_token_usage{gen_ai_token_type="output"}`.
    pub tokens_output: Histogram,
}

impl CandidateMetrics {
    /// Registers the handles of `model` served by `backend`.
    pub fn new(model: &Arc<str>, backend: &Arc<str>) -> Self {
        CandidateMetrics {
            attempt_success: upstream_attempt_counter(backend.clone(), "success"),
            requests_ok: request_counter(model.clone(), backend.clone(), "200"),
            duration: request_duration_histogram(model.clone()),
            tokens_input: token_usage_histogram(model.clone(), "input"),
            tokens_output: token_usage_histogram(model.clone(), "output"),
        }
    }
}

impl std::fmt::Debug for CandidateMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CandidateMetrics")
    }
}

// The request path's metrics: each name and its labels written once, here.
// The handles are looked up per call (labels cloned, key hashed), as the
// inline macros did; [`CandidateMetrics`] keeps the hot ones registered.

/// The `claw_dp_requests_total{model, backend, status}` handle: requests by
/// the status the client received (`backend` empty when none answered).
#[inline]
pub(crate) fn request_counter(
    model: impl Into<SharedString>,
    backend: impl Into<SharedString>,
    status: &'static str,
) -> Counter {
    metrics::counter!(REQUESTS_TOTAL, "model" => model, "backend" => backend, "status" => status)
}

/// Counts one request in `claw_dp_requests_total`.
#[inline]
pub(crate) fn request(
    model: impl Into<SharedString>,
    backend: impl Into<SharedString>,
    status: &'static str,
) {
    request_counter(model, backend, status).increment(1);
}

/// The `claw_dp_upstream_attempts_total{backend, outcome}` handle.
#[inline]
pub(crate) fn upstream_attempt_counter(
    backend: impl Into<SharedString>,
    outcome: &'static str,
) -> Counter {
    metrics::counter!(UPSTREAM_ATTEMPTS_TOTAL, "backend" => backend, "outcome" => outcome)
}

/// Counts one upstream attempt in `claw_dp_upstream_attempts_total`.
#[inline]
pub(crate) fn upstream_attempt(backend: impl Into<SharedString>, outcome: &'static str) {
    upstream_attempt_counter(backend, outcome).increment(1);
}

/// Counts an attempt after the first (`claw_dp_retries_total`).
#[inline]
pub(crate) fn retry() {
    metrics::counter!(RETRIES_TOTAL).increment(1);
}

/// Counts an outcome or signal dropped on a full channel
/// (`claw_dp_events_dropped_total`).
#[inline]
pub(crate) fn event_dropped() {
    metrics::counter!(EVENTS_DROPPED_TOTAL).increment(1);
}

/// The `gen_ai_server_request_duration_seconds{gen_ai_request_model}` handle.
#[inline]
pub(crate) fn request_duration_histogram(model: impl Into<SharedString>) -> Histogram {
    metrics::histogram!(REQUEST_DURATION_SECONDS, "gen_ai_request_model" => model)
}

/// Records `gen_ai_server_time_to_first_token_seconds{gen_ai_request_model}`.
#[inline]
pub(crate) fn time_to_first_token(model: impl Into<SharedString>, seconds: f64) {
    metrics::histogram!(TIME_TO_FIRST_TOKEN_SECONDS, "gen_ai_request_model" => model)
        .record(seconds);
}

/// The `gen_ai_client_token_usage{gen_ai_request_model, gen_ai_token_type}`
/// handle (`kind` is `input` or `output`).
#[inline]
pub(crate) fn token_usage_histogram(
    model: impl Into<SharedString>,
    kind: &'static str,
) -> Histogram {
    metrics::histogram!(TOKEN_USAGE, "gen_ai_request_model" => model, "gen_ai_token_type" => kind)
}

/// Answers translated between protocols, by `from` (client) and `to` (backend).
pub(crate) const TRANSLATED_TOTAL: &str = "claw_dp_translated_total";
/// `cache_control` markers removed on the way to an OpenAI backend.
pub(crate) const CACHE_CONTROL_DROPPED_TOTAL: &str = "claw_dp_cache_control_dropped_total";

/// Counts an answer translated from protocol `to` (the backend's) for a
/// client of protocol `from`.
#[inline]
pub(crate) fn translated(from: &'static str, to: &'static str) {
    metrics::counter!(TRANSLATED_TOTAL, "from" => from, "to" => to).increment(1);
}

/// Name of the counter of upstream usage counts clamped as implausible.
pub(crate) const USAGE_CLAMPED_TOTAL: &str = "claw_usage_clamped_total";

/// Counts an answer of `backend` (its id) whose usage was clamped.
pub(crate) fn usage_clamped(backend: Arc<str>) {
    metrics::counter!(USAGE_CLAMPED_TOTAL, "backend" => backend).increment(1);
}

/// Counts `n` `cache_control` markers a translation removed.
#[inline]
pub(crate) fn cache_control_dropped(n: u32) {
    if n > 0 {
        metrics::counter!(CACHE_CONTROL_DROPPED_TOTAL).increment(u64::from(n));
    }
}

/// Name of the affinity counter.
pub(crate) const AFFINITY_TOTAL: &str = "claw_dp_affinity_total";

/// Counts one admitted attempt in `claw_dp_affinity_total`: `outcome` kept,
/// moved (with its `reason`) or none; `source` of the key when there is one.
#[inline]
pub(crate) fn affinity(
    outcome: &'static str,
    reason: Option<&'static str>,
    source: Option<&'static str>,
) {
    match (reason, source) {
        (Some(r), Some(s)) => {
            metrics::counter!(AFFINITY_TOTAL, "outcome" => outcome, "reason" => r, "source" => s)
                .increment(1);
        }
        (None, Some(s)) => {
            metrics::counter!(AFFINITY_TOTAL, "outcome" => outcome, "source" => s).increment(1);
        }
        (Some(r), None) => {
            metrics::counter!(AFFINITY_TOTAL, "outcome" => outcome, "reason" => r).increment(1);
        }
        (None, None) => metrics::counter!(AFFINITY_TOTAL, "outcome" => outcome).increment(1),
    }
}

/// Requests by run kind.
pub(crate) const RUN_KIND_REQUESTS_TOTAL: &str = "claw_dp_run_kind_requests_total";
/// Requests with an `x-claw-run-kind` the proxy does not know.
pub(crate) const AGENT_ID_REJECTED_TOTAL: &str = "claw_dp_agent_id_rejected_total";
pub(crate) const KEY_PARALLEL_REJECTED_TOTAL: &str = "claw_dp_key_parallel_rejected_total";
pub(crate) const WRITE_TIMEOUTS_TOTAL: &str = "claw_dp_write_timeouts_total";
pub(crate) const BODY_BUDGET_REJECTED_TOTAL: &str = "claw_dp_body_budget_rejected_total";
pub(crate) const RUN_KIND_UNRECOGNIZED_TOTAL: &str = "claw_dp_run_kind_unrecognized_total";

/// Counts a routed request in `claw_dp_run_kind_requests_total` (two
/// label values: `heartbeat`, `interactive`).
#[inline]
pub(crate) fn run_kind_request(kind: &'static str) {
    metrics::counter!(RUN_KIND_REQUESTS_TOTAL, "kind" => kind).increment(1);
}

/// Counts a request whose `x-claw-run-kind` was not recognised.
#[inline]
pub(crate) fn run_kind_unrecognized() {
    metrics::counter!(RUN_KIND_UNRECOGNIZED_TOTAL).increment(1);
}

/// Counts a dropped `x-claw-agent-id`.
#[inline]
pub(crate) fn agent_id_rejected() {
    metrics::counter!(AGENT_ID_REJECTED_TOTAL).increment(1);
}

/// Counts a request refused by its key's `max_parallel`.
#[inline]
pub(crate) fn key_parallel_rejected() {
    metrics::counter!(KEY_PARALLEL_REJECTED_TOTAL).increment(1);
}

/// Counts a response dropped by the write timeout.
#[inline]
pub(crate) fn write_timeout() {
    metrics::counter!(WRITE_TIMEOUTS_TOTAL).increment(1);
}

/// Counts a request refused by the body budget.
#[inline]
pub(crate) fn body_budget_rejected() {
    metrics::counter!(BODY_BUDGET_REJECTED_TOTAL).increment(1);
}

/// Puts the event-driven series an alert or the shipped dashboard
/// (deploy/monitoring/) needs on `/metrics` at zero from the start: an
/// `increase()` sees the first event only against an earlier sample.
fn init_zero() {
    metrics::counter!(RETRIES_TOTAL).increment(0);
    metrics::counter!(REPORT_DROPPED_EVENTS_TOTAL).increment(0);
    metrics::counter!(RUN_KIND_UNRECOGNIZED_TOTAL).increment(0);
    metrics::counter!(AGENT_ID_REJECTED_TOTAL).increment(0);
    metrics::counter!(KEY_PARALLEL_REJECTED_TOTAL).increment(0);
    metrics::counter!(BODY_BUDGET_REJECTED_TOTAL).increment(0);
    metrics::counter!(WRITE_TIMEOUTS_TOTAL).increment(0);
    metrics::gauge!(QUEUE_DEPTH).increment(0.0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backend_name_is_escaped_as_a_label_value() {
        assert_eq!(label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(label_value("openai-1"), "openai-1");
    }
}
