//! The control plane in process for the integration tests: the real server
//! on loopback port 0 over a fresh data directory, with a tonic channel to
//! its gRPC listener and clients carrying a bearer token.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use claw_control_plane::config::Config;
use claw_control_plane::crypto::MasterKey;
use claw_control_plane::server::Server;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

pub(crate) const ADMIN: &str = "admin-token-0123456789";
pub(crate) const PROXY: &str = "proxy-token-0123456789";
pub(crate) const KEY1: &str = "1111111111111111111111111111111111111111111111111111111111111111";

/// A server configuration over `data` with master key [`KEY1`] and the
/// [`ADMIN`] / [`PROXY`] tokens.
pub(crate) fn config(data: PathBuf) -> Config {
    Config::new(
        data,
        MasterKey::from_hex(KEY1).expect("key"),
        Some(ADMIN.into()),
        Some(PROXY.into()),
    )
    .expect("config")
}

/// A running server. `stop` shuts it down and checks the shutdown was clean.
pub(crate) struct InProcess {
    /// To the gRPC listener.
    pub channel: Channel,
    /// The HTTP listener (`/healthz`, `/metrics`).
    pub http: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl InProcess {
    /// Opens the store in `config` and serves on fresh loopback ports.
    pub(crate) async fn start(config: Config) -> InProcess {
        let grpc = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let http = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let grpc_addr = grpc.local_addr().expect("addr");
        let http_addr = http.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let server = Server::open(config).await.expect("opens");
        let task = tokio::spawn(server.serve(grpc, http, async move {
            let _ = stopped.await;
        }));
        let channel = Channel::from_shared(format!("http://{grpc_addr}"))
            .expect("uri")
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("connects");
        InProcess {
            channel,
            http: http_addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Shuts the server down; it must stop within 10 s and cleanly.
    pub(crate) async fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .expect("the server stops promptly")
                .expect("joins")
                .expect("clean shutdown");
        }
    }
}

/// A server over a fresh temporary data directory (removed on drop); derefs
/// to its [`InProcess`].
pub(crate) struct Harness {
    _dir: tempfile::TempDir,
    server: InProcess,
}

impl std::ops::Deref for Harness {
    type Target = InProcess;
    fn deref(&self) -> &InProcess {
        &self.server
    }
}

impl Harness {
    /// Starts a server with [`config`] over a fresh data directory.
    pub(crate) async fn start() -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let server = InProcess::start(config(dir.path().join("data"))).await;
        Harness { _dir: dir, server }
    }

    /// The gRPC channel, sending `Bearer token` on every call (nothing when
    /// `None`).
    pub(crate) fn authed(&self, token: Option<&'static str>) -> Authed {
        InterceptedService::new(self.channel.clone(), Bearer(token))
    }

    /// Shuts the server down cleanly (see [`InProcess::stop`]).
    pub(crate) async fn stop(mut self) {
        self.server.stop().await;
    }
}

/// The gRPC channel with a [`Bearer`] token.
pub(crate) type Authed = InterceptedService<Channel, Bearer>;

/// Adds `authorization: Bearer <token>` to every request (nothing when
/// `None`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bearer(pub Option<&'static str>);

impl Interceptor for Bearer {
    fn call(&mut self, mut r: Request<()>) -> Result<Request<()>, Status> {
        if let Some(t) = self.0 {
            let v: MetadataValue<_> = format!("Bearer {t}").parse().expect("ascii");
            r.metadata_mut().insert("authorization", v);
        }
        Ok(r)
    }
}
