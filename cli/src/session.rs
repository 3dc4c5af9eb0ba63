//! One invocation of `clawctl`: how to reach the control plane and how to
//! print what comes back.

use std::io::{self, Write};

use serde::Serialize;

use crate::client::{ConnectOptions, Connection};
use crate::output::{self, Format};

/// The global flags, parsed once and handed to every verb.
#[derive(Debug)]
pub(crate) struct Session {
    /// Where to connect and with which token.
    pub connect: ConnectOptions,
    /// The `-o` format.
    pub format: Format,
}

impl Session {
    /// Connects to the control plane. Verbs call this only after everything
    /// they read locally (keys, files) is in hand, so a local error sends
    /// nothing.
    pub(crate) async fn connect(&self) -> anyhow::Result<Connection> {
        Connection::connect(&self.connect).await
    }

    /// Prints `value` in the session's format; `table` writes the human view.
    pub(crate) fn emit<T, F>(&self, value: &T, table: F) -> anyhow::Result<()>
    where
        T: Serialize + ?Sized,
        F: FnOnce(&mut dyn Write) -> io::Result<()>,
    {
        let mut out = io::stdout().lock();
        output::emit(&mut out, self.format, value, table)?;
        out.flush()?;
        Ok(())
    }
}

impl Session {
    /// Like [`Session::emit`], except that `-o yaml` prints `document()`:
    /// the resource in the shape `export` writes and `apply` reads
    /// (`interval: 30m`, not `interval_seconds: 1800`), so one YAML shape
    /// is ever shown and a `get -o yaml` can be pasted into a document.
    /// JSON stays the API's message, for scripts (`jq .interval_seconds`).
    pub(crate) fn emit_resource<T, D, F>(
        &self,
        value: &T,
        document: impl FnOnce() -> D,
        table: F,
    ) -> anyhow::Result<()>
    where
        T: Serialize + ?Sized,
        D: Serialize,
        F: FnOnce(&mut dyn Write) -> io::Result<()>,
    {
        match self.format {
            Format::Yaml => {
                let mut out = io::stdout().lock();
                output::write_yaml(&mut out, &document())?;
                out.flush()?;
                Ok(())
            }
            _ => self.emit(value, table),
        }
    }
}

/// Prints a warning on standard error (never a secret).
pub(crate) fn warn(message: impl std::fmt::Display) {
    eprintln!("warning: {message}");
}
