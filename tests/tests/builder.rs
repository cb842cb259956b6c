//! coral-builder end to end, against the real registry, containerd, umoci and
//! skopeo. Needs root (loop mounts, overlay mounts, device nodes).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use coral_seed::{SeedLayout, SeedManifest};
use coral_tests::containerd::{self, Containerd};
use coral_tests::cri;
use coral_tests::fixtures::Corpus;
use coral_tests::process::run;
use coral_tests::registry::RegistryOptions;
use coral_tests::seed::{Mounted, build, sha256_file};
use coral_tests::treecmp::{self, Options};
use coral_tests::workspace_bin;

fn manifest(root: &Path) -> Result<SeedManifest> {
    let bytes = std::fs::read(SeedLayout::new(root).manifest())?;
    Ok(SeedManifest::from_json(&bytes)?)
}

/// An OCI layout holding one platform manifest of the volume (blobs shared
/// through a symlink), so umoci (which cannot pick from an index) can unpack it.
fn single_manifest_layout(
    volume: &Path,
    manifest_digest: &str,
    size: u64,
    into: &Path,
) -> Result<()> {
    std::fs::create_dir_all(into)?;
    std::fs::write(into.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
    std::os::unix::fs::symlink(volume.join(".coral/blobs"), into.join("blobs"))?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": size,
            "annotations": {"org.opencontainers.image.ref.name": "img"},
        }],
    });
    std::fs::write(into.join("index.json"), serde_json::to_vec(&index)?)?;
    Ok(())
}

fn layer_dirs(volume: &Path, img: &coral_seed::SeedImage) -> Vec<PathBuf> {
    let layout = SeedLayout::new(volume);
    img.layers
        .iter()
        .map(|l| layout.layer(&l.chain_id))
        .collect()
}

#[tokio::test]
async fn merged_layers_match_umoci_unpack_for_every_fixture_image_and_platform() -> Result<()> {
    let corpus = Corpus::get()?;
    let reg = corpus.plain_registry()?;
    let work = tempfile::Builder::new().prefix("coral-build-").tempdir()?;
    let amd = work.path().join("amd64.img");
    let arm = work.path().join("arm64.img");
    build(
        &reg,
        &[
            "minbase",
            "layered",
            "layered-uncompressed",
            "multiarch",
            "tiny",
        ],
        &["linux/amd64"],
        &amd,
        &[],
    )?;
    build(&reg, &["multiarch"], &["linux/arm64/v8"], &arm, &[])?;

    let mut compared = 0;
    for image in [&amd, &arm] {
        let vol = Mounted::new(image)?;
        let m = manifest(&vol.0)?;
        for img in &m.images {
            let what = format!("{} ({})", img.reference, img.platform);
            let umoci_layout = work
                .path()
                .join(format!("layout-{}", img.manifest_digest.hex()));
            let size = std::fs::metadata(SeedLayout::new(&vol.0).blob(&img.manifest_digest))?.len();
            single_manifest_layout(
                &vol.0,
                &img.manifest_digest.to_string(),
                size,
                &umoci_layout,
            )?;
            let bundle = work
                .path()
                .join(format!("umoci-{}", img.manifest_digest.hex()));
            run(Command::new("umoci")
                .args(["unpack", "--image"])
                .arg(format!("{}:img", umoci_layout.display()))
                .arg(&bundle))
            .with_context(|| format!("umoci unpack of {what}"))?;

            let view = work.path().join("view");
            let _g = treecmp::mount_view(&layer_dirs(&vol.0, img), &view)?;
            let opts = Options::default();
            let ours = treecmp::snapshot(&view, &opts)?;
            let theirs = treecmp::snapshot(&bundle.join("rootfs"), &opts)?;
            let diffs = treecmp::diff("coral", &ours, "umoci", &theirs);
            ensure!(
                diffs.is_empty(),
                "{what}: {} differences with umoci:\n{}",
                diffs.len(),
                diffs.join("\n")
            );
            ensure!(!ours.is_empty(), "{what}: the view is empty");
            compared += 1;
            drop(_g);
            std::fs::remove_dir_all(&bundle)?;
        }
    }
    // 5 images on amd64 (multiarch resolved to its amd64 manifest), 1 on arm64.
    ensure!(compared == 6, "compared {compared} images");
    Ok(())
}

#[tokio::test]
async fn zstd_and_uncompressed_layers_extract_to_the_same_trees_as_gzip() -> Result<()> {
    let corpus = Corpus::get()?;
    let reg = corpus.plain_registry()?;
    let work = tempfile::Builder::new().prefix("coral-build-").tempdir()?;
    let mut views = BTreeMap::new();
    for name in ["layered", "layered-zstd", "layered-uncompressed"] {
        let out = work.path().join(format!("{name}.img"));
        build(&reg, &[name], &["linux/amd64"], &out, &[])?;
        let vol = Mounted::new(&out)?;
        let m = manifest(&vol.0)?;
        let img = &m.images[0];
        let media: Vec<String> = img.layers.iter().map(|l| l.media_type.clone()).collect();
        let view = work.path().join(format!("view-{name}"));
        let g = treecmp::mount_view(&layer_dirs(&vol.0, img), &view)?;
        let opts = Options {
            dir_mtimes: true,
            ..Options::default()
        };
        views.insert(
            name,
            (
                treecmp::snapshot(&view, &opts)?,
                media,
                img.layers
                    .iter()
                    .map(|l| l.chain_id.clone())
                    .collect::<Vec<_>>(),
            ),
        );
        drop(g);
    }
    let (gzip, gzip_media, gzip_chains) = &views["layered"];
    ensure!(
        gzip_media.iter().all(|m| m.ends_with("gzip")),
        "{gzip_media:?}"
    );
    for other in ["layered-zstd", "layered-uncompressed"] {
        let (tree, media, chains) = &views[other];
        ensure!(
            media.iter().all(|m| if other.ends_with("zstd") {
                m.ends_with("zstd")
            } else {
                m.ends_with(".tar")
            }),
            "{other}: {media:?}"
        );
        ensure!(
            chains == gzip_chains,
            "{other}: chain IDs differ from gzip's"
        );
        let diffs = treecmp::diff("gzip", gzip, other, tree);
        ensure!(diffs.is_empty(), "{other}: {}", diffs.join("\n"));
    }
    Ok(())
}

/// containerd's own unpack of the same images, per chain ID: what a container
/// sees through containerd's snapshot equals what it sees through ours.
#[tokio::test]
async fn every_layer_view_matches_the_snapshot_containerd_unpacked() -> Result<()> {
    let corpus = Corpus::get()?;
    let reg = corpus.plain_registry()?;
    let work = tempfile::Builder::new().prefix("coral-build-").tempdir()?;
    let names = ["minbase", "layered", "layered-zstd", "multiarch", "tiny"];
    let out = work.path().join("seed.img");
    build(&reg, &names, &["linux/amd64"], &out, &[])?;
    let vol = Mounted::new(&out)?;
    let m = manifest(&vol.0)?;
    let builds = containerd::available()?;
    for b in &builds {
        let c = Containerd::start(b, &[&reg]).await?;
        let mut images = cri::image_service(c.address()).await?;
        let mut checked = 0;
        for img in &m.images {
            cri::pull(&mut images, &img.name.to_string()).await?;
            let dirs = layer_dirs(&vol.0, img);
            for (i, layer) in img.layers.iter().enumerate() {
                let theirs = c
                    .view(
                        &layer.chain_id.to_string(),
                        &work.path().join("containerd-view"),
                    )
                    .await?;
                let ours = treecmp::mount_view(&dirs[..=i], &work.path().join("coral-view"))?;
                let opts = Options {
                    dir_mtimes: true,
                    ..Options::default()
                };
                let result = treecmp::compare_dirs(
                    "coral",
                    ours.path(),
                    &format!("containerd {}", b.version),
                    theirs.path(),
                    &opts,
                );
                drop((ours, theirs));
                let diffs = result?;
                if !diffs.is_empty() {
                    bail!(
                        "{} layer {i} ({}): {} differences:\n{}",
                        img.reference,
                        layer.chain_id,
                        diffs.len(),
                        diffs.join("\n")
                    );
                }
                checked += 1;
            }
        }
        println!("containerd {}: {checked} layer views equal", b.version);
        ensure!(checked >= 8, "only {checked} layer views compared");
    }
    Ok(())
}

#[tokio::test]
async fn skopeo_and_umoci_read_the_volume_as_an_oci_layout() -> Result<()> {
    let corpus = Corpus::get()?;
    let reg = corpus.plain_registry()?;
    let work = tempfile::Builder::new().prefix("coral-build-").tempdir()?;
    let out = work.path().join("seed.img");
    build(&reg, &["layered", "multiarch"], &["linux/amd64"], &out, &[])?;
    let vol = Mounted::new(&out)?;
    let m = manifest(&vol.0)?;
    for img in &m.images {
        let text = run(Command::new("skopeo").arg("inspect").arg(format!(
            "oci:{}/.coral:{}",
            vol.0.display(),
            img.name
        )))
        .with_context(|| format!("skopeo inspect of {}", img.name))?;
        let v: serde_json::Value = serde_json::from_str(&text)?;
        let layers: Vec<String> = img.layers.iter().map(|l| l.digest.to_string()).collect();
        ensure!(
            v["Layers"] == serde_json::json!(layers),
            "skopeo sees layers {} for {}",
            v["Layers"],
            img.name
        );
    }
    let tags = run(Command::new("umoci")
        .args(["ls", "--layout"])
        .arg(vol.0.join(".coral")))?;
    for img in &m.images {
        ensure!(
            tags.lines().any(|t| t == img.name.to_string()),
            "umoci ls lists {tags:?}, not {}",
            img.name
        );
    }
    Ok(())
}

#[tokio::test]
async fn builds_from_a_tls_registry_with_basic_auth_using_a_docker_config() -> Result<()> {
    let corpus = Corpus::get()?;
    let reg = corpus.registry(RegistryOptions {
        tls: true,
        auth: Some(("coral".into(), "s3cret-pass".into())),
        ..Default::default()
    })?;
    let work = tempfile::Builder::new().prefix("coral-build-").tempdir()?;
    let out = work.path().join("seed.img");
    // Without credentials: a clear refusal naming the image.
    let err = build(&reg, &["tiny"], &["linux/amd64"], &out, &[]).unwrap_err();
    let msg = format!("{err:#}");
    ensure!(
        msg.contains("not authorized") && msg.contains("coral/tiny"),
        "{msg}"
    );
    ensure!(!out.exists(), "a failed build left {}", out.display());

    let (user, pass) = reg.credentials().expect("basic auth");
    let config = work.path().join("config.json");
    let auth = base64_encode(format!("{user}:{pass}").as_bytes());
    std::fs::write(
        &config,
        serde_json::to_vec(&serde_json::json!({"auths": {reg.host(): {"auth": auth}}}))?,
    )?;
    let report = build(
        &reg,
        &["tiny", "layered"],
        &["linux/amd64"],
        &out,
        &["--registry-config", config.to_str().unwrap()],
    )?;
    ensure!(
        report["images"].as_array().map(|a| a.len()) == Some(2),
        "{report}"
    );
    let text = serde_json::to_string(&report)?;
    ensure!(!text.contains(pass), "the report holds the password");
    let status = Command::new(workspace_bin("coral-builder")?)
        .arg("verify")
        .arg(&out)
        .status()?;
    ensure!(status.success(), "verify of a fresh build failed");
    // The same blobs and layer trees as from the plain registry.
    let plain = corpus.plain_registry()?;
    let plain_out = work.path().join("plain.img");
    build(
        &plain,
        &["tiny", "layered"],
        &["linux/amd64"],
        &plain_out,
        &[],
    )?;
    let (a, b) = (Mounted::new(&out)?, Mounted::new(&plain_out)?);
    let opts = Options {
        dir_mtimes: true,
        ..Options::default()
    };
    for dir in [".coral/blobs/sha256", ".coral/layers"] {
        let diffs = treecmp::diff(
            "tls+auth",
            &treecmp::snapshot(&a.0.join(dir), &opts)?,
            "plain",
            &treecmp::snapshot(&b.0.join(dir), &opts)?,
        );
        ensure!(diffs.is_empty(), "{dir}: {}", diffs.join("\n"));
    }
    Ok(())
}

fn base64_encode(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= c.len() {
                s.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

#[tokio::test]
async fn the_same_seed_set_built_twice_gives_identical_ext4_images() -> Result<()> {
    let corpus = Corpus::get()?;
    let reg = corpus.plain_registry()?;
    let work = tempfile::Builder::new().prefix("coral-build-").tempdir()?;
    let names = ["layered", "tiny", "multiarch"];
    let one = work.path().join("one/seed.img");
    let two = work.path().join("two/seed.img");
    std::fs::create_dir_all(one.parent().unwrap())?;
    std::fs::create_dir_all(two.parent().unwrap())?;
    let r1 = build(&reg, &names, &["linux/amd64"], &one, &[])?;
    // Another order of --image flags, another time, another directory.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let reversed: Vec<&str> = names.iter().rev().copied().collect();
    let r2 = build(&reg, &reversed, &["linux/amd64"], &two, &[])?;
    ensure!(
        r1["manifestDigest"] == r2["manifestDigest"],
        "manifests differ: {} vs {}",
        r1["manifestDigest"],
        r2["manifestDigest"]
    );
    let (h1, h2) = (sha256_file(&one)?, sha256_file(&two)?);
    ensure!(h1 == h2, "image files differ: {h1} vs {h2}");
    // Same image, same file snapshot ID.
    ensure!(
        r1["snapshot"]["id"] == r2["snapshot"]["id"]
            && r1["snapshot"]["id"] == format!("sha256:{h1}").as_str(),
        "snapshot records: {} vs {}",
        r1["snapshot"],
        r2["snapshot"]
    );
    // The work directories are gone after a successful build: the image,
    // its snapshot record and its block map are all that is left.
    for d in [one.parent().unwrap(), two.parent().unwrap()] {
        let mut left: Vec<_> = std::fs::read_dir(d)?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        ensure!(
            left == ["seed.img", "seed.img.blocks", "seed.img.snapshot.json"],
            "left behind in {}: {left:?}",
            d.display()
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_build_killed_at_any_point_resumes_to_the_same_image() -> Result<()> {
    let corpus = Corpus::get()?;
    let reg = corpus.plain_registry()?;
    let work = tempfile::Builder::new().prefix("coral-build-").tempdir()?;
    let names = ["minbase", "layered", "layered-zstd", "tiny"];
    let reference = work.path().join("reference.img");
    build(&reg, &names, &["linux/amd64"], &reference, &[])?;
    let want = sha256_file(&reference)?;

    let out = work.path().join("killed/seed.img");
    std::fs::create_dir_all(out.parent().unwrap())?;
    let mut cmd = Command::new(workspace_bin("coral-builder")?);
    cmd.arg("build").arg("--output").arg(&out).args([
        "--progress",
        "none",
        "--insecure-registry",
        &reg.host(),
    ]);
    for i in names {
        cmd.arg("--image")
            .arg(format!("{}/{}:latest", reg.host(), Corpus::repository(i)));
    }
    cmd.args(["--platform", "linux/amd64"]);
    let mut kills = 0;
    // Kill points spread over the whole build: resolving, pulling, extracting, writing.
    for ms in [50u64, 200, 400, 700, 1000, 1500, 2200, 3000] {
        let mut child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        if child.try_wait()?.is_none() {
            child.kill()?;
            kills += 1;
        }
        child.wait()?;
        // Never a half-written output: none, or a complete one.
        if out.exists() {
            ensure!(
                sha256_file(&out)? == want,
                "after a kill at {ms} ms the output is not the finished image"
            );
            std::fs::remove_file(&out)?;
        }
        // Unmounted leftovers would make the next run fail; make sure none remain.
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
        ensure!(
            !mounts.contains(work.path().to_str().unwrap()),
            "a killed build left a mount:\n{mounts}"
        );
    }
    ensure!(
        kills >= 3,
        "the build finished before most kill points ({kills} kills): make it bigger"
    );
    let status = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .status()?;
    ensure!(status.success(), "the resumed build failed");
    ensure!(
        sha256_file(&out)? == want,
        "the resumed build differs from an uninterrupted one"
    );
    Ok(())
}

#[tokio::test]
async fn verify_finds_a_changed_blob_and_a_changed_layer_file_and_inspect_prints_the_manifest()
-> Result<()> {
    let corpus = Corpus::get()?;
    let reg = corpus.plain_registry()?;
    let work = tempfile::Builder::new().prefix("coral-build-").tempdir()?;
    let out = work.path().join("seed.img");
    let report_file = work.path().join("report.json");
    let seed_file = work.path().join("seed.yaml");
    std::fs::write(
        &seed_file,
        format!(
            "images:\n  - {host}/coral/tiny:latest\n  - {host}/coral/layered:latest\nplatforms: [linux/amd64]\noptions:\n  insecureRegistries: [\"{host}\"]\n  label: coral-test\n",
            host = reg.host()
        ),
    )?;
    let bin = workspace_bin("coral-builder")?;
    run(Command::new(&bin)
        .args(["build", "--progress", "json", "--seed"])
        .arg(&seed_file)
        .arg("--output")
        .arg(&out)
        .arg("--report")
        .arg(&report_file))?;
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&report_file)?)?;
    ensure!(
        report["images"].as_array().map(|a| a.len()) == Some(2),
        "{report}"
    );
    ensure!(report["bytesPulled"].as_u64() > Some(1000), "{report}");
    ensure!(report["filesystem"]["label"] == "coral-test", "{report}");
    let label = run(Command::new("blkid")
        .args(["-s", "LABEL", "-o", "value"])
        .arg(&out))?;
    ensure!(label.trim() == "coral-test", "label {label:?}");

    // inspect prints the seed manifest, whose digest the report names.
    let printed = run(Command::new(&bin).arg("inspect").arg(&out))?;
    let m = SeedManifest::from_json(printed.as_bytes())?;
    ensure!(
        m.digest().to_string() == report["manifestDigest"],
        "inspect shows another manifest"
    );
    ensure!(
        Command::new(&bin)
            .arg("verify")
            .arg(&out)
            .status()?
            .success(),
        "a fresh volume does not verify"
    );

    // Damage a copy, mounted read-write: one blob byte, then one layer file.
    let layered = m
        .images
        .iter()
        .find(|i| i.reference.contains("layered"))
        .context("layered")?;
    let blob_hex = layered.layers[1].digest.hex().to_string();
    let chain_hex = layered.layers[2].chain_id.hex().to_string();
    for (what, needle) in [("blob", blob_hex.clone()), ("layer", chain_hex.clone())] {
        let copy = work.path().join(format!("damaged-{what}.img"));
        std::fs::copy(&out, &copy)?;
        let mnt = work.path().join(format!("mnt-{what}"));
        std::fs::create_dir_all(&mnt)?;
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&copy)
            .arg(&mnt))?;
        let damage = (|| -> Result<()> {
            if what == "blob" {
                let p = mnt.join(".coral/blobs/sha256").join(&blob_hex);
                let mut b = std::fs::read(&p)?;
                b[10] ^= 1;
                std::fs::write(&p, b)?;
            } else {
                let dir = mnt.join(".coral/layers").join(&chain_hex);
                let file = walk_first_file(&dir)?.context("a file in the layer")?;
                std::fs::write(&file, b"changed")?;
            }
            Ok(())
        })();
        run(Command::new("umount").arg("-d").arg(&mnt))?;
        damage?;
        let o = Command::new(&bin)
            .args(["verify", "--json"])
            .arg(&copy)
            .output()?;
        ensure!(
            !o.status.success(),
            "verify passed a volume with a changed {what}"
        );
        let r: serde_json::Value = serde_json::from_slice(&o.stdout)?;
        let problems = r["problems"].to_string();
        ensure!(
            r["intact"] == false && problems.contains(&needle),
            "{what}: {problems}"
        );
    }
    Ok(())
}

fn walk_first_file(dir: &Path) -> Result<Option<PathBuf>> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for p in entries {
        let m = std::fs::symlink_metadata(&p)?;
        if m.is_file() && m.len() > 0 {
            return Ok(Some(p));
        }
        if m.is_dir()
            && let Some(f) = walk_first_file(&p)?
        {
            return Ok(Some(f));
        }
    }
    Ok(None)
}

#[tokio::test]
async fn an_xfs_volume_builds_verifies_and_holds_the_same_trees() -> Result<()> {
    let corpus = Corpus::get()?;
    let reg = corpus.plain_registry()?;
    let work = tempfile::Builder::new().prefix("coral-build-").tempdir()?;
    let ext4 = work.path().join("seed-ext4.img");
    let xfs = work.path().join("seed-xfs.img");
    build(&reg, &["layered"], &["linux/amd64"], &ext4, &[])?;
    build(&reg, &["layered"], &["linux/amd64"], &xfs, &["--fs", "xfs"])?;
    let fstype = run(Command::new("blkid")
        .args(["-s", "TYPE", "-o", "value"])
        .arg(&xfs))?;
    ensure!(fstype.trim() == "xfs", "{fstype}");
    ensure!(
        Command::new(workspace_bin("coral-builder")?)
            .arg("verify")
            .arg(&xfs)
            .status()?
            .success()
    );
    let (a, b) = (Mounted::new(&ext4)?, Mounted::new(&xfs)?);
    let opts = Options {
        dir_mtimes: true,
        root_metadata: true,
        ..Options::default()
    };
    let diffs = treecmp::diff(
        "ext4",
        &treecmp::snapshot(&a.0.join(".coral/layers"), &opts)?,
        "xfs",
        &treecmp::snapshot(&b.0.join(".coral/layers"), &opts)?,
    );
    ensure!(diffs.is_empty(), "{}", diffs.join("\n"));
    Ok(())
}
