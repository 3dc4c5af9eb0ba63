//! The batch machinery: one wake-up's writes committed in one transaction
//! and one flush, then their side effects (runs sent, outbox handed to the
//! delivery worker, callers answered), and the recovery when a commit fails
//! (claims dropped, cursors re-fired, manual callers told).

use super::*;

impl Scheduler {
    /// Commits the batch (one transaction, one flush), then performs its
    /// side effects.
    pub(super) async fn flush_batch(&mut self) {
        if self.batch.is_empty() && self.waiters.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.batch);
        let writes: Vec<Write> = batch.iter().map(|(w, _)| w.clone()).collect();
        let outcomes = match self.deps.runs.commit(&writes).await {
            Ok(o) => o,
            Err(e) => {
                // Nothing of this batch is durable: release claimed state so
                // that nothing is sent. The slots are retried by the cursor
                // (which did not move either) on the next wake-up.
                tracing::error!(error = %e, "heartbeat store commit failed; retrying");
                self.recover_from_failed_commit(batch);
                return;
            }
        };
        let mut outcomes = outcomes.into_iter();
        let now = self.now_ms();
        for (write, action) in batch {
            let claimed = match &write {
                Write::Claim(..) => outcomes.next().unwrap_or(ClaimOutcome::Claimed),
                _ => ClaimOutcome::Claimed,
            };
            self.account(&write, &claimed);
            match (action, claimed) {
                (Action::None, ClaimOutcome::Existing(_)) => {
                    if let Write::Claim(key, _) = &write {
                        tracing::info!(agent = %key.agent_id, nominal_ms = key.nominal_ms, "slot already claimed; not run again");
                        self.drop_in_flight(key);
                    }
                }
                (Action::None, _) => {}
                (Action::Dispatch(req), ClaimOutcome::Claimed) => {
                    if let Write::Claim(key, _) | Write::Update(key, _) = &write {
                        metrics::dispatch_lag((now - key.nominal_ms) as f64 / 1000.0);
                        self.spawn(key.clone(), req);
                    }
                }
                (Action::Dispatch(_), ClaimOutcome::Existing(_)) => {
                    if let Write::Claim(key, _) = &write {
                        self.drop_in_flight(key);
                    }
                }
                (Action::Manual(reply, req), claimed) => {
                    let Write::Claim(key, rec) = &write else {
                        continue;
                    };
                    match claimed {
                        ClaimOutcome::Claimed => {
                            let done = match self.in_flight.get(&key.agent_id) {
                                Some(f) if &f.key == key => f.done.subscribe(),
                                _ => {
                                    let (tx, rx) = watch::channel(rec.run.clone());
                                    drop(tx);
                                    rx
                                }
                            };
                            if let Some(req) = req {
                                self.spawn(key.clone(), req);
                            }
                            let _ = reply.send(Ok(ManualRun {
                                run: rec.run.clone().unwrap_or_default(),
                                merged: false,
                                done,
                            }));
                        }
                        ClaimOutcome::Existing(existing) => {
                            self.drop_in_flight(key);
                            let (tx, rx) = watch::channel(existing.run.clone());
                            drop(tx);
                            let _ = reply.send(Ok(ManualRun {
                                run: existing.run.unwrap_or_default(),
                                merged: true,
                                done: rx,
                            }));
                        }
                    }
                }
                (Action::Finished(outbox), _) => {
                    if let Some(entry) = outbox {
                        let _ = self.deps.outbox.send(entry);
                    }
                }
            }
        }
        for (done, run) in std::mem::take(&mut self.waiters) {
            done.send_replace(run);
        }
    }

    pub(super) fn drop_in_flight(&mut self, key: &RunKey) {
        if self
            .in_flight
            .get(&key.agent_id)
            .is_some_and(|f| &f.key == key)
        {
            self.in_flight.remove(&key.agent_id);
        }
    }

    /// After a failed commit nothing happened: forget in-flight entries of
    /// this batch, answer manual callers with an error, and put the slots
    /// back so the next wake-up tries again.
    pub(super) fn recover_from_failed_commit(&mut self, batch: Vec<(Write, Action)>) {
        let now = self.now_ms();
        for (write, action) in batch {
            if let Write::Claim(key, _) | Write::Update(key, _) = &write {
                self.drop_in_flight(key);
            }
            if let Write::Cursor(id, _) = &write
                && let Some(state) = self.agents.get_mut(id)
            {
                // Re-fire from the old position: due() sorts it out.
                if let Some(t) = state.next_ms.take() {
                    self.queue.remove(&(t, id.clone()));
                }
                state.next_ms = Some(now + 1000);
                self.queue.insert((now + 1000, id.clone()));
            }
            if let Action::Manual(reply, _) = action {
                let _ = reply.send(Err(HeartbeatError::CommitFailed));
            }
        }
    }

    /// Metrics of a committed write.
    pub(super) fn account(&mut self, write: &Write, claimed: &ClaimOutcome) {
        let (Write::Claim(_, rec) | Write::Update(_, rec)) = write else {
            return;
        };
        if matches!(claimed, ClaimOutcome::Existing(_)) {
            return;
        }
        let status = rec.status();
        if !crate::heartbeat::runs::is_terminal(status) {
            return;
        }
        let run = rec.run.as_ref();
        let agent = run.map(|r| r.agent_id.as_str()).unwrap_or_default();
        if super::status::is_terminal(status) {
            let now = self.now_ms();
            self.terminal_run(agent, now);
        }
        metrics::outcome(
            status,
            run.map(|r| r.skip_reason.as_str()).unwrap_or_default(),
        );
        let healthy = match status {
            RunStatus::Ok | RunStatus::Suppressed | RunStatus::Delivered => Some(true),
            RunStatus::Failed | RunStatus::Missed | RunStatus::DeadLetter => Some(false),
            _ => None,
        };
        if let Some(healthy) = healthy {
            let n = self.failures.entry(agent.to_string()).or_default();
            *n = if healthy { 0 } else { n.saturating_add(1) };
            metrics::agent_health(agent, healthy, *n);
        }
    }
}
