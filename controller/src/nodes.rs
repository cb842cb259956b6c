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

/// Parses a duration such as `10m`, `90s`, `1h`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = num.parse().ok()?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return None,
    };
    Some(Duration::from_secs(secs))
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
    if taints.is_empty() {
        return Ok(Action::await_change());
    }
    let seeds: Api<ImageSeed> = Api::all(ctx.client.clone());
    let gates: Vec<(String, Duration)> = seeds
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter_map(|s| {
            let t = s.spec.startup_taint.as_ref()?;
            Some((
                t.key.clone(),
                parse_duration(&t.deadline).unwrap_or(Duration::from_secs(600)),
            ))
        })
        .collect();
    let reported_done = node
        .annotations()
        .get(ANNOTATION_STATUS)
        .and_then(|a| serde_json::from_str::<Value>(a).ok())
        .is_some_and(|s| s["phase"] == "done");
    let age = node
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| k8s_openapi::jiff::Timestamp::now().duration_since(t.0))
        .and_then(|d| Duration::try_from(d).ok())
        .unwrap_or(Duration::ZERO);
    let mut remove = Vec::new();
    let mut wait: Option<Duration> = None;
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
