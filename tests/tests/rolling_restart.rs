//! Rolling restarts: a proxy that shuts down on purpose hands its rate
//! shares back at once (real control plane, real proxies, real clients).
//!
//! On SIGTERM a proxy keeps accepting for `--drain-delay`; when it stops
//! accepting, every fleet-shared limiter applies a share of 0 and only then
//! does its report stream say `leaving`, so the control plane grants its
//! part to the other proxies on its next tick. Before, the leaver's shares
//! stayed reserved like a vanished proxy's (`disconnected_hold`, about a
//! minute) and its replacement got only what was left: here half of the
//! client keys' default share, and next to nothing of a key the old proxy
//! had all the demand for.

use crate::data_plane_support::*;
use claw_tests::harness::Proxy;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

const RPM: u32 = 60;

/// The share of a key's rpm `proxy` applies to keys without one of their
/// own.
async fn default_share(c: &Cluster, proxy: &Proxy) -> Option<f64> {
    gauge(c, proxy, "claw_dp_client_key_default_share").await
}

/// Polls until `proxy`'s default key share is `want`; the last value seen
/// when `deadline` passes first.
async fn wait_default_share(
    c: &Cluster,
    proxy: &Proxy,
    want: f64,
    deadline: Duration,
) -> Result<Duration, Option<f64>> {
    let start = Instant::now();
    loop {
        let last = default_share(c, proxy).await;
        if last == Some(want) {
            return Ok(start.elapsed());
        }
        if start.elapsed() >= deadline {
            return Err(last);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A client sending with `key` to `url` as fast as it is allowed (100 ms
/// after a 429 or a refused connection) until `stop`; every 200 is
/// recorded with its time in `admitted`.
fn client(
    c: &Cluster,
    url: String,
    key: String,
    admitted: Arc<Mutex<Vec<Instant>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    let http = c.http.clone();
    tokio::spawn(async move {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let status = http
                .post(format!("{url}/v1/chat/completions"))
                .bearer_auth(&key)
                .json(&chat_body(CHAT, false))
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0);
            match status {
                200 => admitted.lock().push(Instant::now()),
                // Rate limited; or the proxy is gone (its listener closed).
                429 | 0 => tokio::time::sleep(Duration::from_millis(100)).await,
                other => panic!("unexpected status {other} from {url}"),
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_replaced_in_a_rolling_restart_hands_its_shares_to_the_new_one_at_once() {
    let c = Cluster::with(ClusterOptions {
        proxies: 0,
        ..ClusterOptions::default()
    });
    let key =
        c.cp.clawctl(&[
            "key",
            "add",
            "steady",
            "--rpm",
            &RPM.to_string(),
            "-o",
            "json",
        ])
        .assert_ok()
        .json()["secret"]
            .as_str()
            .expect("`key add -o json` prints the secret")
            .to_owned();
    let pid = std::process::id();
    let mut a = Proxy::builder(&c.cp)
        .node_id(format!("dp-{pid}-old"))
        .drain_delay(Duration::from_secs(1))
        .start();
    a.wait_ready();
    c.wait_synced();
    if let Err(last) = wait_default_share(&c, &a, 1.0, Duration::from_secs(30)).await {
        panic!("the lone proxy never got the whole rpm: {last:?}");
    }

    // The key used steadily through the old proxy (as fast as it allows).
    let started = Instant::now();
    let on_a = Arc::new(Mutex::new(Vec::new()));
    let on_b = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client_a = client(&c, a.url(), key.clone(), on_a.clone(), stop.clone());
    tokio::time::sleep(Duration::from_secs(4)).await;

    // Its replacement joins (no traffic yet) and gets half of the default.
    let b = Proxy::builder(&c.cp)
        .node_id(format!("dp-{pid}-new"))
        .start();
    b.wait_ready();
    if let Err(last) = wait_default_share(&c, &b, 0.5, Duration::from_secs(30)).await {
        panic!("the new proxy never got half of the default share: {last:?}");
    }

    // The old one is told to stop and the traffic moves to the new one.
    let a_node = a.node_id().to_string();
    let sigterm = Instant::now();
    let stopping = tokio::task::spawn_blocking(move || {
        let status = a.stop_within(Duration::from_secs(30));
        (a, status)
    });
    let client_b = client(&c, b.url(), key.clone(), on_b.clone(), stop.clone());

    // Within seconds of its drain delay (not a minute): the new proxy has
    // the whole default share...
    let took = wait_default_share(&c, &b, 1.0, Duration::from_secs(10))
        .await
        .unwrap_or_else(|last| {
            panic!(
                "the new proxy still applies {last:?} of the default share 10 s after \
                 the old one got SIGTERM (drain delay 1 s)"
            )
        });
    // ... and admits the key's traffic at about its whole rpm (1 a second):
    // at least 3 in the 5 s after that.
    let full_at = Instant::now();
    let deadline = full_at + Duration::from_secs(10);
    loop {
        let since = on_b.lock().iter().filter(|t| **t >= full_at).count();
        if since >= 4 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new proxy admitted {since} of the key's requests in the 10 s after it \
             got the whole default share"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = client_a.await;
    let _ = client_b.await;
    let (mut a, status) = stopping.await.expect("the stopping task");
    assert!(
        status.is_some_and(|s| s.success()),
        "the old proxy exited with {status:?}; log:\n{}",
        a.logs()
    );
    let _ = a.stop();

    // The control plane said so, once, for the old proxy.
    let cp_log = c.cp.logs();
    let left: Vec<&str> = cp_log
        .lines()
        .filter(|l| l.contains("proxy left; its shares are released"))
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].contains(&a_node), "{}", left[0]);

    // Never above the fleet-wide rpm: over the whole run (well under a
    // minute), at most `rpm × T ÷ 60 s`, plus 5 % of the rpm back to back,
    // plus one request per proxy.
    let elapsed = started.elapsed().as_secs_f64();
    let (n_a, n_b) = (on_a.lock().len(), on_b.lock().len());
    let bound = f64::from(RPM) * elapsed / 60.0 + 0.05 * f64::from(RPM) + 2.0;
    assert!(
        (n_a + n_b) as f64 <= bound,
        "{n_a} + {n_b} admitted in {elapsed:.1} s with rpm {RPM} (at most {bound:.1})"
    );
    eprintln!(
        "rolling restart: new proxy at the whole default share {took:?} after SIGTERM \
         ({:?} since); admitted {n_a} + {n_b} in {elapsed:.1} s",
        full_at.duration_since(sigterm)
    );
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_proxy_stopped_at_once_still_says_it_is_leaving() {
    // No drain delay, nothing in flight, nothing to report: the proxy exits
    // within milliseconds of SIGTERM, and the control plane still learns
    // that it left (an acknowledged batch says so within the shutdown
    // grace) instead of holding its shares for a minute.
    let c = Cluster::with(ClusterOptions {
        proxies: 0,
        ..ClusterOptions::default()
    });
    let mut a = Proxy::builder(&c.cp)
        .node_id(format!("dp-{}-idle", std::process::id()))
        .start();
    a.wait_ready();
    c.wait_synced();
    if let Err(last) = wait_default_share(&c, &a, 1.0, Duration::from_secs(30)).await {
        panic!("the lone proxy never got the whole rpm: {last:?}");
    }
    let node = a.node_id().to_string();
    let status = a.stop();
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let said =
            c.cp.logs()
                .lines()
                .any(|l| l.contains("proxy left; its shares are released") && l.contains(&node));
        if said {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the control plane never logged that {node} left; proxy log:\n{}",
            a.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Requests waiting in a backend's rate-limit queue when a leaving proxy
/// drops its shares to 0 are answered at once, 503 with `Retry-After` (an
/// SDK retries it, reaching another proxy), instead of waiting for a share
/// that never comes back until the queue or the drain gives up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_queued_when_a_proxy_leaves_are_answered_503_at_once() {
    let mut c = Cluster::with(ClusterOptions {
        proxies: 1,
        // Both backends at 6 rpm: after their first requests, the rest
        // queue (the next slot is 10 s away) for the pool's 30 s.
        rpm: 6,
        proxy_args: vec!["--drain-delay".into(), "1s".into()],
        ..ClusterOptions::default()
    });
    let url = c.proxy().url();
    let mut requests = Vec::new();
    for _ in 0..6 {
        let (http, url, key) = (c.http.clone(), url.clone(), c.key.clone());
        requests.push(tokio::spawn(async move {
            let res = http
                .post(format!("{url}/v1/chat/completions"))
                .bearer_auth(&key)
                .json(&chat_body(CHAT, false))
                .send()
                .await
                .expect("an answer, not a cut connection");
            let retry_after = res.headers().get("retry-after").is_some();
            let status = res.status().as_u16();
            (status, retry_after, res.text().await.unwrap_or_default())
        }));
    }
    // Let them reach the proxy (the admitted ones answer at once), then stop it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut proxy = c.proxies.remove(0);
    let stopping = tokio::task::spawn_blocking(move || {
        let status = proxy.stop_within(Duration::from_secs(60));
        (status, proxy)
    });
    let mut answers = Vec::new();
    for r in requests {
        answers.push(r.await.expect("joined"));
    }
    let (status, proxy) = stopping.await.expect("joined");
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        proxy.logs()
    );
    let ok = answers.iter().filter(|(s, _, _)| *s == 200).count();
    let refused: Vec<_> = answers.iter().filter(|(s, _, _)| *s != 200).collect();
    assert!(ok >= 1 && !refused.is_empty(), "{answers:?}");
    for (status, retry_after, body) in refused {
        assert_eq!(*status, 503, "{body}\n{}", proxy.logs());
        assert!(*retry_after, "no Retry-After: {body}");
        assert!(body.contains("no_backend_available"), "{body}");
    }
}
