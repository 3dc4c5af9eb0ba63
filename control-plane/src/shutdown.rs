//! The shutdown signal every long-running task of the control plane
//! watches. [`crate::server`] creates the one sender and hands a
//! [`Shutdown`] to each task it starts; the tasks only ever wait on it.
//!
//! A leaf on purpose: it imports nothing from the crate, so a task deep in
//! `heartbeat` or `discovery` can stop on time without importing the
//! composition root that started it.

use tokio::sync::watch;

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
