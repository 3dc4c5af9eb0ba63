//! `claw.v1.BackupService`: streamed point-in-time backups.
//!
//! The store is exported into a temporary local file first (transactions
//! wait only for that), the backup is audited, and then the file is
//! streamed in [`CHUNK`]-byte pieces at the client's pace; the temporary
//! file goes away when the stream ends or the client leaves.

use std::io::Read as _;
use std::pin::Pin;
use std::sync::Arc;

use claw_proto::v1::backup_service_server::BackupService;
use claw_proto::v1::*;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::catalog::Catalog;
use crate::store::Store;

/// Bytes per streamed message.
pub(crate) const CHUNK: usize = 64 * 1024;

/// Serves backups of the store.
#[derive(Clone)]
pub(crate) struct BackupApi {
    store: Arc<dyn Store>,
    catalog: Arc<Catalog>,
    staging: std::path::PathBuf,
    events: crate::events::Events,
}

impl std::fmt::Debug for BackupApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupApi").finish_non_exhaustive()
    }
}

impl BackupApi {
    /// A service over `store` that stages each backup in a hidden
    /// temporary file in `staging` (the data directory: the volume sized for
    /// the store, where a container's small `/tmp` may not be), and
    /// announces its audit record on `events`.
    pub(crate) fn new(
        store: Arc<dyn Store>,
        catalog: Arc<Catalog>,
        staging: std::path::PathBuf,
        events: crate::events::Events,
    ) -> Self {
        BackupApi {
            store,
            catalog,
            staging,
            events,
        }
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
        request: Request<CreateBackupRequest>,
    ) -> Result<Response<BackupStream>, Status> {
        let actor = super::actor(&request);
        let store = self.store.clone();
        let staging = self.staging.clone();
        let written = tokio::task::spawn_blocking(move || {
            crate::backup::write_backup(store.as_ref(), &staging)
        })
        .await
        .map_err(|e| super::internal(&e))?
        .map_err(|e| {
            crate::metrics::backup_failed();
            super::internal(&format!("{e:#}"))
        })?;
        crate::backup::audit_backup(&self.store, &actor, "CreateBackup", &written)
            .await
            .map_err(|e| super::internal(&e))?;
        self.events.notify(crate::events::Topic::Audit);
        crate::metrics::backup_succeeded(written.summary.size);
        tracing::info!(
            token = %actor.token,
            entries = written.summary.entries,
            bytes = written.summary.size,
            config_version = self.catalog.config_version(),
            "backup created"
        );
        let mut file = written
            .file
            .reopen()
            .map_err(|e| super::internal(&format!("reopening the backup file: {e}")))?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<CreateBackupResponse, Status>>(4);
        tokio::task::spawn_blocking(move || {
            // Owns the temporary file until the last chunk was taken (or the
            // client went away); dropping it deletes it.
            let _temp = written.file;
            loop {
                let mut buf = vec![0u8; CHUNK];
                let n = match read_chunk(&mut file, &mut buf) {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(super::internal(&format!(
                            "reading the backup file: {e}"
                        ))));
                        return;
                    }
                };
                buf.truncate(n);
                if tx
                    .blocking_send(Ok(CreateBackupResponse { data: buf }))
                    .is_err()
                {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// Fills `buf` as far as the file allows.
fn read_chunk(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
