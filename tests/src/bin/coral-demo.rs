//! `scripts/demo`: the story on one machine, on embedded defaults.
//!
//! It starts the test bed (a local registry serving the sample images), runs
//! `coral-builder build` into a local volume file, verifies and inspects it,
//! then times both paths on a fresh node, side by side: containerd pulling
//! and unpacking the images through CRI then starting a container (what
//! coral replaces), and coral-node-mounter mounting the volume over a fresh
//! containerd's root, adopting every image, then starting the same container.

use std::time::Instant;

use anyhow::{Context, Result};
use coral_tests::containerd::{self, Containerd};
use coral_tests::cri;
use coral_tests::fixtures::Corpus;
use coral_tests::process::run;

fn step(msg: &str) {
    println!("\n\x1b[1m==> {msg}\x1b[0m");
}

#[tokio::main]
async fn main() -> Result<()> {
    step("fixture corpus (built once without Docker, cached)");
    let corpus = Corpus::get()?;
    for i in &corpus.images {
        println!(
            "  {:<22} {}  {}",
            i.name,
            &i.digest[..19],
            i.platforms.join(",")
        );
    }

    step("local OCI registry (docker-registry on 127.0.0.1) serving the corpus");
    let reg = corpus.plain_registry()?;
    println!("  {} lists {:?}", reg.url(), reg.catalog().await?);

    step("coral-builder build: the sample images into a local seed volume file");
    let out_dir = coral_tests::cache::cache_dir().join("demo");
    std::fs::create_dir_all(&out_dir)?;
    let volume = out_dir.join("seed.img");
    let builder = coral_tests::workspace_bin("coral-builder")?;
    let mut cmd = std::process::Command::new(&builder);
    cmd.arg("build")
        .arg("--output")
        .arg(&volume)
        .args(["--json", "--platform", "linux/amd64"]);
    cmd.args(["--insecure-registry", &reg.host()]);
    for i in &corpus.images {
        cmd.arg("--image").arg(format!(
            "{}/{}:latest",
            reg.host(),
            Corpus::repository(&i.name)
        ));
    }
    let t = Instant::now();
    let report: serde_json::Value = serde_json::from_str(&run(&mut cmd)?)?;
    let build_time = t.elapsed();
    println!(
        "  wrote {} in {:.2?}: {} images, {} layer trees, {} MiB of blobs, {} MiB unpacked, manifest {}",
        volume.display(),
        build_time,
        report["totals"]["images"],
        report["totals"]["layers"],
        report["totals"]["blobBytes"].as_u64().unwrap_or(0) >> 20,
        report["totals"]["unpackedBytes"].as_u64().unwrap_or(0) >> 20,
        report["manifestDigest"].as_str().unwrap_or("?"),
    );
    println!("  phases: {}", report["phases"]);
    println!(
        "  snapshot ({}): {} -> {}",
        report["snapshot"]["kind"].as_str().unwrap_or("?"),
        report["snapshot"]["id"].as_str().unwrap_or("?"),
        coral_snapshot_record(&volume).display()
    );
    step("coral-builder verify: every blob and layer tree re-hashed");
    let t = Instant::now();
    run(std::process::Command::new(&builder)
        .arg("verify")
        .arg(&volume))?;
    println!("  intact ({:.2?})", t.elapsed());

    let build = containerd::first()?;
    step(&format!(
        "a fresh node: containerd {} with an empty private root",
        build.version
    ));
    let c = Containerd::start(&build, &[&reg]).await?;
    println!(
        "  containerd answers on {} (version {})",
        c.address().display(),
        c.version().await?
    );

    step("baseline: CRI pull of every runnable image, then start a container");
    let started = Instant::now();
    let mut images = cri::image_service(c.address()).await?;
    let mut rows = Vec::new();
    for image in corpus.images.iter().filter(|i| i.run.is_some()) {
        let reference = format!("{}/{}:latest", reg.host(), Corpus::repository(&image.name));
        let t = Instant::now();
        cri::pull(&mut images, &reference).await?;
        rows.push((image.name.clone(), t.elapsed()));
        println!("  pulled {reference} in {:.2?}", t.elapsed());
    }
    let minbase = corpus.image("minbase");
    let check = minbase.run.as_ref().context("minbase is runnable")?;
    let reference = format!("{}/{}:latest", reg.host(), Corpus::repository("minbase"));
    let out = run(c
        .ctr()
        .args(["--namespace", "k8s.io", "run", "--rm", &reference, "demo"])
        .args(&check.argv))?;
    let total = started.elapsed();
    println!("  container printed: {}", out.trim());
    drop(c);

    step(
        "coral: coral-node-mounter run (mount over a fresh containerd's root, adopt), then the same container",
    );
    let node_dir = tempfile::Builder::new()
        .prefix("coral-demo-node-")
        .tempdir()?;
    let node_img = node_dir.path().join("node.img");
    // The node gets its own copy: adopting moves files inside the volume.
    run(std::process::Command::new("cp")
        .arg("--sparse=always")
        .arg(&volume)
        .arg(&node_img))?;
    let root = node_dir.path().join("containerd-root");
    let status_file = node_dir.path().join("status.json");
    let ctrd_dir = tempfile::Builder::new().prefix("coral-ctrd-").tempdir()?;
    let address = ctrd_dir.path().join("containerd.sock");
    let started = Instant::now();
    let child = std::process::Command::new(coral_tests::workspace_bin("coral-node-mounter")?)
        .args(["run", "--deadline", "2m", "--device"])
        .arg(&node_img)
        .arg("--root")
        .arg(&root)
        .arg("--carry-dir")
        .arg(node_dir.path().join("carry"))
        .arg("--address")
        .arg(&address)
        .arg("--status-file")
        .arg(&status_file)
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let _unmount = coral_tests::seed::UnmountOnDrop(root.clone());
    // As systemd orders it: containerd starts once the volume is its root.
    while !root.join(".coral/manifest.json").exists() {
        anyhow::ensure!(
            started.elapsed().as_secs() < 60,
            "coral-node-mounter did not mount the volume"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let mounted = started.elapsed();
    let c = Containerd::start_with_root(&build, &[&reg], ctrd_dir, root.clone()).await?;
    let containerd_up = started.elapsed();
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.code() == Some(0),
        "coral-node-mounter run: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let imported = started.elapsed();
    for line in String::from_utf8_lossy(&out.stderr).lines() {
        println!("  {line}");
    }
    let status: serde_json::Value = serde_json::from_slice(&std::fs::read(&status_file)?)?;
    let import_seconds = status["images"][0]["seconds"].as_f64().unwrap_or(f64::NAN);
    let out = run(c
        .ctr()
        .args([
            "--namespace",
            "k8s.io",
            "run",
            "--rm",
            &reference,
            "demo-coral",
        ])
        .args(&check.argv))?;
    let coral_total = started.elapsed();
    let coral_after_containerd = coral_total - containerd_up;
    println!("  container printed: {}", out.trim());
    println!(
        "  status file {}: phase {}, {} images seeded",
        status_file.display(),
        status["phase"],
        status["images"].as_array().map(Vec::len).unwrap_or(0)
    );
    drop(c);

    step("timings (seconds)");
    let row = |what: &str, secs: f64| println!("  {what:<52} {secs:>8.2}");
    row(
        "coral-builder build (all images, once, off the node)",
        build_time.as_secs_f64(),
    );
    for (name, d) in &rows {
        row(
            &format!("node without coral: CRI pull {name}"),
            d.as_secs_f64(),
        );
    }
    row(
        "node without coral: pulls + first container",
        total.as_secs_f64(),
    );
    row("node with coral: mount the volume", mounted.as_secs_f64());
    row("node with coral: adopt every image", import_seconds);
    row(
        "node with coral: containerd up -> images ready",
        (imported - containerd_up).as_secs_f64(),
    );
    row(
        "node with coral: containerd up -> first container",
        coral_after_containerd.as_secs_f64(),
    );
    println!(
        "  {:<52} {:>7.1}x",
        "first container, coral vs CRI pulls",
        total.as_secs_f64() / coral_after_containerd.as_secs_f64()
    );
    Ok(())
}

/// Where the file snapshot backend put the volume's record.
fn coral_snapshot_record(volume: &std::path::Path) -> std::path::PathBuf {
    let mut name = volume.file_name().unwrap_or_default().to_os_string();
    name.push(".snapshot.json");
    volume.with_file_name(name)
}
