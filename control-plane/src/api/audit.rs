//! `claw.v1.AuditService`: the audit log.

use std::sync::Arc;

use claw_proto::v1::audit_service_server::AuditService;
use claw_proto::v1::*;
use tonic::{Request, Status};

use super::RpcResult;
use crate::store::Store;

/// Serves the audit log from the store.
#[derive(Clone)]
pub(crate) struct AuditApi {
    store: Arc<dyn Store>,
}

impl std::fmt::Debug for AuditApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditApi").finish_non_exhaustive()
    }
}

impl AuditApi {
    /// A service over `store`.
    pub(crate) fn new(store: Arc<dyn Store>) -> Self {
        AuditApi { store }
    }
}

#[tonic::async_trait]
impl AuditService for AuditApi {
    async fn list_audit_records(
        &self,
        _request: Request<ListAuditRecordsRequest>,
    ) -> RpcResult<ListAuditRecordsResponse> {
        let _ = &self.store;
        Err(Status::unimplemented(
            "ListAuditRecords is not implemented yet",
        ))
    }
}
