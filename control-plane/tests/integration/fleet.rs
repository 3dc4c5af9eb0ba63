//! The fleet loop in process: the real server on port 0, tonic clients
//! playing proxies on the report and discovery streams, and the admin
//! `StatsService`.

use std::path::PathBuf;
use std::time::Duration;

use crate::common::*;
use claw_control_plane::fleet::shares::ShareSettings;
use claw_proto::v1::backend_service_client::BackendServiceClient;
use claw_proto::v1::client_key_service_client::ClientKeyServiceClient;
use claw_proto::v1::discovery_service_client::DiscoveryServiceClient;
use claw_proto::v1::report_service_client::ReportServiceClient;
use claw_proto::v1::stats_service_client::StatsServiceClient;
use claw_proto::v1::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Status, Streaming};

const HOUR_MS: i64 = 3_600_000;

type Authed = InterceptedService<
    Channel,
    Box<dyn FnMut(Request<()>) -> Result<Request<()>, Status> + Send + Sync>,
>;

struct Harness {
    server: InProcess,
}

impl std::ops::Deref for Harness {
    type Target = InProcess;
    fn deref(&self) -> &InProcess {
        &self.server
    }
}

/// Shares settle in tests within a fraction of a second.
fn fast_shares() -> ShareSettings {
    ShareSettings {
        propagation: Duration::from_millis(100),
        disconnected_hold: Duration::from_millis(300),
        tick: Duration::from_millis(50),
        ewma_tau: Duration::from_millis(300),
        ewma_requests: 0.3,
        ..ShareSettings::default()
    }
}

impl Harness {
    async fn start(data: PathBuf) -> Harness {
        let mut config = config(data);
        config.shares = fast_shares();
        Harness {
            server: InProcess::start(config).await,
        }
    }

    fn authed(&self, token: &'static str) -> Authed {
        InterceptedService::new(
            self.channel.clone(),
            Box::new(move |mut r: Request<()>| {
                let v: MetadataValue<_> = format!("Bearer {token}").parse().expect("ascii");
                r.metadata_mut().insert("authorization", v);
                Ok(r)
            }),
        )
    }

    fn stats(&self) -> StatsServiceClient<Authed> {
        StatsServiceClient::new(self.authed(ADMIN))
    }

    async fn add_backend(&self, name: &str, pool: Pool, rpm: u32) -> String {
        let b = Backend {
            name: name.into(),
            base_url: "https://api.example.com/v1".into(),
            api_key: "sk-test-0123456789".into(),
            rpm,
            pool: pool as i32,
            enabled: true,
            models: vec![ModelMapping {
                canonical: "gpt-4o".into(),
                native: "gpt-4o-2024".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        BackendServiceClient::new(self.authed(ADMIN))
            .create_backend(CreateBackendRequest { backend: Some(b) })
            .await
            .expect("create backend")
            .into_inner()
            .backend
            .expect("backend")
            .id
    }

    /// A disabled agent `id`: usage is attributed only to agents that exist.
    async fn add_agent(&self, id: &str) {
        claw_proto::v1::agent_service_client::AgentServiceClient::new(self.authed(ADMIN))
            .create_agent(CreateAgentRequest {
                agent: Some(Agent {
                    id: id.into(),
                    model: "gpt-4o".into(),
                    interval_seconds: 3600,
                    enabled: false,
                    ..Default::default()
                }),
            })
            .await
            .expect("create agent");
    }

    async fn add_key(&self, name: &str) -> String {
        ClientKeyServiceClient::new(self.authed(ADMIN))
            .create_client_key(CreateClientKeyRequest {
                key: Some(ClientKey {
                    name: name.into(),
                    ..Default::default()
                }),
            })
            .await
            .expect("create key")
            .into_inner()
            .key
            .expect("key")
            .id
    }

    async fn totals(&self, filter: UsageFilter) -> UsageTotals {
        self.stats()
            .get_usage_totals(GetUsageTotalsRequest {
                filter: Some(filter),
            })
            .await
            .expect("totals")
            .into_inner()
            .totals
            .expect("totals")
    }

    async fn cooldown_events(&self, backend: &str) -> Vec<CooldownEvent> {
        self.stats()
            .list_cooldown_events(ListCooldownEventsRequest {
                backend: backend.into(),
                ..Default::default()
            })
            .await
            .expect("events")
            .into_inner()
            .events
    }

    async fn reporter(&self, node: &str, epoch: &str) -> Reporter {
        let (tx, rx) = mpsc::channel(16);
        let acks = ReportServiceClient::new(self.authed(PROXY))
            .stream_reports(ReceiverStream::new(rx))
            .await
            .expect("report stream")
            .into_inner();
        Reporter {
            node: node.into(),
            epoch: epoch.into(),
            tx,
            acks,
        }
    }

    /// A discovery stream that ACKs snapshots and hands every incremental
    /// message to the test.
    async fn proxy(&self, node: &str) -> ProxyStream {
        let (tx, rx) = mpsc::channel(16);
        tx.send(StreamConfigRequest {
            node_id: node.into(),
            ..Default::default()
        })
        .await
        .expect("hello");
        let mut inbound = DiscoveryServiceClient::new(self.authed(PROXY))
            .stream_config(ReceiverStream::new(rx))
            .await
            .expect("discovery stream")
            .into_inner();
        let (seen_tx, seen) = mpsc::unbounded_channel();
        let node_id = node.to_string();
        let task = tokio::spawn(async move {
            let mut snapshots = 0;
            while let Ok(Some(r)) = inbound.message().await {
                if r.snapshot.is_some() {
                    snapshots += 1;
                    let _ = tx
                        .send(StreamConfigRequest {
                            node_id: node_id.clone(),
                            version: r.version,
                            response_nonce: r.nonce.clone(),
                            error_detail: String::new(),
                            ..Default::default()
                        })
                        .await;
                }
                let _ = seen_tx.send((snapshots, r));
            }
        });
        ProxyStream { seen, task }
    }

    async fn restart(mut self, data: PathBuf) -> Harness {
        self.shutdown().await;
        Harness::start(data).await
    }

    async fn shutdown(&mut self) {
        self.server.stop().await;
    }
}

struct Reporter {
    node: String,
    epoch: String,
    tx: mpsc::Sender<StreamReportsRequest>,
    acks: Streaming<StreamReportsResponse>,
}

impl Reporter {
    fn batch(&self, seq: u64) -> StreamReportsRequest {
        StreamReportsRequest {
            node_id: self.node.clone(),
            stream_epoch: self.epoch.clone(),
            seq,
            ..Default::default()
        }
    }

    async fn send(&mut self, b: StreamReportsRequest) -> u64 {
        let seq = b.seq;
        self.tx.send(b).await.expect("send batch");
        let ack = tokio::time::timeout(Duration::from_secs(5), self.acks.message())
            .await
            .expect("ack within 5 s")
            .expect("stream healthy")
            .expect("ack");
        assert_eq!(ack.acked_seq, seq);
        ack.acked_seq
    }
}

struct ProxyStream {
    /// (snapshots seen so far, message)
    seen: mpsc::UnboundedReceiver<(u32, StreamConfigResponse)>,
    task: tokio::task::JoinHandle<()>,
}

impl ProxyStream {
    /// The first message satisfying `ok` within `within`.
    async fn wait(
        &mut self,
        within: Duration,
        ok: impl Fn(u32, &StreamConfigResponse) -> bool,
    ) -> Option<StreamConfigResponse> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.seen.recv()).await {
                Ok(Some((n, r))) if ok(n, &r) => return Some(r),
                Ok(Some(_)) => {}
                _ => return None,
            }
        }
    }

    /// Waits until this proxy's rpm share of `backend` satisfies `ok`.
    async fn share(&mut self, backend: &str, ok: impl Fn(f64) -> bool) -> Option<f64> {
        let r = self
            .wait(Duration::from_secs(5), |_, r| {
                r.rate_shares.as_ref().is_some_and(|s| {
                    s.backends
                        .iter()
                        .any(|b| b.backend_id == backend && ok(b.rpm_share))
                })
            })
            .await?;
        r.rate_shares?
            .backends
            .into_iter()
            .find(|b| b.backend_id == backend)
            .map(|b| b.rpm_share)
    }
}

impl Drop for ProxyStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn ts(ms: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    })
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64
}

fn usage(
    backend: &str,
    key: &str,
    agent: &str,
    at: i64,
    prompt: u64,
    completion: u64,
) -> UsageEvent {
    UsageEvent {
        request_id: format!("r-{at}-{prompt}"),
        time: ts(at),
        client_key_id: key.into(),
        agent_id: agent.into(),
        model: "gpt-4o".into(),
        backend_id: backend.into(),
        prompt_tokens: prompt,
        completion_tokens: completion,
        cache_read_tokens: 1,
        cost: 0.25,
        latency_ms: 100,
        status: 200,
        streamed: true,
        ..Default::default()
    }
}

fn rate_limited(backend: &str, cooldown_ms: u64) -> UpstreamFailure {
    UpstreamFailure {
        time: ts(now_ms()),
        backend_id: backend.into(),
        kind: FailureKind::RateLimited as i32,
        status: 429,
        consecutive: 1,
        cooldown_ms,
        summary: "429 from upstream".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_batch_is_stored_once_even_when_resent_and_across_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let h = Harness::start(data.clone()).await;
    let b1 = h.add_backend("b1", Pool::Primary, 1000).await;
    let now = now_ms();

    let mut r = h.reporter("p1", "epoch-1").await;
    let mut batch = r.batch(1);
    batch.usage = vec![
        usage(&b1, "ck", "", now, 10, 5),
        usage(&b1, "ck", "", now, 20, 7),
    ];
    r.send(batch.clone()).await;
    r.send(batch.clone()).await; // resent: acknowledged, not applied
    let mut second = r.batch(2);
    second.usage = vec![usage(&b1, "ck", "", now, 1, 1)];
    r.send(second.clone()).await;
    let t = h.totals(UsageFilter::default()).await;
    assert_eq!(
        (t.requests, t.prompt_tokens, t.completion_tokens),
        (3, 31, 13)
    );
    assert_eq!(t.total_tokens, 44);

    // The same batches after a restart (the ACK was lost): still once.
    drop(r);
    let h = h.restart(data.clone()).await;
    let mut r = h.reporter("p1", "epoch-1").await;
    r.send(batch).await;
    r.send(second).await;
    // A new proxy process (new epoch) numbers from 1 again.
    let mut other = h.reporter("p1", "epoch-2").await;
    let mut fresh = other.batch(1);
    fresh.usage = vec![usage(&b1, "ck", "", now, 2, 2)];
    other.send(fresh).await;
    let t = h.totals(UsageFilter::default()).await;
    assert_eq!((t.requests, t.total_tokens), (4, 48));

    // The admin token does not open the report stream, nor the proxy token stats.
    let (_tx, rx) = mpsc::channel::<StreamReportsRequest>(1);
    let err = match ReportServiceClient::new(h.authed(ADMIN))
        .stream_reports(ReceiverStream::new(rx))
        .await
    {
        Ok(mut s) => s.get_mut().message().await.expect_err("rejected"),
        Err(e) => e,
    };
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = StatsServiceClient::new(h.authed(PROXY))
        .get_usage_totals(GetUsageTotalsRequest::default())
        .await
        .expect_err("rejected");
    assert_eq!(err.code(), Code::Unauthenticated);
}

/// What proxies send: usage summed per bucket. Stored once like any batch,
/// in the bucket of its hour, and added to per-request events (what older
/// proxies send) in the same totals.
#[tokio::test]
async fn usage_aggregates_are_stored_once_in_their_hour() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = Harness::start(dir.path().join("data")).await;
    let b1 = h.add_backend("b1", Pool::Primary, 1000).await;
    let now = now_ms();
    let earlier = now - 2 * 3_600_000;
    let row = |agent: &str, at: i64, requests: u64, prompt: u64| UsageAggregate {
        first_time: ts(at),
        last_time: ts(at),
        client_key_id: "ck".into(),
        agent_id: agent.into(),
        model: "gpt-4o".into(),
        backend_id: b1.clone(),
        run_kind: String::new(),
        totals: Some(UsageTotals {
            requests,
            errors: 1,
            prompt_tokens: prompt,
            completion_tokens: requests,
            total_tokens: prompt + requests,
            cost: 0.5,
            streamed: 1,
            latency_ms_sum: 100 * requests,
            ..Default::default()
        }),
    };

    h.add_agent("a1").await;
    let mut r = h.reporter("p1", "epoch-1").await;
    let mut batch = r.batch(1);
    batch.usage_aggregates = vec![row("a1", now, 5, 50), row("", earlier, 2, 20)];
    batch.usage = vec![usage(&b1, "ck", "a1", now, 10, 5)];
    r.send(batch.clone()).await;
    r.send(batch).await; // resent: acknowledged, not applied

    let t = h.totals(UsageFilter::default()).await;
    assert_eq!((t.requests, t.errors, t.streamed), (8, 2, 3));
    assert_eq!((t.prompt_tokens, t.completion_tokens), (80, 12));
    assert_eq!((t.total_tokens, t.latency_ms_sum), (92, 800));
    assert!((t.cost - 1.25).abs() < 1e-9, "{}", t.cost);
    let agent = h
        .totals(UsageFilter {
            agent: "a1".into(),
            ..Default::default()
        })
        .await;
    assert_eq!((agent.requests, agent.prompt_tokens), (6, 60));
    let last_hour = h
        .totals(UsageFilter {
            start: ts(now - 3_600_000),
            ..Default::default()
        })
        .await;
    assert_eq!(last_hour.requests, 6, "the earlier row is in its own hour");

    // A row without its sums is refused whole, naming the field.
    let mut bad = r.batch(2);
    bad.usage_aggregates = vec![row("a1", now, 1, 1), UsageAggregate::default()];
    r.tx.send(bad).await.expect("send");
    let err = tokio::time::timeout(Duration::from_secs(5), r.acks.message())
        .await
        .expect("answer within 5 s")
        .expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("usage_aggregates[1].totals"),
        "{err:?}"
    );
    assert_eq!(h.totals(UsageFilter::default()).await.requests, 8);
}

#[tokio::test]
async fn totals_hourly_and_daily_answer_filters_by_name_and_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = Harness::start(dir.path().join("data")).await;
    let b1 = h.add_backend("b1", Pool::Primary, 1000).await;
    let b2 = h.add_backend("b2", Pool::Fallback, 1000).await;
    let k1 = h.add_key("k1").await;
    let k2 = h.add_key("k2").await;
    h.add_agent("agent-a").await;
    h.add_agent("agent-b").await;
    let now = now_ms();
    let old = now - 3 * 24 * HOUR_MS;
    let mut r = h.reporter("p1", "e").await;
    let mut b = r.batch(1);
    b.usage = vec![
        usage(&b1, &k1, "agent-a", now, 10, 10),
        usage(&b2, &k1, "agent-b", now, 5, 5),
        usage(&b1, &k2, "", old, 100, 0),
    ];
    b.usage[1].status = 500;
    r.send(b).await;

    let all = h.totals(UsageFilter::default()).await;
    assert_eq!((all.requests, all.errors, all.total_tokens), (3, 1, 130));
    assert_eq!(all.cache_read_tokens, 3);
    assert!((all.cost - 0.75).abs() < 1e-9);
    let by_name = h
        .totals(UsageFilter {
            backend: "b1".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(by_name.total_tokens, 120);
    let key_and_backend = h
        .totals(UsageFilter {
            backend: b1.clone(),
            client_key: "k1".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(key_and_backend.total_tokens, 20);
    let agent = h
        .totals(UsageFilter {
            agent: "agent-b".into(),
            ..Default::default()
        })
        .await;
    assert_eq!((agent.requests, agent.errors), (1, 1));
    let last_day = h
        .totals(UsageFilter {
            start: ts(now - 24 * HOUR_MS),
            ..Default::default()
        })
        .await;
    assert_eq!(last_day.requests, 2);
    let before = h
        .totals(UsageFilter {
            end: ts(now - 24 * HOUR_MS),
            ..Default::default()
        })
        .await;
    assert_eq!(before.total_tokens, 100);
    let model = h
        .totals(UsageFilter {
            model: "other".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(model.requests, 0);

    let hours = h
        .stats()
        .list_hourly_usage(ListHourlyUsageRequest {
            filter: Some(UsageFilter {
                client_key: k1.clone(),
                ..Default::default()
            }),
        })
        .await
        .expect("hourly")
        .into_inner()
        .hours;
    assert_eq!(hours.len(), 2, "{hours:?}");
    assert!(hours.iter().all(|h| h.model == "gpt-4o"));
    let days = h
        .stats()
        .list_daily_usage(ListDailyUsageRequest::default())
        .await
        .expect("daily")
        .into_inner()
        .days;
    let pools: Vec<_> = days
        .iter()
        .map(|d| (d.pool.as_str(), d.totals.as_ref().map(|t| t.requests)))
        .collect();
    assert_eq!(days.len(), 3, "{days:?}");
    assert_eq!(pools[0], ("primary", Some(1)), "oldest first");
    assert!(pools.contains(&("fallback", Some(1))));
    assert!(days[0].day.len() == 10 && days[0].day < days[2].day);
}

#[tokio::test]
async fn a_429_on_one_proxy_cools_the_backend_on_the_others() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let h = Harness::start(data.clone()).await;
    let b1 = h.add_backend("b1", Pool::Primary, 1000).await;
    let mut a = h.proxy("a").await;
    let mut b = h.proxy("b").await;
    for p in [&mut a, &mut b] {
        p.wait(Duration::from_secs(5), |n, _| n > 0)
            .await
            .expect("snapshot");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mut ra = h.reporter("a", "ea").await;
    let mut batch = ra.batch(1);
    batch.failures = vec![rate_limited(&b1, 60_000)];
    let sent = std::time::Instant::now();
    ra.send(batch).await;
    let cooling = |_: u32, r: &StreamConfigResponse| !r.cooldowns.is_empty();
    let got = b
        .wait(Duration::from_secs(5), cooling)
        .await
        .expect("B is told");
    let elapsed = sent.elapsed();
    let c = &got.cooldowns[0];
    assert_eq!(
        (c.backend_id.as_str(), c.source_node_id.as_str()),
        (b1.as_str(), "a")
    );
    assert_eq!(c.consecutive, 1);
    assert!(c.remaining_ms > 55_000 && c.remaining_ms <= 60_000, "{c:?}");
    assert!(got.nonce.is_empty() && got.snapshot.is_none());
    assert!(elapsed < Duration::from_secs(1), "{elapsed:?}");
    assert!(
        a.wait(Duration::from_millis(300), cooling).await.is_none(),
        "the proxy that saw the 429 is not told"
    );

    let events = h.cooldown_events("b1").await;
    assert_eq!(events.len(), 1);
    let e = &events[0];
    assert_eq!(
        (e.backend_name.as_str(), e.node_id.as_str(), e.consecutive),
        ("b1", "a", 1)
    );
    assert_eq!(e.duration_ms, 60_000);

    // Fleet-wide consecutive count: B's 429 is the second; a success resets it.
    let mut rb = h.reporter("b", "eb").await;
    let mut batch = rb.batch(1);
    batch.failures = vec![rate_limited(&b1, 1_000)];
    rb.send(batch).await;
    assert_eq!(h.cooldown_events(&b1).await[0].consecutive, 2);
    let mut ok = ra.batch(2);
    ok.successes = vec![BackendSuccess {
        backend_id: b1.clone(),
        time: ts(now_ms()),
    }];
    ra.send(ok).await;
    let mut again = ra.batch(3);
    again.failures = vec![rate_limited(&b1, 1_000)];
    ra.send(again).await;
    assert_eq!(h.cooldown_events(&b1).await[0].consecutive, 1);

    // The cooldown (absolute time) survives a restart and reaches a proxy
    // that connects afterwards, after its snapshot.
    drop((a, b, ra, rb));
    let h = h.restart(data).await;
    let mut c = h.proxy("c").await;
    let got = c
        .wait(Duration::from_secs(5), cooling)
        .await
        .expect("the newcomer is told");
    assert_eq!(got.cooldowns[0].backend_id, b1);
    assert!(got.cooldowns[0].remaining_ms > 50_000);
    assert_eq!(h.cooldown_events("").await.len(), 3);
}

#[tokio::test]
async fn shares_split_equally_follow_demand_and_are_reassigned_on_disconnect() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = Harness::start(dir.path().join("data")).await;
    let b1 = h.add_backend("b1", Pool::Primary, 60).await;
    let near = |want: f64| move |x: f64| (x - want).abs() < 1e-3;

    let mut p1 = h.proxy("p1").await;
    let mut p2 = h.proxy("p2").await;
    assert!(p1.share(&b1, near(0.5)).await.is_some());
    assert!(p2.share(&b1, near(0.5)).await.is_some());

    let mut p3 = h.proxy("p3").await;
    let mut p4 = h.proxy("p4").await;
    let mut last = Vec::new();
    for p in [&mut p1, &mut p2, &mut p3, &mut p4] {
        last.push(p.share(&b1, near(0.25)).await.expect("a quarter each"));
    }
    assert!(last.iter().sum::<f64>() <= 1.0 + 1e-9);

    // Demand: p1 wants more than the limit (rpm 60), p2 reports wanting
    // nothing; p3 and p4 report nothing.
    let mut r1 = h.reporter("p1", "e1").await;
    let mut r2 = h.reporter("p2", "e2").await;
    for seq in 1..=12 {
        let mut b = r1.batch(seq);
        b.demand = vec![BackendDemand {
            backend_id: b1.clone(),
            requests: 50,
            tokens: 0,
        }];
        r1.send(b).await;
        let mut b = r2.batch(seq);
        b.demand = vec![BackendDemand {
            backend_id: b1.clone(),
            requests: 0,
            tokens: 0,
        }];
        r2.send(b).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let big = p1.share(&b1, |x| x > 0.6).await.expect("demand weighs");
    let idle = p3.share(&b1, |x| x < 0.1).await.expect("idle shrinks");
    assert!(idle > 0.0, "an idle proxy keeps a floor");
    assert!(big < 1.0);

    // A proxy leaves: the others take over its share.
    drop((r1, r2));
    drop(p4);
    drop(p1);
    for p in [&mut p2, &mut p3] {
        p.share(&b1, |x| x > 0.3).await.expect("reassigned");
    }
}

/// Ingest throughput on this machine (`cargo test --release -- --ignored`).
#[tokio::test]
#[ignore = "benchmark"]
async fn ingest_throughput() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = Harness::start(dir.path().join("data")).await;
    let b1 = h.add_backend("b1", Pool::Primary, 1000).await;
    let now = now_ms();
    let (proxies, batches, per_batch) = (4u64, 100u64, 100u64);
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for p in 0..proxies {
        let mut r = h.reporter(&format!("p{p}"), "e").await;
        let b1 = b1.clone();
        tasks.push(tokio::spawn(async move {
            for seq in 1..=batches {
                let mut b = r.batch(seq);
                b.usage = (0..per_batch)
                    .map(|i| {
                        usage(
                            &b1,
                            &format!("k{}", i % 5),
                            &format!("a{}", i % 20),
                            now,
                            3,
                            4,
                        )
                    })
                    .collect();
                r.send(b).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("reporter");
    }
    let events = proxies * batches * per_batch;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{events} events in {secs:.2} s: {:.0} events/s, {:.1} ms/batch",
        events as f64 / secs,
        secs * 1000.0 / (proxies * batches) as f64
    );
    assert_eq!(h.totals(UsageFilter::default()).await.requests, events);

    // 429 → push latency to another proxy.
    let mut b = h.proxy("listener").await;
    b.wait(Duration::from_secs(5), |n, _| n > 0)
        .await
        .expect("snapshot");
    let mut r = h.reporter("src", "e").await;
    let mut lat = Vec::new();
    for seq in 1..=50u64 {
        let mut batch = r.batch(seq);
        batch.failures = vec![rate_limited(&b1, 1_000 + seq * 1_000)];
        let t = std::time::Instant::now();
        r.tx.send(batch).await.expect("send");
        b.wait(Duration::from_secs(5), |_, m| !m.cooldowns.is_empty())
            .await
            .expect("push");
        lat.push(t.elapsed());
        let _ = r.acks.message().await;
    }
    lat.sort();
    println!("429 → push p50 {:?} p99 {:?}", lat[25], lat[49]);
}

#[tokio::test]
async fn cache_read_and_write_tokens_sum_from_events_and_aggregates_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = Harness::start(dir.path().join("data")).await;
    let b1 = h.add_backend("b1", Pool::Primary, 1000).await;
    h.add_agent("a1").await;
    let now = now_ms();
    let mut event = usage(&b1, "ck", "a1", now, 1_000, 50);
    event.cache_read_tokens = 600;
    event.cache_write_tokens = 300;
    let aggregate = UsageAggregate {
        first_time: ts(now),
        last_time: ts(now),
        client_key_id: "ck".into(),
        agent_id: "a1".into(),
        model: "gpt-4o".into(),
        backend_id: b1.clone(),
        run_kind: String::new(),
        totals: Some(UsageTotals {
            requests: 4,
            prompt_tokens: 4_000,
            completion_tokens: 40,
            total_tokens: 4_040,
            cache_read_tokens: 3_000,
            cache_write_tokens: 700,
            ..Default::default()
        }),
    };
    let mut r = h.reporter("p1", "epoch-1").await;
    let mut batch = r.batch(1);
    batch.usage = vec![event];
    batch.usage_aggregates = vec![aggregate];
    r.send(batch.clone()).await;
    r.send(batch).await; // resent: acknowledged, not applied

    let t = h.totals(UsageFilter::default()).await;
    assert_eq!(t.requests, 5);
    assert_eq!(t.prompt_tokens, 5_000, "all input, cache included");
    assert_eq!((t.cache_read_tokens, t.cache_write_tokens), (3_600, 1_000));
    let hours = h
        .stats()
        .list_hourly_usage(ListHourlyUsageRequest::default())
        .await
        .expect("hourly")
        .into_inner()
        .hours;
    let sum = |f: fn(&UsageTotals) -> u64| {
        hours
            .iter()
            .filter_map(|h| h.totals.as_ref())
            .map(f)
            .sum::<u64>()
    };
    assert_eq!(
        (sum(|t| t.cache_read_tokens), sum(|t| t.cache_write_tokens)),
        (3_600, 1_000)
    );
    let days = h
        .stats()
        .list_daily_usage(ListDailyUsageRequest::default())
        .await
        .expect("daily")
        .into_inner()
        .days;
    let day: Vec<_> = days
        .iter()
        .filter_map(|d| d.totals.as_ref())
        .map(|t| (t.cache_read_tokens, t.cache_write_tokens))
        .collect();
    assert_eq!(day, vec![(3_600, 1_000)]);
}

fn failure(kind: FailureKind, backend: &str, status: u32, cooldown_ms: u64) -> UpstreamFailure {
    UpstreamFailure {
        kind: kind as i32,
        status,
        ..rate_limited(backend, cooldown_ms)
    }
}

#[tokio::test]
async fn a_spent_quota_cools_the_backend_fleet_wide_and_shows_until_it_ends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = Harness::start(dir.path().join("data")).await;
    let b1 = h.add_backend("b1", Pool::Primary, 1000).await;
    let b2 = h.add_backend("b2", Pool::Primary, 1000).await;
    let mut a = h.proxy("a").await;
    let mut b = h.proxy("b").await;
    for p in [&mut a, &mut b] {
        p.wait(Duration::from_secs(5), |n, _| n > 0)
            .await
            .expect("snapshot");
    }
    let backends = || BackendServiceClient::new(h.authed(ADMIN));
    let get = |name: &'static str| async move {
        backends()
            .get_backend(GetBackendRequest {
                backend: name.into(),
            })
            .await
            .expect("get")
            .into_inner()
            .backend
            .expect("backend")
    };

    let quota_ms = 2_500;
    let mut ra = h.reporter("a", "ea").await;
    let mut batch = ra.batch(1);
    let mut spent = failure(FailureKind::QuotaExhausted, &b1, 429, quota_ms);
    spent.summary = "429 insufficient_quota".into();
    batch.failures = vec![spent];
    let sent_ms = now_ms();
    ra.send(batch).await;
    let got = b
        .wait(Duration::from_secs(5), |_, r| !r.cooldowns.is_empty())
        .await
        .expect("B is told");
    let c = &got.cooldowns[0];
    assert_eq!(c.backend_id, b1);
    assert!(c.quota_exhausted, "{c:?}");
    assert!(
        c.remaining_ms > 1_500 && c.remaining_ms <= quota_ms,
        "{c:?}"
    );

    let listed = backends()
        .list_backends(ListBackendsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .backends;
    let status: Vec<_> = listed
        .iter()
        .map(|b| (b.name.as_str(), b.status.as_str()))
        .collect();
    assert_eq!(status, [("b1", "quota_exhausted"), ("b2", "enabled")]);
    let one = get("b1").await;
    assert_eq!(one.status, "quota_exhausted");
    let until = one
        .quota_exhausted_until
        .as_ref()
        .map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
        .expect("quota_exhausted_until");
    assert!(
        (until - (sent_ms + quota_ms as i64)).abs() < 1_000,
        "until {until}, sent {sent_ms}"
    );
    assert!(get("b2").await.quota_exhausted_until.is_none());
    let events = h.cooldown_events("b1").await;
    assert_eq!(events.len(), 1);
    assert!(
        events[0].summary.contains("quota"),
        "{:?}",
        events[0].summary
    );

    // An overload is a short cooldown, pushed, not a quota.
    let mut batch = ra.batch(2);
    batch.failures = vec![failure(FailureKind::Overloaded, &b2, 529, 1_000)];
    ra.send(batch).await;
    let got = b
        .wait(Duration::from_secs(5), |_, r| {
            r.cooldowns.iter().any(|c| c.backend_id == b2)
        })
        .await
        .expect("B is told of the overload");
    let c = got
        .cooldowns
        .iter()
        .find(|c| c.backend_id == b2)
        .expect("b2");
    assert!(!c.quota_exhausted && c.remaining_ms <= 1_000, "{c:?}");
    assert_eq!(get("b2").await.status, "enabled");
    assert!(
        h.cooldown_events(&b2).await[0]
            .summary
            .contains("overloaded")
    );

    // Once the reported end passes, the backend is back.
    let wait = (sent_ms + quota_ms as i64 + 200 - now_ms()).max(0);
    tokio::time::sleep(Duration::from_millis(wait as u64)).await;
    let back = get("b1").await;
    assert_eq!(back.status, "enabled");
    assert!(back.quota_exhausted_until.is_none());
}
