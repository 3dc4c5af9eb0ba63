//! Polling helpers, for conditions that have no readiness signal.

use std::future::Future;
use std::time::{Duration, Instant};

/// How often the helpers re-check their condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Polls `cond` until it holds (`true`) or `timeout` passes (`false`).
/// Blocks the thread: from async code prefer [`wait_until_async`].
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// [`wait_until`] for an async condition.
pub async fn wait_until_async<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}
