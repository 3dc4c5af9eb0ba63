//! The per-slot policy: what a due cursor or a due retry becomes. In the
//! order the module doc of [`super`] gives: a run in flight → skipped, an
//! empty checklist → skipped, a busy agent or a model without capacity →
//! deferred (then skipped at the cap), else a claimed run. Everything it
//! decides goes into the batch; nothing here touches the store or the
//! network ([`super::commit`] does, after the batch commits).

use super::*;

/// Ends a deferred slot that cannot wait any longer: `failed` with the last
/// error when it was retrying a transient failure, else `skipped` with its
/// deferral reason.
fn give_up(rec: &mut RunRecord, now: i64) {
    let error = rec
        .run
        .as_ref()
        .map(|r| r.error.clone())
        .unwrap_or_default();
    if error.is_empty() {
        let reason = rec.defer_reason.clone();
        set_status(rec, RunStatus::Skipped, &reason, "", now);
    } else {
        set_status(rec, RunStatus::Failed, "", &error, now);
    }
}

impl Scheduler {
    /// The agent's cursor `t` came due.
    pub(super) fn fire_due(&mut self, id: &str, t: i64, now: i64) {
        let Some(state) = self.agents.get_mut(id) else {
            return;
        };
        state.next_ms = None;
        let due = slots::due(ts(t), ts(now), state.catch_up, &state.schedule);
        let next = due.next.map(ms);
        state.next_ms = next;
        let fp = state.fingerprint;
        if let Some(n) = next {
            self.queue.insert((n, id.to_string()));
        }
        self.batch.push((
            Write::Cursor(
                id.to_string(),
                Cursor {
                    next_ms: next.unwrap_or(0),
                    fingerprint: fp,
                },
            ),
            Action::None,
        ));
        if due.missed_unlisted > 0 {
            tracing::warn!(agent = %id, count = due.missed_unlisted, "heartbeat slots missed during downtime (not listed)");
            for _ in 0..due.missed_unlisted.min(1_000_000) {
                metrics::outcome(RunStatus::Missed, "");
            }
        }
        for slot in &due.missed {
            let key = RunKey::new(id, ms(*slot));
            let mut rec = run_record(&key, RunTrigger::Schedule, RunStatus::Missed, now);
            set_status(&mut rec, RunStatus::Missed, "", "", now);
            self.batch.push((Write::Claim(key, rec), Action::None));
        }
        if !due.missed.is_empty() {
            tracing::warn!(agent = %id, count = due.missed.len(), "heartbeat slots missed during downtime");
        }
        if let Some(slot) = due.run {
            self.fire_slot(id, ms(slot), now);
        }
    }

    /// The per-slot checks (see the module doc). `scheduled` is false for
    /// manual runs, which do not wait for the proxies' configuration.
    pub(super) fn decide(
        &self,
        id: &str,
        agent: &Agent,
        state: Option<&AgentState>,
        now: i64,
        scheduled: bool,
    ) -> Decision {
        if self.in_flight.contains_key(id) {
            return Decision::Skip("in_flight");
        }
        if checklist::is_effectively_empty(&agent.checklist) {
            return Decision::Skip("empty_checklist");
        }
        let window = state.map(|s| s.busy_window).unwrap_or(Duration::from_secs(
            validate::effective_busy_window_seconds(agent),
        ));
        if self.deps.activity.is_busy(id, ts(now), window) {
            return Decision::Defer("busy");
        }
        if !Self::is_wake(agent)
            && self.deps.capacity.is_model_cooling(&agent.model, ts(now))
            && !self.pick_model(agent, now).1
        {
            return Decision::Defer("no_capacity");
        }
        // A wake run calls the agent's runtime, not a proxy: nothing to wait for.
        if scheduled && !Self::is_wake(agent) && self.config_pending(id) {
            return Decision::Defer("config_pending");
        }
        Decision::Run
    }

    /// Whether the agent still waits for the proxies to ACK the
    /// configuration that introduced it (or its model).
    pub(super) fn config_pending(&self, id: &str) -> bool {
        let Some(&needed) = self.pending_config.get(id) else {
            return false;
        };
        self.deps
            .fleet
            .min_acked_version()
            .is_none_or(|acked| acked < needed)
    }

    /// How long a deferred slot waits before its next check.
    fn retry_step(&self, id: &str, reason: &str) -> Duration {
        let step = self
            .agents
            .get(id)
            .map(|s| s.retry_step)
            .unwrap_or(MAX_RETRY_STEP);
        if reason == "config_pending" {
            step.min(CONFIG_RETRY_STEP)
        } else {
            step
        }
    }

    pub(super) fn load_agent(&self, id: &str) -> Option<Agent> {
        match self.deps.catalog.agent_record(id) {
            Ok(rec) => rec.and_then(|r| r.spec),
            Err(e) => {
                tracing::error!(agent = %id, error = %e, "cannot read agent");
                None
            }
        }
    }

    /// A scheduled slot fires.
    pub(super) fn fire_slot(&mut self, id: &str, slot_ms: i64, now: i64) {
        // A slot still deferred gives way to the new one.
        if let Some(d) = self.deferred.remove(id) {
            self.retries.remove(&(d.retry_at_ms, id.to_string()));
            let mut rec = d.record;
            give_up(&mut rec, now);
            self.batch.push((Write::Update(d.key, rec), Action::None));
        }
        let Some(agent) = self.load_agent(id).filter(|a| a.enabled) else {
            return;
        };
        let key = RunKey::new(id, slot_ms);
        let decision = self.decide(id, &agent, self.agents.get(id), now, true);
        match decision {
            Decision::Run => {
                self.start_run(key, &agent, RunTrigger::Schedule, now, None);
            }
            Decision::Skip(reason) => {
                let mut rec = run_record(&key, RunTrigger::Schedule, RunStatus::Skipped, now);
                set_status(&mut rec, RunStatus::Skipped, reason, "", now);
                self.batch.push((Write::Claim(key, rec), Action::None));
            }
            Decision::Defer(reason) => {
                let Some(state) = self.agents.get(id) else {
                    return;
                };
                let mut rec = run_record(&key, RunTrigger::Schedule, RunStatus::Deferred, now);
                rec.defer_reason = reason.to_string();
                rec.defer_until_ms = now + state.defer_max.as_millis() as i64;
                let step = self.retry_step(id, reason);
                let retry_at_ms = (now + step.as_millis() as i64).min(rec.defer_until_ms);
                tracing::info!(agent = %id, reason, "heartbeat deferred");
                self.retries.insert((retry_at_ms, id.to_string()));
                self.deferred.insert(
                    id.to_string(),
                    Deferred {
                        key: key.clone(),
                        record: rec.clone(),
                        retry_at_ms,
                    },
                );
                self.batch.push((Write::Claim(key, rec), Action::None));
            }
        }
    }

    /// A deferred slot's retry is due.
    pub(super) fn retry(&mut self, id: &str, now: i64) {
        let Some(d) = self.deferred.remove(id) else {
            return;
        };
        let Deferred {
            key, mut record, ..
        } = d;
        let agent = self.load_agent(id).filter(|a| a.enabled);
        let Some(agent) = agent else {
            set_status(&mut record, RunStatus::Skipped, "paused", "", now);
            self.batch.push((Write::Update(key, record), Action::None));
            return;
        };
        match self.decide(id, &agent, self.agents.get(id), now, true) {
            Decision::Run => {
                record.defer_reason.clear();
                record.defer_until_ms = 0;
                if let Some(run) = record.run.as_mut()
                    && !run.error.is_empty()
                {
                    // A retry of a transient failure (see the module doc).
                    run.retries = run.retries.saturating_add(1);
                }
                self.start_run(key, &agent, RunTrigger::Schedule, now, Some(record));
            }
            Decision::Skip(reason) => {
                set_status(&mut record, RunStatus::Skipped, reason, "", now);
                self.batch.push((Write::Update(key, record), Action::None));
            }
            Decision::Defer(reason) if now >= record.defer_until_ms => {
                tracing::info!(agent = %id, reason, "heartbeat skipped after deferring");
                record.defer_reason = reason.to_string();
                give_up(&mut record, now);
                self.batch.push((Write::Update(key, record), Action::None));
            }
            Decision::Defer(reason) => {
                let step = self.retry_step(id, reason);
                let retry_at_ms = (now + step.as_millis() as i64).min(record.defer_until_ms);
                let write = record.defer_reason != reason;
                record.defer_reason = reason.to_string();
                if write {
                    self.batch
                        .push((Write::Update(key.clone(), record.clone()), Action::None));
                }
                self.retries.insert((retry_at_ms, id.to_string()));
                self.deferred.insert(
                    id.to_string(),
                    Deferred {
                        key,
                        record,
                        retry_at_ms,
                    },
                );
            }
        }
    }

    /// Claims (or moves to running) a run and queues its dispatch.
    pub(super) fn start_run(
        &mut self,
        key: RunKey,
        agent: &Agent,
        trigger: RunTrigger,
        now: i64,
        deferred: Option<RunRecord>,
    ) -> Option<RunRequest> {
        let timeout = Duration::from_secs(validate::effective_run_timeout_seconds(agent));
        if trigger == RunTrigger::Schedule {
            self.pending_config.remove(&key.agent_id);
        }
        let (write_claim, mut rec) = match deferred {
            Some(mut rec) => {
                if let Some(run) = rec.run.as_mut() {
                    run.started_at = records::timestamp(now);
                }
                (false, rec)
            }
            None => (true, run_record(&key, trigger, RunStatus::Running, now)),
        };
        set_status(&mut rec, RunStatus::Running, "", "", now);
        rec.deadline_ms = now + timeout.as_millis() as i64;
        if let Some(run) = rec.run.as_mut() {
            run.model = agent.model.clone();
        }
        let mut req = RunRequest {
            protocol: self.protocol_for(&agent.model),
            agent_id: key.agent_id.clone(),
            run_id: rec
                .run
                .as_ref()
                .map(|r| r.run_id.clone())
                .unwrap_or_default(),
            trigger: if trigger == RunTrigger::Manual {
                "manual"
            } else {
                "schedule"
            },
            model: agent.model.clone(),
            prompt: if agent.prompt.trim().is_empty() {
                dispatch::DEFAULT_PROMPT.to_string()
            } else {
                agent.prompt.clone()
            },
            checklist: agent.checklist.clone(),
            session_key: dispatch::session_key(&key.agent_id, agent.isolated_session, now),
            timeout,
        };
        self.prepare_run(&key, agent, &mut rec, &mut req, now);
        let (done, _) = watch::channel(None);
        self.in_flight.insert(
            key.agent_id.clone(),
            InFlight {
                key: key.clone(),
                record: rec.clone(),
                done,
            },
        );
        if trigger == RunTrigger::Manual {
            // The caller's reply carries the dispatch.
            self.batch.push((Write::Claim(key, rec), Action::None));
            return Some(req);
        }
        let write = if write_claim {
            Write::Claim(key, rec)
        } else {
            Write::Update(key, rec)
        };
        self.batch.push((write, Action::Dispatch(req)));
        None
    }
}
