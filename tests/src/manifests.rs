//! Independent checkers for what `deploy/` holds: `kubernetes-validate`
//! (the Kubernetes schemas, strict) for built-in kinds, and
//! `tests/fixtures/validate-cr` for custom resources against their CRD's
//! schema (strict about unknown fields, as the apiserver is). Both live in
//! the test venv that `scripts/setup` makes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Result, ensure};

use crate::cache::{cache_dir, repo_root};

/// The Kubernetes version the manifests are checked against.
pub const KUBERNETES: &str = "1.33.0";

/// A program of the test venv.
pub fn venv_bin(name: &str) -> Result<PathBuf> {
    let p = cache_dir().join("venv/bin").join(name);
    ensure!(p.exists(), "{} is missing: run scripts/setup", p.display());
    Ok(p)
}

/// `kubernetes-validate --strict` on `files`.
pub fn kubernetes_validate(files: &[PathBuf]) -> Result<Output> {
    Ok(Command::new(venv_bin("kubernetes-validate")?)
        .args(["-k", KUBERNETES, "--strict"])
        .args(files)
        .output()?)
}

/// Every object in `files` of the kind `crd` defines, against its schema.
pub fn validate_cr(crd: &Path, files: &[&Path]) -> Result<Output> {
    Ok(Command::new(venv_bin("python3")?)
        .arg(repo_root().join("tests/fixtures/validate-cr"))
        .arg(crd)
        .args(files)
        .output()?)
}

/// A checker's stdout and stderr, for a failure message.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// An image reference with its registry moved to a closed port on
/// 127.0.0.1 (the discard port, where nothing listens), for checks that run
/// a program on a manifest's arguments: nothing leaves this machine, not
/// even a DNS query for the registry's name.
pub fn on_loopback(reference: &str) -> String {
    let rest = reference.split_once('/').map_or(reference, |(_, r)| r);
    format!("127.0.0.1:9/{rest}")
}

/// coral-builder accepts `args` (its parser and option checks): run with
/// `--deadline 1ms` it gets as far as the deadline (exit 1, naming it), so
/// nothing is pulled. `broken`, a copy with a misspelled flag, must be a
/// usage error (exit 2), so that acceptance means something. Image hosts in
/// `args` should be [`on_loopback`]; IMDS is off, so nothing leaves the
/// machine.
pub fn builder_accepts(args: &[String], broken: &[String]) -> Result<()> {
    let bin = crate::workspace_bin("coral-builder")?;
    let o = Command::new(&bin)
        .args(args)
        .args(["--deadline", "1ms"])
        .env("CORAL_LOG", "error")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()?;
    ensure!(
        o.status.code() == Some(1) && text(&o).contains("--deadline"),
        "coral-builder {}: {:?}\n{}",
        args.join(" "),
        o.status,
        text(&o)
    );
    let o = Command::new(&bin).args(broken).output()?;
    ensure!(
        o.status.code() == Some(2),
        "a misspelled flag: {:?}\n{}",
        o.status,
        text(&o)
    );
    Ok(())
}
