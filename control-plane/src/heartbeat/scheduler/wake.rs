//! The scheduler's side of wake mode ([`crate::heartbeat::wake`]): a wake
//! run is claimed like an LLM run (same checks, same record) with its
//! callback token's hash; once the claim is durable the wake request is
//! POSTed instead of the model call. A 2xx makes the run `dispatched` until
//! the runtime's callback (or the deadline) ends it. Also the fallback model
//! choice of LLM runs.

use super::*;
use crate::heartbeat::wake::{self, CallbackError, Report, WakeRequest};

/// Wake runs the scheduler tracks.
#[derive(Default)]
pub(super) struct WakeRuns {
    /// Claimed wake runs whose request is sent once the claim commits.
    pending: HashMap<RunKey, WakeRequest>,
    /// Run id → (key, deadline) of the open wake runs (running or
    /// dispatched), for callbacks; finished runs are found by the key their
    /// token names.
    by_run_id: HashMap<String, (RunKey, i64)>,
    /// `(deadline ms, run id)` of dispatched runs.
    deadlines: BTreeSet<(i64, String)>,
    /// Next sweep of entries left behind by claims that did not commit.
    next_sweep_ms: i64,
}

/// How often entries of runs that never started are swept.
const SWEEP_EVERY_MS: i64 = 60_000;

impl Scheduler {
    /// True when the agent's heartbeat is a wake request.
    pub(super) fn is_wake(agent: &Agent) -> bool {
        agent.target == claw_proto::v1::HeartbeatTarget::Wake as i32
    }

    /// The model a run of `agent` uses at `now`, and whether it is the
    /// fallback: the primary unless every backend serving it is cooling and
    /// the fallback model is not.
    pub(super) fn pick_model(&self, agent: &Agent, now: i64) -> (String, bool) {
        if !agent.fallback_model.is_empty()
            && self.deps.capacity.is_model_cooling(&agent.model, ts(now))
            && !self
                .deps
                .capacity
                .is_model_cooling(&agent.fallback_model, ts(now))
        {
            return (agent.fallback_model.clone(), true);
        }
        (agent.model.clone(), false)
    }

    /// Hook of `start_run`: a wake run gets its token (hash in the record)
    /// and its request waits for the claim to commit; an LLM run may switch
    /// to the fallback model.
    pub(super) fn prepare_run(
        &mut self,
        key: &RunKey,
        agent: &Agent,
        rec: &mut RunRecord,
        req: &mut RunRequest,
        now: i64,
    ) {
        let run = rec.run.get_or_insert_with(HeartbeatRun::default);
        if !Self::is_wake(agent) {
            let (model, fallback) = self.pick_model(agent, now);
            if fallback {
                tracing::info!(agent = %key.agent_id, model = %model, "primary model has no capacity; using the fallback");
                run.model.clone_from(&model);
                run.used_fallback = true;
                req.protocol = self.protocol_for(&model);
                req.model = model;
            }
            return;
        }
        run.target = claw_proto::v1::HeartbeatTarget::Wake as i32;
        run.model.clear();
        let (token, hash) = wake::new_token(key);
        rec.callback_token_hash = hash;
        let request = WakeRequest {
            url: agent.wake_url.clone(),
            agent_id: key.agent_id.clone(),
            run_id: run.run_id.clone(),
            slot_ms: key.nominal_ms,
            checklist: agent.checklist.clone(),
            session_key: req.session_key.clone(),
            callback_url: wake::callback_url(&self.config.wake.public_url, &run.run_id),
            callback_token: token,
            timeout: req.timeout,
        };
        self.wake
            .by_run_id
            .insert(run.run_id.clone(), (key.clone(), rec.deadline_ms));
        self.wake.pending.insert(key.clone(), request);
    }

    /// Hook of `spawn`: sends the wake request of a committed wake claim.
    /// `false` when `key` is not a wake run.
    pub(super) fn spawn_wake(&mut self, key: &RunKey) -> bool {
        let Some(req) = self.wake.pending.remove(key) else {
            return false;
        };
        let fut = wake::send(&self.config.wake, req);
        let tx = self.tx.clone();
        let key = key.clone();
        tokio::spawn(async move {
            let result = fut.await;
            let _ = tx.send(Command::Woken { key, result });
        });
        true
    }

    /// Startup: a run found `dispatched` keeps waiting for its callback
    /// (never re-POSTed) until its deadline.
    pub(super) fn resume_dispatched(&mut self, key: RunKey, rec: &RunRecord) {
        let run_id = rec
            .run
            .as_ref()
            .map(|r| r.run_id.clone())
            .unwrap_or_default();
        self.wake
            .by_run_id
            .insert(run_id.clone(), (key, rec.deadline_ms));
        self.wake.deadlines.insert((rec.deadline_ms, run_id));
    }

    /// The earliest wake deadline, for the timer.
    pub(super) fn next_wake_deadline(&self) -> Option<i64> {
        self.wake.deadlines.first().map(|(t, _)| *t)
    }

    /// The wake request was answered.
    pub(super) fn woken(&mut self, key: RunKey, result: Result<(), String>) {
        let Some(f) = self.in_flight.remove(&key.agent_id) else {
            return;
        };
        if f.key != key {
            self.in_flight.insert(key.agent_id.clone(), f);
            return;
        }
        let now = self.now_ms();
        let mut rec = f.record;
        match result {
            Ok(()) => {
                set_status(&mut rec, RunStatus::Dispatched, "", "", now);
                let run_id = rec
                    .run
                    .as_ref()
                    .map(|r| r.run_id.clone())
                    .unwrap_or_default();
                self.wake.deadlines.insert((rec.deadline_ms, run_id));
            }
            Err(error) => {
                if let Some(run) = rec.run.as_ref() {
                    self.wake.by_run_id.remove(&run.run_id);
                }
                // A runtime that could not be reached is retried like an
                // unreachable proxy (1 s, 2 s, 4 s … within the deferral
                // cap); the wake's Idempotency-Key (the run id) lets a
                // runtime that did get the first attempt drop the repeat.
                // An answer other than 2xx fails at once.
                let retried = error.starts_with(wake::UNREACHABLE_PREFIX)
                    && self.redefer(
                        &key,
                        &mut rec,
                        dispatch::Transient::Unreachable,
                        &error,
                        now,
                    );
                if !retried {
                    tracing::warn!(agent = %key.agent_id, error = %error, "heartbeat wake failed");
                    set_status(&mut rec, RunStatus::Failed, "", &error, now);
                }
            }
        }
        let run = rec.run.clone();
        self.batch
            .push((Write::Update(key, rec), Action::Finished(None)));
        self.waiters.push((f.done, run));
    }

    /// Dispatched runs past their deadline end `failed`; old ids are forgotten.
    pub(super) fn expire_wakes(&mut self, now: i64) {
        while let Some((t, _)) = self.wake.deadlines.first() {
            if *t > now || self.batch.len() >= MAX_BATCH {
                break;
            }
            let Some((_, run_id)) = self.wake.deadlines.pop_first() else {
                break;
            };
            let Some((key, _)) = self.wake.by_run_id.remove(&run_id) else {
                continue;
            };
            match self.deps.runs.get(&key) {
                Ok(Some(mut rec)) if rec.status() == RunStatus::Dispatched => {
                    tracing::warn!(agent = %key.agent_id, run_id = %run_id, "heartbeat runtime never reported back");
                    set_status(
                        &mut rec,
                        RunStatus::Failed,
                        "",
                        "the runtime never reported back",
                        now,
                    );
                    self.batch.push((Write::Update(key, rec), Action::None));
                }
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "cannot read a dispatched run"),
            }
        }
        if now < self.wake.next_sweep_ms {
            return;
        }
        self.wake.next_sweep_ms = now + SWEEP_EVERY_MS;
        self.wake
            .by_run_id
            .retain(|_, (_, deadline)| *deadline + SWEEP_EVERY_MS > now);
        self.wake
            .pending
            .retain(|k, _| self.in_flight.get(&k.agent_id).is_some_and(|f| &f.key == k));
    }

    /// A runtime's callback: checks the token and the run's state, then
    /// ends the run (see [`crate::heartbeat::wake`]). The answer turns
    /// `Some` once the change is durable.
    pub(super) fn callback(
        &mut self,
        run_id: &str,
        token: Option<&str>,
        body: &[u8],
    ) -> Result<CallbackAnswer, CallbackError> {
        let not_found = || CallbackError::NotFound(run_id.to_string());
        // Runs of this process (and dispatched ones found at startup) by id;
        // others (finished before a restart) by the key the token names.
        let key = match self.wake.by_run_id.get(run_id) {
            Some((key, _)) => key.clone(),
            None => token.and_then(wake::key_of_token).ok_or_else(not_found)?,
        };
        let in_flight = self
            .in_flight
            .get(&key.agent_id)
            .filter(|f| f.key == key)
            .map(|f| f.record.clone());
        let mut rec = match in_flight {
            Some(r) => r,
            None => self
                .deps
                .runs
                .get(&key)
                .map_err(|_| CallbackError::Unavailable)?
                .ok_or_else(not_found)?,
        };
        if rec.run.as_ref().is_none_or(|r| r.run_id != run_id) {
            return Err(not_found());
        }
        if !token.is_some_and(|t| wake::token_matches(t, &rec.callback_token_hash)) {
            return Err(CallbackError::Unauthorized);
        }
        let now = self.now_ms();
        let body_hash = Sha256::digest(body).to_vec();
        let status = rec.status();
        if !matches!(status, RunStatus::Running | RunStatus::Dispatched) {
            if !rec.callback_body_hash.is_empty() && rec.callback_body_hash == body_hash {
                return Ok(CallbackAnswer::Done(Box::new(rec.run.unwrap_or_default())));
            }
            if now > rec.deadline_ms {
                return Err(CallbackError::Expired);
            }
            return Err(CallbackError::Conflict(run_id.to_string()));
        }
        if now > rec.deadline_ms {
            return Err(CallbackError::Expired);
        }
        let report = wake::parse_report(body).map_err(CallbackError::BadRequest)?;
        self.wake.by_run_id.remove(run_id);
        rec.callback_body_hash = body_hash;
        let mut outbox = None;
        match report {
            Report::Ok => set_status(&mut rec, RunStatus::Ok, "", "", now),
            Report::Suppressed(reply) => {
                if let Some(run) = rec.run.as_mut() {
                    run.reply_excerpt = reply::excerpt(&reply, EXCERPT_CHARS);
                }
                set_status(&mut rec, RunStatus::Suppressed, "", "", now);
            }
            Report::Failed(error) => {
                tracing::warn!(agent = %key.agent_id, error = %error, "heartbeat runtime reported a failure");
                set_status(&mut rec, RunStatus::Failed, "", &error, now);
            }
            Report::Alert(text) => {
                if let Some(run) = rec.run.as_mut() {
                    run.reply_excerpt = reply::excerpt(&text, EXCERPT_CHARS);
                }
                outbox = self.alert(
                    &key,
                    &mut rec,
                    &reply::AlertReason::RuntimeReported,
                    &text,
                    now,
                );
            }
        }
        let (tx, rx) = watch::channel(None);
        // The in-flight entry (a callback before the wake's answer) goes:
        // the wake's answer then finds nothing to change.
        let waiter = match self.in_flight.remove(&key.agent_id) {
            Some(f) if f.key == key => Some(f.done),
            Some(other) => {
                self.in_flight.insert(key.agent_id.clone(), other);
                None
            }
            None => None,
        };
        let run = rec.run.clone();
        self.batch
            .push((Write::Update(key, rec), Action::Finished(outbox)));
        if let Some(done) = waiter {
            self.waiters.push((done, run.clone()));
        }
        self.waiters.push((tx, run));
        Ok(CallbackAnswer::Pending(rx))
    }
}

/// The scheduler's answer to a callback.
pub(super) enum CallbackAnswer {
    /// Already recorded with this very body.
    Done(Box<HeartbeatRun>),
    /// Turns `Some(run)` once the result is durable.
    Pending(watch::Receiver<Option<HeartbeatRun>>),
}

impl SchedulerHandle {
    /// Hands a runtime's callback to the scheduler and waits (bounded) until
    /// its result is durable.
    pub async fn report_wake(
        &self,
        run_id: &str,
        token: Option<String>,
        body: Vec<u8>,
    ) -> Result<HeartbeatRun, CallbackError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Callback {
                run_id: run_id.to_string(),
                token,
                body,
                reply,
            })
            .map_err(|_| CallbackError::Unavailable)?;
        match rx.await.map_err(|_| CallbackError::Unavailable)?? {
            CallbackAnswer::Done(run) => Ok(*run),
            CallbackAnswer::Pending(mut rx) => {
                let wait = rx.wait_for(Option::is_some);
                match tokio::time::timeout(Duration::from_secs(30), wait).await {
                    Ok(Ok(run)) => Ok(run.clone().unwrap_or_default()),
                    _ => Err(CallbackError::Unavailable),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};

    use claw_proto::v1::HeartbeatTarget;

    use super::*;
    use crate::catalog::testing;
    use crate::heartbeat::delivery::Webhook;
    use crate::heartbeat::wake::WakeConfig;

    struct Clock(AtomicI64);

    impl super::Clock for Arc<Clock> {
        fn now(&self) -> Timestamp {
            ts(self.0.load(Ordering::SeqCst))
        }
    }

    /// A runtime answering 202 to every wake; remembers the bodies.
    #[derive(Default)]
    struct Runtime {
        calls: AtomicUsize,
        bodies: parking_lot::Mutex<Vec<serde_json::Value>>,
        /// The next this many wakes find nobody listening.
        refuse: AtomicUsize,
    }

    impl Webhook for Arc<Runtime> {
        fn post(
            &self,
            _url: String,
            _headers: Vec<(&'static str, String)>,
            body: Vec<u8>,
        ) -> futures::future::BoxFuture<'static, Result<u16, String>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let refused = self
                .refuse
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if refused {
                return Box::pin(async { Err("connection refused".to_string()) });
            }
            self.bodies
                .lock()
                .push(serde_json::from_slice(&body).unwrap_or_default());
            Box::pin(async { Ok(202) })
        }
    }

    struct NoLlm;

    impl Dispatcher for NoLlm {
        fn run(
            &self,
            _req: RunRequest,
        ) -> futures::future::BoxFuture<'static, Result<RunReply, String>> {
            Box::pin(async { Err("wake agents never call the model".to_string()) })
        }
    }

    const T0: i64 = 1_700_000_040_000;

    async fn scheduler(
        store: &Arc<dyn crate::store::Store>,
        catalog: &Arc<Catalog>,
        clock: &Arc<Clock>,
        runtime: &Arc<Runtime>,
    ) -> Scheduler {
        let (outbox, _) = mpsc::unbounded_channel();
        let poster: Arc<dyn Webhook> = Arc::new(runtime.clone());
        let config = SchedulerConfig {
            wake: WakeConfig {
                public_url: "http://cp:9090".into(),
                poster: Some(poster),
                ..Default::default()
            },
            ..Default::default()
        };
        let (mut s, _h) = Scheduler::new(
            Deps {
                catalog: catalog.clone(),
                runs: RunStore::new(store.clone()),
                dispatcher: Arc::new(NoLlm),
                activity: Arc::new(AgentActivity::new()),
                capacity: Arc::new(Capacity::new()),
                clock: Arc::new(clock.clone()),
                outbox,
                fleet: Arc::new(NoFleet),
            },
            config,
        );
        s.start().await.expect("start");
        s
    }

    async fn step(s: &mut Scheduler, clock: &Clock, now: i64) {
        clock.0.store(now, Ordering::SeqCst);
        s.tick();
        s.flush_batch().await;
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        while let Ok(cmd) = s.rx.try_recv() {
            s.command(cmd);
        }
        s.flush_batch().await;
    }

    fn only_run(store: &Arc<dyn crate::store::Store>) -> HeartbeatRun {
        let runs = RunStore::new(store.clone())
            .list_agent("w1", 10)
            .expect("list");
        assert_eq!(runs.len(), 1, "{runs:?}");
        runs[0].clone()
    }

    /// A store and catalog holding one wake agent `w1` (hourly, no stagger,
    /// 60 s run timeout).
    async fn with_wake_agent() -> (
        tempfile::TempDir,
        Arc<dyn crate::store::Store>,
        Arc<Catalog>,
    ) {
        let (dir, store, catalog) = testing::store_and_catalog().await;
        let catalog = Arc::new(catalog);
        catalog
            .create_agent(
                &crate::audit::Actor::system(),
                Agent {
                    id: "w1".into(),
                    model: "m".into(),
                    interval_seconds: 3600,
                    stagger: Some(false),
                    run_timeout_seconds: 60,
                    checklist: "- [ ] WorkBoard".into(),
                    enabled: true,
                    target: HeartbeatTarget::Wake as i32,
                    wake_url: "http://runtime/hooks/wake".into(),
                    ..Default::default()
                },
            )
            .await
            .expect("agent");
        (dir, store, catalog)
    }

    /// A wake that reaches no runtime is deferred and retried (like a run
    /// whose proxy is unreachable), not failed at once.
    #[tokio::test]
    async fn a_wake_that_reaches_no_runtime_is_retried() {
        let (_dir, store, catalog) = with_wake_agent().await;
        let clock = Arc::new(Clock(AtomicI64::new(T0 - 30_000)));
        let runtime = Arc::new(Runtime::default());
        runtime.refuse.store(1, Ordering::SeqCst);
        let mut s = scheduler(&store, &catalog, &clock, &runtime).await;
        let slot = s.agents["w1"].next_ms.expect("queued");
        step(&mut s, &clock, slot + 5).await;
        assert_eq!(runtime.calls.load(Ordering::SeqCst), 1);
        let run = only_run(&store);
        assert_eq!(run.status, RunStatus::Deferred as i32, "{run:?}");
        assert!(run.error.starts_with(wake::UNREACHABLE_PREFIX), "{run:?}");
        let mut at = slot + 5;
        while runtime.calls.load(Ordering::SeqCst) < 2 && at < slot + 30_000 {
            at += 500;
            step(&mut s, &clock, at).await;
        }
        assert_eq!(runtime.calls.load(Ordering::SeqCst), 2, "retried once");
        let run = only_run(&store);
        assert_eq!(run.status, RunStatus::Dispatched as i32, "{run:?}");
        assert!(run.retries >= 1, "{run:?}");
    }

    #[tokio::test]
    async fn a_dispatched_wake_survives_a_restart_without_a_second_post_and_fails_at_its_deadline()
    {
        let (_dir, store, catalog) = with_wake_agent().await;
        let clock = Arc::new(Clock(AtomicI64::new(T0 - 30_000)));
        let runtime = Arc::new(Runtime::default());
        let slot = {
            let mut s = scheduler(&store, &catalog, &clock, &runtime).await;
            let slot = s.agents["w1"].next_ms.expect("queued");
            step(&mut s, &clock, slot + 5).await;
            slot
            // "kill -9": dropped with the run dispatched.
        };
        assert_eq!(runtime.calls.load(Ordering::SeqCst), 1);
        let run = only_run(&store);
        assert_eq!(run.status, RunStatus::Dispatched as i32);
        assert_eq!(run.target, HeartbeatTarget::Wake as i32);
        let body = runtime.bodies.lock()[0].clone();
        assert_eq!(body["run_id"], run.run_id.as_str());
        assert_eq!(
            body["callback_url"],
            format!("http://cp:9090/v1/heartbeat/runs/{}/result", run.run_id).as_str()
        );
        let token = body["callback_token"].as_str().expect("token").to_string();
        // The token is stored only as a hash.
        for (_, raw) in store.scan(crate::store::Tree::HeartbeatRuns).expect("scan") {
            assert!(!String::from_utf8_lossy(&raw).contains(&token));
        }

        let mut s = scheduler(&store, &catalog, &clock, &runtime).await;
        step(&mut s, &clock, slot + 10_000).await;
        assert_eq!(runtime.calls.load(Ordering::SeqCst), 1, "never re-POSTed");
        assert_eq!(only_run(&store).status, RunStatus::Dispatched as i32);
        // A wrong token is refused; the deadline then fails the run.
        assert!(matches!(
            s.callback(&run.run_id, Some("hbt_nope"), br#"{"status":"ok"}"#),
            Err(CallbackError::Unauthorized)
        ));
        step(&mut s, &clock, slot + 61_000).await;
        let run = only_run(&store);
        assert_eq!(
            (run.status, run.error.as_str()),
            (RunStatus::Failed as i32, "the runtime never reported back")
        );
        assert!(matches!(
            s.callback(&run.run_id, Some(&token), br#"{"status":"ok"}"#),
            Err(CallbackError::Expired)
        ));
        assert!(matches!(
            s.callback("hbr_unknown", Some(&token), br#"{"status":"ok"}"#),
            Err(CallbackError::NotFound(_))
        ));
        // After another restart the finished run is still found by its token.
        drop(s);
        let mut s = scheduler(&store, &catalog, &clock, &runtime).await;
        assert!(matches!(
            s.callback(&run.run_id, Some(&token), br#"{"status":"ok"}"#),
            Err(CallbackError::Expired)
        ));
    }
}
