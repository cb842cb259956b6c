//! The `coral-node-mounter` command line: one subcommand per step of a
//! node's bootstrap. Each subcommand's module documents its exit codes;
//! every subcommand exits 1 on an error it reports on stderr, and 2 when its
//! command line does not parse.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use coral_node_mounter::adopt::{self, AdoptOptions, ImportMode};
use coral_node_mounter::fallback::{self, Credentials, ImageResult, PullOptions, Source};
use coral_node_mounter::mount::{self, DeviceSpec, HostRoots, MountOptions};
use coral_node_mounter::status::{self, Phase, StatusFile};
use coral_seed::time::parse_duration;
use coral_seed::{Digest, Platform, SeedLayout, SeedManifest};

#[derive(Parser)]
#[command(
    name = "coral-node-mounter",
    version,
    about = "Runs at node bootstrap: mounts a coral seed volume and registers its images with the node's containerd."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Find the seed volume's device, mount it, (optionally) grow it, and
    /// check its seed manifest.
    Mount(MountArgs),
    /// Register a mounted seed volume's images with containerd
    /// (exit 0 all seeded, 10 some pulled by fallback, 20 failed).
    Import(ImportArgs),
    /// What user-data calls: mount the volume (over containerd's root for
    /// adopt), wait for containerd, import; exit codes as import's. With
    /// containerd already running, adopting is impossible: it copies.
    Run(RunArgs),
    /// Read every block of the seeded layer files once (EBS restores a
    /// snapshot's blocks lazily, on first read), several files at a time.
    Prewarm(PrewarmArgs),
    /// Pull images through CRI, as kubelet would, on a node without a seed
    /// volume: exit 0 when every image is in containerd (pulled or already
    /// there), 20 when any is not (failed, or the deadline passed).
    Prefetch(PrefetchArgs),
}

#[derive(Args)]
struct MountArgs {
    /// The device: a path (block device or image file), `auto` (the
    /// filesystem labelled coral-seed), `label:LABEL`, or `ebs:vol-…`.
    #[arg(long, value_name = "PATH|auto|label:LABEL|ebs:vol-ID")]
    device: DeviceSpec,
    /// Where to mount it (created if missing).
    #[arg(long, value_name = "DIR")]
    target: PathBuf,
    /// Grow the filesystem to the device's size once mounted.
    #[arg(long)]
    grow: bool,
    /// How long to wait for the device to appear.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    wait: Duration,
    /// The digest the volume's `.coral/manifest.json` must have (sha256:…).
    #[arg(long, value_name = "MANIFEST_DIGEST")]
    expect: Option<Digest>,
    /// Mount read-only.
    #[arg(long)]
    read_only: bool,
    /// Leave what the target directory holds hidden under the mount,
    /// instead of copying it onto the volume (by default, the machine
    /// image's containerd state, e.g. its pause image, is carried over).
    #[arg(long)]
    no_carry_over: bool,
    /// Where the target's old content is kept reachable while it is
    /// carried over.
    #[arg(long, value_name = "DIR", default_value = mount::DEFAULT_CARRY_DIR)]
    carry_dir: PathBuf,
    /// Print the result as a JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Mode {
    Adopt,
    Copy,
}

#[derive(Args)]
struct ImportArgs {
    /// The mounted seed volume (for adopt: containerd's root directory).
    #[arg(long)]
    seed: PathBuf,
    #[command(flatten)]
    flags: ImportFlags,
}

/// What `import` and `run` share.
#[derive(Args)]
struct ImportFlags {
    /// containerd's socket (the same path on every node of a pool).
    #[arg(long, default_value = fallback::DEFAULT_ADDRESS)]
    address: PathBuf,
    /// adopt: the volume is containerd's root, and its bytes are moved into
    /// place; copy: the volume is mounted elsewhere (read-only is enough),
    /// and its bytes are written to containerd.
    #[arg(long, value_enum, default_value = "adopt")]
    mode: Mode,
    /// `--mode copy`: blobs written and layer trees copied at once.
    #[arg(long, default_value_t = 4, value_parser = at_least_one)]
    copy_jobs: usize,
    #[arg(long, default_value = "k8s.io")]
    namespace: String,
    /// The seed manifest digest this node was told to expect (e.g. from user-data).
    #[arg(long, value_name = "MANIFEST_DIGEST")]
    expect: Option<String>,
    /// Label images so kubelet's image garbage collection keeps them.
    #[arg(long)]
    pin: bool,
    /// The node's platform (default: this machine's).
    #[arg(long)]
    platform: Option<String>,
    #[arg(long, default_value = "overlayfs")]
    snapshotter: String,
    /// Everything (adopting, then pulling) ends after this long; the node
    /// then carries on with kubelet's own pulls.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
    deadline: Duration,
    /// Pull through CRI whatever wanted image the volume did not provide
    /// (all of them, if the volume could not be adopted).
    #[arg(long)]
    fallback_pull: bool,
    /// More images the node wants besides the volume's (repeatable); needed
    /// so a node whose volume is missing or broken knows what to pull.
    #[arg(long = "image", value_name = "REF")]
    images: Vec<String>,
    #[command(flatten)]
    pull: PullFlags,
    /// Where the JSON status (phase, and each image's state) is kept.
    #[arg(long, value_name = "FILE")]
    status_file: Option<PathBuf>,
    /// Adopt: once imported, read the seeded layer files' blocks in a
    /// detached background process (`prewarm`), so EBS lazy loading does not
    /// land on the first container start; its report goes to prewarm.json
    /// beside the status file.
    #[arg(long)]
    prewarm: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct PrewarmArgs {
    /// A directory whose files to read (repeatable).
    #[arg(long = "path", value_name = "DIR", required = true)]
    paths: Vec<PathBuf>,
    /// Files read at once.
    #[arg(long, default_value_t = 8, value_parser = at_least_one)]
    jobs: usize,
    /// Also write the JSON report to this file.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct RunArgs {
    /// The device: a path, `auto`, `label:LABEL`, or `ebs:vol-…`.
    #[arg(long, value_name = "PATH|auto|label:LABEL|ebs:vol-ID")]
    device: DeviceSpec,
    /// containerd's root directory: where adopt mounts the volume.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/containerd")]
    root: PathBuf,
    /// Where copy mode mounts the volume (read-only).
    #[arg(long, value_name = "DIR", default_value = "/run/coral/seed")]
    copy_target: PathBuf,
    /// Grow the filesystem to the device's size (adopt).
    #[arg(long)]
    grow: bool,
    /// How long to wait for the device to appear.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    wait: Duration,
    /// Leave what containerd's root held hidden under the volume.
    #[arg(long)]
    no_carry_over: bool,
    #[arg(long, value_name = "DIR", default_value = mount::DEFAULT_CARRY_DIR)]
    carry_dir: PathBuf,
    #[command(flatten)]
    flags: ImportFlags,
}

#[derive(Args)]
struct PrefetchArgs {
    /// containerd's socket (the same path on every node of a pool).
    #[arg(long, value_name = "SOCKET", default_value = fallback::DEFAULT_ADDRESS)]
    address: PathBuf,
    /// An image to make present (repeatable; several may follow one --image).
    #[arg(long = "image", value_name = "REF", num_args = 1.., required = true)]
    images: Vec<String>,
    /// Pulls at once.
    #[arg(long, default_value_t = fallback::DEFAULT_CONCURRENCY, value_parser = at_least_one)]
    concurrency: usize,
    #[command(flatten)]
    pull: PullFlags,
    /// Stop after this long, whatever is left (counted from the start).
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
    deadline: Duration,
    /// Keep a JSON status document here, updated as pulls progress.
    #[arg(long, value_name = "FILE")]
    status_file: Option<PathBuf>,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
}

/// How `prefetch` and `import --fallback-pull` pull through CRI.
#[derive(Args)]
struct PullFlags {
    /// A docker config.json whose `auths` hold registry credentials (as
    /// kubelet reads /var/lib/kubelet/config.json).
    #[arg(long, value_name = "FILE")]
    registry_config: Option<PathBuf>,
    /// kubelet's credential provider config (its
    /// --image-credential-provider-config), e.g. for ECR.
    #[arg(long, value_name = "FILE", requires = "credential_provider_bin_dir")]
    credential_provider_config: Option<PathBuf>,
    /// Where the credential provider plugins are (kubelet's
    /// --image-credential-provider-bin-dir).
    #[arg(long, value_name = "DIR", requires = "credential_provider_config")]
    credential_provider_bin_dir: Option<PathBuf>,
    /// Give an image up once its failures add up to this (a refusal from the
    /// registry, such as not found or unauthorized, counts 2).
    #[arg(long, default_value_t = fallback::DEFAULT_MAX_FAILURES, value_parser = clap::value_parser!(u32).range(1..))]
    max_failures: u32,
    /// The first retry waits up to this long; each next one up to twice as long.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    initial_backoff: Duration,
    /// No retry waits longer than this.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
    max_backoff: Duration,
}

/// The credentials kubelet would use: a docker config and the credential
/// provider plugins.
fn load_credentials(flags: &PullFlags) -> Result<Credentials> {
    let mut credentials = Credentials::anonymous();
    if let Some(path) = &flags.registry_config {
        credentials.load_docker_config(path)?;
    }
    if let (Some(config), Some(bin_dir)) = (
        &flags.credential_provider_config,
        &flags.credential_provider_bin_dir,
    ) {
        credentials.load_providers(config, bin_dir)?;
    }
    Ok(credentials)
}

fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("{s:?} is not a whole number of at least 1")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("CORAL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a person: journald and log files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let (result, failure) = match cli.command {
        Command::Mount(args) => (mount_cmd(args), 1),
        Command::Prefetch(args) => (prefetch_cmd(args), 1),
        Command::Prewarm(args) => (prewarm_cmd(args), 1),
        Command::Import(args) => (
            runtime().block_on(import(&args.seed, &args.flags, Instant::now(), None)),
            20,
        ),
        Command::Run(args) => (runtime().block_on(run_cmd(args)), 20),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("coral-node-mounter: error: {e:#}");
            ExitCode::from(failure)
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

fn prewarm_cmd(args: PrewarmArgs) -> Result<ExitCode> {
    let report = coral_node_mounter::prewarm::prewarm(&args.paths, args.jobs)?;
    let json = serde_json::to_string_pretty(&report)?;
    if let Some(path) = &args.report {
        status::write_atomically(path, json.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        println!("{json}");
    } else {
        println!(
            "coral-node-mounter: prewarmed {} files, {} in {:.1} s ({:.0} MB/s){}",
            report.files,
            report.bytes,
            report.seconds,
            report.bytes as f64 / 1e6 / report.seconds.max(0.001),
            if report.errors.is_empty() {
                String::new()
            } else {
                format!(
                    "; {} unreadable: {}",
                    report.errors.len(),
                    report.errors.join("; ")
                )
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Starts `prewarm` of the adopted snapshots as a detached process (its own
/// session, so it outlives this one and a terminal hangup).
fn spawn_prewarm(seed: &Path, args: &ImportFlags) -> Result<u32> {
    use std::os::unix::process::CommandExt;
    let snapshots = seed
        .join(format!("io.containerd.snapshotter.v1.{}", args.snapshotter))
        .join("snapshots");
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.arg("prewarm").arg("--path").arg(&snapshots);
    if let Some(dir) = args.status_file.as_ref().and_then(|f| f.parent()) {
        cmd.arg("--report").arg(dir.join("prewarm.json"));
    }
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: setsid is async-signal-safe and touches no memory.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    Ok(cmd.spawn().context("starting prewarm")?.id())
}

fn mount_cmd(args: MountArgs) -> Result<ExitCode> {
    let opts = MountOptions {
        device: args.device,
        target: args.target,
        grow: args.grow,
        wait: args.wait,
        expect: args.expect,
        read_only: args.read_only,
        roots: HostRoots::default(),
        carry_over: (!args.no_carry_over).then_some(args.carry_dir),
    };
    let mounted = mount::mount(&opts)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&mounted)?);
    } else {
        println!("coral-node-mounter: {}", mounted.summary());
    }
    Ok(ExitCode::SUCCESS)
}

/// No seed volume where one was looked for.
#[derive(Debug, thiserror::Error)]
#[error("no seed volume at {}: {} does not exist", .root.display(), .manifest.display())]
struct NoVolume {
    root: PathBuf,
    manifest: PathBuf,
}

fn read_manifest(root: &Path, expect: Option<&str>) -> Result<SeedManifest> {
    let path = SeedLayout::new(root).manifest();
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(NoVolume {
                root: root.to_path_buf(),
                manifest: path,
            }
            .into());
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "reading {}: is a seed volume mounted at {}?",
                    path.display(),
                    root.display()
                )
            });
        }
    };
    if let Some(want) = expect {
        let want: Digest = want.parse().context("--expect")?;
        let got = Digest::sha256_of(&bytes);
        if got != want {
            bail!(
                "the volume's seed manifest is {got}, but this node expects {want}: refusing to register it"
            );
        }
    }
    SeedManifest::from_json(&bytes).with_context(|| path.display().to_string())
}

/// Whether a containerd answers on `address` within a second.
async fn containerd_answers(address: &Path) -> bool {
    let attempt = async {
        let channel = containerd_client::connect(address).await.ok()?;
        containerd_client::services::v1::version_client::VersionClient::new(channel)
            .version(())
            .await
            .ok()
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), attempt).await,
        Ok(Some(_))
    )
}

async fn run_cmd(mut args: RunArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let expect = match &args.flags.expect {
        Some(e) => Some(e.parse::<Digest>().context("--expect")?),
        None => None,
    };
    // Adopting needs the volume under containerd before containerd starts,
    // unless the volume is its root already (a rerun on a booted node).
    let running =
        mount::containerd_holds(&args.root) || containerd_answers(&args.flags.address).await;
    let volume_is_root = SeedLayout::new(&args.root).manifest().exists();
    if args.flags.mode == Mode::Adopt && running && !volume_is_root {
        eprintln!(
            "coral-node-mounter: containerd is already running at {}: the volume cannot become \
             its root now, so its images are copied (--mode copy) from {}",
            args.flags.address.display(),
            args.copy_target.display()
        );
        args.flags.mode = Mode::Copy;
    }
    let adopting = args.flags.mode == Mode::Adopt;
    let opts = MountOptions {
        device: args.device.clone(),
        target: if adopting {
            args.root.clone()
        } else {
            args.copy_target.clone()
        },
        grow: args.grow && adopting,
        wait: args.wait,
        expect,
        read_only: !adopting,
        roots: HostRoots::default(),
        carry_over: (adopting && !args.no_carry_over).then(|| args.carry_dir.clone()),
    };
    let seed = opts.target.clone();
    let mount_error = match tokio::task::spawn_blocking(move || mount::mount(&opts)).await? {
        Ok(m) => {
            eprintln!("coral-node-mounter: {}", m.summary());
            None
        }
        // The import then finds no manifest, and pulls what it can.
        Err(e) => {
            eprintln!("coral-node-mounter: error: mounting the seed volume: {e}");
            Some(format!("mounting the seed volume: {e}"))
        }
    };
    // containerd starts once the mount is there (systemd: After=coral-mount);
    // the import waits for it.
    import(&seed, &args.flags, started, mount_error).await
}

/// Waits until containerd answers on `address` (it may still be starting).
async fn wait_for_containerd(address: &Path) {
    let mut said = false;
    while !containerd_answers(address).await {
        if !said {
            eprintln!(
                "coral-node-mounter: waiting for containerd at {}",
                address.display()
            );
            said = true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `mount_error`: why `run` could not mount the volume, for the status file.
async fn import(
    seed: &Path,
    args: &ImportFlags,
    started: Instant,
    mount_error: Option<String>,
) -> Result<ExitCode> {
    let deadline = started + args.deadline;
    let mut sf = match &args.status_file {
        Some(path) => StatusFile::new(path),
        None => StatusFile::in_memory(),
    };
    sf.set_phase(Phase::Importing);
    sf.write_or_warn();

    let adopting = async {
        // The volume first: without one there is nothing to wait for
        // containerd for (the status says so at once).
        let manifest = read_manifest(seed, args.expect.as_deref())?;
        // One import of a volume at a time: a second one started meanwhile
        // waits, then finds everything in place.
        let _lock = lock_import(seed).await?;
        wait_for_containerd(&args.address).await;
        adopt_volume(seed, &manifest, args).await
    };
    let adopted = tokio::time::timeout_at(deadline.into(), adopting)
        .await
        .unwrap_or_else(|_| {
            Err(anyhow::anyhow!(
                "the import did not finish within --deadline {:?} (is containerd answering at {}?)",
                args.deadline,
                args.address.display()
            ))
        });
    let mut wanted = Vec::new();
    match &adopted {
        Ok(report) => {
            for img in &report.images {
                wanted.push(img.reference.clone());
                sf.update_image(status::ImageStatus {
                    reference: img.reference.clone(),
                    state: status::ImageState::Seeded,
                    digest: Some(img.image_id.clone()),
                    attempts: 0,
                    last_error: None,
                    seconds: Some(report.seconds),
                    next_retry_at: None,
                });
            }
        }
        Err(e) => {
            eprintln!("coral-node-mounter: error: adopting the volume: {e:#}");
            sf.set_no_volume(mount_error.is_some() || e.chain().any(|c| c.is::<NoVolume>()));
            sf.set_message(Some(match &mount_error {
                Some(m) => m.clone(),
                None => format!("adopting the volume failed: {e:#}"),
            }));
        }
    }
    // Right away: the pulls that follow can take until the deadline.
    if args.prewarm && adopted.is_ok() {
        if args.mode == Mode::Adopt {
            match spawn_prewarm(seed, args) {
                Ok(pid) => {
                    eprintln!("coral-node-mounter: prewarming in the background (pid {pid})")
                }
                Err(e) => eprintln!("coral-node-mounter: warning: {e:#}"),
            }
        } else {
            eprintln!("coral-node-mounter: --prewarm skipped: copy mode already read the volume");
        }
    }
    for extra in &args.images {
        if !wanted.contains(extra) {
            wanted.push(extra.clone());
            if !args.fallback_pull {
                sf.update_image(status::ImageStatus {
                    reference: extra.clone(),
                    state: status::ImageState::Failed,
                    digest: None,
                    attempts: 0,
                    last_error: Some("not on the volume, and --fallback-pull is off".into()),
                    seconds: None,
                    next_retry_at: None,
                });
            }
        }
    }
    sf.write_or_warn();

    let status = Arc::new(Mutex::new(sf));
    if args.fallback_pull && !wanted.is_empty() {
        status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_phase(Phase::Pulling);
        let credentials = match load_credentials(&args.pull) {
            Ok(c) => c,
            Err(e) => {
                // The status must not stay "pulling" for ever.
                let mut sf = status.lock().unwrap_or_else(|p| p.into_inner());
                sf.set_phase(Phase::Failed);
                sf.set_message(Some(format!("{e:#}")));
                sf.set_exit_code(status::EXIT_FAILED);
                sf.write_or_warn();
                return Err(e);
            }
        };
        let options = PullOptions {
            address: args.address.clone(),
            concurrency: fallback::DEFAULT_CONCURRENCY,
            max_failures: args.pull.max_failures,
            initial_backoff: args.pull.initial_backoff,
            max_backoff: args.pull.max_backoff,
            deadline,
        };
        // Images the volume provided are found present: they stay "seeded".
        fallback::ensure_images(&wanted, Arc::new(credentials), &options, status.clone()).await;
    }

    let mut sf = status.lock().unwrap_or_else(|p| p.into_inner());
    let images = sf.status().images.clone();
    let code = if images.is_empty() {
        // Nothing wanted and nothing adopted: a broken volume, no fallback.
        status::EXIT_FAILED
    } else {
        status::exit_code(&images)
    };
    sf.set_phase(if code == status::EXIT_FAILED {
        Phase::Failed
    } else {
        Phase::Done
    });
    sf.set_exit_code(code);
    sf.write_or_warn();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "adopt": adopted.as_ref().ok(),
                "adoptError": adopted.as_ref().err().map(|e| format!("{e:#}")),
                "images": images,
                "exitCode": code,
            }))?
        );
    } else if let Ok(report) = &adopted {
        eprintln!(
            "coral-node-mounter: {} images imported ({} blobs and {} layers registered, {} and {} already there) in {:.3}s",
            report.images.len(),
            report.blobs_adopted,
            report.layers_adopted,
            report.blobs_present,
            report.layers_present,
            report.seconds
        );
    }
    Ok(ExitCode::from(code))
}

/// An exclusive `flock` on the volume's root, held while importing from
/// it: taken at once when free, else waited for (saying so once); the
/// caller's deadline bounds the wait.
async fn lock_import(seed: &Path) -> Result<std::fs::File> {
    let dir = std::fs::File::open(seed).with_context(|| format!("opening {}", seed.display()))?;
    let mut said = false;
    loop {
        match rustix::fs::flock(&dir, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(dir),
            Err(rustix::io::Errno::WOULDBLOCK) => {
                if !said {
                    eprintln!(
                        "coral-node-mounter: another import of {} is running; waiting for it",
                        seed.display()
                    );
                    said = true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                return Err(std::io::Error::from(e))
                    .with_context(|| format!("locking {}", seed.display()));
            }
        }
    }
}

/// Adopts the volume at `seed`, whose manifest (checked against
/// `--expect`) is `manifest`.
async fn adopt_volume(
    seed: &Path,
    manifest: &SeedManifest,
    args: &ImportFlags,
) -> Result<adopt::AdoptReport> {
    let platform = match &args.platform {
        Some(p) => p
            .parse::<Platform>()
            .with_context(|| format!("--platform {p}"))?,
        None => Platform::host(),
    };
    let opts = AdoptOptions {
        mode: match args.mode {
            Mode::Adopt => ImportMode::Adopt,
            Mode::Copy => ImportMode::Copy {
                jobs: args.copy_jobs,
            },
        },
        namespace: args.namespace.clone(),
        snapshotter: args.snapshotter.clone(),
        platform,
        pin: args.pin,
    };
    let channel = containerd_client::connect(&args.address)
        .await
        .with_context(|| format!("connecting to containerd at {}", args.address.display()))?;
    adopt::adopt(channel, seed, manifest, &opts).await
}

fn prefetch_cmd(args: PrefetchArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let mut sf = match &args.status_file {
        Some(path) => StatusFile::new(path),
        None => StatusFile::in_memory(),
    };
    sf.set_phase(Phase::Pulling);
    sf.write_or_warn();

    let credentials = match load_credentials(&args.pull) {
        Ok(c) => c,
        Err(e) => {
            sf.set_phase(Phase::Failed);
            sf.set_message(Some(format!("{e:#}")));
            sf.set_exit_code(1);
            sf.write_or_warn();
            return Err(e);
        }
    };
    let options = PullOptions {
        address: args.address.clone(),
        concurrency: args.concurrency,
        max_failures: args.pull.max_failures,
        initial_backoff: args.pull.initial_backoff,
        max_backoff: args.pull.max_backoff,
        deadline: started + args.deadline,
    };
    let status = Arc::new(Mutex::new(sf));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let results = runtime.block_on(fallback::ensure_images(
        &args.images,
        Arc::new(credentials),
        &options,
        status.clone(),
    ));

    let mut sf = status.lock().unwrap_or_else(|p| p.into_inner());
    // Pulling is what prefetch is for: "some pulled by fallback" is success.
    let code = match status::exit_code(&sf.status().images) {
        status::EXIT_SOME_PULLED => status::EXIT_ALL_SEEDED,
        c => c,
    };
    let count = |s: Source| results.iter().filter(|r| r.source == s).count();
    sf.set_phase(if code == status::EXIT_FAILED {
        Phase::Failed
    } else {
        Phase::Done
    });
    sf.set_message(Some(format!(
        "{} pulled, {} already present, {} failed",
        count(Source::Pulled),
        count(Source::Present),
        count(Source::Failed)
    )));
    sf.set_exit_code(code);
    sf.write_or_warn();

    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "images": results,
                "exitCode": code,
            }))?
        );
    } else {
        for r in &results {
            println!("{}", summary(r));
        }
    }
    Ok(ExitCode::from(code))
}

fn summary(r: &ImageResult) -> String {
    let what = match r.source {
        Source::Present => "present",
        Source::Pulled => "pulled",
        Source::Failed => "failed",
    };
    let attempts = match r.attempts {
        1 => "1 attempt".to_owned(),
        n => format!("{n} attempts"),
    };
    let mut line = format!("{what:<8}{} ({attempts}, {:.1} s)", r.reference, r.seconds);
    if let Some(d) = &r.digest {
        line.push_str(&format!(" {d}"));
    }
    if let (Source::Failed, Some(e)) = (r.source, &r.last_error) {
        line.push_str(&format!(": {e}"));
    }
    line
}
