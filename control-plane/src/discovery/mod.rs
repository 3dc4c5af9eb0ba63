//! `claw.v1.DiscoveryService`: configuration distribution to data-plane
//! proxies (xDS-style), authenticated with the proxy token.
//!
//! - [`publish`]: one task follows the catalog's configuration version,
//!   debounces bursts of writes (quiet 30 ms, at most 200 ms) and builds
//!   one snapshot per version, shared by every stream.
//! - `session`: one task per stream: hello (must carry `node_id`),
//!   registration in the [`ProxyRegistry`], snapshot pushes, ACK/NACK
//!   bookkeeping by nonce, cleanup.
//! - `nonce`: unique nonces per response.
//!
//! The stream's first snapshot (or, when none is due, a message of its own)
//! carries the complete health table (`health_complete`, also when nothing
//! is excluded). The same stream
//! carries incremental messages (cooldowns, rate shares, health changes,
//! sent by [`crate::fleet`]): any module reaches one proxy or all of them
//! through the [`Push`](crate::proxies::Push) senders the registry holds.
//! Incremental messages (no snapshot) carry no nonce and expect no answer.
//!
//! Shutdown: when the control plane stops, every session ends its response
//! stream itself (long-lived streams would otherwise hold the gRPC server's
//! graceful shutdown open forever). Proxies keep serving their snapshot and
//! reconnect.

mod nonce;
pub(crate) mod publish;
mod session;

use std::sync::Arc;

use claw_proto::v1::discovery_service_server::DiscoveryService;
use claw_proto::v1::{StreamConfigRequest, StreamConfigResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::catalog::Catalog;
use crate::health::table::HealthTable;
use crate::proxies::ProxyRegistry;
use crate::shutdown::Shutdown;

pub(crate) use publish::{Debounce, Latest};

/// Responses buffered per stream before sending waits for the proxy.
const OUTBOUND_CAPACITY: usize = 8;

/// What every stream shares.
#[derive(Debug)]
struct Shared {
    catalog: Arc<Catalog>,
    /// The fleet-wide health table: its complete state opens every stream.
    health: Arc<HealthTable>,
    registry: Arc<ProxyRegistry>,
    snapshots: Latest,
    stop: Shutdown,
    nonces: nonce::Nonces,
}

/// Serves `StreamConfig`.
#[derive(Debug, Clone)]
pub(crate) struct DiscoveryApi {
    shared: Arc<Shared>,
}

impl DiscoveryApi {
    /// A service distributing the snapshots `snapshots` publishes (see
    /// [`publish::spawn`]), recording proxies in `registry`, and ending
    /// every stream once `stop` turns true.
    pub(crate) fn new(
        catalog: Arc<Catalog>,
        health: Arc<HealthTable>,
        registry: Arc<ProxyRegistry>,
        snapshots: Latest,
        stop: Shutdown,
    ) -> Self {
        DiscoveryApi {
            shared: Arc::new(Shared {
                catalog,
                health,
                registry,
                snapshots,
                stop,
                nonces: nonce::Nonces::default(),
            }),
        }
    }
}

#[tonic::async_trait]
impl DiscoveryService for DiscoveryApi {
    type StreamConfigStream = ReceiverStream<Result<StreamConfigResponse, Status>>;

    async fn stream_config(
        &self,
        request: Request<Streaming<StreamConfigRequest>>,
    ) -> Result<Response<Self::StreamConfigStream>, Status> {
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let (tx, rx) = mpsc::channel(OUTBOUND_CAPACITY);
        // Answer with the response headers at once and read the hello in
        // the session: a client may wait for headers before it sends.
        tokio::spawn(session::run(
            self.shared.clone(),
            peer,
            request.into_inner(),
            tx,
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
