//! The discovery stream against an in-test control plane: hello, ACK, NACK
//! keeping the previous snapshot, readiness, and reconnecting.

use std::pin::Pin;
use std::time::Duration;

use crate::support::*;
use claw_data_plane::{Config, Proxy};
use claw_proto::Pool;
use claw_proto::v1::discovery_service_server::{DiscoveryService, DiscoveryServiceServer};
use claw_proto::v1::{StreamConfigRequest, StreamConfigResponse};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

type Inbound = mpsc::Sender<(
    Option<String>,
    Streaming<StreamConfigRequest>,
    mpsc::Sender<Result<StreamConfigResponse, Status>>,
)>;

struct Cp {
    streams: Inbound,
}

#[tonic::async_trait]
impl DiscoveryService for Cp {
    type StreamConfigStream =
        Pin<Box<dyn Stream<Item = Result<StreamConfigResponse, Status>> + Send>>;

    async fn stream_config(
        &self,
        req: Request<Streaming<StreamConfigRequest>>,
    ) -> Result<Response<Self::StreamConfigStream>, Status> {
        let auth = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        let (tx, rx) = mpsc::channel(8);
        self.streams
            .send((auth, req.into_inner(), tx))
            .await
            .unwrap();
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

async fn recv(s: &mut Streaming<StreamConfigRequest>) -> StreamConfigRequest {
    tokio::time::timeout(Duration::from_secs(5), s.message())
        .await
        .expect("message in time")
        .unwrap()
        .expect("stream open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applies_acks_nacks_and_reconnects() {
    let (streams_tx, mut streams) = mpsc::channel(4);
    let cp_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cp_addr = cp_listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(DiscoveryServiceServer::new(Cp {
                streams: streams_tx,
            }))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(cp_listener)),
    );

    let config = Config::control_plane("node-a", format!("http://{cp_addr}"), "proxy-secret");
    let proxy = Proxy::new(config).unwrap();
    let store = proxy.store().clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(proxy.serve(listener, async move {
        let _ = stop_rx.await;
    }));
    let c = reqwest::Client::new();
    let readyz = |c: reqwest::Client| async move {
        c.get(format!("http://{addr}/readyz"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };

    let (auth, mut inbound, out) = tokio::time::timeout(Duration::from_secs(5), streams.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(auth.as_deref(), Some("Bearer proxy-secret"));
    let hello = recv(&mut inbound).await;
    assert_eq!((hello.node_id.as_str(), hello.version), ("node-a", 0));
    assert_eq!(readyz(c.clone()).await, 503);

    let mut snap = snapshot(vec![backend(
        "a",
        "http://127.0.0.1:9/v1",
        Pool::Primary,
        &[("gpt", "m")],
    )]);
    snap.version = 3;
    out.send(Ok(StreamConfigResponse {
        version: 3,
        nonce: "n1".into(),
        snapshot: Some(snap.clone()),
        ..Default::default()
    }))
    .await
    .unwrap();
    let ack = recv(&mut inbound).await;
    assert_eq!(
        (
            ack.version,
            ack.response_nonce.as_str(),
            ack.error_detail.as_str()
        ),
        (3, "n1", "")
    );
    assert_eq!(store.version(), 3);
    assert_eq!(readyz(c.clone()).await, 200);

    // A snapshot with an invalid resource (a duplicate backend id) is
    // applied without it and ACKed, naming what was left out (issue 17: one
    // bad resource must not freeze the configuration).
    let mut dup = snap.clone();
    dup.version = 4;
    dup.backends.push(dup.backends[0].clone());
    out.send(Ok(StreamConfigResponse {
        version: 4,
        nonce: "n2".into(),
        snapshot: Some(dup),
        ..Default::default()
    }))
    .await
    .unwrap();
    let ack = recv(&mut inbound).await;
    assert_eq!(
        (
            ack.version,
            ack.response_nonce.as_str(),
            ack.error_detail.as_str()
        ),
        (4, "n2", "")
    );
    assert!(
        ack.excluded
            .iter()
            .any(|e| e.kind == "backend" && e.reason.contains("duplicate")),
        "{:?}",
        ack.excluded
    );
    assert_eq!(store.version(), 4);

    // A snapshot the proxy cannot use at all (its version disagrees with
    // the message's) is NACKed and the previous one kept.
    let mut bad = snap.clone();
    bad.version = 6;
    out.send(Ok(StreamConfigResponse {
        version: 5,
        nonce: "n3".into(),
        snapshot: Some(bad),
        ..Default::default()
    }))
    .await
    .unwrap();
    let nack = recv(&mut inbound).await;
    assert_eq!((nack.version, nack.response_nonce.as_str()), (4, "n3"));
    assert!(!nack.error_detail.is_empty(), "a NACK says why");
    assert_eq!(store.version(), 4);

    // The control plane goes away: the proxy keeps serving, then reconnects
    // and says which version it holds.
    drop(out);
    drop(inbound);
    assert_eq!(readyz(c.clone()).await, 200);
    let (_, mut inbound, _out) = tokio::time::timeout(Duration::from_secs(5), streams.recv())
        .await
        .unwrap()
        .unwrap();
    let hello = recv(&mut inbound).await;
    assert_eq!(hello.version, 4);

    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
