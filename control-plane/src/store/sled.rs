//! [`Store`] on sled 0.34: one sled tree per [`Tree`], multi-tree
//! transactions through sled's `Transactional` impl for slices of trees.
//!
//! Consistency of [`Store::export`]: sled offers no snapshot across trees,
//! so the store holds a reader-writer lock that every transaction takes
//! shared and an export takes exclusively. Every write goes through
//! [`Store::transaction`], so while an export iterates nothing changes.

use std::cell::Cell;
use std::collections::HashMap;
use std::path::Path;

use parking_lot::RwLock;

use sled::Transactional as _;
use sled::transaction::{
    ConflictableTransactionError, TransactionError, TransactionalTree, UnabortableTransactionError,
};

use super::{BoxFuture, Entry, ExportSink, Rollback, Store, StoreError, Tree, Txn, TxnBody};

/// The sled-backed store. Cheap to share behind an `Arc`.
pub struct SledStore {
    db: sled::Db,
    trees: HashMap<Tree, sled::Tree>,
    /// Shared by transactions, exclusive for an export (see the module doc).
    writes: RwLock<()>,
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore").finish_non_exhaustive()
    }
}

fn engine(e: sled::Error) -> StoreError {
    StoreError::Engine(e.to_string())
}

/// How long [`SledStore::open`] waits for the data directory's lock.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl SledStore {
    /// Opens (or creates) the database in `dir`, waiting up to
    /// [`LOCK_WAIT`] for its lock. The directory is created with mode 0700
    /// when missing: it holds encrypted secrets and hashes.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        create_private_dir(dir)
            .map_err(|e| StoreError::Engine(format!("cannot create {}: {e}", dir.display())))?;
        let started = std::time::Instant::now();
        let db = loop {
            match sled::Config::new().path(dir).open() {
                Ok(db) => break db,
                // A store this process just dropped lets go of the lock a
                // moment later (sled's flusher thread); another live
                // control plane never does.
                Err(e)
                    if e.to_string().contains("could not acquire lock")
                        && started.elapsed() < LOCK_WAIT =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(StoreError::Engine(format!(
                        "cannot open {}: {e}",
                        dir.display()
                    )));
                }
            }
        };
        let mut trees = HashMap::new();
        for t in Tree::ALL {
            trees.insert(t, db.open_tree(t.name()).map_err(engine)?);
        }
        Ok(SledStore {
            db,
            trees,
            writes: RwLock::new(()),
        })
    }

    /// Makes every committed write durable, blocking (for offline tools
    /// without an async runtime, such as restore).
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        self.db.flush().map(|_| ()).map_err(engine)
    }

    fn tree(&self, t: Tree) -> Result<&sled::Tree, StoreError> {
        self.trees
            .get(&t)
            .ok_or(StoreError::TreeNotInTransaction(t))
    }
}

#[cfg(unix)]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)
}

/// The view a transaction body gets: sled's transactional trees, plus a flag
/// recording whether sled reported a conflict (so the body's error is turned
/// back into a retry rather than a rollback).
struct SledTxn<'a> {
    trees: &'a [Tree],
    views: &'a [TransactionalTree],
    conflict: Cell<bool>,
}

impl SledTxn<'_> {
    fn view(&self, tree: Tree) -> Result<&TransactionalTree, StoreError> {
        self.trees
            .iter()
            .position(|t| *t == tree)
            .and_then(|i| self.views.get(i))
            .ok_or(StoreError::TreeNotInTransaction(tree))
    }

    fn map(&self, e: UnabortableTransactionError) -> StoreError {
        match e {
            UnabortableTransactionError::Conflict => {
                self.conflict.set(true);
                StoreError::Conflict
            }
            UnabortableTransactionError::Storage(e) => engine(e),
        }
    }
}

impl Txn for SledTxn<'_> {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let v = self.view(tree)?.get(key).map_err(|e| self.map(e))?;
        Ok(v.map(|v| v.to_vec()))
    }

    fn insert(&self, tree: Tree, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.view(tree)?
            .insert(key, value)
            .map_err(|e| self.map(e))?;
        Ok(())
    }

    fn remove(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let v = self.view(tree)?.remove(key).map_err(|e| self.map(e))?;
        Ok(v.map(|v| v.to_vec()))
    }
}

impl Store for SledStore {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let v = self.tree(tree)?.get(key).map_err(engine)?;
        Ok(v.map(|v| v.to_vec()))
    }

    fn scan(&self, tree: Tree) -> Result<Vec<Entry>, StoreError> {
        self.tree(tree)?
            .iter()
            .map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(engine))
            .collect()
    }

    fn len(&self, tree: Tree) -> Result<usize, StoreError> {
        Ok(self.tree(tree)?.len())
    }

    fn range(
        &self,
        tree: Tree,
        start: &[u8],
        end: Option<&[u8]>,
        reverse: bool,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        use std::ops::Bound;
        let t = self.tree(tree)?;
        let upper = match end {
            Some(e) => Bound::Excluded(e),
            None => Bound::Unbounded,
        };
        let iter = t.range::<&[u8], _>((Bound::Included(start), upper));
        let pick = |kv: sled::Result<(sled::IVec, sled::IVec)>| {
            kv.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(engine)
        };
        if reverse {
            iter.rev().take(limit).map(pick).collect()
        } else {
            iter.take(limit).map(pick).collect()
        }
    }

    fn transaction(&self, trees: &[Tree], body: &TxnBody<'_>) -> Result<bool, StoreError> {
        let sled_trees = trees
            .iter()
            .map(|t| self.tree(*t).cloned())
            .collect::<Result<Vec<_>, _>>()?;
        // Recursive: a transaction started while another is open on this
        // thread must not wait behind a queued export (a deadlock).
        let _shared = self.writes.read_recursive();
        let result = sled_trees
            .as_slice()
            .transaction(|views: &Vec<TransactionalTree>| {
                let txn = SledTxn {
                    trees,
                    views,
                    conflict: Cell::new(false),
                };
                match body(&txn) {
                    Ok(()) => Ok(()),
                    Err(Rollback) if txn.conflict.get() => {
                        Err(ConflictableTransactionError::Conflict)
                    }
                    Err(Rollback) => Err(ConflictableTransactionError::Abort(())),
                }
            });
        match result {
            Ok(()) => Ok(true),
            Err(TransactionError::Abort(())) => Ok(false),
            Err(TransactionError::Storage(e)) => Err(engine(e)),
        }
    }

    fn export(&self, sink: &mut ExportSink<'_>) -> Result<u64, StoreError> {
        let _exclusive = self.writes.write();
        let mut n = 0u64;
        for t in Tree::ALL {
            for kv in self.tree(t)?.iter() {
                let (k, v) = kv.map_err(engine)?;
                sink(t, &k, &v).map_err(StoreError::Export)?;
                n += 1;
            }
        }
        Ok(n)
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            self.db.flush_async().await.map_err(engine)?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, SledStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(&dir.path().join("data")).expect("open");
        (dir, store)
    }

    #[derive(Debug, thiserror::Error)]
    enum TestError {
        #[error("store: {0}")]
        Store(#[from] StoreError),
        #[error("abort")]
        Abort,
    }

    #[test]
    fn transactions_are_atomic_across_trees() {
        let (_dir, s) = store();
        let s: &dyn Store = &s;
        let r: Result<(), TestError> = s.transact(&[Tree::Backends, Tree::BackendNames], |t| {
            t.insert(Tree::Backends, b"be_1", b"record")?;
            t.insert(Tree::BackendNames, b"b1", b"be_1")?;
            Err(TestError::Abort)
        });
        assert!(matches!(r, Err(TestError::Abort)));
        assert_eq!(s.get(Tree::Backends, b"be_1").expect("get"), None);
        assert_eq!(s.get(Tree::BackendNames, b"b1").expect("get"), None);

        let v: Result<u32, TestError> = s.transact(&[Tree::Backends, Tree::BackendNames], |t| {
            t.insert(Tree::Backends, b"be_1", b"record")?;
            t.insert(Tree::BackendNames, b"b1", b"be_1")?;
            // Reads see the transaction's own writes.
            assert_eq!(t.get(Tree::Backends, b"be_1")?, Some(b"record".to_vec()));
            Ok(7)
        });
        assert_eq!(v.expect("committed"), 7);
        assert_eq!(
            s.get(Tree::BackendNames, b"b1").expect("get"),
            Some(b"be_1".to_vec())
        );
        assert_eq!(s.len(Tree::Backends).expect("len"), 1);
        assert_eq!(s.scan(Tree::Backends).expect("scan").len(), 1);
    }

    #[test]
    fn undeclared_trees_are_refused() {
        let (_dir, s) = store();
        let s: &dyn Store = &s;
        let r: Result<(), TestError> =
            s.transact(&[Tree::Meta], |t| Ok(t.insert(Tree::Agents, b"a", b"b")?));
        assert!(matches!(
            r,
            Err(TestError::Store(StoreError::TreeNotInTransaction(
                Tree::Agents
            )))
        ));
    }

    #[test]
    fn a_directory_held_by_a_live_store_is_refused_after_the_lock_wait() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("data");
        let _held = SledStore::open(&path).expect("open");
        let started = std::time::Instant::now();
        let Err(StoreError::Engine(msg)) = SledStore::open(&path) else {
            panic!("a held directory opened twice");
        };
        assert!(started.elapsed() >= LOCK_WAIT);
        assert!(msg.contains("could not acquire lock"), "{msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
    }

    #[test]
    fn export_is_a_point_in_time_view_of_every_tree() {
        let (_dir, s) = store();
        let s = std::sync::Arc::new(s);
        let d: &dyn Store = &*s;
        let r: Result<(), StoreError> = d.transact(&[Tree::Meta, Tree::Audit], |t| {
            t.insert(Tree::Audit, b"a", b"1")?;
            t.insert(Tree::Meta, b"m", b"2")
        });
        r.expect("commit");
        // A writer that keeps a pair of keys equal in two trees: an export
        // must never see one updated without the other.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (s, stop) = (s.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    i += 1;
                    let d: &dyn Store = &*s;
                    let r: Result<(), StoreError> =
                        d.transact(&[Tree::Backends, Tree::Agents], |t| {
                            t.insert(Tree::Backends, b"n", &i.to_be_bytes())?;
                            t.insert(Tree::Agents, b"n", &i.to_be_bytes())
                        });
                    r.expect("commit");
                }
            })
        };
        for _ in 0..50 {
            let mut seen: Vec<(Tree, Vec<u8>, Vec<u8>)> = Vec::new();
            let n = d
                .export(&mut |t, k, v| {
                    seen.push((t, k.to_vec(), v.to_vec()));
                    Ok(())
                })
                .expect("export");
            assert_eq!(n as usize, seen.len());
            // Trees come in Tree::ALL order.
            let order: Vec<usize> = seen
                .iter()
                .map(|(t, _, _)| Tree::ALL.iter().position(|x| x == t).expect("known"))
                .collect();
            assert!(order.windows(2).all(|w| w[0] <= w[1]));
            let value = |tree| {
                seen.iter()
                    .find(|(t, _, _)| *t == tree)
                    .map(|e| e.2.clone())
            };
            assert_eq!(value(Tree::Backends), value(Tree::Agents));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.join().expect("writer");
        let err = d
            .export(&mut |_, _, _| Err(std::io::Error::other("disk full")))
            .expect_err("a failing sink fails the export");
        assert!(err.to_string().contains("disk full"), "{err}");
    }

    #[tokio::test]
    async fn data_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("data");
        {
            let s = SledStore::open(&path).expect("open");
            let d: &dyn Store = &s;
            let r: Result<(), StoreError> =
                d.transact(&[Tree::Meta], |t| t.insert(Tree::Meta, b"k", b"v"));
            r.expect("commit");
            s.flush().await.expect("flush");
        }
        let s = SledStore::open(&path).expect("reopen");
        assert_eq!(s.get(Tree::Meta, b"k").expect("get"), Some(b"v".to_vec()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o700);
        }
    }
}
