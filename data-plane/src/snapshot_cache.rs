//! The optional encrypted last-known-good snapshot (`--snapshot-cache PATH`).
//!
//! A proxy that restarts while the control plane is down would have nothing
//! to serve. With a cache it writes every snapshot it has successfully
//! applied to `PATH`, and at start-up — before it first connects to the
//! control plane — loads it back through the same validation as a pushed
//! snapshot ([`crate::snapshot::compile`]), so `/readyz` is ready and
//! requests are served from it. The discovery hello then reports the cached
//! version, and the control plane sends only what is newer. The control
//! plane stays authoritative: its first snapshot replaces the cached one even
//! when its version is lower (a control plane restored from a backup), see
//! [`crate::discovery::Dispatcher`].
//!
//! **Security model.** The snapshot holds decrypted provider API keys. The
//! file is sealed with AES-256-GCM-SIV under a key derived from the proxy
//! token with HKDF-SHA256 (salt and info name the purpose and the format
//! version). Whoever holds the proxy token can fetch the same snapshot from
//! the control plane anyway, so the file adds no exposure; a file copied
//! without the token is useless. The token must therefore be a generated,
//! high-entropy secret (HKDF does no password stretching). The associated
//! data binds the magic, the format version and the node id, so a file
//! written by another proxy node does not open either. Key material is never
//! logged; [`SnapshotCache`]'s `Debug` shows only the path and node id.
//!
//! **File format** (format version 1):
//!
//! | bytes | content |
//! |---|---|
//! | 8 | magic `CLAWSNAP` |
//! | 2 | format version, big-endian (`1`) |
//! | 12 | random nonce |
//! | rest | AES-256-GCM-SIV ciphertext and 16-byte tag of: config version (u64, big-endian) ‖ prost-encoded `claw.v1.Snapshot` |
//!
//! AAD: magic ‖ format version ‖ node id length (u32, big-endian) ‖ node id.
//!
//! **Writes** are atomic — a temp file in the same directory, `fsync`,
//! `rename`, `fsync` of the directory, mode 0600 — and happen on a blocking
//! thread off the discovery task ([`CacheWriter`]); only the newest pending
//! version is written. A failed write is a warning and
//! `claw_dp_snapshot_cache_writes_total{result="error"}`, never a crash. A
//! cache that cannot be used at start-up (other token or node id, truncated,
//! corrupt, another format version, fails validation) is a warning naming the
//! reason; the file is left in place and the proxy starts as if there were
//! none.
//!
//! Metrics: `claw_dp_snapshot_cache_writes_total{result="ok|error"}` (counter),
//! `claw_dp_snapshot_cache_loaded_version` (gauge; 0 when nothing was loaded).

use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aes_gcm_siv::aead::{Aead, KeyInit, Payload};
use aes_gcm_siv::{Aes256GcmSiv, Nonce};
use claw_proto::v1;
use hkdf::Hkdf;
use prost::Message as _;
use rand::RngCore as _;
use sha2::Sha256;
use tokio::sync::watch;

use crate::snapshot::{SnapshotError, SnapshotStore};

/// First bytes of every cache file.
pub(crate) const MAGIC: &[u8; 8] = b"CLAWSNAP";
/// The file format this code writes and reads.
pub(crate) const FORMAT_VERSION: u16 = 1;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const HEADER_LEN: usize = MAGIC.len() + 2 + NONCE_LEN;
/// HKDF salt and info: they name the purpose and the format version, so the
/// key is useless for anything else and a new format gets a new key.
const HKDF_SALT: &[u8] = b"claw-gateway/data-plane/snapshot-cache";
const HKDF_INFO: &[u8] = b"claw-gateway snapshot-cache v1 aes-256-gcm-siv key";

/// Why a cache file could not be read or written. None of the messages
/// contains key material or snapshot contents.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CacheError {
    /// Reading or writing the file failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Shorter than a header and a tag.
    #[error("file is truncated ({len} bytes)")]
    Truncated {
        /// Length of the file.
        len: usize,
    },
    /// Not a snapshot cache file.
    #[error("not a snapshot cache file (bad magic)")]
    BadMagic,
    /// Written by another version of the format.
    #[error("format version {found} is not supported (this proxy reads {FORMAT_VERSION})")]
    UnsupportedVersion {
        /// The file's format version.
        found: u16,
    },
    /// Authentication failed.
    #[error("decryption failed (another proxy token or node id, or a corrupted file)")]
    Decrypt,
    /// Encryption failed (only possible for absurdly large inputs).
    #[error("encryption failed")]
    Encrypt,
    /// The decrypted payload is not a snapshot.
    #[error("decrypted payload is not a valid snapshot: {0}")]
    Decode(String),
    /// The snapshot failed the validation of a pushed snapshot.
    #[error("snapshot rejected: {0}")]
    Invalid(#[from] SnapshotError),
}

impl CacheError {
    /// A short label for logs.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            CacheError::Io { .. } => "io",
            CacheError::Truncated { .. } => "truncated",
            CacheError::BadMagic => "bad_magic",
            CacheError::UnsupportedVersion { .. } => "format_version",
            CacheError::Decrypt => "decrypt",
            CacheError::Encrypt => "encrypt",
            CacheError::Decode(_) => "decode",
            CacheError::Invalid(_) => "invalid",
        }
    }
}

/// Where the cache lives and the key it is sealed under; cheap to share.
pub(crate) struct SnapshotCache {
    path: PathBuf,
    node_id: String,
    cipher: Aes256GcmSiv,
}

impl fmt::Debug for SnapshotCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SnapshotCache")
            .field("path", &self.path)
            .field("node_id", &self.node_id)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl SnapshotCache {
    /// The cache at `path` of proxy `node_id`, keyed by `proxy_token`.
    pub(crate) fn new(
        path: impl Into<PathBuf>,
        proxy_token: &str,
        node_id: impl Into<String>,
    ) -> Self {
        let hk = Hkdf::<Sha256>::new(Some(HKDF_SALT), proxy_token.as_bytes());
        let mut key = [0u8; 32];
        // 32 bytes is far below HKDF-SHA256's 255 × 32 output limit.
        hk.expand(HKDF_INFO, &mut key)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        let cipher = Aes256GcmSiv::new(&key.into());
        SnapshotCache {
            path: path.into(),
            node_id: node_id.into(),
            cipher,
        }
    }

    /// The cache file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    fn header(&self, nonce: &[u8; NONCE_LEN]) -> Vec<u8> {
        let mut h = Vec::with_capacity(HEADER_LEN);
        h.extend_from_slice(MAGIC);
        h.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
        h.extend_from_slice(nonce);
        h
    }

    fn aad(&self, format_version: u16) -> Vec<u8> {
        let id = self.node_id.as_bytes();
        let mut aad = Vec::with_capacity(MAGIC.len() + 2 + 4 + id.len());
        aad.extend_from_slice(MAGIC);
        aad.extend_from_slice(&format_version.to_be_bytes());
        // Node ids are at most a few hundred bytes (the control plane
        // rejects longer ones); saturate rather than wrap regardless.
        aad.extend_from_slice(&u32::try_from(id.len()).unwrap_or(u32::MAX).to_be_bytes());
        aad.extend_from_slice(id);
        aad
    }

    /// The file contents for `snapshot` applied as `version`.
    pub(crate) fn seal(
        &self,
        version: u64,
        snapshot: &v1::Snapshot,
    ) -> Result<Vec<u8>, CacheError> {
        let mut plain = Vec::with_capacity(8 + snapshot.encoded_len());
        plain.extend_from_slice(&version.to_be_bytes());
        snapshot
            .encode(&mut plain)
            .map_err(|_| CacheError::Encrypt)?;
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let sealed = self.cipher.encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: &plain,
                aad: &self.aad(FORMAT_VERSION),
            },
        );
        let ciphertext = sealed.map_err(|_| CacheError::Encrypt)?;
        let mut out = self.header(&nonce);
        out.extend_from_slice(&ciphertext);
        Ok(out)
    }

    /// Opens file contents: the config version and the snapshot.
    pub(crate) fn open(&self, bytes: &[u8]) -> Result<(u64, v1::Snapshot), CacheError> {
        if bytes.len() < MAGIC.len() + 2 {
            return Err(CacheError::Truncated { len: bytes.len() });
        }
        let (magic, rest) = bytes.split_at(MAGIC.len());
        if magic != MAGIC {
            return Err(CacheError::BadMagic);
        }
        let (format, rest) = rest.split_at(2);
        let found = u16::from_be_bytes([format[0], format[1]]);
        if found != FORMAT_VERSION {
            return Err(CacheError::UnsupportedVersion { found });
        }
        if bytes.len() < HEADER_LEN + TAG_LEN + 8 {
            return Err(CacheError::Truncated { len: bytes.len() });
        }
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        let plain = self
            .cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: &self.aad(found),
                },
            )
            .map_err(|_| CacheError::Decrypt)?;
        decode_payload(&plain)
    }

    /// Reads and opens the file; `Ok(None)` when there is none.
    pub(crate) fn read(&self) -> Result<Option<(u64, v1::Snapshot)>, CacheError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(CacheError::Io {
                    op: "reading",
                    path: self.path.clone(),
                    source,
                });
            }
        };
        self.open(&bytes).map(Some)
    }

    /// Writes `snapshot` (applied as `version`) atomically: a temp file in
    /// the same directory (mode 0600), `fsync`, `rename` over the cache,
    /// `fsync` of the directory. Blocking: call it off the async threads.
    pub(crate) fn write(&self, version: u64, snapshot: &v1::Snapshot) -> Result<(), CacheError> {
        let bytes = self.seal(version, snapshot)?;
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let io = |op: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| CacheError::Io { op, path, source }
        };
        let mut builder = tempfile::Builder::new();
        builder.prefix(".claw-snapshot-").suffix(".tmp");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            builder.permissions(std::fs::Permissions::from_mode(0o600));
        }
        let mut tmp = builder
            .tempfile_in(&dir)
            .map_err(io("creating a temp file in", &dir))?;
        tmp.write_all(&bytes).map_err(io("writing", tmp.path()))?;
        tmp.as_file()
            .sync_all()
            .map_err(io("syncing", tmp.path()))?;
        // On error the temp file is removed when `tmp` drops.
        tmp.persist(&self.path).map_err(|e| CacheError::Io {
            op: "renaming into",
            path: self.path.clone(),
            source: e.error,
        })?;
        sync_dir(&dir).map_err(io("syncing directory", &dir))?;
        Ok(())
    }

    /// Loads the cache into `store` (through the same validation as a
    /// pushed snapshot) and returns its version; `None`, with a warning
    /// naming the reason, when there is no usable cache. The file is never
    /// deleted. Blocking (reads the file): call it before serving or off the
    /// async threads.
    pub(crate) fn load_into(&self, store: &SnapshotStore) -> Option<u64> {
        let result = self.read().and_then(|found| {
            let Some((version, snapshot)) = found else {
                return Ok(None);
            };
            store.apply(version, &snapshot)?;
            Ok(Some(version))
        });
        match result {
            Ok(Some(version)) => {
                crate::metrics::set_snapshot_cache_loaded(version);
                tracing::info!(
                    version,
                    path = %self.path.display(),
                    "serving the cached last-known-good snapshot until the control plane answers"
                );
                Some(version)
            }
            Ok(None) => {
                crate::metrics::set_snapshot_cache_loaded(0);
                tracing::info!(path = %self.path.display(), "no snapshot cache yet");
                None
            }
            Err(e) => {
                crate::metrics::set_snapshot_cache_loaded(0);
                tracing::warn!(
                    path = %self.path.display(),
                    reason = e.reason(),
                    error = %e,
                    "snapshot cache ignored; starting without it"
                );
                None
            }
        }
    }
}

fn decode_payload(plain: &[u8]) -> Result<(u64, v1::Snapshot), CacheError> {
    let (version, encoded) = plain
        .split_first_chunk::<8>()
        .ok_or_else(|| CacheError::Decode("payload shorter than its version".into()))?;
    let snapshot = v1::Snapshot::decode(encoded).map_err(|e| CacheError::Decode(e.to_string()))?;
    Ok((u64::from_be_bytes(*version), snapshot))
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> std::io::Result<()> {
    Ok(())
}

/// The newest applied snapshot waiting to be written.
type Pending = Option<(u64, Arc<v1::Snapshot>)>;

/// Hands applied snapshots to the background writer; only the newest
/// pending one is written (a watch channel coalesces the rest). Cheap to
/// clone; never blocks.
#[derive(Clone)]
pub(crate) struct CacheWriter {
    cache: Arc<SnapshotCache>,
    pending: Arc<watch::Sender<Pending>>,
}

impl fmt::Debug for CacheWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheWriter")
            .field("cache", &self.cache)
            .finish()
    }
}

impl CacheWriter {
    /// A writer for `cache`; nothing is written until [`CacheWriter::run`]
    /// is polled.
    pub(crate) fn new(cache: SnapshotCache) -> Self {
        CacheWriter {
            cache: Arc::new(cache),
            pending: Arc::new(watch::Sender::new(None)),
        }
    }

    /// The cache it writes.
    pub(crate) fn cache(&self) -> &SnapshotCache {
        &self.cache
    }

    /// Queues `snapshot`, applied as `version`, for writing (replacing a
    /// pending older one).
    pub(crate) fn submit(&self, version: u64, snapshot: Arc<v1::Snapshot>) {
        self.pending.send_replace(Some((version, snapshot)));
    }

    /// Writes what is submitted, one file at a time on a blocking thread,
    /// until every [`CacheWriter`] clone is dropped; then returns.
    pub(crate) async fn run(self) {
        let mut rx = self.pending.subscribe();
        // A snapshot submitted before the writer started is still written.
        if rx.borrow().is_some() {
            rx.mark_changed();
        }
        let cache = self.cache.clone();
        // Only the receiver keeps the channel open: the loop ends when the
        // last submitting clone is gone.
        drop(self);
        while rx.changed().await.is_ok() {
            let Some((version, snapshot)) = rx.borrow_and_update().clone() else {
                continue;
            };
            let c = cache.clone();
            let written = tokio::task::spawn_blocking(move || c.write(version, &snapshot)).await;
            let error = match written {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(e) => Some(format!("writer thread failed: {e}")),
            };
            match error {
                None => {
                    crate::metrics::snapshot_cache_written(true);
                    tracing::info!(version, path = %cache.path().display(), "snapshot cache written");
                }
                Some(error) => {
                    crate::metrics::snapshot_cache_written(false);
                    tracing::warn!(
                        version,
                        path = %cache.path().display(),
                        %error,
                        "could not write the snapshot cache; serving is not affected"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{backend, key};
    use claw_proto::Pool;

    const TOKEN: &str = "proxy-token-0123456789abcdef";

    fn snapshot(version: u64) -> v1::Snapshot {
        v1::Snapshot {
            version,
            backends: vec![backend("be_1", Pool::Primary, &[("chat", "native-chat")])],
            client_keys: vec![key("ck_1", "client-secret")],
            ..Default::default()
        }
    }

    fn cache(dir: &Path) -> SnapshotCache {
        SnapshotCache::new(dir.join("snapshot.bin"), TOKEN, "node-1")
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_written_snapshot_reads_back_and_holds_no_plaintext_secret() {
        let dir = tempfile::tempdir().unwrap();
        let c = cache(dir.path());
        assert!(c.read().unwrap().is_none(), "absent is not an error");
        c.write(7, &snapshot(7)).unwrap();
        let (version, back) = c.read().unwrap().unwrap();
        assert_eq!(version, 7);
        assert_eq!(back, snapshot(7));
        let bytes = std::fs::read(c.path()).unwrap();
        assert!(bytes.starts_with(MAGIC));
        for needle in [&b"sk-be_1"[..], b"native-chat", TOKEN.as_bytes()] {
            assert!(!bytes.windows(needle.len()).any(|w| w == needle));
        }
        // Fresh nonce per write.
        assert_ne!(
            c.seal(7, &snapshot(7)).unwrap(),
            c.seal(7, &snapshot(7)).unwrap()
        );
    }

    #[cfg(unix)]
    #[test]
    fn an_atomic_write_leaves_only_the_file_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let c = cache(dir.path());
        c.write(1, &snapshot(1)).unwrap();
        c.write(2, &snapshot(2)).unwrap();
        assert_eq!(entries(dir.path()), vec!["snapshot.bin".to_string()]);
        let mode = std::fs::metadata(c.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(c.read().unwrap().unwrap().0, 2);
    }

    #[test]
    fn a_failed_write_leaves_the_previous_file_and_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let c = cache(dir.path());
        c.write(1, &snapshot(1)).unwrap();
        // The target became a non-empty directory: the rename fails.
        let blocked = SnapshotCache::new(dir.path().join("sub"), TOKEN, "node-1");
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/x"), b"x").unwrap();
        assert!(matches!(
            blocked.write(1, &snapshot(1)),
            Err(CacheError::Io { .. })
        ));
        assert_eq!(
            entries(dir.path()),
            vec!["snapshot.bin".to_string(), "sub".to_string()]
        );
        // A missing directory is an error too, not a panic.
        let nowhere = SnapshotCache::new(dir.path().join("no/such/dir/c"), TOKEN, "node-1");
        assert!(nowhere.write(1, &snapshot(1)).is_err());
    }

    #[test]
    fn another_token_or_node_id_does_not_open_it() {
        let c = SnapshotCache::new("unused", TOKEN, "node-1");
        let bytes = c.seal(3, &snapshot(3)).unwrap();
        let other_token = SnapshotCache::new("unused", "another-token", "node-1");
        assert!(matches!(other_token.open(&bytes), Err(CacheError::Decrypt)));
        let other_node = SnapshotCache::new("unused", TOKEN, "node-2");
        assert!(matches!(other_node.open(&bytes), Err(CacheError::Decrypt)));
        assert_eq!(c.open(&bytes).unwrap().0, 3);
    }

    #[test]
    fn truncated_flipped_or_foreign_files_are_rejected() {
        let c = SnapshotCache::new("unused", TOKEN, "node-1");
        let bytes = c.seal(3, &snapshot(3)).unwrap();
        for len in [0, 5, HEADER_LEN, HEADER_LEN + TAG_LEN, bytes.len() - 1] {
            let err = c.open(&bytes[..len]).unwrap_err();
            assert!(
                matches!(err, CacheError::Truncated { .. } | CacheError::Decrypt),
                "length {len}: {err}"
            );
        }
        for i in [
            MAGIC.len() + 2,
            HEADER_LEN,
            bytes.len() / 2,
            bytes.len() - 1,
        ] {
            let mut flipped = bytes.clone();
            flipped[i] ^= 0x01;
            assert!(
                matches!(c.open(&flipped), Err(CacheError::Decrypt)),
                "byte {i}"
            );
        }
        let mut magic = bytes.clone();
        magic[0] = b'X';
        assert!(matches!(c.open(&magic), Err(CacheError::BadMagic)));
        let mut version = bytes.clone();
        version[MAGIC.len()..MAGIC.len() + 2].copy_from_slice(&2u16.to_be_bytes());
        assert!(matches!(
            c.open(&version),
            Err(CacheError::UnsupportedVersion { found: 2 })
        ));
    }

    #[tokio::test]
    async fn load_into_applies_a_valid_cache_and_ignores_a_bad_one_without_deleting_it() {
        let dir = tempfile::tempdir().unwrap();
        let c = cache(dir.path());
        let store = SnapshotStore::default();
        assert_eq!(c.load_into(&store), None);

        c.write(9, &snapshot(9)).unwrap();
        assert_eq!(c.load_into(&store), Some(9));
        assert_eq!(store.version(), 9);
        assert!(store.load().unwrap().route("chat").is_some());

        // Another token: ignored, kept on disk.
        let fresh = SnapshotStore::default();
        let other = SnapshotCache::new(c.path(), "other-token", "node-1");
        assert_eq!(other.load_into(&fresh), None);
        assert_eq!(fresh.version(), 0);
        assert!(c.path().exists());

        // Decrypts but cannot be used (its inner version disagrees; an
        // invalid resource alone would only be left out): ignored, kept.
        let mut bad = snapshot(4);
        bad.version = 5;
        c.write(4, &bad).unwrap();
        assert_eq!(c.load_into(&fresh), None);
        assert_eq!(fresh.version(), 0);
        assert!(c.path().exists());
    }

    #[test]
    fn debug_shows_no_key_material() {
        let c = SnapshotCache::new("/x/cache", TOKEN, "node-1");
        let shown = format!("{c:?}");
        assert!(shown.contains("<redacted>") && shown.contains("node-1"));
        assert!(!shown.contains(TOKEN));
    }

    #[tokio::test]
    async fn the_writer_coalesces_to_the_newest_version_and_stops_with_its_handles() {
        let dir = tempfile::tempdir().unwrap();
        let writer = CacheWriter::new(cache(dir.path()));
        // Submitted before the task runs: only the newest is written.
        for v in 1..=5 {
            writer.submit(v, Arc::new(snapshot(v)));
        }
        let task = tokio::spawn(writer.clone().run());
        let c = cache(dir.path());
        let mut seen = None;
        for _ in 0..200 {
            if let Ok(Some((v, _))) = c.read() {
                seen = Some(v);
                if v == 5 {
                    break;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(seen, Some(5));
        drop(writer);
        tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .expect("the writer stops once every handle is dropped")
            .unwrap();
    }
}
