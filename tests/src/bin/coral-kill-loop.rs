//! `scripts/kill-loop`: kill -9 at seeded random moments, many times, then
//! check that what is left is either correct or clearly absent, never a
//! volume or an image that looks valid and is not.
//!
//! - `builder`: `coral-builder build` killed at a random moment of a build
//!   (up to 1.2x an uninterrupted build's time), again and again with the
//!   same work directory. After each kill the output is absent, or it
//!   verifies and is byte-identical to an uninterrupted build. A last run
//!   to completion must give exactly that volume.
//! - `import`: `coral-node-mounter import` (adopt) killed at a random
//!   moment; in half the rounds containerd itself is killed (SIGKILL) at
//!   another random moment and started again on the same root. A run to
//!   completion afterwards must exit 0 with every image complete in
//!   containerd (`ctr images check`) and a container running from the
//!   seeded minbase image printing what it should.
//!
//! Usage: coral-kill-loop [--seed N] [--iterations N] [--parts builder,import]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use coral_tests::containerd::{self, Containerd};
use coral_tests::fixtures::Corpus;
use coral_tests::process::run;
use coral_tests::registry::Registry;
use coral_tests::seed::{Mounted, sha256_file};
use coral_tests::workspace_bin;

const IMAGES: &[&str] = &["minbase", "layered", "tiny"];

/// xorshift64*: small, and the same sequence for the same seed everywhere.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// A duration in [0, max).
    fn below(&mut self, max: Duration) -> Duration {
        let ms = max.as_millis().max(1) as u64;
        Duration::from_millis(self.next() % ms)
    }
}

struct Args {
    seed: u64,
    iterations: u32,
    parts: Vec<String>,
}

fn args() -> Result<Args> {
    let mut a = Args {
        seed: 1,
        iterations: 20,
        parts: vec!["builder".into(), "import".into()],
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--seed" => a.seed = value()?.parse()?,
            "--iterations" => a.iterations = value()?.parse()?,
            "--parts" => a.parts = value()?.split(',').map(str::to_owned).collect(),
            "-h" | "--help" => {
                println!("coral-kill-loop [--seed N] [--iterations N] [--parts builder,import]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(a)
}

fn build_cmd(reg: &Registry, output: &Path, work: &Path) -> Result<Command> {
    let mut cmd = Command::new(workspace_bin("coral-builder")?);
    cmd.args(["build", "--progress", "none", "--platform", "linux/amd64"])
        .args(["--insecure-registry", &reg.host()])
        .arg("--output")
        .arg(output)
        .arg("--work-dir")
        .arg(work)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    for i in IMAGES {
        cmd.arg("--image")
            .arg(format!("{}/{}:latest", reg.host(), Corpus::repository(i)));
    }
    Ok(cmd)
}

/// Starts `cmd`, kills it with SIGKILL after `after` unless it ended first.
/// Returns whether it was killed.
fn kill_after(cmd: &mut Command, after: Duration) -> Result<bool> {
    let mut child = cmd.spawn()?;
    let deadline = Instant::now() + after;
    while Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let killed = child.try_wait()?.is_none();
    if killed {
        child.kill()?;
    }
    child.wait()?;
    Ok(killed)
}

fn builder_loop(reg: &Registry, rng: &mut Rng, iterations: u32, dir: &Path) -> Result<String> {
    let bin = workspace_bin("coral-builder")?;
    let reference = dir.join("reference.img");
    let t = Instant::now();
    run(&mut build_cmd(
        reg,
        &reference,
        &dir.join("reference-work"),
    )?)?;
    let full = t.elapsed();
    let want = sha256_file(&reference)?;
    let output = dir.join("seed.img");
    let work = dir.join("work");
    let (mut kills, mut complete) = (0, 0);
    for i in 0..iterations {
        let at = rng.below(full.mul_f64(1.2));
        if kill_after(&mut build_cmd(reg, &output, &work)?, at)? {
            kills += 1;
        }
        if output.exists() {
            run(Command::new(&bin).arg("verify").arg(&output))
                .with_context(|| format!("round {i}: an output that does not verify"))?;
            ensure!(
                sha256_file(&output)? == want,
                "round {i} (killed at {at:?}): an output that differs from an uninterrupted build"
            );
            complete += 1;
            std::fs::remove_file(&output)?;
        }
    }
    run(&mut build_cmd(reg, &output, &work)?).context("the build after the kills")?;
    ensure!(sha256_file(&output)? == want, "the final build differs");
    run(Command::new(&bin).arg("verify").arg(&output))?;
    Ok(format!(
        "builder: {iterations} rounds, {kills} killed before exiting, {complete} left a finished volume (each intact and identical); final volume identical (build {full:.2?})"
    ))
}

async fn import_loop(
    reg: &Registry,
    corpus: &Corpus,
    rng: &mut Rng,
    iterations: u32,
    dir: &Path,
) -> Result<String> {
    let volume = dir.join("volume.img");
    let mut cmd = build_cmd(reg, &volume, &dir.join("volume-work"))?;
    run(&mut cmd)?;
    let node = workspace_bin("coral-node-mounter")?;
    let build = containerd::first()?;
    let check = corpus
        .image("minbase")
        .run
        .clone()
        .context("minbase runs")?;
    let minbase = format!("{}/{}:latest", reg.host(), Corpus::repository("minbase"));
    let (mut import_kills, mut containerd_kills) = (0, 0);
    for i in 0..iterations {
        let image = dir.join("node.img");
        run(Command::new("cp")
            .arg("--sparse=always")
            .arg(&volume)
            .arg(&image))?;
        let vol = Mounted::read_write(&image)?;
        let state = tempfile::Builder::new().prefix("coral-ctrd-").tempdir()?;
        let mut c = Containerd::start_with_root(&build, &[reg], state, vol.0.clone()).await?;
        let mut import = Command::new(&node);
        import
            .args(["import", "--deadline", "60s", "--address"])
            .arg(c.address())
            .arg("--seed")
            .arg(&vol.0)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let kill_import = rng.below(Duration::from_millis(600));
        let kill_containerd = rng
            .next()
            .is_multiple_of(2)
            .then(|| rng.below(Duration::from_millis(600)));
        let mut child = import.spawn()?;
        let started = Instant::now();
        let mut containerd_done = kill_containerd.is_none();
        loop {
            if !containerd_done && started.elapsed() >= kill_containerd.unwrap_or_default() {
                c.restart().await?;
                containerd_kills += 1;
                containerd_done = true;
            }
            if child.try_wait()?.is_some() {
                break;
            }
            if started.elapsed() >= kill_import {
                child.kill()?;
                import_kills += 1;
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        child.wait()?;
        if !containerd_done {
            c.restart().await?;
            containerd_kills += 1;
        }
        let o = import.output()?;
        ensure!(
            o.status.success(),
            "round {i} (import killed at {kill_import:?}, containerd at {kill_containerd:?}): the re-run failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let out = run(c.ctr().args(["--namespace", "k8s.io", "images", "check"]))?;
        let listed = out.lines().skip(1).count();
        ensure!(
            listed >= IMAGES.len() && out.lines().skip(1).all(containerd::check_line_complete),
            "round {i}: ctr images check:\n{out}"
        );
        let printed = run(c
            .ctr()
            .args(["--namespace", "k8s.io", "run", "--rm", &minbase])
            .arg(coral_tests::container_id("kill-loop"))
            .args(&check.argv))?;
        ensure!(
            printed.trim() == check.stdout.trim(),
            "round {i}: minbase printed {printed:?}"
        );
        drop(c);
        drop(vol);
    }
    Ok(format!(
        "import: {iterations} rounds, {import_kills} imports and {containerd_kills} containerds killed; every re-run converged, images complete, minbase runs"
    ))
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = args()?;
    let corpus = Corpus::get()?;
    let reg = corpus.plain_registry()?;
    let dir = tempfile::Builder::new()
        .prefix("coral-kill-loop-")
        .tempdir()?;
    let mut rng = Rng::new(a.seed);
    println!(
        "coral-kill-loop: seed {}, {} iterations",
        a.seed, a.iterations
    );
    for part in &a.parts {
        let summary = match part.as_str() {
            "builder" => builder_loop(&reg, &mut rng, a.iterations, dir.path())?,
            "import" => import_loop(&reg, corpus, &mut rng, a.iterations, dir.path()).await?,
            other => bail!("unknown part {other} (builder, import)"),
        };
        println!("{summary}");
    }
    Ok(())
}
