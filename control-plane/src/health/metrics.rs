//! Health metrics of the control plane (registered in `crate::metrics`'s
//! recorder).
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `claw_cp_backend_health` | gauge | `backend` (id): 1 routable, 0 excluded (unhealthy or ejected) |
//! | `claw_cp_backend_probes_total` | counter | `backend`, `result` (`ok`, `failed`, `auth_failed`) |
//! | `claw_cp_backend_probe_duration_seconds` | histogram | |
//! | `claw_cp_backend_ejections_total` | counter | `backend` |

/// 1 while a backend is routable, 0 while it is excluded for health.
pub const BACKEND_HEALTH: &str = "claw_cp_backend_health";
/// Probes by backend and result.
pub const BACKEND_PROBES_TOTAL: &str = "claw_cp_backend_probes_total";
/// Probe latency.
pub const BACKEND_PROBE_DURATION_SECONDS: &str = "claw_cp_backend_probe_duration_seconds";
/// Fleet-wide ejections by backend.
pub const BACKEND_EJECTIONS_TOTAL: &str = "claw_cp_backend_ejections_total";

/// Buckets of the probe latency histogram.
pub const PROBE_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Describes the metrics.
pub fn describe() {
    metrics::describe_gauge!(
        BACKEND_HEALTH,
        "1 while the backend is routable, 0 while it is excluded fleet-wide (unhealthy or ejected)"
    );
    metrics::describe_counter!(BACKEND_PROBES_TOTAL, "Health probes by backend and result");
    metrics::describe_histogram!(BACKEND_PROBE_DURATION_SECONDS, "Health probe latency");
    metrics::describe_counter!(
        BACKEND_EJECTIONS_TOTAL,
        "Fleet-wide ejections of a backend after passive failures"
    );
}

/// Sets whether `backend` is routable.
pub fn health(backend: &str, routable: bool) {
    metrics::gauge!(BACKEND_HEALTH, "backend" => backend.to_string()).set(if routable {
        1.0
    } else {
        0.0
    });
}

/// Counts one probe and its latency.
pub fn probed(backend: &str, result: &'static str, seconds: f64) {
    metrics::counter!(BACKEND_PROBES_TOTAL, "backend" => backend.to_string(), "result" => result)
        .increment(1);
    metrics::histogram!(BACKEND_PROBE_DURATION_SECONDS).record(seconds);
}

/// Counts one ejection.
pub fn ejected(backend: &str) {
    metrics::counter!(BACKEND_EJECTIONS_TOTAL, "backend" => backend.to_string()).increment(1);
}
