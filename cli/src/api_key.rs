//! Provider API keys: where `clawctl` reads them from (an environment
//! variable, a file or standard input) and the reference (`env:VAR`,
//! `file:/abs/path`) stored beside the key so `export` can name its source
//! without ever containing it.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};

/// Where a provider key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KeySource {
    /// An environment variable of `clawctl`'s own environment.
    Env(String),
    /// A file holding the key (surrounding whitespace is ignored).
    File(PathBuf),
    /// Standard input, read to the end.
    Stdin,
}

impl KeySource {
    /// The reference stored with the backend: `env:VAR`, `file:<absolute
    /// path>`, or empty for standard input (nothing to re-read later).
    pub(crate) fn reference(&self) -> anyhow::Result<String> {
        Ok(match self {
            KeySource::Env(var) => format!("env:{var}"),
            KeySource::File(path) => {
                let abs = std::path::absolute(path)
                    .with_context(|| format!("cannot resolve {}", path.display()))?;
                let abs = abs
                    .to_str()
                    .ok_or_else(|| anyhow!("key file path {} is not UTF-8", abs.display()))?;
                format!("file:{abs}")
            }
            KeySource::Stdin => String::new(),
        })
    }

    /// Reads the key. Errors name the variable or file but never contain
    /// any part of a key.
    pub(crate) fn read(&self) -> anyhow::Result<String> {
        let key = match self {
            KeySource::Env(var) => match std::env::var(var) {
                Ok(v) => v,
                Err(std::env::VarError::NotPresent) => {
                    bail!("environment variable {var} is not set")
                }
                Err(std::env::VarError::NotUnicode(_)) => {
                    bail!("environment variable {var} is not valid UTF-8")
                }
            },
            KeySource::File(path) => read_file(path)?,
            KeySource::Stdin => {
                let mut buf = String::new();
                std::io::stdin()
                    .read_to_string(&mut buf)
                    .context("cannot read the API key from standard input")?;
                buf
            }
        };
        let key = key.trim();
        if key.is_empty() {
            bail!("{} is empty", self.describe());
        }
        Ok(key.to_string())
    }

    /// Human description, for messages: `environment variable X`, `file P`.
    pub(crate) fn describe(&self) -> String {
        match self {
            KeySource::Env(var) => format!("environment variable {var}"),
            KeySource::File(path) => format!("API key file {}", path.display()),
            KeySource::Stdin => "the API key on standard input".to_string(),
        }
    }

    /// Parses a stored reference back (`env:VAR` / `file:PATH`): the
    /// inverse of `reference`, which the tests pin.
    #[cfg(test)]
    fn from_reference(reference: &str) -> Option<KeySource> {
        if let Some(var) = reference.strip_prefix("env:") {
            return Some(KeySource::Env(var.to_string()));
        }
        reference
            .strip_prefix("file:")
            .map(|p| KeySource::File(PathBuf::from(p)))
    }
}

fn read_file(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).map_err(|e| {
        let reason = match e.kind() {
            std::io::ErrorKind::InvalidData => "not UTF-8 text".to_string(),
            _ => e.to_string(),
        };
        anyhow!("cannot read API key file {}: {reason}", path.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_round_trip() {
        let env = KeySource::Env("OPENAI_API_KEY".into());
        assert_eq!(env.reference().ok().as_deref(), Some("env:OPENAI_API_KEY"));
        assert_eq!(KeySource::from_reference("env:OPENAI_API_KEY"), Some(env));
        let file = KeySource::File("relative/key".into());
        let reference = file.reference().expect("cwd is resolvable");
        assert!(reference.starts_with("file:/"), "{reference}");
        assert!(reference.ends_with("/relative/key"));
        assert_eq!(KeySource::Stdin.reference().ok().as_deref(), Some(""));
        assert_eq!(KeySource::from_reference(""), None);
    }

    #[test]
    fn missing_sources_are_named_and_keys_trimmed() {
        let unset = KeySource::Env("CLAWCTL_TEST_SURELY_UNSET_VAR".into());
        let err = unset.read().expect_err("unset").to_string();
        assert_eq!(
            err,
            "environment variable CLAWCTL_TEST_SURELY_UNSET_VAR is not set"
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("key");
        std::fs::write(&path, "  sk-test-123456789\n").expect("write key");
        assert_eq!(
            KeySource::File(path.clone()).read().ok().as_deref(),
            Some("sk-test-123456789")
        );
        std::fs::write(&path, "\n").expect("write key");
        assert!(
            KeySource::File(path.clone())
                .read()
                .is_err_and(|e| e.to_string().ends_with("is empty"))
        );
        let missing = KeySource::File(dir.path().join("nope"));
        assert!(
            missing
                .read()
                .is_err_and(|e| e.to_string().starts_with("cannot read API key file"))
        );
    }
}
