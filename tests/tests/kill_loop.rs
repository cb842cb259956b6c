//! A short seeded run of `scripts/kill-loop` (the long runs are the
//! script's): coral-builder killed mid-build three times, the node
//! mounter's import killed three times with containerd killed under it in
//! some rounds; every output is intact or absent and every re-run
//! converges. Needs root (containerd, loop mounts).

use std::process::Command;

use anyhow::{Result, ensure};

#[test]
fn seeded_kills_of_builder_import_and_containerd_leave_nothing_corrupt() -> Result<()> {
    let o = Command::new(coral_tests::workspace_bin("coral-kill-loop")?)
        .args(["--seed", "7", "--iterations", "3"])
        .output()?;
    let stdout = String::from_utf8_lossy(&o.stdout);
    ensure!(
        o.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    ensure!(
        stdout.contains("builder: 3 rounds") && stdout.contains("import: 3 rounds"),
        "{stdout}"
    );
    println!("{stdout}");
    Ok(())
}
