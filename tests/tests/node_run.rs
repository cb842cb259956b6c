//! `coral-node-mounter run`, what user-data calls: it mounts the volume,
//! waits for containerd, and imports; with containerd already running it
//! cannot adopt, so it copies. Needs root; one containerd (the first
//! available) is enough, the import itself is tested against each.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use coral_tests::containerd::{self, Containerd};
use coral_tests::cri;
use coral_tests::fixtures::Corpus;
use coral_tests::seed::{UnmountOnDrop, build};
use coral_tests::workspace_bin;

fn is_mount_point(dir: &Path) -> Result<bool> {
    let dir = std::fs::canonicalize(dir)?;
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(info
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(dir.to_str().unwrap_or("?"))))
}

fn statuses(status_file: &Path) -> Result<serde_json::Value> {
    Ok(serde_json::from_slice(&std::fs::read(status_file)?)?)
}

#[tokio::test]
async fn run_mounts_the_volume_waits_for_containerd_and_adopts() -> Result<()> {
    let corpus = Corpus::get()?;
    let reg = corpus.plain_registry()?;
    let work = tempfile::Builder::new().prefix("coral-run-").tempdir()?;
    let image = work.path().join("seed.img");
    build(&reg, &["tiny", "layered"], &["linux/amd64"], &image, &[])?;
    let b = containerd::first()?;
    let root = work.path().join("root");
    let status_file = work.path().join("status.json");
    // containerd's directory (and so its socket) is known before it starts.
    let ctrd_dir = tempfile::Builder::new().prefix("coral-ctrd-").tempdir()?;
    let address = ctrd_dir.path().join("containerd.sock");

    let mut child = Command::new(workspace_bin("coral-node-mounter")?)
        .args(["run", "--prewarm", "--deadline", "60s", "--device"])
        .arg(&image)
        .arg("--root")
        .arg(&root)
        .arg("--carry-dir")
        .arg(work.path().join("carry"))
        .arg("--address")
        .arg(&address)
        .arg("--status-file")
        .arg(&status_file)
        .stderr(Stdio::piped())
        .spawn()?;
    let _unmount = UnmountOnDrop(root.clone());
    // As systemd would: containerd starts once the volume is its root.
    let started = Instant::now();
    while !root.join(".coral/manifest.json").exists() {
        ensure!(
            started.elapsed() < Duration::from_secs(30),
            "run did not mount the volume"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ensure!(
        is_mount_point(&root)?,
        "{} is not a mount point",
        root.display()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    ensure!(
        child.try_wait()?.is_none(),
        "run ended before containerd was up"
    );
    let c = Containerd::start_with_root(&b, &[&reg], ctrd_dir, root.clone()).await?;
    let out = child.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(0),
        "run: {:?}\n{stderr}",
        out.status
    );
    ensure!(stderr.contains("waiting for containerd"), "{stderr}");
    let status = statuses(&status_file)?;
    ensure!(status["phase"] == "done", "{status}");
    for i in status["images"].as_array().context("images")? {
        ensure!(i["state"] == "seeded", "{status}");
    }
    let tags = cri::tags(c.address()).await?;
    for name in ["tiny", "layered"] {
        let want = format!("{}/{}:latest", reg.host(), Corpus::repository(name));
        ensure!(tags.contains(&want), "CRI lists {tags:?}, not {want}");
    }
    // --prewarm read the adopted layer files in the background.
    let prewarm = work.path().join("prewarm.json");
    let waiting = Instant::now();
    while !prewarm.exists() {
        ensure!(
            waiting.elapsed() < Duration::from_secs(30),
            "no prewarm report at {}",
            prewarm.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&prewarm)?)?;
    ensure!(
        report["files"].as_u64().unwrap_or(0) > 100
            && report["bytes"].as_u64().unwrap_or(0) > 1 << 20
            && report.get("errors").is_none(),
        "prewarm: {report}"
    );
    // Adopted, not copied: the volume is containerd's root.
    ensure!(
        !root.join(".coral/layers").exists()
            || std::fs::read_dir(root.join(".coral/layers"))?
                .next()
                .is_none(),
        "layer trees are still on the volume: they were copied, not adopted"
    );
    Ok(())
}

#[tokio::test]
async fn run_with_containerd_already_running_copies_and_leaves_its_root_alone() -> Result<()> {
    let corpus = Corpus::get()?;
    let reg = corpus.plain_registry()?;
    let work = tempfile::Builder::new().prefix("coral-run-").tempdir()?;
    let image = work.path().join("seed.img");
    build(&reg, &["tiny"], &["linux/amd64"], &image, &[])?;
    let b = containerd::first()?;
    let c = Containerd::start(&b, &[&reg]).await?;
    // `mount` itself refuses to slide a volume under a running containerd.
    let refused = Command::new(workspace_bin("coral-node-mounter")?)
        .args(["mount", "--device"])
        .arg(&image)
        .arg("--target")
        .arg(c.root())
        .output()?;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    ensure!(
        refused.status.code() == Some(1) && stderr.contains("containerd is running"),
        "mount over a live root: {:?}\n{stderr}",
        refused.status
    );
    ensure!(
        !is_mount_point(c.root())?,
        "mount went ahead over a live root"
    );
    let copy_target = work.path().join("seed");
    let status_file = work.path().join("status.json");
    let out = Command::new(workspace_bin("coral-node-mounter")?)
        .args(["run", "--deadline", "60s", "--device"])
        .arg(&image)
        .arg("--root")
        .arg(c.root())
        .arg("--copy-target")
        .arg(&copy_target)
        .arg("--address")
        .arg(c.address())
        .arg("--status-file")
        .arg(&status_file)
        .output()?;
    let _unmount = UnmountOnDrop(copy_target.clone());
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(0),
        "run: {:?}\n{stderr}",
        out.status
    );
    ensure!(
        stderr.contains("already running") && stderr.contains("--mode copy"),
        "{stderr}"
    );
    ensure!(
        !is_mount_point(c.root())?,
        "run mounted over the root of a running containerd"
    );
    ensure!(
        is_mount_point(&copy_target)?,
        "the volume is not at the copy target"
    );
    let tiny = format!("{}/{}:latest", reg.host(), Corpus::repository("tiny"));
    let tags = cri::tags(c.address()).await?;
    ensure!(tags.contains(&tiny), "CRI lists {tags:?}");
    ensure!(statuses(&status_file)?["exitCode"] == 0, "{stderr}");
    Ok(())
}

/// The registry down: the volume's images are seeded, the image it lacks is
/// retried with backoff (shown in the status file) until the deadline ends
/// the run with exit 20.
#[tokio::test]
async fn import_with_the_registry_down_retries_until_its_deadline() -> Result<()> {
    let corpus = Corpus::get()?;
    let reg = corpus.plain_registry()?;
    let work = tempfile::Builder::new().prefix("coral-run-").tempdir()?;
    let image = work.path().join("seed.img");
    build(&reg, &["tiny"], &["linux/amd64"], &image, &[])?;
    let vol = coral_tests::seed::Mounted::new(&image)?;
    let b = containerd::first()?;
    let c = Containerd::start(&b, &[&reg]).await?;
    // A port nothing listens on: the registry is down.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let unreachable = format!("{dead}/coral/app:1");
    let status_file = work.path().join("status.json");
    let started = Instant::now();
    let out = Command::new(workspace_bin("coral-node-mounter")?)
        .args([
            "import",
            "--mode",
            "copy",
            "--fallback-pull",
            "--deadline",
            "3s",
        ])
        .args(["--initial-backoff", "200ms", "--max-failures", "100"])
        .args(["--image", &unreachable, "--seed"])
        .arg(&vol.0)
        .arg("--address")
        .arg(c.address())
        .arg("--status-file")
        .arg(&status_file)
        .output()?;
    let elapsed = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let status = statuses(&status_file)?;
    let ctx = || format!("{elapsed:?}, {:?}\n{stderr}\n{status:#}", out.status);
    ensure!(out.status.code() == Some(20), "{}", ctx());
    // It ends at the deadline, or earlier when no retry fits before it.
    ensure!(elapsed < Duration::from_secs(8), "{}", ctx());
    ensure!(status["phase"] == "failed", "{}", ctx());
    let images = status["images"].as_array().context("images")?;
    let of = |r: &str| images.iter().find(|i| i["reference"] == r).cloned();
    let tiny = format!("{}/{}:latest", reg.host(), Corpus::repository("tiny"));
    ensure!(
        of(&tiny).is_some_and(|i| i["state"] == "seeded"),
        "{}",
        ctx()
    );
    let app = of(&unreachable).context("the unreachable image is in the status")?;
    ensure!(
        app["state"] == "failed"
            && app["attempts"].as_u64().unwrap_or(0) >= 2
            && app["lastError"]
                .as_str()
                .is_some_and(|e| e.contains(&dead.to_string()) && e.contains("deadline")),
        "{}",
        ctx()
    );
    Ok(())
}
