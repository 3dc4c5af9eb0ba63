//! The control plane in process for the integration tests: the real server
//! on loopback port 0, with a tonic channel to its gRPC listener.

#![allow(dead_code)] // each test binary uses a different part of it

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use claw_control_plane::config::Config;
use claw_control_plane::crypto::MasterKey;
use claw_control_plane::server::Server;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Channel;

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
