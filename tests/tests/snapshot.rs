//! Snapshot backends: `file` (a sidecar record naming the image by its
//! SHA-256) and `ebs-direct` against moto's server (EC2 + EBS direct APIs on
//! 127.0.0.1), with and without a fault-injecting proxy in between.
//!
//! moto stores blocks but does not check block checksums or the aggregate
//! checksum, has no pending state, and does not implement parent inheritance
//! or KMS: these tests check what is sent and read back, not what AWS would
//! verify on its side.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use coral_tests::ebsproxy::EbsProxy;
use coral_tests::faultproxy::{Fault, FaultPlan, FaultProxy, When};
use coral_tests::fixtures::Corpus;
use coral_tests::moto::Moto;
use coral_tests::process::run;
use coral_tests::seed::{build, sha256_file};
use coral_tests::workspace_bin;

const BLOCK: u64 = 512 * 1024;

/// `coral-builder ARGS` with the AWS configuration chain pointed at `endpoint`.
fn builder_with_aws(endpoint: &str, args: &[&str]) -> Result<Output> {
    builder_with_aws_log(endpoint, args, "warn")
}

/// The same, with `CORAL_LOG` set to `log`.
fn builder_with_aws_log(endpoint: &str, args: &[&str], log: &str) -> Result<Output> {
    Ok(Command::new(workspace_bin("coral-builder")?)
        .args(args)
        .env("CORAL_LOG", log)
        .env("AWS_ENDPOINT_URL", endpoint)
        .env("AWS_ACCESS_KEY_ID", "coral-test")
        .env("AWS_SECRET_ACCESS_KEY", "coral-test-secret")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE")
        .output()?)
}

/// Every block of `snapshot`, read back through ListSnapshotBlocks and
/// GetSnapshotBlock.
async fn read_back(ebs: &aws_sdk_ebs::Client, snapshot: &str) -> Result<BTreeMap<u64, Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut token = None;
    loop {
        let page = ebs
            .list_snapshot_blocks()
            .snapshot_id(snapshot)
            .set_next_token(token.take())
            .send()
            .await
            .context("ListSnapshotBlocks")?;
        // (moto reports a block size of 512 bytes; EBS's is 512 KiB.)
        for b in page.blocks() {
            let index = b.block_index().context("block index")?;
            let got = ebs
                .get_snapshot_block()
                .snapshot_id(snapshot)
                .block_index(index)
                .block_token(b.block_token().context("block token")?)
                .send()
                .await
                .context("GetSnapshotBlock")?;
            let data = got.block_data.collect().await?.into_bytes().to_vec();
            out.insert(index as u64, data);
        }
        match page.next_token() {
            Some(t) if !t.is_empty() => token = Some(t.to_string()),
            _ => return Ok(out),
        }
    }
}

/// The snapshot's blocks, holes read as zeros, equal the image byte for byte.
fn same_bytes(image: &Path, blocks: &BTreeMap<u64, Vec<u8>>, volume_gib: u64) -> Result<()> {
    let bytes = std::fs::read(image)?;
    let total = (volume_gib << 30) / BLOCK;
    ensure!(
        (bytes.len() as u64).div_ceil(BLOCK) <= total,
        "the image is larger than the snapshot's volume"
    );
    let zero = vec![0u8; BLOCK as usize];
    for index in 0..total {
        let start = (index * BLOCK) as usize;
        let mut want = bytes
            .get(start..(start + BLOCK as usize).min(bytes.len()))
            .unwrap_or(&[])
            .to_vec();
        want.resize(BLOCK as usize, 0);
        let got = blocks.get(&index).map(Vec::as_slice).unwrap_or(&zero);
        ensure!(
            got == want.as_slice(),
            "block {index} differs from the image"
        );
    }
    ensure!(
        blocks.keys().all(|i| *i < total),
        "blocks beyond the volume's end"
    );
    Ok(())
}

#[tokio::test]
async fn a_file_snapshot_names_the_image_by_its_sha256() -> Result<()> {
    let corpus = Corpus::get()?;
    let reg = corpus.plain_registry()?;
    let work = tempfile::Builder::new().prefix("coral-snap-").tempdir()?;
    let image = work.path().join("seed.img");
    let report = build(&reg, &["tiny"], &["linux/amd64"], &image, &[])?;
    let want = format!("sha256:{}", sha256_file(&image)?);
    let snap = &report["snapshot"];
    ensure!(
        snap["kind"] == "file" && snap["id"] == want.as_str(),
        "{report:#}"
    );
    ensure!(
        snap["manifestDigest"] == report["manifestDigest"],
        "{report:#}"
    );
    let sidecar: serde_json::Value =
        serde_json::from_slice(&std::fs::read(work.path().join("seed.img.snapshot.json"))?)?;
    ensure!(sidecar["id"] == want.as_str(), "{sidecar:#}");
    // The same from the snapshot command, for an image built earlier.
    let out = run(Command::new(workspace_bin("coral-builder")?)
        .args(["snapshot", "--snapshot", "file"])
        .arg(&image))?;
    let again: serde_json::Value = serde_json::from_str(&out)?;
    ensure!(again["id"] == want.as_str(), "{again:#}");
    ensure!(again["seedKey"] == report["seedKey"], "{again:#}");
    // Rebuilt in place without a file snapshot: the old record, which
    // would name the old bytes, is gone.
    build(
        &reg,
        &["layered"],
        &["linux/amd64"],
        &image,
        &["--snapshot", "none"],
    )?;
    ensure!(
        !work.path().join("seed.img.snapshot.json").exists(),
        "a stale snapshot record survived the rebuild"
    );
    Ok(())
}

#[tokio::test]
async fn ebs_direct_uploads_every_byte_and_the_snapshot_makes_a_volume() -> Result<()> {
    let corpus = Corpus::get()?;
    let reg = corpus.plain_registry()?;
    let moto = Moto::start()?;
    let work = tempfile::Builder::new().prefix("coral-snap-").tempdir()?;
    let image = work.path().join("seed.img");
    let endpoint = moto.endpoint();
    let output = image.to_str().context("utf-8")?;
    let mut args = vec!["build", "--output", output, "--json", "--progress", "none"];
    let refs: Vec<String> = ["tiny", "layered"]
        .iter()
        .map(|i| format!("{}/{}:latest", reg.host(), Corpus::repository(i)))
        .collect();
    for r in &refs {
        args.extend(["--image", r.as_str()]);
    }
    let host = reg.host();
    args.extend([
        "--insecure-registry",
        host.as_str(),
        "--platform",
        "linux/amd64",
    ]);
    args.extend([
        "--snapshot",
        "ebs-direct",
        "--tag",
        "team=ml",
        "--snapshot-poll",
        "200ms",
    ]);
    let o = builder_with_aws(&endpoint, &args)?;
    ensure!(
        o.status.success(),
        "build --snapshot ebs-direct: {}\nmoto log:\n{}",
        String::from_utf8_lossy(&o.stderr),
        moto.log_tail()
    );
    let report: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    let snap = &report["snapshot"];
    let id = snap["id"].as_str().context("snapshot id")?.to_string();
    ensure!(
        id.starts_with("snap-") && snap["kind"] == "ebs-direct",
        "{report:#}"
    );

    let config = moto.sdk_config().await;
    let ebs = aws_sdk_ebs::Client::new(&config);
    let ec2 = aws_sdk_ec2::Client::new(&config);
    let blocks = read_back(&ebs, &id).await?;
    let gib = snap["volumeSizeGib"].as_u64().context("volumeSizeGib")?;
    same_bytes(&image, &blocks, gib)?;
    ensure!(
        snap["blocksSent"].as_u64() == Some(blocks.len() as u64),
        "the record says {} blocks sent, the snapshot holds {}",
        snap["blocksSent"],
        blocks.len()
    );
    // Holes and zero blocks were left out: far fewer than the volume's blocks.
    ensure!(
        (blocks.len() as u64) < std::fs::metadata(&image)?.len() / BLOCK,
        "every block was sent"
    );

    // EC2 sees it, completed and tagged, and makes a volume from it.
    let described = ec2.describe_snapshots().snapshot_ids(&id).send().await?;
    let s = described.snapshots().first().context("DescribeSnapshots")?;
    ensure!(s.state().map(|s| s.as_str()) == Some("completed"), "{s:?}");
    let tags: BTreeMap<&str, &str> = s
        .tags()
        .iter()
        .filter_map(|t| Some((t.key()?, t.value()?)))
        .collect();
    ensure!(
        tags.get("team") == Some(&"ml")
            && tags.get("coral/manifest-digest") == report["manifestDigest"].as_str().as_ref()
            && tags.get("coral/seed-key") == report["seedKey"].as_str().as_ref(),
        "tags {tags:?}"
    );
    let volume = ec2
        .create_volume()
        .snapshot_id(&id)
        .availability_zone("us-east-1a")
        .send()
        .await
        .context("CreateVolume from the snapshot")?;
    ensure!(volume.size() == Some(gib as i32), "{volume:?}");

    // Through a proxy that stalls, resets and fails requests: still every
    // byte.
    moto.reset().await?;
    let proxy = FaultProxy::start(
        &endpoint.replace("http://", ""),
        FaultPlan::none()
            // Block 0 (the superblock's, always sent) stalls once past the
            // SDK's 30 s read timeout. (A rule matching a request decides it,
            // so this one names a single block: the others still see the
            // resets and 500s below.)
            .with(
                Some("/blocks/0"),
                Fault::Stall(Duration::from_secs(45)),
                When::FirstN(1),
            )
            .with(Some("/blocks/"), Fault::Reset, When::EveryKth(4))
            .with(Some("/blocks/"), Fault::Status(500), When::EveryKth(5))
            .with(Some("/snapshots"), Fault::Status(503), When::FirstN(1)),
    )?;
    let o = builder_with_aws(
        &format!("http://{}", proxy.host()),
        &[
            "snapshot",
            output,
            "--snapshot",
            "ebs-direct",
            "--snapshot-poll",
            "200ms",
        ],
    )?;
    ensure!(
        o.status.success(),
        "snapshot through the fault proxy: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    ensure!(
        proxy
            .counters
            .stalls
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1
            && proxy.counters.faults() > 1,
        "the proxy injected no stall, or nothing else"
    );
    let record: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    let id = record["id"].as_str().context("id")?;
    same_bytes(&image, &read_back(&ebs, id).await?, gib)?;
    Ok(())
}

#[tokio::test]
async fn an_upload_that_keeps_failing_ends_in_time_and_leaves_no_snapshot() -> Result<()> {
    let corpus = Corpus::get()?;
    let reg = corpus.plain_registry()?;
    let moto = Moto::start()?;
    let work = tempfile::Builder::new().prefix("coral-snap-").tempdir()?;
    let image = work.path().join("seed.img");
    build(
        &reg,
        &["tiny"],
        &["linux/amd64"],
        &image,
        &["--snapshot", "none"],
    )?;
    ensure!(
        !work.path().join("seed.img.snapshot.json").exists(),
        "--snapshot none wrote a record"
    );
    let proxy = FaultProxy::start(
        &moto.endpoint().replace("http://", ""),
        FaultPlan::none().with(Some("/blocks/"), Fault::Status(500), When::Always),
    )?;
    let started = Instant::now();
    let o = builder_with_aws(
        &format!("http://{}", proxy.host()),
        &[
            "snapshot",
            image.to_str().context("utf-8")?,
            "--snapshot",
            "ebs-direct",
            "--snapshot-attempts",
            "3",
            "--snapshot-deadline",
            "60s",
        ],
    )?;
    let elapsed = started.elapsed();
    let stderr = String::from_utf8_lossy(&o.stderr);
    ensure!(o.status.code() == Some(1), "{:?}: {stderr}", o.status);
    ensure!(
        elapsed < Duration::from_secs(60),
        "took {elapsed:?}: {stderr}"
    );
    ensure!(
        stderr.contains("PutSnapshotBlock") && stderr.contains("deletion has been requested"),
        "{stderr}"
    );
    // A parent and a KMS key together: EBS would refuse; so does coral, first.
    let o = builder_with_aws(
        &moto.endpoint(),
        &[
            "snapshot",
            image.to_str().context("utf-8")?,
            "--snapshot",
            "ebs-direct",
            "--parent-snapshot",
            "snap-0123456789abcdef0",
            "--kms-key",
            "arn:aws:kms:us-east-1:123456789012:key/coral",
        ],
    )?;
    let stderr = String::from_utf8_lossy(&o.stderr);
    ensure!(
        o.status.code() == Some(1) && stderr.contains("cannot go together"),
        "{stderr}"
    );
    // Nothing that looks complete is left.
    let ec2 = aws_sdk_ec2::Client::new(&moto.sdk_config().await);
    let left = ec2.describe_snapshots().owner_ids("self").send().await?;
    ensure!(
        left.snapshots().is_empty(),
        "left behind: {:?}",
        left.snapshots()
    );
    Ok(())
}

/// ECR credentials through the AWS SDK: a TLS registry that wants user `AWS`
/// and the password moto's GetAuthorizationToken hands out, named with
/// `--ecr-registry` (real ECR names cannot resolve to 127.0.0.1 here).
#[tokio::test]
async fn an_ecr_registry_is_pulled_with_a_token_from_the_ecr_api() -> Result<()> {
    let corpus = Corpus::get()?;
    let moto = Moto::start()?;
    // moto's token for its default account is AWS:<account>-auth-token.
    let reg = corpus.registry(coral_tests::registry::RegistryOptions {
        tls: true,
        auth: Some(("AWS".into(), "123456789012-auth-token".into())),
        ..Default::default()
    })?;
    let work = tempfile::Builder::new().prefix("coral-ecr-").tempdir()?;
    let image = work.path().join("seed.img");
    let reference = format!("{}/{}:latest", reg.host(), Corpus::repository("tiny"));
    let ca = reg.ca_cert().context("a TLS registry has a CA")?;
    let args = |ecr: bool| {
        let mut a = vec![
            "build".to_string(),
            "--output".into(),
            image.display().to_string(),
            "--image".into(),
            reference.clone(),
            "--ca-cert".into(),
            ca.display().to_string(),
            "--platform".into(),
            "linux/amd64".into(),
            "--progress".into(),
            "none".into(),
            "--retries".into(),
            "1".into(),
            "--snapshot".into(),
            "none".into(),
        ];
        if ecr {
            a.extend(["--ecr-registry".into(), reg.host()]);
        }
        a
    };
    // Without the token: refused, and the error names the registry.
    let no = builder_with_aws(
        &moto.endpoint(),
        &args(false).iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    let stderr = String::from_utf8_lossy(&no.stderr);
    ensure!(!no.status.success(), "an anonymous pull was accepted");
    ensure!(stderr.contains(&reg.host()), "{stderr}");
    ensure!(
        !stderr.contains("auth-token"),
        "a secret reached the error: {stderr}"
    );
    // With every log on: neither the token nor the AWS secret key shows.
    let yes = builder_with_aws_log(
        &moto.endpoint(),
        &args(true).iter().map(String::as_str).collect::<Vec<_>>(),
        "trace",
    )?;
    let stderr = String::from_utf8_lossy(&yes.stderr);
    ensure!(yes.status.success(), "with the ECR token: {stderr}");
    for secret in ["auth-token", "coral-test-secret"] {
        ensure!(
            !stderr.contains(secret) && !String::from_utf8_lossy(&yes.stdout).contains(secret),
            "{secret} reached the output at CORAL_LOG=trace"
        );
    }
    ensure!(image.exists(), "no volume written");
    Ok(())
}

/// `--snapshot ebs`: CreateSnapshot of the volume the builder wrote. moto
/// holds no data for its volumes, so this checks the API flow: the snapshot
/// of the named volume, tagged, waited for, and recorded.
#[tokio::test]
async fn ebs_snapshots_the_named_volume_with_coral_tags() -> Result<()> {
    let corpus = Corpus::get()?;
    let reg = corpus.plain_registry()?;
    let moto = Moto::start()?;
    let work = tempfile::Builder::new().prefix("coral-snap-").tempdir()?;
    let image = work.path().join("seed.img");
    let report = build(
        &reg,
        &["tiny"],
        &["linux/amd64"],
        &image,
        &["--snapshot", "none"],
    )?;
    let ec2 = aws_sdk_ec2::Client::new(&moto.sdk_config().await);
    let volume = ec2
        .create_volume()
        .size(1)
        .availability_zone("us-east-1a")
        .send()
        .await?
        .volume_id()
        .context("volume id")?
        .to_string();
    let o = builder_with_aws(
        &moto.endpoint(),
        &[
            "snapshot",
            image.to_str().context("utf-8")?,
            "--snapshot",
            "ebs",
            "--volume-id",
            &volume,
            "--tag",
            "pool=gpu",
            "--snapshot-poll",
            "200ms",
        ],
    )?;
    ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let record: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    let id = record["id"].as_str().context("id")?;
    let described = ec2.describe_snapshots().snapshot_ids(id).send().await?;
    let s = described.snapshots().first().context("the snapshot")?;
    ensure!(s.volume_id() == Some(volume.as_str()), "{s:?}");
    ensure!(s.state().map(|s| s.as_str()) == Some("completed"), "{s:?}");
    let tags: BTreeMap<&str, &str> = s
        .tags()
        .iter()
        .filter_map(|t| Some((t.key()?, t.value()?)))
        .collect();
    ensure!(
        tags.get("pool") == Some(&"gpu")
            && tags.get("coral/seed-key") == report["seedKey"].as_str().as_ref(),
        "tags {tags:?}"
    );
    // Without a volume ID and on no EBS device: a clear refusal.
    let o = builder_with_aws(
        &moto.endpoint(),
        &[
            "snapshot",
            image.to_str().context("utf-8")?,
            "--snapshot",
            "ebs",
        ],
    )?;
    let stderr = String::from_utf8_lossy(&o.stderr);
    ensure!(
        !o.status.success() && stderr.contains("--volume-id"),
        "{stderr}"
    );
    Ok(())
}

/// `coral-builder build` arguments for fixture `images` from `reg`.
fn build_args(
    reg: &coral_tests::registry::Registry,
    images: &[&str],
    output: &Path,
) -> Vec<String> {
    let mut args: Vec<String> = ["build", "--json", "--progress", "none", "--output"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push(output.display().to_string());
    for i in images {
        args.push("--image".into());
        args.push(format!("{}/{}:latest", reg.host(), Corpus::repository(i)));
    }
    for a in [
        "--insecure-registry",
        &reg.host(),
        "--platform",
        "linux/amd64",
    ] {
        args.push(a.to_string());
    }
    args
}

fn run_builder(endpoint: &str, args: &[String]) -> Result<serde_json::Value> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = builder_with_aws(endpoint, &args)?;
    ensure!(
        o.status.success(),
        "coral-builder {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(serde_json::from_slice(&o.stdout)?)
}

/// Incremental: a volume built on the previous one (`--parent-image`) and
/// uploaded as a child of its snapshot sends only the blocks that changed.
/// A recording proxy between the builder and moto recomputes every block's
/// SHA-256 and the aggregate checksum (moto checks neither). moto does not
/// implement parent inheritance (a child lists only its own blocks) or KMS,
/// so the child is checked as AWS would present it: the parent's blocks
/// overlaid with the blocks sent for the child, equal to the new image.
#[tokio::test]
async fn a_volume_built_on_the_last_one_sends_only_what_changed() -> Result<()> {
    let corpus = Corpus::get()?;
    let reg = corpus.plain_registry()?;
    let moto = Moto::start()?;
    let proxy = EbsProxy::start(&moto.endpoint().replace("http://", ""))?;
    let work = tempfile::Builder::new().prefix("coral-incr-").tempdir()?;
    let (v1, v2) = (work.path().join("v1.img"), work.path().join("v2.img"));
    let snap = ["--snapshot", "ebs-direct", "--snapshot-poll", "200ms"].map(String::from);

    let mut args = build_args(&reg, &["minbase", "tiny"], &v1);
    args.extend(snap.iter().cloned());
    let r1 = run_builder(&proxy.endpoint(), &args)?;
    let snap1 = r1["snapshot"]["id"]
        .as_str()
        .context("snapshot 1")?
        .to_string();
    let v1_sum = sha256_file(&v1)?;
    ensure!(
        work.path().join("v1.img.blocks").exists(),
        "no block map was recorded for v1: {r1:#}"
    );

    // One image of the set changes: tiny is replaced by layered (minbase +
    // three edge-case layers).
    let mut args = build_args(&reg, &["minbase", "layered"], &v2);
    args.extend(snap.iter().cloned());
    args.extend(["--parent-image".into(), v1.display().to_string()]);
    let r2 = run_builder(&proxy.endpoint(), &args)?;
    let snap2 = r2["snapshot"]["id"]
        .as_str()
        .context("snapshot 2")?
        .to_string();
    let built_on = &r2["builtOn"];
    ensure!(
        r2["snapshot"]["parent"] == snap1.as_str()
            && built_on["layersKept"] == 1
            && built_on["layersAdded"] == 3
            && built_on["layersRemoved"] == 1,
        "not built on v1 as expected: {r2:#}"
    );
    ensure!(sha256_file(&v1)? == v1_sum, "building on v1 changed it");

    // Every block and the aggregate checked; then what was sent is bounded
    // by what changed.
    let changed = built_on["bytesWritten"].as_u64().context("bytesWritten")?;
    let (sent1, sent2) = proxy.with(|rec| -> Result<(u64, u64)> {
        ensure!(rec.bad_checksums.is_empty(), "{:?}", rec.bad_checksums);
        for id in [&snap1, &snap2] {
            let c = rec.completions.get(id).context("no CompleteSnapshot")?;
            ensure!(
                c.aggregate_ok && c.claimed_blocks == c.blocks_received,
                "{id}: {c:?}"
            );
        }
        Ok((
            rec.blocks.get(&snap1).map_or(0, |b| b.len() as u64),
            rec.blocks.get(&snap2).map_or(0, |b| b.len() as u64),
        ))
    })?;
    let bound = (3 * changed).div_ceil(2 * BLOCK) + 256;
    eprintln!(
        "incremental: v1 sent {sent1} blocks; v2 wrote {changed} bytes and sent {sent2} \
         blocks (bound {bound}); {} unchanged",
        r2["snapshot"]["blocksUnchanged"]
    );
    ensure!(sent2 <= bound, "sent {sent2} blocks, more than {bound}");
    // Most of v2 (minbase's layer) is the parent's, and was not sent again.
    let unchanged = r2["snapshot"]["blocksUnchanged"].as_u64().unwrap_or(0);
    ensure!(
        r2["snapshot"]["blocksSent"] == sent2 && sent2 * 4 < sent2 + unchanged,
        "{r2:#}"
    );

    // The child as AWS would present it: the parent's blocks, overlaid.
    let config = moto.sdk_config().await;
    let ebs = aws_sdk_ebs::Client::new(&config);
    let mut child = read_back(&ebs, &snap1).await?;
    child.extend(read_back(&ebs, &snap2).await?);
    let gib = r2["snapshot"]["volumeSizeGib"].as_u64().context("gib")?;
    same_bytes(&v2, &child, gib)?;

    // A grandchild, built on v2 with the parent taken from v2's record
    // (moto lists only a child's own blocks: the maps carry the rest).
    let v3 = work.path().join("v3.img");
    let mut args = build_args(&reg, &["minbase", "layered", "tiny"], &v3);
    args.extend(snap.iter().cloned());
    args.extend(["--parent-image".into(), v2.display().to_string()]);
    let r3 = run_builder(&proxy.endpoint(), &args)?;
    let snap3 = r3["snapshot"]["id"]
        .as_str()
        .context("snapshot 3")?
        .to_string();
    let changed3 = r3["builtOn"]["bytesWritten"]
        .as_u64()
        .context("bytesWritten")?;
    let sent3 = proxy.with(|rec| rec.blocks.get(&snap3).map_or(0, |b| b.len() as u64));
    ensure!(
        r3["snapshot"]["parent"] == snap2.as_str()
            && r3["builtOn"]["layersAdded"] == 1
            && sent3 <= (3 * changed3).div_ceil(2 * BLOCK) + 256,
        "v3 sent {sent3} blocks for {changed3} bytes: {r3:#}"
    );
    child.extend(read_back(&ebs, &snap3).await?);
    same_bytes(
        &v3,
        &child,
        r3["snapshot"]["volumeSizeGib"].as_u64().context("gib")?,
    )?;

    // The volume is intact, and holds what a fresh build of the same images
    // holds.
    let v = Command::new(workspace_bin("coral-builder")?)
        .arg("verify")
        .arg(&v2)
        .output()?;
    ensure!(
        v.status.success(),
        "verify v2: {}",
        String::from_utf8_lossy(&v.stderr)
    );
    let fresh = work.path().join("fresh.img");
    let mut args = build_args(&reg, &["minbase", "layered"], &fresh);
    args.extend(["--snapshot".into(), "none".into()]);
    let fresh_report = run_builder(&moto.endpoint(), &args)?;
    ensure!(
        fresh_report["manifestDigest"] == r2["manifestDigest"],
        "a fresh build holds {} but the incremental one {}",
        fresh_report["manifestDigest"],
        r2["manifestDigest"]
    );
    Ok(())
}

/// The proxy says `pending` for a few polls: the builder keeps waiting and
/// succeeds. Held pending past the deadline: it fails in time and deletes
/// the snapshot rather than leave one that might later look complete.
#[tokio::test]
async fn the_builder_waits_out_a_pending_snapshot_within_its_deadline() -> Result<()> {
    let corpus = Corpus::get()?;
    let reg = corpus.plain_registry()?;
    let moto = Moto::start()?;
    let proxy = EbsProxy::start(&moto.endpoint().replace("http://", ""))?;
    let work = tempfile::Builder::new()
        .prefix("coral-pending-")
        .tempdir()?;
    let image = work.path().join("seed.img");
    let mut args = build_args(&reg, &["tiny"], &image);
    args.extend(["--snapshot", "none"].map(String::from));
    run_builder(&moto.endpoint(), &args)?;
    let snapshot = |deadline: &str| -> Result<Output> {
        builder_with_aws(
            &proxy.endpoint(),
            &[
                "snapshot",
                image.to_str().context("utf-8")?,
                "--snapshot",
                "ebs-direct",
                "--snapshot-poll",
                "200ms",
                "--snapshot-deadline",
                deadline,
            ],
        )
    };

    proxy.hold_pending(4);
    let o = snapshot("2m")?;
    ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (held, polls) = proxy.with(|r| (r.held_pending, r.describes));
    ensure!(held == 4 && polls >= 5, "held {held}, polls {polls}");
    let record: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    let done = record["id"].as_str().context("id")?.to_string();

    proxy.hold_pending(u64::MAX);
    let started = Instant::now();
    let o = snapshot("4s")?;
    let elapsed = started.elapsed();
    let stderr = String::from_utf8_lossy(&o.stderr);
    ensure!(o.status.code() == Some(1), "{stderr}");
    ensure!(
        stderr.contains("deadline") && elapsed < Duration::from_secs(60),
        "after {elapsed:?}: {stderr}"
    );
    let ec2 = aws_sdk_ec2::Client::new(&moto.sdk_config().await);
    let left = ec2.describe_snapshots().owner_ids("self").send().await?;
    let ids: Vec<&str> = left
        .snapshots()
        .iter()
        .filter_map(|s| s.snapshot_id())
        .collect();
    ensure!(ids == [done.as_str()], "snapshots left: {ids:?}");
    Ok(())
}
