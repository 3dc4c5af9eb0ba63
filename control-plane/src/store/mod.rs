//! The storage engine behind the catalog, reduced to what we need: point
//! reads, ordered scans, multi-tree transactions and a durable flush.
//!
//! The trait is deliberately small and engine-agnostic so that sled (the only
//! implementation today, in [`sled`]) can be swapped. Keys and values are
//! bytes; typing lives one layer up, in [`crate::catalog`].
//!
//! A new kind of data (usage buckets, cooldown events, heartbeat runs) gets a
//! new [`Tree`] variant and nothing else.

pub mod sled;
pub mod space;
pub mod watermark;

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;

/// The trees (tables) of the store. Each resource has one tree keyed by id,
/// plus index trees that map a unique attribute to the id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tree {
    /// Schema version, config version, master key id.
    Meta,
    /// Backend id → backend record.
    Backends,
    /// Backend name → backend id (uniqueness of names).
    BackendNames,
    /// Pool name (`primary`, `fallback`) → pool settings record.
    Pools,
    /// Client key id → client key record.
    ClientKeys,
    /// Client key name → client key id.
    ClientKeyNames,
    /// Lowercase hex SHA-256 of a client key secret → client key id.
    ClientKeyHashes,
    /// Agent id → agent record.
    Agents,
    /// Agent id → heartbeat cursor (next fire time, schedule fingerprint).
    HeartbeatCursors,
    /// `agent id \0 be u64 nominal ms` → heartbeat run record.
    HeartbeatRuns,
    /// `be u64 nominal ms \0 agent id` → empty: runs by time (listing, pruning).
    HeartbeatRunsByTime,
    /// Run key → empty: runs not yet finished (running, deferred), for recovery.
    HeartbeatOpen,
    /// Run key → webhook delivery outbox entry.
    HeartbeatOutbox,
    /// `node id \0 stream epoch` → which report batches were stored
    /// (idempotency of the report stream).
    ReportBatches,
    /// `be u64 hour ms | dims` → usage totals of one hour (see `stats::keys`).
    UsageHourly,
    /// `be u64 day ms | pool \0 dims` → usage totals of one UTC day.
    UsageDaily,
    /// Backend id → fleet-wide cooldown state (absolute time).
    CooldownState,
    /// `be u64 start ms | backend \0 node \0 seq` → cooldown history event.
    CooldownEvents,
    /// Admin token id → named admin token record (role, secret hash).
    AdminTokens,
    /// Admin token name → admin token id.
    AdminTokenNames,
    /// Lowercase hex SHA-256 of an admin token secret → admin token id.
    AdminTokenHashes,
    /// `be u64 time ms | 8 random bytes` → audit record.
    Audit,
}

impl Tree {
    /// Every tree, in a fixed order.
    pub const ALL: [Tree; 22] = [
        Tree::Meta,
        Tree::Backends,
        Tree::BackendNames,
        Tree::Pools,
        Tree::ClientKeys,
        Tree::ClientKeyNames,
        Tree::ClientKeyHashes,
        Tree::Agents,
        Tree::HeartbeatCursors,
        Tree::HeartbeatRuns,
        Tree::HeartbeatRunsByTime,
        Tree::HeartbeatOpen,
        Tree::HeartbeatOutbox,
        Tree::ReportBatches,
        Tree::UsageHourly,
        Tree::UsageDaily,
        Tree::CooldownState,
        Tree::CooldownEvents,
        Tree::AdminTokens,
        Tree::AdminTokenNames,
        Tree::AdminTokenHashes,
        Tree::Audit,
    ];

    /// The trees holding configuration; configuration transactions span
    /// these.
    pub const CONFIG: [Tree; 8] = [
        Tree::Meta,
        Tree::Backends,
        Tree::BackendNames,
        Tree::Pools,
        Tree::ClientKeys,
        Tree::ClientKeyNames,
        Tree::ClientKeyHashes,
        Tree::Agents,
    ];

    /// The on-disk name of the tree. Never change one: it is the schema.
    pub fn name(self) -> &'static str {
        match self {
            Tree::Meta => "meta",
            Tree::Backends => "backends",
            Tree::BackendNames => "backend_names",
            Tree::Pools => "pools",
            Tree::ClientKeys => "client_keys",
            Tree::ClientKeyNames => "client_key_names",
            Tree::ClientKeyHashes => "client_key_hashes",
            Tree::Agents => "agents",
            Tree::HeartbeatCursors => "heartbeat_cursors",
            Tree::HeartbeatRuns => "heartbeat_runs",
            Tree::HeartbeatRunsByTime => "heartbeat_runs_by_time",
            Tree::HeartbeatOpen => "heartbeat_open",
            Tree::HeartbeatOutbox => "heartbeat_outbox",
            Tree::ReportBatches => "report_batches",
            Tree::UsageHourly => "usage_hourly",
            Tree::UsageDaily => "usage_daily",
            Tree::CooldownState => "cooldown_state",
            Tree::CooldownEvents => "cooldown_events",
            Tree::AdminTokens => "admin_tokens",
            Tree::AdminTokenNames => "admin_token_names",
            Tree::AdminTokenHashes => "admin_token_hashes",
            Tree::Audit => "audit",
        }
    }
}

/// A failure of the storage engine.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The engine reported an error (I/O, corruption, ...).
    #[error("storage engine error: {0}")]
    Engine(String),
    /// A concurrent transaction conflicted; the engine retries the closure.
    /// Callers of [`Store::transaction`] never see it.
    #[error("transaction conflict")]
    Conflict,
    /// A transaction touched a tree it did not declare (a programming error).
    #[error("tree {0:?} is not part of this transaction")]
    TreeNotInTransaction(Tree),
    /// The sink of [`Store::export`] failed (writing the backup file).
    #[error("writing the export failed: {0}")]
    Export(#[source] std::io::Error),
    /// The data volume has less free space than the reserve
    /// (`--min-free-space`): the write was refused before it reached the
    /// engine (see [`space`]).
    #[error(
        "the data volume {} has {} free, below the reserve {}; writes are refused until space is freed",
        volume.display(),
        space::Bytes(*free),
        space::Bytes(*reserve)
    )]
    NoSpace {
        /// The data directory whose volume is short of space.
        volume: std::path::PathBuf,
        /// Bytes available on it when the write was refused.
        free: u64,
        /// The reserve writes keep free.
        reserve: u64,
    },
    /// The engine's write failed because the data volume is full (`ENOSPC`)
    /// or the quota ran out (`EDQUOT`): met with the guard off
    /// (`--min-free-space 0`), or by a write that outgrew the reserve.
    /// Answered like [`StoreError::NoSpace`]: `RESOURCE_EXHAUSTED` naming
    /// the volume.
    #[error(
        "the data volume {} is full ({error}); the write was not stored. Free space on it, then restart the control plane (the storage engine does not write again after a failed write); a --min-free-space reserve refuses writes before the volume fills",
        volume.display()
    )]
    VolumeFull {
        /// The data directory whose volume is full.
        volume: std::path::PathBuf,
        /// The I/O error the engine met.
        error: String,
    },
    /// The store recovered to less than its durable high-water mark (see
    /// [`watermark`]): acknowledged changes are gone.
    #[error(
        "data directory {dir}: the store lost acknowledged changes after version {config_version} (mark {mark}, store {store}); restore from a backup"
    )]
    LostChanges {
        /// The data directory.
        dir: String,
        /// The configuration version the mark recorded.
        config_version: u64,
        /// The mark in the file.
        mark: u64,
        /// The mark the store recovered to.
        store: u64,
    },
    /// The high-water mark could not be read or written.
    #[error("{0}")]
    Mark(String),
}

impl StoreError {
    /// Whether the write failed for lack of space on the data volume
    /// (refused below the reserve, or the engine met a full volume): the
    /// answer is `RESOURCE_EXHAUSTED` naming the volume, and the write may
    /// succeed once space is freed.
    pub fn is_no_space(&self) -> bool {
        matches!(
            self,
            StoreError::NoSpace { .. } | StoreError::VolumeFull { .. }
        )
    }
}

/// Whether an I/O error means the volume is full or over its quota
/// (`ENOSPC`, `EDQUOT`). By kind, which the standard library derives from
/// the errno and which survives where the errno does not (sled re-creates a
/// failed write's error from its kind for every later call).
pub fn is_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

/// Returned by a transaction body to make the engine roll back.
#[derive(Debug, Clone, Copy)]
pub struct Rollback;

/// Reads and writes inside a transaction. Writes become visible atomically
/// when the transaction commits, and not at all if it rolls back.
pub trait Txn {
    /// Reads a key (sees this transaction's own writes).
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Writes a key.
    fn insert(&self, tree: Tree, key: &[u8], value: &[u8]) -> Result<(), StoreError>;
    /// Removes a key, returning the old value.
    fn remove(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
}

/// A key and its value.
pub type Entry = (Vec<u8>, Vec<u8>);

/// A transaction body as the engine sees it: it may run more than once (on
/// conflicts), so it must not have side effects outside the transaction.
pub type TxnBody<'a> = dyn Fn(&dyn Txn) -> Result<(), Rollback> + 'a;

/// Receives the entries of [`Store::export`]: tree, key, value.
pub type ExportSink<'a> = dyn FnMut(Tree, &[u8], &[u8]) -> std::io::Result<()> + 'a;

/// A boxed future, to keep [`Store`] object safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A key-value storage engine with named trees.
pub trait Store: Send + Sync + 'static {
    /// Reads one key.
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Every entry of a tree in key order.
    fn scan(&self, tree: Tree) -> Result<Vec<Entry>, StoreError>;
    /// Number of entries in a tree.
    fn len(&self, tree: Tree) -> Result<usize, StoreError>;
    /// At most `limit` entries with keys in `[start, end)` (`end: None` runs
    /// to the end of the tree), in key order or, with `reverse`, descending.
    /// The default filters a full scan; engines override it.
    fn range(
        &self,
        tree: Tree,
        start: &[u8],
        end: Option<&[u8]>,
        reverse: bool,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let mut all: Vec<Entry> = self
            .scan(tree)?
            .into_iter()
            .filter(|(k, _)| k.as_slice() >= start && end.is_none_or(|e| k.as_slice() < e))
            .collect();
        if reverse {
            all.reverse();
        }
        all.truncate(limit);
        Ok(all)
    }
    /// Runs `body` atomically over `trees`. Returns `Ok(true)` when it
    /// committed and `Ok(false)` when the body rolled back.
    fn transaction(&self, trees: &[Tree], body: &TxnBody<'_>) -> Result<bool, StoreError>;
    /// Hands every entry of every tree to `sink`, trees in [`Tree::ALL`]
    /// order and keys in order, as one point-in-time view: no transaction
    /// commits while it runs (engines block them), so the sink must be fast
    /// (a local file, never a network peer). Returns the number of entries.
    fn export(&self, sink: &mut ExportSink<'_>) -> Result<u64, StoreError>;
    /// Makes every committed write durable.
    fn flush(&self) -> BoxFuture<'_, Result<(), StoreError>>;
    /// Whether the engine answers reads (for `/healthz`).
    fn check(&self) -> Result<(), StoreError> {
        self.get(Tree::Meta, b"schema_version").map(|_| ())
    }
}

impl dyn Store {
    /// Runs a typed transaction: `body` returns a value or an error of the
    /// caller's type; an error rolls everything back and is returned as is.
    pub fn transact<T, E>(
        &self,
        trees: &[Tree],
        body: impl Fn(&dyn Txn) -> Result<T, E>,
    ) -> Result<T, E>
    where
        E: From<StoreError>,
    {
        // The engine may run the body several times; keep the last outcome.
        let outcome: RefCell<Option<Result<T, E>>> = RefCell::new(None);
        let committed = self.transaction(trees, &|txn| {
            let result = body(txn);
            let failed = result.is_err();
            *outcome.borrow_mut() = Some(result);
            if failed { Err(Rollback) } else { Ok(()) }
        })?;
        match outcome.into_inner() {
            Some(result) => {
                debug_assert_eq!(committed, result.is_ok());
                result
            }
            None => Err(StoreError::Engine("transaction body never ran".into()).into()),
        }
    }
}
