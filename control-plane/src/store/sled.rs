//! [`Store`] on sled 0.34: one sled tree per [`Tree`], multi-tree
//! transactions through sled's `Transactional` impl for slices of trees.
//!
//! Consistency of [`Store::export`]: sled offers no snapshot across trees,
//! so the store holds a reader-writer lock that every transaction takes
//! shared and an export takes exclusively. Every write goes through
//! [`Store::transaction`], so while an export iterates nothing changes.
//!
//! Durability of acknowledgements: [`Store::flush`] also advances the
//! store's high-water mark (see [`super::watermark`]), and [`SledStore::open`]
//! refuses a store that recovered to less than its mark.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::RwLock;

use sled::Transactional as _;
use sled::transaction::{
    ConflictableTransactionError, TransactionError, TransactionalTree, UnabortableTransactionError,
};

use super::watermark::{self, META_HWM, Mark};
use super::{BoxFuture, Entry, ExportSink, Rollback, Store, StoreError, Tree, Txn, TxnBody};

/// The sled-backed store. Cheap to share behind an `Arc`.
pub struct SledStore {
    db: sled::Db,
    trees: HashMap<Tree, sled::Tree>,
    /// Shared by transactions, exclusive for an export (see the module doc).
    writes: RwLock<()>,
    /// The data directory (where the mark file lives).
    dir: PathBuf,
    /// Flush rounds (see [`SledStore::flush`]).
    rounds: Rounds,
}

/// Coalescing of flush rounds: a flush is covered by any round that
/// *started* after it was called (that round's mark transaction follows
/// every write the caller made). Rounds run one at a time under `last`,
/// which holds the last mark written.
struct Rounds {
    last: tokio::sync::Mutex<u64>,
    /// Number of the last round started (under `last`).
    started: AtomicU64,
    /// Number of the last round that completed (under `last`).
    completed: AtomicU64,
}

/// Meta keys the mark file repeats for operators (owned by the catalog;
/// spelled out here because the store sits below it).
const META_CONFIG_VERSION: &[u8] = b"config_version";
const META_LINEAGE: &[u8] = b"lineage";

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore").finish_non_exhaustive()
    }
}

fn engine(e: sled::Error) -> StoreError {
    StoreError::Engine(e.to_string())
}

/// An engine error of the store in `dir`: a full volume (`ENOSPC`,
/// `EDQUOT`) names the volume ([`StoreError::VolumeFull`]), anything else
/// is [`StoreError::Engine`].
fn failed(dir: &Path, e: sled::Error) -> StoreError {
    match &e {
        sled::Error::Io(io) if super::is_full(io) => StoreError::VolumeFull {
            volume: dir.to_path_buf(),
            error: io_text(io),
        },
        _ => engine(e),
    }
}

/// An I/O error's text without the `Custom { kind: .., error: ".." }`
/// wrapping sled's copies of it carry.
fn io_text(e: &std::io::Error) -> String {
    match e.get_ref() {
        Some(inner) => {
            let text = inner.to_string();
            // sled's copy: `Os { code: 28, kind: StorageFull, message: "No space left on device" }`.
            match text
                .split("message: \"")
                .nth(1)
                .and_then(|m| m.split('"').next())
            {
                Some(message) => message.to_string(),
                None => text,
            }
        }
        None => e.to_string(),
    }
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
        let last = verify_mark(dir, &trees)?;
        Ok(SledStore {
            db,
            trees,
            writes: RwLock::new(()),
            dir: dir.to_path_buf(),
            rounds: Rounds {
                last: tokio::sync::Mutex::new(last),
                started: AtomicU64::new(0),
                completed: AtomicU64::new(0),
            },
        })
    }

    /// Makes every committed write durable, blocking (for offline tools
    /// without an async runtime, such as restore; never call it inside one).
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        futures::executor::block_on(self.flush())
    }

    /// The mark of the last completed flush round (0: none yet).
    pub fn mark(&self) -> u64 {
        self.rounds.last.try_lock().map_or(0, |last| *last)
    }

    /// Commits Meta `hwm` = `next` (or more, if the store holds more) and
    /// returns the mark to write, with the config version and lineage.
    fn commit_mark(&self, next: u64) -> Result<Mark, StoreError> {
        let out: RefCell<Mark> = RefCell::new(Mark::default());
        let s: &dyn Store = self;
        s.transact(&[Tree::Meta], |txn| -> Result<(), StoreError> {
            let stored = watermark::decode_meta(txn.get(Tree::Meta, META_HWM)?.as_deref())
                .ok_or_else(|| StoreError::Engine("meta `hwm` is not 8 bytes".into()))?;
            let mark = next.max(stored.saturating_add(1));
            txn.insert(Tree::Meta, META_HWM, &mark.to_be_bytes())?;
            let config_version = txn
                .get(Tree::Meta, META_CONFIG_VERSION)?
                .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
                .map_or(0, u64::from_be_bytes);
            let lineage = txn
                .get(Tree::Meta, META_LINEAGE)?
                .map(|v| String::from_utf8_lossy(&v).into_owned())
                .unwrap_or_default();
            *out.borrow_mut() = Mark {
                mark,
                config_version,
                lineage,
            };
            Ok(())
        })?;
        Ok(out.into_inner())
    }

    /// Writes the mark file: on a blocking thread inside a tokio runtime,
    /// inline outside one.
    async fn write_mark(&self, mark: Mark) -> Result<(), StoreError> {
        let dir = self.dir.clone();
        let failed = |e: std::io::Error| {
            if super::is_full(&e) {
                return StoreError::VolumeFull {
                    volume: self.dir.clone(),
                    error: e.to_string(),
                };
            }
            StoreError::Mark(format!(
                "cannot write the high-water mark {}: {e}",
                watermark::path(&self.dir).display()
            ))
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => handle
                .spawn_blocking(move || watermark::write(&dir, &mark))
                .await
                .map_err(|e| StoreError::Mark(format!("writing the high-water mark: {e}")))?
                .map_err(failed),
            Err(_) => watermark::write(&dir, &mark).map_err(failed),
        }
    }

    fn tree(&self, t: Tree) -> Result<&sled::Tree, StoreError> {
        self.trees
            .get(&t)
            .ok_or(StoreError::TreeNotInTransaction(t))
    }
}

/// Compares the store's Meta `hwm` with the mark file of `dir`; returns the
/// mark to continue from. A store without a file is adopted (a new store,
/// or one from before marks existed), one below its file refused.
fn verify_mark(dir: &Path, trees: &HashMap<Tree, sled::Tree>) -> Result<u64, StoreError> {
    let meta = trees
        .get(&Tree::Meta)
        .ok_or(StoreError::TreeNotInTransaction(Tree::Meta))?;
    let get = |key: &[u8]| meta.get(key).map_err(engine);
    let stored = watermark::decode_meta(get(META_HWM)?.as_deref()).ok_or_else(|| {
        StoreError::Engine(format!(
            "data directory {}: meta `hwm` is not 8 bytes",
            dir.display()
        ))
    })?;
    let config_version = get(META_CONFIG_VERSION)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map_or(0, u64::from_be_bytes);
    match watermark::read(dir).map_err(|e| StoreError::Mark(e.to_string()))? {
        Some(file) if stored < file.mark => Err(StoreError::LostChanges {
            dir: dir.display().to_string(),
            config_version: file.config_version,
            mark: file.mark,
            store: stored,
        }),
        Some(file) => Ok(stored.max(file.mark)),
        None => {
            if trees.values().any(|t| !t.is_empty()) {
                let lineage = get(META_LINEAGE)?
                    .map(|v| String::from_utf8_lossy(&v).into_owned())
                    .unwrap_or_default();
                let mark = Mark {
                    mark: stored,
                    config_version,
                    lineage,
                };
                watermark::write(dir, &mark).map_err(|e| {
                    StoreError::Mark(format!(
                        "cannot write the high-water mark {}: {e}",
                        watermark::path(dir).display()
                    ))
                })?;
                tracing::info!(
                    data_dir = %dir.display(),
                    mark = stored,
                    config_version,
                    "the store had no high-water mark (made by an earlier version, or the mark file was removed): wrote one from the store as it is"
                );
            }
            Ok(stored)
        }
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
    dir: &'a Path,
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
            UnabortableTransactionError::Storage(e) => failed(self.dir, e),
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
        let v = self
            .tree(tree)?
            .get(key)
            .map_err(|e| failed(&self.dir, e))?;
        Ok(v.map(|v| v.to_vec()))
    }

    fn scan(&self, tree: Tree) -> Result<Vec<Entry>, StoreError> {
        self.tree(tree)?
            .iter()
            .map(|kv| {
                kv.map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .map_err(|e| failed(&self.dir, e))
            })
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
            kv.map(|(k, v)| (k.to_vec(), v.to_vec()))
                .map_err(|e| failed(&self.dir, e))
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
                    dir: &self.dir,
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
            Err(TransactionError::Storage(e)) => Err(failed(&self.dir, e)),
        }
    }

    fn export(&self, sink: &mut ExportSink<'_>) -> Result<u64, StoreError> {
        let _exclusive = self.writes.write();
        let mut n = 0u64;
        for t in Tree::ALL {
            for kv in self.tree(t)?.iter() {
                let (k, v) = kv.map_err(|e| failed(&self.dir, e))?;
                sink(t, &k, &v).map_err(StoreError::Export)?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// A flush round: commit Meta `hwm` = n+1 (after every write made so
    /// far), flush sled, write the mark file with n+1; concurrent flushes
    /// share rounds (see [`Rounds`]).
    fn flush(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let ticket = self.rounds.started.load(Ordering::SeqCst);
            let mut last = self.rounds.last.lock().await;
            if self.rounds.completed.load(Ordering::SeqCst) > ticket {
                // A round that started after this call completed meanwhile.
                return Ok(());
            }
            let round = self.rounds.started.fetch_add(1, Ordering::SeqCst) + 1;
            let mark = self.commit_mark(last.saturating_add(1))?;
            self.db
                .flush_async()
                .await
                .map_err(|e| failed(&self.dir, e))?;
            let n = mark.mark;
            self.write_mark(mark).await?;
            *last = n;
            self.rounds.completed.store(round, Ordering::SeqCst);
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
    fn a_full_volume_names_the_volume_and_other_errors_stay_engine_errors() {
        let dir = Path::new("/var/lib/claw");
        let enospc = || std::io::Error::from_raw_os_error(28);
        // sled's copy of a failed write's error, given to every later call.
        let copied = sled::Error::Io(enospc()).clone();
        for e in [
            sled::Error::Io(enospc()),
            copied,
            sled::Error::Io(std::io::Error::from_raw_os_error(122)),
        ] {
            let err = failed(dir, e);
            let msg = err.to_string();
            assert!(err.is_no_space(), "{err:?}");
            assert!(
                msg.starts_with("the data volume /var/lib/claw is full ("),
                "{msg}"
            );
            assert!(!msg.contains("Custom {") && !msg.contains("Os {"), "{msg}");
        }
        assert!(
            failed(dir, sled::Error::Io(enospc()))
                .to_string()
                .contains("(No space left on device (os error 28))")
        );
        assert!(
            failed(dir, sled::Error::Io(enospc()).clone())
                .to_string()
                .contains("(No space left on device)")
        );
        let other = failed(dir, sled::Error::Io(std::io::Error::from_raw_os_error(5)));
        assert!(matches!(other, StoreError::Engine(_)), "{other:?}");
        assert!(!other.is_no_space());
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

    #[tokio::test]
    async fn a_flush_advances_the_mark_and_a_store_below_its_mark_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("data");
        let commit = |s: &SledStore, k: &[u8]| {
            let d: &dyn Store = s;
            let r: Result<(), StoreError> =
                d.transact(&[Tree::Backends], |t| t.insert(Tree::Backends, k, b"v"));
            r.expect("commit");
        };
        {
            let s = SledStore::open(&path).expect("open");
            // A new, empty store writes no mark until its first flush.
            assert_eq!(watermark::read(&path).expect("reads"), None);
            commit(&s, b"a");
            s.flush().await.expect("flush");
            commit(&s, b"b");
            s.flush().await.expect("flush");
            assert_eq!(s.mark(), 2);
            assert_eq!(
                watermark::read(&path).expect("reads").map(|m| m.mark),
                Some(2)
            );
            assert_eq!(
                s.get(Tree::Meta, META_HWM).expect("get"),
                Some(2u64.to_be_bytes().to_vec())
            );
        }
        {
            // Reopened: continues from the mark.
            let s = SledStore::open(&path).expect("reopens");
            assert_eq!(s.mark(), 2);
            s.flush().await.expect("flush");
            assert_eq!(
                watermark::read(&path).expect("reads").map(|m| m.mark),
                Some(3)
            );
        }
        // A mark ahead of the store (the store lost its tail): refused.
        let ahead = Mark {
            mark: 9,
            config_version: 4,
            lineage: "ln_x".into(),
        };
        watermark::write(&path, &ahead).expect("write");
        let Err(err) = SledStore::open(&path) else {
            panic!("a store below its mark opened");
        };
        let msg = err.to_string();
        assert!(
            msg.contains("the store lost acknowledged changes after version 4 (mark 9, store 3); restore from a backup"),
            "{msg}"
        );
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        // Without the file the store is adopted as it is, and a file written.
        std::fs::remove_file(watermark::path(&path)).expect("rm");
        let s = SledStore::open(&path).expect("adopted");
        assert_eq!(
            watermark::read(&path).expect("reads").map(|m| m.mark),
            Some(3)
        );
        drop(s);
        // A damaged file is named.
        std::fs::write(watermark::path(&path), "x").expect("write");
        let Err(err) = SledStore::open(&path) else {
            panic!("a damaged mark opened");
        };
        assert!(err.to_string().contains("claw.hwm is damaged"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_flushes_share_rounds_and_each_is_covered() {
        let (_dir, s) = store();
        let s = std::sync::Arc::new(s);
        let mut tasks = Vec::new();
        for i in 0..32u32 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let d: &dyn Store = &*s;
                let r: Result<(), StoreError> = d.transact(&[Tree::Backends], |t| {
                    t.insert(Tree::Backends, &i.to_be_bytes(), b"v")
                });
                r.expect("commit");
                s.flush().await.expect("flush");
                // Covered: the mark's transaction follows this write.
                s.mark()
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        let rounds = s.mark();
        assert!((1..=32).contains(&rounds), "{rounds}");
    }

    #[test]
    fn flush_blocking_writes_the_mark_outside_a_runtime() {
        let (dir, s) = store();
        s.flush_blocking().expect("flush");
        let path = dir.path().join("data");
        assert_eq!(
            watermark::read(&path).expect("reads").map(|m| m.mark),
            Some(1)
        );
    }
}
