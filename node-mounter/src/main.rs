//! The `coral-node-mounter` command line: one subcommand per step of a
//! node's bootstrap. Each subcommand's module documents its exit codes;
//! every subcommand exits 1 on an error it reports on stderr, and 2 when its
//! command line does not parse.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use coral_node_mounter::adopt::{self, AdoptOptions};
use coral_node_mounter::mount::{self, DeviceSpec, HostRoots, MountOptions};
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
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = mount::parse_duration)]
    wait: Duration,
    /// The digest the volume's `.coral/manifest.json` must have (sha256:…).
    #[arg(long, value_name = "MANIFEST_DIGEST")]
    expect: Option<Digest>,
    /// Mount read-only.
    #[arg(long)]
    read_only: bool,
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
    /// containerd's socket (the same path on every node of a pool).
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    address: PathBuf,
    /// The mounted seed volume (for adopt: containerd's root directory).
    #[arg(long)]
    seed: PathBuf,
    #[arg(long, value_enum, default_value = "adopt")]
    mode: Mode,
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
    /// Give up after this long (e.g. 60s).
    #[arg(long, value_name = "DURATION")]
    deadline: Option<String>,
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("CORAL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let (result, failure) = match cli.command {
        Command::Mount(args) => (mount_cmd(args), 1),
        Command::Import(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("a tokio runtime");
            (runtime.block_on(import(args)), 20)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("coral-node-mounter: error: {e:#}");
            ExitCode::from(failure)
        }
    }
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
    };
    let mounted = mount::mount(&opts)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&mounted)?);
    } else {
        println!("coral-node-mounter: {}", mounted.summary());
    }
    Ok(ExitCode::SUCCESS)
}

fn read_manifest(root: &Path, expect: Option<&str>) -> Result<SeedManifest> {
    let path = SeedLayout::new(root).manifest();
    let bytes = std::fs::read(&path).with_context(|| {
        format!(
            "reading {}: is a seed volume mounted at {}?",
            path.display(),
            root.display()
        )
    })?;
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

async fn import(args: ImportArgs) -> Result<ExitCode> {
    let manifest = read_manifest(&args.seed, args.expect.as_deref())?;
    if args.mode == Mode::Copy {
        bail!("--mode copy is not implemented yet");
    }
    let platform = match &args.platform {
        Some(p) => p
            .parse::<Platform>()
            .with_context(|| format!("--platform {p}"))?,
        None => Platform::host(),
    };
    let opts = AdoptOptions {
        namespace: args.namespace.clone(),
        snapshotter: args.snapshotter.clone(),
        platform,
        pin: args.pin,
    };
    let work = async {
        let channel = containerd_client::connect(&args.address)
            .await
            .with_context(|| format!("connecting to containerd at {}", args.address.display()))?;
        adopt::adopt(channel, &args.seed, &manifest, &opts).await
    };
    let deadline = args
        .deadline
        .as_deref()
        .map(mount::parse_duration)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--deadline: {e}"))?;
    let report = match deadline {
        Some(d) => tokio::time::timeout(d, work)
            .await
            .map_err(|_| anyhow::anyhow!("the import did not finish within --deadline {d:?}"))??,
        None => work.await?,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        eprintln!(
            "coral-node-mounter: {} images ready ({} blobs and {} layers adopted, {} and {} already there) in {:.3}s",
            report.images.len(),
            report.blobs_adopted,
            report.layers_adopted,
            report.blobs_present,
            report.layers_present,
            report.seconds
        );
    }
    Ok(ExitCode::SUCCESS)
}
