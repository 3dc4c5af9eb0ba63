//! A gateway cluster for the data-plane acceptance tests: the real
//! `claw-control-plane`, real `claw-data-plane` proxies and in-process mock
//! upstreams, configured with the real `clawctl`.

use claw_tests::harness::{ControlPlane, Proxy, wait_until};
use claw_tests::mock::{MockConfig, MockUpstream};
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;

/// The provider key the primary mock demands: proving that the proxy
/// replaced the client's credentials with the backend's.
pub(crate) const PRIMARY_KEY: &str = "sk-up-primary-0123456789";
/// The fallback mock's provider key.
pub(crate) const FALLBACK_KEY: &str = "sk-up-fallback-0123456789";
/// The canonical chat model, served by both backends.
pub(crate) const CHAT: &str = "chat";
/// The primary's native id for [`CHAT`].
pub(crate) const CHAT_NATIVE_PRIMARY: &str = "native-chat-primary";
/// The fallback's native id for [`CHAT`].
pub(crate) const CHAT_NATIVE_FALLBACK: &str = "native-chat-fallback";
/// The canonical embedding model (primary only).
pub(crate) const EMBED: &str = "embed";
/// Its native id.
pub(crate) const EMBED_NATIVE: &str = "native-embed";

/// How long configuration may take to reach the proxies. Generous: after a
/// control-plane restart a proxy may be in a multi-second reconnect backoff.
pub(crate) const SYNC_TIMEOUT: Duration = Duration::from_secs(45);

/// Options of a [`Cluster`].
#[derive(Debug, Clone)]
pub(crate) struct ClusterOptions {
    /// Number of proxies.
    pub proxies: usize,
    /// Extra proxy flags (timeouts, body limit).
    pub proxy_args: Vec<String>,
    /// Requests per minute of both backends.
    pub rpm: u32,
    /// Mock configuration shared by both upstreams (name and key are set).
    pub mock: MockConfig,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            proxies: 2,
            proxy_args: Vec::new(),
            rpm: 100_000,
            mock: MockConfig::default(),
        }
    }
}

/// A control plane, its proxies, a primary and a fallback mock upstream,
/// and a client key.
pub(crate) struct Cluster {
    // Field order is drop order: proxies before the control plane.
    pub proxies: Vec<Proxy>,
    pub cp: ControlPlane,
    pub primary: MockUpstream,
    pub fallback: MockUpstream,
    /// The client key's secret.
    pub key: String,
    pub http: reqwest::Client,
}

impl Cluster {
    /// Two proxies, defaults everywhere.
    pub(crate) fn start() -> Self {
        Self::with(ClusterOptions::default())
    }

    /// Starts everything, configures it with `clawctl` and waits until every
    /// proxy is ready and has ACKed the configuration.
    pub(crate) fn with(o: ClusterOptions) -> Self {
        let primary = MockUpstream::start_blocking(
            o.mock
                .clone()
                .name("primary")
                .api_key(PRIMARY_KEY)
                .models([CHAT_NATIVE_PRIMARY, EMBED_NATIVE]),
        );
        let fallback = MockUpstream::start_blocking(
            o.mock
                .clone()
                .name("fallback")
                .api_key(FALLBACK_KEY)
                .models([CHAT_NATIVE_FALLBACK]),
        );
        let cp = ControlPlane::start();
        let rpm = o.rpm.to_string();
        add_backend(
            &cp,
            "primary",
            &primary.url(),
            PRIMARY_KEY,
            &[
                "--rpm",
                &rpm,
                "--model",
                &format!("{CHAT}={CHAT_NATIVE_PRIMARY}"),
                "--model",
                &format!("{EMBED}={EMBED_NATIVE}"),
            ],
        );
        add_backend(
            &cp,
            "fallback",
            &fallback.url(),
            FALLBACK_KEY,
            &[
                "--pool",
                "fallback",
                "--rpm",
                &rpm,
                "--model",
                &format!("{CHAT}={CHAT_NATIVE_FALLBACK}"),
            ],
        );
        let key = cp
            .clawctl(&["key", "add", "tests", "-o", "json"])
            .assert_ok()
            .json()["secret"]
            .as_str()
            .expect("`key add -o json` prints the secret")
            .to_owned();
        let proxies: Vec<Proxy> = (0..o.proxies)
            .map(|i| {
                Proxy::builder(&cp)
                    .node_id(format!("dp-{}-{i}", std::process::id()))
                    .args(o.proxy_args.iter())
                    .start()
            })
            .collect();
        for p in &proxies {
            p.wait_ready();
        }
        let cluster = Self {
            proxies,
            cp,
            primary,
            fallback,
            key,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("a reqwest client"),
        };
        cluster.wait_synced();
        cluster
    }

    /// The first proxy.
    pub(crate) fn proxy(&self) -> &Proxy {
        &self.proxies[0]
    }

    /// The control plane's current config version.
    pub(crate) fn config_version(&self) -> u64 {
        config_version(&self.cp)
    }

    /// Waits until every proxy has ACKed the current config version, and
    /// returns it.
    ///
    /// # Panics
    /// After [`SYNC_TIMEOUT`], with what `clawctl proxies` showed.
    #[track_caller]
    pub(crate) fn wait_synced(&self) -> u64 {
        let want = self.config_version();
        let nodes: Vec<&str> = self.proxies.iter().map(Proxy::node_id).collect();
        let mut last = BTreeMap::new();
        let ok = wait_until(SYNC_TIMEOUT, || {
            last = acked_versions(&self.cp);
            nodes.iter().all(|n| last.get(*n) == Some(&want))
        });
        assert!(
            ok,
            "proxies {nodes:?} did not ACK config version {want} within {SYNC_TIMEOUT:?}; \
             `clawctl proxies` shows {last:?}"
        );
        want
    }

    /// `POST {proxy}/v1/{path}` with the client key and a JSON body.
    pub(crate) async fn post(&self, proxy: &Proxy, path: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(format!("{}/v1/{path}", proxy.url()))
            .bearer_auth(&self.key)
            .json(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST /v1/{path} via {}: {e}", proxy.node_id()))
    }

    /// A chat completion for `model` through `proxy`.
    pub(crate) async fn chat(&self, proxy: &Proxy, model: &str) -> reqwest::Response {
        self.post(proxy, "chat/completions", &chat_body(model, false))
            .await
    }
}

/// A small chat request.
pub(crate) fn chat_body(model: &str, stream: bool) -> Value {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "hello from the acceptance tests"}],
        "max_tokens": 8,
        "stream": stream,
    })
}

/// `clawctl backend add NAME --url URL --api-key-env KEY_VAR EXTRA…`.
pub(crate) fn add_backend(
    cp: &ControlPlane,
    name: &str,
    url: &str,
    key: &str,
    extra: &[&str],
) -> Value {
    let mut args = vec![
        "backend",
        "add",
        name,
        "--url",
        url,
        "--api-key-env",
        "CLAW_TEST_UPSTREAM_KEY",
        "-o",
        "json",
    ];
    args.extend_from_slice(extra);
    cp.clawctl_with_env(&args, &[("CLAW_TEST_UPSTREAM_KEY", key)])
        .assert_ok()
        .json()
}

/// `clawctl snapshot -o json` → `config_version`.
pub(crate) fn config_version(cp: &ControlPlane) -> u64 {
    cp.clawctl(&["snapshot", "-o", "json"]).assert_ok().json()["config_version"]
        .as_u64()
        .expect("config_version is a number")
}

/// `clawctl proxies -o json` → node id → acked version (connected ones only).
pub(crate) fn acked_versions(cp: &ControlPlane) -> BTreeMap<String, u64> {
    let out = cp.clawctl(&["proxies", "-o", "json"]);
    if !out.success() {
        return BTreeMap::new();
    }
    out.json()
        .as_array()
        .map(|list| {
            list.iter()
                .filter(|p| p["connected"].as_bool().unwrap_or(true))
                .filter_map(|p| {
                    Some((
                        p["node_id"].as_str()?.to_owned(),
                        p["acked_version"].as_u64()?,
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The ids in `GET /v1/models` of `proxy`, or empty on any failure.
pub(crate) async fn model_ids(c: &Cluster, proxy: &Proxy) -> Vec<String> {
    let Ok(res) = c
        .http
        .get(format!("{}/v1/models", proxy.url()))
        .bearer_auth(&c.key)
        .send()
        .await
    else {
        return Vec::new();
    };
    let v: Value = res.json().await.unwrap_or_default();
    v["data"]
        .as_array()
        .map(|l| {
            l.iter()
                .filter_map(|m| m["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Asserts an OpenAI-format error body (`{"error":{"message","type",…}}`)
/// and returns it.
#[track_caller]
pub(crate) fn assert_openai_error(body: &str) -> Value {
    let v: Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("error body is not JSON ({e}): {body}"));
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
            && v["error"]["type"].is_string(),
        "not an OpenAI-format error: {body}"
    );
    v
}

/// Runs `tests/python/{script}` with `python3` and `env`, asserts it exited
/// 0 and printed every line of `checks` (as a substring), and returns its
/// stdout. Fails, rather than skips, when the SDK `module` is missing.
#[track_caller]
pub(crate) fn run_python_checks(
    script: &str,
    module: &str,
    env: &[(&str, String)],
    checks: &[&str],
    logs: impl FnOnce() -> String,
) -> String {
    use std::process::Command;
    let probe = Command::new("python3")
        .args([
            "-c",
            &format!("import {module}; print({module}.__version__)"),
        ])
        .output();
    let version = match probe {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        Ok(out) => panic!(
            "the {module} Python SDK is not installed: run `pip install -r tests/python/requirements.txt`\n{}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!(
            "python3 not found ({e}): install Python 3, then `pip install -r tests/python/requirements.txt`"
        ),
    };
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(script);
    let mut cmd = Command::new("python3");
    cmd.arg(&path)
        // The SDK must talk to loopback, whatever the environment.
        .env("NO_PROXY", "*")
        .env_remove("OPENAI_BASE_URL")
        .env_remove("OPENAI_API_KEY")
        .env_remove("ANTHROPIC_BASE_URL")
        .env_remove("ANTHROPIC_API_KEY")
        .env_remove("ANTHROPIC_AUTH_TOKEN");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("ran python3");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{module} SDK {version}\n{stdout}");
    assert!(
        out.status.success(),
        "{} failed ({}):\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}\n--- logs ---\n{}",
        path.display(),
        out.status,
        logs()
    );
    for check in checks {
        assert!(
            stdout.lines().any(|l| l.starts_with(check)),
            "missing `{check}` in:\n{stdout}"
        );
    }
    stdout
}

/// One backend of a [`Fleet`]: its own mock upstream (provider account).
#[derive(Debug, Clone)]
pub(crate) struct BackendSpec {
    pub name: String,
    /// `openai` or `anthropic` (`clawctl backend add --api`).
    pub api: &'static str,
    /// `--model` specs, e.g. `claude=claude-native,in=0.000003`.
    pub models: Vec<String>,
    /// Native model ids the mock lists.
    pub native: Vec<String>,
    /// More `clawctl backend add` flags, e.g. `--pool fallback`.
    pub args: Vec<String>,
}

impl BackendSpec {
    /// A backend named `name` serving canonical `model` as `{model}-{name}`,
    /// with `prices` appended to the `--model` spec (e.g. `,in=0.001`).
    pub(crate) fn new(name: &str, api: &'static str, model: &str, prices: &str) -> Self {
        let native = format!("{model}-{name}");
        Self {
            name: name.to_owned(),
            api,
            models: vec![format!("{model}={native}{prices}")],
            native: vec![native],
            args: Vec::new(),
        }
    }

    /// The same backend added with `args` too (`--pool fallback`).
    pub(crate) fn with_args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| (*a).to_owned()));
        self
    }

    /// The provider key its mock demands.
    pub(crate) fn key(&self) -> String {
        format!("sk-up-{}-0123456789abcdef", self.name)
    }
}

/// A control plane, proxies, and one mock per backend, configured with the
/// real `clawctl` (`backend add --api …`).
pub(crate) struct Fleet {
    // Field order is drop order: proxies before the control plane.
    pub proxies: Vec<Proxy>,
    pub cp: ControlPlane,
    pub mocks: Vec<MockUpstream>,
    pub specs: Vec<BackendSpec>,
    /// The client key's secret.
    pub key: String,
    pub http: reqwest::Client,
}

impl Fleet {
    pub(crate) fn start(specs: Vec<BackendSpec>, proxies: usize) -> Self {
        let mocks: Vec<MockUpstream> = specs
            .iter()
            .map(|s| {
                MockUpstream::start_blocking(
                    MockConfig::default()
                        .name(s.name.clone())
                        .api_key(s.key())
                        .models(s.native.clone()),
                )
            })
            .collect();
        let cp = ControlPlane::start();
        for (spec, mock) in specs.iter().zip(&mocks) {
            let mut extra: Vec<&str> = vec!["--api", spec.api, "--rpm", "100000"];
            for m in &spec.models {
                extra.push("--model");
                extra.push(m);
            }
            extra.extend(spec.args.iter().map(String::as_str));
            add_backend(&cp, &spec.name, &mock.url(), &spec.key(), &extra);
        }
        let key = cp
            .clawctl(&["key", "add", "tests", "-o", "json"])
            .assert_ok()
            .json()["secret"]
            .as_str()
            .expect("`key add -o json` prints the secret")
            .to_owned();
        let proxies: Vec<Proxy> = (0..proxies)
            .map(|i| {
                Proxy::builder(&cp)
                    .node_id(format!("dp-{}-{i}", std::process::id()))
                    .start()
            })
            .collect();
        for p in &proxies {
            p.wait_ready();
        }
        let fleet = Self {
            proxies,
            cp,
            mocks,
            specs,
            key,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("a reqwest client"),
        };
        fleet.wait_synced();
        fleet
    }

    /// Waits until every proxy ACKed the current config version.
    #[track_caller]
    pub(crate) fn wait_synced(&self) {
        let want = config_version(&self.cp);
        let nodes: Vec<&str> = self.proxies.iter().map(Proxy::node_id).collect();
        let mut last = BTreeMap::new();
        let ok = wait_until(SYNC_TIMEOUT, || {
            last = acked_versions(&self.cp);
            nodes.iter().all(|n| last.get(*n) == Some(&want))
        });
        assert!(
            ok,
            "proxies {nodes:?} did not ACK {want}; `clawctl proxies` shows {last:?}"
        );
    }

    /// Every proxy's log, for failure messages.
    pub(crate) fn logs(&self) -> String {
        self.proxies
            .iter()
            .map(|p| format!("--- {} ---\n{}", p.node_id(), p.logs()))
            .collect()
    }

    /// `POST {proxy}/v1/messages` with the client key as `x-api-key`,
    /// `anthropic-version` and `extra` headers; the raw body as given.
    pub(crate) async fn messages(
        &self,
        proxy: usize,
        body: &str,
        extra: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut req = self
            .http
            .post(format!("{}/v1/messages", self.proxies[proxy].url()))
            .header("x-api-key", &self.key)
            .header("anthropic-version", "2023-06-01")
            .header("content-type", "application/json")
            .body(body.to_owned());
        for (k, v) in extra {
            req = req.header(*k, *v);
        }
        req.send()
            .await
            .unwrap_or_else(|e| panic!("POST /v1/messages via proxy {proxy}: {e}"))
    }

    /// `POST {proxy}/v1/{path}` with the client key as a Bearer token.
    pub(crate) async fn post_openai(
        &self,
        proxy: usize,
        path: &str,
        body: &Value,
        extra: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut req = self
            .http
            .post(format!("{}/v1/{path}", self.proxies[proxy].url()))
            .bearer_auth(&self.key)
            .json(body);
        for (k, v) in extra {
            req = req.header(*k, *v);
        }
        req.send()
            .await
            .unwrap_or_else(|e| panic!("POST /v1/{path} via proxy {proxy}: {e}"))
    }

    /// Successful answers per mock, in backend order, once none is in
    /// flight (a mock files a request just after its last byte left).
    pub(crate) fn ok_counts(&self) -> Vec<u64> {
        wait_until(Duration::from_secs(5), || {
            self.mocks.iter().all(|m| m.totals().in_flight == 0)
        });
        self.mocks.iter().map(|m| m.totals().ok).collect()
    }

    /// The one mock whose successful answers grew since `before`.
    #[track_caller]
    pub(crate) fn served_by(&self, before: &[u64]) -> usize {
        let after = self.ok_counts();
        let grew: Vec<usize> = (0..after.len())
            .filter(|i| after[*i] > before[*i])
            .collect();
        assert_eq!(
            grew.len(),
            1,
            "exactly one backend should have answered: before {before:?}, after {after:?}"
        );
        grew[0]
    }
}

/// `name value` of an unlabelled gauge on `/metrics`.
pub(crate) async fn gauge(c: &Cluster, proxy: &Proxy, name: &str) -> Option<f64> {
    let text = c
        .http
        .get(format!("{}/metrics", proxy.url()))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
