//! The operator dashboard in a real browser: headless Chromium driven by
//! selenium (`tests/python/dashboard_check.py`) against the real control
//! plane, a proxy and the mock upstreams. A viewer signs in and sees the
//! proxy, backends and agents; a 429 at the upstream turns the backend's
//! badge to `cooling` without a reload; the viewer has no write controls and
//! a write forged from the page gets 403; an admin disables a backend from
//! the page, which `clawctl backend get` (and `clawctl audit`) then show; the
//! console stays free of errors and the page does not scroll sideways at
//! 390 px. With `CLAW_SCREENSHOT_DIR` set the script saves screenshots
//! there (the set in docs/dashboard/ was made that way).
//!
//! Needs `chromium`, `chromium-driver` (apt) and selenium
//! (`pip install -r tests/python/requirements.txt`). Without them the test
//! is skipped with a message — except in CI (`CI=true`), where that fails.

use crate::data_plane_support::*;
use claw_tests::mock::Action;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Why the browser test cannot run here, if it cannot.
fn missing_tools() -> Option<String> {
    let chromium = std::env::var("CLAW_CHROMIUM").unwrap_or_else(|_| CHROMIUM.to_owned());
    let driver = std::env::var("CLAW_CHROMEDRIVER").unwrap_or_else(|_| CHROMEDRIVER.to_owned());
    let mut missing = Vec::new();
    for bin in [&chromium, &driver] {
        if !Path::new(bin).exists() {
            missing.push(format!("{bin} (apt-get install chromium chromium-driver)"));
        }
    }
    let selenium = Command::new("python3")
        .args(["-c", "import selenium"])
        .output();
    if !matches!(selenium, Ok(ref out) if out.status.success()) {
        missing.push("python selenium (pip install -r tests/python/requirements.txt)".to_owned());
    }
    (!missing.is_empty()).then(|| missing.join(", "))
}

/// `clawctl token add NAME --role ROLE -o json` → the secret, or `None` when
/// this build has no named tokens yet.
fn named_token(c: &Cluster, name: &str, role: &str) -> Option<String> {
    let out =
        c.cp.clawctl(&["token", "add", name, "--role", role, "-o", "json"]);
    if !out.success() {
        eprintln!("`clawctl token add` unavailable: {}", out.stderr.trim());
        return None;
    }
    out.json()["secret"].as_str().map(str::to_owned)
}

#[test]
fn the_dashboard_works_in_a_browser() {
    if let Some(missing) = missing_tools() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("the dashboard browser test needs {missing}");
        }
        eprintln!("SKIPPED the dashboard browser test: missing {missing}");
        return;
    }

    let c = Cluster::with(ClusterOptions {
        proxies: 1,
        ..ClusterOptions::default()
    });
    // A paused agent: listed with its schedule, never fires during the test.
    c.cp.clawctl_stdin(
        &[
            "agent",
            "add",
            "ops-bot",
            "--model",
            CHAT,
            "--interval",
            "30m",
            "--active-hours",
            "08:00-20:00",
            "--tz",
            "Europe/Berlin",
            "--checklist-file",
            "-",
        ],
        "- [ ] check the disk\n",
    )
    .assert_ok();
    c.cp.clawctl(&["agent", "disable", "ops-bot", "--note", "dashboard test"])
        .assert_ok();

    let viewer = named_token(&c, "dash-viewer", "viewer");
    let admin = named_token(&c, "dash-admin", "admin");
    let (admin_token, admin_name) = match &admin {
        Some(t) => (t.clone(), "dash-admin"),
        None => (c.cp.admin_token().to_owned(), "bootstrap"),
    };
    let audit = c.cp.clawctl(&["audit", "-o", "json"]).success();
    if viewer.is_none() {
        eprintln!("no viewer token: the viewer checks run as the bootstrap admin are skipped");
    }

    // Some traffic for the usage cards and charts (not asserted: the
    // screenshots look like a gateway in use).
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime");
    rt.block_on(async {
        for _ in 0..6 {
            let res = c.chat(c.proxy(), CHAT).await;
            assert_eq!(res.status(), 200, "warm-up chat");
        }
    });

    // The next request to the primary is answered 429: the script sends it.
    c.primary.push(Action::rate_limited(Some(30)));

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/dashboard_check.py");
    let out = Command::new("python3")
        .arg(&script)
        .env("CLAW_DASHBOARD_URL", c.cp.http_url())
        .env("CLAW_ADMIN_TOKEN", &admin_token)
        .env("CLAW_ADMIN_NAME", admin_name)
        .env("CLAW_VIEWER_TOKEN", viewer.as_deref().unwrap_or(""))
        .env("CLAW_PROXY_URL", c.proxy().url())
        .env("CLAW_CLIENT_KEY", &c.key)
        .env("CLAW_MODEL", CHAT)
        .env("CLAW_COOL_BACKEND", "primary")
        .env("CLAW_DISABLE_BACKEND", "fallback")
        .env("CLAW_PROXY_NODE", c.proxy().node_id())
        .env("CLAW_AGENT", "ops-bot")
        .env("CLAW_AUDIT", if audit { "1" } else { "0" })
        // Chromium and the script talk to loopback, whatever the environment.
        .env("NO_PROXY", "*")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .output()
        .expect("ran python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "{} failed ({}):\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}\n--- control plane log ---\n{}",
        script.display(),
        out.status,
        c.cp.logs()
    );
    let mut checks = vec![
        "ok bad token refused".to_owned(),
        "ok live".to_owned(),
        format!("ok overview lists proxy {}", c.proxy().node_id()),
        "ok agents list ops-bot".to_owned(),
        "ok primary turned cooling without a reload".to_owned(),
        "ok usage chart".to_owned(),
        "ok no horizontal page scroll at 390px overview".to_owned(),
        "ok admin disabled fallback".to_owned(),
        "ok no console errors (admin)".to_owned(),
        "done".to_owned(),
    ];
    if viewer.is_some() {
        checks.push("ok viewer sees no write controls".to_owned());
        checks.push("ok forged viewer write refused (403)".to_owned());
        checks.push("ok fallback still enabled".to_owned());
    }
    if audit {
        checks.push(format!("ok audit shows {admin_name}"));
    }
    for check in &checks {
        assert!(
            stdout.contains(check.as_str()),
            "missing `{check}` in:\n{stdout}"
        );
    }

    // The page's write reached the store.
    let backend =
        c.cp.clawctl(&["backend", "get", "fallback", "-o", "json"])
            .assert_ok()
            .json();
    assert_eq!(backend["enabled"], Value::Bool(false), "{backend}");
    if audit {
        let records = c.cp.clawctl(&["audit", "-o", "json"]).assert_ok().json();
        let by_page = records.as_array().into_iter().flatten().any(|r| {
            r["token_name"] == admin_name
                && r["resource_name"] == "fallback"
                && r["operation"]
                    .as_str()
                    .is_some_and(|o| o.contains("SetBackendEnabled"))
        });
        assert!(
            by_page,
            "no audit record of the page's disable by {admin_name}: {records}"
        );
    }
}
