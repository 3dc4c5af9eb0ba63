//! `claw.v1.HeartbeatService`: manual runs, run logs, checklists, the
//! next slots of an agent and the redelivery of dead letters.

use std::time::Duration;

use claw_proto::v1::heartbeat_service_server::HeartbeatService;
use claw_proto::v1::*;
use tonic::{Request, Status};

use super::{RpcResult, SharedCatalog, internal, ok};
use crate::catalog::records;
use crate::heartbeat::checklist;
use crate::heartbeat::runtime::Heartbeats;
use crate::heartbeat::scheduler;

/// Default and largest page of `ListHeartbeatRuns`.
const DEFAULT_LIMIT: u32 = 50;
const MAX_LIMIT: u32 = 10_000;
/// Default and largest `ListNextSlots` count.
const DEFAULT_SLOTS: u32 = 5;
const MAX_SLOTS: u32 = 100;
/// Most dead letters one `RedeliverRuns{dead_letters}` call puts back.
pub(crate) const MAX_REDELIVER: usize = 10_000;
/// Extra time a waiting `RunHeartbeat` gives a run beyond its timeout.
const WAIT_GRACE: Duration = Duration::from_secs(10);

/// Serves heartbeats.
#[derive(Debug, Clone)]
pub(crate) struct HeartbeatApi {
    catalog: SharedCatalog,
    heartbeats: Heartbeats,
}

impl HeartbeatApi {
    /// A service over the catalog and the running scheduler.
    pub(crate) fn new(catalog: SharedCatalog, heartbeats: Heartbeats) -> Self {
        HeartbeatApi {
            catalog,
            heartbeats,
        }
    }
}

#[tonic::async_trait]
impl HeartbeatService for HeartbeatApi {
    async fn run_heartbeat(
        &self,
        request: Request<RunHeartbeatRequest>,
    ) -> RpcResult<RunHeartbeatResponse> {
        let actor = super::actor(&request);
        let req = request.into_inner();
        let agent = self.catalog.get_agent(&req.agent)?;
        let mut manual = self.heartbeats.scheduler.run_now(&agent.id).await?;
        // The run's own log is written by the scheduler; the audit record
        // of who asked for it is a transaction of its own.
        let change = crate::audit::Change::new(
            "agent",
            &agent.id,
            &agent.name,
            "run",
            vec![crate::audit::field("run_id", "", &manual.run.run_id)],
        );
        self.catalog
            .record_audit(&actor, "RunHeartbeat", &change)
            .await?;
        tracing::info!(agent = %agent.id, run_id = %manual.run.run_id, merged = manual.merged, "manual heartbeat");
        let mut run = manual.run.clone();
        if req.wait {
            let limit =
                Duration::from_secs(claw_proto::validate::effective_run_timeout_seconds(&agent))
                    + WAIT_GRACE;
            let done = tokio::time::timeout(limit, manual.done.wait_for(Option::is_some)).await;
            if let Ok(Ok(finished)) = done
                && let Some(r) = finished.clone()
            {
                run = r;
            }
        }
        ok(RunHeartbeatResponse {
            run: Some(run),
            merged: manual.merged,
        })
    }

    async fn list_heartbeat_runs(
        &self,
        request: Request<ListHeartbeatRunsRequest>,
    ) -> RpcResult<ListHeartbeatRunsResponse> {
        let req = request.into_inner();
        let limit = match req.limit {
            0 => DEFAULT_LIMIT,
            n => n.min(MAX_LIMIT),
        } as usize;
        let runs = if req.agent.trim().is_empty() {
            self.heartbeats.runs.list_all(limit)
        } else {
            // A deleted agent's logs stay readable by its id until pruned.
            let id = match self.catalog.get_agent(&req.agent) {
                Ok(a) => a.id,
                Err(crate::catalog::CatalogError::NotFound { .. }) => req.agent.trim().to_string(),
                Err(e) => return Err(e.into()),
            };
            self.heartbeats.runs.list_agent(&id, limit)
        }
        .map_err(|e| internal(&e))?;
        ok(ListHeartbeatRunsResponse { runs })
    }

    async fn get_checklist(
        &self,
        request: Request<GetChecklistRequest>,
    ) -> RpcResult<GetChecklistResponse> {
        let agent = self.catalog.get_agent(&request.into_inner().agent)?;
        ok(GetChecklistResponse {
            effectively_empty: checklist::is_effectively_empty(&agent.checklist),
            checklist: agent.checklist,
        })
    }

    async fn set_checklist(
        &self,
        request: Request<SetChecklistRequest>,
    ) -> RpcResult<SetChecklistResponse> {
        let actor = super::actor(&request);
        let req = request.into_inner();
        let (agent, config_version) = self
            .catalog
            .set_agent_checklist(&actor, &req.agent, &req.checklist)
            .await?;
        tracing::info!(agent = %agent.id, config_version, "checklist set");
        ok(SetChecklistResponse {
            config_version,
            effectively_empty: checklist::is_effectively_empty(&agent.checklist),
        })
    }

    async fn list_next_slots(
        &self,
        request: Request<ListNextSlotsRequest>,
    ) -> RpcResult<ListNextSlotsResponse> {
        let req = request.into_inner();
        let agent = self.catalog.get_agent(&req.agent)?;
        let count = match req.count {
            0 => DEFAULT_SLOTS,
            n => n.min(MAX_SLOTS),
        } as usize;
        let schedule = scheduler::schedule_of(&agent).map_err(Status::failed_precondition)?;
        let slots: Vec<NextSlot> = schedule
            .next_slots(jiff::Timestamp::now(), count)
            .into_iter()
            .map(|(t, reason)| NextSlot {
                time: records::timestamp(t.as_millisecond()),
                local_time: t
                    .to_zoned(schedule.tz().clone())
                    .strftime("%Y-%m-%dT%H:%M:%S%:z")
                    .to_string(),
                reason: reason.to_string(),
            })
            .collect();
        let note = if !agent.enabled {
            match agent.pause_note.as_str() {
                "" => "paused: these slots will not fire until the agent is enabled".to_string(),
                n => format!("paused ({n}): these slots will not fire until the agent is enabled"),
            }
        } else if slots.is_empty() {
            "no slot falls inside the active window within a year".to_string()
        } else {
            String::new()
        };
        ok(ListNextSlotsResponse { slots, note })
    }

    async fn redeliver_runs(
        &self,
        request: Request<RedeliverRunsRequest>,
    ) -> RpcResult<RedeliverRunsResponse> {
        let actor = super::actor(&request);
        let req = request.into_inner();
        let run_id = req.run_id.trim();
        let agent = req.agent.trim();
        let runs = &self.heartbeats.runs;
        let (keys, subject) = match (run_id.is_empty(), req.dead_letters) {
            (false, true) => {
                return Err(Status::invalid_argument(
                    "run_id: give a run id or dead_letters, not both",
                ));
            }
            (true, false) => {
                return Err(Status::invalid_argument(
                    "run_id: give a run id, or dead_letters to redeliver every dead letter",
                ));
            }
            (false, false) if !agent.is_empty() => {
                return Err(Status::invalid_argument(
                    "agent: only with dead_letters (a run id names its agent)",
                ));
            }
            (false, false) => match runs.dead_letter_of(run_id).map_err(|e| internal(&e))? {
                Some((key, _)) => {
                    let subject = key.agent_id.clone();
                    (vec![key], subject)
                }
                None => {
                    return Err(match runs.find_run(run_id).map_err(|e| internal(&e))? {
                        Some((_, rec)) => Status::failed_precondition(format!(
                            "run {run_id} is {}, not dead-lettered: nothing to redeliver",
                            crate::heartbeat::metrics::status_name(rec.status())
                        )),
                        None => Status::not_found(format!("heartbeat run {run_id:?} not found")),
                    });
                }
            },
            (true, true) => {
                // A deleted agent's dead letters stay reachable by its id
                // until pruned.
                let id = if agent.is_empty() {
                    None
                } else {
                    match self.catalog.get_agent(agent) {
                        Ok(a) => Some(a.id),
                        Err(crate::catalog::CatalogError::NotFound { .. }) => {
                            Some(agent.to_string())
                        }
                        Err(e) => return Err(e.into()),
                    }
                };
                let found = runs
                    .dead_letters(id.as_deref(), MAX_REDELIVER)
                    .map_err(|e| internal(&e))?;
                let subject = id.unwrap_or_else(|| "*".to_string());
                (found.into_iter().map(|(k, _)| k).collect(), subject)
            }
        };
        let run_ids = self.heartbeats.scheduler.redeliver(keys).await?;
        let change = crate::audit::Change::new(
            "agent",
            &subject,
            "",
            "redeliver",
            vec![crate::audit::field("run_ids", "", &run_ids.join(","))],
        );
        self.catalog
            .record_audit(&actor, "RedeliverRuns", &change)
            .await?;
        tracing::info!(agent = %subject, runs = run_ids.len(), "heartbeat dead letters put back in the outbox");
        ok(RedeliverRunsResponse { run_ids })
    }
}
