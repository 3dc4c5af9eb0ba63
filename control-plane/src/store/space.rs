//! Free space on the data volume, and a [`Store`] that refuses writes
//! below a reserve (`--min-free-space`), so the engine never meets a full
//! disk in normal operation.
//!
//! - [`SpaceWatch`] reads the volume's available bytes (`statvfs`) at start,
//!   every [`WATCH_INTERVAL`] on its own thread, after every
//!   [`SpaceWatch::recheck_after`] bytes of committed writes, and whenever the
//!   engine fails a write (a full disk reads as an I/O error). It keeps one
//!   atomic flag: low or not. Entering low space logs a warning once, leaving
//!   it logs an info; the state is exported as metrics (below).
//! - [`GuardedStore`] wraps the engine. Reads, scans, exports and flushes
//!   pass through. A transaction started while low runs its body against a
//!   view whose reads work and whose first write fails with
//!   [`StoreError::NoSpace`]; the transaction is then rolled back whatever
//!   the body did with the error, so nothing reaches the engine (read-only
//!   transactions, like the catalog's open, still succeed). Callers map
//!   `NoSpace` to gRPC `RESOURCE_EXHAUSTED` naming the volume.
//!
//! Writes resume by themselves once the watcher sees space above the
//! reserve again (files deleted, volume grown): nothing needs a restart.
//!
//! `/healthz` stays `200` while low (the store still answers reads; a
//! restart frees nothing, and a failing probe would cut the proxies' config
//! streams and the operators' reads too); the state is visible in the
//! metrics below and the log. The control plane has no `/readyz`.
//!
//! With the guard off (`--min-free-space 0`) the engine itself meets the
//! full disk: sled fails that write and every later one (its log writer
//! stays failed until a restart). Its `ENOSPC` / `EDQUOT` errors become
//! [`StoreError::VolumeFull`] naming the volume (in [`super::sled`]), so
//! the failing calls get `RESOURCE_EXHAUSTED` like a refusal of the
//! guard, with a message that says a restart is needed after freeing
//! space; a stop exits non-zero because the last flush fails — but nothing
//! acknowledged is lost and the directory opens again once space is freed
//! (`tests/tests/disk_full.rs`). With the guard on, an engine failure
//! while the volume is below the reserve is answered as the guard's
//! refusal ([`StoreError::NoSpace`]).
//!
//! | metric | kind | |
//! |---|---|---|
//! | `claw_cp_store_free_bytes` | gauge | bytes available on the data volume |
//! | `claw_cp_store_reserve_bytes` | gauge | the reserve in force |
//! | `claw_cp_store_low_space` | gauge | 1 while writes are refused |
//! | `claw_cp_store_writes_refused_total` | counter | write transactions refused |

use std::cell::Cell;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;

use super::{BoxFuture, Entry, ExportSink, Rollback, Store, StoreError, Tree, Txn, TxnBody};

/// How often the watcher thread reads the free space.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(1);
/// The default reserve's cap: 256 MiB (or 5 % of a smaller volume).
pub const DEFAULT_RESERVE_MAX: u64 = 256 * MIB;
/// The default reserve's share of the volume, in percent.
pub const DEFAULT_RESERVE_PERCENT: f64 = 5.0;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
const TIB: u64 = 1024 * GIB;

/// Bytes available on the data volume.
pub(crate) const STORE_FREE_BYTES: &str = "claw_cp_store_free_bytes";
/// The reserve in force, in bytes.
pub(crate) const STORE_RESERVE_BYTES: &str = "claw_cp_store_reserve_bytes";
/// 1 while writes are refused for lack of space, else 0.
pub(crate) const STORE_LOW_SPACE: &str = "claw_cp_store_low_space";
/// Write transactions refused for lack of space.
pub(crate) const STORE_WRITES_REFUSED_TOTAL: &str = "claw_cp_store_writes_refused_total";

/// Gives the metrics their help text (called by [`crate::metrics`]).
pub(crate) fn describe() {
    metrics::describe_gauge!(
        STORE_FREE_BYTES,
        metrics::Unit::Bytes,
        "Bytes available on the data volume (statvfs, refreshed every second)"
    );
    metrics::describe_gauge!(
        STORE_RESERVE_BYTES,
        metrics::Unit::Bytes,
        "Free space kept on the data volume (--min-free-space); writes are refused below it"
    );
    metrics::describe_gauge!(
        STORE_LOW_SPACE,
        "1 while the data volume is below the reserve and writes are refused, else 0"
    );
    metrics::describe_counter!(
        STORE_WRITES_REFUSED_TOTAL,
        "Write transactions refused because the data volume was below the reserve"
    );
    metrics::counter!(STORE_WRITES_REFUSED_TOTAL).increment(0);
    metrics::gauge!(STORE_LOW_SPACE).increment(0.0);
}

/// The reserve of `--min-free-space`: bytes, a share of the volume, or the
/// default (the smaller of [`DEFAULT_RESERVE_MAX`] and
/// [`DEFAULT_RESERVE_PERCENT`] of the volume, so a small volume stays
/// usable).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum MinFreeSpace {
    /// min(256 MiB, 5 % of the volume).
    #[default]
    Default,
    /// A fixed number of bytes; 0 turns the guard off.
    Bytes(u64),
    /// A share of the volume's size, 0 to 100.
    Percent(f64),
}

impl MinFreeSpace {
    /// The reserve in bytes on a volume of `total` bytes.
    pub fn reserve(&self, total: u64) -> u64 {
        let share = |p: f64| ((total as f64) * p / 100.0).round() as u64;
        match *self {
            MinFreeSpace::Default => DEFAULT_RESERVE_MAX.min(share(DEFAULT_RESERVE_PERCENT)),
            MinFreeSpace::Bytes(b) => b,
            MinFreeSpace::Percent(p) => share(p),
        }
    }
}

impl std::str::FromStr for MinFreeSpace {
    type Err = String;

    /// `256MiB`, `64MB`, `1G`, `4096` (bytes), `5%`, or `default`.
    fn from_str(s: &str) -> Result<MinFreeSpace, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("default") {
            return Ok(MinFreeSpace::Default);
        }
        if let Some(p) = s.strip_suffix('%') {
            let p: f64 = p
                .trim()
                .parse()
                .map_err(|_| format!("{s:?} is not a percentage (e.g. 5%)"))?;
            if !(0.0..=100.0).contains(&p) || !p.is_finite() {
                return Err(format!("{s:?}: a percentage must be from 0% to 100%"));
            }
            return Ok(MinFreeSpace::Percent(p));
        }
        parse_bytes(s).map(MinFreeSpace::Bytes)
    }
}

impl fmt::Display for MinFreeSpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MinFreeSpace::Default => write!(
                f,
                "{} or {DEFAULT_RESERVE_PERCENT}% of the volume, whichever is smaller",
                Bytes(DEFAULT_RESERVE_MAX)
            ),
            MinFreeSpace::Bytes(b) => write!(f, "{}", Bytes(*b)),
            MinFreeSpace::Percent(p) => write!(f, "{p}% of the volume"),
        }
    }
}

/// A size with an optional unit: `B`, `KB`/`MB`/`GB`/`TB` (powers of 1000),
/// `K`/`KiB`/`Ki`, `M`/`MiB`/`Mi`, `G`/`GiB`/`Gi`, `T`/`TiB`/`Ti` (powers of
/// 1024), case-insensitive; a fraction is allowed (`1.5GiB`).
fn parse_bytes(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a size (e.g. 256MiB, 64MB, 1G, 5%)");
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let number: f64 = number.parse().map_err(|_| bad())?;
    let unit = unit.trim().to_ascii_lowercase();
    let scale: u64 = match unit.as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "mb" => 1000 * 1000,
        "gb" => 1000 * 1000 * 1000,
        "tb" => 1000 * 1000 * 1000 * 1000,
        "k" | "ki" | "kib" => KIB,
        "m" | "mi" | "mib" => MIB,
        "g" | "gi" | "gib" => GIB,
        "t" | "ti" | "tib" => TIB,
        _ => return Err(bad()),
    };
    let bytes = number * scale as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes.round() as u64)
}

/// A byte count for people: `512 B`, `5.9 MiB`, `1.2 GiB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        let (unit, size) = match n {
            _ if n >= TIB => ("TiB", TIB),
            _ if n >= GIB => ("GiB", GIB),
            _ if n >= MIB => ("MiB", MIB),
            _ if n >= KIB => ("KiB", KIB),
            _ => return write!(f, "{n} B"),
        };
        let v = n as f64 / size as f64;
        if n.is_multiple_of(size) {
            write!(f, "{} {unit}", n / size)
        } else {
            write!(f, "{v:.1} {unit}")
        }
    }
}

/// What one look at the volume found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Bytes available to the process (statvfs `f_bavail`).
    pub available: u64,
    /// The volume's size.
    pub total: u64,
}

/// Reads a volume's usage; [`statvfs`] outside tests.
pub type Probe = dyn Fn(&Path) -> std::io::Result<Usage> + Send + Sync;

/// The volume's usage from `statvfs(2)`.
pub fn statvfs(path: &Path) -> std::io::Result<Usage> {
    let s = fs2::statvfs(path)?;
    Ok(Usage {
        available: s.available_space(),
        total: s.total_space(),
    })
}

/// Watches the free space of one volume (see the module doc).
pub struct SpaceWatch {
    volume: PathBuf,
    setting: MinFreeSpace,
    probe: Box<Probe>,
    low: AtomicBool,
    free: AtomicU64,
    reserve: AtomicU64,
    /// Bytes committed since the last look.
    written: AtomicU64,
    /// Serialises looks, so entering and leaving low space log once each.
    looking: Mutex<LookState>,
}

#[derive(Debug, Default)]
struct LookState {
    /// The last look failed (logged once until one succeeds).
    failing: bool,
}

impl fmt::Debug for SpaceWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpaceWatch")
            .field("volume", &self.volume)
            .field("setting", &self.setting)
            .field("low", &self.is_low())
            .finish_non_exhaustive()
    }
}

impl SpaceWatch {
    /// Watches the volume of `volume` (the data directory) with `statvfs`,
    /// looking once now. Start the periodic look with [`SpaceWatch::spawn`].
    pub fn new(volume: &Path, setting: MinFreeSpace) -> Arc<SpaceWatch> {
        SpaceWatch::with_probe(volume, setting, Box::new(statvfs))
    }

    /// [`SpaceWatch::new`] with another way to read the usage (tests).
    pub fn with_probe(volume: &Path, setting: MinFreeSpace, probe: Box<Probe>) -> Arc<SpaceWatch> {
        let watch = Arc::new(SpaceWatch {
            volume: volume.to_path_buf(),
            setting,
            probe,
            low: AtomicBool::new(false),
            free: AtomicU64::new(u64::MAX),
            reserve: AtomicU64::new(0),
            written: AtomicU64::new(0),
            looking: Mutex::new(LookState::default()),
        });
        watch.refresh();
        watch
    }

    /// Starts the thread that looks every [`WATCH_INTERVAL`]; it ends once
    /// the watch is dropped.
    pub fn spawn(self: &Arc<Self>) -> std::io::Result<()> {
        let weak: Weak<SpaceWatch> = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("claw-space-watch".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(WATCH_INTERVAL);
                    let Some(watch) = weak.upgrade() else { return };
                    watch.refresh();
                }
            })
            .map(|_| ())
    }

    /// The watched directory.
    pub fn volume(&self) -> &Path {
        &self.volume
    }

    /// Whether writes are refused (one atomic load).
    pub fn is_low(&self) -> bool {
        self.low.load(Ordering::Acquire)
    }

    /// Bytes available at the last look.
    pub fn free(&self) -> u64 {
        self.free.load(Ordering::Relaxed)
    }

    /// The reserve at the last look.
    pub fn reserve(&self) -> u64 {
        self.reserve.load(Ordering::Relaxed)
    }

    /// Committed bytes after which the next commit looks again: a burst of
    /// writes between two ticks of the watcher must not eat the reserve.
    pub fn recheck_after(&self) -> u64 {
        (self.reserve() / 64).clamp(4 * KIB, 4 * MIB)
    }

    /// Looks at the volume now; returns whether writes are refused. A
    /// failed look keeps the previous state (logged once).
    pub fn refresh(&self) -> bool {
        let mut state = self.looking.lock();
        self.written.store(0, Ordering::Relaxed);
        let usage = match (self.probe)(&self.volume) {
            Ok(u) => u,
            Err(e) => {
                if !state.failing {
                    state.failing = true;
                    tracing::warn!(volume = %self.volume.display(), error = %e, "cannot read the free space of the data volume; the reserve is not checked until it can be");
                }
                return self.is_low();
            }
        };
        if state.failing {
            state.failing = false;
            tracing::info!(volume = %self.volume.display(), "reading the free space of the data volume again");
        }
        let reserve = self.setting.reserve(usage.total);
        let low = usage.available < reserve;
        self.free.store(usage.available, Ordering::Relaxed);
        self.reserve.store(reserve, Ordering::Relaxed);
        let was = self.low.swap(low, Ordering::AcqRel);
        metrics::gauge!(STORE_FREE_BYTES).set(usage.available as f64);
        metrics::gauge!(STORE_RESERVE_BYTES).set(reserve as f64);
        metrics::gauge!(STORE_LOW_SPACE).set(if low { 1.0 } else { 0.0 });
        match (was, low) {
            (false, true) => tracing::warn!(
                volume = %self.volume.display(),
                free = usage.available,
                reserve,
                "the data volume {} has {} free, below the reserve {}; writes are refused until space is freed",
                self.volume.display(),
                Bytes(usage.available),
                Bytes(reserve)
            ),
            (true, false) => tracing::info!(
                volume = %self.volume.display(),
                free = usage.available,
                reserve,
                "the data volume {} has {} free again (reserve {}); writes resume",
                self.volume.display(),
                Bytes(usage.available),
                Bytes(reserve)
            ),
            _ => {}
        }
        low
    }

    /// The error a refused write gets (from the last look).
    pub fn no_space(&self) -> StoreError {
        StoreError::NoSpace {
            volume: self.volume.clone(),
            free: self.free(),
            reserve: self.reserve(),
        }
    }

    /// Counts a refused write transaction and returns its error.
    fn refused(&self) -> StoreError {
        metrics::counter!(STORE_WRITES_REFUSED_TOTAL).increment(1);
        self.no_space()
    }

    /// Notes `n` committed bytes; looks again after [`Self::recheck_after`].
    fn wrote(&self, n: u64) {
        if n == 0 {
            return;
        }
        let total = self.written.fetch_add(n, Ordering::Relaxed) + n;
        if total >= self.recheck_after() {
            self.refresh();
        }
    }
}

/// A [`Store`] that refuses writes while its [`SpaceWatch`] says the volume
/// is below the reserve (see the module doc).
pub struct GuardedStore {
    inner: Arc<dyn Store>,
    watch: Arc<SpaceWatch>,
}

impl fmt::Debug for GuardedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuardedStore")
            .field("watch", &self.watch)
            .finish_non_exhaustive()
    }
}

impl GuardedStore {
    /// Guards `inner` with `watch`.
    pub fn new(inner: Arc<dyn Store>, watch: Arc<SpaceWatch>) -> GuardedStore {
        GuardedStore { inner, watch }
    }

    /// Guards `inner`, stored in `dir`, with a started watcher of `dir`'s
    /// volume.
    pub fn watching(
        inner: Arc<dyn Store>,
        dir: &Path,
        setting: MinFreeSpace,
    ) -> std::io::Result<GuardedStore> {
        let watch = SpaceWatch::new(dir, setting);
        watch.spawn()?;
        tracing::info!(
            volume = %dir.display(),
            free = watch.free(),
            reserve = watch.reserve(),
            "data volume: {} free, reserve {} ({setting})",
            Bytes(watch.free()),
            Bytes(watch.reserve())
        );
        Ok(GuardedStore::new(inner, watch))
    }

    /// The watcher.
    pub fn watch(&self) -> &Arc<SpaceWatch> {
        &self.watch
    }

    /// After the engine failed: look again, and name the space when that
    /// is what ran out.
    fn engine_failed(&self, e: StoreError) -> StoreError {
        match e {
            StoreError::Engine(_) | StoreError::VolumeFull { .. } if self.watch.refresh() => {
                tracing::warn!(error = %e, "a store write failed while the data volume is below the reserve");
                self.watch.refused()
            }
            e => e,
        }
    }
}

/// A transaction view that refuses every write while `low`, and counts the
/// bytes written otherwise.
struct GuardTxn<'a> {
    inner: &'a dyn Txn,
    low: bool,
    refused: &'a Cell<bool>,
    written: &'a Cell<u64>,
    watch: &'a SpaceWatch,
}

impl GuardTxn<'_> {
    fn writable(&self, bytes: usize) -> Result<(), StoreError> {
        if self.low {
            self.refused.set(true);
            return Err(self.watch.no_space());
        }
        self.written.set(self.written.get() + bytes as u64);
        Ok(())
    }
}

impl Txn for GuardTxn<'_> {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(tree, key)
    }

    fn insert(&self, tree: Tree, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.writable(key.len() + value.len())?;
        self.inner.insert(tree, key, value)
    }

    fn remove(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        // A removal is a write too (the log records it).
        self.writable(key.len())?;
        self.inner.remove(tree, key)
    }
}

impl Store for GuardedStore {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(tree, key)
    }

    fn scan(&self, tree: Tree) -> Result<Vec<Entry>, StoreError> {
        self.inner.scan(tree)
    }

    fn len(&self, tree: Tree) -> Result<usize, StoreError> {
        self.inner.len(tree)
    }

    fn range(
        &self,
        tree: Tree,
        start: &[u8],
        end: Option<&[u8]>,
        reverse: bool,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        self.inner.range(tree, start, end, reverse, limit)
    }

    fn transaction(&self, trees: &[Tree], body: &TxnBody<'_>) -> Result<bool, StoreError> {
        let low = self.watch.is_low();
        let refused = Cell::new(false);
        let written = Cell::new(0u64);
        let result = self.inner.transaction(trees, &|txn| {
            // The engine may run the body again (conflicts): start afresh.
            refused.set(false);
            written.set(0);
            let view = GuardTxn {
                inner: txn,
                low,
                refused: &refused,
                written: &written,
                watch: &self.watch,
            };
            let outcome = body(&view);
            if refused.get() {
                // Whatever the body made of the error: nothing commits.
                return Err(Rollback);
            }
            outcome
        });
        if refused.get() {
            return Err(self.watch.refused());
        }
        match result {
            Ok(committed) => {
                if committed {
                    self.watch.wrote(written.get());
                }
                Ok(committed)
            }
            Err(e) => Err(self.engine_failed(e)),
        }
    }

    fn export(&self, sink: &mut ExportSink<'_>) -> Result<u64, StoreError> {
        self.inner.export(sink)
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            match self.inner.flush().await {
                Ok(()) => Ok(()),
                Err(e) => Err(self.engine_failed(e)),
            }
        })
    }

    fn check(&self) -> Result<(), StoreError> {
        self.inner.check()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sled::SledStore;

    #[test]
    fn sizes_and_percentages_parse() {
        let p = |s: &str| s.parse::<MinFreeSpace>();
        assert_eq!(p("256MiB"), Ok(MinFreeSpace::Bytes(256 * MIB)));
        assert_eq!(p("64MB"), Ok(MinFreeSpace::Bytes(64_000_000)));
        assert_eq!(p("1G"), Ok(MinFreeSpace::Bytes(GIB)));
        assert_eq!(p("1.5 GiB"), Ok(MinFreeSpace::Bytes(GIB + GIB / 2)));
        assert_eq!(p("6Mi"), Ok(MinFreeSpace::Bytes(6 * MIB)));
        assert_eq!(p("4096"), Ok(MinFreeSpace::Bytes(4096)));
        assert_eq!(p("0"), Ok(MinFreeSpace::Bytes(0)));
        assert_eq!(p("5%"), Ok(MinFreeSpace::Percent(5.0)));
        assert_eq!(p("default"), Ok(MinFreeSpace::Default));
        for bad in ["", "MiB", "-1MiB", "12 parsecs", "101%", "x%", "1e400"] {
            let err = p(bad).expect_err(bad);
            assert!(err.contains(bad), "{err}");
        }
    }

    #[test]
    fn the_default_reserve_is_the_smaller_of_256_mib_and_5_percent() {
        let d = MinFreeSpace::Default;
        assert_eq!(d.reserve(100 * GIB), 256 * MIB);
        assert_eq!(
            d.reserve(24 * MIB),
            (24.0 * MIB as f64 * 0.05).round() as u64
        );
        assert_eq!(MinFreeSpace::Percent(10.0).reserve(1000), 100);
        assert_eq!(MinFreeSpace::Bytes(7).reserve(1000), 7);
        assert!(d.to_string().contains("256 MiB or 5% of the volume"), "{d}");
    }

    #[test]
    fn bytes_read_well() {
        assert_eq!(Bytes(512).to_string(), "512 B");
        assert_eq!(Bytes(6 * MIB).to_string(), "6 MiB");
        assert_eq!(Bytes(5 * MIB + MIB / 2).to_string(), "5.5 MiB");
        assert_eq!(Bytes(3 * GIB).to_string(), "3 GiB");
    }

    /// A volume whose free space the test sets.
    fn fake(free: Arc<AtomicU64>) -> Box<Probe> {
        Box::new(move |_| {
            Ok(Usage {
                available: free.load(Ordering::SeqCst),
                total: 100 * MIB,
            })
        })
    }

    fn guarded(free: &Arc<AtomicU64>) -> (tempfile::TempDir, GuardedStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let sled = SledStore::open(&dir.path().join("data")).expect("open");
        let watch = SpaceWatch::with_probe(
            dir.path(),
            MinFreeSpace::Bytes(10 * MIB),
            fake(free.clone()),
        );
        (dir, GuardedStore::new(Arc::new(sled), watch))
    }

    fn put(s: &dyn Store, k: &[u8]) -> Result<(), StoreError> {
        s.transact(&[Tree::Backends], |t| t.insert(Tree::Backends, k, b"v"))
    }

    #[test]
    fn below_the_reserve_writes_are_refused_and_reads_answer_until_space_returns() {
        let free = Arc::new(AtomicU64::new(50 * MIB));
        let (dir, g) = guarded(&free);
        let s: &dyn Store = &g;
        put(s, b"a").expect("room");
        free.store(9 * MIB, Ordering::SeqCst);
        assert!(g.watch().refresh(), "low");
        let err = put(s, b"b").expect_err("refused");
        let msg = err.to_string();
        assert!(matches!(err, StoreError::NoSpace { .. }), "{err:?}");
        assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
        assert!(
            msg.contains("has 9 MiB free, below the reserve 10 MiB"),
            "{msg}"
        );
        assert!(
            msg.contains("writes are refused until space is freed"),
            "{msg}"
        );
        // Reads, scans and read-only transactions still answer.
        assert_eq!(
            s.get(Tree::Backends, b"a").expect("get"),
            Some(b"v".to_vec())
        );
        assert_eq!(s.scan(Tree::Backends).expect("scan").len(), 1);
        let read: Result<Option<Vec<u8>>, StoreError> =
            s.transact(&[Tree::Backends], |t| t.get(Tree::Backends, b"a"));
        assert_eq!(read.expect("read-only txn"), Some(b"v".to_vec()));
        // A body that swallows the refusal commits nothing either.
        let swallowed: Result<(), StoreError> = s.transact(&[Tree::Backends], |t| {
            let _ = t.insert(Tree::Backends, b"c", b"v");
            let _ = t.remove(Tree::Backends, b"a");
            Ok(())
        });
        assert!(matches!(swallowed, Err(StoreError::NoSpace { .. })));
        assert_eq!(s.len(Tree::Backends).expect("len"), 1);
        assert!(s.get(Tree::Backends, b"a").expect("get").is_some());
        // Space returns: writes resume without anything else.
        free.store(11 * MIB, Ordering::SeqCst);
        assert!(!g.watch().refresh());
        put(s, b"b").expect("room again");
        assert_eq!(s.len(Tree::Backends).expect("len"), 2);
    }

    #[test]
    fn a_burst_of_writes_looks_again_before_the_next_tick() {
        let free = Arc::new(AtomicU64::new(50 * MIB));
        let (_dir, g) = guarded(&free);
        let s: &dyn Store = &g;
        free.store(MIB, Ordering::SeqCst);
        assert!(!g.watch().is_low(), "not looked yet");
        let big = vec![7u8; g.watch().recheck_after() as usize];
        let r: Result<(), StoreError> = s.transact(&[Tree::Backends], |t| {
            t.insert(Tree::Backends, b"big", &big)
        });
        r.expect("committed before the look");
        assert!(g.watch().is_low(), "the commit looked again");
        assert!(matches!(put(s, b"x"), Err(StoreError::NoSpace { .. })));
    }

    #[test]
    fn a_failed_look_keeps_the_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let w = SpaceWatch::with_probe(
            dir.path(),
            MinFreeSpace::Default,
            Box::new(|_| Err(std::io::Error::other("no statvfs here"))),
        );
        assert!(!w.is_low());
        assert!(!w.refresh());
    }

    #[test]
    fn statvfs_reads_a_real_volume() {
        let dir = tempfile::tempdir().expect("tempdir");
        let u = statvfs(dir.path()).expect("statvfs");
        assert!(u.total > 0 && u.available <= u.total, "{u:?}");
        let w = SpaceWatch::new(dir.path(), MinFreeSpace::Bytes(0));
        assert!(!w.is_low(), "a reserve of 0 never refuses");
    }
}
