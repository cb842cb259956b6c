//! The `coral-node-mounter` command line: one subcommand per step of a
//! node's bootstrap. Each subcommand documents its exit codes; every
//! subcommand exits 1 on an error it reports on stderr (it could not do
//! what was asked: a bad configuration), and 2 when its command line does
//! not parse.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use coral_node_mounter::fallback::{self, Credentials, ImageResult, PullOptions, Source};
use coral_node_mounter::status::{self, Phase, StatusFile};
use coral_seed::time::parse_duration;

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
    /// Pull images through CRI, as kubelet would, on a node without a seed
    /// volume: exit 0 when every image is in containerd (pulled or already
    /// there), 20 when any is not (failed, or the deadline passed).
    Prefetch(PrefetchArgs),
}

#[derive(Args)]
struct PrefetchArgs {
    /// containerd's socket (the same path on every node of a pool).
    #[arg(long, value_name = "SOCKET", default_value = fallback::DEFAULT_ADDRESS)]
    address: PathBuf,
    /// An image to make present (repeatable; several may follow one --image).
    #[arg(long = "image", value_name = "REF", num_args = 1.., required = true)]
    images: Vec<String>,
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
    /// Pulls at once.
    #[arg(long, default_value_t = fallback::DEFAULT_CONCURRENCY, value_parser = at_least_one)]
    concurrency: usize,
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
    let result = match cli.command {
        Command::Prefetch(args) => prefetch_cmd(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("coral-node-mounter: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn prefetch_cmd(args: PrefetchArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let mut sf = match &args.status_file {
        Some(path) => StatusFile::new(path),
        None => StatusFile::in_memory(),
    };
    sf.set_phase(Phase::Pulling);
    sf.write_or_warn();

    let credentials = match load_credentials(&args) {
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
        max_failures: args.max_failures,
        initial_backoff: args.initial_backoff,
        max_backoff: args.max_backoff,
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

fn load_credentials(args: &PrefetchArgs) -> Result<Credentials> {
    let mut credentials = Credentials::anonymous();
    if let Some(path) = &args.registry_config {
        credentials.load_docker_config(path)?;
    }
    if let (Some(config), Some(bin_dir)) = (
        &args.credential_provider_config,
        &args.credential_provider_bin_dir,
    ) {
        credentials.load_providers(config, bin_dir)?;
    }
    Ok(credentials)
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
