//! The SSRF guard of webhook and wake URLs: which addresses the control
//! plane may POST to on an agent's behalf, checked twice.
//!
//! - **At save time** ([`check_url`], from `agent add/update` and `apply`):
//!   a `webhook_url` or `wake_url` whose host is an IP literal the
//!   [`Policy`] refuses (in any form the URL parser normalises: `[::ffff:
//!   a9fe:a9fe]`, `http://2852039166/`, `http://0xa9.254.169.254/`), or the
//!   host name `localhost` / `*.localhost` without `--allow-loopback-webhooks`,
//!   is refused with `InvalidArgument` naming the field. Other host names
//!   are **not** resolved at save time: DNS answers change, so a check then
//!   would prove nothing about the connection made later.
//! - **At connect time** ([`GuardedConnector`], the connector of the
//!   webhook/wake HTTP client): every name is resolved, every address the
//!   policy refuses is dropped, and only the remaining ones are connected
//!   to (by address, so a second DNS answer cannot slip in between the check
//!   and the connect). When none remains the attempt fails with
//!   `address 169.254.169.254 refused: link-local/cloud metadata` and takes
//!   the normal failure path (webhook retries and dead letter, a failed
//!   wake). Refusals are counted in `claw_cp_webhook_refused_total{reason}`.
//!
//! The client never follows redirects (hyper's client has no redirect
//! support): a `3xx` answer is a failed attempt like any other non-2xx.
//!
//! **What is refused** ([`Policy::check`]): link-local (`169.254.0.0/16`,
//! `fe80::/10`, which hold the cloud metadata endpoint `169.254.169.254`),
//! the other cloud metadata addresses (`fd00:ec2::254` on AWS over IPv6,
//! `100.100.100.200` on Alibaba Cloud), unspecified (`0.0.0.0/8`, `::`),
//! multicast (`224.0.0.0/4`, `ff00::/8`), broadcast (`255.255.255.255`),
//! loopback (`127.0.0.0/8`, `::1`) unless `--allow-loopback-webhooks`, and
//! always the control plane's own listeners (gRPC and HTTP, the latter
//! also serving `/metrics`; a listener bound to `0.0.0.0`/`::` is matched
//! at any local address with its port, one bound to a loopback address at
//! any loopback address), and the host and port of `--public-url` (the
//! address agent runtimes reach the control plane at, e.g. a Kubernetes
//! Service name whose cluster IP is not an address of this host; the name
//! is compared as written, an IP literal as an address). IPv4 addresses embedded in IPv6 (mapped
//! `::ffff:a.b.c.d`, compatible `::a.b.c.d`, NAT64 `64:ff9b::/96`, 6to4
//! `2002::/16`) are judged as the IPv4 address they carry.
//!
//! **Private ranges stay allowed** (`10/8`, `172.16/12`, `192.168/16`,
//! `100.64/10`, `fc00::/7` other than the metadata address): agents'
//! runtimes and webhook receivers normally live in the same cluster or VPC
//! as the control plane, on exactly those addresses; refusing them would
//! break the common deployment. Keep the control plane's network reach to
//! what it needs with network policy instead.
//!
//! The process-wide policy is [`install`]ed by the binary once its
//! listeners are bound; an embedding that installs none (the crate's own
//! tests) gets [`Policy::default`]: loopback allowed, no listeners known.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use futures::future::BoxFuture;
use http::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use parking_lot::RwLock;
use tokio::net::TcpStream;

/// Refused webhook/wake connections, by reason.
pub const REFUSED_TOTAL: &str = "claw_cp_webhook_refused_total";

/// Why an address is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// `169.254.0.0/16`, `fe80::/10` (includes `169.254.169.254`).
    LinkLocal,
    /// `fd00:ec2::254`, `100.100.100.200`.
    CloudMetadata,
    /// `0.0.0.0/8`, `::`.
    Unspecified,
    /// `224.0.0.0/4`, `ff00::/8`.
    Multicast,
    /// `255.255.255.255`.
    Broadcast,
    /// `127.0.0.0/8`, `::1`, `localhost` without the flag.
    Loopback,
    /// One of the control plane's own listeners.
    OwnListener,
}

impl Reason {
    /// Every reason (the metric's label values).
    pub const ALL: [Reason; 7] = [
        Reason::LinkLocal,
        Reason::CloudMetadata,
        Reason::Unspecified,
        Reason::Multicast,
        Reason::Broadcast,
        Reason::Loopback,
        Reason::OwnListener,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Reason::LinkLocal => "link_local",
            Reason::CloudMetadata => "cloud_metadata",
            Reason::Unspecified => "unspecified",
            Reason::Multicast => "multicast",
            Reason::Broadcast => "broadcast",
            Reason::Loopback => "loopback",
            Reason::OwnListener => "own_listener",
        }
    }

    /// For people.
    pub fn describe(self) -> &'static str {
        match self {
            Reason::LinkLocal => "link-local/cloud metadata",
            Reason::CloudMetadata => "cloud metadata",
            Reason::Unspecified => "unspecified address",
            Reason::Multicast => "multicast",
            Reason::Broadcast => "broadcast",
            Reason::Loopback => "loopback (allowed only with --allow-loopback-webhooks)",
            Reason::OwnListener => "the control plane's own listener",
        }
    }
}

/// A refused address: `address 169.254.169.254 refused: link-local/cloud
/// metadata`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// What was refused: an address, `address:port` or a host name.
    pub target: String,
    /// Why.
    pub reason: Reason,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{REFUSED_START}{} refused: {}",
            self.target,
            self.reason.describe()
        )
    }
}

impl std::error::Error for Refused {}

const REFUSED_START: &str = "address ";

/// Whether an error text is a [`Refused`] (as the webhook client reports
/// it), so callers can word it `webhook address …` / `wake address …`.
pub fn is_refusal(text: &str) -> bool {
    text.starts_with(REFUSED_START) && text.contains(" refused: ")
}

/// The [`Refused`] somewhere in an error's source chain.
pub fn refusal_in<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a Refused> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<Refused>() {
            return Some(r);
        }
        cur = err.source();
    }
    None
}

/// The address policy (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// `--allow-loopback-webhooks`.
    pub allow_loopback: bool,
    /// The control plane's own listeners (as bound), and an IP-literal
    /// `--public-url`.
    pub listeners: Vec<SocketAddr>,
    /// Host names (lowercase, without a trailing dot) and ports that reach
    /// the control plane: the host of a `--public-url` given by name.
    pub own_names: Vec<(String, u16)>,
}

impl Default for Policy {
    /// What an embedding without [`install`] gets: loopback allowed, no
    /// listeners known.
    fn default() -> Self {
        Policy {
            allow_loopback: true,
            listeners: Vec::new(),
            own_names: Vec::new(),
        }
    }
}

static POLICY: RwLock<Option<Arc<Policy>>> = RwLock::new(None);

/// Makes `policy` the process-wide one (the binary, once its listeners are
/// bound).
pub fn install(policy: Policy) {
    tracing::info!(
        allow_loopback = policy.allow_loopback,
        listeners = ?policy.listeners,
        "webhook address policy"
    );
    *POLICY.write() = Some(Arc::new(policy));
}

/// The process-wide policy ([`Policy::default`] until one is installed).
pub fn current() -> Arc<Policy> {
    POLICY.read().clone().unwrap_or_default()
}

/// The IPv4 address an IPv6 one carries: mapped (`::ffff:a.b.c.d`),
/// compatible (`::a.b.c.d`, not `::` or `::1`), NAT64 (`64:ff9b::/96`) or
/// 6to4 (`2002:AABB:CCDD::/48`).
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    let s = ip.segments();
    let tail = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    if s[..6] == [0; 6] && !(s[6] == 0 && s[7] <= 1) {
        return Some(tail);
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(tail);
    }
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(
            (s[1] >> 8) as u8,
            s[1] as u8,
            (s[2] >> 8) as u8,
            s[2] as u8,
        ));
    }
    None
}

/// An address with any embedded IPv4 address taken out.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => embedded_v4(v6).map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The refusal class of an address, ignoring listeners and the loopback
/// flag (loopback is reported as such).
fn class(ip: IpAddr) -> Option<Reason> {
    match canonical(ip) {
        IpAddr::V4(a) => {
            let o = a.octets();
            if o[0] == 0 {
                Some(Reason::Unspecified)
            } else if a.is_loopback() {
                Some(Reason::Loopback)
            } else if a.is_link_local() {
                Some(Reason::LinkLocal)
            } else if a == Ipv4Addr::new(100, 100, 100, 200) {
                Some(Reason::CloudMetadata)
            } else if a.is_multicast() {
                Some(Reason::Multicast)
            } else if a.is_broadcast() {
                Some(Reason::Broadcast)
            } else {
                None
            }
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            if a.is_unspecified() {
                Some(Reason::Unspecified)
            } else if a.is_loopback() {
                Some(Reason::Loopback)
            } else if s[0] & 0xffc0 == 0xfe80 {
                Some(Reason::LinkLocal)
            } else if a == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) {
                Some(Reason::CloudMetadata)
            } else if a.is_multicast() {
                Some(Reason::Multicast)
            } else {
                None
            }
        }
    }
}

/// Whether `ip` is an address of this host (loopback, or one a socket can
/// be bound to).
fn is_local(ip: IpAddr) -> bool {
    ip.is_loopback() || std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

impl Policy {
    /// Whether the control plane may connect to `ip:port` for a webhook or
    /// wake request.
    pub fn check(&self, ip: IpAddr, port: u16) -> Result<(), Refused> {
        let ip = canonical(ip);
        let refused = |target: String, reason| Err(Refused { target, reason });
        if let Some(reason) = class(ip).filter(|r| *r != Reason::Loopback) {
            return refused(ip.to_string(), reason);
        }
        if self.is_own_listener(ip, port) {
            return refused(SocketAddr::new(ip, port).to_string(), Reason::OwnListener);
        }
        if ip.is_loopback() && !self.allow_loopback {
            return refused(ip.to_string(), Reason::Loopback);
        }
        Ok(())
    }

    fn is_own_listener(&self, ip: IpAddr, port: u16) -> bool {
        self.listeners.iter().any(|l| {
            let lip = canonical(l.ip());
            l.port() == port
                && (lip == ip
                    || (lip.is_unspecified() && is_local(ip))
                    || (lip.is_loopback() && ip.is_loopback()))
        })
    }

    /// Adds the host and port of the control plane's public URL
    /// (`--public-url`) to what is its own: an IP literal as a listener
    /// address, a name as a name. A URL that does not parse adds nothing.
    pub fn with_public_url(mut self, public_url: &str) -> Self {
        let Ok(url) = url::Url::parse(public_url) else {
            return self;
        };
        let Some(port) = url.port_or_known_default() else {
            return self;
        };
        match url.host() {
            Some(url::Host::Ipv4(a)) => self.listeners.push(SocketAddr::new(a.into(), port)),
            Some(url::Host::Ipv6(a)) => self.listeners.push(SocketAddr::new(a.into(), port)),
            Some(url::Host::Domain(d)) => self.own_names.push((normal_name(d), port)),
            None => {}
        }
        self
    }

    /// Whether a host *name* (not an IP literal) may be used at `port`:
    /// `localhost` and `*.localhost` are loopback, the public URL's host at
    /// its port is the control plane itself; nothing is resolved.
    pub fn check_name(&self, host: &str, port: u16) -> Result<(), Refused> {
        let h = normal_name(host);
        if self.own_names.iter().any(|(n, p)| *n == h && *p == port) {
            return Err(Refused {
                target: format!("{host}:{port}"),
                reason: Reason::OwnListener,
            });
        }
        if !self.allow_loopback && (h == "localhost" || h.ends_with(".localhost")) {
            return Err(Refused {
                target: host.to_string(),
                reason: Reason::Loopback,
            });
        }
        Ok(())
    }
}

fn normal_name(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// Save-time check of a `webhook_url` / `wake_url` already validated as an
/// http(s) URL: its host must not be an IP literal the policy refuses, nor
/// `localhost` without the loopback flag. Host names are not resolved.
pub fn check_url(
    policy: &Policy,
    field: &str,
    value: &str,
) -> Result<(), claw_proto::validate::FieldError> {
    let Ok(url) = url::Url::parse(value) else {
        // Not a URL: the format validation reports it.
        return Ok(());
    };
    let port = url.port_or_known_default().unwrap_or(80);
    let verdict = match url.host() {
        Some(url::Host::Ipv4(a)) => policy.check(IpAddr::V4(a), port),
        Some(url::Host::Ipv6(a)) => policy.check(IpAddr::V6(a), port),
        Some(url::Host::Domain(d)) => policy.check_name(d, port),
        None => Ok(()),
    };
    verdict.map_err(|r| claw_proto::validate::FieldError::new(field, r.to_string()))
}

/// Registers the refusal counter (HELP/TYPE, every reason at 0).
pub fn describe() {
    metrics::describe_counter!(
        REFUSED_TOTAL,
        "Webhook and wake connections refused by the address policy, by reason"
    );
    for r in Reason::ALL {
        metrics::counter!(REFUSED_TOTAL, "reason" => r.label()).increment(0);
    }
}

/// Resolves a host name to its addresses.
pub type Resolve = Arc<dyn Fn(String) -> BoxFuture<'static, io::Result<Vec<IpAddr>>> + Send + Sync>;

/// The system resolver (`getaddrinfo`).
pub fn system_resolver() -> Resolve {
    Arc::new(|host: String| {
        Box::pin(async move {
            let addrs = tokio::net::lookup_host((host.as_str(), 0)).await?;
            Ok(addrs.map(|a| a.ip()).collect())
        })
    })
}

/// A connector (for hyper_util's legacy client, under the TLS layer) that
/// resolves the host itself, drops every address the policy refuses, and
/// connects to the remaining ones in order by address.
#[derive(Clone)]
pub struct GuardedConnector {
    inner: HttpConnector,
    resolve: Resolve,
    /// `None`: the process-wide policy, read at each connect.
    policy: Option<Arc<Policy>>,
}

impl fmt::Debug for GuardedConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuardedConnector")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl GuardedConnector {
    /// Connects through `inner` (its timeouts and socket options apply)
    /// after resolving with `resolve`, under the process-wide policy.
    pub fn new(inner: HttpConnector, resolve: Resolve) -> Self {
        GuardedConnector {
            inner,
            resolve,
            policy: None,
        }
    }

    /// Uses `policy` instead of the process-wide one.
    pub fn with_policy(mut self, policy: Policy) -> Self {
        self.policy = Some(Arc::new(policy));
        self
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<Uri> for GuardedConnector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Self::Response, BoxError>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let inner = self.inner.clone();
        let resolve = self.resolve.clone();
        let policy = self.policy.clone().unwrap_or_else(current);
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "URL has no host"))?;
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri
                .port_u16()
                .unwrap_or(if uri.scheme_str() == Some("https") {
                    443
                } else {
                    80
                });
            let (allowed, refused) = match host.parse::<IpAddr>() {
                Ok(ip) => filter(&policy, &[ip], port),
                Err(_) => match policy.check_name(&host, port) {
                    Err(r) => (Vec::new(), vec![r]),
                    Ok(()) => filter(&policy, &resolve(host.clone()).await?, port),
                },
            };
            if let Some(r) = refused.first() {
                metrics::counter!(REFUSED_TOTAL, "reason" => r.reason.label()).increment(1);
                tracing::warn!(
                    host = %host,
                    port,
                    refused = %r,
                    remaining = allowed.len(),
                    "webhook address refused"
                );
            }
            if allowed.is_empty() {
                return Err(match refused.into_iter().next() {
                    Some(r) => Box::new(r) as BoxError,
                    None => Box::new(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("{host} resolved to no address"),
                    )),
                });
            }
            let mut last: Option<BoxError> = None;
            for addr in allowed {
                let target = Uri::builder()
                    .scheme("http")
                    .authority(addr.to_string())
                    .path_and_query("/")
                    .build()?;
                match tower::ServiceExt::oneshot(inner.clone(), target).await {
                    Ok(stream) => return Ok(stream),
                    Err(e) => last = Some(Box::new(e)),
                }
            }
            Err(last.unwrap_or_else(|| "no address to connect to".into()))
        })
    }
}

/// Splits resolved addresses into those to connect to and the refusals.
pub fn filter(policy: &Policy, ips: &[IpAddr], port: u16) -> (Vec<SocketAddr>, Vec<Refused>) {
    let mut allowed = Vec::new();
    let mut refused = Vec::new();
    for ip in ips {
        match policy.check(*ip, port) {
            Ok(()) => allowed.push(SocketAddr::new(*ip, port)),
            Err(r) => refused.push(r),
        }
    }
    (allowed, refused)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("an IP")
    }

    fn strict() -> Policy {
        Policy {
            allow_loopback: false,
            listeners: vec![
                "127.0.0.1:50051".parse().expect("addr"),
                "0.0.0.0:9091".parse().expect("addr"),
            ],
            own_names: Vec::new(),
        }
    }

    fn reason(p: &Policy, s: &str, port: u16) -> Option<Reason> {
        p.check(ip(s), port).err().map(|r| r.reason)
    }

    #[test]
    fn metadata_link_local_and_special_addresses_are_refused_in_every_form() {
        let p = Policy::default();
        for (a, want) in [
            ("169.254.169.254", Reason::LinkLocal),
            ("169.254.1.2", Reason::LinkLocal),
            ("::ffff:169.254.169.254", Reason::LinkLocal),
            ("::ffff:a9fe:a9fe", Reason::LinkLocal),
            ("::169.254.169.254", Reason::LinkLocal),
            ("64:ff9b::a9fe:a9fe", Reason::LinkLocal),
            ("2002:a9fe:a9fe::1", Reason::LinkLocal),
            ("fe80::1", Reason::LinkLocal),
            ("febf::1", Reason::LinkLocal),
            ("fd00:ec2::254", Reason::CloudMetadata),
            ("100.100.100.200", Reason::CloudMetadata),
            ("::ffff:100.100.100.200", Reason::CloudMetadata),
            ("0.0.0.0", Reason::Unspecified),
            ("0.1.2.3", Reason::Unspecified),
            ("::", Reason::Unspecified),
            ("::ffff:0.0.0.0", Reason::Unspecified),
            ("224.0.0.1", Reason::Multicast),
            ("239.255.255.250", Reason::Multicast),
            ("ff02::1", Reason::Multicast),
            ("255.255.255.255", Reason::Broadcast),
        ] {
            assert_eq!(reason(&p, a, 80), Some(want), "{a}");
        }
        let r = p.check(ip("169.254.169.254"), 80).expect_err("refused");
        assert_eq!(
            r.to_string(),
            "address 169.254.169.254 refused: link-local/cloud metadata"
        );
        assert!(is_refusal(&r.to_string()));
        assert!(!is_refusal("connection refused"));
    }

    #[test]
    fn private_and_public_addresses_are_allowed() {
        let p = strict();
        for a in [
            "10.0.0.5",
            "172.16.3.4",
            "192.168.1.1",
            "100.64.0.1",
            "8.8.8.8",
            "fd12::1",
            "2001:db8::1",
            "::ffff:10.1.2.3",
            "fe00::1",
        ] {
            assert_eq!(reason(&p, a, 80), None, "{a}");
        }
    }

    #[test]
    fn loopback_needs_the_flag_and_own_listeners_are_always_refused() {
        let strict = strict();
        assert_eq!(reason(&strict, "127.0.0.1", 8080), Some(Reason::Loopback));
        assert_eq!(reason(&strict, "127.3.4.5", 8080), Some(Reason::Loopback));
        assert_eq!(reason(&strict, "::1", 8080), Some(Reason::Loopback));
        assert_eq!(
            reason(&strict, "::ffff:127.0.0.1", 8080),
            Some(Reason::Loopback)
        );
        let open = Policy {
            allow_loopback: true,
            ..strict
        };
        assert_eq!(reason(&open, "127.0.0.1", 8080), None);
        assert_eq!(reason(&open, "::1", 8080), None);
        // The gRPC listener on 127.0.0.1: any loopback address at its port.
        for a in ["127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1"] {
            assert_eq!(reason(&open, a, 50051), Some(Reason::OwnListener), "{a}");
        }
        // The HTTP listener on 0.0.0.0: every local address at its port.
        assert_eq!(reason(&open, "127.0.0.1", 9091), Some(Reason::OwnListener));
        // A remote address at the same port is someone else.
        assert_eq!(reason(&open, "10.255.255.1", 9091), None);
        let r = open.check(ip("127.0.0.1"), 50051).expect_err("refused");
        assert_eq!(
            r.to_string(),
            "address 127.0.0.1:50051 refused: the control plane's own listener"
        );
    }

    #[test]
    fn save_time_checks_ip_literals_in_normalised_forms_and_localhost_names() {
        let p = strict();
        let field = |url: &str| check_url(&p, "webhook_url", url).map_err(|e| e.to_string());
        for url in [
            "http://169.254.169.254/latest/meta-data",
            "http://[::ffff:a9fe:a9fe]/",
            "http://2852039166/",
            "http://0xa9.0xfe.0xa9.0xfe/",
            "http://0251.0376.0251.0376/",
            "http://169.254.43518/",
            "http://0.0.0.0:8080/",
            "http://localhost:8080/hook",
            "http://LOCALHOST./hook",
            "http://agent.localhost/hook",
            "http://127.0.0.1:50051/",
        ] {
            let e = field(url).expect_err(url);
            assert!(e.starts_with("webhook_url: address "), "{url}: {e}");
        }
        assert_eq!(
            field("http://2852039166/").expect_err("refused"),
            "webhook_url: address 169.254.169.254 refused: link-local/cloud metadata"
        );
        for url in [
            "https://hooks.example.com/claw",
            "http://10.0.0.7:8080/hook",
            "http://runtime.agents.svc.cluster.local/wake",
            "http://localhostx/",
        ] {
            assert_eq!(field(url), Ok(()), "{url}");
        }
        let open = Policy {
            allow_loopback: true,
            ..p
        };
        assert!(check_url(&open, "wake_url", "http://localhost:1/").is_ok());
        // The public URL's host, by name or address, at its port.
        let public = open
            .clone()
            .with_public_url("https://Claw-CP.claw.svc.cluster.local")
            .with_public_url("http://10.96.0.15:9091/");
        for url in [
            "https://claw-cp.claw.svc.cluster.local/v1/heartbeat",
            "https://claw-cp.claw.svc.cluster.local.:443/",
            "http://10.96.0.15:9091/metrics",
        ] {
            let e = check_url(&public, "webhook_url", url).expect_err(url);
            assert!(e.message.contains("own listener"), "{url}: {e}");
        }
        for url in [
            "http://claw-cp.claw.svc.cluster.local/",
            "http://10.96.0.15:8080/",
        ] {
            assert!(check_url(&public, "webhook_url", url).is_ok(), "{url}");
        }
        let e = check_url(&open, "wake_url", "http://127.0.0.1:50051/x").expect_err("own");
        assert_eq!(e.field, "wake_url");
    }

    /// The resolver filter, fed fixed answers: a name resolving only to the
    /// metadata address is never connected; one resolving to it and to an
    /// allowed address connects to the allowed one only.
    #[tokio::test]
    async fn the_connector_drops_refused_addresses_after_resolution() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let fixed = |answer: Vec<IpAddr>| -> Resolve {
            Arc::new(move |_host| {
                let answer = answer.clone();
                Box::pin(async move { Ok(answer) })
            })
        };
        let connect = |resolve: Resolve, policy: Policy, url: String| async move {
            let mut c = GuardedConnector::new(HttpConnector::new(), resolve).with_policy(policy);
            tower::Service::call(&mut c, url.parse().expect("uri")).await
        };
        let url = format!("http://metadata.example:{port}/");
        let err = connect(
            fixed(vec![ip("169.254.169.254"), ip("fd00:ec2::254")]),
            Policy::default(),
            url.clone(),
        )
        .await
        .expect_err("refused");
        let refused = refusal_in(err.as_ref()).expect("a refusal");
        assert_eq!(
            refused.to_string(),
            "address 169.254.169.254 refused: link-local/cloud metadata"
        );
        // Mixed answer: only the allowed address is used.
        let ok = connect(
            fixed(vec![ip("169.254.169.254"), ip("127.0.0.1")]),
            Policy::default(),
            url.clone(),
        )
        .await;
        assert!(ok.is_ok(), "{:?}", ok.err());
        // The listener's own port: refused, even as a literal.
        let own = Policy {
            allow_loopback: true,
            listeners: vec![SocketAddr::new(ip("127.0.0.1"), port)],
            own_names: Vec::new(),
        };
        let err = connect(
            fixed(vec![]),
            own.clone(),
            format!("http://127.0.0.1:{port}/"),
        )
        .await
        .expect_err("own listener");
        assert_eq!(
            refusal_in(err.as_ref()).map(|r| r.reason),
            Some(Reason::OwnListener)
        );
        let err = connect(fixed(vec![ip("::1"), ip("127.0.0.1")]), own, url)
            .await
            .expect_err("own listener by name");
        assert_eq!(
            refusal_in(err.as_ref()).map(|r| r.reason),
            Some(Reason::OwnListener)
        );
        // A numeric host glibc's resolver turns into 169.254.169.254 (where
        // the system resolver does not, there is nothing to connect to).
        if tokio::net::lookup_host(("2852039166", 0)).await.is_err() {
            return;
        }
        let err = connect(
            system_resolver(),
            Policy::default(),
            "http://2852039166/".into(),
        )
        .await
        .expect_err("refused");
        assert_eq!(
            refusal_in(err.as_ref()).map(|r| r.reason),
            Some(Reason::LinkLocal),
            "{err}"
        );
    }
}
