//! Bad input against the real `claw-data-plane` binary: every rejection is
//! an OpenAI-format error, nothing reaches the upstream, slow clients cannot
//! hold sockets, and the proxy keeps serving afterwards.

use crate::data_plane_support::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Small limits so that the tests are quick: 64 KiB bodies, 1 s to send a
/// request head or body, 2 s of keep-alive idleness.
fn strict_cluster() -> Cluster {
    Cluster::with(ClusterOptions {
        proxies: 1,
        proxy_args: [
            "--max-body-bytes",
            "65536",
            "--header-timeout",
            "1s",
            "--body-timeout",
            "1s",
            "--idle-timeout",
            "2s",
        ]
        .map(String::from)
        .to_vec(),
        ..ClusterOptions::default()
    })
}

/// Sends `raw` on a fresh connection and reads until the server closes it
/// (or `timeout`); returns the status line's code, if any, and the text.
fn raw_exchange(addr: SocketAddr, raw: &[u8], timeout: Duration) -> (Option<u16>, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(timeout)).expect("timeout");
    s.write_all(raw).expect("write");
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok());
    (status, text)
}

/// The body of a raw HTTP/1.1 response.
fn raw_body(text: &str) -> &str {
    text.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

/// Waits until the peer closes `s` (read returns 0 or an error other than a
/// timeout); returns how long that took, or `None` after `limit`.
fn closed_within(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let mut buf = [0u8; 1024];
    while started.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return Some(started.elapsed()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Some(started.elapsed()),
        }
    }
    None
}

#[track_caller]
fn assert_still_serves(c: &Cluster) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let status = rt.block_on(async { c.chat(c.proxy(), CHAT).await.status() });
    assert_eq!(status, 200, "the proxy still serves after bad input");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_unknown_client_keys_get_401_in_openai_format() {
    let c = strict_cluster();
    let url = format!("{}/v1/chat/completions", c.proxy().url());
    let body = chat_body(CHAT, false);
    let attempts = [
        ("none", c.http.post(&url).json(&body)),
        (
            "unknown",
            c.http
                .post(&url)
                .bearer_auth("sk-claw-not-a-key")
                .json(&body),
        ),
        (
            "basic",
            c.http
                .post(&url)
                .basic_auth("tests", Some(&c.key))
                .json(&body),
        ),
        (
            "upstream key",
            c.http.post(&url).bearer_auth(PRIMARY_KEY).json(&body),
        ),
    ];
    for (what, req) in attempts {
        let res = req.send().await.expect("answered");
        assert_eq!(res.status(), 401, "{what}");
        let err = assert_openai_error(&res.text().await.expect("body"));
        assert_eq!(err["error"]["code"], "invalid_api_key", "{what}");
    }
    // A key that is not even UTF-8.
    let (status, text) = raw_exchange(
        c.proxy().addr(),
        b"GET /v1/models HTTP/1.1\r\nhost: x\r\nauthorization: Bearer \xff\xfe\xfd\r\nconnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    assert_eq!(status, Some(401), "{text}");
    assert_openai_error(raw_body(&text));

    assert_eq!(
        c.primary.totals().requests + c.fallback.totals().requests,
        0
    );
    let models = c
        .http
        .get(format!("{}/v1/models", c.proxy().url()))
        .send()
        .await
        .expect("answered");
    assert_eq!(models.status(), 401, "the model list needs a key too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_unknown_and_oversized_requests_get_openai_errors() {
    let c = strict_cluster();
    let url = format!("{}/v1/chat/completions", c.proxy().url());
    let mut invalid_utf8 = br#"{"model":"chat","messages":[{"role":"user","content":""#.to_vec();
    invalid_utf8.extend_from_slice(b"\xff\xfe\xc3\x28");
    invalid_utf8.extend_from_slice(br#""}]}"#);
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("malformed JSON", b"{\"model\": \"chat\", ".to_vec(), 400),
        ("empty body", Vec::new(), 400),
        ("not an object", b"[1,2,3]".to_vec(), 400),
        ("missing model", br#"{"messages":[]}"#.to_vec(), 400),
        ("model not a string", br#"{"model":42}"#.to_vec(), 400),
        ("invalid UTF-8", invalid_utf8, 400),
        (
            "unknown model",
            serde_json::to_vec(&chat_body("no-such-model", false)).expect("json"),
            404,
        ),
        ("too large", vec![b' '; 100_000], 413),
    ];
    for (what, body, want) in cases {
        let res = c
            .http
            .post(&url)
            .bearer_auth(&c.key)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(res.status().as_u16(), want, "{what}");
        let err = assert_openai_error(&res.text().await.expect("body"));
        if want == 404 {
            assert_eq!(err["error"]["code"], "model_not_found");
        }
    }

    // Too large without a Content-Length: a chunked body is cut at the limit.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..20).map(|_| Ok(vec![b' '; 8192])).collect();
    let res = c
        .http
        .post(&url)
        .bearer_auth(&c.key)
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .expect("answered");
    assert_eq!(res.status(), 413);
    assert_openai_error(&res.text().await.expect("body"));

    // A body slower than the body timeout: 408.
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"model\"",
        c.key
    );
    let (status, text) = raw_exchange(c.proxy().addr(), head.as_bytes(), Duration::from_secs(10));
    assert_eq!(status, Some(408), "{text}");

    // Unknown paths and methods.
    let res = c
        .http
        .get(format!("{}/v1/nothing-here", c.proxy().url()))
        .bearer_auth(&c.key)
        .send()
        .await
        .expect("answered");
    assert_eq!(res.status(), 404);
    assert_openai_error(&res.text().await.expect("body"));

    assert_eq!(
        c.primary.totals().requests + c.fallback.totals().requests,
        0,
        "nothing bad reached an upstream"
    );
    let ok = c.chat(c.proxy(), CHAT).await;
    assert_eq!(ok.status(), 200);
    let v: Value = ok.json().await.expect("json");
    assert_eq!(v["object"], "chat.completion");
}

#[test]
fn slow_or_idle_clients_cannot_hold_a_socket() {
    let c = strict_cluster();
    let addr = c.proxy().addr();

    // A head that never completes is dropped after the header timeout (1 s).
    let mut partial = TcpStream::connect(addr).expect("connect");
    partial
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        .expect("write");
    let took = closed_within(&mut partial, Duration::from_secs(10))
        .expect("a half-sent head was not dropped within 10 s");
    assert!(took < Duration::from_secs(4), "dropped after {took:?}");

    // Trickling one byte at a time does not extend it (slowloris).
    let mut trickle = TcpStream::connect(addr).expect("connect");
    let started = Instant::now();
    let head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-padding: ";
    let mut closed = false;
    for byte in head.iter().chain(std::iter::repeat(&b'a')).take(200) {
        if trickle.write_all(&[*byte]).is_err() {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        if started.elapsed() > Duration::from_secs(8) {
            break;
        }
    }
    let took = started.elapsed();
    assert!(
        closed || closed_within(&mut trickle, Duration::from_secs(1)).is_some(),
        "a trickled head was still open after {took:?}"
    );
    assert!(
        took < Duration::from_secs(5),
        "trickled head held for {took:?}"
    );

    // A connection that never sends anything is closed after the header
    // timeout (1 s), counted from the connection's start (issue 17: idle
    // zero-byte connections must not pile up until the 2 s idle timeout).
    let mut idle = TcpStream::connect(addr).expect("connect");
    let took = closed_within(&mut idle, Duration::from_secs(10))
        .expect("an idle connection was not closed within 10 s");
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(4),
        "{took:?}"
    );

    assert_eq!(
        c.primary.totals().requests + c.fallback.totals().requests,
        0
    );
    assert_still_serves(&c);
}

#[test]
fn an_out_of_range_serve_threads_is_refused_naming_the_flag() {
    let cp = claw_tests::harness::ControlPlane::start();
    for bad in ["5000", "abc"] {
        let err = claw_tests::harness::Proxy::builder(&cp)
            .args(["--serve-threads", bad])
            .try_start()
            .expect_err("started with a bad --serve-threads");
        assert!(err.status.is_some_and(|s| !s.success()), "{err}");
        assert!(err.output.contains("--serve-threads"), "{err}");
    }
}
