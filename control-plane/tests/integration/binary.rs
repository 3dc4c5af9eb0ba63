//! The `claw-control-plane` binary as supervisors and the cross-process tests
//! see it: refusal messages, `keygen`, the `listening` line on stdout, and a
//! clean exit on SIGTERM.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use claw_control_plane::crypto::MasterKey;

const BIN: &str = env!("CARGO_BIN_EXE_claw-control-plane");
const ADMIN: &str = "admin-token-0123456789";
const PROXY: &str = "proxy-token-0123456789";
const KEY1: &str = "1111111111111111111111111111111111111111111111111111111111111111";
const KEY2: &str = "2222222222222222222222222222222222222222222222222222222222222222";

/// A command with a clean environment: only what the test sets.
fn command(data_dir: &std::path::Path) -> Command {
    let mut c = Command::new(BIN);
    for var in [
        "CLAW_MASTER_KEY",
        "CLAW_MASTER_KEY_FILE",
        "CLAW_ADMIN_TOKEN",
        "CLAW_PROXY_TOKEN",
        "CLAW_CP_GRPC_ADDR",
        "CLAW_CP_HTTP_ADDR",
        "CLAW_DATA_DIR",
        "CLAW_LOG_FORMAT",
    ] {
        c.env_remove(var);
    }
    c.env("CLAW_DATA_DIR", data_dir)
        .env("CLAW_CP_GRPC_ADDR", "127.0.0.1:0")
        .env("CLAW_CP_HTTP_ADDR", "127.0.0.1:0")
        .env("CLAW_ADMIN_TOKEN", ADMIN)
        .env("CLAW_PROXY_TOKEN", PROXY);
    c
}

/// Kills the child if a test fails midway.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run_to_exit(mut c: Command) -> (bool, String, String) {
    let out = c.output().expect("binary runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Starts the server and waits for its `listening` line.
fn start(mut c: Command) -> (Running, String, String) {
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawns");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let running = Running(child);
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("listening line within 30 s");
    let line = line.trim_end().to_string();
    let rest = line
        .strip_prefix("listening grpc=")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    let (grpc, http) = rest.split_once(" http=").expect("both addresses");
    assert!(!grpc.ends_with(":0") && !http.ends_with(":0"), "{line}");
    (running, grpc.to_string(), http.to_string())
}

fn sigterm_and_wait(mut running: Running) -> std::process::ExitStatus {
    let pid = running.0.id().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    for _ in 0..300 {
        if let Some(status) = running.0.try_wait().expect("wait") {
            return status;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("server did not exit within 30 s of SIGTERM");
}

fn http_get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connects");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("writes");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("reads");
    out
}

#[test]
fn keygen_prints_64_hex_chars() {
    let (ok, stdout, _) = run_to_exit({
        let mut c = Command::new(BIN);
        c.arg("keygen");
        c
    });
    assert!(ok);
    let key = stdout.trim();
    assert_eq!(key.len(), 64, "{stdout:?}");
    assert!(key.bytes().all(|b| b.is_ascii_hexdigit()));
    let (ok, token, _) = run_to_exit({
        let mut c = Command::new(BIN);
        c.arg("token");
        c
    });
    assert!(ok && token.trim().len() >= 16);
}

#[test]
fn refuses_to_start_without_a_master_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ok, stdout, stderr) = run_to_exit(command(&dir.path().join("data")));
    assert!(!ok);
    assert!(!stdout.contains("listening"));
    assert!(stderr.contains("claw-control-plane keygen"), "{stderr}");
}

#[test]
fn refuses_weak_or_equal_tokens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = command(&dir.path().join("data"));
    c.env("CLAW_MASTER_KEY", KEY1)
        .env("CLAW_ADMIN_TOKEN", "short");
    let (ok, _, stderr) = run_to_exit(c);
    assert!(!ok);
    assert!(stderr.contains("CLAW_ADMIN_TOKEN"), "{stderr}");

    let mut c = command(&dir.path().join("data"));
    c.env("CLAW_MASTER_KEY", KEY1)
        .env("CLAW_PROXY_TOKEN", ADMIN);
    let (ok, _, stderr) = run_to_exit(c);
    assert!(!ok);
    assert!(stderr.contains("must differ"), "{stderr}");
}

#[test]
fn starts_on_port_zero_serves_http_and_exits_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let key_file = dir.path().join("master.key");
    std::fs::write(&key_file, format!("{KEY1}\n")).expect("key file");

    let mut c = command(&data);
    c.env("CLAW_MASTER_KEY_FILE", &key_file);
    let (running, _grpc, http) = start(c);
    let health = http_get(&http, "/healthz");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let metrics = http_get(&http, "/metrics");
    assert!(metrics.contains("claw_cp_config_version"), "{metrics}");
    assert!(http_get(&http, "/nope").starts_with("HTTP/1.1 404"));
    let status = sigterm_and_wait(running);
    assert!(status.success(), "{status:?}");

    // The data directory now belongs to KEY1: another key is refused with
    // a message naming both key ids.
    let mut c = command(&data);
    c.env("CLAW_MASTER_KEY", KEY2);
    let (ok, stdout, stderr) = run_to_exit(c);
    assert!(!ok);
    assert!(!stdout.contains("listening"));
    assert!(stderr.contains("master key mismatch"), "{stderr}");
    for key in [KEY1, KEY2] {
        let id = MasterKey::from_hex(key).expect("valid").id().to_string();
        assert!(stderr.contains(&id), "{id} not in {stderr}");
    }

    // And the right key still works. Regression: SIGTERM sent right after the
    // `listening` line once killed the process before handlers were installed.
    let mut c = command(&data);
    c.env("CLAW_MASTER_KEY", KEY1);
    let (running, _, _) = start(c);
    assert!(sigterm_and_wait(running).success());
}

/// The `clawctl` binary next to ours in the shared target directory, if the
/// workspace built it (it belongs to another package, so cargo gives no
/// `CARGO_BIN_EXE_` for it).
fn clawctl() -> Option<std::path::PathBuf> {
    let path = std::path::Path::new(BIN)
        .with_file_name(format!("clawctl{}", std::env::consts::EXE_SUFFIX));
    path.is_file().then_some(path)
}

#[test]
fn sigterm_with_a_connected_proxy_stream_exits_promptly_and_cleanly() {
    use claw_proto::v1::discovery_service_client::DiscoveryServiceClient;
    use claw_proto::v1::{StreamConfigRequest, StreamConfigResponse};

    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = command(&dir.path().join("data"));
    c.env("CLAW_MASTER_KEY", KEY1);
    let (running, grpc, http) = start(c);

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut inbound = rt.block_on(async {
        tx.send(StreamConfigRequest {
            node_id: "edge-1".into(),
            ..Default::default()
        })
        .await
        .expect("hello queued");
        let mut client = DiscoveryServiceClient::connect(format!("http://{grpc}"))
            .await
            .expect("connects");
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {PROXY}").parse().expect("ascii"),
        );
        let mut inbound = client
            .stream_config(request)
            .await
            .expect("stream opens")
            .into_inner();
        // Incremental messages (the health table, shares) may come first;
        // the snapshot is the one with a nonce.
        let first: StreamConfigResponse = loop {
            let m: StreamConfigResponse = inbound
                .message()
                .await
                .expect("healthy")
                .expect("a snapshot");
            if m.snapshot.is_some() {
                break m;
            }
        };
        tx.send(StreamConfigRequest {
            node_id: "edge-1".into(),
            version: first.version,
            response_nonce: first.nonce.clone(),
            ..Default::default()
        })
        .await
        .expect("ack queued");
        inbound
    });

    // The real `clawctl proxies -o json` lists the proxy with its ACK.
    if let Some(clawctl) = clawctl() {
        let mut listed = String::new();
        for _ in 0..50 {
            let out = Command::new(&clawctl)
                .args(["proxies", "-o", "json"])
                .env("CLAW_SERVER", format!("http://{grpc}"))
                .env("CLAW_ADMIN_TOKEN", ADMIN)
                .output()
                .expect("clawctl runs");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            listed = String::from_utf8_lossy(&out.stdout).into_owned();
            let proxies: serde_json::Value = serde_json::from_str(&listed).expect("json");
            let p = &proxies[0];
            if p["acked_version"].as_u64().is_some_and(|v| v > 0)
                || p["acked_version"].as_str().is_some_and(|v| v != "0")
            {
                assert_eq!(p["node_id"], "edge-1", "{listed}");
                assert_eq!(p["connected"], true, "{listed}");
                assert!(
                    p["peer_address"]
                        .as_str()
                        .is_some_and(|a| a.starts_with("127.0.0.1:")),
                    "{listed}"
                );
                listed.clear();
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            listed.is_empty(),
            "the ACK never showed in clawctl: {listed}"
        );
    } else {
        eprintln!("clawctl not built; skipping the `clawctl proxies` check");
    }

    let metrics = http_get(&http, "/metrics");
    for name in [
        "claw_cp_proxies_connected 1",
        "claw_cp_snapshots_sent_total 1",
        "claw_cp_snapshot_nacks_total 0",
        "claw_cp_proxy_acked_version_min",
        "claw_cp_snapshot_build_seconds_count",
    ] {
        assert!(metrics.contains(name), "{name} missing from {metrics}");
    }

    let started = std::time::Instant::now();
    let status = sigterm_and_wait(running);
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown waited {:?} for the open stream",
        started.elapsed()
    );
    // The proxy saw its stream end rather than hang.
    let end = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(5), inbound.message()).await });
    assert!(end.is_ok(), "the stream did not end");
    drop(tx);
}
