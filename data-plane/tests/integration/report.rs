//! The report stream against an in-test control plane: numbered batches,
//! ACKs, resending what was not acknowledged after the stream drops, and
//! usage that matches the mock upstream's own record.

use std::pin::Pin;
use std::time::Duration;

use crate::support::*;
use claw_data_plane::{Config, Proxy};
use claw_proto::Pool;
use claw_proto::v1::discovery_service_server::{DiscoveryService, DiscoveryServiceServer};
use claw_proto::v1::report_service_server::{ReportService, ReportServiceServer};
use claw_proto::v1::{
    CooldownUpdate, FailureKind, StreamConfigRequest, StreamConfigResponse, StreamReportsRequest,
    StreamReportsResponse,
};
use claw_tests::mock::{Action, MockConfig, MockUpstream};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

type Out<T> = mpsc::Sender<Result<T, Status>>;

/// Serves one snapshot to every discovery stream and hands every report
/// stream to the test.
struct Cp {
    snapshot: claw_proto::v1::Snapshot,
    discovery: mpsc::Sender<Out<StreamConfigResponse>>,
    reports: mpsc::Sender<(Streaming<StreamReportsRequest>, Out<StreamReportsResponse>)>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl DiscoveryService for Cp {
    type StreamConfigStream = BoxStream<StreamConfigResponse>;

    async fn stream_config(
        &self,
        req: Request<Streaming<StreamConfigRequest>>,
    ) -> Result<Response<Self::StreamConfigStream>, Status> {
        let (tx, rx) = mpsc::channel(8);
        let mut inbound = req.into_inner();
        tx.send(Ok(StreamConfigResponse {
            version: self.snapshot.version,
            nonce: "n1".into(),
            snapshot: Some(self.snapshot.clone()),
            ..Default::default()
        }))
        .await
        .unwrap();
        // The whole limit, as a control plane with one proxy would grant
        // (without shares the proxy waits at share 0 for a few seconds).
        tx.send(Ok(StreamConfigResponse {
            version: self.snapshot.version,
            rate_shares: Some(claw_proto::v1::RateShares {
                client_keys: Vec::new(),
                client_key_default_share: None,
                proxy_count: 1,
                backends: self
                    .snapshot
                    .backends
                    .iter()
                    .map(|b| claw_proto::v1::BackendShare {
                        backend_id: b.id.clone(),
                        rpm_share: 1.0,
                        tpm_share: 1.0,
                    })
                    .collect(),
            }),
            ..Default::default()
        }))
        .await
        .unwrap();
        // Keep reading ACKs so the stream stays open.
        tokio::spawn(async move { while let Ok(Some(_)) = inbound.message().await {} });
        let _ = self.discovery.send(tx.clone()).await;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[tonic::async_trait]
impl ReportService for Cp {
    type StreamReportsStream = BoxStream<StreamReportsResponse>;

    async fn stream_reports(
        &self,
        req: Request<Streaming<StreamReportsRequest>>,
    ) -> Result<Response<Self::StreamReportsStream>, Status> {
        assert_eq!(
            req.metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok()),
            Some("Bearer proxy-secret")
        );
        let (tx, rx) = mpsc::channel(64);
        self.reports.send((req.into_inner(), tx)).await.unwrap();
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

struct Harness {
    proxy: std::net::SocketAddr,
    discovery: mpsc::Receiver<Out<StreamConfigResponse>>,
    reports: mpsc::Receiver<(Streaming<StreamReportsRequest>, Out<StreamReportsResponse>)>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Harness {
    async fn start(node: &str, snapshot: claw_proto::v1::Snapshot) -> Self {
        Self::start_with(node, snapshot, |_| {}).await
    }

    /// Like [`Harness::start`], with `tweak` applied to the proxy's config
    /// (20 ms report ticks unless it says otherwise).
    async fn start_with(
        node: &str,
        snapshot: claw_proto::v1::Snapshot,
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        let (dtx, discovery) = mpsc::channel(4);
        let (rtx, reports) = mpsc::channel(4);
        let cp = std::sync::Arc::new(Cp {
            snapshot,
            discovery: dtx,
            reports: rtx,
        });
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let cp_addr = l.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(DiscoveryServiceServer::from_arc(cp.clone()))
                .add_service(ReportServiceServer::from_arc(cp))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
        );
        let mut config = Config::control_plane(node, format!("http://{cp_addr}"), "proxy-secret");
        config.report.flush_interval = Duration::from_millis(20);
        tweak(&mut config);
        let proxy = Proxy::new(config).unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(proxy.serve(l, async move {
            let _ = rx.await;
        }));
        let h = Harness {
            proxy: addr,
            discovery,
            reports,
            stop: Some(stop),
            task,
        };
        for _ in 0..100 {
            let ready = reqwest::get(format!("http://{addr}/readyz")).await;
            if ready.is_ok_and(|r| r.status() == 200) {
                return h;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("proxy never became ready");
    }

    async fn next_stream(
        &mut self,
    ) -> (Streaming<StreamReportsRequest>, Out<StreamReportsResponse>) {
        tokio::time::timeout(Duration::from_secs(5), self.reports.recv())
            .await
            .expect("a report stream in time")
            .unwrap()
    }

    async fn post(&self, body: serde_json::Value) -> reqwest::Response {
        reqwest::Client::new()
            .post(format!("http://{}/v1/chat/completions", self.proxy))
            .bearer_auth(CLIENT_KEY)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

async fn recv(s: &mut Streaming<StreamReportsRequest>) -> StreamReportsRequest {
    tokio::time::timeout(Duration::from_secs(5), s.message())
        .await
        .expect("a batch in time")
        .unwrap()
        .expect("stream open")
}

/// Requests summed in a batch's usage rows.
fn requests(b: &StreamReportsRequest) -> u64 {
    b.usage_aggregates
        .iter()
        .map(|a| a.totals.as_ref().map_or(0, |t| t.requests))
        .sum()
}

/// Reads batches until the usage of `n` requests arrived; returns the batches.
async fn batches_until_usage(
    s: &mut Streaming<StreamReportsRequest>,
    n: u64,
) -> Vec<StreamReportsRequest> {
    let mut out: Vec<StreamReportsRequest> = Vec::new();
    while out.iter().map(requests).sum::<u64>() < n {
        out.push(recv(s).await);
    }
    out
}

fn chat(stream: bool) -> serde_json::Value {
    serde_json::json!({"model": "mock-model", "stream": stream, "messages": [{"role": "user", "content": "one two three"}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_numbered_acked_and_resent_after_a_dropped_stream() {
    let up = MockUpstream::start(MockConfig::default().api_key("sk-up-a")).await;
    let mut h = Harness::start(
        "node-r",
        snapshot(vec![backend(
            "a",
            &up.url(),
            Pool::Primary,
            &[("mock-model", "mock-model")],
        )]),
    )
    .await;

    let (mut s1, out1) = h.next_stream().await;
    let hello = recv(&mut s1).await;
    assert_eq!((hello.node_id.as_str(), hello.seq), ("node-r", 0));
    assert!(hello.usage.is_empty() && hello.usage_aggregates.is_empty());
    let epoch = hello.stream_epoch.clone();

    // Three requests, one at a time: three batches (20 ms flushes).
    for stream in [false, true, true] {
        let res = h.post(chat(stream)).await;
        assert_eq!(res.status(), 200);
        res.bytes().await.unwrap();
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    let first = batches_until_usage(&mut s1, 3).await;
    let seqs: Vec<u64> = first.iter().map(|b| b.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    assert!(first.iter().all(|b| b.stream_epoch == epoch));
    // Usage equals the mock's record, streams without include_usage included.
    let records = up.wait_for_requests(3, Duration::from_secs(5)).await;
    assert!(
        first.iter().all(|b| b.usage.is_empty()),
        "usage goes summed"
    );
    let rows: Vec<_> = first
        .iter()
        .flat_map(|b| b.usage_aggregates.clone())
        .collect();
    assert!(
        rows.iter()
            .all(|a| a.backend_id == "a" && a.model == "mock-model")
    );
    let sum = |f: fn(&claw_proto::v1::UsageTotals) -> u64| -> u64 {
        rows.iter().map(|a| f(a.totals.as_ref().unwrap())).sum()
    };
    assert_eq!(sum(|t| t.requests), 3);
    assert_eq!(sum(|t| t.errors), 0);
    assert_eq!(sum(|t| t.streamed), 2);
    assert_eq!(
        sum(|t| t.prompt_tokens),
        records.iter().map(|r| r.prompt_tokens).sum::<u64>()
    );
    assert_eq!(
        sum(|t| t.completion_tokens),
        records
            .iter()
            .map(|r| r.completion_tokens_sent)
            .sum::<u64>()
    );
    let demand: u64 = first
        .iter()
        .flat_map(|b| &b.demand)
        .map(|d| d.requests)
        .sum();
    assert_eq!(demand, 3);

    // ACK all but the last batch, then the control plane drops the stream.
    let last = *seqs.last().unwrap();
    out1.send(Ok(StreamReportsResponse {
        acked_seq: last - 1,
    }))
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(out1);
    drop(s1);

    // Reconnected: hello, then only the unacknowledged batch, unchanged.
    let (mut s2, out2) = h.next_stream().await;
    let hello = recv(&mut s2).await;
    assert_eq!(
        (hello.seq, hello.stream_epoch.as_str()),
        (0, epoch.as_str())
    );
    let resent = recv(&mut s2).await;
    assert_eq!(resent.seq, last);
    assert_eq!(resent, *first.last().unwrap());

    // New batches continue the numbering; ACKed ones never come back.
    let res = h.post(chat(false)).await;
    res.bytes().await.unwrap();
    let more = batches_until_usage(&mut s2, 1).await;
    assert!(more.iter().all(|b| b.seq > last), "{more:?}");
    let top = more.last().unwrap().seq;
    out2.send(Ok(StreamReportsResponse { acked_seq: top }))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(out2);
    drop(s2);
    let (mut s3, _out3) = h.next_stream().await;
    assert_eq!(recv(&mut s3).await.seq, 0);
    // Nothing to resend: at most an idle proxy's empty batch, numbered on.
    let quiet = tokio::time::timeout(Duration::from_millis(300), s3.message()).await;
    if let Ok(Ok(Some(b))) = &quiet {
        assert!(b.seq > top && requests(b) == 0, "a resend: {b:?}");
    } else {
        assert!(quiet.is_err(), "nothing to resend: {quiet:?}");
    }
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filling_outcome_channel_is_drained_before_the_tick() {
    let up = MockUpstream::start(MockConfig::default().api_key("sk-up-a")).await;
    // Room for 8 outcomes, a batch a second: 40 requests in well under a
    // second fit only if the collector drains before its tick.
    let mut h = Harness::start_with(
        "node-f",
        snapshot(vec![backend(
            "a",
            &up.url(),
            Pool::Primary,
            &[("mock-model", "mock-model")],
        )]),
        |c| {
            c.events_capacity = 8;
            c.report.flush_interval = Duration::from_secs(1);
        },
    )
    .await;
    let (mut s, _out) = h.next_stream().await;
    assert_eq!(recv(&mut s).await.seq, 0);
    let started = std::time::Instant::now();
    for _ in 0..40 {
        let res = h.post(chat(false)).await;
        assert_eq!(res.status(), 200);
        res.bytes().await.unwrap();
    }
    let sent_in = started.elapsed();
    let batches = batches_until_usage(&mut s, 40).await;
    assert_eq!(batches.iter().map(requests).sum::<u64>(), 40);
    let metrics = reqwest::get(format!("http://{}/metrics", h.proxy))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !metrics.contains("claw_dp_events_dropped_total"),
        "outcomes were dropped (40 requests took {sent_in:?}):\n{metrics}"
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_is_reported_at_once_and_remote_cooldowns_apply() {
    let a = MockUpstream::start(MockConfig::default().api_key("sk-up-a")).await;
    let b = MockUpstream::start(MockConfig::default().api_key("sk-up-b")).await;
    let mut h = Harness::start(
        "node-q",
        snapshot(vec![
            backend(
                "a",
                &a.url(),
                Pool::Primary,
                &[("mock-model", "mock-model")],
            ),
            backend(
                "b",
                &b.url(),
                Pool::Fallback,
                &[("mock-model", "mock-model")],
            ),
        ]),
    )
    .await;
    let (mut s, _out) = h.next_stream().await;
    assert_eq!(recv(&mut s).await.seq, 0);

    a.push(Action::rate_limited(Some(7)));
    let res = h.post(chat(false)).await;
    assert_eq!(res.status(), 200, "answered by the fallback");
    let batch = loop {
        let b = recv(&mut s).await;
        if !b.failures.is_empty() {
            break b;
        }
    };
    let f = &batch.failures[0];
    assert_eq!(f.backend_id, "a");
    assert_eq!(f.kind, FailureKind::RateLimited as i32);
    assert_eq!((f.status, f.retry_after_ms, f.consecutive), (429, 7000, 1));
    assert_eq!(f.cooldown_ms, 7000);

    // A cooldown another proxy started, pushed incrementally: b cools too,
    // and the next request has nowhere to go but the emergency bucket or a 503.
    let dout = tokio::time::timeout(Duration::from_secs(5), h.discovery.recv())
        .await
        .unwrap()
        .unwrap();
    dout.send(Ok(StreamConfigResponse {
        version: 1,
        cooldowns: vec![CooldownUpdate {
            backend_id: "b".into(),
            until_unix_ms: 0,
            remaining_ms: 30_000,
            consecutive: 2,
            source_node_id: "node-other".into(),
            quota_exhausted: false,
            auth_failed: false,
        }],
        ..Default::default()
    }))
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = b.totals().requests;
    for _ in 0..3 {
        let _ = h.post(chat(false)).await.bytes().await;
    }
    // Both cool now; emergency admissions go to the backend that recovers
    // first (a, 7 s), never to b (30 s).
    assert_eq!(b.totals().requests, before);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_proxy_reports_every_second_and_its_demand_rides_along() {
    let up = MockUpstream::start(MockConfig::default().api_key("sk-up-a")).await;
    let mut h = Harness::start(
        "node-idle",
        snapshot(vec![backend(
            "a",
            &up.url(),
            Pool::Primary,
            &[("mock-model", "mock-model")],
        )]),
    )
    .await;
    let (mut s, out) = h.next_stream().await;
    assert_eq!(recv(&mut s).await.seq, 0);
    // Idle: an (empty) batch at least every second, each acknowledged.
    let mut at = Vec::new();
    let mut seqs = Vec::new();
    while at.len() < 4 {
        let b = recv(&mut s).await;
        at.push(std::time::Instant::now());
        seqs.push(b.seq);
        out.send(Ok(StreamReportsResponse { acked_seq: b.seq }))
            .await
            .unwrap();
    }
    for w in at.windows(2) {
        let gap = w[1] - w[0];
        assert!(
            gap >= Duration::from_millis(500) && gap <= Duration::from_millis(1_150),
            "{gap:?} between idle batches"
        );
    }
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    // A request: the next batches carry its demand for backend a.
    assert_eq!(h.post(chat(false)).await.status(), 200);
    let mut demand = 0;
    while demand == 0 {
        let b = recv(&mut s).await;
        demand += b
            .demand
            .iter()
            .filter(|d| d.backend_id == "a")
            .map(|d| d.requests)
            .sum::<u64>();
        out.send(Ok(StreamReportsResponse { acked_seq: b.seq }))
            .await
            .unwrap();
    }
    assert_eq!(demand, 1);
    h.shutdown().await;
}
