//! TLS on every control-plane listener and on the proxy → control plane
//! link, with real processes and certificates generated at test time
//! (rcgen: a CA and a server certificate for `localhost` / 127.0.0.1).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::data_plane_support::{
    CHAT, CHAT_NATIVE_PRIMARY, PRIMARY_KEY, SYNC_TIMEOUT, acked_versions, add_backend, chat_body,
    config_version,
};
use claw_tests::harness::{ControlPlane, CtlCommand, Proxy, TlsFiles, http, wait_until};
use claw_tests::mock::{MockConfig, MockUpstream};
use claw_tls::test_pki::TestPki;
use claw_tls::tokio_rustls::TlsConnector;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A fresh CA and server certificate, written into a temp dir.
struct Pki {
    dir: TempDir,
    files: TlsFiles,
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = TestPki::new();
    let paths = pki.write_server(dir.path());
    let files = TlsFiles {
        cert: paths.cert,
        key: paths.key,
        ca: pki.write_ca(dir.path()),
    };
    Pki { dir, files }
}

fn tls_control_plane(pki: &Pki) -> ControlPlane {
    ControlPlane::builder().tls(pki.files.clone()).start()
}

/// `GET path` over TLS (trusting `ca`, SNI `localhost`): status and body.
async fn https_get(addr: SocketAddr, ca: &Path, path: &str) -> (u16, String) {
    https_request(addr, ca, &format!("GET {path} HTTP/1.1\r\n"), "").await
}

/// One HTTP/1.1 request over TLS (trusting `ca`, SNI `localhost`): `head`
/// is the request line plus any headers (each ending in CRLF); `host`,
/// `content-length` and `connection: close` are added. Status and body.
async fn https_request(addr: SocketAddr, ca: &Path, head: &str, body: &str) -> (u16, String) {
    let mut config = claw_tls::client::client_config(ca).expect("client config");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = claw_tls::rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut tls = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    let request = format!(
        "{head}host: localhost\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(request.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    // A peer may end TLS without close_notify after `connection: close`.
    let _ = tls.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (status, body)
}

/// A mock upstream registered on `cp` as the `primary` backend serving
/// `CHAT`, and a new client key's secret.
fn chat_backend_and_key(cp: &ControlPlane) -> (MockUpstream, String) {
    let upstream = MockUpstream::start_blocking(
        MockConfig::default()
            .name("primary")
            .api_key(PRIMARY_KEY)
            .models([CHAT_NATIVE_PRIMARY]),
    );
    add_backend(
        cp,
        "primary",
        &upstream.url(),
        PRIMARY_KEY,
        &["--model", &format!("{CHAT}={CHAT_NATIVE_PRIMARY}")],
    );
    let key = cp
        .clawctl(&["key", "add", "tls-test", "-o", "json"])
        .assert_ok()
        .json()["secret"]
        .as_str()
        .expect("secret")
        .to_owned();
    (upstream, key)
}

/// The `claw-control-plane: error: …` line of a failed start.
fn error_line(output: &str) -> &str {
    output
        .lines()
        .find(|l| l.starts_with("claw-control-plane: error:"))
        .unwrap_or_else(|| panic!("no error line in:\n{output}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clawctl_reaches_a_tls_control_plane_only_through_its_ca() {
    let pki = pki();
    let cp = tls_control_plane(&pki);
    assert!(cp.grpc_url().starts_with("https://"));
    // The harness passes `--ca-cert ca.pem`.
    let list = cp.clawctl(&["backend", "list", "-o", "json"]).assert_ok();
    assert_eq!(list.json(), serde_json::json!([]));

    // Without the CA the public roots cannot vouch for a private certificate.
    let out = CtlCommand::new(&["backend", "list"])
        .server(&cp.grpc_url())
        .token(cp.admin_token())
        .run()
        .assert_err();
    let stderr = out.stderr.trim();
    assert_eq!(stderr.lines().count(), 1, "not one line: {out}");
    assert!(stderr.to_lowercase().contains("certificate"), "{out}");

    // Another CA is no better.
    let other = self::pki();
    CtlCommand::new(&["backend", "list"])
        .server(&cp.grpc_url())
        .token(cp.admin_token())
        .ca_cert(&other.files.ca)
        .run()
        .assert_err_contains("certificate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_text_clients_get_nothing_from_the_tls_ports() {
    let pki = pki();
    let cp = tls_control_plane(&pki);
    for addr in [cp.http_addr(), cp.grpc_addr()] {
        let reply = http::request(addr, "GET", "/healthz", None, Duration::from_secs(5));
        assert!(
            reply.as_ref().is_err(),
            "plain HTTP to the TLS port {addr} got an answer: {reply:?}"
        );
    }
    // clawctl over plain http:// to the TLS gRPC port fails too.
    CtlCommand::new(&["backend", "list"])
        .server(&format!("http://{}", cp.grpc_addr()))
        .token(cp.admin_token())
        .timeout(Duration::from_secs(30))
        .run()
        .assert_err();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_listener_answers_over_tls() {
    let pki = pki();
    let cp = tls_control_plane(&pki);
    assert!(cp.http_url().starts_with("https://"));
    let (status, body) = https_get(cp.http_addr(), &pki.files.ca, "/healthz").await;
    assert_eq!((status, body.trim()), (200, "ok"));
    let (status, body) = https_get(cp.http_addr(), &pki.files.ca, "/metrics").await;
    assert_eq!(status, 200);
    assert!(body.contains("claw_cp_config_version"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_gets_its_snapshot_over_tls_and_serves_a_completion() {
    let pki = pki();
    let cp = tls_control_plane(&pki);
    let (_upstream, key) = chat_backend_and_key(&cp);

    // The harness passes `--control-plane https://… --control-plane-ca ca.pem`.
    let proxy = Proxy::start(&cp);
    proxy.wait_ready();
    let version = config_version(&cp);
    assert!(
        wait_until(SYNC_TIMEOUT, || acked_versions(&cp).get(proxy.node_id())
            == Some(&version)),
        "`clawctl proxies` never showed {} at version {version}: {:?}",
        proxy.node_id(),
        acked_versions(&cp)
    );
    assert!(proxy.logs().contains("discovery stream open"));

    let response = reqwest::Client::new()
        .post(format!("{}/chat/completions", proxy.openai_url()))
        .bearer_auth(&key)
        .json(&chat_body(CHAT, false))
        .send()
        .await
        .expect("chat completion");
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.expect("json");
    assert!(
        body["choices"][0]["message"]["content"].is_string(),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_does_not_trust_the_certificate_stays_unready_and_says_why() {
    let pki = pki();
    let other = self::pki();
    let cp = tls_control_plane(&pki);
    let proxy = claw_tests::harness::ProxyBuilder::new(cp.grpc_url(), cp.proxy_token())
        .args(["--control-plane-ca".as_ref(), other.files.ca.as_os_str()])
        .start();
    assert!(
        wait_until(Duration::from_secs(15), || proxy
            .logs()
            .contains("cannot connect to the control plane")),
        "no connect error logged:\n{}",
        proxy.logs()
    );
    assert!(!proxy.is_ready());
    let logs = proxy.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("cannot connect to the control plane"))
        .expect("the line");
    assert!(line.to_lowercase().contains("certificate"), "{line}");
}

#[test]
fn a_missing_or_garbage_key_file_is_a_one_line_error_naming_it() {
    let pki = pki();
    let missing = pki.dir.path().join("missing.key");
    let err = ControlPlane::builder()
        .tls(TlsFiles {
            key: missing,
            ..pki.files.clone()
        })
        .try_start()
        .expect_err("started without its key");
    assert!(err.status.is_some_and(|s| !s.success()), "{err}");
    let line = error_line(&err.output);
    assert!(
        line.contains("TLS key file") && line.contains("missing.key"),
        "{line}"
    );

    let garbage = pki.dir.path().join("garbage.key");
    std::fs::write(&garbage, "this is not a key\n").expect("write");
    let err = ControlPlane::builder()
        .tls(TlsFiles {
            key: garbage,
            ..pki.files.clone()
        })
        .try_start()
        .expect_err("started with a garbage key");
    assert!(err.status.is_some_and(|s| !s.success()), "{err}");
    let line = error_line(&err.output);
    assert!(line.contains("garbage.key"), "{line}");

    let garbage_cert = pki.dir.path().join("garbage.pem");
    std::fs::write(&garbage_cert, "-----BEGIN CERTIFICATE-----\nnope\n").expect("write");
    let err = ControlPlane::builder()
        .tls(TlsFiles {
            cert: garbage_cert,
            ..pki.files.clone()
        })
        .try_start()
        .expect_err("started with a garbage certificate");
    assert!(error_line(&err.output).contains("garbage.pem"), "{err}");
}

#[test]
fn a_certificate_without_its_key_names_the_missing_flag() {
    let pki = pki();
    let err = ControlPlane::builder()
        .args(["--tls-cert".as_ref(), pki.files.cert.as_os_str()])
        .try_start()
        .expect_err("started with half a TLS configuration");
    assert!(err.status.is_some_and(|s| !s.success()), "{err}");
    let line = error_line(&err.output);
    assert!(line.contains("--tls-key"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_with_a_certificate_serves_https_only() {
    let pki = pki();
    let cp = ControlPlane::start();
    let (_upstream, key) = chat_backend_and_key(&cp);
    let proxy = Proxy::builder(&cp)
        .args([
            "--tls-cert".as_ref(),
            pki.files.cert.as_os_str(),
            "--tls-key".as_ref(),
            pki.files.key.as_os_str(),
        ])
        .start();

    let deadline = tokio::time::Instant::now() + SYNC_TIMEOUT;
    loop {
        let (status, _) = https_get(proxy.addr(), &pki.files.ca, "/readyz").await;
        if status == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never ready over TLS:\n{}",
            proxy.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let body = chat_body(CHAT, false).to_string();
    let (status, answer) = https_request(
        proxy.addr(),
        &pki.files.ca,
        &format!(
            "POST /v1/chat/completions HTTP/1.1\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\n"
        ),
        &body,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let answer: serde_json::Value = serde_json::from_str(&answer).expect("json answer");
    assert!(
        answer["choices"][0]["message"]["content"].is_string(),
        "{answer}"
    );

    // Plain HTTP to the TLS port gets no HTTP answer.
    let plain = reqwest::Client::new()
        .get(format!("{}/healthz", proxy.url()))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP was answered: {plain:?}");
}

#[test]
fn a_proxy_certificate_without_its_key_is_refused() {
    let pki = pki();
    let cp = ControlPlane::start();
    let err = Proxy::builder(&cp)
        .args(["--tls-cert".as_ref(), pki.files.cert.as_os_str()])
        .try_start()
        .expect_err("started with half a TLS configuration");
    assert!(err.status.is_some_and(|s| !s.success()), "{err}");
    assert!(err.output.contains("--tls-key"), "{err}");
    let garbage = pki.dir.path().join("garbage.key");
    std::fs::write(&garbage, "not a key").expect("write");
    let err = Proxy::builder(&cp)
        .args([
            "--tls-cert".as_ref(),
            pki.files.cert.as_os_str(),
            "--tls-key".as_ref(),
            garbage.as_os_str(),
        ])
        .try_start()
        .expect_err("started with a garbage key");
    assert!(err.status.is_some_and(|s| !s.success()), "{err}");
    assert!(err.output.contains("garbage.key"), "{err}");
}
