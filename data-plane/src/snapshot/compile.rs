//! Compiling a `claw.v1.Snapshot` into a [`Snapshot`]: validation, then the
//! routing tables, carrying the runtime state over from the previous one.
//!
//! Field rules come from [`claw_proto::validate`]
//! (`validate_snapshot_backend`, `validate_snapshot_client_key`,
//! `validate_pool_settings`), the functions the control plane validates
//! every write with, so a static snapshot is held to the same rules as a
//! pushed one; what only the proxy needs (a provider key that is a valid
//! header value, unique ids and key digests) is checked here.
//!
//! One invalid resource never costs the rest: a backend, client key or pool
//! that fails is left out (listed in [`Snapshot::excluded`], reported in the
//! ACK) and everything else is applied, revocations and new client keys
//! above all. A left-out pool keeps its previous settings (or the
//! defaults). Only a snapshot that cannot be used at all (a version
//! mismatch, a stale version) is rejected.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use claw_proto::Pool;
use claw_proto::v1;
use http::HeaderValue;
use tokio::time::Instant;

use super::{
    Api, Backend, BackendRuntime, Candidate, ClientKey, Credential, KeyRpm, MAX_EXCLUDED,
    ModelRoutes, PoolConfig, PoolConfigs, Route, Snapshot, SnapshotError, render_models,
};
use crate::upstream::UpstreamTarget;
use crate::usage::Prices;

/// Validates `snap` (delivered as `version`) and compiles it, carrying the
/// runtime state over from `previous`. A version older than `previous`'s is
/// stale, unless `snap` names a different (non-empty) lineage: a control
/// plane restored from a backup starts a new history whose versions may be
/// lower than those the proxy saw, and it is the authority.
pub(crate) fn compile(
    version: u64,
    snap: &v1::Snapshot,
    previous: Option<&Snapshot>,
    now: Instant,
) -> Result<Snapshot, SnapshotError> {
    if let Some(prev) = previous
        && version < prev.version
        && !new_lineage(snap, prev)
    {
        return Err(SnapshotError::Stale {
            got: version,
            held: prev.version,
        });
    }
    compile_any_version(version, snap, previous, now)
}

/// Whether `snap` starts a lineage other than `prev`'s.
fn new_lineage(snap: &v1::Snapshot, prev: &Snapshot) -> bool {
    !snap.lineage.is_empty() && *snap.lineage != *prev.lineage
}

/// [`compile`] without the staleness check: `version` may be older than
/// `previous`'s (the runtime state is still carried over).
pub(super) fn compile_any_version(
    version: u64,
    snap: &v1::Snapshot,
    previous: Option<&Snapshot>,
    now: Instant,
) -> Result<Snapshot, SnapshotError> {
    if snap.version != 0 && snap.version != version {
        return Err(SnapshotError::VersionMismatch {
            outer: version,
            inner: snap.version,
        });
    }
    let mut excluded = Excluded::default();
    let pools = compile_pools(&snap.pools, previous, &mut excluded);
    let mut backends = Vec::with_capacity(snap.backends.len());
    let mut kept = Vec::with_capacity(snap.backends.len());
    let mut by_id = HashMap::new();
    let mut ids: HashMap<&str, usize> = HashMap::new();
    for b in &snap.backends {
        *ids.entry(b.id.as_str()).or_default() += 1;
    }
    for b in &snap.backends {
        // A duplicated id leaves every holder out: which one is meant is
        // unknown.
        if ids.get(b.id.as_str()).is_some_and(|n| *n > 1) {
            excluded.push("backend", &b.id, "duplicate backend id".to_string());
            continue;
        }
        match compile_backend(b, &pools, previous, now) {
            Ok(backend) => {
                by_id.insert(backend.id.clone(), backends.len());
                backends.push(Arc::new(backend));
                kept.push(b);
            }
            Err(reason) => excluded.push("backend", &b.id, reason),
        }
    }
    let routes = compile_routes(&backends, &kept, &pools, previous);
    let responses = compile_responses_route(&backends, &pools, previous);
    let keys = compile_keys(&snap.client_keys, previous, now, &mut excluded);

    let mut models: Vec<String> = if snap.models.is_empty() {
        routes.keys().cloned().collect()
    } else {
        snap.models.clone()
    };
    models.sort();
    models.dedup();
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let models_body = render_models(models.iter(), created);

    Ok(Snapshot {
        version,
        lineage: snap.lineage.as_str().into(),
        backends,
        by_id,
        routes,
        responses,
        keys,
        pools,
        models,
        models_body,
        created,
        excluded: excluded.list,
    })
}

/// The resources a compile left out, as the ACK reports them (at most
/// [`MAX_EXCLUDED`]; each one is logged).
#[derive(Default)]
struct Excluded {
    list: Vec<v1::ExcludedResource>,
}

impl Excluded {
    fn push(&mut self, kind: &str, id: &str, reason: String) {
        let id = claw_proto::validate::echo(id);
        let id = id.trim_matches('"');
        tracing::warn!(kind, id = %id, reason = %reason, "invalid resource left out of the configuration snapshot; the rest is applied");
        if self.list.len() < MAX_EXCLUDED {
            self.list.push(v1::ExcludedResource {
                kind: kind.to_string(),
                id: id.to_string(),
                reason,
            });
        }
    }
}

/// The pool settings: the defaults, overridden by each pool the snapshot
/// lists. An invalid one is left out: that pool keeps its previous settings
/// (or the defaults).
fn compile_pools(
    settings: &[v1::PoolSettings],
    previous: Option<&Snapshot>,
    excluded: &mut Excluded,
) -> PoolConfigs {
    let mut pools = PoolConfigs::defaults();
    for p in settings {
        match PoolConfig::from_proto(p) {
            Ok(cfg) => {
                let pool = cfg.pool;
                pools[pool] = cfg;
            }
            Err(e) => {
                let pool = Pool::try_from(p.pool).ok();
                let name = match pool {
                    Some(Pool::Fallback) => "fallback",
                    Some(Pool::Primary) => "primary",
                    _ => "unknown",
                };
                excluded.push("pool", name, e.to_string());
                if let (Some(pool @ (Pool::Primary | Pool::Fallback)), Some(prev)) =
                    (pool, previous)
                {
                    pools[pool] = prev.pool(pool).clone();
                }
            }
        }
    }
    pools
}

/// One backend, with its runtime state carried over from `previous` (by id)
/// and its limiters set to the new limits.
fn compile_backend(
    b: &v1::SnapshotBackend,
    pools: &PoolConfigs,
    previous: Option<&Snapshot>,
    now: Instant,
) -> Result<Backend, String> {
    claw_proto::validate::validate_snapshot_backend(b).map_err(|e| e.to_string())?;
    let (base_url, target) = parse_base_url(&b.base_url)?;
    let api = match v1::Api::try_from(b.api) {
        Ok(v1::Api::Anthropic) => Api::Anthropic,
        _ => Api::OpenAi,
    };
    let credential = credential(api, &b.api_key)
        .ok_or_else(|| "api_key: is not a valid header value".to_string())?;
    let pool = match Pool::try_from(b.pool) {
        Ok(Pool::Fallback) => Pool::Fallback,
        _ => Pool::Primary,
    };
    let emergency = pools[pool].emergency_fraction * f64::from(b.rpm);
    let tpm = b.tpm.filter(|t| *t > 0);
    let runtime = match previous.and_then(|p| p.backend(&b.id)) {
        Some(old) => {
            let rt = old.runtime.clone();
            // A new key or URL is the operator's answer to an auth failure.
            if (old.credential.value != credential.value || old.base_url != base_url)
                && rt.cooldown.clear_auth()
            {
                tracing::info!(backend = %b.name, backend_id = %b.id, "key or URL updated: auth failure cleared");
            }
            rt.rpm.set_limit(f64::from(b.rpm), now);
            rt.tpm.set_limit(f64::from(tpm.unwrap_or(0)), now);
            rt.emergency.set_limit(emergency, now);
            rt
        }
        None => Arc::new(BackendRuntime::new(b.rpm, tpm.unwrap_or(0), emergency, now)),
    };
    Ok(Backend {
        id: Arc::from(b.id.as_str()),
        api,
        name: b.name.clone(),
        pool,
        base_url,
        target,
        credential,
        timeout: Duration::from_millis(if b.timeout_ms == 0 {
            claw_proto::validate::DEFAULT_BACKEND_TIMEOUT_MS
        } else {
            b.timeout_ms
        }),
        weight: b.weight.max(1),
        tpm,
        enabled: b.enabled,
        native_only: b.native_only,
        runtime,
    })
}

/// The header a backend's key goes upstream in, by protocol (sensitive).
pub(crate) fn credential(api: Api, key: &str) -> Option<Credential> {
    let (name, text) = match api {
        Api::OpenAi => (http::header::AUTHORIZATION, format!("Bearer {key}")),
        Api::Anthropic => (http::HeaderName::from_static("x-api-key"), key.to_string()),
    };
    let mut value = HeaderValue::from_str(&text).ok()?;
    value.set_sensitive(true);
    Some(Credential { name, value })
}

/// Routes: per canonical model and client protocol, the native route (the
/// enabled backends of that protocol with a mapping) and the translating
/// one (those of both protocols but the other protocol's `native_only`
/// ones), each primary pool first and stable within a pool, so the
/// snapshot's order breaks ties and both protocols rank together. A
/// translating route with no backend of the other protocol is the native
/// route itself. A route keeps its wait queue across snapshots (by model
/// name, protocol and kind).
fn compile_routes(
    backends: &[Arc<Backend>],
    protos: &[&v1::SnapshotBackend],
    pools: &PoolConfigs,
    previous: Option<&Snapshot>,
) -> HashMap<String, ModelRoutes> {
    // Per model, every (backend, mapping) serving it, in snapshot order.
    let mut serving: HashMap<&str, Vec<Candidate>> = HashMap::new();
    for (b, proto) in backends.iter().zip(protos) {
        if !b.enabled {
            continue;
        }
        for m in &proto.models {
            let list = serving.entry(m.canonical.as_str()).or_default();
            if list.iter().any(|c| Arc::ptr_eq(&c.backend, b)) {
                continue;
            }
            list.push(candidate(b, m));
        }
    }
    let mut routes: HashMap<String, ModelRoutes> = HashMap::with_capacity(serving.len());
    for (model, all) in serving {
        let name: Arc<str> = Arc::from(model);
        let entry = routes.entry(model.to_string()).or_default();
        for api in [Api::OpenAi, Api::Anthropic] {
            let native: Vec<Candidate> = all
                .iter()
                .filter(|c| c.backend.api == api)
                .cloned()
                .collect();
            let mixed: Vec<Candidate> = all
                .iter()
                .filter(|c| c.backend.api == api || !c.backend.native_only)
                .cloned()
                .collect();
            let native_route = (!native.is_empty()).then(|| {
                let queue = previous
                    .and_then(|p| p.route_for(model, api))
                    .map(|r| r.queue.clone());
                route(name.clone(), api, native, pools, queue)
            });
            let translating = if mixed.iter().all(|c| c.backend.api == api) {
                native_route.clone()
            } else {
                // The previous translating route's queue, unless it was
                // the native route (whose queue the native route keeps).
                let queue = previous.and_then(|p| {
                    let t = p.translating_route_for(model, api)?;
                    let shared = p.route_for(model, api).is_some_and(|n| Arc::ptr_eq(n, t));
                    (!shared).then(|| t.queue.clone())
                });
                Some(route(name.clone(), api, mixed, pools, queue))
            };
            entry.native[api.slot()] = native_route;
            entry.translating[api.slot()] = translating;
        }
    }
    routes
}

/// The candidate of backend `b` for mapping `m`.
fn candidate(b: &Arc<Backend>, m: &v1::ModelMapping) -> Candidate {
    Candidate {
        backend: b.clone(),
        native: Arc::from(m.native.as_str()),
        prices: Prices {
            input: m.input_cost_per_token,
            output: m.output_cost_per_token,
            cache_read: m.cache_read_cost_per_token,
            cache_write: m.cache_write_cost_per_token,
            cache_write_1h: m.cache_write_1h_cost_per_token,
        },
        max_tokens: (m.max_tokens > 0).then_some(m.max_tokens),
        context_window: (m.context_window > 0).then_some(m.context_window),
        metrics: Arc::default(),
    }
}

/// A route over `list`, primary pool first, governed by its first pool.
fn route(
    model: Arc<str>,
    api: Api,
    mut list: Vec<Candidate>,
    pools: &PoolConfigs,
    queue: Option<Arc<crate::queue::WaitQueue>>,
) -> Arc<Route> {
    list.sort_by_key(|c| c.backend.pool == Pool::Fallback);
    let governing = list.first().map_or(Pool::Primary, |c| c.backend.pool);
    Arc::new(Route {
        model,
        api,
        candidates: list,
        settings: pools[governing].clone(),
        queue: queue.unwrap_or_default(),
        rotation: AtomicUsize::new(0),
    })
}

/// The route of `GET`/`DELETE /v1/responses/{id}`: every enabled `openai`
/// backend once (a stored response may be on any of them), with an empty
/// native id (those requests have no body) and no prices.
fn compile_responses_route(
    backends: &[Arc<Backend>],
    pools: &PoolConfigs,
    previous: Option<&Snapshot>,
) -> Option<Arc<Route>> {
    let list: Vec<Candidate> = backends
        .iter()
        .filter(|b| b.enabled && b.api == Api::OpenAi)
        .map(|b| Candidate {
            backend: b.clone(),
            native: Arc::from(""),
            prices: Prices::default(),
            max_tokens: None,
            context_window: None,
            metrics: Arc::default(),
        })
        .collect();
    if list.is_empty() {
        return None;
    }
    let queue = previous
        .and_then(|p| p.responses_route())
        .map(|r| r.queue.clone());
    Some(route(Arc::from(""), Api::OpenAi, list, pools, queue))
}

/// Client keys by secret digest; a key's rpm and max-parallel limiters are
/// carried over (by key id). An invalid key is left out, and so is every key
/// sharing a secret with another (fail closed: which one is meant is unknown).
fn compile_keys(
    keys: &[v1::SnapshotClientKey],
    previous: Option<&Snapshot>,
    now: Instant,
    excluded: &mut Excluded,
) -> HashMap<[u8; 32], Arc<ClientKey>> {
    let mut digests = Vec::with_capacity(keys.len());
    let mut holders: HashMap<[u8; 32], usize> = HashMap::with_capacity(keys.len());
    for k in keys {
        let digest = claw_proto::validate::validate_snapshot_client_key(k)
            .map_err(|e| e.to_string())
            .and_then(|()| parse_sha256(&k.secret_sha256));
        if let Ok(d) = &digest {
            *holders.entry(*d).or_default() += 1;
        }
        digests.push(digest);
    }
    // The previous keys by id, for carrying their limiters over.
    let previous_by_id: HashMap<&str, &Arc<ClientKey>> = previous
        .map(|p| p.keys.values().map(|o| (&*o.id, o)).collect())
        .unwrap_or_default();
    let mut out = HashMap::with_capacity(keys.len());
    for (k, digest) in keys.iter().zip(digests) {
        let digest = match digest {
            Ok(d) if holders.get(&d).is_some_and(|n| *n > 1) => {
                excluded.push("client_key", &k.id, "duplicate secret".to_string());
                continue;
            }
            Ok(d) => d,
            Err(reason) => {
                excluded.push("client_key", &k.id, reason);
                continue;
            }
        };
        let old = previous_by_id.get(k.id.as_str());
        let rpm = (k.rpm > 0).then(|| match old.and_then(|o| o.rpm.clone()) {
            Some(b) => {
                b.limiter.set_limit(f64::from(k.rpm), now);
                b
            }
            None => Arc::new(KeyRpm::new(k.rpm, now)),
        });
        let parallel = (k.max_parallel > 0).then(|| match old.and_then(|o| o.parallel.clone()) {
            Some(l) => {
                l.set_max(k.max_parallel);
                l
            }
            None => Arc::new(crate::key_limits::KeyLimiter::new(k.max_parallel)),
        });
        let key = Arc::new(ClientKey {
            id: Arc::from(k.id.as_str()),
            name: k.name.clone(),
            models: k.models.iter().cloned().collect(),
            rpm,
            parallel,
            agents: k.agents.iter().cloned().collect(),
            internal: k.internal,
        });
        out.insert(digest, key);
    }
    out
}

/// The base URL without a trailing slash, and split for building each
/// attempt's URI. The URL rules ([`claw_proto::validate::http_url`]) were
/// checked; this is the last guard.
fn parse_base_url(raw: &str) -> Result<(String, Arc<UpstreamTarget>), String> {
    let base = raw.trim_end_matches('/').to_string();
    let target = UpstreamTarget::parse(&base)
        .filter(|t| t.uri("/chat/completions", None).is_some())
        .ok_or_else(|| "base_url: is not a valid URI".to_string())?;
    Ok((base, Arc::new(target)))
}

fn parse_sha256(hex_str: &str) -> Result<[u8; 32], String> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_str.trim().to_ascii_lowercase(), &mut out)
        .map_err(|_| "secret_sha256: must be 64 hex characters".to_string())?;
    Ok(out)
}
