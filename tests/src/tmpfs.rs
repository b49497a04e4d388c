//! A small tmpfs mounted for one test: a filesystem that really fills up (ENOSPC), for
//! the disk-full scenarios. Needs root; `COFFER_E2E_NO_TMPFS=1` refuses to mount so the
//! callers' fallbacks can be exercised.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{lossy, run};

/// A mounted tmpfs, unmounted on drop (lazily if still busy).
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (mount's syntax: `8m`) on `dir` (created).
    ///
    /// # Errors
    /// Why it could not be mounted (not root, no mount, `COFFER_E2E_NO_TMPFS`).
    pub fn mount(dir: &Path, size: &str) -> Result<Tmpfs, String> {
        if std::env::var_os("COFFER_E2E_NO_TMPFS").is_some() {
            return Err("COFFER_E2E_NO_TMPFS is set".into());
        }
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let mut cmd = Command::new("mount");
        cmd.args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir);
        let out = run(cmd, Duration::from_secs(20)).map_err(|e| format!("{e:#}"))?;
        if out.code != Some(0) {
            return Err(format!("mount failed: {}", lossy(&out.stderr).trim()));
        }
        Ok(Tmpfs(dir.to_owned()))
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        for args in [&[][..], &["-l"][..]] {
            let mut cmd = Command::new("umount");
            cmd.args(args).arg(&self.0);
            if run(cmd, Duration::from_secs(20)).is_ok_and(|o| o.code == Some(0)) {
                return;
            }
        }
        eprintln!("could not unmount {}", self.0.display());
    }
}
