//! The `claw-mock-upstream` binary as a child process, scripted through its
//! HTTP control API. Tests usually prefer the in-process
//! [`MockUpstream`](crate::mock::MockUpstream); this is for benchmarks and
//! for proving the binary itself works.

use super::binary::{MOCK_UPSTREAM, binary_path};
use super::child::{ChildProcess, DEFAULT_START_TIMEOUT, DEFAULT_STOP_TIMEOUT, Spec, read_from};
use super::http;
use super::logs::LogDir;
use crate::mock::{Action, RecordedRequest, Rule, Totals};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

/// A running `claw-mock-upstream`. Killed on drop.
#[derive(Debug)]
pub struct MockUpstreamProcess {
    process: Option<ChildProcess>,
    addr: SocketAddr,
    logs: LogDir,
}

impl MockUpstreamProcess {
    /// Starts the binary with `args` (e.g. `["--name", "up-1"]`); it listens
    /// on an ephemeral loopback port unless `--addr` is given.
    ///
    /// # Panics
    /// When it does not come up, with its output.
    #[track_caller]
    pub fn start<S: AsRef<str>>(args: &[S]) -> Self {
        let logs = LogDir::new("mock-upstream");
        let spec = Spec {
            label: "claw-mock-upstream".to_owned(),
            program: binary_path(MOCK_UPSTREAM),
            args: args.iter().map(|a| a.as_ref().into()).collect(),
            env: Vec::new(),
            log_path: logs.file("mock-upstream.log"),
            start_timeout: DEFAULT_START_TIMEOUT,
        };
        let (process, listening) = ChildProcess::spawn(&spec).unwrap_or_else(|e| panic!("{e}"));
        let addr = listening
            .get("http")
            .unwrap_or_else(|| panic!("mock upstream announced no http= address: {listening:?}"));
        Self {
            process: Some(process),
            addr,
            logs,
        }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The OpenAI base URL, `http://ip:port/v1`.
    pub fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// `http://ip:port`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The process id, when it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(ChildProcess::pid)
    }

    /// Its stderr log file.
    pub fn log_path(&self) -> PathBuf {
        self.logs.file("mock-upstream.log")
    }

    /// Everything it logged so far.
    pub fn logs(&self) -> String {
        read_from(&self.log_path(), 0)
    }

    /// SIGTERM and wait; the exit status, or `None` if not running.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut process = self.process.take()?;
        Some(process.terminate(DEFAULT_STOP_TIMEOUT))
    }

    /// SIGKILL and wait, as a crash would end it; the exit status, or `None` if not running.
    pub fn kill9(&mut self) -> Option<ExitStatus> {
        let mut process = self.process.take()?;
        Some(process.kill9())
    }

    /// Queues a one-shot action (`POST /_mock/script`).
    pub fn push(&self, action: &Action) {
        self.control("POST", "/_mock/script", Some(to_json(action)));
    }

    /// Sets or clears the persistent action (`POST /_mock/always`).
    pub fn set_always(&self, action: Option<&Action>) {
        self.control("POST", "/_mock/always", Some(to_json(&action)));
    }

    /// Adds a header rule (`POST /_mock/rules`).
    pub fn add_rule(&self, rule: &Rule) {
        self.control("POST", "/_mock/rules", Some(to_json(rule)));
    }

    /// The record (`GET /_mock/requests`).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        let body = self.control("GET", "/_mock/requests", None);
        serde_json::from_slice(&body).unwrap_or_else(|e| panic!("bad /_mock/requests answer: {e}"))
    }

    /// The totals (`GET /_mock/totals`).
    pub fn totals(&self) -> Totals {
        let body = self.control("GET", "/_mock/totals", None);
        serde_json::from_slice(&body).unwrap_or_else(|e| panic!("bad /_mock/totals answer: {e}"))
    }

    /// Clears script, rules, record and totals (`POST /_mock/reset`).
    pub fn reset(&self) {
        self.control("POST", "/_mock/reset", None);
    }

    #[track_caller]
    fn control(&self, method: &str, path: &str, body: Option<Vec<u8>>) -> Vec<u8> {
        let reply = http::request(self.addr, method, path, body.as_deref(), CONTROL_TIMEOUT)
            .unwrap_or_else(|e| panic!("mock control {method} {path}: {e}"));
        assert_eq!(
            reply.status,
            200,
            "mock control {method} {path}: {}",
            reply.text()
        );
        reply.body
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Actions and rules are plain data: serializing them cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}
