//! `claw.v1.PoolService`.

use claw_proto::Pool;
use claw_proto::v1::pool_service_server::PoolService;
use claw_proto::v1::*;
use tonic::{Request, Status};

use super::{RpcResult, SharedCatalog, ok};

/// Serves pool settings from the catalog.
#[derive(Debug, Clone)]
pub(crate) struct PoolApi {
    catalog: SharedCatalog,
}

impl PoolApi {
    /// A service over `catalog`.
    pub(crate) fn new(catalog: SharedCatalog) -> Self {
        PoolApi { catalog }
    }
}

fn pool(value: i32) -> Result<Pool, Status> {
    match Pool::try_from(value) {
        Ok(p @ (Pool::Primary | Pool::Fallback)) => Ok(p),
        _ => Err(Status::invalid_argument(
            "pool: must be primary or fallback",
        )),
    }
}

#[tonic::async_trait]
impl PoolService for PoolApi {
    async fn get_pool_settings(
        &self,
        request: Request<GetPoolSettingsRequest>,
    ) -> RpcResult<GetPoolSettingsResponse> {
        let pool = pool(request.into_inner().pool)?;
        ok(GetPoolSettingsResponse {
            settings: Some(self.catalog.get_pool(pool)?),
        })
    }

    async fn list_pool_settings(
        &self,
        _request: Request<ListPoolSettingsRequest>,
    ) -> RpcResult<ListPoolSettingsResponse> {
        ok(ListPoolSettingsResponse {
            settings: self.catalog.list_pools()?,
        })
    }

    async fn update_pool_settings(
        &self,
        request: Request<UpdatePoolSettingsRequest>,
    ) -> RpcResult<UpdatePoolSettingsResponse> {
        let actor = super::actor(&request);
        let (settings, config_version) = self
            .catalog
            .update_pool(&actor, request.into_inner())
            .await?;
        tracing::info!(pool = %Pool::try_from(settings.pool).unwrap_or_default().name(), config_version, "pool settings updated");
        ok(UpdatePoolSettingsResponse {
            settings: Some(settings),
            config_version,
        })
    }
}
