//! A throwaway PKI for tests: a CA and a server certificate for
//! `localhost` and `127.0.0.1` signed by it, generated with rcgen. Every
//! [`TestPki::new`] is a fresh CA, so two of them do not trust each other.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::reload::CertPaths;

/// A CA and one server certificate it signed, as PEM.
#[derive(Clone)]
pub struct TestPki {
    /// The CA certificate.
    pub ca_cert_pem: String,
    /// The server certificate (`localhost`, `127.0.0.1`).
    pub server_cert_pem: String,
    /// The server's private key (PKCS#8).
    pub server_key_pem: String,
}

impl std::fmt::Debug for TestPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestPki").finish_non_exhaustive()
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

impl TestPki {
    /// A fresh CA and a server certificate for `localhost` and `127.0.0.1`.
    ///
    /// # Panics
    /// When rcgen cannot generate keys (a broken test environment).
    pub fn new() -> TestPki {
        Self::for_names(&["localhost", "127.0.0.1"])
    }

    /// A fresh CA and a server certificate for `names` (DNS names or IPs).
    ///
    /// # Panics
    /// When rcgen cannot generate keys (a broken test environment).
    pub fn for_names(names: &[&str]) -> TestPki {
        let ca_key = KeyPair::generate().expect("generate CA key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "claw test CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key).expect("self-sign CA");
        let issuer = Issuer::new(ca, ca_key);

        let key = KeyPair::generate().expect("generate server key");
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut server = CertificateParams::new(names).expect("server params");
        server
            .distinguished_name
            .push(DnType::CommonName, "claw test server");
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = server.signed_by(&key, &issuer).expect("sign server cert");
        TestPki {
            ca_cert_pem: ca_cert.pem(),
            server_cert_pem: cert.pem(),
            server_key_pem: key.serialize_pem(),
        }
    }

    /// The server certificate, DER.
    pub fn server_cert_der(&self) -> Vec<u8> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject as _;
        CertificateDer::from_pem_slice(self.server_cert_pem.as_bytes())
            .expect("own PEM")
            .to_vec()
    }

    /// Writes `server.pem` and `server.key` into `dir` (replacing them).
    ///
    /// # Panics
    /// When the files cannot be written.
    pub fn write_server(&self, dir: &Path) -> CertPaths {
        let paths = CertPaths {
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
        };
        std::fs::write(&paths.cert, &self.server_cert_pem).expect("write server.pem");
        std::fs::write(&paths.key, &self.server_key_pem).expect("write server.key");
        paths
    }

    /// Writes `ca.pem` into `dir`.
    ///
    /// # Panics
    /// When the file cannot be written.
    pub fn write_ca(&self, dir: &Path) -> PathBuf {
        let path = dir.join("ca.pem");
        std::fs::write(&path, &self.ca_cert_pem).expect("write ca.pem");
        path
    }
}
