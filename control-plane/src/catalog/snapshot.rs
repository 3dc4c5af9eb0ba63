//! The configuration as data-plane proxies see it: one `claw.v1.Snapshot`
//! per configuration version, read consistently.
//!
//! A snapshot carries secrets in the clear (backend API keys) because the
//! proxies must present them upstream; it only travels on the authenticated
//! discovery stream and `SnapshotBackend`'s `Debug` redacts the key. Client
//! keys travel as the SHA-256 of their secret, internal keys included (the
//! heartbeat scheduler authenticates to a proxy with one).

use std::collections::BTreeSet;

use claw_proto::v1::{Snapshot, SnapshotBackend, SnapshotClientKey};

use super::records::{BackendRecord, ClientKeyRecord};
use super::{Catalog, CatalogError, Result};

impl Catalog {
    /// The snapshot of the current configuration and the version it is.
    ///
    /// Taken under the writer lock, like [`Catalog::export`]: every
    /// mutation bumps and publishes the version inside the same lock, so the
    /// version read here is exactly the version of the data read here.
    /// Writers wait for the few milliseconds the build takes.
    pub async fn snapshot(&self) -> Result<Snapshot> {
        let _guard = self.lock().await;
        let version = self.config_version();
        let mut backends = Vec::new();
        for rec in self.backend_records()? {
            let api_key = self.backend_api_key(&rec)?;
            backends.push(snapshot_backend(rec, api_key)?);
        }
        let client_keys = self
            .client_key_records()?
            .into_iter()
            .map(snapshot_client_key)
            .collect::<Result<Vec<_>>>()?;
        let mut snap = assemble(version, backends, self.list_pools()?, client_keys);
        snap.lineage = self.lineage().to_string();
        Ok(snap)
    }
}

/// A backend record with its opened key, as a proxy needs it.
fn snapshot_backend(rec: BackendRecord, api_key: String) -> Result<SnapshotBackend> {
    let spec = rec
        .spec
        .ok_or_else(|| CatalogError::Corrupt("backend record without a spec".into()))?;
    let api = super::backends::api_of(&spec);
    Ok(SnapshotBackend {
        id: spec.id,
        name: spec.name,
        base_url: spec.base_url,
        api_key,
        pool: spec.pool,
        rpm: spec.rpm,
        tpm: spec.tpm,
        timeout_ms: spec.timeout_ms,
        weight: spec.weight,
        enabled: spec.enabled,
        models: spec.models,
        api,
        native_only: spec.native_only,
    })
}

/// A client key record without its secret: only the hash travels.
fn snapshot_client_key(rec: ClientKeyRecord) -> Result<SnapshotClientKey> {
    let spec = rec
        .spec
        .ok_or_else(|| CatalogError::Corrupt("client key record without a spec".into()))?;
    Ok(SnapshotClientKey {
        id: spec.id,
        name: spec.name,
        secret_sha256: rec.secret_sha256,
        models: spec.models,
        rpm: spec.rpm,
        max_parallel: spec.max_parallel,
        agents: spec.agents,
        internal: spec.internal,
    })
}

/// Orders everything deterministically (backends and keys by name, so two
/// builds of one version are equal) and derives `models`: the sorted
/// canonical names served by at least one enabled backend.
fn assemble(
    version: u64,
    mut backends: Vec<SnapshotBackend>,
    pools: Vec<claw_proto::v1::PoolSettings>,
    mut client_keys: Vec<SnapshotClientKey>,
) -> Snapshot {
    backends.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.id.cmp(&b.id)));
    client_keys.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.id.cmp(&b.id)));
    let models: BTreeSet<&str> = backends
        .iter()
        .filter(|b| b.enabled)
        .flat_map(|b| b.models.iter().map(|m| m.canonical.as_str()))
        .filter(|m| !m.is_empty())
        .collect();
    let models = models.into_iter().map(str::to_string).collect();
    Snapshot {
        version,
        backends,
        pools,
        client_keys,
        models,
        lineage: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use claw_proto::v1::{Backend, ClientKey, ModelMapping, Pool};

    use crate::crypto::sha256_hex;

    fn backend(name: &str, key: &str, models: &[&str], enabled: bool) -> Backend {
        Backend {
            name: name.into(),
            base_url: "https://api.example.com/v1".into(),
            api_key: key.into(),
            rpm: 60,
            tpm: Some(1000),
            enabled,
            models: models
                .iter()
                .map(|m| ModelMapping {
                    canonical: (*m).into(),
                    native: format!("{m}-native"),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn snapshot_has_plaintext_backend_keys_hashed_client_keys_and_served_models() {
        let (_dir, c) = catalog().await;
        c.create_backend(
            &crate::audit::Actor::system(),
            backend("b2", "sk-two-0123456789", &["gpt-4o", "o3"], true),
        )
        .await
        .expect("create");
        c.create_backend(
            &crate::audit::Actor::system(),
            backend("b1", "sk-one-0123456789", &["gpt-4o"], true),
        )
        .await
        .expect("create");
        c.create_backend(
            &crate::audit::Actor::system(),
            backend("off", "sk-off-0123456789", &["claude"], false),
        )
        .await
        .expect("create");
        let (key, secret, version) = c
            .create_client_key(
                &crate::audit::Actor::system(),
                ClientKey {
                    name: "team".into(),
                    models: vec!["gpt-4o".into()],
                    rpm: 30,
                    ..Default::default()
                },
            )
            .await
            .expect("key");

        let s = c.snapshot().await.expect("snapshot");
        assert_eq!(s.version, version);
        assert_eq!(s.version, c.config_version());
        let names: Vec<_> = s.backends.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(names, ["b1", "b2", "off"]);
        assert_eq!(s.backends[0].api_key, "sk-one-0123456789");
        assert_eq!(s.backends[1].api_key, "sk-two-0123456789");
        assert_eq!(s.backends[1].tpm, Some(1000));
        assert_eq!(s.backends[1].models[1].native, "o3-native");
        assert!(!s.backends[2].enabled);
        assert!(!format!("{s:?}").contains("sk-one"), "Debug redacts keys");
        assert_eq!(s.models, ["gpt-4o", "o3"], "only enabled backends' models");
        assert_eq!(s.pools.len(), 2);
        assert_eq!(s.pools[0].pool, Pool::Primary as i32);
        assert_eq!(s.pools[1].pool, Pool::Fallback as i32);
        assert_eq!(s.client_keys.len(), 1);
        let k = &s.client_keys[0];
        assert_eq!((k.id.as_str(), k.name.as_str()), (key.id.as_str(), "team"));
        assert_eq!(k.secret_sha256, sha256_hex(secret.as_bytes()));
        assert_eq!((k.models.clone(), k.rpm), (vec!["gpt-4o".to_string()], 30));

        assert_eq!(c.snapshot().await.expect("again"), s, "deterministic");
    }

    #[tokio::test]
    async fn empty_catalog_snapshot_is_valid_at_the_initial_version() {
        let (_dir, c) = catalog().await;
        let s = c.snapshot().await.expect("snapshot");
        assert_eq!(s.version, super::super::INITIAL_CONFIG_VERSION);
        assert!(s.backends.is_empty() && s.client_keys.is_empty() && s.models.is_empty());
        assert_eq!(s.pools.len(), 2);
    }
}
