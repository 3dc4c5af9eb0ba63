//! `clawctl snapshot`, `clawctl proxies` and `clawctl master-key rotate`: the
//! cluster as a whole.

use std::path::Path;

use anyhow::{anyhow, bail};
use claw_proto::v1::{GetSnapshotInfoRequest, ListProxiesRequest, Proxy, RotateMasterKeyRequest};

use crate::cli::MasterKeyCmd;
use crate::output::{self, Details, Format, Table};
use crate::session::Session;

/// `clawctl snapshot`.
pub(crate) async fn snapshot(session: &Session) -> anyhow::Result<()> {
    let conn = session.connect().await?;
    let info = conn
        .call(conn.cluster().get_snapshot_info(GetSnapshotInfoRequest {}))
        .await?;
    session.emit(&info, |out| {
        Details::new()
            .field("Config version", info.config_version.to_string())
            .field("Schema version", info.schema_version.to_string())
            .field("Master key id", &info.master_key_id)
            .field("Backends", info.backends.to_string())
            .field("Client keys", info.client_keys.to_string())
            .field("Agents", info.agents.to_string())
            .field("Proxies connected", info.proxies_connected.to_string())
            .field("Server version", &info.server_version)
            .write(out)
    })
}

/// `clawctl proxies`.
pub(crate) async fn proxies(session: &Session) -> anyhow::Result<()> {
    let conn = session.connect().await?;
    let resp = conn
        .call(conn.cluster().list_proxies(ListProxiesRequest {}))
        .await?;
    session.emit(&resp.proxies, |out| {
        proxy_table(&resp.proxies).write(out)?;
        writeln!(out)?;
        writeln!(out, "current config version: {}", resp.config_version)?;
        for line in excluded_warnings(&resp.proxies) {
            writeln!(out, "{line}")?;
        }
        Ok(())
    })
}

/// One warning line per proxy that left resources out of its snapshot as
/// invalid (the first few named; all of them in `-o json`).
fn excluded_warnings(proxies: &[Proxy]) -> Vec<String> {
    const NAMED: usize = 3;
    proxies
        .iter()
        .filter(|p| !p.excluded.is_empty())
        .map(|p| {
            let named: Vec<String> = p
                .excluded
                .iter()
                .take(NAMED)
                .map(|e| format!("{} {} ({})", e.kind, e.id, e.reason))
                .collect();
            let more = match p.excluded.len().saturating_sub(NAMED) {
                0 => String::new(),
                n => format!(" and {n} more"),
            };
            let line = format!(
                "warning: proxy {} left out {} invalid resource(s): {}{more}; fix or delete them (details: clawctl proxies -o json)",
                p.node_id,
                p.excluded.len(),
                named.join(", ")
            );
            output::escape_control(&line).into_owned()
        })
        .collect()
}

fn proxy_table(proxies: &[Proxy]) -> Table {
    let mut t = Table::new(&[
        "NODE",
        "PEER",
        "CONNECTED SINCE",
        "ACKED VERSION",
        "EXCLUDED",
        "LAST NACK",
    ]);
    for p in proxies {
        let since = if p.connected {
            output::timestamp(&p.connected_since)
        } else {
            match output::timestamp(&p.last_seen) {
                seen if seen.is_empty() => "disconnected".to_string(),
                seen => format!("disconnected (last seen {seen})"),
            }
        };
        t.row(vec![
            p.node_id.clone(),
            p.peer_address.clone(),
            since,
            p.acked_version.to_string(),
            p.excluded.len().to_string(),
            p.last_nack_reason.clone(),
        ]);
    }
    t
}

/// `clawctl master-key ...`.
pub(crate) async fn master_key(session: &Session, cmd: MasterKeyCmd) -> anyhow::Result<()> {
    let MasterKeyCmd::Rotate { new_key_file } = cmd;
    let new_master_key = read_master_key(&new_key_file)?;
    let conn = session.connect().await?;
    let resp = conn
        .call(
            conn.cluster()
                .rotate_master_key(RotateMasterKeyRequest { new_master_key }),
        )
        .await?;
    let reminder = format!(
        "Restart the control plane with the new key configured (CLAW_MASTER_KEY_FILE={} \
         or CLAW_MASTER_KEY): the old key no longer decrypts the stored secrets.",
        new_key_file.display()
    );
    session.emit(&resp, |out| {
        writeln!(
            out,
            "master key rotated: {} -> {}, {} secrets re-encrypted",
            resp.old_key_id, resp.new_key_id, resp.reencrypted
        )?;
        writeln!(out, "{reminder}")
    })?;
    if session.format != Format::Table {
        crate::session::warn(reminder);
    }
    Ok(())
}

/// Reads a master key file: 64 hex characters, surrounding whitespace ignored.
/// Errors describe the content without ever echoing it.
fn read_master_key(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow!("--new-key-file: cannot read {}: {e}", path.display()))?;
    let key = text.trim();
    if key.len() != 64 || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!(
            "--new-key-file {}: expected 64 hex characters (32 bytes), e.g. from `openssl rand -hex 32`",
            path.display()
        );
    }
    Ok(key.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn master_key_file_is_trimmed_and_checked_without_echo() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("k");
        let key = "ab".repeat(32);
        std::fs::write(&path, format!("  {key}\n")).expect("write");
        assert_eq!(read_master_key(&path).ok(), Some(key));
        let secretish = "zz".repeat(32);
        std::fs::write(&path, &secretish).expect("write");
        let err = read_master_key(&path).expect_err("not hex").to_string();
        assert!(!err.contains("zzzz"), "{err}");
        std::fs::write(&path, "abcd").expect("write");
        assert!(read_master_key(&path).is_err());
    }
}
