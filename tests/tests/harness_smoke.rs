//! The harness's process management, proven on the mock upstream binary
//! (the only one of our binaries this crate builds itself).

use claw_tests::harness::{MockUpstreamProcess, binary_path, http, wait_until};
use claw_tests::mock::{Action, Outcome};
use serde_json::{Value, json};
use std::time::Duration;

/// Whether `pid` is gone (or a zombie nobody reaped yet).
fn is_dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // `pid (comm) S …`: the state follows the closing parenthesis.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

fn chat(model: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"model": model, "messages": [{"role": "user", "content": "a b c"}]}))
        .expect("serializable")
}

#[test]
fn the_mock_binary_announces_its_port_answers_and_is_scriptable() {
    let mock = MockUpstreamProcess::start(&["--name", "bin-1", "--completion-tokens", "4"]);
    mock.push(&Action::rate_limited(Some(3)));
    let timeout = Duration::from_secs(5);
    let first = http::request(
        mock.addr(),
        "POST",
        "/v1/chat/completions",
        Some(&chat("m")),
        timeout,
    )
    .expect("answered");
    assert_eq!(first.status, 429);
    let second = http::request(
        mock.addr(),
        "POST",
        "/v1/chat/completions",
        Some(&chat("m")),
        timeout,
    )
    .expect("answered");
    assert_eq!(second.status, 200);
    let body: Value = serde_json::from_slice(&second.body).expect("json");
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7})
    );

    let records = mock.requests();
    assert_eq!(records.len(), 2);
    assert_eq!(records[0].outcome, Outcome::Status(429));
    assert_eq!(mock.totals().completion_tokens_sent, 4);
    mock.reset();
    assert_eq!(mock.totals().requests, 0);
    assert!(mock.url().ends_with("/v1"));
}

#[test]
fn sigterm_stops_the_mock_binary_cleanly_and_logs_are_kept() {
    let mut mock = MockUpstreamProcess::start(&["--name", "bin-2"]);
    let status = mock.stop().expect("it was running");
    assert!(status.success(), "{status}; log:\n{}", mock.logs());
    assert!(
        mock.logs().contains("mock upstream stopped"),
        "{}",
        mock.logs()
    );
    assert!(mock.stop().is_none(), "a second stop is a no-op");
}

#[test]
fn kill9_and_drop_leave_no_process_behind() {
    let mut killed = MockUpstreamProcess::start::<&str>(&[]);
    let addr = killed.addr();
    let status = killed.kill9().expect("it was running");
    assert!(!status.success());
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "port closed after kill9"
    );

    let dropped = MockUpstreamProcess::start::<&str>(&[]);
    let pid = dropped.pid().expect("running");
    drop(dropped);
    assert!(is_dead(pid), "pid {pid} still alive after drop");
}

#[test]
#[should_panic(expected = "did not start")]
fn a_binary_that_cannot_start_fails_the_test_with_its_output() {
    MockUpstreamProcess::start(&["--addr", "not-an-address"]);
}

#[test]
#[should_panic(expected = "cargo test --workspace")]
fn a_missing_binary_says_how_to_build_it() {
    binary_path("claw-no-such-binary");
}

#[test]
fn wait_until_polls_until_the_condition_holds_or_times_out() {
    let mut n = 0;
    assert!(wait_until(Duration::from_secs(5), || {
        n += 1;
        n == 3
    }));
    assert!(!wait_until(Duration::from_millis(50), || false));
}

const ABORT_CHILD_ENV: &str = "CLAW_TESTS_ABORT_CHILD";

/// In the re-executed copy of this test binary: start a mock, report its
/// pid, and die without unwinding, as ctrl-c or a SIGKILL would.
#[test]
fn aborting_helper() {
    if std::env::var_os(ABORT_CHILD_ENV).is_none() {
        return;
    }
    let mock = MockUpstreamProcess::start::<&str>(&[]);
    println!("mock-pid={}", mock.pid().expect("running"));
    std::process::abort();
}

#[test]
fn no_child_outlives_a_test_process_that_dies_without_unwinding() {
    let exe = std::env::current_exe().expect("current exe");
    let out = std::process::Command::new(exe)
        .args([
            "--exact",
            "harness_smoke::aborting_helper",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ABORT_CHILD_ENV, "1")
        .output()
        .expect("re-ran the test binary");
    assert!(!out.status.success(), "the helper aborts");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let pid: u32 = stdout
        .lines()
        .find_map(|l| l.split_once("mock-pid="))
        .and_then(|(_, p)| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no mock pid printed: {stdout}"));
    assert!(
        wait_until(Duration::from_secs(10), || is_dead(pid)),
        "mock pid {pid} outlived its aborted test process"
    );
}
