//! A small filesystem of its own (tmpfs), for tests that fill the disk:
//! mounted on a fresh temp dir, grown or shrunk with a remount, filled to a
//! given free space with a filler file, unmounted on drop.
//!
//! Mounting needs root (or CAP_SYS_ADMIN); [`SmallFs::mount`] says why when
//! it cannot, and tests should fail with that message rather than skip.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

/// A tmpfs mounted on a temp dir; unmounted (and the dir removed) on drop.
#[derive(Debug)]
pub struct SmallFs {
    // Field order: unmount (Drop) before the temp dir goes.
    mount_point: PathBuf,
    _dir: TempDir,
}

/// Runs `cmd`, describing a failure (exit status and stderr).
fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl SmallFs {
    /// Mounts a tmpfs of `bytes` (rounded up to pages by the kernel).
    pub fn mount(bytes: u64) -> Result<SmallFs, String> {
        let dir = tempfile::Builder::new()
            .prefix("claw-smallfs-")
            .tempdir()
            .map_err(|e| format!("cannot create a mount point: {e}"))?;
        let mount_point = dir.path().to_path_buf();
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={bytes},mode=0700"))
            .arg("tmpfs")
            .arg(&mount_point))
        .map_err(|e| {
            format!(
                "cannot mount a {bytes}-byte tmpfs (this test needs root or CAP_SYS_ADMIN): {e}"
            )
        })?;
        Ok(SmallFs {
            mount_point,
            _dir: dir,
        })
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.mount_point
    }

    /// Grows (or shrinks) it to `bytes` in place; files stay.
    pub fn resize(&self, bytes: u64) -> Result<(), String> {
        run(Command::new("mount")
            .args(["-o"])
            .arg(format!("remount,size={bytes}"))
            .arg(&self.mount_point))
    }

    /// Bytes available on it now.
    pub fn available(&self) -> u64 {
        // df reads statvfs(2) (f_bavail), as the control plane does.
        Command::new("df")
            .args(["-B1", "--output=avail"])
            .arg(&self.mount_point)
            .output()
            .ok()
            .and_then(|out| {
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .nth(1)
                    .and_then(|l| l.trim().parse().ok())
            })
            .unwrap_or(0)
    }

    /// Writes the file `name` (replacing it) until at most `leave` bytes
    /// remain available, or the filesystem is full. Returns its path.
    pub fn fill(&self, name: &str, leave: u64) -> Result<PathBuf, String> {
        let path = self.mount_point.join(name);
        let mut file = std::fs::File::create(&path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        let chunk = vec![0x5au8; 64 * 1024];
        loop {
            let available = self.available();
            if available <= leave {
                break;
            }
            let n = ((available - leave) as usize).min(chunk.len());
            match file.write_all(&chunk[..n]) {
                Ok(()) => {}
                // Full: as filled as it gets.
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => return Err(format!("writing {}: {e}", path.display())),
            }
            file.flush()
                .map_err(|e| format!("writing {}: {e}", path.display()))?;
        }
        Ok(path)
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        if run(Command::new("umount").arg(&self.mount_point)).is_err() {
            // Still busy (a process being reaped): detach it now, the
            // kernel frees it when the last user goes.
            let _ = run(Command::new("umount").arg("-l").arg(&self.mount_point));
        }
    }
}
