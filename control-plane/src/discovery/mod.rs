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

/// The largest gRPC message the control plane decodes or encodes on the
/// discovery stream and the admin services whose messages grow with the
/// configuration (backends, client keys, agents, cluster apply/export).
///
/// Sized for 100k client keys and 25k backends: a snapshot of that size is
/// about 17 MB before compression (a client key ≈ 120 bytes, a backend
/// ≈ 210 bytes; see BENCHMARKS.md "Big configurations"), an `apply` answer
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

#[cfg(test)]
mod size_tests {
    use claw_proto::v1::{ModelMapping, Snapshot, SnapshotBackend, SnapshotClientKey};
    use prost::Message;

    /// A snapshot shaped like a real one: `keys` client keys (id, name,
    /// 64-hex secret hash, one model) and `backends` backends (URL, key,
    /// two model mappings).
    fn synthetic(keys: usize, backends: usize) -> Snapshot {
        let hex = |i: usize| {
            format!(
                "{:064x}",
                (i as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c)
            )
        };
        Snapshot {
            version: 7,
            client_keys: (0..keys)
                .map(|i| SnapshotClientKey {
                    id: format!("ck_{:016x}", i.wrapping_mul(0x9e37_79b9)),
                    name: format!("team-{}-app-{i:06}", i % 97),
                    secret_sha256: hex(i),
                    models: vec!["gpt-4o".into()],
                    rpm: 600,
                    ..Default::default()
                })
                .collect(),
            backends: (0..backends)
                .map(|i| SnapshotBackend {
                    id: format!("be_{:016x}", i.wrapping_mul(0x7f4a_7c15)),
                    name: format!("provider-{}-{i:05}", i % 13),
                    base_url: format!("https://llm-{i:05}.example.com/v1"),
                    api_key: format!("sk-{}", &hex(i + 1)[..48]),
                    rpm: 10_000,
                    timeout_ms: 60_000,
                    weight: 1,
                    enabled: true,
                    models: vec![
                        ModelMapping {
                            canonical: "gpt-4o".into(),
                            native: "gpt-4o-2024-08-06".into(),
                            ..Default::default()
                        },
                        ModelMapping {
                            canonical: "gpt-4o-mini".into(),
                            native: "gpt-4o-mini-2024-07-18".into(),
                            ..Default::default()
                        },
                    ],
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn the_issue_scale_fits_the_message_limit_with_headroom() {
        let keys = synthetic(100_000, 0).encoded_len();
        let backends = synthetic(0, 25_000).encoded_len();
        let both = synthetic(100_000, 25_000).encoded_len();
        // The old 4 MiB limit held fewer keys than the issue's 40k; the
        // new one holds 3× the issue's scale.
        assert!(synthetic(40_000, 0).encoded_len() > 4 << 20);
        assert!(both * 3 < super::MAX_MESSAGE_BYTES, "{both} bytes");
        eprintln!("snapshot bytes: 100k keys {keys}, 25k backends {backends}, both {both}");
    }

    /// Writes the 100k keys + 25k backends snapshot to $CLAW_SNAPSHOT_OUT
    /// (tests/bench/big_config.sh compresses it to report the wire size).
    #[test]
    #[ignore = "benchmark helper: tests/bench/big_config.sh"]
    fn write_the_issue_scale_snapshot() {
        let path = std::env::var("CLAW_SNAPSHOT_OUT").unwrap_or_else(|_| "snapshot.bin".into());
        std::fs::write(&path, synthetic(100_000, 25_000).encode_to_vec()).expect("write");
    }
}
