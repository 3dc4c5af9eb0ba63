//! The usage journal (`--usage-journal PATH`): what this proxy answered,
//! kept on disk until the control plane has acknowledged it, so a proxy
//! killed (`kill -9`, OOM) bills every answered request after its restart.
//!
//! **What is written.** One file of records, each `[u32 length][u32
//! CRC-32][protobuf Record]` (little-endian), after an 8-byte magic:
//!
//! - an *outcome* record per request, written by the request path itself
//!   ([`OutcomeLog::send`]) as it hands the outcome to the report task: a
//!   `write(2)` and no `fsync`, so it survives the process, not the machine;
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
//! **Power loss** is not `kill -9`: outcome records not yet synced (at most
//! one report interval) are lost with the page cache; every batch the
//! control plane may have stored was synced first, so nothing is billed twice.

use std::fs::File;
use std::io::{Read, Write};
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
    file: Mutex<Arc<File>>,
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
        let file = self.file.lock();
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
        match (&**file).write_all(frame) {
            Ok(()) => {
                self.size
                    .store(size + frame.len() as u64, Ordering::Relaxed);
            }
            Err(e) => self.pause(&format!("cannot append to the usage journal: {e}")),
        }
        true
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
        let file = rewrite(&path, &epoch, 0, batches.iter().map(|(m, e)| (m, *e)))
            .with_context(|| format!("--usage-journal {}: cannot write it", path.display()))?;
        let size = file_len(&file);
        let log = Arc::new(OutcomeLog {
            file: Mutex::new(Arc::new(file)),
            size: AtomicU64::new(size),
            max_bytes: settings.max_bytes,
            paused: AtomicBool::new(false),
        });
        set_bytes(size);
        Ok(Opened {
            journal: Journal {
                path,
                log,
                epoch: epoch.clone(),
                dirty: false,
            },
            epoch,
            batches,
        })
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
        let file = self.log.file.lock();
        if let Err(e) = (&**file).write_all(&frame) {
            tracing::error!(error = %e, path = %self.path.display(), "usage journal: cannot append a batch; emptying it (a crash now loses the unacknowledged usage)");
            let _ = file.set_len(MAGIC.len() as u64);
            self.log.size.store(MAGIC.len() as u64, Ordering::Relaxed);
            self.log.paused.store(true, Ordering::Relaxed);
            return;
        }
        self.log
            .size
            .fetch_add(frame.len() as u64, Ordering::Relaxed);
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
        let file = self.log.file.lock();
        if (&**file).write_all(&frame).is_ok() {
            self.log
                .size
                .fetch_add(frame.len() as u64, Ordering::Relaxed);
        }
    }

    /// `fdatasync`s what was written since the last call: called before a
    /// batch is handed to the report stream. The sync runs on the blocking
    /// pool, so the runtime that also accepts connections is not held for
    /// the disk's latency; the caller waits for it before sending.
    pub(crate) async fn sync(&mut self) {
        if !self.dirty {
            return;
        }
        let file = self.log.file.lock().clone();
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
        let mut file = self.log.file.lock();
        let (r, outcomes_upto, batches) = hold();
        match rewrite(
            &self.path,
            &self.epoch,
            outcomes_upto,
            batches.iter().map(|(m, e)| (m, *e)),
        ) {
            Ok(f) => {
                let size = file_len(&f);
                *file = Arc::new(f);
                self.log.size.store(size, Ordering::Relaxed);
                self.log.paused.store(false, Ordering::Relaxed);
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

/// The framed outcome record of one request's usage row.
pub(crate) fn outcome_frame(row: UsageAggregate) -> Vec<u8> {
    frame(&Record {
        kind: KIND_OUTCOME,
        outcome: Some(row),
        ..Default::default()
    })
}

/// The encoded size of a batch record (for the bound).
pub(crate) fn batch_bytes(msg: &StreamReportsRequest) -> u64 {
    msg.encoded_len() as u64 + 32
}

fn file_len(f: &File) -> u64 {
    f.metadata().map_or(MAGIC.len() as u64, |m| m.len())
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
/// epoch record, syncs it and renames it over `path`; returns it open for
/// appending.
fn rewrite<'a>(
    path: &Path,
    epoch: &str,
    outcome_base: u64,
    batches: impl Iterator<Item = (&'a StreamReportsRequest, usize)>,
) -> std::io::Result<File> {
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
    std::fs::OpenOptions::new().append(true).open(path)
}

/// Reads every epoch's records; a torn or corrupt record ends the file.
fn read(path: &Path) -> std::io::Result<Vec<EpochRecords>> {
    let mut raw = Vec::new();
    match File::open(path) {
        Ok(mut f) => {
            f.read_to_end(&mut raw)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    }
    if raw.is_empty() {
        return Ok(Vec::new());
    }
    if !raw.starts_with(MAGIC) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not a usage journal (bad magic); move it away or point the flag elsewhere",
        ));
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
    while at < raw.len() {
        let Some(rec) = record_at(&raw, at) else {
            tracing::warn!(
                path = %path.display(),
                offset = at,
                dropped_bytes = raw.len() - at,
                "usage journal: a torn or corrupt record ends it; dropped from there"
            );
            torn();
            break;
        };
        let (r, len) = rec;
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

/// The record at `at` and its framed length, if whole and intact.
fn record_at(raw: &[u8], at: usize) -> Option<(Record, usize)> {
    let head = raw.get(at..at + 8)?;
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if len > MAX_RECORD {
        return None;
    }
    let body = raw.get(at + 8..at + 8 + len)?;
    if crc32(body) != crc {
        return None;
    }
    Some((Record::decode(body).ok()?, len + 8))
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

    fn append(path: &Path, r: &Record) {
        let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
        f.write_all(&frame(r)).unwrap();
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
            append(&s.path, &outcome(row(1)));
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
        append(&s.path, &outcome(row(1)));
        first.journal.sync().await;
        // A torn record: half a frame.
        let torn = frame(&outcome(row(100)));
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&s.path)
            .unwrap();
        f.write_all(&torn[..torn.len() / 2]).unwrap();
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
}
