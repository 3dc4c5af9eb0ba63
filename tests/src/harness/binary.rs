//! Finding the real binaries built by cargo.

use std::path::{Path, PathBuf};

/// The control plane binary.
pub const CONTROL_PLANE: &str = "claw-control-plane";
/// The data-plane proxy binary.
pub const DATA_PLANE: &str = "claw-data-plane";
/// The CLI binary.
pub const CLAWCTL: &str = "clawctl";
/// The mock upstream binary.
pub const MOCK_UPSTREAM: &str = "claw-mock-upstream";

/// Overrides where binaries are looked up first (e.g. to test installed ones).
pub const BIN_DIR_ENV: &str = "CLAW_TEST_BIN_DIR";

/// The path of binary `name`, looked up in `$CLAW_TEST_BIN_DIR`, then in the
/// cargo profile dir of the running test executable
/// (`target/<profile>/deps/x` → `target/<profile>/name`), then under
/// `$CARGO_TARGET_DIR` and the workspace's `target/`.
///
/// # Panics
/// When it is nowhere: the message says how to build it.
pub fn binary_path(name: &str) -> PathBuf {
    let candidates = candidate_dirs();
    let file = format!("{name}{}", std::env::consts::EXE_SUFFIX);
    for dir in &candidates {
        let path = dir.join(&file);
        if path.is_file() {
            return path;
        }
    }
    let looked: Vec<String> = candidates.iter().map(|d| d.display().to_string()).collect();
    panic!(
        "binary `{name}` not found (looked in: {}).\n\
         Build every binary first: run `cargo test --workspace` (or `cargo build --workspace`), \
         or point {BIN_DIR_ENV} at a directory holding it.",
        looked.join(", ")
    );
}

fn candidate_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::var_os(BIN_DIR_ENV) {
        dirs.push(PathBuf::from(dir));
    }
    let profile = profile_dir();
    if let Some(profile) = &profile {
        dirs.push(profile.clone());
    }
    let profile_name = profile
        .as_deref()
        .and_then(Path::file_name)
        .map_or_else(|| "debug".into(), |n| n.to_owned());
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        dirs.push(PathBuf::from(target).join(&profile_name));
    }
    let workspace_target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    dirs.push(workspace_target.join(&profile_name));
    dirs.dedup();
    dirs
}

/// `target/<profile>` of the running executable: tests and benches live in
/// `target/<profile>/deps/`, binaries in `target/<profile>/`.
fn profile_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().map(Path::to_path_buf)
    } else {
        Some(dir.to_path_buf())
    }
}
