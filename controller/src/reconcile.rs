//! Reconciling an ImageSeed, inside `kube::runtime::finalizer`:
//!
//! 1. resolve every reference to a digest (the builder's registry code) and
//!    compute the seed key, as the builder will;
//! 2. if no complete snapshot is recorded for that key, follow the builder
//!    Jobs for it (found by labels): create one, wait for it, read the
//!    report its pod leaves in its termination message and record the
//!    snapshot; a failed Job is retried after an exponential backoff
//!    (30 s doubling, at most 10 minutes), derived from the failed Jobs
//!    themselves so that it survives restarts;
//! 3. write the status (only when it changed).
//!
//! Every step is a sequence of awaited requests, in a fixed order, so that
//! tests can drive it with a mock API server.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coral_seed::{Digest, Platform, Reference};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::crd::{
    APPROVE_ANNOTATION, BuildState, FINALIZER, ImageSeed, ImageSeedStatus, ImageState, Phase,
    RebuildPolicy, RolloutPolicy, SnapshotRef, TargetState,
};
use crate::job::{self, JobState};
use crate::rollout;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("{0}")]
    Other(String),
}

/// How references become digests.
#[derive(Clone)]
pub enum Resolver {
    /// The registries themselves, through the builder's client (with the
    /// controller's own credentials; the options make clients with a
    /// seed's pull secrets).
    Registry(
        Arc<coral_builder::registry::RegistryClient>,
        coral_builder::registry::RegistryOptions,
    ),
    /// A fixed table (reference as written → digest), for tests; a
    /// reference missing from it fails to resolve.
    Fixed(Arc<Mutex<BTreeMap<String, String>>>),
}

impl Resolver {
    /// The same resolver, authenticating with `credentials` (a seed's pull
    /// secrets) instead.
    pub fn with_credentials(
        &self,
        credentials: coral_builder::auth::Credentials,
    ) -> Result<Resolver, String> {
        match self {
            Resolver::Fixed(_) => Ok(self.clone()),
            Resolver::Registry(_, options) => {
                let client =
                    coral_builder::registry::RegistryClient::new(options.clone(), credentials)
                        .map_err(|e| e.to_string())?;
                Ok(Resolver::Registry(Arc::new(client), options.clone()))
            }
        }
    }
}

/// The credentials in `seed`'s pull secrets (in the controller's
/// namespace, type `kubernetes.io/dockerconfigjson`): their `auths` only.
async fn pull_credentials(
    seed: &ImageSeed,
    ctx: &Context,
) -> Result<Result<coral_builder::auth::Credentials, String>, Error> {
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let mut sources = Vec::new();
    for s in &seed.spec.pull_secrets {
        let Some(secret) = secrets.get_opt(&s.name).await? else {
            return Ok(Err(format!(
                "pull secret {}/{} does not exist",
                ctx.namespace, s.name
            )));
        };
        if secret.type_.as_deref() != Some("kubernetes.io/dockerconfigjson") {
            return Ok(Err(format!(
                "pull secret {}/{} is not of type kubernetes.io/dockerconfigjson",
                ctx.namespace, s.name
            )));
        }
        let Some(bytes) = secret
            .data
            .as_ref()
            .and_then(|d| d.get(".dockerconfigjson"))
        else {
            return Ok(Err(format!(
                "pull secret {}/{} has no .dockerconfigjson",
                ctx.namespace, s.name
            )));
        };
        sources.push((
            format!("secret {}/{}", ctx.namespace, s.name),
            bytes.0.clone(),
        ));
    }
    Ok(coral_builder::auth::Credentials::from_auths(&sources).map_err(|e| e.to_string()))
}

/// What resolving one reference gave.
pub struct Resolved {
    pub name: Reference,
    pub digest: Digest,
    pub size: Option<u64>,
}

impl Resolver {
    pub async fn resolve(&self, asked: &str, platforms: &[Platform]) -> Result<Resolved, String> {
        let name: Reference = asked.parse().map_err(|e| format!("{e}"))?;
        match self {
            Resolver::Fixed(table) => {
                let digest = table
                    .lock()
                    .expect("not poisoned")
                    .get(asked)
                    .cloned()
                    .ok_or_else(|| format!("{asked}: not found"))?;
                Ok(Resolved {
                    name,
                    digest: digest.parse().map_err(|e| format!("{e}"))?,
                    size: None,
                })
            }
            Resolver::Registry(client, _) => {
                let r = coral_builder::resolve::resolve(client, asked, &name, platforms)
                    .await
                    .map_err(|e| format!("{e}"))?;
                let size = r
                    .images
                    .iter()
                    .map(|i| {
                        i.manifest.size
                            + i.config.size
                            + i.layers.iter().map(|l| l.size).sum::<u64>()
                    })
                    .sum();
                Ok(Resolved {
                    name,
                    digest: r.target.digest,
                    size: Some(size),
                })
            }
        }
    }
}

/// What reconcile needs.
pub struct Context {
    pub client: kube::Client,
    /// The controller's namespace: builder Jobs and pull secrets live here.
    pub namespace: String,
    pub resolver: Resolver,
    /// The coral-builder container image.
    pub builder_image: String,
    /// The operator's pod template for builder Jobs.
    pub job_template: PodTemplateSpec,
    pub recorder: Recorder,
    /// EC2: checking reported snapshots, launch templates.
    pub ec2: aws_sdk_ec2::Client,
}

impl Context {
    pub fn new(
        client: kube::Client,
        namespace: &str,
        resolver: Resolver,
        builder_image: &str,
        job_template: PodTemplateSpec,
        ec2: aws_sdk_ec2::Client,
    ) -> Context {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "coral-controller".into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        );
        Context {
            client,
            namespace: namespace.into(),
            resolver,
            builder_image: builder_image.into(),
            job_template,
            recorder,
            ec2,
        }
    }
}

/// The wait before build attempt `failures + 1`: 30 s doubling, at most
/// 10 minutes.
pub fn backoff(failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let secs = 30u64.saturating_mul(1 << (failures - 1).min(10));
    Duration::from_secs(secs.min(600))
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

fn plus(t: &Time, d: Duration) -> Time {
    Time(t.0 + k8s_openapi::jiff::SignedDuration::try_from(d).unwrap_or_default())
}

fn until(t: &Time) -> Duration {
    let d = t.0.duration_since(k8s_openapi::jiff::Timestamp::now());
    Duration::try_from(d).unwrap_or(Duration::ZERO)
}

/// Sets condition `type_` in `conds`, keeping its transition time when its
/// status did not change.
fn set_condition(
    conds: &mut Vec<Condition>,
    type_: &str,
    ok: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) {
    let status = if ok { "True" } else { "False" };
    let last = conds
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone());
    conds.retain(|c| c.type_ != type_);
    conds.push(Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: last.unwrap_or_else(now),
    });
    conds.sort_by(|a, b| a.type_.cmp(&b.type_));
}

/// The entry point `Controller::run` calls.
pub async fn reconcile(seed: Arc<ImageSeed>, ctx: Arc<Context>) -> Result<Action, Error> {
    let api: Api<ImageSeed> = Api::all(ctx.client.clone());
    finalizer(&api, FINALIZER, seed, |event| async {
        match event {
            Finalizer::Apply(seed) => apply(&seed, &ctx).await,
            Finalizer::Cleanup(seed) => cleanup(&seed, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// What the controller does when a reconcile fails: try again, later.
pub fn error_policy(_seed: Arc<ImageSeed>, error: &Error, _ctx: Arc<Context>) -> Action {
    crate::metrics::inc(&crate::metrics::METRICS.reconcile_errors);
    tracing::warn!("reconcile failed: {error}");
    Action::requeue(Duration::from_secs(30))
}

/// Publishes an event about `seed`. Events of one reason and action form a
/// series (later ones patch the first), so distinct actions get distinct
/// names.
async fn event(ctx: &Context, seed: &ImageSeed, type_: EventType, reason: &str, note: String) {
    event_for(ctx, seed, type_, reason, reason, note).await
}

async fn event_for(
    ctx: &Context,
    seed: &ImageSeed,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let e = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    };
    if let Err(err) = ctx.recorder.publish(&e, &seed.object_ref(&())).await {
        tracing::warn!("publishing event {reason}: {err}");
    }
}

async fn apply(seed: &ImageSeed, ctx: &Context) -> Result<Action, Error> {
    crate::metrics::inc(&crate::metrics::METRICS.reconciles);
    let name = seed.name_any();
    let generation = seed.metadata.generation;
    let before = seed.status.clone().unwrap_or_default();
    let mut st = before.clone();
    st.observed_generation = generation;

    // 1. Resolve.
    let platforms: Result<Vec<Platform>, String> = seed
        .spec
        .platforms
        .iter()
        .map(|p| {
            p.parse::<Platform>()
                .map_err(|e| format!("platform {p:?}: {e}"))
        })
        .collect();
    let platforms = match platforms {
        Ok(p) if !p.is_empty() && !seed.spec.images.is_empty() => p,
        Ok(_) => {
            return invalid(
                seed,
                ctx,
                &before,
                st,
                "the spec names no images or no platforms",
            )
            .await;
        }
        Err(e) => return invalid(seed, ctx, &before, st, &e).await,
    };
    let resolver = if seed.spec.pull_secrets.is_empty() {
        ctx.resolver.clone()
    } else {
        match pull_credentials(seed, ctx)
            .await?
            .and_then(|c| ctx.resolver.with_credentials(c))
        {
            Ok(r) => r,
            Err(e) => return invalid(seed, ctx, &before, st, &e).await,
        }
    };
    let resolve_due = before
        .last_resolved
        .as_ref()
        .is_none_or(|t| until(&plus(t, resolve_interval(seed))).is_zero());
    let mut images = Vec::new();
    let mut resolved = Vec::new();
    let mut retry: Option<Duration> = None;
    let mut asked_registry = false;
    for asked in &seed.spec.images {
        let mut state = st
            .images
            .iter()
            .find(|i| &i.reference == asked)
            .cloned()
            .unwrap_or_else(|| ImageState {
                reference: asked.clone(),
                ..ImageState::default()
            });
        // An unchanged spec keeps the digests it resolved: always under the
        // Manual policy, and until `resolveInterval` has passed otherwise.
        // (Reconciles also follow every status write and Job change; they
        // must not each ask the registries again.)
        let keep = before.observed_generation == generation
            && state.last_error.is_none()
            && (seed.spec.rebuild.policy == RebuildPolicy::Manual || !resolve_due);
        if keep
            && let Some(d) = state
                .resolved_digest
                .as_deref()
                .and_then(|d| d.parse::<Digest>().ok())
            && let Ok(name) = asked.parse::<Reference>()
        {
            resolved.push((name, d));
            images.push(state);
            continue;
        }
        asked_registry = true;
        match resolver.resolve(asked, &platforms).await {
            Ok(r) => {
                state.resolved_digest = Some(r.digest.to_string());
                state.size = r.size.or(state.size);
                state.last_error = None;
                state.failure_count = 0;
                state.next_retry = None;
                resolved.push((r.name, r.digest));
            }
            Err(e) => {
                state.failure_count += 1;
                let wait = backoff(state.failure_count);
                state.last_error = Some(e);
                state.next_retry = Some(plus(&now(), wait));
                retry = Some(retry.map_or(wait, |r| r.min(wait)));
            }
        }
        images.push(state);
    }
    st.images = images;
    if asked_registry {
        st.last_resolved = Some(now());
    }
    if resolved.len() < seed.spec.images.len() {
        let failed: Vec<String> = st
            .images
            .iter()
            .filter_map(|i| i.last_error.clone())
            .collect();
        set_condition(
            &mut st.conditions,
            "Resolved",
            false,
            "ResolveFailed",
            &failed.join("; "),
            generation,
        );
        st.phase = Some(Phase::Resolving);
        write_status(ctx, &name, &before, &st).await?;
        return Ok(Action::requeue(retry.unwrap_or(Duration::from_secs(30))));
    }
    set_condition(
        &mut st.conditions,
        "Resolved",
        true,
        "Resolved",
        "every image resolved",
        generation,
    );
    let key = coral_seed::manifest::seed_key(&platforms, resolved.iter().map(|(n, d)| (n, d)))
        .to_string();
    st.seed_key = Some(key.clone());

    // 2. A complete snapshot for the key, or the build that makes it.
    let action = if let Some(snap) = st
        .history
        .iter()
        .find(|s| s.complete && s.seed_key == key)
        .cloned()
    {
        st.build = None;
        set_condition(
            &mut st.conditions,
            "Built",
            true,
            "Built",
            &format!("snapshot {}", snap.snapshot_id),
            generation,
        );
        st.phase = Some(Phase::Ready);
        Action::requeue(resolve_interval(seed))
    } else {
        follow_build(seed, ctx, &mut st, &key).await?
    };
    // 3. Roll out what the policy says, 4. then collect old snapshots.
    roll_out(seed, ctx, &mut st, &key).await;
    collect(seed, ctx, &mut st).await;
    let current_key = st.current.as_ref().map(|c| c.seed_key.clone());
    for i in &mut st.images {
        i.in_current_snapshot =
            current_key.as_deref() == Some(key.as_str()) && i.resolved_digest.is_some();
    }
    write_status(ctx, &name, &before, &st).await?;
    Ok(action)
}

/// How long until tags are resolved again: `rebuild.resolveInterval`, at
/// least five minutes (an hour when it does not parse).
pub fn resolve_interval(seed: &ImageSeed) -> Duration {
    coral_seed::time::parse_duration(&seed.spec.rebuild.resolve_interval)
        .unwrap_or(Duration::from_secs(3600))
        .max(Duration::from_secs(300))
}

/// The spec cannot be built: say why, and wait for it to change.
async fn invalid(
    seed: &ImageSeed,
    ctx: &Context,
    before: &ImageSeedStatus,
    mut st: ImageSeedStatus,
    why: &str,
) -> Result<Action, Error> {
    set_condition(
        &mut st.conditions,
        "Resolved",
        false,
        "InvalidSpec",
        why,
        seed.metadata.generation,
    );
    st.phase = Some(Phase::Failed);
    write_status(ctx, &seed.name_any(), before, &st).await?;
    Ok(Action::await_change())
}

/// Creates, follows and reads the builder Jobs for `key`.
async fn follow_build(
    seed: &ImageSeed,
    ctx: &Context,
    st: &mut ImageSeedStatus,
    key: &str,
) -> Result<Action, Error> {
    let generation = seed.metadata.generation;
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let mut found = jobs
        .list(&ListParams::default().labels(&job::selector(seed, key)))
        .await?
        .items;
    // Oldest attempt first.
    found.sort_by_key(|j| j.metadata.creation_timestamp.as_ref().map(|t| t.0));
    let failed: Vec<(String, String, Option<Time>)> = found
        .iter()
        .filter_map(|j| match job::job_state(j) {
            JobState::Failed(why) => Some((j.name_any(), why, failed_at(j))),
            _ => None,
        })
        .collect();
    let failures = failed.len() as u32;

    if let Some(done) = found
        .iter()
        .find(|j| job::job_state(j) == JobState::Succeeded)
    {
        let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
        let pod_list = pods
            .list(
                &ListParams::default()
                    .labels(&format!("batch.kubernetes.io/job-name={}", done.name_any())),
            )
            .await?
            .items;
        let report = pod_list
            .iter()
            .filter_map(job::termination_message)
            .find_map(|m| job::parse_report(&m));
        match report {
            Some(r) if r.snapshot_id.as_deref().is_some_and(|s| !s.is_empty()) => {
                let id = r.snapshot_id.clone().unwrap_or_default();
                match rollout::snapshot_usable(&ctx.ec2, &id, &r.seed_key).await? {
                    None => {
                        let why = format!("snapshot {id} of {} is still pending", done.name_any());
                        set_condition(
                            &mut st.conditions,
                            "Built",
                            false,
                            "SnapshotPending",
                            &why,
                            generation,
                        );
                        st.phase = Some(Phase::Building);
                        return Ok(Action::requeue(Duration::from_secs(30)));
                    }
                    Some(false) => {
                        let why = format!(
                            "{} reported snapshot {id}, but EC2 does not show it completed and tagged with \
                             seed key {}: it is not used",
                            done.name_any(),
                            r.seed_key
                        );
                        set_condition(
                            &mut st.conditions,
                            "Built",
                            false,
                            "IncompleteReport",
                            &why,
                            generation,
                        );
                        st.phase = Some(Phase::Failed);
                        return Ok(Action::requeue(Duration::from_secs(600)));
                    }
                    Some(true) => {}
                }
                let snap = SnapshotRef {
                    snapshot_id: r.snapshot_id.clone().unwrap_or_default(),
                    manifest_digest: r.manifest_digest.clone(),
                    seed_key: r.seed_key.clone(),
                    created: done
                        .status
                        .as_ref()
                        .and_then(|s| s.completion_time.clone())
                        .unwrap_or_else(now),
                    complete: true,
                    volume_size_gib: r.volume_size_gib,
                };
                st.history.retain(|h| h.snapshot_id != snap.snapshot_id);
                st.history.insert(0, snap.clone());
                st.build = None;
                if let Some(st) = &done.status
                    && let (Some(a), Some(b)) = (&st.start_time, &st.completion_time)
                    && let Ok(d) = Duration::try_from(b.0.duration_since(a.0))
                {
                    let m = &crate::metrics::METRICS;
                    m.build_millis_sum
                        .fetch_add(d.as_millis() as u64, std::sync::atomic::Ordering::Relaxed);
                    crate::metrics::inc(&m.build_count);
                }
                crate::metrics::inc(&crate::metrics::METRICS.builds_succeeded);
                event(
                    ctx,
                    seed,
                    EventType::Normal,
                    "BuildSucceeded",
                    format!("{} built snapshot {}", done.name_any(), snap.snapshot_id),
                )
                .await;
                if r.seed_key != key {
                    // A tag moved while it built: a complete snapshot of the
                    // older set; the next pass builds the new one.
                    return Ok(Action::requeue(Duration::from_secs(1)));
                }
                set_condition(
                    &mut st.conditions,
                    "Built",
                    true,
                    "Built",
                    &format!("snapshot {}", snap.snapshot_id),
                    generation,
                );
                st.phase = Some(Phase::Ready);
                return Ok(Action::requeue(resolve_interval(seed)));
            }
            _ => {
                // Succeeded without a usable report: never rolled out.
                let why = format!(
                    "{} succeeded but left no complete build report",
                    done.name_any()
                );
                set_condition(
                    &mut st.conditions,
                    "Built",
                    false,
                    "IncompleteReport",
                    &why,
                    generation,
                );
                st.phase = Some(Phase::Failed);
                return Ok(Action::requeue(Duration::from_secs(600)));
            }
        }
    }
    if found.iter().any(|j| job::job_state(j) == JobState::Running) {
        let running = found
            .iter()
            .find(|j| job::job_state(j) == JobState::Running)
            .map(|j| j.name_any());
        st.phase = Some(Phase::Building);
        st.build = Some(BuildState {
            job: running,
            seed_key: key.into(),
            failure_count: failures,
            next_retry: None,
            last_error: failed.last().map(|f| f.1.clone()),
        });
        return Ok(Action::requeue(Duration::from_secs(60)));
    }
    // The next attempt, after the backoff the failures so far call for.
    if let Some((last_job, why, at)) = failed.last() {
        let at = at.clone().unwrap_or_else(now);
        let next = plus(&at, backoff(failures));
        let wait = until(&next);
        if !wait.is_zero() {
            let message = format!(
                "{last_job} failed ({failures} so far; next attempt in {}s): {why}",
                wait.as_secs()
            );
            if st.build.as_ref().map(|b| b.failure_count) != Some(failures) {
                crate::metrics::inc(&crate::metrics::METRICS.builds_failed);
                event(
                    ctx,
                    seed,
                    EventType::Warning,
                    "BuildFailed",
                    message.clone(),
                )
                .await;
            }
            set_condition(
                &mut st.conditions,
                "Built",
                false,
                "BuildFailed",
                &message,
                generation,
            );
            st.phase = Some(Phase::Failed);
            st.build = Some(BuildState {
                job: Some(last_job.clone()),
                seed_key: key.into(),
                failure_count: failures,
                next_retry: Some(next),
                last_error: Some(why.clone()),
            });
            return Ok(Action::requeue(wait));
        }
    }
    let job = job::builder_job(
        seed,
        key,
        failures + 1,
        &ctx.namespace,
        &ctx.builder_image,
        &ctx.job_template,
    );
    let job_name = job.name_any();
    jobs.create(&PostParams::default(), &job).await?;
    crate::metrics::inc(&crate::metrics::METRICS.builds_started);
    event(
        ctx,
        seed,
        EventType::Normal,
        "BuildStarted",
        format!("{job_name} builds seed key {key}"),
    )
    .await;
    set_condition(
        &mut st.conditions,
        "Built",
        false,
        "Building",
        &format!("{job_name} is building"),
        generation,
    );
    st.phase = Some(Phase::Building);
    st.build = Some(BuildState {
        job: Some(job_name),
        seed_key: key.into(),
        failure_count: failures,
        next_retry: None,
        last_error: failed.last().map(|f| f.1.clone()),
    });
    Ok(Action::requeue(Duration::from_secs(60)))
}

/// Decides the snapshot to roll out (pin; else the newest complete one for
/// the current key, else the current one) under the rollout policy, and
/// puts the current one into every target. Failures are reported in the
/// `RolledOut` condition and per target, and retried on the next pass.
async fn roll_out(seed: &ImageSeed, ctx: &Context, st: &mut ImageSeedStatus, key: &str) {
    let generation = seed.metadata.generation;
    let policy = &seed.spec.rollout;
    let wanted = match &policy.pin {
        Some(pin) => match st
            .history
            .iter()
            .find(|h| &h.snapshot_id == pin && h.complete)
        {
            Some(h) => Some(h.clone()),
            None => {
                let why = format!("rollout.pin {pin} is no complete snapshot of this seed");
                set_condition(
                    &mut st.conditions,
                    "RolledOut",
                    false,
                    "PinNotFound",
                    &why,
                    generation,
                );
                None
            }
        },
        None => st
            .history
            .iter()
            .find(|h| h.complete && h.seed_key == key)
            .cloned()
            .or_else(|| st.current.clone()),
    };
    if let Some(w) = wanted {
        let is_current = st.current.as_ref().map(|c| &c.snapshot_id) == Some(&w.snapshot_id);
        let approved = seed.annotations().get(APPROVE_ANNOTATION) == Some(&w.snapshot_id);
        if policy.policy == RolloutPolicy::Manual
            && policy.pin.is_none()
            && !is_current
            && !approved
        {
            if st.pending.as_ref().map(|p| &p.snapshot_id) != Some(&w.snapshot_id) {
                let note = format!(
                    "snapshot {} waits for approval: annotate {APPROVE_ANNOTATION}={}",
                    w.snapshot_id, w.snapshot_id
                );
                event(ctx, seed, EventType::Normal, "ApprovalRequired", note).await;
            }
            st.pending = Some(w);
            st.phase = Some(Phase::AwaitingApproval);
        } else {
            st.pending = None;
            st.current = Some(w);
        }
    }
    let Some(current) = st.current.clone() else {
        return;
    };
    crate::metrics::METRICS
        .snapshot_created
        .lock()
        .expect("not poisoned")
        .insert(seed.name_any(), current.created.0.as_second());
    let mut targets = Vec::new();
    let mut failures = Vec::new();
    for name in &seed.spec.targets.ec2_node_classes {
        let mut t = TargetState {
            kind: "EC2NodeClass".into(),
            name: name.clone(),
            snapshot_id: current.snapshot_id.clone(),
            ..TargetState::default()
        };
        match rollout::node_class(&ctx.client, name, seed, &current).await {
            Ok(true) => {
                let note = format!(
                    "EC2NodeClass {name} now launches nodes with snapshot {}",
                    current.snapshot_id
                );
                event_for(
                    ctx,
                    seed,
                    EventType::Normal,
                    "RolledOut",
                    "PatchEC2NodeClass",
                    note,
                )
                .await;
            }
            Ok(false) => {}
            Err(e) => {
                t.error = Some(e.to_string());
                failures.push(format!("EC2NodeClass {name}: {e}"));
            }
        }
        targets.push(t);
    }
    for id in &seed.spec.targets.launch_templates {
        let mut t = TargetState {
            kind: "LaunchTemplate".into(),
            name: id.clone(),
            snapshot_id: current.snapshot_id.clone(),
            ..TargetState::default()
        };
        if let Some(b) = st
            .targets
            .iter()
            .find(|x| x.kind == t.kind && x.name == t.name)
        {
            t.version = b.version;
            t.original_version = b.original_version;
        }
        match rollout::launch_template(&ctx.ec2, id, seed, &current).await {
            Ok(Some((v, replaced))) => {
                t.version = Some(v);
                // The default before coral's first version: what `Delete`
                // restores.
                t.original_version = t.original_version.or(Some(replaced));
                let note = format!(
                    "launch template {id} version {v} (default) has snapshot {}",
                    current.snapshot_id
                );
                event_for(
                    ctx,
                    seed,
                    EventType::Normal,
                    "RolledOut",
                    "CreateLaunchTemplateVersion",
                    note,
                )
                .await;
            }
            Ok(None) => {}
            Err(e) => {
                t.error = Some(e.to_string());
                failures.push(format!("launch template {id}: {e}"));
            }
        }
        targets.push(t);
    }
    st.targets = targets;
    if failures.is_empty() {
        let msg = format!("snapshot {}", current.snapshot_id);
        set_condition(
            &mut st.conditions,
            "RolledOut",
            true,
            "RolledOut",
            &msg,
            generation,
        );
    } else {
        set_condition(
            &mut st.conditions,
            "RolledOut",
            false,
            "RolloutFailed",
            &failures.join("; "),
            generation,
        );
    }
}

/// Deletes this seed's snapshots beyond the newest `snapshot.retention`,
/// except the current, pending and pinned ones and any still in use (a
/// volume made from it, a target launch template's default version) or not
/// tagged as this seed's. Failures are logged and retried next pass.
async fn collect(seed: &ImageSeed, ctx: &Context, st: &mut ImageSeedStatus) {
    let name = seed.name_any();
    let keep = seed.spec.snapshot.retention.max(1) as usize;
    let protected: Vec<&str> = [
        st.current.as_ref().map(|c| c.snapshot_id.as_str()),
        st.pending.as_ref().map(|p| p.snapshot_id.as_str()),
        seed.spec.rollout.pin.as_deref(),
    ]
    .into_iter()
    .flatten()
    .collect();
    let mut gone = Vec::new();
    for (i, h) in st.history.iter().enumerate() {
        if i < keep || protected.contains(&h.snapshot_id.as_str()) {
            continue;
        }
        let id = h.snapshot_id.clone();
        match rollout::snapshot_in_use(&ctx.ec2, &id, &seed.spec.targets.launch_templates).await {
            Ok(true) => continue,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(seed = %name, snapshot = %id, "checking whether it is in use: {e}");
                continue;
            }
        }
        match rollout::delete_snapshot(&ctx.ec2, &id, &name).await {
            Ok(true) => {
                let note = format!("snapshot {id} deleted (beyond the newest {keep}, unused)");
                event_for(
                    ctx,
                    seed,
                    EventType::Normal,
                    "SnapshotDeleted",
                    "DeleteSnapshot",
                    note,
                )
                .await;
                crate::metrics::inc(&crate::metrics::METRICS.snapshots_deleted);
                gone.push(id);
            }
            Ok(false) => {
                tracing::warn!(seed = %name, snapshot = %id, "not tagged as this seed's: kept")
            }
            Err(e) => tracing::warn!(seed = %name, snapshot = %id, "deleting: {e}"),
        }
    }
    st.history.retain(|h| !gone.contains(&h.snapshot_id));
    if seed.spec.targets.attach.is_some() {
        match crate::nodes::collect_volumes(seed, ctx).await {
            Ok(volumes) => {
                for v in volumes {
                    let note = format!(
                        "attach-mode volume {v} deleted: never attached, or its node is gone"
                    );
                    event_for(
                        ctx,
                        seed,
                        EventType::Normal,
                        "VolumeDeleted",
                        "DeleteVolume",
                        note,
                    )
                    .await;
                }
            }
            Err(e) => tracing::warn!(seed = %name, "collecting attach-mode volumes: {e}"),
        }
    }
}

/// When a failed Job failed (its Failed condition's transition time).
fn failed_at(j: &Job) -> Option<Time> {
    j.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Failed" && c.status == "True")?
        .last_transition_time
        .clone()
}

/// The JSON merge patch (RFC 7386) that turns `old` into `new`: `new`
/// itself, with `null` for every key `old` has and `new` lacks, at every
/// depth (a merge patch that merely omits a key leaves it in place).
pub fn merge_patch(old: &serde_json::Value, new: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match (old, new) {
        (Value::Object(o), Value::Object(n)) => {
            let mut out = serde_json::Map::new();
            for (k, v) in n {
                let prev = o.get(k).unwrap_or(&Value::Null);
                out.insert(k.clone(), merge_patch(prev, v));
            }
            for k in o.keys() {
                if !n.contains_key(k) {
                    out.insert(k.clone(), Value::Null);
                }
            }
            Value::Object(out)
        }
        (_, n) => n.clone(),
    }
}

async fn write_status(
    ctx: &Context,
    name: &str,
    before: &ImageSeedStatus,
    after: &ImageSeedStatus,
) -> Result<(), Error> {
    if before == after {
        return Ok(());
    }
    let api: Api<ImageSeed> = Api::all(ctx.client.clone());
    let patch = merge_patch(
        &serde_json::to_value(before).unwrap_or_default(),
        &serde_json::to_value(after).unwrap_or_default(),
    );
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": patch })),
    )
    .await?;
    Ok(())
}

/// Deleting an ImageSeed: its builder Jobs go; under `deletionPolicy:
/// Delete` also coral's device leaves the target EC2NodeClasses (which
/// drifts their nodes), each target launch template gets its original
/// default version back, and the seed's snapshots nothing uses are
/// deleted. The finalizer always completes: failures are retried, and ten
/// minutes after the deletion what is left is named in a Warning event and
/// the finalizer goes anyway.
async fn cleanup(seed: &ImageSeed, ctx: &Context) -> Result<Action, Error> {
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let selector = format!("{}={}", job::LABEL_SEED_UID, seed.uid().unwrap_or_default());
    jobs.delete_collection(
        &DeleteParams::background(),
        &ListParams::default().labels(&selector),
    )
    .await?;
    let mut left = Vec::new();
    if seed.spec.deletion_policy == crate::crd::DeletionPolicy::Delete {
        for name in &seed.spec.targets.ec2_node_classes {
            if let Err(e) = rollout::remove_from_node_class(&ctx.client, name, seed).await {
                left.push(format!("EC2NodeClass {name}: {e}"));
            }
        }
        let st = seed.status.clone().unwrap_or_default();
        for t in st.targets.iter().filter(|t| t.kind == "LaunchTemplate") {
            if let Some(v) = t.original_version
                && let Err(e) = rollout::restore_default(&ctx.ec2, &t.name, v).await
            {
                left.push(format!("launch template {}: {e}", t.name));
            }
        }
        for h in &st.history {
            match rollout::snapshot_in_use(&ctx.ec2, &h.snapshot_id, &[]).await {
                Ok(true) => left.push(format!("snapshot {} (still in use)", h.snapshot_id)),
                Ok(false) => {
                    if let Err(e) =
                        rollout::delete_snapshot(&ctx.ec2, &h.snapshot_id, &seed.name_any()).await
                    {
                        left.push(format!("snapshot {}: {e}", h.snapshot_id));
                    }
                }
                Err(e) => left.push(format!("snapshot {}: {e}", h.snapshot_id)),
            }
        }
    }
    let deleted_for = seed
        .metadata
        .deletion_timestamp
        .as_ref()
        .map(|t| k8s_openapi::jiff::Timestamp::now().duration_since(t.0))
        .and_then(|d| Duration::try_from(d).ok())
        .unwrap_or(Duration::ZERO);
    let retrying = left.iter().any(|l| !l.ends_with("(still in use)"));
    if retrying && deleted_for < Duration::from_secs(600) {
        return Err(Error::Other(format!(
            "cleanup incomplete, retrying: {}",
            left.join("; ")
        )));
    }
    if left.is_empty() {
        event(
            ctx,
            seed,
            EventType::Normal,
            "Deleted",
            "builder Jobs removed".into(),
        )
        .await;
    } else {
        let note = format!("left behind: {}", left.join("; "));
        event(ctx, seed, EventType::Warning, "CleanupIncomplete", note).await;
    }
    Ok(Action::await_change())
}
