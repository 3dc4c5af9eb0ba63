//! Scheduled backups (`--backup-dir DIR --backup-every 24h --backup-keep 7`):
//! one at startup and one every interval, each written to a temporary file
//! in DIR, fsynced and renamed to `claw-backup-YYYYMMDDTHHMMSSZ.clawbak`;
//! then the oldest files matching that pattern beyond `keep` are removed
//! (nothing else in DIR is touched).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use crate::audit::Actor;
pub use crate::config::BackupSchedule as Schedule;
use crate::shutdown::Shutdown;
use crate::store::Store;

const PREFIX: &str = "claw-backup-";
const SUFFIX: &str = ".clawbak";

/// Writes a backup now and every `schedule.every` until `stop`.
pub(crate) async fn run(store: Arc<dyn Store>, schedule: Schedule, mut stop: Shutdown) {
    let mut tick = tokio::time::interval(schedule.every.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.stopped() => return,
        }
        match once(&store, &schedule).await {
            Ok((path, size)) => {
                crate::metrics::backup_succeeded(size);
                tracing::info!(file = %path.display(), bytes = size, "wrote scheduled backup");
            }
            Err(e) => {
                crate::metrics::backup_failed();
                tracing::warn!(error = format!("{e:#}"), dir = %schedule.dir.display(), "scheduled backup failed");
            }
        }
    }
}

/// Writes one backup into the directory and prunes; returns the file and
/// its size.
async fn once(store: &Arc<dyn Store>, schedule: &Schedule) -> anyhow::Result<(PathBuf, u64)> {
    let (s, dir) = (store.clone(), schedule.dir.clone());
    let written = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        super::write_backup(s.as_ref(), &dir)
    })
    .await
    .context("backup task failed")??;
    super::audit_backup(store, &Actor::system(), "ScheduledBackup", &written)
        .await
        .context("auditing the backup")?;
    let size = written.summary.size;
    let (dir, keep) = (schedule.dir.clone(), schedule.keep);
    tokio::task::spawn_blocking(move || -> anyhow::Result<PathBuf> {
        let path = dir.join(file_name(jiff::Timestamp::now()));
        written
            .file
            .persist(&path)
            .map_err(|e| e.error)
            .with_context(|| format!("renaming the backup to {}", path.display()))?;
        super::sync_dir(&dir).with_context(|| format!("syncing {}", dir.display()))?;
        prune(&dir, keep, &path)?;
        Ok(path)
    })
    .await
    .context("backup task failed")?
    .map(|p| (p, size))
}

/// `claw-backup-YYYYMMDDTHHMMSSZ.clawbak` for `now` (UTC).
fn file_name(now: jiff::Timestamp) -> String {
    format!("{PREFIX}{}{SUFFIX}", now.strftime("%Y%m%dT%H%M%SZ"))
}

/// Whether `name` is a file this schedule wrote.
fn is_backup_name(name: &str) -> bool {
    name.strip_prefix(PREFIX)
        .and_then(|r| r.strip_suffix(SUFFIX))
        .is_some_and(|stamp| {
            stamp.len() == 16
                && stamp.bytes().enumerate().all(|(i, b)| match i {
                    8 => b == b'T',
                    15 => b == b'Z',
                    _ => b.is_ascii_digit(),
                })
        })
}

/// Removes the oldest backup files beyond `keep` (names sort by time).
/// `newest` is never removed, even if the clock went backwards.
fn prune(dir: &Path, keep: usize, newest: &Path) -> anyhow::Result<()> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| is_backup_name(n))
        .collect();
    names.sort();
    let excess = names.len().saturating_sub(keep.max(1));
    for name in names.into_iter().take(excess) {
        let path = dir.join(&name);
        if path == newest {
            continue;
        }
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        tracing::info!(file = %path.display(), "pruned old backup");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_utc_stamps_and_only_they_are_pruned() {
        let ts: jiff::Timestamp = "2026-12-01T15:04:05Z".parse().expect("ts");
        assert_eq!(file_name(ts), "claw-backup-20261201T150405Z.clawbak");
        assert!(is_backup_name(&file_name(ts)));
        assert!(!is_backup_name("claw-backup-20261201T150405Z.clawbak.tmp"));
        assert!(!is_backup_name("claw-backup-latest.clawbak"));

        let dir = tempfile::tempdir().expect("tempdir");
        for n in [
            "claw-backup-20261201T000001Z.clawbak",
            "claw-backup-20261201T000002Z.clawbak",
            "claw-backup-20261201T000003Z.clawbak",
            "notes.txt",
        ] {
            std::fs::write(dir.path().join(n), b"x").expect("write");
        }
        let newest = dir.path().join("claw-backup-20261201T000003Z.clawbak");
        prune(dir.path(), 2, &newest).expect("prune");
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf8"))
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "claw-backup-20261201T000002Z.clawbak",
                "claw-backup-20261201T000003Z.clawbak",
                "notes.txt"
            ]
        );
    }
}
