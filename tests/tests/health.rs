//! Active health probes (issue 15), through the real binaries: a control
//! plane probing every 200 ms (`CLAW_PROBE_*`), two proxies connected, one
//! mock per backend whose `GET /v1/models` the tests break and mend
//! (`MockUpstream::set_models_fault`). What the control plane concludes is
//! read with `clawctl backend get -o json` (`health`) and its `/metrics`,
//! what the proxies make of it with their `/metrics`;
//! probe requests are read from the mocks' records.

use crate::data_plane_support::{acked_versions, add_backend, config_version};
use claw_tests::harness::{ControlPlane, Proxy, wait_until};
use claw_tests::mock::{MockConfig, MockUpstream, ModelsFault};
use serde_json::Value;
use std::time::Duration;

/// Generous: probes run every 200 ms, but CI machines are slow and shared.
const DEADLINE: Duration = Duration::from_secs(30);

struct Setup {
    proxies: Vec<Proxy>,
    cp: ControlPlane,
    /// `bo` (OpenAI), `ba` (Anthropic), `bp` (OpenAI, serving `gpt` like
    /// `bo`, so the proxies' cap lets them exclude one of the two).
    mocks: Vec<MockUpstream>,
    client_key: String,
}

fn key_of(name: &str) -> String {
    format!("sk-up-{name}-0123456789abcdef")
}

fn start() -> Setup {
    let mocks: Vec<MockUpstream> = [("bo", "gpt-bo"), ("ba", "claude-ba"), ("bp", "gpt-bp")]
        .iter()
        .map(|(name, native)| {
            MockUpstream::start_blocking(
                MockConfig::default()
                    .name(*name)
                    .api_key(key_of(name))
                    .models([*native]),
            )
        })
        .collect();
    let cp = ControlPlane::builder()
        .env("CLAW_PROBE_INTERVAL", "200ms")
        .env("CLAW_PROBE_TIMEOUT", "1s")
        .env("CLAW_PROBE_FAILURES", "2")
        .start();
    add_backend(
        &cp,
        "bo",
        &mocks[0].url(),
        &key_of("bo"),
        &["--api", "openai", "--model", "gpt=gpt-bo"],
    );
    add_backend(
        &cp,
        "ba",
        &mocks[1].url(),
        &key_of("ba"),
        &["--api", "anthropic", "--model", "claude=claude-ba"],
    );
    add_backend(
        &cp,
        "bp",
        &mocks[2].url(),
        &key_of("bp"),
        &["--api", "openai", "--model", "gpt=gpt-bp"],
    );
    let client_key = cp
        .clawctl(&["key", "add", "tests", "-o", "json"])
        .assert_ok()
        .json()["secret"]
        .as_str()
        .expect("`key add -o json` prints the secret")
        .to_owned();
    let proxies: Vec<Proxy> = (0..2)
        .map(|i| {
            Proxy::builder(&cp)
                .node_id(format!("hp-{}-{i}", std::process::id()))
                .start()
        })
        .collect();
    for p in &proxies {
        p.wait_ready();
    }
    let want = config_version(&cp);
    let synced = wait_until(DEADLINE, || {
        let acked = acked_versions(&cp);
        proxies
            .iter()
            .all(|p| acked.get(p.node_id()) == Some(&want))
    });
    assert!(synced, "proxies never synced");
    Setup {
        proxies,
        cp,
        mocks,
        client_key,
    }
}

impl Setup {
    fn backend(&self, name: &str) -> Value {
        self.cp
            .clawctl(&["backend", "get", name, "-o", "json"])
            .assert_ok()
            .json()
    }

    fn health(&self, name: &str) -> Value {
        self.backend(name)["health"].clone()
    }

    fn state(&self, name: &str) -> String {
        self.health(name)["state"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    #[track_caller]
    fn wait_state(&self, name: &str, want: &str) -> Value {
        let mut last = Value::Null;
        let ok = wait_until(DEADLINE, || {
            last = self.health(name);
            last["state"] == want
        });
        assert!(
            ok,
            "`{name}` never became {want}; last health {last}\n{}",
            self.cp.logs()
        );
        last
    }

    /// Whether every proxy's `/metrics` says it excludes backend `id`.
    async fn excluded_everywhere(&self, id: &str, want: bool) -> bool {
        let line = format!(
            "claw_backend_health_excluded{{backend=\"{id}\"}} {}",
            u8::from(want)
        );
        for p in &self.proxies {
            let text = match reqwest::get(format!("{}/metrics", p.url())).await {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            if !text.lines().any(|l| l == line) {
                return false;
            }
        }
        true
    }

    async fn wait_excluded(&self, id: &str, want: bool) {
        let deadline = std::time::Instant::now() + DEADLINE;
        while !self.excluded_everywhere(id, want).await {
            assert!(
                std::time::Instant::now() < deadline,
                "the proxies never showed {id} excluded={want}\n{}",
                self.proxies.iter().map(|p| p.logs()).collect::<String>()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.cp.http_url()))
            .await
            .expect("control plane /metrics")
            .text()
            .await
            .expect("metrics body")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_probe_makes_a_backend_unhealthy_fleet_wide_and_a_good_one_heals_it() {
    let s = start();
    s.wait_state("bo", "healthy");
    let healthy = s.wait_state("ba", "healthy");
    assert!(
        healthy["last_probe_result"]
            .as_str()
            .is_some_and(|r| r.starts_with("ok: 200 in ")),
        "{healthy}"
    );
    let id = s.backend("bo")["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();

    // 503 on /v1/models: unhealthy after two probes, with the reason.
    s.mocks[0].set_models_fault(Some(ModelsFault::Status(503)));
    let h = s.wait_state("bo", "unhealthy");
    assert!(h["consecutive_failures"].as_u64() >= Some(2), "{h}");
    let result = h["last_probe_result"].as_str().unwrap_or_default();
    assert!(result.starts_with("status 503 in "), "{h}");
    let reason = h["reason"].as_str().unwrap_or_default();
    assert!(reason.starts_with("probe: status 503"), "{h}");
    assert!(h["since"].is_string() && h["last_probe"].is_string(), "{h}");
    assert_eq!(s.state("ba"), "healthy", "the other backend is untouched");
    let list =
        s.cp.clawctl(&["backend", "list", "-o", "json"])
            .assert_ok()
            .json();
    let listed = list
        .as_array()
        .and_then(|l| l.iter().find(|b| b["name"] == "bo"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(listed["health"]["state"], "unhealthy", "{list}");
    let metrics = s.metrics().await;
    assert!(
        metrics.contains(&format!("claw_cp_backend_health{{backend=\"{id}\"}} 0")),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "claw_cp_backend_probes_total{{backend=\"{id}\",result=\"failed\"}}"
        )),
        "{metrics}"
    );
    assert!(metrics.contains("# TYPE claw_cp_backend_probe_duration_seconds histogram"));
    let (ok, printed) = crate::metrics_format::promtool_check(&metrics);
    assert!(ok, "promtool check metrics: {printed}");
    // Both proxies heard it and keep `bo` out.
    assert!(metrics.contains("claw_cp_proxies_connected 2"), "{metrics}");
    s.wait_excluded(&id, true).await;
    let logs = s.cp.logs();
    let warned = logs
        .lines()
        .filter(|l| l.contains("backend unhealthy") && l.contains("bo"))
        .count();
    assert_eq!(warned, 1, "logged once, with the name:\n{logs}");
    assert!(logs.contains(&id), "and the id:\n{logs}");

    // A probe that hangs is a timeout.
    s.mocks[0].set_models_fault(Some(ModelsFault::Hang));
    let ok = wait_until(DEADLINE, || {
        s.health("bo")["last_probe_result"] == "timeout after 1s"
    });
    assert!(ok, "no timeout seen: {}", s.health("bo"));
    assert_eq!(s.state("bo"), "unhealthy");

    // Mended: the next good probe heals it.
    s.mocks[0].set_models_fault(None);
    let h = s.wait_state("bo", "healthy");
    assert_eq!(h["consecutive_failures"].as_u64().unwrap_or(0), 0, "{h}");
    s.wait_excluded(&id, false).await;
    assert!(s.cp.logs().contains("backend recovered"), "{}", s.cp.logs());
    let metrics = s.metrics().await;
    assert!(
        metrics.contains(&format!("claw_cp_backend_health{{backend=\"{id}\"}} 1")),
        "{metrics}"
    );
    drop(s.proxies);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_carry_the_backends_own_key_in_its_protocols_header() {
    let s = start();
    let probed = wait_until(DEADLINE, || {
        s.mocks
            .iter()
            .all(|m| m.requests().iter().any(|r| r.path == "/v1/models"))
    });
    assert!(probed, "both backends are probed");
    for r in s.mocks[0]
        .requests()
        .iter()
        .filter(|r| r.path == "/v1/models")
    {
        assert_eq!(r.method, "GET");
        assert_eq!(
            r.headers.get("authorization").map(String::as_str),
            Some(format!("Bearer {}", key_of("bo")).as_str()),
            "{:?}",
            r.headers
        );
        assert!(!r.headers.contains_key("x-api-key"), "{:?}", r.headers);
    }
    for r in s.mocks[1]
        .requests()
        .iter()
        .filter(|r| r.path == "/v1/models")
    {
        assert_eq!(
            r.headers.get("x-api-key").map(String::as_str),
            Some(key_of("ba").as_str()),
            "{:?}",
            r.headers
        );
        assert_eq!(
            r.headers.get("anthropic-version").map(String::as_str),
            Some("2023-06-01")
        );
        assert!(!r.headers.contains_key("authorization"), "{:?}", r.headers);
    }
    for m in &s.mocks {
        for r in m.requests() {
            assert!(
                !r.headers.values().any(|v| v.contains(&s.client_key)),
                "the client key never goes upstream on a probe: {:?}",
                r.headers
            );
        }
    }
    // And the keys are never in the control plane's log.
    let logs = s.cp.logs();
    assert!(!logs.contains(&key_of("bo")) && !logs.contains(&key_of("ba")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_401_marks_the_key_rejected_until_a_probe_succeeds() {
    let s = start();
    s.wait_state("ba", "healthy");
    s.mocks[1].set_models_fault(Some(ModelsFault::Status(401)));
    let mut last = Value::Null;
    let marked = wait_until(DEADLINE, || {
        last = s.backend("ba");
        last["status"] == "auth_failed"
    });
    assert!(marked, "never auth_failed: {last}\n{}", s.cp.logs());
    assert!(
        last["health"]["last_probe_result"]
            .as_str()
            .is_some_and(|r| r.starts_with("status 401")),
        "{last}"
    );
    assert!(
        s.cp.logs().contains("provider rejected the backend's key"),
        "{}",
        s.cp.logs()
    );
    // The mock takes the key again: the next probe clears the mark.
    s.mocks[1].set_models_fault(None);
    let cleared = wait_until(DEADLINE, || {
        last = s.backend("ba");
        last["status"] == "enabled" && last["health"]["state"] == "healthy"
    });
    assert!(cleared, "never cleared: {last}\n{}", s.cp.logs());
    assert!(
        s.cp.logs()
            .contains("probe succeeded: auth failure cleared"),
        "{}",
        s.cp.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_backend_is_not_probed() {
    let s = start();
    s.wait_state("bo", "healthy");
    s.cp.clawctl(&["backend", "disable", "bo"]).assert_ok();
    s.wait_state("bo", "not_probed");
    // No probe after the state changed: the count stands still.
    let count = || {
        s.mocks[0]
            .requests()
            .iter()
            .filter(|r| r.path == "/v1/models")
            .count()
    };
    let before = count();
    let ba_before = s.mocks[1].requests().len();
    // Wait for several of `ba`'s probes (interval 200 ms) instead of a sleep.
    let ok = wait_until(DEADLINE, || s.mocks[1].requests().len() >= ba_before + 3);
    assert!(ok, "`ba` is still probed");
    assert!(count() <= before + 1, "at most a probe that was in flight");
    s.cp.clawctl(&["backend", "enable", "bo"]).assert_ok();
    s.wait_state("bo", "healthy");

    // Its own `--no-probe`: not probed either, picked up without a restart;
    // `--probe` probes it again.
    s.cp.clawctl(&["backend", "update", "bo", "--no-probe"])
        .assert_ok();
    s.wait_state("bo", "not_probed");
    s.cp.clawctl(&["backend", "update", "bo", "--probe"])
        .assert_ok();
    s.wait_state("bo", "healthy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backends_own_probe_settings_override_the_defaults() {
    let s = start();
    s.wait_state("bo", "healthy");
    // Three failures instead of the control plane's two, an hour apart:
    // after the change the failing backend stays healthy (the next probe
    // is up to an hour away), while `ba` keeps its 200 ms.
    s.cp.clawctl(&[
        "backend",
        "update",
        "bo",
        "--probe-interval",
        "1h",
        "--probe-failures",
        "3",
    ])
    .assert_ok();
    let probes = |m: &MockUpstream| {
        m.requests()
            .iter()
            .filter(|r| r.path == "/v1/models")
            .count()
    };
    // Let a probe in flight at the change finish, then break it.
    let ba_before = probes(&s.mocks[1]);
    let ok = wait_until(DEADLINE, || probes(&s.mocks[1]) >= ba_before + 2);
    assert!(ok, "`ba` is still probed every 200 ms");
    let bo_before = probes(&s.mocks[0]);
    s.mocks[0].set_models_fault(Some(ModelsFault::Status(503)));
    let ba_before = probes(&s.mocks[1]);
    let ok = wait_until(DEADLINE, || probes(&s.mocks[1]) >= ba_before + 5);
    assert!(ok, "`ba` is still probed every 200 ms");
    assert!(
        probes(&s.mocks[0]) <= bo_before + 1,
        "`bo` waits for its hour"
    );
    assert_eq!(s.state("bo"), "healthy");
}

/// Chat requests the mock of `backend` (index into `Setup::mocks`) was sent,
/// probes not counted.
fn chats(mock: &MockUpstream) -> usize {
    mock.requests()
        .iter()
        .filter(|r| r.path.ends_with("/chat/completions"))
        .count()
}

/// `n` chat requests for `gpt` through proxy `proxy`, each with its own
/// session (`x-session-id`), so without health they spread over `bo` and
/// `bp`; every answer must be a 200.
async fn chat_sessions(s: &Setup, proxy: usize, tag: &str, n: usize) {
    let http = reqwest::Client::new();
    for i in 0..n {
        let res = http
            .post(format!("{}/v1/chat/completions", s.proxies[proxy].url()))
            .bearer_auth(&s.client_key)
            .header("x-session-id", format!("{tag}-{i}"))
            .json(&serde_json::json!({
                "model": "gpt", "max_tokens": 4,
                "messages": [{"role": "user", "content": "hello"}]
            }))
            .send()
            .await
            .expect("proxy answers");
        let status = res.status();
        let body = res.text().await.unwrap_or_default();
        assert_eq!(status, 200, "session {tag}-{i} via proxy {proxy}: {body}");
    }
}

/// Issue 15's acceptance, by routing: a backend whose probe endpoint fails
/// gets no request from any proxy once the verdict is pushed, and comes back
/// when it recovers; with every backend of the pool unhealthy requests still
/// go out (the cap keeps the later-marked one in).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unhealthy_backend_gets_no_traffic_on_any_proxy_and_a_pool_all_unhealthy_still_serves() {
    let s = start();
    s.wait_state("bo", "healthy");
    s.wait_state("bp", "healthy");
    let id = |name: &str| {
        s.backend(name)["id"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    let (bo, bp) = (id("bo"), id("bp"));
    // Healthy: 40 sessions spread over both.
    chat_sessions(&s, 0, "warm", 40).await;
    assert!(
        chats(&s.mocks[0]) > 0 && chats(&s.mocks[2]) > 0,
        "no spread"
    );

    // `bo`'s probe fails: out on both proxies, every session lands on `bp`.
    s.mocks[0].set_models_fault(Some(ModelsFault::Status(503)));
    s.wait_state("bo", "unhealthy");
    s.wait_excluded(&bo, true).await;
    let before = chats(&s.mocks[0]);
    for proxy in 0..2 {
        chat_sessions(&s, proxy, &format!("sick{proxy}"), 30).await;
    }
    assert_eq!(
        chats(&s.mocks[0]),
        before,
        "an unhealthy backend got traffic"
    );

    // `bp` fails too: the whole pool is unhealthy. At most half of it is
    // excluded (`bo`, marked first), so requests still go out — to `bp`.
    s.mocks[2].set_models_fault(Some(ModelsFault::Status(503)));
    s.wait_state("bp", "unhealthy");
    let (bo_before, bp_before) = (chats(&s.mocks[0]), chats(&s.mocks[2]));
    for proxy in 0..2 {
        chat_sessions(&s, proxy, &format!("all{proxy}"), 20).await;
    }
    assert_eq!(
        chats(&s.mocks[0]),
        bo_before,
        "the earliest marked stays out"
    );
    assert_eq!(chats(&s.mocks[2]), bp_before + 40, "the rest still serve");
    assert!(
        !s.excluded_everywhere(&bp, true).await,
        "the cap keeps bp in"
    );

    // Both recover: `bo` takes its sessions back on both proxies.
    s.mocks[0].set_models_fault(None);
    s.mocks[2].set_models_fault(None);
    s.wait_state("bo", "healthy");
    s.wait_state("bp", "healthy");
    s.wait_excluded(&bo, false).await;
    for proxy in 0..2 {
        let before = chats(&s.mocks[0]);
        chat_sessions(&s, proxy, &format!("back{proxy}"), 40).await;
        assert!(
            chats(&s.mocks[0]) > before,
            "proxy {proxy} never used bo again"
        );
    }
}

/// A probe that gets through with the backend's key ends an auth failure on
/// the proxies too (not only in `clawctl backend get`): traffic comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_probe_puts_a_rejected_backend_back_in_rotation_on_every_proxy() {
    let s = start();
    s.wait_state("bo", "healthy");
    // The provider starts rejecting `bo`'s key: probes answer 401.
    s.mocks[0].set_models_fault(Some(ModelsFault::Status(401)));
    let ok = wait_until(DEADLINE, || s.backend("bo")["status"] == "auth_failed");
    assert!(ok, "never auth_failed: {}", s.backend("bo"));
    let before = chats(&s.mocks[0]);
    for proxy in 0..2 {
        chat_sessions(&s, proxy, &format!("rejected{proxy}"), 20).await;
    }
    assert_eq!(chats(&s.mocks[0]), before, "a rejected backend got traffic");
    // The key works again (the provider fixed it): the next probe clears it.
    s.mocks[0].set_models_fault(None);
    let ok = wait_until(DEADLINE, || s.backend("bo")["status"] == "enabled");
    assert!(ok, "never cleared: {}", s.backend("bo"));
    for proxy in 0..2 {
        let mut used = false;
        for round in 0..10 {
            let before = chats(&s.mocks[0]);
            chat_sessions(&s, proxy, &format!("back{proxy}-{round}"), 20).await;
            if chats(&s.mocks[0]) > before {
                used = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(
            used,
            "proxy {proxy} kept `bo` out\n{}",
            s.proxies[proxy].logs()
        );
    }
}
