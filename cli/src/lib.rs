//! `clawctl`: the operator CLI of Claw Gateway. It drives the control plane
//! over gRPC only, never sled or the proxies.
//!
//! - `cli`: every verb and flag (clap), with help and examples.
//! - `session`: one invocation: connect options and the `-o` format.
//! - `client`: the gRPC connection, the admin token on every call, and
//!   gRPC failures as one line (`not found: backend "x" not found`).
//! - `output`: tables, `key: value` views, JSON and YAML.
//! - `duration`: `30s`/`5m`/`1h30m` to and from the API's ms/s fields.
//! - `model_spec`: the `--model CANONICAL[=NATIVE][,in=..,out=..]` spec.
//! - `api_key`: reading provider keys from env/file/stdin and their
//!   `env:`/`file:` references.
//! - `backend`, `pool`, `key`, `agent`, `cluster`: the verbs of
//!   each resource (`cluster`: snapshot, proxies, master key).
//! - `served`: the warning when a key, agent or disabled backend names a
//!   model no enabled backend serves.
//! - `heartbeat`: `heartbeat run|logs|checklist get|set|redeliver`.
//! - `backup`: `backup create FILE`, verified with the shared reader.
//! - `stats`: `stats total|hourly|daily|cooldowns` over the usage and
//!   cooldown history.
//! - `token`: `token add|list|rm` (named admin tokens with roles) and
//!   `whoami`.
//! - `audit`: `audit` over the audit log.
//! - `local`: `completion` (no server) and `version` (client and server).
//! - `document`: the YAML document of `export`/`apply` and its conversion
//!   to and from the API's `ClusterConfig`; `apply`: those two verbs.
//!
//! Errors surface as a single `error: ...` line (see `main.rs`); secrets are
//! never printed except a client key's secret, once, at creation.

mod agent;
mod api_key;
mod apply;
mod audit;
mod backend;
mod backup;
mod cli;
mod client;
mod cluster;
mod document;
mod duration;
mod heartbeat;
mod key;
mod local;
mod model_spec;
mod output;
mod pool;
mod served;
mod session;
mod stats;
mod token;

pub use cli::{Cli, parse};

use cli::Command;
use client::ConnectOptions;
use session::Session;

/// Runs one parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let session = Session {
        connect: ConnectOptions {
            server: cli.server,
            token: cli.token,
            timeout: cli.rpc_timeout,
            ca_cert: cli.ca_cert,
        },
        format: cli.output,
    };
    match cli.command {
        Command::Backend(cmd) => backend::run(&session, cmd).await,
        Command::Pool(cmd) => pool::run(&session, cmd).await,
        Command::Key(cmd) => key::run(&session, cmd).await,
        Command::Agent(cmd) => agent::run(&session, cmd).await,
        Command::Heartbeat(cmd) => heartbeat::run(&session, cmd).await,
        Command::Stats(cmd) => stats::run(&session, cmd).await,
        Command::Token(cmd) => token::run(&session, cmd).await,
        Command::Whoami => token::whoami(&session).await,
        Command::MasterKey(cmd) => cluster::master_key(&session, cmd).await,
        Command::Backup(cmd) => backup::run(&session, cmd).await,
        Command::Snapshot => cluster::snapshot(&session).await,
        Command::Proxies => cluster::proxies(&session).await,
        Command::Audit(args) => audit::run(&session, args).await,
        Command::Export(args) => apply::export(&session, args).await,
        Command::Apply(args) => apply::apply(&session, args).await,
        Command::Completion { shell } => local::completion(shell),
        Command::Version => local::version(&session).await,
    }
}

/// The one line printed for an error: its context chain joined with `: `,
/// with any line breaks from server messages flattened.
pub fn error_line(err: &anyhow::Error) -> String {
    let line = format!("{err:#}")
        .split(['\n', '\r'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    // Any other control character (ESC…) a server message carries is shown
    // escaped, never sent to the terminal as is.
    output::escape_control(&line).into_owned()
}

/// True when the error is stdout being closed early (`clawctl ... | head`),
/// which is not a failure worth reporting.
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

#[cfg(test)]
mod tests {
    use std::io::{self, Write};

    use super::*;

    #[test]
    fn error_lines_escape_control_characters() {
        let e = anyhow::anyhow!("label: bad \u{1b}[2Jvalue\r\nnext");
        assert_eq!(error_line(&e), "label: bad \\u{1b}[2Jvalue next");
    }

    /// Standard output after the reader of the pipe went away.
    struct ClosedPipe;

    impl Write for ClosedPipe {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_closed_pipe_is_recognised_in_every_format() {
        let value = serde_json::json!({"backends": ["a", "b"]});
        for format in [
            output::Format::Table,
            output::Format::Json,
            output::Format::Yaml,
        ] {
            let err = output::emit(&mut ClosedPipe, format, &value, |out| writeln!(out, "NAME"))
                .expect_err("the write fails");
            assert!(is_broken_pipe(&err), "{format:?}: {err:#}");
        }
    }

    #[test]
    fn other_errors_are_not_a_closed_pipe() {
        assert!(!is_broken_pipe(&anyhow::anyhow!("boom")));
        let err = anyhow::Error::from(io::Error::from(io::ErrorKind::PermissionDenied));
        assert!(!is_broken_pipe(&err));
    }
}
