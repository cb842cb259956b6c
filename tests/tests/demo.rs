//! The README's first command, `scripts/demo`, tells the whole story: this
//! runs the program it ends in (coral-demo) and checks what a newcomer
//! reads: both node starts timed side by side, and a container started
//! from the seeded image. Needs root (containerd, loop mounts).

use std::process::Command;

use anyhow::{Context, Result, ensure};

#[test]
fn the_demo_times_both_node_starts_and_runs_a_container_from_the_seeded_image() -> Result<()> {
    let demo = coral_tests::workspace_bin("coral-demo")?;
    let o = Command::new(demo).output()?;
    let stdout = String::from_utf8_lossy(&o.stdout);
    ensure!(
        o.status.success(),
        "coral-demo: {:?}\n{stdout}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    let table = stdout
        .split("==> timings")
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    for row in [
        "node without coral: pulls + first container",
        "node with coral: containerd up -> first container",
        "first container, coral vs CRI pulls",
    ] {
        let line = table.lines().find(|l| l.contains(row));
        let value = line
            .and_then(|l| l.split_whitespace().last())
            .map(|v| v.trim_end_matches('x'))
            .and_then(|v| v.parse::<f64>().ok());
        ensure!(
            value.is_some_and(|v| v > 0.0 && v.is_finite()),
            "no timing for {row:?} in:\n{stdout}"
        );
    }
    // The container the demo starts from the seeded minbase prints what
    // the corpus says it prints, after every image was seeded.
    let corpus = coral_tests::fixtures::Corpus::get()?;
    let check = corpus
        .image("minbase")
        .run
        .clone()
        .context("minbase runs")?;
    let coral_part = stdout.split("==> coral:").nth(1).unwrap_or_default();
    ensure!(
        coral_part.contains(&format!("container printed: {}", check.stdout.trim()))
            && coral_part.contains("phase \"done\""),
        "no container ran from the seeded image:\n{stdout}"
    );
    Ok(())
}
