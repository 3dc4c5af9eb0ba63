//! One child process of a real binary: spawned in its own process group,
//! stderr (and any extra stdout) appended to a log file, its `listening …`
//! line read with a timeout, and killed with its whole group on drop.
//!
//! A watchdog `sh` sits beside every child, blocked reading a pipe from the
//! test process: if the test process dies without unwinding (ctrl-c on
//! `cargo test`, SIGKILL, abort), the pipe closes and the watchdog kills the
//! child's process group, so no server outlives its test.

use rustix::process::{Pid, Signal, kill_process, kill_process_group};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long a binary may take to print its `listening` line.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a SIGTERM'd process may take to exit before it is SIGKILLed.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// What to run.
#[derive(Debug, Clone)]
pub(crate) struct Spec {
    /// Short name for messages, e.g. `control-plane`.
    pub(crate) label: String,
    pub(crate) program: PathBuf,
    pub(crate) args: Vec<OsString>,
    /// Set (`Some`) or removed (`None`) on top of the inherited environment,
    /// from which every `CLAW_*` variable is removed first.
    pub(crate) env: Vec<(OsString, Option<OsString>)>,
    pub(crate) log_path: PathBuf,
    pub(crate) start_timeout: Duration,
}

/// The addresses a binary announced: `listening grpc=1.2.3.4:5 http=…`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listening(pub BTreeMap<String, SocketAddr>);

impl Listening {
    /// Parses `listening key=addr …`.
    pub fn parse(line: &str) -> Option<Self> {
        let mut words = line.split_whitespace();
        if words.next() != Some("listening") {
            return None;
        }
        let mut addrs = BTreeMap::new();
        for word in words {
            let (key, addr) = word.split_once('=')?;
            addrs.insert(key.to_owned(), addr.parse().ok()?);
        }
        (!addrs.is_empty()).then_some(Self(addrs))
    }

    /// The address announced under `key`.
    pub fn get(&self, key: &str) -> Option<SocketAddr> {
        self.0.get(key).copied()
    }
}

/// A binary that did not come up.
#[derive(Debug, Clone)]
pub struct StartError {
    /// Which binary it was (e.g. `claw-data-plane p1`), for messages.
    pub label: String,
    /// What went wrong, e.g. "exited with exit status: 1".
    pub reason: String,
    /// The exit status, when the process exited.
    pub status: Option<ExitStatus>,
    /// Everything the process logged during this attempt.
    pub output: String,
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} did not start: {}\n--- its output ---\n{}",
            self.label, self.reason, self.output
        )
    }
}

impl std::error::Error for StartError {}

/// A running child; killed with its process group on drop.
#[derive(Debug)]
pub(super) struct ChildProcess {
    label: String,
    child: Child,
    watchdog: Option<(Child, ChildStdin)>,
    log_path: PathBuf,
    exit: Option<ExitStatus>,
}

impl ChildProcess {
    /// Spawns `spec` and waits for its `listening` line.
    pub(crate) fn spawn(spec: &Spec) -> Result<(Self, Listening), StartError> {
        let mut log = open_log(&spec.log_path);
        let log_start = log.metadata().map_or(0, |m| m.len());
        let _ = writeln!(
            log,
            "==== claw-tests: starting {} {:?}",
            spec.program.display(),
            spec.args
        );
        let fail = |reason: String, status: Option<ExitStatus>| StartError {
            label: spec.label.clone(),
            reason,
            status,
            output: read_from(&spec.log_path, log_start),
        };

        let mut cmd = Command::new(&spec.program);
        cmd.args(&spec.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(
                log.try_clone()
                    .map_or_else(|_| Stdio::inherit(), Stdio::from),
            )
            // Its own group: killing the group takes anything it spawned too,
            // and ctrl-c on the terminal reaches the watchdog, not the server.
            .process_group(0);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("CLAW_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("NO_COLOR", "1");
        for (key, value) in &spec.env {
            match value {
                Some(v) => cmd.env(key, v),
                None => cmd.env_remove(key),
            };
        }
        let mut child = cmd.spawn().map_err(|e| {
            fail(
                format!("cannot spawn {}: {e}", spec.program.display()),
                None,
            )
        })?;
        let watchdog = spawn_watchdog(child.id());
        let stdout = child.stdout.take();
        let (tx, rx) = mpsc::channel();
        let label = spec.label.clone();
        std::thread::Builder::new()
            .name(format!("{label}-stdout"))
            .spawn(move || forward_stdout(stdout, log, tx))
            .map_err(|e| fail(format!("cannot start the stdout reader: {e}"), None))?;

        let mut process = Self {
            label: spec.label.clone(),
            child,
            watchdog,
            log_path: spec.log_path.clone(),
            exit: None,
        };
        match rx.recv_timeout(spec.start_timeout) {
            Ok(listening) => Ok((process, listening)),
            Err(e) => {
                // Give a crashing process a moment to finish writing its error.
                let status = process.wait_timeout(Duration::from_millis(500));
                let reason = match (status, e) {
                    (Some(status), _) => {
                        format!("exited with {status} before printing `listening …`")
                    }
                    (None, mpsc::RecvTimeoutError::Timeout) => format!(
                        "no `listening …` line on stdout within {:?}",
                        spec.start_timeout
                    ),
                    (None, mpsc::RecvTimeoutError::Disconnected) => {
                        "closed stdout without printing `listening …`".to_owned()
                    }
                };
                process.kill9();
                Err(fail(reason, status))
            }
        }
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub(super) fn is_running(&mut self) -> bool {
        self.try_wait().is_none()
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// Polls for the exit for at most `timeout`.
    pub(super) fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGTERM, then wait up to `timeout`; SIGKILL if it is still there.
    /// Returns the exit status (a signal status after a SIGKILL).
    pub(super) fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(status) = self.try_wait() {
            return status;
        }
        self.signal(Signal::TERM);
        match self.wait_timeout(timeout) {
            Some(status) => {
                // Anything it left behind in its group goes too.
                self.signal_group(Signal::KILL);
                status
            }
            None => {
                let _ = writeln!(
                    open_log(&self.log_path),
                    "==== claw-tests: {} ignored SIGTERM for {timeout:?}, sending SIGKILL",
                    self.label
                );
                self.kill9()
            }
        }
    }

    /// SIGKILL to the whole process group, then reap.
    pub(super) fn kill9(&mut self) -> ExitStatus {
        if self.exit.is_none() {
            self.signal_group(Signal::KILL);
        }
        self.reap()
    }

    fn reap(&mut self) -> ExitStatus {
        if let Some(status) = self.exit {
            return status;
        }
        let status = self.child.wait().unwrap_or_else(|e| {
            panic!(
                "{}: cannot wait for pid {}: {e}",
                self.label,
                self.child.id()
            )
        });
        self.exit = Some(status);
        self.stop_watchdog();
        status
    }

    fn signal(&self, signal: Signal) {
        if let Some(pid) = pid_of(self.child.id()) {
            let _ = kill_process(pid, signal);
        }
    }

    fn signal_group(&self, signal: Signal) {
        if let Some(pid) = pid_of(self.child.id()) {
            let _ = kill_process_group(pid, signal);
        }
    }

    fn stop_watchdog(&mut self) {
        if let Some((mut watchdog, stdin)) = self.watchdog.take() {
            // Kill it before closing its pipe: on EOF it would signal a group
            // id that no longer belongs to us.
            let _ = watchdog.kill();
            let _ = watchdog.wait();
            drop(stdin);
        }
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let was_running = self.exit.is_none();
        self.signal_group(Signal::KILL);
        let _ = self.child.wait();
        self.stop_watchdog();
        if was_running && std::thread::panicking() {
            eprintln!(
                "---- {} (pid {}) log, {} ----\n{}",
                self.label,
                self.child.id(),
                self.log_path.display(),
                tail(&read_from(&self.log_path, 0), 200)
            );
        }
    }
}

fn pid_of(id: u32) -> Option<Pid> {
    i32::try_from(id).ok().and_then(Pid::from_raw)
}

/// The watchdog: ignores terminal signals, waits for EOF on its stdin (our
/// end closes only when this process dies or drops the child), then kills
/// the child's process group.
fn spawn_watchdog(pid: u32) -> Option<(Child, ChildStdin)> {
    let mut watchdog = Command::new("sh")
        .args([
            "-c",
            r#"trap "" INT TERM HUP; while read -r _; do :; done; kill -s KILL -- "-$1" 2>/dev/null"#,
            "claw-watchdog",
            &pid.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let stdin = watchdog.stdin.take()?;
    Some((watchdog, stdin))
}

/// Hands the first `listening …` line to `tx`; every other stdout line goes
/// to the log.
fn forward_stdout(
    stdout: Option<std::process::ChildStdout>,
    mut log: File,
    tx: mpsc::Sender<Listening>,
) {
    let Some(stdout) = stdout else { return };
    let mut tx = Some(tx);
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        if tx.is_some()
            && let Some(listening) = Listening::parse(&line)
        {
            let _ = writeln!(log, "==== claw-tests: stdout: {line}");
            if let Some(tx) = tx.take() {
                let _ = tx.send(listening);
            }
            continue;
        }
        let _ = writeln!(log, "[stdout] {line}");
    }
}

pub(crate) fn open_log(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot open log file {}: {e}", path.display()))
}

/// The log's content from byte `offset` on (lossy UTF-8).
pub(crate) fn read_from(path: &Path, offset: u64) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(bytes.len());
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

/// The last `lines` lines of `text`.
pub(crate) fn tail(text: &str, lines: usize) -> &str {
    let mut cut = text.len();
    for _ in 0..lines {
        match text[..cut].trim_end_matches('\n').rfind('\n') {
            Some(i) => cut = i,
            None => return text,
        }
    }
    &text[cut + 1..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listening_lines() {
        let l = Listening::parse("listening grpc=127.0.0.1:5 http=127.0.0.1:6").expect("valid");
        assert_eq!(l.get("grpc"), Some(SocketAddr::from(([127, 0, 0, 1], 5))));
        assert_eq!(l.get("http"), Some(SocketAddr::from(([127, 0, 0, 1], 6))));
        assert!(Listening::parse("listening").is_none());
        assert!(Listening::parse("listening http=nope").is_none());
        assert!(Listening::parse("starting http=127.0.0.1:1").is_none());
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc\n");
        assert_eq!(tail("a\nb", 5), "a\nb");
    }
}
