//! The durable high-water mark: a count of flushes, kept both in the store
//! (Meta `hwm`) and in a small file next to it (`claw.hwm`), so a store
//! whose recovery silently dropped acknowledged changes (sled treats a
//! damaged record as the end of its log) is refused at open instead of
//! served shortened.
//!
//! How the two are bound (see [`super::sled::SledStore`]'s flush): every
//! flush round first commits a tiny transaction writing Meta `hwm` = n+1,
//! so every change committed before the round precedes it in the log; then
//! the engine flushes; then the file is rewritten with n+1 (temp file,
//! fsync, rename, fsync of the directory) — all before the flush future
//! resolves, and so before any API call acknowledges. A recovery that lost
//! the tail of the log (or an older copy of the `db` file next to a newer
//! mark) reads Meta `hwm` < the file's mark: refused. Meta `hwm` > mark is
//! a crash between the engine flush and the file write: fine.
//!
//! The file is one line of text, for operators:
//! `claw-hwm v1 mark=<n> config_version=<v> lineage=<id>`. Removing it
//! accepts the store as it is (the next start writes a fresh one from the
//! store): a deliberate, documented escape, never done by the server.

use std::io::Write as _;
use std::path::{Path, PathBuf};

/// The mark file's name inside the data directory.
pub const FILE_NAME: &str = "claw.hwm";

/// The Meta key holding the store's own copy of the mark (8 bytes, big
/// endian).
pub const META_HWM: &[u8] = b"hwm";

const MAGIC: &str = "claw-hwm v1";

/// What the mark file holds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Mark {
    /// Flush rounds completed (the value of Meta `hwm` at the last one).
    pub mark: u64,
    /// The configuration version at that flush (0: none yet).
    pub config_version: u64,
    /// The store's lineage at that flush (empty: none yet).
    pub lineage: String,
}

/// The path of the mark file of `data_dir`.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE_NAME)
}

/// A mark file that exists but cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("the high-water mark file {path} {what}")]
pub struct MarkFileError {
    path: String,
    what: String,
}

impl MarkFileError {
    fn new(path: &Path, what: impl Into<String>) -> Self {
        MarkFileError {
            path: path.display().to_string(),
            what: what.into(),
        }
    }
}

impl Mark {
    fn encode(&self) -> String {
        format!(
            "{MAGIC} mark={} config_version={} lineage={}\n",
            self.mark, self.config_version, self.lineage
        )
    }

    fn decode(text: &str) -> Option<Mark> {
        let rest = text.trim_end().strip_prefix(MAGIC)?;
        let mut mark = None;
        let mut config_version = None;
        let mut lineage = None;
        for field in rest.split_ascii_whitespace() {
            let (k, v) = field.split_once('=')?;
            match k {
                "mark" => mark = Some(v.parse().ok()?),
                "config_version" => config_version = Some(v.parse().ok()?),
                "lineage" => lineage = Some(v.to_string()),
                _ => {}
            }
        }
        Some(Mark {
            mark: mark?,
            config_version: config_version.unwrap_or(0),
            lineage: lineage.unwrap_or_default(),
        })
    }
}

/// Reads the mark of `data_dir`: `None` when there is no file.
pub fn read(data_dir: &Path) -> Result<Option<Mark>, MarkFileError> {
    let path = path(data_dir);
    match std::fs::read_to_string(&path) {
        Ok(text) => Mark::decode(&text).map(Some).ok_or_else(|| {
            MarkFileError::new(
                &path,
                "is damaged; remove it to accept the store as it is, or restore from a backup",
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(MarkFileError::new(&path, format!("cannot be read: {e}"))),
    }
}

/// Replaces the mark of `data_dir` durably: a temp file written and
/// fsynced, renamed over the mark, then the directory fsynced.
pub fn write(data_dir: &Path, mark: &Mark) -> std::io::Result<()> {
    let path = path(data_dir);
    let tmp = data_dir.join(format!("{FILE_NAME}.tmp"));
    {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(mark.encode().as_bytes())?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    sync_dir(data_dir)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
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

/// Decodes Meta `hwm` (absent: 0).
pub fn decode_meta(raw: Option<&[u8]>) -> Option<u64> {
    match raw {
        None => Some(0),
        Some(v) => <[u8; 8]>::try_from(v).ok().map(u64::from_be_bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mark_round_trips_and_damage_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(read(dir.path()).expect("reads"), None);
        let m = Mark {
            mark: 42,
            config_version: 7,
            lineage: "ln_00ff".into(),
        };
        write(dir.path(), &m).expect("writes");
        assert_eq!(read(dir.path()).expect("reads"), Some(m.clone()));
        assert!(!dir.path().join("claw.hwm.tmp").exists());
        let text = std::fs::read_to_string(path(dir.path())).expect("text");
        assert_eq!(
            text,
            "claw-hwm v1 mark=42 config_version=7 lineage=ln_00ff\n"
        );
        std::fs::write(path(dir.path()), "garbage").expect("write");
        let err = read(dir.path()).expect_err("damaged");
        assert!(err.to_string().contains("claw.hwm is damaged"), "{err}");
        assert_eq!(decode_meta(None), Some(0));
        assert_eq!(decode_meta(Some(&5u64.to_be_bytes())), Some(5));
        assert_eq!(decode_meta(Some(b"abc")), None);
    }
}
