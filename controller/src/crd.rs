//! The `ImageSeed` custom resource (cluster-scoped, `coral.dev/v1alpha1`):
//! which images every new node should find on disk, how the seed volume is
//! built and snapshotted, and where the snapshot is rolled out. The CRD is
//! generated from these types (`coral-controller crd`), and
//! `deploy/crd/imageseeds.coral.dev.yaml` holds the output.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The finalizer the controller puts on every ImageSeed.
pub const FINALIZER: &str = "coral.dev/cleanup";
/// Approves the pending snapshot (its ID) under the manual rollout policy.
pub const APPROVE_ANNOTATION: &str = "coral.dev/approve";

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "coral.dev",
    version = "v1alpha1",
    kind = "ImageSeed",
    plural = "imageseeds",
    shortname = "seed",
    status = "ImageSeedStatus",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Snapshot","type":"string","jsonPath":".status.current.snapshotId"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ImageSeedSpec {
    /// Image references to seed, as a pod names them
    /// (`python:3.12-slim`, `ghcr.io/org/app@sha256:…`).
    #[schemars(length(min = 1))]
    pub images: Vec<String>,
    /// Platforms to seed (`os/arch[/variant]`).
    #[serde(default = "default_platforms")]
    pub platforms: Vec<String>,
    /// Secrets of type `kubernetes.io/dockerconfigjson` in the controller's
    /// own namespace, used to resolve and pull the images.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pull_secrets: Vec<SecretRef>,
    #[serde(default)]
    pub volume: VolumeSpec,
    #[serde(default)]
    pub snapshot: SnapshotSpec,
    #[serde(default)]
    pub rebuild: RebuildSpec,
    #[serde(default)]
    pub rollout: RolloutSpec,
    #[serde(default)]
    pub targets: TargetsSpec,
    /// A taint nodes start with (e.g. through the NodePool's
    /// `startupTaints`); the controller removes it once the node is seeded
    /// or fell back to pulls, or after its deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup_taint: Option<StartupTaint>,
    /// What deleting the ImageSeed removes.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

fn default_platforms() -> Vec<String> {
    vec!["linux/amd64".into()]
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct SecretRef {
    pub name: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSpec {
    /// Volume size in GiB (0: the builder's computed size).
    #[serde(default, rename = "sizeGiB")]
    pub size_gib: u32,
    #[serde(default)]
    pub filesystem: Filesystem,
    /// EBS volume type of the volumes made from the snapshot.
    #[serde(default)]
    pub r#type: VolumeType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops: Option<u32>,
    /// MiB/s (gp3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throughput: Option<u32>,
    /// EBS volume initialization rate in MiB/s (100 to 300), to read the
    /// snapshot's blocks in faster than lazy loading would.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 100, max = 300))]
    pub initialization_rate: Option<u32>,
    /// The device name nodes get the volume at.
    #[serde(default = "default_device")]
    pub device_name: String,
}

fn default_device() -> String {
    "/dev/xvdc".into()
}

impl Default for VolumeSpec {
    fn default() -> Self {
        VolumeSpec {
            size_gib: 0,
            filesystem: Filesystem::default(),
            r#type: VolumeType::default(),
            iops: None,
            throughput: None,
            initialization_rate: None,
            device_name: default_device(),
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Filesystem {
    #[default]
    Ext4,
    Xfs,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum VolumeType {
    #[default]
    Gp3,
    Gp2,
    Io1,
    Io2,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotSpec {
    #[serde(default)]
    pub backend: SnapshotBackend,
    /// Snapshots kept (newest first); older ones nothing references are
    /// deleted.
    #[serde(default = "default_retention")]
    #[schemars(range(min = 1))]
    pub retention: u32,
    /// Encrypt snapshots with this KMS key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms_key_id: Option<String>,
    /// Extra tags for snapshots (coral's own are always set).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

fn default_retention() -> u32 {
    3
}

impl Default for SnapshotSpec {
    fn default() -> Self {
        SnapshotSpec {
            backend: SnapshotBackend::default(),
            retention: default_retention(),
            kms_key_id: None,
            tags: BTreeMap::new(),
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum SnapshotBackend {
    /// Uploaded through the EBS direct APIs (no instance needed).
    #[default]
    EbsDirect,
    /// CreateSnapshot of a volume attached to the builder's node.
    Ebs,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RebuildSpec {
    #[serde(default)]
    pub policy: RebuildPolicy,
    /// How often tags are resolved again (e.g. `1h`; at least `5m`).
    #[serde(default = "default_resolve_interval")]
    pub resolve_interval: String,
}

fn default_resolve_interval() -> String {
    "1h".into()
}

impl Default for RebuildSpec {
    fn default() -> Self {
        RebuildSpec {
            policy: RebuildPolicy::default(),
            resolve_interval: default_resolve_interval(),
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RebuildPolicy {
    /// Build when the spec changes or a tag resolves to a new digest.
    #[default]
    OnChange,
    /// Build only when the spec changes.
    Manual,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    #[serde(default)]
    pub policy: RolloutPolicy,
    /// Roll out this snapshot (one of `status.history`) and no other: pin,
    /// or roll back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RolloutPolicy {
    /// A new complete snapshot is rolled out as soon as it is recorded.
    #[default]
    Automatic,
    /// A new snapshot waits in `status.pending` until the annotation
    /// `coral.dev/approve` names it.
    Manual,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetsSpec {
    /// Karpenter EC2NodeClasses whose `blockDeviceMappings` get the seed
    /// device (the list is rewritten whole: see docs/controller.md).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ec2_node_classes: Vec<String>,
    /// EC2 launch templates (`lt-…`) that get a new default version with
    /// the seed device.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub launch_templates: Vec<String>,
    /// Attach mode: nodes matching these labels that came up without a seed
    /// volume get one, made from the snapshot in their zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attach: Option<AttachSpec>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AttachSpec {
    pub node_selector: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StartupTaint {
    pub key: String,
    /// Removed after this long whatever the node reports (e.g. `10m`).
    #[serde(default = "default_taint_deadline")]
    pub deadline: String,
}

fn default_taint_deadline() -> String {
    "10m".into()
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DeletionPolicy {
    /// Keep snapshots and launch template versions; remove only Jobs.
    #[default]
    Retain,
    /// Also delete coral's snapshots (those nothing else references) and
    /// launch template versions, and take the seed device out of targets.
    Delete,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageSeedStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The seed key the current spec and resolved digests give.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed_key: Option<String>,
    /// The snapshot rolled out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<SnapshotRef>,
    /// A snapshot waiting for approval (manual rollout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<SnapshotRef>,
    /// Every snapshot built, newest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<SnapshotRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<ImageState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<BuildState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_resolved: Option<Time>,
    /// Where the current snapshot is rolled out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<TargetState>,
}

/// One rollout target.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetState {
    /// `EC2NodeClass` or `LaunchTemplate`.
    pub kind: String,
    pub name: String,
    pub snapshot_id: String,
    /// Launch templates: the version coral made the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
    /// Launch templates: the default before coral's first version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_version: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    Resolving,
    Building,
    Ready,
    AwaitingApproval,
    Failed,
    Deleting,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotRef {
    pub snapshot_id: String,
    pub manifest_digest: String,
    pub seed_key: String,
    pub created: Time,
    /// The builder's report was complete and the snapshot is usable: only
    /// such snapshots are ever rolled out.
    pub complete: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_size_gib: Option<u32>,
}

/// Per image reference.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageState {
    pub reference: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(default)]
    pub in_current_snapshot: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default)]
    pub failure_count: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_retry: Option<Time>,
}

/// The build in progress or last failed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BuildState {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    pub seed_key: String,
    #[serde(default)]
    pub failure_count: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_retry: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}
