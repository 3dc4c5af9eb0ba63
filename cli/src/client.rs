//! The connection to the control plane: the gRPC channel (plain or TLS), the
//! admin token sent with every call, and the translation of every failure into
//! the one line `clawctl` prints (`not found: backend "x" not found`).

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, anyhow};
use claw_proto::v1::{
    ListAgentsRequest, ListAgentsResponse, ListBackendsRequest, ListBackendsResponse,
    ListClientKeysRequest, ListClientKeysResponse,
};
use claw_proto::v1::{
    agent_service_client::AgentServiceClient, backend_service_client::BackendServiceClient,
    client_key_service_client::ClientKeyServiceClient,
    cluster_service_client::ClusterServiceClient, pool_service_client::PoolServiceClient,
};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Response, Status};

/// The admin token. Its `Debug` never shows the value.
#[derive(Clone)]
pub struct Token(String);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl FromStr for Token {
    type Err = String;

    fn from_str(s: &str) -> Result<Token, String> {
        Ok(Token(s.trim().to_string()))
    }
}

/// Where and how to connect; parsed once from the global flags.
#[derive(Debug, Clone)]
pub(crate) struct ConnectOptions {
    /// Control plane URL, e.g. `http://127.0.0.1:50051`.
    pub server: String,
    /// Admin token; calls without one are rejected by the server.
    pub token: Option<Token>,
    /// Connect timeout and deadline of every call.
    pub timeout: Duration,
    /// Extra CA certificate (PEM) to trust for `https://` servers.
    pub ca_cert: Option<PathBuf>,
}

/// Adds `authorization: Bearer TOKEN` to every request.
#[derive(Clone)]
pub(crate) struct Auth(Option<MetadataValue<Ascii>>);

impl Interceptor for Auth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

type Authed = InterceptedService<Channel, Auth>;

/// The largest message `clawctl` sends to or accepts from the control plane
/// on the services whose messages grow with the configuration (lists,
/// export, apply). The control plane's limit is the same: 64 MiB holds a
/// 100k-key `apply` answer with every one-time secret (≈ 10 MiB) and an
/// export of 100k keys and 25k backends with room to spare. Lists are paged
/// besides (see `list_all`).
const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// A client sized by [`MAX_MESSAGE_BYTES`] that accepts gzip answers (it
/// sends uncompressed: an older control plane may not accept gzip).
macro_rules! sized {
    ($client:expr) => {
        $client
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
    };
}

/// An established connection to the control plane.
pub(crate) struct Connection {
    channel: Channel,
    auth: Auth,
    server: String,
    timeout: Duration,
}

impl Connection {
    /// Connects eagerly, so an unreachable server is reported as such before
    /// any request is attempted.
    pub(crate) async fn connect(opts: &ConnectOptions) -> anyhow::Result<Connection> {
        let server = normalize_server(&opts.server);
        let auth = Auth(match &opts.token {
            Some(Token(t)) if !t.is_empty() => {
                let mut value: MetadataValue<Ascii> =
                    format!("Bearer {t}").parse().map_err(|_| {
                        anyhow!(
                            "the admin token contains characters that cannot be sent in a header"
                        )
                    })?;
                value.set_sensitive(true);
                Some(value)
            }
            _ => None,
        });
        let mut endpoint = Endpoint::from_shared(server.clone())
            .map_err(|e| anyhow!("invalid --server URL {server:?}: {e}"))?
            .connect_timeout(opts.timeout)
            .timeout(opts.timeout);
        if server.starts_with("https://") {
            // A given CA replaces the system roots: a private control plane's
            // certificate is then trusted only through that CA.
            let tls = match &opts.ca_cert {
                Some(path) => {
                    let pem = std::fs::read(path)
                        .with_context(|| format!("cannot read --ca-cert {}", path.display()))?;
                    ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem))
                }
                None => ClientTlsConfig::new().with_native_roots(),
            };
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| anyhow!("TLS setup for {server}: {}", innermost(&e)))?;
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| anyhow!("cannot reach control plane at {server}: {}", innermost(&e)))?;
        Ok(Connection {
            channel,
            auth,
            server,
            timeout: opts.timeout,
        })
    }

    /// The backend service.
    pub(crate) fn backends(&self) -> BackendServiceClient<Authed> {
        sized!(BackendServiceClient::with_interceptor(
            self.channel.clone(),
            self.auth.clone()
        ))
    }

    /// The pool settings service.
    pub(crate) fn pools(&self) -> PoolServiceClient<Authed> {
        PoolServiceClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }

    /// The client key service.
    pub(crate) fn keys(&self) -> ClientKeyServiceClient<Authed> {
        sized!(ClientKeyServiceClient::with_interceptor(
            self.channel.clone(),
            self.auth.clone()
        ))
    }

    /// The agent service.
    pub(crate) fn agents(&self) -> AgentServiceClient<Authed> {
        sized!(AgentServiceClient::with_interceptor(
            self.channel.clone(),
            self.auth.clone()
        ))
    }

    /// The heartbeat service (runs, logs, checklists).
    pub(crate) fn heartbeats(
        &self,
    ) -> claw_proto::v1::heartbeat_service_client::HeartbeatServiceClient<Authed> {
        claw_proto::v1::heartbeat_service_client::HeartbeatServiceClient::with_interceptor(
            self.channel.clone(),
            self.auth.clone(),
        )
    }

    /// The stats service (usage totals, hourly/daily usage, cooldowns).
    pub(crate) fn stats(&self) -> claw_proto::v1::stats_service_client::StatsServiceClient<Authed> {
        claw_proto::v1::stats_service_client::StatsServiceClient::with_interceptor(
            self.channel.clone(),
            self.auth.clone(),
        )
    }

    /// The admin token service (named tokens, whoami).
    pub(crate) fn tokens(
        &self,
    ) -> claw_proto::v1::token_service_client::TokenServiceClient<Authed> {
        claw_proto::v1::token_service_client::TokenServiceClient::with_interceptor(
            self.channel.clone(),
            self.auth.clone(),
        )
    }

    /// The audit service (the audit log).
    pub(crate) fn audit(&self) -> claw_proto::v1::audit_service_client::AuditServiceClient<Authed> {
        claw_proto::v1::audit_service_client::AuditServiceClient::with_interceptor(
            self.channel.clone(),
            self.auth.clone(),
        )
    }

    /// The cluster service (snapshot, proxies, master key, apply/export).
    pub(crate) fn cluster(&self) -> ClusterServiceClient<Authed> {
        sized!(ClusterServiceClient::with_interceptor(
            self.channel.clone(),
            self.auth.clone()
        ))
    }

    /// The backup service (streamed backups).
    pub(crate) fn backups(
        &self,
    ) -> claw_proto::v1::backup_service_client::BackupServiceClient<Authed> {
        claw_proto::v1::backup_service_client::BackupServiceClient::with_interceptor(
            self.channel.clone(),
            self.auth.clone(),
        )
    }

    /// Awaits a call and turns a failure into the one-line error users see.
    pub(crate) async fn call<T>(
        &self,
        call: impl Future<Output = Result<Response<T>, Status>>,
    ) -> anyhow::Result<T> {
        call.await
            .map(Response::into_inner)
            .map_err(|status| anyhow!(describe_status(&status, &self.server, self.timeout)))
    }
}

/// The page size `clawctl` asks for; it follows `next_page_token` until the
/// last page, so users see one list however long it is.
const PAGE_SIZE: u32 = 500;

/// Follows the pages of one list RPC: `fetch(token)` returns a page's items
/// and its next token. An older control plane answers everything at once
/// with no token; a token that does not advance is an error rather than a
/// loop.
async fn all_pages<T, F, Fut>(mut fetch: F) -> anyhow::Result<Vec<T>>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = anyhow::Result<(Vec<T>, String)>>,
{
    let (mut all, mut token) = (Vec::new(), String::new());
    loop {
        let (items, next) = fetch(token.clone()).await?;
        all.extend(items);
        if next.is_empty() {
            return Ok(all);
        }
        if next == token {
            return Err(anyhow!(
                "the control plane returned the same page token twice; the list is incomplete"
            ));
        }
        token = next;
    }
}

impl Connection {
    /// Every backend, page after page (`ListBackends`).
    pub(crate) async fn list_backends_all(&self) -> anyhow::Result<ListBackendsResponse> {
        let backends = all_pages(|page_token| async move {
            let r = self
                .call(self.backends().list_backends(ListBackendsRequest {
                    page_size: PAGE_SIZE,
                    page_token,
                }))
                .await?;
            Ok((r.backends, r.next_page_token))
        })
        .await?;
        Ok(ListBackendsResponse {
            backends,
            next_page_token: String::new(),
        })
    }

    /// Every client key, page after page (`ListClientKeys`).
    pub(crate) async fn list_client_keys_all(&self) -> anyhow::Result<ListClientKeysResponse> {
        let keys = all_pages(|page_token| async move {
            let r = self
                .call(self.keys().list_client_keys(ListClientKeysRequest {
                    page_size: PAGE_SIZE,
                    page_token,
                }))
                .await?;
            Ok((r.keys, r.next_page_token))
        })
        .await?;
        Ok(ListClientKeysResponse {
            keys,
            next_page_token: String::new(),
        })
    }

    /// Every agent, page after page (`ListAgents`).
    pub(crate) async fn list_agents_all(&self) -> anyhow::Result<ListAgentsResponse> {
        let agents = all_pages(|page_token| async move {
            let r = self
                .call(self.agents().list_agents(ListAgentsRequest {
                    page_size: PAGE_SIZE,
                    page_token,
                }))
                .await?;
            Ok((r.agents, r.next_page_token))
        })
        .await?;
        Ok(ListAgentsResponse {
            agents,
            next_page_token: String::new(),
        })
    }
}

/// Accepts `host:port` as shorthand for `http://host:port`.
fn normalize_server(server: &str) -> String {
    let server = server.trim().trim_end_matches('/');
    if server.contains("://") {
        server.to_string()
    } else {
        format!("http://{server}")
    }
}

/// The message of the deepest error in a chain: for a refused connection,
/// "Connection refused (os error 111)" rather than "transport error".
fn innermost(err: &(dyn std::error::Error + 'static)) -> String {
    let mut current = err;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}

/// The words of a gRPC status code, as shown in errors.
pub(crate) fn code_words(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown error",
        Code::InvalidArgument => "invalid argument",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::PermissionDenied => "permission denied",
        Code::ResourceExhausted => "resource exhausted",
        Code::FailedPrecondition => "failed precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out of range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal error",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// `<code words>: <server message>`, with transport failures phrased as such.
pub(crate) fn describe_status(status: &Status, server: &str, timeout: Duration) -> String {
    // tonic reports its own client-side deadline as `cancelled: Timeout expired`.
    let timed_out = status.code() == Code::Cancelled
        && status.message() == tonic::TimeoutExpired(()).to_string();
    if timed_out || status.code() == Code::DeadlineExceeded && status.message().is_empty() {
        return format!(
            "deadline exceeded: no answer from {server} within {} (see --timeout)",
            crate::duration::format(timeout)
        );
    }
    // Statuses made on this side of the wire carry the failure as a source;
    // its innermost message is the useful part ("connection reset").
    let mut message = status.message().trim().to_string();
    if let Some(source) = std::error::Error::source(status) {
        let cause = innermost(source);
        if !cause.is_empty() && !message.contains(&cause) {
            message = format!("{message}: {cause}");
        }
    }
    let message = message.trim_start_matches(": ");
    if status.code() == Code::Unavailable {
        let reason = if message.is_empty() {
            "unavailable"
        } else {
            message
        };
        return format!("cannot reach control plane at {server}: {reason}");
    }
    if message.is_empty() {
        code_words(status.code()).to_string()
    } else {
        format!("{}: {message}", code_words(status.code()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_read_as_code_words_and_message() {
        let t = Duration::from_secs(30);
        let s = "http://127.0.0.1:50051";
        assert_eq!(
            describe_status(&Status::invalid_argument("rpm: must be > 0"), s, t),
            "invalid argument: rpm: must be > 0"
        );
        assert_eq!(
            describe_status(
                &Status::unauthenticated("missing or invalid admin token"),
                s,
                t
            ),
            "unauthenticated: missing or invalid admin token"
        );
        assert_eq!(
            describe_status(&Status::not_found("backend \"x\" not found"), s, t),
            "not found: backend \"x\" not found"
        );
        assert_eq!(
            describe_status(&Status::unavailable("tcp connect error"), s, t),
            "cannot reach control plane at http://127.0.0.1:50051: tcp connect error"
        );
        assert_eq!(
            describe_status(&Status::internal(""), s, t),
            "internal error"
        );
    }

    #[test]
    fn server_shorthand_gets_a_scheme() {
        assert_eq!(
            normalize_server("127.0.0.1:50051"),
            "http://127.0.0.1:50051"
        );
        assert_eq!(normalize_server("https://cp:443/"), "https://cp:443");
    }

    #[test]
    fn token_debug_is_redacted() {
        let t: Token = "admintoken-0123456789".parse().expect("infallible");
        assert!(!format!("{t:?}").contains("admintoken"));
    }
}
