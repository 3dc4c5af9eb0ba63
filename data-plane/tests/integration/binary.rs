//! The `claw-data-plane` binary: flags, the stdout contract, errors.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_claw-data-plane");

#[test]
fn help_lists_the_flags() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--addr",
        "--control-plane",
        "--node-id",
        "--proxy-token",
        "--max-body-bytes",
        "--header-timeout",
        "--body-timeout",
        "--idle-timeout",
        "--drain-timeout",
        "--drain-delay",
        "--metrics-addr",
        "--log-format",
        "CLAW_PROXY_TOKEN",
        "CLAW_DP_ADDR",
    ] {
        assert!(text.contains(flag), "{flag} missing from --help:\n{text}");
    }
}

#[test]
fn missing_proxy_token_is_a_clear_error() {
    let out = Command::new(BIN)
        .env_remove("CLAW_PROXY_TOKEN")
        .args(["--addr", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--proxy-token"), "{err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn prints_the_listening_line_serves_health_and_stops_on_sigterm() {
    let mut child = Command::new(BIN)
        .args([
            "--addr",
            "127.0.0.1:0",
            "--control-plane",
            "http://127.0.0.1:1",
            // Stop accepting at once on SIGTERM (the default keeps serving 5 s).
            "--drain-delay",
            "0s",
        ])
        .env("CLAW_PROXY_TOKEN", "t0ken")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening http=")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = reqwest::Client::new();
        let health = c
            .get(format!("http://{addr}/healthz"))
            .send()
            .await
            .unwrap();
        assert_eq!(health.status(), 200);
        // No control plane reachable: not ready, and /v1 says so.
        let ready = c.get(format!("http://{addr}/readyz")).send().await.unwrap();
        assert_eq!(ready.status(), 503);
        let res = c
            .post(format!("http://{addr}/v1/chat/completions"))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 503);
    });
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "did not exit on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
