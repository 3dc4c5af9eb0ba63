//! The real `claw-control-plane` as a child process.

use super::binary::{CONTROL_PLANE, binary_path};
use super::child::{
    ChildProcess, DEFAULT_START_TIMEOUT, DEFAULT_STOP_TIMEOUT, Spec, StartError, read_from,
};
use super::ctl::{CtlCommand, CtlOutput};
use super::logs::LogDir;
use super::secrets::random_hex;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;
use tempfile::TempDir;

const LOCALHOST_ANY_PORT: &str = "127.0.0.1:0";

/// Options for starting a control plane; get one from [`ControlPlane::builder`].
#[derive(Debug, Clone)]
pub struct ControlPlaneBuilder {
    master_key: String,
    admin_token: String,
    proxy_token: String,
    data_dir: Option<PathBuf>,
    env: Vec<(OsString, Option<OsString>)>,
    args: Vec<OsString>,
    start_timeout: Duration,
    tls: Option<TlsFiles>,
    allow_loopback_webhooks: bool,
}

/// The PEM files of a control plane serving TLS.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// `--tls-cert`.
    pub cert: PathBuf,
    /// `--tls-key`.
    pub key: PathBuf,
    /// The CA clients trust it through (`clawctl --ca-cert`,
    /// `claw-data-plane --control-plane-ca`).
    pub ca: PathBuf,
}

impl Default for ControlPlaneBuilder {
    fn default() -> Self {
        Self {
            master_key: random_hex(32),
            admin_token: format!("admin-{}", random_hex(16)),
            proxy_token: format!("proxy-{}", random_hex(16)),
            data_dir: None,
            env: Vec::new(),
            args: Vec::new(),
            start_timeout: DEFAULT_START_TIMEOUT,
            tls: None,
            allow_loopback_webhooks: true,
        }
    }
}

impl ControlPlaneBuilder {
    /// The master key, 64 hex characters (random by default).
    pub fn master_key(mut self, hex: impl Into<String>) -> Self {
        self.master_key = hex.into();
        self
    }

    /// The admin token (`CLAW_ADMIN_TOKEN`, random by default) that `clawctl` and the admin API use.
    pub fn admin_token(mut self, token: impl Into<String>) -> Self {
        self.admin_token = token.into();
        self
    }

    /// The token proxies present (`CLAW_PROXY_TOKEN`, random by default).
    pub fn proxy_token(mut self, token: impl Into<String>) -> Self {
        self.proxy_token = token.into();
        self
    }

    /// Uses (and keeps) this data dir instead of a fresh temp dir.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    /// Sets an environment variable (applied after the harness's own, so it
    /// can override `CLAW_MASTER_KEY` and friends).
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), Some(value.into())));
        self
    }

    /// Removes an environment variable the harness would set, e.g.
    /// `CLAW_MASTER_KEY` to test `CLAW_MASTER_KEY_FILE`.
    pub fn env_remove(mut self, key: impl Into<OsString>) -> Self {
        self.env.push((key.into(), None));
        self
    }

    /// Where heartbeat runs are sent (`CLAW_HEARTBEAT_PROXY`).
    pub fn heartbeat_proxy(self, url: impl Into<OsString>) -> Self {
        self.env("CLAW_HEARTBEAT_PROXY", url)
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

    /// Serves both listeners over TLS (`--tls-cert`, `--tls-key`); the
    /// URLs become `https://`, `clawctl` gets `--ca-cert` and proxies of
    /// [`super::Proxy::builder`] `--control-plane-ca`.
    pub fn tls(mut self, files: TlsFiles) -> Self {
        self.tls = Some(files);
        self
    }

    /// Whether it runs with `--allow-loopback-webhooks` (on by default: the
    /// tests' webhook receivers and agent runtimes listen on 127.0.0.1);
    /// `false` starts it with the production default, loopback refused.
    pub fn allow_loopback_webhooks(mut self, allow: bool) -> Self {
        self.allow_loopback_webhooks = allow;
        self
    }

    /// How long to wait for the `listening` line.
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }

    /// Starts it.
    ///
    /// # Panics
    /// When it does not come up, with its output.
    #[track_caller]
    pub fn start(self) -> ControlPlane {
        self.try_start().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts it, returning a failure to come up as an error.
    pub fn try_start(self) -> Result<ControlPlane, StartError> {
        let (data_dir, data_tmp) = match &self.data_dir {
            Some(dir) => (dir.clone(), None),
            None => {
                let tmp = tempfile::Builder::new()
                    .prefix("claw-cp-data-")
                    .tempdir()
                    .unwrap_or_else(|e| panic!("cannot create a temp data dir: {e}"));
                (tmp.path().to_path_buf(), Some(tmp))
            }
        };
        let mut cp = ControlPlane {
            process: None,
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir,
            logs: LogDir::new("control-plane"),
            options: self,
            _data_tmp: data_tmp,
        };
        cp.spawn(None)?;
        Ok(cp)
    }
}

/// A running `claw-control-plane` with a temp data dir, random master key
/// and tokens. Killed on drop (its data dir and logs are temp dirs too,
/// logs kept when the test fails).
#[derive(Debug)]
pub struct ControlPlane {
    // Field order is drop order: the process goes before its directories.
    process: Option<ChildProcess>,
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    data_dir: PathBuf,
    logs: LogDir,
    options: ControlPlaneBuilder,
    _data_tmp: Option<TempDir>,
}

impl ControlPlane {
    /// Starts one with a fresh temp data dir and random credentials.
    ///
    /// # Panics
    /// When it does not come up, with its output.
    #[track_caller]
    pub fn start() -> Self {
        Self::builder().start()
    }

    /// Options for a control plane, to change before [`ControlPlaneBuilder::start`].
    pub fn builder() -> ControlPlaneBuilder {
        ControlPlaneBuilder::default()
    }

    /// Spawns the process. `ports` reuses previous addresses (a restart),
    /// so proxies and clients configured with them find it again.
    fn spawn(&mut self, ports: Option<(SocketAddr, SocketAddr)>) -> Result<(), StartError> {
        let (grpc, http) = match ports {
            Some((g, h)) => (g.to_string(), h.to_string()),
            None => (LOCALHOST_ANY_PORT.to_owned(), LOCALHOST_ANY_PORT.to_owned()),
        };
        let o = &self.options;
        let mut args: Vec<OsString> = vec![
            "--data-dir".into(),
            self.data_dir.clone().into(),
            "--grpc-addr".into(),
            grpc.into(),
            "--http-addr".into(),
            http.into(),
        ];
        if let Some(tls) = &o.tls {
            args.extend([
                "--tls-cert".into(),
                tls.cert.clone().into(),
                "--tls-key".into(),
                tls.key.clone().into(),
            ]);
        }
        if o.allow_loopback_webhooks {
            args.push("--allow-loopback-webhooks".into());
        }
        args.extend(o.args.iter().cloned());
        let mut env: Vec<(OsString, Option<OsString>)> = vec![
            ("CLAW_MASTER_KEY".into(), Some(o.master_key.clone().into())),
            (
                "CLAW_ADMIN_TOKEN".into(),
                Some(o.admin_token.clone().into()),
            ),
            (
                "CLAW_PROXY_TOKEN".into(),
                Some(o.proxy_token.clone().into()),
            ),
            // No active health probes unless a test asks for them (they
            // would add `GET /v1/models` requests to the mocks' records and
            // mark wrong keys auth_failed at random times).
            ("CLAW_PROBE_INTERVAL".into(), Some("0".into())),
        ];
        env.extend(o.env.iter().cloned());
        let spec = Spec {
            label: "claw-control-plane".to_owned(),
            program: binary_path(CONTROL_PLANE),
            args,
            env,
            log_path: self.log_path(),
            start_timeout: o.start_timeout,
        };
        let (process, listening) = ChildProcess::spawn(&spec)?;
        let addr = |key: &str| {
            listening.get(key).ok_or_else(|| StartError {
                label: spec.label.clone(),
                reason: format!("its `listening` line has no `{key}=` address: {listening:?}"),
                status: None,
                output: read_from(&spec.log_path, 0),
            })
        };
        self.grpc_addr = addr("grpc")?;
        self.http_addr = addr("http")?;
        self.process = Some(process);
        Ok(())
    }

    /// The address of the gRPC API.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The address of the health/metrics listener.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// `http://ip:port` (`https://` with TLS) of the gRPC API (for
    /// `clawctl --server` and proxies).
    pub fn grpc_url(&self) -> String {
        format!("{}://{}", self.scheme(), self.grpc_addr)
    }

    /// `http://ip:port` (`https://` with TLS) of the health/metrics listener.
    pub fn http_url(&self) -> String {
        format!("{}://{}", self.scheme(), self.http_addr)
    }

    fn scheme(&self) -> &'static str {
        if self.options.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// Its TLS files, when it serves TLS.
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.options.tls.as_ref()
    }

    /// The admin token it runs with.
    pub fn admin_token(&self) -> &str {
        &self.options.admin_token
    }

    /// The token its proxies present.
    pub fn proxy_token(&self) -> &str {
        &self.options.proxy_token
    }

    /// The master key it currently runs with (64 hex characters).
    pub fn master_key(&self) -> &str {
        &self.options.master_key
    }

    /// Its data dir (a temp dir unless one was given).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The stderr log, appended across restarts (outside the data dir).
    pub fn log_path(&self) -> PathBuf {
        self.logs.file("control-plane.log")
    }

    /// Everything logged so far, across restarts.
    pub fn logs(&self) -> String {
        read_from(&self.log_path(), 0)
    }

    /// Makes sure [`ControlPlane::logs`] shows everything written so far.
    /// Stderr goes straight to the file, so this is only a file sync; it
    /// exists so tests state that they depend on it.
    pub fn flush_logs(&self) {
        if let Ok(file) = std::fs::File::open(self.log_path()) {
            let _ = file.sync_all();
        }
    }

    /// The process id, when it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(ChildProcess::pid)
    }

    /// Whether the process has not exited yet.
    pub fn is_running(&mut self) -> bool {
        self.process.as_mut().is_some_and(ChildProcess::is_running)
    }

    /// SIGTERM and wait (SIGKILL after 10 s); returns the exit status, or
    /// `None` when it was not running.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut process = self.process.take()?;
        Some(process.terminate(DEFAULT_STOP_TIMEOUT))
    }

    /// [`ControlPlane::stop`], asserting a clean exit (status 0).
    #[track_caller]
    pub fn stop_clean(&mut self) {
        let status = self.stop();
        assert!(
            status.is_none_or(|s| s.success()),
            "control plane exited with {status:?} on SIGTERM; log:\n{}",
            self.logs()
        );
    }

    /// SIGKILL: no chance to clean up, as in a crash.
    pub fn kill9(&mut self) -> Option<ExitStatus> {
        let mut process = self.process.take()?;
        Some(process.kill9())
    }

    /// Stops it (if running) and starts it again with the same data dir,
    /// key, tokens and ports.
    ///
    /// # Panics
    /// When it does not come back.
    #[track_caller]
    pub fn restart(&mut self) {
        self.try_restart().unwrap_or_else(|e| panic!("{e}"));
    }

    /// [`ControlPlane::restart`] returning a failure to come up.
    pub fn try_restart(&mut self) -> Result<(), StartError> {
        self.stop();
        self.spawn(Some((self.grpc_addr, self.http_addr)))
    }

    /// Restarts on fresh ephemeral ports; read the new addresses afterwards.
    #[track_caller]
    pub fn restart_on_new_ports(&mut self) {
        self.stop();
        self.spawn(None).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Restarts with another master key, which it keeps using from now on.
    #[track_caller]
    pub fn restart_with_master_key(&mut self, hex: &str) {
        self.options.master_key = hex.to_owned();
        self.restart();
    }

    /// Stops it and tries to start it with master key `hex`, expecting it to
    /// refuse; returns what it printed. The key it runs with is unchanged.
    ///
    /// # Panics
    /// When it starts anyway.
    #[track_caller]
    pub fn try_start_with_master_key(&mut self, hex: &str) -> String {
        self.stop();
        let previous = std::mem::replace(&mut self.options.master_key, hex.to_owned());
        let result = self.spawn(Some((self.grpc_addr, self.http_addr)));
        self.options.master_key = previous;
        match result {
            Err(e) => e.output,
            Ok(()) => {
                self.stop();
                panic!("the control plane started with master key {hex}; expected a refusal")
            }
        }
    }

    /// A `clawctl` command with `--server` and `--token` set, to add env,
    /// stdin or run asynchronously.
    pub fn ctl<S: AsRef<str>>(&self, args: &[S]) -> CtlCommand {
        let cmd = CtlCommand::new(args)
            .server(&self.grpc_url())
            .token(self.admin_token());
        match &self.options.tls {
            Some(tls) => cmd.ca_cert(&tls.ca),
            None => cmd,
        }
    }

    /// Runs `clawctl --server … --token <admin> ARGS…`.
    pub fn clawctl<S: AsRef<str>>(&self, args: &[S]) -> CtlOutput {
        self.ctl(args).run()
    }

    /// [`ControlPlane::clawctl`] with extra environment variables.
    pub fn clawctl_with_env<S: AsRef<str>>(&self, args: &[S], env: &[(&str, &str)]) -> CtlOutput {
        env.iter()
            .fold(self.ctl(args), |cmd, (k, v)| cmd.env(k, v))
            .run()
    }

    /// [`ControlPlane::clawctl`] with `stdin` fed to it.
    pub fn clawctl_stdin<S: AsRef<str>>(&self, args: &[S], stdin: &str) -> CtlOutput {
        self.ctl(args).stdin(stdin).run()
    }

    /// Runs clawctl with another token (e.g. to prove it is refused).
    pub fn clawctl_with_token<S: AsRef<str>>(&self, token: &str, args: &[S]) -> CtlOutput {
        CtlCommand::new(args)
            .server(&self.grpc_url())
            .token(token)
            .run()
    }
}

/// Runs the offline check (`claw-control-plane check --data-dir DIR`) on a
/// stopped control plane's data dir with `CLAW_MASTER_KEY=master_key` (and
/// neither `CLAW_MASTER_KEY_FILE` nor `CLAW_DATA_DIR` inherited); returns
/// its output (a zero exit when the store is sound).
///
/// # Panics
/// When the binary cannot be run.
pub fn offline_check(data_dir: &Path, master_key: &str) -> std::process::Output {
    std::process::Command::new(binary_path(CONTROL_PLANE))
        .arg("check")
        .arg("--data-dir")
        .arg(data_dir)
        .env("CLAW_MASTER_KEY", master_key)
        .env_remove("CLAW_MASTER_KEY_FILE")
        .env_remove("CLAW_DATA_DIR")
        .output()
        .expect("claw-control-plane check runs")
}
