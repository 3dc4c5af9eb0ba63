//! What the catalog stores: protobuf-encoded records that wrap the API
//! message (the "spec") with storage-only fields (sealed secret, secret hash,
//! timestamps in unix milliseconds).
//!
//! Protobuf is used for records because it evolves safely: new fields
//! decode as their defaults from old records, and unknown fields are
//! skipped. Output-only fields of the spec (`status`, masked `api_key`,
//! timestamps) are cleared before a spec is stored; timestamps live in the
//! record.

use claw_proto::v1;

use super::CatalogError;
use crate::crypto::{KeyId, NONCE_LEN, Sealed};
use crate::store::Tree;

/// A stored backend: the spec without its key, and the key sealed under the
/// master key with the backend id as associated data.
#[derive(Clone, PartialEq, prost::Message)]
pub struct BackendRecord {
    /// The backend as configured; `api_key`, `status` and timestamps empty.
    #[prost(message, optional, tag = "1")]
    pub spec: Option<v1::Backend>,
    /// The provider API key, encrypted.
    #[prost(message, optional, tag = "2")]
    pub api_key: Option<SealedRecord>,
    /// Creation time, unix ms.
    #[prost(int64, tag = "3")]
    pub created_at_ms: i64,
    /// Last change, unix ms.
    #[prost(int64, tag = "4")]
    pub updated_at_ms: i64,
}

/// A [`Sealed`] secret as stored.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SealedRecord {
    /// Id of the master key that sealed it.
    #[prost(string, tag = "1")]
    pub key_id: String,
    /// 96-bit nonce.
    #[prost(bytes = "vec", tag = "2")]
    pub nonce: Vec<u8>,
    /// Ciphertext and tag.
    #[prost(bytes = "vec", tag = "3")]
    pub ciphertext: Vec<u8>,
}

impl From<Sealed> for SealedRecord {
    fn from(s: Sealed) -> Self {
        SealedRecord {
            key_id: s.key_id.as_str().to_string(),
            nonce: s.nonce.to_vec(),
            ciphertext: s.ciphertext,
        }
    }
}

impl SealedRecord {
    /// Back to a [`Sealed`], checking the nonce length.
    pub fn to_sealed(&self) -> Result<Sealed, CatalogError> {
        let nonce: [u8; NONCE_LEN] = self
            .nonce
            .as_slice()
            .try_into()
            .map_err(|_| CatalogError::Corrupt("sealed secret has a bad nonce".into()))?;
        Ok(Sealed {
            key_id: KeyId::new(self.key_id.clone()),
            nonce,
            ciphertext: self.ciphertext.clone(),
        })
    }
}

/// A stored client key: the spec and the SHA-256 of its secret.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ClientKeyRecord {
    /// The key as configured (`prefix` and `internal` included).
    #[prost(message, optional, tag = "1")]
    pub spec: Option<v1::ClientKey>,
    /// Lowercase hex SHA-256 of the secret. The secret itself is never stored.
    #[prost(string, tag = "2")]
    pub secret_sha256: String,
    /// Creation time, unix ms.
    #[prost(int64, tag = "3")]
    pub created_at_ms: i64,
    /// Last change, unix ms.
    #[prost(int64, tag = "4")]
    pub updated_at_ms: i64,
    /// The secret itself, sealed, for internal keys only: the control plane
    /// presents it to the proxies (heartbeat runs). Operator keys never
    /// have one.
    #[prost(message, optional, tag = "5")]
    pub sealed_secret: Option<SealedRecord>,
}

/// A stored agent.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AgentRecord {
    /// The agent as configured, timestamps empty.
    #[prost(message, optional, tag = "1")]
    pub spec: Option<v1::Agent>,
    /// Creation time, unix ms.
    #[prost(int64, tag = "2")]
    pub created_at_ms: i64,
    /// Last change, unix ms.
    #[prost(int64, tag = "3")]
    pub updated_at_ms: i64,
    /// The webhook HMAC secret, sealed with `agent:{id}` as associated data.
    #[prost(message, optional, tag = "4")]
    pub webhook_secret: Option<SealedRecord>,
}

/// Stored settings of a pool.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PoolRecord {
    /// The settings.
    #[prost(message, optional, tag = "1")]
    pub spec: Option<v1::PoolSettings>,
    /// Last change, unix ms.
    #[prost(int64, tag = "2")]
    pub updated_at_ms: i64,
}

/// Decodes a record read from `tree`; a failure is corruption.
pub fn decode<M: prost::Message + Default>(tree: Tree, bytes: &[u8]) -> Result<M, CatalogError> {
    M::decode(bytes).map_err(|e| CatalogError::Corrupt(format!("{} record: {e}", tree.name())))
}

/// Encodes a record.
pub fn encode<M: prost::Message>(record: &M) -> Vec<u8> {
    record.encode_to_vec()
}

/// Current time in unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Unix milliseconds as a protobuf timestamp (`None` for 0, i.e. unknown).
pub fn timestamp(ms: i64) -> Option<prost_types::Timestamp> {
    (ms != 0).then(|| prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        // In 0..1000 ms, so the product fits an i32.
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    })
}

/// A field value as the audit log shows it: strings and scalars plain,
/// an absent value empty, messages and lists as compact JSON (the proto
/// types' serde form: field names, enums by name).
pub fn render<T: serde::Serialize + ?Sized>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(serde_json::Value::Null) => String::new(),
        Ok(v) => v.to_string(),
        Err(_) => "(not renderable)".to_string(),
    }
}

/// Whether two specs differ, in which fields, and how: each changed field
/// with its old and new value rendered for the audit log
/// ([`render`]). Used by updates (to skip no-op writes), by
/// apply (to report changed fields) and by the audit log (the diff).
#[derive(Debug, Default)]
pub struct FieldDiff {
    names: Vec<&'static str>,
    changes: Vec<v1::AuditFieldChange>,
}

impl FieldDiff {
    /// Records `name` when `a != b`.
    pub fn check<T: PartialEq + serde::Serialize + ?Sized>(
        &mut self,
        name: &'static str,
        a: &T,
        b: &T,
    ) {
        if a != b {
            self.changes.push(v1::AuditFieldChange {
                field: name.to_string(),
                old_value: render(a),
                new_value: render(b),
            });
            self.names.push(name);
        }
    }

    /// Records a change of a secret field, with fixed masks instead of
    /// values (see [`crate::audit::SEALED`]).
    pub fn secret(&mut self, name: &'static str, old: &str, new: &str) {
        self.changes.push(v1::AuditFieldChange {
            field: name.to_string(),
            old_value: old.to_string(),
            new_value: new.to_string(),
        });
        self.names.push(name);
    }

    /// Whether nothing differs.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The names of the changed fields, in order.
    pub fn names(&self) -> Vec<&'static str> {
        self.names.clone()
    }

    /// The diff of an update, for the audit log.
    pub fn into_changes(self) -> Vec<v1::AuditFieldChange> {
        self.changes
    }

    /// The diff of a creation (a diff against the default): set fields
    /// only, old values empty.
    pub fn into_created(self) -> Vec<v1::AuditFieldChange> {
        self.changes
            .into_iter()
            .map(|c| v1::AuditFieldChange {
                old_value: String::new(),
                ..c
            })
            .collect()
    }

    /// The diff of a deletion (a diff against the default): the old
    /// fields, new values empty.
    pub fn into_deleted(self) -> Vec<v1::AuditFieldChange> {
        self.changes
            .into_iter()
            .map(|c| v1::AuditFieldChange {
                new_value: String::new(),
                ..c
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let r = BackendRecord {
            spec: Some(v1::Backend {
                id: "be_1".into(),
                name: "b1".into(),
                tpm: Some(5),
                ..Default::default()
            }),
            api_key: Some(SealedRecord {
                key_id: "k".into(),
                nonce: vec![0; 12],
                ciphertext: vec![1, 2],
            }),
            created_at_ms: 1,
            updated_at_ms: 2,
        };
        let back: BackendRecord = decode(Tree::Backends, &encode(&r)).expect("decodes");
        assert_eq!(back, r);
        assert!(decode::<BackendRecord>(Tree::Backends, &[0xff, 0xff]).is_err());
    }

    #[test]
    fn timestamps_convert() {
        assert_eq!(timestamp(0), None);
        let ts = timestamp(1_500).expect("some");
        assert_eq!((ts.seconds, ts.nanos), (1, 500_000_000));
    }
}
