//! The offline restore: a verified backup file into an empty data directory.
//!
//! Two passes over the file: the first verifies all of it (magic, frames,
//! tree names, count, checksum), so a damaged file is refused before
//! anything is written; the second imports it, and still undoes everything
//! on an error (the file may change between the passes). The restored store
//! gets a new lineage, so proxies that saw a higher configuration version
//! from the old store accept its (possibly lower) version. The import's
//! final flush writes the directory's high-water mark
//! ([`crate::store::watermark`]) from the restored store.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use anyhow::Context as _;
use claw_proto::backup::Reader;

use crate::catalog::{META_LINEAGE, SCHEMA_VERSION};
use crate::store::sled::SledStore;
use crate::store::{Store, StoreError, Tree};

/// What a restore wrote.
#[derive(Debug, Clone, Default)]
pub struct RestoreReport {
    /// Entries written.
    pub entries: u64,
    /// Configuration version of the restored store.
    pub config_version: u64,
    /// Id of the master key its provider keys are sealed under: the
    /// restored control plane must be started with that key.
    pub master_key_id: String,
}

/// Entries written per transaction while importing.
const BATCH: usize = 1000;

/// Restores the backup file `from` into the empty directory `data_dir`.
pub fn restore(from: &Path, data_dir: &Path) -> anyhow::Result<RestoreReport> {
    let created = check_target(data_dir)?;
    let names = super::tree_names();
    let file = from.display();
    // Pass 1: the whole file, before anything is written.
    let open = || {
        File::open(from)
            .map(BufReader::new)
            .with_context(|| format!("cannot open backup file {file}"))
    };
    let (header, _) =
        claw_proto::backup::verify(open()?, Some(&names)).map_err(|e| e.in_file(&file))?;
    if header.schema_version > SCHEMA_VERSION {
        anyhow::bail!(
            "backup file {file} has schema version {} but this control plane supports up to {SCHEMA_VERSION}: restore it with a newer version",
            header.schema_version
        );
    }
    // Pass 2: import.
    let result =
        import(open()?, &names, data_dir).map_err(|e| e.context(format!("restoring {file}")));
    if result.is_err() {
        undo(data_dir, created);
    }
    result
}

/// Refuses a target that is not a missing or empty directory; returns
/// whether the restore creates it.
fn check_target(data_dir: &Path) -> anyhow::Result<bool> {
    let dir = data_dir.display();
    match std::fs::read_dir(data_dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                anyhow::bail!(
                    "data directory {dir} is not empty: restore only into a new or empty directory"
                );
            }
            Ok(false)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) if data_dir.exists() && !data_dir.is_dir() => {
            Err(anyhow::anyhow!("{dir} is not a directory ({e})"))
        }
        Err(e) => Err(anyhow::anyhow!("cannot read data directory {dir}: {e}")),
    }
}

fn import(
    input: BufReader<File>,
    names: &[&'static str],
    data_dir: &Path,
) -> anyhow::Result<RestoreReport> {
    let store = SledStore::open(data_dir)?;
    let mut reader = Reader::new(input, Some(names)).map_err(anyhow::Error::from)?;
    let config_version = reader.header().config_version;
    let master_key_id = reader.header().master_key_id.clone();
    let mut batch: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(BATCH);
    let mut batch_tree = Tree::Meta;
    let mut entries = 0u64;
    while let Some(e) = reader.next_entry()? {
        let tree = Tree::ALL
            .into_iter()
            .find(|t| t.name() == e.tree)
            .with_context(|| format!("unknown tree `{}`", e.tree))?;
        if tree != batch_tree || batch.len() >= BATCH {
            write_batch(&store, batch_tree, &batch)?;
            batch.clear();
            batch_tree = tree;
        }
        batch.push((e.key, e.value));
        entries += 1;
    }
    write_batch(&store, batch_tree, &batch)?;
    // A new lineage: the restored store is a new history of configuration.
    let lineage = new_lineage();
    let s: &dyn Store = &store;
    s.transact(&[Tree::Meta], |t| {
        t.insert(Tree::Meta, META_LINEAGE, lineage.as_bytes())
    })?;
    store.flush_blocking()?;
    Ok(RestoreReport {
        entries,
        config_version,
        master_key_id,
    })
}

fn write_batch(
    store: &SledStore,
    tree: Tree,
    batch: &[(Vec<u8>, Vec<u8>)],
) -> Result<(), StoreError> {
    if batch.is_empty() {
        return Ok(());
    }
    let s: &dyn Store = store;
    s.transact(&[tree], |t| {
        for (k, v) in batch {
            t.insert(tree, k, v)?;
        }
        Ok(())
    })
}

/// `ln_` and 16 random hex digits.
fn new_lineage() -> String {
    use rand::RngCore as _;
    let mut bytes = [0u8; 8];
    rand::rng().fill_bytes(&mut bytes);
    format!("ln_{}", hex::encode(bytes))
}

/// Removes what a failed restore wrote: the directory if it created it,
/// else its contents.
fn undo(data_dir: &Path, created: bool) {
    let result = if created {
        std::fs::remove_dir_all(data_dir)
    } else {
        std::fs::read_dir(data_dir).and_then(|entries| {
            for e in entries {
                let p = e?.path();
                if p.is_dir() {
                    std::fs::remove_dir_all(&p)?;
                } else {
                    std::fs::remove_file(&p)?;
                }
            }
            Ok(())
        })
    };
    if let Err(e) = result {
        eprintln!(
            "claw-control-plane: warning: cannot remove what the failed restore wrote in {}: {e}",
            data_dir.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backup_of(entries: &[(Tree, &[u8], &[u8])]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(&dir.path().join("src")).expect("open");
        let s: &dyn Store = &store;
        for (t, k, v) in entries {
            let r: Result<(), StoreError> = s.transact(&[*t], |txn| txn.insert(*t, k, v));
            r.expect("commit");
        }
        let written = super::super::write_backup(s, dir.path()).expect("backup");
        let path = dir.path().join("b.clawbak");
        written.file.persist(&path).expect("persist");
        (dir, path)
    }

    #[test]
    fn a_restore_copies_every_entry_and_sets_a_new_lineage() {
        let (dir, path) = backup_of(&[
            (Tree::Meta, b"config_version", &5u64.to_be_bytes()),
            (Tree::Meta, META_LINEAGE, b"ln_old"),
            (Tree::Audit, b"a", b"1"),
            (Tree::Backends, b"be_1", b"r"),
        ]);
        let target = dir.path().join("restored");
        let report = restore(&path, &target).expect("restore");
        assert_eq!(report.entries, 4);
        assert_eq!(report.config_version, 5);
        let store = SledStore::open(&target).expect("open");
        assert_eq!(
            store.get(Tree::Audit, b"a").expect("get"),
            Some(b"1".to_vec())
        );
        assert_eq!(
            store.get(Tree::Backends, b"be_1").expect("get"),
            Some(b"r".to_vec())
        );
        let lineage = store
            .get(Tree::Meta, META_LINEAGE)
            .expect("get")
            .expect("set");
        assert_ne!(lineage, b"ln_old");
        assert!(lineage.starts_with(b"ln_") && lineage.len() == 19);
        // The restored directory has its own high-water mark, equal to the
        // store's, with the restored version and the new lineage.
        let mark = crate::store::watermark::read(&target)
            .expect("reads")
            .expect("a mark");
        let hwm = store
            .get(Tree::Meta, crate::store::watermark::META_HWM)
            .expect("get")
            .expect("set");
        assert_eq!(hwm, mark.mark.to_be_bytes());
        assert!(mark.mark >= 1);
        assert_eq!(mark.config_version, 5);
        assert_eq!(mark.lineage.as_bytes(), lineage.as_slice());
        drop(store);
        // Not into a non-empty directory.
        let err = restore(&path, &target).expect_err("non-empty");
        assert!(err.to_string().contains("is not empty"), "{err}");
    }

    #[test]
    fn a_damaged_file_is_refused_and_leaves_no_directory() {
        let (dir, path) = backup_of(&[(Tree::Audit, b"a", b"1")]);
        let bytes = std::fs::read(&path).expect("read");
        std::fs::write(&path, &bytes[..bytes.len() - 3]).expect("write");
        let target = dir.path().join("restored");
        let err = format!("{:#}", restore(&path, &target).expect_err("truncated"));
        assert!(
            err.contains("is truncated: no trailer after 1 entries"),
            "{err}"
        );
        assert!(!target.exists());
    }

    #[test]
    fn a_backup_of_a_newer_schema_is_refused() {
        let (dir, path) = backup_of(&[(Tree::Meta, b"schema_version", &99u32.to_be_bytes())]);
        let target = dir.path().join("restored");
        let err = restore(&path, &target).expect_err("newer schema");
        assert!(err.to_string().contains("schema version 99"), "{err}");
        assert!(!target.exists());
    }
}
