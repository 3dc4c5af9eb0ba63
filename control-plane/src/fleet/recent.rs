//! The requests and tokens each backend served fleet-wide in the last
//! minute, from the usage the proxies report (about once a second): what
//! the dashboard shows as rpm/tpm "in use" against a backend's limits.
//!
//! Per backend, one bucket per second for the last [`WINDOW_SECS`]
//! seconds; a request counts in the second its usage record names (the
//! request's start), so a burst reported late still lands in its minute.
//! In memory only: after a restart it fills again within a minute.

use std::collections::{HashMap, VecDeque};

use claw_proto::v1::StreamReportsRequest;
use parking_lot::Mutex;

/// The window, in seconds.
pub const WINDOW_SECS: i64 = 60;

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    sec: i64,
    requests: u64,
    tokens: u64,
}

/// Last-minute use per backend id.
#[derive(Debug, Default)]
pub struct RecentUse {
    backends: Mutex<HashMap<String, VecDeque<Bucket>>>,
}

fn ts_ms(ts: Option<&prost_types::Timestamp>) -> Option<i64> {
    ts.map(|t| t.seconds.saturating_mul(1000) + i64::from(t.nanos / 1_000_000))
}

impl RecentUse {
    /// Adds a stored batch's usage (events and aggregates) as of `now_ms`.
    pub fn record(&self, batch: &StreamReportsRequest, now_ms: i64) {
        let mut map = self.backends.lock();
        let mut add = |backend: &str, at_ms: i64, requests: u64, tokens: u64| {
            let sec = at_ms.div_euclid(1000);
            if backend.is_empty() || sec <= now_ms.div_euclid(1000) - WINDOW_SECS {
                return;
            }
            let q = map.entry(backend.to_string()).or_default();
            // Reports arrive roughly in time order: find the bucket from the back.
            match q.iter_mut().rev().find(|b| b.sec == sec) {
                Some(b) => {
                    b.requests = b.requests.saturating_add(requests);
                    b.tokens = b.tokens.saturating_add(tokens);
                }
                None => {
                    let pos = q.iter().rposition(|b| b.sec < sec).map_or(0, |i| i + 1);
                    q.insert(
                        pos,
                        Bucket {
                            sec,
                            requests,
                            tokens,
                        },
                    );
                }
            }
        };
        for e in &batch.usage {
            let at = ts_ms(e.time.as_ref()).unwrap_or(now_ms);
            add(
                &e.backend_id,
                at,
                1,
                e.prompt_tokens.saturating_add(e.completion_tokens),
            );
        }
        for a in &batch.usage_aggregates {
            let Some(t) = &a.totals else { continue };
            let at = ts_ms(a.last_time.as_ref()).unwrap_or(now_ms);
            add(
                &a.backend_id,
                at,
                t.requests,
                t.prompt_tokens.saturating_add(t.completion_tokens),
            );
        }
        Self::expire(&mut map, now_ms);
    }

    fn expire(map: &mut HashMap<String, VecDeque<Bucket>>, now_ms: i64) {
        let oldest = now_ms.div_euclid(1000) - WINDOW_SECS;
        map.retain(|_, q| {
            while q.front().is_some_and(|b| b.sec <= oldest) {
                q.pop_front();
            }
            !q.is_empty()
        });
    }

    /// `backend id -> (requests, tokens)` in the minute before `now_ms`.
    pub fn per_minute(&self, now_ms: i64) -> HashMap<String, (u64, u64)> {
        let mut map = self.backends.lock();
        Self::expire(&mut map, now_ms);
        map.iter()
            .map(|(id, q)| {
                let (r, t) = q.iter().fold((0u64, 0u64), |(r, t), b| {
                    (r.saturating_add(b.requests), t.saturating_add(b.tokens))
                });
                (id.clone(), (r, t))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use claw_proto::v1::{UsageAggregate, UsageEvent, UsageTotals};

    fn ts(ms: i64) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp {
            seconds: ms / 1000,
            nanos: ((ms % 1000) * 1_000_000) as i32,
        })
    }

    fn event(backend: &str, at: i64, p: u64, c: u64) -> UsageEvent {
        UsageEvent {
            time: ts(at),
            backend_id: backend.into(),
            prompt_tokens: p,
            completion_tokens: c,
            ..Default::default()
        }
    }

    #[test]
    fn counts_the_last_minute_per_backend_and_forgets_older_use() {
        let r = RecentUse::default();
        let now = 1_000_000_000;
        let batch = StreamReportsRequest {
            usage: vec![
                event("be_a", now - 1_000, 10, 5),
                event("be_a", now - 30_000, 1, 1),
                event("be_b", now - 500, 7, 0),
                event("be_a", now - 61_000, 100, 100),
                event("", now, 9, 9),
            ],
            usage_aggregates: vec![UsageAggregate {
                last_time: ts(now - 2_000),
                backend_id: "be_b".into(),
                totals: Some(UsageTotals {
                    requests: 3,
                    prompt_tokens: 30,
                    completion_tokens: 3,
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        r.record(&batch, now);
        let m = r.per_minute(now);
        assert_eq!(m.get("be_a"), Some(&(2, 17)));
        assert_eq!(m.get("be_b"), Some(&(4, 40)));
        assert_eq!(m.len(), 2);
        // 31 s later the request at -30 s is still in, the one at -1 s too.
        let m = r.per_minute(now + 29_000);
        assert_eq!(m.get("be_a"), Some(&(2, 17)));
        let m = r.per_minute(now + 31_000);
        assert_eq!(m.get("be_a"), Some(&(1, 15)));
        assert!(r.per_minute(now + 120_000).is_empty());
    }
}
