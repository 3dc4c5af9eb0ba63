//! Starts the heartbeat machinery inside a running control plane: the
//! scheduler task, the delivery worker and the internal client key, wired
//! to the catalog and the fleet registries.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::delivery::{DeliveryConfig, DeliveryWorker, HttpWebhook, SecretSource, Webhook};
use super::dispatch::{Dispatcher, ProxyDispatcher, RunReply, RunRequest};
use super::runs::RunStore;
use super::scheduler::{Deps, FleetView, Scheduler, SchedulerConfig, SchedulerHandle, SystemClock};
use crate::catalog::Catalog;
use crate::fleet::activity::{AgentActivity, Capacity};
use crate::shutdown::Shutdown;

/// Name of the client key the control plane mints for its heartbeat runs.
pub const INTERNAL_KEY_NAME: &str = "claw-heartbeat";

/// Heartbeat settings of the control plane (flags in `main`).
#[derive(Debug, Clone)]
pub struct HeartbeatSettings {
    /// Base URL of the proxy runs are sent through (`CLAW_HEARTBEAT_PROXY`).
    pub proxy_url: String,
    /// CA bundle the proxy's certificate is checked against instead of the
    /// public roots (`CLAW_HEARTBEAT_PROXY_CA`, for an `https://` proxy).
    pub proxy_ca: Option<std::path::PathBuf>,
    /// Retention and pruning.
    pub scheduler: SchedulerConfig,
    /// Webhook retries and the global secret (`CLAW_WEBHOOK_SECRET`).
    pub delivery: DeliveryConfig,
}

impl Default for HeartbeatSettings {
    fn default() -> Self {
        HeartbeatSettings {
            proxy_url: "http://127.0.0.1:8080".to_string(),
            proxy_ca: None,
            scheduler: SchedulerConfig::default(),
            delivery: DeliveryConfig::default(),
        }
    }
}

/// Handles to the running heartbeat machinery.
#[derive(Debug, Clone)]
pub struct Heartbeats {
    /// Manual runs.
    pub scheduler: SchedulerHandle,
    /// The run log (listing).
    pub runs: RunStore,
    /// Fed by report ingestion.
    pub activity: Arc<AgentActivity>,
    /// Fed by report ingestion.
    pub capacity: Arc<Capacity>,
}

/// Reads agents' webhook secrets from the catalog.
struct CatalogSecrets(Arc<Catalog>);

impl SecretSource for CatalogSecrets {
    fn secret(&self, agent_id: &str) -> Option<String> {
        let rec = self.0.agent_record(agent_id).ok()??;
        self.0.agent_webhook_secret(&rec).ok()?
    }
}

/// Sends runs through the proxy with the internal client key, minting the
/// key on first use (see [`start`]).
struct LazyKeyDispatcher {
    catalog: Arc<Catalog>,
    client: super::dispatch::HttpClient,
    proxy_url: String,
    inner: tokio::sync::OnceCell<Arc<ProxyDispatcher>>,
}

impl Dispatcher for Arc<LazyKeyDispatcher> {
    fn run(
        &self,
        req: RunRequest,
    ) -> futures::future::BoxFuture<'static, Result<RunReply, String>> {
        let this = self.clone();
        Box::pin(async move {
            let inner = this
                .inner
                .get_or_try_init(|| async {
                    let key = this
                        .catalog
                        .ensure_internal_client_key(INTERNAL_KEY_NAME)
                        .await
                        .map_err(|e| format!("internal client key: {e}"))?;
                    Ok::<_, String>(Arc::new(ProxyDispatcher::new(
                        this.client.clone(),
                        &this.proxy_url,
                        key,
                    )))
                })
                .await?
                .clone();
            inner.run(req).await
        })
    }
}

/// Starts the scheduler and the delivery worker; both stop with `stop`.
///
/// The internal client key (`claw-heartbeat`, internal, all models) is
/// minted as soon as any agent exists — at startup, or when the first agent
/// is created — so that it reaches the proxies' snapshot before the first
/// run; a control plane without agents does not create it.
pub fn start(
    catalog: Arc<Catalog>,
    runs: RunStore,
    settings: HeartbeatSettings,
    fleet: Arc<dyn FleetView>,
    stop: Shutdown,
) -> anyhow::Result<(Heartbeats, Vec<JoinHandle<()>>)> {
    let proxy_client = match &settings.proxy_ca {
        Some(ca) => super::dispatch::http_client_trusting(ca)?,
        None => super::dispatch::http_client()?,
    };
    let dispatcher = Arc::new(LazyKeyDispatcher {
        catalog: catalog.clone(),
        client: proxy_client,
        proxy_url: settings.proxy_url.clone(),
        inner: tokio::sync::OnceCell::new(),
    });
    // Webhooks and wakes go through the SSRF guard; runs (to the
    // operator's own proxy) do not.
    let webhook: Arc<dyn Webhook> = Arc::new(HttpWebhook(super::dispatch::webhook_client()?));
    start_with(
        catalog,
        runs,
        settings,
        fleet,
        Arc::new(dispatcher),
        webhook,
        stop,
    )
}

/// [`start`] with a given dispatcher and webhook client (tests, benchmarks).
pub fn start_with(
    catalog: Arc<Catalog>,
    runs: RunStore,
    mut settings: HeartbeatSettings,
    fleet: Arc<dyn FleetView>,
    dispatcher: Arc<dyn Dispatcher>,
    webhook: Arc<dyn Webhook>,
    stop: Shutdown,
) -> anyhow::Result<(Heartbeats, Vec<JoinHandle<()>>)> {
    super::metrics::describe();
    let activity = Arc::new(AgentActivity::new());
    let capacity = Arc::new(Capacity::new());
    let (outbox_tx, outbox_rx) = mpsc::unbounded_channel();
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    // Wake requests are signed like webhook deliveries and sent by the same client.
    let wake = &mut settings.scheduler.wake;
    wake.poster.get_or_insert_with(|| webhook.clone());
    wake.secrets
        .get_or_insert_with(|| Arc::new(CatalogSecrets(catalog.clone())));
    wake.global_secret
        .clone_from(&settings.delivery.global_secret);
    let (scheduler, handle) = Scheduler::new(
        Deps {
            catalog: catalog.clone(),
            runs: runs.clone(),
            dispatcher,
            activity: activity.clone(),
            capacity: capacity.clone(),
            clock: Arc::new(SystemClock),
            outbox: outbox_tx,
            fleet,
        },
        settings.scheduler.clone(),
    );
    let worker = DeliveryWorker::new(
        runs.clone(),
        webhook,
        Arc::new(CatalogSecrets(catalog.clone())),
        settings.delivery.clone(),
    );
    let tasks = vec![
        tokio::spawn(scheduler.run(done_rx, stop.clone())),
        tokio::spawn(worker.run(outbox_rx, done_tx, stop.clone())),
        tokio::spawn(mint_key_when_agents_exist(catalog, stop.clone())),
        tokio::spawn(forget_old_activity(activity.clone(), stop)),
    ];
    Ok((
        Heartbeats {
            scheduler: handle,
            runs,
            activity,
            capacity,
        },
        tasks,
    ))
}

async fn mint_key_when_agents_exist(catalog: Arc<Catalog>, mut stop: Shutdown) {
    let mut versions = catalog.subscribe();
    loop {
        if catalog.agent_count().unwrap_or(0) > 0 {
            match catalog.ensure_internal_client_key(INTERNAL_KEY_NAME).await {
                Ok(_) => return,
                Err(e) => tracing::error!(error = %e, "cannot mint the heartbeat client key"),
            }
        }
        tokio::select! {
            changed = versions.changed() => if changed.is_err() { return },
            () = stop.stopped() => return,
        }
    }
}

async fn forget_old_activity(activity: Arc<AgentActivity>, mut stop: Shutdown) {
    let mut tick = tokio::time::interval(Duration::from_secs(600));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let horizon = jiff::Timestamp::now() - jiff::SignedDuration::from_hours(24);
                activity.forget_before(horizon);
            }
            () = stop.stopped() => return,
        }
    }
}
