//! Prometheus metrics: names, the process-wide recorder, catalog gauges and
//! a tower layer that counts and times every gRPC request.
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `claw_build_info` | gauge (always 1) | `version` |
//! | `process_*` (CPU, RSS, fds, start time) | | see [`claw_telemetry::process`] |
//! | `claw_cp_grpc_requests_total` | counter | `method`, `code` |
//! | `claw_cp_grpc_request_duration_seconds` | histogram | `method` |
//! | `claw_cp_config_version` | gauge | |
//! | `claw_cp_backends` / `claw_cp_client_keys` / `claw_cp_agents` | gauge | |
//! | `claw_cp_master_key_rotations_total` | counter | |
//! | `claw_heartbeat_*` | | see [`crate::heartbeat::metrics`] |
//! | `claw_cp_report_*` | | see [`crate::report::metrics`] |
//! | `claw_cp_cooldowns_active`, `claw_cp_cooldown_pushes_total`, `claw_cp_rate_share_*` | | see [`crate::fleet::metrics`] |
//! | `claw_cp_backend_health`, `claw_cp_backend_probes_total`, `claw_cp_backend_probe_duration_seconds`, `claw_cp_backend_ejections_total` | | see [`crate::health::metrics`] |
//! | `claw_cp_proxies_connected` | gauge | |
//! | `claw_cp_proxy_acked_version_min` | gauge | |
//! | `claw_cp_snapshot_version` | gauge | |
//! | `claw_cp_snapshots_sent_total` | counter | |
//! | `claw_cp_snapshot_nacks_total` | counter | |
//! | `claw_cp_snapshot_build_seconds` | histogram | |
//! | `claw_cp_snapshot_build_errors_total` | counter | |
//! | `claw_cp_backup_last_success_timestamp_seconds` | gauge | |
//! | `claw_cp_backup_last_size_bytes` | gauge | |
//! | `claw_cp_backup_failures_total` | counter | |
//! | `claw_cp_store_free_bytes`, `claw_cp_store_reserve_bytes`, `claw_cp_store_low_space`, `claw_cp_store_writes_refused_total` | | see [`crate::store::space`] |
//!
//! The fleet's progress is one gauge, the lowest version acknowledged by a
//! connected proxy, rather than a gauge per node id: node ids default to
//! host names, which churn with every deployment, and a per-node series
//! would outlive its proxy.

use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Instant;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::catalog::Catalog;

/// Always 1, with the control plane's version as the `version` label.
pub(crate) const BUILD_INFO: &str = "claw_build_info";
/// gRPC requests by method and status code.
pub(crate) const GRPC_REQUESTS_TOTAL: &str = "claw_cp_grpc_requests_total";
/// gRPC request latency by method.
pub(crate) const GRPC_REQUEST_DURATION_SECONDS: &str = "claw_cp_grpc_request_duration_seconds";
/// Current configuration version.
pub(crate) const CONFIG_VERSION: &str = "claw_cp_config_version";
/// Number of backends.
pub(crate) const BACKENDS: &str = "claw_cp_backends";
/// Number of client keys.
pub(crate) const CLIENT_KEYS: &str = "claw_cp_client_keys";
/// Number of agents.
pub(crate) const AGENTS: &str = "claw_cp_agents";
/// Master key rotations since start.
pub(crate) const MASTER_KEY_ROTATIONS_TOTAL: &str = "claw_cp_master_key_rotations_total";
/// Proxies with an open discovery stream.
pub(crate) const PROXIES_CONNECTED: &str = "claw_cp_proxies_connected";
/// Lowest configuration version acknowledged by a connected proxy (0 when
/// none is connected or one has acknowledged nothing yet).
pub(crate) const PROXY_ACKED_VERSION_MIN: &str = "claw_cp_proxy_acked_version_min";
/// Version of the snapshot the discovery stream currently distributes.
pub(crate) const SNAPSHOT_VERSION: &str = "claw_cp_snapshot_version";
/// Snapshots sent to proxies.
pub(crate) const SNAPSHOTS_SENT_TOTAL: &str = "claw_cp_snapshots_sent_total";
/// Snapshots proxies rejected.
pub(crate) const SNAPSHOT_NACKS_TOTAL: &str = "claw_cp_snapshot_nacks_total";
/// Time to build one snapshot (consistent read and decryption).
pub(crate) const SNAPSHOT_BUILD_SECONDS: &str = "claw_cp_snapshot_build_seconds";
/// Snapshot builds that failed (the previous snapshot stays in force).
pub(crate) const SNAPSHOT_BUILD_ERRORS_TOTAL: &str = "claw_cp_snapshot_build_errors_total";

/// Unix time of the last backup written (scheduled or streamed).
pub(crate) const BACKUP_LAST_SUCCESS: &str = "claw_cp_backup_last_success_timestamp_seconds";
/// Size of the last backup written.
pub(crate) const BACKUP_LAST_SIZE: &str = "claw_cp_backup_last_size_bytes";
/// Backups that failed.
pub(crate) const BACKUP_FAILURES_TOTAL: &str = "claw_cp_backup_failures_total";

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// The process-wide Prometheus handle. The first call installs the global
/// recorder; later calls (a second server in the same test process) reuse
/// it. If another recorder was installed first, metrics go there and the
/// returned handle renders an empty page.
pub(crate) fn handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(GRPC_REQUEST_DURATION_SECONDS.to_string()),
                    LATENCY_BUCKETS,
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(SNAPSHOT_BUILD_SECONDS.to_string()),
                        LATENCY_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(crate::heartbeat::metrics::DISPATCH_LAG_SECONDS.to_string()),
                        crate::heartbeat::metrics::LAG_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(crate::report::metrics::REPORT_LAG_SECONDS.to_string()),
                        crate::report::metrics::LAG_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(
                            crate::health::metrics::BACKEND_PROBE_DURATION_SECONDS.to_string(),
                        ),
                        crate::health::metrics::PROBE_BUCKETS,
                    )
                });
            let builder = match builder {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "latency buckets rejected; using summaries");
                    PrometheusBuilder::new()
                }
            };
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if let Err(e) = metrics::set_global_recorder(recorder) {
                tracing::warn!(error = %e, "a metrics recorder was already installed");
            }
            describe();
            metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            handle
        })
        .clone()
}

/// The Prometheus text of `/metrics`: the recorder's metrics and the
/// process ones ([`claw_telemetry::process`]).
pub(crate) fn render(handle: &PrometheusHandle) -> String {
    let mut out = handle.render();
    claw_telemetry::process::render(&mut out);
    out
}

/// Gives every metric of the control plane its help text (`# HELP`), once,
/// when the recorder is installed: the heartbeat, report and fleet metrics
/// too, whichever of them starts first.
fn describe() {
    metrics::describe_gauge!(
        BUILD_INFO,
        "Always 1; the control plane's version is the `version` label"
    );
    crate::heartbeat::metrics::describe();
    crate::report::metrics::describe();
    crate::fleet::metrics::describe();
    crate::health::metrics::describe();
    crate::store::space::describe();
    metrics::describe_counter!(
        GRPC_REQUESTS_TOTAL,
        "gRPC requests by method and status code"
    );
    metrics::describe_histogram!(
        GRPC_REQUEST_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "gRPC request latency"
    );
    metrics::describe_gauge!(CONFIG_VERSION, "Current configuration version");
    metrics::describe_gauge!(BACKENDS, "Configured backends");
    metrics::describe_gauge!(CLIENT_KEYS, "Configured client keys");
    metrics::describe_gauge!(AGENTS, "Configured agents");
    metrics::describe_counter!(
        MASTER_KEY_ROTATIONS_TOTAL,
        "Master key rotations since the process started"
    );
    metrics::describe_gauge!(PROXIES_CONNECTED, "Proxies with an open discovery stream");
    metrics::describe_gauge!(
        PROXY_ACKED_VERSION_MIN,
        "Lowest configuration version acknowledged by a connected proxy"
    );
    metrics::describe_gauge!(
        SNAPSHOT_VERSION,
        "Configuration version of the snapshot being distributed"
    );
    metrics::describe_counter!(SNAPSHOTS_SENT_TOTAL, "Snapshots sent to proxies");
    metrics::describe_counter!(SNAPSHOT_NACKS_TOTAL, "Snapshots rejected by proxies");
    metrics::describe_histogram!(
        SNAPSHOT_BUILD_SECONDS,
        metrics::Unit::Seconds,
        "Time to read and decrypt one configuration snapshot"
    );
    metrics::describe_counter!(
        SNAPSHOT_BUILD_ERRORS_TOTAL,
        "Snapshot builds that failed; the previous snapshot stays in force"
    );
    metrics::describe_gauge!(
        BACKUP_LAST_SUCCESS,
        metrics::Unit::Seconds,
        "Unix time of the last backup written (scheduled or clawctl backup create)"
    );
    metrics::describe_gauge!(
        BACKUP_LAST_SIZE,
        metrics::Unit::Bytes,
        "Size of the last backup written"
    );
    metrics::describe_counter!(BACKUP_FAILURES_TOTAL, "Backups that failed");
}

/// Records a backup written: its size, and now as the last success.
pub(crate) fn backup_succeeded(size: u64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default();
    metrics::gauge!(BACKUP_LAST_SUCCESS).set(now);
    metrics::gauge!(BACKUP_LAST_SIZE).set(size as f64);
}

/// Counts a failed backup.
pub(crate) fn backup_failed() {
    metrics::counter!(BACKUP_FAILURES_TOTAL).increment(1);
}

/// Sets the catalog gauges from the current state.
pub(crate) fn record_catalog(catalog: &Catalog) {
    metrics::gauge!(CONFIG_VERSION).set(catalog.config_version() as f64);
    match catalog.info() {
        Ok(info) => {
            metrics::gauge!(BACKENDS).set(info.backends as f64);
            metrics::gauge!(CLIENT_KEYS).set(info.client_keys as f64);
            metrics::gauge!(AGENTS).set(info.agents as f64);
        }
        Err(e) => tracing::warn!(error = %e, "cannot count catalog resources"),
    }
}

/// Counts a successful master key rotation.
pub(crate) fn master_key_rotated() {
    metrics::counter!(MASTER_KEY_ROTATIONS_TOTAL).increment(1);
}

/// Sets the fleet gauges: connected proxies and the lowest version one of
/// them acknowledged.
pub(crate) fn record_proxies(connected: usize, min_acked_version: u64) {
    metrics::gauge!(PROXIES_CONNECTED).set(connected as f64);
    metrics::gauge!(PROXY_ACKED_VERSION_MIN).set(min_acked_version as f64);
}

/// Records a snapshot build: its duration, and the version now distributed
/// (`None` when the build failed).
pub(crate) fn snapshot_built(seconds: f64, version: Option<u64>) {
    metrics::histogram!(SNAPSHOT_BUILD_SECONDS).record(seconds);
    match version {
        Some(v) => metrics::gauge!(SNAPSHOT_VERSION).set(v as f64),
        None => metrics::counter!(SNAPSHOT_BUILD_ERRORS_TOTAL).increment(1),
    }
}

/// Counts a snapshot sent to a proxy.
pub(crate) fn snapshot_sent() {
    metrics::counter!(SNAPSHOTS_SENT_TOTAL).increment(1);
}

/// Counts a snapshot a proxy rejected.
pub(crate) fn snapshot_nacked() {
    metrics::counter!(SNAPSHOT_NACKS_TOTAL).increment(1);
}

/// Keeps `/metrics` initialized with every gauge and counter at zero.
pub(crate) fn touch() {
    metrics::counter!(MASTER_KEY_ROTATIONS_TOTAL).increment(0);
    metrics::counter!(SNAPSHOTS_SENT_TOTAL).increment(0);
    metrics::counter!(SNAPSHOT_NACKS_TOTAL).increment(0);
    metrics::counter!(SNAPSHOT_BUILD_ERRORS_TOTAL).increment(0);
    metrics::counter!(BACKUP_FAILURES_TOTAL).increment(0);
    metrics::gauge!(PROXIES_CONNECTED).increment(0.0);
    metrics::gauge!(PROXY_ACKED_VERSION_MIN).increment(0.0);
}

/// Counts and times every gRPC request passing through the server.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct GrpcMetricsLayer;

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics { inner }
    }
}

/// The service made by [`GrpcMetricsLayer`].
#[derive(Debug, Clone)]
pub(crate) struct GrpcMetrics<S> {
    inner: S,
}

/// The status code of a response whose status is in its headers (errors,
/// which tonic sends trailers-only); a response without one is a success
/// whose `grpc-status: 0` follows in the trailers.
fn response_code(headers: &http::HeaderMap) -> tonic::Code {
    headers
        .get("grpc-status")
        .map(|v| tonic::Code::from_bytes(v.as_bytes()))
        .unwrap_or(tonic::Code::Ok)
}

/// The method label. Unknown methods (answered `Unimplemented`) share one
/// label so that callers cannot create unbounded label values.
fn method_label(path: &str, code: tonic::Code) -> String {
    if code == tonic::Code::Unimplemented {
        "unknown".to_string()
    } else {
        path.trim_start_matches('/').to_string()
    }
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for GrpcMetrics<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let path = request.uri().path().to_string();
        let start = Instant::now();
        let future = self.inner.call(request);
        Box::pin(async move {
            let result = future.await;
            let code = match &result {
                Ok(response) => response_code(response.headers()),
                Err(_) => tonic::Code::Internal,
            };
            let method = method_label(&path, code);
            metrics::histogram!(GRPC_REQUEST_DURATION_SECONDS, "method" => method.clone())
                .record(start.elapsed().as_secs_f64());
            metrics::counter!(GRPC_REQUESTS_TOTAL, "method" => method, "code" => format!("{code:?}"))
                .increment(1);
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        let mut h = http::HeaderMap::new();
        assert_eq!(response_code(&h), tonic::Code::Ok);
        h.insert("grpc-status", http::HeaderValue::from_static("16"));
        assert_eq!(response_code(&h), tonic::Code::Unauthenticated);
        assert_eq!(
            method_label("/claw.v1.BackendService/ListBackends", tonic::Code::Ok),
            "claw.v1.BackendService/ListBackends"
        );
        assert_eq!(method_label("/x/y", tonic::Code::Unimplemented), "unknown");
    }

    #[test]
    fn handle_can_be_taken_twice() {
        let a = handle();
        let b = handle();
        metrics::counter!(MASTER_KEY_ROTATIONS_TOTAL).increment(0);
        // The same page; the exporter's order of metric families varies.
        let lines = |h: &PrometheusHandle| {
            let mut l: Vec<String> = h.render().lines().map(str::to_owned).collect();
            l.sort();
            l
        };
        assert_eq!(lines(&a), lines(&b));
        assert!(
            lines(&a)
                .iter()
                .any(|l| l.starts_with("claw_build_info{version=")),
            "{:?}",
            lines(&a)
        );
    }
}
