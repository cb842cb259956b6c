//! coral's container images (`scripts/images`, umoci, from scratch) hold
//! what they claim and nothing else, and each binary runs in its image's
//! root file system alone: a chroot with no other file, as a container
//! from that image would see it. The builder builds a real seed volume in
//! there, from a registry it reaches by name (`/etc/hosts`, which kubelet
//! mounts into every container), with the tools and libraries its image
//! carries. Needs root (chroot, mount namespaces, loop devices).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, Result, ensure};
use coral_tests::cache::{FileLock, cache_dir, repo_root};
use coral_tests::fixtures::Corpus;
use coral_tests::process::run;

const TAG: &str = "test";

/// The three images, built once per test process by `scripts/images` in
/// the dev profile (scripts/test builds them before the tests and says so
/// with CORAL_IMAGES_BUILT, so no test waits on cargo).
fn images() -> Result<&'static Path> {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    if let Some(d) = DIR.get() {
        return Ok(d);
    }
    let dir = cache_dir().join("images-test");
    let built = std::env::var_os("CORAL_IMAGES_BUILT").is_some()
        && ["coral-controller", "coral-node", "coral-builder"]
            .iter()
            .all(|n| dir.join(n).join("index.json").exists());
    if !built {
        let _lock = FileLock::acquire(&cache_dir().join("locks/cargo-build"))?;
        run(Command::new(repo_root().join("scripts/images"))
            .args(["--profile", "dev", "--tag", TAG, "--out"])
            .arg(&dir))?;
    }
    Ok(DIR.get_or_init(|| dir))
}

/// `umoci unpack` of `name` (an independent reader of what scripts/images
/// wrote) into a fresh directory; its `rootfs` is the image's file system.
fn unpack(name: &str) -> Result<tempfile::TempDir> {
    let bundle = tempfile::Builder::new().prefix("coral-image-").tempdir()?;
    let target = bundle.path().join("b");
    run(Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:{TAG}", images()?.join(name).display()))
        .arg(&target))?;
    Ok(bundle)
}

/// Every regular file and symlink under `root`, relative.
fn files(root: &Path) -> Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let t = e.file_type()?;
            if t.is_dir() {
                stack.push(e.path());
            } else {
                out.insert(e.path().strip_prefix(root)?.display().to_string());
            }
        }
    }
    Ok(out)
}

/// Whether an ELF file asks for a program interpreter (PT_INTERP), i.e.
/// is dynamically linked.
fn has_interpreter(path: &Path) -> Result<bool> {
    let b = std::fs::read(path)?;
    ensure!(
        b.len() > 64 && &b[..4] == b"\x7fELF" && b[4] == 2,
        "{}: not ELF64",
        path.display()
    );
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(b[32..40].try_into()?) as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    Ok((0..phnum).any(|i| {
        let o = phoff + i * phentsize;
        u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]) == 3
    }))
}

/// Runs `argv` chrooted into `rootfs`, in a mount namespace of its own
/// (so the bind mounts `binds`, (host path, path in rootfs), vanish with
/// it), with an empty environment but PATH.
fn in_chroot(
    rootfs: &Path,
    binds: &[(&Path, &str)],
    argv: &[&str],
) -> Result<std::process::Output> {
    let mut script = String::from("set -e\n");
    for (host, inside) in binds {
        let target = rootfs.join(inside.trim_start_matches('/'));
        if host.is_dir() {
            std::fs::create_dir_all(&target)?;
        } else {
            std::fs::create_dir_all(target.parent().context("parent")?)?;
            std::fs::write(&target, b"")?;
        }
        script.push_str(&format!(
            "mount --rbind '{}' '{}'\n",
            host.display(),
            target.display()
        ));
    }
    script.push_str("exec chroot \"$0\" \"$@\"\n");
    Ok(Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .arg(rootfs)
        .args(argv)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/sbin:/usr/bin")
        .output()?)
}

fn out(o: &std::process::Output) -> String {
    format!(
        "{:?}\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn each_image_holds_static_binaries_and_certificates_and_nothing_else() -> Result<()> {
    let certs = "etc/ssl/certs/ca-certificates.crt";
    for (name, bins, entry, user) in [
        (
            "coral-controller",
            &["coral-controller"][..],
            "coral-controller",
            "65532:65532",
        ),
        (
            "coral-node",
            &["coral-controller", "coral-node-mounter"][..],
            "coral-node-mounter",
            "0:0",
        ),
        (
            "coral-builder",
            &["coral-builder"][..],
            "coral-builder",
            "0:0",
        ),
    ] {
        let bundle = unpack(name)?;
        let rootfs = bundle.path().join("b/rootfs");
        let have = files(&rootfs)?;
        let mut want: BTreeSet<String> =
            bins.iter().map(|b| format!("usr/local/bin/{b}")).collect();
        want.insert(certs.into());
        if name == "coral-builder" {
            // Its filesystem tools and exactly the libraries they load.
            let extra: Vec<&String> = have.difference(&want).collect();
            for tool in [
                "mke2fs",
                "debugfs",
                "e2fsck",
                "resize2fs",
                "mount",
                "umount",
                "blkid",
                "cp",
            ] {
                ensure!(
                    have.contains(&format!("usr/sbin/{tool}")),
                    "{name} lacks {tool}"
                );
            }
            ensure!(
                extra
                    .iter()
                    .all(|p| p.starts_with("usr/sbin/") || p.starts_with("lib")),
                "{name} holds more than its tools and libraries: {extra:?}"
            );
            ensure!(
                !have
                    .iter()
                    .any(|p| p.starts_with("bin/") || p.ends_with("/sh")),
                "{name} has a shell: {have:?}"
            );
        } else {
            ensure!(have == want, "{name} holds {have:?}, want {want:?}");
        }
        for b in bins {
            let path = rootfs.join("usr/local/bin").join(b);
            ensure!(
                !has_interpreter(&path)?,
                "{name}: {b} is dynamically linked"
            );
        }
        let ca = std::fs::read(rootfs.join(certs))?;
        ensure!(
            ca == std::fs::read(Path::new("/").join(certs))?,
            "{name}: not this machine's CA bundle"
        );
        // skopeo reads the layout too, and sees the entrypoint and user.
        let config: serde_json::Value = serde_json::from_str(&run(Command::new("skopeo")
            .args(["inspect", "--config"])
            .arg(format!("oci:{}:{TAG}", images()?.join(name).display())))?)?;
        ensure!(
            config["config"]["Entrypoint"]
                == serde_json::json!([format!("/usr/local/bin/{entry}")])
                && config["config"]["User"] == user
                && config["architecture"] == "amd64"
                && config["os"] == "linux",
            "{name}: config {config}"
        );
    }
    Ok(())
}

/// The controller and the node binaries run with nothing but their image:
/// the controller prints the CRD (as `deploy/` holds it) and the node
/// agent's and mounter's usage.
#[test]
fn the_controller_and_node_binaries_run_alone_in_their_images() -> Result<()> {
    let bundle = unpack("coral-controller")?;
    let rootfs = bundle.path().join("b/rootfs");
    let o = in_chroot(&rootfs, &[], &["/usr/local/bin/coral-controller", "crd"])?;
    ensure!(o.status.success(), "{}", out(&o));
    let crd = std::fs::read_to_string(repo_root().join("deploy/crd/imageseeds.coral.dev.yaml"))?;
    ensure!(
        String::from_utf8_lossy(&o.stdout) == crd,
        "the CRD differs: {}",
        out(&o)
    );

    let bundle = unpack("coral-node")?;
    let rootfs = bundle.path().join("b/rootfs");
    for argv in [
        &["/usr/local/bin/coral-node-mounter", "--version"][..],
        &["/usr/local/bin/coral-controller", "node-agent", "--help"][..],
    ] {
        let o = in_chroot(&rootfs, &[], argv)?;
        ensure!(
            o.status.success() && !o.stdout.is_empty(),
            "{argv:?}: {}",
            out(&o)
        );
    }
    // A node mounter that cannot reach containerd says so, cleanly.
    let o = in_chroot(
        &rootfs,
        &[],
        &[
            "/usr/local/bin/coral-node-mounter",
            "import",
            "--seed",
            "/nonexistent",
            "--deadline",
            "2s",
            "--address",
            "/run/none.sock",
        ],
    )?;
    ensure!(
        o.status.code().is_some_and(|c| c != 0 && c < 128),
        "{}",
        out(&o)
    );
    Ok(())
}

/// coral-builder, chrooted into its image with only /dev, /proc, a work
/// directory and kubelet's /etc/hosts, pulls from a registry it reaches by
/// name and writes a seed volume with the image's own mke2fs, debugfs and
/// e2fsck; the volume verifies on the host.
#[test]
fn the_builder_builds_a_volume_alone_in_its_image() -> Result<()> {
    let corpus = Corpus::get()?;
    let reg = corpus.plain_registry()?;
    let bundle = unpack("coral-builder")?;
    let rootfs = bundle.path().join("b/rootfs");
    let work = tempfile::Builder::new()
        .prefix("coral-image-work-")
        .tempdir()?;
    let hosts = work.path().join("hosts");
    std::fs::write(
        &hosts,
        "127.0.0.1 localhost\n127.0.0.1 registry.coral.test\n",
    )?;
    let host = format!("registry.coral.test:{}", reg.port());
    let image = format!("{host}/{}:latest", Corpus::repository("tiny"));
    let out_dir = work.path().join("out");
    std::fs::create_dir(&out_dir)?;
    let o = in_chroot(
        &rootfs,
        &[
            (Path::new("/dev"), "/dev"),
            (Path::new("/proc"), "/proc"),
            (&out_dir, "/work"),
            (&hosts, "/etc/hosts"),
        ],
        &[
            "/usr/local/bin/coral-builder",
            "build",
            "--image",
            &image,
            "--insecure-registry",
            &host,
            "--platform",
            "linux/amd64",
            "--output",
            "/work/seed.img",
            "--work-dir",
            "/work/build",
            "--snapshot",
            "file",
            "--json",
        ],
    )?;
    ensure!(o.status.success(), "{}", out(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).context("the report")?;
    ensure!(report["totals"]["images"] == 1, "{report}");
    let builder = coral_tests::workspace_bin("coral-builder")?;
    run(Command::new(&builder)
        .arg("verify")
        .arg(out_dir.join("seed.img")))?;
    let inspect = run(Command::new(&builder)
        .arg("inspect")
        .arg(out_dir.join("seed.img")))?;
    ensure!(inspect.contains(&image), "{inspect}");
    Ok(())
}
