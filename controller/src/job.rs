//! The builder Job: its name, labels, arguments and pod, made from the
//! operator's template; and the report the builder leaves in its
//! termination message.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Container, EmptyDirVolumeSource, KeyToPath, Pod, PodSpec, PodTemplateSpec, SecretVolumeSource,
    SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};

use serde::Deserialize;

use crate::crd::{ImageSeed, SnapshotBackend};

pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const LABEL_SEED_UID: &str = "coral.dev/imageseed-uid";
pub const LABEL_KEY_HASH: &str = "coral.dev/seed-key-hash";
pub const ANNOTATION_SEED: &str = "coral.dev/imageseed";
pub const ANNOTATION_KEY: &str = "coral.dev/seed-key";
/// Tags every snapshot of an ImageSeed carries (besides the builder's own).
pub const TAG_IMAGESEED: &str = "coral.dev/imageseed";
pub const CONTAINER: &str = "builder";
const WORK: &str = "/work";

/// The first 16 hex digits of a seed key (`sha256:…`), for labels and names.
pub fn key_hash(seed_key: &str) -> String {
    seed_key
        .strip_prefix("sha256:")
        .unwrap_or(seed_key)
        .chars()
        .take(16)
        .collect()
}

/// `coral-<seed>-<key hash 10>-<attempt>`, within Kubernetes' 63 characters.
pub fn job_name(seed: &ImageSeed, seed_key: &str, attempt: u32) -> String {
    let name = seed.name_any();
    let short: String = name.chars().take(36).collect();
    format!(
        "coral-{}-{}-{attempt}",
        short.trim_end_matches('-'),
        &key_hash(seed_key)[..10]
    )
}

/// The label selector of a seed's Jobs for one key.
pub fn selector(seed: &ImageSeed, seed_key: &str) -> String {
    format!(
        "{LABEL_SEED_UID}={},{LABEL_KEY_HASH}={}",
        seed.uid().unwrap_or_default(),
        key_hash(seed_key)
    )
}

/// Where pull secret `name` is mounted in the builder.
fn secret_dir(name: &str) -> String {
    format!("/secrets/{name}")
}

/// The `coral-builder` arguments that build `seed`'s images into a
/// snapshot. Images go as the spec writes them (not pinned to digests: a
/// pinned reference would name the image `repo:tag@sha256:…` on nodes and
/// change the seed key); the report's seed key says what was built.
pub fn builder_args(seed: &ImageSeed) -> Vec<String> {
    let spec = &seed.spec;
    let mut args = vec!["build".to_string()];
    for i in &spec.images {
        args.extend(["--image".into(), i.clone()]);
    }
    for p in &spec.platforms {
        args.extend(["--platform".into(), p.clone()]);
    }
    args.extend(["--output".into(), format!("{WORK}/seed.img")]);
    if spec.volume.size_gib > 0 {
        args.extend(["--size".into(), format!("{}GiB", spec.volume.size_gib)]);
    }
    args.extend([
        "--fs".into(),
        match spec.volume.filesystem {
            crate::crd::Filesystem::Ext4 => "ext4".into(),
            crate::crd::Filesystem::Xfs => "xfs".into(),
        },
    ]);
    for s in &spec.pull_secrets {
        args.extend([
            "--registry-config".into(),
            format!("{}/config.json", secret_dir(&s.name)),
        ]);
    }
    args.extend([
        "--snapshot".into(),
        match spec.snapshot.backend {
            SnapshotBackend::EbsDirect => "ebs-direct".into(),
            SnapshotBackend::Ebs => "ebs".into(),
        },
    ]);
    if let Some(k) = &spec.snapshot.kms_key_id {
        args.extend(["--kms-key".into(), k.clone()]);
    }
    let mut tags = spec.snapshot.tags.clone();
    tags.insert(TAG_IMAGESEED.into(), seed.name_any());
    for (k, v) in tags {
        args.extend(["--tag".into(), format!("{k}={v}")]);
    }
    args.extend(["--progress".into(), "json".into(), "--json".into()]);
    args
}

/// The Job that builds `seed` for `seed_key`, from the operator's pod
/// template (service account, resources, node selector, tolerations): the
/// controller adds the `builder` container (privileged: it attaches loop
/// devices and mounts the image it builds), a work volume and the pull
/// secrets.
pub fn builder_job(
    seed: &ImageSeed,
    seed_key: &str,
    attempt: u32,
    namespace: &str,
    image: &str,
    template: &PodTemplateSpec,
) -> Job {
    let name = job_name(seed, seed_key, attempt);
    let mut labels = BTreeMap::from([
        (LABEL_MANAGED_BY.to_string(), "coral".to_string()),
        (LABEL_SEED_UID.to_string(), seed.uid().unwrap_or_default()),
        (LABEL_KEY_HASH.to_string(), key_hash(seed_key)),
    ]);
    let annotations = BTreeMap::from([
        (ANNOTATION_SEED.to_string(), seed.name_any()),
        (ANNOTATION_KEY.to_string(), seed_key.to_string()),
    ]);
    let mut pod = template.clone();
    let meta = pod.metadata.get_or_insert_with(ObjectMeta::default);
    meta.labels
        .get_or_insert_with(BTreeMap::new)
        .extend(labels.clone());
    let spec = pod.spec.get_or_insert_with(PodSpec::default);
    spec.restart_policy = Some("Never".into());
    let mut mounts = vec![VolumeMount {
        name: "work".into(),
        mount_path: WORK.into(),
        ..VolumeMount::default()
    }];
    let volumes = spec.volumes.get_or_insert_with(Vec::new);
    volumes.push(Volume {
        name: "work".into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    });
    for (i, s) in seed.spec.pull_secrets.iter().enumerate() {
        let vol = format!("pull-secret-{i}");
        volumes.push(Volume {
            name: vol.clone(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(s.name.clone()),
                items: Some(vec![KeyToPath {
                    key: ".dockerconfigjson".into(),
                    path: "config.json".into(),
                    ..KeyToPath::default()
                }]),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: vol,
            mount_path: secret_dir(&s.name),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    let template_container = spec
        .containers
        .iter()
        .find(|c| c.name == CONTAINER)
        .cloned()
        .unwrap_or_default();
    spec.containers.retain(|c| c.name != CONTAINER);
    spec.containers.insert(
        0,
        Container {
            name: CONTAINER.into(),
            image: Some(image.into()),
            args: Some(builder_args(seed)),
            volume_mounts: Some(mounts),
            security_context: Some(SecurityContext {
                privileged: Some(true),
                ..SecurityContext::default()
            }),
            termination_message_policy: Some("FallbackToLogsOnError".into()),
            resources: template_container.resources,
            env: template_container.env,
            ..Container::default()
        },
    );
    labels.insert("app.kubernetes.io/name".into(), "coral-builder".into());
    Job {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(namespace.into()),
            labels: Some(labels),
            annotations: Some(annotations),
            // Kubernetes removes the Job with its ImageSeed.
            owner_references: seed.controller_owner_ref(&()).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(0),
            active_deadline_seconds: Some(7200),
            ttl_seconds_after_finished: Some(86400),
            template: pod,
            ..JobSpec::default()
        }),
        status: None,
    }
}

/// How a Job ended, from its status conditions.
#[derive(Debug, Clone, PartialEq)]
pub enum JobState {
    Running,
    Succeeded,
    Failed(String),
}

pub fn job_state(job: &Job) -> JobState {
    let conds = job
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    for c in conds {
        if c.status != "True" {
            continue;
        }
        match c.type_.as_str() {
            "Complete" => return JobState::Succeeded,
            "Failed" => {
                return JobState::Failed(
                    c.message
                        .or(c.reason)
                        .unwrap_or_else(|| "the Job failed".into()),
                );
            }
            _ => {}
        }
    }
    JobState::Running
}

/// What a builder reports in its termination message.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BuildReport {
    pub seed_key: String,
    pub manifest_digest: String,
    pub snapshot_id: Option<String>,
    #[serde(default)]
    pub volume_size_gib: Option<u32>,
}

/// The builder container's termination message in the Job's pod, if any.
pub fn termination_message(pod: &Pod) -> Option<String> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == CONTAINER)?
        .state
        .as_ref()?
        .terminated
        .as_ref()?
        .message
        .clone()
}

/// The report in a termination message; `None` when it is not one (a
/// failed builder leaves its last log lines there).
pub fn parse_report(message: &str) -> Option<BuildReport> {
    serde_json::from_str(message.trim()).ok()
}
