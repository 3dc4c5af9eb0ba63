//! The YAML document of `clawctl export` and `clawctl apply`: the whole
//! configuration, with secrets only by reference.
//!
//! ```yaml
//! backends:
//!   - name: openai-1
//!     label: ""
//!     base_url: https://api.example.com/v1
//!     api_key_env: OPENAI_API_KEY        # or: api_key_file: /path/to/key
//!     api: openai                        # or: anthropic (Messages); omitted = openai
//!     pool: primary
//!     rpm: 600
//!     tpm: 100000                        # optional; omitted = unlimited
//!     timeout: 2m
//!     weight: 1
//!     enabled: true
//!     native_only: false                 # true = no translation onto it; omitted = false
//!     probe: {interval: 30s, timeout: 5s, failures: 3}  # or {disabled: true}; omitted = defaults
//!     models:
//!       - canonical: gpt-4o
//!         native: gpt-4o-2024-08-06
//!         input_cost_per_token: 0.0000025
//!         output_cost_per_token: 0.00001
//!         cache_read_cost_per_token: 0
//!         cache_write_cost_per_token: 0   # 5-minute cache writes
//!         cache_write_1h_cost_per_token: 0 # 1-hour writes; 0 = cache_write_cost_per_token
//!         context_window: 128000
//!         max_tokens: 16384
//! pools:                                 # a pool left out is left unchanged
//!   primary: {cooldown_base: 5s, cooldown_max: 5m, exponential: true, emergency_fraction: 0.05,
//!             max_retries: 2, queue_depth: 256, queue_timeout: 30s, request_timeout: 10m}
//! client_keys:
//!   - {name: app, models: [gpt-4o], rpm: 0}
//! agents:
//!   - {id: a1, name: A1, model: gpt-4o, interval: 30m, active_hours: "09:00-18:00",
//!      timezone: Asia/Shanghai, checklist: "...", webhook_url: "", enabled: true,
//!      pause_note: "", prompt: "", run_timeout: 0s, catch_up: 0s}
//! ```
//!
//! Every field except the names (and `base_url`, `model`) is optional and
//! defaults like the corresponding `add` verb. Unknown fields are rejected.
//! A document may also be one backend or agent entry alone, or a list of
//! them: what `clawctl backend get|list -o yaml` prints applies as is.
//! This module is pure: reading key files and variables happens in `apply`.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use claw_proto::Pool;
use claw_proto::probe_settings;
use claw_proto::v1::{
    Agent, Api, Backend, ClientKey, ClusterConfig, ModelMapping, PoolSettings, ProbeSettings,
};
use claw_proto::validate::{self, FieldError};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::api_key::KeySource;
use crate::duration;

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Document {
    /// Provider backends.
    #[serde(default)]
    pub backends: Vec<BackendDoc>,
    /// Pool settings; a pool that is left out is left unchanged.
    #[serde(default, skip_serializing_if = "PoolsDoc::is_empty")]
    pub pools: PoolsDoc,
    /// Client keys (their secrets are never part of the document).
    #[serde(default)]
    pub client_keys: Vec<ClientKeyDoc>,
    /// Agents and their heartbeat schedules.
    #[serde(default)]
    pub agents: Vec<AgentDoc>,
}

/// A backend, its key given by reference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BackendDoc {
    pub name: String,
    #[serde(default)]
    pub label: String,
    pub base_url: String,
    /// Environment variable holding the API key (of `clawctl`'s environment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// File holding the API key; relative to the document's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_file: Option<String>,
    /// Protocol the backend speaks.
    #[serde(default)]
    pub api: ApiName,
    #[serde(default)]
    pub pool: PoolName,
    #[serde(default = "default_rpm")]
    pub rpm: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u32>,
    #[serde(default = "default_backend_timeout")]
    pub timeout: Dur,
    #[serde(default = "one")]
    pub weight: u32,
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Serve only requests in the backend's own protocol (no translation).
    #[serde(default)]
    pub native_only: bool,
    #[serde(default)]
    pub models: Vec<ModelDoc>,
    /// Health probe settings; omitted = the control plane's defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<ProbeDoc>,
}

/// A backend's probe settings; an omitted field is the control plane's
/// default (`--probe-interval`, `--probe-timeout`, `--probe-failures`).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ProbeDoc {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Dur>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Dur>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failures: Option<u32>,
    /// Never probe the backend (passive health still applies).
    #[serde(default, skip_serializing_if = "is_false")]
    pub disabled: bool,
}

/// A model mapping; `native` defaults to `canonical`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelDoc {
    pub canonical: String,
    #[serde(default)]
    pub native: String,
    #[serde(default)]
    pub input_cost_per_token: f64,
    #[serde(default)]
    pub output_cost_per_token: f64,
    #[serde(default)]
    pub cache_read_cost_per_token: f64,
    #[serde(default)]
    pub cache_write_cost_per_token: f64,
    /// 1-hour cache writes; 0 means `cache_write_cost_per_token`.
    #[serde(default)]
    pub cache_write_1h_cost_per_token: f64,
    #[serde(default)]
    pub context_window: u32,
    #[serde(default)]
    pub max_tokens: u32,
}

/// `primary` or `fallback`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolName {
    #[default]
    Primary,
    Fallback,
}

impl From<PoolName> for Pool {
    fn from(p: PoolName) -> Pool {
        match p {
            PoolName::Primary => Pool::Primary,
            PoolName::Fallback => Pool::Fallback,
        }
    }
}

/// `openai` or `anthropic`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApiName {
    #[default]
    Openai,
    Anthropic,
}

impl From<ApiName> for Api {
    fn from(a: ApiName) -> Api {
        match a {
            ApiName::Openai => Api::Openai,
            ApiName::Anthropic => Api::Anthropic,
        }
    }
}

/// The two pools; either may be left out.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PoolsDoc {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<PoolDoc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<PoolDoc>,
}

impl PoolsDoc {
    fn is_empty(&self) -> bool {
        self.primary.is_none() && self.fallback.is_none()
    }
}

/// Settings of one pool; omitted fields take the built-in defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct PoolDoc {
    pub cooldown_base: Dur,
    pub cooldown_max: Dur,
    pub exponential: bool,
    pub emergency_fraction: f64,
    pub max_retries: u32,
    pub queue_depth: u32,
    pub queue_timeout: Dur,
    pub request_timeout: Dur,
}

impl Default for PoolDoc {
    fn default() -> PoolDoc {
        PoolDoc::from(&validate::default_pool_settings(Pool::Primary))
    }
}

/// A client key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ClientKeyDoc {
    pub name: String,
    /// Canonical models the key may use; empty means all.
    #[serde(default)]
    pub models: Vec<String>,
    /// Requests per minute; 0 means unlimited.
    #[serde(default)]
    pub rpm: u32,
    /// Most requests in flight at once on each proxy; 0 means unlimited.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub max_parallel: u32,
    /// Agent ids the key's `x-claw-agent-id` may name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<String>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// An agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AgentDoc {
    pub id: String,
    #[serde(default)]
    pub name: String,
    pub model: String,
    #[serde(default = "default_interval")]
    pub interval: Dur,
    #[serde(default)]
    pub active_hours: String,
    #[serde(default)]
    pub timezone: String,
    #[serde(default)]
    pub checklist: String,
    #[serde(default)]
    pub webhook_url: String,
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default)]
    pub pause_note: String,
    #[serde(default)]
    pub prompt: String,
    #[serde(default)]
    pub run_timeout: Dur,
    #[serde(default)]
    pub catch_up: Dur,
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub stagger: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub isolated_session: bool,
    #[serde(default, skip_serializing_if = "Dur::is_zero")]
    pub busy_window: Dur,
    #[serde(default, skip_serializing_if = "Dur::is_zero")]
    pub busy_defer_max: Dur,
    /// Variable holding the webhook HMAC secret (read by `apply`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_secret_env: Option<String>,
    /// `llm` (the default, omitted) or `wake`.
    #[serde(default, skip_serializing_if = "is_llm_target")]
    pub target: String,
    /// The agent runtime's wake endpoint (target `wake`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub wake_url: String,
    /// Model used when `model` has no capacity.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub fallback_model: String,
}

fn is_llm_target(t: &String) -> bool {
    t.is_empty() || t == "llm"
}

/// The document name of a heartbeat target (empty, i.e. omitted, for LLM).
fn target_name(t: i32) -> String {
    match claw_proto::v1::HeartbeatTarget::try_from(t) {
        Ok(claw_proto::v1::HeartbeatTarget::Wake) => "wake".into(),
        _ => String::new(),
    }
}

/// Parses a document's `target`.
fn parse_target(t: &str) -> Result<i32, FieldError> {
    use claw_proto::v1::HeartbeatTarget;
    match t.trim() {
        "" | "llm" => Ok(HeartbeatTarget::Unspecified as i32),
        "wake" => Ok(HeartbeatTarget::Wake as i32),
        other => Err(FieldError::new(
            "target",
            format!("{other:?} is not a heartbeat target (llm or wake)"),
        )),
    }
}

fn is_true(b: &bool) -> bool {
    *b
}
fn is_false(b: &bool) -> bool {
    !*b
}

impl Dur {
    fn is_zero(&self) -> bool {
        self.0.is_zero()
    }
}

fn default_rpm() -> u32 {
    60
}
fn default_backend_timeout() -> Dur {
    Dur(Duration::from_millis(validate::DEFAULT_BACKEND_TIMEOUT_MS))
}
fn default_interval() -> Dur {
    Dur(Duration::from_secs(validate::DEFAULT_INTERVAL_SECONDS))
}
fn one() -> u32 {
    1
}
fn yes() -> bool {
    true
}

/// A duration written as `30s`, `5m`, `1h30m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Dur(pub Duration);

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&duration::format(self.0))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Dur, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as 30s, 5m or 1h30m")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Dur, E> {
                duration::parse(v).map(Dur).map_err(E::custom)
            }
        }
        d.deserialize_str(Visitor)
    }
}

/// A syntax or schema error in a document, at a 1-based line and column
/// when the parser knows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParseError {
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl ParseError {
    /// `FILE:LINE:COL: what`, on one line.
    pub(crate) fn in_file(&self, file: &str) -> String {
        match (self.line, self.column) {
            (Some(l), Some(c)) => format!("{file}:{l}:{c}: {}", self.message),
            _ => format!("{file}: {}", self.message),
        }
    }

    fn from_yaml(e: &serde_norway::Error) -> ParseError {
        // The location is reported separately, as FILE:LINE:COL.
        let message = strip_locations(&e.to_string().replace('\n', " "));
        let location = e.location();
        ParseError {
            line: location.as_ref().map(|l| l.line()),
            column: location.as_ref().map(|l| l.column()),
            message,
        }
    }
}

/// Removes every " at line N column M" the YAML parser puts in its messages.
fn strip_locations(message: &str) -> String {
    const AT: &str = " at line ";
    let mut out = String::new();
    let mut rest = message;
    while let Some(i) = rest.find(AT) {
        out.push_str(&rest[..i]);
        let after = &rest[i + AT.len()..];
        let digits = |s: &str| s.len() - s.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        let n = digits(after);
        match after[n..].strip_prefix(" column ") {
            Some(col) if n > 0 && digits(col) > 0 => rest = &col[digits(col)..],
            _ => {
                out.push_str(AT);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Parses a document. An empty document is an error, so a truncated file is
/// never mistaken for "no configuration".
pub(crate) fn parse(text: &str) -> Result<Document, ParseError> {
    let value: serde_norway::Value =
        serde_norway::from_str(text).map_err(|e| ParseError::from_yaml(&e))?;
    if value.is_null() {
        return Err(ParseError {
            line: None,
            column: None,
            message: "the document is empty".to_string(),
        });
    }
    let yaml = |e: serde_norway::Error| ParseError::from_yaml(&e);
    match Resource::of(&value) {
        Some(Resource::Backend) => Ok(Document {
            backends: vec![serde_norway::from_str(text).map_err(yaml)?],
            ..Default::default()
        }),
        Some(Resource::Backends) => Ok(Document {
            backends: serde_norway::from_str(text).map_err(yaml)?,
            ..Default::default()
        }),
        Some(Resource::Agent) => Ok(Document {
            agents: vec![serde_norway::from_str(text).map_err(yaml)?],
            ..Default::default()
        }),
        Some(Resource::Agents) => Ok(Document {
            agents: serde_norway::from_str(text).map_err(yaml)?,
            ..Default::default()
        }),
        None => serde_norway::from_str(text).map_err(yaml),
    }
}

/// What a document that is not a whole configuration holds: the entry (or
/// list of entries) that `get|list -o yaml` prints for one kind.
enum Resource {
    Backend,
    Backends,
    Agent,
    Agents,
}

impl Resource {
    /// Recognizes a bare entry by its required keys (`base_url` for a
    /// backend, `id` and `model` for an agent) at a root that has none of
    /// the document's sections.
    fn of(root: &serde_norway::Value) -> Option<Resource> {
        const SECTIONS: [&str; 4] = ["backends", "pools", "client_keys", "agents"];
        let kind = |m: &serde_norway::Mapping| {
            if SECTIONS.iter().any(|k| m.contains_key(*k)) {
                None
            } else if m.contains_key("base_url") {
                Some(false)
            } else if m.contains_key("id") && m.contains_key("model") {
                Some(true)
            } else {
                None
            }
        };
        match root {
            serde_norway::Value::Mapping(m) => kind(m).map(|agent| {
                if agent {
                    Resource::Agent
                } else {
                    Resource::Backend
                }
            }),
            serde_norway::Value::Sequence(items) => match items.first()? {
                serde_norway::Value::Mapping(m) => kind(m).map(|agent| {
                    if agent {
                        Resource::Agents
                    } else {
                        Resource::Backends
                    }
                }),
                _ => None,
            },
            _ => None,
        }
    }
}

/// Renders a document as YAML, in the layout of the example above.
pub(crate) fn to_yaml(doc: &Document) -> anyhow::Result<String> {
    emit::document(&serde_norway::to_value(doc)?)
}

/// Renders one entry or a list of entries (a backend, `[backend, …]`) in
/// the document's layout: what `backend get|list -o yaml` print, so they
/// read exactly like the matching part of `export` and apply as they are.
pub(crate) fn entries_to_yaml<T: Serialize + ?Sized>(value: &T) -> anyhow::Result<String> {
    emit::entries(&serde_norway::to_value(value)?)
}

// ------------------------------------------------------------ proto -> doc

/// An exported document and the backends whose key had no reference.
#[derive(Debug)]
pub(crate) struct Exported {
    pub document: Document,
    /// Names of backends exported with a made-up `api_key_env`.
    pub unreferenced: Vec<String>,
}

/// Converts an `ExportConfig` answer. Internal client keys (minted by the
/// control plane for itself) are left out: they are not operator config.
pub(crate) fn from_config(cfg: &ClusterConfig) -> Exported {
    let mut unreferenced = Vec::new();
    let backends = cfg
        .backends
        .iter()
        .map(|b| {
            if !BackendDoc::has_key_reference(b) {
                unreferenced.push(b.name.clone());
            }
            BackendDoc::from(b)
        })
        .collect();
    let mut pools = PoolsDoc::default();
    for p in &cfg.pools {
        match Pool::try_from(p.pool) {
            Ok(Pool::Primary) => pools.primary = Some(PoolDoc::from(p)),
            Ok(Pool::Fallback) => pools.fallback = Some(PoolDoc::from(p)),
            _ => {}
        }
    }
    let client_keys = cfg
        .client_keys
        .iter()
        .filter(|k| !k.internal)
        .map(|k| ClientKeyDoc {
            name: k.name.clone(),
            models: k.models.clone(),
            rpm: k.rpm,
            max_parallel: k.max_parallel,
            agents: k.agents.clone(),
        })
        .collect();
    let agents = cfg.agents.iter().map(AgentDoc::from).collect();
    Exported {
        document: Document {
            backends,
            pools,
            client_keys,
            agents,
        },
        unreferenced,
    }
}

/// `CLAW_API_KEY_<NAME>` in upper snake case: `openai-1` → `CLAW_API_KEY_OPENAI_1`.
pub(crate) fn placeholder_env(name: &str) -> String {
    let snake: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("CLAW_API_KEY_{snake}")
}

impl BackendDoc {
    /// Whether the backend's key has a reference a document can carry;
    /// without one, [`BackendDoc::from`] writes a placeholder variable.
    pub(crate) fn has_key_reference(b: &Backend) -> bool {
        b.api_key_ref.starts_with("env:") || b.api_key_ref.starts_with("file:")
    }
}

/// A backend's entry in the document (output-only fields left out), as
/// `export` and `backend get|list -o yaml` write it.
impl From<&Backend> for BackendDoc {
    fn from(b: &Backend) -> BackendDoc {
        let (env, file) = if let Some(var) = b.api_key_ref.strip_prefix("env:") {
            (Some(var.to_string()), None)
        } else if let Some(path) = b.api_key_ref.strip_prefix("file:") {
            (None, Some(path.to_string()))
        } else {
            (Some(placeholder_env(&b.name)), None)
        };
        BackendDoc {
            name: b.name.clone(),
            label: b.label.clone(),
            base_url: b.base_url.clone(),
            api_key_env: env,
            api_key_file: file,
            api: match Api::try_from(b.api) {
                Ok(Api::Anthropic) => ApiName::Anthropic,
                _ => ApiName::Openai,
            },
            pool: match Pool::try_from(b.pool) {
                Ok(Pool::Fallback) => PoolName::Fallback,
                _ => PoolName::Primary,
            },
            rpm: b.rpm,
            tpm: b.tpm,
            timeout: Dur(Duration::from_millis(b.timeout_ms)),
            weight: b.weight,
            enabled: b.enabled,
            native_only: b.native_only,
            models: b.models.iter().map(ModelDoc::from).collect(),
            probe: b
                .probe
                .filter(|p| !probe_settings::is_default(p))
                .map(ProbeDoc::from),
        }
    }
}

impl From<ProbeSettings> for ProbeDoc {
    fn from(p: ProbeSettings) -> ProbeDoc {
        let ms = |v: u64| (v != 0).then(|| Dur(Duration::from_millis(v)));
        ProbeDoc {
            interval: ms(p.interval_ms),
            timeout: ms(p.timeout_ms),
            failures: (p.failures != 0).then_some(p.failures),
            disabled: p.disabled,
        }
    }
}

impl ProbeDoc {
    /// The API's settings, validated; errors name the document's fields
    /// (`probe.interval`, not `probe.interval_ms`).
    fn to_settings(self) -> Result<ProbeSettings, FieldError> {
        let ms = |field: &str, d: Option<Dur>| {
            d.map_or(Ok(0), |d| duration::to_millis(d.0))
                .map_err(|e| FieldError::new(field, e))
        };
        let p = ProbeSettings {
            interval_ms: ms("probe.interval", self.interval)?,
            timeout_ms: ms("probe.timeout", self.timeout)?,
            failures: self.failures.unwrap_or(0),
            disabled: self.disabled,
        };
        probe_settings::validate(&p).map_err(|mut e| {
            if let Some(f) = e.field.strip_suffix("_ms") {
                e.field = f.to_string();
            }
            e
        })?;
        Ok(p)
    }
}

impl From<&ModelMapping> for ModelDoc {
    fn from(m: &ModelMapping) -> ModelDoc {
        ModelDoc {
            canonical: m.canonical.clone(),
            native: m.native.clone(),
            input_cost_per_token: m.input_cost_per_token,
            output_cost_per_token: m.output_cost_per_token,
            cache_read_cost_per_token: m.cache_read_cost_per_token,
            cache_write_cost_per_token: m.cache_write_cost_per_token,
            cache_write_1h_cost_per_token: m.cache_write_1h_cost_per_token,
            context_window: m.context_window,
            max_tokens: m.max_tokens,
        }
    }
}

impl From<&PoolSettings> for PoolDoc {
    fn from(p: &PoolSettings) -> PoolDoc {
        let ms = |v: u64| Dur(Duration::from_millis(v));
        PoolDoc {
            cooldown_base: ms(p.cooldown_base_ms),
            cooldown_max: ms(p.cooldown_max_ms),
            exponential: p.exponential,
            emergency_fraction: p.emergency_fraction,
            max_retries: p.max_retries,
            queue_depth: p.queue_depth,
            queue_timeout: ms(p.queue_timeout_ms),
            request_timeout: ms(p.request_timeout_ms),
        }
    }
}

impl From<&Agent> for AgentDoc {
    fn from(a: &Agent) -> AgentDoc {
        let secs = |v: u64| Dur(Duration::from_secs(v));
        AgentDoc {
            id: a.id.clone(),
            name: a.name.clone(),
            model: a.model.clone(),
            interval: secs(a.interval_seconds),
            active_hours: a.active_hours.clone(),
            timezone: a.timezone.clone(),
            checklist: a.checklist.clone(),
            webhook_url: a.webhook_url.clone(),
            enabled: a.enabled,
            pause_note: a.pause_note.clone(),
            prompt: a.prompt.clone(),
            run_timeout: secs(a.run_timeout_seconds),
            catch_up: secs(a.catch_up_seconds),
            stagger: a.stagger.unwrap_or(true),
            isolated_session: a.isolated_session,
            busy_window: secs(a.busy_window_seconds),
            busy_defer_max: secs(a.busy_defer_max_seconds),
            webhook_secret_env: a
                .webhook_secret_ref
                .strip_prefix("env:")
                .map(str::to_string),
            target: target_name(a.target),
            wake_url: a.wake_url.clone(),
            fallback_model: a.fallback_model.clone(),
        }
    }
}

// ------------------------------------------------------------ doc -> proto

/// The configuration to send, with keys still to be read.
#[derive(Debug)]
pub(crate) struct Desired {
    /// Normalized and validated; every `api_key` is empty, `api_key_ref` set.
    pub config: ClusterConfig,
    /// Per backend (same order), where its key comes from.
    pub keys: Vec<Option<KeySource>>,
}

/// Converts a document into the `ApplyConfig` configuration, then normalizes
/// and validates it with the same rules as the server. Errors name the field
/// as `backends[2].rpm`. Relative `api_key_file` paths are resolved against
/// `base_dir` (which should be absolute).
pub(crate) fn to_config(doc: &Document, base_dir: &Path) -> Result<Desired, FieldError> {
    let mut config = ClusterConfig::default();
    let mut keys = Vec::new();
    for (i, b) in doc.backends.iter().enumerate() {
        let at = |field: &str| format!("backends[{i}].{field}");
        let key = match (&b.api_key_env, &b.api_key_file) {
            (Some(_), Some(_)) => {
                return Err(FieldError::new(
                    at("api_key_file"),
                    "give either api_key_env or api_key_file, not both",
                ));
            }
            (Some(var), None) if var.trim().is_empty() => {
                return Err(FieldError::new(at("api_key_env"), "must name a variable"));
            }
            (None, Some(path)) if path.trim().is_empty() => {
                return Err(FieldError::new(at("api_key_file"), "must name a file"));
            }
            (Some(var), None) => Some(KeySource::Env(var.trim().to_string())),
            (None, Some(path)) => Some(KeySource::File(base_dir.join(path.trim()))),
            (None, None) => None,
        };
        let api_key_ref = match &key {
            Some(KeySource::Env(var)) => format!("env:{var}"),
            Some(KeySource::File(path)) => match path.to_str() {
                Some(p) => format!("file:{p}"),
                None => return Err(FieldError::new(at("api_key_file"), "must be UTF-8")),
            },
            Some(KeySource::Stdin) | None => String::new(),
        };
        let mut backend = Backend {
            name: b.name.clone(),
            label: b.label.clone(),
            base_url: b.base_url.clone(),
            api_key_ref,
            api: Api::from(b.api) as i32,
            pool: Pool::from(b.pool) as i32,
            rpm: b.rpm,
            tpm: b.tpm,
            timeout_ms: duration::to_millis(b.timeout.0)
                .map_err(|e| FieldError::new(at("timeout"), e))?,
            weight: b.weight,
            enabled: b.enabled,
            native_only: b.native_only,
            models: b.models.iter().map(ModelMapping::from).collect(),
            probe: b
                .probe
                .map(ProbeDoc::to_settings)
                .transpose()
                .map_err(|e| e.within(&format!("backends[{i}]")))?,
            ..Default::default()
        };
        probe_settings::normalize(&mut backend.probe);
        validate::normalize_backend(&mut backend);
        validate::validate_backend(&backend, false)
            .map_err(|e| e.within(&format!("backends[{i}]")))?;
        unique(&config.backends, |x| &x.name, &backend.name, || at("name"))?;
        config.backends.push(backend);
        keys.push(key);
    }
    for (name, pool, p) in [
        ("primary", Pool::Primary, &doc.pools.primary),
        ("fallback", Pool::Fallback, &doc.pools.fallback),
    ] {
        if let Some(p) = p {
            let settings = p
                .to_settings(pool)
                .map_err(|e| e.within(&format!("pools.{name}")))?;
            validate::validate_pool_settings(&settings)
                .map_err(|e| e.within(&format!("pools.{name}")))?;
            config.pools.push(settings);
        }
    }
    for (i, k) in doc.client_keys.iter().enumerate() {
        let key = ClientKey {
            name: k.name.trim().to_string(),
            models: k.models.iter().map(|m| m.trim().to_string()).collect(),
            rpm: k.rpm,
            max_parallel: k.max_parallel,
            agents: k.agents.iter().map(|a| a.trim().to_string()).collect(),
            ..Default::default()
        };
        validate::validate_client_key(&key).map_err(|e| e.within(&format!("client_keys[{i}]")))?;
        unique(
            &config.client_keys,
            |x| &x.name,
            &key.name,
            || format!("client_keys[{i}].name"),
        )?;
        config.client_keys.push(key);
    }
    for (i, a) in doc.agents.iter().enumerate() {
        let mut agent = a
            .to_agent()
            .map_err(|e| e.within(&format!("agents[{i}]")))?;
        validate::normalize_agent(&mut agent);
        validate::validate_agent(&agent).map_err(|e| e.within(&format!("agents[{i}]")))?;
        unique(
            &config.agents,
            |x| &x.id,
            &agent.id,
            || format!("agents[{i}].id"),
        )?;
        config.agents.push(agent);
    }
    Ok(Desired { config, keys })
}

fn unique<T>(
    existing: &[T],
    key: impl Fn(&T) -> &String,
    value: &str,
    field: impl FnOnce() -> String,
) -> Result<(), FieldError> {
    if existing.iter().any(|x| key(x) == value) {
        return Err(FieldError::new(
            field(),
            format!("{value:?} is defined twice"),
        ));
    }
    Ok(())
}

impl From<&ModelDoc> for ModelMapping {
    fn from(m: &ModelDoc) -> ModelMapping {
        ModelMapping {
            canonical: m.canonical.clone(),
            native: m.native.clone(),
            input_cost_per_token: m.input_cost_per_token,
            output_cost_per_token: m.output_cost_per_token,
            cache_read_cost_per_token: m.cache_read_cost_per_token,
            cache_write_cost_per_token: m.cache_write_cost_per_token,
            cache_write_1h_cost_per_token: m.cache_write_1h_cost_per_token,
            context_window: m.context_window,
            max_tokens: m.max_tokens,
        }
    }
}

impl PoolDoc {
    fn to_settings(&self, pool: Pool) -> Result<PoolSettings, FieldError> {
        let ms =
            |field: &str, d: Dur| duration::to_millis(d.0).map_err(|e| FieldError::new(field, e));
        Ok(PoolSettings {
            pool: pool as i32,
            cooldown_base_ms: ms("cooldown_base", self.cooldown_base)?,
            cooldown_max_ms: ms("cooldown_max", self.cooldown_max)?,
            exponential: self.exponential,
            emergency_fraction: self.emergency_fraction,
            max_retries: self.max_retries,
            queue_depth: self.queue_depth,
            queue_timeout_ms: ms("queue_timeout", self.queue_timeout)?,
            request_timeout_ms: ms("request_timeout", self.request_timeout)?,
        })
    }
}

impl AgentDoc {
    fn to_agent(&self) -> Result<Agent, FieldError> {
        let secs =
            |field: &str, d: Dur| duration::to_secs(d.0).map_err(|e| FieldError::new(field, e));
        Ok(Agent {
            id: self.id.clone(),
            name: self.name.clone(),
            model: self.model.clone(),
            interval_seconds: secs("interval", self.interval)?,
            active_hours: self.active_hours.clone(),
            timezone: self.timezone.clone(),
            checklist: self.checklist.clone(),
            webhook_url: self.webhook_url.clone(),
            enabled: self.enabled,
            pause_note: self.pause_note.clone(),
            prompt: self.prompt.clone(),
            run_timeout_seconds: secs("run_timeout", self.run_timeout)?,
            catch_up_seconds: secs("catch_up", self.catch_up)?,
            stagger: Some(self.stagger),
            isolated_session: self.isolated_session,
            busy_window_seconds: secs("busy_window", self.busy_window)?,
            busy_defer_max_seconds: secs("busy_defer_max", self.busy_defer_max)?,
            webhook_secret: match &self.webhook_secret_env {
                Some(var) => std::env::var(var).map_err(|_| {
                    FieldError::new(
                        "webhook_secret_env",
                        format!("environment variable {var} is not set"),
                    )
                })?,
                None => String::new(),
            },
            webhook_secret_ref: self
                .webhook_secret_env
                .as_ref()
                .map(|v| format!("env:{v}"))
                .unwrap_or_default(),
            target: parse_target(&self.target)?,
            wake_url: self.wake_url.clone(),
            fallback_model: self.fallback_model.clone(),
            ..Default::default()
        })
    }
}

mod emit;
#[cfg(test)]
mod tests;
