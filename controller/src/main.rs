//! The `coral-controller` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use clap::{Args, Parser, Subcommand};
use coral_controller::crd::ImageSeed;
use coral_controller::job::{ANNOTATION_SEED, LABEL_MANAGED_BY};
use coral_controller::nodes::reconcile_node;
use coral_controller::reconcile::{Context, Resolver, error_policy, reconcile};
use futures_util::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Node, PodTemplateSpec};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Api, CustomResourceExt, ResourceExt};

#[derive(Parser)]
#[command(
    name = "coral-controller",
    version,
    about = "The ImageSeed operator: builds seed volume snapshots and rolls them out to nodes."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the ImageSeed CustomResourceDefinition (YAML).
    Crd,
    /// Run the operator (in a cluster, or with a kubeconfig).
    Run(RunArgs),
    /// Run on a node (DaemonSet): put the node mounter's status on this
    /// Node (annotation `coral.dev/seed-status`, condition `CoralSeeded`).
    NodeAgent(AgentArgs),
}

#[derive(Args)]
struct AgentArgs {
    /// This node's name (from the downward API).
    #[arg(long, env = "NODE_NAME")]
    node: String,
    /// The node mounter's status file, as mounted from the host.
    #[arg(long, default_value = "/host/run/coral/status.json")]
    status_file: PathBuf,
    /// How often the file is read.
    #[arg(long, default_value_t = 5)]
    interval_seconds: u64,
    /// On a node without a seed volume, pull the ImageSeeds' images through
    /// CRI with this node mounter binary (`prefetch`), once.
    #[arg(long, value_name = "PATH")]
    prefetch_with: Option<PathBuf>,
    /// containerd's socket, as mounted from the host (for the prefetch).
    #[arg(long, default_value = "/host/run/containerd/containerd.sock")]
    containerd_address: PathBuf,
    /// No status file this long after the agent started means the node
    /// mounter did not run: the node has no volume.
    #[arg(long, default_value_t = 120)]
    prefetch_grace_seconds: u64,
}

#[derive(Args)]
struct RunArgs {
    /// The controller's own namespace: builder Jobs and pull secrets live here.
    #[arg(long, env = "POD_NAMESPACE", default_value = "coral-system")]
    namespace: String,
    /// The coral-builder container image builder Jobs run.
    #[arg(long, env = "CORAL_BUILDER_IMAGE")]
    builder_image: String,
    /// A pod template (YAML `PodTemplateSpec`) for builder Jobs: service
    /// account, resources, node selector, tolerations.
    #[arg(long, value_name = "FILE")]
    job_template: Option<PathBuf>,
    /// A docker config.json for resolving tags (default: none, anonymous).
    #[arg(long, value_name = "FILE")]
    registry_config: Option<PathBuf>,
    /// Where /metrics, /healthz and /readyz are served.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_addr: String,
    /// This replica's name in the leader Lease (default: the pod's name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("CORAL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .json()
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Crd => serde_norway::to_string(&ImageSeed::crd())
            .map(|text| print!("{text}"))
            .map_err(anyhow::Error::from),
        Command::Run(args) => tokio::runtime::Runtime::new()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(run(args))),
        Command::NodeAgent(args) => tokio::runtime::Runtime::new()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(node_agent(args))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("coral-controller: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: RunArgs) -> Result<()> {
    let template: PodTemplateSpec = match &args.job_template {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            serde_norway::from_str(&text)
                .with_context(|| format!("{} is not a PodTemplateSpec", p.display()))?
        }
        None => PodTemplateSpec::default(),
    };
    let credentials = coral_builder::auth::Credentials::load(args.registry_config.as_deref())?;
    let options = coral_builder::registry::RegistryOptions::default();
    let registry = coral_builder::registry::RegistryClient::new(options.clone(), credentials)?;
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let listener = tokio::net::TcpListener::bind(&args.metrics_addr)
        .await
        .with_context(|| format!("listening on {}", args.metrics_addr))?;
    tokio::spawn(coral_controller::metrics::serve(listener));
    // Only the holder of the Lease acts; a standby waits for it.
    let identity = args
        .identity
        .clone()
        .unwrap_or_else(|| format!("coral-controller-{}", std::process::id()));
    let lease_for = std::time::Duration::from_secs(15);
    let elector = coral_controller::lease::Elector::new(
        client.clone(),
        &args.namespace,
        "coral-controller",
        &identity,
        lease_for,
    );
    loop {
        match elector.try_acquire_or_renew().await {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => tracing::warn!("taking the leader Lease: {e}"),
        }
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    }
    coral_controller::metrics::METRICS
        .leader
        .store(1, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(%identity, "leading");
    // Renewal: losing the Lease (or failing to renew it for its whole
    // duration) stops this replica, so two never act at once.
    let keep = async {
        let mut last_ok = std::time::Instant::now();
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            match elector.try_acquire_or_renew().await {
                Ok(true) => last_ok = std::time::Instant::now(),
                Ok(false) => return anyhow::anyhow!("another replica took the leader Lease"),
                Err(e) => {
                    tracing::warn!("renewing the leader Lease: {e}");
                    if last_ok.elapsed() >= lease_for {
                        return anyhow::anyhow!(
                            "the leader Lease could not be renewed for {lease_for:?}"
                        );
                    }
                }
            }
        }
    };
    let ctx = Arc::new(Context::new(
        client.clone(),
        &args.namespace,
        Resolver::Registry(Arc::new(registry), options),
        &args.builder_image,
        template,
        aws_sdk_ec2::Client::new(&aws_config::load_from_env().await),
    ));
    let seeds: Api<ImageSeed> = Api::all(client.clone());
    let jobs: Api<Job> = Api::namespaced(client.clone(), &args.namespace);
    let nodes: Api<Node> = Api::all(client);
    // Nodes: lift startup taints (a node's own changes, the agent's
    // annotation included, wake it; deadlines requeue it).
    let gating = Controller::new(nodes, watcher::Config::default())
        .shutdown_on_signal()
        .run(reconcile_node, node_error_policy, ctx.clone())
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::warn!("node reconcile: {e}");
            }
        });
    // Jobs map to their ImageSeed by annotation: `owns` would look the
    // cluster-scoped owner up in the Job's namespace and never find it.
    let seeding = Controller::new(seeds, watcher::Config::default().any_semantic())
        .watches(
            jobs,
            watcher::Config::default().labels(&format!("{LABEL_MANAGED_BY}=coral")),
            |job: Job| {
                job.annotations()
                    .get(ANNOTATION_SEED)
                    .map(|name| ObjectRef::<ImageSeed>::new(name))
            },
        )
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, action)) => tracing::info!(seed = %obj.name, ?action, "reconciled"),
                Err(e) => tracing::warn!("reconcile: {e}"),
            }
        });
    tokio::select! {
        _ = async { tokio::join!(seeding, gating) } => Ok(()),
        lost = keep => Err(lost),
    }
}

fn node_error_policy(
    _node: Arc<Node>,
    error: &coral_controller::reconcile::Error,
    _ctx: Arc<Context>,
) -> kube::runtime::controller::Action {
    tracing::warn!("node reconcile failed: {error}");
    kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(30))
}

async fn node_agent(args: AgentArgs) -> Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let mut tick =
        tokio::time::interval(std::time::Duration::from_secs(args.interval_seconds.max(1)));
    let started = std::time::Instant::now();
    let mut prefetched = false;
    loop {
        tick.tick().await;
        if let Err(e) =
            coral_controller::nodes::report(&client, &args.node, &args.status_file).await
        {
            tracing::warn!(node = %args.node, "reporting the seed status: {e}");
        }
        let Some(mounter) = &args.prefetch_with else {
            continue;
        };
        if prefetched {
            continue;
        }
        let status: Option<serde_json::Value> = std::fs::read(&args.status_file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let grace = std::time::Duration::from_secs(args.prefetch_grace_seconds);
        if !coral_controller::nodes::needs_prefetch(status.as_ref(), started.elapsed(), grace) {
            continue;
        }
        let seeds: Api<ImageSeed> = Api::all(client.clone());
        let images = match seeds.list(&Default::default()).await {
            Ok(l) => coral_controller::nodes::prefetch_images(&l.items),
            Err(e) => {
                tracing::warn!("listing ImageSeeds for the prefetch: {e}");
                continue;
            }
        };
        prefetched = true;
        if images.is_empty() {
            continue;
        }
        // The host's /run/coral is mounted read-only: the prefetch's own
        // status goes to the agent's temporary directory.
        let status_file = std::env::temp_dir().join("coral-prefetch.json");
        let argv =
            coral_controller::nodes::prefetch_args(&args.containerd_address, &images, &status_file);
        tracing::info!(
            images = images.len(),
            "no seed volume: prefetching through CRI"
        );
        match tokio::process::Command::new(mounter)
            .args(&argv)
            .status()
            .await
        {
            Ok(s) => tracing::info!(status = %s, "prefetch finished"),
            Err(e) => tracing::warn!("running {}: {e}", mounter.display()),
        }
    }
}
