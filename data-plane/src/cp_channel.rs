//! The control-plane client plumbing shared by the discovery and report
//! streams: the gRPC channel, the proxy token on every call, and the
//! reconnect rule.
//!
//! **Channel.** //! `http://` is plain text. `https://` verifies the control plane's
//! certificate against the public (webpki) roots, or — with
//! `--control-plane-ca` — against that CA bundle only, so a private control
//! plane is trusted through its own CA and nothing else. The bundle is
//! re-read at every (re)connect, so a rotated CA is picked up without a
//! restart; a bundle that became unreadable fails that attempt (the proxy
//! keeps serving its last snapshot and retries with backoff).
//!
//! **Token.** [`connect_authorized`] wraps the channel in [`Bearer`], the one
//! interceptor that sends `authorization: Bearer <proxy token>` on every call.
//! The token itself is a [`ProxyToken`], whose `Debug` is redacted.
//!
//! **Reconnects.** Both streams reconnect with the same jittered exponential
//! [`Backoff`] (1 s, ×1.6, capped at 30 s, ±20 %), reset only after a
//! healthy stream: one that got an answer from the control plane and lived
//! [`HEALTHY_AFTER`] ([`Backoff::after_stream`]). A control plane that
//! accepts the stream and drops it at once therefore still backs off.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// A stream that got an answer and lived this long counts as healthy: the
/// next reconnect starts from the initial backoff again.
pub const HEALTHY_AFTER: Duration = Duration::from_secs(10);

/// The largest message a proxy decodes from the control plane (the
/// discovery stream's snapshots). tonic's default, 4 MiB, held only ~37k
/// client keys; a snapshot of 100k client keys and 25k backends is about
/// 17 MB before compression (BENCHMARKS.md "Big configurations"). 64 MiB
/// gives 3× headroom while still bounding what the proxy buffers. The
/// control plane sends snapshots gzip-compressed (the proxy accepts gzip),
/// so the wire carries far less; the limit applies to the decompressed size.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// A discovery client on `channel` sized for big snapshots: accepts gzip,
/// decodes up to [`MAX_MESSAGE_BYTES`].
pub fn discovery_client(
    channel: AuthorizedChannel,
) -> claw_proto::v1::discovery_service_client::DiscoveryServiceClient<AuthorizedChannel> {
    use tonic::codec::CompressionEncoding;
    claw_proto::v1::discovery_service_client::DiscoveryServiceClient::new(channel)
        .accept_compressed(CompressionEncoding::Gzip)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// Whether `status` is tonic's "message larger than the limit" error: the
/// control plane sent a snapshot this proxy refuses to decode. Reconnecting
/// at once would only fetch it again, so the caller logs it as an error
/// (tonic's message names the size and the limit) and backs off.
pub fn is_too_large(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::OutOfRange
        && status.message().contains("message length too large")
}

/// The proxy token the control plane authenticates proxies with. `Debug`
/// never shows it; [`ProxyToken::expose`] is the one way to read it.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyToken(String);

impl ProxyToken {
    /// Wraps a token.
    pub fn new(token: impl Into<String>) -> Self {
        ProxyToken(token.into())
    }

    /// The secret itself: for the `authorization` header and the snapshot
    /// cache's key derivation only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ProxyToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ProxyToken(<redacted>)")
    }
}

impl From<String> for ProxyToken {
    fn from(token: String) -> Self {
        ProxyToken(token)
    }
}

impl From<&str> for ProxyToken {
    fn from(token: &str) -> Self {
        ProxyToken(token.to_string())
    }
}

/// The interceptor that puts `authorization: Bearer <proxy token>` on every
/// call of a control-plane client.
#[derive(Clone)]
pub struct Bearer(MetadataValue<Ascii>);

impl fmt::Debug for Bearer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Bearer(<redacted>)")
    }
}

impl Bearer {
    /// The header value of `token`; an error when it is not a valid header
    /// value (never echoing it).
    pub fn new(token: &ProxyToken) -> anyhow::Result<Self> {
        format!("Bearer {}", token.expose())
            .parse()
            .map(Bearer)
            .map_err(|_| anyhow::anyhow!("proxy token is not a valid header value"))
    }
}

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

/// A channel to the control plane that authenticates every call.
pub type AuthorizedChannel = InterceptedService<Channel, Bearer>;

/// [`connect`], then every call on the channel carries the proxy token.
pub async fn connect_authorized(
    target: &ControlPlaneUrl,
    token: &ProxyToken,
) -> anyhow::Result<AuthorizedChannel> {
    let channel = connect(target).await?;
    Ok(InterceptedService::new(channel, Bearer::new(token)?))
}

/// Jittered exponential backoff between reconnects.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    factor: f64,
    max: Duration,
    current: Duration,
}

impl Default for Backoff {
    /// 1 s, ×1.6 per attempt, at most 30 s.
    fn default() -> Self {
        Backoff::new(Duration::from_secs(1), 1.6, Duration::from_secs(30))
    }
}

impl Backoff {
    /// Starts at `initial`, multiplies by `factor`, never above `max`.
    pub fn new(initial: Duration, factor: f64, max: Duration) -> Self {
        Backoff {
            initial,
            factor,
            max,
            current: initial,
        }
    }

    /// The next delay; `unit` in `[0, 1)` picks the jitter (±20 %).
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let base = self.current.min(self.max);
        self.current = base.mul_f64(self.factor).min(self.max);
        base.mul_f64(0.8 + 0.4 * unit.clamp(0.0, 1.0)).min(self.max)
    }

    /// After a healthy stream.
    pub fn reset(&mut self) {
        self.current = self.initial;
    }

    /// The delay before reconnecting after a stream that `answered` (the
    /// control plane sent something on it) and `lived` this long: the
    /// backoff restarts after a healthy stream ([`HEALTHY_AFTER`]).
    pub fn after_stream(&mut self, answered: bool, lived: Duration) -> Duration {
        if answered && lived >= HEALTHY_AFTER {
            self.reset();
        }
        self.next_delay(rand::random::<f64>())
    }
}

/// Where the control plane is, and which CA its certificate must chain to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlPlaneUrl {
    /// gRPC endpoint, e.g. `https://claw-control-plane:50051`.
    pub url: String,
    /// CA bundle (PEM) replacing the public roots for an `https://` URL.
    pub ca: Option<PathBuf>,
}

impl ControlPlaneUrl {
    /// `url`, verified against the public roots when it is `https://`.
    pub fn new(url: impl Into<String>) -> Self {
        ControlPlaneUrl {
            url: url.into(),
            ca: None,
        }
    }

    /// Whether the channel uses TLS.
    pub fn is_tls(&self) -> bool {
        self.url
            .get(..8)
            .is_some_and(|s| s.eq_ignore_ascii_case("https://"))
    }

    /// The start-up check: the URL parses, a CA is given only for
    /// `https://`, and it is a readable bundle of at least one certificate.
    /// The messages name the flag and the file.
    pub fn check(&self) -> anyhow::Result<()> {
        Endpoint::from_shared(self.url.clone())
            .map_err(|e| anyhow::anyhow!("invalid --control-plane URL {:?}: {e}", self.url))?;
        if let Some(ca) = &self.ca {
            anyhow::ensure!(
                self.is_tls(),
                "--control-plane-ca is set but --control-plane {} is not https://",
                self.url
            );
            claw_tls::pem::read_ca(ca).map_err(|e| anyhow::anyhow!("--control-plane-ca: {e}"))?;
        }
        Ok(())
    }
}

impl From<String> for ControlPlaneUrl {
    fn from(url: String) -> Self {
        ControlPlaneUrl::new(url)
    }
}

impl From<&str> for ControlPlaneUrl {
    fn from(url: &str) -> Self {
        ControlPlaneUrl::new(url)
    }
}

impl fmt::Display for ControlPlaneUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url)
    }
}

/// Connects to the control plane: 5 s connect timeout, `TCP_NODELAY`,
/// HTTP/2 keep-alive pings every 20 s (10 s timeout), TLS for `https://`.
/// The error is one line naming the URL and the root cause (e.g. an
/// untrusted certificate).
pub async fn connect(target: &ControlPlaneUrl) -> anyhow::Result<Channel> {
    let mut endpoint = Endpoint::from_shared(target.url.clone())
        .map_err(|e| anyhow::anyhow!("invalid control plane URL {:?}: {e}", target.url))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10));
    if let Some(tls) = tls_config(target)? {
        endpoint = endpoint.tls_config(tls).map_err(|e| {
            anyhow::anyhow!(
                "TLS setup for the control plane at {target}: {}",
                innermost(&e)
            )
        })?;
    }
    endpoint.connect().await.map_err(|e| {
        anyhow::anyhow!(
            "cannot connect to the control plane at {target}: {}",
            innermost(&e)
        )
    })
}

fn tls_config(target: &ControlPlaneUrl) -> anyhow::Result<Option<ClientTlsConfig>> {
    if !target.is_tls() {
        return Ok(None);
    }
    Ok(Some(match &target.ca {
        Some(ca) => {
            let pem = claw_tls::pem::read_ca(ca)
                .map_err(|e| anyhow::anyhow!("--control-plane-ca: {e}"))?;
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem))
        }
        None => ClientTlsConfig::new().with_webpki_roots(),
    }))
}

/// The deepest error of a chain: "invalid peer certificate: UnknownIssuer"
/// rather than tonic's "transport error".
fn innermost(err: &(dyn std::error::Error + 'static)) -> String {
    let mut current = err;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_resets() {
        let mut b = Backoff::default();
        let mid: Vec<u64> = (0..10)
            .map(|_| b.next_delay(0.5).as_millis() as u64)
            .collect();
        assert_eq!(&mid[..4], &[1000, 1600, 2560, 4096]);
        assert_eq!(*mid.last().unwrap(), 30_000);
        assert!(b.next_delay(0.0) >= Duration::from_secs(24));
        assert!(b.next_delay(0.99) <= Duration::from_secs(30));
        b.reset();
        assert_eq!(b.next_delay(0.5), Duration::from_secs(1));
    }

    #[test]
    fn only_a_healthy_stream_resets_the_backoff() {
        let mut b = Backoff::default();
        for _ in 0..10 {
            b.next_delay(0.5);
        }
        let long = HEALTHY_AFTER;
        assert!(
            b.after_stream(false, long) >= Duration::from_secs(24),
            "never answered"
        );
        assert!(
            b.after_stream(true, long / 2) >= Duration::from_secs(24),
            "died young"
        );
        assert!(
            b.after_stream(true, long) <= Duration::from_millis(1200),
            "healthy"
        );
    }

    #[test]
    fn the_token_never_shows_in_debug_and_rides_on_every_call() {
        let token = ProxyToken::new("sekret-123");
        assert!(!format!("{token:?}").contains("sekret"));
        let mut bearer = Bearer::new(&token).expect("valid token");
        assert!(!format!("{bearer:?}").contains("sekret"));
        let req = bearer.call(tonic::Request::new(())).expect("intercepted");
        assert_eq!(
            req.metadata().get("authorization").map(|v| v.to_str().ok()),
            Some(Some("Bearer sekret-123"))
        );
        assert!(Bearer::new(&ProxyToken::new("bad\ntoken")).is_err());
    }

    #[test]
    fn https_is_detected_case_insensitively() {
        assert!(ControlPlaneUrl::new("https://cp:50051").is_tls());
        assert!(ControlPlaneUrl::new("HTTPS://cp:50051").is_tls());
        assert!(!ControlPlaneUrl::new("http://cp:50051").is_tls());
        assert!(!ControlPlaneUrl::new("cp").is_tls());
    }

    #[test]
    fn the_start_up_check_names_the_flag_and_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = claw_tls::test_pki::TestPki::new();
        let ca = pki.write_ca(dir.path());
        let ok = ControlPlaneUrl {
            url: "https://127.0.0.1:50051".into(),
            ca: Some(ca.clone()),
        };
        ok.check().expect("valid");
        let plain = ControlPlaneUrl {
            url: "http://127.0.0.1:50051".into(),
            ca: Some(ca),
        };
        let msg = plain.check().expect_err("CA on http").to_string();
        assert!(
            msg.contains("--control-plane-ca") && msg.contains("https://"),
            "{msg}"
        );
        let missing = ControlPlaneUrl {
            url: "https://127.0.0.1:50051".into(),
            ca: Some(dir.path().join("nope.pem")),
        };
        let msg = missing.check().expect_err("missing").to_string();
        assert!(
            msg.contains("--control-plane-ca") && msg.contains("nope.pem"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn an_untrusted_certificate_is_a_one_line_error_about_the_certificate() {
        // A TLS server whose certificate comes from another CA than the one
        // the client trusts.
        let dir = tempfile::tempdir().expect("tempdir");
        let server_pki = claw_tls::test_pki::TestPki::new();
        let paths = server_pki.write_server(dir.path());
        let other_ca = claw_tls::test_pki::TestPki::new().write_ca(dir.path());
        let config = claw_tls::reloading_server_config(paths, &[claw_tls::ALPN_H2]).expect("tls");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let _incoming = claw_tls::server::incoming(listener, config);
        let target = ControlPlaneUrl {
            url: format!("https://{addr}"),
            ca: Some(other_ca),
        };
        let msg = connect(&target).await.expect_err("untrusted").to_string();
        assert!(!msg.contains('\n'), "{msg}");
        assert!(msg.contains(&addr.to_string()), "{msg}");
        assert!(msg.to_lowercase().contains("certificate"), "{msg}");
    }
}
