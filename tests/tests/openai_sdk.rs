//! The official `openai` Python SDK against the real proxy: chat, streaming
//! chat, embeddings, the model list and its error types
//! (`tests/python/openai_sdk_check.py`); and the Responses API through two
//! proxies (`tests/python/openai_responses_check.py`): create plain and
//! streamed (event types), continue, retrieve and delete through the other
//! proxy, `models.retrieve`.
//!
//! Needs `pip install -r tests/python/requirements.txt` (CI does it); the
//! test fails, rather than skips, when the SDK is missing.

use crate::data_plane_support::*;
use std::path::Path;
use std::process::Command;

#[test]
fn the_official_openai_python_sdk_works_against_the_proxy() {
    let probe = Command::new("python3")
        .args(["-c", "import openai; print(openai.__version__)"])
        .output();
    let sdk = match probe {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        Ok(out) => panic!(
            "the openai Python SDK is not installed: run `pip install -r tests/python/requirements.txt`\n{}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!(
            "python3 not found ({e}): install Python 3, then `pip install -r tests/python/requirements.txt`"
        ),
    };

    let c = Cluster::with(ClusterOptions {
        proxies: 1,
        ..ClusterOptions::default()
    });
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/openai_sdk_check.py");
    let out = Command::new("python3")
        .arg(&script)
        .env("CLAW_BASE_URL", c.proxy().openai_url())
        .env("CLAW_API_KEY", &c.key)
        .env("CLAW_MODEL", CHAT)
        .env("CLAW_EMBED_MODEL", EMBED)
        // The SDK must talk to the loopback proxy, whatever the environment.
        .env("NO_PROXY", "*")
        .env_remove("OPENAI_BASE_URL")
        .env_remove("OPENAI_API_KEY")
        .output()
        .expect("ran python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("openai SDK {sdk}\n{stdout}");
    assert!(
        out.status.success(),
        "{} failed ({}):\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}\n--- proxy log ---\n{}",
        script.display(),
        out.status,
        c.proxy().logs()
    );
    for check in [
        "ok chat",
        "ok stream",
        "ok embeddings",
        "ok models",
        "ok unknown model",
        "ok bad key",
    ] {
        assert!(stdout.contains(check), "missing `{check}` in:\n{stdout}");
    }

    // The SDK's requests reached the upstream with the native model ids.
    let seen = c.primary.requests();
    assert!(
        seen.iter()
            .any(|r| r.path.ends_with("/chat/completions") && r.stream)
    );
    assert!(
        seen.iter()
            .any(|r| r.model.as_deref() == Some(EMBED_NATIVE))
    );
}

#[test]
fn the_official_openai_python_sdk_speaks_responses_through_two_proxies() {
    let f = Fleet::start(
        vec![
            BackendSpec::new("oa-1", "openai", "gpt", ""),
            BackendSpec::new("oa-2", "openai", "gpt", ""),
        ],
        2,
    );
    run_python_checks(
        "openai_responses_check.py",
        "openai",
        &[
            ("CLAW_BASE_URL", f.proxies[0].openai_url()),
            ("CLAW_BASE_URL_B", f.proxies[1].openai_url()),
            ("CLAW_API_KEY", f.key.clone()),
            ("CLAW_MODEL", "gpt".to_owned()),
        ],
        &[
            "ok responses ",
            "ok responses stream",
            "ok responses continue",
            "ok responses retrieve",
            "ok responses delete",
            "ok responses unknown previous",
            "ok models.retrieve gpt",
        ],
        || f.logs(),
    );
    let seen: Vec<_> = f.mocks.iter().flat_map(|m| m.requests()).collect();
    assert!(seen.iter().any(|r| r.path == "/v1/responses" && r.stream));
    assert!(seen.iter().any(|r| r.method == "DELETE"));
}
