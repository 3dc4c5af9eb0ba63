//! Running the real `clawctl` and checking what it printed.

use super::binary::{CLAWCTL, binary_path};
use std::ffi::OsString;
use std::io::{Read, Write};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How long one `clawctl` run may take before it is killed.
pub const CTL_TIMEOUT: Duration = Duration::from_secs(60);

/// What one `clawctl` run printed.
#[derive(Debug, Clone)]
pub struct CtlOutput {
    /// The arguments it ran with (after `--server`/`--token`), for messages.
    pub args: Vec<String>,
    /// How it exited.
    pub status: ExitStatus,
    /// Everything it wrote to stdout.
    pub stdout: String,
    /// Everything it wrote to stderr.
    pub stderr: String,
}

impl CtlOutput {
    /// Whether it exited 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Panics (showing stdout and stderr) unless it exited 0.
    #[track_caller]
    pub fn assert_ok(self) -> Self {
        assert!(self.success(), "expected success from {self}");
        self
    }

    /// Panics unless it failed.
    #[track_caller]
    pub fn assert_err(self) -> Self {
        assert!(!self.success(), "expected a failure from {self}");
        self
    }

    /// Panics unless it failed and its stderr contains `needle`.
    #[track_caller]
    pub fn assert_err_contains(self, needle: &str) -> Self {
        assert!(
            !self.success() && self.stderr.contains(needle),
            "expected a failure with {needle:?} on stderr from {self}"
        );
        self
    }

    /// Stdout parsed as JSON (for `-o json`).
    ///
    /// # Panics
    /// When stdout is not JSON, showing it.
    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}) in {self}"))
    }
}

impl std::fmt::Display for CtlOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`clawctl {}` ({})\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.args.join(" "),
            self.status,
            self.stdout,
            self.stderr
        )
    }
}

/// One `clawctl` invocation being assembled. Get one from
/// [`ControlPlane::ctl`](super::ControlPlane::ctl) (server and token preset)
/// or [`CtlCommand::new`].
#[derive(Debug, Clone)]
pub struct CtlCommand {
    global: Vec<String>,
    args: Vec<String>,
    env: Vec<(OsString, OsString)>,
    stdin: Option<Vec<u8>>,
    timeout: Duration,
}

impl CtlCommand {
    /// `clawctl ARGS…` with nothing preset.
    pub fn new<S: AsRef<str>>(args: &[S]) -> Self {
        Self {
            global: Vec::new(),
            args: args.iter().map(|a| a.as_ref().to_owned()).collect(),
            env: Vec::new(),
            stdin: None,
            timeout: CTL_TIMEOUT,
        }
    }

    /// Sets `--server URL`.
    pub fn server(mut self, url: &str) -> Self {
        self.global.extend(["--server".to_owned(), url.to_owned()]);
        self
    }

    /// Sets `--ca-cert PATH` (the CA of a TLS control plane).
    pub fn ca_cert(mut self, path: &std::path::Path) -> Self {
        self.global
            .extend(["--ca-cert".to_owned(), path.display().to_string()]);
        self
    }

    /// Sets `--token TOKEN`.
    pub fn token(mut self, token: &str) -> Self {
        self.global.extend(["--token".to_owned(), token.to_owned()]);
        self
    }

    /// Sets an environment variable for the run.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Feeds `input` on stdin.
    pub fn stdin(mut self, input: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(input.into());
        self
    }

    /// Changes the timeout ([`CTL_TIMEOUT`] by default).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Runs it, blocking the thread. On a multi-thread tokio runtime the
    /// worker is handed over (`block_in_place`) so in-process servers keep
    /// running; on a current-thread runtime prefer [`CtlCommand::run_async`]
    /// when the command depends on something served by the test itself.
    ///
    /// # Panics
    /// When clawctl cannot be spawned or outlives the timeout.
    pub fn run(self) -> CtlOutput {
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| self.run_blocking())
            }
            _ => self.run_blocking(),
        }
    }

    /// Runs it on tokio's blocking pool.
    pub async fn run_async(self) -> CtlOutput {
        match tokio::task::spawn_blocking(move || self.run_blocking()).await {
            Ok(out) => out,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    fn run_blocking(self) -> CtlOutput {
        let program = binary_path(CLAWCTL);
        let mut cmd = Command::new(&program);
        cmd.args(&self.global)
            .args(&self.args)
            .stdin(if self.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("CLAW_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("NO_COLOR", "1");
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
        if let (Some(input), Some(mut pipe)) = (self.stdin, child.stdin.take()) {
            // A thread, so a large input cannot deadlock against a full stdout.
            std::thread::spawn(move || {
                let _ = pipe.write_all(&input);
            });
        }
        let stdout = reader(child.stdout.take());
        let stderr = reader(child.stderr.take());
        let pid = child.id();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        let status = match rx.recv_timeout(self.timeout) {
            Ok(Ok(status)) => status,
            Ok(Err(e)) => panic!("waiting for clawctl {:?}: {e}", self.args),
            Err(_) => {
                if let Some(pid) = i32::try_from(pid)
                    .ok()
                    .and_then(rustix::process::Pid::from_raw)
                {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                }
                panic!(
                    "`clawctl {}` did not finish within {:?}; stderr so far: {}",
                    self.args.join(" "),
                    self.timeout,
                    stderr.recv().unwrap_or_default()
                );
            }
        };
        CtlOutput {
            args: self.args,
            status,
            stdout: stdout.recv().unwrap_or_default(),
            stderr: stderr.recv().unwrap_or_default(),
        }
    }
}

/// Reads a pipe to its end on a thread.
fn reader(pipe: Option<impl Read + Send + 'static>) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
    });
    rx
}
