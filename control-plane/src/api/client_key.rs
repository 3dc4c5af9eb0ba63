//! `claw.v1.ClientKeyService`.

use claw_proto::v1::client_key_service_server::ClientKeyService;
use claw_proto::v1::*;
use tonic::Request;

use super::{RpcResult, SharedCatalog, ok, required};

/// Serves client keys from the catalog.
#[derive(Debug, Clone)]
pub(crate) struct ClientKeyApi {
    catalog: SharedCatalog,
}

impl ClientKeyApi {
    /// A service over `catalog`.
    pub(crate) fn new(catalog: SharedCatalog) -> Self {
        ClientKeyApi { catalog }
    }
}

#[tonic::async_trait]
impl ClientKeyService for ClientKeyApi {
    async fn create_client_key(
        &self,
        request: Request<CreateClientKeyRequest>,
    ) -> RpcResult<CreateClientKeyResponse> {
        let actor = super::actor(&request);
        let key = required(request.into_inner().key, "key")?;
        let (key, secret, config_version) = self.catalog.create_client_key(&actor, key).await?;
        tracing::info!(key = %key.id, name = %key.name, prefix = %key.prefix, config_version, "client key created");
        ok(CreateClientKeyResponse {
            key: Some(key),
            secret,
            config_version,
        })
    }

    async fn get_client_key(
        &self,
        request: Request<GetClientKeyRequest>,
    ) -> RpcResult<GetClientKeyResponse> {
        let key = self.catalog.get_client_key(&request.into_inner().key)?;
        ok(GetClientKeyResponse { key: Some(key) })
    }

    async fn list_client_keys(
        &self,
        request: Request<ListClientKeysRequest>,
    ) -> RpcResult<ListClientKeysResponse> {
        let req = request.into_inner();
        let (keys, next_page_token) = super::page::page(
            req.page_size,
            &req.page_token,
            |after, limit| self.catalog.client_keys_after(after, limit),
            |k| k.name.as_str(),
        )?;
        ok(ListClientKeysResponse {
            keys,
            next_page_token,
        })
    }

    async fn delete_client_key(
        &self,
        request: Request<DeleteClientKeyRequest>,
    ) -> RpcResult<DeleteClientKeyResponse> {
        let actor = super::actor(&request);
        let ident = request.into_inner().key;
        let config_version = self.catalog.delete_client_key(&actor, &ident).await?;
        tracing::info!(key = %ident, config_version, "client key deleted");
        ok(DeleteClientKeyResponse { config_version })
    }

    async fn update_client_key(
        &self,
        request: Request<UpdateClientKeyRequest>,
    ) -> RpcResult<UpdateClientKeyResponse> {
        let actor = super::actor(&request);
        let (key, config_version) = self
            .catalog
            .update_client_key(&actor, request.into_inner())
            .await?;
        tracing::info!(key = %key.id, name = %key.name, config_version, "client key updated");
        ok(UpdateClientKeyResponse {
            key: Some(key),
            config_version,
        })
    }
}
