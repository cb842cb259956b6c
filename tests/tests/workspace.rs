//! Properties of the workspace itself that a user relies on.

use std::process::Command;

use anyhow::{Result, ensure};
use coral_tests::cache::repo_root;
use coral_tests::process::run;

/// The node binary runs at boot on every node: it must stay small and must
/// never link the AWS SDK or kube (those belong to builder and controller).
#[test]
fn node_mounter_links_neither_the_aws_sdk_nor_kube() -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let tree = run(Command::new(cargo).current_dir(repo_root()).args([
        "tree",
        "--offline",
        "-p",
        "coral-node-mounter",
        "-e",
        "normal,build",
        "--prefix",
        "none",
    ]))?;
    let forbidden: Vec<&str> = tree
        .lines()
        .filter(|l| {
            let name = l.split_whitespace().next().unwrap_or("");
            name.starts_with("aws-") || name.starts_with("kube") || name == "k8s-openapi"
        })
        .collect();
    ensure!(
        tree.contains("coral-seed"),
        "unexpected cargo tree output:\n{tree}"
    );
    ensure!(
        forbidden.is_empty(),
        "coral-node-mounter depends on {forbidden:?}"
    );
    Ok(())
}
