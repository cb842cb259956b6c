//! The `coral-builder` command line. See `docs/builder.md` and `--help`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use coral_builder::auth::Credentials;
use coral_builder::base::BaseVolume;
use coral_builder::build::{StageOptions, default_work_dir, stage};
use coral_builder::fsimage::{self, FsKind, FsOptions};
use coral_builder::progress::{Mode, Progress};
use coral_builder::registry::{RegistryClient, RegistryOptions, RetryPolicy};
use coral_builder::units::{parse_duration, parse_size};
use coral_builder::verify;
use coral_seed::{Platform, SeedLayout};
use serde::Deserialize;
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "coral-builder",
    version,
    about = "Builds coral seed volumes: container images pulled, verified and pre-extracted onto a filesystem image."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Pull images and write a seed volume (an image file, or a block device).
    Build(Box<BuildArgs>),
    /// Print a volume's seed manifest (PATH: an image file or a mounted directory).
    Inspect { path: PathBuf },
    /// Snapshot an existing seed volume image (or the device it was written
    /// to) as `--snapshot` says; prints the snapshot record as JSON.
    Snapshot {
        /// The volume image file, or the block device (for `ebs`).
        path: PathBuf,
        #[command(flatten)]
        snapshot: Box<SnapshotArgs>,
    },
    /// Re-hash every blob and layer tree of a volume; exit 0 only when intact.
    Verify {
        path: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// How the volume becomes something a node can be launched with; the same
/// flags for `build` and `snapshot`.
#[derive(Args, Clone)]
struct SnapshotArgs {
    /// file (the image plus a sidecar record), ebs-direct (upload through
    /// the EBS direct APIs), ebs (CreateSnapshot of the attached volume
    /// written), or none.
    #[arg(long = "snapshot", value_name = "KIND", default_value = "file")]
    kind: String,
    /// The EBS snapshot this one is a child of.
    #[arg(long, value_name = "SNAPSHOT_ID")]
    parent_snapshot: Option<String>,
    /// Encrypt the EBS snapshot with this KMS key.
    #[arg(long, value_name = "ARN")]
    kms_key: Option<String>,
    /// A tag for the snapshot (repeatable); coral/manifest-digest,
    /// coral/seed-key and coral/build-id are always set.
    #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = coral_snapshot::parse_tag)]
    tags: Vec<(String, String)>,
    #[arg(long = "snapshot-description", value_name = "TEXT")]
    description: Option<String>,
    /// ebs-direct: blocks uploaded at once.
    #[arg(long, default_value_t = 32)]
    snapshot_workers: usize,
    /// Attempts per AWS request (with the SDK's backoff).
    #[arg(long, default_value_t = 6)]
    snapshot_attempts: u32,
    /// The snapshot, waiting for it included, ends after this long.
    #[arg(long, value_name = "DURATION", default_value = "1h")]
    snapshot_deadline: String,
    /// How often a pending snapshot is polled.
    #[arg(long, value_name = "DURATION", default_value = "5s")]
    snapshot_poll: String,
    /// ebs: the volume to snapshot (default: the output device's NVMe serial).
    #[arg(long, value_name = "vol-ID")]
    volume_id: Option<String>,
    /// The image the parent snapshot was made from. `build` builds the new
    /// volume on a copy of it (unchanged layers keep their blocks);
    /// ebs-direct sends only blocks that differ from the parent's, by the
    /// block map recorded beside it, and takes the parent snapshot from its
    /// record when --parent-snapshot is not given.
    #[arg(long, value_name = "PATH")]
    parent_image: Option<PathBuf>,
}

impl SnapshotArgs {
    /// None for `--snapshot none`.
    fn options(&self) -> Result<Option<coral_snapshot::Options>> {
        if self.kind == "none" {
            return Ok(None);
        }
        Ok(Some(coral_snapshot::Options {
            kind: self.kind.parse().map_err(anyhow::Error::msg)?,
            parent: self.parent_snapshot.clone(),
            kms_key: self.kms_key.clone(),
            tags: self.tags.clone(),
            description: self.description.clone(),
            workers: self.snapshot_workers.max(1),
            attempts: self.snapshot_attempts.max(1),
            deadline: parse_duration(&self.snapshot_deadline).context("--snapshot-deadline")?,
            poll_interval: parse_duration(&self.snapshot_poll).context("--snapshot-poll")?,
            volume_id: self.volume_id.clone(),
            parent_image: self.parent_image.clone(),
        }))
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum FsArg {
    Ext4,
    Xfs,
}

#[derive(Clone, Copy, ValueEnum)]
enum ProgressArg {
    Auto,
    Bars,
    Json,
    None,
}

#[derive(Args)]
struct BuildArgs {
    /// An image to seed (repeatable): `ubuntu:24.04`, `ghcr.io/org/app@sha256:…`.
    #[arg(long = "image", value_name = "REF")]
    images: Vec<String>,
    /// A seed file (YAML): `images:`, `platforms:`, `options:`.
    #[arg(long, value_name = "FILE")]
    seed: Option<PathBuf>,
    /// A platform to seed for (repeatable; default: this machine's).
    #[arg(long = "platform", value_name = "OS/ARCH[/VARIANT]")]
    platforms: Vec<String>,
    /// The image file to create, or an existing block device to write.
    #[arg(long, value_name = "PATH")]
    output: PathBuf,
    /// Filesystem size (e.g. 20GiB); default: the content plus headroom.
    #[arg(long, value_name = "SIZE")]
    size: Option<String>,
    #[arg(long, value_enum, default_value = "ext4")]
    fs: FsArg,
    /// Bound on all extracted bytes (default: --size, else 20x the compressed size).
    #[arg(long, value_name = "SIZE")]
    max_unpacked: Option<String>,
    /// A docker config.json with `auths` / `credHelpers` / `credsStore`
    /// (repeatable: merged in order, a later file winning for the same
    /// registry; default: $DOCKER_CONFIG/config.json, then
    /// ~/.docker/config.json).
    #[arg(long, value_name = "FILE")]
    registry_config: Vec<PathBuf>,
    /// A registry (HOST:PORT) spoken to over plain HTTP (repeatable).
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    insecure_registries: Vec<String>,
    /// A registry (HOST[:PORT]) to authenticate with an ECR token even though
    /// its name is not `ACCOUNT.dkr.ecr.REGION.amazonaws.com` (repeatable;
    /// ECR names get one anyway). The region is the AWS configuration's.
    #[arg(long = "ecr-registry", value_name = "HOST[:PORT]")]
    ecr_registries: Vec<String>,
    /// An extra CA certificate (PEM) to trust for registries (repeatable).
    #[arg(long = "ca-cert", value_name = "FILE")]
    ca_certs: Vec<PathBuf>,
    /// Where work in progress is kept, so a re-run resumes
    /// (default: beside the output, `.NAME.coral-work`).
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
    /// Keep the work directory after a successful build.
    #[arg(long)]
    keep_work: bool,
    /// Filesystem label.
    #[arg(long, default_value = "coral-seed")]
    label: String,
    /// Parallel registry connections.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Layers extracted at once (default: the number of CPUs).
    #[arg(long)]
    extract_jobs: Option<usize>,
    /// Retries of a failed request (resets, 5xx, stalls, short bodies).
    #[arg(long, default_value_t = 6)]
    retries: u32,
    /// A response that sends nothing for this long is abandoned and retried.
    #[arg(long, default_value = "30s", value_name = "DURATION")]
    read_timeout: String,
    #[arg(long, default_value = "10s", value_name = "DURATION")]
    connect_timeout: String,
    /// Give up on the whole build after this long.
    #[arg(long, value_name = "DURATION")]
    deadline: Option<String>,
    /// Print the build report as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Also write the build report to FILE.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// Progress display (auto: bars on a terminal, JSON lines otherwise).
    #[arg(long, value_enum, default_value = "auto")]
    progress: ProgressArg,
    #[command(flatten)]
    snapshot: SnapshotArgs,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SeedFile {
    #[serde(default)]
    images: Vec<String>,
    #[serde(default)]
    platforms: Vec<String>,
    #[serde(default)]
    options: SeedFileOptions,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SeedFileOptions {
    size: Option<String>,
    fs: Option<String>,
    max_unpacked: Option<String>,
    #[serde(default)]
    insecure_registries: Vec<String>,
    label: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("CORAL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"))
        // Its trace output shows signed requests, security tokens included:
        // never logged, whatever CORAL_LOG asks for.
        .add_directive("aws_sigv4=off".parse().expect("a valid directive"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    // Blocking work is file I/O and extraction, a few at a time; tokio's
    // default (512 threads) only adds stacks and malloc arenas. Room for
    // every extraction (each may wait on a download's file writes, which
    // need threads of their own) plus the rest.
    let extract_jobs = match &cli.command {
        Command::Build(args) => args.extract_jobs.unwrap_or(0),
        _ => 0,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(64.max(extract_jobs + 32))
        .build()
        .expect("a tokio runtime");
    let result = match cli.command {
        Command::Build(args) => runtime.block_on(build(*args)),
        Command::Inspect { path } => inspect(&path),
        Command::Snapshot { path, snapshot } => runtime.block_on(snapshot_cmd(&path, &snapshot)),
        Command::Verify { path, json } => verify_cmd(&path, json),
    };
    // A blocking task that cannot be cancelled (a DNS lookup that hangs,
    // say) must not keep the process past its deadline: the result is
    // known, so the runtime gets a moment to wind down, no more.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("coral-builder: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// A seed volume's root: the directory itself, or an image file mounted
/// read-only for as long as the guard lives.
fn open_volume(path: &Path) -> Result<(PathBuf, Option<fsimage::MountGuard>)> {
    let meta = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
    if meta.is_dir() {
        Ok((path.to_path_buf(), None))
    } else {
        let guard = fsimage::mount_image_readonly(path)
            .with_context(|| format!("mounting {} read-only", path.display()))?;
        Ok((guard.path().to_path_buf(), Some(guard)))
    }
}

fn inspect(path: &Path) -> Result<ExitCode> {
    let (root, _guard) = open_volume(path)?;
    let (manifest, _) = verify::read_manifest(&root)?;
    println!(
        "{}",
        String::from_utf8_lossy(&manifest.to_json()).trim_end()
    );
    Ok(ExitCode::SUCCESS)
}

async fn snapshot_cmd(path: &Path, args: &SnapshotArgs) -> Result<ExitCode> {
    let Some(opts) = args.options()? else {
        bail!("--snapshot none: nothing to do");
    };
    let seed = {
        let (root, _guard) = open_volume(path)?;
        let (manifest, digest) = verify::read_manifest(&root)?;
        coral_snapshot::SeedInfo {
            manifest_digest: digest,
            seed_key: manifest.seed_key.clone(),
            build_id: manifest.build_id.clone(),
        }
    };
    let record = coral_snapshot::snapshot(path, &seed, &opts).await?;
    println!("{}", serde_json::to_string_pretty(&record)?);
    Ok(ExitCode::SUCCESS)
}

fn verify_cmd(path: &Path, as_json: bool) -> Result<ExitCode> {
    let (root, _guard) = open_volume(path)?;
    let jobs = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let report = verify::verify(&root, jobs)?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for p in &report.problems {
            eprintln!("coral-builder: verify: {p}");
        }
        eprintln!(
            "coral-builder: {} blobs ({} bytes) and {} layer trees checked: {}",
            report.blobs_checked,
            report.blob_bytes,
            report.layers_checked,
            if report.intact {
                "intact"
            } else {
                "NOT intact"
            }
        );
    }
    Ok(if report.intact {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

async fn build(args: BuildArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let seed: SeedFile = match &args.seed {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            serde_norway::from_str(&text)
                .with_context(|| format!("{} is not a valid seed file", p.display()))?
        }
        None => SeedFile::default(),
    };
    let mut images = seed.images.clone();
    images.extend(args.images.iter().cloned());
    images.dedup();
    if images.is_empty() {
        bail!("no images to seed: give --image REF (repeatable) or --seed FILE");
    }
    let platform_texts = if !args.platforms.is_empty() {
        args.platforms.clone()
    } else {
        seed.platforms.clone()
    };
    let mut platforms: Vec<Platform> = platform_texts
        .iter()
        .map(|p| p.parse().with_context(|| format!("platform {p:?}")))
        .collect::<Result<_>>()?;
    if platforms.is_empty() {
        platforms.push(Platform::host());
    }
    let size = match args.size.as_ref().or(seed.options.size.as_ref()) {
        Some(s) => Some(parse_size(s).with_context(|| format!("--size {s:?}"))?),
        None => None,
    };
    let max_unpacked = match args
        .max_unpacked
        .as_ref()
        .or(seed.options.max_unpacked.as_ref())
    {
        Some(s) => Some(parse_size(s).with_context(|| format!("--max-unpacked {s:?}"))?),
        None => size,
    };
    let fs_kind = match (seed.options.fs.as_deref(), args.fs) {
        (_, FsArg::Xfs) | (Some("xfs"), _) => FsKind::Xfs,
        (Some("ext4") | None, _) => FsKind::Ext4,
        (Some(other), _) => bail!("seed file: options.fs {other:?} is not ext4 or xfs"),
    };
    let label = seed.options.label.clone().unwrap_or(args.label.clone());
    let mut insecure = args.insecure_registries.clone();
    insecure.extend(seed.options.insecure_registries.iter().cloned());
    let deadline = args
        .deadline
        .as_deref()
        .map(parse_duration)
        .transpose()
        .context("--deadline")?;
    // Checked before any pulling.
    let snapshot_opts = args.snapshot.options()?;

    let credentials =
        Credentials::load_all(&args.registry_config)?.with_ecr_registries(&args.ecr_registries);
    let client = Arc::new(RegistryClient::new(
        RegistryOptions {
            insecure,
            ca_certs: args.ca_certs.clone(),
            connect_timeout: parse_duration(&args.connect_timeout).context("--connect-timeout")?,
            read_timeout: parse_duration(&args.read_timeout).context("--read-timeout")?,
            retry: RetryPolicy {
                retries: args.retries,
                ..RetryPolicy::default()
            },
            connections: args.connections,
        },
        credentials,
    )?);
    let progress = Arc::new(Progress::new(match args.progress {
        ProgressArg::Auto => Mode::detect(),
        ProgressArg::Bars => Mode::Bars,
        ProgressArg::Json => Mode::JsonLines,
        ProgressArg::None => Mode::Quiet,
    }));

    let work_dir = args
        .work_dir
        .clone()
        .unwrap_or_else(|| default_work_dir(&args.output));
    if let Some(parent) = work_dir.parent() {
        // What an earlier run was removing when it was killed.
        coral_builder::build::remove_trash(parent)?;
    }
    let layout = SeedLayout::new(work_dir.join("root"));
    std::fs::create_dir_all(layout.dir())
        .with_context(|| format!("creating the work directory {}", work_dir.display()))?;
    let _lock = WorkLock::acquire(&work_dir)?;
    // Large files an earlier run (killed while writing the image) moved
    // aside go back before the tree is trusted.
    coral_builder::ext4bulk::restore(layout.root())?;
    let opts = StageOptions {
        images,
        platforms,
        max_unpacked,
        extract_jobs: args.extract_jobs.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
        }),
        source_date_epoch: std::env::var("SOURCE_DATE_EPOCH")
            .ok()
            .and_then(|s| s.parse().ok()),
        reuse: None,
    };

    let parent_image = args.snapshot.parent_image.clone();
    let work = async {
        let mut opts = opts;
        // Built on a previous volume: a mounted copy of it.
        let base = match &parent_image {
            Some(parent) => {
                let (parent, output) = (parent.clone(), args.output.clone());
                let base =
                    tokio::task::spawn_blocking(move || BaseVolume::open(&parent, &output, size))
                        .await??;
                opts.reuse = Some(base.reuse());
                Some(base)
            }
            None => None,
        };
        let mut staged = stage(client, &layout, &opts, progress.clone()).await?;
        let t = Instant::now();
        let epoch = coral_seed::time::parse_rfc3339(&staged.manifest.created).unwrap_or(0);
        let fs_opts = FsOptions {
            fs: fs_kind,
            label: label.clone(),
            uuid: fsimage::derive_uuid(staged.manifest.seed_key.to_string().as_bytes()),
            epoch,
            size,
        };
        let root = layout.root().to_path_buf();
        let output = args.output.clone();
        // A record of an earlier image there would name the wrong bytes.
        coral_snapshot::file::remove_record(&output)?;
        let written = match base {
            None => {
                let info = tokio::task::spawn_blocking(move || {
                    fsimage::make_image(&root, &output, &fs_opts)
                })
                .await??;
                Written {
                    fs: info.fs,
                    size: info.size,
                    block_device: info.block_device,
                    built_on: None,
                }
            }
            Some(base) => {
                let (layout, manifest) = (layout.clone(), staged.manifest.clone());
                let merged =
                    tokio::task::spawn_blocking(move || base.merge(&layout, &manifest, epoch))
                        .await??;
                Written {
                    fs: fsimage::detect_fs(&args.output)?,
                    size: std::fs::metadata(&args.output)?.len(),
                    block_device: false,
                    built_on: Some(merged),
                }
            }
        };
        staged.phases.filesystem_seconds =
            Some((t.elapsed().as_secs_f64() * 1000.0).round() / 1000.0);
        anyhow::Ok((staged, written))
    };
    let (staged, info) = match deadline {
        Some(d) => tokio::time::timeout(d, work).await.map_err(|_| {
            anyhow::anyhow!("the build did not finish within --deadline {}", humanize(d))
        })??,
        None => work.await?,
    };
    progress.finish();

    let snapshot = match &snapshot_opts {
        None => None,
        Some(o) => {
            let seed = coral_snapshot::SeedInfo {
                manifest_digest: staged.manifest_digest.clone(),
                seed_key: staged.manifest.seed_key.clone(),
                build_id: staged.manifest.build_id.clone(),
            };
            let record = coral_snapshot::snapshot(&args.output, &seed, o)
                .await
                .with_context(|| {
                    format!(
                        "the volume {} is complete, but its {} snapshot failed (retry with \
                         `coral-builder snapshot {} --snapshot {}`)",
                        args.output.display(),
                        o.kind,
                        args.output.display(),
                        o.kind
                    )
                })?;
            Some(record)
        }
    };

    let report = json!({
        "output": args.output,
        "filesystem": {
            "type": info.fs.to_string(),
            "size": info.size,
            "blockDevice": info.block_device,
            "label": label,
        },
        "manifestDigest": staged.manifest_digest.to_string(),
        "seedKey": staged.manifest.seed_key.to_string(),
        "buildId": staged.manifest.build_id,
        "images": staged.manifest.images.iter().map(|i| json!({
            "reference": i.reference,
            "name": i.name.to_string(),
            "digest": i.resolved_digest.to_string(),
            "manifest": i.manifest_digest.to_string(),
            "platform": i.platform.to_string(),
            "layers": i.layers.len(),
            "size": i.size,
        })).collect::<Vec<_>>(),
        "totals": staged.manifest.totals,
        "builtOn": info.built_on,
        "bytesPulled": staged.bytes_pulled,
        "bytesReused": staged.bytes_reused,
        "phases": staged.phases,
        "snapshot": snapshot,
        "seconds": (started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
    });
    let text = serde_json::to_string_pretty(&report)?;
    if let Some(p) = &args.report {
        std::fs::write(p, format!("{text}\n"))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if args.json {
        println!("{text}");
    } else {
        eprintln!(
            "coral-builder: wrote {} ({} images, {} layers, manifest {})",
            args.output.display(),
            staged.manifest.totals.images,
            staged.manifest.totals.layers,
            staged.manifest_digest
        );
    }
    // A Kubernetes Job hands this to the controller (kept well under 4 KiB).
    let termination = Path::new("/dev/termination-log");
    if termination.exists() {
        let summary = json!({
            "v": 1,
            "seedKey": staged.manifest.seed_key.to_string(),
            "manifestDigest": staged.manifest_digest.to_string(),
            "snapshotId": snapshot.as_ref().map(|s| s.id.clone()),
            "snapshotKind": snapshot.as_ref().map(|s| s.kind.clone()),
            "volumeSizeGib": snapshot.as_ref().map(|s| s.volume_size_gib),
            "output": args.output,
        });
        let _ = std::fs::write(termination, serde_json::to_vec(&summary)?);
    }
    if !args.keep_work {
        drop(_lock);
        coral_builder::build::remove_tree(&work_dir)
            .with_context(|| format!("removing the work directory {}", work_dir.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The filesystem a build wrote, for the report.
struct Written {
    fs: FsKind,
    size: u64,
    block_device: bool,
    /// Built on a previous volume (`--parent-image`): what was kept and added.
    built_on: Option<coral_builder::base::MergeStats>,
}

fn humanize(d: Duration) -> String {
    format!("{:.0?}", d)
}

/// One build per work directory at a time (an flock held for the build).
struct WorkLock(#[allow(dead_code)] std::fs::File);

impl WorkLock {
    fn acquire(dir: &Path) -> Result<WorkLock> {
        let f = std::fs::File::create(dir.join(".lock"))
            .with_context(|| format!("creating {}", dir.join(".lock").display()))?;
        match f.try_lock() {
            Ok(()) => Ok(WorkLock(f)),
            Err(_) => bail!(
                "another coral-builder is using the work directory {} (or pass --work-dir)",
                dir.display()
            ),
        }
    }
}
