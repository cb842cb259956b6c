//! `coral-node-mounter mount` over a containerd root that the machine image
//! pre-populated (as EKS images pre-cache the pause image): what was there
//! is carried onto the volume, so after the import the node has both its
//! pre-cached images and the seeded ones, and nothing underneath is lost.
//! Needs root; runs against each containerd.

use std::process::Command;

use anyhow::{Context, Result, ensure};
use coral_tests::containerd::{self, Containerd};
use coral_tests::cri;
use coral_tests::fixtures::Corpus;
use coral_tests::process::run;
use coral_tests::seed::{UnmountOnDrop, build, sha256_file};
use coral_tests::workspace_bin;

#[tokio::test]
async fn images_the_machine_image_cached_survive_mounting_the_volume_over_the_root() -> Result<()> {
    let corpus = Corpus::get()?;
    let reg = corpus.plain_registry()?;
    let work = tempfile::Builder::new().prefix("coral-carry-").tempdir()?;
    // As on a systemd host, where mounts are shared: a bind of the root
    // would propagate the volume's mount (the mistake this guards against).
    run(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=3g", "coral-carry"])
        .arg(work.path()))?;
    let _tmpfs = UnmountOnDrop(work.path().to_path_buf());
    run(Command::new("mount").arg("--make-shared").arg(work.path()))?;
    let built = work.path().join("seed.img");
    // Room for what is carried over (a node's volume is larger than its seed).
    build(
        &reg,
        &["layered"],
        &["linux/amd64"],
        &built,
        &["--size", "512M"],
    )?;
    let node = workspace_bin("coral-node-mounter")?;
    // minbase stands for the pause image; layered, seeded, shares its layer.
    let cached = format!("{}/{}:latest", reg.host(), Corpus::repository("minbase"));
    let seeded = format!("{}/{}:latest", reg.host(), Corpus::repository("layered"));

    for b in &containerd::available()? {
        // The machine image: containerd's root with one image pulled into it.
        let root = work.path().join(format!("root-{}", b.version));
        let ami = Containerd::start_with_root(
            b,
            &[&reg],
            tempfile::Builder::new().prefix("coral-ctrd-").tempdir()?,
            root.clone(),
        )
        .await?;
        cri::pull(&mut cri::image_service(ami.address()).await?, &cached).await?;
        drop(ami);
        let meta = root.join("io.containerd.metadata.v1.bolt/meta.db");
        let meta_before = sha256_file(&meta)?;

        // Boot: the volume over the root, containerd, the import.
        let image = work.path().join(format!("node-{}.img", b.version));
        std::fs::copy(&built, &image)?;
        let carry_dir = work.path().join(format!("carry-{}", b.version));
        let _carry_bind = UnmountOnDrop(carry_dir.clone());
        let mount = |carry_dir: &std::path::Path| -> Result<serde_json::Value> {
            let out = run(Command::new(&node)
                .args(["mount", "--json", "--device"])
                .arg(&image)
                .arg("--target")
                .arg(&root)
                .arg("--carry-dir")
                .arg(carry_dir))?;
            Ok(serde_json::from_str(&out)?)
        };
        let mounted = mount(&carry_dir)?;
        let _unmount = UnmountOnDrop(root.clone());
        let carried: Vec<&str> = mounted["carriedOver"]
            .as_array()
            .context("carriedOver")?
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        ensure!(
            carried.contains(&"io.containerd.metadata.v1.bolt")
                && carried.contains(&"io.containerd.content.v1.content"),
            "containerd {}: carried over {carried:?}",
            b.version
        );
        ensure!(
            std::fs::read_dir(&carry_dir)?.next().is_none(),
            "the staging mount point was left in {}",
            carry_dir.display()
        );
        ensure!(
            root.join(".coral/manifest.json").exists()
                && root.join("io.containerd.metadata.v1.bolt/meta.db").exists(),
            "containerd {}: the volume with the carried state is not at {}",
            b.version,
            root.display()
        );
        // A second mount finds the volume there and carries nothing.
        let again = mount(&carry_dir)?;
        ensure!(
            again["alreadyMounted"] == true && again.get("carriedOver").is_none(),
            "second mount: {again}"
        );

        let c = Containerd::start_with_root(
            b,
            &[&reg],
            tempfile::Builder::new().prefix("coral-ctrd-").tempdir()?,
            root.clone(),
        )
        .await?;
        run(Command::new(&node)
            .args(["import", "--address"])
            .arg(c.address())
            .arg("--seed")
            .arg(&root))
        .with_context(|| format!("import; log:\n{}", c.log_tail()))?;
        let tags = cri::tags(c.address()).await?;
        ensure!(
            tags.contains(&cached) && tags.contains(&seeded),
            "containerd {}: CRI lists {tags:?}, expected both {cached} (cached by the machine \
             image) and {seeded} (seeded)",
            b.version
        );
        let out = run(c.ctr().args(["-n", "k8s.io", "images", "check"]))?;
        ensure!(
            out.lines()
                .skip(1)
                .all(coral_tests::containerd::check_line_complete),
            "containerd {}: {out}",
            b.version
        );
        let check = corpus
            .image("minbase")
            .run
            .as_ref()
            .context("minbase runs")?;
        let printed = run(c
            .ctr()
            .args(["-n", "k8s.io", "run", "--rm", &cached])
            .arg(coral_tests::container_id("carried"))
            .args(&check.argv))?;
        ensure!(printed == check.stdout, "{cached} printed {printed:?}");
        drop(c);

        // Underneath, the machine image's root is as it was.
        drop(_unmount);
        ensure!(
            sha256_file(&meta)? == meta_before,
            "containerd {}: the machine image's metadata changed under the volume",
            b.version
        );
    }
    Ok(())
}
