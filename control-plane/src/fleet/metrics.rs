//! Fleet-state metrics of the control plane (registered in
//! `crate::metrics`'s recorder). The report stream's own metrics are in
//! `crate::report::metrics`.
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `claw_cp_cooldowns_active` | gauge | |
//! | `claw_cp_backend_auth_failed` | gauge | `backend` (id): 1 while the provider rejects its key |
//! | `claw_cp_cooldown_pushes_total` | counter | |
//! | `claw_cp_rate_share_assignments_total` | counter | (rate-share messages pushed) |
//! | `claw_cp_client_keys_with_shares` | gauge | (client keys assigned shares of their own) |

/// Backends cooling fleet-wide.
pub const COOLDOWNS_ACTIVE: &str = "claw_cp_cooldowns_active";
/// 1 while a backend is `auth_failed` (its key rejected, not yet updated).
pub const BACKEND_AUTH_FAILED: &str = "claw_cp_backend_auth_failed";
/// Cooldown messages pushed to proxies.
pub const COOLDOWN_PUSHES_TOTAL: &str = "claw_cp_cooldown_pushes_total";
/// Rate-share messages pushed to proxies.
pub const RATE_SHARE_ASSIGNMENTS_TOTAL: &str = "claw_cp_rate_share_assignments_total";

/// Client keys with shares of their own (recent demand).
pub const CLIENT_KEYS_WITH_SHARES: &str = "claw_cp_client_keys_with_shares";

/// Describes the metrics and initializes them at zero.
pub fn describe() {
    metrics::describe_gauge!(
        CLIENT_KEYS_WITH_SHARES,
        "Client keys whose rpm is divided between the proxies by demand (the others get the default share)"
    );
    metrics::gauge!(CLIENT_KEYS_WITH_SHARES).set(0.0);
    metrics::describe_gauge!(COOLDOWNS_ACTIVE, "Backends cooling fleet-wide");
    metrics::describe_counter!(COOLDOWN_PUSHES_TOTAL, "Cooldown messages pushed to proxies");
    metrics::describe_gauge!(
        BACKEND_AUTH_FAILED,
        "1 while the provider rejects the backend's key (until its key or URL is updated)"
    );
    metrics::describe_counter!(
        RATE_SHARE_ASSIGNMENTS_TOTAL,
        "Rate-share messages pushed to proxies"
    );
    metrics::counter!(COOLDOWN_PUSHES_TOTAL).increment(0);
    metrics::counter!(RATE_SHARE_ASSIGNMENTS_TOTAL).increment(0);
    metrics::gauge!(COOLDOWNS_ACTIVE).increment(0.0);
}

/// Sets the active cooldowns gauge.
pub fn cooldowns_active(n: usize) {
    metrics::gauge!(COOLDOWNS_ACTIVE).set(n as f64);
}

/// Sets whether `backend` is auth-failed.
pub fn backend_auth_failed(backend: &str, failed: bool) {
    metrics::gauge!(BACKEND_AUTH_FAILED, "backend" => backend.to_string()).set(if failed {
        1.0
    } else {
        0.0
    });
}

/// Counts cooldown messages pushed.
pub fn cooldown_pushed(n: usize) {
    metrics::counter!(COOLDOWN_PUSHES_TOTAL).increment(n as u64);
}

/// Counts rate-share messages pushed.
pub fn shares_pushed(n: usize) {
    metrics::counter!(RATE_SHARE_ASSIGNMENTS_TOTAL).increment(n as u64);
}

/// Sets the count of client keys with shares of their own.
pub fn keys_with_shares(n: usize) {
    metrics::gauge!(CLIENT_KEYS_WITH_SHARES).set(n as f64);
}
