//! The node side: the node agent that puts the node mounter's status on
//! its Node, and the gating that lifts an ImageSeed's startup taint once a
//! node is seeded (or fell back to pulls), or after the taint's deadline.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use crate::crd::ImageSeed;
use crate::reconcile::{Context, Error};

/// The node mounter's status, compacted, as the agent writes it.
pub const ANNOTATION_STATUS: &str = "coral.dev/seed-status";
/// The Node condition the agent owns.
pub const CONDITION: &str = "CoralSeeded";

/// What the node mounter's status file (`/run/coral/status.json`) says, in
/// brief: the phase, the exit code once known, and counts of images by state.
pub fn summarize(status: &Value) -> Value {
    let mut counts = serde_json::Map::new();
    for i in status["images"].as_array().into_iter().flatten() {
        if let Some(state) = i["state"].as_str() {
            let n = counts.get(state).and_then(Value::as_u64).unwrap_or(0);
            counts.insert(state.to_string(), json!(n + 1));
        }
    }
    let mut out = json!({
        "phase": status["phase"],
        "images": counts,
        "updatedAt": status["updatedAt"],
    });
    if let Some(code) = status["exitCode"].as_u64() {
        out["exitCode"] = json!(code);
    }
    if let Some(m) = status["message"].as_str() {
        out["message"] = json!(m.chars().take(512).collect::<String>());
    }
    out
}

/// The condition for a summary: True when every image was seeded (exit 0);
/// False when some were pulled instead (`FellBack`, exit 10) or the run
/// failed (`Failed`); Unknown while it runs.
fn condition(summary: &Value) -> Value {
    let (status, reason, message) = match (summary["phase"].as_str(), summary["exitCode"].as_u64())
    {
        (Some("done"), Some(0)) => ("True", "Seeded", "every image came from the seed volume"),
        (Some("done"), _) => ("False", "FellBack", "some images were pulled instead"),
        (Some("failed"), _) => ("False", "Failed", "the node mounter failed"),
        _ => ("Unknown", "InProgress", "the node mounter is running"),
    };
    json!({
        "type": CONDITION,
        "status": status,
        "reason": reason,
        "message": summary["message"].as_str().unwrap_or(message),
        "lastHeartbeatTime": k8s_openapi::jiff::Timestamp::now().to_string(),
    })
}

/// One pass of the node agent: reads `status_file` and, if its summary is
/// not what `node` already carries, writes the annotation and the
/// condition. Returns whether it wrote.
pub async fn report(client: &kube::Client, node: &str, status_file: &Path) -> Result<bool, Error> {
    let text = match std::fs::read(status_file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => {
            return Err(Error::Other(format!(
                "reading {}: {e}",
                status_file.display()
            )));
        }
    };
    let status: Value = serde_json::from_slice(&text).map_err(|e| {
        Error::Other(format!(
            "{} is not a status file: {e}",
            status_file.display()
        ))
    })?;
    let summary = summarize(&status);
    let api: Api<Node> = Api::all(client.clone());
    let current = api.get(node).await?;
    let written = current
        .annotations()
        .get(ANNOTATION_STATUS)
        .and_then(|a| serde_json::from_str::<Value>(a).ok());
    if written.as_ref() == Some(&summary) {
        return Ok(false);
    }
    let patch = json!({"metadata": {"annotations": {ANNOTATION_STATUS: summary.to_string()}}});
    api.patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    // Node conditions merge by type: the agent touches only its own.
    let cond = json!({"status": {"conditions": [condition(&summary)]}});
    api.patch_status(node, &PatchParams::default(), &Patch::Strategic(&cond))
        .await?;
    Ok(true)
}

/// Gating: lifts each ImageSeed startup taint `node` carries once the agent
/// reports the node seeded or fallen back to pulls (`phase: done`), or once
/// the taint's deadline after the node's creation has passed. A node is
/// never left tainted past the deadline.
pub async fn reconcile_node(node: Arc<Node>, ctx: Arc<Context>) -> Result<Action, Error> {
    let taints = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    let seeds: Api<ImageSeed> = Api::all(ctx.client.clone());
    let all = seeds.list(&ListParams::default()).await?.items;
    // Attach mode first: the volume is what the node waits for.
    let mut wait: Option<Duration> = None;
    for seed in &all {
        if let Some(w) = attach(seed, &node, &ctx).await? {
            wait = Some(wait.map_or(w, |x: Duration| x.min(w)));
        }
    }
    if taints.is_empty() {
        return Ok(wait.map_or_else(Action::await_change, Action::requeue));
    }
    let gates: Vec<(String, Duration)> = all
        .iter()
        .filter_map(|s| {
            let t = s.spec.startup_taint.as_ref()?;
            Some((
                t.key.clone(),
                coral_seed::time::parse_duration(&t.deadline).unwrap_or(Duration::from_secs(600)),
            ))
        })
        .collect();
    let reported = node
        .annotations()
        .get(ANNOTATION_STATUS)
        .and_then(|a| serde_json::from_str::<Value>(a).ok());
    let reported_done = reported.as_ref().is_some_and(|s| s["phase"] == "done");
    if let Some(r) = &reported {
        let state = match (r["phase"].as_str(), r["exitCode"].as_u64()) {
            (Some("done"), Some(0)) => "seeded",
            (Some("done"), _) => "fellBack",
            (Some("failed"), _) => "failed",
            _ => "pending",
        };
        crate::metrics::METRICS
            .node_states
            .lock()
            .expect("not poisoned")
            .insert(node.name_any(), state);
    }
    let age = node
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| k8s_openapi::jiff::Timestamp::now().duration_since(t.0))
        .and_then(|d| Duration::try_from(d).ok())
        .unwrap_or(Duration::ZERO);
    let mut remove = Vec::new();
    for (i, t) in taints.iter().enumerate() {
        let Some((_, deadline)) = gates.iter().find(|(k, _)| *k == t.key) else {
            continue;
        };
        if reported_done {
            remove.push((i, t, "StartupTaintRemoved", EventType::Normal));
        } else if age >= *deadline {
            remove.push((i, t, "StartupTaintDeadline", EventType::Warning));
        } else {
            let left = *deadline - age;
            wait = Some(wait.map_or(left, |w| w.min(left)));
        }
    }
    if !remove.is_empty() {
        // Taints are an atomic list: each removal is guarded by a test of
        // the entry at that index, highest index first.
        let mut ops = Vec::new();
        for (i, t, _, _) in remove.iter().rev() {
            ops.push(json!({"op": "test", "path": format!("/spec/taints/{i}"), "value": t}));
            ops.push(json!({"op": "remove", "path": format!("/spec/taints/{i}")}));
        }
        let patch: json_patch::Patch = serde_json::from_value(Value::Array(ops))
            .map_err(|e| Error::Other(format!("a taint patch: {e}")))?;
        let api: Api<Node> = Api::all(ctx.client.clone());
        api.patch(
            &node.name_any(),
            &PatchParams::default(),
            &Patch::Json::<()>(patch),
        )
        .await?;
        for (_, t, reason, type_) in &remove {
            crate::metrics::inc(if *reason == "StartupTaintRemoved" {
                &crate::metrics::METRICS.taints_removed_seeded
            } else {
                &crate::metrics::METRICS.taints_removed_deadline
            });
            let note = if *reason == "StartupTaintRemoved" {
                format!("taint {} removed: the node is seeded", t.key)
            } else {
                format!(
                    "taint {} removed: its deadline passed before the node reported being seeded",
                    t.key
                )
            };
            let e = Event {
                type_: *type_,
                reason: (*reason).into(),
                note: Some(note),
                action: "RemoveTaint".into(),
                secondary: None,
            };
            if let Err(err) = ctx.recorder.publish(&e, &node.object_ref(&())).await {
                tracing::warn!("publishing event {reason}: {err}");
            }
        }
    }
    Ok(match wait {
        Some(w) => Action::requeue(w),
        None => Action::await_change(),
    })
}

/// Attach mode: the volume coral made for this node.
pub const ANNOTATION_VOLUME: &str = "coral.dev/volume-id";
/// Attach mode: `attached` once it is.
pub const ANNOTATION_VOLUME_STATE: &str = "coral.dev/volume-state";

/// `aws:///us-east-1a/i-0abc…` → (zone, instance).
pub fn parse_provider_id(id: &str) -> Option<(String, String)> {
    let rest = id.strip_prefix("aws:///")?;
    let (zone, instance) = rest.split_once('/')?;
    (!zone.is_empty() && instance.starts_with("i-"))
        .then(|| (zone.to_string(), instance.to_string()))
}

fn selector_matches(selector: &std::collections::BTreeMap<String, String>, node: &Node) -> bool {
    let labels = node.labels();
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Attach mode for one node and one ImageSeed: a node matching the seed's
/// `targets.attach.nodeSelector` that came up without a volume made from
/// one of the seed's snapshots gets one, made from the current snapshot in
/// the node's zone, attached to its instance, deleted with it, tagged, and
/// recorded on the Node (annotations). Returns a wait when the volume is
/// not available yet.
pub async fn attach(
    seed: &ImageSeed,
    node: &Node,
    ctx: &Context,
) -> Result<Option<Duration>, Error> {
    let Some(attach) = &seed.spec.targets.attach else {
        return Ok(None);
    };
    let Some(current) = seed.status.as_ref().and_then(|s| s.current.clone()) else {
        return Ok(None);
    };
    if !selector_matches(&attach.node_selector, node)
        || node
            .annotations()
            .get(ANNOTATION_VOLUME_STATE)
            .map(String::as_str)
            == Some("attached")
    {
        return Ok(None);
    }
    let provider = node
        .spec
        .as_ref()
        .and_then(|s| s.provider_id.clone())
        .unwrap_or_default();
    let Some((zone, instance)) = parse_provider_id(&provider) else {
        return Ok(None);
    };
    let ec2 = &ctx.ec2;
    let name = node.name_any();
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let device = seed.spec.volume.device_name.clone();
    let ours: Vec<String> = seed
        .status
        .iter()
        .flat_map(|s| s.history.iter().map(|h| h.snapshot_id.clone()))
        .collect();
    let volume = match node.annotations().get(ANNOTATION_VOLUME) {
        Some(v) => v.clone(),
        None => {
            // Came up with a seed volume already (launched with the mapping)?
            let inst = ec2
                .describe_instances()
                .instance_ids(&instance)
                .send()
                .await
                .map_err(|e| {
                    crate::rollout::ec2_error(&format!("DescribeInstances {instance}"), e)
                })?;
            let attached: Vec<String> = inst
                .reservations()
                .iter()
                .flat_map(|r| r.instances())
                .flat_map(|i| i.block_device_mappings())
                .filter_map(|m| m.ebs().and_then(|e| e.volume_id()).map(str::to_owned))
                .collect();
            if !attached.is_empty() {
                let vols = ec2
                    .describe_volumes()
                    .set_volume_ids(Some(attached))
                    .send()
                    .await
                    .map_err(|e| crate::rollout::ec2_error("DescribeVolumes", e))?;
                if vols
                    .volumes()
                    .iter()
                    .any(|v| v.snapshot_id().is_some_and(|s| ours.iter().any(|o| o == s)))
                {
                    return Ok(None);
                }
            }
            use aws_sdk_ec2::types::{ResourceType, Tag, TagSpecification, VolumeType};
            let token = {
                use sha2::Digest as _;
                hex::encode(
                    &sha2::Sha256::digest(
                        format!("{}/{}", node.uid().unwrap_or_default(), current.snapshot_id)
                            .as_bytes(),
                    )[..16],
                )
            };
            let v = &seed.spec.volume;
            let size = v.size_gib.max(current.volume_size_gib.unwrap_or(0));
            let created = ec2
                .create_volume()
                .availability_zone(&zone)
                .snapshot_id(&current.snapshot_id)
                .set_size((size > 0).then_some(size as i32))
                .volume_type(VolumeType::from(crate::rollout::volume_type(seed)))
                .set_iops(v.iops.map(|i| i as i32))
                .set_throughput(v.throughput.map(|t| t as i32))
                .set_volume_initialization_rate(v.initialization_rate.map(|r| r as i32))
                .client_token(token)
                .tag_specifications(
                    TagSpecification::builder()
                        .resource_type(ResourceType::Volume)
                        .tags(
                            Tag::builder()
                                .key(crate::job::TAG_IMAGESEED)
                                .value(seed.name_any())
                                .build(),
                        )
                        .tags(Tag::builder().key("coral.dev/node").value(&name).build())
                        .tags(
                            Tag::builder()
                                .key("coral.dev/managed")
                                .value("attach")
                                .build(),
                        )
                        .build(),
                )
                .send()
                .await
                .map_err(|e| crate::rollout::ec2_error(&format!("CreateVolume in {zone}"), e))?;
            let id = created
                .volume_id()
                .ok_or_else(|| Error::Other("CreateVolume returned no volume ID".into()))?
                .to_string();
            // Recorded at once: a crash from here on finds it, not a second one.
            let patch = json!({"metadata": {"annotations": {ANNOTATION_VOLUME: id}}});
            nodes
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            id
        }
    };
    let described = ec2
        .describe_volumes()
        .volume_ids(&volume)
        .send()
        .await
        .map_err(|e| crate::rollout::ec2_error(&format!("DescribeVolumes {volume}"), e))?;
    let state = described
        .volumes()
        .first()
        .and_then(|v| v.state())
        .map(|s| s.as_str().to_string())
        .unwrap_or_default();
    match state.as_str() {
        "available" => {}
        "in-use" => {}
        "creating" | "" => return Ok(Some(Duration::from_secs(5))),
        other => return Err(Error::Other(format!("volume {volume} is {other}"))),
    }
    if state == "available" {
        ec2.attach_volume()
            .device(&device)
            .instance_id(&instance)
            .volume_id(&volume)
            .send()
            .await
            .map_err(|e| {
                crate::rollout::ec2_error(&format!("AttachVolume {volume} to {instance}"), e)
            })?;
    }
    use aws_sdk_ec2::types::{
        EbsInstanceBlockDeviceSpecification, InstanceBlockDeviceMappingSpecification,
    };
    ec2.modify_instance_attribute()
        .instance_id(&instance)
        .block_device_mappings(
            InstanceBlockDeviceMappingSpecification::builder()
                .device_name(&device)
                .ebs(
                    EbsInstanceBlockDeviceSpecification::builder()
                        .volume_id(&volume)
                        .delete_on_termination(true)
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .map_err(|e| {
            crate::rollout::ec2_error(&format!("ModifyInstanceAttribute {instance}"), e)
        })?;
    let patch = json!({"metadata": {"annotations": {ANNOTATION_VOLUME_STATE: "attached"}}});
    nodes
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    crate::metrics::inc(&crate::metrics::METRICS.volumes_attached);
    let e = Event {
        type_: EventType::Normal,
        reason: "VolumeAttached".into(),
        note: Some(format!(
            "volume {volume} from snapshot {} attached at {device}",
            current.snapshot_id
        )),
        action: "AttachVolume".into(),
        secondary: None,
    };
    if let Err(err) = ctx.recorder.publish(&e, &node.object_ref(&())).await {
        tracing::warn!("publishing event VolumeAttached: {err}");
    }
    Ok(None)
}

/// Attach mode's leftovers: volumes coral made for a node (tagged
/// `coral.dev/managed=attach` and with this seed) that are not attached,
/// whose node is gone, or that have waited unattached for ten minutes, are
/// deleted. Returns the deleted volume IDs.
pub async fn collect_volumes(seed: &ImageSeed, ctx: &Context) -> Result<Vec<String>, Error> {
    use aws_sdk_ec2::types::Filter;
    let out = ctx
        .ec2
        .describe_volumes()
        .filters(
            Filter::builder()
                .name("tag:coral.dev/managed")
                .values("attach")
                .build(),
        )
        .filters(
            Filter::builder()
                .name(format!("tag:{}", crate::job::TAG_IMAGESEED))
                .values(seed.name_any())
                .build(),
        )
        .filters(Filter::builder().name("status").values("available").build())
        .send()
        .await
        .map_err(|e| crate::rollout::ec2_error("DescribeVolumes (attach mode)", e))?;
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let mut gone = Vec::new();
    for v in out.volumes() {
        let Some(id) = v.volume_id() else { continue };
        let node = v
            .tags()
            .iter()
            .find(|t| t.key() == Some("coral.dev/node"))
            .and_then(|t| t.value())
            .unwrap_or_default();
        let node_gone = node.is_empty() || nodes.get_opt(node).await?.is_none();
        let waited = v
            .create_time()
            .map(|t| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|n| n.as_secs() as i64)
                    .unwrap_or(0)
                    - t.secs()
            })
            .is_some_and(|age| age > 600);
        if !(node_gone || waited) {
            continue;
        }
        ctx.ec2
            .delete_volume()
            .volume_id(id)
            .send()
            .await
            .map_err(|e| crate::rollout::ec2_error(&format!("DeleteVolume {id}"), e))?;
        gone.push(id.to_string());
    }
    Ok(gone)
}

/// Whether a node has no seed volume to import from, by what its node
/// mounter left: a finished run that found no volume (`noVolume`, which
/// the mounter sets when there was none to mount or none where it
/// looked), or no status file at all once `grace` has passed since the
/// agent started (the mounter did not run). Such a node gets its images by
/// prefetch.
pub fn needs_prefetch(status: Option<&Value>, since_start: Duration, grace: Duration) -> bool {
    match status {
        None => since_start >= grace,
        Some(s) => s["noVolume"] == true && matches!(s["phase"].as_str(), Some("failed" | "done")),
    }
}

/// The images to prefetch: those of every ImageSeed with a current
/// snapshot, each once, in order.
pub fn prefetch_images(seeds: &[ImageSeed]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in seeds
        .iter()
        .filter(|s| s.status.as_ref().is_some_and(|st| st.current.is_some()))
    {
        for i in &s.spec.images {
            if !out.contains(i) {
                out.push(i.clone());
            }
        }
    }
    out
}

/// The `coral-node-mounter prefetch` command line for `images`.
pub fn prefetch_args(address: &Path, images: &[String], status_file: &Path) -> Vec<String> {
    let mut args = vec![
        "prefetch".to_string(),
        "--address".into(),
        address.display().to_string(),
        "--status-file".into(),
        status_file.display().to_string(),
        "--json".into(),
    ];
    for i in images {
        args.extend(["--image".into(), i.clone()]);
    }
    args
}
