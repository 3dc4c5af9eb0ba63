//! The snapshot publisher: one task per control plane that follows the
//! catalog's configuration version, lets bursts of writes settle, builds
//! one snapshot of the latest version and publishes it to every stream.
//!
//! Building once here, rather than per stream, means a config change costs
//! one consistent read and one decryption of the provider keys however many
//! proxies are connected; the streams share the result behind an `Arc`.
//! The published value is a `watch`, so a slow stream never queues
//! intermediate versions: it always picks up the latest.

use std::sync::Arc;
use std::time::Duration;

use claw_proto::v1::Snapshot;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::catalog::Catalog;
use crate::metrics;
use crate::shutdown::Shutdown;

/// The latest snapshot, `None` until the first build succeeds.
pub(crate) type Latest = watch::Receiver<Option<Arc<Snapshot>>>;

/// First delay before retrying a failed build; doubles up to
/// [`RETRY_MAX`]. The previous snapshot stays in force meanwhile.
const RETRY_INITIAL: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// How long configuration changes may settle before a snapshot is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Debounce {
    /// Wait this long after a change for further changes.
    pub quiet: Duration,
    /// But never longer than this after the first change, so a steady
    /// stream of writes still reaches proxies at least this often.
    pub max_delay: Duration,
}

impl Default for Debounce {
    fn default() -> Self {
        Debounce {
            quiet: Duration::from_millis(30),
            max_delay: Duration::from_millis(200),
        }
    }
}

/// Starts the publisher; it runs until `stop` turns true. The returned
/// receiver sees each built snapshot.
pub(crate) fn spawn(
    catalog: Arc<Catalog>,
    debounce: Debounce,
    stop: Shutdown,
) -> (Latest, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(None);
    let task = tokio::spawn(run(catalog, tx, debounce, stop));
    (rx, task)
}

async fn run(
    catalog: Arc<Catalog>,
    tx: watch::Sender<Option<Arc<Snapshot>>>,
    debounce: Debounce,
    mut stop: Shutdown,
) {
    let mut versions = catalog.subscribe();
    let mut retry = RETRY_INITIAL;
    loop {
        // Mark the current version seen *before* reading: a commit racing
        // the build either lands in it or wakes the wait below.
        versions.borrow_and_update();
        let published = tx.borrow().as_ref().map(|s| s.version);
        if published != Some(catalog.config_version()) {
            if let Err(e) = build_and_publish(&catalog, &tx).await {
                tracing::error!(
                    error = %e,
                    retry_in_ms = retry.as_millis() as u64,
                    "cannot build the configuration snapshot; proxies keep the previous one"
                );
                tokio::select! {
                    () = tokio::time::sleep(retry) => {}
                    () = stop.stopped() => return,
                }
                retry = (retry * 2).min(RETRY_MAX);
                continue;
            }
            retry = RETRY_INITIAL;
        }
        tokio::select! {
            changed = versions.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = stop.stopped() => return,
        }
        tokio::select! {
            () = settle(&mut versions, debounce) => {}
            () = stop.stopped() => return,
        }
    }
}

async fn build_and_publish(
    catalog: &Catalog,
    tx: &watch::Sender<Option<Arc<Snapshot>>>,
) -> crate::catalog::Result<()> {
    let started = std::time::Instant::now();
    let built = catalog.snapshot().await;
    let seconds = started.elapsed().as_secs_f64();
    metrics::snapshot_built(seconds, built.as_ref().ok().map(|s| s.version));
    let snapshot = built?;
    tracing::debug!(
        version = snapshot.version,
        backends = snapshot.backends.len(),
        client_keys = snapshot.client_keys.len(),
        build_ms = seconds * 1e3,
        "configuration snapshot built"
    );
    tx.send_replace(Some(Arc::new(snapshot)));
    Ok(())
}

/// Returns once `versions` has been quiet for `quiet`, or `max_delay` after
/// the call, whichever comes first (or when the sender is gone). Called
/// right after a change was seen.
pub(super) async fn settle(versions: &mut watch::Receiver<u64>, d: Debounce) {
    let deadline = Instant::now() + d.max_delay;
    loop {
        let quiet_until = (Instant::now() + d.quiet).min(deadline);
        tokio::select! {
            changed = versions.changed() => {
                if changed.is_err() || Instant::now() >= deadline {
                    return;
                }
            }
            () = tokio::time::sleep_until(quiet_until) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Debounce = Debounce {
        quiet: Duration::from_millis(30),
        max_delay: Duration::from_millis(200),
    };

    #[tokio::test(start_paused = true)]
    async fn a_single_change_settles_after_the_quiet_period() {
        let (_tx, mut rx) = watch::channel(1u64);
        let start = Instant::now();
        settle(&mut rx, D).await;
        assert_eq!(start.elapsed(), D.quiet);
    }

    #[tokio::test(start_paused = true)]
    async fn each_change_extends_the_wait_until_quiet() {
        let (tx, mut rx) = watch::channel(1u64);
        let writer = tokio::spawn(async move {
            for v in 2..=5 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                tx.send_replace(v);
            }
            tx
        });
        let start = Instant::now();
        settle(&mut rx, D).await;
        // Four changes 20 ms apart, then 30 ms of quiet.
        assert_eq!(start.elapsed(), Duration::from_millis(80 + 30));
        assert_eq!(*rx.borrow(), 5);
        drop(writer.await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_storm_is_cut_at_the_max_delay() {
        let (tx, mut rx) = watch::channel(1u64);
        let writer = tokio::spawn(async move {
            for v in 2.. {
                tokio::time::sleep(Duration::from_millis(10)).await;
                if tx.send(v).is_err() {
                    return;
                }
            }
        });
        let start = Instant::now();
        settle(&mut rx, D).await;
        assert_eq!(start.elapsed(), D.max_delay);
        drop(rx);
        writer.await.expect("writer ends once the receiver is gone");
    }

    #[tokio::test(start_paused = true)]
    async fn a_closed_channel_returns_at_once() {
        let (tx, mut rx) = watch::channel(1u64);
        drop(tx);
        let start = Instant::now();
        settle(&mut rx, D).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
