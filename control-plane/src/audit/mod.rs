//! The audit log: one record per admin change, appended in the same store
//! transaction as the change itself, with the caller, the operation, the
//! resource, the configuration version it produced and a field-level diff
//! with secrets masked.
//!
//! This module depends on nothing but the store: the catalog, the token
//! store and the API all call into it, so it must not call back into them
//! (the role is therefore the wire enum, not `access::Role`).

use std::net::SocketAddr;

use claw_proto::v1;
use prost::Message as _;

use crate::store::{StoreError, Tree, Txn};

/// Who made a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    /// Token name (`bootstrap`, a named token, or `system`).
    pub token: String,
    /// Its role (`None` for the control plane itself).
    pub role: Option<v1::Role>,
    /// The caller's address, when known.
    pub peer: Option<SocketAddr>,
    /// Whether the change came from the dashboard.
    pub dashboard: bool,
}

impl Actor {
    /// The control plane acting on its own (internal keys, migrations).
    pub fn system() -> Actor {
        Actor {
            token: "system".to_string(),
            role: None,
            peer: None,
            dashboard: false,
        }
    }
}

/// One resource changed by an operation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Change {
    /// `backend`, `pool`, `client_key`, `agent`, `token`, `master_key`, `backup`, `heartbeat`.
    pub kind: &'static str,
    /// Resource id.
    pub id: String,
    /// Resource name.
    pub name: String,
    /// `created`, `updated`, `deleted`, or a verb of the operation.
    pub action: &'static str,
    /// Field-level diff, secrets masked.
    pub fields: Vec<v1::AuditFieldChange>,
}

/// What a stored secret shows as in a diff: that it exists, nothing of it.
pub const SEALED: &str = "(sealed)";
/// What a newly given secret shows as.
pub const SET: &str = "(set)";
/// What a replaced secret shows as.
pub const CHANGED: &str = "(changed)";

impl Change {
    /// A change of resource `kind` `id` (`name`) with its diff.
    pub fn new(
        kind: &'static str,
        id: &str,
        name: &str,
        action: &'static str,
        fields: Vec<v1::AuditFieldChange>,
    ) -> Change {
        Change {
            kind,
            id: id.to_string(),
            name: name.to_string(),
            action,
            fields,
        }
    }
}

/// One field's change (for changes that are not a spec diff).
pub fn field(name: &str, old: &str, new: &str) -> v1::AuditFieldChange {
    v1::AuditFieldChange {
        field: name.to_string(),
        old_value: old.to_string(),
        new_value: new.to_string(),
    }
}

/// Appends one record inside `txn` (which must span [`Tree::Audit`]).
pub fn append(
    txn: &dyn Txn,
    actor: &Actor,
    operation: &str,
    config_version: u64,
    change: &Change,
) -> Result<(), StoreError> {
    use rand::RngCore as _;
    let now = now_ms();
    let mut key = Vec::with_capacity(16);
    key.extend_from_slice(&(now.max(0) as u64).to_be_bytes());
    let mut rnd = [0u8; 8];
    rand::rng().fill_bytes(&mut rnd);
    key.extend_from_slice(&rnd);
    let record = v1::AuditRecord {
        id: hex::encode(&key),
        time: Some(prost_types::Timestamp {
            seconds: now.div_euclid(1000),
            // In 0..1000 ms, so the product fits an i32.
            nanos: (now.rem_euclid(1000) * 1_000_000) as i32,
        }),
        token_name: actor.token.clone(),
        peer: actor.peer.map(|p| p.to_string()).unwrap_or_default(),
        operation: if actor.dashboard {
            format!("dashboard:{operation}")
        } else {
            operation.to_string()
        },
        resource_kind: change.kind.to_string(),
        resource_id: change.id.clone(),
        resource_name: change.name.clone(),
        config_version,
        changes: change.fields.clone(),
        action: change.action.to_string(),
    };
    txn.insert(Tree::Audit, &key, &record.encode_to_vec())
}

/// Current time in unix milliseconds (as `catalog::records::now_ms`, which
/// this module cannot name without an import cycle).
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::records;
    use crate::catalog::testing::*;
    use claw_proto::v1::{Backend, UpdateBackendRequest};

    fn records(store: &dyn crate::store::Store) -> Vec<v1::AuditRecord> {
        store
            .scan(Tree::Audit)
            .expect("scan")
            .iter()
            .map(|(_, v)| records::decode(Tree::Audit, v).expect("decodes"))
            .collect()
    }

    fn backend() -> Backend {
        Backend {
            name: "b1".into(),
            base_url: "https://api.example.com/v1".into(),
            api_key: "sk-secret-abcdefghijklmnop".into(),
            rpm: 10,
            enabled: true,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn each_change_is_one_record_with_its_diff_and_no_secret() {
        let (_dir, store, c) = store_and_catalog().await;
        let actor = Actor::system();
        let (b, v1) = c.create_backend(&actor, backend()).await.expect("create");
        let (_, v2) = c
            .update_backend(
                &actor,
                UpdateBackendRequest {
                    backend: "b1".into(),
                    rpm: Some(20),
                    ..Default::default()
                },
            )
            .await
            .expect("update");
        // A no-op writes nothing.
        c.update_backend(
            &actor,
            UpdateBackendRequest {
                backend: "b1".into(),
                rpm: Some(20),
                ..Default::default()
            },
        )
        .await
        .expect("noop");
        c.update_backend(
            &actor,
            UpdateBackendRequest {
                backend: "b1".into(),
                api_key: Some("sk-other-abcdefghijklmnop".into()),
                ..Default::default()
            },
        )
        .await
        .expect("key");
        let rs = records(&*store);
        assert_eq!(rs.len(), 3, "{rs:#?}");
        assert_eq!(
            (
                rs[0].operation.as_str(),
                rs[0].action.as_str(),
                rs[0].config_version
            ),
            ("CreateBackend", "created", v1)
        );
        assert_eq!(rs[0].resource_id, b.id);
        assert!(rs[0].changes.iter().all(|f| f.old_value.is_empty()));
        assert_eq!(rs[1].operation, "UpdateBackend");
        assert_eq!(rs[1].config_version, v2);
        assert_eq!(rs[1].changes, vec![field("rpm", "10", "20")]);
        assert_eq!(rs[2].changes, vec![field("api_key", SEALED, CHANGED)]);
        let all = format!("{rs:?}");
        assert!(
            !all.contains("sk-secret") && !all.contains("sk-other"),
            "{all}"
        );
        assert!(!all.contains("abcdefghijklmnop"), "{all}");
    }

    #[tokio::test]
    async fn rotation_is_recorded_at_the_unchanged_version() {
        let (_dir, store, c) = store_and_catalog().await;
        let v = c.config_version();
        c.rotate_master_key(&Actor::system(), key(KEY2))
            .await
            .expect("rotate");
        let rs = records(&*store);
        assert_eq!(rs.len(), 1);
        assert_eq!(rs[0].resource_kind, "master_key");
        assert_eq!(rs[0].action, "rotated");
        assert_eq!(rs[0].config_version, v);
        assert_eq!(
            rs[0].changes,
            vec![field(
                "key_id",
                key(KEY1).id().as_str(),
                key(KEY2).id().as_str()
            )]
        );
    }
}
