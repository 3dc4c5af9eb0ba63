//! The configuration catalog: typed access to backends, pools, client keys and
//! agents on top of the engine-agnostic [`Store`].
//!
//! Invariants the catalog keeps:
//!
//! - **One writer.** Every configuration mutation takes one async mutex, so a
//!   read-modify-write (an update, an apply, a key rotation) never races
//!   another. Writes are rare; reads never take the lock.
//! - **Atomic and versioned.** A mutation is one store transaction spanning
//!   the resource trees, their index trees and `meta`; the same transaction
//!   bumps the persisted configuration version when (and only when) the
//!   configuration actually changes. A no-op mutation leaves the version.
//! - **Audited.** Every mutation takes the [`Actor`] making it; the same
//!   transaction appends one [`crate::audit`] record per changed resource
//!   (operation = the RPC name, the new version, a field diff with secrets
//!   as fixed masks). A no-op writes no record; master key rotation writes
//!   one at the unchanged version.
//! - **Durable before acknowledged.** After the transaction commits the
//!   store is flushed before the call returns, so a reply survives `kill -9`.
//! - **Published.** Each new version is sent on a [`watch`] channel
//!   ([`Catalog::subscribe`]) for snapshot distribution.
//! - **Secrets sealed.** Provider keys are encrypted under the master key
//!   with the backend id as associated data; master key rotation does not
//!   bump the version because the configuration it describes is unchanged.
//!
//! Submodules: [`records`] (what is stored), `backends`, `pools`,
//! `client_keys`, `agents`, `cluster` (info, export, key rotation),
//! `apply` (whole-config apply) and `snapshot` (the consistent,
//! decrypted view the discovery stream sends to proxies).

mod agents;
mod apply;
mod backends;
mod client_keys;
mod cluster;
mod pools;
pub mod records;
mod snapshot;

use std::sync::Arc;

use parking_lot::RwLock;

use claw_proto::validate::FieldError;
use tokio::sync::{Mutex, MutexGuard, watch};

pub use apply::{ApplyOutcome, ApplyRequest};
pub use cluster::{RotationReport, SnapshotInfo};

use crate::audit::{self, Actor, Change};
use crate::crypto::{CryptoError, KeyId, MasterKey, Sealed};
use crate::store::{Store, StoreError, Tree, Txn};

/// The trees a configuration transaction spans: the configuration and the
/// audit log, so that a change and its record commit together.
const COMMIT_TREES: [Tree; 9] = [
    Tree::Meta,
    Tree::Backends,
    Tree::BackendNames,
    Tree::Pools,
    Tree::ClientKeys,
    Tree::ClientKeyNames,
    Tree::ClientKeyHashes,
    Tree::Agents,
    Tree::Audit,
];

/// Version of the on-disk layout this build reads and writes. Bump it (and
/// add a migration in [`Catalog::open`]) when the layout changes.
pub const SCHEMA_VERSION: u32 = 1;

/// The configuration version of a fresh data directory. Proxies use 0 for
/// "no snapshot yet", so real versions start at 1.
pub const INITIAL_CONFIG_VERSION: u64 = 1;

const META_SCHEMA_VERSION: &[u8] = b"schema_version";
const META_CONFIG_VERSION: &[u8] = b"config_version";
const META_MASTER_KEY_ID: &[u8] = b"master_key_id";
/// The store's lineage: random, written when the directory is initialized
/// and replaced by a restore from backup (see `Snapshot.lineage`).
pub const META_LINEAGE: &[u8] = b"lineage";

/// Why a catalog operation failed. The API turns it into a gRPC status in
/// one place (`crate::api`).
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// A field is invalid, e.g. `rpm: must be > 0`.
    #[error("{0}")]
    Invalid(FieldError),
    /// A unique field is taken, e.g. `name: backend "b1" already exists`.
    #[error("{0}")]
    AlreadyExists(FieldError),
    /// No resource has this id or name.
    #[error("{kind} {} not found", claw_proto::validate::echo(ident))]
    NotFound {
        /// `backend`, `client key`, `agent`.
        kind: &'static str,
        /// The id or name asked for.
        ident: String,
    },
    /// The request is valid but the resource's state forbids it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The data directory was written by a newer build.
    #[error(
        "the data directory has schema version {found}, but this build supports at most {supported}; run a newer claw-control-plane"
    )]
    SchemaTooNew {
        /// Version found on disk.
        found: u32,
        /// Newest version this build understands.
        supported: u32,
    },
    /// The configured master key is not the one the secrets are sealed under.
    #[error(
        "master key mismatch: the data directory's secrets are encrypted under master key id {stored}, but the configured master key has id {given}; start with the master key whose id is {stored}"
    )]
    KeyMismatch {
        /// Key id recorded in the data directory.
        stored: KeyId,
        /// Key id of the configured key.
        given: KeyId,
    },
    /// The storage engine failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored secret could not be sealed or opened.
    #[error("stored secret: {0}")]
    Crypto(#[from] CryptoError),
    /// A stored record could not be decoded.
    #[error("corrupt data: {0}")]
    Corrupt(String),
}

impl CatalogError {
    fn invalid(e: FieldError) -> Self {
        CatalogError::Invalid(e)
    }

    fn exists(field: &str, message: String) -> Self {
        CatalogError::AlreadyExists(FieldError::new(field, message))
    }

    fn not_found(kind: &'static str, ident: &str) -> Self {
        CatalogError::NotFound {
            kind,
            ident: ident.to_string(),
        }
    }
}

/// Result of catalog operations.
pub type Result<T, E = CatalogError> = std::result::Result<T, E>;

/// Keys the catalog can open secrets with: the current one and, while a
/// rotation commits, the new one (so a reader never meets a ciphertext it
/// cannot open).
struct KeyRing {
    current: Arc<MasterKey>,
    pending: Option<Arc<MasterKey>>,
}

/// Typed, versioned, durable configuration. Share it behind an `Arc`.
pub struct Catalog {
    store: Arc<dyn Store>,
    writer: Mutex<()>,
    keys: RwLock<KeyRing>,
    version: watch::Sender<u64>,
    lineage: String,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog")
            .field("config_version", &*self.version.borrow())
            .finish_non_exhaustive()
    }
}

fn read_u64(bytes: &[u8], what: &str) -> Result<u64> {
    let arr: [u8; 8] = bytes
        .try_into()
        .map_err(|_| CatalogError::Corrupt(format!("meta {what} is not 8 bytes")))?;
    Ok(u64::from_be_bytes(arr))
}

fn read_u32(bytes: &[u8], what: &str) -> Result<u32> {
    let arr: [u8; 4] = bytes
        .try_into()
        .map_err(|_| CatalogError::Corrupt(format!("meta {what} is not 4 bytes")))?;
    Ok(u32::from_be_bytes(arr))
}

impl Catalog {
    /// Opens the catalog: refuses a data directory with a newer schema or
    /// secrets under another master key, initializes a fresh one, and makes
    /// the initialization durable.
    pub async fn open(store: Arc<dyn Store>, key: MasterKey) -> Result<Catalog> {
        if let Some(raw) = store.get(Tree::Meta, META_SCHEMA_VERSION)? {
            let found = read_u32(&raw, "schema_version")?;
            if found > SCHEMA_VERSION {
                return Err(CatalogError::SchemaTooNew {
                    found,
                    supported: SCHEMA_VERSION,
                });
            }
            // Schema 1 is the first; older schemas would be migrated here.
        }
        if let Some(raw) = store.get(Tree::Meta, META_MASTER_KEY_ID)? {
            let stored = KeyId::new(String::from_utf8_lossy(&raw).into_owned());
            if &stored != key.id() {
                return Err(CatalogError::KeyMismatch {
                    stored,
                    given: key.id().clone(),
                });
            }
        }
        let key_id = key.id().as_str().as_bytes().to_vec();
        let fresh_lineage = new_id("ln_");
        let (version, lineage) = store.transact(&[Tree::Meta], |txn| -> Result<(u64, String)> {
            if txn.get(Tree::Meta, META_SCHEMA_VERSION)?.is_none() {
                txn.insert(
                    Tree::Meta,
                    META_SCHEMA_VERSION,
                    &SCHEMA_VERSION.to_be_bytes(),
                )?;
            }
            if txn.get(Tree::Meta, META_MASTER_KEY_ID)?.is_none() {
                txn.insert(Tree::Meta, META_MASTER_KEY_ID, &key_id)?;
            }
            let lineage = match txn.get(Tree::Meta, META_LINEAGE)? {
                Some(raw) => String::from_utf8_lossy(&raw).into_owned(),
                None => {
                    txn.insert(Tree::Meta, META_LINEAGE, fresh_lineage.as_bytes())?;
                    fresh_lineage.clone()
                }
            };
            let version = match txn.get(Tree::Meta, META_CONFIG_VERSION)? {
                Some(raw) => read_u64(&raw, "config_version")?,
                None => {
                    txn.insert(
                        Tree::Meta,
                        META_CONFIG_VERSION,
                        &INITIAL_CONFIG_VERSION.to_be_bytes(),
                    )?;
                    INITIAL_CONFIG_VERSION
                }
            };
            Ok((version, lineage))
        })?;
        store.flush().await?;
        let (tx, _) = watch::channel(version);
        Ok(Catalog {
            store,
            writer: Mutex::new(()),
            keys: RwLock::new(KeyRing {
                current: Arc::new(key),
                pending: None,
            }),
            version: tx,
            lineage,
        })
    }

    /// The store's lineage (see [`META_LINEAGE`]).
    pub fn lineage(&self) -> &str {
        &self.lineage
    }

    /// The current configuration version.
    pub fn config_version(&self) -> u64 {
        *self.version.borrow()
    }

    /// A receiver that sees every committed configuration version.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Id of the master key secrets are sealed under.
    pub fn master_key_id(&self) -> KeyId {
        self.keys.read().current.id().clone()
    }

    /// Whether the store answers reads.
    pub fn check(&self) -> Result<()> {
        Ok(self.store.check()?)
    }

    /// Flushes the store (used at shutdown).
    pub async fn flush(&self) -> Result<()> {
        Ok(self.store.flush().await?)
    }

    fn current_key(&self) -> Arc<MasterKey> {
        self.keys.read().current.clone()
    }

    /// Opens a secret with whichever known key sealed it.
    fn open_secret(&self, sealed: &Sealed, aad: &[u8]) -> Result<String> {
        let ring = self.keys.read();
        let key = match &ring.pending {
            Some(p) if p.id() == &sealed.key_id => p.clone(),
            _ => ring.current.clone(),
        };
        drop(ring);
        Ok(key.open_string(sealed, aad)?)
    }

    /// Takes the writer lock. Every configuration mutation holds it from its
    /// first read to its flush.
    async fn lock(&self) -> MutexGuard<'_, ()> {
        self.writer.lock().await
    }

    /// Runs one configuration transaction. `body` returns its value and
    /// the resources it changed (none: the configuration is unchanged).
    /// When it changed something, the version is bumped and one audit
    /// record per change is appended (with the new version, as `actor`
    /// doing `operation`), all in the same transaction. The store is then
    /// flushed before returning, and the new version published. Callers
    /// hold the writer lock.
    async fn commit<T>(
        &self,
        _guard: &MutexGuard<'_, ()>,
        actor: &Actor,
        operation: &str,
        body: impl Fn(&dyn Txn) -> Result<(T, Vec<Change>)>,
    ) -> Result<(T, u64)> {
        let (value, version, changed) = self.store.transact(&COMMIT_TREES, |txn| -> Result<_> {
            let (value, changes) = body(txn)?;
            let changed = !changes.is_empty();
            let current = match txn.get(Tree::Meta, META_CONFIG_VERSION)? {
                Some(raw) => read_u64(&raw, "config_version")?,
                None => INITIAL_CONFIG_VERSION,
            };
            let version = if changed {
                let next = current.saturating_add(1);
                txn.insert(Tree::Meta, META_CONFIG_VERSION, &next.to_be_bytes())?;
                next
            } else {
                current
            };
            for change in &changes {
                audit::append(txn, actor, operation, version, change)?;
            }
            Ok((value, version, changed))
        })?;
        if changed {
            // Publish even if the flush below fails: the change is committed
            // and readers already see it.
            self.version.send_replace(version);
            self.store.flush().await?;
        }
        Ok((value, version))
    }

    /// Appends one audit record for a change that is not a configuration
    /// change (a manual heartbeat run), in a transaction of its own, with
    /// the current configuration version; durable before it returns.
    pub async fn record_audit(
        &self,
        actor: &Actor,
        operation: &str,
        change: &Change,
    ) -> Result<()> {
        let version = self.config_version();
        self.store.transact(&[Tree::Audit], |txn| -> Result<()> {
            Ok(audit::append(txn, actor, operation, version, change)?)
        })?;
        Ok(self.store.flush().await?)
    }

    /// Decodes every record of a tree.
    fn scan_records<M: prost::Message + Default>(&self, tree: Tree) -> Result<Vec<M>> {
        self.store
            .scan(tree)?
            .iter()
            .map(|(_, v)| records::decode(tree, v))
            .collect()
    }

    /// Up to `limit` records of `tree` whose sort key is strictly after
    /// `after` (`""`: from the first), in sort-key order, read as ranges of
    /// the store — never the whole tree — so a page costs its own size.
    /// With `index: None` the sort key is the record's key in `tree`; with
    /// `Some(index)` it is the key of the index tree (a name), whose value
    /// is the record's key (an id). An index entry whose record is gone (a
    /// delete between the two reads) is skipped and the range read on until
    /// the page is full or the index ends.
    fn records_after<M: prost::Message + Default>(
        &self,
        tree: Tree,
        index: Option<Tree>,
        after: &str,
        limit: usize,
    ) -> Result<Vec<M>> {
        // The smallest key strictly greater than `after`: `after` + 0x00.
        let successor = |k: &[u8]| {
            let mut s = Vec::with_capacity(k.len() + 1);
            s.extend_from_slice(k);
            s.push(0);
            s
        };
        let mut start = if after.is_empty() {
            Vec::new()
        } else {
            successor(after.as_bytes())
        };
        let mut out = Vec::with_capacity(limit.min(5001));
        while out.len() < limit {
            let want = limit - out.len();
            let chunk = self
                .store
                .range(index.unwrap_or(tree), &start, None, false, want)?;
            for (_, value) in &chunk {
                match index {
                    None => out.push(records::decode(tree, value)?),
                    Some(_) => {
                        if let Some(raw) = self.store.get(tree, value)? {
                            out.push(records::decode(tree, &raw)?);
                        }
                    }
                }
            }
            match chunk.last() {
                Some((last, _)) if chunk.len() == want => start = successor(last),
                _ => break,
            }
        }
        Ok(out)
    }

    /// Finds the id of a resource by id, then by unique name.
    fn resolve_id(
        &self,
        tree: Tree,
        names: Tree,
        kind: &'static str,
        ident: &str,
    ) -> Result<String> {
        let ident = ident.trim();
        if ident.is_empty() {
            return Err(CatalogError::invalid(FieldError::new(
                kind_field(kind),
                "is required (an id or a name)",
            )));
        }
        if self.store.get(tree, ident.as_bytes())?.is_some() {
            return Ok(ident.to_string());
        }
        match self.store.get(names, ident.as_bytes())? {
            Some(id) => String::from_utf8(id)
                .map_err(|_| CatalogError::Corrupt(format!("{} index", names.name()))),
            None => Err(CatalogError::not_found(kind, ident)),
        }
    }

    /// Reads and decodes a record by id; missing is `NotFound`.
    fn load<M: prost::Message + Default>(
        &self,
        tree: Tree,
        kind: &'static str,
        id: &str,
    ) -> Result<M> {
        match self.store.get(tree, id.as_bytes())? {
            Some(raw) => records::decode(tree, &raw),
            None => Err(CatalogError::not_found(kind, id)),
        }
    }
}

/// The request field that names a resource of `kind`.
fn kind_field(kind: &'static str) -> &'static str {
    match kind {
        "backend" => "backend",
        "client key" => "key",
        "agent" => "agent",
        _ => "id",
    }
}

/// Generates a server-side id: `prefix` + 16 lowercase hex characters.
fn new_id(prefix: &str) -> String {
    use rand::RngCore as _;
    let mut bytes = [0u8; 8];
    rand::rng().fill_bytes(&mut bytes);
    format!("{prefix}{}", hex::encode(bytes))
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::store::sled::SledStore;

    pub(crate) const KEY1: &str =
        "1111111111111111111111111111111111111111111111111111111111111111";
    pub(crate) const KEY2: &str =
        "2222222222222222222222222222222222222222222222222222222222222222";

    pub(crate) fn key(hex: &str) -> MasterKey {
        MasterKey::from_hex(hex).expect("test key")
    }

    pub(crate) async fn open_at(path: &std::path::Path, hex: &str) -> Result<Catalog> {
        let store: Arc<dyn Store> = Arc::new(SledStore::open(path).expect("store opens"));
        Catalog::open(store, key(hex)).await
    }

    pub(crate) async fn catalog() -> (tempfile::TempDir, Catalog) {
        let (dir, _, c) = store_and_catalog().await;
        (dir, c)
    }

    /// A fresh catalog and the store under it (for the modules that keep
    /// their own trees in the same store).
    pub(crate) async fn store_and_catalog() -> (tempfile::TempDir, Arc<dyn Store>, Catalog) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> =
            Arc::new(SledStore::open(&dir.path().join("data")).expect("store opens"));
        let c = Catalog::open(store.clone(), key(KEY1))
            .await
            .expect("catalog opens");
        (dir, store, c)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    #[tokio::test]
    async fn fresh_catalog_starts_at_version_one() {
        let (_dir, c) = catalog().await;
        assert_eq!(c.config_version(), INITIAL_CONFIG_VERSION);
        assert_eq!(c.master_key_id(), *key(KEY1).id());
    }

    #[tokio::test]
    async fn wrong_master_key_is_refused_naming_both_ids() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("data");
        drop(open_at(&path, KEY1).await.expect("first open"));
        let err = open_at(&path, KEY2).await.expect_err("mismatch");
        let msg = err.to_string();
        assert!(msg.contains(key(KEY1).id().as_str()), "{msg}");
        assert!(msg.contains(key(KEY2).id().as_str()), "{msg}");
    }

    #[tokio::test]
    async fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("data");
        {
            let store = crate::store::sled::SledStore::open(&path).expect("open");
            let s: &dyn Store = &store;
            let r: Result<()> = s.transact(&[Tree::Meta], |t| {
                Ok(t.insert(Tree::Meta, META_SCHEMA_VERSION, &99u32.to_be_bytes())?)
            });
            r.expect("write");
            s.flush().await.expect("flush");
        }
        let err = open_at(&path, KEY1).await.expect_err("too new");
        assert!(matches!(err, CatalogError::SchemaTooNew { found: 99, .. }));
    }
}
