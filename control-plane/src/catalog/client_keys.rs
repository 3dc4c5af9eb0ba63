//! Client keys: the bearer secrets clients present to the proxies. The server
//! generates each secret (`claw-` + 43 base64url characters from 32 random
//! bytes), returns it once, and stores only its SHA-256 (indexed, so a proxy
//! can authenticate by hash) and a short prefix for recognition.

use base64::Engine as _;
use claw_proto::v1::{ClientKey, UpdateClientKeyRequest};
use claw_proto::validate::{self, CLIENT_KEY_ID_PREFIX};
use rand::RngCore as _;

use super::records::{self, ClientKeyRecord, FieldDiff};
use super::{Catalog, CatalogError, Result};
use crate::audit::{Actor, Change};
use crate::crypto::sha256_hex;
use crate::store::{Tree, Txn};

const KIND: &str = "client key";
/// The resource kind in the audit log.
pub(super) const AUDIT_KIND: &str = "client_key";
/// Every client key secret starts with this, so leaked keys are greppable.
pub(super) const SECRET_PREFIX: &str = "claw-";
/// How many leading characters of a secret are kept as its `prefix`.
pub(super) const PREFIX_LEN: usize = 12;

/// A freshly generated client key secret with what is stored about it.
pub(super) struct NewSecret {
    /// The secret; returned to the caller once, never stored.
    pub secret: String,
    /// Lowercase hex SHA-256 of the secret.
    pub sha256: String,
    /// The first [`PREFIX_LEN`] characters.
    pub prefix: String,
}

pub(super) fn generate_secret() -> NewSecret {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let secret = format!(
        "{SECRET_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    NewSecret {
        sha256: sha256_hex(secret.as_bytes()),
        prefix: secret.chars().take(PREFIX_LEN).collect(),
        secret,
    }
}

/// Cleans a requested key: server-owned fields cleared, name trimmed.
pub(super) fn normalize(k: &mut ClientKey) {
    k.id.clear();
    k.prefix.clear();
    k.created_at = None;
    k.internal = false;
    k.name = k.name.trim().to_string();
    for m in &mut k.models {
        *m = m.trim().to_string();
    }
    k.agents = normalize_agents(std::mem::take(&mut k.agents));
}

/// Agent ids trimmed, blanks dropped, sorted and deduplicated (so the
/// stored list, its audit diff and the snapshot are stable).
pub(super) fn normalize_agents(agents: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = agents
        .into_iter()
        .map(|a| a.trim().to_string())
        .filter(|a| !a.is_empty())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The configuration fields in which two keys differ.
pub(super) fn diff(old: &ClientKey, new: &ClientKey) -> FieldDiff {
    let mut d = FieldDiff::default();
    d.check("models", &old.models, &new.models);
    d.check("rpm", &old.rpm, &new.rpm);
    d.check("max_parallel", &old.max_parallel, &new.max_parallel);
    d.check("agents", &old.agents, &new.agents);
    d
}

/// The audit record of a new key: its set fields (never the secret, its
/// hash or its prefix).
pub(super) fn created(spec: &ClientKey) -> Change {
    let d = diff(&ClientKey::default(), spec);
    Change::new(
        AUDIT_KIND,
        &spec.id,
        &spec.name,
        "created",
        d.into_created(),
    )
}

/// The audit record of a deleted key: its old fields.
pub(super) fn deleted(spec: &ClientKey) -> Change {
    let d = diff(spec, &ClientKey::default());
    Change::new(
        AUDIT_KIND,
        &spec.id,
        &spec.name,
        "deleted",
        d.into_deleted(),
    )
}

/// Builds the record of a new key with a fresh id and secret.
pub(super) fn new_record(mut spec: ClientKey, now: i64) -> (ClientKeyRecord, String) {
    let s = generate_secret();
    spec.id = super::new_id(CLIENT_KEY_ID_PREFIX);
    spec.prefix = s.prefix;
    let rec = ClientKeyRecord {
        spec: Some(spec),
        secret_sha256: s.sha256,
        created_at_ms: now,
        updated_at_ms: now,
        sealed_secret: None,
    };
    (rec, s.secret)
}

/// Writes a key and its indexes inside a transaction; `is_new` enforces name
/// uniqueness and indexes the hash.
pub(super) fn put(txn: &dyn Txn, rec: &ClientKeyRecord, is_new: bool) -> Result<()> {
    let spec = rec.spec.as_ref().ok_or_else(missing_spec)?;
    if is_new {
        if txn
            .get(Tree::ClientKeyNames, spec.name.as_bytes())?
            .is_some()
        {
            return Err(CatalogError::exists(
                "name",
                format!("client key {:?} already exists", spec.name),
            ));
        }
        txn.insert(
            Tree::ClientKeyNames,
            spec.name.as_bytes(),
            spec.id.as_bytes(),
        )?;
        txn.insert(
            Tree::ClientKeyHashes,
            rec.secret_sha256.as_bytes(),
            spec.id.as_bytes(),
        )?;
    }
    txn.insert(Tree::ClientKeys, spec.id.as_bytes(), &records::encode(rec))?;
    Ok(())
}

/// Removes a key and its indexes inside a transaction.
pub(super) fn remove(txn: &dyn Txn, rec: &ClientKeyRecord) -> Result<()> {
    let spec = rec.spec.as_ref().ok_or_else(missing_spec)?;
    txn.remove(Tree::ClientKeys, spec.id.as_bytes())?;
    txn.remove(Tree::ClientKeyNames, spec.name.as_bytes())?;
    txn.remove(Tree::ClientKeyHashes, rec.secret_sha256.as_bytes())?;
    Ok(())
}

fn missing_spec() -> CatalogError {
    CatalogError::Corrupt("client key record without a spec".into())
}

/// The API view of a record (never the secret or its hash).
pub(super) fn view(rec: &ClientKeyRecord) -> Result<ClientKey> {
    let mut k = rec.spec.clone().ok_or_else(missing_spec)?;
    k.created_at = records::timestamp(rec.created_at_ms);
    Ok(k)
}

impl Catalog {
    /// Every client key, ordered by name.
    pub fn list_client_keys(&self) -> Result<Vec<ClientKey>> {
        let mut out = self
            .client_key_records()?
            .iter()
            .map(view)
            .collect::<Result<Vec<_>>>()?;
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Up to `limit` client keys named after `after` (`""`: from the
    /// first), in name order: one page of `ListClientKeys`, read as a range
    /// of the name index.
    pub fn client_keys_after(&self, after: &str, limit: usize) -> Result<Vec<ClientKey>> {
        self.records_after::<ClientKeyRecord>(
            Tree::ClientKeys,
            Some(Tree::ClientKeyNames),
            after,
            limit,
        )?
        .iter()
        .map(view)
        .collect()
    }

    /// Every client key record (with secret hashes), for snapshot building.
    pub fn client_key_records(&self) -> Result<Vec<ClientKeyRecord>> {
        self.scan_records(Tree::ClientKeys)
    }

    /// One client key by id or name.
    pub fn get_client_key(&self, ident: &str) -> Result<ClientKey> {
        view(&self.load_client_key(ident)?)
    }

    /// The key whose secret hashes to `sha256_hex`, if any.
    pub fn client_key_by_hash(&self, sha256_hex: &str) -> Result<Option<ClientKey>> {
        match self
            .store
            .get(Tree::ClientKeyHashes, sha256_hex.as_bytes())?
        {
            Some(id) => {
                let id = String::from_utf8_lossy(&id).into_owned();
                let rec: ClientKeyRecord = self.load(Tree::ClientKeys, KIND, &id)?;
                Ok(Some(view(&rec)?))
            }
            None => Ok(None),
        }
    }

    /// Creates a key and returns it with its secret, which is not stored and
    /// cannot be shown again.
    pub async fn create_client_key(
        &self,
        actor: &Actor,
        mut k: ClientKey,
    ) -> Result<(ClientKey, String, u64)> {
        normalize(&mut k);
        validate::validate_client_key(&k).map_err(CatalogError::invalid)?;
        let guard = self.lock().await;
        let (rec, secret) = new_record(k, records::now_ms());
        let change = created(rec.spec.as_ref().ok_or_else(missing_spec)?);
        let (_, version) = self
            .commit(&guard, actor, "CreateClientKey", |txn| {
                put(txn, &rec, true)?;
                Ok(((), vec![change.clone()]))
            })
            .await?;
        Ok((view(&rec)?, secret, version))
    }

    /// Revokes a key by id or name. Internal keys belong to the control plane
    /// and cannot be deleted this way.
    pub async fn delete_client_key(&self, actor: &Actor, ident: &str) -> Result<u64> {
        let guard = self.lock().await;
        let rec = self.load_client_key(ident)?;
        if rec.spec.as_ref().is_some_and(|s| s.internal) {
            return Err(CatalogError::FailedPrecondition(format!(
                "client key {:?} is internal to the control plane and cannot be deleted",
                ident.trim()
            )));
        }
        let change = deleted(rec.spec.as_ref().ok_or_else(missing_spec)?);
        let (_, version) = self
            .commit(&guard, actor, "DeleteClientKey", |txn| {
                remove(txn, &rec)?;
                Ok(((), vec![change.clone()]))
            })
            .await?;
        Ok(version)
    }

    /// Changes a key's models, rpm, max_parallel and/or agents (the fields `req` sets); the secret,
    /// its hash and the name stay. Internal keys cannot be changed.
    pub async fn update_client_key(
        &self,
        actor: &Actor,
        req: UpdateClientKeyRequest,
    ) -> Result<(ClientKey, u64)> {
        let guard = self.lock().await;
        let old = self.load_client_key(&req.key)?;
        let old_spec = old.spec.clone().ok_or_else(missing_spec)?;
        if old_spec.internal {
            return Err(CatalogError::FailedPrecondition(format!(
                "client key {:?} is internal to the control plane and cannot be changed",
                req.key.trim()
            )));
        }
        let mut spec = old_spec.clone();
        if req.replace_models {
            spec.models = req.models.iter().map(|m| m.trim().to_string()).collect();
        }
        if let Some(rpm) = req.rpm {
            spec.rpm = rpm;
        }
        if let Some(n) = req.max_parallel {
            spec.max_parallel = n;
        }
        if req.replace_agents {
            spec.agents = normalize_agents(req.agents.clone());
        }
        validate::validate_client_key(&spec).map_err(CatalogError::invalid)?;
        let change = Change::new(
            AUDIT_KIND,
            &spec.id,
            &spec.name,
            "updated",
            diff(&old_spec, &spec).into_changes(),
        );
        let rec = ClientKeyRecord {
            spec: Some(spec),
            updated_at_ms: records::now_ms(),
            ..old
        };
        let (_, version) = self
            .commit(&guard, actor, "UpdateClientKey", |txn| {
                put(txn, &rec, false)?;
                Ok(((), vec![change.clone()]))
            })
            .await?;
        Ok((view(&rec)?, version))
    }

    /// The secret of the internal client key `name`, minting the key when it
    /// does not exist yet. The control plane authenticates to the proxies
    /// with it (heartbeat runs); the key travels in the snapshot as a hash
    /// like any other, while its secret is stored sealed under the master
    /// key (with the key id as associated data) so that a restart keeps it.
    /// Never log the result.
    pub async fn ensure_internal_client_key(&self, name: &str) -> Result<String> {
        let guard = self.lock().await;
        if let Some(id) = self.store.get(Tree::ClientKeyNames, name.as_bytes())? {
            let id = String::from_utf8_lossy(&id).into_owned();
            let rec: ClientKeyRecord = self.load(Tree::ClientKeys, KIND, &id)?;
            let internal = rec.spec.as_ref().is_some_and(|s| s.internal);
            return match (&rec.sealed_secret, internal) {
                (Some(sealed), true) => self.open_secret(&sealed.to_sealed()?, id.as_bytes()),
                _ => Err(CatalogError::FailedPrecondition(format!(
                    "client key {name:?} exists but is not the control plane's internal key; \
                     delete or rename it"
                ))),
            };
        }
        let spec = ClientKey {
            name: name.to_string(),
            internal: true,
            ..Default::default()
        };
        validate::validate_client_key(&spec).map_err(CatalogError::invalid)?;
        let (mut rec, secret) = new_record(spec, records::now_ms());
        let id = rec.spec.as_ref().map(|s| s.id.clone()).unwrap_or_default();
        rec.sealed_secret = Some(super::records::SealedRecord::from(
            self.current_key().seal(secret.as_bytes(), id.as_bytes())?,
        ));
        let change = created(rec.spec.as_ref().ok_or_else(missing_spec)?);
        self.commit(&guard, &Actor::system(), "EnsureInternalClientKey", |txn| {
            put(txn, &rec, true)?;
            Ok(((), vec![change.clone()]))
        })
        .await?;
        Ok(secret)
    }

    /// Number of client keys (internal ones included).
    pub fn client_key_count(&self) -> Result<usize> {
        Ok(self.store.len(Tree::ClientKeys)?)
    }

    pub(super) fn load_client_key(&self, ident: &str) -> Result<ClientKeyRecord> {
        let id = self.resolve_id(Tree::ClientKeys, Tree::ClientKeyNames, KIND, ident)?;
        self.load(Tree::ClientKeys, KIND, &id)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    #[tokio::test]
    async fn secret_is_returned_once_and_only_its_hash_is_stored() {
        let (_dir, c) = catalog().await;
        let (k, secret, v) = c
            .create_client_key(
                &Actor::system(),
                ClientKey {
                    name: "app".into(),
                    models: vec!["gpt-4o".into()],
                    rpm: 10,
                    ..Default::default()
                },
            )
            .await
            .expect("create");
        assert_eq!(v, c.config_version());
        assert!(k.id.starts_with("ck_") && k.id.len() == 19);
        assert!(
            secret.starts_with("claw-") && secret.len() == 48,
            "{secret}"
        );
        assert_eq!(k.prefix, &secret[..PREFIX_LEN]);
        let by_hash = c
            .client_key_by_hash(&sha256_hex(secret.as_bytes()))
            .expect("lookup")
            .expect("found");
        assert_eq!(by_hash.id, k.id);
        for (_, raw) in c.store.scan(Tree::ClientKeys).expect("scan") {
            assert!(!String::from_utf8_lossy(&raw).contains(&secret[5..]));
        }
        assert_eq!(c.get_client_key("app").expect("by name").id, k.id);
        assert_eq!(c.get_client_key(&k.id).expect("by id").name, "app");

        let err = c
            .create_client_key(
                &Actor::system(),
                ClientKey {
                    name: "app".into(),
                    ..Default::default()
                },
            )
            .await
            .expect_err("dup");
        assert_eq!(err.to_string(), r#"name: client key "app" already exists"#);

        c.delete_client_key(&Actor::system(), "app")
            .await
            .expect("delete");
        assert!(
            c.client_key_by_hash(&sha256_hex(secret.as_bytes()))
                .expect("lookup")
                .is_none()
        );
        assert_eq!(c.list_client_keys().expect("list").len(), 0);
    }

    #[tokio::test]
    async fn internal_key_is_minted_once_and_survives_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("data");
        let first = {
            let c = open_at(&path, KEY1).await.expect("open");
            let s = c
                .ensure_internal_client_key("claw-heartbeat")
                .await
                .expect("mint");
            let v = c.config_version();
            let again = c
                .ensure_internal_client_key("claw-heartbeat")
                .await
                .expect("reuse");
            assert_eq!((s.as_str(), c.config_version()), (again.as_str(), v));
            let k = c.get_client_key("claw-heartbeat").expect("get");
            assert!(k.internal);
            assert!(
                c.delete_client_key(&Actor::system(), "claw-heartbeat")
                    .await
                    .is_err()
            );
            for (_, raw) in c.store.scan(Tree::ClientKeys).expect("scan") {
                assert!(!String::from_utf8_lossy(&raw).contains(&s[5..]));
            }
            s
        };
        let c = open_at(&path, KEY1).await.expect("reopen");
        let s = c
            .ensure_internal_client_key("claw-heartbeat")
            .await
            .expect("reuse");
        assert_eq!(s, first);
        assert!(
            c.client_key_by_hash(&sha256_hex(s.as_bytes()))
                .expect("lookup")
                .is_some()
        );
    }

    #[tokio::test]
    async fn update_changes_models_and_rpm_but_keeps_the_secret() {
        let (_dir, c) = catalog().await;
        let (k, secret, v0) = c
            .create_client_key(
                &Actor::system(),
                ClientKey {
                    name: "app".into(),
                    models: vec!["gpt-4o".into()],
                    rpm: 10,
                    ..Default::default()
                },
            )
            .await
            .expect("create");
        let (u, v1) = c
            .update_client_key(
                &Actor::system(),
                UpdateClientKeyRequest {
                    key: "app".into(),
                    rpm: Some(99),
                    ..Default::default()
                },
            )
            .await
            .expect("update rpm");
        assert_eq!(
            (u.rpm, u.models.clone(), v1),
            (99, k.models.clone(), v0 + 1)
        );
        let (u, _) = c
            .update_client_key(
                &Actor::system(),
                UpdateClientKeyRequest {
                    key: k.id.clone(),
                    replace_models: true,
                    models: vec![" gpt-4o-mini ".into()],
                    ..Default::default()
                },
            )
            .await
            .expect("update models");
        assert_eq!((u.rpm, u.models), (99, vec!["gpt-4o-mini".to_string()]));
        let by_hash = c
            .client_key_by_hash(&sha256_hex(secret.as_bytes()))
            .expect("lookup")
            .expect("the secret still works");
        assert_eq!(by_hash.rpm, 99);
        let err = c
            .update_client_key(
                &Actor::system(),
                UpdateClientKeyRequest {
                    key: "app".into(),
                    replace_models: true,
                    models: vec![String::new()],
                    ..Default::default()
                },
            )
            .await
            .expect_err("an empty model name");
        assert!(err.to_string().starts_with("models[0]"), "{err}");
    }

    #[tokio::test]
    async fn invalid_keys_name_the_field() {
        let (_dir, c) = catalog().await;
        let err = c
            .create_client_key(
                &Actor::system(),
                ClientKey {
                    name: "ck_x".into(),
                    ..Default::default()
                },
            )
            .await
            .expect_err("reserved");
        assert!(err.to_string().starts_with("name: "));
        assert_eq!(c.client_key_count().expect("count"), 0);
    }

    #[tokio::test]
    async fn pages_are_name_ordered_ranges_that_skip_a_dangling_index_entry() {
        let (_dir, c) = catalog().await;
        // Created out of name order: pages follow names, not ids.
        for name in ["k3", "k1", "k5", "k2", "k4"] {
            let k = ClientKey {
                name: name.into(),
                models: vec!["gpt-4o".into()],
                ..Default::default()
            };
            c.create_client_key(&Actor::system(), k)
                .await
                .expect("create");
        }
        let names = |v: Vec<ClientKey>| v.into_iter().map(|k| k.name).collect::<Vec<_>>();
        assert_eq!(
            names(c.client_keys_after("", 2).expect("page")),
            ["k1", "k2"]
        );
        assert_eq!(
            names(c.client_keys_after("k2", 2).expect("page")),
            ["k3", "k4"]
        );
        // A token between two names, and past the end.
        assert_eq!(
            names(c.client_keys_after("k3a", 10).expect("page")),
            ["k4", "k5"]
        );
        assert!(c.client_keys_after("k5", 10).expect("page").is_empty());
        // A name index entry whose record is gone (a delete racing the two
        // reads) is skipped and the page still fills from the next names.
        let id = c.get_client_key("k2").expect("k2").id;
        c.store
            .transact(&[Tree::ClientKeys], |txn| -> Result<()> {
                txn.remove(Tree::ClientKeys, id.as_bytes())?;
                Ok(())
            })
            .expect("drop the record only");
        assert_eq!(
            names(c.client_keys_after("", 3).expect("page")),
            ["k1", "k3", "k4"]
        );
    }
}
