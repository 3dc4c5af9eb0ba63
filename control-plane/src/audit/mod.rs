//! The audit log: one record per admin change, appended in the same store
//! transaction as the change itself, with the caller, the operation, the
//! resource, the configuration version it produced and a field-level diff
//! with secrets masked.

use std::net::SocketAddr;

use claw_proto::v1;

use crate::access::{Principal, Role};
use crate::catalog::records;
use crate::store::{StoreError, Tree, Txn};

/// Who made a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    /// Token name (`bootstrap`, a named token, or `system`).
    pub token: String,
    /// Its role (`None` for the control plane itself).
    pub role: Option<Role>,
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

    /// A caller resolved by the admin authentication.
    pub fn from_principal(p: &Principal, peer: Option<SocketAddr>) -> Actor {
        Actor {
            token: p.name.clone(),
            role: Some(p.role),
            peer,
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

/// Appends one record inside `txn` (which must span [`Tree::Audit`]).
pub fn append(
    txn: &dyn Txn,
    actor: &Actor,
    operation: &str,
    config_version: u64,
    change: &Change,
) -> Result<(), StoreError> {
    use rand::RngCore as _;
    let now = records::now_ms();
    let mut key = Vec::with_capacity(16);
    key.extend_from_slice(&(now.max(0) as u64).to_be_bytes());
    let mut rnd = [0u8; 8];
    rand::rng().fill_bytes(&mut rnd);
    key.extend_from_slice(&rnd);
    let record = v1::AuditRecord {
        id: hex::encode(&key),
        time: records::timestamp(now),
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
    txn.insert(Tree::Audit, &key, &records::encode(&record))
}
