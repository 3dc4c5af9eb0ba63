//! The usage journal (`--usage-journal PATH`): what this proxy answered,
//! kept on disk until the control plane has acknowledged it, so a proxy
//! killed (`kill -9`, OOM) bills every answered request after its restart.
//!
//! **What is written.** One file of records, each `[u32 length][u32
//! CRC-32][protobuf Record]` (little-endian), after an 8-byte magic:
//!
//! - an *outcome* record per request, written by the request path itself
//!   ([`OutcomeLog::append_queued`]) as it hands the outcome to the report
//!   task: a copy into a shared memory map of the file (no system call, no
//!   `fsync`), so it survives the process, not the machine (see *Where
//!   records go*);
//! - a *batch* record per report batch cut ([`Journal::batch`]): the whole
//!   numbered `StreamReportsRequest` and how many of the epoch's outcome
//!   records it covers. Batch records are `fdatasync`ed before the batch is
//!   handed to the report stream ([`Journal::sync`]): batches are cut once
//!   per report interval (and at once after a 429), so that is at most one
//!   `fdatasync` per batch sent;
//! - an *ack* record when the control plane acknowledged (or the buffer
//!   dropped) a batch: not synced, a lost one only resends a batch the
//!   control plane recognises as a duplicate;
//! - an *epoch* record opening each process's records.
//!
//! **Order.** An outcome is appended and queued under one lock, so record
//! order is queue order and a batch covering the first *n* outcomes the
//! report task took covers exactly the first *n* outcome records.
//!
//! **Replay.** On start, every batch without its ack record is resent under
//! its original `(node, epoch, seq)` (the control plane stores a batch once
//! per identity, [`super::buffer`] sends them first), and the outcome
//! records no batch covers are summed into batches of the new epoch. The
//! file is then rewritten (temp file, `fsync`, rename) to hold only that.
//! A record whose length or CRC does not check (a torn write at a crash) ends
//! the file: it and what follows are dropped, with a log line.
//!
//! **Size.** The file is rewritten to what is unacknowledged whenever it
//! passes a quarter of its bound (and at start). At the bound, outcome
//! records are no longer written until the next rewrite (counted in
//! `claw_dp_usage_journal_skipped_total`), and a rewrite that cannot fit the
//! unacknowledged batches drops the oldest, counted in `dropped_events`.
//!
//! **Where records go.** The file is preallocated (`fallocate`) to its
//! capacity (the bound plus a quarter, room for batch records) and mapped
//! `MAP_SHARED`: a record is a `memcpy` into the page cache, which outlives
//! the process. Past the last record the file holds zeros, and a zero
//! length ends the records. Only where a write into a preallocated
//! mapping cannot fail (ext4, XFS, tmpfs: blocks are allocated up front;
//! on a copy-on-write filesystem a full volume would kill the process with
//! `SIGBUS`), and only if preallocation succeeds; elsewhere each record is
//! a `pwrite(2)`, and a failed one pauses the journal as above. The
//! `fdatasync` of a batch covers pages written through the map as well. A
//! lock file (`PATH.lock`, held while the proxy runs) keeps a second
//! proxy off the same journal.
//!
//! **Power loss** is not `kill -9`: outcome records not yet synced (at most
//! one report interval) are lost with the page cache; every batch the
//! control plane may have stored was synced first, so nothing is billed twice.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use anyhow::Context;
use claw_proto::v1::{StreamReportsRequest, UsageAggregate, UsageTotals};
use parking_lot::Mutex;
use prost::Message;

use crate::config::UsageJournal as JournalSettings;

/// First bytes of a journal file.
const MAGIC: &[u8; 8] = b"CLAWUJ1\n";
/// Largest record accepted when reading (a batch is far smaller).
const MAX_RECORD: usize = 16 * 1024 * 1024;

const KIND_EPOCH: u32 = 1;
const KIND_OUTCOME: u32 = 2;
const KIND_BATCH: u32 = 3;
const KIND_ACK: u32 = 4;

/// One journal record.
#[derive(Clone, PartialEq, prost::Message)]
struct Record {
    #[prost(uint32, tag = "1")]
    kind: u32,
    /// Epoch and ack records: the epoch.
    #[prost(string, tag = "2")]
    epoch: String,
    /// Epoch records: outcome records of this epoch before this file
    /// (`u64::MAX`: none follow).
    #[prost(uint64, tag = "3")]
    outcome_base: u64,
    #[prost(message, optional, tag = "4")]
    outcome: Option<UsageAggregate>,
    #[prost(message, optional, tag = "5")]
    batch: Option<StreamReportsRequest>,
    /// Batch records: the events the buffer counts it as.
    #[prost(uint64, tag = "6")]
    events: u64,
    /// Batch records: outcomes of the epoch covered by this and earlier batches.
    #[prost(uint64, tag = "7")]
    outcomes_upto: u64,
    /// Ack records: every batch of `epoch` up to this seq is released.
    #[prost(uint64, tag = "8")]
    seq: u64,
}

/// The request path's side: appends one outcome record per request.
pub(crate) struct OutcomeLog {
    sink: Mutex<Sink>,
    /// The end of the last record (where the next one goes).
    size: AtomicU64,
    max_bytes: u64,
    /// Outcome records are not written until the next rewrite (the bound
    /// was reached, or a write failed).
    paused: AtomicBool,
}

impl OutcomeLog {
    /// Whether outcome records are paused until the next rewrite.
    pub(crate) fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }

    /// Runs `queue` (hands the outcome to the report task) and, if it
    /// queued, appends `frame` ([`outcome_frame`]), both under the append
    /// lock: record order is queue order. Returns what `queue` returned.
    pub(crate) fn append_queued(&self, frame: &[u8], queue: impl FnOnce() -> bool) -> bool {
        let mut sink = self.sink.lock();
        if !queue() {
            return false;
        }
        if self.paused.load(Ordering::Relaxed) {
            return true;
        }
        let size = self.size.load(Ordering::Relaxed);
        if size + frame.len() as u64 > self.max_bytes {
            self.pause("the journal is full until its next rewrite");
            return true;
        }
        match sink.write_at(size, frame) {
            Ok(()) => {
                self.size
                    .store(size + frame.len() as u64, Ordering::Relaxed);
            }
            Err(e) => self.pause(&format!("cannot append to the usage journal: {e}")),
        }
        true
    }

    /// Appends a record the report task writes (batch, ack).
    fn append(&self, frame: &[u8]) -> std::io::Result<()> {
        let mut sink = self.sink.lock();
        let size = self.size.load(Ordering::Relaxed);
        sink.write_at(size, frame)?;
        self.size
            .store(size + frame.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn pause(&self, why: &str) {
        if !self.paused.swap(true, Ordering::Relaxed) {
            skipped();
            tracing::warn!(
                reason = why,
                "usage journal: outcomes not journaled until its next rewrite"
            );
        }
    }
}

/// The journal, owned by the report task (plus the [`OutcomeLog`] shared
/// with the request path).
pub(crate) struct Journal {
    path: PathBuf,
    log: Arc<OutcomeLog>,
    /// `PATH.lock`, locked while this process runs.
    _lock: File,
    epoch: String,
    /// Data written since the last `fdatasync`.
    dirty: bool,
}

/// What [`Journal::open`] recovered.
pub(crate) struct Opened {
    pub journal: Journal,
    /// The new process's epoch.
    pub epoch: String,
    /// Unacknowledged batches: earlier epochs' (replayed as they were) and
    /// the new epoch's (the outcomes no batch covered), with their events.
    pub batches: Vec<(StreamReportsRequest, usize)>,
}

/// One epoch's records, while reading.
#[derive(Default)]
struct EpochRecords {
    epoch: String,
    base: u64,
    outcomes: Vec<UsageAggregate>,
    batches: Vec<(StreamReportsRequest, usize, u64)>,
    acked: u64,
}

impl Journal {
    /// Opens (or creates) the journal at `settings.path` for a process of
    /// `node_id` with the new `epoch`, recovers what it holds, and rewrites
    /// it to that alone. `max_batch` bounds the usage rows of a recovered
    /// batch.
    pub(crate) fn open(
        settings: &JournalSettings,
        node_id: &str,
        epoch: String,
        max_batch: usize,
    ) -> anyhow::Result<Opened> {
        let path = settings.path.clone();
        let lock = lock(&path)?;
        let epochs = read(&path)
            .with_context(|| format!("--usage-journal {}: cannot read it", path.display()))?;
        let mut batches = Vec::new();
        let mut leftovers = Vec::new();
        for e in epochs {
            let covered = e
                .batches
                .iter()
                .map(|(_, _, upto)| *upto)
                .max()
                .unwrap_or(0)
                .max(e.base);
            for (msg, events, _) in e.batches {
                if msg.seq > e.acked {
                    batches.push((msg, events));
                }
            }
            if e.base != u64::MAX {
                let skip = usize::try_from(covered - e.base).unwrap_or(usize::MAX);
                leftovers.extend(e.outcomes.into_iter().skip(skip));
            }
        }
        let replayed = batches.len();
        let recovered_requests: u64 = leftovers
            .iter()
            .filter_map(|a| a.totals.as_ref())
            .map(|t| t.requests)
            .sum();
        for (i, rows) in summed(leftovers).chunks(max_batch.max(1)).enumerate() {
            let msg = StreamReportsRequest {
                node_id: node_id.to_string(),
                stream_epoch: epoch.clone(),
                seq: i as u64 + 1,
                usage_aggregates: rows.to_vec(),
                ..Default::default()
            };
            batches.push((msg, rows.len()));
        }
        if replayed > 0 || recovered_requests > 0 {
            tracing::info!(
                path = %path.display(),
                unacked_batches = replayed,
                recovered_requests,
                "usage journal: replaying what the control plane has not acknowledged"
            );
        }
        let capacity = capacity(settings.max_bytes);
        let size = rewrite(&path, &epoch, 0, batches.iter().map(|(m, e)| (m, *e)))
            .with_context(|| format!("--usage-journal {}: cannot write it", path.display()))?;
        let sink = Sink::open(&path, size, capacity)
            .with_context(|| format!("--usage-journal {}: cannot open it", path.display()))?;
        let log = Arc::new(OutcomeLog {
            sink: Mutex::new(sink),
            size: AtomicU64::new(size),
            max_bytes: settings.max_bytes,
            paused: AtomicBool::new(false),
        });
        set_bytes(size);
        Ok(Opened {
            journal: Journal {
                path,
                log,
                _lock: lock,
                epoch: epoch.clone(),
                dirty: false,
            },
            epoch,
            batches,
        })
    }

    /// Where the records end (the file itself is preallocated past it).
    #[cfg(test)]
    pub(crate) fn records_len(&self) -> u64 {
        self.log.size.load(Ordering::Relaxed)
    }

    /// The request path's side.
    pub(crate) fn outcome_log(&self) -> Arc<OutcomeLog> {
        self.log.clone()
    }

    /// Appends a batch record: `msg` (`events` events) covers the epoch's
    /// first `outcomes_upto` outcome records. A batch that cannot be
    /// journaled empties the journal (its outcome records must not be
    /// replayed once the batch may have been stored).
    pub(crate) fn batch(&mut self, msg: &StreamReportsRequest, events: usize, outcomes_upto: u64) {
        let frame = frame(&Record {
            kind: KIND_BATCH,
            batch: Some(msg.clone()),
            events: events as u64,
            outcomes_upto,
            ..Default::default()
        });
        if let Err(e) = self.log.append(&frame) {
            tracing::error!(error = %e, path = %self.path.display(), "usage journal: cannot append a batch; emptying it (a crash now loses the unacknowledged usage)");
            let _ = self.log.sink.lock().clear();
            self.log.size.store(MAGIC.len() as u64, Ordering::Relaxed);
            self.log.paused.store(true, Ordering::Relaxed);
            return;
        }
        self.dirty = true;
    }

    /// Records that every batch of `epoch` up to `seq` was acknowledged or
    /// dropped.
    pub(crate) fn released(&mut self, epoch: &str, seq: u64) {
        let frame = frame(&Record {
            kind: KIND_ACK,
            epoch: epoch.to_string(),
            seq,
            ..Default::default()
        });
        // A lost ack record only resends a batch the control plane
        // recognises as a duplicate.
        let _ = self.log.append(&frame);
    }

    /// `fdatasync`s what was written since the last call: called before a
    /// batch is handed to the report stream. The sync runs on the blocking
    /// pool, so the runtime that also accepts connections is not held for
    /// the disk's latency; the caller waits for it before sending.
    pub(crate) async fn sync(&mut self) {
        if !self.dirty {
            return;
        }
        let Some(file) = self.log.sink.lock().file() else {
            return;
        };
        // `fdatasync` writes back the pages written through the map too.
        let synced = tokio::task::spawn_blocking(move || file.sync_data()).await;
        match synced {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, path = %self.path.display(), "usage journal: fdatasync failed");
            }
            Err(e) => {
                tracing::warn!(error = %e, path = %self.path.display(), "usage journal: the fdatasync task failed");
            }
        }
        self.dirty = false;
        set_bytes(self.log.size.load(Ordering::Relaxed));
    }

    /// Whether the file should be rewritten: past a quarter of its bound,
    /// or outcome records are paused.
    pub(crate) fn wants_rewrite(&self) -> bool {
        self.log.paused.load(Ordering::Relaxed)
            || self.log.size.load(Ordering::Relaxed) > self.log.max_bytes / 4
    }

    /// The bound left for batches after a rewrite (half of it, so outcome
    /// records have room until the next).
    pub(crate) fn batch_room(&self) -> u64 {
        self.log.max_bytes / 2
    }

    /// Rewrites the file to `batches` (every batch held) while `hold`
    /// runs under the append lock: the caller takes every queued outcome
    /// and cuts, inside it, so that `outcomes_upto` outcomes are all
    /// covered and no record is appended meanwhile.
    pub(crate) fn rewrite_with<R>(
        &mut self,
        hold: impl FnOnce() -> (R, u64, Vec<(StreamReportsRequest, usize)>),
    ) -> R {
        let mut sink = self.log.sink.lock();
        let (r, outcomes_upto, batches) = hold();
        let written = rewrite(
            &self.path,
            &self.epoch,
            outcomes_upto,
            batches.iter().map(|(m, e)| (m, *e)),
        );
        match written {
            Ok(size) => {
                // The old file's preallocated space is freed before the new
                // one's is taken.
                *sink = Sink::Closed;
                match Sink::open(&self.path, size, capacity(self.log.max_bytes)) {
                    Ok(new) => {
                        *sink = new;
                        self.log.paused.store(false, Ordering::Relaxed);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, path = %self.path.display(), "usage journal: cannot open it after a rewrite");
                        self.log.paused.store(true, Ordering::Relaxed);
                    }
                }
                self.log.size.store(size, Ordering::Relaxed);
                self.dirty = false;
                set_bytes(size);
            }
            Err(e) => {
                tracing::error!(error = %e, path = %self.path.display(), "usage journal: cannot rewrite it");
            }
        }
        r
    }
}

/// One request's usage row, borrowed from its outcome: what the journal's
/// outcome record holds (a [`UsageAggregate`] of one request).
pub(crate) struct OutcomeRow<'a> {
    /// When the request started (the row's first and last time).
    pub started: std::time::SystemTime,
    pub client_key_id: &'a str,
    pub agent_id: &'a str,
    pub model: &'a str,
    pub backend_id: &'a str,
    pub run_kind: &'a str,
    pub totals: UsageTotals,
}

impl OutcomeRow<'_> {
    /// The row as the message it is encoded as.
    #[cfg(test)]
    pub(crate) fn to_aggregate(&self) -> UsageAggregate {
        UsageAggregate {
            first_time: Some(self.started.into()),
            last_time: Some(self.started.into()),
            client_key_id: self.client_key_id.into(),
            agent_id: self.agent_id.into(),
            model: self.model.into(),
            backend_id: self.backend_id.into(),
            totals: Some(self.totals),
            run_kind: self.run_kind.into(),
        }
    }
}

/// The framed outcome record of one request: the bytes of
/// `frame(&Record { kind: KIND_OUTCOME, outcome: Some(row as a
/// UsageAggregate) })`, encoded from the borrowed fields (one allocation,
/// the frame: this runs on the request path for every request).
pub(crate) fn outcome_frame(row: &OutcomeRow<'_>) -> Vec<u8> {
    use prost::encoding::{
        WireType, encode_key, encode_varint, encoded_len_varint, key_len, message,
    };
    let ts = prost_types::Timestamp::from(row.started);
    let strings = [
        (3, row.client_key_id),
        (4, row.agent_id),
        (5, row.model),
        (6, row.backend_id),
        (8, row.run_kind),
    ];
    let string_len = |tag: u32, s: &str| {
        if s.is_empty() {
            0
        } else {
            key_len(tag) + encoded_len_varint(s.len() as u64) + s.len()
        }
    };
    // UsageAggregate's fields in tag order: 1, 2 (times), 3-6, 7 (totals), 8.
    let aggregate_len = 2 * message::encoded_len(1, &ts)
        + strings
            .iter()
            .map(|&(t, s)| string_len(t, s))
            .sum::<usize>()
        + message::encoded_len(7, &row.totals);
    // Record: kind (1) then outcome (4).
    let body_len = key_len(1)
        + encoded_len_varint(u64::from(KIND_OUTCOME))
        + key_len(4)
        + encoded_len_varint(aggregate_len as u64)
        + aggregate_len;
    let mut out = Vec::with_capacity(8 + body_len);
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    encode_key(1, WireType::Varint, &mut out);
    encode_varint(u64::from(KIND_OUTCOME), &mut out);
    encode_key(4, WireType::LengthDelimited, &mut out);
    encode_varint(aggregate_len as u64, &mut out);
    message::encode(1, &ts, &mut out);
    message::encode(2, &ts, &mut out);
    let put = |out: &mut Vec<u8>, tag: u32, s: &str| {
        if !s.is_empty() {
            encode_key(tag, WireType::LengthDelimited, out);
            encode_varint(s.len() as u64, out);
            out.extend_from_slice(s.as_bytes());
        }
    };
    for &(tag, s) in &strings[..4] {
        put(&mut out, tag, s);
    }
    message::encode(7, &row.totals, &mut out);
    put(&mut out, 8, row.run_kind);
    let crc = crc32(&out[8..]);
    out[4..8].copy_from_slice(&crc.to_le_bytes());
    out
}

/// The encoded size of a batch record (for the bound).
pub(crate) fn batch_bytes(msg: &StreamReportsRequest) -> u64 {
    msg.encoded_len() as u64 + 32
}

/// The file's preallocated size for a bound of `max_bytes`: the bound
/// (where outcome records stop) plus a quarter for batch and ack records.
fn capacity(max_bytes: u64) -> u64 {
    max_bytes.saturating_add(max_bytes / 4)
}

/// Locks `PATH.lock` for this process (released when it exits, however it
/// exits): two proxies writing one journal would bill each other's usage.
fn lock(path: &Path) -> anyhow::Result<File> {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let lock_path = PathBuf::from(name);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("--usage-journal: cannot open {}", lock_path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "--usage-journal {}: another process holds {} (each proxy needs a journal of its own)",
            path.display(),
            lock_path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("--usage-journal: cannot lock {}", lock_path.display()))
        }
    }
}

/// Where records are written (module doc, *Where records go*).
enum Sink {
    /// The file, preallocated to the map's length and mapped shared.
    Mapped {
        file: Arc<File>,
        map: memmap2::MmapMut,
    },
    /// The file, written with `pwrite(2)`.
    Written(Arc<File>),
    /// Between a rewrite and the reopening of its result.
    Closed,
}

/// Filesystems on which blocks preallocated with `fallocate` are written in
/// place, so a store into the map cannot meet a full volume (`statfs`
/// magic numbers: ext2/3/4, XFS, tmpfs).
const MAPPABLE_FILESYSTEMS: [i64; 3] = [0xEF53, 0x5846_5342, 0x0102_1994];

impl Sink {
    /// Opens the journal at `path`, whose records end at `len`, for
    /// writing: mapped at `capacity` where that is safe, else written.
    fn open(path: &Path, len: u64, capacity: u64) -> std::io::Result<Sink> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        #[cfg(test)]
        if tests::NO_MAP.get() {
            return Ok(Sink::Written(Arc::new(file)));
        }
        match Self::map(&file, len, capacity) {
            Ok(map) => Ok(Sink::Mapped {
                file: Arc::new(file),
                map,
            }),
            Err(why) => {
                // Nothing was left past the records (a failed preallocation
                // is undone), so writes continue at `len`.
                tracing::info!(path = %path.display(), reason = %why, "usage journal: records are written with pwrite, not a memory map");
                Ok(Sink::Written(Arc::new(file)))
            }
        }
    }

    /// Preallocates `file` to `capacity` and maps it; on failure the file
    /// is left at `len`.
    fn map(file: &File, len: u64, capacity: u64) -> Result<memmap2::MmapMut, String> {
        let fs_type = rustix::fs::fstatfs(file).map_err(|e| format!("statfs: {e}"))?;
        #[allow(clippy::unnecessary_cast)] // `f_type`'s width differs by platform.
        let magic = fs_type.f_type as i64;
        if !MAPPABLE_FILESYSTEMS.contains(&magic) {
            return Err(format!(
                "filesystem type {magic:#x} may fail a write into preallocated space"
            ));
        }
        let map_len = usize::try_from(capacity).map_err(|_| "capacity too large".to_string())?;
        if capacity <= len {
            return Err("no room left to preallocate".into());
        }
        let undo = |why: String| {
            let _ = file.set_len(len);
            why
        };
        rustix::fs::fallocate(
            file,
            rustix::fs::FallocateFlags::empty(),
            len,
            capacity - len,
        )
        .map_err(|e| undo(format!("fallocate: {e}")))?;
        // SAFETY: the mapping is of a file this process created (by rename
        // from its own temporary file) and guards with `PATH.lock`; it is
        // never truncated while mapped (a rewrite replaces it by rename and
        // drops this map first), and its blocks were allocated above on a
        // filesystem that writes them in place, so no store into the map can
        // fault. Other processes writing the file break the lock's contract,
        // as they would with any data file.
        #[allow(unsafe_code)]
        let map = unsafe { memmap2::MmapOptions::new().len(map_len).map_mut(file) };
        map.map_err(|e| undo(format!("mmap: {e}")))
    }

    /// Writes `frame` at offset `at` (the end of the records).
    fn write_at(&mut self, at: u64, frame: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::Mapped { map, .. } => {
                let dst = usize::try_from(at)
                    .ok()
                    .and_then(|start| map.get_mut(start..start.checked_add(frame.len())?))
                    .ok_or_else(|| {
                        std::io::Error::new(
                            std::io::ErrorKind::StorageFull,
                            "the journal's preallocated space is used up",
                        )
                    })?;
                dst.copy_from_slice(frame);
                Ok(())
            }
            Sink::Written(file) => file.write_all_at(frame, at),
            Sink::Closed => Err(std::io::Error::other("the journal is not open")),
        }
    }

    /// Ends the records right after the magic (everything after it is
    /// then unreachable: a zero length ends the records).
    fn clear(&mut self) -> std::io::Result<()> {
        let zeros = [0u8; 8];
        match self {
            Sink::Mapped { .. } => self.write_at(MAGIC.len() as u64, &zeros),
            Sink::Written(file) => file.set_len(MAGIC.len() as u64),
            Sink::Closed => Ok(()),
        }
    }

    /// The file, for `fdatasync`.
    fn file(&self) -> Option<Arc<File>> {
        match self {
            Sink::Mapped { file, .. } | Sink::Written(file) => Some(file.clone()),
            Sink::Closed => None,
        }
    }
}

/// `[len][crc][record]`.
fn frame(r: &Record) -> Vec<u8> {
    let body = r.encode_to_vec();
    let mut out = Vec::with_capacity(body.len() + 8);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Writes a fresh journal next to `path` holding `batches` (earlier
/// epochs first, each opened by its epoch record) and this process's
/// epoch record, syncs it and renames it over `path`; returns its length.
fn rewrite<'a>(
    path: &Path,
    epoch: &str,
    outcome_base: u64,
    batches: impl Iterator<Item = (&'a StreamReportsRequest, usize)>,
) -> std::io::Result<u64> {
    let tmp = path.with_extension("rewrite");
    let mut buf = Vec::with_capacity(64 * 1024);
    buf.extend_from_slice(MAGIC);
    let mut mine = Vec::new();
    let mut last_epoch: Option<String> = None;
    for (msg, events) in batches {
        let rec = Record {
            kind: KIND_BATCH,
            batch: Some(msg.clone()),
            events: events as u64,
            outcomes_upto: 0,
            ..Default::default()
        };
        if msg.stream_epoch == epoch {
            mine.push(rec);
            continue;
        }
        if last_epoch.as_deref() != Some(msg.stream_epoch.as_str()) {
            buf.extend_from_slice(&frame(&Record {
                kind: KIND_EPOCH,
                epoch: msg.stream_epoch.clone(),
                outcome_base: u64::MAX,
                ..Default::default()
            }));
            last_epoch = Some(msg.stream_epoch.clone());
        }
        buf.extend_from_slice(&frame(&rec));
    }
    buf.extend_from_slice(&frame(&Record {
        kind: KIND_EPOCH,
        epoch: epoch.to_string(),
        outcome_base,
        ..Default::default()
    }));
    for mut rec in mine {
        rec.outcomes_upto = outcome_base;
        buf.extend_from_slice(&frame(&rec));
    }
    {
        use std::io::Write as _;
        let mut f = File::create(&tmp)?;
        f.write_all(&buf)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(d) = File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(buf.len() as u64)
}

/// Reads every epoch's records; a torn or corrupt record ends the file, and
/// so do zeros (the preallocated rest of it). Reads record by record: a
/// file preallocated to its capacity is not read whole into memory.
fn read(path: &Path) -> std::io::Result<Vec<EpochRecords>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut reader = std::io::BufReader::with_capacity(256 * 1024, file);
    let mut magic = [0u8; 8];
    match read_full(&mut reader, &mut magic)? {
        0 => return Ok(Vec::new()),
        8 if magic == *MAGIC => {}
        _ => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "not a usage journal (bad magic); move it away or point the flag elsewhere",
            ));
        }
    }
    let mut epochs: Vec<EpochRecords> = Vec::new();
    let mut current: Option<usize> = None;
    let mut at = MAGIC.len();
    let index = |epochs: &mut Vec<EpochRecords>, epoch: &str| -> usize {
        match epochs.iter().position(|e| e.epoch == epoch) {
            Some(i) => i,
            None => {
                epochs.push(EpochRecords {
                    epoch: epoch.to_string(),
                    ..Default::default()
                });
                epochs.len() - 1
            }
        }
    };
    while let Some(r) = next_record(&mut reader)? {
        let Some((r, len)) = r else {
            tracing::warn!(
                path = %path.display(),
                offset = at,
                "usage journal: a torn or corrupt record ends it; dropped from there"
            );
            torn();
            break;
        };
        at += len;
        match r.kind {
            KIND_EPOCH => {
                let i = index(&mut epochs, &r.epoch);
                epochs[i].base = r.outcome_base;
                current = Some(i);
            }
            KIND_OUTCOME => {
                if let (Some(i), Some(o)) = (current, r.outcome) {
                    epochs[i].outcomes.push(o);
                }
            }
            KIND_BATCH => {
                if let Some(b) = r.batch {
                    let i = index(&mut epochs, &b.stream_epoch);
                    let events = usize::try_from(r.events).unwrap_or(usize::MAX);
                    epochs[i].batches.push((b, events, r.outcomes_upto));
                }
            }
            KIND_ACK => {
                let i = index(&mut epochs, &r.epoch);
                epochs[i].acked = epochs[i].acked.max(r.seq);
            }
            _ => {}
        }
    }
    Ok(epochs)
}

/// The next record and its framed length: `None` at the end of the
/// records (end of file, or zeros), `Some(None)` for a torn or corrupt one.
#[allow(clippy::option_option)]
fn next_record(r: &mut impl Read) -> std::io::Result<Option<Option<(Record, usize)>>> {
    let mut head = [0u8; 8];
    let n = read_full(r, &mut head)?;
    if n == 0 || head[..4] == [0; 4] {
        return Ok(None);
    }
    if n < head.len() {
        return Ok(Some(None));
    }
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if len > MAX_RECORD {
        return Ok(Some(None));
    }
    let mut body = vec![0u8; len];
    if read_full(r, &mut body)? < len || crc32(&body) != crc {
        return Ok(Some(None));
    }
    Ok(Some(
        Record::decode(&body[..]).ok().map(|rec| (rec, len + 8)),
    ))
}

/// Reads into `buf` until it is full or the file ends; returns how much
/// was read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Outcome rows summed per usage bucket (UTC hour and dimensions).
fn summed(rows: Vec<UsageAggregate>) -> Vec<UsageAggregate> {
    let mut out: Vec<UsageAggregate> = Vec::new();
    let mut index = std::collections::HashMap::new();
    for a in rows {
        let hour = a
            .first_time
            .as_ref()
            .map_or(0, |t| t.seconds.div_euclid(3600));
        let key = (
            hour,
            a.client_key_id.clone(),
            a.agent_id.clone(),
            a.model.clone(),
            a.backend_id.clone(),
            a.run_kind.clone(),
        );
        match index.get(&key) {
            Some(&i) => {
                let s: &mut UsageAggregate = &mut out[i];
                let t = a.totals.unwrap_or_default();
                *s.totals.get_or_insert_with(UsageTotals::default) += &t;
                if first(&a) < first(s) {
                    s.first_time = a.first_time;
                }
                if last(&a) > last(s) {
                    s.last_time = a.last_time;
                }
            }
            None => {
                index.insert(key, out.len());
                out.push(a);
            }
        }
    }
    out
}

/// A row's first and last times, comparable.
fn first(a: &UsageAggregate) -> (i64, i32) {
    a.first_time
        .as_ref()
        .map_or((0, 0), |t| (t.seconds, t.nanos))
}

fn last(a: &UsageAggregate) -> (i64, i32) {
    a.last_time
        .as_ref()
        .map_or((0, 0), |t| (t.seconds, t.nanos))
}

/// Outcome records not written because the journal was full or a write
/// failed (until the next rewrite).
const SKIPPED_TOTAL: &str = "claw_dp_usage_journal_skipped_total";
/// Journals whose reading stopped at a torn or corrupt record.
const TORN_TOTAL: &str = "claw_dp_usage_journal_torn_total";
/// The journal file's size.
const BYTES: &str = "claw_dp_usage_journal_bytes";

/// Describes the journal's metrics (once the recorder is installed).
pub(crate) fn describe() {
    metrics::describe_counter!(
        SKIPPED_TOTAL,
        "Times the usage journal stopped journaling outcomes until its next rewrite (full, or a write failed)"
    );
    metrics::describe_counter!(
        TORN_TOTAL,
        "Usage journals whose reading at start-up stopped at a torn or corrupt record"
    );
    metrics::describe_gauge!(
        BYTES,
        metrics::Unit::Bytes,
        "Size of the usage journal file"
    );
    metrics::counter!(SKIPPED_TOTAL).increment(0);
    metrics::counter!(TORN_TOTAL)
        .increment(u64::from(TORN_AT_START.swap(false, Ordering::Relaxed)));
}

fn skipped() {
    metrics::counter!(SKIPPED_TOTAL).increment(1);
}

/// A torn record was found at start-up (counted once the recorder is up).
static TORN_AT_START: AtomicBool = AtomicBool::new(false);

fn torn() {
    TORN_AT_START.store(true, Ordering::Relaxed);
}

fn set_bytes(n: u64) {
    metrics::gauge!(BYTES).set(n as f64);
}

/// CRC-32 (IEEE) of a record body (`crc32fast`: SIMD where the CPU has it).
fn crc32(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        /// Journals opened on this thread are written with `pwrite`.
        pub(super) static NO_MAP: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    fn settings(dir: &tempfile::TempDir) -> JournalSettings {
        JournalSettings {
            path: dir.path().join("usage.journal"),
            max_bytes: crate::config::DEFAULT_USAGE_JOURNAL_BYTES,
        }
    }

    fn row(requests: u64) -> UsageAggregate {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(7200);
        UsageAggregate {
            first_time: Some(at.into()),
            last_time: Some(at.into()),
            client_key_id: "ck".into(),
            model: "m".into(),
            totals: Some(UsageTotals {
                requests,
                prompt_tokens: 10 * requests,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Appends through the request path's side, as a queued outcome.
    fn append(j: &Journal, r: &Record) {
        assert!(j.outcome_log().append_queued(&frame(r), || true));
    }

    /// Where the records of the file at `path` end.
    fn records_end(path: &Path) -> u64 {
        let mut f = std::io::BufReader::new(File::open(path).unwrap());
        let mut magic = [0u8; 8];
        read_full(&mut f, &mut magic).unwrap();
        let mut at = MAGIC.len() as u64;
        while let Some(Some((_, len))) = next_record(&mut f).unwrap() {
            at += len as u64;
        }
        at
    }

    fn outcome(r: UsageAggregate) -> Record {
        Record {
            kind: KIND_OUTCOME,
            outcome: Some(r),
            ..Default::default()
        }
    }

    #[test]
    fn crc32_is_the_ieee_one() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    /// The request path's hand-encoded outcome frame is byte for byte the
    /// framed message, with empty and non-empty fields alike.
    #[test]
    fn outcome_frames_are_the_framed_message() {
        let at = std::time::UNIX_EPOCH + std::time::Duration::new(1_790_000_000, 123_456_789);
        let full = OutcomeRow {
            started: at,
            client_key_id: "ck_1",
            agent_id: "agent-é",
            model: "gpt-4o",
            backend_id: "be_2",
            run_kind: "heartbeat",
            totals: UsageTotals {
                requests: 1,
                errors: 1,
                prompt_tokens: 300_000,
                completion_tokens: 7,
                cache_read_tokens: 1 << 40,
                total_tokens: 300_007,
                cost: 0.125,
                streamed: 1,
                latency_ms_sum: 12,
                cache_write_tokens: 3,
                translated: 1,
            },
        };
        let sparse = OutcomeRow {
            started: std::time::UNIX_EPOCH + std::time::Duration::from_secs(60),
            client_key_id: "",
            agent_id: "",
            model: "m",
            backend_id: "",
            run_kind: "",
            totals: UsageTotals {
                requests: 1,
                ..Default::default()
            },
        };
        for row in [full, sparse] {
            let expected = frame(&outcome(row.to_aggregate()));
            assert_eq!(outcome_frame(&row), expected);
        }
    }

    /// Unacknowledged batches come back as they were; acknowledged ones
    /// and covered outcomes do not; uncovered outcomes come back summed
    /// under the new epoch; a torn last record is dropped.
    #[tokio::test]
    async fn replays_the_unacknowledged_and_drops_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(&dir);
        let mut first = Journal::open(&s, "n1", "e1".into(), 500).unwrap();
        assert!(first.batches.is_empty());
        for _ in 0..3 {
            append(&first.journal, &outcome(row(1)));
        }
        let batch = |seq: u64| StreamReportsRequest {
            node_id: "n1".into(),
            stream_epoch: "e1".into(),
            seq,
            usage_aggregates: vec![row(1)],
            ..Default::default()
        };
        first.journal.batch(&batch(1), 1, 1);
        first.journal.batch(&batch(2), 1, 2);
        first.journal.released("e1", 1);
        // Outcome 3 is not in a batch; outcome 4 is written after it.
        append(&first.journal, &outcome(row(1)));
        first.journal.sync().await;
        // The process ends (its lock with it); a torn record: half a frame.
        drop(first);
        let torn = frame(&outcome(row(100)));
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&s.path)
            .unwrap();
        f.write_all_at(&torn[..torn.len() / 2], records_end(&s.path))
            .unwrap();
        drop(f);

        let second = Journal::open(&s, "n1", "e2".into(), 500).unwrap();
        let got: Vec<(String, u64, u64)> = second
            .batches
            .iter()
            .map(|(m, _)| {
                let requests = m
                    .usage_aggregates
                    .iter()
                    .map(|a| a.totals.unwrap().requests)
                    .sum();
                (m.stream_epoch.clone(), m.seq, requests)
            })
            .collect();
        assert_eq!(got, vec![("e1".into(), 2, 1), ("e2".into(), 1, 2)]);
        // The rewritten file replays the same after another crash.
        drop(second);
        let third = Journal::open(&s, "n1", "e3".into(), 500).unwrap();
        let ids: Vec<(String, u64)> = third
            .batches
            .iter()
            .map(|(m, _)| (m.stream_epoch.clone(), m.seq))
            .collect();
        assert_eq!(ids, vec![("e1".into(), 2), ("e2".into(), 1)]);
    }

    #[test]
    fn a_file_that_is_not_a_journal_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(&dir);
        std::fs::write(&s.path, b"hello").unwrap();
        let e = Journal::open(&s, "n1", "e1".into(), 500).err().unwrap();
        assert!(format!("{e:#}").contains("--usage-journal"), "{e:#}");
    }

    /// Outcomes appended and never synced, the process gone: the next
    /// open replays them, whether records went through the map (the file
    /// then is preallocated to its capacity) or through `pwrite`.
    #[test]
    fn unsynced_outcomes_are_replayed_mapped_or_written() {
        for no_map in [false, true] {
            NO_MAP.set(no_map);
            let dir = tempfile::tempdir().unwrap();
            let s = settings(&dir);
            let first = Journal::open(&s, "n1", "e1".into(), 500).unwrap();
            let mapped = matches!(*first.journal.log.sink.lock(), Sink::Mapped { .. });
            assert_eq!(mapped, !no_map, "a journal on {} ", dir.path().display());
            for _ in 0..7 {
                append(&first.journal, &outcome(row(1)));
            }
            let len = std::fs::metadata(&s.path).unwrap().len();
            if mapped {
                assert_eq!(len, capacity(s.max_bytes));
            } else {
                assert_eq!(len, first.journal.records_len());
            }
            drop(first);
            let second = Journal::open(&s, "n1", "e2".into(), 500).unwrap();
            let requests: u64 = second
                .batches
                .iter()
                .flat_map(|(m, _)| &m.usage_aggregates)
                .map(|a| a.totals.unwrap().requests)
                .sum();
            assert_eq!(requests, 7, "no_map={no_map}");
            NO_MAP.set(false);
        }
    }

    /// A journal another live process (here: another open) holds is
    /// refused, naming the lock; once it is released the open succeeds.
    #[test]
    fn a_journal_in_use_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(&dir);
        let first = Journal::open(&s, "n1", "e1".into(), 500).unwrap();
        let e = Journal::open(&s, "n2", "e2".into(), 500).err().unwrap();
        let e = format!("{e:#}");
        assert!(
            e.contains("usage.journal.lock") && e.contains("another process"),
            "{e}"
        );
        drop(first);
        Journal::open(&s, "n2", "e2".into(), 500).unwrap();
    }

    /// A batch record that does not fit the preallocated space empties the
    /// journal (its outcomes must not be replayed once the batch may be
    /// stored): the next open finds nothing.
    #[test]
    fn a_batch_past_the_capacity_empties_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let s = JournalSettings {
            max_bytes: 4096,
            ..settings(&dir)
        };
        let mut first = Journal::open(&s, "n1", "e1".into(), 500).unwrap();
        append(&first.journal, &outcome(row(1)));
        let big = StreamReportsRequest {
            node_id: "n1".into(),
            stream_epoch: "e1".into(),
            seq: 1,
            usage_aggregates: vec![row(1); 1000],
            ..Default::default()
        };
        first.journal.batch(&big, 1000, 1);
        assert!(first.journal.log.is_paused());
        drop(first);
        let second = Journal::open(&s, "n1", "e2".into(), 500).unwrap();
        assert!(second.batches.is_empty());
    }
}
