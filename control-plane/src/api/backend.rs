//! `claw.v1.BackendService`.

use claw_proto::v1::backend_service_server::BackendService;
use claw_proto::v1::*;
use tonic::Request;

use super::{RpcResult, SharedCatalog, ok, required};

/// Serves backends from the catalog.
#[derive(Debug, Clone)]
pub(crate) struct BackendApi {
    catalog: SharedCatalog,
}

impl BackendApi {
    /// A service over `catalog`.
    pub(crate) fn new(catalog: SharedCatalog) -> Self {
        BackendApi { catalog }
    }
}

#[tonic::async_trait]
impl BackendService for BackendApi {
    async fn create_backend(
        &self,
        request: Request<CreateBackendRequest>,
    ) -> RpcResult<CreateBackendResponse> {
        let backend = required(request.into_inner().backend, "backend")?;
        let (backend, config_version) = self.catalog.create_backend(backend).await?;
        tracing::info!(backend = %backend.id, name = %backend.name, config_version, "backend created");
        ok(CreateBackendResponse {
            backend: Some(backend),
            config_version,
        })
    }

    async fn get_backend(
        &self,
        request: Request<GetBackendRequest>,
    ) -> RpcResult<GetBackendResponse> {
        let backend = self.catalog.get_backend(&request.into_inner().backend)?;
        ok(GetBackendResponse {
            backend: Some(backend),
        })
    }

    async fn list_backends(
        &self,
        _request: Request<ListBackendsRequest>,
    ) -> RpcResult<ListBackendsResponse> {
        ok(ListBackendsResponse {
            backends: self.catalog.list_backends()?,
        })
    }

    async fn update_backend(
        &self,
        request: Request<UpdateBackendRequest>,
    ) -> RpcResult<UpdateBackendResponse> {
        let (backend, config_version) = self.catalog.update_backend(request.into_inner()).await?;
        tracing::info!(backend = %backend.id, name = %backend.name, config_version, "backend updated");
        ok(UpdateBackendResponse {
            backend: Some(backend),
            config_version,
        })
    }

    async fn delete_backend(
        &self,
        request: Request<DeleteBackendRequest>,
    ) -> RpcResult<DeleteBackendResponse> {
        let ident = request.into_inner().backend;
        let config_version = self.catalog.delete_backend(&ident).await?;
        tracing::info!(backend = %ident, config_version, "backend deleted");
        ok(DeleteBackendResponse { config_version })
    }

    async fn set_backend_enabled(
        &self,
        request: Request<SetBackendEnabledRequest>,
    ) -> RpcResult<SetBackendEnabledResponse> {
        let req = request.into_inner();
        let (backend, config_version) = self
            .catalog
            .set_backend_enabled(&req.backend, req.enabled)
            .await?;
        tracing::info!(backend = %backend.id, enabled = req.enabled, config_version, "backend enabled changed");
        ok(SetBackendEnabledResponse {
            backend: Some(backend),
            config_version,
        })
    }
}
