//! `claw.v1.HeartbeatService`: manual runs, run logs, checklists and the
//! next slots of an agent.

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
        _request: Request<RedeliverRunsRequest>,
    ) -> RpcResult<RedeliverRunsResponse> {
        Err(Status::unimplemented("RedeliverRuns is not built yet"))
    }
}
