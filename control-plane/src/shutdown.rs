//! The shutdown signal every long-running task of the control plane
//! watches. [`crate::server`] creates the one sender and hands a
//! [`Shutdown`] to each task it starts; the tasks only ever wait on it.
//!
//! A leaf on purpose: it imports nothing from the crate, so a task deep in
//! `heartbeat` or `discovery` can stop on time without importing the
//! composition root that started it.
//!
//! The signals themselves are read by [`on_signals`] on a thread of their
//! own, which also holds the hard deadline: once SIGTERM (or ctrl-c) has
//! arrived, the process exits with [`EXIT_DEADLINE`] after the shutdown
//! timeout, or at a second signal, whatever the store or the runtime is
//! doing. A graceful stop that ends first simply returns from `main`.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;

/// The exit status when the graceful stop outlived the shutdown deadline
/// (or a second signal cut it short).
pub const EXIT_DEADLINE: i32 = 3;

/// A receiver of the shutdown signal: cheap to clone, one per task.
///
/// The signal is a `watch` channel of `bool` that turns `true` once and
/// never back; a dropped sender counts as shutdown too.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// Watches `stop`: shutdown begins when it turns `true` (or its sender
    /// is dropped).
    pub fn new(stop: watch::Receiver<bool>) -> Shutdown {
        Shutdown(stop)
    }

    /// Completes once shutdown has begun, at once if it already has. The
    /// borrow of the channel value ends inside, so callers' futures stay
    /// `Send`; cancel-safe, so it can sit in a `select!` loop.
    pub async fn stopped(&mut self) {
        let _ = self.0.wait_for(|s| *s).await;
    }
}

/// Installs the SIGTERM and SIGINT handlers (before it returns, so a
/// signal sent right after is never met by the default action) on a thread
/// with its own small runtime, so signals are seen even when every worker
/// of the main runtime is stuck. The returned future completes on the
/// first signal; from then on the thread exits the process with
/// [`EXIT_DEADLINE`] and an error in the log when `deadline` passes or a
/// second signal arrives.
#[cfg(unix)]
pub fn on_signals(
    deadline: Duration,
) -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<std::io::Result<()>>(1);
    std::thread::Builder::new()
        .name("claw-signals".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            runtime.block_on(async move {
                let (mut term, mut int) =
                    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
                        (Ok(t), Ok(i)) => (t, i),
                        (Err(e), _) | (_, Err(e)) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                let _ = ready_tx.send(Ok(()));
                tokio::select! {
                    _ = term.recv() => tracing::info!("received SIGTERM"),
                    _ = int.recv() => tracing::info!("received ctrl-c"),
                }
                let _ = stop_tx.send(());
                tokio::select! {
                    () = tokio::time::sleep(deadline) => tracing::error!(
                        deadline_s = deadline.as_secs_f64(),
                        "shutdown did not finish within the shutdown timeout ({:?}, --shutdown-timeout); exiting now with status {EXIT_DEADLINE}",
                        deadline
                    ),
                    _ = term.recv() => tracing::error!("second SIGTERM during shutdown; exiting now with status {EXIT_DEADLINE}"),
                    _ = int.recv() => tracing::error!("second ctrl-c during shutdown; exiting now with status {EXIT_DEADLINE}"),
                }
                std::process::exit(EXIT_DEADLINE);
            });
        })?;
    match ready_rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(std::io::Error::other("the signal thread ended early")),
    }
    Ok(async move {
        let _ = stop_rx.await;
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stopped_completes_on_true_and_on_a_dropped_sender() {
        let (tx, rx) = watch::channel(false);
        let mut a = Shutdown::new(rx);
        let mut b = a.clone();
        tx.send(true).expect("a receiver is alive");
        a.stopped().await;
        b.stopped().await;

        let (tx, rx) = watch::channel(false);
        let mut c = Shutdown::new(rx);
        drop(tx);
        c.stopped().await;
    }
}
