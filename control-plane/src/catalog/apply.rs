//! Whole-configuration apply: make the stored configuration match a desired
//! one in a single transaction with a single version bump.
//!
//! Resources are matched by their stable human key: backends and client keys
//! by name, pools by pool, agents by id. Every item is validated before
//! anything is planned, with field paths such as `backends[2].rpm`. A
//! backend's empty `api_key` keeps the stored key; a given key is compared
//! with the stored one by decrypting, never by echoing it.

use std::collections::{BTreeMap, HashSet};

use claw_proto::v1::{
    Agent, Backend, ChangeAction, ClientKey, ClusterConfig, ConfigChange, CreatedSecret,
    PoolSettings,
};
use claw_proto::validate::{self, BACKEND_ID_PREFIX, FieldError};

use super::records::{self, AgentRecord, BackendRecord, ClientKeyRecord, SealedRecord};
use super::{Catalog, CatalogError, Result, agents, backends, client_keys, pools};
use crate::audit::{self, Actor, Change};
use crate::crypto::MasterKey;

/// A desired configuration and how to apply it.
#[derive(Debug, Clone, Default)]
pub struct ApplyRequest {
    /// The desired configuration.
    pub config: ClusterConfig,
    /// Compute the changes, store nothing.
    pub dry_run: bool,
    /// Delete backends, client keys and agents the configuration does not name.
    pub prune: bool,
}

/// What an apply did (or, on a dry run, would do).
#[derive(Debug, Clone, Default)]
pub struct ApplyOutcome {
    /// One entry per resource named in the configuration, plus deletions.
    pub changes: Vec<ConfigChange>,
    /// Version after the apply (unchanged on a dry run or when nothing changed).
    pub config_version: u64,
    /// Secrets of the client keys the apply created (empty on a dry run).
    pub created_secrets: Vec<CreatedSecret>,
}

/// One write of the plan.
enum Op {
    PutBackend(Box<BackendRecord>, Option<String>),
    DeleteBackend(Box<Backend>),
    PutPool(PoolSettings),
    PutClientKey(Box<ClientKeyRecord>, bool),
    DeleteClientKey(Box<ClientKeyRecord>),
    PutAgent(Box<AgentRecord>, bool),
    DeleteAgent(String),
}

/// The planned changes and writes.
#[derive(Default)]
struct Plan {
    changes: Vec<ConfigChange>,
    ops: Vec<Op>,
    secrets: Vec<CreatedSecret>,
    /// One audit record per changed resource.
    audit: Vec<Change>,
}

impl Plan {
    fn record(&mut self, kind: &str, name: &str, action: ChangeAction, fields: Vec<&str>) {
        self.changes.push(ConfigChange {
            kind: kind.to_string(),
            name: name.to_string(),
            action: action as i32,
            fields: fields.into_iter().map(str::to_string).collect(),
        });
    }
}

fn at(prefix: String) -> impl Fn(FieldError) -> CatalogError {
    move |e| CatalogError::invalid(e.within(&prefix))
}

fn duplicate(field: String, what: &str, name: &str) -> CatalogError {
    CatalogError::invalid(FieldError::new(
        field,
        format!("{what} {name:?} is listed twice"),
    ))
}

/// Normalizes and validates every item; nothing is read from the store.
fn validate_config(cfg: &mut ClusterConfig) -> Result<()> {
    let mut seen = HashSet::new();
    for (i, b) in cfg.backends.iter_mut().enumerate() {
        let path = format!("backends[{i}]");
        b.id.clear();
        b.status.clear();
        backends::normalize_and_validate(b, false).map_err(at(path.clone()))?;
        if !seen.insert(b.name.clone()) {
            return Err(duplicate(format!("{path}.name"), "backend", &b.name));
        }
    }
    let mut seen = HashSet::new();
    for (i, p) in cfg.pools.iter().enumerate() {
        let path = format!("pools[{i}]");
        let pool = pools::parse_pool(&format!("{path}.pool"), p.pool)?;
        validate::validate_pool_settings(p).map_err(at(path.clone()))?;
        if !seen.insert(pool) {
            return Err(duplicate(format!("{path}.pool"), "pool", pool.name()));
        }
    }
    let mut seen = HashSet::new();
    for (i, k) in cfg.client_keys.iter_mut().enumerate() {
        let path = format!("client_keys[{i}]");
        client_keys::normalize(k);
        validate::validate_client_key(k).map_err(at(path.clone()))?;
        if !seen.insert(k.name.clone()) {
            return Err(duplicate(format!("{path}.name"), "client key", &k.name));
        }
    }
    let mut seen = HashSet::new();
    for (i, a) in cfg.agents.iter_mut().enumerate() {
        let path = format!("agents[{i}]");
        agents::check(a).map_err(|e| match e {
            CatalogError::Invalid(f) => CatalogError::invalid(f.within(&path)),
            other => other,
        })?;
        if !seen.insert(a.id.clone()) {
            return Err(duplicate(format!("{path}.id"), "agent", &a.id));
        }
    }
    Ok(())
}

impl Catalog {
    /// Makes the stored configuration match `req.config`: atomically, with
    /// one version bump, or none when nothing changes.
    pub async fn apply(&self, actor: &Actor, req: ApplyRequest) -> Result<ApplyOutcome> {
        let mut cfg = req.config;
        validate_config(&mut cfg)?;
        let guard = self.lock().await;
        let key = self.current_key();
        let now = records::now_ms();
        let mut plan = Plan::default();
        self.plan_backends(&mut plan, cfg.backends, req.prune, &key, now)?;
        self.plan_pools(&mut plan, cfg.pools)?;
        self.plan_client_keys(&mut plan, cfg.client_keys, req.prune, now)?;
        self.plan_agents(&mut plan, cfg.agents, req.prune, now)?;

        if req.dry_run || plan.ops.is_empty() {
            return Ok(ApplyOutcome {
                changes: plan.changes,
                config_version: self.config_version(),
                created_secrets: Vec::new(),
            });
        }
        let ops = plan.ops;
        let audit = plan.audit;
        let (_, version) = self
            .commit(&guard, actor, "ApplyConfig", |txn| {
                // Deletions first, so a name freed by a deletion can be
                // taken by a creation in the same apply.
                for op in &ops {
                    match op {
                        Op::DeleteBackend(spec) => backends::remove(txn, spec)?,
                        Op::DeleteClientKey(rec) => client_keys::remove(txn, rec)?,
                        Op::DeleteAgent(id) => agents::remove(txn, id)?,
                        _ => {}
                    }
                }
                for op in &ops {
                    match op {
                        Op::PutBackend(rec, old_name) => {
                            backends::put(txn, rec, old_name.as_deref())?
                        }
                        Op::PutPool(p) => pools::put(txn, p, now)?,
                        Op::PutClientKey(rec, is_new) => client_keys::put(txn, rec, *is_new)?,
                        Op::PutAgent(rec, is_new) => agents::put(txn, rec, *is_new)?,
                        _ => {}
                    }
                }
                Ok(((), audit.clone()))
            })
            .await?;
        Ok(ApplyOutcome {
            changes: plan.changes,
            config_version: version,
            created_secrets: plan.secrets,
        })
    }

    fn plan_backends(
        &self,
        plan: &mut Plan,
        desired: Vec<Backend>,
        prune: bool,
        key: &MasterKey,
        now: i64,
    ) -> Result<()> {
        let mut existing: BTreeMap<String, BackendRecord> = self
            .backend_records()?
            .into_iter()
            .filter_map(|r| r.spec.as_ref().map(|s| s.name.clone()).map(|n| (n, r)))
            .collect();
        for (i, mut b) in desired.into_iter().enumerate() {
            let api_key = std::mem::take(&mut b.api_key);
            match existing.remove(&b.name) {
                None => {
                    if api_key.is_empty() {
                        return Err(CatalogError::invalid(FieldError::new(
                            format!("backends[{i}].api_key"),
                            "is required",
                        )));
                    }
                    b.id = super::new_id(BACKEND_ID_PREFIX);
                    let sealed = key.seal(api_key.as_bytes(), b.id.as_bytes())?;
                    plan.record("backend", &b.name, ChangeAction::Create, vec![]);
                    plan.audit.push(backends::created(&b));
                    plan.ops.push(Op::PutBackend(
                        Box::new(BackendRecord {
                            spec: Some(backends::storable_spec(b)),
                            api_key: Some(SealedRecord::from(sealed)),
                            created_at_ms: now,
                            updated_at_ms: now,
                        }),
                        None,
                    ));
                }
                Some(old) => {
                    let old_spec = old.spec.clone().unwrap_or_default();
                    b.id.clone_from(&old_spec.id);
                    let mut diff = backends::diff(&old_spec, &b);
                    let mut sealed = old.api_key.clone();
                    if !api_key.is_empty() && api_key != self.backend_api_key(&old)? {
                        diff.secret("api_key", audit::SEALED, audit::CHANGED);
                        sealed = Some(SealedRecord::from(
                            key.seal(api_key.as_bytes(), b.id.as_bytes())?,
                        ));
                    }
                    if diff.is_empty() {
                        plan.record("backend", &b.name, ChangeAction::Unchanged, vec![]);
                        continue;
                    }
                    plan.record("backend", &b.name, ChangeAction::Update, diff.names());
                    let name = old_spec.name.clone();
                    plan.audit.push(Change::new(
                        "backend",
                        &b.id,
                        &b.name,
                        "updated",
                        diff.into_changes(),
                    ));
                    plan.ops.push(Op::PutBackend(
                        Box::new(BackendRecord {
                            spec: Some(backends::storable_spec(b)),
                            api_key: sealed,
                            created_at_ms: old.created_at_ms,
                            updated_at_ms: now,
                        }),
                        Some(name),
                    ));
                }
            }
        }
        if prune {
            for (name, rec) in existing {
                plan.record("backend", &name, ChangeAction::Delete, vec![]);
                let spec = rec.spec.unwrap_or_default();
                plan.audit.push(backends::deleted(&spec));
                plan.ops.push(Op::DeleteBackend(Box::new(spec)));
            }
        }
        Ok(())
    }

    fn plan_pools(&self, plan: &mut Plan, desired: Vec<PoolSettings>) -> Result<()> {
        for p in desired {
            let pool = pools::parse_pool("pool", p.pool)?;
            let old = self.get_pool(pool)?;
            let diff = pools::diff(&old, &p);
            if diff.is_empty() {
                plan.record("pool", pool.name(), ChangeAction::Unchanged, vec![]);
            } else {
                plan.record("pool", pool.name(), ChangeAction::Update, diff.names());
                plan.audit.push(Change::new(
                    "pool",
                    pool.name(),
                    pool.name(),
                    "updated",
                    diff.into_changes(),
                ));
                plan.ops.push(Op::PutPool(p));
            }
        }
        Ok(())
    }

    fn plan_client_keys(
        &self,
        plan: &mut Plan,
        desired: Vec<ClientKey>,
        prune: bool,
        now: i64,
    ) -> Result<()> {
        let mut existing: BTreeMap<String, ClientKeyRecord> = self
            .client_key_records()?
            .into_iter()
            .filter_map(|r| r.spec.as_ref().map(|s| s.name.clone()).map(|n| (n, r)))
            .collect();
        for (i, k) in desired.into_iter().enumerate() {
            match existing.remove(&k.name) {
                None => {
                    let name = k.name.clone();
                    let (rec, secret) = client_keys::new_record(k, now);
                    plan.record("client_key", &name, ChangeAction::Create, vec![]);
                    if let Some(spec) = &rec.spec {
                        plan.audit.push(client_keys::created(spec));
                    }
                    plan.secrets.push(CreatedSecret { name, secret });
                    plan.ops.push(Op::PutClientKey(Box::new(rec), true));
                }
                Some(old) => {
                    let old_spec = old.spec.clone().unwrap_or_default();
                    if old_spec.internal {
                        return Err(CatalogError::invalid(FieldError::new(
                            format!("client_keys[{i}].name"),
                            format!(
                                "{:?} is an internal key of the control plane; choose another name",
                                k.name
                            ),
                        )));
                    }
                    let diff = client_keys::diff(&old_spec, &k);
                    if diff.is_empty() {
                        plan.record("client_key", &k.name, ChangeAction::Unchanged, vec![]);
                        continue;
                    }
                    plan.record("client_key", &k.name, ChangeAction::Update, diff.names());
                    plan.audit.push(Change::new(
                        client_keys::AUDIT_KIND,
                        &old_spec.id,
                        &old_spec.name,
                        "updated",
                        diff.into_changes(),
                    ));
                    let spec = ClientKey {
                        models: k.models,
                        rpm: k.rpm,
                        max_parallel: k.max_parallel,
                        agents: k.agents,
                        ..old_spec
                    };
                    plan.ops.push(Op::PutClientKey(
                        Box::new(ClientKeyRecord {
                            spec: Some(spec),
                            updated_at_ms: now,
                            ..old
                        }),
                        false,
                    ));
                }
            }
        }
        if prune {
            for (name, rec) in existing {
                if rec.spec.as_ref().is_some_and(|s| s.internal) {
                    continue;
                }
                plan.record("client_key", &name, ChangeAction::Delete, vec![]);
                if let Some(spec) = &rec.spec {
                    plan.audit.push(client_keys::deleted(spec));
                }
                plan.ops.push(Op::DeleteClientKey(Box::new(rec)));
            }
        }
        Ok(())
    }

    fn plan_agents(
        &self,
        plan: &mut Plan,
        desired: Vec<Agent>,
        prune: bool,
        now: i64,
    ) -> Result<()> {
        let mut existing: BTreeMap<String, AgentRecord> = self
            .agent_records()?
            .into_iter()
            .filter_map(|r| r.spec.as_ref().map(|s| s.id.clone()).map(|n| (n, r)))
            .collect();
        for a in desired {
            match existing.remove(&a.id) {
                None => {
                    plan.record("agent", &a.id, ChangeAction::Create, vec![]);
                    plan.audit
                        .push(agents::created(&a, !a.webhook_secret.is_empty()));
                    let webhook_secret = match a.webhook_secret.as_str() {
                        "" => None,
                        s => Some(self.seal_webhook_secret(&a.id, s)?),
                    };
                    plan.ops.push(Op::PutAgent(
                        Box::new(AgentRecord {
                            spec: Some(agents::storable_spec(a)),
                            created_at_ms: now,
                            updated_at_ms: now,
                            webhook_secret,
                        }),
                        true,
                    ));
                }
                Some(old) => {
                    let mut diff = agents::diff(&old.spec.clone().unwrap_or_default(), &a);
                    // An empty secret keeps the stored one (like backend keys);
                    // a given one is compared by decrypting, never echoed.
                    let webhook_secret = match a.webhook_secret.as_str() {
                        "" => old.webhook_secret.clone(),
                        s if self.agent_webhook_secret(&old)?.as_deref() == Some(s) => {
                            old.webhook_secret.clone()
                        }
                        s => {
                            let was = if old.webhook_secret.is_some() {
                                audit::SEALED
                            } else {
                                ""
                            };
                            let now = if old.webhook_secret.is_some() {
                                audit::CHANGED
                            } else {
                                audit::SET
                            };
                            diff.secret("webhook_secret", was, now);
                            Some(self.seal_webhook_secret(&a.id, s)?)
                        }
                    };
                    if diff.is_empty() {
                        plan.record("agent", &a.id, ChangeAction::Unchanged, vec![]);
                        continue;
                    }
                    plan.record("agent", &a.id, ChangeAction::Update, diff.names());
                    plan.audit.push(Change::new(
                        "agent",
                        &a.id,
                        &a.name,
                        "updated",
                        diff.into_changes(),
                    ));
                    plan.ops.push(Op::PutAgent(
                        Box::new(AgentRecord {
                            spec: Some(agents::storable_spec(a)),
                            created_at_ms: old.created_at_ms,
                            updated_at_ms: now,
                            webhook_secret,
                        }),
                        false,
                    ));
                }
            }
        }
        if prune {
            for (id, rec) in existing {
                plan.record("agent", &id, ChangeAction::Delete, vec![]);
                if let Some(spec) = &rec.spec {
                    plan.audit
                        .push(agents::deleted(spec, rec.webhook_secret.is_some()));
                }
                plan.ops.push(Op::DeleteAgent(id));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use claw_proto::Pool;
    use claw_proto::v1::{self, ModelMapping};

    fn backend(name: &str, key: &str) -> Backend {
        Backend {
            name: name.into(),
            base_url: "https://api.example.com/v1".into(),
            api_key: key.into(),
            rpm: 60,
            enabled: true,
            models: vec![ModelMapping {
                canonical: "gpt-4o".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn config() -> ClusterConfig {
        let mut fallback = validate::default_pool_settings(Pool::Fallback);
        fallback.max_retries = 4;
        ClusterConfig {
            backends: vec![
                backend("b1", "sk-one-0123456789"),
                backend("b2", "sk-two-0123456789"),
            ],
            pools: vec![fallback],
            client_keys: vec![ClientKey {
                name: "app".into(),
                rpm: 5,
                ..Default::default()
            }],
            agents: vec![Agent {
                id: "a1".into(),
                model: "gpt-4o".into(),
                enabled: true,
                ..Default::default()
            }],
        }
    }

    fn actions(o: &ApplyOutcome) -> Vec<(String, String, &'static str)> {
        o.changes
            .iter()
            .map(|c| {
                let a = ChangeAction::try_from(c.action).unwrap_or(ChangeAction::Unspecified);
                (c.kind.clone(), c.name.clone(), a.name())
            })
            .collect()
    }

    fn apply(config: ClusterConfig) -> ApplyRequest {
        ApplyRequest {
            config,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn apply_twice_is_idempotent_with_one_bump() {
        let (_dir, c) = catalog().await;
        let v0 = c.config_version();
        let first = c
            .apply(&Actor::system(), apply(config()))
            .await
            .expect("apply");
        assert_eq!(first.config_version, v0 + 1, "one bump for the whole apply");
        assert!(
            actions(&first)
                .iter()
                .all(|(k, _, a)| *a == if k == "pool" { "update" } else { "create" })
        );
        assert_eq!(first.created_secrets.len(), 1);
        assert_eq!(first.created_secrets[0].name, "app");
        assert_eq!(c.backend_count().expect("count"), 2);

        let second = c
            .apply(&Actor::system(), apply(config()))
            .await
            .expect("again");
        assert_eq!(second.config_version, first.config_version);
        assert!(actions(&second).iter().all(|(_, _, a)| *a == "unchanged"));
        assert!(second.created_secrets.is_empty());

        // What export returns applies as all-unchanged too.
        let (exported, _) = c.export().await.expect("export");
        let third = c
            .apply(&Actor::system(), apply(exported))
            .await
            .expect("export round trip");
        assert!(
            actions(&third).iter().all(|(_, _, a)| *a == "unchanged"),
            "{:?}",
            actions(&third)
        );
        assert_eq!(c.config_version(), first.config_version);
    }

    #[tokio::test]
    async fn invalid_item_stores_nothing_and_names_the_path() {
        let (_dir, c) = catalog().await;
        let v0 = c.config_version();
        let mut cfg = config();
        cfg.backends.push(backend("b3", "sk-three-0123456789"));
        cfg.backends[2].rpm = 0;
        let err = c
            .apply(&Actor::system(), apply(cfg))
            .await
            .expect_err("invalid");
        assert_eq!(err.to_string(), "backends[2].rpm: must be > 0");
        assert_eq!(c.backend_count().expect("count"), 0);
        assert_eq!(c.config_version(), v0);

        let mut cfg = config();
        cfg.backends[1].api_key.clear();
        let err = c
            .apply(&Actor::system(), apply(cfg))
            .await
            .expect_err("missing key");
        assert_eq!(err.to_string(), "backends[1].api_key: is required");
        assert_eq!(c.backend_count().expect("count"), 0);

        let mut cfg = config();
        cfg.agents[0].timezone = "Nowhere/Land".into();
        let err = c
            .apply(&Actor::system(), apply(cfg))
            .await
            .expect_err("bad tz");
        assert!(err.to_string().starts_with("agents[0].timezone: "));
        assert_eq!(c.agent_count().expect("count"), 0);

        let mut cfg = config();
        cfg.backends[1].name = "b1".into();
        let err = c
            .apply(&Actor::system(), apply(cfg))
            .await
            .expect_err("dup");
        assert!(err.to_string().starts_with("backends[1].name: "));
    }

    #[tokio::test]
    async fn updates_report_fields_keys_compare_by_decrypting_and_prune_deletes() {
        let (_dir, c) = catalog().await;
        c.apply(&Actor::system(), apply(config()))
            .await
            .expect("apply");
        let mut cfg = config();
        cfg.backends[0].rpm = 120;
        cfg.backends[1].api_key = "sk-two-rotated-999".into();
        cfg.backends.remove(0);
        cfg.backends.insert(0, {
            let mut b = backend("b1", "");
            b.rpm = 120;
            b
        });
        cfg.client_keys.clear();
        cfg.agents[0].interval_seconds = 60;

        let dry = c
            .apply(
                &Actor::system(),
                ApplyRequest {
                    config: cfg.clone(),
                    dry_run: true,
                    prune: true,
                },
            )
            .await
            .expect("dry run");
        let v = c.config_version();
        assert_eq!(dry.config_version, v);
        let real = c
            .apply(
                &Actor::system(),
                ApplyRequest {
                    config: cfg,
                    dry_run: false,
                    prune: true,
                },
            )
            .await
            .expect("apply");
        assert_eq!(actions(&dry), actions(&real), "dry run predicts the apply");
        assert_eq!(real.config_version, v + 1);
        let by_name = |name: &str| {
            real.changes
                .iter()
                .find(|c| c.name == name)
                .cloned()
                .expect("listed")
        };
        assert_eq!(by_name("b1").fields, ["rpm"]);
        assert_eq!(by_name("b2").fields, ["api_key"]);
        assert_eq!(by_name("app").action, ChangeAction::Delete as i32);
        assert_eq!(by_name("a1").fields, ["interval_seconds"]);
        assert_eq!(c.client_key_count().expect("count"), 0);
        let b2 = c.get_backend("b2").expect("b2");
        assert_eq!(b2.api_key, "sk-…999");
    }

    #[tokio::test]
    async fn probe_settings_apply_validate_and_show_in_a_dry_run() {
        let (_dir, c) = catalog().await;
        c.apply(&Actor::system(), apply(config()))
            .await
            .expect("apply");
        let mut cfg = config();
        cfg.backends[0].api_key.clear();
        cfg.backends[1].api_key.clear();
        cfg.backends[0].probe = Some(v1::ProbeSettings {
            interval_ms: 30_000,
            ..Default::default()
        });
        let v = c.config_version();
        let dry = c
            .apply(
                &Actor::system(),
                ApplyRequest {
                    config: cfg.clone(),
                    dry_run: true,
                    prune: false,
                },
            )
            .await
            .expect("dry run");
        assert_eq!(dry.config_version, v);
        let b1 = dry.changes.iter().find(|c| c.name == "b1").expect("b1");
        assert_eq!(b1.fields, ["probe"]);
        c.apply(&Actor::system(), apply(cfg.clone()))
            .await
            .expect("apply");
        assert_eq!(
            c.get_backend("b1")
                .expect("b1")
                .probe
                .map(|p| p.interval_ms),
            Some(30_000)
        );
        // Default settings in the document equal absent ones: unchanged.
        let mut same = cfg.clone();
        same.backends[1].probe = Some(v1::ProbeSettings::default());
        let again = c.apply(&Actor::system(), apply(same)).await.expect("again");
        assert!(actions(&again).iter().all(|(_, _, a)| *a == "unchanged"));

        cfg.backends[1].probe = Some(v1::ProbeSettings {
            failures: 1000,
            ..Default::default()
        });
        let err = c
            .apply(&Actor::system(), apply(cfg))
            .await
            .expect_err("out of range");
        assert_eq!(
            err.to_string().split(':').next(),
            Some("backends[1].probe.failures")
        );
    }
}
