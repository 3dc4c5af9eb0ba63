//! Verbs that need no control plane: `completion` and `version`.

use std::io::{self, Write};

use clap_complete::Shell;
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
}

/// `clawctl version`: the client's version (the control plane has no RPC
/// reporting its own yet).
pub(crate) fn version(session: &Session) -> anyhow::Result<()> {
    let v = Version {
        client_version: env!("CARGO_PKG_VERSION"),
    };
    session.emit(&v, |out| {
        Details::new()
            .field("Client version", v.client_version)
            .write(out)
    })
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
