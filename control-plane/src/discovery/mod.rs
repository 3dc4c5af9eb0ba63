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
//! The same stream carries incremental messages (cooldowns, rate shares,
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
use crate::proxies::ProxyRegistry;
use crate::shutdown::Shutdown;

pub(crate) use publish::{Debounce, Latest};

/// The largest gRPC message the control plane decodes or encodes on the
/// discovery stream and the admin services whose messages grow with the
/// configuration (backends, client keys, agents, cluster apply/export).
///
/// Sized for 100k client keys and 25k backends: a snapshot of that size is
/// about 20 MiB before compression (a client key ≈ 115 bytes, a backend
/// ≈ 400 bytes; see BENCHMARKS.md "Big configurations"), an `apply` answer
/// with 100k one-time secrets ≈ 10 MiB. 64 MiB leaves 3× headroom and still
/// bounds what one peer can make the control plane buffer. tonic's default
/// (4 MiB) held only ~37k client keys: proxies looped on "decoded message
/// length too large" and revocations stopped reaching them.
pub(crate) const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Applies [`MAX_MESSAGE_BYTES`] both ways and gzip (sent when the peer
/// accepts it, accepted always) to a generated gRPC service.
macro_rules! sized {
    ($service:expr) => {
        $service
            .max_decoding_message_size($crate::discovery::MAX_MESSAGE_BYTES)
            .max_encoding_message_size($crate::discovery::MAX_MESSAGE_BYTES)
            .send_compressed(tonic::codec::CompressionEncoding::Gzip)
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
    };
}
pub(crate) use sized;

/// Responses buffered per stream before sending waits for the proxy.
const OUTBOUND_CAPACITY: usize = 8;

/// What every stream shares.
#[derive(Debug)]
struct Shared {
    catalog: Arc<Catalog>,
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
        registry: Arc<ProxyRegistry>,
        snapshots: Latest,
        stop: Shutdown,
    ) -> Self {
        DiscoveryApi {
            shared: Arc::new(Shared {
                catalog,
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
