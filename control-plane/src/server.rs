//! The composition root: wires the control plane together on already-bound
//! listeners and shuts it all down gracefully. It opens the sled store once
//! and hands the one `Arc<dyn Store>` to the catalog, the heartbeat run log,
//! report ingestion, the fleet, stats and retention; it creates the one
//! shutdown signal and hands a [`Shutdown`] to every task it starts; it
//! serves the authenticated gRPC services, gRPC health and reflection, and
//! the HTTP listener. No module below it imports it.
//!
//! Authentication: every `claw.v1` admin service and reflection require an
//! admin token (`CLAW_ADMIN_TOKEN` or a named one) whose role allows the
//! method (`api::auth::AdminAccessLayer`, by full method path); the proxy-facing `DiscoveryService` and `ReportService`
//! require the proxy token (and only it: neither token opens the other's services). gRPC
//! health is open on purpose: probes cannot send headers.
//!
//! TLS: with `config.tls`, both listeners speak TLS only (same certificate,
//! reloaded when its files change; see [`claw_tls::reload`]); gRPC offers
//! ALPN `h2`, the HTTP listener `h2` and `http/1.1`.
//!
//! Shutdown order: stop accepting, end the discovery streams (the sessions
//! watch the same stop signal), let unary calls finish, flush the store.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use claw_proto::v1::agent_service_server::{self, AgentServiceServer};
use claw_proto::v1::audit_service_server::{self, AuditServiceServer};
use claw_proto::v1::backend_service_server::{self, BackendServiceServer};
use claw_proto::v1::backup_service_server::{self, BackupServiceServer};
use claw_proto::v1::client_key_service_server::{self, ClientKeyServiceServer};
use claw_proto::v1::cluster_service_server::{self, ClusterServiceServer};
use claw_proto::v1::discovery_service_server::{self, DiscoveryServiceServer};
use claw_proto::v1::heartbeat_service_server::{self, HeartbeatServiceServer};
use claw_proto::v1::pool_service_server::{self, PoolServiceServer};
use claw_proto::v1::report_service_server::{self, ReportServiceServer};
use claw_proto::v1::stats_service_server::{self, StatsServiceServer};
use claw_proto::v1::token_service_server::{self, TokenServiceServer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::service::interceptor::InterceptedService;
use tonic_health::ServingStatus;

use crate::access::Access;
use crate::api::agent::AgentApi;
use crate::api::audit::AuditApi;
use crate::api::auth::{AdminAccessLayer, AdminAuth, TokenAuth};
use crate::api::backend::BackendApi;
use crate::api::backup::BackupApi;
use crate::api::client_key::ClientKeyApi;
use crate::api::cluster::ClusterApi;
use crate::api::heartbeat::HeartbeatApi;
use crate::api::pool::PoolApi;
use crate::api::report::ReportApi;
use crate::api::stats::StatsApi;
use crate::api::token::TokenApi;
use crate::catalog::Catalog;
use crate::config::Config;
use crate::conn::ConnTable;
use crate::dashboard::{Dashboard, Services};
use crate::discovery::{self, Debounce, DiscoveryApi};
use crate::events::Events;
use crate::fleet::Fleet;
use crate::heartbeat::runs::RunStore;
use crate::http::{self, HttpState};
use crate::metrics::{self, GrpcMetricsLayer};
use crate::proxies::ProxyRegistry;
use crate::report::Ingest;
use crate::shutdown::Shutdown;
use crate::stats::Stats;
use crate::store::sled::SledStore;
use crate::store::space::{GuardedStore, MinFreeSpace};
use crate::store::{Store, StoreError};
pub use claw_tls::listener::bind as bind_listener;

/// The gRPC services this server reports in `grpc.health.v1`.
const SERVICES: [&str; 12] = [
    backend_service_server::SERVICE_NAME,
    pool_service_server::SERVICE_NAME,
    client_key_service_server::SERVICE_NAME,
    agent_service_server::SERVICE_NAME,
    cluster_service_server::SERVICE_NAME,
    discovery_service_server::SERVICE_NAME,
    heartbeat_service_server::SERVICE_NAME,
    report_service_server::SERVICE_NAME,
    stats_service_server::SERVICE_NAME,
    token_service_server::SERVICE_NAME,
    audit_service_server::SERVICE_NAME,
    backup_service_server::SERVICE_NAME,
];

/// Infrastructure services advertised by reflection next to [`SERVICES`].
const REFLECTED_INFRA: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// How often the Prometheus recorder drops stale histogram samples.
const METRICS_UPKEEP: Duration = Duration::from_secs(5);

/// HTTP/2 pings on idle connections, so a proxy that vanished without
/// closing its stream (host gone, network cut) is noticed and listed as
/// disconnected within interval + timeout.
const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Requests in flight on one gRPC connection (a proxy holds two streams;
/// clawctl one call at a time): more waits, so one connection cannot take
/// the server's every task.
const GRPC_CONCURRENCY_PER_CONNECTION: usize = 256;
/// HTTP/2 streams a gRPC client may open on one connection.
const GRPC_MAX_CONCURRENT_STREAMS: u32 = 256;

/// A control plane whose store is open and checked, not yet serving. Lets
/// `main` refuse to start (wrong key, newer schema) before it announces its
/// listeners.
pub struct Server {
    config: Config,
    store: Arc<dyn Store>,
    catalog: Arc<Catalog>,
    proxies: Arc<ProxyRegistry>,
    tls: Option<Arc<claw_tls::CertResolver>>,
    /// Change notifications for the dashboard's live stream.
    events: Events,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("data_dir", &self.config.data_dir)
            .field("catalog", &self.catalog)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Loads the TLS certificate and key (when configured) and the heartbeat
    /// proxy's CA, then opens the data directory and the catalog, checking
    /// the schema version and the master key, with the default
    /// [`StartupCheck`].
    pub async fn open(config: Config) -> anyhow::Result<Server> {
        Server::open_with(config, StartupCheck::default()).await
    }

    /// [`Server::open`] with `check`: the store is opened (refused below its
    /// high-water mark), the catalog opened and, unless skipped, every
    /// record checked (as `claw-control-plane check` does), all on a thread
    /// of their own under a watchdog: when they do not finish within
    /// `check.timeout` this fails, so a damaged store that makes the engine
    /// spin never gets as far as `listening`.
    pub async fn open_with(config: Config, check: StartupCheck) -> anyhow::Result<Server> {
        // Files first: a bad certificate is refused before anything is opened.
        let tls = config
            .tls
            .clone()
            .map(claw_tls::CertResolver::load)
            .transpose()?;
        if let Some(ca) = &config.heartbeat.proxy_ca {
            claw_tls::pem::read_ca(ca).context("--heartbeat-proxy-ca")?;
        }
        let dir = config.data_dir.display().to_string();
        let started = std::time::Instant::now();
        let (data_dir, key, deep, reserve) = (
            config.data_dir.clone(),
            config.master_key.clone(),
            check.deep,
            config.min_free_space,
        );
        let (store, catalog, records) = bounded(check.timeout, move || {
            open_and_check(&data_dir, key, deep, reserve)
        })
        .await
        .map_err(|e| match e {
            Bounded::Failed(e) => e,
            Bounded::TimedOut(bound) => anyhow::anyhow!(
                "opening/checking the store in data directory {dir} did not finish within {} \
                 (--startup-check-timeout): the store may be damaged; run `claw-control-plane \
                 check` on it, or restore from a backup",
                humantime::format_duration(bound)
            ),
            Bounded::Panicked => anyhow::anyhow!(
                "opening data directory {dir}: the store-open thread panicked (the store may be \
                 damaged; run `claw-control-plane check` on it, or restore from a backup)"
            ),
        })?;
        tracing::info!(
            data_dir = %dir,
            config_version = catalog.config_version(),
            master_key_id = %catalog.master_key_id(),
            records_checked = records,
            deep_check = check.deep,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "catalog open"
        );
        let events = Events::new();
        Ok(Server {
            config,
            store,
            catalog: Arc::new(catalog),
            proxies: Arc::new(ProxyRegistry::new().with_events(events.clone())),
            tls,
            events,
        })
    }

    /// The catalog (for embedding and tests).
    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    /// The proxy registry (filled by the discovery stream).
    pub fn proxies(&self) -> &Arc<ProxyRegistry> {
        &self.proxies
    }

    /// Serves gRPC and HTTP until `shutdown` completes; then stops accepting,
    /// lets in-flight requests finish, and flushes the store.
    pub async fn serve(
        self,
        grpc: TcpListener,
        http: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let Server {
            config,
            store,
            catalog,
            proxies,
            tls,
            events,
        } = self;
        let (grpc_tls, http_tls) = match tls {
            Some(resolver) => {
                resolver
                    .watch(claw_tls::reload::RELOAD_INTERVAL)
                    .context("TLS")?;
                tracing::info!(cert = %resolver.paths().cert.display(), "serving TLS");
                (
                    Some(claw_tls::server_config(
                        resolver.clone(),
                        &[claw_tls::ALPN_H2],
                    )?),
                    Some(claw_tls::server_config(
                        resolver,
                        &[claw_tls::ALPN_H2, claw_tls::ALPN_HTTP11],
                    )?),
                )
            }
            None => (None, None),
        };
        let prometheus = metrics::handle();
        metrics::touch();
        metrics::record_catalog(&catalog);
        crate::conn::describe();
        // Each listener its own cap; gRPC connections that have spoken are
        // proxies' streams and clawctl calls, never closed to make room.
        let grpc_conns = Arc::new(ConnTable::new("grpc", config.connections.clone(), false));
        let http_conns = Arc::new(ConnTable::new("http", config.connections.clone(), true));

        let (health, health_service) = tonic_health::server::health_reporter();
        for name in SERVICES {
            health
                .set_service_status(name, ServingStatus::Serving)
                .await;
        }
        let access = Arc::new(Access::new(&config.admin_token, store.clone()));
        let admin = AdminAuth::new(access.clone());
        let proxy_auth = TokenAuth::proxy(&config.proxy_token);
        // Advertise exactly what is served: SERVICES and the infrastructure
        // services, nothing else the descriptor sets may describe.
        let reflection = || {
            SERVICES.iter().chain(&REFLECTED_INFRA).fold(
                tonic_reflection::server::Builder::configure()
                    .register_encoded_file_descriptor_set(claw_proto::v1::FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                    // Both reflection versions are advertised, so both
                    // descriptors are served by both (the builder adds only
                    // its own; duplicates are ignored). Without this,
                    // `buf curl --list-methods` failed on v1alpha.
                    .register_encoded_file_descriptor_set(
                        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
                    )
                    .register_encoded_file_descriptor_set(
                        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
                    ),
                |b, name| b.with_service_name(*name),
            )
        };
        let reflection_v1 = reflection()
            .build_v1()
            .context("building gRPC reflection")?;
        let reflection_v1alpha = reflection()
            .build_v1alpha()
            .context("building gRPC reflection")?;

        let (stop_tx, stop_rx) = watch::channel(false);
        let stop_rx = Shutdown::new(stop_rx);
        let mut grpc_stop = stop_rx.clone();
        let (snapshots, publisher) =
            discovery::publish::spawn(catalog.clone(), Debounce::default(), stop_rx.clone());
        let mut heartbeat_settings = config.heartbeat.clone();
        if heartbeat_settings.scheduler.wake.public_url.is_empty()
            && let Ok(addr) = http.local_addr()
        {
            // Wake callbacks default to the HTTP listener's own address.
            let scheme = if http_tls.is_some() { "https" } else { "http" };
            heartbeat_settings.scheduler.wake.public_url = format!("{scheme}://{addr}");
        }
        let known_proxies = crate::proxies::known_nodes(
            store.as_ref(),
            crate::catalog::records::now_ms(),
            crate::proxies::DEFAULT_RETENTION,
        )
        .context("reading the known proxies")?;
        let (heartbeats, heartbeat_tasks) = crate::heartbeat::runtime::start(
            catalog.clone(),
            RunStore::new(store.clone()).with_events(events.clone()),
            heartbeat_settings,
            Arc::new(crate::proxies::RegistryFleetView::new(
                proxies.clone(),
                known_proxies,
            )),
            stop_rx.clone(),
        )
        .context("starting the heartbeat scheduler")?;
        let fleet = Arc::new(
            Fleet::open(
                store.as_ref(),
                catalog.clone(),
                proxies.clone(),
                heartbeats.activity.clone(),
                heartbeats.capacity.clone(),
                config.shares,
            )
            .context("loading the fleet cooldowns")?
            .with_events(events.clone())
            .with_eject_policy(config.eject),
        );
        let fleet_task = tokio::spawn(fleet.clone().run(stop_rx.clone()));
        let prober = crate::health::Prober::new(
            catalog.clone(),
            fleet.clone(),
            config.probe,
            crate::heartbeat::dispatch::http_client().context("building the probe client")?,
        );
        let probe_task = tokio::spawn(prober.run(stop_rx.clone()));
        let ingest = Arc::new(Ingest::new(store.clone(), fleet.clone()));
        let retention_task = tokio::spawn(crate::retention::run(
            store.clone(),
            config.retention,
            stop_rx.clone(),
        ));
        let backup_task = config.backup.clone().map(|schedule| {
            tokio::spawn(crate::backup::schedule::run(
                store.clone(),
                schedule,
                stop_rx.clone(),
            ))
        });
        // One instance of each service, shared by gRPC and the dashboard.
        let services = Services {
            backend: BackendApi::new(catalog.clone(), fleet.clone()),
            cluster: ClusterApi::new(catalog.clone(), proxies.clone(), fleet.clone()),
            stats: StatsApi::new(Stats::new(store.clone(), catalog.clone()), fleet.clone()),
            agent: AgentApi::new(catalog.clone(), heartbeats.runs.clone()),
            heartbeat: HeartbeatApi::new(catalog.clone(), heartbeats.clone()),
            pool: PoolApi::new(catalog.clone()),
            audit: AuditApi::new(store.clone()),
            token: TokenApi::new(access.clone(), events.clone()),
        };
        let dashboard = Dashboard {
            access: access.clone(),
            services: services.clone(),
            events: events.clone(),
            catalog: catalog.clone(),
            fleet: fleet.clone(),
            shutdown: stop_rx.clone(),
        };
        // Pings (and their answers) are traffic: at least three per idle
        // timeout, so an idle but healthy stream is never closed as idle.
        let third = config.connections.idle_timeout / 3;
        let router = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL.min(third)))
            .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT.min(third)))
            .concurrency_limit_per_connection(GRPC_CONCURRENCY_PER_CONNECTION)
            .max_concurrent_streams(GRPC_MAX_CONCURRENT_STREAMS)
            .layer(GrpcMetricsLayer)
            .layer(AdminAccessLayer::new(access.clone()))
            .add_service(health_service)
            .add_service(InterceptedService::new(reflection_v1, admin.clone()))
            .add_service(InterceptedService::new(reflection_v1alpha, admin.clone()))
            .add_service(InterceptedService::new(
                crate::discovery::sized!(BackendServiceServer::new(services.backend)),
                admin.clone(),
            ))
            .add_service(PoolServiceServer::with_interceptor(
                services.pool,
                admin.clone(),
            ))
            .add_service(InterceptedService::new(
                crate::discovery::sized!(ClientKeyServiceServer::new(ClientKeyApi::new(
                    catalog.clone(),
                ))),
                admin.clone(),
            ))
            .add_service(InterceptedService::new(
                crate::discovery::sized!(AgentServiceServer::new(services.agent)),
                admin.clone(),
            ))
            .add_service(InterceptedService::new(
                crate::discovery::sized!(ClusterServiceServer::new(services.cluster)),
                admin.clone(),
            ))
            .add_service(HeartbeatServiceServer::with_interceptor(
                services.heartbeat,
                admin.clone(),
            ))
            .add_service(StatsServiceServer::with_interceptor(
                services.stats,
                admin.clone(),
            ))
            .add_service(TokenServiceServer::with_interceptor(
                services.token,
                admin.clone(),
            ))
            .add_service(AuditServiceServer::with_interceptor(
                services.audit,
                admin.clone(),
            ))
            .add_service(BackupServiceServer::with_interceptor(
                BackupApi::new(
                    store,
                    catalog.clone(),
                    config.data_dir.clone(),
                    events.clone(),
                ),
                admin,
            ))
            .add_service(InterceptedService::new(
                // A busy proxy's batch (many keys and agents in one report
                // interval) may outgrow tonic's 4 MiB default like a
                // snapshot can.
                crate::discovery::sized!(ReportServiceServer::new(ReportApi::new(
                    ingest,
                    stop_rx.clone()
                ))),
                proxy_auth.clone(),
            ))
            .add_service(InterceptedService::new(
                crate::discovery::sized!(DiscoveryServiceServer::new(DiscoveryApi::new(
                    catalog.clone(),
                    fleet.health().clone(),
                    proxies,
                    snapshots,
                    stop_rx.clone(),
                ))),
                proxy_auth,
            ));
        let grpc_addr = grpc.local_addr().ok();
        let http_addr = http.local_addr().ok();
        let grpc_stopped = async move { grpc_stop.stopped().await };
        let mut grpc_task = match grpc_tls {
            Some(tls) => {
                let acceptor = claw_tls::tokio_rustls::TlsAcceptor::from(tls);
                let incoming = crate::conn::incoming(grpc, grpc_conns, move |s| acceptor.accept(s));
                tokio::spawn(
                    router.serve_with_incoming_shutdown(without_peer(incoming), grpc_stopped),
                )
            }
            None => {
                let incoming =
                    crate::conn::incoming(grpc, grpc_conns, |s| std::future::ready(Ok(s)));
                tokio::spawn(
                    router.serve_with_incoming_shutdown(without_peer(incoming), grpc_stopped),
                )
            }
        };
        let http_task = tokio::spawn(http::serve(
            http,
            HttpState {
                catalog: catalog.clone(),
                metrics: prometheus.clone(),
                dashboard,
                heartbeats: Some(heartbeats.scheduler),
            },
            http_tls,
            http_conns,
            stop_rx.clone(),
        ));
        let gauges = tokio::spawn(keep_gauges(catalog.clone(), stop_rx.clone()));
        let upkeep = tokio::spawn(upkeep(prometheus, stop_rx));
        tracing::info!(grpc = ?grpc_addr, http = ?http_addr, "serving");

        let early = tokio::select! {
            () = shutdown => None,
            result = &mut grpc_task => Some(result),
        };
        tracing::info!("shutting down: no new connections, finishing in-flight requests");
        for name in SERVICES {
            health
                .set_service_status(name, ServingStatus::NotServing)
                .await;
        }
        let _ = stop_tx.send(true);
        let grpc_result = match early {
            Some(result) => result,
            None => grpc_task.await,
        };
        if let Err(e) = http_task.await {
            tracing::warn!(error = %e, "http server task failed");
        }
        let _ = gauges.await;
        let _ = upkeep.await;
        let _ = publisher.await;
        for task in heartbeat_tasks {
            let _ = task.await;
        }
        let _ = fleet_task.await;
        let _ = probe_task.await;
        let _ = retention_task.await;
        if let Some(task) = backup_task {
            let _ = task.await;
        }
        catalog.flush().await.context("flushing the store")?;
        grpc_result
            .context("gRPC server task failed")?
            .context("gRPC server failed")?;
        tracing::info!("stopped");
        Ok(())
    }
}

/// What the server does to its store before it listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartupCheck {
    /// Bound on opening and checking the store (`None`: no bound).
    pub timeout: Option<Duration>,
    /// Read and check every record (`false`: only open the store and the
    /// catalog, for emergencies).
    pub deep: bool,
}

impl StartupCheck {
    /// The default bound of [`StartupCheck::timeout`].
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
}

impl Default for StartupCheck {
    fn default() -> Self {
        StartupCheck {
            timeout: Some(StartupCheck::DEFAULT_TIMEOUT),
            deep: true,
        }
    }
}

/// Why [`bounded`] returned no value.
#[derive(Debug)]
enum Bounded {
    /// The work failed.
    Failed(anyhow::Error),
    /// It did not finish within the bound (it is left running: a thread
    /// stuck in the engine cannot be stopped; the caller exits).
    TimedOut(Duration),
    /// It panicked.
    Panicked,
}

/// Runs `work` on a thread of its own, waiting at most `bound` for it. The
/// wait does not depend on any runtime thread being free, so a `work` that
/// spins in blocking code cannot stall it.
async fn bounded<T: Send + 'static>(
    bound: Option<Duration>,
    work: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> Result<T, Bounded> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("store-open".into())
        .spawn(move || {
            let _ = tx.send(work());
        })
        .map_err(|e| Bounded::Failed(anyhow::anyhow!("starting the store-open thread: {e}")))?;
    let result = match bound {
        Some(bound) => tokio::time::timeout(bound, rx)
            .await
            .map_err(|_| Bounded::TimedOut(bound))?,
        None => rx.await,
    };
    result
        .map_err(|_| Bounded::Panicked)?
        .map_err(Bounded::Failed)
}

/// Opens the store and the catalog and, with `deep`, checks every record;
/// returns them with the number of records checked. Blocking: runs on the
/// store-open thread.
fn open_and_check(
    data_dir: &std::path::Path,
    key: crate::crypto::MasterKey,
    deep: bool,
    reserve: MinFreeSpace,
) -> anyhow::Result<(Arc<dyn Store>, Catalog, u64)> {
    let dir = data_dir.display();
    let sled = SledStore::open(data_dir).map_err(|e| match e {
        // These name the directory already.
        e @ (StoreError::LostChanges { .. } | StoreError::Mark(_)) => anyhow::Error::from(e),
        e => anyhow::Error::from(e).context(format!("opening data directory {dir}")),
    })?;
    let sled: Arc<dyn Store> = Arc::new(sled);
    // Every write goes through the free-space guard (--min-free-space).
    let store: Arc<dyn Store> = Arc::new(
        GuardedStore::watching(sled, data_dir, reserve)
            .context("starting the free-space watcher")?,
    );
    let catalog = futures::executor::block_on(Catalog::open(store.clone(), key.clone()))
        .with_context(|| format!("opening data directory {dir}"))?;
    if !deep {
        tracing::warn!(data_dir = %dir, "the startup integrity check is skipped (--skip-startup-check)");
        return Ok((store, catalog, 0));
    }
    let report = crate::check::check_store(store.as_ref(), &key).with_context(|| {
        format!("the integrity check of data directory {dir} failed; restore from a backup")
    })?;
    if !report.problems.is_empty() {
        let mut trees: Vec<&str> = report
            .problems
            .iter()
            .filter_map(|p| p.split(':').next())
            .collect();
        trees.dedup();
        trees.sort_unstable();
        trees.dedup();
        for p in &report.problems {
            tracing::error!(problem = %p, "integrity check");
        }
        let shown: Vec<&str> = report.problems.iter().take(5).map(String::as_str).collect();
        anyhow::bail!(
            "the integrity check of data directory {dir} found {} problem(s) in tree(s) {}: {}; \
             restore from a backup (or start with --skip-startup-check to serve the store as it is)",
            report.problems.len(),
            trees.join(", "),
            shown.join("; "),
        );
    }
    let records = report.records.iter().map(|(_, n)| n).sum();
    Ok((store, catalog, records))
}

/// Runs the control plane on already-bound listeners until `shutdown`
/// completes. Opens the store in `config.data_dir`, refusing a data
/// directory with a newer schema or sealed under another master key.
pub async fn run(
    config: Config,
    grpc: TcpListener,
    http: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    Server::open(config)
        .await?
        .serve(grpc, http, shutdown)
        .await
}

/// The connections of [`crate::conn::incoming`] for tonic, which reads the
/// peer from the connection itself. (`incoming` disables Nagle's algorithm:
/// small pushes — cooldowns, shares, ACKs — would otherwise wait up to
/// 40 ms for the peer's delayed ACK.)
fn without_peer<T>(
    incoming: impl tokio_stream::Stream<Item = std::io::Result<(T, std::net::SocketAddr)>>,
) -> impl tokio_stream::Stream<Item = std::io::Result<T>> {
    use tokio_stream::StreamExt as _;
    incoming.map(|conn| conn.map(|(c, _peer)| c))
}

/// Updates the catalog gauges whenever the configuration version changes.
async fn keep_gauges(catalog: Arc<Catalog>, mut stop: Shutdown) {
    let mut versions = catalog.subscribe();
    loop {
        tokio::select! {
            changed = versions.changed() => {
                if changed.is_err() {
                    return;
                }
                metrics::record_catalog(&catalog);
            }
            () = stop.stopped() => return,
        }
    }
}

/// Periodic recorder maintenance (required when the recorder is installed
/// without the exporter's own HTTP listener).
async fn upkeep(handle: metrics_exporter_prometheus::PrometheusHandle, mut stop: Shutdown) {
    let mut tick = tokio::time::interval(METRICS_UPKEEP);
    loop {
        tokio::select! {
            _ = tick.tick() => handle.run_upkeep(),
            () = stop.stopped() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_startup_watchdog_gives_up_on_work_that_never_finishes() {
        let (hold, wait) = std::sync::mpsc::channel::<()>();
        let r = bounded(Some(Duration::from_millis(50)), move || {
            // Blocks its thread (as a spinning engine would) until the test ends.
            let _ = wait.recv();
            Ok(())
        })
        .await;
        assert!(matches!(r, Err(Bounded::TimedOut(_))), "{r:?}");
        drop(hold);
        let r = bounded(None, || Ok(7)).await;
        assert!(matches!(r, Ok(7)), "{r:?}");
        let r: Result<(), _> = bounded(Some(Duration::from_secs(600)), || {
            Err(anyhow::anyhow!("tree backends: damaged"))
        })
        .await;
        assert!(
            matches!(&r, Err(Bounded::Failed(e)) if e.to_string().contains("damaged")),
            "{r:?}"
        );
        let r: Result<(), _> =
            bounded(Some(Duration::from_secs(600)), || panic!("engine bug")).await;
        assert!(matches!(r, Err(Bounded::Panicked)), "{r:?}");
    }
}
