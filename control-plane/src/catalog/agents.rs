//! Agents: caller-chosen unique ids, a display name (not unique) and the
//! heartbeat schedule.

use claw_proto::v1::{Agent, HeartbeatTarget, UpdateAgentRequest};
use claw_proto::validate::{self, FieldError};

use super::records::{self, AgentRecord, FieldDiff, SealedRecord};
use super::{Catalog, CatalogError, Result};
use crate::audit::{self, Actor, Change};
use crate::store::{Tree, Txn};

const KIND: &str = "agent";

/// Clears output-only fields of a spec before storing it. The webhook
/// secret is stored sealed in the record, never in the spec.
pub(super) fn storable_spec(mut a: Agent) -> Agent {
    a.created_at = None;
    a.updated_at = None;
    a.webhook_secret.clear();
    a
}

/// Associated data sealing an agent's webhook secret to its id.
pub(super) fn secret_aad(id: &str) -> Vec<u8> {
    format!("agent:{id}").into_bytes()
}

/// The configuration fields in which two (normalized) agents differ.
pub(super) fn diff(old: &Agent, new: &Agent) -> FieldDiff {
    let mut d = FieldDiff::default();
    d.check("name", &old.name, &new.name);
    d.check("model", &old.model, &new.model);
    d.check(
        "interval_seconds",
        &old.interval_seconds,
        &new.interval_seconds,
    );
    d.check("active_hours", &old.active_hours, &new.active_hours);
    d.check("timezone", &old.timezone, &new.timezone);
    d.check("checklist", &old.checklist, &new.checklist);
    d.check("webhook_url", &old.webhook_url, &new.webhook_url);
    d.check("enabled", &old.enabled, &new.enabled);
    d.check("pause_note", &old.pause_note, &new.pause_note);
    d.check("prompt", &old.prompt, &new.prompt);
    d.check(
        "run_timeout_seconds",
        &old.run_timeout_seconds,
        &new.run_timeout_seconds,
    );
    d.check(
        "catch_up_seconds",
        &old.catch_up_seconds,
        &new.catch_up_seconds,
    );
    d.check("stagger", &old.stagger, &new.stagger);
    d.check(
        "isolated_session",
        &old.isolated_session,
        &new.isolated_session,
    );
    d.check(
        "busy_window_seconds",
        &old.busy_window_seconds,
        &new.busy_window_seconds,
    );
    d.check(
        "busy_defer_max_seconds",
        &old.busy_defer_max_seconds,
        &new.busy_defer_max_seconds,
    );
    d.check(
        "webhook_secret_ref",
        &old.webhook_secret_ref,
        &new.webhook_secret_ref,
    );
    d.check("target", &target_name(old.target), &target_name(new.target));
    d.check("wake_url", &old.wake_url, &new.wake_url);
    d.check("fallback_model", &old.fallback_model, &new.fallback_model);
    d
}

/// `llm` or `wake`, for audit diffs (unspecified reads as `llm`).
fn target_name(t: i32) -> &'static str {
    if t == HeartbeatTarget::Wake as i32 {
        "wake"
    } else {
        "llm"
    }
}

/// The audit record of a new agent: its set fields, a webhook secret as a
/// mask.
pub(super) fn created(spec: &Agent, has_secret: bool) -> Change {
    let mut d = diff(&Agent::default(), spec);
    if has_secret {
        d.secret("webhook_secret", "", audit::SET);
    }
    Change::new(KIND, &spec.id, &spec.name, "created", d.into_created())
}

/// The audit record of a deleted agent: its old fields.
pub(super) fn deleted(spec: &Agent, had_secret: bool) -> Change {
    let mut d = diff(spec, &Agent::default());
    if had_secret {
        d.secret("webhook_secret", audit::SEALED, "");
    }
    Change::new(KIND, &spec.id, &spec.name, "deleted", d.into_deleted())
}

/// Writes an agent inside a transaction; `is_new` enforces id uniqueness.
pub(super) fn put(txn: &dyn Txn, rec: &AgentRecord, is_new: bool) -> Result<()> {
    let spec = rec.spec.as_ref().ok_or_else(missing_spec)?;
    if is_new && txn.get(Tree::Agents, spec.id.as_bytes())?.is_some() {
        return Err(CatalogError::exists(
            "id",
            format!("agent {:?} already exists", spec.id),
        ));
    }
    txn.insert(Tree::Agents, spec.id.as_bytes(), &records::encode(rec))?;
    Ok(())
}

/// Removes an agent inside a transaction.
pub(super) fn remove(txn: &dyn Txn, id: &str) -> Result<()> {
    txn.remove(Tree::Agents, id.as_bytes())?;
    Ok(())
}

fn missing_spec() -> CatalogError {
    CatalogError::Corrupt("agent record without a spec".into())
}

/// The API view of a record. A webhook secret shows as a fixed mask (its
/// presence, never any of its characters).
pub(super) fn view(rec: &AgentRecord) -> Result<Agent> {
    let mut a = rec.spec.clone().ok_or_else(missing_spec)?;
    a.created_at = records::timestamp(rec.created_at_ms);
    a.updated_at = records::timestamp(rec.updated_at_ms);
    if rec.webhook_secret.is_some() {
        a.webhook_secret = SECRET_MASK.to_string();
    }
    Ok(a)
}

/// What the API shows instead of a stored webhook secret.
pub(super) const SECRET_MASK: &str = "…";

/// Normalizes and validates an agent.
pub(super) fn check(a: &mut Agent) -> Result<()> {
    validate::normalize_agent(a);
    validate::validate_agent(a).map_err(CatalogError::invalid)?;
    check_target(a).map_err(CatalogError::invalid)?;
    check_addresses(a, &crate::net_guard::current()).map_err(CatalogError::invalid)
}

/// The SSRF guard at save time ([`crate::net_guard::check_url`]): the
/// `webhook_url` and `wake_url` hosts must not be IP literals the address
/// policy refuses (link-local/metadata, unspecified, multicast, broadcast,
/// the control plane's own listeners, loopback without
/// `--allow-loopback-webhooks`), nor `localhost` without that flag. Host
/// names are not resolved here (DNS answers change); the webhook client
/// checks every resolved address again when it connects.
fn check_addresses(
    a: &Agent,
    policy: &crate::net_guard::Policy,
) -> std::result::Result<(), FieldError> {
    for (field, url) in [("webhook_url", &a.webhook_url), ("wake_url", &a.wake_url)] {
        if !url.is_empty() {
            crate::net_guard::check_url(policy, field, url)?;
        }
    }
    Ok(())
}

/// Normalizes and validates the heartbeat target fields: `target`
/// (unspecified = LLM, stored as unspecified so exports omit it),
/// `wake_url` (required iff the target is wake; an http(s) URL validated
/// like `webhook_url`) and `fallback_model` (optional, a model name other
/// than `model`).
fn check_target(a: &mut Agent) -> std::result::Result<(), FieldError> {
    a.wake_url = a.wake_url.trim().to_string();
    a.fallback_model = a.fallback_model.trim().to_string();
    let target = HeartbeatTarget::try_from(a.target)
        .map_err(|_| FieldError::new("target", format!("unknown heartbeat target {}", a.target)))?;
    match target {
        HeartbeatTarget::Unspecified | HeartbeatTarget::Llm => {
            a.target = HeartbeatTarget::Unspecified as i32;
            if !a.wake_url.is_empty() {
                return Err(FieldError::new(
                    "wake_url",
                    "is only for target wake (set target to wake, or leave wake_url empty)",
                ));
            }
        }
        HeartbeatTarget::Wake => {
            if a.wake_url.is_empty() {
                return Err(FieldError::new(
                    "wake_url",
                    "is required for target wake (the agent runtime's endpoint)",
                ));
            }
            validate::http_url("wake_url", &a.wake_url)?;
        }
    }
    if !a.fallback_model.is_empty() {
        if a.fallback_model.len() > 256
            || a.fallback_model
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(FieldError::new(
                "fallback_model",
                format!(
                    "{:?} must be a canonical model name (no whitespace, at most 256 bytes)",
                    a.fallback_model
                ),
            ));
        }
        if a.fallback_model == a.model {
            return Err(FieldError::new(
                "fallback_model",
                format!("must differ from model {:?}", a.model),
            ));
        }
    }
    Ok(())
}

impl Catalog {
    /// Every agent, ordered by id.
    pub fn list_agents(&self) -> Result<Vec<Agent>> {
        // The tree is keyed by id, so the scan is already in id order.
        self.agent_records()?.iter().map(view).collect()
    }

    /// Up to `limit` agents with ids after `after` (`""`: from the first),
    /// in id order: one page of `ListAgents`, read as a range of the tree.
    pub fn agents_after(&self, after: &str, limit: usize) -> Result<Vec<Agent>> {
        self.records_after::<AgentRecord>(Tree::Agents, None, after, limit)?
            .iter()
            .map(view)
            .collect()
    }

    /// Every agent record, for the heartbeat scheduler.
    pub fn agent_records(&self) -> Result<Vec<AgentRecord>> {
        self.scan_records(Tree::Agents)
    }

    /// One agent record by exact id (`None` when absent), for the heartbeat
    /// scheduler's point reads.
    pub fn agent_record(&self, id: &str) -> Result<Option<AgentRecord>> {
        match self.store.get(Tree::Agents, id.as_bytes())? {
            Some(raw) => Ok(Some(records::decode(Tree::Agents, &raw)?)),
            None => Ok(None),
        }
    }

    /// The plaintext webhook secret of an agent record, if it has one.
    /// Never log the result.
    pub fn agent_webhook_secret(&self, rec: &AgentRecord) -> Result<Option<String>> {
        let spec = rec.spec.as_ref().ok_or_else(missing_spec)?;
        match &rec.webhook_secret {
            Some(sealed) => Ok(Some(
                self.open_secret(&sealed.to_sealed()?, &secret_aad(&spec.id))?,
            )),
            None => Ok(None),
        }
    }

    /// Seals a webhook secret for agent `id` under the current master key.
    pub(super) fn seal_webhook_secret(&self, id: &str, secret: &str) -> Result<SealedRecord> {
        Ok(SealedRecord::from(
            self.current_key()
                .seal(secret.as_bytes(), &secret_aad(id))?,
        ))
    }

    /// Replaces an agent's checklist (its HEARTBEAT.md); bumps the version
    /// like any agent update.
    pub async fn set_agent_checklist(
        &self,
        actor: &Actor,
        ident: &str,
        checklist: &str,
    ) -> Result<(Agent, u64)> {
        let req = UpdateAgentRequest {
            agent: ident.to_string(),
            checklist: Some(checklist.to_string()),
            ..Default::default()
        };
        self.patch_agent(actor, "SetChecklist", req).await
    }

    /// One agent by id or, failing that, by its (unambiguous) name.
    pub fn get_agent(&self, ident: &str) -> Result<Agent> {
        view(&self.load_agent(ident)?)
    }

    /// Stores a new agent with defaults filled in.
    pub async fn create_agent(&self, actor: &Actor, mut a: Agent) -> Result<(Agent, u64)> {
        check(&mut a)?;
        let guard = self.lock().await;
        let now = records::now_ms();
        let webhook_secret = match a.webhook_secret.as_str() {
            "" => None,
            s => Some(self.seal_webhook_secret(&a.id, s)?),
        };
        let rec = AgentRecord {
            spec: Some(storable_spec(a)),
            created_at_ms: now,
            updated_at_ms: now,
            webhook_secret,
        };
        let change = created(
            rec.spec.as_ref().ok_or_else(missing_spec)?,
            rec.webhook_secret.is_some(),
        );
        let (_, version) = self
            .commit(&guard, actor, "CreateAgent", |txn| {
                put(txn, &rec, true)?;
                Ok(((), vec![change.clone()]))
            })
            .await?;
        Ok((view(&rec)?, version))
    }

    /// Patches an agent with the fields set in `req`, then validates it.
    pub async fn update_agent(
        &self,
        actor: &Actor,
        req: UpdateAgentRequest,
    ) -> Result<(Agent, u64)> {
        self.patch_agent(actor, "UpdateAgent", req).await
    }

    /// [`Catalog::update_agent`], audited as `operation`.
    async fn patch_agent(
        &self,
        actor: &Actor,
        operation: &str,
        req: UpdateAgentRequest,
    ) -> Result<(Agent, u64)> {
        let guard = self.lock().await;
        let old = self.load_agent(&req.agent)?;
        let old_spec = old.spec.clone().ok_or_else(missing_spec)?;
        let mut a = patch(old_spec.clone(), &req);
        // Validate a new secret like any field; the stored one stays sealed.
        a.webhook_secret = req.webhook_secret.clone().unwrap_or_default();
        check(&mut a)?;
        let secret = match req.webhook_secret.as_deref() {
            None => SecretChange::Keep,
            Some("") => SecretChange::Clear,
            Some(s) => match self.agent_webhook_secret(&old)? {
                Some(current) if current == s => SecretChange::Keep,
                _ => SecretChange::Set(self.seal_webhook_secret(&old_spec.id, s)?),
            },
        };
        let how = (actor, operation, "updated");
        self.store_agent_change(&guard, how, old, &old_spec, a, secret)
            .await
    }

    /// Enables or pauses an agent. Pausing records `pause_note`; enabling
    /// clears it.
    pub async fn set_agent_enabled(
        &self,
        actor: &Actor,
        ident: &str,
        enabled: bool,
        pause_note: &str,
    ) -> Result<(Agent, u64)> {
        let guard = self.lock().await;
        let old = self.load_agent(ident)?;
        let old_spec = old.spec.clone().ok_or_else(missing_spec)?;
        let mut a = old_spec.clone();
        a.enabled = enabled;
        a.pause_note = if enabled {
            String::new()
        } else {
            pause_note.trim().to_string()
        };
        check(&mut a)?;
        let action = if enabled { "enabled" } else { "disabled" };
        let how = (actor, "SetAgentEnabled", action);
        self.store_agent_change(&guard, how, old, &old_spec, a, SecretChange::Keep)
            .await
    }

    /// Deletes an agent by id or name.
    pub async fn delete_agent(&self, actor: &Actor, ident: &str) -> Result<u64> {
        let guard = self.lock().await;
        let rec = self.load_agent(ident)?;
        let spec = rec.spec.ok_or_else(missing_spec)?;
        let change = deleted(&spec, rec.webhook_secret.is_some());
        let id = spec.id;
        let (_, version) = self
            .commit(&guard, actor, "DeleteAgent", |txn| {
                remove(txn, &id)?;
                Ok(((), vec![change.clone()]))
            })
            .await?;
        Ok(version)
    }

    /// Number of agents.
    pub fn agent_count(&self) -> Result<usize> {
        Ok(self.store.len(Tree::Agents)?)
    }

    /// Stores a changed agent; `how` is who does it, the operation and
    /// the audit action. A change that changes nothing writes nothing.
    async fn store_agent_change(
        &self,
        guard: &tokio::sync::MutexGuard<'_, ()>,
        how: (&Actor, &str, &'static str),
        old: AgentRecord,
        old_spec: &Agent,
        new: Agent,
        secret: SecretChange,
    ) -> Result<(Agent, u64)> {
        let webhook_secret = match secret {
            SecretChange::Keep => old.webhook_secret.clone(),
            SecretChange::Clear => None,
            SecretChange::Set(s) => Some(s),
        };
        let mut d = diff(old_spec, &new);
        if webhook_secret != old.webhook_secret {
            let had = old.webhook_secret.is_some();
            let was = if had { audit::SEALED } else { "" };
            let now = match (&webhook_secret, had) {
                (None, _) => "",
                (Some(_), true) => audit::CHANGED,
                (Some(_), false) => audit::SET,
            };
            d.secret("webhook_secret", was, now);
        }
        if d.is_empty() {
            return Ok((view(&old)?, self.config_version()));
        }
        let (actor, operation, action) = how;
        let change = Change::new(KIND, &new.id, &new.name, action, d.into_changes());
        let rec = AgentRecord {
            spec: Some(storable_spec(new)),
            created_at_ms: old.created_at_ms,
            updated_at_ms: records::now_ms(),
            webhook_secret,
        };
        let (_, version) = self
            .commit(guard, actor, operation, |txn| {
                put(txn, &rec, false)?;
                Ok(((), vec![change.clone()]))
            })
            .await?;
        Ok((view(&rec)?, version))
    }

    fn load_agent(&self, ident: &str) -> Result<AgentRecord> {
        let ident = ident.trim();
        if ident.is_empty() {
            return Err(CatalogError::invalid(FieldError::new(
                "agent",
                "is required (an id or a name)",
            )));
        }
        if let Some(raw) = self.store.get(Tree::Agents, ident.as_bytes())? {
            return records::decode(Tree::Agents, &raw);
        }
        // Names are not unique: accept one only when it is unambiguous.
        let mut matches = self
            .agent_records()?
            .into_iter()
            .filter(|r| r.spec.as_ref().is_some_and(|s| s.name == ident));
        match (matches.next(), matches.next()) {
            (Some(rec), None) => Ok(rec),
            (Some(_), Some(_)) => Err(CatalogError::invalid(FieldError::new(
                "agent",
                format!("name {ident:?} matches several agents; use the agent id"),
            ))),
            (None, _) => Err(CatalogError::not_found(KIND, ident)),
        }
    }
}

/// What an update does to the sealed webhook secret.
enum SecretChange {
    Keep,
    Clear,
    Set(SealedRecord),
}

/// Applies the set fields of an update request to a stored spec.
fn patch(mut a: Agent, req: &UpdateAgentRequest) -> Agent {
    let set = |slot: &mut String, v: &Option<String>| {
        if let Some(v) = v {
            slot.clone_from(v);
        }
    };
    set(&mut a.name, &req.name);
    set(&mut a.model, &req.model);
    set(&mut a.active_hours, &req.active_hours);
    set(&mut a.timezone, &req.timezone);
    set(&mut a.checklist, &req.checklist);
    set(&mut a.webhook_url, &req.webhook_url);
    set(&mut a.pause_note, &req.pause_note);
    set(&mut a.prompt, &req.prompt);
    if let Some(v) = req.interval_seconds {
        a.interval_seconds = v;
    }
    if let Some(v) = req.enabled {
        a.enabled = v;
    }
    if let Some(v) = req.run_timeout_seconds {
        a.run_timeout_seconds = v;
    }
    if let Some(v) = req.catch_up_seconds {
        a.catch_up_seconds = v;
    }
    if let Some(v) = req.stagger {
        a.stagger = Some(v);
    }
    if let Some(v) = req.isolated_session {
        a.isolated_session = v;
    }
    if let Some(v) = req.busy_window_seconds {
        a.busy_window_seconds = v;
    }
    if let Some(v) = req.busy_defer_max_seconds {
        a.busy_defer_max_seconds = v;
    }
    set(&mut a.webhook_secret_ref, &req.webhook_secret_ref);
    if req.target != HeartbeatTarget::Unspecified as i32 {
        a.target = req.target;
        // Back to LLM without a new wake_url: the old one goes with the target.
        if req.target != HeartbeatTarget::Wake as i32 && req.wake_url.is_none() {
            a.wake_url.clear();
        }
    }
    set(&mut a.wake_url, &req.wake_url);
    set(&mut a.fallback_model, &req.fallback_model);
    a
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    fn agent(id: &str) -> Agent {
        Agent {
            id: id.into(),
            model: "gpt-4o".into(),
            enabled: true,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn create_with_defaults_and_duplicate_ids() {
        let (_dir, c) = catalog().await;
        let (a, _) = c
            .create_agent(&Actor::system(), agent("a1"))
            .await
            .expect("create");
        assert_eq!((a.name.as_str(), a.timezone.as_str()), ("a1", "UTC"));
        assert_eq!(a.interval_seconds, validate::DEFAULT_INTERVAL_SECONDS);
        let err = c
            .create_agent(&Actor::system(), agent("a1"))
            .await
            .expect_err("dup");
        assert_eq!(err.to_string(), r#"id: agent "a1" already exists"#);
    }

    #[tokio::test]
    async fn invalid_agents_name_the_field_and_store_nothing() {
        let (_dir, c) = catalog().await;
        type Case = (&'static str, fn(&mut Agent));
        let cases: [Case; 9] = [
            ("timezone", |a| a.timezone = "Mars/Olympus".into()),
            ("wake_url", |a| a.target = HeartbeatTarget::Wake as i32),
            ("wake_url", |a| {
                a.target = HeartbeatTarget::Wake as i32;
                a.wake_url = "ftp://runtime/hooks".into();
            }),
            ("wake_url", |a| a.wake_url = "http://runtime/hooks".into()),
            ("fallback_model", |a| a.fallback_model = "gpt-4o".into()),
            ("target", |a| a.target = 99),
            ("active_hours", |a| a.active_hours = "09:00-09:00".into()),
            ("active_hours", |a| a.active_hours = "25:00-26:00".into()),
            ("webhook_url", |a| a.webhook_url = "not a url".into()),
        ];
        for (field, f) in cases {
            let mut a = agent("a1");
            f(&mut a);
            let err = c
                .create_agent(&Actor::system(), a)
                .await
                .expect_err("invalid");
            assert!(err.to_string().starts_with(&format!("{field}: ")), "{err}");
        }
        assert_eq!(c.agent_count().expect("count"), 0);
    }

    #[test]
    fn refused_webhook_and_wake_addresses_name_their_field() {
        let strict = crate::net_guard::Policy {
            allow_loopback: false,
            listeners: vec!["127.0.0.1:50051".parse().expect("addr")],
            own_names: Vec::new(),
        };
        let mut a = agent("a1");
        a.webhook_url = "http://[::ffff:a9fe:a9fe]/hook".into();
        let e = check_addresses(&a, &strict).expect_err("metadata");
        assert_eq!(
            e.to_string(),
            "webhook_url: address 169.254.169.254 refused: link-local/cloud metadata"
        );
        a.webhook_url = "https://hooks.example.com/claw".into();
        a.target = HeartbeatTarget::Wake as i32;
        a.wake_url = "http://localhost:8080/wake".into();
        let e = check_addresses(&a, &strict).expect_err("localhost");
        assert_eq!(e.field, "wake_url", "{e}");
        a.wake_url = "http://10.0.0.9:8080/wake".into();
        assert_eq!(check_addresses(&a, &strict), Ok(()));
        let open = crate::net_guard::Policy {
            allow_loopback: true,
            ..strict
        };
        a.wake_url = "http://127.0.0.1:50051/".into();
        let e = check_addresses(&a, &open).expect_err("own listener");
        assert!(e.message.contains("own listener"), "{e}");
        a.wake_url = "http://127.0.0.1:8080/wake".into();
        assert_eq!(check_addresses(&a, &open), Ok(()));
    }

    #[tokio::test]
    async fn wake_targets_store_their_url_and_going_back_to_llm_drops_it() {
        let (_dir, c) = catalog().await;
        let mut a = agent("a1");
        a.target = HeartbeatTarget::Wake as i32;
        a.wake_url = " https://runtime.example/hooks/wake ".into();
        a.fallback_model = "gpt-4o-mini".into();
        let (created, _) = c.create_agent(&Actor::system(), a).await.expect("create");
        assert_eq!(created.target, HeartbeatTarget::Wake as i32);
        assert_eq!(created.wake_url, "https://runtime.example/hooks/wake");
        assert_eq!(created.fallback_model, "gpt-4o-mini");
        let (back, _) = c
            .update_agent(
                &Actor::system(),
                UpdateAgentRequest {
                    agent: "a1".into(),
                    target: HeartbeatTarget::Llm as i32,
                    fallback_model: Some(String::new()),
                    ..Default::default()
                },
            )
            .await
            .expect("back to llm");
        assert_eq!(back.target, HeartbeatTarget::Unspecified as i32);
        assert_eq!(
            (back.wake_url.as_str(), back.fallback_model.as_str()),
            ("", "")
        );
        // An invalid update stores nothing.
        let err = c
            .update_agent(
                &Actor::system(),
                UpdateAgentRequest {
                    agent: "a1".into(),
                    target: HeartbeatTarget::Wake as i32,
                    ..Default::default()
                },
            )
            .await
            .expect_err("wake without url");
        assert!(err.to_string().starts_with("wake_url: "), "{err}");
        assert_eq!(c.get_agent("a1").expect("get").target, 0);
    }

    #[tokio::test]
    async fn webhook_secret_is_sealed_masked_and_changeable() {
        let (_dir, c) = catalog().await;
        let mut a = agent("a1");
        a.webhook_secret = "whsec-0123456789abcdef".into();
        let (created, v1) = c.create_agent(&Actor::system(), a).await.expect("create");
        assert_eq!(created.webhook_secret, SECRET_MASK);
        assert_eq!(created.stagger, Some(true), "stagger defaults on");
        for (_, raw) in c.store.scan(Tree::Agents).expect("scan") {
            assert!(!String::from_utf8_lossy(&raw).contains("0123456789abcdef"));
        }
        let rec = c.agent_record("a1").expect("read").expect("exists");
        assert_eq!(
            c.agent_webhook_secret(&rec).expect("open").as_deref(),
            Some("whsec-0123456789abcdef")
        );
        // The same secret again is a no-op; a new one bumps the version.
        let same = UpdateAgentRequest {
            agent: "a1".into(),
            webhook_secret: Some("whsec-0123456789abcdef".into()),
            ..Default::default()
        };
        assert_eq!(
            c.update_agent(&Actor::system(), same)
                .await
                .expect("same")
                .1,
            v1
        );
        let (_, v2) = c
            .update_agent(
                &Actor::system(),
                UpdateAgentRequest {
                    agent: "a1".into(),
                    webhook_secret: Some(String::new()),
                    ..Default::default()
                },
            )
            .await
            .expect("clear");
        assert_eq!(v2, v1 + 1);
        let rec = c.agent_record("a1").expect("read").expect("exists");
        assert_eq!(c.agent_webhook_secret(&rec).expect("open"), None);
        assert!(format!("{:?}", c.get_agent("a1").expect("get")).contains("webhook_secret"));
        let err = c
            .update_agent(
                &Actor::system(),
                UpdateAgentRequest {
                    agent: "a1".into(),
                    webhook_secret: Some("short".into()),
                    ..Default::default()
                },
            )
            .await
            .expect_err("short");
        assert!(err.to_string().starts_with("webhook_secret: "), "{err}");
    }

    #[tokio::test]
    async fn update_pause_and_lookup_by_name() {
        let (_dir, c) = catalog().await;
        let mut a = agent("a1");
        a.name = "Alice".into();
        c.create_agent(&Actor::system(), a).await.expect("create");
        c.create_agent(&Actor::system(), agent("a2"))
            .await
            .expect("create");
        let (u, v) = c
            .update_agent(
                &Actor::system(),
                UpdateAgentRequest {
                    agent: "Alice".into(),
                    active_hours: Some("22:00-06:00".into()),
                    timezone: Some("Asia/Shanghai".into()),
                    ..Default::default()
                },
            )
            .await
            .expect("update");
        assert_eq!(
            (u.id.as_str(), u.active_hours.as_str()),
            ("a1", "22:00-06:00")
        );
        let (p, v2) = c
            .set_agent_enabled(&Actor::system(), "a1", false, "maintenance")
            .await
            .expect("pause");
        assert_eq!(
            (p.enabled, p.pause_note.as_str(), v2),
            (false, "maintenance", v + 1)
        );
        let (e, _) = c
            .set_agent_enabled(&Actor::system(), "a1", true, "ignored")
            .await
            .expect("enable");
        assert_eq!((e.enabled, e.pause_note.as_str()), (true, ""));
        let ids: Vec<_> = c
            .list_agents()
            .expect("list")
            .into_iter()
            .map(|a| a.id)
            .collect();
        assert_eq!(ids, ["a1", "a2"]);
        c.delete_agent(&Actor::system(), "Alice")
            .await
            .expect("delete");
        assert_eq!(
            c.get_agent("a1").expect_err("gone").to_string(),
            r#"agent "a1" not found"#
        );
    }
}
