//! Verbs that need no control plane: `completion`, and `version` (which
//! asks the control plane for its version but answers without it).

use std::io::{self, Write};

use clap_complete::Shell;
use claw_proto::v1::GetSnapshotInfoRequest;
use serde::Serialize;

use crate::output::Details;
use crate::session::Session;

/// `clawctl completion SHELL`: prints the completion script for `shell`.
pub(crate) fn completion(shell: Shell) -> anyhow::Result<()> {
    let script = completion_script(shell);
    let mut out = io::stdout().lock();
    out.write_all(&script)?;
    out.flush()?;
    Ok(())
}

/// The completion script, rendered in memory: clap_complete panics on a
/// write error, and a closed pipe (`| head`) must end quietly instead.
fn completion_script(shell: Shell) -> Vec<u8> {
    let mut cmd = crate::cli::command();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, "clawctl", &mut script);
    script
}

/// What `clawctl version` reports.
#[derive(Debug, Serialize)]
struct Version {
    /// This binary's version.
    client_version: &'static str,
    /// The control plane's version; absent when it could not be asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    server_version: Option<String>,
    /// Why the control plane could not be asked, as one line.
    #[serde(skip_serializing_if = "Option::is_none")]
    server_error: Option<String>,
}

/// `clawctl version`: the client's version and the control plane's. An
/// unreachable or refusing server is reported in place of its version, not
/// as a failure: the client's version is still worth printing.
pub(crate) async fn version(session: &Session) -> anyhow::Result<()> {
    let (server_version, server_error) = match server_version(session).await {
        Ok(v) => (Some(v), None),
        Err(e) => (None, Some(crate::error_line(&e))),
    };
    let v = Version {
        client_version: env!("CARGO_PKG_VERSION"),
        server_version,
        server_error,
    };
    session.emit(&v, |out| {
        let server = match (&v.server_version, &v.server_error) {
            (Some(s), _) => s.clone(),
            (None, Some(e)) => format!("unavailable ({e})"),
            (None, None) => String::new(),
        };
        Details::new()
            .field("Client version", v.client_version)
            .field("Server version", server)
            .write(out)
    })
}

async fn server_version(session: &Session) -> anyhow::Result<String> {
    let conn = session.connect().await?;
    let info = conn
        .call(conn.cluster().get_snapshot_info(GetSnapshotInfoRequest {}))
        .await?;
    Ok(info.server_version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shell_gets_a_script_naming_the_verbs() {
        for shell in [
            Shell::Bash,
            Shell::Zsh,
            Shell::Fish,
            Shell::Elvish,
            Shell::PowerShell,
        ] {
            let script = String::from_utf8(completion_script(shell)).expect("utf-8");
            for word in ["clawctl", "backend", "upstream-timeout", "completion"] {
                assert!(script.contains(word), "{shell:?}: {word} missing");
            }
        }
    }
}
