//! Backends: provider endpoints with an encrypted API key, unique names and
//! server-generated ids (`be_` + 16 hex).
//!
//! Every stored backend names its protocol (`api`): an unspecified one is
//! stored as `openai` ([`normalize`]), so the snapshot, `export` and the
//! heartbeat never have to guess what "unspecified" meant when it was written.

use claw_proto::probe_settings;
use claw_proto::redact::mask_key;
use claw_proto::v1::{self, Backend, UpdateBackendRequest};
use claw_proto::validate::{self, BACKEND_ID_PREFIX};

use super::records::{self, BackendRecord, FieldDiff, SealedRecord};
use super::{Catalog, CatalogError, Result};
use crate::audit::{self, Actor, Change};
use crate::store::{Tree, Txn};

const KIND: &str = "backend";

/// Clears what is never stored in a spec: the key and output-only fields.
pub(super) fn storable_spec(mut b: Backend) -> Backend {
    b.api_key.clear();
    b.status.clear();
    b.quota_exhausted_until = None;
    b.health = None;
    b.created_at = None;
    b.updated_at = None;
    b
}

/// Normalizes a backend the way every write path must (defaults, trimmed
/// names, `api` unspecified → openai) and validates it, including what
/// [`validate::validate_backend`] does not know yet: the protocol and the
/// 1-hour cache write price, and the probe settings (all default = absent,
/// so an old record without them and one with default ones are the same).
pub(super) fn normalize_and_validate(
    b: &mut Backend,
    require_key: bool,
) -> std::result::Result<(), validate::FieldError> {
    validate::normalize_backend(b);
    if b.api == v1::Api::Unspecified as i32 {
        b.api = v1::Api::Openai as i32;
    }
    validate::validate_backend(b, require_key)?;
    probe_settings::normalize(&mut b.probe);
    if let Some(p) = &b.probe {
        probe_settings::validate(p)?;
    }
    match v1::Api::try_from(b.api) {
        Ok(v1::Api::Openai | v1::Api::Anthropic) => {}
        _ => {
            return Err(validate::FieldError::new(
                "api",
                format!("{} is not a protocol; must be openai or anthropic", b.api),
            ));
        }
    }
    for (i, m) in b.models.iter().enumerate() {
        let v = m.cache_write_1h_cost_per_token;
        if !v.is_finite() || v < 0.0 {
            return Err(validate::FieldError::new(
                format!("models[{i}].cache_write_1h_cost_per_token"),
                "must be a finite number >= 0",
            ));
        }
    }
    Ok(())
}

/// The protocol as stored: records written before backends had one are
/// openai.
pub(super) fn api_of(b: &Backend) -> i32 {
    if b.api == v1::Api::Unspecified as i32 {
        v1::Api::Openai as i32
    } else {
        b.api
    }
}

/// The configuration fields in which two (normalized) backends differ,
/// ignoring the key (compared separately, by decrypting) and ids.
pub(super) fn diff(old: &Backend, new: &Backend) -> FieldDiff {
    let mut d = FieldDiff::default();
    d.check("name", &old.name, &new.name);
    d.check("label", &old.label, &new.label);
    d.check("base_url", &old.base_url, &new.base_url);
    d.check("api", api_name(api_of(old)), api_name(api_of(new)));
    d.check("api_key_ref", &old.api_key_ref, &new.api_key_ref);
    d.check("pool", pool_name(old.pool), pool_name(new.pool));
    d.check("rpm", &old.rpm, &new.rpm);
    d.check("tpm", &old.tpm, &new.tpm);
    d.check("timeout_ms", &old.timeout_ms, &new.timeout_ms);
    d.check("weight", &old.weight, &new.weight);
    d.check("enabled", &old.enabled, &new.enabled);
    d.check("native_only", &old.native_only, &new.native_only);
    d.check("models", &old.models, &new.models);
    d.check("probe", &old.probe, &new.probe);
    d
}

/// A protocol by name, for diffs.
fn api_name(api: i32) -> &'static str {
    v1::Api::try_from(api).map_or("", |a| a.name())
}

/// A pool by name, for diffs.
pub(super) fn pool_name(pool: i32) -> &'static str {
    match v1::Pool::try_from(pool) {
        Ok(v1::Pool::Unspecified) | Err(_) => "",
        Ok(p) => p.name(),
    }
}

/// The audit record of a new backend: its set fields, the key as a mask.
pub(super) fn created(spec: &Backend) -> Change {
    let mut d = diff(&Backend::default(), spec);
    d.secret("api_key", "", audit::SET);
    Change::new(KIND, &spec.id, &spec.name, "created", d.into_created())
}

/// The audit record of a deleted backend: its old fields, the key as a mask.
pub(super) fn deleted(spec: &Backend) -> Change {
    let mut d = diff(spec, &Backend::default());
    d.secret("api_key", audit::SEALED, "");
    Change::new(KIND, &spec.id, &spec.name, "deleted", d.into_deleted())
}

/// Writes a backend record and its name index inside a transaction,
/// enforcing name uniqueness. `old_name` is the name it had before (for
/// renames); `None` for a new backend.
pub(super) fn put(txn: &dyn Txn, rec: &BackendRecord, old_name: Option<&str>) -> Result<()> {
    let spec = rec.spec.as_ref().ok_or_else(missing_spec)?;
    let (id, name) = (spec.id.as_str(), spec.name.as_str());
    if old_name != Some(name) {
        if let Some(owner) = txn.get(Tree::BackendNames, name.as_bytes())?
            && owner != id.as_bytes()
        {
            return Err(CatalogError::exists(
                "name",
                format!("backend {name:?} already exists"),
            ));
        }
        if let Some(old) = old_name {
            txn.remove(Tree::BackendNames, old.as_bytes())?;
        }
        txn.insert(Tree::BackendNames, name.as_bytes(), id.as_bytes())?;
    }
    txn.insert(Tree::Backends, id.as_bytes(), &records::encode(rec))?;
    Ok(())
}

/// Removes a backend record and its name index inside a transaction.
pub(super) fn remove(txn: &dyn Txn, spec: &Backend) -> Result<()> {
    txn.remove(Tree::Backends, spec.id.as_bytes())?;
    txn.remove(Tree::BackendNames, spec.name.as_bytes())?;
    Ok(())
}

fn missing_spec() -> CatalogError {
    CatalogError::Corrupt("backend record without a spec".into())
}

impl Catalog {
    /// The store, for the state that follows a backend's updates outside
    /// the catalog (its fleet-wide auth failure, cleared by a new key or URL).
    pub(crate) fn backend_state_store(&self) -> &dyn crate::store::Store {
        self.store.as_ref()
    }

    /// Every backend, ordered by name, with masked keys.
    pub fn list_backends(&self) -> Result<Vec<Backend>> {
        let mut out = self
            .scan_records::<BackendRecord>(Tree::Backends)?
            .iter()
            .map(|r| self.backend_view(r))
            .collect::<Result<Vec<_>>>()?;
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Up to `limit` backends named after `after` (`""`: from the first),
    /// in name order, with masked keys: one page of `ListBackends`, read as
    /// a range of the name index (only the page's keys are opened).
    pub fn backends_after(&self, after: &str, limit: usize) -> Result<Vec<Backend>> {
        self.records_after::<BackendRecord>(Tree::Backends, Some(Tree::BackendNames), after, limit)?
            .iter()
            .map(|r| self.backend_view(r))
            .collect()
    }

    /// One backend by id or name, with its key masked.
    pub fn get_backend(&self, ident: &str) -> Result<Backend> {
        let rec = self.load_backend(ident)?;
        self.backend_view(&rec)
    }

    /// Every stored backend record (sealed keys included), for snapshot
    /// building; open keys with [`Catalog::backend_api_key`].
    pub fn backend_records(&self) -> Result<Vec<BackendRecord>> {
        self.scan_records(Tree::Backends)
    }

    /// The plaintext API key of a backend record. Never log the result.
    pub fn backend_api_key(&self, rec: &BackendRecord) -> Result<String> {
        let spec = rec.spec.as_ref().ok_or_else(missing_spec)?;
        match &rec.api_key {
            Some(sealed) => self.open_secret(&sealed.to_sealed()?, spec.id.as_bytes()),
            None => Ok(String::new()),
        }
    }

    /// Stores a new backend. The id is generated; the key is sealed.
    pub async fn create_backend(&self, actor: &Actor, mut b: Backend) -> Result<(Backend, u64)> {
        b.id = super::new_id(BACKEND_ID_PREFIX);
        b.status.clear();
        normalize_and_validate(&mut b, true).map_err(CatalogError::invalid)?;
        let guard = self.lock().await;
        let sealed = self
            .current_key()
            .seal(b.api_key.as_bytes(), b.id.as_bytes())?;
        let now = records::now_ms();
        let rec = BackendRecord {
            spec: Some(storable_spec(b)),
            api_key: Some(SealedRecord::from(sealed)),
            created_at_ms: now,
            updated_at_ms: now,
        };
        let change = created(rec.spec.as_ref().ok_or_else(missing_spec)?);
        let (_, version) = self
            .commit(&guard, actor, "CreateBackend", |txn| {
                put(txn, &rec, None)?;
                Ok(((), vec![change.clone()]))
            })
            .await?;
        drop(guard);
        Ok((self.backend_view(&rec)?, version))
    }

    /// Patches a backend with the fields set in `req`, then validates the
    /// result. `tpm: Some(0)` clears the limit; `replace_models` replaces the
    /// model list, otherwise given models are added or replace the mapping
    /// with the same canonical name. A patch that changes nothing does not
    /// bump the version.
    pub async fn update_backend(
        &self,
        actor: &Actor,
        req: UpdateBackendRequest,
    ) -> Result<(Backend, u64)> {
        let guard = self.lock().await;
        let old = self.load_backend(&req.backend)?;
        let old_spec = old.spec.clone().ok_or_else(missing_spec)?;
        let mut b = patch(old_spec.clone(), &req);
        normalize_and_validate(&mut b, false).map_err(CatalogError::invalid)?;

        let mut changed = diff(&old_spec, &b);
        let new_key = match req.api_key.as_deref() {
            Some(k) if !k.is_empty() && k != self.backend_api_key(&old)? => {
                changed.secret("api_key", audit::SEALED, audit::CHANGED);
                Some(k.to_string())
            }
            _ => None,
        };
        if changed.is_empty() {
            drop(guard);
            return Ok((self.backend_view(&old)?, self.config_version()));
        }
        let api_key = match new_key {
            Some(k) => Some(SealedRecord::from(
                self.current_key().seal(k.as_bytes(), b.id.as_bytes())?,
            )),
            None => old.api_key.clone(),
        };
        let change = Change::new(KIND, &b.id, &b.name, "updated", changed.into_changes());
        let rec = BackendRecord {
            spec: Some(storable_spec(b)),
            api_key,
            created_at_ms: old.created_at_ms,
            updated_at_ms: records::now_ms(),
        };
        let (_, version) = self
            .commit(&guard, actor, "UpdateBackend", |txn| {
                put(txn, &rec, Some(&old_spec.name))?;
                Ok(((), vec![change.clone()]))
            })
            .await?;
        drop(guard);
        Ok((self.backend_view(&rec)?, version))
    }

    /// Deletes a backend by id or name.
    pub async fn delete_backend(&self, actor: &Actor, ident: &str) -> Result<u64> {
        let guard = self.lock().await;
        let rec = self.load_backend(ident)?;
        let spec = rec.spec.ok_or_else(missing_spec)?;
        let change = deleted(&spec);
        let (_, version) = self
            .commit(&guard, actor, "DeleteBackend", |txn| {
                remove(txn, &spec)?;
                Ok(((), vec![change.clone()]))
            })
            .await?;
        Ok(version)
    }

    /// Enables or disables a backend; a no-op keeps the version.
    pub async fn set_backend_enabled(
        &self,
        actor: &Actor,
        ident: &str,
        enabled: bool,
    ) -> Result<(Backend, u64)> {
        let guard = self.lock().await;
        let mut rec = self.load_backend(ident)?;
        let spec = rec.spec.as_mut().ok_or_else(missing_spec)?;
        if spec.enabled == enabled {
            drop(guard);
            return Ok((self.backend_view(&rec)?, self.config_version()));
        }
        spec.enabled = enabled;
        let name = spec.name.clone();
        let change = Change::new(
            KIND,
            &spec.id,
            &name,
            if enabled { "enabled" } else { "disabled" },
            vec![audit::field(
                "enabled",
                &(!enabled).to_string(),
                &enabled.to_string(),
            )],
        );
        rec.updated_at_ms = records::now_ms();
        let (_, version) = self
            .commit(&guard, actor, "SetBackendEnabled", |txn| {
                put(txn, &rec, Some(&name))?;
                Ok(((), vec![change.clone()]))
            })
            .await?;
        drop(guard);
        Ok((self.backend_view(&rec)?, version))
    }

    /// Whether `key` is the provider key the backend `ident` has now
    /// (compared in constant time after opening the sealed key).
    pub fn backend_key_is(&self, ident: &str, key: &str) -> Result<bool> {
        use subtle::ConstantTimeEq as _;
        let current = self.backend_api_key(&self.load_backend(ident)?)?;
        Ok(bool::from(current.as_bytes().ct_eq(key.trim().as_bytes())))
    }

    pub(super) fn load_backend(&self, ident: &str) -> Result<BackendRecord> {
        let id = self.resolve_id(Tree::Backends, Tree::BackendNames, KIND, ident)?;
        self.load(Tree::Backends, KIND, &id)
    }

    /// The API view of a record: key masked, status and timestamps filled.
    pub(super) fn backend_view(&self, rec: &BackendRecord) -> Result<Backend> {
        let mut b = rec.spec.clone().ok_or_else(missing_spec)?;
        b.api_key = mask_key(&self.backend_api_key(rec)?);
        b.status = if b.enabled { "enabled" } else { "disabled" }.to_string();
        b.api = api_of(&b);
        b.created_at = records::timestamp(rec.created_at_ms);
        b.updated_at = records::timestamp(rec.updated_at_ms);
        Ok(b)
    }

    /// Number of backends.
    pub fn backend_count(&self) -> Result<usize> {
        Ok(self.store.len(Tree::Backends)?)
    }
}

/// Applies the set fields of an update request to a stored spec.
fn patch(mut b: Backend, req: &UpdateBackendRequest) -> Backend {
    if let Some(v) = &req.name {
        b.name = v.clone();
    }
    if let Some(v) = &req.label {
        b.label = v.clone();
    }
    if let Some(v) = &req.base_url {
        b.base_url = v.clone();
    }
    // The key itself is handled by the caller; put it in the spec only so
    // validation checks its shape.
    if let Some(v) = &req.api_key {
        b.api_key = v.clone();
    }
    if let Some(v) = &req.api_key_ref {
        b.api_key_ref = v.clone();
    }
    if req.pool != v1::Pool::Unspecified as i32 {
        b.pool = req.pool;
    }
    if req.api != v1::Api::Unspecified as i32 {
        b.api = req.api;
    }
    if let Some(v) = req.rpm {
        b.rpm = v;
    }
    if let Some(v) = req.tpm {
        b.tpm = (v != 0).then_some(v);
    }
    if let Some(v) = req.timeout_ms {
        b.timeout_ms = v;
    }
    if let Some(v) = req.weight {
        b.weight = v;
    }
    if let Some(v) = req.enabled {
        b.enabled = v;
    }
    if let Some(v) = req.native_only {
        b.native_only = v;
    }
    // Replaces the settings whole; all default is normalized to absent.
    if let Some(v) = &req.probe {
        b.probe = Some(*v);
    }
    if req.replace_models {
        b.models = req.models.clone();
    } else {
        for m in &req.models {
            let canonical = m.canonical.trim();
            match b.models.iter_mut().find(|x| x.canonical == canonical) {
                Some(slot) => *slot = m.clone(),
                None => b.models.push(m.clone()),
            }
        }
    }
    b
}

/// Checks a field error is about the given field (test helper).
#[cfg(test)]
fn field_of(e: &CatalogError) -> Option<&str> {
    match e {
        CatalogError::Invalid(claw_proto::validate::FieldError { field, .. })
        | CatalogError::AlreadyExists(claw_proto::validate::FieldError { field, .. }) => {
            Some(field)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use claw_proto::v1::ModelMapping;

    pub(crate) fn backend(name: &str) -> Backend {
        Backend {
            name: name.into(),
            base_url: "https://api.example.com/v1".into(),
            api_key: "sk-test-abcdefghijklmnop".into(),
            rpm: 60,
            enabled: true,
            models: vec![ModelMapping {
                canonical: "gpt-4o".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn create_get_list_with_masked_key_and_version_bumps() {
        let (_dir, c) = catalog().await;
        let v0 = c.config_version();
        let (b, v1) = c
            .create_backend(&Actor::system(), backend("b2"))
            .await
            .expect("create");
        assert_eq!(v1, v0 + 1);
        assert_eq!(c.config_version(), v1);
        assert!(b.id.starts_with("be_") && b.id.len() == 19, "{}", b.id);
        assert_eq!(b.api_key, "sk-t…mnop");
        assert_eq!(b.status, "enabled");
        assert!(b.created_at.is_some());
        c.create_backend(&Actor::system(), backend("b1"))
            .await
            .expect("create");
        let names: Vec<_> = c
            .list_backends()
            .expect("list")
            .into_iter()
            .map(|b| b.name)
            .collect();
        assert_eq!(names, ["b1", "b2"]);
        assert_eq!(c.get_backend("b2").expect("by name").id, b.id);
        assert_eq!(c.get_backend(&b.id).expect("by id").name, "b2");
        // The stored record holds ciphertext only.
        let rec = c.load_backend("b2").expect("record");
        assert_eq!(rec.spec.as_ref().map(|s| s.api_key.as_str()), Some(""));
        assert_eq!(
            c.backend_api_key(&rec).expect("open"),
            "sk-test-abcdefghijklmnop"
        );
    }

    #[tokio::test]
    async fn names_are_unique_and_nothing_is_stored_on_error() {
        let (_dir, c) = catalog().await;
        c.create_backend(&Actor::system(), backend("b1"))
            .await
            .expect("create");
        let v = c.config_version();
        let err = c
            .create_backend(&Actor::system(), backend("b1"))
            .await
            .expect_err("dup");
        assert!(matches!(err, CatalogError::AlreadyExists(_)));
        assert_eq!(err.to_string(), r#"name: backend "b1" already exists"#);
        assert_eq!(c.config_version(), v);
        assert_eq!(c.backend_count().expect("count"), 1);

        let mut bad = backend("b3");
        bad.rpm = 0;
        let err = c
            .create_backend(&Actor::system(), bad)
            .await
            .expect_err("invalid");
        assert_eq!(err.to_string(), "rpm: must be > 0");
        assert_eq!(c.backend_count().expect("count"), 1);
        assert_eq!(c.config_version(), v);
    }

    #[tokio::test]
    async fn update_patches_renames_and_clears_tpm() {
        let (_dir, c) = catalog().await;
        let mut b = backend("b1");
        b.tpm = Some(1000);
        let (b, _) = c.create_backend(&Actor::system(), b).await.expect("create");
        c.create_backend(&Actor::system(), backend("other"))
            .await
            .expect("create");
        let (u, v) = c
            .update_backend(
                &Actor::system(),
                UpdateBackendRequest {
                    backend: "b1".into(),
                    name: Some("renamed".into()),
                    tpm: Some(0),
                    rpm: Some(10),
                    api_key: Some("sk-new-key-0123456789".into()),
                    ..Default::default()
                },
            )
            .await
            .expect("update");
        assert_eq!(u.id, b.id);
        assert_eq!((u.name.as_str(), u.tpm, u.rpm), ("renamed", None, 10));
        assert_eq!(u.api_key, "sk-n…789");
        assert_eq!(c.config_version(), v);
        assert!(matches!(
            c.get_backend("b1"),
            Err(CatalogError::NotFound { .. })
        ));
        assert_eq!(c.get_backend("renamed").expect("new name").id, b.id);

        // Renaming onto a taken name fails and changes nothing.
        let err = c
            .update_backend(
                &Actor::system(),
                UpdateBackendRequest {
                    backend: "renamed".into(),
                    name: Some("other".into()),
                    ..Default::default()
                },
            )
            .await
            .expect_err("taken");
        assert_eq!(field_of(&err), Some("name"));
        assert_eq!(c.get_backend("renamed").expect("kept").id, b.id);

        // Invalid patch names the field.
        let err = c
            .update_backend(
                &Actor::system(),
                UpdateBackendRequest {
                    backend: "renamed".into(),
                    rpm: Some(0),
                    ..Default::default()
                },
            )
            .await
            .expect_err("invalid");
        assert_eq!(err.to_string(), "rpm: must be > 0");

        // A no-op update does not bump the version.
        let (_, v2) = c
            .update_backend(
                &Actor::system(),
                UpdateBackendRequest {
                    backend: "renamed".into(),
                    rpm: Some(10),
                    ..Default::default()
                },
            )
            .await
            .expect("noop");
        assert_eq!(v2, v);
    }

    #[tokio::test]
    async fn models_merge_or_replace() {
        let (_dir, c) = catalog().await;
        c.create_backend(&Actor::system(), backend("b1"))
            .await
            .expect("create");
        let m = |name: &str| ModelMapping {
            canonical: name.into(),
            ..Default::default()
        };
        let (u, _) = c
            .update_backend(
                &Actor::system(),
                UpdateBackendRequest {
                    backend: "b1".into(),
                    models: vec![m("gpt-4o-mini")],
                    ..Default::default()
                },
            )
            .await
            .expect("merge");
        assert_eq!(u.models.len(), 2);
        let (u, _) = c
            .update_backend(
                &Actor::system(),
                UpdateBackendRequest {
                    backend: "b1".into(),
                    replace_models: true,
                    models: vec![m("o3")],
                    ..Default::default()
                },
            )
            .await
            .expect("replace");
        assert_eq!(u.models.len(), 1);
        assert_eq!(u.models[0].native, "o3");
    }

    #[tokio::test]
    async fn api_defaults_to_openai_is_patched_only_when_given_and_is_validated() {
        let (_dir, c) = catalog().await;
        let (b, _) = c
            .create_backend(&Actor::system(), backend("b1"))
            .await
            .expect("create");
        assert_eq!(
            b.api,
            v1::Api::Openai as i32,
            "unspecified is stored as openai"
        );
        let stored = c.load_backend("b1").expect("record");
        assert_eq!(
            stored.spec.as_ref().map(|s| s.api),
            Some(v1::Api::Openai as i32)
        );
        let mut a = backend("claude");
        a.api = v1::Api::Anthropic as i32;
        let (a, _) = c
            .create_backend(&Actor::system(), a)
            .await
            .expect("create anthropic");
        assert_eq!(a.api, v1::Api::Anthropic as i32);

        // Unspecified on update leaves it; a given protocol changes it.
        let (u, _) = c
            .update_backend(
                &Actor::system(),
                UpdateBackendRequest {
                    backend: "claude".into(),
                    rpm: Some(7),
                    ..Default::default()
                },
            )
            .await
            .expect("update");
        assert_eq!(u.api, v1::Api::Anthropic as i32);
        let (u, v) = c
            .update_backend(
                &Actor::system(),
                UpdateBackendRequest {
                    backend: "b1".into(),
                    api: v1::Api::Anthropic as i32,
                    ..Default::default()
                },
            )
            .await
            .expect("switch");
        assert_eq!(u.api, v1::Api::Anthropic as i32);
        assert_eq!(c.config_version(), v);

        let mut bad = backend("bad");
        bad.api = 9;
        let err = c
            .create_backend(&Actor::system(), bad)
            .await
            .expect_err("out of range");
        assert_eq!(field_of(&err), Some("api"));
        assert!(err.to_string().contains("openai or anthropic"), "{err}");
        let err = c
            .update_backend(
                &Actor::system(),
                UpdateBackendRequest {
                    backend: "b1".into(),
                    api: -1,
                    ..Default::default()
                },
            )
            .await
            .expect_err("out of range");
        assert_eq!(field_of(&err), Some("api"));
        assert_eq!(c.config_version(), v, "nothing stored on error");
    }

    #[tokio::test]
    async fn native_only_is_stored_patched_only_when_given_and_in_the_snapshot() {
        let (_dir, c) = catalog().await;
        let mut b = backend("claude");
        b.api = v1::Api::Anthropic as i32;
        b.native_only = true;
        let (b, v) = c.create_backend(&Actor::system(), b).await.expect("create");
        assert!(b.native_only);
        assert_eq!(
            c.load_backend("claude")
                .expect("record")
                .spec
                .map(|s| s.native_only),
            Some(true)
        );
        // Unset leaves it (and changes nothing: no version bump).
        let (u, v2) = c
            .update_backend(
                &Actor::system(),
                UpdateBackendRequest {
                    backend: "claude".into(),
                    native_only: None,
                    ..Default::default()
                },
            )
            .await
            .expect("noop");
        assert!(u.native_only);
        assert_eq!(v2, v, "unset is unchanged");
        let (u, v3) = c
            .update_backend(
                &Actor::system(),
                UpdateBackendRequest {
                    backend: "claude".into(),
                    native_only: Some(false),
                    ..Default::default()
                },
            )
            .await
            .expect("clear");
        assert!(!u.native_only);
        assert!(v3 > v, "a cleared flag is a change");
        let (u, _) = c
            .update_backend(
                &Actor::system(),
                UpdateBackendRequest {
                    backend: "claude".into(),
                    native_only: Some(true),
                    ..Default::default()
                },
            )
            .await
            .expect("set");
        assert!(u.native_only);
        let snap = c.snapshot().await.expect("snapshot");
        let s = snap
            .backends
            .iter()
            .find(|s| s.name == "claude")
            .expect("in the snapshot");
        assert!(s.native_only);
    }

    #[tokio::test]
    async fn the_1h_cache_write_price_is_stored_and_validated() {
        let (_dir, c) = catalog().await;
        let mut b = backend("b1");
        b.models[0].cache_write_cost_per_token = 0.00000375;
        b.models[0].cache_write_1h_cost_per_token = 0.000006;
        let (b, _) = c.create_backend(&Actor::system(), b).await.expect("create");
        assert_eq!(b.models[0].cache_write_1h_cost_per_token, 0.000006);
        for bad in [-1.0, f64::NAN, f64::INFINITY] {
            let mut m = b.models[0].clone();
            m.cache_write_1h_cost_per_token = bad;
            let err = c
                .update_backend(
                    &Actor::system(),
                    UpdateBackendRequest {
                        backend: "b1".into(),
                        models: vec![m],
                        ..Default::default()
                    },
                )
                .await
                .expect_err("invalid price");
            assert_eq!(
                field_of(&err),
                Some("models[0].cache_write_1h_cost_per_token"),
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn probe_settings_are_stored_validated_replaced_and_audited() {
        let (_dir, c) = catalog().await;
        // Absent (as in records written before probes) reads as the defaults.
        let (plain, _) = c
            .create_backend(&Actor::system(), backend("plain"))
            .await
            .expect("create");
        assert_eq!(plain.probe, None);
        // All-default settings are the same state: no write.
        let v = c.config_version();
        let (_, v2) = c
            .update_backend(
                &Actor::system(),
                UpdateBackendRequest {
                    backend: "plain".into(),
                    probe: Some(v1::ProbeSettings::default()),
                    ..Default::default()
                },
            )
            .await
            .expect("noop");
        assert_eq!(v2, v, "all default = absent: nothing written");

        let mut b = backend("b1");
        b.probe = Some(v1::ProbeSettings {
            interval_ms: 30_000,
            timeout_ms: 5_000,
            failures: 3,
            disabled: false,
        });
        b.health = Some(v1::BackendHealth {
            reason: "output only".into(),
            ..Default::default()
        });
        let (b, _) = c.create_backend(&Actor::system(), b).await.expect("create");
        assert_eq!(b.probe.map(|p| p.interval_ms), Some(30_000));
        let stored = c.load_backend("b1").expect("record").spec.expect("spec");
        assert_eq!(stored.probe.map(|p| p.timeout_ms), Some(5_000));
        assert_eq!(stored.health, None, "health is never stored");

        // Out of range → the field, nothing stored.
        let v = c.config_version();
        for (probe, field) in [
            (
                v1::ProbeSettings {
                    interval_ms: 500,
                    ..Default::default()
                },
                "probe.interval_ms",
            ),
            (
                v1::ProbeSettings {
                    timeout_ms: 50,
                    ..Default::default()
                },
                "probe.timeout_ms",
            ),
            (
                v1::ProbeSettings {
                    interval_ms: 5_000,
                    timeout_ms: 5_000,
                    ..Default::default()
                },
                "probe.timeout_ms",
            ),
            (
                v1::ProbeSettings {
                    failures: 101,
                    ..Default::default()
                },
                "probe.failures",
            ),
        ] {
            let err = c
                .update_backend(
                    &Actor::system(),
                    UpdateBackendRequest {
                        backend: "b1".into(),
                        probe: Some(probe),
                        ..Default::default()
                    },
                )
                .await
                .expect_err("out of range");
            assert_eq!(field_of(&err), Some(field), "{err}");
            let mut bad = backend("bad");
            bad.probe = Some(probe);
            let err = c
                .create_backend(&Actor::system(), bad)
                .await
                .expect_err("out of range");
            assert_eq!(field_of(&err), Some(field), "{err}");
        }
        assert_eq!(c.config_version(), v, "nothing stored on error");
        assert!(c.get_backend("bad").is_err());

        // Set replaces whole; unset leaves it.
        let disabled = v1::ProbeSettings {
            disabled: true,
            ..Default::default()
        };
        let (u, v3) = c
            .update_backend(
                &Actor::system(),
                UpdateBackendRequest {
                    backend: "b1".into(),
                    probe: Some(disabled),
                    ..Default::default()
                },
            )
            .await
            .expect("replace");
        assert_eq!(u.probe, Some(disabled));
        assert!(v3 > v);
        let (u, v4) = c
            .update_backend(
                &Actor::system(),
                UpdateBackendRequest {
                    backend: "b1".into(),
                    rpm: Some(60),
                    ..Default::default()
                },
            )
            .await
            .expect("noop");
        assert_eq!((u.probe, v4), (Some(disabled), v3));

        // The audit diff names the field with old and new values.
        let changes = diff(&plain, &u).into_changes();
        let probe = changes
            .iter()
            .find(|c| c.field == "probe")
            .expect("probe in the diff");
        assert_eq!(probe.old_value, "");
        assert!(probe.new_value.contains("\"disabled\":true"), "{probe:?}");
    }

    #[tokio::test]
    async fn delete_and_enable() {
        let (_dir, c) = catalog().await;
        let (b, _) = c
            .create_backend(&Actor::system(), backend("b1"))
            .await
            .expect("create");
        let (d, v) = c
            .set_backend_enabled(&Actor::system(), "b1", false)
            .await
            .expect("disable");
        assert_eq!(d.status, "disabled");
        let (_, v2) = c
            .set_backend_enabled(&Actor::system(), &b.id, false)
            .await
            .expect("noop");
        assert_eq!(v, v2);
        let v3 = c
            .delete_backend(&Actor::system(), "b1")
            .await
            .expect("delete");
        assert_eq!(v3, v2 + 1);
        assert!(matches!(
            c.delete_backend(&Actor::system(), "b1").await,
            Err(CatalogError::NotFound { .. })
        ));
        assert_eq!(
            c.get_backend("nope").expect_err("missing").to_string(),
            r#"backend "nope" not found"#
        );
        // The name is free again.
        c.create_backend(&Actor::system(), backend("b1"))
            .await
            .expect("recreate");
    }
}
