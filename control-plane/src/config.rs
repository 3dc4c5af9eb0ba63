//! The server's configuration, parsed and validated once at the edge (in
//! `main`) so that inner code never reads the environment.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::crypto::MasterKey;

/// Shortest accepted admin or proxy token.
pub const MIN_TOKEN_LEN: usize = 16;

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// No master key was given.
    #[error(
        "no master key: set CLAW_MASTER_KEY to 64 hex characters or CLAW_MASTER_KEY_FILE to a file holding them; generate one with `claw-control-plane keygen`"
    )]
    MissingMasterKey,
    /// Both sources of the master key were given.
    #[error("set only one of CLAW_MASTER_KEY and CLAW_MASTER_KEY_FILE")]
    AmbiguousMasterKey,
    /// The master key is malformed. Never contains the key.
    #[error("{source}: {origin}; generate a valid key with `claw-control-plane keygen`")]
    InvalidMasterKey {
        /// Where the key came from (`CLAW_MASTER_KEY` or the file).
        origin: String,
        /// What is wrong with it.
        source: crate::crypto::CryptoError,
    },
    /// The master key file could not be read.
    #[error("cannot read master key file {path}: {source}")]
    MasterKeyFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A token is missing or too short.
    #[error(
        "{name} must be set to at least {MIN_TOKEN_LEN} characters; generate one with `claw-control-plane token`"
    )]
    WeakToken {
        /// The variable (`CLAW_ADMIN_TOKEN`, `CLAW_PROXY_TOKEN`).
        name: &'static str,
    },
    /// The admin and proxy tokens are equal.
    #[error(
        "CLAW_ADMIN_TOKEN and CLAW_PROXY_TOKEN must differ: a proxy must not hold admin rights"
    )]
    SameTokens,
    /// Only one of the TLS certificate and key was given.
    #[error("{given} is set but {missing} is not: TLS needs both the certificate and its key")]
    HalfTls {
        /// The flag that was given.
        given: &'static str,
        /// The flag that is missing.
        missing: &'static str,
    },
}

/// A bearer token. Its `Debug` never shows the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// Checks length; `name` is the variable named in the error.
    pub fn new(name: &'static str, value: Option<String>) -> Result<Token, ConfigError> {
        match value {
            Some(v) if v.trim().chars().count() >= MIN_TOKEN_LEN => Ok(Token(v.trim().to_string())),
            _ => Err(ConfigError::WeakToken { name }),
        }
    }

    /// The token's bytes, for constant-time comparison.
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Scheduled backups (`--backup-dir --backup-every --backup-keep`): where
/// and how often to write them, and how many to keep (see
/// [`crate::backup::schedule`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupSchedule {
    /// The directory of the backup files (created if missing).
    pub dir: PathBuf,
    /// Time between backups.
    pub every: std::time::Duration,
    /// Files kept; at least 1.
    pub keep: usize,
}

/// Everything [`crate::server::run`] needs besides its listeners.
#[derive(Debug, Clone)]
pub struct Config {
    /// Directory of the sled database (created with mode 0700).
    pub data_dir: PathBuf,
    /// The key provider secrets are encrypted under.
    pub master_key: MasterKey,
    /// Opens the admin API (`clawctl`).
    pub admin_token: Token,
    /// Opens the proxy-facing API (data-plane proxies).
    pub proxy_token: Token,
    /// The heartbeat scheduler: proxy URL, retention, webhook delivery.
    pub heartbeat: crate::heartbeat::runtime::HeartbeatSettings,
    /// Retention of usage buckets, cooldown events and report batch records.
    pub retention: crate::retention::Retention,
    /// Rate-share assignment tunables.
    pub shares: crate::fleet::shares::ShareSettings,
    /// Certificate and key of both listeners (gRPC and HTTP); `None`
    /// serves plain text. Reloaded when the files change.
    pub tls: Option<claw_tls::CertPaths>,
    /// Scheduled backups (`--backup-dir`); `None` writes none.
    pub backup: Option<BackupSchedule>,
    /// Health probe defaults (`--probe-interval`, `--probe-timeout`,
    /// `--probe-failures`).
    pub probe: crate::health::ProbeDefaults,
    /// Fleet-wide ejection after passive failures (`--eject-failures`).
    pub eject: crate::health::table::EjectPolicy,
    /// Connection cap and timeouts of both listeners.
    pub connections: ConnSettings,
    /// Free space kept on the data volume (`--min-free-space`): below it
    /// writes are refused (see [`crate::store::space`]).
    pub min_free_space: crate::store::space::MinFreeSpace,
}

/// Connection cap and timeouts, applied to each listener (gRPC and HTTP)
/// separately (see `crate::conn`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnSettings {
    /// Open connections per listener. 10,000 (two descriptors' worth of
    /// head room under a 64 Ki limit) is far above a fleet's proxies, which
    /// hold one connection each.
    pub max_connections: usize,
    /// A connection that sends nothing for this long after it is accepted
    /// is closed; on HTTP also the limit for a request head.
    pub header_timeout: Duration,
    /// A connection with no byte read or written for this long is closed.
    /// Above the gRPC keepalive ping interval (30 s) and the dashboard's
    /// SSE ping (15 s), so idle but healthy streams are never cut.
    pub idle_timeout: Duration,
}

impl Default for ConnSettings {
    fn default() -> Self {
        ConnSettings {
            max_connections: 10_000,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
        }
    }
}

impl Config {
    /// Builds a validated configuration: tokens of at least
    /// [`MIN_TOKEN_LEN`] characters that differ from each other.
    pub fn new(
        data_dir: impl Into<PathBuf>,
        master_key: MasterKey,
        admin_token: Option<String>,
        proxy_token: Option<String>,
    ) -> Result<Config, ConfigError> {
        let admin_token = Token::new("CLAW_ADMIN_TOKEN", admin_token)?;
        let proxy_token = Token::new("CLAW_PROXY_TOKEN", proxy_token)?;
        if admin_token == proxy_token {
            return Err(ConfigError::SameTokens);
        }
        Ok(Config {
            data_dir: data_dir.into(),
            master_key,
            admin_token,
            proxy_token,
            heartbeat: Default::default(),
            retention: Default::default(),
            shares: Default::default(),
            tls: None,
            backup: None,
            probe: Default::default(),
            eject: Default::default(),
            connections: ConnSettings::default(),
            min_free_space: Default::default(),
        })
    }
}

/// The listeners' TLS files from `--tls-cert` and `--tls-key`: both (TLS)
/// or neither (plain text).
pub fn tls_paths(
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
) -> Result<Option<claw_tls::CertPaths>, ConfigError> {
    const CERT: &str = "--tls-cert (CLAW_CP_TLS_CERT)";
    const KEY: &str = "--tls-key (CLAW_CP_TLS_KEY)";
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(claw_tls::CertPaths { cert, key })),
        (None, None) => Ok(None),
        (Some(_), None) => Err(ConfigError::HalfTls {
            given: CERT,
            missing: KEY,
        }),
        (None, Some(_)) => Err(ConfigError::HalfTls {
            given: KEY,
            missing: CERT,
        }),
    }
}

/// Loads the master key from `CLAW_MASTER_KEY` (the value) or
/// `CLAW_MASTER_KEY_FILE` (a file holding it; whitespace trimmed). Exactly
/// one must be given.
pub fn load_master_key(value: Option<&str>, file: Option<&Path>) -> Result<MasterKey, ConfigError> {
    let value = value.filter(|v| !v.trim().is_empty());
    match (value, file) {
        (Some(_), Some(_)) => Err(ConfigError::AmbiguousMasterKey),
        (None, None) => Err(ConfigError::MissingMasterKey),
        (Some(v), None) => MasterKey::from_hex(v).map_err(|source| ConfigError::InvalidMasterKey {
            origin: "CLAW_MASTER_KEY".into(),
            source,
        }),
        (None, Some(path)) => {
            let text =
                std::fs::read_to_string(path).map_err(|source| ConfigError::MasterKeyFile {
                    path: path.to_path_buf(),
                    source,
                })?;
            MasterKey::from_hex(&text).map_err(|source| ConfigError::InvalidMasterKey {
                origin: format!("master key file {}", path.display()),
                source,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn key() -> MasterKey {
        MasterKey::from_hex(KEY).expect("valid")
    }

    #[test]
    fn tokens_are_checked() {
        let ok = |s: &str| Some(s.to_string());
        assert!(Config::new("d", key(), ok("a".repeat(16).as_str()), ok(&"b".repeat(16))).is_ok());
        assert!(matches!(
            Config::new("d", key(), None, ok(&"b".repeat(16))),
            Err(ConfigError::WeakToken {
                name: "CLAW_ADMIN_TOKEN"
            })
        ));
        assert!(matches!(
            Config::new("d", key(), ok(&"a".repeat(16)), ok("short")),
            Err(ConfigError::WeakToken {
                name: "CLAW_PROXY_TOKEN"
            })
        ));
        assert!(matches!(
            Config::new("d", key(), ok(&"a".repeat(16)), ok(&"a".repeat(16))),
            Err(ConfigError::SameTokens)
        ));
    }

    #[test]
    fn debug_hides_secrets() {
        let c = Config::new(
            "d",
            key(),
            Some("admin-token-secret-value".into()),
            Some("proxy-token-secret-value".into()),
        )
        .expect("valid");
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("secret-value"), "{dbg}");
        assert!(!dbg.contains("0123456789abcdef"), "{dbg}");
    }

    #[test]
    fn tls_needs_both_files() {
        let p = |s: &str| Some(PathBuf::from(s));
        assert_eq!(tls_paths(None, None).expect("plain"), None);
        let both = tls_paths(p("c.pem"), p("k.pem"))
            .expect("tls")
            .expect("some");
        assert_eq!(both.cert, PathBuf::from("c.pem"));
        let msg = tls_paths(p("c.pem"), None).expect_err("half").to_string();
        assert!(msg.contains("--tls-key (CLAW_CP_TLS_KEY) is not"), "{msg}");
        let msg = tls_paths(None, p("k.pem")).expect_err("half").to_string();
        assert!(
            msg.contains("--tls-cert (CLAW_CP_TLS_CERT) is not"),
            "{msg}"
        );
    }

    #[test]
    fn master_key_sources() {
        assert!(matches!(
            load_master_key(None, None),
            Err(ConfigError::MissingMasterKey)
        ));
        assert!(
            load_master_key(None, None)
                .expect_err("missing")
                .to_string()
                .contains("claw-control-plane keygen")
        );
        assert!(load_master_key(Some(KEY), None).is_ok());
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("key");
        std::fs::write(&path, format!("{KEY}\n")).expect("write");
        assert_eq!(
            load_master_key(None, Some(&path)).expect("file").id(),
            key().id()
        );
        assert!(matches!(
            load_master_key(Some(KEY), Some(&path)),
            Err(ConfigError::AmbiguousMasterKey)
        ));
        let err = load_master_key(Some("nothex"), None).expect_err("bad");
        assert!(!err.to_string().contains("nothex"));
    }
}
