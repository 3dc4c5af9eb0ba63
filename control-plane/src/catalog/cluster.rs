//! The catalog as a whole: counts, export and master key rotation.

use std::sync::Arc;

use claw_proto::v1::ClusterConfig;
use claw_proto::validate::FieldError;

use super::records::{self, AgentRecord, BackendRecord, ClientKeyRecord, SealedRecord};
use super::{Catalog, CatalogError, META_MASTER_KEY_ID, Result, SCHEMA_VERSION};
use crate::audit::{self, Actor, Change};
use crate::crypto::{KeyId, MasterKey};
use crate::store::Tree;

/// What `GetSnapshotInfo` reports about the stored configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Current configuration version.
    pub config_version: u64,
    /// On-disk schema version.
    pub schema_version: u32,
    /// Id of the master key secrets are sealed under.
    pub master_key_id: KeyId,
    /// Number of backends.
    pub backends: usize,
    /// Number of client keys.
    pub client_keys: usize,
    /// Number of agents.
    pub agents: usize,
}

/// The outcome of a master key rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationReport {
    /// The key the secrets were sealed under before.
    pub old_key_id: KeyId,
    /// The key they are sealed under now.
    pub new_key_id: KeyId,
    /// Number of secrets re-encrypted.
    pub reencrypted: usize,
}

impl Catalog {
    /// Version, schema, key id and counts.
    pub fn info(&self) -> Result<SnapshotInfo> {
        Ok(SnapshotInfo {
            config_version: self.config_version(),
            schema_version: SCHEMA_VERSION,
            master_key_id: self.master_key_id(),
            backends: self.backend_count()?,
            client_keys: self.client_key_count()?,
            agents: self.agent_count()?,
        })
    }

    /// The whole configuration without secrets: backend keys empty (their
    /// `api_key_ref` says where they come from), both pools, the client keys
    /// operators created (not internal ones), and agents. Consistent: taken
    /// under the writer lock.
    pub async fn export(&self) -> Result<(ClusterConfig, u64)> {
        let _guard = self.lock().await;
        let mut backends = self.list_backends()?;
        for b in &mut backends {
            b.api_key.clear();
        }
        let client_keys = self
            .list_client_keys()?
            .into_iter()
            .filter(|k| !k.internal)
            .collect();
        let mut agents = self.list_agents()?;
        for a in &mut agents {
            a.webhook_secret.clear();
        }
        let config = ClusterConfig {
            backends,
            pools: self.list_pools()?,
            client_keys,
            agents,
        };
        Ok((config, self.config_version()))
    }

    /// Re-encrypts every stored secret under `new` in one transaction that
    /// also records the new key id, flushes, then switches the running
    /// server to the new key. Readers are never left without a key that
    /// opens what they read: the new key is known (as pending) before the
    /// commit. The configuration version is not bumped: no configuration
    /// changes, and proxies receive plaintext keys anyway.
    /// The rotation is audited (as `actor`) in the same transaction, with
    /// the current, unchanged, configuration version.
    pub async fn rotate_master_key(&self, actor: &Actor, new: MasterKey) -> Result<RotationReport> {
        let _guard = self.lock().await;
        let current = self.current_key();
        if new.id() == current.id() {
            return Err(CatalogError::invalid(FieldError::new(
                "new_master_key",
                "is the current master key",
            )));
        }
        let new = Arc::new(new);
        let mut resealed = Vec::new();
        for rec in self.backend_records()? {
            let id = rec.spec.as_ref().map(|s| s.id.clone()).unwrap_or_default();
            let plaintext = self.backend_api_key(&rec)?;
            let sealed = new.seal(plaintext.as_bytes(), id.as_bytes())?;
            resealed.push(BackendRecord {
                api_key: Some(SealedRecord::from(sealed)),
                ..rec
            });
        }
        // Agents' webhook secrets and internal client keys' secrets too.
        let mut agents = Vec::new();
        for rec in self.agent_records()? {
            let Some(secret) = self.agent_webhook_secret(&rec)? else {
                continue;
            };
            let id = rec.spec.as_ref().map(|s| s.id.clone()).unwrap_or_default();
            let sealed = new.seal(secret.as_bytes(), &super::agents::secret_aad(&id))?;
            agents.push(AgentRecord {
                webhook_secret: Some(SealedRecord::from(sealed)),
                ..rec
            });
        }
        let mut keys = Vec::new();
        for rec in self.client_key_records()? {
            let Some(sealed) = &rec.sealed_secret else {
                continue;
            };
            let id = rec.spec.as_ref().map(|s| s.id.clone()).unwrap_or_default();
            let secret = self.open_secret(&sealed.to_sealed()?, id.as_bytes())?;
            let sealed = new.seal(secret.as_bytes(), id.as_bytes())?;
            keys.push(ClientKeyRecord {
                sealed_secret: Some(SealedRecord::from(sealed)),
                ..rec
            });
        }
        let reencrypted = resealed.len() + agents.len() + keys.len();
        self.keys.write().pending = Some(new.clone());
        let new_id = new.id().as_str().as_bytes().to_vec();
        let trees = [
            Tree::Backends,
            Tree::Agents,
            Tree::ClientKeys,
            Tree::Meta,
            Tree::Audit,
        ];
        let change = Change::new(
            "master_key",
            new.id().as_str(),
            "",
            "rotated",
            vec![audit::field(
                "key_id",
                current.id().as_str(),
                new.id().as_str(),
            )],
        );
        let version = self.config_version();
        let committed = self.store.transact(&trees, |txn| -> Result<()> {
            for rec in &resealed {
                let id = rec.spec.as_ref().map(|s| s.id.as_str()).unwrap_or_default();
                txn.insert(Tree::Backends, id.as_bytes(), &records::encode(rec))?;
            }
            for rec in &agents {
                let id = rec.spec.as_ref().map(|s| s.id.as_str()).unwrap_or_default();
                txn.insert(Tree::Agents, id.as_bytes(), &records::encode(rec))?;
            }
            for rec in &keys {
                let id = rec.spec.as_ref().map(|s| s.id.as_str()).unwrap_or_default();
                txn.insert(Tree::ClientKeys, id.as_bytes(), &records::encode(rec))?;
            }
            txn.insert(Tree::Meta, META_MASTER_KEY_ID, &new_id)?;
            audit::append(txn, actor, "RotateMasterKey", version, &change)?;
            Ok(())
        });
        if let Err(e) = committed {
            self.keys.write().pending = None;
            return Err(e);
        }
        {
            let mut ring = self.keys.write();
            ring.current = new.clone();
            ring.pending = None;
        }
        self.store.flush().await?;
        Ok(RotationReport {
            old_key_id: current.id().clone(),
            new_key_id: new.id().clone(),
            reencrypted,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use claw_proto::v1::Backend;

    fn backend(name: &str, key: &str) -> Backend {
        Backend {
            name: name.into(),
            base_url: "https://api.example.com/v1".into(),
            api_key: key.into(),
            rpm: 60,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn rotation_reencrypts_everything_and_survives_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("data");
        {
            let c = open_at(&path, KEY1).await.expect("open");
            c.create_backend(&Actor::system(), backend("b1", "sk-one-0123456789"))
                .await
                .expect("create");
            c.create_backend(&Actor::system(), backend("b2", "sk-two-0123456789"))
                .await
                .expect("create");
            let v = c.config_version();
            let err = c
                .rotate_master_key(&Actor::system(), key(KEY1))
                .await
                .expect_err("same key");
            assert_eq!(err.to_string(), "new_master_key: is the current master key");

            let r = c
                .rotate_master_key(&Actor::system(), key(KEY2))
                .await
                .expect("rotate");
            assert_eq!(r.old_key_id, *key(KEY1).id());
            assert_eq!(r.new_key_id, *key(KEY2).id());
            assert_eq!(r.reencrypted, 2);
            assert_eq!(c.config_version(), v, "rotation does not bump the version");
            assert_eq!(c.master_key_id(), *key(KEY2).id());
            // The running catalog keeps serving.
            assert_eq!(c.get_backend("b1").expect("get").api_key, "sk-…89");
            for rec in c.backend_records().expect("records") {
                assert_eq!(
                    rec.api_key.as_ref().map(|s| s.key_id.as_str()),
                    Some(key(KEY2).id().as_str())
                );
            }
        }
        let err = open_at(&path, KEY1).await.expect_err("old key refused");
        assert!(matches!(err, CatalogError::KeyMismatch { .. }));
        let c = open_at(&path, KEY2).await.expect("new key works");
        let rec = c.load_backend("b2").expect("load");
        assert_eq!(c.backend_api_key(&rec).expect("open"), "sk-two-0123456789");
    }

    #[tokio::test]
    async fn export_has_no_secrets() {
        let (_dir, c) = catalog().await;
        let mut b = backend("b1", "sk-one-0123456789");
        b.api_key_ref = "env:OPENAI_KEY".into();
        c.create_backend(&Actor::system(), b).await.expect("create");
        let (cfg, v) = c.export().await.expect("export");
        assert_eq!(v, c.config_version());
        assert_eq!(cfg.backends.len(), 1);
        assert_eq!(cfg.backends[0].api_key, "");
        assert_eq!(cfg.backends[0].api_key_ref, "env:OPENAI_KEY");
        assert_eq!(cfg.pools.len(), 2);
        let info = c.info().expect("info");
        assert_eq!((info.backends, info.client_keys, info.agents), (1, 0, 0));
    }
}
