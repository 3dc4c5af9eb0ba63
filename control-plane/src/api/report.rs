//! `claw.v1.ReportService`: the proxies' report stream, authenticated with
//! the proxy token.
//!
//! One task per stream reads batches in order; each is stored durably (see
//! [`crate::report`]) and then acknowledged with its `acked_seq`, resent
//! batches included. A batch that cannot be stored ends the stream with
//! `unavailable` (`resource_exhausted` naming the volume when the data
//! volume is below its reserve): it is not acknowledged, so the proxy keeps
//! it and resends it on its next stream.
//! An empty message with `seq` 0 is a hello and is not answered.

use std::sync::Arc;

use claw_proto::v1::report_service_server::ReportService;
use claw_proto::v1::{StreamReportsRequest, StreamReportsResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::report::{Ingest, metrics};
use crate::shutdown::Shutdown;

/// Acknowledgements buffered per stream before the reader waits.
const ACK_CAPACITY: usize = 64;
/// Longest accepted node id or stream epoch.
const MAX_ID: usize = 253;

/// Serves `StreamReports`.
#[derive(Debug, Clone)]
pub(crate) struct ReportApi {
    ingest: Arc<Ingest>,
    stop: Shutdown,
}

impl ReportApi {
    /// A service storing batches through `ingest`, ending its streams once
    /// `stop` turns true.
    pub(crate) fn new(ingest: Arc<Ingest>, stop: Shutdown) -> Self {
        ReportApi { ingest, stop }
    }
}

type Acks = mpsc::Sender<Result<StreamReportsResponse, Status>>;

#[tonic::async_trait]
impl ReportService for ReportApi {
    type StreamReportsStream = ReceiverStream<Result<StreamReportsResponse, Status>>;

    async fn stream_reports(
        &self,
        request: Request<Streaming<StreamReportsRequest>>,
    ) -> Result<Response<Self::StreamReportsStream>, Status> {
        let (tx, rx) = mpsc::channel(ACK_CAPACITY);
        tokio::spawn(serve(
            self.ingest.clone(),
            request.into_inner(),
            tx,
            self.stop.clone(),
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

fn is_empty(b: &StreamReportsRequest) -> bool {
    b.usage.is_empty()
        && b.usage_aggregates.is_empty()
        && b.failures.is_empty()
        && b.activity.is_empty()
        && b.successes.is_empty()
        && b.demand.is_empty()
}

fn check(b: &StreamReportsRequest) -> Result<(), Status> {
    let id_ok = |s: &str| !s.trim().is_empty() && s.len() <= MAX_ID && !s.contains('\0');
    if !id_ok(&b.node_id) {
        return Err(Status::invalid_argument(
            "node_id: is required (at most 253 bytes)",
        ));
    }
    if !id_ok(&b.stream_epoch) {
        return Err(Status::invalid_argument(
            "stream_epoch: is required (at most 253 bytes)",
        ));
    }
    if let Some(i) = b.usage_aggregates.iter().position(|a| a.totals.is_none()) {
        return Err(Status::invalid_argument(format!(
            "usage_aggregates[{i}].totals: is required"
        )));
    }
    Ok(())
}

async fn serve(
    ingest: Arc<Ingest>,
    mut inbound: Streaming<StreamReportsRequest>,
    acks: Acks,
    mut stop: Shutdown,
) {
    metrics::streams(1.0);
    let mut dropped = 0u64;
    let mut node = String::new();
    loop {
        let batch = tokio::select! {
            biased;
            () = stop.stopped() => break,
            m = inbound.message() => match m {
                Ok(Some(b)) => b,
                Ok(None) => break,
                Err(status) => {
                    tracing::debug!(%node, error = %status, "report stream lost");
                    break;
                }
            },
        };
        if batch.seq == 0 && is_empty(&batch) {
            // A bare hello; `leaving`: the proxy applies 0 everywhere now.
            if batch.leaving && check(&batch).is_ok() {
                ingest.leaving(&batch.node_id);
            }
            continue;
        }
        let refused = if batch.seq == 0 {
            Err(Status::invalid_argument("seq: batches are numbered from 1"))
        } else {
            check(&batch)
        };
        if let Err(status) = refused {
            tracing::warn!(node_id = %batch.node_id, error = %status.message(), "report batch refused");
            let _ = acks.send(Err(status)).await;
            break;
        }
        if node.is_empty() {
            node = batch.node_id.clone();
            tracing::info!(node_id = %node, epoch = %batch.stream_epoch, "report stream open");
        }
        metrics::dropped(batch.dropped_events as f64 - dropped as f64);
        dropped = batch.dropped_events;
        match ingest.store(&batch).await {
            Ok(stored) => {
                let ack = StreamReportsResponse {
                    acked_seq: batch.seq,
                };
                if acks.send(Ok(ack)).await.is_err() {
                    // Stored but not acknowledged: the proxy resends it and
                    // it is recognised as a duplicate.
                    ingest.after_ack(&batch, &stored);
                    break;
                }
                ingest.after_ack(&batch, &stored);
                if batch.leaving {
                    ingest.leaving(&batch.node_id);
                }
            }
            Err(e) => {
                // Not acknowledged: the proxy keeps the batch and resends it
                // on its next stream (after its reconnect backoff).
                let status = match super::no_space(&e) {
                    Some(status) => {
                        // The watcher logged the low space once; this is
                        // every resend of every proxy.
                        tracing::debug!(node_id = %batch.node_id, seq = batch.seq, error = %e, "report batch refused: the data volume is below the reserve");
                        status
                    }
                    None => {
                        tracing::error!(node_id = %batch.node_id, seq = batch.seq, error = %e, "cannot store a report batch");
                        Status::unavailable("cannot store the batch now; resend it")
                    }
                };
                let _ = acks.send(Err(status)).await;
                break;
            }
        }
    }
    metrics::dropped(-(dropped as f64));
    metrics::streams(-1.0);
}
