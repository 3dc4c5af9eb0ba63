//! The real `claw-data-plane` proxy as a child process.

use super::ControlPlane;
use super::binary::{DATA_PLANE, binary_path};
use super::child::{
    ChildProcess, DEFAULT_START_TIMEOUT, DEFAULT_STOP_TIMEOUT, Spec, StartError, read_from,
};
use super::http;
use super::logs::LogDir;
use super::wait::wait_until;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// How long [`Proxy::wait_ready`] waits for `/readyz`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Options for starting a proxy; get one from [`Proxy::builder`].
#[derive(Debug, Clone)]
pub struct ProxyBuilder {
    control_plane: String,
    proxy_token: String,
    node_id: String,
    env: Vec<(OsString, Option<OsString>)>,
    args: Vec<OsString>,
    start_timeout: Duration,
    metrics_listener: bool,
}

impl ProxyBuilder {
    /// A proxy of the control plane at `control_plane_url` (`http://grpc-addr`).
    pub fn new(control_plane_url: impl Into<String>, proxy_token: impl Into<String>) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(1);
        Self {
            control_plane: control_plane_url.into(),
            proxy_token: proxy_token.into(),
            node_id: format!(
                "proxy-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ),
            env: Vec::new(),
            args: Vec::new(),
            start_timeout: DEFAULT_START_TIMEOUT,
            metrics_listener: false,
        }
    }

    /// The node id it reports (unique per test process by default).
    pub fn node_id(mut self, id: impl Into<String>) -> Self {
        self.node_id = id.into();
        self
    }

    /// Overrides the proxy token (e.g. a wrong one).
    pub fn proxy_token(mut self, token: impl Into<String>) -> Self {
        self.proxy_token = token.into();
        self
    }

    /// Sets an environment variable for the process.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), Some(value.into())));
        self
    }

    /// Removes an environment variable the process would inherit.
    pub fn env_remove(mut self, key: impl Into<OsString>) -> Self {
        self.env.push((key.into(), None));
        self
    }

    /// Adds a command-line argument after the harness's own.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Adds command-line arguments after the harness's own.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Keeps the encrypted last-known-good snapshot at `path`
    /// (`--snapshot-cache PATH`).
    pub fn snapshot_cache(self, path: impl Into<OsString>) -> Self {
        self.arg("--snapshot-cache").arg(path)
    }

    /// Keeps accepting for `delay` after SIGTERM (`--drain-delay`). The
    /// harness's proxies use 0 unless told, so stopping one is quick.
    pub fn drain_delay(self, delay: Duration) -> Self {
        self.arg("--drain-delay")
            .arg(format!("{}ms", delay.as_millis()))
    }

    /// Serves `/metrics` on a listener of its own on a free loopback port
    /// (`--metrics-addr 127.0.0.1:0`); see [`Proxy::metrics_addr`].
    pub fn metrics_listener(mut self) -> Self {
        self.metrics_listener = true;
        self
    }

    /// How long to wait for its `listening` line.
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }

    /// Starts it (listening; not necessarily ready: see [`Proxy::wait_ready`]).
    ///
    /// # Panics
    /// When it does not come up, with its output.
    #[track_caller]
    pub fn start(self) -> Proxy {
        self.try_start().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`ProxyBuilder::start`], but returns the failure instead of panicking.
    pub fn try_start(self) -> Result<Proxy, StartError> {
        let mut proxy = Proxy {
            process: None,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics_addr: None,
            logs: LogDir::new(&self.node_id),
            options: self,
        };
        proxy.spawn(None)?;
        Ok(proxy)
    }
}

/// A running `claw-data-plane`. Killed on drop.
#[derive(Debug)]
pub struct Proxy {
    process: Option<ChildProcess>,
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    logs: LogDir,
    options: ProxyBuilder,
}

impl Proxy {
    /// Starts a proxy of `cp` and returns once it listens.
    #[track_caller]
    pub fn start(cp: &ControlPlane) -> Self {
        Self::builder(cp).start()
    }

    /// Options for a proxy of `cp` (with `--control-plane-ca` when `cp`
    /// serves TLS).
    pub fn builder(cp: &ControlPlane) -> ProxyBuilder {
        let builder = ProxyBuilder::new(cp.grpc_url(), cp.proxy_token());
        match cp.tls() {
            Some(tls) => builder.arg("--control-plane-ca").arg(&tls.ca),
            None => builder,
        }
    }

    fn spawn(&mut self, addr: Option<SocketAddr>) -> Result<(), StartError> {
        let o = &self.options;
        let mut args: Vec<OsString> = vec![
            "--addr".into(),
            addr.map_or_else(|| "127.0.0.1:0".to_owned(), |a| a.to_string())
                .into(),
            "--control-plane".into(),
            o.control_plane.clone().into(),
            "--node-id".into(),
            o.node_id.clone().into(),
        ];
        if o.metrics_listener {
            args.push("--metrics-addr".into());
            args.push(
                self.metrics_addr
                    .map_or_else(|| "127.0.0.1:0".to_owned(), |a| a.to_string())
                    .into(),
            );
        }
        args.extend(o.args.iter().cloned());
        let mut env = vec![
            (
                "CLAW_PROXY_TOKEN".into(),
                Some(o.proxy_token.clone().into()),
            ),
            // Stops are quick unless a test asks for a drain delay
            // (`--drain-delay` or the env, both of which win over this).
            ("CLAW_DP_DRAIN_DELAY".into(), Some("0s".into())),
        ];
        env.extend(o.env.iter().cloned());
        let spec = Spec {
            label: format!("claw-data-plane {}", o.node_id),
            program: binary_path(DATA_PLANE),
            args,
            env,
            log_path: self.log_path(),
            start_timeout: o.start_timeout,
        };
        let (process, listening) = ChildProcess::spawn(&spec)?;
        self.addr = listening.get("http").ok_or_else(|| StartError {
            label: spec.label.clone(),
            reason: format!("its `listening` line has no `http=` address: {listening:?}"),
            status: None,
            output: read_from(&spec.log_path, 0),
        })?;
        if o.metrics_listener {
            self.metrics_addr = Some(listening.get("metrics").ok_or_else(|| StartError {
                label: spec.label.clone(),
                reason: format!("its `listening` line has no `metrics=` address: {listening:?}"),
                status: None,
                output: read_from(&spec.log_path, 0),
            })?);
        }
        self.process = Some(process);
        Ok(())
    }

    /// The address of its separate metrics listener, when started with
    /// [`ProxyBuilder::metrics_listener`].
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The address its HTTP listener took.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ip:port` (the OpenAI API is under `/v1`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://ip:port/v1`, the base URL for OpenAI clients.
    pub fn openai_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Its `--node-id`.
    pub fn node_id(&self) -> &str {
        &self.options.node_id
    }

    /// The process id, when it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(ChildProcess::pid)
    }

    /// Whether `GET /readyz` answers 200 right now.
    pub fn is_ready(&self) -> bool {
        http::request(self.addr, "GET", "/readyz", None, Duration::from_secs(2))
            .is_ok_and(|r| r.status == 200)
    }

    /// Waits until `GET /readyz` is 200 (it holds a config snapshot).
    ///
    /// # Panics
    /// After [`READY_TIMEOUT`], with its log.
    #[track_caller]
    pub fn wait_ready(&self) {
        self.wait_ready_timeout(READY_TIMEOUT);
    }

    /// Like [`Proxy::wait_ready`], with its own timeout.
    #[track_caller]
    pub fn wait_ready_timeout(&self, timeout: Duration) {
        assert!(
            wait_until(timeout, || self.is_ready()),
            "proxy {} at {} not ready within {timeout:?} (its log is printed below, file {})",
            self.node_id(),
            self.addr,
            self.log_path().display()
        );
    }

    /// Its stderr log file, appended across restarts.
    pub fn log_path(&self) -> PathBuf {
        self.logs.file("data-plane.log")
    }

    /// Everything logged so far, across restarts.
    pub fn logs(&self) -> String {
        read_from(&self.log_path(), 0)
    }

    /// Whether the process has not exited yet.
    pub fn is_running(&mut self) -> bool {
        self.process.as_mut().is_some_and(ChildProcess::is_running)
    }

    /// SIGTERM and wait; the exit status, or `None` if not running.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut process = self.process.take()?;
        Some(process.terminate(DEFAULT_STOP_TIMEOUT))
    }

    /// Like [`Proxy::stop`], waiting up to `timeout` (before SIGKILL) for
    /// a drain longer than the default stop timeout.
    pub fn stop_within(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut process = self.process.take()?;
        Some(process.terminate(timeout))
    }

    /// SIGKILL, as in a crash.
    pub fn kill9(&mut self) -> Option<ExitStatus> {
        let mut process = self.process.take()?;
        Some(process.kill9())
    }

    /// Stops it (if running) and starts it again on the same port.
    #[track_caller]
    pub fn restart(&mut self) {
        self.stop();
        self.spawn(Some(self.addr))
            .unwrap_or_else(|e| panic!("{e}"));
    }
}
