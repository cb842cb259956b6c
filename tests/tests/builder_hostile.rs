//! Hostile and broken images: each fails the build with a clear error, and
//! nothing is written outside the work directory, and no output is left.
//! Needs root (the builder extracts as root).

use std::path::Path;
use std::process::Command;

use anyhow::{Result, ensure};
use coral_tests::push::{self, Layer};
use coral_tests::registry::{Registry, RegistryOptions};
use coral_tests::workspace_bin;
use tar::{Builder, EntryType, Header};

fn header(kind: EntryType, size: u64) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_size(size);
    h.set_mtime(1_700_000_000);
    h.set_uid(0);
    h.set_gid(0);
    h
}

/// A tar with raw names (the tar crate refuses `..` and absolute paths when
/// asked nicely, so names are written straight into the header).
fn tar_of(entries: &[(&str, EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
    let mut b = Builder::new(Vec::new());
    for (name, kind, data, link) in entries {
        let mut h = header(*kind, data.len() as u64);
        {
            let gnu = h.as_gnu_mut().expect("gnu header");
            gnu.name[..name.len()].copy_from_slice(name.as_bytes());
            if let Some(l) = link {
                gnu.linkname[..l.len()].copy_from_slice(l.as_bytes());
            }
        }
        h.set_cksum();
        b.append(&h, *data).expect("in memory");
    }
    b.into_inner().expect("in memory")
}

struct Outcome {
    ok: bool,
    stderr: String,
}

fn build(reg: &Registry, repo: &str, dir: &Path, extra: &[&str]) -> Result<Outcome> {
    let out = Command::new(workspace_bin("coral-builder")?)
        .arg("build")
        .args(["--image", &format!("{}/{repo}:1", reg.host())])
        .args(["--insecure-registry", &reg.host()])
        .args([
            "--platform",
            "linux/amd64",
            "--progress",
            "none",
            "--retries",
            "1",
        ])
        .arg("--output")
        .arg(dir.join("seed.img"))
        .arg("--work-dir")
        .arg(dir.join("work"))
        .args(extra)
        .output()?;
    Ok(Outcome {
        ok: out.status.success(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Fails, names what it must, and leaves no output image behind.
fn expect_failure(reg: &Registry, repo: &str, extra: &[&str], needles: &[&str]) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("coral-hostile-")
        .tempdir()?;
    let o = build(reg, repo, dir.path(), extra)?;
    ensure!(!o.ok, "{repo}: the build succeeded");
    for n in needles {
        ensure!(
            o.stderr.contains(n),
            "{repo}: error does not mention {n:?}:\n{}",
            o.stderr
        );
    }
    ensure!(
        !dir.path().join("seed.img").exists(),
        "{repo}: an output image was left"
    );
    // Nothing landed beside the work directory (escapes would go up).
    let names: Vec<String> = std::fs::read_dir(dir.path())?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    ensure!(names.iter().all(|n| n == "work"), "{repo}: left {names:?}");
    Ok(())
}

#[tokio::test]
async fn hostile_layers_fail_with_a_clear_error_and_write_nothing_outside() -> Result<()> {
    let reg = Registry::start(RegistryOptions::default())?;
    let sentinel = "coral-hostile-sentinel";
    let cases: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
        (
            "dotdot",
            tar_of(&[(
                "a/../../../../tmp/coral-hostile-sentinel",
                EntryType::Regular,
                b"x",
                None,
            )]),
            vec!["dotdot:1", "../"],
        ),
        (
            "absolute",
            tar_of(&[(
                "/tmp/coral-hostile-sentinel",
                EntryType::Regular,
                b"x",
                None,
            )]),
            vec!["absolute:1", "/tmp/coral-hostile-sentinel"],
        ),
        (
            "symlink-escape",
            tar_of(&[
                ("up", EntryType::Symlink, b"", Some("/tmp")),
                ("up/coral-hostile-sentinel", EntryType::Regular, b"x", None),
            ]),
            vec!["symlink-escape:1", "up/coral-hostile-sentinel"],
        ),
        (
            "hardlink-escape",
            tar_of(&[(
                "passwd",
                EntryType::Link,
                b"",
                Some("../../../../etc/passwd"),
            )]),
            vec!["hardlink-escape:1", "passwd"],
        ),
    ];
    for (repo, tar, needles) in &cases {
        push::push_image(&reg, repo, "1", &[Layer::gzip(tar)]).await?;
        expect_failure(&reg, repo, &[], needles)?;
        ensure!(
            !Path::new("/tmp").join(sentinel).exists(),
            "{repo}: escaped to /tmp"
        );
    }

    // A decompression bomb: 256 MiB of zeros in a few hundred KiB of gzip.
    let zeros = vec![0u8; 256 << 20];
    let bomb = tar_of(&[("bomb", EntryType::Regular, &zeros, None)]);
    drop(zeros);
    push::push_image(&reg, "bomb", "1", &[Layer::gzip(&bomb)]).await?;
    expect_failure(
        &reg,
        "bomb",
        &["--max-unpacked", "16MiB"],
        &["bomb:1", "16777216"],
    )?;

    // A config that lies about the diff ID.
    let honest = tar_of(&[("file", EntryType::Regular, b"content", None)]);
    let mut lying = Layer::gzip(&honest);
    lying.diff_id = push::sha256(b"something else");
    push::push_image(&reg, "bad-diff-id", "1", &[lying]).await?;
    expect_failure(&reg, "bad-diff-id", &[], &["bad-diff-id:1", "diff ID"])?;

    // Blobs damaged in the registry's storage, behind its back: one with
    // other bytes of the same length, one cut short.
    let tar = tar_of(&[("f", EntryType::Regular, &[7u8; 100_000], None)]);
    let layer = Layer::gzip(&tar);
    let digest = push::sha256(&layer.blob);
    push::push_image(&reg, "corrupt", "1", &[layer]).await?;
    let data = push::blob_data_path(&reg, &digest);
    let mut bytes = std::fs::read(&data)?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&data, &bytes)?;
    expect_failure(
        &reg,
        "corrupt",
        &[],
        &["corrupt", "digest mismatch", &digest],
    )?;

    let tar = tar_of(&[("g", EntryType::Regular, &[9u8; 100_000], None)]);
    let layer = Layer::gzip(&tar);
    let digest = push::sha256(&layer.blob);
    push::push_image(&reg, "truncated", "1", &[layer]).await?;
    let data = push::blob_data_path(&reg, &digest);
    let bytes = std::fs::read(&data)?;
    std::fs::write(&data, &bytes[..bytes.len() / 2])?;
    expect_failure(&reg, "truncated", &[], &["truncated", &digest])?;
    Ok(())
}

#[tokio::test]
async fn bad_references_and_missing_images_are_named() -> Result<()> {
    let reg = Registry::start(RegistryOptions::default())?;
    let dir = tempfile::tempdir()?;
    let run = |image: &str| -> Result<String> {
        let out = Command::new(workspace_bin("coral-builder")?)
            .args([
                "build",
                "--progress",
                "none",
                "--retries",
                "0",
                "--image",
                image,
            ])
            .args(["--insecure-registry", &reg.host()])
            .arg("--output")
            .arg(dir.path().join("x.img"))
            .output()?;
        ensure!(!out.status.success(), "{image}: succeeded");
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let e = run("Uppercase/Image")?;
    ensure!(e.contains("Uppercase/Image"), "{e}");
    let e = run(&format!("{}/nothing/here:1", reg.host()))?;
    ensure!(e.contains("nothing/here") && e.contains("refused"), "{e}");
    ensure!(!dir.path().join("x.img").exists());
    Ok(())
}
