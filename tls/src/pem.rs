//! PEM files: certificate chains, private keys, CA bundles. Every error
//! names the file; none contains key material.

use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// What went wrong reading or using TLS files.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        /// The file's role ("TLS certificate file", …).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file holds malformed PEM.
    #[error("{what} {}: invalid PEM: {source}", path.display())]
    Pem {
        /// The file's role.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The parser's complaint.
        source: rustls::pki_types::pem::Error,
    },
    /// A certificate file holds no `CERTIFICATE` block.
    #[error("{what} {}: no PEM certificate found (expected -----BEGIN CERTIFICATE-----)", path.display())]
    NoCertificate {
        /// The file's role.
        what: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// A key file holds no private key block.
    #[error(
        "TLS key file {}: no PEM private key found (expected PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)",
        path.display()
    )]
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// The private key is of a kind rustls cannot sign with.
    #[error("TLS key file {}: unusable private key: {source}", path.display())]
    BadKey {
        /// The file.
        path: PathBuf,
        /// Why.
        source: rustls::Error,
    },
    /// The key does not belong to the certificate.
    #[error("TLS key file {} does not match the certificate in {}", key.display(), cert.display())]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// The certificate cannot be used (e.g. it does not parse as X.509).
    #[error("TLS certificate file {}: {source}", path.display())]
    BadCertificate {
        /// The file.
        path: PathBuf,
        /// Why.
        source: rustls::Error,
    },
    /// A CA certificate cannot be used as a trust anchor.
    #[error("CA file {}: {source}", path.display())]
    BadCa {
        /// The file.
        path: PathBuf,
        /// Why.
        source: rustls::Error,
    },
    /// rustls refused the configuration.
    #[error("TLS setup: {0}")]
    Setup(#[from] rustls::Error),
    /// The certificate watcher thread could not be started.
    #[error("cannot start the TLS certificate watcher: {0}")]
    Watcher(std::io::Error),
}

/// Role of a server certificate chain file, in messages.
pub const CERT_FILE: &str = "TLS certificate file";
/// Role of a private key file, in messages.
pub const KEY_FILE: &str = "TLS key file";
/// Role of a CA bundle, in messages.
pub const CA_FILE: &str = "CA file";

/// Reads a whole file, naming it (and its role) in the error.
pub fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Every `CERTIFICATE` block of `pem` (other blocks are skipped); at least one.
pub fn certs(
    what: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            what,
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) of `pem`.
pub fn private_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    use rustls::pki_types::pem::Error;
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        Error::NoItemsFound => TlsError::NoKey {
            path: path.to_path_buf(),
        },
        source => TlsError::Pem {
            what: KEY_FILE,
            path: path.to_path_buf(),
            source,
        },
    })
}

/// Reads a CA bundle: the raw PEM (e.g. for tonic's `Certificate::from_pem`)
/// after checking that it holds at least one well-formed certificate that
/// can serve as a trust anchor.
pub fn read_ca(path: &Path) -> Result<Vec<u8>, TlsError> {
    let pem = read(CA_FILE, path)?;
    root_store_from(path, &pem)?;
    Ok(pem)
}

/// The trust anchors of the CA bundle at `path`.
pub fn root_store(path: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let pem = read(CA_FILE, path)?;
    root_store_from(path, &pem)
}

fn root_store_from(path: &Path, pem: &[u8]) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs(CA_FILE, path, pem)? {
        roots.add(cert).map_err(|source| TlsError::BadCa {
            path: path.to_path_buf(),
            source,
        })?;
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_pki::TestPki;

    #[test]
    fn a_missing_file_is_named() {
        let err = read(KEY_FILE, Path::new("/nonexistent/key.pem")).expect_err("missing");
        let msg = err.to_string();
        assert!(msg.contains("TLS key file /nonexistent/key.pem"), "{msg}");
    }

    #[test]
    fn certs_and_keys_parse_and_garbage_is_refused() {
        let pki = TestPki::new();
        let path = Path::new("x.pem");
        assert_eq!(
            certs(CERT_FILE, path, pki.server_cert_pem.as_bytes())
                .expect("cert")
                .len(),
            1
        );
        assert!(private_key(path, pki.server_key_pem.as_bytes()).is_ok());
        let err = private_key(path, b"garbage").expect_err("no key");
        assert!(matches!(err, TlsError::NoKey { .. }), "{err}");
        assert!(err.to_string().contains("x.pem"));
        // A certificate is not a key, and a key is not a certificate.
        assert!(private_key(path, pki.server_cert_pem.as_bytes()).is_err());
        let err = certs(CERT_FILE, path, pki.server_key_pem.as_bytes()).expect_err("no cert");
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");
        // The key's bytes never reach a message.
        let broken = pki.server_key_pem.replace("-----END", "-----XND");
        let msg = private_key(path, broken.as_bytes())
            .expect_err("broken")
            .to_string();
        let body_line = pki.server_key_pem.lines().nth(1).expect("a base64 line");
        assert!(!msg.contains(body_line), "{msg}");
    }

    #[test]
    fn a_ca_bundle_becomes_a_root_store() {
        let pki = TestPki::new();
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = pki.write_ca(dir.path());
        assert_eq!(root_store(&ca).expect("roots").len(), 1);
        assert!(read_ca(&ca).is_ok());
        let bad = dir.path().join("bad.pem");
        std::fs::write(&bad, "not pem").expect("write");
        let msg = read_ca(&bad).expect_err("garbage").to_string();
        assert!(msg.contains("CA file") && msg.contains("bad.pem"), "{msg}");
    }
}
