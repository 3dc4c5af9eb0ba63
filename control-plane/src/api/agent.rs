//! `claw.v1.AgentService`. Agents come from the catalog; their output-only
//! `heartbeat_status` and `last_terminal_run` from the heartbeat run log
//! ([`crate::heartbeat::scheduler::status`]).

use claw_proto::v1::agent_service_server::AgentService;
use claw_proto::v1::*;
use tonic::Request;

use super::{RpcResult, SharedCatalog, ok, required};
use crate::catalog::records::{now_ms, timestamp};
use crate::heartbeat::runs::RunStore;
use crate::heartbeat::scheduler::{schedule_of, status};

/// How many of an agent's newest runs are searched for its last terminal
/// one (the others are deferred or running: at most a few).
const TERMINAL_SEARCH: usize = 32;

/// Serves agents from the catalog.
#[derive(Debug, Clone)]
pub(crate) struct AgentApi {
    catalog: SharedCatalog,
    runs: RunStore,
}

impl AgentApi {
    /// A service over `catalog`, with heartbeat statuses from `runs`.
    pub(crate) fn new(catalog: SharedCatalog, runs: RunStore) -> Self {
        AgentApi { catalog, runs }
    }

    /// Fills the agent's heartbeat status and last terminal run.
    fn with_status(&self, mut agent: Agent) -> Agent {
        let ms_of = |t: &Option<prost_types::Timestamp>| {
            t.as_ref()
                .map_or(0, |t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
        };
        let last = match self.runs.list_agent(&agent.id, TERMINAL_SEARCH) {
            Ok(runs) => runs.into_iter().find_map(|r| {
                let s = RunStatus::try_from(r.status).ok()?;
                status::is_terminal(s).then(|| (s, ms_of(&r.finished_at)))
            }),
            Err(e) => {
                tracing::warn!(agent = %agent.id, error = %e, "cannot read heartbeat runs");
                None
            }
        };
        let schedule = schedule_of(&agent).ok();
        // Without a run, counted from the last change (creation, enabling).
        let since = ms_of(&agent.updated_at).max(ms_of(&agent.created_at));
        agent.heartbeat_status =
            status::status(&agent, schedule.as_ref(), last, since, now_ms()).to_string();
        agent.last_terminal_run = last.and_then(|(_, at)| timestamp(at));
        agent
    }
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    async fn create_agent(
        &self,
        request: Request<CreateAgentRequest>,
    ) -> RpcResult<CreateAgentResponse> {
        let actor = super::actor(&request);
        let agent = required(request.into_inner().agent, "agent")?;
        let (agent, config_version) = self.catalog.create_agent(&actor, agent).await?;
        tracing::info!(agent = %agent.id, config_version, "agent created");
        ok(CreateAgentResponse {
            agent: Some(agent),
            config_version,
        })
    }

    async fn get_agent(&self, request: Request<GetAgentRequest>) -> RpcResult<GetAgentResponse> {
        let agent = self.catalog.get_agent(&request.into_inner().agent)?;
        ok(GetAgentResponse {
            agent: Some(self.with_status(agent)),
        })
    }

    async fn list_agents(
        &self,
        request: Request<ListAgentsRequest>,
    ) -> RpcResult<ListAgentsResponse> {
        let req = request.into_inner();
        let (agents, next_page_token) = super::page::page(
            req.page_size,
            &req.page_token,
            |after, limit| self.catalog.agents_after(after, limit),
            |a| a.id.as_str(),
        )?;
        ok(ListAgentsResponse {
            agents: agents.into_iter().map(|a| self.with_status(a)).collect(),
            next_page_token,
        })
    }

    async fn update_agent(
        &self,
        request: Request<UpdateAgentRequest>,
    ) -> RpcResult<UpdateAgentResponse> {
        let actor = super::actor(&request);
        let (agent, config_version) = self
            .catalog
            .update_agent(&actor, request.into_inner())
            .await?;
        tracing::info!(agent = %agent.id, config_version, "agent updated");
        ok(UpdateAgentResponse {
            agent: Some(agent),
            config_version,
        })
    }

    async fn delete_agent(
        &self,
        request: Request<DeleteAgentRequest>,
    ) -> RpcResult<DeleteAgentResponse> {
        let actor = super::actor(&request);
        let ident = request.into_inner().agent;
        let config_version = self.catalog.delete_agent(&actor, &ident).await?;
        tracing::info!(agent = %ident, config_version, "agent deleted");
        ok(DeleteAgentResponse { config_version })
    }

    async fn set_agent_enabled(
        &self,
        request: Request<SetAgentEnabledRequest>,
    ) -> RpcResult<SetAgentEnabledResponse> {
        let actor = super::actor(&request);
        let req = request.into_inner();
        let (agent, config_version) = self
            .catalog
            .set_agent_enabled(&actor, &req.agent, req.enabled, &req.pause_note)
            .await?;
        tracing::info!(agent = %agent.id, enabled = req.enabled, config_version, "agent enabled changed");
        ok(SetAgentEnabledResponse {
            agent: Some(agent),
            config_version,
        })
    }
}
