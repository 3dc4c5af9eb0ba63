//! Where child processes' logs go: a temp dir per started component, outside
//! its data dir, kept after a failing test so the logs can be read.

use std::path::{Path, PathBuf};
use tempfile::TempDir;

/// Keep every log dir, not only those of failing tests.
pub const KEEP_LOGS_ENV: &str = "CLAW_TEST_KEEP_LOGS";

/// A temp dir holding log files. Deleted on drop, unless the thread is
/// panicking (a failing test) or `CLAW_TEST_KEEP_LOGS` is set.
#[derive(Debug)]
pub struct LogDir {
    dir: Option<TempDir>,
    path: PathBuf,
}

impl LogDir {
    /// A fresh dir named after `label`.
    pub fn new(label: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("claw-logs-{label}-"))
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temp dir for logs: {e}"));
        Self {
            path: dir.path().to_path_buf(),
            dir: Some(dir),
        }
    }

    /// The dir the log files are in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path of log file `name` inside the dir.
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for LogDir {
    fn drop(&mut self) {
        let keep = std::thread::panicking() || std::env::var_os(KEEP_LOGS_ENV).is_some();
        if keep && let Some(dir) = self.dir.take() {
            let path = dir.keep();
            eprintln!("claw-tests: logs kept in {}", path.display());
        }
    }
}
