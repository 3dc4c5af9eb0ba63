//! Validation of configuration resources, shared by the control plane (which
//! enforces it) and `clawctl` (which runs it before sending, e.g. for
//! `apply --dry-run`). Each error names the field it is about.
//!
//! `normalize_*` fill in defaults first; `validate_*` then check the result.

use std::collections::HashSet;

use crate::Pool;
use crate::active_hours::ActiveHours;
use crate::v1::{
    Agent, Backend, ClientKey, ModelMapping, PoolSettings, SnapshotBackend, SnapshotClientKey,
};

/// A field that failed validation, e.g. `rpm: must be > 0`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// Proto field path (`models[1].canonical`, `backends[0].rpm`).
    pub field: String,
    /// What is wrong, for humans.
    pub message: String,
}

impl FieldError {
    /// An error about `field`. Both parts are bounded
    /// ([`MAX_MESSAGE_CHARS`]), so a message that echoes input of any length
    /// still fits a gRPC trailer.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: bound_message(&field.into()),
            message: bound_message(&message.into()),
        }
    }

    /// Prefixes the field path, e.g. `rpm` becomes `backends[2].rpm`.
    pub fn within(mut self, prefix: &str) -> Self {
        self.field = format!("{prefix}.{}", self.field);
        self
    }
}

type Result<T = ()> = std::result::Result<T, FieldError>;

/// Largest accepted checklist, in bytes.
pub const MAX_CHECKLIST_BYTES: usize = 64 * 1024;
/// Largest accepted prompt override, in bytes.
pub const MAX_PROMPT_BYTES: usize = 64 * 1024;
/// Default heartbeat interval: 30 minutes.
pub const DEFAULT_INTERVAL_SECONDS: u64 = 30 * 60;
/// Longest heartbeat interval: 7 days.
pub const MAX_INTERVAL_SECONDS: u64 = 7 * 24 * 3600;
/// Default busy window of an agent: interactive traffic within 2 minutes.
pub const DEFAULT_BUSY_WINDOW_SECONDS: u64 = 120;
/// Default cap on deferring a heartbeat slot: 10 minutes.
pub const DEFAULT_BUSY_DEFER_MAX_SECONDS: u64 = 600;
/// Longest run timeout an agent falls back to: 10 minutes.
pub const MAX_DEFAULT_RUN_TIMEOUT_SECONDS: u64 = 600;
/// Default upstream timeout of a backend.
pub const DEFAULT_BACKEND_TIMEOUT_MS: u64 = 120_000;
/// Prefix of server-assigned backend ids.
pub const BACKEND_ID_PREFIX: &str = "be_";
/// Prefix of server-assigned client key ids.
pub const CLIENT_KEY_ID_PREFIX: &str = "ck_";

/// Longest accepted URL (base, webhook and wake URLs), in bytes.
pub const MAX_URL_BYTES: usize = 2048;
/// Longest accepted label or display name, in bytes.
pub const MAX_LABEL_BYTES: usize = 256;
/// Most characters of user input an error message echoes ([`echo`]).
pub const MAX_ECHO_CHARS: usize = 200;
/// Most characters of any error message ([`bound_message`]).
pub const MAX_MESSAGE_CHARS: usize = 1024;

/// `value` quoted and escaped as `{:?}` does, cut to [`MAX_ECHO_CHARS`]
/// characters with `…`: what an error message may echo of user input.
pub fn echo(value: &str) -> String {
    if value.chars().count() <= MAX_ECHO_CHARS {
        return format!("{value:?}");
    }
    let head: String = value.chars().take(MAX_ECHO_CHARS).collect();
    format!("{head:?}…")
}

/// `message` cut to [`MAX_MESSAGE_CHARS`] characters with `…` (error
/// messages travel in gRPC trailers, which have a size limit).
pub fn bound_message(message: &str) -> String {
    match message.char_indices().nth(MAX_MESSAGE_CHARS) {
        None => message.to_string(),
        Some((cut, _)) => format!("{}…", &message[..cut]),
    }
}

/// A label or display name: at most [`MAX_LABEL_BYTES`], no control
/// characters (ESC, CR, LF, … would reach terminals and logs as they are).
pub fn label(field: &str, value: &str) -> Result {
    max_len(field, value, MAX_LABEL_BYTES)?;
    no_control(field, value)
}

/// Refuses control characters (C0, DEL, C1), naming the first one.
fn no_control(field: &str, value: &str) -> Result {
    match value.chars().find(|c| c.is_control()) {
        Some(c) => Err(FieldError::new(
            field,
            format!(
                "must not contain control characters (found U+{:04X})",
                u32::from(c)
            ),
        )),
        None => Ok(()),
    }
}

/// Names of backends and client keys: an ASCII letter or digit, then
/// letters, digits, `.`, `_`, `-`; at most 63 characters.
pub fn name(field: &str, value: &str) -> Result {
    if value.is_empty() {
        return Err(FieldError::new(field, "is required"));
    }
    if value.len() > 63 {
        return Err(FieldError::new(field, "must be at most 63 characters"));
    }
    let mut bytes = value.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_alphanumeric());
    let rest_ok = bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !first_ok || !rest_ok {
        return Err(FieldError::new(
            field,
            format!(
                "{} must start with a letter or digit and contain only letters, digits, '.', '_' and '-'",
                echo(value)
            ),
        ));
    }
    Ok(())
}

/// Agent ids, as `clawctl agent add --help` documents them: a lowercase
/// ASCII letter or digit, then lowercase letters, digits, `.`, `_`, `-`; at
/// most 63 characters. Lowercase only because the id is part of heartbeat
/// session keys (`agent:ID:heartbeat`), which must not differ by case alone.
pub fn agent_id(field: &str, value: &str) -> Result {
    name(field, value)?;
    if value.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(FieldError::new(
            field,
            format!(
                "{} must be lowercase: letters a-z, digits, '.', '_' and '-' (try {})",
                echo(value),
                echo(&value.to_ascii_lowercase())
            ),
        ));
    }
    Ok(())
}

/// An `http` or `https` URL with a host and no embedded credentials, at
/// most [`MAX_URL_BYTES`], of visible ASCII only (no space, CR, LF or other
/// control character: a lenient URL parser would encode or drop them, but
/// an HTTP client cannot send them), with the host written out (`http:///v1`
/// is refused, not read as host `v1`), and a valid HTTP request target.
/// The proxy holds every base URL to these rules, so what the control plane
/// accepts, every proxy can use.
pub fn http_url(field: &str, value: &str) -> Result {
    if value.is_empty() {
        return Err(FieldError::new(field, "is required"));
    }
    if value.len() > MAX_URL_BYTES {
        return Err(FieldError::new(
            field,
            format!(
                "must be at most {MAX_URL_BYTES} bytes (got {})",
                value.len()
            ),
        ));
    }
    if let Some(c) = value.chars().find(|c| !c.is_ascii_graphic()) {
        let what = match c {
            ' ' => "a space".to_string(),
            '\r' => "a carriage return (CR)".to_string(),
            '\n' => "a line feed (LF)".to_string(),
            '\t' => "a tab".to_string(),
            c if c.is_control() => format!("a control character (U+{:04X})", u32::from(c)),
            c => format!(
                "non-ASCII character U+{:04X} (use punycode and percent-encoding)",
                u32::from(c)
            ),
        };
        return Err(FieldError::new(field, format!("must not contain {what}")));
    }
    let lower = value.to_ascii_lowercase();
    let Some(rest) = lower
        .strip_prefix("http://")
        .or_else(|| lower.strip_prefix("https://"))
    else {
        let scheme = value.split_once(':').map_or("", |(s, _)| s);
        return Err(FieldError::new(
            field,
            format!(
                "must start with http:// or https:// (scheme {})",
                echo(scheme)
            ),
        ));
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.is_empty() {
        return Err(FieldError::new(
            field,
            "must name a host (e.g. https://api.example.com/v1)",
        ));
    }
    if authority.contains('@') {
        return Err(FieldError::new(
            field,
            "must not embed credentials; give the API key separately",
        ));
    }
    if value.contains('#') {
        return Err(FieldError::new(field, "must not have a #fragment"));
    }
    let url = url::Url::parse(value)
        .map_err(|e| FieldError::new(field, format!("{} is not a valid URL: {e}", echo(value))))?;
    if url.host_str().is_none_or(str::is_empty) {
        return Err(FieldError::new(field, "must name a host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(FieldError::new(
            field,
            "must not embed credentials; give the API key separately",
        ));
    }
    // What the proxy's HTTP client parses it with.
    let uri: http::Uri = value.parse().map_err(|e| {
        FieldError::new(
            field,
            format!("{} is not a valid HTTP URI: {e}", echo(value)),
        )
    })?;
    if uri.authority().is_none_or(|a| a.host().is_empty()) {
        return Err(FieldError::new(field, "must name a host"));
    }
    Ok(())
}

/// An IANA time zone name known to the bundled tz database.
pub fn timezone(field: &str, value: &str) -> Result<jiff::tz::TimeZone> {
    jiff::tz::TimeZone::get(value)
        .map_err(|_| FieldError::new(field, format!("unknown IANA time zone {}", echo(value))))
}

/// Parses an active window; empty means always active.
pub fn active_hours(field: &str, value: &str) -> Result<Option<ActiveHours>> {
    if value.trim().is_empty() {
        return Ok(None);
    }
    value
        .parse::<ActiveHours>()
        .map(Some)
        .map_err(|e| FieldError::new(field, e.to_string()))
}

fn max_len(field: &str, value: &str, max: usize) -> Result {
    if value.len() > max {
        return Err(FieldError::new(
            field,
            format!("must be at most {max} bytes"),
        ));
    }
    Ok(())
}

fn model_name(field: &str, value: &str) -> Result {
    if value.is_empty() {
        return Err(FieldError::new(field, "is required"));
    }
    max_len(field, value, 256)?;
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(FieldError::new(
            field,
            format!("{} must not contain whitespace", echo(value)),
        ));
    }
    Ok(())
}

fn cost(field: &str, value: f64) -> Result {
    if !value.is_finite() || value < 0.0 {
        return Err(FieldError::new(field, "must be a finite number >= 0"));
    }
    Ok(())
}

/// Fills in backend defaults: primary pool, weight 1, timeout, native id =
/// canonical name.
pub fn normalize_backend(b: &mut Backend) {
    b.name = b.name.trim().to_string();
    b.base_url = b.base_url.trim().trim_end_matches('/').to_string();
    if b.pool == Pool::Unspecified as i32 {
        b.pool = Pool::Primary as i32;
    }
    if b.weight == 0 {
        b.weight = 1;
    }
    if b.timeout_ms == 0 {
        b.timeout_ms = DEFAULT_BACKEND_TIMEOUT_MS;
    }
    for m in &mut b.models {
        m.canonical = m.canonical.trim().to_string();
        m.native = m.native.trim().to_string();
        if m.native.is_empty() {
            m.native = m.canonical.clone();
        }
    }
}

/// Validates one model mapping.
pub fn validate_model_mapping(m: &ModelMapping) -> Result {
    model_name("canonical", &m.canonical)?;
    model_name("native", &m.native)?;
    cost("input_cost_per_token", m.input_cost_per_token)?;
    cost("output_cost_per_token", m.output_cost_per_token)?;
    cost("cache_read_cost_per_token", m.cache_read_cost_per_token)?;
    cost("cache_write_cost_per_token", m.cache_write_cost_per_token)?;
    Ok(())
}

/// Validates a (normalized) backend. `require_key` is true on create.
pub fn validate_backend(b: &Backend, require_key: bool) -> Result {
    name("name", &b.name)?;
    if b.name.starts_with(BACKEND_ID_PREFIX) {
        return Err(FieldError::new(
            "name",
            format!("must not start with {BACKEND_ID_PREFIX:?} (reserved for ids)"),
        ));
    }
    label("label", &b.label)?;
    http_url("base_url", &b.base_url)?;
    if require_key && b.api_key.is_empty() {
        return Err(FieldError::new("api_key", "is required"));
    }
    api_key("api_key", &b.api_key)?;
    max_len("api_key_ref", &b.api_key_ref, 1024)?;
    match Pool::try_from(b.pool) {
        Ok(Pool::Primary | Pool::Fallback) => {}
        _ => return Err(FieldError::new("pool", "must be primary or fallback")),
    }
    if b.rpm == 0 {
        return Err(FieldError::new("rpm", "must be > 0"));
    }
    if b.tpm == Some(0) {
        return Err(FieldError::new(
            "tpm",
            "must be > 0 when set (leave it unset for no limit)",
        ));
    }
    if !(100..=3_600_000).contains(&b.timeout_ms) {
        return Err(FieldError::new(
            "timeout_ms",
            "must be between 100 ms and 1 hour",
        ));
    }
    if b.weight > 1000 {
        return Err(FieldError::new("weight", "must be between 1 and 1000"));
    }
    model_mappings(&b.models)
}

/// Model mappings: each valid, no canonical name twice.
fn model_mappings(models: &[ModelMapping]) -> Result {
    let mut seen = HashSet::new();
    for (i, m) in models.iter().enumerate() {
        validate_model_mapping(m).map_err(|e| e.within(&format!("models[{i}]")))?;
        if !seen.insert(m.canonical.as_str()) {
            return Err(FieldError::new(
                format!("models[{i}].canonical"),
                format!("{} is mapped twice", echo(&m.canonical)),
            ));
        }
    }
    Ok(())
}

/// An id as a snapshot carries it: present, at most 256 bytes, visible
/// ASCII.
fn resource_id(field: &str, value: &str) -> Result {
    if value.is_empty() {
        return Err(FieldError::new(field, "is required"));
    }
    max_len(field, value, 256)?;
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(FieldError::new(field, "must be visible ASCII"));
    }
    Ok(())
}

/// Validates a backend as a proxy receives it in a snapshot, by the rules
/// [`validate_backend`] applies to what the control plane stores (same
/// functions for the same fields), so a backend the control plane accepts is
/// one every proxy can use. A proxy leaves out a backend that fails this
/// and applies the rest of the snapshot.
pub fn validate_snapshot_backend(b: &SnapshotBackend) -> Result {
    resource_id("id", &b.id)?;
    name("name", &b.name)?;
    http_url("base_url", &b.base_url)?;
    api_key("api_key", &b.api_key)?;
    if b.rpm == 0 {
        return Err(FieldError::new("rpm", "must be > 0"));
    }
    model_mappings(&b.models)
}

/// Validates a client key as a proxy receives it in a snapshot: an id and
/// the SHA-256 of its secret as 64 hex characters.
pub fn validate_snapshot_client_key(k: &SnapshotClientKey) -> Result {
    resource_id("id", &k.id)?;
    let hash = k.secret_sha256.trim();
    if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(FieldError::new(
            "secret_sha256",
            "must be 64 hex characters",
        ));
    }
    Ok(())
}

/// A provider key: printable, no whitespace, at most 4 KiB. Empty is allowed
/// here (it means "unchanged" on update); creation checks presence.
pub fn api_key(field: &str, value: &str) -> Result {
    max_len(field, value, 4096)?;
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        // Never echo the value: it is a secret.
        return Err(FieldError::new(
            field,
            "must not contain whitespace or control characters",
        ));
    }
    Ok(())
}

/// Default settings of a pool.
pub fn default_pool_settings(pool: Pool) -> PoolSettings {
    PoolSettings {
        pool: pool as i32,
        cooldown_base_ms: 5_000,
        cooldown_max_ms: 300_000,
        exponential: true,
        emergency_fraction: 0.05,
        max_retries: 2,
        queue_depth: 256,
        queue_timeout_ms: 30_000,
        request_timeout_ms: 600_000,
    }
}

/// Validates pool settings.
pub fn validate_pool_settings(p: &PoolSettings) -> Result {
    match Pool::try_from(p.pool) {
        Ok(Pool::Primary | Pool::Fallback) => {}
        _ => return Err(FieldError::new("pool", "must be primary or fallback")),
    }
    if p.cooldown_base_ms == 0 {
        return Err(FieldError::new("cooldown_base_ms", "must be > 0"));
    }
    if p.cooldown_max_ms < p.cooldown_base_ms {
        return Err(FieldError::new(
            "cooldown_max_ms",
            "must be >= cooldown_base_ms",
        ));
    }
    if p.cooldown_max_ms > 24 * 3_600_000 {
        return Err(FieldError::new(
            "cooldown_max_ms",
            "must be at most 24 hours",
        ));
    }
    if !p.emergency_fraction.is_finite() || !(0.0..=1.0).contains(&p.emergency_fraction) {
        return Err(FieldError::new(
            "emergency_fraction",
            "must be between 0 and 1",
        ));
    }
    if p.max_retries > 10 {
        return Err(FieldError::new("max_retries", "must be at most 10"));
    }
    if p.queue_depth > 100_000 {
        return Err(FieldError::new("queue_depth", "must be at most 100000"));
    }
    if p.request_timeout_ms == 0 || p.request_timeout_ms > 3_600_000 {
        return Err(FieldError::new(
            "request_timeout_ms",
            "must be between 1 ms and 1 hour",
        ));
    }
    if p.queue_timeout_ms > p.request_timeout_ms {
        return Err(FieldError::new(
            "queue_timeout_ms",
            "must be <= request_timeout_ms",
        ));
    }
    Ok(())
}

/// Validates a client key description.
pub fn validate_client_key(k: &ClientKey) -> Result {
    name("name", &k.name)?;
    if k.name.starts_with(CLIENT_KEY_ID_PREFIX) {
        return Err(FieldError::new(
            "name",
            format!("must not start with {CLIENT_KEY_ID_PREFIX:?} (reserved for ids)"),
        ));
    }
    for (i, m) in k.models.iter().enumerate() {
        model_name(&format!("models[{i}]"), m)?;
    }
    if k.agents.len() > MAX_KEY_AGENTS {
        return Err(FieldError::new(
            "agents",
            format!("at most {MAX_KEY_AGENTS} agents per key"),
        ));
    }
    for (i, a) in k.agents.iter().enumerate() {
        agent_id(&format!("agents[{i}]"), a)?;
    }
    Ok(())
}

/// The most agents one client key may speak for.
pub const MAX_KEY_AGENTS: usize = 1000;

/// Fills in agent defaults: name = id, 30-minute interval, UTC.
pub fn normalize_agent(a: &mut Agent) {
    a.id = a.id.trim().to_string();
    a.active_hours = a.active_hours.trim().to_string();
    a.timezone = a.timezone.trim().to_string();
    if a.name.trim().is_empty() {
        a.name = a.id.clone();
    }
    if a.interval_seconds == 0 {
        a.interval_seconds = DEFAULT_INTERVAL_SECONDS;
    }
    if a.timezone.is_empty() {
        a.timezone = "UTC".to_string();
    }
    if a.stagger.is_none() {
        a.stagger = Some(true);
    }
    a.webhook_secret_ref = a.webhook_secret_ref.trim().to_string();
}

/// The run timeout an agent gets: its own, or `min(interval, 10 min)`.
pub fn effective_run_timeout_seconds(a: &Agent) -> u64 {
    if a.run_timeout_seconds > 0 {
        a.run_timeout_seconds
    } else {
        a.interval_seconds.clamp(1, MAX_DEFAULT_RUN_TIMEOUT_SECONDS)
    }
}

/// The catch-up window an agent gets: its own, or one interval.
pub fn effective_catch_up_seconds(a: &Agent) -> u64 {
    if a.catch_up_seconds > 0 {
        a.catch_up_seconds
    } else {
        a.interval_seconds
    }
}

/// The busy window an agent gets: its own, or 120 s.
pub fn effective_busy_window_seconds(a: &Agent) -> u64 {
    if a.busy_window_seconds > 0 {
        a.busy_window_seconds
    } else {
        DEFAULT_BUSY_WINDOW_SECONDS
    }
}

/// The deferral cap an agent gets: its own, or 10 minutes.
pub fn effective_busy_defer_max_seconds(a: &Agent) -> u64 {
    if a.busy_defer_max_seconds > 0 {
        a.busy_defer_max_seconds
    } else {
        DEFAULT_BUSY_DEFER_MAX_SECONDS
    }
}

/// Validates a (normalized) agent.
pub fn validate_agent(a: &Agent) -> Result {
    agent_id("id", &a.id)?;
    label("name", &a.name)?;
    model_name("model", &a.model)?;
    if a.interval_seconds == 0 || a.interval_seconds > MAX_INTERVAL_SECONDS {
        return Err(FieldError::new(
            "interval_seconds",
            "must be between 1 second and 7 days",
        ));
    }
    active_hours("active_hours", &a.active_hours)?;
    timezone("timezone", &a.timezone)?;
    max_len("checklist", &a.checklist, MAX_CHECKLIST_BYTES)?;
    if !a.webhook_url.is_empty() {
        http_url("webhook_url", &a.webhook_url)?;
    }
    max_len("pause_note", &a.pause_note, 1024)?;
    max_len("prompt", &a.prompt, MAX_PROMPT_BYTES)?;
    if a.run_timeout_seconds > 24 * 3600 {
        return Err(FieldError::new(
            "run_timeout_seconds",
            "must be at most 24 hours",
        ));
    }
    if a.catch_up_seconds > MAX_INTERVAL_SECONDS {
        return Err(FieldError::new(
            "catch_up_seconds",
            "must be at most 7 days",
        ));
    }
    if a.busy_window_seconds > 24 * 3600 {
        return Err(FieldError::new(
            "busy_window_seconds",
            "must be at most 24 hours",
        ));
    }
    if a.busy_defer_max_seconds > 24 * 3600 {
        return Err(FieldError::new(
            "busy_defer_max_seconds",
            "must be at most 24 hours",
        ));
    }
    if !a.webhook_secret.is_empty() && a.webhook_secret.chars().count() < 16 {
        return Err(FieldError::new(
            "webhook_secret",
            "must be at least 16 characters",
        ));
    }
    max_len("webhook_secret", &a.webhook_secret, 1024)?;
    if !a.webhook_secret_ref.is_empty() && !a.webhook_secret_ref.starts_with("env:") {
        return Err(FieldError::new(
            "webhook_secret_ref",
            "must be env:VARIABLE",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend() -> Backend {
        let mut b = Backend {
            name: "openai-1".into(),
            base_url: "https://api.example.com/v1/".into(),
            api_key: "sk-test-1234567890".into(),
            rpm: 60,
            models: vec![ModelMapping {
                canonical: "gpt-4o".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        normalize_backend(&mut b);
        b
    }

    #[test]
    fn normalized_backend_is_valid_with_defaults() {
        let b = backend();
        assert_eq!(validate_backend(&b, true), Ok(()));
        assert_eq!(b.base_url, "https://api.example.com/v1");
        assert_eq!(b.models[0].native, "gpt-4o");
        assert_eq!(b.pool, Pool::Primary as i32);
    }

    #[test]
    fn backend_errors_name_the_field() {
        let field = |f: fn(&mut Backend)| {
            let mut b = backend();
            f(&mut b);
            validate_backend(&b, true).expect_err("invalid").field
        };
        assert_eq!(field(|b| b.rpm = 0), "rpm");
        assert_eq!(field(|b| b.base_url = "ftp://x".into()), "base_url");
        assert_eq!(field(|b| b.base_url = "https://u:p@x".into()), "base_url");
        assert_eq!(field(|b| b.name = "bad name".into()), "name");
        assert_eq!(field(|b| b.name = "be_123".into()), "name");
        assert_eq!(field(|b| b.api_key = String::new()), "api_key");
        assert_eq!(field(|b| b.pool = 7), "pool");
        assert_eq!(field(|b| b.tpm = Some(0)), "tpm");
        assert_eq!(
            field(|b| b.models[0].input_cost_per_token = -1.0),
            "models[0].input_cost_per_token"
        );
        assert_eq!(
            field(|b| b.models.push(b.models[0].clone())),
            "models[1].canonical"
        );
    }

    /// Issue 17: the base URLs every proxy rejected are refused here, by
    /// the one rule both sides use; the control plane's backend validator
    /// and the proxy's snapshot validator agree on each.
    #[test]
    fn hostile_base_urls_are_refused_on_both_sides() {
        let long = format!("https://api.example.com/{}", "a".repeat(100 * 1024));
        for url in [
            "http://api.example.com/v 1",
            "http://api.example.com/v1\r\nX-Injected: 1",
            "http://api.example.com/v1\n",
            "http://api.example.com/\u{1b}[2J",
            "http:///v1",
            "http:/v1",
            "https://",
            "http://api.exämple.com/v1",
            "http://api.example.com/v1#frag",
            long.as_str(),
        ] {
            let mut b = backend();
            b.base_url = url.into();
            let e = validate_backend(&b, true).expect_err(url);
            assert_eq!(e.field, "base_url", "{url}");
            assert!(
                e.to_string().len() <= MAX_MESSAGE_CHARS + 16,
                "{url}: bounded"
            );
            let snap = SnapshotBackend {
                id: "be_1".into(),
                name: b.name.clone(),
                base_url: b.base_url.clone(),
                api_key: b.api_key.clone(),
                rpm: b.rpm,
                models: b.models.clone(),
                ..Default::default()
            };
            assert_eq!(
                validate_snapshot_backend(&snap).expect_err(url).field,
                "base_url"
            );
        }
        for ok in [
            "https://api.example.com/v1",
            "http://10.0.0.5:8000/v1",
            "http://[::1]:8080/v1?api-version=2024-01-01",
            "HTTPS://API.EXAMPLE.COM/v1",
        ] {
            assert_eq!(http_url("base_url", ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn labels_refuse_control_characters_and_echoes_are_bounded() {
        for bad in [
            "\u{1b}[31mred",
            "a\r\nb",
            "tab\there",
            "del\u{7f}",
            "c1\u{9b}",
        ] {
            let mut b = backend();
            b.label = bad.into();
            assert_eq!(validate_backend(&b, true).expect_err(bad).field, "label");
        }
        let mut b = backend();
        b.label = "Primary – EU (Zürich)".into();
        assert_eq!(validate_backend(&b, true), Ok(()));
        let huge = "x".repeat(15 * 1024);
        let e = name("name", &huge).expect_err("too long");
        assert!(e.to_string().len() < 100);
        let shown = echo(&huge);
        assert!(shown.ends_with('…') && shown.chars().count() <= MAX_ECHO_CHARS + 3);
        let e = FieldError::new("f", huge.clone());
        assert!(e.message.chars().count() <= MAX_MESSAGE_CHARS + 1);
    }

    #[test]
    fn agent_validation() {
        let mut a = Agent {
            id: "a1".into(),
            model: "gpt-4o".into(),
            ..Default::default()
        };
        normalize_agent(&mut a);
        assert_eq!(validate_agent(&a), Ok(()));
        assert_eq!(a.timezone, "UTC");
        assert_eq!(a.interval_seconds, DEFAULT_INTERVAL_SECONDS);
        let bad = |f: fn(&mut Agent)| {
            let mut b = a.clone();
            f(&mut b);
            validate_agent(&b).expect_err("invalid").field
        };
        assert_eq!(bad(|a| a.timezone = "Mars/Olympus".into()), "timezone");
        assert_eq!(
            bad(|a| a.active_hours = "09:00-09:00".into()),
            "active_hours"
        );
        assert_eq!(
            bad(|a| a.active_hours = "25:00-26:00".into()),
            "active_hours"
        );
        assert_eq!(bad(|a| a.webhook_url = "ftp://x".into()), "webhook_url");
        assert_eq!(
            bad(|a| a.checklist = "x".repeat(MAX_CHECKLIST_BYTES + 1)),
            "checklist"
        );
        assert_eq!(bad(|a| a.model = String::new()), "model");
        assert_eq!(bad(|a| a.id = "Bad_ID".into()), "id");
        assert_eq!(bad(|a| a.id = "_x".into()), "id");
        assert_eq!(bad(|a| a.id = "a".repeat(64)), "id");
        for ok in ["a1", "0.x_y-z", "ops-bot"] {
            assert_eq!(agent_id("id", ok), Ok(()), "{ok}");
        }
        assert!(
            validate_agent(&Agent {
                timezone: "Asia/Shanghai".into(),
                ..a.clone()
            })
            .is_ok()
        );
    }

    #[test]
    fn pool_settings_validation() {
        let p = default_pool_settings(Pool::Primary);
        assert_eq!(validate_pool_settings(&p), Ok(()));
        let bad = PoolSettings {
            emergency_fraction: 1.5,
            ..p
        };
        assert_eq!(
            validate_pool_settings(&bad).expect_err("invalid").field,
            "emergency_fraction"
        );
        let bad = PoolSettings {
            cooldown_max_ms: 1,
            ..p
        };
        assert_eq!(
            validate_pool_settings(&bad).expect_err("invalid").field,
            "cooldown_max_ms"
        );
    }
}
