//! `clawctl backend add|list|get|update|rm|enable|disable`.

use anyhow::Context;
use claw_proto::Pool;
use claw_proto::probe_settings;
use claw_proto::v1::{
    Api, Backend, BackendHealth, CreateBackendRequest, DeleteBackendRequest, GetBackendRequest,
    HealthState, ProbeSettings, SetBackendEnabledRequest, UpdateBackendRequest,
};

use crate::api_key::KeySource;
use crate::cli::{
    ApiKeyArgs, BackendAddArgs, BackendCmd, BackendUpdateArgs, NewApiKeyArgs, ProbeArgs,
};
use crate::document::BackendDoc;
use crate::duration;
use crate::output::{self, Details, Table};
use crate::session::Session;

/// Runs a `backend` verb.
pub(crate) async fn run(session: &Session, cmd: BackendCmd) -> anyhow::Result<()> {
    match cmd {
        BackendCmd::Add(args) => add(session, args).await,
        BackendCmd::List => list(session).await,
        BackendCmd::Get(t) => {
            let conn = session.connect().await?;
            let resp = conn
                .call(
                    conn.backends()
                        .get_backend(GetBackendRequest { backend: t.name }),
                )
                .await?;
            let b = resp.backend.unwrap_or_default();
            warn_unreferenced(session, std::slice::from_ref(&b));
            emit_resource(
                session,
                &b,
                || BackendDoc::from(&b),
                |out| details(&b).write(out),
            )
        }
        BackendCmd::Update(args) => update(session, args).await,
        BackendCmd::Rm(t) => {
            let conn = session.connect().await?;
            let resp = conn
                .call(conn.backends().delete_backend(DeleteBackendRequest {
                    backend: t.name.clone(),
                }))
                .await?;
            session.emit(&resp, |out| writeln!(out, "backend/{} deleted", t.name))
        }
        BackendCmd::Enable(t) => set_enabled(session, t.name, true).await,
        BackendCmd::Disable(t) => set_enabled(session, t.name, false).await,
    }
}

async fn add(session: &Session, args: BackendAddArgs) -> anyhow::Result<()> {
    let source = key_source(args.key);
    // Read the key before connecting: a missing variable or file sends nothing.
    let api_key = source.read().with_context(|| flag_of(&source))?;
    let api_key_ref = source.reference()?;
    let probe = ProbePatch::from_flags(&args.probe, false)?.on(ProbeSettings::default());
    check_probe(&probe)?;
    let backend = Backend {
        name: args.name,
        label: args.label.unwrap_or_default(),
        base_url: args.url,
        api_key,
        api_key_ref,
        pool: Pool::from(args.pool) as i32,
        api: Api::from(args.api) as i32,
        rpm: args.rpm,
        tpm: args.tpm,
        timeout_ms: args.upstream_timeout.map(ms).transpose()?.unwrap_or(0),
        weight: args.weight.unwrap_or(0),
        enabled: !args.disabled,
        native_only: args.native_only,
        models: args.models,
        probe: (!probe_settings::is_default(&probe)).then_some(probe),
        ..Default::default()
    };
    let conn = session.connect().await?;
    let resp = conn
        .call(conn.backends().create_backend(CreateBackendRequest {
            backend: Some(backend),
        }))
        .await?;
    let b = resp.backend.unwrap_or_default();
    crate::served::warn_disabled_backend(&conn, &b).await;
    print_one(session, &b)
}

async fn update(session: &Session, args: BackendUpdateArgs) -> anyhow::Result<()> {
    let probe = ProbePatch::from_flags(&args.probe, args.probe_again)?;
    let mut req = UpdateBackendRequest {
        backend: args.backend,
        name: args.name,
        label: args.label,
        base_url: args.url,
        pool: args.pool.map(|p| Pool::from(p) as i32).unwrap_or(0),
        api: args.api.map(|a| Api::from(a) as i32).unwrap_or(0),
        rpm: args.rpm,
        tpm: args.tpm,
        timeout_ms: args.upstream_timeout.map(ms).transpose()?,
        weight: args.weight,
        enabled: args.enabled,
        native_only: args.native_only,
        replace_models: !args.models.is_empty() || args.clear_models,
        models: args.models,
        ..Default::default()
    };
    if let Some(source) = new_key_source(args.key) {
        req.api_key = Some(source.read().with_context(|| flag_of(&source))?);
        req.api_key_ref = Some(source.reference()?);
    }
    let conn = session.connect().await?;
    if !probe.is_empty() {
        // The API replaces the settings whole: change only the flags given.
        let current = conn
            .call(conn.backends().get_backend(GetBackendRequest {
                backend: req.backend.clone(),
            }))
            .await?
            .backend
            .unwrap_or_default();
        let merged = probe.on(current.probe.unwrap_or_default());
        check_probe(&merged)?;
        req.probe = Some(merged);
    }
    let resp = conn.call(conn.backends().update_backend(req)).await?;
    let b = resp.backend.unwrap_or_default();
    crate::served::warn_disabled_backend(&conn, &b).await;
    print_one(session, &b)
}

async fn list(session: &Session) -> anyhow::Result<()> {
    let conn = session.connect().await?;
    let resp = conn.list_backends_all().await?;
    warn_unreferenced(session, &resp.backends);
    emit_resource(
        session,
        &resp.backends,
        || {
            resp.backends
                .iter()
                .map(BackendDoc::from)
                .collect::<Vec<_>>()
        },
        |out| table(&resp.backends).write(out),
    )
}

/// Like [`Session::emit_resource`]: `-o yaml` prints the backend's entry
/// (or entries) of the `export` document, through the document's own
/// writer so prices read `0.0000025` there too; JSON stays the API message.
fn emit_resource<T, D>(
    session: &Session,
    value: &T,
    document: impl FnOnce() -> D,
    table: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>,
) -> anyhow::Result<()>
where
    T: serde::Serialize + ?Sized,
    D: serde::Serialize,
{
    if session.format != crate::output::Format::Yaml {
        return session.emit(value, table);
    }
    use std::io::Write as _;
    let text = crate::document::entries_to_yaml(&document())?;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

/// `-o yaml` writes a made-up `api_key_env` for a backend whose key was
/// given on standard input (as `export` does): say so, on stderr.
fn warn_unreferenced(session: &Session, backends: &[Backend]) {
    if session.format != crate::output::Format::Yaml {
        return;
    }
    for b in backends
        .iter()
        .filter(|b| !BackendDoc::has_key_reference(b))
    {
        crate::session::warn(format!(
            "backend {} has no stored key reference; shown as api_key_env: {} (set it before applying)",
            b.name,
            crate::document::placeholder_env(&b.name)
        ));
    }
}

/// The probe flags given on the command line, in the API's units.
#[derive(Debug, Default)]
struct ProbePatch {
    interval_ms: Option<u64>,
    timeout_ms: Option<u64>,
    failures: Option<u32>,
    disabled: Option<bool>,
}

impl ProbePatch {
    /// Converts the flags (`--probe` re-enables probing on update).
    fn from_flags(args: &ProbeArgs, probe_again: bool) -> anyhow::Result<ProbePatch> {
        let ms = |flag: &str, d: Option<std::time::Duration>| {
            d.map(|d| duration::to_millis(d).map_err(|e| anyhow::anyhow!("{flag}: {e}")))
                .transpose()
        };
        let patch = ProbePatch {
            interval_ms: ms("--probe-interval", args.probe_interval)?,
            timeout_ms: ms("--probe-timeout", args.probe_timeout)?,
            failures: args.probe_failures,
            disabled: if args.no_probe {
                Some(true)
            } else if probe_again {
                Some(false)
            } else {
                None
            },
        };
        // Each value's own bounds, before anything is sent.
        check_probe(&patch.on(ProbeSettings::default()))?;
        Ok(patch)
    }

    fn is_empty(&self) -> bool {
        self.interval_ms.is_none()
            && self.timeout_ms.is_none()
            && self.failures.is_none()
            && self.disabled.is_none()
    }

    /// `base` with the given flags applied.
    fn on(&self, base: ProbeSettings) -> ProbeSettings {
        ProbeSettings {
            interval_ms: self.interval_ms.unwrap_or(base.interval_ms),
            timeout_ms: self.timeout_ms.unwrap_or(base.timeout_ms),
            failures: self.failures.unwrap_or(base.failures),
            disabled: self.disabled.unwrap_or(base.disabled),
        }
    }
}

/// The server's probe rules, with errors naming the flag.
fn check_probe(p: &ProbeSettings) -> anyhow::Result<()> {
    probe_settings::validate(p).map_err(|e| {
        let flag = match e.field.as_str() {
            "probe.interval_ms" => "--probe-interval",
            "probe.timeout_ms" => "--probe-timeout",
            _ => "--probe-failures",
        };
        anyhow::anyhow!("{flag}: {}", e.message)
    })
}

async fn set_enabled(session: &Session, backend: String, enabled: bool) -> anyhow::Result<()> {
    let conn = session.connect().await?;
    let resp = conn
        .call(
            conn.backends()
                .set_backend_enabled(SetBackendEnabledRequest { backend, enabled }),
        )
        .await?;
    print_one(session, &resp.backend.unwrap_or_default())
}

fn print_one(session: &Session, b: &Backend) -> anyhow::Result<()> {
    warn_unreferenced(session, std::slice::from_ref(b));
    emit_resource(
        session,
        b,
        || BackendDoc::from(b),
        |out| table(std::slice::from_ref(b)).write(out),
    )
}

fn ms(d: std::time::Duration) -> anyhow::Result<u64> {
    duration::to_millis(d).map_err(|e| anyhow::anyhow!("--upstream-timeout: {e}"))
}

fn key_source(args: ApiKeyArgs) -> KeySource {
    match (args.api_key_env, args.api_key_file) {
        (Some(var), _) => KeySource::Env(var),
        (None, Some(path)) => KeySource::File(path),
        // clap guarantees exactly one of the three.
        (None, None) => KeySource::Stdin,
    }
}

fn new_key_source(args: NewApiKeyArgs) -> Option<KeySource> {
    match (args.api_key_env, args.api_key_file, args.api_key_stdin) {
        (Some(var), _, _) => Some(KeySource::Env(var)),
        (None, Some(path), _) => Some(KeySource::File(path)),
        (None, None, true) => Some(KeySource::Stdin),
        (None, None, false) => None,
    }
}

fn flag_of(source: &KeySource) -> &'static str {
    match source {
        KeySource::Env(_) => "--api-key-env",
        KeySource::File(_) => "--api-key-file",
        KeySource::Stdin => "--api-key-stdin",
    }
}

/// The list view: one row per backend.
pub(crate) fn table(backends: &[Backend]) -> Table {
    let mut t = Table::new(&[
        "NAME",
        "ID",
        "API",
        "NATIVE ONLY",
        "POOL",
        "STATUS",
        "HEALTH",
        "RPM",
        "TPM",
        "MODELS",
        "URL",
        "API KEY",
    ]);
    for b in backends {
        t.row(vec![
            b.name.clone(),
            b.id.clone(),
            api_name(b.api).to_string(),
            yes_no(b.native_only).to_string(),
            pool_name(b.pool).to_string(),
            status(b),
            health_name(b.health.as_ref()).to_string(),
            b.rpm.to_string(),
            b.tpm.map(|t| t.to_string()).unwrap_or_default(),
            b.models
                .iter()
                .map(|m| m.canonical.as_str())
                .collect::<Vec<_>>()
                .join(","),
            b.base_url.clone(),
            b.api_key.clone(),
        ]);
    }
    t
}

fn status(b: &Backend) -> String {
    let status = if b.status.is_empty() {
        if b.enabled { "enabled" } else { "disabled" }.to_string()
    } else {
        b.status.clone()
    };
    if status == "quota_exhausted" && b.quota_exhausted_until.is_some() {
        format!(
            "{status} until {}",
            output::timestamp(&b.quota_exhausted_until)
        )
    } else {
        status
    }
}

/// The health state's short name; `unknown` before the control plane has a
/// verdict (or from one that does not report health).
fn health_name(h: Option<&BackendHealth>) -> &'static str {
    match h.map(|h| HealthState::try_from(h.state)) {
        Some(Ok(HealthState::Healthy)) => "healthy",
        Some(Ok(HealthState::Unhealthy)) => "unhealthy",
        Some(Ok(HealthState::Ejected)) => "ejected",
        Some(Ok(HealthState::NotProbed)) => "not_probed",
        _ => "unknown",
    }
}

/// `3m ago (2026-12-01T18:00:00Z)`, or `never` when unset.
fn when(ts: &Option<prost_types::Timestamp>, now_s: i64) -> String {
    let Some(t) = ts else {
        return "never".to_string();
    };
    format!("{} ({})", relative(t.seconds, now_s), output::timestamp(ts))
}

/// `42s ago`, `3m ago`, `5h ago`, `2d ago` (or `in 3m` for a future time).
fn relative(at_s: i64, now_s: i64) -> String {
    let d = now_s.saturating_sub(at_s);
    let n = d.unsigned_abs();
    let span = match n {
        0..60 => format!("{n}s"),
        60..3600 => format!("{}m", n / 60),
        3600..86400 => format!("{}h", n / 3600),
        _ => format!("{}d", n / 86400),
    };
    if d >= 0 {
        format!("{span} ago")
    } else {
        format!("in {span}")
    }
}

/// The probe settings, `default` where the control plane's flag applies.
fn probe_text(p: Option<&ProbeSettings>) -> String {
    let p = p.copied().unwrap_or_default();
    if p.disabled {
        return "disabled (passive health only)".to_string();
    }
    let ms = |v: u64| {
        if v == 0 {
            "default".to_string()
        } else {
            duration::format_ms(v)
        }
    };
    let failures = if p.failures == 0 {
        "default".to_string()
    } else {
        p.failures.to_string()
    };
    format!(
        "interval {}, timeout {}, failures {}",
        ms(p.interval_ms),
        ms(p.timeout_ms),
        failures
    )
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The health rows of `backend get`.
fn health_details(details: Details, b: &Backend, now_s: i64) -> Details {
    let details = details.field("Health", health_name(b.health.as_ref()));
    let Some(h) = &b.health else {
        return details.field("Probe", probe_text(b.probe.as_ref()));
    };
    let last_probe = if h.last_probe.is_some() {
        format!("{}: {}", when(&h.last_probe, now_s), h.last_probe_result)
    } else {
        "never".to_string()
    };
    let details = details
        .field("Health since", when(&h.since, now_s))
        .field("Last probe", last_probe)
        .field("Failures in a row", h.consecutive_failures.to_string())
        .field("Health reason", &h.reason);
    let details = if h.ejected_until.is_some() {
        details.field("Ejected until", when(&h.ejected_until, now_s))
    } else {
        details
    };
    details.field("Probe", probe_text(b.probe.as_ref()))
}

/// `openai`/`anthropic` for an enum field as prost stores it (unspecified is
/// openai, the default).
pub(crate) fn api_name(api: i32) -> &'static str {
    Api::try_from(api).map(Api::name).unwrap_or("unknown")
}

/// `primary`/`fallback` for an enum field as prost stores it.
pub(crate) fn pool_name(pool: i32) -> &'static str {
    Pool::try_from(pool).map(Pool::name).unwrap_or("unknown")
}

fn details(b: &Backend) -> Details {
    let mut models = Table::new(&[
        "CANONICAL",
        "NATIVE",
        "IN $/MTOK",
        "OUT $/MTOK",
        "CACHE READ $/MTOK",
        "CACHE WRITE $/MTOK",
        "CACHE WRITE 1H $/MTOK",
        "CONTEXT",
        "MAX TOKENS",
    ]);
    for m in &b.models {
        models.row(vec![
            m.canonical.clone(),
            m.native.clone(),
            per_million(m.input_cost_per_token),
            per_million(m.output_cost_per_token),
            per_million(m.cache_read_cost_per_token),
            per_million(m.cache_write_cost_per_token),
            cache_write_1h(m),
            count(m.context_window),
            count(m.max_tokens),
        ]);
    }
    let mut rendered = Vec::new();
    // Writing to a Vec cannot fail.
    let _ = models.write(&mut rendered);
    let models = if b.models.is_empty() {
        "none".to_string()
    } else {
        String::from_utf8_lossy(&rendered).trim_end().to_string() + "\n"
    };
    let details = Details::new()
        .field("Name", &b.name)
        .field("ID", &b.id)
        .field("Label", &b.label)
        .field("API", api_name(b.api))
        .field("Native only", yes_no(b.native_only))
        .field("URL", &b.base_url)
        .field("API key", &b.api_key)
        .field("Key source", &b.api_key_ref)
        .field("Pool", pool_name(b.pool))
        .field("Status", status(b));
    // Only while the provider reports the quota spent (a disabled backend's
    // status does not say so).
    let details = if b.quota_exhausted_until.is_some() {
        details.field(
            "Quota exhausted until",
            output::timestamp(&b.quota_exhausted_until),
        )
    } else {
        details
    };
    // The provider rejected the gateway's key: say how it ends.
    let details = if b.status == "auth_failed" {
        details.field(
            "Auth failed",
            format!(
                "the provider rejected its key (401/403); excluded until \
                 `clawctl backend update {} --api-key-env VAR` (or --url)",
                b.name
            ),
        )
    } else {
        details
    };
    health_details(details, b, now_s())
        .field("RPM", b.rpm.to_string())
        .field(
            "TPM",
            b.tpm.map_or("unlimited".to_string(), |t| t.to_string()),
        )
        .field("Timeout", duration::format_ms(b.timeout_ms))
        .field("Weight", b.weight.to_string())
        .field("Created", output::timestamp(&b.created_at))
        .field("Updated", output::timestamp(&b.updated_at))
        .field("Models", models)
}

/// `yes`/`no` for a flag in the human views.
fn yes_no(v: bool) -> &'static str {
    if v { "yes" } else { "no" }
}

fn per_million(usd_per_token: f64) -> String {
    let v = usd_per_token * 1e6;
    let s = format!("{v:.4}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// The 1-hour cache write price; unset (0) falls back to the 5-minute one,
/// which the table says so nobody reads "0" as free.
fn cache_write_1h(m: &claw_proto::v1::ModelMapping) -> String {
    if m.cache_write_1h_cost_per_token == 0.0 && m.cache_write_cost_per_token != 0.0 {
        format!("{} (= 5m)", per_million(m.cache_write_cost_per_token))
    } else {
        per_million(m.cache_write_1h_cost_per_token)
    }
}

fn count(n: u32) -> String {
    if n == 0 { String::new() } else { n.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(d: &Details) -> String {
        let mut out = Vec::new();
        d.write(&mut out).expect("write to a Vec");
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn a_spent_quota_shows_in_status_and_details_only_while_reported() {
        let until = Some(prost_types::Timestamp {
            seconds: 1_800_000_000,
            nanos: 0,
        });
        let b = Backend {
            name: "claude-1".into(),
            api: Api::Anthropic as i32,
            enabled: true,
            status: "quota_exhausted".into(),
            quota_exhausted_until: until,
            ..Default::default()
        };
        assert!(
            status(&b).starts_with("quota_exhausted until 2027-"),
            "{}",
            status(&b)
        );
        let text = render(&details(&b));
        assert!(text.contains("Quota exhausted until:"), "{text}");
        assert!(text.contains("anthropic"), "{text}");
        let ok = Backend {
            status: "enabled".into(),
            quota_exhausted_until: None,
            ..b
        };
        assert_eq!(status(&ok), "enabled");
        assert!(!render(&details(&ok)).contains("Quota"));
        assert_eq!(api_name(0), "openai", "unspecified reads as the default");
    }

    #[test]
    fn a_rejected_key_shows_in_status_and_says_how_it_ends() {
        let b = Backend {
            name: "b1".into(),
            enabled: true,
            status: "auth_failed".into(),
            ..Default::default()
        };
        assert_eq!(status(&b), "auth_failed");
        let text = render(&details(&b));
        assert!(
            text.contains("clawctl backend update b1 --api-key-env"),
            "{text}"
        );
    }

    #[test]
    fn health_shows_state_since_when_and_the_last_probe() {
        assert_eq!(health_name(None), "unknown");
        let ts = |seconds| Some(prost_types::Timestamp { seconds, nanos: 0 });
        let b = Backend {
            name: "b1".into(),
            health: Some(BackendHealth {
                state: HealthState::Unhealthy as i32,
                since: ts(1_000_000 - 180),
                last_probe: ts(1_000_000 - 5),
                last_probe_result: "connect: connection refused".into(),
                consecutive_failures: 3,
                reason: "3 failed probes".into(),
                ejected_until: None,
            }),
            probe: Some(ProbeSettings {
                interval_ms: 30_000,
                ..Default::default()
            }),
            ..Default::default()
        };
        let text = render(&health_details(Details::new(), &b, 1_000_000));
        assert!(text.contains("unhealthy"), "{text}");
        assert!(text.contains("3m ago (1970-01-12T13:43:40Z)"), "{text}");
        assert!(text.contains("5s ago ("), "{text}");
        assert!(text.contains("): connect: connection refused"), "{text}");
        assert!(
            text.contains("interval 30s, timeout default, failures default"),
            "{text}"
        );
        assert_eq!(relative(0, 2 * 86_400), "2d ago");
        assert_eq!(relative(4000, 3990), "in 10s");
        let mut t = Vec::new();
        table(std::slice::from_ref(&b))
            .write(&mut t)
            .expect("write");
        let t = String::from_utf8(t).expect("utf-8");
        assert!(t.contains("HEALTH") && t.contains("unhealthy"), "{t}");
    }

    #[test]
    fn probe_flags_merge_onto_the_stored_settings_and_name_the_flag() {
        let args = ProbeArgs {
            probe_interval: None,
            probe_timeout: Some(std::time::Duration::from_secs(40)),
            probe_failures: None,
            no_probe: false,
        };
        let patch = ProbePatch::from_flags(&args, false).expect("in range alone");
        let stored = ProbeSettings {
            interval_ms: 30_000,
            failures: 5,
            ..Default::default()
        };
        let merged = patch.on(stored);
        assert_eq!(
            (merged.interval_ms, merged.timeout_ms, merged.failures),
            (30_000, 40_000, 5)
        );
        let err = check_probe(&merged).expect_err("not shorter than the interval");
        assert!(err.to_string().starts_with("--probe-timeout: "), "{err}");
        let again = ProbePatch::from_flags(
            &ProbeArgs {
                probe_interval: None,
                probe_timeout: None,
                probe_failures: None,
                no_probe: false,
            },
            true,
        )
        .expect("valid");
        assert_eq!(
            again.on(ProbeSettings {
                disabled: true,
                ..stored
            }),
            stored
        );
    }

    #[test]
    fn prices_per_million_tokens_are_readable() {
        assert_eq!(per_million(0.0000025), "2.5");
        assert_eq!(per_million(0.00001), "10");
        assert_eq!(per_million(0.0), "0");
    }
}
