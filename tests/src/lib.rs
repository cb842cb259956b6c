//! coral's test bed: the real components every cross-program test runs
//! against, started by the tests themselves on 127.0.0.1 with random ports,
//! and torn down when the test ends, even when it panics.
//!
//! - [`containerd`]: containerd 1.6 (Debian), 1.7 and 2.1 (Debian trixie/sid
//!   builds in the cache), each with a private root, state and socket.
//! - [`registry`]: Debian's `docker-registry`, plain or TLS, with or without
//!   basic auth.
//! - [`moto`]: moto's server for EC2 and the EBS direct APIs.
//! - [`fixtures`]: the fixture image corpus, built once and cached, and a
//!   registry that serves it.
//! - [`cri`]: CRI v1 clients over containerd's socket.
//!
//! Nothing here is a fake: where a test needs a service, it gets the real one.

pub mod cache;
pub mod containerd;
pub mod cri;
pub mod ebsproxy;
pub mod faultproxy;
pub mod fixtures;
pub mod manifests;
pub mod moto;
pub mod process;
pub mod push;
pub mod registry;
pub mod scale;
pub mod seed;
pub mod treecmp;

use std::path::PathBuf;

/// A binary of this workspace, freshly built: `cargo build --bin NAME` runs
/// first (a no-op when it is up to date), since `cargo test`/`nextest` do not
/// rebuild other packages' binaries and a stale one would test old code.
/// `CORAL_BIN_DIR` names a directory of binaries built by the caller.
pub fn workspace_bin(name: &str) -> anyhow::Result<PathBuf> {
    use anyhow::Context;
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(|d| {
            if d.ends_with("deps") {
                d.parent()
            } else {
                Some(d)
            }
        })
        .ok_or_else(|| anyhow::anyhow!("no directory around {}", exe.display()))?
        .to_path_buf();
    // scripts/scale measures release binaries it built itself.
    if let Some(d) = std::env::var_os("CORAL_BIN_DIR") {
        let bin = PathBuf::from(d).join(name);
        anyhow::ensure!(bin.exists(), "CORAL_BIN_DIR has no {}", bin.display());
        return Ok(bin);
    }
    let bin = dir.join(name);
    // scripts/test builds every binary before the tests run, and says so:
    // no cargo call (and no wait on cargo's lock) from inside a test then.
    if std::env::var_os("CORAL_BINS_BUILT").is_some() && bin.exists() {
        return Ok(bin);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let _lock = cache::FileLock::acquire(&cache::cache_dir().join("locks/cargo-build"))?;
    let mut cmd = std::process::Command::new(cargo);
    cmd.args(["build", "--quiet", "--bin", name])
        .current_dir(cache::repo_root())
        // The target directory the tests themselves were built in.
        .env("CARGO_TARGET_DIR", dir.parent().context("target dir")?);
    if dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    process::run(&mut cmd).with_context(|| format!("building {name}"))?;
    anyhow::ensure!(bin.exists(), "{} was not built", bin.display());
    Ok(bin)
}

/// A container ID no other test process uses at the same time: runc keeps
/// its state under `/run/containerd/runc/<namespace>` whatever containerd's
/// own state directory, so test containerds running at once share it.
pub fn container_id(name: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{name}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}
