//! One proxy's `StreamConfig` stream, from hello to goodbye.
//!
//! The session reads the hello (which must name the node), registers the
//! proxy, then loops over four inputs: the control plane stopping, the
//! proxy's ACKs and NACKs, a new published snapshot, and messages other
//! modules [`Push`](crate::proxies::Push) to this proxy. Every response gets a fresh nonce and is
//! remembered until answered; an answer with an unknown or already-answered
//! nonce is ignored.
//!
//! The stream's first snapshot carries the complete health table
//! (`health_complete`); when no snapshot is due (the proxy holds the current
//! version, or none is published yet), a message of its own does; pushes
//! wait until it is out, so it is the stream's first message. It is read
//! when sent, after the registration, so changes pushed since are in it.
//!
//! A version is sent at most once per stream: a NACKed snapshot is not
//! resent, the next version is (the NACK reason stays visible in
//! `ListProxies` meanwhile).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use claw_proto::v1::{Snapshot, StreamConfigRequest, StreamConfigResponse};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::{Status, Streaming};

use super::Shared;
use crate::metrics;
use crate::proxies::{ConnectionId, bound_reason};
use crate::shutdown::Shutdown;

/// How long a new stream may take to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest accepted node id (a DNS name is at most 253 characters).
const MAX_NODE_ID: usize = 253;
/// Responses remembered while awaiting their ACK/NACK. Proxies answer in
/// order, so anything older than this is long answered or lost.
const MAX_OUTSTANDING: usize = 16;
/// How long a new stream waits for the publisher to catch up with the
/// catalog before it sends an older snapshot (a hello right after a write
/// would otherwise get the previous version and, a debounce later, the
/// current one). Longer than the publisher's maximum debounce.
const CATCH_UP: Duration = Duration::from_secs(1);
/// Depth of a stream's [`Push`](crate::proxies::Push) channel.
pub(super) const PUSH_CAPACITY: usize = 64;

/// Where responses go: tonic's response stream.
pub(super) type Outbound = mpsc::Sender<Result<StreamConfigResponse, Status>>;

/// Why a session ended (for the log).
#[derive(Debug)]
enum End {
    /// The control plane is shutting down.
    Shutdown,
    /// The proxy closed its side.
    ClosedByProxy,
    /// The transport failed or the proxy went away.
    Lost(String),
    /// A newer stream of the same node id replaced this one.
    Replaced,
}

/// A response awaiting its answer.
#[derive(Debug)]
struct Outstanding {
    nonce: String,
    /// The snapshot version it carried, if it was a snapshot.
    snapshot_version: Option<u64>,
}

/// Serves one stream until the proxy leaves, the control plane stops or a
/// newer stream of the same node replaces it.
pub(super) async fn run(
    shared: Arc<Shared>,
    peer: String,
    mut inbound: Streaming<StreamConfigRequest>,
    out: Outbound,
) {
    let mut stop = shared.stop.clone();
    let hello = tokio::select! {
        biased;
        () = stop.stopped() => return,
        () = out.closed() => return,
        hello = tokio::time::timeout(HELLO_TIMEOUT, inbound.message()) => hello,
    };
    let hello = match hello {
        Ok(Ok(Some(hello))) => hello,
        Ok(Ok(None)) => return,
        Ok(Err(status)) => {
            tracing::debug!(%peer, error = %status, "discovery stream failed before its hello");
            return;
        }
        Err(_) => {
            let _ = out
                .send(Err(Status::deadline_exceeded(
                    "no StreamConfigRequest naming the node within 30 s",
                )))
                .await;
            return;
        }
    };
    if let Err(status) = check_node_id(&hello.node_id) {
        tracing::warn!(%peer, error = %status.message(), "discovery stream refused");
        let _ = out.send(Err(status)).await;
        return;
    }
    let node_id = hello.node_id;
    let (push_tx, pushes) = mpsc::channel(PUSH_CAPACITY);
    let connected = shared.registry.connect(&node_id, &peer, push_tx);
    tracing::info!(
        %node_id,
        %peer,
        version = hello.version,
        replaced_older_stream = connected.replaced,
        "proxy connected"
    );
    let mut session = Session {
        shared: shared.clone(),
        node_id,
        conn: connected.id,
        out,
        // A proxy holding another lineage's snapshot (this store was
        // restored from a backup) holds nothing of ours, whatever its version.
        held: if hello.lineage.is_empty() || hello.lineage == shared.catalog.lineage() {
            hello.version
        } else {
            0
        },
        last_sent: None,
        outstanding: VecDeque::new(),
        catch_up_until: Some(Instant::now() + CATCH_UP),
        health_sent: false,
    };
    let end = session.serve(&mut inbound, pushes, stop).await;
    let Session { node_id, conn, .. } = session;
    shared.registry.disconnect(&node_id, conn);
    match end {
        End::Replaced => {
            tracing::warn!(%node_id, %peer, "proxy stream replaced by a newer stream of the same node id");
        }
        End::Lost(error) => tracing::info!(%node_id, %peer, %error, "proxy disconnected"),
        End::ClosedByProxy | End::Shutdown => {
            tracing::info!(%node_id, %peer, reason = ?end, "proxy disconnected");
        }
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The node id must name the proxy: non-empty, short, printable.
fn check_node_id(node_id: &str) -> Result<(), Status> {
    if node_id.trim().is_empty() {
        return Err(Status::invalid_argument("node_id: is required"));
    }
    if node_id.len() > MAX_NODE_ID {
        return Err(Status::invalid_argument(format!(
            "node_id: must be at most {MAX_NODE_ID} bytes"
        )));
    }
    if node_id.chars().any(char::is_control) {
        return Err(Status::invalid_argument(
            "node_id: must not contain control characters",
        ));
    }
    Ok(())
}

/// Whether a stream should send the published snapshot `offered`, given the
/// version the proxy holds, the version this stream last sent, and the
/// catalog's current version.
fn should_send(offered: u64, held: u64, last_sent: Option<u64>, current: u64) -> bool {
    if last_sent == Some(offered) || held == offered {
        // Never the same version twice on a stream (a NACKed one included),
        // nor one the proxy already serves.
        return false;
    }
    // A proxy ahead of the published snapshot but not of the catalog holds
    // a version whose snapshot is still being built: wait for it. A proxy
    // ahead of the catalog itself (a control plane whose data was reset)
    // gets ours, and its NACK makes the mismatch visible.
    !(held > offered && held <= current)
}

struct Session {
    shared: Arc<Shared>,
    node_id: String,
    conn: ConnectionId,
    out: Outbound,
    /// The version the proxy serves, as it last told us.
    held: u64,
    /// The snapshot version this stream last sent.
    last_sent: Option<u64>,
    outstanding: VecDeque<Outstanding>,
    /// Until the first snapshot is sent: how long to hold back a published
    /// snapshot older than the catalog.
    catch_up_until: Option<Instant>,
    /// Whether the complete health table went out.
    health_sent: bool,
}

/// What [`Session::offer_snapshot`] did.
#[derive(Debug, PartialEq, Eq)]
enum Offer {
    Sent,
    /// A snapshot is due but held back (a fresher one is being built).
    HeldBack,
    /// No snapshot is due.
    Nothing,
}

impl Session {
    async fn serve(
        &mut self,
        inbound: &mut Streaming<StreamConfigRequest>,
        mut pushes: mpsc::Receiver<StreamConfigResponse>,
        mut stop: Shutdown,
    ) -> End {
        let mut latest = self.shared.snapshots.clone();
        loop {
            match self.offer_snapshot(&mut latest, &mut stop).await {
                Err(end) => return end,
                Ok(Offer::Nothing) if !self.health_sent => {
                    if let Err(end) = self.send_health_table(&mut stop).await {
                        return end;
                    }
                }
                Ok(_) => {}
            }
            let catch_up = self.catch_up_until;
            tokio::select! {
                biased;
                () = stop.stopped() => return End::Shutdown,
                () = sleep_until_some(catch_up) => self.catch_up_until = None,
                message = inbound.message() => match message {
                    Ok(Some(request)) => self.answer(request),
                    Ok(None) => return End::ClosedByProxy,
                    Err(status) => return End::Lost(status.to_string()),
                },
                changed = latest.changed() => {
                    if changed.is_err() {
                        // The publisher is gone: the control plane stops.
                        return End::Shutdown;
                    }
                }
                // Pushes wait until the complete health table is out: it is
                // the first message of the stream.
                push = pushes.recv(), if self.health_sent => match push {
                    Some(response) => {
                        let sent = if response.snapshot.is_none() {
                            self.send_incremental(response, &mut stop).await
                        } else {
                            self.send(response, None, &mut stop).await
                        };
                        if let Err(end) = sent {
                            return end;
                        }
                    }
                    // The registry dropped our sender: a newer stream of
                    // this node id took over.
                    None => {
                        let _ = self.out.try_send(Err(Status::aborted(
                            "replaced by a newer stream of the same node_id",
                        )));
                        return End::Replaced;
                    }
                },
            }
        }
    }

    /// Sends the latest published snapshot if this proxy needs it.
    async fn offer_snapshot(
        &mut self,
        latest: &mut super::publish::Latest,
        stop: &mut Shutdown,
    ) -> Result<Offer, End> {
        let Some(snapshot) = latest.borrow_and_update().clone() else {
            return Ok(Offer::Nothing);
        };
        let version = snapshot.version;
        let current = self.shared.catalog.config_version();
        if !should_send(version, self.held, self.last_sent, current) {
            return Ok(Offer::Nothing);
        }
        if version < current && self.catch_up_until.is_some_and(|t| Instant::now() < t) {
            // A fresher snapshot is being built; the publish wakes us.
            return Ok(Offer::HeldBack);
        }
        self.catch_up_until = None;
        self.last_sent = Some(version);
        let mut response = StreamConfigResponse {
            version,
            nonce: String::new(),
            snapshot: Some(Snapshot::clone(&snapshot)),
            ..Default::default()
        };
        if !self.health_sent {
            response.health = self.health_table();
            response.health_complete = true;
            self.health_sent = true;
        }
        self.send(response, Some(version), stop).await?;
        metrics::snapshot_sent();
        Ok(Offer::Sent)
    }

    /// Stamps a nonce on `response`, remembers it, and sends it, giving up
    /// if the control plane stops or the proxy goes away meanwhile.
    async fn send(
        &mut self,
        mut response: StreamConfigResponse,
        snapshot_version: Option<u64>,
        stop: &mut Shutdown,
    ) -> Result<(), End> {
        response.nonce = self.shared.nonces.next();
        let nonce = response.nonce.clone();
        tokio::select! {
            biased;
            () = stop.stopped() => return Err(End::Shutdown),
            sent = self.out.send(Ok(response)) => {
                if sent.is_err() {
                    return Err(End::Lost("response stream closed".into()));
                }
            }
        }
        tracing::debug!(node_id = %self.node_id, %nonce, version = ?snapshot_version, "response sent");
        if self.outstanding.len() == MAX_OUTSTANDING {
            self.outstanding.pop_front();
        }
        self.outstanding.push_back(Outstanding {
            nonce,
            snapshot_version,
        });
        Ok(())
    }

    /// The complete health table: every excluded backend; those it does
    /// not name are healthy.
    fn health_table(&self) -> Vec<claw_proto::v1::HealthUpdate> {
        self.shared
            .health
            .complete(crate::catalog::records::now_ms())
    }

    /// Sends the complete health table in a message of its own (no
    /// snapshot is due to carry it).
    async fn send_health_table(&mut self, stop: &mut Shutdown) -> Result<(), End> {
        self.health_sent = true;
        let response = StreamConfigResponse {
            version: self.shared.catalog.config_version(),
            health: self.health_table(),
            health_complete: true,
            ..Default::default()
        };
        self.send_incremental(response, stop).await
    }

    /// Sends an incremental message (cooldowns, rate shares): no nonce and
    /// nothing remembered, since proxies do not answer those (remembering
    /// them would push snapshot nonces out of `outstanding`).
    async fn send_incremental(
        &mut self,
        mut response: StreamConfigResponse,
        stop: &mut Shutdown,
    ) -> Result<(), End> {
        response.nonce.clear();
        tokio::select! {
            biased;
            () = stop.stopped() => Err(End::Shutdown),
            sent = self.out.send(Ok(response)) => match sent {
                Ok(()) => Ok(()),
                Err(_) => Err(End::Lost("response stream closed".into())),
            },
        }
    }

    /// Handles an ACK or NACK (or a repeated hello).
    fn answer(&mut self, request: StreamConfigRequest) {
        let registry = &self.shared.registry;
        let Some(pos) = self
            .outstanding
            .iter()
            .position(|o| o.nonce == request.response_nonce)
        else {
            if !request.response_nonce.is_empty() {
                tracing::debug!(
                    node_id = %self.node_id,
                    nonce = %request.response_nonce,
                    "ignoring an answer to an unknown or already answered nonce"
                );
            }
            registry.seen(&self.node_id, self.conn);
            return;
        };
        // Proxies answer in order: everything sent before is answered too.
        let answered = self.outstanding.drain(..=pos).next_back();
        let version = answered.and_then(|o| o.snapshot_version);
        if request.error_detail.is_empty() {
            match version {
                Some(v) => {
                    self.held = v;
                    registry.acked(&self.node_id, self.conn, v, &request.excluded);
                    for e in request.excluded.iter().take(crate::proxies::MAX_EXCLUDED) {
                        tracing::warn!(node_id = %self.node_id, version = v, kind = %e.kind, id = %e.id, reason = %e.reason, "proxy left an invalid resource out of the snapshot");
                    }
                    tracing::debug!(node_id = %self.node_id, version = v, "snapshot acknowledged");
                }
                None => registry.seen(&self.node_id, self.conn),
            }
            return;
        }
        self.held = request.version;
        let reason = bound_reason(&request.error_detail);
        match version {
            Some(v) => {
                metrics::snapshot_nacked();
                registry.nacked(&self.node_id, self.conn, &reason);
                tracing::warn!(
                    node_id = %self.node_id,
                    version = v,
                    held_version = request.version,
                    reason = %reason,
                    "proxy rejected a configuration snapshot; it keeps its previous one"
                );
            }
            None => {
                registry.seen(&self.node_id, self.conn);
                tracing::warn!(node_id = %self.node_id, reason = %reason, "proxy rejected a message");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_checked() {
        assert_eq!(
            check_node_id("").expect_err("empty").message(),
            "node_id: is required"
        );
        assert!(check_node_id("  ").is_err());
        assert!(check_node_id(&"a".repeat(254)).is_err());
        assert!(check_node_id("a\nb").is_err());
        assert!(check_node_id("proxy-7.eu-west").is_ok());
    }

    #[test]
    fn a_version_is_sent_once_and_only_when_the_proxy_needs_it() {
        // Fresh proxy: send.
        assert!(should_send(5, 0, None, 5));
        // Proxy already serves it (reconnect with the current version).
        assert!(!should_send(5, 5, None, 5));
        // Sent already on this stream (e.g. NACKed): not again.
        assert!(!should_send(5, 3, Some(5), 5));
        // The next version after a NACK: send.
        assert!(should_send(6, 3, Some(5), 6));
        // Proxy ahead of the published snapshot, not of the catalog: wait.
        assert!(!should_send(5, 6, None, 6));
        // Proxy ahead of the catalog (reset control plane): send, let it NACK.
        assert!(should_send(5, 9, None, 5));
    }
}
