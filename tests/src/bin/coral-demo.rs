//! `scripts/demo`: the story on one machine, on embedded defaults.
//!
//! It starts the test bed (a local registry serving the sample images), runs
//! `coral-builder build` into a local volume file, verifies and inspects it,
//! then times the path coral replaces on a fresh containerd: a node pulling
//! and unpacking the images through CRI, then starting a container. The node
//! side (coral-node-mounter adopting the volume) joins as it lands.

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
    step("coral-builder verify: every blob and layer tree re-hashed");
    let t = Instant::now();
    run(std::process::Command::new(&builder)
        .arg("verify")
        .arg(&volume))?;
    println!("  intact ({:.2?})", t.elapsed());

    let build = containerd::available()?
        .into_iter()
        .next()
        .context("no containerd installed")?;
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

    step("timings");
    println!("  {:<28} {:>10}", "step", "seconds");
    for (name, d) in &rows {
        println!(
            "  {:<28} {:>10.2}",
            format!("CRI pull {name}"),
            d.as_secs_f64()
        );
    }
    println!(
        "  {:<28} {:>10.2}",
        "pulls + first container",
        total.as_secs_f64()
    );
    println!(
        "  {:<28} {:>10.2}",
        "coral-builder build (all)",
        build_time.as_secs_f64()
    );
    println!(
        "\nNext on the node side (coral-node-mounter, in progress): adopt {} into containerd in seconds.",
        volume.display()
    );
    Ok(())
}
