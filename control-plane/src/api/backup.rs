//! `claw.v1.BackupService`: streamed point-in-time backups.

use std::pin::Pin;
use std::sync::Arc;

use claw_proto::v1::backup_service_server::BackupService;
use claw_proto::v1::*;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::catalog::Catalog;
use crate::store::Store;

/// Serves backups of the store.
#[derive(Clone)]
pub(crate) struct BackupApi {
    store: Arc<dyn Store>,
    catalog: Arc<Catalog>,
}

impl std::fmt::Debug for BackupApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupApi").finish_non_exhaustive()
    }
}

impl BackupApi {
    /// A service over `store`.
    pub(crate) fn new(store: Arc<dyn Store>, catalog: Arc<Catalog>) -> Self {
        BackupApi { store, catalog }
    }
}

/// The chunk stream of one backup.
pub(crate) type BackupStream =
    Pin<Box<dyn Stream<Item = Result<CreateBackupResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl BackupService for BackupApi {
    type CreateBackupStream = BackupStream;

    async fn create_backup(
        &self,
        _request: Request<CreateBackupRequest>,
    ) -> Result<Response<BackupStream>, Status> {
        let _ = (&self.store, &self.catalog);
        Err(Status::unimplemented("CreateBackup is not implemented yet"))
    }
}
