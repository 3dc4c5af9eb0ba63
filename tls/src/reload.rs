//! A server certificate that follows its files.
//!
//! cert-manager (and most ACME tooling) renews a certificate by rewriting
//! the secret; Kubernetes then swaps the mounted files atomically (a
//! `..data` symlink flip). [`CertResolver`] polls the two files every few
//! seconds — polling survives symlink swaps, bind mounts and editors that
//! write through a temp file, where inotify watches go stale — and installs
//! the new pair once both parse and the key matches the certificate. Until
//! then, and whenever the new files are broken (say the certificate was
//! written but not yet the key), it keeps serving the previous pair: a
//! rotation can never take a listener down. New handshakes use the new
//! certificate; established connections are not touched.

use std::hash::{DefaultHasher, Hash as _, Hasher as _};
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::RwLock;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::pem::{self, CERT_FILE, KEY_FILE, TlsError};

/// How often [`CertResolver::watch`] looks at the files.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(10);

/// The certificate chain and private key files of a listener (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPaths {
    /// Certificate chain, leaf first (`tls.crt`).
    pub cert: PathBuf,
    /// Private key (`tls.key`): PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
    pub key: PathBuf,
}

impl CertPaths {
    /// Reads and checks both files.
    pub fn load(&self) -> Result<CertifiedKey, TlsError> {
        let (cert, key) = self.read()?;
        self.parse(&cert, &key)
    }

    fn read(&self) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
        Ok((
            pem::read(CERT_FILE, &self.cert)?,
            pem::read(KEY_FILE, &self.key)?,
        ))
    }

    fn parse(&self, cert: &[u8], key: &[u8]) -> Result<CertifiedKey, TlsError> {
        use rustls::{Error, InconsistentKeys};
        let chain = pem::certs(CERT_FILE, &self.cert, cert)?;
        let key = pem::private_key(&self.key, key)?;
        let signing = crate::provider()
            .key_provider
            .load_private_key(key)
            .map_err(|source| TlsError::BadKey {
                path: self.key.clone(),
                source,
            })?;
        let certified = CertifiedKey::new(chain, signing);
        match certified.keys_match() {
            // Some key types cannot tell their public key; let the
            // handshake be the judge then.
            Ok(()) | Err(Error::InconsistentKeys(InconsistentKeys::Unknown)) => Ok(certified),
            Err(Error::InconsistentKeys(_)) => Err(TlsError::KeyMismatch {
                cert: self.cert.clone(),
                key: self.key.clone(),
            }),
            Err(source) => Err(TlsError::BadCertificate {
                path: self.cert.clone(),
                source,
            }),
        }
    }
}

/// A [`ResolvesServerCert`] serving the pair in [`CertPaths`], reloaded
/// when the files change (see the module docs).
pub struct CertResolver {
    paths: CertPaths,
    state: RwLock<State>,
}

struct State {
    current: Arc<CertifiedKey>,
    /// Hash of the file contents `current` was built from.
    loaded: u64,
    /// Hash of contents that failed to load: not retried (nor logged
    /// again) until the files change once more.
    failed: Option<u64>,
}

/// What [`CertResolver::reload`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// The files are what is being served.
    Unchanged,
    /// New files were loaded and are served from now on.
    Reloaded,
    /// The files changed but were already found unusable.
    StillBroken,
}

impl std::fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertResolver")
            .field("paths", &self.paths)
            .finish_non_exhaustive()
    }
}

fn fingerprint(cert: &[u8], key: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    cert.hash(&mut h);
    key.hash(&mut h);
    h.finish()
}

impl CertResolver {
    /// Loads the pair, failing (with the file named) when it is unusable.
    /// Call [`CertResolver::watch`] to follow later changes.
    pub fn load(paths: CertPaths) -> Result<Arc<CertResolver>, TlsError> {
        let (cert, key) = paths.read()?;
        let current = Arc::new(paths.parse(&cert, &key)?);
        Ok(Arc::new(CertResolver {
            state: RwLock::new(State {
                current,
                loaded: fingerprint(&cert, &key),
                failed: None,
            }),
            paths,
        }))
    }

    /// The files served.
    pub fn paths(&self) -> &CertPaths {
        &self.paths
    }

    /// The pair served now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.state.read().current.clone()
    }

    /// Re-reads the files and installs them if they changed and are usable.
    /// On error the previous pair stays in service.
    pub fn reload(&self) -> Result<Reload, TlsError> {
        let (cert, key) = self.paths.read()?;
        let seen = fingerprint(&cert, &key);
        {
            let state = self.state.read();
            if state.loaded == seen {
                return Ok(Reload::Unchanged);
            }
            if state.failed == Some(seen) {
                return Ok(Reload::StillBroken);
            }
        }
        let parsed = self.paths.parse(&cert, &key);
        let mut state = self.state.write();
        match parsed {
            Ok(certified) => {
                state.current = Arc::new(certified);
                state.loaded = seen;
                state.failed = None;
                Ok(Reload::Reloaded)
            }
            Err(e) => {
                state.failed = Some(seen);
                Err(e)
            }
        }
    }

    /// Starts a thread that calls [`CertResolver::reload`] every `every`
    /// and logs what changed. The thread holds only a weak reference and
    /// ends once the resolver is dropped. A thread, not a task, so it works
    /// the same under any runtime layout (multi-thread or thread-per-core).
    pub fn watch(self: &Arc<Self>, every: Duration) -> Result<(), TlsError> {
        let weak: Weak<CertResolver> = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("claw-tls-reload".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(every);
                    let Some(resolver) = weak.upgrade() else {
                        return;
                    };
                    let cert = resolver.paths.cert.display();
                    match resolver.reload() {
                        Ok(Reload::Reloaded) => {
                            tracing::info!(cert = %cert, "TLS certificate reloaded");
                        }
                        Ok(Reload::Unchanged | Reload::StillBroken) => {}
                        Err(e) => tracing::warn!(
                            error = %e,
                            "TLS certificate files changed but cannot be used; still serving the previous certificate"
                        ),
                    }
                }
            })
            .map(drop)
            .map_err(TlsError::Watcher)
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_pki::TestPki;

    #[test]
    fn a_rotated_certificate_is_picked_up_and_a_broken_one_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = TestPki::new();
        let paths = first.write_server(dir.path());
        let resolver = CertResolver::load(paths.clone()).expect("load");
        let served = |r: &CertResolver| r.current().cert[0].to_vec();
        assert_eq!(served(&resolver), first.server_cert_der());
        assert_eq!(resolver.reload().expect("same"), Reload::Unchanged);

        // Half a rotation: a new certificate with the old key.
        let second = TestPki::new();
        std::fs::write(&paths.cert, &second.server_cert_pem).expect("write");
        let err = resolver.reload().expect_err("mismatch");
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
        assert_eq!(resolver.reload().expect("known"), Reload::StillBroken);
        assert_eq!(served(&resolver), first.server_cert_der());

        // The key follows: the new pair is served.
        std::fs::write(&paths.key, &second.server_key_pem).expect("write");
        assert_eq!(resolver.reload().expect("reload"), Reload::Reloaded);
        assert_eq!(served(&resolver), second.server_cert_der());

        // Files gone: an error, and the last good pair stays.
        std::fs::remove_file(&paths.key).expect("rm");
        let msg = resolver.reload().expect_err("gone").to_string();
        assert!(msg.contains("TLS key file"), "{msg}");
        assert_eq!(served(&resolver), second.server_cert_der());
    }

    #[test]
    fn load_refuses_a_key_of_another_certificate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = TestPki::new();
        let paths = a.write_server(dir.path());
        std::fs::write(&paths.key, TestPki::new().server_key_pem).expect("write");
        let msg = CertResolver::load(paths).expect_err("mismatch").to_string();
        assert!(msg.contains("does not match the certificate"), "{msg}");
    }

    #[test]
    fn the_watcher_reloads_and_ends_with_the_resolver() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = TestPki::new();
        let paths = first.write_server(dir.path());
        let resolver = CertResolver::load(paths.clone()).expect("load");
        resolver.watch(Duration::from_millis(20)).expect("watch");
        let second = TestPki::new();
        second.write_server(dir.path());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while resolver.current().cert[0].as_ref() != second.server_cert_der().as_slice() {
            assert!(std::time::Instant::now() < deadline, "never reloaded");
            std::thread::sleep(Duration::from_millis(10));
        }
        // The watcher holds the resolver only while it reloads.
        let weak = Arc::downgrade(&resolver);
        drop(resolver);
        while weak.strong_count() > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "watcher kept it alive"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
