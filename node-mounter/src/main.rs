//! The `coral-node-mounter` command line: one subcommand per step of a
//! node's bootstrap. Each subcommand's module documents its exit codes;
//! every subcommand exits 1 on an error it reports on stderr, and 2 when its
//! command line does not parse.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use coral_node_mounter::mount::{self, DeviceSpec, HostRoots, MountOptions};
use coral_seed::Digest;

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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("CORAL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Mount(args) => mount_cmd(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("coral-node-mounter: error: {e:#}");
            ExitCode::from(1)
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
