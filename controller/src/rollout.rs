//! Rolling a snapshot out to where nodes are launched from:
//!
//! - Karpenter `EC2NodeClass`: `spec.blockDeviceMappings` is an atomic list
//!   in Karpenter's schema, so coral rewrites the whole list: every other
//!   mapping as the spec gives it (unknown fields kept verbatim), and coral's
//!   own device replaced or appended. When the list is absent, Karpenter
//!   uses the AMI family's default root volume; a list holding only coral's
//!   device would drop it, so coral first writes that default out. The
//!   write is a merge patch carrying the object's `resourceVersion`
//!   (a concurrent change makes it fail and the next reconcile redo it),
//!   and nothing is sent when the list is already right. Any change to the
//!   list drifts the class's nodes, which Karpenter replaces under the
//!   NodePool's disruption budgets.
//! - EC2 launch templates: a new version with the whole mapping list (a new
//!   version does not inherit snapshots of its source version's mappings),
//!   made the default.

use aws_sdk_ec2::error::DisplayErrorContext;
use aws_sdk_ec2::types::{
    LaunchTemplateBlockDeviceMappingRequest, LaunchTemplateEbsBlockDeviceRequest,
    RequestLaunchTemplateData, VolumeType,
};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use serde_json::{Value, json};

use crate::crd::{ImageSeed, SnapshotRef};
use crate::reconcile::Error;

/// Karpenter's `EC2NodeClass` (karpenter.k8s.aws/v1).
pub fn node_class_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("karpenter.k8s.aws", "v1", "EC2NodeClass"),
        "ec2nodeclasses",
    )
}

/// The block device mappings Karpenter applies when a class gives none,
/// per AMI family (from `spec.amiFamily`, or the `amiSelectorTerms` alias
/// such as `al2023@latest`). Custom or unknown families: none.
pub fn family_defaults(spec: &Value) -> Vec<Value> {
    let family = spec["amiFamily"]
        .as_str()
        .map(str::to_lowercase)
        .or_else(|| {
            spec["amiSelectorTerms"]
                .as_array()?
                .iter()
                .find_map(|t| t["alias"].as_str())
                .and_then(|a| a.split('@').next())
                .map(str::to_lowercase)
        })
        .unwrap_or_default();
    let root = |dev: &str, size: &str| {
        json!({"deviceName": dev, "rootVolume": true,
               "ebs": {"volumeSize": size, "volumeType": "gp3", "encrypted": true}})
    };
    match family.as_str() {
        "al2" | "al2023" => vec![root("/dev/xvda", "20Gi")],
        "bottlerocket" => vec![
            json!({"deviceName": "/dev/xvda",
                   "ebs": {"volumeSize": "4Gi", "volumeType": "gp3", "encrypted": true}}),
            root("/dev/xvdb", "20Gi"),
        ],
        "ubuntu" => vec![root("/dev/sda1", "20Gi")],
        "windows2019" | "windows2022" => vec![root("/dev/sda1", "50Gi")],
        _ => Vec::new(),
    }
}

/// The spec's EBS volume type, as EC2 and Karpenter name it.
pub fn volume_type(seed: &ImageSeed) -> &'static str {
    match seed.spec.volume.r#type {
        crate::crd::VolumeType::Gp3 => "gp3",
        crate::crd::VolumeType::Gp2 => "gp2",
        crate::crd::VolumeType::Io1 => "io1",
        crate::crd::VolumeType::Io2 => "io2",
    }
}

/// The size of volumes made from `snap`: the spec's, never less than the
/// snapshot's.
fn size_gib(seed: &ImageSeed, snap: &SnapshotRef) -> Option<u32> {
    let s = seed
        .spec
        .volume
        .size_gib
        .max(snap.volume_size_gib.unwrap_or(0));
    (s > 0).then_some(s)
}

/// Coral's mapping for `snap`, in Karpenter's field names.
pub fn seed_mapping(seed: &ImageSeed, snap: &SnapshotRef) -> Value {
    let v = &seed.spec.volume;
    let mut ebs = json!({
        "snapshotID": snap.snapshot_id,
        "volumeType": volume_type(seed),
        "deleteOnTermination": true,
    });
    if let Some(s) = size_gib(seed, snap) {
        ebs["volumeSize"] = json!(format!("{s}Gi"));
    }
    if let Some(i) = v.iops {
        ebs["iops"] = json!(i);
    }
    if let Some(t) = v.throughput {
        ebs["throughput"] = json!(t);
    }
    if let Some(r) = v.initialization_rate {
        ebs["volumeInitializationRate"] = json!(r);
    }
    json!({"deviceName": v.device_name, "ebs": ebs})
}

/// The class's mapping list with coral's device for `snap`: the entry for
/// the same device, or one holding a snapshot of this seed, is replaced;
/// otherwise coral's is appended.
pub fn desired_mappings(spec: &Value, seed: &ImageSeed, snap: &SnapshotRef) -> Vec<Value> {
    let mut list = match spec["blockDeviceMappings"].as_array() {
        Some(l) => l.clone(),
        None => family_defaults(spec),
    };
    let ours: Vec<&str> = seed
        .status
        .iter()
        .flat_map(|s| s.history.iter().map(|h| h.snapshot_id.as_str()))
        .chain([snap.snapshot_id.as_str()])
        .collect();
    let mine = seed_mapping(seed, snap);
    let pos = list.iter().position(|m| {
        m["deviceName"] == mine["deviceName"]
            || m["ebs"]["snapshotID"]
                .as_str()
                .is_some_and(|s| ours.contains(&s))
    });
    match pos {
        Some(i) => list[i] = mine,
        None => list.push(mine),
    }
    list
}

/// Puts `snap` into EC2NodeClass `name`. Returns whether it changed.
pub async fn node_class(
    client: &kube::Client,
    name: &str,
    seed: &ImageSeed,
    snap: &SnapshotRef,
) -> Result<bool, Error> {
    let ar = node_class_resource();
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    let nc = api.get(name).await?;
    let spec = nc.data.get("spec").cloned().unwrap_or(Value::Null);
    let want = desired_mappings(&spec, seed, snap);
    if spec["blockDeviceMappings"].as_array() == Some(&want) {
        return Ok(false);
    }
    write_mappings(&api, &nc, want).await?;
    Ok(true)
}

/// Replaces a class's whole (atomic) mapping list with a merge patch that
/// carries the `resourceVersion` read: a concurrent change makes it fail,
/// and the next reconcile redoes it from the new state.
async fn write_mappings(
    api: &Api<DynamicObject>,
    nc: &DynamicObject,
    list: Vec<Value>,
) -> Result<(), Error> {
    let patch = json!({
        "metadata": {"resourceVersion": nc.metadata.resource_version},
        "spec": {"blockDeviceMappings": list},
    });
    let name = nc.metadata.name.as_deref().unwrap_or_default();
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

pub(crate) fn ec2_error<E>(what: &str, e: aws_sdk_ec2::error::SdkError<E>) -> Error
where
    E: std::error::Error + aws_sdk_ec2::error::ProvideErrorMetadata + 'static,
{
    Error::Other(format!("{what}: {}", DisplayErrorContext(&e)))
}

/// Makes a launch template's default version carry `snap` at coral's
/// device: a new version with the whole mapping list, then the default.
/// Returns the new version and the default it replaced, or `None` when the
/// default already has it.
pub async fn launch_template(
    ec2: &aws_sdk_ec2::Client,
    id: &str,
    seed: &ImageSeed,
    snap: &SnapshotRef,
) -> Result<Option<(i64, i64)>, Error> {
    let (default_version, mappings) = default_mappings(ec2, id).await?;
    let device = seed.spec.volume.device_name.as_str();
    if mappings.iter().any(|m| {
        m.device_name() == Some(device)
            && m.ebs().and_then(|e| e.snapshot_id()) == Some(snap.snapshot_id.as_str())
    }) {
        return Ok(None);
    }
    // Every other mapping as it is (snapshots included), then coral's.
    let mut list: Vec<LaunchTemplateBlockDeviceMappingRequest> = mappings
        .iter()
        .filter(|m| m.device_name() != Some(device))
        .map(|m| {
            let mut b = LaunchTemplateBlockDeviceMappingRequest::builder()
                .set_device_name(m.device_name().map(str::to_owned))
                .set_virtual_name(m.virtual_name().map(str::to_owned))
                .set_no_device(m.no_device().map(str::to_owned));
            if let Some(e) = m.ebs() {
                b = b.ebs(
                    LaunchTemplateEbsBlockDeviceRequest::builder()
                        .set_encrypted(e.encrypted())
                        .set_delete_on_termination(e.delete_on_termination())
                        .set_iops(e.iops())
                        .set_kms_key_id(e.kms_key_id().map(str::to_owned))
                        .set_snapshot_id(e.snapshot_id().map(str::to_owned))
                        .set_volume_size(e.volume_size())
                        .set_volume_type(e.volume_type().cloned())
                        .set_throughput(e.throughput())
                        .set_volume_initialization_rate(e.volume_initialization_rate())
                        .build(),
                );
            }
            b.build()
        })
        .collect();
    let v = &seed.spec.volume;
    let mut ebs = LaunchTemplateEbsBlockDeviceRequest::builder()
        .snapshot_id(&snap.snapshot_id)
        .volume_type(VolumeType::from(volume_type(seed)))
        .delete_on_termination(true)
        .set_iops(v.iops.map(|i| i as i32))
        .set_throughput(v.throughput.map(|t| t as i32))
        .set_volume_initialization_rate(v.initialization_rate.map(|r| r as i32));
    if let Some(s) = size_gib(seed, snap) {
        ebs = ebs.volume_size(s as i32);
    }
    list.push(
        LaunchTemplateBlockDeviceMappingRequest::builder()
            .device_name(device)
            .ebs(ebs.build())
            .build(),
    );
    let token = {
        use sha2::Digest as _;
        let h = sha2::Sha256::digest(
            format!(
                "{}/{id}/{}",
                seed.metadata.uid.as_deref().unwrap_or(""),
                snap.snapshot_id
            )
            .as_bytes(),
        );
        hex::encode(&h[..16])
    };
    let created = ec2
        .create_launch_template_version()
        .launch_template_id(id)
        .source_version(default_version.to_string())
        .version_description(format!(
            "coral {} {}",
            kube::ResourceExt::name_any(seed),
            snap.snapshot_id
        ))
        .client_token(token)
        .launch_template_data(
            RequestLaunchTemplateData::builder()
                .set_block_device_mappings(Some(list))
                .build(),
        )
        .send()
        .await
        .map_err(|e| ec2_error(&format!("CreateLaunchTemplateVersion {id}"), e))?;
    let version = created
        .launch_template_version()
        .and_then(|v| v.version_number())
        .ok_or_else(|| Error::Other(format!("CreateLaunchTemplateVersion {id}: no version")))?;
    ec2.modify_launch_template()
        .launch_template_id(id)
        .default_version(version.to_string())
        .send()
        .await
        .map_err(|e| ec2_error(&format!("ModifyLaunchTemplate {id}"), e))?;
    Ok(Some((version, default_version)))
}

/// Whether EC2 shows `id` completed and tagged with `seed_key`: only such a
/// snapshot is recorded as complete. `Ok(None)`: not completed yet.
pub async fn snapshot_usable(
    ec2: &aws_sdk_ec2::Client,
    id: &str,
    seed_key: &str,
) -> Result<Option<bool>, Error> {
    let out = ec2
        .describe_snapshots()
        .snapshot_ids(id)
        .send()
        .await
        .map_err(|e| ec2_error(&format!("DescribeSnapshots {id}"), e))?;
    let Some(s) = out.snapshots().first() else {
        return Ok(Some(false));
    };
    let tagged = s
        .tags()
        .iter()
        .any(|t| t.key() == Some("coral/seed-key") && t.value() == Some(seed_key));
    match s.state().map(|s| s.as_str()) {
        Some("completed") => Ok(Some(tagged)),
        Some("pending") => Ok(None),
        _ => Ok(Some(false)),
    }
}

/// Whether anything still uses snapshot `id`: a volume made from it, or
/// the default version of one of `launch_templates`.
pub async fn snapshot_in_use(
    ec2: &aws_sdk_ec2::Client,
    id: &str,
    launch_templates: &[String],
) -> Result<bool, Error> {
    let volumes = ec2
        .describe_volumes()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("snapshot-id")
                .values(id)
                .build(),
        )
        .send()
        .await
        .map_err(|e| ec2_error(&format!("DescribeVolumes (snapshot {id})"), e))?;
    if !volumes.volumes().is_empty() {
        return Ok(true);
    }
    for lt in launch_templates {
        let (_, mappings) = default_mappings(ec2, lt).await?;
        if mappings
            .iter()
            .any(|m| m.ebs().and_then(|e| e.snapshot_id()) == Some(id))
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// A launch template's default version number and its block device mappings.
async fn default_mappings(
    ec2: &aws_sdk_ec2::Client,
    id: &str,
) -> Result<
    (
        i64,
        Vec<aws_sdk_ec2::types::LaunchTemplateBlockDeviceMapping>,
    ),
    Error,
> {
    let out = ec2
        .describe_launch_template_versions()
        .launch_template_id(id)
        .versions("$Default")
        .send()
        .await
        .map_err(|e| ec2_error(&format!("DescribeLaunchTemplateVersions {id}"), e))?;
    let current = out
        .launch_template_versions()
        .first()
        .ok_or_else(|| Error::Other(format!("launch template {id} has no default version")))?;
    let mappings = current
        .launch_template_data()
        .map(|d| d.block_device_mappings().to_vec())
        .unwrap_or_default();
    Ok((current.version_number().unwrap_or(1), mappings))
}

/// Deletes snapshot `id` if it is one of this seed's (tagged
/// `coral.dev/imageseed=<seed>` by its build). Returns whether it was.
pub async fn delete_snapshot(
    ec2: &aws_sdk_ec2::Client,
    id: &str,
    seed: &str,
) -> Result<bool, Error> {
    let out = ec2
        .describe_snapshots()
        .snapshot_ids(id)
        .send()
        .await
        .map_err(|e| ec2_error(&format!("DescribeSnapshots {id}"), e))?;
    let ours = out.snapshots().first().is_some_and(|s| {
        s.tags()
            .iter()
            .any(|t| t.key() == Some(crate::job::TAG_IMAGESEED) && t.value() == Some(seed))
    });
    if !ours {
        return Ok(false);
    }
    ec2.delete_snapshot()
        .snapshot_id(id)
        .send()
        .await
        .map_err(|e| ec2_error(&format!("DeleteSnapshot {id}"), e))?;
    Ok(true)
}

/// Takes coral's device (a snapshot of this seed at `volume.deviceName`)
/// out of EC2NodeClass `name`. Returns whether it changed.
pub async fn remove_from_node_class(
    client: &kube::Client,
    name: &str,
    seed: &ImageSeed,
) -> Result<bool, Error> {
    let ar = node_class_resource();
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    let Some(nc) = api.get_opt(name).await? else {
        return Ok(false);
    };
    let spec = nc.data.get("spec").cloned().unwrap_or(Value::Null);
    let Some(list) = spec["blockDeviceMappings"].as_array() else {
        return Ok(false);
    };
    let ours: Vec<&str> = seed
        .status
        .iter()
        .flat_map(|s| s.history.iter().map(|h| h.snapshot_id.as_str()))
        .collect();
    let keep: Vec<Value> = list
        .iter()
        .filter(|m| {
            !(m["deviceName"] == seed.spec.volume.device_name.as_str()
                && m["ebs"]["snapshotID"]
                    .as_str()
                    .is_some_and(|s| ours.contains(&s)))
        })
        .cloned()
        .collect();
    if keep.len() == list.len() {
        return Ok(false);
    }
    write_mappings(&api, &nc, keep).await?;
    Ok(true)
}

/// Makes `version` the default of launch template `id` again.
pub async fn restore_default(
    ec2: &aws_sdk_ec2::Client,
    id: &str,
    version: i64,
) -> Result<(), Error> {
    ec2.modify_launch_template()
        .launch_template_id(id)
        .default_version(version.to_string())
        .send()
        .await
        .map_err(|e| ec2_error(&format!("ModifyLaunchTemplate {id}"), e))?;
    Ok(())
}
