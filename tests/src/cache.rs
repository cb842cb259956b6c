//! The cache shared by test runs: downloaded containerd builds, the Python
//! venv with moto, the fixture corpus and the registry storage it was pushed
//! into. Lives outside the clone so repeated CI runs reuse it.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// `$CORAL_CACHE`, else `$HOME/.cache/coral`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CORAL_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/coral")
}

/// The repository checkout (for scripts and fixture recipes).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// An exclusive advisory lock held until dropped. Test processes run in
/// parallel (nextest runs each test in its own process), so one-time set-up
/// such as building the corpus is done under this lock.
pub struct FileLock {
    _file: File,
}

impl FileLock {
    pub fn acquire(path: &Path) -> Result<FileLock> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening lock {}", path.display()))?;
        // SAFETY: flock on a descriptor we own; blocks until the lock is free.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("locking {}", path.display()));
        }
        Ok(FileLock { _file: file })
    }
}
