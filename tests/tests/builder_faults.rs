//! Retries, proven: the builder talks to the registry through a proxy that
//! resets connections, answers 5xx, stalls and cuts bodies short. With
//! bounded faults the build completes and gives the same image as a clean
//! build; with endless faults it fails with a clear message. Needs root.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use coral_tests::faultproxy::{Fault, FaultPlan, FaultProxy, When};
use coral_tests::fixtures::Corpus;
use coral_tests::seed::build;
use coral_tests::workspace_bin;
use std::sync::atomic::Ordering;

#[tokio::test]
async fn the_proxy_passes_bytes_unchanged_and_each_fault_is_what_it_says() -> Result<()> {
    let corpus = Corpus::get()?;
    let reg = corpus.plain_registry()?;
    let tiny = corpus.image("tiny");
    let proxy = FaultProxy::start(&reg.host(), FaultPlan::none())?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let url = format!("http://{}/v2/coral/tiny/manifests/latest", proxy.host());
    let accept =
        "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json";
    let get = || client.get(&url).header("accept", accept).send();

    let body = get().await?.error_for_status()?.bytes().await?;
    let digest = format!(
        "sha256:{}",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&body))
    );
    ensure!(
        digest == tiny.digest,
        "through the proxy the manifest hashes to {digest}, not {}",
        tiny.digest
    );

    proxy.set_plan(FaultPlan::none().with(None, Fault::Reset, When::FirstN(1)));
    let e = get().await.expect_err("a reset");
    ensure!(
        e.is_connect() || e.is_request() || e.to_string().contains("connection"),
        "{e:?}"
    );
    ensure!(get().await?.status() == 200, "the second request passes");

    proxy.set_plan(FaultPlan::none().with(None, Fault::Status(503), When::Always));
    ensure!(get().await?.status() == 503);

    proxy.set_plan(FaultPlan::none().with(
        None,
        Fault::Stall(Duration::from_secs(5)),
        When::Always,
    ));
    ensure!(get().await.expect_err("a stall").is_timeout());

    proxy.set_plan(FaultPlan::none().with(None, Fault::Truncate(0.5), When::Always));
    let resp = get().await?;
    ensure!(resp.content_length() == Some(body.len() as u64));
    ensure!(
        resp.bytes().await.is_err(),
        "a truncated body reads as an error"
    );

    proxy.set_plan(FaultPlan::none().with(
        Some("/manifests/"),
        Fault::Status(500),
        When::EveryKth(2),
    ));
    let statuses: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(get().await?.status().as_u16());
        }
        v
    };
    ensure!(statuses == [200, 500, 200, 500], "{statuses:?}");
    let c = &proxy.counters;
    ensure!(
        c.resets.load(Ordering::Relaxed) == 1 && c.truncations.load(Ordering::Relaxed) == 1,
        "{c:?}"
    );
    ensure!(
        c.statuses.load(Ordering::Relaxed) == 3 && c.stalls.load(Ordering::Relaxed) == 1,
        "{c:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_build_through_resets_500s_stalls_and_short_bodies_completes_identically() -> Result<()> {
    let corpus = Corpus::get()?;
    let reg = corpus.plain_registry()?;
    let work = tempfile::Builder::new().prefix("coral-faults-").tempdir()?;
    let names = ["minbase", "layered", "tiny"];
    let clean = work.path().join("clean.img");
    build(&reg, &names, &["linux/amd64"], &clean, &[])?;

    let plan = FaultPlan::none()
        .with(Some("/manifests/"), Fault::Status(500), When::FirstN(2))
        .with(Some("/blobs/"), Fault::Reset, When::FirstN(2))
        .with(Some("/blobs/"), Fault::Truncate(0.4), When::EveryKth(3))
        .with(
            Some("/blobs/"),
            Fault::StallMidBody(Duration::from_secs(30)),
            When::EveryKth(5),
        )
        .with(None, Fault::Status(503), When::Probability(0.1, 42));
    let proxy = FaultProxy::start(&reg.host(), plan)?;
    let out = work.path().join("faulty.img");
    let mut cmd = Command::new(workspace_bin("coral-builder")?);
    cmd.args([
        "build",
        "--progress",
        "none",
        "--json",
        "--platform",
        "linux/amd64",
    ])
    .args([
        "--insecure-registry",
        &proxy.host(),
        "--read-timeout",
        "2s",
        "--retries",
        "8",
    ])
    .arg("--output")
    .arg(&out);
    for n in names {
        cmd.arg("--image")
            .arg(format!("{}/{}:latest", proxy.host(), Corpus::repository(n)));
    }
    let o = cmd.output()?;
    let stderr = String::from_utf8_lossy(&o.stderr);
    ensure!(
        o.status.success(),
        "the build failed through the proxy:\n{stderr}"
    );
    ensure!(
        proxy.counters.faults() >= 5,
        "only {} faults were injected",
        proxy.counters.faults()
    );
    ensure!(
        stderr.contains("retrying") || stderr.contains("resuming"),
        "no retry was logged:\n{stderr}"
    );
    // The registry host differs (the proxy's port), so the manifests differ;
    // every blob and layer tree must not.
    let (a, b) = (
        coral_tests::seed::Mounted::new(&clean)?,
        coral_tests::seed::Mounted::new(&out)?,
    );
    for dir in [".coral/blobs/sha256", ".coral/layers"] {
        let opts = coral_tests::treecmp::Options {
            dir_mtimes: true,
            ..Default::default()
        };
        let diffs = coral_tests::treecmp::diff(
            "clean",
            &coral_tests::treecmp::snapshot(&a.0.join(dir), &opts)?,
            "faulty",
            &coral_tests::treecmp::snapshot(&b.0.join(dir), &opts)?,
        );
        ensure!(diffs.is_empty(), "{dir}: {}", diffs.join("\n"));
    }
    ensure!(
        Command::new(workspace_bin("coral-builder")?)
            .arg("verify")
            .arg(&out)
            .status()?
            .success()
    );
    Ok(())
}

#[tokio::test]
async fn endless_faults_fail_the_build_with_a_clear_message_and_no_output() -> Result<()> {
    let corpus = Corpus::get()?;
    let reg = corpus.plain_registry()?;
    let work = tempfile::Builder::new().prefix("coral-faults-").tempdir()?;
    for (fault, needle) in [
        (Fault::Status(503), "HTTP 503"),
        (Fault::Reset, "gave up after 3 attempts"),
        (
            Fault::Stall(Duration::from_secs(60)),
            "gave up after 3 attempts",
        ),
    ] {
        let proxy = FaultProxy::start(
            &reg.host(),
            FaultPlan::none().with(None, fault.clone(), When::Always),
        )?;
        let out = work.path().join("never.img");
        let started = std::time::Instant::now();
        let o = Command::new(workspace_bin("coral-builder")?)
            .args([
                "build",
                "--progress",
                "none",
                "--platform",
                "linux/amd64",
                "--retries",
                "2",
            ])
            .args(["--read-timeout", "1s", "--deadline", "60s"])
            .args(["--insecure-registry", &proxy.host()])
            .args(["--image", &format!("{}/coral/tiny:latest", proxy.host())])
            .arg("--output")
            .arg(&out)
            .output()
            .context("running the builder")?;
        let stderr = String::from_utf8_lossy(&o.stderr);
        ensure!(!o.status.success(), "{fault:?}: the build succeeded");
        ensure!(
            stderr.contains(needle) && stderr.contains("coral/tiny"),
            "{fault:?}: {stderr}"
        );
        ensure!(!out.exists(), "{fault:?}: an output was left");
        ensure!(
            started.elapsed() < Duration::from_secs(60),
            "{fault:?}: not bounded by the deadline"
        );
    }
    Ok(())
}

/// The disk fills during a build (its work directory and output on a
/// 16 MiB file system, minbase unpacks to far more): the build fails
/// naming the full disk, leaves no output, and once there is room the same
/// command resumes and writes a volume that verifies. Needs root (tmpfs).
#[tokio::test]
async fn a_full_disk_fails_the_build_clearly_and_a_retry_with_room_succeeds() -> Result<()> {
    let corpus = Corpus::get()?;
    let reg = corpus.plain_registry()?;
    let fs = coral_tests::seed::SmallFs::new(16)?;
    let out = fs.path().join("seed.img");
    let builder = workspace_bin("coral-builder")?;
    let mut cmd = Command::new(&builder);
    cmd.args(["build", "--progress", "none", "--platform", "linux/amd64"])
        .args(["--insecure-registry", &reg.host()])
        .args([
            "--image",
            &format!("{}/{}:latest", reg.host(), Corpus::repository("minbase")),
        ])
        .arg("--output")
        .arg(&out)
        .arg("--work-dir")
        .arg(fs.path().join("work"))
        .args(["--deadline", "120s"]);
    let o = cmd.output()?;
    let stderr = String::from_utf8_lossy(&o.stderr);
    ensure!(!o.status.success(), "the build succeeded on 16 MiB");
    ensure!(
        stderr.contains("No space left on device"),
        "no word of the full disk: {stderr}"
    );
    ensure!(!out.exists(), "an output was left: {stderr}");
    fs.resize(1024)?;
    let o = cmd.output()?;
    ensure!(
        o.status.success(),
        "the retry failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    coral_tests::process::run(Command::new(&builder).arg("verify").arg(&out))?;
    Ok(())
}

/// Runs a build of `coral/tiny` through `proxy`; returns the process output
/// and whether an output was left.
fn build_through(
    proxy: &FaultProxy,
    out: &std::path::Path,
) -> Result<(std::process::Output, bool)> {
    let o = Command::new(workspace_bin("coral-builder")?)
        .args(["build", "--progress", "none", "--platform", "linux/amd64"])
        .args([
            "--retries",
            "1",
            "--read-timeout",
            "2s",
            "--deadline",
            "60s",
        ])
        .args(["--insecure-registry", &proxy.host()])
        .args(["--image", &format!("{}/coral/tiny:latest", proxy.host())])
        .arg("--output")
        .arg(out)
        .output()
        .context("running the builder")?;
    Ok((o, out.exists()))
}

/// A registry that sends blobs elsewhere, as registries send them to a
/// CDN: to another origin serving the right bytes, the build succeeds; to
/// one serving other bytes, it fails naming the blob's digest, with no
/// output. Whatever a redirect says, the bytes are checked against the
/// digest the manifest named.
#[tokio::test]
async fn blobs_redirected_to_another_host_are_verified_like_any_other() -> Result<()> {
    let corpus = Corpus::get()?;
    let reg = corpus.plain_registry()?;
    let work = tempfile::Builder::new()
        .prefix("coral-redirect-")
        .tempdir()?;
    // The "CDN": another origin (its own port) in front of the registry.
    let cdn = FaultProxy::start(&reg.host(), FaultPlan::none())?;
    let front = FaultProxy::start(
        &reg.host(),
        FaultPlan::none().with(
            Some("/blobs/"),
            Fault::Redirect(format!("http://{}", cdn.host())),
            When::Always,
        ),
    )?;
    let out = work.path().join("good.img");
    let (o, left) = build_through(&front, &out)?;
    ensure!(
        o.status.success() && left,
        "through an honest redirect: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    ensure!(
        cdn.counters.bytes_forwarded.load(Ordering::Relaxed) > 0,
        "no blob came from the other origin"
    );
    // An origin that serves something else for every blob.
    let evil = FaultProxy::start(
        &reg.host(),
        FaultPlan::none().with(Some("/blobs/"), Fault::Truncate(0.5), When::Always),
    )?;
    front.set_plan(FaultPlan::none().with(
        Some("/blobs/"),
        Fault::Redirect(format!("http://{}", evil.host())),
        When::Always,
    ));
    let out = work.path().join("bad.img");
    let (o, left) = build_through(&front, &out)?;
    let stderr = String::from_utf8_lossy(&o.stderr);
    ensure!(
        !o.status.success(),
        "a build from the wrong bytes succeeded"
    );
    ensure!(!left, "an output was left: {stderr}");
    ensure!(
        stderr.contains("coral/tiny") && stderr.contains("sha256:"),
        "the error names neither image nor blob: {stderr}"
    );
    Ok(())
}

/// A registry whose blob bodies never end: the builder stops reading at
/// the size the manifest declared (it never holds more than a buffer), and
/// the build fails with a clear message within its deadline, no output.
#[tokio::test]
async fn an_endless_blob_body_is_cut_at_its_declared_size() -> Result<()> {
    let corpus = Corpus::get()?;
    let reg = corpus.plain_registry()?;
    let work = tempfile::Builder::new()
        .prefix("coral-endless-")
        .tempdir()?;
    let proxy = FaultProxy::start(
        &reg.host(),
        FaultPlan::none().with(Some("/blobs/"), Fault::Endless, When::Always),
    )?;
    let out = work.path().join("never.img");
    let started = std::time::Instant::now();
    let (o, left) = build_through(&proxy, &out)?;
    let stderr = String::from_utf8_lossy(&o.stderr);
    ensure!(!o.status.success(), "the build succeeded");
    ensure!(!left, "an output was left");
    ensure!(
        stderr.contains("coral/tiny") && stderr.contains("sha256:"),
        "the error names neither image nor blob: {stderr}"
    );
    ensure!(
        started.elapsed() < Duration::from_secs(60),
        "not bounded by the deadline"
    );
    // tiny's blobs are a few KiB; what the proxy could write beyond what
    // the builder read is what socket buffers hold. A reader that kept
    // going would have pulled far more before the deadline.
    let read = proxy.counters.bytes_forwarded.load(Ordering::Relaxed);
    println!("{stderr}\nthe proxy wrote {read} bytes");
    ensure!(
        read < 16 << 20,
        "{read} bytes written to the builder: it kept reading"
    );
    Ok(())
}

/// Credentials are for the registry that asked for them: when it sends a
/// blob to another origin (a CDN), the builder follows without its
/// `Authorization` header, and the bytes are verified as ever.
#[tokio::test]
async fn credentials_are_not_sent_to_the_origin_a_blob_is_redirected_to() -> Result<()> {
    use base64::Engine as _;
    let corpus = Corpus::get()?;
    // The registry wants basic auth; the "CDN" serves the same storage
    // without any.
    let authed = corpus.registry(coral_tests::registry::RegistryOptions {
        auth: Some(("coral".into(), "redirect-s3cret".into())),
        ..Default::default()
    })?;
    let open = corpus.plain_registry()?;
    let cdn = FaultProxy::start(&open.host(), FaultPlan::none())?;
    let front = FaultProxy::start(
        &authed.host(),
        FaultPlan::none().with(
            Some("/blobs/"),
            Fault::Redirect(format!("http://{}", cdn.host())),
            When::Always,
        ),
    )?;
    let work = tempfile::Builder::new()
        .prefix("coral-redirect-auth-")
        .tempdir()?;
    let config = work.path().join("config.json");
    let auth = base64::engine::general_purpose::STANDARD.encode("coral:redirect-s3cret");
    std::fs::write(
        &config,
        serde_json::to_vec(&serde_json::json!({"auths": {front.host(): {"auth": auth}}}))?,
    )?;
    let out = work.path().join("seed.img");
    let o = Command::new(workspace_bin("coral-builder")?)
        .args(["build", "--progress", "none", "--platform", "linux/amd64"])
        .args(["--deadline", "60s", "--snapshot", "none"])
        .args(["--insecure-registry", &front.host()])
        .arg("--registry-config")
        .arg(&config)
        .args(["--image", &format!("{}/coral/tiny:latest", front.host())])
        .arg("--output")
        .arg(&out)
        .output()?;
    let stderr = String::from_utf8_lossy(&o.stderr);
    ensure!(
        o.status.success() && out.exists(),
        "the build failed: {stderr}"
    );
    ensure!(
        front.counters.authorized.load(Ordering::Relaxed) > 0,
        "the registry never saw the credentials: the test proves nothing"
    );
    ensure!(
        cdn.counters.bytes_forwarded.load(Ordering::Relaxed) > 0,
        "no blob came from the other origin"
    );
    let leaked = cdn.counters.authorized.load(Ordering::Relaxed);
    ensure!(
        leaked == 0,
        "{leaked} requests to the other origin carried the registry's Authorization header"
    );
    ensure!(
        !stderr.contains("redirect-s3cret"),
        "the password was logged: {stderr}"
    );
    Ok(())
}

/// Two builds started at once on one work directory: the second stops at
/// once with a clear message and writes nothing; the first, which holds the
/// directory, finishes intact; a build after it uses the same directory
/// and gives the same bytes.
#[tokio::test]
async fn a_second_build_on_a_busy_work_dir_stops_clearly_and_the_first_finishes() -> Result<()> {
    let corpus = Corpus::get()?;
    let reg = corpus.plain_registry()?;
    // The first blob request stalls, so the first build is still running
    // when the second starts.
    let proxy = FaultProxy::start(
        &reg.host(),
        FaultPlan::none().with(
            Some("/blobs/"),
            Fault::Stall(Duration::from_secs(8)),
            When::FirstN(1),
        ),
    )?;
    let work = tempfile::Builder::new()
        .prefix("coral-two-builds-")
        .tempdir()?;
    let work_dir = work.path().join("shared-work");
    let build = |out: &std::path::Path| -> Result<Command> {
        let mut cmd = Command::new(workspace_bin("coral-builder")?);
        cmd.args(["build", "--progress", "none", "--platform", "linux/amd64"])
            .args(["--deadline", "60s", "--snapshot", "none"])
            .args(["--insecure-registry", &proxy.host()])
            .args(["--image", &format!("{}/coral/tiny:latest", proxy.host())])
            .arg("--work-dir")
            .arg(&work_dir)
            .arg("--output")
            .arg(out)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        Ok(cmd)
    };
    let (first_out, second_out, third_out) = (
        work.path().join("first.img"),
        work.path().join("second.img"),
        work.path().join("third.img"),
    );
    let mut first = build(&first_out)?.spawn()?;
    // The first holds the directory's lock once it has made it.
    let t = std::time::Instant::now();
    while !work_dir.join(".lock").exists() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let second = build(&second_out)?.output()?;
    // It did not wait for the lock: the first is still in its stall.
    let first_still_running = first.try_wait()?.is_none();
    let second_err = String::from_utf8_lossy(&second.stderr);
    let first = first.wait_with_output()?;
    ensure!(
        first.status.success(),
        "the first build failed: {}",
        String::from_utf8_lossy(&first.stderr)
    );
    ensure!(
        proxy.counters.stalls.load(Ordering::Relaxed) == 1,
        "the stall never happened: the builds may not have overlapped"
    );
    ensure!(!second.status.success(), "the second build succeeded too");
    ensure!(
        second_err.contains("another coral-builder is using the work directory"),
        "{second_err}"
    );
    ensure!(
        first_still_running,
        "the second build returned only after the first had finished"
    );
    ensure!(!second_out.exists(), "the second build left an output");
    let verify = Command::new(workspace_bin("coral-builder")?)
        .arg("verify")
        .arg(&first_out)
        .output()?;
    ensure!(
        verify.status.success(),
        "the first build's volume does not verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let third = build(&third_out)?.output()?;
    ensure!(
        third.status.success(),
        "a build after the first failed: {}",
        String::from_utf8_lossy(&third.stderr)
    );
    ensure!(
        coral_tests::seed::sha256_file(&first_out)? == coral_tests::seed::sha256_file(&third_out)?,
        "the build after the first gave other bytes"
    );
    Ok(())
}
