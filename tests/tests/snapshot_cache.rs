//! The proxy's encrypted last-known-good snapshot (`--snapshot-cache`), with
//! the real binaries: a proxy restarted while the control plane is down
//! serves from its cache; the file holds no secret in plaintext; another
//! proxy token cannot use it; the control plane stays the authority when it
//! returns, also when it was reset to an older version.

use crate::data_plane_support::*;
use claw_tests::harness::{ControlPlane, Proxy, grep_dir, wait_until, wait_until_async};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a restarted proxy may take to be ready from its cache.
const READY_FROM_CACHE: Duration = Duration::from_secs(10);

/// A cluster of one proxy keeping its snapshot cache in a temp dir.
fn cluster_with_cache() -> (Cluster, tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("snapshot.bin");
    let c = Cluster::with(ClusterOptions {
        proxies: 1,
        proxy_args: vec![
            "--snapshot-cache".to_owned(),
            path.to_string_lossy().into_owned(),
        ],
        ..ClusterOptions::default()
    });
    (c, dir, path)
}

/// Waits until the proxy has logged writing `version` to its cache.
#[track_caller]
fn wait_cache_written(proxy: &Proxy, version: u64) {
    let line = format!("version={version}");
    assert!(
        wait_until(Duration::from_secs(10), || proxy
            .logs()
            .lines()
            .any(|l| l.contains("snapshot cache written") && l.contains(&line))),
        "version {version} never written to the cache:\n{}",
        proxy.logs()
    );
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path)
        .expect("cache file")
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_restarted_while_the_control_plane_is_down_serves_from_its_cache() {
    let (mut c, dir, path) = cluster_with_cache();
    let node = c.proxy().node_id().to_owned();
    assert_eq!(c.chat(c.proxy(), CHAT).await.status(), 200);
    let version = c.config_version();
    wait_cache_written(c.proxy(), version);
    #[cfg(unix)]
    assert_eq!(mode(&path), 0o600);

    // No secret in plaintext anywhere in the cache dir (and no temp file left).
    for secret in [
        PRIMARY_KEY,
        FALLBACK_KEY,
        c.key.as_str(),
        c.cp.proxy_token(),
    ] {
        assert!(
            grep_dir(dir.path(), secret.as_bytes()).is_empty(),
            "a secret is in plaintext in the cache"
        );
    }
    let files: Vec<_> = std::fs::read_dir(dir.path())
        .expect("cache dir")
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .collect();
    assert_eq!(files, vec![std::ffi::OsString::from("snapshot.bin")]);

    // Proxy stopped, control plane crashed: the proxy comes back from its
    // cache alone.
    c.proxies[0].stop();
    c.cp.kill9();
    c.proxies[0].restart();
    let proxy = c.proxy();
    proxy.wait_ready_timeout(READY_FROM_CACHE);
    let logs = proxy.logs();
    assert!(
        logs.lines().any(
            |l| l.contains("serving the cached last-known-good snapshot")
                && l.contains(&format!("version={version}"))
        ),
        "{logs}"
    );
    let before = c.primary.requests().len();
    let res = c.chat(proxy, CHAT).await;
    assert_eq!(
        res.status(),
        200,
        "{}",
        res.text().await.unwrap_or_default()
    );
    let seen = c.primary.requests();
    let last = seen.get(before).expect("the primary upstream answered");
    assert_eq!(last.model.as_deref(), Some(CHAT_NATIVE_PRIMARY));
    assert_eq!(
        last.header("authorization"),
        Some(format!("Bearer {PRIMARY_KEY}").as_str()),
        "the provider key from the cache reached the upstream"
    );
    c.proxies[0].stop();

    // Another proxy token (same node id, same file): the cache is ignored
    // with a warning, left in place, and the proxy is not ready.
    let mut stranger = Proxy::builder(&c.cp)
        .node_id(&node)
        .proxy_token("another-proxy-token-0123456789")
        .snapshot_cache(&path)
        .start();
    assert!(
        wait_until(Duration::from_secs(10), || stranger
            .logs()
            .contains("snapshot cache ignored")),
        "{}",
        stranger.logs()
    );
    assert!(
        stranger.logs().contains("decryption failed"),
        "{}",
        stranger.logs()
    );
    assert!(!stranger.is_ready(), "ready without a usable snapshot");
    assert!(path.exists(), "an unusable cache is not deleted");
    stranger.stop();

    // The control plane returns: the proxy (right token again) takes a
    // change made after the restart, and writes it to the cache.
    c.proxies[0].restart();
    c.proxy().wait_ready_timeout(READY_FROM_CACHE);
    c.cp.restart();
    add_backend(
        &c.cp,
        "late",
        &c.primary.url(),
        PRIMARY_KEY,
        &["--rpm", "100000", "--model", "late-model=native-late"],
    );
    let latest = c.wait_synced();
    assert!(latest > version);
    assert!(
        wait_until_async(SYNC_TIMEOUT, || async {
            model_ids(&c, c.proxy())
                .await
                .iter()
                .any(|m| m == "late-model")
        })
        .await,
        "the proxy never listed late-model"
    );
    assert_eq!(c.chat(c.proxy(), "late-model").await.status(), 200);
    wait_cache_written(c.proxy(), latest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_started_from_its_cache_takes_an_older_snapshot_from_a_reset_control_plane() {
    let (mut c, _dir, path) = cluster_with_cache();
    let node = c.proxy().node_id().to_owned();
    // A few more changes, so the cached version is ahead of a fresh
    // control plane's.
    for name in ["extra-1", "extra-2", "extra-3"] {
        c.cp.clawctl(&["key", "add", name]).assert_ok();
    }
    let cached = c.wait_synced();
    wait_cache_written(c.proxy(), cached);
    c.proxies[0].stop();

    // The "restored" control plane: same proxy token, fresh data, fewer
    // changes, a different model.
    let reset = ControlPlane::builder()
        .proxy_token(c.cp.proxy_token())
        .start();
    add_backend(
        &reset,
        "restored",
        &c.primary.url(),
        PRIMARY_KEY,
        &[
            "--rpm",
            "100000",
            "--model",
            "restored-model=native-restored",
        ],
    );
    let key = reset
        .clawctl(&["key", "add", "restored", "-o", "json"])
        .assert_ok()
        .json()["secret"]
        .as_str()
        .expect("`key add -o json` prints the secret")
        .to_owned();
    let older = config_version(&reset);
    assert!(
        older < cached,
        "the reset control plane ({older}) must be behind the cache ({cached})"
    );

    let proxy = Proxy::builder(&reset)
        .node_id(&node)
        .snapshot_cache(&path)
        .start();
    proxy.wait_ready_timeout(READY_FROM_CACHE);
    assert!(
        wait_until(SYNC_TIMEOUT, || acked_versions(&reset).get(&node)
            == Some(&older)),
        "the proxy never ACKed the older version {older}: {:?}\n{}",
        acked_versions(&reset),
        proxy.logs()
    );
    assert!(
        !proxy.logs().contains("rejected configuration snapshot"),
        "{}",
        proxy.logs()
    );
    // The reset control plane's configuration is served: its key and
    // model work, the cached ones are gone.
    let chat = |model: &str| {
        c.http
            .post(format!("{}/v1/chat/completions", proxy.url()))
            .bearer_auth(&key)
            .json(&chat_body(model, false))
            .send()
    };
    let res = chat("restored-model").await.expect("chat via the proxy");
    assert_eq!(
        res.status(),
        200,
        "{}",
        res.text().await.unwrap_or_default()
    );
    assert_eq!(chat(CHAT).await.expect("chat via the proxy").status(), 404);
    wait_cache_written(&proxy, older);
}
