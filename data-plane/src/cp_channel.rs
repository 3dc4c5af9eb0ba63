//! The gRPC channel to the control plane, shared by the discovery and
//! report streams.
//!
//! `http://` is plain text. `https://` verifies the control plane's
//! certificate against the public (webpki) roots, or — with
//! `--control-plane-ca` — against that CA bundle only, so a private control
//! plane is trusted through its own CA and nothing else. The bundle is
//! re-read at every (re)connect, so a rotated CA is picked up without a
//! restart; a bundle that became unreadable fails that attempt (the proxy
//! keeps serving its last snapshot and retries with backoff).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

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
