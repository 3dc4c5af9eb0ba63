//! The named admin token store: `clawctl token add NAME --role R`.
//!
//! Each token is one [`AdminTokenRecord`] in [`Tree::AdminTokens`] (by id),
//! indexed by name in [`Tree::AdminTokenNames`] and by the lowercase hex
//! SHA-256 of its secret in [`Tree::AdminTokenHashes`]. The secret itself
//! (`clawadm-` + 43 base64url characters from 32 random bytes) is returned
//! once and never stored. Every write is one store transaction that also
//! appends its audit record, flushed before it is acknowledged.

use base64::Engine as _;
use claw_proto::v1;
use claw_proto::validate::{self, FieldError};
use rand::RngCore as _;

use super::{BOOTSTRAP_NAME, Role};
use crate::audit::{self, Actor, Change};
use crate::catalog::records;
use crate::crypto::sha256_hex;
use crate::store::{Store, StoreError, Tree, Txn};

/// Prefix of token ids.
pub const TOKEN_ID_PREFIX: &str = "tk_";
/// Every admin token secret starts with this, so leaked tokens are greppable.
pub const SECRET_PREFIX: &str = "clawadm-";
/// How many leading characters of a secret are kept as its `prefix`.
const PREFIX_LEN: usize = 12;
/// Names the audit log uses for callers that are not named tokens.
const RESERVED_NAMES: [&str; 2] = [BOOTSTRAP_NAME, "system"];
/// The trees a token write spans.
const TREES: [Tree; 4] = [
    Tree::AdminTokens,
    Tree::AdminTokenNames,
    Tree::AdminTokenHashes,
    Tree::Audit,
];

/// A stored admin token: its description and the SHA-256 of its secret.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AdminTokenRecord {
    /// The token as listed; `created_at` empty (see `created_at_ms`).
    #[prost(message, optional, tag = "1")]
    pub spec: Option<v1::AdminToken>,
    /// Lowercase hex SHA-256 of the secret. The secret itself is never stored.
    #[prost(string, tag = "2")]
    pub secret_sha256: String,
    /// Creation time, unix ms.
    #[prost(int64, tag = "3")]
    pub created_at_ms: i64,
}

impl AdminTokenRecord {
    /// The role stored in the record, if it is a known one.
    pub fn role(&self) -> Option<Role> {
        let spec = self.spec.as_ref()?;
        match v1::Role::try_from(spec.role).ok()? {
            v1::Role::Admin => Some(Role::Admin),
            v1::Role::Viewer => Some(Role::Viewer),
            v1::Role::Unspecified => None,
        }
    }
}

/// Why a token operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// A request field is invalid.
    #[error(transparent)]
    Invalid(#[from] FieldError),
    /// A token with that name exists.
    #[error("token {0:?} already exists")]
    AlreadyExists(String),
    /// No token has that id or name.
    #[error("token {0:?} not found")]
    NotFound(String),
    /// A stored record does not decode.
    #[error("corrupt admin token data: {0}")]
    Corrupt(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

type Result<T> = std::result::Result<T, TokenError>;

/// The stored admin tokens.
pub struct Tokens<'a> {
    store: &'a dyn Store,
}

fn decode(tree: Tree, bytes: &[u8]) -> Result<AdminTokenRecord> {
    prost::Message::decode(bytes).map_err(|e| TokenError::Corrupt(format!("{}: {e}", tree.name())))
}

fn role_from_proto(raw: i32) -> Result<Role> {
    match v1::Role::try_from(raw) {
        Ok(v1::Role::Admin) => Ok(Role::Admin),
        Ok(v1::Role::Viewer) => Ok(Role::Viewer),
        _ => Err(FieldError::new("role", "is required: admin or viewer").into()),
    }
}

/// The API view of a record (never the secret hash).
pub fn view(rec: &AdminTokenRecord) -> Result<v1::AdminToken> {
    let mut t = rec
        .spec
        .clone()
        .ok_or_else(|| TokenError::Corrupt("admin token record without a spec".into()))?;
    t.created_at = records::timestamp(rec.created_at_ms);
    Ok(t)
}

fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!(
        "{SECRET_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

fn new_id() -> String {
    let mut bytes = [0u8; 8];
    rand::rng().fill_bytes(&mut bytes);
    format!("{TOKEN_ID_PREFIX}{}", hex::encode(bytes))
}

fn fields(t: &v1::AdminToken, created: bool) -> Vec<v1::AuditFieldChange> {
    let role = v1::Role::try_from(t.role)
        .map(|r| {
            r.as_str_name()
                .trim_start_matches("ROLE_")
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    let change = |field: &str, value: String| {
        let (old_value, new_value) = if created {
            (String::new(), value)
        } else {
            (value, String::new())
        };
        v1::AuditFieldChange {
            field: field.to_string(),
            old_value,
            new_value,
        }
    };
    vec![change("name", t.name.clone()), change("role", role)]
}

fn change(t: &v1::AdminToken, created: bool) -> Change {
    Change {
        kind: "token",
        id: t.id.clone(),
        name: t.name.clone(),
        action: if created { "created" } else { "deleted" },
        fields: fields(t, created),
    }
}

impl<'a> Tokens<'a> {
    /// The tokens in `store`.
    pub fn new(store: &'a dyn Store) -> Self {
        Tokens { store }
    }

    /// The token whose secret hashes to `sha256_hex`, if any.
    pub fn by_hash(&self, sha256_hex: &str) -> Result<Option<AdminTokenRecord>> {
        let Some(id) = self
            .store
            .get(Tree::AdminTokenHashes, sha256_hex.as_bytes())?
        else {
            return Ok(None);
        };
        match self.store.get(Tree::AdminTokens, &id)? {
            Some(raw) => decode(Tree::AdminTokens, &raw).map(Some),
            None => Ok(None),
        }
    }

    /// Every token, ordered by name.
    pub fn list(&self) -> Result<Vec<v1::AdminToken>> {
        let mut out = self
            .store
            .scan(Tree::AdminTokens)?
            .iter()
            .map(|(_, v)| decode(Tree::AdminTokens, v).and_then(|r| view(&r)))
            .collect::<Result<Vec<_>>>()?;
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Creates a token named `name` with `role` (the wire enum), audited as
    /// `actor`; returns it and its secret, which cannot be shown again.
    pub async fn create(
        &self,
        name: &str,
        role: i32,
        actor: &Actor,
    ) -> Result<(v1::AdminToken, String)> {
        let name = name.trim();
        validate::name("name", name)?;
        if RESERVED_NAMES.contains(&name) {
            return Err(FieldError::new("name", format!("{name:?} is reserved")).into());
        }
        if name.starts_with(TOKEN_ID_PREFIX) {
            return Err(FieldError::new(
                "name",
                format!("must not start with {TOKEN_ID_PREFIX:?} (reserved for ids)"),
            )
            .into());
        }
        let role = role_from_proto(role)?;
        let secret = new_secret();
        let spec = v1::AdminToken {
            id: new_id(),
            name: name.to_string(),
            role: role.to_proto() as i32,
            prefix: secret.chars().take(PREFIX_LEN).collect(),
            created_at: None,
            created_by: actor.token.clone(),
        };
        let rec = AdminTokenRecord {
            spec: Some(spec.clone()),
            secret_sha256: sha256_hex(secret.as_bytes()),
            created_at_ms: records::now_ms(),
        };
        let audited = change(&spec, true);
        self.store.transact(&TREES, |txn: &dyn Txn| -> Result<()> {
            if txn.get(Tree::AdminTokenNames, name.as_bytes())?.is_some() {
                return Err(TokenError::AlreadyExists(name.to_string()));
            }
            txn.insert(Tree::AdminTokenNames, name.as_bytes(), spec.id.as_bytes())?;
            txn.insert(
                Tree::AdminTokenHashes,
                rec.secret_sha256.as_bytes(),
                spec.id.as_bytes(),
            )?;
            txn.insert(
                Tree::AdminTokens,
                spec.id.as_bytes(),
                &records::encode(&rec),
            )?;
            audit::append(txn, actor, "CreateToken", 0, &audited)?;
            Ok(())
        })?;
        self.store.flush().await?;
        Ok((view(&rec)?, secret))
    }

    /// Revokes a token by id or name, audited as `actor`; it stops working
    /// at once (the hash index entry goes in the same transaction).
    pub async fn delete(&self, ident: &str, actor: &Actor) -> Result<v1::AdminToken> {
        let ident = ident.trim();
        if ident.is_empty() {
            return Err(FieldError::new("token", "is required (an id or a name)").into());
        }
        let deleted = self
            .store
            .transact(&TREES, |txn: &dyn Txn| -> Result<v1::AdminToken> {
                let id = match txn.get(Tree::AdminTokens, ident.as_bytes())? {
                    Some(_) => ident.as_bytes().to_vec(),
                    None => txn
                        .get(Tree::AdminTokenNames, ident.as_bytes())?
                        .ok_or_else(|| TokenError::NotFound(ident.to_string()))?,
                };
                let raw = txn
                    .get(Tree::AdminTokens, &id)?
                    .ok_or_else(|| TokenError::NotFound(ident.to_string()))?;
                let rec = decode(Tree::AdminTokens, &raw)?;
                let spec = view(&rec)?;
                txn.remove(Tree::AdminTokens, &id)?;
                txn.remove(Tree::AdminTokenNames, spec.name.as_bytes())?;
                txn.remove(Tree::AdminTokenHashes, rec.secret_sha256.as_bytes())?;
                audit::append(txn, actor, "DeleteToken", 0, &change(&spec, false))?;
                Ok(spec)
            })?;
        self.store.flush().await?;
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sled::SledStore;

    fn store() -> (tempfile::TempDir, SledStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("store opens");
        (dir, store)
    }

    #[tokio::test]
    async fn create_list_delete_keep_indexes_and_audit_without_secrets() {
        let (_dir, store) = store();
        let tokens = Tokens::new(&store);
        let actor = Actor::system();
        let (t, secret) = tokens
            .create("ops", v1::Role::Viewer as i32, &actor)
            .await
            .expect("created");
        assert!(t.id.starts_with(TOKEN_ID_PREFIX) && t.id.len() == 3 + 16);
        assert!(secret.starts_with(SECRET_PREFIX) && secret.starts_with(&t.prefix));
        let rec = tokens
            .by_hash(&sha256_hex(secret.as_bytes()))
            .expect("reads")
            .expect("found");
        assert_eq!(rec.role(), Some(Role::Viewer));
        assert_eq!(tokens.list().expect("lists").len(), 1);
        let again = tokens.create("ops", v1::Role::Admin as i32, &actor).await;
        assert!(matches!(again, Err(TokenError::AlreadyExists(_))));

        let audit = store.scan(Tree::Audit).expect("scan");
        assert_eq!(audit.len(), 1);
        let hash = sha256_hex(secret.as_bytes());
        for (_, v) in &audit {
            let text = String::from_utf8_lossy(v);
            assert!(!text.contains(&secret) && !text.contains(&hash));
        }

        tokens.delete("ops", &actor).await.expect("deleted");
        assert!(tokens.by_hash(&hash).expect("reads").is_none());
        for tree in [
            Tree::AdminTokens,
            Tree::AdminTokenNames,
            Tree::AdminTokenHashes,
        ] {
            assert_eq!(store.len(tree).expect("len"), 0, "{}", tree.name());
        }
        assert_eq!(store.len(Tree::Audit).expect("len"), 2);
        assert!(matches!(
            tokens.delete("ops", &actor).await,
            Err(TokenError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn bad_names_and_roles_name_the_field() {
        let (_dir, store) = store();
        let tokens = Tokens::new(&store);
        let actor = Actor::system();
        for (name, role, field) in [
            ("bootstrap", v1::Role::Admin as i32, "name"),
            ("system", v1::Role::Admin as i32, "name"),
            ("tk_x", v1::Role::Admin as i32, "name"),
            ("", v1::Role::Admin as i32, "name"),
            ("has space", v1::Role::Admin as i32, "name"),
            ("ok", v1::Role::Unspecified as i32, "role"),
            ("ok", 42, "role"),
        ] {
            match tokens.create(name, role, &actor).await {
                Err(TokenError::Invalid(e)) => assert_eq!(e.field, field, "{name:?}"),
                other => panic!("{name:?}: {other:?}"),
            }
        }
    }
}
