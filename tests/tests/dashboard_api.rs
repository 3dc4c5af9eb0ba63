//! The dashboard's backend on the real control plane: the page and its
//! security headers, token login for `/api/v1/*` (admin and viewer tokens
//! yes, the proxy token no), viewer writes refused, an admin's disable
//! reaching `clawctl`, and the live event stream announcing a cooldown after
//! a 429 and a proxy connecting.

use crate::data_plane_support::*;
use claw_tests::harness::{ControlPlane, Proxy};
use claw_tests::mock::Action;
use serde_json::Value;
use std::time::Duration;

/// How long the event stream gets to deliver an expected event.
const EVENT_TIMEOUT: Duration = Duration::from_secs(20);

/// A client of the dashboard API of `cp`.
struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    fn new(cp: &ControlPlane) -> Api {
        Api {
            base: cp.http_url(),
            http: reqwest::Client::new(),
        }
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
    ) -> reqwest::Response {
        let mut r = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send().await.expect("the control plane answers HTTP")
    }

    /// `(status, JSON body)` of a request.
    async fn json(&self, method: reqwest::Method, path: &str, token: Option<&str>) -> (u16, Value) {
        let res = self.send(method, path, token).await;
        let status = res.status().as_u16();
        let text = res.text().await.unwrap_or_default();
        let body = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {text}"));
        (status, body)
    }

    async fn get(&self, path: &str, token: &str) -> (u16, Value) {
        self.json(reqwest::Method::GET, path, Some(token)).await
    }

    async fn post(&self, path: &str, token: &str) -> (u16, Value) {
        self.json(reqwest::Method::POST, path, Some(token)).await
    }
}

/// The open event stream: events as `(name, data)`.
struct Events {
    res: reqwest::Response,
    buf: String,
}

impl Events {
    async fn open(api: &Api, token: &str) -> Events {
        let res = api
            .send(reqwest::Method::GET, "/api/v1/events", Some(token))
            .await;
        assert_eq!(res.status().as_u16(), 200);
        assert_eq!(
            res.headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("text/event-stream")
        );
        Events {
            res,
            buf: String::new(),
        }
    }

    /// The next event (comments skipped).
    async fn next(&mut self) -> Option<(String, Value)> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut name = String::new();
                let mut data = Value::Null;
                for line in block.lines() {
                    if let Some(n) = line.strip_prefix("event: ") {
                        name = n.to_string();
                    } else if let Some(d) = line.strip_prefix("data: ") {
                        data = serde_json::from_str(d).expect("event data is JSON");
                    }
                }
                if !name.is_empty() {
                    return Some((name, data));
                }
                continue;
            }
            let chunk = self.res.chunk().await.ok()??;
            self.buf.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// Waits until an event of each of `names` arrived (in any order).
    async fn expect(&mut self, names: &[&str]) {
        let mut seen: Vec<String> = Vec::new();
        let done = tokio::time::timeout(EVENT_TIMEOUT, async {
            while let Some((n, data)) = self.next().await {
                assert!(data["config_version"].is_u64(), "{n}: {data}");
                seen.push(n);
                if names.iter().all(|w| seen.iter().any(|s| s == w)) {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(done, Ok(true), "expected {names:?}; saw {seen:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_is_served_from_the_binary_with_its_security_headers() {
    let cp = ControlPlane::start();
    let api = Api::new(&cp);
    for path in ["/", "/index.html"] {
        let res = api.send(reqwest::Method::GET, path, None).await;
        assert_eq!(res.status().as_u16(), 200, "{path}");
        let h = res.headers().clone();
        let header = |n: &str| {
            h.get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        assert!(header("content-type").starts_with("text/html"), "{h:?}");
        assert!(
            header("content-security-policy").contains("default-src 'self'"),
            "{h:?}"
        );
        assert!(
            header("content-security-policy").contains("frame-ancestors 'none'"),
            "{h:?}"
        );
        assert_eq!(header("x-content-type-options"), "nosniff");
        assert_eq!(header("referrer-policy"), "no-referrer");
        assert_eq!(header("cache-control"), "no-cache");
        assert!(
            res.text().await.unwrap_or_default().contains("<html"),
            "{path}"
        );
    }
    for (asset, ty) in [("app.js", "text/javascript"), ("app.css", "text/css")] {
        let res = api
            .send(reqwest::Method::GET, &format!("/assets/{asset}"), None)
            .await;
        assert_eq!(res.status().as_u16(), 200, "{asset}");
        let got = res
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok());
        assert!(got.is_some_and(|t| t.starts_with(ty)), "{asset}: {got:?}");
    }
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    for path in ["/dashboard", "/ui"] {
        let res = no_redirects
            .get(format!("{}{path}", api.base))
            .send()
            .await
            .expect("answers");
        assert!(res.status().is_redirection(), "{path}: {}", res.status());
        assert_eq!(
            res.headers().get("location").and_then(|v| v.to_str().ok()),
            Some("/")
        );
    }
    let res = api
        .send(reqwest::Method::GET, "/assets/nope.js", None)
        .await;
    assert_eq!(res.status().as_u16(), 404);
    // Probes still answer as before.
    let res = api.send(reqwest::Method::GET, "/healthz", None).await;
    assert_eq!(res.status().as_u16(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_needs_an_admin_or_viewer_token_and_refuses_the_proxy_token() {
    let cp = ControlPlane::start();
    let api = Api::new(&cp);
    for token in [None, Some(cp.proxy_token()), Some("not-a-token")] {
        for path in [
            "/api/v1/whoami",
            "/api/v1/backends",
            "/api/v1/events",
            "/api/v1/nope",
        ] {
            let (status, body) = api.json(reqwest::Method::GET, path, token).await;
            assert_eq!(status, 401, "{path} with {token:?}: {body}");
            assert_eq!(body["error"]["code"], "unauthenticated", "{body}");
        }
        let (status, _) = api
            .json(reqwest::Method::POST, "/api/v1/backends/x/disable", token)
            .await;
        assert_eq!(status, 401);
    }
    let admin = cp.admin_token();
    let (status, me) = api.get("/api/v1/whoami", admin).await;
    assert_eq!(
        (status, &me["name"], &me["role"]),
        (200, &"bootstrap".into(), &"admin".into()),
        "{me}"
    );
    let (status, body) = api.get("/api/v1/nope", admin).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (404, &"not_found".into()),
        "{body}"
    );
    // Writes are POST only; reads GET only.
    let (status, _) = api.get("/api/v1/backends/x/disable", admin).await;
    assert_eq!(status, 405);
    let (status, _) = api.post("/api/v1/backends", admin).await;
    assert_eq!(status, 405);
    let (status, body) = api.post("/api/v1/backends/nope/disable", admin).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (404, &"not_found".into()),
        "{body}"
    );
    let (status, body) = api.get("/api/v1/usage?granularity=weekly", admin).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("granularity:")),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_disables_a_backend_from_the_dashboard_and_clawctl_sees_it() {
    let c = Cluster::with(ClusterOptions {
        proxies: 1,
        ..ClusterOptions::default()
    });
    let api = Api::new(&c.cp);
    let admin = c.cp.admin_token();
    let (status, list) = api.get("/api/v1/backends", admin).await;
    assert_eq!(status, 200, "{list}");
    let primary = list["backends"]
        .as_array()
        .and_then(|b| b.iter().find(|b| b["name"] == "primary"))
        .unwrap_or_else(|| panic!("primary listed: {list}"))
        .clone();
    assert_eq!(primary["state"], "healthy", "{primary}");
    assert!(primary["cooling_until"].is_null(), "{primary}");
    assert_eq!(
        primary["api_key"].as_str().map(|k| k.contains(PRIMARY_KEY)),
        Some(false)
    );

    let (status, body) = api.post("/api/v1/backends/primary/disable", admin).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["backend"]["enabled"], false, "{body}");
    assert!(
        body["config_version"].as_u64().is_some_and(|v| v > 0),
        "{body}"
    );
    let got =
        c.cp.clawctl(&["backend", "get", "primary", "-o", "json"])
            .assert_ok()
            .json();
    assert_eq!(got["status"], "disabled", "{got}");
    let (_, list) = api.get("/api/v1/backends", admin).await;
    let state = list["backends"]
        .as_array()
        .and_then(|b| b.iter().find(|b| b["name"] == "primary"))
        .map(|b| b["state"].clone());
    assert_eq!(state, Some("disabled".into()), "{list}");

    let (status, overview) = api.get("/api/v1/overview", admin).await;
    assert_eq!(status, 200, "{overview}");
    assert_eq!(overview["backends"]["total"], 2, "{overview}");
    assert_eq!(overview["backends"]["disabled"], 1, "{overview}");
    assert_eq!(
        overview["proxies"].as_array().map(Vec::len),
        Some(1),
        "{overview}"
    );
    assert!(
        overview["snapshot"]["config_version"].is_u64(),
        "{overview}"
    );
    assert!(
        overview["last_hour"].is_object() && overview["last_day"].is_object(),
        "{overview}"
    );

    let (status, body) = api.post("/api/v1/backends/primary/enable", admin).await;
    assert_eq!(
        (status, &body["backend"]["enabled"]),
        (200, &true.into()),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_reads_every_view_and_cannot_write() {
    let c = Cluster::with(ClusterOptions {
        proxies: 1,
        ..ClusterOptions::default()
    });
    let viewer =
        c.cp.clawctl(&["token", "add", "watcher", "--role", "viewer", "-o", "json"])
            .assert_ok()
            .json()["secret"]
            .as_str()
            .expect("`token add -o json` prints the secret")
            .to_owned();
    let api = Api::new(&c.cp);
    let (status, me) = api.get("/api/v1/whoami", &viewer).await;
    assert_eq!(
        (status, &me["name"], &me["role"]),
        (200, &"watcher".into(), &"viewer".into()),
        "{me}"
    );
    for path in [
        "/api/v1/overview",
        "/api/v1/backends",
        "/api/v1/cooldowns?since=24h&limit=10",
        "/api/v1/usage?granularity=hourly&since=24h&group_by=model",
        "/api/v1/usage?granularity=daily&since=7d&group_by=key",
        "/api/v1/agents",
        "/api/v1/audit?limit=10",
    ] {
        let (status, body) = api.get(path, &viewer).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    let _events = Events::open(&api, &viewer).await;

    let (status, body) = api.post("/api/v1/backends/primary/disable", &viewer).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (403, &"permission_denied".into()),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("viewer")),
        "{body}"
    );
    let got =
        c.cp.clawctl(&["backend", "get", "primary", "-o", "json"])
            .assert_ok()
            .json();
    assert_eq!(
        got["enabled"], true,
        "the viewer's disable changed nothing: {got}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_announces_a_cooldown_after_a_429_and_a_proxy_connecting() {
    let c = Cluster::with(ClusterOptions {
        proxies: 1,
        ..ClusterOptions::default()
    });
    let api = Api::new(&c.cp);
    let admin = c.cp.admin_token();
    let mut events = Events::open(&api, admin).await;
    let first = events.next().await.expect("the stream starts");
    assert_eq!(first.0, "hello", "{first:?}");
    assert!(
        first.1["config_version"].as_u64().is_some_and(|v| v > 0),
        "{first:?}"
    );

    c.primary.push(Action::rate_limited(Some(30)));
    let res = c.chat(&c.proxies[0], CHAT).await;
    assert_eq!(res.status().as_u16(), 200, "retried on the fallback");
    // The 429 cools the backend; the batch also carries the usage.
    events.expect(&["backends", "usage"]).await;
    let (_, list) = api.get("/api/v1/backends", admin).await;
    let primary = list["backends"]
        .as_array()
        .and_then(|b| b.iter().find(|b| b["name"] == "primary"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(primary["state"], "cooling", "{list}");
    assert!(primary["cooling_until"].is_string(), "{primary}");
    // "In use" is what each backend served in the last minute: the one
    // answer came from the fallback; the 429 served nothing.
    let fallback = list["backends"]
        .as_array()
        .and_then(|b| b.iter().find(|b| b["name"] == "fallback"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(fallback["rpm_in_use"], 1, "{fallback}");
    assert!(
        fallback["tpm_in_use"].as_u64().is_some_and(|t| t > 0),
        "{fallback}"
    );
    assert_eq!(primary["rpm_in_use"], 0, "{primary}");
    let (status, cooldowns) = api.get("/api/v1/cooldowns?backend=primary", admin).await;
    assert_eq!(status, 200);
    assert_eq!(
        cooldowns["events"].as_array().map(Vec::len),
        Some(1),
        "{cooldowns}"
    );

    let second = Proxy::builder(&c.cp)
        .node_id(format!("dash-{}", std::process::id()))
        .start();
    events.expect(&["proxies"]).await;
    second.wait_ready();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dashboard_disable_is_audited_under_the_callers_token() {
    let c = Cluster::with(ClusterOptions {
        proxies: 1,
        ..ClusterOptions::default()
    });
    let api = Api::new(&c.cp);
    let admin = c.cp.admin_token();
    let (status, body) = api.post("/api/v1/backends/fallback/disable", admin).await;
    assert_eq!(status, 200, "{body}");
    let (status, audit) = api
        .get("/api/v1/audit?resource=backend/fallback&limit=10", admin)
        .await;
    assert_eq!(status, 200, "{audit}");
    let records = audit["records"].as_array().cloned().unwrap_or_default();
    let disable: Vec<&Value> = records
        .iter()
        .filter(|r| {
            r["operation"]
                .as_str()
                .is_some_and(|o| o.starts_with("dashboard:"))
        })
        .collect();
    assert_eq!(disable.len(), 1, "one dashboard record: {audit}");
    assert_eq!(disable[0]["token_name"], "bootstrap", "{audit}");
    assert_eq!(
        disable[0]["config_version"], body["config_version"],
        "{audit}"
    );
    assert!(
        disable[0]["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:")),
        "the browser's address: {audit}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_event_stream_ends_on_shutdown_without_holding_it_up() {
    let mut cp = ControlPlane::start();
    let api = Api::new(&cp);
    let mut events = Events::open(&api, cp.admin_token()).await;
    assert_eq!(events.next().await.map(|e| e.0).as_deref(), Some("hello"));
    let stopper = tokio::task::spawn_blocking(move || {
        cp.stop_clean();
        cp.logs()
    });
    assert!(events.next().await.is_none(), "the stream ends");
    let logs = stopper.await.expect("stopped");
    assert!(
        !logs.contains("did not close in time"),
        "the stream held shutdown up:\n{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_now_from_the_dashboard_records_a_run_and_announces_it() {
    // No proxy listens at the heartbeat address: the run is recorded all
    // the same (and fails), which is what the page shows.
    let cp = ControlPlane::builder()
        .heartbeat_proxy("http://127.0.0.1:9")
        .start();
    add_backend(
        &cp,
        "b",
        "http://127.0.0.1:9",
        PRIMARY_KEY,
        &["--model", &format!("{CHAT}=native")],
    );
    cp.clawctl(&["agent", "add", "a1", "--model", CHAT, "--interval", "6h"])
        .assert_ok();
    let api = Api::new(&cp);
    let admin = cp.admin_token();
    let mut events = Events::open(&api, admin).await;
    let (status, body) = api.post("/api/v1/agents/a1/run", admin).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["run"]["agent_id"], "a1", "{body}");
    assert_eq!(body["run"]["trigger"], "manual", "{body}");
    events.expect(&["heartbeats"]).await;
    let (status, runs) = api.get("/api/v1/agents/a1/runs", admin).await;
    assert_eq!(status, 200, "{runs}");
    assert!(
        runs["runs"]
            .as_array()
            .is_some_and(|r| r.iter().any(|r| r["run_id"] == body["run"]["run_id"])),
        "{runs}"
    );
    let (_, agents) = api.get("/api/v1/agents", admin).await;
    assert!(agents["agents"][0]["last_run"].is_object(), "{agents}");
    assert!(
        agents["agents"][0]["next_slots"]
            .as_array()
            .is_some_and(|s| !s.is_empty() && s.len() <= 5),
        "{agents}"
    );
}
