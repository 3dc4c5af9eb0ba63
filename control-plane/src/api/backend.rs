//! `claw.v1.BackendService`.
//!
//! Backends come from the catalog; their live state from the fleet: while
//! the provider reports a backend's quota spent, its `status` reads
//! `quota_exhausted` and `quota_exhausted_until` says until when (a disabled
//! backend stays `disabled`, with the time still shown).

use std::sync::Arc;

use claw_proto::v1::backend_service_server::BackendService;
use claw_proto::v1::*;
use tonic::Request;

use super::{RpcResult, SharedCatalog, ok, required};
use crate::fleet::Fleet;

/// Serves backends from the catalog.
#[derive(Debug, Clone)]
pub(crate) struct BackendApi {
    catalog: SharedCatalog,
    fleet: Arc<Fleet>,
}

impl BackendApi {
    /// A service over `catalog`, with live state from `fleet`.
    pub(crate) fn new(catalog: SharedCatalog, fleet: Arc<Fleet>) -> Self {
        BackendApi { catalog, fleet }
    }

    /// Adds the fleet's view (quota exhaustion) to a catalog backend.
    fn live(&self, mut b: Backend) -> Backend {
        let now = crate::catalog::records::now_ms();
        if let Some(c) = self.fleet.cooldowns().get(&b.id)
            && c.quota_exhausted(now)
        {
            b.quota_exhausted_until = crate::catalog::records::timestamp(c.quota_until_ms);
            if b.enabled {
                b.status = "quota_exhausted".to_string();
            }
        }
        b
    }
}

#[tonic::async_trait]
impl BackendService for BackendApi {
    async fn create_backend(
        &self,
        request: Request<CreateBackendRequest>,
    ) -> RpcResult<CreateBackendResponse> {
        let actor = super::actor(&request);
        let backend = required(request.into_inner().backend, "backend")?;
        let (backend, config_version) = self.catalog.create_backend(&actor, backend).await?;
        tracing::info!(backend = %backend.id, name = %backend.name, config_version, "backend created");
        ok(CreateBackendResponse {
            backend: Some(self.live(backend)),
            config_version,
        })
    }

    async fn get_backend(
        &self,
        request: Request<GetBackendRequest>,
    ) -> RpcResult<GetBackendResponse> {
        let backend = self.catalog.get_backend(&request.into_inner().backend)?;
        ok(GetBackendResponse {
            backend: Some(self.live(backend)),
        })
    }

    async fn list_backends(
        &self,
        _request: Request<ListBackendsRequest>,
    ) -> RpcResult<ListBackendsResponse> {
        ok(ListBackendsResponse {
            backends: self
                .catalog
                .list_backends()?
                .into_iter()
                .map(|b| self.live(b))
                .collect(),
        })
    }

    async fn update_backend(
        &self,
        request: Request<UpdateBackendRequest>,
    ) -> RpcResult<UpdateBackendResponse> {
        let actor = super::actor(&request);
        let (backend, config_version) = self
            .catalog
            .update_backend(&actor, request.into_inner())
            .await?;
        tracing::info!(backend = %backend.id, name = %backend.name, config_version, "backend updated");
        ok(UpdateBackendResponse {
            backend: Some(self.live(backend)),
            config_version,
        })
    }

    async fn delete_backend(
        &self,
        request: Request<DeleteBackendRequest>,
    ) -> RpcResult<DeleteBackendResponse> {
        let actor = super::actor(&request);
        let ident = request.into_inner().backend;
        let config_version = self.catalog.delete_backend(&actor, &ident).await?;
        tracing::info!(backend = %ident, config_version, "backend deleted");
        ok(DeleteBackendResponse { config_version })
    }

    async fn set_backend_enabled(
        &self,
        request: Request<SetBackendEnabledRequest>,
    ) -> RpcResult<SetBackendEnabledResponse> {
        let actor = super::actor(&request);
        let req = request.into_inner();
        let (backend, config_version) = self
            .catalog
            .set_backend_enabled(&actor, &req.backend, req.enabled)
            .await?;
        tracing::info!(backend = %backend.id, enabled = req.enabled, config_version, "backend enabled changed");
        ok(SetBackendEnabledResponse {
            backend: Some(self.live(backend)),
            config_version,
        })
    }
}
