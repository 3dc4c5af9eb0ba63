//! Random credentials for test servers, and a scan proving none leaked to disk.

use rand::RngCore as _;
use std::path::{Path, PathBuf};

/// `n` random bytes as `2n` lowercase hex characters
/// (`random_hex(32)` is a master key).
pub fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// Every file under `dir` (recursively) whose bytes contain `needle`.
pub fn grep_dir(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if std::fs::read(&path).is_ok_and(|bytes| {
                !needle.is_empty() && bytes.windows(needle.len()).any(|w| w == needle)
            }) {
                hits.push(path);
            }
        }
    }
    hits.sort();
    hits
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_hex_has_the_asked_length() {
        let a = random_hex(32);
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a, random_hex(32));
    }

    #[test]
    fn grep_dir_finds_nested_files() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        std::fs::write(dir.path().join("sub/x.bin"), b"..sk-secret..").expect("write");
        std::fs::write(dir.path().join("y"), b"nothing").expect("write");
        assert_eq!(
            grep_dir(dir.path(), b"sk-secret"),
            vec![dir.path().join("sub/x.bin")]
        );
    }
}
