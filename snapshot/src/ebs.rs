//! The `ebs` backend: the builder ran on EC2 and wrote the seed volume onto
//! an attached EBS volume; CreateSnapshot of that volume, tagged, then wait
//! until it is `completed`. Also the waiting and clean-up shared with
//! `ebs-direct`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use aws_sdk_ec2::error::DisplayErrorContext;
use aws_sdk_ec2::types::{ResourceType, SnapshotState, Tag, TagSpecification};

use crate::{Kind, Options, Record, SeedInfo, blocks};

/// The EBS volume ID behind an NVMe device (its serial is the volume ID
/// without the dash: `vol0123…`).
pub fn volume_id_of(device: &Path, sys: &Path) -> Option<String> {
    let real = std::fs::canonicalize(device).ok()?;
    let name = real.file_name()?.to_str()?;
    let serial =
        std::fs::read_to_string(sys.join("block").join(name).join("device/serial")).ok()?;
    let serial = serial.trim();
    let rest = serial.strip_prefix("vol")?;
    let rest = rest.strip_prefix('-').unwrap_or(rest);
    (!rest.is_empty() && rest.bytes().all(|b| b.is_ascii_hexdigit())).then(|| format!("vol-{rest}"))
}

pub async fn create(
    config: &aws_config::SdkConfig,
    device: &Path,
    seed: &SeedInfo,
    o: &Options,
) -> Result<Record> {
    let behind_device = volume_id_of(device, &PathBuf::from("/sys"));
    let volume = match &o.volume_id {
        // Snapshotting another volume than the one written would record a
        // snapshot that does not hold this seed.
        Some(v) if behind_device.as_ref().is_some_and(|d| d != v) => bail!(
            "--volume-id {v} is not the volume behind {} ({}): the snapshot must be of the \
             volume the seed was written to",
            device.display(),
            behind_device.as_deref().unwrap_or_default()
        ),
        Some(v) => v.clone(),
        None => behind_device.with_context(|| {
            format!(
                "{} is not an EBS volume this machine can name (no vol- NVMe serial): give \
                 --volume-id vol-…",
                device.display()
            )
        })?,
    };
    if o.parent.is_some() || o.kms_key.is_some() {
        bail!(
            "--parent-snapshot and --kms-key do not apply to --snapshot ebs: a snapshot of a \
             volume inherits the volume's encryption, and EBS makes it incremental on its own"
        );
    }
    // What the builder wrote must be on the volume before it is snapshotted.
    if let Ok(f) = std::fs::File::open(device) {
        f.sync_all()
            .with_context(|| format!("flushing {}", device.display()))?;
    }
    let ec2 = aws_sdk_ec2::Client::new(config);
    let size = blocks::image_size(device).unwrap_or(0);
    let mut record = Record::new(Kind::Ebs, String::new(), device, size, seed, o);
    let tags: Vec<Tag> = record
        .tags
        .iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect();
    let out = ec2
        .create_snapshot()
        .volume_id(&volume)
        .description(
            o.description
                .clone()
                .unwrap_or_else(|| format!("coral seed volume {}", seed.seed_key)),
        )
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Snapshot)
                .set_tags(Some(tags))
                .build(),
        )
        .send()
        .await
        .map_err(|e| anyhow!("CreateSnapshot of {volume}: {}", DisplayErrorContext(&e)))?;
    let id = out
        .snapshot_id()
        .context("CreateSnapshot returned no snapshot ID")?
        .to_string();
    if let Some(gib) = out.volume_size() {
        record.volume_size_gib = gib as u64;
    }
    record.id = id.clone();
    let waited = tokio::time::timeout(o.deadline, wait_completed(&ec2, &id, o.poll_interval)).await;
    match waited {
        Ok(Ok(())) => Ok(record),
        Ok(Err(e)) => Err(discard(&ec2, &id, e).await),
        Err(_) => Err(discard(
            &ec2,
            &id,
            anyhow!("snapshot {id} did not complete within {:?}", o.deadline),
        )
        .await),
    }
}

/// Polls DescribeSnapshots until `id` is `completed`; its `error` state is
/// an error.
/// A snapshot EC2 does not show yet (new ones take a moment), or an error
/// that outlasted the SDK's retries, counts as pending: the caller's
/// deadline bounds the wait.
pub async fn wait_completed(ec2: &aws_sdk_ec2::Client, id: &str, every: Duration) -> Result<()> {
    let every = every.max(Duration::from_millis(100));
    let mut polls = 0u32;
    loop {
        let out = match ec2.describe_snapshots().snapshot_ids(id).send().await {
            Ok(out) => out,
            Err(e) => {
                polls += 1;
                tracing::info!(snapshot = id, error = %DisplayErrorContext(&e), "DescribeSnapshots failed; polling on");
                tokio::time::sleep(every).await;
                continue;
            }
        };
        let Some(snap) = out.snapshots().first() else {
            polls += 1;
            tokio::time::sleep(every).await;
            continue;
        };
        match snap.state() {
            Some(SnapshotState::Completed) => {
                tracing::info!(snapshot = id, polls, "snapshot completed");
                return Ok(());
            }
            Some(SnapshotState::Error) | Some(SnapshotState::Recoverable) => bail!(
                "snapshot {id} is in state {}{}",
                snap.state().map(|s| s.as_str()).unwrap_or("?"),
                snap.state_message()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default()
            ),
            other => {
                polls += 1;
                tracing::info!(
                    snapshot = id,
                    state = other.map(|s| s.as_str()).unwrap_or("?"),
                    progress = snap.progress().unwrap_or(""),
                    "waiting for the snapshot"
                );
                tokio::time::sleep(every).await;
            }
        }
    }
}

/// After a failure: deletes the snapshot so that nothing half-made looks
/// usable, and returns the error saying what became of it.
pub async fn discard(ec2: &aws_sdk_ec2::Client, id: &str, error: anyhow::Error) -> anyhow::Error {
    let delete = ec2.delete_snapshot().snapshot_id(id).send();
    match tokio::time::timeout(Duration::from_secs(60), delete).await {
        // (A snapshot still in progress goes once it has stopped.)
        Ok(Ok(_)) => error.context(format!(
            "snapshot {id} was not made; its deletion has been requested"
        )),
        Ok(Err(e)) => error.context(format!(
            "snapshot {id} was not made, and deleting it failed too ({}): delete it by hand \
             (it is incomplete and must not be used)",
            DisplayErrorContext(&e)
        )),
        Err(_) => error.context(format!(
            "snapshot {id} was not made, and deleting it did not answer within 60 s: delete \
             it by hand (it is incomplete and must not be used)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_nvme_serial_names_the_ebs_volume() {
        let tmp = tempfile::tempdir().unwrap();
        let sys = tmp.path().join("sys");
        let dev = tmp.path().join("dev");
        std::fs::create_dir_all(sys.join("block/nvme1n1/device")).unwrap();
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::write(dev.join("nvme1n1"), b"").unwrap();
        std::fs::write(
            sys.join("block/nvme1n1/device/serial"),
            b"vol0123456789abcdef0  \n",
        )
        .unwrap();
        assert_eq!(
            volume_id_of(&dev.join("nvme1n1"), &sys).as_deref(),
            Some("vol-0123456789abcdef0")
        );
        std::fs::write(sys.join("block/nvme1n1/device/serial"), b"AWS12345\n").unwrap();
        assert_eq!(volume_id_of(&dev.join("nvme1n1"), &sys), None);
    }
}
