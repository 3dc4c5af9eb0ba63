//! The configuration snapshot, compiled for the hot path.
//!
//! The control plane sends a `claw.v1.Snapshot`; [`compile`] validates it and
//! turns it into routing tables: (canonical model, protocol) → candidate
//! backends in pool order, client key SHA-256 → key, pool settings.
//!
//! Routes are per protocol ([`Api`]) of the client's endpoint. A native
//! route ([`Snapshot::route_for`]) holds only backends speaking it: the
//! route of every endpoint but two. Chat Completions and Messages requests
//! use the translating route ([`Snapshot::translating_route_for`]): the
//! backends of both protocols, ranked together in the usual order (primary
//! before fallback), except those limited to their own protocol
//! (`native_only`); an attempt on a backend of the other protocol is
//! translated ([`crate::translate`]). `GET`/`DELETE /v1/responses/{id}` name
//! no model; they route over every enabled `openai` backend
//! ([`Snapshot::responses_route`]), the owner of the id being found by
//! probing ([`crate::responses`]). [`SnapshotStore`] holds the
//! current one in an `ArcSwap`, so every request reads it without a lock.
//!
//! Runtime state that must survive a configuration change — rate limiters,
//! cooldowns, outlier ejections, in-flight counts, wait queues — lives in
//! `Arc`s that [`compile`] carries over from the previous snapshot by backend
//! id, key id and model name.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use claw_proto::Pool;
use claw_proto::v1;
use http::{HeaderName, HeaderValue};
use tokio::time::Instant;

mod compile;

pub(crate) use compile::compile;
use compile::compile_any_version;

use crate::cooldown::state::{Cooldown, CooldownPolicy};
use crate::health::Health;
use crate::metrics::CandidateMetrics;
use crate::outlier::Outlier;
use crate::queue::WaitQueue;
use crate::ratelimit::RateLimiter;
use crate::upstream::UpstreamTarget;
use crate::usage::Prices;

/// Why a snapshot was rejected (sent back as the NACK's `error_detail`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    /// The response carried no snapshot.
    #[error("response has no snapshot")]
    Missing,
    /// The snapshot's own version disagrees with the response's.
    #[error("snapshot version {inner} does not match response version {outer}")]
    VersionMismatch {
        /// `StreamConfigResponse.version`.
        outer: u64,
        /// `Snapshot.version`.
        inner: u64,
    },
    /// Older than the snapshot already applied.
    #[error("version {got} is older than the applied version {held}")]
    Stale {
        /// Offered version.
        got: u64,
        /// Held version.
        held: u64,
    },
    /// A field is invalid.
    #[error("{0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> SnapshotError {
    SnapshotError::Invalid(msg.into())
}

/// Settings of a pool, as typed values.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    /// Which pool.
    pub pool: Pool,
    /// Cooldown after 429s.
    pub cooldown: CooldownPolicy,
    /// Fraction of the normal rate admitted while every candidate cools.
    pub emergency_fraction: f64,
    /// Retries on other backends after the first attempt.
    pub max_retries: u32,
    /// Requests that may wait for a rate-limit token.
    pub queue_depth: u32,
    /// How long a request may wait in the queue.
    pub queue_timeout: Duration,
    /// Deadline of a whole request including retries.
    pub request_timeout: Duration,
}

impl PoolConfig {
    /// Validates `p` ([`claw_proto::validate::validate_pool_settings`]) and
    /// converts it.
    fn from_proto(p: &v1::PoolSettings) -> Result<Self, SnapshotError> {
        claw_proto::validate::validate_pool_settings(p)
            .map_err(|e| invalid(format!("pool settings: {e}")))?;
        Ok(Self::from_valid(p))
    }

    /// Converts settings that passed validation (or are the defaults); total,
    /// so the defaults need no fallback copy.
    fn from_valid(p: &v1::PoolSettings) -> Self {
        PoolConfig {
            pool: Pool::try_from(p.pool).unwrap_or(Pool::Primary),
            cooldown: CooldownPolicy {
                base: Duration::from_millis(p.cooldown_base_ms),
                max: Duration::from_millis(p.cooldown_max_ms),
                exponential: p.exponential,
            },
            emergency_fraction: p.emergency_fraction,
            max_retries: p.max_retries,
            queue_depth: p.queue_depth,
            queue_timeout: Duration::from_millis(p.queue_timeout_ms),
            request_timeout: Duration::from_millis(p.request_timeout_ms),
        }
    }

    /// The defaults of `pool`: [`claw_proto::validate::default_pool_settings`],
    /// the one place they are written.
    pub fn default_for(pool: Pool) -> Self {
        Self::from_valid(&claw_proto::validate::default_pool_settings(pool))
    }
}

/// The settings of both pools, indexed by [`Pool`] (anything but
/// `Fallback` reads the primary pool's).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PoolConfigs([PoolConfig; 2]);

impl PoolConfigs {
    /// Both pools at their defaults.
    fn defaults() -> Self {
        PoolConfigs([
            PoolConfig::default_for(Pool::Primary),
            PoolConfig::default_for(Pool::Fallback),
        ])
    }

    fn slot(pool: Pool) -> usize {
        usize::from(pool == Pool::Fallback)
    }
}

impl std::ops::Index<Pool> for PoolConfigs {
    type Output = PoolConfig;

    fn index(&self, pool: Pool) -> &PoolConfig {
        &self.0[Self::slot(pool)]
    }
}

impl std::ops::IndexMut<Pool> for PoolConfigs {
    fn index_mut(&mut self, pool: Pool) -> &mut PoolConfig {
        &mut self.0[Self::slot(pool)]
    }
}

/// State of a backend that outlives snapshots.
#[derive(Debug)]
pub struct BackendRuntime {
    /// Requests currently in flight to this backend.
    pub in_flight: AtomicU32,
    /// Requests per minute × share.
    pub rpm: RateLimiter,
    /// Tokens per minute × share (used only when the backend has a tpm).
    pub tpm: RateLimiter,
    /// `emergency_fraction × rpm` × share, used while every candidate cools.
    pub emergency: RateLimiter,
    /// 429 cooldown.
    pub cooldown: Cooldown,
    /// Passive outlier detection.
    pub outlier: Outlier,
    /// The fleet-wide health mark (pushed by the control plane).
    pub health: Health,
    /// Demand since the last report batch.
    pub demand: Demand,
    /// Set when this proxy left the fleet's rate shares (`crate::fleet`'s
    /// `leave`, at the end of the drain delay): its limiters apply 0 for
    /// good, so a request they refuse is answered at once (503 with
    /// `Retry-After`, retried elsewhere) instead of waiting in the queue.
    pub left_fleet: AtomicBool,
}

impl BackendRuntime {
    fn new(rpm: u32, tpm: u32, emergency: f64, now: Instant) -> Self {
        BackendRuntime {
            in_flight: AtomicU32::new(0),
            left_fleet: AtomicBool::new(false),
            rpm: RateLimiter::backend(f64::from(rpm), now),
            tpm: RateLimiter::backend(f64::from(tpm), now),
            emergency: RateLimiter::backend(emergency, now),
            cooldown: Cooldown::default(),
            outlier: Outlier::default(),
            health: Health::default(),
            demand: Demand::default(),
        }
    }

    /// Sets this proxy's share of the backend's cluster-wide limits.
    pub fn set_share(&self, share: f64, now: Instant) {
        self.set_shares(share, share, now);
    }

    /// Sets this proxy's shares of the backend's rpm (the emergency limiter
    /// follows it) and tpm.
    pub fn set_shares(&self, rpm_share: f64, tpm_share: f64, now: Instant) {
        self.rpm.set_share(rpm_share, now);
        self.tpm.set_share(tpm_share, now);
        self.emergency.set_share(rpm_share, now);
    }
}

/// What this proxy wanted from a backend since the last report batch:
/// relaxed atomics, swapped out by the report collector.
#[derive(Debug, Default)]
pub struct Demand {
    requests: AtomicU64,
    tokens: AtomicU64,
}

impl Demand {
    /// Counts one request of `tokens` estimated tokens.
    pub fn record(&self, tokens: f64) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.tokens
            .fetch_add(tokens.max(0.0) as u64, Ordering::Relaxed);
    }

    /// Requests and tokens since the previous call.
    pub fn take(&self) -> (u64, u64) {
        (
            self.requests.swap(0, Ordering::Relaxed),
            self.tokens.swap(0, Ordering::Relaxed),
        )
    }
}

/// The protocol a backend speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Api {
    /// OpenAI: Chat Completions, Completions, Embeddings, Responses.
    #[default]
    OpenAi,
    /// Anthropic Messages.
    Anthropic,
}

impl Api {
    /// The name operators read (`openai`, `anthropic`).
    pub fn name(self) -> &'static str {
        match self {
            Api::OpenAi => "openai",
            Api::Anthropic => "anthropic",
        }
    }

    /// The client endpoint that serves this protocol's models (for the
    /// "served elsewhere" message).
    pub fn endpoint(self) -> &'static str {
        match self {
            Api::OpenAi => "/v1/chat/completions and /v1/responses",
            Api::Anthropic => "/v1/messages",
        }
    }

    fn slot(self) -> usize {
        usize::from(self == Api::Anthropic)
    }
}

/// The header that carries a backend's provider key upstream, by its
/// protocol: `Authorization: Bearer <key>` for `openai`, `x-api-key: <key>`
/// for `anthropic`. The value is marked sensitive (never logged by hyper or
/// `Debug`).
#[derive(Clone)]
pub struct Credential {
    /// `authorization` or `x-api-key`.
    pub name: HeaderName,
    /// The header value, sensitive.
    pub value: HeaderValue,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credential({}: <redacted>)", self.name)
    }
}

/// A backend of the snapshot.
#[derive(Debug)]
pub struct Backend {
    /// Backend id (`be_…`).
    pub id: Arc<str>,
    /// Backend name, for logs.
    pub name: String,
    /// Pool.
    pub pool: Pool,
    /// The protocol it speaks.
    pub api: Api,
    /// Base URL without a trailing slash, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// The base URL split for building each attempt's URI.
    pub target: Arc<UpstreamTarget>,
    /// The provider key in the protocol's header, marked sensitive.
    pub credential: Credential,
    /// Upstream timeout (to response headers).
    pub timeout: Duration,
    /// Relative weight within the pool (≥ 1).
    pub weight: u32,
    /// Tokens per minute limit, if any.
    pub tpm: Option<u32>,
    /// Disabled backends are never candidates.
    pub enabled: bool,
    /// Serves only requests in its own protocol (never translated ones).
    pub native_only: bool,
    /// State carried across snapshots.
    pub runtime: Arc<BackendRuntime>,
}

/// A backend able to serve a model, with the model's native id.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// The backend.
    pub backend: Arc<Backend>,
    /// The backend's own model id (`model` is rewritten to it).
    pub native: Arc<str>,
    /// USD per token of the mapping (prompt, completion, cached prompt).
    pub prices: Prices,
    /// The mapping's maximum output tokens, if known: the `max_tokens` a
    /// translated request to an Anthropic backend gets when the client set
    /// none.
    pub max_tokens: Option<u32>,
    /// The mapping's context window (prompt + output tokens), if known: the
    /// most a request's tpm estimate may reserve.
    pub context_window: Option<u32>,
    /// Metric handles of the pair, registered on first use.
    pub metrics: Arc<OnceLock<CandidateMetrics>>,
}

impl Candidate {
    /// The metric handles of this (model, backend) pair.
    pub fn metrics(&self, model: &Arc<str>) -> &CandidateMetrics {
        self.metrics
            .get_or_init(|| CandidateMetrics::new(model, &self.backend.id))
    }
}

/// Everything needed to route one canonical model in one protocol.
#[derive(Debug)]
pub struct Route {
    /// Canonical model name (empty for [`Snapshot::responses_route`]).
    pub model: Arc<str>,
    /// The protocol of the clients it serves. Every candidate of a native
    /// route speaks it; in a translating route the others are translated.
    pub api: Api,
    /// Enabled backends serving it: primary pool first, then fallback.
    pub candidates: Vec<Candidate>,
    /// Settings that govern the request (the primary pool's when the model
    /// has a primary candidate, else the fallback's).
    pub settings: PoolConfig,
    /// Requests waiting for a rate-limit token.
    pub queue: Arc<WaitQueue>,
    /// Rotates the tie-break among equally loaded backends.
    pub rotation: AtomicUsize,
}

impl Route {
    /// The next value of the tie-break rotation among equally loaded
    /// backends.
    pub fn next_rotation(&self) -> usize {
        self.rotation.fetch_add(1, Ordering::Relaxed)
    }
}

/// The routes of one canonical model, by the client's protocol
/// ([`Api::slot`]).
#[derive(Debug, Default)]
struct ModelRoutes {
    /// Backends speaking the client's protocol only.
    native: [Option<Arc<Route>>; 2],
    /// Backends of both protocols but those limited to the other one.
    translating: [Option<Arc<Route>>; 2],
}

/// A client key's rpm on this proxy: the limiter (the key's fleet-wide rpm ×
/// this proxy's share, set by [`crate::fleet`]) and the demand since the
/// last report batch (requests asked, admitted or not). Carried over
/// snapshots by key id.
#[derive(Debug)]
pub struct KeyRpm {
    /// The key's rpm × share.
    pub limiter: RateLimiter,
    /// Requests since the last report batch.
    pub demand: Demand,
}

impl KeyRpm {
    /// A limiter for `rpm` (share 1 until the fleet sets it).
    pub fn new(rpm: u32, now: Instant) -> Self {
        KeyRpm {
            limiter: RateLimiter::client(f64::from(rpm), now),
            demand: Demand::default(),
        }
    }
}

/// A client key.
#[derive(Debug)]
pub struct ClientKey {
    /// Key id (`ck_…`).
    pub id: Arc<str>,
    /// Key name.
    pub name: String,
    /// Canonical models allowed; empty means all.
    pub models: HashSet<String>,
    /// Per-key requests per minute × this proxy's share of it, if limited.
    pub rpm: Option<Arc<KeyRpm>>,
    /// Per-key requests in flight on this proxy, if limited (`max_parallel`).
    pub parallel: Option<Arc<crate::key_limits::KeyLimiter>>,
    /// Agent ids whose `x-claw-agent-id` the key may send.
    pub agents: HashSet<String>,
    /// The control plane's own key: any agent id is honoured.
    pub internal: bool,
}

impl ClientKey {
    /// True when the key may use `model`.
    pub fn allows(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.contains(model)
    }

    /// True when the key may send `x-claw-agent-id: agent` (it lists the
    /// agent, or it is the control plane's own key).
    pub fn speaks_for(&self, agent: &str) -> bool {
        self.internal || self.agents.contains(agent)
    }
}

/// A compiled, validated snapshot.
#[derive(Debug)]
pub struct Snapshot {
    /// Configuration version.
    pub version: u64,
    /// The control plane store's lineage (see `v1::Snapshot.lineage`);
    /// empty from a control plane that sends none.
    lineage: Arc<str>,
    backends: Vec<Arc<Backend>>,
    by_id: HashMap<Arc<str>, usize>,
    routes: HashMap<String, ModelRoutes>,
    responses: Option<Arc<Route>>,
    keys: HashMap<[u8; 32], Arc<ClientKey>>,
    pools: PoolConfigs,
    models: Vec<String>,
    models_body: Bytes,
    created: u64,
    /// Resources of the delivered snapshot left out as invalid (reported in
    /// the ACK); at most [`MAX_EXCLUDED`].
    excluded: Vec<v1::ExcludedResource>,
}

/// Most excluded resources a snapshot reports (the rest are logged only).
pub(crate) const MAX_EXCLUDED: usize = 100;

impl Snapshot {
    /// The resources of the delivered snapshot this one left out because
    /// they were invalid, with the reason.
    pub fn excluded(&self) -> &[v1::ExcludedResource] {
        &self.excluded
    }

    /// The lineage of the store this snapshot came from.
    pub fn lineage(&self) -> &str {
        &self.lineage
    }

    /// Every backend, enabled or not.
    pub fn backends(&self) -> impl Iterator<Item = &Arc<Backend>> {
        self.backends.iter()
    }

    /// A backend by id.
    pub fn backend(&self, id: &str) -> Option<&Arc<Backend>> {
        self.by_id.get(id).and_then(|i| self.backends.get(*i))
    }

    /// The route of a canonical model among backends speaking `api`.
    pub fn route_for(&self, model: &str, api: Api) -> Option<&Arc<Route>> {
        self.routes.get(model)?.native[api.slot()].as_ref()
    }

    /// The route of a canonical model for a client of `api` that may be
    /// translated (Chat Completions, Messages): the backends of both
    /// protocols but those limited to the other one. The native route
    /// itself when no backend of the other protocol takes part.
    pub fn translating_route_for(&self, model: &str, api: Api) -> Option<&Arc<Route>> {
        self.routes.get(model)?.translating[api.slot()].as_ref()
    }

    /// The route of a canonical model in whichever protocol serves it
    /// (`openai` first): for tests and for code that only asks whether a
    /// model is served. Requests use [`Snapshot::route_for`].
    pub fn route(&self, model: &str) -> Option<&Arc<Route>> {
        let [a, b] = &self.routes.get(model)?.native;
        a.as_ref().or(b.as_ref())
    }

    /// The protocols whose backends serve `model`, `openai` first.
    pub fn apis_serving(&self, model: &str) -> impl Iterator<Item = Api> + '_ {
        let routes = self.routes.get(model);
        [Api::OpenAi, Api::Anthropic]
            .into_iter()
            .filter(move |api| routes.is_some_and(|r| r.native[api.slot()].is_some()))
    }

    /// The route of `GET`/`DELETE /v1/responses/{id}`: every enabled
    /// `openai` backend once, primary pool first (no model; the native ids
    /// are empty and unused).
    pub fn responses_route(&self) -> Option<&Arc<Route>> {
        self.responses.as_ref()
    }

    /// Whether `model` is listed by `/v1/models` for `key`.
    pub fn lists_model(&self, key: &ClientKey, model: &str) -> bool {
        key.allows(model)
            && self
                .models
                .binary_search_by(|m| m.as_str().cmp(model))
                .is_ok()
    }

    /// When models were "created" (the snapshot's compile time, seconds).
    pub fn created(&self) -> u64 {
        self.created
    }

    /// The client key whose secret hashes to `sha256`.
    pub fn key(&self, sha256: &[u8; 32]) -> Option<&Arc<ClientKey>> {
        self.keys.get(sha256)
    }

    /// Every client key (in no particular order).
    pub fn client_keys(&self) -> impl Iterator<Item = &Arc<ClientKey>> {
        self.keys.values()
    }

    /// Settings of `pool`.
    pub fn pool(&self, pool: Pool) -> &PoolConfig {
        &self.pools[pool]
    }

    /// Canonical models served.
    pub fn models(&self) -> &[String] {
        &self.models
    }

    /// The `/v1/models` body for a key: precomputed when the key may use
    /// every model.
    pub fn models_body(&self, key: &ClientKey) -> Bytes {
        if key.models.is_empty() {
            return self.models_body.clone();
        }
        render_models(self.models.iter().filter(|m| key.allows(m)), self.created)
    }
}

fn render_models<'a>(models: impl Iterator<Item = &'a String>, created: u64) -> Bytes {
    let data: Vec<serde_json::Value> = models
        .map(|m| serde_json::json!({"id": m, "object": "model", "created": created, "owned_by": "claw"}))
        .collect();
    Bytes::from(serde_json::json!({"object": "list", "data": data}).to_string())
}

/// Holds the current snapshot; cloning shares it.
#[derive(Clone, Default)]
pub struct SnapshotStore {
    current: Arc<ArcSwapOption<Snapshot>>,
}

impl SnapshotStore {
    /// The current snapshot, if one was applied.
    pub fn load(&self) -> Option<Arc<Snapshot>> {
        self.current.load_full()
    }

    /// The applied version (0 = none).
    pub fn version(&self) -> u64 {
        self.current.load().as_ref().map_or(0, |s| s.version)
    }

    /// Validates and applies a snapshot delivered as `version`. On error the
    /// previous snapshot stays in place.
    pub fn apply(&self, version: u64, snap: &v1::Snapshot) -> Result<(), SnapshotError> {
        self.apply_with(version, snap, compile)
    }

    /// Like [`SnapshotStore::apply`], but also takes a version older than
    /// the applied one. For the control plane's first snapshot after a
    /// start from the snapshot cache: the control plane is authoritative,
    /// even when it was restored to an older version than the cache holds.
    pub fn replace(&self, version: u64, snap: &v1::Snapshot) -> Result<(), SnapshotError> {
        self.apply_with(version, snap, compile_any_version)
    }

    fn apply_with(
        &self,
        version: u64,
        snap: &v1::Snapshot,
        compile: fn(
            u64,
            &v1::Snapshot,
            Option<&Snapshot>,
            Instant,
        ) -> Result<Snapshot, SnapshotError>,
    ) -> Result<(), SnapshotError> {
        let prev = self.load();
        let compiled = compile(version, snap, prev.as_deref(), Instant::now())?;
        let (backends, models) = (compiled.backends.len(), compiled.models.len());
        crate::metrics::set_backends(
            compiled
                .backends()
                .map(|b| (&*b.id, b.name.as_str(), b.pool, b.api.name())),
        );
        self.current.store(Some(Arc::new(compiled)));
        crate::metrics::set_snapshot_version(version);
        tracing::info!(version, backends, models, "applied configuration snapshot");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{backend, key};
    use sha2::Digest;

    fn snap(backends: Vec<v1::SnapshotBackend>) -> v1::Snapshot {
        v1::Snapshot {
            version: 0,
            backends,
            pools: vec![],
            client_keys: vec![key("ck_1", "secret")],
            models: vec![],
            ..Default::default()
        }
    }

    /// The defaults have one home (`claw_proto::validate`) and pass its own
    /// validation, so [`PoolConfig::default_for`] needs no fallback.
    #[test]
    fn pool_defaults_are_the_validated_proto_defaults() {
        for pool in [Pool::Primary, Pool::Fallback] {
            let p = claw_proto::validate::default_pool_settings(pool);
            assert_eq!(
                PoolConfig::from_proto(&p),
                Ok(PoolConfig::default_for(pool))
            );
            assert_eq!(PoolConfig::default_for(pool).pool, pool);
        }
        let pools = PoolConfigs::defaults();
        assert_eq!(pools[Pool::Fallback].pool, Pool::Fallback);
        assert_eq!(pools[Pool::Unspecified].pool, Pool::Primary);
    }

    #[tokio::test]
    async fn candidates_are_primary_first_and_disabled_are_skipped() {
        let mut off = backend("be_off", Pool::Primary, &[("gpt", "x")]);
        off.enabled = false;
        let s = snap(vec![
            backend("be_fb", Pool::Fallback, &[("gpt", "gpt-fb")]),
            off,
            backend("be_p", Pool::Primary, &[("gpt", "gpt-p")]),
        ]);
        let c = compile(3, &s, None, Instant::now()).unwrap();
        let r = c.route("gpt").unwrap();
        let ids: Vec<&str> = r.candidates.iter().map(|c| &*c.backend.id).collect();
        assert_eq!(ids, vec!["be_p", "be_fb"]);
        assert_eq!(&*r.candidates[0].native, "gpt-p");
        assert_eq!(r.settings.pool, Pool::Primary);
        assert_eq!(c.models(), ["gpt".to_string()]);
        assert!(c.backend("be_off").is_some());
    }

    #[tokio::test]
    async fn routes_are_per_protocol_and_responses_route_every_openai_backend() {
        let mut claude = backend("be_c", Pool::Primary, &[("claude", "c"), ("both", "b")]);
        claude.api = v1::Api::Anthropic as i32;
        let mut off = backend("be_off", Pool::Primary, &[("gpt", "x")]);
        off.enabled = false;
        let s = snap(vec![
            backend("be_fb", Pool::Fallback, &[("gpt", "g"), ("g2", "g2")]),
            claude,
            off,
            backend("be_o", Pool::Primary, &[("gpt", "g"), ("both", "b")]),
        ]);
        let c = compile(1, &s, None, Instant::now()).unwrap();
        assert!(c.route_for("claude", Api::OpenAi).is_none());
        let r = c.route_for("claude", Api::Anthropic).unwrap();
        assert_eq!(r.api, Api::Anthropic);
        assert_eq!(&*r.candidates[0].backend.id, "be_c");
        assert!(c.route_for("gpt", Api::Anthropic).is_none());
        let both: Vec<Api> = c.apis_serving("both").collect();
        assert_eq!(both, [Api::OpenAi, Api::Anthropic]);
        assert_eq!(
            c.route_for("both", Api::OpenAi).unwrap().candidates.len(),
            1
        );
        assert_eq!(
            c.apis_serving("claude").collect::<Vec<_>>(),
            [Api::Anthropic]
        );
        assert_eq!(
            c.models(),
            ["both", "claude", "g2", "gpt"].map(String::from)
        );
        // Every enabled openai backend once, primary first.
        let ids: Vec<&str> = c
            .responses_route()
            .unwrap()
            .candidates
            .iter()
            .map(|c| &*c.backend.id)
            .collect();
        assert_eq!(ids, ["be_o", "be_fb"]);
        let be = c.backend("be_c").unwrap();
        assert_eq!(be.credential.name, "x-api-key");
        assert_eq!(be.credential.value, "sk-be_c");
        assert!(!format!("{be:?}").contains("sk-be_c"), "no key in Debug");
        let be = c.backend("be_o").unwrap();
        assert_eq!(be.credential.name, "authorization");
        assert_eq!(be.credential.value, "Bearer sk-be_o");
    }

    #[tokio::test]
    async fn chat_and_messages_routes_mix_protocols_but_native_only_backends() {
        let mut claude = backend("be_c", Pool::Primary, &[("m", "claude-x")]);
        claude.api = v1::Api::Anthropic as i32;
        claude.models[0].max_tokens = 8192;
        let mut claude_only = backend("be_co", Pool::Fallback, &[("m", "claude-y")]);
        claude_only.api = v1::Api::Anthropic as i32;
        claude_only.native_only = true;
        let s = snap(vec![
            backend("be_fb", Pool::Fallback, &[("m", "glm")]),
            claude,
            claude_only,
            backend("be_o", Pool::Primary, &[("m", "gpt"), ("g", "g")]),
        ]);
        let c = compile(1, &s, None, Instant::now()).unwrap();
        let ids = |r: &Route| -> Vec<String> {
            r.candidates
                .iter()
                .map(|c| c.backend.id.to_string())
                .collect()
        };
        // Native routes are unchanged.
        assert_eq!(
            ids(c.route_for("m", Api::OpenAi).unwrap()),
            ["be_o", "be_fb"]
        );
        assert_eq!(
            ids(c.route_for("m", Api::Anthropic).unwrap()),
            ["be_c", "be_co"]
        );
        // Chat: both protocols, primary first, snapshot order within a
        // pool, the native-only Anthropic backend left out.
        let chat = c.translating_route_for("m", Api::OpenAi).unwrap();
        assert_eq!(chat.api, Api::OpenAi);
        assert_eq!(ids(chat), ["be_c", "be_o", "be_fb"]);
        assert_eq!(chat.candidates[0].max_tokens, Some(8192));
        assert_eq!(chat.candidates[1].max_tokens, None);
        // Messages: every backend (the native-only one speaks Anthropic).
        let msg = c.translating_route_for("m", Api::Anthropic).unwrap();
        assert_eq!(ids(msg), ["be_c", "be_o", "be_fb", "be_co"]);
        assert_eq!(msg.settings.pool, Pool::Primary);
        // Without a backend of the other protocol it is the native route.
        assert!(Arc::ptr_eq(
            c.translating_route_for("g", Api::OpenAi).unwrap(),
            c.route_for("g", Api::OpenAi).unwrap()
        ));
        // A model served only by the other protocol gets a translating route.
        assert!(c.route_for("g", Api::Anthropic).is_none());
        assert_eq!(
            ids(c.translating_route_for("g", Api::Anthropic).unwrap()),
            ["be_o"]
        );
        // Queues survive a new snapshot, per kind.
        let d = compile(2, &s, Some(&c), Instant::now()).unwrap();
        assert!(Arc::ptr_eq(
            &c.translating_route_for("m", Api::OpenAi).unwrap().queue,
            &d.translating_route_for("m", Api::OpenAi).unwrap().queue
        ));
        assert!(!Arc::ptr_eq(
            &d.translating_route_for("m", Api::OpenAi).unwrap().queue,
            &d.route_for("m", Api::OpenAi).unwrap().queue
        ));
    }

    /// Issue 17: one invalid resource is left out (listed with its
    /// reason); the rest of the snapshot applies.
    #[tokio::test]
    async fn invalid_resources_are_left_out_and_the_rest_applies() {
        let now = Instant::now();
        let kinds = |s: &Snapshot| -> Vec<(String, String)> {
            s.excluded()
                .iter()
                .map(|e| (e.kind.clone(), e.id.clone()))
                .collect()
        };
        let dup = snap(vec![
            backend("be_a", Pool::Primary, &[("m", "m")]),
            backend("be_a", Pool::Primary, &[("m", "m")]),
            backend("be_ok", Pool::Primary, &[("m", "m")]),
        ]);
        let c = compile(1, &dup, None, now).unwrap();
        assert!(c.backend("be_ok").is_some() && c.backend("be_a").is_none());
        assert_eq!(
            kinds(&c),
            [
                ("backend".into(), "be_a".into()),
                ("backend".into(), "be_a".into())
            ]
        );
        for url in [
            "not a url",
            "ftp://x/v1",
            "http://api.example.com/v 1",
            "http://api.example.com/v1\r\nX-Injected: 1",
            "http:///v1",
        ] {
            let mut bad = backend("be_bad", Pool::Primary, &[("m", "m")]);
            bad.base_url = url.into();
            let s = snap(vec![bad, backend("be_ok", Pool::Primary, &[("m", "m")])]);
            let c = compile(1, &s, None, now).unwrap();
            assert_eq!(kinds(&c), [("backend".into(), "be_bad".into())], "{url}");
            assert!(c.excluded()[0].reason.starts_with("base_url: "), "{url}");
            assert_eq!(c.route("m").unwrap().candidates.len(), 1, "{url}");
            assert_eq!(c.keys.len(), 1, "{url}");
        }
        let mut long = backend("be_long", Pool::Primary, &[]);
        long.base_url = format!("https://api.example.com/{}", "a".repeat(100 * 1024));
        let c = compile(1, &snap(vec![long]), None, now).unwrap();
        assert!(c.excluded()[0].reason.len() < 200);
        // A bad key digest or a shared secret: those keys are out, the
        // others work.
        let mut keys = snap(vec![]);
        keys.client_keys[0].secret_sha256 = "zz".into();
        keys.client_keys.push(key("ck_2", "s2"));
        keys.client_keys.push(key("ck_3", "shared"));
        keys.client_keys.push(key("ck_4", "shared"));
        let c = compile(1, &keys, None, now).unwrap();
        assert_eq!(
            kinds(&c),
            [
                ("client_key".into(), "ck_1".into()),
                ("client_key".into(), "ck_3".into()),
                ("client_key".into(), "ck_4".into())
            ]
        );
        assert_eq!(c.keys.len(), 1);
        // An invalid pool keeps the previous settings.
        let mut custom = claw_proto::validate::default_pool_settings(Pool::Primary);
        custom.max_retries = 7;
        let first = compile(
            1,
            &v1::Snapshot {
                pools: vec![custom],
                ..snap(vec![])
            },
            None,
            now,
        )
        .unwrap();
        let mut broken = custom;
        broken.emergency_fraction = 3.0;
        let second = compile(
            2,
            &v1::Snapshot {
                pools: vec![broken],
                ..snap(vec![])
            },
            Some(&first),
            now,
        )
        .unwrap();
        assert_eq!(kinds(&second), [("pool".into(), "primary".into())]);
        assert_eq!(second.pool(Pool::Primary).max_retries, 7);
    }

    #[tokio::test]
    async fn rejects_unusable_snapshots() {
        let now = Instant::now();
        let mut mismatch = snap(vec![]);
        mismatch.version = 5;
        assert!(matches!(
            compile(4, &mismatch, None, now),
            Err(SnapshotError::VersionMismatch { .. })
        ));
        let held = compile(7, &snap(vec![]), None, now).unwrap();
        assert!(matches!(
            compile(6, &snap(vec![]), Some(&held), now),
            Err(SnapshotError::Stale { got: 6, held: 7 })
        ));
    }

    #[tokio::test]
    async fn runtime_state_survives_a_new_snapshot() {
        let now = Instant::now();
        let s = snap(vec![backend("be_a", Pool::Primary, &[("m", "n")])]);
        let first = compile(1, &s, None, now).unwrap();
        first
            .backend("be_a")
            .unwrap()
            .runtime
            .cooldown
            .apply(now + Duration::from_secs(9), 1);
        let second = compile(2, &s, Some(&first), now).unwrap();
        assert!(Arc::ptr_eq(
            &first.backend("be_a").unwrap().runtime,
            &second.backend("be_a").unwrap().runtime
        ));
        assert!(Arc::ptr_eq(
            &first.route("m").unwrap().queue,
            &second.route("m").unwrap().queue
        ));
    }

    #[tokio::test]
    async fn store_keeps_previous_on_error() {
        let store = SnapshotStore::default();
        store.apply(2, &snap(vec![])).unwrap();
        assert!(store.apply(1, &snap(vec![])).is_err());
        assert_eq!(store.version(), 2);
    }

    #[tokio::test]
    async fn a_new_lineage_is_applied_even_at_a_lower_version() {
        let of = |lineage: &str| v1::Snapshot {
            lineage: lineage.into(),
            ..snap(vec![])
        };
        let store = SnapshotStore::default();
        store.apply(9, &of("ln_old")).unwrap();
        // Same lineage, lower version: stale, as before.
        assert!(matches!(
            store.apply(5, &of("ln_old")),
            Err(SnapshotError::Stale { got: 5, held: 9 })
        ));
        // No lineage (an older control plane): stale too.
        assert!(store.apply(5, &of("")).is_err());
        assert_eq!(store.version(), 9);
        // A restored control plane's new lineage is the authority.
        store.apply(5, &of("ln_new")).unwrap();
        assert_eq!(store.version(), 5);
        assert_eq!(store.load().unwrap().lineage(), "ln_new");
        // ...and its own history is ordered again.
        assert!(store.apply(4, &of("ln_new")).is_err());
        store.apply(6, &of("ln_new")).unwrap();
    }

    #[tokio::test]
    async fn models_body_is_filtered_per_key() {
        let mut s = snap(vec![backend(
            "be_a",
            Pool::Primary,
            &[("a", "a"), ("b", "b")],
        )]);
        s.client_keys[0].models = vec!["b".into()];
        let c = compile(1, &s, None, Instant::now()).unwrap();
        let digest: [u8; 32] = sha2::Sha256::digest(b"secret").into();
        let k = c.key(&digest).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&c.models_body(k)).unwrap();
        assert_eq!(v["object"], "list");
        assert_eq!(v["data"].as_array().unwrap().len(), 1);
        assert_eq!(v["data"][0]["id"], "b");
        assert_eq!(v["data"][0]["owned_by"], "claw");
    }
}
