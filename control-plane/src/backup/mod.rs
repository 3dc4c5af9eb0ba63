//! Backups: consistent point-in-time copies of the whole store, streamed
//! over gRPC (`BackupService.CreateBackup`) or written on a schedule, and
//! the offline restore into an empty data directory.
//!
//! - this file: [`write_backup`], the export of the store into a backup file
//!   (format in [`claw_proto::backup`]) under the store's export lock, and
//!   the audit record of a backup.
//! - `restore`: `claw-control-plane restore --from FILE --data-dir DIR`.
//! - [`schedule`]: scheduled backups, `--backup-dir --backup-every --backup-keep`.
//!
//! What a backup holds: every tree, bytes as stored. Provider keys stay
//! sealed under the master key, client keys and named tokens are hashes,
//! so a backup holds no plaintext secret; restoring it needs the same
//! master key. The audit record of a backup is written after the export, so
//! it is not inside the file it describes.

mod restore;
pub mod schedule;

use std::io::BufWriter;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use claw_proto::backup::{Summary, Writer};
use claw_proto::v1;

pub use restore::{RestoreReport, restore};

use crate::audit::{self, Actor, Change};
use crate::store::{Store, StoreError, Tree};

/// The names of every tree, as a backup file spells them.
pub(crate) fn tree_names() -> Vec<&'static str> {
    Tree::ALL.iter().map(|t| t.name()).collect()
}

/// A backup written to a temporary file.
#[derive(Debug)]
pub struct Written {
    /// The file; deleted when dropped unless persisted.
    pub file: tempfile::NamedTempFile,
    /// Its header.
    pub header: v1::BackupHeader,
    /// Its size, entry count and checksum.
    pub summary: Summary,
}

/// Exports the store into a new temporary file in `dir`, fsynced. Blocks
/// (run it in `spawn_blocking`): transactions wait while the store is
/// iterated, which is why the target is a local file and never a client.
pub fn write_backup(store: &dyn Store, dir: &Path) -> anyhow::Result<Written> {
    let file = tempfile::Builder::new()
        .prefix(".claw-backup-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    let out = BufWriter::with_capacity(
        256 * 1024,
        file.as_file()
            .try_clone()
            .context("opening the temporary file")?,
    );
    let mut sink = Sink {
        meta: Vec::new(),
        out: Some(out),
        writer: None,
    };
    let started = std::time::Instant::now();
    store.export(&mut |tree, key, value| sink.push(tree, key, value))?;
    let paused = started.elapsed();
    let (header, writer) = sink.writer()?;
    let (out, summary) = writer.finish()?;
    tracing::info!(
        entries = summary.entries,
        bytes = summary.size,
        writes_paused_ms = paused.as_millis() as u64,
        "store exported for a backup"
    );
    let out = out.into_inner().map_err(|e| e.into_error())?;
    out.sync_all().context("syncing the backup file")?;
    Ok(Written {
        file,
        header,
        summary,
    })
}

/// Receives the exported entries. The header names the configuration
/// version and master key id, which live in [`Tree::Meta`]; `Meta` comes
/// first in the export, so its few entries are held back until the first
/// entry of another tree, when the header can be written.
struct Sink<W: std::io::Write> {
    meta: Vec<(Vec<u8>, Vec<u8>)>,
    out: Option<W>,
    writer: Option<(v1::BackupHeader, Writer<W>)>,
}

impl<W: std::io::Write> Sink<W> {
    fn push(&mut self, tree: Tree, key: &[u8], value: &[u8]) -> std::io::Result<()> {
        if tree == Tree::Meta && self.writer.is_none() {
            self.meta.push((key.to_vec(), value.to_vec()));
            return Ok(());
        }
        let (_, w) = self.start()?;
        w.entry(tree.name(), key, value)
    }

    fn start(&mut self) -> std::io::Result<&mut (v1::BackupHeader, Writer<W>)> {
        if self.writer.is_none() {
            let out = self
                .out
                .take()
                .ok_or_else(|| std::io::Error::other("backup writer already finished"))?;
            let header = header_from_meta(&self.meta);
            let mut w = Writer::new(out, &header)?;
            for (k, v) in self.meta.drain(..) {
                w.entry(Tree::Meta.name(), &k, &v)?;
            }
            self.writer = Some((header, w));
        }
        self.writer
            .as_mut()
            .ok_or_else(|| std::io::Error::other("backup writer missing"))
    }

    fn writer(mut self) -> std::io::Result<(v1::BackupHeader, Writer<W>)> {
        self.start()?;
        self.writer
            .take()
            .ok_or_else(|| std::io::Error::other("backup writer missing"))
    }
}

/// The header of a backup of a store whose `Meta` entries are `meta`.
fn header_from_meta(meta: &[(Vec<u8>, Vec<u8>)]) -> v1::BackupHeader {
    let get = |k: &[u8]| meta.iter().find(|(key, _)| key == k).map(|(_, v)| v);
    let config_version = get(b"config_version")
        .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
        .map(u64::from_be_bytes)
        .unwrap_or_default();
    let schema_version = get(b"schema_version")
        .and_then(|v| <[u8; 4]>::try_from(v.as_slice()).ok())
        .map(u32::from_be_bytes)
        .unwrap_or_default();
    let master_key_id = get(b"master_key_id")
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default();
    v1::BackupHeader {
        format_version: claw_proto::backup::FORMAT_VERSION,
        created_at: crate::catalog::records::timestamp(crate::catalog::records::now_ms()),
        schema_version,
        config_version,
        master_key_id,
        server_version: env!("CARGO_PKG_VERSION").to_string(),
    }
}

/// Appends the audit record of a backup (kind `backup`, action `created`)
/// and makes it durable. `operation` names how it was made.
pub(crate) async fn audit_backup(
    store: &Arc<dyn Store>,
    actor: &Actor,
    operation: &str,
    written: &Written,
) -> Result<(), StoreError> {
    let field = |name: &str, value: String| v1::AuditFieldChange {
        field: name.to_string(),
        old_value: String::new(),
        new_value: value,
    };
    let change = Change {
        kind: "backup",
        id: written.summary.sha256_hex(),
        name: String::new(),
        action: "created",
        fields: vec![
            field("entries", written.summary.entries.to_string()),
            field("bytes", written.summary.size.to_string()),
            field("sha256", written.summary.sha256_hex()),
            field("config_version", written.header.config_version.to_string()),
        ],
    };
    let s: &dyn Store = store.as_ref();
    s.transact(&[Tree::Audit], |txn| {
        audit::append(txn, actor, operation, 0, &change)
    })?;
    store.flush().await
}

/// Flushes a file's directory, so a rename into it is durable.
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::fs::File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sled::SledStore;

    #[test]
    fn a_backup_holds_every_entry_with_the_header_from_meta() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(&dir.path().join("data")).expect("open");
        let s: &dyn Store = &store;
        let r: Result<(), StoreError> = s.transact(&[Tree::Meta, Tree::Audit], |t| {
            t.insert(Tree::Meta, b"config_version", &9u64.to_be_bytes())?;
            t.insert(Tree::Meta, b"master_key_id", b"mk_1")?;
            t.insert(Tree::Audit, b"a", b"1")
        });
        r.expect("commit");
        let written = write_backup(s, dir.path()).expect("backup");
        assert_eq!(written.header.config_version, 9);
        assert_eq!(written.header.master_key_id, "mk_1");
        assert_eq!(written.summary.entries, 3);
        let names = tree_names();
        let file = std::fs::File::open(written.file.path()).expect("open");
        let (header, summary) =
            claw_proto::backup::verify(std::io::BufReader::new(file), Some(&names))
                .expect("verifies");
        assert_eq!(header.config_version, 9);
        assert_eq!(summary, written.summary);
    }
}
