//! `claw.v1.AgentService`.

use claw_proto::v1::agent_service_server::AgentService;
use claw_proto::v1::*;
use tonic::Request;

use super::{RpcResult, SharedCatalog, ok, required};

/// Serves agents from the catalog.
#[derive(Debug, Clone)]
pub(crate) struct AgentApi {
    catalog: SharedCatalog,
}

impl AgentApi {
    /// A service over `catalog`.
    pub(crate) fn new(catalog: SharedCatalog) -> Self {
        AgentApi { catalog }
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
        ok(GetAgentResponse { agent: Some(agent) })
    }

    async fn list_agents(
        &self,
        request: Request<ListAgentsRequest>,
    ) -> RpcResult<ListAgentsResponse> {
        let req = request.into_inner();
        let (agents, next_page_token) = super::page::page(
            self.catalog.list_agents()?,
            |a| a.id.as_str(),
            req.page_size,
            &req.page_token,
        )?;
        ok(ListAgentsResponse {
            agents,
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
