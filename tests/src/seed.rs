//! Seed volumes for tests: `coral-builder build` against a test registry,
//! and loop mounts of the result.

use std::path::{Path, PathBuf};

use std::process::Command;

use anyhow::{Context, Result};

use crate::fixtures::Corpus;
use crate::process::run;
use crate::registry::Registry;
use crate::workspace_bin;

/// Runs `coral-builder build` for `images` from `reg`; returns the report.
pub fn build(
    reg: &Registry,
    images: &[&str],
    platforms: &[&str],
    output: &Path,
    extra: &[&str],
) -> Result<serde_json::Value> {
    let mut cmd = Command::new(workspace_bin("coral-builder")?);
    cmd.arg("build")
        .arg("--output")
        .arg(output)
        .args(["--json", "--progress", "none"]);
    for i in images {
        cmd.arg("--image")
            .arg(format!("{}/{}:latest", reg.host(), Corpus::repository(i)));
    }
    for p in platforms {
        cmd.args(["--platform", p]);
    }
    if reg.is_tls() {
        cmd.arg("--ca-cert")
            .arg(reg.ca_cert().expect("TLS registry has a CA"));
    } else {
        cmd.args(["--insecure-registry", &reg.host()]);
    }
    cmd.args(extra);
    let out = run(&mut cmd).context("coral-builder build")?;
    serde_json::from_str(&out).with_context(|| format!("build report is not JSON: {out}"))
}

/// A loop-mounted image file; unmounted (and the loop device detached) on drop.
pub struct Mounted(pub PathBuf, #[allow(dead_code)] tempfile::TempDir);

impl Mounted {
    /// Read-only.
    pub fn new(image: &Path) -> Result<Mounted> {
        Self::with_options(image, "loop,ro")
    }

    /// Read-write (the image file changes).
    pub fn read_write(image: &Path) -> Result<Mounted> {
        Self::with_options(image, "loop")
    }

    fn with_options(image: &Path, options: &str) -> Result<Mounted> {
        let dir = tempfile::Builder::new().prefix("coral-mnt-").tempdir()?;
        run(Command::new("mount")
            .args(["-o", options])
            .arg(image)
            .arg(dir.path()))?;
        Ok(Mounted(dir.path().to_path_buf(), dir))
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-d").arg(&self.0).status();
    }
}

/// `sha256sum` of a file, hex.
pub fn sha256_file(p: &Path) -> Result<String> {
    let out = run(Command::new("sha256sum").arg(p))?;
    Ok(out
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// Unmounts a directory (and so frees an autoclear loop device under it)
/// when dropped, whatever happened.
pub struct UnmountOnDrop(pub PathBuf);

impl Drop for UnmountOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A tmpfs of a given size at a fresh directory, for full-disk tests;
/// unmounted on drop. Needs root.
pub struct SmallFs(tempfile::TempDir);

impl SmallFs {
    pub fn new(mib: u64) -> Result<SmallFs> {
        let dir = tempfile::Builder::new().prefix("coral-full-").tempdir()?;
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "coral-full"])
            .arg(dir.path()))?;
        Ok(SmallFs(dir))
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// Grows (or shrinks) it in place, keeping what it holds.
    pub fn resize(&self, mib: u64) -> Result<()> {
        run(Command::new("mount")
            .args(["-o", &format!("remount,size={mib}m")])
            .arg(self.0.path()))?;
        Ok(())
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}
