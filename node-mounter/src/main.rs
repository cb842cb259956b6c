//! The `coral-node-mounter` command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use coral_node_mounter::adopt::{self, AdoptOptions};
use coral_seed::{Digest, Platform, SeedLayout, SeedManifest};

#[derive(Parser)]
#[command(
    name = "coral-node-mounter",
    version,
    about = "Makes a coral seed volume's images ready in the node's containerd; pulls the rest through CRI."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Register a mounted seed volume's images with containerd.
    Import(ImportArgs),
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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let result = match cli.command {
        Command::Import(args) => runtime.block_on(import(args)),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("coral-node-mounter: error: {e:#}");
            ExitCode::from(20)
        }
    }
}

fn parse_duration(s: &str) -> Result<Duration> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .with_context(|| format!("{s:?} is not a duration (30s, 2m, 500ms)"))?;
    Ok(match unit {
        "ms" => Duration::from_millis(n),
        "s" | "" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => bail!("{s:?} is not a duration (30s, 2m, 500ms)"),
    })
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
    let report = match args.deadline.as_deref().map(parse_duration).transpose()? {
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
