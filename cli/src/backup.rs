//! `clawctl backup create FILE`: downloads a consistent point-in-time backup
//! of the whole store (`BackupService.CreateBackup`).
//!
//! The chunks go to `FILE.tmp`; once the stream ends the file is verified
//! with the shared reader ([`claw_proto::backup`]: frames, count,
//! checksum), fsynced and renamed to FILE. A failed or partial download
//! leaves no FILE (and removes `FILE.tmp`).

use std::io::{BufReader, Write as _};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow};
use clap::{Args, Subcommand};
use claw_proto::v1::CreateBackupRequest;
use claw_proto::v1::backup_service_client::BackupServiceClient;

use crate::client::describe_status;
use crate::session::Session;

/// `clawctl backup ...`
#[derive(Debug, Subcommand)]
pub enum BackupCmd {
    /// Download a consistent backup of the whole store (admin only): the
    /// configuration with provider keys still sealed under the master key,
    /// client-key and token hashes, heartbeat runs, usage, cooldowns, audit.
    #[command(after_help = "\
Examples:
  clawctl backup create claw-$(date +%F).clawbak
  claw-control-plane restore --from claw-2026-12-01.clawbak --data-dir /var/lib/claw/data-new")]
    Create(CreateArgs),
}

/// `clawctl backup create` arguments.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Where to write the backup.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Replace FILE if it exists.
    #[arg(long)]
    pub force: bool,
}

/// Runs a `backup` verb.
pub(crate) async fn run(session: &Session, cmd: BackupCmd) -> anyhow::Result<()> {
    let BackupCmd::Create(args) = cmd;
    create(session, &args).await
}

async fn create(session: &Session, args: &CreateArgs) -> anyhow::Result<()> {
    let file = &args.file;
    if !args.force && file.exists() {
        anyhow::bail!("{} exists; pass --force to replace it", file.display());
    }
    let tmp = tmp_path(file);
    let result = download(session, &tmp).await;
    let summary = match result.and_then(|()| finish(&tmp, file)) {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let (header, summary) = summary;
    let value = serde_json::json!({
        "file": file.display().to_string(),
        "entries": summary.entries,
        "bytes": summary.size,
        "config_version": header.config_version,
        "sha256": summary.sha256_hex(),
        "master_key_id": header.master_key_id,
    });
    session.emit(&value, |out| {
        writeln!(
            out,
            "wrote {} ({} entries, {} bytes, config version {}, sha256 {})",
            file.display(),
            summary.entries,
            summary.size,
            header.config_version,
            summary.sha256_hex()
        )
    })
}

/// `FILE.tmp`, beside FILE (so the rename stays on one file system).
fn tmp_path(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

/// Streams the backup into `tmp`.
async fn download(session: &Session, tmp: &Path) -> anyhow::Result<()> {
    let mut out =
        std::fs::File::create(tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let conn = session.connect().await?;
    let mut client: BackupServiceClient<_> = conn.backups();
    let mut stream = conn
        .call(client.create_backup(CreateBackupRequest {}))
        .await?;
    let (server, timeout) = (&session.connect.server, session.connect.timeout);
    loop {
        let chunk = stream.message().await.map_err(|s| {
            anyhow!(
                "backup download failed: {}",
                describe_status(&s, server, timeout)
            )
        })?;
        let Some(chunk) = chunk else { break };
        out.write_all(&chunk.data)
            .with_context(|| format!("writing {}", tmp.display()))?;
    }
    out.sync_all()
        .with_context(|| format!("syncing {}", tmp.display()))?;
    Ok(())
}

/// Verifies `tmp` and renames it to `file`.
fn finish(
    tmp: &Path,
    file: &Path,
) -> anyhow::Result<(claw_proto::v1::BackupHeader, claw_proto::backup::Summary)> {
    let input =
        std::fs::File::open(tmp).with_context(|| format!("cannot open {}", tmp.display()))?;
    let verified = claw_proto::backup::verify(BufReader::new(input), None)
        .map_err(|e| anyhow!("the downloaded {}", e.in_file(tmp.display())))?;
    std::fs::rename(tmp, file)
        .with_context(|| format!("renaming {} to {}", tmp.display(), file.display()))?;
    #[cfg(unix)]
    if let Some(dir) = file.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing {}", dir.display()))?;
    }
    Ok(verified)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_temporary_file_sits_beside_the_target() {
        assert_eq!(
            tmp_path(Path::new("/x/b.clawbak")),
            PathBuf::from("/x/b.clawbak.tmp")
        );
    }
}
