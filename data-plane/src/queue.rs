//! The bounded wait queue for requests whose candidates are all at their
//! rate limit. One queue per canonical model; interactive requests are served
//! before `x-claw-priority: background` ones, FIFO within a priority.
//!
//! Only the head of the queue polls the rate limiters (sleeping until the
//! soonest conforming instant they answer, re-checking every
//! [`HEAD_RECHECK`]); the others sleep on their own [`Notify`] until they
//! become the head, so waiting costs no CPU and there is no thundering
//! herd. A ticket leaves the queue when dropped (admitted, timed out or the
//! client went away) and wakes the next head.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Scheduling class of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Priority {
    /// Default: a user or agent is waiting.
    Interactive,
    /// `x-claw-priority: background` (heartbeats, batch work).
    Background,
}

impl Priority {
    /// Label value for metrics and events.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Interactive => "interactive",
            Priority::Background => "background",
        }
    }
}

struct Entry {
    id: u64,
    notify: Arc<Notify>,
}

#[derive(Default)]
struct Inner {
    interactive: VecDeque<Entry>,
    background: VecDeque<Entry>,
    next_id: u64,
}

impl Inner {
    fn len(&self) -> usize {
        self.interactive.len() + self.background.len()
    }

    fn head(&self) -> Option<&Entry> {
        self.interactive.front().or_else(|| self.background.front())
    }
}

/// Longest the head of a queue sleeps before asking the buckets again.
pub(crate) const HEAD_RECHECK: Duration = Duration::from_millis(250);

/// A priority wait queue.
#[derive(Default)]
pub struct WaitQueue {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for WaitQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WaitQueue")
            .field("len", &self.len())
            .finish()
    }
}

/// Why a request left the queue without a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueExit {
    /// The queue was full.
    Full,
    /// The deadline passed.
    TimedOut,
    /// Waiting cannot help any more (e.g. every candidate is now cooling).
    GaveUp,
}

impl WaitQueue {
    /// Requests waiting.
    pub fn len(&self) -> usize {
        self.inner.lock().len()
    }

    /// True when nobody waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Joins the queue unless `depth` requests already wait.
    pub fn join(self: &Arc<Self>, priority: Priority, depth: usize) -> Option<Ticket> {
        let mut g = self.inner.lock();
        if g.len() >= depth {
            return None;
        }
        g.next_id += 1;
        let id = g.next_id;
        let notify = Arc::new(Notify::new());
        let e = Entry {
            id,
            notify: notify.clone(),
        };
        match priority {
            Priority::Interactive => g.interactive.push_back(e),
            Priority::Background => g.background.push_back(e),
        }
        crate::metrics::queue_joined();
        Some(Ticket {
            queue: self.clone(),
            id,
            priority,
            notify,
        })
    }

    /// Waits for a slot: `attempt` is called by the head with the current
    /// time and either admits (`Ok`), asks to be called again after a delay
    /// (`Err(Some(d))`) or gives up (`Err(None)`).
    pub async fn wait<T>(
        self: &Arc<Self>,
        priority: Priority,
        depth: usize,
        deadline: Instant,
        mut attempt: impl FnMut(Instant) -> Result<T, Option<Duration>>,
    ) -> Result<T, QueueExit> {
        let ticket = self.join(priority, depth).ok_or(QueueExit::Full)?;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(QueueExit::TimedOut);
            }
            if ticket.is_head() {
                match attempt(now) {
                    Ok(t) => return Ok(t),
                    Err(None) => return Err(QueueExit::GaveUp),
                    Err(Some(wait)) => {
                        // Wake at the soonest token, or earlier if a request
                        // of higher priority takes the head. Never sleep
                        // longer than HEAD_RECHECK: the buckets can change
                        // under the head (a larger rate share, a new
                        // snapshot), and a share of 0 reports no token ever.
                        let wake = now
                            .checked_add(wait.clamp(Duration::from_millis(1), HEAD_RECHECK))
                            .unwrap_or(deadline)
                            .min(deadline);
                        tokio::select! {
                            _ = tokio::time::sleep_until(wake) => {}
                            _ = ticket.notify.notified() => {}
                        }
                    }
                }
            } else {
                tokio::select! {
                    _ = ticket.notify.notified() => {}
                    _ = tokio::time::sleep_until(deadline) => {}
                }
            }
        }
    }
}

/// A place in a [`WaitQueue`]; leaving is dropping it.
pub struct Ticket {
    queue: Arc<WaitQueue>,
    id: u64,
    priority: Priority,
    notify: Arc<Notify>,
}

impl Ticket {
    /// True when this ticket is the next to be served.
    pub fn is_head(&self) -> bool {
        self.queue
            .inner
            .lock()
            .head()
            .is_some_and(|e| e.id == self.id)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut g = self.queue.inner.lock();
        let q = match self.priority {
            Priority::Interactive => &mut g.interactive,
            Priority::Background => &mut g.background,
        };
        if let Some(pos) = q.iter().position(|e| e.id == self.id) {
            q.remove(pos);
            crate::metrics::queue_left();
        }
        if let Some(head) = g.head() {
            head.notify.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn interactive_is_served_before_background() {
        let q = Arc::new(WaitQueue::default());
        let tokens = Arc::new(AtomicU32::new(0));
        let order = Arc::new(Mutex::new(Vec::new()));
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut tasks = Vec::new();
        for (name, prio) in [
            ("bg1", Priority::Background),
            ("bg2", Priority::Background),
            ("int1", Priority::Interactive),
        ] {
            let (q, tokens, order) = (q.clone(), tokens.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                q.wait(prio, 10, deadline, |_| {
                    if tokens.load(Ordering::SeqCst) > 0 {
                        tokens.fetch_sub(1, Ordering::SeqCst);
                        order.lock().push(name);
                        Ok(())
                    } else {
                        Err(Some(Duration::from_secs(1)))
                    }
                })
                .await
            }));
            tokio::task::yield_now().await;
        }
        assert_eq!(q.len(), 3);
        tokens.store(3, Ordering::SeqCst);
        for t in tasks {
            assert_eq!(t.await.unwrap(), Ok(()));
        }
        assert_eq!(*order.lock(), vec!["int1", "bg1", "bg2"]);
        assert!(q.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn full_queue_and_timeout() {
        let q = Arc::new(WaitQueue::default());
        let deadline = Instant::now() + Duration::from_secs(2);
        let q2 = q.clone();
        let waiting = tokio::spawn(async move {
            q2.wait(Priority::Interactive, 1, deadline, |_| {
                Err::<(), _>(Some(Duration::from_millis(500)))
            })
            .await
        });
        tokio::task::yield_now().await;
        let r = q
            .wait(Priority::Interactive, 1, deadline, |_| {
                Ok::<_, Option<Duration>>(())
            })
            .await;
        assert_eq!(r, Err(QueueExit::Full));
        assert_eq!(waiting.await.unwrap(), Err(QueueExit::TimedOut));
        assert!(q.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn giving_up_leaves_the_queue() {
        let q = Arc::new(WaitQueue::default());
        let deadline = Instant::now() + Duration::from_secs(2);
        let r = q
            .wait(Priority::Background, 4, deadline, |_| Err::<(), _>(None))
            .await;
        assert_eq!(r, Err(QueueExit::GaveUp));
        assert!(q.is_empty());
    }

    /// Regression: a head told "no token ever" (a rate share of 0) slept
    /// until its deadline and missed the share that arrived meanwhile.
    #[tokio::test(start_paused = true)]
    async fn the_head_rechecks_when_told_to_wait_forever() {
        let q = Arc::new(WaitQueue::default());
        let start = Instant::now();
        let deadline = start + Duration::from_secs(30);
        let share_at = start + Duration::from_secs(2);
        let r = q
            .wait(Priority::Interactive, 4, deadline, |now| {
                if now >= share_at {
                    Ok(now)
                } else {
                    Err(Some(Duration::MAX))
                }
            })
            .await
            .expect("admitted once the share arrives");
        assert!(r - share_at <= HEAD_RECHECK, "admitted at {:?}", r - start);
    }
}
