//! The `clawctl` binary as users meet it: help, usage errors, and the
//! one-line error when the control plane cannot be reached. None of these
//! needs a running control plane.

use std::io::Read;
use std::net::TcpListener;
use std::process::{Command, Output, Stdio};

fn clawctl(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_clawctl"));
    cmd.args(args);
    // Keep the developer's own settings out of the test.
    for var in ["CLAW_SERVER", "CLAW_ADMIN_TOKEN", "CLAW_CA_CERT"] {
        cmd.env_remove(var);
    }
    cmd.output().expect("clawctl runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A local address nothing listens on: bound, then released.
fn closed_address() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("local addr");
    drop(listener);
    format!("http://{addr}")
}

#[test]
fn help_lists_every_verb() {
    let out = clawctl(&["--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for verb in [
        "backend",
        "pool",
        "key",
        "agent",
        "master-key",
        "snapshot",
        "proxies",
        "export",
        "apply",
        "completion",
        "version",
    ] {
        assert!(help.contains(verb), "`{verb}` missing from:\n{help}");
    }
    assert!(help.contains("--server") && help.contains("--token") && help.contains("--output"));
}

#[test]
fn every_subcommand_has_help_with_its_flags() {
    for (args, expected) in [
        (
            &["backend", "add", "--help"][..],
            &[
                "--api-key-env",
                "--model",
                "--rpm",
                "--upstream-timeout",
                "--timeout",
                "in_per_mtok",
                "cache_write_1h",
                "--api <API>",
                "anthropic",
                "Examples:",
            ][..],
        ),
        (
            &["backend", "update", "--help"],
            &[
                "--tpm",
                "--enabled",
                "--model",
                "--upstream-timeout",
                "--api <API>",
            ],
        ),
        (
            &["pool", "set", "--help"],
            &["--cooldown-base", "--queue-timeout"],
        ),
        (&["key", "add", "--help"], &["--models", "--rpm"]),
        (
            &["agent", "add", "--help"],
            &["--interval", "--active-hours", "--tz", "--checklist-file"],
        ),
        (&["agent", "disable", "--help"], &["--note"]),
        (&["master-key", "rotate", "--help"], &["--new-key-file"]),
        (&["apply", "--help"], &["--dry-run", "--prune", "--file"]),
        (&["export", "--help"], &["--file"]),
    ] {
        let out = clawctl(args);
        assert!(out.status.success(), "{args:?}");
        let help = text(&out.stdout);
        for flag in expected {
            assert!(
                help.contains(flag),
                "{args:?}: {flag} missing from:\n{help}"
            );
        }
    }
}

#[test]
fn the_admin_token_value_never_appears_in_help() {
    let out = Command::new(env!("CARGO_BIN_EXE_clawctl"))
        .arg("--help")
        .env("CLAW_ADMIN_TOKEN", "admintoken-very-secret-0123")
        .output()
        .expect("clawctl runs");
    assert!(!text(&out.stdout).contains("very-secret"));
}

#[test]
fn an_unreachable_server_is_one_line_and_exit_1() {
    let server = closed_address();
    for args in [
        vec!["backend", "list"],
        vec!["snapshot", "-o", "json"],
        vec!["pool", "show"],
    ] {
        let mut full = vec!["--server", server.as_str()];
        full.extend(&args);
        let out = clawctl(&full);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = text(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(
            stderr.starts_with(&format!("error: cannot reach control plane at {server}: ")),
            "{stderr}"
        );
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn a_missing_key_variable_is_reported_before_connecting() {
    // The server is unreachable: the error must be about the variable,
    // proving nothing was attempted.
    let server = closed_address();
    let out = clawctl(&[
        "--server",
        &server,
        "backend",
        "add",
        "b1",
        "--url",
        "https://api.example.com/v1",
        "--api-key-env",
        "CLAWCTL_TEST_UNSET_VARIABLE",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "error: --api-key-env: environment variable CLAWCTL_TEST_UNSET_VARIABLE is not set\n"
    );
}

#[test]
fn malformed_documents_are_rejected_with_file_line_and_column() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("claw.yaml");
    std::fs::write(
        &file,
        "backends:\n  - name: b1\n    base_url: https://x.example/v1\n    rmp: 60\n",
    )
    .expect("write");
    let path = file.to_str().expect("utf-8 path");
    let out = clawctl(&["--server", &closed_address(), "apply", "-f", path]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!("error: {path}:4:5: ")),
        "{stderr}"
    );
    assert!(stderr.contains("unknown field `rmp`"), "{stderr}");
}

#[test]
fn invalid_documents_name_the_field_before_connecting() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("claw.yaml");
    std::fs::write(
        &file,
        "backends:\n  - {name: a, base_url: https://a.example/v1, api_key_env: K}\n  - {name: b, base_url: https://b.example/v1, api_key_env: K, rpm: 0}\n",
    )
    .expect("write");
    let out = clawctl(&[
        "--server",
        &closed_address(),
        "apply",
        "--dry-run",
        "-f",
        file.to_str().expect("utf-8 path"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "error: invalid argument: backends[1].rpm: must be > 0\n"
    );
}

#[test]
fn usage_errors_keep_clap_exit_code_2() {
    let out = clawctl(&["backend", "add", "b1"]);
    assert_eq!(out.status.code(), Some(2));
    let out = clawctl(&["no-such-verb"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn an_unknown_api_is_one_clear_line_and_a_non_zero_exit() {
    for verb in [
        &[
            "backend",
            "add",
            "b1",
            "--url",
            "https://x.example/v1",
            "--api-key-env",
            "K",
        ][..],
        &["backend", "update", "b1"][..],
    ] {
        let mut args = verb.to_vec();
        args.extend(["--api", "claude"]);
        let out = clawctl(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = text(&out.stderr);
        let first = err.lines().next().unwrap_or_default();
        assert!(
            first.contains("'claude'")
                && first.contains("--api")
                && err.contains("openai")
                && err.contains("anthropic"),
            "{err}"
        );
    }
}

#[test]
fn completion_prints_a_script_without_a_server() {
    for shell in ["bash", "zsh", "fish"] {
        let out = clawctl(&["--server", &closed_address(), "completion", shell]);
        assert!(out.status.success(), "{shell}: {}", text(&out.stderr));
        let script = text(&out.stdout);
        assert!(script.contains("clawctl"), "{shell}");
        assert!(script.contains("backend"), "{shell}");
        assert!(script.contains("upstream-timeout"), "{shell}");
        assert!(out.stderr.is_empty(), "{shell}");
    }
    let out = clawctl(&["completion", "no-such-shell"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn version_prints_the_client_version_without_a_server() {
    let server = closed_address();
    let out = clawctl(&["--server", &server, "version"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with(&format!("Client version: {}\n", env!("CARGO_PKG_VERSION"))),
        "{stdout}"
    );
    assert!(stdout.contains("Server version: unavailable ("), "{stdout}");
    let out = clawctl(&["--server", &server, "version", "-o", "json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["client_version"], env!("CARGO_PKG_VERSION"));
    assert!(v.get("server_version").is_none(), "{v}");
    assert!(v["server_error"].is_string(), "{v}");
}

#[test]
fn a_closed_stdout_ends_quietly() {
    // The bash script is far larger than a pipe's buffer, so writing it
    // into a pipe whose reader is gone fails with EPIPE whatever the timing.
    let mut child = Command::new(env!("CARGO_BIN_EXE_clawctl"))
        .args(["completion", "bash"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("clawctl runs");
    // Like `| head -c 10`: read a little, then close the pipe.
    let mut stdout = child.stdout.take().expect("stdout");
    let mut first = [0u8; 10];
    stdout.read_exact(&mut first).expect("some output");
    drop(stdout);
    let out = child.wait_with_output().expect("clawctl ends");
    assert!(out.status.success(), "{:?}", out.status);
    assert_eq!(text(&out.stderr), "");
}
