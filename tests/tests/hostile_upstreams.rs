//! Hostile upstreams and the proxy's own error answers, against the real
//! binaries (issue 17 items 4 and 10): an upstream status outside 100–599
//! is a 502 naming the backend (retried elsewhere first), never passed
//! through; an upstream's `Set-Cookie` and account headers never reach a
//! client; hyper's own 400/414/431 answers carry JSON errors in the
//! client's shape; a client that stops reading has its socket reset after
//! the write timeout and its upstream released.

use crate::data_plane_support::*;
use claw_tests::harness::{ControlPlane, Proxy, wait_until};
use claw_tests::mock::{MockConfig, MockUpstream, RawUpstream};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Generous bound on anything the tests wait for.
const WAIT: Duration = Duration::from_secs(45);

/// Headers an upstream sends about the gateway's provider account.
const PRIVATE: [&str; 4] = [
    "set-cookie",
    "openai-organization",
    "openai-project",
    "anthropic-organization-id",
];

/// A control plane with backends added by `clawctl`, one proxy, a client key.
struct Setup {
    // Field order is drop order: the proxy before the control plane.
    proxy: Proxy,
    /// Kept running for the proxy (dropped after it).
    _cp: ControlPlane,
    key: String,
    http: reqwest::Client,
}

impl Setup {
    /// `backends`: (name, url, `clawctl backend add` flags).
    fn start(backends: &[(&str, String, Vec<&str>)], proxy_args: &[&str]) -> Self {
        let cp = ControlPlane::start();
        for (name, url, extra) in backends {
            let mut args = vec!["--rpm", "100000"];
            args.extend(extra.iter().copied());
            add_backend(&cp, name, url, "sk-up-hostile-0123456789", &args);
        }
        let key = cp
            .clawctl(&["key", "add", "hostile", "-o", "json"])
            .assert_ok()
            .json()["secret"]
            .as_str()
            .expect("`key add -o json` prints the secret")
            .to_owned();
        let proxy = Proxy::builder(&cp)
            .node_id(format!("dp-hostile-{}", std::process::id()))
            .args(proxy_args.iter())
            .metrics_listener()
            .start();
        proxy.wait_ready();
        let want = config_version(&cp);
        let node = proxy.node_id().to_owned();
        assert!(
            wait_until(SYNC_TIMEOUT, || acked_versions(&cp).get(&node)
                == Some(&want)),
            "the proxy did not ACK config version {want}"
        );
        Setup {
            proxy,
            _cp: cp,
            key,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("a reqwest client"),
        }
    }

    async fn chat(&self, model: &str, stream: bool) -> reqwest::Response {
        self.http
            .post(format!("{}/v1/chat/completions", self.proxy.url()))
            .bearer_auth(&self.key)
            .header("x-request-id", "client-req-1")
            .json(&chat_body(model, stream))
            .send()
            .await
            .expect("chat answered")
    }

    async fn messages(&self, model: &str, stream: bool) -> reqwest::Response {
        self.http
            .post(format!("{}/v1/messages", self.proxy.url()))
            .header("x-api-key", &self.key)
            .header("anthropic-version", "2023-06-01")
            .header("x-request-id", "client-req-2")
            .json(&json!({
                "model": model,
                "max_tokens": 16,
                "stream": stream,
                "messages": [{"role": "user", "content": "hello there"}],
            }))
            .send()
            .await
            .expect("messages answered")
    }

    /// The proxy's `/metrics` (on its own listener: scraping opens no API
    /// connection).
    async fn metrics(&self) -> String {
        let addr = self.proxy.metrics_addr().expect("a metrics listener");
        self.http
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .expect("/metrics")
            .text()
            .await
            .expect("metrics text")
    }

    fn logs(&self) -> String {
        format!("--- proxy ---\n{}", self.proxy.logs())
    }
}

fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// The status, headers and JSON body of `res`.
async fn parts(res: reqwest::Response) -> (u16, reqwest::header::HeaderMap, Value) {
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let text = res.text().await.expect("body");
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, headers, v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_status_outside_100_to_599_is_a_502_naming_the_backend() {
    let high = RawUpstream::start("600 Weird");
    let low = RawUpstream::start("99 Low");
    let good = MockUpstream::start(
        MockConfig::default()
            .name("good")
            .api_key("sk-up-hostile-0123456789")
            .models(["native-mixed"]),
    )
    .await;
    let s = Setup::start(
        &[
            (
                "weird-600",
                high.url(),
                vec!["--model", "odd600=odd", "--model", "mixed=odd"],
            ),
            ("weird-99", low.url(), vec!["--model", "odd99=odd"]),
            (
                "weird-ant",
                high.url(),
                vec!["--api", "anthropic", "--model", "claude-odd=odd"],
            ),
            (
                "good",
                good.url(),
                vec!["--pool", "fallback", "--model", "mixed=native-mixed"],
            ),
        ],
        &[],
    );

    // Counted like a 5xx: retried elsewhere, the client sees the good answer.
    let (status, _, v) = parts(s.chat("mixed", false).await).await;
    assert_eq!(status, 200, "{v}\n{}", s.logs());
    assert_eq!(v["object"], "chat.completion", "{v}");
    assert_eq!(high.requests(), 1, "the 600 backend was tried first");
    assert_eq!(good.totals().ok, 1);

    // Nowhere else to go: 502 in OpenAI's shape, naming the backend.
    for (model, backend, raw) in [("odd600", "weird-600", &high), ("odd99", "weird-99", &low)] {
        let before = raw.requests();
        let (status, headers, v) = parts(s.chat(model, false).await).await;
        assert_eq!(status, 502, "{model}: {v}\n{}", s.logs());
        assert_eq!(v["error"]["code"], "upstream_invalid_status", "{v}");
        assert_eq!(v["error"]["type"], "upstream_error", "{v}");
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(backend), "{message}");
        assert!(headers.get("set-cookie").is_none(), "{headers:?}");
        assert_eq!(raw.requests(), before + 1, "{model} reached its backend");
    }

    // On /v1/messages: the Anthropic shape.
    let (status, _, v) = parts(s.messages("claude-odd", false).await).await;
    assert_eq!(status, 502, "{v}\n{}", s.logs());
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], "api_error", "{v}");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("weird-ant"), "{message}");

    // A stream request fails the same way (before any byte was sent).
    let (status, _, v) = parts(s.chat("odd600", true).await).await;
    assert_eq!(status, 502, "{v}");
    assert_eq!(v["error"]["code"], "upstream_invalid_status", "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_headers_and_cookies_never_reach_clients() {
    let mock = |name: &str, models: [&str; 1]| {
        MockUpstream::start_blocking(
            MockConfig::default()
                .name(name)
                .api_key("sk-up-hostile-0123456789")
                .models(models)
                .account_headers(),
        )
    };
    let openai = mock("oa", ["native-chat"]);
    let anthropic = mock("ant", ["native-claude"]);
    let s = Setup::start(
        &[
            ("oa", openai.url(), vec!["--model", "chat=native-chat"]),
            (
                "ant",
                anthropic.url(),
                vec!["--api", "anthropic", "--model", "claude=native-claude"],
            ),
        ],
        &[],
    );
    // The mock does send them (else this test proves nothing).
    let direct = reqwest::Client::new()
        .post(format!("{}/chat/completions", openai.url()))
        .bearer_auth("sk-up-hostile-0123456789")
        .json(&chat_body("native-chat", false))
        .send()
        .await
        .expect("direct");
    for h in PRIVATE {
        assert!(direct.headers().contains_key(h), "the mock sends {h}");
    }

    for stream in [false, true] {
        for (what, res, id) in [
            ("chat", s.chat("chat", stream).await, "client-req-1"),
            (
                "messages",
                s.messages("claude", stream).await,
                "client-req-2",
            ),
        ] {
            let status = res.status().as_u16();
            let headers = res.headers().clone();
            let body = res.text().await.expect("body");
            assert_eq!(status, 200, "{what} stream={stream}: {body}\n{}", s.logs());
            for h in PRIVATE {
                assert!(
                    !headers.contains_key(h),
                    "{what} stream={stream}: {h} reached the client: {headers:?}"
                );
            }
            // Rate-limit headers pass as they always did; the request id is ours.
            let rl = if what == "chat" {
                "x-ratelimit-remaining-requests"
            } else {
                "anthropic-ratelimit-requests-remaining"
            };
            assert!(headers.contains_key(rl), "{what}: {headers:?}");
            assert_eq!(headers["x-request-id"], id, "{what}");
        }
    }

    // An upstream error answer passed through is stripped too.
    openai.push(claw_tests::mock::Action::status(400));
    let res = s.chat("chat", false).await;
    assert_eq!(res.status(), 400);
    for h in PRIVATE {
        assert!(
            !res.headers().contains_key(h),
            "400: {h} reached the client"
        );
    }
}

/// Sends `raw` on a fresh connection and reads the answer until the proxy
/// closes the connection; the status and the body.
fn raw_exchange(addr: SocketAddr, raw: &[u8]) -> (Option<u16>, String, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s.write_all(raw).expect("write");
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok());
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (status, head.to_owned(), body.to_owned())
}

#[track_caller]
fn json_error(head: &str, body: &str) -> Value {
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{head}"
    );
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {head}\n{body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_long_and_oversized_request_heads_get_json_errors() {
    let mock = MockUpstream::start(
        MockConfig::default()
            .api_key("sk-up-hostile-0123456789")
            .models(["native-chat"]),
    )
    .await;
    let s = Setup::start(
        &[("oa", mock.url(), vec!["--model", "chat=native-chat"])],
        &[],
    );
    let addr = s.proxy.addr();
    let auth = format!("authorization: Bearer {}\r\n", s.key);

    // A garbage request line: 400 in OpenAI's shape.
    let (status, head, body) = raw_exchange(addr, b"GARBAGE\x01 \x02 nonsense\r\n\r\n");
    assert_eq!(status, Some(400), "{head}");
    assert_eq!(
        json_error(&head, &body)["error"]["code"],
        "malformed_request"
    );

    // A 20 KB URI: 414, OpenAI's shape (Anthropic's under /v1/messages).
    let long = "a".repeat(20 * 1024);
    for (path, anthropic) in [("/v1/chat/completions", false), ("/v1/messages", true)] {
        let req =
            format!("POST {path}?q={long} HTTP/1.1\r\nhost: x\r\n{auth}content-length: 0\r\n\r\n");
        let (status, head, body) = raw_exchange(addr, req.as_bytes());
        assert_eq!(status, Some(414), "{path}: {head}");
        let v = json_error(&head, &body);
        if anthropic {
            assert_eq!(v["type"], "error", "{v}");
            assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        } else {
            assert_eq!(v["error"]["code"], "uri_too_long", "{v}");
        }
    }

    // 200 KB of headers: 431, in the shape of the path it asked for.
    let big = "b".repeat(200 * 1024);
    for (path, anthropic) in [("/v1/chat/completions", false), ("/v1/messages", true)] {
        let req = format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\n{auth}x-big: {big}\r\ncontent-length: 0\r\n\r\n"
        );
        let (status, head, body) = raw_exchange(addr, req.as_bytes());
        assert_eq!(status, Some(431), "{path}: {head}");
        let v = json_error(&head, &body);
        if anthropic {
            assert_eq!(v["type"], "error", "{v}");
            assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        } else {
            assert_eq!(v["error"]["code"], "headers_too_large", "{v}");
        }
    }

    assert_eq!(mock.totals().requests, 0, "nothing reached the upstream");
    let (status, _, v) = parts(s.chat("chat", false).await).await;
    assert_eq!(status, 200, "the proxy serves on: {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_has_its_socket_reset_after_the_write_timeout() {
    const TOKENS: u32 = 2_000_000;
    let mock = MockUpstream::start(
        MockConfig::default()
            .api_key("sk-up-hostile-0123456789")
            .models(["native-chat"])
            .completion_tokens(TOKENS),
    )
    .await;
    let s = Setup::start(
        &[("oa", mock.url(), vec!["--model", "chat=native-chat"])],
        &["--write-timeout", "2s"],
    );
    let body = serde_json::to_string(&json!({
        "model": "chat",
        "messages": [{"role": "user", "content": "talk forever"}],
        "max_tokens": TOKENS,
        "stream": true,
    }))
    .expect("json");
    let raw = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        s.key,
        body.len()
    );
    // Sends its request and never reads a byte of the answer.
    let mut client = TcpStream::connect(s.proxy.addr()).expect("connect");
    client.write_all(raw.as_bytes()).expect("send");
    let started = Instant::now();

    // The proxy lets go of the connection: no API connection stays open.
    let deadline = started + WAIT;
    let mut m;
    loop {
        m = s.metrics().await;
        let open = metric(&m, "claw_dp_connections_open");
        let cut = metric(&m, "claw_dp_write_timeouts_total").is_some_and(|n| n >= 1.0);
        if cut && open == Some(0.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stalled connection was never closed (open: {open:?}, cut: {cut}); upstream {:?}\n{}",
            mock.totals(),
            s.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "closed only after the write timeout"
    );

    // The client finds its socket reset (or closed) once it reads: what is
    // buffered, then the end, not an open stream.
    client
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut buf = vec![0u8; 1 << 20];
    let mut ended = false;
    let read_deadline = Instant::now() + WAIT;
    while Instant::now() < read_deadline {
        match client.read(&mut buf) {
            Ok(0) => {
                ended = true;
                break;
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                // Nothing more comes and the socket is not closed: still open.
            }
            Err(_) => {
                ended = true;
                break;
            }
        }
    }
    assert!(ended, "the client's socket was never closed");

    // The upstream connection is released: the mock's stream ended.
    assert!(
        wait_until(WAIT, || mock.totals().in_flight == 0),
        "the upstream stream is still in flight: {:?}",
        mock.totals()
    );
    // The proxy serves on.
    let (status, _, v) = parts(s.chat("chat", false).await).await;
    assert_eq!(status, 200, "{v}");
}
